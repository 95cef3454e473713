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
    map: FastMap<K, Vec<(i64, V)>>,
}

impl<K, V> Default for VersionedTable<K, V> {
    fn default() -> Self {
        Self { map: FastMap::default() }
    }
}

impl<K: std::hash::Hash + Eq + Copy, V: Clone> VersionedTable<K, V> {
    /// Records that `key` is `value` from `from_ms` on. Versions stay sorted by time; a second
    /// version at the same time replaces the first (the later record wins, as in a compacted topic).
    pub fn insert(&mut self, key: K, from_ms: i64, value: V) {
        let versions = self.map.entry(key).or_default();
        match versions.binary_search_by_key(&from_ms, |(t, _)| *t) {
            Ok(i) => versions[i].1 = value,
            Err(i) => versions.insert(i, (from_ms, value)),
        }
    }

    /// The value of `key` as of `at_ms`: the latest version from at or before `at_ms`.
    #[inline]
    pub fn get(&self, key: &K, at_ms: i64) -> Option<&V> {
        let versions = self.map.get(key)?;
        // Usually one version: check the newest first.
        match versions.last() {
            Some((t, v)) if *t <= at_ms => Some(v),
            _ => versions.iter().rev().find(|(t, _)| *t <= at_ms).map(|(_, v)| v),
        }
    }

    /// The newest value of `key`, whatever its time.
    pub fn latest(&self, key: &K) -> Option<&V> {
        self.map.get(key).and_then(|v| v.last()).map(|(_, v)| v)
    }

    /// Drops versions that no lookup at or after `horizon_ms` can see: for each key, every version
    /// older than the newest one at or before the horizon.
    pub fn prune(&mut self, horizon_ms: i64) {
        for versions in self.map.values_mut() {
            if versions.len() > 1 {
                let keep_from = versions.iter().rposition(|(t, _)| *t <= horizon_ms).unwrap_or(0);
                versions.drain(..keep_from);
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

    /// Every key with its versions, for snapshots.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &[(i64, V)])> {
        self.map.iter().map(|(k, v)| (k, v.as_slice()))
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
    }
}
