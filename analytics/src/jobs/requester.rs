//! The requester checks of the contract, in its order: registration, then credentials. (The
//! enforcement-state check that precedes them belongs to the enforcement job.) The first check that
//! fails gives the only finding of the attempt: an unregistered requester gives only
//! `unregistered_requester`, a registered one whose `auth` is not `valid` only `bad_credentials`.
//! `connect` attempts are judged the same way.

use meshguard_schemas::output::Finding;
use meshguard_schemas::{Action, Auth, FindingKind, Severity};
use serde_json::json;

use super::{Job, JobContext, MessagesView};

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequesterCheck;

impl Job for RequesterCheck {
    fn name(&self) -> &'static str {
        "requester"
    }

    fn on_messages(&mut self, v: &MessagesView<'_>, ctx: &JobContext<'_>, out: &mut Vec<(u32, Finding)>) {
        let valid = Auth::Valid.code();
        for row in 0..v.len() {
            let Some(from) = MessagesView::uuid(v.from, row) else {
                continue;
            };
            let ts = v.ts.value(row);
            let registered = matches!(ctx.registry.get(&from, ts), Some(Some(_)));
            let auth = v.auth.value(row);
            let (kind, rule, detail, severity) = if !registered {
                let why = match ctx.registry.latest(&from) {
                    // Known to the directory, but not as of this attempt.
                    Some(Some(_)) => "registered only after this attempt",
                    Some(None) => "unregistered (tombstoned)",
                    None => "never registered",
                };
                (FindingKind::UnregisteredRequester, "registry:unregistered", json!({ "registered": false, "why": why }), Severity::Medium)
            } else if auth != valid {
                let auth = Auth::from_code(auth).map_or("unknown", Auth::as_str);
                (FindingKind::BadCredentials, "auth:requester", json!({ "auth": auth }), Severity::High)
            } else {
                continue;
            };
            let Some(event_id) = MessagesView::uuid(v.id, row) else {
                continue;
            };
            let finding = Finding {
                id: Finding::evidence_id(kind, &event_id),
                ts: ctx.now_ms,
                event_ts: ts,
                event_id: Some(event_id),
                kind,
                offender: from,
                target: MessagesView::uuid(v.to, row),
                action: Action::from_code(v.action.value(row)),
                rule: rule.to_owned(),
                detail,
                score: 1.0,
                severity,
            };
            out.push((row as u32, finding));
        }
    }
}
