//! Cutting a LLaMA-family GGUF model into layer-range shards (DESIGN section 7).
//!
//! Each shard is a valid GGUF file holding the model's metadata (tokenizer
//! included) plus `shard.*` keys, the tensors of its layers (`blk.L.*`), and:
//! shard 0 the token embedding, the last shard the output norm and the output
//! matrix (the token embedding again when the output is tied). Tensors that
//! belong to no layer and are neither (e.g. `rope_freqs.weight`) go to every
//! shard. Layers are assigned so that the largest shard is as small as
//! possible. Tensor data is streamed from the source map to each shard.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;
use serde_json::{Value as Json, json};

use super::reader::{Gguf, TensorInfo};
use super::writer::{Builder, Value};
use crate::hash::{self, to_hex};
use crate::torrent::create;
use crate::workers::PoolHandle;

pub const MANIFEST: &str = "manifest.json";
/// Bytes of each tensor's data that go into the model id (with the header).
const MODEL_ID_SAMPLE: usize = 4096;

/// Which tensors a shard holds, by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Layer(u32),
    Embedding,
    OutputNorm,
    Output,
    Shared,
}

fn role(name: &str) -> Role {
    if let Some(rest) = name.strip_prefix("blk.")
        && let Some((layer, _)) = rest.split_once('.')
        && let Ok(l) = layer.parse()
    {
        return Role::Layer(l);
    }
    match name {
        "token_embd.weight" => Role::Embedding,
        "output_norm.weight" | "output_norm.bias" => Role::OutputNorm,
        "output.weight" | "output.bias" => Role::Output,
        _ => Role::Shared,
    }
}

/// One planned shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    pub index: u32,
    pub layers: (u32, u32),
    /// Indices into the source's tensor list, in source order.
    pub tensors: Vec<usize>,
    pub data_bytes: u64,
}

/// The model id: SHA-1 of the source's header (metadata and tensor table)
/// and of the first 4 KiB of every tensor's data, so two models that differ
/// in metadata, layout or weights differ in id, without reading whole weights.
pub fn model_id(bytes: &[u8], g: &Gguf<'_>) -> String {
    let mut h = hash::Hasher::default();
    h.update(&bytes[..(g.data_offset as usize).min(bytes.len())]);
    for t in &g.tensors {
        h.update(&t.data[..t.data.len().min(MODEL_ID_SAMPLE)]);
    }
    to_hex(&h.finish())
}

/// Plans `n` shards of `g`, balanced by bytes.
pub fn plan(g: &Gguf<'_>, n: u32) -> Result<Vec<ShardPlan>> {
    let arch = g.get_str("general.architecture").context("no general.architecture: not a model file")?;
    let layers = g.get_u64(&format!("{arch}.block_count")).with_context(|| format!("no {arch}.block_count"))?;
    ensure!(layers > 0 && layers <= u32::MAX as u64, "{arch}.block_count is {layers}");
    let layers = layers as u32;
    ensure!(n >= 1 && n <= layers, "cannot cut {layers} layers into {n} shards (1..={layers})");
    ensure!(g.get("shard.index").is_none(), "the source is already a shard (it has shard.index)");

    let mut layer_bytes = vec![0u64; layers as usize];
    let (mut head, mut tail) = (0u64, 0u64);
    let has_output = g.tensor("output.weight").is_some();
    let embedding = g.tensor("token_embd.weight").context("no token_embd.weight")?;
    for t in &g.tensors {
        match role(t.name) {
            Role::Layer(l) if l < layers => layer_bytes[l as usize] += t.size,
            Role::Layer(l) => bail!("tensor {} names layer {l}, but the model has {layers}", t.name),
            Role::Embedding => head += t.size,
            Role::OutputNorm | Role::Output => tail += t.size,
            Role::Shared => {}
        }
    }
    if !has_output {
        tail += embedding.size; // tied: the last shard carries the embedding as its head
    }

    let ranges = balance(&layer_bytes, n as usize, head, tail);
    let mut plans = Vec::new();
    for (i, (b, e)) in ranges.into_iter().enumerate() {
        let last = i as u32 == n - 1;
        let tensors: Vec<usize> = g
            .tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| match role(t.name) {
                Role::Layer(l) => (b..e).contains(&l),
                Role::Embedding => i == 0 || (last && !has_output),
                Role::OutputNorm | Role::Output => last,
                Role::Shared => true,
            })
            .map(|(k, _)| k)
            .collect();
        let data_bytes = tensors.iter().map(|&k| g.tensors[k].size).sum::<u64>();
        plans.push(ShardPlan { index: i as u32, layers: (b, e), tensors, data_bytes });
    }
    Ok(plans)
}

/// Contiguous layer ranges for `n` shards minimising the largest shard's
/// bytes, where the first also carries `head` and the last `tail` bytes.
fn balance(layer_bytes: &[u64], n: usize, head: u64, tail: u64) -> Vec<(u32, u32)> {
    let l = layer_bytes.len();
    let mut prefix = vec![0u64; l + 1];
    for i in 0..l {
        prefix[i + 1] = prefix[i] + layer_bytes[i];
    }
    let cost =
        |i: usize, j: usize| prefix[j] - prefix[i] + if i == 0 { head } else { 0 } + if j == l { tail } else { 0 };
    // best[k][j]: smallest max cost of cutting layers [0, j) into k shards.
    let mut best = vec![vec![u64::MAX; l + 1]; n + 1];
    let mut cut = vec![vec![0usize; l + 1]; n + 1];
    best[0][0] = 0;
    for k in 1..=n {
        for j in k..=l {
            for i in (k - 1)..j {
                if best[k - 1][i] == u64::MAX {
                    continue;
                }
                let c = best[k - 1][i].max(cost(i, j));
                if c < best[k][j] {
                    best[k][j] = c;
                    cut[k][j] = i;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(n);
    let mut j = l;
    for k in (1..=n).rev() {
        let i = cut[k][j];
        ranges.push((i as u32, j as u32));
        j = i;
    }
    ranges.reverse();
    ranges
}

/// The metadata of shard `p` of `count`: the source's, plus `shard.*`.
fn shard_builder(g: &Gguf<'_>, p: &ShardPlan, count: u32, model_id: &str) -> Builder {
    let mut b = Builder::new();
    for (key, value) in &g.metadata {
        b.metadata.push((key.to_string(), Value::from_meta(value)));
    }
    b.set("shard.index", Value::U32(p.index));
    b.set("shard.count", Value::U32(count));
    b.set("shard.layer_begin", Value::U32(p.layers.0));
    b.set("shard.layer_end", Value::U32(p.layers.1));
    b.set("shard.model_id", Value::String(model_id.to_string()));
    for &k in &p.tensors {
        let t = &g.tensors[k];
        b.tensors.push(super::writer::TensorSpec {
            name: t.name.to_string(),
            dims: t.dims.clone(),
            ggml_type: t.ggml_type,
            size: t.size,
        });
    }
    b
}

/// What `split` wrote.
#[derive(Debug)]
pub struct SplitReport {
    pub model_id: String,
    pub shards: Vec<(PathBuf, ShardPlan)>,
    pub manifest: Json,
}

/// Cuts `source` into `n` shards `shard-K.gguf` in `out_dir`, writes their
/// `.torrent` metadata (as a node would build it) and `manifest.json`.
/// `pool` hashes pieces; `None` skips metadata and the info hashes.
pub fn split(source: &Path, n: u32, out_dir: &Path, pool: Option<&PoolHandle>) -> Result<SplitReport> {
    let file = File::open(source).with_context(|| format!("opening {}", source.display()))?;
    // SAFETY: read-only map of the source model; nothing here writes it.
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", source.display()))?;
    let g = Gguf::parse(&map).with_context(|| format!("reading {}", source.display()))?;
    let plans = plan(&g, n)?;
    let id = model_id(&map, &g);
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let mut shards = Vec::new();
    let mut entries = Vec::new();
    for p in plans {
        let b = shard_builder(&g, &p, n, &id);
        let path = out_dir.join(format!("shard-{}.gguf", p.index));
        let tmp = out_dir.join(format!(".shard-{}.gguf.tmp", p.index));
        write_shard(&b, &g, &file, &p.tensors, &tmp).with_context(|| format!("writing {}", path.display()))?;
        std::fs::rename(&tmp, &path)?;
        let size = std::fs::metadata(&path)?.len();
        let mut entry = json!({
            "shard_id": p.index,
            "filename": format!("shard-{}.gguf", p.index),
            "size": size,
            "layers": [p.layers.0, p.layers.1],
            "info_hash": null,
        });
        if let Some(pool) = pool {
            let m = create::create(&path, None, pool)?;
            let torrent = crate::torrent::torrent_path(out_dir, &format!("shard-{}.gguf", p.index));
            std::fs::write(&torrent, m.to_torrent_bytes()).with_context(|| format!("writing {}", torrent.display()))?;
            entry["info_hash"] = json!(m.info_hash.to_hex());
        }
        entries.push(entry);
        shards.push((path, p));
    }
    let arch = g.get_str("general.architecture").unwrap_or("?");
    let manifest = json!({
        "model_id": id,
        "source": source.file_name().and_then(|n| n.to_str()),
        "architecture": arch,
        "block_count": g.get_u64(&format!("{arch}.block_count")),
        "shard_count": n,
        "shards": entries,
    });
    let text = serde_json::to_string_pretty(&manifest)? + "\n";
    std::fs::write(out_dir.join(MANIFEST), text).context("writing manifest.json")?;
    Ok(SplitReport { model_id: id, shards, manifest })
}

/// Writes one shard. Tensor bytes go file to file with `io::copy`, which on
/// Linux is `copy_file_range`: the kernel copies page cache to page cache,
/// 2.5x faster here than writing from the map through user space.
fn write_shard(b: &Builder, g: &Gguf<'_>, source: &File, tensors: &[usize], path: &Path) -> Result<()> {
    let mut out = File::create(path)?;
    let sources: Vec<&TensorInfo<'_>> = tensors.iter().map(|&k| &g.tensors[k]).collect();
    let mut src = source;
    b.write(&mut out, |i, w| {
        let t = sources[i];
        src.seek(SeekFrom::Start(g.data_offset + t.offset))?;
        let copied = std::io::copy(&mut src.take(t.size), w)?;
        if copied != t.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{}: source ended early", t.name),
            ));
        }
        Ok(())
    })?;
    Ok(())
}
