//! Interaction cross-check: a device's identity is confirmed by its peers' own interaction tables.
//!
//! Every device's reported interactions are kept as a table keyed by reporter, for
//! `retention_days` of event time. For an identity request on device D at time t (the contract's
//! readings, exactly): take D's latest `window` interactions before t (entries re-delivered with
//! the same id count once); an interaction with peer P is *verified* when P's own table holds an
//! entry about D of the same kind whose `ts` is within `tolerance_s` of it and at or before t, each
//! peer entry confirming at most one interaction; P is *unavailable* for it when P's table holds no
//! matching entry and P has reported nothing with `ts` from the interaction's `ts` minus the
//! tolerance up to t. `confirmed` when `verified ≥ min_verified`; `denied` when `checked ≥
//! min_verified` and `verified + unavailable < min_verified`; `insufficient_evidence` otherwise.
//!
//! **Answering.** Production answers a micro-batch's requests with one DataFusion plan
//! ([`plan`]); [`InteractionStore::judge`] is the plain-Rust reference it is tested against.
//! Requests wait for the interactions topic to reach their time ([`HeldRequest`]).
//!
//! **Scale-out.** Verification needs the peers' tables, which are keyed by other reporters. The
//! interactions topic is therefore read by every worker in full, as a global table (Kafka Streams'
//! GlobalKTable), like the registry: the answer is the same with one worker or several, at the cost
//! of every worker holding every table for the retention.
//!
//! **Confidence** (documented in the README): each checked interaction weighs its kind (proximity
//! 1.0, call 0.9, sms and mms 0.8, message 0.7, email 0.6) times its recency (halved every 7 days
//! before the request). Confidence is the verified weight over the checked weight, times
//! `1 − unavailable / (2 × checked)`: unavailable peers neither confirm nor refute, so they cost
//! half of what a failure would. 0 with nothing checked.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use meshguard_schemas::{InteractionKind, Outcome};

use crate::tables::FastMap;

pub mod plan;

/// The largest tolerance accepted: one year keeps `ts ± tolerance` far from overflowing.
const MAX_TOLERANCE_S: u64 = 365 * 86_400;

/// Cross-check settings (`[cross_check]` in the configuration file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrossCheckConfig {
    /// How many of the device's latest interactions are checked (contract default: 10).
    pub window: u32,
    /// How many must be verified to confirm (contract default: 5).
    pub min_verified: u32,
    /// How far apart a peer's entry may be from the interaction, seconds (contract default: 120).
    pub tolerance_s: u64,
    /// How long interactions are kept, days of event time.
    pub retention_days: u64,
    /// The longest an identity request is held, in ms of processing time, waiting for the
    /// interactions topic to reach its `ts` (see [`HeldRequest`]); 0 answers every request with
    /// the interactions read when it is fetched.
    pub max_wait_ms: u64,
}

impl Default for CrossCheckConfig {
    fn default() -> Self {
        Self { window: 10, min_verified: 5, tolerance_s: 120, retention_days: 7, max_wait_ms: 1_000 }
    }
}

impl CrossCheckConfig {
    /// Checks every value, naming the field of the first bad one.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (field, v) in [("cross_check.window", u64::from(self.window)), ("cross_check.retention_days", self.retention_days)] {
            if v == 0 {
                return Err((field.to_owned(), "must be at least 1".to_owned()));
            }
        }
        if self.tolerance_s > MAX_TOLERANCE_S {
            return Err(("cross_check.tolerance_s".to_owned(), format!("must be at most {MAX_TOLERANCE_S} (one year)")));
        }
        Ok(())
    }
}

/// One entry of a device's interaction table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// When the interaction began.
    pub ts: i64,
    /// The other device.
    pub peer: Uuid,
    /// What kind of interaction.
    pub kind: InteractionKind,
    /// The entry id (a re-delivered entry counts once).
    pub id: Uuid,
}

/// Every reporter's interaction table, oldest first.
///
/// Each table is shared (`Arc`) between the store and its copies: the engine's store is shared
/// with the checkpoint being written, and the first change after the cut copies the map of
/// pointers, not the entries; a table is copied only when it changes while a copy holds it.
/// Serialized as the tables themselves.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InteractionStore {
    #[serde(with = "crate::tables::shared_values")]
    tables: FastMap<Uuid, Arc<Vec<Entry>>>,
    /// Newest entry time seen, for retention.
    newest: i64,
    /// Newest entry time seen per partition of the interactions topic: its watermark.
    progress: FastMap<i32, i64>,
    /// Partitions of the interactions topic (0: unknown, count the ones seen).
    partitions: u32,
}

/// An identity request read but not answered yet: requests are held until the interactions topic
/// has reached their `ts` on every partition (an entry at or after it read from each: Kafka keeps
/// order within a partition, so what the platform published before that entry is in the tables),
/// or for `max_wait_ms` of processing time when a partition lags or is quiet. Held requests live
/// in the state of their identity-requests partition, so a checkpoint that calls them consumed
/// also holds them, and they move with their partition.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldRequest {
    /// The request id.
    pub id: Uuid,
    /// The device.
    pub device: Uuid,
    /// The request's time.
    pub t: i64,
    /// The request's `window` override.
    pub window: Option<u32>,
    /// The request's `min_verified` override.
    pub min_verified: Option<u32>,
    /// Its identity-requests partition.
    pub partition: i32,
    /// When it was read (processing time, ms).
    pub arrived_ms: i64,
}

/// The answer to one identity request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The outcome.
    pub outcome: Outcome,
    /// Interactions considered.
    pub checked: u32,
    /// Of those, confirmed by the peer's table.
    pub verified: u32,
    /// Of those, with an unavailable peer.
    pub unavailable: u32,
    /// 0..1.
    pub confidence: f64,
    /// The `min_verified` applied.
    pub min_verified: u32,
    /// The `window` applied.
    pub window: u32,
}

/// Serde for a store shared by reference count (the checkpoint's hold on the engine's store).
pub mod shared {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes the shared value.
    pub fn serialize<S: Serializer, T: Serialize>(v: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
        T::serialize(v, s)
    }

    /// Reads a value to share.
    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Arc<T>, D::Error> {
        T::deserialize(d).map(Arc::new)
    }
}

/// The counts behind a verdict, before the outcome is decided: what the DataFusion plan computes
/// per request, and what the reference [`InteractionStore::judge`] computes too.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Interactions considered.
    pub checked: u32,
    /// Of those, confirmed by the peer's table.
    pub verified: u32,
    /// Of those, with an unavailable peer.
    pub unavailable: u32,
    /// Summed weight of the checked interactions (see [`weight`]).
    pub weight_checked: f64,
    /// Summed weight of the verified ones.
    pub weight_verified: f64,
}

impl Tally {
    /// The outcome and confidence, by the contract's rule and the documented formula.
    pub fn verdict(&self, window: u32, min_verified: u32) -> Verdict {
        let Tally { checked, verified, unavailable, weight_checked, weight_verified } = *self;
        let outcome = if verified >= min_verified {
            Outcome::Confirmed
        } else if checked >= min_verified && verified + unavailable < min_verified {
            Outcome::Denied
        } else {
            Outcome::InsufficientEvidence
        };
        let confidence = if checked == 0 || weight_checked <= 0.0 {
            0.0
        } else {
            (weight_verified / weight_checked) * (1.0 - f64::from(unavailable) / (2.0 * f64::from(checked)))
        };
        Verdict { outcome, checked, verified, unavailable, confidence: confidence.clamp(0.0, 1.0), min_verified, window }
    }
}

impl CrossCheckConfig {
    /// The tolerance in milliseconds.
    pub fn tolerance_ms(&self) -> i64 {
        i64::try_from(self.tolerance_s.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

impl InteractionStore {
    /// Adds one entry to `reporter`'s table (a repeat of an entry already held is ignored). Each
    /// table is kept ordered by `(ts, id)`, so "the latest `window`" is one well-defined slice.
    pub fn insert(&mut self, reporter: Uuid, e: Entry) {
        let table = self.tables.entry(reporter).or_default();
        let at = table.partition_point(|x| (x.ts, x.id) < (e.ts, e.id));
        if table.get(at).is_some_and(|x| x.ts == e.ts && x.id == e.id) {
            return;
        }
        Arc::make_mut(table).insert(at, e);
        self.newest = self.newest.max(e.ts);
    }

    /// Notes that partition `partition` of the interactions topic delivered an entry at `ts`.
    pub fn advance(&mut self, partition: i32, ts: i64) {
        let p = self.progress.entry(partition).or_insert(ts);
        *p = (*p).max(ts);
    }

    /// Sets the number of partitions of the interactions topic (until then, the watermark is
    /// taken over the partitions seen).
    pub fn set_partitions(&mut self, partitions: u32) {
        self.partitions = partitions;
    }

    /// The interactions topic's watermark: the oldest of its partitions' newest entry times;
    /// `None` until every partition has delivered one.
    pub fn watermark(&self) -> Option<i64> {
        if self.progress.is_empty() || (self.progress.len() as u64) < u64::from(self.partitions) {
            return None;
        }
        self.progress.values().copied().min()
    }

    /// Whether `r` can be answered now: the watermark reached its time, or it waited long enough.
    pub fn ready(&self, cfg: &CrossCheckConfig, r: &HeldRequest, now_ms: i64) -> bool {
        self.watermark().is_some_and(|w| w >= r.t)
            || now_ms.saturating_sub(r.arrived_ms) >= i64::try_from(cfg.max_wait_ms).unwrap_or(i64::MAX)
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.tables.values().map(|t| t.len()).sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Newest entry time seen (0 before the first).
    pub fn newest(&self) -> i64 {
        self.newest
    }

    /// One reporter's table, ordered by `(ts, id)` (empty when it reported nothing).
    pub fn table(&self, reporter: &Uuid) -> &[Entry] {
        self.tables.get(reporter).map_or(&[], |t| t.as_slice())
    }

    /// Drops entries older than the retention behind the newest entry.
    pub fn prune(&mut self, retention_ms: i64) {
        let horizon = self.newest - retention_ms;
        self.tables.retain(|_, t| {
            let old = t.partition_point(|e| e.ts < horizon);
            if old == t.len() {
                return false;
            }
            if old > 0 {
                Arc::make_mut(t).drain(..old);
            }
            true
        });
    }

    /// Judges an identity request on `device` at `t`, with the request's overrides.
    ///
    /// This is the reference implementation, in plain Rust: production answers requests with the
    /// DataFusion plan of [`plan::CrossCheckPlan`], and a property test holds the two to the same
    /// answers. The matching rule (one peer entry confirms at most one interaction) is a maximum
    /// matching: the checked interactions are taken oldest first, and each takes the earliest
    /// unused matching entry in its range. The ranges all have the same width (the tolerance,
    /// clipped at `t`), so taking them by their end and giving each the earliest free entry
    /// confirms as many interactions as any assignment could.
    pub fn judge(&self, cfg: &CrossCheckConfig, device: &Uuid, t: i64, window: Option<u32>, min_verified: Option<u32>) -> Verdict {
        let window = window.unwrap_or(cfg.window);
        let min_verified = min_verified.unwrap_or(cfg.min_verified);
        self.tally(cfg.tolerance_ms(), device, t, window).verdict(window, min_verified)
    }

    /// The counts of [`InteractionStore::judge`].
    pub fn tally(&self, tol: i64, device: &Uuid, t: i64, window: u32) -> Tally {
        let own = self.table(device);
        let before = own.partition_point(|e| e.ts < t);
        let checked = &own[before.saturating_sub(window as usize)..before];
        // Peer entries already used to confirm an interaction, by (peer, index in its table).
        let mut used: Vec<(Uuid, usize)> = Vec::new();
        let mut tally = Tally { checked: checked.len() as u32, ..Tally::default() };
        for i in checked {
            let w = weight(i.kind, t - i.ts);
            tally.weight_checked += w;
            let peer_table = self.table(&i.peer);
            let upto = peer_table.partition_point(|e| e.ts <= t);
            let lo = peer_table[..upto].partition_point(|e| e.ts < i.ts.saturating_sub(tol));
            let hi = peer_table[..upto].partition_point(|e| e.ts <= i.ts.saturating_add(tol));
            let earliest = (lo..hi).find(|&k| {
                let e = &peer_table[k];
                e.peer == *device && e.kind == i.kind && !used.contains(&(i.peer, k))
            });
            if let Some(k) = earliest {
                used.push((i.peer, k));
                tally.verified += 1;
                tally.weight_verified += w;
            } else if lo == upto {
                // Nothing reported from the interaction's time minus the tolerance up to t.
                tally.unavailable += 1;
            }
        }
        tally
    }
}

/// The weight of one checked interaction in the confidence: its kind's weight times its
/// recency (halved for every 7 days of `age_ms` before the request).
pub fn weight(kind: InteractionKind, age_ms: i64) -> f64 {
    kind_weight(kind) * 0.5f64.powf(age_ms.max(0) as f64 / (7.0 * 86_400_000.0))
}

/// How much an interaction of `kind` says about identity.
fn kind_weight(kind: InteractionKind) -> f64 {
    match kind {
        InteractionKind::Proximity => 1.0,
        InteractionKind::Call => 0.9,
        InteractionKind::Sms | InteractionKind::Mms => 0.8,
        InteractionKind::Message => 0.7,
        InteractionKind::Email => 0.6,
    }
}

#[cfg(test)]
mod tests;
