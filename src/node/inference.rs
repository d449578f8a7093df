//! The inference worker: one thread that owns the ggml engine, runs one task at a time with
//! ggml's own thread pool, and answers with finished response frames so the event loop only
//! copies bytes. Tasks queue on a crossbeam channel in arrival order, which keeps a session's
//! steps in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, unbounded};
use memmap2::Mmap;
use mio::{Token, Waker};
use serde_json::{Value, json};

use super::NodeEvent;
use crate::engine::{Engine, EngineConfig, Input, Output, Want};
use crate::protocol::tensor::f32_to_json;
use crate::protocol::{ErrorCode, ExecuteTask, TaskInput, TaskOutput, error_payload, success_payload};

/// Where an answer goes: the connection (checked by id, as slots are reused) and the request.
pub struct ReplyTo {
    pub token: Token,
    pub conn_id: u64,
    pub request_id: Value,
}

pub enum Job {
    Execute { reply: ReplyTo, task: ExecuteTask, map: Arc<Mmap>, queued: Instant },
    EndSession { reply: ReplyTo, session_id: String },
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
        })
    }
}

pub struct Inference {
    jobs: Sender<Job>,
    pub stats: Arc<InferStats>,
}

impl Inference {
    pub fn spawn(cfg: EngineConfig, events: Sender<NodeEvent>, waker: Arc<Waker>) -> Inference {
        let (jobs, rx) = unbounded();
        let stats = Arc::new(InferStats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || worker(cfg, rx, events, waker, s))
            .expect("spawning the inference thread");
        Inference { jobs, stats }
    }

    pub fn submit(&self, job: Job) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.jobs.send(job);
    }
}

fn worker(
    cfg: EngineConfig,
    jobs: Receiver<Job>,
    events: Sender<NodeEvent>,
    waker: Arc<Waker>,
    stats: Arc<InferStats>,
) {
    let mut engine = Engine::new(cfg);
    if let Err(e) = &engine {
        crate::error!("inference engine failed to start: {e}");
    }
    // Shard id -> address of the map the engine wrapped, to notice a shard that was reloaded.
    let mut loaded: HashMap<u32, usize> = HashMap::new();
    for job in jobs {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        let started = Instant::now();
        let (reply, payload) = match job {
            Job::Execute { reply, task, map, queued } => {
                let payload = match engine.as_mut() {
                    Ok(engine) => execute(engine, &mut loaded, &reply, task, map, queued, &stats),
                    Err(e) => {
                        error_payload(json!("EXECUTE_TASK"), reply.request_id.clone(), ErrorCode::Internal, &e.message)
                    }
                };
                (reply, payload)
            }
            Job::EndSession { reply, session_id } => {
                let freed = engine.as_mut().map_or(0, |e| e.end_session(&session_id));
                let result = json!({"session_id": session_id, "freed": freed});
                let payload = success_payload("END_SESSION", &reply.request_id, result);
                (reply, payload)
            }
        };
        if let Ok(engine) = &engine {
            let (n, bytes) = engine.sessions();
            stats.sessions.store(n as u64, Ordering::Relaxed);
            stats.kv_bytes.store(bytes, Ordering::Relaxed);
        }
        stats.busy_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if events.send(NodeEvent::Answer { token: reply.token, conn_id: reply.conn_id, payload }).is_err() {
            return; // the node is gone
        }
        let _ = waker.wake();
    }
}

fn execute(
    engine: &mut Engine,
    loaded: &mut HashMap<u32, usize>,
    reply: &ReplyTo,
    task: ExecuteTask,
    map: Arc<Mmap>,
    queued: Instant,
    stats: &InferStats,
) -> Vec<u8> {
    let fail = |code, msg: &str| error_payload(json!("EXECUTE_TASK"), reply.request_id.clone(), code, msg);
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
    let input = match task.input {
        TaskInput::Tokens(t) => Input::Tokens(t),
        TaskInput::Hidden { data, rows, cols } => Input::Hidden { data, n_tokens: rows, width: cols },
    };
    let n_tokens = input.n_tokens();
    let want = match task.output {
        TaskOutput::Hidden => Want::Hidden,
        TaskOutput::Logits { all } => Want::Logits { all },
        TaskOutput::TopK(_) => Want::Logits { all: false },
    };
    let t = Instant::now();
    let out = match engine.execute(task.shard_id, &task.session_id, task.pos, &input, want) {
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
        "session_id": task.session_id,
        "shard_id": task.shard_id,
        "pos": task.pos,
        "n_tokens": n_tokens,
        "timings": {"queue_ms": queue_ms, "compute_ms": compute_ms},
    });
    if let (Value::Object(r), Value::Object(o)) = (&mut result, output) {
        r.extend(o);
    }
    success_payload("EXECUTE_TASK", &reply.request_id, result)
}
