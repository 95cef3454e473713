//! The engine's cross-check stage: interaction entries into the global interaction store, identity
//! requests held in their partition's state until the interactions topic has caught up with them
//! ([`crate::crosscheck::HeldRequest`]), then judged together by the DataFusion plan
//! ([`crate::crosscheck::plan`]). A `denied` outcome also gives a `cross_check_failed` finding,
//! which counts against the device's enforcement state (see `offender_partition` for where that
//! state lives).

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Int64Type, TimestampMillisecondType, UInt8Type};
use meshguard_schemas::output::{Finding, IdentityResult};
use meshguard_schemas::{FindingKind, InputTopic, InteractionKind, Outcome, Severity};
use serde_json::json;
use uuid::Uuid;

use super::{Engine, RowsBatch};
use crate::crosscheck::plan::{CrossCheckPlan, PlanRequest};
use crate::crosscheck::{Entry, HeldRequest, Tally};

fn uuid_at(col: &arrow::array::FixedSizeBinaryArray, row: usize) -> Option<Uuid> {
    if col.is_null(row) {
        return None;
    }
    <[u8; 16]>::try_from(col.value(row)).ok().map(Uuid::from_bytes)
}

impl Engine {
    /// Adds a batch of interaction entries to the store.
    pub(super) fn apply_interactions(&mut self, rows: &RowsBatch) {
        let b = &rows.batch;
        let cols = (
            b.column_by_name("id"),
            b.column_by_name("reporter"),
            b.column_by_name("peer"),
            b.column_by_name("kind"),
            b.column_by_name("ts"),
        );
        let (Some(id), Some(reporter), Some(peer), Some(kind), Some(ts)) = cols else {
            return;
        };
        let (id, reporter, peer) = (id.as_fixed_size_binary(), reporter.as_fixed_size_binary(), peer.as_fixed_size_binary());
        let (Some(kind), ts) = (kind.as_dictionary_opt::<UInt8Type>(), ts.as_primitive::<TimestampMillisecondType>()) else {
            return;
        };
        let kind = kind.keys();
        // Shared with the last checkpoint only while it is being saved: the first batch after the
        // cut copies the map of tables (a pointer each), and a table changed while the checkpoint
        // holds it is copied (see `InteractionStore`); no copy in steady state.
        let store = std::sync::Arc::make_mut(&mut self.interactions);
        for row in 0..b.num_rows() {
            if let Some(&p) = rows.partition.get(row)
                && ts.is_valid(row)
            {
                store.advance(p, ts.value(row));
            }
            let (Some(id), Some(reporter), Some(peer), Some(k)) =
                (uuid_at(id, row), uuid_at(reporter, row), uuid_at(peer, row), InteractionKind::from_code(kind.value(row)))
            else {
                continue;
            };
            store.insert(reporter, Entry { ts: ts.value(row), peer, kind: k, id });
        }
        self.stats.rows[InputTopic::Interactions as usize] += b.num_rows() as u64;
    }

    /// Sets the number of partitions of the interactions topic, for its watermark (see
    /// [`HeldRequest`]).
    pub fn set_interactions_partitions(&mut self, n: u32) {
        std::sync::Arc::make_mut(&mut self.interactions).set_partitions(n);
    }

    /// Identity requests read and not answered yet.
    pub fn identity_requests_held(&self) -> usize {
        self.partitions.iter().filter(|((t, _), _)| *t == InputTopic::IdentityRequests).map(|(_, s)| s.held_requests.len()).sum()
    }

    /// Puts a batch of identity requests in their partitions' state, to be answered by
    /// [`Engine::release_identity_requests`].
    pub(super) fn hold_identity_requests(&mut self, rows: &RowsBatch, now_ms: i64) {
        let b = &rows.batch;
        self.stats.rows[InputTopic::IdentityRequests as usize] += b.num_rows() as u64;
        let (Some(id), Some(ts), Some(device), Some(window), Some(min_verified)) = (
            b.column_by_name("id"),
            b.column_by_name("ts"),
            b.column_by_name("device"),
            b.column_by_name("window"),
            b.column_by_name("min_verified"),
        ) else {
            return;
        };
        let (id, device, ts) = (id.as_fixed_size_binary(), device.as_fixed_size_binary(), ts.as_primitive::<TimestampMillisecondType>());
        let (window, min_verified) = (window.as_primitive::<Int64Type>(), min_verified.as_primitive::<Int64Type>());
        let opt = |col: &arrow::array::PrimitiveArray<Int64Type>, row: usize| {
            col.is_valid(row).then(|| u32::try_from(col.value(row)).unwrap_or(u32::MAX))
        };
        for row in 0..b.num_rows() {
            let (Some(request), Some(dev)) = (uuid_at(id, row), uuid_at(device, row)) else {
                continue;
            };
            let partition = rows.partition.get(row).copied().unwrap_or_default();
            let held = HeldRequest {
                id: request,
                device: dev,
                t: ts.value(row),
                window: opt(window, row),
                min_verified: opt(min_verified, row),
                partition,
                arrived_ms: now_ms,
            };
            let state = self.partitions.entry((InputTopic::IdentityRequests, partition)).or_default();
            // The partition's event time: what its answers' ids (and offenders homed here) are
            // kept for, as a messages partition's attempts do for theirs.
            state.max_event_ms = state.max_event_ms.max(held.t);
            state.held_requests.push(held);
        }
    }

    /// Answers every held request that is ready (see [`HeldRequest`]), all in one run of the plan;
    /// results go to [`Engine::take_identity_results`], the `cross_check_failed` findings of denied
    /// ones to `out`.
    pub(super) fn release_identity_requests(&mut self, now_ms: i64, out: &mut Vec<Finding>) {
        let mut ready = Vec::new();
        for ((topic, _), state) in self.partitions.iter_mut() {
            if *topic != InputTopic::IdentityRequests || state.held_requests.is_empty() {
                continue;
            }
            let (interactions, cfg) = (&self.interactions, &self.cfg.cross_check);
            state.held_requests.retain(|r| {
                let go = interactions.ready(cfg, r, now_ms);
                if go {
                    ready.push(*r);
                }
                !go
            });
        }
        if ready.is_empty() {
            return;
        }
        ready.sort_by_key(|r| (r.partition, r.arrived_ms));
        let tallies = self.tallies(&ready);
        for (r, tally) in ready.iter().zip(tallies) {
            let (request, dev, t, partition) = (r.id, r.device, r.t, r.partition);
            let v =
                tally.verdict(r.window.unwrap_or(self.cfg.cross_check.window), r.min_verified.unwrap_or(self.cfg.cross_check.min_verified));
            let result_id =
                Uuid::new_v5(&meshguard_schemas::output::ID_NAMESPACE, &[b"identity-result:".as_slice(), request.as_bytes()].concat());
            // A re-delivered request is answered once (the answer's id is remembered like a finding's).
            let state = self.partitions.entry(self.offender_partition(&dev, partition)).or_default();
            if state.emitted.insert(result_id, t).is_some() {
                self.stats.duplicates += 1;
                continue;
            }
            self.identity_out.push(IdentityResult {
                id: result_id,
                ts: now_ms,
                request,
                device: dev,
                outcome: v.outcome,
                checked: v.checked,
                verified: v.verified,
                unavailable: v.unavailable,
                confidence: v.confidence,
            });
            if v.outcome != Outcome::Denied {
                continue;
            }
            let kind = FindingKind::CrossCheckFailed;
            let finding = Finding {
                id: Finding::evidence_id(kind, &request),
                ts: now_ms,
                event_ts: t,
                event_id: Some(request),
                kind,
                offender: dev,
                target: None,
                action: None,
                rule: "cross_check:min_verified".to_owned(),
                detail: json!({
                    "checked": v.checked, "verified": v.verified, "unavailable": v.unavailable,
                    "min_verified": v.min_verified, "window": v.window, "confidence": v.confidence,
                }),
                score: 1.0 - v.confidence,
                severity: Severity::High,
            };
            self.emit_and_count(partition, t, finding, out);
        }
    }

    /// The counts of each request, by the DataFusion plan; should the plan fail (a bug, not an
    /// input problem), by the reference implementation, so the requests are still answered.
    fn tallies(&mut self, ready: &[HeldRequest]) -> Vec<Tally> {
        let cfg = &self.cfg.cross_check;
        let requests: Vec<PlanRequest> =
            ready.iter().map(|r| PlanRequest { device: r.device, t: r.t, window: r.window.unwrap_or(cfg.window) }).collect();
        if self.crosscheck_plan.is_none() {
            match CrossCheckPlan::new() {
                Ok(plan) => self.crosscheck_plan = Some(plan),
                Err(e) => tracing::error!(message = "Could not start the cross-check plan; answering with the reference.", error = %e),
            }
        }
        let tol = cfg.tolerance_ms();
        if let Some(plan) = &self.crosscheck_plan {
            match plan.tallies(&self.interactions, tol, &requests) {
                Ok(tallies) => return tallies,
                Err(e) => tracing::error!(message = "The cross-check plan failed; answering with the reference.", error = %e),
            }
        }
        requests.iter().map(|r| self.interactions.tally(tol, &r.device, r.t, r.window)).collect()
    }

    /// Publishes one finding that is not about a message attempt (dedup by id in the messages
    /// partition of the same number) and counts it against its offender.
    fn emit_and_count(&mut self, partition: i32, ts: i64, finding: Finding, out: &mut Vec<Finding>) {
        let state = self.partitions.entry(self.offender_partition(&finding.offender, partition)).or_default();
        let redelivered = state.emitted.contains_key(&finding.id);
        let fresh = !self.restored_outputs.contains_key(&finding.id) && state.emitted.insert(finding.id, finding.event_ts).is_none();
        let (offender, id) = (finding.offender, finding.id);
        if fresh {
            self.stats.findings[usize::from(finding.kind.code())] += 1;
            out.push(finding);
        } else {
            self.stats.duplicates += 1;
        }
        if !self.cfg.enforcement.enabled || redelivered {
            return;
        }
        let record = self.registry.get(&offender, ts).and_then(|r| r.as_deref());
        let (registered, exempt) = (record.is_some(), record.is_some_and(|r| r.record.exempt));
        // `[enforcement.by_type]`: the device's type decides, as for its message attempts.
        let thresholds = self.cfg.enforcement.thresholds(record.and_then(|r| r.record.device_type.as_deref()));
        let o = state.enforcement.entry(offender);
        if let Some(status) = o.count(thresholds, ts, 1, &[id], registered, exempt) {
            if let crate::enforcement::Status::Blocked { until, .. } = status {
                state.timers.insert((until, offender));
            }
            let rec = o.record(offender, thresholds, ts);
            self.enforcement_view.insert(offender, status);
            self.enforcement_out.push(rec);
            self.stats.enforcement_changes += 1;
        }
    }

    /// Where the state of a device whose identity request came from identity-requests partition
    /// `p` lives: its home messages partition (or the one of the same number) when this worker
    /// holds it, so its counts are one with its attempts' (the group's range assignor gives
    /// co-partitioned topics to one worker), else the request's own partition. Never a partition
    /// this worker does not hold: its checkpoint would overwrite the owner's.
    fn offender_partition(&self, device: &Uuid, p: i32) -> super::PartitionId {
        let home = Engine::home(self.messages_partitions, &self.owned_messages, device, p);
        if self.owned_messages.contains(&home) || self.partitions.contains_key(&(InputTopic::Messages, home)) {
            (InputTopic::Messages, home)
        } else {
            (InputTopic::IdentityRequests, p)
        }
    }

    /// Identity results produced since the last call, for `meshguard.identity-results.v1` (keyed
    /// by `device`).
    pub fn take_identity_results(&mut self) -> Vec<IdentityResult> {
        std::mem::take(&mut self.identity_out)
    }
}
