//! The broker the test suite runs against, pinned down: what tansu 0.6 does that the pipeline and
//! its tests rely on. Every test starts its own broker (`bash scripts/install-broker.sh` installs
//! it; without it these tests fail with that instruction).
//!
//! Not here because tansu 0.6 does not support them: Kafka transactions (no `EndTxn`, so
//! `commit_transaction` fails with "EndTxnRequest (KIP-98) not supported by broker"), and
//! `offsets_for_times` past the last record (answers offset 0 where Kafka answers the end).
//! Compaction of `cleanup.policy=compact` topics happens only in tansu's maintenance pass (at
//! start-up, then every 10 minutes), too late for a test to wait for.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meshguard_testkit::{Broker, ProduceRecord, Record, consume_all, consume_available, create_topics, produce};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

const BASE_TS: i64 = 1_795_539_600_000;

fn config(broker: &Broker) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", broker.bootstrap()).set("broker.address.family", "v4");
    config
}

/// A group member that commits only when told to.
fn member(broker: &Broker, group: &str) -> BaseConsumer {
    config(broker)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap()
}

/// `n` records over 30 keys, each with its own timestamp and a payload naming its index.
fn keyed_records(n: usize) -> Vec<ProduceRecord> {
    (0..n)
        .map(|i| (Some(format!("device-{}", i % 30).into_bytes()), Some(format!("event-{i}").into_bytes()), Some(BASE_TS + i as i64)))
        .collect()
}

fn index_of(record: &Record) -> usize {
    let payload = String::from_utf8(record.payload.clone().unwrap()).unwrap();
    payload.strip_prefix("event-").unwrap().parse().unwrap()
}

fn partitions_of(consumer: &BaseConsumer) -> BTreeSet<i32> {
    consumer.assignment().unwrap().elements().iter().map(|e| e.partition()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_plain_and_compacted_topics() {
    let broker = Broker::start().unwrap();
    assert!(broker.bootstrap().starts_with("127.0.0.1:"));
    let topics = [("plain", 3, false), ("registry", 3, true)];
    create_topics(&broker.bootstrap(), &topics).await.unwrap();
    // Creating them again is not an error.
    create_topics(&broker.bootstrap(), &topics).await.unwrap();

    let metadata_client: BaseConsumer = config(&broker).create().unwrap();
    let metadata = metadata_client.fetch_metadata(None, Duration::from_secs(5)).unwrap();
    for (name, partitions, _) in topics {
        let topic = metadata.topics().iter().find(|t| t.name() == name).unwrap();
        assert_eq!(topic.partitions().len(), partitions as usize, "{name}");
    }

    let admin: AdminClient<DefaultClientContext> = config(&broker).create().unwrap();
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic("registry"), ResourceSpecifier::Topic("plain")], &AdminOptions::new())
        .await
        .unwrap();
    let registry = described[0].as_ref().unwrap();
    assert_eq!(registry.get("cleanup.policy").and_then(|e| e.value.as_deref()), Some("compact"));
    let plain = described[1].as_ref().unwrap();
    assert_ne!(plain.get("cleanup.policy").and_then(|e| e.value.as_deref()), Some("compact"));
    assert!(broker.log_tail().contains("tansu"), "log: {}", broker.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_keys_timestamps_and_per_key_order_across_three_partitions() {
    let broker = Broker::start().unwrap();
    create_topics(&broker.bootstrap(), &[("events", 3, false)]).await.unwrap();
    let mut records = keyed_records(300);
    records.push((None, Some(b"event-300".to_vec()), Some(BASE_TS + 300))); // null key
    records.push((Some(b"device-0".to_vec()), None, Some(BASE_TS + 301))); // tombstone
    produce(&broker.bootstrap(), "events", &records).await.unwrap();

    let got = consume_all(&broker.bootstrap(), "events", records.len(), Duration::from_secs(30)).unwrap();
    assert_eq!(got.len(), records.len());
    let tombstone = got.iter().find(|r| r.payload.is_none()).unwrap();
    assert_eq!((tombstone.key.as_deref(), tombstone.timestamp_ms), (Some(&b"device-0"[..]), Some(BASE_TS + 301)));
    let null_key = got.iter().find(|r| r.key.is_none()).unwrap();
    assert_eq!(index_of(null_key), 300);

    let mut partition_of_key: BTreeMap<Vec<u8>, i32> = BTreeMap::new();
    let mut last_of_key: BTreeMap<Vec<u8>, (i64, usize)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for record in got.iter().filter(|r| r.key.is_some() && r.payload.is_some()) {
        let index = index_of(record);
        assert!(seen.insert(index), "record {index} read twice");
        let (key, payload, ts) = &records[index];
        assert_eq!((&record.key, &record.payload, record.timestamp_ms), (key, payload, *ts));
        let key = key.clone().unwrap();
        assert_eq!(*partition_of_key.entry(key.clone()).or_insert(record.partition), record.partition, "one partition per key");
        if let Some((offset, previous)) = last_of_key.insert(key, (record.offset, index)) {
            assert!(offset < record.offset && previous < index, "per-key order");
        }
    }
    assert_eq!(seen.len(), 300);
    assert_eq!(got.iter().map(|r| r.partition).collect::<BTreeSet<_>>(), BTreeSet::from([0, 1, 2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermarks_bound_what_consume_available_reads() {
    let broker = Broker::start().unwrap();
    create_topics(&broker.bootstrap(), &[("events", 3, false)]).await.unwrap();
    let records = keyed_records(500);
    produce(&broker.bootstrap(), "events", &records[..400]).await.unwrap();

    let consumer: BaseConsumer = config(&broker).create().unwrap();
    let mut total = 0;
    for partition in 0..3 {
        let (low, high) = consumer.fetch_watermarks("events", partition, Duration::from_secs(5)).unwrap();
        assert_eq!(low, 0);
        total += high;
    }
    assert_eq!(total, 400, "the high watermarks count every record");
    assert_eq!(consume_available(&broker.bootstrap(), "events", Duration::from_secs(30)).unwrap().len(), 400);

    produce(&broker.bootstrap(), "events", &records[400..]).await.unwrap();
    let all = consume_available(&broker.bootstrap(), "events", Duration::from_secs(30)).unwrap();
    assert_eq!(all.iter().map(index_of).collect::<BTreeSet<_>>().len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_for_times_finds_the_first_record_at_or_after_a_timestamp() {
    let broker = Broker::start().unwrap();
    create_topics(&broker.bootstrap(), &[("timeline", 1, false)]).await.unwrap();
    // One record every second.
    let records: Vec<ProduceRecord> = (0..30).map(|i| (None, Some(vec![b'x']), Some(BASE_TS + i * 1_000))).collect();
    produce(&broker.bootstrap(), "timeline", &records).await.unwrap();

    let consumer: BaseConsumer = config(&broker).create().unwrap();
    for (timestamp, offset) in [(BASE_TS, 0), (BASE_TS + 15_000, 15), (BASE_TS + 15_500, 16), (BASE_TS + 29_000, 29)] {
        let mut query = TopicPartitionList::new();
        query.add_partition_offset("timeline", 0, Offset::Offset(timestamp)).unwrap();
        let answer = consumer.offsets_for_times(query, Duration::from_secs(5)).unwrap();
        assert_eq!(answer.elements()[0].offset(), Offset::Offset(offset), "at {timestamp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_resumes_after_the_offsets_another_committed() {
    let broker = Broker::start().unwrap();
    create_topics(&broker.bootstrap(), &[("events", 3, false)]).await.unwrap();
    let records = keyed_records(90);
    produce(&broker.bootstrap(), "events", &records).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);

    let first = member(&broker, "resume");
    first.subscribe(&["events"]).unwrap();
    let mut read_first = BTreeSet::new();
    let mut next_offsets: BTreeMap<i32, i64> = BTreeMap::new();
    while read_first.len() < 45 && Instant::now() < deadline {
        if let Some(message) = first.poll(Duration::from_millis(200)) {
            let message = message.unwrap();
            read_first.insert((message.partition(), message.offset()));
            next_offsets.insert(message.partition(), message.offset() + 1);
        }
    }
    assert_eq!(read_first.len(), 45);
    let mut commit = TopicPartitionList::new();
    for (&partition, &offset) in &next_offsets {
        commit.add_partition_offset("events", partition, Offset::Offset(offset)).unwrap();
    }
    first.commit(&commit, CommitMode::Sync).unwrap();
    drop(first); // Leaves the group.

    let second = member(&broker, "resume");
    let committed = second.committed_offsets(commit.clone(), Duration::from_secs(5)).unwrap();
    for element in committed.elements() {
        assert_eq!(element.offset(), Offset::Offset(next_offsets[&element.partition()]));
    }
    second.subscribe(&["events"]).unwrap();
    let mut read_second = BTreeSet::new();
    while read_second.len() < 45 && Instant::now() < deadline {
        if let Some(message) = second.poll(Duration::from_millis(200)) {
            let message = message.unwrap();
            assert!(read_second.insert((message.partition(), message.offset())));
        }
    }
    assert!(read_first.is_disjoint(&read_second), "the second member re-read committed records");
    assert_eq!(read_first.len() + read_second.len(), 90, "together they read every record once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_the_partitions_and_one_takes_over_when_the_other_leaves() {
    let broker = Broker::start().unwrap();
    create_topics(&broker.bootstrap(), &[("events", 4, false)]).await.unwrap();
    let all: BTreeSet<i32> = (0..4).collect();
    let deadline = Instant::now() + Duration::from_secs(30);

    let one = member(&broker, "rebalance");
    one.subscribe(&["events"]).unwrap();
    while partitions_of(&one) != all && Instant::now() < deadline {
        let _ = one.poll(Duration::from_millis(100));
    }
    assert_eq!(partitions_of(&one), all);

    let two = member(&broker, "rebalance");
    two.subscribe(&["events"]).unwrap();
    let split = |one: &BaseConsumer, two: &BaseConsumer| {
        let (a, b) = (partitions_of(one), partitions_of(two));
        !a.is_empty() && !b.is_empty() && a.is_disjoint(&b) && a.union(&b).copied().collect::<BTreeSet<_>>() == all
    };
    while !split(&one, &two) && Instant::now() < deadline {
        let _ = one.poll(Duration::from_millis(100));
        let _ = two.poll(Duration::from_millis(100));
    }
    assert!(split(&one, &two), "one {:?}, two {:?}", partitions_of(&one), partitions_of(&two));

    drop(one);
    while partitions_of(&two) != all && Instant::now() < deadline {
        let _ = two.poll(Duration::from_millis(100));
    }
    assert_eq!(partitions_of(&two), all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_producer_writes_each_record_once_in_order() {
    let broker = Broker::start().unwrap();
    create_topics(&broker.bootstrap(), &[("events", 3, false)]).await.unwrap();
    let producer: FutureProducer =
        config(&broker).set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "2").create().unwrap();
    let records = keyed_records(300);
    let deliveries: Vec<_> = records
        .iter()
        .map(|(key, payload, ts)| {
            let record = FutureRecord {
                topic: "events",
                partition: None,
                payload: payload.as_deref(),
                key: key.as_deref(),
                timestamp: *ts,
                headers: None,
            };
            producer.send_result(record).map_err(|(e, _)| e).unwrap()
        })
        .collect();
    let mut per_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for delivery in deliveries {
        let delivered = delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        per_partition.entry(delivered.partition).or_default().push(delivered.offset);
    }
    for (partition, offsets) in &per_partition {
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(offsets, &expected, "partition {partition}: offsets in send order, no gaps or repeats");
    }

    let got = consume_all(&broker.bootstrap(), "events", 300, Duration::from_secs(30)).unwrap();
    assert_eq!(got.iter().map(index_of).collect::<BTreeSet<_>>().len(), 300);
}
