//! Labelled regular schedules for the timing models: weeks of message attempts by keys with known
//! schedules, then an evaluation week with off-schedule attempts, each labelled with what a correct
//! pipeline must make of it.
//!
//! The main [`Simulator`](super::Simulator) spans minutes of event time; a schedule needs weeks
//! (the contract's 14 days and 50 attempts), so this generator is separate, sans-I/O and
//! deterministic like it (the same [`ScheduleConfig`] gives the same records).
//!
//! ```text
//!  start_ms (a UTC midnight)        training_ms = start + history_days        end_ms = + eval_days
//!  │ history: scheduled attempts, 1 % strays at random times │ evaluation: scheduled attempts (Benign)
//!  │ (training material; labelled Benign)                     │ + off-schedule attempts, labelled
//!  └──────────────────────────────────────────────────────────┴───────────────────────────────────────┘
//! ```
//!
//! **The population.** Every UUID is registered (at `start_ms − 1000`, no permissions record, so
//! everything is allowed) and sends only `send`s with valid credentials, far below every throttle:
//! the only findings a correct pipeline gives are timing anomalies. Requesters come in five groups:
//! 1. *regular pairs* (60 %): one target, a schedule drawn from [`ARCHETYPES`] (weekday mornings,
//!    business hours, nightly, weekends, ...), 80 to 500 attempts over the history, at uniformly
//!    random minutes of their scheduled hours, plus `stray_ratio` of attempts at random times;
//! 2. *sparse pairs* (10 %): one target on Mon-Fri 08:00-14:00, exactly three attempts per weekday
//!    (60 in four weeks: enough history, but a third of their 30 hours seen at most once): they
//!    need the well-observed pairs of the same schedule to learn it;
//! 3. *multi-target requesters* (10 %): six targets on one schedule, each pair below 50 attempts to
//!    the end, the requester well above: judged on the requester's schedule (`timing:requester`);
//! 4. *newcomers* (10 %): one target, either fewer than 50 attempts to the end or a first attempt
//!    fewer than 14 days before the end: no schedule, so off-schedule attempts give no finding;
//! 5. *around the clock* (10 %): one target, 8 to 20 attempts a day at random times: no schedule to
//!    break, never anomalous.
//!
//! **Labels.** In the evaluation week every key of groups 1-4 makes a Poisson(`anomalies_per_key`)
//! number of attempts in hours of the week outside its schedule: [`Label::TimingAnomaly`] for
//! groups 1-3 (their history qualifies), [`Label::Benign`] for group 4. Everything else is
//! [`Label::Benign`]. The labels of the evaluation week are exact by construction (the schedule is
//! the truth, whatever a model makes of it); those of the history are not meant to be scored.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::{Builder, Uuid};

use super::{Label, SimRecord, write};
use meshguard_schemas::InputTopic;

const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Event time of the first attempt's day (epoch ms; rounded down to a UTC midnight).
    pub start_ms: i64,
    /// Days of history before the evaluation (at least 14, the contract's history).
    pub history_days: u32,
    /// Days of evaluation.
    pub eval_days: u32,
    /// Requesters (all groups).
    pub requesters: usize,
    /// Mean off-schedule attempts per key in the evaluation window.
    pub anomalies_per_key: f64,
    /// Share of a regular pair's history attempts made at random times (noise).
    pub stray_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        // 2026-10-26, a Monday: four weeks of history end on 2026-11-23.
        Self {
            seed: 42,
            start_ms: 1_792_972_800_000,
            history_days: 28,
            eval_days: 7,
            requesters: 2_000,
            anomalies_per_key: 1.0,
            stray_ratio: 0.01,
        }
    }
}

/// A schedule: usual hours of the week (bit `b`, Monday 00:00 UTC = 0).
type Mask = [bool; 168];

/// Named schedule shapes; each key takes one with a random start hour among a few.
pub const ARCHETYPES: [&str; 8] = [
    "weekday mornings",
    "business hours",
    "nightly",
    "weekends",
    "twice daily",
    "mon-wed-fri afternoons",
    "night shift",
    "weekday mid-days",
];

fn archetype(i: usize, variant: usize) -> Mask {
    let mut m = [false; 168];
    let mut set = |days: &[usize], hours: std::ops::Range<usize>| {
        for &d in days {
            for h in hours.clone() {
                m[d * 24 + h % 24] = true;
            }
        }
    };
    let weekdays = [0, 1, 2, 3, 4];
    let all = [0, 1, 2, 3, 4, 5, 6];
    match i {
        0 => set(&weekdays, (6 + variant)..(8 + variant)),
        1 => set(&weekdays, 9..17),
        2 => set(&all, [2, 3, 23][variant % 3]..[3, 4, 24][variant % 3]),
        3 => set(&[5, 6], (10 + variant)..(16 + variant)),
        4 => {
            set(&all, (6 + variant)..(7 + variant));
            set(&all, (18 + variant)..(19 + variant));
        }
        5 => set(&[0, 2, 4], (13 + 3 * variant)..(16 + 3 * variant)),
        6 => set(&all, 0..4),
        _ => set(&weekdays, 8..14),
    }
    m
}

/// The sparse pairs' schedule: Mon-Fri 08:00-14:00 (archetype 7).
const SPARSE_ARCHETYPE: usize = 7;

/// Counts of what was generated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleStats {
    /// Attempts.
    pub attempts: u64,
    /// Of those, labelled [`Label::TimingAnomaly`].
    pub anomalies: u64,
    /// Off-schedule attempts in the evaluation week by keys without enough history (Benign).
    pub newcomer_off_schedule: u64,
    /// Attempts by requester group (regular, sparse, multi-target, newcomer, around the clock).
    pub by_group: [u64; 5],
}

/// The generator. See the module docs.
#[derive(Debug)]
pub struct ScheduleSim {
    cfg: ScheduleConfig,
    uuids: Vec<Uuid>,
    stats: ScheduleStats,
}

/// One attempt to write.
struct Attempt {
    ts: i64,
    from: u32,
    to: u32,
    label: Label,
}

impl ScheduleSim {
    /// A generator for `cfg` (`start_ms` rounded down to a UTC midnight, at least 14 days of history).
    pub fn new(mut cfg: ScheduleConfig) -> Self {
        cfg.start_ms = cfg.start_ms.div_euclid(DAY) * DAY;
        cfg.history_days = cfg.history_days.max(14);
        cfg.eval_days = cfg.eval_days.max(1);
        cfg.requesters = cfg.requesters.max(5);
        Self { cfg, uuids: Vec::new(), stats: ScheduleStats::default() }
    }

    /// When the history ends and the evaluation starts (epoch ms): train at this time.
    pub fn training_ms(&self) -> i64 {
        self.cfg.start_ms + i64::from(self.cfg.history_days) * DAY
    }

    /// The end of the evaluation (epoch ms).
    pub fn end_ms(&self) -> i64 {
        self.training_ms() + i64::from(self.cfg.eval_days) * DAY
    }

    /// What was generated.
    pub fn stats(&self) -> &ScheduleStats {
        &self.stats
    }

    /// Every record: the registry first (at `start_ms − 1000`), then the attempts in event-time order.
    pub fn generate(&mut self) -> Vec<SimRecord> {
        let mut rng = SmallRng::seed_from_u64(self.cfg.seed);
        let mut attempts: Vec<Attempt> = Vec::new();
        let (start, training, end) = (self.cfg.start_ms, self.training_ms(), self.end_ms());
        let next_uuid = |rng: &mut SmallRng, uuids: &mut Vec<Uuid>| -> u32 {
            uuids.push(Builder::from_random_bytes(rng.random()).into_uuid());
            (uuids.len() - 1) as u32
        };
        let mut uuids = Vec::new();
        let n = self.cfg.requesters;
        for r in 0..n {
            let group = match r * 10 / n {
                0..=5 => 0,
                6 => 1,
                7 => 2,
                8 => 3,
                _ => 4,
            };
            let from = next_uuid(&mut rng, &mut uuids);
            let before = attempts.len();
            match group {
                0 => {
                    let to = next_uuid(&mut rng, &mut uuids);
                    let mask = archetype(rng.random_range(0..ARCHETYPES.len()), rng.random_range(0..3));
                    let total = rng.random_range(80..500);
                    let history = on_schedule(&mut rng, &mask, start, training, total);
                    let strays = (history.len() as f64 * self.cfg.stray_ratio).round() as usize;
                    for ts in history {
                        attempts.push(Attempt { ts, from, to, label: Label::Benign });
                    }
                    for _ in 0..strays {
                        attempts.push(Attempt { ts: rng.random_range(start..training), from, to, label: Label::Benign });
                    }
                    let eval =
                        on_schedule(&mut rng, &mask, training, end, total * self.cfg.eval_days as usize / self.cfg.history_days as usize);
                    attempts.extend(eval.into_iter().map(|ts| Attempt { ts, from, to, label: Label::Benign }));
                    self.off_schedule(&mut rng, &mask, from, &[to], Label::TimingAnomaly, &mut attempts);
                }
                1 => {
                    let to = next_uuid(&mut rng, &mut uuids);
                    let mask = archetype(SPARSE_ARCHETYPE, 0);
                    let mut day = start;
                    while day < end {
                        let weekday = (day.div_euclid(DAY) + 3).rem_euclid(7) as usize;
                        if weekday < 5 {
                            for _ in 0..3 {
                                let ts = day + rng.random_range(8 * HOUR..14 * HOUR);
                                attempts.push(Attempt { ts, from, to, label: Label::Benign });
                            }
                        }
                        day += DAY;
                    }
                    self.off_schedule(&mut rng, &mask, from, &[to], Label::TimingAnomaly, &mut attempts);
                }
                2 => {
                    let targets: Vec<u32> = (0..6).map(|_| next_uuid(&mut rng, &mut uuids)).collect();
                    let mask = archetype(rng.random_range(0..ARCHETYPES.len() - 1), rng.random_range(0..3));
                    // 40 attempts per pair over history and evaluation together: no pair reaches 50.
                    let total = 40 * targets.len() * (self.cfg.history_days + self.cfg.eval_days) as usize / 35;
                    let per_pair = (total / targets.len()).min(45);
                    for &to in &targets {
                        let times = on_schedule(&mut rng, &mask, start, end, per_pair);
                        attempts.extend(times.into_iter().map(|ts| Attempt { ts, from, to, label: Label::Benign }));
                    }
                    self.off_schedule(&mut rng, &mask, from, &targets, Label::TimingAnomaly, &mut attempts);
                }
                3 => {
                    let to = next_uuid(&mut rng, &mut uuids);
                    let mask = archetype(rng.random_range(0..ARCHETYPES.len()), rng.random_range(0..3));
                    let times = if r % 2 == 0 {
                        // Too few: fewer than 50 attempts to the end.
                        on_schedule(&mut rng, &mask, start, end, 40)
                    } else {
                        // Too recent: a first attempt 12 days before the end.
                        on_schedule(&mut rng, &mask, end - 12 * DAY, end, 120)
                    };
                    attempts.extend(times.into_iter().map(|ts| Attempt { ts, from, to, label: Label::Benign }));
                    let before_off = attempts.len();
                    self.off_schedule(&mut rng, &mask, from, &[to], Label::Benign, &mut attempts);
                    self.stats.newcomer_off_schedule += (attempts.len() - before_off) as u64;
                }
                _ => {
                    let to = next_uuid(&mut rng, &mut uuids);
                    let per_day = rng.random_range(8..20);
                    let days = (end - start) / DAY;
                    for _ in 0..per_day * days {
                        attempts.push(Attempt { ts: rng.random_range(start..end), from, to, label: Label::Benign });
                    }
                }
            }
            self.stats.by_group[group] += (attempts.len() - before) as u64;
        }
        self.uuids = uuids;
        attempts.sort_by_key(|a| (a.ts, a.from, a.to));

        let mut out = Vec::with_capacity(self.uuids.len() + attempts.len());
        for u in &self.uuids {
            let text = write::uuid_text(u, false);
            let mut payload = Vec::with_capacity(64);
            payload.extend_from_slice(b"{\"uuid\":");
            write::quoted(&mut payload, &text);
            payload.extend_from_slice(b",\"kind\":\"device\"}");
            out.push(SimRecord {
                topic: InputTopic::Registry,
                key: text.to_vec(),
                payload: Some(payload),
                timestamp_ms: start - 1_000,
                label: None,
                malformed: None,
            });
        }
        for a in attempts {
            self.stats.attempts += 1;
            if a.label == Label::TimingAnomaly {
                self.stats.anomalies += 1;
            }
            let id = Builder::from_random_bytes(rng.random()).into_uuid();
            let from = write::uuid_text(&self.uuids[a.from as usize], false);
            let mut payload = Vec::with_capacity(200);
            payload.extend_from_slice(b"{\"id\":");
            write::quoted(&mut payload, &write::uuid_text(&id, false));
            payload.extend_from_slice(b",\"ts\":\"");
            write::rfc3339(&mut payload, a.ts);
            payload.extend_from_slice(b"\",\"action\":\"send\",\"from\":");
            write::quoted(&mut payload, &from);
            payload.extend_from_slice(b",\"to\":");
            write::quoted(&mut payload, &write::uuid_text(&self.uuids[a.to as usize], false));
            payload.extend_from_slice(b",\"auth\":\"valid\"}");
            out.push(SimRecord {
                topic: InputTopic::Messages,
                key: from.to_vec(),
                payload: Some(payload),
                timestamp_ms: a.ts,
                label: Some(a.label),
                malformed: None,
            });
        }
        out
    }

    /// Poisson(`anomalies_per_key`) attempts in the evaluation window, each in an hour of the week
    /// outside `mask`, to one of `targets`.
    fn off_schedule(&self, rng: &mut SmallRng, mask: &Mask, from: u32, targets: &[u32], label: Label, out: &mut Vec<Attempt>) {
        let off: Vec<usize> = (0..168).filter(|&b| !mask[b]).collect();
        let (training, end) = (self.training_ms(), self.end_ms());
        for _ in 0..poisson(rng, self.cfg.anomalies_per_key) {
            let b = off[rng.random_range(0..off.len())];
            let ts = at_hour_of_week(rng, b, training, end);
            if let Some(ts) = ts {
                let to = targets[rng.random_range(0..targets.len())];
                out.push(Attempt { ts, from, to, label });
            }
        }
    }
}

/// `n` attempts at random minutes of random usual hours of `mask` in `[from, until)`.
fn on_schedule(rng: &mut SmallRng, mask: &Mask, from: i64, until: i64, n: usize) -> Vec<i64> {
    // Every usual hour occurrence in the window, then n of them drawn with replacement.
    let mut hours = Vec::new();
    let mut h = from.div_euclid(HOUR) * HOUR;
    while h < until {
        let b = hour_of_week(h);
        if mask[b] && h >= from {
            hours.push(h);
        }
        h += HOUR;
    }
    if hours.is_empty() {
        return Vec::new();
    }
    (0..n).map(|_| hours[rng.random_range(0..hours.len())] + rng.random_range(0..HOUR)).collect()
}

/// A random time in `[from, until)` in hour of the week `b`.
fn at_hour_of_week(rng: &mut SmallRng, b: usize, from: i64, until: i64) -> Option<i64> {
    let mut candidates = Vec::new();
    let mut h = from.div_euclid(HOUR) * HOUR;
    while h < until {
        if h >= from && hour_of_week(h) == b {
            candidates.push(h);
        }
        h += HOUR;
    }
    if candidates.is_empty() {
        return None;
    }
    Some(candidates[rng.random_range(0..candidates.len())] + rng.random_range(0..HOUR))
}

/// Monday 00:00 UTC = 0.
fn hour_of_week(ts: i64) -> usize {
    let hours = ts.div_euclid(HOUR);
    ((hours.div_euclid(24) + 3).rem_euclid(7) * 24 + hours.rem_euclid(24)) as usize
}

/// Knuth's Poisson sampler (small means).
fn poisson(rng: &mut SmallRng, mean: f64) -> usize {
    let limit = (-mean).exp();
    let mut p = 1.0;
    let mut k = 0;
    loop {
        p *= rng.random::<f64>();
        if p <= limit {
            return k;
        }
        k += 1;
    }
}
