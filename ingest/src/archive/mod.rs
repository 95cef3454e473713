//! The archive: tables of event-timed rows in Parquet files under Hive-style date folders. Every
//! decoded message attempt, allowed or not (`attempts`, for the timing models' training and the SQL
//! surface), every finding (`findings`) and every enforcement change (`enforcement`) the pipeline
//! publishes; one [`ParquetArchive`] writes one table's folder.
//!
//! ```text
//!  <dir>/attempts/
//!    date=2026-11-24/
//!      part-<writer>-<run>-000001.parquet     closed: complete, fsynced, never written again
//!      .part-<writer>-<run>-000002.parquet.tmp open: being written, invisible to readers
//!    date=2026-11-25/…
//!  <dir>/findings/date=…/   <dir>/enforcement/date=…/
//! ```
//!
//! This module owns the files under `<dir>/<table>`; it must never decide anything about the
//! rows (they are written as given, attempts in the canonical schema of `meshguard.messages.v1`,
//! the Arrow schema stored in each file so readers get `FixedSizeBinary(16)` UUIDs, dictionary enums
//! and UTC timestamps back exactly).
//!
//! # Partitioning and files
//! A row goes to the folder of its event time's UTC date (`ts`), not its arrival: rows of one
//! micro-batch may span dates and are split with Arrow kernels. One file per date is open at a
//! time; it is closed at `max_rows_per_file` rows or `max_bytes_per_file` bytes, and **every open
//! file is closed at each pipeline checkpoint**, before the checkpoint is saved. A file is written
//! under a hidden temporary name (`.part-….parquet.tmp`), then fsynced, renamed to its final name and
//! its folder fsynced: a `part-*.parquet` file is always complete.
//!
//! Names are `part-<writer>-<run>-<sequence>.parquet`: `writer` is the worker's `kafka.instance_id`
//! (`meshguard` when unset; characters other than letters, digits, `_` and `.` become `_`), `run` the start time of this process (UTC) and a random suffix,
//! `sequence` counts files of the run. Two workers, or two runs of one worker, never collide.
//!
//! # Durability: effectively once
//! A checkpoint says "every attempt before these offsets is processed". Because files are closed
//! before it is saved, every attempt it covers is in a closed file. After a crash, the worker
//! resumes from the last checkpoint and archives the attempts after it again; what the crashed
//! run had written of them was only ever in temporary files, which [`ParquetArchive::open`] deletes
//! (those of its own `writer` name, so workers sharing a directory must have distinct
//! `kafka.instance_id`s, as static membership already requires). So no attempt is lost and none
//! lands twice from a crash.
//!
//! One case does repeat rows: when the consumer group moves a partition to another worker, the
//! attempts this worker read from it after its last checkpoint are in its open files, and the new
//! owner archives them again from that checkpoint. Every attempt carries its `id`, so readers that
//! need exact counts across rebalances deduplicate on it.
//!
//! # Retention
//! At each checkpoint, `date=` folders whose date is more than `retention_days` before today (UTC,
//! by the caller's clock) are deleted whole. Folders with other names are left alone.
//!
//! # Memory
//! An open file buffers at most one row group (128 Ki rows or 32 MiB encoded, whichever first) in
//! memory; the other row groups are on disk. Rows are copied once, into the Parquet encoders.

mod config;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, Date32Array, Scalar};
use arrow::compute::kernels::cmp::eq;
use arrow::compute::{filter, filter_record_batch, max, min, not};
use arrow::datatypes::{DataType, Date32Type, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, NaiveDate};
pub use meshguard_analytics::sql::LiveRows;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tracing::{debug, info};

pub use config::ArchiveConfig;

use crate::error::{Error, Result};

/// The event-time column that decides a row's folder.
const TS: &str = "ts";
/// Milliseconds in a UTC day.
const MS_PER_DAY: i64 = 86_400_000;
/// Rows of one row group: the unit Parquet readers prune and decode in parallel, and what an open
/// file holds in memory.
const ROW_GROUP_ROWS: usize = 128 * 1024;
/// Encoded bytes of one row group, the other bound of an open file's memory.
const ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Columns whose values (nearly) never repeat within a row group: a dictionary would hash every
/// value only to be dropped when it outgrows its page.
const UNIQUE_COLUMNS: [&str; 3] = ["id", TS, "payload"];

/// How every table is written: Snappy; min/max statistics only for `ts`, the column readers prune
/// files and row groups by (random UUIDs, enums and free text never prune, and comparing every value
/// was the writer's largest cost); no dictionary for the columns of [`UNIQUE_COLUMNS`].
fn writer_properties(schema: &SchemaRef, config: &ArchiveConfig) -> WriterProperties {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS.min(config.max_rows_per_file)))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
        .set_statistics_enabled(EnabledStatistics::None)
        .set_column_statistics_enabled(ColumnPath::from(TS), EnabledStatistics::Page);
    for name in UNIQUE_COLUMNS {
        if schema.field_with_name(name).is_ok_and(|f| !f.data_type().is_nested()) {
            props = props.set_column_dictionary_enabled(ColumnPath::from(name), false);
        }
    }
    props.build()
}

/// Folder (and table name) of the message attempts under the archive's root.
pub const ATTEMPTS: &str = "attempts";
/// Folder of the findings.
pub const FINDINGS: &str = "findings";
/// Folder of the enforcement changes.
pub const ENFORCEMENT: &str = "enforcement";
/// Folder of the devices' reported interactions (the cross-check's history).
pub const INTERACTIONS: &str = "interactions";

/// Counters of the archive by table (a fixed handful of label values), registered in the caller's
/// Prometheus registry. They count closed files only: what a checkpoint can rely on.
#[derive(Debug, Clone)]
pub struct ArchiveMetrics {
    rows: IntCounterVec,
    files: IntCounterVec,
    bytes: IntCounterVec,
}

/// One table's counters.
#[derive(Debug, Clone)]
struct TableMetrics {
    rows: IntCounter,
    files: IntCounter,
    bytes: IntCounter,
}

impl ArchiveMetrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let this = Self::unregistered()?;
        registry.register(Box::new(this.rows.clone()))?;
        registry.register(Box::new(this.files.clone()))?;
        registry.register(Box::new(this.bytes.clone()))?;
        Ok(this)
    }

    /// The metrics without a registry (tests, benchmarks).
    pub fn unregistered() -> prometheus::Result<Self> {
        let vec = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["table"]);
        Ok(Self {
            rows: vec("meshguard_archive_rows_total", "Rows written to closed archive files, by table.")?,
            files: vec("meshguard_archive_files_total", "Archive files closed (complete and fsynced), by table.")?,
            bytes: vec("meshguard_archive_bytes_total", "Bytes of closed archive files, by table.")?,
        })
    }

    fn table(&self, table: &str) -> TableMetrics {
        TableMetrics {
            rows: self.rows.with_label_values(&[table]),
            files: self.files.with_label_values(&[table]),
            bytes: self.bytes.with_label_values(&[table]),
        }
    }
}

/// A file the archive closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedFile {
    /// Its final path.
    pub path: PathBuf,
    /// Rows in it.
    pub rows: u64,
    /// Its size.
    pub bytes: u64,
}

/// The file being written for one date.
struct OpenFile {
    /// Its sequence number in this run: its id in [`LiveRows`].
    seq: u64,
    writer: ArrowWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    rows: usize,
}

/// Writes one table's rows to Parquet. See the module docs for layout, durability and retention.
pub struct ParquetArchive {
    config: ArchiveConfig,
    /// `<dir>/<table>`.
    root: PathBuf,
    schema: SchemaRef,
    props: WriterProperties,
    /// Prefix of every file name of this run: `part-<writer>-<run>-`.
    prefix: String,
    /// Prefix of this writer's temporary files, whatever the run: `.part-<writer>-`.
    tmp_prefix: String,
    /// Files of this run so far.
    sequence: u64,
    /// Open files by date (days since 1970-01-01, UTC).
    open: BTreeMap<i32, OpenFile>,
    metrics: TableMetrics,
    /// Readers of the rows of open files (the SQL surface), if any.
    live: Option<Arc<LiveRows>>,
}

impl std::fmt::Debug for ParquetArchive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetArchive")
            .field("root", &self.root)
            .field("prefix", &self.prefix)
            .field("open_dates", &self.open.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ParquetArchive {
    /// Opens the archive's `table` folder under `config.dir` for batches of `schema` (which must
    /// have a `ts` column of `Timestamp(Millisecond, _)`: the event time that picks a row's date),
    /// written by `writer` (the worker's `kafka.instance_id`). Creates the directory, and deletes
    /// the temporary files a previous run of the same writer left (a crash; see the module docs).
    /// `now_ms` names this run.
    pub fn open(
        config: &ArchiveConfig,
        table: &str,
        schema: SchemaRef,
        writer: Option<&str>,
        now_ms: i64,
        metrics: &ArchiveMetrics,
    ) -> Result<Self> {
        if table.is_empty() || !table.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return Err(Error::ArchiveConfig { field: "table".into(), reason: format!("`{table}` is not a table name ([a-z0-9_]+)") });
        }
        Self::open_at(config, config.dir.join(table), table, schema, writer, now_ms, metrics)
    }

    /// As [`open`](Self::open), for a table whose folder is `root` rather than `<dir>/<table>`
    /// (the enforcer's audit trail, whose folder is configured on its own); `table` labels its
    /// metrics. `config.dir` is not used.
    pub fn open_at(
        config: &ArchiveConfig,
        root: PathBuf,
        table: &str,
        schema: SchemaRef,
        writer: Option<&str>,
        now_ms: i64,
        metrics: &ArchiveMetrics,
    ) -> Result<Self> {
        if let Err((field, reason)) = config.validate() {
            return Err(Error::ArchiveConfig { field, reason });
        }
        match schema.field_with_name(TS).map(|f| f.data_type()) {
            Ok(DataType::Timestamp(TimeUnit::Millisecond, _)) => {}
            found => {
                return Err(Error::ArchiveBatch {
                    expected: "a `ts` column of Timestamp(Millisecond)".into(),
                    found: format!("{found:?}"),
                });
            }
        }
        fs::create_dir_all(&root).map_err(io_error("creating", &root))?;
        let writer = sanitize(writer.unwrap_or("meshguard"));
        let started = DateTime::from_timestamp_millis(now_ms).unwrap_or_default().format("%Y%m%dT%H%M%S%3fZ");
        let prefix = format!("part-{writer}-{started}-{:08x}-", uuid::Uuid::new_v4().as_u128() as u32);
        let props = writer_properties(&schema, config);
        let this = Self {
            config: config.clone(),
            root,
            schema,
            props,
            prefix,
            tmp_prefix: format!(".part-{writer}-"),
            sequence: 0,
            open: BTreeMap::new(),
            metrics: metrics.table(table),
            live: None,
        };
        let removed = this.remove_stale_temporaries()?;
        if removed > 0 {
            info!(message = "Removed temporary archive files of an interrupted run.", files = removed, dir = %this.root.display());
        }
        Ok(this)
    }

    /// Hands every row written to an open file to `live` too, and takes it back when the file
    /// closes, so a reader of the folder and of `live` sees each row once (see [`LiveRows`]).
    pub fn with_live(mut self, live: Arc<LiveRows>) -> Self {
        self.set_live(live);
        self
    }

    /// As [`with_live`](Self::with_live), on an archive already opened (before its first append).
    pub fn set_live(&mut self, live: Arc<LiveRows>) {
        self.live = Some(live);
    }

    /// The table's folder (`<dir>/<table>`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Appends `batch` (rows in the archive's schema) to the open files of their dates, closing
    /// files that reach their size bounds. The rows are durable only once their file is closed:
    /// by a bound, or by [`ParquetArchive::close_all`].
    pub fn append(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if batch.schema() != self.schema {
            return Err(Error::ArchiveBatch { expected: format!("rows of schema {}", self.schema), found: format!("{}", batch.schema()) });
        }
        let ts = batch
            .column_by_name(TS)
            .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
            .ok_or_else(|| Error::ArchiveBatch { expected: "a `ts` column of Timestamp(Millisecond)".into(), found: "none".into() })?;
        if ts.null_count() > 0 {
            return Err(Error::ArchiveBatch { expected: "a `ts` in every row".into(), found: format!("{} rows without", ts.null_count()) });
        }
        // UTC by the contract: the day is the floor of the epoch milliseconds.
        let days: Date32Array = ts.unary(|ms| ms.div_euclid(MS_PER_DAY) as i32);
        let (Some(first), Some(last)) = (min(&days), max(&days)) else { return Ok(()) };
        if first == last {
            return self.write_date(first, batch.clone());
        }
        // Rows span dates: peel off the earliest date until one is left. Usually two dates.
        let (mut rest, mut rest_days) = (batch.clone(), days);
        loop {
            let Some(day) = min(&rest_days) else { return Ok(()) };
            if day == last {
                return self.write_date(day, rest);
            }
            let mask = eq(&rest_days, &Scalar::new(Date32Array::from(vec![day]))).map_err(arrow_error("selecting a date's rows"))?;
            self.write_date(day, filter_record_batch(&rest, &mask).map_err(arrow_error("selecting a date's rows"))?)?;
            let others = not(&mask).map_err(arrow_error("selecting the other dates' rows"))?;
            rest = filter_record_batch(&rest, &others).map_err(arrow_error("selecting the other dates' rows"))?;
            rest_days =
                filter(&rest_days, &others).map_err(arrow_error("selecting the other dates' rows"))?.as_primitive::<Date32Type>().clone();
        }
    }

    /// Closes every open file: when this returns, every row appended so far is in a complete,
    /// fsynced `part-*.parquet` file. Call it before saving a checkpoint.
    pub fn close_all(&mut self) -> Result<Vec<ClosedFile>> {
        self.detach_all().finish()
    }

    /// Takes every open file off the archive, to be closed by [`Closing::finish`], on another
    /// thread if the caller likes: the rows appended so far are durable once that returns. Later
    /// appends go to new files. Call [`apply_retention`](Self::apply_retention) only after the
    /// files are closed (it does not know about them).
    pub fn detach_all(&mut self) -> Closing {
        Closing { files: std::mem::take(&mut self.open).into_values().collect(), live: self.live.clone(), metrics: self.metrics.clone() }
    }

    /// Deletes the `date=` folders more than `retention_days` before the UTC date of `now_ms`,
    /// and returns their dates. Folders with an open file are kept.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<Vec<NaiveDate>> {
        let today = DateTime::from_timestamp_millis(now_ms).unwrap_or_default().date_naive();
        let Some(oldest_kept) = today.checked_sub_days(chrono::Days::new(u64::from(self.config.retention_days))) else {
            return Ok(Vec::new());
        };
        let mut deleted = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_error("listing", &self.root))? {
            let entry = entry.map_err(io_error("listing", &self.root))?;
            let name = entry.file_name();
            let Some(date) =
                name.to_str().and_then(|n| n.strip_prefix("date=")).and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
            else {
                continue;
            };
            if date >= oldest_kept || self.open.contains_key(&days_since_epoch(date)) {
                continue;
            }
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(io_error("deleting", &path))?;
            deleted.push(date);
        }
        if !deleted.is_empty() {
            sync_dir(&self.root)?;
            deleted.sort();
            info!(
                message = "Deleted archive folders past retention.",
                folders = deleted.len(),
                retention_days = self.config.retention_days
            );
        }
        Ok(deleted)
    }

    /// Writes rows of one date, rolling files at the row and byte bounds.
    fn write_date(&mut self, day: i32, mut rows: RecordBatch) -> Result<()> {
        let max_rows = self.config.max_rows_per_file;
        let max_bytes = self.config.max_bytes_per_file;
        while rows.num_rows() > 0 {
            if !self.open.contains_key(&day) {
                let file = self.create(day)?;
                self.open.insert(day, file);
            }
            let Some(file) = self.open.get_mut(&day) else { continue };
            let take = (max_rows - file.rows).min(rows.num_rows());
            let slice = rows.slice(0, take);
            file.writer.write(&slice).map_err(parquet_error(&file.tmp))?;
            if let Some(live) = &self.live {
                live.push(file.seq, slice);
            }
            file.rows += take;
            rows = rows.slice(take, rows.num_rows() - take);
            let bytes = (file.writer.bytes_written() + file.writer.in_progress_size()) as u64;
            if (file.rows >= max_rows || bytes >= max_bytes)
                && let Some(file) = self.open.remove(&day)
            {
                self.close(file)?;
            }
        }
        Ok(())
    }

    /// Starts a file for `day` under its temporary name.
    fn create(&mut self, day: i32) -> Result<OpenFile> {
        let date = Date32Type::to_naive_date_opt(day)
            .ok_or_else(|| Error::ArchiveBatch { expected: "a `ts` within years ±262143".into(), found: format!("day {day}") })?;
        let folder = self.root.join(format!("date={}", date.format("%Y-%m-%d")));
        if !folder.exists() {
            fs::create_dir_all(&folder).map_err(io_error("creating", &folder))?;
            // The new folder's entry must survive a crash along with the files it will hold.
            sync_dir(&self.root)?;
        }
        self.sequence += 1;
        let name = format!("{}{:06}.parquet", self.prefix, self.sequence);
        let tmp = folder.join(format!(".{name}.tmp"));
        let path = folder.join(name);
        let out = File::create(&tmp).map_err(io_error("creating", &tmp))?;
        let writer = ArrowWriter::try_new(out, self.schema.clone(), Some(self.props.clone())).map_err(parquet_error(&tmp))?;
        Ok(OpenFile { seq: self.sequence, writer, tmp, path, rows: 0 })
    }

    /// Finishes `file`: footer, fsync, rename to the final name, fsync of the folder.
    fn close(&self, file: OpenFile) -> Result<ClosedFile> {
        close_file(file, self.live.as_deref(), &self.metrics)
    }
    /// Deletes this writer's temporary files in every date folder.
    fn remove_stale_temporaries(&self) -> Result<usize> {
        let mut removed = 0;
        for folder in fs::read_dir(&self.root).map_err(io_error("listing", &self.root))? {
            let folder = folder.map_err(io_error("listing", &self.root))?.path();
            if !folder.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&folder).map_err(io_error("listing", &folder))? {
                let entry = entry.map_err(io_error("listing", &folder))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with(&self.tmp_prefix) && name.ends_with(".tmp") {
                    let path = entry.path();
                    fs::remove_file(&path).map_err(io_error("deleting", &path))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Files taken off an archive to be closed ([`ParquetArchive::detach_all`]).
pub struct Closing {
    files: Vec<OpenFile>,
    live: Option<Arc<LiveRows>>,
    metrics: TableMetrics,
}

impl std::fmt::Debug for Closing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Closing").field("files", &self.files.iter().map(|f| &f.path).collect::<Vec<_>>()).finish_non_exhaustive()
    }
}

impl Closing {
    /// Whether there is nothing to close.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Closes every file (footer, fsync, rename, fsync of the folder): when this returns `Ok`,
    /// their rows are in complete `part-*.parquet` files.
    pub fn finish(self) -> Result<Vec<ClosedFile>> {
        let Self { files, live, metrics } = self;
        files.into_iter().map(|file| close_file(file, live.as_deref(), &metrics)).collect()
    }
}

/// Finishes `file`: footer, fsync, rename to the final name, fsync of the folder.
fn close_file(file: OpenFile, live: Option<&LiveRows>, metrics: &TableMetrics) -> Result<ClosedFile> {
    let OpenFile { seq, writer, tmp, path, rows } = file;
    let out = writer.into_inner().map_err(parquet_error(&tmp))?;
    out.sync_all().map_err(io_error("syncing", &tmp))?;
    let bytes = out.metadata().map_err(io_error("reading the size of", &tmp))?.len();
    drop(out);
    // The rename publishes the rows to readers of the folder; live readers stop seeing them
    // in the same critical section.
    match live {
        Some(live) => live.close(seq, || fs::rename(&tmp, &path)),
        None => fs::rename(&tmp, &path),
    }
    .map_err(io_error("renaming", &tmp))?;
    if let Some(folder) = path.parent() {
        sync_dir(folder)?;
    }
    metrics.rows.inc_by(rows as u64);
    metrics.files.inc();
    metrics.bytes.inc_by(bytes);
    debug!(message = "Closed an archive file.", rows, bytes, path = %path.display());
    Ok(ClosedFile { path, rows: rows as u64, bytes })
}

/// Days since 1970-01-01 of `date`.
fn days_since_epoch(date: NaiveDate) -> i32 {
    Date32Type::from_naive_date(date)
}

/// `name` with every character but ASCII letters, digits, `_` and `.` replaced by `_`: an instance
/// id cannot escape the folder, and cannot hold the `-` that ends the writer's part of a name, so
/// writer `w`'s temporary-file prefix `.part-w-` never matches writer `w-1`'s files.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' { c } else { '_' }).collect()
}

/// Makes a folder's entries (created, renamed or deleted files) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("syncing", dir))
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |cause| Error::ArchiveIo { what, path, cause }
}

fn parquet_error(path: &Path) -> impl FnOnce(ParquetError) -> Error {
    let path = path.to_owned();
    move |cause| Error::ArchiveParquet { path, cause }
}

fn arrow_error(what: &'static str) -> impl FnOnce(ArrowError) -> Error {
    move |cause| Error::ArchiveArrow { what, cause }
}
