//! Flag parsing shared by the commands; usage errors exit with status 2.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use shardnet::coordinator::ClusterConfig;
use shardnet::engine::EngineConfig;

use crate::Opts;

/// Exit status 2 for usage errors found after parsing.
pub fn usage(msg: String) -> anyhow::Error {
    eprintln!("shardctl: {msg}");
    std::process::exit(2);
}

/// The first of `rest`, a positional argument (`what`, named in the error), and what follows it.
/// A flag in its place (`generate --prompt ...`) counts as missing.
pub fn positional<'a, 'b>(cmd: &str, what: &str, rest: &'b [&'a str]) -> (&'a str, &'b [&'a str]) {
    match rest.split_first() {
        Some((first, tail)) if !first.starts_with('-') || first.len() == 1 => (first, tail),
        _ => {
            usage(format!("{cmd}: missing {what} (see --help)"));
            unreachable!()
        }
    }
}

/// Refuses arguments after a command's last one.
pub fn no_more(cmd: &str, rest: &[&str]) {
    if let Some(extra) = rest.first() {
        usage(format!("{cmd}: unexpected argument {extra:?} (see --help)"));
    }
}

/// A command's `--flag value` pairs and bare switches, parsed once; every
/// error names the command and the flag, and exits with status 2.
pub struct Flags<'a> {
    cmd: &'a str,
    map: HashMap<&'a str, &'a str>,
}

impl<'a> Flags<'a> {
    /// `valued` flags take the next argument as their value; `switches` take none. Anything
    /// else (an unknown flag, a stray word, a repeated flag) is a usage error.
    pub fn parse(cmd: &'a str, flags: &[&'a str], valued: &[&str], switches: &[&str]) -> Flags<'a> {
        let mut map = HashMap::new();
        let mut it = flags.iter();
        while let Some(&f) = it.next() {
            let value = if switches.contains(&f) {
                ""
            } else if valued.contains(&f) {
                match it.next() {
                    Some(v) => v,
                    None => {
                        usage(format!("{cmd}: {f} needs a value"));
                        unreachable!()
                    }
                }
            } else if f.starts_with('-') {
                usage(format!("{cmd}: unknown flag {f} (see --help)"));
                unreachable!()
            } else {
                usage(format!("{cmd}: unexpected argument {f:?} (see --help)"));
                unreachable!()
            };
            if map.insert(f, value).is_some() {
                usage(format!("{cmd}: {f} given twice"));
            }
        }
        Flags { cmd, map }
    }

    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.map.get(name).copied()
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The flag's value parsed as a number, or `default` when it is absent.
    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.map.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                self.usage(format!("{name} {v:?} is not a number"));
                unreachable!()
            }),
        }
    }

    /// A usage error of this command: printed as `shardctl: CMD: MSG`, exit status 2.
    pub fn usage(&self, msg: String) -> anyhow::Error {
        usage(format!("{}: {msg}", self.cmd))
    }
}

/// The coordinator's settings from the flags `infer`, `chat` and `serve` share: `--bootstrap`
/// (else the global `--node`), `--cluster`, `--load-timeout` (seconds), `--model` (the pinned
/// manifest's SHA-256), with the global `--timeout`; `batch` prompt tokens per step. A bad value
/// is a usage error naming its flag.
pub fn cluster_config(o: &Opts, f: &Flags, batch: usize) -> Result<ClusterConfig> {
    let d = ClusterConfig::default();
    Ok(ClusterConfig {
        bootstrap: match f.get("--bootstrap") {
            None => o.node.clone(),
            Some(b) => {
                shardnet::config::parse_peer_addr(b).map_err(|e| f.usage(format!("--bootstrap: {e}")))?;
                b.to_string()
            }
        },
        cluster: f.get("--cluster").unwrap_or(&d.cluster).to_string(),
        batch,
        timeout: o.timeout,
        load_timeout: Duration::from_secs(f.num("--load-timeout", d.load_timeout.as_secs()).max(1)),
        max_recoveries: d.max_recoveries,
        model_pin: match f.get("--model") {
            Some(v) => Some(shardnet::config::parse_model_hash(v).map_err(|e| f.usage(format!("--model: {e}")))?),
            None => None,
        },
    })
}

/// The engine of a whole model in this process (`generate`, and `chat` on a model file):
/// `--threads` (at least 1), `--ctx` (tokens), `--repack`; one session, no KV budget.
pub fn engine_config(f: &Flags) -> EngineConfig {
    let d = EngineConfig::default();
    EngineConfig {
        threads: f.num("--threads", d.threads).max(1),
        ctx_size: f.num("--ctx", d.ctx_size),
        max_sessions: 1,
        max_sessions_per_client: 1,
        kv_budget: u64::MAX,
        repack: f.has("--repack"),
    }
}
