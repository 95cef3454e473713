//! Records meshguard writes: findings, enforcement state, notifications, identity results and
//! dead letters. Serialization is the contract's: UUIDs lower case, times RFC 3339 UTC with ms.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::enums::{Action, EnforcementStateKind, FindingKind, Outcome, Severity};
use crate::time::{EpochMs, serde_ms};

/// Namespace of meshguard's deterministic ids: every output id is UUIDv5 of its evidence in this
/// namespace, so the same evidence always gives the same id.
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6d65_7368_6775_4172_8d00_0000_0000_0001);

/// One detected unauthorized attempt or anomaly (`meshguard.findings.v1`, keyed by `offender`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// Deterministic id: the same evidence gives the same id (see [`Finding::evidence_id`]).
    pub id: Uuid,
    /// Detection time.
    #[serde(with = "serde_ms")]
    pub ts: EpochMs,
    /// Event time of the attempt it is about.
    #[serde(with = "serde_ms")]
    pub event_ts: EpochMs,
    /// The message attempt, interaction or identity request it is about; null for windowed findings.
    pub event_id: Option<Uuid>,
    /// What kind of finding.
    pub kind: FindingKind,
    /// The UUID that misbehaved.
    pub offender: Uuid,
    /// The target, if any.
    pub target: Option<Uuid>,
    /// The attempted action, if any.
    pub action: Option<Action>,
    /// Which record, profile and rule fired, e.g. `profile:renter/timing`.
    pub rule: String,
    /// The values that made it fire.
    pub detail: serde_json::Value,
    /// 0..1; 1 for rule violations.
    pub score: f64,
    /// Severity.
    pub severity: Severity,
}

impl Finding {
    /// The deterministic id of a finding about event `event_id` of kind `kind` (for per-attempt
    /// findings, where one attempt gives at most one finding per kind).
    pub fn evidence_id(kind: FindingKind, event_id: &Uuid) -> Uuid {
        let mut name = [0u8; 17];
        name[0] = kind.code();
        name[1..].copy_from_slice(event_id.as_bytes());
        Uuid::new_v5(&ID_NAMESPACE, &name)
    }
}

impl Finding {
    /// The deterministic id of a finding about event `event_id` of kind `kind` by rule `rule`, for
    /// kinds where one attempt can give several findings of the kind under different rules (a
    /// throttle episode of the requester limit and of a pair limit, say).
    pub fn evidence_id_for_rule(kind: FindingKind, event_id: &Uuid, rule: &str) -> Uuid {
        let mut name = Vec::with_capacity(17 + rule.len());
        name.push(kind.code());
        name.extend_from_slice(event_id.as_bytes());
        name.extend_from_slice(rule.as_bytes());
        Uuid::new_v5(&ID_NAMESPACE, &name)
    }
}

/// The current enforcement state of a UUID (`meshguard.enforcement.v1`, compacted, keyed by `uuid`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnforcementState {
    /// The UUID.
    pub uuid: Uuid,
    /// `active`, `blocked` or `unregistered`.
    pub state: EnforcementStateKind,
    /// Event time the state began.
    #[serde(with = "serde_ms")]
    pub since: EpochMs,
    /// Event time it ends; null until lifted.
    #[serde(with = "serde_ms::option")]
    pub until: Option<EpochMs>,
    /// Why, in words.
    pub reason: String,
    /// Unauthorized attempts counted.
    pub attempts: u64,
    /// Ids of the latest findings behind it.
    pub findings: Vec<Uuid>,
}

/// A manual enforcement override (`meshguard.control.v1`, keyed by `uuid`): written by `meshguard
/// block` and `meshguard unblock`, applied by the detection pipeline in the order of the topic, so
/// that enforcement state keeps one owner. Not part of the platform contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlCommand {
    /// Id of the command.
    pub id: Uuid,
    /// When it was issued.
    #[serde(with = "serde_ms")]
    pub ts: EpochMs,
    /// The UUID it is about.
    pub uuid: Uuid,
    /// `block` or `unblock`.
    pub command: ControlAction,
    /// For `block`: when the block ends; null: until lifted.
    #[serde(default, with = "serde_ms::option")]
    pub until: Option<EpochMs>,
    /// Why, in words (recorded in the enforcement state's `reason`).
    #[serde(default)]
    pub reason: String,
}

/// What a [`ControlCommand`] asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlAction {
    /// Block the UUID from `ts` until `until`.
    Block,
    /// Make the UUID active again from `ts`.
    Unblock,
}

/// A notice to a device or owner (`meshguard.notifications.v1`, keyed by `recipient`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Deterministic id.
    pub id: Uuid,
    /// When it was made.
    #[serde(with = "serde_ms")]
    pub ts: EpochMs,
    /// The target device, or its owner.
    pub recipient: Uuid,
    /// The offender.
    pub about: Uuid,
    /// The finding id.
    pub finding: Uuid,
    /// The finding's kind.
    pub kind: FindingKind,
    /// One human sentence.
    pub text: String,
}

/// The answer to an identity request (`meshguard.identity-results.v1`, keyed by `device`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityResult {
    /// Deterministic id.
    pub id: Uuid,
    /// When it was decided.
    #[serde(with = "serde_ms")]
    pub ts: EpochMs,
    /// The identity request id.
    pub request: Uuid,
    /// The device.
    pub device: Uuid,
    /// The outcome.
    pub outcome: Outcome,
    /// Interactions considered.
    pub checked: u32,
    /// Of those, confirmed by the peer's own table.
    pub verified: u32,
    /// Peers with no table to check.
    pub unavailable: u32,
    /// 0..1.
    pub confidence: f64,
}

/// A rejected input record (`meshguard.deadletter.v1`, keyed by the input key).
///
/// The contract only fixes "the rejected input record with the reason"; the fields below are
/// meshguard's: enough to find the original (`topic`, `partition`, `offset`), to understand the
/// rejection without reading code (`reason`, `field`, `expected`, `found`) and to replay it
/// (`payload`, the original text when it is UTF-8 and not oversized).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When meshguard rejected it (processing time).
    #[serde(with = "serde_ms")]
    pub ts: EpochMs,
    /// Input topic.
    pub topic: String,
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
    /// The whole reason, one line.
    pub reason: String,
    /// The offending field, if one.
    pub field: Option<String>,
    /// What the contract expects.
    pub expected: String,
    /// What was found (an excerpt).
    pub found: String,
    /// The original payload text, when it is UTF-8 and within the size limit.
    pub payload: Option<String>,
    /// Size of the original payload in bytes.
    pub payload_bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every output example of the contract parses into its Rust type and serializes back to the
    /// same JSON: the types are the contract.
    #[test]
    fn every_output_example_round_trips() {
        fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(text: &str) {
            let value: T = serde_json::from_str(text).expect("example parses");
            let back = serde_json::to_value(&value).expect("serializes");
            let orig: serde_json::Value = serde_json::from_str(text).expect("json");
            assert_eq!(back, orig);
        }
        round_trip::<Finding>(include_str!("../tests/fixtures/finding.json"));
        round_trip::<EnforcementState>(include_str!("../tests/fixtures/enforcement.json"));
        round_trip::<Notification>(include_str!("../tests/fixtures/notification.json"));
        round_trip::<IdentityResult>(include_str!("../tests/fixtures/identity-result.json"));
    }

    #[test]
    fn evidence_ids_are_deterministic_and_kind_specific() {
        let e = Uuid::from_u128(42);
        assert_eq!(Finding::evidence_id(FindingKind::BadCredentials, &e), Finding::evidence_id(FindingKind::BadCredentials, &e));
        assert_ne!(Finding::evidence_id(FindingKind::BadCredentials, &e), Finding::evidence_id(FindingKind::UnregisteredRequester, &e));
        assert_eq!(Finding::evidence_id(FindingKind::BadCredentials, &e).get_version_num(), 5);
    }
}
