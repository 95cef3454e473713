//! The engine's last stage for message attempts: the enforcement state of requester and target
//! decides what of an attempt's findings is published, and the published findings are counted
//! against the requester (see [`crate::enforcement`] for the rules), with the thresholds of the
//! requester's registered device type (`[enforcement.by_type]`). Runs row by row in the order
//! of the batch, which within a partition is the order of the log.

use meshguard_schemas::output::{ControlAction, ControlCommand, EnforcementState, Finding};
use meshguard_schemas::time::format_ms;
use meshguard_schemas::{Action, FindingKind, InputTopic, Severity};
use serde_json::json;
use uuid::Uuid;

use super::{Engine, MessagesView, PartitionId, RowsBatch};
use crate::enforcement::Status;

impl Engine {
    /// Publishes `found` (sorted by row) into `out` through the enforcement state, counting what
    /// it publishes; dedups repeats.
    pub(super) fn enforce_rows(
        &mut self,
        view: &MessagesView<'_>,
        rows: &RowsBatch,
        now_ms: i64,
        found: &mut Vec<(u32, Finding)>,
        out: &mut Vec<Finding>,
    ) {
        let enabled = self.cfg.enforcement.enabled;
        let mut ids: Vec<Uuid> = Vec::new();
        // Drained, not taken: the caller's buffer keeps its capacity for the next batch.
        let mut findings = found.drain(..).peekable();
        for row in 0..view.len() {
            let mut of_row: Vec<Finding> = Vec::new();
            while let Some((r, _)) = findings.peek() {
                if *r as usize != row {
                    break;
                }
                if let Some((_, f)) = findings.next() {
                    of_row.push(f);
                }
            }
            let (Some(from), Some(event_id)) = (MessagesView::uuid(view.from, row), MessagesView::uuid(view.id, row)) else {
                continue;
            };
            let ts = view.ts.value(row);
            let partition: PartitionId = (InputTopic::Messages, rows.partition.get(row).copied().unwrap_or_default());

            if enabled {
                // The requester's own state comes first in the contract's order.
                if let Some(status) = self.status_of(&from).filter(|s| s.refuses(ts)) {
                    of_row.clear();
                    of_row.push(blocked_finding(view, row, from, event_id, ts, status, now_ms));
                } else if let Some(to) = MessagesView::uuid(view.to, row)
                    && self.status_of(&to).is_some_and(|s| s.refuses(ts))
                {
                    // Attempts addressed to a blocked or unregistered UUID give no finding.
                    continue;
                }
            }
            if of_row.is_empty() {
                continue;
            }

            let state = self.partitions.entry(partition).or_default();
            // A re-delivered attempt (its findings already emitted by this partition) counts once.
            let redelivered = of_row.iter().all(|f| state.emitted.contains_key(&f.id));
            let mut units = 0u32;
            let mut rule_finding = false;
            ids.clear();
            for f in of_row {
                match f.kind {
                    FindingKind::ThrottleExceeded | FindingKind::CrossCheckFailed => units += 1,
                    FindingKind::TimingAnomaly if self.cfg.enforcement.count_timing_anomalies => units += 1,
                    FindingKind::BlockedRequester | FindingKind::TimingAnomaly => {}
                    _ => rule_finding = true,
                }
                ids.push(f.id);
                let fresh = !self.restored_outputs.contains_key(&f.id) && state.emitted.insert(f.id, f.event_ts).is_none();
                if fresh {
                    self.stats.findings[usize::from(f.kind.code())] += 1;
                    out.push(f);
                } else {
                    self.stats.duplicates += 1;
                }
            }
            units += u32::from(rule_finding);
            if !enabled || redelivered || units == 0 {
                continue;
            }
            let requester = self.registry.get(&from, ts).and_then(|r| r.as_deref());
            let (registered, exempt) = (requester.is_some(), requester.is_some_and(|r| r.record.exempt));
            // `[enforcement.by_type]`: the thresholds of the requester's registered type, as of `ts`.
            let thresholds = self.cfg.enforcement.thresholds(requester.and_then(|r| r.record.device_type.as_deref()));
            let home = Engine::home(self.messages_partitions, &self.owned_messages, &from, partition.1);
            let state = self.partitions.entry((InputTopic::Messages, home)).or_default();
            let offender = state.enforcement.entry(from);
            if let Some(status) = offender.count(thresholds, ts, units, &ids, registered, exempt) {
                let record = offender.record(from, thresholds, ts);
                if let Status::Blocked { until, .. } = status {
                    state.timers.insert((until, from));
                }
                self.enforcement_view.insert(from, status);
                self.enforcement_out.push(record);
                self.stats.enforcement_changes += 1;
            }
        }
        self.expire_blocks();
    }

    /// Fires the event-time timers of blocks whose `until` the partition's watermark has passed:
    /// the UUID is published as `active` again, from its `until`.
    fn expire_blocks(&mut self) {
        let lateness = self.cfg.allowed_lateness_ms;
        for state in self.partitions.values_mut() {
            let watermark = state.watermark(lateness);
            while let Some(&(until, uuid)) = state.timers.first() {
                if until > watermark {
                    break;
                }
                state.timers.pop_first();
                let Some(offender) = state.enforcement.get_mut(&uuid) else {
                    continue;
                };
                if let Some(since) = offender.expire(watermark) {
                    self.enforcement_view.remove(&uuid);
                    self.enforcement_out.push(offender.record(uuid, &self.cfg.enforcement, since));
                    self.stats.enforcement_changes += 1;
                }
            }
        }
    }

    /// Applies a manual override from the control topic, in the topic's order. Only the worker
    /// that holds the UUID's home partition applies it (the state has one owner); a replayed
    /// override (after a restart, the control topic is read from its beginning) changes nothing.
    pub fn apply_control(&mut self, cmd: &ControlCommand) {
        let home = if self.messages_partitions == 0 {
            self.owned_messages.iter().min().copied().unwrap_or(0)
        } else {
            let home = (cmd.uuid.as_u128() % u128::from(self.messages_partitions)) as i32;
            if !self.owned_messages.contains(&home) {
                return;
            }
            home
        };
        let state = self.partitions.entry((InputTopic::Messages, home)).or_default();
        let offender = state.enforcement.entry(cmd.uuid);
        let block = match cmd.command {
            ControlAction::Block => Some(cmd.until),
            ControlAction::Unblock => None,
        };
        if !offender.apply_manual(cmd.ts, block) {
            return;
        }
        let mut record = offender.record(cmd.uuid, &self.cfg.enforcement, cmd.ts);
        record.reason = if cmd.reason.is_empty() { "manual".to_owned() } else { format!("manual: {}", cmd.reason) };
        match offender.status {
            Status::Active => {
                self.enforcement_view.remove(&cmd.uuid);
            }
            status => {
                if let Status::Blocked { until, .. } = status
                    && until != i64::MAX
                {
                    state.timers.insert((until, cmd.uuid));
                }
                self.enforcement_view.insert(cmd.uuid, status);
            }
        }
        self.enforcement_out.push(record);
        self.stats.enforcement_changes += 1;
    }

    /// Applies an enforcement record read back from the enforcement topic: the state of a UUID
    /// whose home partition another worker holds (this worker's own offenders are authoritative
    /// here and their records are ignored). Applied as read, not by event time: an attempt that
    /// arrives here before the other worker's record does is judged by the state before it.
    pub fn apply_remote_enforcement(&mut self, rec: &EnforcementState) {
        let owned_home = if self.messages_partitions == 0 {
            self.enforcement_view.contains_key(&rec.uuid)
        } else {
            let home = (rec.uuid.as_u128() % u128::from(self.messages_partitions)) as i32;
            self.owned_messages.contains(&home)
        };
        if owned_home {
            return;
        }
        match rec.state {
            meshguard_schemas::EnforcementStateKind::Active => {
                self.remote_enforcement.remove(&rec.uuid);
            }
            meshguard_schemas::EnforcementStateKind::Blocked => {
                self.remote_enforcement.insert(rec.uuid, Status::Blocked { since: rec.since, until: rec.until.unwrap_or(i64::MAX) });
            }
            meshguard_schemas::EnforcementStateKind::Unregistered => {
                self.remote_enforcement.insert(rec.uuid, Status::Unregistered { since: rec.since });
            }
        }
    }

    /// The enforcement status of `uuid` as this worker knows it: its own offenders', else the
    /// last record another worker published.
    #[inline]
    fn status_of(&self, uuid: &Uuid) -> Option<Status> {
        self.enforcement_view.get(uuid).or_else(|| self.remote_enforcement.get(uuid)).copied()
    }

    /// Enforcement records produced since the last call, in the order they happened, for the
    /// compacted enforcement topic (keyed by `uuid`).
    pub fn take_enforcement(&mut self) -> Vec<EnforcementState> {
        std::mem::take(&mut self.enforcement_out)
    }

    /// Rebuilds the view of every owned offender's status (after a restore or a rebalance).
    pub(super) fn rebuild_enforcement_view(&mut self) {
        self.enforcement_view.clear();
        for state in self.partitions.values() {
            for (uuid, offender) in state.enforcement.iter() {
                if !matches!(offender.status, Status::Active) {
                    self.enforcement_view.insert(*uuid, offender.status);
                }
            }
        }
    }
}

/// The only finding of an attempt by a blocked or unregistered requester.
fn blocked_finding(view: &MessagesView<'_>, row: usize, from: Uuid, event_id: Uuid, ts: i64, status: Status, now_ms: i64) -> Finding {
    let (rule, detail) = match status {
        Status::Blocked { since, until } => {
            ("enforcement:blocked", json!({ "state": "blocked", "since": format_ms(since), "until": format_ms(until) }))
        }
        Status::Unregistered { since } => {
            ("enforcement:unregistered", json!({ "state": "unregistered", "since": format_ms(since), "until": null }))
        }
        Status::Active => ("enforcement:active", json!({ "state": "active" })),
    };
    let kind = FindingKind::BlockedRequester;
    Finding {
        id: Finding::evidence_id(kind, &event_id),
        ts: now_ms,
        event_ts: ts,
        event_id: Some(event_id),
        kind,
        offender: from,
        target: MessagesView::uuid(view.to, row),
        action: Action::from_code(view.action.value(row)),
        rule: rule.to_owned(),
        detail,
        score: 1.0,
        severity: Severity::High,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use meshguard_schemas::registry::RegistryRecord;
    use meshguard_schemas::{BatchDecoder, EnforcementStateKind};

    use super::super::*;
    use crate::enforcement::{EnforcementConfig, ThresholdOverrides};

    const LOCK: &str = "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
    const BULB: &str = "a1a1a1a1-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
    const UNTYPED: &str = "b2b2b2b2-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
    const TARGET: &str = "c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
    const T0: i64 = 1_795_539_600_000;

    fn registered(uuid: &str, device_type: Option<&str>) -> RegistryChange {
        let json = match device_type {
            Some(t) => format!(r#"{{"uuid":"{uuid}","kind":"device","type":"{t}"}}"#),
            None => format!(r#"{{"uuid":"{uuid}","kind":"device"}}"#),
        };
        RegistryChange {
            uuid: Uuid::parse_str(uuid).unwrap(),
            record: Some(Arc::new(RegistryRecord::from_json(0, json.as_bytes()).unwrap())),
            effective_ms: T0 - 60_000,
        }
    }

    /// `n` attempts with invalid credentials by `from`, 10 s apart from `T0`.
    fn attempts(first: u32, n: u32, from: &str) -> Vec<String> {
        (first..first + n)
            .map(|i| {
                let ts = T0 + i64::from(i - first) * 10_000;
                format!(r#"{{"id":"00000000-0000-4000-8000-{i:012}","ts":{ts},"action":"send","from":"{from}","to":"{TARGET}","auth":"invalid"}}"#)
            })
            .collect()
    }

    fn process(e: &mut Engine, registry: Vec<RegistryChange>, records: &[String]) {
        let slices: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let out = BatchDecoder::new(InputTopic::Messages).decode(&slices);
        let rows = RowsBatch { partition: vec![0; out.batch.num_rows()], batch: out.batch };
        e.process(&MicroBatch { registry, messages: Some(rows), ..Default::default() }, T0);
    }

    #[test]
    fn a_device_types_thresholds_replace_the_base_ones_for_offenders_of_that_type() {
        let by_type = [
            // Smart locks: blocked at the second counted attempt, for ten minutes.
            ("smart-lock".to_owned(), ThresholdOverrides { block_at: Some(2), block_for_s: Some(600), ..Default::default() }),
            // Smart bulbs: a short window of 20 s, so attempts 10 s apart never reach 5 in it.
            ("smart-bulb".to_owned(), ThresholdOverrides { short_window_s: Some(20), ..Default::default() }),
        ];
        let cfg = EngineConfig {
            enforcement: EnforcementConfig { by_type: by_type.into_iter().collect(), ..Default::default() },
            ..Default::default()
        };
        let mut e = Engine::new(cfg);
        let registry = vec![
            registered(LOCK, Some("smart-lock")),
            registered(BULB, Some("smart-bulb")),
            registered(UNTYPED, None),
            registered(TARGET, None),
        ];
        process(&mut e, registry, &attempts(1, 2, LOCK));
        let changes = e.take_enforcement();
        assert_eq!(changes.len(), 1, "the lock is blocked at its second attempt");
        assert_eq!(
            (changes[0].state, changes[0].since, changes[0].until, changes[0].reason.as_str()),
            (EnforcementStateKind::Blocked, T0 + 10_000, Some(T0 + 10_000 + 600_000), "2 unauthorized attempts in 10 minutes")
        );

        process(&mut e, vec![], &attempts(100, 6, BULB));
        assert!(e.take_enforcement().is_empty(), "six bulb attempts 10 s apart: never five within its 20 s window");

        process(&mut e, vec![], &attempts(200, 5, UNTYPED));
        let changes = e.take_enforcement();
        assert_eq!(changes.len(), 1, "no type: the base thresholds (5 in 10 minutes)");
        assert_eq!(
            (changes[0].state, changes[0].since, changes[0].until),
            (EnforcementStateKind::Blocked, T0 + 40_000, Some(T0 + 40_000 + 3_600_000))
        );
    }

    /// `cross_check_failed` findings count with the device type's thresholds too: a smart lock
    /// (blocked at 2) whose identity is denied twice is blocked, with its type's reason.
    #[test]
    fn denied_identities_count_with_the_device_types_thresholds() {
        let by_type = [("smart-lock".to_owned(), ThresholdOverrides { block_at: Some(2), ..Default::default() })];
        let cfg = EngineConfig {
            enforcement: EnforcementConfig { by_type: by_type.into_iter().collect(), ..Default::default() },
            ..Default::default()
        };
        let mut e = Engine::new(cfg);
        let decode = |topic: InputTopic, records: &[String]| {
            let slices: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
            let out = BatchDecoder::new(topic).decode(&slices);
            assert!(out.rejected.is_empty(), "{:?}", out.rejected);
            RowsBatch { partition: vec![0; out.batch.num_rows()], batch: out.batch }
        };
        // The lock claims five calls with TARGET; TARGET reports messages with it at the same
        // times (a kind mismatch): TARGET is available and confirms none.
        let interactions: Vec<String> = (0..5i64)
            .flat_map(|i| {
                let ts = T0 + i * 1_000;
                [
                    format!(r#"{{"id":"00000000-0000-4000-8000-1{i:011}","reporter":"{LOCK}","peer":"{TARGET}","kind":"call","ts":{ts}}}"#),
                    format!(
                        r#"{{"id":"00000000-0000-4000-8000-3{i:011}","reporter":"{TARGET}","peer":"{LOCK}","kind":"message","ts":{ts}}}"#
                    ),
                ]
            })
            .collect();
        let requests: Vec<String> = (1..=2)
            .map(|n| format!(r#"{{"id":"00000000-0000-4000-8000-20000000000{n}","ts":{},"device":"{LOCK}"}}"#, T0 + 60_000 + n))
            .collect();
        let mb = MicroBatch {
            registry: vec![registered(LOCK, Some("smart-lock")), registered(TARGET, None)],
            interactions: Some(decode(InputTopic::Interactions, &interactions)),
            identity_requests: Some(decode(InputTopic::IdentityRequests, &requests)),
            ..Default::default()
        };
        let found = [e.process(&mb, T0), e.process(&MicroBatch::default(), T0 + 60_000)].concat();
        let results = e.take_identity_results();
        assert_eq!(results.iter().map(|r| r.outcome).collect::<Vec<_>>(), [meshguard_schemas::Outcome::Denied; 2]);
        assert_eq!(found.iter().filter(|f| f.kind == meshguard_schemas::FindingKind::CrossCheckFailed).count(), 2);
        let changes = e.take_enforcement();
        assert_eq!(changes.len(), 1, "blocked at the second denial (the base threshold is 5): {changes:?}");
        assert_eq!(
            (changes[0].state, changes[0].since, changes[0].reason.as_str()),
            (EnforcementStateKind::Blocked, T0 + 60_002, "2 unauthorized attempts in 10 minutes")
        );
    }
}
