//! The EMQX target against a local stand-in for EMQX 5's banned-clients API (axum on
//! 127.0.0.1:0) that answers as EMQX does (`200` with the ban, `400 ALREADY_EXISTS` with the
//! existing ban, `204`, `404 NOT_FOUND`) and records every request, so the tests check the exact
//! method, path, headers and body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine as _;
use meshguard_enforcer::targets::{self, TargetConfig, TargetContext};
use meshguard_enforcer::{ActionOutcome, EnforcementAction, EnforcementTarget, Error, MemoryDeadLetters};
use meshguard_schemas::EnforcementStateKind;
use meshguard_schemas::output::EnforcementState;
use serde_json::{Value, json};
use uuid::Uuid;

const DEVICE: &str = "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
const API_KEY: &str = "meshguard-key";
const API_SECRET: &str = "s3cret-api-secret";

/// One request as the stand-in saw it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: Method,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    body: Option<Value>,
}

#[derive(Debug, Default)]
struct Emqx {
    bans: HashMap<(String, String), Value>,
    seen: Vec<Seen>,
    /// When set, every request gets this answer.
    fail_with: Option<(StatusCode, Value)>,
}

/// The stand-in server; stopped when dropped.
struct Server {
    url: String,
    state: Arc<Mutex<Emqx>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start() -> Server {
        let state = Arc::new(Mutex::new(Emqx::default()));
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = shared.clone();
            async move { answer(&mut state.lock().expect("not poisoned"), method, uri, headers, body) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Server { url, state, task }
    }

    fn seen(&self) -> Vec<Seen> {
        std::mem::take(&mut self.state.lock().expect("not poisoned").seen)
    }

    fn ban(&self, who: &str) -> Option<Value> {
        self.state.lock().expect("not poisoned").bans.get(&(String::from("clientid"), who.to_owned())).cloned()
    }

    fn fail_with(&self, status: StatusCode, body: Value) {
        self.state.lock().expect("not poisoned").fail_with = Some((status, body));
    }
}

fn error(code: &str, message: &str) -> Value {
    json!({ "code": code, "message": message })
}

/// EMQX 5's behaviour, reduced to what the target uses.
fn answer(emqx: &mut Emqx, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> axum::response::Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body_json: Option<Value> = if body.is_empty() { None } else { Some(serde_json::from_slice(&body).expect("the target sends JSON")) };
    emqx.seen.push(Seen {
        method: method.clone(),
        path: uri.path().to_owned(),
        authorization: header("authorization"),
        content_type: header("content-type"),
        body: body_json.clone(),
    });
    let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{API_KEY}:{API_SECRET}")));
    if header("authorization").as_deref() != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, axum::Json(error("BAD_API_KEY_OR_SECRET", "Check api_key/api_secret"))).into_response();
    }
    if let Some((status, body)) = &emqx.fail_with {
        return (*status, axum::Json(body.clone())).into_response();
    }
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::POST, ["api", "v5", "banned"]) => {
            let mut ban = body_json.expect("a ban");
            let key = (ban["as"].as_str().expect("as").to_owned(), ban["who"].as_str().expect("who").to_owned());
            if let Some(old) = emqx.bans.get(&key) {
                // EMQX sends the existing ban JSON-encoded in `message`.
                let message = serde_json::to_string(old).expect("encodes");
                return (StatusCode::BAD_REQUEST, axum::Json(error("ALREADY_EXISTS", &message))).into_response();
            }
            // EMQX 5's schema defaults an absent `until` to `infinity`.
            if ban.get("until").is_none() {
                ban["until"] = json!("infinity");
            }
            emqx.bans.insert(key, ban.clone());
            (StatusCode::OK, axum::Json(ban)).into_response()
        }
        (Method::DELETE, ["api", "v5", "banned", ban_as, who]) => match emqx.bans.remove(&((*ban_as).to_owned(), (*who).to_owned())) {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => (StatusCode::NOT_FOUND, axum::Json(error("NOT_FOUND", &format!("{ban_as}: {who} not found")))).into_response(),
        },
        _ => (StatusCode::NOT_FOUND, axum::Json(error("NOT_FOUND", "no such API"))).into_response(),
    }
}

fn target(url: &str, secret: &str, extra: &str) -> Box<dyn EnforcementTarget> {
    let config: TargetConfig = toml::from_str(&format!(
        "type = \"emqx\"\nurl = \"{url}\"\napi_key = \"{API_KEY}\"\napi_secret = \"{secret}\"\ntimeout_ms = 5000\n{extra}"
    ))
    .expect("configuration parses");
    targets::build(&config, &TargetContext { dead_letters: Arc::new(MemoryDeadLetters::new()) }).expect("target builds")
}

fn action(kind: EnforcementStateKind, since: i64, until: Option<i64>) -> EnforcementAction {
    EnforcementAction::new(EnforcementState {
        uuid: DEVICE.parse().expect("uuid"),
        state: kind,
        since,
        until,
        reason: String::from("5 unauthorized attempts in 10 minutes"),
        attempts: 5,
        findings: vec![Uuid::from_u128(1)],
    })
}

/// 2026-11-24T17:03:10Z and one hour later, the contract example's block.
const SINCE: i64 = 1_795_539_790_000;
const UNTIL: i64 = 1_795_543_390_000;

fn post(body: Value) -> Seen {
    Seen {
        method: Method::POST,
        path: String::from("/api/v5/banned"),
        authorization: Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{API_KEY}:{API_SECRET}")))),
        content_type: Some(String::from("application/json")),
        body: Some(body),
    }
}

fn delete(path: &str) -> Seen {
    Seen { method: Method::DELETE, content_type: None, body: None, path: path.to_owned(), ..post(Value::Null) }
}

#[tokio::test]
async fn bans_replaces_and_lifts_with_the_exact_requests() {
    let emqx = Server::start().await;
    let target = target(&emqx.url, API_SECRET, "");
    let block = action(EnforcementStateKind::Blocked, SINCE, Some(UNTIL));
    let block_body = json!({
        "as": "clientid", "who": DEVICE, "by": "meshguard",
        "reason": "5 unauthorized attempts in 10 minutes", "until": "2026-11-24T18:03:10Z"
    });

    assert_eq!(target.apply(&block).await.expect("banned"), ActionOutcome::Applied);
    assert_eq!(emqx.seen(), [post(block_body.clone())]);
    // A repeat meets EMQX's ALREADY_EXISTS with the same expiry: already applied, nothing changed.
    assert_eq!(target.apply(&block).await.expect("repeat"), ActionOutcome::AlreadyApplied);
    assert_eq!(emqx.seen(), [post(block_body.clone())]);

    // Unregistering a blocked UUID replaces the timed ban with one that never expires.
    let unregister = action(EnforcementStateKind::Unregistered, SINCE + 60_000, None);
    let unregister_body = json!({
        "as": "clientid", "who": DEVICE, "by": "meshguard", "reason": "5 unauthorized attempts in 10 minutes"
    });
    assert_eq!(target.apply(&unregister).await.expect("replaced"), ActionOutcome::Applied);
    let path = format!("/api/v5/banned/clientid/{DEVICE}");
    assert_eq!(emqx.seen(), [post(unregister_body.clone()), delete(&path), post(unregister_body.clone())]);
    assert_eq!(emqx.ban(DEVICE).expect("banned")["until"], "infinity");
    assert_eq!(target.apply(&unregister).await.expect("repeat"), ActionOutcome::AlreadyApplied);
    assert_eq!(emqx.seen(), [post(unregister_body)]);

    // Unblock deletes the ban; deleting again meets 404, which means already unbanned.
    let unblock = action(EnforcementStateKind::Active, UNTIL, None);
    assert_eq!(target.apply(&unblock).await.expect("unbanned"), ActionOutcome::Applied);
    assert_eq!(target.apply(&unblock).await.expect("repeat"), ActionOutcome::AlreadyApplied);
    assert_eq!(emqx.seen(), [delete(&path), delete(&path)]);
    assert_eq!(emqx.ban(DEVICE), None);
}

#[tokio::test]
async fn bans_by_username_when_configured() {
    let emqx = Server::start().await;
    let target = target(&emqx.url, API_SECRET, "as = \"username\"\nby = \"meshguard-eu\"\n");
    let block = action(EnforcementStateKind::Blocked, SINCE, Some(UNTIL));
    assert_eq!(target.apply(&block).await.expect("banned"), ActionOutcome::Applied);
    let unblock = action(EnforcementStateKind::Active, UNTIL, None);
    assert_eq!(target.apply(&unblock).await.expect("unbanned"), ActionOutcome::Applied);
    let seen = emqx.seen();
    assert_eq!(seen[0].body.as_ref().expect("body")["as"], "username");
    assert_eq!(seen[0].body.as_ref().expect("body")["by"], "meshguard-eu");
    assert_eq!(seen[1].path, format!("/api/v5/banned/username/{DEVICE}"));
}

#[tokio::test]
async fn error_answers_are_failed_actions() {
    let emqx = Server::start().await;
    let block = action(EnforcementStateKind::Blocked, SINCE, Some(UNTIL));

    // 5xx: failed, and worth repeating later.
    emqx.fail_with(StatusCode::SERVICE_UNAVAILABLE, error("SERVICE_UNAVAILABLE", "node is starting"));
    match target(&emqx.url, API_SECRET, "").apply(&block).await {
        Err(error @ Error::Unavailable { .. }) => {
            assert!(error.is_transient());
            assert!(error.to_string().contains("HTTP 503"), "{error}");
        }
        other => panic!("expected an unavailable target, got {other:?}"),
    }

    // 400 BAD_REQUEST (e.g. a ban that has already expired by EMQX's clock): refused.
    emqx.fail_with(StatusCode::BAD_REQUEST, error("BAD_REQUEST", "Cannot create expired banned"));
    match target(&emqx.url, API_SECRET, "").apply(&block).await {
        Err(error @ Error::Refused { .. }) => {
            assert!(!error.is_transient());
            let text = error.to_string();
            assert!(
                text.contains("HTTP 400") && text.contains("Cannot create expired banned") && text.contains(&block.id().to_string()),
                "{text}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Wrong credentials: refused, and the secret shows nowhere.
    let wrong = target(&emqx.url, "wrong-secret", "");
    let error = wrong.apply(&block).await.expect_err("unauthorized");
    let text = error.to_string();
    assert!(matches!(error, Error::Refused { .. }) && text.contains("HTTP 401"), "{text}");
    assert!(!text.contains("wrong-secret") && !format!("{wrong:?}").contains("wrong-secret"), "{text}");

    // Nobody listening: unavailable.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("address"))
    };
    let error = target(&closed, API_SECRET, "").apply(&block).await.expect_err("connection refused");
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
}
