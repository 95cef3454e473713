//! meshguard's configuration: one TOML file, every field typed, documented and defaulted, every
//! field overridable by an environment variable `MESHGUARD_<SECTION>__<FIELD>` (for example
//! `MESHGUARD_KAFKA__BROKERS=127.0.0.1:9092`, `MESHGUARD_PIPELINE__BATCH_MAX_RECORDS=20000`).
//! A bad configuration is refused at start with the field and the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use meshguard_analytics::EngineConfig;
use meshguard_ingest::{KafkaConfig, Topics};
use serde::{Deserialize, Serialize};

/// The whole configuration. Deserialize only: the enforcer's targets hold secrets, which are never
/// serialized.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the Kafka cluster is.
    pub kafka: KafkaSection,
    /// Topic names (defaults: the contract's).
    pub topics: Topics,
    /// Micro-batches and checkpoints.
    pub pipeline: PipelineSection,
    /// Event time and state retention.
    pub engine: EngineSection,
    /// Throttle limits (contract defaults: 10 attempts and 2 `connect`s per requester per second).
    pub throttles: meshguard_analytics::throttle::ThrottleConfig,
    /// Interaction cross-check (contract defaults: the latest 10 interactions, 5 verified, 120 s).
    pub cross_check: meshguard_analytics::crosscheck::CrossCheckConfig,
    /// Timing anomalies (contract defaults: schedules learned from 14 days and 50 attempts).
    pub timing: meshguard_analytics::timing::TimingConfig,
    /// Enforcement thresholds (contract defaults: blocked at 5 in 10 minutes for an hour,
    /// unregistered past 20 in 24 hours).
    pub enforcement: meshguard_analytics::enforcement::EnforcementConfig,
    /// The enforcer service (`meshguard enforce`, and in-process in `meshguard run`): consumer
    /// group, dry run, notifications, retries and the `[[enforcer.targets]]`.
    pub enforcer: meshguard_enforcer::EnforcerConfig,
    /// The attempt archive: every decoded message attempt in Parquet, by event date.
    pub archive: meshguard_ingest::ArchiveConfig,
    /// The HTTP listener (metrics).
    pub http: HttpSection,
    /// The SQL surface: the PostgreSQL endpoint and what it reads.
    pub sql: SqlSection,
    /// The traffic simulator of `meshguard run` (embedded) and `meshguard simulate`.
    pub simulator: SimulatorSection,
}

/// `[kafka]`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSection {
    /// Bootstrap servers, `host:port[,host:port]`. Unset: `meshguard run` starts an embedded broker.
    pub brokers: Option<String>,
    /// Consumer group of the detection workers.
    pub group_id: String,
    /// Stable id of this worker within the group (static membership): set a different one per
    /// worker, e.g. the host name, so a restarted worker takes its partitions back at once.
    pub instance_id: Option<String>,
    /// Partitions of topics meshguard creates when they are missing.
    pub partitions: i32,
    /// Extra librdkafka properties for every client (e.g. `security.protocol`, `sasl.password`).
    /// Values are secrets: never logged, printed as `***`.
    pub client: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let client: BTreeMap<&str, &str> = self.client.keys().map(|k| (k.as_str(), "***")).collect();
        f.debug_struct("KafkaSection")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("instance_id", &self.instance_id)
            .field("partitions", &self.partitions)
            .field("client", &client)
            .finish()
    }
}

impl Default for KafkaSection {
    fn default() -> Self {
        Self { brokers: None, group_id: default_group_id(), instance_id: None, partitions: default_partitions(), client: BTreeMap::new() }
    }
}

/// The consumer group of the contract's deployment guide.
fn default_group_id() -> String {
    "meshguard".into()
}

/// Enough partitions for a few workers on a small cluster.
fn default_partitions() -> i32 {
    6
}

impl KafkaSection {
    /// The ingest crate's connection settings for `brokers`.
    pub fn connection(&self, brokers: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_owned(),
            group_id: self.group_id.clone(),
            instance_id: self.instance_id.clone(),
            client: self.client.clone(),
        }
    }
}

/// `[pipeline]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSection {
    /// Most records in one micro-batch.
    pub batch_max_records: usize,
    /// Longest wait for a micro-batch's first record, ms (how often the loop turns when idle).
    pub batch_max_wait_ms: u64,
    /// Once a micro-batch has records and nothing more is fetched yet, how long to wait for more
    /// before judging it, ms. 0 (the default) judges what has arrived at once: batches then grow
    /// with the load by themselves (what arrives while one batch is judged is the next batch), and
    /// an attempt never waits for others. More trades latency for fewer, larger batches.
    pub batch_linger_ms: u64,
    /// Largest accepted input record, bytes; larger ones are dead-lettered unread.
    pub max_record_bytes: usize,
    /// Time between checkpoints, ms.
    pub checkpoint_interval_ms: u64,
    /// Directory of checkpoints (state and offsets). Workers of one group on one machine may share
    /// it. `meshguard run` without `--brokers` uses a fresh temporary directory instead.
    pub checkpoint_dir: PathBuf,
    /// Before judging a micro-batch of attempts, read the registry and presence topics up to where
    /// they end at that moment (one `ListOffsets` request), so a change published before the
    /// attempts is applied to them. Costs a round trip to the broker per micro-batch; `false`
    /// applies global-table records as they happen to be fetched.
    pub align_global_tables: bool,
}

impl Default for PipelineSection {
    fn default() -> Self {
        Self {
            // DESIGN.md: about 10,000 records / 50 ms.
            batch_max_records: 10_000,
            batch_max_wait_ms: 50,
            batch_linger_ms: 0,
            max_record_bytes: meshguard_schemas::DEFAULT_MAX_RECORD_BYTES,
            checkpoint_interval_ms: 5_000,
            checkpoint_dir: PathBuf::from(".meshguard/checkpoints"),
            align_global_tables: true,
        }
    }
}

/// `[engine]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Allowed lateness of events behind their partition's newest, ms (contract default 30 s).
    pub allowed_lateness_ms: i64,
    /// How long (event time) emitted finding ids are remembered to drop repeats, ms.
    pub dedup_horizon_ms: i64,
}

impl Default for EngineSection {
    fn default() -> Self {
        let d = EngineConfig::default();
        Self { allowed_lateness_ms: d.allowed_lateness_ms, dedup_horizon_ms: d.dedup_horizon_ms }
    }
}

/// `[http]`. (Not `Serialize`: it holds a secret.)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Address of the HTTP listener serving `/metrics` and the control API; loopback by default.
    /// Empty: no listener.
    pub listen: String,
    /// Bearer token every request must carry (`Authorization: Bearer ...`); required when
    /// `listen` is not a loopback address. A secret: never logged.
    pub token: Option<meshguard_enforcer::Secret>,
}

impl Default for HttpSection {
    fn default() -> Self {
        // 9464: the port OpenTelemetry's Prometheus exporters use by convention.
        Self { listen: "127.0.0.1:9464".into(), token: None }
    }
}

/// `[sql]`. (Not `Serialize`: it holds a secret.)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlSection {
    /// Address of the PostgreSQL wire-protocol endpoint (psql, Grafana) of `meshguard run`;
    /// loopback by default. Empty: none.
    pub pg_listen: String,
    /// The user name clients log in with.
    pub pg_user: String,
    /// The password clients must give (MD5 authentication); required when `pg_listen` is not a
    /// loopback address. A secret: never logged.
    pub pg_password: Option<meshguard_enforcer::Secret>,
    /// Keep the rows of the attempts archive's open files readable by SQL until they close (at the
    /// next checkpoint): queries see the last seconds of attempts, at the cost of holding them in
    /// memory for that long. Findings and enforcement changes are always live.
    pub live_attempts: bool,
}

impl Default for SqlSection {
    fn default() -> Self {
        // 5433: PostgreSQL's port plus one, so a local PostgreSQL on 5432 keeps its own.
        Self { pg_listen: "127.0.0.1:5433".into(), pg_user: "meshguard".into(), pg_password: None, live_attempts: true }
    }
}

/// `[simulator]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorSection {
    /// Records per second (about 98% of them message attempts).
    pub rate: u64,
    /// Registered UUIDs.
    pub devices: usize,
    /// Share of attempts that break a rule.
    pub violation_ratio: f64,
    /// Share of records that are malformed (dead-lettered).
    pub malformed_ratio: f64,
    /// Seed; the same seed gives the same traffic.
    pub seed: u64,
}

impl Default for SimulatorSection {
    fn default() -> Self {
        Self { rate: 2_000, devices: 1_000, violation_ratio: 0.02, malformed_ratio: 0.001, seed: 42 }
    }
}

impl Config {
    /// Reads `file` (if given), applies `MESHGUARD_*` environment overrides, and validates.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut fig = Figment::new();
        if let Some(file) = file {
            if !file.exists() {
                bail!("configuration file {} does not exist", file.display());
            }
            fig = fig.merge(Toml::file(file));
        }
        let mut cfg: Config = fig
            // Every field lives in a section, so overrides are exactly the `MESHGUARD_<SECTION>__…`
            // variables; `MESHGUARD_LOG`, `MESHGUARD_CONFIG`, `MESHGUARD_CACHE` are not configuration.
            .merge(Env::prefixed("MESHGUARD_").filter(|k| k.as_str().contains("__")).split("__"))
            .extract()
            .map_err(|e| anyhow::anyhow!("{}", describe(e)))
            .with_context(|| match file {
                Some(f) => format!("invalid configuration ({} and MESHGUARD_* variables)", f.display()),
                None => "invalid configuration (MESHGUARD_* variables)".to_owned(),
            })?;
        // The enforcer's audit trail sits beside the attempt archive unless placed elsewhere.
        cfg.enforcer.audit.dir.get_or_insert_with(|| cfg.archive.dir.join("audit"));
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = &self.pipeline;
        let checks: [(bool, &str, String); 9] = [
            (p.batch_max_records > 0, "pipeline.batch_max_records", "must be at least 1".into()),
            (p.batch_max_wait_ms > 0, "pipeline.batch_max_wait_ms", "must be at least 1".into()),
            (p.batch_linger_ms <= p.batch_max_wait_ms, "pipeline.batch_linger_ms", "must not exceed batch_max_wait_ms".into()),
            (p.max_record_bytes >= 64, "pipeline.max_record_bytes", "must be at least 64".into()),
            (p.checkpoint_interval_ms >= 100, "pipeline.checkpoint_interval_ms", "must be at least 100".into()),
            (self.engine.allowed_lateness_ms >= 0, "engine.allowed_lateness_ms", "must not be negative".into()),
            (self.engine.dedup_horizon_ms >= 0, "engine.dedup_horizon_ms", "must not be negative".into()),
            (self.kafka.partitions >= 1, "kafka.partitions", "must be at least 1".into()),
            (
                (0.0..=1.0).contains(&self.simulator.violation_ratio) && (0.0..=1.0).contains(&self.simulator.malformed_ratio),
                "simulator.violation_ratio/malformed_ratio",
                "must be between 0 and 1".into(),
            ),
        ];
        for (ok, field, reason) in checks {
            if !ok {
                bail!("invalid configuration: `{field}` {reason}");
            }
        }
        if !self.http.listen.is_empty() {
            let Ok(addr) = self.http.listen.parse::<std::net::SocketAddr>() else {
                bail!("invalid configuration: `http.listen` must be an address like 127.0.0.1:9464, found {:?}", self.http.listen);
            };
            if !addr.ip().is_loopback() && self.http.token.as_ref().is_none_or(|t| t.expose().is_empty()) {
                bail!("invalid configuration: `http.token` must be set when `http.listen` ({addr}) is not a loopback address");
            }
        }
        if !self.sql.pg_listen.is_empty() {
            let Ok(addr) = self.sql.pg_listen.parse::<std::net::SocketAddr>() else {
                bail!("invalid configuration: `sql.pg_listen` must be an address like 127.0.0.1:5433, found {:?}", self.sql.pg_listen);
            };
            if !addr.ip().is_loopback() && self.sql.pg_password.as_ref().is_none_or(|t| t.expose().is_empty()) {
                bail!("invalid configuration: `sql.pg_password` must be set when `sql.pg_listen` ({addr}) is not a loopback address");
            }
        }
        if self.sql.pg_user.is_empty() {
            bail!("invalid configuration: `sql.pg_user` must not be empty");
        }
        if let Some(b) = &self.kafka.brokers
            && b.trim().is_empty()
        {
            bail!("invalid configuration: `kafka.brokers` is empty");
        }
        if let Err((field, reason)) = self
            .throttles
            .validate()
            .and_then(|()| self.enforcement.validate())
            .and_then(|()| self.cross_check.validate())
            .and_then(|()| self.timing.validate())
        {
            bail!("invalid configuration: `{field}` {reason}");
        }
        if let Err((field, reason)) = self.archive.validate() {
            bail!("invalid configuration: `{field}` {reason}");
        }
        // Its errors read "invalid configuration: `enforcer.<field>` <reason>".
        self.enforcer.validate()?;
        Ok(())
    }

    /// The engine's settings.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            allowed_lateness_ms: self.engine.allowed_lateness_ms,
            dedup_horizon_ms: self.engine.dedup_horizon_ms,
            throttles: self.throttles.clone(),
            cross_check: self.cross_check.clone(),
            timing: self.timing.clone(),
            enforcement: self.enforcement.clone(),
        }
    }
}

/// figment's errors name the key path and the source (file or variable); keep all of them.
fn describe(e: figment::Error) -> String {
    e.into_iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_fields_are_refused_by_name() {
        Config::default().validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.toml");
        std::fs::write(&f, "[pipeline]\nbatch_max_recordz = 5\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("batch_max_recordz"), "{err}");
        std::fs::write(&f, "[pipeline]\nbatch_max_records = 0\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("pipeline.batch_max_records") && err.contains("at least 1"), "{err}");
        std::fs::write(&f, "[pipeline]\nbatch_max_records = \"many\"\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("batch_max_records") && err.contains("many"), "{err}");
    }

    /// The benchmark's first-detection scope turns off exactly the switchable later stages.
    #[test]
    fn the_first_detection_bench_configuration_turns_off_the_later_stages_only() {
        let cfg = Config::load(Some(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-first-detection.toml")))).unwrap();
        assert!(!cfg.timing.enabled && !cfg.enforcement.enabled && !cfg.archive.enabled);
        let mut back = cfg.clone();
        (back.timing.enabled, back.enforcement.enabled, back.archive.enabled) = (true, true, true);
        assert_eq!(format!("{back:?}"), format!("{:?}", Config::load(None).unwrap()), "everything else at its default");
    }

    /// The configuration reference in the README is a file meshguard accepts, with the defaults.
    #[test]
    fn the_readme_configuration_reference_loads_and_matches_the_defaults() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n[kafka]").expect("the README's configuration block") + "```toml\n".len();
        let block = &readme[start..start + readme[start..].find("```").unwrap()];
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("readme.toml");
        std::fs::write(&f, block).unwrap();
        let cfg = Config::load(Some(&f)).unwrap();
        assert_eq!(cfg.throttles, meshguard_analytics::throttle::ThrottleConfig::default());
        assert_eq!(cfg.pipeline.batch_max_records, PipelineSection::default().batch_max_records);
        assert!(cfg.pipeline.align_global_tables);
        let enforcer = meshguard_enforcer::EnforcerConfig::default();
        assert_eq!(
            (cfg.enforcer.enabled, cfg.enforcer.group_id.as_str(), cfg.enforcer.dry_run, cfg.enforcer.notification_interval_ms),
            (enforcer.enabled, enforcer.group_id.as_str(), enforcer.dry_run, enforcer.notification_interval_ms)
        );
        assert_eq!((cfg.enforcer.action_retries, cfg.enforcer.commit_interval_ms), (enforcer.action_retries, enforcer.commit_interval_ms));
        assert!(cfg.enforcer.targets.is_empty());
        assert_eq!(cfg.archive, meshguard_ingest::ArchiveConfig::default());
    }

    #[test]
    fn the_archive_section_is_validated_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.toml");
        std::fs::write(&f, "[archive]\nretention_days = 0\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("archive.retention_days") && err.contains("between 1 and 36500"), "{err}");
        std::fs::write(&f, "[archive]\nmax_rows_per_file = 0\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("archive.max_rows_per_file"), "{err}");
        std::fs::write(&f, "[archive]\nmax_row_per_file = 10\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("max_row_per_file"), "{err}");
    }

    #[test]
    fn the_enforcer_section_is_validated_by_field_and_keeps_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("e.toml");
        std::fs::write(&f, "[enforcer]\ncommit_interval_ms = 1\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("enforcer.commit_interval_ms") && err.contains("at least 100"), "{err}");
        std::fs::write(&f, "[enforcer]\ndry_rn = true\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("dry_rn"), "{err}");
        std::fs::write(
            &f,
            "[enforcer]\ndry_run = true\n[[enforcer.targets]]\ntype = \"mosquitto\"\nusername = \"admin\"\npassword = \"hunter2\"\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&f)).unwrap();
        assert!(cfg.enforcer.dry_run && cfg.enforcer.targets.len() == 1);
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn bad_throttles_are_refused_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(
            &f,
            "[throttles.by_type]
meter = { max = 0, per_s = 40 }
",
        )
        .unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("throttles.by_type.meter.max") && err.contains("at least 1"), "{err}");
    }

    #[test]
    fn a_listener_beyond_loopback_needs_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("h.toml");
        std::fs::write(&f, "[http]\nlisten = \"0.0.0.0:9464\"\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&f)).unwrap_err());
        assert!(err.contains("http.token") && err.contains("loopback"), "{err}");
        std::fs::write(&f, "[http]\nlisten = \"0.0.0.0:9464\"\ntoken = \"t0ken\"\n").unwrap();
        let cfg = Config::load(Some(&f)).unwrap();
        assert!(!format!("{:?}", cfg.http).contains("t0ken"), "the token is never printed");
    }

    #[test]
    fn secrets_are_not_printed() {
        let mut k = KafkaSection::default();
        k.client.insert("sasl.password".into(), "hunter2".into());
        let shown = format!("{k:?}");
        assert!(!shown.contains("hunter2") && shown.contains("***"), "{shown}");
    }
}
