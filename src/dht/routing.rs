//! The Kademlia routing table (BEP 5): 160 buckets by XOR distance from our
//! id, k = 8 nodes each, nodes good / questionable / bad by how recently they
//! answered. Sans-IO: time comes in as an argument.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::krpc::{Id, NodeInfo};

/// Nodes per bucket (BEP 5).
pub const K: usize = 8;
/// A node is good while it answered within this time (BEP 5).
pub const GOOD_FOR: Duration = Duration::from_secs(15 * 60);
/// Unanswered queries after which a node is bad.
pub const MAX_FAILURES: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    Good,
    Questionable,
    Bad,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub node: NodeInfo,
    /// When it last answered a query of ours.
    pub last_response: Option<Instant>,
    pub failures: u32,
}

impl Entry {
    pub fn state(&self, now: Instant) -> NodeState {
        if self.failures >= MAX_FAILURES {
            NodeState::Bad
        } else if self.last_response.is_some_and(|t| now.duration_since(t) < GOOD_FOR) {
            NodeState::Good
        } else {
            NodeState::Questionable
        }
    }
}

/// What `insert` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Insert {
    Added,
    Updated,
    /// A bad node made room.
    Replaced(NodeInfo),
    /// The bucket is full of good or questionable nodes; the caller may ping
    /// this questionable one and insert again if it stays silent.
    Full(Option<NodeInfo>),
    /// Refused: our own id, another node already uses this IP address, or (restricted) the
    /// bucket holds a node of the same IPv4 /24 or IPv6 /64 ([`routing_subnet`]).
    Refused,
}

pub struct RoutingTable {
    own: Id,
    buckets: Vec<Vec<Entry>>,
    /// Last time each bucket changed (for refresh).
    touched: Vec<Instant>,
    /// One node per IP address in the table and one per [`routing_subnet`] in a bucket (off
    /// for test networks on one machine).
    restrict_ips: bool,
}

/// The subnet a bucket holds at most one node of when IPs are restricted, as libtorrent's
/// `restrict_routing_ips`: an IPv4 /24 or an IPv6 /64 (IPv4-mapped IPv6 as IPv4), so that one
/// operator's /24 or /64 cannot fill the buckets near a target with sybils (red-team round 8:
/// 256 addresses of one /64 put 41 nodes in a table, 200 of one /24 put 49). `None` for local
/// addresses, exempt like libtorrent's `is_local`: loopback, IPv4 private (10/8, 172.16/12,
/// 192.168/16) and link-local (169.254/16), IPv6 unique-local (fc00::/7) and link-local
/// (fe80::/10). A private cluster lives in one such subnet and would keep a node per bucket;
/// those addresses are not reachable from the internet, so a stranger there is on the LAN.
pub fn routing_subnet(ip: IpAddr) -> Option<IpAddr> {
    let v4 = match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    if let Some(v4) = v4 {
        if v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified() {
            return None;
        }
        return Some(IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()));
    }
    let IpAddr::V6(v6) = ip else { unreachable!("IPv4 handled above") };
    let bits = u128::from(v6);
    let unique_local = bits >> 121 == 0xfc >> 1;
    let link_local = bits >> 118 == 0xfe80 >> 6;
    if v6.is_loopback() || v6.is_unspecified() || unique_local || link_local {
        return None;
    }
    Some(IpAddr::V6((bits & !((1u128 << 64) - 1)).into()))
}

impl RoutingTable {
    pub fn new(own: Id, restrict_ips: bool, now: Instant) -> RoutingTable {
        RoutingTable { own, buckets: vec![Vec::new(); 160], touched: vec![now; 160], restrict_ips }
    }

    /// Bucket of `id`: 159 minus the number of leading bits it shares with us.
    pub fn bucket_of(&self, id: &Id) -> Option<usize> {
        let d = self.own.distance(id);
        let zeros = leading_zeros(&d);
        (zeros < 160).then(|| 159 - zeros as usize)
    }

    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that `node` was heard from; `responded`: it answered our query.
    pub fn insert(&mut self, node: NodeInfo, responded: bool, now: Instant) -> Insert {
        let Some(b) = self.bucket_of(&node.id) else { return Insert::Refused };
        let net = routing_subnet(node.addr.ip()).filter(|_| self.restrict_ips);
        let net_taken = |bucket: &[Entry]| {
            net.is_some() && bucket.iter().any(|e| e.node.id != node.id && routing_subnet(e.node.addr.ip()) == net)
        };
        let moved = self.buckets[b].iter().any(|e| e.node.id == node.id && e.node.addr != node.addr);
        if moved && net_taken(&self.buckets[b]) {
            return Insert::Refused; // an answer from a subnet another node of the bucket holds
        }
        if let Some(e) = self.buckets[b].iter_mut().find(|e| e.node.id == node.id) {
            if e.node.addr != node.addr && !responded {
                return Insert::Refused; // a claim to an id from elsewhere: only an answer moves it
            }
            e.node.addr = node.addr;
            if responded {
                e.last_response = Some(now);
                e.failures = 0;
            }
            self.touched[b] = now;
            return Insert::Updated;
        }
        if self.restrict_ips && self.contains_ip(node.addr.ip()) {
            return Insert::Refused;
        }
        if net_taken(&self.buckets[b]) {
            return Insert::Refused;
        }
        let entry = Entry { node, last_response: responded.then_some(now), failures: 0 };
        let bucket = &mut self.buckets[b];
        if bucket.len() < K {
            bucket.push(entry);
            self.touched[b] = now;
            return Insert::Added;
        }
        if let Some(i) = bucket.iter().position(|e| e.state(now) == NodeState::Bad) {
            let old = std::mem::replace(&mut bucket[i], entry).node;
            self.touched[b] = now;
            return Insert::Replaced(old);
        }
        let stale = bucket
            .iter()
            .filter(|e| e.state(now) == NodeState::Questionable)
            .min_by_key(|e| e.last_response)
            .map(|e| e.node);
        Insert::Full(stale)
    }

    fn contains_ip(&self, ip: IpAddr) -> bool {
        self.buckets.iter().flatten().any(|e| e.node.addr.ip() == ip)
    }

    /// A query to `id` went unanswered.
    pub fn failed(&mut self, id: &Id) {
        if let Some(b) = self.bucket_of(id)
            && let Some(e) = self.buckets[b].iter_mut().find(|e| e.node.id == *id)
        {
            e.failures += 1;
        }
    }

    /// The `n` known nodes closest to `target`, bad ones left out.
    pub fn closest(&self, target: &Id, n: usize, now: Instant) -> Vec<NodeInfo> {
        let mut all: Vec<&Entry> = self.buckets.iter().flatten().filter(|e| e.state(now) != NodeState::Bad).collect();
        all.sort_by_key(|e| e.node.id.distance(target));
        all.into_iter().take(n).map(|e| e.node).collect()
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.buckets.iter().flatten()
    }

    /// Buckets (non-empty, or the one holding our neighbours) unchanged for
    /// `after`: a random id in each, to look up (BEP 5 refresh).
    pub fn refresh_targets(&self, after: Duration, now: Instant, random: &mut impl FnMut() -> u64) -> Vec<Id> {
        let deepest = self.buckets.iter().rposition(|b| !b.is_empty()).unwrap_or(0);
        (0..160)
            .filter(|b| {
                (!self.buckets[*b].is_empty() || *b >= deepest) && now.duration_since(self.touched[*b]) >= after
            })
            .map(|b| self.random_id_in(b, random))
            .collect()
    }

    /// A random id in bucket `b`: shares our first `159 - b` bits, differs in the next.
    fn random_id_in(&self, b: usize, random: &mut impl FnMut() -> u64) -> Id {
        let mut id = [0u8; 20];
        for chunk in id.chunks_mut(8) {
            let r = random().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        let prefix = 159 - b; // bits equal to ours
        for bit in 0..=prefix {
            let (byte, mask) = (bit / 8, 0x80u8 >> (bit % 8));
            let ours = self.own.0[byte] & mask;
            let want = if bit == prefix { ours ^ mask } else { ours };
            id[byte] = (id[byte] & !mask) | want;
        }
        Id(id)
    }
}

fn leading_zeros(d: &[u8; 20]) -> u32 {
    let mut n = 0;
    for b in d {
        if *b == 0 {
            n += 8;
        } else {
            return n + b.leading_zeros();
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(first: u8, last: u8, ip: [u8; 4]) -> NodeInfo {
        let mut id = [0u8; 20];
        id[0] = first;
        id[19] = last;
        NodeInfo { id: Id(id), addr: std::net::SocketAddr::new(std::net::Ipv4Addr::from(ip).into(), 6881) }
    }

    #[test]
    fn buckets_by_shared_prefix() {
        let now = Instant::now();
        let t = RoutingTable::new(Id([0; 20]), false, now);
        assert_eq!(t.bucket_of(&Id([0; 20])), None, "our own id");
        assert_eq!(t.bucket_of(&node(0x80, 0, [1, 1, 1, 1]).id), Some(159));
        assert_eq!(t.bucket_of(&node(0x01, 0, [1, 1, 1, 1]).id), Some(152));
        assert_eq!(t.bucket_of(&node(0, 1, [1, 1, 1, 1]).id), Some(0));
    }

    #[test]
    fn full_buckets_keep_good_nodes_and_replace_bad_ones() {
        let now = Instant::now();
        let mut t = RoutingTable::new(Id([0; 20]), false, now);
        for i in 0..K as u8 {
            assert_eq!(t.insert(node(0x80, i, [10, 0, 0, i]), true, now), Insert::Added);
        }
        assert_eq!(t.insert(node(0x80, 100, [10, 0, 1, 1]), true, now), Insert::Full(None));
        t.failed(&node(0x80, 3, [0; 4]).id);
        t.failed(&node(0x80, 3, [0; 4]).id);
        assert_eq!(t.insert(node(0x80, 100, [10, 0, 1, 1]), true, now), Insert::Replaced(node(0x80, 3, [10, 0, 0, 3])));
        // Later everyone is questionable; the stalest is offered for a ping.
        let later = now + GOOD_FOR + Duration::from_secs(1);
        assert!(matches!(t.insert(node(0x80, 101, [10, 0, 1, 2]), false, later), Insert::Full(Some(_))));
        assert_eq!(t.len(), K);
    }

    #[test]
    fn one_node_per_ip_when_restricted() {
        let now = Instant::now();
        let mut t = RoutingTable::new(Id([0; 20]), true, now);
        assert_eq!(t.insert(node(0x80, 1, [10, 0, 0, 1]), true, now), Insert::Added);
        assert_eq!(t.insert(node(0x40, 1, [10, 0, 0, 1]), true, now), Insert::Refused);
        let mut open = RoutingTable::new(Id([0; 20]), false, now);
        open.insert(node(0x80, 1, [127, 0, 0, 1]), true, now);
        assert_eq!(open.insert(node(0x40, 1, [127, 0, 0, 1]), true, now), Insert::Added);
    }

    fn node6(first: u8, last: u8, ip: &str) -> NodeInfo {
        let mut id = [0u8; 20];
        id[0] = first;
        id[19] = last;
        NodeInfo { id: Id(id), addr: std::net::SocketAddr::new(ip.parse().unwrap(), 6881) }
    }

    /// Red-team round 8: 256 addresses of one IPv6 /64 (and 200 of one IPv4 /24), each with an
    /// id near ours, filled buckets with sybils. One node per /24 or /64 in a bucket now.
    #[test]
    fn a_bucket_holds_one_node_per_ipv4_24_and_ipv6_64() {
        let now = Instant::now();
        let mut t = RoutingTable::new(Id([0; 20]), true, now);
        for i in 1..=200u8 {
            let r = t.insert(node(0x80, i, [203, 0, 113, i]), true, now);
            assert_eq!(r, if i == 1 { Insert::Added } else { Insert::Refused }, "203.0.113.{i}");
        }
        for i in 0..256u32 {
            let r = t.insert(node6(0x40, i as u8, &format!("2001:db8:0:1::{:x}", i + 1)), true, now);
            assert_eq!(r, if i == 0 { Insert::Added } else { Insert::Refused }, "::{:x}", i + 1);
        }
        // IPv4-mapped IPv6 is its IPv4 /24.
        assert_eq!(t.insert(node6(0x80, 250, "::ffff:203.0.113.77"), true, now), Insert::Refused);
        // Other subnets fill the bucket; the same /24 may sit in another bucket.
        for i in 2..=8u8 {
            assert_eq!(t.insert(node(0x80, i, [198, 51, i, 1]), true, now), Insert::Added);
        }
        assert_eq!(t.insert(node(0x20, 1, [203, 0, 113, 9]), true, now), Insert::Added);
        assert_eq!(t.insert(node6(0x41, 1, "2001:db8:0:2::1"), true, now), Insert::Added, "another /64");
        assert_eq!(t.len(), 1 + 1 + 7 + 1 + 1);
        // A node of the bucket does not move into a subnet another one holds, even answering.
        assert_eq!(t.insert(node(0x80, 2, [203, 0, 113, 200]), true, now), Insert::Refused);
        assert_eq!(t.insert(node(0x80, 2, [198, 51, 2, 9]), true, now), Insert::Updated, "its own /24");
    }

    /// Loopback and private addresses are exempt (test networks, private clusters on one LAN),
    /// and an unrestricted table (a node on loopback) checks no subnet.
    #[test]
    fn local_addresses_and_unrestricted_tables_are_exempt_from_the_subnet_rule() {
        let now = Instant::now();
        let mut t = RoutingTable::new(Id([0; 20]), true, now);
        let local = [[127, 0, 0, 1], [127, 0, 0, 2], [10, 0, 0, 1], [10, 0, 0, 2], [192, 168, 1, 1], [192, 168, 1, 2]];
        for (i, ip) in local.iter().enumerate() {
            assert_eq!(t.insert(node(0x80, i as u8, *ip), true, now), Insert::Added, "{ip:?}");
        }
        assert_eq!(t.insert(node6(0x40, 1, "fd00:99::1"), true, now), Insert::Added);
        assert_eq!(t.insert(node6(0x40, 2, "fd00:99::2"), true, now), Insert::Added, "unique-local");
        assert_eq!(t.insert(node6(0x40, 3, "fe80::1"), true, now), Insert::Added);
        assert_eq!(t.insert(node6(0x40, 4, "fe80::2"), true, now), Insert::Added, "link-local");
        let mut open = RoutingTable::new(Id([0; 20]), false, now);
        assert_eq!(open.insert(node(0x80, 1, [203, 0, 113, 1]), true, now), Insert::Added);
        assert_eq!(open.insert(node(0x80, 2, [203, 0, 113, 2]), true, now), Insert::Added);
        assert_eq!(routing_subnet("203.0.113.9".parse().unwrap()), Some("203.0.113.0".parse().unwrap()));
        assert_eq!(routing_subnet("2001:db8:1:2:3::4".parse().unwrap()), Some("2001:db8:1:2::".parse().unwrap()));
        assert_eq!(routing_subnet("::1".parse().unwrap()), None);
    }

    #[test]
    fn an_unanswered_claim_does_not_move_a_node() {
        let now = Instant::now();
        let mut t = RoutingTable::new(Id([0; 20]), false, now);
        t.insert(node(0x80, 1, [10, 0, 0, 1]), true, now);
        assert_eq!(t.insert(node(0x80, 1, [6, 6, 6, 6]), false, now), Insert::Refused);
        assert_eq!(t.closest(&Id([0x80; 20]), 1, now)[0].addr.ip(), std::net::Ipv4Addr::new(10, 0, 0, 1));
    }

    #[test]
    fn closest_sorts_by_xor_and_skips_bad_nodes() {
        let now = Instant::now();
        let mut t = RoutingTable::new(Id([0; 20]), false, now);
        for i in 1..=20u8 {
            t.insert(node(i, 0, [10, 0, 0, i]), true, now);
        }
        let c = t.closest(&node(5, 0, [0; 4]).id, 3, now);
        assert_eq!(c[0].id, node(5, 0, [0; 4]).id);
        assert_eq!(c.len(), 3);
        t.failed(&node(5, 0, [0; 4]).id);
        t.failed(&node(5, 0, [0; 4]).id);
        assert_ne!(t.closest(&node(5, 0, [0; 4]).id, 1, now)[0].id, node(5, 0, [0; 4]).id);
    }

    #[test]
    fn refresh_targets_fall_in_their_buckets() {
        let now = Instant::now();
        let mut own = [0u8; 20];
        own[0] = 0b1010_1010;
        let mut t = RoutingTable::new(Id(own), false, now);
        t.insert(node(0x00, 1, [10, 0, 0, 1]), true, now);
        let mut x = 7u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let later = now + Duration::from_secs(16 * 60);
        let targets = t.refresh_targets(Duration::from_secs(15 * 60), later, &mut rnd);
        assert!(!targets.is_empty());
        for id in targets {
            assert!(t.bucket_of(&id).is_some());
        }
        for b in [0usize, 10, 100, 159] {
            assert_eq!(t.bucket_of(&t.random_id_in(b, &mut rnd)), Some(b));
        }
    }
}
