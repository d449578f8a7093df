//! The peer wire in the event loop: handshakes, messages into the swarms,
//! their output into connections, dialling peers, hash and file jobs on the
//! workers, downloads and what waits on them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};

use super::catalog::FileEntry;
use super::conn::{Conn, Kind};
use super::peer_crypto::Crypt;
use super::{FIRST_CONN, Node, NodeEvent};
use crate::config::Encryption;
use crate::hash::Digest;
use crate::torrent::mse;
use crate::torrent::swarm::{Action, PieceData, Swarm};
use crate::torrent::wire::{self, BLOCK_SIZE, Handshake};
use crate::torrent::{InfoHash, Metainfo};
use crate::{debug, info, warn};

/// Output kept queued per peer connection while serving blocks.
const PEER_OUT_HIGH: usize = 4 * 1024 * 1024;
const _: () = assert!(PEER_OUT_HIGH + 4 * BLOCK_SIZE as usize <= super::conn::PEER_OUT_MAX - 1024 * 1024);
/// Wait before dialling a peer again: doubles per failed attempt, from this...
const REDIAL_FIRST: Duration = Duration::from_millis(200);
/// ...up to this.
const REDIAL_MAX: Duration = Duration::from_secs(30);
/// How often a download without peers asks the DHT again.
const REQUERY_EVERY: Duration = Duration::from_secs(10);
/// How often verified pieces are recorded in the resume file.
const RESUME_EVERY: Duration = Duration::from_secs(1);

/// How often stale `.part` files are looked for (`--part-expiry`).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Failed downloads kept for STATUS; older ones are forgotten.
const FAILED_KEPT: usize = 64;
/// Dials (fallback redials included) a peer that never handshook with the download gets before
/// it is dropped: a command naming ports of a third party buys at most this many connections to
/// each, for the life of the download (red-team round 8: 32 ports named once drew 224
/// connections in 40 s, redialled for `--redial-give-up`). A peer that handshook once is
/// redialled with back-off for `--redial-give-up`.
pub const MAX_UNPROVEN_DIALS: u32 = 4;

/// One peer's dialling record in a download.
struct Dial {
    last: Instant,
    /// Dials since the peer last handshook with us.
    attempts: u32,
    /// The first of those dials: `--redial-give-up` counts from here.
    failing_since: Instant,
    /// Whether the next dial opens with an MSE handshake (`--encryption`).
    encrypted: bool,
    /// The peer dropped a connection before its handshake: redial at once, the other way.
    fallback: bool,
    /// That immediate redial was spent since the peer last handshook: later closes before the
    /// handshake wait out the back-off like any failed dial (a peer that accepts and closes at
    /// once must not be dialled in a loop).
    fell_back: bool,
    /// The peer handshook with this download at least once.
    proven: bool,
    /// Dials in all while not `proven` (at most [`MAX_UNPROVEN_DIALS`]).
    unproven_dials: u32,
}

/// A download the node runs, and who waits for it.
pub struct Download {
    /// Known peers, at most `--max-download-peers`.
    pub peers: Vec<SocketAddr>,
    dialled: HashMap<SocketAddr, Dial>,
    /// The target name (the info hash in hex until a magnet's metadata arrives).
    name: String,
    started: Instant,
    pub shard_id: Option<u32>,
    /// The client that started it ([`client_key`](super::handlers::client_key)), charged for it
    /// under `--max-downloads-per-client`; `None` for the node's own (a pinned manifest's shard
    /// resolved through the DHT).
    client: Option<String>,
    /// Started by a stranger ([`Caller::stranger`](super::handlers::Caller)): counted in the
    /// strangers' share of `--max-downloads`.
    stranger: bool,
    resume_dirty: bool,
    resume_saved: Instant,
    pub failed: Option<String>,
    /// When the DHT was last asked for more peers.
    requeried: Option<Instant>,
    /// Known peers that came from PEX (BEP 11).
    pex_peers: u64,
    /// Known peers learned from PEX that have not handshaken with us: at most half of
    /// `--max-download-peers`, and the first to make room for a peer named in a command or
    /// found in the DHT (a stranger's dead addresses must not crowd out a real seed).
    pex_unproven: std::collections::HashSet<SocketAddr>,
    /// When the download last made progress (started, a metadata piece or a block came):
    /// `--download-stall-timeout` counts from here.
    progress_at: Instant,
    /// What progress is measured by: bytes of blocks received, metadata pieces held.
    progress_mark: (u64, usize),
}

/// A token bucket for `--upload-limit` / `--download-limit` (bytes/s; 0 = none).
pub struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate: u64) -> Bucket {
        Bucket { rate, tokens: rate as f64 / 10.0, last: Instant::now() }
    }

    /// Bytes that may move now (`u64::MAX` when unlimited).
    pub fn available(&mut self, now: Instant) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        // At most a tenth of a second's worth accumulates: bursts stay short.
        self.tokens = (self.tokens + dt * self.rate as f64).min((self.rate as f64 / 10.0).max(2.0 * BLOCK_SIZE as f64));
        self.tokens.max(0.0) as u64
    }

    pub fn take(&mut self, n: u64) {
        if self.rate != 0 {
            self.tokens -= n as f64;
        }
    }

    pub fn limited(&self) -> bool {
        self.rate != 0
    }
}

impl Node {
    /// Input on a peer-wire connection: the handshake, then messages.
    pub(super) fn process_peer_input(&mut self, token: Token) {
        let now = Instant::now();
        let slot = token.0 - FIRST_CONN;
        loop {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else { return };
            if conn.close_after_flush {
                break;
            }
            if conn.crypt.handshaking() {
                if matches!(conn.crypt, Crypt::Incoming) {
                    if !self.mse.admit(conn.peer, self.config.mse_rate, now) {
                        debug!("peer {}: MSE handshake refused (--mse-rate {})", conn.peer, self.config.mse_rate);
                        return self.close(token, "MSE handshakes over --mse-rate");
                    }
                    conn.crypt = Crypt::receiver(self.config.encryption, now);
                }
                let swarms = &self.swarms;
                let serves = |h: &[u8; 20]| swarms.keys().find(|ih| mse::req2_hash(ih) == *h).copied();
                match conn.mse_feed(&serves, now) {
                    Ok(None) => break,
                    Ok(Some((h, method))) => {
                        self.mse.done(method);
                        debug!("peer {}: MSE handshake done for {h}, {}", conn.peer, method_name(method));
                        // The BitTorrent handshake that follows must name the same torrent.
                        conn.torrent = Some(h);
                        continue;
                    }
                    Err(e) => {
                        self.mse.failed(e);
                        return self.close(token, &e.to_string());
                    }
                }
            }
            if !conn.handshaken {
                if !conn.outgoing && matches!(conn.crypt, Crypt::Plain) && self.config.encryption == Encryption::Require
                {
                    self.mse.plaintext_refused += 1;
                    return self.close(token, "plaintext peer-wire handshake refused (--encryption require)");
                }
                let hs = match Handshake::decode(conn.input()) {
                    Ok(None) => break,
                    Ok(Some(hs)) => hs,
                    Err(e) => return self.close(token, &format!("peer wire: {e}")),
                };
                conn.consume_raw(wire::HANDSHAKE_LEN, now);
                if let Err(e) = self.accept_handshake(token, &hs) {
                    return self.close(token, &format!("handshake: {e}"));
                }
                continue;
            }
            let Some(h) = conn.torrent else { return self.close(token, "no torrent") };
            let Some(swarm) = self.swarms.get_mut(&h) else { return self.close(token, "torrent gone") };
            let (msg, used) = match wire::decode(conn.input(), swarm.max_message()) {
                Ok(None) => break,
                Ok(Some(m)) => m,
                Err(e) => {
                    let why = format!("peer {}: peer wire: {e}", conn.peer);
                    return self.protocol_violation(token, &why);
                }
            };
            let result = swarm.on_message(conn.id, msg, now);
            conn.consume_raw(used, now);
            if let Err(e) = result {
                let why = format!("peer {}: {e}", conn.peer);
                return self.protocol_violation(token, &why);
            }
        }
        if let Some(h) = self.conn(token).and_then(|c| c.torrent) {
            // In a read turn (one connection, so one torrent) the pump waits
            // for the turn's end.
            if self.reading {
                self.pump_after_read = Some(h);
            } else {
                self.pump(h);
            }
        }
    }

    /// A handshaken peer broke the protocol (a message that does not decode, or one its state
    /// forbids): closed, and a peer we dialled is banned from the download by its address and
    /// port, as a peer sending bad pieces is, so it is not redialled (red-team round 10: a seed
    /// sending HAVE 10^9 was redialled 5 times a second until the stall timeout). A peer that
    /// dialled us is only closed: its port says nothing about its next connection, and a ban
    /// per source port would grow with every connection it makes.
    fn protocol_violation(&mut self, token: Token, why: &str) {
        let Some(conn) = self.conn(token) else { return };
        let (outgoing, peer, torrent) = (conn.outgoing, conn.peer, conn.torrent);
        if outgoing
            && let Some(h) = torrent
            && let Some(swarm) = self.swarms.get_mut(&h)
            && swarm.banned.insert(peer)
        {
            info!("download {h}: banning peer {peer}: {why}");
            self.status_cache = None;
        }
        self.close(token, why);
    }

    fn accept_handshake(&mut self, token: Token, hs: &Handshake) -> anyhow::Result<()> {
        let conn = self.conns[token.0 - FIRST_CONN].as_mut().expect("live connection");
        if let Some(expected) = conn.torrent {
            anyhow::ensure!(hs.info_hash == expected, "peer answered for {}, we asked for {expected}", hs.info_hash);
        }
        let swarm =
            self.swarms.get_mut(&hs.info_hash).ok_or_else(|| anyhow::anyhow!("unknown info hash {}", hs.info_hash))?;
        if !conn.outgoing {
            swarm.add_peer(conn.id, conn.peer, false, Instant::now())?;
        }
        conn.torrent = Some(hs.info_hash);
        conn.handshaken = true;
        if let Err(e) = swarm.on_handshake(conn.id, hs, conn.outgoing) {
            swarm.remove_peer(conn.id);
            conn.torrent = None;
            return Err(e);
        }
        debug!("peer {} handshaken for {}", conn.peer, hs.info_hash);
        if conn.outgoing {
            let peer = conn.peer;
            self.dial_succeeded(hs.info_hash, peer);
        }
        Ok(())
    }

    /// Moves every peer's queued bytes into its connection, serves queued
    /// requests where there is room, runs the swarm's actions, and writes.
    pub(super) fn pump(&mut self, h: InfoHash) {
        let now = Instant::now();
        self.check_revival(h, now);
        let mut budget = self.upload_bucket.available(now);
        let start_budget = budget;
        let mut touched = Vec::new();
        let Some(swarm) = self.swarms.get_mut(&h) else { return };
        let mut keys: Vec<u64> = swarm.peers.keys().copied().collect();
        // Under an upload limit, peers share the budget and take turns first.
        self.pump_round = self.pump_round.wrapping_add(1);
        if !keys.is_empty() {
            let n = keys.len();
            keys.rotate_left(self.pump_round % n);
        }
        let waiting = keys.iter().filter(|k| swarm.has_queued(**k)).count().max(1) as u64;
        let share = if budget == u64::MAX { u64::MAX } else { (budget / waiting).max(BLOCK_SIZE as u64) };
        let view = swarm.view();
        let mut blocks = std::mem::take(&mut self.served);
        for key in keys {
            let Some(&token) = self.conn_ids.get(&key) else { continue };
            let Some(conn) = self.conns.get_mut(token.0 - FIRST_CONN).and_then(Option::as_mut) else { continue };
            blocks.clear();
            if swarm.has_queued(key) && !conn.connecting {
                let room = PEER_OUT_HIGH.saturating_sub(conn.pending_output());
                let mut mine = share.min(budget);
                let served = swarm.serve(key, room, &mut mine, &mut blocks, now);
                budget = budget.saturating_sub(served);
            }
            let peer = swarm.peers.get_mut(&key).expect("listed");
            if !peer.out.is_empty() || !blocks.is_empty() {
                conn.queue_raw(&peer.out, now);
                peer.out.clear();
                if let Some(view) = &view {
                    for b in &blocks {
                        // Requests were checked against the file's length.
                        let queued = conn.queue_block(b.header, view.clone(), b.offset, b.len as usize, now);
                        debug_assert!(queued, "block in range");
                    }
                }
                touched.push(token);
            }
        }
        self.served = blocks;
        self.upload_bucket.take(start_budget.saturating_sub(budget).min(start_budget));
        if swarm.peers.keys().any(|k| swarm.has_queued(*k)) && self.upload_bucket.limited() {
            self.throttled_swarms.insert(h);
        }
        let actions = std::mem::take(&mut swarm.actions);
        for a in actions {
            self.run_action(h, a);
        }
        for token in touched {
            self.after_io(token);
        }
    }

    fn run_action(&mut self, h: InfoHash, action: Action) {
        match action {
            Action::Hash { piece, data, offset, len, expected, blocks } => {
                let (tx, waker) = (self.events_tx.clone(), self.waker.clone());
                let disk = self.disk.handle();
                self.pool.handle().submit(move || {
                    let (ok, digests) = data.verify(offset, len, expected, blocks);
                    let report = move |ok: bool, write_error: Option<String>, buffer| {
                        let event = NodeEvent::Hashed { info_hash: h, piece, ok, blocks: digests, write_error, buffer };
                        let _ = tx.send(event);
                        let _ = waker.wake();
                    };
                    match data {
                        // Only verified bytes reach the file, written by the
                        // one disk thread (writers to one file contend).
                        PieceData::Memory(buf, writer) if ok => {
                            disk.submit(move || match writer.write(offset, buf.as_slice()) {
                                Ok(()) => report(true, None, Some(buf)),
                                Err(e) => report(false, Some(format!("writing piece {piece}: {e}")), Some(buf)),
                            })
                        }
                        PieceData::Memory(buf, _) => report(false, None, Some(buf)),
                        PieceData::Disk(_) => report(ok, None, None),
                    }
                });
            }
            Action::SaveResume => {
                if let Some(d) = self.downloads.get_mut(&h) {
                    d.resume_dirty = true;
                }
            }
            Action::MetadataReady => {
                let Some(m) = self.swarms.get(&h).and_then(|s| s.received_metadata()).cloned() else { return };
                info!("metadata for {h} received from peers: {} ({} bytes)", m.info.name, m.info.length);
                // The name and the disk budget are checked before any file is created.
                if let Err((code, why)) = self.admit(h, Some(&m.info.name), Some(m.info.length)) {
                    return self.abort_download(h, code, why);
                }
                if let Some(d) = self.downloads.get_mut(&h) {
                    d.name = m.info.name.clone();
                }
                let opened = self.swarms.get_mut(&h).map(|s| s.accept_metadata());
                if let Some(Err(e)) = opened {
                    return self.abort_download(h, crate::protocol::ErrorCode::Internal, format!("{e:#}"));
                }
                self.status_cache = None;
            }
            Action::Disconnect(key, why) => {
                if let Some(&token) = self.conn_ids.get(&key) {
                    info!("dropping peer: {why}");
                    self.close(token, &why);
                }
            }
            Action::Complete => self.start_finish(h),
            Action::PexPeers(addrs) => self.add_pex_peers(h, &addrs),
        }
    }

    pub(super) fn on_hashed(
        &mut self,
        h: InfoHash,
        piece: u32,
        ok: bool,
        blocks: Vec<Digest>,
        write_error: Option<String>,
        buffer: Option<crate::torrent::storage::PieceBuf>,
    ) {
        if let (Some(buf), Some(swarm)) = (buffer, self.swarms.get_mut(&h)) {
            swarm.recycle(buf);
        }
        let Some(swarm) = self.swarms.get_mut(&h) else { return };
        if let Some(e) = write_error {
            // The disk, not the peers (a full disk: ENOSPC): this download stops, its `.part`
            // and resume data kept; the others go on (red-team round 11: all failed at once).
            let why = format!("{e}; stopped with its .part and resume data kept: resume it by the same command");
            return self.stop_download(h, crate::protocol::ErrorCode::DiskBudget, why);
        }
        if ok {
            debug!("{}: piece {piece} verified", swarm.name);
        } else {
            warn!("{}: piece {piece} failed verification; fetching it again", swarm.name);
        }
        swarm.on_hashed(piece, ok, &blocks);
        self.pump(h);
    }

    /// Every piece verified: sync and rename on a worker, then seed and load.
    fn start_finish(&mut self, h: InfoHash) {
        let Some(swarm) = self.swarms.get_mut(&h) else { return };
        let Some(meta) = swarm.metainfo().cloned() else { return };
        let Some(storage) = swarm.storage_mut() else { return };
        if storage.is_complete_file() {
            return;
        }
        let path = storage.path.clone();
        let job = match storage.finish_job() {
            Ok(j) => j,
            Err(e) => return self.fail_download(h, format!("finishing {}: {e:#}", path.display())),
        };
        let (tx, waker) = (self.events_tx.clone(), self.waker.clone());
        self.pool.handle().submit(move || {
            let result = job().map(|()| finished_entry(&path, &meta)).map_err(|e| format!("{e:#}"));
            let _ = tx.send(NodeEvent::Finished { info_hash: h, result });
            let _ = waker.wake();
        });
    }

    pub(super) fn on_finished(&mut self, h: InfoHash, result: Result<FileEntry, String>) {
        let entry = match result {
            Ok(e) => e,
            Err(e) => return self.fail_download(h, e),
        };
        let Some(swarm) = self.swarms.get_mut(&h) else { return };
        if let Some(s) = swarm.storage_mut() {
            s.finished();
        }
        swarm.mark_complete(Instant::now());
        let secs = swarm.started.elapsed().as_secs_f64();
        info!(
            "downloaded {} ({} bytes in {:.2} s, {:.1} MB/s, {} wasted); seeding it",
            entry.filename,
            entry.size,
            secs,
            entry.size as f64 / secs.max(1e-9) / 1e6,
            swarm.wasted
        );
        let downloaded = swarm.downloaded;
        let path = entry.path.clone();
        self.announce_due(Instant::now());
        self.catalog.files.insert(entry.filename.clone(), entry);
        self.status_cache = None;
        if let Some(d) = self.downloads.get(&h)
            && let Some(id) = d.shard_id
        {
            self.download_bytes.insert(id, downloaded);
            self.start_load(id, path);
        }
        self.pump(h);
    }

    /// A shard downloaded for `shard_id` was refused at load (another model, another index): it
    /// is neither kept nor seeded, so it cannot become one more vote for itself under the name.
    pub(super) fn discard_download(&mut self, shard_id: u32, why: &str) {
        let Some(h) = self.downloads.iter().find(|(_, d)| d.shard_id == Some(shard_id)).map(|(h, _)| *h) else {
            return;
        };
        self.downloads.remove(&h);
        self.swarms.remove(&h);
        let tokens: Vec<mio::Token> = self
            .conns
            .iter()
            .flatten()
            .filter(|c| c.kind == Kind::PeerWire && c.torrent == Some(h))
            .filter_map(|c| self.conn_ids.get(&c.id).copied())
            .collect();
        for t in tokens {
            self.close(t, "its torrent was discarded");
        }
        let name = self
            .catalog
            .files
            .values()
            .find(|f| f.meta.as_ref().is_some_and(|m| m.info_hash == h))
            .map(|f| f.filename.clone());
        let Some(name) = name else { return };
        let entry = self.catalog.files.remove(&name).expect("just found");
        self.status_cache = None;
        warn!("removing {name} ({h}), downloaded for shard {shard_id}: {why}");
        let torrent = crate::node::scan::torrent_path(&self.config.shards_dir, &name);
        let sidecar = crate::engine::sidecar::Place::beside(&entry.path, String::new()).path;
        self.pool.handle().submit(move || {
            let _ = std::fs::remove_file(&entry.path);
            let _ = std::fs::remove_file(torrent);
            let _ = std::fs::remove_file(sidecar);
        });
    }

    fn fail_download(&mut self, h: InfoHash, why: String) {
        warn!("download {h} failed: {why}");
        if let Some(d) = self.downloads.get_mut(&h) {
            d.failed = Some(why.clone());
            if let Some(id) = d.shard_id {
                self.fail_waiters(id, crate::protocol::ErrorCode::Internal, why);
            }
        }
    }

    /// Stops download `h` for good: its waiters get `code`, its peers are closed and its swarm
    /// dropped (it never created a file, or its `.part` stays for `--part-expiry`); STATUS keeps
    /// the reason.
    fn abort_download(&mut self, h: InfoHash, code: crate::protocol::ErrorCode, why: String) {
        warn!("download {h} refused: {why}");
        let shard_id = self.downloads.get_mut(&h).and_then(|d| {
            d.failed = Some(why.clone());
            d.shard_id
        });
        if let Some(id) = shard_id {
            self.fail_waiters(id, code, why);
        }
        let keys: Vec<u64> = self.swarms.get(&h).map(|s| s.peers.keys().copied().collect()).unwrap_or_default();
        for key in keys {
            if let Some(&token) = self.conn_ids.get(&key) {
                self.close(token, "download refused");
            }
        }
        self.swarms.remove(&h);
        self.status_cache = None;
    }

    /// Stops download `h` as [`Node::abort_download`] does, its verified pieces recorded first in
    /// its resume data, so the same `DOWNLOAD` or `LOAD_SHARD` later resumes it from its `.part`.
    fn stop_download(&mut self, h: InfoHash, code: crate::protocol::ErrorCode, why: String) {
        self.save_resume(h);
        self.abort_download(h, code, why);
    }

    /// Writes download `h`'s resume data (its verified pieces) on a hash worker; false when it
    /// has no swarm, no storage or no bitfield yet (nothing to save).
    fn save_resume(&mut self, h: InfoHash) -> bool {
        let Some(swarm) = self.swarms.get_mut(&h) else { return false };
        let (Some(have), Some(storage)) = (swarm.have().cloned(), swarm.storage_mut()) else { return false };
        match storage.resume_job(h, &have) {
            Ok(Some(job)) => self.pool.handle().submit(move || {
                if let Err(e) = job() {
                    warn!("saving resume data for {h}: {e:#}");
                }
            }),
            Ok(None) => {}
            Err(e) => warn!("saving resume data for {h}: {e:#}"),
        }
        true
    }

    /// A download counted as stalled (no progress for [`OWED_ACTIVE`]: it owed only its window,
    /// [`owed_bytes`], and others may have been admitted into the rest) that receives blocks again
    /// owes all it lacks once more: it goes on only if that still fits the free space above
    /// `--disk-reserve` beside what the other downloads owe; otherwise it stops (`DISK_BUDGET`, its
    /// `.part` and resume data kept) before it writes past the reserve. Called with each pump.
    fn check_revival(&mut self, h: InfoHash, now: Instant) {
        let (Some(d), Some(s)) = (self.downloads.get(&h), self.swarms.get(&h)) else { return };
        if d.failed.is_some()
            || s.is_complete()
            || s.downloaded <= d.progress_mark.0
            || now.duration_since(d.progress_at) < OWED_ACTIVE
        {
            return;
        }
        let Some(total) = s.total_length() else { return };
        let lacks = total.saturating_sub(s.verified_bytes());
        let (downloaded, pending) = (s.downloaded, self.owed_by_others(h, now));
        let dir = &self.config.shards_dir;
        let free = match crate::torrent::storage::free_space(dir) {
            Ok(f) => f,
            Err(e) => return warn!("free space of {}: {e}", dir.display()),
        };
        let reserve = self.config.disk_reserve;
        if lacks > free.saturating_sub(reserve).saturating_sub(pending) {
            let why = format!(
                "its peers sent blocks again after a stall, but the {lacks} bytes it lacks no longer fit: \
                 {free} are free, {reserve} reserved (--disk-reserve) and {pending} owed to downloads under way; \
                 stopped with its .part and resume data kept: resume it by the same command when there is room"
            );
            return self.stop_download(h, crate::protocol::ErrorCode::DiskBudget, why);
        }
        if let Some(d) = self.downloads.get_mut(&h) {
            (d.progress_at, d.progress_mark.0) = (now, downloaded);
        }
    }

    /// What the downloads under way other than `except` are counted to still need on disk
    /// ([`owed_bytes`]).
    fn owed_by_others(&self, except: InfoHash, now: Instant) -> u64 {
        self.active_downloads(except)
            .filter_map(|(o, d)| {
                let s = &self.swarms[o];
                let active = now.duration_since(d.progress_at) < OWED_ACTIVE;
                s.total_length().map(|t| owed_bytes(t, s.verified_bytes(), active))
            })
            .sum()
    }

    /// Downloads under way (not finished, not failed), other than `except`.
    fn active_downloads(&self, except: InfoHash) -> impl Iterator<Item = (&InfoHash, &Download)> {
        self.downloads.iter().filter(move |(h, d)| {
            **h != except && d.failed.is_none() && self.swarms.get(h).is_some_and(|s| !s.is_complete())
        })
    }

    /// Whether download `h` may go on with target `name` and `length` bytes (each when known):
    /// pinned, `h` is a torrent of the pinned manifest and `name` is not another of its file
    /// names ([`ErrorCode::ManifestMismatch`](crate::protocol::ErrorCode::ManifestMismatch)); the
    /// name is a plain `*.gguf` file name held by no other file or download; the length is not 0
    /// (`WRONG_TYPE`: a GGUF is never empty), and the bytes
    /// fit `--disk-budget` and the free space above `--disk-reserve` (with the bytes the other
    /// downloads under way still need). Checked before any file of the download is created.
    pub(super) fn admit(
        &self,
        h: InfoHash,
        name: Option<&str>,
        length: Option<u64>,
    ) -> Result<(), (crate::protocol::ErrorCode, String)> {
        use crate::protocol::ErrorCode;
        // Pinned, only the manifest's torrents come in (every download target is a *.gguf).
        if let Some(pin) = self.config.model_pin {
            if self.pin_unsatisfied() {
                return Err((
                    ErrorCode::ManifestMismatch,
                    format!(
                        "this node is pinned to manifest {} and does not hold it yet: {h} cannot be checked against it",
                        crate::hash::to_hex(&pin)
                    ),
                ));
            }
            if !self.catalog.manifest.values().any(|(_, m)| *m == h) {
                return Err((ErrorCode::ManifestMismatch, format!("{h} is no shard of the pinned model")));
            }
        }
        if let Some(name) = name {
            check_download_name(name).map_err(|e| (ErrorCode::BadPath, e))?;
            if self.config.model_pin.is_some()
                && let Some(want) = self.catalog.manifest.values().find(|(n, _)| n == name).map(|(_, m)| *m)
                && want != h
            {
                return Err((
                    ErrorCode::ManifestMismatch,
                    format!("{name} is torrent {want} in the pinned manifest, not {h}"),
                ));
            }
            if self.catalog.files.contains_key(name) {
                return Err((
                    ErrorCode::NameConflict,
                    format!("the shards dir already holds {name} (another torrent than {h}); remove it first"),
                ));
            }
            if let Some((other, _)) = self.active_downloads(h).find(|(o, _)| self.swarms[o].name == name) {
                return Err((
                    ErrorCode::NameConflict,
                    format!("{name} is being downloaded already, as torrent {other}"),
                ));
            }
        }
        let Some(length) = length else { return Ok(()) };
        if length == 0 {
            return Err((ErrorCode::WrongType, format!("torrent {h} declares 0 bytes: a GGUF file is never empty")));
        }
        let dir = &self.config.shards_dir;
        let pending = self.owed_by_others(h, Instant::now());
        let free = crate::torrent::storage::free_space(dir)
            .map_err(|e| (ErrorCode::Internal, format!("free space of {}: {e}", dir.display())))?;
        let usable = free.saturating_sub(self.config.disk_reserve).saturating_sub(pending);
        if length > usable {
            return Err((
                ErrorCode::DiskBudget,
                format!(
                    "the torrent declares {length} bytes; {free} are free, {} reserved (--disk-reserve) and {pending} owed to downloads under way",
                    self.config.disk_reserve
                ),
            ));
        }
        if self.config.disk_budget > 0 {
            let used = shards_dir_bytes(dir, h);
            if used.saturating_add(length) > self.config.disk_budget {
                return Err((
                    ErrorCode::DiskBudget,
                    format!(
                        "the torrent declares {length} bytes; the shards dir holds {used} of its --disk-budget {}",
                        self.config.disk_budget
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Starts (or joins) a download of `h` into the shards dir from `peers`. A new download must
    /// pass [`Node::admit`] (with the name and length when the metadata or the target name is
    /// known; a magnet's are checked when its metadata arrives), `--max-downloads` and, for
    /// `client`'s (its [`client_key`](super::handlers::client_key)), `--max-downloads-per-client`.
    /// Joining a download under way costs no slot.
    pub(super) fn start_download(
        &mut self,
        h: InfoHash,
        meta: Option<Arc<Metainfo>>,
        name: &str,
        peers: &[SocketAddr],
        shard_id: Option<u32>,
        client: Option<&super::handlers::Caller>,
    ) -> Result<(), (crate::protocol::ErrorCode, String)> {
        use crate::protocol::ErrorCode;
        let new_swarm = !self.swarms.contains_key(&h);
        if new_swarm {
            let running = self.active_downloads(h).count();
            if running >= self.config.max_downloads {
                return Err((
                    ErrorCode::DownloadLimit,
                    format!(
                        "{running} downloads are under way (--max-downloads {}); try again later",
                        self.config.max_downloads
                    ),
                ));
            }
            if client.is_some_and(|c| c.stranger) {
                let cap = super::handlers::strangers_download_cap(self.config.max_downloads);
                let strangers = self.active_downloads(h).filter(|(_, d)| d.stranger).count();
                if strangers >= cap {
                    return Err((
                        ErrorCode::DownloadLimit,
                        format!(
                            "{strangers} downloads under way were started by callers without the cluster key from \
                             other hosts, their share of --max-downloads {} ({cap}; the rest is kept for this host \
                             and keyed members); try again later",
                            self.config.max_downloads
                        ),
                    ));
                }
            }
            if let Some(client) = client.map(|c| c.key.as_str()) {
                let mine = self.active_downloads(h).filter(|(_, d)| d.client.as_deref() == Some(client)).count();
                if mine >= self.config.max_downloads_per_client {
                    return Err((
                        ErrorCode::DownloadLimit,
                        format!(
                            "this client started {mine} of the downloads under way (--max-downloads-per-client {}); \
                             try again when one ends",
                            self.config.max_downloads_per_client
                        ),
                    ));
                }
            }
            let known_name = meta.as_ref().map(|m| m.info.name.as_str()).or(shard_id.map(|_| name));
            self.admit(h, known_name, meta.as_ref().map(|m| m.info.length))?;
            let dir = self.config.shards_dir.clone();
            // A download a shard's load waits for goes through the page cache: the first step
            // reads every byte, and copying the pieces in as they come touches each page while
            // the network is the bottleneck, where a direct write leaves the file on disk to be
            // read back and touched after it (docs/ARCHITECTURE.md, "Direct I/O").
            let direct_io = self.config.direct_io && shard_id.is_none();
            let mut swarm = Swarm::download(h, meta, name, &dir, self.peer_id, Instant::now(), direct_io)
                .map_err(|e| (ErrorCode::Internal, format!("starting the download of {name}: {e:#}")))?;
            self.make_private(&mut swarm).map_err(|e| (ErrorCode::Internal, format!("{e:#}")))?;
            swarm.set_listen_port(self.local_addr.port());
            info!("downloading {} ({h}) from {} peers", swarm.name, peers.len());
            self.swarms.insert(h, swarm);
            self.forget_failed();
        }
        let name = self.swarms[&h].name.clone();
        let d = self.downloads.entry(h).or_insert_with(|| Download {
            peers: Vec::new(),
            dialled: HashMap::new(),
            name,
            started: Instant::now(),
            shard_id,
            client: None,
            stranger: false,
            resume_dirty: false,
            resume_saved: Instant::now(),
            failed: None,
            requeried: None,
            pex_peers: 0,
            pex_unproven: Default::default(),
            progress_at: Instant::now(),
            progress_mark: (0, 0),
        });
        if new_swarm {
            // A failed download started again: its stall clock and peers' dial budgets anew, and
            // charged to the client that started it now.
            (d.progress_at, d.progress_mark) = (Instant::now(), (0, 0));
            d.dialled.clear();
            d.client = client.map(|c| c.key.clone());
            d.stranger = client.is_some_and(|c| c.stranger);
        }
        d.failed = None;
        for p in peers {
            if d.peers.contains(p) || *p == self.local_addr {
                continue;
            }
            if d.peers.len() >= self.config.max_download_peers {
                // Room from a PEX-learned peer that never handshook, else the list is full.
                let Some(i) = d.peers.iter().position(|q| d.pex_unproven.contains(q)) else { break };
                let old = d.peers.remove(i);
                d.pex_unproven.remove(&old);
                d.dialled.remove(&old);
            }
            d.peers.push(*p);
        }
        if d.shard_id.is_none() {
            d.shard_id = shard_id;
        }
        self.status_cache = None;
        self.dial_peers(h);
        self.pump(h);
        Ok(())
    }

    /// Keeps the newest [`FAILED_KEPT`] failed downloads (for STATUS), forgets older ones.
    fn forget_failed(&mut self) {
        let mut failed: Vec<(Instant, InfoHash)> = self
            .downloads
            .iter()
            .filter(|(h, d)| d.failed.is_some() && !self.swarms.contains_key(h))
            .map(|(h, d)| (d.started, *h))
            .collect();
        if failed.len() > FAILED_KEPT {
            failed.sort();
            for (_, h) in &failed[..failed.len() - FAILED_KEPT] {
                self.downloads.remove(h);
            }
        }
    }

    /// Dials the download's known peers it is not connected to; a peer whose dials have failed
    /// for `--redial-give-up` is dropped.
    pub(super) fn dial_peers(&mut self, h: InfoHash) {
        let now = Instant::now();
        let give_up = self.config.redial_give_up;
        let Some(d) = self.downloads.get_mut(&h) else { return };
        let Some(swarm) = self.swarms.get(&h) else { return };
        if swarm.is_complete() || d.failed.is_some() {
            return;
        }
        let connected: Vec<SocketAddr> = swarm.peers.values().map(|p| p.addr).collect();
        let dialled = &mut d.dialled;
        d.peers.retain(|p| {
            let unproven_spent = |r: &Dial| !r.proven && r.unproven_dials >= MAX_UNPROVEN_DIALS;
            let dead = !connected.contains(p)
                && dialled.get(p).is_some_and(|r| {
                    r.attempts > 0 && (now.duration_since(r.failing_since) >= give_up || unproven_spent(r))
                });
            if dead {
                if dialled.get(p).is_some_and(unproven_spent) {
                    info!("download {h}: giving up on peer {p} (never handshook in {MAX_UNPROVEN_DIALS} dials)");
                } else {
                    info!("download {h}: giving up on peer {p} (no connection for {} s)", give_up.as_secs());
                }
                dialled.remove(p);
                d.pex_unproven.remove(p);
            }
            !dead
        });
        let mut to_dial = Vec::new();
        for p in &d.peers {
            let recent = d.dialled.get(p).is_some_and(|r| {
                let wait = REDIAL_FIRST.saturating_mul(1 << r.attempts.min(8)).min(REDIAL_MAX);
                !r.fallback && now.duration_since(r.last) < wait
            });
            let banned = swarm.banned.contains(&crate::torrent::swarm::ban_key(*p)) || swarm.banned.contains(p);
            if !connected.contains(p) && !recent && !banned {
                to_dial.push(*p);
            }
        }
        // The node's own download makes room for its dials at the peer-wire cap: accepted peers
        // still in their handshake or that moved under a piece's worth past --peer-shed-grace go
        // first, a few a pass (red-team round 11: strangers' idle connections, 128 accepted
        // beside 128 dials to tarpits, left the owner's download with no peer for 40 s). Busy
        // peers and the node's own dials are never shed, nor anything for a stranger's download.
        let stranger = d.stranger;
        for _ in 0..if stranger { 0 } else { to_dial.len().min(DIAL_SHED_MAX) } {
            if self.census.count(Kind::PeerWire) < self.config.max_peer_connections
                || !self.shed_least_useful(|o| o.kind == Kind::PeerWire, "a dial of the node's own download")
            {
                break;
            }
        }
        let first_encrypted = matches!(self.config.encryption, Encryption::PreferEncrypted | Encryption::Require);
        // Only as many dials as the node's own caps leave room for: a dial the node itself could
        // not make is not tried, and is never counted against the peer (red-team round 10: four
        // such non-dials dropped a download's only seed as "never handshook").
        let mut room = (self.config.max_connections.saturating_sub(self.census.total()))
            .min(self.config.max_peer_connections.saturating_sub(self.census.count(Kind::PeerWire)));
        // Strangers' downloads dial into their half of the dial reserve only, all of them together.
        if stranger {
            let held = self.strangers_dials();
            room = room.min(super::limits::strangers_dial_cap(self.config.max_peer_connections).saturating_sub(held));
        }
        let Some(d) = self.downloads.get_mut(&h) else { return };
        let mut dials = Vec::new();
        for p in to_dial {
            if dials.len() >= room {
                break;
            }
            let r = d.dialled.entry(p).or_insert(Dial {
                last: now,
                attempts: 0,
                failing_since: now,
                encrypted: first_encrypted,
                fallback: false,
                fell_back: false,
                proven: false,
                unproven_dials: 0,
            });
            if r.attempts == 0 {
                r.failing_since = now;
            }
            if !r.proven {
                if r.unproven_dials >= MAX_UNPROVEN_DIALS {
                    continue; // dropped at the next pass, once this connection is gone
                }
                r.unproven_dials += 1;
            }
            r.last = now;
            r.attempts += 1;
            r.fallback = false;
            dials.push((p, r.encrypted));
        }
        for (p, encrypted) in dials {
            if let Err(e) = self.dial(h, p, encrypted) {
                debug!("dialling {p}: {e}");
            }
        }
    }

    /// Outgoing peer-wire connections (dialling or open) of downloads strangers started.
    fn strangers_dials(&self) -> usize {
        let stranger = |h: &InfoHash| self.downloads.get(h).is_some_and(|d| d.stranger);
        self.conns.iter().flatten().filter(|c| c.outgoing && c.torrent.as_ref().is_some_and(stranger)).count()
    }

    /// Addresses a peer's PEX named: candidates of a running download, up to
    /// `--max-download-peers` known peers in all and half of them not yet handshaken, then
    /// dialled like the rest. A seed takes none.
    fn add_pex_peers(&mut self, h: InfoHash, addrs: &[SocketAddr]) {
        let (Some(d), Some(s)) = (self.downloads.get_mut(&h), self.swarms.get(&h)) else { return };
        if s.is_complete() || d.failed.is_some() {
            return;
        }
        let before = d.peers.len();
        let pex_cap = (self.config.max_download_peers / 2).max(1);
        for p in addrs {
            if d.peers.len() >= self.config.max_download_peers || d.pex_unproven.len() >= pex_cap {
                break;
            }
            if !d.peers.contains(p) && *p != self.local_addr {
                d.peers.push(*p);
                d.pex_unproven.insert(*p);
            }
        }
        let added = d.peers.len() - before;
        d.pex_peers += added as u64;
        if added > 0 {
            debug!("download {h}: {added} peers from PEX");
            self.status_cache = None;
            self.dial_peers(h);
        }
    }

    /// A dialled peer handshook: its dials count from zero again.
    fn dial_succeeded(&mut self, h: InfoHash, addr: SocketAddr) {
        if let Some(d) = self.downloads.get_mut(&h) {
            d.pex_unproven.remove(&addr);
        }
        if let Some(r) = self.downloads.get_mut(&h).and_then(|d| d.dialled.get_mut(&addr)) {
            r.attempts = 0;
            r.fell_back = false;
            r.proven = true;
        }
    }

    /// Removes `.part` files no download has used for `--part-expiry`, at startup and every
    /// [`SWEEP_EVERY`], on a worker.
    fn sweep_stale_parts(&mut self, now: Instant) {
        if self.parts_swept.is_some_and(|t| now.duration_since(t) < SWEEP_EVERY) {
            return;
        }
        self.parts_swept = Some(now);
        let active: std::collections::HashSet<InfoHash> =
            self.swarms.iter().filter(|(_, s)| !s.is_complete()).map(|(h, _)| *h).collect();
        let (dir, expiry) = (self.config.shards_dir.clone(), self.config.part_expiry);
        self.pool.handle().submit(move || {
            for name in crate::torrent::storage::remove_stale_parts(&dir, &|h| active.contains(&h), expiry) {
                info!("removed {name}: no download used it for {} s (--part-expiry)", expiry.as_secs());
            }
        });
    }

    /// Dials `addr` for torrent `h`, opening with an MSE handshake if `encrypted`.
    fn dial(&mut self, h: InfoHash, addr: SocketAddr, encrypted: bool) -> anyhow::Result<()> {
        if self.census.total() >= self.config.max_connections
            || self.census.count(Kind::PeerWire) >= self.config.max_peer_connections
        {
            anyhow::bail!("connection limit reached (--max-connections, --max-peer-connections)");
        }
        let mut stream = TcpStream::connect(addr)?;
        let _ = stream.set_nodelay(true);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let token = Token(slot + FIRST_CONN);
        if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE) {
            self.free.push(slot);
            return Err(e.into());
        }
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        let mut conn = if encrypted {
            self.mse.started += 1;
            Conn::outgoing_encrypted(stream, addr, id, h, self.config.encryption, Instant::now())
        } else {
            Conn::outgoing(stream, addr, id, h)
        };
        conn.wants_writable = true;
        self.conns[slot] = Some(conn);
        self.conn_ids.insert(id, token);
        self.census.opened(addr.ip(), Kind::PeerWire, false);
        let swarm = self.swarms.get_mut(&h).expect("dialled for a known swarm");
        swarm.add_peer(id, addr, true, Instant::now())?;
        Ok(())
    }

    /// A dialled connection became writable: it is connected, or it failed.
    pub(super) fn finish_connect(&mut self, token: Token) -> bool {
        let Some(conn) = self.conn(token) else { return false };
        if !conn.connecting {
            return true;
        }
        match conn.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                self.close(token, &format!("connect failed: {e}"));
                return false;
            }
        }
        match conn.stream.peer_addr() {
            Ok(_) => {
                conn.connecting = false;
                debug!("connected to peer {}", conn.peer);
                if let Some(h) = conn.torrent {
                    self.pump(h);
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => false,
            Err(e) => {
                self.close(token, &format!("connect failed: {e}"));
                false
            }
        }
    }

    /// A peer connection closed: the swarm forgets it. A dialled peer that dropped us before
    /// its handshake is redialled the other way (plaintext after MSE, or MSE after plaintext)
    /// under the `prefer-*` policies, as libtorrent does: at once the first time since its last
    /// handshake, after the usual back-off later (such a close counts as a failed dial).
    pub(super) fn peer_closed(&mut self, conn: &Conn) {
        if conn.kind != Kind::PeerWire {
            return;
        }
        if conn.crypt.handshaking() && conn.read_closed {
            self.mse.closed_midway += 1;
        }
        let may_switch = matches!(self.config.encryption, Encryption::PreferEncrypted | Encryption::PreferPlaintext);
        if conn.outgoing
            && !conn.handshaken
            && !conn.connecting
            && may_switch
            && let Some(h) = conn.torrent
            && let Some(r) = self.downloads.get_mut(&h).and_then(|d| d.dialled.get_mut(&conn.peer))
        {
            let was_encrypted = !matches!(conn.crypt, Crypt::Plain);
            r.encrypted = !was_encrypted;
            if !r.fell_back {
                r.fallback = true;
                r.fell_back = true;
                self.mse.fallbacks += 1;
                debug!(
                    "peer {} dropped our {} handshake; redialling",
                    conn.peer,
                    if was_encrypted { "MSE" } else { "plaintext" }
                );
            }
        }
        if let Some(h) = conn.torrent
            && let Some(swarm) = self.swarms.get_mut(&h)
        {
            swarm.remove_peer(conn.id);
        }
    }

    /// Periodic work: timeouts, redials, resume data, throttled serving.
    pub(super) fn tick_swarms(&mut self) {
        let now = Instant::now();
        self.sweep_stale_parts(now);
        let hashes: Vec<InfoHash> = self.swarms.keys().copied().collect();
        for h in hashes {
            if let Some(s) = self.swarms.get_mut(&h) {
                s.tick(now);
            }
            self.dial_peers(h);
            self.requery_if_dry(h, now);
            self.save_resume_if_due(h, now);
            self.pump(h);
            self.fail_if_stalled(h, now);
        }
    }

    /// A download that got no metadata piece and no block for `--download-stall-timeout` fails
    /// and frees its `--max-downloads` slot (red-team round 8: eight magnets of random info
    /// hashes held every slot until restart). A slow swarm that still sends blocks is kept.
    fn fail_if_stalled(&mut self, h: InfoHash, now: Instant) {
        let (Some(d), Some(s)) = (self.downloads.get_mut(&h), self.swarms.get(&h)) else { return };
        if s.is_complete() || d.failed.is_some() {
            return;
        }
        let mark = (s.downloaded, s.metadata_pieces_held());
        let progressed = mark.0 > d.progress_mark.0 || mark.1 > d.progress_mark.1;
        d.progress_mark = mark;
        if progressed {
            d.progress_at = now;
            return;
        }
        let stall = self.config.download_stall_timeout;
        if now.duration_since(d.progress_at) < stall {
            return;
        }
        let what = if s.metainfo().is_none() { "no metadata" } else { "no block" };
        let why = format!(
            "no progress for {} s ({what} from {} known peers, {} connected; --download-stall-timeout)",
            stall.as_secs(),
            d.peers.len(),
            s.peers.len()
        );
        self.abort_download(h, crate::protocol::ErrorCode::TorrentUnavailable, why);
    }

    /// A download with no peer connected asks the DHT for more, every 10 s.
    fn requery_if_dry(&mut self, h: InfoHash, now: Instant) {
        let (Some(d), Some(s)) = (self.downloads.get_mut(&h), self.swarms.get(&h)) else { return };
        if s.is_complete() || d.failed.is_some() || !s.peers.is_empty() {
            return;
        }
        if d.requeried.is_some_and(|t| now.duration_since(t) < REQUERY_EVERY) {
            return;
        }
        d.requeried = Some(now);
        self.dht_requery(h);
    }

    fn save_resume_if_due(&mut self, h: InfoHash, now: Instant) {
        let Some(d) = self.downloads.get_mut(&h) else { return };
        if !d.resume_dirty || now.duration_since(d.resume_saved) < RESUME_EVERY {
            return;
        }
        if self.save_resume(h)
            && let Some(d) = self.downloads.get_mut(&h)
        {
            d.resume_dirty = false;
            d.resume_saved = now;
        }
    }

    /// With `--private`, only peers proving the cluster key are served by `swarm`.
    fn make_private(&self, swarm: &mut Swarm) -> anyhow::Result<()> {
        if let (true, Some(key)) = (self.config.private, &self.config.cluster_key) {
            let seed = crate::protocol::auth::random_bytes::<32>()
                .map_err(|e| anyhow::anyhow!("no randomness for a private swarm's nonces: {e}"))?;
            swarm.set_private(key.clone(), seed);
        }
        Ok(())
    }

    /// Starts seeding a complete file the scan found.
    pub(super) fn seed_file(&mut self, entry: &FileEntry) {
        let Some(meta) = entry.meta.clone() else { return };
        if !self.config.enable_torrent || self.swarms.contains_key(&meta.info_hash) {
            return;
        }
        match Swarm::seed(meta.clone(), &entry.path, self.peer_id, Instant::now())
            .and_then(|mut s| self.make_private(&mut s).map(|()| s))
        {
            Ok(mut s) => {
                s.set_listen_port(self.local_addr.port());
                self.swarms.insert(meta.info_hash, s);
            }
            Err(e) => warn!("cannot seed {}: {e:#}", entry.filename),
        }
    }

    /// Downloads for STATUS.
    pub(super) fn downloads_json(&self) -> serde_json::Value {
        let list: Vec<serde_json::Value> = self
            .downloads
            .iter()
            .map(|(h, d)| {
                let Some(s) = self.swarms.get(h) else {
                    return serde_json::json!({
                        "info_hash": h.to_hex(),
                        "name": d.name,
                        "shard_id": d.shard_id,
                        "complete": false,
                        "error": d.failed,
                    });
                };
                let (have, pieces) = s.progress();
                let secs = s.started.elapsed().as_secs_f64().max(1e-3);
                serde_json::json!({
                    "info_hash": h.to_hex(),
                    "name": s.name,
                    "shard_id": d.shard_id,
                    "bytes": s.total_length(),
                    "verified_bytes": s.verified_bytes(),
                    "pieces": pieces,
                    "pieces_verified": have,
                    "pieces_rechecked": s.rechecked,
                    "peers": s.peers.len(),
                    "known_peers": d.peers.len(),
                    "pex_peers": d.pex_peers,
                    "downloaded": s.downloaded,
                    "uploaded": s.uploaded,
                    "wasted": s.wasted,
                    "rate_bytes_s": if s.is_complete() { 0.0 } else { s.downloaded as f64 / secs },
                    "seconds": s.completed.unwrap_or_else(Instant::now).duration_since(s.started).as_secs_f64(),
                    "complete": s.is_complete(),
                    "banned": s.banned.len(),
                    "error": d.failed,
                    "pipelines": s.pipelines().into_iter().map(|(addr, window, asked, reqq, rtt, rate)| {
                        serde_json::json!({"address": addr.to_string(), "window": window, "asked": asked,
                            "reqq": reqq, "rtt_ms": rtt, "rate_bytes_s": rate})
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// The Fast extension's and PEX's counters summed over every swarm, for STATUS `peer_wire`.
    pub(super) fn peer_wire_json(&self) -> serde_json::Value {
        let mut t = crate::torrent::swarm::fast::ExtStats::default();
        for s in self.swarms.values() {
            let x = &s.stats;
            t.fast_peers += x.fast_peers;
            t.have_all_sent += x.have_all_sent;
            t.have_all_received += x.have_all_received;
            t.rejects_sent += x.rejects_sent;
            t.rejects_received += x.rejects_received;
            t.allowed_fast_sent += x.allowed_fast_sent;
            t.allowed_fast_received += x.allowed_fast_received;
            t.suggests_received += x.suggests_received;
            t.fast_ignored += x.fast_ignored;
            t.fast_closed += x.fast_closed;
            t.pex_sent += x.pex_sent;
            t.pex_received += x.pex_received;
            t.pex_peers_taken += x.pex_peers_taken;
            t.pex_ignored += x.pex_ignored;
            t.pex_closed += x.pex_closed;
            t.metadata_rejects_sent += x.metadata_rejects_sent;
        }
        // Unsent output of peer-wire connections: each stays under `conn::PEER_OUT_MAX` plus one
        // read turn's answers (the threat model's bound).
        let (mut queued, mut largest, mut paused) = (0usize, 0usize, 0usize);
        for c in self.conns.iter().flatten().filter(|c| c.kind == Kind::PeerWire) {
            let n = c.pending_output();
            queued += n;
            largest = largest.max(n);
            paused += usize::from(!c.may_read() && !c.connecting && !c.read_closed && !c.close_after_flush);
        }
        serde_json::json!({
            "output": {
                "queued_bytes": queued,
                "largest_queued_bytes": largest,
                "reads_paused": paused,
                "metadata_rejects_sent": t.metadata_rejects_sent,
            },
            "fast": {
                "peers": t.fast_peers,
                "have_all_sent": t.have_all_sent,
                "have_all_received": t.have_all_received,
                "rejects_sent": t.rejects_sent,
                "rejects_received": t.rejects_received,
                "allowed_fast_sent": t.allowed_fast_sent,
                "allowed_fast_received": t.allowed_fast_received,
                "suggests_received": t.suggests_received,
                "ignored": t.fast_ignored,
                "closed": t.fast_closed,
            },
            "pex": {
                "sent": t.pex_sent,
                "received": t.pex_received,
                "peers_taken": t.pex_peers_taken,
                "ignored": t.pex_ignored,
                "closed": t.pex_closed,
            },
        })
    }

    /// Upload totals of every swarm, for STATUS.
    pub(super) fn uploaded_total(&self) -> u64 {
        self.swarms.values().map(|s| s.uploaded).sum()
    }
}

/// What a download under way is counted to still need of the disk when another is admitted
/// (`length` declared, `verified` bytes held, `active`: started or sent a block within
/// [`OWED_ACTIVE`]). An active download owes all it lacks, so downloads running side by side
/// never overfill the disk together (red-team round 11: two admitted at once with only a window
/// counted both failed at ENOSPC). A stalled one owes what it lacks but no more than it already
/// holds and at least [`OWED_WINDOW`]: a torrent declaring all the free space with no seed (a
/// sparse `.part`) refuses other downloads for [`OWED_ACTIVE`], not until its stall timeout
/// (red-team round 10). One that cannot fit at all is refused up front.
pub fn owed_bytes(length: u64, verified: u64, active: bool) -> u64 {
    let lacks = length.saturating_sub(verified);
    if active { lacks } else { lacks.min(verified.max(OWED_WINDOW)) }
}

/// How recent a download's start or last block must be for it to owe all it lacks (see
/// [`owed_bytes`]).
pub const OWED_ACTIVE: Duration = Duration::from_secs(10);

/// Bytes a download is counted to need before it has verified as many (see [`owed_bytes`]).
pub const OWED_WINDOW: u64 = 256 << 20;

/// Accepted peers one pass of a download's dials may shed to make room (see `dial_peers`).
const DIAL_SHED_MAX: usize = 4;

/// `crypto_select`'s name for logs.
fn method_name(method: u32) -> &'static str {
    if method == mse::RC4 { "RC4" } else { "plaintext" }
}

/// Whether `name` may be a download's target in the shards dir: a plain `*.gguf` file name (no
/// path, not hidden, no control characters, at most 255 bytes). This keeps downloads off the
/// node's own files (`manifest.json`, `.dht-nodes`, `*.torrent`, `*.part`, `*.resume`).
pub fn check_download_name(name: &str) -> Result<(), String> {
    crate::torrent::metainfo::check_file_name(name).map_err(|e| format!("download target: {e}"))?;
    let stem = name.strip_suffix(".gguf").unwrap_or("");
    if stem.is_empty() || name.starts_with('.') || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(format!(
            "download target {name:?} is not a plain *.gguf file name (hidden and control files are refused)"
        ));
    }
    Ok(())
}

/// Bytes the shards dir holds in GGUF, `.part` and repack sidecar files (`NAME.gguf.repack`
/// and one being written, `.NAME.gguf.repack.tmp-*`), less torrent `h`'s own `.part` (its
/// declared length is counted by the caller). A short directory listing.
fn shards_dir_bytes(dir: &std::path::Path, h: InfoHash) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            let sidecar = n.ends_with(".gguf.repack") || n.contains(".gguf.repack.tmp-");
            (n.ends_with(".gguf") || n.ends_with(".part") || sidecar)
                && crate::torrent::storage::part_info_hash(&n) != Some(h)
        })
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// The catalog entry of a file just downloaded, with its `.torrent` saved
/// beside it so a restart seeds it without rehashing. Runs on a worker.
fn finished_entry(path: &std::path::Path, meta: &Metainfo) -> FileEntry {
    let filename = meta.info.name.clone();
    let size = meta.info.length;
    let mut m = meta.clone();
    if let Ok(md) = std::fs::metadata(path) {
        m.source = Some(crate::torrent::create::stamp_of(&md));
    }
    let dir = path.parent().map(PathBuf::from).unwrap_or_default();
    let _ = std::fs::write(super::scan::torrent_path(&dir, &filename), m.to_torrent_bytes());
    FileEntry {
        filename,
        path: path.to_path_buf(),
        size,
        gguf: super::scan::summarize(path),
        meta: Some(Arc::new(m)),
        meta_error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_owes_what_it_lacks_up_to_what_it_holds_past_a_first_window() {
        const GB: u64 = 1 << 30;
        assert_eq!(owed_bytes(70 * GB, 0, false), OWED_WINDOW, "stalled, nothing held: the first window only");
        assert_eq!(owed_bytes(1 << 20, 0, false), 1 << 20, "a small file owes all of itself");
        assert_eq!(owed_bytes(70 * GB, 2 * GB, false), 2 * GB, "as much again as it holds");
        assert_eq!(owed_bytes(3 * GB, 2 * GB, false), GB, "never more than it lacks");
        assert_eq!(owed_bytes(3 * GB, 3 * GB, false), 0);
        assert_eq!(owed_bytes(70 * GB, 0, true), 70 * GB, "an active download owes all it lacks");
        assert_eq!(owed_bytes(3 * GB, 2 * GB, true), GB);
    }
}
