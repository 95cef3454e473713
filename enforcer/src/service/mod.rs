//! The enforcer service: consumes the enforcement and findings topics in its own consumer group,
//! applies every enforcement record to every configured target, and publishes notifications.
//!
//! ```text
//!  meshguard.enforcement.v1 ─┐                      ┌─► EnforcementAction ─► every target (concurrently; per record in order)
//!  (compacted, by uuid)      ├─► group consumer ────┤      retries of unavailable targets with backoff; dry run: log only
//!  meshguard.findings.v1 ────┘   enforcer.group_id  └─► notices(finding, owners, limiter) ─► meshguard.notifications.v1
//!  meshguard.registry.v1 ──► RegistryReader (every partition, no group) ──► OwnerTable (uuid → owner, type)
//!  webhook give-ups ──► KafkaDeadLetters ──► meshguard.deadletter.v1
//! ```
//!
//! **Offsets.** Records of one partition are handled in order, one at a time (so one UUID's
//! actions are applied in the order of the topic, as [`EnforcementTarget`] requires). A record is
//! *complete* when every target applied its action (`applied`, `already_applied`), stored it as a
//! dead letter (`dead_lettered`), refused it for good (`failed`: the target answered no, so a
//! repeat would get the same answer), or in dry run; a finding is complete when its notices are
//! acknowledged by the broker. Every `commit_interval_ms` the service commits, per partition, the
//! offset after the last record up to which everything is complete. A target still unavailable
//! after its retries (or a dead-letter sink that cannot store) leaves its record incomplete: the
//! service logs and counts it as `failed` and carries on, but that partition's committed offset
//! stays before it, so a restart applies it (and what follows) again; every target is idempotent
//! on the action id, and notices keep their ids, so the replay is harmless.
//!
//! **Audit.** Each enforcement record gives one `state_change` row and one `target_call` row per
//! try of each target ([`crate::audit`]). Rows are buffered and written to closed Parquet files
//! before every commit, so a commit never covers a record whose rows are not on disk; a failure to
//! write them stops the service (nothing more is committed). The commit (the notices'
//! acknowledgements, closing the audit files, sending the offsets) runs on a task of its own,
//! one at a time, while the service goes on applying actions.
//!
//! **Restarts and rebalances.** At each assignment of the group (the first included, before the
//! first finding after it) the notification limiter is seeded from the tail of the notifications
//! topic (each notice carries its finding's `event_ts` in the [`EVENT_TS_HEADER`] header), so the
//! findings a restart replays, or a partition taken over from another enforcer brings, are held
//! back by the notices already published.
//!
//! This module owns the loop, the order of work and the commit rule. It must never compute
//! enforcement state (the pipeline owns it), never call a target in dry run, and never log a
//! secret (targets' credentials, Kafka client properties).

mod kafka;
pub mod metrics;
pub mod notify;
pub mod owners;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use meshguard_ingest::{KafkaConfig, Topics};
use meshguard_schemas::output::{EnforcementState, Finding};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Deserialize;
use tracing::{error, info, warn};

pub use self::kafka::{EVENT_TS_HEADER, KafkaDeadLetters, RegistryReader, producer, read_notification_tail};
use self::metrics::EnforcerMetrics;
use self::notify::NotificationLimiter;
use self::owners::OwnerTable;
use crate::action::EnforcementAction;
use crate::audit::{AuditConfig, AuditLog, AuditRow};
use crate::dead_letter::DeadLetterSink;
use crate::error::{Error, Result};
use crate::targets::{self, EnforcementTarget, TargetConfig, TargetContext};

/// `[enforcer]`: the enforcer service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforcerConfig {
    /// Whether `meshguard run` runs the service in-process next to the pipeline. `meshguard
    /// enforce` runs it whatever this says.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Consumer group of the enforcers: enforcers in one group share the partitions of the
    /// enforcement and findings topics.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Compute and publish everything (notifications included) but call no target; each call it
    /// would make is logged at info with the target and the action.
    #[serde(default)]
    pub dry_run: bool,
    /// Publish notifications to the target and owner of each finding.
    #[serde(default = "default_notifications")]
    pub notifications: bool,
    /// At most one notification per recipient, offender and kind within this much event time, ms.
    /// 0: no limit.
    #[serde(default = "default_notification_interval_ms")]
    pub notification_interval_ms: u64,
    /// Retries of an action whose target is unavailable (not connected, no answer), after the first
    /// attempt. Targets that retry by themselves (the webhook) never report unavailable.
    #[serde(default = "default_action_retries")]
    pub action_retries: u32,
    /// Backoff before the first retry, ms; it doubles for each later one, up to 30 s.
    #[serde(default = "default_retry_base_delay_ms")]
    pub retry_base_delay_ms: u64,
    /// Time between offset commits, ms.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// The enforcement targets (`[[enforcer.targets]]`); see the README's "Enforcement targets".
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// The audit trail of state changes and target calls (`[enforcer.audit]`), in Parquet.
    #[serde(default)]
    pub audit: AuditConfig,
}

fn default_enabled() -> bool {
    true
}

/// Apart from the detection workers' `meshguard`: the enforcer reads other topics, and its own
/// group keeps its offsets apart.
fn default_group_id() -> String {
    String::from("meshguard-enforcer")
}

fn default_notifications() -> bool {
    true
}

/// The contract: at most one notice per recipient, offender and kind per minute.
fn default_notification_interval_ms() -> u64 {
    60_000
}

/// A few tries ride out a broker restart without holding the next records back for long.
fn default_action_retries() -> u32 {
    3
}

fn default_retry_base_delay_ms() -> u64 {
    500
}

/// The pipeline checkpoints every 5 s; the enforcer's replay after a crash stays shorter.
fn default_commit_interval_ms() -> u64 {
    1_000
}

/// How soon a due commit is tried again while the previous one is still on its way.
const COMMIT_RETRY: Duration = Duration::from_millis(10);
/// The longest backoff between two retries of one action.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// How long Kafka metadata, acknowledgements and reading the registry may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait to read the registry to its end before a batch of findings.
const REGISTRY_ALIGN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most records handled between two looks at the clock and the shutdown signal. Each batch with
/// findings reads the registry to its end first (one round trip to the broker), so larger batches
/// mean fewer round trips; 2,000 findings take a few milliseconds to handle.
const MAX_BATCH: usize = 2_000;

impl Default for EnforcerConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            group_id: default_group_id(),
            dry_run: false,
            notifications: default_notifications(),
            notification_interval_ms: default_notification_interval_ms(),
            action_retries: default_action_retries(),
            retry_base_delay_ms: default_retry_base_delay_ms(),
            commit_interval_ms: default_commit_interval_ms(),
            targets: Vec::new(),
            audit: AuditConfig::default(),
        }
    }
}

impl EnforcerConfig {
    /// Checks what types alone cannot; the error names the field (`enforcer.…`).
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: String| Err(Error::ServiceConfig { field: format!("enforcer.{field}"), reason });
        if self.group_id.trim().is_empty() {
            return invalid("group_id", String::from("must not be empty"));
        }
        if self.commit_interval_ms < 100 {
            return invalid("commit_interval_ms", format!("must be at least 100, found {}", self.commit_interval_ms));
        }
        if self.retry_base_delay_ms > MAX_RETRY_DELAY.as_millis() as u64 {
            return invalid(
                "retry_base_delay_ms",
                format!("must be at most {}, found {}", MAX_RETRY_DELAY.as_millis(), self.retry_base_delay_ms),
            );
        }
        if self.audit.enabled {
            self.audit.validate()?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            if !names.insert(target_name(target)) {
                return invalid(
                    &format!("targets[{i}].name"),
                    format!("{:?} names two targets; names must be unique", target_name(target)),
                );
            }
        }
        Ok(())
    }
}

fn target_name(config: &TargetConfig) -> &str {
    match config {
        TargetConfig::Mosquitto(c) => &c.name,
        TargetConfig::Emqx(c) => &c.name,
        TargetConfig::Webhook(c) => &c.name,
    }
}

/// How one record of the consumed topics ended.
enum Done {
    /// Complete: its offset may be committed.
    Complete,
    /// Incomplete: the partition's commit stays before it (a restart repeats it).
    Incomplete,
}

/// Per partition of a consumed topic: the next offset to commit, and whether an incomplete record
/// holds it back for the rest of this run.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    next: Option<i64>,
    held: bool,
}

impl Progress {
    fn record(&mut self, offset: i64, done: Done) {
        if self.held {
            return;
        }
        match done {
            Done::Complete => self.next = Some(offset + 1),
            Done::Incomplete => {
                self.held = true;
                self.next = Some(offset);
            }
        }
    }

    fn hold_at(&mut self, offset: i64) {
        self.next = Some(self.next.map_or(offset, |n| n.min(offset)));
        self.held = true;
    }
}

/// The running service. See the module documentation.
pub struct EnforcerService {
    config: EnforcerConfig,
    topics: Topics,
    targets: Vec<Box<dyn EnforcementTarget>>,
    dead_letters: Arc<dyn DeadLetterSink>,
    /// Shared with the commit task ([`EnforcerService::commit`]).
    consumer: Arc<StreamConsumer<EnforcerContext>>,
    /// Assignments the consumer has received (from its context), and how many the notification
    /// limiter has been built for: when a new assignment arrives, the limiter is rebuilt from the
    /// notifications topic before the next finding, since a partition taken over from another
    /// enforcer brings offenders whose recent notices this one did not publish.
    assignments: Arc<AtomicU64>,
    limiter_assignments: u64,
    /// For the notifications topic's reads.
    kafka: KafkaConfig,
    producer: FutureProducer,
    registry: RegistryReader,
    owners: OwnerTable,
    limiter: NotificationLimiter,
    metrics: EnforcerMetrics,
    /// The audit trail; `None` when `enforcer.audit.enabled = false`.
    /// In a mutex only so the service is `Sync` (the Parquet writer is not): every use has
    /// `&mut self` and takes it with `get_mut`, never locking.
    audit: Option<std::sync::Mutex<AuditLog>>,
    progress: BTreeMap<(String, i32), Progress>,
    /// Notices sent since the last commit: (partition of their finding, its offset, delivery).
    deliveries: Vec<(i32, i64, DeliveryFuture)>,
    /// The commit on its way, if any: it returns the findings whose notices were not delivered.
    committing: Option<tokio::task::JoinHandle<Result<Undelivered>>>,
}

/// Findings whose notices were not delivered: (partition, offset) in the findings topic.
type Undelivered = Vec<(i32, i64)>;

impl std::fmt::Debug for EnforcerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnforcerService")
            .field("group_id", &self.config.group_id)
            .field("dry_run", &self.config.dry_run)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl EnforcerService {
    /// Validates `config`, builds every target (no I/O yet), registers the metrics in `registry`,
    /// connects to Kafka and reads the registry topic to its end. Returns when the service is
    /// ready to consume. The topics must exist.
    pub async fn start(config: EnforcerConfig, kafka: &KafkaConfig, topics: Topics, registry: &prometheus::Registry) -> Result<Self> {
        config.validate()?;
        let producer = producer(kafka)?;
        let dead_letters: Arc<dyn DeadLetterSink> =
            Arc::new(KafkaDeadLetters::new(producer.clone(), topics.deadletter.clone(), topics.enforcement.clone(), KAFKA_TIMEOUT));
        let context = TargetContext { dead_letters: dead_letters.clone() };
        let targets = config.targets.iter().map(|t| targets::build(t, &context)).collect::<Result<Vec<_>>>()?;
        let metrics = EnforcerMetrics::new(registry).map_err(|e| Error::Metrics(e.to_string()))?;

        let mut client = kafka.consumer_config_with(&meshguard_ingest::source::GROUP_CONSUMER_DEFAULTS);
        if let Some(id) = &kafka.instance_id {
            // Static membership in the enforcers' own group, apart from the detection worker's id.
            client.set("group.instance.id", format!("{id}-enforcer"));
        }
        let assignments = Arc::new(AtomicU64::new(0));
        let consumer: StreamConsumer<EnforcerContext> = client
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A new group applies the whole compacted enforcement topic: the current state of
            // every UUID (harmless where already applied).
            .set("auto.offset.reset", "earliest")
            .create_with_context(EnforcerContext {
                assignments: assignments.clone(),
                enforcement_topic: topics.enforcement.clone(),
                assigned: metrics.assigned.clone(),
            })
            .map_err(Error::kafka("creating the enforcer's consumer"))?;
        consumer
            .subscribe(&[&topics.enforcement, &topics.findings])
            .map_err(Error::kafka("subscribing to the enforcement and findings topics"))?;

        let (registry_reader, owners) = blocking(|| -> Result<_> {
            let reader = RegistryReader::new(kafka, &topics.registry, &config.group_id, KAFKA_TIMEOUT)?;
            let mut owners = OwnerTable::new();
            reader.catch_up(&mut owners, Duration::from_secs(120))?;
            Ok((reader, owners))
        })?;
        metrics.registry_entries.set(owners.len() as i64);
        let audit = if config.audit.enabled {
            let writer = kafka.instance_id.as_deref().map_or_else(|| String::from("enforcer"), |id| format!("{id}-enforcer"));
            Some(std::sync::Mutex::new(blocking(|| AuditLog::open(&config.audit, &writer, now_ms()))?))
        } else {
            None
        };
        // Seeded from the notifications topic at each assignment, the first included (see `handle`):
        // a read here would miss what the partitions' previous holder publishes until then.
        let limiter = NotificationLimiter::new(config.notification_interval_ms);
        info!(
            message = "Enforcer started.",
            group_id = %config.group_id,
            dry_run = config.dry_run,
            targets = ?targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            registered = owners.len(),
        );
        Ok(Self {
            limiter,
            assignments,
            limiter_assignments: 0,
            kafka: kafka.clone(),
            config,
            topics,
            targets,
            dead_letters,
            consumer: Arc::new(consumer),
            producer,
            registry: registry_reader,
            owners,
            metrics,
            audit,
            progress: BTreeMap::new(),
            deliveries: Vec::new(),
            committing: None,
        })
    }

    /// Consumes until `shutdown` completes, then commits what is complete. Failed actions and bad
    /// records are logged and counted, never a reason to stop; an audit trail that cannot be
    /// written is (the service returns its error rather than commit past rows it lacks).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let interval = Duration::from_millis(self.config.commit_interval_ms);
        let mut last_commit = Instant::now();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let wait = interval.saturating_sub(last_commit.elapsed());
            tokio::select! {
                () = &mut shutdown => break,
                received = tokio::time::timeout(wait, self.consumer.recv()) => match received {
                    Ok(Ok(m)) => batch.push(m.detach()),
                    Ok(Err(error)) => warn!(message = "Enforcer consumer error.", %error),
                    Err(_) => {}
                },
            }
            // Whatever else is already fetched, without waiting.
            while batch.len() < MAX_BATCH {
                match self.consumer.recv().now_or_never() {
                    Some(Ok(m)) => batch.push(m.detach()),
                    Some(Err(error)) => warn!(message = "Enforcer consumer error.", %error),
                    None => break,
                }
            }
            if !batch.is_empty() {
                self.handle(std::mem::take(&mut batch)).await;
            }
            let audit_full = self.audit.as_mut().is_some_and(|a| audit_log(a).is_full());
            if audit_full || last_commit.elapsed() >= interval {
                last_commit = if self.commit(CommitMode::Async, audit_full).await? {
                    Instant::now()
                } else {
                    // The previous commit is still on its way: look again shortly (the wait above
                    // would otherwise be zero, and the loop spin until it lands).
                    Instant::now().checked_sub(interval.saturating_sub(COMMIT_RETRY)).unwrap_or_else(Instant::now)
                };
            }
        }
        self.commit(CommitMode::Sync, true).await?;
        info!(message = "Enforcer stopped after a final commit.");
        Ok(())
    }

    async fn handle(&mut self, batch: Vec<OwnedMessage>) {
        // Enforcement records first: they need no registry, and reading the registry to its end
        // (a round trip to the broker) would delay them. Order within each partition is kept.
        let (enforcement, findings): (Vec<OwnedMessage>, Vec<OwnedMessage>) =
            batch.into_iter().partition(|m| m.topic() == self.topics.enforcement);
        for message in enforcement {
            self.metrics.records.with_label_values(&["enforcement"]).inc();
            let done = self.enforce(&message).await;
            self.progress.entry((message.topic().to_owned(), message.partition())).or_default().record(message.offset(), done);
        }
        if findings.is_empty() {
            return;
        }
        // A new assignment may bring offenders another enforcer notified: their notices first.
        let assignments = self.assignments.load(Ordering::Acquire);
        if assignments > self.limiter_assignments {
            let (limiter, config, kafka, topic) = (&mut self.limiter, &self.config, &self.kafka, &self.topics.notifications);
            blocking(|| seed_limiter(limiter, config, kafka, topic));
            self.limiter_assignments = assignments;
        }
        // Registry changes published before these findings apply to them.
        {
            let (registry, owners) = (&self.registry, &mut self.owners);
            let read = blocking(|| registry.catch_up(owners, REGISTRY_ALIGN_TIMEOUT)).unwrap_or_else(|error| {
                warn!(message = "Could not read the registry to its end; notifying with what is read.", %error);
                registry.poll_available(owners)
            });
            if read > 0 {
                self.metrics.records.with_label_values(&["registry"]).inc_by(read as u64);
                self.metrics.registry_entries.set(self.owners.len() as i64);
            }
        }
        for message in findings {
            self.metrics.records.with_label_values(&["findings"]).inc();
            let done = self.notify(&message);
            self.progress.entry((message.topic().to_owned(), message.partition())).or_default().record(message.offset(), done);
        }
    }

    /// Applies one enforcement record to every target.
    async fn enforce(&mut self, message: &OwnedMessage) -> Done {
        let Some(payload) = message.payload() else {
            // A tombstone: the UUID's state was deleted (by an operator); nothing to apply.
            return Done::Complete;
        };
        let state: EnforcementState = match serde_json::from_slice(payload) {
            Ok(state) => state,
            Err(error) => {
                warn!(message = "Unreadable enforcement record skipped.", partition = message.partition(), offset = message.offset(), %error);
                return Done::Complete;
            }
        };
        let action = EnforcementAction::new(state);
        let change = AuditRow::state_change(&action, message.partition(), message.offset(), now_ms());
        if self.config.dry_run {
            let mut calls = Vec::with_capacity(self.targets.len());
            for target in &self.targets {
                info!(
                    message = "Dry run: would apply an enforcement action.",
                    target = target.name(), action = %action.kind(), action_id = %action.id(), uuid = %action.uuid(),
                );
                self.metrics.actions.with_label_values(&[target.name(), "dry_run"]).inc();
                calls.push(AuditRow::target_call(&change, target.name(), 1, "dry_run", None, change.ts, Duration::ZERO));
            }
            self.audit(change);
            for call in calls {
                self.audit(call);
            }
            return Done::Complete;
        }
        let results = futures::future::join_all(self.targets.iter().map(|t| self.apply(t.as_ref(), &action, &change))).await;
        self.audit(change);
        let mut done = Done::Complete;
        for (target_done, calls) in results {
            if matches!(target_done, Done::Incomplete) {
                done = Done::Incomplete;
            }
            for call in calls {
                self.audit(call);
            }
        }
        done
    }

    /// Shows the audit trail's rows to `live` while their files are open (the SQL surface's
    /// `audit` table in `meshguard run`). Without an audit trail, nothing.
    pub fn share_audit_rows(&mut self, live: Arc<meshguard_ingest::archive::LiveRows>) {
        if let Some(audit) = &mut self.audit {
            audit_log(audit).set_live(live);
        }
    }

    /// Buffers an audit row (durable at the next commit's flush).
    fn audit(&mut self, row: AuditRow) {
        if let Some(audit) = &mut self.audit {
            audit_log(audit).push(row);
        }
    }

    /// Applies `action` to one target: retries while the target is unavailable, then counts the
    /// result. Returns the audit rows of its calls, one per try.
    async fn apply(&self, target: &dyn EnforcementTarget, action: &EnforcementAction, change: &AuditRow) -> (Done, Vec<AuditRow>) {
        let started = Instant::now();
        let mut attempt: u32 = 1;
        let mut calls = Vec::with_capacity(1);
        let result = loop {
            let (call_started, call_clock) = (now_ms(), Instant::now());
            let result = target.apply(action).await;
            let outcome = match &result {
                Ok(outcome) => outcome.as_str(),
                Err(_) => "failed",
            };
            let error = result.as_ref().err().map(ToString::to_string);
            calls.push(AuditRow::target_call(change, target.name(), attempt, outcome, error, call_started, call_clock.elapsed()));
            match result {
                Err(error @ Error::Unavailable { .. }) if attempt <= self.config.action_retries => {
                    let delay = self.retry_delay(attempt);
                    warn!(
                        message = "Enforcement target unavailable; retrying.",
                        target = target.name(), action = %action.kind(), action_id = %action.id(), attempt,
                        delay_ms = delay.as_millis() as u64, %error,
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => break other,
            }
        };
        self.metrics.action_seconds.with_label_values(&[target.name()]).observe(started.elapsed().as_secs_f64());
        let (result_label, done) = match &result {
            Ok(outcome) => {
                info!(
                    message = "Enforcement action done.",
                    target = target.name(), action = %action.kind(), action_id = %action.id(), uuid = %action.uuid(), outcome = %outcome, attempt,
                );
                (outcome.as_str(), Done::Complete)
            }
            Err(error @ Error::Refused { .. }) => {
                // The target answered no: repeating gets the same answer, so the record is done.
                warn!(message = "Enforcement action refused.", target = target.name(), action_id = %action.id(), uuid = %action.uuid(), %error);
                ("failed", Done::Complete)
            }
            Err(error) => {
                error!(
                    message = "Enforcement action failed; the record will be applied again after a restart.",
                    target = target.name(), action_id = %action.id(), uuid = %action.uuid(), attempts = attempt, %error,
                );
                ("failed", Done::Incomplete)
            }
        };
        self.metrics.actions.with_label_values(&[target.name(), result_label]).inc();
        (done, calls)
    }

    fn retry_delay(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(16);
        Duration::from_millis(self.config.retry_base_delay_ms.saturating_mul(factor)).min(MAX_RETRY_DELAY)
    }

    /// Queues the notices about one finding; they count as complete when acknowledged (at the
    /// next commit).
    fn notify(&mut self, message: &OwnedMessage) -> Done {
        if !self.config.notifications {
            return Done::Complete;
        }
        let Some(payload) = message.payload() else { return Done::Complete };
        let finding: Finding = match serde_json::from_slice(payload) {
            Ok(finding) => finding,
            Err(error) => {
                warn!(message = "Unreadable finding skipped.", partition = message.partition(), offset = message.offset(), %error);
                return Done::Complete;
            }
        };
        let notices = notify::notices(&finding, &self.owners, &mut self.limiter);
        if notices.suppressed > 0 {
            self.metrics.suppressed.with_label_values(&[finding.kind.as_str()]).inc_by(notices.suppressed as u64);
        }
        for notice in notices.send {
            let key = notice.recipient.hyphenated().to_string();
            let payload = match serde_json::to_vec(&notice) {
                Ok(payload) => payload,
                Err(error) => {
                    error!(message = "Cannot encode a notification.", %error);
                    return Done::Incomplete;
                }
            };
            let event_ts = finding.event_ts.to_string();
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header { key: EVENT_TS_HEADER, value: Some(event_ts.as_bytes()) });
            let mut record = FutureRecord::to(&self.topics.notifications).key(&key).payload(&payload).headers(headers);
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        self.deliveries.push((message.partition(), message.offset(), delivery));
                        break;
                    }
                    Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                        // Backpressure: wait for in-flight deliveries rather than grow memory.
                        record = r;
                        self.producer.poll(Duration::from_millis(100));
                    }
                    Err((error, _)) => {
                        error!(message = "Cannot queue a notification.", %error);
                        return Done::Incomplete;
                    }
                }
            }
            self.metrics.notifications.with_label_values(&[notice.kind.as_str()]).inc();
        }
        Done::Complete
    }

    /// Commits, per partition, the offset after the last complete record, once the notices sent
    /// so far are acknowledged and the audit rows buffered so far are in closed files. `Async`
    /// does that on a task of its own, so that the service goes on applying actions meanwhile
    /// (waiting for acknowledgements and fsyncs here used to hold the next action back by up to
    /// a hundred milliseconds); `Sync` (at shutdown) waits for all of it. One commit at a time:
    /// while one is on its way, an `Async` commit waits for it only if `wait` is set (the audit
    /// files are full), and otherwise returns `false`, to be retried on a later turn. Returns an
    /// error when the audit trail cannot be written (nothing is committed then).
    async fn commit(&mut self, mode: CommitMode, wait: bool) -> Result<bool> {
        if matches!(mode, CommitMode::Async) && !wait && self.committing.as_ref().is_some_and(|task| !task.is_finished()) {
            return Ok(false);
        }
        // The previous commit's undelivered notices hold their findings back in this one.
        self.settle().await?;
        let deliveries = std::mem::take(&mut self.deliveries);
        let closing = match self.audit.as_mut().map(audit_log) {
            Some(audit) if audit.has_pending() => Some(audit.detach(now_ms()).inspect_err(|error| {
                error!(message = "Cannot write the audit trail; stopping without committing past it.", %error);
            })?),
            _ => None,
        };
        let offsets = self.complete_offsets();
        let (consumer, findings) = (self.consumer.clone(), self.topics.findings.clone());
        let job = async move {
            let mut undelivered = Vec::new();
            for (partition, offset, delivery) in deliveries {
                let failed = match delivery.await {
                    Ok(Ok(_)) => None,
                    Ok(Err((error, _))) => Some(error.to_string()),
                    Err(_) => Some(String::from("the producer dropped the delivery")),
                };
                if let Some(error) = failed {
                    error!(message = "A notification was not delivered; its finding will be read again after a restart.", partition, offset, %error);
                    undelivered.push((partition, offset));
                }
            }
            // Every audit row of the records this commit covers is on disk before it is sent.
            if let Some(closing) = closing {
                let closed = tokio::task::spawn_blocking(move || closing.finish()).await.unwrap_or_else(|_| {
                    Err(Error::Kafka { context: "closing the audit files".into(), reason: "the task panicked".into() })
                });
                closed
                    .inspect_err(|error| error!(message = "Cannot write the audit trail; stopping without committing past it.", %error))?;
            }
            let Some(offsets) = offsets else { return Ok(undelivered) };
            // Only the partitions still assigned now (a rebalance may have come meanwhile: another
            // enforcer's newer commit must not be overwritten), each held back by its undelivered
            // notices.
            let assignment = consumer.assignment().unwrap_or_default();
            let mut still = TopicPartitionList::new();
            for e in offsets.elements() {
                let (topic, partition) = (e.topic(), e.partition());
                let Some(mut next) = e.offset().to_raw() else { continue };
                if assignment.find_partition(topic, partition).is_none() {
                    continue;
                }
                if topic == findings {
                    next = undelivered.iter().filter(|(p, _)| *p == partition).map(|(_, o)| *o).fold(next, i64::min);
                }
                if still.add_partition_offset(topic, partition, Offset::Offset(next)).is_err() {
                    warn!(message = "Cannot build the commit.", topic, partition);
                }
            }
            if still.count() == 0 {
                return Ok(undelivered);
            }
            let offsets = still;
            let committed = match mode {
                CommitMode::Sync => blocking(|| consumer.commit(&offsets, CommitMode::Sync)),
                CommitMode::Async => consumer.commit(&offsets, CommitMode::Async),
            };
            if let Err(error) = committed {
                // A later commit covers it; a lost commit only lengthens the replay after a crash.
                warn!(message = "Committing the enforcer's offsets failed.", %error);
            }
            Ok(undelivered)
        };
        match mode {
            CommitMode::Async => self.committing = Some(tokio::spawn(job)),
            CommitMode::Sync => {
                let undelivered = job.await?;
                self.hold(&undelivered);
            }
        }
        Ok(true)
    }

    /// Waits for the commit on its way, if any, and holds back the findings whose notices it
    /// found undelivered.
    async fn settle(&mut self) -> Result<()> {
        let Some(task) = self.committing.take() else { return Ok(()) };
        let undelivered = task.await.unwrap_or_else(|_| {
            Err(Error::Kafka { context: "committing the enforcer's offsets".into(), reason: "the task panicked".into() })
        })?;
        self.hold(&undelivered);
        Ok(())
    }

    fn hold(&mut self, undelivered: &[(i32, i64)]) {
        for &(partition, offset) in undelivered {
            self.progress.entry((self.topics.findings.clone(), partition)).or_default().hold_at(offset);
        }
    }

    /// Per assigned partition, the offset after the last record up to which everything is
    /// complete; `None` when there is nothing to commit.
    fn complete_offsets(&self) -> Option<TopicPartitionList> {
        let assignment = match self.consumer.assignment() {
            Ok(assignment) => assignment,
            Err(error) => {
                warn!(message = "Cannot read the enforcer's assignment; not committing now.", %error);
                return None;
            }
        };
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), progress) in &self.progress {
            if let Some(next) = progress.next
                && assignment.find_partition(topic, *partition).is_some()
                && offsets.add_partition_offset(topic, *partition, Offset::Offset(next)).is_err()
            {
                warn!(message = "Cannot build the commit.", topic, partition);
            }
        }
        (offsets.count() > 0).then_some(offsets)
    }

    /// The dead-letter sink the targets use (for tests and diagnostics).
    pub fn dead_letters(&self) -> &Arc<dyn DeadLetterSink> {
        &self.dead_letters
    }
}

/// How far back from each partition's end the notifications topic is read at start: the limit's
/// interval twice and 10 minutes of slack (commits, late findings) cover every notice a replayed
/// finding can be held back by.
fn notification_lookback(config: &EnforcerConfig) -> Duration {
    Duration::from_millis(config.notification_interval_ms.saturating_mul(2)) + Duration::from_secs(600)
}

/// Seeds `limiter` with the notices at the tail of the notifications topic (see [`notify`]), at
/// each assignment of the enforcer's group, the first included. Leaves it as it is, with a warning, when the topic
/// cannot be read.
fn seed_limiter(limiter: &mut NotificationLimiter, config: &EnforcerConfig, kafka: &KafkaConfig, topic: &str) {
    if !config.notifications || config.notification_interval_ms == 0 {
        return;
    }
    let client = format!("{}-notifications", config.group_id);
    let read = read_notification_tail(kafka, topic, &client, notification_lookback(config), KAFKA_TIMEOUT, |payload, event_ts| {
        if let (Ok(notice), Some(event_ts)) = (serde_json::from_slice::<meshguard_schemas::output::Notification>(payload), event_ts) {
            limiter.seed(notice.recipient, notice.about, notice.kind, event_ts);
        }
    });
    match read {
        Ok(read) => info!(message = "Notification limiter rebuilt from the notifications topic.", notices = read, keys = limiter.len()),
        Err(error) => warn!(message = "Cannot read the notifications topic's tail; the limiter keeps what it has.", %error),
    }
}

/// The enforcer consumer's context: counts the assignments it receives (see
/// `EnforcerService::assignments`). Runs on the consumer's poll, before any message of the new
/// assignment is handed out.
struct EnforcerContext {
    assignments: Arc<AtomicU64>,
    /// The enforcement topic's name: every other assigned topic is the findings topic.
    enforcement_topic: String,
    assigned: prometheus::IntGaugeVec,
}

impl EnforcerContext {
    /// Adds `sign` × the partitions of `list` to the assignment gauge, by topic role.
    fn count(&self, list: &TopicPartitionList, sign: i64) {
        for element in list.elements() {
            let role = if element.topic() == self.enforcement_topic { "enforcement" } else { "findings" };
            self.assigned.with_label_values(&[role]).add(sign);
        }
    }
}

impl rdkafka::ClientContext for EnforcerContext {}

impl ConsumerContext for EnforcerContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.count(partitions, 1);
                if partitions.count() > 0 {
                    self.assignments.fetch_add(1, Ordering::Release);
                }
            }
            Rebalance::Revoke(partitions) => self.count(partitions, -1),
            Rebalance::Error(_) => {}
        }
    }
}

/// The wall clock, in Unix milliseconds (audit rows' processing times).
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs a blocking Kafka call without stalling the runtime's other tasks where the runtime allows
/// it (multi-threaded); on a current-thread runtime it just runs.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The audit log in its mutex, without locking (see `EnforcerService::audit`).
fn audit_log(audit: &mut std::sync::Mutex<AuditLog>) -> &mut AuditLog {
    audit.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_their_field() {
        let config = EnforcerConfig::default();
        config.validate().expect("defaults are valid");
        assert_eq!((config.group_id.as_str(), config.notification_interval_ms, config.dry_run), ("meshguard-enforcer", 60_000, false));

        let parsed: EnforcerConfig = toml::from_str("group_id = \"\"").expect("parses");
        assert!(parsed.validate().expect_err("empty group").to_string().contains("`enforcer.group_id` must not be empty"));
        let parsed: EnforcerConfig = toml::from_str("commit_interval_ms = 5").expect("parses");
        assert!(parsed.validate().expect_err("too short").to_string().contains("`enforcer.commit_interval_ms`"));
        let twice = "[[targets]]\ntype = \"mosquitto\"\nusername = \"a\"\npassword = \"p\"\n[[targets]]\ntype = \"mosquitto\"\nusername = \"b\"\npassword = \"q\"\n";
        let parsed: EnforcerConfig = toml::from_str(twice).expect("parses");
        let error = parsed.validate().expect_err("same name").to_string();
        assert!(error.contains("`enforcer.targets[1].name`") && !error.contains("\"p\""), "{error}");
        assert!(toml::from_str::<EnforcerConfig>("dryrun = true").expect_err("unknown").to_string().contains("dryrun"));
    }

    #[test]
    fn commits_stop_at_the_first_incomplete_record() {
        let mut p = Progress::default();
        p.record(0, Done::Complete);
        p.record(1, Done::Complete);
        assert_eq!(p.next, Some(2));
        p.record(2, Done::Incomplete);
        p.record(3, Done::Complete);
        assert_eq!((p.next, p.held), (Some(2), true));

        let mut p = Progress::default();
        for offset in 0..10 {
            p.record(offset, Done::Complete);
        }
        // A notice of the finding at offset 4 was not acknowledged.
        p.hold_at(4);
        p.record(10, Done::Complete);
        assert_eq!(p.next, Some(4));
    }
}
