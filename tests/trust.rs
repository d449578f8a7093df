//! A cluster as a trust boundary (issue 12), through real node processes on loopback: the
//! cluster key on command connections (refusals, replays, edits, bad handshakes, key files),
//! sessions owned by their token with per-client quotas, and the pinned model.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{Value, json};
use shardnet::client::Client;
use shardnet::protocol::auth::{ClientHandshake, ClusterKey, FrameMac, NONCE_LEN};

/// Writes a key file with `mode`; returns its path.
fn key_file(dir: &Path, name: &str, key: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

const KEY: &str = "9f2c61d0a4b7e3f8c5d2a1b0e9f8c7d6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0\n";

fn key(text: &str) -> ClusterKey {
    ClusterKey::from_bytes(text.trim().as_bytes()).unwrap()
}

fn frame_bytes(payload: &[u8]) -> Vec<u8> {
    let mut w = (payload.len() as u32).to_be_bytes().to_vec();
    w.extend_from_slice(payload);
    w
}

fn read_raw(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("reading a frame length");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).expect("reading a frame body");
    buf
}

fn request(command: &str, id: u64, params: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"command": command, "request_id": id, "params": params})).unwrap()
}

/// A raw connection that ran the handshake with `k`: the socket and its two frame MACs.
struct Keyed {
    s: TcpStream,
    tx: FrameMac,
    rx: FrameMac,
}

impl Keyed {
    fn connect(node: &NodeProc, k: &ClusterKey) -> Keyed {
        let mut s = node.raw();
        let hs = ClientHandshake::new(k.clone(), shardnet::protocol::auth::random_bytes::<NONCE_LEN>().unwrap());
        s.write_all(&frame_bytes(&request("AUTH", 1, hs.hello_params()))).unwrap();
        let challenge = read_frame(&mut s);
        assert_eq!(challenge["result"].get("node_proof"), None, "the node proves the key only after us: {challenge}");
        let proof = hs.answer(&challenge["result"]).expect("a well-formed challenge");
        s.write_all(&frame_bytes(&request("AUTH", 2, proof.params.clone()))).unwrap();
        let mut k = Keyed { s, tx: proof.tx.clone(), rx: proof.rx.clone() };
        let ok = k.read();
        assert_eq!(ok["result"]["authenticated"], true, "{ok}");
        proof.check_node(&ok["result"]).expect("the node proves the key after us");
        k
    }

    /// One sealed request frame's bytes (sending is the caller's).
    fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        let mut wire = Vec::new();
        self.tx.seal_frame(payload, &mut wire);
        wire
    }

    fn read(&mut self) -> Value {
        let body = read_raw(&mut self.s);
        serde_json::from_slice(self.rx.open(&body).expect("the node's frame verifies")).unwrap()
    }
}

/// Every command but STATUS, with plausible params.
fn costly_requests() -> Vec<(&'static str, Value)> {
    vec![
        ("LIST_FILES", json!({})),
        ("LOAD_SHARD", json!({"shard_id": 0})),
        ("DOWNLOAD", json!({"info_hash": "00".repeat(20), "peers": ["127.0.0.1:9"]})),
        ("FIND_PEERS", json!({"cluster": true})),
        (
            "EXECUTE_TASK",
            json!({"session_id": "s", "shard_id": 0, "pos": 0, "input": {"tokens": [1]},
            "next": [{"address": "127.0.0.1:9", "shard_id": 1}]}),
        ),
        ("END_SESSION", json!({"session_id": "s"})),
        ("MODEL_INFO", json!({})),
        ("GET_MANIFEST", json!({"hash": "00".repeat(32)})),
    ]
}

#[test]
fn without_the_key_only_status_is_served_and_forged_frames_are_refused() {
    let dir = TempDir::new("trust-key");
    let shards = dir.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let kf = key_file(dir.path(), "cluster.key", KEY, 0o600);
    let node = NodeProc::start(&shards, &["--cluster-key-file", kf.to_str().unwrap(), "--auth-timeout", "1"]);
    let right = key(KEY);

    // No key: STATUS (which says the node is keyed), nothing else; the connection stays usable.
    let mut open = Client::connect_with_key(&node.addr, WAIT, None).unwrap();
    let s = open.call("STATUS", json!({})).unwrap();
    assert_eq!(s["auth"]["cluster_key"], true, "{s}");
    assert_eq!(s["auth"]["open_to_anyone"], false, "{s}");
    // ... only its non-sensitive part: no paths, downloads, peers' addresses or counters.
    for shown in ["node_id", "cluster", "version", "limits", "uptime_ms"] {
        assert!(s.get(shown).is_some(), "{shown} missing: {s}");
    }
    for hidden in ["shards_dir", "downloads", "bootstrap", "address", "dht", "inference", "sessions", "connections"] {
        assert!(s.get(hidden).is_none(), "{hidden} shown without the key: {s}");
    }
    for (cmd, params) in costly_requests() {
        let r = open.request(cmd, params).unwrap();
        assert_eq!(r["code"], "AUTH_REQUIRED", "{cmd} without the key: {r}");
    }
    assert_eq!(open.call("STATUS", json!({})).unwrap()["auth"]["cluster_key"], true);
    // `shardctl status` without the key says what it cannot show instead of printing nulls.
    let o = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["--node", &node.addr, "status"])
        .env_remove(shardnet::protocol::auth::KEY_ENV)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("shown only to a client proving it") && !out.contains("null"), "{out}");

    // A wrong key: the node cannot prove ours, and a proof made with the wrong key is refused.
    let wrong = key("0000000000000000000000000000000000000000000000000000000000000000");
    let e = Client::connect_with_key(&node.addr, WAIT, Some(&wrong)).err().expect("a wrong key is refused");
    assert!(format!("{e:#}").contains("cluster keys differ"), "{e:#}");
    let mut s = node.raw();
    let cn = [5u8; NONCE_LEN];
    let hello = json!({"step": "hello", "client_nonce": shardnet::hash::to_hex(&cn)});
    s.write_all(&frame_bytes(&request("AUTH", 1, hello))).unwrap();
    let challenge = read_frame(&mut s);
    let nn = shardnet::hash::from_hex_vec(challenge["result"]["node_nonce"].as_str().unwrap()).unwrap();
    let forged = wrong.mac(&[b"client proof", b"shardnet-auth-v2", &cn, &nn]);
    let proof = json!({"step": "proof", "client_proof": shardnet::hash::to_hex(&forged)});
    s.write_all(&frame_bytes(&request("AUTH", 2, proof))).unwrap();
    let r = read_frame(&mut s);
    assert_eq!(r["code"], "AUTH_FAILED", "{r}");
    assert!(closed_by_peer(&mut s));

    // A keyed connection: a captured frame replayed on the same connection is refused.
    let mut a = Keyed::connect(&node, &right);
    let captured = a.seal(&request("LIST_FILES", 10, json!({})));
    a.s.write_all(&captured).unwrap();
    assert_eq!(a.read()["status"], "success");
    a.s.write_all(&captured).unwrap();
    assert_eq!(a.read()["code"], "AUTH_FAILED", "a replay on its own connection");
    assert!(closed_by_peer(&mut a.s));
    // ... and on another keyed connection (its own keys: the frame was sealed for the first).
    let mut b = Keyed::connect(&node, &right);
    b.s.write_all(&captured).unwrap();
    assert_eq!(b.read()["code"], "AUTH_FAILED", "a replay on another connection");
    assert!(closed_by_peer(&mut b.s));
    // ... and on a connection with no key at all.
    let mut plain = node.raw();
    plain.write_all(&captured).unwrap();
    assert_eq!(read_frame(&mut plain)["status"], "error");
    // One flipped byte of a fresh frame, in its JSON and in its MAC.
    for at in [8usize, 40] {
        let mut c = Keyed::connect(&node, &right);
        let mut edited = c.seal(&request("LOAD_SHARD", 11, json!({"shard_id": 0})));
        let i = if at < 20 { at } else { edited.len() - (at - 20) };
        edited[i] ^= 0x01;
        c.s.write_all(&edited).unwrap();
        assert_eq!(c.read()["code"], "AUTH_FAILED", "byte {i} flipped");
        assert!(closed_by_peer(&mut c.s));
    }

    // A proof of the wrong length.
    let mut s = node.raw();
    let hello = json!({"step": "hello", "client_nonce": "ab".repeat(NONCE_LEN)});
    s.write_all(&frame_bytes(&request("AUTH", 1, hello))).unwrap();
    assert_eq!(read_frame(&mut s)["status"], "success");
    let short = json!({"step": "proof", "client_proof": "cd".repeat(31)});
    s.write_all(&frame_bytes(&request("AUTH", 2, short))).unwrap();
    let r = read_frame(&mut s);
    assert_eq!(r["code"], "AUTH_FAILED", "{r}");
    assert!(r["error"].as_str().unwrap().contains("31 bytes"), "{r}");
    assert!(closed_by_peer(&mut s));

    // A handshake that never completes: closed after --auth-timeout.
    let mut s = node.raw();
    let hello = json!({"step": "hello", "client_nonce": "ab".repeat(NONCE_LEN)});
    s.write_all(&frame_bytes(&request("AUTH", 1, hello))).unwrap();
    assert_eq!(read_frame(&mut s)["status"], "success");
    let r = read_frame(&mut s);
    assert_eq!(r["code"], "AUTH_TIMEOUT", "{r}");
    assert!(closed_by_peer(&mut s));

    // Through all of it the node serves keyed clients.
    let mut good = Client::connect_with_key(&node.addr, WAIT, Some(&right)).unwrap();
    assert!(good.authenticated());
    assert_eq!(good.request("LIST_FILES", json!({})).unwrap()["status"], "success");
    // An authenticated caller gets the full STATUS.
    let full = good.call("STATUS", json!({})).unwrap();
    for shown in ["shards_dir", "downloads", "bootstrap", "inference", "sessions"] {
        assert!(full.get(shown).is_some(), "{shown} missing for a keyed caller: {full}");
    }
    let log = node.stderr();
    assert!(log.contains("every command but STATUS needs proof of it"), "{log}");
}

#[test]
fn a_node_without_a_key_says_it_is_open_to_anyone() {
    let dir = TempDir::new("trust-open");
    let node = NodeProc::start(dir.path(), &[]);
    let s = node.call("STATUS", json!({}));
    assert_eq!(s["result"]["auth"]["open_to_anyone"], true, "{s}");
    assert_eq!(node.call("LIST_FILES", json!({}))["status"], "success");
    // A keyed client does not talk to an open node.
    let e = Client::connect_with_key(&node.addr, WAIT, Some(&key(KEY))).err().unwrap();
    assert!(format!("{e:#}").contains("open to anyone"), "{e:#}");
    wait_for(WAIT, || node.stderr().contains("open to anyone").then_some(()));
}

/// Runs `bin` with `args`; returns (exit code, stderr).
fn run_bin(bin: &str, args: &[&str], env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let mut c = Command::new(bin);
    c.args(args).env_remove(shardnet::protocol::auth::KEY_ENV);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn key_files_that_are_empty_unreadable_or_open_to_others() {
    let dir = TempDir::new("trust-keyfile");
    let shards = dir.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let node_bin = env!("CARGO_BIN_EXE_shard_listener");
    let ctl_bin = env!("CARGO_BIN_EXE_shardctl");
    let empty = key_file(dir.path(), "empty.key", "\n", 0o600);
    let short = key_file(dir.path(), "short.key", "abc", 0o600);
    // 31 bytes: a passphrase-sized key (16 bytes were accepted before).
    let passphrase = key_file(dir.path(), "passphrase.key", "correct horse battery staple 12\n", 0o600);
    let missing = dir.path().join("missing.key");
    let unreadable = key_file(dir.path(), "locked.key", KEY, 0o000);
    for (path, needle) in [
        (&empty, "is empty"),
        (&short, "at least 32"),
        (&passphrase, "at least 32"),
        (&missing, "No such file"),
        (&dir.path().to_path_buf(), "not a regular file"),
    ] {
        let p = path.to_str().unwrap();
        let (code, err) = run_bin(node_bin, &["--port", "0", "--cluster-key-file", p], &[]);
        assert_eq!(code, Some(2), "{p}: {err}");
        assert!(err.contains(needle), "{p}: {err}");
        let (code, err) = run_bin(ctl_bin, &["--cluster-key-file", p, "status"], &[]);
        assert_eq!(code, Some(2), "shardctl {p}: {err}");
        assert!(err.contains(needle), "shardctl {p}: {err}");
    }
    // The environment variable names the file for both binaries.
    let (code, err) = run_bin(node_bin, &["--port", "0"], &[(shardnet::protocol::auth::KEY_ENV, &empty)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is empty"), "{err}");
    // Unreadable: only meaningful when not running as root (root reads mode 000 files).
    if std::fs::read(&unreadable).is_err() {
        let (code, err) = run_bin(node_bin, &["--port", "0", "--cluster-key-file", unreadable.to_str().unwrap()], &[]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("Permission denied"), "{err}");
    }
    // Readable by others: a warning, and the node runs with the key.
    let loose = key_file(dir.path(), "loose.key", KEY, 0o644);
    let node = NodeProc::start(&shards, &["--cluster-key-file", loose.to_str().unwrap()]);
    wait_for(WAIT, || node.stderr().contains("group and others may read it").then_some(()));
    let mut c = Client::connect_with_key(&node.addr, WAIT, Some(&key(KEY))).unwrap();
    assert_eq!(c.request("LIST_FILES", json!({})).unwrap()["status"], "success");
    let (_, err) =
        run_bin(ctl_bin, &["--cluster-key-file", loose.to_str().unwrap(), "--node", &node.addr, "list"], &[]);
    assert!(err.contains("group and others may read it"), "{err}");
}

/// One node serving a whole demo model as a single shard.
fn one_shard_node(dir: &Path, extra: &[&str]) -> NodeProc {
    let model = dir.join("demo.gguf");
    shardnet::gguf::demo::write(&shardnet::gguf::demo::DemoConfig { layers: 2, ..Default::default() }, &model).unwrap();
    let shards = dir.join("shards");
    shardnet::gguf::split::split(&model, 1, &shards, None).unwrap();
    let mut args = vec!["--threads", "1", "--ctx-size", "64"];
    args.extend_from_slice(extra);
    let node = NodeProc::start(&shards, &args);
    let r = node.call("LOAD_SHARD", json!({"shard_id": 0}));
    assert_eq!(r["status"], "success", "{r}");
    node
}

fn step(c: &mut Client, session: &str, pos: u32, tokens: &[u32], token: &Value) -> Value {
    c.request(
        "EXECUTE_TASK",
        json!({"session_id": session, "shard_id": 0, "pos": pos, "input": {"tokens": tokens},
            "output": "top_k", "k": 1, "session_token": token}),
    )
    .unwrap()
}

#[test]
fn another_clients_session_cannot_be_ended_or_driven() {
    let dir = TempDir::new("trust-sessions");
    let node = one_shard_node(dir.path(), &[]);
    let mut victim = node.client();
    let r = step(&mut victim, "victim", 0, &[1, 2, 3], &Value::Null);
    assert_eq!(r["status"], "success", "{r}");
    let token = r["result"]["session_token"].clone();
    let first = r["result"]["top_k"][0]["id"].as_u64().unwrap() as u32;
    // What the victim's next step gives when nobody interferes: the same steps on another session.
    let mut reference = node.client();
    let r = step(&mut reference, "reference", 0, &[1, 2, 3], &Value::Null);
    let ref_token = r["result"]["session_token"].clone();
    assert_ne!(ref_token, token, "every session gets its own token");
    let expected = step(&mut reference, "reference", 3, &[first], &ref_token)["result"]["top_k"].clone();

    let mut attacker = node.client();
    let wrong = json!("0123456789abcdef0123456789abcdef");
    for t in [Value::Null, wrong.clone(), ref_token.clone()] {
        // Ending it frees nothing and answers as for a session that does not exist.
        let r = attacker.request("END_SESSION", json!({"session_id": "victim", "session_token": t})).unwrap();
        let unknown = attacker.request("END_SESSION", json!({"session_id": "no-such", "session_token": t})).unwrap();
        assert_eq!(r["status"], "success", "{r}");
        assert_eq!(r["result"]["freed"], 0, "{r}");
        assert_eq!(r["result"]["freed"], unknown["result"]["freed"], "{r} vs {unknown}");
        assert_eq!(r["status"], unknown["status"], "{r} vs {unknown}");
        let r = step(&mut attacker, "victim", 0, &[7, 7, 7, 7], &t);
        assert_eq!(r["code"], "SESSION_FORBIDDEN", "{r}");
        let text = r["error"].as_str().unwrap();
        assert!(!text.contains("127.0.0.1") && !text.contains(token.as_str().unwrap()), "names the owner: {text}");
    }
    // The victim goes on as if nothing happened.
    let r = step(&mut victim, "victim", 3, &[first], &token);
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(r["result"]["top_k"], expected);
    let r = victim.request("END_SESSION", json!({"session_id": "victim", "session_token": token})).unwrap();
    assert_eq!(r["result"]["freed"], 1, "{r}");
}

#[test]
fn one_client_opening_500_sessions_evicts_only_its_own() {
    let dir = TempDir::new("trust-quota");
    let node = one_shard_node(dir.path(), &["--max-sessions", "16"]);
    let mut victim = node.client();
    let r = step(&mut victim, "kept", 0, &[1, 2], &Value::Null);
    let token = r["result"]["session_token"].clone();
    let mut flood = node.client();
    for i in 0..500 {
        let payload = serde_json::to_vec(&json!({"command": "EXECUTE_TASK", "request_id": i, "params":
            {"session_id": format!("flood-{i}"), "shard_id": 0, "pos": 0, "input": {"tokens": [3]},
             "output": "top_k", "k": 1}}))
        .unwrap();
        flood.send_payload(&payload).unwrap();
    }
    for _ in 0..500 {
        let r = flood.read_response().unwrap();
        assert_eq!(r["status"], "success", "{r}");
    }
    let s = node.call("STATUS", json!({}));
    let sessions = s["result"]["inference"]["sessions"].as_u64().unwrap();
    assert!(sessions <= 9, "8 of the flood's and the victim's: {s}");
    // The victim's session is still there.
    let r = step(&mut victim, "kept", 2, &[4], &token);
    assert_eq!(r["status"], "success", "{r}");
}

/// One node holding both shards of a 2-shard demo model, loaded.
fn two_shard_node(dir: &Path, extra: &[&str]) -> NodeProc {
    let model = dir.join("demo.gguf");
    shardnet::gguf::demo::write(&shardnet::gguf::demo::DemoConfig { layers: 2, ..Default::default() }, &model).unwrap();
    let shards = dir.join("shards");
    shardnet::gguf::split::split(&model, 2, &shards, None).unwrap();
    let mut args = vec!["--threads", "1", "--ctx-size", "64"];
    args.extend_from_slice(extra);
    let node = NodeProc::start(&shards, &args);
    for id in 0..2 {
        let r = node.call("LOAD_SHARD", json!({"shard_id": id}));
        assert_eq!(r["status"], "success", "{r}");
    }
    node
}

fn infer(node: &NodeProc) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["--timeout", "30", "infer", "--bootstrap", &node.addr, "--prompt", "hello", "-n", "4"])
        .output()
        .unwrap()
}

/// The red team's a13: `--max-sessions` sessions opened from as many connections (one each,
/// each its own client) fill the table. A new session spans two shards of this node, so its
/// second shard's creation needs room too: it must evict one of the idle fills, never the new
/// session's own first shard (which left every later step UNKNOWN_SESSION).
#[test]
fn a_table_full_of_one_session_clients_does_not_stop_new_inference() {
    let dir = TempDir::new("trust-fill");
    let node = two_shard_node(dir.path(), &["--max-sessions", "16"]);
    let o = infer(&node);
    assert!(o.status.success(), "before the fill: {}", String::from_utf8_lossy(&o.stderr));
    for i in 0..16 {
        let mut c = node.client();
        let r = step(&mut c, &format!("fill-{i}"), 0, &[1], &Value::Null);
        assert_eq!(r["status"], "success", "{r}");
    }
    for round in 0..3 {
        let o = infer(&node);
        assert!(o.status.success(), "after the fill, run {round}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let s = node.call("STATUS", json!({}));
    assert_eq!(s["result"]["sessions"], s["result"]["inference"]["sessions"], "{s}");
    assert!(s["result"]["sessions"].as_u64().unwrap() <= 16, "{s}");
}

/// A session decoding step after step survives 500 sessions opened meanwhile by other clients
/// over 50 connections (10 each, over the per-client quota of 8), and its tokens are those of
/// an undisturbed run.
#[test]
fn a_decoding_session_survives_500_sessions_of_many_other_clients() {
    let dir = TempDir::new("trust-decoding");
    let node = one_shard_node(dir.path(), &["--max-sessions", "16"]);
    // The undisturbed run: 40 greedy steps.
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let decoding = AtomicBool::new(false);
    let decode = |c: &mut Client, name: &str, steps: u32, stop: Option<&AtomicBool>| {
        let r = step(c, name, 0, &[1, 2], &Value::Null);
        assert_eq!(r["status"], "success", "{r}");
        let token = r["result"]["session_token"].clone();
        let mut ids = vec![r["result"]["top_k"][0]["id"].as_u64().unwrap() as u32];
        for i in 0..steps {
            let r = step(c, name, 2 + i, &[*ids.last().unwrap()], &token);
            assert_eq!(r["status"], "success", "step {i} of {name}: {r}");
            ids.push(r["result"]["top_k"][0]["id"].as_u64().unwrap() as u32);
            if i == 4 {
                decoding.store(true, Relaxed);
            }
            if stop.is_some_and(|s| s.load(Relaxed)) && i >= 40 {
                break;
            }
        }
        ids
    };
    let expected = decode(&mut node.client(), "reference", 40, None);
    let _ = node.call("END_SESSION", json!({"session_id": "reference"}));
    decoding.store(false, Relaxed);
    let flooded = AtomicBool::new(false);
    let got = std::thread::scope(|sc| {
        let victim = sc.spawn(|| decode(&mut node.client(), "victim", 60, Some(&flooded)));
        let floods: Vec<_> = (0..50)
            .map(|c| {
                let node = &node;
                let decoding = &decoding;
                sc.spawn(move || {
                    // The flood starts once the victim is decoding.
                    wait_for(WAIT, || decoding.load(Relaxed).then_some(()));
                    let mut conn = node.client();
                    for i in 0..10 {
                        let r = step(&mut conn, &format!("flood-{c}-{i}"), 0, &[3], &Value::Null);
                        assert_eq!(r["status"], "success", "{r}");
                    }
                })
            })
            .collect();
        for f in floods {
            f.join().unwrap();
        }
        flooded.store(true, Relaxed);
        victim.join().unwrap()
    });
    assert_eq!(got[..=40], expected[..], "the victim's tokens changed");
    node.assert_serving();
}
