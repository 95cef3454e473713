//! The webhook target: POSTs each action as JSON to a URL, signed as
//! [Standard Webhooks](https://www.standardwebhooks.com/) specify, retries with exponential
//! backoff and full jitter, and hands what it could not deliver to the dead-letter sink.
//!
//! This module owns the body, the signature headers and the retry policy. It must never log the
//! URL (it often carries a token), the secret, or the body, and never retry a delivery the
//! receiver refused for good (a 4xx other than 408 and 429).
//!
//! Each delivery carries:
//! - `webhook-id`: the action's deterministic id, the same on every retry and every replay, so the
//!   receiver can drop repeats;
//! - `webhook-timestamp`: when this delivery was made, in Unix seconds;
//! - `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`, keyed with
//!   the base64-decoded part of the `whsec_` secret.
//!
//! The body (identical on every delivery of one action):
//!
//! ```json
//! {"type":"meshguard.enforcement.block","timestamp":"2026-11-24T17:03:10.000Z",
//!  "data":{"action_id":"…","action":"block","uuid":"9b2f1c3a-…","state":"blocked",
//!          "since":"2026-11-24T17:03:10.000Z","until":"2026-11-24T18:03:10.000Z",
//!          "reason":"5 unauthorized attempts in 10 minutes","attempts":5,"findings":["…"]}}
//! ```
//!
//! `data` is the enforcement-state record of `meshguard.enforcement.v1` plus `action_id` and
//! `action`; `timestamp` is the state's `since` (when the change happened, in event time).

use std::hash::BuildHasher as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac as _};
use meshguard_schemas::output::EnforcementState;
use meshguard_schemas::time::format_ms;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use super::http::{http_client, is_transient_status, transport_reason};
use super::{BuildTarget, EnforcementTarget, TargetContext, check_name, excerpt};
use crate::action::{ActionKind, ActionOutcome, EnforcementAction};
use crate::dead_letter::{DeadLetter, DeadLetterSink};
use crate::error::{Error, Result};
use crate::secret::Secret;

/// Configuration of a webhook target (`type = "webhook"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Name of this target in logs and metrics.
    #[serde(default = "default_name")]
    pub name: String,
    /// Where to POST, `http://` or `https://`. Never logged: such URLs often carry a token.
    pub url: String,
    /// The signing secret, `whsec_` followed by the base64 of the key (24 to 64 random bytes, as
    /// the Standard Webhooks specification asks).
    pub secret: Secret,
    /// Deliveries per action, the first one included. At least 1.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Backoff before the second delivery, in milliseconds; it doubles for each later one.
    #[serde(default = "default_base_delay_ms")]
    pub base_delay_ms: u64,
    /// Longest backoff, in milliseconds; a `Retry-After` asking for longer ends the retries.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// How long one delivery may take, connecting and reading the answer included, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_name() -> String {
    String::from("webhook")
}

/// Five deliveries over about half a minute with the default delays: rides out a receiver's
/// restart without holding one UUID's actions back for long.
fn default_attempts() -> u32 {
    5
}

fn default_base_delay_ms() -> u64 {
    500
}

fn default_max_delay_ms() -> u64 {
    30_000
}

/// Standard Webhooks receivers are expected to answer quickly (15 s is the usual sender limit).
fn default_timeout_ms() -> u64 {
    10_000
}

/// Prefix of Standard Webhooks secrets.
const SECRET_PREFIX: &str = "whsec_";

impl BuildTarget for WebhookConfig {
    fn build(&self, context: &TargetContext) -> Result<Box<dyn EnforcementTarget>> {
        Ok(Box::new(WebhookTarget::new(self, context.dead_letters.clone())?))
    }
}

/// A webhook target; see the module documentation.
pub struct WebhookTarget {
    name: String,
    url: reqwest::Url,
    key: Vec<u8>,
    client: reqwest::Client,
    retry: RetryPolicy,
    dead_letters: Arc<dyn DeadLetterSink>,
    sleeper: Arc<dyn Sleeper>,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the URL nor the key.
        f.debug_struct("WebhookTarget").field("name", &self.name).field("retry", &self.retry).finish_non_exhaustive()
    }
}

impl WebhookTarget {
    /// Validates `config` and builds the target; undeliverable actions go to `dead_letters`.
    pub fn new(config: &WebhookConfig, dead_letters: Arc<dyn DeadLetterSink>) -> Result<WebhookTarget> {
        let invalid = |message: String| Error::Config { target: config.name.clone(), message };
        check_name(&config.name).map_err(invalid)?;
        let url = reqwest::Url::parse(&config.url).map_err(|e| invalid(format!("`url` is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!("`url` must be http:// or https://, found {}://", url.scheme())));
        }
        let key = decode_secret(config.secret.expose()).map_err(invalid)?;
        if config.attempts == 0 {
            return Err(invalid(String::from("`attempts` must be at least 1")));
        }
        if config.timeout_ms == 0 {
            return Err(invalid(String::from("`timeout_ms` must be at least 1")));
        }
        if config.base_delay_ms > config.max_delay_ms {
            return Err(invalid(format!(
                "`base_delay_ms` ({}) must not exceed `max_delay_ms` ({})",
                config.base_delay_ms, config.max_delay_ms
            )));
        }
        let client = http_client(Duration::from_millis(config.timeout_ms)).map_err(invalid)?;
        Ok(WebhookTarget {
            name: config.name.clone(),
            url,
            key,
            client,
            retry: RetryPolicy::new(config),
            dead_letters,
            sleeper: Arc::new(TokioSleeper),
        })
    }

    /// One delivery: POST, and what came of it.
    async fn deliver(&self, id: &str, body: &[u8]) -> Delivery {
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signature = sign(&self.key, id, timestamp, body);
        let response = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_vec())
            .send()
            .await;
        match response {
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    return Delivery::Delivered;
                }
                let retry_after = retry_after(response.headers(), SystemTime::now());
                let text = response.text().await.unwrap_or_default();
                let reason = format!("HTTP {}: {}", status.as_u16(), excerpt(text.trim()));
                if is_transient_status(status) { Delivery::Retry { reason, retry_after } } else { Delivery::Refused(reason) }
            }
            Err(error) => Delivery::Retry { reason: transport_reason(error), retry_after: None },
        }
    }

    async fn dead_letter(&self, action: &EnforcementAction, attempts: u32, reason: String) -> Result<ActionOutcome> {
        tracing::warn!(
            message = "Webhook delivery given up; dead-lettering the action.",
            target = %self.name, action_id = %action.id(), action = %action.kind(), attempts, %reason
        );
        self.dead_letters.send(DeadLetter::new(&self.name, action, attempts, reason)).await?;
        Ok(ActionOutcome::DeadLettered)
    }
}

#[async_trait]
impl EnforcementTarget for WebhookTarget {
    fn name(&self) -> &str {
        &self.name
    }

    /// Delivers the action, retrying as configured. A 2xx answer is [`ActionOutcome::Applied`];
    /// a refusal (4xx other than 408 and 429, or a redirect) and running out of attempts are
    /// dead-lettered ([`ActionOutcome::DeadLettered`]); only a failing dead-letter sink is an
    /// error. A receiver cannot say "already applied": it deduplicates on `webhook-id`.
    async fn apply(&self, action: &EnforcementAction) -> Result<ActionOutcome> {
        let id = action.id().to_string();
        let body = serde_json::to_vec(&Body::new(action)).map_err(|e| Error::Refused {
            target: self.name.clone(),
            action: action.kind(),
            action_id: action.id(),
            reason: format!("cannot encode the body: {e}"),
        })?;
        let mut attempt = 1;
        loop {
            let (reason, retry_after) = match self.deliver(&id, &body).await {
                Delivery::Delivered => {
                    tracing::debug!(message = "Webhook delivered.", target = %self.name, action_id = %id, attempt);
                    return Ok(ActionOutcome::Applied);
                }
                Delivery::Refused(reason) => return self.dead_letter(action, attempt, reason).await,
                Delivery::Retry { reason, retry_after } => (reason, retry_after),
            };
            if attempt >= self.retry.attempts {
                return self.dead_letter(action, attempt, reason).await;
            }
            let delay = match self.retry.delay(attempt, retry_after) {
                Ok(delay) => delay,
                Err(wait) => {
                    let reason = format!("{reason}; Retry-After asks for {}s, more than max_delay_ms", wait.as_secs());
                    return self.dead_letter(action, attempt, reason).await;
                }
            };
            tracing::warn!(
                message = "Webhook delivery failed; retrying.",
                target = %self.name, action_id = %id, attempt, %reason, delay_ms = delay.as_millis() as u64
            );
            self.sleeper.sleep(delay).await;
            attempt += 1;
        }
    }
}

/// The body of a delivery; see the module documentation.
#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    event_type: String,
    timestamp: String,
    data: BodyData<'a>,
}

#[derive(Serialize)]
struct BodyData<'a> {
    action_id: Uuid,
    action: ActionKind,
    #[serde(flatten)]
    state: &'a EnforcementState,
}

impl<'a> Body<'a> {
    fn new(action: &'a EnforcementAction) -> Body<'a> {
        Body {
            event_type: format!("meshguard.enforcement.{}", action.kind()),
            timestamp: format_ms(action.state().since),
            data: BodyData { action_id: action.id(), action: action.kind(), state: action.state() },
        }
    }
}

/// What one delivery came to.
enum Delivery {
    Delivered,
    /// Refused for good: retrying cannot help.
    Refused(String),
    /// Failed in a way a later delivery may not: 5xx, 408, 429, timeout, connection failure.
    Retry { reason: String, retry_after: Option<Duration> },
}

/// The key of a `whsec_` secret. The message never shows the secret.
fn decode_secret(secret: &str) -> std::result::Result<Vec<u8>, String> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| format!("`secret` must start with `{SECRET_PREFIX}` followed by base64 (Standard Webhooks)"))?;
    let key = BASE64.decode(encoded).map_err(|_| String::from("`secret` after `whsec_` is not valid base64"))?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!("`secret` must hold a key of 24 to 64 bytes, found {} bytes", key.len()));
    }
    Ok(key)
}

/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256>>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// `Retry-After` as delta-seconds or an HTTP date (a date in the past is zero).
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(date.timestamp()).ok()?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And
/// Jitter"): before delivery `n + 1`, wait a uniformly random time in
/// `[0, min(max_delay, base_delay * 2^(n-1))]`, so many enforcers retrying against one receiver
/// spread out instead of arriving together.
#[derive(Debug)]
struct RetryPolicy {
    attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
    rng: Mutex<SmallRng>,
}

impl RetryPolicy {
    fn new(config: &WebhookConfig) -> RetryPolicy {
        // std's RandomState is seeded from the OS per process: enough for jitter, no extra crate.
        let seed = std::collections::hash_map::RandomState::new().hash_one(config.name.as_str());
        Self::with_seed(config, seed)
    }

    fn with_seed(config: &WebhookConfig, seed: u64) -> RetryPolicy {
        RetryPolicy {
            attempts: config.attempts,
            base_delay: Duration::from_millis(config.base_delay_ms),
            max_delay: Duration::from_millis(config.max_delay_ms),
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
        }
    }

    /// The wait after failed delivery number `attempt` (1-based). The receiver's `Retry-After`
    /// wins over the backoff; one longer than `max_delay` is `Err` with it: the caller gives up
    /// rather than call earlier than asked or hold the UUID's next actions for that long.
    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> std::result::Result<Duration, Duration> {
        if let Some(wait) = retry_after {
            return if wait <= self.max_delay { Ok(wait) } else { Err(wait) };
        }
        let exponent = attempt.saturating_sub(1).min(31);
        let cap = self.base_delay.saturating_mul(1 << exponent).min(self.max_delay);
        let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        let mut rng = self.rng.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(Duration::from_millis(rng.random_range(0..=cap_ms)))
    }
}

/// Waits between deliveries; tests substitute one that records the waits instead.
trait Sleeper: Send + Sync {
    fn sleep(&self, delay: Duration) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, delay: Duration) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WebhookConfig {
        toml::from_str(
            r#"
            url = "http://127.0.0.1:9/hook"
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            "#,
        )
        .expect("minimal configuration")
    }

    /// The test vector every Standard Webhooks library checks against.
    #[test]
    fn signs_like_the_specification() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid secret");
        let signature = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn bad_secrets_are_refused_without_showing_them() {
        for (secret, expected) in [
            ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with `whsec_`"),
            ("whsec_not base64!", "not valid base64"),
            ("whsec_c2hvcnQ=", "found 5 bytes"),
        ] {
            let message = decode_secret(secret).expect_err(secret);
            assert!(message.contains(expected), "{secret}: {message}");
            assert!(!message.contains(secret.trim_start_matches("whsec_")), "{message}");
        }
    }

    #[test]
    fn defaults_and_validation() {
        let config = config();
        assert_eq!((config.name.as_str(), config.attempts, config.base_delay_ms, config.max_delay_ms, config.timeout_ms), ("webhook", 5, 500, 30_000, 10_000));
        let sink: Arc<dyn DeadLetterSink> = Arc::new(crate::MemoryDeadLetters::new());
        let target = WebhookTarget::new(&config, sink.clone()).expect("valid");
        let shown = format!("{target:?}");
        assert!(!shown.contains("MfKQ") && !shown.contains("9/hook"), "{shown}");

        for (change, expected) in [
            (&(|c: &mut WebhookConfig| c.url = String::from("ftp://127.0.0.1/")) as &dyn Fn(&mut WebhookConfig), "http:// or https://"),
            (&|c: &mut WebhookConfig| c.attempts = 0, "`attempts` must be at least 1"),
            (&|c: &mut WebhookConfig| c.base_delay_ms = 60_000, "must not exceed `max_delay_ms`"),
            (&|c: &mut WebhookConfig| c.name = String::from("my hook"), "`name`"),
        ] {
            let mut bad = self::config();
            change(&mut bad);
            let error = WebhookTarget::new(&bad, sink.clone()).expect_err(expected).to_string();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        let mut config = config();
        config.base_delay_ms = 100;
        config.max_delay_ms = 1_000;
        let policy = RetryPolicy::with_seed(&config, 7);
        for attempt in 1..=8u32 {
            let cap = Duration::from_millis((100u64 << (attempt - 1)).min(1_000));
            let delays: Vec<Duration> = (0..200).map(|_| policy.delay(attempt, None).expect("no Retry-After")).collect();
            assert!(delays.iter().all(|d| *d <= cap), "attempt {attempt}: {delays:?}");
            // Full jitter: the waits spread over the whole range, not around the cap.
            assert!(delays.iter().any(|d| *d < cap / 4) && delays.iter().any(|d| *d > cap * 3 / 4), "attempt {attempt}");
        }
        assert_eq!(policy.delay(1, Some(Duration::from_secs(1))), Ok(Duration::from_secs(1)));
        assert_eq!(policy.delay(1, Some(Duration::from_secs(2))), Err(Duration::from_secs(2)));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        let header = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, value.parse().expect("header value"));
            headers
        };
        assert_eq!(retry_after(&header("120"), now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(&header("Wed, 21 Oct 2015 07:28:30 GMT"), now), Some(Duration::from_secs(30)));
        assert_eq!(retry_after(&header("Wed, 21 Oct 2015 07:00:00 GMT"), now), Some(Duration::ZERO));
        assert_eq!(retry_after(&header("soon"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    /// A sleeper that records each wait and returns at once.
    #[derive(Default)]
    struct RecordingSleeper(Mutex<Vec<Duration>>);

    impl Sleeper for RecordingSleeper {
        fn sleep(&self, delay: Duration) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            self.0.lock().expect("not poisoned").push(delay);
            Box::pin(std::future::ready(()))
        }
    }

    /// A 429 with `Retry-After: 7` makes the target wait exactly 7 s (recorded, not slept) instead
    /// of its 1 ms backoff, then deliver again.
    #[tokio::test]
    async fn retry_after_is_honoured() {
        use axum::response::IntoResponse as _;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let call = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    match call {
                        0 => (axum::http::StatusCode::TOO_MANY_REQUESTS, [("retry-after", "7")]).into_response(),
                        _ => axum::http::StatusCode::OK.into_response(),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let mut config = config();
        config.url = format!("http://{addr}/hook");
        config.base_delay_ms = 1;
        config.max_delay_ms = 10_000;
        let sink = Arc::new(crate::MemoryDeadLetters::new());
        let sleeper = Arc::new(RecordingSleeper::default());
        let mut target = WebhookTarget::new(&config, sink.clone()).expect("valid");
        target.sleeper = sleeper.clone();
        let action = crate::action::test_support::blocked_action();
        assert_eq!(target.apply(&action).await.expect("delivered"), ActionOutcome::Applied);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(*sleeper.0.lock().expect("not poisoned"), [Duration::from_secs(7)]);
        assert!(sink.letters().is_empty());
        server.abort();
    }
}
