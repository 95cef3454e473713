//! Enforcement state where the findings are made: the count of each offender's unauthorized
//! attempts and the state it leads to (`active`, `blocked`, `unregistered`), a deterministic
//! function of the findings keyed by offender, in event time, kept in the partition that owns the
//! offender and checkpointed with it. So whether an attempt comes from a blocked UUID is decided by
//! its `ts` exactly, however fast the traffic is replayed.
//!
//! The contract's readings: each message attempt with at least one finding of a rule kind
//! (`unregistered_requester` through `presence_restriction`) counts once; each `throttle_exceeded`
//! finding counts once; `timing_anomaly` findings count only when configured. At `block_at` (5)
//! counted within the short window (10 minutes) the UUID is `blocked` from the `ts` of the attempt
//! that crossed the threshold for `block_for` (1 hour); past `unregister_after` (20) within the
//! long window (24 hours) it is `unregistered`, with no expiry (only a registered UUID can be; one
//! that is not is blocked instead). While blocked or unregistered, its attempts give only
//! `blocked_requester` and count no further; an attempt at or after `until` finds it active
//! again. Exempt UUIDs are never blocked. Attempts addressed to a blocked or unregistered UUID
//! give no finding at all.
//!
//! **Per device type.** `[enforcement.by_type.<type>]` overrides any of the windows, counts and the
//! block's length for offenders whose registered `type` (as of the attempt's `ts`) is `<type>`
//! ([`EnforcementConfig::thresholds`]); everything else (what counts, exemptions) is the same for
//! every type. An offender that is not registered, or has no `type`, gets the base thresholds.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use meshguard_schemas::EnforcementStateKind;
use meshguard_schemas::output::EnforcementState;

/// Enforcement settings (`[enforcement]` in the configuration file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnforcementConfig {
    /// Compute enforcement state at all (`false`: findings only, nobody is ever blocked).
    pub enabled: bool,
    /// Length of the short window, seconds (contract default: 10 minutes).
    pub short_window_s: u64,
    /// Counted attempts within the short window that block the UUID (contract default: 5).
    pub block_at: u32,
    /// How long a block lasts, seconds (contract default: 1 hour).
    pub block_for_s: u64,
    /// Length of the long window, seconds (contract default: 24 hours).
    pub long_window_s: u64,
    /// Counted attempts within the long window past which the UUID is unregistered (contract
    /// default: 20, so the 21st unregisters).
    pub unregister_after: u32,
    /// Whether `timing_anomaly` findings count (contract default: no).
    pub count_timing_anomalies: bool,
    /// Overrides of the thresholds for offenders of one registered device `type`
    /// (`[enforcement.by_type.smart-lock]`); a field left out keeps the base value.
    pub by_type: BTreeMap<String, ThresholdOverrides>,
}

/// `[enforcement.by_type.<type>]`: the thresholds of one device type; unset fields keep the base
/// `[enforcement]` values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThresholdOverrides {
    /// Length of the short window, seconds.
    pub short_window_s: Option<u64>,
    /// Counted attempts within the short window that block.
    pub block_at: Option<u32>,
    /// How long a block lasts, seconds.
    pub block_for_s: Option<u64>,
    /// Length of the long window, seconds.
    pub long_window_s: Option<u64>,
    /// Counted attempts within the long window past which the UUID is unregistered.
    pub unregister_after: Option<u32>,
}

/// The thresholds that apply to one offender: the base `[enforcement]` values, or those of its
/// device type ([`EnforcementConfig::thresholds`]). Small and `Copy`: resolved per counted attempt
/// without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Length of the short window, seconds.
    pub short_window_s: u64,
    /// Counted attempts within the short window that block.
    pub block_at: u32,
    /// How long a block lasts, seconds.
    pub block_for_s: u64,
    /// Length of the long window, seconds.
    pub long_window_s: u64,
    /// Counted attempts within the long window past which the UUID is unregistered.
    pub unregister_after: u32,
}

impl From<&EnforcementConfig> for Thresholds {
    /// The base thresholds (no device type).
    fn from(cfg: &EnforcementConfig) -> Self {
        Thresholds {
            short_window_s: cfg.short_window_s,
            block_at: cfg.block_at,
            block_for_s: cfg.block_for_s,
            long_window_s: cfg.long_window_s,
            unregister_after: cfg.unregister_after,
        }
    }
}

impl From<&Thresholds> for Thresholds {
    fn from(t: &Thresholds) -> Self {
        *t
    }
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            short_window_s: 600,
            block_at: 5,
            block_for_s: 3_600,
            long_window_s: 86_400,
            unregister_after: 20,
            count_timing_anomalies: false,
            by_type: BTreeMap::new(),
        }
    }
}

impl EnforcementConfig {
    /// Checks every value, naming the field of the first bad one.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let positive = [
            ("enforcement.short_window_s", self.short_window_s),
            ("enforcement.block_for_s", self.block_for_s),
            ("enforcement.long_window_s", self.long_window_s),
            ("enforcement.block_at", u64::from(self.block_at)),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field.to_owned(), "must be at least 1".to_owned()));
            }
        }
        for (device_type, o) in &self.by_type {
            let positive = [
                ("short_window_s", o.short_window_s),
                ("block_for_s", o.block_for_s),
                ("long_window_s", o.long_window_s),
                ("block_at", o.block_at.map(u64::from)),
            ];
            for (field, v) in positive {
                if v == Some(0) {
                    return Err((format!("enforcement.by_type.{device_type}.{field}"), "must be at least 1".to_owned()));
                }
            }
        }
        Ok(())
    }

    /// The thresholds for an offender of registered type `device_type` (`None`: not registered, or
    /// no type): the base values with the type's overrides, if `[enforcement.by_type]` has it.
    #[inline]
    pub fn thresholds(&self, device_type: Option<&str>) -> Thresholds {
        let mut t = Thresholds::from(self);
        if let Some(o) = device_type.filter(|_| !self.by_type.is_empty()).and_then(|d| self.by_type.get(d)) {
            t.short_window_s = o.short_window_s.unwrap_or(t.short_window_s);
            t.block_at = o.block_at.unwrap_or(t.block_at);
            t.block_for_s = o.block_for_s.unwrap_or(t.block_for_s);
            t.long_window_s = o.long_window_s.unwrap_or(t.long_window_s);
            t.unregister_after = o.unregister_after.unwrap_or(t.unregister_after);
        }
        t
    }

    /// The longest window of any type (the base included): how long counted attempts matter.
    pub fn longest_window_s(&self) -> u64 {
        let base = self.long_window_s.max(self.short_window_s);
        self.by_type.values().flat_map(|o| [o.long_window_s, o.short_window_s]).flatten().fold(base, u64::max)
    }
}

/// The state of one offender as the brokers should apply it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Not restricted.
    Active,
    /// Blocked from `since` until `until` (exclusive).
    Blocked {
        /// Start (the `ts` of the attempt that crossed the threshold).
        since: i64,
        /// End.
        until: i64,
    },
    /// Unregistered from `since` on.
    Unregistered {
        /// Start.
        since: i64,
    },
}

impl Status {
    /// Whether an attempt at `ts` is refused by this status.
    #[inline]
    pub fn refuses(&self, ts: i64) -> bool {
        match *self {
            Status::Active => false,
            Status::Blocked { since, until } => since <= ts && ts < until,
            Status::Unregistered { since } => since <= ts,
        }
    }
}

/// One offender's counted attempts and status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offender {
    /// Times of counted units (attempts with a rule finding, throttle findings), oldest first,
    /// within the long window.
    counted: Vec<i64>,
    /// Current status.
    pub status: Status,
    /// Ids of the latest findings counted (at most [`RECENT_FINDINGS`]).
    recent: Vec<Uuid>,
    /// Time of the latest manual override applied (a replayed override changes nothing).
    manual_ts: i64,
}

impl Default for Offender {
    fn default() -> Self {
        Self { counted: Vec::new(), status: Status::Active, recent: Vec::new(), manual_ts: i64::MIN }
    }
}

/// The offenders of a partition by UUID, each shared (`Arc`) between the engine's map and the
/// checkpoints holding a copy: a checkpoint's copy is a pointer per offender, and an offender
/// changed while a checkpoint holds it is copied then ([`Offenders::entry`],
/// [`Offenders::get_mut`]). Serialized as a map of offenders.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Offenders {
    #[serde(with = "crate::tables::shared_values")]
    map: crate::tables::FastMap<Uuid, Arc<Offender>>,
}

impl Offenders {
    /// `uuid`'s offender, created active with nothing counted if there is none.
    pub fn entry(&mut self, uuid: Uuid) -> &mut Offender {
        Arc::make_mut(self.map.entry(uuid).or_default())
    }

    /// `uuid`'s offender, if any.
    pub fn get(&self, uuid: &Uuid) -> Option<&Offender> {
        self.map.get(uuid).map(|o| &**o)
    }

    /// `uuid`'s offender to change, if any.
    pub fn get_mut(&mut self, uuid: &Uuid) -> Option<&mut Offender> {
        self.map.get_mut(uuid).map(Arc::make_mut)
    }

    /// Every offender.
    pub fn iter(&self) -> impl Iterator<Item = (&Uuid, &Offender)> {
        self.map.iter().map(|(k, o)| (k, &**o))
    }

    /// Every offender's state.
    pub fn values(&self) -> impl Iterator<Item = &Offender> {
        self.map.values().map(|o| &**o)
    }

    /// Keeps the offenders for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&Uuid, &Offender) -> bool) {
        self.map.retain(|k, o| keep(k, o));
    }

    /// Offenders held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl FromIterator<(Uuid, Offender)> for Offenders {
    fn from_iter<I: IntoIterator<Item = (Uuid, Offender)>>(iter: I) -> Self {
        Self { map: iter.into_iter().map(|(k, o)| (k, Arc::new(o))).collect() }
    }
}

/// How many finding ids an enforcement record carries.
pub const RECENT_FINDINGS: usize = 5;

impl Offender {
    /// Counts `units` unauthorized units at `ts` (behind `findings`) and returns the new status
    /// when a threshold is crossed. `registered` and `exempt` are the offender's, as of `ts`.
    /// `cfg` is the offender's [`Thresholds`] (or an [`EnforcementConfig`] for the base ones).
    pub fn count(
        &mut self,
        cfg: impl Into<Thresholds>,
        ts: i64,
        units: u32,
        findings: &[Uuid],
        registered: bool,
        exempt: bool,
    ) -> Option<Status> {
        let cfg: Thresholds = cfg.into();
        if self.status.refuses(ts) {
            // Attempts while blocked or unregistered count no further.
            return None;
        }
        let at = self.counted.partition_point(|t| *t <= ts);
        for _ in 0..units {
            self.counted.insert(at, ts);
        }
        for id in findings {
            if self.recent.len() == RECENT_FINDINGS {
                self.recent.remove(0);
            }
            self.recent.push(*id);
        }
        let long_ms = (cfg.long_window_s * 1000) as i64;
        let short_ms = (cfg.short_window_s * 1000) as i64;
        let newest = self.counted.last().copied().unwrap_or(ts);
        let expired = self.counted.partition_point(|t| *t <= newest - long_ms.max(short_ms));
        self.counted.drain(..expired);
        if exempt {
            return None;
        }
        let within = |w: i64| self.counted.iter().filter(|t| **t > ts - w && **t <= ts).count() as u32;
        let status = if registered && within(long_ms) > cfg.unregister_after {
            Status::Unregistered { since: ts }
        } else if within(short_ms) >= cfg.block_at {
            Status::Blocked { since: ts, until: ts + (cfg.block_for_s * 1000) as i64 }
        } else {
            return None;
        };
        self.status = status;
        Some(status)
    }

    /// Applies a manual override issued at `ts`: `Some(until)` blocks from `ts` (until `until`, or
    /// until lifted), `None` makes the offender active again with a clean count. Returns whether
    /// it changed anything (an override at or before the latest applied one is a replay).
    pub fn apply_manual(&mut self, ts: i64, block_until: Option<Option<i64>>) -> bool {
        if ts <= self.manual_ts {
            return false;
        }
        self.manual_ts = ts;
        self.status = match block_until {
            Some(until) => Status::Blocked { since: ts, until: until.unwrap_or(i64::MAX) },
            None => {
                self.counted.clear();
                Status::Active
            }
        };
        true
    }

    /// Ends a block whose `until` is at or before `watermark_ms` (an event-time timer): returns
    /// the time the offender became active again.
    pub fn expire(&mut self, watermark_ms: i64) -> Option<i64> {
        match self.status {
            Status::Blocked { until, .. } if until <= watermark_ms => {
                self.status = Status::Active;
                Some(until)
            }
            _ => None,
        }
    }

    /// The contract's record of this offender's status; `active_since` is when an active one
    /// became active.
    /// `cfg` gives the reason's numbers: the offender's [`Thresholds`] (or the base ones).
    pub fn record(&self, uuid: Uuid, cfg: impl Into<Thresholds>, active_since: i64) -> EnforcementState {
        let cfg: Thresholds = cfg.into();
        let attempts = self.counted.len() as u64;
        let (state, since, until, reason) = match self.status {
            Status::Active => (EnforcementStateKind::Active, active_since, None, "block expired".to_owned()),
            Status::Blocked { since, until } => (
                EnforcementStateKind::Blocked,
                since,
                (until != i64::MAX).then_some(until),
                format!("{} unauthorized attempts in {}", cfg.block_at, duration(cfg.short_window_s)),
            ),
            Status::Unregistered { since } => (
                EnforcementStateKind::Unregistered,
                since,
                None,
                format!("more than {} unauthorized attempts in {}", cfg.unregister_after, duration(cfg.long_window_s)),
            ),
        };
        EnforcementState { uuid, state, since, until, reason, attempts, findings: self.recent.clone() }
    }

    /// Whether nothing about this offender matters any more at `horizon_ms`.
    /// The longest window of any device type decides, so no type's count is cut short.
    pub fn is_spent(&self, horizon_ms: i64, cfg: &EnforcementConfig) -> bool {
        let long_ms = (cfg.longest_window_s() * 1000) as i64;
        matches!(self.status, Status::Active) && self.counted.last().is_none_or(|t| *t <= horizon_ms - long_ms)
    }
}

/// `600` → "10 minutes", `86400` → "24 hours".
fn duration(s: u64) -> String {
    match s {
        s if s % 3600 == 0 => format!("{} hour{}", s / 3600, if s == 3600 { "" } else { "s" }),
        s if s % 60 == 0 => format!("{} minute{}", s / 60, if s == 60 { "" } else { "s" }),
        s => format!("{s} seconds"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MIN: i64 = 60_000;

    /// A copy (a checkpoint's) shares every offender; a change after it copies that offender
    /// only, and neither side sees the other's change. Written as a map of offenders.
    #[test]
    fn copies_of_the_offenders_share_those_neither_changes() {
        let cfg = EnforcementConfig::default();
        let mut offenders = Offenders::default();
        for i in 0..4u128 {
            offenders.entry(Uuid::from_u128(i)).count(&cfg, MIN, 1, &[], true, false);
        }
        let copy = offenders.clone();
        let shared = |a: &Offenders, b: &Offenders, i: u128| Arc::ptr_eq(&a.map[&Uuid::from_u128(i)], &b.map[&Uuid::from_u128(i)]);
        assert!((0..4).all(|i| shared(&offenders, &copy, i)));
        offenders.get_mut(&Uuid::from_u128(2)).unwrap().count(&cfg, 2 * MIN, 1, &[], true, false);
        offenders.entry(Uuid::from_u128(9));
        assert!(!shared(&offenders, &copy, 2) && [0, 1, 3].into_iter().all(|i| shared(&offenders, &copy, i)));
        assert_eq!((offenders.len(), copy.len()), (5, 4));
        assert_ne!(offenders.get(&Uuid::from_u128(2)), copy.get(&Uuid::from_u128(2)));
        let one: Offenders = [(Uuid::from_u128(7), copy.get(&Uuid::from_u128(0)).unwrap().clone())].into_iter().collect();
        let plain: crate::tables::FastMap<Uuid, Offender> = one.iter().map(|(k, o)| (*k, o.clone())).collect();
        assert_eq!(postcard::to_allocvec(&one).unwrap(), postcard::to_allocvec(&plain).unwrap());
        let back: Offenders = postcard::from_bytes(&postcard::to_allocvec(&plain).unwrap()).unwrap();
        assert_eq!(back, one);
    }

    #[test]
    fn five_in_ten_minutes_block_for_an_hour_and_the_twenty_first_in_a_day_unregisters() {
        let cfg = EnforcementConfig::default();
        let mut o = Offender::default();
        for i in 0..4 {
            assert_eq!(o.count(&cfg, i * 3 * MIN, 1, &[], true, false), None);
        }
        // At 12 min: 3, 6, 9, 12 are in (2, 12] but 0 is not: four. At 12.5 min: five.
        assert_eq!(o.count(&cfg, 12 * MIN, 1, &[], true, false), None);
        let (since, until) = (12 * MIN + MIN / 2, 72 * MIN + MIN / 2);
        assert_eq!(o.count(&cfg, since, 1, &[], true, false), Some(Status::Blocked { since, until }));
        assert!(o.status.refuses(since) && o.status.refuses(until - 1) && !o.status.refuses(until) && !o.status.refuses(since - 1));
        let rec = o.record(Uuid::nil(), &cfg, 0);
        assert_eq!((rec.state, rec.reason.as_str()), (EnforcementStateKind::Blocked, "5 unauthorized attempts in 10 minutes"));
        // While blocked nothing counts; the block ends at its `until`; then the long window.
        assert_eq!(o.count(&cfg, 20 * MIN, 1, &[], true, false), None);
        assert_eq!(o.counted.len(), 6);
        assert_eq!(o.expire(72 * MIN), None);
        assert_eq!(o.expire(80 * MIN), Some(until));
        assert_eq!(o.record(Uuid::nil(), &cfg, until).state, EnforcementStateKind::Active);
        let mut t = 80 * MIN;
        let mut last = None;
        while last.is_none() {
            t += 3 * MIN;
            last = o.count(&cfg, t, 1, &[], true, false);
        }
        // 3-minute spacing puts four in any (t − 10 min, t], never five: the long window decides.
        assert_eq!(last, Some(Status::Unregistered { since: t }));
        assert_eq!(o.counted.iter().filter(|x| **x > t - 1440 * MIN).count(), 21);
    }

    #[test]
    fn exempt_are_never_blocked_and_the_unregistered_can_only_be_blocked() {
        let cfg = EnforcementConfig { unregister_after: 2, ..Default::default() };
        let mut o = Offender::default();
        for i in 0..10 {
            assert_eq!(o.count(&cfg, i, 1, &[], true, true), None, "exempt");
        }
        let mut o = Offender::default();
        let got: Vec<_> = (0..5).map(|i| o.count(&cfg, i, 1, &[], false, false)).collect();
        assert_eq!(got[4], Some(Status::Blocked { since: 4, until: 4 + 3_600_000 }), "not registered: blocked, never unregistered");
    }

    #[test]
    fn per_type_overrides_keep_the_base_for_what_they_leave_out_and_are_validated() {
        let cfg: EnforcementConfig = serde_json::from_str(
            r#"{"block_at": 6, "by_type": {"smart-lock": {"block_at": 2, "block_for_s": 600}, "meter": {"long_window_s": 172800}}}"#,
        )
        .expect("parses");
        let base = cfg.thresholds(None);
        assert_eq!((base.block_at, base.block_for_s, base.short_window_s), (6, 3_600, 600));
        assert_eq!(cfg.thresholds(Some("no-such-type")), base);
        let lock = cfg.thresholds(Some("smart-lock"));
        assert_eq!((lock.block_at, lock.block_for_s, lock.short_window_s, lock.unregister_after), (2, 600, 600, 20));
        assert_eq!(cfg.longest_window_s(), 172_800, "counts are kept as long as the longest window of any type");

        let bad: EnforcementConfig = serde_json::from_str(r#"{"by_type": {"smart-lock": {"short_window_s": 0}}}"#).expect("parses");
        assert_eq!(bad.validate().expect_err("a zero window").0, "enforcement.by_type.smart-lock.short_window_s");
        assert!(
            serde_json::from_str::<EnforcementConfig>(r#"{"by_type": {"x": {"block_after": 1}}}"#).is_err(),
            "unknown fields are refused"
        );
    }
}
