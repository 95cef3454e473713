//! The SQL surface: one DataFusion [`SessionContext`] over the archive and the worker's live rows,
//! with the tables `findings`, `enforcement` (every change; `enforcement_current`: the latest per
//! UUID), `attempts` and `devices`, read-only.
//!
//! ```text
//!  <archive dir>/findings/date=…/part-*.parquet   ─┐
//!  <archive dir>/enforcement/date=…/…             ─┼─ ArchiveTable: closed files ∪ LiveRows (open files)
//!  <archive dir>/attempts/date=…/…  (attempts_raw) ─┘      └─ attempts: a view with UUIDs and enums as text
//!  Devices (the pipeline's registry) or <archive dir>/devices/devices.parquet ── devices
//! ```
//!
//! Inside `meshguard run` the tables read the archive's closed files and the rows of the files the
//! worker still has open, so a query sees the last seconds too (see [`live`]); `meshguard sql` on
//! its own reads the closed files, which the worker closes at every checkpoint (a few seconds).
//!
//! **Read-only.** Every statement is planned with DDL, DML and other statements (`SET`, `COPY`,
//! `CREATE`, `INSERT`, `DROP`…) refused: [`SqlSurface::query`] returns [`SqlError::Refused`] naming
//! what was refused. The PostgreSQL endpoint ([`pg`]) applies the same rule.
//!
//! Rows repeat only where the archive repeats them: after a consumer-group rebalance a partition's
//! rows since its last checkpoint may be archived by both workers (every row carries its `id`).

mod archive_table;
mod devices;
mod live;
pub mod output;
pub mod pg;
pub mod tables;
mod udf;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{SessionConfig, SessionContext};

pub use archive_table::{ArchiveTable, closed_files};
pub use devices::{Devices, DevicesTable, write_snapshot};
pub use live::LiveRows;

/// Folder names of the archived tables under the archive's directory.
pub mod folders {
    /// Message attempts.
    pub const ATTEMPTS: &str = "attempts";
    /// Findings.
    pub const FINDINGS: &str = "findings";
    /// Enforcement changes.
    pub const ENFORCEMENT: &str = "enforcement";
    /// Reported interactions.
    pub const INTERACTIONS: &str = "interactions";
    /// The devices snapshot's folder.
    pub const DEVICES: &str = "devices";
}

/// The `attempts` view: the archive's columns, UUIDs and enums as text.
const ATTEMPTS_VIEW: &str = r#"CREATE VIEW attempts AS SELECT
    uuid_text(id) AS id, ts, CAST(action AS VARCHAR) AS action, uuid_text("from") AS "from", uuid_text("to") AS "to",
    CAST(auth AS VARCHAR) AS auth, target_token, uuid_text(route) AS route, location, payload_type, payload, payload_bytes,
    encrypted, protocol, broker
  FROM attempts_raw"#;

/// `audit`: the enforcer's audit trail (state changes it applied, calls it made to each target),
/// UUIDs and enums as text.
const AUDIT_VIEW: &str = r#"CREATE VIEW audit AS SELECT
    ts, CAST(event AS VARCHAR) AS event, uuid_text(uuid) AS uuid, uuid_text(action_id) AS action_id,
    CAST(action AS VARCHAR) AS action, CAST(state AS VARCHAR) AS state, since, until, reason, "partition", "offset",
    target, attempt, CAST(outcome AS VARCHAR) AS outcome, error, started, latency_us
  FROM audit_raw"#;

/// `interactions`: the devices' reported interactions, UUIDs and enums as text, each entry once
/// (every worker archives the whole topic, and a restart may archive again what it read since
/// its last checkpoint).
const INTERACTIONS_VIEW: &str = r#"CREATE VIEW interactions AS SELECT
    uuid_text(id) AS id, ts, uuid_text(reporter) AS reporter, uuid_text(peer) AS peer, CAST(kind AS VARCHAR) AS kind,
    duration_s, access_point, location
  FROM (SELECT *, row_number() OVER (PARTITION BY id ORDER BY ts) AS copy FROM interactions_raw) WHERE copy = 1"#;

/// `enforcement_current`: each UUID's latest enforcement change, i.e. its state now.
const ENFORCEMENT_CURRENT_VIEW: &str = r#"CREATE VIEW enforcement_current AS
  SELECT ts, uuid, state, since, until, reason, attempts, findings FROM (
    SELECT *, row_number() OVER (PARTITION BY uuid ORDER BY since DESC, ts DESC) AS latest FROM enforcement
  ) WHERE latest = 1"#;

/// Where the tables' rows come from.
#[derive(Debug, Clone, Default)]
pub struct SqlSources {
    /// The archive's root (`archive.dir`).
    pub archive_dir: PathBuf,
    /// Live rows of the open findings files (inside a worker).
    pub findings: Option<Arc<LiveRows>>,
    /// Live rows of the open enforcement files.
    pub enforcement: Option<Arc<LiveRows>>,
    /// Live rows of the open attempts files.
    pub attempts: Option<Arc<LiveRows>>,
    /// Live rows of the open interactions files.
    pub interactions: Option<Arc<LiveRows>>,
    /// The pipeline's registry.
    pub devices: Option<Arc<Devices>>,
    /// The enforcer's audit trail: its folder (`enforcer.audit.dir`) and the schema of its files
    /// (`meshguard_enforcer::audit_schema()`). Without it there is no `audit` table.
    pub audit: Option<(PathBuf, SchemaRef)>,
    /// Live rows of the audit trail's open files (an enforcer in the same process).
    pub audit_live: Option<Arc<LiveRows>>,
}

impl SqlSources {
    /// Fresh live buffers for every table: what a worker hands to its archives and to its SQL surface.
    pub fn live(archive_dir: &Path) -> Self {
        Self {
            archive_dir: archive_dir.to_owned(),
            findings: Some(Arc::new(LiveRows::new())),
            enforcement: Some(Arc::new(LiveRows::new())),
            attempts: Some(Arc::new(LiveRows::new())),
            interactions: Some(Arc::new(LiveRows::new())),
            devices: Some(Arc::new(Devices::new())),
            audit: None,
            audit_live: Some(Arc::new(LiveRows::new())),
        }
    }

    /// With the enforcer's audit trail in `dir` (files of `schema`) as the `audit` table.
    #[must_use]
    pub fn with_audit(mut self, dir: PathBuf, schema: SchemaRef) -> Self {
        self.audit = Some((dir, schema));
        self
    }

    /// The devices snapshot file.
    pub fn devices_snapshot(&self) -> PathBuf {
        self.archive_dir.join(folders::DEVICES).join("devices.parquet")
    }
}

/// Why a query gave no result.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The statement would change something, or is not a query.
    #[error("refused: the SQL surface is read-only ({0})")]
    Refused(String),
    /// Parsing, planning or running it failed.
    #[error("{0}")]
    Query(#[from] DataFusionError),
}

/// The statement kinds a read-only surface allows.
pub fn read_only_options() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

/// One session over the tables. Cheap to share (`Arc`); every query plans afresh, so it sees the
/// files closed since the last one.
#[derive(Clone)]
pub struct SqlSurface {
    ctx: Arc<SessionContext>,
}

impl std::fmt::Debug for SqlSurface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSurface").field("session", &self.ctx.session_id()).finish()
    }
}

impl SqlSurface {
    /// Registers the tables over `sources`.
    pub async fn new(sources: &SqlSources) -> Result<Self, DataFusionError> {
        // Small partitions: the worker's cores belong to the pipeline; queries are for people.
        let mut config = SessionConfig::new()
            .with_target_partitions(2)
            .with_information_schema(true)
            .with_default_catalog_and_schema("meshguard", "public");
        // `CAST(x AS VARCHAR)` gives `Utf8`, the type of every text column of the tables, so
        // results have one string type whatever the query (and every client maps it to text).
        config.options_mut().sql_parser.map_string_types_to_utf8view = false;
        let ctx = SessionContext::new_with_config(config);
        ctx.register_udf(ScalarUDF::new_from_impl(udf::UuidText::default()));
        let dir = &sources.archive_dir;
        let archive = |folder: &str, schema: SchemaRef, live: &Option<Arc<LiveRows>>| {
            Arc::new(ArchiveTable::new(dir.join(folder), schema, live.clone()))
        };
        ctx.register_table("findings", archive(folders::FINDINGS, tables::findings_schema(), &sources.findings))?;
        ctx.register_table("enforcement", archive(folders::ENFORCEMENT, tables::enforcement_schema(), &sources.enforcement))?;
        ctx.register_table(
            "attempts_raw",
            archive(folders::ATTEMPTS, meshguard_schemas::InputTopic::Messages.schema(), &sources.attempts),
        )?;
        ctx.register_table("devices", Arc::new(DevicesTable::new(sources.devices.clone(), sources.devices_snapshot())))?;
        ctx.sql(ATTEMPTS_VIEW).await?.collect().await?;
        ctx.register_table(
            "interactions_raw",
            archive(folders::INTERACTIONS, meshguard_schemas::InputTopic::Interactions.schema(), &sources.interactions),
        )?;
        ctx.sql(INTERACTIONS_VIEW).await?.collect().await?;
        if let Some((dir, schema)) = &sources.audit {
            // Written by the enforcer: with its live rows when it runs in this process.
            ctx.register_table("audit_raw", Arc::new(ArchiveTable::new(dir.clone(), schema.clone(), sources.audit_live.clone())))?;
            ctx.sql(AUDIT_VIEW).await?.collect().await?;
        }
        ctx.sql(ENFORCEMENT_CURRENT_VIEW).await?.collect().await?;
        Ok(Self { ctx: Arc::new(ctx) })
    }

    /// The session, for the PostgreSQL endpoint.
    pub fn context(&self) -> Arc<SessionContext> {
        self.ctx.clone()
    }

    /// Runs one read-only statement and returns its schema and rows.
    pub async fn query(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), SqlError> {
        let df = self.ctx.sql_with_options(sql, read_only_options()).await.map_err(refusal)?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok((schema, batches))
    }
}

/// DataFusion's "… not supported" for DDL/DML/statements under [`read_only_options`] becomes
/// [`SqlError::Refused`].
fn refusal(e: DataFusionError) -> SqlError {
    let text = e.to_string();
    if text.contains("not supported") && (text.contains("DDL") || text.contains("DML") || text.contains("Statement")) {
        let what = text.rsplit("Error during planning: ").next().unwrap_or(&text).trim().to_owned();
        SqlError::Refused(what)
    } else {
        SqlError::Query(e)
    }
}

#[cfg(test)]
mod tests;
