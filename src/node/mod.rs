//! The node: one event-loop thread that owns every socket, a pool of hash
//! workers, and the scan thread; workers report on a channel and wake the loop
//! with a `mio::Waker`.
//!
//! The loop follows mio's rules: it drains sockets to `WouldBlock`, retries
//! `Interrupted`, caps the bytes read from one connection per turn (the rest
//! is served on the next turn), and recomputes each socket's interest from
//! its state after every event.

pub mod catalog;
pub mod conn;
mod dht_glue;
mod outq;
mod peer_crypto;
pub use dht_glue::cluster_key;
mod gather;
mod handlers;
mod inference;
mod ipv6;
pub mod limits;
mod peer_wire;
mod pin;
mod relay;
pub mod scan;
mod schedule;
mod shutdown;

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender, unbounded};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::NodeConfig;
use crate::protocol::{ErrorCode, Request, error_payload};
use crate::torrent::InfoHash;
use crate::torrent::swarm::Swarm;
use crate::workers::WorkerPool;
use crate::{debug, info, warn};
use catalog::{Catalog, LoadedShard};
use conn::{Conn, Next};
use peer_wire::{Bucket, Download};
use scan::{ScanEvent, ScanStats};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const UDP: Token = Token(2);
/// The read end of the socket SIGINT/SIGTERM handlers write to (`shutdown.rs`).
const SIGNAL: Token = Token(3);
const FIRST_CONN: usize = 4;
/// The IPv6 listener beside an IPv4 one, and the IPv6 DHT's socket: far above connection
/// tokens (`FIRST_CONN` + slot), below relay links (`relay::TOKEN_BASE`).
const LISTENER6: Token = Token(1 << 39);
const UDP6: Token = Token((1 << 39) + 1);
/// Bytes read from one connection before others get a turn.
const READ_BUDGET: usize = 1024 * 1024;
/// Most bytes one read takes (into the connection's input buffer).
const READ_CHUNK: usize = 64 * 1024;
/// How often stalled connections are looked for and swarms ticked.
const SWEEP_EVERY: Duration = Duration::from_millis(200);
/// How often rate-limited transfers are resumed.
const THROTTLE_TICK: Duration = Duration::from_millis(10);
/// Largest frame a connection may send before it proves the cluster key (STATUS and AUTH fit).
pub const UNAUTHENTICATED_MAX_FRAME: u32 = 64 * 1024;

/// `--shards-dir` must exist and be a directory.
fn check_shards_dir(dir: &std::path::Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => anyhow::bail!("--shards-dir {}: not a directory", dir.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => anyhow::bail!(
            "--shards-dir {}: no such directory (create it first: mkdir -p {})",
            dir.display(),
            dir.display()
        ),
        Err(e) => Err(e).with_context(|| format!("--shards-dir {}", dir.display())),
    }
}

/// What workers tell the event loop.
pub enum NodeEvent {
    Scan(ScanEvent),
    Loaded {
        shard_id: u32,
        result: Result<LoadedShard, (ErrorCode, String)>,
    },
    /// A piece's hash was checked; `blocks` are per-block digests when asked for or bad.
    Hashed {
        info_hash: InfoHash,
        piece: u32,
        ok: bool,
        blocks: Vec<crate::hash::Digest>,
        write_error: Option<String>,
        /// The piece's buffer, back for reuse (pieces gathered in memory).
        buffer: Option<crate::torrent::storage::PieceBuf>,
    },
    /// A finished download was synced and renamed (or why not).
    Finished {
        info_hash: InfoHash,
        result: Result<catalog::FileEntry, String>,
    },
    /// A finished response frame for a request a worker answered (inference).
    Answer {
        token: Token,
        conn_id: u64,
        /// The answer budget its request held (`inference::ReplyTo::reserved`).
        reserved: usize,
        payload: Vec<u8>,
    },
    /// A hop's result to carry to the next hop (from the inference thread).
    Relay(relay::Outgoing),
    /// The pinned manifest's bytes, fetched from a holder and checked against the pin (or why not).
    ManifestFetched {
        shard_id: u32,
        filename: String,
        result: Result<Vec<u8>, String>,
        /// The caller whose load asked for it, charged with the download.
        client: Option<handlers::Caller>,
    },
    /// A shard's info hash, as its holders listed it (or why not).
    ShardResolved {
        shard_id: u32,
        filename: String,
        result: Result<InfoHash, String>,
        /// The caller whose load asked for it, charged with the download.
        client: Option<handlers::Caller>,
    },
}

type PendingTask = (inference::ReplyTo, Option<String>, crate::protocol::ExecuteTask, Instant);

/// A request waiting for a worker's answer.
struct Waiter {
    token: Token,
    conn_id: u64,
    request_id: serde_json::Value,
    started: Instant,
}

pub struct Node {
    config: NodeConfig,
    poll: Poll,
    listener: TcpListener,
    /// The other family's listener on the same port, when `--listen` is unspecified
    /// (0.0.0.0 or [::]) and the host has IPv6: commands and the peer wire over both families.
    listener6: Option<TcpListener>,
    local_addr: SocketAddr,
    waker: Arc<Waker>,
    events_tx: Sender<NodeEvent>,
    events_rx: Receiver<NodeEvent>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Slots closed since the last poll: free only once the events of that poll are handled.
    /// A token is its slot, and a batch of events may still hold one for a connection closed
    /// while handling an earlier event of the same batch (shed to admit a newcomer, say); were
    /// its slot reused at once, that stale event (an error, above all) would hit the newcomer.
    closed_slots: Vec<usize>,
    /// Open connections by kind and IP, partial-frame memory, limit counters.
    census: limits::Census,
    /// When `accept` is to be tried again after it failed (EMFILE...); whether that was logged.
    accept_retry: Option<Instant>,
    accept_stalled: bool,
    next_conn_id: u64,
    /// Connections with input left over after their read budget ran out.
    again: Vec<Token>,
    catalog: Catalog,
    /// Shard id -> requests waiting for its load.
    loading: HashMap<u32, Vec<Waiter>>,
    /// Shard id -> EXECUTE_TASKs waiting for its load.
    pending_tasks: HashMap<u32, Vec<PendingTask>>,
    scan: ScanProgress,
    pool: WorkerPool,
    /// One thread writing verified pieces, so writes to a file never contend.
    disk: WorkerPool,
    /// One thread making large relayed answers into their callers' frames (`relay::Finish`).
    finisher: WorkerPool,
    node_id: [u8; 20],
    started: Instant,
    /// In `on_readable`: peer input defers its pump to the end of the turn.
    reading: bool,
    pump_after_read: Option<InfoHash>,
    /// Blocks a swarm hands out to serve, reused from call to call.
    served: Vec<crate::torrent::swarm::Served>,
    /// Serialized STATUS result less its live fields; `None` after a change.
    status_cache: Option<Vec<u8>>,
    /// Connection id -> token, for swarms (which know peers by connection id).
    conn_ids: HashMap<u64, Token>,
    /// One swarm per torrent seeded or downloaded.
    swarms: HashMap<InfoHash, Swarm>,
    downloads: HashMap<InfoHash, Download>,
    /// Our BitTorrent peer id: "-SH0100-" (shardnet 0.1.0) and 12 random bytes.
    peer_id: [u8; 20],
    upload_bucket: Bucket,
    download_bucket: Bucket,
    /// Swarms with requests waiting for upload tokens.
    throttled_swarms: HashSet<InfoHash>,
    /// Peer connections paused for download tokens.
    throttled_reads: Vec<Token>,
    /// Shard id -> bytes downloaded for it, reported by LOAD_SHARD.
    download_bytes: HashMap<u32, u64>,
    /// Turns of `pump`, rotating which peer is served first.
    pump_round: usize,
    /// When stale `.part` files were last looked for (`None`: not yet).
    parts_swept: Option<Instant>,
    /// The DHT on the node's UDP port (None if it could not bind).
    dht: Option<dht_glue::DhtState>,
    /// The inference worker (owns the ggml engine).
    inference: inference::Inference,
    /// Outbound connections to next hops and the relays waiting on them.
    relays: relay::Shared,
    /// Where SIGINT/SIGTERM arrive, after [`Node::stop_on_signals`].
    signals: Option<mio::net::UnixStream>,
    /// Message Stream Encryption counters (STATUS `encryption`).
    mse: peer_crypto::MseStats,
}

#[derive(Default)]
struct ScanProgress {
    listed: bool,
    done: Option<ScanStats>,
    cached: usize,
    hashed: usize,
}

impl Node {
    /// Binds the listener and starts the scan; serving begins with [`Node::run`].
    ///
    /// Errors: `--shards-dir` missing or not a directory (the node never creates it: a typo would
    /// otherwise serve an empty directory), the listen address taken, or the poll not created.
    pub fn bind(config: NodeConfig) -> Result<Node> {
        check_shards_dir(&config.shards_dir)?;
        match limits::raise_fd_limit() {
            Ok((soft, _)) if soft < config.max_connections as u64 + 64 => warn!(
                "the open-file limit {soft} is below --max-connections {} plus the node's own files: \
                 connections beyond it are shed or wait (raise `ulimit -Hn`)",
                config.max_connections
            ),
            Ok(_) => {}
            Err(e) => warn!("raising the open-file limit: {e}"),
        }
        limits::map_large_allocations();
        let poll = Poll::new().context("creating the poll")?;
        let (mut listener, mut listener6) = listen(config.listen)?;
        let local_addr = listener.local_addr()?;
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        if let Some(l) = listener6.as_mut() {
            poll.registry().register(l, LISTENER6, Interest::READABLE)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (events_tx, events_rx) = unbounded();
        let pool = WorkerPool::new("hash", config.hash_workers);

        let (tx, w) = (events_tx.clone(), waker.clone());
        scan::spawn(config.shards_dir.clone(), pool.handle(), move |ev| {
            let _ = tx.send(NodeEvent::Scan(ev));
            let _ = w.wake();
        });

        let (config_upload, config_download) = (config.upload_limit, config.download_limit);
        let max_frame = config.max_frame;
        let relay_key = config.cluster_key.clone();
        let relay_limits = relay::RelayLimits {
            max_relays: config.max_relays,
            per_client: config.max_relays_per_client,
            link_buffer: config.relay_link_buffer,
            memory: config.relay_memory,
            io_timeout: config.io_timeout,
        };
        let node_id = random_id();
        let dht = dht_glue::bind(&config, local_addr, node_id, poll.registry(), (UDP, UDP6));
        let engine_config = crate::engine::EngineConfig {
            threads: config.threads,
            ctx_size: config.ctx_size,
            max_sessions: config.max_sessions,
            max_sessions_per_client: config.max_sessions_per_client,
            kv_budget: config.kv_memory,
            repack: config.repack,
        };
        let relays = relay::Shared::new(relay::Relays::new(max_frame, relay_key, relay_limits));
        // The inference thread writes relay requests itself (see `relay::Shared`);
        // SHARDNET_DIRECT_WRITE=0 hands them to the loop instead (an A/B switch for `make bench`).
        let direct = match std::env::var("SHARDNET_DIRECT_WRITE").as_deref() {
            Ok("0") => None,
            _ => match poll.registry().try_clone() {
                Ok(registry) => Some(relay::Direct { relays: relays.clone(), registry }),
                Err(e) => {
                    warn!("relays go through the event loop: no second handle on its poll: {e}");
                    None
                }
            },
        };
        let inference = inference::Inference::spawn(
            engine_config,
            config.orphan_session_idle,
            events_tx.clone(),
            waker.clone(),
            direct,
        );
        match (&config.cluster_key_file, &config.key_warning) {
            (None, _) => warn!(
                "no cluster key: this node is open to anyone who reaches port {} (commands, downloads, \
                 compute); start it with --cluster-key-file",
                local_addr.port()
            ),
            (Some(path), warning) => {
                info!("cluster key from {}: every command but STATUS needs proof of it", path.display());
                if let Some(w) = warning {
                    warn!("{w}");
                }
            }
        }
        Ok(Node {
            config,
            poll,
            listener,
            listener6,
            local_addr,
            waker,
            events_tx,
            events_rx,
            conns: Vec::new(),
            free: Vec::new(),
            closed_slots: Vec::new(),
            census: limits::Census::default(),
            accept_retry: None,
            accept_stalled: false,
            next_conn_id: 1,
            again: Vec::new(),
            catalog: Catalog::default(),
            loading: HashMap::new(),
            pending_tasks: HashMap::new(),
            scan: ScanProgress::default(),
            pool,
            disk: WorkerPool::new("disk", 1),
            finisher: WorkerPool::new("relay", 1),
            node_id,
            started: Instant::now(),
            served: Vec::new(),
            reading: false,
            pump_after_read: None,
            status_cache: None,
            conn_ids: HashMap::new(),
            swarms: HashMap::new(),
            downloads: HashMap::new(),
            peer_id: peer_id(),
            upload_bucket: Bucket::new(config_upload),
            download_bucket: Bucket::new(config_download),
            throttled_swarms: HashSet::new(),
            throttled_reads: Vec::new(),
            download_bytes: HashMap::new(),
            pump_round: 0,
            parts_swept: None,
            dht,
            inference,
            relays,
            signals: None,
            mse: peer_crypto::MseStats::default(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the second listener (the other family on the same port), if any.
    pub fn second_local_addr(&self) -> Option<SocketAddr> {
        self.listener6.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs the event loop until an unrecoverable poll error, or (after
    /// [`Node::stop_on_signals`]) until SIGINT or SIGTERM, then saves state and returns `Ok`.
    pub fn run(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        loop {
            let now = Instant::now();
            let next_dht = self.dht_tick(now).unwrap_or(next_sweep);
            let next_dht = self.relays.lock().plan_wake(next_dht);
            let next_accept = self.accept_retry.unwrap_or(next_sweep);
            let timeout = if !self.again.is_empty() {
                Duration::ZERO
            } else if !self.throttled_swarms.is_empty() || !self.throttled_reads.is_empty() {
                THROTTLE_TICK
            } else {
                next_sweep.min(next_dht).min(next_accept).saturating_duration_since(now)
            };
            self.release_closed_slots();
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("polling"),
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER | LISTENER6 => self.accept(),
                    WAKER => {}
                    SIGNAL => {
                        if self.signalled() {
                            self.shut_down();
                            return Ok(());
                        }
                    }
                    UDP => self.on_udp_readable(false),
                    UDP6 => self.on_udp_readable(true),
                    token if token.0 >= relay::TOKEN_BASE => {
                        let (w, r) = (ev.is_writable(), ev.is_readable() || ev.is_read_closed() || ev.is_error());
                        let answers = self.relays.lock().on_event(self.poll.registry(), token, w, r, Instant::now());
                        self.deliver(answers);
                    }
                    token => {
                        if ev.is_error() {
                            self.close(token, "socket error");
                            continue;
                        }
                        if ev.is_writable() {
                            self.on_writable(token);
                        }
                        if ev.is_readable() || ev.is_read_closed() {
                            self.on_readable(token);
                        }
                    }
                }
            }
            self.drain_worker_events();
            let expired = self.relays.lock().expire(self.poll.registry(), Instant::now());
            self.deliver(expired);
            for token in std::mem::take(&mut self.again) {
                self.on_readable(token);
            }
            for h in std::mem::take(&mut self.throttled_swarms) {
                self.pump(h);
            }
            for token in std::mem::take(&mut self.throttled_reads) {
                self.on_readable(token);
            }
            if self.accept_retry.is_some_and(|t| Instant::now() >= t) {
                self.accept();
            }
            if Instant::now() >= next_sweep {
                self.sweep_deadlines();
                self.tick_swarms();
                next_sweep = Instant::now() + SWEEP_EVERY;
            }
        }
    }

    /// Called once a poll's events are handled: the slots closed meanwhile may be reused now
    /// (a closed socket is deregistered, so no later poll reports it).
    fn release_closed_slots(&mut self) {
        self.free.append(&mut self.closed_slots);
    }

    fn conn(&mut self, token: Token) -> Option<&mut Conn> {
        self.conns.get_mut(token.0.checked_sub(FIRST_CONN)?)?.as_mut()
    }

    fn on_readable(&mut self, token: Token) {
        // Peer-wire input read in this turn is handled message by message,
        // but the swarm is pumped (requests and blocks written) once after:
        // one write per turn, not one per 64 KiB read.
        self.reading = true;
        let open = self.read_turn(token);
        self.reading = false;
        if let Some(h) = self.pump_after_read.take() {
            self.pump(h);
        }
        if open {
            self.after_io(token);
        }
    }

    /// Reads and handles input until the socket is drained, the turn's budget
    /// is spent or the connection may not read; false if it was closed.
    fn read_turn(&mut self, token: Token) -> bool {
        let mut budget = READ_BUDGET;
        while let Some(conn) = self.conn(token) {
            if !conn.may_read() {
                break;
            }
            if budget == 0 {
                self.again.push(token);
                break;
            }
            let mut chunk = READ_CHUNK;
            if conn.kind == conn::Kind::PeerWire && self.download_bucket.limited() {
                let allowed = self.download_bucket.available(Instant::now());
                if allowed == 0 {
                    self.throttled_reads.push(token);
                    break;
                }
                chunk = chunk.min(allowed as usize);
            }
            let Some(conn) = self.conns.get_mut(token.0 - FIRST_CONN).and_then(Option::as_mut) else { break };
            match conn.read_input(chunk, Instant::now()) {
                Ok(0) => {
                    conn.read_closed = true;
                    // A command client that closes (even only its sending side) with requests in
                    // flight has left: what it asked for and is not yet computed is dropped.
                    if conn.kind == conn::Kind::Command && conn.in_flight > 0 {
                        self.close(token, "closed by the client with requests in flight; they are dropped");
                        return false;
                    }
                    break;
                }
                Ok(n) => {
                    if conn.kind == conn::Kind::PeerWire {
                        self.download_bucket.take(n as u64);
                    }
                    budget = budget.saturating_sub(n);
                    self.charge_input(token);
                    self.enforce_frame_memory();
                    self.process_input(token);
                    self.charge_input(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close(token, &format!("read error: {e}"));
                    return false;
                }
            }
        }
        true
    }

    /// Handles every whole frame buffered, while the connection may take more.
    /// Answers are queued, and written once per batch (see `after_io`).
    fn process_input(&mut self, token: Token) {
        let max_frame = self.config.max_frame;
        let torrent_enabled = self.config.enable_torrent;
        loop {
            let Some(conn) = self.conn(token) else { return };
            if conn.close_after_flush {
                break;
            }
            if conn.kind == conn::Kind::Unknown {
                if !conn.has_partial_input() {
                    break;
                }
                self.classify(token);
                if self.conn(token).is_some_and(|c| c.kind == conn::Kind::Unknown) {
                    // The first bytes do not tell yet (a prefix of `\x13BitTorrent protocol`,
                    // or of a frame's length and first payload bytes): wait for more.
                    break;
                }
                continue;
            }
            if conn.backpressured() {
                // Write what the socket takes before deciding to pause.
                if let Err(e) = conn.flush(Instant::now()) {
                    self.close(token, &format!("write error: {e}"));
                    return;
                }
                if self.conn(token).is_none_or(|c| c.backpressured()) {
                    break;
                }
            }
            let Some(conn) = self.conn(token) else { return };
            // Before the key is proved only STATUS and AUTH are served: small frames suffice.
            let limit = if conn.auth.authorized() { max_frame } else { max_frame.min(UNAUTHENTICATED_MAX_FRAME) };
            let request = match conn.next(limit) {
                Next::NeedMore => break,
                Next::Frame(payload, len) => {
                    let parsed = Request::parse(payload);
                    conn.consume(len, Instant::now());
                    parsed
                }
                Next::BadMac(e) => {
                    let peer = conn.peer;
                    conn.discard_input();
                    let msg = format!("{e}; closing");
                    let payload =
                        error_payload(serde_json::Value::Null, serde_json::Value::Null, ErrorCode::AuthFailed, &msg);
                    conn.queue_frame(&payload, Instant::now());
                    conn.close_after_flush = true;
                    warn!("conn from {peer}: {msg}");
                    break;
                }
                Next::TooLarge { declared, limit } => {
                    let peer = conn.peer;
                    conn.discard_input();
                    let msg = format!("frame of {declared} bytes exceeds the limit of {limit} bytes; closing");
                    let payload =
                        error_payload(serde_json::Value::Null, serde_json::Value::Null, ErrorCode::FrameTooLarge, &msg);
                    conn.queue_frame(&payload, Instant::now());
                    conn.close_after_flush = true;
                    if torrent_enabled && declared >= crate::protocol::frame::MAX_FRAME_LIMIT {
                        // No command frame is that long: most likely a BitTorrent
                        // client opening with an encrypted (MSE) handshake, which
                        // then retries in plaintext. Not worth a warning each time.
                        info!(
                            "conn from {peer}: {msg} (an encrypted BitTorrent handshake? the peer wire is plaintext)"
                        );
                    } else {
                        warn!("conn from {peer}: {msg}");
                    }
                    break;
                }
                Next::PeerWire => {
                    if torrent_enabled {
                        return self.process_peer_input(token);
                    }
                    let peer = conn.peer;
                    info!("peer-wire handshake from {peer}: torrent is disabled (--enable-torrent); closing");
                    conn.discard_input();
                    conn.close_after_flush = true;
                    break;
                }
            };
            self.dispatch(token, request);
        }
        if let Some(conn) = self.conn(token) {
            conn.trim_input();
        }
    }

    fn on_writable(&mut self, token: Token) {
        if !self.finish_connect(token) {
            return;
        }
        let Some(conn) = self.conn(token) else { return };
        if conn.kind == conn::Kind::PeerWire {
            // Room in the socket: serve more of the peer's queued requests.
            let was_paused = !conn.may_read();
            if let Err(e) = conn.flush(Instant::now()) {
                return self.close(token, &format!("write error: {e}"));
            }
            if let Some(h) = conn.torrent {
                self.pump(h);
            }
            // Not read while its output was over `conn::PEER_OUT_MAX`: input that came meanwhile
            // raised no event (edge-triggered), so read it now.
            if was_paused && self.conn(token).is_some_and(|c| c.may_read()) {
                self.process_input(token); // what was read before the pause
                return self.on_readable(token);
            }
            return self.after_io(token);
        }
        let Some(conn) = self.conn(token) else { return };
        let was_paused = conn.backpressured();
        if let Err(e) = conn.flush(Instant::now()) {
            self.close(token, &format!("write error: {e}"));
            return;
        }
        self.resume_or_settle(token, was_paused);
    }

    /// After output drained or a deferred answer went out: a connection that
    /// was paused and may read again is served now (edge-triggered readiness
    /// raised no event for input that arrived while it was paused).
    ///
    /// Whole requests already buffered count as paused too: a connection may pause on its
    /// reservations (`Conn::reserved`) with requests read, and leave high water before it drains
    /// below low water, so `was_paused` alone missed them and they waited for bytes that never came.
    fn resume_or_settle(&mut self, token: Token, was_paused: bool) {
        // Write first: the answer just queued may leave at once, and then no writable event comes.
        if let Some(conn) = self.conn(token)
            && conn.pending_output() > 0
            && let Err(e) = conn.flush(Instant::now())
        {
            return self.close(token, &format!("write error: {e}"));
        }
        let resume = was_paused || self.conn(token).is_some_and(|c| c.has_partial_input());
        if resume && self.conn(token).is_some_and(|c| c.drained()) {
            self.process_input(token);
            self.on_readable(token);
        } else {
            self.after_io(token);
        }
    }

    /// Queues a response frame; `after_io` writes it.
    fn respond(&mut self, token: Token, payload: &[u8]) {
        if let Some(conn) = self.conn(token) {
            conn.queue_frame(payload, Instant::now());
        }
    }

    /// Writes queued output, then closes a finished connection or sets its
    /// interest from its state.
    fn after_io(&mut self, token: Token) {
        let Some(conn) = self.conn(token) else { return };
        if conn.pending_output() > 0
            && let Err(e) = conn.flush(Instant::now())
        {
            self.close(token, &format!("write error: {e}"));
            return;
        }
        let Some(conn) = self.conn(token) else { return };
        if conn.finished() {
            let reason = if conn.has_partial_input() { "closed by peer mid-frame" } else { "closed" };
            self.close(token, reason);
            return;
        }
        let wants = conn.pending_output() > 0;
        if wants != conn.wants_writable {
            conn.wants_writable = wants;
            let interest = if wants { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            let conn = self.conns[token.0 - FIRST_CONN].as_mut().expect("checked above");
            if let Err(e) = self.poll.registry().reregister(&mut conn.stream, token, interest) {
                self.close(token, &format!("reregister: {e}"));
            }
        }
    }

    fn close(&mut self, token: Token, why: &str) {
        let slot = token.0 - FIRST_CONN;
        if let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut conn.stream);
            self.closed_slots.push(slot);
            self.census.closed(conn.peer.ip(), conn.kind, !conn.outgoing);
            self.census.frame_bytes -= conn.charged;
            self.conn_ids.remove(&conn.id);
            debug!("conn {} with {}: {why}", conn.id, conn.peer);
            if conn.in_flight > 0 {
                self.abandon(conn.id);
            }
            if conn.kind == conn::Kind::Command && !conn.outgoing {
                // Closed by its peer (or for a broken frame or write), not shed by a limit of
                // this node: the sessions it owns end now (`Inference::closed`). A connection
                // this node closed as idle keeps them, so its client may go on on a new one.
                let end_sessions = !conn.closed_by_limit;
                self.inference.closed(conn.id, end_sessions);
            }
            self.peer_closed(&conn);
            if let Some(h) = conn.torrent {
                self.pump(h);
            }
        }
    }

    fn drain_worker_events(&mut self) {
        while let Ok(ev) = self.events_rx.try_recv() {
            match ev {
                NodeEvent::Scan(ev) => self.on_scan_event(ev),
                NodeEvent::Loaded { shard_id, result } => self.on_loaded(shard_id, result),
                NodeEvent::Hashed { info_hash, piece, ok, blocks, write_error, buffer } => {
                    self.on_hashed(info_hash, piece, ok, blocks, write_error, buffer)
                }
                NodeEvent::Finished { info_hash, result } => self.on_finished(info_hash, result),
                NodeEvent::Answer { token, conn_id, reserved, payload } => {
                    self.on_answer(token, conn_id, reserved, &payload)
                }
                // A step computed for a connection that closed meanwhile goes no further.
                NodeEvent::Relay(out) if !self.conn_ids.contains_key(&out.reply.conn_id) => {}
                NodeEvent::Relay(out) => {
                    let answers = self.relays.lock().submit(self.poll.registry(), out, Instant::now());
                    self.deliver(answers);
                }
                NodeEvent::ManifestFetched { shard_id, filename, result, client } => {
                    self.on_manifest_fetched(shard_id, filename, result, client)
                }
                NodeEvent::ShardResolved { shard_id, filename, result, client } => {
                    self.on_shard_resolved(shard_id, filename, result, client)
                }
            }
        }
    }
}

impl Node {
    /// A command connection with requests in flight closed: what it asked for is not worth
    /// computing or waiting for any longer. Its steps waiting for a shard to load, its queued
    /// inference steps (`Inference::closed`, sent by `close` for every command connection) and
    /// its relays in flight (`Relays::cancel`, which frees their `--max-relays` slots and sends
    /// a `CANCEL` down a link other chains keep open) are dropped. A graph computing only its
    /// steps stops early; one shared with others' steps finishes, and the answers to its steps
    /// find no connection and are discarded.
    fn abandon(&mut self, conn_id: u64) {
        for tasks in self.pending_tasks.values_mut() {
            tasks.retain(|(reply, ..)| reply.conn_id != conn_id);
        }
        self.pending_tasks.retain(|_, tasks| !tasks.is_empty());
        self.relays.lock().cancel(self.poll.registry(), conn_id, Instant::now());
    }

    /// Hands relay answers to the connections that asked: a finished frame at once, a large one
    /// once the `relay` thread has made it (see [`relay::FINISH_ON_LOOP`]).
    fn deliver(&mut self, answers: Vec<relay::Answer>) {
        for a in answers {
            match a.body {
                relay::Body::Frame(payload) => {
                    self.on_answer(a.reply.token, a.reply.conn_id, a.reply.reserved, &payload)
                }
                relay::Body::Finish(finish) => {
                    self.relays.lock().finished_off_loop += 1;
                    let (events, waker, reply) = (self.events_tx.clone(), self.waker.clone(), a.reply);
                    self.finisher.handle().submit(move || {
                        let payload = finish.frame();
                        let (token, conn_id, reserved) = (reply.token, reply.conn_id, reply.reserved);
                        let _ = events.send(NodeEvent::Answer { token, conn_id, reserved, payload });
                        let _ = waker.wake();
                    });
                }
            }
        }
    }
}

/// A BitTorrent peer id in the common Azureus style: "-SH0100-" + 12 random bytes (`SN`, the
/// first choice, is ShareNet's in clients' tables).
fn peer_id() -> [u8; 20] {
    let mut id = random_id();
    id[..8].copy_from_slice(b"-SH0100-");
    id
}

/// 20 random bytes for the node id (the DHT's id space), session ids and the like.
pub(crate) fn random_id() -> [u8; 20] {
    let mut id = [0u8; 20];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut id)).is_err() {
        let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
        id = crate::hash::sha1(seed.as_bytes());
    }
    id
}

/// The node's TCP listeners on `addr`: a specific address gets one; an unspecified one (0.0.0.0
/// or [::]) gets both families on one port, the IPv6 one IPV6_V6ONLY. A host without IPv6 runs
/// on IPv4 alone (one line in the log), never fails to start for it.
///
/// Errors: `addr` itself cannot be bound (taken, or not an address of this host).
fn listen(addr: SocketAddr) -> Result<(TcpListener, Option<TcpListener>)> {
    let context = || format!("listening on {addr}");
    if !addr.ip().is_unspecified() {
        let l = if addr.is_ipv6() { ipv6::bind_tcp6(addr) } else { TcpListener::bind(addr) };
        return Ok((l.with_context(context)?, None));
    }
    let v4_any = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
    let v6_any = |port| SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port);
    if addr.is_ipv6() {
        // [::]: IPv6 first; IPv4 beside it, on its port.
        match ipv6::bind_tcp6(addr) {
            Ok(l6) => {
                let port = l6.local_addr()?.port();
                let l4 = match TcpListener::bind(SocketAddr::new(v4_any.ip(), port)) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        warn!("cannot listen on 0.0.0.0:{port} ({e}): listening on IPv6 only");
                        None
                    }
                };
                return Ok((l6, l4));
            }
            Err(e) if ipv6::no_ipv6(&e) => {
                info!("no IPv6 on this host ({e}): listening on IPv4 only");
                return Ok((TcpListener::bind(v4_any).with_context(context)?, None));
            }
            Err(e) => return Err(e).with_context(context),
        }
    }
    let l4 = TcpListener::bind(addr).with_context(context)?;
    let port = l4.local_addr()?.port();
    let l6 = match ipv6::bind_tcp6(v6_any(port)) {
        Ok(l) => Some(l),
        Err(e) if ipv6::no_ipv6(&e) => {
            info!("no IPv6 on this host ({e}): listening on IPv4 only");
            None
        }
        Err(e) => {
            warn!("cannot listen on [::]:{port} ({e}): listening on IPv4 only");
            None
        }
    };
    Ok((l4, l6))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot (token) of a connection closed while a batch of events is handled goes to no
    /// newcomer before that batch ends: an event of the batch may still name it (before, a
    /// client accepted into the slot of a connection shed for it got that connection's pending
    /// error and was closed, "connection reset by peer").
    #[test]
    fn a_slot_closed_during_a_batch_is_reused_only_after_the_batch() {
        let dir = std::env::temp_dir().join(format!("shardnet-slots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config =
            NodeConfig { listen: "127.0.0.1:0".parse().unwrap(), shards_dir: dir.clone(), ..NodeConfig::default() };
        let mut node = Node::bind(config).unwrap();
        let addr = node.local_addr();
        let mut clients = Vec::new();
        let mut accept_one = |node: &mut Node| -> Token {
            let c = std::net::TcpStream::connect(addr).unwrap();
            let me = c.local_addr().unwrap();
            clients.push(c);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                node.accept();
                let slot = node.conns.iter().position(|c| c.as_ref().is_some_and(|c| c.peer == me));
                if let Some(slot) = slot {
                    return Token(slot + FIRST_CONN);
                }
                assert!(Instant::now() < deadline, "the connection was not accepted");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let first = accept_one(&mut node);
        node.close(first, "shed for a newcomer");
        let second = accept_one(&mut node);
        assert_ne!(second, first, "a slot closed in this batch went to a newcomer at once");
        node.release_closed_slots();
        let third = accept_one(&mut node);
        assert_eq!(third, first, "the slot is reused once the batch is handled");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
