//! Finding one top-level field's raw JSON text (the message `payload`) without serde_json.
//!
//! arrow-json cannot keep a nested object as text, so the field is found in the record's bytes.
//! The decoder has always done that with serde_json, which also checks the whole record against
//! the strict JSON grammar (arrow-json's tape is more lenient, e.g. about commas and numbers), and
//! that check decides whether the record is accepted. This scanner walks the record once, with no
//! value built and no key matched through serde, and answers only when the record lies in a subset
//! of JSON that serde_json certainly accepts in the same way: ASCII, no escapes, the strict grammar
//! for numbers, literals and separators, nesting of at most [`MAX_DEPTH`], the field at most once.
//! For anything else it answers `None` and the caller asks serde_json, so the accepted records and
//! the errors are exactly serde_json's.

/// Deepest nesting the scanner follows (serde_json's limit is 128).
const MAX_DEPTH: u32 = 64;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Where the value of the top-level field `key` is in `record`: `Some(None)` when the record has
/// no such field, `Some(Some(range))` for its value's bytes, `None` when the scanner cannot vouch
/// for serde_json's answer.
pub(super) fn find(record: &[u8], key: &[u8]) -> Option<Option<std::ops::Range<usize>>> {
    let mut c = Cursor { b: record, i: 0 };
    c.ws();
    c.expect(b'{')?;
    c.ws();
    let mut found = None;
    if c.peek() == Some(b'}') {
        c.i += 1;
    } else {
        loop {
            let start = c.i;
            c.string()?;
            let name = &record[start + 1..c.i - 1];
            c.ws();
            c.expect(b':')?;
            c.ws();
            let value_start = c.i;
            c.value(1)?;
            if name == key {
                if found.is_some() {
                    // serde_json refuses a duplicate field; let it say so.
                    return None;
                }
                found = Some(value_start..c.i);
            }
            c.ws();
            match c.next()? {
                b',' => c.ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    c.ws();
    (c.i == record.len()).then_some(found)
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    #[inline(always)]
    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    #[inline(always)]
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string at the cursor: only printable ASCII, no escapes.
    #[inline(always)]
    fn string(&mut self) -> Option<()> {
        self.expect(b'"')?;
        // Eight bytes at a time up to the first byte that is `"`, `\`, a control character or
        // not ASCII. Each mask's lowest set bit is exact (false hits only ever follow a true one).
        while let Some(word) = self.b.get(self.i..self.i + 8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(word);
            let x = u64::from_le_bytes(a);
            let quote = x ^ (0x22 * ONES);
            let backslash = x ^ (0x5C * ONES);
            let special =
                (quote.wrapping_sub(ONES) & !quote) | (backslash.wrapping_sub(ONES) & !backslash) | (x.wrapping_sub(0x20 * ONES) & !x) | x;
            let special = special & HIGH;
            if special != 0 {
                self.i += (special.trailing_zeros() / 8) as usize;
                return self.string_end();
            }
            self.i += 8;
        }
        while let Some(c) = self.peek() {
            if c == b'"' || c == b'\\' || !(0x20..0x80).contains(&c) {
                return self.string_end();
            }
            self.i += 1;
        }
        None
    }

    #[inline(always)]
    fn string_end(&mut self) -> Option<()> {
        self.expect(b'"')
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            (self.digits() > 0).then_some(())?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            (self.digits() > 0).then_some(())?;
        }
        // serde_json reads `01` as an error, not as two numbers.
        (!matches!(self.peek(), Some(b'0'..=b'9'))).then_some(())
    }

    fn literal(&mut self, text: &[u8]) -> Option<()> {
        let end = self.i + text.len();
        (self.b.get(self.i..end)? == text).then_some(())?;
        self.i = end;
        Some(())
    }

    fn value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b'-' | b'0'..=b'9' => self.number(),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'[' if depth < MAX_DEPTH => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next()? {
                        b',' => self.ws(),
                        b']' => return Some(()),
                        _ => return None,
                    }
                }
            }
            b'{' if depth < MAX_DEPTH => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.string()?;
                    self.ws();
                    self.expect(b':')?;
                    self.ws();
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next()? {
                        b',' => self.ws(),
                        b'}' => return Some(()),
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;
    use serde_json::value::RawValue;

    use super::*;

    /// What the decoder did before: serde_json over the record, borrowing the field's raw text.
    fn serde(record: &[u8]) -> Result<Option<String>, ()> {
        #[derive(serde::Deserialize)]
        struct Holder<'a> {
            #[serde(borrow, default)]
            payload: Option<&'a RawValue>,
        }
        serde_json::from_slice::<Holder<'_>>(record).map(|h| h.payload.map(|r| r.get().to_owned())).map_err(|_| ())
    }

    /// The scanner's answer must be serde_json's whenever it gives one.
    fn check(record: &[u8]) -> bool {
        let Some(found) = find(record, b"payload") else { return false };
        let text = found.map(|r| String::from_utf8(record[r].to_vec()).unwrap());
        // serde_json reads a `null` field as absent.
        let text = text.filter(|t| t != "null");
        assert_eq!(Ok(text), serde(record), "{}", String::from_utf8_lossy(record));
        true
    }

    #[test]
    fn answers_for_ordinary_records() {
        for r in [
            r#"{"id":"x","payload":{"command":"off","level":3},"n":-1.5e+3}"#,
            r#" { "payload" : { "a" : [ 1 , 2 , { } , [ ] ] } , "b" : true } "#,
            r#"{"a":null,"b":false,"c":0,"d":0.25,"e":[{"payload":1}]}"#,
            r#"{}"#,
            r#"{"payload":null}"#,
            r#"{"payload":"off"}"#,
            r#"{"payload":[1]}"#,
            r#"{"payload_type":"x","payloads":{}}"#,
        ] {
            assert!(check(r.as_bytes()), "no answer for {r}");
        }
    }

    #[test]
    fn defers_to_serde_json_when_unsure() {
        for r in [
            r#"{"payload":{},"payload":{}}"#,
            r#"{"a":"\"payload\":1","payload":{}}"#,
            r#"{"a":"é","payload":{}}"#,
            "{\"a\":\"\u{1}\",\"payload\":{}}",
            r#"{"a":1 "payload":{}}"#,
            r#"{"a":1,,"payload":{}}"#,
            r#"{"a":01,"payload":{}}"#,
            r#"{"a":1.,"payload":{}}"#,
            r#"{"a":1e,"payload":{}}"#,
            r#"{"a":+1,"payload":{}}"#,
            r#"{"a":[1,],"payload":{}}"#,
            r#"{"a":tru,"payload":{}}"#,
            r#"{"payload":{}} x"#,
            r#"{"payload":{}"#,
        ] {
            assert!(find(r.as_bytes(), b"payload").is_none(), "answered for {r}");
        }
        let deep = format!(r#"{{"payload":{}{}}}"#, "[".repeat(70), "]".repeat(70));
        assert!(find(deep.as_bytes(), b"payload").is_none());
    }

    proptest! {
        /// Random JSON-ish text: whenever the scanner answers, serde_json agrees.
        #[test]
        fn agrees_with_serde_json(parts in proptest::collection::vec(prop_oneof![
            Just("{"), Just("}"), Just("["), Just("]"), Just(","), Just(":"), Just(" "), Just("\n"),
            Just("\"payload\""), Just("\"a\""), Just("\"\\\"\""), Just("1"), Just("-0.5e3"), Just("01"),
            Just("true"), Just("null"), Just("\"é\""), Just("{\"payload\":"), Just("{\"a\":1,\"payload\":{\"b\":[]}}"),
        ], 0..24)) {
            let record = parts.concat();
            check(record.as_bytes());
        }
    }
}
