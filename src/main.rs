//! `meshguard`: the command line. It parses configuration and wires the crates together; the
//! logic lives in `meshguard-schemas`, `meshguard-ingest`, `meshguard-analytics` and
//! `meshguard-enforcer`.

#![allow(unreachable_pub, reason = "a binary crate: `pub` marks what a module offers the others")]

mod background;
mod bench;
mod bench_enforcer;
mod checkpointer;
mod config;
mod pipeline;
mod quality;
mod simulate;
mod sql;
mod status;
mod summary;
mod train;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use meshguard_analytics::sql::pg::PgEndpoint;
use meshguard_analytics::sql::{SqlSources, SqlSurface};
use meshguard_enforcer::EnforcerService;
use meshguard_ingest::EmbeddedBroker;
use meshguard_ingest::admin::{check_reachable, ensure_topics};
use prometheus::Registry;
use tokio::sync::watch;
use tracing::info;

use crate::config::Config;
use crate::pipeline::{LiveStats, Pipeline};

/// Stream analytics that protect machine-to-machine messaging platforms.
#[derive(Debug, Parser)]
#[command(name = "meshguard", version, about)]
struct Cli {
    /// TOML configuration file (every field documented in the README; `MESHGUARD_*` variables override it).
    #[arg(long, global = true, env = "MESHGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info`, `meshguard=debug`.
    #[arg(long, global = true, env = "MESHGUARD_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the detection pipeline. Without `--brokers` (and no `kafka.brokers` configured): start an
    /// embedded broker and a traffic simulator with injected violations, and watch it work.
    Run(RunArgs),
    /// Run the enforcer service alone: apply the enforcement topic to the configured targets and
    /// publish notifications (`meshguard run` also runs it in-process unless `enforcer.enabled = false`).
    Enforce(EnforceArgs),
    /// Block a UUID from now on, for `--for` (or until unblocked): published on the control topic,
    /// applied by the detection pipeline, pushed to the brokers by the enforcer.
    Block(BlockArgs),
    /// Make a blocked or unregistered UUID active again from now on (its count starts afresh).
    Unblock(UnblockArgs),
    /// Precision and recall per finding kind on labelled simulated traffic, in process (QUALITY.md).
    Quality(QualityCli),
    /// Publish simulated contract traffic with injected violations to a cluster.
    Simulate(SimulateArgs),
    /// The end-to-end benchmark: throughput per core and event→finding latency.
    Bench(BenchCli),
    /// Run one read-only SQL query over the archive (tables findings, enforcement, attempts, devices).
    Sql(SqlArgs),
    /// Train the timing model from the attempt archive now, save it as the next version and print
    /// a summary (the pipeline also trains every `timing.train_every_s`).
    Train(TrainCli),
}

#[derive(Debug, Args)]
struct SqlArgs {
    /// The query, e.g. "SELECT kind, count(*) FROM findings GROUP BY kind".
    query: String,
    /// Output: `table` for people, `csv`, `json` or `arrow` (IPC stream) for scripts.
    #[arg(long, default_value = "table")]
    format: meshguard_analytics::sql::output::Format,
    /// The archive folder (default: `archive.dir`).
    #[arg(long)]
    archive: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TrainCli {
    /// The attempt archive's root (default: `archive.dir`).
    #[arg(long)]
    archive: Option<PathBuf>,
    /// Where models are kept (default: `timing.models_dir`, else `models` beside the archive).
    #[arg(long)]
    models: Option<PathBuf>,
    /// End of the training horizon, RFC 3339 (default: now); the horizon is the
    /// `timing.horizon_days` before it.
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
}

/// An RFC 3339 time as epoch milliseconds.
fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("expected an RFC 3339 time such as 2026-11-24T17:00:00Z, found {s:?}: {e}"))
}

#[derive(Debug, Args)]
struct BenchCli {
    /// Kafka bootstrap servers; without it, the embedded broker.
    #[arg(long)]
    brokers: Option<String>,
    /// Events published for the throughput phase.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Simulated records per second in the latency phase (0 skips it).
    #[arg(long, default_value_t = 0)]
    latency_rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 20)]
    latency_seconds: u64,
    /// The broker's pid, to report its CPU time separately.
    #[arg(long)]
    broker_pid: Option<String>,
    /// Benchmark the enforcer: findings/s per core (`--events` findings) and threshold crossing →
    /// enforcement state latency (`--latency-rate` offenders per second).
    #[arg(long)]
    enforcer: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Kafka bootstrap servers, `host:port[,host:port]`; missing topics are created.
    #[arg(long)]
    brokers: Option<String>,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    duration: Option<u64>,
    /// Embedded mode only: simulated records per second (about 98% message attempts).
    #[arg(long)]
    rate: Option<u64>,
    /// Do not print the live summary.
    #[arg(long)]
    quiet: bool,
    /// The in-process enforcer calls no target, only logs what it would do (`enforcer.dry_run`).
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct EnforceArgs {
    /// Kafka bootstrap servers, `host:port[,host:port]`; missing topics are created.
    #[arg(long)]
    brokers: Option<String>,
    /// Call no target, only log what would be done; notifications are still published (`enforcer.dry_run`).
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct QualityCli {
    /// Traffic records after the directory.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Simulator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Registered UUIDs.
    #[arg(long, default_value_t = 2_000)]
    devices: usize,
    /// Share of attempts that are violations.
    #[arg(long, default_value_t = 0.05)]
    violation_ratio: f64,
    /// Requesters of the timing scenario (labelled schedules over five weeks, measured separately);
    /// 0 skips it.
    #[arg(long, default_value_t = 2_000)]
    timing_requesters: usize,
}

#[derive(Debug, Args)]
struct BlockArgs {
    /// The UUID to block.
    uuid: uuid::Uuid,
    /// How long: `90s`, `30m`, `2h`, `7d`; without it, until unblocked.
    #[arg(long = "for", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Why, recorded in the enforcement state's `reason` (`manual: ...`).
    #[arg(long, default_value = "")]
    reason: String,
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    #[arg(long)]
    brokers: Option<String>,
}

#[derive(Debug, Args)]
struct UnblockArgs {
    /// The UUID to make active again.
    uuid: uuid::Uuid,
    /// Why, recorded in the enforcement state's `reason`.
    #[arg(long, default_value = "")]
    reason: String,
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    #[arg(long)]
    brokers: Option<String>,
}

/// `90s`, `30m`, `2h`, `7d` (or a bare number of seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = number.parse().map_err(|_| format!("expected a duration such as 90s, 30m, 2h or 7d, found {s:?}"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("expected a duration unit s, m, h or d, found {unit:?} in {s:?}")),
    };
    Ok(Duration::from_secs(n * secs))
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    #[arg(long)]
    brokers: Option<String>,
    /// Records per second (about 98% message attempts).
    #[arg(long)]
    rate: Option<u64>,
    /// Stop after this many seconds (default: until interrupted).
    #[arg(long)]
    duration: Option<u64>,
    /// Seed: the same seed gives the same traffic.
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match real_main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshguard: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    match cli.command {
        Command::Run(args) => {
            // The embedded broker outlives the runtime: clients that tasks on it still hold (the
            // HTTP server's control sink) would otherwise find it gone and log errors.
            let mut embedded = None;
            let result = runtime.block_on(run(cfg, args, &mut embedded));
            drop(runtime);
            drop(embedded);
            result
        }
        Command::Enforce(args) => runtime.block_on(enforce(cfg, args)),
        Command::Block(args) => {
            let until = args.duration.map(|d| chrono::Utc::now().timestamp_millis() + d.as_millis() as i64);
            runtime.block_on(control(cfg, args.brokers, args.uuid, meshguard_schemas::output::ControlAction::Block, until, args.reason))
        }
        Command::Unblock(args) => {
            runtime.block_on(control(cfg, args.brokers, args.uuid, meshguard_schemas::output::ControlAction::Unblock, None, args.reason))
        }
        Command::Quality(q) => {
            let args = quality::QualityArgs { records: q.records, seed: q.seed, devices: q.devices, violation_ratio: q.violation_ratio };
            quality::run(&cfg, &args)?;
            if q.timing_requesters > 0 {
                quality::run_timing(&cfg, &quality::TimingArgs { requesters: q.timing_requesters, seed: q.seed })?;
            }
            Ok(())
        }
        Command::Simulate(args) => runtime.block_on(simulate(cfg, args)),
        Command::Sql(args) => runtime.block_on(sql::cli(&cfg, &args.query, args.format, args.archive)),
        Command::Train(t) => {
            drop(runtime);
            let archive = t.archive.unwrap_or_else(|| cfg.archive.dir.clone());
            let models = t.models.unwrap_or_else(|| cfg.timing.models_dir_beside(&archive));
            train::run(&cfg.timing, archive, models, t.until)
        }
        Command::Bench(b) => {
            drop(runtime);
            let args = bench::BenchArgs {
                brokers: b.brokers,
                events: b.events,
                latency_rate: b.latency_rate,
                latency_seconds: b.latency_seconds,
                broker_pid: b.broker_pid,
                enforcer: b.enforcer,
            };
            bench::run(&cfg, &args)
        }
    }
}

/// Aborts a background task when dropped (the PostgreSQL endpoint, when `run` ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Completes once `stop` says so: the shutdown signal of async services (the enforcer).
async fn stopped(mut stop: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Sets `stop` (and tells `notify`) on Ctrl-C, SIGTERM, or after `duration`.
fn stop_on_signal(stop: Arc<AtomicBool>, notify: watch::Sender<bool>, duration: Option<Duration>) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        let timer = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => info!(message = "Interrupted; stopping."),
            _ = term.recv() => info!(message = "Terminated; stopping."),
            _ = timer => info!(message = "Duration reached; stopping."),
        }
        stop.store(true, Ordering::Relaxed);
        notify.send_replace(true);
    });
}

async fn run(mut cfg: Config, args: RunArgs, embedded: &mut Option<EmbeddedBroker>) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    stop_on_signal(stop.clone(), stop_tx.clone(), args.duration.map(Duration::from_secs));
    if args.dry_run {
        cfg.enforcer.dry_run = true;
    }
    let registry = Registry::new();
    let stats = Arc::new(LiveStats::default());
    let brokers = args.brokers.clone().or_else(|| cfg.kafka.brokers.clone());

    // Embedded mode: an in-process broker (kept by the caller), a fresh state directory, and
    // simulated traffic.
    let mut _state_dir = None;
    let mut simulator = None;
    let sent = Arc::new(AtomicU64::new(0));
    let brokers = match brokers {
        Some(b) => {
            let kafka = cfg.kafka.connection(&b);
            check_reachable(&kafka, Duration::from_secs(10))?;
            let created = ensure_topics(&kafka, &cfg.topics, cfg.kafka.partitions).await?;
            if !created.is_empty() {
                info!(message = "Created topics.", topics = ?created);
            }
            b
        }
        None => {
            let broker = EmbeddedBroker::start(&cfg.topics, cfg.kafka.partitions)?;
            let b = broker.bootstrap();
            let dir = tempfile::Builder::new().prefix("meshguard-run-").tempdir()?;
            cfg.pipeline.checkpoint_dir = dir.path().join("checkpoints");
            cfg.archive.dir = dir.path().join("archive");
            cfg.enforcer.audit.dir = Some(dir.path().join("archive").join("audit"));
            _state_dir = Some(dir);
            *embedded = Some(broker);
            eprintln!("meshguard: embedded broker on {b} (in memory); simulating traffic with injected violations");
            let plan = simulate::Plan { sim: cfg.simulator.clone(), rate: args.rate.unwrap_or(cfg.simulator.rate), duration: None };
            let kafka = cfg.kafka.connection(&b);
            let (topics, stop, sent) = (cfg.topics.clone(), stop.clone(), sent.clone());
            simulator = Some(
                std::thread::Builder::new()
                    .name("simulator".into())
                    .spawn(move || simulate::drive(&kafka, &topics, &plan, &stop, &sent))?,
            );
            b
        }
    };

    let kafka = cfg.kafka.connection(&brokers);
    // The SQL surface: the archive plus the rows the pipeline has not closed into files yet.
    let mut sources = SqlSources::live(&cfg.archive.dir);
    if !cfg.archive.enabled {
        sources = SqlSources { archive_dir: cfg.archive.dir.clone(), devices: sources.devices, ..Default::default() };
    } else if !cfg.sql.live_attempts {
        sources.attempts = None;
    }
    let sources = sql::with_audit(sources, &cfg, None);
    let audit_live = sources.audit_live.clone();
    let surface = SqlSurface::new(&sources).await.context("setting up the SQL surface")?;
    let mut _pg = None;
    if !cfg.sql.pg_listen.is_empty() {
        let addr: std::net::SocketAddr = cfg.sql.pg_listen.parse()?;
        let endpoint = PgEndpoint::bind(addr).await.with_context(|| format!("listening on {addr} (sql.pg_listen)"))?;
        let bound = endpoint.local_addr()?;
        let password = cfg.sql.pg_password.as_ref().map(|p| p.expose().to_owned());
        _pg = Some(AbortOnDrop(endpoint.serve(&surface, &cfg.sql.pg_user, password.as_deref()).map_err(anyhow::Error::msg)?));
        eprintln!(
            "meshguard: SQL on PostgreSQL wire protocol: psql -h {} -p {} -U {} meshguard",
            bound.ip(),
            bound.port(),
            cfg.sql.pg_user
        );
    }
    if !cfg.http.listen.is_empty() {
        let addr: std::net::SocketAddr = cfg.http.listen.parse()?;
        let control = summary::ControlApi { sink: Arc::new(meshguard_ingest::KafkaSink::new(&kafka)?), topic: cfg.topics.control.clone() };
        summary::serve(addr, registry.clone(), Some(control), Some(surface.clone()), Some(stats.clone()), cfg.http.token.clone()).await?;
        eprintln!(
            "meshguard: status page on http://{addr}/, metrics on /metrics, SQL on POST /api/sql, manual overrides on POST /api/block and /api/unblock"
        );
    }

    // The enforcer service, in-process: its own consumer group, on this runtime.
    let enforcer = if cfg.enforcer.enabled {
        match EnforcerService::start(cfg.enforcer.clone(), &kafka, cfg.topics.clone(), &registry).await {
            Ok(mut service) => {
                if let Some(live) = &audit_live {
                    service.share_audit_rows(live.clone());
                }
                Some(tokio::spawn(service.run(stopped(stop_rx.clone()))))
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                if let Some(sim) = simulator {
                    let _ = tokio::task::spawn_blocking(move || sim.join()).await;
                }
                return Err(anyhow::Error::new(e).context("starting the enforcer"));
            }
        }
    } else {
        None
    };
    let worker_stop = stop.clone();
    let worker_stats = stats.clone();
    let worker_registry = registry.clone();
    let worker = std::thread::Builder::new().name("pipeline".into()).spawn(move || -> anyhow::Result<()> {
        let pipeline = Pipeline::start(cfg, &kafka, &worker_registry, worker_stats, sources);
        match pipeline {
            Ok(p) => p.run(&worker_stop),
            Err(e) => {
                worker_stop.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    })?;

    let printer = (!args.quiet).then(|| summary::spawn_printer(stats.clone(), stop.clone()));
    let result = tokio::task::spawn_blocking(move || worker.join()).await?;
    stop.store(true, Ordering::Relaxed);
    stop_tx.send_replace(true);
    let enforced = match enforcer {
        Some(task) => task.await.map_err(|_| anyhow::anyhow!("the enforcer task panicked")).and_then(|r| Ok(r?)),
        None => Ok(()),
    };
    if let Some(p) = printer {
        let _ = p.join();
    }
    if let Some(sim) = simulator {
        let _ = sim.join();
    }
    summary::print_final(&stats);
    match result {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the pipeline thread panicked"),
    }
    enforced.context("the enforcer")
}

/// `meshguard enforce`: the enforcer service alone, until Ctrl-C or SIGTERM.
async fn enforce(mut cfg: Config, args: EnforceArgs) -> anyhow::Result<()> {
    let brokers =
        args.brokers.or_else(|| cfg.kafka.brokers.clone()).context("`meshguard enforce` needs --brokers HOST:PORT (or kafka.brokers)")?;
    if args.dry_run {
        cfg.enforcer.dry_run = true;
    }
    let kafka = cfg.kafka.connection(&brokers);
    check_reachable(&kafka, Duration::from_secs(10))?;
    let created = ensure_topics(&kafka, &cfg.topics, cfg.kafka.partitions).await?;
    if !created.is_empty() {
        info!(message = "Created topics.", topics = ?created);
    }
    let registry = Registry::new();
    if !cfg.http.listen.is_empty() {
        let addr: std::net::SocketAddr = cfg.http.listen.parse()?;
        summary::serve_metrics(addr, registry.clone(), cfg.http.token.clone()).await?;
        eprintln!("meshguard: metrics on http://{addr}/metrics");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    stop_on_signal(stop, stop_tx, None);
    let service = EnforcerService::start(cfg.enforcer, &kafka, cfg.topics, &registry).await.context("starting the enforcer")?;
    service.run(stopped(stop_rx)).await.context("the enforcer")
}

/// `meshguard block` / `unblock`: one command on the control topic, acknowledged by the broker.
async fn control(
    cfg: Config,
    brokers: Option<String>,
    uuid: uuid::Uuid,
    command: meshguard_schemas::output::ControlAction,
    until: Option<i64>,
    reason: String,
) -> anyhow::Result<()> {
    let brokers = brokers.or_else(|| cfg.kafka.brokers.clone()).context("needs --brokers HOST:PORT (or kafka.brokers)")?;
    let kafka = cfg.kafka.connection(&brokers);
    check_reachable(&kafka, Duration::from_secs(10))?;
    ensure_topics(&kafka, &cfg.topics, cfg.kafka.partitions).await?;
    let cmd = meshguard_schemas::output::ControlCommand {
        id: uuid::Uuid::new_v4(),
        ts: chrono::Utc::now().timestamp_millis(),
        uuid,
        command,
        until,
        reason,
    };
    let sink = meshguard_ingest::KafkaSink::new(&kafka)?;
    let mut key = [0u8; 36];
    sink.send(&cfg.topics.control, uuid.hyphenated().encode_lower(&mut key).as_bytes(), &serde_json::to_vec(&cmd)?)?;
    sink.flush(Duration::from_secs(30)).context("publishing the command")?;
    let what = match (command, until) {
        (meshguard_schemas::output::ControlAction::Block, Some(until)) => {
            format!("block of {uuid} until {}", meshguard_schemas::time::format_ms(until))
        }
        (meshguard_schemas::output::ControlAction::Block, None) => format!("block of {uuid} until unblocked"),
        (meshguard_schemas::output::ControlAction::Unblock, _) => format!("unblock of {uuid}"),
    };
    eprintln!("meshguard: {what} published on {}; the pipeline applies it", cfg.topics.control);
    Ok(())
}

async fn simulate(cfg: Config, args: SimulateArgs) -> anyhow::Result<()> {
    let brokers =
        args.brokers.or_else(|| cfg.kafka.brokers.clone()).context("`meshguard simulate` needs --brokers HOST:PORT (or kafka.brokers)")?;
    let kafka = cfg.kafka.connection(&brokers);
    check_reachable(&kafka, Duration::from_secs(10))?;
    ensure_topics(&kafka, &cfg.topics, cfg.kafka.partitions).await?;
    let mut sim = cfg.simulator.clone();
    if let Some(seed) = args.seed {
        sim.seed = seed;
    }
    let plan = simulate::Plan { sim, rate: args.rate.unwrap_or(cfg.simulator.rate), duration: args.duration.map(Duration::from_secs) };
    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, _stop_rx) = watch::channel(false);
    stop_on_signal(stop.clone(), stop_tx, None);
    let sent = Arc::new(AtomicU64::new(0));
    let topics = cfg.topics.clone();
    let progress = summary::spawn_sent_printer(sent.clone(), stop.clone());
    let (s2, sent2) = (stop.clone(), sent.clone());
    let sim = tokio::task::spawn_blocking(move || simulate::drive(&kafka, &topics, &plan, &s2, &sent2)).await??;
    stop.store(true, Ordering::Relaxed);
    let _ = progress.join();
    eprintln!("meshguard: published {} records; {:?}", sent.load(Ordering::Relaxed), sim.stats());
    Ok(())
}
