//! `serve`: the OpenAI-compatible HTTP endpoint over a cluster's chain (`shardnet::serve`).

use anyhow::{Context, Result};

use shardnet::serve::guard::{API_KEY_ENV, Access, ApiKey};
use shardnet::serve::{Defaults, MAX_PARALLEL, ServeConfig, Server, http::Limits};

use crate::Opts;
use crate::args::{Flags, cluster_config};
use crate::generate::{SAMPLING_FLAGS, sampling_flags};

/// Flags into a `ServeConfig`, then the server runs until killed. It prints
/// `shardctl serve: listening on http://ADDR` on stdout once bound.
pub fn serve(o: &Opts, flags: &[&str]) -> Result<()> {
    // The repeatable flags, taken out before the others are parsed (where a repeat is an error).
    let (cors_origins, flags) = take_repeated(flags, "--cors-origin")?;
    let (allowed_hosts, flags) = take_repeated(&flags, "--allowed-host")?;
    let flags = &flags[..];
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
                "--parallel",
                "--max-requests-per-client",
                "--max-renders",
                "--max-body",
                "--batch",
                "--load-timeout",
                "--model",
                "--api-key-file",
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
    let cluster = cluster_config(o, &f, f.num("--batch", 128usize).max(1))?;
    for o in &cors_origins {
        let ok = (o.starts_with("http://") || o.starts_with("https://"))
            && !o.ends_with('/')
            && o.split("//").nth(1).is_some_and(|h| !h.is_empty() && !h.contains('/'));
        if !ok {
            return Err(f.usage(format!(
                "--cors-origin {o:?} is not an origin (scheme://host[:port], no path; `*` is not accepted)"
            )));
        }
    }
    let key_file = f
        .get("--api-key-file")
        .map(str::to_string)
        .or_else(|| std::env::var(API_KEY_ENV).ok().filter(|v| !v.is_empty()));
    let api_key = match key_file {
        Some(path) => Some(ApiKey::load(std::path::Path::new(&path))?),
        None => None,
    };
    let sc = ServeConfig::default();
    let cfg = ServeConfig {
        cluster,
        listen: listen.parse().map_err(|_| f.usage(format!("--listen {listen:?} is not IP:PORT")))?,
        defaults,
        model_name: f.get("--model-name").map(str::to_string),
        chat_template,
        max_connections: f.num("--max-connections", sc.max_connections).max(1),
        parallel: match f.num("--parallel", sc.parallel) {
            n @ 1..=MAX_PARALLEL => n,
            n => return Err(f.usage(format!("--parallel {n}: give 1 to {MAX_PARALLEL}"))),
        },
        queue: f.num("--queue", sc.queue).max(1),
        max_requests_per_client: f.has("--max-requests-per-client").then(|| f.num("--max-requests-per-client", 0)),
        max_renders: f.num("--max-renders", sc.max_renders).max(1),
        limits: Limits { max_body: f.num("--max-body", sc.limits.max_body), ..sc.limits },
        access: Access { cors_origins, allowed_hosts, api_key },
    };
    if cfg.access.api_key.is_none() && !cfg.listen.ip().is_loopback() {
        shardnet::warn!(
            "serving on {} without --api-key-file: anyone who can reach this address can use the cluster",
            cfg.listen
        );
    }
    shardnet::log::set_level(shardnet::log::Level::Info);
    let server = Server::bind(cfg)?;
    println!("shardctl serve: listening on http://{}", server.local_addr());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.run()
}

/// Every `name VALUE` pair taken out of `flags`: the values, and the flags left.
fn take_repeated<'a>(flags: &[&'a str], name: &str) -> Result<(Vec<String>, Vec<&'a str>)> {
    let (mut values, mut rest) = (Vec::new(), Vec::new());
    let mut it = flags.iter();
    while let Some(&f) = it.next() {
        if f == name {
            match it.next() {
                Some(v) => values.push(v.to_string()),
                None => return Err(crate::args::usage(format!("serve: {name} needs a value"))),
            }
        } else {
            rest.push(f);
        }
    }
    Ok((values, rest))
}
