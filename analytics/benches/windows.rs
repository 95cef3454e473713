//! Windowed counting (issue 4): attempts counted in the throttle windows of 1,000,000 active
//! requesters, events per second on one core, and the bytes of state per active key.
//!
//! Events arrive in event-time order at 1,000,000 per second of event time (each requester about
//! once a second, the per-requester limit 10 per second, 30 s allowed lateness), keys drawn at
//! random: every lookup misses the cache, as with a real population.
//!
//! The attempts go through [`ThrottleState::count_batch`], the engine's throttle stage's own
//! call, in micro-batches of the engine's default size.
//!
//! `cargo bench -p meshguard-analytics --bench windows`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_analytics::throttle::{Attempt, Counted, Limit, Outcome, Rule, ThrottleState, Tightening};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const KEYS: u32 = 1_000_000;
const SMOKE_KEYS: u32 = 10_000;
const BATCH: usize = 100_000;
/// Attempts per call, as the engine counts a micro-batch (`pipeline.batch_max_records`' default).
const MICRO_BATCH: usize = 10_000;
const LATENESS_MS: i64 = 30_000;

fn requester(i: u32) -> Uuid {
    Uuid::from_u128(0x1000_0000_0000_4000_8000_0000_0000_0000 | u128::from(i))
}

fn bench(c: &mut Criterion) {
    let keys = if std::env::args().any(|a| a == "--bench") { KEYS } else { SMOKE_KEYS };
    let mut rng = SmallRng::seed_from_u64(9);
    let mut state = ThrottleState::default();
    let limit = Limit { max: 10, per_s: 1.0 };
    let tightening = Tightening::default();
    // Warm: 30 s of event time, so every window holds what steady traffic leaves in it.
    let ts: i64 = 1_795_539_600_000;
    let per_event_ms = 1_000.0 / f64::from(keys);
    let mut clock = 0.0f64;
    let mut fp = 0u32;
    let mut attempts: Vec<Attempt> = Vec::with_capacity(MICRO_BATCH);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(MICRO_BATCH);
    // One micro-batch: its attempts built as the engine builds them (one per row, the
    // per-requester limit), then counted.
    let mut micro_batch = |state: &mut ThrottleState, rng: &mut SmallRng| {
        attempts.clear();
        for _ in 0..MICRO_BATCH {
            clock += per_event_ms;
            fp = fp.wrapping_add(1);
            attempts.push(Attempt {
                key: (requester(rng.random_range(0..keys)), Uuid::nil(), Rule::Requester),
                ts: ts + clock as i64,
                fingerprint: fp,
                max: limit.max,
                per_ms: limit.per_ms(),
                first_of_attempt: true,
            });
        }
        outcomes.clear();
        state.count_batch(&attempts, LATENESS_MS, &tightening, &mut outcomes);
        outcomes.iter().filter(|o| matches!(o.counted, Counted::Exceeded(_))).count() as u32
    };
    for _ in 0..(keys as usize * 30).div_ceil(MICRO_BATCH) {
        micro_batch(&mut state, &mut rng);
    }
    let bytes = state.approximate_bytes();
    eprintln!("windows: {} active keys, {} bytes of state per key", state.windows.len(), bytes / state.windows.len().max(1));

    let mut g = c.benchmark_group("windows");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.bench_function(format!("count/{keys}_keys"), |b| {
        b.iter(|| {
            let mut exceeded = 0u32;
            for _ in 0..BATCH / MICRO_BATCH {
                exceeded += micro_batch(&mut state, &mut rng);
            }
            black_box(exceeded)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
