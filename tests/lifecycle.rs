//! A node's start and stop as a user meets them: a missing shards dir, an unreachable bootstrap,
//! a shard nobody holds, SIGINT/SIGTERM (state saved, exit 0), and `make demo` beside busy ports.

mod common;

use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use shardnet::torrent::Metainfo;

const MB: usize = 1024 * 1024;

/// Sends `signal` (a `kill` name: TERM, INT) to the child.
fn signal(child: &Child, signal: &str) {
    let ok = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
    assert!(ok.success(), "kill -{signal} failed");
}

/// Waits (bounded) for the child to exit; past `limit` it is sent SIGTERM (so a script's trap
/// stops what it started), then killed, and the test fails.
fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(child, "TERM");
    std::thread::sleep(Duration::from_secs(2));
    let _ = child.kill();
    panic!("still running after {limit:?}");
}

/// Runs `cmd` to its end, output captured; one still running after 10 s is stopped and fails.
fn run_bounded(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_exit(&mut child, Duration::from_secs(10));
    child.wait_with_output().unwrap()
}

#[test]
fn a_missing_shards_dir_is_a_clear_error_and_is_not_created() {
    let tmp = TempDir::new("nodir");
    let missing = tmp.path().join("no/such/dir");
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_shard_listener"))
            .args(["--listen", "127.0.0.1:0", "--shards-dir"])
            .arg(&missing),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!(
            "shard_listener: --shards-dir {0}: no such directory (create it first: mkdir -p {0})",
            missing.display()
        )
    );
    assert!(out.stdout.is_empty(), "it said it listens: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!missing.exists() && !tmp.path().join("no").exists(), "the node created the directory");
    // A file where the directory should be.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_shard_listener")).args(["--listen", "127.0.0.1:0", "--shards-dir"]).arg(&file),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}

/// A loopback port free for both TCP and UDP right now.
fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[test]
fn an_unreachable_bootstrap_is_a_warning_and_retried_until_it_answers() {
    let tmp = TempDir::new("boot");
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let port = free_port();
    let boot = format!("127.0.0.1:{port}");
    let a = NodeProc::start(&da, &["--bootstrap", &boot]);
    // The first join goes unanswered: one warning naming the bootstrap, the node serves on.
    wait_for(WAIT, || a.stderr().contains(&format!("DHT: no answer from bootstrap {boot} (attempt 1)")).then_some(()));
    let s = a.call("STATUS", json!({}));
    assert_eq!(s["result"]["dht"]["nodes"], 0, "{s}");
    assert!(s["result"]["dht"]["unanswered_joins"].as_u64().unwrap() >= 1, "{s}");
    // The bootstrap comes up: the next join (5 s after the first) finds it.
    let b = NodeProc::start(&db, &["--listen", &boot]);
    assert_eq!(b.addr, boot);
    let s = wait_for(Duration::from_secs(30), || {
        let s = a.call("STATUS", json!({}));
        (s["result"]["dht"]["nodes"].as_u64().unwrap_or(0) >= 1).then_some(s)
    });
    assert_eq!(s["result"]["dht"]["unanswered_joins"], 0, "{s}");
}

/// A lone node asked for a shard nobody holds answers as soon as its (empty) lookup is over,
/// not after a fixed wait (it was 10 s).
#[test]
fn load_shard_for_a_shard_nobody_holds_answers_once_the_lookup_is_over() {
    let dir = TempDir::new("noholder");
    let node = NodeProc::start(dir.path(), &["--enable-torrent"]);
    node.wait_metadata();
    let t = Instant::now();
    let r = node.call("LOAD_SHARD", json!({"shard_id": 7}));
    let took = t.elapsed();
    assert_eq!(r["code"], "TORRENT_UNAVAILABLE", "{r}");
    assert!(r["error"].as_str().unwrap().contains("shard-7.gguf"), "{r}");
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
}

#[test]
fn sigterm_during_a_download_saves_resume_data_that_a_restart_uses_without_rehashing() {
    // 16 MB at 4 MB/s: 16 pieces verified a second, so resume data saved only by the periodic
    // (1 s) save would lag behind what was verified when the signal came.
    let sd = TempDir::new("seed");
    let src = sd.path().join("shard-0.gguf");
    write_shard(&src, 0, 1, (0, 1), 16 * MB);
    let seed = NodeProc::start(sd.path(), &["--enable-torrent", "--upload-limit", "4000000"]);
    seed.wait_metadata();
    let m = Metainfo::parse(&std::fs::read(sd.path().join("shard-0.gguf.torrent")).unwrap()).unwrap();
    let ld = TempDir::new("leech");
    let mut leech = NodeProc::start(ld.path(), &["--enable-torrent"]);
    let load = |node: &NodeProc, peers: &[&str], wait: bool| {
        node.call("LOAD_SHARD", json!({"shard_id": 0, "info_hash": m.info_hash.to_hex(), "peers": peers, "wait": wait}))
    };
    load(&leech, &[&seed.addr], false);
    let verified = wait_for(Duration::from_secs(60), || {
        let d = download_status(&leech, &m);
        let v = d["pieces_verified"].as_u64().unwrap_or(0);
        (v * 5 > d["pieces"].as_u64().unwrap_or(u64::MAX) * 2).then_some(v)
    });
    signal(&leech.child, "TERM");
    let status = wait_exit(&mut leech.child, WAIT);
    assert!(status.success(), "exit {status:?}; stderr:\n{}", leech.stderr());
    let stderr = leech.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("stopping on a signal")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("resume data of 1 downloads saved"), "{stderr}");
    assert!(ld.path().join(format!("shard-0.gguf.{}.part.resume", m.info_hash.to_hex())).exists());

    // Restarted with no peer: the pieces verified before the signal count at once, unhashed.
    let leech = NodeProc::start(ld.path(), &["--enable-torrent"]);
    leech.wait_metadata();
    let dead = format!("127.0.0.1:{}", free_port());
    let torrent_hex = shardnet::hash::to_hex(&m.to_torrent_bytes());
    let r =
        leech.call("DOWNLOAD", json!({"info_hash": m.info_hash.to_hex(), "torrent_hex": torrent_hex, "peers": [dead]}));
    assert_eq!(r["status"], "success", "{r}");
    let d = download_status(&leech, &m);
    assert!(d["pieces_verified"].as_u64().unwrap() >= verified, "{verified} verified before the signal: {d}");
    assert_eq!(d["pieces_rechecked"], 0, "{d}");
    // With the seed, the rest comes, and only the rest.
    let r = load(&leech, &[&seed.addr], true);
    assert_eq!(r["status"], "success", "{r}");
    let d = download_status(&leech, &m);
    assert_eq!(d["pieces_rechecked"], 0, "{d}");
    let left = (d["pieces"].as_u64().unwrap() - verified) * m.info.piece_length;
    assert!(d["downloaded"].as_u64().unwrap() <= left, "downloaded again what was verified: {d}");
    assert!(std::fs::read(&src).unwrap() == std::fs::read(ld.path().join("shard-0.gguf")).unwrap());
}

#[test]
fn sigint_stops_a_node_in_order_and_saves_its_dht_table() {
    let tmp = TempDir::new("sigint");
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let a = NodeProc::start(&da, &[]);
    let mut b = NodeProc::start(&db, &["--bootstrap", &a.addr]);
    wait_for(WAIT, || {
        let s = b.call("STATUS", json!({}));
        (s["result"]["dht"]["nodes"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    let table = db.join(".dht-nodes");
    let _ = std::fs::remove_file(&table); // only the stop may write it now (the periodic save is 3 s in)
    signal(&b.child, "INT");
    let status = wait_exit(&mut b.child, WAIT);
    assert!(status.success(), "exit {status:?}; stderr:\n{}", b.stderr());
    assert!(b.stderr().contains("stopping on a signal: resume data of 0 downloads saved, DHT table of 1 nodes saved"));
    let saved = std::fs::read(&table).expect("the DHT table was saved");
    assert_eq!(saved.len(), 26, "one compact node (20-byte id, 4-byte IP, 2-byte port)");
    assert_eq!(u16::from_be_bytes([saved[24], saved[25]]), a.addr.rsplit(':').next().unwrap().parse::<u16>().unwrap());
}

/// `make demo`'s script with its default ports (51920-51923) taken: it picks free ones and runs
/// (on the demo model's shards, written here).
#[test]
fn make_demo_runs_while_its_default_ports_are_taken() {
    let tmp = TempDir::new("demo");
    let model = tmp.path().join("demo.gguf");
    shardnet::gguf::demo::write(&shardnet::gguf::demo::DemoConfig { layers: 4, ..Default::default() }, &model).unwrap();
    shardnet::gguf::split::split(&model, 4, &tmp.path().join("shards"), None).unwrap();
    // Hold the default ports (those another process does not hold already).
    let mut held = Vec::new();
    for port in 51920..51924u16 {
        held.push((TcpListener::bind(("127.0.0.1", port)).ok(), UdpSocket::bind(("127.0.0.1", port)).ok()));
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_shard_listener")).parent().unwrap();
    let mut child = Command::new("sh")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo.sh"))
        .env("BIN", bin)
        .env("MODELS", tmp.path())
        .env("N", "4")
        .env_remove("DEMO_PORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(120));
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("in use; node 0 on 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("4 nodes on"), "{stdout}");
    assert!(stderr.contains("generated 4;"), "no generation summary:\n{stdout}\n{stderr}");
    drop(held);
}
