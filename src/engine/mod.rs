//! The inference engine: vendored ggml running LLaMA layer ranges straight from a shard's
//! memory map, with a KV cache per session.
//!
//! - [`ggml`]      the safe wrapper; the only `unsafe` code calling into ggml
//! - [`model`]     hyper-parameters and weights of a shard (checked, wrapped in place)
//! - [`forward`]   the LLaMA block over a layer range, one graph per call
//! - [`kv`]        a shard's KV cache: one pool, a slot per session
//! - [`tokenizer`] SentencePiece-style and GPT-2 BPE vocabularies from GGUF
//! - [`sampler`]   greedy, temperature, top-k, top-p, seeded
//!
//! [`Engine`] is what the node's inference worker (and `shardctl generate`) owns: loaded shards,
//! sessions bounded in count and bytes (least recently used evicted), and validation of every
//! input before ggml sees it, since ggml aborts the process on a bad shape.

pub mod forward;
pub mod generate;
pub mod ggml;
pub mod kv;
pub mod model;
pub mod sampler;
pub mod sidecar;
pub mod tokenizer;

#[allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code, unsafe_op_in_unsafe_fn, clippy::all)]
mod sys;

use crate::protocol::ErrorCode;
use forward::{StepInput, StepOutput};
use memmap2::Mmap;
use model::ShardModel;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use model::{Hparams, WeightsSource};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// ggml compute threads.
    pub threads: usize,
    /// Context length of a session (clamped to the model's training context).
    pub ctx_size: u32,
    pub max_sessions: usize,
    /// Sessions one client (one `origin`) may hold; beyond it the client's own least recently
    /// used session goes, never another client's. At most `max_sessions`.
    pub max_sessions_per_client: usize,
    /// KV-cache bytes over all sessions; the least recently used are evicted to make room.
    pub kv_budget: u64,
    /// Run matrices ggml has a faster CPU layout for from that layout: from a sidecar file beside
    /// the shard when [`Engine::load_file`] names the shard's file, else (or when the sidecar
    /// cannot be written) from a copy in anonymous memory the size of those weights.
    pub repack: bool,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ctx_size: 2048,
            max_sessions: 16,
            max_sessions_per_client: 8,
            kv_budget: 2 << 30,
            repack: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineError {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for EngineError {}

fn err(code: ErrorCode, message: impl Into<String>) -> EngineError {
    EngineError { code, message: message.into() }
}

/// The input of one step: token ids (first shard) or a hidden state (`n_tokens * n_embd`).
#[derive(Clone, Debug)]
pub enum Input {
    Tokens(Vec<u32>),
    Hidden { data: Vec<f32>, n_tokens: usize, width: usize },
}

impl Input {
    pub fn n_tokens(&self) -> usize {
        match self {
            Input::Tokens(t) => t.len(),
            Input::Hidden { n_tokens, .. } => *n_tokens,
        }
    }
}

/// What the caller wants back from the last shard (a middle shard always returns its hidden state).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Want {
    /// The final hidden state of every token (a middle shard's output).
    Hidden,
    /// Logits of the last token, or of every token.
    Logits { all: bool },
}

#[derive(Clone, Debug)]
pub enum Output {
    Hidden { data: Vec<f32>, n_tokens: usize, width: usize },
    Logits { data: Vec<f32>, rows: usize, n_vocab: usize },
}

/// Who may use a session: the holder of `token`; `origin` (the client, as the node identifies
/// it) keys the per-client quota.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    pub token: &'a str,
    pub origin: &'a str,
}

struct Owner {
    /// SHA-256 of the token: compared whole, so timing says nothing about the token itself.
    token: [u8; 32],
    origin: String,
}

fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

struct Session {
    /// Its slot in its shard's [`kv::KvPool`].
    slot: u32,
    /// What its slot counts against `kv_budget` ([`kv::KvPool::slot_bytes`]).
    bytes: u64,
    /// The token holder it belongs to (`None`: a local session, as `generate` runs).
    owner: Option<Owner>,
    /// Positions `0..n_past` hold keys and values.
    n_past: u32,
    last_used: u64,
    /// When its last step ran: idle for [`SESSION_IDLE_AFTER`] makes it the first to go.
    used_at: Instant,
    /// Steps run on it: among recently used sessions, one opened and barely used goes before
    /// one that is decoding.
    steps: u64,
}

/// A session not stepped for this long is idle: when room is needed, idle sessions go before
/// recently used ones.
pub const SESSION_IDLE_AFTER: Duration = Duration::from_secs(10);

pub struct Engine {
    backend: ggml::Backend,
    cfg: EngineConfig,
    shards: HashMap<u32, ShardModel>,
    sessions: HashMap<(String, u32), Session>,
    /// Per shard, the KV pool its sessions' slots are in (made at its first session).
    pools: HashMap<u32, kv::KvPool>,
    clock: u64,
    /// Per shard, the graph of its last decode step, run again by the next step of that shape.
    kept: HashMap<u32, Option<forward::Kept>>,
    /// Steps that ran a kept graph (STATUS: `inference.graphs_reused`).
    graphs_reused: u64,
    /// Nodes of the last graph run.
    last_graph_nodes: usize,
}

/// Session ids are short printable names chosen by the coordinator.
pub const MAX_SESSION_ID: usize = 128;

/// Tokens in one batched graph, as llama.cpp's default `n_batch`: steps beyond it go to the next
/// graph (a single larger step still runs whole, in a graph of its own).
pub const MAX_BATCH_TOKENS: usize = 512;

/// Rows (tokens) of a step from which its attention runs ggml-cpu's tiled F32 flash attention
/// (`GGML_FA_TILE_Q` in vendor/ggml/src/ggml-cpu/common.h; `ggml_compute_forward_flash_attn_ext_f16`
/// picks it for `neq1 >= 64`). A step of fewer rows takes the one-row kernel, which rounds Q to F16
/// and sums V·softmax in an F16 accumulator: about 1e-3 off the tiled result, growing with the
/// context. With every step of at least this many rows, a row's output does not depend on how
/// the prompt was cut (matrix products are per column on the CPU for the weight types measured:
/// F32, Q4_1): a prefill computed in parts of >= 64 tokens equals the whole one bit for bit
/// (tests/engine.rs `a_prefill_in_parts_of_64_tokens_or_more_equals_the_whole_bit_for_bit`).
/// A node that splits a prefill cuts it into multiples of this, the rest at least this.
pub const PREFILL_GRANULE: usize = 64;

/// Why a new session cannot join the batch being gathered (only its own sessions could make
/// room); `execute_batch` then runs that batch first.
const NO_ROOM_IN_BATCH: &str = "every session's cache is in use by this batch; no room for another";

/// One session's step for [`Engine::execute_batch`].
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    pub session_id: &'a str,
    /// Who may use the session (its token) and whose quota it counts against, if known.
    pub claim: Option<Claim<'a>>,
    /// First position of `input`.
    pub pos: u32,
    pub input: &'a Input,
    pub want: Want,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Result<Engine, EngineError> {
        let backend = ggml::Backend::cpu(cfg.threads).map_err(|e| err(ErrorCode::Internal, e))?;
        Ok(Engine {
            backend,
            cfg,
            shards: HashMap::new(),
            sessions: HashMap::new(),
            pools: HashMap::new(),
            clock: 0,
            kept: HashMap::new(),
            graphs_reused: 0,
            last_graph_nodes: 0,
        })
    }

    /// Graphs run again instead of built: decode steps that had the shape of their shard's
    /// previous step (see [`forward::Kept`]).
    pub fn graphs_reused(&self) -> u64 {
        self.graphs_reused
    }

    /// Nodes of the last graph run (each one a barrier of the compute threads): the cost that
    /// grows with a batch's sessions when their attention is not pooled.
    pub fn last_graph_nodes(&self) -> usize {
        self.last_graph_nodes
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Makes the shard in `map` runnable under `shard_id`, replacing what was there (and dropping
    /// the sessions that ran on the old one).
    pub fn load(&mut self, shard_id: u32, map: Arc<Mmap>) -> Result<&Hparams, EngineError> {
        self.load_inner(shard_id, map, None)
    }

    /// As [`Engine::load`], for the shard file at `path` (mapped as `map`): with `repack`, the
    /// repacked matrices live in the sidecar `path.repack`, keyed by `info_hash` (hex; a SHA-1
    /// of the whole file when it is `None`) and the ggml build, and rebuilt when either changed
    /// or the file is corrupt (see [`sidecar`]).
    pub fn load_file(
        &mut self,
        shard_id: u32,
        map: Arc<Mmap>,
        path: &std::path::Path,
        info_hash: Option<String>,
    ) -> Result<&Hparams, EngineError> {
        let place = self.cfg.repack.then(|| {
            let key = info_hash.unwrap_or_else(|| sidecar::content_key(&map));
            sidecar::Place::beside(path, key)
        });
        self.load_inner(shard_id, map, place.as_ref())
    }

    fn load_inner(
        &mut self,
        shard_id: u32,
        map: Arc<Mmap>,
        place: Option<&sidecar::Place>,
    ) -> Result<&Hparams, EngineError> {
        let model = ShardModel::load(map, self.cfg.repack, place).map_err(|e| err(ErrorCode::ShardInvalid, e))?;
        if model.repacked_bytes() > 0 {
            crate::debug!("shard {shard_id}: {} weight bytes repacked for this CPU", model.repacked_bytes());
        }
        self.sessions.retain(|(_, s), _| *s != shard_id);
        self.kept.remove(&shard_id);
        self.pools.remove(&shard_id);
        self.shards.insert(shard_id, model);
        Ok(&self.shards[&shard_id].hp)
    }

    pub fn unload(&mut self, shard_id: u32) {
        self.sessions.retain(|(_, s), _| *s != shard_id);
        self.kept.remove(&shard_id);
        self.pools.remove(&shard_id);
        self.shards.remove(&shard_id);
    }

    /// Where a loaded shard's repackable matrices are read from.
    pub fn weights_source(&self, shard_id: u32) -> Option<WeightsSource> {
        self.shards.get(&shard_id).map(|m| m.source)
    }

    pub fn is_loaded(&self, shard_id: u32) -> bool {
        self.shards.contains_key(&shard_id)
    }

    /// Whether shard `shard_id`'s repack sidecar was written since the load checked it (one
    /// `fstat`; see [`sidecar::Mapped::changed`]): load it again before computing, which checks
    /// the sidecar's tag again (and rebuilds it if the tag fails). False when not loaded or not
    /// from a sidecar.
    pub fn weights_changed(&self, shard_id: u32) -> bool {
        self.shards.get(&shard_id).is_some_and(|m| m.sidecar_changed(&format!("shard {shard_id}")))
    }

    /// Weight bytes held outside the shard's map (repacked), 0 unless `repack`.
    pub fn repacked_bytes(&self, shard_id: u32) -> usize {
        self.shards.get(&shard_id).map_or(0, |m| m.repacked_bytes())
    }

    pub fn shard_info(&self, shard_id: u32) -> Option<(&Hparams, u32, u32)> {
        self.shards.get(&shard_id).map(|m| (&m.hp, m.begin, m.end))
    }

    /// Sessions alive and the KV bytes they hold.
    pub fn sessions(&self) -> (usize, u64) {
        (self.sessions.len(), self.sessions.values().map(|s| s.bytes).sum())
    }

    /// Frees every cache of `session_id` if `token` is its owner's; returns how many there were.
    /// Another owner's session frees nothing and answers 0, as an unknown one does, so a
    /// non-owner cannot tell whether a session id exists.
    pub fn end_session_as(&mut self, session_id: &str, token: Option<&str>) -> usize {
        if self.check_owner(session_id, token).is_err() {
            return 0;
        }
        self.end_session(session_id)
    }

    /// Refuses a claim on a session owned by another token.
    fn check_owner(&self, session_id: &str, token: Option<&str>) -> Result<(), EngineError> {
        let owner = self.sessions.iter().find_map(|((id, _), s)| (id == session_id).then_some(s.owner.as_ref()));
        match owner {
            Some(Some(o)) if token.map(token_digest) != Some(o.token) => Err(err(
                ErrorCode::SessionForbidden,
                format!(
                    "session {session_id} belongs to another client: send the session_token its first \
                     EXECUTE_TASK returned"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether any shard holds a cache of `session_id`.
    pub fn has_session(&self, session_id: &str) -> bool {
        self.sessions.keys().any(|(id, _)| id == session_id)
    }

    /// How long since a step of `session_id` last ran (on any shard); `None` when it is not held.
    pub fn idle_for(&self, session_id: &str, now: Instant) -> Option<Duration> {
        self.sessions
            .iter()
            .filter(|((id, _), _)| id == session_id)
            .map(|(_, s)| now.saturating_duration_since(s.used_at))
            .min()
    }

    /// Graphs stop early while `flag` is set; their steps fail with [`ggml::ABORTED`] (no
    /// session advances: cells they wrote are past the session's `n_past`, overwritten later).
    pub fn set_abort_flag(&mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.backend.set_abort(flag);
    }

    /// Frees every cache of `session_id`, whoever owns it; returns how many there were.
    pub fn end_session(&mut self, session_id: &str) -> usize {
        let keys: Vec<(String, u32)> = self.sessions.keys().filter(|(id, _)| id == session_id).cloned().collect();
        for key in &keys {
            self.remove_session(key);
        }
        keys.len()
    }

    /// Drops a session and frees its slot (its pages go back to the system).
    fn remove_session(&mut self, key: &(String, u32)) {
        if let Some(s) = self.sessions.remove(key) {
            if let Some(pool) = self.pools.get_mut(&key.1) {
                pool.free(s.slot);
            }
        }
    }

    /// One step of `session_id` on `shard_id`: tokens at positions `pos..pos+n`. A step at
    /// `pos == 0` starts (or restarts) the session; a later `pos` must continue it (`pos <= n_past`,
    /// so a coordinator may replay from an earlier position).
    pub fn execute(
        &mut self,
        shard_id: u32,
        session_id: &str,
        pos: u32,
        input: &Input,
        want: Want,
    ) -> Result<Output, EngineError> {
        self.execute_as(shard_id, session_id, None, pos, input, want)
    }

    /// As `execute`, for the holder of `claim`: a new session belongs to the claim's token, and
    /// a session of another token is refused (`SESSION_FORBIDDEN`, the owner not named).
    pub fn execute_as(
        &mut self,
        shard_id: u32,
        session_id: &str,
        claim: Option<Claim>,
        pos: u32,
        input: &Input,
        want: Want,
    ) -> Result<Output, EngineError> {
        let step = Step { session_id, claim, pos, input, want };
        self.execute_batch(shard_id, &[step]).pop().expect("one result per step")
    }

    /// Runs the steps of several sessions on `shard_id`, as few ggml graphs as possible (one
    /// matrix multiply per weight for all of them; see [`forward::step_batch`]): continuous
    /// batching. Each step is validated on its own and gets its own result, in order; a step that
    /// fails validation does not hold back the others. Steps of one session run in the order
    /// given (a later step of a session already in the batch starts the next graph), and a batch
    /// is cut where it would pass [`MAX_BATCH_TOKENS`]. Results equal running the steps one by
    /// one with [`Engine::execute_as`], up to the rounding of batched matrix products.
    pub fn execute_batch(&mut self, shard_id: u32, steps: &[Step]) -> Vec<Result<Output, EngineError>> {
        let mut results: Vec<Option<Result<Output, EngineError>>> = (0..steps.len()).map(|_| None).collect();
        // Steps admitted to the graph being gathered: (index in `steps`, session key).
        let mut batch: Vec<(usize, (String, u32))> = Vec::new();
        let mut batch_tokens = 0usize;
        for (i, step) in steps.iter().enumerate() {
            let n = step.input.n_tokens();
            let key = (step.session_id.to_string(), shard_id);
            let again = batch.iter().any(|(_, k)| *k == key);
            if again || (!batch.is_empty() && batch_tokens + n > MAX_BATCH_TOKENS) {
                self.run_batch(shard_id, steps, &batch, &mut results);
                batch.clear();
                batch_tokens = 0;
            }
            let protect: Vec<&(String, u32)> = batch.iter().map(|(_, k)| k).collect();
            let mut admitted = self.admit(shard_id, step, &protect);
            if matches!(&admitted, Err(e) if e.message == NO_ROOM_IN_BATCH) && !batch.is_empty() {
                // Room only by evicting a session of this batch: run the batch first.
                self.run_batch(shard_id, steps, &batch, &mut results);
                batch.clear();
                batch_tokens = 0;
                admitted = self.admit(shard_id, step, &[]);
            }
            match admitted {
                Ok(()) => {
                    batch.push((i, key));
                    batch_tokens += n;
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        self.run_batch(shard_id, steps, &batch, &mut results);
        results.into_iter().map(|r| r.expect("every step gets a result")).collect()
    }

    /// Checks one step and finds (or starts) its session's cache; `protect` are sessions of the
    /// batch being gathered, which eviction must not take.
    fn admit(&mut self, shard_id: u32, step: &Step, protect: &[&(String, u32)]) -> Result<(), EngineError> {
        let Step { session_id, claim, pos, input, .. } = *step;
        let Some(model) = self.shards.get(&shard_id) else {
            return Err(err(ErrorCode::ShardNotLoaded, format!("shard {shard_id} is not loaded on this node")));
        };
        let hp = &model.hp;
        if session_id.is_empty() || session_id.len() > MAX_SESSION_ID {
            return Err(err(ErrorCode::OutOfRange, format!("session_id must be 1..={MAX_SESSION_ID} bytes")));
        }
        let n = input.n_tokens();
        let n_ctx = self.cfg.ctx_size.min(hp.n_ctx_train).max(1);
        if n == 0 {
            return Err(err(ErrorCode::OutOfRange, "input holds no tokens"));
        }
        if pos as u64 + n as u64 > n_ctx as u64 {
            return Err(err(
                ErrorCode::ContextExceeded,
                format!("positions {pos}..{} run past the context of {n_ctx} tokens", pos as u64 + n as u64),
            ));
        }
        match input {
            Input::Tokens(ids) => {
                if !model.first() {
                    return Err(err(
                        ErrorCode::ShapeMismatch,
                        format!(
                            "shard {shard_id} starts at layer {}: it takes a hidden state, not tokens",
                            model.begin
                        ),
                    ));
                }
                if let Some(bad) = ids.iter().find(|&&t| t >= hp.n_vocab) {
                    return Err(err(
                        ErrorCode::OutOfRange,
                        format!("token id {bad} is outside the vocabulary (0..{})", hp.n_vocab),
                    ));
                }
            }
            Input::Hidden { data, n_tokens, width } => {
                if model.first() {
                    return Err(err(
                        ErrorCode::ShapeMismatch,
                        format!("shard {shard_id} starts at layer 0: it takes tokens"),
                    ));
                }
                if *width != hp.n_embd as usize || data.len() != n_tokens * width {
                    return Err(err(
                        ErrorCode::ShapeMismatch,
                        format!("hidden state is {n_tokens} x {width}, this model needs n x {}", hp.n_embd),
                    ));
                }
                if data.iter().any(|v| !v.is_finite()) {
                    return Err(err(ErrorCode::OutOfRange, "hidden state holds a NaN or infinity"));
                }
            }
        }

        // The session's cache: continue it, restart it at pos 0, or refuse a gap.
        let key = (session_id.to_string(), shard_id);
        self.clock += 1;
        let clock = self.clock;
        self.check_owner(session_id, claim.map(|c| c.token))?;
        match self.sessions.get_mut(&key) {
            Some(s) if pos > s.n_past => {
                return Err(err(
                    ErrorCode::OutOfRange,
                    format!("session {session_id} holds {} positions; pos {pos} would leave a gap", s.n_past),
                ));
            }
            Some(s) => {
                s.last_used = clock;
                s.used_at = Instant::now();
                s.steps += 1;
            }
            None if pos != 0 => {
                return Err(err(
                    ErrorCode::UnknownSession,
                    format!("unknown session {session_id} on shard {shard_id} (a session starts at pos 0)"),
                ));
            }
            None => {
                let (n_embd_kv, layers) = (hp.n_embd_kv(), model.layers());
                let bytes = kv::KvPool::slot_bytes(layers, n_embd_kv, n_ctx);
                if bytes > self.cfg.kv_budget {
                    return Err(err(
                        ErrorCode::Busy,
                        format!("a session needs {bytes} KV bytes, the budget is {}", self.cfg.kv_budget),
                    ));
                }
                self.make_room(bytes, claim.map_or("", |c| c.origin), session_id, protect)?;
                // The shard's pool, reserved for as many slots as the limits can admit on it:
                // every session of this shard takes `bytes` of the budget.
                let n_slots =
                    (self.cfg.kv_budget / bytes).min(self.cfg.max_sessions.max(1) as u64).min(u32::MAX as u64) as u32;
                let pool = match self.pools.entry(shard_id) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(
                        kv::KvPool::new(layers, n_embd_kv, n_ctx, n_slots).map_err(|e| err(ErrorCode::Busy, e))?,
                    ),
                };
                let Some(slot) = pool.alloc() else {
                    // Not reached: the count and budget checked above leave a slot free.
                    return Err(err(
                        ErrorCode::Busy,
                        format!("all {} KV slots of shard {shard_id} are held", pool.n_slots()),
                    ));
                };
                self.sessions.insert(
                    key,
                    Session {
                        slot,
                        bytes,
                        owner: claim.map(|c| Owner { token: token_digest(c.token), origin: c.origin.to_string() }),
                        n_past: 0,
                        last_used: clock,
                        used_at: Instant::now(),
                        steps: 1,
                    },
                );
            }
        }
        Ok(())
    }

    /// Computes the admitted steps `batch` in one graph and stores their results.
    fn run_batch(
        &mut self,
        shard_id: u32,
        steps: &[Step],
        batch: &[(usize, (String, u32))],
        results: &mut [Option<Result<Output, EngineError>>],
    ) {
        if batch.is_empty() {
            return;
        }
        let model = &self.shards[&shard_id];
        let Some(pool) = self.pools.get(&shard_id) else {
            for (i, _) in batch {
                results[*i] = Some(Err(err(ErrorCode::Internal, format!("shard {shard_id} has no KV pool"))));
            }
            return;
        };
        // In slot order: sessions in consecutive slots share one attention call per layer.
        let mut batch = batch.to_vec();
        batch.sort_by_key(|(_, key)| self.sessions[key].slot);
        let batch = &batch[..];
        let seqs: Vec<forward::Seq> = batch
            .iter()
            .map(|(i, key)| {
                let step = &steps[*i];
                forward::Seq {
                    slot: self.sessions[key].slot,
                    pos: step.pos,
                    n_tokens: step.input.n_tokens() as u32,
                    input: match step.input {
                        Input::Tokens(ids) => StepInput::Tokens(ids),
                        Input::Hidden { data, .. } => StepInput::Hidden(data),
                    },
                    all_logits: matches!(step.want, Want::Logits { all: true }),
                }
            })
            .collect();
        let kept = self.kept.entry(shard_id).or_insert_with(|| None);
        let outs = forward::step_batch_kept(&mut self.backend, model, pool, &seqs, kept).map(|ran| {
            self.graphs_reused += ran.reused as u64;
            self.last_graph_nodes = ran.nodes;
            ran.outputs
        });
        let (n_embd, n_vocab) = (model.hp.n_embd as usize, model.hp.n_vocab as usize);
        drop(seqs);
        match outs {
            Err(e) => {
                for (i, _) in batch {
                    results[*i] = Some(Err(err(ErrorCode::Internal, e.clone())));
                }
            }
            Ok(outs) => {
                for ((i, key), out) in batch.iter().zip(outs) {
                    let n = steps[*i].input.n_tokens();
                    if let Some(s) = self.sessions.get_mut(key) {
                        s.n_past = steps[*i].pos + n as u32;
                    }
                    // A model's values (weights, norms) can still drive the arithmetic to NaN or
                    // infinity: that is an error, never a number sent on.
                    let values = match &out {
                        StepOutput::Hidden(data) => data,
                        StepOutput::Logits { data, .. } => data,
                    };
                    if let Some(j) = values.iter().position(|v| !v.is_finite()) {
                        results[*i] = Some(Err(err(
                            ErrorCode::NumericError,
                            format!(
                                "shard {shard_id} computed a non-finite value ({} at index {j}): the model's values \
                                 are broken",
                                values[j]
                            ),
                        )));
                        continue;
                    }
                    results[*i] = Some(Ok(match out {
                        StepOutput::Hidden(data) => Output::Hidden { data, n_tokens: n, width: n_embd },
                        StepOutput::Logits { data, rows } => Output::Logits { data, rows, n_vocab },
                    }));
                }
            }
        }
    }

    /// Makes room for a new session `session_id` of `origin` taking `bytes`. Never evicted:
    /// `session_id` itself (on any shard: a session created on shard 0 survives its creation on
    /// shard 1) and sessions in `protect` (the batch being gathered: their steps are queued). A client at its quota loses its own least
    /// recently used session. Otherwise, while the count or the KV budget is exceeded, one
    /// session goes: idle ones ([`SESSION_IDLE_AFTER`]) before recently used ones; among them
    /// one of the client holding the most sessions (the most KV bytes when only the budget is
    /// exceeded); among those the one with the fewest steps (a session opened and left goes
    /// before one that is decoding), then the least recently used. With nothing left to evict the new session is
    /// refused (`BUSY`), never another's step.
    fn make_room(
        &mut self,
        bytes: u64,
        origin: &str,
        session_id: &str,
        protect: &[&(String, u32)],
    ) -> Result<(), EngineError> {
        let origin_of = |s: &Session| s.owner.as_ref().map_or("", |o| o.origin.as_str()).to_string();
        let quota = self.cfg.max_sessions_per_client.clamp(1, self.cfg.max_sessions.max(1));
        let now = Instant::now();
        loop {
            let (count, used) = self.sessions();
            let mut per: HashMap<String, (usize, u64)> = HashMap::new();
            for s in self.sessions.values() {
                let e = per.entry(origin_of(s)).or_default();
                e.0 += 1;
                e.1 += s.bytes;
            }
            let mine = per.get(origin).map_or(0, |e| e.0);
            let over_quota = mine >= quota;
            let over_count = count >= self.cfg.max_sessions;
            if !over_quota && !over_count && used + bytes <= self.cfg.kv_budget {
                return Ok(());
            }
            let by_bytes = !over_quota && !over_count;
            let victim = self
                .sessions
                .iter()
                .filter(|(k, s)| k.0 != session_id && !protect.contains(k) && (!over_quota || origin_of(s) == origin))
                .max_by_key(|(_, s)| {
                    let idle = now.saturating_duration_since(s.used_at) >= SESSION_IDLE_AFTER;
                    let (n, b) = per[&origin_of(s)];
                    let weight = if by_bytes { b } else { n as u64 };
                    (idle, weight, std::cmp::Reverse(s.steps), std::cmp::Reverse(s.last_used))
                })
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else {
                if !protect.is_empty() {
                    // The batch being gathered holds the rest: it runs first, then this step retries.
                    return Err(err(ErrorCode::Busy, NO_ROOM_IN_BATCH));
                }
                return Err(err(
                    ErrorCode::Busy,
                    format!(
                        "no room for session {session_id}: {count} sessions ({used} KV bytes) are held, \
                         none of them evictable (each is in the batch being run{})",
                        if over_quota { ", or this client holds its quota" } else { "" }
                    ),
                ));
            };
            // While a batch is gathered its sessions cannot be chosen, so the choice among the
            // rest is not a fair one: a recently used session is evicted only with the whole
            // table to choose from (the batch runs first, then this step retries).
            if !protect.is_empty() && now.saturating_duration_since(self.sessions[&victim].used_at) < SESSION_IDLE_AFTER
            {
                return Err(err(ErrorCode::Busy, NO_ROOM_IN_BATCH));
            }
            crate::debug!("evicting session {} on shard {} to make room for {session_id}", victim.0, victim.1);
            self.remove_session(&victim);
        }
    }
}
