//! `make bench` part 1: the command protocol and startup hashing.
//! Writes `target/bench/commands.json`.
//!
//! - STATUS round trips per second and p50/p99 latency, 1 and 16 clients;
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

/// Each client sends STATUS, waits for the answer, and repeats.
fn round_trips(node: &NodeProc, clients: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs_f64(ROUND_TRIP_SECS);
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let mut c = node.client();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(200_000);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = c.request("STATUS", json!({})).unwrap();
                    lat.push(t.elapsed());
                    assert_eq!(r["status"], "success");
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    json!({
        "clients": clients,
        "round_trips": all.len(),
        "seconds": elapsed,
        "round_trips_per_s": all.len() as f64 / elapsed,
        "p50_us": percentile(&all, 0.50),
        "p99_us": percentile(&all, 0.99),
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
