//! The enforcer service's Prometheus metrics, registered in the registry the binary serves on
//! `/metrics`. Labels are bounded: target names (from configuration), results, finding kinds and
//! topic roles; never a UUID.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric of the service.
#[derive(Debug, Clone)]
pub struct EnforcerMetrics {
    /// `meshguard_enforcement_actions_total{target,result}`.
    pub actions: IntCounterVec,
    /// `meshguard_enforcement_action_duration_seconds{target}`.
    pub action_seconds: HistogramVec,
    /// `meshguard_notifications_total{kind}`.
    pub notifications: IntCounterVec,
    /// `meshguard_notifications_suppressed_total{kind}`.
    pub suppressed: IntCounterVec,
    /// `meshguard_enforcer_records_total{topic}`.
    pub records: IntCounterVec,
    /// `meshguard_enforcer_registry_entries`.
    pub registry_entries: IntGauge,
    /// `meshguard_enforcer_assigned_partitions{topic}` (`enforcement`, `findings`).
    pub assigned: IntGaugeVec,
}

/// The `result` label values, as the README lists them.
pub const RESULTS: [&str; 5] = ["applied", "already_applied", "dead_lettered", "failed", "dry_run"];

impl EnforcerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let actions = IntCounterVec::new(
            Opts::new(
                "meshguard_enforcement_actions_total",
                "Enforcement actions by target and result (applied, already_applied, dead_lettered, failed, dry_run).",
            ),
            &["target", "result"],
        )?;
        let action_seconds = HistogramVec::new(
            HistogramOpts::new(
                "meshguard_enforcement_action_duration_seconds",
                "Time to apply one action to one target, retries included.",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 16)?),
            &["target"],
        )?;
        let notifications =
            IntCounterVec::new(Opts::new("meshguard_notifications_total", "Notifications published, by finding kind."), &["kind"])?;
        let suppressed = IntCounterVec::new(
            Opts::new(
                "meshguard_notifications_suppressed_total",
                "Notifications held back by the per recipient, offender and kind rate limit, by finding kind.",
            ),
            &["kind"],
        )?;
        let records = IntCounterVec::new(
            Opts::new("meshguard_enforcer_records_total", "Records the enforcer read, by topic (enforcement, findings, registry)."),
            &["topic"],
        )?;
        let registry_entries = IntGauge::new("meshguard_enforcer_registry_entries", "Registered UUIDs in the enforcer's owner table.")?;
        let assigned = IntGaugeVec::new(
            Opts::new(
                "meshguard_enforcer_assigned_partitions",
                "Partitions assigned to this enforcer in its consumer group, by topic (enforcement, findings).",
            ),
            &["topic"],
        )?;
        let collectors: [Box<dyn prometheus::core::Collector>; 7] = [
            Box::new(actions.clone()),
            Box::new(action_seconds.clone()),
            Box::new(notifications.clone()),
            Box::new(suppressed.clone()),
            Box::new(records.clone()),
            Box::new(registry_entries.clone()),
            Box::new(assigned.clone()),
        ];
        for c in collectors {
            registry.register(c)?;
        }
        Ok(Self { actions, action_seconds, notifications, suppressed, records, registry_entries, assigned })
    }
}
