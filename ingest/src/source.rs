//! Reading the input topics.
//!
//! Two consumers, as in Kafka Streams:
//! - the **group consumer** reads the keyed topics (messages, identity requests) in
//!   the consumer group, so workers share their partitions; on every assignment it seeks each
//!   partition to the offset its checkpoint holds (the [`OffsetResolver`]), and it commits offsets
//!   only when told to (after a durable checkpoint);
//! - the **global consumer** reads every partition of the registry, presence and interactions
//!   topics, outside the group, so every worker holds the whole directory and every device's
//!   interaction table; it starts from the checkpointed positions or
//!   the beginning, and [`KafkaSource::catch_up_globals`] reads it to the end before detection starts.
//!
//! Payloads are copied once into a reused arena ([`TopicBuf`]): no allocation per record.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshguard_analytics::Position;
use meshguard_schemas::InputTopic;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::config::{KafkaConfig, Topics};
use crate::error::{Error, Result};

/// Where a partition's checkpoint says to resume: `Some(next offset)`, or `None` to fall back to the
/// group's committed offset (or the beginning).
pub type OffsetResolver = Arc<dyn Fn(InputTopic, i32) -> Option<i64> + Send + Sync>;

/// Called when partitions are about to be revoked, before the group can hand them to another
/// worker: the place to make this worker's outputs durable (flush the producer), so that the next
/// owner's read-back sees them.
pub type RevokeHook = Arc<dyn Fn() + Send + Sync>;

/// A change of the partitions this worker owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// These partitions are now ours (already positioned at their checkpoints).
    Assigned(Vec<(InputTopic, i32)>),
    /// These partitions are no longer ours.
    Revoked(Vec<(InputTopic, i32)>),
}

/// The raw records of one topic in one batch, in arrival order, with their bytes in one buffer.
#[derive(Debug, Default)]
pub struct TopicBuf {
    data: Vec<u8>,
    payload: Vec<Option<(u32, u32)>>,
    key: Vec<Option<(u32, u32)>>,
    /// Partition of each record.
    pub partition: Vec<i32>,
    /// Offset of each record.
    pub offset: Vec<i64>,
    /// Kafka timestamp of each record (ms; 0 when the broker gave none).
    pub timestamp_ms: Vec<i64>,
}

impl TopicBuf {
    fn push(&mut self, m: &BorrowedMessage<'_>) {
        self.push_parts(m.key(), m.payload(), m.partition(), m.offset(), m.timestamp().to_millis().unwrap_or(0));
    }

    /// Appends one record from its parts (what [`KafkaSource::poll`] does for every message).
    pub fn push_parts(&mut self, key: Option<&[u8]>, payload: Option<&[u8]>, partition: i32, offset: i64, timestamp_ms: i64) {
        let mut span = |bytes: Option<&[u8]>| {
            bytes.map(|b| {
                let start = self.data.len() as u32;
                self.data.extend_from_slice(b);
                (start, b.len() as u32)
            })
        };
        let payload = span(payload);
        let key = span(key);
        self.payload.push(payload);
        self.key.push(key);
        self.partition.push(partition);
        self.offset.push(offset);
        self.timestamp_ms.push(timestamp_ms);
    }

    fn slice(&self, span: Option<(u32, u32)>) -> Option<&[u8]> {
        span.map(|(s, l)| &self.data[s as usize..(s + l) as usize])
    }

    /// The payload of record `i` (`None`: a tombstone).
    pub fn payload(&self, i: usize) -> Option<&[u8]> {
        self.slice(self.payload[i])
    }

    /// The key of record `i`.
    pub fn key(&self, i: usize) -> Option<&[u8]> {
        self.slice(self.key[i])
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.partition.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.partition.is_empty()
    }

    /// Keeps only the records whose partition `keep` accepts (their bytes stay in the arena).
    fn retain_partitions(&mut self, keep: impl Fn(i32) -> bool) {
        // Almost always every record is kept: find the first that is not before moving anything.
        let Some(first) = self.partition.iter().position(|&p| !keep(p)) else { return };
        let mut w = first;
        for r in first + 1..self.partition.len() {
            if keep(self.partition[r]) {
                self.payload.swap(w, r);
                self.key.swap(w, r);
                self.partition.swap(w, r);
                self.offset.swap(w, r);
                self.timestamp_ms.swap(w, r);
                w += 1;
            }
        }
        self.payload.truncate(w);
        self.key.truncate(w);
        self.partition.truncate(w);
        self.offset.truncate(w);
        self.timestamp_ms.truncate(w);
    }

    /// Appends `other`'s records after this one's.
    fn append(&mut self, other: &TopicBuf) {
        let base = self.data.len() as u32;
        self.data.extend_from_slice(&other.data);
        let shift = |span: &Option<(u32, u32)>| span.map(|(s, l)| (s + base, l));
        self.payload.extend(other.payload.iter().map(shift));
        self.key.extend(other.key.iter().map(shift));
        self.partition.extend_from_slice(&other.partition);
        self.offset.extend_from_slice(&other.offset);
        self.timestamp_ms.extend_from_slice(&other.timestamp_ms);
    }

    fn clear(&mut self) {
        self.data.clear();
        self.payload.clear();
        self.key.clear();
        self.partition.clear();
        self.offset.clear();
        self.timestamp_ms.clear();
    }
}

/// The raw records of one micro-batch, per input topic. Reused from batch to batch.
#[derive(Debug, Default)]
pub struct RawBatch {
    topics: [TopicBuf; 5],
}

impl RawBatch {
    /// The records of one topic.
    pub fn topic(&self, t: InputTopic) -> &TopicBuf {
        &self.topics[t as usize]
    }

    /// The records of one topic, to append to.
    pub fn topic_mut(&mut self, t: InputTopic) -> &mut TopicBuf {
        &mut self.topics[t as usize]
    }

    /// Total records.
    pub fn len(&self) -> usize {
        self.topics.iter().map(TopicBuf::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the records of `topic` whose partition `keep` rejects: after a rebalance, records
    /// already fetched from partitions another worker now owns are that worker's to process.
    pub fn retain_partitions(&mut self, topic: InputTopic, keep: impl Fn(i32) -> bool) {
        self.topics[topic as usize].retain_partitions(keep);
    }

    /// Appends `other`'s records after this batch's, topic by topic.
    pub fn append(&mut self, other: &RawBatch) {
        for (mine, theirs) in self.topics.iter_mut().zip(&other.topics) {
            mine.append(theirs);
        }
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.topics.iter_mut().for_each(TopicBuf::clear);
    }
}

struct GroupContext {
    topics: Topics,
    resolver: OffsetResolver,
    on_revoke: RevokeHook,
    events: Arc<Mutex<Vec<RebalanceEvent>>>,
    /// Records of the assigned partitions not yet consumed, from librdkafka's last statistics
    /// (-1 until the first).
    lag: Arc<AtomicI64>,
}

/// How often librdkafka reports the group consumer's statistics (the lag gauge's refresh).
const STATISTICS_INTERVAL_MS: &str = "5000";

/// The default `fetch.wait.max.ms` of meshguard's group consumers (librdkafka's is 500): how long the
/// broker may hold a fetch that finds nothing new. A Kafka broker answers as soon as data arrives,
/// so this bounds only the idle loop (a fetch request per wait and consumer); a broker that holds
/// every fetch for the whole wait (tansu 0.6 does) adds up to twice this to every hop, and smaller
/// micro-batches. `[kafka.client]` overrides it for every consumer.
const FETCH_WAIT_MAX_MS: &str = "10";

/// meshguard's defaults for a consumer in a group (the detection workers', the enforcers'), which
/// `[kafka.client]` overrides: a crashed member's partitions move to the others after 10 s
/// (Kafka's default is 45 s).
pub const GROUP_CONSUMER_DEFAULTS: [(&str, &str); 3] =
    [("fetch.wait.max.ms", FETCH_WAIT_MAX_MS), ("session.timeout.ms", "10000"), ("heartbeat.interval.ms", "2000")];

/// The global-table consumer's default `fetch.wait.max.ms`: the alignment before a micro-batch
/// waits for its fetches whenever the registry or presence changed (see
/// [`KafkaSource::catch_up_globals`]). Measured against tansu (BENCHMARKS.md): 5 ms instead of 20
/// took the alignment from 41 to 8 ms at p50 with the directory changing.
const GLOBAL_FETCH_WAIT_MAX_MS: &str = "5";

/// The default `fetch.wait.max.ms` of the readers of meshguard's own control and enforcement
/// topics, which change rarely.
const READER_FETCH_WAIT_MAX_MS: &str = "20";

/// The part of librdkafka's statistics the lag needs (the rest of the document is skipped).
#[derive(serde::Deserialize)]
struct LagStatistics {
    #[serde(default)]
    topics: std::collections::HashMap<String, LagTopic>,
}

#[derive(serde::Deserialize)]
struct LagTopic {
    #[serde(default)]
    partitions: std::collections::HashMap<String, LagPartition>,
}

#[derive(serde::Deserialize)]
struct LagPartition {
    partition: i32,
    desired: bool,
    hi_offset: i64,
    app_offset: i64,
    committed_offset: i64,
}

/// Records not yet consumed, summed over the partitions the consumer wants (its assignment): the
/// high watermark of the last fetch minus the next offset handed to the application (or, before
/// the first record, the committed offset). Partitions whose watermark is not known yet count 0.
fn lag_of(stats: &[u8]) -> Option<i64> {
    let stats: LagStatistics = serde_json::from_slice(stats).ok()?;
    let mut lag = 0;
    for p in stats.topics.values().flat_map(|t| t.partitions.values()) {
        if p.partition < 0 || !p.desired || p.hi_offset < 0 {
            continue;
        }
        let at = if p.app_offset >= 0 { p.app_offset } else { p.committed_offset.max(0) };
        lag += (p.hi_offset - at).max(0);
    }
    Some(lag)
}

impl ClientContext for GroupContext {
    /// Statistics arrive in the pipeline's own `poll`, every [`STATISTICS_INTERVAL_MS`]: the lag
    /// costs no request of its own (a per-partition watermark query took 400 ms per checkpoint).
    fn stats_raw(&self, statistics: &[u8]) {
        if let Some(lag) = lag_of(statistics) {
            self.lag.store(lag, Ordering::Relaxed);
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if matches!(rebalance, Rebalance::Revoke(_)) {
            (self.on_revoke)();
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            warn!(message = "Committing offsets failed; the checkpoint stands, the next one commits again.", error = %e);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (tpl, assigned) = match rebalance {
            Rebalance::Assign(tpl) => (*tpl, true),
            Rebalance::Revoke(tpl) => (*tpl, false),
            Rebalance::Error(e) => {
                warn!(message = "Rebalance failed.", error = %e);
                return;
            }
        };
        let mut partitions = Vec::new();
        let mut positioned = TopicPartitionList::new();
        let mut any_checkpoint = false;
        for e in tpl.elements() {
            let Some(topic) = self.topics.input_of(e.topic()) else {
                continue;
            };
            partitions.push((topic, e.partition()));
            let offset = match (self.resolver)(topic, e.partition()) {
                Some(o) => {
                    any_checkpoint = true;
                    Offset::Offset(o)
                }
                None => Offset::Stored,
            };
            // Cannot fail for a fresh list with a valid offset.
            let _ = positioned.add_partition_offset(e.topic(), e.partition(), offset);
        }
        if assigned && any_checkpoint {
            // Re-assign with explicit offsets: the checkpoint, not the committed offset, says where
            // this partition's state is (they differ after a crash between checkpoint and commit).
            if let Err(e) = consumer.assign(&positioned) {
                warn!(message = "Seeking assigned partitions to their checkpoints failed.", error = %e);
            }
        }
        info!(message = if assigned { "Partitions assigned." } else { "Partitions revoked." }, count = partitions.len());
        let event = if assigned { RebalanceEvent::Assigned(partitions) } else { RebalanceEvent::Revoked(partitions) };
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }
}

/// The input side of a worker. See the module docs.
pub struct KafkaSource {
    group: BaseConsumer<GroupContext>,
    global: BaseConsumer,
    /// Asks where the global topics end, on a connection of its own (see [`ends_client`]).
    global_ends: BaseConsumer,
    /// Reads the control topic (manual overrides) in full, from the beginning, outside the group.
    control: TopicReader,
    /// Reads the compacted enforcement topic in full, likewise: other workers' enforcement state.
    enforcement: TopicReader,
    topics: Topics,
    events: Arc<Mutex<Vec<RebalanceEvent>>>,
    lag: Arc<AtomicI64>,
}

/// Reads `consumer`'s assignment up to where it ends now, handing every record to `visit`; returns
/// how many it read. One `ListOffsets` request finds every partition's end (a timestamp of -1,
/// `Offset::End`, asks for the latest offset); a partition is then read until the consumer's
/// position reaches its end. The start of a partition nothing was consumed from yet (the assigned
/// offset, or for `Beginning` the log start, which compaction and retention move past 0) is looked
/// up only then, and at most once per call: `fetch_watermarks` costs two requests.
///
/// `ends` sends those requests: a client of its own ([`ends_client`]), not `consumer`.
pub fn read_to_end(
    consumer: &BaseConsumer,
    ends: &BaseConsumer,
    what: &str,
    timeout: Duration,
    visit: impl FnMut(&BorrowedMessage<'_>),
) -> Result<usize> {
    read_topics_to_end(consumer, ends, what, |_| true, timeout, visit)
}

/// A client that only asks where partitions end and start for [`read_to_end`]: never assigned,
/// never polled. A broker answers the requests of one connection in order, and a consumer that has
/// read everything has a fetch in flight that the broker holds for up to `fetch.wait.max.ms`,
/// waiting for data; a `ListOffsets` sent by the consumer itself would queue behind that fetch
/// (librdkafka has one connection per broker and client). On a connection of its own it costs one
/// round trip.
pub fn ends_client(kafka: &KafkaConfig, client: &str) -> rdkafka::error::KafkaResult<BaseConsumer> {
    kafka.consumer_config_with(&[]).set("group.id", client).set("enable.auto.commit", "false").create()
}

/// [`read_to_end`] for the assigned partitions of the topics `wanted` accepts only. Records of the
/// other topics fetched meanwhile are handed to `visit` too (nothing is skipped), but nothing
/// waits for them.
fn read_topics_to_end(
    consumer: &BaseConsumer,
    ends_client: &BaseConsumer,
    what: &str,
    wanted: impl Fn(&str) -> bool,
    timeout: Duration,
    mut visit: impl FnMut(&BorrowedMessage<'_>),
) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    let assignment = consumer.assignment().map_err(Error::kafka(format!("reading the assignment of {what}")))?;
    let mut query = TopicPartitionList::new();
    for e in assignment.elements().iter().filter(|e| wanted(e.topic())) {
        query.add_partition_offset(e.topic(), e.partition(), Offset::End).map_err(Error::kafka("building the end-offset query"))?;
    }
    if query.count() == 0 {
        return Ok(0);
    }
    let asked = Instant::now();
    let ends = ends_client.offsets_for_times(query, timeout).map_err(Error::kafka(format!("reading the end of {what}")))?;
    tracing::trace!(message = "End offsets read.", what, us = asked.elapsed().as_micros() as u64);
    let mut targets: Vec<(String, i32, Option<i64>, i64)> = Vec::new();
    for e in ends.elements() {
        let end = e.offset().to_raw().unwrap_or(0);
        if end > 0 {
            let start = match assignment.find_partition(e.topic(), e.partition()).map(|a| a.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
            targets.push((e.topic().to_owned(), e.partition(), start, end));
        }
    }
    // Where the consumer is in each target partition: read once here, then advanced by the records
    // handed out (a record at offset `o` puts the position at `o + 1`), and read again only when a
    // poll comes back empty. `position()` asks librdkafka's main thread for the assignment, a
    // round trip between threads; once per record, it cost more than the records did.
    let mut at: Vec<Option<i64>> = vec![None; targets.len()];
    let mut refresh = true;
    let mut read = 0;
    loop {
        if refresh {
            let positions = consumer.position().map_err(Error::kafka(format!("reading the positions in {what}")))?;
            for ((topic, partition, _, _), at) in targets.iter().zip(&mut at) {
                let now = positions.find_partition(topic, *partition).and_then(|e| e.offset().to_raw()).filter(|o| *o >= 0);
                *at = now.max(*at);
            }
            refresh = false;
        }
        let mut behind = false;
        for ((topic, partition, start, end), at) in targets.iter_mut().zip(&at) {
            let at = match at {
                Some(at) => *at,
                None => {
                    *start.get_or_insert_with(|| ends_client.fetch_watermarks(topic, *partition, timeout).map(|(low, _)| low).unwrap_or(0))
                }
            };
            behind |= at < *end;
        }
        if !behind {
            tracing::trace!(message = "Read to the end.", what, read, us = asked.elapsed().as_micros() as u64);
            return Ok(read);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout { what: format!("reading {what} to their end"), after_ms: timeout.as_millis() as u64 });
        }
        match consumer.poll(REFRESH_AFTER) {
            Some(Ok(m)) => {
                if let Some(i) = targets.iter().position(|(topic, partition, _, _)| *partition == m.partition() && topic == m.topic()) {
                    at[i] = at[i].max(Some(m.offset() + 1));
                }
                visit(&m);
                read += 1;
            }
            Some(Err(e)) => warn!(message = "Consumer error.", what, error = %e),
            // Nothing fetched for a while: the position may have moved past records that are not
            // handed out (transaction markers, offsets compacted away at a partition's end).
            None => refresh = true,
        }
    }
}

/// `wait` rounded up to whole milliseconds, for a consumer's poll. rdkafka hands librdkafka the
/// wait in whole milliseconds, rounded down, and polls again without waiting until the rest of it
/// has passed: with a fraction of a millisecond left, the poll's thread spins (the idle pipeline's
/// thread spent about 2 % of a core that way; rdkafka's producers do the same, see `sink::PolledProducer`).
pub(crate) fn whole_millis(wait: Duration) -> Duration {
    Duration::from_millis(u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX))
}

/// How long [`read_topics_to_end`] waits for a record before it reads the consumer's positions
/// again.
const REFRESH_AFTER: Duration = Duration::from_millis(10);

/// Reads every partition of one topic from its beginning, outside any group (meshguard's own
/// control and enforcement topics; the enforcer's registry table).
pub struct TopicReader {
    consumer: BaseConsumer,
    /// Made by the first [`TopicReader::read_to_end`] (see [`ends_client`]).
    ends: std::sync::OnceLock<BaseConsumer>,
    kafka: KafkaConfig,
    client: String,
    topic: String,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader").field("topic", &self.topic).finish_non_exhaustive()
    }
}

/// A consumer for reading a topic by assigned positions, outside any group's assignment:
/// `client` names it (`group.id`; nothing is committed), reads start from the earliest offset.
pub fn reader_consumer(kafka: &KafkaConfig, client: &str) -> rdkafka::error::KafkaResult<BaseConsumer> {
    kafka
        .consumer_config_with(&[("fetch.wait.max.ms", READER_FETCH_WAIT_MAX_MS)])
        .set("group.id", client)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
}

impl TopicReader {
    /// A reader of `topic`; `client` names the client (`group.id`; nothing is committed).
    pub fn new(kafka: &KafkaConfig, topic: &str, client: &str) -> Result<Self> {
        let consumer = reader_consumer(kafka, client).map_err(Error::kafka(format!("creating the reader of {topic}")))?;
        Ok(Self { consumer, ends: std::sync::OnceLock::new(), kafka: kafka.clone(), client: client.to_owned(), topic: topic.to_owned() })
    }

    /// Assigns every partition of the topic from its beginning.
    pub fn start(&self, timeout: Duration) -> Result<()> {
        let name = &self.topic;
        let md = self.consumer.fetch_metadata(Some(name), timeout).map_err(Error::kafka(format!("reading metadata of {name}")))?;
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(name, p.id(), Offset::Beginning)
                    .map_err(Error::kafka(format!("building the assignment of {name}")))?;
            }
        }
        self.consumer.assign(&tpl).map_err(Error::kafka(format!("assigning {name}")))
    }

    /// Hands every record fetched so far to `visit`, without waiting; returns how many.
    pub fn poll_with(&self, mut visit: impl FnMut(&BorrowedMessage<'_>)) -> usize {
        let mut read = 0;
        while let Some(m) = self.consumer.poll(Duration::ZERO) {
            match m {
                Ok(m) => {
                    visit(&m);
                    read += 1;
                }
                Err(e) => warn!(message = "Consumer error.", topic = %self.topic, error = %e),
            }
        }
        read
    }

    /// The records fetched so far, decoded from JSON, without waiting. A record that does not
    /// decode is logged and skipped (it changes nothing); a tombstone is skipped.
    pub fn poll_json<T: serde::de::DeserializeOwned>(&self, out: &mut Vec<T>) {
        self.poll_with(|m| match m.payload().map(serde_json::from_slice::<T>) {
            Some(Ok(v)) => out.push(v),
            Some(Err(e)) => {
                warn!(message = "Skipping a record that does not decode.", topic = %self.topic, offset = m.offset(), error = %e)
            }
            None => {}
        });
    }

    /// Reads the topic up to where it ends now (see [`read_to_end`]), handing every record to `visit`.
    pub fn read_to_end(&self, timeout: Duration, visit: impl FnMut(&BorrowedMessage<'_>)) -> Result<usize> {
        let ends = match self.ends.get() {
            Some(ends) => ends,
            None => {
                let ends = ends_client(&self.kafka, &format!("{}-ends", self.client))
                    .map_err(Error::kafka(format!("creating the end-offset client of {}", self.topic)))?;
                self.ends.get_or_init(|| ends)
            }
        };
        read_to_end(&self.consumer, ends, &self.topic, timeout, visit)
    }
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource").field("topics", &self.topics).finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Connects both consumers and subscribes the group consumer to the keyed topics.
    pub fn new(kafka: &KafkaConfig, topics: Topics, resolver: OffsetResolver, on_revoke: RevokeHook) -> Result<Self> {
        let events = Arc::new(Mutex::new(Vec::new()));
        let lag = Arc::new(AtomicI64::new(-1));
        let context = GroupContext { topics: topics.clone(), resolver, on_revoke, events: events.clone(), lag: lag.clone() };
        let mut config = kafka.consumer_config_with(&GROUP_CONSUMER_DEFAULTS);
        if let Some(id) = &kafka.instance_id {
            config.set("group.instance.id", id);
        }
        let group: BaseConsumer<GroupContext> = config
            .set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // The lag gauge reads librdkafka's statistics.
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
            .create_with_context(context)
            .map_err(Error::kafka("creating the group consumer"))?;
        group.subscribe(&[&topics.messages, &topics.identity_requests]).map_err(Error::kafka("subscribing to the input topics"))?;
        let global: BaseConsumer = kafka
            .consumer_config_with(&[("fetch.wait.max.ms", GLOBAL_FETCH_WAIT_MAX_MS)])
            .set("group.id", format!("{}-global", kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(Error::kafka("creating the global-table consumer"))?;
        let global_ends = ends_client(kafka, &format!("{}-global-ends", kafka.group_id))
            .map_err(Error::kafka("creating the global tables' end-offset client"))?;
        let control = TopicReader::new(kafka, &topics.control, &format!("{}-control", kafka.group_id))?;
        let enforcement = TopicReader::new(kafka, &topics.enforcement, &format!("{}-enforcement", kafka.group_id))?;
        Ok(Self { group, global, global_ends, control, enforcement, topics, events, lag })
    }

    /// Starts reading the control topic and the enforcement topic from their beginnings: every
    /// worker reads every manual override in order (the engine applies each once; see
    /// `Engine::apply_control`) and every worker's enforcement state.
    pub fn start_readers(&self, timeout: Duration) -> Result<()> {
        self.control.start(timeout)?;
        self.enforcement.start(timeout)
    }

    /// The manual overrides fetched so far, without waiting.
    pub fn poll_control(&self, out: &mut Vec<meshguard_schemas::output::ControlCommand>) {
        self.control.poll_json(out);
    }

    /// The enforcement records fetched so far, without waiting.
    pub fn poll_enforcement(&self, out: &mut Vec<meshguard_schemas::output::EnforcementState>) {
        self.enforcement.poll_json(out);
    }

    /// Number of partitions of `topic`, from the cluster's metadata.
    pub fn partition_count(&self, topic: &str, timeout: Duration) -> Result<usize> {
        let md = self.global.fetch_metadata(Some(topic), timeout).map_err(Error::kafka(format!("reading metadata of {topic}")))?;
        Ok(md.topics().iter().map(|t| t.partitions().len()).sum())
    }

    /// Assigns every partition of the global topics, each from `positions` (next offsets from the
    /// checkpoint) or from the beginning.
    pub fn start_globals(&self, positions: &[Position], timeout: Duration) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for topic in InputTopic::GLOBAL {
            let name = self.topics.input(topic);
            let md = self.global.fetch_metadata(Some(name), timeout).map_err(Error::kafka(format!("reading metadata of {name}")))?;
            for t in md.topics() {
                for p in t.partitions() {
                    let offset = positions
                        .iter()
                        .find(|pos| pos.topic == topic && pos.partition == p.id())
                        .map_or(Offset::Beginning, |pos| Offset::Offset(pos.next_offset));
                    tpl.add_partition_offset(name, p.id(), offset).map_err(Error::kafka("building the global assignment"))?;
                }
            }
        }
        self.global.assign(&tpl).map_err(Error::kafka("assigning the global topics"))
    }

    /// Reads the global topics up to where they end now into `out`; returns how many records it
    /// read. At start this is the bootstrap of the global tables (detection must not judge
    /// attempts against a half-read directory); during the run the pipeline calls it after each
    /// poll that fetched attempts, so a registry change or presence record the platform published
    /// before those attempts is applied before they are judged, even though the two consumers fetch
    /// independently (Kafka Streams' timestamp synchronisation solves the same problem by waiting;
    /// here one `ListOffsets` request for all global partitions tells how far to read).
    pub fn catch_up_globals(&self, out: &mut RawBatch, timeout: Duration) -> Result<usize> {
        self.catch_up(&InputTopic::GLOBAL, out, timeout)
    }

    /// [`KafkaSource::catch_up_globals`] for some of the global topics only: attempts need the
    /// registry and presence, not the interactions, and a broker that answers `ListOffsets` one
    /// partition at a time (tansu) then has fewer to answer. Records of the other global topics
    /// fetched meanwhile are read into `out` too.
    pub fn catch_up(&self, topics: &[InputTopic], out: &mut RawBatch, timeout: Duration) -> Result<usize> {
        let names: Vec<&str> = topics.iter().filter(|t| t.is_global()).map(|&t| self.topics.input(t)).collect();
        let what = names.join(", ");
        read_topics_to_end(&self.global, &self.global_ends, &what, |topic| names.contains(&topic), timeout, |m| self.push(out, m))
    }

    fn push(&self, out: &mut RawBatch, m: &BorrowedMessage<'_>) {
        if let Some(t) = self.topics.input_of(m.topic()) {
            out.topics[t as usize].push(m);
        }
    }

    /// Fills `out` with up to `max_records` records: first whatever the global topics have
    /// (without waiting), then the keyed topics, waiting at most `max_wait` for their first record
    /// and, after it, at most `linger` for more whenever nothing more is fetched.
    pub fn poll(&self, out: &mut RawBatch, max_records: usize, max_wait: Duration, linger: Duration) {
        while out.len() < max_records {
            match self.global.poll(Duration::ZERO) {
                Some(Ok(m)) => self.push(out, &m),
                Some(Err(e)) => warn!(message = "Global-table consumer error.", error = %e),
                None => break,
            }
        }
        // Take what is already fetched without waiting (and without reading the clock per record);
        // only when the queue runs dry, wait for more until the batch's deadline: `max_wait` with
        // nothing in hand, `linger` after the first record of the group's topics.
        let started = Instant::now();
        let mut deadline = started + max_wait;
        let mut first = true;
        let mut wait = Duration::ZERO;
        while out.len() < max_records {
            match self.group.poll(wait) {
                Some(Ok(m)) => {
                    self.push(out, &m);
                    if first {
                        first = false;
                        deadline = deadline.min(Instant::now() + linger);
                    }
                    wait = Duration::ZERO;
                }
                Some(Err(e)) => warn!(message = "Consumer error.", error = %e),
                None if wait.is_zero() => {
                    wait = whole_millis(deadline.saturating_duration_since(Instant::now()));
                    if wait.is_zero() {
                        break;
                    }
                }
                None => break,
            }
        }
    }

    /// Rebalance events since the last call.
    pub fn take_rebalance_events(&self) -> Vec<RebalanceEvent> {
        self.events.lock().map(|mut e| std::mem::take(&mut *e)).unwrap_or_default()
    }

    /// Commits next offsets of the keyed topics' partitions to the group (asynchronously). Call only
    /// after the checkpoint holding the same offsets is durable.
    pub fn commit(&self, positions: &[Position]) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for p in positions {
            if p.topic.is_global() {
                continue;
            }
            tpl.add_partition_offset(self.topics.input(p.topic), p.partition, Offset::Offset(p.next_offset))
                .map_err(Error::kafka("building the commit"))?;
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        // Asynchronous: the commit only mirrors a checkpoint that is already durable, and a round
        // trip on the pipeline's thread would delay every attempt behind it. A failure is logged
        // by the commit callback; the next checkpoint commits again.
        self.group.commit(&tpl, CommitMode::Async).map_err(Error::kafka("committing offsets"))
    }

    /// Messages not yet consumed by this worker, summed over its partitions of the keyed topics
    /// (high watermark minus position), for the lag metric: librdkafka's latest statistics, so
    /// reading it costs nothing; `None` until the first statistics arrive (within 5 s of polling).
    pub fn lag(&self) -> Option<i64> {
        Some(self.lag.load(Ordering::Relaxed)).filter(|l| *l >= 0)
    }
}

#[cfg(test)]
mod wait_tests {
    use std::time::Duration;

    use super::whole_millis;

    #[test]
    fn consumer_waits_are_whole_milliseconds_rounded_up() {
        assert_eq!(whole_millis(Duration::ZERO), Duration::ZERO);
        assert_eq!(whole_millis(Duration::from_micros(1)), Duration::from_millis(1));
        assert_eq!(whole_millis(Duration::from_micros(49_001)), Duration::from_millis(50));
        assert_eq!(whole_millis(Duration::from_millis(50)), Duration::from_millis(50));
        assert_eq!(whole_millis(Duration::from_nanos(50_000_001)), Duration::from_millis(51));
    }
}

#[cfg(test)]
mod lag_tests {
    use super::lag_of;

    /// An excerpt of librdkafka's statistics for a consumer of two topics (fields it does not
    /// read left in, as librdkafka sends them).
    const STATS: &str = r#"{
      "name": "rdkafka#consumer-1", "type": "consumer", "ts": 1, "brokers": {"127.0.0.1:9092/1": {"rtt": {"avg": 1}}},
      "topics": {
        "platform.messages.v1": {"topic": "platform.messages.v1", "partitions": {
          "0": {"partition": 0, "desired": true, "hi_offset": 120, "app_offset": 100, "committed_offset": 90, "consumer_lag": 30},
          "1": {"partition": 1, "desired": true, "hi_offset": 50, "app_offset": -1001, "committed_offset": 45, "consumer_lag": 5},
          "2": {"partition": 2, "desired": false, "hi_offset": 500, "app_offset": -1001, "committed_offset": -1001, "consumer_lag": -1},
          "-1": {"partition": -1, "desired": false, "hi_offset": -1, "app_offset": -1001, "committed_offset": -1001, "consumer_lag": -1}
        }},
        "platform.identity-requests.v1": {"topic": "platform.identity-requests.v1", "partitions": {
          "0": {"partition": 0, "desired": true, "hi_offset": 7, "app_offset": -1001, "committed_offset": -1001, "consumer_lag": -1},
          "1": {"partition": 1, "desired": true, "hi_offset": -1, "app_offset": -1001, "committed_offset": -1001, "consumer_lag": -1},
          "2": {"partition": 2, "desired": true, "hi_offset": 9, "app_offset": 12, "committed_offset": 3, "consumer_lag": 0}
        }}
      }
    }"#;

    #[test]
    fn lag_counts_the_assigned_partitions_from_the_next_offset_the_application_gets() {
        // 120-100 (consumed) + 50-45 (committed, nothing consumed yet) + 7-0 (nothing committed);
        // partition 2 of messages is not ours, the UA partition and an unknown watermark count
        // nothing, and a position past a stale watermark is not negative lag.
        assert_eq!(lag_of(STATS.as_bytes()), Some(20 + 5 + 7));
    }

    #[test]
    fn statistics_without_topics_mean_no_lag_and_garbage_means_unknown() {
        assert_eq!(lag_of(br#"{"name": "c", "type": "consumer"}"#), Some(0));
        assert_eq!(lag_of(b"not json"), None);
    }
}

#[cfg(test)]
mod buf_tests {
    #![allow(clippy::unwrap_used)]

    use super::TopicBuf;

    fn buf(partitions: &[i32]) -> TopicBuf {
        let mut buf = TopicBuf::default();
        for (i, &p) in partitions.iter().enumerate() {
            buf.push_parts(Some(format!("k{i}").as_bytes()), Some(format!("v{i}").as_bytes()), p, i as i64, 0);
        }
        buf
    }

    fn records(buf: &TopicBuf) -> Vec<(i32, i64, Vec<u8>, Vec<u8>)> {
        (0..buf.len()).map(|i| (buf.partition[i], buf.offset[i], buf.key(i).unwrap().to_vec(), buf.payload(i).unwrap().to_vec())).collect()
    }

    #[test]
    fn retaining_partitions_keeps_the_order_and_each_record_whole() {
        for (partitions, keep, want) in [
            (vec![0, 1, 0, 2], 0, vec![0, 2]),
            (vec![1, 0, 0], 0, vec![1, 2]),
            (vec![0, 0, 0], 0, vec![0, 1, 2]),
            (vec![1, 2], 0, vec![]),
            (vec![], 0, vec![]),
        ] {
            let all = records(&buf(&partitions));
            let mut b = buf(&partitions);
            b.retain_partitions(|p| p == keep);
            let kept: Vec<_> = want.iter().map(|&i: &usize| all[i].clone()).collect();
            assert_eq!(records(&b), kept, "{partitions:?}");
        }
    }

    #[test]
    fn appending_shifts_the_spans_into_the_arena() {
        let mut a = buf(&[3, 4]);
        let b = buf(&[5]);
        let want: Vec<_> = records(&a).into_iter().chain(records(&b)).collect();
        a.append(&b);
        assert_eq!(records(&a), want);
        assert_eq!(a.timestamp_ms.len(), 3);
    }
}
