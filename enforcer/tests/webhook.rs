//! The webhook target against a local receiver (axum on 127.0.0.1:0) that answers from a script
//! and verifies every Standard Webhooks signature itself, with its own HMAC computation.
//! Backoff delays are configured to milliseconds, so retries cost no waiting worth the name.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac as _};
use meshguard_enforcer::targets::{self, TargetConfig, TargetContext};
use meshguard_enforcer::{ActionKind, ActionOutcome, EnforcementAction, EnforcementTarget, MemoryDeadLetters};
use meshguard_schemas::EnforcementStateKind;
use meshguard_schemas::output::EnforcementState;
use serde_json::{Value, json};
use sha2::Sha256;
use uuid::Uuid;

/// `whsec_` + base64 of 32 bytes, as a Standard Webhooks sender generates them.
const SECRET: &str = "whsec_dGVzdC1zZWNyZXQtb2YtdGhpcnR5LXR3by1ieXRlcyE=";

/// One delivery as the receiver saw it.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    timestamp: u64,
    body: Value,
    signature_valid: bool,
}

/// What the receiver does with one delivery.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Status(u16),
    /// Never answer: the sender's timeout must fire.
    Hang,
}

#[derive(Debug, Default)]
struct Receiver {
    script: VecDeque<Reply>,
    deliveries: Vec<Delivery>,
}

/// The receiver; stopped when dropped.
struct Server {
    url: String,
    state: Arc<Mutex<Receiver>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// A receiver answering the deliveries with `script` in order, then 200.
    async fn start(script: &[Reply]) -> Server {
        let state = Arc::new(Mutex::new(Receiver { script: script.iter().copied().collect(), deliveries: vec![] }));
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let state = shared.clone();
                async move {
                    let reply = {
                        let mut receiver = state.lock().expect("not poisoned");
                        receiver.deliveries.push(verify(&headers, &body));
                        receiver.script.pop_front().unwrap_or(Reply::Status(200))
                    };
                    match reply {
                        Reply::Status(code) => StatusCode::from_u16(code).expect("status").into_response(),
                        Reply::Hang => std::future::pending().await,
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Server { url, state, task }
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().expect("not poisoned").deliveries.clone()
    }
}

/// Verifies a delivery as a Standard Webhooks receiver does, independently of the sender's code:
/// HMAC-SHA256 over `{id}.{timestamp}.{body}` with the base64-decoded secret, compared with each
/// `v1,` signature of the header.
fn verify(headers: &HeaderMap, body: &[u8]) -> Delivery {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
    let key = BASE64.decode(SECRET.trim_start_matches("whsec_")).expect("secret is base64");
    let mut mac = <Hmac<Sha256>>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = BASE64.encode(mac.finalize().into_bytes());
    let signature_valid = header("webhook-signature").split(' ').any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
        && header("content-type") == "application/json";
    Delivery {
        id,
        timestamp: timestamp.parse().expect("webhook-timestamp is Unix seconds"),
        body: serde_json::from_slice(body).expect("the body is JSON"),
        signature_valid,
    }
}

fn target(url: &str, attempts: u32, timeout_ms: u64) -> (Box<dyn EnforcementTarget>, Arc<MemoryDeadLetters>) {
    let config: TargetConfig = toml::from_str(&format!(
        "type = \"webhook\"\nname = \"soc\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n\
         attempts = {attempts}\nbase_delay_ms = 1\nmax_delay_ms = 5\ntimeout_ms = {timeout_ms}\n"
    ))
    .expect("configuration parses");
    let sink = Arc::new(MemoryDeadLetters::new());
    let target = targets::build(&config, &TargetContext { dead_letters: sink.clone() }).expect("target builds");
    (target, sink)
}

fn block() -> EnforcementAction {
    EnforcementAction::new(EnforcementState {
        uuid: "9B2F1C3A-0D4E-4F5A-8B6C-7D8E9F0A1B2C".parse().expect("uuid"),
        state: EnforcementStateKind::Blocked,
        since: 1_795_539_790_000,
        until: Some(1_795_543_390_000),
        reason: String::from("5 unauthorized attempts in 10 minutes"),
        attempts: 5,
        findings: vec![Uuid::from_u128(0x3d8c_2b1a_7f6e_5d4c_9b3a_2f1e_0d9c_8b7a)],
    })
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs()
}

#[tokio::test]
async fn retries_503_then_delivers_with_one_id_and_valid_signatures() {
    let receiver = Server::start(&[Reply::Status(503), Reply::Status(503), Reply::Status(200)]).await;
    let (target, dead_letters) = target(&receiver.url, 5, 5_000);
    let action = block();
    let before = now_s();

    assert_eq!(target.apply(&action).await.expect("delivered"), ActionOutcome::Applied);
    let deliveries = receiver.deliveries();
    assert_eq!(deliveries.len(), 3, "{deliveries:?}");
    for delivery in &deliveries {
        assert_eq!(delivery.id, action.id().to_string(), "the same webhook-id on every retry");
        assert!(delivery.signature_valid, "{delivery:?}");
        assert!((before..=now_s()).contains(&delivery.timestamp), "the timestamp is the delivery's: {delivery:?}");
        assert_eq!(delivery.body, deliveries[0].body, "the body does not change between retries");
    }
    assert_eq!(
        deliveries[0].body,
        json!({
            "type": "meshguard.enforcement.block",
            "timestamp": "2026-11-24T17:03:10.000Z",
            "data": {
                "action_id": action.id().to_string(),
                "action": "block",
                "uuid": "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c",
                "state": "blocked",
                "since": "2026-11-24T17:03:10.000Z",
                "until": "2026-11-24T18:03:10.000Z",
                "reason": "5 unauthorized attempts in 10 minutes",
                "attempts": 5,
                "findings": ["3d8c2b1a-7f6e-5d4c-9b3a-2f1e0d9c8b7a"]
            }
        })
    );
    assert!(dead_letters.letters().is_empty());

    // Applying the same action again (a replay) sends the same id, for the receiver to drop.
    assert_eq!(target.apply(&action).await.expect("delivered again"), ActionOutcome::Applied);
    let again = receiver.deliveries();
    assert_eq!(again.len(), 4);
    assert_eq!(again[3].id, action.id().to_string());
    assert_eq!(again[3].body, deliveries[0].body);
}

#[tokio::test]
async fn exhausted_retries_go_to_the_dead_letter_sink() {
    let receiver = Server::start(&[Reply::Status(503), Reply::Status(500), Reply::Status(429)]).await;
    let (target, dead_letters) = target(&receiver.url, 3, 5_000);
    let action = block();

    assert_eq!(target.apply(&action).await.expect("dead-lettered"), ActionOutcome::DeadLettered);
    assert_eq!(receiver.deliveries().len(), 3);
    let letters = dead_letters.letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!((letter.target.as_str(), letter.action_id, letter.action, letter.attempts), ("soc", action.id(), ActionKind::Block, 3));
    assert_eq!(&letter.state, action.state());
    assert!(letter.reason.starts_with("HTTP 429"), "{}", letter.reason);
    assert!(!letter.reason.contains(&receiver.url) && !letter.reason.contains("dGVzdC1"), "{}", letter.reason);
}

#[tokio::test]
async fn a_client_error_is_not_retried() {
    let receiver = Server::start(&[Reply::Status(400)]).await;
    let (target, dead_letters) = target(&receiver.url, 5, 5_000);

    assert_eq!(target.apply(&block()).await.expect("dead-lettered"), ActionOutcome::DeadLettered);
    assert_eq!(receiver.deliveries().len(), 1, "a 400 is final");
    let letters = dead_letters.letters();
    assert_eq!((letters.len(), letters[0].attempts), (1, 1));
    assert!(letters[0].reason.starts_with("HTTP 400"), "{}", letters[0].reason);
}

#[tokio::test]
async fn a_timeout_is_retried() {
    let receiver = Server::start(&[Reply::Hang]).await;
    let (target, dead_letters) = target(&receiver.url, 2, 300);

    let started = std::time::Instant::now();
    assert_eq!(target.apply(&block()).await.expect("delivered"), ActionOutcome::Applied);
    assert_eq!(receiver.deliveries().len(), 2);
    assert!(dead_letters.letters().is_empty());
    // The hanging delivery was cut at its timeout, not waited out.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_unreachable_receiver_is_dead_lettered_with_the_cause_and_no_url() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/hook?token=abc123", listener.local_addr().expect("address"))
    };
    let (target, dead_letters) = target(&closed, 2, 1_000);
    assert_eq!(target.apply(&block()).await.expect("dead-lettered"), ActionOutcome::DeadLettered);
    let reason = &dead_letters.letters()[0].reason;
    assert!(reason.to_lowercase().contains("connect"), "{reason}");
    assert!(!reason.contains("abc123") && !reason.contains("127.0.0.1"), "{reason}");
}
