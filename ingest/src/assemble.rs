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
    let mut out = Assembled::default();
    for topic in [InputTopic::Messages, InputTopic::Presence, InputTopic::Interactions, InputTopic::IdentityRequests] {
        let buf = raw.topic(topic);
        if buf.is_empty() {
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

    let reg = raw.topic(InputTopic::Registry);
    for i in 0..reg.len() {
        match registry_change(reg, i) {
            Ok(change) => out.batch.registry.push(change),
            Err(e) => out.dead_letters.push(dead_letter(topics, InputTopic::Registry, reg, i, &e, max_record_bytes, now_ms)),
        }
    }

    for topic in InputTopic::ALL {
        let buf = raw.topic(topic);
        for i in 0..buf.len() {
            let (partition, next_offset) = (buf.partition[i], buf.offset[i] + 1);
            match out.batch.positions.iter_mut().find(|p| p.topic == topic && p.partition == partition) {
                Some(p) => p.next_offset = p.next_offset.max(next_offset),
                None => out.batch.positions.push(Position { topic, partition, next_offset }),
            }
        }
    }
    out
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
