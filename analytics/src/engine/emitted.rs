//! The ids a partition emitted within the dedup horizon, by minute of event time.
//!
//! At 1,600 findings a second and a ten-minute horizon a partition remembers about a million ids,
//! and every checkpoint takes a copy of them in the pipeline's pause. Kept in one bucket per
//! minute of event time, each shared (`Arc`) with the checkpoints that hold it, a checkpoint's copy
//! is a handful of pointers; the pipeline copies a bucket only when it adds to one a checkpoint
//! still holds (the current minute's, once per checkpoint), and the prune drops whole minutes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tables::FastMap;

/// Length of a bucket, in ms of event time.
const BUCKET_MS: i64 = 60_000;

/// Ids with their event time; an id is in one bucket at most.
#[derive(Debug, Clone, Default)]
pub struct EmittedIds {
    /// `(minute, ids of events in that minute)`, in minute order.
    buckets: Vec<(i64, Arc<FastMap<Uuid, i64>>)>,
}

impl EmittedIds {
    /// Whether `id` was emitted (at any time still remembered).
    pub fn contains_key(&self, id: &Uuid) -> bool {
        self.buckets.iter().rev().any(|(_, b)| b.contains_key(id))
    }

    /// Remembers `id`, emitted for an event at `ts`; returns the event time it was remembered
    /// with if it already was (and then changes nothing).
    pub fn insert(&mut self, id: Uuid, ts: i64) -> Option<i64> {
        if let Some(seen) = self.buckets.iter().rev().find_map(|(_, b)| b.get(&id)) {
            return Some(*seen);
        }
        let minute = ts.div_euclid(BUCKET_MS);
        let at = match self.buckets.binary_search_by_key(&minute, |(m, _)| *m) {
            Ok(at) => at,
            Err(at) => {
                self.buckets.insert(at, (minute, Arc::default()));
                at
            }
        };
        Arc::make_mut(&mut self.buckets[at].1).insert(id, ts);
        None
    }

    /// Forgets the ids of events before `keep_after`, by whole minutes: an id may be remembered
    /// up to a minute longer.
    pub fn prune(&mut self, keep_after: i64) {
        let first_kept = keep_after.div_euclid(BUCKET_MS);
        self.buckets.retain(|(minute, _)| *minute >= first_kept);
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|(_, b)| b.len()).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|(_, b)| b.is_empty())
    }

    /// Every id with its event time.
    pub fn iter(&self) -> impl Iterator<Item = (&Uuid, &i64)> {
        self.buckets.iter().flat_map(|(_, b)| b.iter())
    }
}

impl PartialEq for EmittedIds {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(id, ts)| other.buckets.iter().any(|(_, b)| b.get(id) == Some(ts)))
    }
}

/// Written as a map of id to event time, as checkpoints always held it.
impl Serialize for EmittedIds {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (id, ts) in self.iter() {
            map.serialize_entry(id, ts)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for EmittedIds {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(FastMap::<Uuid, i64>::deserialize(deserializer)?.into_iter().collect())
    }
}

impl FromIterator<(Uuid, i64)> for EmittedIds {
    fn from_iter<I: IntoIterator<Item = (Uuid, i64)>>(iter: I) -> Self {
        let mut ids = Self::default();
        for (id, ts) in iter {
            ids.insert(id, ts);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const T0: i64 = 1_795_539_600_000;

    #[test]
    fn an_id_is_a_repeat_whatever_the_event_time_it_comes_with() {
        let mut ids = EmittedIds::default();
        let id = Uuid::from_u128(7);
        assert_eq!(ids.insert(id, T0), None);
        assert_eq!(ids.insert(id, T0), Some(T0));
        assert_eq!(ids.insert(id, T0 + 5 * BUCKET_MS), Some(T0), "the same id in another minute is a repeat too");
        assert!(ids.contains_key(&id) && !ids.contains_key(&Uuid::from_u128(8)));
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn a_copy_shares_the_minutes_and_is_not_changed_by_later_inserts() {
        let mut ids = EmittedIds::default();
        for i in 0..1_000u32 {
            ids.insert(Uuid::from_u128(u128::from(i)), T0 + i64::from(i) * 1_000);
        }
        let copy = ids.clone();
        assert!(ids.buckets.iter().zip(&copy.buckets).all(|(a, b)| Arc::ptr_eq(&a.1, &b.1)), "a copy is the buckets' pointers");
        ids.insert(Uuid::from_u128(5_000), T0 + 999_000);
        assert_eq!((ids.len(), copy.len()), (1_001, 1_000));
        assert!(!copy.contains_key(&Uuid::from_u128(5_000)));
        // Only the minute added to was copied.
        let shared = ids.buckets.iter().zip(&copy.buckets).filter(|(a, b)| Arc::ptr_eq(&a.1, &b.1)).count();
        assert_eq!(shared, copy.buckets.len() - 1);
    }

    #[test]
    fn the_prune_drops_whole_minutes_before_the_horizon() {
        let mut ids: EmittedIds = (0..10).map(|m| (Uuid::from_u128(m as u128), T0 + m * BUCKET_MS + 30_000)).collect();
        ids.prune(T0 + 4 * BUCKET_MS + 45_000);
        let mut kept: Vec<u128> = ids.iter().map(|(id, _)| id.as_u128()).collect();
        kept.sort_unstable();
        // Minute 4's id (at 4:30) is before the horizon (4:45) but shares its minute: kept.
        assert_eq!(kept, [4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn written_as_the_map_checkpoints_always_held() {
        let map: FastMap<Uuid, i64> = (0..100).map(|i| (Uuid::from_u128(i), T0 + i as i64 * 20_000)).collect();
        let ids: EmittedIds = map.clone().into_iter().collect();
        let bytes = postcard::to_stdvec(&ids).unwrap();
        let back: FastMap<Uuid, i64> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, map);
        let again: EmittedIds = postcard::from_bytes(&postcard::to_stdvec(&map).unwrap()).unwrap();
        assert_eq!(again, ids);
    }
}
