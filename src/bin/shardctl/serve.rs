//! `serve`: the OpenAI-compatible HTTP endpoint over a cluster's chain (`shardnet::serve`).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::Opts;
use crate::args::{flag_map, num, usage};

/// `shardctl serve`: flags into a `ServeConfig`, then the server runs until killed.
pub fn serve(o: &Opts, flags: &[&str]) -> Result<()> {
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
