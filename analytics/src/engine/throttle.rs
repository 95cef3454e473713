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

use super::{Engine, MessagesView, RowsScratch};
use crate::throttle::{Attempt, Counted, Limit, Outcome, Rule};

/// The name a finding gives the limit it is about (built only for findings).
#[derive(Debug, Clone, Copy)]
enum LimitName<'a> {
    Connect,
    Requester,
    Type(&'a str),
    Manufacturer(&'a str),
    Profile(&'a str),
}

impl LimitName<'_> {
    fn render(self) -> String {
        match self {
            LimitName::Connect => "throttle:connect".into(),
            LimitName::Requester => "throttle:requester".into(),
            LimitName::Type(name) => format!("throttle:type:{name}"),
            LimitName::Manufacturer(name) => format!("throttle:manufacturer:{name}"),
            LimitName::Profile(name) => format!("profile:{name}/throttle"),
        }
    }
}

/// What a finding needs of an attempt counted against a limit, besides the [`Attempt`].
#[derive(Debug, Clone, Copy)]
struct Counting<'a> {
    row: u32,
    id: Uuid,
    action: u8,
    name: LimitName<'a>,
    per_s: f64,
    base_max: u32,
    target: Option<Uuid>,
    partition: i32,
}

impl Engine {
    /// Counts every on-time row of `view` (`scratch.late` says which are late) and appends a
    /// `throttle_exceeded` finding for each new episode past a limit. Sets `scratch.repeats`, per
    /// row, to whether the window had already counted that attempt (a re-delivery), so later
    /// stages count it once too.
    ///
    /// Three passes: the limits of every row, as [`Attempt`]s; the attempts counted, partition by
    /// partition, in row order ([`crate::throttle::ThrottleState::count_batch`], which looks their
    /// windows up ahead); the findings, in row order.
    pub(super) fn throttle_rows(
        &mut self,
        view: &MessagesView<'_>,
        scratch: &mut RowsScratch,
        now_ms: i64,
        found: &mut Vec<(u32, Finding)>,
    ) {
        let RowsScratch { late, repeats, homes: row_homes, .. } = scratch;
        repeats.clear();
        repeats.resize(view.len(), false);
        let Engine { cfg, registry, partitions, stats, .. } = self;
        let t = &cfg.throttles;
        let lateness = cfg.allowed_lateness_ms;
        let connect = Action::Connect.code();
        let mut attempts: Vec<Attempt> = Vec::with_capacity(view.len());
        let mut countings: Vec<Counting<'_>> = Vec::with_capacity(view.len());
        let mut homes: Vec<i32> = Vec::new();
        let mut limits: Vec<(Rule, Limit, LimitName<'_>, Option<Uuid>)> = Vec::new();
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
                limits.push((Rule::Connect, t.connect, LimitName::Connect, None));
            } else {
                limits.push((Rule::Requester, t.requester, LimitName::Requester, None));
                if let Some(rec) = requester {
                    if let Some((name, l)) = rec.record.device_type.as_ref().and_then(|ty| t.by_type.get_key_value(ty)) {
                        limits.push((Rule::Type, *l, LimitName::Type(name), None));
                    }
                    if let Some((name, l)) = rec.record.manufacturer.as_ref().and_then(|m| t.by_manufacturer.get_key_value(m)) {
                        limits.push((Rule::Manufacturer, *l, LimitName::Manufacturer(name), None));
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
                                limits.push((rule, limit, LimitName::Profile(&profile.name), Some(to)));
                            }
                        }
                    }
                }
            }

            let partition = row_homes.get(row).copied().unwrap_or_default();
            if homes.last() != Some(&partition) && !homes.contains(&partition) {
                homes.push(partition);
            }
            let fingerprint = id.as_u128() as u32;
            let mut first_of_attempt = true;
            for (rule, base, name, target) in limits.drain(..) {
                if base.max == 0 || base.per_s.is_nan() || base.per_s <= 0.0 {
                    continue; // a profile's `throttle` that limits nothing
                }
                attempts.push(Attempt {
                    key: (from, target.unwrap_or(Uuid::nil()), rule),
                    ts,
                    fingerprint,
                    max: base.max,
                    per_ms: base.per_ms(),
                    first_of_attempt,
                });
                first_of_attempt = false;
                countings.push(Counting { row: row as u32, id, action, name, per_s: base.per_s, base_max: base.max, target, partition });
            }
        }

        // Count, partition by partition (each partition's attempts in row order).
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(attempts.len());
        for &home in &homes {
            let state = &mut partitions.entry((InputTopic::Messages, home)).or_default().throttles;
            if homes.len() == 1 {
                state.count_batch(&attempts, lateness, &t.tightening, &mut outcomes);
                break;
            }
            if outcomes.is_empty() {
                outcomes.resize(attempts.len(), Outcome { counted: Counted::Within, max: 0, tightened_until: None });
            }
            let (at, mine): (Vec<usize>, Vec<Attempt>) =
                countings.iter().zip(&attempts).enumerate().filter(|(_, (c, _))| c.partition == home).map(|(i, (_, a))| (i, *a)).unzip();
            let mut got = Vec::with_capacity(mine.len());
            state.count_batch(&mine, lateness, &t.tightening, &mut got);
            for (i, o) in at.into_iter().zip(got) {
                outcomes[i] = o;
            }
        }

        // Findings, in row order.
        for ((a, c), o) in attempts.iter().zip(&countings).zip(&outcomes) {
            let count = match o.counted {
                Counted::Exceeded(count) => count,
                Counted::Repeat => {
                    if let Some(r) = repeats.get_mut(c.row as usize) {
                        *r = true;
                    }
                    continue;
                }
                Counted::Within => continue,
            };
            let (ts, max) = (a.ts, o.max);
            let tightenable = matches!(a.key.2, Rule::Requester | Rule::Connect);
            let mut detail = json!({
                "window_start": format_ms(ts - a.per_ms),
                "window_end": format_ms(ts),
                "count": count,
                "limit": max,
                "per_s": c.per_s,
            });
            if let Some(until) = o.tightened_until {
                detail["tightened"] = json!({ "base_limit": c.base_max, "until": format_ms(until) });
            }
            if t.tightening.enabled && tightenable {
                stats.tightenings += 1;
            }
            let name = c.name.render();
            let kind = FindingKind::ThrottleExceeded;
            let finding = Finding {
                id: Finding::evidence_id_for_rule(kind, &c.id, &name),
                ts: now_ms,
                event_ts: ts,
                event_id: Some(c.id),
                kind,
                offender: a.key.0,
                target: c.target,
                action: Action::from_code(c.action),
                rule: name,
                detail,
                score: 1.0,
                severity: Severity::Medium,
            };
            found.push((c.row, finding));
        }
    }
}
