//! The fast path against the reference: over random directories (lists, owners, up to six groups,
//! profiles with every kind of restriction, several versions and tombstones per UUID) and random
//! attempts (every action, credentials, tokens, routes, locations, payloads, times on both sides
//! of a registry change), the job must give exactly the findings, in the same order, as judging
//! every row the reference way.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use meshguard_schemas::output::Finding;
use meshguard_schemas::registry::RegistryRecord;
use meshguard_schemas::{BatchDecoder, InputTopic};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::{Value, json};
use uuid::Uuid;

use super::PolicyCheck;
use crate::jobs::{Job, JobContext, MessagesView};
use crate::policy::{CompiledRecord, GroupInterner, Location, Registry};
use crate::tables::VersionedTable;

/// Directory UUIDs are 1..=N; N + 1 is never registered.
const N: u128 = 6;
const GROUPS: [&str; 6] = ["g0", "g1", "g2", "g3", "g4", "g5"];
/// 2026-11-24T17:00Z, a Tuesday.
const T: i64 = 1_795_539_600_000;

fn u(i: u128) -> Uuid {
    Uuid::from_u128(0x1000_0000_0000_4000_8000_0000_0000_0000 | i)
}

fn principal() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(json!("*")),
        3 => (1..=N + 1).prop_map(|i| json!(u(i))),
        3 => (0..GROUPS.len()).prop_map(|g| json!(format!("group:{}", GROUPS[g]))),
    ]
}

fn list() -> impl Strategy<Value = Value> {
    proptest::option::weighted(0.4, (prop::collection::vec(principal(), 0..3), prop::collection::vec(principal(), 0..2)))
        .prop_map(|o| o.map_or(Value::Null, |(allow, deny)| json!({"allow": allow, "deny": deny})))
}

fn permissions() -> impl Strategy<Value = Value> {
    (list(), list(), list(), list(), list())
        .prop_map(|(d, s, r, sub, c)| json!({"discover": d, "send": s, "receive": r, "subscribe": sub, "configure": c}))
}

fn window() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0..2_000i64, 0..2_000i64).prop_map(|(a, b)| json!({"from": T + a.min(b), "until": T + a.max(b)})),
        (prop::sample::subsequence(vec!["mon", "tue", "wed", "thu", "fri", "sat", "sun"], 0..=7), 0..24u32, 0..24u32, 0..3usize).prop_map(
            |(days, start, end, tz)| {
                let tz = ["UTC", "Europe/Berlin", "America/New_York"][tz];
                json!({"days": days, "start": format!("{start:02}:00"), "end": format!("{end:02}:30"), "tz": tz})
            }
        ),
    ]
}

fn area() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec!["DE", "FR"]).prop_map(|c| json!({"country": c})),
        prop::sample::select(vec![1_000.0, 100_000.0]).prop_map(|r| json!({"lat": 52.52, "lon": 13.405, "radius_m": r})),
    ]
}

fn restrictions() -> impl Strategy<Value = Value> {
    let timing = proptest::option::weighted(0.3, prop::collection::vec(window(), 0..3));
    let location = proptest::option::weighted(
        0.3,
        (
            prop::sample::select(vec!["requester", "requester", "target", "both"]),
            prop::collection::vec(area(), 0..3),
            prop::collection::vec(area(), 0..2),
        )
            .prop_map(|(subject, allow, deny)| json!({"subject": subject, "allow": allow, "deny": deny})),
    );
    let envelope = proptest::option::weighted(
        0.4,
        (
            proptest::option::of(prop::collection::vec(prop::sample::select(vec!["command", "telemetry"]), 0..3)),
            proptest::option::of(prop::sample::select(vec![10u64, 1_000])),
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(types, max, fields)| {
                let fields = if fields { json!({"command": {"in": ["on"]}}) } else { json!({}) };
                json!({"payload_types": types, "max_bytes": max, "fields": fields})
            }),
    );
    let path = proptest::option::weighted(
        0.25,
        (
            prop::collection::vec(1..=N + 1, 0..2),
            prop::collection::vec(1..=N + 1, 0..2),
            proptest::option::of(0..3u32),
            proptest::bool::ANY,
        )
            .prop_map(|(deny, require, max_hops, countries)| {
                let countries: Vec<&str> = if countries { vec!["FR"] } else { vec![] };
                json!({"deny": deny.into_iter().map(u).collect::<Vec<_>>(), "require": require.into_iter().map(u).collect::<Vec<_>>(),
                       "max_hops": max_hops, "deny_countries": countries})
            }),
    );
    let presence = proptest::option::weighted(
        0.2,
        (proptest::option::of(proptest::bool::ANY), proptest::option::of(proptest::bool::ANY))
            .prop_map(|(t, r)| json!({"target_online": t, "requester_online": r})),
    );
    (timing, location, envelope, path, presence).prop_map(|(timing, location, envelope, path, presence)| {
        json!({"timing": timing, "location": location, "envelope": envelope, "path": path, "presence": presence})
    })
}

fn profile() -> impl Strategy<Value = Value> {
    (prop::collection::vec(principal(), 0..3), proptest::option::weighted(0.5, permissions()), restrictions(), 0..3u8).prop_map(
        |(applies_to, permissions, restrictions, name)| {
            json!({"name": format!("p{name}"), "applies_to": applies_to, "permissions": permissions, "restrictions": restrictions})
        },
    )
}

fn record(i: u128) -> impl Strategy<Value = Value> {
    (
        prop::sample::subsequence(GROUPS.to_vec(), 0..=GROUPS.len()),
        proptest::option::weighted(0.3, 1..=N + 1),
        permissions(),
        prop::collection::vec(profile(), 0..3),
        proptest::option::of(prop::sample::select(vec!["DE", "FR"])),
    )
        .prop_map(move |(groups, owner, permissions, profiles, country)| {
            json!({"uuid": u(i), "kind": "device", "groups": groups, "owner": owner.map(u), "permissions": permissions,
                   "profiles": profiles, "country": country})
        })
}

/// Per UUID: one or two versions (the second possibly a tombstone), at times around the attempts'.
fn registry() -> impl Strategy<Value = Vec<(Uuid, i64, Option<Value>)>> {
    let versions = |i: u128| {
        (record(i), proptest::option::weighted(0.3, (record(i), proptest::bool::weighted(0.3), 0..1_000i64)), 0..3usize).prop_map(
            move |(first, second, absent)| {
                let mut v = Vec::new();
                if absent == 0 && i == 1 {
                    return v;
                }
                v.push((u(i), T - 1_000, Some(first)));
                if let Some((rec, tombstone, at)) = second {
                    v.push((u(i), T + at, (!tombstone).then_some(rec)));
                }
                v
            },
        )
    };
    (versions(1), versions(2), versions(3), versions(4), versions(5), versions(6))
        .prop_map(|(a, b, c, d, e, f)| [a, b, c, d, e, f].into_iter().flatten().collect())
}

fn attempt() -> impl Strategy<Value = Value> {
    (
        (
            prop::sample::select(vec!["connect", "discover", "send", "send", "send", "receive", "subscribe", "configure"]),
            1..=N + 1,
            proptest::option::weighted(0.95, 1..=N + 1),
            prop::sample::select(vec!["valid", "valid", "valid", "valid", "invalid"]),
            proptest::bool::ANY,
            0..1_000i64,
        ),
        (
            prop::collection::vec(1..=N + 1, 0..3),
            prop::sample::select(vec![
                json!(null),
                json!({"country": "DE"}),
                json!({"lat": 52.52, "lon": 13.4, "country": "DE"}),
                json!({"lat": 48.85, "lon": 2.35}),
            ]),
            proptest::option::of(prop::sample::select(vec!["command", "telemetry", "other"])),
            proptest::option::of(prop::sample::select(vec![json!({"command": "on"}), json!({"command": "off"})])),
            proptest::option::of(prop::sample::select(vec![5i64, 5_000])),
            proptest::bool::weighted(0.2),
        ),
    )
        .prop_map(|((action, from, to, auth, token, ts), (route, location, payload_type, payload, payload_bytes, encrypted))| {
            let mut a = json!({"id": Uuid::new_v4(), "ts": T + ts, "action": action, "from": u(from), "auth": auth, "target_token": token,
                               "route": route.into_iter().map(u).collect::<Vec<_>>(), "encrypted": encrypted});
            // The decoder rejects a missing `to` on anything but `connect`.
            if let Some(to) = to.or((action != "connect").then_some(1)) {
                a["to"] = json!(u(to));
            }
            if !location.is_null() {
                a["location"] = location;
            }
            if let Some(t) = payload_type {
                a["payload_type"] = json!(t);
            }
            if let Some(p) = payload {
                a["payload"] = p;
            }
            if let Some(b) = payload_bytes {
                a["payload_bytes"] = json!(b);
            }
            a
        })
}

fn compile(interner: &mut GroupInterner, rec: &Option<Value>) -> Option<Arc<CompiledRecord>> {
    rec.as_ref().map(|r| {
        let rec = RegistryRecord::from_json(0, r.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}: {r}"));
        Arc::new(CompiledRecord::compile(Arc::new(rec), interner))
    })
}

/// A registry built from scratch from `versions`, inserted in order.
fn build(versions: &[(Uuid, i64, Option<Value>)]) -> Registry {
    let mut interner = GroupInterner::default();
    let mut registry = Registry::default();
    for (uuid, at, rec) in versions {
        registry.insert(*uuid, *at, compile(&mut interner, rec));
    }
    registry
}

fn decode(attempts: &[Value]) -> arrow::record_batch::RecordBatch {
    let texts: Vec<String> = attempts.iter().map(Value::to_string).collect();
    let slices: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
    let out = BatchDecoder::new(InputTopic::Messages).decode(&slices);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    out.batch
}

/// The findings of the job and of the reference path over `registry`, and the rows the job passed
/// by their blocks.
type Findings = Vec<(u32, Finding)>;
fn judge(registry: &Registry, batch: &arrow::record_batch::RecordBatch, online: &[u128]) -> (Findings, Findings, usize) {
    let mut presence = VersionedTable::<Uuid, bool>::default();
    for &i in online {
        presence.insert(u(i), T - 5_000, true);
    }
    let mut locations = VersionedTable::<Uuid, Location>::default();
    locations.insert(u(2), T - 5_000, Location { lat: Some(52.52), lon: Some(13.4), country: None });
    let ctx = JobContext { registry, presence: &presence, locations: &locations, now_ms: T + 5_000 };
    let view = MessagesView::new(batch).unwrap();
    let (mut fast, mut reference) = (Vec::new(), Vec::new());
    let mut job = PolicyCheck::default();
    job.on_messages(&view, &ctx, &mut fast);
    PolicyCheck::default().on_messages_reference(&view, &ctx, &mut reference);
    (fast, reference, job.passed_in_blocks)
}

/// Runs both ways and compares; the number of rows passed by their blocks and of findings.
fn run(versions: &[(Uuid, i64, Option<Value>)], attempts: &[Value], online: &[u128]) -> (usize, usize) {
    let (fast, reference, passed_in_blocks) = judge(&build(versions), &decode(attempts), online);
    assert_eq!(fast, reference);
    (passed_in_blocks, reference.len())
}

/// Proptest's configuration for a runner of this file (its regressions are replayed).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, source_file: Some(file!()), ..ProptestConfig::default() }
}

/// Generating these nested strategies takes more stack than a test thread has in a debug build.
fn with_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new().stack_size(64 << 20).spawn(f).unwrap().join().unwrap();
}

#[test]
fn the_fast_path_gives_exactly_the_reference_findings() {
    with_stack(|| {
        let mut runner = proptest::test_runner::TestRunner::new(config(600));
        let cases = (registry(), prop::collection::vec(attempt(), 1..60), prop::collection::vec(1..=N + 1, 0..3));
        let (passed_in_blocks, findings) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        runner
            .run(&cases, |(versions, attempts, online)| {
                let (blocks, found) = run(&versions, &attempts, &online);
                passed_in_blocks.set(passed_in_blocks.get() + blocks);
                findings.set(findings.get() + found);
                Ok(())
            })
            .unwrap();
        let (passed_in_blocks, findings) = (passed_in_blocks.get(), findings.get());
        // The cases exercise both outcomes of the block checks.
        assert!(passed_in_blocks > 250 && findings > 1_000, "{passed_in_blocks} passed by their blocks, {findings} findings");
    });
}

/// Many rows (many times the rows the pipeline holds in flight) on a directory where most attempts
/// pass at once, some need a block and a few are findings: the pipeline must keep rows and findings
/// in order.
#[test]
fn the_pipeline_keeps_row_order() {
    with_stack(|| {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let versions = registry().new_tree(&mut runner).unwrap().current();
        let attempts: Vec<Value> = (0..1_000).map(|_| attempt().new_tree(&mut runner).unwrap().current()).collect();
        run(&versions, &attempts, &[2]);
    });
}

/// Registry changes arriving while attempts stream in (new records, changed lists, new profiles,
/// tombstones, in any order of event time): after each step, the incrementally updated registry
/// must judge the next batch exactly as a registry rebuilt from every version so far, and the
/// job's fast path exactly as the reference path.
#[test]
fn incremental_changes_judge_like_a_rebuilt_registry() {
    with_stack(|| {
        let mut runner = proptest::test_runner::TestRunner::new(config(150));
        let steps = prop::collection::vec((registry(), prop::collection::vec(attempt(), 1..30)), 1..5);
        runner
            .run(&(steps, prop::collection::vec(1..=N + 1, 0..3)), |(steps, online)| {
                let mut interner = GroupInterner::default();
                let (mut incremental, mut so_far) = (Registry::default(), Vec::new());
                for (versions, attempts) in &steps {
                    for (uuid, at, rec) in versions {
                        incremental.insert(*uuid, *at, compile(&mut interner, rec));
                    }
                    so_far.extend(versions.iter().cloned());
                    let batch = decode(attempts);
                    let (fast, reference, _) = judge(&incremental, &batch, &online);
                    assert_eq!(fast, reference);
                    let (rebuilt, _, _) = judge(&build(&so_far), &batch, &online);
                    assert_eq!(fast, rebuilt);
                }
                Ok(())
            })
            .unwrap();
    });
}

/// The contract's run-time changes, one after the other on one registry: each applies to the
/// attempts at or after its time and not to earlier ones, with nothing rebuilt.
#[test]
fn a_new_profile_a_changed_list_and_a_tombstone_apply_from_their_time() {
    let (from, to) = (u(1), u(2));
    let rec = |extra: Value| {
        let mut r = json!({"uuid": to, "kind": "device", "groups": ["g1"]});
        r.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        Some(r)
    };
    let send = |id: u128, ts: i64| {
        json!({"id": Uuid::from_u128(id), "ts": ts, "action": "send", "from": from, "to": to, "auth": "valid",
               "payload_type": "command", "location": {"country": "DE"}})
    };
    let mut interner = GroupInterner::default();
    let mut registry = Registry::default();
    let requester = Some(json!({"uuid": from, "kind": "device", "groups": ["g0"]}));
    registry.insert(from, T - 10_000, compile(&mut interner, &requester));
    registry.insert(to, T - 10_000, compile(&mut interner, &rec(json!({}))));
    let kinds = |registry: &Registry, attempts: &[Value]| -> Vec<(u32, String)> {
        let (fast, reference, _) = judge(registry, &decode(attempts), &[]);
        assert_eq!(fast, reference);
        fast.into_iter().map(|(row, f)| (row, f.rule)).collect()
    };
    let probe = [send(1, T - 5_000), send(2, T), send(3, T + 5_000), send(4, T + 10_000), send(5, T + 20_000)];
    assert_eq!(kinds(&registry, &probe), vec![], "open lists, no profile");

    // A profile for everyone: only `telemetry` payloads, from T on.
    let profile =
        json!({"profiles": [{"name": "tele", "applies_to": ["*"], "restrictions": {"envelope": {"payload_types": ["telemetry"]}}}]});
    registry.insert(to, T, compile(&mut interner, &rec(profile.clone())));
    let envelope = "profile:tele/envelope".to_string();
    assert_eq!(kinds(&registry, &probe), vec![(1, envelope.clone()), (2, envelope.clone()), (3, envelope.clone()), (4, envelope.clone())]);

    // The `send` list changed at T + 5 s: the requester's group is denied.
    let mut denied = profile;
    denied["permissions"] = json!({"send": {"allow": ["*"], "deny": ["group:g0"]}});
    registry.insert(to, T + 5_000, compile(&mut interner, &rec(denied)));
    let deny = "permissions:send/deny".to_string();
    assert_eq!(
        kinds(&registry, &probe),
        vec![
            (1, envelope.clone()),
            (2, deny.clone()),
            (2, envelope.clone()),
            (3, deny.clone()),
            (3, envelope.clone()),
            (4, deny),
            (4, envelope)
        ]
    );

    // Tombstoned at T + 10 s; registered again, open, at T + 20 s.
    registry.insert(to, T + 10_000, None);
    registry.insert(to, T + 20_000, compile(&mut interner, &rec(json!({}))));
    let found = kinds(&registry, &probe);
    assert_eq!(found.iter().filter(|(row, _)| *row == 3).map(|(_, r)| r.as_str()).collect::<Vec<_>>(), ["target:unregistered"]);
    assert!(found.iter().all(|(row, _)| *row != 4), "registered again: {found:?}");
}
