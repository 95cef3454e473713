//! Interaction cross-check (issue 5): identity requests answered per second on one core against
//! 10,000,000 stored interactions, and the latency of one micro-batch's plan (p50/p99), for the
//! DataFusion plan (production) and the plain-Rust reference.
//!
//! The store: 200,000 devices over 7 days of event time; each meeting of two random devices is an
//! entry of the first, and 90 % of the time also an entry of the second about the first (its own
//! report, up to 60 s apart); kinds at random. Requests are for random devices at the end of the
//! 7 days, so each checks its latest 10 interactions.
//!
//! `cargo bench -p meshguard-analytics --bench crosscheck` (small sizes without `--bench`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_analytics::crosscheck::plan::{CrossCheckPlan, PlanRequest};
use meshguard_analytics::crosscheck::{CrossCheckConfig, Entry, InteractionStore};
use meshguard_schemas::InteractionKind;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const T0: i64 = 1_795_539_600_000;
const WEEK_MS: i64 = 7 * 86_400_000;

fn device(i: u32) -> Uuid {
    Uuid::from_u128(0x1000_0000_0000_4000_8000_0000_0000_0000 | u128::from(i))
}

fn store(entries: usize, devices: u32) -> InteractionStore {
    let mut rng = SmallRng::seed_from_u64(5);
    let mut s = InteractionStore::default();
    let mut n = 0u128;
    let mut held = 0;
    let step = WEEK_MS as f64 / (entries as f64 / 1.9);
    let mut clock = 0.0f64;
    while held < entries {
        clock += step;
        let ts = T0 + clock as i64;
        let (a, b) = (rng.random_range(0..devices), rng.random_range(0..devices));
        let kind = InteractionKind::ALL[rng.random_range(0..InteractionKind::ALL.len())];
        n += 1;
        s.insert(device(a), Entry { ts, peer: device(b), kind, id: Uuid::from_u128(n) });
        held += 1;
        if rng.random_bool(0.9) {
            held += 1;
            n += 1;
            let skew = rng.random_range(-60_000..=60_000);
            s.insert(device(b), Entry { ts: ts + skew, peer: device(a), kind, id: Uuid::from_u128(n) });
        }
    }
    s
}

fn requests(rng: &mut SmallRng, n: usize, devices: u32) -> Vec<PlanRequest> {
    (0..n).map(|_| PlanRequest { device: device(rng.random_range(0..devices)), t: T0 + WEEK_MS, window: 10 }).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn bench(c: &mut Criterion) {
    let full = std::env::args().any(|a| a == "--bench");
    let (entries, devices, rounds) = if full { (10_000_000, 200_000, 200) } else { (20_000, 400, 5) };
    let started = Instant::now();
    let s = store(entries, devices);
    eprintln!("crosscheck: {} interactions of {devices} devices built in {:.1?}", s.len(), started.elapsed());
    let cfg = CrossCheckConfig::default();
    let tol = cfg.tolerance_ms();
    let plan = CrossCheckPlan::new().unwrap();
    let mut rng = SmallRng::seed_from_u64(11);

    // Latency of one micro-batch and requests/s, by hand: criterion reports means only.
    for batch in [1usize, 100, 1_000] {
        let mut plan_times = Vec::with_capacity(rounds);
        let mut reference_times = Vec::with_capacity(rounds);
        let mut pruned_rows = 0;
        for _ in 0..rounds {
            let reqs = requests(&mut rng, batch, devices);
            let t = Instant::now();
            let tallies = plan.tallies(&s, tol, &reqs).unwrap();
            plan_times.push(t.elapsed());
            pruned_rows += plan.pruned(&s, tol, &reqs).unwrap().num_rows();
            let t = Instant::now();
            let reference: Vec<_> = reqs.iter().map(|r| s.tally(tol, &r.device, r.t, r.window)).collect();
            reference_times.push(t.elapsed());
            assert_eq!(
                tallies.iter().map(|t| (t.checked, t.verified, t.unavailable)).collect::<Vec<_>>(),
                reference.iter().map(|t| (t.checked, t.verified, t.unavailable)).collect::<Vec<_>>()
            );
        }
        for (name, times) in [("plan", &mut plan_times), ("reference", &mut reference_times)] {
            times.sort();
            let total: Duration = times.iter().sum();
            eprintln!(
                "crosscheck: {name:9} batch {batch:5}: p50 {:>10.2?} p99 {:>10.2?} per batch, {:>9.0} requests/s{}",
                percentile(times, 0.5),
                percentile(times, 0.99),
                (batch * times.len()) as f64 / total.as_secs_f64(),
                if name == "plan" { format!(", {} rows registered per batch", pruned_rows / rounds) } else { String::new() },
            );
        }
    }

    let mut g = c.benchmark_group("crosscheck");
    g.sample_size(10);
    for batch in [100usize, 1_000] {
        g.throughput(Throughput::Elements(batch as u64));
        let reqs = requests(&mut rng, batch, devices);
        g.bench_function(format!("plan/{batch}_requests"), |b| b.iter(|| black_box(plan.tallies(&s, tol, &reqs).unwrap())));
        g.bench_function(format!("reference/{batch}_requests"), |b| {
            b.iter(|| black_box(reqs.iter().map(|r| s.tally(tol, &r.device, r.t, r.window)).collect::<Vec<_>>()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
