//! `shardctl`: talks to a node, and makes and reads `.torrent` files. See `--help`.
//!
//! One file per command group: `node` (requests to a running node), `torrent`
//! (.torrent files and `fetch`), `model` (GGUF tools), `generate` (text
//! generation in one process or across a cluster), `chat` (a conversation
//! through the model's chat template); `args` holds the flag parsing they share.

mod args;
mod chat;
mod generate;
mod model;
mod node;
mod serve;
mod torrent;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use shardnet::client::Client;

use args::{no_more, positional, usage};

const USAGE: &str = "\
shardctl: generate text with a model split across shardnet nodes (or whole, in
one process); talk to a node; make shards, GGUF and .torrent files

USAGE: shardctl [--node ADDR] [--json] [--timeout SECS] COMMAND [ARGS]

GENERATION:
  generate MODEL.gguf --prompt TEXT [FLAGS] [SAMPLING]
                                run a whole model in this process and stream
                                the text
      --prompt-ids ID,ID,...    the prompt as token ids (instead of --prompt)
      --threads N               compute threads [default: cores]
      --ctx N                   tokens of context [default: 2048]
      --batch N                 prompt tokens per forward pass [default: 512]
      --no-special              read <|...|> in the prompt as plain text
                                [default: control tokens are parsed]
      --ignore-eos              go on past end-of-generation tokens
      --chat                    the prompt is a user message, put through the
                                model's chat template (tokenizer.chat_template)
      --system TEXT             with --chat, a system message first [default:
                                none; the template may add its own]
      --chat-template FILE      with --chat, this Jinja template instead of the
                                model's [default: the model's]
      --logits                  with --json, also the logits (for checks)
      --repack                  copy Q4_0-style weights into ggml's faster
                                layout [default: compute from the mapped file]
  infer --prompt TEXT [FLAGS] [SAMPLING]
                                generate across the cluster: find its nodes,
                                have one node per shard load it (downloading
                                through the swarm), stream the text; a failed
                                node's shard moves to another node
      --bootstrap ADDR          a node of the cluster [default: --node]
      --cluster NAME            [default: shardnet]
      --batch N                 prompt tokens per step [default: 128]
      --session ID              session id on the nodes [default: random]
      --pace-ms MS              pause between tokens (demos) [default: 0]
      --load-timeout SECS       bound on each shard's load [default: 600]
      --model HASH              pin the model: the SHA-256 of its manifest.json
                                (as split prints it); shards load by its info
                                hashes only [default: no pin]
      --no-special, --ignore-eos, --chat, --system, --chat-template
                                as for generate
  chat [--model FILE] [FLAGS] [SAMPLING]
                                a conversation: each line on stdin is a user
                                message, the reply streams to stdout (one JSON
                                line per reply with --json); with --model a
                                whole model in this process, else the cluster
                                as for infer (--bootstrap, --cluster, --batch,
                                --load-timeout); stops at the model's end of
                                turn; -n is per reply [default: 512]
      as for generate: --system, --chat-template; with --model also
      --threads, --ctx, --repack
  serve [FLAGS] [SAMPLING]      an OpenAI-compatible HTTP/1.1 endpoint over the
                                cluster's chain: /v1/chat/completions,
                                /v1/completions, /v1/models, /health,
                                /metrics, and a chat page at /; SAMPLING gives
                                what a request leaves out [default seed:
                                random per request]
      --listen IP:PORT          [default: 127.0.0.1:8080]
      --bootstrap, --cluster, --batch, --load-timeout, --model   as for infer
      --chat-template FILE      a Jinja chat template [default: the model's
                                tokenizer.chat_template]
      --model-name NAME         the id /v1/models lists and requests name
                                [default: the model's general.name]
      --max-connections N       open connections; at the limit the longest
                                idle one is closed [default: 256]
      --parallel N              generations run at once, each a session on the
                                nodes (keep it within the nodes'
                                --max-sessions-per-client) [default: 4, max 256]
      --queue N                 requests waiting for a free slot; over it: 503
                                [default: 16]
      --max-requests-per-client N
                                completions one client address (IPv6: /64)
                                has being prepared, running or waiting; over
                                it: 429; 0: no bound [default: none when
                                listening on loopback, else as --parallel]
      --max-renders N           requests prepared at once (JSON parsed, chat
                                template rendered, prompt tokenized); others
                                wait, round-robin across client addresses,
                                503 after 30 s [default: cores, at most 4]
      --max-body BYTES          request body bound; over it: 413
                                [default: 1048576]
      --api-key-file PATH       /v1/* and /metrics need `Authorization: Bearer
                                KEY` (the file's contents); else 401
                                [default: $SHARDNET_API_KEY_FILE, else no key]
      --cors-origin ORIGIN      a web origin (http://host:port) whose pages may
                                call the API; repeatable [default: none, only
                                the chat page's own origin]
      --allowed-host NAME       a name accepted in the Host header besides IP
                                literals and localhost; repeatable (others:
                                403, against DNS rebinding)

SAMPLING (generate, infer, chat, serve; serve's -n [default: 512]):
  -n N                          tokens to generate at most [default: 32]
  --temp T                      temperature; 0 is greedy [default: 0]
  --top-k K                     keep the K most likely tokens; 0: all
                                [default: 40]
  --top-p P                     keep the most likely tokens up to probability
                                P [default: 0.95]
  --seed S                      random seed [default: 24301]
  --repeat-penalty P            divide a positive logit (multiply a negative
                                one) by P [default: 1, off] for each token
                                among the last N (--repeat-last-n; llama.cpp's)
  --repeat-last-n N             tokens --repeat-penalty looks back over, the
                                prompt's too; 0: off, -1: all [default: 64]
  --presence-penalty P          subtract P from each token already generated
                                (OpenAI's; -2 to 2) [default: 0]
  --frequency-penalty P         subtract P per time a token was generated
                                (OpenAI's; -2 to 2) [default: 0]

NODE:
  list                          GGUF files the node seeds (LIST_FILES)
  status                        the node's state (STATUS)
  load N [--info-hash HASH] [--filename NAME] [--peer IP:PORT]... [--no-wait]
                                make the node load shard N (LOAD_SHARD),
                                downloading it if it lacks it [default: info
                                hash from manifest.json, else from the shard's
                                holders in the DHT; peers from the DHT; wait]
  send JSON                     send one raw request object, print the response
  peers KEY | --shard N | --cluster
                                peers the DHT knows for an info hash (or any
                                key), a shard's name, or the cluster (FIND_PEERS)

MODELS:
  split MODEL.gguf --shards N --out DIR
                                cut a model into layer-range shards, with
                                .torrent files and manifest.json
  demo-model --out FILE [FLAGS] write a small deterministic LLaMA model
      --layers N [default: 8]  --embd N [default: 128]  --heads N [default: 4]
      --kv-heads N [default: 2]  --ffn N [default: 384]  --vocab N [default: 512]
      --context N [default: 512]  --type f32|f16|q8_0|q4_0 [default: f32]
      --seed N [default: 42]  --tied (output shares the token embedding)
  inspect FILE.gguf             print a GGUF file's metadata and tensors
  tokenize MODEL.gguf [TEXT]    token ids of TEXT, or of each JSON string line
                                on stdin (one JSON array per line)

TORRENTS:
  fetch TORRENT|MAGNET [--peer IP:PORT...] --out DIR [--listen IP:PORT]
                                download a torrent from the given peers and a
                                magnet's x.pe hints (a node of its own,
                                seeding while it runs; --listen [default:
                                127.0.0.1:0])
  torrent create FILE [--out PATH] [--piece-length BYTES]
                                hash FILE and write FILE.torrent (or PATH)
                                [default: about 1,024 pieces of 256 KiB-4 MiB]
  torrent info FILE.torrent     print a .torrent's contents
  torrent magnet FILE.torrent   print its magnet link

FLAGS:
  --node ADDR      node to talk to [default: 127.0.0.1:51820]: HOST:PORT,
                   [V6]:PORT, /ip4/A.B.C.D/tcp/PORT or /ip6/ADDR/tcp/PORT
  --json           print the raw JSON result (for scripts)
  --timeout SECS   bound on connecting and on each whole response (a node that sends an
                   answer too slowly fails by then, as a silent one does) [default: 30]
  --cluster-key-file PATH
                   prove this cluster key to every node (HMAC-SHA-256
                   handshake, every frame MACed) [default: the file named by
                   SHARDNET_CLUSTER_KEY_FILE; none: no key]
  -h, --help       print this help

Exit status: 0 on success, 1 when the node answers an error or cannot be
reached (or a file cannot be read), 2 for a usage error.
";

struct Opts {
    key_file: Option<PathBuf>,
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
    let key_file = opts.key_file.clone().or_else(shardnet::config::key_file_from_env);
    if let Some(path) = key_file {
        match shardnet::protocol::auth::ClusterKey::load(&path) {
            Ok(loaded) => {
                if let Some(w) = loaded.warning {
                    eprintln!("shardctl: warning: {w}");
                }
                shardnet::client::set_default_key(Some(loaded.key));
            }
            Err(e) => {
                eprintln!("shardctl: {e}");
                return ExitCode::from(2);
            }
        }
    }
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Result<Option<Opts>, String> {
    let mut o = Opts {
        key_file: None,
        node: "127.0.0.1:51820".into(),
        json: false,
        timeout: Duration::from_secs(30),
        rest: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--json" => o.json = true,
            "--node" => {
                let v = it.next().ok_or("--node needs a value")?;
                shardnet::config::parse_peer_addr(v).map_err(|e| format!("--node: {e}"))?;
                o.node = v.clone();
            }
            "--cluster-key-file" => {
                o.key_file = Some(PathBuf::from(it.next().ok_or("--cluster-key-file needs a value")?));
            }
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
    let args: Vec<&str> = o.rest.iter().map(String::as_str).collect();
    let (cmd, rest) = args.split_first().expect("parse checks that a command is given");
    match *cmd {
        "list" => {
            no_more("list", rest);
            node::list(o)
        }
        "status" => {
            no_more("status", rest);
            node::status(o)
        }
        "load" => {
            let (n, flags) = positional("load", "the shard id N", rest);
            node::load(o, n, flags)
        }
        "send" => {
            let (text, extra) = positional("send", "the JSON request", rest);
            no_more("send", extra);
            node::send(o, text)
        }
        "peers" => node::peers_command(o, rest),
        "split" => {
            let (model, flags) = positional("split", "MODEL.gguf", rest);
            model::split(o, model, flags)
        }
        "demo-model" => model::demo_model(o, rest),
        "inspect" => {
            let (file, extra) = positional("inspect", "FILE.gguf", rest);
            no_more("inspect", extra);
            model::inspect(o, file)
        }
        "tokenize" => {
            let (model, text) = positional("tokenize", "MODEL.gguf", rest);
            model::tokenize(o, model, text)
        }
        "generate" => {
            let (model, flags) = positional("generate", "MODEL.gguf", rest);
            generate::generate(o, model, flags)
        }
        "infer" => generate::infer(o, rest),
        "chat" => chat::chat(o, rest),
        "serve" => serve::serve(o, rest),
        "fetch" => {
            let (target, flags) = positional("fetch", "TORRENT or MAGNET", rest);
            torrent::fetch(o, target, flags)
        }
        "torrent" => match rest {
            ["create", rest @ ..] => {
                let (file, flags) = positional("torrent create", "FILE", rest);
                torrent::torrent_create(o, file, flags)
            }
            ["info", rest @ ..] => {
                let (file, extra) = positional("torrent info", "FILE.torrent", rest);
                no_more("torrent info", extra);
                torrent::torrent_info(o, file)
            }
            ["magnet", rest @ ..] => {
                let (file, extra) = positional("torrent magnet", "FILE.torrent", rest);
                no_more("torrent magnet", extra);
                println!("{}", torrent::read_torrent(file)?.magnet());
                Ok(())
            }
            [] => Err(usage("torrent: missing the subcommand: create, info or magnet (see --help)".into())),
            [other, ..] => {
                Err(usage(format!("torrent: unknown subcommand {other:?}: create, info or magnet (see --help)")))
            }
        },
        other => Err(usage(format!("unknown command {other:?} (see --help)"))),
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
