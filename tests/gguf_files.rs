//! GGUF files end to end: the demo model, splitting into shards and joining
//! them back, agreement with llama.cpp's `gguf` Python reader, and bad files.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{Value, json};
use shardnet::gguf::Gguf;
use shardnet::hash::{sha1, to_hex};
use shardnet::torrent::Metainfo;

const SMOLLM2: &str = "models_cache/SmolLM2-135M-Instruct.Q4_1.gguf";

fn shardctl(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_shardctl")).args(args).output().unwrap();
    assert!(o.status.success(), "shardctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn demo(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["demo-model", "--out", path.to_str().unwrap()];
    args.extend_from_slice(flags);
    shardctl(&args);
    path
}

fn split(model: &Path, n: u32, out: &Path) -> Value {
    let text = shardctl(&[
        "--json",
        "split",
        model.to_str().unwrap(),
        "--shards",
        &n.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    serde_json::from_str(&text).unwrap()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Every tensor of `model` is in the shards it belongs to, byte for byte; the
/// shards' metadata is the model's plus `shard.*`; layer ranges tile the model.
fn check_rejoin(model: &Path, out: &Path, n: u32, manifest: &Value) {
    let src_bytes = read(model);
    let src = Gguf::parse(&src_bytes).unwrap();
    let layers = src.get_u64("llama.block_count").unwrap() as u32;
    let tied = src.tensor("output.weight").is_none();
    let shard_bytes: Vec<Vec<u8>> = (0..n).map(|i| read(&out.join(format!("shard-{i}.gguf")))).collect();
    let shards: Vec<Gguf> = shard_bytes.iter().map(|b| Gguf::parse(b).unwrap()).collect();

    let mut next_layer = 0;
    let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (i, g) in shards.iter().enumerate() {
        let (b, e) = (g.get_u64("shard.layer_begin").unwrap() as u32, g.get_u64("shard.layer_end").unwrap() as u32);
        assert_eq!(b, next_layer, "shard {i} starts where the previous ended");
        assert!(e > b, "shard {i} has layers");
        next_layer = e;
        assert_eq!(g.get_u64("shard.index"), Some(i as u64));
        assert_eq!(g.get_u64("shard.count"), Some(n as u64));
        assert_eq!(g.get_str("shard.model_id"), manifest["model_id"].as_str());
        assert_eq!(g.alignment, src.alignment);
        // Metadata: the source's, in order, then the shard keys.
        let theirs: Vec<(&str, Value)> =
            g.metadata.iter().filter(|(k, _)| !k.starts_with("shard.")).map(|(k, v)| (*k, v.to_json())).collect();
        let ours: Vec<(&str, Value)> = src.metadata.iter().map(|(k, v)| (*k, v.to_json())).collect();
        assert_eq!(theirs, ours, "shard {i} metadata");
        for t in &g.tensors {
            let s = src.tensor(t.name).unwrap_or_else(|| panic!("shard {i} has {} which the source has not", t.name));
            assert_eq!((t.dims.clone(), t.ggml_type), (s.dims.clone(), s.ggml_type), "{}", t.name);
            assert!(t.data == s.data, "{} differs in shard {i}", t.name);
            assert_eq!((g.data_offset + t.offset) % g.alignment, 0);
            seen.entry(t.name.to_string()).or_default().push(i as u32);
        }
        // The manifest's info hash is the one a node computes for the file.
        let entry = &manifest["shards"][i];
        let torrent = Metainfo::parse(&read(&out.join(format!("shard-{i}.gguf.torrent")))).unwrap();
        assert_eq!(entry["info_hash"], torrent.info_hash.to_hex().as_str());
        assert_eq!(entry["size"], shard_bytes[i].len());
        assert_eq!(entry["layers"], json!([b, e]));
        let expect: Vec<_> = shard_bytes[i].chunks(torrent.info.piece_length as usize).map(sha1).collect();
        assert_eq!(torrent.info.pieces, expect);
    }
    assert_eq!(next_layer, layers, "the shards cover every layer");
    let last = n - 1;
    for t in &src.tensors {
        let holders = seen.get(t.name).unwrap_or_else(|| panic!("{} is in no shard", t.name));
        let expected: Vec<u32> = match t.name {
            "token_embd.weight" if tied && last != 0 => vec![0, last],
            "token_embd.weight" => vec![0],
            "output.weight" | "output_norm.weight" => vec![last],
            _ => holders.clone(),
        };
        assert_eq!(holders, &expected, "{}", t.name);
        if t.name.starts_with("blk.") {
            assert_eq!(holders.len(), 1, "{} in one shard", t.name);
        }
    }
}

#[test]
fn split_then_rejoin_is_byte_identical_for_demo_models() {
    let dir = TempDir::new("split");
    for (name, flags) in [
        ("untied-f32.gguf", &["--layers", "6"][..]),
        ("tied-q8.gguf", &["--layers", "5", "--type", "q8_0", "--tied"][..]),
        ("f16-gqa.gguf", &["--layers", "4", "--type", "f16", "--heads", "8", "--kv-heads", "2"][..]),
    ] {
        let model = demo(dir.path(), name, flags);
        let layers = Gguf::parse(&read(&model)).unwrap().get_u64("llama.block_count").unwrap() as u32;
        for n in [1, 2, 3, layers] {
            let out = dir.path().join(format!("{name}-{n}"));
            let manifest = split(&model, n, &out);
            check_rejoin(&model, &out, n, &manifest);
        }
    }
}

#[test]
#[ignore = "needs models_cache/SmolLM2-135M-Instruct.Q4_1.gguf, pip:gguf"]
fn split_then_rejoin_is_byte_identical_for_smollm2() {
    require(&format!("{SMOLLM2}, pip:gguf"));
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join(SMOLLM2);
    let dir = TempDir::new("split-smol");
    for n in [1, 2, 3, 30] {
        let out = dir.path().join(format!("smol-{n}"));
        let manifest = split(&model, n, &out);
        check_rejoin(&model, &out, n, &manifest);
        if n == 3 {
            python_agrees(&(0..n).map(|i| out.join(format!("shard-{i}.gguf"))).collect::<Vec<_>>());
        }
    }
}

#[test]
fn balanced_by_bytes() {
    let dir = TempDir::new("split");
    let model = demo(dir.path(), "m.gguf", &["--layers", "8"]);
    let manifest = split(&model, 4, &dir.path().join("out"));
    let sizes: Vec<u64> = manifest["shards"].as_array().unwrap().iter().map(|s| s["size"].as_u64().unwrap()).collect();
    let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(*max as f64 / *min as f64 <= 1.6, "{sizes:?}");
}

#[test]
#[ignore = "needs pip:gguf"]
fn shards_and_demo_model_read_the_same_in_llamas_gguf_package() {
    require("pip:gguf");
    let dir = TempDir::new("pygguf");
    let model = demo(dir.path(), "m.gguf", &["--layers", "3", "--type", "q8_0"]);
    let tied = demo(dir.path(), "t.gguf", &["--layers", "2", "--type", "f16", "--tied"]);
    split(&model, 3, &dir.path().join("out"));
    let mut files = vec![model, tied];
    files.extend((0..3).map(|i| dir.path().join(format!("out/shard-{i}.gguf"))));
    python_agrees(&files);
}

/// The `gguf` package reads each file with the same metadata and tensor bytes.
fn python_agrees(files: &[PathBuf]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gguf_read.py");
    let out = Command::new("python3").arg(script).args(files).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let described: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for (path, theirs) in files.iter().zip(described) {
        let bytes = read(path);
        let g = Gguf::parse(&bytes).unwrap();
        let ours: serde_json::Map<String, Value> =
            g.metadata.iter().map(|(k, v)| (k.to_string(), v.to_json())).collect();
        assert_eq!(Value::Object(ours), theirs["metadata"], "{}", path.display());
        let tensors = theirs["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), g.tensors.len());
        for (t, p) in g.tensors.iter().zip(tensors) {
            assert_eq!(p["name"], t.name);
            assert_eq!(p["type"], t.ggml_type.name());
            assert_eq!(p["dims"], json!(t.dims));
            assert_eq!(p["bytes"], t.size);
            assert_eq!(p["sha1"], to_hex(&sha1(t.data)).as_str(), "{} in {}", t.name, path.display());
        }
    }
}

#[test]
fn shardctl_refuses_bad_splits_and_bad_files_with_clear_errors() {
    let dir = TempDir::new("split");
    let model = demo(dir.path(), "m.gguf", &["--layers", "2"]);
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_shardctl")).args(args).output().unwrap();
    let o = run(&["split", model.to_str().unwrap(), "--shards", "3", "--out", dir.path().join("x").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot cut 2 layers into 3 shards"));
    // Splitting a shard again is refused.
    split(&model, 2, &dir.path().join("out"));
    let shard = dir.path().join("out/shard-0.gguf");
    let o = run(&["split", shard.to_str().unwrap(), "--shards", "1", "--out", dir.path().join("y").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already a shard"));
    // A truncated file: the error names what and where.
    let mut bytes = read(&model);
    bytes.truncate(bytes.len() / 2);
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let o = run(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.gguf") && err.contains("at byte"), "{err}");
    let o = run(&["demo-model", "--out", dir.path().join("d.gguf").to_str().unwrap(), "--heads", "3"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn inspect_prints_metadata_and_tensors() {
    let dir = TempDir::new("inspect");
    let model = demo(dir.path(), "m.gguf", &["--layers", "2"]);
    let out = shardctl(&["inspect", model.to_str().unwrap()]);
    assert!(out.contains("general.architecture = \"llama\""), "{out}");
    assert!(out.contains("tokenizer.ggml.tokens = [string x 512]"), "{out}");
    assert!(out.contains("blk.1.ffn_down.weight"), "{out}");
    let v: Value = serde_json::from_str(&shardctl(&["--json", "inspect", model.to_str().unwrap()])).unwrap();
    assert_eq!(v["tensors"].as_array().unwrap().len(), 2 + 9 * 2 + 1);
    assert_eq!(v["metadata"]["llama.block_count"], 2);
}

#[test]
fn a_node_seeds_split_shards_without_rehashing_them() {
    let dir = TempDir::new("split-node");
    let model = demo(dir.path(), "m.gguf", &["--layers", "4"]);
    let manifest = split(&model, 2, &dir.path().join("shards"));
    let node = NodeProc::start(&dir.path().join("shards"), &[]);
    let s = node.wait_metadata();
    assert_eq!(s["metadata"]["cached"], 2, "split wrote the metadata the node uses: {s}");
    let files = node.call("LIST_FILES", json!({}))["result"]["files"].clone();
    for (f, m) in files.as_array().unwrap().iter().zip(manifest["shards"].as_array().unwrap()) {
        assert_eq!(f["info_hash"], m["info_hash"]);
        assert_eq!(f["layers"], m["layers"]);
    }
}
