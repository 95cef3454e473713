//! History features from the attempt archive, computed with Polars.
//!
//! The input is the archive's layout (`<dir>/attempts/date=YYYY-MM-DD/part-*.parquet`, see
//! `meshguard_ingest::archive`): only the `date=` folders that can hold attempts of the horizon are
//! scanned, only closed files (`part-*.parquet`; hidden `.part-….tmp` files are being written), and
//! only the columns `id`, `from`, `to`, `ts` are read (UUIDs as 16-byte binaries, `ts` as epoch
//! milliseconds). Rows are deduplicated on `id` (a rebalance archives some attempts twice; the
//! contract counts a re-delivered id once), then aggregated twice: per requester-target pair
//! (attempts without a target, `connect`s, belong to no pair) and per requester.

use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate};
use polars::prelude::*;
use uuid::Uuid;

use super::{BINS, Key};
use crate::tables::FastMap;
use crate::timing_model::store::ModelError;

/// What training knows of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyFeatures {
    /// Attempts per hour of the week.
    pub profile: [u32; BINS],
    /// Distinct attempts.
    pub attempts: u32,
    /// Distinct UTC days with an attempt.
    pub days: u32,
    /// First and last attempt (epoch ms).
    pub first_ms: i64,
    /// See `first_ms`.
    pub last_ms: i64,
    /// Gaps between consecutive attempts, seconds: median, first and third quartile (0 with
    /// fewer than two attempts).
    pub gap_median_s: f64,
    /// See `gap_median_s`.
    pub gap_p25_s: f64,
    /// See `gap_median_s`.
    pub gap_p75_s: f64,
}

impl KeyFeatures {
    fn empty() -> Self {
        Self { profile: [0; BINS], attempts: 0, days: 0, first_ms: 0, last_ms: 0, gap_median_s: 0.0, gap_p25_s: 0.0, gap_p75_s: 0.0 }
    }

    /// Weekday profile (0 = Monday), summed from the hour-of-week profile.
    pub fn weekdays(&self) -> [u32; 7] {
        let mut out = [0; 7];
        for (b, n) in self.profile.iter().enumerate() {
            out[b / 24] += n;
        }
        out
    }
}

/// The features of every pair and requester (target nil) with attempts in `[from_ms, until_ms)`,
/// and the number of distinct attempts read.
#[derive(Debug, Clone, Default)]
pub struct Features {
    /// By key.
    pub keys: FastMap<Key, KeyFeatures>,
    /// Distinct attempts in the horizon.
    pub attempts: u64,
    /// Parquet files scanned.
    pub files: usize,
}

/// The closed Parquet files of `<archive_dir>/attempts` whose `date=` folder can hold attempts in
/// `[from_ms, until_ms)`, sorted. A missing archive is empty, not an error.
pub fn archive_files(archive_dir: &Path, from_ms: i64, until_ms: i64) -> Result<Vec<PathBuf>, ModelError> {
    let root = archive_dir.join("attempts");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |cause| ModelError::Io { what: "listing", path, cause }
    };
    let day = |ms: i64| DateTime::from_timestamp_millis(ms).map(|t| t.date_naive());
    let (Some(first), Some(last)) = (day(from_ms), day(until_ms.saturating_sub(1))) else { return Ok(Vec::new()) };
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&root)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(&root))?;
        let name = entry.file_name();
        let Some(date) = name.to_str().and_then(|n| n.strip_prefix("date=")).and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        else {
            continue;
        };
        if date < first || date > last {
            continue;
        }
        let folder = entry.path();
        for file in std::fs::read_dir(&folder).map_err(io(&folder))? {
            let file = file.map_err(io(&folder))?;
            let name = file.file_name();
            if name.to_str().is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet")) {
                files.push(file.path());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Reads the archive under `archive_dir` for attempts in `[from_ms, until_ms)` and computes every
/// key's features. See the module docs.
pub fn extract(archive_dir: &Path, from_ms: i64, until_ms: i64) -> Result<Features, ModelError> {
    let files = archive_files(archive_dir, from_ms, until_ms)?;
    if files.is_empty() {
        return Ok(Features::default());
    }
    let polars = |what: &'static str| move |cause: PolarsError| ModelError::Polars { what, cause: cause.to_string() };
    let paths = files.iter().map(|p| PlRefPath::try_from_path(p)).collect::<PolarsResult<Vec<_>>>().map_err(polars("naming the files"))?;
    let args =
        ScanArgsParquet { hive_options: HiveOptions { enabled: Some(false), ..Default::default() }, glob: false, ..Default::default() };
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 86_400_000;
    let ts = col("ts").cast(DataType::Int64);
    let rows = LazyFrame::scan_parquet_files(paths.into_iter().collect(), args)
        .map_err(polars("scanning the archive"))?
        .select([col("id"), col("from"), col("to"), ts.alias("ts")])
        .filter(col("ts").gt_eq(lit(from_ms)).and(col("ts").lt(lit(until_ms))))
        .unique(Some(by_name(["id"], true, false)), UniqueKeepStrategy::Any)
        .with_columns([
            // Hour of the week, Monday 00:00 UTC = 0 (1970-01-01 was a Thursday).
            (((col("ts") / lit(DAY) + lit(3i64)) % lit(7i64)) * lit(24i64) + (col("ts") / lit(HOUR)) % lit(24i64)).alias("how"),
            (col("ts") / lit(DAY)).alias("day"),
        ])
        .collect()
        .map_err(polars("reading the archive"))?;
    let attempts = rows.height() as u64;
    let mut keys: FastMap<Key, KeyFeatures> = FastMap::default();
    for (by, pairs) in [(vec![col("from"), col("to")], true), (vec![col("from")], false)] {
        let mut base = rows.clone().lazy();
        if pairs {
            base = base.filter(col("to").is_not_null());
        }
        // Inter-arrival gaps: rows sorted by key and time; a gap is taken within a key only.
        let sort_by: Vec<PlSmallStr> = if pairs { vec!["from".into(), "to".into(), "ts".into()] } else { vec!["from".into(), "ts".into()] };
        let same_key = if pairs {
            col("from").eq(col("from").shift(lit(1))).and(col("to").eq(col("to").shift(lit(1))))
        } else {
            col("from").eq(col("from").shift(lit(1)))
        };
        let summary = base
            .clone()
            .sort(sort_by, SortMultipleOptions::default())
            .with_column(
                when(same_key)
                    .then((col("ts") - col("ts").shift(lit(1))).cast(DataType::Float64) / lit(1000.0))
                    .otherwise(lit(Null {}))
                    .alias("gap"),
            )
            .group_by(by.clone())
            .agg([
                len().alias("attempts"),
                col("day").n_unique().alias("days"),
                col("ts").min().alias("first"),
                col("ts").max().alias("last"),
                col("gap").median().alias("gap_median"),
                col("gap").quantile(lit(0.25), QuantileMethod::Linear).alias("gap_p25"),
                col("gap").quantile(lit(0.75), QuantileMethod::Linear).alias("gap_p75"),
            ])
            .collect()
            .map_err(polars("aggregating per key"))?;
        let mut with_bin = by.clone();
        with_bin.push(col("how"));
        let profile = base.group_by(with_bin).agg([len().alias("n")]).collect().map_err(polars("counting hours of the week"))?;

        let key_of = |df: &DataFrame, i: usize| -> Result<Key, ModelError> {
            let from = uuid_at(df, "from", i)?;
            let to = if pairs { uuid_at(df, "to", i)? } else { Uuid::nil() };
            Ok((from, to))
        };
        let int = |df: &DataFrame, name: &str| -> Result<Int64Chunked, ModelError> {
            Ok(df
                .column(name)
                .and_then(|c| c.cast(&DataType::Int64))
                .map_err(polars("reading a column"))?
                .i64()
                .map_err(polars("reading a column"))?
                .clone())
        };
        let float = |df: &DataFrame, name: &str| -> Result<Float64Chunked, ModelError> {
            Ok(df
                .column(name)
                .and_then(|c| c.cast(&DataType::Float64))
                .map_err(polars("reading a column"))?
                .f64()
                .map_err(polars("reading a column"))?
                .clone())
        };
        let (n, days, first, last) = (int(&summary, "attempts")?, int(&summary, "days")?, int(&summary, "first")?, int(&summary, "last")?);
        let (median, p25, p75) = (float(&summary, "gap_median")?, float(&summary, "gap_p25")?, float(&summary, "gap_p75")?);
        for i in 0..summary.height() {
            let key = key_of(&summary, i)?;
            let f = keys.entry(key).or_insert_with(KeyFeatures::empty);
            f.attempts = n.get(i).unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32;
            f.days = days.get(i).unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32;
            f.first_ms = first.get(i).unwrap_or(0);
            f.last_ms = last.get(i).unwrap_or(0);
            f.gap_median_s = median.get(i).unwrap_or(0.0);
            f.gap_p25_s = p25.get(i).unwrap_or(0.0);
            f.gap_p75_s = p75.get(i).unwrap_or(0.0);
        }
        let (how, count) = (int(&profile, "how")?, int(&profile, "n")?);
        for i in 0..profile.height() {
            let key = key_of(&profile, i)?;
            let (Some(b), Some(c)) = (how.get(i), count.get(i)) else { continue };
            if let (Some(f), Ok(b)) = (keys.get_mut(&key), usize::try_from(b))
                && b < BINS
            {
                f.profile[b] = c.clamp(0, i64::from(u32::MAX)) as u32;
            }
        }
    }
    Ok(Features { keys, attempts, files: files.len() })
}

/// The UUID in binary column `name` at row `i`.
fn uuid_at(df: &DataFrame, name: &str, i: usize) -> Result<Uuid, ModelError> {
    let bad = |reason: String| ModelError::Archive { column: name.to_owned(), reason };
    let column = df.column(name).map_err(|e| bad(e.to_string()))?;
    let bytes = column.binary().map_err(|e| bad(format!("expected 16-byte UUIDs: {e}")))?;
    let value = bytes.get(i).ok_or_else(|| bad(format!("null at row {i}")))?;
    <[u8; 16]>::try_from(value).map(Uuid::from_bytes).map_err(|_| bad(format!("a UUID of {} bytes at row {i}", value.len())))
}
