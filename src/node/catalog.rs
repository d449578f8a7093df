//! The node's view of its shards dir: every GGUF file found (with its parse
//! result and torrent metadata), and the shard cache (`shard_id -> path + mmap`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use memmap2::Mmap;
use serde_json::{Value, json};

use crate::gguf::{Gguf, ShardSummary};
use crate::protocol::ErrorCode;
use crate::torrent::metainfo::check_file_name;
use crate::torrent::{InfoHash, Metainfo};

/// A GGUF file in the shards dir.
#[derive(Clone, Debug)]
pub struct FileEntry {
    pub filename: String,
    pub path: PathBuf,
    pub size: u64,
    /// The parsed header, or why the file is not a valid GGUF (then it is
    /// listed and seeded as a plain file, but never loaded).
    pub gguf: Result<ShardSummary, String>,
    /// Torrent metadata, once hashed or read from the cache.
    pub meta: Option<Arc<Metainfo>>,
    pub meta_error: Option<String>,
}

impl FileEntry {
    /// The shard id this file holds: `shard.index`, else from `shard-N.gguf`.
    pub fn shard_id(&self) -> Option<u32> {
        self.gguf.as_ref().ok().and_then(|s| s.shard_index).or_else(|| shard_id_from_name(&self.filename))
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "info_hash": self.meta.as_ref().map(|m| m.info_hash.to_hex()),
            "filename": self.filename,
            "size": self.size,
            "shard_id": self.shard_id(),
            "layers": self.gguf.as_ref().ok().and_then(|s| s.layers).map(|(b, e)| json!([b, e])),
            "complete": true,
            "hashing": self.meta.is_none() && self.meta_error.is_none(),
        });
        if let Err(e) = &self.gguf {
            v["error"] = json!(e);
        }
        if let Some(e) = &self.meta_error {
            v["metadata_error"] = json!(e);
        }
        v
    }
}

/// `shard-N.gguf` -> N.
pub fn shard_id_from_name(name: &str) -> Option<u32> {
    let n = name.strip_prefix("shard-")?.strip_suffix(".gguf")?;
    if n.is_empty() || n.len() > 5 || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok()
}

/// A shard mapped and ready for the engine.
pub struct LoadedShard {
    pub shard_id: u32,
    pub filename: String,
    pub path: PathBuf,
    pub map: Arc<Mmap>,
    /// The open file behind `map`: one `fstat` before each task checks it was not cut short.
    pub file: Arc<File>,
    pub summary: ShardSummary,
    pub loaded_at: Instant,
}

impl std::fmt::Debug for LoadedShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedShard").field("shard_id", &self.shard_id).field("path", &self.path).finish()
    }
}

/// The one check of every shard the node loads, whichever path brought it (a local file, a
/// download, `LOAD_SHARD`'s `filename`, the manifest): `shard.index` is `shard_id`, `shard.count`
/// is above it, `shard.model_id` is present (and is `model` when the node already holds a shard
/// of a model), and the engine's own checks pass ([`crate::engine::model::check`]: every
/// hyper-parameter finite and in range, the layer range within the model and matching the
/// `blk.N` tensors present, each weight of the range present with its shape and a type ggml
/// computes). A GGUF without `shard.*` keys (a whole model) is refused: split it first.
///
/// `listed`: when the node holds a manifest (the pinned one, or the shards dir's
/// `manifest.json`) that lists `shard_id`, that manifest's info hash and the file's own, as the
/// node's scan computed it (a cached hash is trusted only while the file's size, mtime, inode and
/// ctime are unchanged) or `None` while it is still being hashed. Any other info hash is refused
/// with [`ErrorCode::ManifestMismatch`]; a hash not yet known with [`ErrorCode::Busy`]. Every other
/// refusal is [`ErrorCode::ShardInvalid`].
pub fn check_shard(
    g: &Gguf,
    shard_id: u32,
    model: Option<&str>,
    listed: Option<(InfoHash, Option<InfoHash>)>,
) -> Result<ShardSummary, (ErrorCode, String)> {
    if let Some((want, have)) = listed {
        match have {
            None => {
                return Err((
                    ErrorCode::Busy,
                    format!(
                        "its info hash is not known yet (still being hashed), and the manifest lists {want} for shard {shard_id}: try again"
                    ),
                ));
            }
            Some(have) if have != want => {
                return Err((
                    ErrorCode::ManifestMismatch,
                    format!(
                        "it is torrent {have}, but the manifest lists {want} for shard {shard_id}: not this model's shard (remove it)"
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    check_shard_keys(g, shard_id, model).map_err(|e| (ErrorCode::ShardInvalid, e))
}

/// The header and tensor checks of [`check_shard`].
fn check_shard_keys(g: &Gguf, shard_id: u32, model: Option<&str>) -> Result<ShardSummary, String> {
    let summary = ShardSummary::of(g);
    let (Some(index), Some(count), Some(have)) =
        (summary.shard_index, summary.shard_count, summary.model_id.as_deref())
    else {
        return Err(
            "it has no shard.index, shard.count or shard.model_id: not a shard (split the model with `shardctl split`)"
                .into(),
        );
    };
    if g.get("shard.layer_begin").is_none() || g.get("shard.layer_end").is_none() {
        return Err("it has no shard.layer_begin or shard.layer_end".into());
    }
    if index != shard_id {
        return Err(format!("it holds shard.index {index}, not shard {shard_id}"));
    }
    if index >= count || count as u64 > crate::protocol::MAX_SHARD_ID + 1 {
        return Err(format!("shard.index {index} does not fit shard.count {count}"));
    }
    if have.is_empty() || have.len() > 256 {
        return Err("shard.model_id must be 1..=256 bytes".into());
    }
    if let Some(want) = model
        && want != have
    {
        return Err(format!("it is of model {have}, not of this node's model {want}"));
    }
    crate::engine::model::check(g)?;
    Ok(summary)
}

/// Bytes between two reads of [`prefault`]'s walk: the smallest page size.
const PAGE: usize = 4096;

/// Every weight is read at a shard's first step: bring the whole file in now, while the load runs
/// (a cold start's loads run on all nodes at once), instead of page fault after page fault in the
/// first step, node after node along the chain. `MADV_POPULATE_READ` (Linux 5.14; elsewhere
/// `MADV_WILLNEED`) reads what is not cached and maps the page cache's pages, so the weights stay
/// file-backed; then one byte of every page is read, because on a VM the first touch of a page
/// the disk wrote by DMA still costs a hypervisor fault (measured: a 120 MB shard written with
/// direct I/O took 150 ms more in its first step with the pages mapped, 12 ms once touched).
/// A shard already in memory costs a few ms.
fn prefault(map: &Mmap, name: &str) {
    let t = std::time::Instant::now();
    #[cfg(target_os = "linux")]
    let advised = map.advise(memmap2::Advice::PopulateRead);
    #[cfg(not(target_os = "linux"))]
    let advised = map.advise(memmap2::Advice::WillNeed);
    if let Err(e) = advised {
        crate::debug!("{name}: madvise: {e}");
    }
    let mut sum = 0u8;
    for i in (0..map.len()).step_by(PAGE) {
        sum = sum.wrapping_add(map[i]);
    }
    std::hint::black_box(sum);
    crate::debug!("{name}: {} MB read in {:.1} ms", map.len() >> 20, t.elapsed().as_secs_f64() * 1e3);
}

/// Opens, maps and checks a shard file ([`check_shard`], `listed` as there), and brings its pages
/// in ([`prefault`]). Runs on a worker.
pub fn load_shard(
    shard_id: u32,
    path: &Path,
    model: Option<&str>,
    listed: Option<(InfoHash, Option<InfoHash>)>,
) -> Result<LoadedShard, (ErrorCode, String)> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err((ErrorCode::ShardNotFound, format!("{} does not exist", path.display())));
        }
        Err(e) => return Err((ErrorCode::Internal, format!("opening {}: {e}", path.display()))),
    };
    let len = file.metadata().map_err(|e| (ErrorCode::Internal, format!("{name}: {e}")))?.len();
    if len == 0 {
        return Err((ErrorCode::ShardInvalid, format!("{name} is empty, not a GGUF file")));
    }
    // SAFETY: read-only map of a file the node never writes in place (see
    // torrent::create); weights are read through it, never copied. A file
    // truncated by someone else is caught before each task (`file` is kept
    // for that fstat; docs/ARCHITECTURE.md says what remains).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| (ErrorCode::Internal, format!("mapping {name}: {e}")))?;
    let summary = match Gguf::parse(&map) {
        Ok(g) => check_shard(&g, shard_id, model, listed).map_err(|(c, e)| (c, format!("{name}: {e}")))?,
        Err(e) => return Err((ErrorCode::ShardInvalid, format!("{name} is not a valid GGUF file: {e}"))),
    };
    prefault(&map, &name);
    Ok(LoadedShard {
        shard_id,
        filename: name,
        path: path.to_path_buf(),
        map: Arc::new(map),
        file: Arc::new(file),
        summary,
        loaded_at: Instant::now(),
    })
}

#[derive(Default)]
pub struct Catalog {
    pub files: BTreeMap<String, FileEntry>,
    pub loaded: BTreeMap<u32, LoadedShard>,
    /// `manifest.json` of the shards dir: shard id -> (filename, info hash).
    pub manifest: BTreeMap<u32, (String, InfoHash)>,
    /// That manifest's bytes and SHA-256 (served by GET_MANIFEST, announced under its DHT key);
    /// with `--model`, only a manifest of the pinned hash is kept.
    pub manifest_bytes: Option<(Vec<u8>, [u8; 32])>,
    /// The manifest's `model_id`: every shard loaded must be of it.
    pub manifest_model: Option<String>,
}

/// Reads a `manifest.json`: its bytes and its shard table (bounded; bad entries skipped).
pub fn read_manifest(path: &Path) -> Option<(Vec<u8>, BTreeMap<u32, (String, InfoHash)>)> {
    if std::fs::metadata(path).ok()?.len() > crate::gguf::manifest::MAX_MANIFEST_BYTES as u64 {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    let table = manifest_table(&bytes)?;
    Some((bytes, table))
}

/// The shard table of a manifest's bytes (bad entries skipped).
pub fn manifest_table(bytes: &[u8]) -> Option<BTreeMap<u32, (String, InfoHash)>> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let mut out = BTreeMap::new();
    for s in v.get("shards")?.as_array()? {
        let id = s.get("shard_id").and_then(Value::as_u64).and_then(|i| u32::try_from(i).ok());
        let name = s.get("filename").and_then(Value::as_str).filter(|n| check_file_name(n).is_ok());
        let hash = s.get("info_hash").and_then(Value::as_str).and_then(InfoHash::from_hex);
        if let (Some(id), Some(name), Some(hash)) = (id, name, hash) {
            out.insert(id, (name.to_string(), hash));
        }
    }
    Some(out)
}

impl Catalog {
    pub fn manifest_name(&self, id: u32) -> Option<String> {
        self.manifest.get(&id).map(|(n, _)| n.clone())
    }

    pub fn manifest_hash(&self, id: u32) -> Option<InfoHash> {
        self.manifest.get(&id).map(|(_, h)| *h)
    }

    /// The info hash the manifest lists for file `filename`, when it is not `have`: a file of
    /// that name that is not the manifest's shard (never announced or resolved under the
    /// shard's name key, listed with a `mismatch` reason).
    pub fn manifest_mismatch(&self, filename: &str, have: InfoHash) -> Option<InfoHash> {
        self.manifest.values().find(|(n, _)| n == filename).map(|(_, h)| *h).filter(|h| *h != have)
    }

    /// The file that holds `shard_id`: a valid GGUF whose `shard.index` says
    /// so first, then a file named `shard-N.gguf`.
    pub fn file_for_shard(&self, shard_id: u32) -> Option<&FileEntry> {
        self.files
            .values()
            .find(|f| f.gguf.as_ref().is_ok_and(|s| s.shard_index == Some(shard_id)))
            .or_else(|| self.files.values().find(|f| shard_id_from_name(&f.filename) == Some(shard_id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ids_from_names() {
        assert_eq!(shard_id_from_name("shard-0.gguf"), Some(0));
        assert_eq!(shard_id_from_name("shard-17.gguf"), Some(17));
        assert_eq!(shard_id_from_name("shard-01.gguf"), None);
        assert_eq!(shard_id_from_name("shard-.gguf"), None);
        assert_eq!(shard_id_from_name("shard-1.bin"), None);
        assert_eq!(shard_id_from_name("model.gguf"), None);
        assert_eq!(shard_id_from_name("shard-99999999999.gguf"), None);
    }
}
