//! The LLaMA block over a shard's layer range, as one ggml graph per call.
//!
//! Same operations, in the same order and with the same attention path, as llama.cpp's
//! `llm_build_llama` with flash attention (its CPU default): RMSNorm, Q/K/V, RoPE (mode 0),
//! the new keys and values written into the session's cells of the shard's F16 KV pool,
//! fused attention over those cells with a causal mask, output projection, SwiGLU, residuals.

use super::ggml::{self, Backend, Graph};
use super::kv::KvPool;
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

/// One sequence of a batch: a session's slot of the pool and the tokens it adds at
/// `pos..pos+n_tokens`.
pub struct Seq<'s> {
    /// The session's slot in the shard's [`KvPool`]: its `n_ctx` cells, no other session's.
    pub slot: u32,
    pub pos: u32,
    pub n_tokens: u32,
    pub input: StepInput<'s>,
    /// The last shard returns logits of every token, not only the last.
    pub all_logits: bool,
}

/// Runs `n_tokens` tokens at positions `pos..pos+n_tokens` through the shard, reading and extending
/// the cells of `slot` in `kv`. Inputs were validated by the caller.
#[allow(clippy::too_many_arguments)]
pub fn step(
    backend: &mut Backend,
    model: &ShardModel,
    kv: &KvPool,
    slot: u32,
    pos: u32,
    n_tokens: u32,
    input: StepInput,
    all_logits: bool,
) -> Result<StepOutput, String> {
    let seq = Seq { slot, pos, n_tokens, input, all_logits };
    Ok(step_batch(backend, model, kv, &[seq])?.pop().expect("one output per sequence"))
}

/// Runs several sequences (sessions) through the shard in one graph, as llama.cpp's batched
/// decode does: the tokens of every sequence form one batch `[n_embd, T]`, so each weight is
/// multiplied once for all of them; RoPE takes each token's own position; the new keys and
/// values of all tokens go to their sessions' cells in one write per layer. Attention runs once
/// per layer for each run of sequences that hold consecutive slots with the same number of
/// tokens (llama.cpp's streams): one `flash_attn_ext` over a 4-d view of the pool, each stream
/// with its own causal mask over its own cells; 16 decode steps in slots 0..15 are one call.
/// Every sequence must belong to a different session (a session's later step depends on its
/// earlier one); sequences in slot order make the longest runs. One output per sequence, in
/// order. Errors: a slot outside the pool or not distinct.
pub fn step_batch(
    backend: &mut Backend,
    model: &ShardModel,
    kv: &KvPool,
    seqs: &[Seq],
) -> Result<Vec<StepOutput>, String> {
    step_batch_kept(backend, model, kv, seqs, &mut None).map(|ran| ran.outputs)
}

/// The graph of a shard's last decode step, kept so that the next step of the same shape (the
/// same slots, one token each, the same attention spans) runs it again with new input values
/// instead of building and placing a new graph: llama.cpp's graph reuse. Positions, masks, the
/// cache rows written (`set_rows` with row indices) and the incoming tokens or hidden states
/// are inputs, so nothing else in the graph depends on the step.
pub struct Kept {
    key: Vec<u64>,
    graph: Graph,
}

/// What fixes a graph's shape: the pool (by id: never reused), and per sequence its slot,
/// tokens, attention span and kept rows; and whether tokens or hidden states come in.
fn shape_key(kv: &KvPool, seqs: &[Seq]) -> Vec<u64> {
    let mut key = vec![seqs.len() as u64, matches!(seqs[0].input, StepInput::Tokens(_)) as u64, kv.cache().id()];
    for s in seqs {
        key.extend([s.slot as u64, s.n_tokens as u64, kv_rows(kv, s) as u64, s.all_logits as u64]);
    }
    key
}

/// As [`step_batch`], reusing `kept` when this batch is a decode step (one token per sequence)
/// of the shape it was built for, and keeping this batch's graph there when it is a decode step
/// of another shape. The outputs are the same bits as a fresh graph's: the same operations run
/// on the same values.
pub fn step_batch_kept(
    backend: &mut Backend,
    model: &ShardModel,
    kv: &KvPool,
    seqs: &[Seq],
    kept: &mut Option<Kept>,
) -> Result<Ran, String> {
    if seqs.is_empty() {
        return Ok(Ran { outputs: Vec::new(), reused: false, nodes: 0 });
    }
    check_slots(kv, seqs)?;
    let inputs = Inputs::new(model, kv, seqs)?;
    let decode = seqs.iter().all(|s| s.n_tokens == 1);
    let key = shape_key(kv, seqs);
    let fresh;
    let reused = decode && kept.as_ref().is_some_and(|k| k.key == key);
    let graph = match kept {
        Some(k) if reused => {
            k.graph.refill(inputs.values())?;
            &k.graph
        }
        _ if decode => {
            *kept = None; // its buffer goes before the new one is placed
            let graph = build(model, kv, seqs, inputs, Graph::reusable(graph_size(model.layers(), seqs))?);
            &kept.insert(Kept { key, graph }).graph
        }
        _ => {
            fresh = build(model, kv, seqs, inputs, Graph::new(graph_size(model.layers(), seqs)));
            &fresh
        }
    };
    let nodes = graph.node_count() as usize;
    backend.compute(graph)?;
    let out = graph.output_at(0);
    let rows_of = |s: &Seq| if !model.last() || s.all_logits { s.n_tokens as usize } else { 1 };
    // Each sequence's rows read straight into its own vector (16 streams' logits are 3 MiB of
    // SmolLM2's: no copy of the whole output first).
    let width = out.ne()[0] as usize;
    let mut outputs = Vec::with_capacity(seqs.len());
    let mut at = 0;
    for s in seqs {
        let rows = rows_of(s);
        let data = backend.read_f32_part(out, at * width, rows * width);
        at += rows;
        outputs.push(if model.last() { StepOutput::Logits { data, rows } } else { StepOutput::Hidden(data) });
    }
    Ok(Ran { outputs, reused, nodes })
}

/// What [`step_batch_kept`] ran.
pub struct Ran {
    /// One per sequence, in order.
    pub outputs: Vec<StepOutput>,
    /// Whether the kept graph ran again.
    pub reused: bool,
    /// Nodes of the graph (each a barrier of the compute threads).
    pub nodes: usize,
}

/// Each slot within the pool, none twice.
fn check_slots(kv: &KvPool, seqs: &[Seq]) -> Result<(), String> {
    let mut seen = vec![false; kv.n_slots() as usize];
    for s in seqs {
        let Some(seen) = seen.get_mut(s.slot as usize) else {
            return Err(format!("slot {} is outside the KV pool's {} slots", s.slot, kv.n_slots()));
        };
        if std::mem::replace(seen, true) {
            return Err(format!("slot {} appears twice in one batch", s.slot));
        }
        if s.n_tokens == 0 || s.pos as u64 + s.n_tokens as u64 > kv.n_ctx() as u64 {
            return Err(format!("positions {}+{} do not fit a slot of {} cells", s.pos, s.n_tokens, kv.n_ctx()));
        }
    }
    Ok(())
}

/// Attention spans (cells) from which ggml computes a lone one-token step's attention split
/// over the threads by cells, summing the parts in F32 (`use_split_kv_path` in ggml-cpu's
/// `ops.cpp`); a call over several streams sums each stream's cells in one pass instead. A
/// decode step with a span this long attends alone, so its logits are the same bits as one
/// decoded by itself; shorter ones share a call.
const SPLIT_KV_FROM: i64 = 512;

/// Sequences `first..first + len` of a batch, holding consecutive slots and `n_tokens` tokens
/// each: one attention call (llama.cpp's streams), over the first `n_kv` cells of each slot.
/// Only decode steps (one token) with spans under [`SPLIT_KV_FROM`] share a run; anything
/// else is a run of its own, computed exactly as when it runs alone.
struct Run {
    first: usize,
    len: usize,
    n_tokens: u32,
    n_kv: i64,
    /// Index of its first token within the batch.
    start: i64,
}

/// The runs of a batch, in order (see [`Run`]).
fn runs(kv: &KvPool, seqs: &[Seq]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut start = 0i64;
    for (i, s) in seqs.iter().enumerate() {
        match runs.last_mut() {
            Some(r)
                if shares(r.n_tokens, r.n_kv)
                    && shares(s.n_tokens, kv_rows(kv, s))
                    && seqs[r.first + r.len - 1].slot + 1 == s.slot =>
            {
                r.len += 1;
                r.n_kv = r.n_kv.max(kv_rows(kv, s));
            }
            _ => runs.push(Run { first: i, len: 1, n_tokens: s.n_tokens, n_kv: kv_rows(kv, s), start }),
        }
        start += s.n_tokens as i64;
    }
    runs
}

/// Whether a step of `n_tokens` over `n_kv` cells may share an attention call.
fn shares(n_tokens: u32, n_kv: i64) -> bool {
    n_tokens == 1 && n_kv < SPLIT_KV_FROM
}

/// A batch's input values, in the order [`build`] adds them to the graph.
struct Inputs {
    /// I32 `[T]`: each token's position.
    positions: Vec<u8>,
    /// Per run, F16 `[n_kv, n_tokens, 1, streams]`: 0 where a stream's token may see a cell of
    /// its slot, -inf elsewhere.
    masks: Vec<Vec<u8>>,
    /// I64 `[T]`: the pool rows each token's key and value go to (`slot * n_ctx + pos`).
    kv_rows: Vec<u8>,
    /// I32 `[T]` token ids, or F32 `[n_embd, T]` hidden states.
    tokens_or_hidden: Vec<u8>,
    /// I32: the rows the last shard keeps, when it keeps some rows of a batch of several.
    out_rows: Option<Vec<u8>>,
}

impl Inputs {
    fn new(model: &ShardModel, kv: &KvPool, seqs: &[Seq]) -> Result<Inputs, String> {
        let total: usize = seqs.iter().map(|s| s.n_tokens as usize).sum();
        let positions =
            seqs.iter().flat_map(|s| (s.pos..s.pos + s.n_tokens).flat_map(|p| (p as i32).to_le_bytes())).collect();
        let masks = runs(kv, seqs)
            .iter()
            .map(|r| {
                let mut mask = Vec::with_capacity(r.n_kv as usize * (r.n_tokens as usize) * r.len * 2);
                for s in &seqs[r.first..r.first + r.len] {
                    for i in 0..s.n_tokens {
                        for j in 0..r.n_kv as u32 {
                            let visible = j <= s.pos + i;
                            // 0 or -inf in F16
                            mask.extend_from_slice(&(if visible { 0u16 } else { 0xFC00u16 }).to_le_bytes());
                        }
                    }
                }
                mask
            })
            .collect();
        let n_ctx = kv.n_ctx() as i64;
        let kv_rows = seqs
            .iter()
            .flat_map(|s| {
                (s.pos..s.pos + s.n_tokens).flat_map(move |p| (s.slot as i64 * n_ctx + p as i64).to_le_bytes())
            })
            .collect();
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
        v.push(self.kv_rows);
        v.push(self.tokens_or_hidden);
        v.extend(self.out_rows);
        v
    }
}

/// The graph of one batch (into `g`, fresh), its inputs filled from `inputs`; its one output is
/// the hidden state `[n_embd, T]` or the logits of the kept rows `[n_vocab, rows]`.
fn build(model: &ShardModel, kv: &KvPool, seqs: &[Seq], inputs: Inputs, g: Graph) -> Graph {
    let hp = &model.hp;
    let (hd, n_head, n_head_kv) = (hp.head_dim as i64, hp.n_head as i64, hp.n_head_kv as i64);
    let n: i64 = seqs.iter().map(|s| s.n_tokens as i64).sum();
    let runs = runs(kv, seqs);
    let Inputs { positions, masks, kv_rows: kv_idx, tokens_or_hidden, out_rows } = inputs;
    let n_out = out_rows.as_ref().map(|r| r.len() as i64 / 4);
    // Inputs first, in the order `Inputs::values` lists them.
    let inp_pos = g.input("pos", ggml::I32, &[n], positions);
    let masks: Vec<ggml::Tensor> = runs
        .iter()
        .zip(masks)
        .map(|(r, mask)| g.input("kq_mask", ggml::F16, &[r.n_kv, r.n_tokens as i64, 1, r.len as i64], mask))
        .collect();
    let kv_idx = g.input("kv_idxs", ggml::I64, &[n], kv_idx);
    let inp = match seqs[0].input {
        StepInput::Tokens(_) => g.input("tokens", ggml::I32, &[n], tokens_or_hidden),
        StepInput::Hidden(_) => g.input("hidden_in", ggml::F32, &[hp.n_embd as i64, n], tokens_or_hidden),
    };
    let inp_out_rows = out_rows.map(|bytes| g.input("out_rows", ggml::I32, &[n_out.unwrap_or(0)], bytes));
    let kept_rows: i64 = seqs.iter().map(|s| if s.all_logits { s.n_tokens as i64 } else { 1 }).sum();

    let mut x = if model.first() { g.get_rows(model.w("token_embd.weight"), inp) } else { inp };
    let freqs = model.opt("rope_freqs.weight");
    let kq_scale = 1.0 / (hd as f32).sqrt();
    let n_ctx = kv.n_ctx() as usize;
    for (li, l) in (model.begin..model.end).enumerate() {
        let w = |name: &str| model.w(&format!("blk.{l}.{name}.weight"));

        let cur = g.mul(g.rms_norm(x, hp.rms_eps), w("attn_norm"));
        let q = g.reshape_3d(g.mul_mat(w("attn_q"), cur), hd, n_head, n); // [hd, n_head, T]
        let k = g.reshape_3d(g.mul_mat(w("attn_k"), cur), hd, n_head_kv, n); // [hd, n_head_kv, T]
        let v = g.reshape_3d(g.mul_mat(w("attn_v"), cur), hd, n_head_kv, n); // [hd, n_head_kv, T]
        let q = g.rope_ext(q, inp_pos, freqs, hp.n_rot as i32, 0, &hp.rope);
        let k = g.rope_ext(k, inp_pos, freqs, hp.n_rot as i32, 0, &hp.rope);

        // This step's keys and values into their sessions' cells (`kv_idx`: slot * n_ctx + pos),
        // every token in one write, before anything reads the pool.
        let (k_pool, v_pool) = (kv.cache().get(2 * li), kv.cache().get(2 * li + 1)); // [n_embd_kv, n_ctx * n_slots]
        g.expand(g.set_rows(k_pool, g.reshape_2d(k, hd * n_head_kv, n), kv_idx));
        g.expand(g.set_rows(v_pool, g.reshape_2d(v, hd * n_head_kv, n), kv_idx));

        // Attention, one call per run of streams (consecutive slots): [hd * n_head, T] in all.
        let row = k_pool.nb()[1];
        let es = k_pool.element_size();
        let attn_parts: Vec<ggml::Tensor> = runs
            .iter()
            .zip(&masks)
            .map(|(r, &mask)| {
                let (nt, ns) = (r.n_tokens as i64, r.len as i64);
                let slot0 = seqs[r.first].slot as usize;
                // The run's queries: [hd, n_head, nt, ns] -> [hd, nt, n_head, ns].
                let qb = q.nb();
                let qq =
                    g.view_4d(q, [hd, n_head, nt, ns], [qb[1], qb[2], nt as usize * qb[2]], r.start as usize * qb[2]);
                let qq = g.permute(qq, [0, 2, 1, 3]);
                // Each stream's first n_kv cells: [hd, n_head_kv, n_kv, ns] -> [hd, n_kv, n_head_kv, ns].
                let cells = |pool| {
                    let nb = [hd as usize * es, row, n_ctx * row];
                    g.permute(g.view_4d(pool, [hd, n_head_kv, r.n_kv, ns], nb, slot0 * n_ctx * row), [0, 2, 1, 3])
                };
                let attn = g.flash_attn_ext(qq, cells(k_pool), cells(v_pool), mask, kq_scale); // [hd, n_head, nt, ns]
                g.reshape_2d(attn, hd * n_head, nt * ns)
            })
            .collect();
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

/// Cells a sequence attends to: its positions so far, rounded up to `KV_PAD`, within its slot.
fn kv_rows(kv: &KvPool, s: &Seq) -> i64 {
    (s.pos + s.n_tokens).div_ceil(KV_PAD).saturating_mul(KV_PAD).min(kv.n_ctx()) as i64
}

/// `[w, n_0] ... [w, n_k]` joined into `[w, sum n_i]`, pairwise so each value is copied
/// log2(k) times rather than k.
fn join_columns<'g>(g: &'g Graph, mut parts: Vec<ggml::Tensor<'g>>) -> ggml::Tensor<'g> {
    while parts.len() > 1 {
        parts = parts.chunks(2).map(|p| if p.len() == 2 { g.concat(p[0], p[1], 1) } else { p[0] }).collect();
    }
    parts.pop().expect("a batch holds at least one sequence")
}

/// Nodes a graph over `layers` layers can need: about 30 per layer, and 8 per run of
/// sequences per layer (at most one run per sequence), with room to spare.
fn graph_size(layers: u32, seqs: &[Seq]) -> usize {
    ((64 + 16 * seqs.len()) * layers as usize + 256).max(1024)
}
