//! Writing output topics with an idempotent producer (`enable.idempotence`: no duplicates or
//! reordering from the producer's own retries). Deliveries are asynchronous; [`KafkaSink::flush`]
//! is the durability point: when it returns `Ok`, every record sent before it is on the broker.
//! A [`Cut`] is the same point, waited for later and elsewhere: [`KafkaSink::cut`] marks it
//! without waiting, and [`KafkaSink::wait_cut`] (on another thread) returns once every record sent
//! before the cut is on the broker, whatever was sent since. The pipeline cuts at each checkpoint
//! and its checkpoint thread waits for the cut before writing, so a checkpoint never claims output
//! that was lost, and the pipeline does not stop for the broker's acknowledgements.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

use crate::config::KafkaConfig;
use crate::error::{Error, Result};

#[derive(Default)]
struct DeliveryContext {
    /// Records sent and not yet reported, by the parity of the epoch they were sent in (each
    /// record's delivery opaque; see [`KafkaSink::cut`]).
    pending: [AtomicU64; 2],
    /// Records whose delivery failed, by the same parity, until a flush or a cut's wait takes them.
    failed: [AtomicU64; 2],
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
    /// The parity of the epoch the record was sent in.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, parity: usize) {
        let _wake = Wake(&self.reported);
        let parity = parity & 1;
        // Counted down after the outcome below is (`Wake` runs after it too).
        let _reported = Reported(&self.pending[parity]);
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
                self.failed[parity].fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some((m.topic().to_owned(), e.to_string()));
                }
            }
        }
    }
}

/// A producer whose delivery reports a thread of its own serves, as rdkafka's `ThreadedProducer`
/// does, but without spinning. rdkafka's `BaseProducer::poll` hands librdkafka what is left of
/// its timeout in whole milliseconds, rounded down, and polls again without waiting until the
/// rest has passed: `ThreadedProducer`'s thread, polling 100 ms at a time, spun for most of a
/// millisecond every time, about 1 % of a core per producer even when idle. Here each poll's
/// timeout is whole milliseconds plus [`POLL_SLACK`], so what is left once librdkafka returns is
/// at most that slack. (A poll that served a report in between still ends on up to a millisecond
/// of spinning: rdkafka's loop recomputes the wait from its deadline. That is once per poll at
/// most, under traffic only.)
struct PolledProducer<C: ProducerContext + 'static> {
    producer: Arc<BaseProducer<C>>,
    stop: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
}

/// Whole milliseconds of each poll of the producer's thread, which librdkafka waits.
const POLL_MS: u64 = 100;
/// Added to [`POLL_MS`] so that the deadline rdkafka sets at the poll's start is still ahead of
/// the whole milliseconds when it converts the timeout: the most a poll can spin at its end.
const POLL_SLACK: Duration = Duration::from_micros(50);

impl<C: ProducerContext + 'static> PolledProducer<C> {
    fn new(producer: BaseProducer<C>) -> Result<Self> {
        let producer = Arc::new(producer);
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (producer.clone(), stop.clone());
        let poller = std::thread::Builder::new()
            .name("meshguard-producer".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    p.poll(Duration::from_millis(POLL_MS) + POLL_SLACK);
                }
            })
            .map_err(|cause| Error::Thread { what: "the producer's thread", cause })?;
        Ok(Self { producer, stop, poller: Some(poller) })
    }
}

impl<C: ProducerContext + 'static> std::ops::Deref for PolledProducer<C> {
    type Target = BaseProducer<C>;
    fn deref(&self) -> &BaseProducer<C> {
        &self.producer
    }
}

impl<C: ProducerContext + 'static> Drop for PolledProducer<C> {
    /// Stops the thread (within one poll) before the producer goes, which flushes what is queued
    /// (at most 500 ms) and serves the last reports on the dropping thread.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
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

/// Counts a record's report in its epoch when dropped, after its outcome is recorded.
struct Reported<'a>(&'a AtomicU64);

impl Drop for Reported<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// A point in a sink's stream of records (see [`KafkaSink::cut`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a cut is only useful waited for"]
pub struct Cut {
    parity: usize,
}

/// The output side of a worker. See the module docs.
pub struct KafkaSink {
    producer: PolledProducer<DeliveryContext>,
    kafka: KafkaConfig,
    /// A consumer for end-offset queries (created on first use) and the partitions of each topic
    /// asked about (from metadata, once).
    offsets: OnceLock<BaseConsumer>,
    partitions: Mutex<HashMap<String, Vec<i32>>>,
    /// Incremented by every [`KafkaSink::cut`]; a record carries its parity.
    epoch: AtomicUsize,
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
        let producer = PolledProducer::new(producer)?;
        Ok(Self { producer, kafka: kafka.clone(), offsets: OnceLock::new(), partitions: Mutex::default(), epoch: AtomicUsize::new(0) })
    }

    /// Queues one record. When the producer's queue is full, waits for it to drain: a slow broker
    /// slows the pipeline down instead of growing memory (backpressure).
    pub fn send(&self, topic: &str, key: &[u8], payload: &[u8]) -> Result<()> {
        self.send_record(topic, key, Some(payload), None)
    }

    /// Queues one record with an optional payload (`None`: a tombstone) and an explicit Kafka
    /// timestamp (`None`: the producer's clock), with the same backpressure as [`KafkaSink::send`].
    pub fn send_record(&self, topic: &str, key: &[u8], payload: Option<&[u8]>, timestamp_ms: Option<i64>) -> Result<()> {
        let parity = self.epoch.load(Ordering::Acquire) & 1;
        let mut record: BaseRecord<'_, [u8], [u8], usize> = BaseRecord::with_opaque_to(topic, parity).key(key);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        if let Some(t) = timestamp_ms {
            record = record.timestamp(t);
        }
        let pending = &self.producer.context().pending[parity];
        // Before the send: its report may come before `send` returns.
        pending.fetch_add(1, Ordering::AcqRel);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    // Waits for in-flight deliveries, not a fixed time; returns early once drained.
                    self.wait_delivered(Duration::from_millis(100));
                }
                Err((e, _)) => {
                    // Not queued: no report will come.
                    pending.fetch_sub(1, Ordering::AcqRel);
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
        let failed = self.producer.context().failed.iter().map(|f| f.swap(0, Ordering::AcqRel)).sum();
        self.failures(failed)
    }

    fn failures(&self, failed: u64) -> Result<()> {
        if failed > 0 {
            let (topic, last_error) = self.producer.context().last_error.lock().ok().and_then(|mut l| l.take()).unwrap_or_default();
            return Err(Error::Delivery { topic, failed, last_error });
        }
        Ok(())
    }

    /// Marks the records sent so far (by this thread, or by any other before this call) as
    /// before a cut, without waiting for them: [`KafkaSink::wait_cut`] then waits for those only.
    /// One cut at a time: wait for a cut before making the next (the records' epochs are told
    /// apart by parity).
    pub fn cut(&self) -> Cut {
        Cut { parity: self.epoch.fetch_add(1, Ordering::AcqRel) & 1 }
    }

    /// Waits until every record sent before `cut` is reported, at most `timeout`, whatever was
    /// sent since; fails if any of them failed (they are lost to the broker, so the caller must
    /// not checkpoint past them) or if they are not all reported in time.
    pub fn wait_cut(&self, cut: Cut, timeout: Duration) -> Result<()> {
        let context = self.producer.context();
        let pending = &context.pending[cut.parity];
        if !self.wait_reports(timeout, || pending.load(Ordering::Acquire) == 0) {
            return Err(Error::Timeout {
                what: "waiting for the records sent before a checkpoint".into(),
                after_ms: timeout.as_millis() as u64,
            });
        }
        self.failures(context.failed[cut.parity].swap(0, Ordering::AcqRel))
    }

    /// Waits until no record is in flight (every delivery report served), at most `timeout`;
    /// whether none is.
    fn wait_delivered(&self, timeout: Duration) -> bool {
        // The count includes a report being served; its callback wakes us once it is counted, and
        // the count drops just after: the waits' short re-check covers that gap.
        self.wait_reports(timeout, || self.producer.in_flight_count() == 0)
    }

    /// Waits until `done` holds, re-checking it after each delivery report, at most `timeout`;
    /// whether it holds. The producer's own thread serves the reports and wakes this wait, so it
    /// returns within a millisecond of the report it waits for (rdkafka's `flush` competes with
    /// that thread for the reports and wakes only every 100 ms).
    fn wait_reports(&self, timeout: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let context = self.producer.context();
        loop {
            if done() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let guard = context.reported_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // A report between the check above and this wait wakes nobody: wait 1 ms at most.
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
                    .consumer_config_with(&[])
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
            .consumer_config_with(&[])
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A sink to a loopback port nothing listens on: its records stay in flight until
    /// `message.timeout.ms` fails them.
    fn unreachable_sink(message_timeout_ms: &str) -> KafkaSink {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut kafka = KafkaConfig::new(format!("127.0.0.1:{port}"));
        kafka.client.insert("message.timeout.ms".into(), message_timeout_ms.into());
        KafkaSink::new(&kafka).unwrap()
    }

    #[test]
    fn a_cut_waits_for_the_records_sent_before_it_and_not_for_those_after() {
        let sink = unreachable_sink("300000");
        let cut = sink.cut();
        sink.send("t", b"k", b"after the first cut").unwrap();
        // That record is never acknowledged (no broker): a wait that included it would time out.
        sink.wait_cut(cut, Duration::from_secs(10)).unwrap();
        let cut = sink.cut();
        let err = sink.wait_cut(cut, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "the record before the second cut is waited for: {err}");
    }

    #[test]
    fn a_cut_reports_the_failed_deliveries_before_it_and_a_flush_those_after() {
        let sink = unreachable_sink("500");
        sink.send("t", b"k", b"lost before the cut").unwrap();
        let cut = sink.cut();
        sink.send("t", b"k", b"lost after the cut").unwrap();
        let err = sink.wait_cut(cut, Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, Error::Delivery { failed: 1, .. }), "only the record before the cut: {err}");
        let err = sink.flush(Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, Error::Delivery { failed: 1, .. }), "the one after it, once: {err}");
        sink.flush(Duration::from_secs(30)).unwrap();
    }
}
