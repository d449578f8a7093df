//! The DHT in the event loop: the UDP sockets on the node's port (one per
//! address family: the IPv4 DHT and BEP 32's IPv6 DHT, each its own routing
//! table), the DHTs' timers, announcing what the node seeds, and finding peers
//! for shards. A lookup runs in every family the node has and ends when all
//! have: its peers are the union, IPv4 and IPv6.
//!
//! Keys a node announces (DESIGN section 5): each seeded file's info hash;
//! `SHA1("shardnet:" + cluster + ":" + filename)`, the peers holding that
//! shard; and `SHA1("shardnet:" + cluster)`, the cluster's members.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use serde_json::{Value, json};

use super::{Node, NodeEvent};
use crate::client::Client;
use crate::config::NodeConfig;
use crate::dht::krpc::{Id, NodeInfo, decode_nodes, decode_nodes6, encode_nodes, encode_nodes6};
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
/// Where the IPv4 routing table is saved, in the shards dir (`nodes` form).
const TABLE_FILE: &str = ".dht-nodes";
/// Where the IPv6 routing table is saved (`nodes6` form).
const TABLE_FILE6: &str = ".dht-nodes6";

/// Writes a routing table file whole or not at all: to `FILE.tmp`, then renamed over `FILE`, so
/// a node killed mid-write (or a reader) never finds a truncated table, only the last whole one.
fn write_table(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
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
    ShardByName { shard_id: u32, filename: String, client: Option<super::handlers::Caller> },
    /// Holders of the pinned manifest (a shard's load waits for it).
    Manifest { shard_id: u32, filename: String, client: Option<super::handlers::Caller> },
    /// Peers for a torrent to download (and the shard waiting for it).
    /// `client`: who asked (charged with the download, `--max-downloads-per-client`).
    PeersFor { info_hash: InfoHash, shard_id: Option<u32>, name: String, client: Option<super::handlers::Caller> },
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

/// One address family's DHT and its socket.
pub(super) struct Family {
    pub dht: Dht,
    socket: UdpSocket,
    next_tick: Instant,
}

/// A lookup started in every family, waiting for all of them.
struct Joint {
    purpose: Purpose,
    waiting: u32,
    result: Option<LookupResult>,
}

pub(super) struct DhtState {
    /// The IPv4 DHT (BEP 5), when the node listens on IPv4.
    pub v4: Option<Family>,
    /// The IPv6 DHT (BEP 32), when the node listens on IPv6 and the host has it.
    pub v6: Option<Family>,
    /// What each joint lookup is for, by joint id.
    joints: HashMap<u64, Joint>,
    /// (IPv6?, the family's lookup id) -> joint id.
    lookup_of: HashMap<(bool, u64), u64>,
    next_joint: u64,
    /// When each key was last announced, and how many nodes the tables held then.
    announced: HashMap<Id, Announced>,
    table_saved: Instant,
}

impl DhtState {
    fn families(&self) -> impl Iterator<Item = &Family> {
        self.v4.iter().chain(self.v6.iter())
    }

    fn families_mut(&mut self) -> impl Iterator<Item = &mut Family> {
        self.v4.iter_mut().chain(self.v6.iter_mut())
    }

    /// Nodes in both routing tables.
    pub(super) fn nodes(&self) -> usize {
        self.families().map(|f| f.dht.table.len()).sum()
    }

    /// A family's lookup `r` ended: the joint result once every family's has.
    fn lookup_done(&mut self, ipv6: bool, r: LookupResult) -> Option<(Purpose, LookupResult)> {
        let j = self.lookup_of.remove(&(ipv6, r.id))?;
        let joint = self.joints.get_mut(&j)?;
        joint.waiting -= 1;
        joint.result = Some(match joint.result.take() {
            None => r,
            Some(mut m) => {
                for p in r.peers {
                    if !m.peers.contains(&p) {
                        m.peers.push(p);
                    }
                }
                m.responded += r.responded;
                m.messages += r.messages;
                m.rounds = m.rounds.max(r.rounds);
                m.budget_waits += r.budget_waits;
                m.elapsed = m.elapsed.max(r.elapsed);
                m.first_peer = match (m.first_peer, r.first_peer) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                m
            }
        });
        if joint.waiting > 0 {
            return None;
        }
        let joint = self.joints.remove(&j)?;
        let mut result = joint.result.expect("set above");
        result.id = j;
        Some((joint.purpose, result))
    }
}

/// Binds the DHT's UDP sockets on the node's port and prepares the DHTs: the
/// IPv4 one when `local` is IPv4 or unspecified, the IPv6 one (IPV6_V6ONLY)
/// when `local` is IPv6 or unspecified and the host has IPv6. None when
/// neither could bind.
pub(super) fn bind(
    config: &NodeConfig,
    local: SocketAddr,
    id: [u8; 20],
    registry: &Registry,
    tokens: (Token, Token),
) -> Option<DhtState> {
    let mut bootstrap: Vec<SocketAddr> = Vec::new();
    for b in &config.bootstrap {
        match (b.host.as_str(), b.port).to_socket_addrs() {
            Ok(addrs) => bootstrap.extend(addrs),
            Err(e) => warn!("DHT: bootstrap {b}: {e}"),
        }
    }
    let any = local.ip().is_unspecified();
    // Both families on an unspecified address: each DHT asks for the other's nodes too.
    let want_other = any;
    let port = local.port();
    let mut state = DhtState {
        v4: None,
        v6: None,
        joints: HashMap::new(),
        lookup_of: HashMap::new(),
        next_joint: 1,
        announced: HashMap::new(),
        table_saved: Instant::now(),
    };
    if local.is_ipv4() || any {
        let ip = if local.is_ipv4() { local.ip() } else { IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) };
        let saved = load_table(&config.shards_dir.join(TABLE_FILE), false);
        state.v4 =
            bind_family(config, SocketAddr::new(ip, port), id, &bootstrap, saved, want_other, registry, tokens.0);
    }
    if local.is_ipv6() || any {
        let ip = if local.is_ipv6() { local.ip() } else { IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) };
        let saved = load_table(&config.shards_dir.join(TABLE_FILE6), true);
        state.v6 =
            bind_family(config, SocketAddr::new(ip, port), id, &bootstrap, saved, want_other, registry, tokens.1);
    }
    if state.v4.is_none() && state.v6.is_none() {
        return None;
    }
    if state.v4.is_none() || state.v6.is_none() {
        // One family after all: nothing to ask for the other's nodes.
        for f in state.families_mut() {
            f.dht.set_want_other(false);
        }
    }
    // First save a few seconds in (once joined), then every minute.
    state.table_saved = Instant::now() - SAVE_TABLE_EVERY + FIRST_SAVE;
    Some(state)
}

/// One family's socket and DHT on `local`; its bootstrap nodes are those of
/// `bootstrap` in its family, then `saved`.
fn bind_family(
    config: &NodeConfig,
    local: SocketAddr,
    id: [u8; 20],
    bootstrap: &[SocketAddr],
    saved: Vec<SocketAddr>,
    want_other: bool,
    registry: &Registry,
    token: Token,
) -> Option<Family> {
    let ipv6 = local.is_ipv6();
    let bound = if ipv6 { super::ipv6::bind_udp6(local) } else { UdpSocket::bind(local) };
    let mut socket = match bound {
        Ok(s) => s,
        Err(e) if ipv6 && super::ipv6::no_ipv6(&e) => {
            info!("DHT: no IPv6 on this host ({e}); the DHT runs on IPv4 only");
            return None;
        }
        Err(e) => {
            warn!("DHT: cannot bind UDP {local}: {e}; running without the {} DHT", if ipv6 { "IPv6" } else { "IPv4" });
            return None;
        }
    };
    if let Err(e) = registry.register(&mut socket, token, Interest::READABLE) {
        warn!("DHT: {e}");
        return None;
    }
    let mut bootstrap: Vec<SocketAddr> = bootstrap.iter().copied().filter(|a| a.is_ipv6() == ipv6).collect();
    bootstrap
        .retain(|a| *a != local && !(a.port() == local.port() && a.ip().is_loopback() && local.ip().is_unspecified()));
    // Nodes saved by an earlier run: rejoin without the bootstrap list.
    bootstrap.extend(saved);
    let loopback = local.ip().is_loopback() || bootstrap.iter().any(|b| b.ip().is_loopback());
    let own_peer_ip = (!local.ip().is_unspecified()).then_some(local.ip());
    let cfg = DhtConfig {
        restrict_ips: !loopback,
        own_peer_ip,
        query_rate: config.dht_query_rate,
        store: config.dht_store,
        read_only: config.dht_read_only,
        ipv6,
        want_other,
        ..DhtConfig::default()
    };
    // BEP 42: an id derived from our address when we listen on a public one
    // (otherwise the id is re-derived once responders agree on our address).
    // Both families start from the same id, as BEP 32 advises.
    let ip = local.ip();
    let id = if ip.is_unspecified() || node_id::is_exempt(ip) { Id(id) } else { node_id::generate_id(ip, id) };
    let now = Instant::now();
    let mut dht = Dht::new(id, cfg, bootstrap, now);
    dht.join(now);
    Some(Family { dht, socket, next_tick: now })
}

/// Addresses from a saved table (`nodes` or `nodes6` form); none when the file
/// is missing, too large or malformed.
fn load_table(path: &Path, ipv6: bool) -> Vec<SocketAddr> {
    let Ok(bytes) = std::fs::read(path) else { return Vec::new() };
    if bytes.len() > 64 * 1024 {
        return Vec::new();
    }
    let nodes = if ipv6 { decode_nodes6(&bytes) } else { decode_nodes(&bytes) };
    nodes.unwrap_or_default().into_iter().map(|n| n.addr).collect()
}

impl Node {
    /// Datagrams on a DHT socket (`ipv6`: the IPv6 one).
    pub(super) fn on_udp_readable(&mut self, ipv6: bool) {
        let Some(d) = self.dht.as_mut() else { return };
        // The family that read, and the other's table for BEP 32's `want`.
        let (fam, other) = if ipv6 { (&mut d.v6, &d.v4) } else { (&mut d.v4, &d.v6) };
        let Some(fam) = fam.as_mut() else { return };
        let other = other.as_ref().map(|f| &f.dht.table);
        let mut buf = [0u8; 2048];
        for _ in 0..1024 {
            let now_us = self.started.elapsed().as_micros() as u32;
            match fam.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(reset) = utp::reset_for_syn(&buf[..n], now_us) {
                        // A uTP connection attempt: refused, so the peer uses TCP.
                        debug!("uTP SYN from {from}: answered ST_RESET (the peer wire is TCP only)");
                        let _ = fam.socket.send_to(&reset, from);
                    } else {
                        fam.dht.handle_packet_with(from, &buf[..n], other, Instant::now());
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

    /// Sends what the DHTs queued and handles their finished lookups.
    fn dht_after(&mut self) {
        let Some(d) = self.dht.as_mut() else { return };
        // Nodes each DHT learned of the other family (BEP 32 `want`) go to the other's table.
        if let (Some(v4), Some(v6)) = (d.v4.as_mut(), d.v6.as_mut()) {
            let now = Instant::now();
            let (to6, to4) = (std::mem::take(&mut v4.dht.foreign), std::mem::take(&mut v6.dht.foreign));
            v6.dht.add_nodes(&to6, now);
            v4.dht.add_nodes(&to4, now);
        }
        let mut done = Vec::new();
        for fam in d.families_mut() {
            for (to, bytes) in std::mem::take(&mut fam.dht.outbox) {
                if let Err(e) = fam.socket.send_to(&bytes, to)
                    && e.kind() != io::ErrorKind::WouldBlock
                {
                    debug!("DHT send to {to}: {e}");
                }
            }
            let ipv6 = fam.dht.is_ipv6();
            done.extend(std::mem::take(&mut fam.dht.events).into_iter().map(|Event::LookupDone(r)| (ipv6, r)));
        }
        for (ipv6, r) in done {
            if let Some((p, r)) = self.dht.as_mut().and_then(|d| d.lookup_done(ipv6, r)) {
                self.on_lookup_done(p, r);
            }
        }
    }

    /// DHT timers, re-announces and table saving; returns when next due.
    pub(super) fn dht_tick(&mut self, now: Instant) -> Option<Instant> {
        let d = self.dht.as_mut()?;
        let mut ran = false;
        for fam in d.families_mut() {
            if now < fam.next_tick {
                continue;
            }
            ran = true;
            fam.dht.tick(now);
            fam.next_tick = now + fam.dht.next_tick();
            if let Some(j) = fam.dht.take_unanswered_join() {
                let list: Vec<String> = j.bootstrap.iter().map(|a| a.to_string()).collect();
                warn!(
                    "DHT: no answer from bootstrap {} (attempt {}); retrying in {} s; the node serves \
                     what it holds meanwhile",
                    list.join(", "),
                    j.attempts,
                    j.retry_in.as_secs()
                );
            }
        }
        if ran {
            if now.duration_since(d.table_saved) >= SAVE_TABLE_EVERY {
                d.table_saved = now;
                let tables = table_files(d, &self.config.shards_dir);
                self.pool.handle().submit(move || {
                    for (path, bytes) in tables {
                        let _ = write_table(&path, &bytes);
                    }
                });
            }
            self.announce_due(now);
            self.dht_after();
        }
        self.dht.as_ref().and_then(|d| d.families().map(|f| f.next_tick).min())
    }

    /// Writes the routing tables now (at shutdown); the number of nodes saved, or None without
    /// a DHT. An empty table leaves the file an earlier run saved.
    pub(super) fn save_dht_table(&self) -> Option<io::Result<usize>> {
        let d = self.dht.as_ref()?;
        let mut saved = 0;
        for (path, bytes) in table_files(d, &self.config.shards_dir) {
            if let Err(e) = write_table(&path, &bytes) {
                return Some(Err(e));
            }
            saved += bytes.len() / if path.ends_with(TABLE_FILE6) { 38 } else { 26 };
        }
        Some(Ok(saved))
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
        let j = d.next_joint;
        d.next_joint += 1;
        let mut waiting = 0;
        let mut started = Vec::new();
        for fam in d.families_mut() {
            let dht = &mut fam.dht;
            let l = if secure {
                dht.start_lookup_secure(key, kind.clone(), now)
            } else {
                dht.start_lookup(key, kind.clone(), now)
            };
            let ipv6 = dht.is_ipv6();
            started.push((ipv6, l));
            waiting += 1;
            // A lookup with no node to ask ends at the next tick: have it come now.
            fam.next_tick = fam.next_tick.min(now + fam.dht.next_tick());
        }
        for k in started {
            d.lookup_of.insert(k, j);
        }
        d.joints.insert(j, Joint { purpose, waiting, result: None });
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
            let nodes = d.nodes();
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
    pub(super) fn dht_resolve_shard(
        &mut self,
        id: u32,
        filename: String,
        client: Option<super::handlers::Caller>,
    ) -> bool {
        let key = name_key(&self.config.cluster, &filename);
        self.start_lookup(key, LookupKind::GetPeers, Purpose::ShardByName { shard_id: id, filename, client }, true)
    }

    /// Finds peers for `h` and downloads from them.
    pub(super) fn dht_find_peers(
        &mut self,
        h: InfoHash,
        shard_id: Option<u32>,
        name: String,
        client: Option<super::handlers::Caller>,
    ) -> bool {
        let purpose = Purpose::PeersFor { info_hash: h, shard_id, name, client };
        self.start_lookup(Id(h.0), LookupKind::GetPeers, purpose, false)
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
    fn own_addr(&self, p: &SocketAddr) -> bool {
        (p.port() == self.local_addr.port() || p.port() == self.announced_port())
            && (p.ip().is_loopback() || p.ip() == self.local_addr.ip())
    }

    fn on_lookup_done(&mut self, purpose: Purpose, r: LookupResult) {
        let peers: Vec<SocketAddr> = r.peers.iter().copied().filter(|p| !self.own_addr(p)).collect();
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
                    "budget_waits": r.budget_waits,
                });
                self.respond(token, &success_payload("FIND_PEERS", &request_id, result));
                self.resume_or_settle(token, was_paused);
            }
            Purpose::ShardByName { shard_id, filename, client } => {
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
                    let _ = tx.send(NodeEvent::ShardResolved { shard_id, filename, result, client });
                    let _ = waker.wake();
                });
            }
            Purpose::Manifest { shard_id, filename, client } => {
                self.on_manifest_holders(shard_id, filename, peers, client)
            }
            Purpose::PeersFor { info_hash, shard_id, name, client } => {
                let addrs = peers;
                if addrs.is_empty() && !self.downloads.contains_key(&info_hash) {
                    let msg = format!("No peers found in the DHT for {name} ({info_hash}).");
                    return match shard_id {
                        Some(id) => self.fail_waiters(id, ErrorCode::TorrentUnavailable, msg),
                        None => warn!("{msg}"),
                    };
                }
                info!("DHT: {} peers for {name} ({info_hash}) in {:.1} ms", addrs.len(), r.elapsed.as_secs_f64() * 1e3);
                if let Err((code, msg)) = self.start_download(info_hash, None, &name, &addrs, shard_id, client.as_ref())
                {
                    match shard_id {
                        Some(id) => self.fail_waiters(id, code, msg),
                        None => warn!("{msg}"),
                    }
                }
            }
        }
    }

    /// A shard's info hash learned from its holders (or why not); its download is `client`'s,
    /// the caller whose load asked for it.
    pub(super) fn on_shard_resolved(
        &mut self,
        shard_id: u32,
        filename: String,
        result: Result<InfoHash, String>,
        client: Option<super::handlers::Caller>,
    ) {
        match result {
            Ok(h) => {
                info!("shard {shard_id}: {filename} is {h} (from the holders' LIST_FILES)");
                if !self.dht_find_peers(h, Some(shard_id), filename, client) {
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
            Purpose::PeersFor { info_hash: h, shard_id: None, name, client: None },
            false,
        );
    }

    pub(super) fn dht_status(&self) -> Value {
        match &self.dht {
            None => Value::Null,
            Some(d) => {
                let (first, mut stats) = match (&d.v4, &d.v6) {
                    (Some(f), _) | (None, Some(f)) => (&f.dht, f.dht.stats),
                    (None, None) => return Value::Null,
                };
                if let (Some(_), Some(f6)) = (&d.v4, &d.v6) {
                    let s6 = f6.dht.stats;
                    stats.received += s6.received;
                    stats.sent += s6.sent;
                    stats.dropped += s6.dropped;
                    stats.throttled += s6.throttled;
                    stats.read_only_queries += s6.read_only_queries;
                    stats.insecure_skipped += s6.insecure_skipped;
                }
                let table = |f: &Option<Family>| f.as_ref().map(|f| f.dht.table.len());
                json!({
                    "id": hash::to_hex(&first.id.0),
                    "nodes": d.nodes(),
                    "nodes4": table(&d.v4),
                    "nodes6": table(&d.v6),
                    "unanswered_joins": d.families().map(|f| f.dht.join_failures()).max().unwrap_or(0),
                    "stored_keys": d.families().map(|f| f.dht.store.len()).sum::<usize>(),
                    "received": stats.received,
                    "sent": stats.sent,
                    "dropped": stats.dropped,
                    "throttled": stats.throttled,
                    "read_only": self.config.dht_read_only,
                    "read_only_queries": stats.read_only_queries,
                    "insecure_skipped": stats.insecure_skipped,
                    "external_ip": first.external_ip.map(|ip| ip.to_string()),
                    "external_ip6": d.v6.as_ref().and_then(|f| f.dht.external_ip).map(|ip| ip.to_string()),
                    "query_rate": self.config.dht_query_rate,
                })
            }
        }
    }
}

/// The routing tables to save: (path, bytes) for each family with nodes
/// (at most 256 each; an empty table leaves the earlier run's file).
fn table_files(d: &DhtState, dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for (fam, file) in [(&d.v4, TABLE_FILE), (&d.v6, TABLE_FILE6)] {
        let Some(f) = fam else { continue };
        let nodes: Vec<NodeInfo> = f.dht.table.entries().map(|e| e.node).take(256).collect();
        if nodes.is_empty() {
            continue;
        }
        let bytes = if f.dht.is_ipv6() { encode_nodes6(&nodes) } else { encode_nodes(&nodes) };
        out.push((dir.join(file), bytes));
    }
    out
}

/// Asks holders for their file list; the info hash most of them give for
/// `filename` wins (a lone liar is outvoted).
fn ask_info_hash(
    peers: &[SocketAddr],
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
