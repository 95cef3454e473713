//! Hand-rolled JSON fragments for the simulator's hot path: UUID text, contract times, integers and
//! fixed-point degrees, appended to a reused buffer.
//!
//! Nothing here allocates or escapes: every string the simulator writes through these helpers is
//! ASCII without quotes or backslashes by construction, so escaping would be wasted work.

use uuid::Uuid;

/// Length of hyphenated UUID text.
pub(super) const UUID_LEN: usize = 36;

/// Hyphenated UUID text, lower or upper case.
pub(super) fn uuid_text(u: &Uuid, upper: bool) -> [u8; UUID_LEN] {
    let mut out = [0u8; UUID_LEN];
    if upper {
        u.hyphenated().encode_upper(&mut out);
    } else {
        u.hyphenated().encode_lower(&mut out);
    }
    out
}

/// `"<text>"`.
pub(super) fn quoted(buf: &mut Vec<u8>, text: &[u8]) {
    buf.push(b'"');
    buf.extend_from_slice(text);
    buf.push(b'"');
}

/// A non-negative integer in decimal.
pub(super) fn u64_text(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

/// A signed integer in decimal.
pub(super) fn i64_text(buf: &mut Vec<u8>, n: i64) {
    if n < 0 {
        buf.push(b'-');
    }
    u64_text(buf, n.unsigned_abs());
}

/// A number given in units of 1e-4 (degrees of latitude or longitude), as `52.5200`.
pub(super) fn fixed4(buf: &mut Vec<u8>, v: i64) {
    if v < 0 {
        buf.push(b'-');
    }
    let a = v.unsigned_abs();
    u64_text(buf, a / 10_000);
    buf.push(b'.');
    two(buf, ((a % 10_000) / 100) as u32);
    two(buf, (a % 100) as u32);
}

fn two(buf: &mut Vec<u8>, v: u32) {
    buf.push(b'0' + (v / 10 % 10) as u8);
    buf.push(b'0' + (v % 10) as u8);
}

/// Epoch milliseconds as the contract's RFC 3339 form, `2026-11-24T17:00:00.123Z` (unquoted).
pub(super) fn rfc3339(buf: &mut Vec<u8>, ms: i64) {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        // Outside four-digit years the fixed layout below would be wrong; no realistic event
        // time gets here, so the slow general formatter is fine.
        let text = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_owned());
        buf.extend_from_slice(text.as_bytes());
        return;
    }
    let y = y as u32;
    two(buf, y / 100);
    two(buf, y % 100);
    buf.push(b'-');
    two(buf, m);
    buf.push(b'-');
    two(buf, d);
    buf.push(b'T');
    let secs = (in_day / 1000) as u32;
    two(buf, secs / 3600);
    buf.push(b':');
    two(buf, secs / 60 % 60);
    buf.push(b':');
    two(buf, secs % 60);
    buf.push(b'.');
    let milli = (in_day % 1000) as u32;
    buf.push(b'0' + (milli / 100) as u8);
    two(buf, milli % 100);
    buf.push(b'Z');
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut buf = Vec::new();
        f(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[test]
    fn times_match_chrono_everywhere() {
        let mut ms: i64 = -86_400_000 * 800;
        while ms < 4_102_444_800_000 {
            let want =
                chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            assert_eq!(Some(text(|b| rfc3339(b, ms))), want, "{ms}");
            ms += 7_654_321_987;
        }
        assert_eq!(text(|b| rfc3339(b, 1_795_539_600_123)), "2026-11-24T17:00:00.123Z");
        assert_eq!(text(|b| rfc3339(b, 951_782_400_000)), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn numbers() {
        assert_eq!(text(|b| u64_text(b, 0)), "0");
        assert_eq!(text(|b| u64_text(b, u64::MAX)), u64::MAX.to_string());
        assert_eq!(text(|b| i64_text(b, -1_795_539_600_123)), "-1795539600123");
        assert_eq!(text(|b| fixed4(b, 525_200)), "52.5200");
        assert_eq!(text(|b| fixed4(b, -34_360)), "-3.4360");
        assert_eq!(text(|b| fixed4(b, -5)), "-0.0005");
    }
}
