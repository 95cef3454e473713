//! Errors of the ingest crate.

use rdkafka::error::KafkaError;

/// Errors talking to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kafka client call failed.
    #[error("kafka: {context}: {cause}")]
    Kafka {
        /// What meshguard was doing.
        context: String,
        /// The client's error (not a `source`: the message already says it, and the client's
        /// error repeats its own code in its chain).
        cause: KafkaError,
    },
    /// No broker answered at the configured address.
    #[error("cannot reach Kafka at {brokers} (kafka.brokers / --brokers): {cause}")]
    Unreachable {
        /// The bootstrap servers tried.
        brokers: String,
        /// The client's error (not a `source`: the message already says it, and the client's
        /// error repeats its own code in its chain).
        cause: KafkaError,
    },
    /// A record could not be delivered to an output topic.
    #[error("delivery to {topic} failed for {failed} record(s): {last_error}")]
    Delivery {
        /// The topic.
        topic: String,
        /// How many records failed since the last flush.
        failed: u64,
        /// The last error seen.
        last_error: String,
    },
    /// A thread could not be started.
    #[error("starting {what}: {cause}")]
    Thread {
        /// The thread's job.
        what: &'static str,
        /// The operating system's error.
        cause: std::io::Error,
    },
    /// Something did not happen within its time limit.
    #[error("timed out after {after_ms} ms: {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The limit.
        after_ms: u64,
    },
    /// The `[archive]` configuration is invalid.
    #[error("invalid configuration: `{field}` {reason}")]
    ArchiveConfig {
        /// The field, e.g. `archive.max_rows_per_file`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file or folder of the attempt archive could not be read or written.
    #[error("attempt archive: {what} {path}: {cause}")]
    ArchiveIo {
        /// What meshguard was doing (`creating`, `renaming`, ...).
        what: &'static str,
        /// The file or folder.
        path: std::path::PathBuf,
        /// The operating system's error.
        cause: std::io::Error,
    },
    /// The Parquet writer failed.
    #[error("attempt archive: writing {path}: {cause}")]
    ArchiveParquet {
        /// The (temporary) file being written.
        path: std::path::PathBuf,
        /// The writer's error.
        cause: parquet::errors::ParquetError,
    },
    /// An Arrow kernel failed while splitting rows by date.
    #[error("attempt archive: {what}: {cause}")]
    ArchiveArrow {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        cause: arrow::error::ArrowError,
    },
    /// A batch given to the archive is not what it archives.
    #[error("attempt archive: expected {expected}, found {found}")]
    ArchiveBatch {
        /// What the archive takes.
        expected: String,
        /// What it was given.
        found: String,
    },
}

impl Error {
    pub(crate) fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> Error {
        let context = context.into();
        move |cause| Error::Kafka { context, cause }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
