//! Judging one attempt by a registered requester with valid credentials on a registered target:
//! the permission lists (target's side and, for a `send`, the sender's side) and the restrictions
//! of every applicable security profile. The requester checks that come first (enforcement state,
//! registration, credentials) and the target's registration are the caller's.
//!
//! Everything here reads borrowed columns and compiled records; it allocates only to describe a
//! violation.

use arrow::array::{Array, FixedSizeBinaryArray};
use meshguard_schemas::registry::{LocationSubject, Profile};
use meshguard_schemas::{Action, FindingKind, Severity};
use serde_json::{Value, json};
use uuid::Uuid;

use super::compile::{CompiledPermissions, CompiledRecord, GroupId, Level};
use super::geo::Location;
use super::restrictions;

/// The `route` of an attempt: a run of values of the batch's route column, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    values: Option<&'a FixedSizeBinaryArray>,
    start: usize,
    end: usize,
}

impl<'a> Route<'a> {
    /// No hops.
    pub const EMPTY: Route<'static> = Route { values: None, start: 0, end: 0 };

    /// Hops `start..end` of a route column's values.
    pub fn new(values: &'a FixedSizeBinaryArray, start: usize, end: usize) -> Self {
        Self { values: Some(values), start, end: end.min(values.len()) }
    }

    /// Number of hops.
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Whether there are no hops.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hops, origin first.
    pub fn iter(&self) -> impl Iterator<Item = Uuid> + 'a {
        let values = self.values;
        (self.start..self.end).filter_map(move |i| {
            let v = values?;
            if v.is_null(i) {
                return None;
            }
            <[u8; 16]>::try_from(v.value(i)).ok().map(Uuid::from_bytes)
        })
    }
}

/// One message attempt, borrowed from the columns of its batch.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// Event time.
    pub ts: i64,
    /// What it tries to do (never `connect` here).
    pub action: Action,
    /// The requester.
    pub from: Uuid,
    /// The target.
    pub to: Uuid,
    /// The requester presented the target's token.
    pub target_token: bool,
    /// Hops, origin first.
    pub route: Route<'a>,
    /// The requester's location.
    pub location: Location,
    /// The platform's payload type tag.
    pub payload_type: Option<&'a str>,
    /// The payload's JSON text, when readable.
    pub payload: Option<&'a str>,
    /// Payload size in bytes.
    pub payload_bytes: Option<i64>,
    /// Encrypted end to end.
    pub encrypted: bool,
}

/// What the checks may look up, as of an event time.
pub trait Lookups {
    /// The compiled registry record of `uuid` as of `at_ms` (`None`: not registered then).
    fn record(&self, uuid: &Uuid, at_ms: i64) -> Option<&CompiledRecord>;
    /// Whether `uuid` is online as of `at_ms` (no presence record yet: offline).
    fn online(&self, uuid: &Uuid, at_ms: i64) -> bool;
    /// The latest known location of `uuid` as of `at_ms`, from its own attempts.
    fn location(&self, uuid: &Uuid, at_ms: i64) -> Option<Location>;
}

/// One broken rule, ready to become a finding.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Finding kind.
    pub kind: FindingKind,
    /// Which record, profile and rule fired, e.g. `profile:renter/timing`.
    pub rule: String,
    /// The values that decided it.
    pub detail: Value,
    /// Severity.
    pub severity: Severity,
}

/// The restriction kinds judged per attempt, in the order of their finding kinds.
const RESTRICTIONS: [FindingKind; 5] = [
    FindingKind::TimingRestriction,
    FindingKind::LocationRestriction,
    FindingKind::EnvelopeRestriction,
    FindingKind::PathRestriction,
    FindingKind::PresenceRestriction,
];

/// Whether an attempt passes every list and restriction without looking at it further: the
/// requester is the target or its owner, or neither side has anything to check (no profile, no
/// deny list, an open allow list, no token needed). Most attempts stop here, before the caller
/// reads the rest of the row.
#[inline]
pub fn passes_at_once(action: Action, from: &Uuid, to: &Uuid, req: &CompiledRecord, tgt: &CompiledRecord) -> bool {
    let Some(level) = Level::of(action) else {
        return true;
    };
    // Self and owner pass every list and every profile restriction of the target, with no token.
    tgt.is_self_or_owner(from)
        || (tgt.open_at(level) && !level.needs_token() && (level != Level::Send || req.open_at(Level::Receive) || req.is_self_or_owner(to)))
}

/// Judges `a` (requester `req`, target `tgt`, both registered as of `a.ts`, credentials valid) and
/// appends at most one violation per finding kind to `out`, in kind order.
pub fn evaluate(a: &Attempt<'_>, req: &CompiledRecord, tgt: &CompiledRecord, look: &impl Lookups, out: &mut Vec<Violation>) {
    let Some(level) = Level::of(a.action) else {
        return;
    };
    if passes_at_once(a.action, &a.from, &a.to, req, tgt) {
        return;
    }
    let sending = level == Level::Send;

    if let Some(v) = permissions(a, level, req, tgt) {
        out.push(v);
    }

    // Restrictions of every profile of the target that governs the requester; for a `send`, also
    // the path restrictions of the sender's own profiles that apply to the target.
    let mut broken: [Option<(String, Value)>; 5] = Default::default();
    for p in applicable(tgt, &a.from, req.groups.as_slice()) {
        let profile = &tgt.record.profiles[p];
        restrict(a, profile, look, &mut broken);
    }
    if sending && !req.is_self_or_owner(&a.to) {
        for p in applicable(req, &a.to, tgt.groups.as_slice()) {
            let profile = &req.record.profiles[p];
            if let Some(r) = &profile.restrictions.path
                && broken[3].is_none()
                && let Some(detail) = restrictions::path(r, a, look)
            {
                broken[3] = Some((format!("sender:profile:{}/path", profile.name), detail));
            }
        }
    }
    for (kind, b) in RESTRICTIONS.into_iter().zip(broken) {
        if let Some((rule, detail)) = b {
            out.push(Violation { kind, rule, detail, severity: Severity::Medium });
        }
    }
}

/// Indexes of the profiles of `rec` whose `applies_to` admits `who`.
fn applicable<'r>(rec: &'r CompiledRecord, who: &'r Uuid, groups: &'r [GroupId]) -> impl Iterator<Item = usize> + 'r {
    rec.profiles.iter().filter(move |p| p.applies_to.admits(who, groups)).map(|p| p.index)
}

/// Checks one profile's restrictions, keeping the first violation of each kind.
fn restrict(a: &Attempt<'_>, profile: &Profile, look: &impl Lookups, broken: &mut [Option<(String, Value)>; 5]) {
    let r = &profile.restrictions;
    let rule = |name: &str| format!("profile:{}/{name}", profile.name);
    if broken[0].is_none()
        && let Some(windows) = &r.timing
        && let Some(d) = restrictions::timing(windows, a.ts)
    {
        broken[0] = Some((rule("timing"), d));
    }
    if broken[1].is_none()
        && let Some(loc) = &r.location
    {
        let target = if loc.subject == LocationSubject::Requester { None } else { look.location(&a.to, a.ts) };
        if let Some(d) = restrictions::location(loc, &a.location, target.as_ref()) {
            broken[1] = Some((rule("location"), d));
        }
    }
    if broken[2].is_none()
        && let Some(env) = &r.envelope
        && let Some(d) = restrictions::envelope(env, a)
    {
        broken[2] = Some((rule("envelope"), d));
    }
    if broken[3].is_none()
        && let Some(path) = &r.path
        && let Some(d) = restrictions::path(path, a, look)
    {
        broken[3] = Some((rule("path"), d));
    }
    if broken[4].is_none()
        && let Some(presence) = &r.presence
        && let Some(d) = restrictions::presence(presence, a, look)
    {
        broken[4] = Some((rule("presence"), d));
    }
}

/// How one side's lists judged a principal.
enum ListVerdict {
    Allowed,
    /// A deny list admitted it: `None` for the base record, else the profile index.
    Denied(Option<usize>),
    /// No allow list admitted it.
    NotAllowed,
}

/// The combination rule of the contract for one record, one level and one principal: allowed when
/// the base list (open when empty at `discover`, `send`, `receive`) or any applicable profile's
/// list admits it, and no applicable deny list does.
fn judge(rec: &CompiledRecord, level: Level, who: &Uuid, who_groups: &[GroupId]) -> ListVerdict {
    if rec.open_at(level) {
        // No profile, no deny, an open allow: decided without reading the lists.
        return ListVerdict::Allowed;
    }
    let base = rec.base.level(level);
    if base.deny.admits(who, who_groups) {
        return ListVerdict::Denied(None);
    }
    let mut allowed = base.allow.admits(who, who_groups) || (base.allow.is_empty() && level.open_when_empty());
    for p in rec.profiles.iter() {
        let Some(perms) = p.permissions.as_deref() else {
            continue;
        };
        if !p.applies_to.admits(who, who_groups) {
            continue;
        }
        let lists = CompiledPermissions::level(perms, level);
        if lists.deny.admits(who, who_groups) {
            return ListVerdict::Denied(Some(p.index));
        }
        // A profile grants exactly what its allow list names: never open when empty.
        allowed = allowed || lists.allow.admits(who, who_groups);
    }
    if allowed { ListVerdict::Allowed } else { ListVerdict::NotAllowed }
}

/// The permission check: the target's list for the level (with its token for `subscribe` and
/// `configure`) and, for a `send`, the sender's `receive` list for the target.
fn permissions(a: &Attempt<'_>, level: Level, req: &CompiledRecord, tgt: &CompiledRecord) -> Option<Violation> {
    let severity = if level == Level::Configure { Severity::High } else { Severity::Medium };
    let denied = |side: &str, rec: &CompiledRecord, level: Level, verdict: ListVerdict, principal: Uuid| -> Option<Violation> {
        let list_rule = |what: &str, profile: Option<usize>| match profile {
            None => format!("{side}permissions:{}/{what}", level.as_str()),
            Some(i) => format!("{side}profile:{}/permissions:{}/{what}", rec.record.profiles[i].name, level.as_str()),
        };
        let (rule, reason, profile) = match verdict {
            ListVerdict::Allowed => return None,
            ListVerdict::Denied(p) => (list_rule("deny", p), "denied", p),
            ListVerdict::NotAllowed => (list_rule("allow", None), "not allowed", None),
        };
        let side_name = if side.is_empty() { "target" } else { "sender" };
        let mut detail =
            json!({ "level": level.as_str(), "side": side_name, "record": rec.uuid(), "principal": principal, "reason": reason });
        if let Some(p) = profile {
            detail["profile"] = json!(rec.record.profiles[p].name);
        }
        Some(Violation { kind: FindingKind::PermissionDenied, rule, detail, severity })
    };

    let target_side = judge(tgt, level, &a.from, req.groups.as_slice());
    if let Some(v) = denied("", tgt, level, target_side, a.from) {
        return Some(v);
    }
    if level.needs_token() && !a.target_token {
        let detail = json!({ "level": level.as_str(), "side": "target", "record": tgt.uuid(), "principal": a.from, "reason": "target token missing" });
        return Some(Violation {
            kind: FindingKind::PermissionDenied,
            rule: format!("permissions:{}/target_token", level.as_str()),
            detail,
            severity,
        });
    }
    if level == Level::Send && !req.is_self_or_owner(&a.to) {
        let sender_side = judge(req, Level::Receive, &a.to, tgt.groups.as_slice());
        return denied("sender:", req, Level::Receive, sender_side, a.to);
    }
    None
}
