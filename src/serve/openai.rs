//! The OpenAI API's shapes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`): requests
//! parsed and checked into [`Params`], responses and stream chunks built as OpenAI and llama.cpp's
//! server write them, errors as `{"error": {"message", "type", "param", "code"}}`, and the stop
//! strings' matcher. No I/O here.
//!
//! Source: the OpenAI API reference (Chat Completions, Completions, Models, errors) and llama.cpp's
//! `tools/server/README.md` for its extras (`top_k`, `repeat_penalty`, `repeat_last_n`).

use serde_json::{Map, Value, json};

/// An error answered in OpenAI's shape with an HTTP status.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn new(status: u16, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code }
    }

    /// 429 in OpenAI's shape (`type` "requests", `code` "rate_limit_exceeded"): this client has
    /// its share of the server already.
    pub fn rate_limited(message: impl Into<String>) -> ApiError {
        ApiError::new(429, "requests", Some("rate_limit_exceeded"), message)
    }

    /// 503: the cluster cannot serve now (not ready, lost nodes, queue full).
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "server_error", Some("service_unavailable"), message)
    }

    pub fn to_json(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// Which completion endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Text,
}

/// A chat message: `role` one of system, developer, user, assistant, tool.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What to complete: the chat's messages, or a prompt as text or token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Messages(Vec<Message>),
    Text(String),
    Tokens(Vec<u32>),
}

/// A completion request's fields, checked. `None` means the server's default.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Params {
    pub model: Option<String>,
    pub input: Option<Input>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage` and no choices.
    pub include_usage: bool,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// llama.cpp's: -1 the whole context, 0 off.
    pub repeat_last_n: Option<i64>,
    /// llama.cpp's: generate past end-of-generation tokens.
    pub ignore_eos: bool,
    /// OpenAI's `logit_bias` (token id -> bias), as given: ranges are checked by
    /// [`crate::engine::sampler::SamplerConfig::validate`], ids against the vocabulary by the
    /// server.
    pub logit_bias: Vec<(u32, f32)>,
}

/// Roles a chat may hold: the chat templates' (`crate::chat::ROLES`) and OpenAI's `developer`
/// (rendered as `system`).
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];
/// OpenAI's bound on `stop` sequences.
pub const MAX_STOP: usize = 4;

fn number(o: &Map<String, Value>, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x >= lo && x <= hi => Ok(Some(x)),
            _ => Err(ApiError::bad(format!("{key} must be a number from {lo} to {hi}, got {v}"), Some(key))),
        },
    }
}

fn integer(o: &Map<String, Value>, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(x) if x >= lo && x <= hi => Ok(Some(x)),
            _ => Err(ApiError::bad(format!("{key} must be an integer from {lo} to {hi}, got {v}"), Some(key))),
        },
    }
}

/// A message's `content`: a string, or an array of `{"type": "text", "text": ...}` parts.
fn content_text(v: &Value, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::bad(
                            format!("{param}: only text parts are supported, got {p}"),
                            Some(&param),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::bad(format!("{param} must be a string or an array of text parts"), Some(&param))),
    }
}

fn messages(v: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let list = match v {
        Some(Value::Array(l)) => l,
        None | Some(Value::Null) => return Err(ApiError::bad("messages is required", Some("messages"))),
        Some(_) => return Err(ApiError::bad("messages must be an array", Some("messages"))),
    };
    if list.is_empty() {
        return Err(ApiError::bad("messages must hold at least one message", Some("messages")));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m["role"]
            .as_str()
            .ok_or_else(|| ApiError::bad(format!("messages[{i}] has no role"), Some(&format!("messages[{i}].role"))))?;
        if !ROLES.contains(&role) {
            return Err(ApiError::bad(
                format!("messages[{i}].role {role:?} is not one of {}", ROLES.join(", ")),
                Some(&format!("messages[{i}].role")),
            ));
        }
        out.push(Message { role: role.to_string(), content: content_text(&m["content"], i)? });
    }
    Ok(out)
}

fn prompt(v: Option<&Value>) -> Result<Input, ApiError> {
    let bad =
        || ApiError::bad("prompt must be a string, an array of one string, or an array of token ids", Some("prompt"));
    match v {
        None | Some(Value::Null) => Err(ApiError::bad("prompt is required", Some("prompt"))),
        Some(Value::String(s)) => Ok(Input::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(Input::Text(a[0].as_str().unwrap_or("").into()))
        }
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => Err(ApiError::bad(
            "several prompts in one request are not supported: send one request per prompt",
            Some("prompt"),
        )),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|t| t.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32).ok_or_else(bad))
            .collect::<Result<Vec<u32>, _>>()
            .map(Input::Tokens),
        _ => Err(bad()),
    }
}

fn stops(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::bad("stop must be a string or an array of strings", Some("stop")))?,
        Some(_) => return Err(ApiError::bad("stop must be a string or an array of strings", Some("stop"))),
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::bad(format!("stop holds at most {MAX_STOP} sequences"), Some("stop")));
    }
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

/// Fields whose meaning this server cannot give, with the value that asks for nothing (any
/// other is refused, 400 naming the field, rather than silently answered as if it were absent:
/// a client that asked for tool calls, JSON output or its prompt echoed would get a plain answer
/// it takes for the one it asked). Fields that only describe the caller (`user`, `metadata`,
/// `store`, `service_tier`, ...) stay ignored.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("tools", "tool calls are not supported"),
    ("tool_choice", "tool calls are not supported"),
    ("functions", "function calls are not supported"),
    ("function_call", "function calls are not supported"),
    ("response_format", "only {\"type\": \"text\"} output is supported"),
    ("echo", "echo is not supported: the answer never holds the prompt"),
    ("suffix", "suffix (insertion) is not supported"),
    ("best_of", "best_of must be 1: one completion is generated per request"),
];

/// Whether `v` asks for nothing for the field `key` (absent, null, false, empty, "none",
/// `{"type": "text"}`, `best_of` 1).
fn asks_nothing(key: &str, v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(t) => t.is_empty() || (key == "tool_choice" || key == "function_call") && t == "none",
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty() || key == "response_format" && m.get("type") == Some(&json!("text")),
        Value::Number(n) => key == "best_of" && n.as_i64() == Some(1),
        Value::Bool(true) => false,
    }
}

fn refuse_unsupported(o: &Map<String, Value>) -> Result<(), ApiError> {
    for (key, why) in UNSUPPORTED {
        if let Some(v) = o.get(*key)
            && !asks_nothing(key, v)
        {
            return Err(ApiError::bad(format!("{key} = {v} is refused: {why} by this server"), Some(key)));
        }
    }
    Ok(())
}

impl Params {
    /// Parses a request body for `endpoint`. Unknown fields are ignored, as OpenAI-compatible
    /// servers do; known ones of the wrong type or range are refused (400).
    pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Params, ApiError> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}"), None))?;
        let o = v.as_object().ok_or_else(|| ApiError::bad("the request body must be a JSON object", None))?;
        match o.get("n") {
            None | Some(Value::Null) => {}
            Some(v) if v.as_i64() == Some(1) => {}
            Some(v) => {
                return Err(ApiError::bad(
                    format!("n must be 1, got {v}: this server returns one choice per request (send n requests)"),
                    Some("n"),
                ));
            }
        }
        // Log probabilities are not computed: asking for them is refused, not silently ignored.
        for key in ["logprobs", "top_logprobs"] {
            match o.get(key) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(v) if v.as_i64() == Some(0) && key == "logprobs" => {}
                Some(v) => {
                    return Err(ApiError::bad(
                        format!("{key} = {v} is not supported: this server does not return log probabilities"),
                        Some(key),
                    ));
                }
            }
        }
        refuse_unsupported(o)?;
        let input = match endpoint {
            Endpoint::Chat => Input::Messages(messages(o.get("messages"))?),
            Endpoint::Text => prompt(o.get("prompt"))?,
        };
        let model = match o.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(ApiError::bad("model must be a string", Some("model"))),
        };
        let flag = |key: &str| -> Result<bool, ApiError> {
            match o.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(ApiError::bad(format!("{key} must be true or false"), Some(key))),
            }
        };
        let stream = flag("stream")?;
        let include_usage = match o.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(so)) => match so.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::bad(
                        "stream_options.include_usage must be true or false",
                        Some("stream_options"),
                    ));
                }
            },
            Some(_) => return Err(ApiError::bad("stream_options must be an object", Some("stream_options"))),
        };
        let max_tokens = match integer(o, "max_completion_tokens", 1, u32::MAX as i64)? {
            Some(n) => Some(n),
            None => integer(o, "max_tokens", 1, u32::MAX as i64)?,
        };
        let f = |x: Option<f64>| x.map(|x| x as f32);
        Ok(Params {
            model,
            input: Some(input),
            stream,
            include_usage,
            max_tokens: max_tokens.map(|n| n as usize),
            temperature: f(number(o, "temperature", 0.0, 2.0)?),
            top_p: f(number(o, "top_p", 0.0, 1.0)?),
            top_k: integer(o, "top_k", 0, 1 << 20)?.map(|k| k as usize),
            seed: integer(o, "seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
            stop: stops(o.get("stop"))?,
            presence_penalty: f(number(o, "presence_penalty", -2.0, 2.0)?),
            frequency_penalty: f(number(o, "frequency_penalty", -2.0, 2.0)?),
            repeat_penalty: f(number(o, "repeat_penalty", 0.0, 10.0)?),
            repeat_last_n: integer(o, "repeat_last_n", -1, 1 << 20)?,
            ignore_eos: flag("ignore_eos")?,
            logit_bias: logit_bias(o.get("logit_bias"))?,
        })
    }
}

/// OpenAI's `logit_bias`: an object mapping token ids (as strings) to biases (numbers).
fn logit_bias(v: Option<&Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let map = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ApiError::bad("logit_bias must be an object of token id -> bias", Some("logit_bias"))),
    };
    let max = crate::engine::sampler::MAX_LOGIT_BIAS;
    if map.len() > max {
        return Err(ApiError::bad(
            format!("logit_bias holds at most {max} tokens, got {}", map.len()),
            Some("logit_bias"),
        ));
    }
    map.iter()
        .map(|(k, v)| {
            // Canonical decimal only: "+5" or "05" would be a second key for token 5.
            let id =
                k.parse::<u32>().ok().filter(|id| id.to_string() == *k).ok_or_else(|| {
                    ApiError::bad(format!("logit_bias key {k:?} is not a token id"), Some("logit_bias"))
                })?;
            match v.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(ApiError::bad(
                    format!("logit_bias values must be numbers from -100 to 100, got {v} for token {id}"),
                    Some("logit_bias"),
                )),
            }
        })
        .collect()
}

/// Finds stop strings in generated text as it streams: text that could still be the start of a
/// stop string is held back until the next piece says whether it is; the stop string itself and
/// everything after it are never released.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops, held: String::new() }
    }

    /// Adds `piece`; returns the text now safe to emit, and whether a stop string was found
    /// (then nothing after it is emitted, ever).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // The longest tail of `held` that begins some stop string stays held.
        let keep = (1..=self.held.len())
            .rev()
            .filter(|&n| self.held.is_char_boundary(self.held.len() - n))
            .find(|&n| {
                let tail = &self.held[self.held.len() - n..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// What is still held at the end of the generation (it never became a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// `usage` as OpenAI writes it.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// The `object` of a whole response and of a stream chunk.
pub fn object_names(endpoint: Endpoint) -> (&'static str, &'static str) {
    match endpoint {
        Endpoint::Chat => ("chat.completion", "chat.completion.chunk"),
        Endpoint::Text => ("text_completion", "text_completion"),
    }
}

/// A whole (non-streamed) response.
pub fn response(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish_reason: &str,
    usage: Value,
) -> Value {
    let choice = match endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason,
        }),
        Endpoint::Text => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}),
    };
    json!({
        "id": id,
        "object": object_names(endpoint).0,
        "created": created,
        "model": model,
        "system_fingerprint": "shardnet",
        "choices": [choice],
        "usage": usage,
    })
}

/// One stream chunk: `text` (the chat's first chunk also carries the role), or the last one with
/// `finish_reason`; `usage` is null in every chunk when the client asked for a usage chunk.
pub fn chunk(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    text: Option<&str>,
    first: bool,
    finish_reason: Option<&str>,
    null_usage: bool,
) -> Value {
    let choice = match endpoint {
        Endpoint::Chat => {
            let mut delta = Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
        }
        Endpoint::Text => {
            json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish_reason})
        }
    };
    let mut v = json!({
        "id": id,
        "object": object_names(endpoint).1,
        "created": created,
        "model": model,
        "system_fingerprint": "shardnet",
        "choices": [choice],
    });
    if null_usage {
        v["usage"] = Value::Null;
    }
    v
}

/// The usage chunk that ends a stream when `stream_options.include_usage` is set.
pub fn usage_chunk(endpoint: Endpoint, id: &str, created: u64, model: &str, usage: Value) -> Value {
    json!({
        "id": id,
        "object": object_names(endpoint).1,
        "created": created,
        "model": model,
        "system_fingerprint": "shardnet",
        "choices": [],
        "usage": usage,
    })
}

/// `GET /v1/models`.
pub fn models(model: &str, created: u64) -> Value {
    json!({"object": "list", "data": [model_object(model, created)]})
}

/// `GET /v1/models/{model}`: one model object (the openai client's `models.retrieve`).
pub fn model_object(model: &str, created: u64) -> Value {
    json!({"id": model, "object": "model", "created": created, "owned_by": "shardnet"})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(e: Endpoint, body: &str) -> Result<Params, ApiError> {
        Params::parse(e, body.as_bytes())
    }

    #[test]
    fn a_chat_request_parses_with_openai_and_llama_cpp_fields() {
        let p = parse(
            Endpoint::Chat,
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],
               "stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"max_completion_tokens":7,
               "temperature":0.5,"top_p":0.9,"top_k":10,"seed":-1,"stop":"\n","presence_penalty":0.5,
               "frequency_penalty":-0.5,"repeat_penalty":1.1,"repeat_last_n":-1,"n":1}"#,
        )
        .unwrap();
        assert_eq!(
            p.input,
            Some(Input::Messages(vec![
                Message { role: "system".into(), content: "be brief".into() },
                Message { role: "user".into(), content: "hi".into() },
            ]))
        );
        assert!(p.stream && p.include_usage);
        assert_eq!(p.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!((p.top_k, p.seed, p.repeat_last_n), (Some(10), Some(u64::MAX), Some(-1)));
        assert_eq!(p.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn bad_requests_name_their_field() {
        let param = |e, b: &str| parse(e, b).unwrap_err().param;
        assert_eq!(parse(Endpoint::Chat, "{\"messages\":").unwrap_err().status, 400);
        assert_eq!(param(Endpoint::Chat, r#"{"messages":[]}"#).as_deref(), Some("messages"));
        assert_eq!(param(Endpoint::Chat, r#"{}"#).as_deref(), Some("messages"));
        assert_eq!(
            param(Endpoint::Chat, r#"{"messages":[{"role":"wizard","content":"x"}]}"#).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            param(Endpoint::Chat, r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#).as_deref(),
            Some("n")
        );
        for n in ["0", "-1", "1.5", "\"1\""] {
            let e = parse(Endpoint::Chat, &format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"n":{n}}}"#));
            let e = e.unwrap_err();
            assert_eq!(e.param.as_deref(), Some("n"));
            assert!(e.message.contains("n must be 1"), "{}", e.message);
        }
        let chat = |extra: &str| format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
        assert_eq!(param(Endpoint::Chat, &chat(r#","logprobs":true"#)).as_deref(), Some("logprobs"));
        assert_eq!(param(Endpoint::Chat, &chat(r#","top_logprobs":2"#)).as_deref(), Some("top_logprobs"));
        assert_eq!(param(Endpoint::Text, r#"{"prompt":"x","logprobs":3}"#).as_deref(), Some("logprobs"));
        assert!(parse(Endpoint::Chat, &chat(r#","logprobs":false,"n":1"#)).is_ok());
        // Asked-for behaviour this server cannot give is refused, naming the field; the value
        // that asks for nothing passes.
        for (extra, field) in [
            (r#","tools":[{"type":"function","function":{"name":"f"}}]"#, "tools"),
            (r#","tool_choice":"required""#, "tool_choice"),
            (r#","response_format":{"type":"json_object"}"#, "response_format"),
            (r#","functions":[{"name":"f"}]"#, "functions"),
        ] {
            assert_eq!(param(Endpoint::Chat, &chat(extra)).as_deref(), Some(field), "{extra}");
        }
        for extra in [
            r#","tools":[]"#,
            r#","tool_choice":"none""#,
            r#","response_format":{"type":"text"}"#,
            r#","logit_bias":{}"#,
            r#","user":"u1""#,
            r#","metadata":{"a":"b"}"#,
        ] {
            assert!(parse(Endpoint::Chat, &chat(extra)).is_ok(), "{extra}");
        }
        assert_eq!(param(Endpoint::Text, r#"{"prompt":"x","echo":true}"#).as_deref(), Some("echo"));
        assert_eq!(param(Endpoint::Text, r#"{"prompt":"x","suffix":"y"}"#).as_deref(), Some("suffix"));
        assert_eq!(param(Endpoint::Text, r#"{"prompt":"x","best_of":2}"#).as_deref(), Some("best_of"));
        assert!(parse(Endpoint::Text, r#"{"prompt":"x","echo":false,"suffix":null,"best_of":1}"#).is_ok());
        assert!(parse(Endpoint::Text, r#"{"prompt":"x","logprobs":0}"#).is_ok());
        assert_eq!(param(Endpoint::Text, r#"{"prompt":"x","temperature":3}"#).as_deref(), Some("temperature"));
        assert_eq!(param(Endpoint::Text, r#"{"prompt":"x","max_tokens":0}"#).as_deref(), Some("max_tokens"));
        assert_eq!(param(Endpoint::Text, r#"{"prompt":"x","stop":["a","b","c","d","e"]}"#).as_deref(), Some("stop"));
        assert_eq!(param(Endpoint::Text, r#"{"prompt":["a","b"]}"#).as_deref(), Some("prompt"));
        // logit_bias: token id strings to numbers in [-100, 100] (ids are checked against the
        // vocabulary when the request is prepared).
        let text = |extra: &str| format!(r#"{{"prompt":"x"{extra}}}"#);
        let p = parse(Endpoint::Text, &text(r#","logit_bias":{"7":-100,"12":2.5}"#)).unwrap();
        let mut bias = p.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(7, -100.0), (12, 2.5)]);
        for bad in [
            r#"{"-1":1}"#,
            r#"{"1.5":1}"#,
            r#"{"x":1}"#,
            r#"{"+5":1}"#,
            r#"{"05":1}"#,
            r#"{" 5":1}"#,
            r#"{"1":101}"#,
            r#"{"1":"5"}"#,
            r#"[1]"#,
            r#"{"1":1e308}"#,
        ] {
            let e = parse(Endpoint::Text, &text(&format!(r#","logit_bias":{bad}"#))).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some("logit_bias")), "{bad}: {}", e.message);
        }
        let big: Vec<String> = (0..2000).map(|i| format!(r#""{i}":1"#)).collect();
        assert_eq!(
            param(Endpoint::Text, &text(&format!(r#","logit_bias":{{{}}}"#, big.join(",")))).as_deref(),
            Some("logit_bias")
        );
        let tool = r#","tools":[{"type":"function","function":{"name":"f"}}]"#;
        assert_eq!(param(Endpoint::Chat, &chat(tool)).as_deref(), Some("tools"));
        assert_eq!(param(Endpoint::Chat, &chat(r#","tool_choice":"required""#)).as_deref(), Some("tool_choice"));
        assert!(parse(Endpoint::Chat, &chat(r#","tools":[],"tool_choice":"none""#)).is_ok());
        assert_eq!(param(Endpoint::Text, r#"{"prompt":"x","stream":"yes"}"#).as_deref(), Some("stream"));
        assert_eq!(param(Endpoint::Text, "[1]"), None);
        assert_eq!(parse(Endpoint::Text, r#"{"prompt":[1,2,3]}"#).unwrap().input, Some(Input::Tokens(vec![1, 2, 3])));
    }

    #[test]
    fn a_stop_string_split_over_pieces_is_never_emitted() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for piece in ["Hello E", "N", "o, then E", "N", "D and more"] {
            let (text, s) = m.push(piece);
            out.push_str(&text);
            if s {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "Hello ENo, then ");
    }

    #[test]
    fn held_text_is_released_when_it_cannot_be_a_stop() {
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.push("xa"), ("x".to_string(), false));
        assert_eq!(m.push("c"), ("ac".to_string(), false));
        assert_eq!(m.push("é a"), ("é ".to_string(), false));
        assert_eq!(m.finish(), "a");
        let mut none = StopMatcher::new(vec![]);
        assert_eq!(none.push("abc"), ("abc".to_string(), false));
    }

    #[test]
    fn the_earliest_stop_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "lo".into()]);
        assert_eq!(m.push("hello world"), ("hel".to_string(), true));
    }

    #[test]
    fn chunks_and_responses_have_openai_shapes() {
        let c = chunk(Endpoint::Chat, "id", 1, "m", Some("hi"), true, None, true);
        assert_eq!(c["choices"][0]["delta"], json!({"role": "assistant", "content": "hi"}));
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["usage"].is_null() && c.get("usage").is_some());
        let r = response(Endpoint::Text, "id", 1, "m", "x", "length", usage(3, 2));
        assert_eq!(r["choices"][0]["text"], "x");
        assert_eq!(r["usage"]["total_tokens"], 5);
        assert_eq!(ApiError::bad("m", Some("p")).to_json()["error"]["param"], "p");
    }
}
