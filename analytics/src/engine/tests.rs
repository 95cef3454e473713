#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use meshguard_schemas::registry::RegistryRecord;
use meshguard_schemas::{BatchDecoder, FindingKind, InputTopic};
use uuid::Uuid;

use super::checkpoint::{CheckpointStore, LocalCheckpointStore};
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
    store.save(&e.checkpoint()).unwrap();

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
}
