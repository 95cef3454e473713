#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use arrow::compute::concat_batches;
use meshguard_schemas::{BatchDecoder, InputTopic};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::*;

/// 2026-11-24T00:00:00Z.
const DAY_MS: i64 = 1_795_478_400_000;

/// `n` decoded attempts, the `i`-th at `ts(i)` (epoch ms), with every optional field set on some.
fn attempts(n: usize, ts: impl Fn(usize) -> i64) -> RecordBatch {
    let payloads: Vec<String> = (0..n)
        .map(|i| {
            let extra = if i % 3 == 0 {
                r#","route":["9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c"],"location":{"lat":52.5,"lon":13.4,"country":"DE"},"payload_type":"command","payload":{"command":"off"},"payload_bytes":17,"encrypted":true,"protocol":"mqtt","broker":"eu-1""#
            } else {
                ""
            };
            let action = if i % 5 == 0 { "connect" } else { "send" };
            let to = if action == "connect" { String::new() } else { r#","to":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f""#.into() };
            format!(
                r#"{{"id":"{}","ts":{},"action":"{action}","from":"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c"{to},"auth":"{}"{extra}}}"#,
                uuid::Uuid::from_u128(i as u128 + 1),
                ts(i),
                if i % 7 == 0 { "invalid" } else { "valid" }
            )
        })
        .collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_bytes()).collect();
    let decoded = BatchDecoder::new(InputTopic::Messages).decode(&refs);
    assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);
    decoded.batch
}

fn config(dir: &Path) -> ArchiveConfig {
    ArchiveConfig { dir: dir.to_owned(), ..ArchiveConfig::default() }
}

fn open(config: &ArchiveConfig) -> ParquetArchive {
    ParquetArchive::open(
        config,
        ATTEMPTS,
        InputTopic::Messages.schema(),
        Some("worker-1"),
        DAY_MS,
        &ArchiveMetrics::unregistered().unwrap(),
    )
    .unwrap()
}

/// Every file under `dir` (recursively), sorted, as paths relative to it.
fn files(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn read(path: &Path) -> Vec<RecordBatch> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap().build().unwrap();
    reader.map(|b| b.unwrap()).collect()
}

/// All rows of the closed files under `root`, in file-name order.
fn read_all(root: &Path) -> RecordBatch {
    let paths: Vec<PathBuf> = files(root).into_iter().filter(|f| f.ends_with(".parquet")).map(|f| root.join(f)).collect();
    let batches: Vec<RecordBatch> = paths.iter().flat_map(|p| read(p)).collect();
    concat_batches(&InputTopic::Messages.schema(), &batches).unwrap()
}

#[test]
fn rows_read_back_equal_the_input_exactly_schema_included() {
    let dir = tempfile::tempdir().unwrap();
    let mut archive = open(&config(dir.path()));
    let input = attempts(1_000, |i| DAY_MS + 1_000 * i as i64);
    archive.append(&input.slice(0, 400)).unwrap();
    archive.append(&input.slice(400, 600)).unwrap();
    let closed = archive.close_all().unwrap();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].rows, 1_000);
    assert_eq!(closed[0].bytes, std::fs::metadata(&closed[0].path).unwrap().len());
    let back = read(&closed[0].path);
    assert_eq!(back[0].schema(), InputTopic::Messages.schema(), "UUIDs, dictionaries and UTC timestamps come back as written");
    assert_eq!(concat_batches(&InputTopic::Messages.schema(), &back).unwrap(), input);
}

#[test]
fn a_batch_spanning_two_dates_lands_in_two_folders() {
    let dir = tempfile::tempdir().unwrap();
    let mut archive = open(&config(dir.path()));
    // Alternating days, so the split cannot be a slice: the 2026-11-23 rows are the odd ones.
    let input = attempts(100, |i| if i % 2 == 0 { DAY_MS + i as i64 } else { DAY_MS - 1 - i as i64 });
    archive.append(&input).unwrap();
    archive.close_all().unwrap();
    let names = files(archive.root());
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].starts_with("date=2026-11-23/part-worker_1-20261124T000000000Z-"), "{names:?}");
    assert!(names[1].starts_with("date=2026-11-24/part-worker_1-20261124T000000000Z-"), "{names:?}");
    let before = read_all(&archive.root().join("date=2026-11-23"));
    let after = read_all(&archive.root().join("date=2026-11-24"));
    let odd: Vec<usize> = (0..100).filter(|i| i % 2 == 1).collect();
    let even: Vec<usize> = (0..100).filter(|i| i % 2 == 0).collect();
    let take = |rows: &[usize]| {
        let idx = arrow::array::UInt32Array::from(rows.iter().map(|&i| i as u32).collect::<Vec<_>>());
        arrow::compute::take_record_batch(&input, &idx).unwrap()
    };
    assert_eq!(before, take(&odd));
    assert_eq!(after, take(&even));
}

#[test]
fn files_roll_at_the_row_bound_and_names_follow_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut archive = open(&ArchiveConfig { max_rows_per_file: 300, ..config(dir.path()) });
    let input = attempts(1_000, |i| DAY_MS + i as i64);
    archive.append(&input.slice(0, 250)).unwrap();
    archive.append(&input.slice(250, 750)).unwrap();
    // Three full files are closed already; the last 100 rows are still being written.
    let names = files(archive.root());
    let closed: Vec<&String> = names.iter().filter(|n| n.ends_with(".parquet")).collect();
    let open: Vec<&String> = names.iter().filter(|n| n.ends_with(".parquet.tmp")).collect();
    assert_eq!((closed.len(), open.len()), (3, 1), "{names:?}");
    for (i, name) in closed.iter().enumerate() {
        assert!(name.ends_with(&format!("-{:06}.parquet", i + 1)), "{name}");
        assert_eq!(read(&archive.root().join(name)).iter().map(RecordBatch::num_rows).sum::<usize>(), 300);
    }
    archive.close_all().unwrap();
    assert_eq!(read_all(archive.root()), input);
}

#[test]
fn files_roll_at_the_byte_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut archive = open(&ArchiveConfig { max_bytes_per_file: 4096, ..config(dir.path()) });
    let input = attempts(2_000, |i| DAY_MS + i as i64);
    for start in (0..2_000).step_by(100) {
        archive.append(&input.slice(start, 100)).unwrap();
    }
    archive.close_all().unwrap();
    let names = files(archive.root());
    assert!(names.len() > 2, "{names:?}");
    assert_eq!(read_all(archive.root()), input);
}

#[test]
fn closing_renames_every_temporary_file_and_a_restart_removes_those_left_by_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut archive = open(&cfg);
    archive.append(&attempts(10, |i| DAY_MS + i as i64)).unwrap();
    archive.append(&attempts(10, |i| DAY_MS + MS_PER_DAY + i as i64)).unwrap();
    let names = files(archive.root());
    assert!(names.len() == 2 && names.iter().all(|n| n.contains("/.part-worker_1-") && n.ends_with(".parquet.tmp")), "{names:?}");
    let closed = archive.close_all().unwrap();
    assert_eq!(closed.iter().map(|c| c.rows).sum::<u64>(), 20);
    let names = files(archive.root());
    assert!(names.len() == 2 && names.iter().all(|n| n.contains("/part-worker_1-") && n.ends_with(".parquet")), "{names:?}");
    assert!(archive.close_all().unwrap().is_empty(), "nothing open, no empty files");

    // A crash: rows appended after the last close stay in a temporary file, which the next run
    // of the same writer deletes; another writer's temporary file is not its to delete.
    archive.append(&attempts(5, |i| DAY_MS + i as i64)).unwrap();
    let other = archive.root().join("date=2026-11-24/.part-worker_2-x-000001.parquet.tmp");
    std::fs::write(&other, b"").unwrap();
    drop(archive);
    let restarted = open(&cfg);
    let names = files(restarted.root());
    assert_eq!(names.iter().filter(|n| n.ends_with(".tmp")).collect::<Vec<_>>(), ["date=2026-11-24/.part-worker_2-x-000001.parquet.tmp"]);
    assert_eq!(names.iter().filter(|n| n.ends_with(".parquet")).count(), 2);
}

#[test]
fn retention_deletes_folders_older_than_retention_days_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut archive = open(&ArchiveConfig { retention_days: 2, ..config(dir.path()) });
    for days_ago in [0, 1, 2, 3, 10] {
        archive.append(&attempts(3, |i| DAY_MS - days_ago * MS_PER_DAY + i as i64)).unwrap();
    }
    archive.close_all().unwrap();
    std::fs::create_dir(archive.root().join("notes")).unwrap();
    let now = DAY_MS + 3_600_000;
    let deleted = archive.apply_retention(now).unwrap();
    let day = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
    assert_eq!(deleted, [day("2026-11-14"), day("2026-11-21")]);
    let mut left: Vec<String> = std::fs::read_dir(archive.root()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["date=2026-11-22", "date=2026-11-23", "date=2026-11-24", "notes"]);
    assert!(archive.apply_retention(now).unwrap().is_empty());
}

#[test]
fn metrics_count_closed_files() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new();
    let metrics = ArchiveMetrics::new(&registry).unwrap();
    let mut archive = ParquetArchive::open(&config(dir.path()), ATTEMPTS, InputTopic::Messages.schema(), None, DAY_MS, &metrics).unwrap();
    archive.append(&attempts(42, |i| DAY_MS + i as i64)).unwrap();
    let table = metrics.table(ATTEMPTS);
    assert_eq!(table.rows.get(), 0, "rows count once durable");
    let closed = archive.close_all().unwrap();
    assert_eq!((table.rows.get(), table.files.get(), table.bytes.get()), (42, 1, closed[0].bytes));
    assert!(closed[0].path.file_name().unwrap().to_str().unwrap().starts_with("part-meshguard-"));
    let names: Vec<String> = registry.gather().iter().map(|m| m.name().to_owned()).collect();
    assert_eq!(names, ["meshguard_archive_bytes_total", "meshguard_archive_files_total", "meshguard_archive_rows_total"]);
}

/// Detached files are closed elsewhere (the checkpoint thread) while appends go on into new files:
/// nothing is published before `finish`, everything after, and no row is in two files.
#[test]
fn detached_files_close_on_another_thread_while_appends_go_to_new_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut archive = open(&cfg);
    let root = archive.root().to_owned();
    archive.append(&attempts(30, |i| DAY_MS + i as i64)).unwrap();
    let closing = archive.detach_all();
    assert!(!closing.is_empty());
    assert!(archive.detach_all().is_empty(), "nothing is left open");
    archive.append(&attempts(12, |i| DAY_MS + 1_000 + i as i64)).unwrap();
    assert!(files(&root).iter().all(|f| !f.ends_with(".parquet")), "nothing published before finish: {:?}", files(&root));
    let closed = std::thread::spawn(move || closing.finish().unwrap()).join().unwrap();
    assert_eq!(closed.iter().map(|c| c.rows).sum::<u64>(), 30);
    assert_eq!(read_all(&root).num_rows(), 30, "the detached rows only");
    archive.close_all().unwrap();
    assert_eq!(read_all(&root).num_rows(), 42);
    assert_eq!(files(&root).iter().filter(|f| f.ends_with(".parquet")).count(), 2);
}

#[test]
fn bad_configuration_and_foreign_batches_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (cfg, field) in [
        (ArchiveConfig { max_rows_per_file: 0, ..config(dir.path()) }, "archive.max_rows_per_file"),
        (ArchiveConfig { max_bytes_per_file: 10, ..config(dir.path()) }, "archive.max_bytes_per_file"),
        (ArchiveConfig { retention_days: 0, ..config(dir.path()) }, "archive.retention_days"),
        (ArchiveConfig { dir: PathBuf::new(), ..config(dir.path()) }, "archive.dir"),
    ] {
        let err =
            ParquetArchive::open(&cfg, ATTEMPTS, InputTopic::Messages.schema(), None, DAY_MS, &ArchiveMetrics::unregistered().unwrap())
                .unwrap_err()
                .to_string();
        assert!(err.contains(field), "{err}");
    }
    let err = ParquetArchive::open(
        &config(dir.path()),
        "../up",
        InputTopic::Messages.schema(),
        None,
        DAY_MS,
        &ArchiveMetrics::unregistered().unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`../up` is not a table name"), "{err}");
    let mut archive = open(&config(dir.path()));
    let presence = BatchDecoder::new(InputTopic::Presence)
        .decode(&[br#"{"uuid":"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","ts":1,"online":true}"#.as_slice()])
        .batch;
    let err = archive.append(&presence).unwrap_err().to_string();
    assert!(err.contains("expected rows of schema"), "{err}");
    assert!(archive.close_all().unwrap().is_empty());
}

#[test]
fn instance_ids_cannot_escape_the_folder() {
    assert_eq!(sanitize("../a b/c-d"), ".._a_b_c_d");
}

/// Min/max statistics are kept for `ts` only (readers prune by it), and `id`, `ts` and `payload`
/// are written without a dictionary.
#[test]
fn statistics_for_ts_only_and_no_dictionary_for_unique_columns() {
    let dir = tempfile::tempdir().unwrap();
    let mut archive = open(&config(dir.path()));
    archive.append(&attempts(1_000, |i| DAY_MS + i as i64)).unwrap();
    let closed = archive.close_all().unwrap();
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(File::open(&closed[0].path).unwrap()).unwrap();
    let meta = parquet::file::reader::FileReader::metadata(&reader);
    for c in meta.row_groups()[0].columns() {
        let name = c.column_path().string();
        let min_max = c.statistics().is_some_and(|s| s.min_bytes_opt().is_some());
        assert_eq!(min_max, name == "ts", "{name}");
        if ["id", "ts", "payload"].contains(&name.as_str()) {
            assert!(c.dictionary_page_offset().is_none(), "{name}");
        }
    }
}
