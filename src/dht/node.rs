//! A DHT node, sans-IO: fed packets and time, it answers queries, runs
//! lookups and announces, and leaves datagrams in `outbox` and results in
//! `events`. The event loop (or the simulation) moves the bytes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::krpc::{self, Body, Id, Message, NodeInfo, Query, Response};
use super::lookup::Lookup;
use super::routing::{K, RoutingTable};
use super::store::{PeerStore, Tokens};

/// A query unanswered this long has failed.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries awaiting answers at most; more are not sent.
const MAX_PENDING: usize = 4096;
/// Re-contact the bootstrap nodes this long after a join went unanswered, doubling per
/// unanswered join...
const REJOIN_EVERY: Duration = Duration::from_secs(5);
/// ...up to this.
const REJOIN_MAX: Duration = Duration::from_secs(60);
/// Look for stale buckets this often.
const REFRESH_CHECK: Duration = Duration::from_secs(60);
/// A bucket untouched this long is refreshed (BEP 5).
const REFRESH_AFTER: Duration = Duration::from_secs(15 * 60);
/// Random lookups a node makes when it joins, besides its own id.
const JOIN_REFRESHES: usize = 3;
/// A lookup started with an empty table waits for nodes while a join is in flight, at most
/// this long; with nothing in flight it ends at once, empty.
const PARK_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct DhtConfig {
    /// One routing-table entry per IP address (off for test networks on one machine).
    pub restrict_ips: bool,
    /// Packets accepted per second from one source (IP, or IP and port on loopback).
    pub rate_limit: u32,
    /// Our own peer address, when known: what we announce is also kept in
    /// our own store, so a node close to a key it holds answers for itself.
    pub own_peer_ip: Option<std::net::Ipv4Addr>,
}

impl Default for DhtConfig {
    fn default() -> DhtConfig {
        DhtConfig { restrict_ips: true, rate_limit: 200, own_peer_ip: None }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupKind {
    FindNode,
    GetPeers,
    /// get_peers, then announce_peer with each closest node's token.
    Announce {
        port: u16,
    },
}

#[derive(Clone, Debug)]
pub struct LookupResult {
    pub id: u64,
    pub target: Id,
    pub kind: LookupKind,
    pub peers: Vec<SocketAddrV4>,
    /// Nodes that answered among the closest.
    pub responded: usize,
    pub messages: u32,
    pub rounds: u32,
    pub elapsed: Duration,
    pub first_peer: Option<Duration>,
}

#[derive(Clone, Debug)]
pub enum Event {
    LookupDone(LookupResult),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub received: u64,
    pub sent: u64,
    pub dropped: u64,
    pub errors_sent: u64,
}

struct Pending {
    to: SocketAddrV4,
    node: Option<Id>,
    sent: Instant,
    lookup: Option<u64>,
}

struct Active {
    lookup: Lookup,
    kind: LookupKind,
    parked_since: Option<Instant>,
}

pub struct Dht {
    pub id: Id,
    pub table: RoutingTable,
    tokens: Tokens,
    pub store: PeerStore,
    config: DhtConfig,
    pending: HashMap<Vec<u8>, Pending>,
    lookups: HashMap<u64, Active>,
    next_lookup: u64,
    next_tid: u32,
    pub outbox: Vec<(SocketAddrV4, Vec<u8>)>,
    pub events: Vec<Event>,
    rate: HashMap<SocketAddrV4, (Instant, u32)>,
    bootstrap: Vec<SocketAddrV4>,
    last_join: Option<Instant>,
    /// Joins in a row that no bootstrap node answered (reset when the table fills).
    join_failures: u32,
    /// Whether the last join has been counted as answered or not.
    join_judged: bool,
    /// An unanswered join not yet reported by [`Dht::take_unanswered_join`].
    unanswered_join: Option<UnansweredJoin>,
    last_refresh: Instant,
    rng: u64,
    pub stats: Stats,
}

/// A join that no bootstrap node answered within [`QUERY_TIMEOUT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnansweredJoin {
    /// Unanswered joins in a row.
    pub attempts: u32,
    pub bootstrap: Vec<SocketAddrV4>,
    /// When the next join is sent.
    pub retry_in: Duration,
}

/// Wait before the next join after `failures` unanswered ones in a row.
fn rejoin_delay(failures: u32) -> Duration {
    REJOIN_EVERY.saturating_mul(1 << failures.saturating_sub(1).min(8)).min(REJOIN_MAX)
}

/// Rate limits key on the IP, or IP and port on loopback (test networks).
fn source_key(addr: SocketAddrV4) -> SocketAddrV4 {
    if addr.ip().is_loopback() { addr } else { SocketAddrV4::new(*addr.ip(), 0) }
}

impl Dht {
    pub fn new(id: Id, config: DhtConfig, bootstrap: Vec<SocketAddrV4>, now: Instant) -> Dht {
        let seed = u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes")) | 1;
        Dht {
            id,
            table: RoutingTable::new(id, config.restrict_ips, now),
            tokens: Tokens::new(crate::hash::sha1(&id.0), now),
            store: PeerStore::default(),
            config,
            pending: HashMap::new(),
            lookups: HashMap::new(),
            next_lookup: 1,
            next_tid: 0,
            outbox: Vec::new(),
            events: Vec::new(),
            rate: HashMap::new(),
            bootstrap,
            last_join: None,
            join_failures: 0,
            join_judged: false,
            unanswered_join: None,
            last_refresh: now,
            rng: seed,
            stats: Stats::default(),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Contacts the bootstrap nodes (find_node for our own id); the answers
    /// fill the table, and a lookup of our id follows.
    pub fn join(&mut self, now: Instant) {
        self.last_join = Some(now);
        self.join_judged = false;
        for addr in self.bootstrap.clone() {
            self.send_query(addr, None, Query::FindNode { target: self.id }, None, now);
        }
        if !self.table.is_empty() {
            self.start_lookup(self.id, LookupKind::FindNode, now);
        }
    }

    fn send_query(
        &mut self,
        to: SocketAddrV4,
        node: Option<Id>,
        query: Query,
        lookup: Option<u64>,
        now: Instant,
    ) -> bool {
        if self.pending.len() >= MAX_PENDING {
            return false;
        }
        self.next_tid = self.next_tid.wrapping_add(1);
        let tid = self.next_tid.to_be_bytes().to_vec();
        let msg = Message { tid: tid.clone(), body: Body::Query { id: self.id, query } };
        self.outbox.push((to, msg.encode()));
        self.stats.sent += 1;
        self.pending.insert(tid, Pending { to, node, sent: now, lookup });
        true
    }

    fn reply(&mut self, to: SocketAddrV4, tid: Vec<u8>, body: Body) {
        self.outbox.push((to, Message { tid, body }.encode()));
        self.stats.sent += 1;
    }

    fn allow(&mut self, from: SocketAddrV4, now: Instant) -> bool {
        if self.rate.len() > 100_000 {
            self.rate.retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(1));
        }
        let e = self.rate.entry(source_key(from)).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            *e = (now, 0);
        }
        e.1 += 1;
        e.1 <= self.config.rate_limit
    }

    /// One datagram from `from`.
    pub fn handle_packet(&mut self, from: SocketAddrV4, bytes: &[u8], now: Instant) {
        self.stats.received += 1;
        if from.port() == 0 || !self.allow(from, now) {
            self.stats.dropped += 1;
            return;
        }
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.stats.dropped += 1;
                // A query we could not accept gets a BEP 5 error, if it had a tid.
                if let Some(tid) = e.tid {
                    self.stats.errors_sent += 1;
                    self.reply(from, tid, Body::Error { code: e.code, message: e.message });
                }
                return;
            }
        };
        match msg.body {
            Body::Query { id, query } => self.on_query(from, msg.tid, id, query, now),
            Body::Response { id, response } => self.on_response(from, msg.tid, id, response, now),
            Body::Error { .. } => self.on_error(from, msg.tid, now),
        }
    }

    fn on_query(&mut self, from: SocketAddrV4, tid: Vec<u8>, id: Id, query: Query, now: Instant) {
        if id != self.id {
            self.table.insert(NodeInfo { id, addr: from }, false, now);
        }
        let ip = IpAddr::V4(*from.ip());
        let body = match query {
            Query::Ping => Body::Response { id: self.id, response: Response::default() },
            Query::FindNode { target } => Body::Response {
                id: self.id,
                response: Response { nodes: self.table.closest(&target, K, now), ..Response::default() },
            },
            Query::GetPeers { info_hash } => {
                let token = self.tokens.issue(ip, now);
                let values = self.store.peers(&info_hash, now);
                let nodes = self.table.closest(&info_hash, K, now);
                Body::Response { id: self.id, response: Response { nodes, values, token: Some(token) } }
            }
            Query::AnnouncePeer { info_hash, port, implied_port, token } => {
                if !self.tokens.check(ip, &token, now) {
                    self.stats.errors_sent += 1;
                    Body::Error { code: krpc::code::PROTOCOL, message: "bad token".into() }
                } else {
                    let port = if implied_port { from.port() } else { port };
                    if port == 0 {
                        Body::Error { code: krpc::code::PROTOCOL, message: "port 0".into() }
                    } else if self.store.announce(info_hash, SocketAddrV4::new(*from.ip(), port), now) {
                        Body::Response { id: self.id, response: Response::default() }
                    } else {
                        Body::Error { code: krpc::code::SERVER, message: "storage full".into() }
                    }
                }
            }
        };
        self.reply(from, tid, body);
    }

    fn on_response(&mut self, from: SocketAddrV4, tid: Vec<u8>, id: Id, response: Response, now: Instant) {
        // Only answers to queries we sent, from where we sent them.
        let Some(p) = self.pending.get(&tid) else {
            self.stats.dropped += 1;
            return;
        };
        if p.to != from {
            self.stats.dropped += 1;
            return;
        }
        let p = self.pending.remove(&tid).expect("found");
        if id != self.id {
            self.table.insert(NodeInfo { id, addr: from }, true, now);
        }
        let was_empty_join = p.lookup.is_none() && p.node.is_none();
        if let Some(l) = p.lookup {
            if let Some(a) = self.lookups.get_mut(&l) {
                a.lookup.on_response(&id, &response.nodes, &response.values, response.token, now);
            }
            self.drive(l, now);
        } else if was_empty_join {
            // A bootstrap answer: learn its neighbours, then look ourselves up.
            for n in &response.nodes {
                if n.id != self.id {
                    self.table.insert(*n, false, now);
                }
            }
            if !self.lookups.values().any(|a| a.lookup.target == self.id) {
                self.start_lookup(self.id, LookupKind::FindNode, now);
                // And a few far regions of the id space, so a new node's table
                // is not only its neighbourhood (libtorrent refreshes likewise).
                for _ in 0..JOIN_REFRESHES {
                    let mut t = [0u8; 20];
                    for c in t.chunks_mut(8) {
                        let r = self.random().to_le_bytes();
                        c.copy_from_slice(&r[..c.len()]);
                    }
                    self.start_lookup(Id(t), LookupKind::FindNode, now);
                }
            }
        }
    }

    fn on_error(&mut self, from: SocketAddrV4, tid: Vec<u8>, now: Instant) {
        if self.pending.get(&tid).is_none_or(|p| p.to != from) {
            return;
        }
        let p = self.pending.remove(&tid).expect("found");
        if let (Some(l), Some(node)) = (p.lookup, p.node) {
            if let Some(a) = self.lookups.get_mut(&l) {
                a.lookup.on_failure(&node);
            }
            self.drive(l, now);
        }
    }

    /// Starts a lookup of `target`; its result comes as `Event::LookupDone`.
    pub fn start_lookup(&mut self, target: Id, kind: LookupKind, now: Instant) -> u64 {
        let id = self.next_lookup;
        self.next_lookup += 1;
        let seeds = self.table.closest(&target, 2 * K, now);
        let parked_since = seeds.is_empty().then_some(now);
        self.lookups.insert(id, Active { lookup: Lookup::new(target, seeds, now), kind, parked_since });
        if parked_since.is_none() {
            self.drive(id, now);
        }
        id
    }

    /// Sends what a lookup wants sent; finishes it when done.
    fn drive(&mut self, l: u64, now: Instant) {
        let Some(a) = self.lookups.get_mut(&l) else { return };
        if a.parked_since.is_some() {
            return;
        }
        let to_ask = a.lookup.next(now);
        let target = a.lookup.target;
        let query = match a.kind {
            LookupKind::FindNode => Query::FindNode { target },
            _ => Query::GetPeers { info_hash: target },
        };
        for n in to_ask {
            if !self.send_query(n.addr, Some(n.id), query.clone(), Some(l), now)
                && let Some(a) = self.lookups.get_mut(&l)
            {
                a.lookup.on_failure(&n.id);
            }
        }
        let a = self.lookups.get(&l).expect("present");
        if a.lookup.is_done() {
            self.finish(l, now);
        }
    }

    fn finish(&mut self, l: u64, now: Instant) {
        let Some(a) = self.lookups.remove(&l) else { return };
        let responded = a.lookup.responded();
        if let LookupKind::Announce { port } = a.kind {
            if let Some(ip) = self.config.own_peer_ip {
                self.store.announce(a.lookup.target, SocketAddrV4::new(ip, port), now);
            }
            for (node, token) in &responded {
                if let Some(token) = token {
                    let q = Query::AnnouncePeer {
                        info_hash: a.lookup.target,
                        port,
                        implied_port: false,
                        token: token.clone(),
                    };
                    self.send_query(node.addr, Some(node.id), q, None, now);
                }
            }
        }
        self.events.push(Event::LookupDone(LookupResult {
            id: l,
            target: a.lookup.target,
            kind: a.kind,
            peers: a.lookup.peers.clone(),
            responded: responded.len(),
            messages: a.lookup.messages,
            rounds: a.lookup.rounds(),
            elapsed: now.duration_since(a.lookup.started),
            first_peer: a.lookup.first_peer.map(|t| t.duration_since(a.lookup.started)),
        }));
    }

    /// Timeouts, parked lookups, refresh, rejoin.
    pub fn tick(&mut self, now: Instant) {
        let expired: Vec<Vec<u8>> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.sent) >= QUERY_TIMEOUT)
            .map(|(t, _)| t.clone())
            .collect();
        let mut touched = Vec::new();
        for tid in expired {
            let p = self.pending.remove(&tid).expect("listed");
            if let Some(node) = p.node {
                self.table.failed(&node);
                if let Some(l) = p.lookup {
                    if let Some(a) = self.lookups.get_mut(&l) {
                        a.lookup.on_failure(&node);
                    }
                    touched.push(l);
                }
            }
        }
        // Lookups waiting for a table; soft timeouts.
        let ids: Vec<u64> = self.lookups.keys().copied().collect();
        for l in ids {
            let a = self.lookups.get_mut(&l).expect("listed");
            if let Some(since) = a.parked_since {
                let seeds = self.table.closest(&a.lookup.target, 2 * K, now);
                if !seeds.is_empty() {
                    a.lookup = Lookup::new(a.lookup.target, seeds, a.lookup.started);
                    a.parked_since = None;
                } else if now.duration_since(since) >= PARK_LIMIT || self.pending.is_empty() {
                    a.parked_since = None; // ends at once, with nothing
                }
            }
            touched.push(l);
        }
        touched.sort_unstable();
        touched.dedup();
        for l in touched {
            self.drive(l, now);
        }
        self.rejoin_if_alone(now);
        if now.duration_since(self.last_refresh) >= REFRESH_CHECK {
            self.last_refresh = now;
            let mut rng = self.rng;
            let targets = self.table.refresh_targets(REFRESH_AFTER, now, &mut || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            });
            self.rng = rng;
            for t in targets.into_iter().take(8) {
                self.start_lookup(t, LookupKind::FindNode, now);
            }
            self.store.expire(now);
        }
    }

    /// While the table is empty: judges the last join (unanswered after [`QUERY_TIMEOUT`]) and
    /// joins again after [`REJOIN_EVERY`], doubling per unanswered join up to [`REJOIN_MAX`].
    fn rejoin_if_alone(&mut self, now: Instant) {
        if !self.table.is_empty() {
            self.join_failures = 0;
            return;
        }
        if self.bootstrap.is_empty() {
            return;
        }
        if let Some(t) = self.last_join
            && !self.join_judged
            && now.duration_since(t) >= QUERY_TIMEOUT
        {
            self.join_judged = true;
            self.join_failures += 1;
            let retry_in = rejoin_delay(self.join_failures);
            self.unanswered_join =
                Some(UnansweredJoin { attempts: self.join_failures, bootstrap: self.bootstrap.clone(), retry_in });
        }
        if self.last_join.is_none_or(|t| now.duration_since(t) >= rejoin_delay(self.join_failures)) {
            self.join(now);
        }
    }

    /// Joins in a row that no bootstrap node answered (0 once the table has nodes).
    pub fn join_failures(&self) -> u32 {
        if self.table.is_empty() { self.join_failures } else { 0 }
    }

    /// The last join, if no bootstrap node answered it (reported once per join).
    pub fn take_unanswered_join(&mut self) -> Option<UnansweredJoin> {
        self.unanswered_join.take()
    }

    /// When `tick` next has work (at once for a lookup parked with nothing in flight: it ends).
    pub fn next_tick(&self) -> Duration {
        if self.pending.is_empty() && self.lookups.values().any(|a| a.parked_since.is_some()) {
            return Duration::ZERO;
        }
        if !self.lookups.is_empty() {
            return super::lookup::SOFT_TIMEOUT / 5;
        }
        if !self.pending.is_empty() {
            return Duration::from_millis(200);
        }
        Duration::from_secs(1)
    }

    pub fn is_looking_up(&self, l: u64) -> bool {
        self.lookups.contains_key(&l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> Id {
        let mut x = [b; 20];
        x[19] = b.wrapping_mul(7);
        Id(x)
    }

    fn addr(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new([127, 0, 0, 1].into(), port)
    }

    /// Delivers every datagram between the nodes until quiet.
    fn run(nodes: &mut [Dht], now: Instant) {
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..nodes.len() {
                let out = std::mem::take(&mut nodes[i].outbox);
                let from = addr(1000 + i as u16);
                for (to, bytes) in out {
                    moved = true;
                    let j = (to.port() - 1000) as usize;
                    if j < nodes.len() {
                        nodes[j].handle_packet(from, &bytes, now);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn network(n: usize, now: Instant) -> Vec<Dht> {
        let cfg = DhtConfig { restrict_ips: false, rate_limit: 10_000, own_peer_ip: None };
        let mut nodes: Vec<Dht> =
            (0..n).map(|i| Dht::new(id(i as u8 + 1), cfg.clone(), vec![addr(1000)], now)).collect();
        for d in nodes.iter_mut().skip(1) {
            d.join(now);
        }
        run(&mut nodes, now);
        nodes
    }

    #[test]
    fn nodes_join_and_find_announced_peers() {
        let now = Instant::now();
        let mut nodes = network(20, now);
        assert!(nodes.iter().skip(1).all(|d| !d.table.is_empty()));
        let key = Id([0x42; 20]);
        nodes[5].start_lookup(key, LookupKind::Announce { port: 7777 }, now);
        run(&mut nodes, now);
        nodes[12].start_lookup(key, LookupKind::GetPeers, now);
        run(&mut nodes, now);
        let done: Vec<LookupResult> = nodes[12].events.drain(..).map(|Event::LookupDone(r)| r).collect();
        let r = done.iter().find(|r| r.target == key).expect("lookup finished");
        assert_eq!(r.peers, vec![addr(7777)], "node 5 announced itself on port 7777");
    }

    #[test]
    fn bad_packets_get_errors_or_are_dropped() {
        let now = Instant::now();
        let mut d = Dht::new(id(1), DhtConfig { restrict_ips: false, rate_limit: 5, own_peer_ip: None }, vec![], now);
        d.handle_packet(addr(9), b"not bencode", now);
        assert!(d.outbox.is_empty(), "no tid: dropped");
        d.handle_packet(addr(9), b"d1:ad2:id20:abcdefghij0123456789e1:q4:frob1:t2:aa1:y1:qe", now);
        let (_, reply) = d.outbox.pop().unwrap();
        assert!(matches!(Message::decode(&reply).unwrap().body, Body::Error { code: 204, .. }));
        // A response to nothing we asked.
        d.handle_packet(addr(9), b"d1:rd2:id20:mnopqrstuvwxyz123456e1:t2:zz1:y1:re", now);
        assert!(d.outbox.is_empty() && d.table.is_empty());
        // An announce with a forged token.
        let q = Message {
            tid: b"t1".to_vec(),
            body: Body::Query {
                id: id(9),
                query: Query::AnnouncePeer {
                    info_hash: id(3),
                    port: 1,
                    implied_port: false,
                    token: b"forged".to_vec(),
                },
            },
        };
        d.handle_packet(addr(9), &q.encode(), now);
        let (_, reply) = d.outbox.pop().unwrap();
        assert!(matches!(Message::decode(&reply).unwrap().body, Body::Error { code: 203, .. }));
        assert!(d.store.is_empty());
        // A flood from one source is cut at the rate limit.
        for _ in 0..20 {
            d.handle_packet(
                addr(10),
                &Message { tid: b"p".to_vec(), body: Body::Query { id: id(10), query: Query::Ping } }.encode(),
                now,
            );
        }
        assert_eq!(d.outbox.len(), 5);
    }

    #[test]
    fn unanswered_queries_time_out_and_lookups_end() {
        let now = Instant::now();
        let mut d = Dht::new(id(1), DhtConfig { restrict_ips: false, rate_limit: 100, own_peer_ip: None }, vec![], now);
        d.table.insert(NodeInfo { id: id(2), addr: addr(2) }, true, now);
        let l = d.start_lookup(id(3), LookupKind::FindNode, now);
        assert_eq!(d.outbox.len(), 1);
        d.tick(now + QUERY_TIMEOUT);
        assert!(!d.is_looking_up(l));
        assert!(matches!(d.events.pop(), Some(Event::LookupDone(_))));
    }

    #[test]
    fn an_unanswered_bootstrap_is_reported_and_retried_with_back_off() {
        let t0 = Instant::now();
        let cfg = DhtConfig { restrict_ips: false, rate_limit: 100, own_peer_ip: None };
        let mut d = Dht::new(id(1), cfg, vec![addr(9)], t0);
        d.join(t0);
        assert_eq!(d.outbox.drain(..).count(), 1);
        // Joins are sent 5, 10, 20, 40, 60, 60 s after the previous one; each unanswered one is
        // reported once, QUERY_TIMEOUT after it was sent.
        let mut sent_at = t0;
        for (attempt, wait) in [5u64, 10, 20, 40, 60, 60].into_iter().enumerate() {
            d.tick(sent_at + QUERY_TIMEOUT);
            let note = d.take_unanswered_join().expect("an unanswered join is reported");
            assert_eq!(note.attempts, attempt as u32 + 1);
            assert_eq!(note.retry_in, Duration::from_secs(wait));
            assert_eq!(note.bootstrap, vec![addr(9)]);
            d.tick(sent_at + Duration::from_secs(wait) - Duration::from_millis(1));
            assert!(d.outbox.is_empty(), "attempt {attempt}: rejoined before the back-off");
            assert_eq!(d.take_unanswered_join(), None, "reported twice");
            sent_at += Duration::from_secs(wait);
            d.tick(sent_at);
            assert_eq!(d.outbox.drain(..).count(), 1, "attempt {attempt}: no rejoin after the back-off");
        }
        // An answer fills the table: no more joins, no more reports, and the count starts over.
        d.table.insert(NodeInfo { id: id(9), addr: addr(9) }, true, sent_at);
        d.tick(sent_at + Duration::from_secs(120));
        assert_eq!(d.take_unanswered_join(), None);
        assert_eq!(d.join_failures, 0);
    }

    #[test]
    fn a_lookup_with_no_nodes_and_no_join_in_flight_ends_at_once() {
        let now = Instant::now();
        let cfg = DhtConfig { restrict_ips: false, rate_limit: 100, own_peer_ip: None };
        let mut alone = Dht::new(id(1), cfg.clone(), vec![], now);
        let l = alone.start_lookup(id(3), LookupKind::GetPeers, now);
        alone.tick(now);
        assert!(!alone.is_looking_up(l), "waited for nodes nobody will send");
        assert!(matches!(alone.events.pop(), Some(Event::LookupDone(r)) if r.id == l && r.peers.is_empty()));
        // While a join is in flight the lookup waits for its answer.
        let mut joining = Dht::new(id(1), cfg, vec![addr(9)], now);
        joining.join(now);
        let l = joining.start_lookup(id(3), LookupKind::GetPeers, now);
        joining.tick(now + Duration::from_millis(500));
        assert!(joining.is_looking_up(l));
        joining.tick(now + QUERY_TIMEOUT);
        assert!(!joining.is_looking_up(l), "still waiting after the join timed out");
    }
}
