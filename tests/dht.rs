//! The DHT through real node processes on loopback: the original note's
//! on-demand workflow, a 64-node network with a third killed, a poisoned
//! name key, and bad packets.

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A demo model split into `n` shards in `dir` (with manifest.json).
fn shards(dir: &Path, n: u32, seed: &str) -> PathBuf {
    let model = dir.join(format!("model-{seed}.gguf"));
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_shardctl")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    run(&["demo-model", "--out", model.to_str().unwrap(), "--layers", &n.to_string(), "--seed", seed]);
    let out = dir.join(format!("split-{seed}"));
    run(&["split", model.to_str().unwrap(), "--shards", &n.to_string(), "--out", out.to_str().unwrap()]);
    out
}

fn node(dir: &Path, bootstrap: Option<&NodeProc>, extra: &[&str]) -> NodeProc {
    let mut args = vec!["--enable-torrent", "--cluster", "test", "--hash-workers", "1"];
    let b;
    if let Some(boot) = bootstrap {
        b = boot.addr.clone();
        args.extend_from_slice(&["--bootstrap", &b]);
    }
    args.extend_from_slice(extra);
    let n = NodeProc::start(dir, &args);
    n.wait_metadata();
    n
}

fn find_peers(node: &NodeProc, params: Value) -> Vec<String> {
    let r = node.call("FIND_PEERS", params);
    assert_eq!(r["status"], "success", "{r}");
    r["result"]["peers"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

fn copy(from: &Path, to: &Path, name: &str) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join(name), to.join(name)).unwrap();
}

#[test]
fn the_notes_workflow_load_shard_finds_the_holders_through_the_dht() {
    let tmp = TempDir::new("dht-note");
    let split = shards(tmp.path(), 6, "1");
    let (a_dir, b_dir, c_dir) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    for i in 0..6 {
        copy(&split, &a_dir, &format!("shard-{i}.gguf"));
    }
    copy(&split, &b_dir, "shard-5.gguf");
    std::fs::create_dir_all(&c_dir).unwrap();
    let a = node(&a_dir, None, &["--upload-limit", "400000"]);
    let b = node(&b_dir, Some(&a), &["--upload-limit", "400000"]);
    let c = node(&c_dir, Some(&a), &[]);
    // Both holders are announced under shard 5's name.
    wait_for(Duration::from_secs(20), || (find_peers(&c, json!({"shard_id": 5})).len() == 2).then_some(()));
    let r = c.call("LOAD_SHARD", json!({"shard_id": 5}));
    assert_eq!(r["status"], "success", "{r}\nC's log:\n{}", c.stderr());
    assert_eq!(r["result"]["status"], "loaded");
    assert_eq!(r["result"]["source"], "torrent");
    let got = std::fs::read(c_dir.join("shard-5.gguf")).unwrap();
    assert!(got == std::fs::read(split.join("shard-5.gguf")).unwrap(), "byte-identical to the seed's");
    let up = |n: &NodeProc| n.call("STATUS", json!({}))["result"]["uploaded"].as_u64().unwrap();
    assert!(up(&a) > 0 && up(&b) > 0, "downloaded from both holders: a {} b {}", up(&a), up(&b));
}

#[test]
fn a_poisoned_name_key_does_not_make_a_node_load_the_wrong_file() {
    let tmp = TempDir::new("dht-poison");
    let real = shards(tmp.path(), 6, "1");
    let fake = shards(tmp.path(), 6, "2");
    let (a_dir, e_dir, m_dir, s_dir) =
        (tmp.path().join("a"), tmp.path().join("e"), tmp.path().join("m"), tmp.path().join("s"));
    for i in 0..6 {
        copy(&real, &a_dir, &format!("shard-{i}.gguf"));
    }
    copy(&fake, &e_dir, "shard-5.gguf"); // the liar: another model's shard 5 under the same name
    copy(&real, &m_dir, "manifest.json"); // a node with the manifest
    copy(&real, &s_dir, "shard-0.gguf"); // a node with another shard of the model
    let a = node(&a_dir, None, &[]);
    let e = node(&e_dir, Some(&a), &[]);
    let m = node(&m_dir, Some(&a), &[]);
    let s = node(&s_dir, Some(&a), &[]);
    wait_for(Duration::from_secs(20), || (find_peers(&m, json!({"shard_id": 5})).len() == 2).then_some(()));
    let real5 = std::fs::read(real.join("shard-5.gguf")).unwrap();
    // The manifest names the info hash: only the real file is fetched.
    let r = m.call("LOAD_SHARD", json!({"shard_id": 5}));
    assert_eq!(r["status"], "success", "{r}");
    assert!(std::fs::read(m_dir.join("shard-5.gguf")).unwrap() == real5);
    // The other shard names the model: the fake is never loaded.
    let r = s.call("LOAD_SHARD", json!({"shard_id": 5}));
    if r["status"] == "success" {
        assert!(std::fs::read(s_dir.join("shard-5.gguf")).unwrap() == real5, "loaded the wrong file");
    } else {
        assert_eq!(r["code"], "SHARD_INVALID", "{r}");
        assert!(r["error"].as_str().unwrap().contains("model"), "{r}");
    }
    drop(e);
}

#[test]
fn sixty_four_nodes_find_announced_keys_even_with_a_third_killed() {
    let tmp = TempDir::new("dht-64");
    let mut nodes: Vec<NodeProc> = Vec::new();
    let mut seeded = Vec::new();
    for i in 0..64 {
        let dir = tmp.path().join(format!("n{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        if i % 8 == 0 {
            write_shard(&dir.join(format!("file-{i}.gguf")), i, 64, (i, i + 1), 1000);
        }
        let boot = if i == 0 { None } else { Some(&nodes[i as usize / 2]) };
        let n = node(&dir, boot, &[]);
        if i % 8 == 0 {
            let h = n.call("LIST_FILES", json!({}))["result"]["files"][0]["info_hash"].as_str().unwrap().to_string();
            seeded.push((i as usize, h));
        }
        nodes.push(n);
    }
    let lookup_all = |nodes: &[NodeProc], alive: &dyn Fn(usize) -> bool| {
        for (k, (holder, h)) in seeded.iter().enumerate() {
            let asker = (holder + 13 + k * 7) % 64;
            if !alive(asker) {
                continue;
            }
            let want = nodes[*holder].addr.clone();
            // Found in 2-4 s on a quiet machine; the bound is for a loaded one (a CI run once
            // missed 30 s while builds shared its two cores).
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let r = nodes[asker].call("FIND_PEERS", json!({"key": h}));
                let peers: Vec<&str> =
                    r["result"]["peers"].as_array().unwrap().iter().filter_map(|p| p.as_str()).collect();
                if peers.contains(&want.as_str()) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "node {asker} cannot find {h} held by node {holder}: {r}; holder's DHT: {}",
                    nodes[*holder].call("STATUS", json!({}))["result"]["dht"]
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    lookup_all(&nodes, &|_| true);
    // Kill a third (never a holder), then every key is still found.
    let killed: Vec<usize> = (0..64).filter(|i| i % 8 != 0 && i % 3 == 1).take(21).collect();
    for i in &killed {
        nodes[*i].kill();
    }
    lookup_all(&nodes, &|i| !killed.contains(&i));
}

#[test]
fn bad_dht_packets_are_answered_or_dropped_and_the_node_serves_on() {
    let tmp = TempDir::new("dht-bad");
    let n = node(tmp.path(), None, &[]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 2048];
    // Sends `packet`; returns the node's answer to it (its own queries to
    // us, a DHT node it now knows, are skipped).
    let mut ask = |packet: &[u8]| -> Option<Vec<u8>> {
        sock.send_to(packet, &n.addr).unwrap();
        loop {
            let (len, _) = sock.recv_from(&mut buf).ok()?;
            let reply = buf[..len].to_vec();
            if !reply.ends_with(b"1:y1:qe") {
                return Some(reply);
            }
        }
    };
    // Malformed bencode, no transaction id: dropped.
    assert_eq!(ask(b"d1:ad2:id"), None);
    // Unknown method: error 204.
    let r = ask(b"d1:ad2:id20:abcdefghij0123456789e1:q4:frob1:t2:aa1:y1:qe").unwrap();
    assert!(String::from_utf8_lossy(&r).contains("i204e"), "{}", String::from_utf8_lossy(&r));
    // An id of the wrong length: error 203.
    let r = ask(b"d1:ad2:id3:abce1:q4:ping1:t2:bb1:y1:qe").unwrap();
    assert!(String::from_utf8_lossy(&r).contains("i203e"));
    // A wrong token on announce_peer: error 203, nothing stored.
    let r = ask(b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz1234564:porti6881e5:token4:nopee1:q13:announce_peer1:t2:cc1:y1:qe").unwrap();
    assert!(String::from_utf8_lossy(&r).contains("bad token"));
    // A reply to a query never sent: ignored.
    assert_eq!(ask(b"d1:rd2:id20:mnopqrstuvwxyz123456e1:t2:zz1:y1:re"), None);
    // An oversized packet: dropped.
    assert_eq!(ask(&vec![b'x'; 1600]), None);
    // A flood from one address is rate limited: far fewer answers than queries.
    let ping = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:pp1:y1:qe";
    for _ in 0..1000 {
        sock.send_to(ping, &n.addr).unwrap();
    }
    let mut answers = 0;
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    while let Ok((len, _)) = sock.recv_from(&mut buf) {
        if buf[..len].ends_with(b"1:y1:re") {
            answers += 1;
        }
    }
    assert!(answers <= 400, "{answers} answers to a flood of 1000");
    // Still a good DHT node and a good command server.
    // (once the flood's rate-limit window has passed: pinged until answered, 10 s at most)
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut answered = false;
    while !answered && std::time::Instant::now() < deadline {
        sock.send_to(ping, &n.addr).unwrap();
        answered = matches!(sock.recv_from(&mut buf), Ok((len, _)) if buf[..len].ends_with(b"1:y1:re"));
    }
    assert!(answered, "pings answered after the flood");
    n.assert_serving();
}

/// libtorrent with its default DHT rate limits (5 packets a second from one
/// address, else banned for 5 minutes), bootstrapped from a node, for 62 s of
/// the node's own announces and a FIND_PEERS every 2 s: libtorrent never bans
/// the node, still answers it at the end, and each finds what the other announced.
#[test]
#[ignore = "needs python3-libtorrent"]
fn libtorrents_dht_still_answers_a_node_after_a_minute_and_each_finds_the_others_keys() {
    require("python3-libtorrent");
    let tmp = TempDir::new("dht-lt");
    write_shard(&tmp.path().join("shard-0.gguf"), 0, 1, (0, 1), 10_000);
    let n = node(tmp.path(), None, &[]);
    let h = n.call("LIST_FILES", json!({}))["result"]["files"][0]["info_hash"].as_str().unwrap().to_string();
    let lt_key = shardnet::hash::to_hex(&shardnet::hash::sha1(b"a key libtorrent announces"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lt_dht.py");
    let mut lt = Command::new("timeout")
        .args(["90", "/usr/bin/python3"])
        .arg(script)
        .args([&n.addr, &h, "64", &lt_key])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(lt.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let lt_addr = format!("127.0.0.1:{}", line.trim().strip_prefix("LISTEN ").expect("LISTEN line"));
    // The node's normal traffic plus a lookup every 2 s for a minute.
    let start = std::time::Instant::now();
    let mut last = json!(null);
    let mut history = Vec::new();
    while start.elapsed() < Duration::from_secs(62) {
        last = n.call("FIND_PEERS", json!({"key": lt_key}));
        let r = &last["result"];
        history.push(format!(
            "{:.0}s: {} asked, {} answered",
            start.elapsed().as_secs_f64(),
            r["messages"],
            r["nodes_responded"]
        ));
        std::thread::sleep(Duration::from_secs(2));
    }
    // libtorrent answered the lookup made after a minute, and its key was found.
    assert_eq!(
        last["result"]["nodes_responded"],
        1,
        "libtorrent no longer answers the node: {last}; {history:?}\n{}",
        n.stderr()
    );
    let peers: Vec<&str> = last["result"]["peers"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(peers.contains(&lt_addr.as_str()), "the node's lookup got {peers:?}, not libtorrent's {lt_addr}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = lt.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut lt.stderr.take().unwrap(), &mut err);
    assert!(status.success(), "lt_dht.py: {status}; {err}");
    assert!(rest.lines().any(|l| l == "BANNED 0"), "libtorrent banned the node: {rest}{err}");
    let found = rest.lines().find_map(|l| l.strip_prefix("FOUND")).unwrap_or_default();
    assert!(found.split_whitespace().any(|p| p == n.addr), "libtorrent found {found:?} in its last 20 s; {err}");
}

#[test]
fn a_restarted_node_rejoins_from_its_saved_table_without_bootstrap() {
    let tmp = TempDir::new("dht-rejoin");
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    write_shard(&dirs[2].join("shard-0.gguf"), 0, 1, (0, 1), 1000);
    let a = node(&dirs[0], None, &[]);
    let mut b = node(&dirs[1], Some(&a), &[]);
    let c = node(&dirs[2], Some(&a), &[]);
    wait_for(Duration::from_secs(20), || dirs[1].join(".dht-nodes").exists().then_some(()));
    b.kill();
    // Restarted with no --bootstrap: the saved table is its way in.
    let b = node(&dirs[1], None, &[]);
    // A lookup paced by the per-address DHT budget (3 packets a second): ~5 s here when the
    // machine is idle, several times that on a loaded CI box.
    wait_for(Duration::from_secs(60), || {
        (find_peers(&b, json!({"shard_id": 0})) == vec![c.addr.clone()]).then_some(())
    });
    drop(a);
}

#[test]
fn a_coordinators_find_peers_does_not_wait_behind_the_seeds_announces() {
    // A seed of four shards announces ten keys (a get_peers and an announce_peer per key and
    // node); three empty nodes join. The cluster's FIND_PEERS on the seed, as a coordinator
    // started then asks it, must not queue behind those announces for the per-node DHT budget
    // (it did: 6.7 s, every query held). Asked every half second, slower than the budget
    // refills, so the asking does not spend it either.
    let dir = TempDir::new("dht-foreground");
    let split = shards(dir.path(), 4, "7");
    let seed = node(&split, None, &[]);
    let mut others = Vec::new();
    for i in 0..3 {
        let d = dir.path().join(format!("empty-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        others.push(node(&d, Some(&seed), &[]));
    }
    let mut last = Value::Null;
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(500));
        last = seed.call("FIND_PEERS", json!({"cluster": true}))["result"].clone();
        let peers = last["peers"].as_array().cloned().unwrap_or_default();
        if others.iter().all(|n| peers.contains(&json!(n.addr))) {
            break;
        }
    }
    let peers = last["peers"].as_array().cloned().unwrap_or_default();
    assert!(others.iter().all(|n| peers.contains(&json!(n.addr))), "the cluster was not found: {last}");
    // The seed is still announcing (ten keys, twenty packets a node, 3 a second): asked now,
    // the lookup's queries go at once.
    let r = seed.call("FIND_PEERS", json!({"cluster": true}))["result"].clone();
    assert_eq!(r["budget_waits"], 0, "the lookup waited for the budget: {r}");
    assert_eq!(r["nodes_responded"], 3, "{r}");
}
