//! The one error type of the crate.
//!
//! An error names the target, the action and what went wrong; it never carries a secret
//! (credentials, signing keys) nor a whole request or response body, only short excerpts of what a
//! remote side answered.

use uuid::Uuid;

use crate::action::ActionKind;

/// Errors of the enforcer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A target's configuration is invalid; found when the target is built, before any action.
    #[error("invalid configuration of enforcement target `{target}`: {message}")]
    Config {
        /// The target's name.
        target: String,
        /// What is wrong, e.g. "`url` must start with http:// or https://, found \"ftp://x\"".
        message: String,
    },

    /// The target answered and refused the action (an error in a Mosquitto dynamic-security
    /// response, an HTTP status that means failure). Repeating the same action will most likely
    /// get the same answer.
    #[error("enforcement target `{target}` refused {action} {action_id}: {reason}")]
    Refused {
        /// The target's name.
        target: String,
        /// What was asked.
        action: ActionKind,
        /// The action's deterministic id.
        action_id: Uuid,
        /// What the target said, e.g. `Client not found` or `HTTP 400: {"code":"BAD_REQUEST",...}`.
        reason: String,
    },

    /// The target could not be asked or did not answer (connection refused, timeout, broker
    /// connection lost). The action may or may not have taken effect; repeating it is safe, since
    /// every action is idempotent.
    #[error("enforcement target `{target}` is unavailable for {action} {action_id}: {reason}")]
    Unavailable {
        /// The target's name.
        target: String,
        /// What was asked.
        action: ActionKind,
        /// The action's deterministic id.
        action_id: Uuid,
        /// Why, e.g. `no response within 5s`.
        reason: String,
    },

    /// The enforcer service's configuration is invalid; found at start, before anything is consumed.
    #[error("invalid configuration: `{field}` {reason}")]
    ServiceConfig {
        /// The field, e.g. `enforcer.group_id`.
        field: String,
        /// What is wrong.
        reason: String,
    },

    /// A Kafka client of the enforcer service failed (creating a client, metadata, commits).
    /// Client properties are never part of it.
    #[error("Kafka: {context}: {reason}")]
    Kafka {
        /// What the service was doing.
        context: String,
        /// The client's error.
        reason: String,
    },

    /// The service's metrics could not be registered (e.g. registered twice in one registry).
    #[error("registering the enforcer's metrics: {0}")]
    Metrics(String),

    /// The audit trail could not be written (its folder, a file, a batch). The enforcer stops
    /// rather than commit offsets past records whose audit rows are not on disk.
    #[error("audit trail: {what} {}: {reason}", path.display())]
    Audit {
        /// What was being done (`creating`, `writing`, `syncing`, `renaming`, …).
        what: &'static str,
        /// The file or folder.
        path: std::path::PathBuf,
        /// The cause.
        reason: String,
    },

    /// An action could not be delivered and could not be stored in the dead-letter sink either.
    #[error("dead-letter sink `{sink}` could not store {action_id}: {reason}")]
    DeadLetter {
        /// The sink's name.
        sink: String,
        /// The action's deterministic id.
        action_id: Uuid,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Maps a Kafka client error, with what the service was doing.
    pub(crate) fn kafka(context: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
        let context = context.into();
        move |cause| Error::Kafka { context, reason: cause.to_string() }
    }

    /// Whether repeating the action later may succeed without anything being changed: true for
    /// an unavailable target or dead-letter sink, false for a refusal or a configuration error.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::DeadLetter { .. })
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
