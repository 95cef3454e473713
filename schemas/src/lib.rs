//! The meshguard wire contract as code.
//!
//! This crate owns everything `../shared/contract/EVENTS.md` fixes: the records of every input and
//! output topic as Rust types, their Arrow schemas, and the column-wise decoding of a micro-batch of
//! Kafka payloads into one [`RecordBatch`](arrow::record_batch::RecordBatch) per topic, with a
//! precise error for every record that breaks the contract.
//!
//! It is sans-I/O: no sockets, no files, no clocks, no tokio. Everything that talks to Kafka or
//! disk wraps it.
//!
//! ```text
//!  Kafka payloads (&[u8]) ──► BatchDecoder ──► DecodedBatch { batch: RecordBatch (canonical schema),
//!                              │                               rows → source index,
//!                              │                               rejected: Vec<RecordError> }
//!                              ├─ fast path: arrow-json over the whole batch, then columnar checks
//!                              └─ slow path (only when the batch has a bad record): per-record
//!                                 validation that names the record, field, expectation and finding
//! ```
//!
//! ```
//! use meshguard_schemas::{BatchDecoder, InputTopic};
//! let mut decoder = BatchDecoder::new(InputTopic::Presence);
//! let good = br#"{"ts":"2026-11-24T16:59:58.000Z","uuid":"C4D5E6F7-1A2B-4C3D-8E9F-0A1B2C3D4E5F","online":true}"#;
//! let bad = br#"{"ts":"yesterday","uuid":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f","online":true}"#;
//! let out = decoder.decode(&[&good[..], &bad[..]]);
//! assert_eq!(out.batch.num_rows(), 1);
//! assert_eq!(out.rejected[0].index, 1);
//! assert_eq!(out.rejected[0].field.as_deref(), Some("ts"));
//! ```

mod decode;
mod enums;
mod error;
pub mod output;
pub mod registry;
pub mod schema;
pub mod time;

pub use decode::{BatchDecoder, DEFAULT_MAX_RECORD_BYTES, DecodedBatch};
pub use enums::{Action, Auth, EnforcementStateKind, FindingKind, InteractionKind, Outcome, RegistryKind, Severity};
pub use error::{Error, RecordError, Result};
pub use schema::InputTopic;
