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
use crate::policy::Registry;
use crate::policy::directory::{View, key_of};
use crate::throttle::{Attempt, Counted, Limit, Outcome, Rule, ThrottleConfig};

/// How many rows ahead of the row whose limits it gathers the stage asks for the directory slots
/// of a row's requester and target, so that their cache misses overlap.
const AHEAD: usize = 16;
/// Rows in flight, held by row modulo `RING` (a power of two above `AHEAD`).
const RING: usize = 32;

/// The limit an attempt was counted against, as far as a finding's name needs it (rendered only
/// for findings, from the registry as of the attempt).
#[derive(Debug, Clone, Copy)]
pub(super) enum LimitName {
    Connect,
    Requester,
    Type,
    Manufacturer,
    /// The target's profile at this index.
    Profile(usize),
}

/// What a finding needs of an attempt counted against a limit, besides the [`Attempt`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Counting {
    row: u32,
    id: Uuid,
    action: u8,
    name: LimitName,
    per_s: f64,
    base_max: u32,
    target: Option<Uuid>,
    partition: i32,
}

/// The throttle stage's per-batch buffers, kept from batch to batch for their capacity.
#[derive(Debug, Default)]
pub(super) struct ThrottleScratch {
    attempts: Vec<Attempt>,
    countings: Vec<Counting>,
    outcomes: Vec<Outcome>,
    /// A partition's attempts when the batch holds several, their indices, and their outcomes.
    mine: Vec<Attempt>,
    at: Vec<u32>,
    got: Vec<Outcome>,
}

/// A UUID's key in the directory and its home slot ([`View::home`]).
type SlotKey = (u128, usize);

/// What the directory's slots say of an attempt's limits, when they can say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quick {
    /// The requester is exempt: nothing is counted.
    Exempt,
    /// Only the base limit (`connect` or `requester`) applies.
    Base,
}

/// The attempt's limits from the newest versions in the directory's slots of its requester and
/// target (keys and home slots), or `None` when the versioned records must decide (an older
/// version holds at `ts`, a type or manufacturer with `typed_limits` configured, a target profile
/// with a `throttle`). Gives what the versioned lookups in [`Engine::throttle_rows`] give.
#[inline]
fn quick(dir: &View<'_>, from: SlotKey, to: Option<SlotKey>, ts: i64, connect: bool, typed_limits: bool) -> Option<Quick> {
    let Some(req) = dir.find_from(from.0, from.1) else {
        return Some(Quick::Base); // never registered
    };
    if !req.newest_at(ts) {
        return None;
    }
    if !req.registered() {
        return Some(Quick::Base);
    }
    if req.exempt() {
        return Some(Quick::Exempt);
    }
    if connect {
        return Some(Quick::Base);
    }
    if req.typed() && typed_limits {
        return None;
    }
    let Some(to) = to else {
        return Some(Quick::Base);
    };
    match dir.find_from(to.0, to.1) {
        None => Some(Quick::Base),
        Some(tgt) if !tgt.newest_at(ts) => None,
        Some(tgt) if !tgt.registered() || !tgt.throttles() => Some(Quick::Base),
        Some(_) => None,
    }
}

impl LimitName {
    /// The finding's `rule`, from the versions of `from`'s and `to`'s records at `ts`.
    fn render(self, registry: &Registry, t: &ThrottleConfig, from: &Uuid, to: Option<&Uuid>, ts: i64) -> String {
        let record = |u: &Uuid| registry.get(u, ts).and_then(|r| r.as_deref());
        match self {
            LimitName::Connect => "throttle:connect".into(),
            LimitName::Requester => "throttle:requester".into(),
            LimitName::Type => {
                let name = record(from).and_then(|r| r.record.device_type.as_ref()).and_then(|ty| t.by_type.get_key_value(ty));
                format!("throttle:type:{}", name.map_or("", |(n, _)| n.as_str()))
            }
            LimitName::Manufacturer => {
                let name = record(from).and_then(|r| r.record.manufacturer.as_ref()).and_then(|m| t.by_manufacturer.get_key_value(m));
                format!("throttle:manufacturer:{}", name.map_or("", |(n, _)| n.as_str()))
            }
            LimitName::Profile(i) => {
                let name = to.and_then(record).and_then(|r| r.record.profiles.get(i)).map_or("", |p| p.name.as_str());
                format!("profile:{name}/throttle")
            }
        }
    }
}

impl Engine {
    /// Counts every on-time row of `view` (`scratch.late` says which are late) and appends a
    /// `throttle_exceeded` finding for each new episode past a limit. Sets `scratch.repeats`, per
    /// row, to whether the window had already counted that attempt (a re-delivery), so later
    /// stages count it once too.
    ///
    /// Three passes: the limits of every row, as [`Attempt`]s (most rows from the directory's slots
    /// of their requester and target, looked up [`AHEAD`] rows ahead; the others from the
    /// versioned records); the attempts counted, partition by partition, in row order
    /// ([`crate::throttle::ThrottleState::count_batch`], which looks their windows up ahead); the
    /// findings, in row order.
    pub(super) fn throttle_rows(
        &mut self,
        view: &MessagesView<'_>,
        scratch: &mut RowsScratch,
        now_ms: i64,
        found: &mut Vec<(u32, Finding)>,
    ) {
        let RowsScratch { late, repeats, homes: row_homes, throttle, .. } = scratch;
        let ThrottleScratch { attempts, countings, outcomes, mine, at, got } = throttle;
        attempts.clear();
        countings.clear();
        outcomes.clear();
        repeats.clear();
        repeats.resize(view.len(), false);
        let Engine { cfg, registry, partitions, stats, .. } = self;
        let t = &cfg.throttles;
        let lateness = cfg.allowed_lateness_ms;
        let connect = Action::Connect.code();
        let typed_limits = !t.by_type.is_empty() || !t.by_manufacturer.is_empty();
        let dir = registry.hot().view();
        let n = view.len();
        let mut homes: Vec<i32> = Vec::new();
        let mut limits: Vec<(Rule, Limit, LimitName, Option<Uuid>)> = Vec::new();
        // Per row in flight: the requester's and the target's keys and home slots.
        let mut ahead: [(SlotKey, Option<SlotKey>); RING] = [((0, 0), None); RING];
        for step in 0..n + AHEAD {
            if step < n
                && !late.get(step).copied().unwrap_or(false)
                && let Some(from) = MessagesView::uuid(view.from, step)
            {
                let look = |u: Uuid| {
                    let key = key_of(&u);
                    let home = dir.home(key);
                    dir.prefetch_slot(home);
                    (key, home)
                };
                ahead[step % RING] = (look(from), MessagesView::uuid(view.to, step).map(look));
            }
            let Some(row) = step.checked_sub(AHEAD) else {
                continue;
            };
            if late.get(row).copied().unwrap_or(false) {
                continue;
            }
            let (Some(from), Some(id)) = (MessagesView::uuid(view.from, row), MessagesView::uuid(view.id, row)) else {
                continue;
            };
            let ts = view.ts.value(row);
            let action = view.action.value(row);
            let (from_slot, to_slot) = ahead[row % RING];
            limits.clear();
            match quick(&dir, from_slot, to_slot, ts, action == connect, typed_limits) {
                Some(Quick::Exempt) => continue,
                Some(Quick::Base) if action == connect => limits.push((Rule::Connect, t.connect, LimitName::Connect, None)),
                Some(Quick::Base) => limits.push((Rule::Requester, t.requester, LimitName::Requester, None)),
                None => {
                    let requester = registry.get(&from, ts).and_then(|r| r.as_deref());
                    if requester.is_some_and(|r| r.record.exempt) {
                        continue;
                    }
                    if action == connect {
                        limits.push((Rule::Connect, t.connect, LimitName::Connect, None));
                    } else {
                        limits.push((Rule::Requester, t.requester, LimitName::Requester, None));
                        if let Some(rec) = requester {
                            if let Some(l) = rec.record.device_type.as_ref().and_then(|ty| t.by_type.get(ty)) {
                                limits.push((Rule::Type, *l, LimitName::Type, None));
                            }
                            if let Some(l) = rec.record.manufacturer.as_ref().and_then(|m| t.by_manufacturer.get(m)) {
                                limits.push((Rule::Manufacturer, *l, LimitName::Manufacturer, None));
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
                                        limits.push((rule, limit, LimitName::Profile(p.index), Some(to)));
                                    }
                                }
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
        for &home in &homes {
            let state = &mut partitions.entry((InputTopic::Messages, home)).or_default().throttles;
            if homes.len() == 1 {
                state.count_batch(attempts, lateness, &t.tightening, outcomes);
                break;
            }
            if outcomes.is_empty() {
                outcomes.resize(attempts.len(), Outcome { counted: Counted::Within, max: 0, tightened_until: None });
            }
            mine.clear();
            at.clear();
            got.clear();
            for (i, (c, a)) in countings.iter().zip(attempts.iter()).enumerate() {
                if c.partition == home {
                    at.push(i as u32);
                    mine.push(*a);
                }
            }
            state.count_batch(mine, lateness, &t.tightening, got);
            for (&i, o) in at.iter().zip(got.iter()) {
                outcomes[i as usize] = *o;
            }
        }

        // Findings, in row order.
        for ((a, c), o) in attempts.iter().zip(countings.iter()).zip(outcomes.iter()) {
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
            let name = c.name.render(registry, t, &a.key.0, c.target.as_ref(), ts);
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
