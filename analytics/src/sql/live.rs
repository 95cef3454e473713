//! The rows of the archive's open files, readable while they are written: the "last seconds" half
//! of every SQL table.
//!
//! A [`ParquetArchive`](../../../meshguard_ingest/archive/struct.ParquetArchive.html) writes rows
//! into hidden temporary files and renames each into place when it closes it (at a size bound or a
//! checkpoint). Until then the rows are invisible to a Parquet reader; with a `LiveRows` attached,
//! the writer also hands every batch it writes here, under the id of the file it went to, and
//! drops them in the same critical section as the rename that publishes the file. A reader that
//! lists the table's folder *and* copies these rows under the read lock therefore sees every row
//! exactly once: either in a closed file or here, never both, never neither.
//!
//! Memory: the rows of the open files, which the archive closes at every checkpoint (seconds);
//! the batches are the decoded ones, shared, not copied.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use arrow::record_batch::RecordBatch;

/// Rows written to files that are still open. See the module docs.
#[derive(Debug, Default)]
pub struct LiveRows {
    files: RwLock<BTreeMap<u64, Vec<RecordBatch>>>,
}

impl LiveRows {
    /// A new, empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that `batch` was written to open file `file`.
    pub fn push(&self, file: u64, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.files.write().unwrap_or_else(PoisonError::into_inner).entry(file).or_default().push(batch);
        }
    }

    /// Runs `publish` (the rename that makes file `file` visible to readers) and forgets the file's
    /// rows, atomically for readers of [`LiveRows::snapshot`].
    pub fn close<R>(&self, file: u64, publish: impl FnOnce() -> R) -> R {
        let mut files = self.files.write().unwrap_or_else(PoisonError::into_inner);
        let result = publish();
        files.remove(&file);
        result
    }

    /// Runs `list` (the listing of the table's closed files) and copies the rows of the open
    /// files, with no file closing in between.
    pub fn snapshot<T>(&self, list: impl FnOnce() -> T) -> (T, Vec<RecordBatch>) {
        let files = self.files.read().unwrap_or_else(PoisonError::into_inner);
        let listed = list();
        (listed, files.values().flatten().cloned().collect())
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.files.read().unwrap_or_else(PoisonError::into_inner).values().flatten().map(RecordBatch::num_rows).sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    #[test]
    fn closing_a_file_drops_its_rows_only() {
        let live = LiveRows::new();
        live.push(1, batch(3));
        live.push(2, batch(4));
        live.push(1, batch(5));
        assert_eq!(live.rows(), 12);
        let renamed = live.close(1, || "renamed");
        assert_eq!(renamed, "renamed");
        assert_eq!(live.rows(), 4);
        let (listed, rows) = live.snapshot(|| 7);
        assert_eq!((listed, rows.iter().map(RecordBatch::num_rows).sum::<usize>()), (7, 4));
    }
}
