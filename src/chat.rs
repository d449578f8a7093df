//! Chat prompts from a model's own chat template: the GGUF's `tokenizer.chat_template` (a Jinja
//! template, as Hugging Face's `apply_chat_template` and llama.cpp render it), rendered with
//! `minijinja`.
//!
//! The template sees what Hugging Face gives it: `messages` (a list of `{role, content, ...}`),
//! `add_generation_prompt`, `bos_token` and `eos_token` (the texts of the model's BOS and EOS
//! tokens), `raise_exception(msg)`, and Python's string methods (`.strip()`, `.startswith()`,
//! ...; minijinja-contrib's `pycompat`). Whitespace control is Hugging Face's (`trim_blocks`,
//! `lstrip_blocks`), loop controls (`break`, `continue`) are on, and a render is bounded in work
//! and memory (`RENDER_FUEL_BASE` and `RENDER_FUEL_PER_BYTE`, scaled to the messages) and in
//! output (`RENDER_OUTPUT_BASE`, `RENDER_OUTPUT_PER_BYTE`), so no template can hang its caller
//! or make it allocate more than a bounded multiple of what it was given.
//!
//! ```no_run
//! # fn main() -> Result<(), shardnet::chat::ChatError> {
//! # let (gguf, tokenizer): (shardnet::gguf::reader::Gguf, shardnet::engine::tokenizer::Tokenizer) = todo!();
//! use shardnet::chat::{ChatTemplate, Message};
//! let template = ChatTemplate::from_gguf(&gguf, &tokenizer)?;
//! let text = template.render(&[Message::new("user", "Hi!")], true)?;
//! # Ok(()) }
//! ```

use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::json;

use crate::engine::tokenizer::{Tokenizer, TokenizerSource};

/// The GGUF key holding the template (llama.cpp's `LLM_KV_TOKENIZER_CHAT_TEMPLATE`).
pub const TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// Roles a message may have (OpenAI's chat roles).
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// Work and memory one render may spend, in minijinja's fuel: every instruction costs one, and
/// every 64 bytes of data the render creates cost one (strings made by `~`, `+`, `*`, slicing and
/// filters, list and map slots, the output and captured `{% set %}` blocks; minijinja 3.1
/// checks an allocation of known size before making it). Fuel only goes down, so a render
/// allocates at most ~64 bytes per fuel in all, whatever the template does. A render gets
/// `RENDER_FUEL_BASE` plus `RENDER_FUEL_PER_BYTE` per byte of its messages (as JSON): measured,
/// real templates (SmolLM2's, Llama 3's, Zephyr's, Mistral's, ChatML) spend 0.05 fuel per byte
/// on long messages and at most 1.4 on many empty ones (~40 per message), so the budget is ~3x
/// the most seen. A hostile template gets ~16 MiB and 250,000 instructions for a short chat
/// (before: 20,000,000 fuel for any, ~1.3 GB and 6 s per render), and 256 bytes per byte of a
/// long one.
pub const RENDER_FUEL_BASE: u64 = 250_000;
/// See [`RENDER_FUEL_BASE`].
pub const RENDER_FUEL_PER_BYTE: u64 = 4;

/// The longest output a render may write: `RENDER_OUTPUT_PER_BYTE` times the messages' JSON bytes
/// plus `RENDER_OUTPUT_BASE` (real templates write at most ~2x their messages' JSON, plus their
/// own fixed text); past it the render stops with [`ChatError::Render`].
pub const RENDER_OUTPUT_BASE: usize = 256 << 10;
/// See [`RENDER_OUTPUT_BASE`].
pub const RENDER_OUTPUT_PER_BYTE: usize = 4;

/// Longest template accepted, in bytes (real ones are under 10 KiB; DeepSeek's is ~4 KiB).
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.to_string(), content: content.to_string() }
    }
}

/// Why a chat prompt could not be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatError {
    /// The model carries no `tokenizer.chat_template` (and none was given).
    NoTemplate,
    /// The template does not compile: minijinja's message, with the line.
    Syntax(String),
    /// The messages are not a conversation: empty, or a role outside `ROLES`.
    BadMessages(String),
    /// The template failed while rendering (its own `raise_exception`, an undefined operation).
    Render(String),
    /// The render went past its budget of work and memory (`RENDER_FUEL_BASE`) or of output
    /// (`RENDER_OUTPUT_BASE`): the template's fault, not the messages'.
    Budget(String),
}

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChatError::NoTemplate => write!(
                f,
                "the model has no chat template ({TEMPLATE_KEY} is not in its metadata); give one with \
                 --chat-template FILE"
            ),
            ChatError::Syntax(m) => write!(f, "the chat template does not compile: {m}"),
            ChatError::BadMessages(m) => write!(f, "{m}"),
            ChatError::Render(m) => write!(f, "the chat template failed: {m}"),
            ChatError::Budget(m) => write!(f, "the chat template went past its budget: {m}"),
        }
    }
}

impl std::error::Error for ChatError {}

/// A compiled chat template with the model's BOS and EOS texts.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

/// Hugging Face's `raise_exception(message)`: ends the render with that message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// minijinja's error with its source: the message and, where it has one, the line.
fn describe(e: &Error) -> String {
    let mut text = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line()
        && !text.contains("line")
    {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

impl ChatTemplate {
    /// Compiles `source` (Jinja) for a model whose BOS and EOS tokens read `bos_token` and
    /// `eos_token`. Errors: `Syntax` with minijinja's message and line, or when the source is
    /// over `MAX_TEMPLATE_BYTES`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(ChatError::Syntax(format!(
                "{} bytes, more than the {MAX_TEMPLATE_BYTES} accepted",
                source.len()
            )));
        }
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| ChatError::Syntax(describe(&e)))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(RENDER_FUEL_BASE));
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat_template", source.to_string()).map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// The template of a model's metadata (a GGUF file, or `MODEL_INFO`'s `tokenizer` object),
    /// with the texts of `tokenizer`'s BOS and EOS. `NoTemplate` when the model has none.
    pub fn from_gguf(meta: &impl TokenizerSource, tokenizer: &Tokenizer) -> Result<ChatTemplate, ChatError> {
        let source = meta.str(TEMPLATE_KEY).ok_or(ChatError::NoTemplate)?;
        ChatTemplate::for_tokenizer(&source, tokenizer)
    }

    /// `source` (e.g. read from `--chat-template FILE`) with `tokenizer`'s BOS and EOS texts.
    pub fn for_tokenizer(source: &str, tokenizer: &Tokenizer) -> Result<ChatTemplate, ChatError> {
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or("").to_string();
        ChatTemplate::new(source, &text(tokenizer.bos), &text(tokenizer.eos))
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The template's output for `messages`, ending with the assistant's header when
    /// `add_generation_prompt`: what Python's `jinja2` gives for the same template (Hugging
    /// Face's `apply_chat_template(..., tokenize=False)`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let list: Vec<serde_json::Value> =
            messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        self.render_json(&list, add_generation_prompt)
    }

    /// As `render`, for messages as JSON objects (an HTTP request's `messages`, which may carry
    /// more fields than `role` and `content`; those reach the template too). Each must be an
    /// object with a `role` from `ROLES` and a string `content`. The render's budget scales with
    /// the messages' JSON length `n`: `RENDER_FUEL_BASE + RENDER_FUEL_PER_BYTE * n` fuel and
    /// `RENDER_OUTPUT_BASE + RENDER_OUTPUT_PER_BYTE * n` bytes of output; past either,
    /// `ChatError::Render` saying which.
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        check_messages(messages)?;
        let n = serde_json::to_string(messages).map_or(0, |t| t.len());
        // A clone shares the compiled template (an Arc); only this render's fuel differs.
        let mut env = self.env.clone();
        let fuel = RENDER_FUEL_BASE.saturating_add(RENDER_FUEL_PER_BYTE.saturating_mul(n as u64));
        env.set_fuel(Some(fuel));
        let template = env.get_template("chat_template").map_err(|e| ChatError::Render(describe(&e)))?;
        let cap = RENDER_OUTPUT_BASE.saturating_add(RENDER_OUTPUT_PER_BYTE.saturating_mul(n));
        let mut out = CappedOutput { bytes: Vec::new(), cap, over: false };
        let rendered = template.render_captured_to(
            minijinja::context! {
                messages => Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
            &mut out,
        );
        match rendered {
            Err(_) if out.over => Err(ChatError::Budget(format!(
                "its output is over {cap} bytes ({RENDER_OUTPUT_BASE} + {RENDER_OUTPUT_PER_BYTE} per byte of the \
                 {n} bytes of messages)"
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(ChatError::Budget(format!(
                "it did more work or made more data than the {fuel} fuel a render of {n} bytes of messages may \
                 spend (one per instruction or per 64 bytes made)"
            ))),
            Err(e) => Err(ChatError::Render(describe(&e))),
            Ok(_) => {
                String::from_utf8(out.bytes).map_err(|e| ChatError::Render(format!("its output is not UTF-8: {e}")))
            }
        }
    }

    /// The prompt text to tokenize (with special tokens parsed) for `messages`: `render`'s output
    /// without its leading BOS text when the tokenizer adds BOS itself, so the prompt holds one
    /// BOS, not two (llama.cpp's `common_chat_templates_apply` does the same).
    pub fn prompt(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tokenizer: &Tokenizer,
    ) -> Result<String, ChatError> {
        let text = self.render(messages, add_generation_prompt)?;
        Ok(match text.strip_prefix(self.bos_token.as_str()) {
            Some(rest) if tokenizer.adds_bos() && !self.bos_token.is_empty() => rest.to_string(),
            _ => text,
        })
    }
}

/// A render's output, refusing to grow past `cap` bytes (the render then fails).
struct CappedOutput {
    bytes: Vec<u8>,
    cap: usize,
    over: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.cap {
            self.over = true;
            return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, "render output over its cap"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn check_messages(messages: &[serde_json::Value]) -> Result<(), ChatError> {
    if messages.is_empty() {
        return Err(ChatError::BadMessages("messages is empty: a chat needs at least one message".into()));
    }
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(|r| r.as_str());
        match role {
            Some(r) if ROLES.contains(&r) => {}
            Some(r) => {
                return Err(ChatError::BadMessages(format!(
                    "messages[{i}].role {r:?} is not one of {}",
                    ROLES.join(", ")
                )));
            }
            None => return Err(ChatError::BadMessages(format!("messages[{i}] has no string role"))),
        }
        if !m.get("content").is_some_and(|c| c.is_string()) {
            return Err(ChatError::BadMessages(format!("messages[{i}].content is not a string")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + \
                          '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' \
                          }}{% endif %}";

    #[test]
    fn renders_messages_and_the_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let msgs = [Message::new("system", "Be brief."), Message::new("user", "Hi")];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!t.render(&msgs, false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn python_string_methods_and_whitespace_control_work() {
        let src = "{% for m in messages %}\n  {% if m.content.strip().startswith('x') %}\n{{ m.role.upper() }}:{{ \
                   m.content.strip() }}|\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let msgs = [Message::new("user", "  xy "), Message::new("assistant", "no")];
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indent before one.
        assert_eq!(t.render(&msgs, false).unwrap(), "USER:xy|\n");
    }

    #[test]
    fn raise_exception_and_bad_input_are_clear_errors() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a \
                   user message') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[Message::new("assistant", "x")], false),
            Err(ChatError::Render("Conversation must start with a user message (line 1)".into()))
        );
        assert!(matches!(t.render(&[], true), Err(ChatError::BadMessages(m)) if m.contains("empty")));
        assert!(
            matches!(t.render(&[Message::new("robot", "x")], true), Err(ChatError::BadMessages(m)) if m.contains("\"robot\""))
        );
        assert!(matches!(
            t.render_json(&[json!({"role": "user", "content": 5})], true),
            Err(ChatError::BadMessages(_))
        ));
        let e = ChatTemplate::new("{% for m in messages %}{{ m }", "", "").unwrap_err();
        assert!(matches!(&e, ChatError::Syntax(m) if m.contains("line 1")), "{e}");
        assert!(matches!(ChatTemplate::new(&"x".repeat(MAX_TEMPLATE_BYTES + 1), "", ""), Err(ChatError::Syntax(_))));
    }

    /// A template that would loop for hours stops at the fuel bound with an error.
    #[test]
    fn a_runaway_template_is_stopped() {
        let src = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(t.render(&[Message::new("user", "x")], true)));
        // Without the bound this render runs for hours: the generous wait makes that a failure.
        let e = rx.recv_timeout(std::time::Duration::from_secs(120)).expect("the render did not stop").unwrap_err();
        assert!(matches!(&e, ChatError::Budget(m) if m.contains("fuel")), "{e}");
    }

    /// The s8 red team's tpl/unroll.j2: a string doubled 33 times, no loop. Under the old fixed
    /// 20,000,000 fuel it made ~1.3 GB per render before running out; with the budget scaled to
    /// the messages it stops at ~16 MiB. (`tests/chat.rs` runs it under a capped address space.)
    #[test]
    fn a_template_that_doubles_a_string_runs_out_of_its_budget() {
        let src = format!("{{% set s = 'xxxxxxxx' %}}{}{{{{ s|length }}}}", "{% set s = s ~ s %}".repeat(33));
        let t = ChatTemplate::new(&src, "", "").unwrap();
        let e = t.render(&[Message::new("user", "hi")], true).unwrap_err();
        assert!(matches!(&e, ChatError::Budget(m) if m.contains("fuel")), "{e}");
        // 18 doublings (2 MiB, 4 MiB made in all) fit a short chat's budget: the bound is on bytes made.
        let src = format!("{{% set s = 'xxxxxxxx' %}}{}{{{{ s|length }}}}", "{% set s = s ~ s %}".repeat(18));
        let t = ChatTemplate::new(&src, "", "").unwrap();
        assert_eq!(t.render(&[Message::new("user", "hi")], true).unwrap(), (2usize << 20).to_string());
    }

    /// The output is capped at `RENDER_OUTPUT_BASE` plus `RENDER_OUTPUT_PER_BYTE` per byte of
    /// the messages: a 1 MB output of a short chat is refused, the same for a long chat is not.
    #[test]
    fn a_render_output_past_its_cap_is_refused_and_scales_with_the_messages() {
        let t = ChatTemplate::new("{{ 'x' * 1000000 }}{{ messages[0]['content'] }}", "", "").unwrap();
        let e = t.render(&[Message::new("user", "hi")], true).unwrap_err();
        assert!(matches!(&e, ChatError::Budget(m) if m.contains("output is over")), "{e}");
        let long = "y".repeat(300_000);
        assert_eq!(t.render(&[Message::new("user", &long)], true).unwrap().len(), 1_300_000);
    }
}
