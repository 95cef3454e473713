//! The engine's timing-anomaly stage: every attempt judged against the learned schedule of its
//! requester-target pair (or its requester) and then added to both histories, in the partition
//! that owns the requester (see [`crate::timing`]).

use meshguard_schemas::output::Finding;
use meshguard_schemas::{Action, FindingKind, InputTopic, Severity};
use serde_json::json;
use uuid::Uuid;

use super::{Engine, MessagesView, RowsBatch};

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
            let judged = match pair_key.and_then(|k| schedules.get(&k)).filter(|s| s.is_learned(cfg, ts)) {
                Some(pair) => pair.judge(cfg, ts).map(|a| ("timing:pair", "pair", a)),
                None => schedules
                    .get(&(from, Uuid::nil()))
                    .filter(|s| s.is_learned(cfg, ts))
                    .and_then(|s| s.judge(cfg, ts))
                    .map(|a| ("timing:requester", "requester", a)),
            };
            if let Some((rule, subject, a)) = judged {
                let kind = FindingKind::TimingAnomaly;
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
                    detail: json!({
                        "explanation": a.explain(subject, ts),
                        "usual_hours_utc": a.hours,
                        "usual_weekdays": a.days.iter().map(|d| ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][*d as usize]).collect::<Vec<_>>(),
                        "history": a.history,
                    }),
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
            schedules.entry((from, Uuid::nil())).or_default().add(ts);
        }
    }
}
