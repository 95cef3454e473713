//! The audit trail: every enforcement state change the enforcer consumes and every target call it
//! makes, with its result, in Parquet files under Hive-style date folders, for the SQL surface
//! (table `audit`, schema [`audit_schema`]).
//!
//! ```text
//!  <audit.dir>/                                   default .meshguard/archive/audit
//!    date=2026-11-24/
//!      part-<writer>-<run>-000001.parquet         closed: complete, fsynced, never written again
//!      .part-<writer>-<run>-000002.parquet.tmp    being written, invisible to readers
//!    date=2026-11-25/…
//! ```
//!
//! This module owns the rows' schema and the files under the audit folder; it must never decide
//! what is audited (the service does) and never hold a secret (errors are the targets' texts, which
//! never carry credentials).
//!
//! # Files
//! The files are the attempt archive's ([`ParquetArchive`], one discipline for every table): rows
//! are appended to one open file per UTC date of their `ts`, under a hidden temporary name, and
//! [`AuditLog::flush`] (or [`AuditLog::detach`], then [`AuditClosing::finish`]) closes them: fsync, rename to the final name, folder fsync, so a
//! `part-*.parquet` file is always complete. While a file is open its rows are shown to a live
//! reader if one is set ([`AuditLog::set_live`]: the SQL surface of `meshguard run`), and taken
//! back as the rename publishes them. Before every offset commit (and at shutdown, and whenever
//! `max_rows_per_file` rows are open) the service detaches the open files ([`AuditLog::detach`])
//! and closes them off its task, sending the commit only once they are closed: the rows of every
//! record a commit covers are in closed files before the commit is sent. Names are
//! `part-<writer>-<run>-<sequence>.parquet`: `writer` is the `kafka.instance_id` with `-enforcer`
//! (`enforcer` when unset), `run` the start time and a random suffix. At start the log deletes
//! temporary files its own `writer` left (a crash).
//!
//! # Duplicates
//! A crash loses the buffered rows of records the enforcer had not committed, and the restarted
//! enforcer handles those records again and audits them again. So no row is lost, but a row can be
//! written twice: once before a crash (when a flush, then the crash, came before the commit) and
//! once after. Every row carries the deterministic `action_id` (and the record's `partition` and
//! `offset`), so readers deduplicate on (`event`, `action_id`, `target`, `attempt`).
//!
//! # Retention
//! `date=` folders more than `retention_days` before today (UTC) are deleted at start and then at
//! most once an hour, at a flush or detach.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayRef, FixedSizeBinaryBuilder, Int32Builder, Int64Builder, StringBuilder, StringDictionaryBuilder, TimestampMillisecondBuilder,
    UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, UInt8Type};
use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use meshguard_ingest::archive::{ArchiveConfig, ArchiveMetrics, ClosedFile, LiveRows, ParquetArchive};
use meshguard_schemas::EnforcementStateKind;
use serde::Deserialize;
use tracing::info;
use uuid::Uuid;

use crate::action::{ActionKind, EnforcementAction};
use crate::error::{Error, Result};

/// `[enforcer.audit]`: where the audit trail goes and how long it is kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write the audit trail.
    pub enabled: bool,
    /// Its folder: `date=YYYY-MM-DD/part-….parquet` below it. Unset: `<archive.dir>/audit`, beside
    /// the attempt archive's `attempts` (the binary fills it in), or [`DEFAULT_AUDIT_DIR`] for a
    /// service started without it.
    pub dir: Option<PathBuf>,
    /// Rows buffered before a flush whatever the commit interval says (and the most rows per file).
    pub max_rows_per_file: usize,
    /// `date=` folders more than this many days before today (UTC) are deleted.
    pub retention_days: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { enabled: true, dir: None, max_rows_per_file: 100_000, retention_days: 365 }
    }
}

/// The audit folder when `dir` is unset: beside the default attempt archive's `attempts`.
pub const DEFAULT_AUDIT_DIR: &str = ".meshguard/archive/audit";

impl AuditConfig {
    /// Checks what types alone cannot; the error names the field (`enforcer.audit.…`).
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: String| Err(Error::ServiceConfig { field: format!("enforcer.audit.{field}"), reason });
        if self.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return invalid("dir", String::from("must not be empty"));
        }
        if self.max_rows_per_file == 0 {
            return invalid("max_rows_per_file", String::from("must be at least 1"));
        }
        if !(1..=36_500).contains(&self.retention_days) {
            return invalid("retention_days", format!("must be between 1 and 36500, found {}", self.retention_days));
        }
        Ok(())
    }
}

/// What a row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEvent {
    /// The enforcer consumed an enforcement-state change (one row per record, whatever the targets).
    StateChange,
    /// One call of one target (one row per try the service makes), or in dry run the call it would
    /// have made.
    TargetCall,
}

impl AuditEvent {
    /// The value of the `event` column.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuditEvent::StateChange => "state_change",
            AuditEvent::TargetCall => "target_call",
        }
    }
}

/// One row of the audit trail; see [`audit_schema`] for the columns.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    /// When it happened (processing time, ms): the record was read, or the call ended.
    pub ts: i64,
    /// What the row records.
    pub event: AuditEvent,
    /// The offender.
    pub uuid: Uuid,
    /// The action's deterministic id.
    pub action_id: Uuid,
    /// Block, unblock or unregister.
    pub action: ActionKind,
    /// The state the record sets.
    pub state: EnforcementStateKind,
    /// The state's `since` (event time).
    pub since: i64,
    /// The state's `until` (event time); `None`: until lifted.
    pub until: Option<i64>,
    /// The state's `reason`.
    pub reason: String,
    /// Partition of the enforcement record.
    pub partition: i32,
    /// Offset of the enforcement record.
    pub offset: i64,
    /// The target (target calls only).
    pub target: Option<String>,
    /// Which try of the call, from 1 (target calls only).
    pub attempt: Option<u32>,
    /// `applied`, `already_applied`, `dead_lettered`, `failed` or `dry_run` (target calls only).
    pub outcome: Option<&'static str>,
    /// Why the call failed, as the target said it (never a credential).
    pub error: Option<String>,
    /// When the call started (processing time, ms).
    pub started: Option<i64>,
    /// How long the call took, microseconds.
    pub latency_us: Option<u64>,
}

impl AuditRow {
    /// The row of a consumed state change.
    pub fn state_change(action: &EnforcementAction, partition: i32, offset: i64, ts: i64) -> Self {
        let state = action.state();
        Self {
            ts,
            event: AuditEvent::StateChange,
            uuid: action.uuid(),
            action_id: action.id(),
            action: action.kind(),
            state: state.state,
            since: state.since,
            until: state.until,
            reason: state.reason.clone(),
            partition,
            offset,
            target: None,
            attempt: None,
            outcome: None,
            error: None,
            started: None,
            latency_us: None,
        }
    }

    /// The row of one target call that started at `started` and took `latency`.
    #[allow(clippy::too_many_arguments, reason = "one row's columns")]
    pub fn target_call(
        change: &AuditRow,
        target: &str,
        attempt: u32,
        outcome: &'static str,
        error: Option<String>,
        started: i64,
        latency: Duration,
    ) -> Self {
        Self {
            ts: started + latency.as_millis() as i64,
            event: AuditEvent::TargetCall,
            target: Some(target.to_owned()),
            attempt: Some(attempt),
            outcome: Some(outcome),
            error,
            started: Some(started),
            latency_us: Some(latency.as_micros() as u64),
            ..change.clone()
        }
    }
}

/// The Arrow schema of the audit trail's files, for readers (the SQL surface registers the folder
/// as table `audit` with it). UUIDs are `FixedSizeBinary(16)` and enums `Dictionary(UInt8, Utf8)`
/// as in the attempt archive; times are `Timestamp(ms, UTC)`.
///
/// | column | type | |
/// |---|---|---|
/// | `ts` | timestamp | when the record was read (`state_change`) or the call ended (`target_call`); decides the `date=` folder |
/// | `event` | dictionary | `state_change` or `target_call` |
/// | `uuid` | uuid | the offender |
/// | `action_id` | uuid | the action's deterministic id (the webhook id, the MQTT correlation data) |
/// | `action` | dictionary | `block`, `unblock`, `unregister` |
/// | `state` | dictionary | `active`, `blocked`, `unregistered` |
/// | `since`, `until` | timestamp | the state's, in event time; `until` null: until lifted |
/// | `reason` | string | the state's reason |
/// | `partition`, `offset` | int32, int64 | where the enforcement record was read |
/// | `target` | string | the target's configured name (null for `state_change`) |
/// | `attempt` | uint32 | which try of the service, from 1 (null for `state_change`) |
/// | `outcome` | dictionary | `applied`, `already_applied`, `dead_lettered`, `failed`, `dry_run` |
/// | `error` | string | the target's error, without secrets (null when none) |
/// | `started` | timestamp | when the call started |
/// | `latency_us` | uint64 | how long it took, µs |
pub fn audit_schema() -> SchemaRef {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let dict = || DataType::Dictionary(Box::new(DataType::UInt8), Box::new(DataType::Utf8));
    Arc::new(Schema::new(vec![
        Field::new("ts", ts(), false),
        Field::new("event", dict(), false),
        Field::new("uuid", DataType::FixedSizeBinary(16), false),
        Field::new("action_id", DataType::FixedSizeBinary(16), false),
        Field::new("action", dict(), false),
        Field::new("state", dict(), false),
        Field::new("since", ts(), false),
        Field::new("until", ts(), true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("target", DataType::Utf8, true),
        Field::new("attempt", DataType::UInt32, true),
        Field::new("outcome", dict(), true),
        Field::new("error", DataType::Utf8, true),
        Field::new("started", ts(), true),
        Field::new("latency_us", DataType::UInt64, true),
    ]))
}

/// The rows as one batch of [`audit_schema`].
pub fn to_batch(rows: &[AuditRow]) -> Result<RecordBatch> {
    let n = rows.len();
    let mut ts = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut event = StringDictionaryBuilder::<UInt8Type>::new();
    let mut uuid = FixedSizeBinaryBuilder::with_capacity(n, 16);
    let mut action_id = FixedSizeBinaryBuilder::with_capacity(n, 16);
    let mut action = StringDictionaryBuilder::<UInt8Type>::new();
    let mut state = StringDictionaryBuilder::<UInt8Type>::new();
    let mut since = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut until = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut reason = StringBuilder::new();
    let mut partition = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut target = StringBuilder::new();
    let mut attempt = UInt32Builder::with_capacity(n);
    let mut outcome = StringDictionaryBuilder::<UInt8Type>::new();
    let mut error = StringBuilder::new();
    let mut started = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut latency = UInt64Builder::with_capacity(n);
    let arrow = |e: arrow::error::ArrowError| Error::Audit { what: "building a batch", path: PathBuf::new(), reason: e.to_string() };
    for r in rows {
        ts.append_value(r.ts);
        event.append(r.event.as_str()).map_err(arrow)?;
        uuid.append_value(r.uuid.as_bytes()).map_err(arrow)?;
        action_id.append_value(r.action_id.as_bytes()).map_err(arrow)?;
        action.append(r.action.as_str()).map_err(arrow)?;
        state.append(r.state.as_str()).map_err(arrow)?;
        since.append_value(r.since);
        until.append_option(r.until);
        reason.append_value(&r.reason);
        partition.append_value(r.partition);
        offset.append_value(r.offset);
        target.append_option(r.target.as_deref());
        attempt.append_option(r.attempt);
        outcome.append_option(r.outcome);
        error.append_option(r.error.as_deref());
        started.append_option(r.started);
        latency.append_option(r.latency_us);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ts.finish()),
        Arc::new(event.finish()),
        Arc::new(uuid.finish()),
        Arc::new(action_id.finish()),
        Arc::new(action.finish()),
        Arc::new(state.finish()),
        Arc::new(since.finish()),
        Arc::new(until.finish()),
        Arc::new(reason.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(target.finish()),
        Arc::new(attempt.finish()),
        Arc::new(outcome.finish()),
        Arc::new(error.finish()),
        Arc::new(started.finish()),
        Arc::new(latency.finish()),
    ];
    RecordBatch::try_new(audit_schema(), columns).map_err(arrow)
}

/// Time between two retention passes.
const RETENTION_EVERY_MS: i64 = 3_600_000;

/// The audit trail's writer; see the module documentation. The files are the attempt archive's
/// ([`ParquetArchive`]): same names, same temporary-then-rename discipline, same retention.
pub struct AuditLog {
    archive: ParquetArchive,
    /// Rows appended since the last flush: in open files, not yet durable.
    buffered: usize,
    max_rows: usize,
    /// The first append that failed since the last flush: the next flush reports it.
    failed: Option<Error>,
    last_retention_ms: i64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("dir", &self.archive.root()).field("buffered", &self.buffered).finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the audit folder (creating it), deletes the temporary files `writer` left, and
    /// applies retention. `writer` names this enforcer's files (sanitized); `now_ms` names the run.
    pub fn open(config: &AuditConfig, writer: &str, now_ms: i64) -> Result<Self> {
        config.validate()?;
        let dir = config.dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_AUDIT_DIR));
        let archive_config = ArchiveConfig {
            enabled: true,
            dir: dir.clone(),
            max_rows_per_file: config.max_rows_per_file,
            retention_days: config.retention_days,
            ..ArchiveConfig::default()
        };
        // The archive metrics (`table="audit"`) are left out: in `meshguard run` the pipeline
        // registers the archive's collectors in the same registry.
        let metrics = ArchiveMetrics::unregistered().map_err(|e| Error::Metrics(e.to_string()))?;
        let archive = ParquetArchive::open_at(&archive_config, dir.clone(), "audit", audit_schema(), Some(writer), now_ms, &metrics)
            .map_err(archive_error("opening", &dir))?;
        let mut this = Self { archive, buffered: 0, max_rows: config.max_rows_per_file, failed: None, last_retention_ms: i64::MIN };
        this.apply_retention(now_ms)?;
        Ok(this)
    }

    /// Shows the rows of the open files to `live` (the SQL surface's `audit` table), and takes
    /// them back as their files close, so a reader sees each row once.
    pub fn set_live(&mut self, live: Arc<LiveRows>) {
        self.archive.set_live(live);
    }

    /// The audit folder.
    pub fn dir(&self) -> &Path {
        self.archive.root()
    }

    /// Appends one row to its date's open file; it is durable once [`flush`](Self::flush)
    /// returned. A failure here is reported by the next flush.
    pub fn push(&mut self, row: AuditRow) {
        let appended = to_batch(std::slice::from_ref(&row))
            .and_then(|batch| self.archive.append(&batch).map_err(archive_error("writing", self.archive.root())));
        match appended {
            Ok(()) => self.buffered += 1,
            Err(error) => {
                self.failed.get_or_insert(error);
            }
        }
    }

    /// Rows appended, not yet in a closed file.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Whether a flush has something to do: rows to make durable, or a failed push to report.
    pub fn has_pending(&self) -> bool {
        self.buffered > 0 || self.failed.is_some()
    }

    /// Whether the open files hold `max_rows_per_file` rows.
    pub fn is_full(&self) -> bool {
        self.buffered >= self.max_rows
    }

    /// Closes every open file (one per date), and applies retention at most once an hour. When
    /// this returns `Ok`, every row pushed so far is in a complete, fsynced `part-*.parquet` file.
    /// Fails if a push failed since the last flush (that row is not written).
    pub fn flush(&mut self, now_ms: i64) -> Result<Vec<ClosedFile>> {
        self.detach(now_ms)?.finish()
    }

    /// Takes the open files off the log, to be closed by [`AuditClosing::finish`], on another
    /// thread if the caller likes: every row pushed so far is durable once that returns `Ok`.
    /// Later pushes go to new files. Applies retention when due (at most once an hour), so call it
    /// only once the files of the previous detach are closed. Fails, detaching nothing, if a push
    /// failed since the last flush or detach (that row is not written).
    pub fn detach(&mut self, now_ms: i64) -> Result<AuditClosing> {
        if let Some(error) = self.failed.take() {
            return Err(error);
        }
        if now_ms.saturating_sub(self.last_retention_ms) >= RETENTION_EVERY_MS {
            self.apply_retention(now_ms)?;
        }
        self.buffered = 0;
        Ok(AuditClosing { closing: self.archive.detach_all(), dir: self.archive.root().to_owned() })
    }

    /// Deletes the `date=` folders more than `retention_days` before the UTC date of `now_ms`.
    fn apply_retention(&mut self, now_ms: i64) -> Result<Vec<NaiveDate>> {
        self.last_retention_ms = now_ms;
        let deleted = self.archive.apply_retention(now_ms).map_err(archive_error("applying retention in", self.archive.root()))?;
        if !deleted.is_empty() {
            info!(message = "Deleted audit folders past retention.", folders = deleted.len());
        }
        Ok(deleted)
    }
}

/// Audit files detached by [`AuditLog::detach`], to be closed.
#[derive(Debug)]
pub struct AuditClosing {
    closing: meshguard_ingest::archive::Closing,
    dir: PathBuf,
}

impl AuditClosing {
    /// Closes the files (footer, fsync, rename, folder fsync): when this returns `Ok`, their rows
    /// are in complete `part-*.parquet` files.
    pub fn finish(self) -> Result<Vec<ClosedFile>> {
        self.closing.finish().map_err(archive_error("closing files in", &self.dir))
    }
}

fn archive_error(what: &'static str, path: &Path) -> impl FnOnce(meshguard_ingest::Error) -> Error {
    let path = path.to_owned();
    move |cause| Error::Audit { what, path, reason: cause.to_string() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use arrow::array::{Array as _, AsArray as _};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;
    use crate::action::test_support::blocked_action;

    use std::fs::{self, File};

    const DAY: i64 = 86_400_000;
    /// 2026-11-24T17:03:10Z.
    const NOW: i64 = 1_795_539_790_000;

    fn config(dir: &Path) -> AuditConfig {
        AuditConfig { dir: Some(dir.join("audit")), ..Default::default() }
    }

    fn read(path: &Path) -> RecordBatch {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap().build().unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        arrow::compute::concat_batches(&audit_schema(), &batches).unwrap()
    }

    #[test]
    fn rows_land_in_closed_files_by_date_with_the_schema_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(&config(dir.path()), "worker-1-enforcer", NOW).unwrap();
        let action = blocked_action();
        let change = AuditRow::state_change(&action, 2, 41, NOW);
        log.push(change.clone());
        log.push(AuditRow::target_call(&change, "soc", 1, "failed", Some("HTTP 503: busy".into()), NOW, Duration::from_millis(12)));
        log.push(AuditRow::target_call(&change, "soc", 2, "applied", None, NOW + 20, Duration::from_micros(1_500)));
        // A row of the next day goes to its own folder.
        log.push(AuditRow::state_change(&action, 2, 42, NOW + DAY));
        assert_eq!(log.buffered(), 4);
        let closed = log.flush(NOW + DAY).unwrap();
        assert_eq!(log.buffered(), 0);
        assert_eq!(closed.iter().map(|c| c.rows).collect::<Vec<_>>(), [3, 1]);
        let first = &closed[0].path;
        assert!(first.parent().unwrap().ends_with("date=2026-11-24"), "{}", first.display());
        assert!(first.file_name().unwrap().to_str().unwrap().starts_with("part-worker_1_enforcer-20261124T170310000Z-"));
        assert!(closed[1].path.parent().unwrap().ends_with("date=2026-11-25"));

        let batch = read(first);
        assert_eq!(batch.schema(), audit_schema(), "the Arrow schema comes back exactly");
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        let text = |name: &str, row: usize| {
            let c = col(name);
            let d = c.as_dictionary::<UInt8Type>();
            let values = d.values().as_string::<i32>();
            if d.is_null(row) { None } else { Some(values.value(d.keys().value(row) as usize).to_owned()) }
        };
        assert_eq!(text("event", 0).as_deref(), Some("state_change"));
        assert_eq!(text("event", 1).as_deref(), Some("target_call"));
        assert_eq!(
            (text("outcome", 0), text("outcome", 1).as_deref(), text("outcome", 2).as_deref()),
            (None, Some("failed"), Some("applied"))
        );
        assert_eq!(col("action_id").as_fixed_size_binary().value(2), action.id().as_bytes());
        assert_eq!(col("uuid").as_fixed_size_binary().value(0), action.uuid().as_bytes());
        assert_eq!(col("attempt").as_primitive::<arrow::datatypes::UInt32Type>().value(2), 2);
        assert_eq!(col("latency_us").as_primitive::<arrow::datatypes::UInt64Type>().value(2), 1_500);
        assert_eq!(col("error").as_string::<i32>().value(1), "HTTP 503: busy");
        assert!(col("target").is_null(0));
        assert_eq!(col("offset").as_primitive::<arrow::datatypes::Int64Type>().value(0), 41);
    }

    #[test]
    fn temporaries_of_a_crashed_run_are_removed_and_retention_deletes_old_dates() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuditConfig { retention_days: 2, ..config(dir.path()) };
        let root = cfg.dir.clone().unwrap();
        for (folder, name) in [
            ("date=2026-11-24", ".part-enforcer-20261124T000000000Z-0-000001.parquet.tmp"),
            ("date=2026-11-24", ".part-other-20261124T000000000Z-0-000001.parquet.tmp"),
            ("date=2026-11-01", "part-enforcer-x-000001.parquet"),
            ("date=2026-11-23", "part-enforcer-x-000001.parquet"),
            ("notes", "keep.txt"),
        ] {
            fs::create_dir_all(root.join(folder)).unwrap();
            fs::write(root.join(folder).join(name), b"x").unwrap();
        }
        let _log = AuditLog::open(&cfg, "enforcer", NOW).unwrap();
        assert!(!root.join("date=2026-11-24/.part-enforcer-20261124T000000000Z-0-000001.parquet.tmp").exists());
        assert!(root.join("date=2026-11-24/.part-other-20261124T000000000Z-0-000001.parquet.tmp").exists(), "another writer's");
        assert!(!root.join("date=2026-11-01").exists(), "past retention");
        assert!(root.join("date=2026-11-23").exists() && root.join("notes/keep.txt").exists());
    }

    /// Rows pushed are visible to a live reader until their file closes, then only in the file.
    #[test]
    fn live_rows_are_shown_until_their_file_closes() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(&config(dir.path()), "enforcer", NOW).unwrap();
        let live = Arc::new(LiveRows::new());
        log.set_live(live.clone());
        let change = AuditRow::state_change(&blocked_action(), 0, 7, NOW);
        log.push(change.clone());
        log.push(AuditRow::target_call(&change, "soc", 1, "applied", None, NOW, Duration::from_millis(1)));
        assert!(log.has_pending());
        assert_eq!(live.rows(), 2, "the open file's rows");
        let closed = log.flush(NOW).unwrap();
        assert_eq!((live.rows(), closed.len(), closed[0].rows), (0, 1, 2), "moved to the closed file");
        assert!(!log.has_pending());
    }

    #[test]
    fn bad_settings_name_their_field() {
        let error = AuditConfig { retention_days: 0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(error.contains("`enforcer.audit.retention_days`"), "{error}");
        let error = AuditConfig { max_rows_per_file: 0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(error.contains("`enforcer.audit.max_rows_per_file`"), "{error}");
    }
}
