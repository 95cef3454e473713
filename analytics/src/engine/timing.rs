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

use super::{Engine, MessagesView, RowsScratch};
use crate::timing::{Anomaly, ScheduleKey, Schedules};
use crate::timing_model::Judged;

/// How many rows apart the stage's steps are: while it judges row `i`, it finds the schedules' rows
/// of row `i + AHEAD` (whose index slots were asked for by then) and asks for them, and hashes the
/// keys of row `i + 2 × AHEAD` and asks for their index slots.
const AHEAD: usize = 16;
/// Rows in flight, held by row modulo `RING` (a power of two above `2 × AHEAD`).
const RING: usize = 64;

/// A row's schedules as looked up ahead: which of the batch's partitions holds them, and each
/// key's hash and candidate row (see [`Schedules::candidate`]).
#[derive(Debug, Clone, Copy, Default)]
struct Ahead {
    table: usize,
    pair: Option<(u64, Option<usize>)>,
    requester: (u64, Option<usize>),
}

impl Engine {
    /// Judges every row of `view` and learns from it.
    /// Rows marked in `scratch.repeats` (re-delivered attempts) are not learned twice.
    ///
    /// The schedules of the batch's home partitions are taken out of their partitions for the
    /// batch (a batch holds few), with room for two new keys per row, and each row's keys are
    /// hashed and their index slots prefetched `2 × AHEAD` rows before the row is judged, their
    /// rows found and prefetched [`AHEAD`] rows before.
    pub(super) fn timing_rows(&mut self, view: &MessagesView<'_>, scratch: &mut RowsScratch, now_ms: i64, found: &mut Vec<(u32, Finding)>) {
        if !self.cfg.timing.enabled {
            return;
        }
        let RowsScratch { repeats, homes, .. } = scratch;
        let n = view.len();
        let mut tables: Vec<(i32, Schedules)> = Vec::new();
        let mut ahead = [Ahead::default(); RING];
        for step in 0..n + 2 * AHEAD {
            // Hash the keys of the row `2 × AHEAD` rows on, and ask for their index slots.
            if let Some(row) = Some(step).filter(|row| *row < n)
                && let (Some(from), Some(_)) = (MessagesView::uuid(view.from, row), MessagesView::uuid(view.id, row))
            {
                let home = homes.get(row).copied().unwrap_or_default();
                let table = match tables.iter().position(|(p, _)| *p == home) {
                    Some(t) => t,
                    None => {
                        let state = self.partitions.entry((InputTopic::Messages, home)).or_default();
                        let mut schedules = std::mem::take(&mut state.schedules);
                        schedules.reserve(2 * n);
                        tables.push((home, schedules));
                        tables.len() - 1
                    }
                };
                let schedules = &tables[table].1;
                let look = |key: &ScheduleKey| {
                    let hash = schedules.hash(key);
                    schedules.prefetch_slot(hash);
                    (hash, None)
                };
                let pair = MessagesView::uuid(view.to, row).map(|to| look(&(from, to)));
                ahead[row % RING] = Ahead { table, pair, requester: look(&(from, Uuid::nil())) };
            }
            // Find the rows of the row `AHEAD` rows on, and ask for them.
            if let Some(row) = step.checked_sub(AHEAD).filter(|row| *row < n)
                && MessagesView::uuid(view.from, row).is_some()
                && MessagesView::uuid(view.id, row).is_some()
            {
                let a = &mut ahead[row % RING];
                let schedules = &tables[a.table].1;
                let find = |(hash, candidate): &mut (u64, Option<usize>)| {
                    *candidate = schedules.candidate(*hash);
                    if let Some(c) = *candidate {
                        schedules.prefetch(c);
                    }
                };
                if let Some(pair) = a.pair.as_mut() {
                    find(pair);
                }
                find(&mut a.requester);
            }
            let Some(row) = step.checked_sub(2 * AHEAD) else {
                continue;
            };
            let (Some(from), Some(id)) = (MessagesView::uuid(view.from, row), MessagesView::uuid(view.id, row)) else {
                continue;
            };
            let a = ahead[row % RING];
            let repeat = repeats.get(row).copied().unwrap_or(false);
            if let Some((rule, subject, verdict)) = self.timing_row(view, row, from, a, repeat, &mut tables[a.table].1) {
                found.push((row as u32, self.timing_finding(view, row, from, id, now_ms, rule, subject, verdict)));
            }
        }
        for (home, schedules) in tables {
            self.partitions.entry((InputTopic::Messages, home)).or_default().schedules = schedules;
        }
    }

    /// Judges row `row` by the trained model or `schedules` (its home partition's), pair before
    /// requester, and adds it to both histories unless it is a `repeat`.
    #[inline]
    fn timing_row(
        &self,
        view: &MessagesView<'_>,
        row: usize,
        from: Uuid,
        a: Ahead,
        repeat: bool,
        schedules: &mut Schedules,
    ) -> Option<(&'static str, &'static str, Verdict<'_>)> {
        let cfg = &self.cfg.timing;
        let to = MessagesView::uuid(view.to, row);
        let ts = view.ts.value(row);
        let pair_key = to.map(|t| (from, t));
        let requester_key = (from, Uuid::nil());
        let trained = self.timing_model.as_deref();
        // The trained model's verdict on a key it knows: final for the key, anomalous or not.
        let by_model = |key: &ScheduleKey| -> Option<Option<Verdict<'_>>> {
            let j = trained?.judge(key, ts)?;
            let version = trained.map_or(0, |m| m.version);
            Some((j.score > 0.0).then_some(Verdict::Trained(j, version)))
        };
        // The online schedule's verdict, when it is learned.
        let online = |s: &crate::timing::Schedule| s.is_learned(cfg, ts).then(|| s.judge(cfg, ts).map(Verdict::Online));
        let pair = pair_key.zip(a.pair);
        // A nil target makes the pair's key the requester's: judged twice and learned twice, as
        // two keys would be (read before either learns). Re-delivered attempts learn nothing.
        if repeat || pair_key == Some(requester_key) {
            let judge = |key: &ScheduleKey| by_model(key).or_else(|| schedules.get(key).and_then(online));
            let judged = match pair_key.as_ref().and_then(judge) {
                Some(v) => v.map(|v| ("timing:pair", "pair", v)),
                None => judge(&requester_key).flatten().map(|v| ("timing:requester", "requester", v)),
            };
            if !repeat {
                if let Some(k) = pair_key {
                    schedules.get_or_default(&k).add(ts);
                }
                schedules.get_or_default(&requester_key).add(ts);
            }
            return judged;
        }
        // Distinct keys: each one's schedule judged, then learned, with one lookup. A schedule
        // created by the lookup has no history (judged as absent).
        let mut by_pair = None;
        if let Some((key, (hash, candidate))) = pair {
            let (s, created) = schedules.entry(&key, hash, candidate);
            by_pair = by_model(&key).or_else(|| (!created).then(|| online(s)).flatten());
            s.add(ts);
        }
        let (hash, candidate) = a.requester;
        let (s, created) = schedules.entry(&requester_key, hash, candidate);
        let judged = match by_pair {
            Some(v) => v.map(|v| ("timing:pair", "pair", v)),
            None => by_model(&requester_key)
                .or_else(|| (!created).then(|| online(s)).flatten())
                .flatten()
                .map(|v| ("timing:requester", "requester", v)),
        };
        s.add(ts);
        judged
    }

    /// The `timing_anomaly` finding of row `row`.
    #[allow(clippy::too_many_arguments)]
    fn timing_finding(
        &self,
        view: &MessagesView<'_>,
        row: usize,
        from: Uuid,
        id: Uuid,
        now_ms: i64,
        rule: &str,
        subject: &str,
        verdict: Verdict<'_>,
    ) -> Finding {
        let ts = view.ts.value(row);
        let to = MessagesView::uuid(view.to, row);
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
        Finding {
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
        }
    }
}

/// A key's verdict that the attempt is anomalous, and which model gave it.
enum Verdict<'m> {
    Online(Anomaly),
    Trained(Judged<'m>, u64),
}
