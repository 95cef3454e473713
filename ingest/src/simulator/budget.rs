//! What each requester may still do without tripping a default throttle or enforcement threshold
//! of the contract, and the index sets traffic is drawn from.
//!
//! It only keeps the bookkeeping the generator consults before it emits an attempt; it never
//! decides labels and never sees JSON.

use meshguard_schemas::Action;
use rand::Rng;
use rand::rngs::SmallRng;

use super::population::Ix;

// The contract's default limits, which generated traffic stays within (windows taken closed,
// `[t − w, t]`, a superset of the contract's `(t − w, t]`).
/// Per-requester throttle: attempts other than `connect` per second.
pub(super) const PER_REQUESTER_MAX: usize = 10;
/// Connect throttle: `connect`s per second.
const CONNECT_MAX: usize = 2;
const THROTTLE_WINDOW_MS: i64 = 1_000;
/// Enforcement blocks at this many unauthorized attempts in the short window.
const BLOCK_AT: usize = 5;
const SHORT_WINDOW_MS: i64 = 10 * 60 * 1_000;
/// Enforcement unregisters past this many in the long window.
const UNREGISTER_PAST: usize = 20;
const LONG_WINDOW_MS: i64 = 24 * 60 * 60 * 1_000;

/// The times of the latest `N` events of one kind, to ask "would one more at `t` stay within a
/// limit?" without keeping whole windows.
#[derive(Debug, Clone)]
struct Ring<const N: usize> {
    ts: [i64; N],
    next: usize,
}

impl<const N: usize> Ring<N> {
    const fn new() -> Self {
        Self { ts: [i64::MIN; N], next: 0 }
    }

    /// With one more event at `t`, at most `max` (≤ N) would lie in `[t − window, t]`.
    fn fits(&self, max: usize, window: i64, t: i64) -> bool {
        // The max-th latest event must be older than the window.
        self.ts[(self.next + N - max) % N] < t.saturating_sub(window)
    }

    fn push(&mut self, t: i64) {
        self.ts[self.next] = t;
        self.next = (self.next + 1) % N;
    }
}

/// What one requester may still do without tripping a throttle or enforcement.
#[derive(Debug, Clone)]
pub(super) struct Budget {
    attempts: Ring<PER_REQUESTER_MAX>,
    connects: Ring<CONNECT_MAX>,
    /// Boxed and lazy: most requesters never offend.
    unauthorized: Option<Box<Ring<UNREGISTER_PAST>>>,
}

impl Budget {
    pub(super) const fn new() -> Self {
        Self { attempts: Ring::new(), connects: Ring::new(), unauthorized: None }
    }

    pub(super) fn may_attempt(&self, action: Action, t: i64) -> bool {
        if action == Action::Connect {
            self.connects.fits(CONNECT_MAX, THROTTLE_WINDOW_MS, t)
        } else {
            self.attempts.fits(PER_REQUESTER_MAX, THROTTLE_WINDOW_MS, t)
        }
    }

    pub(super) fn may_offend(&self, action: Action, t: i64) -> bool {
        self.may_attempt(action, t)
            && self
                .unauthorized
                .as_ref()
                .is_none_or(|r| r.fits(BLOCK_AT - 1, SHORT_WINDOW_MS, t) && r.fits(UNREGISTER_PAST, LONG_WINDOW_MS, t))
    }

    /// No attempt (other than `connect`) within the throttle window before `t`: a flood of the
    /// limit's `max + 1` attempts at `t` makes exactly one episode.
    pub(super) fn is_quiet(&self, t: i64) -> bool {
        self.attempts.fits(1, THROTTLE_WINDOW_MS, t)
    }

    pub(super) fn attempt(&mut self, action: Action, t: i64, unauthorized: bool) {
        if action == Action::Connect {
            self.connects.push(t);
        } else {
            self.attempts.push(t);
        }
        if unauthorized {
            self.unauthorized.get_or_insert_with(|| Box::new(Ring::new())).push(t);
        }
    }
}

/// A set of entity indexes with O(1) insert, remove and uniform pick.
#[derive(Debug, Default)]
pub(super) struct Pool {
    items: Vec<Ix>,
    pos: Vec<u32>,
}

impl Pool {
    pub(super) fn new(universe: usize) -> Self {
        Self { items: Vec::new(), pos: vec![u32::MAX; universe] }
    }

    pub(super) fn insert(&mut self, ix: Ix) {
        if self.pos[ix as usize] == u32::MAX {
            self.pos[ix as usize] = self.items.len() as u32;
            self.items.push(ix);
        }
    }

    pub(super) fn remove(&mut self, ix: Ix) {
        let p = self.pos[ix as usize];
        if p != u32::MAX {
            self.items.swap_remove(p as usize);
            if let Some(&moved) = self.items.get(p as usize) {
                self.pos[moved as usize] = p;
            }
            self.pos[ix as usize] = u32::MAX;
        }
    }

    pub(super) fn pick(&self, rng: &mut SmallRng) -> Option<Ix> {
        (!self.items.is_empty()).then(|| self.items[rng.random_range(0..self.items.len())])
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn limits_count_the_closed_window() {
        let mut r = Ring::<2>::new();
        assert!(r.fits(2, 1_000, 0));
        r.push(0);
        assert!(r.fits(2, 1_000, 0));
        r.push(0);
        assert!(!r.fits(2, 1_000, 0));
        // The window [t − 1000, t] still holds both events at t = 1000...
        assert!(!r.fits(2, 1_000, 1_000));
        // ...and neither after.
        assert!(r.fits(2, 1_000, 1_001));
        assert!(r.fits(1, 1_000, 1_001));
    }

    #[test]
    fn offenders_stop_short_of_a_block() {
        let mut b = Budget::new();
        for k in 0..4 {
            assert!(b.may_offend(Action::Connect, k * 1_000));
            b.attempt(Action::Connect, k * 1_000, true);
        }
        assert!(!b.may_offend(Action::Send, 599_000), "a fifth in 10 minutes would block");
        assert!(b.may_offend(Action::Send, 600_001));
    }

    #[test]
    fn pools_insert_remove_and_pick() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut p = Pool::new(10);
        for ix in [3, 5, 7] {
            p.insert(ix);
        }
        p.insert(5);
        assert_eq!(p.len(), 3);
        p.remove(3);
        p.remove(3);
        assert_eq!(p.len(), 2);
        for _ in 0..50 {
            assert!(matches!(p.pick(&mut rng), Some(5 | 7)));
        }
        p.remove(5);
        p.remove(7);
        assert_eq!(p.pick(&mut rng), None);
    }
}
