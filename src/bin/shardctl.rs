//! `shardctl`: talks to a node, and makes and reads `.torrent` files. See `--help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use shardnet::client::{Client, into_result};
use shardnet::engine::sampler::SamplerConfig;
use shardnet::torrent::{Metainfo, create};
use shardnet::workers::WorkerPool;

const USAGE: &str = "\
shardctl: talk to a shardnet node; make and read .torrent files

USAGE: shardctl [--node ADDR] [--json] [--timeout SECS] COMMAND

COMMANDS:
  list                          GGUF files the node seeds (LIST_FILES)
  load N [--info-hash HASH] [--filename NAME] [--peer IP:PORT]... [--no-wait]
                                make the node load shard N (LOAD_SHARD),
                                downloading it from the peers if it lacks it
  status                        the node's state (STATUS)
  send JSON                     send one raw request object, print the response
  split MODEL.gguf --shards N --out DIR
                                cut a model into layer-range shards, with
                                .torrent files and manifest.json
  demo-model --out FILE [--layers N] [--embd N] [--heads N] [--kv-heads N]
             [--ffn N] [--vocab N] [--context N] [--type f32|f16|q8_0|q4_0]
             [--seed N] [--tied]
                                write a small deterministic LLaMA model
  inspect FILE.gguf             print a GGUF file's metadata and tensors
  generate MODEL.gguf --prompt TEXT [-n N] [--temp T] [--top-k K] [--top-p P]
           [--seed S] [--threads N] [--ctx N] [--batch N] [--no-special]
           [--prompt-ids ID,ID,...] [--ignore-eos] [--logits] [--repack]
                                run a whole model in this process and stream
                                the text (greedy unless --temp > 0); with
                                --json --logits also the logits (checks)
  infer --prompt TEXT [--bootstrap ADDR] [--cluster NAME] [-n N] [--temp T]
        [--top-k K] [--top-p P] [--seed S] [--batch N] [--session ID]
        [--no-special] [--ignore-eos] [--pace-ms MS] [--load-timeout SECS]
                                generate across the cluster: find its nodes,
                                have one node per shard load it (downloading
                                through the swarm), stream the text; a failed
                                node's shard moves to another node
  serve [--bootstrap ADDR] [--cluster NAME] [--listen IP:PORT] [-n N]
        [--temp T] [--top-k K] [--top-p P] [--seed S] [--repeat-penalty R]
        [--repeat-last-n N] [--presence-penalty P] [--frequency-penalty F]
        [--chat-template FILE] [--model-name NAME] [--max-connections N]
        [--queue N] [--max-body BYTES] [--batch N] [--load-timeout SECS]
                                an OpenAI-compatible HTTP endpoint over the
                                cluster's chain (default 127.0.0.1:8080):
                                /v1/chat/completions, /v1/completions,
                                /v1/models, /health, /metrics, a chat page
                                at /; flags give the defaults of requests
  tokenize MODEL.gguf [TEXT]    token ids of TEXT, or of each JSON string line
                                on stdin (one JSON array per line)
  peers KEY | --shard N | --cluster
                                peers the DHT knows for an info hash (or any
                                key), a shard's name, or the cluster (FIND_PEERS)
  fetch TORRENT|MAGNET --peer IP:PORT... --out DIR [--listen IP:PORT]
                                download a torrent from the given peers (a
                                node of its own, seeding while it runs)
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
    let mut o =
        Opts { node: "127.0.0.1:51820".into(), json: false, timeout: Duration::from_secs(30), rest: Vec::new() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--json" => o.json = true,
            "--node" => o.node = it.next().ok_or("--node needs a value")?.clone(),
            "--timeout" => {
                let v = it.next().ok_or("--timeout needs a value")?;
                let secs: u64 = v
                    .parse()
                    .ok()
                    .filter(|s| (1..=86_400).contains(s))
                    .ok_or_else(|| format!("--timeout {v:?} is not 1-86400 seconds"))?;
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
        ["split", model, flags @ ..] => split(o, model, flags),
        ["demo-model", flags @ ..] => demo_model(o, flags),
        ["inspect", file] => inspect(o, file),
        ["generate", model, flags @ ..] => generate(o, model, flags),
        ["infer", flags @ ..] => infer(o, flags),
        ["serve", flags @ ..] => serve(o, flags),
        ["tokenize", model, rest @ ..] => tokenize(o, model, rest),
        ["fetch", target, flags @ ..] => fetch(o, target, flags),
        ["peers", "--shard", n] => peers(
            o,
            json!({"shard_id": n.parse::<u64>().map_err(|_| usage(format!("peers: {n:?} is not a shard id")))?}),
        ),
        ["peers", "--cluster"] => peers(o, json!({"cluster": true})),
        ["peers", key] => peers(o, json!({"key": key})),
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
    use std::io::Write;
    let text = serde_json::to_string_pretty(v).expect("JSON prints");
    // A reader that went away (`| head`) ends the output quietly rather than with a panic.
    if writeln!(std::io::stdout().lock(), "{text}").is_err() {
        std::process::exit(0);
    }
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
        let mut line =
            format!("{shard:<6} {layers:<9} {:>12}  {hash:<40}  {}", f["size"], f["filename"].as_str().unwrap_or("?"));
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

fn load(o: &Opts, n: &str, flags: &[&str]) -> Result<()> {
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
                let n: u64 = v
                    .parse()
                    .ok()
                    .filter(|n: &u64| n.is_power_of_two() && (16384..=(64 << 20)).contains(n))
                    .ok_or_else(|| {
                    usage(format!("--piece-length {v:?} is not a power of two from 16 KiB to 64 MiB"))
                })?;
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
        print_json(
            &json!({"torrent": out.display().to_string(), "info_hash": m.info_hash.to_hex(), "magnet": m.magnet()}),
        );
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

/// Parses `--flag value` pairs (and bare switches listed in `switches`).
fn flag_map<'a>(flags: &[&'a str], valued: &[&str], switches: &[&str]) -> std::collections::HashMap<&'a str, &'a str> {
    let mut m = std::collections::HashMap::new();
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        if switches.contains(f) {
            m.insert(*f, "");
        } else if valued.contains(f) {
            let v = it.next().unwrap_or_else(|| {
                usage(format!("{f} needs a value"));
                unreachable!()
            });
            m.insert(*f, *v);
        } else {
            usage(format!("unknown flag {f} (see --help)"));
        }
    }
    m
}

fn num<T: std::str::FromStr>(flags: &std::collections::HashMap<&str, &str>, name: &str, default: T) -> T {
    match flags.get(name) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            usage(format!("{name} {v:?} is not a number"));
            unreachable!()
        }),
    }
}

fn split(o: &Opts, model: &str, flags: &[&str]) -> Result<()> {
    let f = flag_map(flags, &["--shards", "--out"], &[]);
    let n: u32 = num(&f, "--shards", 0);
    let out = f.get("--out").copied().ok_or_else(|| usage("split needs --out DIR".into()))?;
    if n == 0 {
        return Err(usage("split needs --shards N (N >= 1)".into()));
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = WorkerPool::new("hash", threads);
    let t = std::time::Instant::now();
    let report = shardnet::gguf::split::split(Path::new(model), n, Path::new(out), Some(&pool.handle()))?;
    if o.json {
        print_json(&report.manifest);
        return Ok(());
    }
    println!("model id {}", report.model_id);
    for s in report.manifest["shards"].as_array().into_iter().flatten() {
        println!(
            "  {}  layers {}..{}  {:>12} bytes  info hash {}",
            s["filename"].as_str().unwrap_or("?"),
            s["layers"][0],
            s["layers"][1],
            s["size"],
            s["info_hash"].as_str().unwrap_or("-")
        );
    }
    println!("wrote {} shards and manifest.json to {out} in {:.2} s", n, t.elapsed().as_secs_f64());
    Ok(())
}

fn demo_model(o: &Opts, flags: &[&str]) -> Result<()> {
    use shardnet::gguf::GgmlType;
    use shardnet::gguf::demo::{DemoConfig, write};
    let f = flag_map(
        flags,
        &["--out", "--layers", "--embd", "--heads", "--kv-heads", "--ffn", "--vocab", "--context", "--type", "--seed"],
        &["--tied"],
    );
    let out = f.get("--out").copied().ok_or_else(|| usage("demo-model needs --out FILE".into()))?;
    let d = DemoConfig::default();
    let weight_type = match f.get("--type").copied().unwrap_or("f32") {
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        "q8_0" => GgmlType::Q8_0,
        "q4_0" => GgmlType::Q4_0,
        other => return Err(usage(format!("--type {other:?} is not f32, f16, q8_0 or q4_0"))),
    };
    let c = DemoConfig {
        layers: num(&f, "--layers", d.layers),
        embd: num(&f, "--embd", d.embd),
        heads: num(&f, "--heads", d.heads),
        kv_heads: num(&f, "--kv-heads", d.kv_heads),
        ffn: num(&f, "--ffn", d.ffn),
        vocab: num(&f, "--vocab", d.vocab),
        context: num(&f, "--context", d.context),
        weight_type,
        seed: num(&f, "--seed", d.seed),
        tied: f.contains_key("--tied"),
    };
    if let Err(e) = c.validate() {
        return Err(usage(format!("demo-model: {e}")));
    }
    if let Some(dir) = Path::new(out).parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let bytes = write(&c, Path::new(out))?;
    if o.json {
        print_json(&json!({"path": out, "bytes": bytes}));
    } else {
        println!(
            "wrote {out}: demo LLaMA model, {} layers, width {}, {} heads ({} kv), ffn {}, vocab {}, {}, {} bytes",
            c.layers, c.embd, c.heads, c.kv_heads, c.ffn, c.vocab, c.weight_type, bytes
        );
    }
    Ok(())
}

fn inspect(o: &Opts, file: &str) -> Result<()> {
    use shardnet::gguf::{Gguf, MetaValue};
    let f = std::fs::File::open(file).with_context(|| format!("opening {file}"))?;
    // SAFETY: read-only map of a file this command only reads.
    let map = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("mapping {file}"))?;
    let g = Gguf::parse(&map).with_context(|| format!("reading {file}"))?;
    if o.json {
        let meta: serde_json::Map<String, Value> =
            g.metadata.iter().map(|(k, v)| (k.to_string(), v.to_json())).collect();
        let tensors: Vec<Value> = g
            .tensors
            .iter()
            .map(|t| {
                json!({
                    "name": t.name, "type": t.ggml_type.name(), "dims": t.dims, "offset": t.offset, "size": t.size,
                })
            })
            .collect();
        print_json(
            &json!({"version": g.version, "alignment": g.alignment, "data_offset": g.data_offset, "metadata": meta, "tensors": tensors}),
        );
        return Ok(());
    }
    println!(
        "* {file}: GGUF v{}, {} key/value pairs, {} tensors, alignment {}, data at byte {}",
        g.version,
        g.metadata.len(),
        g.tensors.len(),
        g.alignment,
        g.data_offset
    );
    println!("* Metadata:");
    for (i, (k, v)) in g.metadata.iter().enumerate() {
        let shown = match v {
            MetaValue::Array(a) => {
                let head: Vec<String> = a.iter().take(6).map(|e| e.to_json().to_string()).collect();
                format!(
                    "[{} x {}] = [{}{}]",
                    type_name(a.elem_type),
                    a.len,
                    head.join(", "),
                    if a.len > 6 { ", ..." } else { "" }
                )
            }
            MetaValue::String(s) if s.chars().count() > 60 => {
                format!("{:?}... ({} bytes)", s.chars().take(60).collect::<String>(), s.len())
            }
            other => other.to_json().to_string(),
        };
        println!("  {:>4}: {k} = {shown}", i + 1);
    }
    println!("* Tensors:");
    println!("  {:>4}  {:<32} {:<8} {:<24} {:>12} {:>12}", "#", "NAME", "TYPE", "SHAPE", "OFFSET", "BYTES");
    for (i, t) in g.tensors.iter().enumerate() {
        let shape = t.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" x ");
        println!("  {:>4}  {:<32} {:<8} {:<24} {:>12} {:>12}", i, t.name, t.ggml_type.name(), shape, t.offset, t.size);
    }
    Ok(())
}

fn type_name(t: u32) -> &'static str {
    ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"]
        .get(t as usize)
        .copied()
        .unwrap_or("?")
}

/// `[#####.....]  45.2%  120.5 MB/s  3 peers  ETA 2s` for a STATUS download.
fn progress_line(d: &Value, started: std::time::Instant) -> String {
    let total = d["bytes"].as_u64().unwrap_or(0);
    let done = d["verified_bytes"].as_u64().unwrap_or(0);
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
    let pct = if total > 0 { done as f64 * 100.0 / total as f64 } else { 0.0 };
    let bar: String = (0..30).map(|i| if (i as f64) < pct * 0.3 { '#' } else { '.' }).collect();
    let eta = if rate > 0.0 && total > done { format!("{:.0}s", (total - done) as f64 / rate) } else { "-".into() };
    format!("[{bar}] {pct:5.1}%  {:>8.1} MB/s  {} peers  ETA {eta}   ", rate / 1e6, d["peers"])
}

/// `shardctl fetch`: runs a node of its own (it serves what it has while it
/// runs), asks it to DOWNLOAD, and shows progress until the file is complete.
fn fetch(o: &Opts, target: &str, flags: &[&str]) -> Result<()> {
    use shardnet::config::NodeConfig;
    use shardnet::node::Node;
    use shardnet::torrent::Magnet;
    let mut peers = Vec::new();
    let mut out = None;
    let mut listen = "127.0.0.1:0".to_string();
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        let mut value = || it.next().copied().ok_or_else(|| usage(format!("{f} needs a value")));
        match *f {
            "--peer" => peers.push(value()?.to_string()),
            "--out" => out = Some(value()?.to_string()),
            "--listen" => listen = value()?.to_string(),
            other => return Err(usage(format!("fetch: unknown flag {other}"))),
        }
    }
    let out = out.ok_or_else(|| usage("fetch needs --out DIR".into()))?;
    if peers.is_empty() {
        return Err(usage("fetch needs at least one --peer IP:PORT".into()));
    }
    let (info_hash, torrent_hex) = if target.starts_with("magnet:") {
        (Magnet::parse(target)?.info_hash, None)
    } else {
        let bytes = std::fs::read(target).with_context(|| format!("reading {target}"))?;
        let m = Metainfo::parse(&bytes).with_context(|| format!("parsing {target}"))?;
        (m.info_hash, Some(shardnet::hash::to_hex(&bytes)))
    };
    let config = NodeConfig {
        listen: listen.parse().map_err(|_| usage(format!("--listen {listen:?} is not IP:PORT")))?,
        shards_dir: PathBuf::from(&out),
        enable_torrent: true,
        log_level: shardnet::log::Level::Warn,
        ..NodeConfig::default()
    };
    shardnet::log::set_level(config.log_level);
    let mut node = Node::bind(config)?;
    let addr = node.local_addr().to_string();
    std::thread::spawn(move || node.run());
    let mut c = Client::connect(&addr, o.timeout)?;
    let mut params = json!({"info_hash": info_hash.to_hex(), "peers": peers});
    if let Some(hex) = torrent_hex {
        params["torrent_hex"] = json!(hex);
    }
    let started = std::time::Instant::now();
    let r = c.call("DOWNLOAD", params)?;
    if r["status"] == "complete" {
        println!("{} is already complete in {out}", info_hash);
        return Ok(());
    }
    let mut last_progress = (0u64, std::time::Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let s = c.call("STATUS", json!({}))?;
        let d = s["downloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["info_hash"] == info_hash.to_hex().as_str())
            .cloned()
            .unwrap_or(Value::Null);
        let total = d["bytes"].as_u64().unwrap_or(0);
        let done = d["verified_bytes"].as_u64().unwrap_or(0);
        let secs = started.elapsed().as_secs_f64();
        if let Some(e) = d["error"].as_str() {
            eprintln!();
            bail!("download failed: {e}");
        }
        if !o.json {
            eprint!("\r{}", progress_line(&d, started));
        }
        if d["complete"] == json!(true) {
            // The node's own clock: from the download's start to its last piece.
            let secs = d["seconds"].as_f64().unwrap_or(secs);
            if o.json {
                print_json(
                    &json!({"info_hash": info_hash.to_hex(), "name": d["name"], "bytes": total, "seconds": secs, "path": format!("{out}/{}", d["name"].as_str().unwrap_or("?"))}),
                );
            } else {
                eprintln!();
                println!(
                    "{} complete: {total} bytes in {secs:.2} s ({:.1} MB/s), every piece verified",
                    d["name"].as_str().unwrap_or("?"),
                    total as f64 / secs / 1e6
                );
            }
            return Ok(());
        }
        if done > last_progress.0 {
            last_progress = (done, std::time::Instant::now());
        } else if last_progress.1.elapsed() > o.timeout {
            eprintln!();
            bail!("no progress for {} s ({} peers connected)", o.timeout.as_secs(), d["peers"]);
        }
    }
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

fn open_model(path: &str) -> Result<std::sync::Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: shard files are not modified while mapped (the node never writes a complete file).
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {path}"))?;
    Ok(std::sync::Arc::new(map))
}

fn load_tokenizer(map: &[u8], path: &str) -> Result<shardnet::engine::tokenizer::Tokenizer> {
    let g = shardnet::gguf::reader::Gguf::parse(map).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    shardnet::engine::tokenizer::Tokenizer::from_gguf(&g).map_err(|e| anyhow::anyhow!("{path}: {e}"))
}

/// `--temp`, `--top-k`, `--top-p`, `--seed` (generate and infer), checked.
fn sampling_flags(f: &std::collections::HashMap<&str, &str>, command: &str) -> Result<SamplerConfig> {
    let d = SamplerConfig::default();
    let sampling = SamplerConfig {
        temperature: num(f, "--temp", 0.0),
        top_k: num(f, "--top-k", d.top_k),
        top_p: num(f, "--top-p", d.top_p),
        seed: num(f, "--seed", d.seed),
    };
    sampling.validate().map_err(|e| usage(format!("{command}: {e}")))?;
    Ok(sampling)
}

fn generate(o: &Opts, model: &str, flags: &[&str]) -> Result<()> {
    use shardnet::engine::generate::{TextStream, generate};
    use shardnet::engine::sampler::Sampler;
    use shardnet::engine::{Engine, EngineConfig};
    use std::io::Write;
    let f = flag_map(
        flags,
        &["--prompt", "-n", "--temp", "--top-k", "--top-p", "--seed", "--threads", "--ctx", "--batch", "--prompt-ids"],
        &["--no-special", "--logits", "--ignore-eos", "--repack"],
    );
    let sampling = sampling_flags(&f, "generate")?;
    let n: usize = num(&f, "-n", 32);
    let batch: usize = num(&f, "--batch", 512);
    if batch == 0 {
        return Err(usage("--batch must be at least 1".into()));
    }
    let ec = EngineConfig::default();
    let cfg = EngineConfig {
        threads: num(&f, "--threads", ec.threads).max(1),
        ctx_size: num(&f, "--ctx", ec.ctx_size),
        max_sessions: 1,
        kv_budget: u64::MAX,
        repack: f.contains_key("--repack"),
    };
    let map = open_model(model)?;
    let tok = load_tokenizer(&map, model)?;
    let prompt: Vec<u32> = match (f.get("--prompt-ids"), f.get("--prompt")) {
        (Some(ids), _) => ids
            .split(',')
            .map(|s| s.trim().parse().map_err(|_| usage(format!("--prompt-ids: {s:?} is not a token id"))))
            .collect::<Result<_>>()?,
        (None, Some(text)) => tok.encode(text, true, !f.contains_key("--no-special")),
        (None, None) => return Err(usage("generate needs --prompt TEXT (or --prompt-ids)".into())),
    };
    if prompt.is_empty() {
        return Err(usage("the prompt holds no tokens".into()));
    }
    let mut engine = Engine::new(cfg)?;
    let hp = engine.load(0, map)?.clone();
    if !engine.shard_info(0).is_some_and(|(_, b, e)| b == 0 && e == hp.n_layer) {
        bail!("{model} is a shard, not a whole model: generate runs whole models");
    }
    let mut stream = TextStream::new(&tok);
    let mut out = std::io::stdout().lock();
    let json = o.json;
    let mut text = String::new();
    let stats = generate(
        &mut engine,
        0,
        "generate",
        Some(&tok),
        &prompt,
        n,
        batch,
        &mut Sampler::new(sampling),
        !f.contains_key("--ignore-eos"),
        |id| {
            let piece = stream.push(id);
            text.push_str(&piece);
            if !json {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        },
    )?;
    let tail = stream.finish();
    text.push_str(&tail);
    let per_s = |count: usize, ms: f64| if ms > 0.0 { count as f64 * 1e3 / ms } else { 0.0 };
    if json {
        let mut v = json!({
            "prompt_tokens": prompt,
            "tokens": stats.generated,
            "text": text,
            "prefill_ms": stats.prefill_ms,
            "decode_ms": stats.decode_ms,
            "prefill_tps": per_s(prompt.len(), stats.prefill_ms),
            "decode_tps": per_s(stats.generated.len(), stats.decode_ms),
        });
        if f.contains_key("--logits") {
            // For checks against a reference: the logits after the prompt and after the last token.
            v["prefill_logits"] = json!(stats.prefill_logits);
            v["final_logits"] = json!(stats.final_logits);
        }
        println!("{v}");
    } else {
        let _ = writeln!(out, "{tail}");
        eprintln!(
            "prompt {} tokens in {:.1} ms ({:.1} tok/s); generated {} tokens in {:.1} ms ({:.1} tok/s); {} threads",
            prompt.len(),
            stats.prefill_ms,
            per_s(prompt.len(), stats.prefill_ms),
            stats.generated.len(),
            stats.decode_ms,
            per_s(stats.generated.len(), stats.decode_ms),
            engine.config().threads
        );
    }
    Ok(())
}

fn tokenize(o: &Opts, model: &str, rest: &[&str]) -> Result<()> {
    let map = open_model(model)?;
    let tok = load_tokenizer(&map, model)?;
    let print = |ids: Vec<u32>| println!("{}", serde_json::to_string(&ids).expect("ids"));
    match rest {
        [text] => print(tok.encode(text, false, false)),
        [] => {
            for line in std::io::stdin().lines() {
                let line = line?;
                let text: String = serde_json::from_str(&line).with_context(|| format!("not a JSON string: {line}"))?;
                print(tok.encode(&text, false, false));
            }
        }
        _ => return Err(usage("tokenize takes at most one TEXT".into())),
    }
    let _ = o;
    Ok(())
}

fn infer(o: &Opts, flags: &[&str]) -> Result<()> {
    use shardnet::coordinator::{ClusterConfig, Coordinator, Event, GenRequest};
    use std::io::Write;
    let f = flag_map(
        flags,
        &[
            "--bootstrap",
            "--cluster",
            "--prompt",
            "-n",
            "--temp",
            "--top-k",
            "--top-p",
            "--seed",
            "--batch",
            "--session",
            "--pace-ms",
            "--load-timeout",
        ],
        &["--no-special", "--ignore-eos"],
    );
    let sampling = sampling_flags(&f, "infer")?;
    let prompt = f.get("--prompt").ok_or_else(|| usage("infer needs --prompt TEXT".into()))?;
    let batch: usize = num(&f, "--batch", 128);
    if batch == 0 {
        return Err(usage("--batch must be at least 1".into()));
    }
    let session = f.get("--session").map(|s| s.to_string());
    if session.as_ref().is_some_and(|s| s.is_empty() || s.len() > 128) {
        return Err(usage("--session must be 1-128 bytes".into()));
    }
    let cfg = ClusterConfig {
        bootstrap: f.get("--bootstrap").map_or(o.node.clone(), |b| b.to_string()),
        cluster: f.get("--cluster").unwrap_or(&"shardnet").to_string(),
        batch,
        timeout: o.timeout,
        load_timeout: Duration::from_secs(num(&f, "--load-timeout", 600u64).max(1)),
        max_recoveries: 3,
    };
    let json_out = o.json;
    let mut progress_open = false;
    let events = move |ev: Event| {
        let mut err = std::io::stderr();
        if progress_open && !matches!(ev, Event::Loading { .. }) {
            let _ = writeln!(err);
            progress_open = false;
        }
        match ev {
            Event::Nodes(n) => {
                let list: Vec<String> = n.iter().map(|a| a.to_string()).collect();
                let _ = writeln!(err, "nodes: {}", list.join(", "));
            }
            Event::Plan(p) => {
                for (s, a) in p.iter().enumerate() {
                    let _ = writeln!(err, "shard {s} -> {a}");
                }
            }
            Event::Loading { shard, node, percent, rate, peers } => {
                let _ = write!(
                    err,
                    "\r  shard {shard} on {node}: downloading {percent:5.1}%  {:.1} MB/s  {peers} peers   ",
                    rate / 1e6
                );
                progress_open = true;
            }
            Event::Loaded { shard, node, source, ms } => {
                let _ = writeln!(err, "  shard {shard} loaded on {node} ({source}, {ms:.0} ms)");
            }
            Event::Recovering { shard, from, to, why } => {
                let _ = writeln!(
                    err,
                    "\nrecovering: shard {shard} moved from {from} to {to} ({why}); replaying the session"
                );
            }
        }
    };
    let mut c = Coordinator::discover(cfg, events)?;
    let req = GenRequest {
        prompt: c.tokenizer().encode(prompt, true, !f.contains_key("--no-special")),
        max_tokens: num(&f, "-n", 32),
        sampling,
        stop_at_eog: !f.contains_key("--ignore-eos"),
        session,
        pace: Duration::from_millis(num(&f, "--pace-ms", 0u64)),
    };
    let mut stdout = std::io::stdout();
    let summary = c.generate(&req, |_, text| {
        if !json_out {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
        true
    })?;
    if json_out {
        print_json(&summary.to_json());
        return Ok(());
    }
    println!();
    let v = summary.to_json();
    let hops: Vec<String> =
        summary.hop_compute_ms.iter().enumerate().map(|(s, ms)| format!("shard {s} {ms:.2} ms")).collect();
    eprintln!(
        "prompt {} tokens, generated {}; load {:.0} ms; time to first token {:.1} ms; prefill {:.1} tok/s; \
         decode {:.1} tok/s; compute per step: {}; chain overhead {:.0} us per hop; {} recoveries",
        summary.prompt_tokens.len(),
        summary.tokens.len(),
        summary.load_ms,
        summary.ttft_ms,
        v["prefill_tps"].as_f64().unwrap_or(0.0),
        v["decode_tps"].as_f64().unwrap_or(0.0),
        hops.join(", "),
        summary.overhead_per_hop_us,
        summary.recoveries
    );
    Ok(())
}

/// `shardctl serve`: flags into a `ServeConfig`, then the server runs until killed.
fn serve(o: &Opts, flags: &[&str]) -> Result<()> {
    use shardnet::coordinator::ClusterConfig;
    use shardnet::serve::{Defaults, ServeConfig, Server, http::Limits};
    let f = flag_map(
        flags,
        &[
            "--bootstrap",
            "--cluster",
            "--listen",
            "-n",
            "--temp",
            "--top-k",
            "--top-p",
            "--seed",
            "--repeat-penalty",
            "--repeat-last-n",
            "--presence-penalty",
            "--frequency-penalty",
            "--chat-template",
            "--model-name",
            "--max-connections",
            "--queue",
            "--max-body",
            "--batch",
            "--load-timeout",
        ],
        &[],
    );
    let d = Defaults::default();
    let defaults = Defaults {
        temperature: num(&f, "--temp", d.temperature),
        top_k: num(&f, "--top-k", d.top_k),
        top_p: num(&f, "--top-p", d.top_p),
        seed: f.get("--seed").map(|_| num(&f, "--seed", 0u64)),
        max_tokens: num(&f, "-n", d.max_tokens),
        presence_penalty: num(&f, "--presence-penalty", d.presence_penalty),
        frequency_penalty: num(&f, "--frequency-penalty", d.frequency_penalty),
        repeat_penalty: num(&f, "--repeat-penalty", d.repeat_penalty),
        repeat_last_n: num(&f, "--repeat-last-n", d.repeat_last_n),
    };
    if !(defaults.temperature >= 0.0 && defaults.temperature <= 2.0) || !(defaults.top_p > 0.0 && defaults.top_p <= 1.0) {
        return Err(usage("serve: --temp must be 0-2 and --top-p in (0, 1]".into()));
    }
    if defaults.max_tokens == 0 {
        return Err(usage("serve: -n must be at least 1".into()));
    }
    let chat_template = match f.get("--chat-template") {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading --chat-template {path}"))?),
        None => None,
    };
    let listen = f.get("--listen").unwrap_or(&"127.0.0.1:8080");
    let sc = ServeConfig::default();
    let cfg = ServeConfig {
        cluster: ClusterConfig {
            bootstrap: f.get("--bootstrap").map_or(o.node.clone(), |b| b.to_string()),
            cluster: f.get("--cluster").unwrap_or(&"shardnet").to_string(),
            batch: num(&f, "--batch", 128usize).max(1),
            timeout: o.timeout,
            load_timeout: Duration::from_secs(num(&f, "--load-timeout", 600u64).max(1)),
            max_recoveries: 3,
        },
        listen: listen.parse().map_err(|_| usage(format!("serve: --listen {listen:?} is not IP:PORT")))?,
        defaults,
        model_name: f.get("--model-name").map(|s| s.to_string()),
        chat_template,
        max_connections: num(&f, "--max-connections", sc.max_connections).max(1),
        queue: num(&f, "--queue", sc.queue).max(1),
        limits: Limits { max_body: num(&f, "--max-body", sc.limits.max_body), ..sc.limits },
    };
    shardnet::log::set_level(shardnet::log::Level::Info);
    let server = Server::bind(cfg)?;
    println!("shardctl serve: listening on http://{}", server.local_addr());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.run()
}
