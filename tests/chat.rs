//! Chat: templates rendered as Python's jinja2 renders them (Hugging Face's settings), for
//! SmolLM2's own template and three in the tests' own GGUF files; a model without a template;
//! `shardctl chat` through a cluster equal to `shardctl chat` in one process (with penalties);
//! generation that stops at SmolLM2's end of turn; a repetition penalty that ends SmolLM2's
//! greedy loop.
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use shardnet::chat::{ChatError, ChatTemplate, Message};
use shardnet::engine::tokenizer::Tokenizer;
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::reader::Gguf;
use shardnet::gguf::split;

const SMOLLM2: &str = "models_cache/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Meta-Llama-3-8B-Instruct's template: `bos_token` on the first message, `| trim` binding
/// tighter than `+`.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = \
'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if \
loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if \
add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Zephyr's template: one block tag per line, so its output depends on trim_blocks and
/// lstrip_blocks.
const ZEPHYR: &str = "{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}";

/// Mistral-Instruct style: `raise_exception`, Python's `.strip()`, a system message folded into
/// the first user turn, slicing, `loop.first`, `namespace`.
const MISTRAL: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] \
%}{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}\
{% set ns = namespace(turns=0) %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 \
% 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if message['role'] == 'user' %}{% set ns.turns = ns.turns + 1 %}{% if loop.first and system %}{{ '[INST] ' + \
system.strip() + '\n\n' + message['content'].strip() + ' [/INST]' }}{% else %}{{ '[INST] ' + \
message['content'].strip() + ' [/INST]' }}{% endif %}{% else %}{{ ' ' + message['content'].strip() + eos_token }}{% \
endif %}{% endfor %}";

/// A ChatML template (SmolLM2's shape) for the demo models that run in the cluster test.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + \
'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn msg(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

/// Conversations every template is rendered with, with and without the generation prompt.
fn conversations() -> Vec<Vec<Message>> {
    vec![
        vec![msg("user", "Hello!")],
        vec![
            msg("system", "  You are terse.  "),
            msg("user", "Hi"),
            msg("assistant", "  Hello. "),
            msg("user", "Tell me a joke\nabout cats."),
        ],
        vec![
            msg("user", "unicode: héllo 日本 \"quotes\" 'single' {{ not a tag }} {% raw %} \\ backslash"),
            msg("assistant", "ok"),
            msg("user", "\n\nagain\n"),
        ],
        // Mistral's template refuses this one (roles do not alternate): both must say so.
        vec![msg("user", "a"), msg("user", "b")],
    ]
}

fn as_json(messages: &[Message]) -> Value {
    json!(messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>())
}

/// Renders every case with Python's jinja2 (tests/chat_template.py).
fn jinja2(cases: &[Value]) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chat_template.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python3");
    child.stdin.take().unwrap().write_all(json!(cases).to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "chat_template.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

/// A model file's template, as shardctl reads it: from the GGUF, with its tokenizer's BOS/EOS.
fn template_of(path: &Path) -> (String, ChatTemplate) {
    let bytes = std::fs::read(path).unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let source = g.get_str("tokenizer.chat_template").expect("a template").to_string();
    (source, ChatTemplate::from_gguf(&g, &tok).unwrap())
}

/// Renders each template file's template over `conversations()` with minijinja and with jinja2;
/// the texts (or the errors' messages) must be equal. Returns how many cases rendered.
fn assert_renders_like_jinja2(models: &[PathBuf]) -> usize {
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for path in models {
        let (source, t) = template_of(path);
        for conv in conversations() {
            for add_generation_prompt in [false, true] {
                cases.push(json!({
                    "template": source,
                    "messages": as_json(&conv),
                    "add_generation_prompt": add_generation_prompt,
                    "bos_token": t.bos_token(),
                    "eos_token": t.eos_token(),
                }));
                ours.push((path.clone(), t.render(&conv, add_generation_prompt)));
            }
        }
    }
    let theirs = jinja2(&cases);
    assert_eq!(theirs.len(), ours.len());
    let mut rendered = 0;
    for ((path, ours), (theirs, case)) in ours.iter().zip(theirs.iter().zip(&cases)) {
        match (ours, theirs["text"].as_str(), theirs["error"].as_str()) {
            (Ok(text), Some(expected), _) => {
                assert_eq!(text, expected, "{}: {}", path.display(), case["messages"]);
                rendered += 1;
            }
            (Err(ChatError::Render(ours)), _, Some(error)) => {
                assert!(ours.starts_with(error), "{}: minijinja {ours:?}, jinja2 {error:?}", path.display());
            }
            (ours, _, _) => panic!("{}: minijinja {ours:?}, jinja2 {theirs}; {}", path.display(), case["messages"]),
        }
    }
    rendered
}

fn chat_model(dir: &Path, name: &str, template: Option<&str>, controls: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let cfg = DemoConfig {
        layers: 4,
        chat_template: template.map(str::to_string),
        control_tokens: controls.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    demo::write(&cfg, &path).unwrap();
    path
}

#[test]
#[ignore = "needs pip:jinja2"]
fn chat_templates_in_gguf_files_render_as_python_jinja2_does() {
    require("pip:jinja2");
    let dir = TempDir::new("chat-jinja2");
    let models = [
        chat_model(
            dir.path(),
            "llama3.gguf",
            Some(LLAMA3),
            &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        ),
        chat_model(dir.path(), "zephyr.gguf", Some(ZEPHYR), &["<|user|>", "<|assistant|>", "<|system|>"]),
        chat_model(dir.path(), "mistral.gguf", Some(MISTRAL), &[]),
    ];
    // 3 templates x 4 conversations x 2; Mistral refuses the non-alternating one (x 2).
    assert_eq!(assert_renders_like_jinja2(&models), 22);
}

#[test]
#[ignore = "needs models_cache/SmolLM2-135M-Instruct.Q4_1.gguf, pip:jinja2"]
fn smollm2_chat_template_renders_as_python_jinja2_does() {
    require("models_cache/SmolLM2-135M-Instruct.Q4_1.gguf, pip:jinja2");
    assert_eq!(assert_renders_like_jinja2(&[PathBuf::from(SMOLLM2)]), 8);
}

fn shardctl(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A shardctl that fails before reading its input closes the pipe: that is not our failure.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn stdout_json_lines(o: &Output) -> Vec<Value> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_model_without_a_chat_template_is_a_clear_error() {
    let dir = TempDir::new("chat-none");
    let model = chat_model(dir.path(), "plain.gguf", None, &[]);
    let m = model.to_str().unwrap();
    for args in [&["generate", m, "--chat", "--prompt", "hi"][..], &["chat", "--model", m]] {
        let o = shardctl(args, "hi\n");
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            format!(
                "shardctl: {m}: the model has no chat template (tokenizer.chat_template is not in its metadata); \
                 give one with --chat-template FILE\n"
            )
        );
    }
    // --chat-template gives one: the prompt is that template's rendering, tokenized with the
    // control tokens parsed and the model's BOS first, once.
    let file = dir.path().join("chatml.jinja");
    std::fs::write(&file, format!("{{{{ bos_token }}}}{CHATML}")).unwrap();
    let o = shardctl(
        &["--json", "generate", m, "--chat", "--chat-template", file.to_str().unwrap(), "--prompt", "hi", "-n", "2"],
        "",
    );
    let v = &stdout_json_lines(&o)[0];
    let g = std::fs::read(&model).unwrap();
    let tok = Tokenizer::from_gguf(&Gguf::parse(&g).unwrap()).unwrap();
    let expected = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", true, true);
    assert_eq!(v["prompt_tokens"], json!(expected));
    assert_eq!(expected.iter().filter(|&&t| Some(t) == tok.bos).count(), 1);
    // A template that does not compile names the file and the line.
    std::fs::write(&file, "line one\n{% for m in messages %}{{ m }").unwrap();
    let o = shardctl(&["chat", "--model", m, "--chat-template", file.to_str().unwrap()], "hi\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.starts_with(&format!("shardctl: {}: the chat template does not compile: ", file.display())), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

/// Two nodes, each with half the shards of a demo model that carries a ChatML template; a
/// two-turn `shardctl chat` through them gives, token for token, what `shardctl chat --model`
/// gives in one process, with the repetition, presence and frequency penalties on (the
/// coordinator then asks the last node for more than the top token).
#[test]
fn chat_through_a_cluster_equals_chat_in_one_process() {
    let dir = TempDir::new("chat-cluster");
    let model = chat_model(dir.path(), "chatml.gguf", Some(CHATML), &["<|im_start|>", "<|im_end|>"]);
    let d0 = dir.path().join("node-0");
    split::split(&model, 2, &d0, None).unwrap();
    let d1 = dir.path().join("node-1");
    std::fs::create_dir_all(&d1).unwrap();
    let n0 = NodeProc::start(&d0, &["--enable-torrent", "--threads", "1"]);
    let n1 = NodeProc::start(&d1, &["--enable-torrent", "--threads", "1", "--bootstrap", &n0.addr]);
    wait_for(Duration::from_secs(30), || {
        let r = n0.call("FIND_PEERS", json!({"cluster": true}));
        r["result"]["peers"].as_array().is_some_and(|p| p.contains(&json!(n1.addr))).then_some(())
    });
    let turns = "Hello there\n\nAnd again, please\n";
    let sampling = ["-n", "12", "--repeat-penalty", "1.5", "--presence-penalty", "0.7", "--frequency-penalty", "0.3"];
    let mut local = vec!["--json", "chat", "--model", model.to_str().unwrap()];
    local.extend_from_slice(&sampling);
    let mut cluster = vec!["--json", "chat", "--bootstrap", &n0.addr];
    cluster.extend_from_slice(&sampling);
    let (a, b) = (stdout_json_lines(&shardctl(&local, turns)), stdout_json_lines(&shardctl(&cluster, turns)));
    assert_eq!(a.len(), 2, "one reply per non-empty line");
    assert_eq!(a, b);
    // The second turn's prompt holds the first exchange.
    let (p0, p1) = (a[0]["prompt_tokens"].as_u64().unwrap(), a[1]["prompt_tokens"].as_u64().unwrap());
    assert!(p1 > p0 + a[0]["completion_tokens"].as_u64().unwrap(), "{a:?}");
    // The penalties changed the replies (else the test would not show the coordinator's share).
    let plain =
        stdout_json_lines(&shardctl(&["--json", "chat", "--model", model.to_str().unwrap(), "-n", "12"], turns));
    assert_ne!(plain, a);
}

#[test]
#[ignore = "needs models_cache/SmolLM2-135M-Instruct.Q4_1.gguf"]
fn smollm2_chat_stops_at_its_end_of_turn() {
    require(SMOLLM2);
    let o = shardctl(&["--json", "generate", SMOLLM2, "--chat", "--prompt", "What is 2+2?", "-n", "128"], "");
    let v = &stdout_json_lines(&o)[0];
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(v["finish_reason"], "stop", "{v}");
    assert_eq!(tokens.last(), Some(&json!(2)), "<|im_end|> is SmolLM2's token 2");
    assert!(tokens.len() < 128);
    let text = v["text"].as_str().unwrap();
    assert!(!text.is_empty() && !text.contains("<|im"), "{text:?}");
    // The prompt is SmolLM2's own template: its default system message, then the user's.
    let prompt = v["prompt_tokens"].as_array().unwrap();
    assert_eq!(prompt[0], json!(1), "<|im_start|>");
}

/// The loop the first-hour report saw: greedy SmolLM2 repeats a line of its poem; with llama.cpp's
/// repeat penalty it does not.
#[test]
#[ignore = "needs models_cache/SmolLM2-135M-Instruct.Q4_1.gguf"]
fn repeat_penalty_ends_smollm2_greedy_loop() {
    require(SMOLLM2);
    let prompt = "<|im_start|>user\nWrite a short poem about rain.<|im_end|>\n<|im_start|>assistant\n";
    let run = |extra: &[&str]| {
        let mut args = vec!["--json", "generate", SMOLLM2, "--prompt", prompt, "-n", "64", "--ignore-eos"];
        args.extend_from_slice(extra);
        let v = stdout_json_lines(&shardctl(&args, "")).remove(0);
        let tokens: Vec<u64> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        (tokens, v["text"].as_str().unwrap().to_string())
    };
    // How often the most frequent 5-token sequence occurs.
    let most_repeated = |t: &[u64]| {
        let mut counts = std::collections::HashMap::new();
        for w in t.windows(5) {
            *counts.entry(w.to_vec()).or_insert(0) += 1;
        }
        counts.into_values().max().unwrap_or(0)
    };
    let (looping, text) = run(&[]);
    assert!(most_repeated(&looping) >= 4, "expected the greedy loop: {text:?}");
    let (penalized, text) = run(&["--repeat-penalty", "1.3"]);
    assert!(most_repeated(&penalized) <= 1, "still looping: {text:?}");
}

/// A hostile model file: its chat template doubles a string 33 times (the s8 red team's
/// tpl/unroll.j2). The render stops at its budget with a clear error, in a `shardctl` whose
/// address space is capped at ~500 MB (before: the fixed 20,000,000 fuel let it allocate ~1.3 GB,
/// so under this cap it aborted, out of memory), and the same through `--chat-template`.
#[test]
fn a_hostile_chat_template_fails_cleanly_in_bounded_memory() {
    let dir = TempDir::new("chat-hostile");
    let doubling = format!("{{% set s = 'xxxxxxxx' %}}{}{{{{ s|length }}}}", "{% set s = s ~ s %}".repeat(33));
    let model = chat_model(dir.path(), "hostile.gguf", Some(&doubling), &[]);
    let m = model.to_str().unwrap();
    let capped = |args: &[&str]| {
        Command::new("sh")
            .args(["-c", "ulimit -v 500000 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_shardctl")])
            .args(args)
            .output()
            .unwrap()
    };
    let o = capped(&["generate", m, "--chat", "--prompt", "hi", "-n", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the chat template went past its budget") && err.contains("fuel"), "{err}");
    let file = dir.path().join("unroll.j2");
    std::fs::write(&file, &doubling).unwrap();
    let plain = chat_model(dir.path(), "plain.gguf", None, &[]);
    let o = capped(&[
        "generate",
        plain.to_str().unwrap(),
        "--chat",
        "--chat-template",
        file.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("went past its budget"), "{err}");
}
