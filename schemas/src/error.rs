//! Errors of the contract layer. A [`RecordError`] is data (it travels to the dead-letter topic);
//! [`Error`] is for callers that asked for one record and got a broken one.

use std::fmt;

/// Why one input record was rejected: which record of the batch, which field, what the contract
/// expects there and what was found. Rendered as
/// ``field `ts` of record 17: expected RFC 3339 or epoch ms, found "yesterday"``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// Index of the record in the batch handed to the decoder.
    pub index: usize,
    /// The offending field, or `None` when the record as a whole is wrong (not JSON, too large).
    pub field: Option<String>,
    /// What the contract expects.
    pub expected: String,
    /// What was found, shortened to at most 80 characters.
    pub found: String,
}

/// Longest excerpt of an offending value kept in an error: errors must stay small and must not
/// carry a whole (possibly huge or sensitive) payload.
pub(crate) const FOUND_MAX_CHARS: usize = 80;

impl RecordError {
    pub(crate) fn new(index: usize, field: Option<&str>, expected: impl Into<String>, found: impl AsRef<str>) -> Self {
        Self { index, field: field.map(str::to_owned), expected: expected.into(), found: excerpt(found.as_ref()) }
    }
}

/// Shortens `s` to [`FOUND_MAX_CHARS`] characters, marking the cut.
pub(crate) fn excerpt(s: &str) -> String {
    match s.char_indices().nth(FOUND_MAX_CHARS) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}` of record {}: expected {}, found {}", self.index, self.expected, self.found),
            None => write!(f, "record {}: expected {}, found {}", self.index, self.expected, self.found),
        }
    }
}

impl std::error::Error for RecordError {}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One record breaks the contract.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A record that should be JSON is not (with the parser's reason).
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An Arrow kernel failed; this is a bug in meshguard, not bad input.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
