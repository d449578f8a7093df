//! The inference engine on real GGUF files: shards agree with the whole model, sessions, bad input.
mod common;

use common::TempDir;
use memmap2::Mmap;
use shardnet::engine::{Engine, EngineConfig, Input, Output, Want};
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::split;
use shardnet::gguf::types::GgmlType;
use std::path::Path;
use std::sync::Arc;

fn map(path: &Path) -> Arc<Mmap> {
    let f = std::fs::File::open(path).unwrap();
    Arc::new(unsafe { Mmap::map(&f) }.unwrap())
}

fn engine() -> Engine {
    Engine::new(EngineConfig { threads: 2, ctx_size: 256, ..Default::default() }).unwrap()
}

fn logits(out: Output) -> Vec<f32> {
    match out {
        Output::Logits { data, .. } => data,
        other => panic!("expected logits, got {other:?}"),
    }
}

fn hidden(out: Output) -> Input {
    match out {
        Output::Hidden { data, n_tokens, width } => Input::Hidden { data, n_tokens, width },
        other => panic!("expected a hidden state, got {other:?}"),
    }
}

/// Max |a-b| relative to the largest |a|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn split_agrees(weight_type: GgmlType, tol: f32) {
    let dir = TempDir::new("engine-split");
    let cfg = DemoConfig { weight_type, layers: 6, ..Default::default() };
    let model = dir.path().join("model.gguf");
    demo::write(&cfg, &model).unwrap();
    let prompt: Vec<u32> = vec![1, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11];
    let mut whole = engine();
    whole.load(0, map(&model)).unwrap();
    let want_prefill = logits(whole.execute(0, "s", 0, &Input::Tokens(prompt.clone()), Want::Logits { all: true }).unwrap());
    let want_decode = logits(whole.execute(0, "s", prompt.len() as u32, &Input::Tokens(vec![5]), Want::Logits { all: false }).unwrap());
    assert!(want_prefill.iter().all(|v| v.is_finite()));

    for n in [2, 3] {
        let out = dir.path().join(format!("shards-{n}"));
        split::split(&model, n, &out, None).unwrap();
        let mut e = engine();
        for i in 0..n {
            e.load(i, map(&out.join(format!("shard-{i}.gguf")))).unwrap();
        }
        let run = |e: &mut Engine, pos: u32, tokens: Vec<u32>, all: bool| {
            let mut x = Input::Tokens(tokens);
            for i in 0..n - 1 {
                x = hidden(e.execute(i, "s", pos, &x, Want::Hidden).unwrap());
            }
            logits(e.execute(n - 1, "s", pos, &x, Want::Logits { all }).unwrap())
        };
        let got = run(&mut e, 0, prompt.clone(), true);
        let d = rel_diff(&want_prefill, &got);
        assert!(d <= tol, "{weight_type:?} {n} shards prefill differs by {d}");
        let got = run(&mut e, prompt.len() as u32, vec![5], false);
        let d = rel_diff(&want_decode, &got);
        assert!(d <= tol, "{weight_type:?} {n} shards decode differs by {d}");
    }
}

#[test]
fn shards_match_whole_model_f32() {
    split_agrees(GgmlType::F32, 1e-5);
}
