//! The throttle windows as a checkpoint holds them: what a snapshot must keep of the table and
//! nothing else. It never holds the table's index (slots), its unused entries or their inline
//! space: per window a 56-byte head (key, base, length, episode) and the attempts it keeps, all
//! windows' attempts in one buffer. Taking one is two sequential copies on the pipeline's thread
//! (the checkpoint's pause); restoring one rebuilds the table as inserting the windows one by one
//! would.
//!
//! **On disk** the two buffers are written as they are in memory, two byte strings (postcard: a
//! varint length, then the bytes), little-endian: the heads ([`Head`]'s fields in order: requester
//! 16 bytes, target 16, rule variant u16 and profile number u16, episode u8, 3 zero bytes, base
//! i64, window ms u32, attempts kept u32), then every window's attempts, `[ms after base u32,
//! fingerprint u32]`, window after window. Writing them is two copies, not a million fields
//! encoded one by one; reading them checks every head and every window's order.

use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::table::PackedKey;
use super::{INLINE, Window, WindowKey};
use crate::huge::HugeVec;

/// One window of a snapshot, without its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub(super) struct Head {
    key: PackedKey,
    /// `1` when an episode is open.
    in_episode: u8,
    _pad: [u8; 3],
    /// Event time the attempts' offsets count from.
    base: i64,
    /// The window's length, ms.
    per_ms: u32,
    /// How many attempts the window keeps (its run in [`WindowsSnapshot::attempts`]).
    kept: u32,
}

/// Throttle windows as a checkpoint holds them (see the module docs), in the order of the table's
/// entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowsSnapshot {
    pub(super) heads: HugeVec<Head>,
    /// Every window's attempts, `[ms after base, id fingerprint]`, window after window.
    pub(super) attempts: HugeVec<[u32; 2]>,
}

impl WindowsSnapshot {
    /// An empty snapshot with room for `windows` windows and `attempts` attempts.
    pub(super) fn with_capacity(windows: usize, attempts: usize) -> Self {
        Self { heads: HugeVec::with_capacity(windows), attempts: HugeVec::with_capacity(attempts) }
    }

    /// Fills the snapshot with `windows`: each entry's key, window and attempts (in order: the
    /// table's windows always are), writing into the room reserved (windows: as many as
    /// `windows` yields; attempts: at least as many as they keep).
    #[inline]
    pub(super) fn fill<'a>(&mut self, windows: impl Iterator<Item = (PackedKey, &'a Window, &'a [[u32; 2]])>) {
        let (heads, attempts) = (self.heads.spare_mut(), self.attempts.spare_mut());
        let (mut n, mut at) = (0, 0);
        for ((key, w, seen), head) in windows.zip(heads.iter_mut()) {
            let kept = u32::try_from(seen.len()).expect("fewer than 2^32 attempts in one throttle window");
            *head = Head { key, in_episode: w.in_episode, _pad: [0; 3], base: w.base, per_ms: w.per_ms, kept };
            attempts[at..at + seen.len()].copy_from_slice(seen);
            n += 1;
            at += seen.len();
        }
        self.heads.commit(n);
        self.attempts.commit(at);
    }

    /// Windows held.
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// Whether no window is held.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// Every window's head and attempts, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&Head, &[[u32; 2]])> {
        let mut at = 0usize;
        self.heads.iter().map(move |h| {
            let seen = &self.attempts[at..at + h.kept as usize];
            at += h.kept as usize;
            (h, seen)
        })
    }
}

impl Head {
    /// The window's key.
    pub(super) fn key(&self) -> WindowKey {
        self.key.unpack()
    }

    /// The window, with `seen` (its attempts) inline when they fit; else the caller spills them.
    pub(super) fn window(&self, seen: &[[u32; 2]]) -> Window {
        let mut w = Window { base: self.base, per_ms: self.per_ms, in_episode: self.in_episode, ..Window::default() };
        if seen.len() <= INLINE {
            w.buf[..seen.len()].copy_from_slice(seen);
            w.len = seen.len() as u8;
        }
        w
    }
}

/// Written as its two buffers' bytes (see the module docs).
impl Serialize for WindowsSnapshot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.heads, &self.attempts).serialize(s)
    }
}

impl<'de> Deserialize<'de> for WindowsSnapshot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (heads, attempts) = Deserialize::deserialize(d)?;
        let s = WindowsSnapshot { heads, attempts };
        s.check().map_err(serde::de::Error::custom)?;
        Ok(s)
    }
}

impl WindowsSnapshot {
    /// Checks what a snapshot read back must hold: heads as [`WindowsSnapshot::fill`] writes them
    /// (a known rule, an episode flag, zero padding), as many attempts as the heads keep, and
    /// every window's attempts in order.
    fn check(&self) -> Result<(), String> {
        let kept: u64 = self.heads.iter().map(|h| u64::from(h.kept)).sum();
        if kept != self.attempts.len() as u64 {
            return Err(format!("the throttle windows keep {kept} attempts, the checkpoint holds {}", self.attempts.len()));
        }
        for (i, (h, seen)) in self.iter().enumerate() {
            if PackedKey::pack(&h.key()) != h.key || h.in_episode > 1 || h._pad != [0; 3] {
                return Err(format!("throttle window {i}: not a window's key and state"));
            }
            if !seen.is_sorted_by_key(|[o, _]| *o) {
                return Err(format!("throttle window {i}: its attempts are out of order"));
            }
        }
        Ok(())
    }
}
