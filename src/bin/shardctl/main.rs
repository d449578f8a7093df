//! `shardctl`: talks to a node, and makes and reads `.torrent` files. See `--help`.
//!
//! One file per command group: `node` (requests to a running node), `torrent`
//! (.torrent files and `fetch`), `model` (GGUF tools), `generate` (text
//! generation in one process or across a cluster); `args` holds the flag parsing
//! they share.

mod args;
mod generate;
mod model;
mod node;
mod torrent;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use shardnet::client::Client;

use args::usage;

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
  tokenize MODEL.gguf [TEXT]    token ids of TEXT, or of each JSON string line
                                on stdin (one JSON array per line)
  peers KEY | --shard N | --cluster
                                peers the DHT knows for an info hash (or any
                                key), a shard's name, or the cluster (FIND_PEERS)
  fetch TORRENT|MAGNET [--peer IP:PORT...] --out DIR [--listen IP:PORT]
                                download a torrent from the given peers and a
                                magnet's x.pe hints (a node of its own,
                                seeding while it runs)
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

fn run(o: &Opts) -> Result<()> {
    let cmd: Vec<&str> = o.rest.iter().map(String::as_str).collect();
    match cmd.as_slice() {
        ["list"] => node::list(o),
        ["status"] => node::status(o),
        ["load", n, flags @ ..] => node::load(o, n, flags),
        ["send", json] => node::send(o, json),
        ["split", model, flags @ ..] => model::split(o, model, flags),
        ["demo-model", flags @ ..] => model::demo_model(o, flags),
        ["inspect", file] => model::inspect(o, file),
        ["generate", model, flags @ ..] => generate::generate(o, model, flags),
        ["infer", flags @ ..] => generate::infer(o, flags),
        ["tokenize", model, rest @ ..] => model::tokenize(o, model, rest),
        ["fetch", target, flags @ ..] => torrent::fetch(o, target, flags),
        ["peers", "--shard", n] => node::peers(
            o,
            json!({"shard_id": n.parse::<u64>().map_err(|_| usage(format!("peers: {n:?} is not a shard id")))?}),
        ),
        ["peers", "--cluster"] => node::peers(o, json!({"cluster": true})),
        ["peers", key] => node::peers(o, json!({"key": key})),
        ["torrent", "create", file, flags @ ..] => torrent::torrent_create(o, file, flags),
        ["torrent", "info", file] => torrent::torrent_info(o, file),
        ["torrent", "magnet", file] => {
            println!("{}", torrent::read_torrent(file)?.magnet());
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
