//! `make bench` part 1: the command protocol and startup hashing.
//! Writes `target/bench/commands.json`.
//!
//! - STATUS round trips per second and p50/p99 latency, 1 and 16 clients;
//! - the same with a cluster key (every frame MACed both ways) against without, alternating
//!   rounds on two nodes in the same run (medians; goal: at most 10% slower);
//! - STATUS round trips per second and p99 with 16 clients while 1,000 idle and 20 slow
//!   (frame-dribbling) connections are open, against the same without them, alternating rounds
//!   on one node in the same run (medians; goal: at least 0.8x);
//! - first-start hashing rate against this machine's single-thread SHA-1
//!   rate measured in the same run;
//! - time until a restarted node has all metadata, with 8 x 512 MiB shards.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{NodeProc, TempDir, wait_for};
use serde_json::{Value, json};
use shardnet::gguf::GgmlType;
use shardnet::gguf::writer::{Builder, Value as Meta};

const ROUND_TRIP_SECS: f64 = 3.0;

fn main() {
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), json!({"cores": std::thread::available_parallelism().map_or(0, |n| n.get())}));

    let dir = TempDir::new("bench-cmd");
    write_gguf(&dir.path().join("shard-0.gguf"), 0, 4 << 20, true);
    let node = NodeProc::start(dir.path(), &["--log-level", "warn"]);
    node.wait_metadata();
    for clients in [1usize, 16] {
        let r = round_trips(&node, clients);
        println!(
            "STATUS, {clients:>2} clients: {:>8.0} round trips/s, p50 {:>6.1} us, p99 {:>6.1} us",
            r["round_trips_per_s"].as_f64().unwrap(),
            r["p50_us"].as_f64().unwrap(),
            r["p99_us"].as_f64().unwrap()
        );
        report.insert(format!("status_{clients}_clients"), r);
    }
    drop(node);

    report.insert("status_keyed_vs_open".into(), keyed_vs_open(&dir));
    report.insert("status_16_clients_idle_and_slow".into(), status_under_idle_and_slow(&dir));
    // Saved now too: the hashing runs below take minutes on a loaded machine.
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("commands.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();

    report.insert("startup_hashing".into(), startup_hashing());
    report.insert("cached_restart".into(), cached_restart());

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("commands.json");
    std::fs::write(&path, serde_json::to_string_pretty(&Value::Object(report)).unwrap()).unwrap();
    println!("wrote {}", path.display());
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// STATUS round trips per second of one client, on a node with a cluster key (the client
/// proves it; every frame is MACed) and on one without, in alternating 1 s rounds.
fn keyed_vs_open(dir: &TempDir) -> Value {
    use std::os::unix::fs::PermissionsExt;
    let key_path = dir.path().join("bench.key");
    std::fs::write(&key_path, "0f1e2d3c4b5a69788796a5b4c3d2e1f0").unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = shardnet::protocol::auth::ClusterKey::load(&key_path).unwrap().key;
    let (open_dir, keyed_dir) = (dir.path().join("open"), dir.path().join("keyed"));
    std::fs::create_dir_all(&open_dir).unwrap();
    std::fs::create_dir_all(&keyed_dir).unwrap();
    let open = NodeProc::start(&open_dir, &["--log-level", "warn"]);
    let keyed = NodeProc::start(&keyed_dir, &["--log-level", "warn", "--cluster-key-file", key_path.to_str().unwrap()]);
    let (mut open_rates, mut keyed_rates) = (Vec::new(), Vec::new());
    let (mut open_cpu, mut keyed_cpu) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let c = shardnet::client::Client::connect_with_key(&open.addr, common::WAIT, None).unwrap();
        let (wall, cpu) = timed_round_trips(&open, c);
        open_rates.push(wall);
        open_cpu.push(cpu);
        let c = shardnet::client::Client::connect_with_key(&keyed.addr, common::WAIT, Some(&key)).unwrap();
        assert!(c.authenticated());
        let (wall, cpu) = timed_round_trips(&keyed, c);
        keyed_rates.push(wall);
        keyed_cpu.push(cpu);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (o, k) = (median(&mut open_rates), median(&mut keyed_rates));
    let (oc, kc) = (median(&mut open_cpu), median(&mut keyed_cpu));
    // The MACs' CPU time alone, without the machine's noise: a round trip seals and opens a
    // request and a STATUS answer once each.
    let mut status = shardnet::client::Client::connect_with_key(&open.addr, common::WAIT, None).unwrap();
    let answer = serde_json::to_vec(&status.request("STATUS", json!({})).unwrap()).unwrap();
    let request = br#"{"command":"STATUS","request_id":"ctl-1","from":"shardctl","params":{}}"#;
    let mac_us = mac_cost_us(&key, request, &answer);
    println!(
        "STATUS, 1 client: {o:.0} round trips/s without a key, {k:.0} with one ({:+.1}%); per CPU second \
         (node loop + client): {oc:.0} vs {kc:.0} ({:+.1}%); the MACs' CPU {mac_us:.2} us per round trip",
        (k / o - 1.0) * 100.0,
        (kc / oc - 1.0) * 100.0,
    );
    json!({"open_per_s": o, "keyed_per_s": k, "keyed_over_open": k / o,
        "open_per_cpu_s": oc, "keyed_per_cpu_s": kc, "keyed_over_open_cpu": kc / oc,
        "open_rounds": open_rates, "keyed_rounds": keyed_rates, "open_cpu_rounds": open_cpu,
        "keyed_cpu_rounds": keyed_cpu, "goal": "keyed_over_open >= 0.9",
        "mac_cpu_us_per_round_trip": mac_us, "status_answer_bytes": answer.len()})
}

/// Raises this process's open-file limit to its hard limit (the idle connections need ~1,100).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write one rlimit we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(1 << 20);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

/// 16 clients' STATUS round trips with and without 1,000 idle connections (500 that never sent
/// a byte, 500 that asked once) and 20 slow ones (a frame dribbled a byte every 50 ms each)
/// open on the same node; alternating 2 s rounds, medians.
fn status_under_idle_and_slow(dir: &TempDir) -> Value {
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const IDLE: usize = 1_000;
    const SLOW: usize = 20;
    assert!(raise_nofile() >= 1_300, "the bench holds 1,100 connections: raise `ulimit -Hn` to 1,300 or more");
    // Caps above what the bench opens, so the node holds every connection it measures against.
    let flags = [
        "--log-level",
        "warn",
        "--max-connections",
        "4096",
        "--max-unclassified",
        "2048",
        "--max-command-connections",
        "2048",
        "--max-command-connections-per-ip",
        "2048",
    ];
    let load_dir = dir.path().join("load");
    std::fs::create_dir_all(&load_dir).unwrap();
    let node = NodeProc::start(&load_dir, &flags);
    let open_load = || -> (Vec<TcpStream>, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let mut idle = Vec::with_capacity(IDLE);
        for i in 0..IDLE {
            let mut s = node.raw();
            if i % 2 == 1 {
                common::send_frame(&mut s, br#"{"command":"STATUS","request_id":1}"#);
                common::read_frame(&mut s);
            }
            idle.push(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut slow: Vec<TcpStream> = (0..SLOW).map(|_| node.raw()).collect();
        let stop2 = stop.clone();
        let dribbler = std::thread::spawn(move || {
            for s in &mut slow {
                s.write_all(&100_000u32.to_be_bytes()).unwrap();
            }
            while !stop2.load(Ordering::Relaxed) {
                for s in &mut slow {
                    let _ = s.write_all(b" ");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        (idle, stop, dribbler)
    };
    let round = |node: &NodeProc| round_trips_with((0..16).map(|_| node.client()).collect(), 2.0);
    let (mut base, mut loaded) = (Vec::new(), Vec::new());
    let mut held = 0;
    for _ in 0..3 {
        base.push(round(&node));
        let (idle, stop, dribbler) = open_load();
        let s = node.call("STATUS", json!({}));
        held = s["result"]["connections"].as_u64().unwrap_or(0);
        loaded.push(round(&node));
        stop.store(true, Ordering::Relaxed);
        dribbler.join().unwrap();
        drop(idle);
        std::thread::sleep(Duration::from_millis(300)); // the node closes them
    }
    let median = |rounds: &[Value], key: &str| {
        let mut v: Vec<f64> = rounds.iter().map(|r| r[key].as_f64().unwrap()).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, l) = (median(&base, "round_trips_per_s"), median(&loaded, "round_trips_per_s"));
    let (bp, lp) = (median(&base, "p99_us"), median(&loaded, "p99_us"));
    println!(
        "STATUS, 16 clients: {b:.0} round trips/s (p99 {bp:.0} us) alone, {l:.0} (p99 {lp:.0} us) beside {IDLE} idle \
         and {SLOW} slow connections ({held} open): {:.2}x",
        l / b
    );
    json!({"idle": IDLE, "slow": SLOW, "connections_open_loaded": held,
        "alone_per_s": b, "loaded_per_s": l, "loaded_over_alone": l / b,
        "alone_p99_us": bp, "loaded_p99_us": lp, "goal": "loaded_over_alone >= 0.8",
        "alone_rounds": base, "loaded_rounds": loaded})
}

/// Nanoseconds a thread has run on a CPU (`/proc/.../schedstat`, first field).
fn cpu_ns(schedstat: &str) -> u64 {
    std::fs::read_to_string(schedstat).ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// One second of STATUS round trips on `c`: (round trips per wall second, round trips per CPU
/// second of the node's event loop and the client thread together). The CPU figure is what a
/// loaded, shared machine cannot skew: both sides' work per round trip.
fn timed_round_trips(node: &NodeProc, c: shardnet::client::Client) -> (f64, f64) {
    let loop_stat = format!("/proc/{}/schedstat", node.child.id());
    let node0 = cpu_ns(&loop_stat);
    let r = round_trips_with(vec![c], 1.0);
    // The client ran in its own thread, which read its CPU time itself.
    let client_ns = r["client_cpu_ns"].as_u64().unwrap_or(0);
    let node_ns = cpu_ns(&loop_stat) - node0;
    let n = r["round_trips"].as_f64().unwrap();
    (r["round_trips_per_s"].as_f64().unwrap(), n / ((node_ns + client_ns) as f64 / 1e9))
}

/// Microseconds to seal and open `request` and `answer` once each (both directions' MACs).
fn mac_cost_us(key: &shardnet::protocol::auth::ClusterKey, request: &[u8], answer: &[u8]) -> f64 {
    use shardnet::protocol::auth::{ClientHandshake, NodeAuth};
    let client = ClientHandshake::new(key.clone(), [1; 32]);
    let mut node = NodeAuth::new(true);
    let challenge = node.hello(key, &[1; 32], &[2; 32], Instant::now()).unwrap();
    let mut c = client.answer(&challenge).unwrap();
    let proof = shardnet::hash::from_hex_vec(c.params["client_proof"].as_str().unwrap()).unwrap();
    node.proof(key, &proof).unwrap();
    let n = 20_000;
    let (mut wire, mut back) = (Vec::new(), Vec::new());
    let cpu0 = cpu_ns("/proc/thread-self/schedstat");
    for _ in 0..n {
        wire.clear();
        c.tx.seal_frame(request, &mut wire);
        node.open(&wire[4..]).unwrap();
        back.clear();
        node.encode(answer, &mut back);
        c.rx.open(&back[4..]).unwrap();
    }
    (cpu_ns("/proc/thread-self/schedstat") - cpu0) as f64 / 1e3 / n as f64
}

/// Each client sends STATUS, waits for the answer, and repeats.
fn round_trips(node: &NodeProc, clients: usize) -> Value {
    round_trips_with((0..clients).map(|_| node.client()).collect(), ROUND_TRIP_SECS)
}

fn round_trips_with(clients: Vec<shardnet::client::Client>, secs: f64) -> Value {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let n = clients.len();
    let handles: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let cpu0 = cpu_ns("/proc/thread-self/schedstat");
                let mut lat = Vec::with_capacity(200_000);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = c.request("STATUS", json!({})).unwrap();
                    lat.push(t.elapsed());
                    assert_eq!(r["status"], "success");
                }
                (lat, cpu_ns("/proc/thread-self/schedstat") - cpu0)
            })
        })
        .collect();
    let mut client_cpu_ns = 0;
    let mut all: Vec<Duration> = Vec::new();
    for h in handles {
        let (lat, cpu) = h.join().unwrap();
        all.extend(lat);
        client_cpu_ns += cpu;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    json!({
        "clients": n,
        "round_trips": all.len(),
        "seconds": elapsed,
        "round_trips_per_s": all.len() as f64 / elapsed,
        "p50_us": percentile(&all, 0.50),
        "p99_us": percentile(&all, 0.99),
        "client_cpu_ns": client_cpu_ns,
    })
}

/// A GGUF file of `size` bytes: a header and one tensor filling the rest,
/// with pseudo-random data (`dense`) or a sparse hole.
fn write_gguf(path: &Path, index: u32, size: u64, dense: bool) {
    let mut b = Builder::new();
    b.set("general.architecture", Meta::String("llama".into()));
    b.set("shard.index", Meta::U32(index));
    let elems = (size - 4096) / 4;
    b.add_tensor("blob", &[elems], GgmlType::F32).unwrap();
    let mut f = File::create(path).unwrap();
    let (header, _) = b.encode_header();
    f.write_all(&header).unwrap();
    let data_at = (header.len() as u64).div_ceil(32) * 32;
    if dense {
        common::write_random(&mut f, size - header.len() as u64, &mut (0x2545_f491_4f6c_dd1d ^ index as u64)).unwrap();
    }
    f.set_len(size.max(data_at + elems * 4)).unwrap();
}

fn single_thread_sha1_rate() -> f64 {
    let buf: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let _ = shardnet::hash::sha1(&buf[..1 << 20]); // the implementation the node uses
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let d = shardnet::hash::sha1(&buf);
        std::hint::black_box(d);
        rates.push(buf.len() as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    rates.sort_by(f64::total_cmp);
    rates[1]
}

fn startup_hashing() -> Value {
    let dir = TempDir::new("bench-hash");
    let (files, size) = (4u32, 192u64 << 20);
    for i in 0..files {
        write_gguf(&dir.path().join(format!("shard-{i}.gguf")), i, size, true);
    }
    let single = single_thread_sha1_rate();
    let node = NodeProc::start(dir.path(), &["--log-level", "warn"]);
    let s = node.wait_metadata();
    let rate = s["metadata"]["scan"]["hash_rate_mb_s"].as_f64().unwrap();
    let after = single_thread_sha1_rate();
    let single = (single + after) / 2.0;
    println!(
        "startup hashing: {:.0} MB/s with {} workers; single-thread SHA-1 {:.0} MB/s; ratio {:.2}x",
        rate,
        s["hash_workers"],
        single,
        rate / single
    );
    json!({
        "bytes": files as u64 * size,
        "hash_workers": s["hash_workers"],
        "node_rate_mb_s": rate,
        "single_thread_sha1_mb_s": single,
        "ratio": rate / single,
    })
}

fn cached_restart() -> Value {
    let dir = TempDir::new("bench-restart");
    let (files, size) = (8u32, 512u64 << 20);
    for i in 0..files {
        write_gguf(&dir.path().join(format!("shard-{i}.gguf")), i, size, false);
    }
    let mut first = NodeProc::start(dir.path(), &["--log-level", "warn"]);
    first.wait_metadata();
    first.kill();
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut node = NodeProc::start(dir.path(), &["--log-level", "warn"]);
        let s = wait_for(Duration::from_secs(20), || {
            let s = node.call("STATUS", json!({}));
            (s["result"]["metadata"]["scan_done"] == json!(true)).then_some(s)
        });
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(s["result"]["metadata"]["cached"], files, "{s}");
        node.kill();
    }
    times.sort_by(f64::total_cmp);
    println!("cached restart, {files} x {} MiB: ready in {:.1} ms (median of 5)", size >> 20, times[2]);
    json!({"files": files, "file_bytes": size, "ready_ms_median": times[2], "ready_ms_all": times})
}
