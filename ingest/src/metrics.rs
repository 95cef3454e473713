//! Ingest metrics, registered into the caller's Prometheus registry. Names follow Prometheus
//! conventions: `meshguard_` prefix, base units, `_total` counters, no UUIDs in labels.

use prometheus::{IntCounterVec, Opts, Registry};

/// Counters of the ingest path.
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    /// Records read, by input topic (`topic` = short name, e.g. `messages`).
    pub records: IntCounterVec,
    /// Records rejected to the dead-letter topic, by input topic and offending field (`record` when
    /// the record as a whole was wrong).
    pub deadletters: IntCounterVec,
}

impl IngestMetrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let records = IntCounterVec::new(Opts::new("meshguard_input_records_total", "Input records read, by topic."), &["topic"])?;
        let deadletters = IntCounterVec::new(
            Opts::new("meshguard_deadletter_records_total", "Input records rejected to the dead-letter topic, by topic and field."),
            &["topic", "field"],
        )?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(deadletters.clone()))?;
        Ok(Self { records, deadletters })
    }
}
