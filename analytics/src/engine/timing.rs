//! The engine's timing-anomaly stage: every attempt judged against the learned schedule of its
//! requester-target pair (or its requester) and then added to both histories, in the partition
//! that owns the requester (see [`crate::timing`]).
//!
//! **Two models, one verdict.** The trained model ([`crate::timing_model`], learned offline from the
//! whole archive, hour of the week, borrowing strength from similar keys) is preferred; the online
//! schedules (this worker's own counts) cover what it does not know yet. The contract's order is
//! kept, pair before requester, with each key's verdict taken from the first of:
//! 1. the trained model, when it has the key (its verdict, anomalous or not, is final for the key);
//! 2. the online schedule, when it is learned (14 days and 50 attempts).
//!
//! A pair known to neither leaves the attempt to its requester, judged the same way. A pair's
//! verdict, even "not anomalous", stops there: the requester's schedule is only for pairs without
//! enough history. Both are lookups; the online histories keep learning from every attempt either
//! way, so a key the trained model drops (e.g. past the horizon) is still judged.

use meshguard_schemas::output::Finding;
use meshguard_schemas::{Action, FindingKind, InputTopic, Severity};
use serde_json::json;
use uuid::Uuid;

use super::{Engine, MessagesView, RowsBatch};
use crate::timing::Anomaly;
use crate::timing_model::Judged;

impl Engine {
    /// Judges every row of `view` and learns from it.
    /// Rows marked in `repeats` (re-delivered attempts) are not learned twice.
    pub(super) fn timing_rows(
        &mut self,
        view: &MessagesView<'_>,
        rows: &RowsBatch,
        repeats: &[bool],
        now_ms: i64,
        found: &mut Vec<(u32, Finding)>,
    ) {
        let cfg = &self.cfg.timing;
        if !cfg.enabled {
            return;
        }
        for row in 0..view.len() {
            let (Some(from), Some(id)) = (MessagesView::uuid(view.from, row), MessagesView::uuid(view.id, row)) else {
                continue;
            };
            let to = MessagesView::uuid(view.to, row);
            let ts = view.ts.value(row);
            let arrival = rows.partition.get(row).copied().unwrap_or_default();
            let partition = Engine::home(self.messages_partitions, &self.owned_messages, &from, arrival);
            let schedules = &mut self.partitions.entry((InputTopic::Messages, partition)).or_default().schedules;
            let pair_key = to.map(|t| (from, t));
            let requester_key = (from, Uuid::nil());
            let trained = self.timing_model.as_deref();
            let judge = |key: &(Uuid, Uuid)| -> Option<Option<Verdict<'_>>> {
                if let Some(j) = trained.and_then(|m| m.judge(key, ts)) {
                    let version = trained.map_or(0, |m| m.version);
                    return Some((j.score > 0.0).then_some(Verdict::Trained(j, version)));
                }
                schedules.get(key).filter(|s| s.is_learned(cfg, ts)).map(|s| s.judge(cfg, ts).map(Verdict::Online))
            };
            let judged = match pair_key.as_ref().and_then(judge) {
                Some(v) => v.map(|v| ("timing:pair", "pair", v)),
                None => judge(&requester_key).flatten().map(|v| ("timing:requester", "requester", v)),
            };
            if let Some((rule, subject, verdict)) = judged {
                let kind = FindingKind::TimingAnomaly;
                let (explanation, a, model) = match &verdict {
                    Verdict::Online(a) => (a.explain(subject, ts), a.clone(), None),
                    Verdict::Trained(j, version) => (
                        j.explain(subject, ts),
                        j.as_anomaly(),
                        Some(json!({
                            "version": version,
                            "cluster": j.key.cluster,
                            "usual_hours_of_week": j.usual_hours_of_week(),
                            "gap_median_s": j.key.gap_median_s,
                            "gap_iqr_s": j.key.gap_iqr_s,
                        })),
                    ),
                };
                let mut detail = json!({
                    "explanation": explanation,
                    "usual_hours_utc": a.hours,
                    "usual_weekdays": a.days.iter().map(|d| ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][*d as usize]).collect::<Vec<_>>(),
                    "history": a.history,
                });
                // Verdicts of the trained model say which model version and cluster decided.
                if let (Some(model), Some(object)) = (model, detail.as_object_mut()) {
                    object.insert("trained_model".into(), model);
                }
                let finding = Finding {
                    id: Finding::evidence_id(kind, &id),
                    ts: now_ms,
                    event_ts: ts,
                    event_id: Some(id),
                    kind,
                    offender: from,
                    target: to,
                    action: Action::from_code(view.action.value(row)),
                    rule: rule.to_owned(),
                    detail,
                    score: a.score,
                    severity: Severity::Low,
                };
                found.push((row as u32, finding));
            }
            if repeats.get(row).copied().unwrap_or(false) {
                continue;
            }
            if let Some(k) = pair_key {
                schedules.entry(k).or_default().add(ts);
            }
            schedules.entry(requester_key).or_default().add(ts);
        }
    }
}

/// A key's verdict that the attempt is anomalous, and which model gave it.
enum Verdict<'m> {
    Online(Anomaly),
    Trained(Judged<'m>, u64),
}
