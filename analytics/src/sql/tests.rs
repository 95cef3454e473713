#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use meshguard_schemas::output::{EnforcementState, Finding};
use meshguard_schemas::{Action, EnforcementStateKind, FindingKind, Severity};
use uuid::Uuid;

use super::output::{Format, render};
use super::*;

const DAY_MS: i64 = 1_764_000_000_000; // 2025-11-24T16:00:00Z

fn finding(n: u128, ts: i64) -> Finding {
    Finding {
        id: Uuid::from_u128(0x1000 + n),
        ts,
        event_ts: ts - 5,
        event_id: Some(Uuid::from_u128(0x2000 + n)),
        kind: if n.is_multiple_of(2) { FindingKind::PermissionDenied } else { FindingKind::BadCredentials },
        offender: Uuid::from_u128(0xAA + n % 3),
        target: Some(Uuid::from_u128(0xBB)),
        action: Some(Action::Send),
        rule: "permissions:send".into(),
        detail: serde_json::json!({ "level": "send" }),
        score: 1.0,
        severity: Severity::High,
    }
}

/// Writes `batch` as one closed archive file of `table`, as the archive writer would.
fn write_file(dir: &Path, table: &str, date: &str, name: &str, batch: &arrow::record_batch::RecordBatch) {
    let folder = dir.join(table).join(format!("date={date}"));
    std::fs::create_dir_all(&folder).unwrap();
    let file = std::fs::File::create(folder.join(name)).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

async fn count(surface: &SqlSurface, sql: &str) -> i64 {
    let (_, batches) = surface.query(sql).await.unwrap();
    batches[0].column(0).as_primitive::<Int64Type>().value(0)
}

#[tokio::test]
async fn a_query_sees_closed_files_and_live_rows_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let sources = SqlSources::live(dir.path());
    let closed: Vec<Finding> = (0..10).map(|n| finding(n, DAY_MS + n as i64)).collect();
    write_file(dir.path(), folders::FINDINGS, "2025-11-24", "part-w-1-000001.parquet", &tables::findings_batch(&closed).unwrap());
    // A temporary (open) file is not part of the table: its rows are the live ones.
    write_file(dir.path(), folders::FINDINGS, "2025-11-24", ".part-w-1-000002.parquet.tmp", &tables::findings_batch(&closed).unwrap());
    let live = sources.findings.clone().unwrap();
    let open: Vec<Finding> = (10..13).map(|n| finding(n, DAY_MS + n as i64)).collect();
    live.push(2, tables::findings_batch(&open).unwrap());
    let surface = SqlSurface::new(&sources).await.unwrap();

    assert_eq!(count(&surface, "SELECT count(*) FROM findings").await, 13);
    assert_eq!(count(&surface, "SELECT count(DISTINCT id) FROM findings").await, 13);
    assert_eq!(count(&surface, "SELECT count(*) FROM findings WHERE kind = 'bad_credentials'").await, 6);
    let offender = Uuid::from_u128(0xAA).to_string();
    assert_eq!(count(&surface, &format!("SELECT count(*) FROM findings WHERE offender = '{offender}'")).await, 5);

    // The file closes: its rows move from the live set to a closed file, and are still seen once.
    write_file(dir.path(), folders::FINDINGS, "2025-11-24", "part-w-1-000002.parquet", &tables::findings_batch(&open).unwrap());
    live.close(2, || ());
    assert_eq!(count(&surface, "SELECT count(*) FROM findings").await, 13);
}

#[tokio::test]
async fn every_table_answers_even_with_no_archive_yet() {
    let dir = tempfile::tempdir().unwrap();
    let sources = SqlSources { archive_dir: dir.path().join("nothing-here"), ..Default::default() }
        .with_audit(dir.path().join("nothing-here/audit"), meshguard_enforcer::audit_schema());
    let surface = SqlSurface::new(&sources).await.unwrap();
    for table in ["findings", "enforcement", "enforcement_current", "attempts", "interactions", "devices", "audit"] {
        assert_eq!(count(&surface, &format!("SELECT count(*) FROM {table}")).await, 0, "{table}");
    }
}

#[tokio::test]
async fn writes_and_definitions_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let surface = SqlSurface::new(&SqlSources::live(dir.path())).await.unwrap();
    for sql in [
        "CREATE TABLE t (x INT)",
        "CREATE VIEW v AS SELECT 1",
        "DROP VIEW attempts",
        "INSERT INTO findings SELECT * FROM findings",
        "COPY findings TO '/tmp/x.csv'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        match surface.query(sql).await {
            Err(SqlError::Refused(what)) => assert!(!what.is_empty(), "{sql}"),
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }
    // And the tables are still there.
    assert_eq!(count(&surface, "SELECT count(*) FROM attempts").await, 0);
    let err = surface.query("SELECT nope FROM findings").await.unwrap_err();
    assert!(matches!(err, SqlError::Query(_)) && err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn enforcement_and_devices_read_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let sources = SqlSources::live(dir.path());
    let who = Uuid::from_u128(0xAA);
    let change = EnforcementState {
        uuid: who,
        state: EnforcementStateKind::Blocked,
        since: DAY_MS,
        until: Some(DAY_MS + 3_600_000),
        reason: "5 unauthorized attempts in 10 min".into(),
        attempts: 5,
        findings: vec![Uuid::from_u128(1), Uuid::from_u128(2)],
    };
    sources.enforcement.as_ref().unwrap().push(1, tables::enforcement_batch(&[change], DAY_MS + 10).unwrap());
    let record: meshguard_schemas::registry::RegistryRecord = serde_json::from_value(serde_json::json!({
        "uuid": who, "kind": "device", "type": "thermostat", "groups": ["company:acme", "site:7"], "exempt": false
    }))
    .unwrap();
    sources.devices.as_ref().unwrap().apply([(who, DAY_MS, Some(&Arc::new(record)))]);
    let surface = SqlSurface::new(&sources).await.unwrap();

    let (_, rows) = surface
        .query("SELECT e.state, e.attempts, e.findings, d.type, d.groups FROM enforcement e JOIN devices d ON d.uuid = e.uuid")
        .await
        .unwrap();
    let row = &rows[0];
    assert_eq!(row.num_rows(), 1);
    assert_eq!(row.column(0).as_string::<i32>().value(0), "blocked");
    assert_eq!(row.column(1).as_primitive::<Int64Type>().value(0), 5);
    assert_eq!(row.column(2).as_string::<i32>().value(0), format!("{},{}", Uuid::from_u128(1), Uuid::from_u128(2)));
    assert_eq!(row.column(3).as_string::<i32>().value(0), "thermostat");
    assert_eq!(row.column(4).as_string::<i32>().value(0), "company:acme,site:7");

    sources.devices.as_ref().unwrap().apply([(who, DAY_MS + 1, None)]);
    assert_eq!(count(&surface, "SELECT count(*) FROM devices").await, 0, "a tombstone unregisters");
}

#[tokio::test]
async fn the_attempts_view_shows_uuids_and_enums_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let sources = SqlSources::live(dir.path());
    let decoded = meshguard_schemas::BatchDecoder::new(meshguard_schemas::InputTopic::Messages).decode(&[br#"{
        "id":"00000000-0000-0000-0000-000000000001","ts":1764000000000,"action":"send",
        "from":"00000000-0000-0000-0000-0000000000aa","to":"00000000-0000-0000-0000-0000000000bb","auth":"valid",
        "route":["00000000-0000-0000-0000-0000000000c1","00000000-0000-0000-0000-0000000000c2"]}"#
        .as_slice()]);
    assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);
    write_file(dir.path(), folders::ATTEMPTS, "2025-11-24", "part-w-1-000001.parquet", &decoded.batch);
    let surface = SqlSurface::new(&sources).await.unwrap();
    let (_, rows) = surface.query(r#"SELECT id, action, "from", "to", auth, route FROM attempts"#).await.unwrap();
    let texts: Vec<String> = (0..6).map(|c| rows[0].column(c).as_string::<i32>().value(0).to_owned()).collect();
    assert_eq!(
        texts,
        [
            "00000000-0000-0000-0000-000000000001",
            "send",
            "00000000-0000-0000-0000-0000000000aa",
            "00000000-0000-0000-0000-0000000000bb",
            "valid",
            "00000000-0000-0000-0000-0000000000c1,00000000-0000-0000-0000-0000000000c2"
        ]
    );
}

#[tokio::test]
async fn results_render_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let sources = SqlSources::live(dir.path());
    sources.findings.as_ref().unwrap().push(1, tables::findings_batch(&[finding(1, DAY_MS), finding(2, DAY_MS + 1)]).unwrap());
    let surface = SqlSurface::new(&sources).await.unwrap();
    let (schema, rows) = surface.query("SELECT kind, count(*) AS n FROM findings GROUP BY kind ORDER BY kind").await.unwrap();

    let table = String::from_utf8(render(Format::Table, &schema, &rows).unwrap()).unwrap();
    assert!(table.contains("| kind") && table.contains("| bad_credentials   | 1 |"), "{table}");
    let csv = String::from_utf8(render(Format::Csv, &schema, &rows).unwrap()).unwrap();
    assert_eq!(csv, "kind,n\nbad_credentials,1\npermission_denied,1\n");
    let json: serde_json::Value = serde_json::from_slice(&render(Format::Json, &schema, &rows).unwrap()).unwrap();
    assert_eq!(json, serde_json::json!([{ "kind": "bad_credentials", "n": 1 }, { "kind": "permission_denied", "n": 1 }]));
    let ipc = render(Format::Arrow, &schema, &rows).unwrap();
    let read: Vec<_> = arrow::ipc::reader::StreamReader::try_new(ipc.as_slice(), None).unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(read.iter().map(|b| b.num_rows()).sum::<usize>(), 2);

    let (schema, empty) = surface.query("SELECT kind FROM findings WHERE false").await.unwrap();
    assert_eq!(String::from_utf8(render(Format::Csv, &schema, &empty).unwrap()).unwrap(), "kind\n");
    assert_eq!(render(Format::Json, &schema, &empty).unwrap(), b"[]");
    assert!("yaml".parse::<Format>().unwrap_err().contains("table, csv, json or arrow"));
    let _ = rows[0].column(0).len();
}

/// Audit rows as the enforcer writes them: `uuid`'s state change to blocked and two calls of it,
/// one applied and one failed.
fn audit_rows(uuid: Uuid, ts: i64) -> arrow::record_batch::RecordBatch {
    use meshguard_enforcer::audit::{AuditRow, to_batch};
    let state = EnforcementState {
        uuid,
        state: EnforcementStateKind::Blocked,
        since: ts - 1_000,
        until: Some(ts + 3_600_000),
        reason: "5 unauthorized attempts in 10 min".into(),
        attempts: 5,
        findings: vec![Uuid::from_u128(1)],
    };
    let action = meshguard_enforcer::EnforcementAction::new(state);
    let change = AuditRow::state_change(&action, 3, 42, ts);
    let applied = AuditRow::target_call(&change, "mosquitto", 1, "applied", None, ts, std::time::Duration::from_millis(2));
    let failed = AuditRow::target_call(&change, "soc", 1, "failed", Some("HTTP 503: busy".into()), ts, std::time::Duration::from_millis(9));
    to_batch(&[change, applied, failed]).unwrap()
}

/// The enforcer's audit trail is the `audit` table: UUIDs and enums as text, closed files only.
#[tokio::test]
async fn the_audit_trail_is_a_table_with_text_uuids_and_enums() {
    let dir = tempfile::tempdir().unwrap();
    let uuid = Uuid::from_u128(0xB10C);
    let batch = audit_rows(uuid, DAY_MS);
    write_file(dir.path(), "audit", "2025-11-24", "part-w-enforcer-1-000001.parquet", &batch);
    write_file(dir.path(), "audit", "2025-11-24", ".part-w-enforcer-1-000002.parquet.tmp", &batch);
    let sources = SqlSources::live(dir.path()).with_audit(dir.path().join("audit"), meshguard_enforcer::audit_schema());
    let surface = SqlSurface::new(&sources).await.unwrap();

    assert_eq!(count(&surface, "SELECT count(*) FROM audit").await, 3, "the temporary file is not read");
    let (schema, batches) = surface
        .query("SELECT uuid, action, state, target, outcome, error, \"offset\" FROM audit WHERE event = 'target_call' ORDER BY target")
        .await
        .unwrap();
    let json = String::from_utf8(render(Format::Json, &schema, &batches).unwrap()).unwrap();
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    // (JSON output leaves out null columns: the applied call has no `error`.)
    let want = |target: &str, outcome: &str| {
        serde_json::json!({"uuid": uuid.to_string(), "action": "block", "state": "blocked", "target": target,
            "outcome": outcome, "offset": 42})
    };
    let mut failed = want("soc", "failed");
    failed["error"] = "HTTP 503: busy".into();
    assert_eq!(rows, serde_json::json!([want("mosquitto", "applied"), failed]));

    // Without the trail's folder given, there is no such table.
    let plain = SqlSurface::new(&SqlSources::live(dir.path())).await.unwrap();
    assert!(plain.query("SELECT * FROM audit").await.unwrap_err().to_string().contains("audit"));
}

/// The README's ten canned queries (and the audit trail's) run as written (on tables with a few rows).
#[tokio::test]
async fn the_readme_queries_run() {
    let readme = include_str!("../../../README.md");
    let start = readme.find("Ten queries an operator will want").expect("the README's canned queries");
    let block = &readme[start..];
    let block = &block[block.find("```sql").unwrap() + 6..];
    let block = &block[..block.find("```").unwrap()];
    let statements: Vec<&str> = block.split(';').map(str::trim).filter(|s| !s.is_empty()).collect();
    assert_eq!(statements.len(), 11, "{block}");

    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    write_file(dir.path(), "audit", &today, "part-w-enforcer-1-000001.parquet", &audit_rows(Uuid::from_u128(0xB10C), now));
    let sources = SqlSources::live(dir.path()).with_audit(dir.path().join("audit"), meshguard_enforcer::audit_schema());
    sources.findings.as_ref().unwrap().push(1, tables::findings_batch(&[finding(1, now), finding(2, now)]).unwrap());
    let surface = SqlSurface::new(&sources).await.unwrap();
    for sql in &statements {
        if let Err(e) = surface.query(sql).await {
            panic!("README query fails: {e}\n{sql}");
        }
    }
    let (_, failed) = surface.query(statements[10]).await.unwrap();
    assert_eq!(failed.iter().map(|b| b.num_rows()).sum::<usize>(), 1, "the failed call to soc");
}
