//! Timing anomalies: an attempt at an hour or on a day its requester-target pair (or, without
//! enough pair history, its requester) does not use.
//!
//! The contract's readings: a schedule is learned from a history of at least `min_days` (14) and
//! at least `min_attempts` (50) distinct attempts, allowed or not; hours and weekdays are taken in
//! UTC; a pair is judged on its own history when it has enough, otherwise a requester with enough
//! history of its own on its schedule across all targets; without enough history, no finding.
//!
//! **The model** is an online one, kept per key in the partition that owns the requester (and so
//! in its checkpoints): the counts of the key's attempts per hour of the day and per day of the
//! week. An hour or day *is used* when it holds at least `used_share` (2 %) of the history, so a
//! few stray attempts do not teach the schedule that 3 a.m. is normal. A schedule is *regular* in
//! its hours when it uses at most `max_used_hours` (12) of them, and in its weekdays when it uses at
//! most `max_used_days` (5): a key active around the clock has no schedule to break. An attempt at
//! an unused hour of a schedule regular in its hours, or on an unused weekday of one regular in its
//! weekdays, is a `timing_anomaly`; its score is `1 − share / used_share` of the deciding slot (1
//! for a never-used one). Each
//! attempt is judged before it joins the history. Scoring is a lookup; nothing is fitted on the
//! hot path.
//!
//! This is the streaming half of issue 4's design; the Parquet archive, the Polars features and
//! the linfa models that let sparse pairs borrow strength from similar schedules are not built yet.

use std::hash::BuildHasher;

use bytemuck::{Pod, Zeroable};
use chrono::{DateTime, Datelike, Timelike};
use hashbrown::DefaultHashBuilder;
use polars_utils::mem::prefetch::prefetch_l2;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::huge::{DirtyRows, HugeArray, HugeVec, MirrorSlot, fresh_epoch, grown_len};
use crate::slot_index::SlotIndex;

/// Timing-anomaly settings (`[timing]` in the configuration file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    /// Judge attempts at all.
    pub enabled: bool,
    /// Days of history a schedule needs (contract: 14).
    pub min_days: u32,
    /// Attempts of history a schedule needs (contract: 50).
    pub min_attempts: u32,
    /// Share of the history an hour or weekday needs to count as used.
    pub used_share: f64,
    /// A schedule is regular in its hours when it uses at most this many hours of the day; an
    /// unused hour is anomalous only then (a key active around the clock has no schedule to break).
    pub max_used_hours: u32,
    /// Likewise for weekdays: an unused weekday is anomalous only when at most this many are used.
    pub max_used_days: u32,
    /// Seconds between trainings of the timing model inside `meshguard run` (a background
    /// thread; the pipeline swaps the new model in between micro-batches). 0: never (only
    /// `meshguard train`). See [`crate::timing_model`].
    pub train_every_s: u64,
    /// Days of the attempt archive a training reads, back from its end (`date=` folders).
    pub horizon_days: u32,
    /// Where trained models are kept (`timing-v<N>.bin` and a JSON manifest per version); unset:
    /// `models` beside the archive's directory (`.meshguard/models` by default).
    pub models_dir: Option<std::path::PathBuf>,
    /// Model versions kept in `models_dir`; older ones are deleted after each training.
    pub keep_models: u32,
    /// Most clusters of the k-means over hour-of-week profiles (fewer when fewer keys qualify).
    pub clusters: u32,
    /// Weight of the cluster centroid, in pseudo-attempts, in a key's smoothed profile: a key's
    /// share of an hour of the week is `(count + prior_weight × centroid) / (attempts + prior_weight)`.
    pub prior_weight: f64,
    /// An hour of the week is *usual* for a key when its smoothed share is at least this fraction
    /// of the key's typical share (the sum of its squared shares: `1/S` for a key spread evenly
    /// over `S` hours).
    pub usual_ratio: f64,
    /// A key's hour-of-week schedule is regular when its usual hours hold at least this share of
    /// its own attempts ...
    pub coverage: f64,
    /// ... and number at most this many of the week's 168 hours.
    pub max_usual_hours: u32,
    /// An online schedule whose key has made no attempt for this many days of event time (behind
    /// its partition's watermark) is dropped; 0: never. A key that comes back starts learning
    /// again (the trained model, which reads `horizon_days` of the archive, still knows it).
    pub forget_after_days: u32,
    /// Most online schedules (pairs' and requesters') a worker keeps, shared evenly among the
    /// messages partitions it holds; 0: no limit. A partition over its share drops the schedules
    /// least worth keeping, down to 90 % of it: pairs' before requesters', then those with the
    /// fewest attempts (by power of two), then the longest idle. About 370 bytes a schedule with
    /// its checkpoint mirror and index.
    pub max_schedules: u64,
}

impl Default for TimingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_days: 14,
            min_attempts: 50,
            used_share: 0.02,
            max_used_hours: 12,
            max_used_days: 5,
            train_every_s: 3_600,
            horizon_days: 28,
            models_dir: None,
            keep_models: 3,
            clusters: 32,
            prior_weight: 100.0,
            usual_ratio: 0.25,
            coverage: 0.9,
            max_usual_hours: 84,
            forget_after_days: 28,
            max_schedules: 4_000_000,
        }
    }
}

impl TimingConfig {
    /// The models directory: `models_dir`, or `models` beside `archive_dir`.
    pub fn models_dir_beside(&self, archive_dir: &std::path::Path) -> std::path::PathBuf {
        self.models_dir.clone().unwrap_or_else(|| archive_dir.parent().unwrap_or(std::path::Path::new(".")).join("models"))
    }

    /// Checks every value, naming the field of the first bad one.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(self.used_share > 0.0 && self.used_share < 1.0) {
            return Err(("timing.used_share".into(), format!("must be between 0 and 1, found {}", self.used_share)));
        }
        if self.horizon_days == 0 || self.horizon_days > 3_650 {
            return Err(("timing.horizon_days".into(), format!("must be between 1 and 3650, found {}", self.horizon_days)));
        }
        if self.models_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err(("timing.models_dir".into(), "must not be empty".into()));
        }
        if self.keep_models == 0 {
            return Err(("timing.keep_models".into(), "must be at least 1".into()));
        }
        if !(1..=1_024).contains(&self.clusters) {
            return Err(("timing.clusters".into(), format!("must be between 1 and 1024, found {}", self.clusters)));
        }
        if !(self.prior_weight >= 0.0 && self.prior_weight.is_finite()) {
            return Err(("timing.prior_weight".into(), format!("must be a number at least 0, found {}", self.prior_weight)));
        }
        if !(self.usual_ratio > 0.0 && self.usual_ratio <= 1.0) {
            return Err(("timing.usual_ratio".into(), format!("must be above 0 and at most 1, found {}", self.usual_ratio)));
        }
        if !(self.coverage > 0.0 && self.coverage <= 1.0) {
            return Err(("timing.coverage".into(), format!("must be above 0 and at most 1, found {}", self.coverage)));
        }
        if !(1..=168).contains(&self.max_usual_hours) {
            return Err(("timing.max_usual_hours".into(), format!("must be between 1 and 168, found {}", self.max_usual_hours)));
        }
        Ok(())
    }
}

/// The history of one key: attempts per UTC hour and weekday, and when they started and last
/// came. Plain integers (`Pod`): the timing stage prefetches their cache lines ([`Schedules`]), and
/// checkpoints copy half a million of them at once (see [`SchedulesSnapshot`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, Pod, Zeroable)]
#[repr(C)]
pub struct Schedule {
    first_ms: i64,
    /// The latest attempt's event time: how long the key has been idle (see [`Eviction`]).
    last_ms: i64,
    total: u32,
    hours: [u32; 24],
    days: [u32; 7],
}

/// The schedules of a partition, by (requester, target); the requester's own under the nil target.
///
/// As the throttle windows' table (`throttle/table.rs`): an index of 8-byte slots ([`SlotIndex`]:
/// open addressing, linear probing; 32 bits of the key's hash and the row's number) over rows of
/// `(schedule, key)` appended in chunks that never move, all in memory advised for huge pages (see
/// `huge`). The engine's timing stage hashes each key once and looks the keys of a batch up a few
/// rows ahead of the row it judges, in two steps (the index's slot, [`Schedules::prefetch_slot`],
/// then the row the slot names, [`Schedules::candidate`] and [`Schedules::prefetch`]), so that
/// their cache misses overlap. A new key's row is appended where the last one was written, in
/// cache; rows move only when schedules are evicted ([`Schedules::evict_step`], between
/// micro-batches: the last row takes the evicted one's number), so a candidate found during a
/// batch stays valid. Keys are compared in full before a row is used. Serialized as the map it
/// replaces (key → schedule), so checkpoints keep their form.
#[derive(Clone, Default)]
pub struct Schedules {
    /// hashbrown's default hasher (foldhash), seeded per process like every map of the engine.
    hasher: DefaultHashBuilder,
    /// The index over the rows: at most half full.
    slots: SlotIndex,
    /// The rows, [`ROWS_PER_CHUNK`] per chunk (the first may be smaller while it is the only one),
    /// the first `len` in use.
    chunks: Vec<HugeArray<Slot>>,
    len: usize,
    /// Rows written since the checkpoint mirror was last brought up to date (see
    /// [`SchedulesSnapshot`]).
    dirty: DirtyRows,
    /// The checkpoint mirror.
    mirror: MirrorSlot<SchedulesMirror>,
    /// The eviction pass in progress (see [`Schedules::evict_step`]).
    pass: Pass,
}

/// Where an eviction pass of [`Schedules`] has got to, and the rank below which it drops
/// schedules to bring the table back under its cap (`0`: the table was under it when the pass
/// began).
#[derive(Debug, Clone, Copy, Default)]
struct Pass {
    at: usize,
    rank_below: u128,
}

/// What an eviction pass of [`Schedules`] drops (see [`Schedules::evict_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eviction {
    /// Schedules whose latest attempt is before this are idle and dropped.
    pub idle_before_ms: i64,
    /// Most schedules the table holds before it drops those least worth keeping, down to 90 % of
    /// this ([`TimingConfig::max_schedules`]'s share); `usize::MAX`: no limit.
    pub cap: usize,
}

/// Schedules an eviction dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Idle for longer than [`TimingConfig::forget_after_days`].
    pub idle: u64,
    /// Dropped to bring the table back under its cap.
    pub over_cap: u64,
}

/// Rows per chunk of [`Schedules`]: 11 MiB (rounded up to whole huge pages when mapped).
const CHUNK_BITS: u32 = 16;
const ROWS_PER_CHUNK: usize = 1 << CHUNK_BITS;

/// A schedule's key: (requester, target), the target nil for the requester's own.
pub type ScheduleKey = (Uuid, Uuid);

/// A row of [`Schedules`]: plain bytes, so that its cache lines can be asked for together.
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Slot {
    schedule: Schedule,
    /// The requester's and the target's bytes.
    key: [[u8; 16]; 2],
}

impl Slot {
    #[inline]
    fn holds(&self, key: &ScheduleKey) -> bool {
        self.key == [*key.0.as_bytes(), *key.1.as_bytes()]
    }

    fn key(&self) -> ScheduleKey {
        (Uuid::from_bytes(self.key[0]), Uuid::from_bytes(self.key[1]))
    }

    /// How much the schedule is worth keeping when the table is over its cap, higher better:
    /// a requester's own schedule above any pair's, then by the power of two of its attempts,
    /// then by its latest attempt, and last by bits of the key (so that ranks are almost never
    /// equal and a threshold drops the share it was taken for).
    #[inline]
    fn rank(&self) -> u128 {
        let requester = u128::from(self.key[1] == [0; 16]);
        let magnitude = u128::from(32 - self.schedule.total.leading_zeros());
        let last = u128::from((self.schedule.last_ms ^ i64::MIN) as u64);
        let bits = |b: &[u8; 16]| u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        let tiebreak = u128::from((bits(&self.key[0]) ^ bits(&self.key[1]).rotate_left(29)) >> 7);
        requester << 127 | magnitude << 121 | last << 57 | tiebreak
    }
}

impl Schedules {
    /// An empty table with room for `n` schedules.
    pub fn with_capacity(n: usize) -> Self {
        let mut s = Self::default();
        s.reserve(n);
        s
    }

    /// Room for `more` schedules past those held without growing the index (rows are added a
    /// chunk at a time, without moving any).
    pub fn reserve(&mut self, more: usize) {
        let need = (self.len + more).saturating_mul(2).next_power_of_two().max(16);
        if need > self.slots.capacity() {
            self.slots.resize(need);
        }
    }

    /// The schedule of `key`, if any.
    pub fn get(&self, key: &ScheduleKey) -> Option<&Schedule> {
        self.find(key, self.hash(key)).map(|i| &self.row(i).schedule)
    }

    /// Number of schedules.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every key with its schedule (in the order the keys came, but for evicted schedules' rows
    /// taken by the last).
    pub fn iter(&self) -> impl Iterator<Item = (ScheduleKey, &Schedule)> {
        (0..self.len).map(|i| {
            let s = self.row(i);
            (s.key(), &s.schedule)
        })
    }

    /// The hash of `key` in this table.
    #[inline]
    pub fn hash(&self, key: &ScheduleKey) -> u64 {
        self.hasher.hash_one(key)
    }

    #[inline]
    fn row(&self, i: usize) -> &Slot {
        &self.chunks[i >> CHUNK_BITS][i & (ROWS_PER_CHUNK - 1)]
    }

    #[inline]
    fn row_mut(&mut self, i: usize) -> &mut Slot {
        &mut self.chunks[i >> CHUNK_BITS][i & (ROWS_PER_CHUNK - 1)]
    }

    /// Asks for the index slot a probe for `hash` starts at, without waiting.
    #[inline]
    pub(crate) fn prefetch_slot(&self, hash: u64) {
        if let Some(s) = self.slots.home(hash) {
            prefetch_l2(bytemuck::bytes_of(s));
        }
    }

    /// The row of the first schedule whose index slot carries `hash`'s tag, without comparing keys
    /// (reads the index only): almost always `key`'s own, to be checked on use.
    #[inline]
    pub(crate) fn candidate(&self, hash: u64) -> Option<usize> {
        self.slots.candidate(hash).map(|row| row as usize)
    }

    /// Asks for the cache lines of row `index` (its key and every count), without waiting.
    #[inline]
    pub(crate) fn prefetch(&self, index: usize) {
        if let Some(slot) = self.chunks.get(index >> CHUNK_BITS).and_then(|c| c.get(index & (ROWS_PER_CHUNK - 1))) {
            // `prefetch_l2` asks for a slice's first and last bytes: bytes 0, 64, 128 and the
            // last, no two more than a line apart, so every line of the row.
            let bytes = bytemuck::bytes_of(slot);
            prefetch_l2(&bytes[..65.min(bytes.len())]);
            prefetch_l2(&bytes[128.min(bytes.len())..]);
        }
    }

    /// The row of `key` (`hash` its hash).
    fn find(&self, key: &ScheduleKey, hash: u64) -> Option<usize> {
        self.slots.find(hash, |row| self.row(row as usize).holds(key)).map(|row| row as usize)
    }

    /// The schedule of `key` (`hash` its hash), created empty if there is none; `true` when it was
    /// just created. `candidate` is a row from [`Schedules::candidate`]: used only when it holds
    /// `key`.
    #[inline]
    pub(crate) fn entry(&mut self, key: &ScheduleKey, hash: u64, candidate: Option<usize>) -> (&mut Schedule, bool) {
        if let Some(c) = candidate.filter(|c| *c < self.len && self.row(*c).holds(key)) {
            self.dirty.mark(c);
            return (&mut self.row_mut(c).schedule, false);
        }
        if let Some(i) = self.find(key, hash) {
            self.dirty.mark(i);
            return (&mut self.row_mut(i).schedule, false);
        }
        // At most half full, so probes stay short.
        if (self.len + 1) * 2 > self.slots.capacity() {
            self.slots.resize((self.slots.capacity() * 2).max(16));
        }
        let i = self.len;
        assert!(i < u32::MAX as usize, "fewer than 2^32 - 1 timing schedules in one partition");
        let chunk = i >> CHUNK_BITS;
        if chunk == self.chunks.len() {
            self.chunks.push(HugeArray::zeroed(if chunk == 0 { 16 } else { ROWS_PER_CHUNK }));
        } else if self.chunks[chunk].len() <= i & (ROWS_PER_CHUNK - 1) {
            // The first chunk, full below a chunk's size: grows as a `Vec` would, until mapped.
            let grown = grown_len::<Slot>(self.chunks[chunk].len(), i + 1, ROWS_PER_CHUNK);
            let mut bigger = HugeArray::zeroed(grown);
            bigger[..self.chunks[chunk].len()].copy_from_slice(&self.chunks[chunk]);
            self.chunks[chunk] = bigger;
        }
        *self.row_mut(i) = Slot { schedule: Schedule::default(), key: [*key.0.as_bytes(), *key.1.as_bytes()] };
        // Marked for the mirror, which may hold an older row of this number (rows past an
        // evicted schedule's move down).
        self.dirty.mark(i);
        self.len += 1;
        self.slots.insert(hash, i as u32);
        (&mut self.row_mut(i).schedule, true)
    }

    /// The schedule of `key`, created empty if there is none.
    pub fn get_or_default(&mut self, key: &ScheduleKey) -> &mut Schedule {
        let hash = self.hash(key);
        self.entry(key, hash, None).0
    }

    /// Drops row `i`; the last row takes its number.
    fn remove(&mut self, i: usize) {
        let key = self.row(i).key();
        self.slots.remove(self.hash(&key), i as u32);
        let last = self.len - 1;
        if i != last {
            let moved = *self.row(last);
            self.slots.renumber(self.hash(&moved.key()), last as u32, i as u32);
            *self.row_mut(i) = moved;
            self.dirty.mark(i);
        }
        *self.row_mut(last) = Slot::zeroed();
        self.len -= 1;
        // A chunk emptied is given back (the first stays).
        if self.len.div_ceil(ROWS_PER_CHUNK).max(1) < self.chunks.len() {
            self.chunks.pop();
        }
    }
}

/// Eviction.
impl Schedules {
    /// Sampled rows a pass over the cap takes its threshold from.
    const RANK_SAMPLE: usize = 1_024;

    /// Judges up to `budget` schedules from where the last step stopped, dropping those `rule`
    /// evicts: a pass over the table spread over many calls between micro-batches, starting over
    /// when it reaches the end. When the table holds more than `rule.cap`, a pass begins (again,
    /// from the first row) that also drops the schedules ranked lowest ([`Slot::rank`]): about as
    /// many as bring it to 90 % of the cap, by a threshold taken from a sample of the rows (a
    /// pass that falls short is followed by another). Returns the rows such a pass has still to
    /// judge (0 when the pass only looks for idle schedules, which can wait) and what it dropped.
    pub fn evict_step(&mut self, rule: Eviction, budget: usize) -> (usize, Evicted) {
        if self.pass.rank_below == 0 && self.len > rule.cap {
            self.pass = Pass { at: 0, rank_below: self.rank_threshold(rule.cap - rule.cap / 10) };
        }
        let mut evicted = Evicted::default();
        let mut i = self.pass.at.min(self.len);
        for _ in 0..budget {
            if i >= self.len {
                break;
            }
            let row = self.row(i);
            if row.schedule.last_ms < rule.idle_before_ms {
                evicted.idle += 1;
                self.remove(i);
            } else if row.rank() < self.pass.rank_below {
                evicted.over_cap += 1;
                self.remove(i);
            } else {
                i += 1;
            }
        }
        let urgent = if self.pass.rank_below > 0 { self.len - i } else { 0 };
        self.pass.at = i;
        if i >= self.len {
            self.pass = Pass::default();
            self.slots.shrink(self.len);
        }
        (urgent, evicted)
    }

    /// The rank below which about `len - keep` of the rows fall, from a sample of them.
    fn rank_threshold(&self, keep: usize) -> u128 {
        let (n, k) = (self.len, Self::RANK_SAMPLE.min(self.len));
        if k == 0 || keep >= n {
            return 0;
        }
        let mut ranks: Vec<u128> = (0..k).map(|j| self.row(j * n / k).rank()).collect();
        ranks.sort_unstable();
        // The sampled share to drop, rounded up; at least one.
        let at = ((n - keep) * k).div_ceil(n).clamp(1, k);
        ranks.get(at).copied().unwrap_or(u128::MAX)
    }
}

impl std::fmt::Debug for Schedules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Schedules {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Schedules {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Schedules;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of (requester, target) to schedule")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Schedules, A::Error> {
                let mut out = Schedules::default();
                // As the map it replaces: a repeated key keeps its last schedule.
                while let Some((key, schedule)) = map.next_entry::<ScheduleKey, Schedule>()? {
                    *out.get_or_default(&key) = schedule;
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Why an attempt is anomalous.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    /// 0..1.
    pub score: f64,
    /// Hours the schedule uses (UTC).
    pub hours: Vec<u32>,
    /// Weekdays the schedule uses (0 = Monday).
    pub days: Vec<u32>,
    /// The attempt's hour and weekday.
    pub at: (u32, u32),
    /// Attempts in the history.
    pub history: u32,
}

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

impl Anomaly {
    /// "usually active Mon-Fri 07:00-07:59 UTC; this attempt Sun 03:12".
    pub fn explain(&self, subject: &str, ts: i64) -> String {
        let days = ranges(&self.days, |d| DAY_NAMES[d as usize].to_owned(), "-");
        let hours = ranges(&self.hours, |h| format!("{h:02}:00"), "-");
        let at = DateTime::from_timestamp_millis(ts)
            .map_or_else(String::new, |t| format!("{} {:02}:{:02}", DAY_NAMES[self.at.1 as usize], t.hour(), t.minute()));
        format!("{subject} usually active {days} {hours} UTC; this attempt {at}")
    }
}

/// "Mon-Fri, Sun" from sorted values.
fn ranges(v: &[u32], name: impl Fn(u32) -> String, sep: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if j > i { format!("{}{sep}{}", name(v[i]), name(v[j])) } else { name(v[i]) });
        i = j + 1;
    }
    out.join(", ")
}

/// UTC hour of the day and weekday (0 = Monday) of `ts`; `(0, 0)` past chrono's range of dates.
#[inline]
pub fn slot(ts: i64) -> (u32, u32) {
    // Arithmetic inside ±250,000 years (chrono's dates reach ±262,143 years): UTC days are 86,400 s
    // and 1970-01-01 was a Thursday. Outside it, chrono decides as before.
    const FAST: i64 = 250_000 * 366 * 86_400_000;
    if (-FAST..FAST).contains(&ts) {
        let hour = ts.div_euclid(3_600_000).rem_euclid(24) as u32;
        let day = (ts.div_euclid(86_400_000) + 3).rem_euclid(7) as u32;
        return (hour, day);
    }
    DateTime::from_timestamp_millis(ts).map_or((0, 0), |t| (t.hour(), t.weekday().num_days_from_monday()))
}

impl Schedule {
    /// Whether the history is long and large enough to judge by, at `ts`.
    pub fn is_learned(&self, cfg: &TimingConfig, ts: i64) -> bool {
        self.total >= cfg.min_attempts && ts - self.first_ms >= i64::from(cfg.min_days) * 86_400_000
    }

    /// Judges an attempt at `ts` against the history (which must be learned).
    pub fn judge(&self, cfg: &TimingConfig, ts: i64) -> Option<Anomaly> {
        let (h, d) = slot(ts);
        let total = f64::from(self.total.max(1));
        let share = |n: u32| f64::from(n) / total;
        let (hour_share, day_share) = (share(self.hours[h as usize]), share(self.days[d as usize]));
        let used_count = |counts: &[u32]| counts.iter().filter(|&&n| share(n) >= cfg.used_share).count() as u32;
        // Off schedule: an unused hour of a schedule regular in its hours, or an unused weekday of
        // one regular in its weekdays.
        let off_hour = hour_share < cfg.used_share && used_count(&self.hours) <= cfg.max_used_hours;
        let off_day = day_share < cfg.used_share && used_count(&self.days) <= cfg.max_used_days;
        if !off_hour && !off_day {
            return None;
        }
        let used = |counts: &[u32]| (0..counts.len() as u32).filter(|&i| share(counts[i as usize]) >= cfg.used_share).collect::<Vec<u32>>();
        let deciding = match (off_hour, off_day) {
            (true, true) => hour_share.min(day_share),
            (true, false) => hour_share,
            _ => day_share,
        };
        let score = 1.0 - (deciding / cfg.used_share).min(1.0);
        Some(Anomaly { score, hours: used(&self.hours), days: used(&self.days), at: (h, d), history: self.total })
    }

    /// Attempts in the history.
    pub fn attempts(&self) -> u32 {
        self.total
    }

    /// Event time of the latest attempt in the history.
    pub fn last_ms(&self) -> i64 {
        self.last_ms
    }

    /// Adds an attempt at `ts` to the history.
    pub fn add(&mut self, ts: i64) {
        if self.total == 0 || ts < self.first_ms {
            self.first_ms = ts;
        }
        if self.total == 0 || ts > self.last_ms {
            self.last_ms = ts;
        }
        let (h, d) = slot(ts);
        self.total = self.total.saturating_add(1);
        self.hours[h as usize] += 1;
        self.days[d as usize] += 1;
    }
}

/// A schedule and its key (requester, target), as checkpoints hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct ScheduleRow {
    key: [[u8; 16]; 2],
    schedule: Schedule,
}

/// A partition's learned schedules as a checkpoint holds them: the keys and schedules in one array
/// (a copy of the table's rows without its index), in the table's order; or the table's
/// checkpoint mirror (see [`Schedules::take_snapshot`]), packed into that array only when written.
#[derive(Debug, Clone)]
pub struct SchedulesSnapshot {
    repr: SnapshotRepr,
}

#[derive(Debug, Clone)]
enum SnapshotRepr {
    Rows(HugeVec<ScheduleRow>),
    Mirror(Box<SchedulesMirror>),
}

impl Default for SchedulesSnapshot {
    fn default() -> Self {
        Self { repr: SnapshotRepr::Rows(HugeVec::default()) }
    }
}

/// The same schedules in the same order, whichever the form.
impl PartialEq for SchedulesSnapshot {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for SchedulesSnapshot {}

/// A copy of a [`Schedules`] table's rows kept from checkpoint to checkpoint, so that a checkpoint
/// copies only the rows written since the last one: the rows past the mirror's `len` are new and
/// copied whole, the others when their dirty bit is set (the table marks every row it writes,
/// new, changed, or moved into an evicted one's place), and the mirror's rows past the table's end
/// are dropped. Chunked as the table is, so that growing never copies the rows held.
#[derive(Debug, Clone, Default)]
struct SchedulesMirror {
    /// Which mirror of which table this is (see [`MirrorSlot`]).
    epoch: u64,
    /// The table's first `len` rows, [`ROWS_PER_CHUNK`] per chunk (the first smaller while it is
    /// the only one).
    chunks: Vec<HugeArray<Slot>>,
    len: usize,
}

impl SchedulesMirror {
    fn iter(&self) -> impl Iterator<Item = &Slot> {
        (0..self.len).map(|i| &self.chunks[i >> CHUNK_BITS][i & (ROWS_PER_CHUNK - 1)])
    }

    /// Room for `n` rows.
    fn grow(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let last = (n - 1) >> CHUNK_BITS;
        if let Some(first) = self.chunks.first_mut()
            && first.len() < ROWS_PER_CHUNK
            && (last > 0 || first.len() < n)
        {
            // The first chunk, smaller than a chunk while the table is: grows as a `Vec` would,
            // until mapped.
            let size = if last > 0 { ROWS_PER_CHUNK } else { grown_len::<Slot>(first.len(), n, ROWS_PER_CHUNK) };
            let mut bigger = HugeArray::zeroed(size);
            bigger[..first.len()].copy_from_slice(first);
            *first = bigger;
        }
        while self.chunks.len() <= last {
            let size = if self.chunks.is_empty() && last == 0 { grown_len::<Slot>(0, n, ROWS_PER_CHUNK) } else { ROWS_PER_CHUNK };
            self.chunks.push(HugeArray::zeroed(size));
        }
    }
}

/// The checkpoint mirror.
impl Schedules {
    /// Copies into the mirror up to `budget` rows written since it was last brought up to date
    /// (every row the first time, or when the mirror is out in a checkpoint not handed back);
    /// returns the rows still to copy.
    pub fn mirror_step(&mut self, budget: usize) -> usize {
        let epoch = self.mirror.epoch;
        let m = self.mirror.home.get_or_insert_with(|| SchedulesMirror { epoch, ..SchedulesMirror::default() });
        let chunks = &self.chunks;
        let (chunk_of, offset_of) = (|i: usize| i >> CHUNK_BITS, |i: usize| i & (ROWS_PER_CHUNK - 1));
        // Rows the mirror holds, written since: their dirty bits. Its rows past the table's end
        // (evicted since) are dropped; the table's rows past those it holds are new to it, copied
        // below (now or at a later step) whatever their dirty bits say.
        let held = m.len.min(self.len);
        m.len = held;
        self.dirty.clear_from(held);
        let drained = self.dirty.drain(budget, |i| m.chunks[chunk_of(i)][offset_of(i)] = chunks[chunk_of(i)][offset_of(i)]);
        // Rows new to the mirror, a chunk's run at a time.
        let to = self.len.min(held.saturating_add(budget - drained));
        m.grow(to);
        let mut at = held;
        while at < to {
            let (chunk, offset) = (chunk_of(at), offset_of(at));
            let run = (to - at).min(ROWS_PER_CHUNK - offset);
            m.chunks[chunk][offset..offset + run].copy_from_slice(&chunks[chunk][offset..offset + run]);
            at += run;
        }
        m.len = to;
        self.dirty.cover(self.len);
        self.dirty.count() + (self.len - to)
    }

    /// The schedules as a checkpoint holds them, through the mirror: brought up to date (the
    /// rows written since the last [`Schedules::mirror_step`]) and handed out whole. The table
    /// expects it back ([`Schedules::recycle`]); until then it marks the rows written. Without
    /// a mirror at home a packed [`SchedulesSnapshot::of`] is taken instead.
    pub fn take_snapshot(&mut self) -> SchedulesSnapshot {
        if self.mirror.home.is_none() {
            return SchedulesSnapshot::of(self);
        }
        self.mirror_step(usize::MAX);
        let mut m = self.mirror.home.take().expect("brought up to date");
        m.epoch = fresh_epoch();
        self.mirror.epoch = m.epoch;
        SchedulesSnapshot { repr: SnapshotRepr::Mirror(Box::new(m)) }
    }

    /// Takes back the mirror of a snapshot from [`Schedules::take_snapshot`] once it is written. A
    /// snapshot of another table, or of this one but not the last taken, is dropped.
    pub fn recycle(&mut self, s: SchedulesSnapshot) {
        if let SnapshotRepr::Mirror(m) = s.repr
            && m.epoch == self.mirror.epoch
            && self.mirror.home.is_none()
        {
            self.mirror.home = Some(*m);
        }
    }
}

impl SchedulesSnapshot {
    /// A copy of `schedules`.
    pub fn of(schedules: &Schedules) -> Self {
        let mut rows = HugeVec::with_capacity(schedules.len());
        let spare = rows.spare_mut();
        for (row, ((requester, target), schedule)) in spare.iter_mut().zip(schedules.iter()) {
            *row = ScheduleRow { key: [*requester.as_bytes(), *target.as_bytes()], schedule: *schedule };
        }
        rows.commit(schedules.len());
        Self { repr: SnapshotRepr::Rows(rows) }
    }

    /// Schedules held.
    pub fn len(&self) -> usize {
        match &self.repr {
            SnapshotRepr::Rows(rows) => rows.len(),
            SnapshotRepr::Mirror(m) => m.len,
        }
    }

    /// Whether no schedule is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key and its schedule.
    pub fn iter(&self) -> Box<dyn Iterator<Item = ((Uuid, Uuid), &Schedule)> + '_> {
        match &self.repr {
            SnapshotRepr::Rows(rows) => {
                Box::new(rows.iter().map(|r| ((Uuid::from_bytes(r.key[0]), Uuid::from_bytes(r.key[1])), &r.schedule)))
            }
            SnapshotRepr::Mirror(m) => Box::new(m.iter().map(|s| (s.key(), &s.schedule))),
        }
    }

    /// The schedules as the engine holds them.
    pub fn to_schedules(&self) -> Schedules {
        let mut schedules = Schedules::with_capacity(self.len());
        for (key, schedule) in self.iter() {
            *schedules.get_or_default(&key) = *schedule;
        }
        schedules
    }
}

/// Written as the rows' bytes, little-endian, one after the other: requester (16 bytes), target
/// (16), then the schedule's fields in order (first and latest attempt ms i64, attempts u32, 24
/// hourly and 7 daily counts u32), 176 bytes a schedule.
impl Serialize for SchedulesSnapshot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.repr {
            SnapshotRepr::Rows(rows) => rows.serialize(s),
            // Packed here, on the thread that writes the checkpoint.
            SnapshotRepr::Mirror(m) => {
                let mut rows = HugeVec::with_capacity(m.len);
                let spare = rows.spare_mut();
                for (row, slot) in spare.iter_mut().zip(m.iter()) {
                    *row = ScheduleRow { key: slot.key, schedule: slot.schedule };
                }
                rows.commit(m.len);
                rows.serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for SchedulesSnapshot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HugeVec::deserialize(d).map(|rows| Self { repr: SnapshotRepr::Rows(rows) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// 2026-11-23 is a Monday.
    const MONDAY: i64 = 1_795_392_000_000;
    const DAY: i64 = 86_400_000;
    const MIN: i64 = 60_000;

    fn weekday_mornings(weeks: i64) -> Schedule {
        let mut s = Schedule::default();
        for w in 0..weeks {
            for d in 0..5 {
                for k in 0..3 {
                    s.add(MONDAY + (w * 7 + d) * DAY + 7 * 60 * MIN + k * 5 * MIN);
                }
            }
        }
        s
    }

    #[test]
    fn slots_are_chronos_hour_and_weekday() {
        let chrono_slot = |ts: i64| DateTime::from_timestamp_millis(ts).map_or((0, 0), |t| (t.hour(), t.weekday().num_days_from_monday()));
        let mut x: i64 = 12_345;
        let mut cases = vec![0, -1, 1, MONDAY, MONDAY - 1, -86_400_000, -86_400_001, i64::MIN, i64::MAX, 8_000_000_000_000_000_000];
        for _ in 0..100_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            cases.extend([x, x >> 8, x >> 20, x >> 24, x % (400 * 366 * DAY)]);
        }
        for b in [8_258_000_000_000_000i64, 8_261_000_000_000_000, 7_900_000_000_000_000] {
            cases.extend([b, -b, b + 1, -b - 1]);
        }
        for ts in cases {
            assert_eq!(slot(ts), chrono_slot(ts), "{ts}");
        }
    }

    #[test]
    fn a_regular_pair_sending_off_schedule_is_an_anomaly() {
        let cfg = TimingConfig::default();
        let s = weekday_mornings(4);
        let sunday_night = MONDAY + 34 * DAY + 3 * 60 * MIN + 12 * MIN;
        assert!(s.is_learned(&cfg, sunday_night));
        let a = s.judge(&cfg, sunday_night).expect("anomaly");
        assert_eq!(a.score, 1.0);
        assert_eq!(a.explain("pair", sunday_night), "pair usually active Mon-Fri 07:00 UTC; this attempt Sun 03:12");
        assert!(s.judge(&cfg, MONDAY + 35 * DAY + 7 * 60 * MIN).is_none(), "Monday 07:00");
        assert!(s.judge(&cfg, MONDAY + 35 * DAY + 9 * 60 * MIN).is_some(), "Monday, but 09:00");
        assert!(s.judge(&cfg, MONDAY + 33 * DAY + 7 * 60 * MIN).is_some(), "07:00, but Saturday");
    }

    /// The checkpoint mirror holds exactly the table at every checkpoint: through growth (the
    /// rows are appended in new chunks), copies made ahead with any budget, mirrors not handed back and stale copies
    /// handed back (refused).
    /// The mirror copies new rows a chunk's run at a time, across chunk boundaries and within any
    /// budget, and the rows written since by their dirty bits.
    #[test]
    fn the_schedules_mirror_crosses_chunks_in_steps() {
        let key = |i: usize| (Uuid::from_u128(i as u128 * 0x9e37_79b9_7f4a_7c15 + 7), Uuid::nil());
        let mut schedules = Schedules::default();
        let n = ROWS_PER_CHUNK * 2 + 100;
        for i in 0..n {
            schedules.get_or_default(&key(i)).add(MONDAY + i as i64);
        }
        let mut left = schedules.mirror_step(40_000);
        assert_eq!(left, n - 40_000, "new rows count against the budget");
        while left > 0 {
            let before = left;
            left = schedules.mirror_step(30_001);
            assert!(left < before);
        }
        let first = schedules.take_snapshot();
        assert_eq!(first, SchedulesSnapshot::of(&schedules));
        schedules.recycle(first);
        // Rows changed on both sides of a chunk boundary, and new rows past the mirror.
        for i in [0, ROWS_PER_CHUNK - 1, ROWS_PER_CHUNK, n - 1] {
            schedules.get_or_default(&key(i)).add(MONDAY + DAY);
        }
        for i in n..n + 10 {
            schedules.get_or_default(&key(i)).add(MONDAY);
        }
        assert_eq!(schedules.mirror_step(3), 4 + 10 - 3);
        let second = schedules.take_snapshot();
        assert_eq!(second, SchedulesSnapshot::of(&schedules));
        assert_eq!(second.iter().nth(ROWS_PER_CHUNK).map(|(_, s)| s.attempts()), Some(2));
    }

    #[test]
    fn the_schedules_mirror_holds_exactly_the_table_at_every_checkpoint() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};

        let mut rng = SmallRng::seed_from_u64(3);
        let mut schedules = Schedules::default();
        let mut stale: Option<SchedulesSnapshot> = None;
        for round in 0..80u32 {
            let pool = 10 + round * round * 5;
            for _ in 0..rng.random_range(1..5) {
                for _ in 0..rng.random_range(0..2_000) {
                    let key = (Uuid::from_u128(u128::from(rng.random_range(0..pool))), Uuid::nil());
                    schedules.get_or_default(&key).add(MONDAY + rng.random_range(0..28 * DAY));
                }
                if rng.random_range(0..3) == 0 {
                    schedules.mirror_step(rng.random_range(0..3_000));
                }
                // Evictions move the last rows into the evicted ones' places and shrink the table.
                if rng.random_range(0..4) == 0 {
                    let idle_before_ms = MONDAY + rng.random_range(0..8 * DAY);
                    let cap = if rng.random_bool(0.3) { rng.random_range(1..=schedules.len().max(1)) } else { usize::MAX };
                    schedules.evict_step(Eviction { idle_before_ms, cap }, rng.random_range(0..5_000));
                    check(&schedules);
                }
            }
            if rng.random_range(0..3) > 0 {
                let s = schedules.take_snapshot();
                assert_eq!(s, SchedulesSnapshot::of(&schedules), "round {round}: the mirror is the table");
                let read: SchedulesSnapshot = postcard::from_bytes(&postcard::to_stdvec(&s).unwrap()).unwrap();
                assert_eq!(read, s, "round {round}: written as the table's own snapshot is");
                if let Some(old) = stale.take() {
                    schedules.recycle(old);
                }
                stale = Some(s.clone());
                if rng.random_range(0..4) > 0 {
                    schedules.recycle(s);
                }
            }
        }
        assert!(schedules.len() > 1_000, "grown through many sizes: {}", schedules.len());
    }

    /// The index (see `SlotIndex::check`), the chunks (as many as the rows need, zeroed past the
    /// last row) and the dirty bits' cover.
    fn check(s: &Schedules) {
        assert!(s.len * 2 <= s.slots.capacity(), "{} rows in {} slots", s.len, s.slots.capacity());
        s.slots.check(s.len, |i| s.hash(&s.row(i as usize).key()));
        assert!(s.chunks.len() <= s.len.div_ceil(ROWS_PER_CHUNK).max(1), "{} chunks for {} rows", s.chunks.len(), s.len);
        for (c, chunk) in s.chunks.iter().enumerate() {
            for (k, row) in chunk.iter().enumerate().filter(|(k, _)| c * ROWS_PER_CHUNK + k >= s.len) {
                assert!(bytemuck::bytes_of(row).iter().all(|b| *b == 0), "row {} past the last is not zeroed", c * ROWS_PER_CHUNK + k);
            }
        }
    }

    /// Steps of any budget until the pass that is due has judged every row (idle: one whole
    /// pass; over the cap: until the table is back under it).
    fn evict_all(s: &mut Schedules, rule: Eviction, rng: &mut impl rand::Rng) -> Evicted {
        let mut total = Evicted::default();
        let (mut judged, rows) = (0, s.len());
        loop {
            let budget = rng.random_range(1..2_000);
            let (urgent, e) = s.evict_step(rule, budget);
            total.idle += e.idle;
            total.over_cap += e.over_cap;
            judged += budget;
            if urgent == 0 && s.pass.at == 0 && s.len <= rule.cap && judged > 2 * (rows + 2_000) {
                return total;
            }
            assert!(judged < 100_000_000, "the eviction never ends");
        }
    }

    #[test]
    fn idle_schedules_are_evicted_in_steps_and_every_other_one_keeps_its_history() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};

        let mut rng = SmallRng::seed_from_u64(17);
        let mut s = Schedules::default();
        let mut model: hashbrown::HashMap<ScheduleKey, Schedule> = hashbrown::HashMap::new();
        for i in 0..(ROWS_PER_CHUNK as u128 + 5_000) {
            let key = (Uuid::from_u128(i * 0x9e37_79b9_7f4a_7c15 + 3), if i % 3 == 0 { Uuid::nil() } else { Uuid::from_u128(i % 7 + 1) });
            for _ in 0..rng.random_range(1..4) {
                let ts = MONDAY + rng.random_range(0..60 * DAY);
                s.get_or_default(&key).add(ts);
                model.entry(key).or_default().add(ts);
            }
        }
        let idle_before_ms = MONDAY + 45 * DAY;
        let evicted = evict_all(&mut s, Eviction { idle_before_ms, cap: usize::MAX }, &mut rng);
        model.retain(|_, m| m.last_ms >= idle_before_ms);
        assert_eq!(s.len(), model.len());
        assert!(evicted.idle > 30_000 && evicted.over_cap == 0, "{evicted:?}");
        for (key, m) in &model {
            assert_eq!(s.get(key), Some(m), "{key:?} kept as it was");
        }
        assert_eq!(s.chunks.len(), 1, "the emptied chunk is given back");
        check(&s);
    }

    #[test]
    fn a_table_over_its_cap_drops_the_schedules_least_worth_keeping_down_to_about_nine_tenths() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};

        let mut rng = SmallRng::seed_from_u64(23);
        let mut s = Schedules::default();
        let requester = |i: u128| Uuid::from_u128(i * 0x9e37_79b9_7f4a_7c15 + 11);
        // 2,000 requesters, each with its own schedule and 10 pairs of 1 to 300 attempts.
        for i in 0..2_000u128 {
            for t in 0..10u128 {
                for _ in 0..rng.random_range(1..=if t < 2 { 300 } else { 8 }) {
                    let ts = MONDAY + rng.random_range(0..20 * DAY);
                    s.get_or_default(&(requester(i), Uuid::from_u128(t + 1))).add(ts);
                    s.get_or_default(&(requester(i), Uuid::nil())).add(ts);
                }
            }
        }
        let before: Vec<(ScheduleKey, Schedule)> = s.iter().map(|(k, v)| (k, *v)).collect();
        let cap = 10_000;
        let evicted = evict_all(&mut s, Eviction { idle_before_ms: i64::MIN, cap }, &mut rng);
        assert!((8_000..=cap).contains(&s.len()), "{} kept of 22,000 at a cap of {cap}", s.len());
        assert_eq!(evicted.over_cap as usize, before.len() - s.len());
        // Every requester's own schedule is kept, and every schedule dropped ranks below every
        // one kept.
        assert!((0..2_000).all(|i| s.get(&(requester(i), Uuid::nil())).is_some()));
        let rank =
            |(key, schedule): &(ScheduleKey, Schedule)| Slot { schedule: *schedule, key: [*key.0.as_bytes(), *key.1.as_bytes()] }.rank();
        let (kept, dropped): (Vec<_>, Vec<_>) = before.iter().partition(|(k, _)| s.get(k).is_some());
        let lowest_kept = kept.iter().copied().map(rank).min().unwrap();
        assert!(dropped.iter().all(|e| rank(e) < lowest_kept));
        // The busiest pairs (hundreds of attempts) outrank the rest.
        let busy_kept = kept.iter().filter(|(k, v)| !k.1.is_nil() && v.total > 16).count();
        assert_eq!(busy_kept, before.iter().filter(|(k, v)| !k.1.is_nil() && v.total > 16).count());
        check(&s);
        // Under the cap, a pass drops nothing more.
        assert_eq!(evict_all(&mut s, Eviction { idle_before_ms: i64::MIN, cap }, &mut rng), Evicted::default());
    }

    #[test]
    fn schedules_are_serialized_as_the_map_they_replace() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut schedules = Schedules::default();
        schedules.get_or_default(&(a, b)).add(MONDAY);
        schedules.get_or_default(&(a, Uuid::nil())).add(MONDAY + DAY);
        let as_map: hashbrown::HashMap<ScheduleKey, Schedule> = schedules.iter().map(|(k, s)| (k, *s)).collect();
        let bytes = postcard::to_allocvec(&schedules).unwrap();
        let back: hashbrown::HashMap<ScheduleKey, Schedule> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(postcard::to_allocvec(&back[&(a, b)]).unwrap(), postcard::to_allocvec(&as_map[&(a, b)]).unwrap());
        let again: Schedules = postcard::from_bytes(&postcard::to_allocvec(&as_map).unwrap()).unwrap();
        assert_eq!((again.len(), again.get(&(a, Uuid::nil())).map(Schedule::attempts)), (2, Some(1)));
        assert!(again.get(&(b, a)).is_none());
    }

    #[test]
    fn schedules_grow_past_chunks_and_index_resizes_keeping_every_key_and_candidate() {
        let key = |i: u128| (Uuid::from_u128(i * 0x9e37_79b9_7f4a_7c15 + 1), Uuid::from_u128(i % 3));
        let mut s = Schedules::default();
        let n = ROWS_PER_CHUNK as u128 * 2 + 17;
        let mut candidates = Vec::new();
        for i in 0..n {
            let k = key(i);
            let h = s.hash(&k);
            let (sched, created) = s.entry(&k, h, None);
            assert!(created);
            sched.add(MONDAY + i as i64);
            if i % 10_007 == 0 {
                candidates.push((k, h, s.candidate(h)));
            }
        }
        assert_eq!(s.len(), n as usize);
        assert_eq!(s.chunks.len(), 3, "two whole chunks and one more");
        assert!(s.slots.capacity() >= 2 * s.len() && s.slots.capacity().is_power_of_two(), "at most half full");
        // A candidate found before the table grew names the same row after.
        for (k, h, c) in candidates {
            let (sched, created) = s.entry(&k, h, c);
            assert!(!created);
            assert_eq!(sched.attempts(), 1);
            assert_eq!(s.candidate(h), c);
        }
        // A stale or wrong candidate is checked, not trusted.
        let (k0, k1) = (key(0), key(1));
        let wrong = s.candidate(s.hash(&k1));
        let (sched, created) = s.entry(&k0, s.hash(&k0), wrong);
        assert!(!created);
        assert_eq!(sched.first_ms, MONDAY);
        assert!(!s.entry(&k0, s.hash(&k0), Some(usize::MAX)).1);
        // Every key, once, in the order it came; a clone and a reserve keep them.
        assert!(s.iter().enumerate().all(|(i, (k, sched))| k == key(i as u128) && sched.first_ms == MONDAY + i as i64));
        let mut c = s.clone();
        c.reserve(1_000_000);
        assert!(c.slots.capacity() >= 2 * (s.len() + 1_000_000));
        for i in (0..n).step_by(997) {
            assert_eq!(c.get(&key(i)).map(|x| x.first_ms), Some(MONDAY + i as i64));
        }
        assert!(c.get(&(Uuid::from_u128(5), Uuid::nil())).is_none());
        let back: Schedules = postcard::from_bytes(&postcard::to_allocvec(&c).unwrap()).unwrap();
        assert_eq!(back.len(), s.len());
        assert!(back.iter().zip(s.iter()).all(|(a, b)| a.0 == b.0 && a.1 == b.1));
    }

    #[test]
    fn the_first_chunk_doubles_on_the_heap_then_takes_a_whole_chunk_at_once() {
        assert_eq!(size_of::<Slot>(), 176);
        let mut s = Schedules::default();
        let mut lens: Vec<usize> = Vec::new();
        for i in 0..ROWS_PER_CHUNK as u128 / 4 {
            s.get_or_default(&(Uuid::from_u128(i + 1), Uuid::nil())).add(MONDAY);
            if lens.last() != Some(&s.chunks[0].len()) {
                lens.push(s.chunks[0].len());
            }
        }
        // 8,192 rows are 1.4 MiB, on the heap; 16,384 would be mapped, so the whole chunk is.
        let expected: Vec<usize> = (4..=13).map(|b| 1 << b).chain([ROWS_PER_CHUNK]).collect();
        assert_eq!(lens, expected);
        assert!((0..ROWS_PER_CHUNK as u128 / 4).all(|i| s.get(&(Uuid::from_u128(i + 1), Uuid::nil())).is_some_and(|x| x.attempts() == 1)));
    }

    #[test]
    fn small_schedules_stay_small_until_they_grow() {
        let mut s = Schedules::with_capacity(3);
        assert_eq!((s.len(), s.slots.capacity(), s.chunks.len()), (0, 16, 0));
        for i in 0..40u128 {
            s.get_or_default(&(Uuid::from_u128(i), Uuid::nil())).add(MONDAY);
        }
        assert_eq!((s.len(), s.chunks.len(), s.chunks[0].len()), (40, 1, 64));
        assert_eq!(s.get(&(Uuid::from_u128(39), Uuid::nil())).map(Schedule::attempts), Some(1));
        s.get_or_default(&(Uuid::from_u128(39), Uuid::nil())).add(MONDAY);
        assert_eq!((s.len(), s.get(&(Uuid::from_u128(39), Uuid::nil())).map(Schedule::attempts)), (40, Some(2)));
    }

    #[test]
    fn a_key_active_around_the_clock_has_no_schedule_to_break() {
        // 14 days of attempts at pseudo-random times: every hour and weekday is in use.
        let cfg = TimingConfig::default();
        let mut s = Schedule::default();
        let mut x: i64 = 7;
        for _ in 0..400 {
            x = (x * 1_103_515_245 + 12_345) % 2_147_483_648;
            s.add(MONDAY + x % (14 * DAY));
        }
        let judged = (0..24 * 7).filter(|h| s.judge(&cfg, MONDAY + 14 * DAY + h * 60 * MIN).is_some()).count();
        assert_eq!(judged, 0, "no regular schedule, no anomaly");
    }

    #[test]
    fn too_little_history_teaches_nothing_and_stray_attempts_do_not_make_an_hour_used() {
        let cfg = TimingConfig::default();
        let s = weekday_mornings(1);
        assert!(!s.is_learned(&cfg, MONDAY + 30 * DAY), "15 attempts are too few");
        let mut s = Schedule::default();
        for i in 0..60 {
            s.add(MONDAY + i * 60 * MIN);
        }
        assert!(!s.is_learned(&cfg, MONDAY + 61 * 60 * MIN), "60 attempts in 2.5 days: too short");
        let mut s = weekday_mornings(4);
        s.add(MONDAY + 2 * DAY + 3 * 60 * MIN);
        assert!(s.judge(&cfg, MONDAY + 30 * DAY + 3 * 60 * MIN).is_some(), "one stray 03:00 is not a habit");
    }
}
