//! The SQL tables' schemas, and the Arrow batches the pipeline archives for them.
//!
//! Columns are what a person typing SQL into psql or a Grafana panel wants: UUIDs and enums as
//! lower-case text (the contract's spelling, so `WHERE offender = '…'` works as written), times as
//! UTC timestamps, `detail` as its JSON text. The `ts` column of every table is the time the row was
//! made and picks its `date=` folder.

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use meshguard_schemas::output::{EnforcementState, Finding};
use meshguard_schemas::registry::RegistryRecord;
use uuid::Uuid;

fn time(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), nullable)
}

fn text(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

/// `findings`: one row per finding published on `meshguard.findings.v1`, as the contract has it.
pub fn findings_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            text("id", false),
            time("ts", false),
            time("event_ts", false),
            text("event_id", true),
            text("kind", false),
            text("offender", false),
            text("target", true),
            text("action", true),
            text("rule", false),
            text("detail", false),
            Field::new("score", DataType::Float64, false),
            text("severity", false),
        ]))
    });
    SCHEMA.clone()
}

/// `enforcement`: one row per enforcement state change published on `meshguard.enforcement.v1`;
/// `ts` is when it was published, `since`/`until` the contract's event times; `findings` the ids
/// of the latest findings behind it, comma-separated.
pub fn enforcement_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            time("ts", false),
            text("uuid", false),
            text("state", false),
            time("since", false),
            time("until", true),
            text("reason", false),
            Field::new("attempts", DataType::Int64, false),
            text("findings", false),
        ]))
    });
    SCHEMA.clone()
}

/// `devices`: the registry as the pipeline knows it now, one row per registered UUID; `ts` is the
/// event time of its latest registry record; `groups` comma-separated; `profiles` how many
/// security profiles it has.
pub fn devices_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            time("ts", false),
            text("uuid", false),
            text("kind", false),
            text("type", true),
            text("manufacturer", true),
            text("owner", true),
            text("groups", false),
            text("country", true),
            Field::new("exempt", DataType::Boolean, false),
            Field::new("profiles", DataType::Int64, false),
        ]))
    });
    SCHEMA.clone()
}

fn utc(builder: TimestampMillisecondBuilder) -> TimestampMillisecondBuilder {
    builder.with_timezone("UTC")
}

fn uuid_text(b: &mut StringBuilder, u: &Uuid) {
    let mut buf = [0u8; 36];
    b.append_value(u.hyphenated().encode_lower(&mut buf));
}

fn opt_uuid_text(b: &mut StringBuilder, u: Option<&Uuid>) {
    match u {
        Some(u) => uuid_text(b, u),
        None => b.append_null(),
    }
}

/// Findings as one batch of [`findings_schema`].
pub fn findings_batch(findings: &[Finding]) -> Result<RecordBatch, ArrowError> {
    let n = findings.len();
    let (mut id, mut event_id, mut offender, mut target) =
        (StringBuilder::with_capacity(n, n * 36), StringBuilder::new(), StringBuilder::with_capacity(n, n * 36), StringBuilder::new());
    let (mut ts, mut event_ts) = (utc(TimestampMillisecondBuilder::with_capacity(n)), utc(TimestampMillisecondBuilder::with_capacity(n)));
    let (mut kind, mut action, mut rule, mut detail, mut severity) =
        (StringBuilder::new(), StringBuilder::new(), StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    let mut score = Float64Builder::with_capacity(n);
    for f in findings {
        uuid_text(&mut id, &f.id);
        ts.append_value(f.ts);
        event_ts.append_value(f.event_ts);
        opt_uuid_text(&mut event_id, f.event_id.as_ref());
        kind.append_value(f.kind.as_str());
        uuid_text(&mut offender, &f.offender);
        opt_uuid_text(&mut target, f.target.as_ref());
        action.append_option(f.action.map(|a| a.as_str()));
        rule.append_value(&f.rule);
        detail.append_value(f.detail.to_string());
        score.append_value(f.score);
        severity.append_value(f.severity.as_str());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(ts.finish()),
        Arc::new(event_ts.finish()),
        Arc::new(event_id.finish()),
        Arc::new(kind.finish()),
        Arc::new(offender.finish()),
        Arc::new(target.finish()),
        Arc::new(action.finish()),
        Arc::new(rule.finish()),
        Arc::new(detail.finish()),
        Arc::new(score.finish()),
        Arc::new(severity.finish()),
    ];
    RecordBatch::try_new(findings_schema(), columns)
}

/// Enforcement changes published at `published_ms`, as one batch of [`enforcement_schema`].
pub fn enforcement_batch(changes: &[EnforcementState], published_ms: i64) -> Result<RecordBatch, ArrowError> {
    let n = changes.len();
    let mut ts = utc(TimestampMillisecondBuilder::with_capacity(n));
    let (mut uuid, mut state, mut reason, mut ids) =
        (StringBuilder::new(), StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    let (mut since, mut until) = (utc(TimestampMillisecondBuilder::with_capacity(n)), utc(TimestampMillisecondBuilder::with_capacity(n)));
    let mut attempts = Int64Builder::with_capacity(n);
    for c in changes {
        ts.append_value(published_ms);
        uuid_text(&mut uuid, &c.uuid);
        state.append_value(c.state.as_str());
        since.append_value(c.since);
        until.append_option(c.until);
        reason.append_value(&c.reason);
        attempts.append_value(i64::try_from(c.attempts).unwrap_or(i64::MAX));
        ids.append_value(c.findings.iter().map(|f| f.hyphenated().to_string()).collect::<Vec<_>>().join(","));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ts.finish()),
        Arc::new(uuid.finish()),
        Arc::new(state.finish()),
        Arc::new(since.finish()),
        Arc::new(until.finish()),
        Arc::new(reason.finish()),
        Arc::new(attempts.finish()),
        Arc::new(ids.finish()),
    ];
    RecordBatch::try_new(enforcement_schema(), columns)
}

/// Registry records (each with the event time of its version) as one batch of [`devices_schema`].
pub fn devices_batch<'a>(records: impl IntoIterator<Item = (i64, &'a RegistryRecord)>) -> Result<RecordBatch, ArrowError> {
    let mut ts = utc(TimestampMillisecondBuilder::new());
    let (mut uuid, mut kind, mut ty, mut manufacturer, mut owner, mut groups, mut country) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut exempt, mut profiles) = (BooleanBuilder::new(), Int64Builder::new());
    for (from_ms, r) in records {
        ts.append_value(from_ms);
        uuid_text(&mut uuid, &r.uuid);
        kind.append_value(r.kind.as_str());
        ty.append_option(r.device_type.as_deref());
        manufacturer.append_option(r.manufacturer.as_deref());
        opt_uuid_text(&mut owner, r.owner.as_ref());
        groups.append_value(r.groups.join(","));
        country.append_option(r.country.as_deref());
        exempt.append_value(r.exempt);
        profiles.append_value(r.profiles.len() as i64);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ts.finish()),
        Arc::new(uuid.finish()),
        Arc::new(kind.finish()),
        Arc::new(ty.finish()),
        Arc::new(manufacturer.finish()),
        Arc::new(owner.finish()),
        Arc::new(groups.finish()),
        Arc::new(country.finish()),
        Arc::new(exempt.finish()),
        Arc::new(profiles.finish()),
    ];
    RecordBatch::try_new(devices_schema(), columns)
}
