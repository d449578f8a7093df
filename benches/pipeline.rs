//! `make bench` part 6: a four-node pipeline on loopback. Writes `target/bench/pipeline.json`.
//!
//! - cold start: a random-weight model of about 485 MB (F16, 16 layers), node 0 seeding every
//!   shard and nodes 1-3 starting empty; time from the coordinator's start to the first token
//!   (discovery, three downloads through the swarm at once, loads, prefill of a short prompt),
//!   against the slowest single download of the same run (its own `seconds` in STATUS). Goal:
//!   at most 1.3x. The clock starts once node 0 has hashed its files and announced every shard.
//! - warm: prefill and decode tokens/s of the pipeline against `shardctl generate`'s engine in
//!   this process on the same model, taking turns, medians of `REPS` (goal: decode at least
//!   0.95x); and the chain's overhead per hop (a decode step's time less the hops' compute, over
//!   the hops; goal: under 150 us).
//!
//! Warm model: SmolLM2-135M when `make models` fetched it, else the demo model. Only one node
//! computes at a time on one stream, so each node gets every core, as the one process does.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TempDir, bench_model, median, seeded_cluster, wait_for};
use memmap2::Mmap;
use serde_json::{Value, json};
use shardnet::coordinator::{ClusterConfig, Coordinator, GenRequest};
use shardnet::engine::generate::generate;
use shardnet::engine::sampler::{Sampler, SamplerConfig};
use shardnet::engine::tokenizer::Tokenizer;
use shardnet::engine::{Engine, EngineConfig};
use shardnet::gguf::GgmlType;
use shardnet::gguf::demo::{DemoConfig, write};
use shardnet::gguf::reader::Gguf;

const PROMPT: &str = "The history of the Roman Empire spans many centuries, from the founding of the city to the fall of \
    Constantinople. Its roads, laws and language shaped much of Europe. Write a short summary:";
const N: usize = 64;
const REPS: usize = 3;
/// Time the warm turns may take together before the rest are skipped (`repetitions` says how
/// many ran).
const WARM_BUDGET: Duration = Duration::from_secs(120);

fn infer(boot: &str, prompt: &str, n: usize) -> shardnet::coordinator::Summary {
    let cfg = ClusterConfig { bootstrap: boot.to_string(), timeout: Duration::from_secs(120), ..Default::default() };
    let mut c = Coordinator::discover(cfg, |_| {}).unwrap();
    let prompt = c.tokenizer().encode(prompt, true, true);
    c.generate(&GenRequest { prompt, max_tokens: n, stop_at_eog: false, ..Default::default() }, |_, _| true).unwrap()
}

/// Cold start on a model of about 485 MB: (report, time to first token over the slowest download).
fn cold_start(dir: &Path, threads: &str) -> (Value, f64) {
    let model = dir.join("big.gguf");
    let cfg = DemoConfig {
        layers: 16,
        embd: 1024,
        heads: 16,
        kv_heads: 4,
        ffn: 4096,
        weight_type: GgmlType::F16,
        ..Default::default()
    };
    write(&cfg, &model).unwrap();
    let bytes = std::fs::metadata(&model).unwrap().len();
    let nodes = seeded_cluster(dir, &model, 4, 4, &["--enable-torrent", "--threads", threads]);
    std::fs::remove_file(&model).unwrap();
    // The seed is ready, as a cluster's seeds are: its files hashed (first start) and every
    // shard findable under its name, so the clock times the cold nodes alone.
    wait_for(Duration::from_secs(300), || {
        (nodes[0].call("STATUS", json!({}))["result"]["metadata"]["scan_done"] == json!(true)).then_some(())
    });
    for s in 0..4 {
        wait_for(Duration::from_secs(60), || {
            let r = nodes[1].call("FIND_PEERS", json!({"shard_id": s}));
            r["result"]["peers"].as_array()?.contains(&json!(nodes[0].addr)).then_some(())
        });
    }
    let t = Instant::now();
    let cfg =
        ClusterConfig { bootstrap: nodes[0].addr.clone(), timeout: Duration::from_secs(120), ..Default::default() };
    let mut c = Coordinator::discover(cfg, |_| {}).unwrap();
    let discovery_ms = t.elapsed().as_secs_f64() * 1e3;
    let prompt = c.tokenizer().encode("Hello", true, true);
    let req = GenRequest { prompt, max_tokens: 1, stop_at_eog: false, ..Default::default() };
    let run = c.generate(&req, |_, _| true).unwrap();
    let first_token_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut downloads = Vec::new();
    for n in &nodes[1..] {
        let s = n.call("STATUS", json!({}));
        for d in s["result"]["downloads"].as_array().into_iter().flatten() {
            assert_eq!(d["complete"], true, "{d}");
            downloads.push(json!({"node": n.addr, "shard_id": d["shard_id"], "bytes": d["bytes"],
                "ms": d["seconds"].as_f64().unwrap() * 1e3}));
        }
    }
    assert_eq!(downloads.len(), 3, "three empty nodes, three downloads: {downloads:?}");
    let slowest = downloads.iter().map(|d| d["ms"].as_f64().unwrap()).fold(0.0, f64::max);
    let ratio = first_token_ms / slowest;
    println!(
        "cold start: first token after {first_token_ms:.0} ms (discovery {discovery_ms:.0}, loads {:.0}, prefill \
         {:.0}), slowest download {slowest:.0} ms ({ratio:.2}x)",
        run.load_ms, run.ttft_ms
    );
    let report = json!({
        "model_bytes": bytes,
        "first_token_ms": first_token_ms,
        "discovery_ms": discovery_ms,
        "load_ms": run.load_ms,
        "prefill_to_first_token_ms": run.ttft_ms,
        "downloads": downloads,
        "slowest_download_ms": slowest,
        "first_token_over_slowest_download": ratio,
        "load_over_slowest_download": run.load_ms / slowest,
        "goal_at_most": 1.3,
    });
    (report, ratio)
}

fn main() {
    let dir = TempDir::new("bench-pipeline");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t_threads = threads.to_string();

    // `SHARDNET_BENCH_PIPELINE=cold` or `warm` runs one part alone (unset: both).
    let part = std::env::var("SHARDNET_BENCH_PIPELINE").unwrap_or_default();
    // Cold start first, its nodes and files gone before the warm runs.
    let cold = if part == "warm" {
        Value::Null
    } else {
        let cold_dir = TempDir::new("bench-pipeline-cold");
        cold_start(cold_dir.path(), &t_threads).0
    };
    if part == "cold" {
        return write_report(json!({"cold_start": cold}));
    }

    // Warm: the pipeline against the same model in this process.
    let model = bench_model(dir.path());
    let nodes = seeded_cluster(dir.path(), &model, 4, 4, &["--enable-torrent", "--threads", &t_threads]);
    let boot = nodes[0].addr.clone();
    let map = {
        let f = std::fs::File::open(&model).unwrap();
        // SAFETY: read-only map of a model file nothing modifies.
        Arc::new(unsafe { Mmap::map(&f) }.unwrap())
    };
    let tok = Tokenizer::from_gguf(&Gguf::parse(&map).unwrap()).unwrap();
    let prompt = tok.encode(PROMPT, true, true);
    let mut engine = Engine::new(EngineConfig { threads, ..Default::default() }).unwrap();
    engine.load(0, map).unwrap();
    let (mut pipe_pp, mut pipe_tg, mut overhead, mut local_pp, mut local_tg) = (vec![], vec![], vec![], vec![], vec![]);
    infer(&boot, PROMPT, 4); // warm-up: loads (downloads) every shard
    let warm_start = Instant::now();
    // REPS turns; fewer (at least one) on a machine so loaded that they pass WARM_BUDGET.
    while pipe_tg.len() < REPS && (pipe_tg.is_empty() || warm_start.elapsed() < WARM_BUDGET) {
        let s = infer(&boot, PROMPT, N);
        pipe_pp.push(s.prompt_tokens.len() as f64 * 1e3 / s.prefill_ms);
        pipe_tg.push((s.tokens.len() - 1) as f64 * 1e3 / s.decode_ms);
        overhead.push(s.overhead_per_hop_us);
        let mut sampler = Sampler::new(SamplerConfig::default());
        let g = generate(&mut engine, 0, "bench", Some(&tok), &prompt, N, 128, &mut sampler, false, |_| {}).unwrap();
        local_pp.push(prompt.len() as f64 * 1e3 / g.prefill_ms);
        local_tg.push(N as f64 * 1e3 / g.decode_ms);
    }
    let report = json!({
        "model": model.file_name().unwrap().to_string_lossy(),
        "nodes": 4,
        "threads_per_node": threads,
        "prompt_tokens": prompt.len(),
        "generated": N,
        "repetitions": pipe_tg.len(),
        "cold_start": cold,
        "pipeline": {"prefill_tps": median(pipe_pp.clone()), "decode_tps": median(pipe_tg.clone())},
        "one_process": {"prefill_tps": median(local_pp.clone()), "decode_tps": median(local_tg.clone())},
        "ratio": {"prefill": median(pipe_pp) / median(local_pp), "decode": median(pipe_tg) / median(local_tg)},
        "overhead_per_hop_us": median(overhead),
        "goal": {"decode_ratio_at_least": 0.95, "overhead_per_hop_us_under": 150},
    });
    write_report(report);
}

fn write_report(report: Value) {
    println!("{report}");
    let out = Path::new("target/bench");
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("pipeline.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote target/bench/pipeline.json");
}
