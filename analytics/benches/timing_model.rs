//! Timing models (issue 4): the cost of scoring one attempt against a trained model (a hash lookup
//! and a byte read, what the engine does per attempt), with 1,000,000 keys, and the time to fit a
//! model (k-means and score tables) from the features of 100,000 keys.
//!
//! Reading the archive with Polars is measured end to end by `meshguard quality` (its timing
//! scenario prints the read and fit times) and reported in BENCHMARKS.md.
//!
//! `cargo bench -p meshguard-analytics --bench timing_model`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_analytics::timing::TimingConfig;
use meshguard_analytics::timing_model::features::{Features, KeyFeatures};
use meshguard_analytics::timing_model::{BINS, ModelStore, train};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const MONDAY: i64 = 1_795_392_000_000;
const DAY: i64 = 86_400_000;
const BATCH: usize = 100_000;

/// `n` keys on eight schedule shapes, 60 to 400 attempts each.
fn features(n: usize, rng: &mut SmallRng) -> Features {
    let mut keys = hashbrown::HashMap::default();
    let mut attempts = 0u64;
    for i in 0..n {
        let shape = i % 8;
        let mut profile = [0u32; BINS];
        let total = rng.random_range(60..400u32);
        for _ in 0..total {
            let d = match shape {
                0..=3 => rng.random_range(0..5),
                4 | 5 => rng.random_range(5..7),
                _ => rng.random_range(0..7),
            };
            let h = (shape * 3 + rng.random_range(0..2 + shape % 3)) % 24;
            profile[d * 24 + h] += 1;
        }
        attempts += u64::from(total);
        let key = (Uuid::from_u128(0xa000_0000_0000_4000_8000_0000_0000_0000 | i as u128), Uuid::from_u128(i as u128 + 1));
        keys.insert(
            key,
            KeyFeatures {
                profile,
                attempts: total,
                days: 28,
                first_ms: MONDAY,
                last_ms: MONDAY + 27 * DAY,
                gap_median_s: 3_600.0,
                gap_p25_s: 60.0,
                gap_p75_s: 86_400.0,
            },
        );
    }
    Features { keys, attempts, files: 1 }
}

fn bench(c: &mut Criterion) {
    let full = std::env::args().any(|a| a == "--bench");
    let (score_keys, fit_keys) = if full { (1_000_000, 100_000) } else { (5_000, 2_000) };
    let mut rng = SmallRng::seed_from_u64(11);
    let cfg = TimingConfig::default();
    let until = MONDAY + 28 * DAY;

    let fit_features = features(fit_keys, &mut rng);
    let started = std::time::Instant::now();
    let model = train(&fit_features, &cfg, MONDAY, until).unwrap();
    eprintln!("timing_model: fitted {} keys into {} clusters in {:.2} s", model.len(), model.clusters, started.elapsed().as_secs_f64());

    let score_features = features(score_keys, &mut rng);
    let model = train(&score_features, &cfg, MONDAY, until).unwrap();
    let bytes = ModelStore::encode(&model, 1).len();
    eprintln!("timing_model: {} keys, model file {} bytes ({} per key)", model.len(), bytes, bytes / model.len().max(1));
    let keys: Vec<_> = model.iter().map(|(k, _)| *k).collect();

    let mut g = c.benchmark_group("timing_model");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.bench_function(format!("judge/{score_keys}_keys"), |b| {
        b.iter(|| {
            let mut anomalous = 0u32;
            for _ in 0..BATCH {
                let key = &keys[rng.random_range(0..keys.len())];
                let ts = until + rng.random_range(0..7 * DAY);
                anomalous += u32::from(model.judge(key, ts).is_some_and(|j| j.score > 0.0));
            }
            black_box(anomalous)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("timing_model_fit");
    g.sample_size(10);
    g.bench_function(format!("train/{fit_keys}_keys"), |b| b.iter(|| black_box(train(&fit_features, &cfg, MONDAY, until).unwrap().len())));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
