//! Checkpoints: the pause (`Engine::checkpoint`, on the pipeline's thread, while no attempt is
//! judged) and the write (`LocalCheckpointStore::save`, on the checkpointer's thread: encoding,
//! writing, fsync, rename) of one messages partition's state, measured apart.
//!
//! The state is what a busy partition holds within its horizons: 1,000,000 throttle windows over
//! 250,000 requesters (per requester: its requester and connect limits, a device-type limit of 30
//! attempts whose windows spill now and then, a per-target profile limit), 500,000 learned
//! schedules (per requester: its own and one pair's), 100,000 finding ids in the dedup horizon and
//! 10,000 offenders. Every window, id and offender is recent enough to survive the checkpoint's
//! prune. Built through the public API: attempts counted with `ThrottleState::count_batch`,
//! schedules fed with `Schedule::add`, offenders counted.
//!
//! Two pauses. **pause_full**: a checkpoint without mirrors at home (the first one, one whose
//! mirrors were not handed back, the exact ones at start and stop): every row copied into a packed
//! snapshot. **pause**: the pipeline's steady state. Between two checkpoints 400,000 attempts (5 s
//! at 80 k/s of event time, which advances) of random requesters of the state are counted in
//! micro-batches of 2,000 (their requester, device-type and profile windows, one in eight a
//! connect window, their two schedules); then, as the pipeline does once a checkpoint is due, each
//! further micro-batch is
//! followed by a [`Engine::checkpoint_step`] until at most [`CHECKPOINT_CUT_ROWS`] rows are left
//! to copy; then the checkpoint is taken (timed) and its mirrors handed back once "written".
//! Only the checkpoint is timed.
//!
//! `cargo bench -p meshguard-analytics --bench checkpoint` (`-- --bench` runs the full state; a
//! plain `cargo test --benches` run uses a state a hundred times smaller).

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_analytics::enforcement::EnforcementConfig;
use meshguard_analytics::engine::PartitionState;
use meshguard_analytics::throttle::{Attempt, Outcome, Rule, Tightening};
use meshguard_analytics::timing::Schedule;
use meshguard_analytics::{CHECKPOINT_CUT_ROWS, CHECKPOINT_STEP_ROWS, CheckpointStore, Engine, EngineConfig, LocalCheckpointStore};
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
        let o = state.enforcement.entry(uuid(1, i));
        for k in 0..3 {
            o.count(&cfg, NOW - 60_000 + k * 1_000, 1, &[uuid(4, i * 3 + k as u32)], true, false);
        }
    }
    let mut engine = Engine::new(EngineConfig::default());
    engine.restore_partition((InputTopic::Messages, 0), state.snapshot());
    engine
}

/// Live traffic on the state: attempts of random requesters of the state at 80,000 a second of
/// event time, from `clock` on (which it advances), in micro-batches of `batch`, counted as the
/// engine's stages would (requester, device-type and profile windows, one in eight a connect too;
/// the two schedules); `step` runs after each micro-batch and ends the traffic by returning true.
fn traffic(
    engine: &mut Engine,
    size: Size,
    rng: &mut SmallRng,
    clock: &mut i64,
    n: usize,
    batch: usize,
    mut step: impl FnMut(&mut Engine) -> bool,
) {
    let id = (InputTopic::Messages, 0);
    let mut attempts = Vec::with_capacity(batch * 4);
    let mut outcomes = Vec::with_capacity(batch * 4);
    let mut done = 0;
    while done < n {
        attempts.clear();
        outcomes.clear();
        for j in 0..batch {
            let r = rng.random_range(0..size.requesters);
            let (from, target) = (uuid(1, r), uuid(2, r % 5_000));
            let ts = *clock + (j * 1_000 / 80_000) as i64;
            let fingerprint = rng.random();
            let a = |key, max, per_ms, first| Attempt { key, ts, fingerprint, max, per_ms, first_of_attempt: first };
            if j % 8 == 0 {
                attempts.push(a((from, Uuid::nil(), Rule::Connect), 2, 1_000, true));
            }
            attempts.push(a((from, Uuid::nil(), Rule::Requester), 10, 1_000, j % 8 != 0));
            attempts.push(a((from, Uuid::nil(), Rule::Type), 30, 60_000, false));
            attempts.push(a((from, target, Rule::Profile(1)), 3, 1_000, false));
        }
        *clock += (batch * 1_000 / 80_000) as i64;
        let state = engine.partition_mut(&id).unwrap();
        state.throttles.count_batch(&attempts, LATENESS_MS, &Tightening::default(), &mut outcomes);
        for a in attempts.iter().filter(|a| a.key.2 == Rule::Type) {
            state.schedules.get_or_default(&(a.key.0, Uuid::nil())).add(a.ts);
            state.schedules.get_or_default(&(a.key.0, uuid(2, a.key.0.as_u128() as u32 % 5_000))).add(a.ts);
        }
        state.max_event_ms = *clock;
        done += batch;
        if step(engine) {
            break;
        }
    }
}

/// What the partition holds, for the bench's log.
fn describe(engine: &Engine) -> String {
    let state = engine.partition(&(InputTopic::Messages, 0)).unwrap();
    format!(
        "{} windows ({} spilled), {} schedules, {} emitted ids, {} offenders",
        state.throttles.windows.len(),
        state.throttles.windows.iter().filter(|(_, w)| w.kept() > 16).count(),
        state.schedules.len(),
        state.emitted.len(),
        state.enforcement.len(),
    )
}

fn bench(c: &mut Criterion) {
    let sizes =
        if std::env::args().any(|a| a == "--bench") { vec![("1M_windows", FULL), ("100k_windows", SMALL)] } else { vec![("smoke", SMOKE)] };
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10);
    for (name, size) in sizes {
        let mut engine = engine(size);
        let mut cp = engine.checkpoint();
        let windows = engine.partition(&(InputTopic::Messages, 0)).unwrap().throttles.windows.len() as u64;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalCheckpointStore::open(dir.path()).unwrap();
        store.save(&mut cp).unwrap();
        let file = std::fs::metadata(dir.path().join("partitions/messages-0.ckpt")).unwrap().len();
        eprintln!("checkpoint/{name}: {}; file {:.1} MB", describe(&engine), file as f64 / 1e6);
        g.throughput(Throughput::Elements(windows));
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
        // The pause without the mirrors (never handed back, no step ahead): every row copied into a
        // packed snapshot, as before the mirrors (it is dropped on the checkpointer's thread, not
        // timed).
        g.bench_function(format!("pause_full/{name}"), |b| {
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
        // The write of a checkpoint taken without mirrors (packed).
        g.bench_function(format!("write/{name}"), |b| b.iter(|| store.save(black_box(&mut cp)).unwrap()));
        // The pause of the steady state (see the module docs).
        let mut rng = SmallRng::seed_from_u64(8);
        let mut clock = NOW;
        let (mut steps, mut step_times) = (Vec::new(), Vec::new());
        // The state's first mirrors, built by steps as the pipeline's first checkpoint does.
        traffic(&mut engine, size, &mut rng, &mut clock, usize::MAX, 2_000, |e| {
            e.checkpoint_step(CHECKPOINT_STEP_ROWS) <= CHECKPOINT_CUT_ROWS
        });
        let mut out = Some(engine.checkpoint());
        g.bench_function(format!("pause/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    // Written: its mirrors come back.
                    if let Some(written) = out.take() {
                        engine.recycle(written.into_recycled());
                    }
                    traffic(
                        &mut engine,
                        size,
                        &mut rng,
                        &mut clock,
                        400_000 * size.requesters as usize / FULL.requesters as usize,
                        2_000,
                        |_| false,
                    );
                    let mut n = 0;
                    traffic(&mut engine, size, &mut rng, &mut clock, usize::MAX, 2_000, |e| {
                        n += 1;
                        let started = Instant::now();
                        let left = e.checkpoint_step(CHECKPOINT_STEP_ROWS);
                        step_times.push(started.elapsed());
                        left <= CHECKPOINT_CUT_ROWS
                    });
                    steps.push(n);
                    let started = Instant::now();
                    out = Some(black_box(engine.checkpoint()));
                    took += started.elapsed();
                }
                took
            })
        });
        steps.sort_unstable();
        step_times.sort_unstable();
        // Nothing ran when criterion only lists the benches (`--list`, as nextest asks).
        if steps.is_empty() || step_times.is_empty() {
            continue;
        }
        eprintln!(
            "checkpoint/{name}: after the traffic: {}; micro-batches with a step before the cut: median {}, most {}; a step took {:?} at the median, {:?} at p99, {:?} at most",
            describe(&engine),
            steps[steps.len() / 2],
            steps[steps.len() - 1],
            step_times[step_times.len() / 2],
            step_times[step_times.len() * 99 / 100],
            step_times[step_times.len() - 1]
        );
        // The write of a steady-state checkpoint: its mirrors packed on the writing thread.
        let mut mirrored = out.take().unwrap();
        g.bench_function(format!("write_mirrored/{name}"), |b| b.iter(|| store.save(black_box(&mut mirrored)).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
