//! Writing output topics with an idempotent producer (`enable.idempotence`: no duplicates or
//! reordering from the producer's own retries). Deliveries are asynchronous; [`KafkaSink::flush`]
//! is the durability point: when it returns `Ok`, every record sent before it is on the broker.
//! The pipeline flushes before each checkpoint, so a checkpoint never claims output that was lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};

use crate::config::KafkaConfig;
use crate::error::{Error, Result};

#[derive(Default)]
struct DeliveryContext {
    failed: AtomicU64,
    delivered: AtomicU64,
    last_error: Mutex<Option<(String, String)>>,
    /// Signalled after every delivery report, for [`KafkaSink::flush`].
    reported: Condvar,
    reported_lock: Mutex<()>,
    /// The topic whose delivered offsets are tracked ([`KafkaSink::delivered_ends`]), if any.
    tracked: Option<String>,
    /// Next offset after the last record delivered to each of its partitions.
    ends: Mutex<HashMap<i32, i64>>,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let _wake = Wake(&self.reported);
        match result {
            Ok(m) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
                if self.tracked.as_deref() == Some(m.topic())
                    && let Ok(mut ends) = self.ends.lock()
                {
                    let end = ends.entry(m.partition()).or_insert(0);
                    *end = (*end).max(m.offset() + 1);
                }
            }
            Err((e, m)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some((m.topic().to_owned(), e.to_string()));
                }
            }
        }
    }
}

/// Wakes the flushers when dropped, after the delivery is counted.
struct Wake<'a>(&'a Condvar);

impl Drop for Wake<'_> {
    fn drop(&mut self) {
        self.0.notify_all();
    }
}

/// The output side of a worker. See the module docs.
pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryContext>,
    kafka: KafkaConfig,
    /// A consumer for end-offset queries (created on first use) and the partitions of each topic
    /// asked about (from metadata, once).
    offsets: OnceLock<BaseConsumer>,
    partitions: Mutex<HashMap<String, Vec<i32>>>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("brokers", &self.kafka.brokers).finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// An idempotent producer that batches a steady stream (librdkafka's 5 ms `linger.ms`): the
    /// simulator's, the command line's.
    pub fn new(kafka: &KafkaConfig) -> Result<Self> {
        Self::with(kafka, None, "5")
    }

    /// The pipeline's output sink: as [`new`](Self::new), also noting where its own records to
    /// `topic` end in each partition ([`KafkaSink::delivered_ends`]), and lingering 1 ms. The
    /// pipeline sends a micro-batch's findings together, at the end of its turn: waiting for more
    /// batches nothing more after a millisecond, and every millisecond of it is event → finding
    /// latency.
    pub fn tracking_ends(kafka: &KafkaConfig, topic: &str) -> Result<Self> {
        Self::with(kafka, Some(topic.to_owned()), "1")
    }

    fn with(kafka: &KafkaConfig, tracked: Option<String>, linger: &str) -> Result<Self> {
        // Defaults; `[kafka.client]` overrides any of them. librdkafka's idempotent producer
        // busy-polls against tansu 0.6 (librdkafka issue #2565; see BENCHMARKS.md), where
        // `"enable.idempotence" = "false"` is the workaround: restores read back what a crash left.
        let producer = kafka
            .client_config_with(&[("enable.idempotence", "true"), ("acks", "all"), ("linger.ms", linger), ("message.timeout.ms", "30000")])
            .create_with_context(DeliveryContext { tracked, ..DeliveryContext::default() })
            .map_err(Error::kafka("creating the producer"))?;
        Ok(Self { producer, kafka: kafka.clone(), offsets: OnceLock::new(), partitions: Mutex::default() })
    }

    /// Queues one record. When the producer's queue is full, waits for it to drain: a slow broker
    /// slows the pipeline down instead of growing memory (backpressure).
    pub fn send(&self, topic: &str, key: &[u8], payload: &[u8]) -> Result<()> {
        self.send_record(topic, key, Some(payload), None)
    }

    /// Queues one record with an optional payload (`None`: a tombstone) and an explicit Kafka
    /// timestamp (`None`: the producer's clock), with the same backpressure as [`KafkaSink::send`].
    pub fn send_record(&self, topic: &str, key: &[u8], payload: Option<&[u8]>, timestamp_ms: Option<i64>) -> Result<()> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(key);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        if let Some(t) = timestamp_ms {
            record = record.timestamp(t);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    // Waits for in-flight deliveries, not a fixed time; returns early once drained.
                    self.wait_delivered(Duration::from_millis(100));
                }
                Err((e, _)) => {
                    return Err(Error::Kafka { context: format!("sending to {topic}"), cause: e });
                }
            }
        }
    }

    /// Waits until every queued record is delivered; fails if any delivery failed since the last
    /// flush (those records are lost to the broker, so the caller must not checkpoint past them).
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        if !self.wait_delivered(timeout) {
            return Err(Error::Timeout { what: "flushing the producer".into(), after_ms: timeout.as_millis() as u64 });
        }
        let failed = self.producer.context().failed.swap(0, Ordering::Relaxed);
        if failed > 0 {
            let (topic, last_error) = self.producer.context().last_error.lock().ok().and_then(|mut l| l.take()).unwrap_or_default();
            return Err(Error::Delivery { topic, failed, last_error });
        }
        Ok(())
    }

    /// Waits until no record is in flight (every delivery report served), at most `timeout`;
    /// whether none is. The producer's own thread serves the reports and wakes this wait, so it
    /// returns within a millisecond of the last one (rdkafka's `flush` on a `ThreadedProducer`
    /// competes with that thread for the reports and wakes only every 100 ms).
    fn wait_delivered(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let context = self.producer.context();
        loop {
            // The count includes a report being served; its callback wakes us once it is counted,
            // and the count drops just after: a short re-check covers that gap.
            if self.producer.in_flight_count() == 0 {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let guard = context.reported_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            drop(context.reported.wait_timeout(guard, left.min(Duration::from_millis(1))));
        }
    }

    /// For the topic given to [`tracking_ends`](Self::tracking_ends): the offset after the last
    /// record this sink delivered to each partition it wrote to. After a [`flush`](Self::flush),
    /// every record sent later lands at or after these offsets: a lower bound of the partition's
    /// end known without asking the broker.
    pub fn delivered_ends(&self) -> Vec<(i32, i64)> {
        let ends = self.producer.context().ends.lock().map(|e| e.clone()).unwrap_or_default();
        let mut ends: Vec<(i32, i64)> = ends.into_iter().collect();
        ends.sort_unstable();
        ends
    }

    /// Records delivered so far.
    pub fn delivered(&self) -> u64 {
        self.producer.context().delivered.load(Ordering::Relaxed)
    }

    /// The end offset (high watermark) of every partition of `topic`: one `ListOffsets` request
    /// (the partitions are read from the metadata the first time a topic is asked about).
    pub fn end_offsets(&self, topic: &str, timeout: Duration) -> Result<Vec<(i32, i64)>> {
        let consumer = match self.offsets.get() {
            Some(c) => c,
            None => {
                let c: BaseConsumer = self
                    .kafka
                    .client_config()
                    .set("group.id", "meshguard-end-offsets")
                    .set("enable.auto.commit", "false")
                    .create()
                    .map_err(Error::kafka("creating the end-offset reader"))?;
                self.offsets.get_or_init(|| c)
            }
        };
        let known = self.partitions.lock().ok().and_then(|p| p.get(topic).cloned());
        let partitions = match known {
            Some(p) => p,
            None => {
                let md = consumer.fetch_metadata(Some(topic), timeout).map_err(Error::kafka(format!("reading metadata of {topic}")))?;
                let p: Vec<i32> = md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
                if let Ok(mut known) = self.partitions.lock()
                    && !p.is_empty()
                {
                    known.insert(topic.to_owned(), p.clone());
                }
                p
            }
        };
        let mut query = rdkafka::TopicPartitionList::new();
        for p in &partitions {
            query.add_partition_offset(topic, *p, rdkafka::Offset::End).map_err(Error::kafka("building the end-offset query"))?;
        }
        let ends = consumer.offsets_for_times(query, timeout).map_err(Error::kafka(format!("reading the end of {topic}")))?;
        Ok(ends.elements().iter().map(|e| (e.partition(), e.offset().to_raw().unwrap_or(0).max(0))).collect())
    }

    /// Reads `topic` from `from` (per-partition offsets; partitions not listed from the beginning)
    /// to its current end, calling `each` with every payload. Used on restore to learn which
    /// outputs a crashed run already wrote after its last checkpoint.
    pub fn read_back(&self, topic: &str, from: &[(i32, i64)], timeout: Duration, mut each: impl FnMut(&[u8])) -> Result<usize> {
        let ends = self.end_offsets(topic, timeout)?;
        let consumer: BaseConsumer = self
            .kafka
            .client_config()
            .set("group.id", "meshguard-readback")
            .set("enable.auto.commit", "false")
            .create()
            .map_err(Error::kafka("creating the read-back consumer"))?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut pending = Vec::new();
        for (p, high) in &ends {
            let start = from.iter().find(|(fp, _)| fp == p).map_or(0, |(_, o)| *o);
            if start < *high {
                tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(start))
                    .map_err(Error::kafka("building the read-back assignment"))?;
                pending.push((*p, *high));
            }
        }
        if pending.is_empty() {
            return Ok(0);
        }
        consumer.assign(&tpl).map_err(Error::kafka("assigning the read-back consumer"))?;
        let deadline = std::time::Instant::now() + timeout;
        let mut read = 0;
        while !pending.is_empty() {
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout { what: format!("reading back {topic}"), after_ms: timeout.as_millis() as u64 });
            }
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                if let Some(payload) = m.payload() {
                    each(payload);
                    read += 1;
                }
                let (p, o) = (m.partition(), m.offset());
                pending.retain(|(pp, high)| !(*pp == p && o + 1 >= *high));
            }
        }
        Ok(read)
    }
}
