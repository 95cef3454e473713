//! Windowed counting (issue 4): attempts counted in the throttle windows of 1,000,000 active
//! requesters, events per second on one core, and the bytes of state per active key.
//!
//! Events arrive in event-time order at 1,000,000 per second of event time (each requester about
//! once a second, the per-requester limit 10 per second, 30 s allowed lateness), keys drawn at
//! random: every lookup misses the cache, as with a real population.
//!
//! `cargo bench -p meshguard-analytics --bench windows`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_analytics::throttle::{Counted, Rule, ThrottleState, Window};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const KEYS: u32 = 1_000_000;
const SMOKE_KEYS: u32 = 10_000;
const BATCH: usize = 100_000;

fn key(i: u32) -> (Uuid, Uuid, Rule) {
    (Uuid::from_u128(0x1000_0000_0000_4000_8000_0000_0000_0000 | u128::from(i)), Uuid::nil(), Rule::Requester)
}

fn bench(c: &mut Criterion) {
    let keys = if std::env::args().any(|a| a == "--bench") { KEYS } else { SMOKE_KEYS };
    let mut rng = SmallRng::seed_from_u64(9);
    let mut state = ThrottleState::default();
    // Warm: 30 s of event time, so every window holds what steady traffic leaves in it.
    let mut ts: i64 = 1_795_539_600_000;
    let per_event_ms = 1_000.0 / f64::from(keys);
    let mut clock = 0.0f64;
    let mut fp = 0u32;
    let mut step = |state: &mut ThrottleState, rng: &mut SmallRng| {
        let k = key(rng.random_range(0..keys));
        clock += per_event_ms;
        fp = fp.wrapping_add(1);
        let t = ts + clock as i64;
        let w: &mut Window = state.windows.entry(k).or_default();
        matches!(w.count(t, fp, 10, 1_000, 30_000), Counted::Exceeded(_))
    };
    for _ in 0..(keys as usize * 30) {
        step(&mut state, &mut rng);
    }
    let bytes = state.approximate_bytes();
    eprintln!("windows: {} active keys, {} bytes of state per key", state.windows.len(), bytes / state.windows.len().max(1));

    let mut g = c.benchmark_group("windows");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.bench_function(format!("count/{keys}_keys"), |b| {
        b.iter(|| {
            let mut exceeded = 0u32;
            for _ in 0..BATCH {
                exceeded += u32::from(step(&mut state, &mut rng));
            }
            black_box(exceeded)
        })
    });
    g.finish();
    ts += 1;
    black_box(ts);
}

criterion_group!(benches, bench);
criterion_main!(benches);
