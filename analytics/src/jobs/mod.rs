//! Detection jobs: the plug-in kind of the analytics crate. A job reads the columns of a batch,
//! consults the global tables, and appends findings; it must never block, allocate per event on
//! its hot path, or keep state outside what the engine checkpoints.
//!
//! Every job is listed in [`all`]; adding one touches its own file and one line there.

mod requester;

use arrow::array::{Array, AsArray, FixedSizeBinaryArray, PrimitiveArray, UInt8Array};
use arrow::datatypes::{TimestampMillisecondType, UInt8Type};
use arrow::record_batch::RecordBatch;
use meshguard_schemas::output::Finding;
use meshguard_schemas::registry::RegistryRecord;
use uuid::Uuid;

use crate::tables::VersionedTable;

pub use requester::RequesterCheck;

/// Every detection job, in the order they run.
pub fn all() -> Vec<Box<dyn Job>> {
    vec![Box::new(RequesterCheck)]
}

/// What a job may read while judging a batch.
#[derive(Debug)]
pub struct JobContext<'a> {
    /// The device directory, as of any event time.
    pub registry: &'a VersionedTable<Uuid, Option<std::sync::Arc<RegistryRecord>>>,
    /// Presence, as of any event time.
    pub presence: &'a VersionedTable<Uuid, bool>,
    /// Detection time for the findings' `ts`.
    pub now_ms: i64,
}

/// A detection job. See the module docs.
pub trait Job: Send + std::fmt::Debug {
    /// Short name, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Judges a batch of message attempts; appends `(row, finding)` pairs to `out`. Rows are the
    /// batch's; the engine dedups and orders the findings.
    fn on_messages(&mut self, batch: &MessagesView<'_>, ctx: &JobContext<'_>, out: &mut Vec<(u32, Finding)>);
}

/// Typed access to the columns of a message-attempts batch in the canonical schema, downcast once
/// per batch rather than once per job or row.
#[derive(Debug)]
pub struct MessagesView<'a> {
    /// `id`.
    pub id: &'a FixedSizeBinaryArray,
    /// `ts`.
    pub ts: &'a PrimitiveArray<TimestampMillisecondType>,
    /// `action` dictionary codes ([`meshguard_schemas::Action::from_code`]).
    pub action: &'a UInt8Array,
    /// `from`.
    pub from: &'a FixedSizeBinaryArray,
    /// `to` (null for `connect`).
    pub to: &'a FixedSizeBinaryArray,
    /// `auth` dictionary codes ([`meshguard_schemas::Auth::from_code`]).
    pub auth: &'a UInt8Array,
    /// The whole batch, for columns jobs read rarely.
    pub batch: &'a RecordBatch,
}

impl<'a> MessagesView<'a> {
    /// The view, or `None` when the batch is not in the canonical messages schema.
    pub fn new(batch: &'a RecordBatch) -> Option<Self> {
        let col = |name: &str| batch.column_by_name(name);
        Some(Self {
            id: col("id")?.as_fixed_size_binary_opt()?,
            ts: col("ts")?.as_primitive_opt()?,
            action: col("action")?.as_dictionary_opt::<UInt8Type>()?.keys(),
            from: col("from")?.as_fixed_size_binary_opt()?,
            to: col("to")?.as_fixed_size_binary_opt()?,
            auth: col("auth")?.as_dictionary_opt::<UInt8Type>()?.keys(),
            batch,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.id.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.id.is_empty()
    }

    /// A UUID column's value at `row` (no allocation: 16 bytes copied).
    #[inline]
    pub fn uuid(col: &FixedSizeBinaryArray, row: usize) -> Option<Uuid> {
        if col.is_null(row) {
            return None;
        }
        <[u8; 16]>::try_from(col.value(row)).ok().map(Uuid::from_bytes)
    }
}
