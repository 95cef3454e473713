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

use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tables::FastMap;

mod snapshot;
mod table;
pub use snapshot::WindowsSnapshot;
use table::PackedKey;
pub use table::Windows;

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

/// Attempts a window holds inline (in its table entry, no buffer of its own): `max + 5` for limits
/// up to 11 attempts, the contract's among them. A window of a larger limit moves its attempts to a
/// buffer of its own ([`Spills`]) when it needs more.
const INLINE: usize = 16;

/// One sliding window of one requester (and target, for pair limits).
///
/// The attempts it keeps, oldest first, are `[ms after base, id fingerprint]`, 8 bytes each:
/// inline, or in a buffer of [`Spills`] once they are more than [`INLINE`]. Plain integers only
/// (`Pod`), so that the table can keep windows in memory it maps itself (see `huge`), and no enum:
/// where the inline attempts are must be known without reading the window (see
/// [`prefetch_entry`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct Window {
    /// Event time the offsets count from.
    base: i64,
    /// The attempts, when they fit: the first `len`.
    buf: [[u32; 2]; INLINE],
    /// The window's length, ms (for pruning).
    per_ms: u32,
    /// `0`, or `1 +` the index in [`Spills`] of the buffer holding the attempts.
    spill: u32,
    /// How many of `buf` are kept (when not spilled).
    len: u8,
    /// `1` when the count is past the limit since the last finding (an episode is open).
    in_episode: u8,
    _pad: [u8; 6],
}

/// The attempts of windows that did not fit inline, by `Window::spill - 1`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Spills {
    bufs: Vec<Vec<[u32; 2]>>,
    free: Vec<u32>,
}

impl Spills {
    fn add(&mut self, v: Vec<[u32; 2]>) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.bufs[i as usize] = v;
                i + 1
            }
            None => {
                self.bufs.push(v);
                u32::try_from(self.bufs.len()).expect("fewer than 2^32 spilled throttle windows")
            }
        }
    }

    fn release(&mut self, id: u32) {
        if id != 0 {
            self.bufs[id as usize - 1] = Vec::new();
            self.free.push(id - 1);
        }
    }

    /// Bytes held (allocator overhead aside).
    fn bytes(&self) -> usize {
        self.bufs.capacity() * size_of::<Vec<[u32; 2]>>()
            + self.free.capacity() * 4
            + self.bufs.iter().map(|v| v.capacity() * 8).sum::<usize>()
    }
}

impl Window {
    /// The attempts kept, oldest first.
    #[inline]
    fn seen<'a>(&'a self, spills: &'a Spills) -> &'a [[u32; 2]] {
        match self.spill {
            0 => &self.buf[..usize::from(self.len)],
            id => &spills.bufs[id as usize - 1],
        }
    }

    #[inline]
    fn seen_mut<'a>(&'a mut self, spills: &'a mut Spills) -> &'a mut [[u32; 2]] {
        match self.spill {
            0 => &mut self.buf[..usize::from(self.len)],
            id => &mut spills.bufs[id as usize - 1],
        }
    }

    /// Forgets the `n` oldest attempts (and gives back a spilled window's buffer once the rest fit
    /// inline in half the space: a window that hovers around [`INLINE`] attempts would otherwise
    /// allocate a buffer and free it again at every other attempt).
    #[inline]
    fn forget_oldest(&mut self, spills: &mut Spills, n: usize) {
        if n == 0 {
            return;
        }
        match self.spill {
            0 => {
                let l = usize::from(self.len);
                self.buf.copy_within(n..l, 0);
                self.len = (l - n) as u8;
            }
            id => {
                let v = &mut spills.bufs[id as usize - 1];
                v.drain(..n);
                if v.len() <= INLINE / 2 {
                    self.buf[..v.len()].copy_from_slice(v);
                    self.len = v.len() as u8;
                    spills.release(id);
                    self.spill = 0;
                }
            }
        }
    }

    /// Inserts `x` at `at`, then forgets the oldest beyond `cap` (as inserting and then forgetting
    /// would, without ever holding more than `max(len, cap)`).
    #[inline]
    fn insert_capped(&mut self, spills: &mut Spills, at: usize, x: [u32; 2], cap: usize) {
        let over = (self.seen(spills).len() + 1).saturating_sub(cap);
        if over > 0 {
            if at < over {
                // `x` is among the forgotten.
                self.forget_oldest(spills, over - 1);
                return;
            }
            self.forget_oldest(spills, over);
            self.insert(spills, at - over, x);
            return;
        }
        self.insert(spills, at, x);
    }

    #[inline]
    fn insert(&mut self, spills: &mut Spills, at: usize, x: [u32; 2]) {
        match self.spill {
            0 if usize::from(self.len) < INLINE => {
                let l = usize::from(self.len);
                self.buf.copy_within(at..l, at + 1);
                self.buf[at] = x;
                self.len += 1;
            }
            0 => {
                let mut v = Vec::with_capacity(INLINE * 2);
                v.extend_from_slice(&self.buf[..at]);
                v.push(x);
                v.extend_from_slice(&self.buf[at..]);
                self.spill = spills.add(v);
                self.len = 0;
            }
            id => spills.bufs[id as usize - 1].insert(at, x),
        }
    }

    /// Counts the attempt `(ts, fingerprint)` against at most `max` per `per_ms`; attempts up to
    /// `lateness_ms` behind the newest may still arrive and must find their window's attempts.
    fn count(&mut self, spills: &mut Spills, ts: i64, fingerprint: u32, max: u32, per_ms: i64, lateness_ms: i64) -> Counted {
        self.per_ms = u32::try_from(per_ms).unwrap_or(u32::MAX);
        // Keep what a window ending at any time still to come can hold: attempts within a window
        // and the allowed lateness of the newest, at most `max + 1 + OUT_OF_ORDER_SLACK` of them
        // (past `max + 1` in a window the requester floods, in an episode only a quiet window
        // ends).
        let newest = self.newest(spills).map_or(ts, |n| n.max(ts));
        let horizon = newest - per_ms - lateness_ms;
        let base = self.base;
        let expired = self.seen(spills).partition_point(|&[o, _]| base + i64::from(o) <= horizon);
        self.forget_oldest(spills, expired);
        if self.seen(spills).is_empty() || ts < self.base || ts - self.base > i64::from(u32::MAX) {
            self.rebase(spills, ts);
        }
        let Ok(off) = u32::try_from(ts - self.base) else {
            return Counted::Within;
        };
        let seen = self.seen(spills);
        let at = seen.partition_point(|&[o, _]| o <= off);
        if seen[..at].iter().rev().take_while(|[o, _]| *o == off).any(|&[_, f]| f == fingerprint) {
            return Counted::Repeat;
        }
        self.insert_capped(spills, at, [off, fingerprint], max as usize + 1 + OUT_OF_ORDER_SLACK);
        // Attempts in (ts − per_ms, ts] among those kept.
        let base = self.base;
        let seen = self.seen(spills);
        let upto = seen.partition_point(|&[o, _]| o <= off);
        let from = seen[..upto].partition_point(|&[o, _]| base + i64::from(o) <= ts - per_ms);
        let count = (upto - from) as u32;
        if count > max {
            if self.in_episode != 0 {
                return Counted::Within;
            }
            self.in_episode = 1;
            Counted::Exceeded(count)
        } else {
            self.in_episode = 0;
            Counted::Within
        }
    }

    /// Moves `base` to `ts` when `ts` is before every kept attempt, or when none is kept. (An
    /// attempt more than 49 days after every kept one finds them all expired first.)
    fn rebase(&mut self, spills: &mut Spills, ts: i64) {
        let Some(&[first, _]) = self.seen(spills).first() else {
            self.base = ts;
            return;
        };
        let new_base = ts.min(self.base + i64::from(first));
        let shift = self.base - new_base;
        for [o, _] in self.seen_mut(spills) {
            *o = u32::try_from(i64::from(*o) + shift).unwrap_or(u32::MAX);
        }
        self.base = new_base;
    }

    /// The newest attempt time, if any.
    fn newest(&self, spills: &Spills) -> Option<i64> {
        self.seen(spills).last().map(|[o, _]| self.base + i64::from(*o))
    }
}

/// A window, as the table shows it.
#[derive(Debug, Clone, Copy)]
pub struct WindowRef<'a> {
    window: &'a Window,
    spills: &'a Spills,
}

impl WindowRef<'_> {
    /// The newest attempt time, if any.
    pub fn newest(&self) -> Option<i64> {
        self.window.newest(self.spills)
    }

    /// Attempts kept.
    pub fn kept(&self) -> usize {
        self.window.seen(self.spills).len()
    }
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

/// A window's key: requester, target (nil when the limit is not per pair) and rule.
pub type WindowKey = (Uuid, Uuid, Rule);

/// One attempt to count against one limit.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// The window: requester, target (nil unless the limit is per pair), rule.
    pub key: WindowKey,
    /// Event time, ms.
    pub ts: i64,
    /// A 32-bit fingerprint of the attempt's id (a re-delivery has the same).
    pub fingerprint: u32,
    /// The limit's `max` before any tightening.
    pub max: u32,
    /// The limit's window, ms.
    pub per_ms: i64,
    /// Whether this is the first limit counted for its attempt (whose requester's tightening is
    /// looked up here, before any of the attempt's own limits can tighten it).
    pub first_of_attempt: bool,
}

/// What counting an [`Attempt`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The count's result.
    pub counted: Counted,
    /// The `max` applied (tightened or not).
    pub max: u32,
    /// Until when the requester's limits were tightened, when this limit was tightened.
    pub tightened_until: Option<i64>,
}

/// How far apart a batch's three steps are: while it counts attempt `i`, it prefetches the entry
/// of attempt `i + LOOKAHEAD` and the home slot of attempt `i + 2 × LOOKAHEAD`.
const LOOKAHEAD: usize = 16;

/// The throttle state of one partition. Written and read as its [`ThrottleSnapshot`].
#[derive(Debug, Clone, Default)]
pub struct ThrottleState {
    /// Windows by requester, target (nil when the limit is not per pair) and rule.
    pub windows: Windows,
    /// Requesters whose limits are tightened, until when (event time).
    pub tightened: FastMap<Uuid, i64>,
}

/// The throttle state of one partition as a checkpoint holds it (see [`WindowsSnapshot`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThrottleSnapshot {
    /// The windows.
    pub windows: WindowsSnapshot,
    /// Requesters whose limits are tightened, until when (event time).
    pub tightened: FastMap<Uuid, i64>,
}

impl From<&ThrottleSnapshot> for ThrottleState {
    fn from(s: &ThrottleSnapshot) -> Self {
        Self { windows: Windows::from_snapshot(&s.windows), tightened: s.tightened.clone() }
    }
}

impl Serialize for ThrottleState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ThrottleState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ThrottleSnapshot::deserialize(d).map(|s| Self::from(&s))
    }
}

impl ThrottleState {
    /// The state as a checkpoint holds it: a copy of what the windows use, not of the table.
    pub fn snapshot(&self) -> ThrottleSnapshot {
        ThrottleSnapshot { windows: self.windows.snapshot(), tightened: self.tightened.clone() }
    }

    /// Bytes of memory the state holds: the windows' slots and entries (every allocated one), the
    /// buffers of windows too large to be held inline, and the tightenings' hash table (allocator
    /// overhead aside).
    pub fn approximate_bytes(&self) -> usize {
        self.windows.approximate_bytes() + self.tightened.capacity() * (size_of::<(Uuid, i64)>() + 1)
    }

    /// Forgets windows no attempt at or after `horizon_ms` can still count in (their newest
    /// attempt is a whole window older), and expired tightenings. Windows judged by
    /// [`ThrottleState::prune_step`] since the last prune are not judged again.
    pub fn prune(&mut self, horizon_ms: i64) {
        self.windows.retain_rest(|_, w| Self::live(&w, horizon_ms));
        self.tightened.retain(|_, until| *until > horizon_ms);
    }

    /// Judges up to `budget` more windows as [`ThrottleState::prune`] does (a prune spread over
    /// the micro-batches before a checkpoint); returns how many are left to judge.
    pub fn prune_step(&mut self, horizon_ms: i64, budget: usize) -> usize {
        self.windows.retain_step(budget, |_, w| Self::live(&w, horizon_ms))
    }

    /// Whether an attempt at or after `horizon_ms` can still count in `w`.
    fn live(w: &WindowRef<'_>, horizon_ms: i64) -> bool {
        w.newest().is_some_and(|t| t > horizon_ms - i64::from(w.window.per_ms))
    }

    /// The state as a checkpoint holds it, its windows through the table's mirror (see
    /// [`Windows::take_snapshot`]).
    pub fn take_snapshot(&mut self) -> ThrottleSnapshot {
        ThrottleSnapshot { windows: self.windows.take_snapshot(), tightened: self.tightened.clone() }
    }

    /// Counts `attempts` in order, as counting them one by one would, with the limits of
    /// requesters tightened after a breach (`tightening`); appends one [`Outcome`] per attempt to
    /// `out`.
    ///
    /// The attempts' windows are looked up a few attempts ahead of the one being counted, in two
    /// steps (the slot, then the entry it points to), so that the cache misses of several attempts
    /// overlap.
    pub fn count_batch(&mut self, attempts: &[Attempt], lateness_ms: i64, tightening: &Tightening, out: &mut Vec<Outcome>) {
        out.reserve(attempts.len());
        // Per attempt in flight, by index modulo RING.
        const RING: usize = (2 * LOOKAHEAD + 1).next_power_of_two();
        let mut hashes = [0u64; RING];
        let mut candidates = [u32::MAX; RING];
        let mut tightened_until = None;
        let cooldown_ms = (tightening.cooldown_s * 1000.0) as i64;
        let n = attempts.len();
        for i in 0..n + 2 * LOOKAHEAD {
            // Step 1: hash, prefetch the home slot.
            if let Some(a) = attempts.get(i) {
                let h = self.windows.hash(&a.key);
                hashes[i % RING] = h;
                candidates[i % RING] = u32::MAX;
                if let Some(s) = self.windows.home_slot(h) {
                    prefetch(bytemuck::bytes_of(s));
                }
            }
            // Step 2: the entry the slot points at, prefetched whole.
            if let Some(j) = i.checked_sub(LOOKAHEAD).filter(|j| *j < n)
                && let Some(c) = self.windows.candidate(hashes[j % RING])
            {
                candidates[j % RING] = c;
                prefetch_entry(self.windows.entry_at(c));
            }
            // Step 3: count.
            let Some(k) = i.checked_sub(2 * LOOKAHEAD).filter(|k| *k < n) else {
                continue;
            };
            let a = &attempts[k];
            let at = match candidates[k % RING] {
                c if c != u32::MAX && self.windows.entry_at(c).key == PackedKey::pack(&a.key) => c,
                _ => self.windows.find_or_insert(&a.key, hashes[k % RING]),
            };
            if a.first_of_attempt {
                tightened_until = match tightening.enabled {
                    true if !self.tightened.is_empty() => self.tightened.get(&a.key.0).copied().filter(|until| a.ts < *until),
                    _ => None,
                };
            }
            let tightenable = matches!(a.key.2, Rule::Requester | Rule::Connect);
            let tightened = tightened_until.filter(|_| tightenable);
            let max = match tightened {
                Some(_) => ((f64::from(a.max) * tightening.factor).floor() as u32).max(1),
                None => a.max,
            };
            let (window, spills) = self.windows.window_mut(at);
            let counted = window.count(spills, a.ts, a.fingerprint, max, a.per_ms, lateness_ms);
            if matches!(counted, Counted::Exceeded(_)) && tightening.enabled && tightenable {
                self.tightened.insert(a.key.0, a.ts + cooldown_ms);
            }
            out.push(Outcome { counted, max, tightened_until: tightened });
        }
    }
}

/// Asks for the cache line of `bytes` (into L2), without waiting for it.
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    polars_utils::mem::prefetch::prefetch_l2(bytes);
}

/// Prefetches the three cache lines of an entry, at places whose address needs no read of the
/// entry: the inline attempts' first and last bytes (which `prefetch` covers in one call), whose
/// lines also hold the key and the window's other fields, and the middle attempt.
#[inline(always)]
fn prefetch_entry(e: &table::Entry) {
    let buf = &e.window.buf;
    prefetch(bytemuck::bytes_of(buf));
    prefetch(bytemuck::bytes_of(&buf[INLINE / 2]));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window with buffers of its own to spill to.
    #[derive(Default)]
    struct Window {
        w: super::Window,
        spills: Spills,
    }

    impl Window {
        fn count(&mut self, ts: i64, fingerprint: u32, max: u32, per_ms: i64, lateness_ms: i64) -> Counted {
            self.w.count(&mut self.spills, ts, fingerprint, max, per_ms, lateness_ms)
        }

        fn seen(&self) -> &[[u32; 2]] {
            self.w.seen(&self.spills)
        }
    }

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
        assert_eq!(w.seen().len(), 5 + 1 + OUT_OF_ORDER_SLACK, "bounded however many arrive");
        let mut w = Window::default();
        for i in 0..100 {
            w.count(i * 10_000, i as u32, 5, 1000, 2_000);
        }
        assert_eq!(w.seen().len(), 1, "a quiet requester keeps what a window and the lateness hold");
        let mut w = Window::default();
        w.count(5_000, 1, 2, 1000, 1000);
        w.count(5_100, 2, 2, 1000, 1000);
        assert_eq!(w.count(4_950, 3, 2, 1000, 1000), Counted::Within, "late: (3950, 4950] holds only itself");
        assert_eq!(w.count(5_150, 4, 2, 1000, 1000), Counted::Exceeded(4), "(4150, 5150] holds all four");
    }

    /// The window as it was before windows were held inline (a `Vec` of attempts per window in a
    /// hash map), to check that the table counts exactly as it did.
    mod reference {
        use super::super::{Counted, OUT_OF_ORDER_SLACK};

        #[derive(Debug, Clone, Default)]
        pub(super) struct Window {
            pub(super) base: i64,
            pub(super) seen: Vec<(u32, u32)>,
            in_episode: bool,
        }

        impl Window {
            pub(super) fn count(&mut self, ts: i64, fingerprint: u32, max: u32, per_ms: i64, lateness_ms: i64) -> Counted {
                let newest = self.seen.last().map(|(o, _)| self.base + i64::from(*o)).map_or(ts, |n| n.max(ts));
                let horizon = newest - per_ms - lateness_ms;
                let base = self.base;
                let expired = self.seen.partition_point(|&(o, _)| base + i64::from(o) <= horizon);
                self.seen.drain(..expired);
                if self.seen.is_empty() || ts < self.base || ts - self.base > i64::from(u32::MAX) {
                    match self.seen.first() {
                        None => self.base = ts,
                        Some(&(first, _)) => {
                            let new_base = ts.min(self.base + i64::from(first));
                            let shift = self.base - new_base;
                            for (o, _) in &mut self.seen {
                                *o = u32::try_from(i64::from(*o) + shift).unwrap_or(u32::MAX);
                            }
                            self.base = new_base;
                        }
                    }
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
        }
    }

    #[test]
    fn windows_count_as_the_reference_in_order_late_repeated_and_spilled() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(4);
        for case in 0..3_000 {
            let max = *[1u32, 2, 5, 10, 11, 12, 20, 60].get(rng.random_range(0..8)).unwrap_or(&10);
            let per_ms = *[1i64, 100, 1000, 40_000].get(rng.random_range(0..4)).unwrap_or(&1000);
            let lateness = *[0i64, 500, 30_000].get(rng.random_range(0..3)).unwrap_or(&0);
            let (mut w, mut r) = (Window::default(), reference::Window::default());
            let mut t = 1_795_539_600_000i64;
            for step in 0..400 {
                // Mostly forward, sometimes late, sometimes a re-delivery, now and then a long pause.
                let ts = match rng.random_range(0..20) {
                    0 => t - rng.random_range(0..=lateness.max(1)),
                    1 => t + rng.random_range(0..10_000_000_000i64),
                    _ => t + rng.random_range(0..per_ms.max(2) / 2 + 1),
                };
                t = t.max(ts);
                let fp = if rng.random_range(0..10) == 0 { rng.random_range(0..4) } else { rng.random() };
                // Tightening varies `max` between counts of one window.
                let m = if rng.random_range(0..8) == 0 { (max / 2).max(1) } else { max };
                let (got, want) = (w.count(ts, fp, m, per_ms, lateness), r.count(ts, fp, m, per_ms, lateness));
                assert_eq!(got, want, "case {case} step {step}");
                let kept: Vec<(u32, u32)> = w.seen().iter().map(|&[o, f]| (o, f)).collect();
                assert_eq!(kept.len(), r.seen.len(), "case {case} step {step}");
            }
        }
    }

    #[test]
    fn batches_count_as_attempts_one_by_one_with_tightening() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(5);
        let tightening = Tightening { enabled: true, factor: 0.5, cooldown_s: 2.0 };
        let lateness = 1_000;
        let mut state = ThrottleState::default();
        let mut windows: std::collections::HashMap<WindowKey, reference::Window> = Default::default();
        let mut tightened: std::collections::HashMap<Uuid, i64> = Default::default();
        let mut t = 1_795_539_600_000i64;
        let mut seen = [0u32; 4];
        for batch in 0..300 {
            // Batches of every size around the lookahead, few requesters (so that one key comes
            // back within the lookahead), each attempt counted against one to three limits.
            let mut attempts = Vec::new();
            for _ in 0..rng.random_range(0..80) {
                t += rng.random_range(0..40);
                let ts = if rng.random_range(0..10) == 0 { t - rng.random_range(0..lateness) } else { t };
                if !attempts.is_empty() && rng.random_range(0..12) == 0 {
                    // A re-delivery.
                    let again: Attempt = attempts[rng.random_range(0..attempts.len())];
                    if again.first_of_attempt {
                        attempts.push(again);
                        continue;
                    }
                }
                let from = Uuid::from_u128(rng.random_range(0..12));
                let fingerprint = rng.random_range(0..1_000);
                let first = if rng.random_range(0..4) == 0 { (Rule::Connect, 2) } else { (Rule::Requester, 10) };
                attempts.push(Attempt {
                    key: (from, Uuid::nil(), first.0),
                    ts,
                    fingerprint,
                    max: first.1,
                    per_ms: 1000,
                    first_of_attempt: true,
                });
                if first.0 == Rule::Requester && rng.random_range(0..2) == 0 {
                    attempts.push(Attempt {
                        key: (from, Uuid::nil(), Rule::Type),
                        ts,
                        fingerprint,
                        max: 30,
                        per_ms: 5000,
                        first_of_attempt: false,
                    });
                }
                if first.0 == Rule::Requester && rng.random_range(0..3) == 0 {
                    let to = Uuid::from_u128(1_000 + rng.random_range(0..3));
                    attempts.push(Attempt {
                        key: (from, to, Rule::Profile(1)),
                        ts,
                        fingerprint,
                        max: 3,
                        per_ms: 1000,
                        first_of_attempt: false,
                    });
                }
            }
            let mut got = Vec::new();
            state.count_batch(&attempts, lateness, &tightening, &mut got);
            // One by one, as the engine's stage did.
            let mut until = None;
            for (i, a) in attempts.iter().enumerate() {
                if a.first_of_attempt {
                    until = tightened.get(&a.key.0).copied().filter(|u| a.ts < *u);
                }
                let tightenable = matches!(a.key.2, Rule::Requester | Rule::Connect);
                let max = match until {
                    Some(_) if tightenable => ((f64::from(a.max) * tightening.factor).floor() as u32).max(1),
                    _ => a.max,
                };
                let counted = windows.entry(a.key).or_default().count(a.ts, a.fingerprint, max, a.per_ms, lateness);
                if matches!(counted, Counted::Exceeded(_)) && tightenable {
                    tightened.insert(a.key.0, a.ts + 2_000);
                }
                let want = Outcome { counted, max, tightened_until: until.filter(|_| tightenable) };
                assert_eq!(got[i], want, "batch {batch} attempt {i}");
                seen[match (counted, want.tightened_until) {
                    (Counted::Repeat, _) => 0,
                    (Counted::Exceeded(_), None) => 1,
                    (Counted::Exceeded(_), Some(_)) => 2,
                    (Counted::Within, _) => 3,
                }] += 1;
            }
            assert_eq!(state.windows.len(), windows.len());
            if batch % 50 == 49 {
                // Pruning, and a checkpoint's round trip, keep counting as before.
                let horizon = t - lateness;
                state.prune(horizon);
                windows.retain(|k, w| {
                    let per_ms = if k.2 == Rule::Type { 5000 } else { 1000 };
                    w.seen.last().is_some_and(|(o, _)| w.base + i64::from(*o) > horizon - per_ms)
                });
                tightened.retain(|_, until| *until > horizon);
                let bytes = postcard::to_stdvec(&state).expect("serializes");
                state = postcard::from_bytes(&bytes).expect("deserializes");
                for (k, w) in state.windows.iter() {
                    assert_eq!(w.kept(), windows[&k].seen.len());
                }
            }
        }
        assert!(seen.iter().all(|n| *n > 20), "repeats, episodes, tightened episodes, within: {seen:?}");
    }

    #[test]
    fn checkpoints_hold_windows_as_little_endian_byte_strings_and_refuse_the_map_format() {
        let mut state = ThrottleState::default();
        let k = (Uuid::from_u128(1), Uuid::from_u128(2), Rule::Profile(3));
        let at = state.windows.find_or_insert(&k, state.windows.hash(&k));
        let (w, spills) = state.windows.window_mut(at);
        w.count(spills, 5_000, 7, 1, 1000, 0);
        w.count(spills, 5_010, 8, 1, 1000, 0);
        state.tightened.insert(Uuid::from_u128(1), 99_000);
        let bytes = postcard::to_stdvec(&state).expect("serializes");
        // The heads: one byte string of one 56-byte head.
        let mut head = vec![56u8];
        head.extend_from_slice(Uuid::from_u128(1).as_bytes());
        head.extend_from_slice(Uuid::from_u128(2).as_bytes());
        head.extend_from_slice(&[4, 0, 3, 0, 1, 0, 0, 0]);
        head.extend_from_slice(&5_000i64.to_le_bytes());
        head.extend_from_slice(&1_000u32.to_le_bytes());
        head.extend_from_slice(&2u32.to_le_bytes());
        // The attempts: one byte string of two `[offset, fingerprint]`.
        let mut attempts = vec![16u8];
        for x in [0u32, 7, 10, 8] {
            attempts.extend_from_slice(&x.to_le_bytes());
        }
        // The tightenings: a map of one (postcard: a length, a 16-byte UUID, a zigzag varint).
        let mut tightened = vec![1u8, 16];
        tightened.extend_from_slice(Uuid::from_u128(1).as_bytes());
        tightened.extend_from_slice(&[0xf0, 0x8a, 0x0c]);
        assert_eq!(bytes, [head, attempts, tightened].concat());
        let back: ThrottleState = postcard::from_bytes(&bytes).expect("deserializes");
        assert_eq!(back.snapshot(), state.snapshot());

        // The map of windows checkpoints held before (format 08) is refused, not misread.
        #[derive(Serialize)]
        struct OldWindow {
            base: i64,
            seen: Vec<(u32, u32)>,
            per_ms: u32,
            in_episode: bool,
        }
        let mut old: FastMap<WindowKey, OldWindow> = FastMap::default();
        old.insert(k, OldWindow { base: 5_000, seen: vec![(0, 7), (10, 8)], per_ms: 1000, in_episode: true });
        let old = postcard::to_stdvec(&(&old, &state.tightened)).expect("serializes");
        assert!(postcard::from_bytes::<ThrottleState>(&old).is_err());
        // Nor is a head that no snapshot writes, or a count of attempts the buffer does not hold.
        let mut bad = bytes.clone();
        bad[1 + 36] = 2;
        assert!(postcard::from_bytes::<ThrottleState>(&bad).is_err(), "an episode flag of 2");
        let mut bad = bytes.clone();
        bad[1 + 52] = 3;
        assert!(postcard::from_bytes::<ThrottleState>(&bad).is_err(), "three attempts kept, two held");
        let mut bad = bytes;
        bad[58..62].copy_from_slice(&20u32.to_le_bytes());
        assert!(postcard::from_bytes::<ThrottleState>(&bad).is_err(), "attempts out of order");
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
