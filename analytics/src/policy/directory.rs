//! The device directory as the policy check reads it on its hot path: the newest version of every
//! registry record flattened into one 64-byte slot of an open-addressing table, keyed by UUID, and
//! what the slot cannot hold (the lists of levels that are not open, the restrictions of profiles)
//! in a block of a few 64-byte lines of one arena, encoded as `u32` words.
//!
//! ```text
//!   Registry ── versions: VersionedTable<Uuid, Option<Arc<CompiledRecord>>>   (the reference: every
//!          │                                                                 version, as of any time)
//!          └─ hot: Directory ── slots: [Slot; 2^k] (one line each: uuid, owner, version time, open
//!                          │           levels, flags, up to four group ids, block index)
//!                          └─ arena: lines of u32 words; blocks of 1, 2, 4, 8 or 16 lines, reused
//!                                    through free lists when a record changes
//! ```
//!
//! A lookup is one hash and, nearly always, one cache line; a check that needs lists or restrictions
//! reads one more block (usually its first line: the `send`, `receive` and `discover` rules are
//! written first). The slot also says what the engine's throttle stage needs of a record (exempt,
//! a type or manufacturer, a profile with a `throttle`), so that it reads no record for most
//! attempts. Both maps are anonymous memory advised for transparent huge pages: a directory of a million
//! UUIDs is random access over a few hundred megabytes, and with 4 KiB pages nearly every lookup
//! would also miss the TLB.
//!
//! **What it decides.** [`View`] answers only "this attempt passes every check": self or owner of
//! the target, lists that admit everyone or that admit this requester (deny wins, as in
//! [`super::eval`]), the target's token, and the restrictions it can judge from the attempt alone
//! (timing, the requester's location, payload types and size, an empty route). Anything else (a
//! denial, a broken or unjudgeable restriction, a version older than the newest, a requester in
//! more than four groups) is left to the reference path, [`super::evaluate`] over the compiled
//! records of the versioned table, which writes the findings. So the fast path can only skip rows
//! the reference would pass; the property tests in `jobs::policy` hold it to that.
//!
//! **Changes.** A registry change rewrites one slot and one block: nothing else is rebuilt, and an
//! attempt's lookup sees the version in force at its `ts` (the newest here, older ones through the
//! versioned table).

use std::hash::BuildHasher;
use std::sync::Arc;

use chrono::Weekday;
use memmap2::{MmapMut, MmapOptions};
use meshguard_schemas::registry::{Area, Country, LocationSubject, TimeZone, TimingWindow};
use polars_utils::mem::prefetch::prefetch_l2;
use uuid::Uuid;

use super::compile::{CompiledRecord, Level, Matcher};
use super::geo::{self, Location};
use super::restrictions;
use crate::tables::{FastMap, VersionedTable};

/// One cache line.
pub type Line = [u64; 8];
/// `u32` words per line.
const LINE_WORDS: usize = 16;
/// Largest block, in words (its offsets are bytes); a record whose block would be longer is judged
/// by the reference path.
const MAX_BLOCK_WORDS: usize = 255;
/// Block size classes: 1, 2, 4, 8 and 16 lines.
const CLASSES: usize = 5;

/// Slot flags.
const OCCUPIED: u8 = 1;
const REGISTERED: u8 = 2;
const HAS_OWNER: u8 = 4;
/// More than four groups: group lists are not judged here.
const MANY_GROUPS: u8 = 8;
/// Some profile has restrictions: the target side checks the applicable ones.
const RESTRICTS: u8 = 16;
/// Some profile has path restrictions: they govern the record's own sends.
const SENDER_PATH: u8 = 32;
/// The record needs a block but it is too large: left to the reference path.
const OPAQUE: u8 = 64;
/// The record is exempt from throttles.
const EXEMPT: u8 = 128;

/// Bits of the group-count byte above the count (at most four, three bits), for the throttle stage.
/// The record names a device type or a manufacturer (which may have limits of their own).
const TYPED: u8 = 8;
/// Some profile of the record has a `throttle`.
const THROTTLES: u8 = 16;
/// The group count's bits.
const GROUP_COUNT: u8 = 7;

/// Restriction-entry kinds.
const TIMING: u32 = 1;
const LOCATION: u32 = 2;
const ENVELOPE: u32 = 4;
const PATH: u32 = 8;
/// A restriction this module does not judge (a payload field rule, a target location, presence).
const UNJUDGED: u32 = 0x100;

/// The key of a UUID in the slot table (its bytes, read little-endian; any fixed reading would do).
#[inline]
pub fn key_of(uuid: &Uuid) -> u128 {
    u128::from_le_bytes(*uuid.as_bytes())
}

/// Page-aligned lines in an anonymous map, advised for huge pages.
#[derive(Debug)]
struct Lines {
    map: MmapMut,
}

impl Lines {
    fn new(lines: usize) -> Self {
        // An anonymous map fails only when the address space or memory is exhausted, where a
        // vector's allocation would abort the process too.
        #[allow(clippy::expect_used)]
        let map = MmapOptions::new().len(lines.max(1) * 64).map_anon().expect("anonymous memory for the policy directory");
        #[cfg(target_os = "linux")]
        {
            // Best effort: without transparent huge pages the map works the same, more slowly.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Self { map }
    }

    fn capacity(&self) -> usize {
        self.map.len() / 64
    }

    fn lines(&self) -> &[Line] {
        bytemuck::cast_slice(&self.map[..])
    }

    fn lines_mut(&mut self) -> &mut [Line] {
        bytemuck::cast_slice_mut(&mut self.map[..])
    }

    fn words(&self) -> &[u32] {
        bytemuck::cast_slice(&self.map[..])
    }

    fn words_mut(&mut self) -> &mut [u32] {
        bytemuck::cast_slice_mut(&mut self.map[..])
    }
}

/// A slot of the table, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct Slot<'a>(&'a Line);

impl<'a> Slot<'a> {
    #[inline]
    fn flags(self) -> u8 {
        (self.0[5] >> 48) as u8
    }

    /// Whether `key` is this slot's UUID.
    #[inline]
    pub fn is(self, key: u128) -> bool {
        self.0[0] == key as u64 && self.0[1] == (key >> 64) as u64
    }

    /// Whether `key` is this record or its owner (they pass every list and restriction).
    #[inline]
    pub fn is_self_or_owner(self, key: u128) -> bool {
        self.is(key) || (self.flags() & HAS_OWNER != 0 && self.0[2] == key as u64 && self.0[3] == (key >> 64) as u64)
    }

    /// Whether the record is registered as of `at_ms` by the newest version (`false`: not
    /// registered then, or an older version decides).
    #[inline]
    pub fn registered_at(self, at_ms: i64) -> bool {
        self.flags() & REGISTERED != 0 && self.0[4] as i64 <= at_ms
    }

    /// Whether the newest version holds at `at_ms` (from at or before it): when it does not, an
    /// older version (in the versioned table) decides.
    #[inline]
    pub fn newest_at(self, at_ms: i64) -> bool {
        self.0[4] as i64 <= at_ms
    }

    /// Whether the newest version is a registration (not a tombstone).
    #[inline]
    pub fn registered(self) -> bool {
        self.flags() & REGISTERED != 0
    }

    /// Whether the newest version is exempt from throttles.
    #[inline]
    pub fn exempt(self) -> bool {
        self.flags() & EXEMPT != 0
    }

    /// Whether the newest version names a device type or a manufacturer.
    #[inline]
    pub fn typed(self) -> bool {
        (self.0[5] >> 32) as u8 & TYPED != 0
    }

    /// Whether some profile of the newest version has a `throttle`.
    #[inline]
    pub fn throttles(self) -> bool {
        (self.0[5] >> 32) as u8 & THROTTLES != 0
    }

    #[inline]
    fn block(self) -> usize {
        self.0[5] as u32 as usize
    }

    #[inline]
    fn open(self, level: Level) -> bool {
        (self.0[5] >> 40) as u8 & (1 << level as u8) != 0
    }

    /// No allow rule at `level` can admit anyone: every attempt there is a finding.
    #[inline]
    fn closed(self, level: Level) -> bool {
        (self.0[5] >> 56) as u8 & (1 << level as u8) != 0
    }

    #[inline]
    fn groups(self) -> Groups {
        let n = ((self.0[5] >> 32) as u8 & GROUP_COUNT) as usize;
        let w = [self.0[6] as u32, (self.0[6] >> 32) as u32, self.0[7] as u32, (self.0[7] >> 32) as u32];
        Groups { ids: w, len: n.min(4), many: self.flags() & MANY_GROUPS != 0 }
    }
}

/// A party's groups as the slot holds them.
#[derive(Debug, Clone, Copy)]
struct Groups {
    ids: [u32; 4],
    len: usize,
    /// More than four: a group list cannot be judged.
    many: bool,
}

/// What an attempt needs beyond the two slots, found by [`View::needs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Nothing: the attempt passes every check.
    Nothing,
    /// Parts of the blocks of the target, the requester or both, then [`View::passes`].
    Blocks(Option<BlockNeed>, Option<BlockNeed>),
    /// The reference path must judge it.
    Reference,
}

/// The parts of one record's block a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockNeed {
    /// The block's first line.
    block: u32,
    /// The rules of this level.
    rules: Option<Level>,
    /// The restriction entries.
    entries: bool,
}

/// The attempt's fields the restrictions read, fetched only when one needs them.
pub trait AttemptFields {
    /// Event time.
    fn ts(&self) -> i64;
    /// The requester's location.
    fn location(&self) -> Location;
    /// `payload_type`.
    fn payload_type(&self) -> Option<&str>;
    /// `payload_bytes`, else the payload's length, else `None`.
    fn payload_size(&self) -> Option<u64>;
    /// Hops in `route`.
    fn route_len(&self) -> usize;
}

/// The directory's hot tables. See the module docs.
#[derive(Debug)]
pub struct Directory {
    hasher: hashbrown::DefaultHashBuilder,
    slots: Lines,
    /// Occupied slots.
    len: usize,
    arena: Lines,
    /// Lines of the arena handed out (line 0 is never a block: block index 0 means none).
    arena_len: usize,
    free: [Vec<u32>; CLASSES],
    zones: Vec<TimeZone>,
    zone_ids: FastMap<TimeZone, u32>,
    payload_types: FastMap<Box<str>, u32>,
}

impl Default for Directory {
    fn default() -> Self {
        Self {
            hasher: Default::default(),
            slots: Lines::new(1024),
            len: 0,
            arena: Lines::new(1024),
            arena_len: 1,
            free: Default::default(),
            zones: Vec::new(),
            zone_ids: FastMap::default(),
            payload_types: FastMap::default(),
        }
    }
}

impl Directory {
    /// Records that `uuid`'s newest version is `rec` (`None`: unregistered) from `from_ms` on.
    pub fn set(&mut self, uuid: &Uuid, from_ms: i64, rec: Option<&CompiledRecord>) {
        if (self.len + 1) * 2 > self.slots.capacity() {
            self.grow();
        }
        let key = key_of(uuid);
        let i = self.position(key);
        let old = self.slots.lines()[i];
        let old = Slot(&old);
        if old.flags() & OCCUPIED != 0 && old.block() != 0 {
            self.release(old.block());
        } else if old.flags() & OCCUPIED == 0 {
            self.len += 1;
        }
        let mut line: Line = [0; 8];
        line[0] = key as u64;
        line[1] = (key >> 64) as u64;
        line[4] = from_ms as u64;
        let mut flags = OCCUPIED;
        let (mut open, mut closed, mut block, mut ngroups) = (0u8, 0u8, 0u32, 0u8);
        if let Some(rec) = rec {
            flags |= REGISTERED;
            let r = &rec.record;
            if r.exempt {
                flags |= EXEMPT;
            }
            if let Some(owner) = rec.owner() {
                let o = key_of(&owner);
                line[2] = o as u64;
                line[3] = (o >> 64) as u64;
                flags |= HAS_OWNER;
            }
            let groups = rec.groups.as_slice();
            if groups.len() > 4 {
                flags |= MANY_GROUPS;
            }
            ngroups = groups.len().min(4) as u8;
            let mut g = [0u32; 4];
            g[..usize::from(ngroups)].copy_from_slice(&groups[..usize::from(ngroups)]);
            if r.device_type.is_some() || r.manufacturer.is_some() {
                ngroups |= TYPED;
            }
            if r.profiles.iter().any(|p| p.restrictions.throttle.is_some()) {
                ngroups |= THROTTLES;
            }
            line[6] = u64::from(g[0]) | u64::from(g[1]) << 32;
            line[7] = u64::from(g[2]) | u64::from(g[3]) << 32;
            let compiled = self.compile(rec);
            open = compiled.open;
            closed = compiled.closed;
            flags |= compiled.flags;
            if let Some(words) = compiled.words {
                block = self.store(&words);
            }
        }
        line[5] = u64::from(block) | u64::from(ngroups) << 32 | u64::from(open) << 40 | u64::from(flags) << 48 | u64::from(closed) << 56;
        self.slots.lines_mut()[i] = line;
    }

    /// Occupied slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no UUID is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tables, borrowed for lookups.
    #[inline]
    pub fn view(&self) -> View<'_> {
        let slots = self.slots.lines();
        View { slots, mask: slots.len() - 1, hasher: &self.hasher, arena: self.arena.words(), dir: self }
    }

    /// The slot `key` has or would take.
    fn position(&self, key: u128) -> usize {
        let slots = self.slots.lines();
        let mask = slots.len() - 1;
        let mut i = self.hasher.hash_one(key) as usize & mask;
        loop {
            let s = Slot(&slots[i]);
            if s.flags() & OCCUPIED == 0 || s.is(key) {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Doubles the slot table (load factor at most 1/2).
    fn grow(&mut self) {
        let bigger = Lines::new(self.slots.capacity() * 2);
        let old = std::mem::replace(&mut self.slots, bigger);
        for line in old.lines() {
            let s = Slot(line);
            if s.flags() & OCCUPIED != 0 {
                let key = u128::from(line[0]) | u128::from(line[1]) << 64;
                let i = self.position(key);
                self.slots.lines_mut()[i] = *line;
            }
        }
    }

    /// Copies a block into the arena; its first line's index.
    fn store(&mut self, words: &[u32]) -> u32 {
        let lines = words.len().div_ceil(LINE_WORDS);
        let class = lines.next_power_of_two().trailing_zeros() as usize;
        let at = match self.free[class].pop() {
            Some(at) => at as usize,
            None => {
                let need = self.arena_len + (1 << class);
                if need > self.arena.capacity() {
                    let mut bigger = Lines::new(need.next_power_of_two().max(self.arena.capacity() * 2));
                    bigger.map[..self.arena.map.len()].copy_from_slice(&self.arena.map[..]);
                    self.arena = bigger;
                }
                let at = self.arena_len;
                self.arena_len = need;
                at
            }
        };
        let dst = &mut self.arena.words_mut()[at * LINE_WORDS..(at + (1 << class)) * LINE_WORDS];
        dst[..words.len()].copy_from_slice(words);
        dst[0] |= class as u32;
        dst[words.len()..].fill(0);
        at as u32
    }

    /// Returns a block's lines to the free list of its class.
    fn release(&mut self, at: usize) {
        let class = (self.arena.words()[at * LINE_WORDS] & 0xff) as usize;
        self.free[class].push(at as u32);
    }

    /// The id of a time zone in this directory's table.
    fn zone(&mut self, tz: TimeZone) -> u32 {
        if let Some(&id) = self.zone_ids.get(&tz) {
            return id;
        }
        let id = self.zones.len() as u32;
        self.zones.push(tz);
        self.zone_ids.insert(tz, id);
        id
    }

    /// The id of a payload type tag.
    fn payload_type(&mut self, t: &str) -> u32 {
        if let Some(&id) = self.payload_types.get(t) {
            return id;
        }
        let id = self.payload_types.len() as u32;
        self.payload_types.insert(t.into(), id);
        id
    }

    /// Open levels, flags and the block of a record.
    fn compile(&mut self, rec: &CompiledRecord) -> Compiled {
        let mut w = Block { words: vec![0; 2] };
        let (mut open, mut closed) = (0u8, 0u8);
        let profiles = &rec.profiles;
        let mut level_rules = |w: &mut Block, level: Level| match level_rules(w, rec, level) {
            Rules::Open => open |= 1 << level as u8,
            Rules::Closed => closed |= 1 << level as u8,
            Rules::At(at) => w.set_byte(3 + level as usize, at),
        };
        // The common levels first, so that their rules are in the block's first line; the token
        // levels after the restrictions.
        for level in [Level::Send, Level::Receive, Level::Discover] {
            level_rules(&mut w, level);
        }

        let entries_at = w.words.len();
        let (mut entries, mut flags) = (0u32, 0u8);
        for p in profiles.iter() {
            let r = &rec.record.profiles[p.index].restrictions;
            let presence = r.presence.as_ref().is_some_and(|pr| pr.target_online == Some(true) || pr.requester_online == Some(true));
            if r.timing.is_none() && r.location.is_none() && r.envelope.is_none() && r.path.is_none() && !presence {
                continue;
            }
            let start = w.words.len();
            w.words.push(0);
            w.matcher(&p.applies_to);
            let mut kinds = 0u32;
            if let Some(windows) = &r.timing {
                kinds |= TIMING;
                w.words.push(windows.len() as u32);
                for window in windows {
                    match window {
                        TimingWindow::Absolute { from, until } => {
                            w.words.push(0);
                            w.i64(*from);
                            w.i64(*until);
                        }
                        TimingWindow::Recurring { days, start, end, tz } => {
                            let bits = WEEK.iter().enumerate().filter(|(_, d)| days.contains(**d)).fold(0u32, |b, (i, _)| b | 1 << i);
                            w.words.push(1 | bits << 8);
                            w.words.push(start.minutes() | end.minutes() << 16);
                            let zone = self.zone(*tz);
                            w.words.push(zone);
                        }
                    }
                }
            }
            if let Some(loc) = &r.location {
                if loc.subject == LocationSubject::Requester {
                    kinds |= LOCATION;
                    w.words.push(loc.allow.len() as u32 | (loc.deny.len() as u32) << 16);
                    for area in loc.allow.iter().chain(&loc.deny) {
                        match area {
                            Area::Country { country } => {
                                let b = country.as_str().as_bytes();
                                w.words.push(u32::from(b[0]) << 8 | u32::from(b[1]) << 16);
                            }
                            Area::Circle { lat, lon, radius_m } => {
                                w.words.push(1);
                                w.i64(lat.to_bits() as i64);
                                w.i64(lon.to_bits() as i64);
                                w.i64(radius_m.to_bits() as i64);
                            }
                        }
                    }
                } else {
                    kinds |= UNJUDGED;
                }
            }
            if let Some(env) = &r.envelope {
                if env.fields.is_empty() {
                    kinds |= ENVELOPE;
                    let types = env.payload_types.as_deref();
                    w.words.push(
                        u32::from(types.is_some())
                            | u32::from(env.max_bytes.is_some()) << 1
                            | (types.map_or(0, <[String]>::len) as u32) << 16,
                    );
                    if let Some(max) = env.max_bytes {
                        w.i64(max as i64);
                    }
                    for t in types.unwrap_or_default() {
                        let id = self.payload_type(t);
                        w.words.push(id);
                    }
                } else {
                    kinds |= UNJUDGED;
                }
            }
            if presence {
                kinds |= UNJUDGED;
            }
            if let Some(path) = &r.path {
                // Last word of the entry: whether `require` names anyone (an empty route fails it).
                kinds |= PATH;
                w.words.push(u32::from(!path.require.is_empty()));
                flags |= SENDER_PATH;
            }
            w.words[start] = kinds | ((w.words.len() - start) as u32) << 16;
            entries += 1;
            flags |= RESTRICTS;
        }
        w.set_byte(1, entries as usize);
        w.set_byte(2, entries_at);
        for level in [Level::Subscribe, Level::Configure] {
            level_rules(&mut w, level);
        }

        let needs_block = open | closed != 0b1_1111 || entries > 0;
        // Offsets are bytes: a block holds at most 255 words.
        let too_long = w.words.len() > MAX_BLOCK_WORDS || entries > 0xff;
        if !needs_block {
            Compiled { open, closed, flags, words: None }
        } else if too_long {
            Compiled { open, closed, flags: flags | OPAQUE, words: None }
        } else {
            Compiled { open, closed, flags, words: Some(w.words) }
        }
    }
}

/// How a level's lists judge every requester.
enum Rules {
    /// Everyone passes.
    Open,
    /// Nobody passes (no allow rule).
    Closed,
    /// Rules at this word of the block.
    At(usize),
}

/// Writes the rules of `level` (if it has any to judge) at the end of the block.
fn level_rules(w: &mut Block, rec: &CompiledRecord, level: Level) -> Rules {
    let permissions = || rec.profiles.iter().filter_map(|p| p.permissions.as_deref().map(|perms| (p, perms)));
    let base = rec.base.level(level);
    let base_open = base.allow.parts().0 || (base.allow.is_empty() && level.open_when_empty());
    let profile_denies = permissions().any(|(_, perms)| !perms.level(level).deny.is_empty());
    if base.deny.is_empty() && base_open && !profile_denies {
        // Every registered requester passes the lists at this level (a profile can only add
        // grants to an open base).
        return Rules::Open;
    }
    let at = w.words.len();
    w.words.push(0);
    let (mut denies, mut allows) = (0u32, 0u32);
    if !base.deny.is_empty() {
        w.any();
        w.matcher(&base.deny);
        denies += 1;
    }
    for (p, perms) in permissions() {
        let lists = perms.level(level);
        if !lists.deny.is_empty() {
            w.matcher(&p.applies_to);
            w.matcher(&lists.deny);
            denies += 1;
        }
    }
    if base_open {
        w.any();
        w.any();
        allows += 1;
    } else if !base.allow.is_empty() {
        w.any();
        w.matcher(&base.allow);
        allows += 1;
    }
    for (p, perms) in permissions() {
        let lists = perms.level(level);
        // A profile grants exactly what its allow list names: never open when empty.
        if !lists.allow.is_empty() {
            w.matcher(&p.applies_to);
            w.matcher(&lists.allow);
            allows += 1;
        }
    }
    if allows == 0 {
        // Nobody is ever allowed here (a token level with no allow entry, say): the reference
        // path judges every attempt at it, so no rules are kept.
        w.words.truncate(at);
        return Rules::Closed;
    }
    w.words[at] = denies | allows << 16;
    Rules::At(at)
}

/// Monday first, as `Weekday::num_days_from_monday`.
const WEEK: [Weekday; 7] = [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun];

struct Compiled {
    open: u8,
    closed: u8,
    flags: u8,
    words: Option<Vec<u32>>,
}

/// A block being written.
///
/// Layout (`u32` words): a header of eight bytes in words 0 and 1, read by [`header`]: byte 0 the
/// size class (the arena's, set when stored), byte 1 the number of restriction entries, byte 2 the
/// word where they start, byte `3 + l` the word where the rules of level `l` start (for levels
/// neither open nor closed; every offset is below 256, see [`MAX_BLOCK_WORDS`]). Level rules: `denies | allows << 16`, then
/// each rule as two matchers (the audience it governs, `"*"` for the base record, and its list).
/// A matcher: `any | uuids << 8 | groups << 16`, four words per UUID key, one per group id. A
/// restriction entry: `kinds | length << 16`, its audience, then per kind: timing (`n`, windows:
/// `0, from, until` or `1 | days << 8, start | end << 16, zone`), location (`allow | deny << 16`,
/// areas: `country << 8` or `1, lat, lon, radius`), envelope (`types? | max? << 1 | n << 16`,
/// `max`, type ids), path (last: `require` is not empty).
struct Block {
    words: Vec<u32>,
}

impl Block {
    /// Sets header byte `i` (offsets past 255 words are caught by the length check).
    fn set_byte(&mut self, i: usize, value: usize) {
        let shift = 8 * (i % 4);
        self.words[i / 4] = (self.words[i / 4] & !(0xff << shift)) | ((value.min(0xff) as u32) << shift);
    }

    fn i64(&mut self, v: i64) {
        self.words.push(v as u32);
        self.words.push((v as u64 >> 32) as u32);
    }

    fn any(&mut self) {
        self.words.push(1);
    }

    fn matcher(&mut self, m: &Matcher) {
        let (any, uuids, groups) = m.parts();
        // Longer lists make the block too long (the record is then left to the reference path).
        let (nu, ng) = (uuids.len().min(0xff), groups.len().min(0xffff));
        self.words.push(u32::from(any) | (nu as u32) << 8 | (ng as u32) << 16);
        for u in &uuids[..nu] {
            let k = key_of(u);
            self.words.extend([k as u32, (k >> 32) as u32, (k >> 64) as u32, (k >> 96) as u32]);
        }
        self.words.extend_from_slice(&groups[..ng]);
        if nu < uuids.len() || ng < groups.len() {
            // Poison: longer than any block may be.
            self.words.resize(MAX_BLOCK_WORDS + 1, 0);
        }
    }
}

/// The tables, borrowed for a batch.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    slots: &'a [Line],
    mask: usize,
    hasher: &'a hashbrown::DefaultHashBuilder,
    arena: &'a [u32],
    dir: &'a Directory,
}

impl<'a> View<'a> {
    /// The slot of `key`, if the directory holds it (registered or tombstoned).
    #[inline]
    pub fn find(&self, key: u128) -> Option<Slot<'a>> {
        self.find_from(key, self.home(key))
    }

    /// The slot a probe for `key` starts at: [`View::prefetch_slot`] it, then [`View::find_from`]
    /// it once the line has had time to arrive.
    #[inline]
    pub fn home(&self, key: u128) -> usize {
        self.hasher.hash_one(key) as usize & self.mask
    }

    /// Asks for slot `i`'s line, without waiting for it.
    #[inline]
    pub fn prefetch_slot(&self, i: usize) {
        if let Some(line) = self.slots.get(i) {
            prefetch_l2(bytemuck::bytes_of(line));
        }
    }

    /// [`View::find`] from `key`'s home slot `i` (from [`View::home`]).
    #[inline]
    pub fn find_from(&self, key: u128, mut i: usize) -> Option<Slot<'a>> {
        i &= self.mask;
        loop {
            let s = Slot(&self.slots[i]);
            if s.flags() & OCCUPIED == 0 {
                return None;
            }
            if s.is(key) {
                return Some(s);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// What judging an attempt at `level` by `req` (key `from`) on `tgt` (key `to`) needs, both
    /// registered as of the attempt by their newest versions, credentials valid.
    #[inline]
    pub fn needs(&self, level: Level, from: u128, to: u128, token: bool, req: Slot<'a>, tgt: Slot<'a>) -> Needs {
        // Self and owner pass every list and restriction of the target, with no token, and the
        // sender's side is not checked either.
        if tgt.is_self_or_owner(from) {
            return Needs::Nothing;
        }
        if (level.needs_token() && !token) || tgt.closed(level) {
            return Needs::Reference;
        }
        let target = (!tgt.open(level)).then_some(level);
        let target_entries = tgt.flags() & RESTRICTS != 0;
        let sending = level == Level::Send && !req.is_self_or_owner(to);
        if sending && req.closed(Level::Receive) {
            return Needs::Reference;
        }
        let sender = (sending && !req.open(Level::Receive)).then_some(Level::Receive);
        let sender_paths = sending && req.flags() & SENDER_PATH != 0;
        let (t, s) = (target.is_some() || target_entries, sender.is_some() || sender_paths);
        if (t && tgt.flags() & OPAQUE != 0) || (s && req.flags() & OPAQUE != 0) {
            return Needs::Reference;
        }
        match (t, s) {
            (false, false) => Needs::Nothing,
            (t, s) => Needs::Blocks(
                t.then_some(BlockNeed { block: tgt.block() as u32, rules: target, entries: target_entries }),
                s.then_some(BlockNeed { block: req.block() as u32, rules: sender, entries: sender_paths }),
            ),
        }
    }

    /// Whether the attempt passes every check, given what [`View::needs`] asked for: `true` only
    /// when the reference path would find nothing.
    pub fn passes(&self, from: u128, to: u128, req: Slot<'a>, tgt: Slot<'a>, needs: Needs, a: &impl AttemptFields) -> bool {
        let Needs::Blocks(target, sender) = needs else {
            return needs == Needs::Nothing;
        };
        if let Some(need) = target {
            let b = self.block_words(need.block);
            let req_groups = req.groups();
            if need.rules.is_some_and(|level| !judge(b, level_offset(b, level), from, &req_groups)) {
                return false;
            }
            if need.entries && !self.target_restrictions(b, from, &req_groups, a) {
                return false;
            }
        }
        if let Some(need) = sender {
            let b = self.block_words(need.block);
            let tgt_groups = tgt.groups();
            if need.rules.is_some_and(|level| !judge(b, level_offset(b, level), to, &tgt_groups)) {
                return false;
            }
            if need.entries && !sender_paths(b, to, &tgt_groups, a) {
                return false;
            }
        }
        true
    }

    /// Asks for the first line of each block `needs` reads, without waiting for it (most checks
    /// read nothing else).
    #[inline]
    pub fn prefetch_blocks(&self, needs: Needs) {
        if let Needs::Blocks(target, sender) = needs {
            for need in [target, sender].into_iter().flatten() {
                if let Some(word) = self.arena.get(need.block as usize * LINE_WORDS) {
                    prefetch_l2(bytemuck::bytes_of(word));
                }
            }
        }
    }

    #[inline]
    fn block_words(&self, block: u32) -> &'a [u32] {
        let at = block as usize * LINE_WORDS;
        let lines = 1usize << (self.arena[at] & 0xff);
        &self.arena[at..at + lines * LINE_WORDS]
    }

    /// Every restriction entry of the target whose audience holds the requester passes.
    fn target_restrictions(&self, b: &[u32], from: u128, groups: &Groups, a: &impl AttemptFields) -> bool {
        let mut at = header(b, 2);
        for _ in 0..header(b, 1) {
            let head = b[at];
            let (kinds, len) = (head & 0xffff, (head >> 16) as usize);
            let end = at + len;
            let mut p = at + 1;
            match admits(b, &mut p, from, groups) {
                Some(false) => {
                    at = end;
                    continue;
                }
                None => return false,
                Some(true) => {}
            }
            if kinds & UNJUDGED != 0 {
                return false;
            }
            if kinds & TIMING != 0 {
                let n = b[p] as usize;
                p += 1;
                let ts = a.ts();
                let mut inside = false;
                for _ in 0..n {
                    let tag = b[p];
                    if tag & 0xff == 0 {
                        let (from, until) = (word_i64(b, p + 1), word_i64(b, p + 3));
                        inside |= from <= ts && ts < until;
                        p += 5;
                    } else {
                        let days = (tag >> 8) & 0x7f;
                        let (start, end) = (b[p + 1] & 0xffff, b[p + 1] >> 16);
                        let tz = self.dir.zones[b[p + 2] as usize].0;
                        inside = inside || restrictions::in_recurring(|d| days & (1 << d.num_days_from_monday()) != 0, start, end, tz, ts);
                        p += 3;
                    }
                }
                if !inside {
                    return false;
                }
            }
            if kinds & LOCATION != 0 {
                let (n_allow, n_deny) = ((b[p] & 0xffff) as usize, (b[p] >> 16) as usize);
                p += 1;
                let loc = a.location();
                let mut allowed = n_allow == 0;
                for _ in 0..n_allow {
                    let (area, next) = area(b, p);
                    p = next;
                    allowed |= geo::contains(&area, &loc) == Some(true);
                }
                if !allowed {
                    return false;
                }
                for _ in 0..n_deny {
                    let (area, next) = area(b, p);
                    p = next;
                    if geo::contains(&area, &loc) == Some(true) {
                        return false;
                    }
                }
            }
            if kinds & ENVELOPE != 0 {
                let head = b[p];
                p += 1;
                if head & 2 != 0 {
                    let max = word_i64(b, p) as u64;
                    p += 2;
                    if a.payload_size().is_some_and(|size| size > max) {
                        return false;
                    }
                }
                if head & 1 != 0 {
                    let n = (head >> 16) as usize;
                    let id = a.payload_type().and_then(|t| self.dir.payload_types.get(t).copied());
                    if !id.is_some_and(|id| b[p..p + n].contains(&id)) {
                        return false;
                    }
                }
            }
            if kinds & PATH != 0 && !empty_route_passes(b[end - 1], a) {
                return false;
            }
            at = end;
        }
        true
    }
}

/// The path restrictions of the sender's profiles whose audience holds the target pass.
fn sender_paths(b: &[u32], to: u128, groups: &Groups, a: &impl AttemptFields) -> bool {
    let mut at = header(b, 2);
    for _ in 0..header(b, 1) {
        let head = b[at];
        let end = at + (head >> 16) as usize;
        if head & PATH != 0 {
            let mut p = at + 1;
            match admits(b, &mut p, to, groups) {
                Some(false) => {}
                None => return false,
                Some(true) => {
                    if !empty_route_passes(b[end - 1], a) {
                        return false;
                    }
                }
            }
        }
        at = end;
    }
    true
}

/// A path restriction judged here only on an empty route: it passes unless `require` names anyone.
#[inline]
fn empty_route_passes(require: u32, a: &impl AttemptFields) -> bool {
    require == 0 && a.route_len() == 0
}

#[inline]
fn word_i64(b: &[u32], p: usize) -> i64 {
    (u64::from(b[p]) | u64::from(b[p + 1]) << 32) as i64
}

fn area(b: &[u32], p: usize) -> (Area, usize) {
    let tag = b[p];
    if tag & 0xff == 0 {
        let code = [(tag >> 8) as u8, (tag >> 16) as u8];
        let country = std::str::from_utf8(&code).ok().and_then(Country::parse);
        match country {
            Some(country) => (Area::Country { country }, p + 1),
            // Never written: a country is two letters.
            None => (Area::Circle { lat: f64::NAN, lon: f64::NAN, radius_m: f64::NAN }, p + 1),
        }
    } else {
        let f = |q| f64::from_bits(word_i64(b, q) as u64);
        (Area::Circle { lat: f(p + 1), lon: f(p + 3), radius_m: f(p + 5) }, p + 7)
    }
}

/// Header byte `i` of a block.
#[inline]
fn header(b: &[u32], i: usize) -> usize {
    ((b[i / 4] >> (8 * (i % 4))) & 0xff) as usize
}

#[inline]
fn level_offset(b: &[u32], level: Level) -> usize {
    header(b, 3 + level as usize)
}

/// The combination rule over one level's compiled rules: `true` when no deny rule whose audience
/// holds `who` names it and some allow rule does (exactly [`super::eval`]'s `judge`); `false` when
/// denied, not allowed, or not decidable here.
#[inline]
fn judge(b: &[u32], at: usize, who: u128, groups: &Groups) -> bool {
    let head = b[at];
    let (denies, allows) = (head & 0xffff, head >> 16);
    let mut p = at + 1;
    for _ in 0..denies {
        let governs = admits(b, &mut p, who, groups);
        let names = admits(b, &mut p, who, groups);
        if governs != Some(false) && names != Some(false) {
            return false;
        }
    }
    for _ in 0..allows {
        let governs = admits(b, &mut p, who, groups);
        let names = admits(b, &mut p, who, groups);
        if governs == Some(true) && names == Some(true) {
            return true;
        }
    }
    false
}

/// Whether the matcher at `*p` admits `who`, moving `*p` past it; `None` when it names groups and
/// `who`'s groups are not all known here.
#[inline]
fn admits(b: &[u32], p: &mut usize, who: u128, groups: &Groups) -> Option<bool> {
    let head = b[*p];
    let (any, nu, ng) = (head & 1 != 0, ((head >> 8) & 0xff) as usize, (head >> 16) as usize);
    let uuids = *p + 1;
    let ids = uuids + 4 * nu;
    *p = ids + ng;
    if any {
        return Some(true);
    }
    let (w0, w1, w2, w3) = (who as u32, (who >> 32) as u32, (who >> 64) as u32, (who >> 96) as u32);
    for u in b[uuids..ids].chunks_exact(4) {
        if u[0] == w0 && u[1] == w1 && u[2] == w2 && u[3] == w3 {
            return Some(true);
        }
    }
    if ng == 0 {
        return Some(false);
    }
    if groups.ids[..groups.len].iter().any(|g| b[ids..ids + ng].contains(g)) {
        return Some(true);
    }
    if groups.many { None } else { Some(false) }
}

/// A registry version: the time it holds from and the record (`None`: unregistered).
pub type Version = (i64, Option<Arc<CompiledRecord>>);

/// The registry: every version of every record as of any event time (the reference), and the
/// newest versions flattened for the policy check ([`Directory`]). Inserting keeps both.
#[derive(Debug, Default)]
pub struct Registry {
    versions: VersionedTable<Uuid, Option<Arc<CompiledRecord>>>,
    hot: Directory,
}

impl Registry {
    /// Records that `uuid` is `rec` (`None`: unregistered) from `from_ms` on. Only this record is
    /// touched, whatever the size of the directory.
    pub fn insert(&mut self, uuid: Uuid, from_ms: i64, rec: Option<Arc<CompiledRecord>>) {
        self.versions.insert(uuid, from_ms, rec);
        // The directory holds the newest version (a change older than it only adds history).
        if let Some((t, newest)) = self.versions.newest(&uuid)
            && t == from_ms
        {
            let newest = newest.clone();
            self.hot.set(&uuid, t, newest.as_deref());
        }
    }

    /// The version of `uuid` as of `at_ms` (`Some(None)`: tombstoned then).
    #[inline]
    pub fn get(&self, uuid: &Uuid, at_ms: i64) -> Option<&Option<Arc<CompiledRecord>>> {
        self.versions.get(uuid, at_ms)
    }

    /// The newest version of `uuid`, whatever its time.
    pub fn latest(&self, uuid: &Uuid) -> Option<&Option<Arc<CompiledRecord>>> {
        self.versions.latest(uuid)
    }

    /// Drops versions no lookup at or after `horizon_ms` can see (the newest always stays).
    pub fn prune(&mut self, horizon_ms: i64) {
        self.versions.prune(horizon_ms);
    }

    /// A step of [`Registry::prune`] over at most `budget` UUIDs (see
    /// [`crate::tables::VersionedTable::prune_step`]); returns how many are left to visit.
    pub fn prune_step(&mut self, horizon_ms: i64, budget: usize) -> usize {
        self.versions.prune_step(horizon_ms, budget)
    }

    /// Number of UUIDs.
    pub fn len(&self) -> usize {
        self.versions.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    /// Every version of every UUID through `f`, for snapshots (see [`VersionedTable::snapshot`]).
    pub fn snapshot<W>(&self, f: impl Fn(&Option<Arc<CompiledRecord>>) -> W) -> crate::tables::TableSnapshot<Uuid, W> {
        self.versions.snapshot(f)
    }

    /// The flattened newest versions.
    #[inline]
    pub fn hot(&self) -> &Directory {
        &self.hot
    }
}

#[cfg(test)]
mod tests;
