//! Zeroed arrays of plain values whose large instances live in anonymous mappings advised for
//! transparent huge pages (`madvise(MADV_HUGEPAGE)`): the throttle windows' slots and entries are
//! read at random, one 4 KiB page per lookup, and a page walk per lookup costs as much as the cache
//! miss. With 2 MiB pages the whole table's translations fit the TLB. Where the kernel gives no huge
//! pages (THP off), the advice changes nothing but the pages' size.
//!
//! Checkpoints' snapshots ([`HugeVec`]) use the same memory for another reason: a snapshot fills
//! hundreds of megabytes at once, and in 4 KiB pages the page faults (a fault, a zeroed page and a
//! memory-cgroup charge per 4 KiB) cost more than the copy that fills them.

use bytemuck::Pod;
use memmap2::{Advice, MmapMut};

// A `HugeVec` is written as its values' bytes as they are in memory, which checkpoints document as
// little-endian.
const _: () = assert!(cfg!(target_endian = "little"), "checkpoints write plain values as little-endian bytes");

/// Sizes from which an array is mapped (and rounded up to, so that the kernel can use whole huge
/// pages).
const HUGE: usize = 2 << 20;

/// The length a table's first chunk, which grows as a `Vec` would up to a chunk of `full` values,
/// takes to hold `needed` values: the next power of two (at least twice `len`, at least 16) while
/// that fits on the heap, and `full` as soon as it would be mapped. A mapping's pages cost nothing
/// until they are touched, so the doublings between the heap and `full` would only copy the values
/// again, each time into freshly zeroed pages.
pub(crate) fn grown_len<T>(len: usize, needed: usize, full: usize) -> usize {
    let doubled = needed.next_power_of_two().max(len * 2).max(16);
    if doubled.saturating_mul(size_of::<T>()) >= HUGE { full } else { doubled.min(full) }
}

/// A fixed-length zeroed array of `T`.
pub(crate) struct HugeArray<T> {
    inner: Inner<T>,
}

enum Inner<T> {
    Heap(Vec<T>),
    Mapped { map: MmapMut, len: usize },
}

impl<T: Pod> HugeArray<T> {
    /// `len` zeroed values.
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len * size_of::<T>();
        if bytes < HUGE {
            return Self { inner: Inner::Heap(vec![T::zeroed(); len]) };
        }
        let map = MmapMut::map_anon(bytes.next_multiple_of(HUGE)).expect("memory for throttle windows");
        // Advice only: without huge pages the array works the same.
        let _ = map.advise(Advice::HugePage);
        Self { inner: Inner::Mapped { map, len } }
    }

    /// Whether the array lives in a mapping of its own.
    #[cfg(test)]
    pub(crate) fn is_mapped(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }

    /// Bytes of memory held (a mapping counts whole).
    pub(crate) fn bytes(&self) -> usize {
        match &self.inner {
            Inner::Heap(v) => v.capacity() * size_of::<T>(),
            Inner::Mapped { map, .. } => map.len(),
        }
    }
}

impl<T: Pod> std::ops::Deref for HugeArray<T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Heap(v) => v,
            Inner::Mapped { map, len } => bytemuck::cast_slice(&map[..*len * size_of::<T>()]),
        }
    }
}

impl<T: Pod> std::ops::DerefMut for HugeArray<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.inner {
            Inner::Heap(v) => v,
            Inner::Mapped { map, len } => bytemuck::cast_slice_mut(&mut map[..*len * size_of::<T>()]),
        }
    }
}

impl<T: Pod> Clone for HugeArray<T> {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len());
        copy.copy_from_slice(self);
        copy
    }
}

impl<T: Pod> Default for HugeArray<T> {
    fn default() -> Self {
        Self { inner: Inner::Heap(Vec::new()) }
    }
}

impl<T> std::fmt::Debug for HugeArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HugeArray")
    }
}

/// A growable array of `T` in the memory of a [`HugeArray`]: pages are touched only as far as it is
/// filled, so a capacity well above what is used costs address space, not memory.
pub(crate) struct HugeVec<T> {
    array: HugeArray<T>,
    len: usize,
}

impl<T: Pod> Default for HugeVec<T> {
    fn default() -> Self {
        Self { array: HugeArray::default(), len: 0 }
    }
}

impl<T: Pod> HugeVec<T> {
    /// An empty array with room for `n` values.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self { array: HugeArray::zeroed(n), len: 0 }
    }

    /// Room for `more` values past the used ones, growing (as a `Vec` would) if needed.
    #[inline]
    pub(crate) fn reserve(&mut self, more: usize) {
        if self.len + more > self.array.len() {
            let mut bigger = HugeArray::zeroed((self.len + more).max(self.array.len() * 2).max(16));
            bigger[..self.len].copy_from_slice(&self.array[..self.len]);
            self.array = bigger;
        }
    }

    /// Appends `xs`.
    #[inline]
    pub(crate) fn extend_from_slice(&mut self, xs: &[T]) {
        self.reserve(xs.len());
        self.array[self.len..self.len + xs.len()].copy_from_slice(xs);
        self.len += xs.len();
    }

    /// The zeroed room past the used values, to fill and then [`commit`](Self::commit).
    pub(crate) fn spare_mut(&mut self) -> &mut [T] {
        &mut self.array[self.len..]
    }

    /// Counts the first `n` values of the room as used.
    pub(crate) fn commit(&mut self, n: usize) {
        assert!(self.len + n <= self.array.len(), "committed past the capacity");
        self.len += n;
    }

    /// Makes the array `n` values long: cut, or grown with zeroed values (the room past the used
    /// values is zeroed only when it was never used: a mirror overwrites what it grows into).
    pub(crate) fn set_len(&mut self, n: usize) {
        if n > self.len {
            self.reserve(n - self.len);
        }
        self.len = n;
    }
}

impl<T: Pod> std::ops::DerefMut for HugeVec<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.array[..self.len]
    }
}

impl<T: Pod> std::ops::Deref for HugeVec<T> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        &self.array[..self.len]
    }
}

impl<T: Pod> Clone for HugeVec<T> {
    fn clone(&self) -> Self {
        let mut copy = Self::with_capacity(self.len);
        copy.extend_from_slice(self);
        copy
    }
}

impl<T: Pod + PartialEq> PartialEq for HugeVec<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Pod + Eq> Eq for HugeVec<T> {}

impl<T: Pod> std::fmt::Debug for HugeVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeVec({} values)", self.len)
    }
}

/// Written as one byte string: the values' bytes, little-endian, one after the other (a single
/// copy, whatever the number of values).
impl<T: Pod> serde::Serialize for HugeVec<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytemuck::cast_slice(self))
    }
}

impl<'de, T: Pod> serde::Deserialize<'de> for HugeVec<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: Pod> serde::de::Visitor<'_> for V<T> {
            type Value = HugeVec<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a byte string of {}-byte values", size_of::<T>())
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<HugeVec<T>, E> {
                if !bytes.len().is_multiple_of(size_of::<T>()) {
                    return Err(E::custom(format!("{} bytes are not a whole number of {}-byte values", bytes.len(), size_of::<T>())));
                }
                let n = bytes.len() / size_of::<T>();
                let mut v = HugeVec::with_capacity(n);
                bytemuck::cast_slice_mut::<T, u8>(&mut v.spare_mut()[..n]).copy_from_slice(bytes);
                v.commit(n);
                Ok(v)
            }
        }
        d.deserialize_bytes(V(std::marker::PhantomData))
    }
}

/// Rows of a table written since its checkpoint mirror was last brought up to date, one bit per
/// row (see `throttle::snapshot` and `timing`'s mirrors). Marking is one `or` into a word on the
/// hot path; the bitmap only grows between micro-batches ([`DirtyRows::cover`]), and a row past
/// it is not marked: mirrors copy every row past what they covered anyway.
#[derive(Debug, Clone, Default)]
pub(crate) struct DirtyRows {
    words: Vec<u64>,
}

impl DirtyRows {
    /// Marks row `i` as written.
    #[inline]
    pub(crate) fn mark(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i >> 6) {
            *w |= 1 << (i & 63);
        }
    }

    /// Grows the bitmap to cover rows `0..n` (new rows unmarked).
    pub(crate) fn cover(&mut self, n: usize) {
        let words = n.div_ceil(64);
        if words > self.words.len() {
            self.words.resize(words, 0);
        }
    }

    /// Marks rows `from..to` (covered first).
    pub(crate) fn mark_range(&mut self, from: usize, to: usize) {
        self.cover(to);
        for i in from..to {
            // A loop per bit, but only over rows a mirror has never held: once per row.
            self.words[i >> 6] |= 1 << (i & 63);
        }
    }

    /// Unmarks rows `n..`.
    pub(crate) fn clear_from(&mut self, n: usize) {
        let word = n >> 6;
        if let Some(w) = self.words.get_mut(word) {
            *w &= (1u64 << (n & 63)) - 1;
        }
        for w in self.words.iter_mut().skip(word + 1) {
            *w = 0;
        }
    }

    /// Rows marked.
    pub(crate) fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Unmarks up to `limit` marked rows, lowest first, calling `f` with each; returns how many.
    pub(crate) fn drain(&mut self, limit: usize, mut f: impl FnMut(usize)) -> usize {
        let mut n = 0;
        for (wi, w) in self.words.iter_mut().enumerate() {
            while *w != 0 {
                if n == limit {
                    return n;
                }
                let bit = w.trailing_zeros() as usize;
                *w &= *w - 1;
                f(wi << 6 | bit);
                n += 1;
            }
        }
        n
    }
}

/// A number no other checkpoint mirror of this process was given: a mirror handed back is taken
/// only by the table whose current mirror it is.
pub(crate) fn fresh_epoch() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Where a table's checkpoint mirror is: at home (brought up to date between micro-batches), or
/// out (in a checkpoint being written), its epoch saying which mirror the table expects back. A
/// copy of a table gets no mirror and an epoch of its own: no mirror of the original fits it.
#[derive(Debug)]
pub(crate) struct MirrorSlot<M> {
    pub(crate) epoch: u64,
    pub(crate) home: Option<M>,
}

impl<M> Default for MirrorSlot<M> {
    fn default() -> Self {
        Self { epoch: fresh_epoch(), home: None }
    }
}

impl<M> Clone for MirrorSlot<M> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::grown_len;

    #[test]
    fn a_first_chunk_doubles_on_the_heap_and_takes_its_full_size_once_mapped() {
        // 64-byte values: 32,768 of them are 2 MiB, the size from which arrays are mapped.
        type V = [u64; 8];
        let full = 1 << 20;
        assert_eq!(grown_len::<V>(0, 1, full), 16);
        assert_eq!(grown_len::<V>(16, 17, full), 32);
        assert_eq!(grown_len::<V>(16, 100, full), 128, "at least what is needed");
        assert_eq!(grown_len::<V>(8192, 8193, full), 16_384, "1 MiB: still on the heap");
        assert_eq!(grown_len::<V>(16_384, 16_385, full), full, "2 MiB would be mapped: the whole chunk at once");
        assert_eq!(grown_len::<V>(16, 17, 20), 20, "never past the chunk");
    }
}
