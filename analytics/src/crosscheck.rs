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

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use meshguard_schemas::{InteractionKind, Outcome};

use crate::tables::FastMap;

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
}

impl Default for CrossCheckConfig {
    fn default() -> Self {
        Self { window: 10, min_verified: 5, tolerance_s: 120, retention_days: 7 }
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InteractionStore {
    tables: FastMap<Uuid, Vec<Entry>>,
    /// Newest entry time seen, for retention.
    newest: i64,
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

impl InteractionStore {
    /// Adds one entry to `reporter`'s table (a repeat of an entry already held is ignored).
    pub fn insert(&mut self, reporter: Uuid, e: Entry) {
        let table = self.tables.entry(reporter).or_default();
        let at = table.partition_point(|x| x.ts <= e.ts);
        if table[..at].iter().rev().take_while(|x| x.ts == e.ts).any(|x| x.id == e.id) {
            return;
        }
        table.insert(at, e);
        self.newest = self.newest.max(e.ts);
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.tables.values().map(Vec::len).sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Drops entries older than the retention behind the newest entry.
    pub fn prune(&mut self, retention_ms: i64) {
        let horizon = self.newest - retention_ms;
        self.tables.retain(|_, t| {
            let old = t.partition_point(|e| e.ts < horizon);
            t.drain(..old);
            !t.is_empty()
        });
    }

    /// Judges an identity request on `device` at `t`, with the request's overrides.
    pub fn judge(&self, cfg: &CrossCheckConfig, device: &Uuid, t: i64, window: Option<u32>, min_verified: Option<u32>) -> Verdict {
        let window = window.unwrap_or(cfg.window);
        let min_verified = min_verified.unwrap_or(cfg.min_verified);
        let tol = (cfg.tolerance_s * 1000) as i64;
        let empty = Vec::new();
        let own = self.tables.get(device).unwrap_or(&empty);
        let before = own.partition_point(|e| e.ts < t);
        let checked: Vec<&Entry> = own[..before].iter().rev().take(window as usize).collect();
        // Peer entries already used to confirm an interaction, by (peer, index in its table).
        let mut used: Vec<(Uuid, usize)> = Vec::new();
        let (mut verified, mut unavailable) = (0u32, 0u32);
        let (mut w_checked, mut w_verified) = (0.0f64, 0.0f64);
        for i in &checked {
            let weight = kind_weight(i.kind) * 0.5f64.powf((t - i.ts).max(0) as f64 / (7.0 * 86_400_000.0));
            w_checked += weight;
            let peer_table = self.tables.get(&i.peer).unwrap_or(&empty);
            let upto = peer_table.partition_point(|e| e.ts <= t);
            let lo = peer_table[..upto].partition_point(|e| e.ts < i.ts - tol);
            let hi = peer_table[..upto].partition_point(|e| e.ts <= i.ts + tol);
            // The closest unused entry about the device, of the same kind.
            let best = (lo..hi)
                .filter(|&k| {
                    let e = &peer_table[k];
                    e.peer == *device && e.kind == i.kind && !used.contains(&(i.peer, k))
                })
                .min_by_key(|&k| (peer_table[k].ts - i.ts).abs());
            if let Some(k) = best {
                used.push((i.peer, k));
                verified += 1;
                w_verified += weight;
            } else if lo == upto {
                // Nothing reported from the interaction's time minus the tolerance up to t.
                unavailable += 1;
            }
        }
        let checked_n = checked.len() as u32;
        let outcome = if verified >= min_verified {
            Outcome::Confirmed
        } else if checked_n >= min_verified && verified + unavailable < min_verified {
            Outcome::Denied
        } else {
            Outcome::InsufficientEvidence
        };
        let confidence = if checked_n == 0 || w_checked <= 0.0 {
            0.0
        } else {
            (w_verified / w_checked) * (1.0 - f64::from(unavailable) / (2.0 * f64::from(checked_n)))
        };
        Verdict { outcome, checked: checked_n, verified, unavailable, confidence: confidence.clamp(0.0, 1.0), min_verified, window }
    }
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
mod tests {
    use super::*;

    const T: i64 = 1_795_539_600_000;
    const S: i64 = 1_000;

    fn u(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// `device` met each peer `p` in `1..=n` at `T − (p + 2) min`, and each peer reports it back
    /// `skew` later.
    fn store(n: u128, skew: i64, report_back: impl Fn(u128) -> bool) -> InteractionStore {
        let mut s = InteractionStore::default();
        let d = u(100);
        for p in 1..=n {
            let ts = T - (p as i64 + 2) * 60 * S;
            s.insert(d, Entry { ts, peer: u(p), kind: InteractionKind::Proximity, id: u(1000 + p) });
            if report_back(p) {
                s.insert(u(p), Entry { ts: ts + skew, peer: d, kind: InteractionKind::Proximity, id: u(2000 + p) });
            }
        }
        s
    }

    #[test]
    fn a_genuine_device_is_confirmed_and_an_impostor_denied() {
        let cfg = CrossCheckConfig::default();
        let v = store(10, 30 * S, |_| true).judge(&cfg, &u(100), T, None, None);
        assert_eq!((v.outcome, v.checked, v.verified, v.unavailable), (Outcome::Confirmed, 10, 10, 0));
        assert!(v.confidence > 0.99);
        // The peers are active (they reported other things) but none confirms: denied.
        let mut s = store(10, 0, |_| false);
        for p in 1..=10u128 {
            s.insert(u(p), Entry { ts: T - 10 * S, peer: u(555), kind: InteractionKind::Call, id: u(3000 + p) });
        }
        let v = s.judge(&cfg, &u(100), T, None, None);
        assert_eq!((v.outcome, v.verified, v.unavailable), (Outcome::Denied, 0, 0));
        assert_eq!(v.confidence, 0.0);
    }

    #[test]
    fn silent_peers_are_unavailable_not_failed() {
        let cfg = CrossCheckConfig::default();
        // Four confirm, six have reported nothing at all: 4 + 6 ≥ 5, not denied.
        let v = store(10, 0, |p| p <= 4).judge(&cfg, &u(100), T, None, None);
        assert_eq!((v.outcome, v.verified, v.unavailable), (Outcome::InsufficientEvidence, 4, 6));
        // Fewer interactions than min_verified: insufficient evidence whatever they say.
        let v = store(3, 0, |_| true).judge(&cfg, &u(100), T, None, None);
        assert_eq!((v.outcome, v.checked), (Outcome::InsufficientEvidence, 3));
        // Per-request overrides.
        let v = store(3, 0, |_| true).judge(&cfg, &u(100), T, Some(2), Some(2));
        assert_eq!((v.outcome, v.checked, v.verified), (Outcome::Confirmed, 2, 2));
    }

    #[test]
    fn clock_skew_kind_duplicates_and_time_limits() {
        let cfg = CrossCheckConfig::default();
        assert_eq!(store(5, 120 * S, |_| true).judge(&cfg, &u(100), T, None, None).verified, 5, "120 s is within");
        let far = store(5, 121 * S, |_| true).judge(&cfg, &u(100), T, None, None);
        assert_eq!((far.verified, far.unavailable), (0, 0), "121 s is not; the peers did report, so they are not unavailable");
        // A different kind does not confirm.
        let mut s = store(1, 0, |_| false);
        s.insert(u(1), Entry { ts: T - 60 * S, peer: u(100), kind: InteractionKind::Sms, id: u(9) });
        assert_eq!(s.judge(&cfg, &u(100), T, Some(1), Some(1)).verified, 0);
        // The same entry twice counts once; one peer entry confirms one interaction only.
        let mut s = InteractionStore::default();
        let d = u(100);
        for id in [1, 1, 2] {
            s.insert(d, Entry { ts: T - 60 * S, peer: u(1), kind: InteractionKind::Call, id: u(id) });
        }
        s.insert(u(1), Entry { ts: T - 60 * S, peer: d, kind: InteractionKind::Call, id: u(7) });
        let v = s.judge(&cfg, &d, T, None, Some(1));
        assert_eq!((v.checked, v.verified), (2, 1));
        // Peer entries after the request do not count, nor the device's own at or after it.
        let mut s = store(5, 0, |_| false);
        for p in 1..=5u128 {
            s.insert(u(p), Entry { ts: T + S, peer: u(100), kind: InteractionKind::Proximity, id: u(4000 + p) });
        }
        let v = s.judge(&cfg, &u(100), T, None, None);
        assert_eq!((v.verified, v.unavailable), (0, 5), "nothing at or before t");
    }
}
