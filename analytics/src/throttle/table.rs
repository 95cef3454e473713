//! The table of a partition's throttle windows: an index of 8-byte slots (open addressing, linear
//! probing, [`SlotIndex`]) over a slab of fixed-size entries, each holding its key and its window
//! inline.
//!
//! Why not a `HashMap<Key, Window>`: with a million active keys an attempt's lookup is a cache
//! miss per pointer it follows, and a map of windows holding a heap buffer follows three (control
//! bytes, bucket, buffer), one after the other. Here the slot holds 32 bits of the key's hash and
//! the entry's index, so the entry's address is known from the slot alone, before the key is
//! compared: a batch hashes its keys and prefetches their slots a few attempts ahead, then their
//! entries, then counts, and the misses of several attempts overlap instead of adding up. Slots and
//! entries are plain integers in memory advised for huge pages (see `huge`), so that a lookup's
//! address translation does not cost a page walk of its own. Keys are always compared in full
//! before a window is used: two keys whose hashes collide are two entries, never one count.
//!
//! The hash is the process-seeded one of hashbrown's maps (foldhash), so requesters cannot choose
//! UUIDs that pile up on one probe sequence.

use std::hash::BuildHasher;

use bytemuck::{Pod, Zeroable};
use hashbrown::DefaultHashBuilder;
use uuid::Uuid;

use super::snapshot::{Head, WindowsMirror, WindowsSnapshot};
use super::{INLINE, Rule, Spills, Window, WindowKey, WindowRef};
use crate::huge::{DirtyRows, HugeArray, MirrorSlot, fresh_epoch, grown_len};
use crate::slot_index::SlotIndex;

/// Entries per slab chunk: 6 MiB, three huge pages. A chunk is allocated whole (but the first,
/// which grows as a `Vec` would, so that a small table stays small), so the slab never moves
/// entries as it grows.
const CHUNK_BITS: u32 = 15;
const CHUNK: usize = 1 << CHUNK_BITS;

/// A window's key as an entry holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub(super) struct PackedKey {
    requester: [u8; 16],
    target: [u8; 16],
    /// The rule's variant and its profile number.
    rule: [u16; 2],
}

impl PackedKey {
    #[inline]
    pub(super) fn pack(k: &WindowKey) -> Self {
        let rule = match k.2 {
            Rule::Requester => [0, 0],
            Rule::Connect => [1, 0],
            Rule::Type => [2, 0],
            Rule::Manufacturer => [3, 0],
            Rule::Profile(n) => [4, n],
        };
        Self { requester: *k.0.as_bytes(), target: *k.1.as_bytes(), rule }
    }

    pub(super) fn unpack(&self) -> WindowKey {
        let rule = match self.rule {
            [0, _] => Rule::Requester,
            [1, _] => Rule::Connect,
            [2, _] => Rule::Type,
            [3, _] => Rule::Manufacturer,
            [_, n] => Rule::Profile(n),
        };
        (Uuid::from_bytes(self.requester), Uuid::from_bytes(self.target), rule)
    }
}

/// One key and its window: three cache lines, aligned to them.
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
pub(super) struct Entry {
    pub(super) key: PackedKey,
    _pad: u32,
    pub(super) window: Window,
}

/// The windows of one partition by key.
#[derive(Clone, Default)]
pub struct Windows {
    hasher: DefaultHashBuilder,
    /// The index over the entries: at most three quarters full.
    slots: SlotIndex,
    /// The entries, `CHUNK` per chunk (the first may be smaller while it is the only one), the
    /// first `len` in use.
    chunks: Vec<HugeArray<Entry>>,
    len: usize,
    /// The attempts of windows too large to be held inline.
    spills: Spills,
    /// Entries written since the checkpoint mirror was last brought up to date (see
    /// [`Windows::mirror_step`]).
    dirty: DirtyRows,
    /// The checkpoint mirror.
    mirror: MirrorSlot<WindowsMirror>,
    /// Where the prune in progress has got to (see [`Windows::retain_step`]).
    prune_at: usize,
}

impl std::fmt::Debug for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Windows {
    /// Keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the table holds: the slots, every chunk of entries (allocated whole) and the buffers of
    /// windows too large to be held inline.
    pub fn approximate_bytes(&self) -> usize {
        let chunks: usize = self.chunks.iter().map(HugeArray::bytes).sum();
        self.slots.bytes() + self.chunks.capacity() * size_of::<HugeArray<Entry>>() + chunks + self.spills.bytes()
    }

    /// Every key and its window.
    pub fn iter(&self) -> impl Iterator<Item = (WindowKey, WindowRef<'_>)> {
        let spills = &self.spills;
        (0..self.len as u32).map(move |i| {
            let e = self.entry_at(i);
            (e.key.unpack(), WindowRef { window: &e.window, spills })
        })
    }

    /// The window of `key`, if any.
    pub fn get(&self, key: &WindowKey) -> Option<WindowRef<'_>> {
        let i = self.find(key, self.hash(key))?;
        Some(WindowRef { window: &self.entry_at(i).window, spills: &self.spills })
    }

    #[inline]
    pub(super) fn hash(&self, key: &WindowKey) -> u64 {
        self.hasher.hash_one(key)
    }

    #[inline]
    pub(super) fn entry_at(&self, i: u32) -> &Entry {
        &self.chunks[(i >> CHUNK_BITS) as usize][i as usize & (CHUNK - 1)]
    }

    #[inline]
    fn entry_mut(&mut self, i: u32) -> &mut Entry {
        self.dirty.mark(i as usize);
        &mut self.chunks[(i >> CHUNK_BITS) as usize][i as usize & (CHUNK - 1)]
    }

    /// Entry `i`'s window, with the buffers it may have spilled to.
    #[inline]
    pub(super) fn window_mut(&mut self, i: u32) -> (&mut Window, &mut Spills) {
        self.dirty.mark(i as usize);
        let e = &mut self.chunks[(i >> CHUNK_BITS) as usize][i as usize & (CHUNK - 1)];
        (&mut e.window, &mut self.spills)
    }

    /// The slot a probe for `hash` starts at (to prefetch before probing).
    #[inline]
    pub(super) fn home_slot(&self, hash: u64) -> Option<&u64> {
        self.slots.home(hash)
    }

    /// The index of the first entry whose slot carries `hash`'s tag, without comparing keys: the
    /// entry of the key almost always, to be checked with [`Windows::entry_at`] before use.
    #[inline]
    pub(super) fn candidate(&self, hash: u64) -> Option<u32> {
        self.slots.candidate(hash)
    }

    /// The index of `key`'s entry (`hash` is its hash).
    pub(super) fn find(&self, key: &WindowKey, hash: u64) -> Option<u32> {
        let packed = PackedKey::pack(key);
        self.slots.find(hash, |e| self.entry_at(e).key == packed)
    }

    /// The index of `key`'s entry, a new one (with an empty window) if none.
    pub(super) fn find_or_insert(&mut self, key: &WindowKey, hash: u64) -> u32 {
        if let Some(i) = self.find(key, hash) {
            return i;
        }
        // At most three quarters full, so probes stay short.
        if (self.len + 1) * 4 > self.slots.capacity() * 3 {
            self.slots.resize((self.slots.capacity() * 2).max(16));
        }
        let i = u32::try_from(self.len).ok().filter(|i| *i < u32::MAX).expect("fewer than 2^32 - 1 throttle windows in one partition");
        let chunk = (i >> CHUNK_BITS) as usize;
        if chunk == self.chunks.len() {
            self.chunks.push(HugeArray::zeroed(if chunk == 0 { 16 } else { CHUNK }));
        } else if self.chunks[chunk].len() <= i as usize & (CHUNK - 1) {
            // The first chunk, full below `CHUNK`: grows as a `Vec` would, until mapped.
            let grown = grown_len::<Entry>(self.chunks[chunk].len(), i as usize + 1, CHUNK);
            let mut bigger = HugeArray::zeroed(grown);
            bigger[..self.chunks[chunk].len()].copy_from_slice(&self.chunks[chunk]);
            self.chunks[chunk] = bigger;
        }
        *self.entry_mut(i) = Entry { key: PackedKey::pack(key), _pad: 0, window: Window::default() };
        self.len += 1;
        self.slots.insert(hash, i);
        i
    }

    /// The windows as a checkpoint holds them: the used entries' keys, windows and attempts, not
    /// the slots nor the chunks' unused entries.
    pub fn snapshot(&self) -> WindowsSnapshot {
        // Room for every attempt the windows can keep: the pages past those they do keep are
        // never touched.
        let spilled: usize = self.spills.bufs.iter().map(Vec::len).sum();
        let mut s = WindowsSnapshot::with_capacity(self.len, self.len * INLINE + spilled);
        let used = self.chunks.iter().scan(self.len, |left, chunk| {
            let n = (*left).min(chunk.len());
            *left -= n;
            Some(&chunk[..n])
        });
        s.fill(used.flatten().map(|e| {
            let seen = e.window.seen(&self.spills);
            (Head::of(e.key, &e.window, seen), seen)
        }));
        s
    }

    /// The table a snapshot was taken of (the same windows, counting the same; a window's attempts
    /// are inline whenever they fit).
    pub fn from_snapshot(s: &WindowsSnapshot) -> Self {
        let mut t = Windows::default();
        for (head, seen) in s.iter() {
            let key = head.key();
            let i = t.find_or_insert(&key, t.hash(&key));
            let mut window = head.window(seen);
            if seen.len() > INLINE {
                window.spill = t.spills.add(seen.to_vec());
            }
            let (old, spills) = t.window_mut(i);
            spills.release(old.spill);
            *old = window;
        }
        t
    }

    /// Removes entry `i`; the last entry takes its index.
    fn remove(&mut self, i: u32) {
        let e = *self.entry_at(i);
        self.spills.release(e.window.spill);
        self.slots.remove(self.hash(&e.key.unpack()), i);
        let last = (self.len - 1) as u32;
        if i != last {
            let moved = *self.entry_at(last);
            self.slots.renumber(self.hash(&moved.key.unpack()), last, i);
            *self.entry_mut(i) = moved;
        }
        *self.entry_mut(last) = Entry::zeroed();
        self.len -= 1;
        // A chunk emptied is given back (the first stays).
        if self.len.div_ceil(CHUNK).max(1) < self.chunks.len() {
            self.chunks.pop();
        }
    }

    /// Keeps the windows for which `keep` is true.
    pub fn retain(&mut self, keep: impl FnMut(&WindowKey, WindowRef<'_>) -> bool) {
        self.prune_at = 0;
        self.retain_rest(keep);
    }

    /// Judges up to `budget` windows with `keep` from where the last step stopped, dropping those
    /// for which it is false: a prune spread over several calls between micro-batches, finished by
    /// [`Windows::retain_rest`]. A window moved into a judged row (see `remove`) is judged there.
    /// Returns how many windows are left to judge.
    pub fn retain_step(&mut self, budget: usize, mut keep: impl FnMut(&WindowKey, WindowRef<'_>) -> bool) -> usize {
        let mut i = self.prune_at.min(self.len);
        for _ in 0..budget {
            if i >= self.len {
                break;
            }
            let e = self.entry_at(i as u32);
            if keep(&e.key.unpack(), WindowRef { window: &e.window, spills: &self.spills }) {
                i += 1;
            } else {
                self.remove(i as u32);
            }
        }
        self.prune_at = i;
        self.len - i
    }

    /// Judges the windows no [`Windows::retain_step`] has judged since the last call (all of them
    /// when none was made), then starts over.
    pub fn retain_rest(&mut self, keep: impl FnMut(&WindowKey, WindowRef<'_>) -> bool) {
        self.retain_step(usize::MAX, keep);
        self.prune_at = 0;
        if self.len == 0 {
            // The rows are gone; the mirror's rows past the table's length are dropped when it is
            // next brought up to date.
            let (dirty, mirror) = (std::mem::take(&mut self.dirty), std::mem::take(&mut self.mirror));
            *self = Windows { hasher: self.hasher.clone(), dirty, mirror, ..Windows::default() };
            return;
        }
        self.slots.shrink(self.len);
    }
}

/// The checkpoint mirror (see [`WindowsMirror`]).
impl Windows {
    /// Copies into the mirror up to `budget` rows written since it was last brought up to date
    /// (every row the first time, or when the mirror is out in a checkpoint not handed back), and
    /// drops its rows past the table's end; returns the rows still to copy.
    pub fn mirror_step(&mut self, budget: usize) -> usize {
        let epoch = self.mirror.epoch;
        let m = self.mirror.home.get_or_insert_with(|| WindowsMirror { epoch, ..WindowsMirror::default() });
        // Rows the mirror never held (or held before the table shrank past them) are copied whole.
        let held = m.rows.len().min(self.len);
        m.rows.set_len(self.len);
        m.spilled.retain(|i, _| (*i as usize) < held);
        self.dirty.mark_range(held, self.len);
        let (chunks, spills) = (&self.chunks, &self.spills);
        self.dirty.drain(budget, |i| {
            if i >= m.rows.len() {
                return;
            }
            let e = &chunks[i >> CHUNK_BITS][i & (CHUNK - 1)];
            let was_spilled = m.rows[i].window.spill != 0;
            m.rows[i] = *e;
            match e.window.spill {
                0 if was_spilled => {
                    m.spilled.remove(&(i as u32));
                }
                0 => {}
                id => m.spilled.entry(i as u32).or_default().clone_from(&spills.bufs[id as usize - 1]),
            }
        });
        self.dirty.count()
    }

    /// The windows as a checkpoint holds them, through the mirror: brought up to date (the rows
    /// written since the last [`Windows::mirror_step`]) and handed out whole. The table expects it
    /// back ([`Windows::recycle`]); until then it counts the rows written. Without a mirror at
    /// home (none made yet by a step, or the last not handed back) a packed
    /// [`Windows::snapshot`] is taken instead: building a mirror whole at once costs more than it.
    pub fn take_snapshot(&mut self) -> WindowsSnapshot {
        if self.mirror.home.is_none() {
            return self.snapshot();
        }
        self.mirror_step(usize::MAX);
        let mut m = self.mirror.home.take().expect("brought up to date");
        // An epoch of its own, so that no earlier copy of this mirror is ever taken back.
        m.epoch = fresh_epoch();
        self.mirror.epoch = m.epoch;
        WindowsSnapshot::mirror(m)
    }

    /// Takes back the mirror of a snapshot from [`Windows::take_snapshot`] once it is written: the
    /// next checkpoint copies only what changed since. A snapshot of another table, or of this
    /// one but not the last taken, is dropped.
    pub fn recycle(&mut self, s: WindowsSnapshot) {
        if let Some(m) = s.into_mirror().filter(|m| m.epoch == self.mirror.epoch && self.mirror.home.is_none()) {
            self.mirror.home = Some(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::throttle::{INLINE, Rule};

    const SPREAD: u128 = 0x9e37_79b9;

    fn key(i: u32) -> WindowKey {
        (Uuid::from_u128(u128::from(i) * SPREAD), Uuid::nil(), Rule::Requester)
    }

    fn index(k: &WindowKey) -> u32 {
        (k.0.as_u128() / SPREAD) as u32
    }

    fn count(t: &mut Windows, k: &WindowKey, ts: i64) {
        let i = t.find_or_insert(k, t.hash(k));
        let (w, spills) = t.window_mut(i);
        w.count(spills, ts, ts as u32, 5, 1000, 0);
    }

    /// Checks every invariant of the layout: the slots (a power of two, at most three quarters
    /// full, one per entry, each reachable from its home without crossing an empty slot, tagged
    /// with its key's hash), the chunks (as many as the entries need, zeroed past the last entry)
    /// and the spilled buffers (each owned by one window, or free and empty).
    fn check(t: &Windows) {
        assert!(t.len * 4 <= t.slots.capacity() * 3, "{} keys in {} slots", t.len, t.slots.capacity());
        t.slots.check(t.len, |i| t.hash(&t.entry_at(i).key.unpack()));
        match t.len {
            0 => assert!(t.chunks.len() <= 1),
            n => assert_eq!(t.chunks.len(), n.div_ceil(CHUNK), "chunks for {n} entries"),
        }
        for (c, chunk) in t.chunks.iter().enumerate() {
            assert!(c == 0 || chunk.len() == CHUNK, "chunk {c} partly allocated");
            for (k, e) in chunk.iter().enumerate().filter(|(k, _)| c * CHUNK + k >= t.len) {
                assert!(bytemuck::bytes_of(e).iter().all(|b| *b == 0), "entry {} past the last is not zeroed", c * CHUNK + k);
            }
        }
        let mut owned = vec![false; t.spills.bufs.len()];
        for (_, w) in t.iter() {
            let w = w.window;
            let seen = w.seen(&t.spills);
            assert!(seen.is_sorted_by_key(|[o, _]| *o), "attempts out of order");
            match w.spill {
                0 => assert!(usize::from(w.len) <= INLINE),
                id => {
                    assert_eq!(w.len, 0);
                    assert!(!std::mem::replace(&mut owned[id as usize - 1], true), "buffer {id} shared");
                    assert!(seen.len() > INLINE / 2, "{} attempts spilled", seen.len());
                }
            }
        }
        for &f in &t.spills.free {
            assert!(!owned[f as usize] && t.spills.bufs[f as usize].capacity() == 0, "free buffer {f} in use");
        }
        assert_eq!(owned.iter().filter(|o| **o).count() + t.spills.free.len(), t.spills.bufs.len(), "a buffer neither owned nor free");
    }

    /// A table against windows held one by one in a map, through counts that spill and return
    /// inline, removals (backward shifts across the slots' end among them), growth and shrinking,
    /// clones (as checkpoints take them) and checkpoint round trips.
    #[test]
    fn the_layout_holds_its_invariants_through_growth_removal_clones_and_checkpoints() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};

        use crate::throttle::ThrottleState;

        struct Alone {
            w: Window,
            spills: Spills,
        }
        let mut rng = SmallRng::seed_from_u64(11);
        let mut state = ThrottleState::default();
        let mut model: std::collections::HashMap<WindowKey, Alone> = Default::default();
        let mut ts = 1_795_539_600_000i64;
        let mut most_spilled = 0;
        for round in 0..60 {
            // Pools of every size, so that the table grows and shrinks through many slot counts.
            let pool = [8u32, 100, 700, 3_000][round % 4];
            for _ in 0..rng.random_range(0..4_000) {
                let i = rng.random_range(0..pool);
                let rule = if i % 7 == 0 { Rule::Profile((i % 3) as u16) } else { Rule::Requester };
                let k = (Uuid::from_u128(u128::from(i) * SPREAD), Uuid::from_u128(u128::from(i % 2)), rule);
                // Large limits spill; bursts and pauses move windows out of line and back.
                let max = if i % 5 == 0 { 40 } else { 5 };
                ts += if rng.random_range(0..50) == 0 { 2_000 } else { rng.random_range(0..3) };
                let at = ts - rng.random_range(0..300);
                let fp = rng.random_range(0..1_000);
                let got = {
                    let e = state.windows.find_or_insert(&k, state.windows.hash(&k));
                    let (w, spills) = state.windows.window_mut(e);
                    w.count(spills, at, fp, max, 1_000, 500)
                };
                let m = model.entry(k).or_insert_with(|| Alone { w: Window::default(), spills: Spills::default() });
                assert_eq!(got, m.w.count(&mut m.spills, at, fp, max, 1_000, 500), "round {round}");
            }
            check(&state.windows);
            most_spilled = most_spilled.max(state.windows.iter().filter(|(_, w)| w.window.spill != 0).count());
            match round % 5 {
                0 => {
                    let horizon = ts - 500;
                    state.prune(horizon);
                    model.retain(|_, m| m.w.newest(&m.spills).is_some_and(|t| t > horizon - i64::from(m.w.per_ms)));
                }
                1 => {
                    let cut = rng.random_range(0..4u128);
                    state.windows.retain(|k, _| (k.0.as_u128() / SPREAD) % 4 != cut);
                    model.retain(|k, _| (k.0.as_u128() / SPREAD) % 4 != cut);
                }
                2 => {
                    // A checkpoint's clone keeps counting alone; the original is dropped.
                    let copy = state.clone();
                    state.windows.retain(|_, _| false);
                    state = copy;
                }
                3 => {
                    let bytes = postcard::to_stdvec(&state).expect("serializes");
                    state = postcard::from_bytes(&bytes).expect("deserializes");
                }
                _ => {}
            }
            check(&state.windows);
            assert_eq!(state.windows.len(), model.len(), "round {round}");
            for (k, m) in &model {
                let w = state.windows.get(k).expect("held");
                assert_eq!(w.window.seen(&state.windows.spills), m.w.seen(&m.spills), "round {round}");
                assert_eq!((w.window.base, w.window.in_episode, w.window.per_ms), (m.w.base, m.w.in_episode, m.w.per_ms));
            }
        }
        assert!(most_spilled >= 2, "windows spilled: at most {most_spilled} at once");
    }

    /// A checkpoint's snapshot holds the used entries only, and the table rebuilt from it (or from
    /// its bytes) holds the same windows in the same order and counts as the original does: a table
    /// grown past one chunk, with spilled windows, open episodes and removals behind it.
    #[test]
    fn a_snapshot_restores_the_same_windows_past_one_chunk_and_with_spills() {
        let mut t = Windows::default();
        let n = CHUNK as u32 + 10_000;
        for i in 0..n {
            // Six attempts in a window of five: an open episode, for one key in three.
            for k in 0..1 + 5 * u32::from(i % 3 == 0) {
                count(&mut t, &key(i), i64::from(i) + i64::from(k));
            }
        }
        let mut spilled = 0;
        for i in (0..n).step_by(997) {
            let at = t.find_or_insert(&key(i), t.hash(&key(i)));
            let (w, spills) = t.window_mut(at);
            for a in 0..30 {
                w.count(spills, 100_000 + a, a as u32, 40, 1000, 0);
            }
            spilled += 1;
        }
        t.retain(|k, _| index(k) % 11 != 5);
        assert!(t.chunks.len() > 1, "past one chunk");
        assert!(t.iter().filter(|(_, w)| w.window.spill != 0).count() > 20, "spilled windows");
        check(&t);

        let s = t.snapshot();
        assert_eq!(s.len(), t.len());
        assert_eq!(s.attempts_held(), t.iter().map(|(_, w)| w.kept()).sum::<usize>(), "attempts, not inline room");
        let read: WindowsSnapshot = postcard::from_bytes(&postcard::to_stdvec(&s).expect("serializes")).expect("deserializes");
        assert_eq!(read, s, "a snapshot's bytes read back as the same snapshot");
        let mut back = Windows::from_snapshot(&read);
        check(&back);
        assert_eq!((back.len(), back.chunks.len()), (t.len(), t.chunks.len()));
        assert_eq!(back.snapshot(), s, "the same windows in the same entries");
        for (k, w) in t.iter() {
            let b = back.get(&k).expect("restored");
            assert_eq!(b.window.seen(&back.spills), w.window.seen(&t.spills));
            assert_eq!((b.window.base, b.window.per_ms, b.window.in_episode), (w.window.base, w.window.per_ms, w.window.in_episode));
        }
        // Both go on counting alike, spilled windows among them.
        let counted = |table: &mut Windows, i: u32| {
            let at = table.find_or_insert(&key(i), table.hash(&key(i)));
            let (w, spills) = table.window_mut(at);
            w.count(spills, 100_020 + i64::from(i % 5), i, if i.is_multiple_of(997) { 40 } else { 5 }, 1000, 0)
        };
        for i in (0..n).step_by(7) {
            assert_eq!(counted(&mut back, i), counted(&mut t, i), "key {i}");
        }
        assert_eq!(back.snapshot(), t.snapshot(), "counted alike after the restore");
        assert!(spilled > 30);
    }

    #[test]
    fn large_arrays_are_mapped_whole_zeroed_and_cloned_apart() {
        let n = (2 << 20) / size_of::<Entry>() + 1;
        let mut a = HugeArray::<Entry>::zeroed(n);
        assert!(a.is_mapped(), "mapped from 2 MiB");
        assert_eq!(a.len(), n);
        assert_eq!(a.bytes(), 4 << 20, "rounded up to whole huge pages");
        assert!(a.iter().all(|e| bytemuck::bytes_of(e).iter().all(|b| *b == 0)));
        assert_eq!(a.as_ptr() as usize % align_of::<Entry>(), 0);
        a[n - 1].key = PackedKey::pack(&key(9));
        let mut b = a.clone();
        b[n - 1].key = PackedKey::pack(&key(10));
        assert_eq!(a[n - 1].key.unpack(), key(9));
        assert_eq!(b[n - 1].key.unpack(), key(10));
        let small = HugeArray::<u64>::zeroed(16);
        assert!(!small.is_mapped() && small.bytes() == 128, "small arrays stay on the heap");
    }

    #[test]
    fn an_entry_is_three_cache_lines() {
        assert_eq!(size_of::<Entry>(), 192);
        // The key's line is the first inline attempt's, so prefetching the attempts brings it.
        let e = Entry { key: PackedKey::pack(&key(1)), _pad: 0, window: Window::default() };
        let at = |p: *const u8| p as usize - (&raw const e) as usize;
        assert_eq!(at(e.key.requester.as_ptr()) / 64, at(e.window.buf.as_ptr().cast()) / 64);
    }

    #[test]
    fn keys_pack_both_ways() {
        for rule in [Rule::Requester, Rule::Connect, Rule::Type, Rule::Manufacturer, Rule::Profile(0), Rule::Profile(u16::MAX)] {
            let k = (Uuid::from_u128(7), Uuid::from_u128(u128::MAX), rule);
            assert_eq!(PackedKey::pack(&k).unpack(), k);
        }
    }

    #[test]
    fn inserts_lookups_and_removals_agree_with_a_map() {
        let mut t = Windows::default();
        let mut model = std::collections::HashMap::new();
        // Past one chunk, so that chunks are added and given back.
        let n = CHUNK as u32 + 5_000;
        for i in 0..n {
            count(&mut t, &key(i), i64::from(i));
            model.insert(key(i), i64::from(i));
        }
        t.retain(|k, _| !index(k).is_multiple_of(3));
        model.retain(|k, _| !index(k).is_multiple_of(3));
        assert_eq!(t.len(), 25_178);
        assert_eq!(t.len(), model.len());
        for i in 0..n {
            assert_eq!(t.get(&key(i)).and_then(|w| w.newest()), model.get(&key(i)).copied(), "key {i}");
        }
        for (k, w) in t.iter() {
            assert_eq!(w.newest(), model.get(&k).copied());
        }
        t.retain(|k, _| index(k).is_multiple_of(2));
        model.retain(|k, _| index(k).is_multiple_of(2));
        assert_eq!(t.len(), model.len());
        assert_eq!(t.chunks.len(), 1, "the second chunk, emptied, is given back");
        for (k, w) in t.iter() {
            assert_eq!(w.newest(), model.get(&k).copied());
        }
        t.retain(|_, _| false);
        assert!(t.is_empty() && t.get(&key(1)).is_none());
        count(&mut t, &key(1), 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn keys_with_one_hash_tag_stay_apart() {
        // Force every key onto one tag: the probe must compare keys, not tags.
        let mut t = Windows::default();
        for i in 0..100u32 {
            let at = t.find_or_insert(&key(i), 7 << 32);
            let (w, spills) = t.window_mut(at);
            w.count(spills, 0, i, 5, 1000, 0);
        }
        assert_eq!(t.len(), 100);
        for i in 0..100u32 {
            let at = t.find(&key(i), 7 << 32).expect("present");
            assert_eq!(t.entry_at(at).key.unpack(), key(i));
        }
    }

    #[test]
    fn spilled_windows_give_their_buffers_back() {
        let mut t = Windows::default();
        for k in 0..10 {
            let at = t.find_or_insert(&key(k), t.hash(&key(k)));
            let (w, spills) = t.window_mut(at);
            for i in 0..100 {
                w.count(spills, i, i as u32, 50, 1000, 0);
            }
        }
        assert_eq!(t.get(&key(3)).map(|w| w.kept()), Some(55));
        assert_eq!(t.spills.bufs.len(), 10);
        t.retain(|k, _| k.0 == key(3).0);
        assert_eq!(t.spills.free.len(), 9);
        let at = t.find(&key(3), t.hash(&key(3))).expect("kept");
        let (w, spills) = t.window_mut(at);
        // Quiet for a while: back under `INLINE` attempts, back inline.
        w.count(spills, 10_000, 1, 50, 1000, 0);
        assert_eq!((w.spill, w.len), (0, 1));
        assert_eq!(t.spills.free.len(), 10);
    }

    /// The checkpoint mirror holds exactly the table at every checkpoint, whichever rows were
    /// written, moved or dropped since the last one and however much was copied ahead: through
    /// counts that spill and return inline, growth past one chunk, prunes spread over steps,
    /// removals that move the last entry, a table emptied and refilled, mirrors not handed back
    /// and stale copies handed back (which must be refused).
    #[test]
    fn the_mirror_holds_exactly_the_table_at_every_checkpoint() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};

        use crate::throttle::ThrottleState;

        let mut rng = SmallRng::seed_from_u64(5);
        let mut state = ThrottleState::default();
        let mut ts = 1_795_539_600_000i64;
        let mut stale: Option<WindowsSnapshot> = None;
        let mut checkpoints = 0;
        for round in 0..120 {
            let pool = [50u32, 2_000, 40_000, 300][round % 4];
            for _ in 0..rng.random_range(1..6) {
                for _ in 0..rng.random_range(0..3_000) {
                    let i = rng.random_range(0..pool);
                    let rule = if i % 7 == 0 { Rule::Profile((i % 3) as u16) } else { Rule::Requester };
                    let k = (Uuid::from_u128(u128::from(i) * SPREAD), Uuid::nil(), rule);
                    let max = if i % 5 == 0 { 40 } else { 5 };
                    ts += if rng.random_range(0..100) == 0 { 2_000 } else { rng.random_range(0..3) };
                    let e = state.windows.find_or_insert(&k, state.windows.hash(&k));
                    let (w, spills) = state.windows.window_mut(e);
                    w.count(spills, ts - rng.random_range(0..300), rng.random_range(0..1_000), max, 1_000, 500);
                }
                // Work done ahead, between "micro-batches".
                match rng.random_range(0..4) {
                    0 => {
                        state.windows.mirror_step(rng.random_range(0..5_000));
                    }
                    1 => {
                        state.prune_step(ts - 1_500, rng.random_range(0..5_000));
                    }
                    _ => {}
                }
            }
            match round % 7 {
                0 => state.prune(ts - 1_500),
                1 => {
                    let cut = rng.random_range(0..4u128);
                    state.windows.retain(|k, _| (k.0.as_u128() / SPREAD) % 4 != cut);
                }
                2 if rng.random_range(0..3) == 0 => state.windows.retain(|_, _| false),
                _ => {}
            }
            if rng.random_range(0..3) > 0 {
                checkpoints += 1;
                let s = state.windows.take_snapshot();
                assert_eq!(s, state.windows.snapshot(), "round {round}: the mirror is the table");
                let read: WindowsSnapshot = postcard::from_bytes(&postcard::to_stdvec(&s).expect("serializes")).expect("deserializes");
                assert_eq!(read, s, "round {round}: written as the table's own snapshot is");
                // A stale copy of an earlier checkpoint handed back must be refused (the next
                // checkpoint checks it).
                if let Some(old) = stale.take() {
                    state.windows.recycle(old);
                }
                stale = Some(s.clone());
                if rng.random_range(0..4) > 0 {
                    state.windows.recycle(s);
                }
            }
            check(&state.windows);
        }
        assert!(checkpoints > 50);
    }
}
