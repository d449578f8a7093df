//! `make bench` part 6: a four-node pipeline on loopback. Writes `target/bench/pipeline.json`.
//!
//! - cold start: a random-weight model of about 485 MB (F16, 16 layers), node 0 seeding every
//!   shard and nodes 1-3 starting empty; time from the coordinator's start to the first token
//!   (discovery, three downloads through the swarm at once, loads, prefill of a short prompt),
//!   against the slowest single download of the same run (its own `seconds` in STATUS). Goal:
//!   at most 1.3x. The clock starts once node 0 has hashed its files and every node is a member
//!   the cluster's FIND_PEERS finds (the coordinator names the holders of each shard in
//!   LOAD_SHARD, so the shards' own DHT announces are not waited for).
//!   Three runs, each with four fresh nodes (the generated model reused), reported each with its
//!   breakdown, and the medians.
//! - warm: prefill and decode tokens/s of the pipeline against `shardctl generate`'s engine in
//!   this process on the same model, taking turns, medians of `REPS` (goal: decode at least
//!   0.95x); and the overhead per hop (goal: under 150 us), defined as what the pipeline costs
//!   over one process: `(1 / pipeline decode rate - 1 / one-process decode rate) / hops`, from the
//!   medians. Beside it, `chain_overhead_per_hop_us`, the coordinator's own figure: a decode
//!   step's median time less the sum of the hops' median engine times (`compute_ms`), over the
//!   hops. That one also counts work one process does too (the last hop's pick of the best logit,
//!   the coordinator's request and answer), and compares with the hops' engine times, not with
//!   one process's: `hops_compute_ms` and `one_process.ms_per_token` show both.
//!
//! Warm model: SmolLM2-135M when `make models` fetched it, else the demo model. Only one node
//! computes at a time on one stream, so each node gets every core, as the one process does.
//!
//! `SHARDNET_BENCH_PIPELINE=cold` or `=warm` runs one part alone (unset: both); the part not run
//! keeps its figures from the `pipeline.json` already there.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{NodeProc, TempDir, bench_model, median, seeded_cluster};
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

/// Cold starts measured (fresh empty nodes each, the generated model reused): the report's
/// figures are their medians.
const COLD_RUNS: usize = 3;
/// Time the cold starts may take together before the rest are skipped (`runs` says how many ran).
const COLD_BUDGET: Duration = Duration::from_secs(150);

/// The random-weight model of the cold start: about 485 MB of F16, 16 layers.
fn cold_model(dir: &Path) -> (std::path::PathBuf, u64) {
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
    (model, bytes)
}

/// One cold start: node 0 seeding every shard of `model`, nodes 1-3 empty (all fresh, under
/// `dir`); the time from the coordinator's start to the first token and its parts.
fn cold_run(dir: &Path, model: &Path, threads: &str) -> Value {
    let args = ["--enable-torrent", "--threads", threads];
    let d0 = dir.join("node-0");
    shardnet::gguf::split::split(model, 4, &d0, None).unwrap();
    let mut nodes = vec![NodeProc::start(&d0, &args)];
    let boot = nodes[0].addr.clone();
    for i in 1..4 {
        let d = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        nodes.push(NodeProc::start(&d, &[&args[..], &["--bootstrap", boot.as_str()]].concat()));
    }
    // The cluster is up, as an operator's is when a coordinator starts: the seed's files
    // hashed (first start; its info hashes are what LIST_FILES gives the coordinator) and every
    // node a member the cluster's FIND_PEERS finds. Asked every half second, slower than the
    // DHT's budget refills (3 packets a second per node): a tighter poll would spend node 0's
    // budget for the coordinator's own FIND_PEERS and time the poll, not the cold start.
    let every = Duration::from_millis(500);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ready = nodes[0].call("STATUS", json!({}))["result"]["metadata"]["scan_done"] == json!(true) && {
            let r = nodes[0].call("FIND_PEERS", json!({"cluster": true}));
            let peers = r["result"]["peers"].as_array().cloned().unwrap_or_default();
            nodes[1..].iter().all(|n| peers.contains(&json!(n.addr)))
        };
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "the cold cluster did not form within 300 s");
        std::thread::sleep(every);
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
    json!({
        "first_token_ms": first_token_ms,
        "discovery_ms": discovery_ms,
        "load_ms": run.load_ms,
        "prefill_to_first_token_ms": run.ttft_ms,
        "downloads": downloads,
        "slowest_download_ms": slowest,
        "first_token_over_slowest_download": ratio,
        "load_over_slowest_download": run.load_ms / slowest,
    })
}

/// Cold starts on a model of about 485 MB, `COLD_RUNS` of them (fewer past `COLD_BUDGET`): the
/// report, with each run's breakdown and the medians.
fn cold_start(dir: &Path, threads: &str) -> Value {
    let (model, bytes) = cold_model(dir);
    let started = Instant::now();
    let mut runs: Vec<Value> = Vec::new();
    while runs.len() < COLD_RUNS && (runs.is_empty() || started.elapsed() < COLD_BUDGET) {
        let run_dir = TempDir::new("bench-pipeline-cold-run");
        runs.push(cold_run(run_dir.path(), &model, threads));
    }
    let med = |k: &str| median(runs.iter().map(|r| r[k].as_f64().unwrap()).collect());
    json!({
        "model_bytes": bytes,
        "runs": runs.len(),
        "first_token_ms": med("first_token_ms"),
        "discovery_ms": med("discovery_ms"),
        "load_ms": med("load_ms"),
        "prefill_to_first_token_ms": med("prefill_to_first_token_ms"),
        "slowest_download_ms": med("slowest_download_ms"),
        "first_token_over_slowest_download": med("first_token_over_slowest_download"),
        "load_over_slowest_download": med("load_over_slowest_download"),
        "goal_at_most": 1.3,
        "each": runs,
    })
}

/// Which parts run: `SHARDNET_BENCH_PIPELINE` = `cold`, `warm`, or unset (both).
fn parts() -> (bool, bool) {
    match std::env::var("SHARDNET_BENCH_PIPELINE").as_deref() {
        Ok("cold") => (true, false),
        Ok("warm") => (false, true),
        Ok("") | Err(_) => (true, true),
        Ok(other) => panic!("SHARDNET_BENCH_PIPELINE={other:?}: cold, warm, or unset for both"),
    }
}

fn main() {
    let dir = TempDir::new("bench-pipeline");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t_threads = threads.to_string();

    let (run_cold, run_warm) = parts();

    // Cold start first, its nodes and files gone before the warm runs.
    let cold = run_cold.then(|| {
        let cold_dir = TempDir::new("bench-pipeline-cold");
        cold_start(cold_dir.path(), &t_threads)
    });
    if !run_warm {
        write_report(json!({"cold_start": cold}));
        return;
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
    let mut hops_compute: Vec<f64> = Vec::new();
    infer(&boot, PROMPT, 4); // warm-up: loads (downloads) every shard
    let warm_start = Instant::now();
    // REPS turns; fewer (at least one) on a machine so loaded that they pass WARM_BUDGET.
    while pipe_tg.len() < REPS && (pipe_tg.is_empty() || warm_start.elapsed() < WARM_BUDGET) {
        let s = infer(&boot, PROMPT, N);
        pipe_pp.push(s.prompt_tokens.len() as f64 * 1e3 / s.prefill_ms);
        pipe_tg.push((s.tokens.len() - 1) as f64 * 1e3 / s.decode_ms);
        overhead.push(s.overhead_per_hop_us);
        hops_compute.push(s.hop_compute_ms.iter().sum());
        let mut sampler = Sampler::new(SamplerConfig::default());
        let g = generate(&mut engine, 0, "bench", Some(&tok), &prompt, N, 128, &mut sampler, false, |_| {}).unwrap();
        local_pp.push(prompt.len() as f64 * 1e3 / g.prefill_ms);
        local_tg.push(N as f64 * 1e3 / g.decode_ms);
    }
    let hops = 4.0;
    let (pipe_tg_med, local_tg_med) = (median(pipe_tg.clone()), median(local_tg.clone()));
    // What the pipeline costs over one process, per hop: the difference of the time per token.
    let per_hop_us = (1e6 / pipe_tg_med - 1e6 / local_tg_med) / hops;
    println!(
        "decode: pipeline {pipe_tg_med:.1} tokens/s, one process {local_tg_med:.1} ({:.3}x); overhead per hop \
         {per_hop_us:.0} us (chain figure {:.0} us)",
        pipe_tg_med / local_tg_med,
        median(overhead.clone())
    );
    let report = json!({
        "model": model.file_name().unwrap().to_string_lossy(),
        "nodes": 4,
        "threads_per_node": threads,
        "prompt_tokens": prompt.len(),
        "generated": N,
        "repetitions": pipe_tg.len(),
        "cold_start": cold,
        "pipeline": {"prefill_tps": median(pipe_pp.clone()), "decode_tps": pipe_tg_med,
            "ms_per_token": 1e3 / pipe_tg_med, "each_decode_tps": pipe_tg},
        "one_process": {"prefill_tps": median(local_pp.clone()), "decode_tps": local_tg_med,
            "ms_per_token": 1e3 / local_tg_med, "each_decode_tps": local_tg},
        "ratio": {"prefill": median(pipe_pp) / median(local_pp), "decode": pipe_tg_med / local_tg_med},
        "overhead_per_hop_us": per_hop_us,
        "overhead_per_hop_definition": "(1 / pipeline decode tokens/s - 1 / one-process decode tokens/s) / 4 hops, \
            from the medians: what the pipeline costs over one process, per hop",
        "chain_overhead_per_hop_us": median(overhead),
        "chain_overhead_per_hop_definition": "median decode step time seen by the coordinator less the sum of the \
            hops' median engine times (compute_ms), / 4 hops; also counts work one process does (the last hop's \
            top-k pick, the coordinator's request and answer handling)",
        "hops_compute_ms": median(hops_compute),
        "goal": {"decode_ratio_at_least": 0.95, "overhead_per_hop_us_under": 150},
    });
    write_report(report);
}

/// Writes `target/bench/pipeline.json`; a part not run this time (`cold_start` null, or the warm
/// keys absent) keeps what the file held.
fn write_report(mut report: Value) {
    let path = Path::new("target/bench/pipeline.json");
    let old: Value = std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
    if let (Some(new), Some(old)) = (report.as_object_mut(), old.as_object()) {
        let warm_ran = new.contains_key("pipeline");
        for (k, v) in old {
            let keep = if k == "cold_start" { new.get(k).is_none_or(Value::is_null) } else { !warm_ran };
            if keep {
                new.insert(k.clone(), v.clone());
            }
        }
    }
    println!("{report}");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", path.display());
}
