//! `meshguard bench`: the end-to-end harness. Against a broker (a real one, or the embedded one
//! when `--brokers` is absent) it measures
//! 1. **throughput**: N simulated events are published first; then a fresh pipeline consumes them
//!    all, and events/s is reported per second of meshguard's own CPU time (user + system of this
//!    process during the phase, from `/proc/self/stat`), and per second of wall time;
//! 2. **latency**: traffic is published at a fixed rate with event time = publish time, and a
//!    consumer of the findings topic measures publish → finding received, p50/p99.
//!
//! The broker's CPU is reported separately when its pid is given (`--broker-pid`), since it shares
//! the machine. Results are printed as one JSON object for BENCHMARKS.md.
#![allow(clippy::print_stdout, reason = "the harness reports on stdout")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use meshguard_ingest::simulator::Simulator;
use meshguard_ingest::{KafkaConfig, KafkaSink, Topics};
use prometheus::Registry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde_json::json;

use crate::config::{Config, SimulatorSection};
use crate::pipeline::{LiveStats, Pipeline};
use crate::simulate::{self, Plan};

/// Linux reports process times in USER_HZ ticks, fixed at 100 by the kernel ABI.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) of a process from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// CPU seconds of this process, leaving out the embedded broker's threads (`rdk:mock…`), which
/// stand in for the cluster and are not meshguard's work. The process's own times count every
/// thread it has had, so threads that end within a phase (the alignment's, one per micro-batch)
/// count too, and threads that end after a phase began (the publisher's) take nothing back.
/// (Summing the live threads instead, as the bench did until 2026-11-26, read 3–8 % low.)
pub(crate) fn meshguard_cpu_seconds() -> f64 {
    let total = cpu_seconds("self").unwrap_or(0.0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return total };
    let mut mock = 0.0;
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("rdk:mock") {
            continue;
        }
        if let Some(id) = path.file_name().and_then(|n| n.to_str()) {
            mock += cpu_seconds(&format!("self/task/{id}")).unwrap_or(0.0);
        }
    }
    total - mock
}

/// CPU seconds of the calling thread: the bench's own watcher, whose polling is not meshguard's work.
fn own_thread_cpu_seconds() -> f64 {
    cpu_seconds("thread-self").unwrap_or(0.0)
}

/// Records read and meshguard's CPU and wall time over a phase, whole and in its steady part.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PhaseCost {
    /// Wall seconds from the pipeline's start to the last record.
    pub wall: f64,
    /// meshguard's CPU seconds over the same span.
    pub cpu: f64,
    /// Records read after the first tenth of the target, and the CPU and wall seconds they took:
    /// the sustained cost, without the start (the group's assignment, the global tables' bootstrap,
    /// the first checkpoint). Zero when the phase has no target.
    pub steady_records: u64,
    pub steady_cpu: f64,
    pub steady_wall: f64,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    /// Broker; `None`: embedded.
    pub brokers: Option<String>,
    /// Events for the throughput phase.
    pub events: u64,
    /// Rate for the latency phase (events/s); 0 skips it.
    pub latency_rate: u64,
    /// Length of the latency phase.
    pub latency_seconds: u64,
    /// The broker's pid, to report its CPU.
    pub broker_pid: Option<String>,
    /// Measure the enforcer instead (`bench_enforcer`): `events` findings, `latency_rate`
    /// offenders per second crossing the block threshold.
    pub enforcer: bool,
}

pub(crate) fn fresh_config(base: &Config, tag: &str) -> anyhow::Result<(Config, tempfile::TempDir)> {
    let mut cfg = base.clone();
    let dir = tempfile::Builder::new().prefix("meshguard-bench-").tempdir()?;
    cfg.pipeline.checkpoint_dir = dir.path().join("checkpoints");
    cfg.archive.dir = dir.path().join("archive");
    cfg.kafka.group_id = format!("meshguard-bench-{tag}-{}", std::process::id());
    Ok((cfg, dir))
}

/// Every topic of `topics` with a suffix naming the run and phase: each phase starts from empty
/// topics, whatever earlier runs left on the broker.
pub(crate) fn phase_topics(topics: &Topics, tag: &str) -> Topics {
    let suffix = format!(".bench-{}-{tag}", std::process::id());
    let t = |name: &String| format!("{name}{suffix}");
    Topics {
        messages: t(&topics.messages),
        presence: t(&topics.presence),
        interactions: t(&topics.interactions),
        identity_requests: t(&topics.identity_requests),
        registry: t(&topics.registry),
        findings: t(&topics.findings),
        enforcement: t(&topics.enforcement),
        notifications: t(&topics.notifications),
        identity_results: t(&topics.identity_results),
        deadletter: t(&topics.deadletter),
        control: t(&topics.control),
    }
}

/// Runs a pipeline until it has read `target` records (or `stop`), returning what it cost.
pub(crate) fn run_pipeline_until(
    cfg: Config,
    kafka: &KafkaConfig,
    target: u64,
    stop: Arc<AtomicBool>,
    ready: Option<std::sync::mpsc::Sender<()>>,
) -> anyhow::Result<(Arc<LiveStats>, PhaseCost)> {
    let stats = Arc::new(LiveStats::default());
    let registry = Registry::new();
    let sources = meshguard_analytics::sql::SqlSources::live(&cfg.archive.dir);
    let pipeline = Pipeline::start(cfg, kafka, &registry, stats.clone(), sources)?;
    if let Some(ready) = ready {
        let _ = ready.send(());
    }
    let cpu0 = meshguard_cpu_seconds();
    let t0 = Instant::now();
    // One watcher stops the pipeline at `target` and, whatever stopped it, samples the CPU time
    // at that moment, while the pipeline's librdkafka threads still exist. Its own CPU time is
    // taken off.
    let watcher_stats = stats.clone();
    let watcher_stop = stop.clone();
    let watcher = std::thread::spawn(move || {
        let mut last_report = Instant::now();
        let steady_from = target / 10;
        let mut steady_start = None;
        while !watcher_stop.load(Ordering::Relaxed) {
            let read = watcher_stats.records.load(Ordering::Relaxed);
            if steady_start.is_none() && target != u64::MAX && read >= steady_from {
                steady_start = Some((read, meshguard_cpu_seconds() - own_thread_cpu_seconds(), Instant::now()));
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                // The latency phase runs until it is stopped, with no record count to reach.
                if target == u64::MAX {
                    eprintln!("meshguard bench: consumed {read} records");
                } else {
                    eprintln!("meshguard bench: consumed {read} of {target} records");
                }
                last_report = Instant::now();
            }
            if read >= target {
                watcher_stop.store(true, Ordering::Relaxed);
                break;
            }
            std::thread::park_timeout(Duration::from_millis(2));
        }
        let end = (watcher_stats.records.load(Ordering::Relaxed), meshguard_cpu_seconds() - own_thread_cpu_seconds(), Instant::now());
        (steady_start, end)
    });
    pipeline.run(&stop)?;
    let (steady_start, (read_end, cpu_end, t_end)) = watcher.join().map_err(|_| anyhow::anyhow!("the bench watcher panicked"))?;
    let mut cost = PhaseCost { wall: t_end.duration_since(t0).as_secs_f64(), cpu: cpu_end - cpu0, ..PhaseCost::default() };
    if let Some((read, cpu, t)) = steady_start {
        cost.steady_records = read_end.saturating_sub(read);
        cost.steady_cpu = cpu_end - cpu;
        cost.steady_wall = t_end.duration_since(t).as_secs_f64();
    }
    Ok((stats, cost))
}

/// Runs both phases and prints the JSON report.
pub fn run(base: &Config, args: &BenchArgs) -> anyhow::Result<()> {
    if args.enforcer {
        return crate::bench_enforcer::run(base, args);
    }
    let mut base = base.clone();
    if args.brokers.is_some() {
        base.topics = phase_topics(&base.topics, "throughput");
    }
    let base = &base;
    let topics = base.topics.clone();
    let _embedded;
    let brokers = match &args.brokers {
        Some(b) => b.clone(),
        None => {
            let e = meshguard_ingest::EmbeddedBroker::start(&topics, base.kafka.partitions)?;
            let b = e.bootstrap();
            _embedded = e;
            b
        }
    };
    let kafka = base.kafka.connection(&brokers);
    if args.brokers.is_some() {
        // The embedded broker created its topics when it started.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(meshguard_ingest::admin::ensure_topics(&kafka, &topics, base.kafka.partitions))?;
    }

    // Phase 1: publish N events, then consume them all.
    // At high rates the simulator needs about rate/8 devices to keep every requester under the
    // contract's per-requester throttle, i.e. to stay realistic traffic.
    let rate = 100_000;
    let sim_cfg = SimulatorSection { devices: base.simulator.devices.max(rate as usize / 8), ..base.simulator.clone() };
    let plan = Plan { sim: sim_cfg, rate, duration: None };
    let mut sim = Simulator::new(simulate::sim_config(&plan, chrono::Utc::now().timestamp_millis()));
    let sink = KafkaSink::new(&kafka)?;
    let publish_started = Instant::now();
    let mut records = sim.bootstrap();
    let mut total = records.len() as u64;
    simulate::send_all(&sink, &topics, &records)?;
    let mut left = args.events;
    while left > 0 {
        let n = left.min(50_000) as usize;
        records.clear();
        sim.next_batch(n, &mut records);
        simulate::send_all(&sink, &topics, &records)?;
        total += records.len() as u64;
        left -= n as u64;
        eprintln!("meshguard bench: published {total} records");
    }
    sink.flush(Duration::from_secs(120))?;
    drop(sink);
    let publish_seconds = publish_started.elapsed().as_secs_f64();
    let broker_cpu0 = args.broker_pid.as_deref().and_then(cpu_seconds);

    let (cfg, _dir) = fresh_config(base, "throughput")?;
    let (stats, cost) = run_pipeline_until(cfg, &kafka, total, Arc::new(AtomicBool::new(false)), None)?;
    let broker_cpu = broker_cpu0.and_then(|c0| args.broker_pid.as_deref().and_then(cpu_seconds).map(|c1| c1 - c0));
    let read = stats.records.load(Ordering::Relaxed);
    let findings: u64 = stats.findings.iter().map(|f| f.load(Ordering::Relaxed)).sum();

    // Phase 2: latency at a fixed rate.
    let latency = if args.latency_rate > 0 {
        let mut latency_base = base.clone();
        if args.brokers.is_some() {
            latency_base.topics = phase_topics(&base.topics, "latency");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(meshguard_ingest::admin::ensure_topics(&kafka, &latency_base.topics, base.kafka.partitions))?;
        }
        Some(latency_phase(&latency_base, &kafka, args)?)
    } else {
        None
    };

    let report = json!({
        "commit": option_env!("MESHGUARD_COMMIT").unwrap_or("unknown"),
        "broker": if args.brokers.is_some() { "external" } else { "embedded (librdkafka mock)" },
        "events_published": total,
        "publish_seconds": publish_seconds,
        "throughput": {
            "records_read": read,
            "findings": findings,
            "wall_seconds": cost.wall,
            "meshguard_cpu_seconds": cost.cpu,
            "events_per_second_wall": read as f64 / cost.wall,
            "events_per_cpu_second": read as f64 / cost.cpu.max(1e-9),
            "broker_cpu_seconds": broker_cpu,
            "steady": {
                "records_read": cost.steady_records,
                "wall_seconds": cost.steady_wall,
                "meshguard_cpu_seconds": cost.steady_cpu,
                "events_per_second_wall": cost.steady_records as f64 / cost.steady_wall.max(1e-9),
                "events_per_cpu_second": cost.steady_records as f64 / cost.steady_cpu.max(1e-9),
            },
        },
        "latency": latency,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn latency_phase(base: &Config, kafka: &KafkaConfig, args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let topics = base.topics.clone();
    let (cfg, _dir) = fresh_config(base, "latency")?;
    let stop = Arc::new(AtomicBool::new(false));

    // The findings consumer starts at the current end, so only this phase's findings count.
    let reader = latency_reader(kafka, "latency-reader", &topics.findings, "latest", stop.clone(), |m| {
        m.payload().and_then(|p| serde_json::from_slice::<meshguard_schemas::output::Finding>(p).ok()).map(|f| f.event_ts)
    })?;

    let kafka_p = kafka.clone();
    let pipeline_stop = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let pipeline = std::thread::spawn(move || run_pipeline_until(cfg, &kafka_p, u64::MAX, pipeline_stop, Some(ready_tx)));
    // Traffic starts once the pipeline has loaded the directory and is about to poll.
    if ready_rx.recv_timeout(Duration::from_secs(120)).is_err() {
        stop.store(true, Ordering::Relaxed);
        return match pipeline.join() {
            Ok(Err(e)) => Err(e.context("starting the latency-phase pipeline")),
            _ => Err(anyhow::anyhow!("the latency-phase pipeline did not start within 120 s")),
        };
    }
    let sim_cfg = SimulatorSection { devices: base.simulator.devices.max(args.latency_rate as usize / 8), ..base.simulator.clone() };
    let plan = Plan { sim: sim_cfg, rate: args.latency_rate, duration: Some(Duration::from_secs(args.latency_seconds)) };
    let sim_stop = Arc::new(AtomicBool::new(false));
    let sent = AtomicU64::new(0);
    simulate::drive(kafka, &topics, &plan, &sim_stop, &sent)?;
    // Findings of the last attempts are in flight: give them a bounded moment to arrive.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let _ = pipeline.join();
    let samples = reader.join().map_err(|_| anyhow::anyhow!("latency reader panicked"))?;
    log_by_second(&samples);
    let lat: Vec<i64> = samples.iter().map(|s| s.latency).collect();
    let mut out = json!({
        "rate": args.latency_rate,
        "seconds": args.latency_seconds,
        "findings": lat.len(),
        // The split at the finding's Kafka timestamp (meshguard's producer stamps it when the
        // pipeline hands the finding over): the attempt's way in and through the pipeline, then
        // the finding's own hop through the broker to the reader.
        "to_produced": percentiles(samples.iter().map(|s| s.produced - s.at).collect()),
        "findings_hop": percentiles(samples.iter().map(|s| s.at + s.latency - s.produced).collect()),
    });
    if let (Some(out), serde_json::Value::Object(pcts)) = (out.as_object_mut(), percentiles(lat)) {
        out.extend(pcts);
    }
    Ok(out)
}

/// One record read by [`latency_reader`], in Unix milliseconds of this machine's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// The event time the reader's function picked from the record.
    pub at: i64,
    /// From `at` to the record's arrival at the reader.
    pub latency: i64,
    /// The record's Kafka timestamp (its producer's clock when produced; `at` when it has none).
    pub produced: i64,
}

/// A thread reading every partition of `topic` from `offset_reset` (`latest`: where it ends when
/// this is called; `earliest`) until `stop`, as a
/// consumer that fetches eagerly (`fetch.wait.max.ms=5`): for every record `event_ms` picks, that
/// event time, the milliseconds from it to the record's arrival here and the record's timestamp.
pub(crate) fn latency_reader(
    kafka: &KafkaConfig,
    name: &str,
    topic: &str,
    offset_reset: &str,
    stop: Arc<AtomicBool>,
    event_ms: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> Option<i64> + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<Vec<Sample>>> {
    let consumer: BaseConsumer = kafka
        .consumer_config_with(&[])
        .set("group.id", format!("meshguard-bench-{name}-{}", std::process::id()))
        .set("auto.offset.reset", offset_reset)
        .set("fetch.wait.max.ms", "5")
        .create()
        .with_context(|| format!("creating the bench's {name} consumer"))?;
    // Assigned, not subscribed: a group's assignment takes a moment, and `latest` would then start
    // after findings of the phase's first moments. The ends are read now, before any traffic.
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(30)).with_context(|| format!("reading the partitions of {topic}"))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        let start = if offset_reset == "latest" {
            let (_, high) =
                consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(30)).with_context(|| format!("reading the end of {topic}"))?;
            rdkafka::Offset::Offset(high)
        } else {
            rdkafka::Offset::Beginning
        };
        tpl.add_partition_offset(topic, p.id(), start)?;
    }
    consumer.assign(&tpl)?;
    Ok(std::thread::spawn(move || {
        let mut latencies = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                let now = chrono::Utc::now().timestamp_millis();
                if let Some(at) = event_ms(&m) {
                    latencies.push(Sample { at, latency: now - at, produced: m.timestamp().to_millis().unwrap_or(at) });
                }
            }
        }
        latencies
    }))
}

/// Logs (at debug level) the latencies of each second of event time: where a tail comes from (a
/// checkpoint every `pipeline.checkpoint_interval_ms`, the start) shows as the seconds it is in.
fn log_by_second(samples: &[Sample]) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let Some(first) = samples.iter().map(|s| s.at).min() else { return };
    let mut seconds: std::collections::BTreeMap<i64, Vec<i64>> = std::collections::BTreeMap::new();
    for s in samples {
        seconds.entry((s.at - first) / 1000).or_default().push(s.latency);
    }
    for (second, latencies) in seconds {
        let findings = latencies.len();
        let p = percentiles(latencies);
        tracing::debug!(message = "Latency by second of event time.", second, findings, p50_ms = %p["p50_ms"], p99_ms = %p["p99_ms"], max_ms = %p["max_ms"]);
    }
}

/// `p50_ms`, `p99_ms` and `max_ms` of latencies (nearest rank; null when there are none).
pub(crate) fn percentiles(mut latencies: Vec<i64>) -> serde_json::Value {
    latencies.sort_unstable();
    let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).copied();
    json!({ "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": latencies.last() })
}
