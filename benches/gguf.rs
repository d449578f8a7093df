//! `make bench` part 2: GGUF files. Writes `target/bench/gguf.json`.
//!
//! - open-and-index time of a 1 GiB model (open, mmap, parse every header
//!   field and tensor info), median of 21;
//! - split throughput against a plain file copy of the same bytes, same run,
//!   alternating the two, medians of 3.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::time::Instant;

use common::TempDir;
use memmap2::Mmap;
use serde_json::json;
use shardnet::gguf::writer::{Builder, Value};
use shardnet::gguf::{GgmlType, Gguf, split};

const LAYERS: u32 = 16;
const WIDTH: u64 = 4096;

/// A 1 GiB LLaMA-shaped model: 16 layers of one 64 MiB matrix, a tokenizer of
/// 32,000 strings, dense pseudo-random data.
fn write_model(path: &Path) -> u64 {
    let mut b = Builder::new();
    b.set("general.architecture", Value::String("llama".into()));
    b.set("llama.block_count", Value::U32(LAYERS));
    let tokens = (0..32_000).map(|i| Value::String(format!("tok{i}"))).collect();
    b.set("tokenizer.ggml.tokens", Value::Array(shardnet::gguf::reader::value_type::STRING, tokens));
    b.add_tensor("token_embd.weight", &[WIDTH, 256], GgmlType::F32).unwrap();
    for l in 0..LAYERS {
        b.add_tensor(&format!("blk.{l}.ffn_up.weight"), &[WIDTH, WIDTH], GgmlType::F32).unwrap();
        b.add_tensor(&format!("blk.{l}.attn_norm.weight"), &[WIDTH], GgmlType::F32).unwrap();
    }
    b.add_tensor("output_norm.weight", &[WIDTH], GgmlType::F32).unwrap();
    b.add_tensor("output.weight", &[WIDTH, 256], GgmlType::F32).unwrap();
    let mut w = BufWriter::with_capacity(4 << 20, File::create(path).unwrap());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let sizes: Vec<u64> = b.tensors.iter().map(|t| t.size).collect();
    b.write(&mut w, |i, w| common::write_random(w, sizes[i], &mut state)).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir = TempDir::new("bench-gguf");
    let model = dir.path().join("model.gguf");
    let size = write_model(&model);

    let open_ms: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            let f = File::open(&model).unwrap();
            // SAFETY: read-only map of a file this benchmark wrote and does not change.
            let map = unsafe { Mmap::map(&f) }.unwrap();
            let g = Gguf::parse(&map).unwrap();
            assert_eq!(g.tensors.len(), 2 * LAYERS as usize + 3);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let open_median = median(open_ms.clone());
    println!("open and index a {:.2} GiB GGUF: {open_median:.3} ms (median of 21)", size as f64 / (1u64 << 30) as f64);

    let (mut split_s, mut copy_s) = (Vec::new(), Vec::new());
    // Alternate which goes first: each run's writeback slows the next one.
    for round in 0..4 {
        let out = dir.path().join(format!("shards-{round}"));
        let copy = dir.path().join("copy.gguf");
        let split_once = |v: &mut Vec<f64>| {
            let t = Instant::now();
            split::split(&model, 4, &out, None).unwrap();
            v.push(t.elapsed().as_secs_f64());
        };
        let copy_once = |v: &mut Vec<f64>| {
            let t = Instant::now();
            std::fs::copy(&model, &copy).unwrap();
            v.push(t.elapsed().as_secs_f64());
        };
        if round % 2 == 0 {
            split_once(&mut split_s);
            copy_once(&mut copy_s);
        } else {
            copy_once(&mut copy_s);
            split_once(&mut split_s);
        }
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_file(&copy).unwrap();
    }
    let (split_m, copy_m) = (median(split_s.clone()), median(copy_s.clone()));
    let gbs = |s: f64| size as f64 / s / 1e9;
    println!(
        "split into 4: {:.2} GB/s; plain copy: {:.2} GB/s; ratio {:.2}x (medians of 4, alternating)",
        gbs(split_m),
        gbs(copy_m),
        copy_m / split_m
    );

    let report = json!({
        "model_bytes": size,
        "open_and_index_ms_median": open_median,
        "open_and_index_ms_all": open_ms,
        "split_gb_s": gbs(split_m),
        "copy_gb_s": gbs(copy_m),
        "split_over_copy": copy_m / split_m,
        "split_s_all": split_s,
        "copy_s_all": copy_s,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("gguf.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("wrote {}", out.join("gguf.json").display());
}
