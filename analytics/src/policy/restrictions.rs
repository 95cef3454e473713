//! The restrictions of a security profile, each a pure function of the attempt and the tables as
//! of its `ts`. A check returns `None` when the restriction holds and the `detail` of the finding
//! (the values that decided it) when it is broken; nothing is allocated when it holds.
//!
//! The readings are the contract's "Precise readings" section, restated where each is applied.

use chrono::{DateTime, Datelike, Timelike, Weekday};
use chrono_tz::Tz;
use meshguard_schemas::registry::{
    Area, EnvelopeRestriction, FieldRule, LocationRestriction, LocationSubject, PathRestriction, PresenceRestriction, TimingWindow,
};
use meshguard_schemas::time::format_ms;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use super::eval::{Attempt, Lookups};
use super::geo::{self, Location};

/// `timing`: the attempt must fall inside one window. Absolute windows are `[from, until)`;
/// recurring ones `[start, end)` in local wall-clock time of their zone, so they follow daylight
/// saving (a 08:00 start is 08:00 local in summer and in winter); a window with `end` at or
/// before `start` crosses midnight and belongs to the day it starts on.
pub fn timing(windows: &[TimingWindow], ts: i64) -> Option<Value> {
    if windows.iter().any(|w| in_window(w, ts)) {
        return None;
    }
    Some(json!({ "windows": windows, "at": format_ms(ts) }))
}

/// Whether `ts` falls inside `w`.
pub fn in_window(w: &TimingWindow, ts: i64) -> bool {
    match w {
        TimingWindow::Absolute { from, until } => *from <= ts && ts < *until,
        TimingWindow::Recurring { days, start, end, tz } => in_recurring(|d| days.contains(d), start.minutes(), end.minutes(), tz.0, ts),
    }
}

/// Whether `ts` falls inside the recurring window `[start, end)` (minutes of the local day in
/// `tz`) starting on the days `on` admits. The one reading of a recurring window: the compiled
/// directory's fast check calls it too.
#[inline]
pub fn in_recurring(on: impl Fn(Weekday) -> bool, start_minutes: u32, end_minutes: u32, tz: Tz, ts: i64) -> bool {
    let Some(utc) = DateTime::from_timestamp_millis(ts) else {
        return false;
    };
    let local = utc.with_timezone(&tz).naive_local();
    let ms_of_day = i64::from(local.num_seconds_from_midnight()) * 1000 + i64::from(local.and_utc().timestamp_subsec_millis());
    let (start_ms, end_ms) = (i64::from(start_minutes) * 60_000, i64::from(end_minutes) * 60_000);
    let day = local.weekday();
    if start_ms < end_ms {
        on(day) && start_ms <= ms_of_day && ms_of_day < end_ms
    } else {
        // Crosses midnight: the evening part on a listed day, the morning part on the day after
        // one. `start == end` is the empty window `[s, s)`: nothing to cross.
        start_ms != end_ms && ((on(day) && ms_of_day >= start_ms) || (on(day.pred()) && ms_of_day < end_ms))
    }
}

/// `location`: the subject's location must be in an `allow` area (when there are any) and in no
/// `deny` area. An unknown location (or the part of it an area needs) fails an allow list and
/// passes a deny list. The requester's location is the attempt's; the target's is its latest
/// known one.
pub fn location(r: &LocationRestriction, requester: &Location, target: Option<&Location>) -> Option<Value> {
    let subjects: &[(&str, Option<&Location>)] = match r.subject {
        LocationSubject::Requester => &[("requester", Some(requester))],
        LocationSubject::Target => &[("target", target)],
        LocationSubject::Both => &[("requester", Some(requester)), ("target", target)],
    };
    for &(subject, loc) in subjects {
        let unknown = Location::default();
        let loc = loc.unwrap_or(&unknown);
        let verdict = if !r.allow.is_empty() && !r.allow.iter().any(|a| geo::contains(a, loc) == Some(true)) {
            // Unknown when no allowed area could be judged (a country area and a location with
            // coordinates only, say); outside when at least one could.
            let judged = r.allow.iter().any(|a| geo::contains(a, loc).is_some());
            Some((if judged { "outside every allowed area" } else { "location unknown" }, None))
        } else {
            r.deny.iter().find(|a| geo::contains(a, loc) == Some(true)).map(|a| ("inside a denied area", Some(a)))
        };
        if let Some((reason, area)) = verdict {
            let mut detail = json!({ "subject": subject, "location": loc.to_json(), "reason": reason, "allow": r.allow, "deny": r.deny });
            if let Some(area) = area {
                detail["area"] = json!(area);
                if let (Area::Circle { lat, lon, .. }, Some(la), Some(lo)) = (area, loc.lat, loc.lon) {
                    detail["distance_m"] = json!((geo::distance_m(*lat, *lon, la, lo) * 10.0).round() / 10.0);
                }
            }
            return Some(detail);
        }
    }
    None
}

/// `envelope`: `payload_types` fails when `payload_type` is absent or not listed; `max_bytes`
/// compares `payload_bytes` (without it, the length of the payload's JSON text as received; with
/// neither it passes) and applies to encrypted payloads too; a `fields` rule fails when the payload
/// is encrypted, absent or lacks the field, `min`/`max` fail on a non-number, and `in` compares
/// JSON values exactly (numbers by value, so `1` and `1.0` are the same value).
pub fn envelope(r: &EnvelopeRestriction, a: &Attempt<'_>) -> Option<Value> {
    let mut violations: Vec<Value> = Vec::new();
    if let Some(types) = &r.payload_types {
        match a.payload_type {
            Some(t) if types.iter().any(|allowed| allowed == t) => {}
            found => violations.push(json!({ "rule": "payload_types", "allowed": types, "found": found })),
        }
    }
    if let Some(max) = r.max_bytes {
        let size = a.payload_bytes.map(|b| u64::try_from(b).unwrap_or(0)).or(a.payload.map(|p| p.len() as u64));
        if let Some(size) = size.filter(|s| *s > max) {
            violations.push(json!({ "rule": "max_bytes", "max": max, "found": size }));
        }
    }
    if !r.fields.is_empty() {
        field_rules(r, a, &mut violations);
    }
    (!violations.is_empty()).then(|| json!({ "violations": violations }))
}

fn field_rules(r: &EnvelopeRestriction, a: &Attempt<'_>, violations: &mut Vec<Value>) {
    let unreadable = if a.encrypted {
        Some("payload encrypted")
    } else if a.payload.is_none() {
        Some("payload absent")
    } else {
        None
    };
    if let Some(why) = unreadable {
        for field in r.fields.keys() {
            violations.push(json!({ "rule": format!("fields.{field}"), "reason": why }));
        }
        return;
    }
    let payload: Option<std::collections::HashMap<std::borrow::Cow<'_, str>, &RawValue>> =
        a.payload.and_then(|text| serde_json::from_str(text).ok());
    for (field, rule) in &r.fields {
        let raw = payload.as_ref().and_then(|p| p.get(field.as_str()));
        let Some(raw) = raw else {
            violations.push(json!({ "rule": format!("fields.{field}"), "reason": "field absent" }));
            continue;
        };
        let value: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
        if let Some(v) = field_violation(field, rule, &value) {
            violations.push(v);
        }
    }
}

fn field_violation(field: &str, rule: &FieldRule, value: &Value) -> Option<Value> {
    if let Some(allowed) = &rule.one_of
        && !allowed.iter().any(|x| json_eq(x, value))
    {
        return Some(json!({ "rule": format!("fields.{field}.in"), "allowed": allowed, "found": value }));
    }
    if rule.min.is_some() || rule.max.is_some() {
        let Some(n) = value.as_f64() else {
            return Some(json!({ "rule": format!("fields.{field}"), "reason": "not a number", "found": value }));
        };
        if let Some(min) = rule.min.filter(|min| n < *min) {
            return Some(json!({ "rule": format!("fields.{field}.min"), "min": min, "found": value }));
        }
        if let Some(max) = rule.max.filter(|max| n > *max) {
            return Some(json!({ "rule": format!("fields.{field}.max"), "max": max, "found": value }));
        }
    }
    None
}

/// JSON equality with numbers compared by value (serde_json tells `1` from `1.0`; JSON does not).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(x), Some(y), _, _) => x == y,
            (_, _, Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w))),
        _ => a == b,
    }
}

/// `path`: in `route` the first entry is the origin. `max_hops` bounds the length of `route`;
/// `deny`, `require` and `deny_countries` apply to the entries after the origin; a hop that is not
/// registered fails `deny_countries`; `require` fails on an empty route.
pub fn path(r: &PathRestriction, a: &Attempt<'_>, look: &impl Lookups) -> Option<Value> {
    let mut violations: Vec<Value> = Vec::new();
    let hops = a.route.len();
    if let Some(max) = r.max_hops
        && hops > max as usize
    {
        violations.push(json!({ "rule": "max_hops", "max": max, "found": hops }));
    }
    let after_origin = || a.route.iter().skip(1);
    if !r.deny.is_empty()
        && let Some(hop) = after_origin().find(|h| r.deny.contains(h))
    {
        violations.push(json!({ "rule": "deny", "hop": hop }));
    }
    for required in &r.require {
        if !after_origin().any(|h| h == *required) {
            violations.push(json!({ "rule": "require", "missing": required }));
        }
    }
    if !r.deny_countries.is_empty() {
        for hop in after_origin() {
            match look.record(&hop, a.ts) {
                None => violations.push(json!({ "rule": "deny_countries", "hop": hop, "reason": "hop not registered" })),
                Some(rec) => {
                    if let Some(c) = rec.country.filter(|c| r.deny_countries.contains(c)) {
                        violations.push(json!({ "rule": "deny_countries", "hop": hop, "country": c }));
                    }
                }
            }
        }
    }
    (!violations.is_empty()).then(|| json!({ "violations": violations, "route": a.route.iter().collect::<Vec<Uuid>>() }))
}

/// `presence`: `target_online: true` needs the target online as of the attempt, `requester_online:
/// true` the requester; `false` or absent asks nothing. A UUID with no presence record is offline.
pub fn presence(r: &PresenceRestriction, a: &Attempt<'_>, look: &impl Lookups) -> Option<Value> {
    let mut violations: Vec<Value> = Vec::new();
    if r.target_online == Some(true) && !look.online(&a.to, a.ts) {
        violations.push(json!({ "subject": "target", "required": "online", "online": false }));
    }
    if r.requester_online == Some(true) && !look.online(&a.from, a.ts) {
        violations.push(json!({ "subject": "requester", "required": "online", "online": false }));
    }
    (!violations.is_empty()).then(|| json!({ "violations": violations }))
}

#[cfg(test)]
mod tests;
