//! Commands that talk to a running node: `list`, `status`, `load`, `send`, `peers`.

use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use shardnet::client::{Client, into_result};

use crate::args::usage;
use crate::{Opts, connect, print_json};

pub fn list(o: &Opts) -> Result<()> {
    let result = connect(o)?.call("LIST_FILES", json!({}))?;
    if o.json {
        print_json(&result);
        return Ok(());
    }
    let files = result["files"].as_array().cloned().unwrap_or_default();
    if files.is_empty() {
        println!("no GGUF files on {}", o.node);
        return Ok(());
    }
    println!("{:<6} {:<9} {:>12}  {:<40}  FILE", "SHARD", "LAYERS", "SIZE", "INFO HASH");
    for f in files {
        let shard = f["shard_id"].as_u64().map_or("-".into(), |s| s.to_string());
        let layers = match f["layers"].as_array() {
            Some(l) if l.len() == 2 => format!("{}..{}", l[0], l[1]),
            _ => "-".into(),
        };
        let hash = f["info_hash"].as_str().unwrap_or(if f["hashing"] == json!(true) { "(hashing)" } else { "-" });
        let mut line =
            format!("{shard:<6} {layers:<9} {:>12}  {hash:<40}  {}", f["size"], f["filename"].as_str().unwrap_or("?"));
        if let Some(e) = f["error"].as_str() {
            line.push_str(&format!("  [not loadable: {e}]"));
        }
        println!("{line}");
    }
    Ok(())
}

pub fn status(o: &Opts) -> Result<()> {
    let s = connect(o)?.call("STATUS", json!({}))?;
    if o.json {
        print_json(&s);
        return Ok(());
    }
    println!("node      {} at {}", s["node_id"].as_str().unwrap_or("?"), s["address"].as_str().unwrap_or("?"));
    println!(
        "cluster   {}  (torrent {})",
        s["cluster"].as_str().unwrap_or("?"),
        if s["torrent_enabled"] == json!(true) { "enabled" } else { "disabled" }
    );
    println!("uptime    {:.1} s", s["uptime_ms"].as_f64().unwrap_or(0.0) / 1e3);
    let m = &s["metadata"];
    println!(
        "files     {} ({} with metadata: {} cached, {} hashed{})",
        m["files"],
        m["ready"],
        m["cached"],
        m["hashed"],
        if m["scan_done"] == json!(true) { "" } else { ", scan running" }
    );
    let loaded: Vec<String> = s["shards_loaded"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| format!("{} ({})", l["shard_id"], l["filename"].as_str().unwrap_or("?")))
        .collect();
    println!("loaded    {}", if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") });
    println!("conns     {}", s["connections"]);
    Ok(())
}

pub fn load(o: &Opts, n: &str, flags: &[&str]) -> Result<()> {
    let id: u64 = n.parse().map_err(|_| usage(format!("load: shard id {n:?} is not a whole number")))?;
    let mut params = json!({ "shard_id": id });
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        match *f {
            "--info-hash" => {
                params["info_hash"] = json!(it.next().ok_or_else(|| usage("--info-hash needs a value".into()))?)
            }
            "--filename" => {
                params["filename"] = json!(it.next().ok_or_else(|| usage("--filename needs a value".into()))?)
            }
            "--no-wait" => params["wait"] = json!(false),
            "--peer" => {
                let peer = it.next().ok_or_else(|| usage("--peer needs a value".into()))?;
                match params["peers"].as_array_mut() {
                    Some(list) => list.push(json!(peer)),
                    None => params["peers"] = json!([peer]),
                }
            }
            other => return Err(usage(format!("load: unknown flag {other}"))),
        }
    }
    // The load answers when done (a download may take a while); meanwhile
    // STATUS shows its progress.
    let (node, wait) = (o.node.clone(), o.timeout * 20);
    let load = std::thread::spawn(move || Client::connect(&node, wait)?.call("LOAD_SHARD", params));
    let started = std::time::Instant::now();
    let mut shown = false;
    while !load.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        if o.json {
            continue;
        }
        let Ok(s) = connect(o).and_then(|mut c| c.call("STATUS", json!({}))) else { continue };
        let d = s["downloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["shard_id"] == json!(id) && d["complete"] != json!(true));
        if let Some(d) = d {
            eprint!("\r{}", progress_line(d, started));
            shown = true;
        }
    }
    if shown {
        eprintln!();
    }
    let r = load.join().map_err(|_| anyhow::anyhow!("the request thread panicked"))??;
    if o.json {
        print_json(&r);
    } else {
        println!(
            "shard {} {} from {} ({}, {:.1} ms)",
            r["shard_id"],
            r["status"].as_str().unwrap_or("?"),
            r["path"].as_str().unwrap_or("?"),
            r["source"].as_str().unwrap_or("-"),
            r["elapsed_ms"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

pub fn send(o: &Opts, text: &str) -> Result<()> {
    serde_json::from_str::<Value>(text).map_err(|e| usage(format!("send: not JSON: {e}")))?;
    let mut c = connect(o)?;
    c.send_payload(text.as_bytes())?;
    let response = c.read_response()?;
    print_json(&response);
    into_result(response).map(|_| ())
}

pub fn peers(o: &Opts, params: Value) -> Result<()> {
    let r = connect(o)?.call("FIND_PEERS", params)?;
    if o.json {
        print_json(&r);
        return Ok(());
    }
    let list = r["peers"].as_array().cloned().unwrap_or_default();
    println!(
        "key {}: {} peers ({} nodes answered, {} messages, {:.1} ms)",
        r["key"].as_str().unwrap_or("?"),
        list.len(),
        r["nodes_responded"],
        r["messages"],
        r["elapsed_ms"].as_f64().unwrap_or(0.0)
    );
    for p in list {
        println!("  {}", p.as_str().unwrap_or("?"));
    }
    Ok(())
}

/// `[#####.....]  45.2%  120.5 MB/s  3 peers  ETA 2s` for a STATUS download.
pub fn progress_line(d: &Value, started: std::time::Instant) -> String {
    let total = d["bytes"].as_u64().unwrap_or(0);
    let done = d["verified_bytes"].as_u64().unwrap_or(0);
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
    let pct = if total > 0 { done as f64 * 100.0 / total as f64 } else { 0.0 };
    let bar: String = (0..30).map(|i| if (i as f64) < pct * 0.3 { '#' } else { '.' }).collect();
    let eta = if rate > 0.0 && total > done { format!("{:.0}s", (total - done) as f64 / rate) } else { "-".into() };
    format!("[{bar}] {pct:5.1}%  {:>8.1} MB/s  {} peers  ETA {eta}   ", rate / 1e6, d["peers"])
}
