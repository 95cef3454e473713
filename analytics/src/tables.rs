//! Global tables: small facts about any UUID (registration, presence), replicated to every worker
//! from their topics, as Kafka Streams' GlobalKTable, and versioned by event time so that a lookup
//! "as of" an attempt's `ts` gives the same answer however the topics' records interleave on
//! arrival (the contract: a registry change applies to attempts with `ts` at or after its Kafka
//! timestamp; presence is the latest by event time).
//!
//! Versions older than what any attempt can still ask for (the engine's horizon) are pruned, so
//! each key usually holds one version.

use serde::{Deserialize, Serialize};

/// hashbrown's default hasher (foldhash): fast on 16-byte keys and seeded per process, so keys an
/// attacker chooses (the `from` of attempts) cannot be crafted into long probe sequences.
pub(crate) type FastMap<K, V> = hashbrown::HashMap<K, V>;

/// A map whose values are shared (`Arc`) with copies of it (a checkpoint's) written as the map of
/// its values, and read back so (`#[serde(with = "crate::tables::shared_values")]`): the wire
/// format is the plain map's. (serde's own `Arc` support is a feature that would rebuild every
/// crate using serde.)
pub(crate) mod shared_values {
    use std::hash::Hash;
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::FastMap;

    pub(crate) fn serialize<K: Serialize, V: Serialize, S: Serializer>(map: &FastMap<K, Arc<V>>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(map.iter().map(|(k, v)| (k, &**v)))
    }

    pub(crate) fn deserialize<'de, K, V, D>(d: D) -> Result<FastMap<K, Arc<V>>, D::Error>
    where
        K: Deserialize<'de> + Hash + Eq,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        let plain = FastMap::<K, V>::deserialize(d)?;
        Ok(plain.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
    }
}

/// A table of `K → V` where every value has the event time from which it holds.
#[derive(Debug, Clone)]
pub struct VersionedTable<K, V> {
    map: FastMap<K, Versions<V>>,
    /// The keys holding older versions, each once: what a prune visits (most keys of a directory
    /// hold one version, and a prune of a million keys at every checkpoint would walk them all).
    historied: Vec<K>,
    /// How far into `historied` the prune in progress has got (see [`VersionedTable::prune_step`]).
    prune_at: usize,
}

/// The versions of one key. The newest is held inline, so the usual lookup (one version, or the
/// newest) reads the map's bucket and nothing else: on a directory of a million UUIDs every extra
/// pointer is a cache miss per attempt.
#[derive(Debug, Clone)]
struct Versions<V> {
    newest: (i64, V),
    /// The latest time the newest value was asserted again ([`VersionedTable::assert`]), at or
    /// after `newest.0`: a different value asserted before it, arriving late, holds only until it.
    newest_seen: i64,
    /// Older versions, oldest first, all before `newest`.
    older: Vec<(i64, V)>,
}

impl<V> Versions<V> {
    fn new(from_ms: i64, value: V) -> Self {
        Self { newest: (from_ms, value), newest_seen: from_ms, older: Vec::new() }
    }

    /// Makes `(from_ms, value)` the newest version, the current one becoming older.
    fn push(&mut self, from_ms: i64, value: V) {
        let previous = std::mem::replace(&mut self.newest, (from_ms, value));
        self.older.push(previous);
        self.newest_seen = from_ms;
    }

    /// See [`VersionedTable::insert`].
    fn insert(&mut self, from_ms: i64, value: V) {
        match from_ms.cmp(&self.newest.0) {
            std::cmp::Ordering::Greater => self.push(from_ms, value),
            std::cmp::Ordering::Equal => {
                self.newest.1 = value;
                self.newest_seen = from_ms;
            }
            std::cmp::Ordering::Less => match self.older.binary_search_by_key(&from_ms, |(t, _)| *t) {
                Ok(i) => self.older[i].1 = value,
                Err(i) => self.older.insert(i, (from_ms, value)),
            },
        }
    }

    /// See [`VersionedTable::assert`].
    fn assert(&mut self, at_ms: i64, value: V)
    where
        V: PartialEq + Clone,
    {
        if at_ms >= self.newest.0 {
            if value == self.newest.1 {
                self.newest_seen = self.newest_seen.max(at_ms);
            } else if at_ms > self.newest_seen {
                self.push(at_ms, value);
            } else if at_ms == self.newest_seen {
                // The same time as the latest observation: the later record wins.
                if at_ms == self.newest.0 {
                    self.newest.1 = value;
                } else {
                    self.push(at_ms, value);
                }
            } else {
                // Inside the newest value's span: `value` from `at_ms`, the newest value again
                // from its latest observation.
                let (seen, newest) = (self.newest_seen, self.newest.1.clone());
                if at_ms == self.newest.0 {
                    self.newest.1 = value;
                } else {
                    self.push(at_ms, value);
                }
                self.push(seen, newest);
            }
            return;
        }
        // Before the newest version: `i` versions of `older` are at or before `at_ms`.
        let i = self.older.partition_point(|(t, _)| *t <= at_ms);
        match i.checked_sub(1) {
            Some(j) if self.older[j].1 == value => {}
            Some(j) if self.older[j].0 == at_ms => self.older[j].1 = value,
            Some(_) => self.older.insert(i, (at_ms, value)),
            None => {
                // Before every version: the first one starts earlier if it holds the same value.
                match self.older.first_mut() {
                    Some(first) if first.1 == value => first.0 = at_ms,
                    Some(_) => self.older.insert(0, (at_ms, value)),
                    None if self.newest.1 == value => self.newest.0 = at_ms,
                    None => self.older.push((at_ms, value)),
                }
            }
        }
    }
}

impl<K, V> Default for VersionedTable<K, V> {
    fn default() -> Self {
        Self { map: FastMap::default(), historied: Vec::new(), prune_at: 0 }
    }
}

impl<K: std::hash::Hash + Eq + Copy, V: Clone> VersionedTable<K, V> {
    /// Records that `key` is `value` from `from_ms` on. A second version at the same time replaces
    /// the first (the later record wins, as in a compacted topic).
    pub fn insert(&mut self, key: K, from_ms: i64, value: V) {
        self.update(key, from_ms, value, Versions::insert);
    }

    /// Records that `key` was observed to be `value` at `at_ms`, for facts that are stated again
    /// and again, most of the time unchanged (a device's location in each of its attempts,
    /// presence): lookups give the latest observation at or before their time, as with
    /// [`VersionedTable::insert`] of every observation, but an observation of the value already
    /// in force adds no version, so a key holds one version per change of its value rather than
    /// one per observation.
    ///
    /// Exact while a key's observations arrive in event-time order. One arriving late with a
    /// different value, inside a span where the newest value was observed before and after it,
    /// holds from its time to the latest observation of the newest value (the ones in between
    /// were not kept); one arriving late with the value already in force at its time adds
    /// nothing, so a different value arriving later still inside that span holds until the next
    /// version.
    pub fn assert(&mut self, key: K, at_ms: i64, value: V)
    where
        V: PartialEq,
    {
        self.update(key, at_ms, value, Versions::assert);
    }

    /// Inserts every row in order ([`VersionedTable::insert`]).
    pub fn insert_rows(&mut self, rows: &[(K, i64, V)]) {
        for (key, t, value) in rows {
            self.insert(*key, *t, value.clone());
        }
    }

    /// Observes every row in order ([`VersionedTable::assert`]): how a snapshot of a table of
    /// observations is read back.
    pub fn assert_rows(&mut self, rows: &[(K, i64, V)])
    where
        V: PartialEq,
    {
        for (key, t, value) in rows {
            self.assert(*key, *t, value.clone());
        }
    }

    /// Gives `key`'s versions to `change` (a new key gets `value` as its only version), and
    /// notes the key for the prune once it holds older versions.
    fn update(&mut self, key: K, at_ms: i64, value: V, change: impl FnOnce(&mut Versions<V>, i64, V)) {
        use hashbrown::hash_map::Entry;
        let v = match self.map.entry(key) {
            Entry::Vacant(e) => {
                e.insert(Versions::new(at_ms, value));
                return;
            }
            Entry::Occupied(e) => e.into_mut(),
        };
        let had_history = !v.older.is_empty();
        change(v, at_ms, value);
        if !had_history && !v.older.is_empty() {
            self.historied.push(key);
        }
    }

    /// The value of `key` as of `at_ms`: the latest version from at or before `at_ms`.
    #[inline]
    pub fn get(&self, key: &K, at_ms: i64) -> Option<&V> {
        let v = self.map.get(key)?;
        if v.newest.0 <= at_ms {
            return Some(&v.newest.1);
        }
        v.older.iter().rev().find(|(t, _)| *t <= at_ms).map(|(_, v)| v)
    }

    /// The newest version of `key` and the time it holds from.
    pub fn newest(&self, key: &K) -> Option<(i64, &V)> {
        self.map.get(key).map(|v| (v.newest.0, &v.newest.1))
    }

    /// The newest value of `key`, whatever its time.
    pub fn latest(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|v| &v.newest.1)
    }

    /// Drops versions that no lookup at or after `horizon_ms` can see: for each key, every version
    /// older than the newest one at or before the horizon. Finishes a prune begun by
    /// [`VersionedTable::prune_step`]: the keys it visited are not visited again (they kept what
    /// its horizon, an earlier one, left them: the same lookups at or after `horizon_ms`).
    pub fn prune(&mut self, horizon_ms: i64) {
        self.prune_step(horizon_ms, usize::MAX);
        self.prune_at = 0;
    }

    /// Prunes up to `budget` of the keys holding older versions, from where the last step stopped,
    /// as [`VersionedTable::prune`] does (a prune spread over several calls between micro-batches,
    /// finished by it); returns how many are left to visit.
    pub fn prune_step(&mut self, horizon_ms: i64, budget: usize) -> usize {
        let mut i = self.prune_at.min(self.historied.len());
        for _ in 0..budget {
            let Some(key) = self.historied.get(i) else {
                break;
            };
            let history = self.map.get_mut(key).is_some_and(|v| {
                if v.newest.0 <= horizon_ms {
                    v.older.clear();
                } else if let Some(keep_from) = v.older.iter().rposition(|(t, _)| *t <= horizon_ms) {
                    v.older.drain(..keep_from);
                }
                !v.older.is_empty()
            });
            if history {
                i += 1;
            } else {
                // The last key takes its place, and is visited next.
                self.historied.swap_remove(i);
            }
        }
        self.prune_at = i;
        self.historied.len() - i
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every version of every key, through `f`, in one table (a key's versions together, oldest
    /// first): for checkpoints, whose pause this is, so one allocation for the table rather than
    /// one per key.
    pub fn snapshot<W>(&self, f: impl Fn(&V) -> W) -> TableSnapshot<K, W> {
        let mut rows = Vec::with_capacity(self.map.len());
        for (k, v) in &self.map {
            rows.extend(v.older.iter().map(|(t, value)| (*k, *t, f(value))));
            rows.push((*k, v.newest.0, f(&v.newest.1)));
            // The newest value's latest observation, as a second row of the same value: restored
            // through `assert`, the two rows make the same version (a table written by `insert`
            // alone has none).
            if v.newest_seen > v.newest.0 {
                rows.push((*k, v.newest_seen, f(&v.newest.1)));
            }
        }
        TableSnapshot { rows }
    }

    /// Number of versions over all keys (what a snapshot copies).
    pub fn versions(&self) -> usize {
        self.map.values().map(|v| 1 + v.older.len()).sum()
    }
}

/// A table's versions, as checkpoints hold them: one row per version, a key's versions together
/// and oldest first. Written as `(key, [(from, value)])` pairs, one per key.
#[derive(Debug, Clone)]
pub struct TableSnapshot<K, V> {
    /// `(key, from, value)`.
    pub rows: Vec<(K, i64, V)>,
}

impl<K, V> Default for TableSnapshot<K, V> {
    fn default() -> Self {
        Self { rows: Vec::new() }
    }
}

impl<K: Serialize + PartialEq, V: Serialize> Serialize for TableSnapshot<K, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let keys = self.rows.chunk_by(|a, b| a.0 == b.0);
        let mut seq = serializer.serialize_seq(Some(keys.clone().count()))?;
        for versions in keys {
            seq.serialize_element(&(&versions[0].0, KeyVersions(versions)))?;
        }
        seq.end()
    }
}

/// One key's versions, written as `[(from, value)]`.
struct KeyVersions<'a, K, V>(&'a [(K, i64, V)]);

impl<K, V: Serialize> Serialize for KeyVersions<'_, K, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(_, from, value)| (from, value)))
    }
}

impl<'de, K: Deserialize<'de> + Copy, V: Deserialize<'de>> Deserialize<'de> for TableSnapshot<K, V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let keys = Vec::<(K, Vec<(i64, V)>)>::deserialize(deserializer)?;
        Ok(Self { rows: keys.into_iter().flat_map(|(k, versions)| versions.into_iter().map(move |(from, v)| (k, from, v))).collect() })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn snapshots_hold_every_version_and_are_written_as_one_entry_per_key() {
        let mut t = VersionedTable::<u8, u32>::default();
        t.insert(1, 20, 200);
        t.insert(1, 10, 100);
        t.insert(2, 5, 50);
        let snapshot = t.snapshot(|v| v + 1);
        let mut rows = snapshot.rows.clone();
        rows.sort_unstable();
        assert_eq!(rows, [(1, 10, 101), (1, 20, 201), (2, 5, 51)]);
        // The format checkpoints have always had: (key, [(from, value)]) per key, oldest first.
        let mut per_key: Vec<(u8, Vec<(i64, u32)>)> = Vec::new();
        for (k, from, v) in &snapshot.rows {
            match per_key.last_mut() {
                Some((last, versions)) if last == k => versions.push((*from, *v)),
                _ => per_key.push((*k, vec![(*from, *v)])),
            }
        }
        assert_eq!(per_key.len(), 2, "one entry per key");
        let bytes = postcard::to_stdvec(&snapshot).unwrap();
        assert_eq!(bytes, postcard::to_stdvec(&per_key).unwrap());
        let back: TableSnapshot<u8, u32> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.rows, snapshot.rows);
    }

    #[test]
    fn lookups_are_as_of_event_time_whatever_the_arrival_order() {
        let mut t = VersionedTable::<u8, &str>::default();
        t.insert(1, 100, "b");
        t.insert(1, 50, "a");
        t.insert(1, 200, "c");
        assert_eq!(t.get(&1, 49), None);
        assert_eq!(t.get(&1, 50), Some(&"a"));
        assert_eq!(t.get(&1, 199), Some(&"b"));
        assert_eq!(t.get(&1, 200), Some(&"c"));
        assert_eq!(t.latest(&1), Some(&"c"));
        t.insert(1, 200, "c2");
        assert_eq!(t.get(&1, 500), Some(&"c2"), "same time: the later record wins");
    }

    #[test]
    fn prune_keeps_what_lookups_after_the_horizon_see() {
        let mut t = VersionedTable::<u8, u8>::default();
        for (ts, v) in [(10, 1), (20, 2), (30, 3)] {
            t.insert(7, ts, v);
        }
        t.prune(25);
        assert_eq!(t.get(&7, 25), Some(&2));
        assert_eq!(t.get(&7, 30), Some(&3));
        assert_eq!(t.get(&7, 15), None, "pruned");
        t.prune(5);
        assert_eq!(t.get(&7, 25), Some(&2), "pruning before every version keeps them all");
        t.prune(100);
        assert_eq!(t.get(&7, 30), Some(&3));
        assert_eq!(t.get(&7, 25), None, "only the newest is left");
        assert_eq!(t.snapshot(|v| *v).rows, [(7, 30, 3)]);
    }

    /// Lookups at every time of interest, from before the first observation to after the last.
    fn lookups(t: &VersionedTable<u8, u8>, times: impl Iterator<Item = i64>) -> Vec<Option<u8>> {
        times.map(|at| t.get(&0, at).copied()).collect()
    }

    proptest::proptest! {
        /// In event-time order (ties included), `assert` answers every lookup as `insert` of every
        /// observation does, with one version per change of value.
        #[test]
        fn observations_in_order_answer_as_if_each_were_kept_with_a_version_per_change(
            steps in proptest::collection::vec((0i64..3, 0u8..3), 1..60),
        ) {
            let (mut every, mut changes) = (VersionedTable::<u8, u8>::default(), VersionedTable::<u8, u8>::default());
            let mut at = 1_000;
            let mut values = 0;
            let mut last = None;
            for (gap, value) in steps {
                at += gap;
                every.insert(0, at, value);
                changes.assert(0, at, value);
                values += usize::from(last != Some(value));
                last = Some(value);
            }
            proptest::prop_assert_eq!(lookups(&changes, 990..at + 5), lookups(&every, 990..at + 5));
            // Ties can replace a value at its own time, so changes are at most the observed runs.
            proptest::prop_assert!(changes.versions() <= values, "{} versions for {} runs", changes.versions(), values);
        }

        /// Whatever the arrival order, a snapshot restored through `assert` answers as the table.
        #[test]
        fn a_snapshot_restored_through_assert_answers_as_the_table(
            steps in proptest::collection::vec((0i64..40, 0u8..3), 1..40),
        ) {
            let mut t = VersionedTable::<u8, u8>::default();
            for (at, value) in steps {
                t.assert(0, 1_000 + at, value);
            }
            let mut back = VersionedTable::<u8, u8>::default();
            for (k, at, value) in t.snapshot(|v| *v).rows {
                back.assert(k, at, value);
            }
            proptest::prop_assert_eq!(lookups(&back, 990..1_050), lookups(&t, 990..1_050));
            // Restoring merges neighbours of one value that a late observation left apart.
            proptest::prop_assert!(back.versions() <= t.versions());
        }
    }

    #[test]
    fn repeated_observations_keep_one_version_and_a_late_change_holds_until_the_newest_is_seen_again() {
        let mut t = VersionedTable::<u8, &str>::default();
        for at in (100..=1_000).step_by(100) {
            t.assert(0, at, "home");
        }
        assert_eq!(t.versions(), 1, "ten observations of one value are one version");
        assert_eq!(t.get(&0, 99), None);
        assert_eq!(t.get(&0, 100), Some(&"home"));
        // Late: "away" at 450, between observations of "home" (the last at 1,000).
        t.assert(0, 450, "away");
        assert_eq!(t.get(&0, 449), Some(&"home"));
        assert_eq!(t.get(&0, 450), Some(&"away"));
        assert_eq!(t.get(&0, 1_000), Some(&"home"), "home was seen again at 1,000");
        // Later in order: a change, then the old value again.
        t.assert(0, 1_100, "away");
        t.assert(0, 1_200, "home");
        assert_eq!(t.get(&0, 1_150), Some(&"away"));
        assert_eq!(t.get(&0, 1_250), Some(&"home"));
        // Late, before every version, with the first one's value: that version starts earlier.
        let before = t.versions();
        t.assert(0, 50, "home");
        assert_eq!((t.get(&0, 50), t.versions()), (Some(&"home"), before));
        // Late, with the value already in force at its time: nothing to add.
        t.assert(0, 1_120, "away");
        assert_eq!(t.versions(), before);
        // Late at the time of a version, with another value: the later record wins.
        t.assert(0, 1_100, "lost");
        assert_eq!(t.get(&0, 1_100), Some(&"lost"));
    }

    #[test]
    fn a_prune_visits_the_keys_with_history_and_only_those_and_again_when_they_gain_more() {
        let mut t = VersionedTable::<u32, u8>::default();
        for k in 0..1_000 {
            t.insert(k, 10, 1);
        }
        for k in 0..10 {
            t.insert(k, 20, 2);
            t.assert(k, 30, 3);
        }
        t.assert(10, 5, 0);
        assert_eq!((t.versions(), t.historied.len()), (1_021, 11));
        t.prune(25);
        // Keys 0..10 keep the version in force at 25 and the newest; key 10 only its newest.
        assert_eq!((t.versions(), t.historied.len()), (1_010, 10));
        assert_eq!((t.get(&3, 25), t.get(&3, 30), t.get(&10, 10)), (Some(&2), Some(&3), Some(&1)));
        t.prune(100);
        assert_eq!((t.versions(), t.historied.len()), (1_000, 0));
        // History again after a prune left one version: visited again.
        t.insert(3, 200, 4);
        t.prune(300);
        assert_eq!((t.versions(), t.historied.len(), t.get(&3, 300)), (1_000, 0, Some(&4)));
    }

    proptest::proptest! {
        /// A prune in steps of any budget, spread over rounds in which versions arrive (late ones
        /// included) and the horizon moves on, finished every other round by a prune: every lookup
        /// at or after the horizon answers as in a table never pruned, and a finished prune keeps
        /// at least what one prune at its horizon keeps (steps used earlier horizons) and no more
        /// than was there.
        #[test]
        fn a_prune_in_steps_answers_as_one_prune(
            rounds in proptest::collection::vec(
                (proptest::collection::vec((0u8..12, 0i64..100, 0u8..3), 0..30), 0usize..8, 0i64..10),
                1..12,
            ),
        ) {
            let (mut stepped, mut whole, mut never) =
                (VersionedTable::<u8, u8>::default(), VersionedTable::<u8, u8>::default(), VersionedTable::<u8, u8>::default());
            let mut horizon = 0;
            for (round, (writes, budget, advance)) in rounds.into_iter().enumerate() {
                let base = round as i64 * 10;
                for (key, at, value) in writes {
                    for t in [&mut stepped, &mut whole, &mut never] {
                        t.assert(key, base + at, value);
                    }
                }
                stepped.prune_step(horizon, budget);
                horizon += advance;
                if round % 2 == 1 {
                    stepped.prune(horizon);
                    whole.prune(horizon);
                    proptest::prop_assert!(whole.versions() <= stepped.versions() && stepped.versions() <= never.versions());
                }
                for key in 0..12 {
                    for at in horizon..base + 110 {
                        proptest::prop_assert_eq!(stepped.get(&key, at), never.get(&key, at), "key {} at {}", key, at);
                    }
                }
            }
        }
    }
}
