#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use meshguard_schemas::registry::RegistryRecord;
use meshguard_schemas::{BatchDecoder, FindingKind, InputTopic};
use uuid::Uuid;

use super::checkpoint::{CHECKPOINT_STEP_ROWS, CheckpointStore, LocalCheckpointStore};
use super::*;

const A: &str = "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
const B: &str = "c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
const STRANGER: &str = "eeeeeeee-0000-4000-8000-000000000001";
const T0: i64 = 1_795_539_600_000;

fn registered(uuid: &str, at: i64) -> RegistryChange {
    let json = format!(r#"{{"uuid":"{uuid}","kind":"device"}}"#);
    RegistryChange {
        uuid: Uuid::parse_str(uuid).unwrap(),
        record: Some(Arc::new(RegistryRecord::from_json(0, json.as_bytes()).unwrap())),
        effective_ms: at,
    }
}

fn tombstone(uuid: &str, at: i64) -> RegistryChange {
    RegistryChange { uuid: Uuid::parse_str(uuid).unwrap(), record: None, effective_ms: at }
}

fn attempt(n: u32, ts: i64, from: &str, auth: &str) -> String {
    format!(r#"{{"id":"00000000-0000-4000-8000-{n:012}","ts":{ts},"action":"send","from":"{from}","to":"{B}","auth":"{auth}"}}"#)
}

fn messages(records: &[String], partition: i32) -> RowsBatch {
    let slices: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
    let out = BatchDecoder::new(InputTopic::Messages).decode(&slices);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    RowsBatch { partition: vec![partition; out.batch.num_rows()], batch: out.batch }
}

fn batch(registry: Vec<RegistryChange>, records: &[String]) -> MicroBatch {
    MicroBatch { registry, messages: Some(messages(records, 0)), ..Default::default() }
}

fn kinds(findings: &[Finding]) -> Vec<(FindingKind, String)> {
    findings.iter().map(|f| (f.kind, f.offender.to_string())).collect()
}

#[test]
fn registration_then_credentials_in_the_contracts_order() {
    let mut e = Engine::new(EngineConfig::default());
    let records = [
        attempt(1, T0, A, "valid"),
        attempt(2, T0, A, "invalid"),
        attempt(3, T0, A, "missing"),
        attempt(4, T0, STRANGER, "valid"),
        attempt(5, T0, STRANGER, "invalid"),
    ];
    let found = e.process(&batch(vec![registered(A, T0 - 1000), registered(B, T0 - 1000)], &records), T0 + 5);
    assert_eq!(
        kinds(&found),
        vec![
            (FindingKind::BadCredentials, A.to_owned()),
            (FindingKind::BadCredentials, A.to_owned()),
            (FindingKind::UnregisteredRequester, STRANGER.to_owned()),
            (FindingKind::UnregisteredRequester, STRANGER.to_owned()),
        ]
    );
    let f = &found[0];
    assert_eq!(f.event_ts, T0);
    assert_eq!(f.ts, T0 + 5);
    assert_eq!(f.rule, "auth:requester");
    assert_eq!(f.detail["auth"], "invalid");
    assert_eq!(f.target.unwrap().to_string(), B);
    assert_eq!(f.id, Finding::evidence_id(FindingKind::BadCredentials, &f.event_id.unwrap()));
    assert_eq!(found[2].detail["why"], "never registered");
}

#[test]
fn registry_changes_apply_from_their_timestamp_whatever_the_arrival_order() {
    let mut e = Engine::new(EngineConfig::default());
    // The tombstone arrives before attempts that happened earlier than it.
    let mb = batch(
        vec![registered(A, T0), tombstone(A, T0 + 10_000), registered(B, T0 - 10_000)],
        &[
            attempt(1, T0 - 1, A, "valid"),
            attempt(2, T0, A, "valid"),
            attempt(3, T0 + 9_999, A, "valid"),
            attempt(4, T0 + 10_000, A, "valid"),
        ],
    );
    let found = e.process(&mb, T0);
    let ids: Vec<_> = found.iter().map(|f| f.event_id.unwrap().as_u128() & 0xffff).collect();
    assert_eq!(ids, vec![1, 4], "before registration and at/after the tombstone");
    assert_eq!(found[0].detail["why"], "registered only after this attempt");
    assert_eq!(found[1].detail["why"], "unregistered (tombstoned)");
}

#[test]
fn repeats_emit_nothing_new() {
    let mut e = Engine::new(EngineConfig::default());
    let records = [attempt(1, T0, STRANGER, "valid")];
    assert_eq!(e.process(&batch(vec![], &records), T0).len(), 1);
    assert_eq!(e.process(&batch(vec![], &records), T0).len(), 0, "re-delivered event");
    assert_eq!(e.stats().duplicates, 1);
}

#[test]
fn late_events_are_counted_and_still_judged() {
    let mut e = Engine::new(EngineConfig { allowed_lateness_ms: 1_000, ..Default::default() });
    let found = e.process(&batch(vec![], &[attempt(1, T0, STRANGER, "valid"), attempt(2, T0 - 5_000, STRANGER, "valid")]), T0);
    assert_eq!(found.len(), 2);
    assert_eq!(e.stats().late_events, 1);
}

#[test]
fn checkpoint_restore_resumes_state_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalCheckpointStore::open(dir.path()).unwrap();
    let mut e = Engine::new(EngineConfig::default());
    let mut mb =
        batch(vec![registered(A, T0 - 1), registered(B, T0 - 1)], &[attempt(1, T0, STRANGER, "valid"), attempt(2, T0, A, "invalid")]);
    mb.positions = vec![
        Position { topic: InputTopic::Messages, partition: 0, next_offset: 2 },
        Position { topic: InputTopic::Registry, partition: 0, next_offset: 1 },
    ];
    assert_eq!(e.process(&mb, T0).len(), 2);
    e.sink_positions = vec![("meshguard.findings.v1".into(), 0, 2)];
    store.save(&mut e.checkpoint()).unwrap();

    let mut restored = Engine::new(EngineConfig::default());
    restored.restore(store.load().unwrap().unwrap()).unwrap();
    assert_eq!(restored.partition(&(InputTopic::Messages, 0)).unwrap().next_offset, 2);
    assert_eq!(restored.global_positions(), vec![Position { topic: InputTopic::Registry, partition: 0, next_offset: 1 }]);
    assert_eq!(restored.sink_positions, e.sink_positions);
    // The same events replayed: nothing new. A new attempt by A: judged against the restored registry.
    assert_eq!(restored.process(&mb, T0).len(), 0);
    let found = restored.process(&batch(vec![], &[attempt(3, T0 + 1, A, "valid"), attempt(4, T0 + 1, A, "missing")]), T0);
    assert_eq!(kinds(&found), vec![(FindingKind::BadCredentials, A.to_owned())]);
}

/// A partition written to a checkpoint and read back (whole, or alone as a worker taking it over
/// reads it) holds exactly what it held: windows, tightenings, emitted ids, offenders, timers,
/// schedules (their order aside: a hash table keeps none) and offsets.
#[test]
fn a_restored_partition_holds_exactly_the_checkpointed_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalCheckpointStore::open(dir.path()).unwrap();
    let cfg = EngineConfig {
        throttles: crate::throttle::ThrottleConfig {
            tightening: crate::throttle::Tightening { enabled: true, ..Default::default() },
            ..Default::default()
        },
        ..Default::default()
    };
    let mut e = Engine::new(cfg.clone());
    // A floods (throttle findings, tightening) and sends without credentials (enforcement).
    let records: Vec<String> = (0..60)
        .map(|i| {
            attempt(i + 1, T0 + i64::from(i) * 10, if i % 2 == 0 { A } else { STRANGER }, if i % 4 == 0 { "missing" } else { "valid" })
        })
        .collect();
    let mut mb = batch(vec![registered(A, T0 - 1_000), registered(B, T0 - 1_000)], &records);
    mb.positions = vec![Position { topic: InputTopic::Messages, partition: 0, next_offset: 60 }];
    assert!(!e.process(&mb, T0).is_empty());
    let mut cp = e.checkpoint();
    store.save(&mut cp).unwrap();

    // Schedules compared as maps, the rest as it is.
    let sorted = |mut s: PartitionSnapshot| {
        let schedules: std::collections::BTreeMap<_, _> = s.schedules.iter().map(|(k, s)| (k, *s)).collect();
        s.schedules = Default::default();
        (s, schedules)
    };
    let id = (InputTopic::Messages, 0);
    let want = sorted(cp.partitions[0].1.clone());
    assert!(want.0.throttles.windows.len() >= 2 && !want.0.throttles.tightened.is_empty());
    assert!(!want.0.emitted.is_empty() && !want.0.enforcement.is_empty() && want.1.len() >= 2);
    let mut restored = Engine::new(cfg.clone());
    restored.restore(store.load().unwrap().unwrap()).unwrap();
    assert_eq!(sorted(restored.partition(&id).unwrap().snapshot()), want);
    let mut taken_over = Engine::new(cfg);
    taken_over.restore_partition(id, store.load_partition(&id).unwrap().unwrap());
    assert_eq!(sorted(taken_over.partition(&id).unwrap().snapshot()), want);
    // And they judge the next attempts as the original does.
    let next = batch(vec![], &(100..130).map(|i| attempt(i, T0 + 1_000 + i64::from(i), A, "valid")).collect::<Vec<_>>());
    let found = kinds(&e.process(&next, T0));
    assert!(!found.is_empty());
    assert_eq!(kinds(&restored.process(&next, T0)), found);
    assert_eq!(kinds(&taken_over.process(&next, T0)), found);
}

/// The policy directory is rebuilt from the checkpoint's registry versions: a listed target with
/// a profile, its older open version and a tombstone judge the same attempts the same way after a
/// restore.
#[test]
fn a_restored_registry_judges_like_the_checkpointed_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalCheckpointStore::open(dir.path()).unwrap();
    let listed = RegistryRecord::from_json(
        0,
        format!(
            r#"{{"uuid":"{B}","kind":"device","permissions":{{"send":{{"allow":["{A}"]}}}},
                "profiles":[{{"name":"cmd","applies_to":["*"],"restrictions":{{"envelope":{{"payload_types":["command"]}}}}}}]}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    let changes = vec![
        registered(A, T0 - 10_000),
        registered(B, T0 - 10_000),
        RegistryChange { uuid: Uuid::parse_str(B).unwrap(), record: Some(Arc::new(listed)), effective_ms: T0 },
        registered(STRANGER, T0 - 10_000),
        tombstone(STRANGER, T0 + 5_000),
    ];
    let mut e = Engine::new(EngineConfig::default());
    e.process(&batch(changes, &[]), T0);
    store.save(&mut e.checkpoint()).unwrap();
    let mut restored = Engine::new(EngineConfig::default());
    restored.restore(store.load().unwrap().unwrap()).unwrap();
    assert_eq!(restored.registry.hot().len(), e.registry.hot().len());

    let send = |n: u32, ts: i64, from: &str, payload_type: &str| {
        format!(
            r#"{{"id":"00000000-0000-4000-8000-{n:012}","ts":{ts},"action":"send","from":"{from}","to":"{B}","auth":"valid","payload_type":"{payload_type}"}}"#
        )
    };
    let records = [
        send(1, T0 - 1, STRANGER, "telemetry"),
        send(2, T0, A, "command"),
        send(3, T0, A, "telemetry"),
        send(4, T0, STRANGER, "command"),
        send(5, T0 + 5_000, STRANGER, "command"),
    ];
    let rules = |found: Vec<Finding>| found.into_iter().map(|f| (f.event_id.unwrap().as_u128() & 0xff, f.rule)).collect::<Vec<_>>();
    let expected =
        vec![(3, "profile:cmd/envelope".to_owned()), (4, "permissions:send/allow".to_owned()), (5, "registry:unregistered".to_owned())];
    assert_eq!(rules(e.process(&batch(vec![], &records), T0)), expected);
    assert_eq!(rules(restored.process(&batch(vec![], &records), T0)), expected);
}

#[test]
fn findings_read_back_from_the_output_are_not_repeated() {
    let mut e = Engine::new(EngineConfig::default());
    let records = [attempt(1, T0, STRANGER, "valid")];
    let id = Finding::evidence_id(FindingKind::UnregisteredRequester, &Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001));
    e.mark_emitted(id, T0);
    assert!(e.process(&batch(vec![], &records), T0).is_empty());
}

#[test]
fn corrupt_checkpoints_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalCheckpointStore::open(dir.path()).unwrap();
    std::fs::write(dir.path().join("global.ckpt"), b"garbage").unwrap();
    let err = store.load().unwrap_err().to_string();
    assert!(err.contains("global.ckpt") && err.contains("bad magic"), "{err}");
    // A checkpoint of another format version is refused as such, not misread.
    let id = (InputTopic::Messages, 0);
    std::fs::write(dir.path().join("partitions/messages-0.ckpt"), b"MGCKPT08\x00\x00").unwrap();
    let err = store.load_partition(&id).unwrap_err().to_string();
    assert!(err.contains("messages-0.ckpt") && err.contains("format version 08") && err.contains("reads version 10"), "{err}");
}

// ---- throttles --------------------------------------------------------------------------------

fn throttled(limit: u32, tightening: bool) -> Engine {
    let mut cfg = EngineConfig { allowed_lateness_ms: 1_000, ..Default::default() };
    cfg.throttles.requester = crate::throttle::Limit { max: limit, per_s: 1.0 };
    cfg.throttles.tightening = crate::throttle::Tightening { enabled: tightening, factor: 0.5, cooldown_s: 60.0 };
    let mut e = Engine::new(cfg);
    e.process(&batch(vec![registered(A, T0 - 60_000), registered(B, T0 - 60_000)], &[]), T0);
    e
}

fn sends(first: u32, times: &[i64]) -> Vec<String> {
    times.iter().enumerate().map(|(i, t)| attempt(first + i as u32, *t, A, "valid")).collect()
}

fn throttle_findings(found: &[Finding]) -> Vec<(u128, String, i64)> {
    found
        .iter()
        .filter(|f| f.kind == FindingKind::ThrottleExceeded)
        // The attempt number, as `attempt` writes it in the id's last twelve digits.
        .map(|f| (f.event_id.unwrap().simple().to_string()[20..].parse().unwrap(), f.rule.clone(), f.detail["limit"].as_i64().unwrap()))
        .collect()
}

#[test]
fn a_restart_in_the_middle_of_a_window_continues_its_count_and_repeats_no_finding() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalCheckpointStore::open(dir.path()).unwrap();
    let mut e = throttled(5, false);
    assert!(e.process(&batch(vec![], &sends(1, &[T0, T0 + 100, T0 + 200, T0 + 300])), T0).is_empty());
    store.save(&mut e.checkpoint()).unwrap();

    let second = batch(vec![], &sends(5, &[T0 + 400, T0 + 500, T0 + 600]));
    let mut restored = Engine::new(e.cfg.clone());
    restored.restore(store.load().unwrap().unwrap()).unwrap();
    let found = restored.process(&second, T0);
    assert_eq!(
        throttle_findings(&found),
        vec![(6, "throttle:requester".to_owned(), 5)],
        "the sixth in the window, counted across the restart"
    );
    assert_eq!(found[0].detail["count"], 6);
    assert_eq!(found[0].detail["window_start"], "2026-11-24T16:59:59.500Z");
    assert_eq!(found[0].detail["window_end"], "2026-11-24T17:00:00.500Z");

    // A crash after publishing it: restore again, read the finding back, replay the same events.
    let mut again = Engine::new(e.cfg.clone());
    again.restore(store.load().unwrap().unwrap()).unwrap();
    again.mark_emitted(found[0].id, found[0].event_ts);
    assert!(again.process(&second, T0).is_empty());
}

#[test]
fn late_attempts_beyond_the_allowed_lateness_are_not_counted() {
    let mut e = throttled(5, false);
    e.process(&batch(vec![], &sends(1, &[T0 + 10_000])), T0);
    let found = e.process(&batch(vec![], &sends(2, &[T0, T0 + 1, T0 + 2, T0 + 3, T0 + 4, T0 + 5])), T0);
    assert!(throttle_findings(&found).is_empty());
    assert_eq!(e.stats().late_events, 6);
    // Inside the lateness (the watermark is T0 + 9 s) they count: the sixth in (8_950, 9_950].
    let found = e.process(&batch(vec![], &sends(10, &[T0 + 9_500, T0 + 9_600, T0 + 9_700, T0 + 9_800, T0 + 9_900, T0 + 9_950])), T0);
    assert_eq!(throttle_findings(&found), vec![(15, "throttle:requester".to_owned(), 5)]);
}

#[test]
fn tightening_halves_the_limit_for_the_cool_down_then_lifts() {
    let mut e = throttled(4, true);
    let found = e.process(&batch(vec![], &sends(1, &[T0, T0 + 10, T0 + 20, T0 + 30, T0 + 40])), T0);
    assert_eq!(throttle_findings(&found), vec![(5, "throttle:requester".to_owned(), 4)]);
    assert_eq!(e.stats().tightenings, 1);
    // Two seconds later: the limit is 2 until T0 + 40 + 60 s.
    let found = e.process(&batch(vec![], &sends(10, &[T0 + 2_000, T0 + 2_010, T0 + 2_020])), T0);
    assert_eq!(throttle_findings(&found), vec![(12, "throttle:requester".to_owned(), 2)]);
    assert_eq!(found[0].detail["tightened"]["base_limit"], 4);
    // After the cool-down (which the breach at T0 + 2 s extended to T0 + 62 s), four pass again.
    let found = e.process(&batch(vec![], &sends(20, &[T0 + 70_000, T0 + 70_010, T0 + 70_020, T0 + 70_030])), T0);
    assert!(throttle_findings(&found).is_empty());
}

#[test]
fn exempt_requesters_are_never_throttled_and_pairs_follow_the_targets_profile() {
    let mut e = throttled(2, false);
    let exempt = format!(r#"{{"uuid":"{A}","kind":"system","exempt":true}}"#);
    let guarded = format!(
        r#"{{"uuid":"{B}","kind":"device","profiles":[{{"name":"guest","applies_to":["{STRANGER}"],"restrictions":{{"throttle":{{"max":1,"per_s":300}}}}}}]}}"#
    );
    let change = |json: &str| RegistryChange {
        uuid: Uuid::parse_str(serde_json::from_str::<serde_json::Value>(json).unwrap()["uuid"].as_str().unwrap()).unwrap(),
        record: Some(Arc::new(RegistryRecord::from_json(0, json.as_bytes()).unwrap())),
        effective_ms: T0 - 1_000,
    };
    let found = e.process(
        &batch(vec![change(&exempt), change(&guarded), registered(STRANGER, T0 - 1_000)], &sends(1, &[T0, T0 + 1, T0 + 2, T0 + 3])),
        T0,
    );
    assert!(throttle_findings(&found).is_empty(), "exempt");
    let records: Vec<String> = (0..2).map(|i| attempt(10 + i, T0 + i64::from(i) * 100_000, STRANGER, "valid")).collect();
    let found = e.process(&batch(vec![], &records), T0);
    let pair: Vec<_> = found.iter().filter(|f| f.kind == FindingKind::ThrottleExceeded).collect();
    assert_eq!(pair.len(), 1);
    assert_eq!((pair[0].rule.as_str(), pair[0].target.unwrap().to_string()), ("profile:guest/throttle", B.to_owned()));
    assert_eq!(pair[0].detail["per_s"], 300.0);
}

/// The throttle stage reads most attempts' limits from the directory's newest versions: attempts
/// before a newer version (an exemption, a profile throttle, a tombstone) are counted by the version
/// in force at their time, and a configured per-type limit is found through the record.
#[test]
fn throttle_limits_follow_the_version_in_force_at_each_attempt() {
    let mut e = throttled(2, false);
    e.cfg.throttles.by_type.insert("meter".into(), crate::throttle::Limit { max: 3, per_s: 100.0 });
    let record = |json: String, at: i64| RegistryChange {
        uuid: Uuid::parse_str(serde_json::from_str::<serde_json::Value>(&json).unwrap()["uuid"].as_str().unwrap()).unwrap(),
        record: Some(Arc::new(RegistryRecord::from_json(0, json.as_bytes()).unwrap())),
        effective_ms: at,
    };
    // A is exempt from T0 + 10 s on; B throttles A's sends from T0 + 20 s on (one per 300 s);
    // STRANGER is a meter until T0 + 30 s, unregistered after.
    let changes = vec![
        record(format!(r#"{{"uuid":"{A}","kind":"system","exempt":true}}"#), T0 + 10_000),
        record(
            format!(
                r#"{{"uuid":"{B}","kind":"device","profiles":[{{"name":"metered","applies_to":["{A}"],"restrictions":{{"throttle":{{"max":1,"per_s":300}}}}}}]}}"#
            ),
            T0 + 20_000,
        ),
        record(format!(r#"{{"uuid":"{STRANGER}","kind":"device","type":"meter"}}"#), T0 - 1_000),
        tombstone(STRANGER, T0 + 30_000),
    ];
    let mut records = sends(1, &[T0, T0 + 1, T0 + 2]); // before the exemption: counted, 3 > 2
    records.extend(sends(4, &[T0 + 10_000, T0 + 10_001, T0 + 10_002])); // exempt
    records.extend((0..4).map(|i| attempt(7 + i, T0 + 11_000 + i64::from(i) * 2_000, STRANGER, "valid"))); // the meter: 4 > 3
    let found = e.process(&batch(changes, &records), T0);
    assert_eq!(
        throttle_findings(&found),
        vec![(3, "throttle:requester".to_owned(), 2), (10, "throttle:type:meter".to_owned(), 3)],
        "{found:#?}"
    );
    // A is no longer exempt from T0 + 40 s on: B's profile counts its sends (the second is past it).
    let found = e.process(&batch(vec![registered(A, T0 + 40_000)], &sends(20, &[T0 + 40_000, T0 + 45_000])), T0);
    assert_eq!(throttle_findings(&found), vec![(21, "profile:metered/throttle".to_owned(), 1)]);
    // The meter, unregistered since T0 + 30 s, has only the requester limit now.
    let records: Vec<String> = (0..4).map(|i| attempt(30 + i, T0 + 50_000 + i64::from(i) * 2_000, STRANGER, "valid")).collect();
    assert!(throttle_findings(&e.process(&batch(vec![], &records), T0)).is_empty());
}

#[test]
fn tightening_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalCheckpointStore::open(dir.path()).unwrap();
    let mut e = throttled(4, true);
    let found = e.process(&batch(vec![], &sends(1, &[T0, T0 + 10, T0 + 20, T0 + 30, T0 + 40])), T0);
    assert_eq!(throttle_findings(&found), vec![(5, "throttle:requester".to_owned(), 4)]);
    store.save(&mut e.checkpoint()).unwrap();
    let mut restored = Engine::new(e.cfg.clone());
    restored.restore(store.load().unwrap().unwrap()).unwrap();
    // Still halved after the restart, until T0 + 40 + 60 s.
    let found = restored.process(&batch(vec![], &sends(10, &[T0 + 2_000, T0 + 2_010, T0 + 2_020])), T0);
    assert_eq!(throttle_findings(&found), vec![(12, "throttle:requester".to_owned(), 2)]);
    assert_eq!(found[0].detail["tightened"]["until"], "2026-11-24T17:01:00.040Z");
}

#[test]
fn rows_of_many_partitions_in_one_batch_count_as_row_by_row() {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    // Requesters on partitions 0 to 2 (each partition keeps windows of its own), interleaved in
    // one micro-batch, with re-deliveries: the same findings, in the same order, as one row per
    // batch.
    let mut rng = SmallRng::seed_from_u64(3);
    let (mut t, mut rows) = (T0, Vec::new());
    for n in 1..400u32 {
        // Bursts, and pauses that end episodes.
        t += if rng.random_range(0..12) == 0 { 1_500 } else { rng.random_range(0..40) };
        let from = if rng.random_range(0..2) == 0 { A } else { B };
        let n = if n > 1 && rng.random_range(0..10) == 0 { n - 1 } else { n };
        rows.push((attempt(n, t, from, "valid"), rng.random_range(0..3)));
    }
    let rows_batch = |rows: &[(String, i32)]| {
        let records: Vec<String> = rows.iter().map(|(r, _)| r.clone()).collect();
        let mut b = messages(&records, 0);
        b.partition = rows.iter().map(|(_, p)| *p).collect();
        MicroBatch { messages: Some(b), ..Default::default() }
    };
    let summary = |found: &[Finding]| -> Vec<(Uuid, String, String)> {
        found
            .iter()
            .filter(|f| f.kind == FindingKind::ThrottleExceeded)
            .map(|f| (f.event_id.unwrap(), f.offender.to_string(), f.detail.to_string()))
            .collect()
    };
    let mut whole = throttled(3, true);
    let at_once = summary(&whole.process(&rows_batch(&rows), T0));
    let mut single = throttled(3, true);
    let one_by_one: Vec<_> = rows.chunks(1).flat_map(|r| summary(&single.process(&rows_batch(r), T0))).collect();
    assert!(at_once.len() > 10, "{} findings", at_once.len());
    assert_eq!(at_once, one_by_one);
    assert_eq!(whole.stats().tightenings, single.stats().tightenings);
}

// ---- enforcement --------------------------------------------------------------------------------

#[test]
fn a_block_is_published_survives_a_restart_and_is_lifted_at_its_until() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalCheckpointStore::open(dir.path()).unwrap();
    let mut e = Engine::new(EngineConfig::default());
    let minute = 60_000;
    let bad: Vec<String> = (0..5).map(|i| attempt(i + 1, T0 + i64::from(i) * minute, A, "invalid")).collect();
    let found = e.process(&batch(vec![registered(A, T0 - minute), registered(B, T0 - minute)], &bad), T0);
    assert_eq!(found.len(), 5);
    let changes = e.take_enforcement();
    assert_eq!(changes.len(), 1);
    let block = &changes[0];
    assert_eq!(
        (block.state, block.since, block.until),
        (meshguard_schemas::EnforcementStateKind::Blocked, T0 + 4 * minute, Some(T0 + 64 * minute))
    );
    assert_eq!((block.attempts, block.findings.len()), (5, 5));
    assert_eq!(block.findings.last(), Some(&found[4].id));
    store.save(&mut e.checkpoint()).unwrap();

    // After a restart the block still holds: an attempt inside it gives only blocked_requester.
    let mut e = Engine::new(EngineConfig::default());
    e.restore(store.load().unwrap().unwrap()).unwrap();
    let found = e.process(&batch(vec![], &[attempt(6, T0 + 30 * minute, A, "invalid")]), T0);
    assert_eq!(kinds(&found), vec![(FindingKind::BlockedRequester, A.to_owned())]);
    assert!(e.take_enforcement().is_empty(), "attempts while blocked change nothing");
    // Once the watermark passes `until`, the UUID is published active again, from `until`.
    let found = e.process(&batch(vec![], &[attempt(7, T0 + 70 * minute, A, "valid")]), T0);
    assert!(found.is_empty());
    let changes = e.take_enforcement();
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (changes[0].state, changes[0].since, changes[0].until),
        (meshguard_schemas::EnforcementStateKind::Active, T0 + 64 * minute, None)
    );
}

#[test]
fn a_re_delivered_attempt_joins_the_histories_once() {
    let mut e = Engine::new(EngineConfig::default());
    let records: Vec<String> = (0..3).map(|i| attempt(i + 1, T0 + i64::from(i) * 1_000, A, "valid")).collect();
    let mb = batch(vec![registered(A, T0 - 1_000), registered(B, T0 - 1_000)], &records);
    e.process(&mb, T0);
    e.process(&batch(vec![], &records), T0);
    let schedules = &e.partition(&(InputTopic::Messages, 0)).unwrap().schedules;
    let pair = schedules.get(&(Uuid::parse_str(A).unwrap(), Uuid::parse_str(B).unwrap())).unwrap();
    assert_eq!(pair.attempts(), 3);
    assert_eq!(schedules.get(&(Uuid::parse_str(A).unwrap(), Uuid::nil())).unwrap().attempts(), 3);
}

#[test]
fn an_attempt_at_the_nil_target_joins_the_requesters_history_twice() {
    // The pair's key is then the requester's own: learned as the pair and as the requester.
    let mut e = Engine::new(EngineConfig::default());
    let nil = Uuid::nil().to_string();
    let records: Vec<String> = (0..3)
        .map(|i| attempt(i + 1, T0 + i64::from(i) * 1_000, A, "valid").replace(&format!(r#""to":"{B}""#), &format!(r#""to":"{nil}""#)))
        .collect();
    e.process(&batch(vec![registered(A, T0 - 1_000)], &records), T0);
    let schedules = &e.partition(&(InputTopic::Messages, 0)).unwrap().schedules;
    assert_eq!(schedules.len(), 1);
    assert_eq!(schedules.get(&(Uuid::parse_str(A).unwrap(), Uuid::nil())).unwrap().attempts(), 6);
}

#[test]
fn identity_requests_are_answered_once_and_never_create_state_for_partitions_not_held() {
    let decode = |topic: InputTopic, records: &[String], partition: i32| {
        let slices: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let out = BatchDecoder::new(topic).decode(&slices);
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        RowsBatch { partition: vec![partition; out.batch.num_rows()], batch: out.batch }
    };
    let interactions: Vec<String> = (0..5)
        .map(|i| {
            format!(r#"{{"id":"00000000-0000-4000-8000-1{i:011}","reporter":"{A}","peer":"{B}","kind":"call","ts":{}}}"#, T0 + i * 1_000)
        })
        .collect();
    let request = format!(r#"{{"id":"00000000-0000-4000-8000-200000000001","ts":{},"device":"{A}"}}"#, T0 + 60_000);
    let mut e = Engine::new(EngineConfig::default());
    let mb = MicroBatch {
        interactions: Some(decode(InputTopic::Interactions, &interactions, 0)),
        identity_requests: Some(decode(InputTopic::IdentityRequests, &[request.clone(), request.clone()], 3)),
        ..Default::default()
    };
    let found = e.process(&mb, T0);
    // The interactions topic has not reached the request's time: held, up to `max_wait_ms`.
    assert!(e.take_identity_results().is_empty());
    assert_eq!(e.identity_requests_held(), 2);
    assert!(e.process(&MicroBatch::default(), T0 + 999).is_empty());
    assert!(e.take_identity_results().is_empty());
    let found = [found, e.process(&MicroBatch::default(), T0 + 1_000)].concat();
    assert_eq!(e.identity_requests_held(), 0);
    let results = e.take_identity_results();
    assert_eq!(results.len(), 1, "a re-delivered request is answered once");
    // Five calls to B, B never reported anything: all unavailable, insufficient evidence.
    assert_eq!((results[0].checked, results[0].verified, results[0].unavailable), (5, 0, 5));
    assert_eq!(results[0].outcome, meshguard_schemas::Outcome::InsufficientEvidence);
    assert!(found.is_empty());
    assert!(e.partition(&(InputTopic::Messages, 3)).is_none(), "no state for a messages partition this worker does not hold");

    // The answer's id is remembered in the requests' partition for the dedup horizon of its event
    // time, then forgotten.
    let first = results[0].id;
    let emitted = |e: &Engine| e.partition(&(InputTopic::IdentityRequests, 3)).unwrap().emitted.clone();
    assert!(emitted(&e).contains_key(&first));
    // Forgotten by whole minutes: a minute after the horizon at most.
    let later = T0 + 60_000 + EngineConfig::default().dedup_horizon_ms + 60_000;
    let request = format!(r#"{{"id":"00000000-0000-4000-8000-200000000003","ts":{later},"device":"{A}"}}"#);
    e.process(
        &MicroBatch { identity_requests: Some(decode(InputTopic::IdentityRequests, &[request], 3)), ..Default::default() },
        T0 + 2_000,
    );
    e.process(&MicroBatch::default(), T0 + 60_000);
    let second = e.take_identity_results();
    assert_eq!(second.len(), 1);
    e.checkpoint();
    assert_eq!(emitted(&e).iter().map(|(id, _)| *id).collect::<Vec<_>>(), [second[0].id], "the first answer's id is past the horizon");
}

/// Ordering across topics: a request read before the interactions it depends on is held until the
/// interactions topic reaches its time on every partition, and survives a checkpoint meanwhile.
#[test]
fn an_identity_request_waits_for_the_interactions_it_depends_on() {
    let decode = |topic: InputTopic, records: &[String], partition: i32| {
        let slices: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let out = BatchDecoder::new(topic).decode(&slices);
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        RowsBatch { partition: vec![partition; out.batch.num_rows()], batch: out.batch }
    };
    let entry = |n: u32, reporter: &str, peer: &str, ts: i64| {
        format!(r#"{{"id":"00000000-0000-4000-8000-3{n:011}","reporter":"{reporter}","peer":"{peer}","kind":"proximity","ts":{ts}}}"#)
    };
    let t = T0 + 600_000;
    let request = format!(r#"{{"id":"00000000-0000-4000-8000-200000000002","ts":{t},"device":"{A}","min_verified":3}}"#);
    let cfg = EngineConfig {
        cross_check: crate::crosscheck::CrossCheckConfig { max_wait_ms: 60_000, ..Default::default() },
        ..Default::default()
    };
    let mut e = Engine::new(cfg.clone());
    e.set_interactions_partitions(2);
    let requests = MicroBatch { identity_requests: Some(decode(InputTopic::IdentityRequests, &[request], 0)), ..Default::default() };
    e.process(&requests, T0);
    assert_eq!(e.identity_requests_held(), 1);

    // Held across a checkpoint and a restart.
    let cp = e.checkpoint();
    let mut e = Engine::new(cfg);
    e.set_interactions_partitions(2);
    e.restore(cp).unwrap();
    assert_eq!(e.identity_requests_held(), 1);

    // The interactions arrive: A met B three times, B reports them back. Partition 0 goes past the
    // request, partition 1 has not yet: still held.
    let mut records = Vec::new();
    for i in 0..3 {
        let ts = T0 + i64::from(i) * 60_000;
        records.push(entry(i, A, B, ts));
        records.push(entry(10 + i, B, A, ts + 5_000));
    }
    records.push(entry(20, B, "c0000000-0000-4000-8000-00000000000c", t + 1_000));
    e.process(&MicroBatch { interactions: Some(decode(InputTopic::Interactions, &records, 0)), ..Default::default() }, T0 + 10);
    assert!(e.take_identity_results().is_empty(), "partition 1 has not reached the request");
    let late = [entry(30, "c0000000-0000-4000-8000-00000000000c", B, t)];
    e.process(&MicroBatch { interactions: Some(decode(InputTopic::Interactions, &late, 1)), ..Default::default() }, T0 + 20);
    let results = e.take_identity_results();
    assert_eq!(results.len(), 1);
    assert_eq!((results[0].outcome, results[0].checked, results[0].verified), (meshguard_schemas::Outcome::Confirmed, 3, 3));
    assert_eq!(e.identity_requests_held(), 0);
}

#[test]
fn a_requester_whose_attempts_arrive_on_two_partitions_is_counted_in_one() {
    // The platform keys by `from` as sent: "A" in upper case lands on another partition.
    let run = |home_partitions: bool| {
        let mut e = Engine::new(EngineConfig::default());
        if home_partitions {
            e.set_messages_partitions(3);
            e.assign(&[(InputTopic::Messages, 0), (InputTopic::Messages, 1), (InputTopic::Messages, 2)]);
        }
        e.process(&batch(vec![registered(A, T0 - 1_000), registered(B, T0 - 1_000)], &[]), T0);
        let records: Vec<String> = (0..11).map(|i| attempt(i + 1, T0 + i64::from(i), A, "valid")).collect();
        // Six arrived on partition 0, five on partition 1.
        let mut rows = messages(&records, 0);
        rows.partition = [vec![0; 6], vec![1; 5]].concat();
        let found = e.process(&MicroBatch { messages: Some(rows), ..Default::default() }, T0);
        found.into_iter().filter(|f| f.kind == FindingKind::ThrottleExceeded).count()
    };
    assert_eq!(run(true), 1, "one home partition: eleven in a second");
    assert_eq!(run(false), 0, "without it the count splits six and five");
}

#[test]
fn enforcement_published_by_another_worker_applies_to_requesters_and_targets_homed_there() {
    let mut e = Engine::new(EngineConfig::default());
    // This worker holds partition 0 of 2; A and B are homed where their UUID mod 2 says.
    e.set_messages_partitions(2);
    e.assign(&[(InputTopic::Messages, 0)]);
    let (a, b) = (Uuid::parse_str(A).unwrap(), Uuid::parse_str(B).unwrap());
    let remote_home = |u: Uuid| u.as_u128() % 2 == 1;
    assert!(remote_home(b) && !remote_home(a), "the test's UUIDs: B homed on the other worker, A here");
    e.process(&batch(vec![registered(A, T0 - 1_000), registered(B, T0 - 1_000)], &[]), T0);
    let record = |uuid: Uuid, state| meshguard_schemas::output::EnforcementState {
        uuid,
        state,
        since: T0,
        until: Some(T0 + 3_600_000),
        reason: "test".into(),
        attempts: 5,
        findings: vec![],
    };
    use meshguard_schemas::EnforcementStateKind::{Active, Blocked};
    // B (the target of `attempt`) blocked elsewhere: an attempt to it gives no finding; once
    // active again, the same bad attempt gives its finding.
    e.apply_remote_enforcement(&record(b, Blocked));
    let found = e.process(&batch(vec![], &[attempt(1, T0 + 10, A, "invalid")]), T0);
    assert!(found.is_empty(), "attempts addressed to a blocked UUID give no finding");
    e.apply_remote_enforcement(&record(b, Active));
    e.apply_remote_enforcement(&record(a, Blocked));
    let found = e.process(&batch(vec![], &[attempt(2, T0 + 20, A, "invalid")]), T0);
    // A is homed here: another worker's record about it is not this worker's state.
    assert_eq!(kinds(&found), vec![(FindingKind::BadCredentials, A.to_owned())]);
    // A record about B blocking it as a requester applies here.
    e.apply_remote_enforcement(&record(b, Blocked));
    let from_b = attempt(3, T0 + 30, B, "valid").replace(&format!(r#""to":"{B}""#), &format!(r#""to":"{A}""#));
    let found = e.process(&batch(vec![], &[from_b]), T0);
    assert_eq!(kinds(&found), vec![(FindingKind::BlockedRequester, B.to_owned())]);
}

/// One attempt of `A` a minute for `minutes`, from a country that changes every minute, with the
/// directory re-announcing `A` each time, on messages partition 0; a partition of the
/// identity-requests topic is consumed alongside (no request: it has no event time), and messages
/// partition 1 sees one attempt at the start and then none (`quiet`). Returns the versions the
/// global tables hold at the end (registry, locations).
fn global_versions_after(minutes: i64, quiet: bool) -> (usize, usize) {
    let mut e = engine_after(minutes, quiet);
    let cp = e.checkpoint();
    assert!(cp.partitions.iter().any(|((topic, _), _)| *topic == InputTopic::IdentityRequests), "the requests' partition has state");
    (cp.global.registry.rows.len(), cp.global.locations.rows.len())
}

/// An engine after `minutes` of one attempt and one registry change a minute (the location
/// alternating), with an identity-requests partition, and a quiet messages partition if `quiet`.
fn engine_after(minutes: i64, quiet: bool) -> Engine {
    let mut e = Engine::new(EngineConfig::default());
    if quiet {
        e.process(&MicroBatch { messages: Some(messages(&[attempt(999, T0, A, "valid")], 1)), ..Default::default() }, T0);
    }
    for minute in 0..minutes {
        let ts = T0 + minute * 60_000;
        let country = ["DE", "FR"][minute as usize % 2];
        let record = format!(
            r#"{{"id":"00000000-0000-4000-8000-{minute:012}","ts":{ts},"action":"send","from":"{A}","to":"{B}","auth":"valid","location":{{"country":"{country}"}}}}"#
        );
        let positions = vec![Position { topic: InputTopic::IdentityRequests, partition: 0, next_offset: minute + 1 }];
        let mb = MicroBatch { registry: vec![registered(A, ts)], messages: Some(messages(&[record], 0)), positions, ..Default::default() };
        e.process(&mb, ts);
    }
    e
}

#[test]
fn the_steps_ahead_of_a_checkpoint_prune_the_global_tables() {
    let mut e = engine_after(20, false);
    let locations = e.locations.versions();
    assert_eq!(locations, 20, "a version per change");
    // One step with a budget of one key per table: the same versions as the cut's prune leaves.
    e.checkpoint_step(1);
    assert_eq!(e.locations.versions(), 2);
    let cp = e.checkpoint();
    assert_eq!((cp.global.registry.rows.len(), cp.global.locations.rows.len()), (2, 2));
}

#[test]
fn the_global_tables_forget_versions_no_attempt_can_ask_for_whatever_the_other_topics_partitions_hold() {
    // Allowed lateness 30 s: the version in force 30 s before the last attempt, and the last one.
    assert_eq!(global_versions_after(20, false), (2, 2));
}

#[test]
fn a_quiet_partition_holds_the_global_tables_versions_back_for_the_dedup_horizon_at_most() {
    // The busiest partition's watermark is 19 min − 30 s; the quiet one's 30 s before the start.
    // Versions are kept from 10 minutes (the dedup horizon) before the former: minutes 9 to 19,
    // and minute 8's, in force then.
    assert_eq!(global_versions_after(20, true), (12, 12));
    assert_eq!(global_versions_after(5, true), (5, 5), "within the horizon the quiet partition holds every version");
}

// ---- timing schedules' eviction ---------------------------------------------------------------

/// Runs the steps ahead of checkpoints until none has eviction work left that cannot wait.
fn step_until_done(e: &mut Engine) {
    for _ in 0..1_000 {
        if e.checkpoint_step(CHECKPOINT_STEP_ROWS) == 0 {
            return;
        }
    }
    panic!("the steps never finish");
}

#[test]
fn a_worker_keeps_at_most_its_share_of_schedules_and_forgets_idle_ones() {
    let mut cfg = EngineConfig::default();
    cfg.timing.max_schedules = 100;
    cfg.timing.forget_after_days = 1;
    let mut e = Engine::new(cfg);
    let requester = |i: u32| format!("aaaaaaaa-0000-4000-8000-{i:012}");
    // 300 requesters, each a schedule of its own and one of its pair with B: 600 schedules in one
    // partition, the only one held, so the cap is all its own.
    let records: Vec<String> = (0..300).map(|i| attempt(i + 1, T0 + i64::from(i), &requester(i), "valid")).collect();
    e.process(&batch(vec![], &records), T0);
    let schedules =
        |e: &Engine| e.partition(&(InputTopic::Messages, 0)).unwrap().schedules.iter().map(|(k, s)| (k, *s)).collect::<Vec<_>>();
    assert_eq!(schedules(&e).len(), 600);
    step_until_done(&mut e);
    let kept = schedules(&e);
    assert!((80..=100).contains(&kept.len()), "{} schedules kept at a cap of 100", kept.len());
    assert!(kept.iter().all(|((_, target), _)| target.is_nil()), "the requesters' own schedules go last");
    assert_eq!(e.stats().schedules_evicted, [0, 600 - kept.len() as u64]);

    // Two days later one requester comes back: the others have been idle for longer than a day
    // of event time (behind the watermark) and are forgotten; its own schedule kept its history.
    let back = kept[0].0.0.to_string();
    let later = T0 + 2 * 86_400_000;
    e.process(&batch(vec![], &[attempt(1_000, later, &back, "valid")]), T0);
    step_until_done(&mut e);
    for _ in 0..10 {
        e.checkpoint_step(CHECKPOINT_STEP_ROWS);
    }
    let kept_later = schedules(&e);
    let mut keys: Vec<String> = kept_later.iter().map(|((r, t), s)| format!("{r}/{t}/{}", s.attempts())).collect();
    keys.sort();
    let mut want = vec![format!("{back}/{B}/1"), format!("{back}/{}/2", Uuid::nil())];
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(e.stats().schedules_evicted[0], kept.len() as u64 - 1);

    // The checkpoint holds what is left.
    let dir = tempfile::tempdir().unwrap();
    let store = LocalCheckpointStore::open(dir.path()).unwrap();
    store.save(&mut e.checkpoint()).unwrap();
    let mut restored = Engine::new(EngineConfig::default());
    restored.restore(store.load().unwrap().unwrap()).unwrap();
    assert_eq!(schedules(&restored), kept_later);
}
