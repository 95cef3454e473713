//! The simulator's promises, checked from the outside: records parse and decode per the contract,
//! labels follow the registry as published, and benign traffic breaks no other rule.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet, VecDeque};

use meshguard_schemas::registry::{AccessList, Principal, RegistryRecord};
use meshguard_schemas::time::parse_time_str;
use meshguard_schemas::{BatchDecoder, InputTopic};
use serde_json::Value;
use uuid::Uuid;

use super::*;

fn config(seed: u64, devices: usize, violation_ratio: f64, malformed_ratio: f64) -> SimConfig {
    SimConfig { seed, devices, violation_ratio, malformed_ratio, ..SimConfig::default() }
}

fn run(cfg: SimConfig, n: usize) -> (Vec<SimRecord>, Simulator) {
    let mut sim = Simulator::new(cfg);
    let mut records = sim.bootstrap();
    sim.next_batch(n, &mut records);
    (records, sim)
}

fn json(r: &SimRecord) -> Value {
    serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap()
}

fn lower(v: &Value) -> String {
    v.as_str().unwrap().to_ascii_lowercase()
}

const MESSAGE_FIELDS: [&str; 15] = [
    "id",
    "ts",
    "action",
    "from",
    "to",
    "auth",
    "target_token",
    "route",
    "location",
    "payload_type",
    "payload",
    "payload_bytes",
    "encrypted",
    "protocol",
    "broker",
];
const ACTIONS_TEXT: [&str; 6] = ["connect", "discover", "send", "receive", "subscribe", "configure"];
const AUTHS_TEXT: [&str; 3] = ["valid", "invalid", "missing"];

fn is_uuid(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 36 && Uuid::try_parse(s).is_ok())
}

/// A contract time equal to `ts`; RFC 3339 strings in the exact output form.
fn time_is(v: &Value, ts: i64) -> bool {
    match v {
        Value::Number(n) => n.as_i64() == Some(ts),
        Value::String(s) => s.len() == 24 && s.ends_with('Z') && parse_time_str(s) == Some(ts),
        _ => false,
    }
}

/// Whether field `name` of a message attempt holds the contract's JSON type.
fn type_ok(name: &str, v: &Value) -> bool {
    match name {
        "id" | "from" | "to" => is_uuid(v),
        "ts" => v.is_i64() || v.as_str().is_some_and(|s| parse_time_str(s).is_some()),
        "action" => v.as_str().is_some_and(|s| ACTIONS_TEXT.contains(&s)),
        "auth" => v.as_str().is_some_and(|s| AUTHS_TEXT.contains(&s)),
        "target_token" | "encrypted" => v.is_boolean(),
        "route" => v.as_array().is_some_and(|a| a.iter().all(is_uuid)),
        "location" => v.as_object().is_some_and(|o| {
            o.iter().all(|(k, x)| match k.as_str() {
                "lat" | "lon" => x.is_f64(),
                "country" => x.as_str().is_some_and(|c| c.len() == 2),
                _ => false,
            })
        }),
        "payload" => v.is_object(),
        "payload_bytes" => v.is_u64(),
        "payload_type" | "protocol" | "broker" => v.is_string(),
        _ => false,
    }
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let (a, _) = run(config(7, 300, 0.05, 0.01), 30_000);
    let (b, _) = run(config(7, 300, 0.05, 0.01), 30_000);
    assert_eq!(a, b);
    // Batch boundaries change nothing.
    let mut sim = Simulator::new(config(7, 300, 0.05, 0.01));
    let mut c = sim.bootstrap();
    for n in [1, 999, 9_000, 20_000] {
        sim.next_batch(n, &mut c);
    }
    assert_eq!(a, c);
    let (d, _) = run(config(8, 300, 0.05, 0.01), 30_000);
    assert_ne!(a, d);
}

#[test]
fn every_record_follows_the_contract() {
    let cfg = config(3, 500, 0.05, 0.02);
    let start = cfg.start_ms;
    let (records, sim) = run(cfg, 60_000);
    let mut last_ts = i64::MIN;
    let mut ids = HashSet::new();
    let (mut messages, mut malformed_at, mut presence) = (Vec::new(), Vec::new(), Vec::new());
    let mut kinds = Vec::new();
    let mut actions = HashSet::new();
    let mut optional = HashSet::new();
    for (i, r) in records.iter().enumerate() {
        assert!(r.timestamp_ms >= last_ts, "record {i} goes back in time");
        last_ts = r.timestamp_ms;
        if i >= sim.pop.entities.len() * 2 {
            assert!(r.timestamp_ms >= start);
        } else {
            assert!(r.timestamp_ms < start, "bootstrap before the traffic");
        }
        match r.topic {
            InputTopic::Messages => {
                let label = r.label.unwrap();
                if label == Label::Malformed {
                    malformed_at.push(messages.len());
                    kinds.push(r.malformed);
                    messages.push(r.payload.clone().unwrap());
                    continue;
                }
                messages.push(r.payload.clone().unwrap());
                let v = json(r);
                let obj = v.as_object().unwrap();
                for (name, value) in obj {
                    assert!(MESSAGE_FIELDS.contains(&name.as_str()), "unknown field {name}: {v}");
                    assert!(type_ok(name, value), "field {name}: {v}");
                    optional.insert(name.clone());
                }
                for required in ["id", "ts", "action", "from", "auth"] {
                    assert!(obj.contains_key(required), "missing {required}: {v}");
                }
                assert!(time_is(&v["ts"], r.timestamp_ms), "{v}");
                assert!(ids.insert(lower(&v["id"])), "id repeats: {v}");
                let action = v["action"].as_str().unwrap();
                actions.insert(action.to_owned());
                assert_eq!(obj.contains_key("to"), action != "connect", "{v}");
                assert_eq!(r.key, v["from"].as_str().unwrap().as_bytes(), "keyed by `from` as written");
                if let Some(route) = v.get("route") {
                    assert_eq!(lower(&route[0]), lower(&v["from"]), "route starts at the origin");
                }
                if let (Some(p), Some(n)) = (v.get("payload"), v.get("payload_bytes")) {
                    assert_eq!(serde_json::to_vec(p).unwrap().len() as u64, n.as_u64().unwrap());
                }
            }
            InputTopic::Presence => {
                let v = json(r);
                let obj = v.as_object().unwrap();
                assert_eq!(obj.len(), 3, "{v}");
                assert!(time_is(&v["ts"], r.timestamp_ms) && is_uuid(&v["uuid"]) && v["online"].is_boolean(), "{v}");
                assert_eq!(r.key, v["uuid"].as_str().unwrap().as_bytes());
                presence.push(r.payload.clone().unwrap());
            }
            InputTopic::Registry => {
                let Some(payload) = &r.payload else {
                    assert!(Uuid::try_parse_ascii(&r.key).is_ok(), "a tombstone is keyed by uuid");
                    continue;
                };
                let rec = RegistryRecord::from_json(i, payload).unwrap();
                let v = json(r);
                assert_eq!(r.key, v["uuid"].as_str().unwrap().as_bytes());
                assert_eq!(r.key, rec.uuid.to_string().as_bytes(), "registry keys are lower case");
                for name in v.as_object().unwrap().keys() {
                    let known = ["uuid", "kind", "type", "manufacturer", "owner", "groups", "country", "exempt", "permissions", "profiles"];
                    assert!(known.contains(&name.as_str()), "unknown registry field {name}");
                }
                for level in v["permissions"].as_object().unwrap().keys() {
                    assert!(["discover", "send", "receive", "subscribe", "configure"].contains(&level.as_str()));
                }
            }
            InputTopic::Interactions | InputTopic::IdentityRequests => panic!("not generated"),
        }
    }
    assert_eq!(actions.len(), 6, "all six actions: {actions:?}");
    assert_eq!(optional.len(), MESSAGE_FIELDS.len(), "every optional field appears: {optional:?}");

    // The contract's own decoder agrees: exactly the malformed records are rejected.
    let payloads: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let decoded = BatchDecoder::new(InputTopic::Messages).decode(&payloads);
    let rejected: HashSet<usize> = decoded.rejected.iter().map(|e| e.index).collect();
    for (i, kind) in malformed_at.iter().zip(&kinds) {
        let text = String::from_utf8_lossy(&messages[*i]);
        assert!(rejected.contains(i), "the decoder accepts a malformed record ({kind:?}): {text}");
    }
    for e in &decoded.rejected {
        assert!(malformed_at.contains(&e.index), "the decoder rejects a good record: {e:?}");
    }
    let payloads: Vec<&[u8]> = presence.iter().map(Vec::as_slice).collect();
    assert!(BatchDecoder::new(InputTopic::Presence).decode(&payloads).rejected.is_empty());
}

#[test]
fn the_bootstrap_registers_everyone_once() {
    let mut sim = Simulator::new(config(1, 1_000, 0.02, 0.0));
    let boot = sim.bootstrap();
    let registry: Vec<RegistryRecord> = boot
        .iter()
        .filter(|r| r.topic == InputTopic::Registry)
        .map(|r| RegistryRecord::from_json(0, r.payload.as_ref().unwrap()).unwrap())
        .collect();
    assert_eq!(registry.len(), 1_000);
    let uuids: HashSet<_> = registry.iter().map(|r| r.uuid).collect();
    assert_eq!(uuids.len(), 1_000);
    let kinds: HashSet<_> = registry.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    assert!(registry.iter().any(|r| r.exempt) && registry.iter().any(|r| !r.profiles.is_empty()));
    for r in &registry {
        if let Some(owner) = r.owner {
            assert!(uuids.contains(&owner), "owners are registered");
        }
    }
    let presence = boot.iter().filter(|r| r.topic == InputTopic::Presence).count();
    assert_eq!(presence, 1_000);
    assert_eq!(sim.stats().records, 2_000);
}

/// Registry records in the order they take effect: a record applies to every attempt whose `ts`
/// is at or after its timestamp, even one that comes before it in the stream.
struct RegistryReplay<'a> {
    changes: Vec<&'a SimRecord>,
    next: usize,
}

impl<'a> RegistryReplay<'a> {
    fn new(records: &'a [SimRecord]) -> Self {
        Self { changes: records.iter().filter(|r| r.topic == InputTopic::Registry).collect(), next: 0 }
    }

    /// The registry records that take effect at or before `ts` and were not applied yet.
    fn until(&mut self, ts: i64) -> &[&'a SimRecord] {
        let from = self.next;
        while self.changes.get(self.next).is_some_and(|r| r.timestamp_ms <= ts) {
            self.next += 1;
        }
        &self.changes[from..self.next]
    }
}

/// Replays the registry as published and recomputes every label with the contract's precedence.
#[test]
fn labels_follow_the_registry_over_time() {
    // 20 records per millisecond: registry changes share milliseconds with attempts.
    check_labels(SimConfig { rate: 20_000, ..config(5, 1_000, 0.05, 0.0) }, 400_000, true);
    // A small population at a high rate: a tombstoned UUID has often just made an attempt in the
    // same millisecond (and is at its throttle, so it makes no violations while tombstoned).
    check_labels(SimConfig { rate: 200_000, ..config(6, 100, 0.1, 0.0) }, 400_000, false);
}

/// Checks every label of `n` records of `cfg`; with `variety`, that each case occurred.
fn check_labels(cfg: SimConfig, n: usize, variety: bool) {
    let (records, sim) = run(cfg, n);
    let mut replay = RegistryReplay::new(&records);
    let mut registered: HashSet<String> = HashSet::new();
    let mut owners: HashMap<String, String> = HashMap::new();
    let mut ever: HashSet<String> = HashSet::new();
    let mut reregistered: HashSet<String> = HashSet::new();
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for r in records.iter().filter(|r| r.topic == InputTopic::Messages) {
        for change in replay.until(r.timestamp_ms) {
            let key = String::from_utf8(change.key.clone()).unwrap();
            if let Some(payload) = &change.payload {
                if !registered.contains(&key) && ever.contains(&key) {
                    reregistered.insert(key.clone());
                    *counts.entry("reregistration").or_default() += 1;
                }
                let record: serde_json::Value = serde_json::from_slice(payload).unwrap();
                match record["owner"].as_str() {
                    Some(owner) => owners.insert(key.clone(), owner.to_lowercase()),
                    None => owners.remove(&key),
                };
                registered.insert(key.clone());
                ever.insert(key);
            } else {
                assert!(registered.remove(&key), "tombstone of a registered uuid");
                *counts.entry("tombstone").or_default() += 1;
            }
        }
        let v = json(r);
        let from = lower(&v["from"]);
        let auth = v["auth"].as_str().unwrap();
        let want = if !registered.contains(&from) {
            if ever.contains(&from) {
                *counts.entry("tombstoned requester").or_default() += 1;
            }
            if auth != "valid" {
                *counts.entry("unregistered with bad auth").or_default() += 1;
            }
            Label::UnregisteredRequester
        } else if auth != "valid" {
            Label::BadCredentials
        } else if matches!(v["action"].as_str(), Some("subscribe" | "configure"))
            && v["target_token"].as_bool() != Some(true)
            && lower(&v["to"]) != from
            && owners.get(&lower(&v["to"])) != Some(&from)
        {
            *counts.entry("token level without the token").or_default() += 1;
            Label::PermissionDenied
        } else if r.label == Some(Label::ThrottleExceeded) {
            // The last of eleven sends by this requester in this millisecond.
            let flood = records
                .iter()
                .filter(|o| o.topic == InputTopic::Messages && o.timestamp_ms == r.timestamp_ms && lower(&json(o)["from"]) == from)
                .count();
            assert!(flood > 10, "a throttle label without its flood: {v}");
            *counts.entry("flood").or_default() += 1;
            Label::ThrottleExceeded
        } else {
            if reregistered.contains(&from) {
                *counts.entry("benign after re-registration").or_default() += 1;
            }
            Label::Benign
        };
        assert_eq!(r.label, Some(want), "{v}");
    }
    let cases = [
        "tombstone",
        "reregistration",
        "tombstoned requester",
        "unregistered with bad auth",
        "benign after re-registration",
        "token level without the token",
        "flood",
    ];
    for what in cases.iter().filter(|_| variety) {
        assert!(counts.get(what).copied().unwrap_or(0) > 0, "no {what}: {counts:?}");
    }
    let labelled = records.iter().filter(|r| r.label.and_then(Label::finding_kind).is_some()).count() as u64;
    assert_eq!(sim.expected_finding_count(), labelled);
    let s = sim.stats();
    assert!(s.unregistered_requester > 0 && s.bad_credentials > 0 && s.permission_denied > 0);
    assert_eq!(s.tombstoned_requester, counts.get("tombstoned requester").copied().unwrap_or(0));
    assert_eq!(s.attempts, s.benign + s.unregistered_requester + s.bad_credentials + s.permission_denied + s.throttle_exceeded);
    assert_eq!(s.records, records.len() as u64);
    let ratio = (s.unregistered_requester + s.bad_credentials + s.permission_denied) as f64 / s.attempts as f64;
    assert!(s.throttle_exceeded > 0, "floods");
    let want = sim.config().violation_ratio;
    assert!((want * 0.9..want * 1.1).contains(&ratio), "violation ratio {ratio}");
}

/// Counts in `(t − window, t]` after adding `t`, the contract's sliding window.
fn count_in(q: &mut VecDeque<i64>, t: i64, window: i64) -> usize {
    q.push_back(t);
    while q.front().is_some_and(|&f| f <= t - window) {
        q.pop_front();
    }
    q.len()
}

/// Nobody goes past a default throttle (but the labelled floods, exactly one past it) or reaches a
/// default enforcement threshold, even with a small population under heavy attack, so the
/// labelled findings are the only ones.
#[test]
fn traffic_stays_under_throttles_and_enforcement() {
    let cfg = SimConfig { rate: 400, ..config(9, 40, 0.3, 0.0) };
    let (records, _) = run(cfg, 400_000); // 1,000 s of event time
    let mut exempt = HashSet::new();
    let mut attempts: HashMap<String, VecDeque<i64>> = HashMap::new();
    let mut connects: HashMap<String, VecDeque<i64>> = HashMap::new();
    let mut short: HashMap<String, VecDeque<i64>> = HashMap::new();
    let mut long: HashMap<String, VecDeque<i64>> = HashMap::new();
    let mut max_short = 0;
    for r in &records {
        match r.topic {
            InputTopic::Registry if r.payload.is_some() && json(r)["exempt"] == Value::Bool(true) => {
                exempt.insert(String::from_utf8(r.key.clone()).unwrap());
            }
            InputTopic::Messages => {
                let v = json(r);
                let from = lower(&v["from"]);
                let t = r.timestamp_ms;
                if !exempt.contains(&from) {
                    let (q, max) = if v["action"] == "connect" { (&mut connects, 2) } else { (&mut attempts, 10) };
                    let n = count_in(q.entry(from.clone()).or_default(), t, 1_000);
                    if r.label == Some(Label::ThrottleExceeded) {
                        assert_eq!(n, max + 1, "{from}: a labelled flood is exactly one past the limit");
                    } else {
                        assert!(n <= max, "{from} throttled: {n} in a second at {t}");
                    }
                }
                if r.label.and_then(Label::finding_kind).is_some() {
                    let n = count_in(short.entry(from.clone()).or_default(), t, 600_000);
                    assert!(n < 5, "{from} would be blocked: {n} in 10 minutes");
                    max_short = max_short.max(n);
                    let n = count_in(long.entry(from.clone()).or_default(), t, 86_400_000);
                    assert!(n <= 20, "{from} would be unregistered: {n} in 24 hours");
                }
            }
            _ => {}
        }
    }
    assert_eq!(max_short, 4, "offenders go right up to the limit");
}

fn matches(p: &Principal, who: &Uuid, dir: &HashMap<Uuid, RegistryRecord>) -> bool {
    match p {
        Principal::Any => true,
        Principal::Group(g) => dir.get(who).is_some_and(|r| r.groups.contains(g)),
        Principal::Uuid(u) => u == who,
    }
}

fn admits(list: Option<&AccessList>, who: &Uuid, open: bool, dir: &HashMap<Uuid, RegistryRecord>) -> bool {
    let Some(list) = list else { return open };
    !list.deny.iter().any(|p| matches(p, who, dir))
        && (if list.allow.is_empty() { open } else { list.allow.iter().any(|p| matches(p, who, dir)) })
}

/// An independent reading of the published registry: every benign attempt is one the contract
/// allows without any security profile (the strict reading, the one the generator promises).
#[test]
fn benign_attempts_are_permitted() {
    let cfg = SimConfig { rate: 10_000, ..config(11, 400, 0.02, 0.0) };
    let (records, _) = run(cfg, 300_000);
    let mut replay = RegistryReplay::new(&records);
    let mut dir: HashMap<Uuid, RegistryRecord> = HashMap::new();
    let mut checked = HashMap::<String, u64>::new();
    for r in records.iter().filter(|r| r.topic == InputTopic::Messages) {
        for change in replay.until(r.timestamp_ms) {
            match &change.payload {
                None => {
                    dir.remove(&Uuid::try_parse_ascii(&change.key).unwrap());
                }
                Some(p) => {
                    let rec = RegistryRecord::from_json(0, p).unwrap();
                    dir.insert(rec.uuid, rec);
                }
            }
        }
        if r.label != Some(Label::Benign) {
            continue;
        }
        let v = json(r);
        let from = Uuid::try_parse(v["from"].as_str().unwrap()).unwrap();
        let action = v["action"].as_str().unwrap();
        *checked.entry(action.to_owned()).or_default() += 1;
        assert!(dir.contains_key(&from));
        if action == "connect" {
            continue;
        }
        let to = Uuid::try_parse(v["to"].as_str().unwrap()).unwrap();
        let target = dir.get(&to).unwrap_or_else(|| panic!("target not registered: {v}"));
        for p in &target.profiles {
            assert!(!p.applies_to.iter().any(|a| matches(a, &from, &dir)), "profile {} applies: {v}", p.name);
        }
        let perms = &target.permissions;
        let list = match action {
            "discover" => perms.discover.as_ref(),
            "send" => perms.send.as_ref(),
            "receive" => perms.receive.as_ref(),
            "subscribe" => perms.subscribe.as_ref(),
            _ => perms.configure.as_ref(),
        };
        let owner = target.owner == Some(from);
        let token = v.get("target_token") == Some(&Value::Bool(true));
        let ok = match action {
            "subscribe" | "configure" => {
                owner
                    || (token
                        && list.is_some_and(|l| {
                            !l.deny.iter().any(|p| matches(p, &from, &dir)) && l.allow.iter().any(|p| matches(p, &from, &dir))
                        }))
            }
            _ => owner || admits(list, &from, true, &dir),
        };
        assert!(ok, "not permitted: {v}");
        if action == "send" {
            let sender = &dir[&from];
            assert!(admits(sender.permissions.receive.as_ref(), &to, true, &dir), "sender's receive list: {v}");
            for p in &sender.profiles {
                assert!(!p.applies_to.iter().any(|a| matches(a, &to, &dir)), "sender profile: {v}");
            }
        }
    }
    assert_eq!(checked.len(), 6, "{checked:?}");
    assert!(replay.changes.iter().filter(|c| c.payload.is_some()).count() > 400 + 100, "updates were exercised");
}

#[test]
fn both_time_forms_and_both_cases_appear() {
    let (records, sim) = run(config(2, 1_000, 0.02, 0.0), 50_000);
    let (mut epoch, mut text, mut upper_from, mut upper_key) = (0, 0, 0, 0);
    for r in records.iter().filter(|r| r.topic == InputTopic::Messages) {
        let v = json(r);
        match &v["ts"] {
            Value::Number(_) => epoch += 1,
            _ => text += 1,
        }
        let from = v["from"].as_str().unwrap();
        if from.chars().any(|c| c.is_ascii_uppercase()) {
            upper_from += 1;
            if r.key == from.as_bytes() {
                upper_key += 1;
            }
        }
    }
    assert_eq!(epoch, sim.stats().epoch_ms_times);
    let share = epoch as f64 / (epoch + text) as f64;
    assert!((0.17..0.23).contains(&share), "epoch share {share}");
    let share = upper_from as f64 / (epoch + text) as f64;
    assert!((0.03..0.07).contains(&share), "upper-case share {share}");
    assert_eq!(upper_from, upper_key);
}

/// Whether a message attempt's field has the contract's JSON type (not checking its content).
fn json_type_ok(name: &str, v: &Value) -> bool {
    match name {
        "id" | "from" | "to" | "action" | "auth" | "payload_type" | "protocol" | "broker" => v.is_string(),
        "ts" => v.is_i64() || v.is_string(),
        "target_token" | "encrypted" => v.is_boolean(),
        "route" => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        "location" => v.as_object().is_some_and(|o| {
            o.get("lat").is_none_or(Value::is_number)
                && o.get("lon").is_none_or(Value::is_number)
                && o.get("country").is_none_or(Value::is_string)
        }),
        "payload" => v.is_object(),
        "payload_bytes" => v.is_u64(),
        _ => true,
    }
}

#[test]
fn malformed_records_are_malformed_as_stated() {
    let (records, sim) = run(config(4, 300, 0.02, 0.05), 40_000);
    let mut seen = HashMap::new();
    for r in records.iter().filter(|r| r.label == Some(Label::Malformed)) {
        let kind = r.malformed.unwrap();
        *seen.entry(kind).or_insert(0u64) += 1;
        let bytes = r.payload.as_ref().unwrap();
        let text = String::from_utf8_lossy(bytes);
        if kind == MalformedKind::InvalidJson {
            assert!(serde_json::from_slice::<Value>(bytes).is_err(), "{text}");
            continue;
        }
        let v: Value = serde_json::from_slice(bytes).unwrap();
        let obj = v.as_object().unwrap();
        let ok = match kind {
            MalformedKind::MissingField => {
                ["id", "ts", "action", "from", "auth"].iter().any(|f| !obj.contains_key(*f))
                    || (obj.get("action").is_some_and(|a| a != "connect") && !obj.contains_key("to"))
            }
            MalformedKind::WrongType => obj.iter().any(|(name, value)| !json_type_ok(name, value)),
            MalformedKind::BadUuid => {
                let bad = |x: &Value| x.as_str().is_some_and(|s| Uuid::try_parse(s).is_err());
                ["id", "from", "to"].iter().any(|f| obj.get(*f).is_some_and(bad))
                    || obj.get("route").and_then(Value::as_array).is_some_and(|a| a.iter().any(bad))
            }
            MalformedKind::BadTime => obj["ts"].as_str().is_some_and(|s| parse_time_str(s).is_none()),
            MalformedKind::UnknownEnum => {
                obj.get("action").and_then(Value::as_str).is_some_and(|a| !ACTIONS_TEXT.contains(&a))
                    || obj.get("auth").and_then(Value::as_str).is_some_and(|a| !AUTHS_TEXT.contains(&a))
            }
            MalformedKind::InvalidJson => unreachable!(),
        };
        assert!(ok, "{kind:?}: {text}");
        // Everything else about it is well-formed: the stated defect is the only one.
        let defects = obj.iter().filter(|(name, value)| !type_ok(name, value)).count();
        assert!(defects <= 1, "{kind:?}: {text}");
    }
    for kind in MalformedKind::ALL {
        assert!(seen.get(&kind).copied().unwrap_or(0) > 0, "no {kind:?}");
        assert_eq!(sim.stats().malformed_by_kind[kind as usize], seen[&kind]);
    }
}

#[test]
fn tiny_and_degenerate_configurations_work() {
    for (devices, rate, violation, malformed) in [(0, 0, 1.0, 0.0), (8, 1, 0.5, 0.5), (9, 1_000_000, f64::NAN, 2.0)] {
        let cfg = SimConfig { rate, ..config(1, devices, violation, malformed) };
        let (records, sim) = run(cfg, 20_000);
        assert_eq!(records.len() as u64, sim.stats().records);
        assert!(sim.pop.entities.len() >= population::MIN_POPULATION);
    }
}
