//! The Mosquitto target: Mosquitto 2's dynamic-security plugin, commanded over MQTT.
//!
//! - block → `disableClient` (the plugin also disconnects the client's live sessions);
//! - unblock → `enableClient`;
//! - unregister → `deleteClient`.
//!
//! Commands are published to `$CONTROL/dynamic-security/v1` as
//! `{"commands":[{"command":"disableClient","username":"<client>","correlationData":"<action id>/<n>"}]}`;
//! the plugin answers on `$CONTROL/dynamic-security/v1/response` with the same `correlationData`
//! and, on failure, an `error` text. An answer with an `error` is a refused action.
//!
//! **Client mapping.** A UUID's dynamic-security client is the one whose user name is
//! `client_username` with `{uuid}` replaced by the UUID in lower case; by default the user name *is*
//! the UUID (`9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c`).
//!
//! **Idempotency.** The plugin answers a `disableClient` of a disabled client and an
//! `enableClient` of an enabled one with success (Mosquitto 2.0), so repeats succeed by
//! themselves; a `deleteClient` of a client that is gone answers `Client not found`, which this
//! target reports as [`ActionOutcome::AlreadyApplied`]. A `disableClient` or `enableClient` of an
//! unknown client is a refusal: the broker cannot enforce anything on a UUID it does not know.
//!
//! **Connection.** One MQTT 3.1.1 connection per target, opened on the first action and kept:
//! a background task drives it, (re)subscribes to the response topic after every connect, and
//! reconnects after `reconnect_delay_ms` when the link drops. The admin user needs the plugin's
//! `admin` role (publish to and subscribe to `$CONTROL/dynamic-security/#`), which
//! `mosquitto_ctrl dynsec init` gives it. The connection is plain TCP: point it at a listener on
//! the broker's host or a private network.
//!
//! This module must never log or return the admin password, and never send anything but these
//! three commands.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, oneshot, watch};
use tokio::time::Instant;

use super::{BuildTarget, EnforcementTarget, TargetContext, check_name, excerpt};
use crate::action::{ActionKind, ActionOutcome, EnforcementAction};
use crate::error::{Error, Result};
use crate::secret::Secret;

/// Configuration of a Mosquitto dynamic-security target (`type = "mosquitto"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MosquittoConfig {
    /// Name of this target in logs and metrics.
    #[serde(default = "default_name")]
    pub name: String,
    /// The broker's host name or IP address.
    #[serde(default = "default_host")]
    pub host: String,
    /// The broker's MQTT port (plain TCP).
    #[serde(default = "default_port")]
    pub port: u16,
    /// The dynamic-security admin's user name (the one `mosquitto_ctrl dynsec init` created).
    pub username: String,
    /// The admin's password.
    pub password: Secret,
    /// MQTT client id of the admin connection; by default `meshguard-enforcer-` and a random
    /// suffix, so two enforcers never take over each other's session.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The dynamic-security user name of a UUID: `{uuid}` is replaced by the UUID in lower case.
    #[serde(default = "default_client_username")]
    pub client_username: String,
    /// How long an action may wait for the connection and the plugin's answer, in milliseconds.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// MQTT keep-alive of the admin connection, in seconds.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Wait before reconnecting after the connection failed or dropped, in milliseconds.
    #[serde(default = "default_reconnect_delay_ms")]
    pub reconnect_delay_ms: u64,
}

fn default_name() -> String {
    String::from("mosquitto")
}

fn default_host() -> String {
    String::from("127.0.0.1")
}

/// MQTT's registered port for plain TCP.
fn default_port() -> u16 {
    1883
}

fn default_client_username() -> String {
    String::from(UUID_PLACEHOLDER)
}

fn default_response_timeout_ms() -> u64 {
    5_000
}

/// Short enough to notice a dead broker within a minute; mosquitto allows 1.5 × this before
/// dropping the connection.
fn default_keep_alive_s() -> u64 {
    30
}

fn default_reconnect_delay_ms() -> u64 {
    1_000
}

const UUID_PLACEHOLDER: &str = "{uuid}";
const COMMAND_TOPIC: &str = "$CONTROL/dynamic-security/v1";
const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// The plugin's answer to a command about a user name it does not know.
const CLIENT_NOT_FOUND: &str = "Client not found";

impl BuildTarget for MosquittoConfig {
    fn build(&self, _context: &TargetContext) -> Result<Box<dyn EnforcementTarget>> {
        Ok(Box::new(MosquittoTarget::new(self)?))
    }
}

/// A Mosquitto dynamic-security target; see the module documentation.
pub struct MosquittoTarget {
    name: String,
    client_username: String,
    response_timeout: Duration,
    reconnect_delay: Duration,
    // Holds the admin password: never printed (see the Debug impl).
    options: MqttOptions,
    connection: OnceCell<Connection>,
    // Makes each request's correlation data unique even when one action is applied concurrently.
    sequence: AtomicU64,
}

impl std::fmt::Debug for MosquittoTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (host, port) = self.options.broker_address();
        f.debug_struct("MosquittoTarget")
            .field("name", &self.name)
            .field("broker", &format_args!("{host}:{port}"))
            .field("client_username", &self.client_username)
            .finish_non_exhaustive()
    }
}

/// Requests waiting for their answer, by correlation data.
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<CommandResponse>>>>;

/// The live admin connection; dropping it stops its task and closes the connection.
struct Connection {
    client: AsyncClient,
    pending: Pending,
    link: watch::Receiver<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The state of the admin connection.
#[derive(Debug, Clone, PartialEq)]
enum Link {
    Connecting,
    /// Connected and subscribed to the response topic: commands may be sent.
    Ready,
    /// Not connected; why (no secret: rumqttc's connection errors hold none).
    Down(String),
}

/// One command as the plugin takes it.
#[derive(Serialize)]
struct Commands<'a> {
    commands: [Command<'a>; 1],
}

#[derive(Serialize)]
struct Command<'a> {
    command: &'static str,
    username: &'a str,
    #[serde(rename = "correlationData")]
    correlation_data: &'a str,
}

/// The plugin's answer: `{"responses":[{"command":..,"error":..,"correlationData":..}]}`.
#[derive(Debug, Deserialize)]
struct Responses {
    responses: Vec<CommandResponse>,
}

#[derive(Debug, Deserialize)]
struct CommandResponse {
    command: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(rename = "correlationData", default)]
    correlation_data: Option<String>,
}

impl MosquittoTarget {
    /// Validates `config` and builds the target; connects on the first action.
    pub fn new(config: &MosquittoConfig) -> Result<MosquittoTarget> {
        let invalid = |message: String| Error::Config { target: config.name.clone(), message };
        check_name(&config.name).map_err(invalid)?;
        if config.host.is_empty() {
            return Err(invalid(String::from("`host` must not be empty")));
        }
        if config.username.is_empty() {
            return Err(invalid(String::from("`username` (the dynamic-security admin) must not be empty")));
        }
        if !config.client_username.contains(UUID_PLACEHOLDER) {
            return Err(invalid(format!("`client_username` must contain `{UUID_PLACEHOLDER}`, found {:?}", config.client_username)));
        }
        if config.response_timeout_ms == 0 || config.keep_alive_s == 0 {
            return Err(invalid(String::from("`response_timeout_ms` and `keep_alive_s` must be at least 1")));
        }
        let client_id = match &config.client_id {
            Some(id) if !id.is_empty() => id.clone(),
            Some(_) => return Err(invalid(String::from("`client_id` must not be empty"))),
            // std's RandomState is seeded from the OS per process: a unique enough suffix.
            None => format!("meshguard-enforcer-{:08x}", std::collections::hash_map::RandomState::new().hash_one(&config.name) as u32),
        };
        let mut options = MqttOptions::new(client_id, config.host.clone(), config.port);
        options.set_credentials(config.username.clone(), config.password.expose().to_owned());
        options.set_keep_alive(Duration::from_secs(config.keep_alive_s));
        // Nothing to resume: a request whose answer was lost fails by timeout and is repeated.
        options.set_clean_session(true);
        Ok(MosquittoTarget {
            name: config.name.clone(),
            client_username: config.client_username.clone(),
            response_timeout: Duration::from_millis(config.response_timeout_ms),
            reconnect_delay: Duration::from_millis(config.reconnect_delay_ms),
            options,
            connection: OnceCell::new(),
            sequence: AtomicU64::new(0),
        })
    }

    /// The dynamic-security user name of the action's UUID.
    pub fn username_of(&self, action: &EnforcementAction) -> String {
        self.client_username.replace(UUID_PLACEHOLDER, &action.uuid_text())
    }

    fn connect(&self) -> Connection {
        // Room for a burst of concurrent actions; the event loop drains it continuously.
        let (client, eventloop) = AsyncClient::new(self.options.clone(), 64);
        let pending = Pending::default();
        let (link_tx, link) = watch::channel(Link::Connecting);
        let task = tokio::spawn(drive(eventloop, client.clone(), pending.clone(), link_tx, self.reconnect_delay, self.name.clone()));
        Connection { client, pending, link, task }
    }

    /// Sends one command and waits for its answer until `deadline`.
    async fn command(&self, action: &EnforcementAction, command: &'static str, deadline: Instant) -> Result<CommandResponse> {
        let unavailable = |reason: String| Error::Unavailable { target: self.name.clone(), action: action.kind(), action_id: action.id(), reason };
        let connection = self.connection.get_or_init(|| async { self.connect() }).await;

        let mut link = connection.link.clone();
        if tokio::time::timeout_at(deadline, link.wait_for(|l| *l == Link::Ready)).await.is_err() {
            let reason = match &*connection.link.borrow() {
                Link::Down(why) => format!("not connected to the broker: {why}"),
                _ => format!("not connected to the broker within {:?}", self.response_timeout),
            };
            return Err(unavailable(reason));
        }

        let correlation = format!("{}/{}", action.id(), self.sequence.fetch_add(1, Ordering::Relaxed));
        let (answer_tx, answer) = oneshot::channel();
        let _waiting = PendingGuard::insert(&connection.pending, correlation.clone(), answer_tx);
        let username = self.username_of(action);
        let payload = serde_json::to_vec(&Commands { commands: [Command { command, username: &username, correlation_data: &correlation }] })
            .map_err(|e| unavailable(format!("cannot encode the command: {e}")))?;
        connection
            .client
            .publish(COMMAND_TOPIC, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| unavailable(format!("cannot queue the command: {e}")))?;
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(unavailable(String::from("the broker connection dropped before the answer"))),
            Err(_) => Err(unavailable(format!("no answer from the dynamic-security plugin within {:?}", self.response_timeout))),
        }
    }
}

#[async_trait]
impl EnforcementTarget for MosquittoTarget {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, action: &EnforcementAction) -> Result<ActionOutcome> {
        let command = match action.kind() {
            ActionKind::Block => "disableClient",
            ActionKind::Unblock => "enableClient",
            ActionKind::Unregister => "deleteClient",
        };
        let deadline = Instant::now() + self.response_timeout;
        let response = self.command(action, command, deadline).await?;
        let outcome = match response.error.as_deref() {
            None => Ok(ActionOutcome::Applied),
            Some(CLIENT_NOT_FOUND) if action.kind() == ActionKind::Unregister => Ok(ActionOutcome::AlreadyApplied),
            Some(error) => Err(Error::Refused {
                target: self.name.clone(),
                action: action.kind(),
                action_id: action.id(),
                reason: format!("{command} {}: {}", self.username_of(action), excerpt(error)),
            }),
        };
        tracing::debug!(message = "Dynamic-security command answered.", target = %self.name, action_id = %action.id(), command, error = ?response.error);
        outcome
    }
}

/// Removes a pending request when its waiter ends, answered or not (timeout, cancellation).
struct PendingGuard<'a> {
    pending: &'a Pending,
    key: String,
}

impl<'a> PendingGuard<'a> {
    fn insert(pending: &'a Pending, key: String, sender: oneshot::Sender<CommandResponse>) -> PendingGuard<'a> {
        lock(pending).insert(key.clone(), sender);
        PendingGuard { pending, key }
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.key);
    }
}

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<CommandResponse>>> {
    // A poisoned map only means a panic elsewhere while holding it; the map itself is intact.
    pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Drives the admin connection until the target is dropped: subscribes to the response topic on
/// every (re)connect, hands each answer to its waiter, and reconnects after failures.
async fn drive(mut eventloop: EventLoop, client: AsyncClient, pending: Pending, link: watch::Sender<Link>, reconnect_delay: Duration, name: String) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Clean session: the subscription is gone after every new connection. `try_`: this
                // task is the one that drains the request queue, so it must not wait on it.
                if let Err(error) = client.try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce) {
                    link.send_replace(Link::Down(format!("cannot subscribe to {RESPONSE_TOPIC}: {error}")));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.iter().all(|code| matches!(code, SubscribeReasonCode::Success(_))) {
                    tracing::info!(message = "Connected to the dynamic-security plugin.", target = %name);
                    link.send_replace(Link::Ready);
                } else {
                    let why = format!("the broker refused the subscription to {RESPONSE_TOPIC}: does the admin user have the dynamic-security admin role?");
                    tracing::warn!(message = "Dynamic-security responses unavailable.", target = %name, %why);
                    link.send_replace(Link::Down(why));
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == RESPONSE_TOPIC => dispatch(&publish.payload, &pending, &name),
            Ok(_) => {}
            Err(error) => {
                let why = error.to_string();
                tracing::warn!(message = "Dynamic-security connection failed; reconnecting.", target = %name, error = %why, delay_ms = reconnect_delay.as_millis() as u64);
                link.send_replace(Link::Down(why));
                // Answers to what was sent on the lost connection will not come: fail the waiters
                // now rather than at their timeout.
                lock(&pending).clear();
                tokio::time::sleep(reconnect_delay).await;
            }
        }
    }
}

/// Hands each response of one answer message to the request with its correlation data.
fn dispatch(payload: &[u8], pending: &Pending, name: &str) {
    let responses = match serde_json::from_slice::<Responses>(payload) {
        Ok(answer) => answer.responses,
        Err(error) => {
            tracing::warn!(message = "Unreadable dynamic-security answer.", target = %name, %error, payload = %excerpt(&String::from_utf8_lossy(payload)));
            return;
        }
    };
    for response in responses {
        let waiter = response.correlation_data.as_ref().and_then(|key| lock(pending).remove(key));
        match waiter {
            // The waiter may have timed out just now; then nobody needs the answer.
            Some(waiter) => drop(waiter.send(response)),
            // Another admin's command, or an error the plugin could not correlate.
            None => tracing::debug!(message = "Uncorrelated dynamic-security answer.", target = %name, command = %response.command, error = ?response.error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> MosquittoConfig {
        toml::from_str(&format!("username = \"admin\"\npassword = \"s3cret\"\n{extra}")).expect("parses")
    }

    #[test]
    fn defaults_and_the_username_mapping() {
        let target = MosquittoTarget::new(&config("")).expect("valid");
        let action = crate::action::test_support::blocked_action();
        assert_eq!(target.username_of(&action), "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c");
        assert_eq!(target.options.broker_address(), (String::from("127.0.0.1"), 1883));
        assert!(target.options.client_id().starts_with("meshguard-enforcer-"));
        let prefixed = MosquittoTarget::new(&config("client_username = \"dev-{uuid}\"")).expect("valid");
        assert_eq!(prefixed.username_of(&action), "dev-9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c");
    }

    #[test]
    fn the_password_never_shows() {
        let config = config("");
        assert!(!format!("{config:?}").contains("s3cret"));
        let target = MosquittoTarget::new(&config).expect("valid");
        assert!(!format!("{target:?}").contains("s3cret"));
        let error = MosquittoTarget::new(&self::config("client_username = \"fixed\"")).expect_err("no placeholder").to_string();
        assert!(error.contains("`client_username` must contain `{uuid}`") && !error.contains("s3cret"), "{error}");
    }

    #[test]
    fn answers_reach_their_waiter_only() {
        let pending = Pending::default();
        let (tx, mut rx) = oneshot::channel();
        lock(&pending).insert(String::from("a/1"), tx);
        dispatch(br#"{"responses":[{"command":"deleteClient","error":"Client not found","correlationData":"other"}]}"#, &pending, "t");
        assert!(rx.try_recv().is_err());
        dispatch(br#"{"responses":[{"command":"deleteClient","error":"Client not found","correlationData":"a/1"}]}"#, &pending, "t");
        let response = rx.try_recv().expect("answered");
        assert_eq!(response.error.as_deref(), Some(CLIENT_NOT_FOUND));
        assert!(lock(&pending).is_empty());
        dispatch(b"not json", &pending, "t");
    }
}
