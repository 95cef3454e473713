//! End to end: the real `meshguard run --brokers` (pipeline and in-process enforcer) against real
//! servers on loopback: tansu for Kafka, Mosquitto 2 with its dynamic-security plugin for the
//! enforcement target. A registered device makes five unauthorized attempts; the pipeline blocks
//! it on the enforcement topic, the enforcer disables its Mosquitto client (the real broker then
//! refuses the device) and tells the target and its owner, once each per minute of event time.
//! In dry run the client stays enabled and the notifications still go out.
//!
//! Needs tansu (`bash scripts/install-broker.sh`) and Mosquitto (`bash scripts/install-mosquitto.sh`);
//! without them these tests fail with those instructions, they never skip.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshguard_testkit::{Broker, KillOnDrop, Mosquitto, ProduceRecord, consume_all, consume_available, create_topics, produce};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};
use serde_json::Value;

const PARTITIONS: i32 = 3;
const T0: i64 = 1_795_539_600_000;
/// The offender: a registered device with a Mosquitto client of the same user name.
const DEVICE: &str = "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
const DEVICE_PASSWORD: &str = "device-password";
/// The target of its attempts, owned by OWNER.
const TARGET: &str = "c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
const OWNER: &str = "d0d0d0d0-1111-4222-8333-444444444444";
const NOTIFICATIONS: &str = "meshguard.notifications.v1";
const ENFORCEMENT: &str = "meshguard.enforcement.v1";
/// Long enough for a loaded two-core machine; every wait ends as soon as its event is seen.
const WAIT: Duration = Duration::from_secs(90);

async fn setup(broker: &Broker) {
    let topics: Vec<(&str, i32, bool)> = vec![
        ("meshguard.messages.v1", PARTITIONS, false),
        ("meshguard.presence.v1", PARTITIONS, false),
        ("meshguard.interactions.v1", PARTITIONS, false),
        ("meshguard.identity-requests.v1", PARTITIONS, false),
        ("meshguard.registry.v1", PARTITIONS, true),
        ("meshguard.findings.v1", PARTITIONS, false),
        (ENFORCEMENT, PARTITIONS, true),
        (NOTIFICATIONS, PARTITIONS, false),
        ("meshguard.identity-results.v1", PARTITIONS, false),
        ("meshguard.deadletter.v1", PARTITIONS, false),
    ];
    create_topics(&broker.bootstrap(), &topics).await.unwrap();
}

/// A device client in Mosquitto's dynamic-security plugin, allowed to publish under `devices/`.
fn create_device_client(mosquitto: &Mosquitto) {
    mosquitto.ctrl(&["createRole", "device"]).unwrap();
    mosquitto.ctrl(&["addRoleACL", "device", "publishClientSend", "devices/#", "allow"]).unwrap();
    mosquitto.ctrl(&["createClient", DEVICE, "-p", DEVICE_PASSWORD]).unwrap();
    mosquitto.ctrl(&["addClientRole", DEVICE, "device"]).unwrap();
}

/// Connects to Mosquitto as the device and disconnects: `Ok` once the broker accepted it, `Err`
/// with the broker's refusal.
async fn device_connects(mosquitto: &Mosquitto) -> Result<(), ConnectionError> {
    let mut options = MqttOptions::new(format!("device-{}", unique_suffix()), "127.0.0.1", mosquitto.port());
    options.set_credentials(DEVICE, DEVICE_PASSWORD);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let run = async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                let _ = client.try_disconnect();
                return Ok(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), run).await.expect("the device's connection attempt ends in time")
}

fn unique_suffix() -> String {
    format!("{:032x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

/// The directory: the device, the target (owned by OWNER, a person) and the owner, effective
/// an hour before the attempts.
fn registry() -> Vec<ProduceRecord> {
    [
        serde_json::json!({"uuid": DEVICE, "kind": "device", "type": "thermostat"}),
        serde_json::json!({"uuid": TARGET, "kind": "device", "type": "smart-bulb", "owner": OWNER}),
        serde_json::json!({"uuid": OWNER, "kind": "person"}),
    ]
    .into_iter()
    .map(|v| (Some(v["uuid"].as_str().unwrap().as_bytes().to_vec()), Some(v.to_string().into_bytes()), Some(T0 - 3_600_000)))
    .collect()
}

/// Five sends by the device with invalid credentials to the target, a second apart: five
/// `bad_credentials` findings, and the fifth blocks the device.
fn attempts() -> Vec<ProduceRecord> {
    (0..5i64)
        .map(|i| {
            let v = serde_json::json!({"id": format!("00000000-0000-4000-8000-0000000006{i:02}"), "ts": T0 + i * 1_000,
                "action": "send", "from": DEVICE, "to": TARGET, "auth": "invalid"});
            (Some(DEVICE.as_bytes().to_vec()), Some(v.to_string().into_bytes()), Some(T0 + i * 1_000))
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `meshguard run --brokers` with a configuration file pointing a Mosquitto target at the test broker.
fn spawn_meshguard(broker: &Broker, mosquitto: &Mosquitto, dry_run: bool, metrics_port: u16, dir: &std::path::Path) -> Child {
    let config = dir.join("meshguard.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\npartitions = {PARTITIONS}\n\n[pipeline]\ncheckpoint_dir = \"{checkpoints}\"\ncheckpoint_interval_ms = 1000\n\n\
             [http]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [enforcer]\ndry_run = {dry_run}\ncommit_interval_ms = 200\nretry_base_delay_ms = 100\n\n\
             [[enforcer.targets]]\ntype = \"mosquitto\"\nname = \"mosquitto\"\nport = {port}\nusername = \"{admin}\"\npassword = \"{password}\"\nreconnect_delay_ms = 100\n",
            checkpoints = dir.join("checkpoints").display(),
            port = mosquitto.port(),
            admin = Mosquitto::ADMIN_USERNAME,
            password = mosquitto.admin_password(),
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["run", "--brokers", &broker.bootstrap(), "--quiet", "--config"])
        .arg(&config)
        .env("MESHGUARD_ARCHIVE__DIR", dir.join("archive"))
        .env("MESHGUARD_SQL__PG_LISTEN", "")
        .env("MESHGUARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn terminate(mut child: Child) {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "meshguard exited with {status} after SIGTERM");
}

/// The sum of the samples of `metric` whose labels include every one of `labels`, from `/metrics`.
fn metric(port: u16, metric: &str, labels: &[&str]) -> f64 {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return 0.0 };
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Waits until `metric` reaches `at_least`, polling `/metrics`.
fn wait_for_metric(port: u16, name: &str, labels: &[&str], at_least: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric(port, name, labels);
        if value >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{name}{labels:?} stayed at {value}, expected {at_least}");
        // The pause between two probes of the endpoint, not a stand-in for the event.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The common scenario: registry and attempts in, then the enforcement record, the enforcer's
/// handling of it (applied, or dry run), what Mosquitto does with the device, and the notices.
async fn scenario(dry_run: bool) {
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let mosquitto = Mosquitto::start().unwrap();
    create_device_client(&mosquitto);
    device_connects(&mosquitto).await.expect("the device connects before anything happened");
    produce(&broker.bootstrap(), "meshguard.registry.v1", &registry()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = spawn_meshguard(&broker, &mosquitto, dry_run, port, dir.path());
    produce(&broker.bootstrap(), "meshguard.messages.v1", &attempts()).await.unwrap();

    // The pipeline blocks the device on the compacted enforcement topic.
    let changes = consume_all(&broker.bootstrap(), ENFORCEMENT, 1, WAIT).unwrap();
    assert_eq!(changes[0].key.as_deref(), Some(DEVICE.as_bytes()));
    let change: Value = serde_json::from_slice(changes[0].payload.as_ref().unwrap()).unwrap();
    assert_eq!((change["uuid"].as_str(), change["state"].as_str()), (Some(DEVICE), Some("blocked")));

    // The enforcer applied it (or, in dry run, only said it would) ...
    let result = if dry_run { "result=\"dry_run\"" } else { "result=\"applied\"" };
    wait_for_metric(port, "meshguard_enforcement_actions_total", &["target=\"mosquitto\"", result], 1.0);
    // ... and handled the five findings: two recipients each, all but the first two held back.
    let handled = || {
        metric(port, "meshguard_notifications_total", &["kind=\"bad_credentials\""])
            + metric(port, "meshguard_notifications_suppressed_total", &["kind=\"bad_credentials\""])
    };
    let deadline = Instant::now() + WAIT;
    while handled() < 10.0 {
        assert!(Instant::now() < deadline, "the enforcer did not handle the five findings: {}", handled());
        std::thread::sleep(Duration::from_millis(100));
    }

    // What the real broker does with the device now.
    let connected = device_connects(&mosquitto).await;
    if dry_run {
        connected.expect("in dry run the device's client stays enabled");
        assert!(!mosquitto.ctrl(&["getClient", DEVICE]).unwrap().contains("Disabled: true"));
    } else {
        match connected {
            Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => {}
            other => panic!("expected Mosquitto to refuse the blocked device, got {other:?}"),
        }
        assert!(mosquitto.ctrl(&["getClient", DEVICE]).unwrap().contains("Disabled: true"));
    }
    assert_eq!(metric(port, "meshguard_enforcement_actions_total", &["result=\"failed\""]), 0.0);

    // Notifications: one to the target, one to its owner, keyed by recipient, in the contract's shape.
    let notices = consume_all(&broker.bootstrap(), NOTIFICATIONS, 2, WAIT).unwrap();
    terminate(child);
    let all = consume_available(&broker.bootstrap(), NOTIFICATIONS, Duration::from_secs(10)).unwrap();
    assert_eq!(all.len(), notices.len(), "nothing beyond the first notices");
    assert_eq!(all.len(), 2, "at most one per recipient, offender and kind per minute, though five findings were made");
    let mut recipients = BTreeSet::new();
    for n in &all {
        let v: Value = serde_json::from_slice(n.payload.as_ref().unwrap()).unwrap();
        let recipient = v["recipient"].as_str().unwrap().to_owned();
        assert_eq!(n.key.as_deref(), Some(recipient.as_bytes()), "keyed by recipient");
        assert_eq!((v["about"].as_str(), v["kind"].as_str()), (Some(DEVICE), Some("bad_credentials")), "{v}");
        for field in ["id", "ts", "finding", "text"] {
            assert!(v[field].is_string(), "notification lacks `{field}`: {v}");
        }
        let text = v["text"].as_str().unwrap();
        let want = if recipient == OWNER {
            format!("{DEVICE} tried to send to your smart-bulb {TARGET} with invalid credentials.")
        } else {
            format!("{DEVICE} tried to send to you with invalid credentials.")
        };
        assert_eq!(text, want);
        recipients.insert(recipient);
    }
    assert_eq!(recipients, BTreeSet::from([TARGET.to_owned(), OWNER.to_owned()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_device_is_refused_by_mosquitto_and_target_and_owner_are_told_once() {
    scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_dry_run_the_device_stays_enabled_and_notifications_still_go_out() {
    scenario(true).await;
}

/// `meshguard enforce` alone, with `--dry-run` on the command line: an enforcement record put on
/// the topic directly is handled (dry run: no target is called, the Mosquitto target points at a
/// closed port) and the service stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshguard_enforce_runs_alone_and_takes_dry_run_from_the_command_line() {
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meshguard.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n\n[[enforcer.targets]]\ntype = \"mosquitto\"\nport = {closed}\nusername = \"admin\"\npassword = \"unused\"\n",
            closed = free_port()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["enforce", "--brokers", &broker.bootstrap(), "--dry-run", "--config"])
        .arg(&config)
        .env("MESHGUARD_ENFORCER__AUDIT__DIR", dir.path().join("audit"))
        .env("MESHGUARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let state = serde_json::json!({"uuid": DEVICE, "state": "blocked", "since": "2026-11-24T17:03:10.000Z",
        "until": "2026-11-24T18:03:10.000Z", "reason": "5 unauthorized attempts in 10 minutes", "attempts": 5, "findings": []});
    produce(&broker.bootstrap(), ENFORCEMENT, &[(Some(DEVICE.as_bytes().to_vec()), Some(state.to_string().into_bytes()), None)])
        .await
        .unwrap();
    wait_for_metric(port, "meshguard_enforcement_actions_total", &["target=\"mosquitto\"", "result=\"dry_run\""], 1.0);
    assert_eq!(metric(port, "meshguard_enforcement_actions_total", &["result=\"failed\""]), 0.0);
    terminate(child);
    // The audit trail, written at the final commit: the state change and the call a dry run skipped.
    let rows = audit_rows(&dir.path().join("audit"));
    let events: Vec<(&str, Option<&str>, Option<&str>)> = rows.iter().map(|r| (r.0.as_str(), r.2.as_deref(), r.3.as_deref())).collect();
    assert_eq!(events, [("state_change", None, None), ("target_call", Some("mosquitto"), Some("dry_run"))]);
}

#[test]
fn meshguard_enforce_without_brokers_says_how() {
    let output = Command::new(env!("CARGO_BIN_EXE_meshguard")).args(["enforce"]).env_remove("MESHGUARD_KAFKA__BROKERS").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs --brokers"), "{stderr}");
}

// ---- effectively once: the enforcer killed mid-stream -----------------------------------------

/// Devices of the crash scenario: even rounds of 12, each with its own Mosquitto client.
const CRASH_DEVICES: u32 = 24;
/// Devices of the first round (before the crash round).
const FIRST_ROUND: u32 = 12;
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn crash_device(i: u32) -> String {
    format!("00000000-0000-4000-a000-{i:012}")
}

/// What each device goes through: `i % 3 == 0` blocked; `1` blocked, then unblocked; `2` blocked,
/// then unregistered. Records of the contract's shape, keyed by the device.
fn crash_states(i: u32) -> Vec<meshguard_schemas::output::EnforcementState> {
    use meshguard_schemas::EnforcementStateKind::{Active, Blocked, Unregistered};
    let uuid = uuid::Uuid::parse_str(&crash_device(i)).unwrap();
    let since = T0 + i64::from(i) * 1_000;
    let state = |kind, since, until: Option<i64>| meshguard_schemas::output::EnforcementState {
        uuid,
        state: kind,
        since,
        until,
        reason: String::from("5 unauthorized attempts in 10 minutes"),
        attempts: 5,
        findings: vec![],
    };
    let block = state(Blocked, since, Some(since + 3_600_000));
    match i % 3 {
        0 => vec![block],
        1 => vec![block, state(Active, since + 600_000, None)],
        _ => vec![block, state(Unregistered, since + 700_000, None)],
    }
}

/// Three `bad_credentials` findings of device `i` against TARGET (owned by OWNER), 30 s apart in
/// event time: the first and the third notify each recipient (one per minute), the second does not.
fn crash_findings(i: u32) -> Vec<(uuid::Uuid, Value)> {
    (0..3i64)
        .map(|j| {
            let id = uuid::Uuid::parse_str(&format!("f0000000-0000-4000-8000-{i:06}{j:06}")).unwrap();
            let ts = meshguard_schemas::time::format_ms(T0 + i64::from(i) * 1_000 + j * 30_000);
            let finding = serde_json::json!({"id": id, "ts": ts, "event_ts": ts, "event_id": uuid::Uuid::new_v4(),
                "kind": "bad_credentials", "offender": crash_device(i), "target": TARGET, "action": "send",
                "rule": "auth:requester", "detail": {"auth": "invalid"}, "score": 1.0, "severity": "high"});
            (id, finding)
        })
        .collect()
}

/// The ids of the notices the [`crash_findings`] of `devices` give: the first and the third
/// finding of each, to the target and to its owner.
fn expected_notices(devices: std::ops::Range<u32>) -> BTreeSet<String> {
    let mut want = BTreeSet::new();
    for i in devices {
        let findings = crash_findings(i);
        for (finding, _) in [&findings[0], &findings[2]] {
            for recipient in [TARGET, OWNER] {
                let recipient = uuid::Uuid::parse_str(recipient).unwrap();
                want.insert(meshguard_enforcer::service::notify::notification_id(finding, &recipient).to_string());
            }
        }
    }
    want
}

/// The findings of a round of devices, on the findings topic.
async fn produce_findings(broker: &Broker, devices: std::ops::Range<u32>) {
    let findings: Vec<ProduceRecord> = devices
        .flat_map(|i| {
            crash_findings(i).into_iter().map(move |(_, f)| (Some(crash_device(i).into_bytes()), Some(f.to_string().into_bytes()), None))
        })
        .collect();
    produce(&broker.bootstrap(), "meshguard.findings.v1", &findings).await.unwrap();
}

/// The enforcement records of a round of devices, on the enforcement topic.
async fn produce_states(broker: &Broker, devices: std::ops::Range<u32>) {
    let states: Vec<ProduceRecord> = devices
        .flat_map(|i| {
            crash_states(i).into_iter().map(move |s| (Some(crash_device(i).into_bytes()), Some(serde_json::to_vec(&s).unwrap()), None))
        })
        .collect();
    produce(&broker.bootstrap(), ENFORCEMENT, &states).await.unwrap();
}

/// A webhook receiver that records every delivery and, at the `kill_at`-th distinct action id,
/// SIGKILLs the enforcer before answering: that action is in flight when the process dies.
struct Receiver {
    deliveries: std::sync::Mutex<Vec<(String, Vec<u8>)>>,
    kill_at: usize,
    victim: std::sync::Mutex<Option<u32>>,
    /// The number of distinct ids received, and whether the victim was killed.
    progress: tokio::sync::watch::Sender<(usize, bool)>,
}

impl Receiver {
    fn distinct(&self) -> BTreeSet<String> {
        self.deliveries.lock().unwrap().iter().map(|(id, _)| id.clone()).collect()
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&(usize, bool)) -> bool) {
        let mut rx = self.progress.subscribe();
        tokio::time::timeout(WAIT, rx.wait_for(|p| done(p)))
            .await
            .unwrap_or_else(|_| panic!("waiting for {what}: got {:?}", *self.progress.borrow()))
            .unwrap();
    }
}

async fn start_receiver(kill_at: usize) -> (std::sync::Arc<Receiver>, u16) {
    use axum::extract::State;
    use axum::http::HeaderMap;
    let (progress, _) = tokio::sync::watch::channel((0, false));
    let receiver = std::sync::Arc::new(Receiver { deliveries: Default::default(), kill_at, victim: Default::default(), progress });
    async fn hook(State(r): State<std::sync::Arc<Receiver>>, headers: HeaderMap, body: axum::body::Bytes) -> &'static str {
        let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let distinct = {
            let mut d = r.deliveries.lock().unwrap();
            d.push((id, body.to_vec()));
            d.iter().map(|(id, _)| id).collect::<BTreeSet<_>>().len()
        };
        let mut killed = r.progress.borrow().1;
        if distinct >= r.kill_at
            && let Some(pid) = r.victim.lock().unwrap().take()
        {
            let status = Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
            assert!(status.success(), "kill -KILL {pid}");
            killed = true;
        }
        r.progress.send_replace((distinct, killed));
        "ok"
    }
    let app = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (receiver, port)
}

/// `meshguard enforce` with the webhook and Mosquitto targets and the audit trail in `dir`, with
/// `commit_interval_ms` and the audit's `max_rows_per_file`.
fn spawn_enforcer(
    broker: &Broker,
    mosquitto: &Mosquitto,
    webhook_port: u16,
    metrics_port: u16,
    dir: &std::path::Path,
    (commit_interval_ms, audit_rows): (u64, usize),
) -> Child {
    let config = dir.join("enforcer.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
             [enforcer]\ncommit_interval_ms = {commit_interval_ms}\nretry_base_delay_ms = 100\n\n\
             [enforcer.audit]\ndir = \"{audit}\"\nmax_rows_per_file = {audit_rows}\n\n\
             [[enforcer.targets]]\ntype = \"webhook\"\nname = \"soc\"\nurl = \"http://127.0.0.1:{webhook_port}/hook\"\nsecret = \"{WEBHOOK_SECRET}\"\nbase_delay_ms = 50\nmax_delay_ms = 200\n\n\
             [[enforcer.targets]]\ntype = \"mosquitto\"\nname = \"mosquitto\"\nport = {port}\nusername = \"{admin}\"\npassword = \"{password}\"\nreconnect_delay_ms = 100\n",
            audit = dir.join("audit").display(),
            port = mosquitto.port(),
            admin = Mosquitto::ADMIN_USERNAME,
            password = mosquitto.admin_password(),
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["enforce", "--brokers", &broker.bootstrap(), "--config"])
        .arg(&config)
        // Static membership, as the README advises: the restarted enforcer takes the killed one's
        // place in the group at once. (tansu 0.6 never expires a killed dynamic member: it stays
        // in the group, and the range assignor gives it the partitions whenever its member id
        // sorts first, so the restart would wait forever.)
        .env("MESHGUARD_KAFKA__INSTANCE_ID", "crash-test")
        .env("MESHGUARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Every audit row in `dir`: (event, action id, target, outcome).
fn audit_rows(dir: &std::path::Path) -> Vec<(String, uuid::Uuid, Option<String>, Option<String>)> {
    use arrow::array::{Array as _, AsArray as _};
    use arrow::datatypes::UInt8Type;
    let mut rows = Vec::new();
    for folder in std::fs::read_dir(dir).unwrap() {
        let folder = folder.unwrap().path();
        assert!(folder.file_name().unwrap().to_str().unwrap().starts_with("date="), "{}", folder.display());
        for file in std::fs::read_dir(&folder).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.starts_with('.') {
                continue;
            }
            assert!(name.starts_with("part-") && name.ends_with(".parquet"), "{name}");
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
                .unwrap()
                .build()
                .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                assert_eq!(batch.schema(), meshguard_enforcer::audit_schema());
                let text = |name: &str, row: usize| {
                    let c = batch.column_by_name(name).unwrap();
                    let d = c.as_dictionary::<UInt8Type>();
                    (!d.is_null(row)).then(|| d.values().as_string::<i32>().value(d.keys().value(row) as usize).to_owned())
                };
                let ids = batch.column_by_name("action_id").unwrap().as_fixed_size_binary().clone();
                let targets = batch.column_by_name("target").unwrap().as_string::<i32>().clone();
                for row in 0..batch.num_rows() {
                    rows.push((
                        text("event", row).unwrap(),
                        uuid::Uuid::from_slice(ids.value(row)).unwrap(),
                        (!targets.is_null(row)).then(|| targets.value(row).to_owned()),
                        text("outcome", row),
                    ));
                }
            }
        }
    }
    rows
}

/// The enforcer is SIGKILLed in the middle of a stream of enforcement changes (while a webhook
/// delivery is in flight), with notices published for findings it had not committed, then started
/// again. What a consumer can see is what one run without a crash shows: every action applied,
/// each under its one deterministic id (a repeat of an id carries the same body; no action arrives
/// under a second id); Mosquitto's clients end in the state of their last change; the
/// notifications topic holds each expected notice exactly once (the restarted enforcer publishes
/// none: the replayed findings are judged against the notices already on the topic); the audit
/// trail has every state change and the target calls.
///
/// Three runs, so that what is committed at the kill is decided by the test, not by timing: the
/// first handles the first round and stops cleanly (everything committed); the second, whose
/// commit interval is 10 minutes, handles the second round's findings (their notices published,
/// not committed) and is killed in the middle of its actions; the third replays the second round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_enforcer_restarts_and_changes_nothing_a_consumer_can_see() {
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    let mosquitto = Mosquitto::start().unwrap();
    for i in 0..CRASH_DEVICES {
        mosquitto.ctrl(&["createClient", &crash_device(i), "-p", DEVICE_PASSWORD]).unwrap();
    }
    produce(&broker.bootstrap(), "meshguard.registry.v1", &registry()).await.unwrap();
    let actions = |devices: std::ops::Range<u32>| -> BTreeSet<String> {
        devices.flat_map(crash_states).map(|s| meshguard_enforcer::EnforcementAction::id_of(&s).to_string()).collect()
    };
    let (first_round, all) = (actions(0..FIRST_ROUND), actions(0..CRASH_DEVICES));
    // Killed at the eighth action of the second round.
    let (receiver, webhook_port) = start_receiver(first_round.len() + 8).await;
    let dir = tempfile::tempdir().unwrap();

    // Round one: findings and actions handled, then a clean stop commits them.
    let child = spawn_enforcer(&broker, &mosquitto, webhook_port, free_port(), dir.path(), (200, 100_000));
    produce_findings(&broker, 0..FIRST_ROUND).await;
    produce_states(&broker, 0..FIRST_ROUND).await;
    receiver.wait_until("the first round's actions", |(n, _)| *n >= first_round.len()).await;
    let first_notices = 4 * FIRST_ROUND as usize;
    assert_eq!(consume_all(&broker.bootstrap(), NOTIFICATIONS, first_notices, WAIT).unwrap().len(), first_notices);
    terminate(child);

    // Round two: the findings' notices are published (and not committed) ...
    let mut child = spawn_enforcer(&broker, &mosquitto, webhook_port, free_port(), dir.path(), (600_000, 100_000));
    *receiver.victim.lock().unwrap() = Some(child.id());
    produce_findings(&broker, FIRST_ROUND..CRASH_DEVICES).await;
    let notices = 4 * CRASH_DEVICES as usize;
    assert_eq!(consume_all(&broker.bootstrap(), NOTIFICATIONS, notices, WAIT).unwrap().len(), notices);
    // ... then the actions, in the middle of which the receiver kills the enforcer.
    produce_states(&broker, FIRST_ROUND..CRASH_DEVICES).await;
    receiver.wait_until("the kill", |(_, killed)| *killed).await;
    let status = child.wait().unwrap();
    assert!(!status.success(), "the enforcer was killed: {status}");
    let at_kill = receiver.distinct();
    assert!(at_kill.len() < all.len(), "killed mid-stream: {} of {} actions seen", at_kill.len(), all.len());

    // The restart replays from the committed offsets and finishes the stream.
    let port = free_port();
    let child = spawn_enforcer(&broker, &mosquitto, webhook_port, port, dir.path(), (200, 100_000));
    receiver.wait_until("every action", |(n, _)| *n >= all.len()).await;
    // The second round's 36 findings again: 72 candidate notices, none published (48 are on the
    // topic already, 24 were held back by the limit then and are now).
    wait_for_metric(port, "meshguard_notifications_suppressed_total", &["kind=\"bad_credentials\""], 72.0);
    assert_eq!(metric(port, "meshguard_notifications_total", &[]), 0.0, "the restarted enforcer publishes no notice");
    terminate(child);

    // Webhook: exactly the expected ids; a repeated id (the replay) carries the same body.
    assert_eq!(receiver.distinct(), all);
    let deliveries = receiver.deliveries.lock().unwrap().clone();
    let mut bodies: std::collections::BTreeMap<&str, &[u8]> = std::collections::BTreeMap::new();
    for (id, body) in &deliveries {
        let first = *bodies.entry(id).or_insert(body);
        assert_eq!(first, &body[..], "every delivery of {id} has the same body");
    }
    assert!(deliveries.len() > all.len(), "the actions after the last commit were delivered again after the restart, same ids");

    // Mosquitto: each client in the state of its last change.
    for i in 0..CRASH_DEVICES {
        let client = mosquitto.ctrl(&["getClient", &crash_device(i)]);
        match i % 3 {
            0 => assert!(client.unwrap().contains("Disabled: true"), "device {i} stays blocked"),
            1 => assert!(!client.unwrap().contains("Disabled: true"), "device {i} is unblocked"),
            _ => assert!(client.is_err_and(|e| e.to_string().contains("not found")), "device {i} is deleted"),
        }
    }

    // Notifications: every expected notice once, no id twice, nothing else.
    let published = consume_available(&broker.bootstrap(), NOTIFICATIONS, Duration::from_secs(10)).unwrap();
    let mut seen = BTreeSet::new();
    for n in &published {
        let v: Value = serde_json::from_slice(n.payload.as_ref().unwrap()).unwrap();
        assert!(seen.insert(v["id"].as_str().unwrap().to_owned()), "notice {} published twice: {v}", v["id"]);
    }
    assert_eq!(seen, expected_notices(0..CRASH_DEVICES));

    // Audit: every state change, and a call of each target for every action.
    let rows = audit_rows(&dir.path().join("audit"));
    for id in &all {
        let id = uuid::Uuid::parse_str(id).unwrap();
        assert!(rows.iter().any(|r| r.0 == "state_change" && r.1 == id), "state change {id} audited");
        assert!(
            rows.iter().any(|r| r.0 == "target_call" && r.1 == id && r.2.as_deref() == Some("soc") && r.3.as_deref() == Some("applied")),
            "webhook call {id} audited"
        );
        assert!(
            rows.iter().any(|r| r.0 == "target_call" && r.1 == id && r.2.as_deref() == Some("mosquitto")),
            "mosquitto call {id} audited"
        );
    }
    // The same trail as the SQL surface's `audit` table (`--archive DIR` reads `DIR/audit`): every
    // action's state change, its id as text.
    let sql = "SELECT count(DISTINCT action_id) AS n, count(*) AS m FROM audit WHERE event = 'state_change'";
    let out = Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["sql", sql, "--format", "csv", "--archive"])
        .arg(dir.path())
        .env("MESHGUARD_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let state_changes = rows.iter().filter(|r| r.0 == "state_change").count();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("n,m\n{},{state_changes}\n", all.len()));
}

/// `meshguard enforce` with no target (notifications only), metrics on `metrics_port`.
fn spawn_notifier(broker: &Broker, metrics_port: u16, dir: &std::path::Path, name: &str) -> Child {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[enforcer]\ncommit_interval_ms = 200\n\n[enforcer.audit]\ndir = \"{audit}\"\n",
            audit = dir.join(format!("audit-{name}")).display(),
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_meshguard"))
        .args(["enforce", "--brokers", &broker.bootstrap(), "--config"])
        .arg(&config)
        .env("MESHGUARD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Partitions of the findings topic assigned to the enforcer whose metrics are on `port`.
fn findings_assigned(port: u16) -> f64 {
    metric(port, "meshguard_enforcer_assigned_partitions", &["topic=\"findings\""])
}

/// Two enforcers share the findings; one leaves, and the other takes its partitions over with
/// the notices the first published: a finding 30 s after a notified one is held back whoever
/// notified it (at most one notice per recipient, offender and kind per minute across the group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforcer_taking_over_partitions_knows_the_notices_of_the_one_that_left() {
    const DEVICES: u32 = 12;
    let broker = Broker::start().unwrap();
    setup(&broker).await;
    produce(&broker.bootstrap(), "meshguard.registry.v1", &registry()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port_a, port_b) = (free_port(), free_port());
    let a = spawn_notifier(&broker, port_a, dir.path(), "a");
    let b = spawn_notifier(&broker, port_b, dir.path(), "b");
    let mut b = KillOnDrop(Some(b));
    let mut a = KillOnDrop(Some(a));
    // Both in the group, the findings partitions split between them.
    let deadline = Instant::now() + WAIT;
    while !(findings_assigned(port_a) >= 1.0
        && findings_assigned(port_b) >= 1.0
        && findings_assigned(port_a) + findings_assigned(port_b) == f64::from(PARTITIONS))
    {
        assert!(Instant::now() < deadline, "the two enforcers never shared the findings partitions");
        // The pause between two probes of the endpoints, not a stand-in for the event.
        std::thread::sleep(Duration::from_millis(100));
    }

    // Round one (each device's first finding): every recipient told, by whichever enforcer holds it.
    let round = |j: usize| -> Vec<ProduceRecord> {
        (0..DEVICES)
            .map(|i| {
                let (_, finding) = crash_findings(i).swap_remove(j);
                (Some(crash_device(i).into_bytes()), Some(finding.to_string().into_bytes()), None)
            })
            .collect()
    };
    produce(&broker.bootstrap(), "meshguard.findings.v1", &round(0)).await.unwrap();
    let first = 2 * DEVICES as usize;
    assert_eq!(consume_all(&broker.bootstrap(), NOTIFICATIONS, first, WAIT).unwrap().len(), first);
    let by_a = metric(port_a, "meshguard_notifications_total", &[]);
    assert!(by_a > 0.0 && by_a < first as f64, "both enforcers notified some: a published {by_a} of {first}");

    // A leaves; B takes every partition.
    terminate(a.0.take().unwrap());
    let deadline = Instant::now() + WAIT;
    while findings_assigned(port_b) < f64::from(PARTITIONS) {
        assert!(Instant::now() < deadline, "b never took the findings partitions over");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Rounds two (30 s later: held back) and three (60 s later: told again).
    produce(&broker.bootstrap(), "meshguard.findings.v1", &[round(1), round(2)].concat()).await.unwrap();
    let all = 4 * DEVICES as usize;
    assert_eq!(consume_all(&broker.bootstrap(), NOTIFICATIONS, all, WAIT).unwrap().len(), all);
    wait_for_metric(port_b, "meshguard_notifications_suppressed_total", &["kind=\"bad_credentials\""], f64::from(2 * DEVICES));
    terminate(b.0.take().unwrap());
    let published = consume_available(&broker.bootstrap(), NOTIFICATIONS, Duration::from_secs(2)).unwrap();
    assert_eq!(published.len(), all, "no notice twice, none more");
    let seen: BTreeSet<String> = published
        .iter()
        .map(|n| serde_json::from_slice::<Value>(n.payload.as_ref().unwrap()).unwrap()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, expected_notices(0..DEVICES), "the first and third finding of each device told, never the second");
}
