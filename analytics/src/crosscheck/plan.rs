//! The cross-check as a DataFusion plan: one SQL self-join of the interaction tables answers every
//! identity request of a micro-batch.
//!
//! **What the plan does.** Two tables are registered for each micro-batch: `requests` (one row per
//! request: its index, device, time and `window`) and `interactions` (rows of the store, see
//! *pruning*). The plan ranks each device's interactions before the request's time, newest first,
//! and keeps the first `window` (the *checked* ones); joins them against the peers' own rows
//! (reporter = the peer, peer = the device, same kind, `|Δt| ≤ tolerance`, at or before the
//! request); matches peer rows to interactions one to one (the aggregate `mg_match_*`, a maximum
//! matching: see [`super::InteractionStore::judge`]); and counts, per request, the checked
//! interactions, the verified ones and the unavailable ones (an anti-join: the peer has no row
//! from the interaction's time minus the tolerance up to the request). The outcome and the
//! confidence follow from those counts ([`super::Tally::verdict`]).
//!
//! **Pruning.** The store is keyed by reporter and ordered by time, so the rows a batch can touch
//! are a few slices of it: for each request, the device's latest `window` entries before its time,
//! and for each of those, the peer's entries from the interaction's time minus the tolerance up to
//! the request. Only those slices are turned into the `interactions` batch (merged per reporter, so
//! a reporter appearing as device and as peer is there once): the plan's cost follows the batch,
//! not the size of the store, and the self-join still sees every row that can change an answer.
//!
//! **Threads.** The worker loop is synchronous on one OS thread; the plan owns a current-thread
//! tokio runtime and blocks on it, with one target partition (a micro-batch's slices are small, and
//! the machine's cores are the other workers').

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeBinaryBuilder, Float64Array, Int64Array, RecordBatch, UInt8Array};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, UInt8Type};
use datafusion::common::utils::SingleRowListArrayBuilder;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::{Accumulator, ColumnarValue, Volatility, create_udaf, create_udf};
use datafusion::prelude::{SessionConfig, SessionContext};
use meshguard_schemas::InteractionKind;
use uuid::Uuid;

use super::{InteractionStore, Tally, weight};
use crate::tables::FastMap;

/// One identity request as the plan sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanRequest {
    /// The device whose identity is to be confirmed.
    pub device: Uuid,
    /// The request's time.
    pub t: i64,
    /// How many of the device's latest interactions to check.
    pub window: u32,
}

/// The cross-check's DataFusion session and runtime (see the module docs).
pub struct CrossCheckPlan {
    runtime: tokio::runtime::Runtime,
    ctx: SessionContext,
    requests_schema: SchemaRef,
    interactions_schema: SchemaRef,
}

impl std::fmt::Debug for CrossCheckPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrossCheckPlan").finish_non_exhaustive()
    }
}

/// The plan. `{tol}` is the tolerance in ms (an integer literal).
const SQL: &str = "
WITH checked AS (
    SELECT req, device, t, rid, peer, kind, ts, mg_weight(kind, t - ts) AS w
    FROM (
        SELECT r.req, r.device, r.t, r.win, i.rid, i.peer, i.kind, i.ts,
               row_number() OVER (PARTITION BY r.req ORDER BY i.ts DESC, i.rid DESC) AS rn
        FROM requests r JOIN interactions i ON i.reporter = r.device AND i.ts < r.t
    ) ranked
    WHERE rn <= win
),
totals AS (
    SELECT req, count(*) AS checked, sum(w) AS weight_checked FROM checked GROUP BY req
),
matches AS (
    SELECT c.req,
           mg_match_count(c.ts, c.rid, p.ts, p.rid, c.w) AS verified,
           mg_match_weight(c.ts, c.rid, p.ts, p.rid, c.w) AS weight_verified
    FROM checked c JOIN interactions p
      ON p.reporter = c.peer AND p.peer = c.device AND p.kind = c.kind
     AND p.ts >= c.ts - {tol} AND p.ts <= c.ts + {tol} AND p.ts <= c.t
    GROUP BY c.req, c.peer, c.kind
),
verified AS (
    SELECT req, sum(verified) AS verified, sum(weight_verified) AS weight_verified FROM matches GROUP BY req
),
unavailable AS (
    SELECT c.req, count(*) AS unavailable FROM checked c
    WHERE NOT EXISTS (
        SELECT 1 FROM interactions p WHERE p.reporter = c.peer AND p.ts >= c.ts - {tol} AND p.ts <= c.t
    )
    GROUP BY c.req
)
SELECT tt.req,
       CAST(tt.checked AS BIGINT) AS checked,
       CAST(coalesce(v.verified, 0) AS BIGINT) AS verified,
       CAST(coalesce(u.unavailable, 0) AS BIGINT) AS unavailable,
       CAST(tt.weight_checked AS DOUBLE) AS weight_checked,
       CAST(coalesce(v.weight_verified, 0.0) AS DOUBLE) AS weight_verified
FROM totals tt
LEFT JOIN verified v ON v.req = tt.req
LEFT JOIN unavailable u ON u.req = tt.req
";

impl CrossCheckPlan {
    /// A session with the plan's functions registered.
    pub fn new() -> Result<Self, DataFusionError> {
        let runtime = tokio::runtime::Builder::new_current_thread().build()?;
        let config = SessionConfig::new().with_target_partitions(1).with_information_schema(false);
        let ctx = SessionContext::new_with_config(config);
        ctx.register_udf(create_udf(
            "mg_weight",
            vec![DataType::UInt8, DataType::Int64],
            DataType::Float64,
            Volatility::Immutable,
            Arc::new(weight_udf),
        ));
        for (name, output) in [("mg_match_count", Output::Count), ("mg_match_weight", Output::Weight)] {
            let return_type = match output {
                Output::Count => DataType::Int64,
                Output::Weight => DataType::Float64,
            };
            ctx.register_udaf(create_udaf(
                name,
                vec![DataType::Int64, DataType::Int64, DataType::Int64, DataType::Int64, DataType::Float64],
                Arc::new(return_type),
                Volatility::Immutable,
                Arc::new(move |_| Ok(Box::new(Matching { pairs: Vec::new(), output }))),
                Arc::new(vec![DataType::List(Arc::new(Field::new_list_field(DataType::Int64, true)))]),
            ));
        }
        let uuid = || DataType::FixedSizeBinary(16);
        let requests_schema = Arc::new(Schema::new(vec![
            Field::new("req", DataType::Int64, false),
            Field::new("device", uuid(), false),
            Field::new("t", DataType::Int64, false),
            Field::new("win", DataType::Int64, false),
        ]));
        let interactions_schema = Arc::new(Schema::new(vec![
            Field::new("rid", DataType::Int64, false),
            Field::new("reporter", uuid(), false),
            Field::new("peer", uuid(), false),
            Field::new("kind", DataType::UInt8, false),
            Field::new("ts", DataType::Int64, false),
        ]));
        Ok(Self { runtime, ctx, requests_schema, interactions_schema })
    }

    /// The counts for each request, in order (`tol`: the tolerance in ms).
    pub fn tallies(&self, store: &InteractionStore, tol: i64, requests: &[PlanRequest]) -> Result<Vec<Tally>, DataFusionError> {
        let mut out = vec![Tally::default(); requests.len()];
        if requests.is_empty() {
            return Ok(out);
        }
        let interactions = self.pruned(store, tol, requests)?;
        if interactions.num_rows() == 0 {
            return Ok(out);
        }
        let mut device = FixedSizeBinaryBuilder::with_capacity(requests.len(), 16);
        for r in requests {
            device.append_value(r.device.as_bytes())?;
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(0..requests.len() as i64)),
            Arc::new(device.finish()),
            Arc::new(Int64Array::from_iter_values(requests.iter().map(|r| r.t))),
            Arc::new(Int64Array::from_iter_values(requests.iter().map(|r| i64::from(r.window)))),
        ];
        let requests_batch = RecordBatch::try_new(self.requests_schema.clone(), columns)?;
        for (name, schema, batch) in
            [("requests", &self.requests_schema, requests_batch), ("interactions", &self.interactions_schema, interactions)]
        {
            self.ctx.deregister_table(name)?;
            self.ctx.register_table(name, Arc::new(MemTable::try_new(schema.clone(), vec![vec![batch]])?))?;
        }
        let sql = SQL.replace("{tol}", &tol.to_string());
        let batches = self.runtime.block_on(async { self.ctx.sql(&sql).await?.collect().await })?;
        for b in &batches {
            let col = |i: usize| b.column(i).as_primitive_opt::<Int64Type>();
            let (Some(req), Some(checked), Some(verified), Some(unavailable)) = (col(0), col(1), col(2), col(3)) else {
                return Err(DataFusionError::Internal("the cross-check plan's output has unexpected column types".into()));
            };
            let (Some(wc), Some(wv)) = (b.column(4).as_primitive_opt::<Float64Type>(), b.column(5).as_primitive_opt::<Float64Type>())
            else {
                return Err(DataFusionError::Internal("the cross-check plan's weights have unexpected types".into()));
            };
            for row in 0..b.num_rows() {
                let Some(slot) = usize::try_from(req.value(row)).ok().and_then(|i| out.get_mut(i)) else {
                    continue;
                };
                let n = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
                *slot = Tally {
                    checked: n(checked.value(row)),
                    verified: n(verified.value(row)),
                    unavailable: n(unavailable.value(row)),
                    weight_checked: wc.value(row),
                    weight_verified: wv.value(row),
                };
            }
        }
        Ok(out)
    }

    /// The rows of `store` the requests can touch, as the `interactions` batch (see the module
    /// docs): `rid` numbers them in `(reporter, ts, id)` order, the order the reference uses.
    pub fn pruned(&self, store: &InteractionStore, tol: i64, requests: &[PlanRequest]) -> Result<RecordBatch, DataFusionError> {
        let mut ranges: FastMap<Uuid, Vec<(usize, usize)>> = FastMap::default();
        for r in requests {
            let own = store.table(&r.device);
            let before = own.partition_point(|e| e.ts < r.t);
            let start = before.saturating_sub(r.window as usize);
            if start == before {
                continue;
            }
            ranges.entry(r.device).or_default().push((start, before));
            for i in &own[start..before] {
                let peer = store.table(&i.peer);
                let lo = peer.partition_point(|e| e.ts < i.ts.saturating_sub(tol));
                let hi = peer.partition_point(|e| e.ts <= r.t);
                if lo < hi {
                    ranges.entry(i.peer).or_default().push((lo, hi));
                }
            }
        }
        let mut rows = 0;
        for list in ranges.values_mut() {
            list.sort_unstable();
            let mut merged: Vec<(usize, usize)> = Vec::with_capacity(list.len());
            for &(lo, hi) in list.iter() {
                match merged.last_mut() {
                    Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                    _ => merged.push((lo, hi)),
                }
            }
            rows += merged.iter().map(|(lo, hi)| hi - lo).sum::<usize>();
            *list = merged;
        }
        let (mut reporter, mut peer) = (FixedSizeBinaryBuilder::with_capacity(rows, 16), FixedSizeBinaryBuilder::with_capacity(rows, 16));
        let (mut kind, mut ts) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for (who, list) in &ranges {
            let table = store.table(who);
            for &(lo, hi) in list {
                for e in &table[lo..hi] {
                    reporter.append_value(who.as_bytes())?;
                    peer.append_value(e.peer.as_bytes())?;
                    kind.push(e.kind.code());
                    ts.push(e.ts);
                }
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(0..rows as i64)),
            Arc::new(reporter.finish()),
            Arc::new(peer.finish()),
            Arc::new(UInt8Array::from(kind)),
            Arc::new(Int64Array::from(ts)),
        ];
        Ok(RecordBatch::try_new(self.interactions_schema.clone(), columns)?)
    }
}

/// `mg_weight(kind, age_ms)`: [`weight`] of a kind code and an age.
fn weight_udf(args: &[ColumnarValue]) -> Result<ColumnarValue, DataFusionError> {
    let arrays = ColumnarValue::values_to_arrays(args)?;
    let (Some(kind), Some(age)) =
        (arrays.first().and_then(|a| a.as_primitive_opt::<UInt8Type>()), arrays.get(1).and_then(|a| a.as_primitive_opt::<Int64Type>()))
    else {
        return Err(DataFusionError::Internal("mg_weight takes (UInt8, Int64)".into()));
    };
    let out: Float64Array = kind.iter().zip(age.iter()).map(|(k, a)| Some(weight(InteractionKind::from_code(k?)?, a?))).collect();
    Ok(ColumnarValue::Array(Arc::new(out)))
}

#[derive(Debug, Clone, Copy)]
enum Output {
    Count,
    Weight,
}

/// The one-to-one matching of one (request, peer, kind) group: candidate pairs of an interaction
/// `(ts, rid)` with its weight and a peer row `(ts, rid)`; interactions oldest first, each taking
/// the earliest unused peer row among its candidates (see [`super::InteractionStore::judge`]).
#[derive(Debug)]
struct Matching {
    /// `[interaction ts, interaction rid, peer ts, peer rid, weight bits]`.
    pairs: Vec<[i64; 5]>,
    output: Output,
}

impl Matching {
    fn matched(&mut self) -> (i64, f64) {
        self.pairs.sort_unstable();
        let mut used: hashbrown::HashSet<i64> = hashbrown::HashSet::new();
        let (mut n, mut w) = (0, 0.0);
        let mut rest = self.pairs.as_slice();
        while let Some(first) = rest.first() {
            let len = rest.iter().take_while(|p| p[..2] == first[..2]).count();
            let (group, tail) = rest.split_at(len);
            if let Some(p) = group.iter().find(|p| !used.contains(&p[3])) {
                used.insert(p[3]);
                n += 1;
                w += f64::from_bits(p[4] as u64);
            }
            rest = tail;
        }
        (n, w)
    }
}

impl Accumulator for Matching {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<(), DataFusionError> {
        let int = |i: usize| values.get(i).and_then(|a| a.as_primitive_opt::<Int64Type>());
        let (Some(its), Some(irid), Some(pts), Some(prid), Some(w)) =
            (int(0), int(1), int(2), int(3), values.get(4).and_then(|a| a.as_primitive_opt::<Float64Type>()))
        else {
            return Err(DataFusionError::Internal("mg_match takes (Int64, Int64, Int64, Int64, Float64)".into()));
        };
        for row in 0..its.len() {
            if [its.is_null(row), irid.is_null(row), pts.is_null(row), prid.is_null(row), w.is_null(row)].contains(&true) {
                continue;
            }
            self.pairs.push([its.value(row), irid.value(row), pts.value(row), prid.value(row), w.value(row).to_bits() as i64]);
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue, DataFusionError> {
        let (n, w) = self.matched();
        Ok(match self.output {
            Output::Count => ScalarValue::Int64(Some(n)),
            Output::Weight => ScalarValue::Float64(Some(w)),
        })
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.pairs.capacity() * std::mem::size_of::<[i64; 5]>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>, DataFusionError> {
        let flat: Int64Array = self.pairs.iter().flatten().copied().collect();
        Ok(vec![SingleRowListArrayBuilder::new(Arc::new(flat)).build_list_scalar()])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<(), DataFusionError> {
        let Some(list) = states.first().and_then(|s| s.as_list_opt::<i32>()) else {
            return Err(DataFusionError::Internal("mg_match's state is a list".into()));
        };
        for row in 0..list.len() {
            if list.is_null(row) {
                continue;
            }
            let values = list.value(row);
            let Some(values) = values.as_primitive_opt::<Int64Type>() else {
                return Err(DataFusionError::Internal("mg_match's state holds Int64".into()));
            };
            for p in values.values().chunks_exact(5) {
                self.pairs.push([p[0], p[1], p[2], p[3], p[4]]);
            }
        }
        Ok(())
    }
}
