//! Commands that talk to a running node: `list`, `status`, `load`, `send`, `peers`.

use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use anyhow::{Result, bail};
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
    let rows: Vec<[String; 5]> = files
        .iter()
        .map(|f| {
            let shard = f["shard_id"].as_u64().map_or("-".into(), |s| s.to_string());
            let layers = match f["layers"].as_array() {
                Some(l) if l.len() == 2 => format!("{}..{}", l[0], l[1]),
                _ => "-".into(),
            };
            let size = f["size"].as_u64().map_or("-".into(), |s| s.to_string());
            let hash = f["info_hash"].as_str().unwrap_or(if f["hashing"] == json!(true) { "(hashing)" } else { "-" });
            let mut file = f["filename"].as_str().unwrap_or("?").to_string();
            if let Some(e) = f["error"].as_str() {
                file.push_str(&format!("  [not loadable: {e}]"));
            }
            [shard, layers, size, hash.to_string(), file]
        })
        .collect();
    print!("{}", table(["SHARD", "LAYERS", "SIZE", "INFO HASH", "FILE"], [false, false, true, false, false], &rows));
    Ok(())
}

pub fn status(o: &Opts) -> Result<()> {
    let s = connect(o)?.call("STATUS", json!({}))?;
    if o.json {
        print_json(&s);
        return Ok(());
    }
    if s.get("partial").is_some() {
        // A keyed node shows strangers only who it is.
        println!("node      {}", s["node_id"].as_str().unwrap_or("?"));
        println!("cluster   {}", s["cluster"].as_str().unwrap_or("?"));
        println!("uptime    {:.1} s", s["uptime_ms"].as_f64().unwrap_or(0.0) / 1e3);
        println!(
            "(the node has a cluster key: files, shards, downloads and connections are shown only to a \
             client proving it; give --cluster-key-file or SHARDNET_CLUSTER_KEY_FILE)"
        );
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
                params["info_hash"] = json!(it.next().ok_or_else(|| usage("load: --info-hash needs a value".into()))?)
            }
            "--filename" => {
                params["filename"] = json!(it.next().ok_or_else(|| usage("load: --filename needs a value".into()))?)
            }
            "--no-wait" => params["wait"] = json!(false),
            "--peer" => {
                let peer = it.next().ok_or_else(|| usage("load: --peer needs a value".into()))?;
                match params["peers"].as_array_mut() {
                    Some(list) => list.push(json!(peer)),
                    None => params["peers"] = json!([peer]),
                }
            }
            other => return Err(usage(format!("load: unknown flag {other} (see --help)"))),
        }
    }
    // The load answers when done (a download may take a while); meanwhile
    // STATUS shows its progress.
    let (node, wait) = (o.node.clone(), o.timeout * 20);
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(Client::connect(&node, wait).and_then(|mut c| c.call("LOAD_SHARD", params)));
    });
    let started = std::time::Instant::now();
    let mut shown = false;
    // The answer is taken the moment it comes (a cached shard: a few ms); while it has not, the
    // download's progress is shown every 200 ms.
    let r = loop {
        match done.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => break r,
            Err(RecvTimeoutError::Disconnected) => bail!("the request thread panicked"),
            Err(RecvTimeoutError::Timeout) if o.json => continue,
            Err(RecvTimeoutError::Timeout) => {}
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
    };
    if shown {
        eprintln!();
    }
    let r = r?;
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

/// `peers KEY | --shard N | --cluster`.
pub fn peers_command(o: &Opts, rest: &[&str]) -> Result<()> {
    let params = match rest {
        ["--shard", n] => {
            json!({"shard_id": n.parse::<u64>().map_err(|_| usage(format!("peers: --shard {n:?} is not a shard id")))?})
        }
        ["--shard"] => return Err(usage("peers: --shard needs a value".into())),
        ["--cluster"] => json!({"cluster": true}),
        [key] if !key.starts_with('-') => json!({"key": key}),
        [] => return Err(usage("peers: missing KEY, --shard N or --cluster (see --help)".into())),
        [first, ..] if first.starts_with('-') && !matches!(*first, "--shard" | "--cluster") => {
            return Err(usage(format!("peers: unknown flag {first} (see --help)")));
        }
        [_, extra, ..] | [extra] => return Err(usage(format!("peers: unexpected argument {extra:?} (see --help)"))),
    };
    peers(o, params)
}

fn peers(o: &Opts, params: Value) -> Result<()> {
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

/// Columns two spaces apart, each as wide as its widest cell; left-aligned unless `right`.
fn table<const N: usize>(header: [&str; N], right: [bool; N], rows: &[[String; N]]) -> String {
    let mut width: [usize; N] = header.map(str::len);
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (c, cell) in cells.iter().enumerate() {
            let pad = width[c] - cell.chars().count();
            if c + 1 == N {
                out.push_str(cell);
            } else if right[c] {
                out.push_str(&format!("{}{cell}  ", " ".repeat(pad)));
            } else {
                out.push_str(&format!("{cell}{}  ", " ".repeat(pad)));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header);
    for r in rows {
        out.push_str(&line(std::array::from_fn(|c| r[c].as_str())));
    }
    out
}
