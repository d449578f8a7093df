//! Many DHT nodes in virtual time, no sockets: a deterministic network with
//! fixed latency where failed nodes drop everything. For the churn tests and
//! `target/bench/dht.json`.

use std::collections::{BinaryHeap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::krpc::Id;
use super::node::{Dht, DhtConfig, Event, LookupKind, LookupResult};

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    /// One-way delay of every datagram.
    pub latency: Duration,
    /// Share of nodes that fail after the keys are announced.
    pub fail_fraction: f64,
    pub keys: usize,
    pub lookups: usize,
    pub seed: u64,
}

#[derive(Clone, Debug)]
pub struct SimReport {
    pub nodes: usize,
    pub failed_nodes: usize,
    pub lookups: usize,
    pub found: usize,
    pub rounds: Vec<u32>,
    pub messages: Vec<u32>,
}

impl SimReport {
    pub fn success_rate(&self) -> f64 {
        self.found as f64 / self.lookups.max(1) as f64
    }
}

pub fn percentile<T: Copy + Ord>(v: &[T], p: f64) -> Option<T> {
    let mut s = v.to_vec();
    s.sort_unstable();
    (!s.is_empty()).then(|| s[((s.len() - 1) as f64 * p).round() as usize])
}

/// A datagram in flight: delivered at `at` (min-heap by time, then order).
#[derive(PartialEq, Eq)]
struct Flight {
    at: Duration,
    seq: u64,
    from: usize,
    to: usize,
    bytes: Vec<u8>,
}

impl Ord for Flight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}
impl PartialOrd for Flight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

struct Net {
    nodes: Vec<Dht>,
    dead: Vec<bool>,
    queue: BinaryHeap<Flight>,
    seq: u64,
    start: Instant,
    now: Duration,
    latency: Duration,
}

fn addr_of(i: usize) -> SocketAddr {
    let i = i as u32 + 1;
    SocketAddr::new(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8).into(), 6881)
}

fn index_of(a: &SocketAddr) -> Option<usize> {
    let SocketAddr::V4(a) = a else { return None };
    let o = a.ip().octets();
    let i = ((o[1] as u32) << 16 | (o[2] as u32) << 8 | o[3] as u32) as usize;
    (o[0] == 10 && a.port() == 6881 && i > 0).then(|| i - 1)
}

impl Net {
    fn instant(&self) -> Instant {
        self.start + self.now
    }

    fn collect(&mut self, i: usize) {
        for (to, bytes) in std::mem::take(&mut self.nodes[i].outbox) {
            if let Some(j) = index_of(&to).filter(|j| *j < self.nodes.len()) {
                self.seq += 1;
                self.queue.push(Flight { at: self.now + self.latency, seq: self.seq, from: i, to: j, bytes });
            }
        }
    }

    /// Runs until no datagram is in flight and the `active` nodes' lookups
    /// have ended (ticking them every 50 ms of virtual time).
    fn settle(&mut self, active: &mut HashSet<usize>) {
        let tick = Duration::from_millis(50);
        let mut next_tick = self.now + tick;
        loop {
            let next_packet = self.queue.peek().map(|f| f.at);
            match next_packet {
                Some(at) if at <= next_tick => {
                    let f = self.queue.pop().expect("peeked");
                    self.now = f.at;
                    if !self.dead[f.to] {
                        let now = self.instant();
                        self.nodes[f.to].handle_packet(addr_of(f.from), &f.bytes, now);
                        self.collect(f.to);
                    }
                }
                _ => {
                    if active.is_empty() && self.queue.is_empty() {
                        return;
                    }
                    self.now = next_tick;
                    next_tick = self.now + tick;
                    let now = self.instant();
                    let ids: Vec<usize> = active.iter().copied().collect();
                    for i in ids {
                        self.nodes[i].tick(now);
                        self.collect(i);
                        if self.nodes[i].next_tick() >= Duration::from_secs(1) {
                            active.remove(&i);
                        }
                    }
                }
            }
        }
    }
}

/// Nodes re-announce what they hold this often (the peer store keeps 30 min).
const REANNOUNCE: Duration = Duration::from_secs(10 * 60);

fn announce_all(net: &mut Net, keys: &[(Id, usize, u16)], active: &mut HashSet<usize>) {
    for (key, who, port) in keys {
        let now = net.instant();
        net.nodes[*who].start_lookup(*key, LookupKind::Announce { port: *port }, now);
        net.collect(*who);
        active.insert(*who);
    }
    net.settle(active);
    for (_, who, _) in keys {
        net.nodes[*who].events.clear();
    }
}

/// Builds the network, announces `keys` keys, fails a share of the nodes,
/// and runs `lookups` get_peers lookups from live nodes.
pub fn run(cfg: &SimConfig) -> SimReport {
    let start = Instant::now();
    let mut rng = cfg.seed | 1;
    let mut random = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let dht_cfg = DhtConfig { restrict_ips: true, rate_limit: 10_000, ..DhtConfig::default() };
    let mut net = Net {
        nodes: Vec::new(),
        dead: Vec::new(),
        queue: BinaryHeap::new(),
        seq: 0,
        start,
        now: Duration::ZERO,
        latency: cfg.latency,
    };
    let mut active = HashSet::new();
    for i in 0..cfg.nodes {
        let mut id = [0u8; 20];
        for c in id.chunks_mut(8) {
            let r = random().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
        let boot = if i == 0 { vec![] } else { vec![addr_of((random() % i as u64) as usize)] };
        net.nodes.push(Dht::new(Id(id), dht_cfg.clone(), boot, net.instant()));
        net.dead.push(false);
        let now = net.instant();
        net.nodes[i].join(now);
        net.collect(i);
        active.insert(i);
        if i % 64 == 63 || i + 1 == cfg.nodes {
            net.settle(&mut active);
        }
    }
    // Each key announced by one node.
    let keys: Vec<(Id, usize, u16)> = (0..cfg.keys)
        .map(|k| {
            (
                Id(crate::hash::sha1(format!("sim-key-{k}").as_bytes())),
                (random() % cfg.nodes as u64) as usize,
                7000 + (k % 1000) as u16,
            )
        })
        .collect();
    announce_all(&mut net, &keys, &mut active);
    let mut announced = net.now;
    for n in &mut net.nodes {
        n.events.clear();
    }
    // Churn: a share of the nodes fail.
    let failed = (cfg.nodes as f64 * cfg.fail_fraction) as usize;
    let mut killed = 0;
    while killed < failed {
        let i = (random() % cfg.nodes as u64) as usize;
        if !net.dead[i] {
            net.dead[i] = true;
            killed += 1;
        }
    }
    let mut report = SimReport {
        nodes: cfg.nodes,
        failed_nodes: failed,
        lookups: cfg.lookups,
        found: 0,
        rounds: vec![],
        messages: vec![],
    };
    // Lookups of keys whose announcer is alive (a dead one's entry expires,
    // as it should), re-announced every REANNOUNCE as nodes do.
    let live_keys: Vec<(Id, usize, u16)> = keys.iter().copied().filter(|(_, who, _)| !net.dead[*who]).collect();
    for q in 0..cfg.lookups {
        if net.now - announced >= REANNOUNCE {
            announce_all(&mut net, &live_keys, &mut active);
            announced = net.now;
        }
        let (key, announcer, port) = live_keys[q % live_keys.len()];
        let peer = SocketAddr::new(addr_of(announcer).ip(), port);
        let who = loop {
            let i = (random() % cfg.nodes as u64) as usize;
            if !net.dead[i] {
                break i;
            }
        };
        let now = net.instant();
        let l = net.nodes[who].start_lookup(key, LookupKind::GetPeers, now);
        net.collect(who);
        active.insert(who);
        net.settle(&mut active);
        let result: Option<LookupResult> =
            net.nodes[who].events.drain(..).find_map(|Event::LookupDone(r)| (r.id == l).then_some(r));
        if let Some(r) = result {
            if r.peers.contains(&peer) {
                report.found += 1;
            }
            report.rounds.push(r.rounds);
            report.messages.push(r.messages);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_nodes_find_every_key_even_with_a_third_failed() {
        for fail in [0.0, 0.33] {
            let r = run(&SimConfig {
                nodes: 1000,
                latency: Duration::from_millis(20),
                fail_fraction: fail,
                keys: 20,
                lookups: 100,
                seed: 7,
            });
            assert!(r.success_rate() >= if fail == 0.0 { 1.0 } else { 0.97 }, "{fail}: {:?}", (r.found, r.lookups));
            let median = percentile(&r.rounds, 0.5).unwrap();
            assert!(median as f64 <= (1000f64).log2() / 2.0, "median rounds {median}");
        }
    }
}
