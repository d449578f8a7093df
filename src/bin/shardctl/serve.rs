//! `serve`: the OpenAI-compatible HTTP endpoint over a cluster's chain (`shardnet::serve`).

use std::time::Duration;

use anyhow::{Context, Result};

use shardnet::coordinator::ClusterConfig;
use shardnet::serve::{Defaults, ServeConfig, Server, http::Limits};

use crate::Opts;
use crate::args::Flags;
use crate::generate::{SAMPLING_FLAGS, sampling_flags};

/// Flags into a `ServeConfig`, then the server runs until killed. It prints
/// `shardctl serve: listening on http://ADDR` on stdout once bound.
pub fn serve(o: &Opts, flags: &[&str]) -> Result<()> {
    let f = Flags::parse(
        "serve",
        flags,
        &[
            &SAMPLING_FLAGS[..],
            &[
                "--bootstrap",
                "--cluster",
                "--listen",
                "--chat-template",
                "--model-name",
                "--max-connections",
                "--queue",
                "--max-body",
                "--batch",
                "--load-timeout",
                "--model",
            ],
        ]
        .concat(),
        &[],
    );
    let defaults = Defaults {
        sampling: sampling_flags(&f)?,
        random_seed: !f.has("--seed"),
        max_tokens: f.num("-n", Defaults::default().max_tokens),
    };
    if defaults.max_tokens == 0 {
        return Err(f.usage("-n must be at least 1".into()));
    }
    let chat_template = match f.get("--chat-template") {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("reading --chat-template {path}"))?),
        None => None,
    };
    let listen = f.get("--listen").unwrap_or("127.0.0.1:8080");
    let bootstrap = match f.get("--bootstrap") {
        None => o.node.clone(),
        Some(b) => {
            shardnet::config::parse_peer_addr(b).map_err(|e| f.usage(format!("--bootstrap: {e}")))?;
            b.to_string()
        }
    };
    let sc = ServeConfig::default();
    let cfg = ServeConfig {
        cluster: ClusterConfig {
            bootstrap,
            cluster: f.get("--cluster").unwrap_or("shardnet").to_string(),
            batch: f.num("--batch", 128usize).max(1),
            timeout: o.timeout,
            load_timeout: Duration::from_secs(f.num("--load-timeout", 600u64).max(1)),
            max_recoveries: 3,
            model_pin: match f.get("--model") {
                Some(v) => Some(shardnet::config::parse_model_hash(v).map_err(|e| f.usage(format!("--model: {e}")))?),
                None => None,
            },
        },
        listen: listen.parse().map_err(|_| f.usage(format!("--listen {listen:?} is not IP:PORT")))?,
        defaults,
        model_name: f.get("--model-name").map(str::to_string),
        chat_template,
        max_connections: f.num("--max-connections", sc.max_connections).max(1),
        queue: f.num("--queue", sc.queue).max(1),
        limits: Limits { max_body: f.num("--max-body", sc.limits.max_body), ..sc.limits },
    };
    shardnet::log::set_level(shardnet::log::Level::Info);
    let server = Server::bind(cfg)?;
    println!("shardctl serve: listening on http://{}", server.local_addr());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.run()
}
