//! The owner table: which UUID owns which, and each UUID's device type, from the compacted
//! registry topic (`meshguard.registry.v1`).
//!
//! This module owns the in-memory map and how one registry record changes it. It must never
//! decide anything about permissions (that is the pipeline's, which holds the whole directory) and
//! never refuse a record for fields it does not read: only `uuid`, `owner` and `type` matter here,
//! so a record the pipeline dead-letters for a bad profile still tells who owns the UUID.

use std::collections::HashMap;

use serde::Deserialize;
use uuid::Uuid;

/// What the enforcer needs to know about one registered UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The owning UUID, if any.
    pub owner: Option<Uuid>,
    /// The device type (`smart-bulb`, ...), for the wording of notifications.
    pub device_type: Option<String>,
}

/// The registry fields the enforcer reads; every other field is ignored.
#[derive(Deserialize)]
struct OwnerFields {
    uuid: Uuid,
    #[serde(default)]
    owner: Option<Uuid>,
    #[serde(rename = "type", default)]
    device_type: Option<String>,
}

/// Registered UUIDs with their owner and type: the registry topic as a table (latest record per
/// key; a tombstone removes the key).
#[derive(Debug, Default)]
pub struct OwnerTable {
    entries: HashMap<Uuid, Entry>,
}

/// Why a registry record changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// The record has no key, or a key that is not a UUID (tombstones need the key).
    BadKey,
    /// The value is not a registry record with a `uuid` (the pipeline dead-letters it too).
    BadValue(String),
}

impl OwnerTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one record of the registry topic: a value registers (or re-registers) its `uuid`,
    /// a tombstone (no value) unregisters the key.
    pub fn apply(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<(), Skipped> {
        match value {
            None => {
                let key =
                    key.and_then(|k| std::str::from_utf8(k).ok()).and_then(|k| Uuid::parse_str(k.trim()).ok()).ok_or(Skipped::BadKey)?;
                self.entries.remove(&key);
                Ok(())
            }
            Some(value) => {
                let fields: OwnerFields = serde_json::from_slice(value).map_err(|e| Skipped::BadValue(e.to_string()))?;
                self.entries.insert(fields.uuid, Entry { owner: fields.owner, device_type: fields.device_type.filter(|t| !t.is_empty()) });
                Ok(())
            }
        }
    }

    /// The entry of a registered UUID.
    pub fn get(&self, uuid: &Uuid) -> Option<&Entry> {
        self.entries.get(uuid)
    }

    /// The owner of a registered UUID, if it has one.
    pub fn owner_of(&self, uuid: &Uuid) -> Option<Uuid> {
        self.entries.get(uuid).and_then(|e| e.owner)
    }

    /// Registered UUIDs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no UUID is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICE: &str = "c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
    const OWNER: &str = "d0d0d0d0-1111-4222-8333-444444444444";

    #[test]
    fn records_register_and_tombstones_unregister() {
        let mut table = OwnerTable::new();
        let record = format!(
            r#"{{"uuid":"{}","kind":"device","type":"smart-bulb","owner":"{OWNER}","profiles":"not read"}}"#,
            DEVICE.to_uppercase()
        );
        table.apply(Some(DEVICE.as_bytes()), Some(record.as_bytes())).expect("applies");
        let device = Uuid::parse_str(DEVICE).expect("uuid");
        assert_eq!(table.owner_of(&device), Some(Uuid::parse_str(OWNER).expect("uuid")));
        assert_eq!(table.get(&device).and_then(|e| e.device_type.as_deref()), Some("smart-bulb"));

        // Re-registered without an owner.
        table.apply(Some(DEVICE.as_bytes()), Some(format!(r#"{{"uuid":"{DEVICE}","owner":null}}"#).as_bytes())).expect("applies");
        assert_eq!(table.owner_of(&device), None);
        assert_eq!(table.len(), 1);

        // An upper-case key still unregisters.
        table.apply(Some(DEVICE.to_uppercase().as_bytes()), None).expect("tombstone");
        assert!(table.is_empty());
    }

    #[test]
    fn bad_records_change_nothing() {
        let mut table = OwnerTable::new();
        assert_eq!(table.apply(None, None), Err(Skipped::BadKey));
        assert_eq!(table.apply(Some(b"not a uuid"), None), Err(Skipped::BadKey));
        assert!(matches!(table.apply(Some(DEVICE.as_bytes()), Some(b"{}")), Err(Skipped::BadValue(_))));
        assert!(table.is_empty());
    }
}
