//! `make bench` part 5: the inference engine against llama.cpp. Writes `target/bench/engine.json`.
//!
//! For each model: prompt processing (512 random tokens in one batch) and generation (128 random
//! tokens, one at a time) in tokens/s, ours in this process and llama.cpp's through
//! `target/reference/reference bench` (built by `make check-reference`), same thread count, a
//! warm-up each, then repetitions alternating the two; medians. llama.cpp runs with its default
//! flash-attention setting (auto, which is on for the CPU) and F16 KV cache, as ours.
//!
//! Models: a ~250M-parameter LLaMA (16 layers, width 1024, GQA 16/4 heads, vocab 32000) in F16,
//! Q8_0 and Q4_0, and SmolLM2-135M (Q4_1) when `make models` fetched it.
//!
//! Q4_0 runs twice: from the map as it is (our default), and with `--repack`, copying the
//! matrices into ggml's interleaved CPU layout as llama.cpp does by default.
//!
//! Memory: anonymous and file-backed resident memory before and after loading the F16 model and
//! running a step, against the shard's size: weights stay in the file's pages.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use memmap2::Mmap;
use serde_json::{Value, json};
use shardnet::engine::{Engine, EngineConfig, Input, Want};
use shardnet::gguf::GgmlType;
use shardnet::gguf::demo::{DemoConfig, write};

const PP: usize = 512;
const TG: usize = 128;

fn reps() -> usize {
    std::env::var("SHARDNET_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn map(path: &Path) -> Arc<Mmap> {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: read-only map of a model file nothing modifies during the benchmark.
    Arc::new(unsafe { Mmap::map(&f) }.unwrap())
}

/// xorshift tokens, as random as llama-bench's.
struct Rng(u64);
impl Rng {
    fn token(&mut self, n_vocab: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n_vocab as u64) as u32
    }
}

/// One repetition: (pp tokens/s, tg tokens/s).
fn ours_once(e: &mut Engine, n_vocab: u32, rng: &mut Rng) -> (f64, f64) {
    e.end_session("bench");
    let prompt: Vec<u32> = (0..PP).map(|_| rng.token(n_vocab)).collect();
    let t = Instant::now();
    e.execute(0, "bench", 0, &Input::Tokens(prompt), Want::Logits { all: false }).unwrap();
    let pp = PP as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..TG {
        let tok = rng.token(n_vocab);
        e.execute(0, "bench", (PP + i) as u32, &Input::Tokens(vec![tok]), Want::Logits { all: false }).unwrap();
    }
    let tg = TG as f64 / t.elapsed().as_secs_f64();
    (pp, tg)
}

fn reference_once(reference: &Path, model: &Path, threads: usize) -> Option<(f64, f64)> {
    let out = Command::new(reference)
        .args(["bench", model.to_str()?, &threads.to_string(), &PP.to_string(), &TG.to_string(), "1"])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("reference failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((v["pp_tps"].as_f64()?, v["tg_tps"].as_f64()?))
}

fn bench_model(name: &str, path: &Path, repack: bool, reference: Option<&Path>, threads: usize) -> Value {
    let cfg = EngineConfig { threads, ctx_size: (PP + TG + 16) as u32, repack, ..Default::default() };
    let mut e = Engine::new(cfg).unwrap();
    let n_vocab = e.load(0, map(path)).unwrap().n_vocab;
    let repacked = e.repacked_bytes(0);
    let mut rng = Rng(0x2545F4914F6CDD1D);
    ours_once(&mut e, n_vocab, &mut rng); // warm-up: page the weights in, size the buffers
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..reps() {
        ours.push(ours_once(&mut e, n_vocab, &mut rng));
        if let Some(r) = reference.and_then(|r| reference_once(r, path, threads)) {
            theirs.push(r);
        }
    }
    let pp = median(ours.iter().map(|r| r.0).collect());
    let tg = median(ours.iter().map(|r| r.1).collect());
    let mut v = json!({
        "model": name,
        "bytes": std::fs::metadata(path).unwrap().len(),
        "repack": repack,
        "repacked_bytes": repacked,
        "ours": {"pp512_tps": pp, "tg128_tps": tg},
    });
    if !theirs.is_empty() {
        let rpp = median(theirs.iter().map(|r| r.0).collect());
        let rtg = median(theirs.iter().map(|r| r.1).collect());
        v["llama_cpp"] = json!({"pp512_tps": rpp, "tg128_tps": rtg});
        v["ratio"] = json!({"pp512": pp / rpp, "tg128": tg / rtg});
    }
    println!("{v}");
    v
}

/// (RssAnon, RssFile) in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn memory(path: &Path, threads: usize) -> Value {
    let before = rss();
    let mut e = Engine::new(EngineConfig { threads, ctx_size: 512, ..Default::default() }).unwrap();
    let n_vocab = e.load(0, map(path)).unwrap().n_vocab;
    let loaded = rss();
    let mut rng = Rng(7);
    let prompt: Vec<u32> = (0..64).map(|_| rng.token(n_vocab)).collect();
    e.execute(0, "m", 0, &Input::Tokens(prompt), Want::Logits { all: false }).unwrap();
    let ran = rss();
    let size = std::fs::metadata(path).unwrap().len();
    let (sessions, kv) = e.sessions();
    json!({
        "shard_bytes": size,
        "anon_growth_after_load": loaded.0 as i64 - before.0 as i64,
        "anon_growth_after_step": ran.0 as i64 - before.0 as i64,
        "file_resident_after_step": ran.1 as i64 - before.1 as i64,
        "anon_growth_over_shard": (ran.0 as f64 - before.0 as f64) / size as f64,
        "kv_bytes": kv, "sessions": sessions,
    })
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out_dir = PathBuf::from("target/bench");
    let models_dir = out_dir.join("models");
    std::fs::create_dir_all(&models_dir).unwrap();
    let reference = PathBuf::from("target/reference/reference");
    let reference = reference.exists().then_some(reference.as_path());
    if reference.is_none() {
        eprintln!("note: target/reference/reference missing (make check-reference): llama.cpp not measured");
    }
    let mut models = Vec::new();
    for (tag, ty) in [("f16", GgmlType::F16), ("q8_0", GgmlType::Q8_0), ("q4_0", GgmlType::Q4_0)] {
        let path = models_dir.join(format!("llama-250m-{tag}.gguf"));
        if !path.exists() {
            let cfg = DemoConfig {
                layers: 16,
                embd: 1024,
                heads: 16,
                kv_heads: 4,
                ffn: 2816,
                vocab: 32000,
                context: 2048,
                weight_type: ty,
                seed: 250,
                tied: false,
                ..Default::default()
            };
            write(&cfg, &path).unwrap();
        }
        models.push((format!("llama-250m-{tag}"), path.clone(), false));
        if ty == GgmlType::Q4_0 {
            // llama.cpp repacks Q4_0 for AVX2 by default (a copy of the weights); ours does with --repack.
            models.push((format!("llama-250m-{tag}-repack"), path, true));
        }
    }
    let smollm2 = PathBuf::from("models_cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    if smollm2.exists() {
        models.push(("smollm2-135m-q4_1".into(), smollm2, false));
    }
    let t = Instant::now();
    let memory = memory(&models[0].1, threads);
    println!("memory {memory}");
    let results: Vec<Value> = models.iter().map(|(n, p, r)| bench_model(n, p, *r, reference, threads)).collect();
    let report = json!({
        "threads": threads,
        "pp_tokens": PP,
        "tg_tokens": TG,
        "repetitions": reps(),
        "models": results,
        "memory": memory,
        "elapsed_s": t.elapsed().as_secs_f64(),
    });
    std::fs::write(out_dir.join("engine.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote target/bench/engine.json");
}
