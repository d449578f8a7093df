//! The DHT in the event loop: the UDP socket on the node's port, the DHT's
//! timers, announcing what the node seeds, and finding peers for shards.
//!
//! Keys a node announces (DESIGN section 5): each seeded file's info hash;
//! `SHA1("shardnet:" + cluster + ":" + filename)`, the peers holding that
//! shard; and `SHA1("shardnet:" + cluster)`, the cluster's members.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use serde_json::{Value, json};

use super::{Node, NodeEvent};
use crate::client::Client;
use crate::config::NodeConfig;
use crate::dht::krpc::{Id, NodeInfo, encode_nodes};
use crate::dht::node::{Dht, DhtConfig, Event, LookupKind, LookupResult};
use crate::dht::node_id;
use crate::dht::routing::K;
use crate::hash;
use crate::protocol::{ErrorCode, success_payload};
use crate::torrent::{InfoHash, utp};
use crate::{debug, info, warn};

/// Re-announce every key this often (stored peers expire after 30 min).
const ANNOUNCE_EVERY: Duration = Duration::from_secs(15 * 60);
/// An announce that reached few nodes is retried after this, doubling with
/// each retry up to `ANNOUNCE_EVERY` (a small network never has 4 nodes to
/// reach, and must not be asked again every few seconds forever).
const ANNOUNCE_RETRY: Duration = Duration::from_secs(3);
/// Save the routing table this often.
const SAVE_TABLE_EVERY: Duration = Duration::from_secs(60);
/// The first save, after joining.
const FIRST_SAVE: Duration = Duration::from_secs(3);
/// Where the routing table is saved, in the shards dir.
const TABLE_FILE: &str = ".dht-nodes";
/// Peers asked for their file list when resolving a shard by name.
const RESOLVE_ASK: usize = 8;

pub fn name_key(cluster: &str, filename: &str) -> Id {
    Id(hash::sha1(format!("shardnet:{cluster}:{filename}").as_bytes()))
}

pub fn cluster_key(cluster: &str) -> Id {
    Id(hash::sha1(format!("shardnet:{cluster}").as_bytes()))
}

/// Why a lookup runs.
pub(super) enum Purpose {
    /// Our key (before any keyed naming), for the retry bookkeeping.
    Announce { key: Id },
    /// A FIND_PEERS request waiting for the answer.
    FindPeers { token: Token, conn_id: u64, request_id: Value, key: Id },
    /// Peers under a shard's name key: ask them its info hash.
    ShardByName { shard_id: u32, filename: String },
    /// Holders of the pinned manifest (a shard's load waits for it).
    Manifest { shard_id: u32, filename: String },
    /// Peers for a torrent to download (and the shard waiting for it).
    PeersFor { info_hash: InfoHash, shard_id: Option<u32>, name: String },
}

/// One key's last announce.
#[derive(Clone, Copy)]
struct Announced {
    at: Instant,
    /// Nodes in the routing table then.
    nodes: usize,
    /// Announces in a row that reached fewer than K/2 nodes.
    retries: u32,
}

pub(super) struct DhtState {
    pub dht: Dht,
    socket: UdpSocket,
    next_tick: Instant,
    purposes: HashMap<u64, Purpose>,
    /// When each key was last announced, and how many nodes the table held then.
    announced: HashMap<Id, Announced>,
    table_saved: Instant,
}

/// Binds the DHT's UDP socket on the node's port and prepares the DHT.
pub(super) fn bind(
    config: &NodeConfig,
    local: SocketAddr,
    id: [u8; 20],
    registry: &Registry,
    token: Token,
) -> Option<DhtState> {
    let SocketAddr::V4(local4) = local else {
        warn!("DHT: IPv6 listen address {local}: the DHT runs on IPv4 only; disabled");
        return None;
    };
    let mut socket = match UdpSocket::bind(SocketAddr::V4(local4)) {
        Ok(s) => s,
        Err(e) => {
            warn!("DHT: cannot bind UDP {local}: {e}; running without the DHT");
            return None;
        }
    };
    if let Err(e) = registry.register(&mut socket, token, Interest::READABLE) {
        warn!("DHT: {e}");
        return None;
    }
    let mut bootstrap: Vec<SocketAddrV4> = Vec::new();
    for b in &config.bootstrap {
        match (b.host.as_str(), b.port).to_socket_addrs() {
            Ok(addrs) => bootstrap.extend(addrs.filter_map(|a| match a {
                SocketAddr::V4(v4) => Some(v4),
                SocketAddr::V6(_) => None,
            })),
            Err(e) => warn!("DHT: bootstrap {b}: {e}"),
        }
    }
    bootstrap.retain(|a| {
        *a != local4 && !(a.port() == local4.port() && a.ip().is_loopback() && local4.ip().is_unspecified())
    });
    // Nodes saved by an earlier run: rejoin without the bootstrap list.
    bootstrap.extend(load_table(&config.shards_dir.join(TABLE_FILE)));
    let loopback = local4.ip().is_loopback() || bootstrap.iter().any(|b| b.ip().is_loopback());
    let own_peer_ip = (!local4.ip().is_unspecified()).then_some(*local4.ip());
    let cfg = DhtConfig {
        restrict_ips: !loopback,
        own_peer_ip,
        query_rate: config.dht_query_rate,
        read_only: config.dht_read_only,
        ..DhtConfig::default()
    };
    // BEP 42: an id derived from our address when we listen on a public one
    // (otherwise the id is re-derived once responders agree on our address).
    let ip = std::net::IpAddr::V4(*local4.ip());
    let id = if local4.ip().is_unspecified() || node_id::is_exempt(ip) { Id(id) } else { node_id::generate_id(ip, id) };
    let now = Instant::now();
    let mut dht = Dht::new(id, cfg, bootstrap, now);
    dht.join(now);
    // First save a few seconds in (once joined), then every minute.
    let table_saved = now - SAVE_TABLE_EVERY + FIRST_SAVE;
    Some(DhtState { dht, socket, next_tick: now, purposes: HashMap::new(), announced: HashMap::new(), table_saved })
}

fn load_table(path: &Path) -> Vec<SocketAddrV4> {
    let Ok(bytes) = std::fs::read(path) else { return Vec::new() };
    if bytes.len() > 64 * 1024 || bytes.len() % 26 != 0 {
        return Vec::new();
    }
    bytes
        .chunks_exact(26)
        .map(|c| SocketAddrV4::new([c[20], c[21], c[22], c[23]].into(), u16::from_be_bytes([c[24], c[25]])))
        .collect()
}

impl Node {
    /// Datagrams on the DHT socket.
    pub(super) fn on_udp_readable(&mut self) {
        let Some(d) = self.dht.as_mut() else { return };
        let mut buf = [0u8; 2048];
        for _ in 0..1024 {
            let now_us = self.started.elapsed().as_micros() as u32;
            match d.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(reset) = utp::reset_for_syn(&buf[..n], now_us) {
                        // A uTP connection attempt: refused, so the peer uses TCP.
                        debug!("uTP SYN from {from}: answered ST_RESET (the peer wire is TCP only)");
                        let _ = d.socket.send_to(&reset, from);
                    } else if let SocketAddr::V4(from) = from {
                        d.dht.handle_packet(from, &buf[..n], Instant::now());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("DHT recv: {e}");
                    break;
                }
            }
        }
        self.dht_after();
    }

    /// Sends what the DHT queued and handles its finished lookups.
    fn dht_after(&mut self) {
        let Some(d) = self.dht.as_mut() else { return };
        for (to, bytes) in std::mem::take(&mut d.dht.outbox) {
            if let Err(e) = d.socket.send_to(&bytes, SocketAddr::V4(to))
                && e.kind() != io::ErrorKind::WouldBlock
            {
                debug!("DHT send to {to}: {e}");
            }
        }
        let events = std::mem::take(&mut d.dht.events);
        for Event::LookupDone(r) in events {
            let purpose = self.dht.as_mut().and_then(|d| d.purposes.remove(&r.id));
            if let Some(p) = purpose {
                self.on_lookup_done(p, r);
            }
        }
    }

    /// DHT timers, re-announces and table saving; returns when next due.
    pub(super) fn dht_tick(&mut self, now: Instant) -> Option<Instant> {
        let d = self.dht.as_mut()?;
        if now >= d.next_tick {
            d.dht.tick(now);
            d.next_tick = now + d.dht.next_tick();
            if let Some(j) = d.dht.take_unanswered_join() {
                let list: Vec<String> = j.bootstrap.iter().map(|a| a.to_string()).collect();
                warn!(
                    "DHT: no answer from bootstrap {} (attempt {}); retrying in {} s; the node serves \
                     what it holds meanwhile",
                    list.join(", "),
                    j.attempts,
                    j.retry_in.as_secs()
                );
            }
            if now.duration_since(d.table_saved) >= SAVE_TABLE_EVERY {
                d.table_saved = now;
                let nodes: Vec<NodeInfo> = d.dht.table.entries().map(|e| e.node).take(256).collect();
                let path = self.config.shards_dir.join(TABLE_FILE);
                self.pool.handle().submit(move || {
                    let _ = std::fs::write(path, encode_nodes(&nodes));
                });
            }
            self.announce_due(now);
            self.dht_after();
        }
        self.dht.as_ref().map(|d| d.next_tick)
    }

    /// Writes the routing table now (at shutdown); the number of nodes saved, or None without a
    /// DHT. An empty table leaves the file an earlier run saved.
    pub(super) fn save_dht_table(&self) -> Option<io::Result<usize>> {
        let d = self.dht.as_ref()?;
        let nodes: Vec<NodeInfo> = d.dht.table.entries().map(|e| e.node).take(256).collect();
        if nodes.is_empty() {
            return Some(Ok(0));
        }
        let path = self.config.shards_dir.join(TABLE_FILE);
        Some(std::fs::write(path, encode_nodes(&nodes)).map(|()| nodes.len()))
    }

    /// Starts a lookup (or an announce) of `key`; `secure` for the cluster's and shards'
    /// name keys, which only nodes with BEP 42-valid ids are trusted to hold. A `--private`
    /// node uses the keyed name of every key instead (`auth::dht_name`), so outsiders find
    /// none of its shards or members.
    pub(super) fn start_lookup(&mut self, key: Id, kind: LookupKind, purpose: Purpose, secure: bool) -> bool {
        let key = match (&self.config.cluster_key, self.config.private) {
            (Some(k), true) => Id(crate::protocol::auth::dht_name(k, &key.0)),
            _ => key,
        };
        let Some(d) = self.dht.as_mut() else { return false };
        let now = Instant::now();
        let l = if secure { d.dht.start_lookup_secure(key, kind, now) } else { d.dht.start_lookup(key, kind, now) };
        d.purposes.insert(l, purpose);
        // A lookup with no node to ask ends at the next tick: have it come now.
        d.next_tick = d.next_tick.min(now + d.dht.next_tick());
        self.dht_after();
        true
    }

    /// Announces every key of every complete file not announced recently, or
    /// announced when the routing table held less than half what it holds now
    /// (a node that joined a young network re-announces as it grows, so its
    /// keys sit on the nodes that are closest now).
    pub(super) fn announce_due(&mut self, now: Instant) {
        if self.dht.is_none() {
            return;
        }
        let port = self.announced_port();
        let cluster = self.config.cluster.clone();
        // (key, secure): name keys only on BEP 42-valid nodes.
        let mut keys = vec![(cluster_key(&cluster), true)];
        if let Some((_, h)) = &self.catalog.manifest_bytes {
            keys.push((Id(crate::gguf::manifest::manifest_dht_key(h)), true));
        }
        for s in self.swarms.values().filter(|s| s.is_complete()) {
            keys.push((Id(s.info_hash.0), false));
            // A file the manifest lists under another info hash is not that shard: never
            // announced under its name.
            if self.catalog.manifest_mismatch(&s.name, s.info_hash).is_none() {
                keys.push((name_key(&cluster, &s.name), true));
            }
        }
        for (key, secure) in keys {
            let d = self.dht.as_mut().expect("checked");
            let nodes = d.dht.table.len();
            let fresh = |a: &Announced| now.duration_since(a.at) < ANNOUNCE_EVERY && nodes < 2 * a.nodes.max(1);
            if d.announced.get(&key).is_some_and(fresh) {
                continue;
            }
            let retries = d.announced.get(&key).map_or(0, |a| a.retries);
            d.announced.insert(key, Announced { at: now, nodes, retries });
            self.start_lookup(key, LookupKind::Announce { port }, Purpose::Announce { key }, secure);
        }
    }

    /// Finds the info hash of shard `id` through the peers under its name key.
    pub(super) fn dht_resolve_shard(&mut self, id: u32, filename: String) -> bool {
        let key = name_key(&self.config.cluster, &filename);
        self.start_lookup(key, LookupKind::GetPeers, Purpose::ShardByName { shard_id: id, filename }, true)
    }

    /// Finds peers for `h` and downloads from them.
    pub(super) fn dht_find_peers(&mut self, h: InfoHash, shard_id: Option<u32>, name: String) -> bool {
        self.start_lookup(Id(h.0), LookupKind::GetPeers, Purpose::PeersFor { info_hash: h, shard_id, name }, false)
    }

    /// FIND_PEERS: a get_peers lookup answered when it ends (`secure` for name keys).
    pub(super) fn find_peers_command(&mut self, token: Token, request_id: Value, key: Id, secure: bool) -> bool {
        let conn_id = self.conn(token).map_or(0, |c| c.id);
        if let Some(c) = self.conn(token) {
            c.in_flight += 1;
        }
        let started = self.start_lookup(
            key,
            LookupKind::GetPeers,
            Purpose::FindPeers { token, conn_id, request_id, key },
            secure,
        );
        if !started && let Some(c) = self.conn(token) {
            c.in_flight -= 1;
        }
        started
    }

    /// The TCP port this node announces: `--announce-port`, else the one it listens on.
    pub(super) fn announced_port(&self) -> u16 {
        self.config.announce_port.unwrap_or(self.local_addr.port())
    }

    /// Whether a peer found in the DHT is this node (at its listening or its announced port).
    fn own_addr(&self, p: &SocketAddrV4) -> bool {
        (p.port() == self.local_addr.port() || p.port() == self.announced_port())
            && (p.ip().is_loopback() || SocketAddr::V4(*p).ip() == self.local_addr.ip())
    }

    fn on_lookup_done(&mut self, purpose: Purpose, r: LookupResult) {
        let peers: Vec<SocketAddrV4> = r.peers.iter().copied().filter(|p| !self.own_addr(p)).collect();
        match purpose {
            Purpose::Announce { key } => {
                debug!("announced {:?} to {} nodes", key, r.responded);
                if let Some(d) = self.dht.as_mut()
                    && let Some(a) = d.announced.get_mut(&key)
                {
                    if r.responded < K / 2 {
                        // Too few nodes known yet (joining, or a small network):
                        // try again soon, then less and less often.
                        let wait = ANNOUNCE_RETRY.saturating_mul(1 << a.retries.min(16)).min(ANNOUNCE_EVERY);
                        a.at = Instant::now() - ANNOUNCE_EVERY + wait;
                        a.retries += 1;
                    } else {
                        a.retries = 0;
                    }
                }
            }
            Purpose::FindPeers { token, conn_id, request_id, key } => {
                let Some(conn) = self.conn(token).filter(|c| c.id == conn_id) else { return };
                let was_paused = conn.backpressured();
                conn.in_flight -= 1;
                let result = json!({
                    "key": hash::to_hex(&key.0),
                    "peers": peers.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "nodes_responded": r.responded,
                    "messages": r.messages,
                    "rounds": r.rounds,
                    "elapsed_ms": r.elapsed.as_secs_f64() * 1e3,
                    "first_peer_ms": r.first_peer.map(|d| d.as_secs_f64() * 1e3),
                });
                self.respond(token, &success_payload("FIND_PEERS", &request_id, result));
                self.resume_or_settle(token, was_paused);
            }
            Purpose::ShardByName { shard_id, filename } => {
                if peers.is_empty() {
                    let msg = format!(
                        "Shard {shard_id}: no peer in the DHT holds {filename} (cluster {}).",
                        self.config.cluster
                    );
                    return self.fail_waiters(shard_id, ErrorCode::TorrentUnavailable, msg);
                }
                // Ask a few holders, on a worker (blocking clients, bounded waits).
                let (tx, waker, key) = (self.events_tx.clone(), self.waker.clone(), self.config.cluster_key.clone());
                self.pool.handle().submit(move || {
                    let result = ask_info_hash(&peers, &filename, key.as_ref());
                    let _ = tx.send(NodeEvent::ShardResolved { shard_id, filename, result });
                    let _ = waker.wake();
                });
            }
            Purpose::Manifest { shard_id, filename } => self.on_manifest_holders(shard_id, filename, peers),
            Purpose::PeersFor { info_hash, shard_id, name } => {
                let addrs: Vec<SocketAddr> = peers.iter().map(|p| SocketAddr::V4(*p)).collect();
                if addrs.is_empty() && !self.downloads.contains_key(&info_hash) {
                    let msg = format!("No peers found in the DHT for {name} ({info_hash}).");
                    return match shard_id {
                        Some(id) => self.fail_waiters(id, ErrorCode::TorrentUnavailable, msg),
                        None => warn!("{msg}"),
                    };
                }
                info!("DHT: {} peers for {name} ({info_hash}) in {:.1} ms", addrs.len(), r.elapsed.as_secs_f64() * 1e3);
                if let Err((code, msg)) = self.start_download(info_hash, None, &name, &addrs, shard_id) {
                    match shard_id {
                        Some(id) => self.fail_waiters(id, code, msg),
                        None => warn!("{msg}"),
                    }
                }
            }
        }
    }

    /// A shard's info hash learned from its holders (or why not).
    pub(super) fn on_shard_resolved(&mut self, shard_id: u32, filename: String, result: Result<InfoHash, String>) {
        match result {
            Ok(h) => {
                info!("shard {shard_id}: {filename} is {h} (from the holders' LIST_FILES)");
                if !self.dht_find_peers(h, Some(shard_id), filename) {
                    self.fail_waiters(shard_id, ErrorCode::TorrentUnavailable, "the DHT is not running".into());
                }
            }
            Err(e) => self.fail_waiters(shard_id, ErrorCode::TorrentUnavailable, format!("Shard {shard_id}: {e}")),
        }
    }

    /// Peers whose downloads ran dry: look them up again (rate-limited by the caller).
    pub(super) fn dht_requery(&mut self, h: InfoHash) {
        let (Some(s), true) = (self.swarms.get(&h), self.downloads.contains_key(&h)) else { return };
        let name = s.name.clone();
        self.start_lookup(
            Id(h.0),
            LookupKind::GetPeers,
            Purpose::PeersFor { info_hash: h, shard_id: None, name },
            false,
        );
    }

    pub(super) fn dht_status(&self) -> Value {
        match &self.dht {
            None => Value::Null,
            Some(d) => json!({
                "id": hash::to_hex(&d.dht.id.0),
                "nodes": d.dht.table.len(),
                "unanswered_joins": d.dht.join_failures(),
                "stored_keys": d.dht.store.len(),
                "received": d.dht.stats.received,
                "sent": d.dht.stats.sent,
                "dropped": d.dht.stats.dropped,
                "throttled": d.dht.stats.throttled,
                "read_only": self.config.dht_read_only,
                "read_only_queries": d.dht.stats.read_only_queries,
                "insecure_skipped": d.dht.stats.insecure_skipped,
                "external_ip": d.dht.external_ip.map(|ip| ip.to_string()),
                "query_rate": self.config.dht_query_rate,
            }),
        }
    }
}

/// Asks holders for their file list; the info hash most of them give for
/// `filename` wins (a lone liar is outvoted).
fn ask_info_hash(
    peers: &[SocketAddrV4],
    filename: &str,
    key: Option<&crate::protocol::auth::ClusterKey>,
) -> Result<InfoHash, String> {
    let mut votes: HashMap<InfoHash, usize> = HashMap::new();
    let mut errors = Vec::new();
    for p in peers.iter().take(RESOLVE_ASK) {
        let answer = Client::connect_with_key(&p.to_string(), Duration::from_secs(2), key)
            .and_then(|mut c| c.call("LIST_FILES", json!({})));
        match answer {
            Ok(r) => {
                // A holder's file that its own manifest calls a mismatch is no vote.
                let found = r["files"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|f| f["filename"] == filename && f.get("mismatch").is_none_or(Value::is_null));
                if let Some(h) = found.and_then(|f| f["info_hash"].as_str()).and_then(InfoHash::from_hex) {
                    *votes.entry(h).or_default() += 1;
                }
            }
            Err(e) => errors.push(format!("{p}: {e}")),
        }
    }
    votes
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(h, _)| h)
        .ok_or_else(|| format!("none of {} holders of {filename} listed it ({})", peers.len(), errors.join("; ")))
}
