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

/// A table of `K → V` where every value has the event time from which it holds.
#[derive(Debug, Clone)]
pub struct VersionedTable<K, V> {
    map: FastMap<K, Versions<V>>,
}

/// The versions of one key. The newest is held inline, so the usual lookup (one version, or the
/// newest) reads the map's bucket and nothing else: on a directory of a million UUIDs every extra
/// pointer is a cache miss per attempt.
#[derive(Debug, Clone)]
struct Versions<V> {
    newest: (i64, V),
    /// Older versions, oldest first, all before `newest`.
    older: Vec<(i64, V)>,
}

impl<K, V> Default for VersionedTable<K, V> {
    fn default() -> Self {
        Self { map: FastMap::default() }
    }
}

impl<K: std::hash::Hash + Eq + Copy, V: Clone> VersionedTable<K, V> {
    /// Records that `key` is `value` from `from_ms` on. A second version at the same time replaces
    /// the first (the later record wins, as in a compacted topic).
    pub fn insert(&mut self, key: K, from_ms: i64, value: V) {
        use hashbrown::hash_map::Entry;
        let v = match self.map.entry(key) {
            Entry::Vacant(e) => {
                e.insert(Versions { newest: (from_ms, value), older: Vec::new() });
                return;
            }
            Entry::Occupied(e) => e.into_mut(),
        };
        match from_ms.cmp(&v.newest.0) {
            std::cmp::Ordering::Greater => {
                let previous = std::mem::replace(&mut v.newest, (from_ms, value));
                v.older.push(previous);
            }
            std::cmp::Ordering::Equal => v.newest.1 = value,
            std::cmp::Ordering::Less => match v.older.binary_search_by_key(&from_ms, |(t, _)| *t) {
                Ok(i) => v.older[i].1 = value,
                Err(i) => v.older.insert(i, (from_ms, value)),
            },
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
    /// older than the newest one at or before the horizon.
    pub fn prune(&mut self, horizon_ms: i64) {
        for v in self.map.values_mut() {
            if v.older.is_empty() {
                continue;
            }
            if v.newest.0 <= horizon_ms {
                v.older.clear();
            } else if let Some(keep_from) = v.older.iter().rposition(|(t, _)| *t <= horizon_ms) {
                v.older.drain(..keep_from);
            }
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every key with its versions, oldest first, for snapshots.
    pub fn iter(&self) -> impl Iterator<Item = (&K, Vec<(i64, V)>)> {
        self.map.iter().map(|(k, v)| (k, v.older.iter().chain(std::iter::once(&v.newest)).cloned().collect()))
    }
}

/// Serialized form of a table: `(key, versions)` pairs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableSnapshot<K, V> {
    /// Every key with its versions, oldest first.
    pub entries: Vec<(K, Vec<(i64, V)>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(t.iter().map(|(_, v)| v).collect::<Vec<_>>(), vec![vec![(30, 3)]]);
    }
}
