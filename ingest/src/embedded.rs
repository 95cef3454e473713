//! The embedded broker of `meshguard run` with no setup: librdkafka's in-process mock cluster. It
//! speaks the Kafka protocol on a loopback port, so every client of the pipeline talks to it over a
//! real socket exactly as to a cluster; it keeps data in memory and is gone when the process ends.
//! It is a demo and fault-injection broker, not storage: point `--brokers` at a cluster for that.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::config::Topics;
use crate::error::{Error, Result};

/// A running in-process broker. Dropping it stops it.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker").field("bootstrap", &self.bootstrap()).finish()
    }
}

impl EmbeddedBroker {
    /// Starts a one-broker cluster and creates every topic of `topics` with `partitions` partitions.
    pub fn start(topics: &Topics, partitions: i32) -> Result<Self> {
        let cluster = MockCluster::new(1).map_err(Error::kafka("starting the embedded broker"))?;
        for (name, _compacted) in topics.all() {
            cluster.create_topic(name, partitions, 1).map_err(Error::kafka(format!("creating topic {name} on the embedded broker")))?;
        }
        Ok(Self { cluster })
    }

    /// `host:port` of the broker (loopback).
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}
