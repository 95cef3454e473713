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
///
/// Recurring windows are validated when the record is decoded (day names, `HH:MM`, an IANA zone
/// from the tz database), so a typo is a dead letter naming the field rather than a window that
/// silently never matches. `days` absent means every day; `tz` absent means UTC.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
        /// Days the window starts on.
        days: Weekdays,
        /// Inclusive start, local time.
        start: ClockTime,
        /// Exclusive end, local time; at or before `start` the window crosses midnight.
        end: ClockTime,
        /// The zone `start` and `end` are in.
        tz: TimeZone,
    },
}

impl<'de> Deserialize<'de> for TimingWindow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // One struct with every field optional, then a decision: an untagged enum would only say
        // "did not match any variant", where the operator needs to hear which field is wrong.
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default, with = "crate::time::serde_ms::option")]
            from: Option<i64>,
            #[serde(default, with = "crate::time::serde_ms::option")]
            until: Option<i64>,
            days: Option<Weekdays>,
            start: Option<ClockTime>,
            end: Option<ClockTime>,
            tz: Option<TimeZone>,
        }
        use serde::de::Error;
        let raw = Raw::deserialize(d)?;
        match raw {
            Raw { from: Some(from), until: Some(until), days: None, start: None, end: None, tz: None } => {
                if until < from {
                    return Err(D::Error::custom("an absolute window needs `until` at or after `from`"));
                }
                Ok(TimingWindow::Absolute { from, until })
            }
            Raw { from: None, until: None, days, start: Some(start), end: Some(end), tz } => Ok(TimingWindow::Recurring {
                days: days.unwrap_or(Weekdays::ALL),
                start,
                end,
                tz: tz.unwrap_or(TimeZone(chrono_tz::Tz::UTC)),
            }),
            _ => Err(D::Error::custom(
                "expected an absolute window {from, until} or a recurring one {days, start, end, tz}, not a mix or a part of either",
            )),
        }
    }
}

/// A set of weekdays, written as a list of `mon`..`sun`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Weekdays(u8);

impl Weekdays {
    /// Every day of the week.
    pub const ALL: Weekdays = Weekdays(0x7f);
    const NAMES: [&'static str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

    /// Whether `day` is in the set.
    #[inline]
    pub fn contains(self, day: chrono::Weekday) -> bool {
        self.0 & (1 << day.num_days_from_monday()) != 0
    }

    /// The set holding exactly these days.
    pub fn of(days: &[chrono::Weekday]) -> Self {
        Weekdays(days.iter().fold(0, |bits, d| bits | 1 << d.num_days_from_monday()))
    }
}

impl fmt::Debug for Weekdays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries((0..7).filter(|i| self.0 & (1 << i) != 0).map(|i| Self::NAMES[i])).finish()
    }
}

impl Serialize for Weekdays {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq((0..7).filter(|i| self.0 & (1 << i) != 0).map(|i| Self::NAMES[i]))
    }
}

impl<'de> Deserialize<'de> for Weekdays {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut bits = 0u8;
        for name in &names {
            let lower = name.to_ascii_lowercase();
            let Some(i) = Self::NAMES.iter().position(|n| lower == *n) else {
                return Err(serde::de::Error::custom(format!("expected a day of mon, tue, wed, thu, fri, sat, sun, found {name:?}")));
            };
            bits |= 1 << i;
        }
        Ok(Weekdays(bits))
    }
}

/// A local time of day, `HH:MM`, kept as minutes since midnight (`24:00` is allowed as an end).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClockTime(u16);

impl ClockTime {
    /// Minutes since midnight, `0..=1440`.
    pub fn minutes(self) -> u32 {
        u32::from(self.0)
    }

    /// Parses `HH:MM` (or `H:MM`), `00:00` to `24:00`.
    pub fn parse(s: &str) -> Option<Self> {
        let (h, m) = s.split_once(':')?;
        if h.is_empty() || h.len() > 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
        (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(ClockTime(h * 60 + m))
    }
}

impl fmt::Debug for ClockTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

impl Serialize for ClockTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{self:?}"))
    }
}

impl<'de> Deserialize<'de> for ClockTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        ClockTime::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("expected a time of day HH:MM (00:00 to 24:00), found {s:?}")))
    }
}

/// An IANA time zone (`Europe/Berlin`), checked against the tz database when decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimeZone(pub chrono_tz::Tz);

impl Serialize for TimeZone {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        s.parse::<chrono_tz::Tz>()
            .map(TimeZone)
            .map_err(|_| serde::de::Error::custom(format!("expected an IANA time zone such as \"Europe/Berlin\", found {s:?}")))
    }
}

/// An ISO 3166 alpha-2 country code, upper case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Country([u8; 2]);

impl Country {
    /// Two ASCII letters, any case; anything else is not a country code.
    #[inline]
    pub fn parse(s: &str) -> Option<Self> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => Some(Country([a.to_ascii_uppercase(), b.to_ascii_uppercase()])),
            _ => None,
        }
    }

    /// The code, upper case.
    pub fn as_str(&self) -> &str {
        // Two ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Country {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Country {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Country::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("expected an ISO 3166 alpha-2 country code such as \"DE\", found {s:?}")))
    }
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
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Area {
    /// A circle of `radius_m` metres around a point (its edge included).
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
        country: Country,
    },
}

impl<'de> Deserialize<'de> for Area {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            lat: Option<f64>,
            lon: Option<f64>,
            radius_m: Option<f64>,
            country: Option<Country>,
        }
        use serde::de::Error;
        match Raw::deserialize(d)? {
            Raw { lat: Some(lat), lon: Some(lon), radius_m: Some(radius_m), country: None } => {
                if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                    return Err(D::Error::custom(format!("expected lat in -90..=90 and lon in -180..=180, found ({lat}, {lon})")));
                }
                if !(radius_m >= 0.0 && radius_m.is_finite()) {
                    return Err(D::Error::custom(format!("expected a non-negative radius_m, found {radius_m}")));
                }
                Ok(Area::Circle { lat, lon, radius_m })
            }
            Raw { lat: None, lon: None, radius_m: None, country: Some(country) } => Ok(Area::Country { country }),
            _ => Err(D::Error::custom("expected an area {country} or {lat, lon, radius_m}")),
        }
    }
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
    pub deny_countries: Vec<Country>,
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
    fn timing_windows_are_typed_and_checked() {
        let w: Vec<TimingWindow> = serde_json::from_str(
            r#"[{"from":"2026-12-23T00:00:00Z","until":1798416000000},
                {"days":["mon","FRI"],"start":"22:00","end":"06:30","tz":"Europe/Berlin"},
                {"start":"8:00","end":"24:00"}]"#,
        )
        .expect("valid windows");
        assert_eq!(w[0], TimingWindow::Absolute { from: 1_798_416_000_000 - 5 * 86_400_000, until: 1_798_416_000_000 });
        let TimingWindow::Recurring { days, start, end, tz } = &w[1] else { panic!("recurring expected") };
        assert!(days.contains(chrono::Weekday::Fri) && !days.contains(chrono::Weekday::Sun));
        assert_eq!((start.minutes(), end.minutes()), (22 * 60, 6 * 60 + 30));
        assert_eq!(tz.0, chrono_tz::Europe::Berlin);
        let TimingWindow::Recurring { days, start, end, tz } = &w[2] else { panic!("recurring expected") };
        assert_eq!((*days, start.minutes(), end.minutes(), tz.0), (Weekdays::ALL, 480, 1440, chrono_tz::UTC));
        // Round trip in the contract's spelling.
        let text = serde_json::to_string(&w[1]).expect("serializes");
        assert_eq!(text, r#"{"days":["mon","fri"],"start":"22:00","end":"06:30","tz":"Europe/Berlin"}"#);

        for (bad, says) in [
            (r#"{"days":["funday"],"start":"08:00","end":"09:00","tz":"UTC"}"#, "funday"),
            (r#"{"days":["mon"],"start":"25:00","end":"09:00","tz":"UTC"}"#, "25:00"),
            (r#"{"days":["mon"],"start":"08:00","end":"09:00","tz":"Mars/Olympus"}"#, "Mars/Olympus"),
            (r#"{"from":"2026-12-23T00:00:00Z"}"#, "absolute window"),
            (r#"{"from":"2026-12-23T00:00:00Z","until":"2026-12-22T00:00:00Z"}"#, "until"),
        ] {
            let e = serde_json::from_str::<TimingWindow>(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_bad_restriction_is_refused_naming_its_field() {
        let bad = br#"{"uuid":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f","kind":"device","profiles":[{"name":"a","applies_to":["*"]},
            {"name":"b","applies_to":["*"],"restrictions":{"timing":[{"days":["mon"],"start":"08:00","end":"09:00","tz":"Europe/Berln"}]}}]}"#;
        let e = RegistryRecord::from_json(0, bad).expect_err("must fail");
        assert_eq!(e.field.as_deref(), Some("profiles[1].restrictions.timing[0].tz"));
        assert!(e.found.contains("Europe/Berln"), "{e}");
    }

    #[test]
    fn areas_and_countries_are_checked() {
        let a: Vec<Area> = serde_json::from_str(r#"[{"country":"de"},{"lat":52.5,"lon":13.4,"radius_m":1000}]"#).expect("valid areas");
        assert_eq!(a[0], Area::Country { country: Country::parse("DE").expect("code") });
        assert!(matches!(a[1], Area::Circle { radius_m: 1000.0, .. }));
        for bad in
            [r#"{"country":"Germany"}"#, r#"{"lat":95,"lon":0,"radius_m":1}"#, r#"{"lat":1,"lon":0}"#, r#"{"lat":1,"lon":0,"radius_m":-1}"#]
        {
            assert!(serde_json::from_str::<Area>(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn principals() {
        assert_eq!(Principal::parse("*"), Some(Principal::Any));
        assert_eq!(Principal::parse("group:home:d0d0"), Some(Principal::Group("home:d0d0".into())));
        assert_eq!(Principal::parse("group:"), None);
        assert!(matches!(Principal::parse("C4D5E6F7-1A2B-4C3D-8E9F-0A1B2C3D4E5F"), Some(Principal::Uuid(_))));
    }
}
