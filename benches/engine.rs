//! `make bench` part 5: the inference engine against llama.cpp. Writes `target/bench/engine.json`.
//!
//! Rows, as llama-bench names them, in tokens/s: `pp512` (512 random tokens in one batch),
//! `tg128` (128 random tokens one at a time on an empty context) and `tg128_d512` (128 tokens
//! one at a time after the 512 of pp512). Ours runs in this process, llama.cpp through
//! `target/reference/reference bench` (scripts/reference): same files, same threads (2, or
//! fewer when the machine has fewer cores; `SHARDNET_BENCH_THREADS` overrides), flash attention
//! on in both, F16 KV cache in both. Each side gets a short warm-up, then the repetitions
//! alternate ours / llama.cpp (`SHARDNET_BENCH_REPS`, default 3) so both see the same machine
//! load; the figures are medians and each ratio is ours / llama.cpp. `*_cpu_tps` and `cpu_ratio`
//! count tokens per CPU second of the process (all its threads) instead of per second of wall
//! time: on a machine shared with other work they move far less than wall-time figures. `SHARDNET_BENCH_MODELS`
//! (comma-separated parts of model names, e.g. `f16,q4_k_m`) runs only those models.
//!
//! Models: a ~250M-parameter LLaMA (16 layers, width 1024, GQA 16/4 heads, vocab 32000, random
//! weights) in F16, Q8_0 and Q4_0 as `gguf::demo` writes them, the F16 one quantized to Q4_K_M by
//! llama.cpp's own `llama_model_quantize` (what `llama-quantize` runs: Q4_K, with Q6_K for
//! `output` and for half the layers' `attn_v` and `ffn_down`), and SmolLM2-135M Q4_1 when `make
//! models` fetched it.
//!
//! Ours runs as the node does by default: the matrices ggml's CPU backend repacks (Q4_0, Q4_K,
//! IQ4_NL, ... on this CPU) come from the repack sidecar beside the file. Memory, per model:
//! anonymous resident memory grown by loading (the sidecar already written, as on every load but
//! the first), against the file's size (goal < 5%); the first load's sidecar write is timed too.
//!
//! llama.cpp is built by `scripts/reference/build.sh` (cmake; incremental) when cmake is
//! installed; without cmake the bench says so and measures ours alone (no Q4_K_M model then:
//! llama.cpp makes it).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use memmap2::Mmap;
use serde_json::{Value, json};
use shardnet::engine::{Engine, EngineConfig, Input, Want, WeightsSource};
use shardnet::gguf::GgmlType;
use shardnet::gguf::demo::{DemoConfig, write};

const PP: usize = 512;
const TG: usize = 128;
/// `LLAMA_FTYPE_MOSTLY_Q4_K_M` in llama.h.
const FTYPE_Q4_K_M: u32 = 15;

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|n| *n > 0)
}

fn reps() -> usize {
    env_usize("SHARDNET_BENCH_REPS").unwrap_or(3)
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

/// Tokens/s of each row in one repetition: per second of wall time, and per CPU second of the
/// process (every thread), which a shared machine's scheduling disturbs less.
#[derive(Clone, Copy)]
struct Rates {
    pp: f64,
    tg: f64,
    tg_depth: f64,
    pp_cpu: f64,
    tg_cpu: f64,
    tg_depth_cpu: f64,
}

/// CPU seconds this process has used (`CLOCK_PROCESS_CPUTIME_ID`).
fn cpu_now() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// `n` single-token steps from position `from`: (tokens per second, per CPU second).
fn decode_steps(e: &mut Engine, n_vocab: u32, rng: &mut Rng, from: usize, n: usize) -> (f64, f64) {
    let (t, c) = (Instant::now(), cpu_now());
    for i in 0..n {
        let tok = rng.token(n_vocab);
        e.execute(0, "bench", (from + i) as u32, &Input::Tokens(vec![tok]), Want::Logits { all: false }).unwrap();
    }
    (n as f64 / t.elapsed().as_secs_f64(), n as f64 / (cpu_now() - c))
}

/// One repetition, in llama.cpp's order: pp512, tg128 on top of it, then tg128 from empty.
fn ours_once(e: &mut Engine, n_vocab: u32, rng: &mut Rng) -> Rates {
    e.end_session("bench");
    let prompt: Vec<u32> = (0..PP).map(|_| rng.token(n_vocab)).collect();
    let (t, c) = (Instant::now(), cpu_now());
    e.execute(0, "bench", 0, &Input::Tokens(prompt), Want::Logits { all: false }).unwrap();
    let (pp, pp_cpu) = (PP as f64 / t.elapsed().as_secs_f64(), PP as f64 / (cpu_now() - c));
    let (tg_depth, tg_depth_cpu) = decode_steps(e, n_vocab, rng, PP, TG);
    e.end_session("bench");
    let (tg, tg_cpu) = decode_steps(e, n_vocab, rng, 0, TG);
    Rates { pp, tg, tg_depth, pp_cpu, tg_cpu, tg_depth_cpu }
}

/// A short batch and a few single steps: weights paged in, buffers sized.
fn ours_warm_up(e: &mut Engine, n_vocab: u32, rng: &mut Rng) {
    e.end_session("bench");
    let prompt: Vec<u32> = (0..64).map(|_| rng.token(n_vocab)).collect();
    e.execute(0, "bench", 0, &Input::Tokens(prompt), Want::Logits { all: false }).unwrap();
    decode_steps(e, n_vocab, rng, 64, 4);
}

fn reference_once(reference: &Path, model: &Path, threads: usize) -> Option<Rates> {
    let out = Command::new(reference)
        .args(["bench", model.to_str()?, &threads.to_string(), &PP.to_string(), &TG.to_string(), "1"])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("reference failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let f = |k: &str| v[k].as_f64();
    Some(Rates {
        pp: f("pp_tps")?,
        tg: f("tg_tps")?,
        tg_depth: f("tg_depth_tps")?,
        pp_cpu: f("pp_cpu_tps")?,
        tg_cpu: f("tg_cpu_tps")?,
        tg_depth_cpu: f("tg_depth_cpu_tps")?,
    })
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

fn engine(threads: usize) -> Engine {
    let cfg = EngineConfig { threads, ctx_size: (PP + TG + 16) as u32, repack: true, ..Default::default() };
    Engine::new(cfg).unwrap()
}

fn source_name(s: Option<WeightsSource>) -> &'static str {
    match s {
        Some(WeightsSource::Map) => "map",
        Some(WeightsSource::Sidecar { .. }) => "sidecar",
        Some(WeightsSource::Copy) => "anonymous copy",
        None => "not loaded",
    }
}

fn bench_model(name: &str, path: &Path, reference: Option<&Path>, threads: usize) -> Value {
    let size = std::fs::metadata(path).unwrap().len();
    let sidecar = PathBuf::from(format!("{}.repack", path.display()));
    // First load: writes the sidecar when the file has matrices to repack (a fresh one, timed).
    let _ = std::fs::remove_file(&sidecar);
    let t = Instant::now();
    let mut e = engine(threads);
    e.load_file(0, map(path), path, None).unwrap();
    let first_load_s = t.elapsed().as_secs_f64();
    drop(e);
    // The load every later start does: the sidecar is there. Anonymous memory grown by it.
    let before = rss();
    let mut e = engine(threads);
    let t = Instant::now();
    let n_vocab = e.load_file(0, map(path), path, None).unwrap().n_vocab;
    let load_s = t.elapsed().as_secs_f64();
    let loaded = rss();
    let source = e.weights_source(0);
    let sidecar_bytes = std::fs::metadata(&sidecar).map_or(0, |m| m.len());

    let mut rng = Rng(0x2545F4914F6CDD1D);
    ours_warm_up(&mut e, n_vocab, &mut rng);
    let after_step = rss();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..reps() {
        ours.push(ours_once(&mut e, n_vocab, &mut rng));
        if let Some(r) = reference.and_then(|r| reference_once(r, path, threads)) {
            theirs.push(r);
        }
    }
    let rows = |v: &[Rates]| {
        json!({
            "pp512": median(v.iter().map(|r| r.pp).collect()),
            "tg128": median(v.iter().map(|r| r.tg).collect()),
            "tg128_d512": median(v.iter().map(|r| r.tg_depth).collect()),
        })
    };
    let cpu_rows = |v: &[Rates]| {
        json!({
            "pp512": median(v.iter().map(|r| r.pp_cpu).collect()),
            "tg128": median(v.iter().map(|r| r.tg_cpu).collect()),
            "tg128_d512": median(v.iter().map(|r| r.tg_depth_cpu).collect()),
        })
    };
    let anon_load = loaded.0 as i64 - before.0 as i64;
    let mut v = json!({
        "model": name,
        "bytes": size,
        "weights_from": source_name(source),
        "sidecar_bytes": sidecar_bytes,
        "first_load_s": first_load_s,
        "load_s": load_s,
        "memory": {
            "anon_after_load": anon_load,
            "anon_after_load_over_weights": anon_load as f64 / size as f64,
            "anon_after_step": after_step.0 as i64 - before.0 as i64,
            "file_resident_after_step": after_step.1 as i64 - before.1 as i64,
            "anon_repacked_copy": e.repacked_bytes(0),
        },
        "ours_tps": rows(&ours),
        "ours_cpu_tps": cpu_rows(&ours),
        "repetitions": ours.len(),
    });
    if !theirs.is_empty() {
        let ratios = |o: &Value, r: &Value| {
            let q = |k: &str| o[k].as_f64().unwrap() / r[k].as_f64().unwrap();
            json!({"pp512": q("pp512"), "tg128": q("tg128"), "tg128_d512": q("tg128_d512")})
        };
        let (r, rc) = (rows(&theirs), cpu_rows(&theirs));
        v["ratio"] = ratios(&v["ours_tps"], &r);
        v["cpu_ratio"] = ratios(&v["ours_cpu_tps"], &rc);
        v["llama_cpp_tps"] = r;
        v["llama_cpp_cpu_tps"] = rc;
    }
    println!("{v}");
    v
}

fn main() {
    let threads = env_usize("SHARDNET_BENCH_THREADS")
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(2));
    let out_dir = PathBuf::from("target/bench");
    let models_dir = out_dir.join("models");
    std::fs::create_dir_all(&models_dir).unwrap();
    let t = Instant::now();
    let (reference, note) = common::reference_program();
    let reference = reference.as_deref();
    let mut models: Vec<(String, PathBuf)> = Vec::new();
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
        models.push((format!("llama-250m-{tag}"), path));
    }
    if let Some(r) = reference {
        let path = models_dir.join("llama-250m-q4_k_m.gguf");
        if !path.exists() {
            let tmp = models_dir.join("llama-250m-q4_k_m.gguf.tmp");
            let ok = Command::new(r)
                .args(["quantize", models[0].1.to_str().unwrap(), tmp.to_str().unwrap(), &FTYPE_Q4_K_M.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "llama.cpp could not quantize the F16 model to Q4_K_M");
            std::fs::rename(&tmp, &path).unwrap();
        }
        models.push(("llama-250m-q4_k_m".into(), path));
    }
    // SmolLM2 through a link in target/bench/models, so its sidecar (if any) is written here and
    // not into models_cache.
    let smollm2 = PathBuf::from("models_cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    if smollm2.exists() {
        let link = models_dir.join("smollm2-135m-q4_1.gguf");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(std::fs::canonicalize(&smollm2).unwrap(), &link).unwrap();
        models.push(("smollm2-135m-q4_1".into(), link));
    } else {
        eprintln!("note: {} missing (make models): SmolLM2 skipped", smollm2.display());
    }
    // SHARDNET_BENCH_MODELS=f16,q4_k_m: only the models whose name holds one of these.
    if let Ok(only) = std::env::var("SHARDNET_BENCH_MODELS") {
        models.retain(|(n, _)| only.split(',').any(|k| !k.is_empty() && n.contains(k)));
    }
    let results: Vec<Value> = models.iter().map(|(n, p)| bench_model(n, p, reference, threads)).collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = json!({
        "threads": threads,
        "flash_attn": true,
        "pp_tokens": PP,
        "tg_tokens": TG,
        "repetitions": reps(),
        "llama_cpp": reference.is_some(),
        "note": note,
        "models": results,
        "load_average": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "elapsed_s": t.elapsed().as_secs_f64(),
    });
    std::fs::write(out_dir.join("engine.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote target/bench/engine.json");
}
