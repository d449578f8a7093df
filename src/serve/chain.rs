//! The chain side of `shardctl serve`: a placement thread that owns the [`Coordinator`]
//! (discovery, placement, loads, recovery) and `--parallel` slot threads that run queued requests
//! on the chain, up to that many at once, each its own session on the nodes (whose inference
//! threads batch the sessions' steps, and whose relays keep every node busy with some stream's
//! step). Connection threads hand [`Job`]s to the slots on a bounded FIFO channel and read each
//! job's tokens back on a channel of their own; a job whose client went away stops at its next
//! token and its session is ended on every node. The model the chain serves is published as a
//! [`ModelView`] for the connection threads (tokenizing and checking requests, `/v1/models`,
//! `/health`), which never wait on these threads.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

use super::metrics::Metrics;
use super::openai::StopMatcher;
use crate::chat::{ChatError, ChatTemplate};
use crate::coordinator::{ClusterConfig, Coordinator, Event, Finish, Fork, GenRequest, Summary};
use crate::engine::tokenizer::Tokenizer;

/// What the connection threads need to know of the model the chain serves.
pub struct ModelView {
    /// The id `/v1/models` lists and requests name (`--model-name`, else `general.name`, else
    /// the model id).
    pub name: String,
    /// `shard.model_id`: requests may name the model by it too.
    pub model_id: String,
    pub tokenizer: Tokenizer,
    /// The nodes' context in tokens.
    pub ctx_size: u32,
    /// The chat template (`--chat-template FILE`, else the GGUF's `tokenizer.chat_template`), or
    /// why there is none.
    pub chat_template: Result<ChatTemplate, ChatError>,
}

/// Whether the chain can serve: `Ready`, or why not.
#[derive(Clone, Debug, PartialEq)]
pub enum Health {
    Starting,
    Ready,
    Unavailable(String),
}

/// State the chain thread publishes and the connection threads read.
pub struct ChainState {
    pub model: RwLock<Option<Arc<ModelView>>>,
    pub health: Mutex<Health>,
}

impl ChainState {
    pub fn model(&self) -> Option<Arc<ModelView>> {
        self.model.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn health(&self) -> Health {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, model: Option<Arc<ModelView>>, health: Health) {
        *self.model.write().unwrap_or_else(|p| p.into_inner()) = model;
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = health;
    }
}

/// One request for the chain.
pub struct Job {
    pub request: GenRequest,
    /// Stop strings: generation ends at the first, which is not sent.
    pub stop: Vec<String>,
    /// Tokens (as text, stop strings held back and cut) and the end, in order.
    pub events: Sender<ChainEvent>,
    /// Set by the connection thread when its client went away.
    pub cancel: Arc<AtomicBool>,
}

pub enum ChainEvent {
    /// The chain started this job (it left the queue).
    Started,
    /// Text to send; may be empty (a token that completes no character yet).
    Text(String),
    /// The generation ended: its figures and OpenAI's `finish_reason` (`stop` or `length`).
    Done(Summary, &'static str),
    /// The chain could not serve the job (503).
    Failed(String),
}

/// How often discovery is retried while the cluster cannot serve.
const REDISCOVER_EVERY: Duration = Duration::from_secs(2);

/// What a slot asks the placement thread.
enum Ask {
    /// The chain to run the next job on; `have`: the epoch of the slot's current fork.
    Route { have: Option<u64>, reply: Sender<Route> },
    /// A hop of the chain of `epoch` failed: replace `node` unless that was done already, and
    /// answer the chain to continue on (its epoch and plan).
    Recover { node: SocketAddr, why: String, epoch: u64, reply: Sender<Result<(u64, Vec<SocketAddr>), String>> },
    /// A generation failed past recovery on the chain of `epoch`: find the cluster again.
    Failed { epoch: u64, why: String },
}

enum Route {
    /// The slot's fork is current.
    Same,
    /// A new chain (its epoch) to fork.
    New(u64, Box<Fork>),
    /// The cluster cannot serve: why.
    Unavailable(String),
}

/// Runs the placement thread and `parallel` slot threads until `jobs` disconnects.
///
/// The placement thread owns the [`Coordinator`]: discovery, placement, loads and recovery,
/// one at a time. Each slot takes jobs from the shared queue and runs them on a fork of it
/// ([`Coordinator::from_fork`]: the current chain, connections of its own), so up to `parallel`
/// generations run at once, each its own session on every node. Every change of the chain
/// (placed, a shard moved, the cluster lost) starts a new epoch; a slot whose hop fails asks the
/// placement thread to recover, which moves shards only when the slot's epoch is still current,
/// so slots failing on the same chain wait for one recovery and continue on its new chain.
pub fn run(
    cluster: ClusterConfig,
    model_name: Option<String>,
    chat_template_override: Option<String>,
    state: Arc<ChainState>,
    metrics: Arc<Metrics>,
    jobs: Receiver<Job>,
    parallel: usize,
) {
    let (asks_tx, asks) = crossbeam_channel::unbounded();
    for i in 0..parallel.max(1) {
        let (jobs, asks_tx, metrics) = (jobs.clone(), asks_tx.clone(), metrics.clone());
        let spawned = std::thread::Builder::new().name(format!("slot-{i}")).spawn(move || slot(jobs, asks_tx, metrics));
        if let Err(e) = spawned {
            crate::warn!("could not start slot {i}: {e}");
        }
    }
    // The slots hold the only senders: when they have all returned, so does this thread.
    drop((asks_tx, jobs));
    let mut coordinator: Option<Coordinator<'static>> = None;
    let mut epoch = 0u64;
    let mut last_try: Option<Instant> = None;
    loop {
        if coordinator.is_none() && last_try.is_none_or(|t| t.elapsed() >= REDISCOVER_EVERY) {
            last_try = Some(Instant::now());
            match connect(&cluster) {
                Ok(c) => {
                    let chat_template = match &chat_template_override {
                        Some(source) => ChatTemplate::for_tokenizer(source, c.tokenizer()),
                        None => c.chat_template(),
                    };
                    if let Err(e) = &chat_template {
                        crate::warn!("no chat completions: {e}");
                    }
                    let view = ModelView {
                        name: model_name.clone().unwrap_or_else(|| c.model_name().to_string()),
                        model_id: c.model_id().to_string(),
                        tokenizer: c.tokenizer().clone(),
                        ctx_size: c.ctx_size(),
                        chat_template,
                    };
                    crate::info!("serving {} over {} shards: {:?}", view.name, c.plan().len(), c.plan());
                    if let Some(quota) = c.sessions_per_client().filter(|&q| q < parallel) {
                        crate::warn!(
                            "--parallel {parallel} is above the {quota} sessions a node of the chain keeps for one \
                             client (its --max-sessions-per-client): generations past {quota} evict each other's \
                             sessions; start the nodes with --max-sessions-per-client {parallel} or more"
                        );
                    }
                    state.set(Some(Arc::new(view)), Health::Ready);
                    coordinator = Some(c);
                    epoch += 1;
                }
                Err(e) => {
                    crate::warn!("the cluster cannot serve: {e:#}");
                    state.set(None, Health::Unavailable(format!("{e:#}")));
                }
            }
        }
        let ask = match asks.recv_timeout(REDISCOVER_EVERY) {
            Ok(ask) => ask,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let unavailable = |state: &ChainState| match state.health() {
            Health::Unavailable(e) => e,
            _ => "the cluster is not ready".into(),
        };
        match ask {
            Ask::Route { have, reply } => {
                let route = match &coordinator {
                    None => Route::Unavailable(unavailable(&state)),
                    Some(_) if have == Some(epoch) => Route::Same,
                    Some(c) => Route::New(epoch, Box::new(c.fork())),
                };
                let _ = reply.send(route);
            }
            Ask::Recover { node, why, epoch: seen, reply } => {
                if seen == epoch
                    && let Some(c) = coordinator.as_mut()
                {
                    epoch += 1;
                    if let Err(e) = c.recover(node, &why) {
                        crate::warn!("the chain could not be recovered: {e:#}");
                        state.set(None, Health::Unavailable(format!("{e:#}")));
                        coordinator = None;
                        last_try = None;
                    }
                }
                let answer = match &coordinator {
                    Some(c) => Ok((epoch, c.plan().to_vec())),
                    None => Err(unavailable(&state)),
                };
                let _ = reply.send(answer);
            }
            Ask::Failed { epoch: seen, why } => {
                if seen == epoch && coordinator.is_some() {
                    // The chain could not be kept (nodes gone past recovery): find the cluster again.
                    state.set(None, Health::Unavailable(why));
                    coordinator = None;
                    last_try = None;
                    epoch += 1;
                }
            }
        }
    }
}

/// One slot: runs jobs from the queue, one at a time, on its fork of the current chain.
fn slot(jobs: Receiver<Job>, asks: Sender<Ask>, metrics: Arc<Metrics>) {
    // The epoch of the chain `mine` runs on; its recovery updates it.
    let epoch = Rc::new(Cell::new(0u64));
    let mut mine: Option<Coordinator<'static>> = None;
    while let Ok(job) = jobs.recv() {
        metrics.queued(-1);
        if job.cancel.load(Ordering::Relaxed) {
            metrics.disconnect();
            continue;
        }
        let (reply, route) = bounded(1);
        if asks.send(Ask::Route { have: mine.is_some().then(|| epoch.get()), reply }).is_err() {
            return;
        }
        match route.recv() {
            Ok(Route::Same) => {}
            Ok(Route::New(e, fork)) => {
                epoch.set(e);
                let (asks, epoch) = (asks.clone(), epoch.clone());
                mine = Some(Coordinator::from_fork(*fork, move |node, why| {
                    let (reply, answer) = bounded(1);
                    let ask = Ask::Recover { node, why: why.to_string(), epoch: epoch.get(), reply };
                    asks.send(ask).map_err(|_| anyhow!("the placement thread is gone"))?;
                    let (e, plan) = answer
                        .recv()
                        .map_err(|_| anyhow!("the placement thread is gone"))?
                        .map_err(|e| anyhow!("the chain could not be recovered: {e}"))?;
                    epoch.set(e);
                    Ok(plan)
                }));
            }
            Ok(Route::Unavailable(why)) => {
                mine = None;
                let _ = job.events.send(ChainEvent::Failed(why));
                continue;
            }
            Err(_) => return,
        }
        let c = mine.as_mut().expect("a route was given");
        if job.events.send(ChainEvent::Started).is_err() {
            metrics.disconnect();
            continue;
        }
        metrics.session(1);
        let outcome = serve(c, &job);
        metrics.session(-1);
        match outcome {
            Ok((summary, reason)) => {
                if summary.finish == Finish::Stopped && reason.is_none() {
                    metrics.disconnect();
                    crate::info!(
                        "session {}: the client went away after {} tokens",
                        summary.session,
                        summary.tokens.len()
                    );
                    continue;
                }
                let decode_tps = (summary.tokens.len() > 1 && summary.decode_ms > 0.0)
                    .then(|| (summary.tokens.len() - 1) as f64 * 1e3 / summary.decode_ms);
                metrics.generation(
                    summary.prompt_tokens.len(),
                    summary.tokens.len(),
                    summary.ttft_ms / 1e3,
                    decode_tps,
                    &summary.hop_compute_ms,
                    summary.overhead_per_hop_us,
                );
                let reason = reason.unwrap_or(if summary.finish == Finish::Length { "length" } else { "stop" });
                let _ = job.events.send(ChainEvent::Done(summary, reason));
            }
            Err(e) => {
                crate::warn!("a request failed on the chain: {e:#}");
                let _ = job.events.send(ChainEvent::Failed(format!("{e:#}")));
                let _ = asks.send(Ask::Failed { epoch: epoch.get(), why: format!("{e:#}") });
                mine = None;
            }
        }
    }
}

/// Discovery and placement: a chain ready to serve.
fn connect(cluster: &ClusterConfig) -> anyhow::Result<Coordinator<'static>> {
    let mut c = Coordinator::discover(cluster.clone(), log_event)?;
    c.place_all()?;
    Ok(c)
}

fn log_event(ev: Event) {
    match ev {
        Event::Nodes(n) => crate::info!("cluster nodes: {n:?}"),
        Event::Plan(p) => crate::info!("chain: {p:?}"),
        Event::Loading { .. } => {}
        Event::Loaded { shard, node, source, ms } => {
            crate::info!("shard {shard} loaded on {node} ({source}, {ms:.0} ms)")
        }
        Event::Recovering { shard, from, to, why } => {
            crate::warn!("shard {shard} moved from {from} to {to} ({why}); replaying the session")
        }
    }
}

/// Runs one job: its summary, and `Some("stop")` when a stop string ended it.
fn serve(c: &mut Coordinator<'static>, job: &Job) -> anyhow::Result<(Summary, Option<&'static str>)> {
    let mut stops = StopMatcher::new(job.stop.clone());
    let mut stopped = false;
    // A step waiting on the chain is given up as soon as the client goes away (the connection
    // thread sets the flag), so a node that drips its answer cannot hold this slot for a client
    // that left.
    c.set_cancel(Some(job.cancel.clone()));
    let summary = c.generate(&job.request, |_, piece| {
        if job.cancel.load(Ordering::Relaxed) {
            return false;
        }
        let (text, hit) = stops.push(piece);
        if job.events.send(ChainEvent::Text(text)).is_err() {
            return false;
        }
        stopped = hit;
        !hit
    });
    c.set_cancel(None);
    let summary = summary?;
    if !stopped && summary.finish != Finish::Stopped {
        let tail = stops.finish();
        if !tail.is_empty() {
            let _ = job.events.send(ChainEvent::Text(tail));
        }
    }
    Ok((summary, stopped.then_some("stop")))
}
