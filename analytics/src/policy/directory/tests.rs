//! The directory's own layout: slots found after growth, blocks read back as written, blocks
//! reused when a record changes, the arena's growth, the limits that hand a record to the
//! reference path, and the registry keeping the newest version in the directory. What it decides
//! is held to the reference by the property tests of `jobs::policy`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use meshguard_schemas::registry::RegistryRecord;
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;
use crate::policy::compile::GroupInterner;

/// 2026-11-24T17:00Z, a Tuesday.
const T: i64 = 1_795_539_600_000;

fn u(i: u128) -> Uuid {
    Uuid::from_u128(0x1000_0000_0000_4000_8000_0000_0000_0000 | i)
}

fn compiled(interner: &mut GroupInterner, json: Value) -> CompiledRecord {
    let rec = RegistryRecord::from_json(0, json.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}: {json}"));
    CompiledRecord::compile(Arc::new(rec), interner)
}

/// A record of `uuid` in `groups`, with `extra` fields.
fn record(interner: &mut GroupInterner, uuid: Uuid, groups: &[&str], extra: Value) -> CompiledRecord {
    let mut r = json!({"uuid": uuid, "kind": "device", "groups": groups});
    r.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    compiled(interner, r)
}

/// A record whose `send` list admits only `who` (a block of one line).
fn listed(interner: &mut GroupInterner, uuid: Uuid, who: Uuid) -> CompiledRecord {
    record(interner, uuid, &[], json!({"permissions": {"send": {"allow": [who]}}}))
}

/// An attempt's fields: in Berlin office hours, from Germany, a small `command`, no route.
struct Fields {
    ts: i64,
    route: usize,
}

impl AttemptFields for Fields {
    fn ts(&self) -> i64 {
        self.ts
    }
    fn location(&self) -> Location {
        Location { lat: None, lon: None, country: Country::parse("DE") }
    }
    fn payload_type(&self) -> Option<&str> {
        Some("command")
    }
    fn payload_size(&self) -> Option<u64> {
        Some(10)
    }
    fn route_len(&self) -> usize {
        self.route
    }
}

/// The directory's verdict on a `send` from `from` to `to` at `ts`: `Some(true)` passed by the
/// slots, `Some(false)` by the blocks, `None` left to the reference.
fn verdict(dir: &Directory, level: Level, from: Uuid, to: Uuid, ts: i64) -> Option<bool> {
    let view = dir.view();
    let (f, t) = (key_of(&from), key_of(&to));
    let (req, tgt) = (view.find(f)?, view.find(t)?);
    if !req.registered_at(ts) || !tgt.registered_at(ts) {
        return None;
    }
    match view.needs(level, f, t, false, req, tgt) {
        Needs::Nothing => Some(true),
        Needs::Reference => None,
        needs => view.passes(f, t, req, tgt, needs, &Fields { ts, route: 0 }).then_some(false),
    }
}

#[test]
fn slots_are_found_after_the_table_grows() {
    let mut interner = GroupInterner::default();
    let mut dir = Directory::default();
    assert_eq!(dir.slots.capacity(), 1024);
    // Up to half full, no growth; one more and the table doubles.
    for i in 0..512 {
        dir.set(&u(i), T, Some(&record(&mut interner, u(i), &[], json!({}))));
    }
    assert_eq!((dir.len(), dir.slots.capacity()), (512, 1024));
    dir.set(&u(512), T, Some(&record(&mut interner, u(512), &[], json!({}))));
    assert_eq!((dir.len(), dir.slots.capacity()), (513, 2048));
    // Many more, every other one with a block.
    for i in 513..20_000 {
        let rec = if i % 2 == 0 { listed(&mut interner, u(i), u(i + 1)) } else { record(&mut interner, u(i), &[], json!({})) };
        dir.set(&u(i), T + i as i64, Some(&rec));
    }
    assert_eq!(dir.len(), 20_000);
    assert!(dir.slots.capacity() >= 40_000);
    let view = dir.view();
    for i in 0..20_000 {
        let slot = view.find(key_of(&u(i))).unwrap_or_else(|| panic!("{i} lost"));
        assert!(slot.is(key_of(&u(i))));
        let from = if i < 513 { T } else { T + i as i64 };
        assert!(slot.registered_at(from) && !slot.registered_at(from - 1), "{i}");
    }
    for i in 20_000..21_000 {
        assert!(view.find(key_of(&u(i))).is_none());
    }
    // Each listed record admits exactly the next UUID, read from its own block.
    for i in (514..20_000).step_by(2) {
        assert_eq!(verdict(&dir, Level::Send, u(i + 1), u(i), T + 30_000), Some(false), "{i}");
        assert_eq!(verdict(&dir, Level::Send, u(i + 3), u(i), T + 30_000), None, "{i}");
    }
}

#[test]
fn blocks_read_back_as_written_across_classes_and_arena_growth() {
    let mut interner = GroupInterner::default();
    let mut dir = Directory::default();
    // Lists of 1 to 40 UUIDs: blocks of 1 to 16 lines, far more lines than the first arena holds.
    let mut expected = Vec::new();
    for i in 0..3_000u128 {
        let n = 1 + (i % 40);
        let allow: Vec<Uuid> = (0..n).map(|k| u(100_000 + i * 100 + k)).collect();
        let rec = record(&mut interner, u(i), &[], json!({"permissions": {"send": {"allow": allow}}}));
        let words = dir.compile(&rec).words.unwrap();
        dir.set(&u(i), T, Some(&rec));
        expected.push(words);
    }
    assert!(dir.arena.capacity() > 1024);
    let view = dir.view();
    for (i, words) in expected.iter().enumerate() {
        let slot = view.find(key_of(&u(i as u128))).unwrap();
        let b = view.block_words(slot.block() as u32);
        assert!(b.len() >= words.len() && (b.len() / LINE_WORDS).is_power_of_two());
        assert_eq!(b[0] >> 8, words[0] >> 8, "header of {i}");
        assert_eq!(&b[1..words.len()], &words[1..], "block of {i}");
        assert!(b[words.len()..].iter().all(|w| *w == 0));
    }
    // With the requesters registered, the verdicts come from the blocks: the last UUID of each list
    // passes, a UUID of no list does not.
    for i in 0..3_000u128 {
        let last = u(100_000 + i * 100 + i % 40);
        dir.set(&last, T, Some(&record(&mut interner, last, &[], json!({}))));
        let other = u(1 << 40 | i);
        dir.set(&other, T, Some(&record(&mut interner, other, &[], json!({}))));
    }
    for i in 0..3_000u128 {
        assert_eq!(verdict(&dir, Level::Send, u(100_000 + i * 100 + i % 40), u(i), T), Some(false), "{i}");
        assert_eq!(verdict(&dir, Level::Send, u(1 << 40 | i), u(i), T), None, "{i}");
    }
}

#[test]
fn a_change_rewrites_the_slot_and_reuses_the_block() {
    let mut interner = GroupInterner::default();
    let mut dir = Directory::default();
    let (a, b, c) = (u(1), u(2), u(3));
    for x in [a, b, c] {
        dir.set(&x, T - 86_400_000, Some(&record(&mut interner, x, &[], json!({}))));
    }
    assert_eq!(verdict(&dir, Level::Send, a, c, T), Some(true));
    dir.set(&c, T + 1, Some(&listed(&mut interner, c, a)));
    let used = dir.arena_len;
    assert_eq!(verdict(&dir, Level::Send, a, c, T + 1), Some(false));
    assert_eq!(verdict(&dir, Level::Send, b, c, T + 1), None);
    assert_eq!(verdict(&dir, Level::Send, a, c, T), None, "before the change: an older version decides");
    // A changed list: the same block lines again.
    dir.set(&c, T + 2, Some(&listed(&mut interner, c, b)));
    assert_eq!(dir.arena_len, used);
    assert_eq!((verdict(&dir, Level::Send, a, c, T + 2), verdict(&dir, Level::Send, b, c, T + 2)), (None, Some(false)));
    // Open again: the block is freed, and taken by the next record that needs one.
    dir.set(&c, T + 3, Some(&record(&mut interner, c, &[], json!({}))));
    assert_eq!(dir.free.iter().map(Vec::len).sum::<usize>(), 1);
    assert_eq!(verdict(&dir, Level::Send, a, c, T + 3), Some(true));
    dir.set(&b, T + 3, Some(&listed(&mut interner, b, c)));
    assert_eq!((dir.arena_len, dir.free.iter().map(Vec::len).sum::<usize>()), (used, 0));
    // A new profile (office hours in Berlin for everyone): passed by the block in the window.
    let office = json!({"profiles": [{"name": "office", "applies_to": ["*"], "restrictions": {"timing": [
        {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:00", "end": "18:00", "tz": "Europe/Berlin"}]}}]});
    dir.set(&c, T + 4, Some(&record(&mut interner, c, &[], office)));
    let morning = T - 7 * 3_600_000;
    assert_eq!(verdict(&dir, Level::Send, a, c, T + 4), None, "18:00 in Berlin: outside");
    let office = json!({"profiles": [{"name": "office", "applies_to": ["*"], "restrictions": {"timing": [
        {"days": ["tue"], "start": "08:00", "end": "18:00", "tz": "Europe/Berlin"}]}}]});
    dir.set(&c, morning, Some(&record(&mut interner, c, &[], office)));
    assert_eq!(verdict(&dir, Level::Send, a, c, morning), Some(false), "11:00 in Berlin");
    // A tombstone: still found, no longer registered.
    dir.set(&c, T + 5, None);
    let slot = dir.view().find(key_of(&c)).unwrap();
    assert!(!slot.registered_at(T + 5));
    assert_eq!(dir.len(), 3);
}

#[test]
fn what_the_layout_cannot_hold_goes_to_the_reference() {
    let mut interner = GroupInterner::default();
    let mut dir = Directory::default();
    let (a, t) = (u(1), u(2));
    // Six groups: the slot holds four (the ids sorted), so a list naming one of the others is not
    // judged here, and one naming one of the first four is.
    dir.set(&a, T, Some(&record(&mut interner, a, &["g0", "g1", "g2", "g3", "g4", "g5"], json!({}))));
    for (group, expected) in [("g0", Some(false)), ("g3", Some(false)), ("g5", None)] {
        let rec = record(&mut interner, t, &[], json!({"permissions": {"send": {"allow": [format!("group:{group}")]}}}));
        dir.set(&t, T, Some(&rec));
        assert_eq!(verdict(&dir, Level::Send, a, t, T), expected, "{group}");
        // A deny list naming a group the slot does not hold may deny: the reference decides.
        let rec = record(&mut interner, t, &[], json!({"permissions": {"send": {"deny": [format!("group:{group}x")]}}}));
        dir.set(&t, T, Some(&rec));
        assert_eq!(verdict(&dir, Level::Send, a, t, T), None, "{group}x");
    }
    // A list too long for the largest block.
    let many: Vec<Uuid> = (0..70).map(|k| u(1_000 + k)).collect();
    let rec = record(&mut interner, t, &[], json!({"permissions": {"send": {"allow": many}}}));
    assert!(dir.compile(&rec).flags & OPAQUE != 0);
    dir.set(&t, T, Some(&rec));
    assert_eq!(verdict(&dir, Level::Send, a, t, T), None);
    // Still judged at once at the levels that need nothing.
    assert_eq!(verdict(&dir, Level::Discover, a, t, T), Some(true));
    // Restrictions the directory does not read: presence, a target's location, payload fields.
    for restrictions in [
        json!({"presence": {"target_online": true}}),
        json!({"location": {"subject": "target", "allow": [{"country": "DE"}]}}),
        json!({"envelope": {"fields": {"command": {"in": ["on"]}}}}),
    ] {
        let rec = record(&mut interner, t, &[], json!({"profiles": [{"name": "p", "applies_to": ["*"], "restrictions": restrictions}]}));
        dir.set(&t, T, Some(&rec));
        assert_eq!(verdict(&dir, Level::Discover, a, t, T), None, "{restrictions}");
    }
}

#[test]
fn the_registry_keeps_the_newest_version_in_the_directory() {
    let mut interner = GroupInterner::default();
    let mut reg = Registry::default();
    let (a, t) = (u(1), u(2));
    reg.insert(a, T, Some(Arc::new(record(&mut interner, a, &[], json!({})))));
    reg.insert(t, T + 10, Some(Arc::new(listed(&mut interner, t, a))));
    // An older version arriving late only adds history.
    reg.insert(t, T, Some(Arc::new(record(&mut interner, t, &[], json!({})))));
    assert_eq!(verdict(reg.hot(), Level::Send, a, t, T + 10), Some(false));
    assert_eq!(verdict(reg.hot(), Level::Send, a, t, T + 5), None);
    // A second version at the same time replaces the first, in the directory too.
    reg.insert(t, T + 10, Some(Arc::new(record(&mut interner, t, &[], json!({})))));
    assert_eq!(verdict(reg.hot(), Level::Send, a, t, T + 10), Some(true));
    // Pruning history leaves the newest alone.
    reg.prune(T + 20);
    assert_eq!(verdict(reg.hot(), Level::Send, a, t, T + 10), Some(true));
    reg.insert(t, T + 30, None);
    assert_eq!(verdict(reg.hot(), Level::Send, a, t, T + 30), None);
    assert!(reg.get(&t, T + 30).is_some_and(Option::is_none));
    assert_eq!(reg.len(), 2);
}
