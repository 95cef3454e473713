//! Attempt archive write throughput: decoded attempts per second on one core, from `append` to a
//! closed (fsynced, renamed) Parquet file. Each iteration writes one file of 100 k attempts in
//! micro-batches of 10 k, then closes it, as a checkpoint would.
//!
//! Run: `cargo bench -p meshguard-ingest --bench archive`.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use arrow::compute::concat_batches;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_ingest::simulator::{SimConfig, Simulator};
use meshguard_ingest::{ArchiveConfig, ArchiveMetrics, ParquetArchive};
use meshguard_schemas::{BatchDecoder, InputTopic};

const BATCH: usize = 10_000;
const PER_FILE: usize = 100_000;

fn bench(c: &mut Criterion) {
    // Simulated attempts, decoded to the canonical schema as the pipeline sees them.
    let mut sim = Simulator::new(SimConfig { devices: 10_000, rate: 100_000, malformed_ratio: 0.0, ..SimConfig::default() });
    let _ = sim.bootstrap();
    let mut records = Vec::new();
    let mut decoder = BatchDecoder::new(InputTopic::Messages);
    let mut batches = Vec::new();
    let mut rows = 0;
    while rows < BATCH {
        records.clear();
        sim.next_batch(BATCH, &mut records);
        let payloads: Vec<&[u8]> =
            records.iter().filter(|r| r.topic == InputTopic::Messages).filter_map(|r| r.payload.as_deref()).collect();
        let decoded = decoder.decode(&payloads);
        rows += decoded.batch.num_rows();
        batches.push(decoded.batch);
    }
    let batch = concat_batches(&InputTopic::Messages.schema(), &batches).unwrap().slice(0, BATCH);

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
    group.bench_function("append_and_close/100k_attempts", |b| {
        b.iter(|| {
            for _ in 0..PER_FILE / BATCH {
                archive.append(&batch).unwrap();
            }
            let closed = archive.close_all().unwrap();
            for f in &closed {
                std::fs::remove_file(&f.path).unwrap();
            }
            black_box(closed)
        })
    });
    group.finish();
    let closed = archive.close_all().unwrap();
    assert!(closed.is_empty());
    // The size per attempt, for BENCHMARKS.md.
    archive.append(&batch).unwrap();
    let f = archive.close_all().unwrap();
    eprintln!("archive: {} attempts in {} bytes ({:.1} bytes per attempt)", f[0].rows, f[0].bytes, f[0].bytes as f64 / f[0].rows as f64);
}

criterion_group!(benches, bench);
criterion_main!(benches);
