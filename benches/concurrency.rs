//! `make bench` part 7: many streams at once. Writes `target/bench/concurrency.json`.
//!
//! 1, 4 and 16 concurrent greedy streams (each its own session and connection: a 16-token
//! prompt, then decode steps), through one node holding the whole model ("one process") and
//! through a 4-node pipeline on loopback (the chain relayed node to node). Every stream
//! prefills once, then the streams decode `REPS + 1` rounds of up to `STEPS` steps, all starting
//! each round together (a barrier), so the aggregate is decode alone: decode tokens of all
//! streams over the round's wall time. p50/p99 are over every decode step's time seen by its
//! stream. The first round is a warm-up; figures are medians of the other `REPS`.
//!
//! The ceiling for batched decode on a CPU is the prompt rate of the same model on the same
//! threads, so one process's prompt rate (pp512, the engine in this process) is measured too,
//! and aggregate decode with 16 streams is reported as a fraction of it (goal: at least 0.7).
//! So is the engine alone running 16 sessions' one-token steps as one batch (no sockets, no
//! waits), with the nodes of that batch's graph.
//!
//! llama.cpp's own figure for the same thing is the strongest evidence of what the machine allows:
//! `target/reference/reference batched` (scripts/reference, built as for engine.json) runs 16
//! sequences on the same file and threads, each its own KV stream (llama-batched-bench's
//! default), prefilled with the same prompt length, then `STEPS` rounds of one `llama_decode`
//! holding one token of each, and its own pp512 in the same process, runs alternating
//! (`llama_cpp_batch16_over_pp512`). Without cmake the row says why it is missing.
//!
//! Bounded: each round stops at `RUN_BUDGET` and the pp512 runs at `PP_BUDGET` (the steps done are reported, and the row
//! says `complete: false`), so an overloaded machine gives slow figures, not a hung benchmark.
//! Threads: the one-process node gets every core; each pipeline node gets cores / 4 (at least
//! one), as four machines of a quarter each would. ggml's worker threads spin at every barrier
//! of a graph, so more compute threads than cores (four nodes computing at once, each with
//! every core) cost far more than they give.
//!
//! Session limits: one stream is one client on loopback (address and port), but a relayed
//! chain reaches nodes 1-3 on node 0's one link, so there all 16 streams are one client, over
//! the default `--max-sessions-per-client` of 8 (right for strangers: one client may not hold
//! the whole table). The nodes run with `--max-sessions 64 --max-sessions-per-client 32`, as an
//! operator serving many streams through one coordinator would.
//!
//! Model: SmolLM2-135M when `make models` fetched it, else the demo model.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{NodeProc, TempDir, bench_model, median, percentile};
use memmap2::Mmap;
use serde_json::{Value, json};
use shardnet::client::Client;
use shardnet::engine::{Engine, EngineConfig, Input, Want};
use shardnet::gguf::split;

const STEPS: usize = 32;
const PROMPT_LEN: usize = 16;
const REPS: usize = 3;
const STREAMS: [usize; 3] = [1, 4, 16];
/// Decode time one run may take before its streams stop early.
const RUN_BUDGET: Duration = Duration::from_secs(5);
/// Time the pp512 runs may take together before the rest are skipped.
const PP_BUDGET: Duration = Duration::from_secs(20);
const SESSION_FLAGS: [&str; 4] = ["--max-sessions", "64", "--max-sessions-per-client", "32"];

/// One decode step as its stream saw it.
struct StepSeen {
    /// Request to answer, in ms.
    ms: f64,
    /// Steps in the graph that computed it, at each hop (`timings.batch`).
    batch: Vec<f64>,
}

/// One stream: prefill, then `REPS + 1` rounds (the first a warm-up) of greedy decode steps,
/// each round starting when every stream and the timer are at `start` and ending at `end`; a
/// round stops at `STEPS` steps or `budget`. Per round, each step. A stream that fails keeps
/// meeting the barriers (so no other waits forever) and returns its error.
fn stream(
    addr: &str,
    session: &str,
    next: &[Value],
    vocab: u32,
    (start, end): (&Barrier, &Barrier),
    budget: Duration,
) -> Result<Vec<Vec<StepSeen>>, String> {
    let seed = session.bytes().map(u32::from).sum::<u32>();
    let prompt: Vec<u32> = (0..PROMPT_LEN as u32).map(|i| (i * 37 + seed * 11) % vocab).collect();
    let mut params = json!({"session_id": session, "shard_id": 0, "pos": 0, "input": {"tokens": prompt},
        "next": next, "output": "top_k", "k": 1, "hop_timeout_ms": 60000});
    let step = |c: &mut Client, params: &Value| -> Result<Value, String> {
        let r = c.request("EXECUTE_TASK", params.clone()).map_err(|e| format!("{session}: {e:#}"))?;
        shardnet::client::into_result(r).map_err(|e| format!("{session}: {e:#}"))
    };
    let mut failed = None;
    let mut client = Client::connect(addr, Duration::from_secs(20)).map_err(|e| format!("{e:#}"));
    let mut token = 0;
    if let Ok(c) = &mut client {
        let _ = c.set_timeout(Duration::from_secs(120));
        match step(c, &params) {
            Ok(r) => {
                params["session_token"] = r["session_token"].clone();
                token = r["top_k"][0]["id"].as_u64().unwrap_or(0);
            }
            Err(e) => failed = Some(e),
        }
    }
    let mut pos = PROMPT_LEN;
    let mut rounds = Vec::new();
    for _ in 0..=REPS {
        start.wait();
        let deadline = Instant::now() + budget;
        let mut times = Vec::with_capacity(STEPS);
        while let (None, Ok(c)) = (&failed, &mut client) {
            if times.len() == STEPS || Instant::now() >= deadline {
                break;
            }
            params["pos"] = json!(pos);
            params["input"] = json!({"tokens": [token]});
            let t = Instant::now();
            let mut batch = Vec::new();
            match step(c, &params) {
                Ok(r) => {
                    token = r["top_k"][0]["id"].as_u64().unwrap_or(0);
                    let hops = r["hops"].as_array().map_or(&[][..], |h| &h[..]);
                    batch = hops.iter().map(|h| h["timings"]["batch"].as_f64().unwrap_or(0.0)).collect();
                }
                Err(e) => failed = Some(e),
            }
            times.push(StepSeen { ms: t.elapsed().as_secs_f64() * 1e3, batch });
            pos += 1;
        }
        end.wait();
        rounds.push(times);
    }
    if let Ok(c) = &mut client {
        let _ = c.request("END_SESSION", json!({"session_id": session, "session_token": params["session_token"]}));
    }
    match (failed, client) {
        (Some(e), _) | (None, Err(e)) => Err(e),
        (None, Ok(_)) => Ok(rounds),
    }
}

/// One round's figures.
struct Run {
    /// Decode tokens of all streams per second of the round's wall time.
    aggregate: f64,
    p50: f64,
    p99: f64,
    /// Every stream did all `STEPS` steps within the budget.
    complete: bool,
    /// Mean steps per graph at each hop, as the steps saw it (a step in a batch of 16 counts 16).
    batch: Vec<f64>,
    /// Share of the round's wall time each node's inference thread spent computing.
    busy: Vec<f64>,
    /// Share of the round's wall time each node held rounds open for steps due back.
    gather: Vec<f64>,
}

/// `n` streams at once: each prefills once, then decodes `REPS + 1` rounds together; the
/// figures of each round but the first (a warm-up).
fn run(nodes: &[&NodeProc], next: &[Value], n: usize, vocab: u32, tag: &str) -> Vec<Run> {
    let addr = nodes[0].addr.as_str();
    let (start, end) = (Arc::new(Barrier::new(n + 1)), Arc::new(Barrier::new(n + 1)));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (addr, next, session) = (addr.to_string(), next.to_vec(), format!("{tag}-{i}"));
            let (start, end) = (start.clone(), end.clone());
            std::thread::spawn(move || stream(&addr, &session, &next, vocab, (&start, &end), RUN_BUDGET))
        })
        .collect();
    let mut walls = Vec::new();
    let mut busy: Vec<[Vec<f64>; 2]> = Vec::new();
    for _ in 0..=REPS {
        let before: Vec<[f64; 2]> = nodes.iter().map(|n| busy_ms(n)).collect();
        start.wait();
        let t = Instant::now();
        end.wait();
        let wall = t.elapsed().as_secs_f64();
        walls.push(wall);
        let share = |i: usize| -> Vec<f64> {
            nodes.iter().zip(&before).map(|(n, b)| (busy_ms(n)[i] - b[i]) / 1e3 / wall).collect()
        };
        busy.push([share(0), share(1)]);
    }
    let per_stream: Vec<Vec<Vec<StepSeen>>> = threads.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
    (1..=REPS)
        .map(|round| {
            let steps: Vec<&StepSeen> = per_stream.iter().flat_map(|s| &s[round]).collect();
            let mut all: Vec<f64> = steps.iter().map(|s| s.ms).collect();
            let hops = steps.iter().map(|s| s.batch.len()).max().unwrap_or(0);
            let batch = (0..hops)
                .map(|h| {
                    let b: Vec<f64> = steps.iter().filter_map(|s| s.batch.get(h).copied()).collect();
                    b.iter().sum::<f64>() / b.len().max(1) as f64
                })
                .collect();
            Run {
                aggregate: all.len() as f64 / walls[round],
                p50: percentile(&mut all, 0.5),
                p99: percentile(&mut all, 0.99),
                complete: per_stream.iter().all(|s| s[round].len() == STEPS),
                batch,
                busy: busy[round][0].clone(),
                gather: busy[round][1].clone(),
            }
        })
        .collect()
}

/// The node's inference thread's time so far computing and holding rounds open for steps due
/// back (STATUS `inference.busy_ms`, `inference.gather_ms`).
fn busy_ms(node: &NodeProc) -> [f64; 2] {
    let s = node.call("STATUS", json!({}));
    let ms = |k: &str| s["result"]["inference"][k].as_f64().unwrap_or(f64::NAN);
    [ms("busy_ms"), ms("gather_ms")]
}

/// Prompt tokens per second of 512-token prompts through the whole model in this process.
fn pp512(model: &Path, threads: usize) -> f64 {
    let f = std::fs::File::open(model).unwrap();
    // SAFETY: read-only map of a model file nothing modifies.
    let map = Arc::new(unsafe { Mmap::map(&f) }.unwrap());
    let mut e = Engine::new(EngineConfig { threads, ctx_size: 1024, repack: true, ..Default::default() }).unwrap();
    e.load(0, map).unwrap();
    let vocab = e.shard_info(0).unwrap().0.n_vocab;
    let tokens: Vec<u32> = (0..512u32).map(|i| (i * 31 + 7) % vocab).collect();
    let started = Instant::now();
    let mut runs = Vec::new();
    // REPS runs, fewer (at least one) when they take over PP_BUDGET together.
    while runs.len() < REPS && (runs.is_empty() || started.elapsed() < PP_BUDGET) {
        let t = Instant::now();
        let session = format!("pp{}", runs.len());
        e.execute(0, &session, 0, &Input::Tokens(tokens.clone()), Want::Logits { all: false }).unwrap();
        runs.push(512.0 / t.elapsed().as_secs_f64());
    }
    median(runs)
}

/// The engine alone, in this process: 16 sessions' one-token steps as one batch (`execute_batch`),
/// `STEPS` steps a round, `REPS` rounds (fewer, at least one, past `PP_BUDGET`): decode tokens
/// per second (median of the rounds) and the nodes of the batch's graph (each a barrier of the
/// compute threads). The ceiling the node's 16-stream rows approach, without sockets or waits.
fn engine_batch16(model: &Path, threads: usize) -> (f64, usize) {
    use shardnet::engine::Step;
    let f = std::fs::File::open(model).unwrap();
    // SAFETY: read-only map of a model file nothing modifies.
    let map = Arc::new(unsafe { Mmap::map(&f) }.unwrap());
    let cfg = EngineConfig {
        threads,
        ctx_size: 1024,
        repack: true,
        max_sessions: 16,
        max_sessions_per_client: 16,
        ..Default::default()
    };
    let mut e = Engine::new(cfg).unwrap();
    e.load(0, map).unwrap();
    let vocab = e.shard_info(0).unwrap().0.n_vocab;
    let ids: Vec<String> = (0..16).map(|i| format!("e{i}")).collect();
    let want = Want::Logits { all: false };
    let mut next: Vec<u32> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let prompt: Vec<u32> = (0..PROMPT_LEN as u32).map(|t| (t * 37 + i as u32 * 101) % vocab).collect();
        e.execute(0, id, 0, &Input::Tokens(prompt), want).unwrap();
        next.push(1 + i as u32);
    }
    let argmax = |l: &[f32]| l.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    let started = Instant::now();
    let mut pos = PROMPT_LEN as u32;
    let mut runs = Vec::new();
    while runs.len() < REPS && (runs.is_empty() || started.elapsed() < PP_BUDGET) {
        let t = Instant::now();
        for _ in 0..STEPS {
            let inputs: Vec<Input> = next.iter().map(|&t| Input::Tokens(vec![t])).collect();
            let steps: Vec<Step> =
                (0..16).map(|i| Step { session_id: &ids[i], claim: None, pos, input: &inputs[i], want }).collect();
            for (i, r) in e.execute_batch(0, &steps).into_iter().enumerate() {
                let Ok(shardnet::engine::Output::Logits { data, .. }) = r else { panic!("engine step failed: {r:?}") };
                next[i] = argmax(&data) as u32;
            }
            pos += 1;
        }
        runs.push((16 * STEPS) as f64 / t.elapsed().as_secs_f64());
    }
    (median(runs), e.last_graph_nodes())
}

/// llama.cpp on the same file and threads: 16 sequences' one-token steps in one `llama_decode`
/// against its own pp512 (`reference batched`, medians of `REPS` alternating runs). The JSON
/// fields, prefixed `llama_cpp_`, or the reason there are none.
fn llama_cpp_batch16(model: &Path, threads: usize) -> Value {
    let (reference, note) = common::reference_program();
    let Some(reference) = reference else {
        return json!({"llama_cpp_note": note});
    };
    let out = Command::new(&reference)
        .arg("batched")
        .arg(model)
        .args([threads, 16, PROMPT_LEN, STEPS, REPS].map(|n| n.to_string()))
        .output();
    let v: Option<Value> = match &out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).ok(),
        _ => None,
    };
    let Some(v) = v else {
        let why = match out {
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        eprintln!("llama.cpp's batched run failed: {why}");
        return json!({"llama_cpp_note": format!("reference batched failed: {why}")});
    };
    eprintln!(
        "llama.cpp: 16 sequences' one-token steps in one llama_decode {:.1} tok/s = {:.2}x its pp512 {:.1} tok/s \
         (per CPU second: {:.2}x)",
        v["batched_tps"].as_f64().unwrap_or(f64::NAN),
        v["batched_over_pp"].as_f64().unwrap_or(f64::NAN),
        v["pp_tps"].as_f64().unwrap_or(f64::NAN),
        v["batched_over_pp_cpu"].as_f64().unwrap_or(f64::NAN),
    );
    json!({
        "llama_cpp_pp512_tok_s": v["pp_tps"],
        "llama_cpp_batch16_tok_s": v["batched_tps"],
        "llama_cpp_batch16_over_pp512": v["batched_over_pp"],
        "llama_cpp_pp512_cpu_tok_s": v["pp_cpu_tps"],
        "llama_cpp_batch16_cpu_tok_s": v["batched_cpu_tps"],
        "llama_cpp_batch16_over_pp512_cpu": v["batched_over_pp_cpu"],
    })
}

fn main() {
    let started = Instant::now();
    let dir = TempDir::new("bench-concurrency");
    let model = bench_model(dir.path());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (one_threads, node_threads) = (cores.to_string(), (cores / 4).max(1).to_string());

    // One process: one node holding the whole model as shard 0.
    let whole = dir.path().join("whole");
    split::split(&model, 1, &whole, None).unwrap();
    let one_args: Vec<&str> = ["--threads", one_threads.as_str()].into_iter().chain(SESSION_FLAGS).collect();
    let one = NodeProc::start(&whole, &one_args);
    assert_eq!(one.call("LOAD_SHARD", json!({"shard_id": 0}))["status"], "success");
    let vocab = one.call("MODEL_INFO", json!({}))["result"]["vocab_size"].as_u64().unwrap() as u32;

    // Four nodes, one shard each.
    let shards = dir.path().join("shards");
    split::split(&model, 4, &shards, None).unwrap();
    let node_args: Vec<&str> = ["--threads", node_threads.as_str()].into_iter().chain(SESSION_FLAGS).collect();
    let nodes: Vec<NodeProc> = (0..4).map(|_| NodeProc::start(&shards, &node_args)).collect();
    for (i, n) in nodes.iter().enumerate() {
        let r = n.call("LOAD_SHARD", json!({"shard_id": i}));
        assert_eq!(r["status"], "success", "{r}");
    }
    let next: Vec<Value> = (1..4).map(|i| json!({"address": nodes[i].addr, "shard_id": i})).collect();

    let pp = pp512(&model, cores);
    let only = std::env::var("CONCURRENCY_ONLY").ok();
    let engine16 = only.as_ref().is_none_or(|o| o == "engine" || o == "16").then(|| engine_batch16(&model, cores));
    if let Some((tok_s, nodes)) = engine16 {
        eprintln!(
            "engine alone: 16 one-token steps as one batch {tok_s:.1} tok/s = {:.2}x pp512, {nodes} graph nodes",
            tok_s / pp
        );
    }
    let llama = only.as_ref().is_none_or(|o| o == "engine" || o == "16").then(|| llama_cpp_batch16(&model, cores));
    let all_nodes: Vec<&NodeProc> = nodes.iter().collect();
    let setups = [("one_process", vec![&one], &[][..]), ("pipeline_4", all_nodes, &next[..])];
    let mut rows = Vec::new();
    let mut agg16 = (0.0, 0.0);
    // For a quick look at one row: `CONCURRENCY_ONLY=one_process:16 cargo bench --bench concurrency`
    // (`engine` for the engine alone).
    for &n in &STREAMS {
        for (setup, procs, route) in &setups {
            let setup = *setup;
            if only.as_ref().is_some_and(|o| *o != format!("{setup}:{n}") && *o != setup && *o != n.to_string()) {
                continue;
            }
            let runs = run(procs, route, n, vocab, &format!("{setup}-{n}"));
            let agg = median(runs.iter().map(|r| r.aggregate).collect());
            let p50 = median(runs.iter().map(|r| r.p50).collect());
            let p99 = median(runs.iter().map(|r| r.p99).collect());
            let complete = runs.iter().all(|r| r.complete);
            let per_node = |f: fn(&Run) -> &Vec<f64>| -> Vec<f64> {
                (0..procs.len()).map(|h| median(runs.iter().filter_map(|r| f(r).get(h).copied()).collect())).collect()
            };
            let (batch, busy, gather) = (per_node(|r| &r.batch), per_node(|r| &r.busy), per_node(|r| &r.gather));
            eprintln!(
                "{setup:12} {n:2} streams: {agg:7.1} tok/s aggregate, p50 {p50:7.2} ms, p99 {p99:7.2} ms per token, \
                 batch {batch:.1?}, busy {busy:.2?}, gather {gather:.2?}{}",
                if complete { "" } else { " (stopped at the time budget)" }
            );
            if n == 16 {
                if setup == "one_process" { agg16.0 = agg } else { agg16.1 = agg }
            }
            rows.push(json!({"setup": setup, "streams": n, "aggregate_tok_s": agg, "p50_ms_per_token": p50,
                "p99_ms_per_token": p99, "complete": complete,
                "mean_batch_per_node": batch, "busy_per_node": busy, "gather_per_node": gather,
                "runs": runs.iter().map(|r| json!([r.aggregate, r.p50, r.p99])).collect::<Vec<_>>()}));
        }
    }
    let mut report = json!({
        "model": model.file_name().unwrap().to_string_lossy(),
        "cores": cores,
        "threads_one_process": cores,
        "threads_per_pipeline_node": (cores / 4).max(1),
        "node_session_flags": SESSION_FLAGS.join(" "),
        "decode_steps_per_stream": STEPS,
        "prompt_tokens_per_stream": PROMPT_LEN,
        "run_budget_s": RUN_BUDGET.as_secs(),
        "reps": REPS,
        "pp512_one_process_tok_s": pp,
        "rows": rows,
        "decode16_over_pp512_one_process": agg16.0 / pp,
        "decode16_over_pp512_pipeline_4": agg16.1 / pp,
        "engine_batch16_tok_s": engine16.map(|e| e.0),
        "engine_batch16_over_pp512": engine16.map(|e| e.0 / pp),
        "engine_batch16_graph_nodes": engine16.map(|e| e.1),
        "goal": "aggregate decode with 16 streams >= 0.7 x pp512",
        "seconds": started.elapsed().as_secs_f64(),
    });
    if let Some(Value::Object(fields)) = llama {
        // Ours against llama.cpp's, each ratio to its own pp512 in the same run.
        let theirs = fields.get("llama_cpp_batch16_over_pp512").and_then(Value::as_f64);
        if let (Some(e), Some(t)) = (engine16, theirs) {
            report["engine_batch16_over_pp512_vs_llama_cpp"] = json!(e.0 / pp / t);
        }
        report.as_object_mut().unwrap().extend(fields);
    }
    eprintln!(
        "pp512 {pp:.1} tok/s; 16 streams: one process {:.2}x, 4-node pipeline {:.2}x of it ({:.0} s)",
        agg16.0 / pp,
        agg16.1 / pp,
        started.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all("target/bench").unwrap();
    std::fs::write("target/bench/concurrency.json", serde_json::to_string_pretty(&report).unwrap()).unwrap();
}
