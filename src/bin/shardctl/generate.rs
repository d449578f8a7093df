//! Text generation: `generate` (a whole model in this process) and `infer`
//! (across a cluster, through the coordinator).

use std::cell::Cell;
use std::io::Write;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use shardnet::chat::{ChatTemplate, Message};
use shardnet::coordinator::{Coordinator, Event, GenRequest};
use shardnet::engine::sampler::SamplerConfig;
use shardnet::engine::tokenizer::Tokenizer;

use crate::args::{Flags, cluster_config, engine_config};
use crate::model::{load_tokenizer, open_model};
use crate::{Opts, print_json};

/// The sampling flags shared by `generate`, `infer` and `chat`.
pub const SAMPLING_FLAGS: [&str; 9] = [
    "-n",
    "--temp",
    "--top-k",
    "--top-p",
    "--seed",
    "--repeat-penalty",
    "--repeat-last-n",
    "--presence-penalty",
    "--frequency-penalty",
];

/// The sampling flags, checked; an out-of-range value is a usage error naming its flag.
pub fn sampling_flags(f: &Flags) -> Result<SamplerConfig> {
    let d = SamplerConfig::default();
    let sampling = SamplerConfig {
        temperature: f.num("--temp", d.temperature),
        top_k: f.num("--top-k", d.top_k),
        top_p: f.num("--top-p", d.top_p),
        seed: f.num("--seed", d.seed),
        repeat_penalty: f.num("--repeat-penalty", d.repeat_penalty),
        repeat_last_n: f.num("--repeat-last-n", d.repeat_last_n),
        presence_penalty: f.num("--presence-penalty", d.presence_penalty),
        frequency_penalty: f.num("--frequency-penalty", d.frequency_penalty),
        logit_bias: Vec::new(),
    };
    sampling.validate().map_err(|e| {
        let flag = match e.param {
            "temperature" => "--temp".to_string(),
            other => format!("--{}", other.replace('_', "-")),
        };
        f.usage(format!("{flag} {}", e.reason))
    })?;
    Ok(sampling)
}

/// `--chat`, `--system TEXT` and `--chat-template FILE`, checked against the other prompt flags.
fn chat_flags(f: &Flags) -> Result<bool> {
    let chat = f.has("--chat");
    if !chat {
        for flag in ["--system", "--chat-template"] {
            if f.has(flag) {
                return Err(f.usage(format!("{flag} needs --chat")));
            }
        }
    }
    for flag in ["--prompt-ids", "--no-special"] {
        if chat && f.has(flag) {
            return Err(f.usage(format!("--chat and {flag} exclude each other")));
        }
    }
    Ok(chat)
}

/// The chat template to use: `--chat-template FILE` if given, else the model's own (`model`
/// gives it from the GGUF or `MODEL_INFO`). A model without one is an error that says so.
pub fn chat_template(f: &Flags, tok: &Tokenizer, model: impl FnOnce() -> Result<ChatTemplate>) -> Result<ChatTemplate> {
    let template = match f.get("--chat-template") {
        Some(file) => {
            let source = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
            ChatTemplate::for_tokenizer(&source, tok).map_err(|e| anyhow!("{file}: {e}"))?
        }
        None => model()?,
    };
    Ok(template)
}

/// The conversation `generate --chat` and `infer --chat` run: an optional system message and
/// the prompt as the user's message.
fn one_turn(f: &Flags, prompt: &str) -> Vec<Message> {
    let mut messages: Vec<Message> = f.get("--system").map(|s| Message::new("system", s)).into_iter().collect();
    messages.push(Message::new("user", prompt));
    messages
}

/// OpenAI's `finish_reason`: `stop` when the last token ends generation, else `length`.
pub fn finish_reason(tok: &Tokenizer, tokens: &[u32]) -> &'static str {
    if tokens.last().is_some_and(|&t| tok.is_eog(t)) { "stop" } else { "length" }
}

pub fn generate(o: &Opts, model: &str, flags: &[&str]) -> Result<()> {
    use shardnet::engine::Engine;
    use shardnet::engine::generate::{TextStream, generate};
    use shardnet::engine::sampler::Sampler;
    let f = Flags::parse(
        "generate",
        flags,
        &[
            &SAMPLING_FLAGS[..],
            &["--prompt", "--threads", "--ctx", "--batch", "--prompt-ids", "--system", "--chat-template"],
        ]
        .concat(),
        &["--no-special", "--logits", "--ignore-eos", "--repack", "--chat"],
    );
    let chat = chat_flags(&f)?;
    let sampling = sampling_flags(&f)?;
    let n: usize = f.num("-n", 32);
    let batch: usize = f.num("--batch", 512);
    if batch == 0 {
        return Err(f.usage("--batch must be at least 1".into()));
    }
    let cfg = engine_config(&f);
    if !f.has("--prompt") && !f.has("--prompt-ids") {
        return Err(f.usage("missing --prompt TEXT (or --prompt-ids)".into()));
    }
    let map = open_model(model)?;
    let tok = load_tokenizer(&map, model)?;
    let prompt: Vec<u32> = match (f.get("--prompt-ids"), f.get("--prompt")) {
        (Some(ids), _) => ids
            .split(',')
            .map(|s| s.trim().parse().map_err(|_| f.usage(format!("--prompt-ids: {s:?} is not a token id"))))
            .collect::<Result<_>>()?,
        (None, Some(text)) if chat => {
            let g = shardnet::gguf::reader::Gguf::parse(&map).map_err(|e| anyhow!("{model}: {e}"))?;
            let template =
                chat_template(&f, &tok, || ChatTemplate::from_gguf(&g, &tok).map_err(|e| anyhow!("{model}: {e}")))?;
            tok.encode(&template.prompt(&one_turn(&f, text), true, &tok)?, true, true)
        }
        (None, Some(text)) => tok.encode(text, true, !f.has("--no-special")),
        (None, None) => return Err(f.usage("missing --prompt TEXT (or --prompt-ids)".into())),
    };
    if prompt.is_empty() {
        return Err(f.usage("the prompt holds no tokens".into()));
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
        !f.has("--ignore-eos"),
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
            "finish_reason": finish_reason(&tok, &stats.generated),
            "prefill_ms": stats.prefill_ms,
            "decode_ms": stats.decode_ms,
            "prefill_tps": per_s(prompt.len(), stats.prefill_ms),
            "decode_tps": per_s(stats.generated.len(), stats.decode_ms),
        });
        if f.has("--logits") {
            // For checks against a reference: the logits after the prompt and after the last token.
            v["prefill_logits"] = json!(stats.prefill_logits);
            v["final_logits"] = json!(stats.final_logits);
        }
        println!("{v}");
    } else {
        let _ = writeln!(out, "{tail}");
        let _ = out.flush();
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

pub fn infer(o: &Opts, flags: &[&str]) -> Result<()> {
    let f = Flags::parse(
        "infer",
        flags,
        &[
            &SAMPLING_FLAGS[..],
            &[
                "--bootstrap",
                "--cluster",
                "--prompt",
                "--batch",
                "--session",
                "--pace-ms",
                "--load-timeout",
                "--model",
                "--system",
                "--chat-template",
            ],
        ]
        .concat(),
        &["--no-special", "--ignore-eos", "--chat"],
    );
    let chat = chat_flags(&f)?;
    let sampling = sampling_flags(&f)?;
    let prompt = f.get("--prompt").ok_or_else(|| f.usage("missing --prompt TEXT".into()))?;
    let batch: usize = f.num("--batch", 128);
    if batch == 0 {
        return Err(f.usage("--batch must be at least 1".into()));
    }
    // Every flag is checked before the network is touched; the prompt's ids come after discovery.
    let req = gen_request(&f, Vec::new(), f.num("-n", 32), sampling)?;
    let cfg = cluster_config(o, &f, batch)?;
    let mut c = Coordinator::discover(cfg, progress_events(Rc::new(Cell::new(true))))?;
    let text = if chat {
        let template =
            chat_template(&f, c.tokenizer(), || c.chat_template().map_err(|e| anyhow!("the cluster's model: {e}")))?;
        template.prompt(&one_turn(&f, prompt), true, c.tokenizer())?
    } else {
        prompt.to_string()
    };
    let ids = c.tokenizer().encode(&text, true, chat || !f.has("--no-special"));
    let req = GenRequest { prompt: ids, ..req };
    let summary = c.generate(&req, print_text(o.json))?;
    if o.json {
        let mut v = summary.to_json();
        v["finish_reason"] = json!(finish_reason(c.tokenizer(), &summary.tokens));
        print_json(&v);
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

/// One generation's request from the flags `infer` and `chat` share (`--session`, `--pace-ms`,
/// `--ignore-eos`): `prompt` as token ids, at most `n` new tokens.
pub fn gen_request(f: &Flags, prompt: Vec<u32>, n: usize, sampling: SamplerConfig) -> Result<GenRequest> {
    let session = f.get("--session").map(|s| s.to_string());
    if session.as_ref().is_some_and(|s| s.is_empty() || s.len() > 128) {
        return Err(f.usage("--session must be 1-128 bytes".into()));
    }
    Ok(GenRequest {
        prompt,
        max_tokens: n,
        sampling,
        stop_at_eog: !f.has("--ignore-eos"),
        session,
        pace: Duration::from_millis(f.num("--pace-ms", 0u64)),
    })
}

/// Writes generated text to stdout as it comes (unless `json_out`): the `generate` callback of
/// `infer` and `chat`.
pub fn print_text(json_out: bool) -> impl FnMut(u32, &str) -> bool {
    let mut stdout = std::io::stdout();
    move |_, text| {
        if !json_out {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
        true
    }
}

/// Prints the coordinator's progress events on stderr while `show` is set.
pub fn progress_events(show: Rc<Cell<bool>>) -> impl FnMut(Event) {
    let mut progress_open = false;
    move |ev: Event| {
        let mut err = std::io::stderr();
        if progress_open && !matches!(ev, Event::Loading { .. }) {
            let _ = writeln!(err);
            progress_open = false;
        }
        match ev {
            _ if !show.get() => {}
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
    }
}
