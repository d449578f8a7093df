//! Bad input of every kind gets a clear error, loses nothing, and the node
//! keeps serving other clients afterwards.

mod common;

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn node() -> (TempDir, NodeProc) {
    let dir = TempDir::new("bad");
    write_shard(&dir.path().join("shard-0.gguf"), 0, 2, (0, 1), 0);
    let node = NodeProc::start(dir.path(), &["--total-shards", "2", "--io-timeout", "2", "--frame-timeout", "2"]);
    (dir, node)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends `payload` as a frame and returns the response, on an open connection.
fn ask(s: &mut TcpStream, payload: &[u8]) -> Value {
    send_frame(s, payload);
    read_frame(s)
}

fn status_ok(s: &mut TcpStream) {
    let r = ask(s, br#"{"command":"STATUS","request_id":"after"}"#);
    assert_eq!(r["status"], "success", "connection unusable after a bad request: {r}");
}

#[test]
fn declared_length_over_the_limit_is_refused_without_allocating_it() {
    let (_d, node) = node();
    let before = rss_kib(node.child.id());
    for declared in [32 * 1024 * 1024 + 1u32, 0x12ff_ffff] {
        let mut s = node.raw();
        s.write_all(&declared.to_be_bytes()).unwrap();
        let r = read_frame(&mut s);
        assert_eq!(r["status"], "error");
        assert_eq!(r["code"], "FRAME_TOO_LARGE");
        assert!(r["error"].as_str().unwrap().contains(&declared.to_string()), "{r}");
        assert!(closed_by_peer(&mut s), "a connection that cannot be resynchronised is closed");
    }
    let after = rss_kib(node.child.id());
    assert!(after < before + 8 * 1024, "RSS grew from {before} KiB to {after} KiB");
    node.assert_serving();
}

#[test]
fn a_frame_of_length_zero_is_an_error_and_the_connection_stays_open() {
    let (_d, node) = node();
    let mut s = node.raw();
    let r = ask(&mut s, b"");
    assert_eq!(r["code"], "INVALID_JSON", "{r}");
    status_ok(&mut s);
}

#[test]
fn malformed_requests_get_error_codes_and_the_connection_stays_open() {
    let (_d, node) = node();
    let mut s = node.raw();
    let cases: &[(&[u8], &str)] = &[
        (&[0xc3, 0x28, b'{', b'}'], "INVALID_UTF8"),
        (b"{\"command\":", "INVALID_JSON"),
        (b"[\"STATUS\"]", "NOT_AN_OBJECT"),
        (b"\"STATUS\"", "NOT_AN_OBJECT"),
        (b"null", "NOT_AN_OBJECT"),
        (br#"{"request_id":"a"}"#, "MISSING_FIELD"),
        (br#"{"command":"STATUS"}"#, "MISSING_FIELD"),
        (br#"{"command":["STATUS"],"request_id":"a"}"#, "WRONG_TYPE"),
        (br#"{"command":"STATUS","request_id":{"x":1}}"#, "WRONG_TYPE"),
        (br#"{"command":"STATUS","request_id":"a","params":"all"}"#, "WRONG_TYPE"),
        (br#"{"command":"FORMAT_DISK","request_id":"a"}"#, "UNKNOWN_COMMAND"),
        (br#"{"command":"LOAD_SHARD","request_id":"a"}"#, "MISSING_FIELD"),
        (br#"{"command":"LOAD_SHARD","request_id":"a","params":{"shard_id":"0"}}"#, "WRONG_TYPE"),
        (br#"{"command":"LOAD_SHARD","request_id":"a","params":{"shard_id":-1}}"#, "OUT_OF_RANGE"),
        (br#"{"command":"LOAD_SHARD","request_id":"a","params":{"shard_id":-9223372036854775808}}"#, "OUT_OF_RANGE"),
        (br#"{"command":"LOAD_SHARD","request_id":"a","params":{"shard_id":18446744073709551615}}"#, "OUT_OF_RANGE"),
        (br#"{"command":"LOAD_SHARD","request_id":"a","params":{"shard_id":1e300}}"#, "OUT_OF_RANGE"),
        (br#"{"command":"LOAD_SHARD","request_id":"a","params":{"shard_id":2}}"#, "OUT_OF_RANGE"),
        (
            br#"{"command":"LOAD_SHARD","request_id":"a","params":{"shard_id":0,"filename":"../shard-0.gguf"}}"#,
            "BAD_PATH",
        ),
        (br#"{"command":"LOAD_SHARD","request_id":"a","params":{"shard_id":0,"filename":"/etc/passwd"}}"#, "BAD_PATH"),
        (br#"{"command":"LOAD_SHARD","request_id":"a","params":{"shard_id":0,"filename":".."}}"#, "BAD_PATH"),
    ];
    for (payload, code) in cases {
        let r = ask(&mut s, payload);
        assert_eq!(r["status"], "error", "{}", String::from_utf8_lossy(payload));
        assert_eq!(r["code"], *code, "{}: {r}", String::from_utf8_lossy(payload));
        assert!(!r["error"].as_str().unwrap().is_empty());
    }
    // What could be read of the request is echoed.
    let r = ask(&mut s, br#"{"command":"LOAD_SHARD","request_id":"id-7","params":{"shard_id":-1}}"#);
    assert_eq!((r["request_id"].clone(), r["command"].clone()), (json!("id-7"), json!("LOAD_SHARD")));
    status_ok(&mut s);
    node.assert_serving();
}

#[test]
fn deeply_nested_json_is_refused_not_a_stack_overflow() {
    let (_d, node) = node();
    let mut s = node.raw();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = ask(&mut s, deep.as_bytes());
    assert_eq!(r["code"], "INVALID_JSON");
    status_ok(&mut s);
}

#[test]
fn a_truncated_frame_then_close_loses_nothing() {
    let (_d, node) = node();
    for cut in [1usize, 3, 4, 10] {
        let mut s = node.raw();
        let payload = br#"{"command":"STATUS","request_id":"t"}"#;
        let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(payload);
        s.write_all(&wire[..cut]).unwrap();
        drop(s);
    }
    node.assert_serving();
}

#[test]
fn a_client_stalled_mid_frame_does_not_block_others_and_is_closed_after_the_timeout() {
    let (_d, node) = node();
    let mut stalled = node.raw();
    stalled.write_all(&[0, 0, 0, 100, b'{']).unwrap();
    node.assert_serving();
    // After the frame timeout: FRAME_TIMEOUT, then the close itself, within closed_by_peer's 10 s.
    let r = read_frame(&mut stalled);
    assert_eq!(r["code"], "FRAME_TIMEOUT", "{r}");
    assert!(closed_by_peer(&mut stalled), "stalled connection still open");
    node.assert_serving();
}

#[test]
fn five_hundred_idle_connections_do_not_stop_the_node() {
    let (_d, node) = node();
    let idle: Vec<TcpStream> = (0..500).map(|_| node.raw()).collect();
    // A fresh client is answered (within the client's bounded wait) while 500 others idle.
    node.assert_serving();
    // Silent connections beyond --max-unclassified (256) are shed, oldest first.
    let s = wait_for(WAIT, || {
        let s = node.call("STATUS", json!({}));
        (s["result"]["connection_counts"]["shed_idle"].as_u64().unwrap() >= 244).then_some(s)
    });
    assert!(s["result"]["connection_counts"]["unclassified"].as_u64().unwrap() <= 256, "{s}");
    drop(idle);
    node.assert_serving();
}

#[test]
fn a_client_that_never_reads_cannot_grow_the_nodes_memory() {
    let (_d, node) = node();
    let before = rss_kib(node.child.id());
    let mut s = node.raw();
    s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    // LIST_FILES answers are larger than the requests: without backpressure
    // the node would buffer every answer.
    let mut burst = Vec::new();
    for i in 0..1000 {
        let req = serde_json::to_vec(&json!({"command":"LIST_FILES","request_id":i})).unwrap();
        burst.extend_from_slice(&(req.len() as u32).to_be_bytes());
        burst.extend_from_slice(&req);
    }
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    let blocked = loop {
        match s.write(&burst) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break true,
            Err(e) => panic!("write failed: {e}"),
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    assert!(blocked, "the node kept reading {sent} bytes of requests whose answers were never read");
    let after = rss_kib(node.child.id());
    assert!(after < before + 16 * 1024, "RSS grew from {before} KiB to {after} KiB after {sent} bytes");
    node.assert_serving();
    // The stalled reader is dropped after --io-timeout (2 s): STATUS then counts one connection
    // (its own); the socket, read only now, ends in EOF or a reset.
    let conns = || node.call("STATUS", json!({}))["result"]["connections"].as_u64().unwrap();
    wait_for(Duration::from_secs(15), || (conns() == 1).then_some(()));
    assert!(closed_within(&mut s, Duration::from_secs(15)), "connection not closed by the node");
    node.assert_serving();
}

#[test]
fn a_peer_wire_handshake_is_told_apart_and_does_not_disturb_commands() {
    let (_d, node) = node();
    let mut s = node.raw();
    let mut hs = vec![19u8];
    hs.extend_from_slice(b"BitTorrent protocol");
    hs.extend_from_slice(&[0u8; 48]);
    s.write_all(&hs).unwrap();
    assert!(closed_by_peer(&mut s));
    node.assert_serving();
}

#[test]
fn garbage_bytes_then_more_garbage_never_crash_the_node() {
    let (_d, node) = node();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..50 {
        let mut s = node.raw();
        let mut junk = Vec::new();
        for _ in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            junk.push((seed >> 24) as u8);
        }
        junk[0] = 0; // a small declared length, so the junk is parsed as frames
        let _ = s.write_all(&junk);
    }
    node.assert_serving();
}
