//! `meshguard quality`: precision and recall per finding kind on labelled simulated traffic.
//!
//! The simulator's records go through the pipeline's own decoding (`assemble`) and engine, in
//! process and without a broker: records are spread over `kafka.partitions` partitions by key as
//! a producer would, in micro-batches of `pipeline.batch_max_records`, with the engine told which
//! partitions it holds (all of them). Every labelled attempt expects exactly one finding of its
//! kind; every finding without a matching label is a false positive. Malformed records must each
//! give one dead letter.

#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};

use meshguard_analytics::Engine;
use meshguard_ingest::simulator::{SimConfig, Simulator};
use meshguard_ingest::{RawBatch, assemble};
use meshguard_schemas::{BatchDecoder, InputTopic};

use crate::config::Config;

/// What to generate.
#[derive(Debug, Clone)]
pub struct QualityArgs {
    /// Traffic records after the directory.
    pub records: usize,
    /// Simulator seed.
    pub seed: u64,
    /// Registered UUIDs.
    pub devices: usize,
    /// Share of attempts that are violations.
    pub violation_ratio: f64,
}

/// Runs the measurement, prints the table and returns it: per kind, (true positives, false
/// positives, false negatives).
pub fn run(cfg: &Config, args: &QualityArgs) -> anyhow::Result<BTreeMap<String, (u64, u64, u64)>> {
    let start_ms = 1_795_539_600_000;
    let mut sim = Simulator::new(SimConfig {
        seed: args.seed,
        devices: args.devices,
        start_ms,
        rate: 2_000,
        violation_ratio: args.violation_ratio,
        malformed_ratio: 0.001,
    });
    let partitions = cfg.kafka.partitions.max(1);
    let mut engine = Engine::new(cfg.engine());
    engine.set_messages_partitions(u32::try_from(partitions).unwrap_or(1));
    let all: Vec<_> = (0..partitions).map(|p| (InputTopic::Messages, p)).collect();
    engine.assign(&all);
    let mut decoders = [InputTopic::Messages, InputTopic::Presence, InputTopic::Interactions, InputTopic::IdentityRequests]
        .map(|t| BatchDecoder::new(t).with_max_record_bytes(cfg.pipeline.max_record_bytes));

    let mut expected: BTreeSet<(String, String)> = BTreeSet::new();
    let mut found: BTreeSet<(String, String)> = BTreeSet::new();
    let mut malformed = 0u64;
    let mut dead_letters = 0u64;
    let mut offsets: BTreeMap<(InputTopic, i32), i64> = BTreeMap::new();
    let batch = cfg.pipeline.batch_max_records.max(1);
    let mut records = sim.bootstrap();
    let mut generated = 0usize;
    let mut raw = RawBatch::default();
    loop {
        if records.is_empty() {
            if generated >= args.records {
                break;
            }
            let n = batch.min(args.records - generated);
            sim.next_batch(n, &mut records);
            generated += n;
        }
        raw.clear();
        for r in records.drain(..) {
            if let Some(kind) = r.label.and_then(|l| l.finding_kind()) {
                let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap_or_default())?;
                expected.insert((v["id"].as_str().unwrap_or_default().to_lowercase(), kind.to_owned()));
            }
            if r.malformed.is_some() {
                malformed += 1;
            }
            let partition = partition_of(&r.key, partitions);
            let offset = offsets.entry((r.topic, partition)).or_default();
            raw.topic_mut(r.topic).push_parts(Some(&r.key), r.payload.as_deref(), partition, *offset, r.timestamp_ms);
            *offset += 1;
        }
        let assembled = assemble(&raw, &mut decoders, &cfg.topics, cfg.pipeline.max_record_bytes, start_ms);
        dead_letters += assembled.dead_letters.len() as u64;
        for f in engine.process(&assembled.batch, start_ms) {
            if let Some(id) = f.event_id {
                found.insert((id.to_string(), f.kind.to_string()));
            }
        }
    }

    let mut table: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for (id, kind) in &expected {
        let e = table.entry(kind.clone()).or_default();
        if found.contains(&(id.clone(), kind.clone())) {
            e.0 += 1;
        } else {
            e.2 += 1;
        }
    }
    for (id, kind) in &found {
        if !expected.contains(&(id.clone(), kind.clone())) {
            table.entry(kind.clone()).or_default().1 += 1;
        }
    }
    println!("| kind | labelled | found | true positives | false positives | false negatives | precision | recall |");
    println!("|---|---|---|---|---|---|---|---|");
    for (kind, (tp, fp, fn_)) in &table {
        let ratio = |a: u64, b: u64| if b == 0 { "n/a".to_owned() } else { format!("{:.4}", a as f64 / b as f64) };
        println!("| `{kind}` | {} | {} | {tp} | {fp} | {fn_} | {} | {} |", tp + fn_, tp + fp, ratio(*tp, tp + fp), ratio(*tp, tp + fn_));
    }
    println!("\nmalformed records: {malformed}, dead letters: {dead_letters}; traffic records: {generated}, seed {}", args.seed);
    Ok(table)
}

/// A producer's partitioner: the same key, the same partition (SipHash with fixed keys).
fn partition_of(key: &[u8], partitions: i32) -> i32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % u64::from(partitions.unsigned_abs())) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine finds exactly what the simulator labels, on a small run (the full table is in
    /// QUALITY.md): precision and recall 1 for every kind the simulator generates.
    #[test]
    fn every_labelled_kind_is_found_exactly() {
        let cfg = Config::default();
        let table = run(&cfg, &QualityArgs { records: 60_000, seed: 3, devices: 500, violation_ratio: 0.05 }).expect("runs");
        for kind in ["unregistered_requester", "bad_credentials", "permission_denied", "throttle_exceeded"] {
            let (tp, fp, fn_) = table.get(kind).copied().unwrap_or_default();
            assert!(tp > 0, "{kind}: none generated");
            assert_eq!((fp, fn_), (0, 0), "{kind}: false positives or negatives");
        }
        assert_eq!(table.len(), 4, "no finding of another kind: {table:?}");
    }
}
