//! Golden detection tests: input events and a registry in, findings out, as files.
//!
//! Each case is `tests/golden/<name>.json`:
//!
//! ```json
//! { "description": "...",
//!   "now": "2026-11-24T18:00:00Z",                       // detection time written into findings
//!   "registry": [ {"at": "...", "record": {...}}, {"at": "...", "tombstone": "uuid"} ],
//!   "presence": [ {presence record}, ... ],
//!   "messages": [ {message attempt}, ... ],
//!   "expect":   { "<message id>": ["kind", ...], ... },  // every other message: no finding
//!   "throttles": { ... }, "enforcement": { ... } }         // optional settings
//! ```
//!
//! The test runs the case through the engine as one micro-batch (registry changes apply from their
//! `at`, the Kafka timestamp), checks the hand-written `expect` (which attempts break which kinds),
//! then compares every finding, rule and detail included, with `tests/golden/<name>.expected.jsonl`.
//! `MESHGUARD_BLESS=1 cargo test -p meshguard-analytics --test golden` rewrites the expected files;
//! review their diff before committing it.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshguard_analytics::enforcement::EnforcementConfig;
use meshguard_analytics::throttle::ThrottleConfig;
use meshguard_analytics::{Engine, EngineConfig, MicroBatch, RegistryChange, RowsBatch};
use meshguard_schemas::registry::RegistryRecord;
use meshguard_schemas::time::parse_time_str;
use meshguard_schemas::{BatchDecoder, InputTopic};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[allow(dead_code)]
    description: String,
    now: String,
    #[serde(default)]
    registry: Vec<Change>,
    #[serde(default)]
    presence: Vec<Value>,
    messages: Vec<Value>,
    expect: BTreeMap<Uuid, Vec<String>>,
    /// `[throttles]` settings, when the case needs other than the defaults.
    #[serde(default)]
    throttles: Option<ThrottleConfig>,
    /// `[enforcement]` settings, likewise (cases about one rule turn enforcement off, so that an
    /// offender with five findings in ten minutes is not blocked half-way through the case).
    #[serde(default)]
    enforcement: Option<EnforcementConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    at: String,
    #[serde(default)]
    record: Option<Value>,
    #[serde(default)]
    tombstone: Option<Uuid>,
}

fn time(s: &str) -> i64 {
    parse_time_str(s).unwrap_or_else(|| panic!("bad time {s}"))
}

fn rows(topic: InputTopic, records: &[Value]) -> Option<RowsBatch> {
    if records.is_empty() {
        return None;
    }
    let texts: Vec<String> = records.iter().map(Value::to_string).collect();
    let slices: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
    let out = BatchDecoder::new(topic).decode(&slices);
    assert!(out.rejected.is_empty(), "case inputs must be valid: {:?}", out.rejected);
    Some(RowsBatch { partition: vec![0; out.batch.num_rows()], batch: out.batch })
}

fn run(path: &Path) -> Result<(), String> {
    let case: Case = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).map_err(|e| format!("{}: {e}", path.display()))?;
    let registry = case
        .registry
        .iter()
        .map(|c| {
            let effective_ms = time(&c.at);
            match (&c.record, c.tombstone) {
                (Some(r), None) => {
                    let rec = RegistryRecord::from_json(0, r.to_string().as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    RegistryChange { uuid: rec.uuid, record: Some(Arc::new(rec)), effective_ms }
                }
                (None, Some(uuid)) => RegistryChange { uuid, record: None, effective_ms },
                _ => panic!("{}: a registry change has a record or a tombstone", path.display()),
            }
        })
        .collect();
    let mb = MicroBatch {
        registry,
        presence: rows(InputTopic::Presence, &case.presence),
        messages: rows(InputTopic::Messages, &case.messages),
        ..Default::default()
    };
    let mut engine = Engine::new(EngineConfig {
        throttles: case.throttles.clone().unwrap_or_default(),
        enforcement: case.enforcement.clone().unwrap_or_default(),
        ..EngineConfig::default()
    });
    let findings = engine.process(&mb, time(&case.now));

    // The intent, written by hand.
    let mut got: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
    for f in &findings {
        got.entry(f.event_id.unwrap()).or_default().push(f.kind.to_string());
    }
    if got != case.expect {
        return Err(format!("{}: kinds per attempt differ\n  expected {:?}\n  got      {:?}", path.display(), case.expect, got));
    }

    // The exact output.
    let text: String = findings.iter().map(|f| serde_json::to_string(f).unwrap() + "\n").collect();
    let golden = path.with_extension("expected.jsonl");
    if std::env::var_os("MESHGUARD_BLESS").is_some() {
        std::fs::write(&golden, &text).unwrap();
        return Ok(());
    }
    let want =
        std::fs::read_to_string(&golden).map_err(|e| format!("{}: {e} (run with MESHGUARD_BLESS=1 to create it)", golden.display()))?;
    if want != text {
        let first = want.lines().zip(text.lines()).position(|(a, b)| a != b).unwrap_or(want.lines().count().min(text.lines().count()));
        return Err(format!(
            "{}: output differs from {} at finding {}\n  expected {}\n  got      {}",
            path.display(),
            golden.display(),
            first + 1,
            want.lines().nth(first).unwrap_or("(nothing)"),
            text.lines().nth(first).unwrap_or("(nothing)")
        ));
    }
    Ok(())
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json") && !p.to_string_lossy().ends_with(".expected.json"))
        .collect();
    v.sort();
    v
}

#[test]
fn golden_cases() {
    let cases = cases();
    assert!(cases.len() >= 9, "expected the golden cases under tests/golden, found {}", cases.len());
    let failures: Vec<String> = cases.iter().filter_map(|c| run(c).err()).collect();
    assert!(failures.is_empty(), "{} of {} golden cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn every_finding_kind_of_the_policy_check_has_a_golden_case() {
    let mut seen = std::collections::BTreeSet::new();
    for c in cases() {
        let case: Case = serde_json::from_str(&std::fs::read_to_string(&c).unwrap()).unwrap();
        seen.extend(case.expect.into_values().flatten());
    }
    for kind in [
        "unregistered_requester",
        "bad_credentials",
        "permission_denied",
        "timing_restriction",
        "location_restriction",
        "envelope_restriction",
        "path_restriction",
        "presence_restriction",
        "throttle_exceeded",
        "blocked_requester",
        "timing_anomaly",
    ] {
        assert!(seen.contains(kind), "no golden case expects {kind}");
    }
}
