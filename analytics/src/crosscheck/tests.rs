//! The reference judge's cases, each also answered by the DataFusion plan, and a property test
//! that the plan and the reference agree on random stores and requests.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::plan::{CrossCheckPlan, PlanRequest};
use super::*;

const T: i64 = 1_795_539_600_000;
const S: i64 = 1_000;

fn u(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

/// The reference's verdict, after checking that the plan gives the same.
fn judge(s: &InteractionStore, cfg: &CrossCheckConfig, device: &Uuid, t: i64, window: Option<u32>, min_verified: Option<u32>) -> Verdict {
    let reference = s.judge(cfg, device, t, window, min_verified);
    let plan = CrossCheckPlan::new().unwrap();
    let request = PlanRequest { device: *device, t, window: reference.window };
    let tally = plan.tallies(s, cfg.tolerance_ms(), &[request]).unwrap()[0];
    let v = tally.verdict(reference.window, reference.min_verified);
    assert_eq!(
        (v.outcome, v.checked, v.verified, v.unavailable),
        (reference.outcome, reference.checked, reference.verified, reference.unavailable)
    );
    assert!((v.confidence - reference.confidence).abs() < 1e-9, "{} vs {}", v.confidence, reference.confidence);
    reference
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

/// A copy of the store (as the checkpoint being written holds) shares every table: a change
/// after it copies the changed table only, and neither side sees the other's change. Written as
/// the tables themselves (the format of a map of `Vec`s).
#[test]
fn copies_of_the_store_share_the_tables_neither_changes() {
    let mut s = store(5, 30 * S, |_| true);
    let copy = s.clone();
    let shared = |a: &InteractionStore, b: &InteractionStore, r: u128| Arc::ptr_eq(&a.tables[&u(r)], &b.tables[&u(r)]);
    assert!((1..=5).chain([100]).all(|r| shared(&s, &copy, r)));
    s.insert(u(2), Entry { ts: T, peer: u(100), kind: InteractionKind::Call, id: u(9_000) });
    // A re-delivered entry changes nothing, and copies nothing.
    s.insert(u(3), *copy.table(&u(3)).first().unwrap());
    assert!(!shared(&s, &copy, 2) && [1, 3, 4, 5, 100].into_iter().all(|r| shared(&s, &copy, r)));
    assert_eq!((s.table(&u(2)).len(), copy.table(&u(2)).len()), (2, 1));
    // A prune copies only the tables it cuts.
    // Six minutes and 24 s back from the newest (T): the device's entry with peer 5 (7 min) and
    // peer 5's own (6.5 min) go.
    s.prune(6 * 60 * S + 24 * S);
    assert_eq!(copy.len(), 10);
    assert!(shared(&s, &copy, 1) && !s.tables.contains_key(&u(5)));
    #[derive(Serialize)]
    struct Plain {
        tables: FastMap<Uuid, Vec<Entry>>,
        newest: i64,
        progress: FastMap<i32, i64>,
        partitions: u32,
    }
    // One table: a map's order is its hasher's.
    let one = store(1, 0, |_| false);
    let plain = Plain {
        tables: one.tables.iter().map(|(k, v)| (*k, v.to_vec())).collect(),
        newest: one.newest,
        progress: one.progress.clone(),
        partitions: one.partitions,
    };
    assert_eq!(postcard::to_allocvec(&one).unwrap(), postcard::to_allocvec(&plain).unwrap());
}

#[test]
fn a_genuine_device_is_confirmed_and_an_impostor_denied() {
    let cfg = CrossCheckConfig::default();
    let v = judge(&store(10, 30 * S, |_| true), &cfg, &u(100), T, None, None);
    assert_eq!((v.outcome, v.checked, v.verified, v.unavailable), (Outcome::Confirmed, 10, 10, 0));
    assert!(v.confidence > 0.99);
    // The peers are active (they reported other things) but none confirms: denied.
    let mut s = store(10, 0, |_| false);
    for p in 1..=10u128 {
        s.insert(u(p), Entry { ts: T - 10 * S, peer: u(555), kind: InteractionKind::Call, id: u(3000 + p) });
    }
    let v = judge(&s, &cfg, &u(100), T, None, None);
    assert_eq!((v.outcome, v.verified, v.unavailable), (Outcome::Denied, 0, 0));
    assert_eq!(v.confidence, 0.0);
}

#[test]
fn silent_peers_are_unavailable_not_failed() {
    let cfg = CrossCheckConfig::default();
    // Four confirm, six have reported nothing at all: 4 + 6 ≥ 5, not denied.
    let v = judge(&store(10, 0, |p| p <= 4), &cfg, &u(100), T, None, None);
    assert_eq!((v.outcome, v.verified, v.unavailable), (Outcome::InsufficientEvidence, 4, 6));
    // Fewer interactions than min_verified: insufficient evidence whatever they say.
    let v = judge(&store(3, 0, |_| true), &cfg, &u(100), T, None, None);
    assert_eq!((v.outcome, v.checked), (Outcome::InsufficientEvidence, 3));
    // Per-request overrides.
    let v = judge(&store(3, 0, |_| true), &cfg, &u(100), T, Some(2), Some(2));
    assert_eq!((v.outcome, v.checked, v.verified), (Outcome::Confirmed, 2, 2));
}

#[test]
fn clock_skew_kind_duplicates_and_time_limits() {
    let cfg = CrossCheckConfig::default();
    assert_eq!(judge(&store(5, 120 * S, |_| true), &cfg, &u(100), T, None, None).verified, 5, "120 s is within");
    let far = judge(&store(5, 121 * S, |_| true), &cfg, &u(100), T, None, None);
    assert_eq!((far.verified, far.unavailable), (0, 0), "121 s is not; the peers did report, so they are not unavailable");
    // A different kind does not confirm.
    let mut s = store(1, 0, |_| false);
    s.insert(u(1), Entry { ts: T - 60 * S, peer: u(100), kind: InteractionKind::Sms, id: u(9) });
    assert_eq!(judge(&s, &cfg, &u(100), T, Some(1), Some(1)).verified, 0);
    // The same entry twice counts once; one peer entry confirms one interaction only.
    let mut s = InteractionStore::default();
    let d = u(100);
    for id in [1, 1, 2] {
        s.insert(d, Entry { ts: T - 60 * S, peer: u(1), kind: InteractionKind::Call, id: u(id) });
    }
    s.insert(u(1), Entry { ts: T - 60 * S, peer: d, kind: InteractionKind::Call, id: u(7) });
    let v = judge(&s, &cfg, &d, T, None, Some(1));
    assert_eq!((v.checked, v.verified), (2, 1));
    // Peer entries after the request do not count, nor the device's own at or after it.
    let mut s = store(5, 0, |_| false);
    for p in 1..=5u128 {
        s.insert(u(p), Entry { ts: T + S, peer: u(100), kind: InteractionKind::Proximity, id: u(4000 + p) });
    }
    let v = judge(&s, &cfg, &u(100), T, None, None);
    assert_eq!((v.verified, v.unavailable), (0, 5), "nothing at or before t");
}

#[test]
fn one_peer_entry_confirms_one_interaction_and_as_many_as_can_be() {
    let cfg = CrossCheckConfig::default();
    let d = u(100);
    // Interactions at 0 s and 200 s with one peer; its entries at 100 s and 300 s. Taking the
    // closest entry for the newest interaction first could spend 100 s on it and leave the older
    // one nothing; the matching confirms both.
    let mut s = InteractionStore::default();
    for (n, ts) in [(1, 0), (2, 200)] {
        s.insert(d, Entry { ts: T - 3_600 * S + ts * S, peer: u(1), kind: InteractionKind::Call, id: u(n) });
    }
    for (n, ts) in [(3, 100), (4, 300)] {
        s.insert(u(1), Entry { ts: T - 3_600 * S + ts * S, peer: d, kind: InteractionKind::Call, id: u(n) });
    }
    let v = judge(&s, &cfg, &d, T, None, Some(2));
    assert_eq!((v.outcome, v.checked, v.verified), (Outcome::Confirmed, 2, 2));
    // A duplicated interaction (two ids, same time) and one peer entry: one verified.
    let mut s = InteractionStore::default();
    for n in [1, 2] {
        s.insert(d, Entry { ts: T - 60 * S, peer: u(1), kind: InteractionKind::Sms, id: u(n) });
    }
    s.insert(u(1), Entry { ts: T - 50 * S, peer: d, kind: InteractionKind::Sms, id: u(3) });
    assert_eq!(judge(&s, &cfg, &d, T, None, Some(1)).verified, 1);
}

#[test]
fn the_plan_reads_only_the_slices_a_batch_can_touch() {
    let cfg = CrossCheckConfig::default();
    let mut s = store(10, 30 * S, |_| true);
    // Unrelated reporters, and the device's own entries older than its latest ten.
    for n in 0..50u128 {
        s.insert(u(500 + n), Entry { ts: T - 60 * S, peer: u(600 + n), kind: InteractionKind::Email, id: u(5000 + n) });
        s.insert(u(100), Entry { ts: T - 86_400 * S - n as i64 * S, peer: u(700), kind: InteractionKind::Email, id: u(6000 + n) });
    }
    let plan = CrossCheckPlan::new().unwrap();
    let batch = plan.pruned(&s, cfg.tolerance_ms(), &[PlanRequest { device: u(100), t: T, window: 10 }]).unwrap();
    assert_eq!(batch.num_rows(), 20, "the device's latest ten and each peer's one entry back");
    assert_eq!(judge(&s, &cfg, &u(100), T, None, None).verified, 10);
}

/// One random entry: reporter, peer, kind, seconds after a base time, id.
fn entries() -> impl Strategy<Value = Vec<(u8, u8, u8, i64, u8)>> {
    // Few devices, kinds and ids and a coarse clock, so peers report each other back, kinds
    // differ, ids repeat (duplicates) and skews fall on the tolerance's edge.
    prop::collection::vec((0u8..6, 0u8..6, 0u8..3, 0i64..60, 0u8..40), 0..120)
}

/// One random request: device, seconds after the base time, `window` and `min_verified` overrides.
fn requests() -> impl Strategy<Value = Vec<(u8, i64, Option<u32>, Option<u32>)>> {
    prop::collection::vec((0u8..6, 0i64..70, prop::option::of(0u32..12), prop::option::of(0u32..8)), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// The DataFusion plan and the reference give the same answers on random stores, with several
    /// requests in one batch (as the engine runs them).
    #[test]
    fn the_plan_agrees_with_the_reference(entries in entries(), requests in requests(), tol_steps in 0u64..4, step_s in prop::sample::select(vec![10i64, 30, 60])) {
        let cfg = CrossCheckConfig { tolerance_s: tol_steps * 40, ..CrossCheckConfig::default() };
        let mut s = InteractionStore::default();
        for (reporter, peer, kind, at, id) in entries {
            let kind = InteractionKind::ALL[usize::from(kind)];
            s.insert(u(u128::from(reporter)), Entry { ts: T + at * step_s * S, peer: u(u128::from(peer)), kind, id: u(1_000 + u128::from(id)) });
        }
        let plan = CrossCheckPlan::new().unwrap();
        let batch: Vec<PlanRequest> = requests
            .iter()
            .map(|&(d, at, w, _)| PlanRequest { device: u(u128::from(d)), t: T + at * step_s * S, window: w.unwrap_or(cfg.window) })
            .collect();
        let tallies = plan.tallies(&s, cfg.tolerance_ms(), &batch).unwrap();
        for (r, (&(_, _, w, m), tally)) in batch.iter().zip(requests.iter().zip(tallies)) {
            let reference = s.judge(&cfg, &r.device, r.t, w, m);
            let v = tally.verdict(r.window, m.unwrap_or(cfg.min_verified));
            prop_assert_eq!((v.outcome, v.checked, v.verified, v.unavailable), (reference.outcome, reference.checked, reference.verified, reference.unavailable));
            prop_assert!((v.confidence - reference.confidence).abs() < 1e-9);
        }
    }
}
