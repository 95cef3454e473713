//! Kafka I/O for meshguard (everything that talks to a broker lives here) and the attempt archive.
//!
//! ```text
//!  input topics ──► KafkaSource ──(arena of payload bytes)──► assemble() ──► MicroBatch + dead letters
//!   (group consumer: messages, interactions,         │                         (Arrow, via meshguard-schemas)
//!    identity requests; global consumer:             └─ rebalance events: partitions gained / lost
//!    registry, presence)
//!  findings, dead letters ──► KafkaSink (idempotent producer; flush = durable)
//!  message attempts ──► ParquetArchive ──► <dir>/attempts/date=YYYY-MM-DD/part-….parquet (closed at checkpoints)
//!  EmbeddedBroker: librdkafka's in-process mock cluster, for `meshguard run` with no setup
//! ```
//!
//! The hot path copies each payload once, into a reused arena; it allocates per batch, never per
//! record. Nothing here decides anything about the data: decisions are the analytics crate's.

pub mod admin;
pub mod archive;
mod assemble;
pub mod config;
pub mod embedded;
mod error;
pub mod metrics;
pub mod simulator;
pub mod sink;
pub mod source;

pub use archive::{ArchiveConfig, ArchiveMetrics, ParquetArchive};
pub use assemble::{Assembled, assemble, assemble_only, positions};
pub use config::{KafkaConfig, Topics};
pub use embedded::EmbeddedBroker;
pub use error::{Error, Result};
pub use metrics::IngestMetrics;
pub use sink::{Cut, KafkaSink};
pub use source::{KafkaSource, RawBatch, RebalanceEvent, TopicReader, ends_client, read_to_end};
