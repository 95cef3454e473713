//! Topic creation: `meshguard run --brokers` creates the topics it needs when they are missing.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{KafkaConfig, Topics};
use crate::error::{Error, Result};

/// Fails with [`Error::Unreachable`] unless a broker at `kafka.brokers` answers a metadata request
/// within `timeout`: a wrong address is reported as such, not as a later timeout of something else.
pub fn check_reachable(kafka: &KafkaConfig, timeout: Duration) -> Result<()> {
    let probe: rdkafka::consumer::BaseConsumer = kafka.client_config().create().map_err(Error::kafka("creating a client"))?;
    rdkafka::consumer::Consumer::fetch_metadata(&probe, None, timeout)
        .map(|_| ())
        .map_err(|cause| Error::Unreachable { brokers: kafka.brokers.clone(), cause })
}

/// Creates every topic of `topics` that does not exist yet, with `partitions` partitions (the
/// registry and enforcement topics compacted). Existing topics are left as they are.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &Topics, partitions: i32) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create().map_err(Error::kafka("creating an admin client"))?;
    let wanted = topics.all();
    let new: Vec<NewTopic<'_>> = wanted
        .iter()
        .map(|(name, compacted)| {
            let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
            if *compacted { t.set("cleanup.policy", "compact") } else { t }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(15)));
    let results = admin.create_topics(&new, &opts).await.map_err(Error::kafka("creating topics"))?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(Error::Kafka { context: format!("creating topic {name}"), cause: rdkafka::error::KafkaError::AdminOp(code) });
            }
        }
    }
    Ok(created)
}
