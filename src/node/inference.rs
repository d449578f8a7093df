//! The inference worker: one thread that owns the ggml engine, runs rounds of tasks with ggml's
//! own thread pool, and answers with finished response frames so the event loop only copies
//! bytes. Tasks arrive on a crossbeam channel and wait in the [`schedule`](super::schedule)
//! queues: one FIFO per client (which keeps a session's steps in order), served in turn, decode
//! steps before prefill chunks, queued tokens bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use memmap2::Mmap;
use mio::{Token, Waker};
use serde_json::{Value, json};

use super::gather::{self, Gather};
use super::schedule::{self, Queued, Scheduler};
use super::{NodeEvent, relay};
use crate::engine::{Claim, Engine, EngineConfig, Input, Output, PREFILL_GRANULE, Step, Want};
use crate::gguf::reader::Gguf;
use crate::protocol::tensor::{f32_to_json, f32_to_raw};
use crate::protocol::{
    Encoding, ErrorCode, ExecuteTask, Hop, TaskInput, TaskOutput, binary, error_payload, request_payload,
    success_payload,
};

/// Where an answer goes: the connection (checked by id, as slots are reused) and the request.
pub struct ReplyTo {
    pub token: Token,
    pub conn_id: u64,
    pub request_id: Value,
    /// Bytes of the connection's output budget held for this answer until it is queued
    /// (`Conn::reserved`).
    pub reserved: usize,
}

/// The loaded shard a task runs on: its map, its file (the repack sidecar goes beside it) and its
/// info hash when the node has computed it (the sidecar's key).
pub struct ShardFile {
    pub map: Arc<Mmap>,
    /// The file behind `map`, checked (one `fstat`) before each round of its tasks computes.
    pub file: Arc<std::fs::File>,
    pub path: std::path::PathBuf,
    pub info_hash: Option<String>,
}

pub enum Job {
    Execute {
        reply: ReplyTo,
        task: ExecuteTask,
        /// The request's `from` (logged and relayed; it grants nothing).
        from: Option<String>,
        /// The client as the node identifies it: keys the per-client session quota.
        origin: String,
        /// How long the session outlives the connection the step came on.
        tenure: Tenure,
        shard: ShardFile,
        queued: Instant,
        /// This node's address, for the hop list of the answer.
        me: SocketAddr,
        /// What earlier rounds computed of this step, when it was split (`None` as submitted).
        prefix: Option<Prefix>,
    },
    EndSession {
        reply: ReplyTo,
        session_id: String,
        session_token: Option<String>,
        /// The client's key, as for `Execute` (replaced by that of the session's queued steps).
        origin: String,
    },
}

/// How long a session outlives the connection its step came on (red-team round 11: any client
/// naming an `origin` kept its sessions, and their KV memory, after it closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tenure {
    /// The connection's: its sessions end when its peer closes it.
    Connection,
    /// A relaying node's chain, over an authenticated (cluster-key) link that other chains
    /// share: the link closing ends nothing; `END_SESSION` or eviction does.
    Chain,
    /// A connection on a node without a cluster key that names an `origin`: it says it relays,
    /// which nothing proves. Its sessions outlive it (a relay link closes when its callers have
    /// gone while other chains' sessions live on, their next steps coming on a new link), but
    /// only until idle for `--orphan-session-idle`, and they count against the connection's address
    /// meanwhile, as every session on an open node does.
    Claimed,
}

/// The part of a long step computed in earlier rounds: a round whose prefill would hold up other
/// sessions' decode steps computes only [`schedule::PrefillShare::chunk`] tokens of it, and puts
/// the rest back first in its client's queue.
pub struct Prefix {
    /// Tokens (rows) computed.
    tokens: usize,
    /// Their output, when the answer carries every row (a hidden state, `all_logits`).
    output: Option<Output>,
}

/// Counters the worker keeps for STATUS.
#[derive(Default)]
pub struct InferStats {
    pub sessions: AtomicU64,
    pub kv_bytes: AtomicU64,
    pub tasks: AtomicU64,
    pub tokens: AtomicU64,
    pub busy_us: AtomicU64,
    /// Time rounds were held open for steps about to arrive (see [`gather`]).
    pub gather_us: AtomicU64,
    pub queued: AtomicU64,
    /// 1 while a task computes.
    pub running: AtomicU64,
    /// Decode steps that ran their shard's kept graph instead of building one.
    pub graphs_reused: AtomicU64,
    /// Queued steps dropped, not computed, because their connection closed.
    pub dropped: AtomicU64,
    /// Prefill steps computed in parts, so that other sessions' decode steps waited less.
    pub split: AtomicU64,
    /// Sessions ended because the connection that owned them closed.
    pub sessions_closed: AtomicU64,
    /// Graphs stopped part-way because every step in them was for a closed connection or
    /// cancelled.
    pub aborted: AtomicU64,
    /// Queued steps answered `CANCELLED` (a `CANCEL` from the connection that sent them).
    pub cancelled: AtomicU64,
}

impl InferStats {
    pub fn to_json(&self) -> Value {
        let sidecars = crate::engine::sidecar::counters();
        json!({
            "sessions": self.sessions.load(Ordering::Relaxed),
            "kv_bytes": self.kv_bytes.load(Ordering::Relaxed),
            "tasks": self.tasks.load(Ordering::Relaxed),
            "tokens": self.tokens.load(Ordering::Relaxed),
            "busy_ms": self.busy_us.load(Ordering::Relaxed) / 1000,
            "gather_ms": self.gather_us.load(Ordering::Relaxed) / 1000,
            "queued": self.queued.load(Ordering::Relaxed),
            "running": self.running.load(Ordering::Relaxed),
            "sidecars": {
                "written": sidecars.written,
                "rejected": sidecars.rejected,
                "changed": sidecars.changed,
            },
            "graphs_reused": self.graphs_reused.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
            "split": self.split.load(Ordering::Relaxed),
            "sessions_closed": self.sessions_closed.load(Ordering::Relaxed),
            "aborted": self.aborted.load(Ordering::Relaxed),
            "cancelled": self.cancelled.load(Ordering::Relaxed),
        })
    }
}

/// What the event loop sends the inference thread, in the order it happened.
enum Msg {
    Job(Box<Job>),
    /// The command connection with this id closed: its queued steps are dropped; with
    /// `end_sessions` (its peer closed it) the sessions it owns are ended.
    Closed {
        conn_id: u64,
        end_sessions: bool,
    },
    /// A `CANCEL` from connection `conn_id`: its queued steps with these request ids are
    /// answered `CANCELLED`, not computed; then the `CANCEL` itself (`answer`).
    Cancel {
        conn_id: u64,
        request_ids: Vec<Value>,
        answer: CancelAnswer,
    },
}

/// The answer to a `CANCEL` the inference thread completes: `{request_ids, relays}`, the ids the
/// loop withdrew (waiting for a shard, relayed; `relays` of them relayed) and then those it takes
/// off its queue. A step computing when the `CANCEL` came is not listed: it is answered as
/// computed, or `CANCELLED` if its graph stops because no step in it is wanted any more.
pub struct CancelAnswer {
    pub reply: ReplyTo,
    pub withdrawn: Vec<Value>,
    pub relays: usize,
}

/// The steps of the graph computing now, as (connection id, request id), shared by the event
/// loop and the inference thread: when a closed connection or a `CANCEL` leaves none of them
/// wanted, the loop sets `abort` and ggml stops the graph after the node in progress (red-team
/// round 9: a closed connection's 2000-token prompt kept the thread for 8 s). Both sides change
/// `abort` only under the lock, so a flag set for one graph never stops the next. The ids of the
/// connections closed last are kept too, so that a graph whose steps' connections all closed
/// after its round was formed (their steps taken off the queue) stops at its first node.
#[derive(Default)]
struct Running {
    state: Mutex<RunningState>,
    abort: Arc<AtomicBool>,
}

#[derive(Default)]
struct RunningState {
    steps: Vec<(u64, Value)>,
    /// The last [`RECENTLY_CLOSED`] connections closed (ids are never reused).
    closed: std::collections::VecDeque<u64>,
}

/// Closed connections [`Running`] remembers.
const RECENTLY_CLOSED: usize = 1024;

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunningState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The worker starts a graph for `steps` (empty: none runs).
    fn start(&self, mut steps: Vec<(u64, Value)>) {
        let mut state = self.lock();
        let any = !steps.is_empty();
        steps.retain(|(c, _)| !state.closed.contains(c));
        self.abort.store(any && steps.is_empty(), Ordering::Relaxed);
        state.steps = steps;
    }

    /// The loop: connection `conn_id` closed.
    fn closed(&self, conn_id: u64) {
        let mut state = self.lock();
        if state.closed.len() == RECENTLY_CLOSED {
            state.closed.pop_front();
        }
        state.closed.push_back(conn_id);
        self.forget_locked(&mut state, |c, _| c == conn_id);
    }

    /// The loop: the steps `gone` matches are not wanted any more.
    fn forget(&self, gone: impl Fn(u64, &Value) -> bool) {
        let mut state = self.lock();
        self.forget_locked(&mut state, gone);
    }

    fn forget_locked(&self, state: &mut RunningState, gone: impl Fn(u64, &Value) -> bool) {
        if state.steps.is_empty() {
            return;
        }
        state.steps.retain(|(c, id)| !gone(*c, id));
        if state.steps.is_empty() {
            self.abort.store(true, Ordering::Relaxed);
        }
    }
}

pub struct Inference {
    jobs: Sender<Msg>,
    pub stats: Arc<InferStats>,
    running: Arc<Running>,
}

impl Inference {
    /// The inference thread; sessions of closed [`Tenure::Claimed`] connections end once idle
    /// for `orphan_idle` (`--orphan-session-idle`). With `direct`, it submits relay requests to
    /// the shared relays itself (written to the next hop's socket at once when its link has
    /// nothing queued); without, it hands them to the event loop as `NodeEvent::Relay`.
    pub fn spawn(
        cfg: EngineConfig,
        orphan_idle: Duration,
        events: Sender<NodeEvent>,
        waker: Arc<Waker>,
        direct: Option<relay::Direct>,
    ) -> Inference {
        let (jobs, rx) = unbounded();
        let stats = Arc::new(InferStats::default());
        let running = Arc::new(Running::default());
        let (s, r) = (stats.clone(), running.clone());
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || worker(cfg, orphan_idle, rx, Outlet { events, waker, direct }, s, r))
            .expect("spawning the inference thread");
        Inference { jobs, stats, running }
    }

    pub fn submit(&self, job: Job) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.jobs.send(Msg::Job(Box::new(job)));
    }

    /// The command connection `conn_id` closed: its `EXECUTE_TASK`s still queued (not yet taken
    /// into a round) are dropped unanswered, their queued tokens released, so a client that
    /// queues a burst and leaves costs no compute (red-team round 8: 32 prefills queued by a
    /// connection closed after 0.1 s were computed for minutes). Its `END_SESSION`s still run
    /// (they free memory). Sent on the jobs' channel, so every job the connection submitted
    /// before is queued when this is seen. A graph computing only this connection's steps stops
    /// early ([`Running`]).
    ///
    /// With `end_sessions` (the connection's peer closed it, not a limit of this node), the
    /// sessions the connection owns are ended too: those whose last step here came on it, not
    /// sessions a relaying node opened over it (a link other chains share), so a stranger's
    /// sessions do not hold KV memory until they are evicted.
    pub fn closed(&self, conn_id: u64, end_sessions: bool) {
        self.running.closed(conn_id);
        let _ = self.jobs.send(Msg::Closed { conn_id, end_sessions });
    }

    /// A `CANCEL` from connection `conn_id`: its steps `request_ids` still queued are answered
    /// `CANCELLED` uncomputed, and a graph computing only withdrawn steps stops early.
    pub fn cancel_requests(&self, conn_id: u64, request_ids: Vec<Value>, answer: CancelAnswer) {
        self.running.forget(|c, id| c == conn_id && request_ids.contains(id));
        let _ = self.jobs.send(Msg::Cancel { conn_id, request_ids, answer });
    }
}

/// Jobs taken off the queue at once (and so, at most, steps in one batched graph's round).
const MAX_JOBS_PER_ROUND: usize = 64;

/// Tokens a task computes.
fn tokens(task: &ExecuteTask) -> usize {
    match &task.input {
        TaskInput::Tokens(t) => t.len(),
        TaskInput::Hidden { rows, .. } => *rows,
    }
}

impl Queued for Job {
    fn origin(&self) -> &str {
        match self {
            Job::Execute { origin, .. } | Job::EndSession { origin, .. } => origin,
        }
    }
    fn tokens(&self) -> usize {
        match self {
            Job::Execute { task, .. } => tokens(task),
            Job::EndSession { .. } => 0,
        }
    }
}

/// The scheduler's bounds for an engine configured as `cfg`: a client may queue a whole context
/// for each session it may hold (`--max-sessions-per-client` x `--ctx-size` tokens), the node a
/// whole context for each session it keeps (`--max-sessions` x `--ctx-size`); a round adds at
/// most one batched graph of prefill ([`crate::engine::MAX_BATCH_TOKENS`]).
fn limits(cfg: &EngineConfig) -> schedule::Limits {
    let ctx = cfg.ctx_size.max(1) as usize;
    schedule::Limits {
        max_jobs: MAX_JOBS_PER_ROUND,
        max_tokens: crate::engine::MAX_BATCH_TOKENS,
        // At most half of the node's, so that one client cannot fill it.
        per_client_tokens: (cfg.max_sessions_per_client.max(1) * ctx).min(cfg.max_sessions.max(1) * ctx / 2),
        total_tokens: cfg.max_sessions.max(1) * ctx,
    }
}

/// Where the inference thread's finished frames go: answers to the event loop (woken for them),
/// relay requests to the shared relays when `direct` is set, else to the loop too.
struct Outlet {
    events: Sender<NodeEvent>,
    waker: Arc<Waker>,
    direct: Option<relay::Direct>,
}

impl Outlet {
    /// Hands the loop an answer for a connection and wakes it; false once the loop is gone.
    fn answer(&self, reply: ReplyTo, payload: Vec<u8>) -> bool {
        let ok = self
            .events
            .send(NodeEvent::Answer { token: reply.token, conn_id: reply.conn_id, reserved: reply.reserved, payload })
            .is_ok();
        let _ = self.waker.wake();
        ok
    }

    /// A request for the next hop: submitted here and written to its link's socket when that
    /// takes it now (the loop is woken only for an answer at once or an earlier deadline), or
    /// handed to the loop.
    fn relay(&self, out: relay::Outgoing) {
        let Some(direct) = &self.direct else {
            let _ = self.events.send(NodeEvent::Relay(out));
            let _ = self.waker.wake();
            return;
        };
        let (answers, wake) = direct.relays.lock().submit_direct(&direct.registry, out, Instant::now());
        for a in answers {
            // Only a refusal or a failed hop comes back at once: a finished frame (made here if
            // it were a large relayed answer, as the loop's finisher would).
            let payload = match a.body {
                relay::Body::Frame(payload) => payload,
                relay::Body::Finish(finish) => finish.frame(),
            };
            let (token, conn_id, reserved) = (a.reply.token, a.reply.conn_id, a.reply.reserved);
            let _ = self.events.send(NodeEvent::Answer { token, conn_id, reserved, payload });
        }
        if wake {
            let _ = self.waker.wake();
        }
    }
}

fn worker(
    cfg: EngineConfig,
    orphan_idle: Duration,
    jobs: Receiver<Msg>,
    outlet: Outlet,
    stats: Arc<InferStats>,
    running: Arc<Running>,
) {
    let mut relay_ids = 0u64;
    let mut queue: Scheduler<Job> = Scheduler::new(limits(&cfg));
    // Sessions with steps in `queue`: their client's key and how many, so that an END_SESSION
    // (which may come on another connection than relayed steps) waits behind them.
    let mut queued_sessions: HashMap<String, (String, usize)> = HashMap::new();
    // Session id -> the connection that owns it (see `Inference::closed`), and connections
    // whose peer closed them, whose sessions are to be ended.
    let mut owners = Owners::new(cfg.max_sessions, orphan_idle);
    let mut engine = Engine::new(cfg);
    match &mut engine {
        Ok(e) => e.set_abort_flag(running.abort.clone()),
        Err(e) => crate::error!("inference engine failed to start: {e}"),
    }
    // Shard id -> address of the map the engine wrapped, to notice a shard that was reloaded.
    let mut loaded: HashMap<u32, usize> = HashMap::new();
    let send = |reply: ReplyTo, payload: Vec<u8>| outlet.answer(reply, payload);
    let mut gather = Gather::default();
    let mut share = schedule::PrefillShare::default();
    loop {
        // Continuous batching: whatever queued while the last graph ran is scheduled now.
        if queue.is_empty() {
            let idle = Instant::now();
            // Waiting for work, or for the next orphaned session to have been idle long enough.
            let msg = match owners.next_expiry(&engine, idle) {
                None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => jobs.recv_deadline(at),
            };
            gather.idle(idle.elapsed());
            match msg {
                Ok(msg) => {
                    receive(&mut queue, &mut queued_sessions, &mut gather, &mut owners, msg, &stats, &send);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(msg) = jobs.try_recv() {
            receive(&mut queue, &mut queued_sessions, &mut gather, &mut owners, msg, &stats, &send);
        }
        // And the steps of sessions due back in a moment (see `gather`).
        let waited = Instant::now();
        if let Some((until, mut waiting)) = gather.plan(|k| queued_sessions.contains_key(&k.0), waited) {
            while !waiting.is_empty() {
                let Ok(msg) = jobs.recv_deadline(until) else { break };
                if let Some(key) =
                    receive(&mut queue, &mut queued_sessions, &mut gather, &mut owners, msg, &stats, &send)
                {
                    waiting.remove(&key);
                }
            }
            stats.gather_us.fetch_add(waited.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        owners.end_closed(&mut engine, &stats, Instant::now());
        if queue.is_empty() {
            // Everything that queued was cancelled.
            continue;
        }
        let (round, mut rests) =
            share_prefill(queue.next_round(), &mut queue, &gather, &share, &mut queued_sessions, &stats);
        let prefill_tokens: usize = round.iter().map(Queued::tokens).filter(|&n| n > 1).sum();
        let stepped: Vec<gather::Key> = round.iter().filter_map(key).collect();
        stats.queued.fetch_sub(round.len() as u64, Ordering::Relaxed);
        for job in &round {
            if let Job::Execute { task, .. } = job {
                left_queue(&mut queued_sessions, &task.session_id);
            }
        }
        stats.running.store(1, Ordering::Relaxed);
        let started = Instant::now();
        // Steps gathered per (shard, map) until an END_SESSION, which must see the steps before it.
        let mut groups: Vec<Vec<ExecuteJob>> = Vec::new();
        // The rest of steps split this round, to queue again once their first part is computed.
        let mut again: Vec<Job> = Vec::new();
        for (i, job) in round.into_iter().enumerate() {
            match job {
                Job::Execute { reply, mut task, from, origin, tenure, shard, queued, me, prefix } => {
                    // A new session without a token gets one; a relay passes it down the chain.
                    if task.session_token.is_none() {
                        match crate::protocol::auth::random_bytes::<16>() {
                            Ok(b) => task.session_token = Some(crate::hash::to_hex(&b)),
                            Err(e) => crate::error!("no randomness for a session token: {e}"),
                        }
                    }
                    // Decode steps (one token) form their own group, run (and answered) before
                    // prefill chunks: a step never waits for another client's prompt to compute.
                    let group_key = |t: &ExecuteTask, m: &Arc<Mmap>| (t.shard_id, m.as_ptr() as usize, tokens(t) <= 1);
                    let key = group_key(&task, &shard.map);
                    let rest = rests.remove(&i);
                    let job = ExecuteJob { reply, task, from, origin, tenure, shard, queued, me, prefix, rest };
                    match groups.iter_mut().find(|g| group_key(&g[0].task, &g[0].shard.map) == key) {
                        Some(g) => g.push(job),
                        None => groups.push(vec![job]),
                    }
                }
                Job::EndSession { reply, session_id, session_token, .. } => {
                    gather.ended(&session_id);
                    // Only this session's steps earlier in the round must run first.
                    if groups.iter().flatten().any(|j| j.task.session_id == session_id) {
                        for group in groups.drain(..) {
                            again.extend(run_group(
                                &mut engine,
                                &mut loaded,
                                group,
                                (&stats, &running, &mut owners),
                                &mut relay_ids,
                                &outlet,
                            ));
                        }
                    }
                    let freed = engine.as_mut().map_or(0, |e| e.end_session_as(&session_id, session_token.as_deref()));
                    if freed > 0 {
                        owners.by_session.remove(&session_id);
                        owners.orphans.remove(&session_id);
                    }
                    let payload = success_payload(
                        "END_SESSION",
                        &reply.request_id,
                        json!({"session_id": session_id, "freed": freed}),
                    );
                    if !send(reply, payload) {
                        return;
                    }
                }
            }
        }
        for group in groups {
            again.extend(run_group(
                &mut engine,
                &mut loaded,
                group,
                (&stats, &running, &mut owners),
                &mut relay_ids,
                &outlet,
            ));
        }
        share.record(prefill_tokens, started.elapsed());
        // In reverse, so that a client's parts keep their order at the front of its queue.
        for job in again.into_iter().rev() {
            requeue(&mut queue, &mut queued_sessions, job, &stats);
        }
        gather.answered(&stepped, Instant::now(), started.elapsed());
        record(&engine, &stats, started);
    }
}

/// Which connection owns each session this node computes for: the one its last step came on
/// (a keyed relay's step's session belongs to the chain, not the link: it is not counted). When a
/// connection's peer closes it, the sessions it owns are ended ([`Inference::closed`]), those it
/// opened as a [`Tenure::Claimed`] relay once they have been idle for `orphan_idle`.
struct Owners {
    by_session: HashMap<String, (u64, Tenure)>,
    /// Connections closed by their peer, whose sessions are ended before the next round.
    closed: Vec<u64>,
    /// Sessions of closed [`Tenure::Claimed`] connections, ended once idle for `orphan_idle`
    /// (a step of one on another connection owns it again).
    orphans: std::collections::HashSet<String>,
    orphan_idle: Duration,
    /// Past this many entries, those of sessions the engine no longer holds (evicted) go.
    prune_at: usize,
}

impl Owners {
    fn new(max_sessions: usize, orphan_idle: Duration) -> Owners {
        Owners {
            by_session: HashMap::new(),
            closed: Vec::new(),
            orphans: Default::default(),
            orphan_idle,
            prune_at: max_sessions * 2 + 64,
        }
    }

    /// Ends the sessions of the connections in `closed` (STATUS `inference.sessions_closed`), and
    /// orphans idle for `orphan_idle` at `now`.
    fn end_closed(
        &mut self,
        engine: &mut Result<Engine, crate::engine::EngineError>,
        stats: &InferStats,
        now: Instant,
    ) {
        if self.closed.is_empty() && self.orphans.is_empty() {
            return;
        }
        let Ok(engine) = engine.as_mut() else {
            self.closed.clear();
            self.orphans.clear();
            return;
        };
        let mut ended = 0u64;
        for conn_id in std::mem::take(&mut self.closed) {
            let ids: Vec<(String, Tenure)> = self
                .by_session
                .iter()
                .filter(|(_, (c, _))| *c == conn_id)
                .map(|(id, (_, t))| (id.clone(), *t))
                .collect();
            for (id, tenure) in ids {
                self.by_session.remove(&id);
                if tenure == Tenure::Claimed {
                    self.orphans.insert(id);
                } else if engine.end_session(&id) > 0 {
                    ended += 1;
                }
            }
        }
        let expired: Vec<String> = self
            .orphans
            .iter()
            .filter(|id| engine.idle_for(id, now).is_none_or(|idle| idle >= self.orphan_idle))
            .cloned()
            .collect();
        for id in expired {
            self.orphans.remove(&id);
            if engine.end_session(&id) > 0 {
                ended += 1;
            }
        }
        if ended > 0 {
            stats.sessions_closed.fetch_add(ended, Ordering::Relaxed);
            let (n, bytes) = engine.sessions();
            stats.sessions.store(n as u64, Ordering::Relaxed);
            stats.kv_bytes.store(bytes, Ordering::Relaxed);
            crate::debug!("ended {ended} sessions of closed connections");
        }
    }

    /// When the next orphan could be idle long enough to end (the inference thread's wait).
    fn next_expiry(&self, engine: &Result<Engine, crate::engine::EngineError>, now: Instant) -> Option<Instant> {
        let engine = engine.as_ref().ok()?;
        self.orphans
            .iter()
            .map(|id| now + self.orphan_idle.saturating_sub(engine.idle_for(id, now).unwrap_or(self.orphan_idle)))
            .min()
    }

    /// Records `conn_id` as the owner of `session_id` (a step of it computed for that connection).
    fn own(&mut self, session_id: &str, conn_id: u64, tenure: Tenure, engine: &Engine) {
        self.orphans.remove(session_id);
        self.by_session.insert(session_id.to_string(), (conn_id, tenure));
        if self.by_session.len() > self.prune_at {
            self.by_session.retain(|id, _| engine.has_session(id));
        }
    }
}

/// When other sessions' decode steps are in `round`, queued, or due back (`gather`), the round's
/// prefill is cut to [`schedule::PrefillShare::chunk`] tokens: a step past it computes its first
/// tokens now (its rest, by index in the round returned, is queued again once they are
/// computed), and the client's steps after it wait, put back first in its queue. The part is a
/// multiple of [`PREFILL_GRANULE`] and leaves a rest of at least one granule, so the parts'
/// result equals the whole step's bit for bit (see there); a step under two granules is not cut
/// (first prefill of the round, it runs whole; else it waits). Uncontended,
/// the round is as the scheduler made it.
fn share_prefill(
    round: Vec<Job>,
    queue: &mut Scheduler<Job>,
    gather: &Gather,
    share: &schedule::PrefillShare,
    queued_sessions: &mut HashMap<String, (String, usize)>,
    stats: &InferStats,
) -> (Vec<Job>, HashMap<usize, TaskInput>) {
    let mut rests = HashMap::new();
    let prefilling: Vec<gather::Key> = round.iter().filter(|j| j.tokens() > 1).filter_map(key).collect();
    let budget = share.chunk(crate::engine::MAX_BATCH_TOKENS);
    let prefill: usize = round.iter().map(Queued::tokens).filter(|&n| n > 1).sum();
    if prefill <= budget {
        return (round, rests);
    }
    let contended = round.iter().any(|j| j.tokens() == 1)
        || queue.has_decode_step()
        || gather.expects_other(|k| prefilling.contains(k), Instant::now());
    if !contended {
        return (round, rests);
    }
    let mut left = budget;
    let mut cut: Vec<String> = Vec::new();
    let mut kept = Vec::with_capacity(round.len());
    let mut back = Vec::new();
    for mut job in round {
        let n = job.tokens();
        if cut.iter().any(|o| o == job.origin()) {
            back.push(job);
            continue;
        }
        if n <= 1 || n <= left {
            left -= n.min(left) * usize::from(n > 1);
            kept.push(job);
            continue;
        }
        let part = prefill_part(n, left);
        if part == 0 && left == budget {
            // Under two granules (the budget is at least one): not cut, computed whole.
            left = 0;
            kept.push(job);
            continue;
        }
        cut.push(job.origin().to_string());
        if part == 0 {
            back.push(job);
            continue;
        }
        let Job::Execute { task, .. } = &mut job else { unreachable!("only steps have tokens") };
        let rest = match &mut task.input {
            TaskInput::Tokens(t) => TaskInput::Tokens(t.split_off(part)),
            TaskInput::Hidden { data, rows, cols } => {
                let tail = data.split_off(part * *cols);
                let r = TaskInput::Hidden { data: tail, rows: *rows - part, cols: *cols };
                *rows = part;
                r
            }
        };
        stats.split.fetch_add(1, Ordering::Relaxed);
        rests.insert(kept.len(), rest);
        kept.push(job);
        left = 0;
    }
    for job in back.into_iter().rev() {
        requeue(queue, queued_sessions, job, stats);
    }
    (kept, rests)
}

/// Tokens of an `n`-token prefill step to compute in a round with `left` prefill tokens to spare:
/// a multiple of [`PREFILL_GRANULE`] that leaves a rest of at least one granule, so that every
/// part runs the same ggml kernels as the whole step and the prompt's result does not depend on
/// where (or whether) it was cut. 0: not cut (`left` under one granule, or `n` under two).
fn prefill_part(n: usize, left: usize) -> usize {
    left.min(n.saturating_sub(PREFILL_GRANULE)) / PREFILL_GRANULE * PREFILL_GRANULE
}

/// Puts a step (or a split step's rest) back first in its client's queue.
fn requeue(
    queue: &mut Scheduler<Job>,
    queued_sessions: &mut HashMap<String, (String, usize)>,
    job: Job,
    stats: &InferStats,
) {
    if let Job::Execute { task, origin, .. } = &job {
        queued_sessions.entry(task.session_id.clone()).or_insert_with(|| (origin.clone(), 0)).1 += 1;
        stats.queued.fetch_add(1, Ordering::Relaxed);
    }
    queue.push_front(job);
}

/// The session a step runs on, as `gather` keys it.
fn key(job: &Job) -> Option<gather::Key> {
    let Job::Execute { task, .. } = job else { return None };
    Some((task.session_id.clone(), task.shard_id))
}

/// Tells `gather` a step arrived; its session.
fn arrived(gather: &mut Gather, job: &Job) -> Option<gather::Key> {
    let (key, Job::Execute { queued, .. }) = (key(job)?, job) else { return None };
    gather.arrived(&key, *queued);
    Some(key)
}

/// Takes one message off the channel: a job is queued (its session's arrival told to `gather`,
/// which is returned), a cancel drops the closed connection's queued steps.
fn receive(
    queue: &mut Scheduler<Job>,
    queued_sessions: &mut HashMap<String, (String, usize)>,
    gather: &mut Gather,
    owners: &mut Owners,
    msg: Msg,
    stats: &InferStats,
    send: &impl Fn(ReplyTo, Vec<u8>) -> bool,
) -> Option<gather::Key> {
    match msg {
        Msg::Job(job) => {
            let key = arrived(gather, &job);
            enqueue(queue, queued_sessions, *job, stats, send);
            key
        }
        Msg::Cancel { conn_id, request_ids, answer } => {
            let gone = queue.remove(
                |j| matches!(j, Job::Execute { reply, .. } if reply.conn_id == conn_id && request_ids.contains(&reply.request_id)),
            );
            stats.queued.fetch_sub(gone.len() as u64, Ordering::Relaxed);
            stats.cancelled.fetch_add(gone.len() as u64, Ordering::Relaxed);
            let mut withdrawn = Vec::new();
            for job in gone {
                if let Job::Execute { task, reply, .. } = job {
                    left_queue(queued_sessions, &task.session_id);
                    let msg = "withdrawn by CANCEL before it was computed";
                    let payload =
                        error_payload(json!("EXECUTE_TASK"), reply.request_id.clone(), ErrorCode::Cancelled, msg);
                    withdrawn.push(reply.request_id.clone());
                    let _ = send(reply, payload);
                }
            }
            let CancelAnswer { reply, withdrawn: mut ids, relays } = answer;
            ids.extend(withdrawn);
            let payload = success_payload("CANCEL", &reply.request_id, json!({ "request_ids": ids, "relays": relays }));
            let _ = send(reply, payload);
            None
        }
        Msg::Closed { conn_id, end_sessions } => {
            if end_sessions {
                owners.closed.push(conn_id);
            }
            let gone = queue.remove(|j| matches!(j, Job::Execute { reply, .. } if reply.conn_id == conn_id));
            stats.queued.fetch_sub(gone.len() as u64, Ordering::Relaxed);
            stats.dropped.fetch_add(gone.len() as u64, Ordering::Relaxed);
            for job in &gone {
                if let Job::Execute { task, .. } = job {
                    left_queue(queued_sessions, &task.session_id);
                }
            }
            if !gone.is_empty() {
                crate::info!("dropped {} queued steps of closed connection {conn_id}", gone.len());
            }
            None
        }
    }
}

/// One step of `session_id` left the queue (taken into a round, or refused): its count drops,
/// and the session is forgotten at zero.
fn left_queue(queued_sessions: &mut HashMap<String, (String, usize)>, session_id: &str) {
    if let Some((_, n)) = queued_sessions.get_mut(session_id) {
        *n -= 1;
        if *n == 0 {
            queued_sessions.remove(session_id);
        }
    }
}

/// Queues `job` with the scheduler, or answers it `BUSY` when its client (or the node) has as
/// many tokens queued as it may. An END_SESSION queues behind its session's queued steps.
fn enqueue(
    queue: &mut Scheduler<Job>,
    queued_sessions: &mut HashMap<String, (String, usize)>,
    mut job: Job,
    stats: &InferStats,
    send: &impl Fn(ReplyTo, Vec<u8>) -> bool,
) {
    match &mut job {
        Job::EndSession { session_id, origin, .. } => {
            if let Some((o, _)) = queued_sessions.get(session_id.as_str()) {
                origin.clone_from(o);
            }
        }
        Job::Execute { task, origin, .. } => {
            let entry = queued_sessions.entry(task.session_id.clone()).or_insert_with(|| (origin.clone(), 0));
            entry.1 += 1;
        }
    }
    let Err((job, why)) = queue.push(job) else { return };
    stats.queued.fetch_sub(1, Ordering::Relaxed);
    let Job::Execute { reply, task, .. } = job else { unreachable!("an END_SESSION always queues") };
    left_queue(queued_sessions, &task.session_id);
    let msg = match why {
        schedule::Refusal::Client(n) => format!(
            "this client has {n} tokens queued on this node (at most --max-sessions-per-client x --ctx-size); \
             retry when its steps are answered"
        ),
        schedule::Refusal::Node(n) => {
            format!("this node has {n} tokens queued (at most --max-sessions x --ctx-size); retry later")
        }
    };
    let payload = error_payload(json!("EXECUTE_TASK"), reply.request_id.clone(), ErrorCode::Busy, &msg);
    let _ = send(reply, payload);
}

/// An `EXECUTE_TASK` taken off the queue.
struct ExecuteJob {
    reply: ReplyTo,
    task: ExecuteTask,
    from: Option<String>,
    origin: String,
    tenure: Tenure,
    shard: ShardFile,
    queued: Instant,
    me: SocketAddr,
    prefix: Option<Prefix>,
    /// The rest of the step's input, computed in a later round (this round computes a part).
    rest: Option<TaskInput>,
}

/// What a step's compute gave.
enum Done {
    /// The answer's result object and the data section its raw tensor is in (see
    /// [`result_json`]).
    Result((Value, Vec<u8>)),
    /// The output of a split step's part (more is to come).
    Part(Output),
}

/// Runs the steps of one shard in as few graphs as the engine can, then answers each, or, when
/// the route goes on, hands the event loop the request frame for the next hop.
fn run_group(
    engine: &mut Result<Engine, crate::engine::EngineError>,
    loaded: &mut HashMap<u32, usize>,
    group: Vec<ExecuteJob>,
    (stats, running, owners): (&InferStats, &Running, &mut Owners),
    relay_ids: &mut u64,
    outlet: &Outlet,
) -> Vec<Job> {
    let mut again = Vec::new();
    let mut outcomes: Vec<Result<Done, (ErrorCode, String)>> = match engine.as_mut() {
        Ok(engine) => {
            let existed: Vec<bool> = group.iter().map(|j| engine.has_session(&j.task.session_id)).collect();
            running.start(group.iter().map(|j| (j.reply.conn_id, j.reply.request_id.clone())).collect());
            let outcomes = execute(engine, loaded, &group, stats);
            running.start(Vec::new());
            // A session is its connection's once a step of it computed for it, or once its
            // first step opened it (even if that step failed).
            for ((j, out), existed) in group.iter().zip(&outcomes).zip(existed) {
                let id = &j.task.session_id;
                if j.tenure != Tenure::Chain && (out.is_ok() || (!existed && engine.has_session(id))) {
                    owners.own(id, j.reply.conn_id, j.tenure, engine);
                }
            }
            outcomes
        }
        Err(e) => group.iter().map(|_| Err((ErrorCode::Internal, e.message.clone()))).collect(),
    };
    // STATUS counts the sessions this group opened before its answers leave: a client asking
    // right after its answer sees its session (the round's `record` comes after every group).
    note_sessions(engine, stats);
    let aborted =
        outcomes.iter().filter(|o| matches!(o, Err((_, m)) if m.contains(crate::engine::ggml::ABORTED))).count();
    if aborted > 0 {
        stats.aborted.fetch_add(1, Ordering::Relaxed);
        crate::info!("stopped a graph of {aborted} steps part-way: every client it was for is gone");
        for o in &mut outcomes {
            if let Err((code, m)) = o
                && m.contains(crate::engine::ggml::ABORTED)
            {
                *code = ErrorCode::Cancelled;
            }
        }
    }
    for (job, outcome) in group.into_iter().zip(outcomes) {
        let ExecuteJob { reply, mut task, from, origin, tenure, me, shard, queued, prefix, rest } = job;
        let payload = match outcome {
            Err((code, msg)) => error_payload(json!("EXECUTE_TASK"), reply.request_id.clone(), code, &msg),
            Ok(Done::Part(out)) => {
                // The rest goes back to the queue, after the part computed now.
                let n = tokens(&task);
                let all = matches!(task.output, TaskOutput::Logits { all: true });
                let output = match out {
                    Output::Hidden { .. } => Some(merged(prefix.as_ref().and_then(|p| p.output.clone()), out)),
                    Output::Logits { .. } if all => Some(merged(prefix.as_ref().and_then(|p| p.output.clone()), out)),
                    Output::Logits { .. } => None,
                };
                let done = prefix.map_or(0, |p| p.tokens) + n;
                task.pos += n as u32;
                task.input = rest.expect("a part has a rest");
                let prefix = Some(Prefix { tokens: done, output });
                again.push(Job::Execute { reply, task, from, origin, tenure, shard, queued, me, prefix });
                continue;
            }
            Ok(Done::Result((mut result, section))) => {
                if let Some(p) = &prefix {
                    task.pos -= p.tokens as u32;
                }
                let hop = json!({"address": me.to_string(), "shard_id": task.shard_id,
                    "timings": result["timings"].take()});
                result.as_object_mut().expect("an object").remove("timings");
                if task.next.is_empty() {
                    result["hops"] = json!([hop]);
                    let header = success_payload("EXECUTE_TASK", &reply.request_id, result);
                    match task.encoding {
                        Encoding::Base64 => header,
                        Encoding::Binary => {
                            let mut payload = Vec::new();
                            binary::encode(&header, &section, &mut payload);
                            payload
                        }
                    }
                } else {
                    *relay_ids += 1;
                    // The answer's bounds, from the request: its output for all its tokens.
                    let rows = prefix.as_ref().map_or(0, |p| p.tokens) + tokens(&task);
                    let (n_vocab, n_embd) = engine
                        .as_ref()
                        .ok()
                        .and_then(|e| e.shard_info(task.shard_id))
                        .map_or((u32::MAX as usize, 0), |(hp, ..)| (hp.n_vocab as usize, hp.n_embd as usize));
                    let hops = task.next.len();
                    let expect = relay::Expect {
                        output: task.output,
                        hops,
                        n_vocab,
                        max_bytes: crate::protocol::answer_limit(task.output, rows, hops, n_vocab, n_embd),
                    };
                    let parts = (result, section);
                    let out = relay_request(&task, from.as_deref(), &origin, parts, hop, reply, *relay_ids, expect);
                    outlet.relay(out);
                    continue;
                }
            }
        };
        outlet.answer(reply, payload);
    }
    again
}

/// `out` after the rows of `prefix` (of the same kind and width): a split step's whole output.
fn merged(prefix: Option<Output>, out: Output) -> Output {
    match (prefix, out) {
        (Some(Output::Hidden { mut data, n_tokens, width }), Output::Hidden { data: more, n_tokens: m, .. }) => {
            data.extend(more);
            Output::Hidden { data, n_tokens: n_tokens + m, width }
        }
        (Some(Output::Logits { mut data, rows, n_vocab }), Output::Logits { data: more, rows: m, .. }) => {
            data.extend(more);
            Output::Logits { data, rows: rows + m, n_vocab }
        }
        (_, out) => out,
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

/// Updates the counters STATUS shows after a round of jobs.
fn record<E>(engine: &Result<Engine, E>, stats: &InferStats, started: Instant) {
    stats.running.store(0, Ordering::Relaxed);
    note_sessions(engine, stats);
    if let Ok(engine) = engine {
        stats.graphs_reused.store(engine.graphs_reused(), Ordering::Relaxed);
    }
    stats.busy_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
}

/// STATUS `inference.sessions` and `kv_bytes` as the engine holds them now.
fn note_sessions<E>(engine: &Result<Engine, E>, stats: &InferStats) {
    if let Ok(engine) = engine {
        let (n, bytes) = engine.sessions();
        stats.sessions.store(n as u64, Ordering::Relaxed);
        stats.kv_bytes.store(bytes, Ordering::Relaxed);
    }
}

/// Runs one shard's tasks (one batch where the engine can): each task's result object (timings,
/// and the output) with the data section its raw tensor is in (see [`result_json`]), or its error.
fn execute(
    engine: &mut Engine,
    loaded: &mut HashMap<u32, usize>,
    group: &[ExecuteJob],
    stats: &InferStats,
) -> Vec<Result<Done, (ErrorCode, String)>> {
    let (shard_id, shard) = (group[0].task.shard_id, &group[0].shard);
    if let Err(e) = unchanged(&shard.file, &shard.map, shard_id) {
        return group.iter().map(|_| Err(e.clone())).collect();
    }
    let key = shard.map.as_ptr() as usize;
    if loaded.get(&shard_id) != Some(&key) || !engine.is_loaded(shard_id) || engine.weights_changed(shard_id) {
        let t = Instant::now();
        if let Err(e) = engine.load_file(shard_id, shard.map.clone(), &shard.path, shard.info_hash.clone()) {
            loaded.remove(&shard_id);
            let msg = format!("shard {shard_id}: {}", e.message);
            return group.iter().map(|_| Err((e.code, msg.clone()))).collect();
        }
        crate::info!(
            "shard {shard_id} ready for inference ({:.1} ms, weights from {:?})",
            t.elapsed().as_secs_f64() * 1e3,
            engine.weights_source(shard_id)
        );
        loaded.insert(shard_id, key);
    }
    let ends_model = engine.shard_info(shard_id).is_some_and(|(hp, _, end)| end == hp.n_layer);
    let inputs: Vec<(Input, Want)> = group
        .iter()
        .map(|j| {
            let input = match &j.task.input {
                TaskInput::Tokens(t) => Input::Tokens(t.clone()),
                TaskInput::Hidden { data, rows, cols } => {
                    Input::Hidden { data: data.clone(), n_tokens: *rows, width: *cols }
                }
            };
            let want = match j.task.output {
                TaskOutput::Hidden => Want::Hidden,
                TaskOutput::Logits { all } => Want::Logits { all },
                TaskOutput::TopK(_) => Want::Logits { all: false },
            };
            (input, want)
        })
        .collect();
    // Steps that can run: a route past the model's last shard is refused before computing.
    let runnable: Vec<usize> = (0..group.len())
        .filter(|&i| !(ends_model && !group[i].task.next.is_empty()) && group[i].task.session_token.is_some())
        .collect();
    let steps: Vec<Step> = runnable
        .iter()
        .map(|&i| Step {
            session_id: &group[i].task.session_id,
            claim: group[i].task.session_token.as_deref().map(|token| Claim { token, origin: &group[i].origin }),
            pos: group[i].task.pos,
            input: &inputs[i].0,
            want: inputs[i].1,
        })
        .collect();
    let t = Instant::now();
    let mut outs = engine.execute_batch(shard_id, &steps).into_iter();
    let compute_ms = t.elapsed().as_secs_f64() * 1e3;
    let batch = steps.len();
    let mut results = Vec::with_capacity(group.len());
    for (i, job) in group.iter().enumerate() {
        if !runnable.contains(&i) {
            results.push(Err(if job.task.session_token.is_none() {
                (ErrorCode::Internal, "no session token could be made".to_string())
            } else {
                (ErrorCode::BadRoute, format!("shard {shard_id} ends the model: no hop can follow it"))
            }));
            continue;
        }
        let out = match outs.next().expect("one output per step") {
            Ok(out) => out,
            Err(e) => {
                results.push(Err((e.code, e.message)));
                continue;
            }
        };
        stats.tokens.fetch_add(inputs[i].0.n_tokens() as u64, Ordering::Relaxed);
        if job.rest.is_some() {
            results.push(Ok(Done::Part(out)));
            continue;
        }
        let queue_ms = t.duration_since(job.queued).as_secs_f64() * 1e3;
        let before = job.prefix.as_ref().map_or(0, |p| p.tokens);
        let all = matches!(job.task.output, TaskOutput::Logits { all: true }) || matches!(out, Output::Hidden { .. });
        let out = if all { merged(job.prefix.as_ref().and_then(|p| p.output.clone()), out) } else { out };
        let n = inputs[i].0.n_tokens() + before;
        // A relayed result always goes raw (the link converts it for a next hop that reads JSON
        // only); an answer as its caller asked.
        let raw = !job.task.next.is_empty() || job.task.encoding == Encoding::Binary;
        let mut section = Vec::new();
        let mut result = result_json(&job.task, out, n, queue_ms, compute_ms, batch, raw.then_some(&mut section));
        result["pos"] = json!(job.task.pos - before as u32);
        results.push(Ok(Done::Result((result, section))));
        stats.tasks.fetch_add(1, Ordering::Relaxed);
    }
    results
}

/// A computed step's result object: its output as the task asked (hidden state, logits or top k)
/// and its timings (`batch`: steps computed in the same round). With `section`, a tensor output
/// goes there as raw bytes (for a binary frame), else into the object as base64.
fn result_json(
    task: &ExecuteTask,
    out: Output,
    n_tokens: usize,
    queue_ms: f64,
    compute_ms: f64,
    batch: usize,
    section: Option<&mut Vec<u8>>,
) -> Value {
    let tensor = |data: &[f32], rows, cols| match section {
        Some(s) => f32_to_raw(data, rows, cols, s),
        None => f32_to_json(data, rows, cols),
    };
    let output = match (out, task.output) {
        (Output::Hidden { data, n_tokens, width }, _) => json!({"hidden": tensor(&data, n_tokens, width)}),
        (Output::Logits { data, n_vocab, .. }, TaskOutput::TopK(k)) => {
            let last = &data[data.len() - n_vocab..];
            let ids = top_k(last, k);
            json!({"top_k": ids.iter().map(|&i| json!({"id": i, "logit": last[i as usize]})).collect::<Vec<_>>()})
        }
        (Output::Logits { data, rows, n_vocab }, _) => json!({"logits": tensor(&data, rows, n_vocab)}),
    };
    let mut result = json!({
        "session_id": &task.session_id,
        "session_token": task.session_token,
        "shard_id": task.shard_id,
        "pos": task.pos,
        "n_tokens": n_tokens,
        "timings": {"queue_ms": queue_ms, "compute_ms": compute_ms, "batch": batch},
    });
    if let (Value::Object(r), Value::Object(o)) = (&mut result, output) {
        r.extend(o);
    }
    result
}

/// The ids of the `k` largest of `logits` (at least one, at most all), largest first, ties to the
/// lower id. A few (greedy decoding asks for 1) are kept in one pass over the logits in a sorted
/// list of `k`; many are selected from every id, as the answer would be the same.
fn top_k(logits: &[f32], k: usize) -> Vec<u32> {
    let k = k.clamp(1, logits.len().max(1)).min(logits.len());
    let better = |a: u32, b: u32| logits[a as usize].total_cmp(&logits[b as usize]).reverse().then(a.cmp(&b));
    if k == 1 {
        // Greedy decoding: the first id of the largest value in `total_cmp`'s order, compared
        // as the integers that order is defined by (one pass the compiler can unroll).
        let key = |v: f32| {
            let b = v.to_bits() as i32;
            b ^ (((b >> 31) as u32) >> 1) as i32
        };
        let (mut best, mut best_key) = (0usize, key(logits[0]));
        for (i, &v) in logits.iter().enumerate().skip(1) {
            let k = key(v);
            if k > best_key {
                (best, best_key) = (i, k);
            }
        }
        return vec![best as u32];
    }
    if k <= 32 {
        let mut best: Vec<u32> = Vec::with_capacity(k + 1);
        for (i, &v) in logits.iter().enumerate() {
            // Ids come in ascending order, so a tie with the worst kept one never displaces it.
            if best.len() == k && v.total_cmp(&logits[best[k - 1] as usize]).is_le() {
                continue;
            }
            let at = best.partition_point(|&b| better(b, i as u32).is_lt());
            best.insert(at, i as u32);
            best.truncate(k);
        }
        return best;
    }
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.select_nth_unstable_by(k - 1, |&a, &b| better(a, b));
    ids.truncate(k);
    ids.sort_by(|&a, &b| better(a, b));
    ids
}

/// The request that carries this hop's result to `task.next[0]` with the rest of the route (same
/// session, position, output and `from`), as the frame the event loop's relay sends: a binary
/// frame (`result` holds its hidden state as a raw tensor in `section`), asking for a binary
/// answer; the link sends it as JSON to a next hop that has not shown it reads binary frames.
#[allow(clippy::too_many_arguments)]
fn relay_request(
    task: &ExecuteTask,
    from: Option<&str>,
    origin: &str,
    (mut result, section): (Value, Vec<u8>),
    hop: Value,
    reply: ReplyTo,
    id: u64,
    expect: relay::Expect,
) -> relay::Outgoing {
    let next = task.next[0].clone();
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
        // Shorter than our own wait: the hop nearest a silent host reports it.
        "hop_timeout_ms": crate::protocol::next_hop_timeout_ms(task.hop_timeout_ms),
        "session_token": task.session_token,
        "origin": origin,
        "encoding_format": "binary",
    });
    if k > 0 {
        params["k"] = json!(k);
    }
    let header = request_payload("EXECUTE_TASK", &json!(id), from.unwrap_or("relay"), params);
    let mut payload = Vec::with_capacity(binary::PREFIX_LEN + header.len() + section.len());
    binary::encode(&header, &section, &mut payload);
    let origin = origin.to_string();
    relay::Outgoing {
        reply,
        origin,
        next,
        id,
        payload,
        hop,
        timeout: Duration::from_millis(task.hop_timeout_ms),
        encoding: task.encoding,
        expect,
    }
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

#[cfg(test)]
mod tests {
    use super::{PREFILL_GRANULE, prefill_part, top_k};

    /// Every way a prefill step is cut, round after round, whatever the budgets (the load): parts
    /// are multiples of the granule, each at least one, and together exactly the step.
    #[test]
    fn a_prefill_is_cut_only_at_multiples_of_the_granule_into_parts_of_at_least_one() {
        let g = PREFILL_GRANULE;
        for n in 2..1200 {
            for left in 0..=600 {
                let part = prefill_part(n, left);
                assert!(part <= left && part % g == 0, "n {n}, left {left}: part {part}");
                assert!(part == 0 || n - part >= g, "n {n}, left {left}: rest {}", n - part);
                assert_eq!(part == 0, left < g || n < 2 * g, "n {n}, left {left}: part {part}");
            }
        }
        // Rounds with budgets the measured rate might give (one granule .. 512): the rests.
        let mut x = 0x9e3779b97f4a7c15u64;
        for n in [128, 129, 191, 1000, 2000, 4095] {
            let (mut rest, mut parts) = (n, Vec::new());
            while rest > 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let budget = g + (x % 449) as usize;
                let part = match prefill_part(rest, budget) {
                    0 => rest, // not cut: computed whole (share_prefill, first in its round)
                    p => p,
                };
                parts.push(part);
                rest -= part;
            }
            assert_eq!(parts.iter().sum::<usize>(), n);
            assert!(parts.iter().all(|&p| p >= g), "{n}: {parts:?}");
            assert!(parts[..parts.len() - 1].iter().all(|&p| p % g == 0), "{n}: {parts:?}");
        }
    }

    /// Every id by logit, largest first, ties to the lower id: what `top_k` must agree with.
    fn sorted(logits: &[f32]) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        ids
    }

    #[test]
    fn top_k_agrees_with_a_full_sort_with_ties_and_negatives() {
        let mut x = 0x9e3779b97f4a7c15u64;
        // Few distinct values, so ties are everywhere; -0.0 beside 0.0 (total order: -0 < 0).
        let logits: Vec<f32> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x % 41) as f32 - 20.0) * 0.5
            })
            .chain([-0.0, 0.0, f32::NEG_INFINITY, 10.0, 10.0])
            .collect();
        let all = sorted(&logits);
        for k in [1, 2, 5, 31, 32, 33, 100, 1000, logits.len()] {
            assert_eq!(top_k(&logits, k), all[..k], "k = {k}");
        }
        assert_eq!(top_k(&logits, logits.len() + 7), all, "k past the vocabulary: every id");
        assert_eq!(top_k(&[3.0], 1), vec![0]);
    }
}
