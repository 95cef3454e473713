//! The policy check: every message attempt judged against the device directory as of its `ts`.
//!
//! The requester is checked first, in the contract's order, and the first check that fails gives
//! the only finding of the attempt: registration (`unregistered_requester`), then credentials
//! (`bad_credentials`). (The enforcement-state check that precedes them belongs to the enforcement
//! job.) `connect` stops there. Then the target: one that is not registered gives
//! `permission_denied` with rule `target:unregistered`. Then [`crate::policy::evaluate`]: the
//! permission lists and every restriction of every applicable profile, one finding per broken kind.
//!
//! **Two paths.** The batch is judged in a pipeline of three steps per row, a few rows apart: a
//! prefetch of the slots of both parties in [`crate::policy::Directory`] (a prefetch waits for
//! nothing, so the misses of many rows are in flight together), then the lookups, in cache by then,
//! and a prefetch of the blocks the row's verdict will read, then the verdict from the two slots
//! and, when the lists or restrictions of a party must be read, from its block. A row the
//! directory passes gives no finding and costs nothing more; every other row (a finding, an older
//! registry version, something the directory does not judge) goes to the reference path above,
//! over the versioned compiled records, which writes the findings. The fast path only ever skips
//! rows the reference would pass (property-tested against it in `policy/tests.rs`, registry
//! changes included).

use arrow::array::Array;
use meshguard_schemas::output::Finding;
use meshguard_schemas::{Action, Auth, FindingKind, Severity};
use serde_json::json;
use uuid::Uuid;

use super::{Job, JobContext, MessagesView};
use crate::policy::directory::{AttemptFields, Needs, Slot, View};
use crate::policy::{self, Attempt, Level, Location, Violation};

/// How far apart a row's three steps are: while the job judges row `i`, it looks up the slots of
/// row `i + AHEAD` (prefetched by then) and prefetches those of row `i + 2 × AHEAD`.
const AHEAD: usize = 16;
/// Rows in flight, held by row modulo `RING` (a power of two above `2 × AHEAD`).
const RING: usize = 64;

/// See the module docs.
#[derive(Debug, Default)]
pub struct PolicyCheck {
    /// Reused per attempt.
    violations: Vec<Violation>,
    /// Rows passed by the checks of their blocks (for the tests' coverage).
    #[cfg(test)]
    passed_in_blocks: usize,
}

impl Job for PolicyCheck {
    fn name(&self) -> &'static str {
        "policy"
    }

    fn on_messages(&mut self, v: &MessagesView<'_>, ctx: &JobContext<'_>, out: &mut Vec<(u32, Finding)>) {
        let n = v.len();
        let Some(cols) = Columns::new(v) else {
            for row in 0..n {
                self.reference(v, ctx, row, out);
            }
            return;
        };
        let dir = ctx.registry.hot().view();
        // Per row in flight, by row modulo RING.
        let mut keys = [(None, None); RING];
        let mut homes = [(0usize, 0usize); RING];
        let mut slots: [(Option<Slot<'_>>, Option<Slot<'_>>); RING] = [(None, None); RING];
        let mut needs = [Needs::Reference; RING];
        for step in 0..n + 2 * AHEAD {
            // Step 1: ask for the slots of both parties.
            if step < n {
                let row = step;
                let (from, to) = (cols.requester_key(row), cols.target_key(row));
                let home = |k: Option<u128>| k.map_or(0, |k| dir.home(k));
                let (h0, h1) = (home(from), home(to));
                dir.prefetch_slot(h0);
                dir.prefetch_slot(h1);
                keys[row % RING] = (from, to);
                homes[row % RING] = (h0, h1);
            }
            // Step 2: the lookups, and what the row needs; the blocks its verdict will read are
            // asked for likewise.
            if let Some(row) = step.checked_sub(AHEAD).filter(|row| *row < n) {
                let i = row % RING;
                let ((from, to), (h0, h1)) = (keys[i], homes[i]);
                slots[i] = (from.and_then(|k| dir.find_from(k, h0)), to.and_then(|k| dir.find_from(k, h1)));
                needs[i] = cols.needs(&dir, row, (from.unwrap_or(0), to.unwrap_or(0)), slots[i]);
                dir.prefetch_blocks(needs[i]);
            }
            // Step 3: the verdict; the rows the directory cannot pass go to the reference path,
            // which writes the findings.
            let Some(row) = step.checked_sub(2 * AHEAD).filter(|row| *row < n) else {
                continue;
            };
            let i = row % RING;
            let passes = match (needs[i], slots[i]) {
                (Needs::Nothing, _) => true,
                (need @ Needs::Blocks(..), (Some(req), Some(tgt))) => {
                    let fields = Fields { v, row, ts: cols.ts[row] };
                    let (from, to) = (keys[i].0.unwrap_or(0), keys[i].1.unwrap_or(0));
                    let passes = dir.passes(from, to, req, tgt, need, &fields);
                    #[cfg(test)]
                    {
                        self.passed_in_blocks += usize::from(passes);
                    }
                    passes
                }
                // Blocks are asked for only with both slots found.
                _ => false,
            };
            if !passes {
                self.reference(v, ctx, row, out);
            }
        }
    }
}

impl PolicyCheck {
    /// Judges one row the reference way: the compiled records of the versioned directory as of the
    /// row's `ts`, the contract's order of requester checks, then [`policy::evaluate`].
    fn reference(&mut self, v: &MessagesView<'_>, ctx: &JobContext<'_>, row: usize, out: &mut Vec<(u32, Finding)>) {
        let (Some(from), Some(event_id)) = (MessagesView::uuid(v.from, row), MessagesView::uuid(v.id, row)) else {
            return;
        };
        let ts = v.ts.value(row);
        let action = v.action.value(row);
        let to = MessagesView::uuid(v.to, row);
        let finding = |kind: FindingKind, rule: String, detail: serde_json::Value, severity: Severity| Finding {
            id: Finding::evidence_id(kind, &event_id),
            ts: ctx.now_ms,
            event_ts: ts,
            event_id: Some(event_id),
            kind,
            offender: from,
            target: to,
            action: Action::from_code(action),
            rule,
            detail,
            score: 1.0,
            severity,
        };

        let Some(requester) = policy::Lookups::record(ctx, &from, ts) else {
            let detail = json!({ "registered": false, "why": unregistered_why(ctx, &from, ts) });
            out.push((row as u32, finding(FindingKind::UnregisteredRequester, "registry:unregistered".into(), detail, Severity::Medium)));
            return;
        };
        let auth = v.auth.value(row);
        if auth != Auth::Valid.code() {
            let detail = json!({ "auth": Auth::from_code(auth).map_or("unknown", Auth::as_str) });
            out.push((row as u32, finding(FindingKind::BadCredentials, "auth:requester".into(), detail, Severity::High)));
            return;
        }
        if action == Action::Connect.code() {
            return;
        }
        let (Some(to), Some(action)) = (to, Action::from_code(action)) else {
            return;
        };
        let Some(target) = policy::Lookups::record(ctx, &to, ts) else {
            let detail = json!({ "registered": false, "why": unregistered_why(ctx, &to, ts) });
            out.push((row as u32, finding(FindingKind::PermissionDenied, "target:unregistered".into(), detail, Severity::Medium)));
            return;
        };
        if policy::passes_at_once(action, &from, &to, requester, target) {
            return;
        }
        let attempt = Attempt {
            ts,
            action,
            from,
            to,
            target_token: v.target_token.value(row),
            route: v.route(row),
            location: v.location(row),
            payload_type: MessagesView::str_at(v.payload_type, row),
            payload: MessagesView::str_at(v.payload, row),
            payload_bytes: v.payload_bytes.is_valid(row).then(|| v.payload_bytes.value(row)),
            encrypted: v.encrypted.value(row),
        };
        policy::evaluate(&attempt, requester, target, ctx, &mut self.violations);
        for Violation { kind, rule, detail, severity } in self.violations.drain(..) {
            out.push((row as u32, finding(kind, rule, detail, severity)));
        }
    }

    /// Every row judged the reference way (the fast path's yardstick in tests).
    #[cfg(test)]
    pub(crate) fn on_messages_reference(&mut self, v: &MessagesView<'_>, ctx: &JobContext<'_>, out: &mut Vec<(u32, Finding)>) {
        for row in 0..v.len() {
            self.reference(v, ctx, row, out);
        }
    }
}

/// The columns the fast path reads, as plain slices.
struct Columns<'a> {
    from: &'a arrow::array::FixedSizeBinaryArray,
    to: &'a arrow::array::FixedSizeBinaryArray,
    from_values: &'a [u8],
    to_values: &'a [u8],
    id: &'a arrow::array::FixedSizeBinaryArray,
    ts: &'a [i64],
    action: &'a [u8],
    auth: &'a [u8],
    target_token: &'a arrow::buffer::BooleanBuffer,
}

impl<'a> Columns<'a> {
    fn new(v: &MessagesView<'a>) -> Option<Self> {
        let n = v.len();
        let ok = v.from.value_length() == 16 && v.to.value_length() == 16 && v.id.value_length() == 16;
        let c = Self {
            from: v.from,
            to: v.to,
            from_values: v.from.value_data(),
            to_values: v.to.value_data(),
            id: v.id,
            ts: v.ts.values(),
            action: v.action.values(),
            auth: v.auth.values(),
            target_token: v.target_token.values(),
        };
        let lengths = [c.from.len(), c.to.len(), c.id.len(), c.ts.len(), c.action.len(), c.auth.len(), c.target_token.len()];
        (ok && lengths.iter().all(|&l| l == n) && c.from_values.len() >= 16 * n && c.to_values.len() >= 16 * n).then_some(c)
    }

    #[inline]
    fn requester_key(&self, row: usize) -> Option<u128> {
        if self.from.is_null(row) {
            return None;
        }
        self.from_values[16 * row..16 * row + 16].try_into().ok().map(u128::from_le_bytes)
    }

    #[inline]
    fn target_key(&self, row: usize) -> Option<u128> {
        if self.to.is_null(row) {
            return None;
        }
        self.to_values[16 * row..16 * row + 16].try_into().ok().map(u128::from_le_bytes)
    }

    /// What judging `row` needs; [`Needs::Reference`] for anything but a registered requester with
    /// valid credentials (newest version) acting on a registered target (likewise) or connecting.
    #[inline]
    fn needs<'d>(&self, dir: &View<'d>, row: usize, (from, to): (u128, u128), slots: (Option<Slot<'d>>, Option<Slot<'d>>)) -> Needs {
        let (Some(req), false) = (slots.0, self.id.is_null(row)) else {
            return Needs::Reference;
        };
        let ts = self.ts[row];
        if !req.registered_at(ts) || self.auth[row] != Auth::Valid.code() {
            return Needs::Reference;
        }
        let action = self.action[row];
        if action == Action::Connect.code() {
            return Needs::Nothing;
        }
        let (Some(level), Some(tgt)) = (Action::from_code(action).and_then(Level::of), slots.1) else {
            return Needs::Reference;
        };
        if !tgt.registered_at(ts) {
            return Needs::Reference;
        }
        dir.needs(level, from, to, self.target_token.value(row), req, tgt)
    }
}

/// A row's fields as the directory's restriction checks read them.
struct Fields<'v, 'a> {
    v: &'v MessagesView<'a>,
    row: usize,
    ts: i64,
}

impl AttemptFields for Fields<'_, '_> {
    fn ts(&self) -> i64 {
        self.ts
    }

    fn location(&self) -> Location {
        self.v.location(self.row)
    }

    fn payload_type(&self) -> Option<&str> {
        MessagesView::str_at(self.v.payload_type, self.row)
    }

    fn payload_size(&self) -> Option<u64> {
        let (v, row) = (self.v, self.row);
        let bytes = v.payload_bytes.is_valid(row).then(|| v.payload_bytes.value(row));
        bytes.map(|b| u64::try_from(b).unwrap_or(0)).or_else(|| MessagesView::str_at(v.payload, row).map(|p| p.len() as u64))
    }

    fn route_len(&self) -> usize {
        self.v.route(self.row).len()
    }
}

/// Why a UUID is not registered as of an attempt, for the finding's `detail`.
fn unregistered_why(ctx: &JobContext<'_>, uuid: &Uuid, ts: i64) -> &'static str {
    match (ctx.registry.get(uuid, ts), ctx.registry.latest(uuid)) {
        (Some(None), _) => "unregistered (tombstoned)",
        // Known to the directory, but not as of this attempt.
        (None, Some(_)) => "registered only after this attempt",
        _ => "never registered",
    }
}

#[cfg(test)]
mod tests;
