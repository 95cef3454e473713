//! Enforcement actions: what the outside world must do about one enforcement-state change, with
//! the deterministic id every target uses to make repeated application harmless.
//!
//! This module owns the mapping from an [`EnforcementState`] record to an action and the action id.
//! It must never decide *whether* a state is applied (dry run, ordering, expiry are the service's
//! business) nor talk to anything.

use std::fmt;

use meshguard_schemas::EnforcementStateKind;
use meshguard_schemas::output::{EnforcementState, ID_NAMESPACE};
use serde::Serialize;
use uuid::Uuid;

/// What a target is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// The UUID became `blocked`: refuse its connections and messages until unblocked (or `until`).
    Block,
    /// The UUID is `active` again (a block expired or was lifted): undo [`ActionKind::Block`].
    Unblock,
    /// The UUID became `unregistered`: remove or permanently refuse it.
    Unregister,
}

impl ActionKind {
    /// The action for a state: `blocked` → block, `active` → unblock, `unregistered` → unregister.
    pub fn for_state(state: EnforcementStateKind) -> ActionKind {
        match state {
            EnforcementStateKind::Active => ActionKind::Unblock,
            EnforcementStateKind::Blocked => ActionKind::Block,
            EnforcementStateKind::Unregistered => ActionKind::Unregister,
        }
    }

    /// The name used in webhook bodies, logs and metric labels: `block`, `unblock`, `unregister`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ActionKind::Block => "block",
            ActionKind::Unblock => "unblock",
            ActionKind::Unregister => "unregister",
        }
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One enforcement-state change to apply to the outside world.
///
/// Built from the [`EnforcementState`] record that the pipeline published; its [`id`](Self::id) is
/// UUIDv5 (in meshguard's [`ID_NAMESPACE`]) of the UUID, the state, `since` and `until`, so the same
/// state change always gives the same id, on every replay and on every worker. A new `until` for
/// the same block (an extension) is a new change with a new id.
#[derive(Debug, Clone, PartialEq)]
pub struct EnforcementAction {
    id: Uuid,
    kind: ActionKind,
    state: EnforcementState,
}

/// Prefix of the UUIDv5 name of an action id: keeps these ids apart from every other id meshguard
/// derives in the same namespace (findings, notifications).
const ACTION_ID_DOMAIN: &[u8] = b"meshguard.enforcement-action.v1";

impl EnforcementAction {
    /// The action for an enforcement-state record. The UUID is taken in lower case, as the
    /// contract writes it.
    pub fn new(state: EnforcementState) -> EnforcementAction {
        let kind = ActionKind::for_state(state.state);
        EnforcementAction { id: Self::id_of(&state), kind, state }
    }

    /// The deterministic id of the change `state` describes.
    pub fn id_of(state: &EnforcementState) -> Uuid {
        let mut name = Vec::with_capacity(ACTION_ID_DOMAIN.len() + 16 + 1 + 8 + 9);
        name.extend_from_slice(ACTION_ID_DOMAIN);
        name.extend_from_slice(state.uuid.as_bytes());
        name.push(state.state.code());
        name.extend_from_slice(&state.since.to_be_bytes());
        match state.until {
            Some(until) => {
                name.push(1);
                name.extend_from_slice(&until.to_be_bytes());
            }
            None => name.push(0),
        }
        Uuid::new_v5(&ID_NAMESPACE, &name)
    }

    /// The deterministic action id: every target passes it on (MQTT correlation data, webhook id)
    /// and treats a repeat of it as already done.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Block, unblock or unregister.
    pub fn kind(&self) -> ActionKind {
        self.kind
    }

    /// The enforcement-state record the action comes from.
    pub fn state(&self) -> &EnforcementState {
        &self.state
    }

    /// The UUID the action is about.
    pub fn uuid(&self) -> Uuid {
        self.state.uuid
    }

    /// The UUID in the contract's text form: lower case, hyphenated.
    pub fn uuid_text(&self) -> String {
        self.state.uuid.hyphenated().to_string()
    }
}

/// How an action ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionOutcome {
    /// The target changed to the wanted state.
    Applied,
    /// The target was already in the wanted state (typically: this action was applied before);
    /// nothing changed.
    AlreadyApplied,
    /// The target could not be told after every retry, or refused for good; the action was stored
    /// in the dead-letter sink for an operator (or a later replay) to deal with.
    DeadLettered,
}

impl ActionOutcome {
    /// The name used in logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            ActionOutcome::Applied => "applied",
            ActionOutcome::AlreadyApplied => "already_applied",
            ActionOutcome::DeadLettered => "dead_lettered",
        }
    }
}

impl fmt::Display for ActionOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sample actions for the crate's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// The contract's example: a block of one hour.
    pub(crate) fn blocked_action() -> EnforcementAction {
        EnforcementAction::new(
            serde_json::from_str(include_str!("../../schemas/tests/fixtures/enforcement.json")).expect("the contract example parses"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(kind: EnforcementStateKind, since: i64, until: Option<i64>) -> EnforcementState {
        EnforcementState {
            uuid: Uuid::from_u128(0x9b2f_1c3a_0d4e_4f5a_8b6c_7d8e_9f0a_1b2c),
            state: kind,
            since,
            until,
            reason: String::from("5 unauthorized attempts in 10 minutes"),
            attempts: 5,
            findings: vec![],
        }
    }

    #[test]
    fn the_state_decides_the_action() {
        assert_eq!(EnforcementAction::new(state(EnforcementStateKind::Blocked, 1, Some(2))).kind(), ActionKind::Block);
        assert_eq!(EnforcementAction::new(state(EnforcementStateKind::Active, 2, None)).kind(), ActionKind::Unblock);
        assert_eq!(EnforcementAction::new(state(EnforcementStateKind::Unregistered, 3, None)).kind(), ActionKind::Unregister);
    }

    #[test]
    fn ids_are_deterministic_and_depend_on_the_change_only() {
        let a = EnforcementAction::new(state(EnforcementStateKind::Blocked, 1_000, Some(3_601_000)));
        let mut same_change = state(EnforcementStateKind::Blocked, 1_000, Some(3_601_000));
        // Reason, counts and findings describe the change; they are not part of its identity.
        same_change.reason = String::from("another wording");
        same_change.attempts = 7;
        assert_eq!(a.id(), EnforcementAction::new(same_change).id());
        assert_eq!(a.id().get_version_num(), 5);

        let others = [
            state(EnforcementStateKind::Blocked, 1_001, Some(3_601_000)),
            state(EnforcementStateKind::Blocked, 1_000, Some(7_201_000)),
            state(EnforcementStateKind::Blocked, 1_000, None),
            state(EnforcementStateKind::Unregistered, 1_000, Some(3_601_000)),
            state(EnforcementStateKind::Active, 1_000, Some(3_601_000)),
        ];
        for other in others {
            assert_ne!(a.id(), EnforcementAction::new(other.clone()).id(), "{other:?}");
        }
    }

    #[test]
    fn the_uuid_is_written_in_lower_case() {
        let a = EnforcementAction::new(state(EnforcementStateKind::Blocked, 1, None));
        assert_eq!(a.uuid_text(), "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c");
    }
}
