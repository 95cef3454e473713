//! Test fixtures for the policy checks: a directory in memory and attempts built field by field.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, FixedSizeBinaryArray};
use meshguard_schemas::Action;
use meshguard_schemas::registry::RegistryRecord;
use meshguard_schemas::time::parse_time_str;
use uuid::Uuid;

use super::compile::{CompiledRecord, GroupInterner};
use super::eval::{Attempt, Lookups, Route, Violation, evaluate};
use super::geo::Location;

/// A directory that does not change with time (tests of versioning live with the tables).
#[derive(Debug, Default)]
pub(crate) struct Directory {
    pub(crate) interner: GroupInterner,
    pub(crate) records: HashMap<Uuid, CompiledRecord>,
    pub(crate) online: HashMap<Uuid, bool>,
    pub(crate) locations: HashMap<Uuid, Location>,
}

impl Directory {
    /// Registers a record given as JSON.
    pub(crate) fn add(&mut self, json: &str) -> Uuid {
        let rec = RegistryRecord::from_json(0, json.as_bytes()).unwrap_or_else(|e| panic!("{e}: {json}"));
        let uuid = rec.uuid;
        self.records.insert(uuid, CompiledRecord::compile(Arc::new(rec), &mut self.interner));
        uuid
    }

    /// Judges an attempt the way the policy job does once both parties are registered.
    pub(crate) fn judge(&self, a: &Attempt<'_>) -> Vec<Violation> {
        let mut out = Vec::new();
        evaluate(a, &self.records[&a.from], &self.records[&a.to], self, &mut out);
        out
    }
}

impl Lookups for Directory {
    fn record(&self, uuid: &Uuid, _at_ms: i64) -> Option<&CompiledRecord> {
        self.records.get(uuid)
    }

    fn online(&self, uuid: &Uuid, _at_ms: i64) -> bool {
        self.online.get(uuid).copied().unwrap_or(false)
    }

    fn location(&self, uuid: &Uuid, _at_ms: i64) -> Option<Location> {
        self.locations.get(uuid).copied()
    }
}

/// Epoch ms of an RFC 3339 time.
pub(crate) fn at(rfc3339: &str) -> i64 {
    parse_time_str(rfc3339).unwrap_or_else(|| panic!("bad time {rfc3339}"))
}

/// A test UUID from a number.
pub(crate) fn u(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

/// A column holding a route's hops.
pub(crate) fn hops(route: &[Uuid]) -> FixedSizeBinaryArray {
    FixedSizeBinaryArray::try_from_iter(route.iter().map(|u| u.into_bytes())).unwrap_or_else(|_| FixedSizeBinaryArray::new_null(16, 0))
}

/// An attempt with every optional field at its default.
pub(crate) fn attempt(action: Action, from: Uuid, to: Uuid, ts: i64) -> Attempt<'static> {
    Attempt {
        ts,
        action,
        from,
        to,
        target_token: false,
        route: Route::EMPTY,
        location: Location::default(),
        payload_type: None,
        payload: None,
        payload_bytes: None,
        encrypted: false,
    }
}

/// The route of `column` (all its values).
pub(crate) fn route(column: &FixedSizeBinaryArray) -> Route<'_> {
    Route::new(column, 0, column.len())
}
