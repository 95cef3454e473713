//! The throttle windows as a checkpoint holds them: what a snapshot must keep of the table and
//! nothing else. It never holds the table's index (slots), its unused entries or their inline
//! space: per window a 56-byte head (key, base, length, episode) and the attempts it keeps, all
//! windows' attempts in one buffer. Restoring one rebuilds the table as inserting the windows one
//! by one would.
//!
//! **Checkpoints** do not pack the table on the pipeline's thread: they take the table's mirror
//! ([`WindowsMirror`], a row-for-row copy kept from checkpoint to checkpoint, in which only rows
//! written since are copied, mostly ahead of the checkpoint), and the mirror is packed into the
//! form below on the thread that writes the file.
//!
//! **On disk** the two buffers are written as they are in memory, two byte strings (postcard: a
//! varint length, then the bytes), little-endian: the heads ([`Head`]'s fields in order: requester
//! 16 bytes, target 16, rule variant u16 and profile number u16, episode u8, 3 zero bytes, base
//! i64, window ms u32, attempts kept u32), then every window's attempts, `[ms after base u32,
//! fingerprint u32]`, window after window. Writing them is two copies, not a million fields
//! encoded one by one; reading them checks every head and every window's order.

use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::table::{Entry, PackedKey};
use super::{INLINE, Window, WindowKey};
use crate::huge::HugeVec;
use crate::tables::FastMap;

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
    /// How many attempts the window keeps (its run in the snapshot's attempts).
    kept: u32,
}

/// Throttle windows as a checkpoint holds them (see the module docs), in the order of the table's
/// entries: packed (a copy of what the windows use, or what a file held), or the table's
/// checkpoint mirror (see [`WindowsMirror`]), packed only when it is written.
#[derive(Debug, Clone)]
pub struct WindowsSnapshot {
    repr: Repr,
}

#[derive(Debug, Clone)]
enum Repr {
    Packed {
        heads: HugeVec<Head>,
        /// Every window's attempts, `[ms after base, id fingerprint]`, window after window.
        attempts: HugeVec<[u32; 2]>,
    },
    Mirror(Box<WindowsMirror>),
}

impl Default for WindowsSnapshot {
    fn default() -> Self {
        Self { repr: Repr::Packed { heads: HugeVec::default(), attempts: HugeVec::default() } }
    }
}

/// The same windows in the same order, whichever the form.
impl PartialEq for WindowsSnapshot {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for WindowsSnapshot {}

/// A copy of a windows table kept from checkpoint to checkpoint, row for row (row `i` is entry
/// `i`), so that a checkpoint copies only the rows written since the last one (see
/// [`super::Windows::mirror_step`]). Between checkpoints the table keeps it and brings it up to
/// date between micro-batches; a checkpoint takes it as it is (the pause copies only the rows
/// written since the last step) and the caller hands it back once written.
#[derive(Debug, Clone, Default)]
pub(super) struct WindowsMirror {
    /// Which mirror of which table this is (see [`crate::huge::MirrorSlot`]).
    pub(super) epoch: u64,
    /// The entries (a window with `spill` non-zero has its attempts in `spilled`).
    pub(super) rows: HugeVec<Entry>,
    /// The attempts of spilled windows, by row.
    pub(super) spilled: FastMap<u32, Vec<[u32; 2]>>,
}

impl WindowsMirror {
    /// Row `i`'s head and attempts.
    fn window(&self, i: usize) -> (Head, &[[u32; 2]]) {
        let e = &self.rows[i];
        let seen = match e.window.spill {
            0 => &e.window.buf[..usize::from(e.window.len)],
            _ => self.spilled.get(&(i as u32)).map_or(&[][..], Vec::as_slice),
        };
        (Head::of(e.key, &e.window, seen), seen)
    }
}

impl WindowsSnapshot {
    /// An empty snapshot with room for `windows` windows and `attempts` attempts.
    pub(super) fn with_capacity(windows: usize, attempts: usize) -> Self {
        Self { repr: Repr::Packed { heads: HugeVec::with_capacity(windows), attempts: HugeVec::with_capacity(attempts) } }
    }

    /// A checkpoint's snapshot holding a table's mirror.
    pub(super) fn mirror(m: WindowsMirror) -> Self {
        Self { repr: Repr::Mirror(Box::new(m)) }
    }

    /// The mirror this snapshot holds, if it holds one (to hand back to its table).
    pub(super) fn into_mirror(self) -> Option<WindowsMirror> {
        match self.repr {
            Repr::Mirror(m) => Some(*m),
            Repr::Packed { .. } => None,
        }
    }

    /// Fills a packed snapshot with `windows` (heads and attempts, in order: the table's windows
    /// always are), writing into the room reserved (windows: as many as `windows` yields;
    /// attempts: at least as many as they keep).
    #[inline]
    pub(super) fn fill<'a>(&mut self, windows: impl Iterator<Item = (Head, &'a [[u32; 2]])>) {
        let Repr::Packed { heads, attempts } = &mut self.repr else {
            unreachable!("only packed snapshots are filled");
        };
        let (spare_heads, spare_attempts) = (heads.spare_mut(), attempts.spare_mut());
        let (mut n, mut at) = (0, 0);
        for ((h, seen), head) in windows.zip(spare_heads.iter_mut()) {
            *head = h;
            spare_attempts[at..at + seen.len()].copy_from_slice(seen);
            n += 1;
            at += seen.len();
        }
        heads.commit(n);
        attempts.commit(at);
    }

    /// Windows held.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Packed { heads, .. } => heads.len(),
            Repr::Mirror(m) => m.rows.len(),
        }
    }

    /// Whether no window is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Attempts in a packed snapshot's buffer.
    #[cfg(test)]
    pub(super) fn attempts_held(&self) -> usize {
        match &self.repr {
            Repr::Packed { attempts, .. } => attempts.len(),
            Repr::Mirror(_) => unreachable!("a packed snapshot"),
        }
    }

    /// Every window's head and attempts, in order.
    pub(super) fn iter(&self) -> Box<dyn Iterator<Item = (Head, &[[u32; 2]])> + '_> {
        match &self.repr {
            Repr::Packed { heads, attempts } => {
                let mut at = 0usize;
                Box::new(heads.iter().map(move |h| {
                    let seen = &attempts[at..at + h.kept as usize];
                    at += h.kept as usize;
                    (*h, seen)
                }))
            }
            Repr::Mirror(m) => Box::new((0..m.rows.len()).map(|i| m.window(i))),
        }
    }

    /// The packed form (a mirror is packed here, on the thread that writes the checkpoint).
    fn packed(&self) -> std::borrow::Cow<'_, Self> {
        match &self.repr {
            Repr::Packed { .. } => std::borrow::Cow::Borrowed(self),
            Repr::Mirror(m) => {
                let attempts: usize = (0..m.rows.len()).map(|i| m.window(i).1.len()).sum();
                let mut s = Self::with_capacity(m.rows.len(), attempts);
                s.fill(self.iter());
                std::borrow::Cow::Owned(s)
            }
        }
    }
}

impl Head {
    /// The head of `window` (key `key`) keeping `seen`.
    #[inline]
    pub(super) fn of(key: PackedKey, w: &Window, seen: &[[u32; 2]]) -> Self {
        let kept = u32::try_from(seen.len()).expect("fewer than 2^32 attempts in one throttle window");
        Head { key, in_episode: w.in_episode, _pad: [0; 3], base: w.base, per_ms: w.per_ms, kept }
    }

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
        match &self.packed().repr {
            Repr::Packed { heads, attempts } => (heads, attempts).serialize(s),
            Repr::Mirror(_) => unreachable!("packed"),
        }
    }
}

impl<'de> Deserialize<'de> for WindowsSnapshot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (heads, attempts) = Deserialize::deserialize(d)?;
        let s = WindowsSnapshot { repr: Repr::Packed { heads, attempts } };
        s.check().map_err(serde::de::Error::custom)?;
        Ok(s)
    }
}

impl WindowsSnapshot {
    /// Checks what a snapshot read back must hold: heads as [`WindowsSnapshot::fill`] writes them
    /// (a known rule, an episode flag, zero padding), as many attempts as the heads keep, and
    /// every window's attempts in order.
    fn check(&self) -> Result<(), String> {
        let Repr::Packed { heads, attempts } = &self.repr else {
            return Ok(());
        };
        let kept: u64 = heads.iter().map(|h| u64::from(h.kept)).sum();
        if kept != attempts.len() as u64 {
            return Err(format!("the throttle windows keep {kept} attempts, the checkpoint holds {}", attempts.len()));
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
