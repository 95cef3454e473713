//! Kafka connection settings and topic names.

use std::collections::BTreeMap;

use meshguard_schemas::InputTopic;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// How to reach the cluster.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Consumer group of the detection workers; workers in one group share the partitions.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Stable id of this worker in the group (static membership, KIP-345): a restarted worker with
    /// the same id takes its partitions back at once instead of after the session timeout.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Extra librdkafka properties applied to every client (e.g. `security.protocol`). Values are
    /// never logged: they may hold credentials.
    #[serde(default)]
    pub client: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Client properties may hold credentials: show their names only.
        let client: Vec<&str> = self.client.keys().map(String::as_str).collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("instance_id", &self.instance_id)
            .field("client", &client)
            .finish()
    }
}

fn default_group_id() -> String {
    "meshguard".into()
}

/// meshguard's defaults for every consumer it creates. librdkafka postpones the next fetch of a
/// partition whose local queue holds `queued.min.messages` (100,000) records or
/// `queued.max.messages.kbytes` by `fetch.queue.backoff.ms`, one second by default. A worker that
/// drains that much in a fraction of a second (catching up on a backlog, reading a large directory
/// at start) then stood idle for most of a second at a time: in `meshguard bench`'s throughput phase
/// about one run in five stalled 0.8 s, at half its wall rate (BENCHMARKS.md). 10 ms checks the
/// queue again soon enough.
pub const CONSUMER_DEFAULTS: [(&str, &str); 1] = [("fetch.queue.backoff.ms", "10")];

impl KafkaConfig {
    /// A config for `brokers` with defaults for the rest.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self { brokers: brokers.into(), group_id: default_group_id(), instance_id: None, client: BTreeMap::new() }
    }

    /// A librdkafka config with the bootstrap servers and the extra properties.
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_with(&[])
    }

    /// A consumer's librdkafka config: [`CONSUMER_DEFAULTS`], then `defaults` (those of its kind),
    /// both overridden by the extra properties of [`KafkaConfig::client`]. (Producers take no
    /// consumer property: librdkafka warns about each one it ignores.)
    pub fn consumer_config_with(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let all: Vec<(&str, &str)> = CONSUMER_DEFAULTS.iter().chain(defaults).copied().collect();
        self.client_config_with(&all)
    }

    /// A librdkafka config with meshguard's `defaults` for one kind of client, which the extra
    /// properties of [`KafkaConfig::client`] override.
    pub fn client_config_with(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        // Fail fast on a wrong address rather than retrying quietly forever at start.
        c.set("socket.connection.setup.timeout.ms", "10000");
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.client {
            c.set(k, v);
        }
        c
    }
}

/// Topic names; defaults are the contract's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    /// Message attempts.
    pub messages: String,
    /// Presence changes.
    pub presence: String,
    /// Interaction entries.
    pub interactions: String,
    /// Identity requests.
    pub identity_requests: String,
    /// The device directory (compacted).
    pub registry: String,
    /// Findings out.
    pub findings: String,
    /// Enforcement state out (compacted).
    pub enforcement: String,
    /// Notifications out.
    pub notifications: String,
    /// Identity results out.
    pub identity_results: String,
    /// Rejected input records.
    pub deadletter: String,
    /// Manual enforcement overrides (`meshguard block`/`unblock`), applied by the pipeline.
    pub control: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            messages: InputTopic::Messages.default_name().into(),
            presence: InputTopic::Presence.default_name().into(),
            interactions: InputTopic::Interactions.default_name().into(),
            identity_requests: InputTopic::IdentityRequests.default_name().into(),
            registry: InputTopic::Registry.default_name().into(),
            findings: "meshguard.findings.v1".into(),
            enforcement: "meshguard.enforcement.v1".into(),
            notifications: "meshguard.notifications.v1".into(),
            identity_results: "meshguard.identity-results.v1".into(),
            deadletter: "meshguard.deadletter.v1".into(),
            control: "meshguard.control.v1".into(),
        }
    }
}

impl Topics {
    /// The name of an input topic.
    pub fn input(&self, topic: InputTopic) -> &str {
        match topic {
            InputTopic::Messages => &self.messages,
            InputTopic::Presence => &self.presence,
            InputTopic::Interactions => &self.interactions,
            InputTopic::IdentityRequests => &self.identity_requests,
            InputTopic::Registry => &self.registry,
        }
    }

    /// The input topic of a name.
    pub fn input_of(&self, name: &str) -> Option<InputTopic> {
        InputTopic::ALL.into_iter().find(|t| self.input(*t) == name)
    }

    /// Every topic meshguard reads or writes, with whether it is compacted.
    pub fn all(&self) -> Vec<(&str, bool)> {
        vec![
            (&self.messages, false),
            (&self.presence, false),
            (&self.interactions, false),
            (&self.identity_requests, false),
            (&self.registry, true),
            (&self.findings, false),
            (&self.enforcement, true),
            (&self.notifications, false),
            (&self.identity_results, false),
            (&self.deadletter, false),
            (&self.control, false),
        ]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::KafkaConfig;

    /// meshguard's tuning defaults (`fetch.wait.max.ms` and the like) give way to the operator's
    /// `[kafka.client]`; the bootstrap servers come from `brokers`.
    #[test]
    fn the_operators_client_properties_override_meshguards_defaults() {
        let mut kafka = KafkaConfig::new("127.0.0.1:9092");
        kafka.client.insert("fetch.wait.max.ms".into(), "5".into());
        let config = kafka.client_config_with(&[("fetch.wait.max.ms", "20"), ("session.timeout.ms", "10000")]);
        assert_eq!(config.get("fetch.wait.max.ms"), Some("5"));
        assert_eq!(config.get("session.timeout.ms"), Some("10000"));
        assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:9092"));
    }

    /// Consumers get the consumer-wide defaults under their kind's, and the operator's properties
    /// over both; other clients get none of them.
    #[test]
    fn consumers_take_the_consumer_defaults_under_their_kinds_and_the_operators() {
        let mut kafka = KafkaConfig::new("127.0.0.1:9092");
        let config = kafka.consumer_config_with(&[("fetch.wait.max.ms", "20")]);
        assert_eq!((config.get("fetch.queue.backoff.ms"), config.get("fetch.wait.max.ms")), (Some("10"), Some("20")));
        assert_eq!(kafka.consumer_config_with(&[("fetch.queue.backoff.ms", "50")]).get("fetch.queue.backoff.ms"), Some("50"));
        assert_eq!(kafka.client_config().get("fetch.queue.backoff.ms"), None, "a producer's config takes no consumer property");
        kafka.client.insert("fetch.queue.backoff.ms".into(), "100".into());
        assert_eq!(kafka.consumer_config_with(&[("fetch.queue.backoff.ms", "50")]).get("fetch.queue.backoff.ms"), Some("100"));
    }
}
