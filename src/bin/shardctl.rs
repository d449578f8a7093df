//! `shardctl`: talks to a node, and makes and reads `.torrent` files. See `--help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use shardnet::client::{Client, into_result};
use shardnet::torrent::{Metainfo, create};
use shardnet::workers::WorkerPool;

const USAGE: &str = "\
shardctl: talk to a shardnet node; make and read .torrent files

USAGE: shardctl [--node ADDR] [--json] [--timeout SECS] COMMAND

COMMANDS:
  list                          GGUF files the node seeds (LIST_FILES)
  load N [--info-hash HASH] [--filename NAME] [--no-wait]
                                make the node load shard N (LOAD_SHARD)
  status                        the node's state (STATUS)
  send JSON                     send one raw request object, print the response
  torrent create FILE [--out PATH] [--piece-length BYTES]
                                hash FILE and write FILE.torrent (or PATH)
  torrent info FILE.torrent     print a .torrent's contents
  torrent magnet FILE.torrent   print its magnet link

FLAGS:
  --node ADDR      node to talk to: HOST:PORT or /ip4/A.B.C.D/tcp/PORT
                   [default: 127.0.0.1:51820]
  --json           print the raw JSON result (for scripts)
  --timeout SECS   bound on connecting and on each response [default: 30]
  -h, --help       print this help
";

struct Opts {
    node: String,
    json: bool,
    timeout: Duration,
    rest: Vec<String>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("shardctl: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Result<Option<Opts>, String> {
    let mut o = Opts { node: "127.0.0.1:51820".into(), json: false, timeout: Duration::from_secs(30), rest: Vec::new() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--json" => o.json = true,
            "--node" => o.node = it.next().ok_or("--node needs a value")?.clone(),
            "--timeout" => {
                let v = it.next().ok_or("--timeout needs a value")?;
                let secs: u64 = v.parse().ok().filter(|s| (1..=86_400).contains(s)).ok_or_else(|| format!("--timeout {v:?} is not 1-86400 seconds"))?;
                o.timeout = Duration::from_secs(secs);
            }
            _ => o.rest.push(a.clone()),
        }
    }
    if o.rest.is_empty() {
        return Err("no command given (see --help)".into());
    }
    Ok(Some(o))
}

/// Exit status 2 for usage errors found after parsing.
fn usage(msg: String) -> anyhow::Error {
    eprintln!("shardctl: {msg}");
    std::process::exit(2);
}

fn run(o: &Opts) -> Result<()> {
    let cmd: Vec<&str> = o.rest.iter().map(String::as_str).collect();
    match cmd.as_slice() {
        ["list"] => list(o),
        ["status"] => status(o),
        ["load", n, flags @ ..] => load(o, n, flags),
        ["send", json] => send(o, json),
        ["torrent", "create", file, flags @ ..] => torrent_create(o, file, flags),
        ["torrent", "info", file] => torrent_info(o, file),
        ["torrent", "magnet", file] => {
            println!("{}", read_torrent(file)?.magnet());
            Ok(())
        }
        _ => Err(usage(format!("unknown or incomplete command {:?} (see --help)", o.rest.join(" ")))),
    }
}

fn connect(o: &Opts) -> Result<Client> {
    Client::connect(&o.node, o.timeout)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
}

fn list(o: &Opts) -> Result<()> {
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
        let mut line = format!("{shard:<6} {layers:<9} {:>12}  {hash:<40}  {}", f["size"], f["filename"].as_str().unwrap_or("?"));
        if let Some(e) = f["error"].as_str() {
            line.push_str(&format!("  [not loadable: {e}]"));
        }
        println!("{line}");
    }
    Ok(())
}

fn status(o: &Opts) -> Result<()> {
    let s = connect(o)?.call("STATUS", json!({}))?;
    if o.json {
        print_json(&s);
        return Ok(());
    }
    println!("node      {} at {}", s["node_id"].as_str().unwrap_or("?"), s["address"].as_str().unwrap_or("?"));
    println!("cluster   {}  (torrent {})", s["cluster"].as_str().unwrap_or("?"), if s["torrent_enabled"] == json!(true) { "enabled" } else { "disabled" });
    println!("uptime    {:.1} s", s["uptime_ms"].as_f64().unwrap_or(0.0) / 1e3);
    let m = &s["metadata"];
    println!("files     {} ({} with metadata: {} cached, {} hashed{})", m["files"], m["ready"], m["cached"], m["hashed"], if m["scan_done"] == json!(true) { "" } else { ", scan running" });
    let loaded: Vec<String> = s["shards_loaded"].as_array().into_iter().flatten().map(|l| format!("{} ({})", l["shard_id"], l["filename"].as_str().unwrap_or("?"))).collect();
    println!("loaded    {}", if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") });
    println!("conns     {}", s["connections"]);
    Ok(())
}

fn load(o: &Opts, n: &str, flags: &[&str]) -> Result<()> {
    let id: u64 = n.parse().map_err(|_| usage(format!("load: shard id {n:?} is not a whole number")))?;
    let mut params = json!({ "shard_id": id });
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        match *f {
            "--info-hash" => params["info_hash"] = json!(it.next().ok_or_else(|| usage("--info-hash needs a value".into()))?),
            "--filename" => params["filename"] = json!(it.next().ok_or_else(|| usage("--filename needs a value".into()))?),
            "--no-wait" => params["wait"] = json!(false),
            other => return Err(usage(format!("load: unknown flag {other}"))),
        }
    }
    let r = connect(o)?.call("LOAD_SHARD", params)?;
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

fn send(o: &Opts, text: &str) -> Result<()> {
    serde_json::from_str::<Value>(text).map_err(|e| usage(format!("send: not JSON: {e}")))?;
    let mut c = connect(o)?;
    c.send_payload(text.as_bytes())?;
    let response = c.read_response()?;
    print_json(&response);
    into_result(response).map(|_| ())
}

fn read_torrent(file: &str) -> Result<Metainfo> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {file}"))?;
    Metainfo::parse(&bytes).with_context(|| format!("parsing {file}"))
}

fn torrent_create(o: &Opts, file: &str, flags: &[&str]) -> Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut piece_length = None;
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        match *f {
            "--out" => out = Some(PathBuf::from(it.next().ok_or_else(|| usage("--out needs a value".into()))?)),
            "--piece-length" => {
                let v = it.next().ok_or_else(|| usage("--piece-length needs a value".into()))?;
                let n: u64 = v.parse().ok().filter(|n: &u64| n.is_power_of_two() && (16384..=(64 << 20)).contains(n))
                    .ok_or_else(|| usage(format!("--piece-length {v:?} is not a power of two from 16 KiB to 64 MiB")))?;
                piece_length = Some(n);
            }
            other => return Err(usage(format!("torrent create: unknown flag {other}"))),
        }
    }
    let path = Path::new(file);
    if !path.is_file() {
        bail!("{file} is not a file");
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = WorkerPool::new("hash", threads);
    let m = create::create(path, piece_length, &pool.handle())?;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{file}.torrent")));
    std::fs::write(&out, m.to_torrent_bytes()).with_context(|| format!("writing {}", out.display()))?;
    if o.json {
        print_json(&json!({"torrent": out.display().to_string(), "info_hash": m.info_hash.to_hex(), "magnet": m.magnet()}));
    } else {
        println!("{} -> {} (info hash {})", file, out.display(), m.info_hash);
    }
    Ok(())
}

fn torrent_info(o: &Opts, file: &str) -> Result<()> {
    let m = read_torrent(file)?;
    let info = &m.info;
    if o.json {
        print_json(&json!({
            "name": info.name, "length": info.length, "piece_length": info.piece_length,
            "pieces": info.pieces.len(), "info_hash": m.info_hash.to_hex(), "magnet": m.magnet(),
            "created_by": m.created_by, "creation_date": m.creation_date,
        }));
        return Ok(());
    }
    println!("name          {}", info.name);
    println!("info hash     {}", m.info_hash);
    println!("length        {} bytes", info.length);
    println!("piece length  {} bytes", info.piece_length);
    println!("pieces        {}", info.pieces.len());
    if let Some(by) = &m.created_by {
        println!("created by    {by}");
    }
    println!("magnet        {}", m.magnet());
    Ok(())
}
