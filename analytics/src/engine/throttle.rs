//! The engine's throttle stage: every attempt of a micro-batch counted in the windows of its
//! requester, in the partition that owns the requester (see [`crate::throttle`] for the rules and
//! the window state). Attempts later than their partition's watermark are not counted (the
//! contract counts late events only inside the allowed lateness); they are in
//! [`super::EngineStats::late_events`].

use meshguard_schemas::output::Finding;
use meshguard_schemas::time::format_ms;
use meshguard_schemas::{Action, FindingKind, InputTopic, Severity};
use serde_json::json;
use uuid::Uuid;

use super::{Engine, MessagesView, RowsBatch};
use crate::throttle::{Counted, Limit, Rule};

impl Engine {
    /// Counts every on-time row of `view` and appends a `throttle_exceeded` finding for each new
    /// episode past a limit. Returns, per row, whether the window had already counted that attempt
    /// (a re-delivery), so later stages count it once too.
    pub(super) fn throttle_rows(
        &mut self,
        view: &MessagesView<'_>,
        rows: &RowsBatch,
        late: &[bool],
        now_ms: i64,
        found: &mut Vec<(u32, Finding)>,
    ) -> Vec<bool> {
        let mut repeats = vec![false; view.len()];
        let Engine { cfg, registry, partitions, stats, messages_partitions, owned_messages, .. } = self;
        let t = &cfg.throttles;
        let lateness = cfg.allowed_lateness_ms;
        let connect = Action::Connect.code();
        let mut limits: Vec<(Rule, Limit, String, Option<Uuid>)> = Vec::new();
        for row in 0..view.len() {
            if late.get(row).copied().unwrap_or(false) {
                continue;
            }
            let (Some(from), Some(id)) = (MessagesView::uuid(view.from, row), MessagesView::uuid(view.id, row)) else {
                continue;
            };
            let ts = view.ts.value(row);
            let requester = registry.get(&from, ts).and_then(|r| r.as_deref());
            if requester.is_some_and(|r| r.record.exempt) {
                continue;
            }
            let action = view.action.value(row);
            limits.clear();
            if action == connect {
                limits.push((Rule::Connect, t.connect, "throttle:connect".into(), None));
            } else {
                limits.push((Rule::Requester, t.requester, "throttle:requester".into(), None));
                if let Some(rec) = requester {
                    if let Some((name, l)) = rec.record.device_type.as_ref().and_then(|ty| t.by_type.get_key_value(ty)) {
                        limits.push((Rule::Type, *l, format!("throttle:type:{name}"), None));
                    }
                    if let Some((name, l)) = rec.record.manufacturer.as_ref().and_then(|m| t.by_manufacturer.get_key_value(m)) {
                        limits.push((Rule::Manufacturer, *l, format!("throttle:manufacturer:{name}"), None));
                    }
                    // The target's profiles that govern the requester and carry a `throttle`.
                    if let Some(to) = MessagesView::uuid(view.to, row)
                        && let Some(target) = registry.get(&to, ts).and_then(|r| r.as_deref())
                        && !target.is_self_or_owner(&from)
                    {
                        for p in target.profiles.iter().filter(|p| p.applies_to.admits(&from, rec.groups.as_slice())) {
                            let profile = &target.record.profiles[p.index];
                            if let Some(th) = &profile.restrictions.throttle {
                                let limit = Limit { max: u32::try_from(th.max).unwrap_or(u32::MAX), per_s: th.per_s };
                                let rule = Rule::Profile(u16::try_from(p.index).unwrap_or(u16::MAX));
                                limits.push((rule, limit, format!("profile:{}/throttle", profile.name), Some(to)));
                            }
                        }
                    }
                }
            }

            let arrival = rows.partition.get(row).copied().unwrap_or_default();
            let partition = Engine::home(*messages_partitions, owned_messages, &from, arrival);
            let state = &mut partitions.entry((InputTopic::Messages, partition)).or_default().throttles;
            let tightened_until = state.tightened.get(&from).copied().filter(|until| t.tightening.enabled && ts < *until);
            let fingerprint = id.as_u128() as u32;
            for (rule, base, name, target) in limits.drain(..) {
                if base.max == 0 || base.per_s.is_nan() || base.per_s <= 0.0 {
                    continue; // a profile's `throttle` that limits nothing
                }
                let tightenable = matches!(rule, Rule::Requester | Rule::Connect);
                let max = match tightened_until {
                    Some(_) if tightenable => ((f64::from(base.max) * t.tightening.factor).floor() as u32).max(1),
                    _ => base.max,
                };
                let per_ms = base.per_ms();
                let window = state.windows.entry((from, target.unwrap_or(Uuid::nil()), rule)).or_default();
                let count = match window.count(ts, fingerprint, max, per_ms, lateness) {
                    Counted::Exceeded(count) => count,
                    Counted::Repeat => {
                        if let Some(r) = repeats.get_mut(row) {
                            *r = true;
                        }
                        continue;
                    }
                    Counted::Within => continue,
                };
                let mut detail = json!({
                    "window_start": format_ms(ts - per_ms),
                    "window_end": format_ms(ts),
                    "count": count,
                    "limit": max,
                    "per_s": base.per_s,
                });
                if tightened_until.is_some() && tightenable {
                    detail["tightened"] = json!({ "base_limit": base.max, "until": format_ms(tightened_until.unwrap_or(ts)) });
                }
                if t.tightening.enabled && tightenable {
                    let until = ts + (t.tightening.cooldown_s * 1000.0) as i64;
                    state.tightened.insert(from, until);
                    stats.tightenings += 1;
                }
                let kind = FindingKind::ThrottleExceeded;
                let finding = Finding {
                    id: Finding::evidence_id_for_rule(kind, &id, &name),
                    ts: now_ms,
                    event_ts: ts,
                    event_id: Some(id),
                    kind,
                    offender: from,
                    target,
                    action: Action::from_code(action),
                    rule: name,
                    detail,
                    score: 1.0,
                    severity: Severity::Medium,
                };
                found.push((row as u32, finding));
            }
        }
        repeats
    }
}
