//! The fast path's first try: one pass over the bytes of a record of the common shape, staging
//! exactly what [`super::direct`]'s serde_json reading would stage, or answering "not sure".
//!
//! serde_json is general: every key is scanned for escapes and then matched against the field
//! names one by one, every UUID is scanned as a string and parsed again at conversion. Here the
//! next key is first compared with the field that usually comes next, a UUID is parsed where it
//! stands (its closing quote is 37 bytes on), and strings are scanned eight bytes at a time.
//!
//! This scanner never decides that a record is not ordinary: on anything it does not handle
//! plainly (an escape, a control character in a string, a number that is not a short integer
//! where an integer is wanted, `-0`, a duplicate field, a value of an unexpected kind, deep
//! nesting, trailing text) it returns `false` and serde_json reads the record, so acceptance,
//! values and errors stay serde_json's (a proptest holds the two to the same staging).

use super::direct::{Staging, Val};
use super::uuid_text;
use crate::schema::{FieldSpec, FieldType};
use crate::time::parse_time_str;

/// Nesting this deep in a skipped value goes to serde_json (whose own limit is 128).
const MAX_DEPTH: usize = 64;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Stages `text` (one record) into `staging` (all [`Val::Absent`] and no items on entry); `false`
/// when serde_json must read it instead, with `staging` left to be reset.
pub(super) fn stage<'p>(fields: &'static [FieldSpec], text: &'p str, staging: &mut Staging<'p>) -> bool {
    let mut s = Scan { text, b: text.as_bytes(), pos: 0 };
    s.record(fields, staging).is_some()
}

struct Scan<'p> {
    text: &'p str,
    b: &'p [u8],
    pos: usize,
}

impl<'p> Scan<'p> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    #[inline(always)]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    /// Skips whitespace, then expects `c`.
    #[inline(always)]
    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        if self.peek()? == c {
            self.pos += 1;
            Some(())
        } else {
            None
        }
    }

    fn record(&mut self, fields: &'static [FieldSpec], staging: &mut Staging<'p>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.pos += 1;
        } else {
            let mut next = 0;
            loop {
                self.ws();
                let k = self.key(fields, next)?;
                self.eat(b':')?;
                self.ws();
                match k {
                    Some(k) => {
                        if !matches!(staging.vals[k], Val::Absent) {
                            return None;
                        }
                        self.value(fields[k].ty, &mut staging.items, &mut staging.vals[k])?;
                        next = k + 1;
                    }
                    None => self.skip(0)?,
                }
                self.ws();
                match self.peek()? {
                    b',' => self.pos += 1,
                    b'}' => {
                        self.pos += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.ws();
        (self.pos == self.b.len()).then_some(())
    }

    /// The column of the key at `pos` (`None` for a key of no column), trying field `guess` first:
    /// producers write the fields in the contract's order.
    #[inline(always)]
    fn key(&mut self, fields: &[FieldSpec], guess: usize) -> Option<Option<usize>> {
        if self.peek()? != b'"' {
            return None;
        }
        if let Some(f) = fields.get(guess) {
            let name = f.name.as_bytes();
            let start = self.pos + 1;
            if self.b.get(start + name.len()) == Some(&b'"') && same(&self.b[start..start + name.len()], name) {
                self.pos = start + name.len() + 1;
                return Some(Some(guess));
            }
        }
        let key = self.string()?.as_bytes();
        Some(fields.iter().position(|f| same(f.name.as_bytes(), key)))
    }

    /// A string without escapes or control characters at `pos` (its opening quote), borrowed.
    #[inline(always)]
    fn string(&mut self) -> Option<&'p str> {
        let start = self.pos + 1;
        let mut i = start;
        // Eight bytes at a time: the first `"`, `\` or byte below 0x20 (bytes of multi-byte
        // characters have their high bit set and match none of the three).
        while let Some(chunk) = self.b.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            let x = u64::from_le_bytes(w);
            let hit = zero_bytes(x ^ (ONES * u64::from(b'"'))) | zero_bytes(x ^ (ONES * u64::from(b'\\'))) | below(x, 0x20);
            if hit != 0 {
                i += (hit.trailing_zeros() / 8) as usize;
                return self.end_string(start, i);
            }
            i += 8;
        }
        while let Some(&c) = self.b.get(i) {
            if c == b'"' || c == b'\\' || c < 0x20 {
                return self.end_string(start, i);
            }
            i += 1;
        }
        None
    }

    #[inline(always)]
    fn end_string(&mut self, start: usize, i: usize) -> Option<&'p str> {
        if self.b[i] != b'"' {
            return None;
        }
        self.pos = i + 1;
        // The quotes are ASCII, so the slice is on character boundaries.
        self.text.get(start..i)
    }

    /// One field's value, as [`super::direct`]'s `Field` reads it, into `slot`. Written in place:
    /// returning the value made the caller copy it with wide loads from narrower stores just made,
    /// which the CPU cannot forward (a third of the scan's time).
    #[inline(always)]
    fn value(&mut self, ty: FieldType, items: &mut Vec<&'p str>, slot: &mut Val<'p>) -> Option<()> {
        let c = self.peek()?;
        if c == b'n' {
            self.literal(b"null")?;
            // The JSON field keeps the raw text of its `null`.
            *slot = if ty == FieldType::Json { Val::Json("null") } else { Val::Null };
            return Some(());
        }
        match ty {
            FieldType::Uuid if c == b'"' => {
                let start = self.pos + 1;
                if let Some(text) = self.b.get(start..start + 36).and_then(|t| <&[u8; 36]>::try_from(t).ok())
                    && self.b.get(start + 36) == Some(&b'"')
                    // Hex digits and hyphens only, when it parses: no quote or escape inside.
                    && let Some(bytes) = uuid_text::parse_hyphenated(text)
                {
                    self.pos = start + 37;
                    *slot = Val::Uuid(bytes);
                    return Some(());
                }
                *slot = Val::Str(self.string()?);
            }
            FieldType::Str | FieldType::Action | FieldType::Auth | FieldType::InteractionKind if c == b'"' => {
                *slot = Val::Str(self.string()?)
            }
            FieldType::Time if c == b'"' => {
                let s = self.string()?;
                *slot = Val::Int(rfc3339_ms(s).or_else(|| parse_time_str(s))?);
            }
            FieldType::Time | FieldType::Int => *slot = Val::Int(self.integer()?),
            FieldType::Bool => match c {
                b't' => {
                    self.literal(b"true")?;
                    *slot = Val::Bool(true);
                }
                b'f' => {
                    self.literal(b"false")?;
                    *slot = Val::Bool(false);
                }
                _ => return None,
            },
            FieldType::Float => {
                let (start, end) = self.number()?;
                *slot = Val::Float(super::direct::float::<serde_json::Error>(&self.text[start..end]).ok()??);
            }
            FieldType::Json if c == b'{' => {
                let start = self.pos;
                self.skip(0)?;
                *slot = Val::Json(&self.text[start..self.pos]);
            }
            FieldType::UuidList if c == b'[' => self.list(items, slot)?,
            FieldType::Location if c == b'{' => self.location(slot)?,
            _ => return None,
        }
        Some(())
    }

    /// `null`, `true` or `false` at `pos`.
    #[inline(always)]
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        if self.b.get(self.pos..end)? == word {
            self.pos = end;
            Some(())
        } else {
            None
        }
    }

    /// An integer literal of at most 18 digits (so it fits an `i64`), not `-0`, not followed by a
    /// fraction or an exponent: what serde_json hands to `visit_i64`/`visit_u64` as it is.
    #[inline(always)]
    fn integer(&mut self) -> Option<i64> {
        let negative = self.peek()? == b'-';
        let start = self.pos + usize::from(negative);
        let mut i = start;
        let mut v: i64 = 0;
        while let Some(d @ b'0'..=b'9') = self.b.get(i).copied() {
            if i - start == 18 {
                return None;
            }
            v = v * 10 + i64::from(d - b'0');
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || (digits > 1 && self.b[start] == b'0') || (negative && v == 0) {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.b.get(i) {
            return None;
        }
        self.pos = i;
        Some(if negative { -v } else { v })
    }

    /// A number of strict JSON at `pos`; its text's range.
    fn number(&mut self) -> Option<(usize, usize)> {
        let start = self.pos;
        let mut i = start;
        let digits = |b: &[u8], mut i: usize| {
            let from = i;
            while let Some(b'0'..=b'9') = b.get(i) {
                i += 1;
            }
            (i > from).then_some(i)
        };
        if self.b.get(i) == Some(&b'-') {
            i += 1;
        }
        match self.b.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => i = digits(self.b, i)?,
            _ => return None,
        }
        if self.b.get(i) == Some(&b'.') {
            i = digits(self.b, i + 1)?;
        }
        if let Some(b'e' | b'E') = self.b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = self.b.get(i) {
                i += 1;
            }
            i = digits(self.b, i)?;
        }
        self.pos = i;
        Some((start, i))
    }

    /// A list of strings at `pos` (its `[`); a `null` item is not ordinary (see [`Staging::items`]).
    fn list(&mut self, items: &mut Vec<&'p str>, slot: &mut Val<'p>) -> Option<()> {
        let start = items.len() as u32;
        self.pos += 1;
        self.ws();
        if self.peek()? == b']' {
            self.pos += 1;
            *slot = Val::List(start, start);
            return Some(());
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return None;
            }
            items.push(self.string()?);
            self.ws();
            match self.peek()? {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    *slot = Val::List(start, items.len() as u32);
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A location object at `pos` (its `{`): `lat`, `lon` (numbers or `null`) and `country` (a
    /// string or `null`), other members skipped.
    fn location(&mut self, slot: &mut Val<'p>) -> Option<()> {
        // `Some` once seen, whatever the value.
        let (mut lat, mut lon): (Option<Option<f64>>, Option<Option<f64>>) = (None, None);
        let mut country: Option<Option<&'p str>> = None;
        self.pos += 1;
        self.ws();
        if self.peek()? == b'}' {
            self.pos += 1;
        } else {
            loop {
                self.ws();
                if self.peek()? != b'"' {
                    return None;
                }
                let key = self.string()?;
                self.eat(b':')?;
                self.ws();
                match key {
                    "lat" | "lon" => {
                        let slot = if key == "lat" { &mut lat } else { &mut lon };
                        if slot.is_some() {
                            return None;
                        }
                        *slot = Some(if self.peek()? == b'n' {
                            self.literal(b"null")?;
                            None
                        } else {
                            let (start, end) = self.number()?;
                            super::direct::float::<serde_json::Error>(&self.text[start..end]).ok()?
                        });
                    }
                    "country" => {
                        if country.is_some() {
                            return None;
                        }
                        country = Some(match self.peek()? {
                            b'"' => Some(self.string()?),
                            b'n' => {
                                self.literal(b"null")?;
                                None
                            }
                            _ => return None,
                        });
                    }
                    _ => self.skip(1)?,
                }
                self.ws();
                match self.peek()? {
                    b',' => self.pos += 1,
                    b'}' => {
                        self.pos += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        *slot = Val::Loc { lat: lat.flatten(), lon: lon.flatten(), country: country.flatten() };
        Some(())
    }

    /// Skips one value of strict JSON at `pos`, nested `depth` deep.
    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'-' | b'0'..=b'9' => self.number().map(drop),
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.pos += 1;
                self.ws();
                if self.peek()? == close {
                    self.pos += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    if open == b'{' {
                        if self.peek()? != b'"' {
                            return None;
                        }
                        self.string()?;
                        self.eat(b':')?;
                        self.ws();
                    }
                    self.skip(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.pos += 1,
                        c if c == close => {
                            self.pos += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }
}

/// Byte-wise equality of short names (a call to `memcmp` costs more than the loop).
#[inline(always)]
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// The high bit of each byte of `x` that is zero (exact for the lowest such byte, which is all
/// that is used).
#[inline(always)]
fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & HIGH
}

/// The high bit of each byte of `x` below `n` (`n` ≤ 0x80; exact for the lowest such byte).
#[inline(always)]
fn below(x: u64, n: u8) -> u64 {
    x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` or `YYYY-MM-DDTHH:MM:SSZ` (years 1000 to 9999, seconds below 60),
/// the forms producers send, to epoch milliseconds; `None` for every other text, which
/// [`parse_time_str`] reads (a test holds the two to the same values).
fn rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let ms = match b.len() {
        24 if b[19] == b'.' && b[23] == b'Z' => num(&b[20..23])?,
        20 if b[19] == b'Z' => 0,
        _ => return None,
    };
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let (hour, minute, second) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if year < 1000 || day == 0 || day > month_days || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), March-based years.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + ms)
}

/// ASCII digits to their value.
#[inline(always)]
fn num(d: &[u8]) -> Option<i64> {
    d.iter().try_fold(0i64, |v, &c| c.is_ascii_digit().then(|| v * 10 + i64::from(c - b'0')))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;
    use crate::schema::InputTopic;

    #[test]
    fn times_match_the_decoder_of_record() {
        for s in [
            "2026-11-24T17:00:00.123Z",
            "2026-11-24T17:00:00Z",
            "1970-01-01T00:00:00.000Z",
            "2000-02-29T23:59:59.999Z",
            "1900-02-29T00:00:00Z",
            "2001-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-32T00:00:00Z",
            "2026-11-24T24:00:00Z",
            "2026-11-24T23:60:00Z",
            "2026-11-24T23:59:60Z",
            "1000-01-01T00:00:00.001Z",
            "0999-12-31T23:59:59Z",
            "9999-12-31T23:59:59.999Z",
            "2026-11-24t17:00:00Z",
            "2026-11-24T17:00:00z",
        ] {
            if let Some(ms) = rfc3339_ms(s) {
                assert_eq!(Some(ms), parse_time_str(s), "{s}");
            }
        }
        assert_eq!(rfc3339_ms("2026-11-24T17:00:00.123Z"), Some(1_795_539_600_123));
    }

    proptest! {
        #[test]
        fn times_match_the_decoder_of_record_everywhere(
            y in 0u32..10_000, mo in 0u32..14, d in 0u32..33, h in 0u32..26, mi in 0u32..62, s in 0u32..62, ms in 0u32..1000, frac in any::<bool>(),
        ) {
            let text = if frac {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
            } else {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
            };
            if let Some(v) = rfc3339_ms(&text) {
                prop_assert_eq!(Some(v), parse_time_str(&text), "{}", text);
            }
        }

        /// Whatever the scanner stages, serde_json stages the same; and it stages the common shape.
        #[test]
        fn stages_what_serde_json_stages(text in record_text()) {
            let fields = InputTopic::Messages.fields();
            let mut fast = Staging::new(fields.len());
            let mut slow = Staging::new(fields.len());
            if stage(fields, &text, &mut fast) {
                prop_assert!(super::super::direct::stage_serde(fields, &text, &mut slow), "{}", text);
                prop_assert!(same_staging(fields, &fast, &slow), "{}\n{:?}\n{:?}", text, fast, slow);
            }
        }
    }

    /// The same fields, a pre-parsed UUID equal to the text serde_json stages.
    fn same_staging(fields: &[FieldSpec], a: &Staging<'_>, b: &Staging<'_>) -> bool {
        fn list<'a>(s: &Staging<'a>, v: Val<'_>) -> Option<Vec<&'a str>> {
            match v {
                Val::List(x, y) => Some(s.items[x as usize..y as usize].to_vec()),
                _ => None,
            }
        }
        fields.iter().enumerate().all(|(k, _)| match (a.vals[k], b.vals[k]) {
            (Val::Uuid([lo, hi]), Val::Str(t)) => {
                uuid_text::parse(t.as_bytes()) == Some((u128::from(lo) | u128::from(hi) << 64).to_le_bytes())
            }
            (x @ Val::List(..), y @ Val::List(..)) => list(a, x) == list(b, y),
            (Val::Float(x), Val::Float(y)) => x.to_bits() == y.to_bits(),
            (Val::Loc { lat, lon, country }, Val::Loc { lat: la, lon: lo, country: c }) => {
                lat.map(f64::to_bits) == la.map(f64::to_bits) && lon.map(f64::to_bits) == lo.map(f64::to_bits) && country == c
            }
            (x, y) => format!("{x:?}") == format!("{y:?}"),
        })
    }

    /// Message records from pieces of valid and invalid JSON, in and out of order, spaced or not.
    fn record_text() -> impl Strategy<Value = String> {
        let value = prop::sample::select(vec![
            r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c""#,
            r#""9B2F1C3A-0D4E-4F5A-8B6C-7D8E9F0A1B2C""#,
            r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2""#,
            r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2cc""#,
            r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b"c""#,
            r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b\"c""#,
            r#""{9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c}""#,
            r#""2026-11-24T17:00:00.123Z""#,
            r#""2026-11-24T17:00:00Z""#,
            r#""2026-11-24T18:00:00.123+01:00""#,
            r#""2026-02-30T17:00:00Z""#,
            "1795539600000",
            "0",
            "-0",
            "-5",
            "01",
            "1.5",
            "1e3",
            "-1.5e-3",
            "1E+2",
            "999999999999999999",
            "9999999999999999999",
            "-9223372036854775808",
            "true",
            "false",
            "null",
            "nul",
            "tru",
            r#""send""#,
            r#""connect""#,
            r#""valid""#,
            r#""eu-1""#,
            r#""""#,
            r#""é日本""#,
            "\"a\u{1}b\"",
            r#""a\nb""#,
            r#"{"command":"off","level":3}"#,
            r#"{ "a" : [ 1 , 2 ] , "é" : true }"#,
            r#"{"deep":[[[[{"a":[]}]]]]}"#,
            "{}",
            "[]",
            "[1,]",
            "[1 2]",
            r#"["9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","e1f2a3b4-5c6d-4e7f-8a9b-0c1d2e3f4a5b"]"#,
            r#"["9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c",null]"#,
            r#"[ "x" , "y" ]"#,
            r#"{"lat":52.52,"lon":13.405,"country":"DE"}"#,
            r#"{"lat":null,"lon":1e2,"country":null,"alt":[1]}"#,
            r#"{"lat":1,"lat":2}"#,
            r#"{"country":"DE","country":"FR"}"#,
            r#"{"lat":"north"}"#,
            r#"{"country":7}"#,
            r#"{"c\u006funtry":"DE"}"#,
            r#"{"lat":1,}"#,
        ]);
        let key = prop::sample::select(vec![
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
            "extra",
            "i\\u0064",
            "idx",
            "",
        ]);
        let ws = prop::sample::select(vec!["", "", "", " ", "\n\t ", "\r"]);
        let member = (key, ws.clone(), value, ws.clone());
        (prop::collection::vec(member, 0..18), ws, prop::sample::select(vec!["", "", "", "x", "}", ","]), any::<bool>()).prop_map(
            |(members, w, tail, ordered)| {
                let mut members = members;
                if ordered {
                    let order = |k: &str| InputTopic::Messages.fields().iter().position(|f| f.name == k).unwrap_or(99);
                    members.sort_by_key(|m| order(m.0));
                    members.dedup_by_key(|m| m.0);
                }
                let body: Vec<String> = members.iter().map(|(k, w1, v, w2)| format!("{w1}\"{k}\"{w2}:{w1}{v}{w2}")).collect();
                format!("{w}{{{}}}{w}{tail}", body.join(","))
            },
        )
    }
}
