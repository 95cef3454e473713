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

use meshguard_testkit::{Broker, Mosquitto, ProduceRecord, consume_all, consume_available, create_topics, produce};
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
}

#[test]
fn meshguard_enforce_without_brokers_says_how() {
    let output = Command::new(env!("CARGO_BIN_EXE_meshguard")).args(["enforce"]).env_remove("MESHGUARD_KAFKA__BROKERS").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs --brokers"), "{stderr}");
}
