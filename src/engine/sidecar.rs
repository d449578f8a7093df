//! The repack sidecar: a shard's matrices in ggml's CPU repack layout, written once to a file
//! beside the shard and mapped read-only from then on, so the fast kernels run from shared,
//! evictable page cache instead of an anonymous copy the size of the weights (llama.cpp's way).
//!
//! File layout (`NAME.gguf.repack`; integers little-endian):
//!
//! ```text
//! 0        magic  b"SHNREPK\0"
//! 8        u32    header length H
//! 12       H      header, JSON: {"format": 1, "shard": KEY, "layout": LAYOUT,
//!                                "tensors": [{"name", "offset", "size"}, ...]}
//! ...      data   each tensor at its offset (a multiple of REPACK_ALIGN, after the header)
//! end-20   20     SHA-1 of every byte before it
//! ```
//!
//! KEY names the shard's bytes (its info hash, or a SHA-1 of the whole file when the node has
//! none) and LAYOUT the ggml version and CPU features that chose the layout
//! ([`ggml::repack_layout_id`]). A sidecar whose key, layout, tensor list or checksum does not
//! match is never used: it is rebuilt (written to a temporary name, synced, renamed over).

use super::ggml::{self, REPACK_ALIGN, WeightSpec};
use memmap2::Mmap;
use serde_json::{Value, json};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"SHNREPK\0";
const FORMAT: u64 = 1;
const TRAILER: usize = 20;
/// A header longer than this is not ours (a shard has a few hundred tensors).
const MAX_HEADER: usize = 16 << 20;

/// Where a shard's sidecar lives and what it must have been built from.
#[derive(Clone, Debug)]
pub struct Place {
    pub path: PathBuf,
    /// The shard's identity: its info hash (hex), or `sha1:` and the hex SHA-1 of the file.
    pub key: String,
}

impl Place {
    /// The sidecar of the shard at `shard`: `shard` with `.repack` appended.
    pub fn beside(shard: &Path, key: String) -> Place {
        let mut name = shard.as_os_str().to_owned();
        name.push(".repack");
        Place { path: PathBuf::from(name), key }
    }
}

/// A key for a shard without an info hash: SHA-1 of all its bytes.
pub fn content_key(map: &[u8]) -> String {
    format!("sha1:{}", crate::hash::to_hex(&crate::hash::sha1(map)))
}

/// A sidecar that matched: its map, and each spec's offset in it (0 for specs not repacked).
pub struct Mapped {
    pub map: Mmap,
    pub offsets: Vec<usize>,
}

/// Maps the sidecar at `place` if it was built for this shard, this layout and exactly the
/// tensors `plan` picks of `specs`, and its checksum holds; otherwise says why not.
pub fn open(place: &Place, specs: &[WeightSpec], plan: &[bool]) -> Result<Mapped, String> {
    let file = File::open(&place.path).map_err(|e| format!("{}: {e}", place.path.display()))?;
    // SAFETY: a read-only map; the sidecar is only ever replaced by rename, never written in place.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("{}: {e}", place.path.display()))?;
    if map.len() < MAGIC.len() + 4 + TRAILER || &map[..8] != MAGIC {
        return Err("not a repack sidecar".into());
    }
    let body = map.len() - TRAILER;
    if crate::hash::sha1(&map[..body])[..] != map[body..] {
        return Err("checksum mismatch (the file is corrupt)".into());
    }
    let h = u32::from_le_bytes(map[8..12].try_into().unwrap()) as usize;
    if h > MAX_HEADER || 12 + h > body {
        return Err("header length out of range".into());
    }
    let header: Value = serde_json::from_slice(&map[12..12 + h]).map_err(|e| format!("header: {e}"))?;
    if header["format"].as_u64() != Some(FORMAT) {
        return Err(format!("format {} (this build writes {FORMAT})", header["format"]));
    }
    if header["shard"].as_str() != Some(place.key.as_str()) {
        return Err(format!("built for shard {}, this one is {}", header["shard"], place.key));
    }
    let layout = ggml::repack_layout_id();
    if header["layout"].as_str() != Some(layout.as_str()) {
        return Err(format!("built for {}, this build is {layout:?}", header["layout"]));
    }
    let listed = header["tensors"].as_array().ok_or("header lists no tensors")?;
    let wanted: Vec<(usize, &WeightSpec)> = specs.iter().enumerate().filter(|(i, _)| plan[*i]).collect();
    if listed.len() != wanted.len() {
        return Err(format!("holds {} tensors, this shard repacks {}", listed.len(), wanted.len()));
    }
    let mut offsets = vec![0usize; specs.len()];
    let data_start = 12 + h;
    for (entry, (i, spec)) in listed.iter().zip(wanted) {
        let off = entry["offset"].as_u64().ok_or("tensor without offset")? as usize;
        let size = entry["size"].as_u64().ok_or("tensor without size")? as usize;
        if entry["name"].as_str() != Some(spec.name) || size != spec.data.len() {
            return Err(format!("tensor {} does not match the shard's {}", entry["name"], spec.name));
        }
        if off < data_start || off % REPACK_ALIGN != 0 || off.checked_add(size).is_none_or(|e| e > body) {
            return Err(format!("tensor {} lies outside the data", spec.name));
        }
        offsets[i] = off;
    }
    Ok(Mapped { map, offsets })
}

/// Writes the sidecar for `specs` (the tensors `plan` picks, repacked one at a time): to a
/// temporary name beside `place.path`, synced, then renamed over it, so a reader sees the old
/// file or the whole new one. Returns the bytes written.
pub fn build(place: &Place, specs: &[WeightSpec], plan: &[bool]) -> Result<u64, String> {
    let dir = place.path.parent().unwrap_or(Path::new("."));
    let name = place.path.file_name().ok_or("sidecar path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write_to(&tmp, place, specs, plan).and_then(|n| {
        std::fs::rename(&tmp, &place.path).map_err(|e| format!("renaming to {}: {e}", place.path.display()))?;
        Ok(n)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_to(tmp: &Path, place: &Place, specs: &[WeightSpec], plan: &[bool]) -> Result<u64, String> {
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    // Lay the tensors out after a header whose size is known once the offsets are: offsets are
    // computed for a header padded to a fixed width, so writing it does not move them.
    let picked: Vec<&WeightSpec> = specs.iter().zip(plan).filter(|(_, p)| **p).map(|(s, _)| s).collect();
    let header_for = |data_start: usize| {
        let mut at = data_start;
        let tensors: Vec<Value> = picked
            .iter()
            .map(|s| {
                let off = at;
                at = (at + s.data.len()).next_multiple_of(REPACK_ALIGN);
                json!({"name": s.name, "offset": off, "size": s.data.len()})
            })
            .collect();
        let h = json!({"format": FORMAT, "shard": place.key, "layout": ggml::repack_layout_id(), "tensors": tensors});
        serde_json::to_vec(&h).expect("JSON values serialize")
    };
    // The header's length depends on the offsets' digits; two rounds settle it (padded with spaces).
    let mut len = header_for(4096).len();
    let data_start = (12 + len + 64).next_multiple_of(4096);
    let mut header = header_for(data_start);
    len = data_start - 12;
    if header.len() > len {
        return Err("sidecar header does not fit".into());
    }
    header.resize(len, b' ');

    let file = OpenOptions::new().write(true).create(true).truncate(true).open(tmp).map_err(io)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = crate::hash::Hasher::default();
    let mut put = |out: &mut BufWriter<File>, bytes: &[u8]| -> Result<(), String> {
        hasher.update(bytes);
        out.write_all(bytes).map_err(io)
    };
    put(&mut out, MAGIC)?;
    put(&mut out, &(len as u32).to_le_bytes())?;
    put(&mut out, &header)?;
    let mut at = data_start;
    for spec in &picked {
        let repacked = ggml::repack_one(spec)?;
        put(&mut out, &repacked)?;
        let end = at + repacked.len();
        let next = end.next_multiple_of(REPACK_ALIGN);
        put(&mut out, &vec![0u8; next - end])?;
        at = next;
    }
    drop(put);
    out.write_all(&hasher.finish()).map_err(io)?;
    let file = out.into_inner().map_err(|e| format!("{}: {}", tmp.display(), e.error()))?;
    file.sync_all().map_err(io)?;
    let mut file = file;
    let total = file.seek(SeekFrom::End(0)).map_err(io)?;
    Ok(total)
}
