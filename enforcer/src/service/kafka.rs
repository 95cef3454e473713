//! The enforcer service's Kafka clients: the producer of notifications and dead letters, the
//! Kafka [`DeadLetterSink`], and the reader of the registry topic.
//!
//! This module owns how the service talks to Kafka and nothing else: it must never decide what to
//! publish (the service does) and never log a client property's value (they may hold credentials).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use meshguard_ingest::KafkaConfig;
use meshguard_schemas::time::format_ms;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
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

/// Reads every partition of the registry topic from its beginning, outside any consumer group
/// (each enforcer holds the whole table, as the pipeline's global tables do).
pub struct RegistryReader {
    consumer: BaseConsumer,
    topic: String,
}

impl std::fmt::Debug for RegistryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryReader").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl RegistryReader {
    /// Assigns every partition of `topic` from the beginning. `group_id` only names the client
    /// (nothing is committed).
    pub fn new(kafka: &KafkaConfig, topic: &str, group_id: &str, timeout: Duration) -> Result<Self> {
        let consumer: BaseConsumer = kafka
            .client_config()
            .set("group.id", format!("{group_id}-registry"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "20")
            .create()
            .map_err(Error::kafka("creating the registry reader"))?;
        let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(Error::kafka(format!("reading metadata of {topic}")))?;
        let mut assignment = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                assignment
                    .add_partition_offset(topic, p.id(), Offset::Beginning)
                    .map_err(Error::kafka("building the registry assignment"))?;
            }
        }
        consumer.assign(&assignment).map_err(Error::kafka(format!("assigning {topic}")))?;
        Ok(Self { consumer, topic: topic.to_owned() })
    }

    /// Applies whatever the client has already fetched, without waiting. Blocking only briefly.
    pub fn poll_available(&self, table: &mut OwnerTable) -> usize {
        let mut read = 0;
        while let Some(message) = self.consumer.poll(Duration::ZERO) {
            match message {
                Ok(m) => {
                    apply(table, m.key(), m.payload());
                    read += 1;
                }
                Err(error) => tracing::warn!(message = "Registry reader error.", %error),
            }
        }
        read
    }

    /// Reads the topic up to where it ends now (one `ListOffsets` request), so a registry change
    /// published before a finding applies to it. Blocking: call it off the async workers.
    pub fn catch_up(&self, table: &mut OwnerTable, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let assignment = self.consumer.assignment().map_err(Error::kafka("reading the registry assignment"))?;
        let mut query = TopicPartitionList::new();
        for e in assignment.elements() {
            query.add_partition_offset(e.topic(), e.partition(), Offset::End).map_err(Error::kafka("building the end-offset query"))?;
        }
        let ends = self.consumer.offsets_for_times(query, timeout).map_err(Error::kafka("reading the end of the registry topic"))?;
        let mut targets = Vec::new();
        for e in ends.elements() {
            let end = e.offset().to_raw().unwrap_or(0);
            if end > 0 {
                let low = self.consumer.fetch_watermarks(e.topic(), e.partition(), timeout).map(|(low, _)| low).unwrap_or(0);
                targets.push((e.partition(), low, end));
            }
        }
        let mut read = 0;
        loop {
            let positions = self.consumer.position().map_err(Error::kafka("reading the registry positions"))?;
            let behind = targets.iter().any(|(partition, low, end)| {
                let at =
                    positions.find_partition(&self.topic, *partition).and_then(|e| e.offset().to_raw()).filter(|o| *o >= 0).unwrap_or(*low);
                at < *end
            });
            if !behind {
                return Ok(read);
            }
            if Instant::now() >= deadline {
                return Err(Error::Kafka {
                    context: format!("reading {} to its end", self.topic),
                    reason: format!("not done within {timeout:?}"),
                });
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    apply(table, m.key(), m.payload());
                    read += 1;
                }
                Some(Err(error)) => tracing::warn!(message = "Registry reader error.", %error),
                None => {}
            }
        }
    }
}

fn apply(table: &mut OwnerTable, key: Option<&[u8]>, value: Option<&[u8]>) {
    if let Err(why) = table.apply(key, value) {
        // The pipeline dead-letters bad registry records; here they only change nothing.
        tracing::debug!(message = "Registry record skipped by the enforcer.", reason = ?why);
    }
}
