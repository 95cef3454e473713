//! The index the engine's large keyed tables (throttle windows, timing schedules) keep over their
//! rows: 8-byte slots, open addressing with linear probing, no tombstones.
//!
//! A slot is `0` when empty, else `(high 32 bits of the key's hash) << 32 | (row + 1)`, so a row's
//! address is known from its slot alone, before its key is compared: the tables hash a batch's keys
//! and prefetch their home slots ([`SlotIndex::home`]) a few rows ahead, then the rows the slots name
//! ([`SlotIndex::candidate`]), so that the cache misses of several lookups overlap. The tables keep
//! the keys in their rows and compare them in full ([`SlotIndex::find`]): two keys whose hashes
//! collide are two rows, never one. The slots are in memory advised for huge pages (see `huge`).
//!
//! The table decides how full the index may get and calls [`SlotIndex::resize`]; growing or
//! shrinking never hashes a key again (the slots keep their hash bits).

use crate::huge::HugeArray;

/// See the module's documentation.
#[derive(Clone, Default)]
pub(crate) struct SlotIndex {
    /// Empty, or a power of two.
    slots: HugeArray<u64>,
}

/// The part of a hash a slot keeps (and the home slot is taken from).
#[inline]
pub(crate) fn tag(hash: u64) -> u64 {
    hash >> 32
}

impl SlotIndex {
    /// Number of slots (empty or a power of two).
    #[inline]
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Bytes the slots take.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.bytes()
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// The slot a probe for `hash` starts at (to prefetch before probing).
    #[inline]
    pub(crate) fn home(&self, hash: u64) -> Option<&u64> {
        self.slots.get(tag(hash) as usize & self.mask())
    }

    /// The row of the first slot carrying `hash`'s tag, without comparing keys: almost always the
    /// key's own row, to be checked against the key before use.
    #[inline]
    pub(crate) fn candidate(&self, hash: u64) -> Option<u32> {
        self.find(hash, |_| true)
    }

    /// The first row carrying `hash`'s tag for which `holds` (the row holds the key) is true.
    #[inline]
    pub(crate) fn find(&self, hash: u64, mut holds: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let (mask, t) = (self.mask(), tag(hash));
        let mut i = t as usize & mask;
        loop {
            let s = self.slots[i];
            if s == 0 {
                return None;
            }
            let row = (s as u32).wrapping_sub(1);
            if s >> 32 == t && holds(row) {
                return Some(row);
            }
            i = (i + 1) & mask;
        }
    }

    /// Indexes `row` under `hash`. The index must have an empty slot (the table keeps it from
    /// filling) and `row` must be below `u32::MAX`.
    #[inline]
    pub(crate) fn insert(&mut self, hash: u64, row: u32) {
        self.place(tag(hash) << 32 | (u64::from(row) + 1));
    }

    /// Puts a slot value in the first empty slot of its probe sequence.
    fn place(&mut self, slot: u64) {
        let mask = self.mask();
        let mut i = (slot >> 32) as usize & mask;
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = slot;
    }

    /// Re-lays the slots in `n` slots (a power of two, more than the rows indexed).
    pub(crate) fn resize(&mut self, n: usize) {
        let old = std::mem::replace(&mut self.slots, HugeArray::zeroed(n));
        for &s in old.iter().filter(|s| **s != 0) {
            self.place(s);
        }
    }

    /// Re-lays the slots in fewer once `rows` (the rows indexed) fill at most an eighth of them:
    /// in the fewest, a power of two and at least 16, that the rows fill at most half of.
    pub(crate) fn shrink(&mut self, rows: usize) {
        let want = (rows * 2).next_power_of_two().max(16);
        if want * 4 <= self.slots.len() {
            self.resize(want);
        }
    }

    /// The slot that names `row` (indexed under `hash`).
    fn slot_of(&self, hash: u64, row: u32) -> usize {
        let mask = self.mask();
        let mut at = tag(hash) as usize & mask;
        while self.slots[at] as u32 != row + 1 {
            at = (at + 1) & mask;
        }
        at
    }

    /// Takes `row` (indexed under `hash`) out of the index, moving back the slots after it that
    /// its emptied slot would cut off from their home (backward-shift deletion: no tombstones).
    pub(crate) fn remove(&mut self, hash: u64, row: u32) {
        let mask = self.mask();
        let at = self.slot_of(hash, row);
        self.slots[at] = 0;
        let mut hole = at;
        let mut j = (at + 1) & mask;
        loop {
            let s = self.slots[j];
            if s == 0 {
                return;
            }
            let home = (s >> 32) as usize & mask;
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.slots[hole] = s;
                self.slots[j] = 0;
                hole = j;
            }
            j = (j + 1) & mask;
        }
    }

    /// Points the slot of row `from` (indexed under `hash`) at row `to`: the row moved.
    pub(crate) fn renumber(&mut self, hash: u64, from: u32, to: u32) {
        let at = self.slot_of(hash, from);
        self.slots[at] = (self.slots[at] & !0xffff_ffff) | (u64::from(to) + 1);
    }

    /// Checks the index against a table of `rows` rows whose row `i` hashes to `hash_of(i)`:
    /// a power of two (or empty), one slot per row, each tagged with its row's hash and reachable
    /// from its home without crossing an empty slot. For tests of the tables.
    #[cfg(test)]
    pub(crate) fn check(&self, rows: usize, hash_of: impl Fn(u32) -> u64) {
        assert!(self.slots.is_empty() || self.slots.len().is_power_of_two(), "{} slots", self.slots.len());
        let mask = self.mask();
        let mut pointed = vec![false; rows];
        for (at, &s) in self.slots.iter().enumerate().filter(|(_, s)| **s != 0) {
            let i = (s as u32).wrapping_sub(1) as usize;
            assert!(i < rows, "slot {at} points past the rows");
            assert!(!std::mem::replace(&mut pointed[i], true), "two slots point at row {i}");
            assert_eq!(s >> 32, tag(hash_of(i as u32)), "slot {at}'s tag");
            let mut j = (s >> 32) as usize & mask;
            while j != at {
                assert_ne!(self.slots[j], 0, "slot {at} cut off from its home");
                j = (j + 1) & mask;
            }
        }
        assert!(pointed.iter().all(|p| *p), "a row without a slot");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Inserts, lookups, removals (backward shifts across the slots' end among them), renumbering
    /// and resizes against a map, with hashes chosen to collide on their home slots.
    #[test]
    fn the_index_agrees_with_a_map_through_collisions_removals_and_resizes() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};

        let mut rng = SmallRng::seed_from_u64(5);
        let mut index = SlotIndex::default();
        // Row i's hash; rows are kept dense (0..n) as the tables keep them, moving the last into a hole.
        let mut hashes: Vec<u64> = Vec::new();
        for round in 0..200 {
            let grow = rng.random_range(0..300);
            for _ in 0..grow {
                if (hashes.len() + 1) * 2 > index.capacity() {
                    index.resize((index.capacity() * 2).max(16));
                }
                // Few distinct homes and some equal tags: long probe runs that wrap around.
                let hash = if rng.random_bool(0.5) { (u64::MAX - rng.random_range(0..8u64)) << 32 } else { rng.random() };
                index.insert(hash, hashes.len() as u32);
                hashes.push(hash);
            }
            for _ in 0..rng.random_range(0..=hashes.len()) {
                let row = rng.random_range(0..hashes.len()) as u32;
                index.remove(hashes[row as usize], row);
                let last = hashes.len() as u32 - 1;
                if row != last {
                    index.renumber(hashes[last as usize], last, row);
                }
                hashes.swap_remove(row as usize);
            }
            if round % 7 == 0 {
                let before = index.capacity();
                index.shrink(hashes.len());
                assert!(index.capacity() <= before && hashes.len() * 2 <= index.capacity(), "round {round}: shrunk at most to half full");
            }
            index.check(hashes.len(), |i| hashes[i as usize]);
            for (row, &hash) in hashes.iter().enumerate() {
                assert_eq!(index.find(hash, |r| r == row as u32), Some(row as u32), "round {round}");
                let candidate = index.candidate(hash).unwrap();
                assert_eq!(tag(hashes[candidate as usize]), tag(hash), "a candidate carries the tag");
            }
            assert_eq!(index.find(0x1234_5678_9abc_def0, |_| true).is_some(), hashes.iter().any(|h| tag(*h) == 0x1234_5678));
        }
    }
}
