//! Binary frames (a JSON header, then tensors as raw bytes): bad ones get clear error frames and
//! cost the node nothing, nodes relay to each other in binary once the next hop has shown it
//! reads them, and clients and next hops that speak only JSON keep getting JSON. Real node
//! processes on loopback; the JSON-only next hop is a thread of the test speaking the frame
//! protocol as an independent implementation does.
mod common;

use common::*;
use serde_json::{Value, json};
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::split;
use shardnet::protocol::binary;
use shardnet::protocol::tensor::{f32_from_json, f32_from_json_in, f32_to_json};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

/// Width of the demo model's hidden state.
const EMBD: usize = 128;

/// The demo model (4 layers) split in two, into `dir/NAME`.
fn shards(dir: &TempDir, name: &str) -> PathBuf {
    let model = dir.path().join("demo.gguf");
    if !model.exists() {
        demo::write(&DemoConfig { layers: 4, embd: EMBD as u32, ..Default::default() }, &model).unwrap();
    }
    let out = dir.path().join(name);
    split::split(&model, 2, &out, None).unwrap();
    out
}

/// One frame's payload, as it came (JSON or binary).
fn read_payload(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("reading a frame length");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).expect("reading a frame body");
    buf
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An EXECUTE_TASK for shard 1 (hidden state in) whose `input.hidden` is `tensor`.
fn hidden_task(session: &str, tensor: Value) -> Value {
    json!({"command": "EXECUTE_TASK", "request_id": session, "params": {"session_id": session, "shard_id": 1,
        "input": {"hidden": tensor}, "output": "top_k", "k": 1}})
}

fn raw(offset: u64, nbytes: u64, shape: Value) -> Value {
    json!({"dtype": "f32", "shape": shape, "offset": offset, "nbytes": nbytes})
}

/// Every check of a binary frame, against a real node: each bad frame gets its error code on a
/// connection that stays usable, sizes it claims are never allocated, and a good frame computes.
#[test]
fn bad_binary_frames_get_error_frames_and_the_node_allocates_nothing_they_claim() {
    let dir = TempDir::new("binary-bad");
    let node = NodeProc::start(&shards(&dir, "shards"), &["--threads", "1"]);
    let row: Vec<u8> = (0..EMBD).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
    let n = row.len() as u64;
    let frame = |header: &Value, data: &[u8]| binary::payload(header, data);
    let mut s = node.raw();
    // A good one first: the cases below fail for their fault, not for anything else.
    let good = read_and_parse(&mut s, &frame(&hidden_task("good", raw(0, n, json!([1, EMBD]))), &row));
    assert_eq!(good["status"], "success", "{good}");
    let before = rss_kib(node.child.id());
    let mut prefix_lies = frame(&hidden_task("a", raw(0, n, json!([1, EMBD]))), &row);
    prefix_lies[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("the marker alone", vec![0], "INVALID_FRAME"),
        ("a header length past the frame", prefix_lies, "INVALID_FRAME"),
        ("a header that is not JSON", frame_raw(b"{\"command\":", &row), "INVALID_JSON"),
        ("a tensor past the data", frame(&hidden_task("b", raw(8, n, json!([1, EMBD]))), &row), "OUT_OF_RANGE"),
        (
            "an offset that overflows",
            frame(&hidden_task("c", raw(u64::MAX - 3, n, json!([1, EMBD]))), &row),
            "OUT_OF_RANGE",
        ),
        (
            "fewer bytes than the shape",
            frame(&hidden_task("d", raw(0, n - 4, json!([1, EMBD]))), &row[..row.len() - 4]),
            "SHAPE_MISMATCH",
        ),
        (
            "a byte count of 2^64-1",
            frame(&hidden_task("e", raw(0, u64::MAX, json!([1, EMBD]))), &row),
            "SHAPE_MISMATCH",
        ),
        (
            "a shape of 2^80 floats",
            frame(&hidden_task("f", raw(0, n, json!([1u64 << 40, 1u64 << 40]))), &row),
            "OUT_OF_RANGE",
        ),
        (
            "bytes no tensor names",
            frame(&hidden_task("g", raw(0, n, json!([1, EMBD]))), &[&row[..], &[0u8; 4096]].concat()),
            "SHAPE_MISMATCH",
        ),
        (
            "raw bytes named in a JSON frame",
            serde_json::to_vec(&hidden_task("h", raw(0, n, json!([1, EMBD])))).unwrap(),
            "WRONG_TYPE",
        ),
    ];
    for (what, payload, code) in &cases {
        let r = read_and_parse(&mut s, payload);
        assert_eq!(r["status"], "error", "{what}: {r}");
        assert_eq!(r["code"], *code, "{what}: {r}");
        assert!(!r["error"].as_str().unwrap_or("").is_empty(), "{what}: {r}");
    }
    let r = read_and_parse(&mut s, &serde_json::to_vec(&json!({"command": "STATUS", "request_id": 1})).unwrap());
    assert_eq!(r["status"], "success", "the connection stays usable: {r}");
    let after = rss_kib(node.child.id());
    assert!(after < before + 8 * 1024, "RSS grew from {before} KiB to {after} KiB");
    node.assert_serving();
}

fn frame_raw(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    binary::encode(header, data, &mut p);
    p
}

/// Sends `payload` as a frame and reads the answer as JSON (a binary answer's header).
fn read_and_parse(s: &mut TcpStream, payload: &[u8]) -> Value {
    send_frame(s, payload);
    let answer = read_payload(s);
    if binary::is_binary(&answer) {
        serde_json::from_slice(binary::split(&answer).unwrap().header).unwrap()
    } else {
        serde_json::from_slice(&answer).unwrap()
    }
}

/// A two-node chain: a JSON client, a binary client, and a JSON client again get the same logits
/// bit for bit, each in the form it asked for; the relay link turns binary after its first
/// answer (STATUS `relays.binary_links`).
#[test]
fn nodes_relay_in_binary_and_each_client_gets_the_form_it_asked_for() {
    let dir = TempDir::new("binary-chain");
    let a = NodeProc::start(&shards(&dir, "a"), &["--threads", "1"]);
    let b = NodeProc::start(&shards(&dir, "b"), &["--threads", "1"]);
    let step = |session: &str, encoding: Option<&str>| {
        let mut p = json!({"session_id": session, "shard_id": 0, "input": {"tokens": [1, 17, 42]},
            "next": [{"address": b.addr, "shard_id": 1}], "output": "logits", "hop_timeout_ms": 30000});
        if let Some(e) = encoding {
            p["encoding_format"] = json!(e);
        }
        let mut c = a.client();
        c.set_timeout(Duration::from_secs(60)).unwrap();
        c.request_parts("EXECUTE_TASK", p, "test").unwrap()
    };
    let binary_links = || a.call("STATUS", json!({}))["result"]["relays"]["binary_links"].clone();
    assert_eq!(binary_links(), json!(0));
    let logits = |(r, data): &(Value, Vec<u8>)| {
        assert_eq!(r["status"], "success", "{r}");
        assert_eq!(r["result"]["hops"].as_array().unwrap().len(), 2, "{r}");
        f32_from_json_in(&r["result"]["logits"], 1 << 20, Some(&binary::Section::new(data))).unwrap().0
    };
    let first = step("json-1", None);
    assert!(first.1.is_empty() && first.0["result"]["logits"]["b64"].is_string(), "JSON asked, JSON answered");
    assert_eq!(binary_links(), json!(1), "the next hop answered the relay in binary");
    let second = step("binary", Some("binary"));
    let t = &second.0["result"]["logits"];
    assert!(t["b64"].is_null() && t["nbytes"].as_u64() == Some(second.1.len() as u64), "raw logits: {t}");
    let third = step("json-2", Some("base64"));
    assert!(third.1.is_empty() && third.0["result"]["logits"]["b64"].is_string());
    let (l1, l2, l3) = (logits(&first), logits(&second), logits(&third));
    assert!(!l1.is_empty());
    let bits = |l: &[f32]| l.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&l1), bits(&l2));
    assert_eq!(bits(&l1), bits(&l3));
    // The plain client reads a binary answer as JSON, its tensors in base64.
    let mut p = json!({"session_id": "plain", "shard_id": 0, "input": {"tokens": [1, 17, 42]},
        "next": [{"address": b.addr, "shard_id": 1}], "output": "logits", "encoding_format": "binary"});
    p["hop_timeout_ms"] = json!(30000);
    let r = a.call("EXECUTE_TASK", p);
    assert_eq!(bits(&f32_from_json(&r["result"]["logits"], 1 << 20).unwrap().0), bits(&l1));
}

/// A next hop that reads only JSON (an older node, another implementation: a thread here, which
/// fails the test on any binary frame) is sent JSON with the hidden state in base64 on every
/// request, though each asks for a binary answer; its JSON answers reach a binary client and a
/// JSON client alike.
#[test]
fn a_next_hop_that_reads_only_json_is_sent_json() {
    let dir = TempDir::new("binary-json-hop");
    let a = NodeProc::start(&shards(&dir, "a"), &["--threads", "1"]);
    let hop = TcpListener::bind("127.0.0.1:0").unwrap();
    let hop_addr = hop.local_addr().unwrap().to_string();
    let answer_logits = vec![0.25f32, -1.5, 3.0, 0.0];
    let want = answer_logits.clone();
    let addr = hop_addr.clone();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = hop.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        for _ in 0..3 {
            let payload = read_payload(&mut s);
            assert_eq!(payload.first(), Some(&b'{'), "a JSON-only next hop was sent a binary frame");
            let req: Value = serde_json::from_slice(&payload).unwrap();
            let p = &req["params"];
            assert_eq!(p["encoding_format"], "binary", "relays ask for binary answers: {p}");
            let (_, rows, cols) = f32_from_json(&p["input"]["hidden"], 1 << 20).unwrap();
            assert_eq!((rows, cols), (3, EMBD));
            let answer = json!({"command": "EXECUTE_TASK", "request_id": req["request_id"], "status": "success",
                "result": {"session_id": p["session_id"], "shard_id": 1, "pos": 0, "n_tokens": 3,
                    "logits": f32_to_json(&answer_logits, 1, 4),
                    "hops": [{"address": addr, "shard_id": 1, "timings": {"compute_ms": 0.1}}]}});
            send_frame(&mut s, &serde_json::to_vec(&answer).unwrap());
        }
    });
    for (session, encoding) in [("s1", "binary"), ("s2", "base64"), ("s3", "binary")] {
        let p = json!({"session_id": session, "shard_id": 0, "input": {"tokens": [1, 17, 42]},
            "next": [{"address": hop_addr, "shard_id": 1}], "output": "logits", "hop_timeout_ms": 30000,
            "encoding_format": encoding});
        let mut c = a.client();
        c.set_timeout(Duration::from_secs(60)).unwrap();
        let (r, data) = c.request_parts("EXECUTE_TASK", p, "test").unwrap();
        assert_eq!(r["status"], "success", "{r}");
        let got = f32_from_json_in(&r["result"]["logits"], 1 << 20, Some(&binary::Section::new(&data))).unwrap().0;
        assert_eq!(got, want, "{session}");
        assert_eq!(r["result"]["hops"].as_array().unwrap().len(), 2, "{r}");
    }
    fake.join().expect("the JSON-only next hop saw only JSON");
    let relays = a.call("STATUS", json!({}))["result"]["relays"].clone();
    assert_eq!(relays["binary_links"], json!(0), "{relays}");
}
