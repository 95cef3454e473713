//! Unit tests of training rules, scoring and persistence on synthetic features. Extraction from a
//! real Parquet archive is tested in the workspace's `tests/timing_models.rs` (it needs the
//! archive writer of `meshguard-ingest`, which depends on this crate).

use super::features::{Features, KeyFeatures};
use super::*;
use crate::timing::TimingConfig;

/// 2026-11-23 is a Monday.
const MONDAY: i64 = 1_795_392_000_000;
const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

fn uuid(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

/// Features of a key with `per_bin` attempts in each of `bins`, first attempt at `MONDAY`.
fn key(bins: &[usize], per_bin: u32) -> KeyFeatures {
    let mut profile = [0u32; BINS];
    for &b in bins {
        profile[b] = per_bin;
    }
    let attempts = profile.iter().sum();
    KeyFeatures {
        profile,
        attempts,
        days: 28,
        first_ms: MONDAY,
        last_ms: MONDAY + 27 * DAY,
        gap_median_s: 86_400.0,
        gap_p25_s: 600.0,
        gap_p75_s: 90_000.0,
    }
}

fn weekday_mornings() -> Vec<usize> {
    (0..5).flat_map(|d| [d * 24 + 7, d * 24 + 8]).collect()
}

fn features(keys: Vec<(Key, KeyFeatures)>) -> Features {
    let attempts = keys.iter().map(|(_, f)| u64::from(f.attempts)).sum();
    Features { keys: keys.into_iter().collect(), attempts, files: 1 }
}

#[test]
fn hour_of_week_counts_from_monday_midnight_utc() {
    assert_eq!(hour_of_week(MONDAY), 0);
    assert_eq!(hour_of_week(MONDAY + 7 * HOUR + 59 * 60_000), 7);
    assert_eq!(hour_of_week(MONDAY + 6 * DAY + 23 * HOUR), 167);
    assert_eq!(hour_of_week(MONDAY + 7 * DAY), 0);
    assert_eq!(hour_of_week(MONDAY - HOUR), 167, "the Sunday before");
}

#[test]
fn a_regular_pair_is_judged_by_the_hour_of_the_week_with_an_explanation() {
    let cfg = TimingConfig::default();
    let pair = (uuid(1), uuid(2));
    let model = train(&features(vec![(pair, key(&weekday_mornings(), 6))]), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
    let m = model.get(&pair).expect("the pair qualifies");
    assert_eq!(m.rule, Rule::Week);
    assert_eq!(describe_week(&m.usual), "Mon-Fri 07:00-09:00");
    let sunday_night = MONDAY + 34 * DAY + 3 * HOUR + 12 * 60_000;
    let j = model.judge(&pair, sunday_night).expect("known key");
    assert_eq!(j.score, 1.0, "never seen, not in the cluster either");
    assert_eq!(j.explain("pair", sunday_night), "pair usually active Mon-Fri 07:00-09:00 UTC; this attempt Sun 03:12");
    assert_eq!(model.judge(&pair, MONDAY + 35 * DAY + 8 * HOUR).map(|j| j.score), Some(0.0), "Monday 08:xx is usual");
    assert!(model.judge(&pair, MONDAY + 35 * DAY + 9 * HOUR).is_some_and(|j| j.score > 0.0), "Monday 09:xx is not");
    assert!(model.judge(&pair, MONDAY + 33 * DAY + 7 * HOUR).is_some_and(|j| j.score > 0.0), "07:xx on a Saturday is not");
    assert!(model.judge(&(uuid(1), uuid(3)), sunday_night).is_none(), "an unknown key has no verdict");
}

#[test]
fn a_key_below_14_days_or_50_attempts_gets_no_schedule() {
    let cfg = TimingConfig::default();
    let until = MONDAY + 28 * DAY;
    let few = key(&weekday_mornings(), 4); // 40 attempts
    let mut recent = key(&weekday_mornings(), 6);
    recent.first_ms = until - 13 * DAY;
    let mut enough = key(&weekday_mornings(), 5); // 50 attempts, 28 days
    enough.first_ms = until - 14 * DAY;
    let (a, b, c) = ((uuid(1), uuid(2)), (uuid(3), uuid(4)), (uuid(5), uuid(6)));
    let model = train(&features(vec![(a, few), (b, recent), (c, enough)]), &cfg, MONDAY, until).expect("trains");
    assert!(model.get(&a).is_none(), "40 attempts");
    assert!(model.get(&b).is_none(), "13 days");
    assert!(model.get(&c).is_some(), "50 attempts over exactly 14 days");
    assert_eq!(model.len(), 1);
}

#[test]
fn a_sparse_pair_borrows_its_clusters_hours_and_a_stray_attempt_teaches_nothing() {
    let cfg = TimingConfig::default();
    // 20 well-observed pairs active Mon-Fri 08:00-14:00 (30 hours of the week) ...
    let wide: Vec<usize> = (0..5).flat_map(|d| (8..14).map(move |h| d * 24 + h)).collect();
    let mut keys: Vec<(Key, KeyFeatures)> = (0..20).map(|i| ((uuid(100 + i), uuid(200 + i)), key(&wide, 10))).collect();
    // ... 20 others at night ...
    let night: Vec<usize> = (0..7).map(|d| d * 24 + 2).collect();
    keys.extend((0..20).map(|i| ((uuid(300 + i), uuid(400 + i)), key(&night, 20))));
    // ... and a sparse one on the wide schedule: 55 attempts, 9 of its 30 hours never seen, and
    // one stray attempt on Sunday at 22:00.
    let mut sparse = key(&wide[..21], 2);
    for &b in &wide[..13] {
        sparse.profile[b] = 3;
    }
    sparse.profile[6 * 24 + 22] = 1;
    sparse.attempts = sparse.profile.iter().sum();
    assert!(sparse.attempts >= 50);
    let target = (uuid(1), uuid(2));
    keys.push((target, sparse.clone()));
    let model = train(&features(keys.clone()), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
    let m = model.get(&target).expect("qualifies");
    assert_eq!(m.rule, Rule::Week);
    for &b in &wide {
        assert!(m.is_usual(b), "hour of the week {b} of the cluster's schedule is usual");
    }
    assert!(!m.is_usual(6 * 24 + 22), "one stray attempt does not make Sunday 22:00 usual");
    assert!(m.score(6 * 24 + 22) > 0.0, "an attempt there is anomalous (mildly: it was seen once)");
    assert!(!m.is_usual(2), "the night cluster's hours are not borrowed");

    // Without borrowing, the unseen hours would be anomalous.
    let alone = fit::key_model(&sparse, &[0.0; BINS], 0, &cfg);
    assert!(wide[21..].iter().any(|&b| alone.score(b) > 0.0), "{:?}", describe_week(&alone.usual));
}

#[test]
fn a_key_active_around_the_clock_has_no_schedule_to_break() {
    let cfg = TimingConfig::default();
    let mut f = key(&[], 0);
    let mut x: u64 = 7;
    for _ in 0..400 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        f.profile[(x >> 33) as usize % BINS] += 1;
    }
    f.attempts = 400;
    let pair = (uuid(1), uuid(2));
    let model = train(&features(vec![(pair, f)]), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
    let m = model.get(&pair).expect("qualifies");
    assert_eq!(m.rule, Rule::None);
    assert!(m.scores.is_empty());
    assert!((0..BINS as i64).all(|b| model.judge(&pair, MONDAY + b * HOUR).is_some_and(|j| j.score == 0.0)));
}

#[test]
fn weekdays_around_the_clock_fall_back_to_the_weekday_rule() {
    let cfg = TimingConfig::default();
    let all_weekdays: Vec<usize> = (0..5 * 24).collect();
    let pair = (uuid(1), uuid(2));
    let model = train(&features(vec![(pair, key(&all_weekdays, 3))]), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
    let m = model.get(&pair).expect("qualifies");
    assert_eq!(m.rule, Rule::Marginal, "120 hours of the week are too many for the week rule");
    let saturday = MONDAY + 5 * DAY + 12 * HOUR;
    let j = model.judge(&pair, saturday).expect("known");
    assert_eq!(j.score, 1.0);
    assert!(
        j.explain("pair", saturday).starts_with("pair usually active Mon-Fri 00:00-23:00 UTC; this attempt Sat 12:00"),
        "{}",
        j.explain("pair", saturday)
    );
    assert_eq!(model.judge(&pair, MONDAY + 3 * HOUR).map(|j| j.score), Some(0.0));
}

#[test]
fn training_is_deterministic() {
    let cfg = TimingConfig::default();
    let mut keys = Vec::new();
    for i in 0..60u128 {
        let shape: Vec<usize> = match i % 3 {
            0 => weekday_mornings(),
            1 => (0..7).map(|d| d * 24 + 22).collect(),
            _ => (5 * 24..7 * 24).filter(|b| b % 24 >= 10 && b % 24 < 16).collect(),
        };
        keys.push(((uuid(i), uuid(1_000 + i)), key(&shape, 6 + (i % 5) as u32)));
    }
    let a = train(&features(keys.clone()), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
    let b = train(&features(keys.into_iter().rev().collect()), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
    assert_eq!(ModelStore::encode(&a, 1), ModelStore::encode(&b, 1), "same features, same bytes, whatever the input order");
    assert!(a.clusters >= 2, "clusters: {}", a.clusters);
}

#[test]
fn models_round_trip_and_the_newest_is_loaded_and_old_ones_pruned() {
    let cfg = TimingConfig::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("models")).expect("opens");
    assert!(store.load_newest().expect("empty is fine").is_none());
    let pair = (uuid(1), uuid(2));
    let mut model = train(&features(vec![(pair, key(&weekday_mornings(), 6))]), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
    for expected in 1..=4u64 {
        let manifest = store.save(&mut model, 3).expect("saves");
        assert_eq!((manifest.version, model.version), (expected, expected));
        assert_eq!((manifest.keys, manifest.pairs, manifest.requesters), (1, 1, 0));
        assert_eq!(manifest.file, format!("timing-v{expected}.bin"));
    }
    assert_eq!(store.versions().expect("lists"), vec![2, 3, 4], "older versions pruned to 3");
    assert!(!store.dir().join("timing-v1.json").exists());
    let manifest: ModelManifest =
        serde_json::from_slice(&std::fs::read(store.dir().join("timing-v4.json")).expect("manifest")).expect("valid JSON");
    assert_eq!(manifest.trained_at, "2026-12-21T00:00:00.000Z");
    let loaded = store.load_newest().expect("loads").expect("present");
    assert_eq!(loaded, model);
    assert_eq!(loaded.version, 4);
    assert!(std::fs::read_dir(store.dir()).expect("lists").all(|e| !e.expect("entry").file_name().to_string_lossy().ends_with(".tmp")));
}

#[test]
fn a_corrupt_model_file_is_refused_with_its_path_and_reason() {
    let cfg = TimingConfig::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path()).expect("opens");
    let mut model =
        train(&features(vec![((uuid(1), uuid(2)), key(&weekday_mornings(), 6))]), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
    store.save(&mut model, 3).expect("saves");
    store.save(&mut model, 3).expect("saves");
    let path = store.path(2);
    let mut bytes = std::fs::read(&path).expect("reads");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).expect("writes");
    let err = store.load_newest().expect_err("a flipped bit is found").to_string();
    assert!(err.starts_with(&format!("model file {} refused: checksum ", path.display())), "{err}");

    std::fs::write(&path, &bytes[..40]).expect("writes");
    let err = store.load_newest().expect_err("truncated").to_string();
    assert!(err.contains("the header says") && err.contains("truncated"), "{err}");
    std::fs::write(&path, b"PAR1 not a model at all, but long enough").expect("writes");
    assert!(store.load_newest().expect_err("bad magic").to_string().ends_with("not a meshguard timing model (bad magic)"));
    assert_eq!(store.load(1).expect("the older version still loads").len(), 1);
}

mod engine {
    use std::sync::Arc;

    use meshguard_schemas::registry::RegistryRecord;
    use meshguard_schemas::{BatchDecoder, FindingKind, InputTopic};

    use super::*;
    use crate::{Engine, EngineConfig, MicroBatch, RegistryChange, RowsBatch};

    const A: &str = "a0000000-0000-4000-8000-000000000001";
    const B: &str = "b0000000-0000-4000-8000-000000000001";
    const C: &str = "c0000000-0000-4000-8000-000000000001";

    fn batch(records: &[(u32, i64, &str, &str)]) -> MicroBatch {
        let json: Vec<String> = records
            .iter()
            .map(|(n, ts, from, to)| {
                format!(
                    r#"{{"id":"00000000-0000-4000-8000-{n:012}","ts":{ts},"action":"send","from":"{from}","to":"{to}","auth":"valid"}}"#
                )
            })
            .collect();
        let slices: Vec<&[u8]> = json.iter().map(|r| r.as_bytes()).collect();
        let out = BatchDecoder::new(InputTopic::Messages).decode(&slices);
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        let registry = [A, B, C]
            .iter()
            .map(|u| RegistryChange {
                uuid: Uuid::parse_str(u).expect("uuid"),
                record: Some(Arc::new(
                    RegistryRecord::from_json(0, format!(r#"{{"uuid":"{u}","kind":"device"}}"#).as_bytes()).expect("record"),
                )),
                effective_ms: MONDAY,
            })
            .collect();
        MicroBatch {
            registry,
            messages: Some(RowsBatch { partition: vec![0; out.batch.num_rows()], batch: out.batch }),
            ..Default::default()
        }
    }

    fn u(s: &str) -> Uuid {
        Uuid::parse_str(s).expect("uuid")
    }

    /// A's pair with B and C's own schedule (as a requester) are in the model; A→C is not.
    fn model() -> Arc<TimingModel> {
        let cfg = TimingConfig::default();
        let keys = vec![((u(A), u(B)), key(&weekday_mornings(), 6)), ((u(C), Uuid::nil()), key(&weekday_mornings(), 6))];
        let mut m = train(&features(keys), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
        m.version = 7;
        Arc::new(m)
    }

    #[test]
    fn the_trained_verdict_is_used_with_the_requester_as_fallback_and_unknown_keys_give_nothing() {
        let mut e = Engine::new(EngineConfig::default());
        e.set_timing_model(Some(model()));
        let sunday = MONDAY + 34 * DAY + 3 * HOUR + 12 * 60_000;
        let monday = MONDAY + 35 * DAY + 7 * HOUR + 30 * 60_000;
        let found =
            e.process(&batch(&[(1, sunday, A, B), (2, monday, A, B), (3, sunday, C, A), (4, monday, C, B), (5, sunday, A, C)]), sunday);
        let timing: Vec<_> = found.iter().filter(|f| f.kind == FindingKind::TimingAnomaly).collect();
        assert_eq!(timing.len(), 2, "{timing:#?}");
        assert_eq!((timing[0].offender, timing[0].target, timing[0].rule.as_str()), (u(A), Some(u(B)), "timing:pair"));
        assert_eq!(timing[0].score, 1.0);
        assert_eq!(timing[0].detail["explanation"], "pair usually active Mon-Fri 07:00-09:00 UTC; this attempt Sun 03:12");
        assert_eq!(timing[0].detail["trained_model"]["version"], 7);
        assert_eq!(timing[0].detail["history"], 60);
        // C→A: no pair history anywhere, so C's own schedule decides.
        assert_eq!((timing[1].offender, timing[1].rule.as_str()), (u(C), "timing:requester"));
        assert_eq!(timing[1].detail["explanation"], "requester usually active Mon-Fri 07:00-09:00 UTC; this attempt Sun 03:12");
        // A→C: neither the pair nor A as a requester has a schedule (trained or online): nothing.
        assert!(found.iter().all(|f| f.target != Some(u(C))));

        // Without the model, the same attempts give nothing: no online history either.
        let mut e = Engine::new(EngineConfig::default());
        let found = e.process(&batch(&[(1, sunday, A, B), (3, sunday, C, A)]), sunday);
        assert!(found.iter().all(|f| f.kind != FindingKind::TimingAnomaly));
    }

    #[test]
    fn a_trained_not_anomalous_verdict_overrides_the_online_schedule() {
        // Online, A→B learns weekday mornings over 4 weeks; the trained model knows the pair as
        // active on Sundays at 03:00 too, so a Sunday 03:12 attempt is not anomalous.
        let mut e = Engine::new(EngineConfig::default());
        let mut records = Vec::new();
        let mut n = 0;
        for w in 0..4 {
            for d in 0..5 {
                for k in 0..3 {
                    n += 1;
                    records.push((n, MONDAY + (w * 7 + d) * DAY + 7 * HOUR + k * 5 * 60_000, A, B));
                }
            }
        }
        e.process(&batch(&records), MONDAY);
        let sunday = MONDAY + 34 * DAY + 3 * HOUR + 12 * 60_000;
        let found = e.process(&batch(&[(1_000, sunday, A, B)]), sunday);
        assert_eq!(found.iter().filter(|f| f.kind == FindingKind::TimingAnomaly).count(), 1, "the online schedule flags it");

        let mut bins = weekday_mornings();
        bins.push(6 * 24 + 3);
        let cfg = TimingConfig::default();
        let m = train(&features(vec![((u(A), u(B)), key(&bins, 6))]), &cfg, MONDAY, MONDAY + 28 * DAY).expect("trains");
        e.set_timing_model(Some(Arc::new(m)));
        let found = e.process(&batch(&[(1_001, sunday + 60_000, A, B)]), sunday);
        assert!(found.iter().all(|f| f.kind != FindingKind::TimingAnomaly), "{found:#?}");
    }
}
