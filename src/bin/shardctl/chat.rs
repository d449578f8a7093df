//! `shardctl chat`: a conversation on stdin and stdout, through the model's chat template, with
//! a whole model in this process (`--model FILE`) or across a cluster (the coordinator).

use std::cell::Cell;
use std::io::{BufRead, IsTerminal, Write};
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use shardnet::chat::{ChatTemplate, Message};
use shardnet::coordinator::{Coordinator, GenRequest};
use shardnet::engine::Engine;
use shardnet::engine::generate::{TextStream, generate};
use shardnet::engine::sampler::{Sampler, SamplerConfig};
use shardnet::engine::tokenizer::Tokenizer;

use crate::Opts;
use crate::args::{Flags, cluster_config, engine_config};
use crate::generate::{SAMPLING_FLAGS, chat_template, finish_reason, print_text, progress_events, sampling_flags};
use crate::model::{load_tokenizer, open_model};

/// Tokens per reply at most, unless `-n` says otherwise.
const DEFAULT_REPLY_TOKENS: usize = 512;

/// One reply of the model.
struct Reply {
    text: String,
    prompt_tokens: usize,
    tokens: Vec<u32>,
}

/// Where replies come from.
enum Backend<'e> {
    /// A whole model in this process.
    Local { engine: Engine, tok: Tokenizer, ctx: usize, batch: usize },
    /// A cluster, through the coordinator (which re-places shards that moved between turns).
    Cluster(Coordinator<'e>),
}

impl Backend<'_> {
    fn tokenizer(&self) -> &Tokenizer {
        match self {
            Backend::Local { tok, .. } => tok,
            Backend::Cluster(c) => c.tokenizer(),
        }
    }

    /// Generates the reply to `prompt` (the rendered conversation), streaming its text to stdout
    /// unless `json_out`.
    fn reply(&mut self, prompt: String, n: usize, sampling: &SamplerConfig, json_out: bool) -> Result<Reply> {
        match self {
            Backend::Local { engine, tok, ctx, batch } => {
                let ids = tok.encode(&prompt, true, true);
                if ids.len() + n > *ctx {
                    bail!(
                        "the conversation ({} tokens) and a reply of up to {n} do not fit the context of {ctx} \
                         tokens (--ctx, -n)",
                        ids.len()
                    );
                }
                let mut stream = TextStream::new(tok);
                let mut text = String::new();
                let mut out = std::io::stdout();
                let stats = generate(
                    engine,
                    0,
                    "chat",
                    Some(tok),
                    &ids,
                    n,
                    *batch,
                    &mut Sampler::new(sampling.clone()),
                    true,
                    |id| {
                        let piece = stream.push(id);
                        if !json_out {
                            let _ = out.write_all(piece.as_bytes());
                            let _ = out.flush();
                        }
                        text.push_str(&piece);
                    },
                )?;
                let tail = stream.finish();
                if !json_out {
                    let _ = out.write_all(tail.as_bytes());
                }
                text.push_str(&tail);
                Ok(Reply { text, prompt_tokens: ids.len(), tokens: stats.generated })
            }
            Backend::Cluster(c) => {
                let ids = c.tokenizer().encode(&prompt, true, true);
                let req =
                    GenRequest { prompt: ids, max_tokens: n, sampling: sampling.clone(), ..GenRequest::default() };
                let s = c.generate(&req, print_text(json_out))?;
                Ok(Reply { text: s.text, prompt_tokens: s.prompt_tokens.len(), tokens: s.tokens })
            }
        }
    }
}

pub fn chat(o: &Opts, flags: &[&str]) -> Result<()> {
    let f = Flags::parse(
        "chat",
        flags,
        &[
            &SAMPLING_FLAGS[..],
            &[
                "--model",
                "--bootstrap",
                "--cluster",
                "--system",
                "--chat-template",
                "--threads",
                "--ctx",
                "--batch",
                "--load-timeout",
            ],
        ]
        .concat(),
        &["--repack"],
    );
    let sampling = sampling_flags(&f)?;
    let n: usize = f.num("-n", DEFAULT_REPLY_TOKENS);
    if f.has("--model") {
        for flag in ["--bootstrap", "--cluster", "--load-timeout"] {
            if f.has(flag) {
                return Err(f.usage(format!("--model and {flag} exclude each other")));
            }
        }
    } else {
        for flag in ["--threads", "--ctx", "--repack"] {
            if f.has(flag) {
                return Err(f.usage(format!("{flag} needs --model (nodes set their own)")));
            }
        }
    }
    let batch: usize = f.num("--batch", 128);
    if batch == 0 {
        return Err(f.usage("--batch must be at least 1".into()));
    }
    // Progress (loads, downloads) is shown for the first turn only.
    let show = Rc::new(Cell::new(true));
    let (mut backend, template) = match f.get("--model") {
        Some(model) => {
            let cfg = engine_config(&f);
            let map = open_model(model)?;
            let tok = load_tokenizer(&map, model)?;
            let g = shardnet::gguf::reader::Gguf::parse(&map).map_err(|e| anyhow!("{model}: {e}"))?;
            let template =
                chat_template(&f, &tok, || ChatTemplate::from_gguf(&g, &tok).map_err(|e| anyhow!("{model}: {e}")))?;
            let mut engine = Engine::new(cfg)?;
            let hp = engine.load(0, map.clone())?.clone();
            if !engine.shard_info(0).is_some_and(|(_, b, e)| b == 0 && e == hp.n_layer) {
                bail!("{model} is a shard, not a whole model: chat --model runs whole models");
            }
            let ctx = engine.config().ctx_size.min(hp.n_ctx_train) as usize;
            (Backend::Local { engine, tok, ctx, batch }, template)
        }
        None => {
            let cfg = cluster_config(o, &f, batch)?;
            let c = Coordinator::discover(cfg, progress_events(show.clone()))?;
            let template = chat_template(&f, c.tokenizer(), || {
                c.chat_template().map_err(|e| anyhow!("the cluster's model: {e}"))
            })?;
            (Backend::Cluster(c), template)
        }
    };

    let mut messages: Vec<Message> = f.get("--system").map(|s| Message::new("system", s)).into_iter().collect();
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut lines = stdin.lock();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if lines.read_line(&mut line).context("reading stdin")? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        messages.push(Message::new("user", text));
        let prompt = template.prompt(&messages, true, backend.tokenizer())?;
        let reply = backend.reply(prompt, n, &sampling, o.json)?;
        show.set(false);
        let reason = finish_reason(backend.tokenizer(), &reply.tokens);
        if o.json {
            println!(
                "{}",
                json!({
                    "role": "assistant",
                    "content": reply.text,
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.tokens.len(),
                    "finish_reason": reason,
                })
            );
        } else {
            println!();
        }
        messages.push(Message::new("assistant", &reply.text));
    }
    Ok(())
}
