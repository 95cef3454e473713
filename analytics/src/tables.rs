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

    /// Every version of every key, through `f`, in one table (a key's versions together, oldest
    /// first): for checkpoints, whose pause this is, so one allocation for the table rather than
    /// one per key.
    pub fn snapshot<W>(&self, f: impl Fn(&V) -> W) -> TableSnapshot<K, W> {
        let mut rows = Vec::with_capacity(self.map.len());
        for (k, v) in &self.map {
            rows.extend(v.older.iter().map(|(t, value)| (*k, *t, f(value))));
            rows.push((*k, v.newest.0, f(&v.newest.1)));
        }
        TableSnapshot { rows }
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
}
