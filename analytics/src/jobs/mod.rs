//! Detection jobs: the plug-in kind of the analytics crate. A job reads the columns of a batch,
//! consults the global tables, and appends findings; it must never block, allocate per event on
//! its hot path, or keep state outside what the engine checkpoints.
//!
//! Every job is listed in [`all`]; adding one touches its own file and one line there.

mod policy;

use arrow::array::{
    Array, AsArray, BooleanArray, FixedSizeBinaryArray, Float64Array, ListArray, PrimitiveArray, StringArray, StructArray, UInt8Array,
};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMillisecondType, UInt8Type};
use arrow::record_batch::RecordBatch;
use meshguard_schemas::output::Finding;
use uuid::Uuid;

use crate::policy::{CompiledRecord, Location, Lookups, Registry, Route};
use crate::tables::VersionedTable;

pub use policy::PolicyCheck;

/// Every detection job, in the order they run.
pub fn all() -> Vec<Box<dyn Job>> {
    vec![Box::new(PolicyCheck::default())]
}

/// What a job may read while judging a batch.
#[derive(Debug)]
pub struct JobContext<'a> {
    /// The device directory, as of any event time.
    pub registry: &'a Registry,
    /// Presence, as of any event time.
    pub presence: &'a VersionedTable<Uuid, bool>,
    /// Each UUID's latest known location, from its own attempts, as of any event time.
    pub locations: &'a VersionedTable<Uuid, Location>,
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
    /// `target_token` (default filled: never null).
    pub target_token: &'a BooleanArray,
    /// `route`: a list of UUIDs per row.
    pub route: &'a ListArray,
    /// The values of `route`.
    pub route_hops: &'a FixedSizeBinaryArray,
    /// `location.lat`.
    pub lat: &'a Float64Array,
    /// `location.lon`.
    pub lon: &'a Float64Array,
    /// `location.country`.
    pub country: &'a StringArray,
    /// Whether the row has a `location` object.
    pub location: &'a StructArray,
    /// `payload_type`.
    pub payload_type: &'a StringArray,
    /// `payload`, as JSON text.
    pub payload: &'a StringArray,
    /// `payload_bytes`.
    pub payload_bytes: &'a PrimitiveArray<Int64Type>,
    /// `encrypted` (default filled: never null).
    pub encrypted: &'a BooleanArray,
    /// The whole batch, for columns jobs read rarely.
    pub batch: &'a RecordBatch,
}

impl<'a> MessagesView<'a> {
    /// The view, or `None` when the batch is not in the canonical messages schema.
    pub fn new(batch: &'a RecordBatch) -> Option<Self> {
        let col = |name: &str| batch.column_by_name(name);
        let location = col("location")?.as_struct_opt()?;
        Some(Self {
            id: col("id")?.as_fixed_size_binary_opt()?,
            ts: col("ts")?.as_primitive_opt()?,
            action: col("action")?.as_dictionary_opt::<UInt8Type>()?.keys(),
            from: col("from")?.as_fixed_size_binary_opt()?,
            to: col("to")?.as_fixed_size_binary_opt()?,
            auth: col("auth")?.as_dictionary_opt::<UInt8Type>()?.keys(),
            target_token: col("target_token")?.as_boolean_opt()?,
            route: col("route")?.as_list_opt::<i32>()?,
            route_hops: col("route")?.as_list_opt::<i32>()?.values().as_fixed_size_binary_opt()?,
            lat: location.column_by_name("lat")?.as_primitive_opt::<Float64Type>()?,
            lon: location.column_by_name("lon")?.as_primitive_opt::<Float64Type>()?,
            country: location.column_by_name("country")?.as_string_opt::<i32>()?,
            location,
            payload_type: col("payload_type")?.as_string_opt::<i32>()?,
            payload: col("payload")?.as_string_opt::<i32>()?,
            payload_bytes: col("payload_bytes")?.as_primitive_opt::<Int64Type>()?,
            encrypted: col("encrypted")?.as_boolean_opt()?,
            batch,
        })
    }

    /// The route of `row`.
    #[inline]
    pub fn route(&self, row: usize) -> Route<'a> {
        if self.route.is_null(row) {
            return Route::EMPTY;
        }
        let offsets = self.route.value_offsets();
        let (start, end) = (offsets[row], offsets[row + 1]);
        Route::new(self.route_hops, usize::try_from(start).unwrap_or(0), usize::try_from(end).unwrap_or(0))
    }

    /// The requester's location of `row` (all parts `None` when absent).
    #[inline]
    pub fn location(&self, row: usize) -> Location {
        if self.location.is_null(row) {
            return Location::default();
        }
        Location {
            lat: self.lat.is_valid(row).then(|| self.lat.value(row)),
            lon: self.lon.is_valid(row).then(|| self.lon.value(row)),
            country: self.country.is_valid(row).then(|| self.country.value(row)).and_then(meshguard_schemas::registry::Country::parse),
        }
    }

    /// An optional string column's value at `row`.
    #[inline]
    pub fn str_at(col: &'a StringArray, row: usize) -> Option<&'a str> {
        col.is_valid(row).then(|| col.value(row))
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

impl Lookups for JobContext<'_> {
    #[inline]
    fn record(&self, uuid: &Uuid, at_ms: i64) -> Option<&CompiledRecord> {
        self.registry.get(uuid, at_ms).and_then(|r| r.as_deref())
    }

    #[inline]
    fn online(&self, uuid: &Uuid, at_ms: i64) -> bool {
        self.presence.get(uuid, at_ms).copied().unwrap_or(false)
    }

    #[inline]
    fn location(&self, uuid: &Uuid, at_ms: i64) -> Option<Location> {
        self.locations.get(uuid, at_ms).copied()
    }
}
