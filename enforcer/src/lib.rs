//! meshguard's enforcer: applies enforcement state to the outside world.
//!
//! The pipeline computes each UUID's enforcement state (`active`, `blocked`, `unregistered`) and
//! publishes it to the compacted `meshguard.enforcement.v1` topic. This crate turns one state
//! change into an [`EnforcementAction`] (block, unblock, unregister) with a deterministic id, and
//! applies it through enforcement targets: plug-ins behind one trait, [`EnforcementTarget`], built
//! from configuration by one registry function, [`targets::build`].
//!
//! ```text
//!  meshguard.enforcement.v1 ──► (service: dry run, ordering per UUID) ──► EnforcementAction::new(state)
//!                                                                           │ id = UUIDv5(uuid, state, since, until)
//!        ┌──────────────────────────────────┬───────────────────────────────┴──────────────┐
//!        ▼                                  ▼                                              ▼
//!  MosquittoTarget                     EmqxTarget                                     WebhookTarget
//!  MQTT $CONTROL/dynamic-security/v1   HTTP POST /api/v5/banned                       HTTP POST <url>, Standard Webhooks
//!  disableClient / enableClient /      DELETE /api/v5/banned/{as}/{who}               signature, retries with backoff
//!  deleteClient, reply by              (Basic auth: API key + secret)                 and full jitter ──► DeadLetterSink
//!  correlationData
//! ```
//!
//! Every target is idempotent on the action id: applying an action twice succeeds twice and
//! changes nothing the second time. The [`service`] module is the enforcer service that
//! `meshguard enforce` (and `meshguard run`, in-process) runs: it consumes the enforcement and
//! findings topics in its own consumer group, applies every record to every target (or only logs
//! in dry run), publishes notifications to targets and owners, writes undeliverable actions to the
//! Kafka dead-letter topic ([`service::KafkaDeadLetters`]), records every state change and target
//! call in the Parquet [`audit`] trail, and commits offsets only past records whose actions
//! completed and whose audit rows are in closed files.
//!
//! ```
//! use std::sync::Arc;
//! use meshguard_enforcer::{ActionKind, EnforcementAction, MemoryDeadLetters, targets};
//!
//! // One target from configuration (the TOML of `[[enforcer.targets]]`); building does no I/O.
//! let config: targets::TargetConfig = toml::from_str(r#"
//!     type = "webhook"
//!     name = "soc"
//!     url = "https://soc.example.com/meshguard"
//!     secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
//! "#)?;
//! let context = targets::TargetContext { dead_letters: Arc::new(MemoryDeadLetters::new()) };
//! let target = targets::build(&config, &context)?;
//! assert_eq!(target.name(), "soc");
//!
//! // One action from an enforcement-state record; its id is the same wherever it is computed.
//! let state = serde_json::from_str(r#"{"uuid":"9B2F1C3A-0D4E-4F5A-8B6C-7D8E9F0A1B2C","state":"blocked",
//!     "since":"2026-11-24T17:03:10.000Z","until":"2026-11-24T18:03:10.000Z",
//!     "reason":"5 unauthorized attempts in 10 minutes","attempts":5,"findings":[]}"#)?;
//! let action = EnforcementAction::new(state);
//! assert_eq!(action.kind(), ActionKind::Block);
//! assert_eq!(action.uuid_text(), "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c");
//! assert_eq!(action.id(), EnforcementAction::id_of(action.state()));
//! // target.apply(&action).await? would deliver it.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod action;
pub mod audit;
pub mod dead_letter;
mod error;
mod secret;
pub mod service;
pub mod targets;

pub use action::{ActionKind, ActionOutcome, EnforcementAction};
pub use audit::{AuditConfig, audit_schema};
pub use dead_letter::{DeadLetter, DeadLetterSink, MemoryDeadLetters};
pub use error::{Error, Result};
pub use secret::Secret;
pub use service::{EnforcerConfig, EnforcerService};
pub use targets::{EnforcementTarget, TargetConfig, TargetContext};
