//! The inference engine on real GGUF files: shards agree with the whole model, the KV cache,
//! sessions, tokenizers, SmolLM2, EXECUTE_TASK through a node, and bad input of every kind.
mod common;

use common::*;
use memmap2::Mmap;
use serde_json::{Value, json};
use shardnet::engine::generate::generate;
use shardnet::engine::sampler::{Sampler, SamplerConfig};
use shardnet::engine::tokenizer::Tokenizer;
use shardnet::engine::{Engine, EngineConfig, Input, Output, Want};
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::reader::Gguf;
use shardnet::gguf::split;
use shardnet::gguf::types::GgmlType;
use shardnet::gguf::writer::{Builder, Value as Meta};
use shardnet::protocol::ErrorCode;
use shardnet::protocol::tensor::{f32_from_json, f32_to_json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const SMOLLM2: &str = "models_cache/SmolLM2-135M-Instruct.Q4_1.gguf";

fn map(path: &Path) -> Arc<Mmap> {
    let f = std::fs::File::open(path).unwrap();
    Arc::new(unsafe { Mmap::map(&f) }.unwrap())
}

fn engine() -> Engine {
    Engine::new(EngineConfig { threads: 2, ctx_size: 256, ..Default::default() }).unwrap()
}

fn logits(out: Output) -> Vec<f32> {
    match out {
        Output::Logits { data, .. } => data,
        other => panic!("expected logits, got {other:?}"),
    }
}

fn hidden(out: Output) -> Input {
    match out {
        Output::Hidden { data, n_tokens, width } => Input::Hidden { data, n_tokens, width },
        other => panic!("expected a hidden state, got {other:?}"),
    }
}

/// Max |a-b| relative to the largest |a|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn demo_model(dir: &Path, cfg: DemoConfig) -> PathBuf {
    let path = dir.join(format!("demo-{:?}-{}.gguf", cfg.weight_type, cfg.kv_heads));
    demo::write(&cfg, &path).unwrap();
    path
}

const PROMPT: [u32; 11] = [1, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11];

/// Runs `tokens` at `pos` through shards 0..n of `e`, passing hidden states along.
fn through(e: &mut Engine, n: u32, session: &str, pos: u32, tokens: Vec<u32>, all: bool) -> Vec<f32> {
    let mut x = Input::Tokens(tokens);
    for i in 0..n - 1 {
        x = hidden(e.execute(i, session, pos, &x, Want::Hidden).unwrap());
    }
    logits(e.execute(n - 1, session, pos, &x, Want::Logits { all }).unwrap())
}

fn split_agrees(cfg: DemoConfig, tol: f32) {
    let dir = TempDir::new("engine-split");
    let model = demo_model(dir.path(), cfg.clone());
    let mut whole = engine();
    whole.load(0, map(&model)).unwrap();
    let prefill =
        logits(whole.execute(0, "s", 0, &Input::Tokens(PROMPT.to_vec()), Want::Logits { all: true }).unwrap());
    let decode = logits(
        whole.execute(0, "s", PROMPT.len() as u32, &Input::Tokens(vec![5]), Want::Logits { all: false }).unwrap(),
    );
    assert!(prefill.iter().all(|v| v.is_finite()) && prefill.iter().any(|v| *v != 0.0));

    let mut cuts = Vec::new();
    for n in [2, 3, 4] {
        let out = dir.path().join(format!("shards-{n}"));
        let report = split::split(&model, n, &out, None).unwrap();
        let mut e = engine();
        for i in 0..n {
            e.load(i, map(&out.join(format!("shard-{i}.gguf")))).unwrap();
        }
        cuts.push(format!("{report:?}"));
        let got = through(&mut e, n, "s", 0, PROMPT.to_vec(), true);
        let d = rel_diff(&prefill, &got);
        assert!(d <= tol, "{:?}: {n} shards, prefill logits differ by {d}", cfg.weight_type);
        let got = through(&mut e, n, "s", PROMPT.len() as u32, vec![5], false);
        let d = rel_diff(&decode, &got);
        assert!(d <= tol, "{:?}: {n} shards, decode logits differ by {d}", cfg.weight_type);
    }
}

#[test]
fn shards_match_the_whole_model_f32() {
    split_agrees(DemoConfig { weight_type: GgmlType::F32, layers: 6, ..Default::default() }, 1e-5);
}

#[test]
fn shards_match_the_whole_model_f16() {
    split_agrees(DemoConfig { weight_type: GgmlType::F16, layers: 6, ..Default::default() }, 1e-4);
}

#[test]
fn shards_match_the_whole_model_q8_0_tied() {
    split_agrees(DemoConfig { weight_type: GgmlType::Q8_0, layers: 6, tied: true, ..Default::default() }, 1e-4);
}

/// Prefill of n tokens at once, and the same tokens one by one through the KV cache, agree on
/// every position's logits: the cache holds what attention needs, at the right rows.
#[test]
fn kv_cache_decode_matches_batched_prefill() {
    let dir = TempDir::new("engine-kv");
    // Grouped-query attention: 8 heads over 2 KV heads.
    let cfg = DemoConfig { heads: 8, kv_heads: 2, embd: 128, layers: 3, ..Default::default() };
    let model = demo_model(dir.path(), cfg.clone());
    let mut e = engine();
    e.load(0, map(&model)).unwrap();
    let all = logits(e.execute(0, "batch", 0, &Input::Tokens(PROMPT.to_vec()), Want::Logits { all: true }).unwrap());
    let vocab = cfg.vocab as usize;
    assert_eq!(all.len(), PROMPT.len() * vocab);
    for (i, &t) in PROMPT.iter().enumerate() {
        let one = logits(e.execute(0, "step", i as u32, &Input::Tokens(vec![t]), Want::Logits { all: false }).unwrap());
        let d = rel_diff(&all[i * vocab..(i + 1) * vocab], &one);
        // Batched and one-token matrix products round differently (1e-4 of the logits' range).
        assert!(d < 1e-3, "position {i}: {d}");
    }
    // Micro-batches of 4 land on the same logits too.
    let mut pos = 0;
    let mut last = Vec::new();
    for chunk in PROMPT.chunks(4) {
        last =
            logits(e.execute(0, "chunks", pos, &Input::Tokens(chunk.to_vec()), Want::Logits { all: false }).unwrap());
        pos += chunk.len() as u32;
    }
    assert!(rel_diff(&all[(PROMPT.len() - 1) * vocab..], &last) < 1e-3);
    // Causality: a different later token does not change earlier positions.
    let mut other = PROMPT.to_vec();
    *other.last_mut().unwrap() = 300;
    let changed = logits(e.execute(0, "other", 0, &Input::Tokens(other), Want::Logits { all: true }).unwrap());
    let n = PROMPT.len() - 1;
    assert!(rel_diff(&all[..n * vocab], &changed[..n * vocab]) < 1e-5);
    assert!(rel_diff(&all[n * vocab..], &changed[n * vocab..]) > 1e-3);
}

#[test]
fn sessions_replay_evict_and_end() {
    let dir = TempDir::new("engine-sessions");
    let model = demo_model(dir.path(), DemoConfig::default());
    let mut e = Engine::new(EngineConfig { threads: 2, ctx_size: 128, max_sessions: 2, ..Default::default() }).unwrap();
    e.load(0, map(&model)).unwrap();
    let first = logits(e.execute(0, "a", 0, &Input::Tokens(PROMPT.to_vec()), Want::Logits { all: false }).unwrap());
    let next =
        logits(e.execute(0, "a", PROMPT.len() as u32, &Input::Tokens(vec![4]), Want::Logits { all: false }).unwrap());
    // Replaying from an earlier position (what a coordinator does after a failure) rewrites the cache.
    let again =
        logits(e.execute(0, "a", 3, &Input::Tokens(PROMPT[3..].to_vec()), Want::Logits { all: false }).unwrap());
    assert!(rel_diff(&first, &again) < 1e-5);
    let next2 =
        logits(e.execute(0, "a", PROMPT.len() as u32, &Input::Tokens(vec![4]), Want::Logits { all: false }).unwrap());
    assert!(rel_diff(&next, &next2) < 1e-5);
    // A gap is refused.
    let err = e.execute(0, "a", 40, &Input::Tokens(vec![4]), Want::Logits { all: false }).unwrap_err();
    assert_eq!(err.code, ErrorCode::OutOfRange, "{err}");

    // Two sessions at most: a third evicts the least recently used ("b", since "a" was used after it).
    e.execute(0, "b", 0, &Input::Tokens(vec![1]), Want::Logits { all: false }).unwrap();
    e.execute(0, "a", 12, &Input::Tokens(vec![1]), Want::Logits { all: false }).unwrap();
    e.execute(0, "c", 0, &Input::Tokens(vec![1]), Want::Logits { all: false }).unwrap();
    assert_eq!(e.sessions().0, 2);
    let err = e.execute(0, "b", 1, &Input::Tokens(vec![1]), Want::Logits { all: false }).unwrap_err();
    assert_eq!(err.code, ErrorCode::UnknownSession, "{err}");
    e.execute(0, "a", 13, &Input::Tokens(vec![1]), Want::Logits { all: false }).unwrap();
    assert_eq!(e.end_session("a"), 1);
    assert_eq!(e.end_session("a"), 0);
    assert_eq!(e.sessions().0, 1);

    // A byte budget below one session's cache refuses the session rather than overrunning.
    let mut small =
        Engine::new(EngineConfig { threads: 1, ctx_size: 128, kv_budget: 1024, ..Default::default() }).unwrap();
    small.load(0, map(&model)).unwrap();
    let err = small.execute(0, "x", 0, &Input::Tokens(vec![1]), Want::Logits { all: false }).unwrap_err();
    assert_eq!(err.code, ErrorCode::Busy, "{err}");
}

#[test]
fn bad_inputs_are_refused_before_ggml_sees_them() {
    let dir = TempDir::new("engine-bad");
    let cfg = DemoConfig { layers: 4, ..Default::default() };
    let model = demo_model(dir.path(), cfg.clone());
    let shards = dir.path().join("shards");
    split::split(&model, 2, &shards, None).unwrap();
    let mut e = Engine::new(EngineConfig { threads: 1, ctx_size: 64, ..Default::default() }).unwrap();
    e.load(0, map(&shards.join("shard-0.gguf"))).unwrap();
    e.load(1, map(&shards.join("shard-1.gguf"))).unwrap();
    let run = |e: &mut Engine, shard: u32, session: &str, pos: u32, input: Input| {
        e.execute(shard, session, pos, &input, Want::Logits { all: false }).unwrap_err()
    };
    let width = cfg.embd as usize;
    let cases: Vec<(u32, &str, u32, Input, ErrorCode, &str)> = vec![
        (0, "s", 0, Input::Tokens(vec![1, cfg.vocab]), ErrorCode::OutOfRange, "outside the vocabulary"),
        (0, "s", 60, Input::Tokens(vec![1; 5]), ErrorCode::ContextExceeded, "past the context"),
        (0, "s", 0, Input::Tokens(vec![]), ErrorCode::OutOfRange, "no tokens"),
        (
            0,
            "s",
            0,
            Input::Hidden { data: vec![0.0; width], n_tokens: 1, width },
            ErrorCode::ShapeMismatch,
            "takes tokens",
        ),
        (1, "s", 0, Input::Tokens(vec![1]), ErrorCode::ShapeMismatch, "hidden state"),
        (
            1,
            "s",
            0,
            Input::Hidden { data: vec![0.0; 2 * 7], n_tokens: 2, width: 7 },
            ErrorCode::ShapeMismatch,
            "hidden state is 2 x 7",
        ),
        (1, "s", 0, Input::Hidden { data: vec![0.0; 5], n_tokens: 1, width }, ErrorCode::ShapeMismatch, "hidden state"),
        (1, "s", 0, Input::Hidden { data: vec![f32::NAN; width], n_tokens: 1, width }, ErrorCode::OutOfRange, "NaN"),
        (
            1,
            "never-started",
            5,
            Input::Hidden { data: vec![0.0; width], n_tokens: 1, width },
            ErrorCode::UnknownSession,
            "unknown session",
        ),
        (7, "s", 0, Input::Tokens(vec![1]), ErrorCode::ShardNotLoaded, "not loaded"),
        (0, "", 0, Input::Tokens(vec![1]), ErrorCode::OutOfRange, "session_id"),
    ];
    for (shard, session, pos, input, code, needle) in cases {
        let err = run(&mut e, shard, session, pos, input);
        assert_eq!(err.code, code, "{err}");
        assert!(err.message.contains(needle), "{err:?} lacks {needle:?}");
    }
    // After all that, the engine still computes.
    e.execute(0, "ok", 0, &Input::Tokens(vec![1, 2]), Want::Hidden).unwrap();
}

/// Copies a GGUF file, changing its tensors with `edit` (name, dims) -> Some(new dims) or None to drop.
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&str, &[u64]) -> Option<Vec<u64>>) {
    let bytes = std::fs::read(src).unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    let mut b = Builder::new();
    for (k, v) in &g.metadata {
        if *k != "general.alignment" {
            b.set(k, Meta::from_meta(v));
        }
    }
    let mut data: Vec<&[u8]> = Vec::new();
    for t in &g.tensors {
        if let Some(dims) = edit(t.name, &t.dims) {
            b.add_tensor(t.name, &dims, t.ggml_type).unwrap();
            data.push(t.data);
        }
    }
    std::fs::write(dst, b.to_bytes(&data).unwrap()).unwrap();
}

#[test]
fn shards_missing_a_tensor_or_misshapen_are_refused() {
    let dir = TempDir::new("engine-badshard");
    let model = demo_model(dir.path(), DemoConfig { layers: 2, ..Default::default() });
    let missing = dir.path().join("missing.gguf");
    rewrite(&model, &missing, |n, d| (n != "blk.1.ffn_up.weight").then(|| d.to_vec()));
    let swapped = dir.path().join("swapped.gguf");
    rewrite(&model, &swapped, |n, d| Some(if n == "blk.0.attn_k.weight" { vec![d[1], d[0]] } else { d.to_vec() }));
    let mut e = engine();
    let err = e.load(0, map(&missing)).unwrap_err();
    assert_eq!(err.code, ErrorCode::ShardInvalid);
    assert!(err.message.contains("blk.1.ffn_up.weight is missing"), "{err}");
    let err = e.load(0, map(&swapped)).unwrap_err();
    assert!(err.message.contains("blk.0.attn_k.weight has shape"), "{err}");
    // Not GGUF at all.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    assert_eq!(e.load(0, map(&junk)).unwrap_err().code, ErrorCode::ShardInvalid);
    // The good file still loads in the same engine.
    e.load(0, map(&model)).unwrap();
}

fn tokenizer(path: &Path) -> Tokenizer {
    let bytes = std::fs::read(path).unwrap();
    Tokenizer::from_gguf(&Gguf::parse(&bytes).unwrap()).unwrap()
}

const TEXTS: &[&str] = &[
    "Hello world",
    "  leading spaces and trailing  ",
    "digits 1234567 and 3.14159, -42!",
    "punctuation: (a), [b]; {c}... \"quoted\" 'single' it's",
    "naïve café, 日本語のテキスト, emoji 🙂🚀",
    "tabs\tand\nnew\n\nlines",
    "",
];

#[test]
fn spm_tokenizer_round_trips_and_known_encodings() {
    let dir = TempDir::new("engine-spm");
    let model = demo_model(dir.path(), DemoConfig::default());
    let tok = tokenizer(&model);
    for text in TEXTS {
        let ids = tok.encode(text, false, false);
        assert_eq!(tok.decode(&ids), *text, "{ids:?}");
    }
    // SentencePiece puts "▁" before the text and for every space.
    let ids = tok.encode("a b", true, false);
    assert_eq!(ids[0], tok.bos.unwrap());
    let pieces: Vec<&str> = ids[1..].iter().map(|&i| tok.token_text(i).unwrap()).collect();
    assert_eq!(pieces.concat(), "▁a▁b");
    // Characters the vocabulary lacks fall back to <0xXX> byte tokens.
    let ids = tok.encode("日", false, false);
    let pieces: Vec<&str> = ids.iter().map(|&i| tok.token_text(i).unwrap()).collect();
    assert!(pieces.ends_with(&["<0xE6>", "<0x97>", "<0xA5>"]), "{pieces:?}");
}

/// SmolLM2, fetched by `make models`; the tests that call this are `#[ignore = "needs ..."]`.
fn smollm2() -> PathBuf {
    require(SMOLLM2);
    PathBuf::from(SMOLLM2)
}

#[test]
#[ignore = "needs models_cache/SmolLM2-135M-Instruct.Q4_1.gguf"]
fn bpe_tokenizer_known_encodings_and_round_trips() {
    let model = smollm2();
    let tok = tokenizer(&model);
    // Ids checked against llama.cpp's llama_tokenize on the same file (make check-reference).
    assert_eq!(tok.encode("The capital of France is", false, false), [504, 3575, 282, 4649, 314]);
    // smollm's pre-tokenizer splits digits one by one.
    let ids = tok.encode("2024", false, false);
    assert_eq!(ids.len(), 4);
    for text in TEXTS {
        assert_eq!(tok.decode(&tok.encode(text, false, false)), *text);
    }
    // Special tokens: only parsed when asked.
    let chat = "<|im_start|>user\nHi<|im_end|>";
    let special = tok.encode(chat, false, true);
    assert_eq!(special[0], 1);
    assert!(tok.encode(chat, false, false).len() > special.len());
}

#[test]
#[ignore = "needs models_cache/SmolLM2-135M-Instruct.Q4_1.gguf"]
fn smollm2_writes_english_whole_and_split() {
    let model = smollm2();
    let tok = tokenizer(&model);
    let prompt = tok.encode("The capital of France is", true, false);
    let greedy = |e: &mut Engine| {
        let mut s = Sampler::new(SamplerConfig::default());
        generate(e, 0, "g", Some(&tok), &prompt, 16, 512, &mut s, false, |_| {}).unwrap().generated
    };
    let mut whole = engine();
    whole.load(0, map(&model)).unwrap();
    let ids = greedy(&mut whole);
    let text = tok.decode(&ids);
    assert!(text.contains("Paris"), "{text:?}");

    let dir = TempDir::new("engine-smollm2");
    split::split(&model, 3, dir.path(), None).unwrap();
    let mut e = engine();
    for i in 0..3 {
        e.load(i, map(&dir.path().join(format!("shard-{i}.gguf")))).unwrap();
    }
    let mut out = Vec::new();
    let mut pos = 0;
    let mut next = prompt.clone();
    for _ in 0..16 {
        let l = through(&mut e, 3, "p", pos, next.clone(), false);
        pos += next.len() as u32;
        let id = shardnet::engine::sampler::argmax(&l);
        out.push(id);
        next = vec![id];
    }
    assert_eq!(out, ids, "pipeline {:?} vs whole {:?}", tok.decode(&out), text);
}

fn shardctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardctl")).args(args).output().unwrap()
}

#[test]
fn shardctl_generate_runs_a_model_and_refuses_bad_flags() {
    let dir = TempDir::new("engine-cli");
    let model = demo_model(dir.path(), DemoConfig::default());
    let m = model.to_str().unwrap();
    let o = shardctl(&["--json", "generate", m, "--prompt", "hello world", "-n", "8"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 8);
    // Greedy is deterministic; sampling with a seed repeats.
    let again: Value =
        serde_json::from_slice(&shardctl(&["--json", "generate", m, "--prompt", "hello world", "-n", "8"]).stdout)
            .unwrap();
    assert_eq!(v["tokens"], again["tokens"]);
    let sample = |seed: &str| {
        let o = shardctl(&[
            "--json", "generate", m, "--prompt", "hi", "-n", "12", "--temp", "1.5", "--top-k", "0", "--seed", seed,
        ]);
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["tokens"].clone()
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
    for (args, needle) in [
        (vec!["generate", m], "--prompt"),
        (vec!["generate", m, "--prompt", "x", "--top-p", "0"], "top-p"),
        (vec!["generate", m, "--prompt", "x", "--temp", "-1"], "--temp"),
        (vec!["generate", m, "--prompt-ids", "1,abc"], "abc"),
        (vec!["generate", m, "--prompt-ids", "1,999999"], "outside the vocabulary"),
        (vec!["generate", m, "--prompt", "x", "--bogus"], "--bogus"),
        (vec!["generate", "/nonexistent.gguf", "--prompt", "x"], "nonexistent"),
    ] {
        let o = shardctl(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

fn execute(node: &NodeProc, params: Value) -> Value {
    node.call("EXECUTE_TASK", params)
}

#[test]
fn execute_task_through_a_node_matches_the_engine() {
    let dir = TempDir::new("engine-node");
    let cfg = DemoConfig { layers: 4, ..Default::default() };
    let model = demo_model(dir.path(), cfg.clone());
    let shards = dir.path().join("shards");
    split::split(&model, 2, &shards, None).unwrap();
    let node = NodeProc::start(&shards, &["--threads", "2", "--ctx-size", "64", "--max-sessions", "4"]);
    // Not loaded yet, and told not to load: a clear error.
    let r =
        execute(&node, json!({"session_id": "s", "shard_id": 0, "pos": 0, "input": {"tokens": [1, 2]}, "load": false}));
    assert_eq!(r["code"], "SHARD_NOT_LOADED", "{r}");
    for i in 0..2 {
        let r = node.call("LOAD_SHARD", json!({"shard_id": i}));
        assert_eq!(r["status"], "success", "{r}");
    }
    let r = execute(
        &node,
        json!({"task_type": "ai_inference", "session_id": "s", "shard_id": 0, "pos": 0,
        "input": {"tokens": PROMPT}, "output": "hidden"}),
    );
    assert_eq!(r["status"], "success", "{r}");
    let (h, rows, cols) = f32_from_json(&r["result"]["hidden"], 1 << 20).unwrap();
    assert_eq!((rows, cols), (PROMPT.len(), cfg.embd as usize));
    assert!(r["result"]["hops"][0]["timings"]["compute_ms"].as_f64().is_some(), "{r}");
    let r = execute(
        &node,
        json!({"session_id": "s", "shard_id": 1, "pos": 0,
        "input": {"hidden": f32_to_json(&h, rows, cols)}, "output": "logits"}),
    );
    assert_eq!(r["status"], "success", "{r}");
    let (got, rows, vocab) = f32_from_json(&r["result"]["logits"], 1 << 20).unwrap();
    assert_eq!((rows, vocab), (1, cfg.vocab as usize));

    let mut e = engine();
    e.load(0, map(&model)).unwrap();
    let want = logits(e.execute(0, "s", 0, &Input::Tokens(PROMPT.to_vec()), Want::Logits { all: false }).unwrap());
    assert!(rel_diff(&want, &got) < 1e-5);

    // top_k: sorted, and the best is the argmax.
    let r = execute(
        &node,
        json!({"session_id": "s", "shard_id": 1, "pos": 0,
        "input": {"hidden": f32_to_json(&h, PROMPT.len(), cols)}, "output": "top_k", "k": 5}),
    );
    let top = r["result"]["top_k"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    assert_eq!(top[0]["id"], json!(shardnet::engine::sampler::argmax(&want)));
    let status = node.call("STATUS", json!({}));
    assert_eq!(status["result"]["inference"]["sessions"], json!(2), "{status}");
    let r = node.call("END_SESSION", json!({"session_id": "s"}));
    assert_eq!(r["result"]["freed"], json!(2), "{r}");
    let r = node.call("END_SESSION", json!({"session_id": "s"}));
    assert_eq!(r["result"]["freed"], json!(0), "{r}");
    node.assert_serving();
}

#[test]
fn execute_task_bad_requests_get_errors_and_the_node_serves_on() {
    let dir = TempDir::new("engine-node-bad");
    let cfg = DemoConfig { layers: 3, ..Default::default() };
    let model = demo_model(dir.path(), cfg.clone());
    let shards = dir.path().join("shards");
    split::split(&model, 3, &shards, None).unwrap();
    // A shard file that lacks a tensor: refused at load (and by a task that would load it).
    let last = shards.join("shard-2.gguf");
    let broken = dir.path().join("broken.gguf");
    rewrite(&last, &broken, |n, d| (!n.ends_with("ffn_down.weight")).then(|| d.to_vec()));
    std::fs::rename(&broken, &last).unwrap();
    std::fs::remove_file(shards.join("manifest.json")).unwrap();
    let node = NodeProc::start(&shards, &["--ctx-size", "32"]);
    for i in [0, 1] {
        let r = node.call("LOAD_SHARD", json!({"shard_id": i}));
        assert_eq!(r["status"], "success", "{r}");
    }
    let r = node.call("LOAD_SHARD", json!({"shard_id": 2}));
    assert_eq!(r["code"], "SHARD_INVALID", "{r}");
    assert!(r["error"].as_str().unwrap().contains("ffn_down"), "{r}");
    let width = cfg.embd as usize;
    let cases = [
        (json!({"shard_id": 0, "pos": 0, "input": {"tokens": [1]}}), "MISSING_FIELD"),
        (json!({"session_id": "s", "shard_id": 0, "input": {"tokens": [1]}, "task_type": "mining"}), "OUT_OF_RANGE"),
        (json!({"session_id": "s", "shard_id": 0, "input": {"tokens": [1, -3]}}), "WRONG_TYPE"),
        (json!({"session_id": "s", "shard_id": 0, "input": {"tokens": []}}), "OUT_OF_RANGE"),
        (json!({"session_id": "s", "shard_id": 0, "input": {"tokens": [1, 100000]}}), "OUT_OF_RANGE"),
        (json!({"session_id": "s", "shard_id": 0, "input": {"words": "hi"}}), "WRONG_TYPE"),
        (json!({"session_id": "s", "shard_id": 0, "pos": 31, "input": {"tokens": [1, 2]}}), "CONTEXT_EXCEEDED"),
        (json!({"session_id": "s", "shard_id": 0, "pos": 3, "input": {"tokens": [1]}}), "UNKNOWN_SESSION"),
        (json!({"session_id": "s", "shard_id": 0, "input": {"tokens": [1]}, "output": "poetry"}), "OUT_OF_RANGE"),
        (json!({"session_id": "s", "shard_id": 9, "input": {"tokens": [1]}}), "SHARD_NOT_FOUND"),
        (json!({"session_id": "s", "shard_id": 9, "input": {"tokens": [1]}, "load": false}), "SHARD_NOT_LOADED"),
        (
            json!({"session_id": "s", "shard_id": 2, "input": {"hidden": f32_to_json(&vec![0.0; width], 1, width)}}),
            "SHARD_INVALID",
        ),
        (
            json!({"session_id": "s", "shard_id": 1, "input": {"hidden": f32_to_json(&[0.0; 6], 2, 3)}}),
            "SHAPE_MISMATCH",
        ),
        (
            json!({"session_id": "s", "shard_id": 1, "input": {"hidden": {"dtype": "f32", "shape": [1000000, 1000000], "b64": "AAAA"}}}),
            "OUT_OF_RANGE",
        ),
        (
            json!({"session_id": "s", "shard_id": 1, "input": {"hidden": {"dtype": "f32", "shape": [1, width], "b64": "AAAA"}}}),
            "SHAPE_MISMATCH",
        ),
        (
            json!({"session_id": "s", "shard_id": 1, "input": {"hidden": {"dtype": "f32", "shape": [1, 1], "b64": "AA*AAA=="}}}),
            "WRONG_TYPE",
        ),
        (json!({"session_id": "x".repeat(200), "shard_id": 0, "input": {"tokens": [1]}}), "OUT_OF_RANGE"),
    ];
    let mut client = node.client();
    for (params, code) in cases {
        let r = client.request("EXECUTE_TASK", params.clone()).unwrap();
        assert_eq!(r["status"], "error", "{params}: {r}");
        assert_eq!(r["code"], code, "{params}: {r}");
    }
    let r = client.request("END_SESSION", json!({})).unwrap();
    assert_eq!(r["code"], "MISSING_FIELD");
    // The same connection, and the engine, still work.
    let r = client
        .request(
            "EXECUTE_TASK",
            json!({"session_id": "ok", "shard_id": 0, "input": {"tokens": [1, 2, 3]}, "output": "hidden"}),
        )
        .unwrap();
    assert_eq!(r["status"], "success", "{r}");
    node.assert_serving();
}

/// Only where ggml has a Q4_0 repack layout for the CPU it was built for (build.rs sets
/// `ggml_repack_q4_0`); elsewhere the test is reported ignored, never passed.
#[test]
#[cfg_attr(not(ggml_repack_q4_0), ignore = "needs cpu:ggml-repack-q4_0")]
fn repacked_weights_compute_the_same_logits() {
    let dir = TempDir::new("engine-repack");
    let cfg = DemoConfig {
        weight_type: GgmlType::Q4_0,
        layers: 2,
        embd: 256,
        ffn: 512,
        heads: 8,
        kv_heads: 2,
        ..Default::default()
    };
    let model = demo_model(dir.path(), cfg);
    let run = |repack: bool| {
        let mut e = Engine::new(EngineConfig { threads: 2, ctx_size: 64, repack, ..Default::default() }).unwrap();
        e.load(0, map(&model)).unwrap();
        let l = logits(e.execute(0, "s", 0, &Input::Tokens(PROMPT.to_vec()), Want::Logits { all: true }).unwrap());
        (l, e.repacked_bytes(0))
    };
    let (plain, none) = run(false);
    let (packed, bytes) = run(true);
    assert_eq!(none, 0, "without --repack every weight stays in the map");
    assert!(bytes > 0, "ggml repacked no Q4_0 weight although build.rs found a CPU that has the layout");
    let d = rel_diff(&plain, &packed);
    assert!(d < 1e-2, "repacked logits differ by {d}");
}

/// The event loop answers while the inference thread computes: STATUS on another connection
/// comes back long before a large prefill does.
#[test]
fn the_node_serves_while_a_model_computes() {
    let dir = TempDir::new("engine-busy");
    let cfg =
        DemoConfig { layers: 8, embd: 512, heads: 8, kv_heads: 4, ffn: 1536, context: 2048, ..Default::default() };
    let model = demo_model(dir.path(), cfg);
    let shards = dir.path().join("shards");
    // One shard holding the whole model (a node loads only files with shard keys).
    split::split(&model, 1, &shards, None).unwrap();
    let node = NodeProc::start(&shards, &["--threads", "1", "--ctx-size", "2048"]);
    assert_eq!(node.call("LOAD_SHARD", json!({"shard_id": 0}))["status"], "success");
    let tokens: Vec<u32> = (0..1024).map(|i| (i * 7 % 300) as u32).collect();
    let addr = node.addr.clone();
    let started = std::time::Instant::now();
    let big = std::thread::spawn(move || {
        let mut c = shardnet::client::Client::connect(&addr, WAIT).unwrap();
        c.set_timeout(std::time::Duration::from_secs(120)).unwrap();
        let r = c
            .request("EXECUTE_TASK", json!({"session_id": "big", "shard_id": 0, "input": {"tokens": tokens}}))
            .unwrap();
        (r, started.elapsed())
    });
    // STATUS answers while the task computes (`running`), quickly.
    let mut during = Vec::new();
    while !big.is_finished() {
        let t = std::time::Instant::now();
        let s = node.call("STATUS", json!({}));
        if s["result"]["inference"]["running"] == json!(1) {
            during.push(t.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (r, big_time) = big.join().unwrap();
    assert_eq!(r["status"], "success", "{r}");
    assert!(during.len() >= 3, "only {} STATUS answers during a {big_time:?} prefill", during.len());
    during.sort();
    let median = during[during.len() / 2];
    assert!(median < std::time::Duration::from_millis(100), "STATUS took {median:?} (median) during a prefill");
}
