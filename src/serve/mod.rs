//! `shardctl serve`: an OpenAI-compatible HTTP/1.1 endpoint in front of a cluster's chain.
//!
//! Threads: the listener (accepts; bounds the connections), one thread per connection (reads
//! requests with [`http::Conn`], answers them), and the chain thread ([`chain`]) that owns the
//! coordinator and runs one generation at a time from a bounded FIFO queue. `/health`,
//! `/metrics`, `/v1/models` and the chat page are answered by the connection thread from shared
//! state and never wait on the chain.
//!
//! Limits (each a flag of `shardctl serve`): `--max-connections` (default 256; when full, the
//! connection idle the longest, between requests or still sending its request, is closed for the
//! new one; if every one is busy generating, the new one gets 503), `--queue` (requests waiting
//! for the chain, default 16; over it: 503 with `Retry-After`), `--max-requests-per-client`
//! (completions one client address has running or waiting; over it: 429 with `Retry-After`;
//! default none on a loopback listener, `--parallel` on any other), and [`http::Limits`] (head 16 KiB
//! and 64 fields, body 1 MiB, head within 10 s of its first byte, body within 30 s, idle
//! keep-alive 60 s, each write 30 s).

pub mod chain;
pub mod gate;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod openai;

use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded, unbounded};
use serde_json::{Value, json};

use crate::chat::ChatError;
use crate::coordinator::{ClusterConfig, GenRequest, Summary};
use crate::engine::sampler::SamplerConfig;
use chain::{ChainEvent, ChainState, Health, Job, ModelView};
use guard::Access;
use http::{Conn, EventStream, Limits, ReadError, Reply, Request, write_response};
use metrics::Metrics;
use openai::{ApiError, Endpoint, Input, Params};

/// `--parallel`'s default: half of a node's default per-client session quota
/// (`--max-sessions-per-client` 8), since every session of this server counts against one client.
pub const DEFAULT_PARALLEL: usize = 4;
/// `--parallel`'s bound.
pub const MAX_PARALLEL: usize = 256;

/// The chat page served at `/`.
const PAGE: &str = include_str!("page.html");

/// Server-side defaults for what a request leaves out: `shardctl serve`'s sampling flags (greedy
/// unless `--temp`), a fresh seed per request unless `--seed` was given, and `-n`.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub sampling: SamplerConfig,
    /// A new random seed for each request that gives none (OpenAI's behaviour).
    pub random_seed: bool,
    /// New tokens when a request gives no `max_tokens` (also bounded by the context).
    pub max_tokens: usize,
}

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults { sampling: SamplerConfig::default(), random_seed: true, max_tokens: 512 }
    }
}

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub cluster: ClusterConfig,
    pub listen: SocketAddr,
    pub defaults: Defaults,
    /// `--model-name`: the id `/v1/models` lists.
    pub model_name: Option<String>,
    /// `--chat-template FILE`'s contents: replaces the model's template.
    pub chat_template: Option<String>,
    pub max_connections: usize,
    /// `--parallel`: generations run on the chain at once (slots), each a session on the nodes.
    pub parallel: usize,
    pub queue: usize,
    /// `--max-requests-per-client`: completions one client (an IPv4 address, an IPv6 /64) may
    /// have at once, from the moment each is read: waiting for or being prepared
    /// (`--max-renders`), waiting for a slot or running; `Some(0)`: no bound; `None`: the default,
    /// [`ServeConfig::requests_per_client`].
    pub max_requests_per_client: Option<usize>,
    /// `--max-renders`: requests prepared (parsed, chat rendered, tokenized) at once
    /// ([`gate`]).
    pub max_renders: usize,
    pub limits: Limits,
    /// Who may call: `--cors-origin`, `--allowed-host`, `--api-key-file` ([`guard`]).
    pub access: Access,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            cluster: ClusterConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            defaults: Defaults::default(),
            model_name: None,
            chat_template: None,
            max_connections: 256,
            parallel: DEFAULT_PARALLEL,
            queue: 16,
            max_requests_per_client: None,
            max_renders: gate::default_max(),
            limits: Limits::default(),
            access: Access::default(),
        }
    }
}

impl ServeConfig {
    /// The bound on one client's completions at once (running or waiting); 0 for none. The
    /// default follows who can reach the server: listening on a loopback address, only this
    /// host's programs can (and a reverse proxy in front makes every user one address), so
    /// none; listening on any other address, `--parallel`, so one client can fill every slot
    /// when alone but never also the queue in front of everyone else.
    pub fn requests_per_client(&self) -> usize {
        match self.max_requests_per_client {
            Some(n) => n,
            None if self.listen.ip().is_loopback() => 0,
            None => self.parallel,
        }
    }
}

/// A connection the listener tracks: a handle to close it, and since when it has been idle
/// (waiting for or reading a request; `None` while a request is answered).
struct Tracked {
    stream: TcpStream,
    idle_since: Option<Instant>,
}

struct Shared {
    cfg: ServeConfig,
    metrics: Arc<Metrics>,
    chain: Arc<ChainState>,
    jobs: Sender<Job>,
    conns: Mutex<HashMap<u64, Tracked>>,
    /// Completions being prepared, running or waiting, per client ([`crate::node::limits::ip_key`] of its address).
    clients: Mutex<HashMap<IpAddr, usize>>,
    /// Places for preparing requests (`--max-renders`).
    renders: gate::Gate,
    started: u64,
}

/// One client's completion counted against `--max-requests-per-client` until dropped.
struct ClientSlot<'a> {
    clients: &'a Mutex<HashMap<IpAddr, usize>>,
    key: IpAddr,
}

impl<'a> ClientSlot<'a> {
    /// Counts a completion for `peer`; `None` when that client already has `cap` (0: no bound).
    fn take(clients: &'a Mutex<HashMap<IpAddr, usize>>, peer: IpAddr, cap: usize) -> Option<ClientSlot<'a>> {
        let key = crate::node::limits::ip_key(peer);
        let mut map = clients.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_default();
        if cap > 0 && *n >= cap {
            if *n == 0 {
                map.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(ClientSlot { clients, key })
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Shared {
    fn set_idle(&self, id: u64, idle: bool) {
        if let Some(t) = self.conns.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
            t.idle_since = idle.then(Instant::now);
        }
    }
}

pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    jobs_rx: Option<Receiver<Job>>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Server {
    /// Binds the listener; nothing runs until [`Server::run`].
    pub fn bind(cfg: ServeConfig) -> Result<Server> {
        let listener = TcpListener::bind(cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
        let (jobs, jobs_rx) = bounded(cfg.queue.max(1));
        let renders = gate::Gate::new(cfg.max_renders);
        let shared = Arc::new(Shared {
            cfg,
            metrics: Arc::new(Metrics::default()),
            chain: Arc::new(ChainState { model: Default::default(), health: Mutex::new(Health::Starting) }),
            jobs,
            conns: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            renders,
            started: unix_now(),
        });
        Ok(Server { listener, shared, jobs_rx: Some(jobs_rx) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Starts the chain thread, then accepts connections for ever.
    pub fn run(mut self) -> Result<()> {
        let s = self.shared.clone();
        let (cluster, name, template) = (s.cfg.cluster.clone(), s.cfg.model_name.clone(), s.cfg.chat_template.clone());
        let (state, metrics, rx) = (s.chain.clone(), s.metrics.clone(), self.jobs_rx.take().expect("run once"));
        let parallel = s.cfg.parallel.clamp(1, MAX_PARALLEL);
        metrics.set_slots(parallel);
        std::thread::Builder::new()
            .name("placement".into())
            .spawn(move || chain::run(cluster, name, template, state, metrics, rx, parallel))
            .context("spawning the placement thread")?;
        let mut next_id = 0u64;
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    crate::warn!("accept: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            next_id += 1;
            self.admit(next_id, stream);
        }
        Ok(())
    }

    /// Tracks a new connection (closing the longest idle one when at the limit) and starts its
    /// thread; answers 503 when every tracked connection is busy.
    fn admit(&self, id: u64, stream: TcpStream) {
        let s = &self.shared;
        let Ok(handle) = stream.try_clone() else { return };
        {
            let mut conns = s.conns.lock().unwrap_or_else(|p| p.into_inner());
            if conns.len() >= s.cfg.max_connections {
                let oldest = conns.iter().filter_map(|(k, t)| t.idle_since.map(|i| (i, *k))).min();
                match oldest {
                    Some((_, victim)) => {
                        if let Some(t) = conns.remove(&victim) {
                            let _ = t.stream.shutdown(Shutdown::Both);
                        }
                    }
                    None => {
                        drop(conns);
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                        let e = ApiError::unavailable("the server is at its connection limit; try again");
                        let _ = respond_error(&mut &stream, &e, &Reply::close());
                        s.metrics.request("other", 503);
                        return;
                    }
                }
            }
            conns.insert(id, Tracked { stream: handle, idle_since: Some(Instant::now()) });
        }
        let shared = s.clone();
        let spawned = std::thread::Builder::new().name(format!("http-{id}")).stack_size(256 << 10).spawn(move || {
            // Untracked (and so closed) when the thread ends, even by a panic.
            let _untrack = Untrack(&shared, id);
            connection(&shared, id, stream);
        });
        if spawned.is_err() {
            s.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }
}

/// Removes a connection from the table when dropped: the table's handle is the socket's last.
struct Untrack<'a>(&'a Shared, u64);

impl Drop for Untrack<'_> {
    fn drop(&mut self) {
        self.0.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

fn respond_json(w: &mut impl std::io::Write, status: u16, v: &Value, reply: &Reply) -> std::io::Result<()> {
    write_response(w, status, "application/json", &[], v.to_string().as_bytes(), reply)
}

fn respond_error(w: &mut impl std::io::Write, e: &ApiError, reply: &Reply) -> std::io::Result<()> {
    let extra: Vec<(&str, String)> =
        if matches!(e.status, 429 | 503) { vec![("Retry-After", "2".into())] } else { vec![] };
    write_response(w, e.status, "application/json", &extra, e.to_json().to_string().as_bytes(), reply)
}

/// Serves one connection's requests until it closes, errs, or asks to close.
fn connection(s: &Shared, id: u64, stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(s.cfg.limits.write_timeout));
    let mut conn = Conn::new(stream);
    loop {
        s.set_idle(id, true);
        let req = match conn.read_request(&s.cfg.limits) {
            Ok(r) => r,
            Err(ReadError::Bad(status, msg)) => {
                let e = ApiError::new(status, "invalid_request_error", None, msg);
                s.metrics.request("other", status);
                if respond_error(&mut conn.stream, &e, &Reply::close()).is_ok() {
                    linger_close(&conn.stream);
                }
                return;
            }
            Err(ReadError::Closed) | Err(ReadError::Io(_)) => return,
        };
        s.set_idle(id, false);
        let keep = route(s, &mut conn, &req);
        if !keep || !req.keep_alive {
            let _ = conn.stream.shutdown(Shutdown::Write);
            return;
        }
    }
}

/// Closes a connection whose request was refused unread: the write side first, then what the
/// client still sends is read and dropped (at most `LINGER_BYTES` for `LINGER`), so the kernel
/// does not answer unread input with a reset that could destroy the error response in flight.
fn linger_close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 16 << 10];
    let mut left = LINGER_BYTES;
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match std::io::Read::read(&mut &*stream, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// Answers one request; whether the connection can take another.
fn route(s: &Shared, conn: &mut Conn, req: &Request) -> bool {
    // A trailing `/` is forgiven, but not after `/v1/models/`: what follows it is a model id,
    // and an empty one (`/v1/models/`, `/v1/models//`) is no model (404, as OpenAI answers).
    let path = if req.path.starts_with("/v1/models/") { req.path.as_str() } else { req.path.trim_end_matches('/') };
    let endpoint =
        match path {
            "" | "/health" | "/metrics" | "/v1/models" | "/v1/chat/completions" | "/v1/completions" => {
                if path.is_empty() { "/" } else { path }
            }
            _ if path.starts_with("/v1/models/") => "/v1/models",
            _ => "other",
        };
    let host = req.header("host");
    let checked = s.cfg.access.check_host(host).and_then(|()| s.cfg.access.check_origin(req.header("origin"), host));
    let allow_origin = match checked {
        Ok(o) => o,
        Err(e) => {
            s.metrics.request(endpoint, e.status);
            let reply = Reply { keep_alive: req.keep_alive, allow_origin: None };
            return respond_error(&mut conn.stream, &e, &reply).is_ok();
        }
    };
    let reply = Reply { keep_alive: req.keep_alive, allow_origin };
    let ka = &reply;
    // A preflight carries no credentials: it is answered before the key is asked for, and only
    // a listed origin is told what it may send.
    let refused = if req.method == "OPTIONS" {
        Ok(())
    } else {
        s.cfg
            .access
            .check_key(path, req.header("authorization"))
            .and_then(|()| if req.method == "POST" { guard::check_json(req.header("content-type")) } else { Ok(()) })
    };
    if let Err(e) = refused {
        s.metrics.request(endpoint, e.status);
        let extra: Vec<(&str, String)> =
            if e.status == 401 { vec![("WWW-Authenticate", "Bearer".into())] } else { vec![] };
        return write_response(
            &mut conn.stream,
            e.status,
            "application/json",
            &extra,
            e.to_json().to_string().as_bytes(),
            ka,
        )
        .is_ok();
    }
    let w = &mut conn.stream;
    let (status, ok) = match (req.method.as_str(), path) {
        ("OPTIONS", _) => {
            let extra = if ka.allow_origin.is_some() {
                vec![
                    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS".to_string()),
                    ("Access-Control-Allow-Headers", "Content-Type, Authorization".to_string()),
                    ("Access-Control-Max-Age", "600".to_string()),
                ]
            } else {
                vec![]
            };
            (204, write_response(w, 204, "text/plain", &extra, b"", ka).is_ok())
        }
        ("GET", "") => (200, write_response(w, 200, "text/html; charset=utf-8", &[], PAGE.as_bytes(), ka).is_ok()),
        ("GET", "/health") => {
            let (status, body) = match s.chain.health() {
                Health::Ready => (200, json!({"status": "ok"})),
                Health::Starting => {
                    (503, json!({"status": "loading", "error": "the chain is being placed and loaded"}))
                }
                Health::Unavailable(e) => (503, json!({"status": "unavailable", "error": e})),
            };
            (status, respond_json(w, status, &body, ka).is_ok())
        }
        ("GET", "/metrics") => {
            let mut text = s.metrics.render();
            s.renders.render(&mut text);
            (200, write_response(w, 200, "text/plain; version=0.0.4", &[], text.as_bytes(), ka).is_ok())
        }
        ("GET", "/v1/models") => match s.chain.model() {
            Some(m) => (200, respond_json(w, 200, &openai::models(&m.name, s.started), ka).is_ok()),
            None => {
                let e = ApiError::unavailable(not_ready(s));
                (503, respond_error(w, &e, ka).is_ok())
            }
        },
        ("GET", p) if p.starts_with("/v1/models/") => {
            let asked = percent_decode(&p["/v1/models/".len()..]);
            match s.chain.model() {
                Some(m) if asked == m.name || asked == m.model_id => {
                    (200, respond_json(w, 200, &openai::model_object(&m.name, s.started), ka).is_ok())
                }
                Some(m) => {
                    let e = ApiError {
                        param: Some("model".into()),
                        ..ApiError::new(
                            404,
                            "invalid_request_error",
                            Some("model_not_found"),
                            format!("the model {asked:?} does not exist here; this server serves {:?}", m.name),
                        )
                    };
                    (404, respond_error(w, &e, ka).is_ok())
                }
                None => {
                    let e = ApiError::unavailable(not_ready(s));
                    (503, respond_error(w, &e, ka).is_ok())
                }
            }
        }
        ("POST", "/v1/chat/completions") => completion(s, conn, req, Endpoint::Chat, ka),
        ("POST", "/v1/completions") => completion(s, conn, req, Endpoint::Text, ka),
        (_, "" | "/health" | "/metrics" | "/v1/models" | "/v1/chat/completions" | "/v1/completions") => {
            let e = ApiError::new(
                405,
                "invalid_request_error",
                None,
                format!("{} is not allowed on {}", req.method, req.path),
            );
            (405, respond_error(w, &e, ka).is_ok())
        }
        _ => {
            let e = ApiError::new(404, "invalid_request_error", None, format!("no route {} {}", req.method, req.path));
            (404, respond_error(w, &e, ka).is_ok())
        }
    };
    s.metrics.request(endpoint, status);
    ok
}

/// A path segment with its `%XX` escapes decoded (RFC 3986); a bad escape or non-UTF-8 result
/// is kept as it came, so it matches no model.
fn percent_decode(segment: &str) -> String {
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| segment.to_string())
}

fn not_ready(s: &Shared) -> String {
    match s.chain.health() {
        Health::Unavailable(e) => format!("the cluster cannot serve: {e}"),
        _ => "the cluster is not ready yet (placing and loading the chain)".into(),
    }
}

/// Renders a chat's messages to the prompt text with the model's chat template (OpenAI's
/// `developer` role is the templates' `system`).
fn render_chat(model: &ModelView, messages: &[openai::Message]) -> Result<String, ApiError> {
    let template = model.chat_template.as_ref().map_err(|e| {
        ApiError::bad(format!("chat completions are not available: {e} (use /v1/completions)"), Some("messages"))
    })?;
    let list: Vec<crate::chat::Message> = messages
        .iter()
        .map(|m| crate::chat::Message::new(if m.role == "developer" { "system" } else { &m.role }, &m.content))
        .collect();
    template.prompt(&list, true, &model.tokenizer).map_err(|e| match e {
        // The template's fault, not the request's: it does not compile, or it went past its
        // budget of work, memory or output (a hostile model).
        ChatError::Syntax(_) | ChatError::Budget(_) => ApiError::new(500, "server_error", None, e.to_string()),
        // The template's own refusal (`raise_exception`: roles out of order, ...) is the request's fault.
        _ => ApiError::bad(e.to_string(), Some("messages")),
    })
}

/// A checked request, ready for the chain.
struct Prepared {
    request: GenRequest,
    stop: Vec<String>,
    model: String,
}

fn prepare(s: &Shared, endpoint: Endpoint, body: &[u8]) -> Result<(Params, Prepared), ApiError> {
    let p = Params::parse(endpoint, body)?;
    let Some(model) = s.chain.model() else { return Err(ApiError::unavailable(not_ready(s))) };
    if let Some(name) = &p.model
        && *name != model.name
        && *name != model.model_id
    {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                404,
                "invalid_request_error",
                Some("model_not_found"),
                format!("the model {name:?} does not exist here; this server serves {:?}", model.name),
            )
        });
    }
    let prompt = match p.input.as_ref().expect("parse sets the input") {
        Input::Messages(m) => {
            let text = render_chat(&model, m)?;
            model.tokenizer.encode(&text, true, true)
        }
        Input::Text(t) => model.tokenizer.encode(t, true, true),
        Input::Tokens(ids) => {
            let n = model.tokenizer.n_vocab();
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= n) {
                return Err(ApiError::bad(
                    format!("token id {bad} is not below the vocabulary size {n}"),
                    Some("prompt"),
                ));
            }
            ids.clone()
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt holds no tokens", Some("prompt")));
    }
    let ctx = model.ctx_size as usize;
    if prompt.len() >= ctx {
        let param = if endpoint == Endpoint::Chat { "messages" } else { "prompt" };
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad(
                format!(
                    "the prompt is {} tokens, longer than the context of {ctx} tokens (at most {} prompt tokens)",
                    prompt.len(),
                    ctx - 1
                ),
                Some(param),
            )
        });
    }
    let d = &s.cfg.defaults;
    // Generation ends at the context's end as well as at max_tokens (llama.cpp's n_predict).
    let max_tokens = p.max_tokens.unwrap_or(d.max_tokens).min(ctx - prompt.len());
    let seed = match (p.seed, d.random_seed) {
        (Some(seed), _) => seed,
        (None, true) => u64::from_le_bytes(crate::node::random_id()[..8].try_into().expect("8 bytes")),
        (None, false) => d.sampling.seed,
    };
    let ds = &d.sampling;
    let sampling = SamplerConfig {
        temperature: p.temperature.unwrap_or(ds.temperature),
        top_k: p.top_k.unwrap_or(ds.top_k),
        top_p: p.top_p.unwrap_or(ds.top_p),
        seed,
        repeat_penalty: p.repeat_penalty.unwrap_or(ds.repeat_penalty),
        repeat_last_n: p.repeat_last_n.unwrap_or(ds.repeat_last_n),
        presence_penalty: p.presence_penalty.unwrap_or(ds.presence_penalty),
        frequency_penalty: p.frequency_penalty.unwrap_or(ds.frequency_penalty),
        logit_bias: p.logit_bias.clone(),
    };
    sampling.validate().map_err(|e| ApiError::bad(e.to_string(), Some(e.param)))?;
    let n_vocab = model.tokenizer.n_vocab();
    if let Some((id, _)) = sampling.logit_bias.iter().find(|(id, _)| *id as usize >= n_vocab) {
        let msg = format!("logit_bias names token {id}, outside the model's vocabulary of {n_vocab} tokens");
        return Err(ApiError::bad(msg, Some("logit_bias")));
    }
    let request =
        GenRequest { prompt, max_tokens, sampling, stop_at_eog: !p.ignore_eos, session: None, pace: Duration::ZERO };
    let stop = p.stop.clone();
    Ok((p, Prepared { request, stop, model: model.name.clone() }))
}

/// Whether the peer has closed its side or reset the connection, without blocking or reading.
/// `poll(2)`'s `POLLRDHUP` says so even when requests it pipelined are still unread (a `peek`
/// sees those bytes first, and the close behind them only once they are read). A half-closed
/// connection (`shutdown(SHUT_WR)` by the client) counts as gone, as on the nodes.
fn peer_closed(stream: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd for the length of the call; timeout 0: it does not block.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    match n {
        0 => false,
        n if n > 0 => fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        _ => std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted,
    }
}

/// How often a connection waiting on the chain checks that its client is still there.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// `POST /v1/chat/completions` and `/v1/completions`: (status, connection still usable).
fn completion(s: &Shared, conn: &mut Conn, req: &Request, endpoint: Endpoint, ka: &Reply) -> (u16, bool) {
    // Counted against the client's `--max-requests-per-client` from here (waiting for a place
    // to be prepared included) until the answer is written or the client has gone: one address
    // holds at most that many places and tickets in the render gate.
    let cap = s.cfg.requests_per_client();
    let peer = conn.stream.peer_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0u8; 4]));
    let Some(_slot) = ClientSlot::take(&s.clients, peer, cap) else {
        let e = ApiError::rate_limited(format!(
            "this client already has {cap} completions being prepared, running or waiting \
             (--max-requests-per-client); try again when one ends"
        ));
        return (429, respond_error(&mut conn.stream, &e, ka).is_ok());
    };
    // Parsing, rendering and tokenizing take a place among `--max-renders`, round-robin across
    // clients.
    let client = crate::node::limits::ip_key(peer);
    let pass = match s.renders.enter(client, gate::RENDER_WAIT, WATCH_EVERY, || peer_closed(&conn.stream)) {
        Ok(pass) => pass,
        Err(gate::Refused::Gone) => return (0, false),
        Err(gate::Refused::Timeout) => {
            let e = ApiError::unavailable(format!(
                "{} requests are being prepared (--max-renders) and none finished within {} s; try again",
                s.cfg.max_renders,
                gate::RENDER_WAIT.as_secs()
            ));
            return (503, respond_error(&mut conn.stream, &e, ka).is_ok());
        }
    };
    let prepared = prepare(s, endpoint, &req.body);
    drop(pass);
    let (params, prep) = match prepared {
        Ok(p) => p,
        Err(e) => return (e.status, respond_error(&mut conn.stream, &e, ka).is_ok()),
    };
    let (tx, rx) = unbounded();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job { request: prep.request, stop: prep.stop, events: tx, cancel: cancel.clone() };
    s.metrics.queued(1);
    if let Err(e) = s.jobs.try_send(job) {
        s.metrics.queued(-1);
        let msg = match e {
            TrySendError::Full(_) => format!("{} requests are already waiting for the chain; try again", s.cfg.queue),
            TrySendError::Disconnected(_) => "the chain thread is not running".into(),
        };
        let e = ApiError::unavailable(msg);
        return (503, respond_error(&mut conn.stream, &e, ka).is_ok());
    }
    let id = format!(
        "{}-{}",
        if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" },
        crate::hash::to_hex(&crate::node::random_id()[..12])
    );
    let created = unix_now();
    let answer = Answer { endpoint, id: &id, created, model: &prep.model, include_usage: params.include_usage };
    let result = if params.stream {
        stream(conn, &rx, &cancel, &answer, req.minor_version, ka)
    } else {
        whole(conn, &rx, &cancel, &answer, ka)
    };
    if result.1 == 0 {
        cancel.store(true, Ordering::Relaxed);
    }
    (result.1, result.0)
}

struct Answer<'a> {
    endpoint: Endpoint,
    id: &'a str,
    created: u64,
    model: &'a str,
    include_usage: bool,
}

/// The next event from the chain, watching the client meanwhile (at least every
/// `WATCH_EVERY`, also while events keep coming); `None` when the client went away (the job is
/// then cancelled) or the chain dropped the job.
fn next_event(
    stream: &TcpStream,
    rx: &Receiver<ChainEvent>,
    cancel: &AtomicBool,
    watched: &mut Instant,
) -> Option<ChainEvent> {
    loop {
        if watched.elapsed() >= WATCH_EVERY {
            *watched = Instant::now();
            if peer_closed(stream) {
                cancel.store(true, Ordering::Relaxed);
                return None;
            }
        }
        match rx.recv_timeout(WATCH_EVERY.saturating_sub(watched.elapsed())) {
            Ok(ev) => return Some(ev),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

fn usage_of(summary: &Summary) -> Value {
    openai::usage(summary.prompt_tokens.len(), summary.tokens.len())
}

/// A non-streamed answer: (connection usable, status; 0 when the client went away).
fn whole(conn: &mut Conn, rx: &Receiver<ChainEvent>, cancel: &AtomicBool, a: &Answer, ka: &Reply) -> (bool, u16) {
    let mut text = String::new();
    let mut watched = Instant::now();
    loop {
        match next_event(&conn.stream, rx, cancel, &mut watched) {
            None => return (false, 0),
            Some(ChainEvent::Started) => {}
            Some(ChainEvent::Text(t)) => text.push_str(&t),
            Some(ChainEvent::Failed(why)) => {
                let e = ApiError::unavailable(format!("the cluster cannot serve this request: {why}"));
                return (respond_error(&mut conn.stream, &e, ka).is_ok(), 503);
            }
            Some(ChainEvent::Done(summary, reason)) => {
                let v = openai::response(a.endpoint, a.id, a.created, a.model, &text, reason, usage_of(&summary));
                return (respond_json(&mut conn.stream, 200, &v, ka).is_ok(), 200);
            }
        }
    }
}

/// A streamed answer as server-sent events: (connection usable, status; 0 when the client went
/// away).
fn stream(
    conn: &mut Conn,
    rx: &Receiver<ChainEvent>,
    cancel: &AtomicBool,
    a: &Answer,
    minor: u8,
    ka: &Reply,
) -> (bool, u16) {
    // The status line waits for a slot to start the job: a job the chain cannot serve is still
    // a plain 503.
    let mut watched = Instant::now();
    match next_event(&conn.stream, rx, cancel, &mut watched) {
        None => return (false, 0),
        Some(ChainEvent::Failed(why)) => {
            let e = ApiError::unavailable(format!("the cluster cannot serve this request: {why}"));
            return (respond_error(&mut conn.stream, &e, ka).is_ok(), 503);
        }
        // `Started` comes first; nothing else can.
        Some(_) => {}
    }
    let usage_field = a.include_usage;
    let mut w = &conn.stream;
    let Ok(mut events) = EventStream::start(&mut w, minor, ka) else {
        cancel.store(true, Ordering::Relaxed);
        return (false, 0);
    };
    let chunk = |text: Option<&str>, first: bool, finish: Option<&str>| {
        openai::chunk(a.endpoint, a.id, a.created, a.model, text, first, finish, usage_field).to_string()
    };
    let gone = |cancel: &AtomicBool| {
        cancel.store(true, Ordering::Relaxed);
        (false, 0)
    };
    if a.endpoint == Endpoint::Chat && events.send(&chunk(Some(""), true, None)).is_err() {
        return gone(cancel);
    }
    loop {
        match next_event(&conn.stream, rx, cancel, &mut watched) {
            None => return (false, 0),
            Some(ChainEvent::Started) => {}
            Some(ChainEvent::Text(t)) => {
                if !t.is_empty() && events.send(&chunk(Some(&t), false, None)).is_err() {
                    return gone(cancel);
                }
            }
            Some(ChainEvent::Failed(why)) => {
                // Mid-stream there is no status to change: an error event, then the end.
                let e = ApiError::unavailable(format!("the cluster failed mid-answer: {why}"));
                let _ = events.send(&e.to_json().to_string());
                let _ = events.finish();
                return (false, 503);
            }
            Some(ChainEvent::Done(summary, reason)) => {
                let mut ok = events.send(&chunk(None, false, Some(reason))).is_ok();
                if a.include_usage {
                    let u = openai::usage_chunk(a.endpoint, a.id, a.created, a.model, usage_of(&summary));
                    ok = ok && events.send(&u.to_string()).is_ok();
                }
                ok = ok && events.send("[DONE]").is_ok() && events.finish().is_ok();
                // Under HTTP/1.0 the stream ends with the connection (its only delimiter): a
                // keep-alive request's connection still closes, or its client waits for ever.
                return (ok && minor >= 1, 200);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_id_in_a_path_is_percent_decoded() {
        assert_eq!(percent_decode("Smollm2%20135M%208k"), "Smollm2 135M 8k");
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
        assert_eq!(percent_decode("%ff"), "%ff", "not UTF-8: kept as it came");
    }

    #[test]
    fn a_clients_share_defaults_by_listener_and_is_counted_per_address() {
        let on = |listen: &str, flag: Option<usize>| ServeConfig {
            listen: listen.parse().unwrap(),
            parallel: 6,
            max_requests_per_client: flag,
            ..ServeConfig::default()
        };
        assert_eq!(on("127.0.0.1:0", None).requests_per_client(), 0, "loopback: none");
        assert_eq!(on("[::1]:0", None).requests_per_client(), 0);
        assert_eq!(on("0.0.0.0:0", None).requests_per_client(), 6, "reachable by others: --parallel");
        assert_eq!(on("0.0.0.0:0", Some(0)).requests_per_client(), 0, "0: none");
        assert_eq!(on("127.0.0.1:0", Some(2)).requests_per_client(), 2);

        let clients = Mutex::new(HashMap::new());
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let first = ClientSlot::take(&clients, a, 2).unwrap();
        let second = ClientSlot::take(&clients, same_64, 2).unwrap();
        assert!(ClientSlot::take(&clients, a, 2).is_none(), "one /64 is one client");
        let third = ClientSlot::take(&clients, other, 2).unwrap();
        drop(first);
        let again = ClientSlot::take(&clients, a, 2).unwrap();
        assert!(ClientSlot::take(&clients, a, 0).is_some(), "0: no bound");
        drop((second, third, again));
        assert!(clients.lock().unwrap().is_empty(), "nothing is kept for clients gone");
    }
}
