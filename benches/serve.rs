//! `make bench` part 7: `shardctl serve` against `shardctl infer` on the same three-node cluster,
//! in the same run. Writes `target/bench/serve.json`.
//!
//! Both generate the same greedy tokens from the same prompt (end-of-generation ignored), taking
//! turns, `REPS` times each; medians. Through HTTP, time to first token is the client's, from
//! sending the request to the first streamed text; tokens per second is (completion tokens - 1)
//! over the time from the first streamed text to the last. For `infer`, its own `ttft_ms`
//! (prefill and the first sample) and `decode_tps`. Goal: HTTP at least 0.95x the tokens per
//! second, and a time to first token within 5 ms.
//!
//! Then concurrency through `serve` (default `--parallel` 4): `CONC_REPS` rounds of one stream
//! alone and of four streams at once (same prompt and tokens), aggregate tokens per second over
//! the round's wall time (send to the last `[DONE]`, prefill included); medians, and their ratio.
//! With pipelined streams and batched decode, four streams at once should exceed one alone.
//!
//! Model: SmolLM2-135M (`make models`), else the demo model.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir, bench_model, median, seeded_cluster, wait_for};
use serde_json::{Value, json};

const PROMPT: &str = "The history of the Roman Empire spans many centuries, from the founding of the city to the fall of \
    Constantinople. Its roads, laws and language shaped much of Europe. Write a short summary:";
const N: usize = 64;
const REPS: usize = 5;
const CONC_REPS: usize = 3;
const STREAMS: usize = 4;

/// `k` streamed completions at once: aggregate completion tokens per second over the wall time.
fn aggregate_tps(addr: &str, k: usize) -> f64 {
    let t0 = Instant::now();
    let runs: Vec<_> = (0..k)
        .map(|_| {
            let addr = addr.to_string();
            std::thread::spawn(move || http_run(&addr).2)
        })
        .collect();
    let tokens: u64 = runs.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(tokens, (k * N) as u64);
    tokens as f64 / t0.elapsed().as_secs_f64()
}

/// One streamed completion: (ms to the first text, decode tokens/s, completion tokens).
fn http_run(addr: &str) -> (f64, f64, u64) {
    let body = json!({
        "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let t0 = Instant::now();
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let (mut first, mut last, mut tokens) = (None, Instant::now(), 0);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            panic!("the stream ended early");
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    let first = first.expect("no text streamed");
    let ttft = (first - t0).as_secs_f64() * 1e3;
    let tps = (tokens - 1) as f64 / (last - first).as_secs_f64();
    (ttft, tps, tokens)
}

/// One `shardctl infer --json`: (ttft ms, decode tokens/s, tokens).
fn infer_run(boot: &str) -> (f64, f64, u64) {
    let o = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["--json", "infer", "--bootstrap", boot, "--prompt", PROMPT, "-n", &N.to_string(), "--ignore-eos"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    (v["ttft_ms"].as_f64().unwrap(), v["decode_tps"].as_f64().unwrap(), v["tokens"].as_array().unwrap().len() as u64)
}

fn main() {
    let dir = TempDir::new("bench-serve");
    let model = bench_model(dir.path());
    let nodes = seeded_cluster(dir.path(), &model, 3, 3, &["--enable-torrent", "--threads", "1"]);
    let n0 = &nodes[0];
    let mut serve = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["serve", "--bootstrap", &n0.addr, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let http = line.split("http://").nth(1).expect("serve's address").trim().to_string();
    wait_for(Duration::from_secs(60), || {
        let mut s = TcpStream::connect(&http).ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
        let mut status = String::new();
        BufReader::new(s).read_line(&mut status).ok()?;
        status.contains(" 200 ").then_some(())
    });

    // Warm-up, then turns.
    http_run(&http);
    infer_run(&n0.addr);
    let (mut h_ttft, mut h_tps, mut i_ttft, mut i_tps) = (vec![], vec![], vec![], vec![]);
    for _ in 0..REPS {
        let (t, r, n) = http_run(&http);
        assert_eq!(n, N as u64);
        h_ttft.push(t);
        h_tps.push(r);
        let (t, r, n) = infer_run(&n0.addr);
        assert_eq!(n, N as u64);
        i_ttft.push(t);
        i_tps.push(r);
    }
    let (mut one, mut four) = (vec![], vec![]);
    for _ in 0..CONC_REPS {
        one.push(aggregate_tps(&http, 1));
        four.push(aggregate_tps(&http, STREAMS));
    }
    let _ = serve.kill();
    let _ = serve.wait();
    let (one, four) = (median(one), median(four));
    let (ht, hr, it, ir) = (median(h_ttft), median(h_tps), median(i_ttft), median(i_tps));
    let report = json!({
        "model": model.file_name().unwrap().to_string_lossy(),
        "nodes": 3,
        "generated": N,
        "repetitions": REPS,
        "http": {"ttft_ms": ht, "decode_tps": hr},
        "infer": {"ttft_ms": it, "decode_tps": ir},
        "tps_ratio": hr / ir,
        "ttft_difference_ms": ht - it,
        "goal": {"tps_ratio_at_least": 0.95, "ttft_difference_ms_at_most": 5.0},
        "concurrency": {
            "repetitions": CONC_REPS,
            "streams_1_aggregate_tps": one,
            "streams_4_aggregate_tps": four,
            "ratio_4_to_1": four / one,
        },
    });
    println!("{report}");
    let out = Path::new("target/bench");
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("serve.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote target/bench/serve.json");
}
