//! Where actions go that a target could not deliver: the [`DeadLetterSink`] trait and an in-memory
//! sink for tests and single-process runs.
//!
//! This module owns the dead-letter record and the sink contract. The Kafka sink (writing to
//! `meshguard.deadletter.v1`) is the service's, [`crate::service::KafkaDeadLetters`], next to its
//! other Kafka clients. A sink must never retry the delivery itself nor drop a letter silently.

use std::sync::Mutex;

use async_trait::async_trait;
use serde::Serialize;
use uuid::Uuid;

use crate::action::{ActionKind, EnforcementAction};
use crate::error::Result;
use meshguard_schemas::output::EnforcementState;

/// An action a target gave up on, with why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// The target that gave up (its configured name).
    pub target: String,
    /// The action's deterministic id; the same action dead-lettered twice has the same id.
    pub action_id: Uuid,
    /// Block, unblock or unregister.
    pub action: ActionKind,
    /// The enforcement-state record the action comes from.
    pub state: EnforcementState,
    /// How many deliveries were tried.
    pub attempts: u32,
    /// Why the last one failed, e.g. `HTTP 503` or `timed out after 10s`. Never holds a secret.
    pub reason: String,
}

impl DeadLetter {
    /// A dead letter for `action`, given up on by `target` after `attempts` tries.
    pub fn new(target: &str, action: &EnforcementAction, attempts: u32, reason: impl Into<String>) -> DeadLetter {
        DeadLetter {
            target: target.to_owned(),
            action_id: action.id(),
            action: action.kind(),
            state: action.state().clone(),
            attempts,
            reason: reason.into(),
        }
    }
}

/// Durable storage for undeliverable actions.
///
/// Contract:
/// - [`send`](Self::send) returns `Ok` only once the letter is stored as durably as the sink
///   can (a Kafka sink: acknowledged by the broker); a target reports
///   [`ActionOutcome::DeadLettered`](crate::ActionOutcome::DeadLettered) only after that.
/// - It returns [`Error::DeadLetter`](crate::Error::DeadLetter) when it cannot store the letter;
///   the target then reports the action as failed, so the caller can repeat it.
/// - The same letter may be sent more than once (a repeated action that fails again); consumers
///   recognise repeats by `action_id`. A sink may, but need not, drop repeats.
#[async_trait]
pub trait DeadLetterSink: std::fmt::Debug + Send + Sync {
    /// The sink's name, for logs and errors.
    fn name(&self) -> &str;

    /// Stores one letter; see the trait's contract.
    async fn send(&self, letter: DeadLetter) -> Result<()>;
}

/// A sink that keeps letters in memory, in arrival order: for tests, and for runs without Kafka.
#[derive(Debug, Default)]
pub struct MemoryDeadLetters {
    letters: Mutex<Vec<DeadLetter>>,
}

impl MemoryDeadLetters {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every letter received so far, oldest first.
    pub fn letters(&self) -> Vec<DeadLetter> {
        // A poisoned lock only means another thread panicked while pushing; the Vec is intact.
        self.letters.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

#[async_trait]
impl DeadLetterSink for MemoryDeadLetters {
    fn name(&self) -> &str {
        "memory"
    }

    async fn send(&self, letter: DeadLetter) -> Result<()> {
        self.letters.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(letter);
        Ok(())
    }
}
