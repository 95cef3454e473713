//! `devices`: the registry as the pipeline knows it now. Inside a worker it is read from the
//! pipeline's own copy ([`Devices`], updated with every registry change it applies); elsewhere
//! (`meshguard sql` on a machine with the archive) from the snapshot the worker writes beside the
//! archive (`<archive dir>/devices/devices.parquet`, replaced whole).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::{MemTable, TableType};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use meshguard_schemas::registry::RegistryRecord;
use uuid::Uuid;

use super::tables::{devices_batch, devices_schema};

/// The registered UUIDs with the event time of their latest record.
#[derive(Debug, Default)]
pub struct Devices {
    map: RwLock<HashMap<Uuid, (i64, Arc<RegistryRecord>)>>,
    /// Bumped by every change, so a snapshot writer knows when there is something new.
    version: std::sync::atomic::AtomicU64,
}

impl Devices {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies registry changes: `Some(record)` registers or updates, `None` unregisters.
    pub fn apply<'a>(&self, changes: impl IntoIterator<Item = (Uuid, i64, Option<&'a Arc<RegistryRecord>>)>) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let mut changed = false;
        for (uuid, ts, record) in changes {
            changed = true;
            match record {
                Some(r) => {
                    map.insert(uuid, (ts, r.clone()));
                }
                None => {
                    map.remove(&uuid);
                }
            }
        }
        if changed {
            self.version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Registered UUIDs.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A counter that changes whenever the directory does.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The directory as one batch of [`devices_schema`], by UUID.
    pub fn batch(&self) -> arrow::error::Result<RecordBatch> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let mut rows: Vec<(&Uuid, &(i64, Arc<RegistryRecord>))> = map.iter().collect();
        rows.sort_unstable_by_key(|(u, _)| **u);
        devices_batch(rows.into_iter().map(|(_, (ts, r))| (*ts, r.as_ref())))
    }
}

/// The `devices` table. See the module docs.
pub struct DevicesTable {
    live: Option<Arc<Devices>>,
    snapshot: PathBuf,
}

impl fmt::Debug for DevicesTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicesTable").field("live", &self.live.is_some()).field("snapshot", &self.snapshot).finish()
    }
}

impl DevicesTable {
    /// Reads `live` when given, else the snapshot file `snapshot` when it exists.
    pub fn new(live: Option<Arc<Devices>>, snapshot: PathBuf) -> Self {
        Self { live, snapshot }
    }
}

#[async_trait]
impl TableProvider for DevicesTable {
    fn schema(&self) -> SchemaRef {
        devices_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some(live) = &self.live {
            let batch = live.batch()?;
            return MemTable::try_new(devices_schema(), vec![vec![batch]])?.scan(state, projection, filters, limit).await;
        }
        if self.snapshot.is_file() {
            let url = ListingTableUrl::parse(self.snapshot.to_string_lossy())?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
            let config = ListingTableConfig::new(url).with_listing_options(options).with_schema(devices_schema());
            return ListingTable::try_new(config)?.scan(state, projection, filters, limit).await;
        }
        MemTable::try_new(devices_schema(), vec![vec![]])?.scan(state, projection, filters, limit).await
    }
}

/// Writes `devices` to `path` whole: a temporary file beside it, fsynced, renamed over it.
pub fn write_snapshot(devices: &Devices, path: &std::path::Path) -> std::io::Result<()> {
    let batch = devices.batch().map_err(std::io::Error::other)?;
    let dir = path.parent().ok_or_else(|| std::io::Error::other("the devices snapshot needs a folder"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(".devices.parquet.tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, devices_schema(), None).map_err(std::io::Error::other)?;
    writer.write(&batch).map_err(std::io::Error::other)?;
    let file = writer.into_inner().map_err(std::io::Error::other)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
