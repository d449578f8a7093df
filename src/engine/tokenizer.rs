//! Tokenizers for the two vocabulary styles GGUF LLaMA models carry, built to give the same ids
//! as llama.cpp (`llama_tokenize`):
//!
//! - `llama`: SentencePiece-style. Spaces become `▁`, a `▁` is put in front of the text, then
//!   adjacent pieces are merged, highest vocabulary score first; characters with no piece fall
//!   back to `<0xXX>` byte tokens.
//! - `gpt2`: byte-level BPE. The text is cut by the model's pre-tokenizer (GPT-2's pattern, with
//!   digits split one by one for `smollm`-style vocabularies, in runs of up to three for the
//!   default), each piece's bytes mapped to printable characters, then merged by merge rank.
//!
//! Special tokens (control and user-defined) are matched in the text first, longest first;
//! control tokens only when `parse_special` is set, as in llama.cpp.
//!
//! Letter and number classes use Rust's `char::is_alphabetic`/`is_numeric`, which agree with
//! Unicode's `\p{L}`/`\p{N}` except for combining marks that Unicode calls alphabetic (some Indic
//! vowel signs): there llama.cpp may cut a word where this tokenizer does not.

use crate::gguf::reader::{Gguf, MetaValue};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Style {
    Spm,
    Bpe,
}

/// How a BPE vocabulary cuts text before merging (`tokenizer.ggml.pre`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pre {
    /// GPT-2's pattern only.
    Gpt2,
    /// Every digit on its own, then GPT-2's pattern (smollm, starcoder, refact, ...).
    Digits,
    /// llama.cpp's default: punctuation runs, GPT-2's pattern, digits in runs of up to three.
    Default,
}

#[derive(Clone)]
pub struct Tokenizer {
    style: Style,
    pre: Pre,
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Vec<f32>,
    ids: HashMap<String, u32>,
    /// BPE merges: "left right" -> rank.
    ranks: HashMap<String, u32>,
    /// Special tokens to match in raw text, longest first: (text, id, is_control).
    specials: Vec<(String, u32, bool)>,
    byte_tokens: [Option<u32>; 256],
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Extra end-of-generation ids (`eot`, `eom`).
    pub eog: Vec<u32>,
    pub add_bos: bool,
    add_space_prefix: bool,
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to U+0100 onwards.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

/// Where tokenizer keys come from: a GGUF file, or the JSON a node's `MODEL_INFO` carries.
pub trait TokenizerSource {
    fn str(&self, key: &str) -> Option<String>;
    fn u64(&self, key: &str) -> Option<u64>;
    fn bool(&self, key: &str) -> Option<bool>;
    fn strings(&self, key: &str) -> Option<Vec<String>>;
    fn f32s(&self, key: &str) -> Option<Vec<f32>>;
    fn i32s(&self, key: &str) -> Option<Vec<i32>>;
}

impl TokenizerSource for Gguf<'_> {
    fn str(&self, key: &str) -> Option<String> {
        self.get_str(key).map(str::to_string)
    }
    fn u64(&self, key: &str) -> Option<u64> {
        self.get_u64(key)
    }
    fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn strings(&self, key: &str) -> Option<Vec<String>> {
        match self.get(key)? {
            MetaValue::Array(a) => a.iter().map(|v| v.as_str().map(str::to_string)).collect(),
            _ => None,
        }
    }
    fn f32s(&self, key: &str) -> Option<Vec<f32>> {
        match self.get(key)? {
            MetaValue::Array(a) => a.iter().map(|v| v.as_f64().map(|f| f as f32)).collect(),
            _ => None,
        }
    }
    fn i32s(&self, key: &str) -> Option<Vec<i32>> {
        match self.get(key)? {
            MetaValue::Array(a) => a.iter().map(|v| if let MetaValue::I32(t) = v { Some(t) } else { None }).collect(),
            _ => None,
        }
    }
}

impl TokenizerSource for serde_json::Map<String, serde_json::Value> {
    fn str(&self, key: &str) -> Option<String> {
        self.get(key)?.as_str().map(str::to_string)
    }
    fn u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }
    fn bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }
    fn strings(&self, key: &str) -> Option<Vec<String>> {
        self.get(key)?.as_array()?.iter().map(|v| v.as_str().map(str::to_string)).collect()
    }
    fn f32s(&self, key: &str) -> Option<Vec<f32>> {
        self.get(key)?.as_array()?.iter().map(|v| v.as_f64().map(|f| f as f32)).collect()
    }
    fn i32s(&self, key: &str) -> Option<Vec<i32>> {
        self.get(key)?.as_array()?.iter().map(|v| v.as_i64().and_then(|i| i32::try_from(i).ok())).collect()
    }
}

/// Token texts that end generation in any model that has them (llama.cpp's `llama-vocab.cpp`,
/// `special_eog_ids`).
pub const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// The GGUF keys a tokenizer is built from (what `MODEL_INFO` sends).
pub const KEYS: &[&str] = &[
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    // Not the tokenizer's, but what a coordinator needs with it to build chat prompts.
    "tokenizer.chat_template",
];

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, String> {
        Tokenizer::from_source(g)
    }

    pub fn from_source(g: &impl TokenizerSource) -> Result<Tokenizer, String> {
        let model = g.str("tokenizer.ggml.model").ok_or("the file has no tokenizer (tokenizer.ggml.model)")?;
        let style = match model.as_str() {
            "llama" => Style::Spm,
            "gpt2" => Style::Bpe,
            other => return Err(format!("tokenizer model {other:?} is not supported (llama, gpt2)")),
        };
        let tokens = g.strings("tokenizer.ggml.tokens").ok_or("tokenizer.ggml.tokens is missing or not strings")?;
        let n = tokens.len();
        let mut types =
            g.i32s("tokenizer.ggml.token_type").filter(|t| t.len() == n).unwrap_or_else(|| vec![TYPE_NORMAL; n]);
        let scores = g.f32s("tokenizer.ggml.scores").filter(|s| s.len() == n).unwrap_or_else(|| vec![0.0; n]);
        let mut ids = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let mut ranks = HashMap::new();
        if style == Style::Bpe {
            let merges = g.strings("tokenizer.ggml.merges").ok_or("a gpt2 tokenizer needs tokenizer.ggml.merges")?;
            for (rank, m) in merges.into_iter().enumerate() {
                ranks.entry(m).or_insert(rank as u32);
            }
        }
        let pre = match g.str("tokenizer.ggml.pre").as_deref().unwrap_or("default") {
            "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => Pre::Gpt2,
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
                Pre::Digits
            }
            _ => Pre::Default,
        };
        let id = |key: &str| g.u64(key).and_then(|v| u32::try_from(v).ok()).filter(|&v| (v as usize) < n);
        // End of generation: the eot/eom ids the metadata names, and, as llama.cpp does whatever
        // the metadata says, every token whose text is an end-of-turn marker (SmolLM2's
        // `<|im_end|>`, Llama 3's `<|eot_id|>`, ...), made a control token (never printed).
        let mut eog: Vec<u32> =
            ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"].iter().filter_map(|k| id(k)).collect();
        for (i, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&t.as_str()) {
                types[i] = TYPE_CONTROL;
                if !eog.contains(&(i as u32)) {
                    eog.push(i as u32);
                }
            }
        }
        let mut specials: Vec<(String, u32, bool)> = types
            .iter()
            .enumerate()
            .filter(|(i, t)| (**t == TYPE_CONTROL || **t == TYPE_USER_DEFINED) && !tokens[*i].is_empty())
            .map(|(i, t)| (tokens[i].clone(), i as u32, *t == TYPE_CONTROL))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = match style {
                Style::Spm => ids.get(&format!("<0x{b:02X}>")).copied(),
                Style::Bpe => ids.get(&byte_to_char()[b].to_string()).copied(),
            };
        }
        let flag = |key: &str, default: bool| g.bool(key).unwrap_or(default);
        Ok(Tokenizer {
            style,
            pre,
            add_bos: flag("tokenizer.ggml.add_bos_token", style == Style::Spm),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", style == Style::Spm),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            eog,
            tokens,
            types,
            scores,
            ids,
            ranks,
            specials,
            byte_tokens,
        })
    }

    pub fn style(&self) -> Style {
        self.style
    }
    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// Whether generation should stop at `id` (end of sequence or turn).
    pub fn is_eog(&self, id: u32) -> bool {
        Some(id) == self.eos || self.eog.contains(&id)
    }

    /// The model's BOS token, when it has one and its metadata asks for it at the start of a
    /// prompt (`tokenizer.ggml.add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Token ids of `text`. `add_bos` puts the model's BOS first when its metadata asks for one;
    /// `parse_special` lets control tokens written in the text (`<|im_start|>`) become those tokens.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_bos && self.add_bos {
            out.extend(self.bos);
        }
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Special(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    match self.style {
                        Style::Spm => {
                            let mut s = String::with_capacity(t.len() + 3);
                            if self.add_space_prefix && prev_special {
                                s.push('▁');
                            }
                            s.push_str(&t.replace(' ', "▁"));
                            self.spm(&s, &mut out);
                        }
                        Style::Bpe => self.bpe(t, &mut out),
                    }
                    prev_special = false;
                }
            }
        }
        out
    }

    /// The raw bytes a token stands for (a piece may be part of a UTF-8 character).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else { return Vec::new() };
        let ty = self.types[id as usize];
        if ty == TYPE_CONTROL || ty == TYPE_UNKNOWN || ty == 5 {
            return Vec::new();
        }
        match self.style {
            Style::Spm => {
                if ty == TYPE_BYTE
                    && let Some(b) = text.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'))
                {
                    return u8::from_str_radix(b, 16).map(|b| vec![b]).unwrap_or_default();
                }
                text.replace('▁', " ").into_bytes()
            }
            Style::Bpe => {
                if ty == TYPE_USER_DEFINED {
                    return text.as_bytes().to_vec();
                }
                let table = byte_to_char();
                text.chars()
                    .flat_map(|c| match table.iter().position(|&t| t == c) {
                        Some(b) => vec![b as u8],
                        None => c.to_string().into_bytes(),
                    })
                    .collect()
            }
        }
    }

    /// Text of a token sequence. SentencePiece's leading space (added by `encode`) is dropped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id)).collect();
        if self.style == Style::Spm && self.add_space_prefix && bytes.first() == Some(&b' ') {
            bytes.remove(0);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = vec![Fragment::Text(text)];
        for (special, id, control) in &self.specials {
            if *control && !parse_special {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Fragment::Text(mut t) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = t.find(special.as_str()) {
                    if at > 0 {
                        next.push(Fragment::Text(&t[..at]));
                    }
                    next.push(Fragment::Special(*id));
                    t = &t[at + special.len()..];
                }
                if !t.is_empty() {
                    next.push(Fragment::Text(t));
                }
            }
            frags = next;
        }
        frags
    }

    /// SentencePiece merging over the characters of `text` (spaces already `▁`).
    fn spm(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (at, c)) in text.char_indices().enumerate() {
            syms.push(Sym { start: at, len: c.len_utf8(), prev: i as isize - 1, next: i as isize + 1 });
        }
        if let Some(last) = syms.last_mut() {
            last.next = -1;
        }
        #[derive(PartialEq)]
        struct Bigram {
            score: f32,
            left: usize,
            right: usize,
            size: usize,
        }
        impl Eq for Bigram {}
        impl Ord for Bigram {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                // Highest score first, then leftmost.
                self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        let mut queue = BinaryHeap::new();
        let try_add = |syms: &[Sym], queue: &mut BinaryHeap<Bigram>, left: isize, right: isize| {
            if left < 0 || right < 0 {
                return;
            }
            let (l, r) = (&syms[left as usize], &syms[right as usize]);
            let piece = &text[l.start..r.start + r.len];
            if let Some(&id) = self.ids.get(piece) {
                queue.push(Bigram {
                    score: self.scores[id as usize],
                    left: left as usize,
                    right: right as usize,
                    size: piece.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(&syms, &mut queue, i as isize - 1, i as isize);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (&syms[b.left], &syms[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            let right_next = r.next;
            syms[b.left].len += syms[b.right].len;
            syms[b.right].len = 0;
            syms[b.left].next = right_next;
            if right_next >= 0 {
                syms[right_next as usize].prev = b.left as isize;
            }
            let prev = syms[b.left].prev;
            try_add(&syms, &mut queue, prev, b.left as isize);
            try_add(&syms, &mut queue, b.left as isize, right_next);
        }
        let mut i = if syms.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let s = &syms[i as usize];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.extend(self.byte_tokens[b as usize]);
                    }
                }
            }
            i = s.next;
        }
    }

    /// Byte-level BPE: pre-tokenize, map bytes to characters, merge by rank: the lowest-ranked
    /// adjacent pair first, the leftmost of equal ranks (llama.cpp's `llm_tokenizer_bpe_session`).
    /// The pairs wait in a min-heap and the symbols form a linked list, so a piece of n characters
    /// costs O(n log n), not the O(n^2) of rescanning after every merge (one 40,000-letter word
    /// took 97 s that way).
    fn bpe(&self, text: &str, out: &mut Vec<u32>) {
        let table = byte_to_char();
        let mut word = String::new();
        let mut pair = String::new();
        let mut syms: Vec<Sym> = Vec::new();
        // (rank, left symbol's start, left index, right index, the pair's length in bytes).
        let mut heap: BinaryHeap<Reverse<(u32, usize, usize, usize, usize)>> = BinaryHeap::new();
        for piece in pre_tokenize(text, self.pre) {
            word.clear();
            word.extend(piece.bytes().map(|b| table[b as usize]));
            syms.clear();
            heap.clear();
            let n = word.chars().count();
            for (i, (at, c)) in word.char_indices().enumerate() {
                let next = if i + 1 < n { i as isize + 1 } else { -1 };
                syms.push(Sym { start: at, len: c.len_utf8(), prev: i as isize - 1, next });
            }
            let mut push = |syms: &[Sym], left: usize, heap: &mut BinaryHeap<_>| {
                let Ok(right) = usize::try_from(syms[left].next) else { return };
                let (l, r) = (&syms[left], &syms[right]);
                pair.clear();
                pair.push_str(&word[l.start..l.start + l.len]);
                pair.push(' ');
                pair.push_str(&word[r.start..r.start + r.len]);
                if let Some(&rank) = self.ranks.get(pair.as_str()) {
                    heap.push(Reverse((rank, l.start, left, right, l.len + r.len)));
                }
            };
            for i in 0..syms.len() {
                push(&syms, i, &mut heap);
            }
            while let Some(Reverse((_, _, left, right, size))) = heap.pop() {
                // Stale: either side merged since this pair was queued.
                let (l, r) = (&syms[left], &syms[right]);
                if l.len == 0 || r.len == 0 || l.next != right as isize || l.len + r.len != size {
                    continue;
                }
                let next = r.next;
                syms[left].len = size;
                syms[left].next = next;
                syms[right].len = 0;
                if let Ok(next) = usize::try_from(next) {
                    syms[next].prev = left as isize;
                }
                if let Ok(prev) = usize::try_from(syms[left].prev) {
                    push(&syms, prev, &mut heap);
                }
                push(&syms, left, &mut heap);
            }
            let mut at = if syms.is_empty() { -1 } else { 0 };
            while let Ok(i) = usize::try_from(at) {
                let sym = &word[syms[i].start..syms[i].start + syms[i].len];
                match self.ids.get(sym) {
                    Some(&id) => out.push(id),
                    None => {
                        for c in sym.chars() {
                            out.extend(self.ids.get(c.to_string().as_str()));
                        }
                    }
                }
                at = syms[i].next;
            }
        }
    }
}

#[derive(Debug)]
enum Fragment<'t> {
    Text(&'t str),
    Special(u32),
}

struct Sym {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

#[derive(Clone, Copy, Default)]
struct Flags {
    letter: bool,
    number: bool,
    space: bool,
    any: bool,
}

fn flags(c: Option<char>) -> Flags {
    match c {
        None => Flags::default(),
        Some(c) => Flags {
            number: c.is_numeric(),
            letter: c.is_alphabetic() && !c.is_numeric(),
            space: c.is_whitespace(),
            any: true,
        },
    }
}

/// Splits `text` by `pre`'s patterns, in order, each applied to the pieces the previous one left.
fn pre_tokenize(text: &str, pre: Pre) -> Vec<&str> {
    fn split_each<'t>(pieces: Vec<&'t str>, f: &dyn Fn(&str) -> Vec<usize>) -> Vec<&'t str> {
        let mut out = Vec::new();
        for p in pieces {
            let mut at = 0;
            for len in f(p) {
                out.push(&p[at..at + len]);
                at += len;
            }
        }
        out
    }
    let mut pieces = vec![text];
    match pre {
        Pre::Gpt2 => pieces = split_each(pieces, &gpt2_split),
        Pre::Digits => {
            pieces = split_each(pieces, &|p| runs(p, |c| c.is_numeric(), 1));
            pieces = split_each(pieces, &gpt2_split);
        }
        Pre::Default => {
            pieces =
                split_each(pieces, &|p| runs(p, |c| c.is_ascii_punctuation() && c != '`' || is_punct(c), usize::MAX));
            pieces = split_each(pieces, &gpt2_split);
            pieces = split_each(pieces, &|p| runs(p, |c| c.is_numeric(), usize::MAX));
            pieces = split_each(pieces, &|p| runs(p, |c| c.is_ascii_digit(), 3));
        }
    }
    pieces
}

/// `\p{P}` beyond ASCII: the general punctuation block and CJK/fullwidth punctuation.
fn is_punct(c: char) -> bool {
    matches!(c as u32, 0x2010..=0x2027 | 0x2030..=0x205E | 0x3001..=0x3003 | 0x3008..=0x3011 | 0xFF01..=0xFF0F)
        || matches!(c, '¡' | '§' | '«' | '¶' | '·' | '»' | '¿')
}

/// Byte lengths of the pieces of `p` when runs of `class` (of at most `max` chars each) are cut out
/// as pieces of their own; the text between runs stays whole.
fn runs(p: &str, class: impl Fn(char) -> bool, max: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut iter = p.char_indices().peekable();
    while let Some((i, c)) = iter.next() {
        if !class(c) {
            continue;
        }
        if i > start {
            out.push(i - start);
        }
        let mut end = i + c.len_utf8();
        let mut n = 1;
        while n < max {
            match iter.peek() {
                Some(&(j, d)) if class(d) => {
                    end = j + d.len_utf8();
                    n += 1;
                    iter.next();
                }
                _ => break,
            }
        }
        out.push(end - i);
        start = end;
    }
    if start < p.len() {
        out.push(p.len() - start);
    }
    out
}

/// GPT-2's pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
/// hand-written as llama.cpp does; returns piece lengths in bytes.
fn gpt2_split(p: &str) -> Vec<usize> {
    let cpts: Vec<(usize, char)> = p.char_indices().collect();
    let n = cpts.len();
    let at = |i: usize| if i < n { Some(cpts[i].1) } else { None };
    let byte = |i: usize| if i < n { cpts[i].0 } else { p.len() };
    let mut out = Vec::new();
    let mut prev = 0usize;
    let mut add = |end: usize, out: &mut Vec<usize>| {
        if end > prev {
            out.push(byte(end) - byte(prev));
        }
        prev = end;
    };
    let mut pos = 0;
    while pos < n {
        let c = cpts[pos].1;
        if c == '\'' && pos + 1 < n {
            let c1 = cpts[pos + 1].1;
            if matches!(c1, 's' | 't' | 'm' | 'd') {
                pos += 2;
                add(pos, &mut out);
                continue;
            }
            if pos + 2 < n {
                let c2 = cpts[pos + 2].1;
                if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    add(pos, &mut out);
                    continue;
                }
            }
        }
        let mut f2 = if c == ' ' { flags(at(pos + 1)) } else { flags(Some(c)) };
        if f2.letter {
            pos += (c == ' ') as usize;
            while f2.letter {
                pos += 1;
                f2 = flags(at(pos));
            }
            add(pos, &mut out);
            continue;
        }
        if f2.number {
            pos += (c == ' ') as usize;
            while f2.number {
                pos += 1;
                f2 = flags(at(pos));
            }
            add(pos, &mut out);
            continue;
        }
        if !(f2.space || f2.letter || f2.number) && f2.any {
            pos += (c == ' ') as usize;
            while !(f2.space || f2.letter || f2.number) && f2.any {
                pos += 1;
                f2 = flags(at(pos));
            }
            add(pos, &mut out);
            continue;
        }
        let mut spaces = 0;
        while flags(at(pos + spaces)).space {
            spaces += 1;
        }
        if spaces > 1 && at(pos + spaces).is_some() {
            pos += spaces - 1;
            add(pos, &mut out);
            continue;
        }
        if spaces > 0 {
            pos += spaces;
            add(pos, &mut out);
            continue;
        }
        pos += 1;
        add(pos, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE tokenizer over the letters a-d: every single character, and merges
    /// whose ranks make ties, chains and overlaps (`aa` before `ab`, then `aaa`, `aaaa`...).
    fn small_bpe() -> Tokenizer {
        let merges = [
            "a a", "b c", "a b", "aa a", "aa aa", "c d", "ab c", "d d", "aaaa aaaa", "aa b", "b b", "bb bb", "cd cd",
            "aaa a", "d a", "da b",
        ];
        let mut tokens: Vec<String> = (0u8..=255).map(|b| byte_to_char()[b as usize].to_string()).collect();
        for m in merges {
            tokens.push(m.replace(' ', ""));
        }
        let meta = serde_json::json!({
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges,
        });
        Tokenizer::from_source(meta.as_object().unwrap()).unwrap()
    }

    /// The rule itself, slowly: rescan every adjacent pair after each merge, merge the
    /// lowest-ranked, the leftmost on ties.
    fn bpe_by_rescanning(t: &Tokenizer, word: &str) -> Vec<String> {
        let mut syms: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        loop {
            let best = (0..syms.len().saturating_sub(1))
                .filter_map(|i| Some((*t.ranks.get(&format!("{} {}", syms[i], syms[i + 1]))?, i)))
                .min();
            let Some((_, i)) = best else { return syms };
            let right = syms.remove(i + 1);
            syms[i].push_str(&right);
        }
    }

    #[test]
    fn bpe_with_a_heap_merges_as_rescanning_does() {
        let t = small_bpe();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = 1 + (seed % 40) as usize;
            let word: String = (0..len).map(|i| b"abcd"[((seed >> (i % 60)) as usize + i * round) % 4] as char).collect();
            let want: Vec<u32> = bpe_by_rescanning(&t, &word).iter().map(|s| t.ids[s.as_str()]).collect();
            assert_eq!(t.encode(&word, false, false), want, "{word:?}");
        }
        // a a a a a -> aa a a a -> aa aa a -> aa aaa ("aa a" ranks before "aa aa").
        assert_eq!(t.encode("aaaaa", false, false), [t.ids["aa"], t.ids["aaa"]]);
        assert_eq!(t.encode("abc", false, false), [t.ids["a"], t.ids["bc"]], "b c ranks before a b");
    }

    /// One pre-token of 300,000 letters (inside `shardctl serve`'s 1 MiB body) is merged in
    /// bounded time: before, every merge rescanned the word (40,000 letters took 97 s, this
    /// would take hours).
    #[test]
    fn a_word_of_300_000_letters_is_merged_in_bounded_time() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let t = small_bpe();
            let ids = t.encode(&"a".repeat(300_000), false, false);
            let _ = tx.send((ids.len(), t.ids["aaaaaaaa"], ids.iter().all(|&i| i == t.ids["aaaaaaaa"])));
        });
        let (n, _, all_eights) =
            rx.recv_timeout(std::time::Duration::from_secs(60)).expect("300,000 letters not merged within 60 s");
        assert_eq!((n, all_eights), (300_000 / 8, true));
    }

    fn split(s: &str) -> Vec<&str> {
        pre_tokenize(s, Pre::Gpt2)
    }

    #[test]
    fn gpt2_pattern_cuts_like_the_regex() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(split("it's 42 o'clock!!"), ["it", "'s", " 42", " o", "'", "clock", "!!"]);
        assert_eq!(split("a  b"), ["a", " ", " b"]);
        assert_eq!(split("end   "), ["end", "   "]);
        assert_eq!(split("x\n\ny"), ["x", "\n", "\n", "y"]);
        assert_eq!(split("héllo wörld 日本"), ["héllo", " wörld", " 日本"]);
    }

    /// llama.cpp's rule: end-of-turn markers end generation even when the metadata names only
    /// EOS, and are never printed even when typed as normal tokens.
    #[test]
    fn end_of_turn_tokens_are_found_by_their_text() {
        let meta = serde_json::json!({
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<|eot_id|>", "<|im_end|>", "▁a", "<|im_start|>"],
            "tokenizer.ggml.token_type": [2, 3, 3, 1, 3, 1, 3],
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
        });
        let t = Tokenizer::from_source(meta.as_object().unwrap()).unwrap();
        assert!(t.is_eog(2) && t.is_eog(3) && t.is_eog(4));
        assert!(!t.is_eog(5) && !t.is_eog(6) && !t.is_eog(1));
        assert!(t.token_bytes(3).is_empty(), "a normal-typed <|eot_id|> becomes a control token");
        assert_eq!(t.token_bytes(5), b" a");
        // The eot key counts too.
        let mut meta = meta;
        meta["tokenizer.ggml.eot_token_id"] = serde_json::json!(5);
        assert!(Tokenizer::from_source(meta.as_object().unwrap()).unwrap().is_eog(5));
    }

    #[test]
    fn digit_rules() {
        assert_eq!(pre_tokenize("abc 12345", Pre::Digits), ["abc", " ", "1", "2", "3", "4", "5"]);
        assert_eq!(pre_tokenize("x 12345", Pre::Default), ["x", " ", "123", "45"]);
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char();
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'A' as usize], 'A');
    }
}
