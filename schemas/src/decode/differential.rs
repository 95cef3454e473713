//! Differential tests: the decoder must give exactly what the decoder before the chunk-wise
//! conversion gave ([`super::reference`]), for good and bad records of every topic: the same
//! batch (compared as Arrow IPC bytes too), the same sources, the same errors.

#![allow(clippy::unwrap_used)]

use arrow::ipc::writer::StreamWriter;
use proptest::prelude::*;

use super::reference;
use super::*;

/// Values per field type: the first `n` of each list are valid, the rest are not (or are unusual).
fn variants(ty: FieldType) -> (usize, &'static [&'static str]) {
    match ty {
        FieldType::Uuid => (
            3,
            &[
                r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c""#,
                r#""C4D5E6F7-1A2B-4C3D-8E9F-0A1B2C3D4E5F""#,
                r#""5f0c9f2e-8d1a-4c3b-9a77-2b1d3c4e5f60""#,
                r#""{9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c}""#,
                r#""9b2f1c3a0d4e4f5a8b6c7d8e9f0a1b2c""#,
                r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2g""#,
                r#""zz""#,
                "7",
                "null",
                r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2\u0063""#,
                r#""urn:uuid:9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c""#,
                r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2é""#,
            ],
        ),
        FieldType::Time => (
            4,
            &[
                "1795539600000",
                r#""2026-11-24T17:00:00.123Z""#,
                r#""2026-11-24T18:00:00.123+01:00""#,
                r#""2026-11-24T17:00:00""#,
                "1.7955396e12",
                "-1",
                r#""yesterday""#,
                "true",
                "null",
                "9223372036854775807",
                "9223372036854775808",
                "-9223372036854775808",
                "-0",
                r#""2026-11-24T17:00:00.123456789Z""#,
                r#""2026-11-24 17:00:00""#,
                r#""2026-11-24""#,
                r#""1795539600000""#,
            ],
        ),
        FieldType::Str => (5, &[r#""eu-1""#, r#""""#, r#""a\"b""#, r#""é\u00e9""#, r#""日本 é""#, "5", "null", "[]", "\"\u{1}\""]),
        FieldType::Bool => (2, &["true", "false", "null", r#""yes""#, "1"]),
        FieldType::Int => (2, &["27", "0", "-5", "1.5", r#""3""#, "1e3", "null", "-0", "9223372036854775808", "9223372036854775807"]),
        FieldType::Float => (2, &["1.5", "0", "-1", r#""2""#, "null", "1e400", "52.520000000000003", "1E5", "-0.0", "1e-400", "7"]),
        FieldType::Action => (3, &[r#""send""#, r#""connect""#, r#""configure""#, r#""teleport""#, "7", "null"]),
        FieldType::Auth => (2, &[r#""valid""#, r#""missing""#, r#""nope""#, "null"]),
        FieldType::InteractionKind => (2, &[r#""proximity""#, r#""sms""#, r#""telepathy""#, "null"]),
        FieldType::UuidList => (
            2,
            &[
                r#"["9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","e1f2a3b4-5c6d-4e7f-8a9b-0c1d2e3f4a5b"]"#,
                "[]",
                r#"["9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","x"]"#,
                "[1]",
                "[null]",
                r#""9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c""#,
                "null",
            ],
        ),
        FieldType::Location => (
            3,
            &[
                r#"{"lat":52.52,"lon":13.405,"country":"DE"}"#,
                "{}",
                r#"{"lat":1,"extra":[1]}"#,
                r#"{"lat":"north"}"#,
                r#"{"lat":123.0}"#,
                r#"{"lon":-200}"#,
                r#""x""#,
                "null",
                r#"{"lat":1,"lat":2}"#,
                r#"{"lat":null,"lon":1e2,"country":null}"#,
                r#"{"country":7}"#,
                r#"{"c\u006funtry":"DE"}"#,
            ],
        ),
        FieldType::Json => (
            4,
            &[
                r#"{"command":"off","level":3}"#,
                "{}",
                r#"{"payload":{"a":1},"s":"a\"b"}"#,
                r#"{ "a" : [ 1 , 2 ] , "é" : true }"#,
                "null",
                r#""off""#,
                "[1]",
                "01",
                r#"{"s":"\u00e9"}"#,
                r#"{"deep":[[[[{"a":[]}]]]]}"#,
            ],
        ),
    }
}

/// One record from generated choices: per field a variant (or absent), then a record-level twist.
/// `mode` decides how wrong it may be: below 160 every field is valid (so that most batches take
/// the fast path and twists matter), below 224 one field may be anything, else every field.
fn record(topic: InputTopic, choices: &[u8], mode: u8, twist: u8, rotate: usize, spaced: bool) -> String {
    let fields = topic.fields();
    let wild = usize::from(mode) % fields.len();
    let mut members: Vec<String> = Vec::new();
    for (k, spec) in fields.iter().enumerate() {
        let c = choices.get(k).copied().unwrap_or(0);
        let (valid, all) = variants(spec.ty);
        let absent = spec.required != Required::Yes && c % 3 == 0;
        let any = mode >= 224 || (mode >= 160 && k == wild);
        if absent || (any && c == 255) {
            continue;
        }
        let value = if any { all[usize::from(c) % all.len()] } else { all[usize::from(c) % valid] };
        members.push(if spaced { format!("\"{}\" : {value}", spec.name) } else { format!("\"{}\":{value}", spec.name) });
    }
    let n = members.len().max(1);
    members.rotate_left(rotate % n);
    let sep = if spaced { " ,\n " } else { "," };
    let mut text = format!("{{{}}}", members.join(sep));
    match twist {
        0..=219 => {}
        220 => {
            let mut half = text.len() / 2;
            while !text.is_char_boundary(half) {
                half -= 1;
            }
            text.truncate(half);
        }
        221 => text = format!("{text}{text}"),
        222 => text = format!("[{text}]"),
        223 => text.insert_str(1, r#""x":01,"#),
        224 => text.insert_str(1, r#""x":1 "y":2,"#),
        225 => text.insert_str(1, r#""payload":{"first":1},"#),
        226 => text.insert_str(1, r#""x":"\"payload\":{}","#),
        227 => text.insert_str(1, r#""x":[1,,2],"#),
        228 => text = format!(" \n{text}\t "),
        229 => text.insert_str(1, r#""ext":{"payload":"nested"},"#),
        230 => text = "42".into(),
        231 => text = String::new(),
        232 => text.insert_str(1, r#""x":1.,"#),
        233 => text.insert_str(1, "\"x\":\"\u{1}\","),
        234 => text.insert_str(1, r#""\u0069d":"x","#),
        235 => text.insert_str(1, r#""ext":"é\"\\","#),
        236 => text = text.replacen(r#""id""#, r#""i\u0064""#, 1),
        _ => {}
    }
    text
}

/// IPC stream bytes of a batch: buffers, validity and all.
fn ipc(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
    w.write(batch).unwrap();
    w.finish().unwrap();
    drop(w);
    out
}

fn assert_same(topic: InputTopic, records: &[String], decoder: &mut BatchDecoder, oracle: &mut reference::BatchDecoder) {
    let slices: Vec<&[u8]> = records.iter().map(String::as_bytes).collect();
    let new = decoder.decode(&slices);
    let old = oracle.decode(&slices);
    assert_eq!(new.rejected, old.rejected, "{topic:?} {records:#?}");
    assert_eq!(new.source, old.source, "{topic:?} {records:#?}");
    assert_eq!(new.batch, old.batch, "{topic:?} {records:#?}");
    assert!(ipc(&new.batch) == ipc(&old.batch), "{topic:?}: same values, different IPC bytes {records:#?}");
}

const TOPICS: [InputTopic; 4] = [InputTopic::Messages, InputTopic::Presence, InputTopic::Interactions, InputTopic::IdentityRequests];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn same_output_as_before(
        topic in 0..TOPICS.len(),
        records in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 15), any::<u8>(), any::<u8>(), 0..16usize, any::<bool>()),
            0..24,
        ),
    ) {
        let topic = TOPICS[topic];
        let records: Vec<String> =
            records.iter().map(|(c, mode, twist, rotate, spaced)| record(topic, c, *mode, *twist, *rotate, *spaced)).collect();
        // Fresh decoders, then the same ones again (reused arrow-json state).
        let (mut decoder, mut oracle) = (BatchDecoder::new(topic), reference::BatchDecoder::new(topic));
        assert_same(topic, &records, &mut decoder, &mut oracle);
        assert_same(topic, &records, &mut decoder, &mut oracle);
    }
}

/// Batches of several chunks, with bad records in some of them, good-only ones, and the bench's mix.
#[test]
fn same_output_as_before_across_chunks() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for topic in TOPICS {
        let (mut decoder, mut oracle) = (BatchDecoder::new(topic), reference::BatchDecoder::new(topic));
        for (size, bad_rate) in
            [(CHUNK_ROWS * 2 + 17, 0u64), (CHUNK_ROWS * 3, 0), (CHUNK_ROWS + 5, 1), (CHUNK_ROWS * 2 + 1, 50), (0, 0), (1, 0)]
        {
            let records: Vec<String> = (0..size)
                .map(|_| {
                    let bad = bad_rate > 0 && next() % 1000 < bad_rate;
                    let choices: Vec<u8> = (0..15).map(|_| next() as u8).collect();
                    let (mode, twist) = if bad { (next() as u8 | 0x80, next() as u8) } else { (0, 0) };
                    record(topic, &choices, mode, twist, (next() % 4) as usize, next() % 5 == 0)
                })
                .collect();
            assert_same(topic, &records, &mut decoder, &mut oracle);
        }
    }
}

/// Every record-level twist of `topic`'s records, and every variant of every field (one field at a
/// time, the others good).
fn odd_records(topic: InputTopic) -> Vec<String> {
    let mut odd: Vec<String> = (220..=236).map(|twist| record(topic, &[1; 15], 0, twist, 0, false)).collect();
    for (k, spec) in topic.fields().iter().enumerate() {
        for v in 0..variants(spec.ty).1.len() {
            let mut choices = [1u8; 15];
            // `mode` 160 + k lets exactly field k take any variant; 1 + 3v is never "absent".
            choices[k] = (1 + 3 * v) as u8;
            odd.push(record(topic, &choices, 160 + k as u8, 0, 0, false));
        }
    }
    odd
}

/// Every record-level twist and every variant of every field, each next to good records.
#[test]
fn same_output_as_before_on_every_variant_and_twist() {
    for topic in TOPICS {
        let (mut decoder, mut oracle) = (BatchDecoder::new(topic), reference::BatchDecoder::new(topic));
        let good = record(topic, &[1; 15], 0, 0, 0, false);
        for bad in &odd_records(topic) {
            assert_same(topic, &[good.clone(), bad.clone(), good.clone()], &mut decoder, &mut oracle);
            assert_same(topic, std::slice::from_ref(bad), &mut decoder, &mut oracle);
        }
    }
}

/// Ordinary chunks never reach arrow-json; a chunk with one out-of-the-ordinary record goes through
/// it whole, and the batch is still the same as before.
#[test]
fn only_unusual_chunks_go_through_arrow_json() {
    let topic = InputTopic::Messages;
    let plain = r#"{"id":"5f0c9f2e-8d1a-4c3b-9a77-2b1d3c4e5f60","ts":1795539600000,"action":"send","from":"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","to":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f","auth":"valid","broker":"eu-1"}"#;
    let escaped = plain.replace("eu-1", r"eu\u002d1");
    let quoted_number = plain.replace(r#""auth""#, r#""payload_bytes":"27","auth""#);
    let (mut decoder, mut oracle) = (BatchDecoder::new(topic), reference::BatchDecoder::new(topic));
    let mut records = vec![plain.to_owned(); CHUNK_ROWS * 2 + 3];
    assert_same(topic, &records, &mut decoder, &mut oracle);
    assert_eq!(decoder.arrow_chunks, 0);
    records[CHUNK_ROWS + 1] = escaped;
    records[CHUNK_ROWS * 2 + 2] = quoted_number;
    assert_same(topic, &records, &mut decoder, &mut oracle);
    // The quoted number is rejected by the check, and the rest of its chunk is ordinary again.
    assert_eq!(decoder.arrow_chunks, 1, "the second chunk");
}

/// A malformed record costs one check, of itself: the records before it in its chunk are kept as
/// the fast path read them, and the fast path goes on after it; nothing reaches arrow-json.
#[test]
fn a_malformed_record_is_checked_alone_and_its_chunk_stays_on_the_fast_path() {
    let topic = InputTopic::Messages;
    let plain = r#"{"id":"5f0c9f2e-8d1a-4c3b-9a77-2b1d3c4e5f60","ts":1795539600000,"action":"send","from":"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","to":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f","auth":"valid","broker":"eu-1"}"#;
    let (mut decoder, mut oracle) = (BatchDecoder::new(topic), reference::BatchDecoder::new(topic));
    let mut records = vec![plain.to_owned(); CHUNK_ROWS * 2];
    records[3] = r#"{"id":"#.to_owned();
    records[CHUNK_ROWS - 1] = plain.replace(r#""auth""#, r#""payload_bytes":"27","auth""#);
    records[CHUNK_ROWS + 500] = "[1,2]".to_owned();
    records[CHUNK_ROWS + 501] = plain.replace("send", "teleport");
    assert_same(topic, &records, &mut decoder, &mut oracle);
    assert_eq!(decoder.arrow_chunks, 0);
    // The three that are not JSON objects of the right types; the unknown action is ordinary JSON,
    // rejected by the conversion like any bad value.
    assert_eq!(decoder.checked_records, 3);
    let out = decoder.decode(&records.iter().map(|r| r.as_bytes()).collect::<Vec<_>>());
    assert_eq!(out.batch.num_rows(), CHUNK_ROWS * 2 - 4);
    assert_eq!(out.rejected.iter().map(|e| e.index).collect::<Vec<_>>(), [3, CHUNK_ROWS - 1, CHUNK_ROWS + 500, CHUNK_ROWS + 501]);
}

/// A record's verdict does not depend on its neighbours: alone, or in a chunk that a broken record
/// sends down the slow path, it is accepted or rejected the same way (and for the same reason).
#[test]
fn a_record_is_judged_the_same_whatever_its_neighbours() {
    let broken = String::from(r#"{"id":"#);
    for topic in TOPICS {
        let mut decoder = BatchDecoder::new(topic);
        for text in &odd_records(topic) {
            let alone = decoder.decode(&[text.as_bytes()]);
            let poisoned = decoder.decode(&[text.as_bytes(), broken.as_bytes()]);
            let verdict = |d: &DecodedBatch| d.rejected.iter().find(|e| e.index == 0).cloned();
            assert_eq!(verdict(&alone), verdict(&poisoned), "{topic:?} {text}");
            assert_eq!(alone.batch.num_rows(), poisoned.batch.num_rows(), "{topic:?} {text}");
        }
    }
}

/// A record with two faults, a payload that is not an object and a missing `to`: the decoder of
/// record reports the payload (a present field of the wrong type is found before a missing one),
/// and so must the fast path, alone or next to a broken record.
#[test]
fn a_record_with_two_faults_is_judged_by_the_first_the_check_finds() {
    let topic = InputTopic::Messages;
    let record = r#"{"id":"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","ts":1795539600000,"action":"send","from":"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","auth":"valid","payload":"off"}"#;
    let (mut decoder, mut oracle) = (BatchDecoder::new(topic), reference::BatchDecoder::new(topic));
    assert_same(topic, &[record.to_owned()], &mut decoder, &mut oracle);
    assert_same(topic, &[record.to_owned(), r#"{"id":"#.to_owned()], &mut decoder, &mut oracle);
    let out = decoder.decode(&[record.as_bytes()]);
    assert_eq!(out.rejected[0].field.as_deref(), Some("payload"));
}
