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
use super::{FIRST_CONN, Node, NodeEvent};
use crate::hash::Digest;
use crate::torrent::swarm::{Action, PieceData, Swarm};
use crate::torrent::wire::{self, BLOCK_SIZE, Handshake};
use crate::torrent::{InfoHash, Metainfo};
use crate::{debug, info, warn};

/// Output kept queued per peer connection while serving blocks.
const PEER_OUT_HIGH: usize = 4 * 1024 * 1024;
/// Wait before dialling a peer again: doubles per failed attempt, from this...
const REDIAL_FIRST: Duration = Duration::from_millis(200);
/// ...up to this.
const REDIAL_MAX: Duration = Duration::from_secs(30);
/// How often a download without peers asks the DHT again.
const REQUERY_EVERY: Duration = Duration::from_secs(10);
/// How often verified pieces are recorded in the resume file.
const RESUME_EVERY: Duration = Duration::from_secs(1);

/// A download the node runs, and who waits for it.
pub struct Download {
    pub peers: Vec<SocketAddr>,
    /// When each peer was last dialled, and how many times in a row.
    dialled: HashMap<SocketAddr, (Instant, u32)>,
    pub shard_id: Option<u32>,
    resume_dirty: bool,
    resume_saved: Instant,
    pub failed: Option<String>,
    /// When the DHT was last asked for more peers.
    requeried: Option<Instant>,
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
            if !conn.handshaken {
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
                Err(e) => return self.close(token, &format!("peer wire: {e}")),
            };
            let result = swarm.on_message(conn.id, msg, now);
            conn.consume_raw(used, now);
            if let Err(e) = result {
                let why = format!("peer {}: {e}", conn.peer);
                return self.close(token, &why);
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
        Ok(())
    }

    /// Moves every peer's queued bytes into its connection, serves queued
    /// requests where there is room, runs the swarm's actions, and writes.
    pub(super) fn pump(&mut self, h: InfoHash) {
        let now = Instant::now();
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
                let served = swarm.serve(key, room, &mut mine, &mut blocks);
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
                if let Some(s) = self.swarms.get(&h) {
                    info!("metadata for {h} received from peers: {} ({} bytes)", s.name, s.total_length().unwrap_or(0));
                }
            }
            Action::Disconnect(key, why) => {
                if let Some(&token) = self.conn_ids.get(&key) {
                    info!("dropping peer: {why}");
                    self.close(token, &why);
                }
            }
            Action::Complete => self.start_finish(h),
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
        if let Some(e) = write_error {
            // The disk, not the peers: stop this download with the reason.
            return self.fail_download(h, e);
        }
        let Some(swarm) = self.swarms.get_mut(&h) else { return };
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

    fn fail_download(&mut self, h: InfoHash, why: String) {
        warn!("download {h} failed: {why}");
        if let Some(d) = self.downloads.get_mut(&h) {
            d.failed = Some(why.clone());
            if let Some(id) = d.shard_id {
                self.fail_waiters(id, crate::protocol::ErrorCode::Internal, why);
            }
        }
    }

    /// Starts (or joins) a download of `h` into the shards dir from `peers`.
    pub(super) fn start_download(
        &mut self,
        h: InfoHash,
        meta: Option<Arc<Metainfo>>,
        name: &str,
        peers: &[SocketAddr],
        shard_id: Option<u32>,
    ) -> anyhow::Result<()> {
        if !self.swarms.contains_key(&h) {
            let dir = self.config.shards_dir.clone();
            let swarm = Swarm::download(h, meta, name, &dir, self.peer_id, Instant::now(), self.config.direct_io)?;
            info!("downloading {} ({h}) from {} peers", swarm.name, peers.len());
            self.swarms.insert(h, swarm);
        }
        let d = self.downloads.entry(h).or_insert_with(|| Download {
            peers: Vec::new(),
            dialled: HashMap::new(),
            shard_id,
            resume_dirty: false,
            resume_saved: Instant::now(),
            failed: None,
            requeried: None,
        });
        d.failed = None;
        for p in peers {
            if !d.peers.contains(p) && *p != self.local_addr {
                d.peers.push(*p);
            }
        }
        if d.shard_id.is_none() {
            d.shard_id = shard_id;
        }
        self.status_cache = None;
        self.dial_peers(h);
        self.pump(h);
        Ok(())
    }

    /// Dials the download's known peers it is not connected to.
    pub(super) fn dial_peers(&mut self, h: InfoHash) {
        let now = Instant::now();
        let Some(d) = self.downloads.get_mut(&h) else { return };
        let Some(swarm) = self.swarms.get(&h) else { return };
        if swarm.is_complete() {
            return;
        }
        let connected: Vec<SocketAddr> = swarm.peers.values().map(|p| p.addr).collect();
        let mut to_dial = Vec::new();
        for p in &d.peers {
            let recent = d.dialled.get(p).is_some_and(|(t, n)| {
                let wait = REDIAL_FIRST.saturating_mul(1 << (*n).min(8)).min(REDIAL_MAX);
                now.duration_since(*t) < wait
            });
            if !connected.contains(p) && !recent && !swarm.banned.contains(&crate::torrent::swarm::ban_key(*p)) {
                to_dial.push(*p);
            }
        }
        for p in &to_dial {
            let attempts = d.dialled.get(p).map_or(0, |(_, n)| n + 1);
            d.dialled.insert(*p, (now, attempts));
        }
        for p in to_dial {
            if let Err(e) = self.dial(h, p) {
                debug!("dialling {p}: {e}");
            }
        }
    }

    fn dial(&mut self, h: InfoHash, addr: SocketAddr) -> anyhow::Result<()> {
        if self.open_conns >= self.config.max_connections {
            anyhow::bail!("connection limit reached");
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
        let mut conn = Conn::outgoing(stream, addr, id, h);
        conn.wants_writable = true;
        self.conns[slot] = Some(conn);
        self.conn_ids.insert(id, token);
        self.open_conns += 1;
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

    /// A peer connection closed: the swarm forgets it.
    pub(super) fn peer_closed(&mut self, conn: &Conn) {
        if conn.kind != Kind::PeerWire {
            return;
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
        let hashes: Vec<InfoHash> = self.swarms.keys().copied().collect();
        for h in hashes {
            if let Some(s) = self.swarms.get_mut(&h) {
                s.tick(now);
            }
            self.dial_peers(h);
            self.requery_if_dry(h, now);
            self.save_resume_if_due(h, now);
            self.pump(h);
        }
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
        let Some(swarm) = self.swarms.get_mut(&h) else { return };
        let (Some(have), Some(storage)) = (swarm.have().cloned(), swarm.storage_mut()) else { return };
        d.resume_dirty = false;
        d.resume_saved = now;
        match storage.resume_job(h, &have) {
            Ok(Some(job)) => self.pool.handle().submit(move || {
                if let Err(e) = job() {
                    warn!("saving resume data for {h}: {e:#}");
                }
            }),
            Ok(None) => {}
            Err(e) => warn!("saving resume data for {h}: {e:#}"),
        }
    }

    /// Starts seeding a complete file the scan found.
    pub(super) fn seed_file(&mut self, entry: &FileEntry) {
        let Some(meta) = entry.meta.clone() else { return };
        if !self.config.enable_torrent || self.swarms.contains_key(&meta.info_hash) {
            return;
        }
        match Swarm::seed(meta.clone(), &entry.path, self.peer_id, Instant::now()) {
            Ok(s) => {
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
            .filter_map(|(h, d)| {
                let s = self.swarms.get(h)?;
                let (have, pieces) = s.progress();
                let secs = s.started.elapsed().as_secs_f64().max(1e-3);
                Some(serde_json::json!({
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
                    "downloaded": s.downloaded,
                    "uploaded": s.uploaded,
                    "wasted": s.wasted,
                    "rate_bytes_s": if s.is_complete() { 0.0 } else { s.downloaded as f64 / secs },
                    "seconds": s.completed.unwrap_or_else(Instant::now).duration_since(s.started).as_secs_f64(),
                    "complete": s.is_complete(),
                    "banned": s.banned.len(),
                    "error": d.failed,
                }))
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// Upload totals of every swarm, for STATUS.
    pub(super) fn uploaded_total(&self) -> u64 {
        self.swarms.values().map(|s| s.uploaded).sum()
    }
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
