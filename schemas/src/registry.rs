//! The device directory (`meshguard.registry.v1`): registry records, permissions records and
//! security profiles, as typed Rust values.
//!
//! Registry records are decoded row-wise with serde rather than into a `RecordBatch`: they are few,
//! deeply nested and irregular (restrictions, arbitrary JSON in envelope rules), and what the
//! pipeline needs from them is an index keyed by UUID, not a column. Unknown fields are ignored so
//! that the platform can add optional fields without breaking meshguard.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::enums::RegistryKind;
use crate::error::RecordError;

/// One registered UUID. A null Kafka value for the same key (a tombstone) unregisters it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryRecord {
    /// The registered UUID.
    pub uuid: Uuid,
    /// What it is.
    pub kind: RegistryKind,
    /// Device type, for per-type throttles.
    #[serde(rename = "type", default)]
    pub device_type: Option<String>,
    /// Device maker, for per-manufacturer throttles.
    #[serde(default)]
    pub manufacturer: Option<String>,
    /// The owning UUID; an owner has every access level to what it owns.
    #[serde(default)]
    pub owner: Option<Uuid>,
    /// Groups this UUID belongs to, e.g. `company:acme`.
    #[serde(default)]
    pub groups: Vec<String>,
    /// ISO 3166 alpha-2 country where the UUID is registered or hosted.
    #[serde(default)]
    pub country: Option<String>,
    /// Exempt from throttles (the platform's own UUIDs).
    #[serde(default)]
    pub exempt: bool,
    /// The permissions record.
    #[serde(default)]
    pub permissions: Permissions,
    /// Security profiles.
    #[serde(default)]
    pub profiles: Vec<Profile>,
}

impl RegistryRecord {
    /// Decodes one registry record, naming the offending field on error. `index` is the record's
    /// position in its batch, for the error.
    pub fn from_json(index: usize, bytes: &[u8]) -> Result<Self, RecordError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let field = (path != ".").then_some(path);
            let msg = inner.to_string();
            let expected = if inner.is_syntax() || inner.is_eof() { "valid JSON" } else { "a registry record per the contract" };
            RecordError::new(index, field.as_deref(), expected, msg)
        })
    }
}

/// An entry of an allow or deny list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// `"*"`: every registered UUID.
    Any,
    /// `group:NAME`: every UUID in the group.
    Group(String),
    /// One UUID.
    Uuid(Uuid),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Any => f.write_str("*"),
            Principal::Group(g) => write!(f, "group:{g}"),
            Principal::Uuid(u) => write!(f, "{u}"),
        }
    }
}

impl Principal {
    /// Parses `"*"`, `group:NAME` or a UUID.
    pub fn parse(s: &str) -> Option<Self> {
        if s == "*" {
            Some(Principal::Any)
        } else if let Some(group) = s.strip_prefix("group:") {
            (!group.is_empty()).then(|| Principal::Group(group.to_owned()))
        } else {
            Uuid::try_parse(s).ok().map(Principal::Uuid)
        }
    }
}

impl Serialize for Principal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Principal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Principal::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("expected a UUID, \"group:NAME\" or \"*\", found {s:?}")))
    }
}

/// An allow list and a deny list for one access level.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccessList {
    /// Whitelist.
    #[serde(default)]
    pub allow: Vec<Principal>,
    /// Blacklist; wins over `allow`.
    #[serde(default)]
    pub deny: Vec<Principal>,
}

/// A permissions record: one [`AccessList`] per access level. An absent level is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Permissions {
    /// `discover`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discover: Option<AccessList>,
    /// `send`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<AccessList>,
    /// `receive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive: Option<AccessList>,
    /// `subscribe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<AccessList>,
    /// `configure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configure: Option<AccessList>,
}

/// A security profile: permissions and restrictions for the requesters it applies to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Name, used in findings' `rule` (`profile:NAME/timing`).
    pub name: String,
    /// Requesters it governs: UUIDs, `group:NAME` entries or `"*"`.
    #[serde(default)]
    pub applies_to: Vec<Principal>,
    /// Grants and denials for its audience.
    #[serde(default)]
    pub permissions: Option<Permissions>,
    /// Restrictions that must all hold.
    #[serde(default)]
    pub restrictions: Restrictions,
}

/// The restrictions of a security profile; each absent one holds trivially.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Restrictions {
    /// The request must fall inside one of these windows.
    #[serde(default)]
    pub timing: Option<Vec<TimingWindow>>,
    /// Where the requester and/or target may be.
    #[serde(default)]
    pub location: Option<LocationRestriction>,
    /// Message-envelope rules.
    #[serde(default)]
    pub envelope: Option<EnvelopeRestriction>,
    /// Route rules.
    #[serde(default)]
    pub path: Option<PathRestriction>,
    /// Who must be online.
    #[serde(default)]
    pub presence: Option<PresenceRestriction>,
    /// Attempts by one requester on this target per period.
    #[serde(default)]
    pub throttle: Option<Throttle>,
}

/// A timing window: absolute `[from, until)` or recurring weekly `[start, end)` in a time zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TimingWindow {
    /// Absolute window.
    Absolute {
        /// Start, inclusive (epoch ms).
        #[serde(with = "crate::time::serde_ms")]
        from: i64,
        /// End, exclusive (epoch ms).
        #[serde(with = "crate::time::serde_ms")]
        until: i64,
    },
    /// Recurring weekly window.
    Recurring {
        /// Days the window starts on: `mon`..`sun`.
        days: Vec<String>,
        /// `HH:MM`, inclusive.
        start: String,
        /// `HH:MM`, exclusive; before `start` means the window crosses midnight.
        end: String,
        /// IANA time zone.
        tz: String,
    },
}

/// Whose location a location restriction checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocationSubject {
    /// The requester.
    Requester,
    /// The target (its latest known location).
    Target,
    /// Both.
    Both,
}

/// An area: a country or a circle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Area {
    /// A circle of `radius_m` metres around a point.
    Circle {
        /// Latitude, degrees.
        lat: f64,
        /// Longitude, degrees.
        lon: f64,
        /// Radius, metres.
        radius_m: f64,
    },
    /// An ISO 3166 alpha-2 country.
    Country {
        /// The country code.
        country: String,
    },
}

/// A location restriction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocationRestriction {
    /// Whose location is checked.
    pub subject: LocationSubject,
    /// The location must be in one of these (when non-empty).
    #[serde(default)]
    pub allow: Vec<Area>,
    /// The location must be in none of these.
    #[serde(default)]
    pub deny: Vec<Area>,
}

/// Message-envelope rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeRestriction {
    /// Allowed `payload_type` tags.
    #[serde(default)]
    pub payload_types: Option<Vec<String>>,
    /// Largest payload in bytes.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Rules per top-level payload field.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRule>,
}

/// A rule on one payload field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldRule {
    /// Allowed values, compared as JSON values exactly.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<serde_json::Value>>,
    /// Smallest allowed number.
    #[serde(default)]
    pub min: Option<f64>,
    /// Largest allowed number.
    #[serde(default)]
    pub max: Option<f64>,
}

/// Route rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PathRestriction {
    /// UUIDs that must not appear among the hops.
    #[serde(default)]
    pub deny: Vec<Uuid>,
    /// UUIDs that must appear among the hops.
    #[serde(default)]
    pub require: Vec<Uuid>,
    /// No hop registered in these countries.
    #[serde(default)]
    pub deny_countries: Vec<String>,
    /// Longest allowed `route`.
    #[serde(default)]
    pub max_hops: Option<u32>,
}

/// Presence rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceRestriction {
    /// The target must be online.
    #[serde(default)]
    pub target_online: Option<bool>,
    /// The requester must be online.
    #[serde(default)]
    pub requester_online: Option<bool>,
}

/// At most `max` attempts by one requester on this target per `per_s` seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throttle {
    /// Attempts allowed per period.
    pub max: u64,
    /// Period in seconds.
    pub per_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_broken_field() {
        let bad = br#"{"uuid":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f","kind":"device","permissions":{"send":{"allow":["nope"]}}}"#;
        let e = RegistryRecord::from_json(3, bad).expect_err("must fail");
        assert_eq!(e.index, 3);
        assert_eq!(e.field.as_deref(), Some("permissions.send.allow[0]"));
        assert!(e.found.contains("nope"), "{e}");
    }

    #[test]
    fn principals() {
        assert_eq!(Principal::parse("*"), Some(Principal::Any));
        assert_eq!(Principal::parse("group:home:d0d0"), Some(Principal::Group("home:d0d0".into())));
        assert_eq!(Principal::parse("group:"), None);
        assert!(matches!(Principal::parse("C4D5E6F7-1A2B-4C3D-8E9F-0A1B2C3D4E5F"), Some(Principal::Uuid(_))));
    }
}
