//! IPv6 on ::1 through real node processes: BEP 32's IPv6 DHT (`nodes6`,
//! `want`), `--bootstrap /ip6/::1/tcp/PORT`, the peer wire and the command
//! protocol over IPv6, and shardctl talking to a node at an IPv6 address.

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

fn copy(from: &Path, to: &Path, name: &str) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join(name), to.join(name)).unwrap();
}

/// `addr` ("[::1]:PORT") as a multiaddr.
fn multiaddr(addr: &str) -> String {
    let port = addr.rsplit_once(':').unwrap().1;
    format!("/ip6/::1/tcp/{port}")
}

/// A torrent-enabled node on ::1, bootstrapped from `boot` by its /ip6 multiaddr.
fn node6(dir: &Path, boot: Option<&NodeProc>) -> NodeProc {
    std::fs::create_dir_all(dir).unwrap();
    let mut args = vec!["--enable-torrent", "--cluster", "v6", "--hash-workers", "1"];
    let b;
    if let Some(boot) = boot {
        b = multiaddr(&boot.addr);
        args.extend_from_slice(&["--bootstrap", &b]);
    }
    let n = NodeProc::start6(dir, &args);
    assert!(n.addr.starts_with("[::1]:"), "{}", n.addr);
    n.wait_metadata();
    n
}

fn find_peers(node: &NodeProc, shard_id: u32) -> Vec<String> {
    let r = node.call("FIND_PEERS", json!({"shard_id": shard_id}));
    assert_eq!(r["status"], "success", "{r}");
    r["result"]["peers"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

fn dht(node: &NodeProc) -> Value {
    node.call("STATUS", json!({}))["result"]["dht"].clone()
}

#[test]
fn two_nodes_on_ipv6_find_each_others_shards_and_download_one_byte_identical() {
    let tmp = TempDir::new("ipv6-pair");
    let split = shards(tmp.path(), 3, "6");
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    copy(&split, &a_dir, "shard-0.gguf");
    copy(&split, &a_dir, "shard-1.gguf");
    copy(&split, &b_dir, "shard-2.gguf");
    let a = node6(&a_dir, None);
    let b = node6(&b_dir, Some(&a));
    // Each finds what the other announced, through the IPv6 DHT alone (neither has IPv4).
    let (a_port, b_port) = (a.addr.rsplit_once(':').unwrap().1, b.addr.rsplit_once(':').unwrap().1);
    wait_for(WAIT, || (find_peers(&b, 0) == vec![format!("[::1]:{a_port}")]).then_some(()));
    wait_for(WAIT, || (find_peers(&a, 2) == vec![format!("[::1]:{b_port}")]).then_some(()));
    let (da, db) = (dht(&a), dht(&b));
    assert!(da["nodes6"].as_u64().unwrap() >= 1 && db["nodes6"].as_u64().unwrap() >= 1, "{da} {db}");
    assert_eq!(da["nodes4"], Value::Null, "a node on ::1 runs no IPv4 DHT: {da}");
    // B downloads shard 1 from A over ::1: the peer wire on IPv6.
    let r = b.call("LOAD_SHARD", json!({"shard_id": 1}));
    assert_eq!(r["status"], "success", "{r}\nB's log:\n{}", b.stderr());
    assert_eq!(r["result"]["source"], "torrent", "{r}");
    let got = std::fs::read(b_dir.join("shard-1.gguf")).unwrap();
    assert!(got == std::fs::read(split.join("shard-1.gguf")).unwrap(), "byte-identical to the seed's");
    let up = a.call("STATUS", json!({}))["result"]["uploaded"].as_u64().unwrap();
    assert!(up >= got.len() as u64, "A uploaded {up} of {} bytes", got.len());
    // shardctl reaches a node at an IPv6 address, in both forms.
    for node in [a.addr.clone(), multiaddr(&b.addr)] {
        let o = Command::new(env!("CARGO_BIN_EXE_shardctl")).args(["--node", &node, "status"]).output().unwrap();
        assert!(o.status.success(), "shardctl --node {node}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

/// A find_node for `target` with `want` (raw bencode).
fn find_node(want: &[u8]) -> Vec<u8> {
    [
        &b"d1:ad2:id20:abcdefghij01234567896:target20:mnopqrstuvwxyz1234564:want"[..],
        want,
        b"e1:q9:find_node1:t2:aa1:y1:qe",
    ]
    .concat()
}

#[test]
fn a_node_answers_want_n6_with_nodes6() {
    let tmp = TempDir::new("ipv6-want");
    let a = node6(&tmp.path().join("a"), None);
    let b = node6(&tmp.path().join("b"), Some(&a));
    wait_for(WAIT, || (dht(&a)["nodes6"].as_u64().unwrap_or(0) >= 1).then_some(()));
    let sock = UdpSocket::bind("[::1]:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 2048];
    let mut ask = |packet: &[u8]| -> Vec<u8> {
        for _ in 0..20 {
            sock.send_to(packet, &a.addr).unwrap();
            while let Ok((len, _)) = sock.recv_from(&mut buf) {
                if buf[..len].ends_with(b"1:y1:re") {
                    return buf[..len].to_vec();
                }
            }
        }
        panic!("no answer from {}", a.addr);
    };
    let has = |r: &[u8], key: &[u8]| r.windows(key.len()).any(|w| w == key);
    // nodes6: B, 38 bytes; no IPv4 `nodes`.
    let r = ask(&find_node(b"l2:n6e"));
    assert!(has(&r, b"6:nodes638:"), "{}", String::from_utf8_lossy(&r));
    assert!(!has(&r, b"5:nodes"), "{}", String::from_utf8_lossy(&r));
    let b_port: u16 = b.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    assert!(has(&r, &[&std::net::Ipv6Addr::LOCALHOST.octets()[..], &b_port.to_be_bytes()].concat()), "B's address");
    // A want that is not a list counts as absent: answered in the query's family, IPv6.
    let r = ask(&find_node(b"2:n6"));
    assert!(has(&r, b"6:nodes638:"), "{}", String::from_utf8_lossy(&r));
    // n4 from a node with no IPv4 DHT: nothing to give, still an answer.
    let r = ask(&find_node(b"l2:n4e"));
    assert!(!has(&r, b"nodes"), "{}", String::from_utf8_lossy(&r));
    a.assert_serving();
}

/// libtorrent's IPv6 DHT on ::1, bootstrapped from a node on ::1: the node
/// finds the key libtorrent announces, and libtorrent finds the node under the
/// node's shard info hash (both through BEP 32's IPv6 DHT; neither side has IPv4).
#[test]
#[ignore = "needs python3-libtorrent"]
fn libtorrents_ipv6_dht_and_a_node_find_what_each_other_announced() {
    require("python3-libtorrent");
    let tmp = TempDir::new("ipv6-lt");
    let dir = tmp.path().join("n");
    std::fs::create_dir_all(&dir).unwrap();
    write_shard(&dir.join("shard-0.gguf"), 0, 1, (0, 1), 10_000);
    let n = node6(&dir, None);
    let h = n.call("LIST_FILES", json!({}))["result"]["files"][0]["info_hash"].as_str().unwrap().to_string();
    let lt_key = shardnet::hash::to_hex(&shardnet::hash::sha1(b"a key libtorrent announces over IPv6"));
    let port = n.addr.rsplit_once(':').unwrap().1;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lt_dht.py");
    let mut lt = Command::new("timeout")
        .args(["60", "/usr/bin/python3"])
        .arg(script)
        .args([&format!("::1:{port}"), &h, "20", &lt_key, "3", "20"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(lt.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let lt_addr = format!("[::1]:{}", line.trim().strip_prefix("LISTEN ").expect("LISTEN line"));
    wait_for(Duration::from_secs(20), || {
        let r = n.call("FIND_PEERS", json!({"key": lt_key}));
        r["result"]["peers"].as_array().unwrap().iter().any(|p| p == lt_addr.as_str()).then_some(())
    });
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = lt.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut lt.stderr.take().unwrap(), &mut err);
    assert!(status.success(), "lt_dht.py: {status}; {err}");
    let found = rest.lines().find_map(|l| l.strip_prefix("FOUND")).unwrap_or_default();
    assert!(found.split_whitespace().any(|p| p == n.addr), "libtorrent found {found:?}, not {}; {err}", n.addr);
    assert!(!err.contains("BANNING"), "libtorrent banned the node: {err}");
}

/// The per-IP caps count IPv6 peers too (by /64; ::1 is one): connections reaching the node
/// over ::1 are held to `--max-command-connections-per-ip`.
#[test]
fn the_per_ip_command_cap_holds_for_connections_over_ipv6() {
    let tmp = TempDir::new("ipv6-cap");
    std::fs::create_dir_all(tmp.path().join("n")).unwrap();
    let n = NodeProc::start6(&tmp.path().join("n"), &["--max-command-connections-per-ip", "2"]);
    let status = serde_json::to_vec(&json!({"command": "STATUS", "request_id": 1})).unwrap();
    // Two busy connections (each holds part of a frame, so neither is idle to shed).
    let mut two: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = n.raw();
            send_frame(&mut s, &status);
            assert_eq!(read_frame(&mut s)["status"], "success");
            std::io::Write::write_all(&mut s, &[0, 0, 0, 100, b'{']).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300)); // the node has read them
    let mut third = n.raw();
    send_frame(&mut third, &status);
    let r = read_frame(&mut third);
    assert_eq!(r["code"], "TOO_MANY_CONNECTIONS", "{r}");
    // Once the two close, ::1 is served again, and the refusal was counted.
    two.clear();
    let counts = wait_for(WAIT, || {
        let r = shardnet::client::Client::connect(&n.addr, WAIT).ok()?.request("STATUS", json!({})).ok()?;
        Some(r["result"]["connection_counts"].clone())
    });
    assert!(counts["refused"].as_u64().unwrap() >= 1, "{counts}");
}
