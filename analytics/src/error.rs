//! Errors of the analytics crate.

/// Errors of the engine and its checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a checkpoint failed.
    #[error("checkpoint {path}: {source}")]
    CheckpointIo {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A checkpoint could not be decoded (corrupt, or written by an incompatible version).
    #[error("checkpoint {name} is unreadable: {reason}")]
    CheckpointFormat {
        /// The checkpoint's name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
