//! The detection worker's loop: poll → decode → detect → publish, with periodic checkpoints.
//!
//! Every micro-batch's decoded attempts (allowed or not) are appended to the attempt archive
//! (`[archive]`, Parquet) before detection.
//!
//! The checkpoint protocol (effectively once):
//! 1. cut the producer's stream: every finding and dead letter sent so far is to be on the broker
//!    before the checkpoint is written (the checkpoint thread waits for their acknowledgements; a
//!    checkpoint at start and stop flushes instead); take every open archive file off the archive,
//!    to be closed (fsynced and renamed into place) before the checkpoint is written, so the
//!    archive holds every attempt the checkpoint will call consumed;
//! 2. note the findings topic's end offsets in the engine (for the read-back on restore): exact at
//!    start and stop, otherwise lower bounds known without a round trip (see
//!    `Pipeline::start_checkpoint`);
//! 3. snapshot the engine and save it durably (state and input offsets together): the snapshot on
//!    this thread, the write on the checkpoint thread while this one goes on (see
//!    [`crate::checkpointer`]). Once a checkpoint is due, each turn of the loop first does a slice
//!    of its work ahead (`Engine::checkpoint_step`: the windows' prune, copying the rows written
//!    since the last checkpoint into the tables' mirrors, which the checkpoint thread hands back
//!    once written), so that the snapshot itself copies only what the last turns wrote;
//! 4. only then, once the write is durable, commit the same input offsets to the consumer group.
//!
//! On start: restore the checkpoint, read back the findings written after it (a crash may have
//! left some) so the replay does not repeat them, read the registry and presence to their end,
//! then resume every partition from its checkpointed offset.
//!
//! After the checkpoint, archive folders past `archive.retention_days` are deleted.
//!
//! The loop runs on one OS thread and never blocks on anything but Kafka polls and flushes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use meshguard_analytics::enforcement::Status;
use meshguard_analytics::sql::{SqlSources, tables};
use meshguard_analytics::{CHECKPOINT_CUT_ROWS, CHECKPOINT_STEP_ROWS, CheckpointStore, Engine, LocalCheckpointStore, Position};
use meshguard_ingest::archive::{ATTEMPTS, ENFORCEMENT, FINDINGS, INTERACTIONS};
use meshguard_ingest::source::{OffsetResolver, RawBatch, RebalanceEvent, RevokeHook};
use meshguard_ingest::{
    ArchiveMetrics, Assembled, IngestMetrics, KafkaConfig, KafkaSink, KafkaSource, ParquetArchive, Topics, assemble, assemble_only,
    positions,
};
use meshguard_schemas::output::Finding;
use meshguard_schemas::{BatchDecoder, EnforcementStateKind, FindingKind, InputTopic, Outcome};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tracing::{info, warn};

use crate::background::SchedTimes;
use crate::checkpointer::{Checkpointer, Done, Outputs};
use crate::config::Config;

/// How long Kafka admin and flush calls may take before the worker gives up.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// Turns of the loop a due checkpoint may spend on work done ahead of it (see
/// [`Pipeline::start_checkpoint`]) before it is taken whatever is left: a state written faster
/// than the steps copy it still gets checkpointed (with a longer pause).
const MAX_CHECKPOINT_STEPS: u32 = 200;

/// Longest wait to read the global tables to their end before judging a micro-batch.
const GLOBAL_ALIGN_TIMEOUT: Duration = Duration::from_secs(5);

/// Counters shared with the live summary printer.
#[derive(Debug, Default)]
pub struct LiveStats {
    /// Input records read.
    pub records: AtomicU64,
    /// Records dead-lettered.
    pub dead_letters: AtomicU64,
    /// Findings per kind (indexed by code).
    pub findings: [AtomicU64; 12],
    /// Checkpoints written.
    pub checkpoints: AtomicU64,
}

/// Pipeline metrics beyond ingest's. Names follow Prometheus conventions (`meshguard_` prefix, base
/// units, `_total` counters, no UUIDs in labels); the README's "Metrics" lists them all.
#[derive(Debug, Clone)]
pub struct PipelineMetrics {
    findings: IntCounterVec,
    batch_seconds: Histogram,
    latency_seconds: Histogram,
    checkpoint_seconds: Histogram,
    checkpoint_pause_seconds: Histogram,
    late_events: IntCounter,
    throttle_tightenings: IntCounter,
    enforcement_changes: IntCounterVec,
    identity_results: IntCounterVec,
    consumer_lag: IntGauge,
    duplicates: IntCounter,
    timing_model_version: IntGauge,
    state: StateGauges,
}

/// Sizes of the worker's state, set on the checkpoint cadence (walking the tables per micro-batch
/// would cost more than the batch). Entries, not bytes, except where the store can say its bytes
/// cheaply: a growing count is what an alert or a capacity plan needs.
#[derive(Debug, Clone)]
struct StateGauges {
    partitions: IntGauge,
    registry: IntGauge,
    presence: IntGauge,
    locations: IntGauge,
    interactions: IntGauge,
    throttle_windows: IntGauge,
    throttle_bytes: IntGauge,
    tightened: IntGauge,
    offenders: IntGauge,
    restricted: IntGauge,
    dedup: IntGauge,
    schedules: IntGauge,
    schedules_evicted: IntCounterVec,
}

impl StateGauges {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            partitions: gauge("meshguard_owned_partitions", "Input partitions the consumer group assigned to this worker.")?,
            registry: gauge(
                "meshguard_registry_entries",
                "UUIDs in the registry global table (tombstoned ones still within the allowed lateness included).",
            )?,
            presence: gauge("meshguard_presence_entries", "UUIDs in the presence global table.")?,
            locations: gauge("meshguard_location_entries", "UUIDs with a latest known location.")?,
            interactions: gauge("meshguard_interaction_entries", "Interactions held across every device's interaction table.")?,
            throttle_windows: gauge(
                "meshguard_throttle_windows",
                "Open throttle windows (requester, target and rule) of the owned partitions.",
            )?,
            throttle_bytes: gauge(
                "meshguard_throttle_state_bytes",
                "Approximate memory of the throttle state of the owned partitions, allocator overhead aside.",
            )?,
            tightened: gauge("meshguard_throttle_tightened_requesters", "Requesters whose throttle limits are currently tightened.")?,
            offenders: gauge(
                "meshguard_enforcement_offenders",
                "Offenders with counted unauthorized attempts or a status, in the owned partitions.",
            )?,
            restricted: gauge(
                "meshguard_enforcement_restricted_offenders",
                "Offenders currently blocked or unregistered, in the owned partitions.",
            )?,
            dedup: gauge("meshguard_dedup_entries", "Finding ids remembered within the dedup horizon, in the owned partitions.")?,
            schedules: gauge(
                "meshguard_timing_schedules",
                "Learned timing schedules (per pair and per requester) of the owned partitions.",
            )?,
            schedules_evicted: {
                let c = IntCounterVec::new(
                    Opts::new(
                        "meshguard_timing_schedules_evicted_total",
                        "Online timing schedules dropped: idle for longer than timing.forget_after_days, or over the worker's \
                         timing.max_schedules.",
                    ),
                    &["reason"],
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
        })
    }

    /// Reads the sizes from `engine` for the partitions in `owned`.
    fn set(&self, engine: &Engine, owned: &std::collections::HashSet<(InputTopic, i32)>) {
        let (mut windows, mut bytes, mut tightened, mut offenders, mut restricted, mut dedup, mut schedules) = (0, 0, 0, 0, 0, 0, 0);
        for state in owned.iter().filter_map(|id| engine.partition(id)) {
            windows += state.throttles.windows.len();
            bytes += state.throttles.approximate_bytes();
            tightened += state.throttles.tightened.len();
            offenders += state.enforcement.len();
            restricted += state.enforcement.values().filter(|o| o.status != Status::Active).count();
            dedup += state.emitted.len();
            schedules += state.schedules.len();
        }
        let set = |g: &IntGauge, n: usize| g.set(i64::try_from(n).unwrap_or(i64::MAX));
        set(&self.partitions, owned.len());
        set(&self.registry, engine.registry_len());
        set(&self.presence, engine.presence_len());
        set(&self.locations, engine.locations_len());
        set(&self.interactions, engine.interactions_len());
        set(&self.throttle_windows, windows);
        set(&self.throttle_bytes, bytes);
        set(&self.tightened, tightened);
        set(&self.offenders, offenders);
        set(&self.restricted, restricted);
        set(&self.dedup, dedup);
        set(&self.schedules, schedules);
        // The engine's counts never go down: the counters take what they have not seen yet.
        for (reason, n) in ["idle", "over_cap"].into_iter().zip(engine.stats().schedules_evicted) {
            let c = self.schedules_evicted.with_label_values(&[reason]);
            c.inc_by(n.saturating_sub(c.get()));
        }
        tracing::debug!(
            message = "State sizes.",
            registry = engine.registry_len(),
            presence = engine.presence_len(),
            locations = engine.locations_len(),
            interactions = engine.interactions_len(),
            windows,
            bytes,
            offenders,
            dedup,
            schedules
        );
    }
}

impl PipelineMetrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let findings = IntCounterVec::new(Opts::new("meshguard_findings_total", "Findings published, by kind."), &["kind"])?;
        let buckets = prometheus::exponential_buckets(0.000_5, 2.0, 16)?;
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new("meshguard_batch_duration_seconds", "Time to decode, detect and publish one micro-batch.")
                .buckets(buckets.clone()),
        )?;
        let latency_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "meshguard_detection_latency_seconds",
                "From an attempt's Kafka timestamp to its finding being queued for publishing.",
            )
            .buckets(buckets.clone()),
        )?;
        let checkpoint_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "meshguard_checkpoint_duration_seconds",
                "From the start of a checkpoint (the flush) until it is durable and its offsets committed.",
            )
            .buckets(buckets.clone()),
        )?;
        let checkpoint_pause_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "meshguard_checkpoint_pause_seconds",
                "Time the pipeline stops judging attempts for a checkpoint: the snapshot (the wait for the outputs' acknowledgements, closing archive files and the write run on the checkpoint thread).",
            )
            .buckets(buckets),
        )?;
        let late_events = IntCounter::new("meshguard_late_events_total", "Events older than their partition's watermark on arrival.")?;
        let throttle_tightenings = IntCounter::new(
            "meshguard_throttle_tightenings_total",
            "Times a requester's throttle limits were tightened after a breach (throttles.tightening).",
        )?;
        let enforcement_changes = IntCounterVec::new(
            Opts::new("meshguard_enforcement_changes_total", "Enforcement state changes published, by the new state."),
            &["state"],
        )?;
        let identity_results =
            IntCounterVec::new(Opts::new("meshguard_identity_results_total", "Identity requests answered, by outcome."), &["outcome"])?;
        let consumer_lag =
            IntGauge::new("meshguard_consumer_lag_records", "Records of the keyed input topics not yet consumed by this worker.")?;
        let duplicates = IntCounter::new(
            "meshguard_duplicate_findings_total",
            "Findings not published again because one with the same id was already (a replay after a restart or rebalance).",
        )?;
        let timing_model_version =
            IntGauge::new("meshguard_timing_model_version", "Version of the trained timing model the worker scores with (0: none yet).")?;
        let collectors: [Box<dyn prometheus::core::Collector>; 12] = [
            Box::new(findings.clone()),
            Box::new(batch_seconds.clone()),
            Box::new(latency_seconds.clone()),
            Box::new(checkpoint_seconds.clone()),
            Box::new(checkpoint_pause_seconds.clone()),
            Box::new(late_events.clone()),
            Box::new(throttle_tightenings.clone()),
            Box::new(enforcement_changes.clone()),
            Box::new(identity_results.clone()),
            Box::new(consumer_lag.clone()),
            Box::new(duplicates.clone()),
            Box::new(timing_model_version.clone()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        // Every series of a closed vocabulary exists from the start, at 0: a dashboard then shows
        // "none yet" rather than "no data", and `rate()` and `increase()` see the first increment.
        for kind in FindingKind::NAMES {
            findings.with_label_values(&[kind]);
        }
        for state in EnforcementStateKind::NAMES {
            enforcement_changes.with_label_values(&[state]);
        }
        for outcome in Outcome::NAMES {
            identity_results.with_label_values(&[outcome]);
        }
        Ok(Self {
            findings,
            batch_seconds,
            latency_seconds,
            checkpoint_seconds,
            checkpoint_pause_seconds,
            late_events,
            throttle_tightenings,
            enforcement_changes,
            identity_results,
            consumer_lag,
            duplicates,
            timing_model_version,
            state: StateGauges::new(registry)?,
        })
    }
}

/// One detection worker. See the module docs.
pub struct Pipeline {
    cfg: Config,
    source: KafkaSource,
    sink: Arc<KafkaSink>,
    /// The findings topic's end offsets, as last read by the thread that asks the broker (see
    /// [`FindingsEnds`]).
    findings_ends: FindingsEnds,
    engine: Engine,
    store: LocalCheckpointStore,
    checkpointer: Checkpointer,
    /// Steps done ahead of the checkpoint due (see [`Pipeline::start_checkpoint`]).
    checkpoint_steps: u32,
    /// The archive (`archive.enabled`): attempts, findings and enforcement changes, each also
    /// readable live by the SQL surface until its file closes.
    archive: Option<Archives>,
    /// The tables' live sources, shared with the SQL surface.
    sql: SqlSources,
    /// The devices version last written to the devices snapshot, and when.
    devices_written: (u64, Option<Instant>),
    decoders: [BatchDecoder; 4],
    topics: Topics,
    ingest_metrics: IngestMetrics,
    metrics: PipelineMetrics,
    stats: Arc<LiveStats>,
    reported_late: u64,
    reported_tightenings: u64,
    reported_duplicates: u64,
    /// Partitions of the keyed topics the group has assigned to this worker.
    owned: std::collections::HashSet<(InputTopic, i32)>,
    /// The background trainer of the timing model (`timing.train_every_s`), if on.
    trainer: Option<crate::train::Trainer>,
}

/// Decodes the messages topic of `raw` and archives its attempts: the part of a micro-batch's
/// handling that needs no global table, run while the alignment reads them (see `Pipeline::run`).
fn decode_attempts(
    raw: &RawBatch,
    decoders: &mut [BatchDecoder; 4],
    archive: &mut Option<Archives>,
    topics: &Topics,
    cfg: &Config,
) -> anyhow::Result<Assembled> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let attempts = assemble_only(raw, decoders, topics, cfg.pipeline.max_record_bytes, now_ms, |t| t == InputTopic::Messages);
    if let (Some(archive), Some(messages)) = (archive, &attempts.batch.messages) {
        archive.attempts.append(&messages.batch).context("archiving attempts")?;
    }
    Ok(attempts)
}

/// The archive's tables.
#[derive(Debug)]
struct Archives {
    attempts: ParquetArchive,
    interactions: ParquetArchive,
    findings: ParquetArchive,
    enforcement: ParquetArchive,
}

impl Archives {
    fn all(&mut self) -> [&mut ParquetArchive; 4] {
        [&mut self.attempts, &mut self.interactions, &mut self.findings, &mut self.enforcement]
    }
}

/// How often at most the devices snapshot (for `meshguard sql` outside the worker) is rewritten.
const DEVICES_SNAPSHOT_EVERY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Connects to `kafka`, restores the checkpoint in `cfg.pipeline.checkpoint_dir` and reads the
    /// global tables to their end. Returns when the worker is ready to detect. `sql` are the live
    /// sources the worker keeps current for its SQL surface (see `meshguard_analytics::sql`).
    pub fn start(cfg: Config, kafka: &KafkaConfig, registry: &Registry, stats: Arc<LiveStats>, sql: SqlSources) -> anyhow::Result<Self> {
        let topics = cfg.topics.clone();
        let store = LocalCheckpointStore::open(&cfg.pipeline.checkpoint_dir)
            .with_context(|| format!("opening the checkpoint directory {}", cfg.pipeline.checkpoint_dir.display()))?;
        let mut engine = Engine::new(cfg.engine());
        let checkpoint = store.load_global().context("reading the last checkpoint")?;
        let mut global_positions = Vec::new();
        let mut sink_positions = Vec::new();
        if let Some(global) = checkpoint {
            info!(message = "Restoring the global tables from checkpoint.", dir = %store.dir().display());
            // Only the global tables now. A partition's state is loaded when the group assigns it
            // to this worker (see `apply_rebalance`): the directory may be shared with other
            // workers, and adopting their partitions would save and commit stale offsets.
            engine.restore_global(global).context("restoring the checkpoint")?;
            global_positions = engine.global_positions();
            sink_positions = engine.sink_positions.clone();
        }

        // Each partition resumes where its own checkpoint file says, read at assignment time:
        // whichever worker gets a partition gets its state.
        let resolver_store = store.clone();
        let resolver: OffsetResolver = Arc::new(move |topic, partition| {
            resolver_store.load_partition(&(topic, partition)).ok().flatten().map(|s| s.next_offset).filter(|o| *o > 0)
        });
        let sink = Arc::new(KafkaSink::tracking_ends(kafka, &topics.findings)?);
        // Before the group hands our partitions to another worker, every finding we produced must
        // be on the topic, so the next owner's read-back sees it and does not repeat it.
        // And the checkpoint being written, if any, must be on disk before the next owner reads it.
        let checkpointer = Checkpointer::start(store.clone()).context("starting the checkpoint thread")?;
        let revoke_sink = sink.clone();
        let written = checkpointer.waiter();
        let on_revoke: RevokeHook = Arc::new(move || {
            written.wait();
            if let Err(e) = revoke_sink.flush(KAFKA_TIMEOUT) {
                warn!(message = "Flushing outputs before a rebalance failed; the next owner may repeat some.", error = %e);
            }
        });
        let source = KafkaSource::new(kafka, topics.clone(), resolver, on_revoke)?;

        // Findings written after the checkpoint by a run that crashed: the replay must not repeat
        // them. They were only in the crashed run's open (deleted) archive files: archive them now.
        let mut recovered = Vec::new();
        if !sink_positions.is_empty() {
            let read = read_back_findings(&sink, &topics, &sink_positions, &mut engine, &mut recovered)?;
            info!(message = "Read back findings written after the checkpoint.", count = read);
        }

        let decoders = [InputTopic::Messages, InputTopic::Presence, InputTopic::Interactions, InputTopic::IdentityRequests]
            .map(|t| BatchDecoder::new(t).with_max_record_bytes(cfg.pipeline.max_record_bytes));
        let ingest_metrics = IngestMetrics::new(registry)?;
        let metrics = PipelineMetrics::new(registry)?;
        let archive = if cfg.archive.enabled {
            let metrics = ArchiveMetrics::new(registry)?;
            let now = chrono::Utc::now().timestamp_millis();
            let open = |table: &str, schema, live: &Option<Arc<meshguard_analytics::sql::LiveRows>>| -> anyhow::Result<ParquetArchive> {
                let archive = ParquetArchive::open(&cfg.archive, table, schema, kafka.instance_id.as_deref(), now, &metrics)
                    .with_context(|| format!("opening the archive's {table} in {}", cfg.archive.dir.display()))?;
                Ok(match live {
                    Some(live) => archive.with_live(live.clone()),
                    None => archive,
                })
            };
            let mut archives = Archives {
                attempts: open(ATTEMPTS, InputTopic::Messages.schema(), &sql.attempts)?,
                interactions: open(INTERACTIONS, InputTopic::Interactions.schema(), &sql.interactions)?,
                findings: open(FINDINGS, tables::findings_schema(), &sql.findings)?,
                enforcement: open(ENFORCEMENT, tables::enforcement_schema(), &sql.enforcement)?,
            };
            if !recovered.is_empty() {
                archives.findings.append(&tables::findings_batch(&recovered)?).context("archiving recovered findings")?;
            }
            info!(message = "Archiving attempts, interactions, findings and enforcement changes.", dir = %cfg.archive.dir.display());
            Some(archives)
        } else {
            None
        };
        // The newest trained timing model, then a trainer that refreshes it off the hot path.
        let models_dir = cfg.timing.models_dir_beside(&cfg.archive.dir);
        let model = crate::train::load_newest(&models_dir);
        let trainer = if cfg.timing.enabled && cfg.timing.train_every_s > 0 && cfg.archive.enabled {
            let newest = model.as_ref().map(|m| m.trained_at_ms);
            Some(crate::train::Trainer::start(cfg.timing.clone(), cfg.archive.dir.clone(), models_dir, newest)?)
        } else {
            None
        };
        metrics.timing_model_version.set(model.as_ref().map_or(0, |m| i64::try_from(m.version).unwrap_or(i64::MAX)));
        engine.set_timing_model(model);
        let findings_ends =
            FindingsEnds::start(sink.clone(), topics.findings.clone(), Duration::from_millis(cfg.pipeline.checkpoint_interval_ms))?;
        let mut pipeline = Self {
            cfg,
            source,
            findings_ends,
            sink,
            engine,
            store,
            checkpointer,
            checkpoint_steps: 0,
            archive,
            sql,
            devices_written: (0, None),
            decoders,
            topics,
            ingest_metrics,
            metrics,
            stats,
            reported_late: 0,
            reported_tightenings: 0,
            reported_duplicates: 0,
            owned: Default::default(),
            trainer,
        };

        // Requesters' per-requester state lives in a home partition whatever the case of their key.
        let messages_partitions = pipeline.source.partition_count(&pipeline.topics.messages, KAFKA_TIMEOUT)?;
        pipeline.engine.set_messages_partitions(u32::try_from(messages_partitions).unwrap_or(0));
        // The interactions topic's watermark is the oldest of its partitions' (held identity requests).
        let interactions_partitions = pipeline.source.partition_count(pipeline.topics.input(InputTopic::Interactions), KAFKA_TIMEOUT)?;
        pipeline.engine.set_interactions_partitions(u32::try_from(interactions_partitions).unwrap_or(0));
        pipeline.source.start_globals(&global_positions, KAFKA_TIMEOUT)?;
        pipeline.source.start_readers(KAFKA_TIMEOUT)?;
        let mut raw = RawBatch::default();
        pipeline.source.catch_up_globals(&mut raw, Duration::from_secs(120))?;
        let n = raw.len();
        pipeline.handle(&raw, None)?;
        info!(message = "Global tables loaded.", records = n, registered = pipeline.engine.registry_len());
        // A checkpoint before the first finding: it records where the findings topic ended, so a
        // crash before the first periodic checkpoint is still read back, not repeated.
        pipeline.checkpoint_now()?;
        Ok(pipeline)
    }

    /// Runs until `stop` is set, then writes a last checkpoint.
    pub fn run(mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let max_records = self.cfg.pipeline.batch_max_records;
        let max_wait = Duration::from_millis(self.cfg.pipeline.batch_max_wait_ms);
        let linger = Duration::from_millis(self.cfg.pipeline.batch_linger_ms);
        let interval = Duration::from_millis(self.cfg.pipeline.checkpoint_interval_ms);
        let mut raw = RawBatch::default();
        let mut extra = RawBatch::default();
        let mut last_checkpoint = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            raw.clear();
            self.source.poll(&mut raw, max_records, max_wait, linger);
            let polled = Instant::now();

            self.apply_rebalance();
            // Manual overrides, in the control topic's order, before the batch is judged; only
            // once the group has given this worker its partitions (the owner of a UUID's home
            // partition applies its overrides, and until then this worker owns none).
            // Other workers' enforcement state, for requesters and targets homed on them.
            let mut remote = Vec::new();
            self.source.poll_enforcement(&mut remote);
            for state in &remote {
                self.engine.apply_remote_enforcement(state);
            }
            if !self.owned.is_empty() {
                let mut commands = Vec::new();
                self.source.poll_control(&mut commands);
                if !commands.is_empty() {
                    for cmd in &commands {
                        info!(message = "Applying a manual override.", uuid = %cmd.uuid, command = ?cmd.command);
                        self.engine.apply_control(cmd);
                    }
                    self.publish_enforcement()?;
                }
            }
            for topic in [InputTopic::Messages, InputTopic::IdentityRequests] {
                let owned = &self.owned;
                raw.retain_partitions(topic, |p| owned.contains(&(topic, p)));
            }
            // Identity requests held for interactions still to come (see `crosscheck::HeldRequest`)
            // are released by the interactions read or by time, so the loop runs the engine even
            // when nothing new arrived.
            let held = self.engine.identity_requests_held() > 0;
            if self.cfg.pipeline.align_global_tables
                && (held || !(raw.topic(InputTopic::Messages).is_empty() && raw.topic(InputTopic::IdentityRequests).is_empty()))
            {
                // Registry and presence records already on the broker apply to these attempts, and
                // the interactions to identity requests (only those need them).
                let needed: &[InputTopic] = if held || !raw.topic(InputTopic::IdentityRequests).is_empty() {
                    &InputTopic::GLOBAL
                } else {
                    &[InputTopic::Registry, InputTopic::Presence]
                };
                // The wait for the global consumer's fetch overlaps the decoding and archiving of
                // the attempts, which need no global table.
                extra.clear();
                let (source, extra_out) = (&self.source, &mut extra);
                let (aligned, attempts) = std::thread::scope(|scope| {
                    let aligning = std::thread::Builder::new()
                        .name("meshguard-align".into())
                        .spawn_scoped(scope, move || {
                            let started = Instant::now();
                            (source.catch_up(needed, extra_out, GLOBAL_ALIGN_TIMEOUT), started.elapsed())
                        })
                        .map_err(anyhow::Error::from);
                    let decoding = Instant::now();
                    let attempts = decode_attempts(&raw, &mut self.decoders, &mut self.archive, &self.topics, &self.cfg)
                        .map(|attempts| (attempts, decoding.elapsed()));
                    let aligned = aligning.and_then(|h| h.join().map_err(|_| anyhow::anyhow!("the alignment thread panicked")));
                    (aligned, attempts)
                });
                let attempts = attempts?;
                match aligned? {
                    (Ok(read), took) => tracing::debug!(message = "Global tables aligned.", read, ms = took.as_millis() as u64),
                    (Err(e), _) => warn!(message = "Could not read the global tables to their end; judging with what is read.", error = %e),
                }
                raw.append(&extra);
                self.handle(&raw, Some(attempts))?;
            } else if !raw.is_empty() || held {
                self.handle(&raw, None)?;
            }
            if tracing::enabled!(tracing::Level::TRACE) && !raw.topic(InputTopic::Messages).is_empty() {
                // How long the batch's attempts had been on the broker when the poll ended (their
                // Kafka timestamps), and how long judging them took after it.
                let stamps = &raw.topic(InputTopic::Messages).timestamp_ms;
                let polled_ms = chrono::Utc::now().timestamp_millis() - polled.elapsed().as_millis() as i64;
                let (oldest, newest) = (stamps.iter().min().copied().unwrap_or(0), stamps.iter().max().copied().unwrap_or(0));
                tracing::trace!(
                    message = "Micro-batch judged.",
                    attempts = stamps.len(),
                    oldest_age_ms = polled_ms - oldest,
                    newest_age_ms = polled_ms - newest,
                    ms = polled.elapsed().as_millis() as u64
                );
            }
            // A model trained in the background takes over between micro-batches.
            if let Some(model) = self.trainer.as_ref().and_then(crate::train::Trainer::poll) {
                info!(message = "Timing model swapped in.", version = model.version, keys = model.len());
                self.metrics.timing_model_version.set(i64::try_from(model.version).unwrap_or(i64::MAX));
                self.engine.set_timing_model(Some(model));
            }
            if let Some(done) = self.checkpointer.try_done() {
                self.finish_checkpoint(done?)?;
            }
            // Due, and the previous one written: otherwise it waits for a later turn (and until
            // the work done ahead of it leaves a short pause).
            if last_checkpoint.elapsed() >= interval && !self.checkpointer.in_flight() && self.start_checkpoint(false)? {
                if let Some(lag) = self.source.lag() {
                    self.metrics.consumer_lag.set(lag);
                }
                last_checkpoint = Instant::now();
            }
        }
        self.checkpoint_now()?;
        info!(message = "Stopped after a final checkpoint.");
        Ok(())
    }

    fn apply_rebalance(&mut self) {
        for event in self.source.take_rebalance_events() {
            match event {
                RebalanceEvent::Assigned(partitions) => {
                    self.owned.extend(partitions.iter().copied());
                    self.engine.assign(&partitions);
                    for id in partitions {
                        if self.engine.partition(&id).is_none() {
                            match self.store.load_partition(&id) {
                                Ok(Some(state)) => {
                                    // Taken over from another worker: skip what it wrote after its checkpoint.
                                    // (The other worker archives them when it closes its files.)
                                    let mut ignored = Vec::new();
                                    if let Err(e) =
                                        read_back_findings(&self.sink, &self.topics, &state.sink_positions, &mut self.engine, &mut ignored)
                                    {
                                        warn!(message = "Reading back findings of a taken-over partition failed; repeats possible.", error = %e);
                                    }
                                    self.engine.restore_partition(id, state);
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    warn!(message = "Partition checkpoint unreadable; starting it empty.", topic = id.0.as_str(), partition = id.1, error = %e)
                                }
                            }
                        }
                    }
                }
                RebalanceEvent::Revoked(partitions) => {
                    self.engine.revoke(&partitions);
                    for id in partitions {
                        self.owned.remove(&id);
                        self.engine.drop_partition(&id);
                    }
                }
            }
        }
    }

    /// Decodes, archives and judges one micro-batch. `attempts`: its messages topic, already
    /// decoded and archived by [`decode_attempts`], and how long that took.
    fn handle(&mut self, raw: &RawBatch, attempts: Option<(Assembled, Duration)>) -> anyhow::Result<()> {
        // The batch's time: the attempts' decoding done ahead (while the global tables were read),
        // then the rest; not the wait for the global tables.
        let now = Instant::now();
        let started = attempts.as_ref().and_then(|(_, took)| now.checked_sub(*took)).unwrap_or(now);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let max_record_bytes = self.cfg.pipeline.max_record_bytes;
        let archived = attempts.is_some();
        let assembled = match attempts {
            Some((mut attempts, _)) => {
                let rest = assemble_only(raw, &mut self.decoders, &self.topics, max_record_bytes, now_ms, |t| t != InputTopic::Messages);
                let messages = attempts.batch.messages.take();
                attempts.dead_letters.extend(rest.dead_letters);
                Assembled {
                    batch: meshguard_analytics::MicroBatch { messages, positions: positions(raw), ..rest.batch },
                    dead_letters: attempts.dead_letters,
                }
            }
            None => assemble(raw, &mut self.decoders, &self.topics, max_record_bytes, now_ms),
        };
        for topic in InputTopic::ALL {
            let n = raw.topic(topic).len() as u64;
            if n > 0 {
                self.ingest_metrics.records.with_label_values(&[topic.as_str()]).inc_by(n);
            }
        }
        self.stats.records.fetch_add(raw.len() as u64, Ordering::Relaxed);

        for (key, dl) in &assembled.dead_letters {
            let topic = self.topics.input_of(&dl.topic).map_or("unknown", InputTopic::as_str);
            self.ingest_metrics.deadletters.with_label_values(&[topic, dead_letter_field(dl.field.as_deref())]).inc();
            let payload = serde_json::to_vec(dl)?;
            self.sink.send(&self.topics.deadletter, key, &payload)?;
        }
        self.stats.dead_letters.fetch_add(assembled.dead_letters.len() as u64, Ordering::Relaxed);

        // Archived before detection, so an archive failure stops the worker before anything of the
        // batch is published; the rows are durable at the next checkpoint (see the module docs).
        if let (false, Some(archive), Some(messages)) = (archived, &mut self.archive, &assembled.batch.messages) {
            archive.attempts.append(&messages.batch).context("archiving attempts")?;
        }
        // Every worker reads the interactions topic in full, and archives what it reads (the
        // cross-check's history, the SQL surface's `interactions`): with several workers each
        // entry is in the archive once per worker, and the `interactions` view shows it once.
        if let (Some(archive), Some(interactions)) = (&mut self.archive, &assembled.batch.interactions) {
            archive.interactions.append(&interactions.batch).context("archiving interactions")?;
        }
        if let Some(devices) = &self.sql.devices
            && !assembled.batch.registry.is_empty()
        {
            devices.apply(assembled.batch.registry.iter().map(|c| (c.uuid, c.effective_ms, c.record.as_ref())));
        }
        let findings = self.engine.process(&assembled.batch, now_ms);
        self.publish(&findings, raw, now_ms)?;
        self.publish_enforcement()?;
        let mut key = [0u8; 36];
        for result in self.engine.take_identity_results() {
            let payload = serde_json::to_vec(&result)?;
            let key = result.device.hyphenated().encode_lower(&mut key);
            self.sink.send(&self.topics.identity_results, key.as_bytes(), &payload)?;
            self.metrics.identity_results.with_label_values(&[result.outcome.as_str()]).inc();
        }

        let late = self.engine.stats().late_events;
        self.metrics.late_events.inc_by(late - self.reported_late);
        self.reported_late = late;
        let tightenings = self.engine.stats().tightenings;
        self.metrics.throttle_tightenings.inc_by(tightenings - self.reported_tightenings);
        self.reported_tightenings = tightenings;
        let duplicates = self.engine.stats().duplicates;
        self.metrics.duplicates.inc_by(duplicates - self.reported_duplicates);
        self.reported_duplicates = duplicates;
        self.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Enforcement changes, keyed by UUID on the compacted topic: a replay after a crash publishes
    /// the same records again, which compaction and every consumer treat as no change.
    fn publish_enforcement(&mut self) -> anyhow::Result<()> {
        let changes = self.engine.take_enforcement();
        if changes.is_empty() {
            return Ok(());
        }
        let mut key = [0u8; 36];
        for change in &changes {
            let payload = serde_json::to_vec(change)?;
            let key = change.uuid.hyphenated().encode_lower(&mut key);
            self.sink.send(&self.topics.enforcement, key.as_bytes(), &payload)?;
            self.metrics.enforcement_changes.with_label_values(&[change.state.as_str()]).inc();
        }
        if let Some(archive) = &mut self.archive {
            let batch = tables::enforcement_batch(&changes, chrono::Utc::now().timestamp_millis())?;
            archive.enforcement.append(&batch).context("archiving enforcement changes")?;
        }
        Ok(())
    }

    fn publish(&mut self, findings: &[Finding], raw: &RawBatch, now_ms: i64) -> anyhow::Result<()> {
        if findings.is_empty() {
            return Ok(());
        }
        // Latency from the newest Kafka timestamp of the attempts (arrival at the broker) to now.
        let arrived = raw.topic(InputTopic::Messages).timestamp_ms.iter().copied().max().unwrap_or(now_ms);
        let mut key = [0u8; 36];
        for f in findings {
            let payload = serde_json::to_vec(f)?;
            let key = f.offender.hyphenated().encode_lower(&mut key);
            self.sink.send(&self.topics.findings, key.as_bytes(), &payload)?;
            let kind = f.kind.code() as usize;
            self.stats.findings[kind].fetch_add(1, Ordering::Relaxed);
            self.metrics.findings.with_label_values(&[f.kind.as_str()]).inc();
        }
        self.metrics.latency_seconds.observe(((now_ms - arrived).max(0) as f64) / 1000.0);
        if let Some(archive) = &mut self.archive {
            archive.findings.append(&tables::findings_batch(findings)?).context("archiving findings")?;
        }
        Ok(())
    }

    /// A checkpoint written through: waits for the one in flight, if any, then takes one with the
    /// findings topic's exact end offsets and waits until it is durable and committed (at start
    /// and at stop).
    fn checkpoint_now(&mut self) -> anyhow::Result<()> {
        if let Some(done) = self.checkpointer.wait_done() {
            self.finish_checkpoint(done?)?;
        }
        self.start_checkpoint(true)?;
        match self.checkpointer.wait_done() {
            Some(done) => self.finish_checkpoint(done?),
            None => Ok(()),
        }
    }

    /// Steps 1–3 of the protocol in the module docs, up to the snapshot; the checkpoint thread
    /// writes it, and [`Pipeline::finish_checkpoint`] takes it from there.
    ///
    /// The findings positions a restore reads back from must be at or before every finding this
    /// worker sends after the snapshot. `exact` asks the broker for the topic's end (a round trip);
    /// otherwise they are the highest of three lower bounds known without one: the previous
    /// checkpoint's, the ends last read by the [`FindingsEnds`] thread (read before this moment),
    /// and the offsets after this worker's own last delivered findings (every finding sent later
    /// lands after them, in the same partition).
    ///
    /// Unless `exact`, the checkpoint is taken only once the work that can be done ahead of it
    /// (the windows' prune, copying rows into the tables' mirrors: [`Engine::checkpoint_step`])
    /// leaves at most [`CHECKPOINT_CUT_ROWS`] rows to copy, one step per call (per turn of the
    /// loop), or after [`MAX_CHECKPOINT_STEPS`] steps; returns whether it was taken.
    fn start_checkpoint(&mut self, exact: bool) -> anyhow::Result<bool> {
        if !exact {
            let step = Instant::now();
            let left = self.engine.checkpoint_step(CHECKPOINT_STEP_ROWS);
            self.checkpoint_steps += 1;
            tracing::trace!(message = "Checkpoint step.", left, ms = step.elapsed().as_millis() as u64);
            if left > CHECKPOINT_CUT_ROWS && self.checkpoint_steps < MAX_CHECKPOINT_STEPS {
                return Ok(false);
            }
        }
        let steps = std::mem::take(&mut self.checkpoint_steps);
        let started = Instant::now();
        // Exact: the end offsets asked for below must cover every finding sent so far. Otherwise
        // the checkpoint thread waits for the broker's acknowledgements, not this one.
        let outputs = if exact {
            self.sink.flush(KAFKA_TIMEOUT).context("flushing outputs before a checkpoint")?;
            None
        } else {
            Some(Outputs { sink: self.sink.clone(), cut: self.sink.cut(), timeout: KAFKA_TIMEOUT })
        };
        let flushed = started.elapsed();
        // Closed by the checkpoint thread, before it writes the checkpoint.
        let closing = self.archive.as_mut().map(|archives| archives.all().map(ParquetArchive::detach_all).into()).unwrap_or_default();
        let detached = started.elapsed();
        let ends = if exact {
            self.sink.end_offsets(&self.topics.findings, KAFKA_TIMEOUT)?
        } else {
            let mut ends: HashMap<i32, i64> = HashMap::new();
            let previous = self.engine.sink_positions.iter().filter(|(t, _, _)| *t == self.topics.findings).map(|(_, p, o)| (*p, *o));
            for (p, o) in previous.chain(self.findings_ends.latest()).chain(self.sink.delivered_ends()) {
                let end = ends.entry(p).or_insert(o);
                *end = (*end).max(o);
            }
            let mut ends: Vec<(i32, i64)> = ends.into_iter().collect();
            ends.sort_unstable();
            ends
        };
        self.engine.sink_positions = ends.into_iter().map(|(p, o)| (self.topics.findings.clone(), p, o)).collect();
        let snapshot = Instant::now();
        let sched = SchedTimes::now();
        let cp = self.engine.checkpoint();
        let snapshot_ms = snapshot.elapsed().as_secs_f64() * 1e3;
        // Whether the snapshot's time was its work or this thread waiting for a core.
        let (snapshot_cpu_ms, snapshot_waited_ms) =
            sched.zip(SchedTimes::now()).map(|(a, b)| b.since_ms(a)).unwrap_or((f64::NAN, f64::NAN));
        let offsets: Vec<Position> = cp
            .partitions
            .iter()
            .filter(|(_, s)| s.next_offset > 0)
            .map(|((topic, partition), s)| Position { topic: *topic, partition: *partition, next_offset: s.next_offset })
            .collect();
        self.metrics.checkpoint_pause_seconds.observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            message = "Checkpoint taken.",
            pause_ms = started.elapsed().as_millis() as u64,
            flush_ms = flushed.as_secs_f64() * 1e3,
            detach_ms = (detached - flushed).as_secs_f64() * 1e3,
            snapshot_ms,
            snapshot_cpu_ms,
            snapshot_waited_ms,
            steps
        );
        self.checkpointer.submit(outputs, closing, cp, offsets, started)?;
        Ok(true)
    }

    /// Step 4, once the checkpoint thread has written the checkpoint: commits its offsets (of the
    /// partitions still ours), then archive retention and the gauges.
    fn finish_checkpoint(&mut self, mut done: Done) -> anyhow::Result<()> {
        self.engine.recycle(std::mem::take(&mut done.recycled));
        done.result.context("saving a checkpoint")?;
        // The checkpoint is durable and says where each partition resumes; the committed offset
        // only mirrors it (for lag and for tools). A commit refused during a rebalance is retried
        // by the next checkpoint, not a reason to stop. A partition revoked while the checkpoint
        // was written is no longer ours to commit: its next owner may be ahead already.
        let offsets: Vec<Position> = done.offsets.into_iter().filter(|p| self.owned.contains(&(p.topic, p.partition))).collect();
        if let Err(e) = self.source.commit(&offsets) {
            warn!(message = "Committing offsets failed; the checkpoint stands.", error = %e);
        }
        if let Some(archives) = &mut self.archive {
            for archive in archives.all() {
                if let Err(e) = archive.apply_retention(chrono::Utc::now().timestamp_millis()) {
                    warn!(message = "Deleting archive folders past retention failed; retrying at the next checkpoint.", error = %e);
                }
            }
            self.write_devices_snapshot();
        }
        tracing::debug!(
            message = "Checkpoint durable.",
            write_ms = done.write.as_millis() as u64,
            ms = done.started.elapsed().as_millis() as u64
        );
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.metrics.checkpoint_seconds.observe(done.started.elapsed().as_secs_f64());
        self.metrics.state.set(&self.engine, &self.owned);
        Ok(())
    }
}

/// A thread that reads the findings topic's end offsets from the broker every `interval`, so a
/// checkpoint has recent positions without a round trip of its own (see
/// [`Pipeline::start_checkpoint`]). It stops, and is waited for, when this is dropped: it holds the
/// sink, whose clients must be gone before the broker is (the embedded one at the end of `run`).
#[derive(Debug)]
struct FindingsEnds {
    latest: Arc<std::sync::Mutex<Vec<(i32, i64)>>>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FindingsEnds {
    fn drop(&mut self) {
        // Disconnected: the thread ends at its next wait.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl FindingsEnds {
    fn start(sink: Arc<KafkaSink>, topic: String, interval: Duration) -> anyhow::Result<Self> {
        let latest = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let shared = latest.clone();
        let thread = std::thread::Builder::new()
            .name("meshguard-findings-ends".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    match sink.end_offsets(&topic, KAFKA_TIMEOUT) {
                        Ok(ends) => *shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = ends,
                        Err(e) => tracing::debug!(message = "Reading the findings topic's end failed; the next turn retries.", error = %e),
                    }
                }
            })
            .context("starting the findings-ends thread")?;
        Ok(Self { latest, stop: Some(stop), thread: Some(thread) })
    }

    /// The ends last read (empty before the first read).
    fn latest(&self) -> Vec<(i32, i64)> {
        self.latest.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Pipeline {
    /// Rewrites the devices snapshot beside the archive (for `meshguard sql` outside this worker)
    /// when the directory changed, at most every [`DEVICES_SNAPSHOT_EVERY`].
    fn write_devices_snapshot(&mut self) {
        let Some(devices) = &self.sql.devices else { return };
        let version = devices.version();
        let due = self.devices_written.1.is_none_or(|at| at.elapsed() >= DEVICES_SNAPSHOT_EVERY);
        if version == self.devices_written.0 || !due {
            return;
        }
        let path = self.sql.devices_snapshot();
        match meshguard_analytics::sql::write_snapshot(devices, &path) {
            Ok(()) => self.devices_written = (version, Some(Instant::now())),
            Err(e) => {
                warn!(message = "Writing the devices snapshot failed; retrying at the next checkpoint.", path = %path.display(), error = %e)
            }
        }
    }
}

/// Marks every finding on the findings topic after `positions` as already emitted, and collects them.
fn read_back_findings(
    sink: &KafkaSink,
    topics: &Topics,
    positions: &[(String, i32, i64)],
    engine: &mut Engine,
    found: &mut Vec<Finding>,
) -> anyhow::Result<usize> {
    let from: Vec<(i32, i64)> = positions.iter().filter(|(t, _, _)| *t == topics.findings).map(|(_, p, o)| (*p, *o)).collect();
    if from.is_empty() {
        return Ok(0);
    }
    Ok(sink.read_back(&topics.findings, &from, KAFKA_TIMEOUT, |payload| {
        if let Ok(f) = serde_json::from_slice::<Finding>(payload) {
            engine.mark_emitted(f.id, f.event_ts);
            found.push(f);
        }
    })?)
}

/// The `field` label of the dead-letter metric: the contract's field names are a closed set, so
/// the label stays bounded (`route[3]` becomes `route`; anything unexpected becomes `other`).
fn dead_letter_field(field: Option<&str>) -> &'static str {
    let Some(field) = field else { return "record" };
    if field == "(key)" {
        return "key";
    }
    let base = field.split(['[', '.']).next().unwrap_or(field);
    InputTopic::ALL.iter().flat_map(|t| t.fields()).map(|f| f.name).find(|name| *name == base).unwrap_or(match base {
        // Registry records are checked by serde, whose paths name their top-level field first.
        "uuid" | "kind" | "type" | "manufacturer" | "owner" | "groups" | "country" | "exempt" | "permissions" | "profiles" => "registry",
        _ => "other",
    })
}

/// Findings per kind so far, for summaries.
pub fn findings_by_kind(stats: &LiveStats) -> HashMap<FindingKind, u64> {
    FindingKind::ALL.iter().map(|k| (*k, stats.findings[k.code() as usize].load(Ordering::Relaxed))).filter(|(_, n)| *n > 0).collect()
}
