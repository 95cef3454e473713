//! A deterministic, sans-I/O traffic simulator: the records a messaging platform would publish on
//! meshguard's input topics, with injected violations whose expected findings are known.
//!
//! It owns the simulated platform (a registered population with owners, groups, permissions
//! records and security profiles), the traffic generated from it, and the label of every message
//! attempt: the finding a correct pipeline must give for it. It never does I/O (no Kafka, no
//! clock, no threads): callers publish [`SimRecord`]s themselves, with their key and timestamp.
//! The same [`SimConfig`] always gives byte-identical records, on one build of the crate.
//!
//! ```text
//!  SimConfig ──► Simulator::new ──► bootstrap(): one registry record per registered UUID
//!                                   (at start_ms − 1000) and everyone's presence (start_ms − 500)
//!                                ──► next_batch(n): n records in nondecreasing event time
//!                                    ~97.9% message attempts  (benign, or labelled violations)
//!                                     2%    presence changes
//!                                     0.1%  registry changes (updates, tombstones, re-registrations)
//!                                     malformed_ratio  dead-letter material on the messages topic
//! ```
//!
//! # Labels and what a correct pipeline gives
//!
//! Every well-formed message attempt carries a [`Label`], decided from the registry as it stands at
//! the attempt's `ts` (a registry record or tombstone takes effect at its timestamp; a registry
//! change always opens a new millisecond, so no attempt generated before it shares that
//! timestamp) with the contract's precedence: a requester that is not registered is
//! [`Label::UnregisteredRequester`] whatever its `auth`; a registered one whose `auth` is not
//! `valid` is [`Label::BadCredentials`]; a `subscribe` or `configure` without the target's token
//! by a registered requester that does not own the target (and that no profile of the target
//! governs) is [`Label::PermissionDenied`]; everything else is [`Label::Benign`].
//!
//! Benign attempts are generated so that they break no other rule of the contract either: the
//! target is registered and its permissions record admits the requester (judged conservatively,
//! see `population::Population::allows`), no security profile applies, no requester goes past the
//! default throttles (10 attempts and 2 `connect`s per second), and no offender reaches the default
//! enforcement thresholds (5 unauthorized attempts in 10 minutes, 20 in 24 hours), so nobody is
//! ever blocked. A correct pipeline with default settings therefore gives exactly one finding per
//! labelled violation ([`SimStats::expected_finding_count`]) and one dead letter per
//! [`Label::Malformed`] record. Timing anomalies need 14 days of event time, which only a run of
//! more than `rate × 1.2 M` records reaches, and this traffic has no regular schedules: labelled
//! schedules and off-schedule attempts come from [`schedules::ScheduleSim`], a generator of its own
//! over weeks of event time. Interactions and identity requests are not generated.
//!
//! # Rate and population
//!
//! Requesters stay under the per-requester throttle, so ordinary traffic tops out near
//! `10 × devices` attempts per second of event time. Above that, the rest of the benign attempts
//! come from exempt UUIDs (the platform's gateways, which no throttle applies to); the findings
//! stay exact but the traffic is less varied, and [`SimStats::exempt_fallbacks`] counts them.
//! Likewise offenders' budgets cap registered-requester violations, and the remainder become
//! never-registered requesters.
//!
//! UUIDs in message attempts and presence are upper case about 5% of the time, and a message's key
//! is its `from` exactly as written, so one requester can appear under two keys (and partitions).
//! Registry records are always lower case: the topic is compacted by key.

mod budget;
mod population;
pub mod schedules;
#[cfg(test)]
mod tests;
mod write;

use meshguard_schemas::{Action, Auth, InputTopic};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::{Builder, Uuid};

use budget::{Budget, PER_REQUESTER_MAX, Pool};
use population::{COUNTRIES, Ix, Kind, Level, Population};
use write::UUID_LEN;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Seed of every random choice; the same configuration gives the same bytes.
    pub seed: u64,
    /// Registered UUIDs (devices, persons, systems, gateways); at least 8 are generated.
    pub devices: usize,
    /// Event time (epoch ms) of the first traffic record; the bootstrap comes just before it.
    pub start_ms: i64,
    /// Traffic records per second of event time (nearly all are message attempts): record `k` of
    /// the traffic has event time `start_ms + k * 1000 / rate`. 0 counts as 1.
    pub rate: u64,
    /// Share of message attempts that are violations (unregistered requester, bad credentials).
    pub violation_ratio: f64,
    /// Share of traffic records that are malformed message attempts (dead-letter material).
    pub malformed_ratio: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            devices: 1_000,
            // 2026-11-24T17:00:00Z, the time of the contract's examples.
            start_ms: 1_795_539_600_000,
            rate: 2_000,
            violation_ratio: 0.02,
            malformed_ratio: 0.0,
        }
    }
}

/// What a correct pipeline must make of a record on the messages topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    /// Exactly one `unregistered_requester` finding: the requester is not registered at the
    /// attempt's `ts` (never was, or was tombstoned before it), whatever its `auth`.
    UnregisteredRequester,
    /// Exactly one `bad_credentials` finding: a registered requester with `auth` not `valid`.
    BadCredentials,
    /// Exactly one `permission_denied` finding: a registered requester with valid credentials
    /// subscribes to or configures a registered device it does not own, without the device's token
    /// (those levels always need it), and no profile of the device applies to it.
    PermissionDenied,
    /// Exactly one `throttle_exceeded` finding (rule `throttle:requester`): the last of a flood of
    /// eleven otherwise benign sends by one quiet requester in the same millisecond, the first
    /// past the default limit of 10 per second. The other ten are [`Label::Benign`].
    ThrottleExceeded,
    /// Exactly one `timing_anomaly` finding: an attempt outside the regular schedule of a pair
    /// (or of a requester whose pairs are too young) with enough history (generated by
    /// [`schedules::ScheduleSim`] only).
    TimingAnomaly,
    /// Not a valid record: it goes to the dead-letter topic and gives no finding.
    Malformed,
    /// No finding at all.
    Benign,
}

impl Label {
    /// The contract's finding `kind` this label expects, if any.
    pub const fn finding_kind(self) -> Option<&'static str> {
        match self {
            Label::UnregisteredRequester => Some("unregistered_requester"),
            Label::BadCredentials => Some("bad_credentials"),
            Label::PermissionDenied => Some("permission_denied"),
            Label::ThrottleExceeded => Some("throttle_exceeded"),
            Label::TimingAnomaly => Some("timing_anomaly"),
            Label::Malformed | Label::Benign => None,
        }
    }
}

/// How a [`Label::Malformed`] record breaks the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MalformedKind {
    /// Not one valid JSON text (truncated, a stray `}`, a single-quoted key).
    InvalidJson,
    /// A required field (`id`, `ts`, `action`, `from`, `auth`, or `to` of a non-`connect`) is absent.
    MissingField,
    /// A field holds the wrong JSON type (e.g. `"ts": true`, `"payload_bytes": "17"`).
    WrongType,
    /// A UUID field (`id`, `from`, `to` or a `route` entry) is not RFC 4122 text.
    BadUuid,
    /// `ts` is a string that is not RFC 3339.
    BadTime,
    /// `action` or `auth` is outside the contract's values.
    UnknownEnum,
}

impl MalformedKind {
    /// Every kind, in [`SimStats::malformed_by_kind`] order.
    pub const ALL: [MalformedKind; 6] = [
        MalformedKind::InvalidJson,
        MalformedKind::MissingField,
        MalformedKind::WrongType,
        MalformedKind::BadUuid,
        MalformedKind::BadTime,
        MalformedKind::UnknownEnum,
    ];
}

/// One Kafka record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRecord {
    /// The topic it belongs on.
    pub topic: InputTopic,
    /// The contract's key: `from` exactly as written in the record (lower or upper case) for
    /// messages, `uuid` for presence, the lower-case `uuid` for the registry.
    pub key: Vec<u8>,
    /// The JSON value; `None` is a registry tombstone.
    pub payload: Option<Vec<u8>>,
    /// The Kafka record timestamp: the record's event time (epoch ms).
    pub timestamp_ms: i64,
    /// For records on the messages topic, what a correct pipeline makes of it; `None` elsewhere.
    pub label: Option<Label>,
    /// For [`Label::Malformed`] records, how they are malformed.
    pub malformed: Option<MalformedKind>,
}

/// Counts of what was generated so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Every record, bootstrap included.
    pub records: u64,
    /// Well-formed message attempts (the three labels below).
    pub attempts: u64,
    /// Attempts labelled [`Label::Benign`].
    pub benign: u64,
    /// Attempts labelled [`Label::UnregisteredRequester`].
    pub unregistered_requester: u64,
    /// Of those, attempts by a UUID that was registered once and tombstoned.
    pub tombstoned_requester: u64,
    /// Attempts labelled [`Label::BadCredentials`].
    pub bad_credentials: u64,
    /// Attempts labelled [`Label::PermissionDenied`].
    pub permission_denied: u64,
    /// Attempts labelled [`Label::ThrottleExceeded`] (one per flood).
    pub throttle_exceeded: u64,
    /// Records labelled [`Label::Malformed`].
    pub malformed: u64,
    /// Malformed records per kind, in [`MalformedKind::ALL`] order.
    pub malformed_by_kind: [u64; 6],
    /// Presence records.
    pub presence: u64,
    /// Registry records with a value (bootstrap, updates, re-registrations).
    pub registry: u64,
    /// Registry tombstones.
    pub tombstones: u64,
    /// Message records whose `ts` is written as epoch milliseconds (the rest are RFC 3339).
    pub epoch_ms_times: u64,
    /// Benign attempts made by an exempt UUID because no other requester could stay under the
    /// throttles (a sign that `rate` is high for `devices`).
    pub exempt_fallbacks: u64,
}

impl SimStats {
    /// The findings a correct pipeline with default settings gives for the traffic so far: one per
    /// labelled violation.
    pub const fn expected_finding_count(&self) -> u64 {
        self.unregistered_requester + self.bad_credentials + self.permission_denied + self.throttle_exceeded
    }

    /// Attempts (or malformed records) generated with `label`.
    pub const fn by_label(&self, label: Label) -> u64 {
        match label {
            Label::UnregisteredRequester => self.unregistered_requester,
            Label::BadCredentials => self.bad_credentials,
            Label::PermissionDenied => self.permission_denied,
            Label::ThrottleExceeded => self.throttle_exceeded,
            Label::Malformed => self.malformed,
            Label::Benign => self.benign,
            // Only the schedule generator makes these (see its `ScheduleStats`).
            Label::TimingAnomaly => 0,
        }
    }
}

/// Of the violations, the share that are floods (each eleven records, one labelled).
const FLOOD_SHARE: f64 = 0.05;
/// Share of traffic records that are presence changes.
const PRESENCE_SHARE: f64 = 0.02;
/// Share of traffic records that are registry changes.
const REGISTRY_SHARE: f64 = 0.001;
/// Share of times written as epoch milliseconds rather than RFC 3339.
const EPOCH_MS_SHARE: f64 = 0.2;
/// Share of UUIDs in message attempts and presence written in upper case.
const UPPER_SHARE: f64 = 0.05;
/// At most this share of devices is tombstoned at any time, so the population does not wither.
const TOMBSTONED_MAX_SHARE: usize = 50;

/// Action weights of benign traffic: connect, discover, send, receive, subscribe, configure.
const BENIGN_MIX: [u32; 6] = [8, 7, 50, 20, 10, 5];
/// Action weights of violations: attackers probe more.
const ATTACK_MIX: [u32; 6] = [25, 20, 30, 5, 10, 10];
const ACTIONS: [Action; 6] = [Action::Connect, Action::Discover, Action::Send, Action::Receive, Action::Subscribe, Action::Configure];
const PROTOCOLS: [&str; 5] = ["mqtt", "http", "websocket", "coap", "xmpp"];
const BROKERS: [&str; 4] = ["eu-1", "eu-2", "us-1", "ap-1"];

/// A UUID that was never registered and tries its luck a few times.
#[derive(Debug)]
struct Prowler {
    lower: [u8; UUID_LEN],
    upper: [u8; UUID_LEN],
    country: u8,
    budget: Budget,
}

/// How many prowlers are remembered for reuse.
const PROWLERS: usize = 64;

/// Who makes an attempt.
#[derive(Debug, Clone, Copy)]
enum Requester {
    Entity(Ix),
    Prowler(usize),
}

/// A decided message attempt, before it is written.
#[derive(Debug, Clone, Copy)]
struct Plan {
    action: Action,
    from: Requester,
    to: Option<Ix>,
    auth: Auth,
    /// Write `"target_token": true`.
    token: bool,
    label: Label,
}

/// A field of a message attempt, for aiming a corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Id,
    Ts,
    Action,
    From,
    To,
    Auth,
    TargetToken,
    Route,
    Location,
    Payload,
    PayloadBytes,
    Encrypted,
    Protocol,
}

/// How a malformed record is broken: `kind`, aimed at `field`, in the form `variant` selects.
#[derive(Debug, Clone, Copy)]
struct Corruption {
    kind: MalformedKind,
    field: Field,
    variant: usize,
}

impl Corruption {
    fn omits(c: Option<Self>, f: Field) -> bool {
        c.is_some_and(|c| c.field == f && c.kind == MalformedKind::MissingField)
    }

    /// The corruption that replaces the value of `f`, if any.
    fn replaces(c: Option<Self>, f: Field) -> Option<Self> {
        c.filter(|c| c.field == f && !matches!(c.kind, MalformedKind::MissingField | MalformedKind::InvalidJson))
    }

    fn touches(c: Option<Self>, f: Field) -> bool {
        c.is_some_and(|c| c.field == f && c.kind != MalformedKind::InvalidJson)
    }

    /// A value of the wrong JSON type for `field`.
    fn wrong_type(field: Field, v: usize) -> &'static [u8] {
        match field {
            Field::Id | Field::From => b"12345",
            Field::Ts => b"true",
            Field::Action => b"3",
            Field::To => b"[]",
            Field::TargetToken if v.is_multiple_of(2) => b"\"yes\"",
            Field::Auth => b"false",
            Field::Encrypted => b"\"no\"",
            Field::TargetToken => b"1",
            Field::Route => b"\"eu-1/eu-2\"",
            Field::Location if v.is_multiple_of(2) => b"\"DE\"",
            Field::Location => b"{\"lat\":\"north\",\"lon\":13.4}",
            Field::Payload => b"\"on\"",
            Field::PayloadBytes => b"\"17\"",
            Field::Protocol => b"1883",
        }
    }

    /// Writes the broken value (`real` is the text a good record would hold).
    fn write_value(self, buf: &mut Vec<u8>, real: &[u8]) {
        let v = self.variant;
        match self.kind {
            MalformedKind::WrongType => buf.extend_from_slice(Self::wrong_type(self.field, v)),
            MalformedKind::BadUuid => match v % 3 {
                // One hex digit short.
                0 => write::quoted(buf, &real[..real.len().saturating_sub(1)]),
                // Not hex.
                1 => {
                    write::quoted(buf, real);
                    let n = buf.len();
                    if n >= 4 {
                        buf[n - 3..n - 1].copy_from_slice(b"zz");
                    }
                }
                _ => write::quoted(buf, b"not-a-uuid"),
            },
            MalformedKind::BadTime => {
                const BAD: [&[u8]; 3] = [b"yesterday", b"2026-13-45T00:00:00Z", b"24/11/2026 17:00:00"];
                write::quoted(buf, BAD[v % BAD.len()]);
            }
            MalformedKind::UnknownEnum => {
                const ACTION: [&[u8]; 3] = [b"publish", b"teleport", b"delete"];
                const AUTH: [&[u8]; 3] = [b"expired", b"revoked", b"unknown"];
                let words = if self.field == Field::Auth { AUTH } else { ACTION };
                write::quoted(buf, words[v % words.len()]);
            }
            MalformedKind::MissingField | MalformedKind::InvalidJson => write::quoted(buf, real),
        }
    }
}

/// Writes the string field `"name":"value"`, with `bad`'s broken value instead when it aims at
/// `field`, or nothing when `bad` omits it.
fn string_field(buf: &mut Vec<u8>, bad: Option<Corruption>, field: Field, name: &str, value: &[u8]) {
    if Corruption::omits(bad, field) {
        return;
    }
    key(buf, name);
    match Corruption::replaces(bad, field) {
        Some(c) => c.write_value(buf, value),
        None => write::quoted(buf, value),
    }
}

/// Writes `"name":`, preceded by a comma unless it is the object's first field.
fn key(buf: &mut Vec<u8>, name: &str) {
    if buf.last() != Some(&b'{') {
        buf.push(b',');
    }
    write::quoted(buf, name.as_bytes());
    buf.push(b':');
}

fn pick_weighted(rng: &mut SmallRng, weights: &[u32; 6]) -> Action {
    let total: u32 = weights.iter().sum();
    let mut x = rng.random_range(0..total);
    for (w, a) in weights.iter().zip(ACTIONS) {
        if x < *w {
            return a;
        }
        x -= w;
    }
    Action::Send
}

fn level(action: Action) -> Option<Level> {
    match action {
        Action::Connect => None,
        Action::Discover => Some(Level::Discover),
        Action::Send => Some(Level::Send),
        Action::Receive => Some(Level::Receive),
        Action::Subscribe => Some(Level::Subscribe),
        Action::Configure => Some(Level::Configure),
    }
}

/// The traffic generator. See the module documentation for what it generates and guarantees.
pub struct Simulator {
    cfg: SimConfig,
    violation_ratio: f64,
    malformed_ratio: f64,
    rng: SmallRng,
    pop: Population,
    /// Registered UUIDs.
    active: Pool,
    /// Registered devices: the targets of subscribe/configure, and what may be tombstoned.
    devices: Pool,
    /// Registered UUIDs that are not exempt: the requesters of ordinary traffic.
    requesters: Pool,
    exempt: Vec<Ix>,
    tombstoned: Pool,
    /// Devices ever generated (tombstoned or not), for the tombstone cap.
    device_count: usize,
    online: Vec<bool>,
    budgets: Vec<Budget>,
    prowlers: Vec<Prowler>,
    /// Traffic records generated so far: the next one's index.
    seq: u64,
    /// Event time of the latest traffic record.
    last_ts: i64,
    /// A registry change is due but waits for the next millisecond (see `next_batch`).
    registry_due: bool,
    registry_changes: u64,
    /// Records drawn ahead (the rest of a flood), emitted before anything new.
    pending: std::collections::VecDeque<SimRecord>,
    /// Write UUIDs in lower case only (while drawing a flood: its attempts share one key, so one
    /// partition counts them; see "Known limits" in the README for mixed-case keys).
    lower_only: bool,
    buf: Vec<u8>,
    stats: SimStats,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("cfg", &self.cfg)
            .field("population", &self.pop.entities.len())
            .field("tombstoned", &self.tombstoned.len())
            .field("seq", &self.seq)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Builds the population from `cfg.seed`. Cheap for the default 1,000 UUIDs; memory is
    /// O(`cfg.devices`).
    pub fn new(cfg: SimConfig) -> Self {
        let clamp = |r: f64| {
            if r.is_finite() { r.clamp(0.0, 1.0) } else { 0.0 }
        };
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let pop = Population::build(&mut rng, cfg.devices, cfg.seed, cfg.start_ms);
        let n = pop.entities.len();
        let (mut active, mut devices, mut requesters) = (Pool::new(n), Pool::new(n), Pool::new(n));
        let mut exempt = Vec::new();
        for (i, e) in pop.entities.iter().enumerate() {
            let ix = i as Ix;
            active.insert(ix);
            if e.kind == Kind::Device {
                devices.insert(ix);
            }
            if e.exempt {
                exempt.push(ix);
            } else {
                requesters.insert(ix);
            }
        }
        let online = (0..n).map(|_| rng.random_bool(0.85)).collect();
        // Traffic draws from its own stream, so population changes do not reshuffle it.
        let traffic = SmallRng::seed_from_u64(cfg.seed ^ 0x7472_6166_6669_6321);
        Self {
            violation_ratio: clamp(cfg.violation_ratio),
            malformed_ratio: clamp(cfg.malformed_ratio),
            rng: traffic,
            device_count: devices.len(),
            active,
            devices,
            requesters,
            exempt,
            tombstoned: Pool::new(n),
            online,
            budgets: vec![Budget::new(); n],
            prowlers: Vec::with_capacity(PROWLERS),
            seq: 0,
            last_ts: i64::MIN,
            registry_due: false,
            registry_changes: 0,
            pending: std::collections::VecDeque::new(),
            lower_only: false,
            buf: Vec::with_capacity(1024),
            stats: SimStats::default(),
            pop,
            cfg,
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// The registry records (one per registered UUID, at `start_ms − 1000`) and everyone's
    /// presence (at `start_ms − 500`), to publish before the traffic. Call it once, first: it
    /// renders the current state, and its records count in [`Self::stats`].
    pub fn bootstrap(&mut self) -> Vec<SimRecord> {
        let n = self.pop.entities.len();
        let mut out = Vec::with_capacity(2 * n);
        let registry_ts = self.cfg.start_ms - 1_000;
        for ix in 0..n as Ix {
            if self.pop.registered[ix as usize] {
                out.push(self.registry_record(ix, registry_ts));
            }
        }
        let presence_ts = self.cfg.start_ms - 500;
        for ix in 0..n as Ix {
            if self.pop.registered[ix as usize] {
                let online = self.online[ix as usize];
                out.push(self.presence_record(ix, online, presence_ts));
            }
        }
        self.stats.records += out.len() as u64;
        out
    }

    /// Appends the next `n` traffic records to `out`, in nondecreasing event time: message
    /// attempts (labelled), presence changes, registry changes and, per `malformed_ratio`,
    /// malformed attempts.
    pub fn next_batch(&mut self, n: usize, out: &mut Vec<SimRecord>) {
        out.reserve(n);
        let presence_at = self.malformed_ratio + PRESENCE_SHARE;
        let registry_at = presence_at + REGISTRY_SHARE;
        let target = out.len() + n;
        while out.len() < target {
            // The rest of a flood first: its records were drawn together, so the output does not
            // depend on how a caller splits its calls.
            if let Some(record) = self.pending.pop_front() {
                self.stats.records += 1;
                out.push(record);
                continue;
            }
            let ts = self.event_time(self.seq);
            self.seq += 1;
            // A registry change applies to every attempt with `ts` at or after its timestamp,
            // including attempts already generated in the same millisecond under the old state.
            // So a change only ever opens a millisecond; one drawn mid-millisecond waits.
            let new_ms = ts != self.last_ts;
            self.last_ts = ts;
            let roll: f64 = self.rng.random();
            let record = if self.registry_due && new_ms {
                self.registry_due = false;
                self.registry_change(ts)
            } else if roll < self.malformed_ratio {
                self.malformed(ts)
            } else if roll < presence_at {
                self.presence_change(ts)
            } else if roll < registry_at && new_ms {
                self.registry_change(ts)
            } else {
                if roll < registry_at {
                    self.registry_due = true;
                }
                if self.rng.random_bool(self.violation_ratio * FLOOD_SHARE)
                    && let Some(flood) = self.flood(ts)
                {
                    self.pending.extend(flood);
                    continue;
                }
                self.attempt(ts)
            };
            self.stats.records += 1;
            out.push(record);
        }
    }

    /// Counters of what was generated so far.
    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    /// The findings a correct pipeline with default settings gives for everything generated so
    /// far (see [`SimStats::expected_finding_count`]).
    pub fn expected_finding_count(&self) -> u64 {
        self.stats.expected_finding_count()
    }

    fn event_time(&self, k: u64) -> i64 {
        let offset = u128::from(k) * 1000 / u128::from(self.cfg.rate.max(1));
        self.cfg.start_ms.saturating_add(i64::try_from(offset).unwrap_or(i64::MAX))
    }

    fn upper(&mut self) -> bool {
        !self.lower_only && self.rng.random_bool(UPPER_SHARE)
    }

    // ---- message attempts -------------------------------------------------------------------

    fn attempt(&mut self, ts: i64) -> SimRecord {
        let plan = if self.rng.random_bool(self.violation_ratio) { self.plan_violation(ts) } else { self.plan_benign(ts) };
        let unauthorized = plan.label != Label::Benign;
        match plan.from {
            Requester::Entity(r) => {
                if !self.pop.entities[r as usize].exempt {
                    self.budgets[r as usize].attempt(plan.action, ts, unauthorized);
                }
            }
            Requester::Prowler(p) => self.prowlers[p].budget.attempt(plan.action, ts, unauthorized),
        }
        self.stats.attempts += 1;
        match plan.label {
            Label::UnregisteredRequester => self.stats.unregistered_requester += 1,
            Label::BadCredentials => self.stats.bad_credentials += 1,
            Label::PermissionDenied => self.stats.permission_denied += 1,
            Label::ThrottleExceeded => self.stats.throttle_exceeded += 1,
            Label::Benign | Label::TimingAnomaly => self.stats.benign += 1,
            Label::Malformed => self.stats.malformed += 1,
        }
        let (key, payload) = self.write_attempt(&plan, ts, None);
        SimRecord { topic: InputTopic::Messages, key, payload: Some(payload), timestamp_ms: ts, label: Some(plan.label), malformed: None }
    }

    /// A flood: `PER_REQUESTER_MAX + 1` sends at `ts` by one quiet, registered, non-exempt
    /// requester to a target that admits it, the last labelled [`Label::ThrottleExceeded`].
    /// `None` when no such requester and target turn up in a few tries.
    fn flood(&mut self, ts: i64) -> Option<Vec<SimRecord>> {
        for _ in 0..8 {
            let r = self.requesters.pick(&mut self.rng)?;
            let e = &self.pop.entities[r as usize];
            if !self.pop.registered[r as usize] || e.exempt || !self.budgets[r as usize].is_quiet(ts) {
                continue;
            }
            if !self.budgets[r as usize].may_offend(Action::Send, ts) {
                continue;
            }
            let Some(t) = self.related(r).filter(|&t| self.pop.allows(r, Level::Send, t, false)) else {
                continue;
            };
            let mut records = Vec::with_capacity(PER_REQUESTER_MAX + 1);
            self.lower_only = true;
            for i in 0..=PER_REQUESTER_MAX {
                let label = if i == PER_REQUESTER_MAX { Label::ThrottleExceeded } else { Label::Benign };
                let plan = Plan { action: Action::Send, from: Requester::Entity(r), to: Some(t), auth: Auth::Valid, token: false, label };
                self.budgets[r as usize].attempt(Action::Send, ts, label != Label::Benign);
                self.stats.attempts += 1;
                match label {
                    Label::ThrottleExceeded => self.stats.throttle_exceeded += 1,
                    _ => self.stats.benign += 1,
                }
                let (key, payload) = self.write_attempt(&plan, ts, None);
                records.push(SimRecord {
                    topic: InputTopic::Messages,
                    key,
                    payload: Some(payload),
                    timestamp_ms: ts,
                    label: Some(label),
                    malformed: None,
                });
            }
            self.lower_only = false;
            return Some(records);
        }
        None
    }

    fn benign_plan(action: Action, r: Ix, to: Option<Ix>, token: bool) -> Plan {
        Plan { action, from: Requester::Entity(r), to, auth: Auth::Valid, token, label: Label::Benign }
    }

    /// An attempt that breaks no rule: a few tries at a realistic one; when requesters are at
    /// their throttles (a `rate` high for `devices`), one by an exempt UUID, which has none.
    fn plan_benign(&mut self, ts: i64) -> Plan {
        for _ in 0..8 {
            let action = pick_weighted(&mut self.rng, &BENIGN_MIX);
            if let Some(plan) = self.try_benign(action, ts) {
                return plan;
            }
        }
        self.stats.exempt_fallbacks += 1;
        let r = self.exempt[self.rng.random_range(0..self.exempt.len())];
        for _ in 0..4 {
            // Exempt UUIDs have open lists and own nothing: connect, discover, send, receive.
            let action = ACTIONS[self.rng.random_range(0..4)];
            let Some(l) = level(action) else {
                return Self::benign_plan(action, r, None, false);
            };
            if let Some(t) = self.active.pick(&mut self.rng)
                && self.pop.allows(r, l, t, false)
            {
                return Self::benign_plan(action, r, Some(t), false);
            }
        }
        Self::benign_plan(Action::Connect, r, None, false)
    }

    /// One try at a realistic benign `action`: `None` when the pick breaks a rule.
    fn try_benign(&mut self, action: Action, ts: i64) -> Option<Plan> {
        let under_budget = |sim: &Self, r: Ix| {
            sim.pop.registered[r as usize] && (sim.pop.entities[r as usize].exempt || sim.budgets[r as usize].may_attempt(action, ts))
        };
        let (r, to, token) = match level(action) {
            None => {
                let r = self.requesters.pick(&mut self.rng)?;
                return under_budget(self, r).then(|| Self::benign_plan(action, r, None, false));
            }
            Some(l @ (Level::Subscribe | Level::Configure)) => {
                let t = self.devices.pick(&mut self.rng)?;
                if self.rng.random_bool(0.7) {
                    (self.pop.entities[t as usize].owner?, t, self.rng.random_bool(0.5))
                } else {
                    (self.listed(t, l)?, t, true)
                }
            }
            Some(l) => {
                // Cheap check first: under saturation most requesters are at their throttle.
                let r = self.requesters.pick(&mut self.rng)?;
                if !under_budget(self, r) {
                    return None;
                }
                let t = if l == Level::Discover { self.active.pick(&mut self.rng)? } else { self.related(r)? };
                (r, t, false)
            }
        };
        let l = level(action)?;
        (under_budget(self, r) && self.pop.allows(r, l, to, token)).then(|| Self::benign_plan(action, r, Some(to), token))
    }

    /// A plausible peer of `r`: its owner, what it owns, a fellow group member or a gateway.
    fn related(&mut self, r: Ix) -> Option<Ix> {
        let roll = self.rng.random_range(0..100);
        let e = &self.pop.entities[r as usize];
        match e.kind {
            Kind::Device if roll < 45 => e.owner,
            Kind::Device if roll < 65 => Some(self.exempt[self.rng.random_range(0..self.exempt.len())]),
            Kind::Person | Kind::System if roll < 55 && !e.owned.is_empty() => Some(e.owned[self.rng.random_range(0..e.owned.len())]),
            _ if roll < 85 && !e.groups.is_empty() => {
                let g = e.groups[self.rng.random_range(0..e.groups.len())];
                let members = &self.pop.group_members[g as usize];
                Some(members[self.rng.random_range(0..members.len())])
            }
            _ => self.active.pick(&mut self.rng),
        }
    }

    /// Someone `t`'s list at `level` names explicitly (directly or through a group).
    fn listed(&mut self, t: Ix, level: Level) -> Option<Ix> {
        let allow = &self.pop.entities[t as usize].permissions[level as usize].allow;
        if allow.is_empty() {
            return None;
        }
        match &allow[self.rng.random_range(0..allow.len())] {
            population::Principal::Entity(e) => Some(*e),
            population::Principal::Group(g) => {
                let members = &self.pop.group_members[*g as usize];
                Some(members[self.rng.random_range(0..members.len())])
            }
            population::Principal::Any | population::Principal::Foreign(_) => None,
        }
    }

    /// A labelled violation whose offender stays under every throttle and enforcement threshold.
    fn plan_violation(&mut self, ts: i64) -> Plan {
        let action = pick_weighted(&mut self.rng, &ATTACK_MIX);
        let to = if action == Action::Connect { None } else { self.active.pick(&mut self.rng) };
        let roll = self.rng.random_range(0..100);
        let unregistered_auth = |rng: &mut SmallRng| match rng.random_range(0..10) {
            0..5 => Auth::Valid,
            5..8 => Auth::Invalid,
            _ => Auth::Missing,
        };
        let plan = |from, auth, label| Plan { action, from, to, auth, token: false, label };
        if roll < 40 {
            for _ in 0..8 {
                let Some(r) = self.requesters.pick(&mut self.rng) else {
                    break;
                };
                if self.budgets[r as usize].may_offend(action, ts) {
                    let auth = if self.rng.random_bool(0.6) { Auth::Invalid } else { Auth::Missing };
                    return plan(Requester::Entity(r), auth, Label::BadCredentials);
                }
            }
        } else if roll < 55 {
            for _ in 0..4 {
                let Some(r) = self.tombstoned.pick(&mut self.rng) else {
                    break;
                };
                if self.budgets[r as usize].may_offend(action, ts) {
                    self.stats.tombstoned_requester += 1;
                    let auth = unregistered_auth(&mut self.rng);
                    return plan(Requester::Entity(r), auth, Label::UnregisteredRequester);
                }
            }
        } else if roll < 75 {
            let action = if self.rng.random_bool(0.5) { Action::Subscribe } else { Action::Configure };
            for _ in 0..8 {
                let (Some(r), Some(t)) = (self.requesters.pick(&mut self.rng), self.devices.pick(&mut self.rng)) else {
                    break;
                };
                let (registered, owner) =
                    (self.pop.registered[r as usize] && self.pop.registered[t as usize], self.pop.entities[t as usize].owner);
                if registered
                    && r != t
                    && owner != Some(r)
                    && !self.pop.profile_applies(t, r)
                    && self.budgets[r as usize].may_offend(action, ts)
                {
                    return Plan {
                        action,
                        from: Requester::Entity(r),
                        to: Some(t),
                        auth: Auth::Valid,
                        token: false,
                        label: Label::PermissionDenied,
                    };
                }
            }
        }
        let auth = unregistered_auth(&mut self.rng);
        if !self.prowlers.is_empty() && self.rng.random_bool(0.3) {
            let p = self.rng.random_range(0..self.prowlers.len());
            if self.prowlers[p].budget.may_offend(action, ts) {
                return plan(Requester::Prowler(p), auth, Label::UnregisteredRequester);
            }
        }
        // A UUID never seen before: version 4, while every registered UUID is version 5.
        let uuid = Builder::from_random_bytes(self.rng.random()).into_uuid();
        let prowler = Prowler {
            lower: write::uuid_text(&uuid, false),
            upper: write::uuid_text(&uuid, true),
            country: self.rng.random_range(0..COUNTRIES.len()) as u8,
            budget: Budget::new(),
        };
        let p = if self.prowlers.len() < PROWLERS {
            self.prowlers.push(prowler);
            self.prowlers.len() - 1
        } else {
            let p = self.rng.random_range(0..PROWLERS);
            self.prowlers[p] = prowler;
            p
        };
        plan(Requester::Prowler(p), auth, Label::UnregisteredRequester)
    }

    fn malformed(&mut self, ts: i64) -> SimRecord {
        let kind = MalformedKind::ALL[self.rng.random_range(0..MalformedKind::ALL.len())];
        let action = pick_weighted(&mut self.rng, &BENIGN_MIX);
        let r = self.requesters.pick(&mut self.rng).unwrap_or(self.exempt[0]);
        let to = if action == Action::Connect { None } else { self.active.pick(&mut self.rng) };
        let connect = to.is_none();
        let fields: &[Field] = match kind {
            MalformedKind::InvalidJson | MalformedKind::BadTime => &[Field::Ts],
            MalformedKind::MissingField if connect => &[Field::Id, Field::Ts, Field::Action, Field::From, Field::Auth],
            MalformedKind::MissingField => &[Field::Id, Field::Ts, Field::Action, Field::From, Field::Auth, Field::To],
            MalformedKind::WrongType if connect => &[
                Field::Id,
                Field::Ts,
                Field::Action,
                Field::From,
                Field::Auth,
                Field::TargetToken,
                Field::Location,
                Field::Payload,
                Field::PayloadBytes,
                Field::Encrypted,
                Field::Protocol,
            ],
            MalformedKind::WrongType => &[
                Field::Id,
                Field::Ts,
                Field::Action,
                Field::From,
                Field::To,
                Field::Auth,
                Field::TargetToken,
                Field::Route,
                Field::Location,
                Field::Payload,
                Field::PayloadBytes,
                Field::Encrypted,
                Field::Protocol,
            ],
            MalformedKind::BadUuid if connect => &[Field::Id, Field::From, Field::Route],
            MalformedKind::BadUuid => &[Field::Id, Field::From, Field::To, Field::Route],
            MalformedKind::UnknownEnum => &[Field::Action, Field::Auth],
        };
        let corruption = Corruption { kind, field: fields[self.rng.random_range(0..fields.len())], variant: self.rng.random_range(0..6) };
        let plan = Plan { action, from: Requester::Entity(r), to, auth: Auth::Valid, token: false, label: Label::Malformed };
        let (key, mut payload) = self.write_attempt(&plan, ts, Some(corruption));
        if kind == MalformedKind::InvalidJson {
            match corruption.variant % 3 {
                // A proper prefix of an object lacks its closing brace: never valid JSON.
                0 => {
                    let cut = self.rng.random_range(1..payload.len());
                    payload.truncate(cut);
                }
                1 => payload.push(b'}'),
                _ => payload[1] = b'\'',
            }
        }
        self.stats.malformed += 1;
        self.stats.malformed_by_kind[kind as usize] += 1;
        SimRecord {
            topic: InputTopic::Messages,
            key,
            payload: Some(payload),
            timestamp_ms: ts,
            label: Some(Label::Malformed),
            malformed: Some(kind),
        }
    }

    /// Writes the attempt's JSON (with `bad` applied) and returns `(key, payload)`.
    fn write_attempt(&mut self, p: &Plan, ts: i64, bad: Option<Corruption>) -> (Vec<u8>, Vec<u8>) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.push(b'{');

        let id = Builder::from_random_bytes(self.rng.random()).into_uuid();
        let id_text = write::uuid_text(&id, self.rng.random_bool(0.03));
        string_field(&mut buf, bad, Field::Id, "id", &id_text);

        if !Corruption::omits(bad, Field::Ts) {
            key(&mut buf, "ts");
            match Corruption::replaces(bad, Field::Ts) {
                Some(c) => c.write_value(&mut buf, b""),
                None if self.rng.random_bool(EPOCH_MS_SHARE) => {
                    self.stats.epoch_ms_times += 1;
                    write::i64_text(&mut buf, ts);
                }
                None => {
                    buf.push(b'"');
                    write::rfc3339(&mut buf, ts);
                    buf.push(b'"');
                }
            }
        }

        string_field(&mut buf, bad, Field::Action, "action", p.action.as_str().as_bytes());

        let upper = self.upper();
        let (from_text, country) = match p.from {
            Requester::Entity(r) => {
                let e = &self.pop.entities[r as usize];
                (*e.text(upper), e.country)
            }
            Requester::Prowler(i) => {
                let pr = &self.prowlers[i];
                (if upper { pr.upper } else { pr.lower }, Some(pr.country))
            }
        };
        let mut message_key = from_text.to_vec();
        if !Corruption::omits(bad, Field::From) {
            key(&mut buf, "from");
            match Corruption::replaces(bad, Field::From) {
                Some(c) => {
                    let start = buf.len();
                    c.write_value(&mut buf, &from_text);
                    if c.kind == MalformedKind::BadUuid {
                        // The broker keys by the text it saw.
                        message_key = buf[start + 1..buf.len() - 1].to_vec();
                    }
                }
                None => write::quoted(&mut buf, &from_text),
            }
        }

        if let Some(t) = p.to
            && !Corruption::omits(bad, Field::To)
        {
            let upper = self.upper();
            let text = *self.pop.entities[t as usize].text(upper);
            string_field(&mut buf, bad, Field::To, "to", &text);
        }

        string_field(&mut buf, bad, Field::Auth, "auth", p.auth.as_str().as_bytes());

        if let Some(c) = Corruption::replaces(bad, Field::TargetToken) {
            key(&mut buf, "target_token");
            c.write_value(&mut buf, b"");
        } else if p.token {
            key(&mut buf, "target_token");
            buf.extend_from_slice(b"true");
        } else if self.rng.random_bool(0.05) {
            key(&mut buf, "target_token");
            buf.extend_from_slice(b"false");
        }

        let route_share = match p.action {
            Action::Send => 0.3,
            Action::Receive => 0.1,
            _ => 0.0,
        };
        if Corruption::touches(bad, Field::Route) || self.rng.random_bool(route_share) {
            key(&mut buf, "route");
            match Corruption::replaces(bad, Field::Route) {
                Some(c) if c.kind == MalformedKind::WrongType => c.write_value(&mut buf, b""),
                corrupt => {
                    buf.push(b'[');
                    // The origin is the requester, in a case of its own.
                    let mut origin = from_text;
                    if self.upper() {
                        origin.make_ascii_uppercase();
                    } else {
                        origin.make_ascii_lowercase();
                    }
                    write::quoted(&mut buf, &origin);
                    let hops = self.rng.random_range(1..=2);
                    for _ in 0..hops {
                        let g = self.exempt[self.rng.random_range(0..self.exempt.len())];
                        let upper = self.upper();
                        let text = *self.pop.entities[g as usize].text(upper);
                        buf.extend_from_slice(b",");
                        match corrupt {
                            Some(c) => c.write_value(&mut buf, &text),
                            None => write::quoted(&mut buf, &text),
                        }
                    }
                    buf.push(b']');
                }
            }
        }

        if let Some(c) = Corruption::replaces(bad, Field::Location) {
            key(&mut buf, "location");
            c.write_value(&mut buf, b"");
        } else if self.rng.random_bool(0.3) {
            self.write_location(&mut buf, country);
        }

        self.write_payload(&mut buf, p, bad);

        if let Some(c) = Corruption::replaces(bad, Field::Protocol) {
            key(&mut buf, "protocol");
            c.write_value(&mut buf, b"");
        } else if self.rng.random_bool(0.7) {
            key(&mut buf, "protocol");
            let proto = PROTOCOLS[self.rng.random_range(0..PROTOCOLS.len())];
            write::quoted(&mut buf, proto.as_bytes());
        }
        if self.rng.random_bool(0.7) {
            key(&mut buf, "broker");
            let broker = BROKERS[self.rng.random_range(0..BROKERS.len())];
            write::quoted(&mut buf, broker.as_bytes());
        }
        buf.push(b'}');

        let payload = buf.clone();
        self.buf = buf;
        (message_key, payload)
    }

    fn write_location(&mut self, buf: &mut Vec<u8>, country: Option<u8>) {
        let c = country.unwrap_or(0) as usize;
        let (code, lat, lon) = COUNTRIES[c];
        key(buf, "location");
        buf.push(b'{');
        if self.rng.random_bool(0.95) {
            key(buf, "lat");
            write::fixed4(buf, lat + self.rng.random_range(-15_000..15_000));
            key(buf, "lon");
            write::fixed4(buf, lon + self.rng.random_range(-15_000..15_000));
        }
        if country.is_some() && self.rng.random_bool(0.9) {
            key(buf, "country");
            write::quoted(buf, code.as_bytes());
        }
        buf.push(b'}');
    }

    /// `payload_type`, `payload`, `payload_bytes` and `encrypted`, for sends and configures.
    fn write_payload(&mut self, buf: &mut Vec<u8>, p: &Plan, bad: Option<Corruption>) {
        let forced = [Field::Payload, Field::PayloadBytes, Field::Encrypted].into_iter().any(|f| Corruption::touches(bad, f));
        let share = match p.action {
            Action::Send => 0.85,
            Action::Configure => 0.5,
            _ => 0.0,
        };
        if !forced && !self.rng.random_bool(share) {
            return;
        }
        let from_device = match p.from {
            Requester::Entity(r) => self.pop.entities[r as usize].kind == Kind::Device,
            Requester::Prowler(_) => false,
        };
        let ptype: &[u8] = match p.action {
            Action::Configure => b"config",
            _ if from_device => b"telemetry",
            _ => b"command",
        };
        key(buf, "payload_type");
        write::quoted(buf, ptype);

        let encrypted = !Corruption::touches(bad, Field::Payload) && self.rng.random_bool(0.15);
        let mut size = 0;
        if let Some(c) = Corruption::replaces(bad, Field::Payload) {
            key(buf, "payload");
            c.write_value(buf, b"");
        } else if !encrypted {
            key(buf, "payload");
            let start = buf.len();
            match ptype {
                b"telemetry" => {
                    buf.extend_from_slice(b"{\"temp_c\":");
                    let t = self.rng.random_range(150..300u64);
                    write::u64_text(buf, t / 10);
                    buf.push(b'.');
                    write::u64_text(buf, t % 10);
                    buf.extend_from_slice(b",\"battery\":");
                    write::u64_text(buf, self.rng.random_range(5..=100));
                    buf.push(b'}');
                }
                b"config" => {
                    buf.extend_from_slice(b"{\"interval_s\":");
                    write::u64_text(buf, 15 * self.rng.random_range(1..=8));
                    let mode: &[u8] = if self.rng.random_bool(0.5) { b"eco" } else { b"comfort" };
                    buf.extend_from_slice(b",\"mode\":");
                    write::quoted(buf, mode);
                    buf.push(b'}');
                }
                _ => match self.rng.random_range(0..3) {
                    0 => buf.extend_from_slice(b"{\"command\":\"on\"}"),
                    1 => buf.extend_from_slice(b"{\"command\":\"off\"}"),
                    _ => {
                        buf.extend_from_slice(b"{\"command\":\"set\",\"level\":");
                        write::u64_text(buf, self.rng.random_range(0..=100));
                        buf.push(b'}');
                    }
                },
            }
            size = (buf.len() - start) as u64;
        }
        if let Some(c) = Corruption::replaces(bad, Field::PayloadBytes) {
            key(buf, "payload_bytes");
            c.write_value(buf, b"");
        } else if encrypted || self.rng.random_bool(0.7) {
            key(buf, "payload_bytes");
            let size = if encrypted { self.rng.random_range(32..2048) } else { size };
            write::u64_text(buf, size);
        }
        if let Some(c) = Corruption::replaces(bad, Field::Encrypted) {
            key(buf, "encrypted");
            c.write_value(buf, b"");
        } else if encrypted {
            key(buf, "encrypted");
            buf.extend_from_slice(b"true");
        }
    }

    // ---- presence and registry --------------------------------------------------------------

    fn presence_record(&mut self, ix: Ix, online: bool, ts: i64) -> SimRecord {
        let upper = self.upper();
        let text = *self.pop.entities[ix as usize].text(upper);
        let mut buf = Vec::with_capacity(96);
        buf.extend_from_slice(b"{\"ts\":");
        if self.rng.random_bool(EPOCH_MS_SHARE) {
            write::i64_text(&mut buf, ts);
        } else {
            buf.push(b'"');
            write::rfc3339(&mut buf, ts);
            buf.push(b'"');
        }
        buf.extend_from_slice(b",\"uuid\":");
        write::quoted(&mut buf, &text);
        buf.extend_from_slice(b",\"online\":");
        buf.extend_from_slice(if online { b"true}" } else { b"false}" });
        self.stats.presence += 1;
        SimRecord { topic: InputTopic::Presence, key: text.to_vec(), payload: Some(buf), timestamp_ms: ts, label: None, malformed: None }
    }

    fn presence_change(&mut self, ts: i64) -> SimRecord {
        let ix = self.active.pick(&mut self.rng).unwrap_or(self.exempt[0]);
        let online = !self.online[ix as usize];
        self.online[ix as usize] = online;
        self.presence_record(ix, online, ts)
    }

    /// Registry records always use the lower-case UUID as key and `uuid`: the topic is compacted
    /// by key, and a tombstone keyed differently from its record would not replace it.
    fn registry_record(&mut self, ix: Ix, ts: i64) -> SimRecord {
        self.stats.registry += 1;
        SimRecord {
            topic: InputTopic::Registry,
            key: self.pop.entities[ix as usize].lower.to_vec(),
            payload: Some(self.pop.registry_json(ix)),
            timestamp_ms: ts,
            label: None,
            malformed: None,
        }
    }

    /// A tombstone, a re-registration or an update. The first change is always a tombstone, so
    /// even short runs see one take effect.
    fn registry_change(&mut self, ts: i64) -> SimRecord {
        let first = self.registry_changes == 0;
        self.registry_changes += 1;
        let cap = (self.device_count / TOMBSTONED_MAX_SHARE).max(1);
        let roll = self.rng.random_range(0..100);
        if (first || roll < 45)
            && self.tombstoned.len() < cap
            && self.devices.len() > 1
            && let Some(d) = self.devices.pick(&mut self.rng)
        {
            return self.tombstone(d, ts);
        }
        if roll < 75
            && let Some(d) = self.tombstoned.pick(&mut self.rng)
        {
            self.tombstoned.remove(d);
            self.pop.registered[d as usize] = true;
            self.active.insert(d);
            self.devices.insert(d);
            self.requesters.insert(d);
            return self.registry_record(d, ts);
        }
        self.update(ts)
    }

    fn tombstone(&mut self, d: Ix, ts: i64) -> SimRecord {
        self.pop.registered[d as usize] = false;
        self.active.remove(d);
        self.devices.remove(d);
        self.requesters.remove(d);
        self.tombstoned.insert(d);
        self.stats.tombstones += 1;
        SimRecord {
            topic: InputTopic::Registry,
            key: self.pop.entities[d as usize].lower.to_vec(),
            payload: None,
            timestamp_ms: ts,
            label: None,
            malformed: None,
        }
    }

    /// Republishes a device's record with a change: its `send` list opened or restricted to its
    /// group, a deny entry added or dropped, or a new country.
    fn update(&mut self, ts: i64) -> SimRecord {
        let d = self.devices.pick(&mut self.rng).unwrap_or(self.exempt[0]);
        let roll = self.rng.random_range(0..3);
        let e = &mut self.pop.entities[d as usize];
        if e.kind == Kind::Device {
            let send = &mut e.permissions[Level::Send as usize];
            match roll {
                0 if send.allow.is_empty() => {
                    send.present = true;
                    send.allow = vec![population::Principal::Group(e.groups[0]), population::Principal::Group(population::PLATFORM_GROUP)];
                }
                0 => send.allow.clear(),
                1 if send.deny.is_empty() => {
                    send.present = true;
                    send.deny.push(population::Principal::Foreign(Uuid::from_u128(0xdead_beef_0000_4000_8000_0000_0000_0001)));
                }
                1 => {
                    send.deny.pop();
                }
                _ => e.country = Some(self.rng.random_range(0..COUNTRIES.len()) as u8),
            }
        }
        self.registry_record(d, ts)
    }
}
