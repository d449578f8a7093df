//! `manifest.json`, the model's table of shards, and the pin a cluster puts on it (DESIGN
//! section 11): `--model HASH` names the SHA-256 of the manifest's bytes, and a node takes
//! every shard's info hash from the manifest that hashes to it, never from a vote of holders.
//!
//! ```text
//! {"model_id", "source", "architecture", "block_count", "shard_count",
//!  "shards": [{"shard_id", "filename", "size", "info_hash", "layers": [begin, end]}]}
//! ```
//! A manifest is valid when every shard of `0..shard_count` appears once with a plain file
//! name, a size, a 40-hex-digit info hash, and layer ranges that follow one another without a
//! gap or an overlap from 0 to `block_count`. Sans-IO: bytes in, a checked table out.

use serde_json::Value;

use crate::torrent::metainfo::{InfoHash, check_file_name};

/// Largest manifest read or accepted from a peer.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Most shards a manifest may list.
pub const MAX_MANIFEST_SHARDS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestShard {
    pub shard_id: u32,
    pub filename: String,
    pub size: u64,
    pub info_hash: InfoHash,
    /// Half-open layer range.
    pub layers: (u32, u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub model_id: String,
    pub block_count: u32,
    /// By shard id, `0..shard_count`.
    pub shards: Vec<ManifestShard>,
    /// SHA-256 of the bytes parsed: what `--model` names.
    pub hash: [u8; 32],
}

/// SHA-256 of a manifest's bytes, as `--model` and `shardctl split` give it.
pub fn manifest_hash(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// The DHT key nodes holding the manifest of hash `hash` announce under:
/// `SHA1("shardnet:manifest:" + hex(hash))`. Cluster-independent: the hash names the model.
pub fn manifest_dht_key(hash: &[u8; 32]) -> [u8; 20] {
    crate::hash::sha1(format!("shardnet:manifest:{}", crate::hash::to_hex(hash)).as_bytes())
}

impl Manifest {
    /// Parses and checks a manifest (see the module doc); errors say which shard and why.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(format!("manifest of {} bytes; at most {MAX_MANIFEST_BYTES}", bytes.len()));
        }
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let model_id = v["model_id"].as_str().ok_or("manifest has no model_id")?.to_string();
        let block_count =
            v["block_count"].as_u64().and_then(|n| u32::try_from(n).ok()).ok_or("manifest has no block_count")?;
        let count = v["shard_count"].as_u64().ok_or("manifest has no shard_count")? as usize;
        let list = v["shards"].as_array().ok_or("manifest has no shards array")?;
        if count == 0 || count > MAX_MANIFEST_SHARDS || list.len() != count {
            return Err(format!("manifest lists {} shards for shard_count {count}", list.len()));
        }
        let mut shards: Vec<Option<ManifestShard>> = vec![None; count];
        for s in list {
            let id = s["shard_id"]
                .as_u64()
                .filter(|&i| (i as usize) < count)
                .ok_or_else(|| format!("manifest shard_id {} is not below shard_count {count}", s["shard_id"]))?
                as u32;
            let filename = s["filename"].as_str().ok_or_else(|| format!("shard {id}: no filename"))?;
            check_file_name(filename).map_err(|e| format!("shard {id}: {e}"))?;
            let size = s["size"].as_u64().ok_or_else(|| format!("shard {id}: no size"))?;
            let info_hash = s["info_hash"]
                .as_str()
                .and_then(InfoHash::from_hex)
                .ok_or_else(|| format!("shard {id}: info_hash is not 40 hex digits"))?;
            let l = s["layers"].as_array().filter(|l| l.len() == 2);
            let layer = |i: usize| l.and_then(|l| l[i].as_u64()).and_then(|n| u32::try_from(n).ok());
            let (Some(begin), Some(end)) = (layer(0), layer(1)) else {
                return Err(format!("shard {id}: layers must be [begin, end]"));
            };
            if shards[id as usize].is_some() {
                return Err(format!("shard {id} is listed twice"));
            }
            shards[id as usize] = Some(ManifestShard {
                shard_id: id,
                filename: filename.to_string(),
                size,
                info_hash,
                layers: (begin, end),
            });
        }
        let shards: Vec<ManifestShard> = shards.into_iter().map(|s| s.expect("each id once, count ids")).collect();
        let mut next = 0u32;
        for s in &shards {
            let (b, e) = s.layers;
            if b > next {
                return Err(format!("layers {next}..{b} are in no shard (shard {} starts at {b})", s.shard_id));
            }
            if b < next {
                return Err(format!("shard {} starts at layer {b}, inside the shard before it (..{next})", s.shard_id));
            }
            if e <= b {
                return Err(format!("shard {} has the empty layer range {b}..{e}", s.shard_id));
            }
            next = e;
        }
        if next != block_count {
            return Err(format!("the shards cover layers 0..{next}, the model has {block_count}"));
        }
        Ok(Manifest { model_id, block_count, shards, hash: manifest_hash(bytes) })
    }

    /// Parses `bytes` and checks that they hash to `pin`.
    pub fn parse_pinned(bytes: &[u8], pin: &[u8; 32]) -> Result<Manifest, String> {
        let got = manifest_hash(bytes);
        if got != *pin {
            return Err(format!(
                "manifest hashes to {}, not the pinned {}",
                crate::hash::to_hex(&got),
                crate::hash::to_hex(pin)
            ));
        }
        Manifest::parse(bytes)
    }

    pub fn shard(&self, id: u32) -> Option<&ManifestShard> {
        self.shards.get(id as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(layers: &[(u32, u32)], block_count: u32) -> Vec<u8> {
        let shards: Vec<Value> = layers
            .iter()
            .enumerate()
            .map(|(i, (b, e))| {
                json!({"shard_id": i, "filename": format!("shard-{i}.gguf"), "size": 100,
                    "info_hash": format!("{:040x}", i + 1), "layers": [b, e]})
            })
            .collect();
        serde_json::to_vec(&json!({"model_id": "m", "block_count": block_count, "shard_count": layers.len(),
            "shards": shards}))
        .unwrap()
    }

    #[test]
    fn a_whole_contiguous_manifest_parses() {
        let m = Manifest::parse(&manifest(&[(0, 2), (2, 5), (5, 6)], 6)).unwrap();
        assert_eq!(m.shards.len(), 3);
        assert_eq!(m.shard(1).unwrap().layers, (2, 5));
    }

    #[test]
    fn overlapping_missing_or_short_layer_ranges_are_refused() {
        let overlap = Manifest::parse(&manifest(&[(0, 3), (2, 6)], 6)).unwrap_err();
        assert!(overlap.contains("inside the shard before"), "{overlap}");
        let gap = Manifest::parse(&manifest(&[(0, 2), (3, 6)], 6)).unwrap_err();
        assert!(gap.contains("in no shard"), "{gap}");
        let short = Manifest::parse(&manifest(&[(0, 2), (2, 5)], 6)).unwrap_err();
        assert!(short.contains("cover layers 0..5"), "{short}");
        assert!(Manifest::parse(&manifest(&[(0, 0), (0, 6)], 6)).is_err());
    }

    #[test]
    fn the_pin_is_the_sha256_of_the_bytes() {
        let bytes = manifest(&[(0, 6)], 6);
        let pin = manifest_hash(&bytes);
        assert!(Manifest::parse_pinned(&bytes, &pin).is_ok());
        let mut other = bytes.clone();
        other.push(b'\n');
        assert!(Manifest::parse_pinned(&other, &pin).unwrap_err().contains("not the pinned"));
    }
}
