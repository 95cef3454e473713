//! `[archive]`: where the attempt archive goes, how large its files grow, how long it is kept.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of the [`ParquetArchive`](super::ParquetArchive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Write every decoded message attempt (allowed or not) to Parquet.
    pub enabled: bool,
    /// Root of the archive; attempts go to `<dir>/attempts/date=YYYY-MM-DD/part-….parquet`.
    /// `meshguard run` without `--brokers` uses a fresh temporary directory instead.
    pub dir: PathBuf,
    /// A file is closed once it holds this many rows.
    pub max_rows_per_file: usize,
    /// A file is closed once its encoded size reaches this many bytes (checked after each
    /// micro-batch, so a file may exceed it by one micro-batch's rows).
    pub max_bytes_per_file: u64,
    /// `date=` folders whose date (UTC) is more than this many days before today are deleted at
    /// checkpoints.
    pub retention_days: u32,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: default_dir(),
            max_rows_per_file: default_max_rows_per_file(),
            max_bytes_per_file: default_max_bytes_per_file(),
            retention_days: default_retention_days(),
        }
    }
}

/// Beside the default checkpoint directory (`.meshguard/checkpoints`).
fn default_dir() -> PathBuf {
    PathBuf::from(".meshguard/archive")
}

/// About 100 MB of attempts: large enough that a day at a few thousand attempts per second is a
/// few hundred files per worker, small enough for one reader thread per file.
fn default_max_rows_per_file() -> usize {
    1_000_000
}

/// 128 MiB: the file size Parquet readers (DataFusion, Polars) split and prune well.
fn default_max_bytes_per_file() -> u64 {
    128 * 1024 * 1024
}

/// 30 days: the timing models learn from 14 days (contract default), with room for retraining.
fn default_retention_days() -> u32 {
    30
}

impl ArchiveConfig {
    /// Checks what types alone cannot; the error names the field (`archive.<field>`) and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.dir.as_os_str().is_empty() {
            return Err(("archive.dir".into(), "must not be empty".into()));
        }
        if self.max_rows_per_file == 0 {
            return Err(("archive.max_rows_per_file".into(), "must be at least 1".into()));
        }
        if self.max_bytes_per_file < 4096 {
            return Err(("archive.max_bytes_per_file".into(), format!("must be at least 4096, found {}", self.max_bytes_per_file)));
        }
        if !(1..=36_500).contains(&self.retention_days) {
            return Err(("archive.retention_days".into(), format!("must be between 1 and 36500, found {}", self.retention_days)));
        }
        Ok(())
    }
}
