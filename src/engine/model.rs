//! A shard as the engine sees it: the model's hyper-parameters from GGUF metadata, the shard's
//! layer range, and every weight it needs wrapped in place over the memory map.

use super::ggml::{self, Layout, RopeParams, Tensor, WeightSpec, Weights};
use super::sidecar;
use crate::gguf::reader::Gguf;
use crate::gguf::types::GgmlType;
use memmap2::Mmap;
use std::sync::Arc;

/// LLaMA hyper-parameters, as llama.cpp reads them.
#[derive(Clone, Debug, PartialEq)]
pub struct Hparams {
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_ff: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_rot: u32,
    pub n_vocab: u32,
    pub n_ctx_train: u32,
    pub rms_eps: f32,
    pub rope: RopeParams,
}

/// Bounds on the hyper-parameters a shard may declare. Each is far above any released LLaMA-family
/// model and far below what would overflow a size computed from it; a value outside them is
/// refused at load, before anything reaches ggml (whose asserts abort the process).
pub mod limits {
    /// `block_count`.
    pub const MAX_LAYERS: u32 = 4096;
    /// `embedding_length`.
    pub const MAX_EMBD: u32 = 1 << 16;
    /// `feed_forward_length`.
    pub const MAX_FF: u32 = 1 << 20;
    /// `attention.head_count` (and `head_count_kv`).
    pub const MAX_HEADS: u32 = 1024;
    /// `attention.key_length` / `value_length`: the head size.
    pub const MAX_HEAD_DIM: u32 = 1024;
    /// `vocab_size` (or the tokenizer's token count).
    pub const MAX_VOCAB: u32 = 1 << 24;
    /// `context_length` and `rope.scaling.original_context_length`.
    pub const MAX_CONTEXT: u32 = 1 << 24;
    /// `attention.layer_norm_rms_epsilon`: in `(0, MAX_RMS_EPS]` (models use 1e-6..1e-5).
    pub const MAX_RMS_EPS: f32 = 1.0;
    /// `rope.freq_base`: in `(1, MAX_ROPE_BASE]` (LLaMA 2: 1e4, LLaMA 3: 5e5).
    pub const MAX_ROPE_BASE: f32 = 1e12;
    /// `rope.scaling.factor`: in `(0, MAX_ROPE_FACTOR]`.
    pub const MAX_ROPE_FACTOR: f32 = 1024.0;
}

/// Reads `llama.*` keys, each checked for its type and range: a key that is present must be what
/// llama.cpp expects, never silently replaced by a default.
struct Keys<'g, 'a> {
    g: &'g Gguf<'a>,
}

impl Keys<'_, '_> {
    fn opt_int(&self, key: &str, min: u32, max: u32) -> Result<Option<u32>, String> {
        let full = format!("llama.{key}");
        let Some(v) = self.g.get(&full) else { return Ok(None) };
        let n = v.as_u64().ok_or_else(|| format!("{full} must be a non-negative integer, it is {v:?}"))?;
        match u32::try_from(n) {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(format!("{full} = {n} is outside {min}..={max}")),
        }
    }

    fn int(&self, key: &str, min: u32, max: u32) -> Result<u32, String> {
        self.opt_int(key, min, max)?.ok_or_else(|| format!("missing llama.{key}"))
    }

    /// A float key, finite and in `(above, max]`.
    fn opt_float(&self, key: &str, above: f32, max: f32) -> Result<Option<f32>, String> {
        let full = format!("llama.{key}");
        let Some(v) = self.g.get(&full) else { return Ok(None) };
        let x = v.as_f64().ok_or_else(|| format!("{full} must be a number, it is {v:?}"))? as f32;
        if !x.is_finite() || x <= above || x > max {
            return Err(format!("{full} = {x} is outside ({above}, {max}] or not finite"));
        }
        Ok(Some(x))
    }
}

impl Hparams {
    /// The hyper-parameters of a LLaMA GGUF, every one checked for type and range (see
    /// [`limits`]) and for consistency (heads dividing the embedding, KV heads dividing the
    /// heads, an even head size equal to the RoPE dimension). The error names the key and value.
    pub fn from_gguf(g: &Gguf) -> Result<Hparams, String> {
        use limits::*;
        let arch = g.get_str("general.architecture").ok_or("no general.architecture")?;
        if arch != "llama" {
            return Err(format!("architecture {arch:?} is not supported (llama only)"));
        }
        let k = Keys { g };
        let n_layer = k.int("block_count", 1, MAX_LAYERS)?;
        let n_embd = k.int("embedding_length", 1, MAX_EMBD)?;
        let n_ff = k.int("feed_forward_length", 1, MAX_FF)?;
        let n_head = k.int("attention.head_count", 1, MAX_HEADS)?;
        let n_head_kv = k.opt_int("attention.head_count_kv", 1, MAX_HEADS)?.unwrap_or(n_head);
        if n_head % n_head_kv != 0 {
            return Err(format!("head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"));
        }
        if n_embd % n_head != 0 {
            return Err(format!("embedding_length {n_embd} is not a multiple of head_count {n_head}"));
        }
        let head_dim = k.opt_int("attention.key_length", 2, MAX_HEAD_DIM)?.unwrap_or(n_embd / n_head);
        let value_dim = k.opt_int("attention.value_length", 2, MAX_HEAD_DIM)?.unwrap_or(head_dim);
        if value_dim != head_dim || head_dim % 2 != 0 {
            return Err(format!("key and value head sizes ({head_dim}, {value_dim}) must be equal and even"));
        }
        let n_rot = k.opt_int("rope.dimension_count", 2, MAX_HEAD_DIM)?.unwrap_or(head_dim);
        if n_rot != head_dim {
            return Err(format!("rope.dimension_count {n_rot} differs from the head size {head_dim}"));
        }
        let n_vocab = match k.opt_int("vocab_size", 1, MAX_VOCAB)? {
            Some(v) => v,
            None => match g.get("tokenizer.ggml.tokens") {
                Some(crate::gguf::reader::MetaValue::Array(a)) if a.len >= 1 && a.len <= MAX_VOCAB as u64 => {
                    a.len as u32
                }
                Some(_) => return Err(format!("tokenizer.ggml.tokens must be an array of 1..={MAX_VOCAB} tokens")),
                None => return Err("no vocabulary size (llama.vocab_size or tokenizer.ggml.tokens)".into()),
            },
        };
        let n_ctx_train = k.int("context_length", 1, MAX_CONTEXT)?;
        let rms_eps = k.opt_float("attention.layer_norm_rms_epsilon", 0.0, MAX_RMS_EPS)?.unwrap_or(1e-5);
        // RoPE scaling, as llama.cpp: linear divides positions; YaRN needs its extra keys.
        let scaling = match g.get("llama.rope.scaling.type") {
            None => "none",
            Some(v) => v.as_str().ok_or("llama.rope.scaling.type must be a string")?,
        };
        let factor = k.opt_float("rope.scaling.factor", 0.0, MAX_ROPE_FACTOR)?.unwrap_or(1.0);
        let freq_scale = match scaling {
            "none" | "linear" | "yarn" => 1.0 / factor,
            other => return Err(format!("rope scaling {other:?} is not supported")),
        };
        let n_ctx_orig = k.opt_int("rope.scaling.original_context_length", 1, MAX_CONTEXT)?.unwrap_or(n_ctx_train);
        let rope = RopeParams {
            n_ctx_orig: n_ctx_orig as i32,
            freq_base: k.opt_float("rope.freq_base", 1.0, MAX_ROPE_BASE)?.unwrap_or(10000.0),
            freq_scale,
            ext_factor: if scaling == "yarn" { 1.0 } else { 0.0 },
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        Ok(Hparams { n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, n_rot, n_vocab, n_ctx_train, rms_eps, rope })
    }

    /// Width of one token's keys (or values) across the KV heads.
    pub fn n_embd_kv(&self) -> u32 {
        self.head_dim * self.n_head_kv
    }
}

/// Weight types ggml's CPU backend multiplies (F32, F16, BF16, the legacy, K- and IQ-quants,
/// ternary and MXFP4); others (integer types, Q8_K, ...) would make ggml abort.
const COMPUTABLE: &[u32] =
    &[0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29, 30, 34, 35, 39];

/// A loaded shard: layers `[begin, end)` of the model, weights over the map.
pub struct ShardModel {
    pub hp: Hparams,
    pub begin: u32,
    pub end: u32,
    weights: Weights,
    /// Where the repackable matrices come from.
    pub source: WeightsSource,
    _map: Arc<Mmap>,
    /// The repack sidecar's map, when the weights come from it.
    sidecar: Option<sidecar::Mapped>,
}

/// Where a shard's matrices that ggml has a faster CPU layout for are read from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WeightsSource {
    /// The shard's own map, as it is (no repack wanted, or none available on this CPU).
    Map,
    /// The repack sidecar beside the shard, mapped read-only; `rebuilt` when this load wrote it
    /// (it was missing, stale or corrupt).
    Sidecar { rebuilt: bool },
    /// A copy in the repack layout in anonymous memory (the sidecar could not be written).
    Copy,
}

/// Names of one layer's weights, with the shapes they must have.
fn layer_specs(hp: &Hparams, l: u32) -> Vec<(String, Vec<u64>)> {
    let (e, f, q, kv) = (hp.n_embd as u64, hp.n_ff as u64, (hp.head_dim * hp.n_head) as u64, hp.n_embd_kv() as u64);
    [
        ("attn_norm", vec![e]),
        ("attn_q", vec![e, q]),
        ("attn_k", vec![e, kv]),
        ("attn_v", vec![e, kv]),
        ("attn_output", vec![q, e]),
        ("ffn_norm", vec![e]),
        ("ffn_gate", vec![e, f]),
        ("ffn_up", vec![e, f]),
        ("ffn_down", vec![f, e]),
    ]
    .into_iter()
    .map(|(n, dims)| (format!("blk.{l}.{n}.weight"), dims))
    .collect()
}

/// The layer range `[shard.layer_begin, shard.layer_end)` of a file (all layers without the keys),
/// checked against the model's layer count and against the `blk.N` tensors present: none may lie
/// outside the range.
fn layer_range(g: &Gguf, hp: &Hparams) -> Result<(u32, u32), String> {
    let key = |k: &str, default: u32| -> Result<u32, String> {
        match g.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("{k} must be a u32, it is {}", v.to_json())),
        }
    };
    let (begin, end) = (key("shard.layer_begin", 0)?, key("shard.layer_end", hp.n_layer)?);
    if begin >= end || end > hp.n_layer {
        return Err(format!("layer range [{begin}, {end}) does not fit a {}-layer model", hp.n_layer));
    }
    for t in &g.tensors {
        let layer = t.name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<u64>().ok());
        if let Some(l) = layer
            && !(begin as u64..end as u64).contains(&l)
        {
            return Err(format!("tensor {} is outside the shard's layer range [{begin}, {end})", t.name));
        }
    }
    Ok((begin, end))
}

/// Every check a shard's file must pass before ggml sees it: the hyper-parameters
/// ([`Hparams::from_gguf`]), the layer range, and each weight the range needs (present, with its
/// shape, of a type ggml computes, norms in F32). Returns the hyper-parameters, the range and the
/// weights to wrap. Pure: the node runs it when a shard loads, the engine again when it wraps one.
pub fn check<'a>(g: &Gguf<'a>) -> Result<(Hparams, u32, u32, Vec<WeightSpec<'a>>), String> {
    let hp = Hparams::from_gguf(g)?;
    let (begin, end) = layer_range(g, &hp)?;
    let (e, v) = (hp.n_embd as u64, hp.n_vocab as u64);
    let mut wanted: Vec<(String, Vec<u64>, bool)> = Vec::new(); // name, shape, must be F32
    if begin == 0 {
        wanted.push(("token_embd.weight".into(), vec![e, v], false));
    }
    for l in begin..end {
        for (name, dims) in layer_specs(&hp, l) {
            let norm = name.ends_with("norm.weight");
            wanted.push((name, dims, norm));
        }
    }
    if end == hp.n_layer {
        wanted.push(("output_norm.weight".into(), vec![e], true));
        let head = if g.tensor("output.weight").is_some() { "output.weight" } else { "token_embd.weight" };
        if !(head == "token_embd.weight" && begin == 0) {
            wanted.push((head.into(), vec![e, v], false));
        }
    }
    if g.tensor("rope_freqs.weight").is_some() {
        wanted.push(("rope_freqs.weight".into(), vec![(hp.n_rot / 2) as u64], true));
    }
    let mut specs = Vec::with_capacity(wanted.len());
    for (name, dims, must_f32) in &wanted {
        let t = g.tensor(name).ok_or_else(|| format!("tensor {name} is missing"))?;
        if &t.dims != dims {
            return Err(format!("tensor {name} has shape {:?}, expected {dims:?}", t.dims));
        }
        if *must_f32 && t.ggml_type != GgmlType::F32 {
            return Err(format!("tensor {name} must be F32, it is {}", t.ggml_type.name()));
        }
        if !COMPUTABLE.contains(&t.ggml_type.0) {
            return Err(format!("tensor {name} has type {} which ggml cannot compute", t.ggml_type.name()));
        }
        specs.push(WeightSpec {
            name: t.name,
            dtype: t.ggml_type.0 as ggml::RawType,
            ne: t.dims.iter().map(|&d| d as i64).collect(),
            data: t.data,
            // The embedding is read by row (get_rows), so it keeps the file's layout.
            matmul_only: name.starts_with("blk.") && !*must_f32 || name == "output.weight",
        });
    }
    Ok((hp, begin, end, specs))
}

impl ShardModel {
    /// Checks the file ([`check`]) and wraps its weights over `map`.
    ///
    /// With `repack`, the matrices ggml's CPU backend has a faster layout for come from the
    /// sidecar at `sidecar` (used if it matches, else rebuilt), or from an anonymous copy when
    /// there is no sidecar place or it cannot be written.
    pub fn load(map: Arc<Mmap>, repack: bool, sidecar: Option<&sidecar::Place>) -> Result<ShardModel, String> {
        let g = Gguf::parse(&map).map_err(|e| format!("not a valid GGUF file: {e}"))?;
        let (hp, begin, end, specs) = check(&g)?;
        let plan = if repack { ggml::repack_plan(&specs) } else { vec![false; specs.len()] };
        let (weights, source, side) = if !plan.contains(&true) {
            (Weights::over_map(&map, &specs, Layout::AsIs)?, WeightsSource::Map, None)
        } else {
            match sidecar.map(|place| sidecar::open_or_build(place, &specs, &plan)) {
                Some(Ok((mapped, rebuilt))) => {
                    let layout = Layout::Repacked { map: &mapped.map, offsets: &mapped.offsets };
                    let weights = Weights::over_map(&map, &specs, layout)?;
                    (weights, WeightsSource::Sidecar { rebuilt }, Some(mapped))
                }
                failed => {
                    if let Some(Err(why)) = failed {
                        crate::warn!("repack sidecar unusable ({why}); repacking into memory instead");
                    }
                    (Weights::over_map(&map, &specs, Layout::RepackCopy)?, WeightsSource::Copy, None)
                }
            }
        };
        drop(g);
        Ok(ShardModel { hp, begin, end, weights, source, _map: map, sidecar: side })
    }

    /// Whether the repack sidecar the weights are mapped from was written since it was checked
    /// (one `fstat`; logged and counted): the shard must be loaded again. False without one.
    pub fn sidecar_changed(&self, what: &str) -> bool {
        self.sidecar.as_ref().is_some_and(|m| m.changed(what))
    }

    /// Weight bytes copied out of the map into anonymous memory (only a repack without sidecar).
    pub fn repacked_bytes(&self) -> usize {
        self.weights.repacked_bytes()
    }

    pub fn first(&self) -> bool {
        self.begin == 0
    }
    pub fn last(&self) -> bool {
        self.end == self.hp.n_layer
    }
    pub fn layers(&self) -> u32 {
        self.end - self.begin
    }

    /// A weight the load checked exists.
    pub fn w(&self, name: &str) -> Tensor<'_> {
        self.weights.get(name).unwrap_or_else(|| panic!("weight {name} was not loaded"))
    }
    pub fn opt(&self, name: &str) -> Option<Tensor<'_>> {
        self.weights.get(name)
    }
    /// The output head: `output.weight`, or the token embedding when the output is tied.
    pub fn head(&self) -> Tensor<'_> {
        self.opt("output.weight").unwrap_or_else(|| self.w("token_embd.weight"))
    }
}
