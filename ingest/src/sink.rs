//! Writing output topics with an idempotent producer (`enable.idempotence`: no duplicates or
//! reordering from the producer's own retries). Deliveries are asynchronous; [`KafkaSink::flush`]
//! is the durability point: when it returns `Ok`, every record sent before it is on the broker.
//! The pipeline flushes before each checkpoint, so a checkpoint never claims output that was lost.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
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

/// The output side of a worker. See the module docs.
pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryContext>,
    kafka: KafkaConfig,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("brokers", &self.kafka.brokers).finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// An idempotent producer.
    pub fn new(kafka: &KafkaConfig) -> Result<Self> {
        // Defaults; `[kafka.client]` overrides any of them. librdkafka's idempotent producer
        // busy-polls against tansu 0.6 (librdkafka issue #2565; see BENCHMARKS.md), where
        // `"enable.idempotence" = "false"` is the workaround: restores read back what a crash left.
        let producer = kafka
            .client_config_with(&[("enable.idempotence", "true"), ("acks", "all"), ("linger.ms", "5"), ("message.timeout.ms", "30000")])
            .create_with_context(DeliveryContext::default())
            .map_err(Error::kafka("creating the producer"))?;
        Ok(Self { producer, kafka: kafka.clone() })
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
                    let _ = self.producer.flush(Duration::from_millis(100));
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
        self.producer.flush(timeout).map_err(Error::kafka("flushing the producer"))?;
        let failed = self.producer.context().failed.swap(0, Ordering::Relaxed);
        if failed > 0 {
            let (topic, last_error) = self.producer.context().last_error.lock().ok().and_then(|mut l| l.take()).unwrap_or_default();
            return Err(Error::Delivery { topic, failed, last_error });
        }
        Ok(())
    }

    /// Records delivered so far.
    pub fn delivered(&self) -> u64 {
        self.producer.context().delivered.load(Ordering::Relaxed)
    }

    /// The end offset (high watermark) of every partition of `topic`.
    pub fn end_offsets(&self, topic: &str, timeout: Duration) -> Result<Vec<(i32, i64)>> {
        let client = self.producer.client();
        let md = client.fetch_metadata(Some(topic), timeout).map_err(Error::kafka(format!("reading metadata of {topic}")))?;
        let mut out = Vec::new();
        for t in md.topics() {
            for p in t.partitions() {
                let (_, high) =
                    client.fetch_watermarks(topic, p.id(), timeout).map_err(Error::kafka(format!("reading the end of {topic}")))?;
                out.push((p.id(), high));
            }
        }
        Ok(out)
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
