//! Registry records compiled for constant-time checks. A record is compiled once, when its change
//! arrives (a new registration, a changed list, a new profile), and never per attempt: group names
//! become interned ids, allow and deny lists become sorted id sets, and a per-level flag says when
//! a record has nothing to check at all. Compiling one record touches no other, so a registry change
//! costs the same whatever the size of the directory.

use std::sync::Arc;

use meshguard_schemas::Action;
use meshguard_schemas::registry::{AccessList, Country, Permissions, Principal, RegistryRecord};
use uuid::Uuid;

use crate::tables::FastMap;

/// An interned group name.
pub type GroupId = u32;

/// Group names to ids, shared by every compiled record of an engine. Ids are never reused or
/// forgotten (a group is a short string; the set of group names is small next to the directory).
#[derive(Debug, Default)]
pub struct GroupInterner {
    ids: FastMap<Box<str>, GroupId>,
}

impl GroupInterner {
    /// The id of `name`, assigning one on first sight.
    pub fn intern(&mut self, name: &str) -> GroupId {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = GroupId::try_from(self.ids.len()).unwrap_or(GroupId::MAX);
        self.ids.insert(name.into(), id);
        id
    }

    /// Number of distinct group names seen.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no group was seen.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The five access levels of a permissions record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// `discover`.
    Discover,
    /// `send`.
    Send,
    /// `receive`.
    Receive,
    /// `subscribe`.
    Subscribe,
    /// `configure`.
    Configure,
}

impl Level {
    /// Every level, in index order.
    pub const ALL: [Level; 5] = [Level::Discover, Level::Send, Level::Receive, Level::Subscribe, Level::Configure];

    /// The level an action is checked at (`connect` has none).
    pub fn of(action: Action) -> Option<Level> {
        match action {
            Action::Connect => None,
            Action::Discover => Some(Level::Discover),
            Action::Send => Some(Level::Send),
            Action::Receive => Some(Level::Receive),
            Action::Subscribe => Some(Level::Subscribe),
            Action::Configure => Some(Level::Configure),
        }
    }

    /// The contract's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Discover => "discover",
            Level::Send => "send",
            Level::Receive => "receive",
            Level::Subscribe => "subscribe",
            Level::Configure => "configure",
        }
    }

    /// An empty or absent `allow` in a *base* permissions record is open to every registered UUID
    /// at these levels; `subscribe` and `configure` are never open.
    pub const fn open_when_empty(self) -> bool {
        matches!(self, Level::Discover | Level::Send | Level::Receive)
    }

    /// These levels need the target's token besides an allow entry.
    pub const fn needs_token(self) -> bool {
        matches!(self, Level::Subscribe | Level::Configure)
    }

    /// The level's list in a permissions record.
    pub fn list(self, p: &Permissions) -> Option<&AccessList> {
        match self {
            Level::Discover => p.discover.as_ref(),
            Level::Send => p.send.as_ref(),
            Level::Receive => p.receive.as_ref(),
            Level::Subscribe => p.subscribe.as_ref(),
            Level::Configure => p.configure.as_ref(),
        }
    }
}

/// A short sorted set held inline, or a longer one on the heap. Lists in permissions records are
/// usually a handful of entries; inline, checking one costs no pointer chase (a cache miss per
/// hop on a directory of a million records).
#[derive(Debug, Clone)]
pub enum Small<T, const N: usize> {
    /// Up to `N` values; the first `len` are set.
    Inline {
        /// How many are set.
        len: u8,
        /// The values.
        values: [T; N],
    },
    /// More than `N` values.
    Heap(Box<[T]>),
}

impl<T: Copy + Default, const N: usize> Default for Small<T, N> {
    fn default() -> Self {
        Small::Inline { len: 0, values: [T::default(); N] }
    }
}

impl<T: Copy + Default + Ord, const N: usize> Small<T, N> {
    /// Sorts, dedups and stores `v`.
    fn from_vec(mut v: Vec<T>) -> Self {
        v.sort_unstable();
        v.dedup();
        if v.len() <= N {
            let mut values = [T::default(); N];
            values[..v.len()].copy_from_slice(&v);
            Small::Inline { len: v.len() as u8, values }
        } else {
            Small::Heap(v.into())
        }
    }

    /// The values, sorted.
    #[inline]
    pub fn as_slice(&self) -> &[T] {
        match self {
            Small::Inline { len, values } => &values[..usize::from(*len)],
            Small::Heap(v) => v,
        }
    }

    /// Whether `x` is in the set.
    #[inline]
    pub fn contains(&self, x: &T) -> bool {
        match self {
            Small::Inline { len, values } => values[..usize::from(*len)].contains(x),
            Small::Heap(v) => v.binary_search(x).is_ok(),
        }
    }
}

/// A list of principals (`"*"`, UUIDs, `group:NAME`) compiled for membership tests.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    any: bool,
    uuids: Small<Uuid, 2>,
    groups: Small<GroupId, 3>,
}

impl Matcher {
    /// Compiles a list.
    pub fn compile(list: &[Principal], interner: &mut GroupInterner) -> Self {
        let mut any = false;
        let mut uuids = Vec::new();
        let mut groups = Vec::new();
        for p in list {
            match p {
                Principal::Any => any = true,
                Principal::Uuid(u) => uuids.push(*u),
                Principal::Group(g) => groups.push(interner.intern(g)),
            }
        }
        Self { any, uuids: Small::from_vec(uuids), groups: Small::from_vec(groups) }
    }

    /// Whether the list names nobody.
    #[inline]
    pub fn is_empty(&self) -> bool {
        !self.any && self.uuids.as_slice().is_empty() && self.groups.as_slice().is_empty()
    }

    /// `"*"`, the UUIDs and the group ids it names, each set sorted.
    #[inline]
    pub fn parts(&self) -> (bool, &[Uuid], &[GroupId]) {
        (self.any, self.uuids.as_slice(), self.groups.as_slice())
    }

    /// Whether the list admits `who`, a member of `who_groups` (interned ids).
    #[inline]
    pub fn admits(&self, who: &Uuid, who_groups: &[GroupId]) -> bool {
        self.any || self.uuids.contains(who) || (!self.groups.as_slice().is_empty() && who_groups.iter().any(|g| self.groups.contains(g)))
    }
}

/// One level's allow and deny lists, compiled.
#[derive(Debug, Clone, Default)]
pub struct LevelLists {
    /// Whitelist.
    pub allow: Matcher,
    /// Blacklist; wins over every allow.
    pub deny: Matcher,
}

/// A permissions record, compiled: one [`LevelLists`] per [`Level`] (absent levels are empty).
#[derive(Debug, Clone, Default)]
pub struct CompiledPermissions([LevelLists; 5]);

impl CompiledPermissions {
    fn compile(p: &Permissions, interner: &mut GroupInterner) -> Self {
        Self(Level::ALL.map(|level| match level.list(p) {
            Some(list) => LevelLists { allow: Matcher::compile(&list.allow, interner), deny: Matcher::compile(&list.deny, interner) },
            None => LevelLists::default(),
        }))
    }

    /// The lists of one level.
    #[inline]
    pub fn level(&self, level: Level) -> &LevelLists {
        &self.0[level as usize]
    }
}

/// A security profile, compiled. Its restrictions stay in the registry record (they are read only
/// when the profile applies, and are already typed and validated by decoding).
#[derive(Debug, Clone)]
pub struct CompiledProfile {
    /// Position in [`RegistryRecord::profiles`].
    pub index: usize,
    /// Requesters it governs.
    pub applies_to: Matcher,
    /// Its grants and denials, if it has a permissions record.
    pub permissions: Option<Box<CompiledPermissions>>,
}

/// A registry record compiled for the policy checks.
#[derive(Debug, Clone)]
pub struct CompiledRecord {
    /// The registered UUID (copied out of the record: the hot checks read no further than here).
    uuid: Uuid,
    /// The owner, likewise.
    owner: Option<Uuid>,
    /// The record as registered (for restrictions, `rule` names and `detail` values).
    pub record: Arc<RegistryRecord>,
    /// Groups the UUID belongs to, interned, sorted.
    pub groups: Small<GroupId, 4>,
    /// Where the UUID is registered, when the record says so in ISO 3166 alpha-2.
    pub country: Option<Country>,
    /// The base permissions record (boxed: most records are checked only through `open`).
    pub base: Box<CompiledPermissions>,
    /// Security profiles, in record order.
    pub profiles: Box<[CompiledProfile]>,
    /// Bit `level` set: at that level the record admits every registered requester and has no
    /// profile, so a check against it can stop here.
    open: u8,
}

impl CompiledRecord {
    /// Compiles a record, interning its group names.
    pub fn compile(record: Arc<RegistryRecord>, interner: &mut GroupInterner) -> Self {
        let groups = Small::from_vec(record.groups.iter().map(|g| interner.intern(g)).collect());
        let base = Box::new(CompiledPermissions::compile(&record.permissions, interner));
        let profiles: Box<[CompiledProfile]> = record
            .profiles
            .iter()
            .enumerate()
            .map(|(index, p)| CompiledProfile {
                index,
                applies_to: Matcher::compile(&p.applies_to, interner),
                permissions: p.permissions.as_ref().map(|perms| Box::new(CompiledPermissions::compile(perms, interner))),
            })
            .collect();
        let mut open = 0u8;
        if profiles.is_empty() {
            for level in Level::ALL {
                let lists = base.level(level);
                if lists.deny.is_empty() && (lists.allow.any || (lists.allow.is_empty() && level.open_when_empty())) {
                    open |= 1 << level as u8;
                }
            }
        }
        let country = record.country.as_deref().and_then(Country::parse);
        Self { uuid: record.uuid, owner: record.owner, record, groups, country, base, profiles, open }
    }

    /// The registered UUID.
    #[inline]
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// The owner, if any.
    #[inline]
    pub fn owner(&self) -> Option<Uuid> {
        self.owner
    }

    /// Whether any registered requester passes this record at `level` without a token (no
    /// profile, no deny, an open or `"*"` allow).
    #[inline]
    pub fn open_at(&self, level: Level) -> bool {
        self.open & (1 << level as u8) != 0
    }

    /// Whether `who` passes every list and restriction of this record: itself or its owner.
    #[inline]
    pub fn is_self_or_owner(&self, who: &Uuid) -> bool {
        self.uuid == *who || self.owner == Some(*who)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> CompiledRecord {
        let rec = RegistryRecord::from_json(0, json.as_bytes()).expect("valid record");
        CompiledRecord::compile(Arc::new(rec), &mut GroupInterner::default())
    }

    #[test]
    fn open_levels_are_flagged_once_at_compile_time() {
        let r = record(
            r#"{"uuid":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f","kind":"device",
                "permissions":{"discover":{"allow":["*"]},"send":{"allow":[],"deny":["group:x"]},"subscribe":{"allow":["*"]}}}"#,
        );
        assert!(r.open_at(Level::Discover), "allow *");
        assert!(!r.open_at(Level::Send), "a deny list means a check");
        assert!(r.open_at(Level::Receive), "absent: open when empty");
        assert!(r.open_at(Level::Subscribe), "allow * (the token is checked apart)");
        assert!(!r.open_at(Level::Configure), "never open when empty");
    }

    #[test]
    fn matchers_resolve_groups_to_ids() {
        let mut interner = GroupInterner::default();
        let list = [Principal::Group("home:a".into()), Principal::Uuid(Uuid::from_u128(7))];
        let m = Matcher::compile(&list, &mut interner);
        let member = [interner.intern("other"), interner.intern("home:a")];
        let mut member = member.to_vec();
        member.sort_unstable();
        assert!(m.admits(&Uuid::from_u128(1), &member));
        assert!(m.admits(&Uuid::from_u128(7), &[]));
        assert!(!m.admits(&Uuid::from_u128(1), &[interner.intern("other")]));
        assert!(!Matcher::default().admits(&Uuid::from_u128(7), &member));
    }
}
