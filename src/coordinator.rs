//! The coordinator behind `shardctl infer` and `shardctl serve`: finds a cluster's nodes, picks
//! one node per shard, makes them load their shards (downloading through the swarm where they lack
//! them), then runs each request's prompt and generated tokens down the chain with one
//! `EXECUTE_TASK` per step (each node forwards to the next itself), sampling and streaming text
//! here. One `Coordinator` keeps its chain across requests: every request is a session of its own,
//! ended on every node (`END_SESSION`) however the request ends. When a hop fails it moves that
//! shard to another node and replays the session there, so the text is what an uninterrupted run
//! would have written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::chat::{ChatError, ChatTemplate};
use crate::client::{Bounds, Cancelled, Client, into_result};
use crate::engine::generate::TextStream;
use crate::engine::sampler::{Sampler, SamplerConfig};
use crate::engine::tokenizer::Tokenizer;
use crate::protocol::{MAX_TOP_K, TaskOutput};

/// How to reach the cluster and how long to wait on it: fixed for a coordinator's life.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub bootstrap: String,
    pub cluster: String,
    /// Prompt tokens per EXECUTE_TASK.
    pub batch: usize,
    /// Bound on each request to a node, its whole answer included (loads wait longer:
    /// `load_timeout`). A chain step not answered whole by then is the first node's failure.
    pub timeout: Duration,
    pub load_timeout: Duration,
    /// How many hop failures one request may recover from before giving up.
    pub max_recoveries: usize,
    /// The SHA-256 of the model's `manifest.json`: shards are loaded by its info hashes only.
    pub model_pin: Option<[u8; 32]>,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            bootstrap: "127.0.0.1:51820".into(),
            cluster: "shardnet".into(),
            batch: 128,
            timeout: Duration::from_secs(60),
            load_timeout: Duration::from_secs(600),
            max_recoveries: 3,
            model_pin: None,
        }
    }
}

/// One generation: the prompt as token ids (the caller tokenizes, so it can count and check
/// them), and how to sample.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    /// At most this many new tokens.
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    /// Stop at the model's end-of-generation tokens (EOS, end of turn).
    pub stop_at_eog: bool,
    /// Session id; random when `None`.
    pub session: Option<String>,
    /// Pause between generated tokens (demos).
    pub pace: Duration,
}

impl Default for GenRequest {
    fn default() -> GenRequest {
        GenRequest {
            prompt: Vec::new(),
            max_tokens: 32,
            sampling: SamplerConfig::default(),
            stop_at_eog: true,
            session: None,
            pace: Duration::ZERO,
        }
    }
}

/// Why a generation ended (OpenAI's `finish_reason`: `stop` for the first two, `length`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token was sampled.
    #[default]
    EndOfGeneration,
    /// The caller's token callback asked to stop (a stop string, or the client went away).
    Stopped,
    /// `max_tokens` were generated.
    Length,
}

/// What the coordinator tells its user as it goes (`shardctl` prints these on stderr).
pub enum Event<'a> {
    Nodes(&'a [SocketAddr]),
    Plan(&'a [SocketAddr]),
    Loading { shard: u32, node: SocketAddr, percent: f64, rate: f64, peers: u64 },
    Loaded { shard: u32, node: SocketAddr, source: &'a str, ms: f64 },
    Recovering { shard: u32, from: SocketAddr, to: SocketAddr, why: &'a str },
}

/// The run's figures.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub session: String,
    pub plan: Vec<SocketAddr>,
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub load_ms: f64,
    pub ttft_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub recoveries: usize,
    pub finish: Finish,
    /// Per shard: median compute ms per decode step, and the median round trip the hop waited on
    /// the rest of the chain.
    pub hop_compute_ms: Vec<f64>,
    /// Median time of a decode step seen by the coordinator, less the hops' compute (their engine
    /// calls), over the hops: the chain's own cost (serialization, sockets, relays, thread
    /// hand-offs), plus what each hop does outside its engine call that one process does too
    /// (the last hop's pick of the best logits). `make bench` reports it as
    /// `chain_overhead_per_hop_us`, beside the pipeline's cost over one process.
    pub overhead_per_hop_us: f64,
}

impl Summary {
    pub fn to_json(&self) -> Value {
        let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
        json!({
            "session": self.session,
            "plan": self.plan.iter().enumerate().map(|(s, a)| json!({"shard_id": s, "address": a.to_string()})).collect::<Vec<_>>(),
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "text": self.text,
            "load_ms": self.load_ms,
            "ttft_ms": self.ttft_ms,
            "prefill_ms": self.prefill_ms,
            "prefill_tps": per_s(self.prompt_tokens.len(), self.prefill_ms),
            "decode_ms": self.decode_ms,
            "decode_tps": per_s(self.tokens.len().saturating_sub(1), self.decode_ms),
            "recoveries": self.recoveries,
            "hop_compute_ms": self.hop_compute_ms,
            "overhead_per_hop_us": self.overhead_per_hop_us,
        })
    }
}

/// A step that failed: recoverable ones name the node to replace.
enum StepError {
    Node(SocketAddr, String),
    Fatal(anyhow::Error),
    /// The generation's cancel flag was set ([`Coordinator::set_cancel`]).
    Cancelled,
}

/// How long ending a session on a node may take: it is best effort, and a node that answers
/// slowly must not hold a finished (or abandoned) generation's slot for the whole timeout.
const END_SESSION_WITHIN: Duration = Duration::from_secs(5);

/// Whether `e` is (or wraps) [`Cancelled`].
fn is_cancelled(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Cancelled>().is_some())
}

struct NodeView {
    addr: SocketAddr,
    loaded: HashSet<u32>,
    files: HashSet<u32>,
    /// The info hash of each complete shard file it holds (`LIST_FILES`).
    hashes: HashMap<u32, String>,
    /// Its `--max-sessions-per-client` (`STATUS.limits`), when shown.
    sessions_per_client: Option<usize>,
}

pub struct Coordinator<'e> {
    cfg: ClusterConfig,
    from: String,
    /// Owns this run's sessions on every node: sent with every EXECUTE_TASK and END_SESSION.
    session_token: String,
    /// The pinned manifest, checked against `cfg.model_pin`.
    manifest: Option<crate::gguf::manifest::Manifest>,
    nodes: Vec<NodeView>,
    dead: HashSet<SocketAddr>,
    conns: HashMap<SocketAddr, Client>,
    plan: Vec<SocketAddr>,
    shard_count: u32,
    ctx_size: u32,
    n_vocab: usize,
    model_id: String,
    model_name: Option<String>,
    tokenizer: Tokenizer,
    /// `MODEL_INFO`'s `tokenizer` object: the tokenizer's keys and the chat template.
    tokenizer_meta: serde_json::Map<String, Value>,
    events: Box<dyn FnMut(Event) + 'e>,
    /// A fork's way to recover ([`Coordinator::from_fork`]): asks the coordinator that owns the
    /// placement to replace a failed node and answers the chain to use now.
    recovery: Option<Box<RecoverFn<'e>>>,
    /// Set when the generation's client went away: the step waiting on the chain is given up.
    cancel: Option<Arc<AtomicBool>>,
}

/// Asked with the failed node and why; answers the plan to use now, or why there is none.
pub type RecoverFn<'e> = dyn FnMut(SocketAddr, &str) -> Result<Vec<SocketAddr>> + 'e;

/// What a fork of a [`Coordinator`] needs to run generations on the chain placed by its owner:
/// plain data, sent to the thread that runs the fork.
#[derive(Clone)]
pub struct Fork {
    cfg: ClusterConfig,
    from: String,
    session_token: String,
    plan: Vec<SocketAddr>,
    shard_count: u32,
    ctx_size: u32,
    n_vocab: usize,
    model_id: String,
    model_name: Option<String>,
    tokenizer: Tokenizer,
    tokenizer_meta: serde_json::Map<String, Value>,
}

/// The largest vocabulary a coordinator takes from `MODEL_INFO` (it allocates one float per
/// token for every step's logits): ten times today's largest (Gemma's 262,144).
const MAX_VOCAB: u64 = 1 << 22;

/// Holders of a shard named to a node that loads it (`LOAD_SHARD`'s `peers`).
const HOLDERS_GIVEN: usize = 8;

/// `n` (at most 20) random bytes in hex.
fn random_hex(n: usize) -> String {
    crate::hash::to_hex(&crate::node::random_id()[..n.min(20)])
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl<'e> Coordinator<'e> {
    /// Finds the cluster's nodes and the model they serve.
    pub fn discover(cfg: ClusterConfig, events: impl FnMut(Event) + 'e) -> Result<Coordinator<'e>> {
        let mut boot = Client::connect(&cfg.bootstrap, cfg.timeout).context("the bootstrap node")?;
        let key = crate::hash::to_hex(&crate::node::cluster_key(&cfg.cluster).0);
        let mut addrs: Vec<SocketAddr> = Vec::new();
        // The DHT knows the cluster's members; the bootstrap node is one even if it has not announced.
        let boot_status = boot.call("STATUS", json!({}))?;
        let manifest = match &cfg.model_pin {
            None => None,
            Some(pin) => {
                let hex = crate::hash::to_hex(pin);
                let r = boot.call("GET_MANIFEST", json!({"hash": hex})).context("the pinned manifest")?;
                let text = r["manifest"].as_str().ok_or_else(|| anyhow!("GET_MANIFEST answered no manifest"))?;
                let m = crate::gguf::manifest::Manifest::parse_pinned(text.as_bytes(), pin)
                    .map_err(|e| anyhow!("the bootstrap node's manifest: {e}"))?;
                Some(m)
            }
        };
        if let Ok(found) = boot.call("FIND_PEERS", json!({"key": key})) {
            for p in found["peers"].as_array().into_iter().flatten() {
                if let Some(a) = p.as_str().and_then(|s| s.parse().ok()) {
                    addrs.push(a);
                }
            }
        }
        let boot_addr: SocketAddr = boot.peer_addr()?;
        if boot_status["cluster"].as_str() == Some(cfg.cluster.as_str()) && !addrs.contains(&boot_addr) {
            addrs.insert(0, boot_addr);
        }
        let mut nodes = Vec::new();
        let mut last_error = None;
        for addr in addrs {
            let mut c = match Client::connect(&addr.to_string(), cfg.timeout) {
                Ok(c) => c,
                Err(e) => {
                    last_error = Some(format!("{e:#}"));
                    continue;
                }
            };
            let (status, list) = match (c.call("STATUS", json!({})), c.call("LIST_FILES", json!({}))) {
                (Ok(s), Ok(l)) => (s, l),
                (Err(e), _) | (_, Err(e)) => {
                    last_error = Some(format!("{addr}: {e:#}"));
                    continue;
                }
            };
            if status["cluster"].as_str() != Some(cfg.cluster.as_str()) {
                continue;
            }
            let loaded = status["shards_loaded"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["shard_id"].as_u64().map(|v| v as u32))
                .collect();
            let complete: Vec<&Value> = list["files"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|f| f["complete"] != json!(false) && f.get("error").is_none())
                .collect();
            let files = complete.iter().filter_map(|f| f["shard_id"].as_u64().map(|v| v as u32)).collect();
            let hashes = complete
                .iter()
                .filter(|f| f.get("mismatch").is_none_or(|m| *m == json!(false)))
                .filter_map(|f| Some((f["shard_id"].as_u64()? as u32, f["info_hash"].as_str()?.to_string())))
                .collect();
            let sessions_per_client = status["limits"]["max_sessions_per_client"].as_u64().map(|n| n as usize);
            nodes.push(NodeView { addr, loaded, files, hashes, sessions_per_client });
        }
        if nodes.is_empty() {
            bail!(
                "no node of cluster {:?} answered (bootstrap {}){}",
                cfg.cluster,
                cfg.bootstrap,
                last_error.map(|e| format!("; last error: {e}")).unwrap_or_default()
            );
        }
        // The model's shape and tokenizer, from a node that has a shard file.
        let mut info = None;
        for n in nodes.iter().filter(|n| !n.files.is_empty()) {
            if let Ok(v) =
                Client::connect(&n.addr.to_string(), cfg.timeout).and_then(|mut c| c.call("MODEL_INFO", json!({})))
            {
                info = Some(v);
                break;
            }
        }
        let info = info.ok_or_else(|| anyhow!("no node of cluster {:?} has a shard of the model", cfg.cluster))?;
        let tokenizer_meta =
            info["tokenizer"].as_object().cloned().ok_or_else(|| anyhow!("MODEL_INFO carries no tokenizer"))?;
        let tokenizer = Tokenizer::from_source(&tokenizer_meta).map_err(|e| anyhow!("the model's tokenizer: {e}"))?;
        let shard_count = info["shard_count"].as_u64().filter(|&c| c > 0 && c <= 4096).context("shard_count")? as u32;
        let ctx_size = match info["ctx_size"].as_u64() {
            Some(c) if c > 0 && c <= u32::MAX as u64 => c as u32,
            _ => bail!("MODEL_INFO's ctx_size {} is not a context of 1 to {} tokens", info["ctx_size"], u32::MAX),
        };
        let n_vocab = match info["vocab_size"].as_u64() {
            Some(n) if n > 0 && n <= MAX_VOCAB => n as usize,
            _ => bail!("MODEL_INFO's vocab_size {} is not 1 to {MAX_VOCAB} tokens", info["vocab_size"]),
        };
        if let Some(m) = &manifest
            && (info["model_id"].as_str() != Some(m.model_id.as_str()) || m.shards.len() != shard_count as usize)
        {
            bail!(
                "the cluster serves model {} in {shard_count} shards, the pinned manifest names {} in {}",
                info["model_id"],
                m.model_id,
                m.shards.len()
            );
        }
        let session_token = crate::protocol::auth::random_bytes::<16>()
            .map(|b| crate::hash::to_hex(&b))
            .context("reading /dev/urandom for the session token")?;
        let model_id = info["model_id"].as_str().unwrap_or("shardnet").to_string();
        let model_name = info["name"].as_str().filter(|n| !n.is_empty()).map(str::to_string);
        let from = format!("coordinator-{}", random_hex(6));
        let mut me = Coordinator {
            cfg,
            from,
            session_token,
            manifest,
            nodes,
            dead: HashSet::new(),
            conns: HashMap::new(),
            plan: Vec::new(),
            shard_count,
            ctx_size,
            n_vocab,
            model_id,
            model_name,
            tokenizer,
            tokenizer_meta,
            events: Box::new(events),
            recovery: None,
            cancel: None,
        };
        let addrs: Vec<SocketAddr> = me.nodes.iter().map(|n| n.addr).collect();
        (me.events)(Event::Nodes(&addrs));
        Ok(me)
    }

    /// A copy of what generations need, for [`Coordinator::from_fork`]; the plan must be placed
    /// ([`Coordinator::place_all`]).
    pub fn fork(&self) -> Fork {
        Fork {
            cfg: self.cfg.clone(),
            from: self.from.clone(),
            session_token: self.session_token.clone(),
            plan: self.plan.clone(),
            shard_count: self.shard_count,
            ctx_size: self.ctx_size,
            n_vocab: self.n_vocab,
            model_id: self.model_id.clone(),
            model_name: self.model_name.clone(),
            tokenizer: self.tokenizer.clone(),
            tokenizer_meta: self.tokenizer_meta.clone(),
        }
    }

    /// A coordinator that runs generations on a placed chain with connections of its own (so
    /// several run at once, each a session on the nodes under the owner's session token), and
    /// never places shards itself: when a hop fails it calls `recover` with the node and why,
    /// and continues on the plan it answers (replaying the session there).
    pub fn from_fork(
        f: Fork,
        recover: impl FnMut(SocketAddr, &str) -> Result<Vec<SocketAddr>> + 'e,
    ) -> Coordinator<'e> {
        Coordinator {
            cfg: f.cfg,
            from: f.from,
            session_token: f.session_token,
            manifest: None,
            nodes: Vec::new(),
            dead: HashSet::new(),
            conns: HashMap::new(),
            plan: f.plan,
            shard_count: f.shard_count,
            ctx_size: f.ctx_size,
            n_vocab: f.n_vocab,
            model_id: f.model_id,
            model_name: f.model_name,
            tokenizer: f.tokenizer,
            tokenizer_meta: f.tokenizer_meta,
            events: Box::new(|_| {}),
            recovery: Some(Box::new(recover)),
            cancel: None,
        }
    }

    /// Moves the shards of `node` (failed: `why`) to other nodes and loads them there; errors
    /// when no node can take one.
    pub fn recover(&mut self, node: SocketAddr, why: &str) -> Result<()> {
        self.dead.insert(node);
        self.conns.remove(&node);
        let moved: Vec<u32> = (0..self.shard_count).filter(|&s| self.plan[s as usize] == node).collect();
        self.place(Some(&moved)).with_context(|| format!("recovering from {node}: {why}"))?;
        for &s in &moved {
            let to = self.plan[s as usize];
            (self.events)(Event::Recovering { shard: s, from: node, to, why });
        }
        Ok(())
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The nodes' context size in tokens (prompt and generated tokens together).
    pub fn ctx_size(&self) -> u32 {
        self.ctx_size
    }

    /// Gives up the step waiting on the chain, and the generation, as soon as `flag` is set (the
    /// client the generation is for went away); `None`: never. [`Coordinator::generate`] then
    /// ends with `Finish::Stopped`.
    pub fn set_cancel(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.cancel = flag;
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// The model's id (`shard.model_id` of its shards).
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The model's `general.name`, else its id.
    pub fn model_name(&self) -> &str {
        self.model_name.as_deref().unwrap_or(&self.model_id)
    }

    /// The fewest sessions one client may hold on a node of the plan (their
    /// `--max-sessions-per-client`), when the nodes show it: every generation this coordinator runs
    /// at once is a session on each of them, all counted as one client (one address).
    pub fn sessions_per_client(&self) -> Option<usize> {
        let on_plan = |n: &&NodeView| self.plan.contains(&n.addr);
        self.nodes.iter().filter(on_plan).filter_map(|n| n.sessions_per_client).min()
    }

    /// The node serving each shard, in order; empty before `place_all`.
    pub fn plan(&self) -> &[SocketAddr] {
        &self.plan
    }

    /// Places and loads every shard unless a plan is already in place.
    pub fn place_all(&mut self) -> Result<()> {
        if self.plan.is_empty() { self.place(None) } else { Ok(()) }
    }

    /// The model's chat template (its `tokenizer.chat_template`, from `MODEL_INFO`), with its
    /// BOS and EOS texts. `ChatError::NoTemplate` when the model has none.
    pub fn chat_template(&self) -> Result<ChatTemplate, ChatError> {
        ChatTemplate::from_gguf(&self.tokenizer_meta, &self.tokenizer)
    }

    /// One node per shard, spreading shards over the nodes (the one given the fewest so far);
    /// among those, one that has the shard loaded, else one that has the file, else any (which
    /// downloads it from the swarm).
    fn choose(
        &self,
        shard: u32,
        assigned: &HashMap<SocketAddr, usize>,
        tried: &HashSet<SocketAddr>,
    ) -> Option<SocketAddr> {
        self.nodes
            .iter()
            .filter(|n| !self.dead.contains(&n.addr) && !tried.contains(&n.addr))
            .min_by_key(|n| {
                let rank = if n.loaded.contains(&shard) {
                    0
                } else if n.files.contains(&shard) {
                    1
                } else {
                    2
                };
                (assigned.get(&n.addr).copied().unwrap_or(0), rank, n.addr)
            })
            .map(|n| n.addr)
    }

    /// Makes every node of `batch` load its shard at once (so the first token waits for the
    /// slowest download, not for their sum), showing the downloads side by side; one result per
    /// entry, in order.
    fn load_all(&mut self, batch: &[(u32, SocketAddr)]) -> Vec<Result<()>> {
        let t = Instant::now();
        let timeout = self.cfg.load_timeout;
        let loaders: Vec<_> = batch
            .iter()
            .map(|&(shard, node)| {
                let mut params = json!({"shard_id": shard});
                let pinned = self.manifest.as_ref().and_then(|m| m.shard(shard)).map(|s| s.info_hash.to_hex());
                if let Some((info_hash, holders)) = self.holders(shard, node, pinned) {
                    // The node downloads from the holders we know at once, without asking the
                    // DHT who holds the shard and under which info hash (it still checks every
                    // piece against the hash, and the shard's model id at load).
                    params["info_hash"] = json!(info_hash);
                    params["peers"] = json!(holders);
                }
                std::thread::spawn(move || -> Result<Value> {
                    let mut c = Client::connect(&node.to_string(), timeout)?;
                    // A cluster that has just started may not have announced every shard in the
                    // DHT yet: TORRENT_UNAVAILABLE is retried for a few seconds.
                    let mut tries = 0;
                    loop {
                        let r = c.request("LOAD_SHARD", params.clone())?;
                        if r["code"] == "TORRENT_UNAVAILABLE" && tries < 10 {
                            tries += 1;
                            std::thread::sleep(Duration::from_millis(500));
                            continue;
                        }
                        return into_result(r);
                    }
                })
            })
            .collect();
        // Progress from each loading node's STATUS, every 200 ms.
        let mut status: HashMap<SocketAddr, Option<Client>> = HashMap::new();
        let mut polls = 0u64;
        let mut results: Vec<Option<Result<()>>> = batch.iter().map(|_| None).collect();
        let mut loaders: Vec<Option<_>> = loaders.into_iter().map(Some).collect();
        while results.iter().any(Option::is_none) {
            for (i, slot) in loaders.iter_mut().enumerate() {
                if slot.as_ref().is_some_and(|l: &std::thread::JoinHandle<Result<Value>>| l.is_finished()) {
                    let (shard, node) = batch[i];
                    let r = slot.take().expect("checked").join().map_err(|_| anyhow!("the load thread panicked"));
                    results[i] = Some(r.and_then(|r| r).map(|v| {
                        let source = v["source"].as_str().unwrap_or("?");
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        (self.events)(Event::Loaded { shard, node, source, ms });
                        if let Some(n) = self.nodes.iter_mut().find(|n| n.addr == node) {
                            n.loaded.insert(shard);
                            n.files.insert(shard);
                        }
                    }));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
            polls += 1;
            if !polls.is_multiple_of(10) {
                continue;
            }
            for (i, &(shard, node)) in batch.iter().enumerate() {
                if results[i].is_some() {
                    continue;
                }
                let c = status.entry(node).or_insert_with(|| Client::connect(&node.to_string(), self.cfg.timeout).ok());
                let Some(Ok(s)) = c.as_mut().map(|c| c.call("STATUS", json!({}))) else { continue };
                for d in s["downloads"].as_array().into_iter().flatten() {
                    if d["shard_id"].as_u64() == Some(shard as u64) && d["complete"] != json!(true) {
                        let total = d["bytes"].as_f64().unwrap_or(0.0).max(1.0);
                        let percent = 100.0 * d["verified_bytes"].as_f64().unwrap_or(0.0) / total;
                        let rate = d["rate_bytes_s"].as_f64().unwrap_or(0.0);
                        let peers = d["peers"].as_u64().unwrap_or(0);
                        (self.events)(Event::Loading { shard, node, percent, rate, peers });
                    }
                }
            }
        }
        results.into_iter().map(|r| r.expect("every load ended")).collect()
    }

    /// The info hash of `shard` (`pinned`, else the one most holders list) and up to
    /// [`HOLDERS_GIVEN`] live nodes other than `node` whose `LIST_FILES` showed that file
    /// complete; `None` when no other node holds it (the loading node then asks the DHT).
    fn holders(&self, shard: u32, node: SocketAddr, pinned: Option<String>) -> Option<(String, Vec<String>)> {
        let held: Vec<(&String, SocketAddr)> = self
            .nodes
            .iter()
            .filter(|n| n.addr != node && !self.dead.contains(&n.addr))
            .filter_map(|n| n.hashes.get(&shard).map(|h| (h, n.addr)))
            .collect();
        let info_hash = match pinned {
            Some(h) => h,
            None => {
                let mut votes: BTreeMap<&String, usize> = BTreeMap::new();
                for (h, _) in &held {
                    *votes.entry(h).or_default() += 1;
                }
                votes.into_iter().max_by_key(|(_, n)| *n)?.0.clone()
            }
        };
        let holders: Vec<String> =
            held.iter().filter(|(h, _)| **h == info_hash).take(HOLDERS_GIVEN).map(|(_, a)| a.to_string()).collect();
        (!holders.is_empty()).then_some((info_hash, holders))
    }

    /// Assigns every shard (or the shards of `only`) and loads them all at once, moving a shard to
    /// another node when its load fails (those retries again all at once).
    fn place(&mut self, only: Option<&[u32]>) -> Result<()> {
        if self.plan.is_empty() {
            self.plan = vec![SocketAddr::from(([0, 0, 0, 0], 0)); self.shard_count as usize];
        }
        let mut todo: Vec<u32> = match only {
            Some(s) => s.to_vec(),
            None => (0..self.shard_count).collect(),
        };
        let mut assigned: HashMap<SocketAddr, usize> = HashMap::new();
        for (s, a) in self.plan.iter().enumerate() {
            if !todo.contains(&(s as u32)) {
                *assigned.entry(*a).or_default() += 1;
            }
        }
        let mut tried: HashMap<u32, HashSet<SocketAddr>> = HashMap::new();
        while !todo.is_empty() {
            let mut batch = Vec::with_capacity(todo.len());
            for &shard in &todo {
                let tried = tried.entry(shard).or_default();
                let Some(node) = self.choose(shard, &assigned, tried) else {
                    bail!("shard {shard}: no node of the cluster could load it (tried {})", tried.len());
                };
                tried.insert(node);
                *assigned.entry(node).or_default() += 1;
                batch.push((shard, node));
            }
            let results = self.load_all(&batch);
            todo.clear();
            for ((shard, node), result) in batch.into_iter().zip(results) {
                match result {
                    Ok(()) => self.plan[shard as usize] = node,
                    Err(e) => {
                        let msg = format!("{e:#}");
                        *assigned.entry(node).or_default() -= 1;
                        // A node that cannot reach the shard at all gives the same answer as any other.
                        if tried[&shard].len() >= self.nodes.len() {
                            bail!("shard {shard}: {msg}");
                        }
                        crate::warn!("shard {shard} on {node}: {msg}");
                        todo.push(shard);
                    }
                }
            }
        }
        let plan = self.plan.clone();
        (self.events)(Event::Plan(&plan));
        Ok(())
    }

    fn route(&self) -> Vec<Value> {
        self.plan[1..].iter().enumerate().map(|(i, a)| json!({"address": a.to_string(), "shard_id": i + 1})).collect()
    }

    /// One step down the chain: `tokens` at `pos`; the last token's logits (the last hop's top k
    /// when the sampler needs only those) and each hop's timings.
    fn step(
        &mut self,
        session: &str,
        pos: u32,
        tokens: &[u32],
        want: Option<usize>,
    ) -> Result<(Logits, Value), StepError> {
        let first = self.plan[0];
        let mut params = json!({
            "task_type": "ai_inference",
            "session_id": session,
            "shard_id": 0,
            "pos": pos,
            "input": {"tokens": tokens},
            "next": self.route(),
            // Shorter than our own wait, so the hop nearest a silent host reports it.
            "hop_timeout_ms": crate::protocol::next_hop_timeout_ms(self.cfg.timeout.as_millis() as u64),
            "load": false,
            "session_token": self.session_token,
            // Logits come as raw bytes from a node that can (JSON from an older one).
            "encoding_format": "binary",
        });
        let output = match want {
            Some(k) => {
                params["output"] = json!("top_k");
                params["k"] = json!(k);
                TaskOutput::TopK(k)
            }
            None => {
                params["output"] = json!("logits");
                TaskOutput::Logits { all: false }
            }
        };
        // The whole answer within our timeout (a hop that drips it fails, and is replaced), no
        // bigger than what was asked can take, and given up when the client goes away.
        let hops = self.shard_count as usize;
        let bounds = Bounds {
            deadline: Instant::now() + self.cfg.timeout,
            within: self.cfg.timeout,
            max_answer: crate::protocol::answer_limit(output, tokens.len(), hops, self.n_vocab, 0),
            cancel: self.cancel.as_deref(),
        };
        let response = (|| -> Result<(Value, Vec<u8>)> {
            if let Some(c) = self.conns.get_mut(&first) {
                match c.request_parts_by("EXECUTE_TASK", params.clone(), &self.from, &bounds) {
                    Ok(r) => return Ok(r),
                    // A kept connection the node closed in between (its `--idle-timeout`, a
                    // restart): the node never read this request, so it goes once more on a
                    // fresh connection instead of counting as the node's failure.
                    Err(e) if closed_by_peer(&e) => {
                        self.conns.remove(&first);
                    }
                    Err(e) => return Err(e),
                }
            }
            let c = self.conns.entry(first).or_insert(Client::connect(&first.to_string(), self.cfg.timeout)?);
            c.request_parts_by("EXECUTE_TASK", params, &self.from, &bounds)
        })();
        let (response, data) = match response {
            Ok(r) => r,
            Err(e) => {
                // Mid-answer (or never answered): the connection cannot be used again.
                self.conns.remove(&first);
                if is_cancelled(&e) {
                    return Err(StepError::Cancelled);
                }
                return Err(StepError::Node(first, format!("{e:#}")));
            }
        };
        if response["status"] != "success" {
            let code = response["code"].as_str().unwrap_or("");
            let msg = format!("{} ({code})", response["error"].as_str().unwrap_or("error"));
            let failed = response["failed_hop"]["address"].as_str().and_then(|a| a.parse().ok());
            return Err(match (code, failed) {
                ("HOP_FAILED", Some(addr)) => StepError::Node(addr, msg),
                // A hop that lost its shard (restarted empty) is replaced like a dead one.
                ("SHARD_NOT_LOADED", _) => StepError::Node(failed.unwrap_or(first), msg),
                _ => StepError::Fatal(anyhow!("{msg}")),
            });
        }
        let result = &response["result"];
        // An answer that cannot be used (ids outside the vocabulary, an empty or oversized
        // top_k, more hops than the chain has, logits of another width) is the first node's
        // failure, as a silent one would be: never an end of text. A relay checks its next
        // hop's answer the same way, so a bad answer further down is blamed on its own hop.
        let bad = |why: String| StepError::Node(first, format!("{first} answered what was not asked: {why}"));
        crate::protocol::check_answer(result, output, hops, self.n_vocab).map_err(bad)?;
        let logits = if want.is_some() {
            // Checked above: ids below n_vocab, each with a number.
            let top = result["top_k"].as_array().into_iter().flatten();
            Logits::Top(top.filter_map(|t| Some((t["id"].as_u64()? as u32, t["logit"].as_f64()? as f32))).collect())
        } else {
            let section = crate::protocol::binary::Section::new(&data);
            let (data, rows, cols) =
                crate::protocol::tensor::f32_from_json_in(&result["logits"], 1 << 26, Some(&section))
                    .map_err(|(_, m)| bad(format!("logits: {m}")))?;
            if cols != self.n_vocab || rows == 0 {
                return Err(bad(format!("logits of width {cols}, expected {}", self.n_vocab)));
            }
            Logits::Dense(data[(rows - 1) * cols..].to_vec())
        };
        Ok((logits, result["hops"].clone()))
    }

    /// Runs `tokens` at `pos`, recovering from failed hops: the failed node's shards move to
    /// other nodes and the session's `history` (every token before `pos`) is replayed first.
    fn run(
        &mut self,
        session: &str,
        history: &[u32],
        pos: u32,
        tokens: &[u32],
        want: Option<usize>,
        recoveries: &mut usize,
    ) -> Result<(Logits, Value)> {
        loop {
            if self.cancelled() {
                return Err(anyhow::Error::new(Cancelled));
            }
            match self.step(session, pos, tokens, want) {
                Ok(r) => return Ok(r),
                Err(StepError::Fatal(e)) => return Err(e),
                Err(StepError::Cancelled) => return Err(anyhow::Error::new(Cancelled)),
                Err(StepError::Node(node, why)) => {
                    if *recoveries >= self.cfg.max_recoveries {
                        bail!("giving up after {recoveries} recoveries: {why}");
                    }
                    *recoveries += 1;
                    match self.recovery.as_mut() {
                        Some(recover) => {
                            let plan = recover(node, &why)?;
                            if plan.len() != self.shard_count as usize {
                                bail!("recovery answered a chain of {} shards, not {}", plan.len(), self.shard_count);
                            }
                            self.plan = plan;
                            // The failed node may be gone; connections are made again as needed.
                            self.conns.remove(&node);
                        }
                        None => self.recover(node, &why)?,
                    }
                    // Replay the session on the new chain, from its first position.
                    let mut p = 0;
                    for chunk in history[..pos as usize].chunks(self.cfg.batch.max(1)) {
                        if let Err(e) = self.step(session, p, chunk, Some(1)) {
                            let msg = match e {
                                StepError::Node(a, m) => format!("{a}: {m}"),
                                StepError::Fatal(e) => format!("{e:#}"),
                                StepError::Cancelled => return Err(anyhow::Error::new(Cancelled)),
                            };
                            crate::warn!("replay failed ({msg}); trying again");
                            break;
                        }
                        p += chunk.len() as u32;
                    }
                }
            }
        }
    }

    /// Runs one request: places the shards if no plan is in place yet, prefills `req.prompt`,
    /// then samples up to `req.max_tokens` tokens, calling `on_token(id, text)` for each (`text`
    /// is the UTF-8 it completes, possibly empty). `on_token` returning false ends the generation
    /// (`Finish::Stopped`). The session is ended on every node of the chain however this returns.
    /// Errors: a prompt that is empty or does not fit the context with `max_tokens`, a cluster
    /// that cannot place or recover the chain, a node's refusal.
    pub fn generate(&mut self, req: &GenRequest, mut on_token: impl FnMut(u32, &str) -> bool) -> Result<Summary> {
        let prompt = &req.prompt;
        if prompt.is_empty() {
            bail!("the prompt holds no tokens");
        }
        if prompt.len() + req.max_tokens > self.ctx_size as usize {
            bail!(
                "the prompt ({} tokens) and {} new tokens do not fit the nodes' context of {} tokens",
                prompt.len(),
                req.max_tokens,
                self.ctx_size
            );
        }
        let t_load = Instant::now();
        self.place_all()?;
        let load_ms = t_load.elapsed().as_secs_f64() * 1e3;
        let session = req.session.clone().unwrap_or_else(|| format!("s-{}", random_hex(8)));
        let mut summary =
            Summary { session: session.clone(), prompt_tokens: prompt.clone(), load_ms, ..Default::default() };
        let outcome = self.prefill_and_decode(req, &session, &mut summary, &mut on_token);
        self.end_session(&session);
        match outcome {
            // The client went away while a step waited on the chain: as when `on_token` says so.
            Err(e) if is_cancelled(&e) => summary.finish = Finish::Stopped,
            other => other?,
        }
        summary.plan = self.plan.clone();
        Ok(summary)
    }

    fn prefill_and_decode(
        &mut self,
        req: &GenRequest,
        session: &str,
        summary: &mut Summary,
        on_token: &mut dyn FnMut(u32, &str) -> bool,
    ) -> Result<()> {
        let mut sampler = Sampler::new(req.sampling.clone());
        sampler.accept_prompt(&req.prompt);
        // What the last hop returns: as many of the best logits as the sampler needs (greedy: the
        // best one; top-k: the k best plus any a penalty lowers), else all of them.
        let want = |sampler: &Sampler| sampler.logits_needed().filter(|&k| k <= MAX_TOP_K as usize);
        let mut history = req.prompt.clone();
        let t0 = Instant::now();
        let mut logits = Logits::Dense(Vec::new());
        let mut pos = 0u32;
        for chunk in req.prompt.chunks(self.cfg.batch.max(1)) {
            let (l, _) = self.run(session, &history, pos, chunk, want(&sampler), &mut summary.recoveries)?;
            logits = l;
            pos += chunk.len() as u32;
        }
        summary.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;

        let tokenizer = self.tokenizer.clone();
        let mut stream = TextStream::new(&tokenizer);
        let mut step_ms = Vec::new();
        let mut hop_ms: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let t1 = Instant::now();
        summary.finish = Finish::Length;
        for i in 0..req.max_tokens {
            let id = match &logits {
                Logits::Dense(row) => sampler.sample(row),
                // The sampler's pick from the row these make, without building it.
                Logits::Top(top) => sampler.sample_top(self.n_vocab, top),
            };
            if i == 0 {
                summary.ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
            }
            summary.tokens.push(id);
            let eog = req.stop_at_eog && tokenizer.is_eog(id);
            let mut piece = stream.push(id);
            if eog || i + 1 == req.max_tokens {
                piece.push_str(&stream.finish());
            }
            summary.text.push_str(&piece);
            if !on_token(id, &piece) {
                summary.finish = Finish::Stopped;
                break;
            }
            if eog {
                summary.finish = Finish::EndOfGeneration;
                break;
            }
            if i + 1 == req.max_tokens {
                break;
            }
            history.push(id);
            if !req.pace.is_zero() {
                std::thread::sleep(req.pace);
            }
            let t = Instant::now();
            let (l, hops) = self.run(session, &history, pos, &[id], want(&sampler), &mut summary.recoveries)?;
            step_ms.push(t.elapsed().as_secs_f64() * 1e3);
            for (h, hop) in hops.as_array().into_iter().flatten().enumerate() {
                if let Some(ms) = hop["timings"]["compute_ms"].as_f64() {
                    hop_ms.entry(h).or_default().push(ms);
                }
            }
            logits = l;
            pos += 1;
        }
        summary.decode_ms = t1.elapsed().as_secs_f64() * 1e3 - req.pace.as_secs_f64() * 1e3 * step_ms.len() as f64;
        summary.hop_compute_ms = hop_ms.into_values().map(median).collect();
        let hops = summary.hop_compute_ms.len().max(1) as f64;
        summary.overhead_per_hop_us =
            (median(step_ms) - summary.hop_compute_ms.iter().sum::<f64>()).max(0.0) * 1e3 / hops;
        Ok(())
    }

    /// Frees the session's caches on every node of the plan (best effort).
    fn end_session(&mut self, session: &str) {
        let nodes: HashSet<SocketAddr> = self.plan.iter().copied().collect();
        for n in nodes {
            let mut fresh = None;
            let c = match self.conns.get_mut(&n) {
                Some(c) => c,
                None => match Client::connect(&n.to_string(), self.cfg.timeout) {
                    Ok(c) => fresh.insert(c),
                    Err(_) => continue,
                },
            };
            let params = json!({"session_id": session, "session_token": self.session_token});
            let within = END_SESSION_WITHIN.min(self.cfg.timeout);
            let failed = c.request_parts_by("END_SESSION", params, &self.from, &Bounds::within(within)).is_err();
            if failed {
                // Mid-answer, or the node is gone: not a connection to use again.
                self.conns.remove(&n);
            }
        }
    }
}

/// One step's logits for the sampler: every logit of the last token (`[n_vocab]`), or the last
/// hop's top-k answer, `(token id, logit)` pairs with ids below `n_vocab` (the rest are `-inf`).
enum Logits {
    Dense(Vec<f32>),
    Top(Vec<(u32, f32)>),
}

/// Whether `e` is a connection the other side closed (end of file, reset, broken pipe) rather
/// than a timeout or a bad answer.
fn closed_by_peer(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::*;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| matches!(io.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe))
    })
}
