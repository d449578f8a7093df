//! `make bench` part 4: the DHT. Writes `target/bench/dht.json`.
//!
//! A deterministic simulation (the sans-IO nodes in virtual time, 20 ms
//! one-way latency, no sockets) of 10,000 nodes: lookup success, round
//! trips and messages per get_peers lookup with 0%, 10% and 30% of the nodes
//! failed after the keys were announced.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shardnet::dht::sim::{SimConfig, percentile, run};

fn main() {
    let mut report = serde_json::Map::new();
    let nodes = 10_000;
    let mut rows = Vec::new();
    for fail in [0.0, 0.10, 0.30] {
        let t = Instant::now();
        let r = run(&SimConfig { nodes, latency: Duration::from_millis(20), fail_fraction: fail, keys: 100, lookups: 500, seed: 42 });
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
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("dht.json"), serde_json::to_string_pretty(&Value::Object(report)).unwrap()).unwrap();
    println!("wrote {}", out.join("dht.json").display());
}
