//! The permission semantics: worked cases from the contract, then properties over random
//! directories (deny wins, self, owner, open-when-empty, token-required levels) and a reference
//! reading of the contract, written plainly over the uncompiled records, that the compiled checks
//! must agree with on every generated attempt.

#![allow(clippy::unwrap_used)]

use meshguard_schemas::registry::{AccessList, Principal, RegistryRecord};
use meshguard_schemas::{Action, FindingKind};
use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

use super::Level;
use super::testing::{Directory, at, attempt, u};

const BULB: &str = include_str!("../../../schemas/tests/fixtures/registry-lighting.json");
const GUEST: &str = "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
const OWNER: &str = "d0d0d0d0-1111-4222-8333-444444444444";
const BAD: &str = "bad0bad0-0000-4000-8000-000000000000";

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

fn kinds(v: &[super::Violation]) -> Vec<(FindingKind, &str)> {
    v.iter().map(|v| (v.kind, v.rule.as_str())).collect()
}

/// The contract's example directory: the lighting record, its owner, the guest, a utility company
/// member and the denied UUID (in the home group, so only the deny list stops it).
fn lighting() -> (Directory, Uuid) {
    let mut d = Directory::default();
    let bulb = d.add(BULB);
    d.add(&format!(r#"{{"uuid":"{OWNER}","kind":"person","groups":["home:d0d0"]}}"#));
    d.add(&format!(r#"{{"uuid":"{GUEST}","kind":"person"}}"#));
    d.add(&format!(r#"{{"uuid":"{BAD}","kind":"person","groups":["home:d0d0"]}}"#));
    d.add(r#"{"uuid":"00000000-0000-4000-8000-00000000beef","kind":"system","groups":["company:gridco"],"country":"DE"}"#);
    d.online.insert(bulb, true);
    (d, bulb)
}

#[test]
fn the_contracts_example_renter_outside_the_rental_window() {
    let (d, bulb) = lighting();
    let mut a = attempt(Action::Send, uuid(GUEST), bulb, at("2026-11-24T17:00:00.123Z"));
    a.payload_type = Some("command");
    a.payload = Some(r#"{"command":"off"}"#);
    a.payload_bytes = Some(17);
    // The base send list names only the home group; the renter profile grants the guest.
    let v = d.judge(&a);
    assert_eq!(kinds(&v), vec![(FindingKind::TimingRestriction, "profile:renter/timing")]);
    assert_eq!(v[0].detail["at"], "2026-11-24T17:00:00.123Z");

    a.ts = at("2026-12-24T12:00:00Z");
    assert!(d.judge(&a).is_empty(), "inside the rental window");
    a.payload = Some(r#"{"command":"dim"}"#);
    assert_eq!(kinds(&d.judge(&a)), vec![(FindingKind::EnvelopeRestriction, "profile:renter/envelope")]);

    let mut offline = lighting().0;
    offline.online.clear();
    a.payload = Some(r#"{"command":"on"}"#);
    assert_eq!(kinds(&offline.judge(&a)), vec![(FindingKind::PresenceRestriction, "profile:renter/presence")]);
}

#[test]
fn deny_wins_over_group_allow_and_owner_passes_everything() {
    let (d, bulb) = lighting();
    let a = attempt(Action::Send, uuid(BAD), bulb, at("2026-11-24T17:00:00Z"));
    let v = d.judge(&a);
    assert_eq!(kinds(&v), vec![(FindingKind::PermissionDenied, "permissions:send/deny")]);
    assert_eq!(v[0].detail["reason"], "denied");
    // The owner: no profile applies, no token needed, even at configure.
    for action in [Action::Send, Action::Configure, Action::Subscribe, Action::Discover] {
        assert!(d.judge(&attempt(action, uuid(OWNER), bulb, 0)).is_empty(), "{action}");
    }
    // The bulb on itself.
    assert!(d.judge(&attempt(Action::Configure, bulb, bulb, 0)).is_empty());
}

#[test]
fn token_levels_need_an_allow_entry_and_the_token() {
    let (d, bulb) = lighting();
    // subscribe's allow is empty: never open, token or not.
    let mut a = attempt(Action::Subscribe, uuid(GUEST), bulb, at("2026-12-24T12:00:00Z"));
    a.target_token = true;
    // The renter profile's restrictions govern every attempt of the guest on the bulb: a subscribe
    // carries no `command` payload, so its envelope rule fails too.
    assert_eq!(
        kinds(&d.judge(&a)),
        vec![(FindingKind::PermissionDenied, "permissions:subscribe/allow"), (FindingKind::EnvelopeRestriction, "profile:renter/envelope")]
    );
    // discover allows "*"; deny is per level (BAD is denied only at send).
    assert!(d.judge(&attempt(Action::Discover, uuid(BAD), bulb, 0)).is_empty());

    let mut d = Directory::default();
    let cam = d.add(&format!(
        r#"{{"uuid":"00000000-0000-4000-8000-0000000000ca","kind":"device","permissions":{{"configure":{{"allow":["{GUEST}"]}}}}}}"#
    ));
    d.add(&format!(r#"{{"uuid":"{GUEST}","kind":"person"}}"#));
    let mut a = attempt(Action::Configure, uuid(GUEST), cam, 0);
    let v = d.judge(&a);
    assert_eq!(kinds(&v), vec![(FindingKind::PermissionDenied, "permissions:configure/target_token")]);
    assert_eq!(v[0].severity, meshguard_schemas::Severity::High);
    a.target_token = true;
    assert!(d.judge(&a).is_empty());
}

#[test]
fn a_send_needs_the_senders_receive_list_too() {
    let mut d = Directory::default();
    let (a, b, c) = (u(0xa), u(0xb), u(0xc));
    d.add(&format!(r#"{{"uuid":"{b}","kind":"device"}}"#));
    d.add(&format!(r#"{{"uuid":"{c}","kind":"device","groups":["ops"]}}"#));
    d.add(&format!(
        r#"{{"uuid":"{a}","kind":"device","permissions":{{"receive":{{"allow":["{c}"],"deny":["{b}"]}}}},
            "profiles":[{{"name":"ops","applies_to":["group:ops"],"restrictions":{{"path":{{"max_hops":1}}}}}}]}}"#
    ));
    let v = d.judge(&attempt(Action::Send, a, b, 0));
    assert_eq!(kinds(&v), vec![(FindingKind::PermissionDenied, "sender:permissions:receive/deny")]);
    assert_eq!((v[0].detail["side"].as_str(), v[0].detail["principal"].as_str()), (Some("sender"), Some(b.to_string().as_str())));
    // c is on a's receive list; a's own profile for group ops bounds the route of its sends to c.
    let hops = super::testing::hops(&[a, u(1), u(2)]);
    let mut m = attempt(Action::Send, a, c, 0);
    assert!(d.judge(&m).is_empty());
    m.route = super::testing::route(&hops);
    assert_eq!(kinds(&d.judge(&m)), vec![(FindingKind::PathRestriction, "sender:profile:ops/path")]);
    // The profile governs requesters in group ops on a; it is not a's send rule for others.
    assert!(d.judge(&attempt(Action::Receive, c, a, 0)).is_empty(), "c's receive on a: a's base receive list admits c");
}

#[test]
fn profiles_grant_exactly_what_they_name_and_their_denials_win() {
    let mut d = Directory::default();
    let (r, t, other) = (u(0xa), u(0xb), u(0xc));
    d.add(&format!(r#"{{"uuid":"{r}","kind":"person","groups":["fam"]}}"#));
    d.add(&format!(r#"{{"uuid":"{other}","kind":"person","groups":["fam"]}}"#));
    d.add(&format!(
        r#"{{"uuid":"{t}","kind":"device","permissions":{{"send":{{"allow":["group:fam"]}},"subscribe":{{"allow":["*"]}}}},
            "profiles":[{{"name":"kid","applies_to":["{r}"],"permissions":{{"send":{{"deny":["*"]}},"configure":{{"allow":[]}}}}}},
                        {{"name":"everyone","applies_to":["*"],"permissions":{{"configure":{{"allow":["group:fam"]}}}}}}]}}"#
    ));
    assert_eq!(
        kinds(&d.judge(&attempt(Action::Send, r, t, 0))),
        vec![(FindingKind::PermissionDenied, "profile:kid/permissions:send/deny")]
    );
    assert!(d.judge(&attempt(Action::Send, other, t, 0)).is_empty(), "the kid profile does not apply to others");
    let mut cfg = attempt(Action::Configure, other, t, 0);
    cfg.target_token = true;
    assert!(d.judge(&cfg).is_empty(), "granted by the everyone profile");
    // Receive: the base list is absent (open when empty) and no profile denies.
    assert!(d.judge(&attempt(Action::Receive, r, t, 0)).is_empty());
}

// ---- properties -------------------------------------------------------------------------------

const N: u128 = 4;
const GROUPS: [&str; 3] = ["g0", "g1", "g2"];

fn principal() -> impl Strategy<Value = Principal> {
    prop_oneof![
        1 => Just(Principal::Any),
        3 => (1..=N).prop_map(|i| Principal::Uuid(u(i))),
        3 => (0..GROUPS.len()).prop_map(|g| Principal::Group(GROUPS[g].to_owned())),
    ]
}

fn list() -> impl Strategy<Value = Option<AccessList>> {
    proptest::option::weighted(0.8, (prop::collection::vec(principal(), 0..3), prop::collection::vec(principal(), 0..2)))
        .prop_map(|o| o.map(|(allow, deny)| AccessList { allow, deny }))
}

fn permissions() -> impl Strategy<Value = serde_json::Value> {
    (list(), list(), list(), list(), list())
        .prop_map(|(d, s, r, sub, c)| json!({"discover": d, "send": s, "receive": r, "subscribe": sub, "configure": c}))
}

fn record(i: u128) -> impl Strategy<Value = serde_json::Value> {
    let profile = (prop::collection::vec(principal(), 0..3), proptest::option::of(permissions()))
        .prop_map(|(applies_to, permissions)| json!({"name": "p", "applies_to": applies_to, "permissions": permissions}));
    (prop::collection::vec(0..GROUPS.len(), 0..3), proptest::option::of(1..=N), permissions(), prop::collection::vec(profile, 0..3)).prop_map(
        move |(groups, owner, permissions, profiles)| {
            let groups: Vec<&str> = groups.into_iter().map(|g| GROUPS[g]).collect();
            json!({"uuid": u(i), "kind": "device", "groups": groups, "owner": owner.map(u), "permissions": permissions, "profiles": profiles})
        },
    )
}

fn directory() -> impl Strategy<Value = Vec<serde_json::Value>> {
    (record(1), record(2), record(3), record(4)).prop_map(|(a, b, c, d)| vec![a, b, c, d])
}

fn action() -> impl Strategy<Value = Action> {
    prop::sample::select(vec![Action::Discover, Action::Send, Action::Receive, Action::Subscribe, Action::Configure])
}

fn build(records: &[serde_json::Value]) -> (Directory, Vec<RegistryRecord>) {
    let mut d = Directory::default();
    let raw = records.iter().map(|r| serde_json::from_value::<RegistryRecord>(r.clone()).unwrap()).collect();
    for r in records {
        d.add(&r.to_string());
    }
    (d, raw)
}

/// The contract, read plainly over uncompiled records: the reference the compiled checks must match.
mod reference {
    use super::*;

    fn level(a: Action) -> usize {
        match a {
            Action::Discover => 0,
            Action::Send => 1,
            Action::Receive => 2,
            Action::Subscribe => 3,
            _ => 4,
        }
    }

    fn lists(p: &meshguard_schemas::registry::Permissions) -> [&Option<AccessList>; 5] {
        [&p.discover, &p.send, &p.receive, &p.subscribe, &p.configure]
    }

    fn names(p: &Principal, who: &RegistryRecord) -> bool {
        match p {
            Principal::Any => true,
            Principal::Uuid(x) => *x == who.uuid,
            Principal::Group(g) => who.groups.contains(g),
        }
    }

    /// `rec`'s lists at `lvl` admit `who` (the combination rule; self and owner aside).
    pub(super) fn admits(rec: &RegistryRecord, lvl: usize, who: &RegistryRecord) -> bool {
        let applicable: Vec<_> = rec.profiles.iter().filter(|p| p.applies_to.iter().any(|x| names(x, who))).collect();
        let base = lists(&rec.permissions)[lvl];
        let deny = |l: &Option<AccessList>| l.as_ref().is_some_and(|l| l.deny.iter().any(|x| names(x, who)));
        let allow = |l: &Option<AccessList>| l.as_ref().is_some_and(|l| l.allow.iter().any(|x| names(x, who)));
        if deny(base) || applicable.iter().any(|p| p.permissions.as_ref().is_some_and(|perms| deny(lists(perms)[lvl]))) {
            return false;
        }
        let open = lvl <= 2 && base.as_ref().is_none_or(|l| l.allow.is_empty());
        open || allow(base) || applicable.iter().any(|p| p.permissions.as_ref().is_some_and(|perms| allow(lists(perms)[lvl])))
    }

    /// Whether the attempt is denied by the permission lists.
    pub(super) fn denied(req: &RegistryRecord, tgt: &RegistryRecord, action: Action, token: bool) -> bool {
        let owner_or_self = |rec: &RegistryRecord, who: &RegistryRecord| rec.uuid == who.uuid || rec.owner == Some(who.uuid);
        if owner_or_self(tgt, req) {
            return false;
        }
        let lvl = level(action);
        if !admits(tgt, lvl, req) || (lvl >= 3 && !token) {
            return true;
        }
        action == Action::Send && !owner_or_self(req, tgt) && !admits(req, 2, tgt)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn permission_checks_agree_with_the_plain_reading(records in directory(), from in 1..=N, to in 1..=N, action in action(), token: bool) {
        let (d, raw) = build(&records);
        let mut a = attempt(action, u(from), u(to), 0);
        a.target_token = token;
        let denied = d.judge(&a).iter().any(|v| v.kind == FindingKind::PermissionDenied);
        let (req, tgt) = (&raw[(from - 1) as usize], &raw[(to - 1) as usize]);
        prop_assert_eq!(denied, reference::denied(req, tgt, action, token), "{:?} {} -> {}", action, from, to);
    }

    #[test]
    fn self_and_owner_pass_everything(records in directory(), who in 1..=N, action in action(), token: bool) {
        let (d, raw) = build(&records);
        let mut a = attempt(action, u(who), u(who), 0);
        a.target_token = token;
        prop_assert!(d.judge(&a).is_empty(), "self");
        for t in 1..=N {
            if raw[(t - 1) as usize].owner == Some(u(who)) {
                let mut a = attempt(action, u(who), u(t), 0);
                a.target_token = token;
                prop_assert!(d.judge(&a).is_empty(), "owner of {}", t);
            }
        }
    }

    #[test]
    fn deny_wins_at_any_level_and_in_any_applicable_profile(
        records in directory(), from in 1..=N, action in action(), in_profile: bool, how in 0..3usize,
    ) {
        // Whatever else the lists say, a deny entry naming the requester (by UUID, group or "*") in
        // the base record or in a profile that applies to it denies.
        let to = from % N + 1;
        let mut records = records;
        records[(to - 1) as usize]["owner"] = serde_json::Value::Null;
        records[(from - 1) as usize]["groups"] = json!(["g0"]);
        let entry = [json!(u(from)), json!("group:g0"), json!("*")][how].clone();
        let level = Level::of(action).unwrap().as_str();
        let target = &mut records[(to - 1) as usize];
        if in_profile {
            let profiles = target["profiles"].as_array_mut().unwrap();
            profiles.push(json!({"name": "deny", "applies_to": [u(from)], "permissions": {level: {"deny": [entry]}}}));
        } else {
            target["permissions"][level] = json!({"allow": ["*"], "deny": [entry]});
        }
        let (d, _) = build(&records);
        let mut a = attempt(action, u(from), u(to), 0);
        a.target_token = true;
        let v = d.judge(&a);
        prop_assert!(v.iter().any(|v| v.kind == FindingKind::PermissionDenied && v.detail["reason"] == "denied"), "{:?}", v);
    }

    #[test]
    fn empty_base_lists_are_open_only_at_discover_send_and_receive(records in directory(), from in 1..=N, to in 1..=N, action in action()) {
        prop_assume!(from != to);
        let mut records = records;
        // The target: no profile, no lists at all; the requester: no profile, no lists.
        for i in [from, to] {
            records[(i - 1) as usize]["permissions"] = json!({});
            records[(i - 1) as usize]["profiles"] = json!([]);
            records[(i - 1) as usize]["owner"] = serde_json::Value::Null;
        }
        let (d, _) = build(&records);
        let mut a = attempt(action, u(from), u(to), 0);
        a.target_token = true;
        let denied = d.judge(&a).iter().any(|v| v.kind == FindingKind::PermissionDenied);
        let open = matches!(action, Action::Discover | Action::Send | Action::Receive);
        prop_assert_eq!(denied, !open, "{:?}", action);
    }

    #[test]
    fn token_levels_always_need_the_token(records in directory(), from in 1..=N, configure: bool) {
        let to = from % N + 1;
        let mut records = records;
        records[(to - 1) as usize]["owner"] = serde_json::Value::Null;
        let (d, _) = build(&records);
        let action = if configure { Action::Configure } else { Action::Subscribe };
        let a = attempt(action, u(from), u(to), 0);
        prop_assert!(d.judge(&a).iter().any(|v| v.kind == FindingKind::PermissionDenied));
    }
}
