//! Checkpoints: the engine's state and consumed offsets, written together, so that after a crash
//! the pipeline resumes exactly where its state says it was.
//!
//! The protocol the caller follows (see `meshguard`'s pipeline): flush every sink, take
//! [`Engine::checkpoint`], [`CheckpointStore::save`] it (durable when it returns), and only then
//! commit the same offsets to Kafka. On start: [`CheckpointStore::load`], [`Engine::restore`], seek
//! every partition to its checkpointed offset.
//!
//! One file per input partition (state follows its partition: whichever worker takes a partition
//! over reads that file) and one for the global tables. Each file is written to a temporary name,
//! fsynced, renamed over the old one and the directory fsynced, so a file is always either the old
//! or the new checkpoint, never half of one.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshguard_schemas::InputTopic;
use meshguard_schemas::registry::RegistryRecord;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::global::{GlobalLog, GlobalReplica, Pending, Settling};
use super::{Engine, PartitionId, PartitionState, Position};
use crate::crosscheck::HeldRequest;
use crate::enforcement::Offenders;
use crate::error::{Error, Result};
use crate::policy::Location;
use crate::tables::TableSnapshot;
use crate::throttle::{ThrottleSnapshot, ThrottleState, WindowsSnapshot};
use crate::timing::{Eviction, SchedulesSnapshot};

/// Leading bytes of every checkpoint file: format name and version. Version 09: a partition's
/// throttle windows and schedules are written as little-endian byte strings of plain values (see
/// [`crate::throttle::WindowsSnapshot`], [`crate::timing::SchedulesSnapshot`]), no longer field
/// by field. Version 10: a schedule holds its latest attempt's time (176 bytes, was 168).
const MAGIC: &[u8; 8] = b"MGCKPT10";

/// The part of [`MAGIC`] every version shares.
const MAGIC_NAME: &[u8; 6] = b"MGCKPT";

/// Rows per table a step of [`Engine::checkpoint_step`] is meant to take between micro-batches,
/// over all partitions (a few milliseconds of copying), and how few rows may be left to copy
/// before the cut (about as much again in the pause).
pub const CHECKPOINT_STEP_ROWS: usize = 16_384;

/// See [`CHECKPOINT_STEP_ROWS`].
pub const CHECKPOINT_CUT_ROWS: usize = 16_384;

/// A consistent snapshot of an engine.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Keyed state and next offset of every owned partition.
    pub partitions: Vec<(PartitionId, PartitionSnapshot)>,
    /// Global tables and their positions. Their registry, presence and locations are written
    /// from the checkpoint thread's replica: read them after [`Checkpoint::settle`].
    pub global: GlobalSnapshot,
    /// The global tables' replica and the changes to apply to it (see `engine/global.rs`).
    #[serde(skip)]
    settling: Option<Settling>,
}

/// The state of one input partition as a checkpoint holds it: what [`PartitionState`] holds,
/// copied without the structures that only serve lookups (the throttle table's index and unused
/// entries, hash tables' empty buckets), so that taking it pauses the pipeline for as short a time
/// as the state's size allows. The fields are [`PartitionState`]'s, in its order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionSnapshot {
    /// Next offset to consume.
    pub next_offset: i64,
    /// Highest event time seen.
    pub max_event_ms: i64,
    /// Finding ids emitted, with their event time, within the dedup horizon (shared with the
    /// engine by minute, written as a map).
    pub emitted: super::EmittedIds,
    /// Where the caller's sinks ended at this checkpoint (see [`PartitionState::sink_positions`]).
    pub sink_positions: Vec<(String, i32, i64)>,
    /// Throttle windows and tightenings.
    pub throttles: ThrottleSnapshot,
    /// Counted unauthorized attempts and status of the offenders this partition owns (shared with
    /// the engine per offender, written as a map).
    pub enforcement: Offenders,
    /// Event-time timers: blocks to lift at their `until`.
    pub timers: BTreeSet<(i64, Uuid)>,
    /// Learned schedules by (requester, target).
    pub schedules: SchedulesSnapshot,
    /// Identity requests read but not answered yet.
    pub held_requests: Vec<HeldRequest>,
}

impl PartitionState {
    /// The state as a checkpoint holds it.
    pub fn snapshot(&self) -> PartitionSnapshot {
        PartitionSnapshot {
            next_offset: self.next_offset,
            max_event_ms: self.max_event_ms,
            emitted: self.emitted.clone(),
            sink_positions: self.sink_positions.clone(),
            throttles: self.throttles.snapshot(),
            enforcement: self.enforcement.clone(),
            timers: self.timers.clone(),
            schedules: SchedulesSnapshot::of(&self.schedules),
            held_requests: self.held_requests.clone(),
        }
    }
}

impl PartitionState {
    /// The state as a checkpoint holds it, the throttle windows and schedules through their
    /// tables' mirrors (only the rows written since the mirrors were last brought up to date are
    /// copied; see [`Engine::checkpoint_step`]).
    fn take_snapshot(&mut self) -> PartitionSnapshot {
        PartitionSnapshot {
            next_offset: self.next_offset,
            max_event_ms: self.max_event_ms,
            emitted: self.emitted.clone(),
            sink_positions: self.sink_positions.clone(),
            throttles: self.throttles.take_snapshot(),
            enforcement: self.enforcement.clone(),
            timers: self.timers.clone(),
            schedules: self.schedules.take_snapshot(),
            held_requests: self.held_requests.clone(),
        }
    }
}

/// What a written checkpoint gives back to the engine ([`Engine::recycle`]): its tables' mirrors
/// and the global tables' replica, so that the next checkpoint copies only what changed since this
/// one.
#[derive(Debug, Default)]
pub struct Recycled {
    mirrors: Vec<(PartitionId, WindowsSnapshot, SchedulesSnapshot)>,
    global: Option<(Box<GlobalReplica>, u64, Option<GlobalLog>)>,
}

impl Checkpoint {
    /// Brings the global tables' part up to the cut, on the thread that writes the checkpoint:
    /// applies the changes since the previous checkpoint to the replica it carries (or builds the
    /// replica from the tables copied at the cut) and fills [`GlobalSnapshot`]'s registry,
    /// presence and locations from it. [`CheckpointStore::save`] and [`Engine::restore`] call it;
    /// calling it again does nothing.
    pub fn settle(&mut self) {
        let Some(settling) = self.settling.as_mut() else {
            return;
        };
        let replica = match std::mem::replace(&mut settling.pending, Pending::Build) {
            Pending::Changes { mut replica, mut log } => {
                replica.apply(&log);
                log.clear();
                settling.spare = Some(log);
                let (registry, presence, locations) = replica.snapshot();
                (self.global.registry, self.global.presence, self.global.locations) = (registry, presence, locations);
                replica
            }
            Pending::Build => {
                let g = &self.global;
                Box::new(GlobalReplica::from_snapshot(&g.registry, &g.presence, &g.locations))
            }
            Pending::Settled(replica) => replica,
        };
        settling.pending = Pending::Settled(replica);
    }

    /// The mirrors and the settled replica to hand back once this checkpoint is written; the rest
    /// is dropped here (on the thread that wrote it, not the pipeline's).
    pub fn into_recycled(self) -> Recycled {
        let global = self.settling.and_then(|s| match s.pending {
            Pending::Settled(replica) => Some((replica, s.epoch, s.spare)),
            _ => None,
        });
        Recycled { mirrors: self.partitions.into_iter().map(|(id, s)| (id, s.throttles.windows, s.schedules)).collect(), global }
    }
}

impl From<PartitionSnapshot> for PartitionState {
    fn from(s: PartitionSnapshot) -> Self {
        Self {
            next_offset: s.next_offset,
            max_event_ms: s.max_event_ms,
            emitted: s.emitted,
            sink_positions: s.sink_positions,
            throttles: ThrottleState::from(&s.throttles),
            enforcement: s.enforcement,
            timers: s.timers,
            schedules: s.schedules.to_schedules(),
            held_requests: s.held_requests,
        }
    }
}

/// A registry record in a checkpoint: shared with the engine while the snapshot is in memory, and
/// written as its JSON text (records hold arbitrary JSON values, which a compact binary format
/// cannot round-trip). The text is made when the checkpoint is written, on the thread that writes
/// it: a snapshot of a directory of a million records costs the pipeline pointer copies, not a
/// million JSON encodings.
#[derive(Debug, Clone)]
pub struct RecordText(pub Arc<RegistryRecord>);

impl Serialize for RecordText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let text = serde_json::to_string(self.0.as_ref()).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for RecordText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        serde_json::from_str(&text).map(|r| Self(Arc::new(r))).map_err(|e| serde::de::Error::custom(format!("a registry record: {e}")))
    }
}

/// The global tables with the positions they were read up to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GlobalSnapshot {
    /// Registry versions (records written as their JSON text, see [`RecordText`]).
    pub registry: TableSnapshot<Uuid, Option<RecordText>>,
    /// Presence versions.
    pub presence: TableSnapshot<Uuid, bool>,
    /// Latest known locations, as this worker learned them from its partitions' attempts.
    pub locations: TableSnapshot<Uuid, Location>,
    /// Every device's interaction table: the engine's own, shared, not a copy (the engine copies
    /// it only if it changes it while this snapshot is still alive).
    #[serde(with = "crate::crosscheck::shared")]
    pub interactions: Arc<crate::crosscheck::InteractionStore>,
    /// Consumed positions of the global topics.
    pub positions: Vec<Position>,
    /// The caller's sink positions at the checkpoint.
    pub sink_positions: Vec<(String, i32, i64)>,
}

impl Engine {
    /// Prunes expired state and snapshots the rest: a consistent cut of every partition's state
    /// and offsets, and of the global tables.
    ///
    /// The throttle windows and schedules are copied into mirrors the engine keeps from
    /// checkpoint to checkpoint, row for row, and only the rows written since a mirror was last
    /// brought up to date are copied here; the rest of that work (and of the windows' prune) can
    /// be done ahead, between micro-batches, by [`Engine::checkpoint_step`]. Hand the checkpoint's
    /// mirrors back once it is written ([`Checkpoint::into_recycled`], [`Engine::recycle`]): a
    /// mirror not handed back is copied whole again.
    pub fn checkpoint(&mut self) -> Checkpoint {
        let started = std::time::Instant::now();
        self.prune();
        let pruned = started.elapsed();
        for state in self.partitions.values_mut() {
            state.sink_positions.clone_from(&self.sink_positions);
        }
        let mut partitions: Vec<(PartitionId, PartitionSnapshot)> =
            self.partitions.iter_mut().map(|(k, v)| (*k, v.take_snapshot())).collect();
        partitions.sort_by_key(|(k, _)| *k);
        let partitioned = started.elapsed();
        // The registry, presence and locations are copied only when the checkpoint thread has no
        // replica of them to bring up to date (see `global.rs`).
        let settling = self.global.cut();
        let ((registry, presence, locations), changes) = match &settling.pending {
            Pending::Build => (
                (
                    self.registry.snapshot(|rec| rec.as_ref().map(|r| RecordText(r.record.clone()))),
                    self.presence.snapshot(|online| *online),
                    self.locations.snapshot(|l| *l),
                ),
                0,
            ),
            Pending::Changes { log, .. } => (Default::default(), log.len()),
            Pending::Settled(_) => (Default::default(), 0),
        };
        let global = GlobalSnapshot {
            registry,
            presence,
            locations,
            interactions: self.interactions.clone(),
            positions: self.global_positions(),
            sink_positions: self.sink_positions.clone(),
        };
        tracing::trace!(
            message = "Engine snapshot.",
            prune_us = pruned.as_micros() as u64,
            partitions_us = (partitioned - pruned).as_micros() as u64,
            global_us = (started.elapsed() - partitioned).as_micros() as u64,
            registry = global.registry.rows.len(),
            presence = global.presence.rows.len(),
            locations = global.locations.rows.len(),
            changes,
        );
        Checkpoint { partitions, global, settling: Some(settling) }
    }

    /// Does up to `budget` rows of the next checkpoint's work per table ahead of it, between
    /// micro-batches: the global tables' prune, and shared among the partitions this worker
    /// holds, the windows' prune, then copying rows written since into the mirrors; and a step of
    /// the timing schedules' eviction (see [`crate::timing::Schedules::evict_step`]: idle ones,
    /// and those over the worker's cap). Returns the rows [`Engine::checkpoint`] would still copy
    /// or judge (its pause grows with them), and those an eviction pass over the cap has still to
    /// judge. The state is unchanged but for versions and windows pruned earlier than the
    /// checkpoint would (with the watermarks of this call) and the schedules evicted.
    pub fn checkpoint_step(&mut self, budget: usize) -> usize {
        let lateness = self.cfg.allowed_lateness_ms;
        let timing = &self.cfg.timing;
        let forget_ms = i64::from(timing.forget_after_days) * 86_400_000;
        // The cap is the worker's: each messages partition it holds gets an even share.
        let holders = self.partitions.keys().filter(|(topic, _)| *topic == InputTopic::Messages).count().max(1) as u64;
        let cap = match timing.max_schedules {
            0 => usize::MAX,
            n => usize::try_from((n / holders).max(1)).unwrap_or(usize::MAX),
        };
        let mut left = 0;
        // The global tables' prune, ahead of the cut's (which finishes it at the cut's horizon,
        // and which the replica's log records: see `global.rs`).
        if let Some(horizon) = self.global_prune_horizon() {
            left += self.registry.prune_step(horizon, budget);
            left += self.presence.prune_step(horizon, budget);
            left += self.locations.prune_step(horizon, budget);
        }
        let budget = (budget / self.partitions.len().max(1)).max(1);
        for state in self.partitions.values_mut() {
            let watermark = state.watermark(lateness);
            left += state.throttles.prune_step(watermark, budget);
            left += state.throttles.windows.mirror_step(budget);
            let idle_before_ms = if forget_ms == 0 { i64::MIN } else { watermark.saturating_sub(forget_ms) };
            let (urgent, evicted) = state.schedules.evict_step(Eviction { idle_before_ms, cap }, budget);
            self.stats.schedules_evicted[0] += evicted.idle;
            self.stats.schedules_evicted[1] += evicted.over_cap;
            left += urgent;
            left += state.schedules.mirror_step(budget);
        }
        left
    }

    /// A partition's state, to change directly (benchmarks and tools that drive a partition's
    /// state without micro-batches).
    pub fn partition_mut(&mut self, id: &PartitionId) -> Option<&mut PartitionState> {
        self.partitions.get_mut(id)
    }

    /// Takes back the mirrors of a written checkpoint (see [`Engine::checkpoint`]). Mirrors of
    /// partitions dropped or restored since are dropped.
    pub fn recycle(&mut self, r: Recycled) {
        if let Some((replica, epoch, spare)) = r.global {
            self.global.recycle(replica, epoch, spare);
        }
        for (id, windows, schedules) in r.mirrors {
            if let Some(state) = self.partitions.get_mut(&id) {
                state.throttles.windows.recycle(windows);
                state.schedules.recycle(schedules);
            }
        }
    }

    /// Replaces the engine's state with a checkpoint's.
    pub fn restore(&mut self, mut cp: Checkpoint) -> Result<()> {
        cp.settle();
        self.partitions.clear();
        for (id, state) in cp.partitions {
            self.partitions.insert(id, state.into());
        }
        self.rebuild_enforcement_view();
        self.restore_global(cp.global)
    }

    /// Replaces the global tables with a snapshot's.
    pub fn restore_global(&mut self, g: GlobalSnapshot) -> Result<()> {
        self.global.reset();
        self.registry = Default::default();
        for (uuid, t, record) in g.registry.rows {
            self.apply_registry(uuid, t, record.map(|r| r.0));
        }
        self.presence = Default::default();
        self.presence.assert_rows(&g.presence.rows);
        self.locations = Default::default();
        self.locations.assert_rows(&g.locations.rows);
        self.interactions = g.interactions;
        self.global_positions.clear();
        for p in g.positions {
            self.global_positions.insert((p.topic, p.partition), p.next_offset);
        }
        self.sink_positions = g.sink_positions;
        Ok(())
    }
}

/// Where checkpoints live. `save` returns only once the checkpoint is durable.
pub trait CheckpointStore: Send + std::fmt::Debug {
    /// Writes a checkpoint durably (every file fsynced before returning), settled first
    /// ([`Checkpoint::settle`]).
    fn save(&self, cp: &mut Checkpoint) -> Result<()>;
    /// Reads the latest checkpoint of every partition and the global tables; `None` when there is
    /// none yet (a fresh start). In a directory shared by several workers this includes partitions
    /// other workers own: a worker restores the global part and loads partitions as it is assigned
    /// them ([`CheckpointStore::load_partition`]).
    fn load(&self) -> Result<Option<Checkpoint>>;
    /// Reads only the global part of the latest checkpoint (what a worker restores at start).
    fn load_global(&self) -> Result<Option<GlobalSnapshot>>;
    /// Reads one partition's latest state (for a partition this worker just took over).
    fn load_partition(&self, id: &PartitionId) -> Result<Option<PartitionSnapshot>>;
}

/// Checkpoints in a local directory (the default; a directory every worker can read keeps state
/// following its partition across workers of one machine).
#[derive(Debug, Clone)]
pub struct LocalCheckpointStore {
    dir: PathBuf,
}

impl LocalCheckpointStore {
    /// A store in `dir`, created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(dir.join("partitions")).map_err(|source| Error::CheckpointIo { path: dir.display().to_string(), source })?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn partition_file(&self, (topic, partition): &PartitionId) -> PathBuf {
        self.dir.join("partitions").join(format!("{}-{partition}.ckpt", topic.as_str()))
    }

    fn write_atomic(&self, path: &Path, value: &impl Serialize) -> Result<()> {
        let io = |source| Error::CheckpointIo { path: path.display().to_string(), source };
        // A temporary name of this process's own: workers sharing the directory write the same
        // files (`global.ckpt`, a partition's file around a rebalance), and a shared temporary name
        // would let one worker rename away the other's half-written file.
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        // Encoded straight into the file through a buffer: the large byte strings of a partition's
        // snapshot go from its memory to the kernel, never through a copy of the whole file.
        let mut out = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io)?);
        out.write_all(MAGIC).map_err(io)?;
        let out =
            postcard::to_io(value, out).map_err(|e| Error::CheckpointFormat { name: path.display().to_string(), reason: e.to_string() })?;
        let f = out.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)?;
        if let Some(parent) = path.parent() {
            File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, path: &Path) -> Result<Option<T>> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::CheckpointIo { path: path.display().to_string(), source });
            }
        };
        let bad = |reason: String| Error::CheckpointFormat { name: path.display().to_string(), reason };
        let body = match bytes.strip_prefix(MAGIC.as_slice()) {
            Some(body) => body,
            None if bytes.starts_with(MAGIC_NAME) => {
                let found = String::from_utf8_lossy(&bytes[MAGIC_NAME.len()..bytes.len().min(MAGIC.len())]);
                let want = String::from_utf8_lossy(&MAGIC[MAGIC_NAME.len()..]);
                return Err(bad(format!(
                    "a meshguard checkpoint of format version {found}, this meshguard reads version {want} only \
                     (written by another release: restore it with that release, or move the checkpoint directory away to start with empty state)"
                )));
            }
            None => return Err(bad("not a meshguard checkpoint (bad magic)".into())),
        };
        postcard::from_bytes(body).map(Some).map_err(|e| bad(e.to_string()))
    }
}

impl CheckpointStore for LocalCheckpointStore {
    fn save(&self, cp: &mut Checkpoint) -> Result<()> {
        cp.settle();
        for (id, state) in &cp.partitions {
            self.write_atomic(&self.partition_file(id), state)?;
        }
        self.write_atomic(&self.dir.join("global.ckpt"), &cp.global)
    }

    fn load(&self) -> Result<Option<Checkpoint>> {
        let Some(global) = self.load_global()? else {
            return Ok(None);
        };
        let mut partitions = Vec::new();
        let dir = self.dir.join("partitions");
        let entries = fs::read_dir(&dir).map_err(|source| Error::CheckpointIo { path: dir.display().to_string(), source })?;
        for entry in entries {
            let path = entry.map_err(|source| Error::CheckpointIo { path: dir.display().to_string(), source })?.path();
            let Some(id) = parse_partition_file(&path) else {
                continue;
            };
            if let Some(state) = self.read::<PartitionSnapshot>(&path)? {
                partitions.push((id, state));
            }
        }
        partitions.sort_by_key(|(k, _)| *k);
        Ok(Some(Checkpoint { partitions, global, settling: None }))
    }

    fn load_global(&self) -> Result<Option<GlobalSnapshot>> {
        self.read(&self.dir.join("global.ckpt"))
    }

    fn load_partition(&self, id: &PartitionId) -> Result<Option<PartitionSnapshot>> {
        self.read(&self.partition_file(id))
    }
}

fn parse_partition_file(path: &Path) -> Option<PartitionId> {
    if path.extension()? != "ckpt" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    let (topic, partition) = stem.rsplit_once('-')?;
    let topic = InputTopic::ALL.into_iter().find(|t| t.as_str() == topic)?;
    Some((topic, partition.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::EngineConfig;
    use crate::throttle::{Attempt, Rule, Tightening};

    /// Checkpoints taken through the mirrors, with work done ahead by steps and the mirrors handed
    /// back (or not), hold exactly the partition's state at the cut, in memory and once written
    /// and read back.
    #[test]
    fn checkpoints_through_the_mirrors_hold_exactly_the_state_at_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalCheckpointStore::open(dir.path()).unwrap();
        let mut rng = SmallRng::seed_from_u64(9);
        let mut e = Engine::new(EngineConfig::default());
        let id = (InputTopic::Messages, 0);
        e.restore_partition(id, PartitionState::default().snapshot());
        let mut ts = 1_795_539_600_000i64;
        let mut outcomes = Vec::new();
        for round in 0..40 {
            for _ in 0..rng.random_range(1..4) {
                let state = e.partitions.get_mut(&id).unwrap();
                let attempts: Vec<Attempt> = (0..rng.random_range(0..5_000))
                    .map(|_| {
                        ts += rng.random_range(0..4);
                        let from = Uuid::from_u128(rng.random_range(0..20_000u128));
                        Attempt {
                            key: (from, Uuid::nil(), Rule::Requester),
                            ts,
                            fingerprint: rng.random(),
                            max: 10,
                            per_ms: 1_000,
                            first_of_attempt: true,
                        }
                    })
                    .collect();
                state.throttles.count_batch(&attempts, 30_000, &Tightening::default(), &mut outcomes);
                for a in &attempts {
                    state.schedules.get_or_default(&(a.key.0, Uuid::nil())).add(a.ts);
                }
                state.max_event_ms = ts;
                state.next_offset += attempts.len() as i64;
                if rng.random_range(0..2) == 0 {
                    e.checkpoint_step(rng.random_range(0..10_000));
                }
            }
            // Now and then a long quiet spell: the prune drops windows.
            if round % 5 == 4 {
                ts += 120_000;
                e.partitions.get_mut(&id).unwrap().max_event_ms = ts;
            }
            let mut cp = e.checkpoint();
            let want = e.partition(&id).unwrap().snapshot();
            assert_eq!(cp.partitions[0].1, want, "round {round}");
            store.save(&mut cp).unwrap();
            assert_eq!(store.load_partition(&id).unwrap().unwrap(), want, "round {round}: read back");
            if rng.random_range(0..4) > 0 {
                e.recycle(cp.into_recycled());
            }
        }
    }

    /// Checkpoints whose registry, presence and locations come from the checkpoint thread's
    /// replica (the changes since the previous checkpoint applied to it) restore tables that answer
    /// every lookup an attempt can still make as the engine's own tables do at the cut: through
    /// observations out of order, registrations and tombstones, prunes at checkpoints and between
    /// them, replicas handed back or not, and a restore.
    #[test]
    fn global_tables_written_from_the_replica_answer_as_the_engines_at_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalCheckpointStore::open(dir.path()).unwrap();
        let mut rng = SmallRng::seed_from_u64(11);
        let mut e = Engine::new(EngineConfig::default());
        // A messages partition with event time, so that prunes drop versions.
        let id = (InputTopic::Messages, 0);
        e.restore_partition(id, PartitionState::default().snapshot());
        let mut ts = 1_795_539_600_000i64;
        let keys = 50u128;
        let record = |uuid: Uuid, n: u8| {
            let json = format!(r#"{{"uuid":"{uuid}","kind":"device","type":"v{n}"}}"#);
            Arc::new(RegistryRecord::from_json(0, json.as_bytes()).unwrap())
        };
        let (mut replicated, mut copied) = (0, 0);
        let mut replica_home = false;
        for round in 0..40 {
            for _ in 0..rng.random_range(0..400) {
                ts += rng.random_range(0..50);
                let uuid = Uuid::from_u128(rng.random_range(0..keys));
                // Out of order by up to 2 s.
                let at = ts - rng.random_range(0..2_000);
                match rng.random_range(0..10) {
                    0 => {
                        let rec = (rng.random_range(0..4) > 0).then(|| record(uuid, rng.random_range(0..3)));
                        e.apply_registry(uuid, at, rec);
                    }
                    1..=3 => e.observe_presence(uuid, at, rng.random()),
                    _ => {
                        let lat = f64::from(rng.random_range(0..3u8));
                        e.observe_location(uuid, at, Location { lat: Some(lat), lon: Some(0.0), country: None });
                    }
                }
                // Steps ahead of the cut prune the tables part of the way, with the horizon of
                // their moment (the log does not record them: the cut's prune does for them).
                if rng.random_range(0..60) == 0 {
                    e.partitions.get_mut(&id).unwrap().max_event_ms = ts;
                    e.checkpoint_step(rng.random_range(1..30));
                }
            }
            e.partitions.get_mut(&id).unwrap().max_event_ms = ts;
            if round % 7 == 3 {
                // A prune between checkpoints (the engine's bench does that).
                e.prune();
                ts += rng.random_range(0..5_000);
                e.partitions.get_mut(&id).unwrap().max_event_ms = ts;
            }
            if round == 25 {
                // A restore: the replica away is stale from now on.
                let mut cp = e.checkpoint();
                cp.settle();
                e.restore_global(cp.global.clone()).unwrap();
                e.recycle(cp.into_recycled());
                replica_home = false;
            }
            let mut cp = e.checkpoint();
            if replica_home {
                assert!(
                    cp.global.locations.rows.is_empty() && cp.global.presence.rows.is_empty(),
                    "round {round}: nothing copied at the cut"
                );
                replicated += 1;
            } else {
                assert!(!cp.global.locations.rows.is_empty() || round == 0, "round {round}: copied at the cut");
                copied += 1;
            }
            store.save(&mut cp).unwrap();
            let mut back = Engine::new(EngineConfig::default());
            back.restore_global(store.load_global().unwrap().unwrap()).unwrap();
            // Pruned as the engine's: no more versions than it holds.
            assert!(back.presence.versions() <= e.presence.versions(), "round {round}: presence pruned");
            assert!(back.locations.versions() <= e.locations.versions(), "round {round}: locations pruned");
            let horizon = ts - EngineConfig::default().allowed_lateness_ms;
            for k in 0..keys {
                let k = Uuid::from_u128(k);
                for at in (horizon..ts + 100).step_by(97) {
                    assert_eq!(back.presence.get(&k, at), e.presence.get(&k, at), "round {round}: presence of {k} at {at}");
                    assert_eq!(back.locations.get(&k, at), e.locations.get(&k, at), "round {round}: location of {k} at {at}");
                    let name = |r: Option<&Option<Arc<crate::policy::CompiledRecord>>>| {
                        r.map(|r| r.as_ref().map(|c| c.record.device_type.clone()))
                    };
                    assert_eq!(name(back.registry.get(&k, at)), name(e.registry.get(&k, at)), "round {round}: registry of {k} at {at}");
                }
            }
            let replicated_now = replica_home;
            replica_home = rng.random_range(0..4) > 0;
            if replica_home {
                e.recycle(cp.into_recycled());
                if replicated_now {
                    // The applied log's buffers come back, empty, for the next log.
                    let spare = e.global.spare.as_ref().unwrap();
                    assert!(spare.len() == 0 && spare.locations.capacity() > 0, "round {round}: the log's buffers are reused");
                }
            }
        }
        assert!(replicated > 20 && copied > 5, "both paths taken: {replicated} from the replica, {copied} copied");
    }

    /// A log that outgrows the tables (checkpoints far apart) is dropped, and the next checkpoint
    /// copies the tables instead, with the same result.
    #[test]
    fn a_change_log_longer_than_the_tables_is_given_up_for_a_copy() {
        let mut e = Engine::new(EngineConfig::default());
        let id = (InputTopic::Messages, 0);
        e.restore_partition(id, PartitionState::default().snapshot());
        let uuid = Uuid::from_u128(1);
        let mut cp = e.checkpoint();
        cp.settle();
        e.recycle(cp.into_recycled());
        let entries = super::super::global::LOG_MIN_ENTRIES as i64 + 1;
        for t in 0..entries {
            // Every observation a change: a log entry each, one key.
            e.observe_presence(uuid, 1_795_539_600_000 + t, t % 2 == 0);
        }
        assert!(e.global.home.is_some() && e.global.log.as_ref().unwrap().len() as i64 == entries);
        e.process(&crate::MicroBatch::default(), 0);
        assert!(e.global.home.is_none() && e.global.log.is_none(), "log and replica given up");
        let mut cp = e.checkpoint();
        assert!(!cp.global.presence.rows.is_empty(), "the tables are copied at the cut");
        cp.settle();
        let mut back = Engine::new(EngineConfig::default());
        back.restore_global(cp.global.clone()).unwrap();
        let last = 1_795_539_600_000 + entries - 1;
        assert_eq!(back.presence.get(&uuid, last), e.presence.get(&uuid, last));
        e.recycle(cp.into_recycled());
        assert!(e.global.home.is_some(), "a replica again, built from the copy");
    }
}
