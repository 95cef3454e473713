//! Training of the timing model: `meshguard train` (on demand) and the pipeline's background
//! trainer (`timing.train_every_s`).
//!
//! Both read the attempt archive (`archive.dir`) over the `timing.horizon_days` before now, fit the
//! model (`meshguard_analytics::timing_model`) and save it as the next version in
//! `timing.models_dir`. The background trainer runs on its own thread, never on the pipeline's:
//! the pipeline only picks a finished model up between micro-batches ([`Trainer::poll`]) and swaps
//! it into the engine, an `Arc` exchange.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use meshguard_analytics::timing::TimingConfig;
use meshguard_analytics::timing_model::{ModelManifest, ModelStore, TimingModel, train_from_archive};
use tracing::{info, warn};

/// What one training did.
#[derive(Debug)]
pub struct Trained {
    /// The saved model.
    pub model: TimingModel,
    /// Its manifest.
    pub manifest: ModelManifest,
    /// Keys with attempts in the horizon (qualifying or not).
    pub keys_seen: usize,
    /// Parquet files read.
    pub files: usize,
    /// Wall time of the whole training (read, fit, save).
    pub elapsed: Duration,
    /// Of which reading and aggregating with Polars.
    pub features: Duration,
}

/// Trains from `archive_dir` up to `until_ms` and saves into `models_dir`.
pub fn train_once(
    cfg: &TimingConfig,
    archive_dir: &std::path::Path,
    models_dir: &std::path::Path,
    until_ms: i64,
) -> anyhow::Result<Trained> {
    let started = Instant::now();
    let outcome = train_from_archive(archive_dir, cfg, until_ms).with_context(|| format!("training from {}", archive_dir.display()))?;
    let store = ModelStore::open(models_dir)?;
    let mut model = outcome.model;
    let manifest = store.save(&mut model, cfg.keep_models).with_context(|| format!("saving the model in {}", models_dir.display()))?;
    Ok(Trained {
        model,
        manifest,
        keys_seen: outcome.keys_seen,
        files: outcome.files,
        elapsed: started.elapsed(),
        features: outcome.features_time,
    })
}

/// `meshguard train`: one training, and a summary on stdout.
pub fn run(cfg: &TimingConfig, archive_dir: PathBuf, models_dir: PathBuf, until_ms: Option<i64>) -> anyhow::Result<()> {
    let until_ms = until_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let t = train_once(cfg, &archive_dir, &models_dir, until_ms)?;
    let m = &t.manifest;
    println!(
        "timing model v{} saved to {}: {} keys with a schedule ({} pairs, {} requesters) of {} seen, {} clusters, {} attempts from {} files, {} to {}, trained in {:.2} s (reading {:.2} s)",
        m.version,
        models_dir.join(&m.file).display(),
        m.keys,
        m.pairs,
        m.requesters,
        t.keys_seen,
        m.clusters,
        m.attempts,
        t.files,
        m.horizon_start,
        m.trained_at,
        t.elapsed.as_secs_f64(),
        t.features.as_secs_f64(),
    );
    Ok(())
}

/// Loads the newest model of `models_dir`, if any; a file that does not check is logged and
/// skipped (the worker then judges with the online schedules until the next training).
pub fn load_newest(models_dir: &std::path::Path) -> Option<Arc<TimingModel>> {
    let loaded = ModelStore::open(models_dir).and_then(|s| s.load_newest());
    match loaded {
        Ok(Some(model)) => {
            info!(message = "Loaded the timing model.", version = model.version, keys = model.len(), dir = %models_dir.display());
            Some(Arc::new(model))
        }
        Ok(None) => None,
        Err(e) => {
            warn!(message = "The newest timing model is unusable; judging with the online schedules until the next training.", error = %e);
            None
        }
    }
}

/// The background trainer: trains every `train_every_s` on its own thread and hands each new
/// model over a channel.
#[derive(Debug)]
pub struct Trainer {
    models: Receiver<Arc<TimingModel>>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Trainer {
    /// Starts the thread. The first training comes `train_every_s` after the newest model's
    /// `trained_at` (at once when there is none, or it is older).
    pub fn start(cfg: TimingConfig, archive_dir: PathBuf, models_dir: PathBuf, newest_trained_at_ms: Option<i64>) -> anyhow::Result<Self> {
        let (models_tx, models) = channel();
        let (stop, stop_rx) = channel::<()>();
        let every = Duration::from_secs(cfg.train_every_s.max(1));
        let now = chrono::Utc::now().timestamp_millis();
        let first = newest_trained_at_ms
            .map_or(Duration::ZERO, |t| Duration::from_millis(u64::try_from(t + every.as_millis() as i64 - now).unwrap_or(0)).min(every));
        let thread = std::thread::Builder::new().name("timing-trainer".into()).spawn(move || {
            // Threads this one starts (a query engine's pool made on first use) inherit it.
            crate::background::lower_priority("timing-trainer");
            let mut wait = first;
            loop {
                match stop_rx.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
                let until = chrono::Utc::now().timestamp_millis();
                match train_once(&cfg, &archive_dir, &models_dir, until) {
                    Ok(t) => {
                        info!(
                            message = "Trained the timing model.",
                            version = t.manifest.version,
                            keys = t.manifest.keys,
                            clusters = t.manifest.clusters,
                            attempts = t.manifest.attempts,
                            seconds = t.elapsed.as_secs_f64()
                        );
                        if models_tx.send(Arc::new(t.model)).is_err() {
                            return;
                        }
                    }
                    Err(e) => warn!(message = "Training the timing model failed; retrying at the next interval.", error = format!("{e:#}")),
                }
                wait = every;
            }
        })?;
        Ok(Self { models, stop: Some(stop), thread: Some(thread) })
    }

    /// The newest model trained since the last call, if any. Never blocks.
    pub fn poll(&self) -> Option<Arc<TimingModel>> {
        self.models.try_iter().last()
    }
}

impl Drop for Trainer {
    /// Stops the thread; a training in progress is finished first.
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
