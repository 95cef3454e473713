//! meshguard's engine and detection jobs.
//!
//! The engine is a micro-batch stream processor in the mould of Spark Structured Streaming and
//! Kafka Streams, and it is sans-I/O: it is handed decoded Arrow batches with their Kafka
//! positions, returns findings, and snapshots its state as bytes. Kafka, disk and clocks belong to
//! the caller (the `meshguard` binary wires `meshguard-ingest` to it).
//!
//! ```text
//!           MicroBatch (Arrow batches per topic + partition of every row + next offsets)
//!                │
//!                ▼
//!   ┌──────────────────────── Engine::process(batch, now) ────────────────────────┐
//!   │ 1. global tables (registry, presence), versioned by event time              │
//!   │ 2. per-partition keyed state: watermark, findings already emitted           │
//!   │ 3. jobs (jobs::all()): each reads columns, consults tables, emits findings  │
//!   │ 4. dedup on deterministic finding ids                                        │
//!   └──────────────────────────────────────────────────────────────────────────────┘
//!                │                                   │
//!                ▼                                   ▼
//!          Vec<Finding>                Engine::checkpoint() → Checkpoint (bytes per
//!                                      partition + global) → CheckpointStore
//! ```
//!
//! ```
//! use meshguard_analytics::{Engine, EngineConfig, MicroBatch};
//! let mut engine = Engine::new(EngineConfig::default());
//! let findings = engine.process(&MicroBatch::default(), 0);
//! assert!(findings.is_empty());
//! ```

pub mod crosscheck;
pub mod enforcement;
pub mod engine;
mod error;
mod huge;
pub mod jobs;
pub mod policy;
mod slot_index;
pub mod sql;
pub mod tables;
pub mod throttle;
pub mod timing;
pub mod timing_model;

pub use engine::checkpoint::{
    CHECKPOINT_CUT_ROWS, CHECKPOINT_STEP_ROWS, Checkpoint, CheckpointStore, LocalCheckpointStore, PartitionSnapshot, Recycled,
};
pub use engine::{Engine, EngineConfig, EngineStats, MicroBatch, PartitionId, Position, RegistryChange, RowsBatch};
pub use error::{Error, Result};
