//! A DHT node, sans-IO: fed packets and time, it answers queries, runs
//! lookups and announces, and leaves datagrams in `outbox` and results in
//! `events`. The event loop (or the simulation) moves the bytes.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::budget::{Budget, Verdict};
use super::krpc::{self, Body, Id, Message, NodeInfo, Query, Response, Want};
use super::lookup::Lookup;
use super::node_id;
use super::routing::{K, RoutingTable};
use super::store::{self, PeerStore, Tokens};

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
/// Nodes of the other family kept for the other DHT, at most (more are dropped).
pub const MAX_FOREIGN: usize = 256;
/// Queries (not lookups') waiting for a destination's budget, at most.
const MAX_DEFERRED: usize = 1024;
/// Distinct responders that must report one external address (BEP 42's
/// `ip`) before the node takes a new id derived from it.
const EXTERNAL_IP_VOTES: usize = 3;
/// Packets a second sent to any one destination by default: libtorrent bans
/// a source over 5 (see `budget`).
pub const DEFAULT_QUERY_RATE: u32 = 3;

#[derive(Clone, Debug)]
pub struct DhtConfig {
    /// One routing-table entry per IP address (off for test networks on one machine).
    pub restrict_ips: bool,
    /// Packets accepted per second from one source (IP, or IP and port on loopback).
    pub rate_limit: u32,
    /// Our own peer address, when known: what we announce is also kept in
    /// our own store, so a node close to a key it holds answers for itself.
    pub own_peer_ip: Option<IpAddr>,
    /// Packets a second sent to any one destination (queries and answers together).
    pub query_rate: u32,
    /// A read-only node (BEP 43): its queries say `ro: 1`, it answers none,
    /// and others keep it out of their routing tables.
    pub read_only: bool,
    /// The IPv6 DHT (BEP 32): the node talks to IPv6 addresses only, its
    /// answers carry `nodes6` by default. Otherwise the IPv4 DHT, IPv4 only.
    pub ipv6: bool,
    /// The node also runs the other family's DHT: find_node and get_peers ask
    /// for both families' nodes (`want: ["n4", "n6"]`), and the other
    /// family's nodes in answers are left in [`Dht::foreign`] for that DHT.
    pub want_other: bool,
    /// Bounds on what others' announces make the node store.
    pub store: store::StoreLimits,
}

impl Default for DhtConfig {
    fn default() -> DhtConfig {
        DhtConfig {
            restrict_ips: true,
            rate_limit: 200,
            own_peer_ip: None,
            query_rate: DEFAULT_QUERY_RATE,
            read_only: false,
            ipv6: false,
            want_other: false,
            store: store::StoreLimits::default(),
        }
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
    pub peers: Vec<SocketAddr>,
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
    /// Answers not sent because their destination's budget was spent.
    pub throttled: u64,
    /// Queries from read-only nodes (BEP 43), answered but not added.
    pub read_only_queries: u64,
    /// Nodes left out of lookups for keys only BEP 42-valid ids may hold.
    pub insecure_skipped: u64,
}

struct Pending {
    to: SocketAddr,
    node: Option<Id>,
    sent: Instant,
    lookup: Option<u64>,
}

/// A query waiting for its destination's budget.
struct Deferred {
    to: SocketAddr,
    node: Option<Id>,
    query: Query,
}

struct Active {
    lookup: Lookup,
    kind: LookupKind,
    parked_since: Option<Instant>,
    /// Only nodes whose ids are valid for their addresses (BEP 42) take part:
    /// the cluster's and shards' name keys are not trusted to others.
    secure: bool,
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
    pub outbox: Vec<(SocketAddr, Vec<u8>)>,
    pub events: Vec<Event>,
    /// Nodes of the other family from answers (with `want_other`), for the
    /// other DHT's table; at most [`MAX_FOREIGN`] wait.
    pub foreign: Vec<NodeInfo>,
    rate: HashMap<SocketAddr, (Instant, u32)>,
    /// What we may send to each destination.
    budget: Budget,
    deferred: VecDeque<Deferred>,
    bootstrap: Vec<SocketAddr>,
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
    /// Our address as others see it, once `EXTERNAL_IP_VOTES` responders agree (BEP 42).
    pub external_ip: Option<IpAddr>,
    /// Responders' reports of our address: address -> who said so.
    ip_votes: HashMap<IpAddr, Vec<IpAddr>>,
}

/// A join that no bootstrap node answered within [`QUERY_TIMEOUT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnansweredJoin {
    /// Unanswered joins in a row.
    pub attempts: u32,
    pub bootstrap: Vec<SocketAddr>,
    /// When the next join is sent.
    pub retry_in: Duration,
}

/// Wait before the next join after `failures` unanswered ones in a row.
fn rejoin_delay(failures: u32) -> Duration {
    REJOIN_EVERY.saturating_mul(1 << failures.saturating_sub(1).min(8)).min(REJOIN_MAX)
}

/// Rate limits key on the IP (an IPv6 /64: one host's usual share, as the
/// node's connection caps count), or IP and port on loopback (test networks).
fn source_key(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        ip if ip.is_loopback() => addr,
        IpAddr::V6(v6) => SocketAddr::new(IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()), 0),
        ip => SocketAddr::new(ip, 0),
    }
}

impl Dht {
    pub fn new(id: Id, config: DhtConfig, bootstrap: Vec<SocketAddr>, now: Instant) -> Dht {
        let seed = u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes")) | 1;
        Dht {
            id,
            table: RoutingTable::new(id, config.restrict_ips, now),
            tokens: Tokens::new(crate::hash::sha1(&id.0), now),
            store: PeerStore::new(config.store),
            budget: Budget::new(config.query_rate),
            config,
            pending: HashMap::new(),
            lookups: HashMap::new(),
            next_lookup: 1,
            next_tid: 0,
            outbox: Vec::new(),
            events: Vec::new(),
            foreign: Vec::new(),
            rate: HashMap::new(),
            deferred: VecDeque::new(),
            bootstrap,
            last_join: None,
            join_failures: 0,
            join_judged: false,
            unanswered_join: None,
            last_refresh: now,
            rng: seed,
            stats: Stats::default(),
            external_ip: None,
            ip_votes: HashMap::new(),
        }
    }

    /// Twenty random bytes from the node's generator.
    fn random_id(&mut self) -> [u8; 20] {
        let mut t = [0u8; 20];
        for c in t.chunks_mut(8) {
            let r = self.random().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
        t
    }

    /// A responder said our address is `ip` (BEP 42). Once enough distinct
    /// responders agree on a public address that our id is not valid for,
    /// the node takes an id derived from it and keeps its table.
    fn vote_external_ip(&mut self, ip: IpAddr, voter: IpAddr, now: Instant) {
        if self.ip_votes.len() >= 64 && !self.ip_votes.contains_key(&ip) {
            return;
        }
        let voters = self.ip_votes.entry(ip).or_default();
        if voters.contains(&voter) || voters.len() >= EXTERNAL_IP_VOTES {
            return;
        }
        voters.push(voter);
        if voters.len() < EXTERNAL_IP_VOTES || self.external_ip == Some(ip) {
            return;
        }
        self.external_ip = Some(ip);
        if !node_id::verify_id(&self.id, ip) {
            let id = node_id::generate_id(ip, self.random_id());
            self.id = id;
            let old = std::mem::replace(&mut self.table, RoutingTable::new(id, self.config.restrict_ips, now));
            for e in old.entries() {
                self.table.insert(e.node, e.last_response.is_some(), e.last_response.unwrap_or(now));
            }
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
            self.send_query(addr, None, Query::FindNode { target: self.id }, now);
        }
        if !self.table.is_empty() {
            self.start_lookup(self.id, LookupKind::FindNode, now);
        }
    }

    /// Sends a query outside lookups (join, announce_peer): at once if
    /// `to`'s budget allows, later if it is over budget, never if it is
    /// backing off. False when the query is dropped.
    fn send_query(&mut self, to: SocketAddr, node: Option<Id>, query: Query, now: Instant) -> bool {
        match self.budget.query_verdict(to, now) {
            Verdict::Send => self.transmit(to, node, query, None, now),
            Verdict::Wait if self.deferred.len() < MAX_DEFERRED => {
                self.deferred.push_back(Deferred { to, node, query });
                true
            }
            Verdict::Wait | Verdict::Skip => false,
        }
    }

    /// Sends deferred queries whose destinations have budget again.
    fn send_deferred(&mut self, now: Instant) {
        for _ in 0..self.deferred.len() {
            let d = self.deferred.pop_front().expect("counted");
            match self.budget.query_verdict(d.to, now) {
                Verdict::Send => {
                    self.transmit(d.to, d.node, d.query, None, now);
                }
                Verdict::Wait => self.deferred.push_back(d),
                Verdict::Skip => {}
            }
        }
    }

    /// Sends a query now (the caller checked the budget).
    fn transmit(&mut self, to: SocketAddr, node: Option<Id>, query: Query, lookup: Option<u64>, now: Instant) -> bool {
        if self.pending.len() >= MAX_PENDING {
            return false;
        }
        self.budget.spend(to, now);
        self.next_tid = self.next_tid.wrapping_add(1);
        let tid = self.next_tid.to_be_bytes().to_vec();
        let want = self.config.want_other.then_some(Want { n4: true, n6: true });
        let msg = Message {
            tid: tid.clone(),
            body: Body::Query { id: self.id, query },
            ro: self.config.read_only,
            ip: None,
            want,
        };
        self.outbox.push((to, msg.encode()));
        self.stats.sent += 1;
        self.pending.insert(tid, Pending { to, node, sent: now, lookup });
        true
    }

    /// Answers `to`, unless its budget is spent (then silence: better one
    /// lost answer than a ban from that node).
    fn reply(&mut self, to: SocketAddr, tid: Vec<u8>, body: Body, now: Instant) {
        if !self.budget.may_reply(to, now) {
            self.stats.throttled += 1;
            return;
        }
        self.budget.spend(to, now);
        // BEP 42: tell the querier the address we see it from.
        let ip = matches!(body, Body::Response { .. }).then_some(to);
        self.outbox.push((to, Message { tid, body, ro: false, ip, want: None }.encode()));
        self.stats.sent += 1;
    }

    fn allow(&mut self, from: SocketAddr, now: Instant) -> bool {
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

    /// Nodes of our family learned by the other DHT (its [`Dht::foreign`]):
    /// into the table as not yet heard from, and a join if the table was empty.
    pub fn add_nodes(&mut self, nodes: &[NodeInfo], now: Instant) {
        let was_empty = self.table.is_empty();
        for n in nodes {
            if self.is_own_family(&n.addr) && n.id != self.id {
                self.table.insert(*n, false, now);
            }
        }
        if was_empty && !self.table.is_empty() && !self.lookups.values().any(|a| a.lookup.target == self.id) {
            self.start_lookup(self.id, LookupKind::FindNode, now);
        }
    }

    /// Whether queries ask for the other family's nodes too (see [`DhtConfig::want_other`]).
    pub fn set_want_other(&mut self, on: bool) {
        self.config.want_other = on;
        if !on {
            self.foreign.clear();
        }
    }

    /// Whether this is the IPv6 DHT (BEP 32).
    pub fn is_ipv6(&self) -> bool {
        self.config.ipv6
    }

    /// Whether `addr` is of this DHT's family (an IPv4-mapped IPv6 address is
    /// IPv4: it never enters the IPv6 table).
    pub fn is_own_family(&self, addr: &SocketAddr) -> bool {
        match addr {
            SocketAddr::V4(_) => !self.config.ipv6,
            SocketAddr::V6(a) => self.config.ipv6 && a.ip().to_ipv4_mapped().is_none(),
        }
    }

    /// One datagram from `from`.
    pub fn handle_packet(&mut self, from: SocketAddr, bytes: &[u8], now: Instant) {
        self.handle_packet_with(from, bytes, None, now)
    }

    /// One datagram from `from`; `other` is the other family's routing table,
    /// for answers whose `want` asks for its nodes (BEP 32). A datagram from
    /// an address of the other family is dropped.
    pub fn handle_packet_with(&mut self, from: SocketAddr, bytes: &[u8], other: Option<&RoutingTable>, now: Instant) {
        self.stats.received += 1;
        if from.port() == 0 || !self.is_own_family(&from) || !self.allow(from, now) {
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
                    self.reply(from, tid, Body::Error { code: e.code, message: e.message }, now);
                }
                return;
            }
        };
        match msg.body {
            Body::Query { .. } if self.config.read_only => self.stats.dropped += 1, // BEP 43: we answer nothing
            Body::Query { id, query } => {
                if msg.ro {
                    self.stats.read_only_queries += 1;
                }
                self.on_query(from, msg.tid, id, query, !msg.ro, msg.want, other, now)
            }
            Body::Response { id, response } => {
                if let Some(me) = msg.ip
                    && self.is_own_family(&me)
                    && self.pending.get(&msg.tid).is_some_and(|p| p.to == from)
                {
                    self.vote_external_ip(me.ip(), from.ip(), now);
                }
                self.on_response(from, msg.tid, id, response, now)
            }
            Body::Error { .. } => self.on_error(from, msg.tid, now),
        }
    }

    /// A query; `routable`: the sender may go into the table (not read-only);
    /// `want` and `other` as in [`Dht::handle_packet_with`].
    #[allow(clippy::too_many_arguments)]
    fn on_query(
        &mut self,
        from: SocketAddr,
        tid: Vec<u8>,
        id: Id,
        query: Query,
        routable: bool,
        want: Option<Want>,
        other: Option<&RoutingTable>,
        now: Instant,
    ) {
        if id != self.id && routable {
            self.table.insert(NodeInfo { id, addr: from }, false, now);
        }
        let ip = from.ip();
        // Never the querier itself: libtorrent would query its own address,
        // and count those packets against 127.0.0.1 on a one-machine network.
        let closest = |table: &RoutingTable, target: &Id| -> Vec<NodeInfo> {
            let mut nodes = table.closest(target, K + 1, now);
            nodes.retain(|n| n.addr != from && n.id != id);
            nodes.truncate(K);
            nodes
        };
        // BEP 32: the lists `want` asks for (ours from this table, the other
        // family's from `other`, when the node runs both); by default ours.
        let v6 = self.config.ipv6;
        let want = want.unwrap_or(Want { n4: !v6, n6: v6 });
        let node_lists = |table: &RoutingTable, target: &Id| -> (Vec<NodeInfo>, Vec<NodeInfo>) {
            let list = |wanted: bool, ipv6: bool| -> Vec<NodeInfo> {
                match (wanted, ipv6 == v6) {
                    (false, _) => Vec::new(),
                    (true, true) => closest(table, target),
                    (true, false) => other.map(|t| closest(t, target)).unwrap_or_default(),
                }
            };
            (list(want.n4, false), list(want.n6, true))
        };
        let body = match query {
            Query::Ping => Body::Response { id: self.id, response: Response::default() },
            Query::FindNode { target } => {
                let (nodes, nodes6) = node_lists(&self.table, &target);
                Body::Response { id: self.id, response: Response { nodes, nodes6, ..Response::default() } }
            }
            Query::GetPeers { info_hash } => {
                let token = self.tokens.issue(ip, now);
                // Peers of this family only: the two DHTs store separately (BEP 32).
                let values = self.store.peers(&info_hash, now);
                let (nodes, nodes6) = node_lists(&self.table, &info_hash);
                Body::Response { id: self.id, response: Response { nodes, nodes6, values, token: Some(token) } }
            }
            Query::AnnouncePeer { info_hash, port, implied_port, token } => {
                if !self.tokens.check(ip, &token, now) {
                    self.stats.errors_sent += 1;
                    Body::Error { code: krpc::code::PROTOCOL, message: "bad token".into() }
                } else {
                    let port = if implied_port { from.port() } else { port };
                    if port == 0 {
                        Body::Error { code: krpc::code::PROTOCOL, message: "port 0".into() }
                    } else {
                        match self.store.announce(info_hash, SocketAddr::new(from.ip(), port), now) {
                            Ok(()) => Body::Response { id: self.id, response: Response::default() },
                            Err(store::Refused::Full) => {
                                Body::Error { code: krpc::code::SERVER, message: "storage full".into() }
                            }
                            Err(store::Refused::AnnouncerQuota) => Body::Error {
                                code: krpc::code::SERVER,
                                message: "storage quota of this address used up".into(),
                            },
                        }
                    }
                }
            }
        };
        self.reply(from, tid, body, now);
    }

    fn on_response(&mut self, from: SocketAddr, tid: Vec<u8>, id: Id, response: Response, now: Instant) {
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
        self.budget.answered(from);
        if self.config.want_other {
            let other = if self.config.ipv6 { &response.nodes } else { &response.nodes6 };
            let room = MAX_FOREIGN.saturating_sub(self.foreign.len());
            self.foreign.extend(other.iter().filter(|n| n.id != self.id).take(room));
        }
        if id != self.id {
            self.table.insert(NodeInfo { id, addr: from }, true, now);
        }
        let was_empty_join = p.lookup.is_none() && p.node.is_none();
        if let Some(l) = p.lookup {
            if let Some(a) = self.lookups.get_mut(&l) {
                if a.secure && !node_id::verify_id(&id, from.ip()) {
                    // Not trusted with this key: neither its peers nor its token count.
                    self.stats.insecure_skipped += 1;
                    a.lookup.on_failure(&id);
                    if let Some(node) = p.node {
                        a.lookup.on_failure(&node);
                    }
                } else {
                    // Never ourselves; with `secure`, only BEP 42-valid ids.
                    let own = self.id;
                    let listed = if self.config.ipv6 { &response.nodes6 } else { &response.nodes };
                    let nodes: Vec<NodeInfo> = listed
                        .iter()
                        .copied()
                        .filter(|n| n.id != own && (!a.secure || node_id::verify_id(&n.id, n.addr.ip())))
                        .collect();
                    a.lookup.on_response(&id, &nodes, &response.values, response.token, now);
                }
            }
            self.drive(l, now);
        } else if was_empty_join {
            // A bootstrap answer: learn its neighbours, then look ourselves up.
            let listed = if self.config.ipv6 { &response.nodes6 } else { &response.nodes };
            for n in listed {
                if n.id != self.id {
                    self.table.insert(*n, false, now);
                }
            }
            if !self.lookups.values().any(|a| a.lookup.target == self.id) {
                self.start_lookup(self.id, LookupKind::FindNode, now);
                // And a few far regions of the id space, so a new node's table
                // is not only its neighbourhood (libtorrent refreshes likewise).
                for _ in 0..JOIN_REFRESHES {
                    let t = self.random_id();
                    self.start_lookup(Id(t), LookupKind::FindNode, now);
                }
            }
        }
    }

    fn on_error(&mut self, from: SocketAddr, tid: Vec<u8>, now: Instant) {
        if self.pending.get(&tid).is_none_or(|p| p.to != from) {
            return;
        }
        let p = self.pending.remove(&tid).expect("found");
        self.budget.failed(from, now);
        if let (Some(l), Some(node)) = (p.lookup, p.node) {
            if let Some(a) = self.lookups.get_mut(&l) {
                a.lookup.on_failure(&node);
            }
            self.drive(l, now);
        }
    }

    /// Starts a lookup of `target`; its result comes as `Event::LookupDone`.
    pub fn start_lookup(&mut self, target: Id, kind: LookupKind, now: Instant) -> u64 {
        self.start_lookup_with(target, kind, false, now)
    }

    /// A lookup among nodes whose ids are valid for their addresses only
    /// (BEP 42): for keys a node could capture by choosing its id.
    pub fn start_lookup_secure(&mut self, target: Id, kind: LookupKind, now: Instant) -> u64 {
        self.start_lookup_with(target, kind, true, now)
    }

    fn seeds(&mut self, target: &Id, secure: bool, now: Instant) -> Vec<NodeInfo> {
        let mut seeds = self.table.closest(target, if secure { 8 * K } else { 2 * K }, now);
        if secure {
            let before = seeds.len();
            seeds.retain(|n| node_id::verify_id(&n.id, n.addr.ip()));
            self.stats.insecure_skipped += (before - seeds.len()) as u64;
            seeds.truncate(2 * K);
        }
        seeds
    }

    fn start_lookup_with(&mut self, target: Id, kind: LookupKind, secure: bool, now: Instant) -> u64 {
        let id = self.next_lookup;
        self.next_lookup += 1;
        let seeds = self.seeds(&target, secure, now);
        let parked_since = seeds.is_empty().then_some(now);
        self.lookups.insert(id, Active { lookup: Lookup::new(target, seeds, now), kind, parked_since, secure });
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
        let budget = &mut self.budget;
        let to_ask = a.lookup.next(now, |n| budget.query_verdict(n.addr, now));
        let target = a.lookup.target;
        let query = match a.kind {
            LookupKind::FindNode => Query::FindNode { target },
            _ => Query::GetPeers { info_hash: target },
        };
        for n in to_ask {
            if !self.transmit(n.addr, Some(n.id), query.clone(), Some(l), now)
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
                let _ = self.store.announce(a.lookup.target, SocketAddr::new(ip, port), now);
            }
            for (node, token) in &responded {
                if let Some(token) = token {
                    let q = Query::AnnouncePeer {
                        info_hash: a.lookup.target,
                        port,
                        implied_port: false,
                        token: token.clone(),
                    };
                    self.send_query(node.addr, Some(node.id), q, now);
                }
            }
        }
        // We are a node of the DHT too: what others announced to us counts
        // (a peer announcing to a network of two stores only on us). Not for
        // secure lookups: our store does not know who announced.
        let mut peers = a.lookup.peers.clone();
        if !a.secure && a.kind != LookupKind::FindNode {
            for p in self.store.peers(&a.lookup.target, now) {
                if !peers.contains(&p) {
                    peers.push(p);
                }
            }
        }
        self.events.push(Event::LookupDone(LookupResult {
            id: l,
            target: a.lookup.target,
            kind: a.kind,
            peers,
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
            self.budget.failed(p.to, now);
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
        self.send_deferred(now);
        // Lookups waiting for a table; soft timeouts.
        let ids: Vec<u64> = self.lookups.keys().copied().collect();
        for l in ids {
            let a = self.lookups.get(&l).expect("listed");
            let (target, secure) = (a.lookup.target, a.secure);
            let seeds = if a.parked_since.is_some() { self.seeds(&target, secure, now) } else { Vec::new() };
            let a = self.lookups.get_mut(&l).expect("listed");
            if let Some(since) = a.parked_since {
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
        if !self.lookups.is_empty() || !self.deferred.is_empty() {
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
    use crate::dht::krpc::encode_addr;

    fn id(b: u8) -> Id {
        let mut x = [b; 20];
        x[19] = b.wrapping_mul(7);
        Id(x)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::new([127, 0, 0, 1].into(), port)
    }

    fn addr6(port: u16) -> SocketAddr {
        SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port)
    }

    /// `a` moved to IPv6 when `v6`: 127.0.0.1 to ::1, a.b.c.d to 2001:db8:a:b::c:d.
    fn fam(v6: bool, a: &str) -> String {
        let a: SocketAddr = a.parse().unwrap();
        match a {
            SocketAddr::V4(a) if v6 && a.ip().is_loopback() => format!("[::1]:{}", a.port()),
            SocketAddr::V4(a) if v6 => {
                let o = a.ip().octets();
                format!("[2001:db8:{:x}:{:x}::{:x}:{:x}]:{}", o[0], o[1], o[2], o[3], a.port())
            }
            a => a.to_string(),
        }
    }

    /// Delivers every datagram between the nodes until quiet.
    fn run(nodes: &mut [Dht], now: Instant) {
        run_in(nodes, false, now)
    }

    /// As [`run`], the nodes on ::1 when `v6`.
    fn run_in(nodes: &mut [Dht], v6: bool, now: Instant) {
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..nodes.len() {
                let out = std::mem::take(&mut nodes[i].outbox);
                let from = if v6 { addr6(1000 + i as u16) } else { addr(1000 + i as u16) };
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
        network_in(n, false, now)
    }

    /// As [`network`], an IPv6 DHT on ::1 when `v6`.
    fn network_in(n: usize, v6: bool, now: Instant) -> Vec<Dht> {
        let cfg =
            DhtConfig { restrict_ips: false, rate_limit: 10_000, query_rate: 10_000, ipv6: v6, ..DhtConfig::default() };
        let boot = if v6 { addr6(1000) } else { addr(1000) };
        let mut nodes: Vec<Dht> = (0..n).map(|i| Dht::new(id(i as u8 + 1), cfg.clone(), vec![boot], now)).collect();
        for d in nodes.iter_mut().skip(1) {
            d.join(now);
        }
        run_in(&mut nodes, v6, now);
        nodes
    }

    #[test]
    fn ipv6_nodes_join_and_find_announced_ipv6_peers() {
        let now = Instant::now();
        let mut nodes = network_in(20, true, now);
        for d in nodes.iter().skip(1) {
            assert!(!d.table.is_empty());
            assert!(d.table.entries().all(|e| e.node.addr.is_ipv6()), "the IPv6 table holds IPv6 nodes only");
        }
        let key = Id([0x42; 20]);
        nodes[5].start_lookup(key, LookupKind::Announce { port: 7777 }, now);
        run_in(&mut nodes, true, now);
        nodes[12].start_lookup(key, LookupKind::GetPeers, now);
        run_in(&mut nodes, true, now);
        let done: Vec<LookupResult> = nodes[12].events.drain(..).map(|Event::LookupDone(r)| r).collect();
        let r = done.iter().find(|r| r.target == key).expect("lookup finished");
        assert_eq!(r.peers, vec![addr6(7777)], "node 5 announced itself on [::1]:7777");
    }

    /// The answer `d` gives a find_node for `target` with `want` (raw bencode, or none).
    fn find_node_answer(d: &mut Dht, from: SocketAddr, want: Option<&[u8]>, other: Option<&RoutingTable>) -> Response {
        let q = match want {
            Some(w) => [
                &b"d1:ad2:id20:abcdefghij01234567896:target20:mnopqrstuvwxyz1234564:want"[..],
                w,
                b"e1:q9:find_node1:t2:aa1:y1:qe",
            ]
            .concat(),
            None => {
                b"d1:ad2:id20:abcdefghij01234567896:target20:mnopqrstuvwxyz123456e1:q9:find_node1:t2:aa1:y1:qe".to_vec()
            }
        };
        d.handle_packet_with(from, &q, other, Instant::now());
        let (to, reply) = d.outbox.pop().expect("an answer");
        assert_eq!(to, from);
        match Message::decode(&reply).unwrap().body {
            Body::Response { response, .. } => response,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn want_is_honoured_on_both_families() {
        let now = Instant::now();
        let cfg = DhtConfig { restrict_ips: false, rate_limit: 1000, query_rate: 1000, ..DhtConfig::default() };
        let mut d4 = Dht::new(id(1), cfg.clone(), vec![], now);
        let mut d6 = Dht::new(id(1), DhtConfig { ipv6: true, ..cfg }, vec![], now);
        for i in 0..4u16 {
            d4.table.insert(NodeInfo { id: id(10 + i as u8), addr: addr(2000 + i) }, true, now);
            d6.table.insert(NodeInfo { id: id(20 + i as u8), addr: addr6(2000 + i) }, true, now);
        }
        let (q4, q6) = (addr(3000), addr6(3000));
        // Without want: the family the query came in on.
        let r = find_node_answer(&mut d6, q6, None, Some(&d4.table));
        assert_eq!((r.nodes.len(), r.nodes6.len()), (0, 4));
        let r = find_node_answer(&mut d4, q4, None, Some(&d6.table));
        assert_eq!((r.nodes.len(), r.nodes6.len()), (4, 0));
        // n6 over IPv4, n4 over IPv6, both over either.
        let r = find_node_answer(&mut d4, q4, Some(b"l2:n6e"), Some(&d6.table));
        assert_eq!((r.nodes.len(), r.nodes6.len()), (0, 4));
        assert!(r.nodes6.iter().all(|n| n.addr.is_ipv6()));
        let r = find_node_answer(&mut d6, q6, Some(b"l2:n4e"), Some(&d4.table));
        assert_eq!((r.nodes.len(), r.nodes6.len()), (4, 0));
        let r = find_node_answer(&mut d6, q6, Some(b"l2:n42:n6e"), Some(&d4.table));
        assert_eq!((r.nodes.len(), r.nodes6.len()), (4, 4));
        // A node with one family answers what it has.
        let r = find_node_answer(&mut d4, q4, Some(b"l2:n42:n6e"), None);
        assert_eq!((r.nodes.len(), r.nodes6.len()), (4, 0));
        // A want that is not a list, or names nothing known: as if absent.
        let r = find_node_answer(&mut d4, q4, Some(b"2:n6"), Some(&d6.table));
        assert_eq!((r.nodes.len(), r.nodes6.len()), (4, 0));
        let r = find_node_answer(&mut d6, q6, Some(b"l2:n8e"), Some(&d4.table));
        assert_eq!((r.nodes.len(), r.nodes6.len()), (0, 4));
    }

    #[test]
    fn a_dual_stack_node_fills_its_ipv6_table_through_an_ipv4_bootstrap() {
        let now = Instant::now();
        let cfg = DhtConfig { restrict_ips: false, rate_limit: 1000, query_rate: 1000, ..DhtConfig::default() };
        let dual = DhtConfig { want_other: true, ..cfg.clone() };
        // B: the bootstrap node, both families; its IPv6 table knows four nodes.
        let mut b4 = Dht::new(id(2), cfg.clone(), vec![], now);
        let mut b6 = Dht::new(id(2), DhtConfig { ipv6: true, ..cfg.clone() }, vec![], now);
        for i in 0..4u16 {
            b6.table.insert(NodeInfo { id: id(20 + i as u8), addr: addr6(2000 + i) }, true, now);
        }
        // A joins through B's IPv4 address only.
        let (a_at, b_at) = (addr(1001), addr(1000));
        let mut a4 = Dht::new(id(1), dual.clone(), vec![b_at], now);
        let mut a6 = Dht::new(id(1), DhtConfig { ipv6: true, ..dual }, vec![], now);
        a4.join(now);
        let (to, query) = a4.outbox.pop().unwrap();
        assert_eq!(to, b_at);
        assert_eq!(Message::decode(&query).unwrap().want, Some(Want { n4: true, n6: true }));
        b4.handle_packet_with(a_at, &query, Some(&b6.table), now);
        let (_, answer) = b4.outbox.pop().unwrap();
        a4.handle_packet(b_at, &answer, now);
        assert_eq!(a4.foreign.len(), 4, "B's IPv6 nodes, for A's IPv6 DHT");
        let foreign = std::mem::take(&mut a4.foreign);
        a6.add_nodes(&foreign, now);
        assert_eq!(a6.table.len(), 4);
        assert!(!a6.outbox.is_empty() && a6.outbox.iter().all(|(to, _)| to.is_ipv6()), "A's IPv6 DHT joins");
        // IPv4 nodes handed to the IPv6 DHT are not taken.
        a6.add_nodes(&[NodeInfo { id: id(9), addr: addr(9) }], now);
        assert_eq!(a6.table.len(), 4);
        // A single-family node asks for nothing more and keeps nothing foreign.
        let mut solo = Dht::new(id(3), cfg, vec![b_at], now);
        solo.join(now);
        let (_, query) = solo.outbox.pop().unwrap();
        assert_eq!(Message::decode(&query).unwrap().want, None);
        b4.handle_packet_with(addr(1002), &query, Some(&b6.table), now);
        let (_, answer) = b4.outbox.pop().unwrap();
        solo.handle_packet(b_at, &answer, now);
        assert!(solo.foreign.is_empty());
    }

    #[test]
    fn an_ipv6_flood_is_limited_per_64_not_per_address() {
        let now = Instant::now();
        let cfg =
            DhtConfig { restrict_ips: false, rate_limit: 5, query_rate: 1000, ipv6: true, ..DhtConfig::default() };
        let mut d = Dht::new(id(1), cfg, vec![], now);
        let ping = Message::new(b"p".to_vec(), Body::Query { id: id(10), query: Query::Ping }).encode();
        // 20 addresses of one /64, one packet each: one source.
        for i in 0..20u16 {
            d.handle_packet(SocketAddr::new(format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap(), 6881), &ping, now);
        }
        assert_eq!(d.outbox.len(), 5, "answers to one /64");
        // Another /64 has its own allowance.
        d.handle_packet("[2001:db8:1:3::1]:6881".parse().unwrap(), &ping, now);
        assert_eq!(d.outbox.len(), 6);
    }

    #[test]
    fn a_packet_from_the_other_family_is_dropped() {
        let now = Instant::now();
        let cfg = DhtConfig { restrict_ips: false, ..DhtConfig::default() };
        let ping = |i: u8| Message::new(b"p".to_vec(), Body::Query { id: id(i), query: Query::Ping }).encode();
        let mut d4 = Dht::new(id(1), cfg.clone(), vec![], now);
        d4.handle_packet(addr6(9), &ping(9), now);
        assert!(d4.outbox.is_empty() && d4.table.is_empty(), "an IPv6 packet on the IPv4 table");
        assert_eq!(d4.stats.dropped, 1);
        let mut d6 = Dht::new(id(1), DhtConfig { ipv6: true, ..cfg }, vec![], now);
        d6.handle_packet(addr(9), &ping(9), now);
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:9".parse().unwrap();
        d6.handle_packet(mapped, &ping(10), now);
        assert!(d6.outbox.is_empty() && d6.table.is_empty(), "IPv4 (or IPv4-mapped) on the IPv6 table");
        assert_eq!(d6.stats.dropped, 2);
        // Its own family is answered.
        d6.handle_packet(addr6(9), &ping(9), now);
        assert_eq!(d6.outbox.len(), 1);
        assert_eq!(d6.table.len(), 1);
    }

    #[test]
    fn an_announce_over_ipv6_stores_an_ipv6_peer_given_back_in_18_bytes() {
        let now = Instant::now();
        let cfg = DhtConfig { restrict_ips: false, ipv6: true, ..DhtConfig::default() };
        let mut d = Dht::new(id(1), cfg, vec![], now);
        let from: SocketAddr = "[2001:db8::5]:6881".parse().unwrap();
        let key = id(3);
        let ask = |d: &mut Dht, from: SocketAddr| -> (Vec<u8>, Response) {
            let q = Message::new(b"g".to_vec(), Body::Query { id: id(9), query: Query::GetPeers { info_hash: key } });
            d.handle_packet(from, &q.encode(), now);
            let (_, reply) = d.outbox.pop().unwrap();
            let Body::Response { response, .. } = Message::decode(&reply).unwrap().body else { panic!() };
            (reply, response)
        };
        let (_, r) = ask(&mut d, from);
        let announce = |implied_port| {
            Message::new(
                b"a".to_vec(),
                Body::Query {
                    id: id(9),
                    query: Query::AnnouncePeer {
                        info_hash: key,
                        port: 7000,
                        implied_port,
                        token: r.token.clone().unwrap(),
                    },
                },
            )
            .encode()
        };
        d.handle_packet(from, &announce(false), now);
        d.handle_packet(from, &announce(true), now);
        assert_eq!(d.outbox.len(), 2);
        let mut stored = d.store.peers(&key, now);
        stored.sort();
        assert_eq!(stored, vec!["[2001:db8::5]:6881".parse().unwrap(), "[2001:db8::5]:7000".parse().unwrap()]);
        let (raw, r) = ask(&mut d, "[2001:db8::6]:1".parse().unwrap());
        assert_eq!(r.values.len(), 2);
        let value = [&b"18:"[..], &encode_addr(&"[2001:db8::5]:7000".parse().unwrap())].concat();
        assert!(raw.windows(value.len()).any(|w| w == value), "an 18-byte compact peer");
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
        let mut d =
            Dht::new(id(1), DhtConfig { restrict_ips: false, rate_limit: 5, ..DhtConfig::default() }, vec![], now);
        d.handle_packet(addr(9), b"not bencode", now);
        assert!(d.outbox.is_empty(), "no tid: dropped");
        d.handle_packet(addr(9), b"d1:ad2:id20:abcdefghij0123456789e1:q4:frob1:t2:aa1:y1:qe", now);
        let (_, reply) = d.outbox.pop().unwrap();
        assert!(matches!(Message::decode(&reply).unwrap().body, Body::Error { code: 204, .. }));
        // A response to nothing we asked.
        d.handle_packet(addr(9), b"d1:rd2:id20:mnopqrstuvwxyz123456e1:t2:zz1:y1:re", now);
        assert!(d.outbox.is_empty() && d.table.is_empty());
        // An announce with a forged token.
        let q = Message::new(
            b"t1".to_vec(),
            Body::Query {
                id: id(9),
                query: Query::AnnouncePeer {
                    info_hash: id(3),
                    port: 1,
                    implied_port: false,
                    token: b"forged".to_vec(),
                },
            },
        );
        d.handle_packet(addr(9), &q.encode(), now);
        let (_, reply) = d.outbox.pop().unwrap();
        assert!(matches!(Message::decode(&reply).unwrap().body, Body::Error { code: 203, .. }));
        assert!(d.store.is_empty());
        // A flood from one source is cut at the rate limit.
        for _ in 0..20 {
            d.handle_packet(
                addr(10),
                &Message::new(b"p".to_vec(), Body::Query { id: id(10), query: Query::Ping }).encode(),
                now,
            );
        }
        assert_eq!(d.outbox.len(), 5);
    }

    /// Nodes at given addresses; every datagram delivered at once, each
    /// recorded as (sender, receiver, time).
    struct Net {
        nodes: Vec<Dht>,
        addrs: Vec<SocketAddr>,
        log: Vec<(usize, usize, Instant)>,
    }

    impl Net {
        fn new(addrs: &[&str], ids: Vec<Id>, cfg: DhtConfig, now: Instant) -> Net {
            let addrs: Vec<SocketAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
            let nodes = ids.into_iter().map(|id| Dht::new(id, cfg.clone(), vec![], now)).collect();
            Net { nodes, addrs, log: Vec::new() }
        }

        fn deliver(&mut self, now: Instant) {
            for _ in 0..1000 {
                let mut moved = false;
                for i in 0..self.nodes.len() {
                    for (to, bytes) in std::mem::take(&mut self.nodes[i].outbox) {
                        moved = true;
                        if let Some(j) = self.addrs.iter().position(|a| *a == to) {
                            self.log.push((i, j, now));
                            let from = self.addrs[i];
                            self.nodes[j].handle_packet(from, &bytes, now);
                        }
                    }
                }
                if !moved {
                    return;
                }
            }
        }

        /// Most packets `from` sent `to` within any 10 s (libtorrent bans at 50).
        fn max_per_10s(&self, from: usize, to: usize) -> usize {
            let times: Vec<Instant> = self.log.iter().filter(|e| e.0 == from && e.1 == to).map(|e| e.2).collect();
            (0..times.len())
                .map(|i| times[i..].iter().take_while(|t| t.duration_since(times[i]) < Duration::from_secs(10)).count())
                .max()
                .unwrap_or(0)
        }
    }

    #[test]
    fn a_busy_node_stays_under_libtorrents_rate_limit_and_still_finds_peers() {
        busy_node_under_rate_limit(false);
    }

    #[test]
    fn a_busy_ipv6_node_stays_under_libtorrents_rate_limit() {
        busy_node_under_rate_limit(true);
    }

    fn busy_node_under_rate_limit(v6: bool) {
        // Two nodes, as with one libtorrent bootstrapped from a node: every
        // query goes to the one other node. Node 1 looks a key up every 300 ms
        // and announces three keys every three seconds, for 60 s: over 5
        // queries a second, more than libtorrent takes from one address.
        let start = Instant::now();
        let addrs = [fam(v6, "127.0.0.1:1000"), fam(v6, "127.0.0.1:1001")];
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let cfg = DhtConfig { ipv6: v6, ..DhtConfig::default() };
        let mut net = Net::new(&addrs, vec![id(1), id(2)], cfg, start);
        net.nodes[1].bootstrap = vec![net.addrs[0]];
        net.nodes[1].join(start);
        net.deliver(start);
        let key = Id([0x42; 20]);
        net.nodes[0].store.announce(key, fam(v6, "10.0.0.9:7777").parse().unwrap(), start).unwrap();
        let mut found = 0;
        let mut step = 0u32;
        while step < 6000 {
            let now = start + Duration::from_millis(10 * u64::from(step));
            if step % 30 == 0 {
                net.nodes[1].start_lookup(key, LookupKind::GetPeers, now);
            }
            if step % 300 == 0 {
                for k in 0..3u8 {
                    net.nodes[1].start_lookup(Id([k; 20]), LookupKind::Announce { port: 9000 }, now);
                }
            }
            for d in &mut net.nodes {
                d.tick(now);
            }
            net.deliver(now);
            for e in net.nodes[1].events.drain(..) {
                let Event::LookupDone(r) = e;
                found += usize::from(r.target == key && !r.peers.is_empty());
            }
            step += 1;
        }
        let worst = net.max_per_10s(1, 0);
        assert!(worst < 50, "{worst} packets to one node within 10 s: libtorrent would ban us");
        assert!(worst >= 20, "the budget is used ({worst})");
        assert!(found >= 100, "lookups still find the key ({found} of 200)");
        assert!(net.nodes[0].store.peers(&Id([1; 20]), start).contains(&fam(v6, "127.0.0.1:9000").parse().unwrap()));
    }

    #[test]
    fn a_silent_node_is_backed_off_not_hammered() {
        let start = Instant::now();
        let mut d = Dht::new(id(1), DhtConfig::default(), vec![], start);
        let dead: SocketAddr = "127.0.0.1:9".parse().unwrap();
        d.table.insert(NodeInfo { id: id(2), addr: dead }, true, start);
        let mut sent = 0;
        for step in 0..6000u64 {
            let now = start + Duration::from_millis(10 * step);
            if step % 20 == 0 {
                d.start_lookup(Id([step as u8; 20]), LookupKind::GetPeers, now);
                d.table.insert(NodeInfo { id: id(2), addr: dead }, true, now); // heard from again
            }
            d.tick(now);
            sent += d.outbox.drain(..).filter(|(to, _)| *to == dead).count();
        }
        // Timeouts back off 1, 2, 4, ... 60 s: a handful of queries in a minute.
        assert!(sent <= 10, "{sent} queries to a node that never answers");
    }

    #[test]
    fn read_only_nodes_are_answered_but_never_routed_and_ask_with_ro() {
        read_only_nodes(false);
        read_only_nodes(true);
    }

    fn read_only_nodes(v6: bool) {
        let now = Instant::now();
        let cfg = DhtConfig { read_only: true, ipv6: v6, ..DhtConfig::default() };
        let addrs: Vec<String> = ["127.0.0.1:1000", "127.0.0.1:1001", "127.0.0.1:1002"].map(|a| fam(v6, a)).into();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let mut net = Net::new(&addrs, vec![id(1), id(2), id(3)], DhtConfig { ipv6: v6, ..DhtConfig::default() }, now);
        net.nodes[1] = Dht::new(id(2), cfg, vec![net.addrs[0]], now);
        net.nodes[1].join(now);
        net.deliver(now);
        assert!(!net.nodes[1].table.is_empty(), "the read-only node learned node 0");
        assert!(net.nodes[0].table.is_empty(), "node 0 keeps the read-only node out of its table");
        assert!(net.nodes[0].stats.read_only_queries >= 1);
        // Node 2 asks node 0 for nodes: the read-only node is not handed out.
        net.nodes[2].table.insert(NodeInfo { id: id(1), addr: net.addrs[0] }, true, now);
        net.nodes[2].start_lookup(id(2), LookupKind::FindNode, now);
        net.deliver(now);
        assert!(net.nodes[2].table.entries().all(|e| e.node.addr != net.addrs[1]));
        // The read-only node answers no query.
        let ping = Message::new(b"p".to_vec(), Body::Query { id: id(3), query: Query::Ping }).encode();
        net.nodes[1].handle_packet(net.addrs[2], &ping, now);
        assert!(net.nodes[1].outbox.is_empty());
    }

    /// A node id valid for `ip` under BEP 42.
    fn valid_id(ip: &str, seed: u8) -> Id {
        node_id::generate_id(ip.parse().unwrap(), [seed; 20])
    }

    #[test]
    fn name_keys_are_stored_on_and_read_from_bep42_valid_nodes_only() {
        name_keys_on_valid_nodes(false);
    }

    #[test]
    fn name_keys_are_stored_on_and_read_from_bep42_valid_ipv6_nodes_only() {
        name_keys_on_valid_nodes(true);
    }

    fn name_keys_on_valid_nodes(v6: bool) {
        let now = Instant::now();
        let key = Id([0x42; 20]);
        // Node 2 chose an id right next to the key; its id is not its address's.
        let mut near = key.0;
        near[19] ^= 1;
        let addrs: Vec<String> = ["8.1.1.1:6881", "8.2.2.2:6881", "8.3.3.3:6881"].map(|a| fam(v6, a)).into();
        let ip = |i: usize| addrs[i].parse::<SocketAddr>().unwrap().ip().to_string();
        let ids = vec![valid_id(&ip(0), 1), valid_id(&ip(1), 2), Id(near)];
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let mut net = Net::new(&addrs, ids, DhtConfig { ipv6: v6, ..DhtConfig::default() }, now);
        net.nodes[1].store.announce(key, fam(v6, "8.8.8.8:1").parse().unwrap(), now).unwrap();
        net.nodes[2].store.announce(key, fam(v6, "6.6.6.6:6").parse().unwrap(), now).unwrap();
        for j in [1, 2] {
            let n = NodeInfo { id: net.nodes[j].id, addr: net.addrs[j] };
            net.nodes[0].table.insert(n, true, now);
        }
        let peers = |net: &mut Net| -> Vec<SocketAddr> {
            let Some(Event::LookupDone(r)) = net.nodes[0].events.pop() else { panic!("no lookup result") };
            r.peers
        };
        net.nodes[0].start_lookup(key, LookupKind::GetPeers, now);
        net.deliver(now);
        assert!(peers(&mut net).contains(&fam(v6, "6.6.6.6:6").parse().unwrap()), "a plain lookup asks everyone");
        net.nodes[0].start_lookup_secure(key, LookupKind::GetPeers, now);
        net.deliver(now);
        assert_eq!(peers(&mut net), vec![fam(v6, "8.8.8.8:1").parse().unwrap()], "the secure lookup skips node 2");
        net.nodes[0].start_lookup_secure(Id([7; 20]), LookupKind::Announce { port: 5 }, now);
        net.deliver(now);
        assert!(net.nodes[2].store.is_empty() || net.nodes[2].store.len() == 1, "nothing new stored on node 2");
        assert!(net.nodes[1].store.len() == 2, "the announce reached node 1");
        assert!(net.nodes[0].stats.insecure_skipped > 0);
    }

    #[test]
    fn the_node_takes_an_id_derived_from_the_address_others_report() {
        takes_derived_id(false);
        takes_derived_id(true);
    }

    fn takes_derived_id(v6: bool) {
        let now = Instant::now();
        let addrs: Vec<String> =
            ["9.9.9.9:6881", "8.1.1.1:6881", "8.2.2.2:6881", "8.3.3.3:6881"].map(|a| fam(v6, a)).into();
        let ip = |i: usize| addrs[i].parse::<SocketAddr>().unwrap().ip();
        let me = ip(0);
        let ids = vec![
            id(1),
            valid_id(&ip(1).to_string(), 1),
            valid_id(&ip(2).to_string(), 2),
            valid_id(&ip(3).to_string(), 3),
        ];
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let mut net = Net::new(&addrs, ids, DhtConfig { ipv6: v6, ..DhtConfig::default() }, now);
        assert!(!node_id::verify_id(&net.nodes[0].id, me));
        for j in 1..4 {
            let n = NodeInfo { id: net.nodes[j].id, addr: net.addrs[j] };
            net.nodes[0].table.insert(n, true, now);
            net.nodes[0].send_query(net.addrs[j], Some(n.id), Query::Ping, now);
            net.deliver(now);
        }
        assert_eq!(net.nodes[0].external_ip, Some(me));
        assert!(node_id::verify_id(&net.nodes[0].id, me), "a BEP 42 id now");
        assert_eq!(net.nodes[0].table.len(), 3, "the table is kept");
    }

    #[test]
    fn unanswered_queries_time_out_and_lookups_end() {
        let now = Instant::now();
        let mut d =
            Dht::new(id(1), DhtConfig { restrict_ips: false, rate_limit: 100, ..DhtConfig::default() }, vec![], now);
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
        let cfg = DhtConfig { restrict_ips: false, rate_limit: 100, ..DhtConfig::default() };
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
        let cfg = DhtConfig { restrict_ips: false, rate_limit: 100, ..DhtConfig::default() };
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
