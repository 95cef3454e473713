//! Test-only helpers: a real Kafka-protocol broker on loopback, and the few client calls tests
//! need around it (create topics, produce, read a topic back); and a real Mosquitto 2 with its
//! dynamic-security plugin ([`Mosquitto`], in `mosquitto.rs`) for the enforcer's tests.
//!
//! This crate owns the lifecycle of one [`tansu`](https://github.com/tansu-io/tansu) broker
//! process per [`Broker`], each with its own throw-away storage and its own free port on
//! `127.0.0.1`, so tests never share state and can run in parallel. It must never skip a test
//! when the broker is missing (it fails with the command that installs it), never talk to
//! anything but `127.0.0.1`, and never be a dependency of production code.
//!
//! ```text
//!  test ──create_topics / produce (async)──┐
//!                                          ▼
//!  Broker::start ── spawns ──▶ tansu broker --listener-url tcp://127.0.0.1:PORT (SQLite in a temp dir)
//!                                          ▲
//!  test ──consume_all / consume_available (blocking)──┘
//! ```
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! let broker = meshguard_testkit::Broker::start()?;
//! meshguard_testkit::create_topics(&broker.bootstrap(), &[("t", 3, false)]).await?;
//! meshguard_testkit::produce(&broker.bootstrap(), "t", &[(Some(b"k".to_vec()), Some(b"v".to_vec()), None)]).await?;
//! let records = meshguard_testkit::consume_all(&broker.bootstrap(), "t", 1, Duration::from_secs(10))?;
//! assert_eq!(records.len(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! What tansu 0.6 does and does not support is pinned down by `tests/broker.rs`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

mod mosquitto;
pub use mosquitto::{MOSQUITTO_BIN_ENV, MOSQUITTO_CTRL_ENV, MOSQUITTO_DYNSEC_ENV, Mosquitto};

/// Environment variable naming the tansu binary; overrides the cache location.
pub const TANSU_BIN_ENV: &str = "MESHGUARD_TANSU_BIN";

/// tansu's storage, relative to the broker's temporary directory. Not `memory://`: in tansu 0.6
/// that engine reports the high watermark as the last batch's base offset + 1 and answers
/// timestamp lookups by storage write time, so watermarks (and `consume_available`) are wrong.
/// The SQLite engine gets both right and applies `cleanup.policy=compact` in its maintenance
/// pass (at start-up, then every 10 minutes).
const STORAGE_ENGINE: &str = "sqlite://tansu.db";

/// How long [`Broker::start`] waits for the broker to answer a metadata request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one metadata probe may take; short, so an early exit is noticed quickly.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Free ports are found by binding and releasing them, so another process may grab one before
/// tansu binds it; that race is retried this many times.
const PORT_ATTEMPTS: usize = 3;

/// Lines of the broker's log included in error messages and printed when a test panics.
const LOG_TAIL_LINES: usize = 40;

/// Default timeout of admin operations and of waiting for created topics to appear.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// A running tansu broker on `127.0.0.1`, storing into a temporary directory that goes with it.
/// Dropping it kills the process.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    port: u16,
    log_path: PathBuf,
    // Holds the log file; removed when the broker is dropped.
    _dir: tempfile::TempDir,
}

/// Why one start attempt failed: a lost port race is retried, anything else is final.
enum StartError {
    PortTaken(anyhow::Error),
    Fatal(anyhow::Error),
}

impl Broker {
    /// Starts a fresh broker on a free loopback port and returns once it answers a Kafka metadata
    /// request.
    ///
    /// The binary is `$MESHGUARD_TANSU_BIN`, else
    /// `${MESHGUARD_CACHE:-$HOME/.cache/meshguard}/tansu/bin/tansu`. Fails (never skips) when it
    /// is missing, when the process exits before it is ready (the error holds its log's tail), or
    /// when it is not ready within 30 s.
    pub fn start() -> anyhow::Result<Broker> {
        let bin = tansu_binary()?;
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            match Self::start_once(&bin) {
                Ok(broker) => return Ok(broker),
                Err(StartError::PortTaken(e)) => last = Some(e),
                Err(StartError::Fatal(e)) => return Err(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no start attempt was made"))
            .context(format!("tansu lost the race for a free port {PORT_ATTEMPTS} times")))
    }

    fn start_once(bin: &Path) -> Result<Broker, StartError> {
        let fatal = StartError::Fatal;
        let port = free_port().map_err(fatal)?;
        let dir = tempfile::Builder::new()
            .prefix("meshguard-tansu-")
            .tempdir()
            .context("creating a temporary directory for the broker log")
            .map_err(fatal)?;
        let log_path = dir.path().join("tansu.log");
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display())).map_err(fatal)?;
        let log_err = log.try_clone().context("duplicating the log file handle").map_err(fatal)?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", STORAGE_ENGINE, "--cluster-id", "meshguard-test"])
            // The SQLite file is resolved against the working directory: keep it in `dir`.
            .current_dir(dir.path())
            // tansu also reads these from the environment; a test must not inherit them.
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))
            .map_err(fatal)?;
        let mut broker = Broker { child, port, log_path, _dir: dir };
        match broker.wait_ready() {
            Ok(()) => {
                tracing::debug!(message = "Broker ready.", port, pid = broker.child.id());
                Ok(broker)
            }
            Err(e) if broker.log_tail().contains("AddrInUse") => Err(StartError::PortTaken(e)),
            Err(e) => Err(StartError::Fatal(e)),
        }
    }

    /// Polls with metadata requests until the broker lists itself, the process exits, or
    /// [`READY_TIMEOUT`] passes.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let probe: BaseConsumer = client_config(&self.bootstrap())?
            // The broker is expected within milliseconds; don't let librdkafka back off for seconds.
            .set("reconnect.backoff.ms", "20")
            .set("reconnect.backoff.max.ms", "200")
            .create()
            .context("creating the readiness probe client")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("checking the broker process")? {
                bail!("tansu exited before it was ready ({status}); log {}:\n{}", self.log_path.display(), self.log_tail());
            }
            let last_error = match probe.fetch_metadata(None, PROBE_TIMEOUT) {
                Ok(metadata) if !metadata.brokers().is_empty() => return Ok(()),
                Ok(_) => String::from("metadata lists no brokers"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "tansu did not answer a metadata request on {} within {READY_TIMEOUT:?} \
                     (last error: {last_error}); log {}:\n{}",
                    self.bootstrap(),
                    self.log_path.display(),
                    self.log_tail()
                );
            }
        }
    }

    /// The bootstrap address clients use: `127.0.0.1:PORT`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The last 40 lines of the broker's stdout and stderr, for diagnostics.
    pub fn log_tail(&self) -> String {
        match std::fs::read(&self.log_path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(LOG_TAIL_LINES);
                lines[from..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log_path.display()),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The log goes with the temporary directory; a failing test is the moment it matters.
            eprintln!("--- tansu log tail ({}) ---\n{}\n---", self.bootstrap(), self.log_tail());
        }
        if let Err(error) = self.child.kill() {
            tracing::warn!(message = "Failed to kill the broker.", %error, pid = self.child.id());
        }
        if let Err(error) = self.child.wait() {
            tracing::warn!(message = "Failed to reap the broker.", %error, pid = self.child.id());
        }
    }
}

/// Where the tansu binary is, or an error that says how to install it.
fn tansu_binary() -> anyhow::Result<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let path = tansu_binary_path(var(TANSU_BIN_ENV), var("MESHGUARD_CACHE"), var("HOME"))?;
    ensure!(
        path.is_file(),
        "the tansu broker is not installed at {} (from ${TANSU_BIN_ENV} or $MESHGUARD_CACHE); \
         run `bash scripts/install-broker.sh` from the repository root (about 10 minutes the \
         first time), or set {TANSU_BIN_ENV} to an existing tansu 0.6 binary",
        path.display()
    );
    Ok(path)
}

/// `$MESHGUARD_TANSU_BIN`, else `${MESHGUARD_CACHE:-$HOME/.cache/meshguard}/tansu/bin/tansu`;
/// the same rule as `scripts/install-broker.sh`.
fn tansu_binary_path(tansu_bin: Option<OsString>, cache: Option<OsString>, home: Option<OsString>) -> anyhow::Result<PathBuf> {
    if let Some(bin) = tansu_bin {
        return Ok(PathBuf::from(bin));
    }
    let cache = match (cache, home) {
        (Some(cache), _) => PathBuf::from(cache),
        (None, Some(home)) => PathBuf::from(home).join(".cache/meshguard"),
        (None, None) => {
            bail!("cannot locate tansu: none of {TANSU_BIN_ENV}, MESHGUARD_CACHE or HOME is set")
        }
    };
    Ok(cache.join("tansu/bin/tansu"))
}

/// A loopback port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr().context("reading the bound port")?.port())
}

/// The base configuration of every client here: loopback only, IPv4 only.
fn client_config(bootstrap: &str) -> anyhow::Result<ClientConfig> {
    ensure!(
        bootstrap.strip_prefix("127.0.0.1:").is_some_and(|p| p.parse::<u16>().is_ok()),
        "test clients only talk to a loopback broker: expected `127.0.0.1:PORT`, found `{bootstrap}`"
    );
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap).set("broker.address.family", "v4").set("client.id", "meshguard-testkit");
    Ok(config)
}

/// Creates topics, each as `(name, partitions, compacted)`, with replication factor 1; a
/// compacted topic gets `cleanup.policy=compact`.
///
/// A topic that already exists counts as created (its settings are not checked). Returns once
/// the broker's metadata lists every topic with its partitions.
pub async fn create_topics(bootstrap: &str, topics: &[(&str, i32, bool)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap)?.create().context("creating the admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|&(name, partitions, compacted)| {
            let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
            if compacted { topic.set("cleanup.policy", "compact") } else { topic }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let results = admin.create_topics(&new, &options).await.context("CreateTopics request")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic `{name}`: {code} ({code:?})"),
        }
    }
    let wanted: Vec<(String, usize)> = topics.iter().map(|&(name, partitions, _)| (name.to_owned(), partitions.max(0) as usize)).collect();
    let bootstrap = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || wait_for_topics(&bootstrap, &wanted)).await.context("joining the topic metadata wait")?
}

/// Blocks until metadata lists every `(topic, partitions)` with at least that many partitions.
fn wait_for_topics(bootstrap: &str, wanted: &[(String, usize)]) -> anyhow::Result<()> {
    let client: BaseConsumer = client_config(bootstrap)?.create().context("creating a metadata client")?;
    let deadline = Instant::now() + ADMIN_TIMEOUT;
    loop {
        let metadata = client.fetch_metadata(None, PROBE_TIMEOUT);
        let missing: Vec<&str> = match &metadata {
            Ok(metadata) => wanted
                .iter()
                .filter(|(name, partitions)| {
                    !metadata.topics().iter().any(|t| t.name() == name && t.error().is_none() && t.partitions().len() >= *partitions)
                })
                .map(|(name, _)| name.as_str())
                .collect(),
            Err(_) => wanted.iter().map(|(name, _)| name.as_str()).collect(),
        };
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("created topics {missing:?} are not in the broker's metadata after {ADMIN_TIMEOUT:?}: {metadata:?}");
        }
    }
}

/// One record to produce: `(key, payload, timestamp in epoch ms)`; `None` is a null key, a null
/// payload (a tombstone) or "now" respectively.
pub type ProduceRecord = (Option<Vec<u8>>, Option<Vec<u8>>, Option<i64>);

/// Produces `records` to `topic` in order, partitioned by key (librdkafka's default partitioner),
/// and returns once every one of them is acknowledged (`acks=all`), or with the first failure.
///
/// The producer is idempotent, so per-partition order holds even across retries. That costs
/// about half a second per call (librdkafka retries its first producer-id request after 500 ms
/// when no connection is up yet), so produce many records per call rather than one per call.
pub async fn produce(bootstrap: &str, topic: &str, records: &[ProduceRecord]) -> anyhow::Result<()> {
    let producer: FutureProducer = client_config(bootstrap)?
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .context("creating the producer")?;
    // Deliveries in enqueue order: on a full queue the oldest is awaited, then the send retried.
    let mut in_flight: std::collections::VecDeque<(usize, DeliveryFuture)> = Default::default();
    for (index, (key, payload, timestamp)) in records.iter().enumerate() {
        let mut record =
            FutureRecord { topic, partition: None, payload: payload.as_deref(), key: key.as_deref(), timestamp: *timestamp, headers: None };
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push_back((index, delivery));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    let (oldest, delivery) = in_flight.pop_front().ok_or_else(|| anyhow!("producer queue full with nothing in flight"))?;
                    await_delivery(topic, oldest, delivery).await?;
                }
                Err((e, _)) => {
                    return Err(anyhow!(e).context(format!("enqueueing record {index} for `{topic}`")));
                }
            }
        }
    }
    for (index, delivery) in in_flight {
        await_delivery(topic, index, delivery).await?;
    }
    Ok(())
}

async fn await_delivery(topic: &str, index: usize, delivery: DeliveryFuture) -> anyhow::Result<()> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(anyhow!(e).context(format!("delivering record {index} to `{topic}`"))),
        Err(_) => {
            bail!("the producer dropped record {index} for `{topic}` without a delivery report")
        }
    }
}

/// One consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The key, `None` when null.
    pub key: Option<Vec<u8>>,
    /// The value, `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// The partition it was read from.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
    /// Its timestamp in epoch milliseconds (create or log-append time), when it has one.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    fn from_message<M: Message>(message: &M) -> Record {
        Record {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
        }
    }
}

/// A consumer of its own fresh group that reads by manual assignment and commits nothing.
fn reader(bootstrap: &str) -> anyhow::Result<BaseConsumer> {
    client_config(bootstrap)?
        .set("group.id", format!("meshguard-testkit-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating the consumer")
}

/// The partition ids of `topic`, waiting until the broker's metadata lists it.
fn partitions_of(consumer: &BaseConsumer, topic: &str, deadline: Instant) -> anyhow::Result<Vec<i32>> {
    loop {
        // All topics, not just this one: asking for one may auto-create it on some brokers.
        let metadata = consumer.fetch_metadata(None, PROBE_TIMEOUT);
        if let Ok(metadata) = &metadata
            && let Some(t) = metadata.topics().iter().find(|t| t.name() == topic && t.error().is_none())
            && !t.partitions().is_empty()
        {
            return Ok(t.partitions().iter().map(|p| p.id()).collect());
        }
        if Instant::now() >= deadline {
            bail!("topic `{topic}` is not in the broker's metadata: {metadata:?}");
        }
    }
}

/// Assigns every partition of `topic` from its first offset.
fn assign_from_beginning(consumer: &BaseConsumer, topic: &str, partitions: &[i32]) -> anyhow::Result<()> {
    let mut assignment = TopicPartitionList::new();
    for &partition in partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning).with_context(|| format!("assigning {topic}/{partition}"))?;
    }
    consumer.assign(&assignment).with_context(|| format!("assigning `{topic}`"))
}

/// Reads `topic` from the beginning of every partition until `expected` records arrived or
/// `timeout` passed, and returns what it read (possibly fewer: the caller asserts).
///
/// Records come in per-partition order; partitions interleave arbitrarily. Reads with
/// librdkafka's default isolation, `read_committed`. Errors if the topic does not appear in the
/// metadata within `timeout` or the consumer reports an error.
pub fn consume_all(bootstrap: &str, topic: &str, expected: usize, timeout: Duration) -> anyhow::Result<Vec<Record>> {
    let deadline = Instant::now() + timeout;
    let consumer = reader(bootstrap)?;
    let partitions = partitions_of(&consumer, topic, deadline)?;
    assign_from_beginning(&consumer, topic, &partitions)?;
    let mut records = Vec::with_capacity(expected);
    while records.len() < expected {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match consumer.poll(left.min(PROBE_TIMEOUT)) {
            None | Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Ok(message)) => records.push(Record::from_message(&message)),
            Some(Err(e)) => {
                return Err(anyhow!(e).context(format!("reading `{topic}` after {} records", records.len())));
            }
        }
    }
    Ok(records)
}

/// Reads everything `topic` holds right now: fetches each partition's high watermark, then
/// reads every partition from its beginning up to it. Records appended later are left out.
///
/// Errors if the watermarks cannot be fetched or some partition is not read up to its watermark
/// within `timeout` (the message says which).
pub fn consume_available(bootstrap: &str, topic: &str, timeout: Duration) -> anyhow::Result<Vec<Record>> {
    let deadline = Instant::now() + timeout;
    let consumer = reader(bootstrap)?;
    let partitions = partitions_of(&consumer, topic, deadline)?;
    // Partition -> high watermark, for the partitions that still have records to read.
    let mut pending: HashMap<i32, i64> = HashMap::new();
    for &partition in &partitions {
        let left = deadline.saturating_duration_since(Instant::now()).max(PROBE_TIMEOUT);
        let (low, high) =
            consumer.fetch_watermarks(topic, partition, left).with_context(|| format!("fetching the watermarks of {topic}/{partition}"))?;
        if high > low {
            pending.insert(partition, high);
        }
    }
    let highs = pending.clone();
    assign_from_beginning(&consumer, topic, &partitions)?;
    let mut records = Vec::new();
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let mut detail = String::new();
            for (partition, high) in &pending {
                let _ = write!(detail, " {topic}/{partition} (high watermark {high})");
            }
            bail!("read {} records of `{topic}` but not up to the high watermark of{detail} within {timeout:?}", records.len());
        }
        match consumer.poll(left.min(PROBE_TIMEOUT)) {
            None => {}
            Some(Ok(message)) => {
                let high = highs.get(&message.partition()).copied().unwrap_or(0);
                if message.offset() < high {
                    records.push(Record::from_message(&message));
                }
                if message.offset() + 1 >= high {
                    pending.remove(&message.partition());
                }
            }
            // The end of the log: also where a partition ends in records a reader cannot see
            // (transaction markers, aborted records).
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                pending.remove(&partition);
            }
            Some(Err(e)) => {
                return Err(anyhow!(e).context(format!("reading `{topic}` after {} records", records.len())));
            }
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_binary_is_found_like_the_install_script_puts_it() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(tansu_binary_path(os("/opt/tansu"), os("/c"), os("/h")).unwrap(), Path::new("/opt/tansu"));
        assert_eq!(tansu_binary_path(None, os("/c"), os("/h")).unwrap(), Path::new("/c/tansu/bin/tansu"));
        assert_eq!(tansu_binary_path(None, None, os("/h")).unwrap(), Path::new("/h/.cache/meshguard/tansu/bin/tansu"));
        assert!(tansu_binary_path(None, None, None).is_err());
    }

    #[test]
    fn clients_only_talk_to_loopback() {
        assert!(client_config("127.0.0.1:9092").is_ok());
        for elsewhere in ["localhost:9092", "10.0.0.1:9092", "127.0.0.1:9092,10.0.0.1:9092", "127.0.0.1"] {
            let error = client_config(elsewhere).unwrap_err().to_string();
            assert!(error.contains("expected `127.0.0.1:PORT`"), "{elsewhere}: {error}");
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop, unless taken out before: a test that fails
/// before stopping what it started properly leaves nothing running.
#[derive(Debug)]
pub struct KillOnDrop(pub Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
