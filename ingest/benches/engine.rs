//! The engine alone: `Engine::process` on micro-batches of simulated traffic, as `meshguard bench`
//! feeds it through a broker, without the broker, the consumers or the sinks.
//!
//! The traffic is `meshguard bench`'s: the simulator at 100,000 records per second of event time
//! with 12,500 registered UUIDs (the harness's `rate / 8`, so requesters stay under the throttles),
//! its directory (registry and presence) first, then micro-batches of 10,000 records (the
//! pipeline's `batch_max_records`: ~97.9 % message attempts, the rest presence and registry
//! changes), each record on the partition its key hashes to among two messages partitions, both
//! held by this worker. Each batch is decoded by the pipeline's own [`assemble`] (untimed), then
//! processed (timed), so registry changes and presence are applied before the attempts, as in the
//! pipeline. Default engine settings; no trained timing model. Partitions are pruned every
//! 500,000 records (about the pipeline's 5 s checkpoint cadence at its current speed), untimed.
//!
//! Before the criterion run, the bench prints attempts per CPU-second of its thread over
//! 1,000,000 records (`/proc/thread-self/schedstat`: immune to waiting for a core on a shared
//! machine, not to other work's use of the caches).
//!
//! `cargo bench -p meshguard-ingest --bench engine`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_analytics::{Engine, EngineConfig, MicroBatch};
use meshguard_ingest::simulator::{SimConfig, SimRecord, Simulator};
use meshguard_ingest::{RawBatch, Topics, assemble};
use meshguard_schemas::{BatchDecoder, InputTopic};

/// Records per second of event time, as `meshguard bench` publishes them.
const RATE: u64 = 100_000;
/// Registered UUIDs: `meshguard bench`'s `rate / 8`.
const DEVICES: usize = 12_500;
/// Under `cargo test` (no `--bench` argument) a smaller run, as a smoke test.
const SMOKE_DEVICES: usize = 1_000;
/// Records per micro-batch (the pipeline's `batch_max_records`); `MESHGUARD_BENCH_MICRO_BATCH`
/// sets another, to see what a micro-batch costs apart from its records.
const MICRO_BATCH: usize = 10_000;

fn micro_batch() -> usize {
    std::env::var("MESHGUARD_BENCH_MICRO_BATCH").ok().and_then(|v| v.parse().ok()).filter(|n| *n > 0).unwrap_or(MICRO_BATCH)
}
/// Partitions of the messages topic (and of the other keyed topics).
const PARTITIONS: i32 = 2;
/// Records between prunes.
const PRUNE_EVERY: usize = 500_000;
/// Records of the CPU-second measurement (the end-to-end bench's 1 M events).
const MEASURED: usize = 1_000_000;

/// Simulated traffic, turned into the engine's micro-batches.
struct Feed {
    sim: Simulator,
    /// Records per micro-batch ([`micro_batch`]).
    micro_batch: usize,
    records: Vec<SimRecord>,
    raw: RawBatch,
    decoders: [BatchDecoder; 4],
    topics: Topics,
    offsets: Vec<i64>,
    since_prune: usize,
}

impl Feed {
    fn new(devices: usize) -> Self {
        let sim = Simulator::new(SimConfig { devices, rate: RATE, malformed_ratio: 0.001, ..SimConfig::default() });
        let micro_batch = micro_batch();
        Self {
            sim,
            micro_batch,
            records: Vec::with_capacity(micro_batch),
            raw: RawBatch::default(),
            decoders: [InputTopic::Messages, InputTopic::Presence, InputTopic::Interactions, InputTopic::IdentityRequests]
                .map(BatchDecoder::new),
            topics: Topics::default(),
            offsets: vec![0; InputTopic::ALL.len() * PARTITIONS as usize],
            since_prune: 0,
        }
    }

    /// The directory, as the first micro-batch.
    fn bootstrap(&mut self) -> (MicroBatch, i64) {
        self.records = self.sim.bootstrap();
        self.assemble()
    }

    /// The next micro-batch and its detection time (its last record's event time).
    fn next(&mut self) -> (MicroBatch, i64) {
        self.records.clear();
        self.sim.next_batch(self.micro_batch, &mut self.records);
        self.assemble()
    }

    fn assemble(&mut self) -> (MicroBatch, i64) {
        self.raw.clear();
        for r in &self.records {
            // The producer's partitioner: the same key, the same partition (FNV-1a here; the
            // upper-case spelling of a UUID lands where it may).
            let hash = r.key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
            let partition = (hash % PARTITIONS as u64) as i32;
            let offset = &mut self.offsets[r.topic as usize * PARTITIONS as usize + partition as usize];
            self.raw.topic_mut(r.topic).push_parts(Some(&r.key), r.payload.as_deref(), partition, *offset, r.timestamp_ms);
            *offset += 1;
        }
        let now_ms = self.records.last().map_or(0, |r| r.timestamp_ms);
        (assemble(&self.raw, &mut self.decoders, &self.topics, 1 << 20, now_ms).batch, now_ms)
    }

    /// Prunes the engine once every [`PRUNE_EVERY`] records, as checkpoints do.
    fn maybe_prune(&mut self, engine: &mut Engine) {
        self.since_prune += self.records.len();
        if self.since_prune >= PRUNE_EVERY {
            self.since_prune = 0;
            engine.prune();
        }
    }
}

fn attempts(mb: &MicroBatch) -> usize {
    mb.messages.as_ref().map_or(0, |m| m.batch.num_rows())
}

/// CPU time of this thread so far, in ns (Linux).
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

fn bench(c: &mut Criterion) {
    let full = std::env::args().any(|a| a == "--bench");
    let devices = if full { DEVICES } else { SMOKE_DEVICES };
    let mut feed = Feed::new(devices);
    let mut engine = Engine::new(EngineConfig::default());
    engine.set_messages_partitions(PARTITIONS as u32);
    engine.assign(&(0..PARTITIONS).map(|p| (InputTopic::Messages, p)).collect::<Vec<_>>());
    let (directory, now_ms) = feed.bootstrap();
    engine.process(&directory, now_ms);

    if full && thread_cpu_ns().is_some() {
        let (mut cpu_ns, mut n_attempts, mut findings, mut records) = (0u64, 0usize, 0usize, 0usize);
        while records < MEASURED {
            let (mb, now_ms) = feed.next();
            records += feed.records.len();
            n_attempts += attempts(&mb);
            let start = thread_cpu_ns().unwrap_or(0);
            findings += black_box(engine.process(&mb, now_ms)).len();
            cpu_ns += thread_cpu_ns().unwrap_or(0).saturating_sub(start);
            feed.maybe_prune(&mut engine);
        }
        let seconds = cpu_ns as f64 / 1e9;
        let schedules: usize =
            (0..PARTITIONS).filter_map(|p| engine.partition(&(InputTopic::Messages, p))).map(|s| s.schedules.len()).sum();
        eprintln!("engine: {schedules} timing schedules after {records} records");
        eprintln!(
            "engine: {n_attempts} attempts in {records} records, {findings} findings: {:.0} k attempts per CPU-second of this thread \
             ({:.2} µs per attempt)",
            n_attempts as f64 / seconds / 1e3,
            seconds * 1e6 / n_attempts as f64,
        );
    }

    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(feed.micro_batch as u64));
    g.sample_size(20);
    g.bench_function(format!("process/{devices}_devices"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let (mb, now_ms) = feed.next();
                let start = Instant::now();
                black_box(engine.process(&mb, now_ms));
                spent += start.elapsed();
                feed.maybe_prune(&mut engine);
            }
            spent
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
