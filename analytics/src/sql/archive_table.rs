//! A table over one archive folder: its closed Parquet files plus, inside the worker that writes
//! them, the rows of its open files ([`LiveRows`]), so a query sees both the archive and the last
//! seconds, each row once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DataFusionError, Result};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::{MemTable, TableType};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;

use super::LiveRows;

/// The closed Parquet files of `root` (`<root>/date=…/part-*.parquet`), oldest date first. Hidden
/// (temporary) files and other folders are not part of the table.
pub fn closed_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let folders = match std::fs::read_dir(root) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(e),
    };
    let mut dates: Vec<PathBuf> = folders
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("date=")) && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    dates.sort();
    for date in dates {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&date)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet")))
            .map(|e| e.path())
            .collect();
        names.sort();
        files.extend(names);
    }
    Ok(files)
}

/// One archived table. See the module docs.
pub struct ArchiveTable {
    root: PathBuf,
    schema: SchemaRef,
    live: Option<Arc<LiveRows>>,
}

impl fmt::Debug for ArchiveTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArchiveTable").field("root", &self.root).field("live", &self.live.is_some()).finish_non_exhaustive()
    }
}

impl ArchiveTable {
    /// The table of the files under `root` (rows of `schema`), plus `live` rows if given.
    pub fn new(root: PathBuf, schema: SchemaRef, live: Option<Arc<LiveRows>>) -> Self {
        Self { root, schema, live }
    }
}

#[async_trait]
impl TableProvider for ArchiveTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Filters prune Parquet row groups by their statistics (`ts` ranges above all); DataFusion
    /// still applies them to every row.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let list = || closed_files(&self.root);
        let (files, live) = match &self.live {
            Some(live) => live.snapshot(list),
            None => (list(), Vec::new()),
        };
        let files = files.map_err(|e| DataFusionError::External(format!("listing {}: {e}", self.root.display()).into()))?;
        let mut plans = Vec::with_capacity(2);
        if !files.is_empty() {
            let urls = files.iter().map(|p| ListingTableUrl::parse(p.to_string_lossy())).collect::<Result<Vec<_>>>()?;
            let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
            let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(self.schema.clone());
            plans.push(ListingTable::try_new(config)?.scan(state, projection, filters, limit).await?);
        }
        if !live.is_empty() || plans.is_empty() {
            plans.push(MemTable::try_new(self.schema.clone(), vec![live])?.scan(state, projection, filters, limit).await?);
        }
        UnionExec::try_new(plans)
    }
}
