//! `make bench` part 6: a four-node pipeline on loopback. Writes `target/bench/pipeline.json`.
//!
//! - cold start: node 0 seeds every shard, nodes 1-3 start empty; time from `shardctl infer`'s
//!   start to the first token (discovery, three downloads through the swarm, loads, prefill);
//! - warm: prefill and decode tokens/s of the pipeline against `shardctl generate`'s engine in this
//!   process on the same model, alternating the two, medians; and the chain's overhead per hop
//!   (a decode step's time less the hops' compute, over the hops).
//!
//! Model: SmolLM2-135M when `make models` fetched it, else the demo model.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{NodeProc, TempDir, wait_for};
use memmap2::Mmap;
use serde_json::json;
use shardnet::coordinator::{ClusterConfig, Coordinator, GenRequest};
use shardnet::engine::generate::generate;
use shardnet::engine::sampler::{Sampler, SamplerConfig};
use shardnet::engine::tokenizer::Tokenizer;
use shardnet::engine::{Engine, EngineConfig};
use shardnet::gguf::demo::{DemoConfig, write};
use shardnet::gguf::reader::Gguf;
use shardnet::gguf::split;

const PROMPT: &str = "The history of the Roman Empire spans many centuries, from the founding of the city to the fall of \
    Constantinople. Its roads, laws and language shaped much of Europe. Write a short summary:";
const N: usize = 64;
const REPS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn infer(boot: &str, n: usize) -> shardnet::coordinator::Summary {
    let cfg = ClusterConfig { bootstrap: boot.to_string(), timeout: Duration::from_secs(120), ..Default::default() };
    let mut c = Coordinator::discover(cfg, |_| {}).unwrap();
    let prompt = c.tokenizer().encode(PROMPT, true, true);
    c.generate(&GenRequest { prompt, max_tokens: n, stop_at_eog: false, ..Default::default() }, |_, _| true).unwrap()
}

fn main() {
    let dir = TempDir::new("bench-pipeline");
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
    let d0 = dir.path().join("node-0");
    split::split(&model, 4, &d0, None).unwrap();
    let t_threads = threads.to_string();
    let n0 = NodeProc::start(&d0, &["--enable-torrent", "--threads", &t_threads]);
    let mut nodes = vec![];
    for i in 1..4 {
        let d: PathBuf = dir.path().join(format!("node-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        nodes.push(NodeProc::start(&d, &["--enable-torrent", "--threads", &t_threads, "--bootstrap", &n0.addr]));
    }
    wait_for(Duration::from_secs(30), || {
        let r = n0.call("FIND_PEERS", json!({"cluster": true}));
        let peers = r["result"]["peers"].as_array().cloned().unwrap_or_default();
        nodes.iter().all(|n| peers.contains(&json!(n.addr))).then_some(())
    });

    // Cold: three nodes download their shards before the first token.
    let t = Instant::now();
    let cold = infer(&n0.addr, 1);
    let cold_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("cold start: first token after {cold_ms:.0} ms (loads {:.0} ms)", cold.load_ms);

    // Warm: the pipeline against the same model in this process.
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
    infer(&n0.addr, 4); // warm-up
    for _ in 0..REPS {
        let s = infer(&n0.addr, N);
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
        "repetitions": REPS,
        "cold_start_first_token_ms": cold_ms,
        "cold_start_load_ms": cold.load_ms,
        "pipeline": {"prefill_tps": median(pipe_pp.clone()), "decode_tps": median(pipe_tg.clone())},
        "one_process": {"prefill_tps": median(local_pp.clone()), "decode_tps": median(local_tg.clone())},
        "ratio": {"prefill": median(pipe_pp) / median(local_pp), "decode": median(pipe_tg) / median(local_tg)},
        "overhead_per_hop_us": median(overhead),
    });
    println!("{report}");
    let out = Path::new("target/bench");
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("pipeline.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote target/bench/pipeline.json");
}
