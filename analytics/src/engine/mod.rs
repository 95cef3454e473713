//! The micro-batch engine: owns keyed state, applies a batch in order, runs the jobs, dedups their
//! findings and snapshots everything for checkpoints. It must never do I/O or read a clock: the
//! caller passes `now` and persists snapshots.
//!
//! **Keyed, partition-scoped state.** Everything keyed by the requester (watermarks, findings
//! already emitted) lives in a [`PartitionState`] of the Kafka partition the row came from, and is
//! snapshotted per partition, so that a partition can move to another worker with its state.
//!
//! **Global tables.** Registry and presence are needed wherever a UUID is a target, i.e. in any
//! partition, so every worker holds all of them (see [`crate::tables`]).
//!
//! **Event time.** Each partition's watermark trails its highest event time by the allowed
//! lateness. Rows older than the watermark are *late*: counted in [`EngineStats::late_events`] and
//! still judged (per-attempt rules do not depend on windows; windowed jobs document their own rule).
//!
//! **Effectively once.** Every finding's id is a UUIDv5 of its evidence. A partition remembers the
//! ids it emitted for [`EngineConfig::dedup_horizon_ms`] of event time and drops repeats, so a
//! re-delivered event or a replay after restore emits nothing new. Findings written after the last
//! checkpoint and before a crash are fed back through [`Engine::mark_emitted`] by the caller, who
//! reads them from the findings topic on restore.

pub mod checkpoint;
mod emitted;
mod enforce;
mod global;
mod identity;
mod throttle;
mod timing;

use std::sync::Arc;

use arrow::array::Array;
use arrow::record_batch::RecordBatch;
use meshguard_schemas::output::Finding;
use meshguard_schemas::registry::RegistryRecord;
use meshguard_schemas::{FindingKind, InputTopic};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use self::checkpoint::PartitionSnapshot;
pub use self::emitted::EmittedIds;
use crate::crosscheck::{CrossCheckConfig, InteractionStore};
use crate::enforcement::{EnforcementConfig, Offenders, Status};
use crate::jobs::{self, Job, JobContext, MessagesView};
use crate::policy::{CompiledRecord, GroupInterner, Location, Registry};
use crate::tables::{FastMap, VersionedTable};
use crate::throttle::{ThrottleConfig, ThrottleState};
use crate::timing::{Schedules, TimingConfig};

/// Engine settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineConfig {
    /// How far behind a partition's highest event time an event may arrive and still count as on
    /// time, in ms (contract default: 30 s).
    pub allowed_lateness_ms: i64,
    /// How long (event time) a partition remembers emitted finding ids to drop repeats, in ms.
    pub dedup_horizon_ms: i64,
    /// Throttle limits.
    #[serde(default)]
    pub throttles: ThrottleConfig,
    /// Interaction cross-check settings.
    #[serde(default)]
    pub cross_check: CrossCheckConfig,
    /// Timing-anomaly settings.
    #[serde(default)]
    pub timing: TimingConfig,
    /// Enforcement thresholds.
    #[serde(default)]
    pub enforcement: EnforcementConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            allowed_lateness_ms: 30_000,
            dedup_horizon_ms: 600_000,
            throttles: ThrottleConfig::default(),
            cross_check: CrossCheckConfig::default(),
            timing: TimingConfig::default(),
            enforcement: EnforcementConfig::default(),
        }
    }
}

/// A Kafka partition of an input topic: the unit of keyed state.
pub type PartitionId = (InputTopic, i32);

/// Decoded rows of one topic with the partition each came from.
#[derive(Debug, Clone)]
pub struct RowsBatch {
    /// Rows in the topic's canonical schema ([`InputTopic::schema`]).
    pub batch: RecordBatch,
    /// Kafka partition of each row.
    pub partition: Vec<i32>,
}

/// A change of the device directory: a registry record or a tombstone (`record: None`).
#[derive(Debug, Clone)]
pub struct RegistryChange {
    /// The UUID (the record key).
    pub uuid: Uuid,
    /// The new record, or `None` when unregistered.
    pub record: Option<Arc<RegistryRecord>>,
    /// The Kafka record timestamp: attempts with `ts` at or after it see the change.
    pub effective_ms: i64,
}

/// How far a partition has been consumed: the offset of the next record to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Topic.
    pub topic: InputTopic,
    /// Partition.
    pub partition: i32,
    /// Next offset to consume (last consumed + 1), counting rejected records too.
    pub next_offset: i64,
}

/// One micro-batch of every input topic.
#[derive(Debug, Clone, Default)]
pub struct MicroBatch {
    /// Message attempts.
    pub messages: Option<RowsBatch>,
    /// Presence changes.
    pub presence: Option<RowsBatch>,
    /// Interaction entries.
    pub interactions: Option<RowsBatch>,
    /// Identity requests.
    pub identity_requests: Option<RowsBatch>,
    /// Registry changes.
    pub registry: Vec<RegistryChange>,
    /// Where each partition's consumption got to with this batch.
    pub positions: Vec<Position>,
}

/// Counters of what the engine did, for metrics.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Rows processed per input topic (indexed by `InputTopic as usize`).
    pub rows: [u64; 5],
    /// Events older than their partition's watermark when they arrived.
    pub late_events: u64,
    /// Findings emitted per kind (indexed by `FindingKind::code()`).
    pub findings: [u64; 12],
    /// Findings dropped as repeats of one already emitted.
    pub duplicates: u64,
    /// Times a requester's limits were tightened after a breach.
    pub tightenings: u64,
    /// Enforcement state changes (blocks, unregistrations, expiries).
    pub enforcement_changes: u64,
    /// Timing schedules evicted: idle for longer than `timing.forget_after_days`, and over the
    /// worker's `timing.max_schedules`.
    pub schedules_evicted: [u64; 2],
}

/// State of one input partition. Checkpoints hold it as a [`PartitionSnapshot`].
#[derive(Debug, Clone, Default)]
pub struct PartitionState {
    /// Next offset to consume.
    pub next_offset: i64,
    /// Highest event time seen.
    pub max_event_ms: i64,
    /// Finding ids emitted, with their event time, within the dedup horizon.
    pub emitted: EmittedIds,
    /// Where the caller's sinks ended at this partition's last checkpoint: a worker that takes the
    /// partition over reads outputs back from here, so it does not repeat what the previous owner
    /// wrote after that checkpoint.
    pub sink_positions: Vec<(String, i32, i64)>,
    /// Throttle windows of the requesters this partition owns.
    pub throttles: ThrottleState,
    /// Counted unauthorized attempts and status of the offenders this partition owns.
    pub enforcement: Offenders,
    /// Event-time timers: blocks to lift at their `until`.
    pub timers: std::collections::BTreeSet<(i64, Uuid)>,
    /// Learned schedules by (requester, target); the requester's own under the nil target.
    pub schedules: Schedules,
    /// Identity requests of this (identity-requests) partition read but not answered yet.
    pub held_requests: Vec<crate::crosscheck::HeldRequest>,
}

impl PartitionState {
    /// The watermark: events before it are late.
    pub fn watermark(&self, allowed_lateness_ms: i64) -> i64 {
        self.max_event_ms.saturating_sub(allowed_lateness_ms)
    }
}

/// Buffers of one batch of message attempts, kept by the engine from batch to batch so that a batch
/// allocates nothing once they have grown to the batches' size.
#[derive(Debug, Default)]
struct RowsScratch {
    /// Whether each row was older than its partition's watermark.
    late: Vec<bool>,
    /// Whether each row was already counted (a re-delivered attempt), from the throttle stage.
    repeats: Vec<bool>,
    /// Each row's home partition (its arrival partition when it has no requester).
    homes: Vec<i32>,
    /// The highest event time of each partition of the batch, while the rows are walked.
    marks: Vec<(i32, i64)>,
    /// The throttle stage's buffers.
    throttle: throttle::ThrottleScratch,
}

/// The stream processor. See the module docs.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    registry: Registry,
    groups: GroupInterner,
    presence: VersionedTable<Uuid, bool>,
    locations: VersionedTable<Uuid, Location>,
    /// What the global tables did since the checkpoint thread's replica of them (see `global.rs`).
    global: global::GlobalTracker,
    partitions: FastMap<PartitionId, PartitionState>,
    global_positions: FastMap<(InputTopic, i32), i64>,
    /// Ids of findings found on the output topic at restore, which a replay must not repeat.
    restored_outputs: FastMap<Uuid, i64>,
    /// Where the caller's sinks were at the last checkpoint (opaque to the engine).
    pub sink_positions: Vec<(String, i32, i64)>,
    /// The status of every non-active offender of the owned partitions, for lookups by UUID
    /// (requester or target) without knowing its partition.
    enforcement_view: FastMap<Uuid, Status>,
    /// The status of UUIDs homed on other workers, from their enforcement records.
    remote_enforcement: FastMap<Uuid, Status>,
    /// Enforcement records not yet taken by the caller.
    enforcement_out: Vec<meshguard_schemas::output::EnforcementState>,
    /// Partitions of the messages topic (0: unknown), for requesters' home partitions.
    messages_partitions: u32,
    /// Messages partitions this worker holds.
    owned_messages: hashbrown::HashSet<i32>,
    /// Every device's interaction table (a global table: see [`crate::crosscheck`]), shared with
    /// a checkpoint being taken rather than copied into it.
    interactions: Arc<InteractionStore>,
    /// Identity results not yet taken by the caller.
    identity_out: Vec<meshguard_schemas::output::IdentityResult>,
    /// The cross-check's DataFusion plan, made at the first identity request.
    crosscheck_plan: Option<crate::crosscheck::plan::CrossCheckPlan>,
    jobs: Vec<Box<dyn Job>>,
    stats: EngineStats,
    scratch: Vec<(u32, Finding)>,
    /// Per-batch buffers of the messages stages, kept for their capacity.
    rows_scratch: RowsScratch,
    /// The trained timing model, if one is loaded (see [`crate::timing_model`]); not part of
    /// checkpoints (it lives in the models directory).
    timing_model: crate::timing_model::SharedModel,
}

impl Engine {
    /// An engine with empty state and every job of [`jobs::all`].
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            registry: Registry::default(),
            groups: GroupInterner::default(),
            presence: VersionedTable::default(),
            locations: VersionedTable::default(),
            global: global::GlobalTracker::default(),
            partitions: FastMap::default(),
            global_positions: FastMap::default(),
            restored_outputs: FastMap::default(),
            sink_positions: Vec::new(),
            enforcement_view: FastMap::default(),
            enforcement_out: Vec::new(),
            remote_enforcement: FastMap::default(),
            messages_partitions: 0,
            owned_messages: hashbrown::HashSet::new(),
            interactions: Arc::default(),
            identity_out: Vec::new(),
            crosscheck_plan: None,
            jobs: jobs::all(),
            stats: EngineStats::default(),
            scratch: Vec::new(),
            rows_scratch: RowsScratch::default(),
            timing_model: None,
        }
    }

    /// Installs a trained timing model (or removes it with `None`): from the next micro-batch on,
    /// keys it knows are judged by it, others by the online schedules (see `engine/timing.rs`).
    pub fn set_timing_model(&mut self, model: crate::timing_model::SharedModel) {
        self.timing_model = model;
    }

    /// The trained timing model in use.
    pub fn timing_model(&self) -> Option<&crate::timing_model::TimingModel> {
        self.timing_model.as_deref()
    }

    /// What the engine did so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Registered UUIDs known (including tombstoned ones still in the horizon).
    pub fn registry_len(&self) -> usize {
        self.registry.len()
    }

    /// UUIDs with a presence history in the presence table (for the state-size gauges).
    pub fn presence_len(&self) -> usize {
        self.presence.len()
    }

    /// UUIDs with a latest location in the locations table (for the state-size gauges).
    pub fn locations_len(&self) -> usize {
        self.locations.len()
    }

    /// Interactions held across every device's interaction table (for the state-size gauges; walks
    /// the devices, so call it on the checkpoint cadence, not per batch).
    pub fn interactions_len(&self) -> usize {
        self.interactions.len()
    }

    /// Applies one micro-batch and returns the new findings, in row order. `now_ms` is the
    /// detection time written into findings.
    pub fn process(&mut self, mb: &MicroBatch, now_ms: i64) -> Vec<Finding> {
        let keys = self.registry.len() + self.presence.len() + self.locations.len();
        if self.global.bound(keys) {
            tracing::debug!(message = "Global tables' change log dropped: the next checkpoint copies them.", keys);
        }
        for change in &mb.registry {
            self.apply_registry(change.uuid, change.effective_ms, change.record.clone());
        }
        self.stats.rows[InputTopic::Registry as usize] += mb.registry.len() as u64;
        if let Some(presence) = &mb.presence {
            self.apply_presence(presence);
        }
        if let Some(interactions) = &mb.interactions {
            self.apply_interactions(interactions);
        }

        let mut out = Vec::new();
        if let Some(messages) = &mb.messages {
            self.process_messages(messages, now_ms, &mut out);
        }
        if let Some(requests) = &mb.identity_requests {
            self.hold_identity_requests(requests, now_ms);
        }
        self.release_identity_requests(now_ms, &mut out);

        for p in &mb.positions {
            match p.topic {
                topic if topic.is_global() => {
                    self.global_positions.insert((p.topic, p.partition), p.next_offset);
                }
                topic => self.partitions.entry((topic, p.partition)).or_default().next_offset = p.next_offset,
            }
        }
        out
    }

    /// Compiles and installs one registry change: only that record is compiled, whatever the size
    /// of the directory.
    pub(crate) fn apply_registry(&mut self, uuid: Uuid, effective_ms: i64, record: Option<Arc<RegistryRecord>>) {
        if let Some(log) = &mut self.global.log {
            log.registry.push((uuid, effective_ms, record.clone().map(checkpoint::RecordText)));
        }
        let compiled = record.map(|r| Arc::new(CompiledRecord::compile(r, &mut self.groups)));
        self.registry.insert(uuid, effective_ms, compiled);
    }

    /// Records `uuid`'s presence at `ts` (and in the log of the global tables' changes).
    #[inline]
    fn observe_presence(&mut self, uuid: Uuid, ts: i64, online: bool) {
        self.presence.assert(uuid, ts, online);
        if let Some(log) = &mut self.global.log {
            log.presence.push((uuid, ts, online));
        }
    }

    /// Records `uuid`'s location at `ts` (and in the log of the global tables' changes).
    #[inline]
    fn observe_location(&mut self, uuid: Uuid, ts: i64, loc: Location) {
        self.locations.assert(uuid, ts, loc);
        if let Some(log) = &mut self.global.log {
            log.locations.push((uuid, ts, loc));
        }
    }

    fn apply_presence(&mut self, rows: &RowsBatch) {
        use arrow::array::AsArray;
        use arrow::datatypes::TimestampMillisecondType;
        let b = &rows.batch;
        let (Some(ts), Some(uuid), Some(online)) = (b.column_by_name("ts"), b.column_by_name("uuid"), b.column_by_name("online")) else {
            return;
        };
        let ts = ts.as_primitive::<TimestampMillisecondType>();
        let uuid = uuid.as_fixed_size_binary();
        let online = online.as_boolean();
        for row in 0..b.num_rows() {
            if let Ok(bytes) = <[u8; 16]>::try_from(uuid.value(row)) {
                self.observe_presence(Uuid::from_bytes(bytes), ts.value(row), online.value(row));
            }
        }
        self.stats.rows[InputTopic::Presence as usize] += b.num_rows() as u64;
    }

    fn process_messages(&mut self, rows: &RowsBatch, now_ms: i64, out: &mut Vec<Finding>) {
        let Some(view) = MessagesView::new(&rows.batch) else {
            return;
        };
        let n = view.len();
        self.stats.rows[InputTopic::Messages as usize] += n as u64;

        let mut scratch = std::mem::take(&mut self.rows_scratch);
        // Watermarks first, with each row's lateness judged against the watermark before it. A
        // batch holds few partitions: their highest event times are kept aside while the rows
        // are walked, and written back once.
        let lateness = self.cfg.allowed_lateness_ms;
        let late = &mut scratch.late;
        late.clear();
        late.resize(n, false);
        let marks = &mut scratch.marks;
        marks.clear();
        let mut at = 0;
        for (row, &partition) in rows.partition.iter().enumerate().take(n) {
            if marks.get(at).is_none_or(|(p, _)| *p != partition) {
                at = match marks.iter().position(|(p, _)| *p == partition) {
                    Some(i) => i,
                    None => {
                        let state = self.partitions.entry((InputTopic::Messages, partition)).or_default();
                        marks.push((partition, state.max_event_ms));
                        marks.len() - 1
                    }
                };
            }
            let max_event_ms = &mut marks[at].1;
            let ts = view.ts.value(row);
            if ts < max_event_ms.saturating_sub(lateness) {
                self.stats.late_events += 1;
                late[row] = true;
            }
            *max_event_ms = (*max_event_ms).max(ts);
        }
        for &(partition, max_event_ms) in marks.iter() {
            self.partitions.entry((InputTopic::Messages, partition)).or_default().max_event_ms = max_event_ms;
        }

        // Each row's home partition (see `Engine::home`), once for every stage.
        let homes = &mut scratch.homes;
        homes.clear();
        homes.extend((0..n).map(|row| {
            let arrival = rows.partition.get(row).copied().unwrap_or_default();
            match MessagesView::uuid(view.from, row) {
                Some(from) => Engine::home(self.messages_partitions, &self.owned_messages, &from, arrival),
                None => arrival,
            }
        }));

        // The requesters' latest locations, before any attempt of the batch is judged: a target's
        // location is the latest by event time, whichever partition or batch position it came in.
        // Only attempts with valid credentials tell where a UUID is (an impostor's do not).
        let valid = meshguard_schemas::Auth::Valid.code();
        for row in 0..n {
            if view.location.is_valid(row) && view.auth.value(row) == valid {
                let loc = view.location(row);
                if let (false, Some(from)) = (loc.is_unknown(), MessagesView::uuid(view.from, row)) {
                    self.observe_location(from, view.ts.value(row), loc);
                }
            }
        }

        let mut found = std::mem::take(&mut self.scratch);
        self.throttle_rows(&view, &mut scratch, now_ms, &mut found);
        self.timing_rows(&view, &mut scratch, now_ms, &mut found);
        let ctx = JobContext { registry: &self.registry, presence: &self.presence, locations: &self.locations, now_ms };
        for job in &mut self.jobs {
            job.on_messages(&view, &ctx, &mut found);
        }
        // Findings in row order, kinds in code order within a row: deterministic output.
        found.sort_by_key(|(row, f)| (*row, f.kind.code()));
        self.enforce_rows(&view, rows, now_ms, &mut found, out);
        self.scratch = found;
        self.rows_scratch = scratch;
    }

    /// Records a finding already on the output topic (read back on restore), so that replaying the
    /// events behind it emits nothing.
    pub fn mark_emitted(&mut self, id: Uuid, event_ms: i64) {
        self.restored_outputs.insert(id, event_ms);
    }

    /// Forgets what no event inside the horizons can need any more. Called at checkpoints.
    pub fn prune(&mut self) {
        let horizon = self.cfg.dedup_horizon_ms;
        let started = std::time::Instant::now();
        for state in self.partitions.values_mut() {
            let keep_after = state.max_event_ms.saturating_sub(horizon);
            state.emitted.prune(keep_after);
            let watermark = state.watermark(self.cfg.allowed_lateness_ms);
            state.throttles.prune(watermark);
            let enforcement = &self.cfg.enforcement;
            state.enforcement.retain(|_, o| !o.is_spent(watermark, enforcement));
        }
        let partitions = started.elapsed();
        if let Some(oldest_watermark) = self.global_prune_horizon() {
            let keep_after = oldest_watermark.saturating_sub(horizon);
            self.restored_outputs.retain(|_, ts| *ts >= keep_after);
            // Lookups come from events at or after the oldest watermark (later ones are late and
            // see the version current at the watermark, a documented approximation).
            self.registry.prune(oldest_watermark);
            self.presence.prune(oldest_watermark);
            self.locations.prune(oldest_watermark);
            if let Some(log) = &mut self.global.log {
                log.prune(oldest_watermark);
            }
        }
        let global = started.elapsed();
        Arc::make_mut(&mut self.interactions).prune((self.cfg.cross_check.retention_days * 86_400_000) as i64);
        tracing::trace!(
            message = "Engine prune.",
            partitions_us = partitions.as_micros() as u64,
            global_us = (global - partitions).as_micros() as u64,
            interactions_us = (started.elapsed() - global).as_micros() as u64,
        );
    }

    /// How far back the attempts' lookups in the global tables can ask: the oldest watermark of
    /// the messages partitions that have seen an attempt (the other topics' partitions keep no
    /// event time that lookups follow, and one without attempts has none yet), but at most the
    /// dedup horizon behind the newest (a partition gone quiet does not hold versions back for
    /// longer: its attempts from before that see the oldest version kept, as late ones do).
    /// `None` before any attempt.
    pub(super) fn global_prune_horizon(&self) -> Option<i64> {
        let lateness = self.cfg.allowed_lateness_ms;
        let watermarks = self
            .partitions
            .iter()
            .filter(|((topic, _), state)| *topic == InputTopic::Messages && state.max_event_ms != 0)
            .map(|(_, state)| state.watermark(lateness));
        let (oldest, newest) = watermarks.fold((i64::MAX, i64::MIN), |(lo, hi), w| (lo.min(w), hi.max(w)));
        (oldest != i64::MAX).then(|| oldest.max(newest.saturating_sub(self.cfg.dedup_horizon_ms)))
    }

    /// The consumed positions of the global topics (registry, presence), to resume from.
    pub fn global_positions(&self) -> Vec<Position> {
        let mut v: Vec<Position> =
            self.global_positions.iter().map(|(&(topic, partition), &next_offset)| Position { topic, partition, next_offset }).collect();
        v.sort_by_key(|p| (p.topic, p.partition));
        v
    }

    /// The state of a partition, if the engine has one.
    pub fn partition(&self, id: &PartitionId) -> Option<&PartitionState> {
        self.partitions.get(id)
    }

    /// Tells the engine how many partitions the messages topic has. Per-requester state (throttle
    /// windows, enforcement counts, timing histories) then lives in the requester's *home*
    /// partition, `uuid mod n`, whichever partition its attempts arrive on: the platform keys
    /// attempts by `from` as sent, and the contract allows upper-case UUIDs, so one requester's
    /// attempts can arrive on two partitions. A home partition this worker does not hold is not
    /// used (its state belongs to another worker); the arrival partition is, and the requester's
    /// state is then split as before.
    pub fn set_messages_partitions(&mut self, n: u32) {
        self.messages_partitions = n;
    }

    /// Records that the group assigned these partitions to this worker.
    pub fn assign(&mut self, ids: &[PartitionId]) {
        self.owned_messages.extend(ids.iter().filter(|(t, _)| *t == InputTopic::Messages).map(|(_, p)| *p));
    }

    /// Records that the group took these partitions away.
    pub fn revoke(&mut self, ids: &[PartitionId]) {
        for (t, p) in ids {
            if *t == InputTopic::Messages {
                self.owned_messages.remove(p);
            }
        }
    }

    /// The messages partition holding `uuid`'s per-requester state when its attempt arrived on
    /// `arrival` (see [`Engine::set_messages_partitions`]).
    #[inline]
    pub(crate) fn home(messages_partitions: u32, owned: &hashbrown::HashSet<i32>, uuid: &Uuid, arrival: i32) -> i32 {
        if messages_partitions == 0 {
            return arrival;
        }
        let home = (uuid.as_u128() % u128::from(messages_partitions)) as i32;
        if home == arrival || owned.contains(&home) { home } else { arrival }
    }

    /// Drops a partition's state (after it was revoked by a rebalance).
    pub fn drop_partition(&mut self, id: &PartitionId) {
        self.partitions.remove(id);
        self.rebuild_enforcement_view();
    }

    /// Installs restored state for a partition.
    pub fn restore_partition(&mut self, id: PartitionId, state: PartitionSnapshot) {
        self.partitions.insert(id, state.into());
        self.rebuild_enforcement_view();
    }

    /// Findings kind counter, by kind.
    pub fn findings_of(&self, kind: FindingKind) -> u64 {
        self.stats.findings[usize::from(kind.code())]
    }
}

#[cfg(test)]
mod tests;
