//! Every hyper-parameter and shard key the engine and the node read, set to hostile values
//! (zero, negative, NaN, infinite, huge): each case ends in a clear error or a correct run,
//! never an abort. In-process on purpose: a ggml assertion (GGML_ASSERT aborts) would crash
//! this test binary, which then fails.

mod common;

use std::sync::Arc;

use memmap2::Mmap;
use shardnet::engine::{Engine, EngineConfig, Input, Output, Want};
use shardnet::gguf::Gguf;
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::writer::{Builder, Value as Meta};
use shardnet::protocol::ErrorCode;

fn config() -> DemoConfig {
    DemoConfig { layers: 2, embd: 64, heads: 4, kv_heads: 2, ffn: 128, vocab: 300, context: 64, ..Default::default() }
}

fn set_key(b: &mut Builder, key: &str, v: Meta) {
    match b.metadata.iter_mut().find(|(k, _)| k == key) {
        Some(kv) => kv.1 = v,
        None => b.metadata.push((key.to_string(), v)),
    }
}

/// The demo model with `edit` applied, as a read-only map of a real file.
fn model(tag: &str, edit: impl FnOnce(&mut Builder, &mut Vec<Vec<u8>>)) -> (common::TempDir, Arc<Mmap>) {
    let dir = common::TempDir::new(tag);
    let (mut b, mut data) = demo::build(&config()).unwrap();
    edit(&mut b, &mut data);
    let path = dir.path().join("m.gguf");
    let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
    std::fs::write(&path, b.to_bytes(&refs).unwrap()).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    // SAFETY: a file this test wrote and does not change while mapped.
    let map = Arc::new(unsafe { Mmap::map(&f) }.unwrap());
    (dir, map)
}

/// Loads the map and runs one step of three tokens: the outcome, as a line for the table.
fn run(map: Arc<Mmap>) -> Result<Vec<f32>, (ErrorCode, String)> {
    let cfg = EngineConfig { threads: 1, ctx_size: 64, ..Default::default() };
    let mut e = Engine::new(cfg).map_err(|e| (e.code, e.message))?;
    e.load(0, map).map_err(|e| (e.code, e.message))?;
    match e.execute(0, "s", 0, &Input::Tokens(vec![1, 2, 3]), Want::Logits { all: false }) {
        Ok(Output::Logits { data, .. }) => Ok(data),
        Ok(other) => panic!("logits expected, got {other:?}"),
        Err(e) => Err((e.code, e.message)),
    }
}

#[test]
fn every_hyperparameter_at_hostile_values_is_a_clear_error_or_a_correct_run() {
    let ints = [
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "rope.dimension_count",
        "vocab_size",
        "rope.scaling.original_context_length",
    ];
    let floats = ["attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor"];
    let values = [
        ("zero", Meta::U32(0), Meta::F32(0.0)),
        ("one / tiny", Meta::U32(1), Meta::F32(1e-30)),
        ("negative", Meta::I32(-1), Meta::F32(-1.0)),
        ("NaN", Meta::F32(f32::NAN), Meta::F32(f32::NAN)),
        ("infinite", Meta::F32(f32::INFINITY), Meta::F32(f32::INFINITY)),
        ("huge", Meta::U64(u64::MAX), Meta::F64(1e300)),
        ("u32 max", Meta::U32(u32::MAX), Meta::F32(f32::MAX)),
        ("string", Meta::String("7".into()), Meta::String("1e-5".into())),
    ];
    let mut table = Vec::new();
    let mut runs = 0;
    for key in ints.iter().chain(&floats) {
        let is_float = floats.contains(key);
        for (what, as_int, as_float) in &values {
            let v = if is_float { as_float.clone() } else { as_int.clone() };
            let full = format!("llama.{key}");
            let (_dir, map) = model("hp", |b, _| set_key(b, &full, v));
            let outcome = run(map);
            match &outcome {
                Ok(logits) => {
                    assert!(logits.iter().all(|x| x.is_finite()), "{full} {what}: a run returned non-finite logits");
                    runs += 1;
                }
                Err((code, msg)) => {
                    assert!(!msg.is_empty() && !msg.contains('\n'), "{full} {what}: {msg:?}");
                    assert!(
                        matches!(code, ErrorCode::ShardInvalid | ErrorCode::NumericError | ErrorCode::ContextExceeded),
                        "{full} {what}: {code:?} {msg}"
                    );
                    // A value refused at load names its key, or the tensor it contradicts.
                    if *code == ErrorCode::ShardInvalid {
                        assert!(
                            msg.contains(key.rsplit('.').next().unwrap()) || msg.contains("tensor"),
                            "{full} {what}: {msg}"
                        );
                    }
                }
            }
            table.push(format!("{full:45} {what:9} {:?}", outcome.map(|l| l.len()).map_err(|e| e.1)));
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(run(model("hp-base", |_, _| {}).1).is_ok(), "the unedited model runs");
    assert!(runs >= 1, "some in-range values run");
}

#[test]
fn values_in_range_but_odd_run_and_non_finite_results_are_numeric_errors() {
    // In range, unusual: runs, with finite logits.
    for (key, v) in [
        ("llama.rope.freq_base", Meta::F32(1.5)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1.0)),
        ("llama.rope.scaling.factor", Meta::F32(1024.0)),
        ("llama.context_length", Meta::U32(1 << 24)),
    ] {
        let (_d, map) = model("odd", |b, _| set_key(b, key, v));
        let logits = run(map).unwrap_or_else(|e| panic!("{key}: {e:?}"));
        assert!(logits.iter().all(|x| x.is_finite()), "{key}");
    }
    // Weights that drive the arithmetic to NaN: NUMERIC_ERROR, never a NaN sent on.
    let (_d, map) = model("nan-weights", |b, data| {
        let i = b.tensors.iter().position(|t| t.name == "output_norm.weight").unwrap();
        data[i] = f32::NAN.to_le_bytes().repeat(data[i].len() / 4);
    });
    let (code, msg) = run(map).unwrap_err();
    assert_eq!(code, ErrorCode::NumericError, "{msg}");
    let (_d, map) = model("inf-weights", |b, data| {
        let i = b.tensors.iter().position(|t| t.name == "blk.0.attn_norm.weight").unwrap();
        data[i] = f32::INFINITY.to_le_bytes().repeat(data[i].len() / 4);
    });
    assert_eq!(run(map).unwrap_err().0, ErrorCode::NumericError);
}

#[test]
fn every_shard_key_at_hostile_values_is_refused_by_the_one_shard_check() {
    use shardnet::node::catalog::check_shard;
    let shard = |b: &mut Builder| {
        set_key(b, "shard.index", Meta::U32(0));
        set_key(b, "shard.count", Meta::U32(1));
        set_key(b, "shard.layer_begin", Meta::U32(0));
        set_key(b, "shard.layer_end", Meta::U32(2));
        set_key(b, "shard.model_id", Meta::String("m".into()));
    };
    let (_d, map) = model("shard-ok", |b, _| shard(b));
    check_shard(&Gguf::parse(&map).unwrap(), 0, Some("m"), None).unwrap();
    // A manifest listing shard 0: the file's own info hash must be the listed one.
    let (a, b) = (shardnet::torrent::InfoHash([1; 20]), shardnet::torrent::InfoHash([2; 20]));
    check_shard(&Gguf::parse(&map).unwrap(), 0, Some("m"), Some((a, Some(a)))).unwrap();
    let e = check_shard(&Gguf::parse(&map).unwrap(), 0, Some("m"), Some((a, Some(b)))).unwrap_err();
    assert_eq!(e.0, ErrorCode::ManifestMismatch, "{}", e.1);
    assert_eq!(check_shard(&Gguf::parse(&map).unwrap(), 0, Some("m"), Some((a, None))).unwrap_err().0, ErrorCode::Busy);
    assert!(check_shard(&Gguf::parse(&map).unwrap(), 0, Some("other"), None).unwrap_err().1.contains("model"));
    assert!(check_shard(&Gguf::parse(&map).unwrap(), 1, None, None).unwrap_err().1.contains("shard.index"));
    let cases: Vec<(&str, Meta)> = vec![
        ("shard.index", Meta::U32(1)),
        ("shard.index", Meta::I32(-1)),
        ("shard.index", Meta::F32(f32::NAN)),
        ("shard.count", Meta::U32(0)),
        ("shard.count", Meta::U64(u64::MAX)),
        ("shard.count", Meta::U32(1 << 20)),
        ("shard.layer_begin", Meta::U32(2)),
        ("shard.layer_begin", Meta::I64(-5)),
        ("shard.layer_end", Meta::U32(0)),
        ("shard.layer_end", Meta::U32(3)),
        ("shard.layer_end", Meta::U32(1)),
        ("shard.layer_end", Meta::F32(f32::INFINITY)),
        ("shard.model_id", Meta::String(String::new())),
        ("shard.model_id", Meta::U32(7)),
    ];
    for (key, v) in cases {
        let shown = format!("{key} = {v:?}");
        let (_d, map) = model("shard-bad", |b, _| {
            shard(b);
            set_key(b, key, v);
        });
        let g = Gguf::parse(&map).unwrap();
        let e = check_shard(&g, 0, None, None).expect_err(&shown).1;
        assert!(e.contains("shard") || e.contains("layer"), "{shown}: {e}");
    }
    // Without any shard key: not a shard.
    let (_d, map) = model("shard-none", |_, _| {});
    assert!(check_shard(&Gguf::parse(&map).unwrap(), 0, None, None).unwrap_err().1.contains("not a shard"));
}

#[test]
fn shardctl_generate_refuses_a_model_with_a_nan_epsilon_without_aborting() {
    for eps in [f32::NAN, -1.0] {
        let (dir, _map) = model("gen", |b, _| set_key(b, "llama.attention.layer_norm_rms_epsilon", Meta::F32(eps)));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
            .args(["generate", dir.path().join("m.gguf").to_str().unwrap(), "--prompt", "hello", "-n", "2"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "eps {eps}: an error exit, not a signal: {stderr}");
        assert!(stderr.contains("layer_norm_rms_epsilon"), "eps {eps}: {stderr}");
    }
}
