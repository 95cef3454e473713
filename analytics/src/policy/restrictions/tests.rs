#![allow(clippy::unwrap_used)]

use meshguard_schemas::Action;
use meshguard_schemas::registry::{Country, EnvelopeRestriction, LocationRestriction, PathRestriction, PresenceRestriction, TimingWindow};
use serde_json::json;

use super::*;
use crate::policy::testing::{Directory, at, attempt, hops, route, u};

fn windows(json: serde_json::Value) -> Vec<TimingWindow> {
    serde_json::from_value(json).unwrap()
}

fn inside(w: &[TimingWindow], t: &str) -> bool {
    timing(w, at(t)).is_none()
}

#[test]
fn absolute_windows_are_half_open() {
    let w = windows(json!([{"from": "2026-12-23T00:00:00Z", "until": "2026-12-28T00:00:00Z"}]));
    assert!(!inside(&w, "2026-12-22T23:59:59.999Z"));
    assert!(inside(&w, "2026-12-23T00:00:00Z"), "from is inside");
    assert!(inside(&w, "2026-12-27T23:59:59.999Z"));
    assert!(!inside(&w, "2026-12-28T00:00:00Z"), "until is outside");
    // The finding's detail, as in the contract's example.
    let d = timing(&w, at("2026-11-24T17:00:00.123Z")).unwrap();
    assert_eq!(
        d,
        json!({"windows": [{"from": "2026-12-23T00:00:00.000Z", "until": "2026-12-28T00:00:00.000Z"}], "at": "2026-11-24T17:00:00.123Z"})
    );
    assert!(timing(&[], at("2026-12-24T00:00:00Z")).is_some(), "no window to fall inside");
}

#[test]
fn recurring_windows_follow_the_zones_wall_clock_in_winter_and_summer() {
    let w = windows(json!([{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:00", "end": "18:00", "tz": "Europe/Berlin"}]));
    // Winter, UTC+1. Wednesday 2026-01-14.
    assert!(!inside(&w, "2026-01-14T06:59:59.999Z"));
    assert!(inside(&w, "2026-01-14T07:00:00Z"), "08:00 CET");
    assert!(inside(&w, "2026-01-14T16:59:59.999Z"));
    assert!(!inside(&w, "2026-01-14T17:00:00Z"), "18:00 CET: end is outside");
    // Summer, UTC+2. Wednesday 2026-07-15.
    assert!(!inside(&w, "2026-07-15T05:59:59Z"));
    assert!(inside(&w, "2026-07-15T06:00:00Z"), "08:00 CEST");
    assert!(!inside(&w, "2026-07-15T16:00:00Z"), "18:00 CEST");
    // Saturday.
    assert!(!inside(&w, "2026-07-18T10:00:00Z"));
    // The weekday is the local one: Friday 23:30 UTC is Saturday 00:30 in Tokyo.
    let tokyo = windows(json!([{"days": ["sat"], "start": "00:00", "end": "01:00", "tz": "Asia/Tokyo"}]));
    assert!(inside(&tokyo, "2026-07-17T15:30:00Z"));
    // Half-hour zones.
    let kolkata = windows(json!([{"days": ["mon"], "start": "09:00", "end": "09:30", "tz": "Asia/Kolkata"}]));
    assert!(inside(&kolkata, "2026-07-13T03:30:00Z"), "09:00 IST");
    assert!(!inside(&kolkata, "2026-07-13T04:00:00Z"), "09:30 IST");
}

#[test]
fn daylight_saving_days_keep_wall_clock_semantics() {
    // 2026-03-29, Berlin skips 02:00..03:00 local (01:00Z). A window inside the gap never holds.
    let gap = windows(json!([{"days": ["sun"], "start": "02:00", "end": "03:00", "tz": "Europe/Berlin"}]));
    for t in ["2026-03-29T00:59:59.999Z", "2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z"] {
        assert!(!inside(&gap, t), "{t}");
    }
    // 08:00-09:00 local that day is 06:00Z-07:00Z (already summer time).
    let morning = windows(json!([{"days": ["sun"], "start": "08:00", "end": "09:00", "tz": "Europe/Berlin"}]));
    assert!(!inside(&morning, "2026-03-29T07:00:00Z"));
    assert!(inside(&morning, "2026-03-29T06:00:00Z"));
    // 2026-10-25, Berlin repeats 02:00..03:00 local: the window holds for two real hours.
    assert!(!inside(&gap, "2026-10-24T23:59:59Z"), "01:59:59 CEST");
    assert!(inside(&gap, "2026-10-25T00:00:00Z"), "02:00 CEST");
    assert!(inside(&gap, "2026-10-25T00:59:59Z"), "02:59:59 CEST");
    assert!(inside(&gap, "2026-10-25T01:00:00Z"), "02:00 CET, the second time");
    assert!(inside(&gap, "2026-10-25T01:59:59Z"), "02:59:59 CET");
    assert!(!inside(&gap, "2026-10-25T02:00:00Z"), "03:00 CET");
    // New York's change (2026-03-08, 2 a.m. EST to 3 a.m. EDT): 07:00 local before and after.
    let ny = windows(json!([{"days": ["sat", "sun", "mon"], "start": "07:00", "end": "07:30", "tz": "America/New_York"}]));
    assert!(inside(&ny, "2026-03-07T12:00:00Z"), "Saturday 07:00 EST");
    assert!(inside(&ny, "2026-03-08T11:00:00Z"), "Sunday 07:00 EDT");
    assert!(!inside(&ny, "2026-03-08T12:00:00Z"), "Sunday 08:00 EDT");
}

#[test]
fn windows_crossing_midnight_belong_to_the_day_they_start() {
    let w = windows(json!([{"days": ["sat"], "start": "22:00", "end": "02:00", "tz": "UTC"}]));
    // 2026-11-28 is a Saturday.
    assert!(!inside(&w, "2026-11-28T21:59:59Z"));
    assert!(inside(&w, "2026-11-28T22:00:00Z"));
    assert!(inside(&w, "2026-11-29T01:59:59.999Z"), "Sunday morning, started Saturday");
    assert!(!inside(&w, "2026-11-29T02:00:00Z"));
    assert!(!inside(&w, "2026-11-29T22:30:00Z"), "Sunday evening: Sunday is not listed");
    assert!(!inside(&w, "2026-11-28T01:00:00Z"), "Saturday morning: Friday is not listed");
    let empty = windows(json!([{"start": "09:00", "end": "09:00"}]));
    assert!(!inside(&empty, "2026-11-28T09:00:00Z"), "[s, s) is empty");
    let all_day = windows(json!([{"days": ["sat"], "start": "00:00", "end": "24:00"}]));
    assert!(inside(&all_day, "2026-11-28T23:59:59.999Z") && !inside(&all_day, "2026-11-29T00:00:00Z"));
}

fn loc(lat: Option<f64>, lon: Option<f64>, country: Option<&str>) -> Location {
    Location { lat, lon, country: country.and_then(Country::parse) }
}

#[test]
fn location_allow_deny_and_unknown() {
    let r: LocationRestriction = serde_json::from_value(json!({"subject": "requester", "allow": [{"country": "DE"}]})).unwrap();
    assert!(location(&r, &loc(None, None, Some("de")), None).is_none());
    let d = location(&r, &loc(None, None, Some("FR")), None).unwrap();
    assert_eq!(d["reason"], "outside every allowed area");
    assert_eq!(d["location"]["country"], "FR");
    let d = location(&r, &Location::default(), None).unwrap();
    assert_eq!(d["reason"], "location unknown", "unknown fails an allow list");

    let berlin = json!({"lat": 52.52, "lon": 13.405, "radius_m": 5000.0});
    let r: LocationRestriction = serde_json::from_value(json!({"subject": "both", "deny": [berlin]})).unwrap();
    assert!(location(&r, &Location::default(), None).is_none(), "unknown passes a deny list");
    let gate = loc(Some(52.5163), Some(13.3777), None);
    let d = location(&r, &gate, None).unwrap();
    assert_eq!((d["subject"].as_str(), d["reason"].as_str()), (Some("requester"), Some("inside a denied area")));
    assert!(d["distance_m"].as_f64().unwrap() < 5000.0);
    let potsdam = loc(Some(52.3906), Some(13.0645), None);
    assert!(location(&r, &potsdam, Some(&potsdam)).is_none(), "about 27 km away");
    let d = location(&r, &potsdam, Some(&gate)).unwrap();
    assert_eq!(d["subject"], "target", "the target's latest location");

    let r: LocationRestriction = serde_json::from_value(json!({"subject": "target", "allow": [{"country": "DE"}]})).unwrap();
    assert_eq!(location(&r, &loc(None, None, Some("DE")), None).unwrap()["reason"], "location unknown", "target never seen");
}

fn env(json: serde_json::Value) -> EnvelopeRestriction {
    serde_json::from_value(json).unwrap()
}

fn rules_broken(d: Option<serde_json::Value>) -> Vec<String> {
    d.map(|d| d["violations"].as_array().unwrap().iter().map(|v| v["rule"].as_str().unwrap().to_owned()).collect()).unwrap_or_default()
}

#[test]
fn envelope_rules() {
    let (a, b) = (u(1), u(2));
    let mut m = attempt(Action::Send, a, b, 0);
    let r = env(
        json!({"payload_types": ["command"], "max_bytes": 20, "fields": {"command": {"in": ["on", "off"]}, "level": {"min": 0, "max": 100}}}),
    );

    m.payload_type = Some("command");
    m.payload = Some(r#"{"command":"on","level":40}"#);
    assert_eq!(rules_broken(envelope(&r, &m)), vec!["max_bytes"], "27 bytes of JSON text, no payload_bytes");
    m.payload_bytes = Some(20);
    assert!(envelope(&r, &m).is_none(), "payload_bytes wins over the text's length");

    m.payload_type = None;
    assert_eq!(rules_broken(envelope(&r, &m)), vec!["payload_types"], "absent type fails");
    m.payload_type = Some("telemetry");
    assert_eq!(rules_broken(envelope(&r, &m)), vec!["payload_types"]);
    m.payload_type = Some("command");

    m.payload = Some(r#"{"command":"dim","level":"high"}"#);
    assert_eq!(rules_broken(envelope(&r, &m)), vec!["fields.command.in", "fields.level"], "not a number fails min/max");
    m.payload = Some(r#"{"command":"off","level":100.5}"#);
    assert_eq!(rules_broken(envelope(&r, &m)), vec!["fields.level.max"]);
    m.payload = Some(r#"{"command":"off","level":-1}"#);
    assert_eq!(rules_broken(envelope(&r, &m)), vec!["fields.level.min"]);
    m.payload = Some(r#"{"command":"off"}"#);
    assert_eq!(rules_broken(envelope(&r, &m)), vec!["fields.level"], "a missing field fails");

    m.encrypted = true;
    m.payload_bytes = Some(21);
    assert_eq!(
        rules_broken(envelope(&r, &m)),
        vec!["max_bytes", "fields.command", "fields.level"],
        "encrypted: fields unreadable, size still judged"
    );
    m.encrypted = false;
    m.payload = None;
    m.payload_bytes = None;
    assert_eq!(rules_broken(envelope(&r, &m)), vec!["fields.command", "fields.level"], "absent payload; size unknown passes");

    // `in` compares JSON values exactly; numbers by value.
    let r = env(json!({"fields": {"n": {"in": [1, "2", null, {"a": [1]}]}}}));
    for (payload, ok) in [
        (r#"{"n":1}"#, true),
        (r#"{"n":1.0}"#, true),
        (r#"{"n":"1"}"#, false),
        (r#"{"n":2}"#, false),
        (r#"{"n":"2"}"#, true),
        (r#"{"n":null}"#, true),
        (r#"{"n":{"a":[1.0]}}"#, true),
        (r#"{"n":true}"#, false),
    ] {
        m.payload = Some(payload);
        assert_eq!(envelope(&r, &m).is_none(), ok, "{payload}");
    }
}

#[test]
fn path_rules() {
    let mut dir = Directory::default();
    let (a, b) = (u(1), u(2));
    let de_hop = dir.add(r#"{"uuid":"00000000-0000-4000-8000-0000000000d1","kind":"gateway","country":"de"}"#);
    let xx_hop = dir.add(r#"{"uuid":"00000000-0000-4000-8000-0000000000d2","kind":"gateway","country":"XX"}"#);
    let no_country = dir.add(r#"{"uuid":"00000000-0000-4000-8000-0000000000d3","kind":"gateway"}"#);
    let stranger = u(0xdead);
    let r: PathRestriction =
        serde_json::from_value(json!({"deny": [stranger], "require": [de_hop], "deny_countries": ["xx"], "max_hops": 3})).unwrap();
    let judge = |route_: &[uuid::Uuid]| {
        let col = hops(route_);
        let mut m = attempt(Action::Send, a, b, 0);
        m.route = route(&col);
        rules_broken(path(&r, &m, &dir))
    };
    assert_eq!(judge(&[a, de_hop]), Vec::<String>::new());
    assert_eq!(judge(&[]), vec!["require"], "require fails on an empty route");
    assert_eq!(judge(&[de_hop]), vec!["require"], "the origin is not a hop");
    assert_eq!(judge(&[stranger, de_hop]), Vec::<String>::new(), "deny applies after the origin");
    assert_eq!(judge(&[a, de_hop, stranger]), vec!["deny", "deny_countries"], "an unregistered hop fails deny_countries");
    assert_eq!(judge(&[a, xx_hop, de_hop]), vec!["deny_countries"]);
    assert_eq!(judge(&[a, no_country, de_hop]), Vec::<String>::new(), "a hop with no country is in no denied country");
    assert_eq!(judge(&[a, de_hop, de_hop, de_hop]), vec!["max_hops"], "max_hops bounds the whole route");
}

#[test]
fn presence_rules() {
    let mut dir = Directory::default();
    let (a, b) = (u(1), u(2));
    let m = attempt(Action::Send, a, b, 0);
    let both: PresenceRestriction = serde_json::from_value(json!({"target_online": true, "requester_online": true})).unwrap();
    let d = presence(&both, &m, &dir).unwrap();
    assert_eq!(d["violations"].as_array().unwrap().len(), 2, "no presence record: offline");
    dir.online.insert(b, true);
    dir.online.insert(a, false);
    assert_eq!(presence(&both, &m, &dir).unwrap()["violations"][0]["subject"], "requester");
    dir.online.insert(a, true);
    assert!(presence(&both, &m, &dir).is_none());
    let nothing_asked: PresenceRestriction = serde_json::from_value(json!({"target_online": false})).unwrap();
    dir.online.clear();
    assert!(presence(&nothing_asked, &m, &dir).is_none());
}
