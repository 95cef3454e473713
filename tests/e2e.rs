//! End to end: the real `meshguard` binary against a real Kafka-protocol broker (tansu) on
//! loopback. Contract traffic goes in, findings and dead letters come out, exactly once, across a
//! crash. These tests need the broker installed (`bash scripts/install-broker.sh`); without it they
//! fail with that instruction, they never skip.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshguard_ingest::Topics;
use meshguard_ingest::simulator::{Label, SimConfig, SimRecord, Simulator};
use meshguard_schemas::InputTopic;
use meshguard_testkit::{Broker, KillOnDrop, ProduceRecord, consume_all, create_topics, produce};
use serde_json::Value;

const PARTITIONS: i32 = 3;
const FINDINGS: &str = "meshguard.findings.v1";
const DEADLETTER: &str = "meshguard.deadletter.v1";

async fn setup(broker: &Broker) {
    let topics: Vec<(&str, i32, bool)> = vec![
        ("meshguard.messages.v1", PARTITIONS, false),
        ("meshguard.presence.v1", PARTITIONS, false),
        ("meshguard.interactions.v1", PARTITIONS, false),
        ("meshguard.identity-requests.v1", PARTITIONS, false),
        ("meshguard.registry.v1", PARTITIONS, true),
        (FINDINGS, PARTITIONS, false),
        ("meshguard.enforcement.v1", PARTITIONS, true),
        ("meshguard.notifications.v1", PARTITIONS, false),
        ("meshguard.identity-results.v1", PARTITIONS, false),
        (DEADLETTER, PARTITIONS, false),
    ];
    create_topics(&broker.bootstrap(), &topics).await.unwrap();
}

/// Publishes `records` the way a platform does: directory and presence changes reach Kafka before
/// the attempts that follow them (meshguard judges an attempt against the directory as it has
/// arrived; see "Known limits" in the README).
async fn publish(broker: &Broker, records: &[SimRecord]) {
    let names = Topics::default();
    let mut by_topic: HashMap<InputTopic, Vec<ProduceRecord>> = HashMap::new();
    for r in records {
        by_topic.entry(r.topic).or_default().push((Some(r.key.clone()), r.payload.clone(), Some(r.timestamp_ms)));
    }
    for topic in [InputTopic::Registry, InputTopic::Presence, InputTopic::Interactions, InputTopic::IdentityRequests, InputTopic::Messages]
    {
        if let Some(recs) = by_topic.get(&topic) {
            produce(&broker.bootstrap(), names.input(topic), recs).await.unwrap();
        }
    }
}

fn simulator(seed: u64) -> Simulator {
    Simulator::new(SimConfig { seed, devices: 300, start_ms: 1_795_539_600_000, rate: 2_000, violation_ratio: 0.05, malformed_ratio: 0.01 })
}

/// The findings a correct pipeline gives for `records`: `(event id, kind)` per labelled attempt.
fn expected(records: &[SimRecord]) -> (BTreeSet<(String, String)>, usize) {
    let mut findings = BTreeSet::new();
    let mut malformed = 0;
    for r in records {
        let kind = match r.label {
            Some(Label::UnregisteredRequester) => "unregistered_requester",
            Some(Label::BadCredentials) => "bad_credentials",
            Some(Label::PermissionDenied) => "permission_denied",
            Some(Label::ThrottleExceeded) => "throttle_exceeded",
            Some(Label::Malformed) => {
                malformed += 1;
                continue;
            }
            _ => continue,
        };
        let v: Value = serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap();
        findings.insert((v["id"].as_str().unwrap().to_lowercase(), kind.to_owned()));
    }
    (findings, malformed)
}

/// Starts worker number `worker` of `group`, with its checkpoints in `state`.
fn spawn_meshguard(broker: &Broker, state: &Path, group: &str, worker: u32, checkpoint_ms: u64) -> Child {
    spawn_meshguard_with(broker, state, group, worker, checkpoint_ms, &[])
}

/// [`spawn_meshguard`] with extra environment (configuration) variables.
fn spawn_meshguard_with(broker: &Broker, state: &Path, group: &str, worker: u32, checkpoint_ms: u64, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .envs(env.iter().copied())
        .args(["run", "--brokers", &broker.bootstrap(), "--quiet"])
        // Static membership: the restarted worker takes its partitions back at once (tansu 0.6
        // never expires a killed member, so without it the partitions would stay with the dead one).
        .env("MESHGUARD_KAFKA__INSTANCE_ID", format!("{group}-worker-{worker}"))
        .env("MESHGUARD_PIPELINE__CHECKPOINT_DIR", state)
        .env("MESHGUARD_ARCHIVE__DIR", state.join("archive"))
        // The simulated traffic is dated 2026-11-24: keep it whatever today is.
        .env("MESHGUARD_ARCHIVE__RETENTION_DAYS", "36500")
        .env("MESHGUARD_PIPELINE__CHECKPOINT_INTERVAL_MS", checkpoint_ms.to_string())
        .env("MESHGUARD_KAFKA__GROUP_ID", group)
        .env("MESHGUARD_KAFKA__PARTITIONS", PARTITIONS.to_string())
        .env("MESHGUARD_HTTP__LISTEN", "")
        .env("MESHGUARD_SQL__PG_LISTEN", "")
        .env("MESHGUARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Rows of the closed (`*.parquet`) files under `dir`, read back with the Arrow reader, and the
/// temporary files left; `(folder name, batch)` per file.
fn read_archive(dir: &Path) -> (Vec<(String, arrow::record_batch::RecordBatch)>, usize) {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut batches = Vec::new();
    let mut temporary = 0;
    let Ok(folders) = std::fs::read_dir(dir.join("attempts")) else { return (batches, temporary) };
    for folder in folders {
        let folder = folder.unwrap().path();
        let folder_name = folder.file_name().unwrap().to_str().unwrap().to_owned();
        for file in std::fs::read_dir(&folder).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap();
            if name.ends_with(".tmp") {
                temporary += 1;
                continue;
            }
            assert!(name.starts_with("part-") && name.ends_with(".parquet"), "unexpected file {}", path.display());
            let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap().build().unwrap();
            for batch in reader {
                batches.push((folder_name.clone(), batch.unwrap()));
            }
        }
    }
    (batches, temporary)
}

/// The ids of the well-formed attempts among `records`: what the archive must hold.
fn attempt_ids(records: &[SimRecord]) -> BTreeSet<uuid::Uuid> {
    records
        .iter()
        .filter(|r| r.topic == InputTopic::Messages && r.label != Some(Label::Malformed))
        .map(|r| {
            let v: Value = serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap();
            v["id"].as_str().unwrap().parse().unwrap()
        })
        .collect()
}

/// Waits until the closed archive files under `dir` hold `rows` rows (checkpoints close them).
fn wait_for_archive(dir: &Path, rows: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let got: usize = read_archive(dir).0.iter().map(|(_, b)| b.num_rows()).sum();
        if got >= rows {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the archive holds {got} of {rows} attempts after 90 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// After the workers stopped: the archive under `dir` holds exactly the attempts `want`, each
/// once, in the folder of its event date, in the canonical schema, and no temporary file.
fn assert_archive_holds_exactly(dir: &Path, want: &BTreeSet<uuid::Uuid>) {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::TimestampMillisecondType;

    let (batches, temporary) = read_archive(dir);
    assert_eq!(temporary, 0, "the last checkpoint closes every file");
    let mut got = BTreeSet::new();
    let mut rows = 0;
    for (folder, batch) in &batches {
        assert_eq!(batch.schema(), InputTopic::Messages.schema());
        rows += batch.num_rows();
        let ids = batch.column_by_name("id").unwrap().as_fixed_size_binary();
        for id in ids.iter() {
            let id = uuid::Uuid::from_slice(id.unwrap()).unwrap();
            assert!(got.insert(id), "attempt {id} archived twice");
        }
        let ts = batch.column_by_name("ts").unwrap().as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.null_count(), 0);
        for ms in ts.iter() {
            let date = chrono::DateTime::from_timestamp_millis(ms.unwrap()).unwrap().format("date=%Y-%m-%d").to_string();
            assert_eq!(&date, folder, "a row in the folder of its event date");
        }
    }
    assert_eq!(rows, want.len(), "each well-formed attempt once");
    assert!(&got == want, "the archived ids are the published ones");
}

fn terminate(mut child: Child) {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "meshguard exited with {status} after SIGTERM");
}

/// Every finding as `(event_id, kind)`, asserting the contract's shape on each and that no id repeats.
fn check_findings(records: &[meshguard_testkit::Record]) -> BTreeSet<(String, String)> {
    let mut ids = BTreeSet::new();
    let mut out = BTreeSet::new();
    for r in records {
        let v: Value = serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap();
        for field in ["id", "ts", "event_ts", "event_id", "kind", "offender", "target", "action", "rule", "detail", "score", "severity"] {
            assert!(v.get(field).is_some(), "finding lacks `{field}`: {v}");
        }
        let id = v["id"].as_str().unwrap().to_owned();
        assert!(ids.insert(id.clone()), "finding {id} published twice");
        assert_eq!(id, id.to_lowercase());
        let ts = v["event_ts"].as_str().unwrap();
        assert!(ts.ends_with('Z') && ts.len() == "2026-11-24T17:00:00.123Z".len(), "time format: {ts}");
        assert_eq!(r.key.as_deref(), Some(v["offender"].as_str().unwrap().as_bytes()), "keyed by offender");
        out.insert((v["event_id"].as_str().unwrap().to_owned(), v["kind"].as_str().unwrap().to_owned()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn findings_and_dead_letters_through_a_real_broker() {
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let mut sim = simulator(7);
    let mut records = sim.bootstrap();
    sim.next_batch(6_000, &mut records);
    let (want, malformed) = expected(&records);
    assert!(want.len() > 100 && malformed > 10, "the traffic must exercise findings and dead letters");
    for kind in ["unregistered_requester", "bad_credentials", "permission_denied", "throttle_exceeded"] {
        assert!(want.iter().any(|(_, k)| k == kind), "the traffic must exercise {kind}");
    }
    publish(&broker, &records).await;

    let state = tempfile::tempdir().unwrap();
    let child = spawn_meshguard(&broker, state.path(), "e2e-basic", 1, 1_000);
    let found = consume_all(&broker.bootstrap(), FINDINGS, want.len(), Duration::from_secs(90)).unwrap();
    let dead = consume_all(&broker.bootstrap(), DEADLETTER, malformed, Duration::from_secs(30)).unwrap();
    terminate(child);

    let got = check_findings(&found);
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&want).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, unexpected {extra:?}");
    assert_eq!(dead.len(), malformed);
    for d in &dead {
        let v: Value = serde_json::from_slice(d.payload.as_ref().unwrap()).unwrap();
        assert_eq!(v["topic"], "meshguard.messages.v1");
        assert!(!v["reason"].as_str().unwrap().is_empty() && v["offset"].is_i64(), "{v}");
    }
    // Nothing more arrives after the expected set (no late duplicates).
    let all = meshguard_testkit::consume_available(&broker.bootstrap(), FINDINGS, Duration::from_secs(10)).unwrap();
    assert_eq!(all.len(), want.len());
}

/// A broker holding the first half of simulated traffic, the second half in hand, and the findings
/// a correct pipeline gives for each.
struct TwoHalves {
    broker: Broker,
    second: Vec<SimRecord>,
    want_first: BTreeSet<(String, String)>,
    want: BTreeSet<(String, String)>,
    /// The well-formed attempts of both halves.
    attempts: BTreeSet<uuid::Uuid>,
}

async fn two_halves(seed: u64) -> TwoHalves {
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let mut sim = simulator(seed);
    let mut first = sim.bootstrap();
    sim.next_batch(4_000, &mut first);
    let mut second = Vec::new();
    sim.next_batch(4_000, &mut second);
    let (want_first, _) = expected(&first);
    let (want_second, _) = expected(&second);
    publish(&broker, &first).await;
    let want = want_first.union(&want_second).cloned().collect();
    let attempts = attempt_ids(&first).union(&attempt_ids(&second)).copied().collect();
    TwoHalves { broker, second, want_first, want, attempts }
}

/// Waits until `want.len()` findings are on the topic (what they are is checked once the workers stop).
fn wait_for_findings(broker: &Broker, want: &BTreeSet<(String, String)>) {
    consume_all(&broker.bootstrap(), FINDINGS, want.len(), Duration::from_secs(90)).unwrap();
}

/// After the workers stopped: the findings topic holds exactly `want`, each once, nothing else.
fn assert_topic_holds_exactly(broker: &Broker, want: &BTreeSet<(String, String)>) {
    let all = meshguard_testkit::consume_available(&broker.bootstrap(), FINDINGS, Duration::from_secs(10)).unwrap();
    let got = check_findings(&all);
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert_eq!(all.len(), want.len(), "each finding once, nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_stream_loses_and_repeats_nothing() {
    let t = two_halves(11).await;
    let state = tempfile::tempdir().unwrap();
    // A checkpoint interval far longer than the run: everything it emits comes after its last
    // (initial) checkpoint, the hardest case for a restart.
    let mut child = spawn_meshguard(&t.broker, state.path(), "e2e-crash", 1, 3_600_000);
    let partial = consume_all(&t.broker.bootstrap(), FINDINGS, t.want_first.len() / 2, Duration::from_secs(90)).unwrap();
    assert!(partial.len() >= t.want_first.len() / 2, "the first run produced findings before the crash");
    child.kill().unwrap(); // SIGKILL: no final checkpoint, no flush.
    child.wait().unwrap();

    publish(&t.broker, &t.second).await;
    let child = spawn_meshguard(&t.broker, state.path(), "e2e-crash", 1, 1_000);
    wait_for_findings(&t.broker, &t.want);
    wait_for_archive(&state.path().join("archive"), t.attempts.len());
    terminate(child);
    assert_topic_holds_exactly(&t.broker, &t.want);
    // The first run's archive files were never closed (no checkpoint after the initial one): the
    // restart removed them and archived the replay, so each attempt is there once.
    assert_archive_holds_exactly(&state.path().join("archive"), &t.attempts);
}

/// Every well-formed attempt published lands in the Parquet archive exactly once, in the folder of
/// its event date, in the canonical schema; the last checkpoint (on SIGTERM) leaves no open file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_holds_every_well_formed_attempt_once() {
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let mut sim = simulator(31);
    let mut records = sim.bootstrap();
    sim.next_batch(6_000, &mut records);
    let want = attempt_ids(&records);
    assert!(want.len() > 5_000, "the traffic is mostly attempts");
    publish(&broker, &records).await;

    let state = tempfile::tempdir().unwrap();
    let child = spawn_meshguard(&broker, state.path(), "e2e-archive", 1, 500);
    wait_for_archive(&state.path().join("archive"), want.len());
    terminate(child);
    assert_archive_holds_exactly(&state.path().join("archive"), &want);
}

#[test]
fn run_with_no_setup_shows_findings() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["run", "--duration", "8", "--rate", "3000"])
        .env("MESHGUARD_HTTP__LISTEN", "")
        .env("MESHGUARD_SQL__PG_LISTEN", "")
        .env("MESHGUARD_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {}: {stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("events/s"), "live summary: {stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.contains("unregistered_requester") && last.contains("bad_credentials"), "final summary: {last}");
    // Nothing goes wrong on the way, nor at the end: every client is gone before the embedded
    // broker is (they used to log `AllBrokersDown` after the final summary).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("ERROR"), "a clean run logs no error: {stderr}");
}

#[test]
fn a_bad_configuration_is_refused_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[pipeline]\ncheckpoint_interval_ms = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshguard")).args(["run", "--config", file.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pipeline.checkpoint_interval_ms") && stderr.contains("at least 100"), "{stderr}");
    let out =
        Command::new(env!("CARGO_BIN_EXE_meshguard")).args(["run"]).env("MESHGUARD_PIPELINE__BATCH_MAX_RECORDS", "lots").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(stderr.contains("pipeline.batch_max_records") && stderr.contains("lots"), "{stderr}");
}

/// Two workers in one group, sharing the checkpoint directory (one machine): the second joins
/// mid-stream, the group rebalances, partitions and their state move, and every finding is still
/// published exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_one_group_publish_each_finding_once() {
    let t = two_halves(23).await;
    let state = tempfile::tempdir().unwrap();
    let a = spawn_meshguard(&t.broker, state.path(), "e2e-two", 1, 500);
    wait_for_findings(&t.broker, &t.want_first);
    let b = spawn_meshguard(&t.broker, state.path(), "e2e-two", 2, 500);
    publish(&t.broker, &t.second).await;
    wait_for_findings(&t.broker, &t.want);
    terminate(a);
    terminate(b);
    assert_topic_holds_exactly(&t.broker, &t.want);
}

/// `meshguard bench` against the real broker: every published record is read in the throughput
/// phase, and the latency phase's reader sees findings of its own traffic.
#[test]
fn the_bench_harness_measures_throughput_and_latency() {
    let broker = Broker::start().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["bench", "--brokers", &broker.bootstrap(), "--events", "5000", "--latency-rate", "2000", "--latency-seconds", "3"])
        .env("MESHGUARD_HTTP__LISTEN", "")
        .env("MESHGUARD_SQL__PG_LISTEN", "")
        .env("MESHGUARD_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {}: {stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let tp = &report["throughput"];
    assert_eq!(tp["records_read"], report["events_published"], "{report}");
    assert!(report["events_published"].as_u64().unwrap() > 5000, "the directory's bootstrap and 5,000 events: {report}");
    assert!(tp["findings"].as_u64().unwrap() > 0 && tp["events_per_cpu_second"].as_f64().unwrap() > 0.0, "{report}");
    // The steady part: the records after the first tenth (none, when one micro-batch took them
    // all), within the whole phase.
    let steady = &tp["steady"];
    let (steady_read, read) = (steady["records_read"].as_u64().unwrap(), tp["records_read"].as_u64().unwrap());
    assert!(steady_read <= read - read / 10, "{report}");
    assert!(steady["wall_seconds"].as_f64().unwrap() <= tp["wall_seconds"].as_f64().unwrap(), "{report}");
    let lat = &report["latency"];
    assert!(lat["findings"].as_u64().unwrap() > 0, "{report}");
    let (p50, p99, max) = (lat["p50_ms"].as_i64().unwrap(), lat["p99_ms"].as_i64().unwrap(), lat["max_ms"].as_i64().unwrap());
    assert!(0 <= p50 && p50 <= p99 && p99 <= max && max < 60_000, "{report}");
    // Split at the finding's Kafka timestamp: both parts of every finding are within its whole.
    for part in ["to_produced", "findings_hop"] {
        let (p50, p99, part_max) =
            (lat[part]["p50_ms"].as_i64().unwrap(), lat[part]["p99_ms"].as_i64().unwrap(), lat[part]["max_ms"].as_i64().unwrap());
        assert!(0 <= p50 && p50 <= p99 && p99 <= part_max && part_max <= max, "{part}: {report}");
    }
}

#[test]
fn an_unreachable_broker_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["run", "--brokers", "127.0.0.1:1"])
        .env("MESHGUARD_HTTP__LISTEN", "")
        .env("MESHGUARD_SQL__PG_LISTEN", "")
        .env("MESHGUARD_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach Kafka at 127.0.0.1:1 (kafka.brokers / --brokers)"), "{stderr}");
}

/// A registry change published while meshguard runs applies to every attempt at or after its
/// Kafka timestamp, with no restart: a new profile that denies the requester, and a tombstone of
/// another requester. An attempt from before the change that arrives after it is judged by the
/// old record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_change_takes_effect_mid_stream() {
    const T0: i64 = 1_795_539_600_000;
    let (r, r2, t, stranger) = (
        "a1000000-0000-4000-8000-000000000001",
        "a1000000-0000-4000-8000-000000000002",
        "b1000000-0000-4000-8000-000000000001",
        "eeeeeeee-0000-4000-8000-0000000000e1",
    );
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let names = Topics::default();
    let record = |key: &str, value: Option<Value>, ts: i64| -> ProduceRecord {
        (Some(key.as_bytes().to_vec()), value.map(|v| v.to_string().into_bytes()), Some(ts))
    };
    let device = |uuid: &str| serde_json::json!({"uuid": uuid, "kind": "device"});
    let mut n = 0u32;
    let mut attempt = |from: &str, ts: i64| -> ProduceRecord {
        n += 1;
        let id = format!("00000000-0000-4000-8000-{n:012}");
        record(from, Some(serde_json::json!({"id": id, "ts": ts, "action": "send", "from": from, "to": t, "auth": "valid"})), ts)
    };
    let registry = names.input(InputTopic::Registry);
    let messages = names.input(InputTopic::Messages);
    produce(
        &broker.bootstrap(),
        registry,
        &[
            record(r, Some(device(r)), T0 - 3_600_000),
            record(r2, Some(device(r2)), T0 - 3_600_000),
            record(t, Some(device(t)), T0 - 3_600_000),
        ],
    )
    .await
    .unwrap();

    let state = tempfile::tempdir().unwrap();
    let child = spawn_meshguard(&broker, state.path(), "e2e-registry", 1, 1_000);

    // Before the change: allowed. The stranger's attempt is a sentinel: once its finding is out,
    // the first batch has been judged.
    let mut before: Vec<ProduceRecord> = (0..20).map(|i| attempt(r, T0 + i * 1_000)).collect();
    before.push(attempt(stranger, T0 + 20_000));
    produce(&broker.bootstrap(), messages, &before).await.unwrap();
    let first = consume_all(&broker.bootstrap(), FINDINGS, 1, Duration::from_secs(90)).unwrap();
    assert_eq!(check_findings(&first).into_iter().map(|(_, k)| k).collect::<Vec<_>>(), vec!["unregistered_requester"]);

    // The change, effective at T0 + 60 s: t gets a profile denying r's sends; r2 is unregistered.
    let lockdown = serde_json::json!({"uuid": t, "kind": "device",
        "profiles": [{"name": "lockdown", "applies_to": [r], "permissions": {"send": {"deny": [r]}}}]});
    produce(&broker.bootstrap(), registry, &[record(t, Some(lockdown), T0 + 60_000), record(r2, None, T0 + 60_000)]).await.unwrap();

    // Attempts after it, and one from before it that arrives late.
    // Four of each: a fifth unauthorized attempt within ten minutes would block the requester.
    let mut after: Vec<ProduceRecord> = (0..4).map(|i| attempt(r, T0 + 60_000 + i * 1_000)).collect();
    after.extend((0..4).map(|i| attempt(r2, T0 + 60_000 + i)));
    let late_but_before = attempt(r, T0 + 59_999);
    let late_id = serde_json::from_slice::<Value>(late_but_before.1.as_ref().unwrap()).unwrap()["id"].as_str().unwrap().to_owned();
    let mut second = after.clone();
    second.push(late_but_before);
    produce(&broker.bootstrap(), messages, &second).await.unwrap();

    let want = 1 + after.len();
    let found = consume_all(&broker.bootstrap(), FINDINGS, want, Duration::from_secs(90)).unwrap();
    terminate(child);
    let all = meshguard_testkit::consume_available(&broker.bootstrap(), FINDINGS, Duration::from_secs(5)).unwrap();
    assert_eq!(all.len(), found.len(), "nothing beyond the expected findings");
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for r in &all {
        let v: Value = serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap();
        assert_ne!(v["event_id"].as_str(), Some(late_id.as_str()), "an attempt before the change is judged by the old record");
        *kinds.entry(format!("{}/{}", v["kind"].as_str().unwrap(), v["rule"].as_str().unwrap())).or_default() += 1;
    }
    let expected: HashMap<String, usize> = [
        ("unregistered_requester/registry:unregistered".to_owned(), 1 + 4),
        ("permission_denied/profile:lockdown/permissions:send/deny".to_owned(), 4),
    ]
    .into();
    assert_eq!(kinds, expected);
}

/// Enforcement through the real broker: a requester's fifth unauthorized attempt within ten
/// minutes blocks it, the block is published on the compacted enforcement topic keyed by the UUID,
/// and its next attempt gives only `blocked_requester`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_unauthorized_attempts_block_the_requester_on_the_enforcement_topic() {
    const T0: i64 = 1_795_539_600_000;
    let (r, t) = ("a2000000-0000-4000-8000-000000000001", "b2000000-0000-4000-8000-000000000001");
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let names = Topics::default();
    let registry: Vec<ProduceRecord> = [r, t]
        .iter()
        .map(|u| {
            (
                Some(u.as_bytes().to_vec()),
                Some(serde_json::json!({"uuid": u, "kind": "device"}).to_string().into_bytes()),
                Some(T0 - 60_000),
            )
        })
        .collect();
    produce(&broker.bootstrap(), names.input(InputTopic::Registry), &registry).await.unwrap();
    let attempts: Vec<ProduceRecord> = (0..6i64)
        .map(|i| {
            let v = serde_json::json!({"id": format!("00000000-0000-4000-8000-0000000001{i:02}"), "ts": T0 + i * 30_000,
                "action": "send", "from": r, "to": t, "auth": "invalid"});
            (Some(r.as_bytes().to_vec()), Some(v.to_string().into_bytes()), Some(T0 + i * 30_000))
        })
        .collect();
    produce(&broker.bootstrap(), names.input(InputTopic::Messages), &attempts).await.unwrap();

    let state = tempfile::tempdir().unwrap();
    let child = spawn_meshguard(&broker, state.path(), "e2e-enforce", 1, 1_000);
    let found = consume_all(&broker.bootstrap(), FINDINGS, 6, Duration::from_secs(90)).unwrap();
    let changes = consume_all(&broker.bootstrap(), "meshguard.enforcement.v1", 1, Duration::from_secs(30)).unwrap();
    terminate(child);

    let mut kinds: Vec<(String, String)> = check_findings(&found).into_iter().collect();
    kinds.sort();
    let blocked: Vec<_> = kinds.iter().filter(|(_, k)| k == "blocked_requester").collect();
    assert_eq!(blocked, vec![&("00000000-0000-4000-8000-000000000105".to_owned(), "blocked_requester".to_owned())]);
    assert_eq!(kinds.iter().filter(|(_, k)| k == "bad_credentials").count(), 5);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].key.as_deref(), Some(r.as_bytes()), "keyed by the UUID");
    let v: Value = serde_json::from_slice(changes[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!((v["uuid"].as_str(), v["state"].as_str()), (Some(r), Some("blocked")));
    assert_eq!((v["since"].as_str(), v["until"].as_str()), (Some("2026-11-24T17:02:00.000Z"), Some("2026-11-24T18:02:00.000Z")));
    assert_eq!((v["attempts"].as_u64(), v["findings"].as_array().map(Vec::len)), (Some(5), Some(5)));
    assert_eq!(v["reason"], "5 unauthorized attempts in 10 minutes");
}

/// Identity confirmation through the real broker, answered by two workers in one group: a genuine
/// device is confirmed by its peers' own tables, an impostor whose claimed interactions no peer
/// confirms is denied (with a `cross_check_failed` finding), and a device whose peers never
/// reported anything gets `insufficient_evidence`. Ordering across topics: the requests are read
/// (and held, checkpointed) before a fourth device's interactions are even published; its answer
/// counts them, because requests wait for the interactions topic to reach their time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_requests_are_answered_the_same_by_two_workers() {
    const T0: i64 = 1_795_539_600_000;
    let uuid = |prefix: u32, n: u32| format!("{prefix:08x}-0000-4000-8000-{n:012x}");
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let names = Topics::default();
    let mut interactions: Vec<ProduceRecord> = Vec::new();
    let mut later: Vec<ProduceRecord> = Vec::new();
    let mut n = 0u32;
    let mut entry = |out: &mut Vec<ProduceRecord>, reporter: &str, peer: &str, kind: &str, ts: i64| {
        n += 1;
        let v = serde_json::json!({"id": uuid(0x1d, n), "reporter": reporter, "peer": peer, "kind": kind, "ts": ts});
        out.push((Some(reporter.as_bytes().to_vec()), Some(v.to_string().into_bytes()), Some(ts)));
    };
    let (genuine, impostor, lonely, tardy) = (uuid(0xd1, 1), uuid(0xd1, 2), uuid(0xd1, 3), uuid(0xd1, 4));
    for i in 0..6u32 {
        let ts = T0 + i64::from(i) * 600_000;
        // The genuine device's peers report it back, 30 s apart.
        let p = uuid(0xe1, i);
        entry(&mut interactions, &genuine, &p, "proximity", ts);
        entry(&mut interactions, &p, &genuine, "proximity", ts + 30_000);
        // The impostor's peers are active but never met it.
        let q = uuid(0xe2, i);
        entry(&mut interactions, &impostor, &q, "call", ts);
        entry(&mut interactions, &q, &uuid(0xe9, i), "call", ts + 10_000);
        // The lonely device's peers never reported anything.
        entry(&mut interactions, &lonely, &uuid(0xe3, i), "sms", ts);
        // The tardy device's interactions, all confirmed, reach Kafka after the requests.
        let r = uuid(0xe4, i);
        entry(&mut later, &tardy, &r, "call", ts);
        entry(&mut later, &r, &tardy, "call", ts - 20_000);
    }
    produce(&broker.bootstrap(), names.input(InputTopic::Interactions), &interactions).await.unwrap();
    let t = T0 + 7_200_000;
    let devices = [&genuine, &impostor, &lonely, &tardy];
    let requests: Vec<ProduceRecord> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let v = serde_json::json!({"id": uuid(0x1e, i as u32), "ts": t, "device": d});
            (Some(d.as_bytes().to_vec()), Some(v.to_string().into_bytes()), Some(t))
        })
        .collect();
    // Entries past the requests' time from many reporters, so every partition of the
    // interactions topic reaches it: what releases the held requests.
    for i in 0..24u32 {
        entry(&mut later, &uuid(0xe5, i), &uuid(0xe6, i), "email", t + 1_000);
    }

    let state = tempfile::tempdir().unwrap();
    // A long wait, so only the interactions can release the requests within the test.
    let env = [("MESHGUARD_CROSS_CHECK__MAX_WAIT_MS", "120000")];
    let a = spawn_meshguard_with(&broker, state.path(), "e2e-identity", 1, 500, &env);
    let b = spawn_meshguard_with(&broker, state.path(), "e2e-identity", 2, 500, &env);
    produce(&broker.bootstrap(), names.input(InputTopic::IdentityRequests), &requests).await.unwrap();
    // Every request read and held: the workers' checkpoints of the identity-requests partitions say so.
    let store = meshguard_analytics::LocalCheckpointStore::open(state.path()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        use meshguard_analytics::CheckpointStore as _;
        let held: usize = (0..PARTITIONS)
            .filter_map(|p| store.load_partition(&(InputTopic::IdentityRequests, p)).ok().flatten())
            .map(|s| s.held_requests.len())
            .sum();
        if held == devices.len() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the requests were not held within 90 s ({held} held)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    produce(&broker.bootstrap(), names.input(InputTopic::Interactions), &later).await.unwrap();
    let results = consume_all(&broker.bootstrap(), "meshguard.identity-results.v1", 4, Duration::from_secs(90)).unwrap();
    let findings = consume_all(&broker.bootstrap(), FINDINGS, 1, Duration::from_secs(30)).unwrap();
    terminate(a);
    terminate(b);

    let mut outcomes = HashMap::new();
    for r in &results {
        let v: Value = serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap();
        assert_eq!(r.key.as_deref(), Some(v["device"].as_str().unwrap().as_bytes()), "keyed by device");
        outcomes.insert(
            v["device"].as_str().unwrap().to_owned(),
            (v["outcome"].as_str().unwrap().to_owned(), v["checked"].as_u64(), v["verified"].as_u64(), v["unavailable"].as_u64()),
        );
    }
    assert_eq!(outcomes[&genuine], ("confirmed".to_owned(), Some(6), Some(6), Some(0)));
    assert_eq!(outcomes[&impostor], ("denied".to_owned(), Some(6), Some(0), Some(0)));
    assert_eq!(outcomes[&lonely], ("insufficient_evidence".to_owned(), Some(6), Some(0), Some(6)));
    assert_eq!(outcomes[&tardy], ("confirmed".to_owned(), Some(6), Some(6), Some(0)), "interactions published after the request count");
    assert_eq!(findings.len(), 1);
    let f: Value = serde_json::from_slice(findings[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!((f["kind"].as_str(), f["offender"].as_str()), (Some("cross_check_failed"), Some(impostor.as_str())));
    let all = meshguard_testkit::consume_available(&broker.bootstrap(), "meshguard.identity-results.v1", Duration::from_secs(5)).unwrap();
    assert_eq!(all.len(), 4, "each request answered once");
}

/// Manual overrides: `meshguard block` and `meshguard unblock` publish on the control topic; the
/// running pipeline applies them in order, publishes the state, and judges attempts by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_block_and_unblock_from_the_command_line() {
    let (r, t) = ("a3000000-0000-4000-8000-000000000001", "b3000000-0000-4000-8000-000000000001");
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let names = Topics::default();
    let now = || chrono::Utc::now().timestamp_millis();
    let registry: Vec<ProduceRecord> = [r, t]
        .iter()
        .map(|u| {
            (
                Some(u.as_bytes().to_vec()),
                Some(serde_json::json!({"uuid": u, "kind": "device"}).to_string().into_bytes()),
                Some(now() - 60_000),
            )
        })
        .collect();
    produce(&broker.bootstrap(), names.input(InputTopic::Registry), &registry).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(Some(spawn_meshguard(&broker, state.path(), "e2e-manual", 1, 1_000)));
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_meshguard")).args(args).args(["--brokers", &broker.bootstrap()]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let attempt = |n: u32, auth: &str| -> ProduceRecord {
        let ts = now() + 1_000;
        let v = serde_json::json!({"id": format!("00000000-0000-4000-8000-0000000003{n:02}"), "ts": ts, "action": "send", "from": r, "to": t, "auth": auth});
        (Some(r.as_bytes().to_vec()), Some(v.to_string().into_bytes()), Some(ts))
    };

    let said = cli(&["block", r, "--for", "2h", "--reason", "stolen token"]);
    assert!(said.contains("block of") && said.contains("published"), "{said}");
    let changes = consume_all(&broker.bootstrap(), "meshguard.enforcement.v1", 1, Duration::from_secs(60)).unwrap();
    let v: Value = serde_json::from_slice(changes[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!((v["state"].as_str(), v["reason"].as_str()), (Some("blocked"), Some("manual: stolen token")));
    assert!(v["until"].is_string());
    produce(&broker.bootstrap(), names.input(InputTopic::Messages), &[attempt(1, "valid")]).await.unwrap();
    let found = consume_all(&broker.bootstrap(), FINDINGS, 1, Duration::from_secs(60)).unwrap();
    let f: Value = serde_json::from_slice(found[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!((f["kind"].as_str(), f["rule"].as_str()), (Some("blocked_requester"), Some("enforcement:blocked")));

    cli(&["unblock", r]);
    let changes = consume_all(&broker.bootstrap(), "meshguard.enforcement.v1", 2, Duration::from_secs(60)).unwrap();
    let v: Value = serde_json::from_slice(changes[1].payload.as_ref().unwrap()).unwrap();
    assert_eq!((v["state"].as_str(), v["reason"].as_str()), (Some("active"), Some("manual")));
    produce(&broker.bootstrap(), names.input(InputTopic::Messages), &[attempt(2, "invalid")]).await.unwrap();
    let found = consume_all(&broker.bootstrap(), FINDINGS, 2, Duration::from_secs(60)).unwrap();
    let f: Value = serde_json::from_slice(found[1].payload.as_ref().unwrap()).unwrap();
    assert_eq!(f["kind"], "bad_credentials", "active again: judged normally");
    terminate(child.0.take().unwrap());
}

/// The control API over HTTP: without the bearer token a request is refused; with it, a block is
/// published on the control topic and applied by the pipeline like `meshguard block`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_block_needs_the_token_and_is_applied() {
    let r = "a4000000-0000-4000-8000-000000000001";
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let state = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["run", "--brokers", &broker.bootstrap(), "--quiet"])
        .env("MESHGUARD_KAFKA__INSTANCE_ID", "e2e-http-worker-1")
        .env("MESHGUARD_KAFKA__GROUP_ID", "e2e-http")
        .env("MESHGUARD_PIPELINE__CHECKPOINT_DIR", state.path())
        .env("MESHGUARD_ARCHIVE__DIR", state.path().join("archive"))
        .env("MESHGUARD_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("MESHGUARD_HTTP__TOKEN", "s3cret-token")
        .env("MESHGUARD_SQL__PG_LISTEN", "")
        .env("MESHGUARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child));
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/api/block");
    let body = serde_json::json!({"uuid": r, "for_s": 3600, "reason": "over http"});
    // Wait for the listener (it starts before the pipeline is ready).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let refused = loop {
        match client.post(&url).json(&body).send().await {
            Ok(resp) => break resp,
            Err(_) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("the HTTP listener never came up: {e}"),
        }
    };
    assert_eq!(refused.status(), 401, "no token");
    let wrong = client.post(&url).bearer_auth("guess").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401, "wrong token");
    let ok = client.post(&url).bearer_auth("s3cret-token").json(&body).send().await.unwrap();
    assert_eq!(ok.status(), 202, "{:?}", ok.text().await);
    let changes = consume_all(&broker.bootstrap(), "meshguard.enforcement.v1", 1, Duration::from_secs(60)).unwrap();
    let v: Value = serde_json::from_slice(changes[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!((v["uuid"].as_str(), v["state"].as_str(), v["reason"].as_str()), (Some(r), Some("blocked"), Some("manual: over http")));
    terminate(child.0.take().unwrap());
}

/// Runs `psql` (the real client) against `port` with `password`; `(success, stdout, stderr)`.
fn psql(port: u16, password: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new(std::env::var("MESHGUARD_PSQL_BIN").unwrap_or_else(|_| "psql".into()))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "meshguard",
            "-d",
            "meshguard",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql runs (postgresql-client; scripts/test.sh installs it)");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The SQL surface of a running worker, through every door: `psql` over the PostgreSQL wire
/// protocol (password required, writes refused), `POST /api/sql` in JSON, CSV and Arrow,
/// `GET /api/attempts`; then `meshguard sql` over the archive once the worker stopped. Every count
/// is the exact number of findings and attempts published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_surface_answers_over_psql_http_and_the_cli() {
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let mut sim = simulator(41);
    let mut records = sim.bootstrap();
    sim.next_batch(3_000, &mut records);
    let (want, _) = expected(&records);
    let attempts = attempt_ids(&records);
    publish(&broker, &records).await;
    // Interactions, one of them delivered twice (the table shows each entry once).
    let reported: Vec<ProduceRecord> = (0..20u64)
        .map(|i| {
            let (reporter, peer) = ("a1000000-0000-4000-8000-000000000001", format!("b1000000-0000-4000-8000-{i:012}"));
            let entry = serde_json::json!({"id": format!("e1000000-0000-4000-8000-{i:012}"), "reporter": reporter, "peer": peer,
                "kind": "call", "ts": 1_795_539_600_000u64 + i * 1_000});
            (Some(reporter.as_bytes().to_vec()), Some(entry.to_string().into_bytes()), None)
        })
        .collect();
    let names = Topics::default();
    produce(&broker.bootstrap(), names.input(InputTopic::Interactions), &reported).await.unwrap();
    produce(&broker.bootstrap(), names.input(InputTopic::Interactions), &reported[..1]).await.unwrap();
    let interactions = reported.len();

    let http_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pg_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let state = tempfile::tempdir().unwrap();
    let archive = state.path().join("archive");
    let child = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["run", "--brokers", &broker.bootstrap(), "--quiet"])
        .env("MESHGUARD_KAFKA__INSTANCE_ID", "e2e-sql-worker-1")
        .env("MESHGUARD_KAFKA__GROUP_ID", "e2e-sql")
        .env("MESHGUARD_PIPELINE__CHECKPOINT_DIR", state.path())
        .env("MESHGUARD_PIPELINE__CHECKPOINT_INTERVAL_MS", "500")
        .env("MESHGUARD_ARCHIVE__DIR", &archive)
        .env("MESHGUARD_ARCHIVE__RETENTION_DAYS", "36500")
        .env("MESHGUARD_HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
        .env("MESHGUARD_SQL__PG_LISTEN", format!("127.0.0.1:{pg_port}"))
        .env("MESHGUARD_SQL__PG_PASSWORD", "pg-s3cret")
        .env("MESHGUARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child));
    wait_for_findings(&broker, &want);

    // Every finding on the topic is in the table: live rows and closed files together, each once.
    let client = reqwest::Client::new();
    let sql_url = format!("http://127.0.0.1:{http_port}/api/sql");
    let count = async |sql: &str| -> i64 {
        let resp = client.post(&sql_url).body(sql.to_owned()).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{sql}");
        let rows: Value = resp.json().await.unwrap();
        rows[0]["n"].as_i64().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = count("SELECT count(*) AS n FROM findings").await;
        if n == want.len() as i64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "SQL sees {n} findings of {}", want.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count("SELECT count(DISTINCT id) AS n FROM findings").await, want.len() as i64);
    // The interactions the worker read, archived (open files' live rows here), each entry once.
    assert_eq!(count("SELECT count(*) AS n FROM interactions").await, interactions as i64);
    let by_kind: BTreeSet<(String, i64)> = {
        let resp = client
            .post(&sql_url)
            .query(&[("format", "json")])
            .body("SELECT kind, count(*) AS n FROM findings GROUP BY kind")
            .send()
            .await
            .unwrap();
        let rows: Value = resp.json().await.unwrap();
        rows.as_array().unwrap().iter().map(|r| (r["kind"].as_str().unwrap().to_owned(), r["n"].as_i64().unwrap())).collect()
    };
    let mut want_by_kind: HashMap<String, i64> = HashMap::new();
    for (_, kind) in &want {
        *want_by_kind.entry(kind.clone()).or_default() += 1;
    }
    assert_eq!(by_kind, want_by_kind.into_iter().collect::<BTreeSet<_>>());

    // psql: the password is required, queries work, writes are refused.
    let (ok, _, err) = psql(pg_port, "wrong", "SELECT 1");
    assert!(!ok && err.to_lowercase().contains("password authentication failed"), "a wrong password is refused: {err}");
    let (ok, out, err) = psql(pg_port, "pg-s3cret", "SELECT count(*) FROM findings");
    assert!(ok, "{err}");
    assert_eq!(out, want.len().to_string());
    let (ok, out, err) = psql(pg_port, "pg-s3cret", "SELECT kind FROM findings WHERE kind = 'bad_credentials' LIMIT 1");
    assert!(ok && out == "bad_credentials", "{out} {err}");
    for write in ["CREATE TABLE t (x INT)", "DROP VIEW attempts", "INSERT INTO findings SELECT * FROM findings"] {
        let (ok, _, err) = psql(pg_port, "pg-s3cret", write);
        assert!(!ok && err.contains("read-only"), "{write}: {err}");
    }
    let (ok, out, err) = psql(pg_port, "pg-s3cret", "SELECT count(*) FROM devices WHERE kind IS NOT NULL");
    assert!(ok && out.parse::<i64>().unwrap() > 0, "devices: {out} {err}");

    // HTTP: CSV, Arrow IPC, a refusal, and the seed's question about one target.
    let csv = client.post(&sql_url).query(&[("format", "csv")]).body("SELECT count(*) AS n FROM findings").send().await.unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(csv.text().await.unwrap(), format!("n\n{}\n", want.len()));
    let ipc = client
        .post(&sql_url)
        .header("content-type", "application/json")
        .body(serde_json::json!({"sql": "SELECT id FROM findings", "format": "arrow"}).to_string())
        .send()
        .await
        .unwrap();
    let bytes = ipc.bytes().await.unwrap();
    let rows: usize = arrow::ipc::reader::StreamReader::try_new(bytes.as_ref(), None).unwrap().map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, want.len());
    let refused = client.post(&sql_url).body("DROP VIEW attempts").send().await.unwrap();
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("read-only"));
    let target_rows: Value = client
        .post(&sql_url)
        .body("SELECT target, count(*) AS n FROM findings WHERE target IS NOT NULL GROUP BY target ORDER BY n DESC, target LIMIT 1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (target, n) = (target_rows[0]["target"].as_str().unwrap().to_owned(), target_rows[0]["n"].as_i64().unwrap());
    let against: Value = client
        .get(format!("http://127.0.0.1:{http_port}/api/attempts"))
        .query(&[("target", target.as_str()), ("since", "2000-01-01T00:00:00Z")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(against.as_array().unwrap().len() as i64, n, "every unauthorized attempt against {target}");
    let bad = client.get(format!("http://127.0.0.1:{http_port}/api/attempts")).query(&[("target", "not-a-uuid")]).send().await.unwrap();
    assert_eq!(bad.status(), 400);

    terminate(child.0.take().unwrap());

    // The CLI, over the archive the worker closed at its last checkpoint.
    let cli = |sql: &str, format: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_meshguard"))
            .args(["sql", sql, "--format", format, "--archive"])
            .arg(&archive)
            .env("MESHGUARD_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(cli("SELECT count(*) AS n FROM findings", "csv"), format!("n\n{}\n", want.len()));
    assert_eq!(cli("SELECT count(DISTINCT id) AS n FROM attempts", "csv"), format!("n\n{}\n", attempts.len()));
    assert_eq!(cli("SELECT count(*) AS n FROM interactions", "csv"), format!("n\n{interactions}\n"));
    let table = cli("SELECT kind, count(*) AS n FROM findings GROUP BY kind ORDER BY kind", "table");
    assert!(table.contains("| kind") && table.contains("bad_credentials"), "{table}");
    let devices = cli("SELECT count(*) AS n FROM devices", "json");
    let devices: Value = serde_json::from_str(&devices).unwrap();
    assert!(devices[0]["n"].as_i64().unwrap() > 0, "the devices snapshot: {devices}");
    let out =
        Command::new(env!("CARGO_BIN_EXE_meshguard")).args(["sql", "DELETE FROM findings", "--archive"]).arg(&archive).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("read-only"));
}

/// The status page, as a person sees it: headless Chromium (the real browser) loads `meshguard
/// run`'s page, its script fetches `/api/status`, and the rendered page shows findings, offenders
/// and the events/s. A screenshot is kept in the test artifacts (`status-page.png` in cargo's test
/// temporary folder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_in_a_real_browser() {
    let chromium = std::env::var("MESHGUARD_CHROMIUM_BIN").unwrap_or_else(|_| "chromium".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["run", "--quiet", "--rate", "3000"])
        .env("MESHGUARD_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("MESHGUARD_SQL__PG_LISTEN", "")
        .env("MESHGUARD_PIPELINE__CHECKPOINT_INTERVAL_MS", "1000")
        .env("MESHGUARD_ENFORCEMENT__BLOCK_AT", "1")
        .env("MESHGUARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child));
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/");
    // Wait until the worker has findings and a block to show.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Ok(resp) = client.get(format!("{url}api/status")).send().await
            && resp.status() == 200
        {
            let v: Value = resp.json().await.unwrap();
            if v["findings_total"].as_i64().unwrap_or(0) > 0
                && v["blocked"].as_i64().unwrap_or(0) > 0
                && v["records"].as_u64().unwrap_or(0) > 0
            {
                break v;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no findings and blocks on /api/status after 90 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kind = status["recent_findings"][0]["kind"].as_str().unwrap().to_owned();

    let profile = tempfile::tempdir().unwrap();
    let browse = |extra: &[&str]| {
        Command::new(&chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--window-size=1400,1000", "--virtual-time-budget=6000"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium runs (scripts/test.sh installs it)")
    };
    let dom = browse(&["--dump-dom"]);
    assert!(dom.status.success(), "chromium: {}", String::from_utf8_lossy(&dom.stderr));
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains(r#"data-loaded="true""#), "the page's script loaded /api/status: {dom}");
    for section in ["Recent findings", "Top offenders", "Enforcement states", "events/s"] {
        assert!(dom.contains(section), "{section} on the page");
    }
    assert!(dom.contains(&format!(r#"<td class="kind" title="{kind}">{kind}</td>"#)), "a finding of kind {kind} rendered: {dom}");
    assert!(dom.contains(r#"<td class="blocked" title="blocked">blocked</td>"#), "a blocked UUID rendered");
    assert!(!dom.contains(r#"<td class="empty""#), "every section shows rows");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = browse(&[&format!("--screenshot={}", shot.display())]);
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "a real screenshot ({} bytes)", png.len());
    eprintln!("status page screenshot: {}", shot.display());
    terminate(child.0.take().unwrap());
}
