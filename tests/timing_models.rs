//! The timing models against a real attempt archive: Parquet files written by the archive writer,
//! read back by the Polars feature extraction, trained with linfa, and `meshguard train` run as a
//! process.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::Path;
use std::process::Command;

use meshguard_analytics::timing::TimingConfig;
use meshguard_analytics::timing_model::{ModelManifest, ModelStore, extract, train, train_from_archive};
use meshguard_ingest::{ArchiveConfig, ArchiveMetrics, ParquetArchive};
use meshguard_schemas::{BatchDecoder, InputTopic};
use uuid::Uuid;

/// 2026-10-26, a Monday.
const MONDAY: i64 = 1_792_972_800_000;
const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;
const A: &str = "a0000000-0000-4000-8000-000000000001";
const B: &str = "b0000000-0000-4000-8000-000000000001";
const C: &str = "c0000000-0000-4000-8000-000000000001";

fn attempt(n: u64, ts: i64, from: &str, to: Option<&str>) -> String {
    let (action, to) = match to {
        Some(t) => ("send", format!(r#","to":"{t}""#)),
        None => ("connect", String::new()),
    };
    format!(r#"{{"id":"00000000-0000-4000-8000-{n:012}","ts":{ts},"action":"{action}","from":"{from}"{to},"auth":"valid"}}"#)
}

/// Writes `records` (message JSON) to an archive under `dir`, in batches of `per_batch`.
fn archive(dir: &Path, records: &[String], per_batch: usize) {
    let cfg = ArchiveConfig { dir: dir.to_owned(), max_rows_per_file: 500, ..Default::default() };
    let mut archive = ParquetArchive::open(
        &cfg,
        meshguard_ingest::archive::ATTEMPTS,
        InputTopic::Messages.schema(),
        Some("test"),
        MONDAY,
        &ArchiveMetrics::unregistered().unwrap(),
    )
    .unwrap();
    let mut decoder = BatchDecoder::new(InputTopic::Messages);
    for chunk in records.chunks(per_batch) {
        let slices: Vec<&[u8]> = chunk.iter().map(|r| r.as_bytes()).collect();
        let out = decoder.decode(&slices);
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        archive.append(&out.batch).unwrap();
    }
    archive.close_all().unwrap();
}

/// A→B three times every weekday at 07:xx for four weeks (60 attempts), a connect by A each
/// Monday, one attempt archived twice, and one before the horizon.
fn weekday_mornings() -> Vec<String> {
    let mut records = Vec::new();
    let mut n = 0;
    for w in 0..4 {
        for d in 0..5 {
            for k in 0..3 {
                n += 1;
                records.push(attempt(n, MONDAY + (w * 7 + d) * DAY + 7 * HOUR + k * 20 * 60_000, A, Some(B)));
            }
        }
        n += 1;
        records.push(attempt(n, MONDAY + w * 7 * DAY + 9 * HOUR, A, None));
    }
    records.push(records[5].clone());
    records.push(attempt(9_999, MONDAY - 3 * DAY, A, Some(B)));
    records
}

#[test]
fn features_come_from_the_archives_parquet_deduplicated_and_within_the_horizon() {
    let dir = tempfile::tempdir().unwrap();
    archive(dir.path(), &weekday_mornings(), 7);
    // A temporary file of a writer still at work is not read.
    let folder = dir.path().join("attempts/date=2026-10-27");
    std::fs::write(folder.join(".part-other-1-000001.parquet.tmp"), b"half written").unwrap();

    let f = extract(dir.path(), MONDAY, MONDAY + 28 * DAY).unwrap();
    assert_eq!(f.attempts, 64, "60 sends and 4 connects; the repeat and the attempt before the horizon are not counted");
    assert!(f.files >= 20, "one file per date at least: {}", f.files);
    let (a, b) = (Uuid::parse_str(A).unwrap(), Uuid::parse_str(B).unwrap());
    let pair = &f.keys[&(a, b)];
    assert_eq!((pair.attempts, pair.days), (60, 20));
    assert_eq!(pair.first_ms, MONDAY + 7 * HOUR);
    assert_eq!(pair.last_ms, MONDAY + 25 * DAY + 7 * HOUR + 40 * 60_000);
    for d in 0..5 {
        assert_eq!(pair.profile[d * 24 + 7], 12, "weekday {d} at 07:xx");
    }
    assert_eq!(pair.profile.iter().sum::<u32>(), 60);
    assert_eq!(pair.weekdays(), [12, 12, 12, 12, 12, 0, 0]);
    // Gaps: 20 minutes within a morning (2 per day), then 24 h or 72 h between mornings.
    assert_eq!(pair.gap_median_s, 1_200.0);
    assert!(pair.gap_p75_s > 80_000.0, "{}", pair.gap_p75_s);
    let requester = &f.keys[&(a, Uuid::nil())];
    assert_eq!((requester.attempts, requester.profile[9]), (64, 4), "the requester's own history holds its connects");
    assert_eq!(f.keys.len(), 2);

    let empty = extract(&dir.path().join("nothing here"), MONDAY, MONDAY + DAY).unwrap();
    assert_eq!((empty.attempts, empty.keys.len()), (0, 0));
}

#[test]
fn training_from_the_archive_is_deterministic_and_a_young_pair_gets_no_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = weekday_mornings();
    // C→B: 100 attempts, but all in the last 10 days.
    for i in 0..100 {
        records.push(attempt(10_000 + i, MONDAY + 18 * DAY + (i as i64) * 2 * HOUR, C, Some(B)));
    }
    archive(dir.path(), &records, 13);
    let cfg = TimingConfig::default();
    let until = MONDAY + 28 * DAY;
    let one = train_from_archive(dir.path(), &cfg, until).unwrap();
    let two = train_from_archive(dir.path(), &cfg, until).unwrap();
    assert_eq!(ModelStore::encode(&one.model, 1), ModelStore::encode(&two.model, 1));
    let (a, b, c) = (Uuid::parse_str(A).unwrap(), Uuid::parse_str(B).unwrap(), Uuid::parse_str(C).unwrap());
    assert!(one.model.get(&(a, b)).is_some());
    assert!(one.model.get(&(c, b)).is_none(), "10 days of history are not enough");
    assert!(one.model.get(&(c, Uuid::nil())).is_none());
    let sunday = MONDAY + 34 * DAY + 3 * HOUR;
    assert_eq!(one.model.judge(&(a, b), sunday).map(|j| j.score), Some(1.0));
    assert!(one.model.judge(&(c, b), sunday).is_none(), "no verdict, so no finding");

    // The same from features directly.
    let features = extract(dir.path(), until - 28 * DAY, until).unwrap();
    assert_eq!(ModelStore::encode(&train(&features, &cfg, until - 28 * DAY, until).unwrap(), 1), ModelStore::encode(&one.model, 1));
}

#[test]
fn meshguard_train_trains_from_an_archive_directory_and_versions_its_models() {
    let dir = tempfile::tempdir().unwrap();
    archive(&dir.path().join("archive"), &weekday_mornings(), 50);
    let models = dir.path().join("models");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_meshguard"))
            .args(["train", "--archive"])
            .arg(dir.path().join("archive"))
            .arg("--models")
            .arg(&models)
            .args(["--until", "2026-11-23T00:00:00Z"])
            .env("MESHGUARD_TIMING__KEEP_MODELS", "2")
            .output()
            .unwrap()
    };
    for version in 1..=3 {
        let out = run();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.starts_with(&format!("timing model v{version} saved to {}", models.join(format!("timing-v{version}.bin")).display())),
            "{stdout}"
        );
        assert!(stdout.contains(": 2 keys with a schedule (1 pairs, 1 requesters) of 2 seen, 2 clusters, 64 attempts from "), "{stdout}");
        assert!(stdout.contains("2026-10-26T00:00:00.000Z to 2026-11-23T00:00:00.000Z"), "{stdout}");
    }
    let store = ModelStore::open(&models).unwrap();
    assert_eq!(store.versions().unwrap(), vec![2, 3], "MESHGUARD_TIMING__KEEP_MODELS=2");
    let manifest: ModelManifest = serde_json::from_slice(&std::fs::read(models.join("timing-v3.json")).unwrap()).unwrap();
    assert_eq!((manifest.version, manifest.keys, manifest.clusters, manifest.attempts), (3, 2, 2, 64));
    assert_eq!(store.load_newest().unwrap().unwrap().version, 3);

    // A corrupt newest model: training still works (it writes the next version), loading names it.
    std::fs::write(models.join("timing-v3.bin"), b"MGTIMING garbage").unwrap();
    let err = store.load_newest().unwrap_err().to_string();
    assert!(err.contains("timing-v3.bin refused:"), "{err}");
    let out = run();
    assert!(out.status.success());
    assert_eq!(store.load_newest().unwrap().unwrap().version, 4);

    let out = Command::new(env!("CARGO_BIN_EXE_meshguard")).args(["train", "--until", "yesterday"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected an RFC 3339 time"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The background trainer inside `meshguard run`: with no model yet it trains at once from the
/// archive, the worker swaps the model in between micro-batches (`meshguard_timing_model_version`
/// says which), and an off-hours attempt of the trained pair is then judged by it, through the
/// real broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_trainer_swaps_a_model_in_and_the_worker_scores_with_it() {
    use meshguard_testkit::{Broker, ProduceRecord, consume_all, create_topics, produce};
    let broker = Broker::start().unwrap();
    let topics: Vec<(&str, i32, bool)> = [
        "meshguard.messages.v1",
        "meshguard.presence.v1",
        "meshguard.interactions.v1",
        "meshguard.identity-requests.v1",
        "meshguard.findings.v1",
        "meshguard.notifications.v1",
        "meshguard.identity-results.v1",
        "meshguard.deadletter.v1",
    ]
    .into_iter()
    .map(|t| (t, 1, false))
    .chain([("meshguard.registry.v1", 1, true), ("meshguard.enforcement.v1", 1, true)])
    .collect();
    create_topics(&broker.bootstrap(), &topics).await.unwrap();
    let registry: Vec<ProduceRecord> = [A, B]
        .iter()
        .map(|u| (Some(u.as_bytes().to_vec()), Some(format!(r#"{{"uuid":"{u}","kind":"device"}}"#).into_bytes()), Some(MONDAY)))
        .collect();
    produce(&broker.bootstrap(), "meshguard.registry.v1", &registry).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    archive(&dir.path().join("archive"), &weekday_mornings(), 50);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["run", "--brokers", &broker.bootstrap(), "--quiet"])
        .env("MESHGUARD_ARCHIVE__DIR", dir.path().join("archive"))
        .env("MESHGUARD_ARCHIVE__RETENTION_DAYS", "36500")
        .env("MESHGUARD_PIPELINE__CHECKPOINT_DIR", dir.path().join("checkpoints"))
        .env("MESHGUARD_TIMING__HORIZON_DAYS", "90")
        .env("MESHGUARD_TIMING__TRAIN_EVERY_S", "3600")
        .env("MESHGUARD_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("MESHGUARD_SQL__PG_LISTEN", "")
        .env("MESHGUARD_ENFORCER__ENABLED", "false")
        .env("MESHGUARD_LOG", "info")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // The swap, as the worker reports it.
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let version = match client.get(format!("http://127.0.0.1:{port}/metrics")).send().await {
            Ok(resp) => resp
                .text()
                .await
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("meshguard_timing_model_version ").and_then(|v| v.trim().parse::<i64>().ok())),
            Err(_) => None,
        };
        if version == Some(1) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker never swapped model v1 in (meshguard_timing_model_version = {version:?})");
        }
        // The pause between two probes of the endpoint, not a stand-in for the event.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(dir.path().join("models").join("timing-v1.bin").exists(), "saved beside the archive as version 1");

    // Sunday 2026-11-22 03:12 UTC: the pair is only ever active on weekday mornings.
    let sunday = MONDAY + 27 * DAY + 3 * HOUR + 12 * 60_000;
    let off_hours = attempt(50_000, sunday, A, Some(B));
    produce(&broker.bootstrap(), "meshguard.messages.v1", &[(Some(A.as_bytes().to_vec()), Some(off_hours.into_bytes()), Some(sunday))])
        .await
        .unwrap();
    let findings = consume_all(&broker.bootstrap(), "meshguard.findings.v1", 1, std::time::Duration::from_secs(60));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    let findings = findings.unwrap();
    let finding: serde_json::Value = serde_json::from_slice(findings[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!((finding["kind"].as_str(), finding["offender"].as_str()), (Some("timing_anomaly"), Some(A)), "{finding}");
    assert_eq!(finding["detail"]["trained_model"]["version"], 1, "judged by the swapped-in model: {finding}");
    assert!(status.success(), "meshguard exited with {status}");
}
