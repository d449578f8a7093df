//! The LLaMA block over a shard's layer range, as one ggml graph per call.
//!
//! Same operations, in the same order and with the same attention path, as llama.cpp's
//! `llm_build_llama` with flash attention (its CPU default): RMSNorm, Q/K/V, RoPE (mode 0),
//! the new keys and values written into the session's F16 cache, fused attention over the
//! cache with a causal mask, output projection, SwiGLU, residuals.

use super::ggml::{self, Backend, Cache, Graph};
use super::model::ShardModel;

/// Cache rows attended to are rounded up to this, as llama.cpp does (its `n_pad`), so both
/// engines run the same attention shapes.
pub const KV_PAD: u32 = 256;

pub enum StepInput<'i> {
    Tokens(&'i [u32]),
    /// `n_tokens * n_embd` floats, token-major.
    Hidden(&'i [f32]),
}

/// What the graph leaves behind: the last shard's logits (for the last token or every token), or
/// the hidden state for the next shard.
pub enum StepOutput {
    Hidden(Vec<f32>),
    Logits { data: Vec<f32>, rows: usize },
}

/// Runs `n_tokens` tokens at positions `pos..pos+n_tokens` through the shard, reading and extending
/// `cache` (2 tensors per layer: keys then values, each [n_embd_kv, n_ctx]). Inputs were validated
/// by the caller.
#[allow(clippy::too_many_arguments)]
pub fn step(
    backend: &mut Backend,
    model: &ShardModel,
    cache: &Cache,
    n_ctx: u32,
    pos: u32,
    n_tokens: u32,
    input: StepInput,
    all_logits: bool,
) -> Result<StepOutput, String> {
    let hp = &model.hp;
    let n = n_tokens as i64;
    let (hd, n_head, n_head_kv) = (hp.head_dim as i64, hp.n_head as i64, hp.n_head_kv as i64);
    let n_kv = (pos + n_tokens).div_ceil(KV_PAD).saturating_mul(KV_PAD).min(n_ctx) as i64;

    let g = Graph::new(graph_size(model.layers()));
    // Inputs first: positions, causal mask, then tokens or the incoming hidden state.
    let positions: Vec<u8> = (pos..pos + n_tokens).flat_map(|p| (p as i32).to_le_bytes()).collect();
    let mut mask = Vec::with_capacity((n_kv * n) as usize * 2);
    for i in 0..n_tokens {
        for j in 0..n_kv as u32 {
            let visible = j <= pos + i;
            mask.extend_from_slice(&(if visible { 0u16 } else { 0xFC00u16 }).to_le_bytes()); // 0 or -inf in F16
        }
    }
    let inp_pos = g.input("pos", ggml::I32, &[n], positions);
    let inp_mask = g.input("kq_mask", ggml::F16, &[n_kv, n], mask);
    let inp = match input {
        StepInput::Tokens(ids) => {
            let bytes = ids.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect();
            g.input("tokens", ggml::I32, &[n], bytes)
        }
        StepInput::Hidden(h) => {
            let bytes = h.iter().flat_map(|f| f.to_le_bytes()).collect();
            g.input("hidden_in", ggml::F32, &[hp.n_embd as i64, n], bytes)
        }
    };

    let mut x = if model.first() { g.get_rows(model.w("token_embd.weight"), inp) } else { inp };
    let freqs = model.opt("rope_freqs.weight");
    let kq_scale = 1.0 / (hd as f32).sqrt();
    for (li, l) in (model.begin..model.end).enumerate() {
        let w = |name: &str| model.w(&format!("blk.{l}.{name}.weight"));
        let (k_cache, v_cache) = (cache.get(2 * li), cache.get(2 * li + 1));

        let cur = g.mul(g.rms_norm(x, hp.rms_eps), w("attn_norm"));
        let q = g.reshape_3d(g.mul_mat(w("attn_q"), cur), hd, n_head, n);
        let k = g.reshape_3d(g.mul_mat(w("attn_k"), cur), hd, n_head_kv, n);
        let v = g.reshape_3d(g.mul_mat(w("attn_v"), cur), hd, n_head_kv, n);
        let q = g.rope_ext(q, inp_pos, freqs, hp.n_rot as i32, 0, &hp.rope);
        let k = g.rope_ext(k, inp_pos, freqs, hp.n_rot as i32, 0, &hp.rope);

        // Write this step's keys and values into rows pos..pos+n of the cache, before anything reads it.
        let row = k_cache.nb()[1];
        let kv_width = hp.n_embd_kv() as i64;
        g.expand(g.cpy(k, g.view_1d(k_cache, n * kv_width, pos as usize * row)));
        g.expand(g.cpy(v, g.view_1d(v_cache, n * kv_width, pos as usize * row)));

        let es = k_cache.element_size();
        let kk = g.permute(g.view_3d(k_cache, [hd, n_head_kv, n_kv], hd as usize * es, row, 0), [0, 2, 1, 3]);
        let vv = g.permute(g.view_3d(v_cache, [hd, n_head_kv, n_kv], hd as usize * es, row, 0), [0, 2, 1, 3]);
        let qq = g.permute(q, [0, 2, 1, 3]);
        let attn = g.flash_attn_ext(qq, kk, vv, inp_mask, kq_scale);
        let attn = g.reshape_2d(attn, hd * n_head, n);
        x = g.add(g.mul_mat(w("attn_output"), attn), x);

        let cur = g.mul(g.rms_norm(x, hp.rms_eps), w("ffn_norm"));
        let h = g.swiglu_split(g.mul_mat(w("ffn_gate"), cur), g.mul_mat(w("ffn_up"), cur));
        x = g.add(g.mul_mat(w("ffn_down"), h), x);
    }

    let out = if model.last() {
        if !all_logits && n > 1 {
            let nb1 = x.nb()[1];
            x = g.view_2d(x, [hp.n_embd as i64, 1], nb1, (n as usize - 1) * nb1);
        }
        let x = g.mul(g.rms_norm(x, hp.rms_eps), model.w("output_norm.weight"));
        g.mul_mat(model.head(), x)
    } else {
        x
    };
    g.output(out);
    backend.compute(&g)?;
    let data = backend.read_f32(out);
    Ok(if model.last() {
        let rows = if all_logits { n_tokens as usize } else { 1 };
        StepOutput::Logits { data, rows }
    } else {
        StepOutput::Hidden(data)
    })
}

/// Nodes a graph over `layers` layers can need (about 30 per layer, with room to spare).
fn graph_size(layers: u32) -> usize {
    (64 * layers as usize + 256).max(1024)
}
