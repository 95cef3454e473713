//! Training: features → clusters (linfa k-means) → per-key verdicts. See the module docs of
//! [`crate::timing_model`] for the rule.

use std::path::Path;
use std::time::{Duration, Instant};

use linfa::DatasetBase;
use linfa::traits::{Fit, Predict};
use linfa_clustering::KMeans;
use ndarray::{Array2, ArrayView1};

use super::features::{Features, KeyFeatures, extract};
use super::store::ModelError;
use super::{BINS, Key, KeyModel, Rule, TimingModel};
use crate::tables::FastMap;
use crate::timing::TimingConfig;

/// Most keys the k-means is fitted on; the others are assigned to the nearest centroid. Fitting is
/// linear in the keys, so a bound keeps a training of a large archive to seconds; a sample of
/// this size holds every schedule shape common enough to matter.
const FIT_SAMPLE: usize = 10_000;
/// k-means restarts (best inertia kept) and iteration bound.
const KMEANS_RUNS: usize = 2;
const KMEANS_ITERATIONS: u64 = 100;

/// What a training did.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The model.
    pub model: TimingModel,
    /// Keys (pairs and requesters) with attempts in the horizon.
    pub keys_seen: usize,
    /// Parquet files read.
    pub files: usize,
    /// Time spent reading and aggregating (Polars).
    pub features_time: Duration,
    /// Time spent clustering and scoring.
    pub fit_time: Duration,
}

/// Trains from the archive under `archive_dir` on the `horizon_days` before `until_ms`.
pub fn train_from_archive(archive_dir: &Path, cfg: &TimingConfig, until_ms: i64) -> Result<TrainOutcome, ModelError> {
    let from_ms = until_ms.saturating_sub(i64::from(cfg.horizon_days) * 86_400_000);
    let started = Instant::now();
    let features = extract(archive_dir, from_ms, until_ms)?;
    let features_time = started.elapsed();
    let started = Instant::now();
    let (keys_seen, files) = (features.keys.len(), features.files);
    let model = train(&features, cfg, from_ms, until_ms)?;
    Ok(TrainOutcome { model, keys_seen, files, features_time, fit_time: started.elapsed() })
}

/// Whether `f` has the history the contract asks for, at `until_ms`.
pub fn qualifies(f: &KeyFeatures, cfg: &TimingConfig, until_ms: i64) -> bool {
    f.attempts >= cfg.min_attempts && until_ms - f.first_ms >= i64::from(cfg.min_days) * 86_400_000
}

/// Fits the model of `features` (a horizon `[from_ms, until_ms)`). Deterministic: the same
/// features and configuration give the same model.
pub fn train(features: &Features, cfg: &TimingConfig, from_ms: i64, until_ms: i64) -> Result<TimingModel, ModelError> {
    // Qualifying keys in a fixed order, so that clustering and its sample do not depend on hashing.
    let mut keys: Vec<(&Key, &KeyFeatures)> = features.keys.iter().filter(|(_, f)| qualifies(f, cfg, until_ms)).collect();
    keys.sort_unstable_by_key(|(k, _)| **k);
    if keys.is_empty() {
        return Ok(TimingModel::new(until_ms, from_ms, 0, features.attempts, FastMap::default()));
    }
    // √shares: Euclidean distance between them is the Hellinger distance between profiles.
    let mut x = Array2::<f64>::zeros((keys.len(), BINS));
    for (i, (_, f)) in keys.iter().enumerate() {
        let n = f64::from(f.attempts.max(1));
        for b in 0..BINS {
            x[(i, b)] = (f64::from(f.profile[b]) / n).sqrt();
        }
    }
    // Centroids are fitted on the well-observed keys only (twice the attempts a schedule needs),
    // whose profiles are reliable; every key, sparse ones included, then takes the nearest.
    let well_observed: Vec<usize> = (0..keys.len()).filter(|&i| keys[i].1.attempts >= cfg.min_attempts.saturating_mul(2)).collect();
    let fit_rows: Vec<usize> = if well_observed.is_empty() { (0..keys.len()).collect() } else { well_observed };
    let step = fit_rows.len().div_ceil(FIT_SAMPLE);
    let sample = Array2::from_shape_fn((fit_rows.len().div_ceil(step), BINS), |(i, b)| x[(fit_rows[i * step], b)]);
    let k = (cfg.clusters as usize).min(distinct_rows(&sample));
    let (centroids, assignment) = if k <= 1 {
        (
            sample.mean_axis(ndarray::Axis(0)).map(|m| m.insert_axis(ndarray::Axis(0))).unwrap_or_else(|| Array2::zeros((1, BINS))),
            vec![0; keys.len()],
        )
    } else {
        let model = KMeans::params(k)
            .n_runs(KMEANS_RUNS)
            .max_n_iterations(KMEANS_ITERATIONS)
            .tolerance(1e-6)
            .fit(&DatasetBase::from(sample))
            .map_err(|e| ModelError::Fit { reason: e.to_string() })?;
        let assignment = model.predict(&x).to_vec();
        (model.centroids().clone(), assignment)
    };
    // Centroids back to shares (squares, renormalised).
    let priors: Vec<[f64; BINS]> = centroids.rows().into_iter().map(to_shares).collect();

    let mut out: FastMap<Key, KeyModel> = FastMap::default();
    out.reserve(keys.len());
    for ((key, f), cluster) in keys.iter().zip(assignment) {
        let prior = priors.get(cluster).copied().unwrap_or([1.0 / BINS as f64; BINS]);
        out.insert(**key, key_model(f, &prior, cluster as u16, cfg));
    }
    Ok(TimingModel::new(until_ms, from_ms, centroids.nrows() as u32, features.attempts, out))
}

/// Distinct rows of `x`, up to a bound (k-means needs at least `k` distinct points).
fn distinct_rows(x: &Array2<f64>) -> usize {
    let mut seen = hashbrown::HashSet::new();
    for row in x.rows() {
        seen.insert(row.iter().map(|v| v.to_bits()).collect::<Vec<u64>>());
        if seen.len() > 1_024 {
            break;
        }
    }
    seen.len()
}

fn to_shares(c: ArrayView1<'_, f64>) -> [f64; BINS] {
    let mut out = [0.0; BINS];
    let mut total = 0.0;
    for (o, v) in out.iter_mut().zip(c.iter()) {
        *o = v * v;
        total += *o;
    }
    if total > 0.0 {
        for o in &mut out {
            *o /= total;
        }
    } else {
        out = [1.0 / BINS as f64; BINS];
    }
    out
}

/// One key's verdicts from its counts and its cluster's prior (see the module docs).
pub fn key_model(f: &KeyFeatures, prior: &[f64; BINS], cluster: u16, cfg: &TimingConfig) -> KeyModel {
    let n = f64::from(f.attempts.max(1));
    let alpha = cfg.prior_weight;
    let mut smooth = [0.0; BINS];
    for b in 0..BINS {
        smooth[b] = (f64::from(f.profile[b]) + alpha * prior[b]) / (n + alpha);
    }
    let typical: f64 = smooth.iter().map(|p| p * p).sum();
    let bar = cfg.usual_ratio * typical;
    let mut usual = [0u64; 3];
    let (mut usual_count, mut covered) = (0u32, 0.0);
    for b in 0..BINS {
        if smooth[b] >= bar {
            usual[b / 64] |= 1 << (b % 64);
            usual_count += 1;
            covered += f64::from(f.profile[b]) / n;
        }
    }
    let mut hours = [0.0; 24];
    let mut days = [0.0; 7];
    for (b, p) in smooth.iter().enumerate() {
        hours[b % 24] += p;
        days[b / 24] += p;
    }
    let used_hours = (0..24).filter(|&h| hours[h] >= cfg.used_share).fold(0u32, |m, h| m | 1 << h);
    let used_days = (0..7).filter(|&d| days[d] >= cfg.used_share).fold(0u8, |m, d| m | 1 << d);
    let week = covered >= cfg.coverage && usual_count <= cfg.max_usual_hours && usual_count > 0;
    let hours_regular = used_hours.count_ones() <= cfg.max_used_hours;
    let days_regular = used_days.count_ones() <= cfg.max_used_days;
    let rule = if week {
        Rule::Week
    } else if hours_regular || days_regular {
        Rule::Marginal
    } else {
        Rule::None
    };
    let quantise = |s: f64| -> u8 { (s.clamp(0.0, 1.0) * 255.0).ceil().max(1.0) as u8 };
    let mut scores = vec![0u8; BINS];
    for b in 0..BINS {
        scores[b] = match rule {
            Rule::Week if smooth[b] < bar => quantise(1.0 - smooth[b] / bar),
            Rule::Marginal => {
                let (h, d) = (b % 24, b / 24);
                let off_hour = hours_regular && used_hours >> h & 1 == 0;
                let off_day = days_regular && used_days >> d & 1 == 0;
                let deciding = match (off_hour, off_day) {
                    (true, true) => Some(hours[h].min(days[d])),
                    (true, false) => Some(hours[h]),
                    (false, true) => Some(days[d]),
                    (false, false) => None,
                };
                deciding.map_or(0, |share| quantise(1.0 - share / cfg.used_share))
            }
            _ => 0,
        };
    }
    if scores.iter().all(|&s| s == 0) {
        scores = Vec::new();
    }
    let iqr = (f.gap_p75_s - f.gap_p25_s).max(0.0);
    KeyModel {
        usual,
        used_hours,
        used_days,
        rule,
        attempts: f.attempts,
        days: f.days.min(u32::from(u16::MAX)) as u16,
        cluster,
        gap_median_s: f.gap_median_s as f32,
        gap_iqr_s: iqr as f32,
        scores,
    }
}
