//! Contract time: inputs are RFC 3339 strings or integer epoch milliseconds; outputs are always
//! RFC 3339 in UTC with milliseconds. Internally every time is `i64` epoch milliseconds.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer};

/// Epoch milliseconds, the internal representation of every contract time.
pub type EpochMs = i64;

/// Parses a contract time string exactly as the Arrow decoder does (RFC 3339, UTC when no offset).
pub fn parse_time_str(s: &str) -> Option<EpochMs> {
    arrow::compute::kernels::cast_utils::string_to_datetime(&Utc, s).ok().map(|d| d.timestamp_millis())
}

/// Formats epoch milliseconds as the contract's output form, `2026-11-24T17:00:00.123Z`.
pub fn format_ms(ms: EpochMs) -> String {
    match DateTime::<Utc>::from_timestamp_millis(ms) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        // Out of chrono's range (±262,000 years): cannot come from a validated input.
        None => ms.to_string(),
    }
}

/// Serde helpers for contract times in Rust records: accept both input forms, write RFC 3339.
pub mod serde_ms {
    use super::*;

    /// Writes epoch milliseconds as RFC 3339 UTC with milliseconds.
    pub fn serialize<S: Serializer>(ms: &EpochMs, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_ms(*ms))
    }

    /// Reads an RFC 3339 string or integer epoch milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EpochMs, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either<'a> {
            Ms(i64),
            Str(&'a str),
            String(String),
        }
        let bad = |s: &str| serde::de::Error::custom(format!("expected RFC 3339 or epoch ms, found {s:?}"));
        match Either::deserialize(d)? {
            Either::Ms(ms) => Ok(ms),
            Either::Str(s) => parse_time_str(s).ok_or_else(|| bad(s)),
            Either::String(s) => parse_time_str(&s).ok_or_else(|| bad(&s)),
        }
    }

    /// The same for an optional time (`null` or absent is `None`).
    pub mod option {
        use super::*;

        /// Writes `None` as `null`.
        pub fn serialize<S: Serializer>(ms: &Option<EpochMs>, s: S) -> Result<S::Ok, S::Error> {
            match ms {
                Some(ms) => super::serialize(ms, s),
                None => s.serialize_none(),
            }
        }

        /// Reads `null` as `None`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<EpochMs>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(deserialize_with = "super::deserialize")] EpochMs);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_forms() {
        assert_eq!(parse_time_str("2026-11-24T17:00:00.123Z"), Some(1_795_539_600_123));
        assert_eq!(parse_time_str("2026-11-24T18:00:00.123+01:00"), Some(1_795_539_600_123));
        assert_eq!(format_ms(1_795_539_600_123), "2026-11-24T17:00:00.123Z");
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_time_str("yesterday"), None);
        assert_eq!(parse_time_str("2026-13-45T00:00:00Z"), None);
    }
}
