//! Attempt archive write throughput: decoded attempts per second on one core, from `append` to a
//! closed (fsynced, renamed) Parquet file. Each iteration writes one file of 100 k distinct
//! attempts in micro-batches of 2 k or 10 k, then closes it, as a checkpoint would.
//!
//! Run: `cargo bench -p meshguard-ingest --bench archive`. Before each criterion run the bench
//! prints the rate per CPU-second of its thread (as the decode bench does), which does not count
//! time spent waiting for a core.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use arrow::compute::concat_batches;
use arrow::record_batch::RecordBatch;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_ingest::simulator::{SimConfig, Simulator};
use meshguard_ingest::{ArchiveConfig, ArchiveMetrics, ParquetArchive};
use meshguard_schemas::{BatchDecoder, InputTopic};

const PER_FILE: usize = 100_000;

/// `PER_FILE` simulated attempts, decoded to the canonical schema as the pipeline sees them. All
/// distinct: repeating one batch would let the dictionary encoders find every `id` again.
fn attempts() -> RecordBatch {
    let mut sim = Simulator::new(SimConfig { devices: 10_000, rate: 100_000, malformed_ratio: 0.0, ..SimConfig::default() });
    let _ = sim.bootstrap();
    let mut records = Vec::new();
    let mut decoder = BatchDecoder::new(InputTopic::Messages);
    let mut batches = Vec::new();
    let mut rows = 0;
    while rows < PER_FILE {
        records.clear();
        sim.next_batch(10_000, &mut records);
        let payloads: Vec<&[u8]> =
            records.iter().filter(|r| r.topic == InputTopic::Messages).filter_map(|r| r.payload.as_deref()).collect();
        let decoded = decoder.decode(&payloads);
        rows += decoded.batch.num_rows();
        batches.push(decoded.batch);
    }
    concat_batches(&InputTopic::Messages.schema(), &batches).unwrap().slice(0, PER_FILE)
}

fn bench(c: &mut Criterion) {
    let all = attempts();
    let dir = tempfile::tempdir().unwrap();
    let config = ArchiveConfig { dir: dir.path().to_owned(), retention_days: 36_500, ..ArchiveConfig::default() };
    let mut archive = ParquetArchive::open(
        &config,
        meshguard_ingest::archive::ATTEMPTS,
        InputTopic::Messages.schema(),
        Some("bench"),
        0,
        &ArchiveMetrics::unregistered().unwrap(),
    )
    .unwrap();
    let mut group = c.benchmark_group("archive");
    group.throughput(Throughput::Elements(PER_FILE as u64));
    group.sample_size(10);
    for batch in [2_000usize, 10_000] {
        let batches: Vec<RecordBatch> = (0..PER_FILE / batch).map(|k| all.slice(k * batch, batch)).collect();
        let mut one_file = || {
            for b in &batches {
                archive.append(b).unwrap();
            }
            let closed = archive.close_all().unwrap();
            for f in &closed {
                std::fs::remove_file(&f.path).unwrap();
            }
            closed
        };
        if let Some(rate) = per_cpu_second(&mut one_file) {
            eprintln!("archive/append_and_close/{batch}: {:.2} M attempts per CPU-second of this thread", rate / 1e6);
        }
        group.bench_function(format!("append_and_close/100k_attempts/{batch}"), |b| b.iter(|| black_box(one_file())));
    }
    group.finish();
    let closed = archive.close_all().unwrap();
    assert!(closed.is_empty());
    // The size per attempt, for BENCHMARKS.md.
    archive.append(&all).unwrap();
    let f = archive.close_all().unwrap();
    eprintln!("archive: {} attempts in {} bytes ({:.1} bytes per attempt)", f[0].rows, f[0].bytes, f[0].bytes as f64 / f[0].rows as f64);
    // Where the bytes go, column by column (with or without dictionary, statistics).
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(std::fs::File::open(&f[0].path).unwrap()).unwrap();
    for rg in parquet::file::reader::FileReader::metadata(&reader).row_groups() {
        for c in rg.columns() {
            eprintln!(
                "  {:<24} {:>9} bytes, dictionary: {}, statistics: {}",
                c.column_path().string(),
                c.compressed_size(),
                c.dictionary_page_offset().is_some(),
                c.statistics().is_some()
            );
        }
    }
}

/// Attempts archived per second of this thread's CPU time over 10 files (1 M attempts). `None`
/// where the kernel does not report a thread's CPU time, and outside `cargo bench`. The fsync of
/// each close waits without CPU, so it is not counted: the figure is the archive's CPU cost.
fn per_cpu_second(mut one_file: impl FnMut() -> Vec<meshguard_ingest::archive::ClosedFile>) -> Option<f64> {
    if !std::env::args().any(|a| a == "--bench") {
        return None;
    }
    let cpu_ns = || -> Option<u64> { std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok() };
    let files = 10;
    let start = cpu_ns()?;
    for _ in 0..files {
        black_box(one_file());
    }
    let spent = cpu_ns()?.checked_sub(start)?;
    Some((files * PER_FILE) as f64 / (spent as f64 / 1e9))
}

criterion_group!(benches, bench);
criterion_main!(benches);
