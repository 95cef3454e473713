//! The policy check's speed: attempts judged per second on one core against a directory of
//! 1,000,000 registered UUIDs, 10 % of them with three security profiles (issue 3's setting).
//! T0 is 2026-11-24T17:00Z, a Tuesday.
//!
//! The directory: every UUID in one or two of 1,000 home groups and one of 50 company groups;
//! half the records with open lists, half with a group-only `send` list and a two-entry deny list;
//! the profiled tenth with `renter` (one UUID), `utility` (a company group: recurring Berlin
//! office hours, country allow list) and `everyone` (`"*"`: payload types). Attempts are 65,536
//! sends, discovers and receives, judged in one batch (see [`attempts`] for the mix); `uniform`
//! draws targets from the whole directory (every lookup a cache miss), `hot_10k` from 10,000
//! active UUIDs. Before each criterion run, the bench prints the rate per CPU-second of its thread
//! (immune to waiting for a core on a shared machine, not to other work's use of the caches).
//!
//! `cargo bench -p meshguard-analytics --bench policy`

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meshguard_analytics::jobs::{Job, JobContext, MessagesView, PolicyCheck};
use meshguard_analytics::policy::{CompiledRecord, GroupInterner, Location, Registry};
use meshguard_analytics::tables::VersionedTable;
use meshguard_schemas::registry::{
    AccessList, Area, Country, EnvelopeRestriction, LocationRestriction, LocationSubject, Permissions, Principal, Profile, RegistryRecord,
    Restrictions, TimingWindow,
};
use meshguard_schemas::{BatchDecoder, InputTopic, RegistryKind};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const DIRECTORY: u32 = 1_000_000;
/// Under `cargo test` (no `--bench` argument) the bench runs once as a smoke test, on a directory
/// small enough to build in a debug build.
const SMOKE_DIRECTORY: u32 = 20_000;
const ATTEMPTS: usize = 65_536;
const T0: i64 = 1_795_539_600_000;

fn uuid(i: u32) -> Uuid {
    Uuid::from_u128(0x1000_0000_0000_4000_8000_0000_0000_0000 | u128::from(i))
}

fn record(rng: &mut SmallRng, i: u32, size: u32) -> RegistryRecord {
    let home = format!("home:{}", rng.random_range(0..1_000));
    let company = format!("company:{}", rng.random_range(0..50));
    let mut groups = vec![home.clone(), company.clone()];
    if rng.random_bool(0.5) {
        groups.pop();
    }
    let mut permissions = Permissions::default();
    if rng.random_bool(0.5) {
        permissions.send = Some(AccessList {
            allow: vec![Principal::Group(home)],
            deny: vec![Principal::Uuid(uuid(rng.random_range(0..size))), Principal::Uuid(uuid(rng.random_range(0..size)))],
        });
        permissions.subscribe = Some(AccessList { allow: vec![Principal::Uuid(uuid(rng.random_range(0..size)))], deny: vec![] });
    }
    let profiles = if i.is_multiple_of(10) {
        let office: TimingWindow =
            serde_json::from_str(r#"{"days":["mon","tue","wed","thu","fri"],"start":"08:00","end":"18:00","tz":"Europe/Berlin"}"#).unwrap();
        vec![
            Profile {
                name: "renter".into(),
                applies_to: vec![Principal::Uuid(uuid(rng.random_range(0..size)))],
                permissions: Some(Permissions {
                    send: Some(AccessList { allow: vec![Principal::Any], deny: vec![] }),
                    ..Default::default()
                }),
                restrictions: Restrictions::default(),
            },
            Profile {
                name: "utility".into(),
                applies_to: vec![Principal::Group(company)],
                permissions: None,
                restrictions: Restrictions {
                    timing: Some(vec![office]),
                    location: Some(LocationRestriction {
                        subject: LocationSubject::Requester,
                        allow: vec![Area::Country { country: Country::parse("DE").unwrap() }],
                        deny: vec![],
                    }),
                    ..Default::default()
                },
            },
            Profile {
                name: "everyone".into(),
                applies_to: vec![Principal::Any],
                permissions: None,
                restrictions: Restrictions {
                    envelope: Some(EnvelopeRestriction { payload_types: Some(vec!["command".into()]), ..Default::default() }),
                    ..Default::default()
                },
            },
        ]
    } else {
        Vec::new()
    };
    RegistryRecord {
        uuid: uuid(i),
        kind: RegistryKind::Device,
        device_type: None,
        manufacturer: None,
        owner: None,
        groups,
        country: Some("DE".into()),
        exempt: false,
        permissions,
        profiles,
    }
}

/// The directory, and for each UUID the home group whose members its group-only `send` list
/// admits (`None`: open lists).
struct Directory {
    table: Registry,
    restricted_to: Vec<Option<u32>>,
    home_members: Vec<Vec<u32>>,
}

fn directory(size: u32) -> Directory {
    let mut rng = SmallRng::seed_from_u64(3);
    let mut interner = GroupInterner::default();
    let mut table = Registry::default();
    let mut restricted_to = Vec::with_capacity(size as usize);
    let mut home_members = vec![Vec::new(); 1_000];
    for i in 0..size {
        let rec = record(&mut rng, i, size);
        let home: u32 = rec.groups[0].trim_start_matches("home:").parse().unwrap();
        home_members[home as usize].push(i);
        restricted_to.push(rec.permissions.send.is_some().then_some(home));
        table.insert(rec.uuid, T0 - 86_400_000, Some(Arc::new(CompiledRecord::compile(Arc::new(rec), &mut interner))));
    }
    Directory { table, restricted_to, home_members }
}

/// Traffic as a platform sees it: a target drawn from the active UUIDs, a requester its lists
/// admit (a member of its home group when its `send` list is group-only), during Berlin office
/// hours with a `command` payload and a German location; 1 % from unregistered UUIDs and 1 % from
/// requesters the target's lists do not admit.
fn attempts(dir: &Directory, active: u32) -> arrow::record_batch::RecordBatch {
    let mut rng = SmallRng::seed_from_u64(5);
    let texts: Vec<String> = (0..ATTEMPTS)
        .map(|n| {
            let to = rng.random_range(0..active);
            let roll = rng.random_range(0..100);
            let from = match dir.restricted_to[to as usize] {
                _ if roll == 0 => uuid(u32::MAX - n as u32),
                _ if roll == 1 => uuid(rng.random_range(0..active)),
                Some(home) => {
                    let members = &dir.home_members[home as usize];
                    uuid(members[rng.random_range(0..members.len())])
                }
                None => uuid(rng.random_range(0..active)),
            };
            let to = uuid(to);
            let action = ["send", "send", "send", "discover", "receive"][n % 5];
            // From 09:00 UTC (10:00 in Berlin) on Tuesday 2026-11-24, 10 ms apart.
            format!(
                r#"{{"id":"{}","ts":{},"action":"{action}","from":"{from}","to":"{to}","auth":"valid","payload_type":"command","location":{{"country":"DE"}}}}"#,
                Uuid::from_u128(n as u128),
                T0 - 8 * 3_600_000 + (n as i64) * 10
            )
        })
        .collect();
    let slices: Vec<&[u8]> = texts.iter().map(|t| t.as_bytes()).collect();
    let out = BatchDecoder::new(InputTopic::Messages).decode(&slices);
    assert!(out.rejected.is_empty());
    out.batch
}

fn bench(c: &mut Criterion) {
    let size = if std::env::args().any(|a| a == "--bench") { DIRECTORY } else { SMOKE_DIRECTORY };
    let dir = directory(size);
    let registry = &dir.table;
    let presence = VersionedTable::<Uuid, bool>::default();
    let locations = VersionedTable::<Uuid, Location>::default();
    let ctx = JobContext { registry, presence: &presence, locations: &locations, now_ms: T0 };
    let mut g = c.benchmark_group("policy");
    g.throughput(Throughput::Elements(ATTEMPTS as u64));
    g.sample_size(20);
    for (name, active) in [("uniform", size), ("hot_10k", 10_000)] {
        let batch = attempts(&dir, active);
        let view = MessagesView::new(&batch).unwrap();
        let mut job = PolicyCheck::default();
        let mut out = Vec::with_capacity(ATTEMPTS);
        job.on_messages(&view, &ctx, &mut out);
        eprintln!("{name}: {} findings per {ATTEMPTS} attempts", out.len());
        if size == DIRECTORY
            && let Some(rate) = per_cpu_second(|| {
                out.clear();
                job.on_messages(black_box(&view), &ctx, &mut out);
            })
        {
            eprintln!("{name}: {:.2} M attempts per CPU-second of this thread", rate / 1e6);
        }
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                job.on_messages(black_box(&view), &ctx, &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

/// Attempts judged per second of this thread's CPU time over 200 batches: on a machine shared with
/// other work, wall-clock figures also count the time the thread waited for a core. `None` where
/// the kernel does not report a thread's CPU time (`/proc/thread-self/schedstat`, Linux).
fn per_cpu_second(mut batch: impl FnMut()) -> Option<f64> {
    let cpu_ns = || -> Option<u64> { std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok() };
    const BATCHES: usize = 200;
    let start = cpu_ns()?;
    for _ in 0..BATCHES {
        batch();
    }
    let spent = cpu_ns()?.checked_sub(start)?;
    Some((BATCHES * ATTEMPTS) as f64 / (spent as f64 / 1e9))
}

criterion_group!(benches, bench);
criterion_main!(benches);
