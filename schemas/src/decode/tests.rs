#![allow(clippy::unwrap_used)]

use arrow::array::{Array, AsArray, FixedSizeBinaryArray};
use arrow::datatypes::{TimestampMillisecondType, UInt8Type};

use super::*;

/// The contract's input examples, embedded at compile time: a test binary never depends on the
/// path of the checkout it was built in.
const FIXTURES: &[(&str, &[u8])] = &[
    ("message-send.json", include_bytes!("../../tests/fixtures/message-send.json")),
    ("message-connect.json", include_bytes!("../../tests/fixtures/message-connect.json")),
    ("presence.json", include_bytes!("../../tests/fixtures/presence.json")),
    ("interaction.json", include_bytes!("../../tests/fixtures/interaction.json")),
    ("identity-request.json", include_bytes!("../../tests/fixtures/identity-request.json")),
    ("registry-lighting.json", include_bytes!("../../tests/fixtures/registry-lighting.json")),
];

fn fixture(name: &str) -> Vec<u8> {
    FIXTURES.iter().find(|(n, _)| *n == name).map(|(_, bytes)| bytes.to_vec()).unwrap_or_else(|| panic!("no fixture {name}"))
}

fn decode(topic: InputTopic, records: &[&[u8]]) -> DecodedBatch {
    BatchDecoder::new(topic).decode(records)
}

const SEND: &str = r#"{"id":"5f0c9f2e-8d1a-4c3b-9a77-2b1d3c4e5f60","ts":"2026-11-24T17:00:00.123Z","action":"send","from":"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","to":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f","auth":"valid"}"#;

fn with(field_and_value: &str) -> String {
    // Appends a field SEND does not have; variants of existing fields use string replacement.
    format!("{},{}}}", &SEND[..SEND.len() - 1], field_and_value)
}

#[test]
fn every_contract_example_decodes() {
    for (topic, file) in [
        (InputTopic::Messages, "message-send.json"),
        (InputTopic::Messages, "message-connect.json"),
        (InputTopic::Presence, "presence.json"),
        (InputTopic::Interactions, "interaction.json"),
        (InputTopic::IdentityRequests, "identity-request.json"),
    ] {
        let bytes = fixture(file);
        let out = decode(topic, &[&bytes]);
        assert!(out.rejected.is_empty(), "{file}: {:?}", out.rejected);
        assert_eq!(out.batch.num_rows(), 1, "{file}");
        assert_eq!(out.batch.schema(), topic.schema(), "{file}");
    }
    let reg = fixture("registry-lighting.json");
    let rec = crate::registry::RegistryRecord::from_json(0, &reg).unwrap();
    assert_eq!(rec.profiles.len(), 2);
    assert_eq!(rec.device_type.as_deref(), Some("smart-bulb"));
}

#[test]
fn message_columns_are_canonical() {
    let send = fixture("message-send.json");
    let connect = fixture("message-connect.json");
    let out = decode(InputTopic::Messages, &[&send, &connect]);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let b = &out.batch;
    // Both time forms land on the same axis.
    let ts = b.column_by_name("ts").unwrap().as_primitive::<TimestampMillisecondType>();
    assert_eq!(ts.value(0), 1_795_539_600_123);
    assert_eq!(ts.value(1), 1_795_539_600_123);
    let action = b.column_by_name("action").unwrap().as_dictionary::<UInt8Type>();
    assert_eq!(action.keys().value(0), Action::Send.code());
    assert_eq!(action.keys().value(1), Action::Connect.code());
    let from: &FixedSizeBinaryArray = b.column_by_name("from").unwrap().as_fixed_size_binary();
    assert_eq!(Uuid::from_slice(from.value(0)).unwrap().to_string(), "9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c");
    let to = b.column_by_name("to").unwrap();
    assert!(to.is_valid(0) && to.is_null(1), "connect has no target");
    let route = b.column_by_name("route").unwrap().as_list::<i32>();
    assert_eq!(route.value(0).len(), 2);
    assert_eq!(b.column_by_name("payload").unwrap().as_string::<i32>().value(0), r#"{"command":"off"}"#);
    let token = b.column_by_name("target_token").unwrap().as_boolean();
    assert_eq!(token.null_count(), 0, "absent target_token is false, not null");
    assert!(!token.value(0));
    assert_eq!(out.source, vec![0, 1]);
}

#[test]
fn upper_case_uuids_are_accepted_and_normalised() {
    let upper = SEND.replace("9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c", "9B2F1C3A-0D4E-4F5A-8B6C-7D8E9F0A1B2C");
    let out = decode(InputTopic::Messages, &[upper.as_bytes(), SEND.as_bytes()]);
    assert!(out.rejected.is_empty());
    let from: &FixedSizeBinaryArray = out.batch.column_by_name("from").unwrap().as_fixed_size_binary();
    assert_eq!(from.value(0), from.value(1));
}

/// Each malformed kind, in the middle of good records: the bad one is rejected with the field and
/// reason, every good one survives in order.
#[test]
fn malformed_records_are_rejected_precisely_and_good_ones_kept() {
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        (r#"{"id": "5f0c9f2e-8d1a"#.to_owned(), None, "invalid JSON"),
        ("[1,2,3]".to_owned(), None, "an array"),
        ("42".to_owned(), None, "number 42"),
        (SEND.replace(r#""auth":"valid""#, r#""auth":"nope""#), Some("auth"), "\"nope\""),
        (SEND.replace(r#","auth":"valid""#, ""), Some("auth"), "nothing"),
        (SEND.replace(r#""ts":"2026-11-24T17:00:00.123Z""#, r#""ts":"yesterday""#), Some("ts"), "\"yesterday\""),
        (SEND.replace(r#""ts":"2026-11-24T17:00:00.123Z""#, r#""ts":true"#), Some("ts"), "true"),
        (SEND.replace("9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c", "not-a-uuid"), Some("from"), "\"not-a-uuid\""),
        (SEND.replace(r#""action":"send""#, r#""action":"teleport""#), Some("action"), "\"teleport\""),
        (SEND.replace(r#""action":"send""#, r#""action":7"#), Some("action"), "7"),
        (SEND.replace(r#","to":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f""#, ""), Some("to"), "required for every action but connect"),
        (with(r#""target_token":"yes""#), Some("target_token"), "\"yes\""),
        (with(r#""route":["9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","x"]"#), Some("route[1]"), "\"x\""),
        (with(r#""route":[1]"#), Some("route[0]"), "1"),
        (with(r#""route":"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c""#), Some("route"), "9b2f1c3a"),
        (with(r#""location":{"lat":"north"}"#), Some("location.lat"), "\"north\""),
        (with(r#""location":{"lat":123.0}"#), Some("location.lat"), "123.0"),
        (with(r#""payload":"off""#), Some("payload"), "\"off\""),
        (with(r#""payload_bytes":-5"#), Some("payload_bytes"), "-5"),
        (format!("{SEND}{SEND}"), None, "trailing characters"),
        (SEND[..40].to_owned(), None, "invalid JSON"),
    ];
    for (bad, field, found) in &cases {
        let records: Vec<&[u8]> = vec![SEND.as_bytes(), bad.as_bytes(), SEND.as_bytes()];
        let out = decode(InputTopic::Messages, &records);
        assert_eq!(out.batch.num_rows(), 2, "good records survive next to {bad}");
        assert_eq!(out.source, vec![0, 2]);
        assert_eq!(out.rejected.len(), 1, "{bad}: {:?}", out.rejected);
        let e = &out.rejected[0];
        assert_eq!(e.index, 1);
        assert_eq!(e.field.as_deref(), *field, "{bad}: {e}");
        let text = e.to_string();
        assert!(text.contains(found) || e.expected.contains(found), "{bad}: {text} lacks {found}");
    }
}

#[test]
fn error_messages_read_like_the_style_guide() {
    let bad = SEND.replace(r#""ts":"2026-11-24T17:00:00.123Z""#, r#""ts":"yesterday""#);
    let records: Vec<&[u8]> = (0..18).map(|i| if i == 17 { bad.as_bytes() } else { SEND.as_bytes() }).collect();
    let out = decode(InputTopic::Messages, &records);
    assert_eq!(out.rejected[0].to_string(), r#"field `ts` of record 17: expected RFC 3339 or epoch ms, found "yesterday""#);
}

#[test]
fn oversized_records_are_rejected_unread() {
    let big = with(&format!(r#""broker":"{}""#, "x".repeat(2000)));
    let out = BatchDecoder::new(InputTopic::Messages).with_max_record_bytes(1000).decode(&[big.as_bytes(), SEND.as_bytes()]);
    assert_eq!(out.batch.num_rows(), 1);
    assert_eq!(out.rejected[0].index, 0);
    assert!(out.rejected[0].to_string().contains("at most 1000 bytes"), "{}", out.rejected[0]);
    assert!(out.rejected[0].found.len() < 100, "the error never carries the payload");
}

#[test]
fn many_bad_records_in_one_batch() {
    let bad_uuid = SEND.replace("9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c", "zz");
    let bad_json = "{".to_owned();
    let records: Vec<&[u8]> = (0..100)
        .map(|i| match i % 10 {
            3 => bad_uuid.as_bytes(),
            7 => bad_json.as_bytes(),
            _ => SEND.as_bytes(),
        })
        .collect();
    let out = decode(InputTopic::Messages, &records);
    assert_eq!(out.batch.num_rows(), 80);
    assert_eq!(out.rejected.len(), 20);
    assert!(out.rejected.windows(2).all(|w| w[0].index < w[1].index), "rejections in input order");
    assert!(out.source.iter().all(|s| s % 10 != 3 && s % 10 != 7));
}

#[test]
fn a_reused_decoder_recovers_from_a_poisoned_batch() {
    let mut d = BatchDecoder::new(InputTopic::Messages);
    let half = &SEND.as_bytes()[..50];
    assert_eq!(d.decode(&[SEND.as_bytes(), half]).batch.num_rows(), 1);
    let out = d.decode(&[SEND.as_bytes(), SEND.as_bytes()]);
    assert!(out.rejected.is_empty(), "no leftovers of the half record: {:?}", out.rejected);
    assert_eq!(out.batch.num_rows(), 2);
}

#[test]
fn batches_larger_than_a_chunk() {
    let records: Vec<&[u8]> = (0..CHUNK_ROWS + 10).map(|_| SEND.as_bytes()).collect();
    let out = decode(InputTopic::Messages, &records);
    assert_eq!(out.batch.num_rows(), CHUNK_ROWS + 10);
    assert!(out.rejected.is_empty());
}

#[test]
fn empty_batch() {
    let out = decode(InputTopic::Presence, &[]);
    assert_eq!(out.batch.num_rows(), 0);
    assert_eq!(out.batch.schema(), InputTopic::Presence.schema());
}

#[test]
fn other_topics_validate_their_fields() {
    let presence = br#"{"ts":1795539598000,"uuid":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f"}"#;
    let out = decode(InputTopic::Presence, &[presence]);
    assert_eq!(out.rejected[0].field.as_deref(), Some("online"));
    let interaction = String::from_utf8(fixture("interaction.json")).unwrap().replace("proximity", "telepathy");
    let out = decode(InputTopic::Interactions, &[interaction.as_bytes()]);
    assert_eq!(out.rejected[0].field.as_deref(), Some("kind"));
    let request = br#"{"id":"a0b1c2d3-e4f5-4a6b-8c7d-8e9fa0b1c2d3","ts":"2026-11-24T17:05:00Z","device":"11111111-2222-4333-8444-555555555555","window":"ten"}"#;
    let out = decode(InputTopic::IdentityRequests, &[request]);
    assert_eq!(out.rejected[0].field.as_deref(), Some("window"));
}

#[test]
fn unknown_fields_are_ignored() {
    let extra = with(r#""platform_extension":{"a":[1,2]}"#);
    let out = decode(InputTopic::Messages, &[extra.as_bytes()]);
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
}

mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever bytes arrive, the decoder accounts for every record exactly once and never panics.
        #[test]
        fn every_record_is_accounted_for(noise in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20)) {
            let mut records: Vec<&[u8]> = noise.iter().map(Vec::as_slice).collect();
            records.push(SEND.as_bytes());
            let out = decode(InputTopic::Messages, &records);
            prop_assert_eq!(out.batch.num_rows() + out.rejected.len(), records.len());
            prop_assert!(out.source.contains(&((records.len() - 1) as u32)));
        }
    }
}

/// A record with a `null` route item and no `to` breaks two rules; the route item is the one
/// reported (the record's type check comes before the required fields), whether the record is read
/// on the fast path or checked because a neighbour in its chunk is not ordinary (found by the
/// differential test).
#[test]
fn a_null_route_item_is_reported_before_a_missing_to_on_either_path() {
    let bad = SEND.replace(r#","to":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f""#, r#","route":[null]"#);
    // An escaped key: well-formed, but not read by the fast path, so what follows it is checked.
    let unusual = SEND.replace(r#""id""#, r#""i\u0064""#);
    for records in [vec![SEND, bad.as_str(), SEND], vec![unusual.as_str(), bad.as_str(), SEND]] {
        let records: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let out = decode(InputTopic::Messages, &records);
        assert_eq!(out.rejected.len(), 1, "{:?}", out.rejected);
        let e = &out.rejected[0];
        assert_eq!((e.index, e.field.as_deref(), e.found.as_str()), (1, Some("route[0]"), "null"), "{e:?}");
        assert_eq!(out.source, vec![0, 2]);
    }
}
