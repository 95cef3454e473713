//! Drives the traffic simulator (`meshguard_ingest::simulator`) into a cluster at a steady rate:
//! first the directory (registry and presence), then attempts whose event time follows the wall
//! clock, so a pipeline watching live sees a live platform.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meshguard_ingest::simulator::{SimConfig, SimRecord, Simulator};
use meshguard_ingest::{KafkaConfig, KafkaSink, Topics};

use crate::config::SimulatorSection;

/// What to generate and how fast.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Simulator settings.
    pub sim: SimulatorSection,
    /// Records per second.
    pub rate: u64,
    /// Stop after this long; `None`: until stopped.
    pub duration: Option<Duration>,
}

/// The simulator's configuration for `plan`, starting at event time `start_ms`.
pub fn sim_config(plan: &Plan, start_ms: i64) -> SimConfig {
    SimConfig {
        seed: plan.sim.seed,
        devices: plan.sim.devices,
        start_ms,
        rate: plan.rate.max(1),
        violation_ratio: plan.sim.violation_ratio,
        malformed_ratio: plan.sim.malformed_ratio,
    }
}

/// Publishes simulated records with their keys and event-time timestamps.
pub fn send_all(sink: &KafkaSink, topics: &Topics, records: &[SimRecord]) -> anyhow::Result<()> {
    for r in records {
        sink.send_record(topics.input(r.topic), &r.key, r.payload.as_deref(), Some(r.timestamp_ms))?;
    }
    Ok(())
}

/// Publishes the directory, then traffic at `plan.rate` until `plan.duration` passes or `stop` is
/// set. `sent` counts published records as they go. Returns the simulator for its statistics.
pub fn drive(kafka: &KafkaConfig, topics: &Topics, plan: &Plan, stop: &AtomicBool, sent: &AtomicU64) -> anyhow::Result<Simulator> {
    let sink = KafkaSink::new(kafka)?;
    let building = Instant::now();
    let mut sim = Simulator::new(sim_config(plan, chrono::Utc::now().timestamp_millis()));
    let bootstrap = sim.bootstrap();
    let build = building.elapsed();
    send_all(&sink, topics, &bootstrap)?;
    sink.flush(Duration::from_secs(30))?;
    sent.fetch_add(bootstrap.len() as u64, Ordering::Relaxed);
    // The same seed gives the same directory: the traffic clock starts after the directory is
    // published, so every attempt's event time is the moment it is published. Building the
    // simulator again takes about as long as the first time (longer with more devices), so its
    // clock starts that much (and a margin) ahead, and the traffic waits for it.
    let start_ms = chrono::Utc::now().timestamp_millis() + i64::try_from((build * 5 / 4).as_millis()).unwrap_or(0) + 5;
    let mut sim = Simulator::new(sim_config(plan, start_ms));
    let _ = sim.bootstrap();
    let ahead = start_ms - chrono::Utc::now().timestamp_millis();
    if ahead > 0 {
        std::thread::sleep(Duration::from_millis(ahead.unsigned_abs()));
    }

    let started = Instant::now();
    let mut produced: u64 = 0;
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let elapsed = started.elapsed();
        if plan.duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        let due = (plan.rate as f64 * elapsed.as_secs_f64()) as u64;
        if due > produced {
            let n = (due - produced).min(50_000) as usize;
            buf.clear();
            sim.next_batch(n, &mut buf);
            send_all(&sink, topics, &buf)?;
            produced += n as u64;
            sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
        } else {
            // Pacing to the wall clock is the point of a rate: wait for the next slice of it.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    sink.flush(Duration::from_secs(60))?;
    Ok(sim)
}
