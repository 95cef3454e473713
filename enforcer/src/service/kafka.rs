//! The enforcer service's Kafka clients: the producer of notifications and dead letters, the
//! Kafka [`DeadLetterSink`], and the reader of the registry topic.
//!
//! This module owns how the service talks to Kafka and nothing else: it must never decide what to
//! publish (the service does) and never log a client property's value (they may hold credentials).

use std::time::Duration;

use async_trait::async_trait;
use meshguard_ingest::{KafkaConfig, TopicReader};
use meshguard_schemas::time::format_ms;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;

use super::owners::OwnerTable;
use crate::dead_letter::{DeadLetter, DeadLetterSink};
use crate::error::{Error, Result};

/// The service's producer: acknowledged by every in-sync replica, idempotent (as the pipeline's),
/// with `[kafka.client]` overriding any of these.
pub fn producer(kafka: &KafkaConfig) -> Result<FutureProducer> {
    kafka
        .client_config_with(&[("enable.idempotence", "true"), ("acks", "all"), ("linger.ms", "5"), ("message.timeout.ms", "30000")])
        .create()
        .map_err(Error::kafka("creating the enforcer's producer"))
}

/// A [`DeadLetterSink`] writing to a Kafka topic (by default `meshguard.deadletter.v1`), keyed by
/// the UUID the action is about. `send` returns once the broker acknowledged the record.
///
/// The record is the [`DeadLetter`] (`target`, `action_id`, `action`, `state`, `attempts`,
/// `reason`) plus `ts` (when it was given up, processing time), `topic` (the enforcement topic the
/// state came from) and `source` (`"enforcer"`), so it sits beside the pipeline's rejected input
/// records on the same topic and is told apart by `source`.
pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
    timeout: Duration,
}

impl std::fmt::Debug for KafkaDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDeadLetters").field("topic", &self.topic).finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Record<'a> {
    ts: String,
    source: &'static str,
    topic: &'a str,
    #[serde(flatten)]
    letter: &'a DeadLetter,
}

impl KafkaDeadLetters {
    /// A sink writing to `topic` with `producer`; `source_topic` is the enforcement topic, named in
    /// each record; `timeout` bounds the wait for the broker's acknowledgement.
    pub fn new(producer: FutureProducer, topic: impl Into<String>, source_topic: impl Into<String>, timeout: Duration) -> Self {
        Self { producer, topic: topic.into(), source_topic: source_topic.into(), timeout }
    }
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    fn name(&self) -> &str {
        &self.topic
    }

    async fn send(&self, letter: DeadLetter) -> Result<()> {
        let failed = |reason: String| Error::DeadLetter { sink: self.topic.clone(), action_id: letter.action_id, reason };
        let record =
            Record { ts: format_ms(chrono::Utc::now().timestamp_millis()), source: "enforcer", topic: &self.source_topic, letter: &letter };
        let payload = serde_json::to_vec(&record).map_err(|e| failed(format!("cannot encode the letter: {e}")))?;
        let key = letter.state.uuid.hyphenated().to_string();
        self.producer
            .send(FutureRecord::to(&self.topic).key(&key).payload(&payload), Timeout::After(self.timeout))
            .await
            .map_err(|(error, _)| failed(error.to_string()))?;
        Ok(())
    }
}

/// Reads the registry topic into the owner table: every partition from the beginning, outside
/// any group (ingest's [`TopicReader`]).
#[derive(Debug)]
pub struct RegistryReader {
    reader: TopicReader,
}

impl RegistryReader {
    /// Assigns every partition of `topic` from the beginning. `group_id` only names the client
    /// (nothing is committed).
    pub fn new(kafka: &KafkaConfig, topic: &str, group_id: &str, timeout: Duration) -> Result<Self> {
        let reader =
            TopicReader::new(kafka, topic, &format!("{group_id}-registry")).map_err(ingest_error("creating the registry reader"))?;
        reader.start(timeout).map_err(ingest_error("assigning the registry topic"))?;
        Ok(Self { reader })
    }

    /// Applies whatever the client has already fetched, without waiting.
    pub fn poll_available(&self, table: &mut OwnerTable) -> usize {
        self.reader.poll_with(|m| apply(table, m.key(), m.payload()))
    }

    /// Reads the topic up to where it ends now (one `ListOffsets` request), so a registry change
    /// published before a finding applies to it. Blocking: call it off the async workers.
    pub fn catch_up(&self, table: &mut OwnerTable, timeout: Duration) -> Result<usize> {
        self.reader
            .read_to_end(timeout, |m| apply(table, m.key(), m.payload()))
            .map_err(ingest_error("reading the registry topic to its end"))
    }
}

/// Maps an ingest error, with what the service was doing.
fn ingest_error(context: &'static str) -> impl FnOnce(meshguard_ingest::Error) -> Error {
    move |cause| Error::Kafka { context: context.to_owned(), reason: cause.to_string() }
}

fn apply(table: &mut OwnerTable, key: Option<&[u8]>, value: Option<&[u8]>) {
    if let Err(why) = table.apply(key, value) {
        // The pipeline dead-letters bad registry records; here they only change nothing.
        tracing::debug!(message = "Registry record skipped by the enforcer.", reason = ?why);
    }
}

/// The Kafka header of a notification that holds its finding's `event_ts` (decimal Unix ms): what
/// the limiter needs to be rebuilt from the topic, kept out of the contract's JSON record.
pub const EVENT_TS_HEADER: &str = "meshguard-event-ts";

/// Reads the tail of the notifications topic: in each partition, the records produced within
/// `lookback` before that partition's last record (by record timestamp), up to where the partition
/// ends now. Measured from each partition's own end, not from now, so a restart after a long
/// downtime still sees the notices the crashed run published last. Hands `visit` each record's
/// payload and its [`EVENT_TS_HEADER`] (`None` when absent). Blocking: call it off the async workers.
pub fn read_notification_tail(
    kafka: &KafkaConfig,
    topic: &str,
    client: &str,
    lookback: Duration,
    timeout: Duration,
    mut visit: impl FnMut(&[u8], Option<i64>),
) -> Result<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::Headers as _;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    let consumer: BaseConsumer =
        meshguard_ingest::source::reader_consumer(kafka, client).map_err(Error::kafka("creating the reader of the notifications topic"))?;
    let md = consumer.fetch_metadata(Some(topic), timeout).map_err(Error::kafka("reading metadata of the notifications topic"))?;
    // (partition, first offset to read, end): partitions with records only.
    let mut ranges: Vec<(i32, i64, i64)> = Vec::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) =
            consumer.fetch_watermarks(topic, p.id(), timeout).map_err(Error::kafka("reading the notifications topic's offsets"))?;
        if high > low {
            ranges.push((p.id(), high - 1, high));
        }
    }
    if ranges.is_empty() {
        return Ok(0);
    }
    let deadline = std::time::Instant::now() + timeout;
    let assign = |ranges: &[(i32, i64, i64)]| -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (partition, from, _) in ranges {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*from))
                .map_err(Error::kafka("assigning the notifications topic"))?;
        }
        consumer.assign(&tpl).map_err(Error::kafka("assigning the notifications topic"))
    };
    // Each partition's last record gives the time its tail is measured back from.
    assign(&ranges)?;
    let mut last_ts: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    while last_ts.len() < ranges.len() {
        if std::time::Instant::now() > deadline {
            return Err(Error::Kafka {
                context: String::from("reading the notifications topic's last records"),
                reason: format!("not within {timeout:?}"),
            });
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.map_err(Error::kafka("reading the notifications topic"))?;
            last_ts.entry(m.partition()).or_insert(m.timestamp().to_millis().unwrap_or(0));
        }
    }
    let mut times = TopicPartitionList::new();
    for (partition, _, _) in &ranges {
        let from = last_ts.get(partition).copied().unwrap_or(0).saturating_sub(lookback.as_millis() as i64);
        times.add_partition_offset(topic, *partition, Offset::Offset(from)).map_err(Error::kafka("looking up the notifications' tail"))?;
    }
    let starts = consumer.offsets_for_times(times, timeout).map_err(Error::kafka("looking up the notifications' tail"))?;
    for (partition, from, _) in &mut ranges {
        if let Some(Offset::Offset(start)) = starts.find_partition(topic, *partition).map(|e| e.offset()) {
            *from = start.min(*from);
        }
    }
    assign(&ranges)?;
    let mut read = 0;
    let mut done: std::collections::BTreeSet<i32> = ranges.iter().filter(|(_, from, end)| from >= end).map(|(p, _, _)| *p).collect();
    while done.len() < ranges.len() {
        if std::time::Instant::now() > deadline {
            return Err(Error::Kafka {
                context: String::from("reading the notifications topic's tail"),
                reason: format!("not within {timeout:?}"),
            });
        }
        let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = m.map_err(Error::kafka("reading the notifications topic"))?;
        let Some(&(_, _, end)) = ranges.iter().find(|(p, _, _)| *p == m.partition()) else { continue };
        if m.offset() >= end {
            done.insert(m.partition());
            continue;
        }
        let event_ts = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == EVENT_TS_HEADER))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok());
        if let Some(payload) = m.payload() {
            visit(payload, event_ts);
            read += 1;
        }
        if m.offset() + 1 >= end {
            done.insert(m.partition());
        }
    }
    Ok(read)
}
