//! Checkpoints: the pause (`Engine::checkpoint`, on the pipeline's thread, while no attempt is
//! judged) and the write (`LocalCheckpointStore::save`, on the checkpointer's thread: encoding,
//! writing, fsync, rename) of one messages partition's state, measured apart.
//!
//! The state is what a busy partition holds within its horizons: 1,000,000 throttle windows over
//! 250,000 requesters (per requester: its requester and connect limits, a device-type limit of 30
//! attempts whose windows spill now and then, a per-target profile limit), 500,000 learned
//! schedules (per requester: its own and one pair's), 100,000 finding ids in the dedup horizon and
//! 10,000 offenders. Every window, id and offender is recent enough to survive the checkpoint's
//! prune, so each iteration copies the whole state. Built through the public API: attempts counted
//! with [`ThrottleState::count_batch`], schedules fed with [`Schedule::add`], offenders counted.
//!
//! `cargo bench -p meshguard-analytics --bench checkpoint` (`-- --bench` runs the full state; a
//! plain `cargo test --benches` run uses a state a hundred times smaller).

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_analytics::enforcement::{EnforcementConfig, Offender};
use meshguard_analytics::engine::PartitionState;
use meshguard_analytics::throttle::{Attempt, Outcome, Rule, Tightening};
use meshguard_analytics::timing::Schedule;
use meshguard_analytics::{CheckpointStore, Engine, EngineConfig, LocalCheckpointStore};
use meshguard_schemas::InputTopic;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

/// The partition's newest event time.
const NOW: i64 = 1_795_539_600_000;
const LATENESS_MS: i64 = 30_000;

/// One state size: requesters (four windows and two schedules each), finding ids, offenders.
#[derive(Clone, Copy)]
struct Size {
    requesters: u32,
    emitted: u32,
    offenders: u32,
}

const FULL: Size = Size { requesters: 250_000, emitted: 100_000, offenders: 10_000 };
const SMALL: Size = Size { requesters: 25_000, emitted: 10_000, offenders: 1_000 };
const SMOKE: Size = Size { requesters: 2_500, emitted: 1_000, offenders: 100 };

fn uuid(kind: u128, i: u32) -> Uuid {
    Uuid::from_u128(kind << 96 | 0x4000_8000_0000_0000_0000 | u128::from(i))
}

/// A partition state of `size`, installed in a fresh engine as messages partition 0.
fn engine(size: Size) -> Engine {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut state = PartitionState { next_offset: 123_456_789, max_event_ms: NOW, ..PartitionState::default() };
    // Windows: attempts over the last 20 s of event time, counted as the engine counts a batch.
    let mut attempts = Vec::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut fp = 0u32;
    let mut attempt = |key, ts, max, per_ms, first| {
        fp = fp.wrapping_add(1);
        Attempt { key, ts, fingerprint: fp, max, per_ms, first_of_attempt: first }
    };
    for r in 0..size.requesters {
        let from = uuid(1, r);
        let target = uuid(2, r % 5_000);
        // One in a hundred device-type windows holds more than fits inline: it spills.
        let sends = if r % 100 == 0 { 24 } else { rng.random_range(1..6) };
        for _ in 0..sends {
            let ts = NOW - rng.random_range(0..20_000);
            attempts.push(attempt((from, Uuid::nil(), Rule::Requester), ts, 10, 1_000, true));
            attempts.push(attempt((from, Uuid::nil(), Rule::Type), ts, 30, 60_000, false));
            attempts.push(attempt((from, target, Rule::Profile(1)), ts, 3, 1_000, false));
        }
        attempts.push(attempt((from, Uuid::nil(), Rule::Connect), NOW - rng.random_range(0..20_000), 2, 1_000, true));
    }
    attempts.sort_by_key(|a| a.ts);
    for batch in attempts.chunks(10_000) {
        outcomes.clear();
        state.throttles.count_batch(batch, LATENESS_MS, &Tightening::default(), &mut outcomes);
    }
    // Schedules: the requester's own and one pair's, a few weeks of history each.
    for r in 0..size.requesters {
        let from = uuid(1, r);
        for target in [Uuid::nil(), uuid(2, r % 5_000)] {
            let mut s = Schedule::default();
            for _ in 0..rng.random_range(5..60) {
                s.add(NOW - rng.random_range(0..28 * 86_400_000));
            }
            *state.schedules.get_or_default(&(from, target)) = s;
        }
    }
    for i in 0..size.emitted {
        state.emitted.insert(uuid(3, i), NOW - rng.random_range(0..500_000));
    }
    let cfg = EnforcementConfig::default();
    for i in 0..size.offenders {
        let mut o = Offender::default();
        for k in 0..3 {
            o.count(&cfg, NOW - 60_000 + k * 1_000, 1, &[uuid(4, i * 3 + k as u32)], true, false);
        }
        state.enforcement.insert(uuid(1, i), o);
    }
    let mut engine = Engine::new(EngineConfig::default());
    engine.restore_partition((InputTopic::Messages, 0), state.snapshot());
    engine
}

fn bench(c: &mut Criterion) {
    let sizes =
        if std::env::args().any(|a| a == "--bench") { vec![("1M_windows", FULL), ("100k_windows", SMALL)] } else { vec![("smoke", SMOKE)] };
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10);
    for (name, size) in sizes {
        let mut engine = engine(size);
        let cp = engine.checkpoint();
        let state = engine.partition(&(InputTopic::Messages, 0)).unwrap();
        let windows = state.throttles.windows.len() as u64;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalCheckpointStore::open(dir.path()).unwrap();
        store.save(&cp).unwrap();
        let file = std::fs::metadata(dir.path().join("partitions/messages-0.ckpt")).unwrap().len();
        eprintln!(
            "checkpoint/{name}: {windows} windows ({} spilled), {} schedules, {} emitted ids, {} offenders; file {:.1} MB",
            state.throttles.windows.iter().filter(|(_, w)| w.kept() > 16).count(),
            state.schedules.len(),
            state.emitted.len(),
            state.enforcement.len(),
            file as f64 / 1e6
        );
        g.throughput(Throughput::Elements(windows));
        // The pause: the snapshot only (it is dropped on the checkpointer's thread, not timed).
        g.bench_function(format!("pause/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let cp = black_box(engine.checkpoint());
                    took += started.elapsed();
                    drop(cp);
                }
                took
            })
        });
        // For comparison: a clone of the partition's state, which is what checkpoints copied before
        // they copied snapshots (`PartitionState::clone`; the pause was this, the prune and the
        // global tables' pointers).
        let id = (InputTopic::Messages, 0);
        g.bench_function(format!("clone/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let copy = black_box(engine.partition(&id).unwrap().clone());
                    took += started.elapsed();
                    drop(copy);
                }
                took
            })
        });
        g.bench_function(format!("write/{name}"), |b| b.iter(|| store.save(black_box(&cp)).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
