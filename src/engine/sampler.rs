//! Picking the next token from logits: penalties for repeated tokens, then greedy, or temperature
//! with top-k and top-p, from a seeded generator so a run can be repeated exactly.
//!
//! Penalties, in llama.cpp's order (before top-k):
//! - `repeat_penalty` over the last `repeat_last_n` tokens of the prompt and the generated text
//!   (llama.cpp's `penalty_repeat` / `penalty_last_n`): a positive logit is divided by it, a
//!   negative one multiplied, once per distinct token in the window;
//! - `presence_penalty` and `frequency_penalty` (OpenAI's): `logit -= count * frequency_penalty
//!   + (count > 0) * presence_penalty`, where `count` is how often the token was sampled so far
//!   (the prompt does not count), as OpenAI's API reference defines them.

use std::collections::{HashMap, VecDeque};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: all).
    pub top_p: f32,
    pub seed: u64,
    /// llama.cpp's `repeat_penalty`: > 0; 1.0 is off, above 1 discourages repeats.
    pub repeat_penalty: f32,
    /// llama.cpp's `repeat_last_n`: the tokens `repeat_penalty` looks back over; 0 is off, -1 the
    /// whole context.
    pub repeat_last_n: i64,
    /// OpenAI's `presence_penalty`, -2.0..=2.0: subtracted once from a token already sampled.
    pub presence_penalty: f32,
    /// OpenAI's `frequency_penalty`, -2.0..=2.0: subtracted per time a token was sampled.
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: (token id, bias in -100..=100) added to that token's logit before
    /// the penalties and sampling (-100 in effect bans a token, 100 in effect forces it). At most
    /// [`MAX_LOGIT_BIAS`] entries; ids are checked against the vocabulary by the caller.
    pub logit_bias: Vec<(u32, f32)>,
}

/// The most `logit_bias` entries one request may give: each biased token is one more logit the
/// last node sends back every step (see [`Sampler::logits_needed`]).
pub const MAX_LOGIT_BIAS: usize = 1024;

impl Default for SamplerConfig {
    /// Greedy, no penalties; llama.cpp's defaults for the rest (`top_k` 40, `top_p` 0.95,
    /// `repeat_last_n` 64).
    fn default() -> SamplerConfig {
        SamplerConfig {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            seed: 0x5eed,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

/// A sampling parameter out of its range: `param` is the API name (`temperature`, `top_p`,
/// `repeat_penalty`, ...), `reason` says what it must be and what it was.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerError {
    pub param: &'static str,
    pub reason: String,
}

impl std::fmt::Display for SamplerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.param, self.reason)
    }
}

impl std::error::Error for SamplerError {}

impl SamplerConfig {
    /// Checks every parameter's range (NaN and infinities are refused).
    pub fn validate(&self) -> Result<(), SamplerError> {
        let err = |param, reason: String| Err(SamplerError { param, reason });
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return err("temperature", format!("must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return err("repeat_penalty", format!("must be > 0 (1 is off), got {}", self.repeat_penalty));
        }
        if self.repeat_last_n < -1 {
            return err("repeat_last_n", format!("must be >= -1 (-1: the whole context), got {}", self.repeat_last_n));
        }
        for (param, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return err(param, format!("must be in [-2, 2], got {v}"));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return err("logit_bias", format!("holds at most {MAX_LOGIT_BIAS} tokens, got {}", self.logit_bias.len()));
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return err("logit_bias", format!("values must be in [-100, 100], got {b} for token {id}"));
        }
        Ok(())
    }

    fn repeat_active(&self) -> bool {
        self.repeat_penalty != 1.0 && self.repeat_last_n != 0
    }

    fn counts_active(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    state: u64,
    /// The last `repeat_last_n` tokens, prompt and generated (only while `repeat_penalty` is on).
    recent: VecDeque<u32>,
    /// How often each token in `recent` occurs there.
    recent_count: HashMap<u32, u32>,
    /// How often each token was sampled (only while presence or frequency penalties are on).
    sampled: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let state = cfg.seed ^ 0x9E37_79B9_7F4A_7C15;
        Sampler { cfg, state, recent: VecDeque::new(), recent_count: HashMap::new(), sampled: HashMap::new() }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Feeds the prompt's tokens into the `repeat_last_n` window (as llama.cpp does), before the
    /// first `sample`.
    pub fn accept_prompt(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.push_recent(t);
        }
    }

    fn push_recent(&mut self, t: u32) {
        if !self.cfg.repeat_active() {
            return;
        }
        // -1: the whole context; a session never holds more tokens than that.
        let cap = usize::try_from(self.cfg.repeat_last_n).unwrap_or(usize::MAX);
        if self.recent.len() == cap
            && let Some(old) = self.recent.pop_front()
            && let Some(c) = self.recent_count.get_mut(&old)
        {
            *c -= 1;
            if *c == 0 {
                self.recent_count.remove(&old);
            }
        }
        self.recent.push_back(t);
        *self.recent_count.entry(t).or_default() += 1;
    }

    /// How many of the best logits `sample` needs to see to pick exactly as it would from all of
    /// them: `Some(k)` when the top k suffice (greedy: 1; top-k sampling: k, plus every token a
    /// penalty may lower, since it can drop out of the top), `None` when it needs every logit
    /// (`top_k` 0, or a penalty that can raise a token: `repeat_penalty` < 1, a negative
    /// presence or frequency penalty, a positive `logit_bias`; a negative one lowers its token as
    /// a penalty does). A coordinator asks the last node for that many.
    pub fn logits_needed(&self) -> Option<usize> {
        let base = if self.cfg.temperature == 0.0 {
            1
        } else if self.cfg.top_k == 0 {
            return None;
        } else {
            self.cfg.top_k
        };
        let c = &self.cfg;
        if (c.repeat_active() && c.repeat_penalty < 1.0)
            || c.presence_penalty < 0.0
            || c.frequency_penalty < 0.0
            || c.logit_bias.iter().any(|&(_, b)| b > 0.0)
        {
            return None;
        }
        let mut penalized: std::collections::HashSet<u32> = self.recent_count.keys().copied().collect();
        penalized.extend(self.sampled.keys().copied());
        penalized.extend(c.logit_bias.iter().filter(|&&(_, b)| b < 0.0).map(|&(t, _)| t));
        Some(base + penalized.len())
    }

    /// splitmix64: small, fast, and the same on every platform.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `logit_bias` and the penalties applied to `logits` (a copy; `logits` untouched when none
    /// is on).
    fn penalized<'l>(&self, logits: &'l [f32]) -> std::borrow::Cow<'l, [f32]> {
        if self.recent_count.is_empty() && self.sampled.is_empty() && self.cfg.logit_bias.is_empty() {
            return std::borrow::Cow::Borrowed(logits);
        }
        let mut out = logits.to_vec();
        // OpenAI: the bias is added to the logits the model produced, before sampling.
        for &(t, b) in &self.cfg.logit_bias {
            if let Some(l) = out.get_mut(t as usize) {
                *l += b;
            }
        }
        for &t in self.recent_count.keys() {
            if let Some(l) = out.get_mut(t as usize) {
                // llama.cpp: dividing a negative logit would raise it, so it is multiplied.
                *l = if *l <= 0.0 { *l * self.cfg.repeat_penalty } else { *l / self.cfg.repeat_penalty };
            }
        }
        for (&t, &count) in &self.sampled {
            if let Some(l) = out.get_mut(t as usize) {
                *l -= count as f32 * self.cfg.frequency_penalty + self.cfg.presence_penalty;
            }
        }
        std::borrow::Cow::Owned(out)
    }

    /// Picks the next token from one row of logits (`[n_vocab]`; tokens a node did not send are
    /// `-inf`), and records it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let logits = self.penalized(logits);
        let id = self.pick(&logits);
        self.push_recent(id);
        if self.cfg.counts_active() {
            *self.sampled.entry(id).or_default() += 1;
        }
        id
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        // Candidates sorted by logit, cut to top-k.
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        let k = if self.cfg.top_k == 0 { cand.len() } else { self.cfg.top_k.min(cand.len()) };
        if k < cand.len() {
            // Ties broken by id, so the kept set does not depend on where the ties sit.
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            cand.truncate(k);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        self.draw(&cand)
    }

    /// Picks from `cand`, the top-k cut of every logit in the total order `pick` sorts by
    /// (logit descending by `total_cmp`, then id ascending): softmax at the temperature, top-p,
    /// one uniform draw.
    fn draw(&mut self, cand: &[(u32, f32)]) -> u32 {
        // Softmax at the temperature.
        let t = self.cfg.temperature as f64;
        let max = cand[0].1 as f64;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 as f64 - max) / t).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        // Top-p: the shortest prefix reaching p.
        let mut keep = probs.len();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= self.cfg.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut r = self.uniform() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

impl Sampler {
    /// What [`Sampler::sample`] picks from a row of `n_vocab` logits that is `-inf` except at
    /// `top` (a last hop's `top_k` answer: `(id, logit)`, ids below `n_vocab`; a repeated id
    /// counts with its last logit, as when written into the row in order), without building that
    /// row: the same penalties on the same candidates, then greedy's best candidate (lowest id on
    /// ties) or the same top-k cut, padded with the lowest-id `-inf` tokens when `top` holds fewer
    /// than k, given to the same draw. Where the row's result could hinge on its `-inf` tokens
    /// (a candidate at `-inf` or NaN after the penalties, no candidate, `top_k` 0, fewer than two
    /// tokens) it builds the row and calls `sample`. Records the token for the penalties.
    /// Panics on an id at or past `n_vocab` (as indexing the row would).
    pub fn sample_top(&mut self, n_vocab: usize, top: &[(u32, f32)]) -> u32 {
        let dense = |s: &mut Sampler| {
            let mut row = vec![f32::NEG_INFINITY; n_vocab];
            for &(id, l) in top {
                row[id as usize] = l;
            }
            s.sample(&row)
        };
        if n_vocab < 2 || top.is_empty() || (self.cfg.temperature != 0.0 && self.cfg.top_k == 0) {
            return dense(self);
        }
        // One entry per id, its last logit (a stable sort keeps the answer's order within an id).
        let mut cand: Vec<(u32, f32)> = top.to_vec();
        cand.sort_by_key(|c| c.0);
        let mut unique: Vec<(u32, f32)> = Vec::with_capacity(cand.len());
        for c in cand {
            assert!((c.0 as usize) < n_vocab, "token id {} past the vocabulary of {n_vocab}", c.0);
            match unique.last_mut() {
                Some(last) if last.0 == c.0 => *last = c,
                _ => unique.push(c),
            }
        }
        let mut cand = unique;
        // The penalties, as `penalized` does them on the row: the same operations in the same
        // order on each candidate (the row's other tokens stay `-inf` under every one of them).
        if !(self.recent_count.is_empty() && self.sampled.is_empty() && self.cfg.logit_bias.is_empty()) {
            for (t, l) in cand.iter_mut() {
                for &(bt, b) in &self.cfg.logit_bias {
                    if bt == *t {
                        *l += b;
                    }
                }
                if self.recent_count.contains_key(t) {
                    *l = if *l <= 0.0 { *l * self.cfg.repeat_penalty } else { *l / self.cfg.repeat_penalty };
                }
                if let Some(&count) = self.sampled.get(t) {
                    *l -= count as f32 * self.cfg.frequency_penalty + self.cfg.presence_penalty;
                }
            }
        }
        if cand.iter().any(|c| c.1 == f32::NEG_INFINITY || c.1.is_nan()) {
            return dense(self);
        }
        let id = if self.cfg.temperature == 0.0 {
            // `argmax` on the row: every candidate beats the row's `-inf`; among candidates (in
            // id order) the first strictly greater wins, so the lowest id on ties.
            let mut best = cand[0];
            for &c in &cand[1..] {
                if c.1 > best.1 {
                    best = c;
                }
            }
            best.0
        } else {
            // The row's total order: candidates (all above `-inf`) by logit then id, then the
            // `-inf` tokens by id; its first k are what `pick` keeps.
            let k = self.cfg.top_k.min(n_vocab);
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            cand.truncate(k);
            if cand.len() < k {
                let mut ids: Vec<u32> = cand.iter().map(|c| c.0).collect();
                ids.sort_unstable();
                let mut next = 0u32;
                let mut taken = ids.iter().peekable();
                while cand.len() < k {
                    if taken.peek() == Some(&&next) {
                        taken.next();
                    } else {
                        cand.push((next, f32::NEG_INFINITY));
                    }
                    next += 1;
                }
            }
            self.draw(&cand)
        };
        self.push_recent(id);
        if self.cfg.counts_active() {
            *self.sampled.entry(id).or_default() += 1;
        }
        id
    }
}

/// Index of the largest logit; the lowest index on ties (as llama.cpp's greedy sampler). NaN
/// never wins (a NaN at index 0 leaves 0); `-0.0` and `0.0` tie. 0 for an empty slice.
///
/// Same result as `if l > logits[best] { best = i }` over every index, computed in [`LANES`]
/// independent lanes the compiler vectorizes: each lane keeps its largest value and the first
/// chunk holding it. On SmolLM2's 49,152 logits: about 5 us instead of 35 us, once per token in
/// the coordinator and in `shardctl generate`.
pub fn argmax(logits: &[f32]) -> u32 {
    let Some(&first) = logits.first() else { return 0 };
    if first.is_nan() {
        return 0;
    }
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut max = [first; LANES];
    let mut at = [0u32; LANES];
    for (c, chunk) in chunks.enumerate() {
        for j in 0..LANES {
            // Strictly greater: a lane keeps the first chunk where its maximum appears.
            let greater = chunk[j] > max[j];
            max[j] = if greater { chunk[j] } else { max[j] };
            at[j] = if greater { c as u32 } else { at[j] };
        }
    }
    // The lanes' best: the largest value, at its lowest index (a lane that never moved holds
    // `first`, index 0, whatever its own elements).
    let (mut best_value, mut best) = (first, 0u32);
    for j in 0..LANES {
        let index = if at[j] == 0 && max[j] == first { 0 } else { at[j] * LANES as u32 + j as u32 };
        if max[j] > best_value || (max[j] == best_value && index < best) {
            (best_value, best) = (max[j], index);
        }
    }
    let base = (logits.len() - tail.len()) as u32;
    for (i, &l) in tail.iter().enumerate() {
        if l > best_value {
            (best_value, best) = (l, base + i as u32);
        }
    }
    best
}

/// Lanes of [`argmax`]: 16 f32 fill one AVX-512 register or two AVX2 ones.
const LANES: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: one pass, the first strictly greater value wins.
    fn argmax_plain(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    #[test]
    fn argmax_matches_the_plain_pass_on_ties_nan_signed_zeros_and_tails() {
        let mut rng = Sampler::new(SamplerConfig { seed: 5, ..Default::default() });
        let specials = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -0.0, 0.0, 1.0, -1.0];
        for len in (0..70).chain([1000, 49152, 49155]) {
            for round in 0..40 {
                let v: Vec<f32> = (0..len)
                    .map(|_| {
                        let r = rng.next_u64();
                        match round % 4 {
                            // Few distinct values: ties everywhere.
                            0 => (r % 3) as f32,
                            1 => specials[(r % specials.len() as u64) as usize],
                            2 => f32::NEG_INFINITY,
                            _ => (r % 1000) as f32 * 0.01 - 5.0,
                        }
                    })
                    .collect();
                assert_eq!(argmax(&v), argmax_plain(&v), "len {len} round {round}: {v:?}");
            }
        }
        // A lane whose maximum equals element 0 but sits later: index 0 still wins.
        let mut v = vec![0.0f32; 64];
        v[0] = 2.0;
        v[17] = 2.0;
        assert_eq!(argmax(&v), 0);
        v[0] = 1.0;
        assert_eq!(argmax(&v), 17);
    }

    /// OpenAI's `logit_bias`: added to the logits before sampling; -100 bans a token, +100
    /// forces it; a positive bias needs every logit (the token may be outside the top k), a
    /// negative one one more than without it; out-of-range values are refused.
    #[test]
    fn logit_bias_bans_and_forces_tokens() {
        let logits = [0.0, 0.5, 9.0, 1.0];
        let with = |bias: Vec<(u32, f32)>| SamplerConfig { logit_bias: bias, ..SamplerConfig::default() };
        assert_eq!(Sampler::new(with(vec![(2, -100.0)])).sample(&logits), 3, "the best token banned");
        assert_eq!(Sampler::new(with(vec![(0, 100.0)])).sample(&logits), 0, "the worst token forced");
        assert_eq!(Sampler::new(with(vec![(1, 8.6)])).sample(&logits), 1, "a bias adds to the logit");
        assert_eq!(Sampler::new(with(vec![(99, 5.0)])).sample(&logits), 2, "an id past the logits is no change");
        assert_eq!(Sampler::new(with(vec![(0, 1.0)])).logits_needed(), None);
        assert_eq!(Sampler::new(with(vec![(0, -1.0)])).logits_needed(), Some(2));
        assert_eq!(Sampler::new(with(Vec::new())).logits_needed(), Some(1));
        for b in [100.5, -101.0, f32::NAN, f32::INFINITY] {
            assert_eq!(with(vec![(0, b)]).validate().unwrap_err().param, "logit_bias", "{b}");
        }
        let many = (0..=MAX_LOGIT_BIAS as u32).map(|t| (t, 1.0)).collect();
        assert_eq!(with(many).validate().unwrap_err().param, "logit_bias");
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&[0.0, 0.5, 9.0]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect();
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_k: 1, ..Default::default() });
        assert_eq!(s.sample(&logits), argmax(&logits));
        let cfg = SamplerConfig { temperature: 0.8, top_k: 0, top_p: 1.0, seed: 7, ..Default::default() };
        let run = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone());
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        let (a, b) = (run(&cfg), run(&cfg));
        assert_eq!(a, b);
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 3, "temperature 0.8 should vary");
    }

    #[test]
    fn top_p_keeps_only_the_head() {
        // One token holds ~99.9% of the mass: top-p 0.9 must always pick it.
        let mut logits = vec![0.0f32; 50];
        logits[13] = 10.0;
        let mut s =
            Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 0.9, seed: 1, ..Default::default() });
        assert!((0..200).all(|_| s.sample(&logits) == 13));
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        // Two tokens with logits ln(3) and 0: picked about 3:1.
        let logits = [3f32.ln(), 0.0];
        let mut s =
            Sampler::new(SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 3, ..Default::default() });
        let n = 20_000;
        let zeros = (0..n).filter(|_| s.sample(&logits) == 0).count() as f64 / n as f64;
        assert!((zeros - 0.75).abs() < 0.02, "{zeros}");
    }

    fn greedy(repeat_penalty: f32, repeat_last_n: i64) -> Sampler {
        Sampler::new(SamplerConfig { repeat_penalty, repeat_last_n, ..Default::default() })
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
        // Token 0 leads by 0.1; seen in the prompt, 2.0 / 1.1 = 1.82 < 1.9.
        let mut s = greedy(1.1, 64);
        s.accept_prompt(&[0]);
        assert_eq!(s.sample(&[2.0, 1.9, -5.0]), 1);
        // A negative logit is multiplied (made more negative), never divided toward 0.
        let mut s = greedy(2.0, 64);
        s.accept_prompt(&[0]);
        assert_eq!(s.sample(&[-1.0, -1.5]), 1, "-1.0 * 2 = -2.0 < -1.5");
        let mut s = greedy(2.0, 64);
        s.accept_prompt(&[0]);
        assert_eq!(s.sample(&[-1.0, -2.5]), 0, "-2.0 > -2.5");
        // Once per distinct token, however often it occurs (llama.cpp).
        let mut s = greedy(1.1, 64);
        s.accept_prompt(&[0, 0, 0, 0]);
        assert_eq!(s.sample(&[2.0, 1.85]), 1);
        let mut s = greedy(1.1, 64);
        s.accept_prompt(&[0, 0, 0, 0]);
        assert_eq!(s.sample(&[2.0, 1.8]), 0, "2.0 / 1.1 = 1.818 > 1.8");
    }

    #[test]
    fn repeat_last_n_bounds_the_window() {
        let logits = [2.0, 1.9, 0.0, 0.0];
        // Token 0 was 3 tokens back: inside a window of 3, outside one of 2.
        let mut s = greedy(1.5, 3);
        s.accept_prompt(&[0, 2, 3]);
        assert_eq!(s.sample(&logits), 1);
        let mut s = greedy(1.5, 2);
        s.accept_prompt(&[0, 2, 3]);
        assert_eq!(s.sample(&logits), 0);
        // 0 turns the penalty off; -1 is the whole history.
        let mut s = greedy(1.5, 0);
        s.accept_prompt(&[0]);
        assert_eq!(s.sample(&logits), 0);
        let mut s = greedy(1.5, -1);
        s.accept_prompt(&[0]);
        s.accept_prompt(&[3; 1000]);
        assert_eq!(s.sample(&logits), 1);
        // Sampled tokens enter the window too: greedy alternates instead of repeating.
        let mut s = greedy(1.5, 1);
        let picks: Vec<u32> = (0..4).map(|_| s.sample(&logits)).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_sampled_tokens_only() {
        let base = SamplerConfig { presence_penalty: 0.5, ..Default::default() };
        // The prompt does not count (OpenAI: tokens sampled so far).
        let mut s = Sampler::new(base.clone());
        s.accept_prompt(&[0, 0, 0]);
        assert_eq!(s.sample(&[1.0, 0.8]), 0);
        // Sampled once: 1.0 - 0.5 < 0.8.
        assert_eq!(s.sample(&[1.0, 0.8]), 1);
        // Presence is once per token: 0 (0.5) vs 1 (0.75 - 0.5 = 0.25).
        assert_eq!(s.sample(&[1.0, 0.75]), 0);
        // Frequency grows with the count: after 0 sampled twice, 3.0 - 2 * 0.8 = 1.4 < 1.5.
        let mut s = Sampler::new(SamplerConfig { frequency_penalty: 0.8, ..Default::default() });
        assert_eq!(s.sample(&[3.0, 1.5]), 0);
        assert_eq!(s.sample(&[3.0, 1.5]), 0, "3.0 - 0.8 = 2.2 > 1.5");
        assert_eq!(s.sample(&[3.0, 1.5]), 1, "3.0 - 1.6 = 1.4 < 1.5");
        // A negative penalty raises what was sampled.
        let mut s = Sampler::new(SamplerConfig { presence_penalty: -1.0, ..Default::default() });
        assert_eq!(s.sample(&[0.0, 0.5]), 1);
        assert_eq!(s.sample(&[0.9, 0.5]), 1, "0.5 + 1 > 0.9");
    }

    /// What a coordinator relies on: sampling from only the `logits_needed()` best logits (the
    /// rest -inf, as a node's top_k answer gives them) picks what sampling from all would.
    #[test]
    fn logits_needed_suffice_to_sample_exactly() {
        let mut rng = Sampler::new(SamplerConfig { seed: 99, ..Default::default() });
        let configs = [
            SamplerConfig { repeat_penalty: 1.3, repeat_last_n: 8, ..Default::default() },
            SamplerConfig { presence_penalty: 1.5, frequency_penalty: 0.7, ..Default::default() },
            SamplerConfig {
                temperature: 0.9,
                top_k: 5,
                repeat_penalty: 2.0,
                frequency_penalty: 1.0,
                ..Default::default()
            },
        ];
        for cfg in configs {
            let (mut full, mut sparse) = (Sampler::new(cfg.clone()), Sampler::new(cfg.clone()));
            let prompt: Vec<u32> = (0..6).map(|_| (rng.next_u64() % 30) as u32).collect();
            full.accept_prompt(&prompt);
            sparse.accept_prompt(&prompt);
            for step in 0..200 {
                // Few distinct values, so the penalised tokens often sit just above the cut.
                let logits: Vec<f32> = (0..30).map(|_| (rng.next_u64() % 12) as f32 * 0.25).collect();
                let k = sparse.logits_needed().expect("these penalties only lower logits");
                let mut order: Vec<usize> = (0..logits.len()).collect();
                order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
                let mut top = vec![f32::NEG_INFINITY; logits.len()];
                for &i in order.iter().take(k) {
                    top[i] = logits[i];
                }
                assert_eq!(full.sample(&logits), sparse.sample(&top), "{cfg:?}, step {step}, k {k}");
            }
        }
        // Penalties that can raise a token need every logit, as does top_k 0.
        for cfg in [
            SamplerConfig { repeat_penalty: 0.9, ..Default::default() },
            SamplerConfig { presence_penalty: -0.1, ..Default::default() },
            SamplerConfig { temperature: 1.0, top_k: 0, ..Default::default() },
        ] {
            assert_eq!(Sampler::new(cfg).logits_needed(), None);
        }
        assert_eq!(Sampler::new(SamplerConfig::default()).logits_needed(), Some(1));
    }

    /// The coordinator's sparse path: `sample_top` on a last hop's top-k answer picks what
    /// `sample` picks on the row that answer makes (`-inf` elsewhere, a repeated id's last logit),
    /// step after step (the penalties' state moving alike), over greedy, temperature with top-k
    /// and top-p, every penalty and bias, ties (few distinct logits, `0.0` against `-0.0`), fewer
    /// candidates than `top_k`, and logits that overflow to infinities.
    #[test]
    fn sample_top_picks_as_sample_on_the_row() {
        let mut rng = Sampler::new(SamplerConfig { seed: 41, ..Default::default() });
        let mut cases = 0;
        for round in 0..600 {
            let mut r = |n: u64| rng.next_u64() % n;
            let n_vocab = 2 + r(40) as usize;
            let greedy = r(3) == 0;
            let cfg = SamplerConfig {
                temperature: if greedy { 0.0 } else { [0.3, 0.8, 1.0, 2.5][r(4) as usize] },
                top_k: [1, 2, 3, 5, 8, 40, 64][r(7) as usize],
                top_p: [1.0, 0.95, 0.5, 0.1][r(4) as usize],
                seed: round,
                repeat_penalty: [1.0, 1.0, 1.3, 0.8, 2.0][r(5) as usize],
                repeat_last_n: [64, 4, -1][r(3) as usize],
                presence_penalty: [0.0, 0.0, 0.5, -0.5][r(4) as usize],
                frequency_penalty: [0.0, 0.0, 0.7, -0.3][r(4) as usize],
                logit_bias: (0..r(4))
                    .map(|_| (r(n_vocab as u64) as u32, [-100.0, -1.5, 0.5, 3.0][r(4) as usize]))
                    .collect(),
            };
            let (mut dense, mut sparse) = (Sampler::new(cfg.clone()), Sampler::new(cfg.clone()));
            let prompt: Vec<u32> = (0..r(8)).map(|_| r(n_vocab as u64) as u32).collect();
            dense.accept_prompt(&prompt);
            sparse.accept_prompt(&prompt);
            for step in 0..20 {
                let m = 1 + r(n_vocab.min(12) as u64) as usize;
                let top: Vec<(u32, f32)> = (0..m)
                    .map(|_| {
                        let id = r(n_vocab as u64) as u32;
                        let l = match r(12) {
                            0 => 0.0,
                            1 => -0.0,
                            2 => -3.0e38,
                            3 => f32::INFINITY,
                            4 => f32::NEG_INFINITY,
                            _ => (r(6) as f32 - 2.0) * 0.5,
                        };
                        (id, l)
                    })
                    .collect();
                let mut row = vec![f32::NEG_INFINITY; n_vocab];
                for &(id, l) in &top {
                    row[id as usize] = l;
                }
                let (a, b) = (dense.sample(&row), sparse.sample_top(n_vocab, &top));
                assert_eq!(a, b, "round {round} step {step}: {cfg:?}, n_vocab {n_vocab}, top {top:?}");
                cases += 1;
            }
        }
        assert_eq!(cases, 600 * 20);
        // Ties go to the lowest id, as argmax on the row breaks them, whatever the answer's order.
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample_top(10, &[(7, 1.0), (3, 1.0), (5, 0.5)]), 3);
        assert_eq!(s.sample_top(10, &[(7, 0.0), (4, -0.0)]), 4, "0.0 and -0.0 tie");
        assert_eq!(s.sample_top(10, &[(7, 2.0), (3, 1.0), (7, 0.5)]), 3, "a repeated id keeps its last logit");
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let bad = [
            (SamplerConfig { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplerConfig { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplerConfig { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplerConfig { repeat_penalty: 0.0, ..Default::default() }, "repeat_penalty"),
            (SamplerConfig { repeat_penalty: f32::INFINITY, ..Default::default() }, "repeat_penalty"),
            (SamplerConfig { repeat_last_n: -2, ..Default::default() }, "repeat_last_n"),
            (SamplerConfig { presence_penalty: 2.5, ..Default::default() }, "presence_penalty"),
            (SamplerConfig { frequency_penalty: -2.01, ..Default::default() }, "frequency_penalty"),
            (SamplerConfig { frequency_penalty: f32::NAN, ..Default::default() }, "frequency_penalty"),
        ];
        for (cfg, param) in bad {
            assert_eq!(cfg.validate().unwrap_err().param, param, "{cfg:?}");
        }
        assert!(
            SamplerConfig { presence_penalty: -2.0, frequency_penalty: 2.0, ..Default::default() }.validate().is_ok()
        );
    }
}
