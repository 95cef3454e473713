//! The learned half of timing anomalies: schedules trained offline from the attempt archive,
//! scored on the hot path by a lookup.
//!
//! The online model of [`crate::timing`] learns per key from the attempts one worker has seen,
//! one hour of the day and one weekday at a time. This module learns from the whole archive
//! (every worker's attempts, `[archive]`), at the finer grain of the **hour of the week** (168
//! bins, Monday 00:00 UTC first), and lets keys with little history borrow strength from keys with
//! similar schedules:
//!
//! ```text
//!  <archive.dir>/attempts/date=…/part-*.parquet
//!        │  features::extract (Polars, lazy): the date= folders of the horizon, id-deduplicated;
//!        │  per pair and per requester: attempts, distinct days, first/last attempt,
//!        ▼  168-bin hour-of-week counts, inter-arrival median and IQR
//!   KeyFeatures ── fit::train (linfa k-means over √shares of the qualifying keys) ──► TimingModel
//!        │                                                                          │
//!        ▼                                                                          ▼
//!   store::ModelStore: timing-v<N>.bin (postcard, checksummed) + timing-v<N>.json   Engine (Arc, swapped
//!   written tmp → fsync → link, newest `keep_models` kept                           between micro-batches)
//! ```
//!
//! **Who gets a schedule.** A pair (or a requester, across all its targets) qualifies when its
//! first attempt in the horizon is at least `min_days` (14) before the end of the horizon and it
//! has at least `min_attempts` (50) distinct attempts in it: the contract's threshold, read as the
//! online model reads it. Keys below it get no entry, so no verdict of their own (the engine may
//! still judge them by the online model once *it* has learned them).
//!
//! **Borrowing strength (the rule).** The hour-of-week profiles (shares, square rooted: Euclidean
//! distance between √shares is the Hellinger distance between the profiles, so no single busy hour
//! dominates) of the well-observed qualifying keys (at least twice `min_attempts`, whose profiles
//! are reliable; all qualifying keys when there are none) are clustered with k-means (`clusters`
//! clusters, fewer when there are fewer distinct profiles; fixed seed; at most 10,000 keys, evenly
//! sampled in key order), and every qualifying key takes the nearest centroid. Each key's profile is then smoothed towards its cluster's centroid `μ` as by a Dirichlet
//! prior of `prior_weight` (100) pseudo-attempts: `p̃(b) = (count(b) + α·μ(b)) / (attempts + α)`.
//! Why: a key at the threshold has 50 attempts for 168 bins, so a schedule of 30 hours of the week
//! leaves several of its own hours empty by chance; the centroid, estimated from every key of the
//! cluster, fills them, while a key with thousands of attempts is ruled by its own counts. Stray
//! attempts outside the cluster's schedule get no such help, so one 3 a.m. attempt does not make
//! 3 a.m. usual.
//!
//! **The verdict, per key and hour of the week**, computed at training time into a score table:
//! - an hour of the week is *usual* when `p̃(b) ≥ usual_ratio × Σ p̃²` (a quarter of the key's typical
//!   share: `Σ p̃²` is `1/S` for a key spread evenly over `S` hours, so the bar adapts to narrow and
//!   wide schedules alike);
//! - the key's schedule is *regular by the week* when its usual hours hold at least `coverage`
//!   (90 %) of its own attempts and number at most `max_usual_hours` (84, half the week). Then an
//!   attempt in an hour that is not usual is anomalous, with score `1 − p̃(b) / bar`;
//! - otherwise the online model's marginal rule applies, on the smoothed profile: an unused hour of
//!   the day (share below `used_share`) of a key using at most `max_used_hours` hours, or an unused
//!   weekday of one using at most `max_used_days` weekdays, with score `1 − share / used_share`.
//!   A key active around the clock on every day has no schedule to break: every score is 0.
//!
//! **Scoring** is [`TimingModel::judge`]: a hash lookup of the key and a read of one byte of its
//! score table. Nothing is fitted on the hot path; the explanation is only built for a finding.
//!
//! **Persistence** ([`store`]): versioned files `timing-v<N>.bin` (a header with a format number
//! and an FNV-1a checksum, then postcard), each with a small JSON manifest; a file that does not
//! check is refused with its path and the reason.

pub mod features;
pub mod fit;
pub mod store;

use std::sync::Arc;

use chrono::{DateTime, Datelike, Timelike};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tables::FastMap;
use crate::timing::Anomaly;

pub use features::{KeyFeatures, extract};
pub use fit::{TrainOutcome, train, train_from_archive};
pub use store::{ModelError, ModelManifest, ModelStore};

/// Hours in a week: the bins of a profile.
pub const BINS: usize = 168;

/// The hour of the week of `ts` (UTC): `weekday × 24 + hour`, Monday 00:00 = 0.
#[inline]
pub fn hour_of_week(ts: i64) -> usize {
    let hours = ts.div_euclid(3_600_000);
    let days = hours.div_euclid(24);
    // 1970-01-01 was a Thursday: (days + 3) mod 7 counts from Monday.
    ((days + 3).rem_euclid(7) * 24 + hours.rem_euclid(24)) as usize
}

/// The key of a schedule: (requester, target), or (requester, nil) for the requester's own
/// schedule across all its targets (the online model's keys too).
pub type Key = (Uuid, Uuid);

/// What the model knows of one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyModel {
    /// Usual hours of the week, bit `b` of word `b / 64`.
    pub usual: [u64; 3],
    /// Used hours of the day (bit `h`) and weekdays (bit `d`, 0 = Monday) of the smoothed profile.
    pub used_hours: u32,
    /// See `used_hours`.
    pub used_days: u8,
    /// Which rule the verdicts come from.
    pub rule: Rule,
    /// Distinct attempts in the horizon.
    pub attempts: u32,
    /// Distinct UTC days with an attempt.
    pub days: u16,
    /// The k-means cluster whose centroid smoothed the profile.
    pub cluster: u16,
    /// Median and interquartile range of the gaps between consecutive attempts, seconds.
    pub gap_median_s: f32,
    /// See `gap_median_s`.
    pub gap_iqr_s: f32,
    /// Anomaly score per hour of the week, in 255ths (0: no finding); empty when every score is 0.
    pub scores: Vec<u8>,
}

/// Which rule decides a key's verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    /// Usual hours of the week.
    Week,
    /// Used hours of the day and weekdays (the online model's rule).
    Marginal,
    /// No regular schedule: nothing is anomalous.
    None,
}

impl KeyModel {
    /// Whether hour of the week `b` is usual.
    #[inline]
    pub fn is_usual(&self, b: usize) -> bool {
        self.usual[b / 64] >> (b % 64) & 1 == 1
    }

    /// The anomaly score of an attempt in hour of the week `b`, 0 when it is not anomalous.
    #[inline]
    pub fn score(&self, b: usize) -> f64 {
        self.scores.get(b).map_or(0.0, |&s| f64::from(s) / 255.0)
    }
}

/// A trained model: every qualifying key's verdicts. Immutable once built; shared by `Arc`.
#[derive(Debug, Clone, PartialEq)]
pub struct TimingModel {
    /// Version in the models directory (0 until saved).
    pub version: u64,
    /// When it was trained (epoch ms): the end of its horizon.
    pub trained_at_ms: i64,
    /// Start of the horizon (epoch ms).
    pub horizon_start_ms: i64,
    /// Clusters of the k-means.
    pub clusters: u32,
    /// Attempts read (after deduplication).
    pub attempts: u64,
    keys: FastMap<Key, KeyModel>,
}

/// The verdict for one attempt of a key the model knows.
#[derive(Debug, Clone, Copy)]
pub struct Judged<'m> {
    /// The key's model.
    pub key: &'m KeyModel,
    /// 0 when the attempt is not anomalous.
    pub score: f64,
    /// The attempt's hour of the week.
    pub bin: usize,
}

impl TimingModel {
    /// A model of `keys`.
    pub fn new(trained_at_ms: i64, horizon_start_ms: i64, clusters: u32, attempts: u64, keys: FastMap<Key, KeyModel>) -> Self {
        Self { version: 0, trained_at_ms, horizon_start_ms, clusters, attempts, keys }
    }

    /// Keys with a schedule.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key has a schedule.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The model of one key.
    pub fn get(&self, key: &Key) -> Option<&KeyModel> {
        self.keys.get(key)
    }

    /// Every key and its model.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &KeyModel)> {
        self.keys.iter()
    }

    /// The verdict on an attempt of `key` at `ts`: `None` when the model has no schedule for the
    /// key (the caller falls back), otherwise the score of its hour of the week (0: not anomalous).
    /// A hash lookup and a byte read.
    #[inline]
    pub fn judge(&self, key: &Key, ts: i64) -> Option<Judged<'_>> {
        let key = self.keys.get(key)?;
        let bin = hour_of_week(ts);
        Some(Judged { key, score: key.score(bin), bin })
    }
}

/// The model the engine judges with: `None` until one is trained or loaded.
pub type SharedModel = Option<Arc<TimingModel>>;

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

impl Judged<'_> {
    /// "pair usually active Mon-Fri 07:00-08:00 UTC; this attempt Sun 03:12".
    pub fn explain(&self, subject: &str, ts: i64) -> String {
        match self.key.rule {
            Rule::Week => {
                let at = DateTime::from_timestamp_millis(ts).map_or_else(String::new, |t| {
                    format!("{} {:02}:{:02}", DAY_NAMES[t.weekday().num_days_from_monday() as usize], t.hour(), t.minute())
                });
                format!("{subject} usually active {} UTC; this attempt {at}", describe_week(&self.key.usual))
            }
            Rule::Marginal | Rule::None => self.as_anomaly().explain(subject, ts),
        }
    }

    /// The verdict in the online model's terms (used hours of the day and weekdays).
    pub fn as_anomaly(&self) -> Anomaly {
        Anomaly {
            score: self.score,
            hours: (0..24).filter(|h| self.key.used_hours >> h & 1 == 1).collect(),
            days: (0..7).filter(|d| self.key.used_days >> d & 1 == 1).collect(),
            at: ((self.bin % 24) as u32, (self.bin / 24) as u32),
            history: self.key.attempts,
        }
    }

    /// Usual hours of the week, as numbers 0..168.
    pub fn usual_hours_of_week(&self) -> Vec<u32> {
        (0..BINS).filter(|&b| self.key.is_usual(b)).map(|b| b as u32).collect()
    }
}

/// "Mon-Fri 07:00-09:00, Sat 10:00-11:00 and 20:00-21:00": days with the same usual hours grouped,
/// hours as half-open ranges.
pub fn describe_week(usual: &[u64; 3]) -> String {
    let day_hours =
        |d: usize| -> u32 { (0..24).filter(|h| usual[(d * 24 + h) / 64] >> ((d * 24 + h) % 64) & 1 == 1).fold(0, |m, h| m | 1 << h) };
    let hours: Vec<u32> = (0..7).map(day_hours).collect();
    let mut groups = Vec::new();
    let mut d = 0;
    while d < 7 {
        if hours[d] == 0 {
            d += 1;
            continue;
        }
        let mut e = d;
        while e + 1 < 7 && hours[e + 1] == hours[d] {
            e += 1;
        }
        let days = if e > d { format!("{}-{}", DAY_NAMES[d], DAY_NAMES[e]) } else { DAY_NAMES[d].to_owned() };
        groups.push(format!("{days} {}", describe_hours(hours[d])));
        d = e + 1;
    }
    if groups.is_empty() { "never".to_owned() } else { groups.join(", ") }
}

/// "07:00-09:00 and 20:00-21:00" from a 24-bit mask.
fn describe_hours(mask: u32) -> String {
    let mut out = Vec::new();
    let mut h = 0;
    while h < 24 {
        if mask >> h & 1 == 0 {
            h += 1;
            continue;
        }
        let mut e = h;
        while e + 1 < 24 && mask >> (e + 1) & 1 == 1 {
            e += 1;
        }
        out.push(format!("{h:02}:00-{:02}:00", e + 1));
        h = e + 1;
    }
    out.join(" and ")
}

#[cfg(test)]
mod tests;
