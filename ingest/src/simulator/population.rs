//! The simulated platform's directory: who is registered, who owns what, groups, permissions
//! records and security profiles, and the registry records that publish them.
//!
//! It owns one question the traffic generator asks before it emits an attempt it calls benign:
//! would the contract allow this requester this action on this target, with no profile of either
//! side involved? It answers conservatively (anything it is unsure about is "no"), so benign
//! traffic never needs a permission, restriction or profile decision to be right. It never decides
//! labels and never writes message attempts.

use rand::Rng;
use rand::rngs::SmallRng;
use serde_json::{Value, json};
use uuid::Uuid;

use super::write::{self, UUID_LEN};

/// Index of an entity in [`Population::entities`].
pub(super) type Ix = u32;

/// Namespace of the simulator's registered UUIDs. Registered UUIDs are version 5 (name-based) and
/// unregistered requesters version 4 (random), so the two sets are disjoint by construction.
const NAMESPACE: Uuid = Uuid::from_u128(0x6d65_7368_6775_4172_9000_7369_6d75_6c61);

/// What a registered UUID is (the contract's registry `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Device,
    Person,
    System,
    Gateway,
    MessagingSystem,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Device => "device",
            Kind::Person => "person",
            Kind::System => "system",
            Kind::Gateway => "gateway",
            Kind::MessagingSystem => "messaging_system",
        }
    }
}

/// The five access levels of a permissions record, in contract order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    Discover = 0,
    Send = 1,
    Receive = 2,
    Subscribe = 3,
    Configure = 4,
}

const LEVEL_NAMES: [&str; 5] = ["discover", "send", "receive", "subscribe", "configure"];

/// An allow- or deny-list entry.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Principal {
    /// `"*"`.
    Any,
    /// `group:NAME`, by index into [`Population::group_names`].
    Group(u32),
    /// A registered UUID.
    Entity(Ix),
    /// A UUID that is never registered (a known bad actor).
    Foreign(Uuid),
}

/// One level of a permissions record. `present: false` omits the level from the record, which
/// the contract reads like an empty `allow`.
#[derive(Debug, Clone, Default)]
pub(super) struct AccessList {
    pub(super) present: bool,
    pub(super) allow: Vec<Principal>,
    pub(super) deny: Vec<Principal>,
}

impl AccessList {
    fn open() -> Self {
        Self { present: true, ..Self::default() }
    }

    fn allow(allow: Vec<Principal>) -> Self {
        Self { present: true, allow, deny: Vec::new() }
    }
}

/// A security profile: who it governs (all the generator needs to know) and the rest of its JSON.
#[derive(Debug, Clone)]
pub(super) struct Profile {
    pub(super) name: &'static str,
    pub(super) applies_to: Vec<Principal>,
    /// `permissions` and `restrictions`, rendered once.
    pub(super) body: Value,
}

/// One registered (or once registered) UUID.
#[derive(Debug, Clone)]
pub(super) struct Entity {
    pub(super) lower: [u8; UUID_LEN],
    pub(super) upper: [u8; UUID_LEN],
    pub(super) kind: Kind,
    pub(super) device_type: Option<&'static str>,
    pub(super) manufacturer: Option<&'static str>,
    pub(super) owner: Option<Ix>,
    /// Without an owner: write `"owner": null` rather than leaving the field out.
    pub(super) owner_null: bool,
    pub(super) groups: Vec<u32>,
    /// Index into [`COUNTRIES`]; `None` writes `"country": null`.
    pub(super) country: Option<u8>,
    pub(super) exempt: bool,
    pub(super) permissions: [AccessList; 5],
    pub(super) profiles: Vec<Profile>,
    /// What this UUID owns.
    pub(super) owned: Vec<Ix>,
    /// Listed in many deny lists; a registered requester like any other otherwise.
    pub(super) suspect: bool,
}

impl Entity {
    pub(super) fn text(&self, upper: bool) -> &[u8; UUID_LEN] {
        if upper { &self.upper } else { &self.lower }
    }
}

/// ISO 3166 alpha-2 code and a point inside, in 1e-4 degrees.
pub(super) const COUNTRIES: [(&str, i64, i64); 10] = [
    ("DE", 511_657, 104_515),
    ("FR", 462_276, 22_137),
    ("NL", 521_326, 52_913),
    ("GB", 533_781, -22_360),
    ("US", 370_902, -957_129),
    ("ES", 404_637, -37_492),
    ("IT", 418_719, 125_674),
    ("SE", 601_282, 186_435),
    ("PL", 519_194, 191_451),
    ("JP", 362_048, 1_382_529),
];

/// Device types and makers: `(type, manufacturer, household)`; the others are company equipment.
const DEVICE_TYPES: [(&str, &str, bool); 14] = [
    ("smart-bulb", "lumen", true),
    ("thermostat", "thermia", true),
    ("door-lock", "lockwell", true),
    ("camera", "optica", true),
    ("smart-plug", "lumen", true),
    ("speaker", "sonora", true),
    ("watch", "chronox", true),
    ("car", "autova", true),
    ("smart-meter", "gridco-metering", false),
    ("pump", "hydra", false),
    ("sensor", "sensiq", false),
    ("forklift", "liftco", false),
    ("hvac", "thermia", false),
    ("badge-reader", "lockwell", false),
];

const SURNAMES: [&str; 12] =
    ["smith", "garcia", "mueller", "rossi", "dubois", "jansen", "kowalski", "tanaka", "nilsson", "lopez", "brown", "novak"];

const COMPANIES: [&str; 10] = ["acme", "gridco", "globex", "initech", "umbrella", "hooli", "soylent", "tyrell", "wonka", "cyberdyne"];

/// The registered population and its current registration state.
#[derive(Debug)]
pub(super) struct Population {
    pub(super) entities: Vec<Entity>,
    pub(super) group_names: Vec<String>,
    pub(super) group_members: Vec<Vec<Ix>>,
    /// Registered right now (a tombstone clears it, a new record sets it).
    pub(super) registered: Vec<bool>,
}

/// How many UUIDs of each kind a population of `n` has.
struct Sizes {
    gateways: usize,
    persons: usize,
    systems: usize,
    devices: usize,
}

/// `group:platform:core`, the platform's own UUIDs (gateways, the messaging system): the first
/// group created, so its index is fixed.
pub(super) const PLATFORM_GROUP: u32 = 0;

/// The smallest population the generator supports: enough for owners, peers and a gateway.
pub(super) const MIN_POPULATION: usize = 8;

impl Sizes {
    fn of(n: usize) -> Self {
        let n = n.max(MIN_POPULATION);
        let gateways = (n / 100).max(1);
        let persons = (n * 12 / 100).max(2);
        let systems = (n * 3 / 100).max(1);
        // One messaging system; everything else is a device.
        let devices = n - gateways - 1 - persons - systems;
        Self { gateways, persons, systems, devices }
    }
}

impl Population {
    /// A population of `n` registered UUIDs (at least [`MIN_POPULATION`]), drawn from `rng`.
    /// `start_ms` places the absolute timing windows of profiles in the simulation's future.
    pub(super) fn build(rng: &mut SmallRng, n: usize, seed: u64, start_ms: i64) -> Self {
        let sizes = Sizes::of(n);
        let mut pop =
            Population { entities: Vec::with_capacity(n), group_names: Vec::new(), group_members: Vec::new(), registered: Vec::new() };
        let platform = pop.group("platform:core");
        debug_assert_eq!(platform, PLATFORM_GROUP);

        for _ in 0..sizes.gateways {
            let country = rng.random_range(0..COUNTRIES.len()) as u8;
            let ix = pop.push(seed, Kind::Gateway, country);
            let e = &mut pop.entities[ix as usize];
            e.device_type = Some("gateway");
            e.manufacturer = Some("meshguard");
            e.exempt = true;
            e.owner_null = true;
            e.permissions = Self::open_record();
            pop.join(ix, platform);
        }
        let ms = pop.push(seed, Kind::MessagingSystem, 0);
        pop.entities[ms as usize].exempt = true;
        pop.entities[ms as usize].permissions = Self::open_record();
        pop.join(ms, platform);

        // Persons in households of one to three: a shared `home:` and `family:` group.
        let mut persons = Vec::with_capacity(sizes.persons);
        let mut homes = Vec::new();
        while persons.len() < sizes.persons {
            let size = rng.random_range(1..=3usize).min(sizes.persons - persons.len());
            let country = rng.random_range(0..COUNTRIES.len()) as u8;
            let family = SURNAMES[homes.len() % SURNAMES.len()];
            let mut home = None;
            let family_group = pop.group(&format!("family:{family}-{}", homes.len()));
            for _ in 0..size {
                let ix = pop.push(seed, Kind::Person, country);
                let home_group = *home.get_or_insert_with(|| {
                    let hex = String::from_utf8_lossy(&pop.entities[ix as usize].lower[..8]).into_owned();
                    pop.group(&format!("home:{hex}"))
                });
                pop.join(ix, home_group);
                pop.join(ix, family_group);
                let e = &mut pop.entities[ix as usize];
                e.owner_null = rng.random_bool(0.3);
                e.permissions = Self::person_record();
                persons.push(ix);
            }
            if let Some(h) = home {
                homes.push(h);
            }
        }
        // A few persons are known bad actors: listed in deny lists, never benign toward those.
        for _ in 0..(persons.len() / 20).max(1) {
            let p = persons[rng.random_range(0..persons.len())];
            pop.entities[p as usize].suspect = true;
        }
        let suspects: Vec<Ix> = persons.iter().copied().filter(|&p| pop.entities[p as usize].suspect).collect();

        // Company systems, each owned by one of the company's people.
        let mut systems = Vec::with_capacity(sizes.systems);
        let mut companies = Vec::with_capacity(sizes.systems);
        for i in 0..sizes.systems {
            let name = if i < COMPANIES.len() {
                COMPANIES[i].to_owned()
            } else {
                format!("{}-{}", COMPANIES[i % COMPANIES.len()], i / COMPANIES.len())
            };
            let company = pop.group(&format!("company:{name}"));
            let admin = persons[rng.random_range(0..persons.len())];
            pop.join(admin, company);
            let country = pop.entities[admin as usize].country.unwrap_or(0);
            let ix = pop.push(seed, Kind::System, country);
            pop.join(ix, company);
            pop.set_owner(ix, admin);
            pop.entities[ix as usize].permissions = [
                AccessList::allow(vec![Principal::Any]),
                AccessList::allow(vec![Principal::Group(company)]),
                AccessList::open(),
                AccessList::allow(Vec::new()),
                AccessList::default(),
            ];
            systems.push(ix);
            companies.push(company);
        }
        // Some employees.
        for &p in &persons {
            if rng.random_bool(0.2) {
                let c = companies[rng.random_range(0..companies.len())];
                pop.join(p, c);
            }
        }

        // Devices: most belong to a household, the rest to a company.
        for _ in 0..sizes.devices {
            let household = rng.random_bool(0.7);
            let (owner, group) = if household {
                let owner = persons[rng.random_range(0..persons.len())];
                let home = pop.entities[owner as usize].groups[0];
                (owner, home)
            } else {
                let k = rng.random_range(0..systems.len());
                (systems[k], companies[k])
            };
            let types: Vec<_> = DEVICE_TYPES.iter().filter(|t| t.2 == household).collect();
            let (ty, maker, _) = *types[rng.random_range(0..types.len())];
            let country = pop.entities[owner as usize].country.unwrap_or(0);
            let ix = pop.push(seed, Kind::Device, country);
            pop.set_owner(ix, owner);
            pop.join(ix, group);
            let e = &mut pop.entities[ix as usize];
            e.device_type = Some(ty);
            e.manufacturer = Some(maker);
            if rng.random_bool(0.05) {
                e.country = None;
            }
            let fleet = rng.random_bool(0.1).then(|| rng.random_range(0..8u32));
            if let Some(f) = fleet {
                let g = pop.group(&format!("fleet:{f}"));
                pop.join(ix, g);
            }
            pop.entities[ix as usize].permissions = Self::device_record(rng, group, owner, &suspects, &pop);
        }

        // Security profiles on about one device in twenty (and at least one).
        let devices: Vec<Ix> = (0..pop.entities.len() as Ix).filter(|&i| pop.entities[i as usize].kind == Kind::Device).collect();
        for (k, &d) in devices.iter().enumerate() {
            if k == 0 || rng.random_bool(0.05) {
                let profile = pop.profile(rng, d, &persons, &systems, &companies, start_ms);
                pop.entities[d as usize].profiles.push(profile);
            }
        }
        pop.registered = vec![true; pop.entities.len()];
        pop
    }

    fn push(&mut self, seed: u64, kind: Kind, country: u8) -> Ix {
        let ix = self.entities.len() as Ix;
        let mut name = [0u8; 12];
        name[..8].copy_from_slice(&seed.to_be_bytes());
        name[8..].copy_from_slice(&ix.to_be_bytes());
        let uuid = Uuid::new_v5(&NAMESPACE, &name);
        self.entities.push(Entity {
            lower: write::uuid_text(&uuid, false),
            upper: write::uuid_text(&uuid, true),
            kind,
            device_type: None,
            manufacturer: None,
            owner: None,
            owner_null: false,
            groups: Vec::new(),
            country: Some(country),
            exempt: false,
            permissions: Default::default(),
            profiles: Vec::new(),
            owned: Vec::new(),
            suspect: false,
        });
        ix
    }

    fn group(&mut self, name: &str) -> u32 {
        if let Some(g) = self.group_names.iter().position(|n| n == name) {
            return g as u32;
        }
        self.group_names.push(name.to_owned());
        self.group_members.push(Vec::new());
        (self.group_names.len() - 1) as u32
    }

    fn join(&mut self, ix: Ix, group: u32) {
        let e = &mut self.entities[ix as usize];
        if !e.groups.contains(&group) {
            e.groups.push(group);
            self.group_members[group as usize].push(ix);
        }
    }

    fn set_owner(&mut self, ix: Ix, owner: Ix) {
        self.entities[ix as usize].owner = Some(owner);
        self.entities[owner as usize].owned.push(ix);
    }

    /// Open at discover, send and receive; subscribe and configure absent (never open).
    fn open_record() -> [AccessList; 5] {
        [AccessList::allow(vec![Principal::Any]), AccessList::open(), AccessList::open(), AccessList::default(), AccessList::default()]
    }

    fn person_record() -> [AccessList; 5] {
        [
            AccessList::allow(vec![Principal::Any]),
            AccessList::open(),
            AccessList::open(),
            AccessList::allow(Vec::new()),
            AccessList::allow(Vec::new()),
        ]
    }

    fn device_record(rng: &mut SmallRng, group: u32, owner: Ix, suspects: &[Ix], pop: &Population) -> [AccessList; 5] {
        let discover = match rng.random_range(0..10) {
            0..5 => AccessList::allow(vec![Principal::Any]),
            5..8 => AccessList::open(),
            _ => AccessList::default(),
        };
        let mut send = if rng.random_bool(0.45) {
            AccessList::allow(vec![Principal::Group(group), Principal::Group(PLATFORM_GROUP)])
        } else if rng.random_bool(0.8) {
            AccessList::open()
        } else {
            AccessList::default()
        };
        if rng.random_bool(0.3) {
            send.present = true;
            send.deny.push(Principal::Entity(suspects[rng.random_range(0..suspects.len())]));
        }
        if rng.random_bool(0.1) {
            send.present = true;
            send.deny.push(Principal::Foreign(Uuid::from_u128(0xbad0_bad0_0000_4000_8000_0000_0000_0000)));
        }
        let receive = if rng.random_bool(0.2) {
            AccessList::allow(vec![Principal::Group(group), Principal::Entity(owner), Principal::Group(PLATFORM_GROUP)])
        } else {
            AccessList::open()
        };
        let subscribe = if rng.random_bool(0.6) { AccessList::allow(vec![Principal::Group(group)]) } else { AccessList::allow(Vec::new()) };
        // Configure: the owner only, or also one other member of the owner's home or company.
        let mut configure = AccessList::allow(Vec::new());
        if rng.random_bool(0.2) {
            let members = &pop.group_members[group as usize];
            let m = members[rng.random_range(0..members.len())];
            if m != owner {
                configure.allow.push(Principal::Entity(m));
            }
        }
        [discover, send, receive, subscribe, configure]
    }

    /// A profile for device `d` like the contract's examples: `renter` (one guest), `utility` (a
    /// utility company's group) or `maintenance` (one contractor's system).
    fn profile(&mut self, rng: &mut SmallRng, d: Ix, persons: &[Ix], systems: &[Ix], companies: &[u32], start_ms: i64) -> Profile {
        let day = 86_400_000;
        let from = (start_ms.div_euclid(day) + 30) * day;
        let time = |ms: i64| {
            let mut b = Vec::new();
            write::rfc3339(&mut b, ms);
            String::from_utf8_lossy(&b).into_owned()
        };
        match rng.random_range(0..3) {
            0 => {
                let guest = persons[rng.random_range(0..persons.len())];
                let g = self.uuid_string(guest);
                Profile {
                    name: "renter",
                    applies_to: vec![Principal::Entity(guest)],
                    body: json!({
                        "permissions": {"send": {"allow": [g]}},
                        "restrictions": {
                            "timing": [{"from": time(from), "until": time(from + 5 * day)}],
                            "envelope": {"payload_types": ["command"], "fields": {"command": {"in": ["on", "off"]}}},
                            "presence": {"target_online": true},
                            "throttle": {"max": 20, "per_s": 300}
                        }
                    }),
                }
            }
            1 => {
                let k = rng.random_range(0..companies.len());
                let group = format!("group:{}", self.group_names[companies[k] as usize]);
                Profile {
                    name: "utility",
                    applies_to: vec![Principal::Group(companies[k])],
                    body: json!({
                        "permissions": {"send": {"allow": [group]}, "receive": {"allow": [group]}},
                        "restrictions": {
                            "timing": [{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:00", "end": "18:00", "tz": "Europe/Berlin"}],
                            "location": {"subject": "requester", "allow": [{"country": "DE"}]},
                            "path": {"deny": ["e9e9e9e9-0000-4000-8000-000000000000"], "deny_countries": ["XX"], "max_hops": 4}
                        }
                    }),
                }
            }
            _ => {
                let s = systems[rng.random_range(0..systems.len())];
                let sys = self.uuid_string(s);
                let (_, lat, lon) = COUNTRIES[self.entities[d as usize].country.unwrap_or(0) as usize];
                Profile {
                    name: "maintenance",
                    applies_to: vec![Principal::Entity(s)],
                    body: json!({
                        "permissions": {"subscribe": {"allow": [sys]}, "configure": {"allow": [sys]}},
                        "restrictions": {
                            "timing": [{"days": ["sat"], "start": "22:00", "end": "02:00", "tz": "UTC"}],
                            "location": {"subject": "both", "deny": [{"lat": lat as f64 / 1e4, "lon": lon as f64 / 1e4, "radius_m": 5000.0}]},
                            "throttle": {"max": 5, "per_s": 60}
                        }
                    }),
                }
            }
        }
    }

    pub(super) fn uuid_string(&self, ix: Ix) -> String {
        String::from_utf8_lossy(&self.entities[ix as usize].lower).into_owned()
    }

    fn principal(&self, p: &Principal) -> String {
        match p {
            Principal::Any => "*".to_owned(),
            Principal::Group(g) => format!("group:{}", self.group_names[*g as usize]),
            Principal::Entity(e) => self.uuid_string(*e),
            Principal::Foreign(u) => u.to_string(),
        }
    }

    fn matches(&self, p: &Principal, who: Ix) -> bool {
        match p {
            Principal::Any => true,
            Principal::Group(g) => self.entities[who as usize].groups.contains(g),
            Principal::Entity(e) => *e == who,
            Principal::Foreign(_) => false,
        }
    }

    /// `list` admits `who` by its entries: no deny entry matches and, when `allow` has entries,
    /// one matches; an empty `allow` admits only when `open_when_empty`.
    fn admits(&self, list: &AccessList, who: Ix, open_when_empty: bool) -> bool {
        if list.deny.iter().any(|p| self.matches(p, who)) {
            return false;
        }
        if list.allow.is_empty() {
            return open_when_empty;
        }
        list.allow.iter().any(|p| self.matches(p, who))
    }

    pub(super) fn profile_applies(&self, of: Ix, to: Ix) -> bool {
        self.entities[of as usize].profiles.iter().any(|p| p.applies_to.iter().any(|a| self.matches(a, to)))
    }

    /// Whether requester `r` may do `level` on target `t` (with `token`: `target_token` set) under
    /// the contract, judged conservatively: both registered, not the same UUID, no profile of `t`
    /// applies to `r` (nor, for a send, of `r` to `t`), no deny entry matches even for the owner;
    /// then the owner passes, `discover`/`send`/`receive` pass an empty or matching `allow`, and
    /// `subscribe`/`configure` need the token and an explicit matching `allow` entry. A send also
    /// needs `r`'s own `receive` list to admit `t`.
    pub(super) fn allows(&self, r: Ix, level: Level, t: Ix, token: bool) -> bool {
        if r == t || !self.registered[r as usize] || !self.registered[t as usize] {
            return false;
        }
        if self.profile_applies(t, r) {
            return false;
        }
        let target = &self.entities[t as usize];
        let list = &target.permissions[level as usize];
        if list.deny.iter().any(|p| self.matches(p, r)) {
            return false;
        }
        if target.owner != Some(r) {
            let ok = match level {
                Level::Discover | Level::Send | Level::Receive => self.admits(list, r, true),
                Level::Subscribe | Level::Configure => token && !list.allow.contains(&Principal::Any) && self.admits(list, r, false),
            };
            if !ok {
                return false;
            }
        }
        if level == Level::Send {
            if self.profile_applies(r, t) {
                return false;
            }
            let own = &self.entities[r as usize].permissions[Level::Receive as usize];
            if !self.admits(own, t, true) {
                return false;
            }
        }
        true
    }

    /// The registry record of `ix`, in the contract's field names.
    pub(super) fn registry_json(&self, ix: Ix) -> Vec<u8> {
        let e = &self.entities[ix as usize];
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(b"{\"uuid\":");
        write::quoted(&mut buf, &e.lower);
        buf.extend_from_slice(b",\"kind\":\"");
        buf.extend_from_slice(e.kind.as_str().as_bytes());
        buf.push(b'"');
        if let Some(t) = e.device_type {
            buf.extend_from_slice(b",\"type\":");
            write::quoted(&mut buf, t.as_bytes());
        }
        if let Some(m) = e.manufacturer {
            buf.extend_from_slice(b",\"manufacturer\":");
            write::quoted(&mut buf, m.as_bytes());
        }
        match e.owner {
            Some(o) => {
                buf.extend_from_slice(b",\"owner\":");
                write::quoted(&mut buf, &self.entities[o as usize].lower);
            }
            None if e.owner_null => buf.extend_from_slice(b",\"owner\":null"),
            None => {}
        }
        buf.extend_from_slice(b",\"groups\":[");
        for (i, g) in e.groups.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            write::quoted(&mut buf, self.group_names[*g as usize].as_bytes());
        }
        buf.push(b']');
        match e.country {
            Some(c) => {
                buf.extend_from_slice(b",\"country\":");
                write::quoted(&mut buf, COUNTRIES[c as usize].0.as_bytes());
            }
            None => buf.extend_from_slice(b",\"country\":null"),
        }
        buf.extend_from_slice(b",\"exempt\":");
        buf.extend_from_slice(if e.exempt { b"true" } else { b"false" });
        buf.extend_from_slice(b",\"permissions\":");
        let mut perms = serde_json::Map::new();
        for (name, list) in LEVEL_NAMES.iter().zip(&e.permissions) {
            if !list.present {
                continue;
            }
            let mut l = serde_json::Map::new();
            l.insert("allow".into(), list.allow.iter().map(|p| Value::String(self.principal(p))).collect());
            if !list.deny.is_empty() {
                l.insert("deny".into(), list.deny.iter().map(|p| Value::String(self.principal(p))).collect());
            }
            perms.insert((*name).into(), Value::Object(l));
        }
        // Writing a `Value` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut buf, &Value::Object(perms));
        buf.extend_from_slice(b",\"profiles\":[");
        for (i, p) in e.profiles.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            let mut obj = serde_json::Map::new();
            obj.insert("name".into(), p.name.into());
            obj.insert("applies_to".into(), p.applies_to.iter().map(|a| Value::String(self.principal(a))).collect());
            if let Value::Object(body) = &p.body {
                obj.extend(body.clone());
            }
            let _ = serde_json::to_writer(&mut buf, &Value::Object(obj));
        }
        buf.extend_from_slice(b"]}");
        buf
    }
}
