//! The inference engine: vendored ggml running LLaMA layer ranges straight from a shard's
//! memory map, with a KV cache per session.
//!
//! - [`ggml`]      the safe wrapper; the only `unsafe` code calling into ggml
//! - [`model`]     hyper-parameters and weights of a shard (checked, wrapped in place)
//! - [`forward`]   the LLaMA block over a layer range, one graph per call
//! - [`tokenizer`] SentencePiece-style and GPT-2 BPE vocabularies from GGUF
//! - [`sampler`]   greedy, temperature, top-k, top-p, seeded
//!
//! [`Engine`] is what the node's inference worker (and `shardctl generate`) owns: loaded shards,
//! sessions bounded in count and bytes (least recently used evicted), and validation of every
//! input before ggml sees it, since ggml aborts the process on a bad shape.

pub mod forward;
pub mod generate;
pub mod ggml;
pub mod model;
pub mod sampler;
pub mod tokenizer;

#[allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code, unsafe_op_in_unsafe_fn, clippy::all)]
mod sys;

use crate::protocol::ErrorCode;
use forward::{StepInput, StepOutput};
use memmap2::Mmap;
use model::ShardModel;
use std::collections::HashMap;
use std::sync::Arc;

pub use model::Hparams;

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
    /// Copy matrices ggml has a faster CPU layout for into that layout (anonymous memory the size
    /// of those weights) instead of computing from the map as it is.
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
    cache: ggml::Cache,
    /// The token holder it belongs to (`None`: a local session, as `generate` runs).
    owner: Option<Owner>,
    /// Positions `0..n_past` hold keys and values.
    n_past: u32,
    n_ctx: u32,
    last_used: u64,
}

pub struct Engine {
    backend: ggml::Backend,
    cfg: EngineConfig,
    shards: HashMap<u32, ShardModel>,
    sessions: HashMap<(String, u32), Session>,
    clock: u64,
}

/// Session ids are short printable names chosen by the coordinator.
pub const MAX_SESSION_ID: usize = 128;

impl Engine {
    pub fn new(cfg: EngineConfig) -> Result<Engine, EngineError> {
        let backend = ggml::Backend::cpu(cfg.threads).map_err(|e| err(ErrorCode::Internal, e))?;
        Ok(Engine { backend, cfg, shards: HashMap::new(), sessions: HashMap::new(), clock: 0 })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Makes the shard in `map` runnable under `shard_id`, replacing what was there (and dropping
    /// the sessions that ran on the old one).
    pub fn load(&mut self, shard_id: u32, map: Arc<Mmap>) -> Result<&Hparams, EngineError> {
        let model = ShardModel::load(map, self.cfg.repack).map_err(|e| err(ErrorCode::ShardInvalid, e))?;
        if model.repacked_bytes() > 0 {
            crate::debug!("shard {shard_id}: {} weight bytes repacked for this CPU", model.repacked_bytes());
        }
        self.sessions.retain(|(_, s), _| *s != shard_id);
        self.shards.insert(shard_id, model);
        Ok(&self.shards[&shard_id].hp)
    }

    pub fn unload(&mut self, shard_id: u32) {
        self.sessions.retain(|(_, s), _| *s != shard_id);
        self.shards.remove(&shard_id);
    }

    pub fn is_loaded(&self, shard_id: u32) -> bool {
        self.shards.contains_key(&shard_id)
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
        (self.sessions.len(), self.sessions.values().map(|s| s.cache.bytes() as u64).sum())
    }

    /// Frees every cache of `session_id` if `token` is its owner's; returns how many there were.
    /// Another owner's session is `SESSION_FORBIDDEN` (the owner is not named).
    pub fn end_session_as(&mut self, session_id: &str, token: Option<&str>) -> Result<usize, EngineError> {
        self.check_owner(session_id, token)?;
        Ok(self.end_session(session_id))
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

    /// Frees every cache of `session_id`, whoever owns it; returns how many there were.
    pub fn end_session(&mut self, session_id: &str) -> usize {
        let before = self.sessions.len();
        self.sessions.retain(|(id, _), _| id != session_id);
        before - self.sessions.len()
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
        match self.sessions.get(&key) {
            Some(s) if pos > s.n_past => {
                return Err(err(
                    ErrorCode::OutOfRange,
                    format!("session {session_id} holds {} positions; pos {pos} would leave a gap", s.n_past),
                ));
            }
            Some(_) => {}
            None if pos != 0 => {
                return Err(err(
                    ErrorCode::UnknownSession,
                    format!("unknown session {session_id} on shard {shard_id} (a session starts at pos 0)"),
                ));
            }
            None => {
                let kv = hp.n_embd_kv() as i64;
                let layers = model.layers();
                let bytes = 2 * layers as u64 * kv as u64 * n_ctx as u64 * 2;
                if bytes > self.cfg.kv_budget {
                    return Err(err(
                        ErrorCode::Busy,
                        format!("a session needs {bytes} KV bytes, the budget is {}", self.cfg.kv_budget),
                    ));
                }
                self.make_room(bytes, claim.map_or("", |c| c.origin));
                let shapes: Vec<Vec<i64>> = (0..2 * layers).map(|_| vec![kv, n_ctx as i64]).collect();
                let cache = ggml::Cache::new(ggml::F16, &shapes).map_err(|e| err(ErrorCode::Busy, e))?;
                self.sessions.insert(
                    key.clone(),
                    Session {
                        cache,
                        owner: claim.map(|c| Owner { token: token_digest(c.token), origin: c.origin.to_string() }),
                        n_past: 0,
                        n_ctx,
                        last_used: clock,
                    },
                );
            }
        }
        let session = self.sessions.get_mut(&key).unwrap();
        session.last_used = clock;
        let model = &self.shards[&shard_id];
        let step_input = match input {
            Input::Tokens(ids) => StepInput::Tokens(ids),
            Input::Hidden { data, .. } => StepInput::Hidden(data),
        };
        let all = matches!(want, Want::Logits { all: true });
        let out =
            forward::step(&mut self.backend, model, &session.cache, session.n_ctx, pos, n as u32, step_input, all)
                .map_err(|e| err(ErrorCode::Internal, e))?;
        session.n_past = pos + n as u32;
        // A model's values (weights, norms) can still drive the arithmetic to NaN or infinity:
        // that is an error, never a number sent on.
        let values = match &out {
            StepOutput::Hidden(data) => data,
            StepOutput::Logits { data, .. } => data,
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(err(
                ErrorCode::NumericError,
                format!(
                    "shard {shard_id} computed a non-finite value ({} at index {i}): the model's values are broken",
                    values[i]
                ),
            ));
        }
        Ok(match out {
            StepOutput::Hidden(data) => Output::Hidden { data, n_tokens: n, width: model.hp.n_embd as usize },
            StepOutput::Logits { data, rows } => Output::Logits { data, rows, n_vocab: model.hp.n_vocab as usize },
        })
    }

    /// Makes room for a new session of `origin` taking `bytes`. A client at its quota loses its
    /// own least recently used session; otherwise, while the count or the KV budget is exceeded,
    /// the least recently used session of the client holding the most goes. So one client
    /// opening many sessions evicts only its own, never another's.
    fn make_room(&mut self, bytes: u64, origin: &str) {
        let origin_of = |s: &Session| s.owner.as_ref().map_or("", |o| o.origin.as_str()).to_string();
        loop {
            let (count, used) = self.sessions();
            let mut per: HashMap<String, usize> = HashMap::new();
            for s in self.sessions.values() {
                *per.entry(origin_of(s)).or_default() += 1;
            }
            let mine = per.get(origin).copied().unwrap_or(0);
            let quota = self.cfg.max_sessions_per_client.clamp(1, self.cfg.max_sessions.max(1));
            let victim_origin = if mine >= quota {
                origin.to_string()
            } else if count >= self.cfg.max_sessions || used + bytes > self.cfg.kv_budget {
                match per.iter().max_by_key(|(o, n)| (**n, o.as_str() == origin)) {
                    Some((o, _)) => o.clone(),
                    None => return,
                }
            } else {
                return;
            };
            let Some(oldest) = self
                .sessions
                .iter()
                .filter(|(_, s)| origin_of(s) == victim_origin)
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            crate::debug!("evicting session {} on shard {} (least recently used of its client)", oldest.0, oldest.1);
            self.sessions.remove(&oldest);
        }
    }
}
