//! Arrow schemas of the contract's records, and the field specifications both decoding paths are
//! driven by (so the fast and the slow path cannot disagree about what a field is).
//!
//! Two schemas per input topic:
//! - the *raw* schema arrow-json decodes into: every field nullable, UUIDs and enums as `Utf8`;
//! - the *canonical* schema the pipeline sees: UUIDs as `FixedSizeBinary(16)` (16 bytes, hashed
//!   and compared without parsing), enums as `Dictionary(UInt8, Utf8)` whose key is the enum's
//!   code, times as `Timestamp(Millisecond, "UTC")`, optional booleans with their default filled.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// The five input topics of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputTopic {
    /// `meshguard.messages.v1`, keyed by `from`.
    Messages,
    /// `meshguard.presence.v1`, keyed by `uuid`.
    Presence,
    /// `meshguard.interactions.v1`, keyed by `reporter`.
    Interactions,
    /// `meshguard.identity-requests.v1`, keyed by `device`.
    IdentityRequests,
    /// `meshguard.registry.v1` (compacted), keyed by `uuid`; null value = unregistered.
    Registry,
}

impl InputTopic {
    /// Every input topic.
    pub const ALL: [InputTopic; 5] =
        [InputTopic::Messages, InputTopic::Presence, InputTopic::Interactions, InputTopic::IdentityRequests, InputTopic::Registry];

    /// The topics every worker reads in full, as global tables: the registry and presence (small
    /// facts about any UUID) and the interactions (verifying one device needs its peers' tables).
    pub const GLOBAL: [InputTopic; 3] = [InputTopic::Registry, InputTopic::Presence, InputTopic::Interactions];

    /// Whether every worker reads this topic in full (see [`InputTopic::GLOBAL`]).
    pub const fn is_global(self) -> bool {
        matches!(self, InputTopic::Registry | InputTopic::Presence | InputTopic::Interactions)
    }

    /// The contract's default topic name.
    pub const fn default_name(self) -> &'static str {
        match self {
            InputTopic::Messages => "meshguard.messages.v1",
            InputTopic::Presence => "meshguard.presence.v1",
            InputTopic::Interactions => "meshguard.interactions.v1",
            InputTopic::IdentityRequests => "meshguard.identity-requests.v1",
            InputTopic::Registry => "meshguard.registry.v1",
        }
    }

    /// Short name, used in metrics labels and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            InputTopic::Messages => "messages",
            InputTopic::Presence => "presence",
            InputTopic::Interactions => "interactions",
            InputTopic::IdentityRequests => "identity_requests",
            InputTopic::Registry => "registry",
        }
    }

    /// The fields of this topic's records. Empty for the registry, which is decoded with serde
    /// (see [`crate::registry`]).
    pub fn fields(self) -> &'static [FieldSpec] {
        match self {
            InputTopic::Messages => MESSAGE_FIELDS,
            InputTopic::Presence => PRESENCE_FIELDS,
            InputTopic::Interactions => INTERACTION_FIELDS,
            InputTopic::IdentityRequests => IDENTITY_REQUEST_FIELDS,
            InputTopic::Registry => &[],
        }
    }

    /// The canonical Arrow schema of this topic's decoded batches.
    pub fn schema(self) -> SchemaRef {
        static SCHEMAS: LazyLock<[SchemaRef; 5]> = LazyLock::new(|| {
            InputTopic::ALL
                .map(|t| Arc::new(Schema::new(t.fields().iter().map(FieldSpec::canonical_field).collect::<Vec<_>>())) as SchemaRef)
        });
        SCHEMAS[self as usize].clone()
    }

    /// The schema arrow-json decodes into (all nullable, UUIDs and enums as text, times without a
    /// time zone, JSON fields absent).
    pub(crate) fn raw_schema(self) -> SchemaRef {
        Arc::new(Schema::new(self.fields().iter().filter_map(FieldSpec::raw_field).collect::<Vec<_>>()))
    }
}

/// What a field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// RFC 4122 text.
    Uuid,
    /// RFC 3339 text or integer epoch milliseconds.
    Time,
    /// Free text.
    Str,
    /// Boolean; when optional, absent means false.
    Bool,
    /// Non-negative integer.
    Int,
    /// Non-negative finite number.
    Float,
    /// One of [`crate::Action`].
    Action,
    /// One of [`crate::Auth`].
    Auth,
    /// One of [`crate::InteractionKind`].
    InteractionKind,
    /// Array of UUIDs.
    UuidList,
    /// `{lat, lon, country}`, each optional.
    Location,
    /// Any JSON object, kept as its text.
    Json,
}

/// When a field must be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    /// Always.
    Yes,
    /// Never.
    No,
    /// For every `action` but `connect` (the `to` of a message attempt).
    UnlessConnect,
}

/// One field of an input record.
#[derive(Debug, Clone, Copy)]
pub struct FieldSpec {
    /// The contract's field name (also the column name).
    pub name: &'static str,
    /// What it holds.
    pub ty: FieldType,
    /// When it is required.
    pub required: Required,
}

const fn f(name: &'static str, ty: FieldType, required: Required) -> FieldSpec {
    FieldSpec { name, ty, required }
}

use FieldType as T;
use Required::{No, UnlessConnect, Yes};

/// Fields of a message attempt, in column order.
pub static MESSAGE_FIELDS: &[FieldSpec] = &[
    f("id", T::Uuid, Yes),
    f("ts", T::Time, Yes),
    f("action", T::Action, Yes),
    f("from", T::Uuid, Yes),
    f("to", T::Uuid, UnlessConnect),
    f("auth", T::Auth, Yes),
    f("target_token", T::Bool, No),
    f("route", T::UuidList, No),
    f("location", T::Location, No),
    f("payload_type", T::Str, No),
    f("payload", T::Json, No),
    f("payload_bytes", T::Int, No),
    f("encrypted", T::Bool, No),
    f("protocol", T::Str, No),
    f("broker", T::Str, No),
];

/// Fields of a presence change.
pub static PRESENCE_FIELDS: &[FieldSpec] = &[f("ts", T::Time, Yes), f("uuid", T::Uuid, Yes), f("online", T::Bool, Yes)];

/// Fields of an interaction entry.
pub static INTERACTION_FIELDS: &[FieldSpec] = &[
    f("id", T::Uuid, Yes),
    f("reporter", T::Uuid, Yes),
    f("peer", T::Uuid, Yes),
    f("kind", T::InteractionKind, Yes),
    f("ts", T::Time, Yes),
    f("duration_s", T::Float, No),
    f("access_point", T::Str, No),
    f("location", T::Location, No),
];

/// Fields of an identity request.
pub static IDENTITY_REQUEST_FIELDS: &[FieldSpec] = &[
    f("id", T::Uuid, Yes),
    f("ts", T::Time, Yes),
    f("device", T::Uuid, Yes),
    f("resource", T::Str, No),
    f("window", T::Int, No),
    f("min_verified", T::Int, No),
];

/// `Timestamp(Millisecond, "UTC")`, the type of every contract time.
pub fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// `FixedSizeBinary(16)`, the type of every UUID.
pub const UUID_TYPE: DataType = DataType::FixedSizeBinary(16);

/// `Dictionary(UInt8, Utf8)`, the type of every enum.
pub fn enum_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::UInt8), Box::new(DataType::Utf8))
}

/// The fields of a location struct.
pub fn location_fields() -> Fields {
    Fields::from(vec![
        Field::new("lat", DataType::Float64, true),
        Field::new("lon", DataType::Float64, true),
        Field::new("country", DataType::Utf8, true),
    ])
}

impl FieldSpec {
    /// Whether the column can hold nulls in the canonical schema (optional booleans cannot: their
    /// default is filled in).
    pub fn nullable(&self) -> bool {
        !matches!(self.required, Yes) && self.ty != T::Bool
    }

    /// The canonical Arrow field.
    pub fn canonical_field(&self) -> Field {
        let dt = match self.ty {
            T::Uuid => UUID_TYPE,
            T::Time => time_type(),
            T::Str | T::Json => DataType::Utf8,
            T::Bool => DataType::Boolean,
            T::Int => DataType::Int64,
            T::Float => DataType::Float64,
            T::Action | T::Auth | T::InteractionKind => enum_type(),
            T::UuidList => DataType::List(Arc::new(Field::new("item", UUID_TYPE, false))),
            T::Location => DataType::Struct(location_fields()),
        };
        Field::new(self.name, dt, self.nullable())
    }

    fn raw_field(&self) -> Option<Field> {
        let dt = match self.ty {
            T::Uuid | T::Str | T::Action | T::Auth | T::InteractionKind => DataType::Utf8,
            // Without a time zone: arrow-json then parses RFC 3339 text against UTC directly
            // instead of through the "UTC" zone of chrono-tz (the same instants, for less work);
            // the decoder labels the column "UTC" afterwards, without copying it.
            T::Time => DataType::Timestamp(TimeUnit::Millisecond, None),
            T::Bool => DataType::Boolean,
            T::Int => DataType::Int64,
            T::Float => DataType::Float64,
            T::UuidList => DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            T::Location => DataType::Struct(location_fields()),
            T::Json => return None,
        };
        Some(Field::new(self.name, dt, true))
    }

    /// The contract's words for what this field holds, for error messages.
    pub fn expected(&self) -> &'static str {
        match self.ty {
            T::Uuid => "a UUID",
            T::Time => "RFC 3339 or epoch ms",
            T::Str => "a string",
            T::Bool => "a boolean",
            T::Int => "a non-negative integer",
            T::Float => "a non-negative number",
            T::Action => "one of connect, discover, send, receive, subscribe, configure",
            T::Auth => "one of valid, invalid, missing",
            T::InteractionKind => "one of proximity, sms, mms, call, email, message",
            T::UuidList => "an array of UUIDs",
            T::Location => "an object {lat, lon, country}",
            T::Json => "a JSON object",
        }
    }
}
