//! Decoding throughput: message attempts per second per core, JSON payloads → canonical batch.
//!
//! Run: `cargo bench -p meshguard-schemas --bench decode`. One thread, so events/s is per core.
//! Before each criterion run the bench prints the rate per CPU-second of its thread, which does
//! not count time spent waiting for a core (as the policy bench does).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_schemas::{BatchDecoder, InputTopic};

/// A realistic mix: mostly `send`s with route and location, some `connect`s, epoch-ms and RFC 3339
/// times, a payload on a quarter of them.
fn attempts(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let ts = 1_795_539_600_000i64 + i as i64;
            let from = format!("9b2f1c3a-0d4e-4f5a-8b6c-{:012x}", i % 5000);
            let to = format!("c4d5e6f7-1a2b-4c3d-8e9f-{:012x}", (i * 7) % 5000);
            let id = format!("5f0c9f2e-8d1a-4c3b-9a77-{i:012x}");
            let text = match i % 8 {
                0 => format!(r#"{{"id":"{id}","ts":{ts},"action":"connect","from":"{from}","auth":"valid","protocol":"mqtt","broker":"eu-1"}}"#),
                1 | 2 => format!(
                    r#"{{"id":"{id}","ts":{ts},"action":"send","from":"{from}","to":"{to}","auth":"valid","payload_type":"command","payload":{{"command":"off","level":3}},"payload_bytes":27,"protocol":"mqtt","broker":"eu-1"}}"#
                ),
                _ => format!(
                    r#"{{"id":"{id}","ts":"2026-11-24T17:00:00.123Z","action":"send","from":"{from}","to":"{to}","auth":"valid","route":["{from}","e1f2a3b4-5c6d-4e7f-8a9b-0c1d2e3f4a5b"],"location":{{"lat":52.52,"lon":13.405,"country":"DE"}},"payload_type":"telemetry","protocol":"mqtt","broker":"eu-1"}}"#
                ),
            };
            text.into_bytes()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut decoder = BatchDecoder::new(InputTopic::Messages);
    let mut group = c.benchmark_group("decode");
    for batch in [1_000usize, 2_000, 10_000] {
        let records = attempts(batch);
        let slices: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        group.throughput(Throughput::Elements(batch as u64));
        if let Some(rate) = per_cpu_second(batch, || {
            black_box(decoder.decode(black_box(&slices)));
        }) {
            eprintln!("decode/messages/{batch}: {:.2} M records per CPU-second of this thread", rate / 1e6);
        }
        group.bench_function(format!("messages/{batch}"), |b| b.iter(|| black_box(decoder.decode(black_box(&slices)))));
        // One malformed record per batch forces the slow path: the cost of a poisoned batch.
        let mut poisoned = slices.clone();
        poisoned[batch / 2] = b"{\"id\":";
        if let Some(rate) = per_cpu_second(batch, || {
            black_box(decoder.decode(black_box(&poisoned)));
        }) {
            eprintln!("decode/messages_one_bad/{batch}: {:.2} M records per CPU-second of this thread", rate / 1e6);
        }
        group.bench_function(format!("messages_one_bad/{batch}"), |b| b.iter(|| black_box(decoder.decode(black_box(&poisoned)))));
    }
    group.finish();
}

/// Records decoded per second of this thread's CPU time over 2 M records: on a machine shared
/// with other work, wall-clock figures also count the time the thread waited for a core. `None`
/// where the kernel does not report a thread's CPU time (`/proc/thread-self/schedstat`, Linux).
/// Only under `cargo bench`: `cargo test --all-targets` runs each bench once, unoptimised, as a test.
fn per_cpu_second(batch: usize, mut decode: impl FnMut()) -> Option<f64> {
    if !std::env::args().any(|a| a == "--bench") {
        return None;
    }
    let cpu_ns = || -> Option<u64> { std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok() };
    let batches = 2_000_000 / batch;
    let start = cpu_ns()?;
    for _ in 0..batches {
        decode();
    }
    let spent = cpu_ns()?.checked_sub(start)?;
    Some((batches * batch) as f64 / (spent as f64 / 1e9))
}

criterion_group!(benches, bench);
criterion_main!(benches);
