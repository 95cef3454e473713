//! Turning a [`RawBatch`] into the engine's [`MicroBatch`]: decode every topic column-wise, route
//! rejected records to dead letters, decode registry records and tombstones, and note how far each
//! partition was read (rejected records included: a dead-lettered record is consumed).

use std::sync::Arc;

use meshguard_analytics::{MicroBatch, Position, RegistryChange, RowsBatch};
use meshguard_schemas::output::DeadLetter;
use meshguard_schemas::registry::RegistryRecord;
use meshguard_schemas::{BatchDecoder, InputTopic, RecordError};
use uuid::Uuid;

use crate::config::Topics;
use crate::source::{RawBatch, TopicBuf};

/// A decoded micro-batch and what was rejected from it.
#[derive(Debug, Default)]
pub struct Assembled {
    /// The good records, for the engine.
    pub batch: MicroBatch,
    /// `(key, dead letter)` for every rejected record, for the dead-letter topic.
    pub dead_letters: Vec<(Vec<u8>, DeadLetter)>,
}

/// Decodes `raw`. `decoders` holds one decoder per keyed input topic (indexed by `InputTopic as usize`).
pub fn assemble(raw: &RawBatch, decoders: &mut [BatchDecoder; 4], topics: &Topics, max_record_bytes: usize, now_ms: i64) -> Assembled {
    let mut out = assemble_only(raw, decoders, topics, max_record_bytes, now_ms, |_| true);
    out.batch.positions = positions(raw);
    out
}

/// [`assemble`] for the topics `decode` accepts only, and without the positions ([`positions`]):
/// the pipeline decodes a batch's attempts while the global tables are being read to their end.
pub fn assemble_only(
    raw: &RawBatch,
    decoders: &mut [BatchDecoder; 4],
    topics: &Topics,
    max_record_bytes: usize,
    now_ms: i64,
    decode: impl Fn(InputTopic) -> bool,
) -> Assembled {
    let mut out = Assembled::default();
    for topic in [InputTopic::Messages, InputTopic::Presence, InputTopic::Interactions, InputTopic::IdentityRequests] {
        let buf = raw.topic(topic);
        if buf.is_empty() || !decode(topic) {
            continue;
        }
        let mut payloads: Vec<&[u8]> = Vec::with_capacity(buf.len());
        let mut index: Vec<u32> = Vec::with_capacity(buf.len());
        for i in 0..buf.len() {
            match buf.payload(i) {
                Some(p) => {
                    payloads.push(p);
                    index.push(i as u32);
                }
                None => out.dead_letters.push(dead_letter(
                    topics,
                    topic,
                    buf,
                    i,
                    &RecordError { index: i, field: None, expected: "a JSON record".into(), found: "a null value (tombstone)".into() },
                    max_record_bytes,
                    now_ms,
                )),
            }
        }
        let decoded = decoders[topic as usize].decode(&payloads);
        for e in &decoded.rejected {
            let i = index[e.index] as usize;
            out.dead_letters.push(dead_letter(topics, topic, buf, i, &RecordError { index: i, ..e.clone() }, max_record_bytes, now_ms));
        }
        let partition = decoded.source.iter().map(|&s| buf.partition[index[s as usize] as usize]).collect();
        let rows = Some(RowsBatch { batch: decoded.batch, partition });
        match topic {
            InputTopic::Messages => out.batch.messages = rows,
            InputTopic::Presence => out.batch.presence = rows,
            InputTopic::Interactions => out.batch.interactions = rows,
            InputTopic::IdentityRequests => out.batch.identity_requests = rows,
            InputTopic::Registry => {}
        }
    }

    if decode(InputTopic::Registry) {
        let reg = raw.topic(InputTopic::Registry);
        for i in 0..reg.len() {
            match registry_change(reg, i) {
                Ok(change) => out.batch.registry.push(change),
                Err(e) => out.dead_letters.push(dead_letter(topics, InputTopic::Registry, reg, i, &e, max_record_bytes, now_ms)),
            }
        }
    }
    out
}

/// How far `raw` reads each partition: the offset after its last record (rejected records
/// included: a dead-lettered record is consumed).
pub fn positions(raw: &RawBatch) -> Vec<Position> {
    let mut positions: Vec<Position> = Vec::new();
    for topic in InputTopic::ALL {
        let buf = raw.topic(topic);
        for i in 0..buf.len() {
            let (partition, next_offset) = (buf.partition[i], buf.offset[i] + 1);
            match positions.iter_mut().find(|p| p.topic == topic && p.partition == partition) {
                Some(p) => p.next_offset = p.next_offset.max(next_offset),
                None => positions.push(Position { topic, partition, next_offset }),
            }
        }
    }
    positions
}

/// A registry record or tombstone. The key is the UUID (the topic is compacted by it); a record
/// whose `uuid` differs from its key is refused, since compaction would keep the wrong one.
fn registry_change(buf: &TopicBuf, i: usize) -> Result<RegistryChange, RecordError> {
    let key = buf.key(i).unwrap_or_default();
    let key_text = std::str::from_utf8(key).unwrap_or("");
    let uuid = Uuid::try_parse(key_text.trim()).map_err(|_| RecordError {
        index: i,
        field: Some("(key)".into()),
        expected: "the record's UUID as the Kafka key".into(),
        found: format!("{:?}", String::from_utf8_lossy(key).chars().take(80).collect::<String>()),
    })?;
    let effective_ms = buf.timestamp_ms[i];
    let record = match buf.payload(i) {
        None => None,
        Some(p) => {
            let rec = RegistryRecord::from_json(i, p)?;
            if rec.uuid != uuid {
                return Err(RecordError {
                    index: i,
                    field: Some("uuid".into()),
                    expected: format!("the key's UUID {uuid}"),
                    found: rec.uuid.to_string(),
                });
            }
            Some(Arc::new(rec))
        }
    };
    Ok(RegistryChange { uuid, record, effective_ms })
}

fn dead_letter(
    topics: &Topics,
    topic: InputTopic,
    buf: &TopicBuf,
    i: usize,
    e: &RecordError,
    max_record_bytes: usize,
    now_ms: i64,
) -> (Vec<u8>, DeadLetter) {
    let payload = buf.payload(i);
    let payload_bytes = payload.map_or(0, <[u8]>::len);
    let text = payload.filter(|p| p.len() <= max_record_bytes).and_then(|p| std::str::from_utf8(p).ok()).map(str::to_owned);
    let record = DeadLetter {
        ts: now_ms,
        topic: topics.input(topic).to_owned(),
        partition: buf.partition[i],
        offset: buf.offset[i],
        reason: format!("{}", RecordError { index: buf.offset[i] as usize, ..e.clone() }).replacen("record ", "offset ", 1),
        field: e.field.clone(),
        expected: e.expected.clone(),
        found: e.found.clone(),
        payload: text,
        payload_bytes,
    };
    (buf.key(i).map(<[u8]>::to_vec).unwrap_or_default(), record)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use meshguard_analytics::Position;
    use meshguard_schemas::{BatchDecoder, InputTopic};

    use super::*;

    const A: &str = "c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
    const SEND: &str = r#"{"id":"5f0c9f2e-8d1a-4c3b-9a77-2b1d3c4e5f60","ts":"2026-11-24T17:00:00.123Z","action":"send","from":"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c","to":"c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f","auth":"valid"}"#;

    fn decoders() -> [BatchDecoder; 4] {
        [InputTopic::Messages, InputTopic::Presence, InputTopic::Interactions, InputTopic::IdentityRequests].map(BatchDecoder::new)
    }

    fn run(raw: &RawBatch) -> Assembled {
        assemble(raw, &mut decoders(), &Topics::default(), 1 << 20, 42)
    }

    #[test]
    fn registry_records_tombstones_and_bad_keys() {
        let mut raw = RawBatch::default();
        let reg = raw.topic_mut(InputTopic::Registry);
        let record = format!(r#"{{"uuid":"{A}","kind":"device"}}"#);
        reg.push_parts(Some(A.as_bytes()), Some(record.as_bytes()), 0, 10, 1_000);
        reg.push_parts(Some(A.to_uppercase().as_bytes()), None, 0, 11, 2_000);
        reg.push_parts(Some(b"9b2f1c3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c"), Some(record.as_bytes()), 1, 5, 3_000);
        reg.push_parts(Some(b"not-a-uuid"), None, 1, 6, 4_000);
        let out = run(&raw);

        let changes: Vec<_> = out.batch.registry.iter().map(|c| (c.uuid.to_string(), c.record.is_some(), c.effective_ms)).collect();
        assert_eq!(changes, vec![(A.to_owned(), true, 1_000), (A.to_owned(), false, 2_000)], "a tombstone's key may be upper case");
        let reasons: Vec<_> = out.dead_letters.iter().map(|(_, d)| (d.offset, d.field.clone().unwrap_or_default())).collect();
        assert_eq!(reasons, vec![(5, "uuid".to_owned()), (6, "(key)".to_owned())]);
        assert!(out.dead_letters[0].1.reason.contains("the key's UUID"), "{}", out.dead_letters[0].1.reason);
        assert_eq!(out.dead_letters[1].0, b"not-a-uuid", "dead letters keep the input key");
    }

    #[test]
    fn tombstones_on_keyed_topics_are_dead_lettered_and_positions_count_every_record() {
        let mut raw = RawBatch::default();
        let msgs = raw.topic_mut(InputTopic::Messages);
        msgs.push_parts(Some(b"k"), Some(SEND.as_bytes()), 2, 100, 0);
        msgs.push_parts(Some(b"k"), None, 2, 101, 0);
        msgs.push_parts(Some(b"k"), Some(b"{nope"), 2, 102, 0);
        let out = run(&raw);
        assert_eq!(out.batch.messages.as_ref().unwrap().batch.num_rows(), 1);
        assert_eq!(out.batch.messages.as_ref().unwrap().partition, vec![2]);
        let offsets: Vec<_> = out.dead_letters.iter().map(|(_, d)| d.offset).collect();
        assert_eq!(offsets, vec![101, 102]);
        assert!(out.dead_letters[0].1.found.contains("tombstone"));
        assert_eq!(out.dead_letters[1].1.payload.as_deref(), Some("{nope"), "the original text, for replay");
        assert!(out.dead_letters[1].1.reason.starts_with("offset 102:"), "{}", out.dead_letters[1].1.reason);
        assert_eq!(
            out.batch.positions,
            vec![Position { topic: InputTopic::Messages, partition: 2, next_offset: 103 }],
            "rejected records are consumed too"
        );
    }

    #[test]
    fn records_of_revoked_partitions_can_be_dropped_before_assembly() {
        let mut raw = RawBatch::default();
        let msgs = raw.topic_mut(InputTopic::Messages);
        msgs.push_parts(Some(b"k"), Some(SEND.as_bytes()), 0, 1, 0);
        msgs.push_parts(Some(b"k"), Some(SEND.as_bytes()), 1, 1, 0);
        msgs.push_parts(Some(b"k"), Some(SEND.as_bytes()), 0, 2, 0);
        raw.retain_partitions(InputTopic::Messages, |p| p == 0);
        let out = run(&raw);
        assert_eq!(out.batch.messages.as_ref().unwrap().partition, vec![0, 0]);
        assert_eq!(out.batch.positions, vec![Position { topic: InputTopic::Messages, partition: 0, next_offset: 3 }]);
    }
    #[test]
    fn attempts_decoded_apart_and_globals_appended_later_assemble_like_one_batch() {
        let record = format!(r#"{{"uuid":"{A}","kind":"device"}}"#);
        let mut raw = RawBatch::default();
        let msgs = raw.topic_mut(InputTopic::Messages);
        msgs.push_parts(Some(b"k"), Some(SEND.as_bytes()), 0, 7, 0);
        msgs.push_parts(Some(b"k"), Some(b"{nope"), 0, 8, 0);
        raw.topic_mut(InputTopic::Registry).push_parts(Some(A.as_bytes()), Some(record.as_bytes()), 0, 3, 1_000);
        // What the alignment reads while the attempts are decoded, in a batch of its own.
        let mut extra = RawBatch::default();
        extra.topic_mut(InputTopic::Registry).push_parts(Some(A.as_bytes()), None, 0, 4, 2_000);
        extra.topic_mut(InputTopic::Registry).push_parts(Some(b"not-a-uuid"), None, 1, 9, 3_000);

        let mut decoders = decoders();
        let attempts = assemble_only(&raw, &mut decoders, &Topics::default(), 1 << 20, 42, |t| t == InputTopic::Messages);
        assert!(attempts.batch.registry.is_empty() && attempts.batch.positions.is_empty(), "only the attempts");
        raw.append(&extra);
        let rest = assemble_only(&raw, &mut decoders, &Topics::default(), 1 << 20, 42, |t| t != InputTopic::Messages);
        assert!(rest.batch.messages.is_none());

        let whole = run(&raw);
        assert_eq!(attempts.batch.messages.as_ref().unwrap().batch, whole.batch.messages.as_ref().unwrap().batch);
        let changes = |a: &Assembled| a.batch.registry.iter().map(|c| (c.uuid, c.record.is_some(), c.effective_ms)).collect::<Vec<_>>();
        assert_eq!(changes(&rest), changes(&whole));
        assert_eq!(changes(&whole).len(), 2, "the appended tombstone, its key's bytes shifted into place: {:?}", changes(&whole));
        let dead = |a: &[&Assembled]| a.iter().flat_map(|a| a.dead_letters.iter().map(|(k, d)| (k.clone(), d.offset))).collect::<Vec<_>>();
        assert_eq!(dead(&[&attempts, &rest]), dead(&[&whole]));
        assert_eq!(dead(&[&whole]), vec![(b"k".to_vec(), 8), (b"not-a-uuid".to_vec(), 9)]);
        assert_eq!(
            positions(&raw),
            vec![
                Position { topic: InputTopic::Messages, partition: 0, next_offset: 9 },
                Position { topic: InputTopic::Registry, partition: 0, next_offset: 5 },
                Position { topic: InputTopic::Registry, partition: 1, next_offset: 10 },
            ]
        );
        assert_eq!(positions(&raw), whole.batch.positions);
    }
}
