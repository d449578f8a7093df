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
    step_batch_kept(backend, model, seqs, &mut None).map(|(outputs, _)| outputs)
}

/// The graph of a shard's last decode step, kept so that the next step of the same shape (the
/// same sessions' caches, one token each, the same attention span) runs it again with new input
/// values instead of building and placing a new graph: llama.cpp's graph reuse. Positions, masks,
/// the cache rows written (`set_rows` with row indices) and the incoming tokens or hidden states
/// are inputs, so nothing else in the graph depends on the step.
pub struct Kept {
    key: Vec<u64>,
    graph: Graph,
}

/// What fixes a graph's shape: per sequence, its cache (by id: never reused), tokens, attention
/// span and kept rows; and whether tokens or hidden states come in.
fn shape_key(seqs: &[Seq]) -> Vec<u64> {
    let mut key = vec![seqs.len() as u64, matches!(seqs[0].input, StepInput::Tokens(_)) as u64];
    for s in seqs {
        key.extend([s.cache.id(), s.n_tokens as u64, kv_rows(s) as u64, s.all_logits as u64, s.n_ctx as u64]);
    }
    key
}

/// As [`step_batch`], reusing `kept` when this batch is a decode step (one token per sequence)
/// of the shape it was built for, and keeping this batch's graph there when it is a decode step
/// of another shape. The outputs are the same bits as a fresh graph's: the same operations run
/// on the same values. Also says whether the kept graph ran.
pub fn step_batch_kept(
    backend: &mut Backend,
    model: &ShardModel,
    seqs: &[Seq],
    kept: &mut Option<Kept>,
) -> Result<(Vec<StepOutput>, bool), String> {
    if seqs.is_empty() {
        return Ok((Vec::new(), false));
    }
    let inputs = Inputs::new(model, seqs)?;
    let decode = seqs.iter().all(|s| s.n_tokens == 1);
    let key = shape_key(seqs);
    let fresh;
    let reused = decode && kept.as_ref().is_some_and(|k| k.key == key);
    let graph = match kept {
        Some(k) if reused => {
            k.graph.refill(inputs.values())?;
            &k.graph
        }
        _ if decode => {
            *kept = None; // its buffer goes before the new one is placed
            let graph = build(model, seqs, inputs, Graph::reusable(graph_size(model.layers(), seqs.len()))?);
            &kept.insert(Kept { key, graph }).graph
        }
        _ => {
            fresh = build(model, seqs, inputs, Graph::new(graph_size(model.layers(), seqs.len())));
            &fresh
        }
    };
    backend.compute(graph)?;
    let out = graph.output_at(0);
    let data = backend.read_f32(out);
    let rows_of = |s: &Seq| if !model.last() || s.all_logits { s.n_tokens as usize } else { 1 };
    if let [s] = seqs {
        // One sequence: the whole output is its own, no copy.
        let rows = rows_of(s);
        let one = if model.last() { StepOutput::Logits { data, rows } } else { StepOutput::Hidden(data) };
        return Ok((vec![one], reused));
    }
    // Split the rows back out, sequence by sequence.
    let width = out.ne()[0] as usize;
    let mut outputs = Vec::with_capacity(seqs.len());
    let mut at = 0;
    for s in seqs {
        let rows = rows_of(s);
        let part = data[at * width..(at + rows) * width].to_vec();
        at += rows;
        outputs.push(if model.last() { StepOutput::Logits { data: part, rows } } else { StepOutput::Hidden(part) });
    }
    Ok((outputs, reused))
}

/// A batch's input values, in the order [`build`] adds them to the graph.
struct Inputs {
    /// I32 `[T]`: each token's position.
    positions: Vec<u8>,
    /// Per sequence, F16 `[n_kv, n_i]`: 0 where a token may see a cache row, -inf elsewhere.
    masks: Vec<Vec<u8>>,
    /// Per sequence, I64 `[n_i]`: the cache rows its new keys and values go to.
    kv_rows: Vec<Vec<u8>>,
    /// I32 `[T]` token ids, or F32 `[n_embd, T]` hidden states.
    tokens_or_hidden: Vec<u8>,
    /// I32: the rows the last shard keeps, when it keeps some rows of a batch of several.
    out_rows: Option<Vec<u8>>,
}

impl Inputs {
    fn new(model: &ShardModel, seqs: &[Seq]) -> Result<Inputs, String> {
        let total: usize = seqs.iter().map(|s| s.n_tokens as usize).sum();
        let positions =
            seqs.iter().flat_map(|s| (s.pos..s.pos + s.n_tokens).flat_map(|p| (p as i32).to_le_bytes())).collect();
        let masks = seqs
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
                mask
            })
            .collect();
        let kv_rows =
            seqs.iter().map(|s| (s.pos..s.pos + s.n_tokens).flat_map(|p| (p as i64).to_le_bytes()).collect()).collect();
        let tokens_or_hidden = match seqs[0].input {
            StepInput::Tokens(_) => {
                let mut bytes = Vec::with_capacity(total * 4);
                for s in seqs {
                    let StepInput::Tokens(ids) = s.input else {
                        return Err("a batch mixes tokens and hidden states".into());
                    };
                    bytes.extend(ids.iter().flat_map(|&t| (t as i32).to_le_bytes()));
                }
                bytes
            }
            StepInput::Hidden(_) => {
                let mut bytes = Vec::with_capacity(total * model.hp.n_embd as usize * 4);
                for s in seqs {
                    let StepInput::Hidden(h) = s.input else {
                        return Err("a batch mixes tokens and hidden states".into());
                    };
                    bytes.extend(h.iter().flat_map(|f| f.to_le_bytes()));
                }
                bytes
            }
        };
        // The last shard's rows to keep: every row of a sequence that wants all logits, else its last.
        let mut start = 0i32;
        let mut rows = Vec::new();
        for s in seqs {
            let n = s.n_tokens as i32;
            let first = if s.all_logits { start } else { start + n - 1 };
            rows.extend(first..start + n);
            start += n;
        }
        let out_rows = (model.last() && rows.len() != total && seqs.len() > 1)
            .then(|| rows.iter().flat_map(|r| r.to_le_bytes()).collect());
        Ok(Inputs { positions, masks, kv_rows, tokens_or_hidden, out_rows })
    }

    /// The values in the order `build` adds the inputs.
    fn values(self) -> Vec<Vec<u8>> {
        let mut v = vec![self.positions];
        v.extend(self.masks);
        v.extend(self.kv_rows);
        v.push(self.tokens_or_hidden);
        v.extend(self.out_rows);
        v
    }
}

/// The graph of one batch (into `g`, fresh), its inputs filled from `inputs`; its one output is
/// the hidden state `[n_embd, T]` or the logits of the kept rows `[n_vocab, rows]`.
fn build(model: &ShardModel, seqs: &[Seq], inputs: Inputs, g: Graph) -> Graph {
    let hp = &model.hp;
    let (hd, n_head, n_head_kv) = (hp.head_dim as i64, hp.n_head as i64, hp.n_head_kv as i64);
    let n: i64 = seqs.iter().map(|s| s.n_tokens as i64).sum();
    // First token of each sequence within the batch.
    let starts: Vec<i64> = seqs
        .iter()
        .scan(0i64, |acc, s| {
            let start = *acc;
            *acc += s.n_tokens as i64;
            Some(start)
        })
        .collect();
    let Inputs { positions, masks, kv_rows: kv_idx, tokens_or_hidden, out_rows } = inputs;
    let n_out = out_rows.as_ref().map(|r| r.len() as i64 / 4);
    // Inputs first, in the order `Inputs::values` lists them.
    let inp_pos = g.input("pos", ggml::I32, &[n], positions);
    let masks: Vec<(i64, ggml::Tensor)> = seqs
        .iter()
        .zip(masks)
        .map(|(s, mask)| {
            let n_kv = kv_rows(s);
            (n_kv, g.input("kq_mask", ggml::F16, &[n_kv, s.n_tokens as i64], mask))
        })
        .collect();
    let kv_idx: Vec<ggml::Tensor> =
        seqs.iter().zip(kv_idx).map(|(s, rows)| g.input("kv_idxs", ggml::I64, &[s.n_tokens as i64], rows)).collect();
    let inp = match seqs[0].input {
        StepInput::Tokens(_) => g.input("tokens", ggml::I32, &[n], tokens_or_hidden),
        StepInput::Hidden(_) => g.input("hidden_in", ggml::F32, &[hp.n_embd as i64, n], tokens_or_hidden),
    };
    let inp_out_rows = out_rows.map(|bytes| g.input("out_rows", ggml::I32, &[n_out.unwrap_or(0)], bytes));
    let kept_rows: i64 = seqs.iter().map(|s| if s.all_logits { s.n_tokens as i64 } else { 1 }).sum();

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
        for (((s, &start), &(n_kv, mask)), &rows) in seqs.iter().zip(&starts).zip(&masks).zip(&kv_idx) {
            let ni = s.n_tokens as i64;
            let whole = seqs.len() == 1;
            let qi = cols(&g, q, ni, start, whole);
            let (k_cache, v_cache) = (s.cache.get(2 * li), s.cache.get(2 * li + 1));
            // This step's keys and values into cache rows pos..pos+n (`rows`), before anything
            // reads the cache.
            let row = k_cache.nb()[1];
            g.expand(g.set_rows(k_cache, token_rows(&g, k, ni, start), rows));
            g.expand(g.set_rows(v_cache, token_rows(&g, v, ni, start), rows));

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
            } else if seqs.len() == 1 && kept_rows == 1 && n > 1 {
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
    g
}

/// Tokens `start..start+n` of `t` (`[d, heads, T]`, contiguous) as rows `[d * heads, n]`.
fn token_rows<'g>(g: &'g Graph, t: ggml::Tensor<'g>, n: i64, start: i64) -> ggml::Tensor<'g> {
    let [d, heads, ..] = t.ne();
    let nb2 = t.nb()[2];
    g.view_2d(t, [d * heads, n], nb2, start as usize * nb2)
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
