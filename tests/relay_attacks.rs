//! A stranger against the relay and output paths (red team round 6): a next hop answering other
//! links' requests, chains and unsent bytes piling up without bound, answers built for a client
//! that reads nothing, and relays used as a port scanner. Real node processes on loopback; the
//! fake next hops are threads of the test speaking the frame protocol (or not).
mod common;

use common::*;
use serde_json::{Value, json};
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::split;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The demo model (4 layers) split in `shards` into `dir/shards`.
fn shards(dir: &TempDir, config: DemoConfig, shards: u32) -> PathBuf {
    let model = dir.path().join("demo.gguf");
    demo::write(&DemoConfig { layers: 4, ..config }, &model).unwrap();
    let out = dir.path().join("shards");
    split::split(&model, shards, &out, None).unwrap();
    out
}

fn chain(session: &str, next: &str, tokens: usize, timeout_ms: u64) -> Value {
    let input: Vec<u32> = (0..tokens as u32).map(|i| 1 + i % 200).collect();
    json!({"session_id": session, "shard_id": 0, "pos": 0, "input": {"tokens": input},
        "next": [{"address": next, "shard_id": 1}], "output": "top_k", "k": 1, "hop_timeout_ms": timeout_ms})
}

fn frame_bytes(v: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(v).unwrap();
    let mut wire = (body.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&body);
    wire
}

fn relays(node: &NodeProc) -> Value {
    node.call("STATUS", json!({}))["result"]["relays"].clone()
}

/// A next hop answers only requests sent on its own link. The victim's chain waits at an honest
/// hop V; the attacker's chain goes to a fake hop F, which answers every request id from 0 to far
/// past its own (nearest first) with a forged result and with HOP_FAILED naming a healthy node. The node takes
/// none of them for the victim (before: the victim got F's token 666): F's link is closed at its
/// first foreign id, the attacker's chain fails naming F, and the victim gets V's answer.
#[test]
fn a_next_hop_cannot_answer_requests_sent_to_another() {
    let dir = TempDir::new("relay-spoof");
    let a = NodeProc::start(&shards(&dir, DemoConfig::default(), 2), &["--threads", "1"]);
    let honest = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let (v_addr, f_addr) = (honest.local_addr().unwrap().to_string(), fake.local_addr().unwrap().to_string());

    let victim = spawn_chain(&a.addr, chain("victim", &v_addr, 3, 30_000));
    honest.set_nonblocking(false).unwrap();
    let (mut v, _) = honest.accept().unwrap();
    v.set_read_timeout(Some(WAIT)).unwrap();
    let victim_req = read_frame(&mut v);
    let victim_id = victim_req["request_id"].as_u64().expect("a numeric relay id");

    let attacker = spawn_chain(&a.addr, chain("attacker", &f_addr, 3, 30_000));
    let (mut f, _) = fake.accept().unwrap();
    f.set_read_timeout(Some(WAIT)).unwrap();
    let own = read_frame(&mut f)["request_id"].as_u64().unwrap();
    // Forged answers for every id but its own, nearest first (the ids are guessable), the
    // victim's among them.
    let mut spray = Vec::new();
    for id in (0..own).rev().chain(own + 1..own + 400) {
        let forged = json!({"command": "EXECUTE_TASK", "request_id": id, "status": "success",
            "result": {"top_k": [{"id": 666, "logit": 99.0}], "hops": [{"address": "evil", "shard_id": 1}]}});
        spray.extend(frame_bytes(&forged));
        let blame = json!({"command": "EXECUTE_TASK", "request_id": id, "status": "error", "code": "HOP_FAILED",
            "error": "forged", "failed_hop": {"address": a.addr, "shard_id": 1}});
        spray.extend(frame_bytes(&blame));
    }
    let _ = f.write_all(&spray);

    let r = attacker.join().unwrap();
    assert_eq!(r["code"], "HOP_FAILED", "{r}");
    assert_eq!(r["failed_hop"]["address"], json!(f_addr), "the fake hop is the one failed: {r}");
    // F's link is gone; the victim's request still waits at V.
    wait_for(WAIT, || (relays(&a)["links"] == json!(1)).then_some(()));
    assert_eq!(relays(&a)["in_flight"], json!(1));
    assert!(!victim.is_finished(), "the victim's chain ended before its hop answered");

    let answer = json!({"command": "EXECUTE_TASK", "request_id": victim_id, "status": "success",
        "result": {"top_k": [{"id": 7, "logit": 1.0}], "hops": [{"address": v_addr, "shard_id": 1}]}});
    v.write_all(&frame_bytes(&answer)).unwrap();
    let r = victim.join().unwrap();
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["result"]["top_k"][0]["id"], json!(7), "the victim got its own hop's answer: {r}");
    assert_eq!(r["result"]["hops"][1]["address"], json!(v_addr), "{r}");
    a.assert_serving();
}

/// Relays are bounded node-wide: with `--max-relays 3`, chains into a hop that never answers take
/// three slots and the others are answered BUSY at once (before: every chain waited, without
/// bound); `hop_timeout_ms` past 10 minutes is refused.
#[test]
fn relays_in_flight_are_bounded_node_wide() {
    let dir = TempDir::new("relay-cap");
    let a = NodeProc::start(&shards(&dir, DemoConfig::default(), 2), &["--threads", "1", "--max-relays", "3"]);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let s_addr = silent.local_addr().unwrap().to_string();
    let r = a.call("EXECUTE_TASK", chain("long", &s_addr, 3, 600_001));
    assert_eq!(r["code"], "OUT_OF_RANGE", "{r}");
    let stuck: Vec<_> = (0..3).map(|i| spawn_chain(&a.addr, chain(&format!("s{i}"), &s_addr, 3, 8_000))).collect();
    wait_for(WAIT, || (relays(&a)["in_flight"] == json!(3)).then_some(()));
    let t = Instant::now();
    let r = a.call("EXECUTE_TASK", chain("over", &s_addr, 3, 8_000));
    assert_eq!(r["code"], "BUSY", "{r}");
    assert!(r["error"].as_str().unwrap().contains("--max-relays"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(5), "BUSY at once, not after the hop timeout");
    assert_eq!(relays(&a)["refused"], json!(1));
    for t in stuck {
        assert_eq!(t.join().unwrap()["code"], "HOP_FAILED");
    }
    drop(silent);
    a.assert_serving();
}

/// Red-team round 2: one client filled `--max-relays` with chains to its own silent hop, and
/// every other client's chains were answered BUSY until they timed out. Now one client holds at
/// most `--max-relays-per-client`; its chains past that are refused, and others still relay.
#[test]
fn one_client_cannot_take_every_relay() {
    let dir = TempDir::new("relay-per-client");
    let args = ["--threads", "1", "--max-relays", "8", "--max-relays-per-client", "2"];
    let a = NodeProc::start(&shards(&dir, DemoConfig::default(), 2), &args);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let s_addr = silent.local_addr().unwrap().to_string();
    // One connection (one client), four chains into the silent hop.
    let mut s = a.raw();
    for i in 0..4 {
        let params = chain(&format!("c{i}"), &s_addr, 3, 4_000);
        send_frame(
            &mut s,
            &serde_json::to_vec(&json!({"command": "EXECUTE_TASK", "request_id": i, "params": params})).unwrap(),
        );
    }
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    for _ in 0..2 {
        let r = read_frame(&mut s);
        assert_eq!(r["code"], "BUSY", "{r}");
        assert!(r["error"].as_str().unwrap().contains("--max-relays-per-client"), "{r}");
    }
    // Another client's chain is still relayed.
    let other = spawn_chain(&a.addr, chain("other", &s_addr, 3, 4_000));
    wait_for(WAIT, || (relays(&a)["in_flight"] == json!(3)).then_some(()));
    assert_eq!(relays(&a)["refused"], json!(2));
    assert_eq!(other.join().unwrap()["code"], "HOP_FAILED");
    drop(silent);
    a.assert_serving();
}

/// A next hop that accepts and never reads: once the link's unsent bytes pass
/// `--relay-link-buffer`, further chains to it are answered BUSY without buffering them, and
/// `--io-timeout` closes the link, failing the chains on it long before their hop timeout
/// (before: the unsent bytes grew with every chain, and waited for `hop_timeout_ms`).
#[test]
fn a_next_hop_that_never_reads_holds_bounded_bytes_for_io_timeout() {
    let dir = TempDir::new("relay-noread");
    let args = ["--threads", "1", "--relay-link-buffer", "65536", "--io-timeout", "3", "--ctx-size", "2048"];
    let a = NodeProc::start(&shards(&dir, DemoConfig { context: 2048, ..Default::default() }, 2), &args);
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = sink.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let (s, _) = sink.accept().unwrap();
        std::thread::sleep(Duration::from_secs(40));
        drop(s);
    });
    // Each relayed frame is 2000 rows of hidden state (1.4 MB): the socket buffers (a few MB on
    // loopback) fill after a few, then the link's own buffer.
    let t = Instant::now();
    let chains: Vec<_> = (0..24).map(|i| spawn_chain(&a.addr, chain(&format!("n{i}"), &addr, 2000, 120_000))).collect();
    let answers: Vec<Value> = chains.into_iter().map(|c| c.join().unwrap()).collect();
    let busy = answers.iter().filter(|r| r["code"] == "BUSY").count();
    let failed = answers.iter().filter(|r| r["code"] == "HOP_FAILED").count();
    assert!(busy >= 1, "no chain was refused for the link's buffer: {answers:?}");
    assert_eq!(busy + failed, 24, "{answers:?}");
    assert!(answers.iter().any(|r| r["error"].as_str().is_some_and(|e| e.contains("--relay-link-buffer"))));
    assert!(t.elapsed() < Duration::from_secs(60), "ended by --io-timeout, not the 120 s hop timeout");
    assert_eq!(relays(&a)["in_flight"], json!(0));
    a.assert_serving();
    drop(held);
}

/// The inference thread writes a relay request to its link itself when the link has nothing
/// queued; what the socket does not take is queued and finished by the event loop, behind
/// whatever was queued before. A next hop that reads nothing for a while, then slowly: six
/// requests of 1.4 MB each (more than the socket buffers hold) arrive whole, in the order they
/// were submitted (ascending relay ids), each parsing as the request it is (a byte of one inside
/// another breaks its frame), and every chain gets its own answer.
#[test]
fn relay_writes_the_socket_does_not_take_are_finished_in_order() {
    let dir = TempDir::new("relay-partial");
    let args = ["--threads", "1", "--ctx-size", "2048"];
    let a = NodeProc::start(&shards(&dir, DemoConfig { context: 2048, ..Default::default() }, 2), &args);
    let slow = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = slow.local_addr().unwrap().to_string();
    const CHAINS: usize = 6;
    let hop = std::thread::spawn(move || {
        let (mut s, _) = slow.accept().unwrap();
        // Nothing read for a second: the socket buffers fill and later requests wait whole on
        // the link.
        std::thread::sleep(Duration::from_secs(1));
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut requests = Vec::new();
        let mut frame = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        while requests.len() < CHAINS {
            // Slowly: 64 KiB at a time.
            let n = s.read(&mut chunk).expect("reading the relayed requests");
            assert!(n > 0, "the link closed after {} requests", requests.len());
            frame.extend_from_slice(&chunk[..n]);
            std::thread::sleep(Duration::from_millis(2));
            while frame.len() >= 4 {
                let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
                if frame.len() < 4 + len {
                    break;
                }
                let v: Value = serde_json::from_slice(&frame[4..4 + len]).expect("a whole request, unmixed");
                frame.drain(..4 + len);
                requests.push(v);
            }
        }
        let ids: Vec<u64> = requests.iter().map(|r| r["request_id"].as_u64().expect("a relay id")).collect();
        for r in &requests {
            assert_eq!(r["command"], "EXECUTE_TASK", "{r}");
            assert_eq!(r["params"]["pos"], json!(0));
            assert_eq!(
                r["params"]["input"]["hidden"]["shape"][0],
                json!(2000),
                "a whole hidden state: {}",
                r["params"]["input"]["hidden"]["shape"]
            );
            let answer = json!({"command": "EXECUTE_TASK", "request_id": r["request_id"], "status": "success",
                "result": {"top_k": [{"id": 7, "logit": 1.0}], "hops": [{"address": "hop", "shard_id": 1}]}});
            s.write_all(&frame_bytes(&answer)).unwrap();
        }
        let sessions: Vec<String> =
            requests.iter().map(|r| r["params"]["session_id"].as_str().unwrap().to_string()).collect();
        (ids, sessions, s)
    });
    // One after another (each queued once the previous one's relay is in flight), so that the
    // relay ids follow the order of the chains.
    let mut chains = Vec::new();
    for i in 0..CHAINS {
        chains.push(spawn_chain(&a.addr, chain(&format!("p{i}"), &addr, 2000, 60_000)));
        wait_for(WAIT, || (relays(&a)["in_flight"] == json!(i + 1)).then_some(()));
    }
    for c in chains {
        let r = c.join().unwrap();
        assert_eq!(r["status"], "success", "{r}");
        assert_eq!(r["result"]["top_k"][0]["id"], json!(7), "{r}");
    }
    let (ids, sessions, _s) = hop.join().unwrap();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "requests out of order: {ids:?}");
    let expected: Vec<String> = (0..CHAINS).map(|i| format!("p{i}")).collect();
    assert_eq!(sessions, expected, "each request once, in the order submitted");
    a.assert_serving();
}

/// A client that sends many `all_logits` requests and reads nothing gets one computed, not all:
/// answers being computed count against the connection's output (before: all were computed and
/// queued, 134 MB each on SmolLM2). Reading then brings every answer; more than 64 rows of
/// logits in one task are refused. The requests the node leaves buffered while it waits for the
/// client to read are not "a frame not whole" (before: closed with `FRAME_TIMEOUT` once the
/// client had waited longer than `--frame-timeout`).
#[test]
fn answers_for_a_client_that_reads_nothing_are_bounded() {
    let dir = TempDir::new("relay-logits");
    // SmolLM2's vocabulary: 64 rows of logits are a 17 MB answer.
    let config = DemoConfig { vocab: 49152, ..Default::default() };
    // A short frame deadline: the paused connection's buffered requests wait longer than it, and
    // the deadline must not count while the node itself is not reading them.
    let a = NodeProc::start(&shards(&dir, config, 1), &["--threads", "1", "--frame-timeout", "3"]);
    let task = |s: &str, n: usize| {
        let input: Vec<u32> = (0..n as u32).map(|i| 1 + i % 200).collect();
        json!({"session_id": s, "shard_id": 0, "pos": 0, "input": {"tokens": input}, "output": "logits",
            "all_logits": true})
    };
    let r = a.call("EXECUTE_TASK", task("big", 65));
    assert_eq!(r["code"], "OUT_OF_RANGE", "{r}");
    let tasks = || a.call("STATUS", json!({}))["result"]["inference"]["tasks"].as_u64().unwrap();
    let before = tasks();
    let mut s = TcpStream::connect(&a.addr).unwrap();
    for i in 0..6 {
        let req = json!({"command": "EXECUTE_TASK", "request_id": i, "params": task(&format!("q{i}"), 64)});
        send_frame(&mut s, &serde_json::to_vec(&req).unwrap());
    }
    wait_for(WAIT, || (tasks() > before).then_some(()));
    // Time for the others to run, were they admitted (each takes milliseconds), and past the
    // frame deadline.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(tasks(), before + 1, "answers were computed for a client reading nothing");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut ids: Vec<u64> = (0..6)
        .map(|_| {
            let r = read_frame(&mut s);
            assert_eq!(r["status"], "success", "{}", r["error"]);
            r["request_id"].as_u64().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, (0..6).collect::<Vec<_>>(), "every answer came once the client read");
    a.assert_serving();
}

/// Relays do not make the node a port scanner: a next hop that is an HTTP server, one that sends
/// other bytes, and a port nobody listens on all get one text (before: "answer of 1213486160
/// bytes", the server's first four bytes, or "connection refused").
#[test]
fn foreign_services_behind_a_relay_get_one_generic_error() {
    let dir = TempDir::new("relay-scan");
    let a = NodeProc::start(&shards(&dir, DemoConfig::default(), 2), &["--threads", "1"]);
    let serve = |reply: &'static [u8]| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming().take(1) {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 4096];
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.read(&mut buf);
                let _ = s.write_all(reply);
            }
        });
        addr
    };
    let http = serve(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    let ssh = serve(b"SSH-2.0-OpenSSH_9.2\r\n");
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut texts = Vec::new();
    for (i, addr) in [http, ssh, refused].iter().enumerate() {
        let r = a.call("EXECUTE_TASK", chain(&format!("p{i}"), addr, 3, 10_000));
        assert_eq!(r["code"], "HOP_FAILED", "{r}");
        let e = r["error"].as_str().unwrap().to_string();
        assert!(!e.contains("1213486160") && !e.contains("HTTP") && !e.contains("SSH"), "{e}");
        texts.push(e.replace(addr.as_str(), "ADDR"));
    }
    assert!(texts.iter().all(|t| *t == texts[0]), "one text for every foreign service: {texts:?}");
    a.assert_serving();
}

/// A large relayed answer (64 rows of `all_logits` at SmolLM2's vocabulary: 12.6 MB raw, 16.8 MB
/// as base64) is made into its caller's frame off the event loop (STATUS
/// `relays.finished_off_loop`): measured before, making the JSON one held the loop, and every
/// other client's STATUS or step, for 126 ms. Both callers get the same logits, a JSON caller
/// as base64, a binary one as raw bytes, and a small answer is still made on the loop.
#[test]
fn a_large_relayed_answer_is_made_off_the_loop() {
    let dir = TempDir::new("relay-finish");
    let config = DemoConfig { vocab: 49152, ..Default::default() };
    let a = NodeProc::start(&shards(&dir, config, 2), &["--threads", "1"]);
    let task = |s: &str, n: usize| {
        let input: Vec<u32> = (0..n as u32).map(|i| 1 + i % 200).collect();
        json!({"session_id": s, "shard_id": 0, "pos": 0, "input": {"tokens": input}, "output": "logits",
            "all_logits": true, "next": [{"address": a.addr, "shard_id": 1}]})
    };
    let mut c = a.client();
    c.set_timeout(Duration::from_secs(60)).unwrap();
    let r = c.request("EXECUTE_TASK", task("json", 64)).unwrap();
    assert_eq!(r["status"], "success", "{}", r["error"]);
    let (from_json, rows, cols) =
        shardnet::protocol::tensor::f32_from_json(&r["result"]["logits"], usize::MAX).unwrap();
    assert_eq!((rows, cols), (64, 49152));
    assert_eq!(r["result"]["hops"].as_array().map(Vec::len), Some(2), "{}", r["result"]["hops"]);
    let mut t = task("binary", 64);
    t["encoding_format"] = json!("binary");
    let (r, data) = c.request_parts("EXECUTE_TASK", t, "test").unwrap();
    assert_eq!(r["status"], "success", "{}", r["error"]);
    let section = shardnet::protocol::binary::Section::new(&data);
    let (from_raw, ..) =
        shardnet::protocol::tensor::f32_from_json_in(&r["result"]["logits"], usize::MAX, Some(&section)).unwrap();
    assert!(from_json == from_raw, "the JSON and the binary answer differ");
    assert_eq!(relays(&a)["finished_off_loop"], json!(2), "{}", relays(&a));
    // One row (192 KiB) is made on the loop.
    let r = c.request("EXECUTE_TASK", task("small", 1)).unwrap();
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(relays(&a)["finished_off_loop"], json!(2), "{}", relays(&a));
    a.assert_serving();
}

/// A next hop answering a large JSON frame where a binary one was asked (every relayed request
/// asks `encoding_format: "binary"`) would have it parsed on the event loop: past 1 MiB it is
/// refused from its first byte and the chain fails naming that hop (before: a 17 MB JSON answer
/// of 64 rows of logits was parsed on the loop, holding every other client). A small JSON answer
/// is still taken.
#[test]
fn a_next_hop_answering_a_large_json_frame_is_failed() {
    let dir = TempDir::new("relay-json");
    let config = DemoConfig { vocab: 49152, ..Default::default() };
    let a = NodeProc::start(&shards(&dir, config, 2), &["--threads", "1"]);
    let hop = TcpListener::bind("127.0.0.1:0").unwrap();
    let h_addr = hop.local_addr().unwrap().to_string();
    let ask = |s: &str, n: usize| {
        let input: Vec<u32> = (0..n as u32).map(|i| 1 + i % 200).collect();
        json!({"session_id": s, "shard_id": 0, "pos": 0, "input": {"tokens": input}, "output": "logits",
            "all_logits": true, "next": [{"address": h_addr, "shard_id": 1}], "hop_timeout_ms": 30_000})
    };
    let answer = |id: u64, rows: usize| {
        let logits = shardnet::protocol::tensor::f32_to_json(&vec![0.5; rows * 49152], rows, 49152);
        let v = json!({"command": "EXECUTE_TASK", "request_id": id, "status": "success",
            "result": {"logits": logits, "hops": [{"address": h_addr, "shard_id": 1}]}});
        frame_bytes(&v)
    };
    // One row (256 KiB of base64) is taken.
    let small = spawn_chain(&a.addr, ask("small", 1));
    let (mut f, _) = hop.accept().unwrap();
    f.set_read_timeout(Some(WAIT)).unwrap();
    let id = read_frame(&mut f)["request_id"].as_u64().unwrap();
    f.write_all(&answer(id, 1)).unwrap();
    let r = small.join().unwrap();
    assert_eq!(r["status"], "success", "{r}");
    // Eight rows (2 MiB of base64) are not.
    let big = spawn_chain(&a.addr, ask("big", 8));
    let id = read_frame(&mut f)["request_id"].as_u64().unwrap();
    let _ = f.write_all(&answer(id, 8));
    let r = big.join().unwrap();
    assert_eq!(r["code"], "HOP_FAILED", "{} {}", r["status"], r["error"]);
    assert!(r["error"].as_str().unwrap().contains("binary one was asked"), "{r}");
    assert_eq!(r["failed_hop"]["address"], json!(h_addr), "{r}");
    a.assert_serving();
}
