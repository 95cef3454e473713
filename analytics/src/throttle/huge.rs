//! Zeroed arrays of plain values whose large instances live in anonymous mappings advised for
//! transparent huge pages (`madvise(MADV_HUGEPAGE)`): the throttle windows' slots and entries are
//! read at random, one 4 KiB page per lookup, and a page walk per lookup costs as much as the cache
//! miss. With 2 MiB pages the whole table's translations fit the TLB. Where the kernel gives no huge
//! pages (THP off), the advice changes nothing but the pages' size.

use bytemuck::Pod;
use memmap2::{Advice, MmapMut};

/// Sizes from which an array is mapped (and rounded up to, so that the kernel can use whole huge
/// pages).
const HUGE: usize = 2 << 20;

/// A fixed-length zeroed array of `T`.
pub(super) struct HugeArray<T> {
    inner: Inner<T>,
}

enum Inner<T> {
    Heap(Vec<T>),
    Mapped { map: MmapMut, len: usize },
}

impl<T: Pod> HugeArray<T> {
    /// `len` zeroed values.
    pub(super) fn zeroed(len: usize) -> Self {
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
    pub(super) fn is_mapped(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }

    /// Bytes of memory held (a mapping counts whole).
    pub(super) fn bytes(&self) -> usize {
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
