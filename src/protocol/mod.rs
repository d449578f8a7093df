//! The command protocol (DESIGN section 4): frames of JSON requests and
//! responses. Everything here is sans-IO: bytes in, typed values or bytes out.
//!
//! Request:  `{"command","request_id","from","to","params"}`, as JSON or as the header of a
//!           binary frame ([`binary`]: tensors as raw bytes after the JSON)
//! Response: `{"command","request_id","status":"success","result":{..}}` or
//!           `{"command","request_id","status":"error","error":"..","code":".."}`

pub mod auth;
pub mod binary;
pub mod frame;
pub mod tensor;

use serde_json::{Map, Value, json};

use crate::torrent::metainfo::{InfoHash, check_file_name};

/// The most logits an `EXECUTE_TASK` with `output: "top_k"` returns (`k`).
pub const MAX_TOP_K: u64 = 1000;
/// Largest shard id a request may name; real models have far fewer shards.
pub const MAX_SHARD_ID: u64 = 4095;
/// Longest string `request_id` echoed back.
pub const MAX_REQUEST_ID_LEN: usize = 256;

/// Machine-readable error codes carried in `"code"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    FrameTooLarge,
    InvalidUtf8,
    InvalidJson,
    NotAnObject,
    MissingField,
    WrongType,
    UnknownCommand,
    OutOfRange,
    BadPath,
    ShardNotFound,
    ShardInvalid,
    TorrentUnavailable,
    Busy,
    Internal,
    ShardNotLoaded,
    UnknownSession,
    ShapeMismatch,
    ContextExceeded,
    BadRoute,
    HopFailed,
    SessionForbidden,
    AuthRequired,
    AuthFailed,
    AuthUnavailable,
    AuthTimeout,
    ManifestMismatch,
    /// A computation produced NaN or infinity (a hostile or broken model).
    NumericError,
    /// A loaded shard's file changed under the node (its length differs from the map's).
    ShardChanged,
    /// `--max-downloads` downloads are under way.
    DownloadLimit,
    /// The torrent's declared length does not fit the download disk budget.
    DiskBudget,
    /// Another download or file already holds the target name.
    NameConflict,
    /// A connection cap is reached and nothing idle could be shed (`--max-*-connections*`).
    TooManyConnections,
    /// A frame was not whole `--frame-timeout` seconds after its first byte.
    FrameTimeout,
    /// Partial frames went over `--frame-memory`; this connection held the largest.
    FrameMemoryExceeded,
    /// A binary frame whose prefix or header length does not fit the frame ([`binary`]).
    InvalidFrame,
    /// The request was withdrawn by a `CANCEL` from the connection that sent it, or its
    /// computation stopped because every client it was for had gone.
    Cancelled,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::InvalidUtf8 => "INVALID_UTF8",
            ErrorCode::InvalidJson => "INVALID_JSON",
            ErrorCode::NotAnObject => "NOT_AN_OBJECT",
            ErrorCode::MissingField => "MISSING_FIELD",
            ErrorCode::WrongType => "WRONG_TYPE",
            ErrorCode::UnknownCommand => "UNKNOWN_COMMAND",
            ErrorCode::OutOfRange => "OUT_OF_RANGE",
            ErrorCode::BadPath => "BAD_PATH",
            ErrorCode::ShardNotFound => "SHARD_NOT_FOUND",
            ErrorCode::ShardInvalid => "SHARD_INVALID",
            ErrorCode::TorrentUnavailable => "TORRENT_UNAVAILABLE",
            ErrorCode::Busy => "BUSY",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::ShardNotLoaded => "SHARD_NOT_LOADED",
            ErrorCode::UnknownSession => "UNKNOWN_SESSION",
            ErrorCode::ShapeMismatch => "SHAPE_MISMATCH",
            ErrorCode::ContextExceeded => "CONTEXT_EXCEEDED",
            ErrorCode::BadRoute => "BAD_ROUTE",
            ErrorCode::HopFailed => "HOP_FAILED",
            ErrorCode::SessionForbidden => "SESSION_FORBIDDEN",
            ErrorCode::AuthRequired => "AUTH_REQUIRED",
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::AuthUnavailable => "AUTH_UNAVAILABLE",
            ErrorCode::AuthTimeout => "AUTH_TIMEOUT",
            ErrorCode::ManifestMismatch => "MANIFEST_MISMATCH",
            ErrorCode::NumericError => "NUMERIC_ERROR",
            ErrorCode::ShardChanged => "SHARD_CHANGED",
            ErrorCode::DownloadLimit => "DOWNLOAD_LIMIT",
            ErrorCode::DiskBudget => "DISK_BUDGET",
            ErrorCode::NameConflict => "NAME_CONFLICT",
            ErrorCode::TooManyConnections => "TOO_MANY_CONNECTIONS",
            ErrorCode::FrameTimeout => "FRAME_TIMEOUT",
            ErrorCode::FrameMemoryExceeded => "FRAME_MEMORY_EXCEEDED",
            ErrorCode::InvalidFrame => "INVALID_FRAME",
            ErrorCode::Cancelled => "CANCELLED",
        }
    }
}

/// The commands this node answers.
pub const COMMANDS: &[&str] = &[
    "LIST_FILES",
    "LOAD_SHARD",
    "STATUS",
    "DOWNLOAD",
    "FIND_PEERS",
    "EXECUTE_TASK",
    "END_SESSION",
    "MODEL_INFO",
    "AUTH",
    "GET_MANIFEST",
    "CANCEL",
];

/// Request ids one `CANCEL` may name.
pub const MAX_CANCEL_IDS: usize = 1024;

#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    ListFiles,
    LoadShard(LoadShard),
    Status,
    Download(Download),
    FindPeers(PeersKey),
    ExecuteTask(ExecuteTask),
    EndSession {
        session_id: String,
        /// The token the session's first EXECUTE_TASK returned.
        session_token: Option<String>,
    },
    /// A step of the cluster-key handshake ([`auth`]).
    Auth(auth::AuthStep),
    /// The node's `manifest.json` when its SHA-256 is `hash` (the pinned model).
    GetManifest {
        hash: [u8; 32],
    },
    /// The model's shape and tokenizer, from any GGUF shard the node has.
    ModelInfo,
    /// Withdraws `EXECUTE_TASK`s this connection sent (by their `request_id`s, at most
    /// [`MAX_CANCEL_IDS`]): queued ones are answered `CANCELLED` uncomputed, their relays
    /// cancelled down the chain. A relaying node sends it down a link that other chains keep open.
    Cancel {
        request_ids: Vec<Value>,
    },
}

/// One hop of a pipeline: the node at `address` runs `shard_id`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    pub address: std::net::SocketAddr,
    pub shard_id: u32,
}

/// The `hop_timeout_ms` a hop passes on to the next one, given its own: shorter by an eighth
/// (at least 100 ms, at most 5 s), so that when a host goes silent the hop nearest to it gives
/// up first and its `HOP_FAILED` names that host, before any caller further up times out and
/// blames its own (healthy) next hop. The slack covers the next hop's compute and the answer's
/// way back. A coordinator waiting `T` for an answer sends `next_hop_timeout_ms(T)`.
pub fn next_hop_timeout_ms(own_ms: u64) -> u64 {
    let own_ms = own_ms.min(MAX_HOP_TIMEOUT_MS);
    let slack = (own_ms / 8).clamp(100, 5_000);
    own_ms.saturating_sub(slack).max(1)
}

/// The longest `hop_timeout_ms` a task may ask (10 minutes): longer than any step a node computes
/// (a full-context prefill chunk on a slow CPU takes seconds to a minute), short enough that a
/// relay slot (`--max-relays`) held by a next hop that never answers comes back within minutes.
/// Before: an hour, so a stranger's chains into a silent hop held slots for an hour.
pub const MAX_HOP_TIMEOUT_MS: u64 = 600_000;

/// Most rows of logits one `EXECUTE_TASK` with `all_logits` may ask for: at SmolLM2's 49152-token
/// vocabulary 64 rows are a 17 MB answer (base64 f32), 512 rows were 134 MB each. Longer inputs
/// are sent in chunks of at most this many tokens. The same number as the steps one inference
/// round takes, so one round's logits answers stay within 64 rows each.
pub const MAX_ALL_LOGITS_ROWS: usize = 64;

/// Most hops one EXECUTE_TASK may name.
pub const MAX_HOPS: usize = 64;

/// `EXECUTE_TASK`: run tokens (or a hidden state) at positions `pos..` of a session through a shard.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecuteTask {
    pub session_id: String,
    pub shard_id: u32,
    pub pos: u32,
    pub input: TaskInput,
    pub output: TaskOutput,
    /// Hops after this one: the result goes to `next[0]` as its input, and so on; the last
    /// hop's output comes back.
    pub next: Vec<Hop>,
    /// Load the shard (from disk or the swarm) if it is not loaded (default true).
    pub load: bool,
    /// How long to wait for the next hop's answer.
    pub hop_timeout_ms: u64,
    /// The session's owner token: required when the session exists; when it does not, the new
    /// session takes this one (a relay passes its caller's on) or the node makes one.
    pub session_token: Option<String>,
    /// The original caller, as a relaying node names it; heeded only on an authenticated
    /// connection (it keys the per-client session quota).
    pub origin: Option<String>,
    /// How the answer carries its tensors (`encoding_format`).
    pub encoding: Encoding,
}

/// How an answer carries its tensors: the request's `encoding_format` (OpenAI's name for the
/// same choice in its embeddings API).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// `"base64"` (the default): a JSON frame, tensors as `{dtype, shape, b64}`.
    #[default]
    Base64,
    /// `"binary"`: a binary frame ([`binary`]), tensors as raw little-endian bytes.
    Binary,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TaskInput {
    Tokens(Vec<u32>),
    Hidden { data: Vec<f32>, rows: usize, cols: usize },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TaskOutput {
    Hidden,
    /// Logits of the last token, or of every token (`all_logits`).
    Logits {
        all: bool,
    },
    /// The k largest logits of the last token, as `[{id, logit}]`.
    TopK(usize),
}

/// What an `EXECUTE_TASK` answer may hold beside its output: request and session ids, an error
/// text, a frame's MAC tag, the binary frame's header length (bytes).
pub const ANSWER_BASE_BYTES: usize = 64 * 1024;
/// Bytes allowed per entry of an answer's `hops` (an address, a shard id and four timings take
/// about 200).
pub const ANSWER_BYTES_PER_HOP: usize = 1024;
/// Bytes allowed per `top_k` entry (`{"id":49151,"logit":-3.4028235e38}` takes 37).
pub const ANSWER_BYTES_PER_TOP_K: usize = 96;
/// Bytes allowed per float of a tensor (base64 takes 5.33, a raw data section 4).
pub const ANSWER_BYTES_PER_FLOAT: usize = 8;

/// The most bytes a well-formed answer to an `EXECUTE_TASK` can take, computed from what was
/// asked: `output` for `rows` input tokens through `hops` nodes (this one and those after it),
/// of a model with `n_vocab` tokens and hidden states `n_embd` wide. A frame declaring more is
/// refused before it is read whole or parsed: a hostile hop's 26 MB answer to a request for one
/// logit is never taken in (`--max-frame` bounds only what any frame may be).
pub fn answer_limit(output: TaskOutput, rows: usize, hops: usize, n_vocab: usize, n_embd: usize) -> usize {
    let (floats, entries) = match output {
        TaskOutput::Hidden => (rows.min(MAX_TASK_TOKENS).saturating_mul(n_embd), 0),
        TaskOutput::Logits { all: true } => (rows.clamp(1, MAX_ALL_LOGITS_ROWS).saturating_mul(n_vocab), 0),
        TaskOutput::Logits { all: false } => (n_vocab, 0),
        TaskOutput::TopK(k) => (0, k.min(n_vocab)),
    };
    ANSWER_BASE_BYTES
        .saturating_add(hops.min(MAX_HOPS + 1).saturating_mul(ANSWER_BYTES_PER_HOP))
        .saturating_add(entries.saturating_mul(ANSWER_BYTES_PER_TOP_K))
        .saturating_add(floats.saturating_mul(ANSWER_BYTES_PER_FLOAT))
}

/// Checks a successful `EXECUTE_TASK` answer's `result` against what was asked, after parsing:
/// `hops` names 1 to `hops` nodes, and for `output: "top_k"` the list holds 1 to `k` entries,
/// each an integer `id` below `n_vocab` with a numeric `logit`. Errors: what is wrong, for a
/// `HOP_FAILED` naming the node that answered (an answer that cannot be used is that hop's
/// failure, never an end of text).
pub fn check_answer(result: &Value, output: TaskOutput, hops: usize, n_vocab: usize) -> Result<(), String> {
    match result.get("hops") {
        Some(Value::Array(h)) if !h.is_empty() && h.len() <= hops => {}
        Some(Value::Array(h)) => {
            return Err(format!("the answer names {} hops, the chain has {hops}", h.len()));
        }
        _ => return Err("the answer has no hops list".into()),
    }
    if let TaskOutput::TopK(k) = output {
        let Some(top) = result.get("top_k").and_then(Value::as_array) else {
            return Err("the answer has no top_k list".into());
        };
        if top.is_empty() || top.len() > k.min(n_vocab) {
            return Err(format!("the answer's top_k holds {} entries, 1 to {} were asked", top.len(), k.min(n_vocab)));
        }
        for t in top {
            let id = t.get("id").and_then(Value::as_u64).filter(|&id| id < n_vocab as u64);
            if id.is_none() || !t.get("logit").is_some_and(Value::is_number) {
                let shown: String = t.to_string().chars().take(80).collect();
                return Err(format!("the answer's top_k entry {shown} is not a token id below {n_vocab} with a logit"));
            }
        }
    }
    Ok(())
}

/// Most tokens one EXECUTE_TASK may carry (a prompt is sent in batches).
pub const MAX_TASK_TOKENS: usize = 8192;
/// Largest hidden state one EXECUTE_TASK may carry, in floats.
pub const MAX_TASK_FLOATS: usize = 16 << 20;

/// What `FIND_PEERS` looks up in the DHT.
#[derive(Clone, Debug, PartialEq)]
pub enum PeersKey {
    /// An info hash or any other 20-byte key.
    Hash(InfoHash),
    /// The name key of a shard of this node's cluster.
    Shard(u32),
    /// The cluster key: the cluster's members.
    Cluster,
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::ListFiles => "LIST_FILES",
            Command::LoadShard(_) => "LOAD_SHARD",
            Command::Status => "STATUS",
            Command::Download(_) => "DOWNLOAD",
            Command::FindPeers(_) => "FIND_PEERS",
            Command::ExecuteTask(_) => "EXECUTE_TASK",
            Command::EndSession { .. } => "END_SESSION",
            Command::ModelInfo => "MODEL_INFO",
            Command::Auth(_) => "AUTH",
            Command::GetManifest { .. } => "GET_MANIFEST",
            Command::Cancel { .. } => "CANCEL",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoadShard {
    pub shard_id: u32,
    pub info_hash: Option<InfoHash>,
    /// Answer when loaded (true) or at once with `status: "loading"` (false).
    pub wait: bool,
    /// Load this file of the shards dir instead of the one the catalog names.
    pub filename: Option<String>,
    /// Peers to download the shard from when it is not here (IP:PORT).
    pub peers: Vec<std::net::SocketAddr>,
}

/// `DOWNLOAD`: fetch a torrent into the shards dir (not loading it).
#[derive(Clone, Debug, PartialEq)]
pub struct Download {
    pub info_hash: InfoHash,
    /// The `.torrent` file's bytes, when known (else metadata comes from peers).
    pub torrent: Option<Vec<u8>>,
    pub peers: Vec<std::net::SocketAddr>,
}

/// Largest `.torrent` a DOWNLOAD request may carry.
pub const MAX_TORRENT_BYTES: usize = 8 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub command: Command,
    pub request_id: Value,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A request that could not be accepted, with what is known of it for the reply.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestError {
    pub command: Value,
    pub request_id: Value,
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    pub fn to_frame_payload(&self) -> Vec<u8> {
        error_payload(self.command.clone(), self.request_id.clone(), self.code, &self.message)
    }
}

impl Request {
    /// Parses one frame's payload: JSON, or a binary frame ([`binary`]) whose data section
    /// holds exactly the bytes its tensors name.
    pub fn parse(payload: &[u8]) -> Result<Request, RequestError> {
        if !binary::is_binary(payload) {
            return Request::parse_json(payload, None);
        }
        let parts = binary::split(payload).map_err(|message| RequestError {
            command: Value::Null,
            request_id: Value::Null,
            code: ErrorCode::InvalidFrame,
            message,
        })?;
        let section = binary::Section::new(parts.data);
        let request = Request::parse_json(parts.header, Some(&section))?;
        // Bytes no tensor named: a frame built wrong (or smuggling), refused whole.
        section.all_named().map_err(|(code, message)| RequestError {
            command: json!(request.command.name()),
            request_id: request.request_id.clone(),
            code,
            message,
        })?;
        Ok(request)
    }

    /// Parses a JSON request (a binary frame's header, with its data `section`).
    fn parse_json(payload: &[u8], section: Option<&binary::Section>) -> Result<Request, RequestError> {
        let fail =
            |code, message: String| RequestError { command: Value::Null, request_id: Value::Null, code, message };
        let text = std::str::from_utf8(payload)
            .map_err(|e| fail(ErrorCode::InvalidUtf8, format!("frame is not UTF-8: {e}")))?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| fail(ErrorCode::InvalidJson, format!("frame is not JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(fail(ErrorCode::NotAnObject, format!("request must be a JSON object, got {}", kind(&value))));
        };
        // From here on, errors echo whatever command and request_id are usable.
        let mut err = RequestError {
            command: Value::Null,
            request_id: Value::Null,
            code: ErrorCode::Internal,
            message: String::new(),
        };
        match obj.get("request_id") {
            Some(id @ Value::String(s)) if s.len() <= MAX_REQUEST_ID_LEN => err.request_id = id.clone(),
            Some(id @ Value::Number(n)) if n.is_u64() || n.is_i64() => err.request_id = id.clone(),
            _ => {}
        }
        if let Some(c @ Value::String(s)) = obj.get("command")
            && s.len() <= 64
        {
            err.command = c.clone();
        }
        let fail = |code, message: String| RequestError { code, message, ..err.clone() };

        let command = match obj.get("command") {
            None => return Err(fail(ErrorCode::MissingField, "missing field \"command\"".into())),
            Some(Value::String(s)) => s.as_str(),
            Some(v) => {
                return Err(fail(ErrorCode::WrongType, format!("\"command\" must be a string, got {}", kind(v))));
            }
        };
        match obj.get("request_id") {
            None => return Err(fail(ErrorCode::MissingField, "missing field \"request_id\"".into())),
            Some(Value::String(s)) if s.len() > MAX_REQUEST_ID_LEN => {
                return Err(fail(
                    ErrorCode::OutOfRange,
                    format!("\"request_id\" longer than {MAX_REQUEST_ID_LEN} bytes"),
                ));
            }
            Some(_) if err.request_id.is_null() => {
                return Err(fail(ErrorCode::WrongType, "\"request_id\" must be a string or an integer".into()));
            }
            Some(_) => {}
        }
        let from = optional_string(&obj, "from").map_err(|m| fail(ErrorCode::WrongType, m))?;
        let to = optional_string(&obj, "to").map_err(|m| fail(ErrorCode::WrongType, m))?;
        let empty = Map::new();
        let params = match obj.get("params") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(p)) => p,
            Some(v) => {
                return Err(fail(ErrorCode::WrongType, format!("\"params\" must be an object, got {}", kind(v))));
            }
        };
        let command = match command {
            "LIST_FILES" => Command::ListFiles,
            "STATUS" => Command::Status,
            "LOAD_SHARD" => Command::LoadShard(parse_load_shard(params).map_err(|(c, m)| fail(c, m))?),
            "DOWNLOAD" => Command::Download(parse_download(params).map_err(|(c, m)| fail(c, m))?),
            "FIND_PEERS" => Command::FindPeers(parse_find_peers(params).map_err(|(c, m)| fail(c, m))?),
            "EXECUTE_TASK" => Command::ExecuteTask(parse_execute_task(params, section).map_err(|(c, m)| fail(c, m))?),
            "MODEL_INFO" => Command::ModelInfo,
            "CANCEL" => Command::Cancel { request_ids: parse_cancel(params).map_err(|(c, m)| fail(c, m))? },
            "END_SESSION" => Command::EndSession {
                session_id: session_id(params).map_err(|(c, m)| fail(c, m))?,
                session_token: session_token(params).map_err(|(c, m)| fail(c, m))?,
            },
            "AUTH" => Command::Auth(auth::parse_step(params).map_err(|m| fail(ErrorCode::AuthFailed, m))?),
            "GET_MANIFEST" => {
                let hash = params
                    .get("hash")
                    .and_then(Value::as_str)
                    .and_then(|h| if h.len() == 64 { crate::hash::from_hex_vec(h) } else { None })
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| {
                        fail(ErrorCode::WrongType, "GET_MANIFEST needs params.hash: 64 hex digits".into())
                    })?;
                Command::GetManifest { hash }
            }
            other => {
                return Err(fail(
                    ErrorCode::UnknownCommand,
                    format!("unknown command {other:?} (known: {})", COMMANDS.join(", ")),
                ));
            }
        };
        Ok(Request { command, request_id: err.request_id, from, to })
    }
}

/// `CANCEL`'s `request_ids`: 1..=[`MAX_CANCEL_IDS`] strings or integers, as request ids are.
fn parse_cancel(params: &Map<String, Value>) -> Result<Vec<Value>, (ErrorCode, String)> {
    let ids = match params.get("request_ids") {
        None => return Err((ErrorCode::MissingField, "CANCEL needs params.request_ids".into())),
        Some(Value::Array(ids)) => ids,
        Some(v) => return Err((ErrorCode::WrongType, format!("request_ids must be an array, got {}", kind(v)))),
    };
    if ids.is_empty() || ids.len() > MAX_CANCEL_IDS {
        return Err((ErrorCode::OutOfRange, format!("request_ids must hold 1..={MAX_CANCEL_IDS} ids")));
    }
    for id in ids {
        match id {
            Value::String(s) if s.len() <= MAX_REQUEST_ID_LEN => {}
            Value::Number(n) if n.is_u64() || n.is_i64() => {}
            _ => {
                return Err((
                    ErrorCode::WrongType,
                    format!("each request id must be an integer or a string of at most {MAX_REQUEST_ID_LEN} bytes"),
                ));
            }
        }
    }
    Ok(ids.clone())
}

fn parse_load_shard(params: &Map<String, Value>) -> Result<LoadShard, (ErrorCode, String)> {
    let shard_id = match params.get("shard_id") {
        None => return Err((ErrorCode::MissingField, "missing param \"shard_id\"".into())),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(id), _) if id <= MAX_SHARD_ID => id as u32,
            (Some(_), _) | (None, Some(_)) => {
                return Err((ErrorCode::OutOfRange, format!("shard_id {n} outside 0..={MAX_SHARD_ID}")));
            }
            _ if n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                return Err((ErrorCode::OutOfRange, format!("shard_id {n} outside 0..={MAX_SHARD_ID}")));
            }
            _ => return Err((ErrorCode::WrongType, format!("shard_id must be an integer, got {n}"))),
        },
        Some(v) => return Err((ErrorCode::WrongType, format!("shard_id must be an integer, got {}", kind(v)))),
    };
    let info_hash = match params.get("info_hash") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            InfoHash::from_hex(s)
                .ok_or_else(|| (ErrorCode::WrongType, format!("info_hash {s:?} is not 40 hex digits")))?,
        ),
        Some(v) => return Err((ErrorCode::WrongType, format!("info_hash must be a string, got {}", kind(v)))),
    };
    let wait = bool_param(params, "wait", true)?;
    let filename = match params.get("filename") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            check_file_name(s).map_err(|e| (ErrorCode::BadPath, format!("filename: {e}")))?;
            Some(s.clone())
        }
        Some(v) => return Err((ErrorCode::WrongType, format!("filename must be a string, got {}", kind(v)))),
    };
    let peers = parse_peers(params)?;
    Ok(LoadShard { shard_id, info_hash, wait, filename, peers })
}

fn session_id(params: &Map<String, Value>) -> Result<String, (ErrorCode, String)> {
    match params.get("session_id") {
        None => Err((ErrorCode::MissingField, "missing param \"session_id\"".into())),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_SESSION_ID_LEN => Ok(s.clone()),
        Some(Value::String(_)) => {
            Err((ErrorCode::OutOfRange, format!("session_id must be 1..={MAX_SESSION_ID_LEN} bytes")))
        }
        Some(v) => Err((ErrorCode::WrongType, format!("session_id must be a string, got {}", kind(v)))),
    }
}

/// Longest session id.
pub const MAX_SESSION_ID_LEN: usize = 128;

fn bool_param(params: &Map<String, Value>, key: &str, default: bool) -> Result<bool, (ErrorCode, String)> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err((ErrorCode::WrongType, format!("{key} must be a boolean, got {}", kind(v)))),
    }
}

fn u32_param(params: &Map<String, Value>, key: &str, max: u64) -> Result<Option<u32>, (ErrorCode, String)> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= max => Ok(Some(v as u32)),
            _ if n.is_i64() || n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                Err((ErrorCode::OutOfRange, format!("{key} {n} outside 0..={max}")))
            }
            _ => Err((ErrorCode::WrongType, format!("{key} must be an integer, got {n}"))),
        },
        Some(v) => Err((ErrorCode::WrongType, format!("{key} must be an integer, got {}", kind(v)))),
    }
}

fn parse_execute_task(
    params: &Map<String, Value>,
    section: Option<&binary::Section>,
) -> Result<ExecuteTask, (ErrorCode, String)> {
    match params.get("task_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "ai_inference" => {}
        Some(v) => return Err((ErrorCode::OutOfRange, format!("task_type {v} is not \"ai_inference\""))),
    }
    let session_id = session_id(params)?;
    let shard_id = u32_param(params, "shard_id", MAX_SHARD_ID)?
        .ok_or((ErrorCode::MissingField, "missing param \"shard_id\"".to_string()))?;
    let pos = u32_param(params, "pos", u32::MAX as u64 / 2)?.unwrap_or(0);
    let input = match params.get("input") {
        None => return Err((ErrorCode::MissingField, "missing param \"input\" ({tokens} or {hidden})".into())),
        Some(Value::Object(i)) => match (i.get("tokens"), i.get("hidden")) {
            (Some(Value::Array(ids)), None) => {
                if ids.is_empty() || ids.len() > MAX_TASK_TOKENS {
                    return Err((ErrorCode::OutOfRange, format!("input.tokens must hold 1..={MAX_TASK_TOKENS} ids")));
                }
                let ids: Option<Vec<u32>> =
                    ids.iter().map(|t| t.as_u64().and_then(|v| u32::try_from(v).ok())).collect();
                TaskInput::Tokens(
                    ids.ok_or((ErrorCode::WrongType, "input.tokens must be token ids (integers >= 0)".to_string()))?,
                )
            }
            (None, Some(h)) => {
                let (data, rows, cols) = tensor::f32_from_json_in(h, MAX_TASK_FLOATS, section)?;
                if rows > MAX_TASK_TOKENS {
                    return Err((
                        ErrorCode::OutOfRange,
                        format!("input.hidden holds {rows} tokens, at most {MAX_TASK_TOKENS}"),
                    ));
                }
                TaskInput::Hidden { data, rows, cols }
            }
            _ => {
                return Err((ErrorCode::WrongType, "input must be {\"tokens\": [...]} or {\"hidden\": tensor}".into()));
            }
        },
        Some(v) => return Err((ErrorCode::WrongType, format!("input must be an object, got {}", kind(v)))),
    };
    let all = bool_param(params, "all_logits", false)?;
    let output = match params.get("output") {
        None | Some(Value::Null) => TaskOutput::Logits { all },
        Some(Value::String(o)) => match o.as_str() {
            "hidden" => TaskOutput::Hidden,
            "logits" => TaskOutput::Logits { all },
            "top_k" => TaskOutput::TopK(u32_param(params, "k", MAX_TOP_K)?.unwrap_or(10).max(1) as usize),
            other => {
                return Err((ErrorCode::OutOfRange, format!("output {other:?} is not hidden, logits or top_k")));
            }
        },
        Some(v) => return Err((ErrorCode::WrongType, format!("output must be a string, got {}", kind(v)))),
    };
    let next = match params.get("next") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(hops)) => {
            if hops.len() > MAX_HOPS {
                return Err((ErrorCode::OutOfRange, format!("next names {} hops, at most {MAX_HOPS}", hops.len())));
            }
            hops.iter().map(parse_hop).collect::<Result<_, _>>()?
        }
        Some(v) => return Err((ErrorCode::WrongType, format!("next must be an array of hops, got {}", kind(v)))),
    };
    let load = bool_param(params, "load", true)?;
    let hop_timeout_ms = u32_param(params, "hop_timeout_ms", MAX_HOP_TIMEOUT_MS)?.unwrap_or(60_000).max(1) as u64;
    if let TaskOutput::Logits { all: true } = output {
        let rows = match &input {
            TaskInput::Tokens(t) => t.len(),
            TaskInput::Hidden { rows, .. } => *rows,
        };
        if rows > MAX_ALL_LOGITS_ROWS {
            return Err((
                ErrorCode::OutOfRange,
                format!(
                    "all_logits for {rows} tokens: at most {MAX_ALL_LOGITS_ROWS} rows of logits per task \
                     (send the input in chunks)"
                ),
            ));
        }
    }
    let session_token = session_token(params)?;
    let origin = match params.get("origin") {
        None | Some(Value::Null) => None,
        Some(Value::String(o)) if o.len() <= 128 => Some(o.clone()),
        Some(_) => return Err((ErrorCode::WrongType, "origin must be a string of at most 128 bytes".into())),
    };
    let encoding = match params.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Base64,
        Some(Value::String(e)) if e == "base64" => Encoding::Base64,
        Some(Value::String(e)) if e == "binary" => Encoding::Binary,
        Some(v) => return Err((ErrorCode::OutOfRange, format!("encoding_format {v} is not \"base64\" or \"binary\""))),
    };
    Ok(ExecuteTask {
        session_id,
        shard_id,
        pos,
        input,
        output,
        next,
        load,
        hop_timeout_ms,
        session_token,
        origin,
        encoding,
    })
}

/// Shortest and longest session token, in hex digits (128 to 256 bits).
pub const SESSION_TOKEN_HEX: std::ops::RangeInclusive<usize> = 32..=64;

fn session_token(params: &Map<String, Value>) -> Result<Option<String>, (ErrorCode, String)> {
    match params.get("session_token") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) if SESSION_TOKEN_HEX.contains(&t.len()) && t.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(t.to_ascii_lowercase()))
        }
        Some(_) => Err((
            ErrorCode::WrongType,
            "session_token must be 32 to 64 hex digits (the token the session's first EXECUTE_TASK returned)".into(),
        )),
    }
}

fn parse_hop(v: &Value) -> Result<Hop, (ErrorCode, String)> {
    let wrong = || (ErrorCode::WrongType, format!("hop {v} must be {{\"address\": \"IP:PORT\", \"shard_id\": N}}"));
    let obj = v.as_object().ok_or_else(wrong)?;
    let address = obj
        .get("address")
        .and_then(Value::as_str)
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .ok_or_else(wrong)?;
    let shard_id = u32_param(obj, "shard_id", MAX_SHARD_ID)?.ok_or_else(wrong)?;
    Ok(Hop { address, shard_id })
}

fn parse_download(params: &Map<String, Value>) -> Result<Download, (ErrorCode, String)> {
    let info_hash = match params.get("info_hash") {
        None => return Err((ErrorCode::MissingField, "missing param \"info_hash\"".into())),
        Some(Value::String(s)) => InfoHash::from_hex(s)
            .ok_or_else(|| (ErrorCode::WrongType, format!("info_hash {s:?} is not 40 hex digits")))?,
        Some(v) => return Err((ErrorCode::WrongType, format!("info_hash must be a string, got {}", kind(v)))),
    };
    let torrent = match params.get("torrent_hex") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 2 * MAX_TORRENT_BYTES => Some(
            crate::hash::from_hex_vec(s).ok_or_else(|| (ErrorCode::WrongType, "torrent_hex is not hex".to_string()))?,
        ),
        Some(Value::String(_)) => {
            return Err((ErrorCode::OutOfRange, format!("torrent_hex over {MAX_TORRENT_BYTES} bytes")));
        }
        Some(v) => return Err((ErrorCode::WrongType, format!("torrent_hex must be a string, got {}", kind(v)))),
    };
    Ok(Download { info_hash, torrent, peers: parse_peers(params)? })
}

fn parse_find_peers(params: &Map<String, Value>) -> Result<PeersKey, (ErrorCode, String)> {
    match (params.get("key"), params.get("shard_id"), params.get("cluster")) {
        (Some(Value::String(k)), None, None) => InfoHash::from_hex(k)
            .map(PeersKey::Hash)
            .ok_or_else(|| (ErrorCode::WrongType, format!("key {k:?} is not 40 hex digits"))),
        (None, Some(Value::Number(n)), None) => match n.as_u64() {
            Some(id) if id <= MAX_SHARD_ID => Ok(PeersKey::Shard(id as u32)),
            _ => Err((ErrorCode::OutOfRange, format!("shard_id {n} outside 0..={MAX_SHARD_ID}"))),
        },
        (None, None, Some(Value::Bool(true))) => Ok(PeersKey::Cluster),
        _ => Err((
            ErrorCode::MissingField,
            "give one of params.key (40 hex digits), params.shard_id, params.cluster: true".into(),
        )),
    }
}

/// Most peers one request may name.
pub const MAX_REQUEST_PEERS: usize = 64;

fn parse_peers(params: &Map<String, Value>) -> Result<Vec<std::net::SocketAddr>, (ErrorCode, String)> {
    let list = match params.get("peers") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err((ErrorCode::WrongType, format!("peers must be an array of \"IP:PORT\", got {}", kind(v))));
        }
    };
    if list.len() > MAX_REQUEST_PEERS {
        return Err((ErrorCode::OutOfRange, format!("{} peers given, at most {MAX_REQUEST_PEERS}", list.len())));
    }
    list.iter()
        .map(|p| {
            let s = p.as_str().ok_or_else(|| (ErrorCode::WrongType, format!("peer {p} is not a string")))?;
            let a = crate::addr::parse_peer_addr(s).map_err(|e| (ErrorCode::WrongType, format!("peer: {e}")))?;
            a.host
                .parse::<std::net::IpAddr>()
                .map(|ip| std::net::SocketAddr::new(ip, a.port))
                .map_err(|_| (ErrorCode::WrongType, format!("peer {s:?} must be an IP address and port")))
        })
        .collect()
}

fn optional_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!("{key:?} must be a string, got {}", kind(v))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A success response's JSON bytes.
pub fn success_payload(command: &str, request_id: &Value, result: Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    success_prefix(command, request_id, &mut out);
    serde_json::to_writer(&mut out, &result).expect("JSON values serialize");
    out.push(b'}');
    out
}

/// Writes `{"command":..,"request_id":..,"status":"success","result":` so a
/// caller can append an already serialized result and the closing `}`.
/// (Written directly: building a map per response was the node's top cost.)
pub fn success_prefix(command: &str, request_id: &Value, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"command\":");
    serde_json::to_writer(&mut *out, command).expect("strings serialize");
    out.extend_from_slice(b",\"request_id\":");
    serde_json::to_writer(&mut *out, request_id).expect("JSON values serialize");
    out.extend_from_slice(b",\"status\":\"success\",\"result\":");
}

/// An error response's JSON bytes.
pub fn error_payload(command: Value, request_id: Value, code: ErrorCode, message: &str) -> Vec<u8> {
    let v = json!({"command": command, "request_id": request_id, "status": "error", "error": message, "code": code.as_str()});
    serde_json::to_vec(&v).expect("JSON values serialize")
}

/// Builds a request's JSON (for clients).
pub fn request_payload(command: &str, request_id: &Value, from: &str, params: Value) -> Vec<u8> {
    let v = json!({"command": command, "request_id": request_id, "from": from, "params": params});
    serde_json::to_vec(&v).expect("JSON values serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, RequestError> {
        Request::parse(s.as_bytes())
    }

    fn code(s: &str) -> ErrorCode {
        parse(s).unwrap_err().code
    }

    #[test]
    fn parses_the_notes_requests() {
        let r = parse(r#"{"command":"LOAD_SHARD","request_id":"req-123","from":"coordinator-peer-id","to":"target-node-peer-id","params":{"shard_id":5}}"#).unwrap();
        assert_eq!(
            r.command,
            Command::LoadShard(LoadShard { shard_id: 5, info_hash: None, wait: true, filename: None, peers: vec![] })
        );
        assert_eq!(r.request_id, json!("req-123"));
        assert_eq!(r.to.as_deref(), Some("target-node-peer-id"));
        let r = parse(r#"{"command":"LIST_FILES","request_id":"req-124","from":"c","to":"n"}"#).unwrap();
        assert_eq!(r.command, Command::ListFiles);
        let r = parse(r#"{"command":"STATUS","request_id":7}"#).unwrap();
        assert_eq!(r.request_id, json!(7));
    }

    #[test]
    fn rejects_bad_requests_with_codes() {
        assert_eq!(Request::parse(&[0xff, 0xfe]).unwrap_err().code, ErrorCode::InvalidUtf8);
        assert_eq!(code("{"), ErrorCode::InvalidJson);
        assert_eq!(code(""), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::NotAnObject);
        assert_eq!(code(r#"{"request_id":"a"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"command":"STATUS"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"command":5,"request_id":"a"}"#), ErrorCode::WrongType);
        assert_eq!(code(r#"{"command":"STATUS","request_id":1.5}"#), ErrorCode::WrongType);
        assert_eq!(code(r#"{"command":"STATUS","request_id":"a","params":[]}"#), ErrorCode::WrongType);
        assert_eq!(code(r#"{"command":"STATUS","request_id":"a","from":3}"#), ErrorCode::WrongType);
        assert_eq!(code(r#"{"command":"FROB","request_id":"a"}"#), ErrorCode::UnknownCommand);
        let load = |p: &str| code(&format!(r#"{{"command":"LOAD_SHARD","request_id":"a","params":{p}}}"#));
        assert_eq!(load("{}"), ErrorCode::MissingField);
        assert_eq!(load(r#"{"shard_id":"5"}"#), ErrorCode::WrongType);
        assert_eq!(load(r#"{"shard_id":1.5}"#), ErrorCode::WrongType);
        assert_eq!(load(r#"{"shard_id":-1}"#), ErrorCode::OutOfRange);
        assert_eq!(load(r#"{"shard_id":99999999999999999999999}"#), ErrorCode::OutOfRange);
        assert_eq!(load(r#"{"shard_id":4096}"#), ErrorCode::OutOfRange);
        assert_eq!(load(r#"{"shard_id":1,"info_hash":"xyz"}"#), ErrorCode::WrongType);
        assert_eq!(load(r#"{"shard_id":1,"wait":"yes"}"#), ErrorCode::WrongType);
        assert_eq!(load(r#"{"shard_id":1,"filename":"../etc/passwd"}"#), ErrorCode::BadPath);
        assert_eq!(load(r#"{"shard_id":1,"filename":".."}"#), ErrorCode::BadPath);
        assert_eq!(load(r#"{"shard_id":1,"peers":"127.0.0.1:1"}"#), ErrorCode::WrongType);
        assert_eq!(load(r#"{"shard_id":1,"peers":["nohost"]}"#), ErrorCode::WrongType);
        assert_eq!(load(r#"{"shard_id":1,"peers":["example.com:80"]}"#), ErrorCode::WrongType);
    }

    /// An EXECUTE_TASK header (JSON) whose hidden state is `tensor`.
    fn task_header(tensor: Value) -> Vec<u8> {
        let params =
            json!({"session_id": "s", "shard_id": 1, "input": {"hidden": tensor}, "encoding_format": "binary"});
        request_payload("EXECUTE_TASK", &json!(9), "t", params)
    }

    fn binary_frame(header: &[u8], data: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        binary::encode(header, data, &mut p);
        p
    }

    /// `CANCEL` takes 1..=1024 request ids, each an integer or a short string; anything else is
    /// a clear error (the connection stays open).
    #[test]
    fn cancel_names_request_ids_within_bounds() {
        let r = parse(r#"{"command":"CANCEL","request_id":1,"params":{"request_ids":[7,"a-8"]}}"#).unwrap();
        assert_eq!(r.command, Command::Cancel { request_ids: vec![json!(7), json!("a-8")] });
        assert_eq!(r.command.name(), "CANCEL");
        assert_eq!(code(r#"{"command":"CANCEL","request_id":1}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"command":"CANCEL","request_id":1,"params":{"request_ids":7}}"#), ErrorCode::WrongType);
        assert_eq!(code(r#"{"command":"CANCEL","request_id":1,"params":{"request_ids":[]}}"#), ErrorCode::OutOfRange);
        assert_eq!(code(r#"{"command":"CANCEL","request_id":1,"params":{"request_ids":[1.5]}}"#), ErrorCode::WrongType);
        assert_eq!(
            code(r#"{"command":"CANCEL","request_id":1,"params":{"request_ids":[{"a":1}]}}"#),
            ErrorCode::WrongType
        );
        let many = format!(
            r#"{{"command":"CANCEL","request_id":1,"params":{{"request_ids":[{}]}}}}"#,
            vec!["1"; MAX_CANCEL_IDS + 1].join(",")
        );
        assert_eq!(code(&many), ErrorCode::OutOfRange);
        let long = format!(
            r#"{{"command":"CANCEL","request_id":1,"params":{{"request_ids":["{}"]}}}}"#,
            "x".repeat(MAX_REQUEST_ID_LEN + 1)
        );
        assert_eq!(code(&long), ErrorCode::WrongType);
    }

    #[test]
    fn binary_frames_carry_the_same_task_as_json() {
        let values = [0.5f32, -1.25, 3.0, 1e-3, 7.5, -0.0];
        let mut data = Vec::new();
        let raw = tensor::f32_to_raw(&values, 2, 3, &mut data);
        assert_eq!(raw, json!({"dtype": "f32", "shape": [2, 3], "offset": 0, "nbytes": 24}));
        let from_binary = Request::parse(&binary_frame(&task_header(raw), &data)).unwrap();
        let from_json = Request::parse(&task_header(tensor::f32_to_json(&values, 2, 3))).unwrap();
        assert_eq!(from_binary, from_json);
        let Command::ExecuteTask(t) = from_binary.command else { panic!() };
        assert_eq!(t.input, TaskInput::Hidden { data: values.to_vec(), rows: 2, cols: 3 });
        assert_eq!(t.encoding, Encoding::Binary);
        // Any command may come in a binary frame with an empty data section.
        let status = binary_frame(br#"{"command":"STATUS","request_id":1}"#, &[]);
        assert_eq!(Request::parse(&status).unwrap().command, Command::Status);
        let bad = br#"{"command":"EXECUTE_TASK","request_id":1,"params":{"session_id":"s","shard_id":0,"input":{"tokens":[1]},"encoding_format":"raw"}}"#;
        assert_eq!(code(std::str::from_utf8(bad).unwrap()), ErrorCode::OutOfRange);
    }

    #[test]
    fn bad_binary_frames_get_codes_before_anything_is_allocated() {
        let data = vec![0u8; 24];
        let t = |offset: Value, nbytes: Value, shape: Value| {
            task_header(json!({"dtype": "f32", "shape": shape, "offset": offset, "nbytes": nbytes}))
        };
        let ok = t(json!(0), json!(24), json!([2, 3]));
        let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
            // The prefix: too short, or a header longer than the frame.
            (vec![0], ErrorCode::InvalidFrame),
            (vec![0, 0, 0, 1], ErrorCode::InvalidFrame),
            (binary_frame(&ok, &data)[..ok.len() + 4].to_vec(), ErrorCode::InvalidFrame),
            (
                {
                    let mut f = binary_frame(&ok, &data);
                    f[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
                    f
                },
                ErrorCode::InvalidFrame,
            ),
            // The header.
            (binary_frame(b"{\"command\":", &[]), ErrorCode::InvalidJson),
            (binary_frame(&[0xff, 0xfe], &[]), ErrorCode::InvalidUtf8),
            // A tensor outside the data section, or overflowing it.
            (binary_frame(&t(json!(4), json!(24), json!([2, 3])), &data), ErrorCode::OutOfRange),
            (binary_frame(&t(json!(u64::MAX), json!(24), json!([2, 3])), &data), ErrorCode::OutOfRange),
            (binary_frame(&ok, &data[..20]), ErrorCode::OutOfRange),
            // Its byte count against its shape, claimed sizes never allocated.
            (binary_frame(&t(json!(0), json!(20), json!([2, 3])), &data), ErrorCode::ShapeMismatch),
            (binary_frame(&t(json!(0), json!(u64::MAX), json!([2, 3])), &data), ErrorCode::ShapeMismatch),
            (binary_frame(&t(json!(0), json!(24), json!([1u64 << 40, 1u64 << 40])), &data), ErrorCode::OutOfRange),
            (binary_frame(&t(json!(-1), json!(24), json!([2, 3])), &data), ErrorCode::WrongType),
            (binary_frame(&t(json!(0), json!("24"), json!([2, 3])), &data), ErrorCode::WrongType),
            // Bytes no tensor names.
            (binary_frame(&ok, &[data.clone(), vec![1]].concat()), ErrorCode::ShapeMismatch),
            (binary_frame(br#"{"command":"STATUS","request_id":1}"#, &[1, 2]), ErrorCode::ShapeMismatch),
            // Raw bytes in a JSON frame.
            (ok.clone(), ErrorCode::WrongType),
        ];
        for (i, (frame, want)) in cases.iter().enumerate() {
            let e = Request::parse(frame).unwrap_err();
            assert_eq!(e.code, *want, "case {i}: {}", e.message);
            assert!(!e.message.is_empty());
        }
        // Once the header is read, errors echo its command and id.
        let e = Request::parse(&binary_frame(&ok, &data[..20])).unwrap_err();
        assert_eq!((e.command, e.request_id), (json!("EXECUTE_TASK"), json!(9)));
        assert!(Request::parse(&binary_frame(&ok, &data)).is_ok());
    }

    #[test]
    fn errors_echo_what_is_known() {
        let e = parse(r#"{"command":"LOAD_SHARD","request_id":"r1","params":{"shard_id":-3}}"#).unwrap_err();
        assert_eq!(e.request_id, json!("r1"));
        assert_eq!(e.command, json!("LOAD_SHARD"));
        let reply: Value = serde_json::from_slice(&e.to_frame_payload()).unwrap();
        assert_eq!(reply["status"], "error");
        assert_eq!(reply["code"], "OUT_OF_RANGE");
        assert_eq!(reply["request_id"], "r1");
    }
}
