//! Text generation with a whole model in one process (`shardctl generate`): the reference a
//! pipeline across nodes is compared with, and the engine's benchmark driver.

use super::sampler::Sampler;
use super::tokenizer::{Style, Tokenizer};
use super::{Engine, EngineError, Input, Output, Want};
use std::time::Instant;

/// Turns token ids into text as they come, holding back bytes of an unfinished UTF-8 character.
pub struct TextStream<'t> {
    tok: &'t Tokenizer,
    pending: Vec<u8>,
    at_start: bool,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t Tokenizer) -> TextStream<'t> {
        TextStream { tok, pending: Vec::new(), at_start: true }
    }

    pub fn push(&mut self, id: u32) -> String {
        self.pending.extend(self.tok.token_bytes(id));
        if self.at_start && self.tok.style() == Style::Spm && self.pending.first() == Some(&b' ') {
            self.pending.remove(0);
        }
        if !self.pending.is_empty() {
            self.at_start = false;
        }
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(), // invalid bytes: let from_utf8_lossy replace them
        };
        let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        out
    }

    /// Whatever is still held back (an incomplete character at the end).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[derive(Clone, Debug, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Logits after the prompt, and after the last generated token was fed back (if any).
    pub prefill_logits: Vec<f32>,
    pub final_logits: Vec<f32>,
}

/// Prefills `prompt` in batches of `batch` tokens, then samples `n` tokens (stopping early at an
/// end-of-generation token when `stop_at_eog`), calling `on_token` for each. The model must be
/// loaded whole (first and last layer) as `shard_id`.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    engine: &mut Engine,
    shard_id: u32,
    session: &str,
    tok: Option<&Tokenizer>,
    prompt: &[u32],
    n: usize,
    batch: usize,
    sampler: &mut Sampler,
    stop_at_eog: bool,
    mut on_token: impl FnMut(u32),
) -> Result<GenStats, EngineError> {
    let mut stats = GenStats { prompt_tokens: prompt.len(), ..Default::default() };
    let t0 = Instant::now();
    let mut logits = Vec::new();
    let mut pos = 0u32;
    for chunk in prompt.chunks(batch.max(1)) {
        logits = last_logits(engine.execute(
            shard_id,
            session,
            pos,
            &Input::Tokens(chunk.to_vec()),
            Want::Logits { all: false },
        )?);
        pos += chunk.len() as u32;
    }
    stats.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    stats.prefill_logits = logits.clone();
    sampler.accept_prompt(prompt);
    let t1 = Instant::now();
    for i in 0..n {
        let id = sampler.sample(&logits);
        stats.generated.push(id);
        on_token(id);
        if stop_at_eog && tok.is_some_and(|t| t.is_eog(id)) && i + 1 < n {
            break;
        }
        // Every token is fed back, the last one too, so final_logits compare with a reference
        // that does the same.
        logits = last_logits(engine.execute(
            shard_id,
            session,
            pos,
            &Input::Tokens(vec![id]),
            Want::Logits { all: false },
        )?);
        pos += 1;
    }
    stats.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
    stats.final_logits = if n > 0 { logits } else { Vec::new() };
    engine.end_session(session);
    Ok(stats)
}

fn last_logits(out: Output) -> Vec<f32> {
    match out {
        Output::Logits { data, rows, n_vocab } => data[(rows - 1) * n_vocab..].to_vec(),
        Output::Hidden { .. } => unreachable!("a whole model ends in logits"),
    }
}
