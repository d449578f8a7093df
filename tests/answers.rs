//! Answers from other nodes are checked against what was asked (red team round 5, findings 3-5):
//! a hostile node in front of a real one (a userspace frame-level proxy that rewrites or drips the
//! real node's EXECUTE_TASK answers) makes `shardctl infer` replace it and write the text of an
//! uninterrupted run; a relaying node refuses an oversized or misshapen answer from its next hop
//! (before reading it, when its length says so) and blames that hop; `shardctl serve` frees the
//! slot of a client that left while the node drips its answer.
mod common;

use common::*;
use serde_json::{Value, json};
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::split;
use shardnet::protocol::binary;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PROMPT: &str = "The capital of France is";

/// What the hostile node does to the answers it tampers with.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Forwards them as they are.
    Pass,
    /// Sends each one byte per 200 ms (every read gets a byte long before any per-read timeout).
    Drip,
    /// 200,000 fake entries in `hops` (an 8 MB answer to a request for one logit).
    ManyHops,
    /// Two `top_k` entries where one was asked.
    TopKOver,
    /// A token id past the vocabulary.
    Oov,
    Negative,
    Float,
    /// An empty `top_k`.
    Empty,
}

/// A hostile node: a proxy in front of `target` that forwards requests as they are and tampers
/// with the successful EXECUTE_TASK answers whose request id `pick` selects, per its mode.
struct Hostile {
    addr: String,
    mode: Arc<Mutex<Mode>>,
    /// Answers tampered with so far.
    tampered: Arc<AtomicUsize>,
}

impl Hostile {
    fn run(listener: TcpListener, target: String, pick: fn(&Value) -> bool) -> Hostile {
        let addr = listener.local_addr().unwrap().to_string();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let tampered = Arc::new(AtomicUsize::new(0));
        let (m, t) = (mode.clone(), tampered.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&target) else { continue };
                let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(Shutdown::Both);
                });
                let (m, t) = (m.clone(), t.clone());
                std::thread::spawn(move || answers(server, client, pick, &m, &t));
            }
        });
        Hostile { addr, mode, tampered }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn tampered(&self) -> usize {
        self.tampered.load(Ordering::SeqCst)
    }
}

/// Carries the node's answers (`server`) to `client`, frame by frame, tampering as told.
fn answers(
    mut server: TcpStream,
    mut client: TcpStream,
    pick: fn(&Value) -> bool,
    mode: &Mutex<Mode>,
    n: &AtomicUsize,
) {
    loop {
        let mut len = [0u8; 4];
        if server.read_exact(&mut len).is_err() {
            break;
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        if server.read_exact(&mut body).is_err() {
            break;
        }
        let (header, data) = if binary::is_binary(&body) {
            let p = binary::split(&body).unwrap();
            (p.header.to_vec(), p.data.to_vec())
        } else {
            (body.clone(), Vec::new())
        };
        let mode = *mode.lock().unwrap();
        let v: Value = serde_json::from_slice(&header).unwrap_or(Value::Null);
        let chosen = v["command"] == "EXECUTE_TASK" && v["status"] == "success" && pick(&v["request_id"]);
        if !chosen || mode == Mode::Pass {
            if client.write_all(&len).and_then(|_| client.write_all(&body)).is_err() {
                break;
            }
            continue;
        }
        n.fetch_add(1, Ordering::SeqCst);
        let mut v = v;
        let entry = |id: Value| json!({"id": id, "logit": 5.0});
        match mode {
            Mode::Pass | Mode::Drip => {}
            Mode::ManyHops => {
                let hop = v["result"]["hops"][0].clone();
                v["result"]["hops"] = Value::Array(vec![hop; 200_000]);
            }
            Mode::TopKOver => v["result"]["top_k"] = json!([entry(json!(0)), entry(json!(1))]),
            Mode::Oov => v["result"]["top_k"] = json!([entry(json!(10_000_000))]),
            Mode::Negative => v["result"]["top_k"] = json!([entry(json!(-1))]),
            Mode::Float => v["result"]["top_k"] = json!([entry(json!(1.5))]),
            Mode::Empty => v["result"]["top_k"] = json!([]),
        }
        let payload = if mode == Mode::Drip {
            body
        } else {
            let header = serde_json::to_vec(&v).unwrap();
            if binary::is_binary(&body) {
                let mut p = Vec::new();
                binary::encode(&header, &data, &mut p);
                p
            } else {
                header
            }
        };
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        if mode == Mode::Drip {
            for b in frame {
                std::thread::sleep(Duration::from_millis(200));
                if client.write_all(&[b]).is_err() {
                    return;
                }
            }
        } else if client.write_all(&frame).is_err() {
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}

/// A coordinator's request ids (`ctl-N`).
fn from_coordinator(id: &Value) -> bool {
    id.as_str().is_some_and(|s| s.starts_with("ctl-"))
}

/// A relaying node's request ids (numbers).
fn from_relay(id: &Value) -> bool {
    id.is_u64()
}

fn model(dir: &Path) -> PathBuf {
    let path = dir.join("demo.gguf");
    demo::write(&DemoConfig { layers: 4, ..Default::default() }, &path).unwrap();
    path
}

fn shardctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardctl")).args(args).output().unwrap()
}

/// Runs `shardctl ARGS`, killed (and the test failed) past `limit`: (stdout, stderr lines, success).
fn shardctl_within(limit: Duration, args: &[&str]) -> (Vec<u8>, Vec<String>, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
    let mut stdout = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("shardctl {args:?} still running after {limit:?}: {:?}", log.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (out.join().unwrap(), log.join().unwrap(), status.success())
}

fn wait_cluster(boot: &NodeProc, addrs: &[&str]) {
    wait_for(Duration::from_secs(30), || {
        let r = boot.call("FIND_PEERS", json!({"cluster": true}));
        let peers = r["result"]["peers"].as_array().cloned().unwrap_or_default();
        addrs.iter().all(|a| peers.contains(&json!(a))).then_some(())
    });
}

/// A copy of `from`'s shard files in a new directory `to`.
fn copy_shards(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "gguf") {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// The first node of the chain answers what was not asked (a dripped answer, 200,000 hops, a
/// top_k past k, ids outside the vocabulary, negative or fractional, none at all): each is that
/// node's failed hop, never an end of text and never a hang. `shardctl infer` moves its shard to
/// another node and writes the tokens of an uninterrupted run, and the log says why. Before: a
/// drip held infer forever (only each read had a timeout), hops and top_k were taken in whole,
/// and a bad id ended generation as success with empty text.
#[test]
fn infer_replaces_a_first_node_whose_answers_are_not_what_was_asked() {
    let dir = TempDir::new("answers-infer");
    let model = model(dir.path());
    let o = shardctl(&["--json", "generate", model.to_str().unwrap(), "--prompt", PROMPT, "-n", "4", "--ignore-eos"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = serde_json::from_slice::<Value>(&o.stdout).unwrap()["tokens"].clone();
    let d0 = dir.path().join("node-0");
    split::split(&model, 2, &d0, None).unwrap();
    // Node 0 is known at the hostile proxy's port only.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let args = ["--enable-torrent", "--threads", "1"];
    let n0 = NodeProc::start(&d0, &[&args[..], &["--announce-port", &port]].concat());
    let hostile = Hostile::run(listener, n0.addr.clone(), from_coordinator);
    let infer = |n: &str| {
        let args = ["--timeout", "4", "--json", "infer", "--bootstrap", &hostile.addr, "--prompt", PROMPT];
        shardctl_within(Duration::from_secs(60), &[&args[..], &["-n", n, "--ignore-eos"]].concat())
    };
    // Alone, node 0 loads both shards: it ranks first for shard 0 from now on.
    let (_, log, ok) = infer("1");
    assert!(ok, "{log:?}");
    let cases = [
        (Mode::Drip, "no whole answer within 4000 ms"),
        (Mode::ManyHops, "(what was asked allows); not read"),
        (Mode::TopKOver, "top_k holds 2 entries, 1 to 1 were asked"),
        (Mode::Oov, "is not a token id below"),
        (Mode::Negative, "is not a token id below"),
        (Mode::Float, "is not a token id below"),
        (Mode::Empty, "top_k holds 0 entries"),
    ];
    for (i, (mode, why)) in cases.into_iter().enumerate() {
        // A fresh spare each time (the last one has the shards loaded now, and would rank first).
        let d = dir.path().join(format!("spare-{i}"));
        copy_shards(&d0, &d);
        let spare = NodeProc::start(&d, &[&args[..], &["--bootstrap", &n0.addr]].concat());
        wait_cluster(&n0, &[&spare.addr]);
        hostile.set(mode);
        let before = hostile.tampered();
        let (out, log, ok) = infer("4");
        hostile.set(Mode::Pass);
        assert!(ok, "{mode:?}: infer failed: {log:?}");
        assert!(hostile.tampered() > before, "{mode:?}: the hostile node was not the first hop: {log:?}");
        let run: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(run["tokens"], want, "{mode:?}: the recovered run wrote other tokens: {log:?}");
        assert_eq!(run["recoveries"], json!(1), "{mode:?}: {log:?}");
        let line = log.iter().find(|l| l.starts_with("recovering:")).unwrap_or_else(|| panic!("{mode:?}: {log:?}"));
        assert!(line.contains(&format!("moved from {} to {}", hostile.addr, spare.addr)), "{mode:?}: {line}");
        assert!(line.contains(why), "{mode:?}: {why:?} not in {line}");
    }
    n0.assert_serving();
}

/// A relaying node checks its next hop's answer against what the relayed request asked: a frame
/// longer than that answer can be is refused from its length prefix (never buffered or parsed
/// on the event loop), and too many hops or top_k entries, or an id outside the vocabulary, are
/// refused once parsed: each is HOP_FAILED naming that next hop. The node keeps serving.
#[test]
fn a_relay_refuses_an_answer_bigger_or_other_than_asked() {
    let dir = TempDir::new("answers-relay");
    let model = model(dir.path());
    let d0 = dir.path().join("node-0");
    split::split(&model, 2, &d0, None).unwrap();
    let d1 = dir.path().join("node-1");
    copy_shards(&d0, &d1);
    let n0 = NodeProc::start(&d0, &["--threads", "1"]);
    let n1 = NodeProc::start(&d1, &["--threads", "1"]);
    let hostile = Hostile::run(TcpListener::bind("127.0.0.1:0").unwrap(), n1.addr.clone(), from_relay);
    let mut c = n0.client();
    c.set_timeout(Duration::from_secs(60)).unwrap();
    let mut step = |session: &str, k: u32| {
        let params = json!({"session_id": session, "shard_id": 0, "pos": 0, "input": {"tokens": [1, 2, 3]},
            "next": [{"address": hostile.addr, "shard_id": 1}], "output": "top_k", "k": k, "hop_timeout_ms": 20000});
        c.request("EXECUTE_TASK", params).unwrap()
    };
    let r = step("pass", 1);
    assert_eq!(r["status"], "success", "{r}");
    let cases = [
        (Mode::ManyHops, "declared, over the"),
        (Mode::TopKOver, "top_k holds 2 entries, 1 to 1 were asked"),
        (Mode::Oov, "is not a token id below"),
        (Mode::Empty, "top_k holds 0 entries"),
    ];
    for (mode, why) in cases {
        hostile.set(mode);
        let before = hostile.tampered();
        let r = step(&format!("{mode:?}"), 1);
        assert!(hostile.tampered() > before, "{mode:?}: not tampered: {r}");
        assert_eq!(r["code"], "HOP_FAILED", "{mode:?}: {r}");
        assert_eq!(r["failed_hop"]["address"], json!(hostile.addr), "{mode:?}: {r}");
        assert!(r["error"].as_str().unwrap().contains(why), "{mode:?}: {why:?} not in {r}");
    }
    // What was asked bounds the answer: the whole vocabulary (512 tokens) asked as top_k is taken.
    hostile.set(Mode::Pass);
    let r = step("k1000", 1000);
    assert_eq!(r["status"], "success", "{}", r["error"]);
    assert_eq!(r["result"]["top_k"].as_array().unwrap().len(), 512, "every token of the demo vocabulary");
    n0.assert_serving();
}

/// `shardctl serve --parallel 1` behind a node that drips its answers: a client that leaves
/// while its step waits frees the slot at once (its step is given up), so the next request is
/// served long before the coordinator's own timeout (120 s here) would have freed it. Before,
/// the slot stayed held for as long as the drip went on.
#[test]
fn serve_frees_the_slot_of_a_client_that_left_while_a_node_drips() {
    let dir = TempDir::new("answers-serve");
    let model = model(dir.path());
    let d0 = dir.path().join("node-0");
    split::split(&model, 2, &d0, None).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let n0 = NodeProc::start(&d0, &["--enable-torrent", "--threads", "1", "--announce-port", &port]);
    let hostile = Hostile::run(listener, n0.addr.clone(), from_coordinator);
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["--timeout", "120", "serve", "--bootstrap", &hostile.addr, "--listen", "127.0.0.1:0"])
        .args(["--parallel", "1"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = serve.stdout.take().unwrap();
    let _serve = Kill(serve);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let http = line.split("http://").nth(1).expect("an address").trim().to_string();
    let body = json!({"prompt": PROMPT, "max_tokens": 3, "temperature": 0}).to_string();
    let send = |s: &mut TcpStream| {
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap();
    };
    let status_of = |s: TcpStream| {
        let mut line = String::new();
        match BufReader::new(s).read_line(&mut line) {
            Ok(_) => line,
            Err(e) => format!("no answer: {e}"),
        }
    };
    // Ready: the chain is placed (one answer served, untouched).
    wait_for(Duration::from_secs(60), || {
        let Ok(mut s) = TcpStream::connect(&http) else { return None };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        send(&mut s);
        status_of(s).contains(" 200 ").then_some(())
    });
    // A client whose answer the node drips, gone while it waits.
    hostile.set(Mode::Drip);
    let before = hostile.tampered();
    let mut gone = TcpStream::connect(&http).unwrap();
    send(&mut gone);
    wait_for(Duration::from_secs(30), || (hostile.tampered() > before).then_some(()));
    drop(gone);
    hostile.set(Mode::Pass);
    // The next client gets the slot and its answer well within the 120 s the step could wait.
    let mut next = TcpStream::connect(&http).unwrap();
    next.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    send(&mut next);
    let line = status_of(next);
    assert!(line.contains(" 200 "), "the next request was not served while the slot was held: {line:?}");
    // logit_bias ids are checked against the model's vocabulary (512 tokens): 400, not ignored.
    let mut s = TcpStream::connect(&http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = json!({"prompt": PROMPT, "max_tokens": 1, "logit_bias": {"512": 5}}).to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains(r#""param":"logit_bias""#) && answer.contains("invalid_request_error"), "{answer}");
    n0.assert_serving();
}
