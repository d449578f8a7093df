//! GGUF tools: `split`, `demo-model`, `inspect`, `tokenize`, and the model
//! opening that `generate` shares.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use shardnet::workers::WorkerPool;

use crate::args::{Flags, usage};
use crate::{Opts, print_json};

pub fn split(o: &Opts, model: &str, flags: &[&str]) -> Result<()> {
    let f = Flags::parse("split", flags, &["--shards", "--out"], &[]);
    let n: u32 = f.num("--shards", 0);
    let out = f.get("--out").ok_or_else(|| f.usage("missing --out DIR".into()))?;
    if n == 0 {
        return Err(f.usage("missing --shards N (N >= 1)".into()));
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = WorkerPool::new("hash", threads);
    let t = std::time::Instant::now();
    let report = shardnet::gguf::split::split(Path::new(model), n, Path::new(out), Some(&pool.handle()))?;
    let manifest_bytes = std::fs::read(Path::new(out).join(shardnet::gguf::split::MANIFEST))?;
    let hash = shardnet::hash::to_hex(&shardnet::gguf::manifest::manifest_hash(&manifest_bytes));
    if o.json {
        let mut m = report.manifest.clone();
        m["manifest_sha256"] = json!(hash);
        print_json(&m);
        return Ok(());
    }
    println!("model id {}", report.model_id);
    println!("manifest {hash}  (pin it: shard_listener --model {hash})");
    for s in report.manifest["shards"].as_array().into_iter().flatten() {
        println!(
            "  {}  layers {}..{}  {:>12} bytes  info hash {}",
            s["filename"].as_str().unwrap_or("?"),
            s["layers"][0],
            s["layers"][1],
            s["size"],
            s["info_hash"].as_str().unwrap_or("-")
        );
    }
    println!("wrote {} shards and manifest.json to {out} in {:.2} s", n, t.elapsed().as_secs_f64());
    Ok(())
}

pub fn demo_model(o: &Opts, flags: &[&str]) -> Result<()> {
    use shardnet::gguf::GgmlType;
    use shardnet::gguf::demo::{DemoConfig, write};
    let f = Flags::parse(
        "demo-model",
        flags,
        &["--out", "--layers", "--embd", "--heads", "--kv-heads", "--ffn", "--vocab", "--context", "--type", "--seed"],
        &["--tied"],
    );
    let out = f.get("--out").ok_or_else(|| f.usage("missing --out FILE".into()))?;
    let d = DemoConfig::default();
    let weight_type = match f.get("--type").unwrap_or("f32") {
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        "q8_0" => GgmlType::Q8_0,
        "q4_0" => GgmlType::Q4_0,
        other => return Err(f.usage(format!("--type {other:?} is not f32, f16, q8_0 or q4_0"))),
    };
    let c = DemoConfig {
        layers: f.num("--layers", d.layers),
        embd: f.num("--embd", d.embd),
        heads: f.num("--heads", d.heads),
        kv_heads: f.num("--kv-heads", d.kv_heads),
        ffn: f.num("--ffn", d.ffn),
        vocab: f.num("--vocab", d.vocab),
        context: f.num("--context", d.context),
        weight_type,
        seed: f.num("--seed", d.seed),
        tied: f.has("--tied"),
        ..d
    };
    if let Err(e) = c.validate() {
        return Err(f.usage(e.to_string()));
    }
    if let Some(dir) = Path::new(out).parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let bytes = write(&c, Path::new(out))?;
    if o.json {
        print_json(&json!({"path": out, "bytes": bytes}));
    } else {
        println!(
            "wrote {out}: demo LLaMA model, {} layers, width {}, {} heads ({} kv), ffn {}, vocab {}, {}, {} bytes",
            c.layers, c.embd, c.heads, c.kv_heads, c.ffn, c.vocab, c.weight_type, bytes
        );
    }
    Ok(())
}

pub fn inspect(o: &Opts, file: &str) -> Result<()> {
    use shardnet::gguf::{Gguf, MetaValue};
    let f = std::fs::File::open(file).with_context(|| format!("opening {file}"))?;
    // SAFETY: read-only map of a file this command only reads.
    let map = unsafe { memmap2::Mmap::map(&f) }.with_context(|| format!("mapping {file}"))?;
    let g = Gguf::parse(&map).with_context(|| format!("reading {file}"))?;
    if o.json {
        let meta: serde_json::Map<String, Value> =
            g.metadata.iter().map(|(k, v)| (k.to_string(), v.to_json())).collect();
        let tensors: Vec<Value> = g
            .tensors
            .iter()
            .map(|t| {
                json!({
                    "name": t.name, "type": t.ggml_type.name(), "dims": t.dims, "offset": t.offset, "size": t.size,
                })
            })
            .collect();
        print_json(
            &json!({"version": g.version, "alignment": g.alignment, "data_offset": g.data_offset, "metadata": meta, "tensors": tensors}),
        );
        return Ok(());
    }
    println!(
        "* {file}: GGUF v{}, {} key/value pairs, {} tensors, alignment {}, data at byte {}",
        g.version,
        g.metadata.len(),
        g.tensors.len(),
        g.alignment,
        g.data_offset
    );
    println!("* Metadata:");
    for (i, (k, v)) in g.metadata.iter().enumerate() {
        let shown = match v {
            MetaValue::Array(a) => {
                let head: Vec<String> = a.iter().take(6).map(|e| e.to_json().to_string()).collect();
                format!(
                    "[{} x {}] = [{}{}]",
                    type_name(a.elem_type),
                    a.len,
                    head.join(", "),
                    if a.len > 6 { ", ..." } else { "" }
                )
            }
            MetaValue::String(s) if s.chars().count() > 60 => {
                format!("{:?}... ({} bytes)", s.chars().take(60).collect::<String>(), s.len())
            }
            other => other.to_json().to_string(),
        };
        println!("  {:>4}: {k} = {shown}", i + 1);
    }
    println!("* Tensors:");
    println!("  {:>4}  {:<32} {:<8} {:<24} {:>12} {:>12}", "#", "NAME", "TYPE", "SHAPE", "OFFSET", "BYTES");
    for (i, t) in g.tensors.iter().enumerate() {
        let shape = t.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" x ");
        println!("  {:>4}  {:<32} {:<8} {:<24} {:>12} {:>12}", i, t.name, t.ggml_type.name(), shape, t.offset, t.size);
    }
    Ok(())
}

pub fn type_name(t: u32) -> &'static str {
    ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"]
        .get(t as usize)
        .copied()
        .unwrap_or("?")
}

pub fn open_model(path: &str) -> Result<std::sync::Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: shard files are not modified while mapped (the node never writes a complete file).
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {path}"))?;
    Ok(std::sync::Arc::new(map))
}

pub fn load_tokenizer(map: &[u8], path: &str) -> Result<shardnet::engine::tokenizer::Tokenizer> {
    let g = shardnet::gguf::reader::Gguf::parse(map).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    shardnet::engine::tokenizer::Tokenizer::from_gguf(&g).map_err(|e| anyhow::anyhow!("{path}: {e}"))
}

pub fn tokenize(o: &Opts, model: &str, rest: &[&str]) -> Result<()> {
    if let [_, extra, ..] = rest {
        return Err(usage(format!("tokenize: unexpected argument {extra:?} (one TEXT at most)")));
    }
    let map = open_model(model)?;
    let tok = load_tokenizer(&map, model)?;
    let print = |ids: Vec<u32>| println!("{}", serde_json::to_string(&ids).expect("ids"));
    match rest {
        [text] => print(tok.encode(text, false, false)),
        [] => {
            for line in std::io::stdin().lines() {
                let line = line?;
                let text: String = serde_json::from_str(&line).with_context(|| format!("not a JSON string: {line}"))?;
                print(tok.encode(&text, false, false));
            }
        }
        _ => unreachable!("checked above"),
    }
    let _ = o;
    Ok(())
}
