//! The inference worker: one thread that owns the ggml engine, runs one task at a time with
//! ggml's own thread pool, and answers with finished response frames so the event loop only
//! copies bytes. Tasks queue on a crossbeam channel in arrival order, which keeps a session's
//! steps in order.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use memmap2::Mmap;
use mio::{Token, Waker};
use serde_json::{Value, json};

use super::NodeEvent;
use crate::client::Client;
use crate::engine::{Claim, Engine, EngineConfig, Input, Output, Want};
use crate::gguf::reader::Gguf;
use crate::protocol::auth::ClusterKey;
use crate::protocol::tensor::f32_to_json;
use crate::protocol::{ErrorCode, ExecuteTask, Hop, TaskInput, TaskOutput, error_payload, success_payload};
use crate::workers::WorkerPool;

/// Where an answer goes: the connection (checked by id, as slots are reused) and the request.
pub struct ReplyTo {
    pub token: Token,
    pub conn_id: u64,
    pub request_id: Value,
}

pub enum Job {
    Execute {
        reply: ReplyTo,
        task: ExecuteTask,
        /// The request's `from` (logged and relayed; it grants nothing).
        from: Option<String>,
        /// The client as the node identifies it: keys the per-client session quota.
        origin: String,
        map: Arc<Mmap>,
        /// The file behind `map`, checked (one `fstat`) before the task computes.
        file: Arc<std::fs::File>,
        queued: Instant,
        /// This node's address, for the hop list of the answer.
        me: SocketAddr,
    },
    EndSession {
        reply: ReplyTo,
        session_id: String,
        session_token: Option<String>,
    },
}

/// Counters the worker keeps for STATUS.
#[derive(Default)]
pub struct InferStats {
    pub sessions: AtomicU64,
    pub kv_bytes: AtomicU64,
    pub tasks: AtomicU64,
    pub tokens: AtomicU64,
    pub busy_us: AtomicU64,
    pub queued: AtomicU64,
    /// 1 while a task computes.
    pub running: AtomicU64,
}

impl InferStats {
    pub fn to_json(&self) -> Value {
        json!({
            "sessions": self.sessions.load(Ordering::Relaxed),
            "kv_bytes": self.kv_bytes.load(Ordering::Relaxed),
            "tasks": self.tasks.load(Ordering::Relaxed),
            "tokens": self.tokens.load(Ordering::Relaxed),
            "busy_ms": self.busy_us.load(Ordering::Relaxed) / 1000,
            "queued": self.queued.load(Ordering::Relaxed),
            "running": self.running.load(Ordering::Relaxed),
        })
    }
}

pub struct Inference {
    jobs: Sender<Job>,
    pub stats: Arc<InferStats>,
}

impl Inference {
    /// Starts the thread; relays to next hops authenticate with `key` when the node has one.
    pub fn spawn(
        cfg: EngineConfig,
        key: Option<ClusterKey>,
        events: Sender<NodeEvent>,
        waker: Arc<Waker>,
    ) -> Inference {
        let (jobs, rx) = unbounded();
        let stats = Arc::new(InferStats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || worker(cfg, key, rx, events, waker, s))
            .expect("spawning the inference thread");
        Inference { jobs, stats }
    }

    pub fn submit(&self, job: Job) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.jobs.send(job);
    }
}

/// Threads that carry results to next hops and wait for their answers, so neither the event
/// loop nor the inference thread waits on another node.
const RELAY_THREADS: usize = 4;

fn worker(
    cfg: EngineConfig,
    key: Option<ClusterKey>,
    jobs: Receiver<Job>,
    events: Sender<NodeEvent>,
    waker: Arc<Waker>,
    stats: Arc<InferStats>,
) {
    let relay_pool = WorkerPool::new("relay", RELAY_THREADS);
    let relay = relay_pool.handle();
    let mut engine = Engine::new(cfg);
    if let Err(e) = &engine {
        crate::error!("inference engine failed to start: {e}");
    }
    // Shard id -> address of the map the engine wrapped, to notice a shard that was reloaded.
    let mut loaded: HashMap<u32, usize> = HashMap::new();
    for job in jobs {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        stats.running.store(1, Ordering::Relaxed);
        let started = Instant::now();
        let (reply, payload) = match job {
            Job::Execute { reply, mut task, from, origin, map, file, queued, me } => {
                // A new session without a token gets one; a relay passes it down the chain.
                if task.session_token.is_none() {
                    match crate::protocol::auth::random_bytes::<16>() {
                        Ok(b) => task.session_token = Some(crate::hash::to_hex(&b)),
                        Err(e) => crate::error!("no randomness for a session token: {e}"),
                    }
                }
                let claim = task.session_token.as_deref().map(|token| Claim { token, origin: &origin });
                let outcome = match (engine.as_mut(), claim, unchanged(&file, &map, task.shard_id)) {
                    (_, _, Err(e)) => Err(e),
                    (Ok(engine), Some(claim), Ok(())) => {
                        execute(engine, &mut loaded, &task, claim, map, queued, &stats)
                    }
                    (Ok(_), None, _) => Err((ErrorCode::Internal, "no session token could be made".to_string())),
                    (Err(e), _, _) => Err((ErrorCode::Internal, e.message.clone())),
                };
                match outcome {
                    Err((code, msg)) => {
                        let payload = error_payload(json!("EXECUTE_TASK"), reply.request_id.clone(), code, &msg);
                        (reply, payload)
                    }
                    Ok(mut result) => {
                        let hop = json!({"address": me.to_string(), "shard_id": task.shard_id,
                            "timings": result["timings"].take()});
                        result.as_object_mut().expect("an object").remove("timings");
                        if task.next.is_empty() {
                            result["hops"] = json!([hop]);
                            let payload = success_payload("EXECUTE_TASK", &reply.request_id, result);
                            (reply, payload)
                        } else {
                            let (tx, w, key) = (events.clone(), waker.clone(), key.clone());
                            relay.submit(move || {
                                let payload = forward(
                                    &task,
                                    from.as_deref(),
                                    &origin,
                                    key.as_ref(),
                                    result,
                                    hop,
                                    &reply.request_id,
                                );
                                let _ =
                                    tx.send(NodeEvent::Answer { token: reply.token, conn_id: reply.conn_id, payload });
                                let _ = w.wake();
                            });
                            record(&engine, &stats, started);
                            continue;
                        }
                    }
                }
            }
            Job::EndSession { reply, session_id, session_token } => {
                let freed = engine.as_mut().map_or(Ok(0), |e| e.end_session_as(&session_id, session_token.as_deref()));
                let payload = match freed {
                    Ok(freed) => success_payload(
                        "END_SESSION",
                        &reply.request_id,
                        json!({"session_id": session_id, "freed": freed}),
                    ),
                    Err(e) => error_payload(json!("END_SESSION"), reply.request_id.clone(), e.code, &e.message),
                };
                (reply, payload)
            }
        };
        record(&engine, &stats, started);
        if events.send(NodeEvent::Answer { token: reply.token, conn_id: reply.conn_id, payload }).is_err() {
            return; // the node is gone
        }
        let _ = waker.wake();
    }
}

/// Whether the shard's file still has the length of its map. A file cut short under the map
/// would raise SIGBUS at the first read past its new end; a shard whose file changed is refused
/// here, before compute (one `fstat` per task). A truncation during a computation is not caught
/// (see docs/ARCHITECTURE.md, threat model).
fn unchanged(file: &std::fs::File, map: &Mmap, shard_id: u32) -> Result<(), (ErrorCode, String)> {
    match file.metadata() {
        Ok(m) if m.len() == map.len() as u64 => Ok(()),
        Ok(m) => Err((
            ErrorCode::ShardChanged,
            format!(
                "shard {shard_id}'s file changed on disk ({} bytes, {} when loaded): load it again",
                m.len(),
                map.len()
            ),
        )),
        Err(e) => Err((ErrorCode::ShardChanged, format!("shard {shard_id}'s file: {e}"))),
    }
}

/// Updates the counters STATUS shows after a job.
fn record<E>(engine: &Result<Engine, E>, stats: &InferStats, started: Instant) {
    stats.running.store(0, Ordering::Relaxed);
    if let Ok(engine) = engine {
        let (n, bytes) = engine.sessions();
        stats.sessions.store(n as u64, Ordering::Relaxed);
        stats.kv_bytes.store(bytes, Ordering::Relaxed);
    }
    stats.busy_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
}

/// Runs one task on this node's shard: its result object (timings, and the output), or an error.
fn execute(
    engine: &mut Engine,
    loaded: &mut HashMap<u32, usize>,
    task: &ExecuteTask,
    claim: Claim,
    map: Arc<Mmap>,
    queued: Instant,
    stats: &InferStats,
) -> Result<Value, (ErrorCode, String)> {
    let fail = |code, msg: &str| Err((code, msg.to_string()));
    let queue_ms = queued.elapsed().as_secs_f64() * 1e3;
    let key = map.as_ptr() as usize;
    if loaded.get(&task.shard_id) != Some(&key) || !engine.is_loaded(task.shard_id) {
        let t = Instant::now();
        if let Err(e) = engine.load(task.shard_id, map) {
            loaded.remove(&task.shard_id);
            return fail(e.code, &format!("shard {}: {}", task.shard_id, e.message));
        }
        crate::info!("shard {} ready for inference ({:.1} ms)", task.shard_id, t.elapsed().as_secs_f64() * 1e3);
        loaded.insert(task.shard_id, key);
    }
    if !task.next.is_empty() && engine.shard_info(task.shard_id).is_some_and(|(hp, _, end)| end == hp.n_layer) {
        let msg = format!("shard {} ends the model: no hop can follow it", task.shard_id);
        return fail(ErrorCode::BadRoute, &msg);
    }
    let input = match &task.input {
        TaskInput::Tokens(t) => Input::Tokens(t.clone()),
        TaskInput::Hidden { data, rows, cols } => Input::Hidden { data: data.clone(), n_tokens: *rows, width: *cols },
    };
    let n_tokens = input.n_tokens();
    let want = match task.output {
        TaskOutput::Hidden => Want::Hidden,
        TaskOutput::Logits { all } => Want::Logits { all },
        TaskOutput::TopK(_) => Want::Logits { all: false },
    };
    let t = Instant::now();
    let out = match engine.execute_as(task.shard_id, &task.session_id, Some(claim), task.pos, &input, want) {
        Ok(out) => out,
        Err(e) => return fail(e.code, &e.message),
    };
    let compute_ms = t.elapsed().as_secs_f64() * 1e3;
    stats.tasks.fetch_add(1, Ordering::Relaxed);
    stats.tokens.fetch_add(n_tokens as u64, Ordering::Relaxed);
    let output = match (out, task.output) {
        (Output::Hidden { data, n_tokens, width }, _) => json!({"hidden": f32_to_json(&data, n_tokens, width)}),
        (Output::Logits { data, n_vocab, .. }, TaskOutput::TopK(k)) => {
            let last = &data[data.len() - n_vocab..];
            let mut ids: Vec<u32> = (0..n_vocab as u32).collect();
            let k = k.min(n_vocab);
            ids.select_nth_unstable_by(k - 1, |a, b| last[*b as usize].total_cmp(&last[*a as usize]).then(a.cmp(b)));
            ids.truncate(k);
            ids.sort_by(|a, b| last[*b as usize].total_cmp(&last[*a as usize]).then(a.cmp(b)));
            json!({"top_k": ids.iter().map(|&i| json!({"id": i, "logit": last[i as usize]})).collect::<Vec<_>>()})
        }
        (Output::Logits { data, rows, n_vocab }, _) => json!({"logits": f32_to_json(&data, rows, n_vocab)}),
    };
    let mut result = json!({
        "session_id": &task.session_id,
        "session_token": claim.token,
        "shard_id": task.shard_id,
        "pos": task.pos,
        "n_tokens": n_tokens,
        "timings": {"queue_ms": queue_ms, "compute_ms": compute_ms},
    });
    if let (Value::Object(r), Value::Object(o)) = (&mut result, output) {
        r.extend(o);
    }
    Ok(result)
}

thread_local! {
    /// Each relay thread's open connections to next hops.
    static HOPS: RefCell<HashMap<SocketAddr, Client>> = RefCell::new(HashMap::new());
}

/// Sends this hop's hidden state to `task.next[0]` with the rest of the route, waits for the
/// answer, and returns the frame for our caller: the chain's result with this hop's timings
/// first in `hops`, or the error with the hop that failed (`failed_hop`).
fn forward(
    task: &ExecuteTask,
    from: Option<&str>,
    origin: &str,
    key: Option<&ClusterKey>,
    mut result: Value,
    hop: Value,
    request_id: &Value,
) -> Vec<u8> {
    let next = &task.next[0];
    let (output, k, all) = match task.output {
        TaskOutput::Hidden => ("hidden", 0, false),
        TaskOutput::Logits { all } => ("logits", 0, all),
        TaskOutput::TopK(k) => ("top_k", k, false),
    };
    let rest: Vec<Value> = task.next[1..].iter().map(hop_json).collect();
    let mut params = json!({
        "session_id": task.session_id,
        "shard_id": next.shard_id,
        "pos": task.pos,
        "input": {"hidden": result["hidden"].take()},
        "output": output,
        "all_logits": all,
        "next": rest,
        "load": task.load,
        "hop_timeout_ms": task.hop_timeout_ms,
        "session_token": task.session_token,
        "origin": origin,
    });
    if k > 0 {
        params["k"] = json!(k);
    }
    let timeout = Duration::from_millis(task.hop_timeout_ms);
    let sent = Instant::now();
    let from = from.unwrap_or("relay");
    let answer = HOPS.with(|hops| {
        let mut hops = hops.borrow_mut();
        let attempt = |hops: &mut HashMap<SocketAddr, Client>| -> anyhow::Result<Value> {
            if let std::collections::hash_map::Entry::Vacant(e) = hops.entry(next.address) {
                e.insert(Client::connect_with_key(&next.address.to_string(), timeout, key)?);
            }
            let client = hops.get_mut(&next.address).expect("just inserted");
            client.set_timeout(timeout)?;
            client.request_from("EXECUTE_TASK", params.clone(), from)
        };
        // A cached connection the other side has closed gets one fresh try.
        let first = attempt(&mut hops);
        if first.is_err() {
            hops.remove(&next.address);
            if sent.elapsed() < timeout / 2 {
                let second = attempt(&mut hops);
                if second.is_err() {
                    hops.remove(&next.address);
                }
                return second;
            }
        }
        first
    });
    let failed = |msg: String| {
        let mut v = json!({"command": "EXECUTE_TASK", "request_id": request_id, "status": "error",
            "error": msg, "code": ErrorCode::HopFailed.as_str()});
        v["failed_hop"] = hop_json(next);
        serde_json::to_vec(&v).expect("JSON values serialize")
    };
    let mut answer = match answer {
        Ok(a) => a,
        Err(e) => return failed(format!("next hop {} (shard {}) did not answer: {e:#}", next.address, next.shard_id)),
    };
    answer["request_id"] = request_id.clone();
    if answer["status"] == "error" {
        if answer.get("failed_hop").is_none() {
            answer["failed_hop"] = hop_json(next);
        }
        return serde_json::to_vec(&answer).expect("JSON values serialize");
    }
    let rtt_ms = sent.elapsed().as_secs_f64() * 1e3;
    if let Some(hops) = answer["result"]["hops"].as_array_mut() {
        let mut me = hop;
        me["next_rtt_ms"] = json!(rtt_ms);
        hops.insert(0, me);
    }
    serde_json::to_vec(&answer).expect("JSON values serialize")
}

fn hop_json(h: &Hop) -> Value {
    json!({"address": h.address.to_string(), "shard_id": h.shard_id})
}

/// `MODEL_INFO`: the model's shape and tokenizer from a shard's GGUF header (a loaded shard's map,
/// or a file opened here, on a worker).
pub fn model_info(source: Result<Arc<Mmap>, std::path::PathBuf>, ctx_size: u32) -> Result<Value, String> {
    let map = match source {
        Ok(m) => m,
        Err(path) => {
            let f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // SAFETY: shard files are read-only once complete.
            Arc::new(unsafe { Mmap::map(&f) }.map_err(|e| format!("{}: {e}", path.display()))?)
        }
    };
    let g = Gguf::parse(&map).map_err(|e| e.to_string())?;
    let hp = crate::engine::Hparams::from_gguf(&g)?;
    let mut tokenizer = serde_json::Map::new();
    for key in crate::engine::tokenizer::KEYS {
        if let Some(v) = g.get(key) {
            tokenizer.insert(key.to_string(), v.to_json());
        }
    }
    Ok(json!({
        "architecture": g.get_str("general.architecture"),
        "model_id": g.get_str("shard.model_id"),
        "name": g.get_str("general.name"),
        "shard_count": g.get_u64("shard.count").unwrap_or(1),
        "block_count": hp.n_layer,
        "embedding_length": hp.n_embd,
        "vocab_size": hp.n_vocab,
        "context_length": hp.n_ctx_train,
        "ctx_size": ctx_size.min(hp.n_ctx_train),
        "tokenizer": tokenizer,
    }))
}
