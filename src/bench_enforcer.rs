//! `meshguard bench --enforcer`: the enforcer's end-to-end harness, against a broker (a real one,
//! or the embedded one when `--brokers` is absent). It measures
//! 1. **findings/s per core**: N findings (10,000 offenders against 1,000 registered targets with
//!    owners, 1 ms of event time apart) are published first; then a fresh enforcer service consumes
//!    them all, publishing the notices (about one per recipient, offender and kind per minute) and
//!    committing; findings/s is reported per second of meshguard's own CPU time (user + system of
//!    this process's threads during the phase, `/proc/self/task`), and per second of wall time;
//! 2. **threshold crossing → enforcement state latency**: a pipeline and an enforcer run
//!    in-process, with a webhook target pointing at a receiver in this process. At a fixed rate a
//!    new offender makes its 5 unauthorized attempts (event time = publish time), the fifth
//!    crossing the block threshold. Measured from the crossing attempt's `ts` (its publish time):
//!    the `blocked` record read back from the enforcement topic (state on the Kafka broker), and the
//!    block action arriving at the webhook receiver (state applied to the target, audited).
//!
//! Results are printed as one JSON object for BENCHMARKS.md.
#![allow(clippy::print_stdout, reason = "the harness reports on stdout")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use meshguard_enforcer::{EnforcerConfig, EnforcerService, TargetConfig};
use meshguard_ingest::{KafkaConfig, KafkaSink, Topics};
use rdkafka::message::Message;
use serde_json::json;
use uuid::Uuid;

use crate::bench::{BenchArgs, fresh_config, latency_reader, meshguard_cpu_seconds, percentiles, phase_topics, run_pipeline_until};
use crate::config::Config;

/// Offenders of the throughput phase.
const OFFENDERS: u64 = 10_000;
/// Registered targets (each with an owner) of the throughput phase.
const TARGETS: u64 = 1_000;
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Runs both phases and prints the JSON report.
pub fn run(base: &Config, args: &BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // Each phase starts from empty topics: fresh ones on a real broker, a fresh embedded broker.
    let broker_for = |tag: &str| -> anyhow::Result<(Option<meshguard_ingest::EmbeddedBroker>, KafkaConfig, Topics)> {
        let topics = phase_topics(&base.topics, tag);
        match &args.brokers {
            Some(b) => {
                let kafka = base.kafka.connection(b);
                runtime.block_on(meshguard_ingest::admin::ensure_topics(&kafka, &topics, base.kafka.partitions))?;
                Ok((None, kafka, topics))
            }
            None => {
                let embedded = meshguard_ingest::EmbeddedBroker::start(&topics, base.kafka.partitions)?;
                let kafka = base.kafka.connection(&embedded.bootstrap());
                Ok((Some(embedded), kafka, topics))
            }
        }
    };

    let (_embedded, kafka, topics) = broker_for("enforcer-throughput")?;
    let throughput = throughput_phase(base, &kafka, &topics, args.events, &runtime)?;
    let latency = if args.latency_rate > 0 {
        let (_embedded, kafka, topics) = broker_for("enforcer-latency")?;
        Some(latency_phase(base, &kafka, &topics, args, &runtime)?)
    } else {
        None
    };
    let report = json!({
        "commit": option_env!("MESHGUARD_COMMIT").unwrap_or("unknown"),
        "broker": if args.brokers.is_some() { "external" } else { "embedded (librdkafka mock)" },
        "enforcer_throughput": throughput,
        "enforcement_latency": latency,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn uuid_of(domain: u128, i: u64) -> Uuid {
    Uuid::from_u128((domain << 64) | u128::from(i))
}

/// An enforcer configuration for a bench phase: its own group, audit in `dir`, `targets`.
fn enforcer_config(base: &Config, tag: &str, dir: &std::path::Path, targets: Vec<TargetConfig>) -> EnforcerConfig {
    let mut cfg = base.enforcer.clone();
    cfg.group_id = format!("meshguard-bench-enforcer-{tag}-{}", std::process::id());
    cfg.dry_run = false;
    cfg.notifications = true;
    cfg.audit.dir = Some(dir.join("audit"));
    cfg.targets = targets;
    cfg
}

/// The enforcer's `meshguard_enforcer_records_total{topic}` from `registry`.
fn records_read(registry: &prometheus::Registry, topic: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "meshguard_enforcer_records_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| m.get_label().iter().any(|l| l.name() == "topic" && l.value() == topic))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn throughput_phase(
    base: &Config,
    kafka: &KafkaConfig,
    topics: &Topics,
    events: u64,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<serde_json::Value> {
    let sink = KafkaSink::new(kafka)?;
    let t0 = chrono::Utc::now().timestamp_millis() - 86_400_000;
    for i in 0..TARGETS {
        let (target, owner) = (uuid_of(1, i), uuid_of(2, i));
        let record = json!({"uuid": target, "kind": "device", "type": "smart-bulb", "owner": owner});
        sink.send_record(&topics.registry, target.hyphenated().to_string().as_bytes(), Some(record.to_string().as_bytes()), Some(t0))?;
    }
    let published = Instant::now();
    for n in 0..events {
        let (offender, target) = (uuid_of(3, n % OFFENDERS), uuid_of(1, (n * 7) % TARGETS));
        let ts = meshguard_schemas::time::format_ms(t0 + n as i64);
        let finding = json!({"id": uuid_of(4, n), "ts": ts, "event_ts": ts, "event_id": uuid_of(5, n), "kind": "bad_credentials",
            "offender": offender, "target": target, "action": "send", "rule": "auth:requester", "detail": {"auth": "invalid"},
            "score": 1.0, "severity": "high"});
        sink.send_record(&topics.findings, offender.hyphenated().to_string().as_bytes(), Some(finding.to_string().as_bytes()), None)?;
        if n > 0 && n % 100_000 == 0 {
            eprintln!("meshguard bench: published {n} findings");
        }
    }
    sink.flush(Duration::from_secs(120))?;
    drop(sink);
    let publish_seconds = published.elapsed().as_secs_f64();

    let dir = tempfile::Builder::new().prefix("meshguard-bench-enforcer-").tempdir()?;
    let cfg = enforcer_config(base, "throughput", dir.path(), Vec::new());
    let registry = prometheus::Registry::new();
    let (read, wall, cpu, notices) = runtime.block_on(async {
        let service = EnforcerService::start(cfg, kafka, topics.clone(), &registry).await.context("starting the enforcer")?;
        let cpu0 = meshguard_cpu_seconds();
        let started = Instant::now();
        let end = Arc::new(Mutex::new(None));
        let end_w = end.clone();
        let registry_w = registry.clone();
        let done = async move {
            let mut last_report = Instant::now();
            loop {
                let read = records_read(&registry_w, "findings");
                if read >= events {
                    // Sampled while the service's client threads still exist.
                    *end_w.lock().unwrap_or_else(|p| p.into_inner()) = Some((meshguard_cpu_seconds(), Instant::now()));
                    return;
                }
                if last_report.elapsed() >= Duration::from_secs(1) {
                    eprintln!("meshguard bench: the enforcer read {read} of {events} findings");
                    last_report = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        service.run(done).await.context("the enforcer")?;
        let (cpu1, t1) = end.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or((meshguard_cpu_seconds(), Instant::now()));
        let notices: f64 = registry
            .gather()
            .iter()
            .filter(|f| f.name() == "meshguard_notifications_total")
            .flat_map(|f| f.get_metric().iter())
            .map(|m| m.get_counter().get_value())
            .sum();
        anyhow::Ok((records_read(&registry, "findings"), t1.duration_since(started).as_secs_f64(), cpu1 - cpu0, notices as u64))
    })?;
    Ok(json!({
        "findings": read,
        "publish_seconds": publish_seconds,
        "notifications": notices,
        "wall_seconds": wall,
        "meshguard_cpu_seconds": cpu,
        "findings_per_second_wall": read as f64 / wall,
        "findings_per_cpu_second": read as f64 / cpu.max(1e-9),
    }))
}

/// Arrival times (Unix ms) of block actions at the webhook receiver, by offender.
type Arrivals = Arc<Mutex<Vec<(Uuid, i64, i64)>>>;

async fn start_receiver() -> anyhow::Result<(Arrivals, u16)> {
    use axum::extract::State;
    let arrivals: Arrivals = Arc::default();
    async fn hook(State(arrivals): State<Arrivals>, body: axum::body::Bytes) -> &'static str {
        let now = chrono::Utc::now().timestamp_millis();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let data = &body["data"];
        let uuid = data["uuid"].as_str().and_then(|u| Uuid::parse_str(u).ok());
        let since = data["since"].as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()).map(|t| t.timestamp_millis());
        if let (Some(uuid), Some(since), Some("block")) = (uuid, since, data["action"].as_str()) {
            arrivals.lock().unwrap_or_else(|p| p.into_inner()).push((uuid, since, now));
        }
        "ok"
    }
    let app = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((arrivals, port))
}

fn latency_phase(
    base: &Config,
    kafka: &KafkaConfig,
    topics: &Topics,
    args: &BenchArgs,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<serde_json::Value> {
    let mut base = base.clone();
    base.topics = topics.clone();
    let (pipeline_cfg, dir) = fresh_config(&base, "enforcer-latency")?;
    let stop = Arc::new(AtomicBool::new(false));

    // The enforcement topic's reader: `blocked` records, latency from their `since`.
    let reader = latency_reader(kafka, "enforcement-reader", &topics.enforcement, "earliest", stop.clone(), |m| {
        m.payload()
            .and_then(|p| serde_json::from_slice::<meshguard_schemas::output::EnforcementState>(p).ok())
            .filter(|s| s.state == meshguard_schemas::EnforcementStateKind::Blocked)
            .map(|s| s.since)
    })?;
    // The broker's own share: the crossing attempts read back from the messages topic by a
    // consumer like the one above (one hop through the broker; the state takes two).
    let hop_reader = latency_reader(kafka, "messages-reader", &topics.messages, "earliest", stop.clone(), |m| {
        m.payload().filter(|p| p.windows(CROSSING.len()).any(|w| w == CROSSING)).and(m.timestamp().to_millis())
    })?;

    // The enforcer, with a webhook target at the receiver, on the runtime's workers.
    let (arrivals, port) = runtime.block_on(start_receiver())?;
    let target: TargetConfig = toml_target(port)?;
    let enforcer_cfg = enforcer_config(&base, "latency", dir.path(), vec![target]);
    let registry = prometheus::Registry::new();
    let service =
        runtime.block_on(EnforcerService::start(enforcer_cfg, kafka, topics.clone(), &registry)).context("starting the enforcer")?;
    let (enforcer_stop_tx, enforcer_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let enforcer = runtime.spawn(service.run(async move {
        let _ = enforcer_stop_rx.await;
    }));

    let kafka_p = kafka.clone();
    let pipeline_stop = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let pipeline = std::thread::spawn(move || run_pipeline_until(pipeline_cfg, &kafka_p, u64::MAX, pipeline_stop, Some(ready_tx)));
    if ready_rx.recv_timeout(Duration::from_secs(120)).is_err() {
        stop.store(true, Ordering::Relaxed);
        return match pipeline.join() {
            Ok(Err(e)) => Err(e.context("starting the latency-phase pipeline")),
            _ => Err(anyhow::anyhow!("the latency-phase pipeline did not start within 120 s")),
        };
    }

    // A new offender every 1/rate s: five attempts with invalid credentials, the fifth crossing.
    let sink = KafkaSink::new(kafka)?;
    let offenders = args.latency_rate * args.latency_seconds;
    let every = Duration::from_secs_f64(1.0 / args.latency_rate as f64);
    let started = Instant::now();
    for i in 0..offenders {
        let due = started + every.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (offender, target) = (uuid_of(6, i), uuid_of(7, i % 100));
        let key = offender.hyphenated().to_string();
        let now = chrono::Utc::now().timestamp_millis();
        for j in 0..5u64 {
            let mut attempt =
                json!({"id": uuid_of(8, i * 5 + j), "ts": now, "action": "send", "from": offender, "to": target, "auth": "invalid"});
            if j == 4 {
                // Marks the crossing attempt for the messages reader (an optional field the contract allows).
                attempt["payload_type"] = json!("bench.crossing");
            }
            sink.send_record(&topics.messages, key.as_bytes(), Some(attempt.to_string().as_bytes()), Some(now))?;
        }
        sink.flush(Duration::from_secs(10))?;
    }
    // Wait (bounded) until every block has reached the receiver.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (arrivals.lock().unwrap_or_else(|p| p.into_inner()).len() as u64) < offenders && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = enforcer_stop_tx.send(());
    runtime.block_on(enforcer).map_err(|_| anyhow::anyhow!("the enforcer task panicked"))??;
    let _ = pipeline.join();
    let latencies = |samples: Vec<crate::bench::Sample>| samples.into_iter().map(|s| s.latency).collect::<Vec<i64>>();
    let on_kafka = latencies(reader.join().map_err(|_| anyhow::anyhow!("the enforcement reader panicked"))?);
    let hops = latencies(hop_reader.join().map_err(|_| anyhow::anyhow!("the messages reader panicked"))?);
    let applied: Vec<i64> = arrivals.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(_, since, at)| at - since).collect();
    let counted = |count_key: &str, latencies: Vec<i64>| {
        let mut out = json!({ count_key: latencies.len() });
        if let (Some(out), serde_json::Value::Object(pcts)) = (out.as_object_mut(), percentiles(latencies)) {
            out.extend(pcts);
        }
        out
    };
    Ok(json!({
        "offenders_per_second": args.latency_rate,
        "seconds": args.latency_seconds,
        "offenders": offenders,
        "attempt_on_kafka": counted("attempts", hops),
        "state_on_kafka": counted("blocks", on_kafka),
        "applied_at_webhook": counted("blocks", applied),
    }))
}

/// The mark of the attempt that crosses the threshold, in its payload type.
const CROSSING: &[u8] = b"bench.crossing";

/// The webhook target of the latency phase, as configuration would give it.
fn toml_target(port: u16) -> anyhow::Result<TargetConfig> {
    let value = json!({"type": "webhook", "name": "bench", "url": format!("http://127.0.0.1:{port}/hook"), "secret": WEBHOOK_SECRET});
    serde_json::from_value(value).context("the bench's webhook target")
}
