//! The Mosquitto target against a real Mosquitto 2 with its dynamic-security plugin (started by
//! `meshguard_testkit::Mosquitto`; `bash scripts/install-mosquitto.sh` installs it).
//!
//! What a device can do is checked with the device's own MQTT connection, and the plugin's view
//! with `mosquitto_ctrl`, both independent of the target's code.

use std::sync::Arc;
use std::time::Duration;

use meshguard_enforcer::targets::{self, TargetConfig, TargetContext};
use meshguard_enforcer::{ActionOutcome, EnforcementAction, EnforcementTarget, Error, MemoryDeadLetters};
use meshguard_schemas::EnforcementStateKind;
use meshguard_schemas::output::EnforcementState;
use meshguard_testkit::Mosquitto;
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Long enough for a loaded CI machine; every wait ends as soon as its event arrives.
const WAIT: Duration = Duration::from_secs(10);

const DEVICE: Uuid = Uuid::from_u128(0x9b2f_1c3a_0d4e_4f5a_8b6c_7d8e_9f0a_1b2c);
const DEVICE_PASSWORD: &str = "device-password";

fn state(uuid: Uuid, kind: EnforcementStateKind, since: i64, until: Option<i64>) -> EnforcementAction {
    EnforcementAction::new(EnforcementState {
        uuid,
        state: kind,
        since,
        until,
        reason: String::from("5 unauthorized attempts in 10 minutes"),
        attempts: 5,
        findings: vec![],
    })
}

fn target(broker: &Mosquitto, password: &str, response_timeout_ms: u64) -> Box<dyn EnforcementTarget> {
    let config: TargetConfig = toml::from_str(&format!(
        "type = \"mosquitto\"\nport = {}\nusername = \"{}\"\npassword = \"{password}\"\nresponse_timeout_ms = {response_timeout_ms}\nreconnect_delay_ms = 100\n",
        broker.port(),
        Mosquitto::ADMIN_USERNAME
    ))
    .expect("configuration parses");
    targets::build(&config, &TargetContext { dead_letters: Arc::new(MemoryDeadLetters::new()) }).expect("target builds")
}

fn options(broker: &Mosquitto, client_id: &str, username: &str, password: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
    options.set_credentials(username, password);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Connects as the device, publishes `payload` to `devices/<uuid>/telemetry` with QoS 1, waits
/// for the broker's PUBACK and disconnects; `Err` with the connection error when the broker
/// refuses the device.
async fn publish_as_device(broker: &Mosquitto, payload: &str) -> Result<(), ConnectionError> {
    let username = DEVICE.to_string();
    let (client, mut eventloop) = AsyncClient::new(options(broker, &format!("device-{}", Uuid::new_v4()), &username, DEVICE_PASSWORD), 10);
    let run = async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    client
                        .try_publish(format!("devices/{username}/telemetry"), QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
                        .expect("queued");
                }
                Event::Incoming(Packet::PubAck(_)) => {
                    client.try_disconnect().expect("queued");
                    return Ok(());
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, run).await.expect("the device's attempt ends in time")
}

/// An observer subscribed to `devices/#` (as the admin, whose role may read every topic); returns
/// once the subscription is acknowledged, with the payloads it receives.
async fn observe(broker: &Mosquitto) -> (mpsc::UnboundedReceiver<String>, tokio::task::JoinHandle<()>) {
    let (client, mut eventloop) = AsyncClient::new(options(broker, "observer", Mosquitto::ADMIN_USERNAME, broker.admin_password()), 10);
    client.subscribe("devices/#", QoS::AtLeastOnce).await.expect("queued");
    let (subscribed_tx, subscribed) = oneshot::channel();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(_)) => drop(subscribed_tx.take().map(|s| s.send(()))),
                Event::Incoming(Packet::Publish(p)) => drop(tx.send(String::from_utf8_lossy(&p.payload).into_owned())),
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, subscribed).await.expect("subscribed in time").expect("observer running");
    (rx, task)
}

/// A device session that stays connected; the receiver fires when the broker ends it.
async fn live_session(broker: &Mosquitto) -> (oneshot::Receiver<ConnectionError>, tokio::task::JoinHandle<()>) {
    let (_client, mut eventloop) = AsyncClient::new(options(broker, "device-live", &DEVICE.to_string(), DEVICE_PASSWORD), 10);
    let (connected_tx, connected) = oneshot::channel();
    let (ended_tx, ended) = oneshot::channel();
    let task = tokio::spawn(async move {
        let _client = _client;
        let mut connected_tx = Some(connected_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => drop(connected_tx.take().map(|c| c.send(()))),
                Ok(_) => {}
                Err(error) => {
                    let _ = ended_tx.send(error);
                    return;
                }
            }
        }
    });
    tokio::time::timeout(WAIT, connected).await.expect("connected in time").expect("session running");
    (ended, task)
}

fn assert_refused(result: Result<(), ConnectionError>) {
    match result {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => {}
        other => panic!("expected the broker to refuse the device (not authorized), got {other:?}"),
    }
}

#[tokio::test]
async fn block_unblock_and_unregister_a_device_on_a_real_broker() {
    let broker = Mosquitto::start().expect("mosquitto starts");
    let device = DEVICE.to_string();
    broker.ctrl(&["createRole", "device"]).expect("role");
    broker.ctrl(&["addRoleACL", "device", "publishClientSend", "devices/#", "allow"]).expect("acl");
    broker.ctrl(&["createClient", &device, "-p", DEVICE_PASSWORD]).expect("client");
    broker.ctrl(&["addClientRole", &device, "device"]).expect("client role");
    let (mut received, observer) = observe(&broker).await;

    // Before: the device publishes, and the message arrives.
    publish_as_device(&broker, "before").await.expect("an active device publishes");
    assert_eq!(tokio::time::timeout(WAIT, received.recv()).await.expect("delivered in time").as_deref(), Some("before"));
    let (session_ended, session) = live_session(&broker).await;

    // Block: applied, and harmless to repeat.
    let target = target(&broker, broker.admin_password(), 5_000);
    let block = state(DEVICE, EnforcementStateKind::Blocked, 1_795_539_790_000, Some(1_795_543_390_000));
    assert_eq!(target.apply(&block).await.expect("block applied"), ActionOutcome::Applied);
    assert_eq!(target.apply(&block).await.expect("block repeated"), ActionOutcome::Applied);
    // The live session is kicked, and a new connection is refused.
    tokio::time::timeout(WAIT, session_ended).await.expect("the blocked device's session ends in time").expect("session reported its end");
    assert_refused(publish_as_device(&broker, "while blocked").await);
    assert!(broker.ctrl(&["getClient", &device]).expect("getClient").contains("Disabled: true"));

    // Unblock (the state is active again): the device publishes again.
    let unblock = state(DEVICE, EnforcementStateKind::Active, 1_795_543_390_000, None);
    assert_eq!(target.apply(&unblock).await.expect("unblock applied"), ActionOutcome::Applied);
    assert_eq!(target.apply(&unblock).await.expect("unblock repeated"), ActionOutcome::Applied);
    publish_as_device(&broker, "after").await.expect("an unblocked device publishes");
    assert_eq!(tokio::time::timeout(WAIT, received.recv()).await.expect("delivered in time").as_deref(), Some("after"));

    // Unregister: the client is gone; a repeat finds it gone and says so.
    let unregister = state(DEVICE, EnforcementStateKind::Unregistered, 1_795_600_000_000, None);
    assert_eq!(target.apply(&unregister).await.expect("unregister applied"), ActionOutcome::Applied);
    assert_eq!(target.apply(&unregister).await.expect("unregister repeated"), ActionOutcome::AlreadyApplied);
    let error = broker.ctrl(&["getClient", &device]).expect_err("the client is gone").to_string();
    assert!(error.contains("Client not found"), "{error}");
    assert_refused(publish_as_device(&broker, "after unregister").await);

    // The plugin's error answer is a refused action: no such client to block.
    let unknown = state(Uuid::from_u128(7), EnforcementStateKind::Blocked, 1, Some(2));
    match target.apply(&unknown).await {
        Err(Error::Refused { reason, action_id, .. }) => {
            assert!(reason.contains("Client not found") && reason.contains("disableClient"), "{reason}");
            assert_eq!(action_id, unknown.id());
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    observer.abort();
    session.abort();
}

#[tokio::test]
async fn a_wrong_admin_password_is_an_unavailable_target_and_never_shown() {
    let broker = Mosquitto::start().expect("mosquitto starts");
    let target = target(&broker, "wrong-password", 1_500);
    let action = state(DEVICE, EnforcementStateKind::Blocked, 1, Some(2));
    let error = target.apply(&action).await.expect_err("the broker refuses the admin");
    assert!(matches!(error, Error::Unavailable { .. }) && error.is_transient(), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("not connected to the broker") && text.contains("NotAuthorized"), "{text}");
    assert!(!text.contains("wrong-password") && !format!("{target:?}").contains("wrong-password"), "{text}");
}
