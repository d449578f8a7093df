//! `make bench` part 4: the DHT. Writes `target/bench/dht.json`.
//!
//! - A deterministic simulation (the sans-IO nodes in virtual time, 20 ms
//!   one-way latency, no sockets) of 10,000 nodes: lookup success, round
//!   trips and messages per get_peers lookup with 0%, 10% and 30% of the
//!   nodes failed after the keys were announced.
//! - Real sockets: 1,000 DHT nodes on loopback UDP in this process (one mio
//!   loop drives them all), every node alive: find_node time, get_peers time
//!   to the first peer, announce time; p50, p99 and max.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use serde_json::{Value, json};
use shardnet::dht::krpc::Id;
use shardnet::dht::node::{Dht, DhtConfig, Event, LookupKind, LookupResult};
use shardnet::dht::sim::{SimConfig, percentile, run};

/// 1,000 nodes with real UDP sockets, driven by one poll loop.
struct Testnet {
    poll: Poll,
    socks: Vec<UdpSocket>,
    nodes: Vec<Dht>,
    addrs: Vec<SocketAddr>,
}

impl Testnet {
    fn new(n: usize) -> Testnet {
        let poll = Poll::new().unwrap();
        let (mut socks, mut nodes, mut addrs) = (Vec::new(), Vec::new(), Vec::new());
        let cfg = DhtConfig { restrict_ips: false, rate_limit: 100_000, ..DhtConfig::default() };
        for i in 0..n {
            let mut s = UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            poll.registry().register(&mut s, Token(i), Interest::READABLE).unwrap();
            let a = s.local_addr().unwrap();
            let id = Id(shardnet::hash::sha1(format!("testnet-{i}").as_bytes()));
            let boot = if i == 0 { vec![] } else { vec![addrs[i / 2]] };
            nodes.push(Dht::new(id, cfg.clone(), boot, Instant::now()));
            socks.push(s);
            addrs.push(a);
        }
        Testnet { poll, socks, nodes, addrs }
    }

    fn flush(&mut self, i: usize) {
        for (to, bytes) in std::mem::take(&mut self.nodes[i].outbox) {
            let _ = self.socks[i].send_to(&bytes, to);
        }
    }

    /// Runs the network for `d`, or until `until` says stop.
    fn run(&mut self, d: Duration, mut until: impl FnMut(&mut Testnet) -> bool) {
        let end = Instant::now() + d;
        let mut events = Events::with_capacity(4096);
        let mut buf = [0u8; 2048];
        let mut next_tick = Instant::now();
        while Instant::now() < end {
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(5)));
            for ev in events.iter() {
                let i = ev.token().0;
                while let Ok((n, from)) = self.socks[i].recv_from(&mut buf) {
                    self.nodes[i].handle_packet(from, &buf[..n], Instant::now());
                }
                self.flush(i);
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + Duration::from_millis(20);
                for i in 0..self.nodes.len() {
                    self.nodes[i].tick(Instant::now());
                    self.flush(i);
                }
            }
            if until(self) {
                return;
            }
        }
    }

    fn lookup(&mut self, i: usize, target: Id, kind: LookupKind) -> LookupResult {
        let l = self.nodes[i].start_lookup(target, kind, Instant::now());
        self.flush(i);
        let mut result = None;
        self.run(Duration::from_secs(10), |t| {
            if let Some(pos) = t.nodes[i].events.iter().position(|Event::LookupDone(r)| r.id == l) {
                let Event::LookupDone(r) = t.nodes[i].events.remove(pos);
                result = Some(r);
                return true;
            }
            false
        });
        result.expect("lookup finished within 10 s")
    }
}

fn stats_ms(v: &[Duration]) -> Value {
    let ms: Vec<u64> = v.iter().map(|d| d.as_micros() as u64).collect();
    json!({
        "p50_ms": percentile(&ms, 0.5).unwrap_or(0) as f64 / 1e3,
        "p99_ms": percentile(&ms, 0.99).unwrap_or(0) as f64 / 1e3,
        "max_ms": ms.iter().max().copied().unwrap_or(0) as f64 / 1e3,
    })
}

fn real_sockets() -> Value {
    let n = 1000;
    let mut net = Testnet::new(n);
    for i in 0..n {
        net.nodes[i].join(Instant::now());
        net.flush(i);
        if i % 50 == 49 {
            net.run(Duration::from_millis(200), |_| false);
        }
    }
    net.run(Duration::from_secs(2), |_| false);
    for d in &mut net.nodes {
        d.events.clear();
    }
    let (mut find, mut first_peer, mut announce) = (Vec::new(), Vec::new(), Vec::new());
    let mut misses = 0;
    for k in 0..100usize {
        let key = Id(shardnet::hash::sha1(format!("bench-key-{k}").as_bytes()));
        let (who, asker) = ((k * 37) % n, (k * 91 + 500) % n);
        let r = net.lookup(who, key, LookupKind::Announce { port: 9000 + k as u16 });
        announce.push(r.elapsed);
        net.run(Duration::from_millis(20), |_| false); // the announces themselves
        let r = net.lookup(asker, Id(shardnet::hash::sha1(format!("find-{k}").as_bytes())), LookupKind::FindNode);
        find.push(r.elapsed);
        let r = net.lookup(asker, key, LookupKind::GetPeers);
        let want = SocketAddr::new(net.addrs[who].ip(), 9000 + k as u16);
        match (r.peers.contains(&want), r.first_peer) {
            (true, Some(t)) => first_peer.push(t),
            _ => misses += 1,
        }
    }
    let report = json!({
        "nodes": n,
        "lookups": 100,
        "get_peers_misses": misses,
        "find_node": stats_ms(&find),
        "get_peers_first_peer": stats_ms(&first_peer),
        "announce": stats_ms(&announce),
    });
    println!(
        "real sockets, {n} nodes on loopback: find_node p50 {} ms (max {}); get_peers first peer p50 {} ms (max {}); announce p50 {} ms (max {}); {misses} misses",
        report["find_node"]["p50_ms"],
        report["find_node"]["max_ms"],
        report["get_peers_first_peer"]["p50_ms"],
        report["get_peers_first_peer"]["max_ms"],
        report["announce"]["p50_ms"],
        report["announce"]["max_ms"]
    );
    report
}

fn main() {
    let mut report = serde_json::Map::new();
    let nodes = 10_000;
    let mut rows = Vec::new();
    for fail in [0.0, 0.10, 0.30] {
        let t = Instant::now();
        let r = run(&SimConfig {
            nodes,
            latency: Duration::from_millis(20),
            fail_fraction: fail,
            keys: 100,
            lookups: 500,
            seed: 42,
        });
        let row = json!({
            "failed_fraction": fail,
            "lookups": r.lookups,
            "success_rate": r.success_rate(),
            "rounds_median": percentile(&r.rounds, 0.5),
            "rounds_p99": percentile(&r.rounds, 0.99),
            "messages_median": percentile(&r.messages, 0.5),
            "messages_p99": percentile(&r.messages, 0.99),
            "wall_s": t.elapsed().as_secs_f64(),
        });
        println!(
            "simulated {nodes} nodes, {:>2.0}% failed: success {:.1}%, rounds median {} p99 {}, messages median {} p99 {} (goal: median rounds <= {:.1})",
            fail * 100.0,
            r.success_rate() * 100.0,
            row["rounds_median"],
            row["rounds_p99"],
            row["messages_median"],
            row["messages_p99"],
            (nodes as f64).log2() / 2.0
        );
        rows.push(row);
    }
    report.insert("simulation".into(), json!({"nodes": nodes, "latency_ms": 20, "runs": rows}));
    report.insert("real_sockets".into(), real_sockets());
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("dht.json"), serde_json::to_string_pretty(&Value::Object(report)).unwrap()).unwrap();
    println!("wrote {}", out.join("dht.json").display());
}
