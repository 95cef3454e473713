//! Notifications: who is told about a finding, in what words, and how often.
//!
//! For each finding with a target: one notice to the target and, when the registry names an
//! owner of the target (other than the target itself), one to the owner. Findings without a
//! target notify nobody. At most one notice per recipient, offender and kind within
//! `notification_interval_ms` of **event time** (the findings' `event_ts`), so the same findings
//! give the same notices however fast they are replayed. A notice's id is UUIDv5 (in
//! [`ID_NAMESPACE`]) of the finding id and the recipient: a replayed notice has the same id.
//!
//! The limiter's memory is the notifications topic itself: at start the service reads the topic's
//! tail and [`seeds`](NotificationLimiter::seed) the limiter with every notice in it, so findings
//! replayed after a restart are judged against the notices already published (their own included:
//! a notice already on the topic is not published again).
//!
//! This module is pure: no I/O, no clock. It must never decide enforcement and never put a secret
//! or a payload into a text (only UUIDs, the kind, the action, profile names and limits).

use std::collections::HashMap;

use meshguard_schemas::output::{Finding, ID_NAMESPACE, Notification};
use meshguard_schemas::{Action, FindingKind};
use uuid::Uuid;

use super::owners::OwnerTable;

/// Who a notice is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient {
    /// The finding's target itself.
    Target,
    /// The owner of the finding's target.
    Owner,
}

/// The deterministic id of the notice about `finding` to `recipient`.
pub fn notification_id(finding: &Uuid, recipient: &Uuid) -> Uuid {
    let mut name = [0u8; 32];
    name[..16].copy_from_slice(finding.as_bytes());
    name[16..].copy_from_slice(recipient.as_bytes());
    Uuid::new_v5(&ID_NAMESPACE, &name)
}

/// One human sentence about `finding` for the target itself or its owner. `target_type` is the
/// target's registered device type (`smart-bulb`), used in the owner's wording.
pub fn text(finding: &Finding, recipient: Recipient, target_type: Option<&str>) -> String {
    let offender = finding.offender.hyphenated();
    let object = match (recipient, finding.target) {
        (Recipient::Target, _) => String::from("you"),
        (Recipient::Owner, Some(target)) => format!("your {} {}", target_type.unwrap_or("device"), target.hyphenated()),
        (Recipient::Owner, None) => String::from("your device"),
    };
    let attempt = match finding.action {
        Some(Action::Send) => format!("send to {object}"),
        Some(Action::Receive) => format!("receive from {object}"),
        Some(Action::Discover) => format!("discover {object}"),
        Some(Action::Subscribe) => format!("subscribe to {object}"),
        Some(Action::Configure) => format!("configure {object}"),
        Some(Action::Connect) => String::from("connect"),
        None => format!("reach {object}"),
    };
    // Whose rules: "its" (the owner's device's) or "your" (the target's own).
    let whose = match recipient {
        Recipient::Target => "your",
        Recipient::Owner => "its",
    };
    let note = rule_note(&finding.rule);
    let detail = |field: &str| finding.detail.get(field);
    match finding.kind {
        FindingKind::UnregisteredRequester => format!("{offender}, which is not registered, tried to {attempt}."),
        FindingKind::BadCredentials => {
            let how = match detail("auth").and_then(|a| a.as_str()) {
                Some("missing") => "without credentials",
                _ => "with invalid credentials",
            };
            format!("{offender} tried to {attempt} {how}.")
        }
        FindingKind::PermissionDenied => {
            let note = if note.is_empty() { format!(" (rule {})", finding.rule) } else { note };
            format!("{offender} tried to {attempt} without permission{note}.")
        }
        FindingKind::TimingRestriction => format!("{offender} tried to {attempt} outside {whose} allowed hours{note}."),
        FindingKind::LocationRestriction => format!("{offender} tried to {attempt} from a location {whose} rules do not allow{note}."),
        FindingKind::EnvelopeRestriction => format!("{offender} tried to {attempt} with a payload {whose} rules do not allow{note}."),
        FindingKind::PathRestriction => format!("{offender} tried to {attempt} over a route {whose} rules do not allow{note}."),
        FindingKind::PresenceRestriction => format!("{offender} tried to {attempt} while {whose} presence rules did not allow it{note}."),
        FindingKind::ThrottleExceeded => {
            let limit = match (detail("limit").and_then(|v| v.as_u64()), detail("per_s").and_then(|v| v.as_u64())) {
                (Some(limit), Some(per_s)) => format!(" (more than {limit} in {per_s} s)"),
                _ => String::new(),
            };
            format!("{offender} made too many attempts to {attempt}{limit}{note}.")
        }
        FindingKind::TimingAnomaly => format!("{offender} tried to {attempt} at a time it does not usually use."),
        FindingKind::CrossCheckFailed => format!("{offender} failed an identity cross-check of its interactions and tried to {attempt}."),
        FindingKind::BlockedRequester => {
            let state = match detail("state").and_then(|s| s.as_str()) {
                Some("unregistered") => "unregistered",
                _ => "blocked",
            };
            format!("{offender}, which is {state}, tried to {attempt}.")
        }
    }
}

/// ` (profile NAME)` for a profile's rule, ` (the sender's profile NAME)` for the sender's own
/// profile, empty otherwise.
fn rule_note(rule: &str) -> String {
    let profile = |rest: &str| rest.split('/').next().filter(|name| !name.is_empty()).map(str::to_owned);
    if let Some(name) = rule.strip_prefix("sender:profile:").and_then(profile) {
        format!(" (the sender's profile {name})")
    } else if let Some(name) = rule.strip_prefix("profile:").and_then(profile) {
        format!(" (profile {name})")
    } else {
        String::new()
    }
}

/// At most one notice per recipient, offender and kind within an interval of event time.
///
/// A candidate is admitted unless a notice for the same key was admitted (or seeded) at an event
/// time less than the interval away from it, before or after. Decisions depend only on the
/// findings and their order in the partition (findings are keyed by offender, so every key lives
/// in one partition): a replay of the same partition from the same offset decides the same. With
/// the notices of a crashed run seeded, a replay decides as the crashed run did: a finding whose
/// notice went out is held back by that very notice (it is on the topic already), and one that was
/// held back is held back again by the notice that held it back then.
#[derive(Debug)]
pub struct NotificationLimiter {
    interval_ms: i64,
    /// Event times of the notices admitted or seeded per key, within the prune horizon.
    admitted: HashMap<(Uuid, Uuid, FindingKind), Vec<i64>>,
    newest_seen: i64,
    since_prune: usize,
}

/// Keys whose latest notice is older than this behind the newest event time seen, beyond the
/// interval, are forgotten: late findings further behind than this are not expected (the
/// pipeline's allowed lateness is 30 s by default).
const PRUNE_SLACK_MS: i64 = 10 * 60 * 1000;
/// How many admissions between two prunes.
const PRUNE_EVERY: usize = 10_000;

impl NotificationLimiter {
    /// A limiter with `interval_ms` of event time; 0 admits everything.
    pub fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms: i64::try_from(interval_ms).unwrap_or(i64::MAX),
            admitted: HashMap::new(),
            newest_seen: i64::MIN,
            since_prune: 0,
        }
    }

    /// Records a notice already published (read back from the notifications topic) to
    /// `recipient` about `offender`'s finding of `kind` at `event_ts`.
    pub fn seed(&mut self, recipient: Uuid, offender: Uuid, kind: FindingKind, event_ts: i64) {
        if self.interval_ms == 0 {
            return;
        }
        self.newest_seen = self.newest_seen.max(event_ts);
        let times = self.admitted.entry((recipient, offender, kind)).or_default();
        if !times.contains(&event_ts) {
            times.push(event_ts);
        }
    }

    /// Whether a notice to `recipient` about `offender`'s finding of `kind` at `event_ts` may go out;
    /// records it if so.
    pub fn admit(&mut self, recipient: Uuid, offender: Uuid, kind: FindingKind, event_ts: i64) -> bool {
        self.newest_seen = self.newest_seen.max(event_ts);
        self.since_prune += 1;
        if self.since_prune >= PRUNE_EVERY {
            self.prune();
        }
        if self.interval_ms == 0 {
            return true;
        }
        let interval = self.interval_ms.unsigned_abs();
        let times = self.admitted.entry((recipient, offender, kind)).or_default();
        if times.iter().any(|t| event_ts.abs_diff(*t) < interval) {
            return false;
        }
        times.push(event_ts);
        true
    }

    fn prune(&mut self) {
        self.since_prune = 0;
        let horizon = self.newest_seen.saturating_sub(self.interval_ms).saturating_sub(PRUNE_SLACK_MS);
        self.admitted.retain(|_, times| {
            times.retain(|t| *t >= horizon);
            !times.is_empty()
        });
    }

    /// Keys remembered (for tests and state-size reporting).
    pub fn len(&self) -> usize {
        self.admitted.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }
}

/// What [`notices`] decided for one finding.
#[derive(Debug, Default, PartialEq)]
pub struct Notices {
    /// The notices to publish, target first.
    pub send: Vec<Notification>,
    /// Candidates the rate limit held back.
    pub suppressed: usize,
}

/// The notices about one finding: to its target and the target's owner, rate-limited. The
/// notice's `ts` is the finding's detection time, so a replay writes the same record.
pub fn notices(finding: &Finding, owners: &OwnerTable, limiter: &mut NotificationLimiter) -> Notices {
    let mut out = Notices::default();
    let Some(target) = finding.target else { return out };
    let entry = owners.get(&target);
    let mut recipients = vec![(target, Recipient::Target)];
    if let Some(owner) = entry.and_then(|e| e.owner).filter(|owner| *owner != target) {
        recipients.push((owner, Recipient::Owner));
    }
    for (recipient, role) in recipients {
        if !limiter.admit(recipient, finding.offender, finding.kind, finding.event_ts) {
            out.suppressed += 1;
            continue;
        }
        out.send.push(Notification {
            id: notification_id(&finding.id, &recipient),
            ts: finding.ts,
            recipient,
            about: finding.offender,
            finding: finding.id,
            kind: finding.kind,
            text: text(finding, role, entry.and_then(|e| e.device_type.as_deref())),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshguard_schemas::Severity;

    const OFFENDER: Uuid = Uuid::from_u128(0x9b2f_1c3a_0d4e_4f5a_8b6c_7d8e_9f0a_1b2c);
    const TARGET: Uuid = Uuid::from_u128(0xc4d5_e6f7_1a2b_4c3d_8e9f_0a1b_2c3d_4e5f);
    const OWNER: Uuid = Uuid::from_u128(0xd0d0_d0d0_1111_4222_8333_4444_4444_4444);
    const MINUTE: i64 = 60_000;

    fn finding(kind: FindingKind, rule: &str, event_ts: i64) -> Finding {
        Finding {
            id: Finding::evidence_id(kind, &Uuid::from_u128(event_ts as u128)),
            ts: event_ts + 200,
            event_ts,
            event_id: Some(Uuid::from_u128(event_ts as u128)),
            kind,
            offender: OFFENDER,
            target: Some(TARGET),
            action: Some(Action::Send),
            rule: rule.to_owned(),
            detail: serde_json::json!({"auth": "invalid", "limit": 10, "per_s": 1}),
            score: 1.0,
            severity: Severity::High,
        }
    }

    fn owners() -> OwnerTable {
        let mut table = OwnerTable::new();
        let record = format!(r#"{{"uuid":"{TARGET}","kind":"device","type":"smart-bulb","owner":"{OWNER}"}}"#);
        table.apply(Some(TARGET.to_string().as_bytes()), Some(record.as_bytes())).expect("applies");
        table
    }

    #[test]
    fn one_sentence_per_kind_for_owner_and_target() {
        let f = finding(FindingKind::TimingRestriction, "profile:renter/timing", 0);
        assert_eq!(
            text(&f, Recipient::Owner, Some("smart-bulb")),
            "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c tried to send to your smart-bulb c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f outside its allowed hours (profile renter)."
        );
        assert_eq!(
            text(&f, Recipient::Target, None),
            "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c tried to send to you outside your allowed hours (profile renter)."
        );
        let f = finding(FindingKind::BadCredentials, "auth:requester", 0);
        assert_eq!(text(&f, Recipient::Owner, None), format!("{OFFENDER} tried to send to your device {TARGET} with invalid credentials."));
        let f = finding(FindingKind::PermissionDenied, "permissions:send/allow", 0);
        assert!(text(&f, Recipient::Target, None).ends_with("without permission (rule permissions:send/allow)."));
        let f = finding(FindingKind::ThrottleExceeded, "throttle:requester", 0);
        assert!(text(&f, Recipient::Target, None).contains("made too many attempts to send to you (more than 10 in 1 s)"));
        let f = finding(FindingKind::PathRestriction, "sender:profile:eu-only/path", 0);
        assert!(text(&f, Recipient::Target, None).ends_with("over a route your rules do not allow (the sender's profile eu-only)."));

        // Every kind gives one sentence that names the offender and ends with a full stop.
        for kind in FindingKind::ALL {
            for role in [Recipient::Target, Recipient::Owner] {
                let sentence = text(&finding(*kind, "profile:p/x", 0), role, None);
                assert!(sentence.starts_with(&OFFENDER.to_string()) && sentence.ends_with('.'), "{kind}: {sentence}");
                assert_eq!(sentence.matches(". ").count(), 0, "one sentence: {sentence}");
            }
        }
    }

    #[test]
    fn target_and_owner_are_told_once_per_minute_of_event_time() {
        let owners = owners();
        let mut limiter = NotificationLimiter::new(60_000);
        let first = notices(&finding(FindingKind::BadCredentials, "auth:requester", 0), &owners, &mut limiter);
        assert_eq!(first.send.iter().map(|n| n.recipient).collect::<Vec<_>>(), [TARGET, OWNER]);
        assert_eq!(first.suppressed, 0);
        let n = &first.send[1];
        assert_eq!((n.about, n.kind, n.ts), (OFFENDER, FindingKind::BadCredentials, 200));
        assert_eq!(n.id, notification_id(&n.finding, &OWNER));
        assert_ne!(first.send[0].id, first.send[1].id);

        // Four more within the minute: nothing; another kind: told again.
        for t in 1..5 {
            let later = notices(&finding(FindingKind::BadCredentials, "auth:requester", t * 1_000), &owners, &mut limiter);
            assert_eq!((later.send.len(), later.suppressed), (0, 2));
        }
        assert_eq!(notices(&finding(FindingKind::TimingRestriction, "profile:renter/timing", 5_000), &owners, &mut limiter).send.len(), 2);
        // A minute after the first notice (event time): told again; a late one from before: not.
        assert_eq!(notices(&finding(FindingKind::BadCredentials, "auth:requester", MINUTE), &owners, &mut limiter).send.len(), 2);
        assert_eq!(notices(&finding(FindingKind::BadCredentials, "auth:requester", MINUTE - 1), &owners, &mut limiter).send.len(), 0);
    }

    #[test]
    fn replays_decide_the_same_and_ids_are_stable() {
        let owners = owners();
        let run = || {
            let mut limiter = NotificationLimiter::new(60_000);
            (0..200)
                .flat_map(|i| notices(&finding(FindingKind::BadCredentials, "auth:requester", i * 7_000), &owners, &mut limiter).send)
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        // 200 findings 7 s apart over 23 minutes: one notice per recipient every 63 s.
        assert_eq!(a.len(), 2 * 23);
    }

    #[test]
    fn no_target_or_no_owner_means_fewer_recipients() {
        let owners = owners();
        let mut limiter = NotificationLimiter::new(60_000);
        let mut f = finding(FindingKind::CrossCheckFailed, "cross_check", 0);
        f.target = None;
        assert_eq!(notices(&f, &owners, &mut limiter), Notices::default());
        let mut f = finding(FindingKind::BadCredentials, "auth:requester", 0);
        f.target = Some(OWNER); // registered nowhere: no owner to tell
        assert_eq!(notices(&f, &owners, &mut limiter).send.iter().map(|n| n.recipient).collect::<Vec<_>>(), [OWNER]);
    }

    #[test]
    fn the_limiter_forgets_old_keys() {
        let mut limiter = NotificationLimiter::new(60_000);
        for i in 0..(PRUNE_EVERY as u128) {
            assert!(limiter.admit(Uuid::from_u128(i), OFFENDER, FindingKind::BadCredentials, 0));
        }
        assert!(limiter.admit(TARGET, OFFENDER, FindingKind::BadCredentials, 60 * MINUTE));
        // The prune ran at the 10,000th admission with the old newest time; one more round clears them.
        for _ in 0..PRUNE_EVERY {
            limiter.admit(TARGET, OFFENDER, FindingKind::BadCredentials, 60 * MINUTE);
        }
        assert_eq!(limiter.len(), 1);
        assert!(NotificationLimiter::new(0).admit(TARGET, OFFENDER, FindingKind::BadCredentials, 0));
    }

    /// A crash after some notices were published but before the findings behind them were
    /// committed: the restarted service reads the published notices back (seeds them) and replays
    /// the findings from the committed offset. What it publishes then, added to what the crashed
    /// run published, is exactly what one run without a crash publishes: nothing twice, nothing
    /// new within the minute.
    #[test]
    fn a_restart_seeded_with_the_published_notices_publishes_exactly_the_rest() {
        let owners = owners();
        // Findings 20 s apart for 5 minutes: a notice per recipient at 0, 60, 120 s …
        let findings: Vec<Finding> = (0..16).map(|i| finding(FindingKind::BadCredentials, "auth:requester", i * 20_000)).collect();
        let mut limiter = NotificationLimiter::new(60_000);
        let whole: Vec<Notification> = findings.iter().flat_map(|f| notices(f, &owners, &mut limiter).send).collect();
        assert_eq!(whole.len(), 2 * 6, "at 0, 60, … 300 s");

        for (crash_after, committed) in [(7, 2), (7, 4), (8, 8), (16, 0), (3, 1)] {
            // The crashed run: findings up to `crash_after` handled, their notices published.
            let mut limiter = NotificationLimiter::new(60_000);
            let published: Vec<Notification> =
                findings[..crash_after].iter().flat_map(|f| notices(f, &owners, &mut limiter).send).collect();
            // The restart: the topic's tail seeded, the findings replayed from the committed offset.
            let mut limiter = NotificationLimiter::new(60_000);
            for n in &published {
                let event_ts = findings.iter().find(|f| f.id == n.finding).expect("a notice is about one of the findings").event_ts;
                limiter.seed(n.recipient, n.about, n.kind, event_ts);
            }
            let again: Vec<Notification> = findings[committed..].iter().flat_map(|f| notices(f, &owners, &mut limiter).send).collect();
            let mut topic: Vec<Uuid> = published.iter().chain(&again).map(|n| n.id).collect();
            topic.sort();
            let mut want: Vec<Uuid> = whole.iter().map(|n| n.id).collect();
            want.sort();
            assert_eq!(topic, want, "crash after {crash_after}, committed {committed}");
        }

        // Unseeded (the old behaviour), the restart re-sends within the minute under new ids.
        let mut limiter = NotificationLimiter::new(60_000);
        let first: Vec<Notification> = findings[..2].iter().flat_map(|f| notices(f, &owners, &mut limiter).send).collect();
        let mut fresh = NotificationLimiter::new(60_000);
        let again: Vec<Notification> = findings[1..2].iter().flat_map(|f| notices(f, &owners, &mut fresh).send).collect();
        assert!(again.iter().all(|n| first.iter().all(|m| m.id != n.id)), "a second notice within the minute, with a new id");
    }
}
