//! The Kafka dead-letter sink against a real Kafka-protocol broker (tansu, started by
//! `meshguard_testkit::Broker`; `bash scripts/install-broker.sh` installs it): a letter is on the
//! topic, keyed by the UUID, with the reason, once `send` returns; an unreachable broker is an
//! error, never a silent drop.

use std::time::Duration;

use meshguard_enforcer::service::{KafkaDeadLetters, producer};
use meshguard_enforcer::{DeadLetter, DeadLetterSink, EnforcementAction, Error};
use meshguard_ingest::KafkaConfig;
use meshguard_schemas::EnforcementStateKind;
use meshguard_schemas::output::EnforcementState;
use meshguard_testkit::{Broker, consume_all, create_topics};
use uuid::Uuid;

const TOPIC: &str = "meshguard.deadletter.v1";

fn action() -> EnforcementAction {
    EnforcementAction::new(EnforcementState {
        uuid: Uuid::from_u128(0x9b2f_1c3a_0d4e_4f5a_8b6c_7d8e_9f0a_1b2c),
        state: EnforcementStateKind::Blocked,
        since: 1_795_539_790_000,
        until: Some(1_795_543_390_000),
        reason: String::from("5 unauthorized attempts in 10 minutes"),
        attempts: 5,
        findings: vec![],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_is_on_the_topic_with_the_reason_once_sent() {
    let broker = Broker::start().expect("tansu starts");
    create_topics(&broker.bootstrap(), &[(TOPIC, 1, false)]).await.expect("topic");
    let kafka = KafkaConfig::new(broker.bootstrap());
    let sink = KafkaDeadLetters::new(producer(&kafka).expect("producer"), TOPIC, "meshguard.enforcement.v1", Duration::from_secs(30));
    let action = action();
    sink.send(DeadLetter::new("soc", &action, 5, "HTTP 503: try later")).await.expect("stored");

    let records = consume_all(&broker.bootstrap(), TOPIC, 1, Duration::from_secs(30)).expect("the letter is there");
    assert_eq!(records[0].key.as_deref(), Some(b"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c".as_slice()), "keyed by the UUID");
    let v: serde_json::Value = serde_json::from_slice(records[0].payload.as_deref().expect("a value")).expect("JSON");
    assert_eq!(v["source"], "enforcer");
    assert_eq!(v["topic"], "meshguard.enforcement.v1");
    assert_eq!(v["target"], "soc");
    assert_eq!(v["reason"], "HTTP 503: try later");
    assert_eq!(v["attempts"], 5);
    assert_eq!(v["action"], "block");
    assert_eq!(v["action_id"], action.id().to_string());
    assert_eq!(v["state"]["state"], "blocked");
    assert_eq!(v["state"]["until"], "2026-11-24T18:03:10.000Z");
    assert!(v["ts"].as_str().is_some_and(|ts| ts.ends_with('Z')), "{v}");
}

#[tokio::test]
async fn an_unreachable_broker_is_an_error_naming_the_action() {
    // A closed loopback port: nothing listens there once the listener is dropped.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
    let mut kafka = KafkaConfig::new(format!("127.0.0.1:{port}"));
    kafka.client.insert(String::from("message.timeout.ms"), String::from("1500"));
    let sink = KafkaDeadLetters::new(producer(&kafka).expect("producer"), TOPIC, "meshguard.enforcement.v1", Duration::from_secs(5));
    let action = action();
    match sink.send(DeadLetter::new("soc", &action, 5, "HTTP 503")).await {
        Err(Error::DeadLetter { sink, action_id, reason }) => {
            assert_eq!((sink.as_str(), action_id), (TOPIC, action.id()));
            assert!(!reason.is_empty());
        }
        other => panic!("expected a dead-letter error, got {other:?}"),
    }
}
