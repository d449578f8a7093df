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

/// One sequence of a batch: a session's cache and the tokens it adds at `pos..pos+n_tokens`.
pub struct Seq<'s> {
    /// 2 tensors per layer: keys then values, each [n_embd_kv, n_ctx] (F16).
    pub cache: &'s Cache,
    pub n_ctx: u32,
    pub pos: u32,
    pub n_tokens: u32,
    pub input: StepInput<'s>,
    /// The last shard returns logits of every token, not only the last.
    pub all_logits: bool,
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
    let seq = Seq { cache, n_ctx, pos, n_tokens, input, all_logits };
    Ok(step_batch(backend, model, &[seq])?.pop().expect("one output per sequence"))
}

/// Runs several sequences (sessions) through the shard in one graph, as llama.cpp's batched
/// decode does: the tokens of every sequence form one batch `[n_embd, T]`, so each weight is
/// multiplied once for all of them; RoPE takes each token's own position; attention runs per
/// sequence over that sequence's own cache with its own causal mask, and the results are joined
/// again before the output projection. Every sequence must belong to a different session (a
/// session's later step depends on its earlier one). One output per sequence, in order.
pub fn step_batch(backend: &mut Backend, model: &ShardModel, seqs: &[Seq]) -> Result<Vec<StepOutput>, String> {
    let hp = &model.hp;
    let (hd, n_head, n_head_kv) = (hp.head_dim as i64, hp.n_head as i64, hp.n_head_kv as i64);
    let total: u32 = seqs.iter().map(|s| s.n_tokens).sum();
    let n = total as i64;
    // First token of each sequence within the batch.
    let starts: Vec<i64> = seqs
        .iter()
        .scan(0i64, |acc, s| {
            let start = *acc;
            *acc += s.n_tokens as i64;
            Some(start)
        })
        .collect();

    let g = Graph::new(graph_size(model.layers(), seqs.len()));
    // Inputs first: positions, causal masks, then tokens or the incoming hidden states.
    let positions: Vec<u8> =
        seqs.iter().flat_map(|s| (s.pos..s.pos + s.n_tokens).flat_map(|p| (p as i32).to_le_bytes())).collect();
    let inp_pos = g.input("pos", ggml::I32, &[n], positions);
    let masks: Vec<(i64, ggml::Tensor)> = seqs
        .iter()
        .map(|s| {
            let n_kv = kv_rows(s);
            let mut mask = Vec::with_capacity((n_kv * s.n_tokens as i64) as usize * 2);
            for i in 0..s.n_tokens {
                for j in 0..n_kv as u32 {
                    let visible = j <= s.pos + i;
                    // 0 or -inf in F16
                    mask.extend_from_slice(&(if visible { 0u16 } else { 0xFC00u16 }).to_le_bytes());
                }
            }
            (n_kv, g.input("kq_mask", ggml::F16, &[n_kv, s.n_tokens as i64], mask))
        })
        .collect();
    let inp = match seqs[0].input {
        StepInput::Tokens(_) => {
            let mut bytes = Vec::with_capacity(total as usize * 4);
            for s in seqs {
                let StepInput::Tokens(ids) = s.input else {
                    return Err("a batch mixes tokens and hidden states".into());
                };
                bytes.extend(ids.iter().flat_map(|&t| (t as i32).to_le_bytes()));
            }
            g.input("tokens", ggml::I32, &[n], bytes)
        }
        StepInput::Hidden(_) => {
            let mut bytes = Vec::with_capacity(total as usize * hp.n_embd as usize * 4);
            for s in seqs {
                let StepInput::Hidden(h) = s.input else { return Err("a batch mixes tokens and hidden states".into()) };
                bytes.extend(h.iter().flat_map(|f| f.to_le_bytes()));
            }
            g.input("hidden_in", ggml::F32, &[hp.n_embd as i64, n], bytes)
        }
    };
    // The last shard's rows to keep: every row of a sequence that wants all logits, else its last.
    let out_rows: Vec<i32> = seqs
        .iter()
        .zip(&starts)
        .flat_map(|(s, &start)| {
            let first = if s.all_logits { start } else { start + s.n_tokens as i64 - 1 };
            (first..start + s.n_tokens as i64).map(|r| r as i32)
        })
        .collect();
    let inp_out_rows = (model.last() && out_rows.len() as i64 != n && seqs.len() > 1).then(|| {
        let bytes = out_rows.iter().flat_map(|r| r.to_le_bytes()).collect();
        g.input("out_rows", ggml::I32, &[out_rows.len() as i64], bytes)
    });

    let mut x = if model.first() { g.get_rows(model.w("token_embd.weight"), inp) } else { inp };
    let freqs = model.opt("rope_freqs.weight");
    let kq_scale = 1.0 / (hd as f32).sqrt();
    for (li, l) in (model.begin..model.end).enumerate() {
        let w = |name: &str| model.w(&format!("blk.{l}.{name}.weight"));

        let cur = g.mul(g.rms_norm(x, hp.rms_eps), w("attn_norm"));
        let q = g.reshape_3d(g.mul_mat(w("attn_q"), cur), hd, n_head, n); // [hd, n_head, T]
        let k = g.reshape_3d(g.mul_mat(w("attn_k"), cur), hd, n_head_kv, n); // [hd, n_head_kv, T]
        let v = g.reshape_3d(g.mul_mat(w("attn_v"), cur), hd, n_head_kv, n); // [hd, n_head_kv, T]
        let q = g.rope_ext(q, inp_pos, freqs, hp.n_rot as i32, 0, &hp.rope);
        let k = g.rope_ext(k, inp_pos, freqs, hp.n_rot as i32, 0, &hp.rope);

        // Attention, one sequence at a time over its own cache: [hd * n_head, n_i] each.
        let mut attn_parts = Vec::with_capacity(seqs.len());
        for ((s, &start), &(n_kv, mask)) in seqs.iter().zip(&starts).zip(&masks) {
            let ni = s.n_tokens as i64;
            let whole = seqs.len() == 1;
            let (qi, ki, vi) =
                (cols(&g, q, ni, start, whole), cols(&g, k, ni, start, whole), cols(&g, v, ni, start, whole));
            let (k_cache, v_cache) = (s.cache.get(2 * li), s.cache.get(2 * li + 1));
            // Write this step's keys and values into rows pos..pos+n of the cache, before anything reads it.
            let row = k_cache.nb()[1];
            let kv_width = hp.n_embd_kv() as i64;
            g.expand(g.cpy(ki, g.view_1d(k_cache, ni * kv_width, s.pos as usize * row)));
            g.expand(g.cpy(vi, g.view_1d(v_cache, ni * kv_width, s.pos as usize * row)));

            let es = k_cache.element_size();
            let kk = g.permute(g.view_3d(k_cache, [hd, n_head_kv, n_kv], hd as usize * es, row, 0), [0, 2, 1, 3]);
            let vv = g.permute(g.view_3d(v_cache, [hd, n_head_kv, n_kv], hd as usize * es, row, 0), [0, 2, 1, 3]);
            let qq = g.permute(qi, [0, 2, 1, 3]);
            let attn = g.flash_attn_ext(qq, kk, vv, mask, kq_scale); // [hd, n_head, n_i]
            attn_parts.push(g.reshape_2d(attn, hd * n_head, ni));
        }
        let attn = join_columns(&g, attn_parts);
        x = g.add(g.mul_mat(w("attn_output"), attn), x);
        if model.last() && l + 1 == model.end {
            // Only the rows whose logits are wanted go on through the last feed-forward block, as
            // llama.cpp's `inp_out_ids` does: a 512-token prompt runs it for 1 token, not 512.
            if let Some(rows) = inp_out_rows {
                x = g.get_rows(x, rows); // [n_embd, rows kept]
            } else if seqs.len() == 1 && out_rows.len() == 1 && n > 1 {
                let nb1 = x.nb()[1];
                x = g.view_2d(x, [hp.n_embd as i64, 1], nb1, (n as usize - 1) * nb1);
            }
        }

        let cur = g.mul(g.rms_norm(x, hp.rms_eps), w("ffn_norm"));
        let h = g.swiglu_split(g.mul_mat(w("ffn_gate"), cur), g.mul_mat(w("ffn_up"), cur));
        x = g.add(g.mul_mat(w("ffn_down"), h), x);
    }

    let out = if model.last() {
        // x holds the kept rows already (selected before the last feed-forward block).
        let x = g.mul(g.rms_norm(x, hp.rms_eps), model.w("output_norm.weight"));
        g.mul_mat(model.head(), x) // [n_vocab, rows kept]
    } else {
        x // [n_embd, T]
    };
    g.output(out);
    backend.compute(&g)?;
    let data = backend.read_f32(out);
    // Split the rows back out, sequence by sequence.
    let width = out.ne()[0] as usize;
    let mut outputs = Vec::with_capacity(seqs.len());
    let mut at = 0;
    for s in seqs {
        let rows = if !model.last() || s.all_logits { s.n_tokens as usize } else { 1 };
        let part = data[at * width..(at + rows) * width].to_vec();
        at += rows;
        outputs.push(if model.last() { StepOutput::Logits { data: part, rows } } else { StepOutput::Hidden(part) });
    }
    Ok(outputs)
}

/// Tokens `start..start+n` of `t` ([d, heads, T]); `t` itself when it is the whole batch.
fn cols<'g>(g: &'g Graph, t: ggml::Tensor<'g>, n: i64, start: i64, whole: bool) -> ggml::Tensor<'g> {
    if whole {
        return t;
    }
    let [d, heads, ..] = t.ne();
    let nb = t.nb();
    g.view_3d(t, [d, heads, n], nb[1], nb[2], start as usize * nb[2])
}

/// Cache rows a sequence attends to: its positions so far, rounded up to `KV_PAD`, within `n_ctx`.
fn kv_rows(s: &Seq) -> i64 {
    (s.pos + s.n_tokens).div_ceil(KV_PAD).saturating_mul(KV_PAD).min(s.n_ctx) as i64
}

/// `[w, n_0] ... [w, n_k]` joined into `[w, sum n_i]`, pairwise so each value is copied
/// log2(k) times rather than k.
fn join_columns<'g>(g: &'g Graph, mut parts: Vec<ggml::Tensor<'g>>) -> ggml::Tensor<'g> {
    while parts.len() > 1 {
        parts = parts.chunks(2).map(|p| if p.len() == 2 { g.concat(p[0], p[1], 1) } else { p[0] }).collect();
    }
    parts.pop().expect("a batch holds at least one sequence")
}

/// Nodes a graph over `layers` layers and `seqs` sequences can need (about 30 per layer and 8 per
/// sequence per layer, with room to spare).
fn graph_size(layers: u32, seqs: usize) -> usize {
    ((64 + 16 * seqs) * layers as usize + 256).max(1024)
}
