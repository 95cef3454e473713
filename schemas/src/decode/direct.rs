//! The fast path for ordinary records: serde_json straight into the canonical columns.
//!
//! arrow-json stages every record on a tape, copies every string into Arrow arrays, and only then
//! can the decoder parse UUIDs and enums out of those copies; for the contract's small records that
//! is most of the cost (on the bench machine arrow-json alone decodes about 1.65 M records/s per
//! core, serde_json over the same records, UUIDs and times included, about 2.5 M/s). So each
//! record is first read here, with serde_json over the record as `&str` (validated as UTF-8 once,
//! so serde_json does not validate each string again), into one [`Val`] per field, and converted
//! at once, in field order, exactly as [`super::Canonical::append`] converts arrow-json's columns.
//!
//! arrow-json stays the decoder of record: this path only takes records whose reading it can
//! vouch for, those where arrow-json's answer is plain: strict JSON, no escaped strings or keys, no
//! duplicate fields, and each field of the type its column needs (strings for text, integer
//! literals for integers, numbers for floats, RFC 3339 text or integers for times, ...). Anything
//! else (a number in quotes, `1e3` for an integer, a time arrow-json cannot parse, a syntax error)
//! makes [`stage`] return `false`, and the whole chunk goes through arrow-json as before, so
//! acceptance, values and errors stay arrow-json's (the differential tests hold both paths to the
//! decoder before this one).

use std::fmt;

use arrow::array::{ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, NullBufferBuilder, StringBuilder, StructArray};
use arrow::compute::kernels::cast_utils::Parser;
use arrow::datatypes::{Float64Type, TimestampMillisecondType};
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::schema::{FieldSpec, FieldType};
use crate::time::parse_time_str;

/// One field of a staged record.
#[derive(Debug, Clone, Copy)]
pub(super) enum Val<'p> {
    Absent,
    Null,
    /// Text of a UUID, enum or free-text field.
    Str(&'p str),
    /// A UUID already parsed where it stood (by [`super::scan`]): its bytes as two little-endian words.
    Uuid([u64; 2]),
    /// An integer, or a time in epoch milliseconds.
    Int(i64),
    Float(f64),
    Bool(bool),
    /// The raw text of the JSON field.
    Json(&'p str),
    /// The items `start..end` of [`Staging::items`].
    List(u32, u32),
    /// A location object; `None` for an absent or `null` member.
    Loc {
        lat: Option<f64>,
        lon: Option<f64>,
        country: Option<&'p str>,
    },
}

/// The fields of the record being read, reused from record to record.
#[derive(Debug)]
pub(super) struct Staging<'p> {
    pub(super) vals: Vec<Val<'p>>,
    /// Items of list fields (all strings: a `null` item makes the record not ordinary, so that
    /// the record's own check reports it before anything else, as it always has).
    pub(super) items: Vec<&'p str>,
}

impl<'p> Staging<'p> {
    pub(super) fn new(fields: usize) -> Self {
        Self { vals: vec![Val::Absent; fields], items: Vec::new() }
    }
}

/// Reads `payload` into `staging`, or returns `false` when the record is not ordinary (see the
/// module documentation) and must go to arrow-json. [`super::scan`] tries first; what it is not
/// sure of, serde_json reads.
pub(super) fn stage<'p>(fields: &'static [FieldSpec], payload: &'p [u8], staging: &mut Staging<'p>) -> bool {
    staging.vals.fill(Val::Absent);
    staging.items.clear();
    // Validating once lets both readers borrow every string without checking it again; and
    // arrow-json refuses invalid UTF-8 anywhere in a string, serde_json only in the strings it returns.
    let Ok(text) = std::str::from_utf8(payload) else { return false };
    if super::scan::stage(fields, text, staging) {
        return true;
    }
    staging.vals.fill(Val::Absent);
    staging.items.clear();
    stage_serde(fields, text, staging)
}

/// [`stage`] with serde_json alone, on a cleared `staging`.
pub(super) fn stage_serde<'p>(fields: &'static [FieldSpec], text: &'p str, staging: &mut Staging<'p>) -> bool {
    let mut de = serde_json::Deserializer::from_str(text);
    Record { fields, staging }.deserialize(&mut de).and_then(|()| de.end()).is_ok()
}

/// The column of a top-level key.
#[inline]
fn field_index(fields: &[FieldSpec], key: &str) -> Option<usize> {
    let k = key.as_bytes();
    fields.iter().position(|f| {
        let n = f.name.as_bytes();
        n.len() == k.len() && n[0] == k[0] && n == k
    })
}

/// The error that sends a record to arrow-json; its text is never shown.
fn bail<E: serde::de::Error>() -> E {
    E::custom("not an ordinary record")
}

struct Record<'s, 'p> {
    fields: &'static [FieldSpec],
    staging: &'s mut Staging<'p>,
}

impl<'de> DeserializeSeed<'de> for Record<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Record<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // A key with escapes is not borrowed: serde_json refuses it here, and the record bails.
        while let Some(key) = map.next_key::<&'de str>()? {
            let Some(k) = field_index(self.fields, key) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if !matches!(self.staging.vals[k], Val::Absent) {
                // arrow-json keeps the last of duplicate fields; leave that to it.
                return Err(bail());
            }
            let val = map.next_value_seed(Field { ty: self.fields[k].ty, items: &mut self.staging.items })?;
            self.staging.vals[k] = val;
        }
        Ok(())
    }
}

/// One field's value, read as its column needs it.
struct Field<'s, 'p> {
    ty: FieldType,
    items: &'s mut Vec<&'p str>,
}

impl<'de> DeserializeSeed<'de> for Field<'_, 'de> {
    type Value = Val<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Val<'de>, D::Error> {
        match self.ty {
            // An object or `null`: anything else is the check's to reject (with its wording, and
            // before a missing field of the same record is noticed, as the decoder of record does).
            FieldType::Json => match <&'de RawValue>::deserialize(d)?.get() {
                raw if raw.starts_with('{') || raw == "null" => Ok(Val::Json(raw)),
                _ => Err(bail()),
            },
            FieldType::Float => {
                let raw = <&'de RawValue>::deserialize(d)?;
                float(raw.get()).map(|v| v.map_or(Val::Null, Val::Float))
            }
            FieldType::UuidList => d.deserialize_any(List(self.items)),
            FieldType::Location => d.deserialize_any(Location),
            ty => d.deserialize_any(Scalar(ty)),
        }
    }
}

/// A number as arrow-json reads it into a `Float64` column (`lexical_core`, through arrow-cast's
/// parser, which tries the text as it is first); `None` for `null`. Numbers in quotes, which
/// arrow-json would parse too, bail.
pub(super) fn float<E: serde::de::Error>(raw: &str) -> Result<Option<f64>, E> {
    match raw.as_bytes().first() {
        Some(b'n') => Ok(None),
        Some(b'-' | b'0'..=b'9') => Float64Type::parse(raw).map(Some).ok_or_else(bail),
        _ => Err(bail()),
    }
}

/// A scalar field: text, integer, time or boolean.
struct Scalar(FieldType);

impl<'de> Visitor<'de> for Scalar {
    type Value = Val<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an ordinary value")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Val<'de>, E> {
        Ok(Val::Null)
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Val<'de>, E> {
        match self.0 {
            FieldType::Uuid | FieldType::Str | FieldType::Action | FieldType::Auth | FieldType::InteractionKind => Ok(Val::Str(s)),
            // What arrow-json does with a time string; one it cannot parse fails its whole batch.
            FieldType::Time => parse_time_str(s).map(Val::Int).ok_or_else(bail),
            _ => Err(bail()),
        }
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Val<'de>, E> {
        match self.0 {
            FieldType::Bool => Ok(Val::Bool(v)),
            _ => Err(bail()),
        }
    }

    // Integer literals only: serde_json reads `-0`, fractions and exponents as floats, which
    // arrow-json converts in its own way (and `visit_f64` is left to refuse them).
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Val<'de>, E> {
        match self.0 {
            FieldType::Int | FieldType::Time => Ok(Val::Int(v)),
            _ => Err(bail()),
        }
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Val<'de>, E> {
        match (self.0, i64::try_from(v)) {
            (FieldType::Int | FieldType::Time, Ok(v)) => Ok(Val::Int(v)),
            _ => Err(bail()),
        }
    }
}

/// A list of UUID texts.
struct List<'s, 'p>(&'s mut Vec<&'p str>);

impl<'de> Visitor<'de> for List<'_, 'de> {
    type Value = Val<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of strings")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Val<'de>, E> {
        Ok(Val::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Val<'de>, A::Error> {
        let start = self.0.len() as u32;
        while let Some(item) = seq.next_element_seed(Item)? {
            self.0.push(item);
        }
        Ok(Val::List(start, self.0.len() as u32))
    }
}

/// A string; anything else (a `null` item among them) is not ordinary.
struct Item;

impl<'de> DeserializeSeed<'de> for Item {
    type Value = &'de str;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<&'de str, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Item {
    type Value = &'de str;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<&'de str, E> {
        Ok(s)
    }
}

/// A string or `null` (a location's country).
struct NullableStr;

impl<'de> DeserializeSeed<'de> for NullableStr {
    type Value = Option<&'de str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<&'de str>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NullableStr {
    type Value = Option<&'de str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or null")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<&'de str>, E> {
        Ok(None)
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Option<&'de str>, E> {
        Ok(Some(s))
    }
}

/// A location object `{lat, lon, country}`; other members are ignored, as arrow-json does.
struct Location;

impl<'de> Visitor<'de> for Location {
    type Value = Val<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a location object")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Val<'de>, E> {
        Ok(Val::Null)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Val<'de>, A::Error> {
        let (mut lat, mut lon, mut country) = (None, None, None);
        while let Some(key) = map.next_key::<&'de str>()? {
            let slot = match key {
                "lat" => &mut lat,
                "lon" => &mut lon,
                "country" => {
                    if country.is_some() {
                        return Err(bail());
                    }
                    country = Some(map.next_value_seed(NullableStr)?);
                    continue;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if slot.is_some() {
                return Err(bail());
            }
            *slot = Some(float(map.next_value::<&'de RawValue>()?.get())?);
        }
        Ok(Val::Loc { lat: lat.flatten(), lon: lon.flatten(), country: country.flatten() })
    }
}

/// Columns arrow-json would have produced for one chunk, for the fields the canonical schema keeps
/// as they are (built the way arrow-json builds them, so the arrays are the same to the byte).
/// One per field of a batch, built once per batch: the size of the location variant costs nothing.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(super) enum RawBuilder {
    Time(arrow::array::PrimitiveBuilder<TimestampMillisecondType>),
    Int(Int64Builder),
    Float(Float64Builder),
    Str(StringBuilder),
    Bool(BooleanBuilder),
    Location { lat: Float64Builder, lon: Float64Builder, country: StringBuilder, nulls: NullBufferBuilder },
}

impl RawBuilder {
    pub(super) fn new(ty: FieldType, rows: usize) -> Option<Self> {
        Some(match ty {
            FieldType::Time => RawBuilder::Time(arrow::array::PrimitiveBuilder::with_capacity(rows)),
            FieldType::Int => RawBuilder::Int(Int64Builder::with_capacity(rows)),
            FieldType::Float => RawBuilder::Float(Float64Builder::with_capacity(rows)),
            FieldType::Str => RawBuilder::Str(StringBuilder::with_capacity(rows, rows * 8)),
            FieldType::Bool => RawBuilder::Bool(BooleanBuilder::with_capacity(rows)),
            FieldType::Location => RawBuilder::Location {
                lat: Float64Builder::with_capacity(rows),
                lon: Float64Builder::with_capacity(rows),
                country: StringBuilder::with_capacity(rows, rows * 2),
                nulls: NullBufferBuilder::new(rows),
            },
            _ => return None,
        })
    }

    /// Appends one staged value (already known to be of the builder's type, or null).
    #[inline]
    pub(super) fn append(&mut self, v: Val<'_>) {
        match (self, v) {
            (RawBuilder::Time(b), Val::Int(n)) => b.append_value(n),
            (RawBuilder::Int(b), Val::Int(n)) => b.append_value(n),
            (RawBuilder::Float(b), Val::Float(x)) => b.append_value(x),
            (RawBuilder::Str(b), Val::Str(s)) => b.append_value(s),
            (RawBuilder::Bool(b), Val::Bool(x)) => b.append_value(x),
            (RawBuilder::Location { lat, lon, country, nulls }, Val::Loc { lat: a, lon: o, country: c }) => {
                lat.append_option(a);
                lon.append_option(o);
                country.append_option(c);
                nulls.append_non_null();
            }
            (RawBuilder::Time(b), _) => b.append_null(),
            (RawBuilder::Int(b), _) => b.append_null(),
            (RawBuilder::Float(b), _) => b.append_null(),
            (RawBuilder::Str(b), _) => b.append_null(),
            (RawBuilder::Bool(b), _) => b.append_null(),
            (RawBuilder::Location { lat, lon, country, nulls }, _) => {
                lat.append_null();
                lon.append_null();
                country.append_null();
                nulls.append_null();
            }
        }
    }

    /// The chunk's array; the builder is empty again afterwards.
    pub(super) fn finish(&mut self) -> ArrayRef {
        match self {
            RawBuilder::Time(b) => std::sync::Arc::new(b.finish()),
            RawBuilder::Int(b) => std::sync::Arc::new(b.finish()),
            RawBuilder::Float(b) => std::sync::Arc::new(b.finish()),
            RawBuilder::Str(b) => std::sync::Arc::new(b.finish()),
            RawBuilder::Bool(b) => std::sync::Arc::new(b.finish()),
            RawBuilder::Location { lat, lon, country, nulls } => {
                let children: Vec<ArrayRef> =
                    vec![std::sync::Arc::new(lat.finish()), std::sync::Arc::new(lon.finish()), std::sync::Arc::new(country.finish())];
                std::sync::Arc::new(StructArray::new(crate::schema::location_fields(), children, nulls.finish()))
            }
        }
    }
}
