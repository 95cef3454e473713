//! The EMQX target: EMQX 5's banned-clients REST API.
//!
//! - block → `POST /api/v5/banned` with `{"as","who","by","reason","until"}`, `until` being the
//!   state's `until` as RFC 3339 (UTC, whole seconds);
//! - unregister → the same with no `until`: EMQX 5 defaults an absent `until` to `infinity` (its
//!   API schema's default), a ban that never expires;
//! - unblock → `DELETE /api/v5/banned/{as}/{who}`.
//!
//! `who` is the UUID in lower case, banned as a client id or a username (`as`, configurable).
//! Authentication is an EMQX API key and secret as HTTP Basic credentials.
//!
//! Idempotency: EMQX answers a ban that already exists with `400 ALREADY_EXISTS` and the existing
//! ban; when that ban has the same `until`, the action was already applied; when it differs (a block
//! turned into an unregistration, or extended), the old ban is deleted and the new one created. A
//! `DELETE` answered `404 NOT_FOUND` means already unbanned. Both count as success.
//!
//! EMQX compares `until` with its own clock while `until` is event time: a replay of old states
//! may ask for a ban that has already expired, which EMQX refuses (`400 BAD_REQUEST`), reported as a
//! refusal. This module must never log the API secret or send the UUID anywhere but the
//! configured URL.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, SecondsFormat};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::http::{http_client, is_transient_status, transport_reason};
use super::{BuildTarget, EnforcementTarget, TargetContext, check_name, excerpt};
use crate::action::{ActionKind, ActionOutcome, EnforcementAction};
use crate::error::{Error, Result};
use crate::secret::Secret;

/// Configuration of an EMQX target (`type = "emqx"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmqxConfig {
    /// Name of this target in logs and metrics.
    #[serde(default = "default_name")]
    pub name: String,
    /// Base URL of the EMQX REST API (the dashboard listener), e.g. `https://emqx.internal:18083`;
    /// the target appends `/api/v5/banned`.
    pub url: String,
    /// The EMQX API key (the Basic-auth user name).
    pub api_key: String,
    /// The EMQX API key's secret (the Basic-auth password).
    pub api_secret: Secret,
    /// What the UUID is banned as: `clientid` (devices connect with their UUID as client id) or
    /// `username`.
    #[serde(rename = "as", default)]
    pub ban_as: BanAs,
    /// The `by` field of bans meshguard creates, so operators can tell them apart.
    #[serde(default = "default_by")]
    pub by: String,
    /// How long one request may take, connecting included, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// What a UUID is banned as in EMQX.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BanAs {
    /// The MQTT client id.
    #[default]
    Clientid,
    /// The MQTT user name.
    Username,
}

impl BanAs {
    fn as_str(self) -> &'static str {
        match self {
            BanAs::Clientid => "clientid",
            BanAs::Username => "username",
        }
    }
}

fn default_name() -> String {
    String::from("emqx")
}

fn default_by() -> String {
    String::from("meshguard")
}

fn default_timeout_ms() -> u64 {
    10_000
}

const BANNED_PATH: &str = "api/v5/banned";

impl BuildTarget for EmqxConfig {
    fn build(&self, _context: &TargetContext) -> Result<Box<dyn EnforcementTarget>> {
        Ok(Box::new(EmqxTarget::new(self)?))
    }
}

/// An EMQX target; see the module documentation.
pub struct EmqxTarget {
    name: String,
    banned_url: reqwest::Url,
    authorization: reqwest::header::HeaderValue,
    ban_as: BanAs,
    by: String,
    client: reqwest::Client,
}

impl std::fmt::Debug for EmqxTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmqxTarget").field("name", &self.name).field("as", &self.ban_as).finish_non_exhaustive()
    }
}

/// A ban as EMQX takes it.
#[derive(Debug, Serialize)]
struct Ban<'a> {
    #[serde(rename = "as")]
    ban_as: BanAs,
    who: &'a str,
    by: &'a str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<String>,
}

/// EMQX's error body: `{"code":"ALREADY_EXISTS","message":"..."}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    code: String,
    #[serde(default)]
    message: String,
}

impl EmqxTarget {
    /// Validates `config` and builds the target.
    pub fn new(config: &EmqxConfig) -> Result<EmqxTarget> {
        let invalid = |message: String| Error::Config { target: config.name.clone(), message };
        check_name(&config.name).map_err(invalid)?;
        let mut base = reqwest::Url::parse(&config.url).map_err(|e| invalid(format!("`url` is not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid(format!("`url` must be http:// or https://, found {}://", base.scheme())));
        }
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let banned_url = base.join(BANNED_PATH).map_err(|e| invalid(format!("`url` cannot be extended with /{BANNED_PATH}: {e}")))?;
        if config.api_key.is_empty() || config.api_key.contains(':') {
            return Err(invalid(String::from("`api_key` must be non-empty and hold no `:`")));
        }
        let credentials = BASE64.encode(format!("{}:{}", config.api_key, config.api_secret.expose()));
        let mut authorization = reqwest::header::HeaderValue::from_str(&format!("Basic {credentials}"))
            .map_err(|_| invalid(String::from("`api_key` or `api_secret` holds characters an HTTP header cannot")))?;
        // Keeps the value out of hyper's and reqwest's own Debug output.
        authorization.set_sensitive(true);
        if config.timeout_ms == 0 {
            return Err(invalid(String::from("`timeout_ms` must be at least 1")));
        }
        Ok(EmqxTarget {
            name: config.name.clone(),
            banned_url,
            authorization,
            ban_as: config.ban_as,
            by: config.by.clone(),
            client: http_client(Duration::from_millis(config.timeout_ms)).map_err(invalid)?,
        })
    }

    fn ban_url(&self, who: &str) -> reqwest::Url {
        let mut url = self.banned_url.clone();
        // `path_segments_mut` percent-encodes `who`; an http(s) URL always has path segments.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(self.ban_as.as_str()).push(who);
        }
        url
    }

    /// Sends one request; `Ok` with the status and (an excerpt-sized prefix of) the body.
    async fn request(&self, action: &EnforcementAction, method: Method, url: reqwest::Url, body: Option<&Ban<'_>>) -> Result<(StatusCode, String)> {
        let mut request = self.client.request(method, url).header(reqwest::header::AUTHORIZATION, self.authorization.clone());
        if let Some(body) = body {
            request = request.json(body);
        }
        let unavailable = |reason: String| Error::Unavailable { target: self.name.clone(), action: action.kind(), action_id: action.id(), reason };
        let response = request.send().await.map_err(|e| unavailable(transport_reason(e)))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| unavailable(transport_reason(e)))?;
        Ok((status, text))
    }

    /// The error for an answer that is neither success nor an "already" answer: 5xx, 408 and 429
    /// are transient ([`Error::Unavailable`]), the rest a refusal.
    fn failure(&self, action: &EnforcementAction, status: StatusCode, text: &str) -> Error {
        let reason = format!("HTTP {}: {}", status.as_u16(), excerpt(text.trim()));
        let (target, kind, action_id) = (self.name.clone(), action.kind(), action.id());
        if is_transient_status(status) {
            Error::Unavailable { target, action: kind, action_id, reason }
        } else {
            Error::Refused { target, action: kind, action_id, reason }
        }
    }

    async fn ban(&self, action: &EnforcementAction) -> Result<ActionOutcome> {
        let who = action.uuid_text();
        let until = match action.kind() {
            ActionKind::Unregister => None,
            _ => action.state().until,
        };
        let ban = Ban {
            ban_as: self.ban_as,
            who: &who,
            by: &self.by,
            reason: &action.state().reason,
            until: until.and_then(DateTime::from_timestamp_millis).map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        };
        let (status, text) = self.request(action, Method::POST, self.banned_url.clone(), Some(&ban)).await?;
        if status.is_success() {
            return Ok(ActionOutcome::Applied);
        }
        let existing = match already_exists(status, &text) {
            Some(existing) => existing,
            None => return Err(self.failure(action, status, &text)),
        };
        if same_until(existing.as_ref(), until) {
            return Ok(ActionOutcome::AlreadyApplied);
        }
        // A different ban is in place (another `until`): replace it. Between the two requests the
        // client is briefly not banned; EMQX has no update of a ban.
        tracing::info!(message = "Replacing an EMQX ban with another expiry.", target = %self.name, action_id = %action.id());
        self.unban(action).await?;
        let (status, text) = self.request(action, Method::POST, self.banned_url.clone(), Some(&ban)).await?;
        if status.is_success() { Ok(ActionOutcome::Applied) } else { Err(self.failure(action, status, &text)) }
    }

    async fn unban(&self, action: &EnforcementAction) -> Result<ActionOutcome> {
        let (status, text) = self.request(action, Method::DELETE, self.ban_url(&action.uuid_text()), None).await?;
        match status {
            status if status.is_success() => Ok(ActionOutcome::Applied),
            StatusCode::NOT_FOUND => Ok(ActionOutcome::AlreadyApplied),
            status => Err(self.failure(action, status, &text)),
        }
    }
}

#[async_trait]
impl EnforcementTarget for EmqxTarget {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, action: &EnforcementAction) -> Result<ActionOutcome> {
        let outcome = match action.kind() {
            ActionKind::Block | ActionKind::Unregister => self.ban(action).await,
            ActionKind::Unblock => self.unban(action).await,
        };
        tracing::debug!(message = "EMQX action done.", target = %self.name, action_id = %action.id(), action = %action.kind(), ok = outcome.is_ok());
        outcome
    }
}

/// For a `400 ALREADY_EXISTS` answer: `Some` with the existing ban EMQX sent back (JSON text in
/// `message`), or `Some(None)` when that cannot be read.
fn already_exists(status: StatusCode, text: &str) -> Option<Option<serde_json::Value>> {
    if status != StatusCode::BAD_REQUEST {
        return None;
    }
    let body: ErrorBody = serde_json::from_str(text).ok()?;
    (body.code == "ALREADY_EXISTS").then(|| serde_json::from_str(&body.message).ok())
}

/// Whether an existing ban (as EMQX formats it) ends when `until` (epoch ms, `None`: never) does,
/// to the second. An unreadable ban is taken as different, so it gets replaced.
fn same_until(existing: Option<&serde_json::Value>, until: Option<i64>) -> bool {
    let Some(existing_until) = existing.and_then(|ban| ban.get("until")) else { return false };
    match (existing_until.as_str(), until) {
        (Some("infinity"), None) => true,
        (Some(text), Some(ms)) => DateTime::parse_from_rfc3339(text).is_ok_and(|t| t.timestamp() == ms.div_euclid(1000)),
        _ => match (existing_until.as_i64(), until) {
            (Some(seconds), Some(ms)) => seconds == ms.div_euclid(1000),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_compare_to_the_second_in_any_offset() {
        let ms = 1_795_543_390_000; // 2026-11-24T18:03:10Z
        let ban = |until: serde_json::Value| serde_json::json!({ "as": "clientid", "who": "x", "until": until });
        assert!(same_until(Some(&ban("2026-11-24T18:03:10Z".into())), Some(ms)));
        assert!(same_until(Some(&ban("2026-11-24T19:03:10+01:00".into())), Some(ms + 999)));
        assert!(same_until(Some(&ban(1_795_543_390.into())), Some(ms)));
        assert!(same_until(Some(&ban("infinity".into())), None));
        assert!(!same_until(Some(&ban("infinity".into())), Some(ms)));
        assert!(!same_until(Some(&ban("2026-11-24T18:03:11Z".into())), Some(ms)));
        assert!(!same_until(Some(&ban("2026-11-24T18:03:10Z".into())), None));
        assert!(!same_until(None, None));
    }

    #[test]
    fn the_url_and_credentials_are_checked() {
        let config = |url: &str, key: &str| -> EmqxConfig {
            toml::from_str(&format!("url = {url:?}\napi_key = {key:?}\napi_secret = \"s3cret\"\n")).expect("parses")
        };
        let target = EmqxTarget::new(&config("http://127.0.0.1:18083", "key")).expect("valid");
        assert_eq!(target.banned_url.as_str(), "http://127.0.0.1:18083/api/v5/banned");
        assert_eq!(target.ban_url("a b").as_str(), "http://127.0.0.1:18083/api/v5/banned/clientid/a%20b");
        let behind_proxy = EmqxTarget::new(&config("https://ops.example.com/emqx", "key")).expect("valid");
        assert_eq!(behind_proxy.banned_url.as_str(), "https://ops.example.com/emqx/api/v5/banned");
        assert!(!format!("{target:?}").contains("s3cret"));
        for (url, key, expected) in [("ftp://x", "key", "http:// or https://"), ("http://x", "", "`api_key`"), ("http://x", "a:b", "`api_key`")] {
            let error = EmqxTarget::new(&config(url, key)).expect_err(expected).to_string();
            assert!(error.contains(expected) && !error.contains("s3cret"), "{error}");
        }
    }
}
