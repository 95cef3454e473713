//! The Kafka source against a real broker (tansu on loopback; `bash scripts/install-broker.sh`).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use meshguard_ingest::{KafkaConfig, KafkaSource, RawBatch, Topics};
use meshguard_schemas::InputTopic;
use meshguard_testkit::{Broker, create_topics, produce};

/// What the global tables must hold before a batch of attempts is judged: every registry and
/// presence record already on the broker, whether or not the global consumer has fetched it yet,
/// on the first call (the bootstrap) and on every later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_reads_the_global_topics_to_where_they_end_now() {
    let broker = Broker::start().unwrap();
    let topics = Topics::default();
    let (registry, presence) = (topics.input(InputTopic::Registry).to_owned(), topics.input(InputTopic::Presence).to_owned());
    create_topics(
        &broker.bootstrap(),
        &[(registry.as_str(), 1, true), (presence.as_str(), 3, false), (topics.messages.as_str(), 1, false)],
    )
    .await
    .unwrap();
    let record = |key: &str| (Some(key.as_bytes().to_vec()), Some(b"{}".to_vec()), Some(1_795_539_600_000));
    produce(&broker.bootstrap(), &registry, &[record("a"), record("b")]).await.unwrap();

    let kafka = KafkaConfig::new(broker.bootstrap());
    let source = KafkaSource::new(&kafka, topics.clone(), Arc::new(|_, _| None), Arc::new(|| {})).unwrap();
    source.start_globals(&[], Duration::from_secs(10)).unwrap();
    let mut raw = RawBatch::default();
    assert_eq!(source.catch_up_globals(&mut raw, Duration::from_secs(30)).unwrap(), 2, "the bootstrap");
    assert_eq!(raw.topic(InputTopic::Registry).len(), 2);

    // Published after the bootstrap: the next catch-up has them all, across partitions.
    produce(&broker.bootstrap(), &registry, &[record("c")]).await.unwrap();
    produce(&broker.bootstrap(), &presence, &[record("x"), record("y"), record("z"), record("w")]).await.unwrap();
    let mut raw = RawBatch::default();
    assert_eq!(source.catch_up_globals(&mut raw, Duration::from_secs(30)).unwrap(), 5);
    assert_eq!((raw.topic(InputTopic::Registry).len(), raw.topic(InputTopic::Presence).len()), (1, 4));

    // Nothing new: returns at once with nothing.
    let mut raw = RawBatch::default();
    assert_eq!(source.catch_up_globals(&mut raw, Duration::from_secs(30)).unwrap(), 0);
    assert!(raw.is_empty());

    // Catching up one topic reads that one to its end; what the other has fetched meanwhile comes
    // along, and its next catch-up reads the rest, so nothing is lost or read twice.
    produce(&broker.bootstrap(), &registry, &[record("d")]).await.unwrap();
    produce(&broker.bootstrap(), &presence, &[record("v"), record("u")]).await.unwrap();
    let mut raw = RawBatch::default();
    source.catch_up(&[InputTopic::Registry], &mut raw, Duration::from_secs(30)).unwrap();
    assert_eq!(raw.topic(InputTopic::Registry).len(), 1);
    let presence_along = raw.topic(InputTopic::Presence).len();
    assert!(presence_along <= 2);
    let mut raw = RawBatch::default();
    source.catch_up(&[InputTopic::Presence], &mut raw, Duration::from_secs(30)).unwrap();
    assert_eq!((raw.topic(InputTopic::Registry).len(), presence_along + raw.topic(InputTopic::Presence).len()), (0, 2));
}

/// A micro-batch is handed over as soon as what has been fetched runs out (`linger` 0), however
/// long `max_wait` is: an attempt never waits for others to fill its batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_handed_over_when_the_fetched_records_run_out_not_at_max_wait() {
    let broker = Broker::start().unwrap();
    let topics = Topics::default();
    create_topics(&broker.bootstrap(), &[(topics.messages.as_str(), 1, false), (topics.identity_requests.as_str(), 1, false)])
        .await
        .unwrap();
    let record = |key: &str| (Some(key.as_bytes().to_vec()), Some(b"{}".to_vec()), Some(1_795_539_600_000));
    produce(&broker.bootstrap(), &topics.messages, &[record("a"), record("b"), record("c")]).await.unwrap();

    let kafka = KafkaConfig::new(broker.bootstrap());
    let source = KafkaSource::new(&kafka, topics.clone(), Arc::new(|_, _| None), Arc::new(|| {})).unwrap();
    let max_wait = Duration::from_secs(120);
    let mut raw = RawBatch::default();
    let started = std::time::Instant::now();
    // The first poll joins the group and gets the partition; the records come in one fetch or a few.
    while raw.topic(InputTopic::Messages).len() < 3 {
        source.poll(&mut raw, 10_000, max_wait, Duration::ZERO);
        assert!(started.elapsed() < max_wait, "the records never came");
    }
    // Joining the group takes seconds; waiting for the batch to fill would take `max_wait`.
    assert!(started.elapsed() < max_wait / 4, "the batch waited for more records: {:?}", started.elapsed());
    assert_eq!(raw.topic(InputTopic::Messages).offset, vec![0, 1, 2]);
}

/// The sink's own view of where its records end (no request to the broker) agrees with the
/// broker's after a flush, partition by partition, and only the tracked topic is tracked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_knows_where_its_delivered_records_end_without_asking() {
    let broker = Broker::start().unwrap();
    create_topics(&broker.bootstrap(), &[("findings", 3, false), ("other", 1, false)]).await.unwrap();
    let kafka = KafkaConfig::new(broker.bootstrap());
    let sink = meshguard_ingest::KafkaSink::tracking_ends(&kafka, "findings").unwrap();
    assert!(sink.delivered_ends().is_empty());
    for i in 0..30u32 {
        sink.send("findings", format!("key-{i}").as_bytes(), b"{}").unwrap();
        sink.send("other", b"k", b"{}").unwrap();
    }
    sink.flush(Duration::from_secs(30)).unwrap();
    let mine = sink.delivered_ends();
    let broker_ends = sink.end_offsets("findings", Duration::from_secs(30)).unwrap();
    let written: Vec<(i32, i64)> = broker_ends.iter().copied().filter(|(_, end)| *end > 0).collect();
    assert_eq!(mine, written, "delivered ends vs the broker's");
    assert_eq!(mine.iter().map(|(_, end)| end).sum::<i64>(), 30);
}

/// The checkpoint's guarantee without stopping the pipeline: when a cut's wait returns, every record
/// sent before the cut is on the broker, though more were sent since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_records_sent_before_a_cut_are_on_the_broker_when_its_wait_returns() {
    let broker = Broker::start().unwrap();
    create_topics(&broker.bootstrap(), &[("findings", 3, false)]).await.unwrap();
    let kafka = KafkaConfig::new(broker.bootstrap());
    let sink = meshguard_ingest::KafkaSink::tracking_ends(&kafka, "findings").unwrap();
    for i in 0..50u32 {
        sink.send("findings", format!("before-{i}").as_bytes(), b"{}").unwrap();
    }
    let cut = sink.cut();
    for i in 0..50u32 {
        sink.send("findings", format!("after-{i}").as_bytes(), b"{}").unwrap();
    }
    sink.wait_cut(cut, Duration::from_secs(30)).unwrap();
    assert!(sink.delivered() >= 50, "delivered {}", sink.delivered());
    let on_broker: i64 = sink.end_offsets("findings", Duration::from_secs(30)).unwrap().iter().map(|(_, end)| end).sum();
    assert!(on_broker >= 50, "the broker holds {on_broker} records");
    sink.flush(Duration::from_secs(30)).unwrap();
    let on_broker: i64 = sink.end_offsets("findings", Duration::from_secs(30)).unwrap().iter().map(|(_, end)| end).sum();
    assert_eq!(on_broker, 100);
}

/// Nanoseconds the calling thread has been on a CPU.
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    stat.split_whitespace().next().unwrap().parse().unwrap()
}

/// Nanoseconds on a CPU of this process's threads named `name` (as the kernel keeps it: 15 bytes),
/// and how many there are.
fn named_threads_cpu_ns(name: &str) -> (u64, usize) {
    let (mut ns, mut n) = (0, 0);
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim_end() == name) {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap();
            ns += stat.split_whitespace().next().unwrap().parse::<u64>().unwrap();
            n += 1;
        }
    }
    (ns, n)
}

/// An idle worker's poll waits for records instead of spinning. rdkafka hands librdkafka a poll's
/// wait in whole milliseconds, rounded down, and polls without waiting until the rest has passed:
/// waits of a fraction over a whole millisecond spun for up to a millisecond each, 20 ms a second
/// at the idle loop's 50 ms turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_poll_waits_without_spinning() {
    let broker = Broker::start().unwrap();
    let topics = Topics::default();
    create_topics(&broker.bootstrap(), &[(topics.messages.as_str(), 1, false), (topics.input(InputTopic::IdentityRequests), 1, false)])
        .await
        .unwrap();
    let kafka = KafkaConfig::new(broker.bootstrap());
    let source = KafkaSource::new(&kafka, topics, Arc::new(|_, _| None), Arc::new(|| {})).unwrap();
    let mut raw = RawBatch::default();
    // The group's join first, then a second of idle turns (the second is what is measured).
    source.poll(&mut raw, 100, Duration::from_millis(500), Duration::ZERO);
    let (before, started) = (thread_cpu_ns(), std::time::Instant::now());
    let mut turns = 0;
    while started.elapsed() < Duration::from_secs(1) {
        raw.clear();
        source.poll(&mut raw, 100, Duration::from_millis(50), Duration::ZERO);
        turns += 1;
    }
    let used = thread_cpu_ns() - before;
    assert!(raw.is_empty() && turns >= 10, "idle turns of about 50 ms: {turns}");
    assert!(used < 5_000_000, "{used} ns of CPU in {turns} idle turns");
}

/// The sink's delivery reports are served by a thread that waits for them: rdkafka's
/// `ThreadedProducer`, polling 100 ms at a time, spun for most of a millisecond in each (its poll
/// rounds what is left of a timeout down to whole milliseconds), about 10 ms a second idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sinks_thread_waits_without_spinning() {
    let broker = Broker::start().unwrap();
    create_topics(&broker.bootstrap(), &[("findings", 1, false)]).await.unwrap();
    let sink = meshguard_ingest::KafkaSink::new(&KafkaConfig::new(broker.bootstrap())).unwrap();
    sink.send("findings", b"k", b"{}").unwrap();
    sink.flush(Duration::from_secs(30)).unwrap();
    let (before, threads) = named_threads_cpu_ns("meshguard-produ");
    assert_eq!(threads, 1, "the sink's own thread serves its reports");
    // The idle second being measured.
    std::thread::sleep(Duration::from_secs(1));
    let used = named_threads_cpu_ns("meshguard-produ").0 - before;
    assert!(used < 3_000_000, "{used} ns of CPU in an idle second");
}
