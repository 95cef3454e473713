//! Trained models on disk: `<models_dir>/timing-v<N>.bin` and `timing-v<N>.json`.
//!
//! The `.bin` file is the model: a 28-byte header (magic `MGTIMING`, format number, payload
//! length, FNV-1a 64 checksum of the payload, little-endian) and the postcard encoding of every key
//! in key order, so the same model always gives the same bytes. The `.json` manifest says what is
//! in it (version, trained_at, horizon, keys, clusters) for people and tools; loading reads only
//! the `.bin`. The checksum finds truncation and bit rot; it is not a signature.
//!
//! Versions count up from 1 in the directory. A model is written to a hidden temporary file,
//! fsynced, then hard-linked to its final name (which fails rather than overwrite, so two workers
//! training into one directory take distinct versions) and the directory fsynced: a `timing-v<N>.bin`
//! is always complete. After a save, all but the newest `keep` versions are deleted.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{KeyModel, TimingModel};
use crate::tables::FastMap;

const MAGIC: &[u8; 8] = b"MGTIMING";
/// The layout of the payload; a file of another format is refused.
pub const FORMAT: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 8;

/// Why a model could not be trained, saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file or directory operation failed.
    #[error("{what} {path}: {cause}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        cause: std::io::Error,
    },
    /// A model file is not a valid model.
    #[error("model file {path} refused: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Polars failed reading or aggregating the archive.
    #[error("{what}: {cause}")]
    Polars {
        /// What was being done.
        what: &'static str,
        /// Polars' error.
        cause: String,
    },
    /// The archive holds a column that is not as the messages schema says.
    #[error("archive column `{column}`: {reason}")]
    Archive {
        /// The column.
        column: String,
        /// What is wrong.
        reason: String,
    },
    /// The k-means failed.
    #[error("clustering schedules: {reason}")]
    Fit {
        /// linfa's error.
        reason: String,
    },
}

/// The manifest written beside each model (`timing-v<N>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// File format number.
    pub format: u32,
    /// The model's version.
    pub version: u64,
    /// The model file's name.
    pub file: String,
    /// The end of the horizon (RFC 3339, UTC).
    pub trained_at: String,
    /// The start of the horizon (RFC 3339, UTC).
    pub horizon_start: String,
    /// Keys with a schedule: pairs plus requesters.
    pub keys: usize,
    /// Of those, requester-target pairs.
    pub pairs: usize,
    /// Of those, requesters (across targets).
    pub requesters: usize,
    /// k-means clusters.
    pub clusters: u32,
    /// Distinct attempts read.
    pub attempts: u64,
    /// Size of the model file.
    pub bytes: u64,
    /// FNV-1a 64 of the payload, hex.
    pub checksum: String,
}

#[derive(Serialize, Deserialize)]
struct ModelFile {
    version: u64,
    trained_at_ms: i64,
    horizon_start_ms: i64,
    clusters: u32,
    attempts: u64,
    keys: Vec<(Uuid, Uuid, KeyModel)>,
}

/// The models directory.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.to_owned();
    move |cause| ModelError::Io { what, path, cause }
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl ModelStore {
    /// The store in `dir`, created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ModelError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of version `v`'s model file.
    pub fn path(&self, v: u64) -> PathBuf {
        self.dir.join(format!("timing-v{v}.bin"))
    }

    /// The versions present, ascending.
    pub fn versions(&self) -> Result<Vec<u64>, ModelError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io("listing", &self.dir))? {
            let entry = entry.map_err(io("listing", &self.dir))?;
            let name = entry.file_name();
            if let Some(v) =
                name.to_str().and_then(|n| n.strip_prefix("timing-v")).and_then(|n| n.strip_suffix(".bin")).and_then(|n| n.parse().ok())
            {
                out.push(v);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The model's bytes (header and payload) with `version` set.
    pub fn encode(model: &TimingModel, version: u64) -> Vec<u8> {
        let mut keys: Vec<(Uuid, Uuid, KeyModel)> = model.iter().map(|(k, m)| (k.0, k.1, m.clone())).collect();
        keys.sort_unstable_by_key(|(a, b, _)| (*a, *b));
        let file = ModelFile {
            version,
            trained_at_ms: model.trained_at_ms,
            horizon_start_ms: model.horizon_start_ms,
            clusters: model.clusters,
            attempts: model.attempts,
            keys,
        };
        // Encoding plain structs into a Vec cannot fail.
        let payload = postcard::to_stdvec(&file).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&fnv1a(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes a model file's bytes; `path` names it in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<TimingModel, ModelError> {
        let corrupt = |reason: String| ModelError::Corrupt { path: path.to_owned(), reason };
        if bytes.len() < HEADER {
            return Err(corrupt(format!("{} bytes, shorter than the {HEADER}-byte header", bytes.len())));
        }
        if &bytes[..8] != MAGIC {
            return Err(corrupt("not a meshguard timing model (bad magic)".into()));
        }
        let word = |at: usize, n: usize| bytes[at..at + n].iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
        let format = word(8, 4) as u32;
        if format != FORMAT {
            return Err(corrupt(format!("format {format}, this build reads format {FORMAT}")));
        }
        let (len, sum) = (word(12, 8), word(20, 8));
        let payload = &bytes[HEADER..];
        if payload.len() as u64 != len {
            return Err(corrupt(format!("payload of {} bytes, the header says {len} (truncated?)", payload.len())));
        }
        if fnv1a(payload) != sum {
            return Err(corrupt(format!("checksum {:016x}, the header says {sum:016x}", fnv1a(payload))));
        }
        let file: ModelFile = postcard::from_bytes(payload).map_err(|e| corrupt(format!("payload does not decode: {e}")))?;
        let mut keys = FastMap::default();
        keys.reserve(file.keys.len());
        for (from, to, m) in file.keys {
            if !(m.scores.is_empty() || m.scores.len() == super::BINS) {
                return Err(corrupt(format!("key {from}/{to}: {} scores, expected 0 or {}", m.scores.len(), super::BINS)));
            }
            keys.insert((from, to), m);
        }
        let mut model = TimingModel::new(file.trained_at_ms, file.horizon_start_ms, file.clusters, file.attempts, keys);
        model.version = file.version;
        Ok(model)
    }

    /// Saves `model` as the next version (setting `model.version`), writes its manifest, and keeps
    /// only the newest `keep` versions.
    pub fn save(&self, model: &mut TimingModel, keep: u32) -> Result<ModelManifest, ModelError> {
        let mut version = self.versions()?.last().copied().unwrap_or(0) + 1;
        loop {
            let bytes = Self::encode(model, version);
            let tmp = self.dir.join(format!(".timing-v{version}.bin.{}.tmp", std::process::id()));
            write_synced(&tmp, &bytes)?;
            let path = self.path(version);
            match fs::hard_link(&tmp, &path) {
                Ok(()) => {
                    fs::remove_file(&tmp).map_err(io("deleting", &tmp))?;
                    sync_dir(&self.dir)?;
                    model.version = version;
                    let manifest = self.manifest(model, &bytes);
                    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
                    let mpath = self.dir.join(format!("timing-v{version}.json"));
                    let mtmp = self.dir.join(format!(".timing-v{version}.json.{}.tmp", std::process::id()));
                    write_synced(&mtmp, &json)?;
                    fs::rename(&mtmp, &mpath).map_err(io("renaming", &mtmp))?;
                    sync_dir(&self.dir)?;
                    self.prune(keep)?;
                    return Ok(manifest);
                }
                // Another trainer took this version first: take the next one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    fs::remove_file(&tmp).map_err(io("deleting", &tmp))?;
                    version += 1;
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(io("linking", &path)(e));
                }
            }
        }
    }

    fn manifest(&self, model: &TimingModel, bytes: &[u8]) -> ModelManifest {
        let pairs = model.iter().filter(|(k, _)| !k.1.is_nil()).count();
        ModelManifest {
            format: FORMAT,
            version: model.version,
            file: format!("timing-v{}.bin", model.version),
            trained_at: meshguard_schemas::time::format_ms(model.trained_at_ms),
            horizon_start: meshguard_schemas::time::format_ms(model.horizon_start_ms),
            keys: model.len(),
            pairs,
            requesters: model.len() - pairs,
            clusters: model.clusters,
            attempts: model.attempts,
            bytes: bytes.len() as u64,
            checksum: format!("{:016x}", fnv1a(&bytes[HEADER..])),
        }
    }

    /// Loads version `v`.
    pub fn load(&self, v: u64) -> Result<TimingModel, ModelError> {
        let path = self.path(v);
        let bytes = fs::read(&path).map_err(io("reading", &path))?;
        Self::decode(&bytes, &path)
    }

    /// Loads the newest version, if any. A newest file that does not check is refused (an error
    /// naming the file and the reason), never silently replaced by an older one.
    pub fn load_newest(&self) -> Result<Option<TimingModel>, ModelError> {
        match self.versions()?.last() {
            Some(&v) => self.load(v).map(Some),
            None => Ok(None),
        }
    }

    /// Deletes all but the newest `keep` versions (model and manifest); returns the deleted ones.
    pub fn prune(&self, keep: u32) -> Result<Vec<u64>, ModelError> {
        let versions = self.versions()?;
        let cut = versions.len().saturating_sub(keep.max(1) as usize);
        let old = versions[..cut].to_vec();
        for v in &old {
            let path = self.path(*v);
            fs::remove_file(&path).map_err(io("deleting", &path))?;
            let manifest = self.dir.join(format!("timing-v{v}.json"));
            match fs::remove_file(&manifest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("deleting", &manifest)(e)),
            }
        }
        if !old.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(old)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let mut f = File::create(path).map_err(io("creating", path))?;
    f.write_all(bytes).map_err(io("writing", path))?;
    f.sync_all().map_err(io("syncing", path))
}

fn sync_dir(dir: &Path) -> Result<(), ModelError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))
}
