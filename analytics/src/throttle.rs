//! Throttles: attempts counted per requester over sliding windows of event time, an incremental
//! operator whose state is keyed by requester and lives in the partition that owns it (and so in
//! its checkpoints).
//!
//! The contract's readings: "past the limit" means more than `max` attempts in `(t − per_s, t]`;
//! the per-requester limit counts every action but `connect`, the connect limit only `connect`;
//! every attempt counts, allowed or not; a re-delivered attempt (same id) counts once; exempt UUIDs
//! are never throttled; one `throttle_exceeded` finding per offender, rule and *episode*, about the
//! attempt that first went past the limit, and the episode ends when the count is back at or under
//! the limit. Limits per device type or manufacturer apply only when configured; a target's
//! security profiles add `throttle` limits per requester-target pair.
//!
//! **State.** A window keeps the attempts it has seen (their time and a 32-bit fingerprint of their
//! id, 8 bytes) within one window plus the allowed lateness of its newest, at most `max + 5` of
//! them: a requester with more than `max + 1` in a window is flooding, in an episode only a quiet
//! window ends, so a key costs at most `8 × (max + 5)` bytes plus its header however fast its
//! requester floods. An attempt that arrives out of order (inside the allowed
//! lateness) is counted in its own window among the attempts already seen; windows of later
//! attempts already judged are not revisited (the episode rule makes a finding about the first
//! attempt seen past the limit).
//!
//! **Tightening** (off by default, since the contract's limits are fixed): after a requester's
//! per-requester or connect limit is breached, both are multiplied by `factor` (at least 1) for
//! `cooldown_s` seconds of event time after the breach.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tables::FastMap;

/// A limit: at most `max` attempts per `per_s` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Attempts allowed in the window.
    pub max: u32,
    /// Window length, seconds.
    pub per_s: f64,
}

impl Limit {
    /// Window length in ms (at least 1).
    pub fn per_ms(&self) -> i64 {
        ((self.per_s * 1000.0).round() as i64).max(1)
    }
}

/// Tightening after a breach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tightening {
    /// Whether breaching tightens the requester's limits.
    pub enabled: bool,
    /// Factor applied to the limits while tightened (0.5 halves them).
    pub factor: f64,
    /// How long the tightening lasts after the breach, seconds of event time.
    pub cooldown_s: f64,
}

impl Default for Tightening {
    fn default() -> Self {
        Self { enabled: false, factor: 0.5, cooldown_s: 300.0 }
    }
}

/// Throttle settings (`[throttles]` in the configuration file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// Attempts per requester, every action but `connect` (contract default: 10 per second).
    pub requester: Limit,
    /// `connect` attempts per requester (contract default: 2 per second).
    pub connect: Limit,
    /// Limits per requester of a device `type` (none unless configured), e.g. `smart-meter = { max
    /// = 1, per_s = 40 }`; they count every action but `connect`.
    pub by_type: BTreeMap<String, Limit>,
    /// Limits per requester of a `manufacturer`, likewise.
    pub by_manufacturer: BTreeMap<String, Limit>,
    /// Tightening after a breach.
    pub tightening: Tightening,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            requester: Limit { max: 10, per_s: 1.0 },
            connect: Limit { max: 2, per_s: 1.0 },
            by_type: BTreeMap::new(),
            by_manufacturer: BTreeMap::new(),
            tightening: Tightening::default(),
        }
    }
}

impl ThrottleConfig {
    /// Checks every value, naming the field of the first bad one.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let check = |field: String, l: &Limit| {
            if l.max == 0 {
                return Err((format!("{field}.max"), "must be at least 1".to_owned()));
            }
            if !(l.per_s > 0.0 && l.per_s.is_finite()) {
                return Err((format!("{field}.per_s"), format!("must be a positive number of seconds, found {}", l.per_s)));
            }
            Ok(())
        };
        check("throttles.requester".into(), &self.requester)?;
        check("throttles.connect".into(), &self.connect)?;
        for (name, l) in &self.by_type {
            check(format!("throttles.by_type.{name}"), l)?;
        }
        for (name, l) in &self.by_manufacturer {
            check(format!("throttles.by_manufacturer.{name}"), l)?;
        }
        let t = &self.tightening;
        if !(t.factor > 0.0 && t.factor <= 1.0) {
            return Err(("throttles.tightening.factor".into(), format!("must be in (0, 1], found {}", t.factor)));
        }
        if !(t.cooldown_s >= 0.0 && t.cooldown_s.is_finite()) {
            return Err(("throttles.tightening.cooldown_s".into(), format!("must be a non-negative number, found {}", t.cooldown_s)));
        }
        Ok(())
    }
}

/// Which limit a window counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rule {
    /// The per-requester limit.
    Requester,
    /// The connect limit.
    Connect,
    /// The limit of the requester's device type.
    Type,
    /// The limit of the requester's manufacturer.
    Manufacturer,
    /// The `throttle` of the target's profile number `n` (per requester-target pair).
    Profile(u16),
}

/// Attempts a window keeps beyond `max + 1` (the most an in-order window needs), so that attempts
/// arriving somewhat out of order still find the ones their own window holds.
const OUT_OF_ORDER_SLACK: usize = 4;

/// One sliding window of one requester (and target, for pair limits).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Window {
    /// Event time the offsets in `seen` count from.
    base: i64,
    /// The attempts kept, oldest first: `(ms after base, id fingerprint)`, 8 bytes each.
    seen: Vec<(u32, u32)>,
    /// The window's length, ms (for pruning).
    per_ms: u32,
    /// Whether the count is past the limit since the last finding (an episode is open).
    in_episode: bool,
}

/// What counting one attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// The same attempt was counted before.
    Repeat,
    /// At or under the limit, or past it in an episode already reported.
    Within,
    /// Past the limit: a new episode, with the count in the window.
    Exceeded(u32),
}

impl Window {
    /// Counts the attempt `(ts, fingerprint)` against at most `max` per `per_ms`; attempts up to
    /// `lateness_ms` behind the newest may still arrive and must find their window's attempts.
    pub fn count(&mut self, ts: i64, fingerprint: u32, max: u32, per_ms: i64, lateness_ms: i64) -> Counted {
        self.per_ms = u32::try_from(per_ms).unwrap_or(u32::MAX);
        // Keep what a window ending at any time still to come can hold: attempts within a window
        // and the allowed lateness of the newest, at most `max + 1 + OUT_OF_ORDER_SLACK` of them
        // (past `max + 1` in a window the requester floods, in an episode only a quiet window
        // ends).
        let newest = self.newest().map_or(ts, |n| n.max(ts));
        let horizon = newest - per_ms - lateness_ms;
        let base = self.base;
        let expired = self.seen.partition_point(|&(o, _)| base + i64::from(o) <= horizon);
        self.seen.drain(..expired);
        if self.seen.is_empty() || ts < self.base || ts - self.base > i64::from(u32::MAX) {
            self.rebase(ts);
        }
        let Ok(off) = u32::try_from(ts - self.base) else {
            return Counted::Within;
        };
        let at = self.seen.partition_point(|&(o, _)| o <= off);
        if self.seen[..at].iter().rev().take_while(|(o, _)| *o == off).any(|&(_, f)| f == fingerprint) {
            return Counted::Repeat;
        }
        self.seen.insert(at, (off, fingerprint));
        let over = self.seen.len().saturating_sub(max as usize + 1 + OUT_OF_ORDER_SLACK);
        self.seen.drain(..over);
        // Attempts in (ts − per_ms, ts] among those kept.
        let base = self.base;
        let upto = self.seen.partition_point(|&(o, _)| o <= off);
        let from = self.seen[..upto].partition_point(|&(o, _)| base + i64::from(o) <= ts - per_ms);
        let count = (upto - from) as u32;
        if count > max {
            if self.in_episode {
                return Counted::Within;
            }
            self.in_episode = true;
            Counted::Exceeded(count)
        } else {
            self.in_episode = false;
            Counted::Within
        }
    }

    /// Moves `base` to `ts` when `ts` is before every kept attempt, or when none is kept. (An
    /// attempt more than 49 days after every kept one finds them all expired first.)
    fn rebase(&mut self, ts: i64) {
        let Some(&(first, _)) = self.seen.first() else {
            self.base = ts;
            return;
        };
        let new_base = ts.min(self.base + i64::from(first));
        let shift = self.base - new_base;
        for (o, _) in &mut self.seen {
            *o = u32::try_from(i64::from(*o) + shift).unwrap_or(u32::MAX);
        }
        self.base = new_base;
    }

    /// The newest attempt time, if any.
    pub fn newest(&self) -> Option<i64> {
        self.seen.last().map(|(o, _)| self.base + i64::from(*o))
    }
}

/// The throttle state of one partition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ThrottleState {
    /// Windows by requester, target (nil when the limit is not per pair) and rule.
    pub windows: FastMap<(Uuid, Uuid, Rule), Window>,
    /// Requesters whose limits are tightened, until when (event time).
    pub tightened: FastMap<Uuid, i64>,
}

impl ThrottleState {
    /// Bytes of memory the state holds: the hash table's buckets and control bytes, and every
    /// window's buffer (allocator overhead aside).
    pub fn approximate_bytes(&self) -> usize {
        let bucket = std::mem::size_of::<((Uuid, Uuid, Rule), Window)>() + 1;
        let buffers: usize = self.windows.values().map(|w| w.seen.capacity() * std::mem::size_of::<(u32, u32)>()).sum();
        self.windows.capacity() * bucket + buffers + self.tightened.capacity() * (std::mem::size_of::<(Uuid, i64)>() + 1)
    }

    /// Forgets windows no attempt at or after `horizon_ms` can still count in (their newest
    /// attempt is a whole window older), and expired tightenings.
    pub fn prune(&mut self, horizon_ms: i64) {
        self.windows.retain(|_, w| w.newest().is_some_and(|t| t > horizon_ms - i64::from(w.per_ms)));
        self.tightened.retain(|_, until| *until > horizon_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(w: &mut Window, events: &[(i64, u32)], max: u32, per_ms: i64) -> Vec<Counted> {
        events.iter().map(|&(t, f)| w.count(t, f, max, per_ms, 0)).collect()
    }

    #[test]
    fn more_than_max_in_the_half_open_window_starts_one_episode() {
        use Counted::*;
        let mut w = Window::default();
        // max 2 per 1000 ms: the third attempt within (t − 1000, t] is past the limit.
        let got = run(&mut w, &[(0, 1), (500, 2), (999, 3), (1000, 4), (1001, 5), (1499, 6), (3000, 7), (3001, 8), (3002, 9)], 2, 1000);
        // 999 is the third in (−1, 999]; 1000, 1001 and 1499 each see three in their window, so the
        // episode stays open; at 3000 the count is back to one and it ends; 3002 starts another.
        assert_eq!(got, vec![Within, Within, Exceeded(3), Within, Within, Within, Within, Within, Exceeded(3)]);
    }

    #[test]
    fn an_episode_ends_when_the_count_is_back_under_the_limit() {
        use Counted::*;
        let mut w = Window::default();
        let got = run(&mut w, &[(0, 1), (10, 2), (20, 3), (30, 4), (2000, 5), (2010, 6), (2020, 7)], 2, 1000);
        assert_eq!(got, vec![Within, Within, Exceeded(3), Within, Within, Within, Exceeded(3)]);
    }

    #[test]
    fn repeats_count_once_and_the_window_edge_is_open_on_the_left() {
        use Counted::*;
        let mut w = Window::default();
        assert_eq!(run(&mut w, &[(0, 1), (0, 1), (0, 1)], 1, 1000), vec![Within, Repeat, Repeat]);
        assert_eq!(w.count(1000, 2, 1, 1000, 0), Within, "0 is outside (0, 1000]");
        assert_eq!(w.count(1000, 3, 1, 1000, 0), Exceeded(2));
    }

    #[test]
    fn late_attempts_count_in_their_own_window_and_state_stays_bounded() {
        let mut w = Window::default();
        for i in 0..1000 {
            w.count(10_000 + i, i as u32, 5, 1000, 30_000);
        }
        assert_eq!(w.seen.len(), 5 + 1 + OUT_OF_ORDER_SLACK, "bounded however many arrive");
        let mut w = Window::default();
        for i in 0..100 {
            w.count(i * 10_000, i as u32, 5, 1000, 2_000);
        }
        assert_eq!(w.seen.len(), 1, "a quiet requester keeps what a window and the lateness hold");
        let mut w = Window::default();
        w.count(5_000, 1, 2, 1000, 1000);
        w.count(5_100, 2, 2, 1000, 1000);
        assert_eq!(w.count(4_950, 3, 2, 1000, 1000), Counted::Within, "late: (3950, 4950] holds only itself");
        assert_eq!(w.count(5_150, 4, 2, 1000, 1000), Counted::Exceeded(4), "(4150, 5150] holds all four");
    }

    #[test]
    fn configuration_is_checked_field_by_field() {
        let mut c = ThrottleConfig::default();
        assert!(c.validate().is_ok());
        c.by_type.insert("meter".into(), Limit { max: 1, per_s: 0.0 });
        assert_eq!(c.validate().expect_err("must be refused").0, "throttles.by_type.meter.per_s");
        let c = ThrottleConfig { tightening: Tightening { factor: 2.0, ..Default::default() }, ..Default::default() };
        assert_eq!(c.validate().expect_err("must be refused").0, "throttles.tightening.factor");
    }
}
