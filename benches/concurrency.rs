//! `make bench` part 7: many streams at once. Writes `target/bench/concurrency.json`.
//!
//! 1, 4 and 16 concurrent greedy streams (each its own session and connection: a 16-token
//! prompt, then `STEPS` decode steps), through one node holding the whole model ("one
//! process") and through a 4-node pipeline on loopback (the chain relayed node to node):
//! aggregate decode tokens/s and p50/p99 time per token per stream, medians of `REPS` runs.
//! The ceiling for batched decode on a CPU is the prompt rate of the same model on the same
//! threads, so the one-process prompt rate (pp512, in this process) is measured too, and
//! aggregate decode with 16 streams is reported as a fraction of it.
//!
//! Model: SmolLM2-135M when `make models` fetched it, else the demo model.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{NodeProc, TempDir};
use memmap2::Mmap;
use serde_json::{Value, json};
use shardnet::client::Client;
use shardnet::engine::{Engine, EngineConfig, Input, Want};
use shardnet::gguf::demo::{DemoConfig, write};
use shardnet::gguf::split;

const STEPS: usize = 32;
const PROMPT_LEN: usize = 16;
const REPS: usize = 3;
const STREAMS: [usize; 3] = [1, 4, 16];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One stream: prefill, then `STEPS` greedy decode steps; the time of each step in ms.
fn stream(addr: &str, session: &str, next: &[Value], vocab: u32) -> Vec<f64> {
    let mut c = Client::connect(addr, Duration::from_secs(20)).unwrap();
    c.set_timeout(Duration::from_secs(300)).unwrap();
    let prompt: Vec<u32> = (0..PROMPT_LEN as u32).map(|i| (i * 37 + session.len() as u32 * 11) % vocab).collect();
    let mut params = json!({"session_id": session, "shard_id": 0, "pos": 0, "input": {"tokens": prompt},
        "next": next, "output": "top_k", "k": 1, "hop_timeout_ms": 300000});
    let r = c.request("EXECUTE_TASK", params.clone()).unwrap();
    assert_eq!(r["status"], "success", "{r}");
    params["session_token"] = r["result"]["session_token"].clone();
    let mut token = r["result"]["top_k"][0]["id"].as_u64().unwrap();
    let mut times = Vec::with_capacity(STEPS);
    for step in 0..STEPS {
        params["pos"] = json!(PROMPT_LEN + step);
        params["input"] = json!({"tokens": [token]});
        let t = Instant::now();
        let r = c.request("EXECUTE_TASK", params.clone()).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r["status"], "success", "{r}");
        token = r["result"]["top_k"][0]["id"].as_u64().unwrap();
    }
    let _ = c.request("END_SESSION", json!({"session_id": session, "session_token": params["session_token"]}));
    times
}

/// `n` streams at once: (aggregate decode tokens/s, p50 ms per token, p99 ms per token).
fn run(addr: &str, next: &[Value], n: usize, vocab: u32, tag: &str) -> (f64, f64, f64) {
    let start = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (addr, next, session) = (addr.to_string(), next.to_vec(), format!("{tag}-{i}"));
            std::thread::spawn(move || stream(&addr, &session, &next, vocab))
        })
        .collect();
    let mut all: Vec<f64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let wall = start.elapsed().as_secs_f64();
    // Decode tokens over the whole wall time (prefills included): a lower bound on decode rate.
    let agg = (n * STEPS) as f64 / wall;
    (agg, percentile(&mut all, 0.5), percentile(&mut all, 0.99))
}

fn pp512(model: &Path, threads: usize) -> f64 {
    let f = std::fs::File::open(model).unwrap();
    let map = Arc::new(unsafe { Mmap::map(&f) }.unwrap());
    let mut e = Engine::new(EngineConfig { threads, ctx_size: 1024, repack: true, ..Default::default() }).unwrap();
    e.load(0, map).unwrap();
    let vocab = e.shard_info(0).unwrap().0.n_vocab;
    let tokens: Vec<u32> = (0..512u32).map(|i| (i * 31 + 7) % vocab).collect();
    let runs: Vec<f64> = (0..REPS)
        .map(|r| {
            let t = Instant::now();
            e.execute(0, &format!("pp{r}"), 0, &Input::Tokens(tokens.clone()), Want::Logits { all: false }).unwrap();
            512.0 / t.elapsed().as_secs_f64()
        })
        .collect();
    median(runs)
}

fn main() {
    let dir = TempDir::new("bench-concurrency");
    let smol = PathBuf::from("models_cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = if smol.exists() {
        smol
    } else {
        let p = dir.path().join("demo.gguf");
        write(&DemoConfig { layers: 16, embd: 512, heads: 8, kv_heads: 4, ffn: 1536, ..Default::default() }, &p)
            .unwrap();
        p
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t_threads = threads.to_string();
    let node_args = ["--threads", &t_threads, "--max-sessions", "64", "--max-sessions-per-client", "32"];

    // One process: one node holding the whole model as shard 0.
    let whole = dir.path().join("whole");
    split::split(&model, 1, &whole, None).unwrap();
    let one = NodeProc::start(&whole, &node_args);
    assert_eq!(one.call("LOAD_SHARD", json!({"shard_id": 0}))["status"], "success");
    let vocab = one.call("MODEL_INFO", json!({}))["result"]["vocab_size"].as_u64().unwrap() as u32;

    // Four nodes, one shard each.
    let shards = dir.path().join("shards");
    split::split(&model, 4, &shards, None).unwrap();
    let nodes: Vec<NodeProc> = (0..4).map(|_| NodeProc::start(&shards, &node_args)).collect();
    for (i, n) in nodes.iter().enumerate() {
        let r = n.call("LOAD_SHARD", json!({"shard_id": i}));
        assert_eq!(r["status"], "success", "{r}");
    }
    let next: Vec<Value> = (1..4).map(|i| json!({"address": nodes[i].addr, "shard_id": i})).collect();

    let pp = pp512(&model, threads);
    let mut rows = Vec::new();
    let mut agg16 = (0.0, 0.0);
    for &n in &STREAMS {
        for (setup, addr, route) in [("one_process", &one.addr, &[][..]), ("pipeline_4", &nodes[0].addr, &next[..])] {
            // Warm-up, then REPS runs; medians of each figure.
            run(addr, route, n, vocab, &format!("warm-{setup}-{n}"));
            let runs: Vec<(f64, f64, f64)> =
                (0..REPS).map(|r| run(addr, route, n, vocab, &format!("{setup}-{n}-{r}"))).collect();
            let agg = median(runs.iter().map(|r| r.0).collect());
            let p50 = median(runs.iter().map(|r| r.1).collect());
            let p99 = median(runs.iter().map(|r| r.2).collect());
            eprintln!(
                "{setup:12} {n:2} streams: {agg:7.1} tok/s aggregate, p50 {p50:6.2} ms, p99 {p99:6.2} ms per token"
            );
            if n == 16 {
                if setup == "one_process" { agg16.0 = agg } else { agg16.1 = agg }
            }
            rows.push(json!({"setup": setup, "streams": n, "aggregate_tok_s": agg, "p50_ms_per_token": p50,
                "p99_ms_per_token": p99, "runs": runs.iter().map(|r| json!([r.0, r.1, r.2])).collect::<Vec<_>>()}));
        }
    }
    let report = json!({
        "model": model.file_name().unwrap().to_string_lossy(),
        "threads_per_node": threads,
        "decode_steps_per_stream": STEPS,
        "prompt_tokens_per_stream": PROMPT_LEN,
        "reps": REPS,
        "pp512_one_process_tok_s": pp,
        "rows": rows,
        "decode16_over_pp512_one_process": agg16.0 / pp,
        "decode16_over_pp512_pipeline_4": agg16.1 / pp,
        "goal": "aggregate decode with 16 streams >= 0.7 x pp512",
        "note": "one run on a shared 2-core machine: the four nodes and the clients share the same two cores",
    });
    eprintln!(
        "pp512 {pp:.1} tok/s; 16 streams: one process {:.2}x, 4-node pipeline {:.2}x of it",
        agg16.0 / pp,
        agg16.1 / pp
    );
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/concurrency.json", serde_json::to_string_pretty(&report).unwrap()).unwrap();
}
