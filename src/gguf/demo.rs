//! `shardctl demo-model`: a small deterministic LLaMA model.
//!
//! Random weights from a seed (the same seed gives the same bytes), the
//! standard LLaMA tensor names and hyper-parameter keys, and a real
//! SentencePiece-style tokenizer section (`tokenizer.ggml.model = "llama"`:
//! `<unk>`, `<s>`, `</s>`, the 256 byte tokens `<0x00>`..`<0xFF>`, then scored
//! pieces with `▁` marking a leading space), so llama.cpp-compatible readers
//! accept it. It is the tests' model and the fallback where PyPI is out of reach.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, ensure};

use super::reader::value_type;
use super::types::GgmlType;
use super::writer::{Builder, Value};

#[derive(Clone, Debug, PartialEq)]
pub struct DemoConfig {
    pub layers: u32,
    pub embd: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub ffn: u32,
    pub vocab: u32,
    pub context: u32,
    pub weight_type: GgmlType,
    pub seed: u64,
    /// Output matrix shared with the token embedding (no `output.weight`).
    pub tied: bool,
    /// Written as `tokenizer.chat_template` (tests of chat templates).
    pub chat_template: Option<String>,
    /// Control tokens placed after `</s>` (ids 3, 4, ...), such as `<|im_start|>`.
    pub control_tokens: Vec<String>,
}

impl Default for DemoConfig {
    fn default() -> DemoConfig {
        DemoConfig {
            layers: 8,
            embd: 128,
            heads: 4,
            kv_heads: 2,
            ffn: 384,
            vocab: 512,
            context: 512,
            weight_type: GgmlType::F32,
            seed: 42,
            tied: false,
            chat_template: None,
            control_tokens: Vec::new(),
        }
    }
}

impl DemoConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.layers >= 1 && self.layers <= 256, "--layers must be 1..=256");
        ensure!(self.heads >= 1 && self.embd.is_multiple_of(self.heads), "--embd must be a multiple of --heads");
        ensure!((self.embd / self.heads).is_multiple_of(2), "the head size (embd / heads) must be even for RoPE");
        ensure!(
            self.kv_heads >= 1 && self.heads.is_multiple_of(self.kv_heads),
            "--heads must be a multiple of --kv-heads"
        );
        ensure!(self.vocab >= 259 + 16, "--vocab must be at least 275 (3 control + 256 byte tokens + pieces)");
        ensure!(
            self.vocab as usize >= 259 + 16 + self.control_tokens.len(),
            "--vocab too small for {} extra control tokens",
            self.control_tokens.len()
        );
        ensure!(self.vocab <= 1 << 20, "--vocab at most 1048576");
        ensure!(self.context >= 16, "--context must be at least 16");
        ensure!(
            self.embd >= 32 && self.embd <= 16384 && self.ffn >= 32 && self.ffn <= 65536,
            "--embd/--ffn out of range"
        );
        let block = self.weight_type.block_size().context("unknown weight type")?;
        ensure!(
            (self.embd as u64).is_multiple_of(block) && (self.ffn as u64).is_multiple_of(block),
            "--embd and --ffn must be multiples of {block} for {}",
            self.weight_type
        );
        Ok(())
    }
}

/// xorshift64*: small, fast and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// f32 -> IEEE half, round to nearest even.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rounded = m + half - 1 + ((m >> shift) & 1);
        return sign | (rounded >> shift) as u16;
    }
    let rounded = man + 0xfff + ((man >> 13) & 1);
    let (e, rounded) = if rounded & 0x80_0000 != 0 { (e + 1, 0) } else { (e, rounded) };
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    sign | ((e as u16) << 10) | (rounded >> 13) as u16
}

/// Encodes `values` as `ty` (F32, F16, Q8_0 or Q4_0, as ggml's reference quantizers).
pub fn encode(values: &[f32], ty: GgmlType) -> Vec<u8> {
    match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|v| f32_to_f16(*v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(values.len() / 32 * 34);
            for block in values.chunks(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
                out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
            }
            out
        }
        GgmlType::Q4_0 => {
            let mut out = Vec::with_capacity(values.len() / 32 * 18);
            for block in values.chunks(32) {
                // The value of largest magnitude, sign kept, maps to -8.
                let max = block.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..16).map(|j| q(block[j]) | q(block[j + 16]) << 4));
            }
            out
        }
        other => panic!("demo models are F32, F16, Q8_0 or Q4_0, not {other}"),
    }
}

/// Pieces of the demo vocabulary after the control and byte tokens.
fn pieces(n: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he",
        "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they", "you", "were", "their",
        "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when", "will", "would", "who", "so",
        "no", "model", "shard", "node", "layer", "token", "network", "peer", "data", "hello", "world",
    ];
    let mut out: Vec<String> = Vec::new();
    let push = |s: String, out: &mut Vec<String>| {
        if !out.contains(&s) {
            out.push(s);
        }
    };
    push("▁".into(), &mut out);
    for w in WORDS {
        push(format!("▁{w}"), &mut out);
    }
    for c in ('a'..='z').chain('A'..='Z').chain('0'..='9') {
        push(c.to_string(), &mut out);
        push(format!("▁{c}"), &mut out);
    }
    for p in [".", ",", "!", "?", "'", "-", ":", ";", "(", ")", "\""] {
        push(p.to_string(), &mut out);
    }
    for w in WORDS {
        push(w.to_string(), &mut out);
    }
    'outer: for a in "etaoinshrdlu".chars() {
        for b in "etaoinshrdlu".chars() {
            if out.len() >= n {
                break 'outer;
            }
            push(format!("{a}{b}"), &mut out);
            push(format!("▁{a}{b}"), &mut out);
        }
    }
    let mut k = 0;
    while out.len() < n {
        push(format!("<extra_{k}>"), &mut out);
        k += 1;
    }
    out.truncate(n);
    out
}

/// The builder (metadata and tensor specs) and each tensor's bytes.
pub fn build(c: &DemoConfig) -> Result<(Builder, Vec<Vec<u8>>)> {
    c.validate()?;
    let mut b = Builder::new();
    let head_dim = c.embd / c.heads;
    let kv_dim = head_dim * c.kv_heads;
    let file_type = match c.weight_type {
        GgmlType::F32 => 0u32,
        GgmlType::F16 => 1,
        _ => 7, // LLAMA_FTYPE_MOSTLY_Q8_0
    };
    let s = |v: &str| Value::String(v.to_string());
    b.set("general.architecture", s("llama"));
    b.set("general.name", s("shardnet demo"));
    b.set("general.file_type", Value::U32(file_type));
    b.set("general.quantization_version", Value::U32(2));
    b.set("general.alignment", Value::U32(32));
    b.set("llama.block_count", Value::U32(c.layers));
    b.set("llama.context_length", Value::U32(c.context));
    b.set("llama.embedding_length", Value::U32(c.embd));
    b.set("llama.feed_forward_length", Value::U32(c.ffn));
    b.set("llama.attention.head_count", Value::U32(c.heads));
    b.set("llama.attention.head_count_kv", Value::U32(c.kv_heads));
    b.set("llama.rope.freq_base", Value::F32(10000.0));
    b.set("llama.rope.dimension_count", Value::U32(head_dim));
    b.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    b.set("llama.vocab_size", Value::U32(c.vocab));

    // Tokenizer: SentencePiece-style ("llama") vocabulary.
    let mut tokens = vec![s("<unk>"), s("<s>"), s("</s>")];
    let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
    let mut scores = vec![Value::F32(0.0), Value::F32(0.0), Value::F32(0.0)];
    for t in &c.control_tokens {
        tokens.push(s(t));
        types.push(Value::I32(3));
        scores.push(Value::F32(0.0));
    }
    for byte in 0..=255u8 {
        tokens.push(s(&format!("<0x{byte:02X}>")));
        types.push(Value::I32(6));
        scores.push(Value::F32(0.0));
    }
    for (i, p) in pieces(c.vocab as usize - tokens.len()).into_iter().enumerate() {
        tokens.push(Value::String(p));
        types.push(Value::I32(1));
        scores.push(Value::F32(-(i as f32)));
    }
    b.set("tokenizer.ggml.model", s("llama"));
    b.set("tokenizer.ggml.pre", s("default"));
    b.set("tokenizer.ggml.tokens", Value::Array(value_type::STRING, tokens));
    b.set("tokenizer.ggml.scores", Value::Array(value_type::F32, scores));
    b.set("tokenizer.ggml.token_type", Value::Array(value_type::I32, types));
    b.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    b.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    b.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
    b.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    b.set("tokenizer.ggml.add_eos_token", Value::Bool(false));
    if let Some(t) = &c.chat_template {
        b.set("tokenizer.chat_template", s(t));
    }

    let mut rng = Rng(c.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut data = Vec::new();
    let mut add = |b: &mut Builder, name: &str, dims: &[u32], ty: GgmlType, rng: &mut Rng, norm: bool| -> Result<()> {
        let n: usize = dims.iter().map(|d| *d as usize).product();
        let scale = 1.0 / (dims[0] as f32).sqrt();
        let values: Vec<f32> = (0..n).map(|_| if norm { 1.0 + 0.1 * rng.unit() } else { scale * rng.unit() }).collect();
        let dims64: Vec<u64> = dims.iter().map(|d| *d as u64).collect();
        b.add_tensor(name, &dims64, ty)?;
        data.push(encode(&values, ty));
        Ok(())
    };
    let w = c.weight_type;
    add(&mut b, "token_embd.weight", &[c.embd, c.vocab], w, &mut rng, false)?;
    for l in 0..c.layers {
        let t = |n: &str| format!("blk.{l}.{n}.weight");
        add(&mut b, &t("attn_norm"), &[c.embd], GgmlType::F32, &mut rng, true)?;
        add(&mut b, &t("attn_q"), &[c.embd, c.embd], w, &mut rng, false)?;
        add(&mut b, &t("attn_k"), &[c.embd, kv_dim], w, &mut rng, false)?;
        add(&mut b, &t("attn_v"), &[c.embd, kv_dim], w, &mut rng, false)?;
        add(&mut b, &t("attn_output"), &[c.embd, c.embd], w, &mut rng, false)?;
        add(&mut b, &t("ffn_norm"), &[c.embd], GgmlType::F32, &mut rng, true)?;
        add(&mut b, &t("ffn_gate"), &[c.embd, c.ffn], w, &mut rng, false)?;
        add(&mut b, &t("ffn_up"), &[c.embd, c.ffn], w, &mut rng, false)?;
        add(&mut b, &t("ffn_down"), &[c.ffn, c.embd], w, &mut rng, false)?;
    }
    add(&mut b, "output_norm.weight", &[c.embd], GgmlType::F32, &mut rng, true)?;
    if !c.tied {
        add(&mut b, "output.weight", &[c.embd, c.vocab], w, &mut rng, false)?;
    }
    Ok((b, data))
}

/// Writes the demo model to `path`; returns its size in bytes.
pub fn write(c: &DemoConfig, path: &Path) -> Result<u64> {
    let (b, data) = build(c)?;
    let mut w = BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let n = b.write(&mut w, |i, w| w.write_all(&data[i]))?;
    w.into_inner().map_err(|e| e.into_error())?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Gguf;

    #[test]
    fn f16_conversion_matches_known_values() {
        for (x, h) in [
            (0.0f32, 0x0000u16),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.5, 0x3800),
            (65504.0, 0x7bff),
            (1e6, 0x7c00),
            (5.960_464_5e-8, 0x0001),
            (0.333_333_34, 0x3555),
            (f32::INFINITY, 0x7c00),
        ] {
            assert_eq!(f32_to_f16(x), h, "{x}");
        }
        assert_eq!(f32_to_f16(f32::NAN) & 0x7c00, 0x7c00);
    }

    #[test]
    fn q8_0_blocks_are_34_bytes_with_scale_first() {
        let v: Vec<f32> = (0..64).map(|i| i as f32 - 32.0).collect();
        let q = encode(&v, GgmlType::Q8_0);
        assert_eq!(q.len(), 68);
        assert_eq!(u16::from_le_bytes([q[0], q[1]]), f32_to_f16(32.0 / 127.0));
        assert_eq!(q[2] as i8, -127);
    }

    #[test]
    fn demo_model_is_deterministic_and_readable() {
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0] {
            let c = DemoConfig { weight_type: ty, ..DemoConfig::default() };
            let (b, data) = build(&c).unwrap();
            let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
            let bytes = b.to_bytes(&refs).unwrap();
            let (b2, data2) = build(&c).unwrap();
            let refs2: Vec<&[u8]> = data2.iter().map(|d| d.as_slice()).collect();
            assert_eq!(bytes, b2.to_bytes(&refs2).unwrap(), "same seed, same bytes");
            let g = Gguf::parse(&bytes).unwrap();
            assert_eq!(g.tensors.len(), 2 + 9 * 8 + 1);
            assert_eq!(g.get_u64("llama.block_count"), Some(8));
            match g.get("tokenizer.ggml.tokens").unwrap() {
                crate::gguf::MetaValue::Array(a) => {
                    assert_eq!(a.len, 512);
                    let toks: Vec<_> = a.iter().map(|t| t.as_str().unwrap().to_string()).collect();
                    assert_eq!(toks[3], "<0x00>");
                    assert_eq!(toks[258], "<0xFF>");
                    let unique: std::collections::HashSet<_> = toks.iter().collect();
                    assert_eq!(unique.len(), toks.len(), "token strings are unique");
                }
                other => panic!("{other:?}"),
            }
        }
        let other_seed = build(&DemoConfig { seed: 7, ..DemoConfig::default() }).unwrap().1;
        assert_ne!(other_seed, build(&DemoConfig::default()).unwrap().1);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(build(&DemoConfig { heads: 3, ..DemoConfig::default() }).is_err());
        assert!(build(&DemoConfig { kv_heads: 3, ..DemoConfig::default() }).is_err());
        assert!(build(&DemoConfig { vocab: 100, ..DemoConfig::default() }).is_err());
        assert!(
            build(&DemoConfig { embd: 48, heads: 4, weight_type: GgmlType::Q8_0, ..DemoConfig::default() }).is_err()
        );
    }
}
