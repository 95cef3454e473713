//! Enforcement targets: the plug-ins that apply an enforcement action to the outside world (an MQTT
//! broker's client list, an HTTP ban list, a signed webhook), the [`EnforcementTarget`] trait they
//! implement, their configuration ([`TargetConfig`]) and the one registry that lists them all.
//!
//! This module owns *how* an action reaches a target. It must never decide *whether* to apply one
//! (dry run, expiry, ordering and retries of whole actions are the service's), never compute
//! enforcement state, and never log or return a secret.
//!
//! Adding a target: write `targets/<name>.rs` with a configuration type that implements
//! [`BuildTarget`] and a type that implements [`EnforcementTarget`], then add one line to the
//! `registry!` invocation below.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::action::{ActionOutcome, EnforcementAction};
use crate::dead_letter::DeadLetterSink;
use crate::error::Result;

/// One place enforcement actions are applied.
///
/// Contract of every implementation:
/// - **Success means in effect.** [`apply`](Self::apply) returns `Ok` only when the target now
///   reflects the action ([`ActionOutcome::Applied`] or [`ActionOutcome::AlreadyApplied`]), or
///   when the action could not be delivered and is stored in the dead-letter sink
///   ([`ActionOutcome::DeadLettered`]). Anything else is an `Err`: [`Error::Refused`] when the
///   target answered no, [`Error::Unavailable`] when it could not be asked or did not answer.
/// - **Idempotent on the action id.** Applying the same action again (same
///   [`EnforcementAction::id`]) is harmless and succeeds again: a target passes the id along where
///   the remote side can use it (webhook id, MQTT correlation data) and counts "already in that
///   state" answers (a client already disabled, a ban already there, a client already deleted) as
///   success.
/// - **No ordering of its own.** The caller applies the actions of one UUID one at a time, in the
///   order of the enforcement topic, awaiting each; actions of different UUIDs may run
///   concurrently (`&self`, `Send + Sync`).
/// - **Bounded.** `apply` returns within the target's configured timeouts and retry budget.
///   Dropping its future part-way leaves the action applied or not; repeating it is safe.
/// - **Quiet about secrets.** Neither errors nor logs hold credentials or signing keys.
///
/// [`Error::Refused`]: crate::Error::Refused
/// [`Error::Unavailable`]: crate::Error::Unavailable
#[async_trait]
pub trait EnforcementTarget: Debug + Send + Sync {
    /// The target's configured name, unique among the configured targets; used in logs, errors and
    /// metric labels.
    fn name(&self) -> &str;

    /// Applies one action; see the trait's contract.
    async fn apply(&self, action: &EnforcementAction) -> Result<ActionOutcome>;
}

/// What targets may need from the process that runs them, beyond their own configuration.
#[derive(Debug, Clone)]
pub struct TargetContext {
    /// Where targets that retry (the webhook) put actions they gave up on.
    pub dead_letters: Arc<dyn DeadLetterSink>,
}

/// Implemented by each target's configuration type: validates it and builds the target.
///
/// Building does no I/O (connections are made on first use), so a service can build every target
/// at start-up and refuse a bad configuration before consuming anything.
pub trait BuildTarget {
    /// Validates the configuration and builds the target.
    fn build(&self, context: &TargetContext) -> Result<Box<dyn EnforcementTarget>>;
}

/// Declares every target in one list: its `type` in configuration, the [`TargetConfig`] variant and
/// the module with its configuration type. Expands to the modules, the `TargetConfig` enum and the
/// [`build`] function.
macro_rules! registry {
    ($($(#[$doc:meta])* $type_name:literal => $variant:ident($module:ident::$config:ident),)+) => {
        $(pub mod $module;)+

        /// The configuration of one target, selected by its `type` field, e.g.
        /// `type = "webhook"`. Unknown fields are refused.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(tag = "type")]
        pub enum TargetConfig {
            $($(#[$doc])* #[serde(rename = $type_name)] $variant($module::$config),)+
        }

        impl TargetConfig {
            /// Every `type` a configuration may name.
            pub const TYPES: &'static [&'static str] = &[$($type_name),+];
        }

        /// The registry: builds the target a configuration describes. Every target is listed in
        /// the one `registry!` invocation of `targets/mod.rs`.
        pub fn build(config: &TargetConfig, context: &TargetContext) -> Result<Box<dyn EnforcementTarget>> {
            match config {
                $(TargetConfig::$variant(config) => config.build(context),)+
            }
        }
    };
}

mod http;

registry! {
    /// Mosquitto's dynamic-security plugin, over MQTT (`disableClient`, `enableClient`, `deleteClient`).
    "mosquitto" => Mosquitto(mosquitto::MosquittoConfig),
    /// EMQX's banned-clients HTTP API (`POST /api/v5/banned`, `DELETE /api/v5/banned/{as}/{who}`).
    "emqx" => Emqx(emqx::EmqxConfig),
    /// A signed HTTP webhook (Standard Webhooks), retried with backoff, dead-lettered at the end.
    "webhook" => Webhook(webhook::WebhookConfig),
}

/// Checks a target name: non-empty, printable, no spaces, so it works as a metric label and in logs.
pub(crate) fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(format!("`name` must be 1 to 64 characters of A-Z, a-z, 0-9, `-`, `_`, `.`, found {name:?}"));
    }
    Ok(())
}

/// A short excerpt of a remote answer for an error message: errors stay small, and a body is never
/// copied whole.
pub(crate) fn excerpt(text: &str) -> String {
    const MAX_CHARS: usize = 200;
    match text.char_indices().nth(MAX_CHARS) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_listed_and_parses() {
        assert_eq!(TargetConfig::TYPES, ["mosquitto", "emqx", "webhook"]);
        let config: TargetConfig = toml::from_str(
            r#"
            type = "mosquitto"
            username = "admin"
            password = "pw"
            "#,
        )
        .expect("a minimal mosquitto configuration parses");
        assert!(matches!(config, TargetConfig::Mosquitto(_)));
    }

    #[test]
    fn unknown_types_and_fields_are_refused() {
        let error = toml::from_str::<TargetConfig>("type = \"smtp\"").expect_err("unknown type");
        assert!(error.to_string().contains("unknown variant `smtp`"), "{error}");
        let error =
            toml::from_str::<TargetConfig>("type = \"webhook\"\nurl = \"http://127.0.0.1/\"\nsecret = \"whsec_AAAA\"\nretries = 3\n")
                .expect_err("unknown field");
        assert!(error.to_string().contains("unknown field `retries`"), "{error}");
    }

    #[test]
    fn names_are_label_safe() {
        assert!(check_name("emqx-eu.1").is_ok());
        for bad in ["", "a b", "ü", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
