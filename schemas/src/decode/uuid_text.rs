//! UUID text to its 16 bytes, eight hex digits per step (SWAR: one `u64` holds eight characters).
//!
//! The hyphenated form (`8-4-4-4-12`, 36 bytes) is what every producer sends; it is decoded here
//! without a per-character table lookup, which made `Uuid::try_parse_ascii` most of the UUID
//! columns' cost. Every other length (simple, braced, URN) goes to the `uuid` crate, so the
//! accepted set is exactly `Uuid::try_parse_ascii`'s (checked by a test against it).

use uuid::Uuid;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Parses UUID text as `Uuid::try_parse_ascii` does, to the UUID's bytes.
#[inline]
pub(super) fn parse(text: &[u8]) -> Option<[u8; 16]> {
    match <&[u8; 36]>::try_from(text) {
        Ok(s) => parse_hyphenated(s).map(|[lo, hi]| {
            let mut out = [0u8; 16];
            out[..8].copy_from_slice(&lo.to_le_bytes());
            out[8..].copy_from_slice(&hi.to_le_bytes());
            out
        }),
        Err(_) => Uuid::try_parse_ascii(text).ok().map(Uuid::into_bytes),
    }
}

/// The hyphenated form's bytes as two little-endian words (bytes 0..8 and 8..16), computed in
/// registers: a caller that stores them as words does not reload bytes it just stored one by one.
#[inline(always)]
pub(super) fn parse_hyphenated(s: &[u8; 36]) -> Option<[u64; 2]> {
    if s[8] != b'-' || s[13] != b'-' || s[18] != b'-' || s[23] != b'-' {
        return None;
    }
    // The 32 hex digits as four words of eight: 0..8, 9..13 + 14..18, 19..23 + 24..28, 28..36.
    let w0 = le64(&s[0..8]);
    let w1 = le32(&s[9..13]) | le32(&s[14..18]) << 32;
    let w2 = le32(&s[19..23]) | le32(&s[24..28]) << 32;
    let w3 = le64(&s[28..36]);
    let (b0, b1, b2, b3) = (hex8(w0)?, hex8(w1)?, hex8(w2)?, hex8(w3)?);
    Some([u64::from(b0) | u64::from(b1) << 32, u64::from(b2) | u64::from(b3) << 32])
}

#[inline(always)]
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

#[inline(always)]
fn le32(b: &[u8]) -> u64 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u64::from(u32::from_le_bytes(a))
}

/// Eight ASCII hex digits (the first in the lowest byte) to four bytes (the first digit pair in the
/// lowest byte), or `None` when any of them is not `0-9`, `a-f` or `A-F`.
#[inline(always)]
fn hex8(x: u64) -> Option<u32> {
    // Each byte is below 0x80 (checked below), so adding at most 0x50 never carries into the next
    // byte, and a byte's high bit after `+ (0x80 - c)` says whether it was >= c.
    if x & HIGH != 0 {
        return None;
    }
    let lower = x | 0x2020_2020_2020_2020;
    let digit = (x + 0x50 * ONES) & !(x + 0x46 * ONES); // 0x30 <= b < 0x3A
    let alpha = (lower + 0x1F * ONES) & !(lower + 0x19 * ONES); // 0x61 <= b|0x20 < 0x67
    if (digit | alpha) & HIGH != HIGH {
        return None;
    }
    // Digits' low nibble is their value; letters' low nibble is 1..=6, nine short of theirs.
    let nibbles = (x & (0x0F * ONES)) + ((alpha & HIGH) >> 7) * 9;
    // Pair the nibbles into bytes (in the low byte of each 16-bit lane), then pack the lanes.
    let t = ((nibbles << 4) | (nibbles >> 8)) & 0x00FF_00FF_00FF_00FF;
    let t = (t | (t >> 8)) & 0x0000_FFFF_0000_FFFF;
    Some((t | (t >> 16)) as u32)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn reference(text: &[u8]) -> Option<[u8; 16]> {
        Uuid::try_parse_ascii(text).ok().map(Uuid::into_bytes)
    }

    #[test]
    fn agrees_with_the_uuid_crate_on_the_forms_and_edges() {
        let good = "936da01f-9abd-4d9d-80c7-02af85c822a8";
        let mut cases: Vec<Vec<u8>> = vec![
            good.into(),
            good.to_uppercase().into(),
            "00000000-0000-0000-0000-000000000000".into(),
            "ffffffff-ffff-ffff-ffff-ffffffffffff".into(),
            "FfFfFfFf-aAaA-9090-0a0A-fF09aF09Af09".into(),
            "936da01f9abd4d9d80c702af85c822a8".into(),
            "{936da01f-9abd-4d9d-80c7-02af85c822a8}".into(),
            "urn:uuid:936da01f-9abd-4d9d-80c7-02af85c822a8".into(),
            "936da01f-9abd-4d9d-80c7-02af85c822a".into(),
            "936da01f-9abd-4d9d-80c7-02af85c822a8a".into(),
            "936da01f+9abd-4d9d-80c7-02af85c822a8".into(),
            "936da01f-9abd-4d9d-80c7-02af85c822-8".into(),
            "".into(),
        ];
        // Every byte value in every position of the hyphenated form.
        for pos in 0..36 {
            for b in 0..=255u8 {
                let mut s = good.as_bytes().to_vec();
                s[pos] = b;
                cases.push(s);
            }
        }
        for c in &cases {
            assert_eq!(parse(c), reference(c), "{:?}", String::from_utf8_lossy(c));
        }
    }

    proptest! {
        #[test]
        fn agrees_with_the_uuid_crate(s in "[0-9a-fA-F/:@G`g-]{8}-[0-9a-gA-G]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}") {
            prop_assert_eq!(parse(s.as_bytes()), reference(s.as_bytes()));
        }

        #[test]
        fn agrees_with_the_uuid_crate_on_any_bytes(s in proptest::collection::vec(any::<u8>(), 36)) {
            prop_assert_eq!(parse(&s), reference(&s));
        }
    }
}
