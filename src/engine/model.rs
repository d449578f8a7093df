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

impl Hparams {
    pub fn from_gguf(g: &Gguf) -> Result<Hparams, String> {
        let arch = g.get_str("general.architecture").ok_or("no general.architecture")?;
        if arch != "llama" {
            return Err(format!("architecture {arch:?} is not supported (llama only)"));
        }
        let int = |key: &str| -> Result<u32, String> {
            let v = g.get_u64(&format!("llama.{key}")).ok_or_else(|| format!("missing llama.{key}"))?;
            u32::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| format!("llama.{key} = {v} is out of range"))
        };
        let opt_int = |key: &str| g.get_u64(&format!("llama.{key}")).map(|v| v as u32);
        let float = |key: &str| g.get(&format!("llama.{key}")).and_then(|v| v.as_f64()).map(|v| v as f32);
        let n_embd = int("embedding_length")?;
        let n_head = int("attention.head_count")?;
        let n_head_kv = opt_int("attention.head_count_kv").unwrap_or(n_head);
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(format!("head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"));
        }
        if n_embd % n_head != 0 {
            return Err(format!("embedding_length {n_embd} is not a multiple of head_count {n_head}"));
        }
        let head_dim = opt_int("attention.key_length").unwrap_or(n_embd / n_head);
        if opt_int("attention.value_length").is_some_and(|v| v != head_dim) || head_dim == 0 || head_dim % 2 != 0 {
            return Err("key and value head sizes must be equal and even".into());
        }
        let n_rot = opt_int("rope.dimension_count").unwrap_or(head_dim);
        if n_rot != head_dim {
            return Err(format!("rope.dimension_count {n_rot} differs from the head size {head_dim}"));
        }
        let n_vocab = match opt_int("vocab_size") {
            Some(v) => v,
            None => match g.get("tokenizer.ggml.tokens") {
                Some(crate::gguf::reader::MetaValue::Array(a)) => a.len as u32,
                _ => return Err("no vocabulary size (llama.vocab_size or tokenizer.ggml.tokens)".into()),
            },
        };
        let n_ctx_train = int("context_length")?;
        // RoPE scaling, as llama.cpp: linear divides positions; YaRN needs its extra keys.
        let scaling = g.get_str("llama.rope.scaling.type").unwrap_or("none");
        let factor = float("rope.scaling.factor").filter(|f| *f > 0.0).unwrap_or(1.0);
        let freq_scale = match scaling {
            "none" | "linear" | "yarn" => 1.0 / factor,
            other => return Err(format!("rope scaling {other:?} is not supported")),
        };
        let n_ctx_orig = opt_int("rope.scaling.original_context_length").unwrap_or(n_ctx_train);
        let rope = RopeParams {
            n_ctx_orig: n_ctx_orig as i32,
            freq_base: float("rope.freq_base").unwrap_or(10000.0),
            freq_scale,
            ext_factor: if scaling == "yarn" { 1.0 } else { 0.0 },
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        Ok(Hparams {
            n_layer: int("block_count")?,
            n_embd,
            n_ff: int("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            n_rot,
            n_vocab,
            n_ctx_train,
            rms_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope,
        })
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
    _sidecar: Option<Mmap>,
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

impl ShardModel {
    /// Checks that the file holds every tensor its layer range needs, with the right shapes and
    /// types ggml can compute, and wraps them over `map`.
    ///
    /// With `repack`, the matrices ggml's CPU backend has a faster layout for come from the
    /// sidecar at `sidecar` (used if it matches, else rebuilt), or from an anonymous copy when
    /// there is no sidecar place or it cannot be written.
    pub fn load(map: Arc<Mmap>, repack: bool, sidecar: Option<&sidecar::Place>) -> Result<ShardModel, String> {
        let g = Gguf::parse(&map).map_err(|e| format!("not a valid GGUF file: {e}"))?;
        let hp = Hparams::from_gguf(&g)?;
        let begin = g.get_u64("shard.layer_begin").unwrap_or(0);
        let end = g.get_u64("shard.layer_end").unwrap_or(hp.n_layer as u64);
        if begin >= end || end > hp.n_layer as u64 {
            return Err(format!("layer range [{begin}, {end}) does not fit a {}-layer model", hp.n_layer));
        }
        let (begin, end) = (begin as u32, end as u32);
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
        let plan = if repack { ggml::repack_plan(&specs) } else { vec![false; specs.len()] };
        let (weights, source, side) = if !plan.contains(&true) {
            (Weights::over_map(&map, &specs, Layout::AsIs)?, WeightsSource::Map, None)
        } else {
            match sidecar.map(|place| open_or_build(place, &specs, &plan)) {
                Some(Ok((mapped, rebuilt))) => {
                    let layout = Layout::Repacked { map: &mapped.map, offsets: &mapped.offsets };
                    let weights = Weights::over_map(&map, &specs, layout)?;
                    (weights, WeightsSource::Sidecar { rebuilt }, Some(mapped.map))
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
        Ok(ShardModel { hp, begin, end, weights, source, _map: map, _sidecar: side })
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

/// The sidecar at `place` if it matches the shard, else a fresh one written there and mapped:
/// (its map, whether it was rebuilt), or why neither worked.
fn open_or_build(
    place: &sidecar::Place,
    specs: &[WeightSpec],
    plan: &[bool],
) -> Result<(sidecar::Mapped, bool), String> {
    match sidecar::open(place, specs, plan) {
        Ok(m) => return Ok((m, false)),
        Err(why) if place.path.exists() => {
            crate::info!("repack sidecar {} not used: {why}; rebuilding it", place.path.display())
        }
        Err(_) => {}
    }
    let t = std::time::Instant::now();
    let bytes = sidecar::build(place, specs, plan)?;
    crate::info!(
        "repack sidecar {} written ({bytes} bytes, {:.0} ms)",
        place.path.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let m = sidecar::open(place, specs, plan).map_err(|e| format!("the sidecar just written does not read back: {e}"))?;
    Ok((m, true))
}
