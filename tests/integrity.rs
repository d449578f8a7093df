//! Hostile downloads and files, through real node processes (issue 17): disk budgets, target
//! names, download caps, two torrents of one name, the metadata cache's file identity, a shard
//! truncated under the node, shards without shard keys or with broken hyper-parameters.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::{Value, json};
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::split;
use shardnet::gguf::writer::Value as Meta;
use shardnet::torrent::metainfo::Info;
use shardnet::torrent::{InfoHash, Metainfo};

const MB: usize = 1024 * 1024;

/// Torrent metadata of a file of `length` bytes named `name` (piece hashes of nothing real).
fn fake_torrent(name: &str, length: u64, piece_length: u64) -> Metainfo {
    let n = Info::piece_count(length, piece_length) as usize;
    Metainfo::new(Info { name: name.into(), length, piece_length, pieces: vec![[7u8; 20]; n] })
}

/// The bytes of a torrent as `Info` would encode them, with `name` unchecked (for names the
/// parser refuses, such as `a/b.gguf`).
fn raw_torrent(name: &str) -> (String, String) {
    let info =
        format!("d6:lengthi1000e4:name{}:{name}12:piece lengthi16384e6:pieces20:{}e", name.len(), "x".repeat(20));
    let hash = shardnet::hash::to_hex(&shardnet::hash::sha1(info.as_bytes()));
    (hash, shardnet::hash::to_hex(format!("d4:info{info}e").as_bytes()))
}

fn download(node: &NodeProc, m: &Metainfo, peers: &[&str]) -> Value {
    let torrent_hex = shardnet::hash::to_hex(&m.to_torrent_bytes());
    node.call("DOWNLOAD", json!({"info_hash": m.info_hash.to_hex(), "torrent_hex": torrent_hex, "peers": peers}))
}

fn download_status(node: &NodeProc, h: InfoHash) -> Value {
    let s = node.call("STATUS", json!({}));
    s["result"]["downloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["info_hash"] == h.to_hex().as_str())
        .cloned()
        .unwrap_or(Value::Null)
}

/// Names in `dir` other than the node's own bookkeeping (`.dht-nodes`).
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != ".dht-nodes")
        .collect();
    v.sort();
    v
}

#[test]
fn an_oversized_torrent_is_refused_before_any_file_is_created() {
    // Declared far beyond the free space (no flag needed): the free-space check.
    let ld = TempDir::new("ileech");
    let leech = torrent_node(ld.path(), &["--disk-budget", "1000000"]);
    let huge = fake_torrent("shard-0.gguf", 1 << 44, 128 << 20);
    let r = download(&leech, &huge, &["127.0.0.1:9"]);
    assert_eq!(r["code"], "DISK_BUDGET", "{r}");
    // A real seed, over the --disk-budget, by magnet: the length is known only once the
    // metadata arrives from the seed, and the download stops there.
    let (sd, _src, m) = seed_dir("iseed", 2 * MB, 0);
    let seed = torrent_node(sd.path(), &[]);
    let r = leech.call("DOWNLOAD", json!({"info_hash": m.info_hash.to_hex(), "peers": [seed.addr]}));
    assert_eq!(r["status"], "success", "a magnet's length is not known yet: {r}");
    let d = wait_for(WAIT, || {
        let d = download_status(&leech, m.info_hash);
        d["error"].is_string().then_some(d)
    });
    assert!(d["error"].as_str().unwrap().contains("--disk-budget"), "{d}");
    assert_eq!(d["complete"], false);
    // The same torrent given whole is refused at once.
    let r = download(&leech, &m, &[&seed.addr]);
    assert_eq!(r["code"], "DISK_BUDGET", "{r}");
    assert_eq!(files_in(ld.path()), Vec::<String>::new(), "no .part, no file");
    leech.assert_serving();
}

/// Repack sidecars (`NAME.gguf.repack`, and one being written) are files the node writes in the
/// shards dir: they count toward `--disk-budget` as GGUF and `.part` files do.
#[test]
fn repack_sidecars_count_toward_the_disk_budget() {
    let dir = TempDir::new("isidecar-budget");
    std::fs::write(dir.path().join("gone.gguf.repack"), vec![0u8; 600_000]).unwrap();
    std::fs::write(dir.path().join(".gone.gguf.repack.tmp-0123456789abcdef"), vec![0u8; 300_000]).unwrap();
    let node = torrent_node(dir.path(), &["--disk-budget", "1000000"]);
    // 200,000 bytes fit the budget alone, not beside the sidecars' 900,000.
    let r = download(&node, &fake_torrent("shard-0.gguf", 200_000, 16384), &["127.0.0.1:9"]);
    assert_eq!(r["code"], "DISK_BUDGET", "{r}");
    assert!(r["error"].as_str().unwrap().contains("holds 900000"), "{r}");
    // 90,000 do.
    let r = download(&node, &fake_torrent("shard-1.gguf", 90_000, 16384), &["127.0.0.1:9"]);
    assert_eq!(r["status"], "success", "{r}");
    node.assert_serving();
}

#[test]
fn a_zero_length_torrent_is_refused_as_a_download_target() {
    let dir = TempDir::new("iempty");
    let node = torrent_node(dir.path(), &[]);
    // The squat needs no peer: the metadata alone would make an empty, complete shard-1.gguf.
    let r = download(&node, &fake_torrent("shard-1.gguf", 0, 262144), &["127.0.0.1:9"]);
    assert_eq!(r["code"], "WRONG_TYPE", "{r}");
    assert!(r["error"].as_str().unwrap().contains("0 bytes"), "{r}");
    assert!(files_in(dir.path()).is_empty(), "{:?}", files_in(dir.path()));
    assert_eq!(node.call("LIST_FILES", json!({}))["result"]["files"], json!([]));
    let r = node.call("LOAD_SHARD", json!({"shard_id": 1}));
    assert_ne!(r["code"], "SHARD_INVALID", "{r}");
    node.assert_serving();
}

#[test]
fn control_file_and_hidden_names_are_refused_as_download_targets() {
    let ld = TempDir::new("inames");
    std::fs::write(ld.path().join("manifest.json"), b"{\"shards\": []}").unwrap();
    let leech = torrent_node(ld.path(), &[]);
    for name in ["manifest.json", ".dht-nodes", "shard-1.gguf.torrent", ".x.gguf", "x.gguf.part", ".gguf"] {
        let r = download(&leech, &fake_torrent(name, 1000, 16384), &["127.0.0.1:9"]);
        assert_eq!(r["code"], "BAD_PATH", "{name}: {r}");
        assert!(r["error"].as_str().unwrap().contains(name), "{name}: {r}");
    }
    for name in ["a/b.gguf", "../x.gguf"] {
        let (hash, torrent_hex) = raw_torrent(name);
        let r =
            leech.call("DOWNLOAD", json!({"info_hash": hash, "torrent_hex": torrent_hex, "peers": ["127.0.0.1:9"]}));
        assert_eq!(r["status"], "error", "{name}: {r}");
        assert!(r["error"].as_str().unwrap().contains("path separator"), "{name}: {r}");
    }
    assert_eq!(files_in(ld.path()), vec!["manifest.json".to_string()]);
    assert_eq!(std::fs::read(ld.path().join("manifest.json")).unwrap(), b"{\"shards\": []}");
    leech.assert_serving();
}

#[test]
fn a_thousand_downloads_are_capped_and_dead_peers_given_up() {
    let ld = TempDir::new("icap");
    // One client may hold every slot here (the node-wide cap is what is tested).
    let leech = torrent_node(ld.path(), &["--redial-give-up", "2", "--max-downloads-per-client", "8"]);
    // 64 peers each, all dead (ports nobody listens on).
    let peers: Vec<String> = (0..64).map(|i| format!("127.0.0.1:{}", 9 + i)).collect();
    let mut c = leech.client();
    let (mut accepted, mut capped) = (0, 0);
    for i in 0..1000u32 {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&i.to_be_bytes());
        h[19] = 1;
        let r = c.request("DOWNLOAD", json!({"info_hash": InfoHash(h).to_hex(), "peers": peers})).unwrap();
        match r["status"].as_str() {
            Some("success") => accepted += 1,
            _ => {
                assert_eq!(r["code"], "DOWNLOAD_LIMIT", "{r}");
                assert!(r["error"].as_str().unwrap().contains("--max-downloads 8"), "{r}");
                capped += 1;
            }
        }
    }
    assert_eq!((accepted, capped), (8, 992));
    let downloads = leech.call("STATUS", json!({}))["result"]["downloads"].clone();
    let downloads = downloads.as_array().unwrap();
    assert_eq!(downloads.len(), 8);
    for d in downloads {
        assert!(d["known_peers"].as_u64().unwrap() <= 32, "--max-download-peers: {d}");
    }
    // Peers that never answer are dropped after --redial-give-up.
    wait_for(WAIT, || {
        let s = leech.call("STATUS", json!({}));
        s["result"]["downloads"].as_array().unwrap().iter().all(|d| d["known_peers"] == 0).then_some(())
    });
    leech.assert_serving();
}

/// Red-team round 8: eight magnets of random info hashes named a dead peer and held every
/// `--max-downloads` slot until restart. With `--download-stall-timeout 2` each fails with a
/// clear error once 2 s pass without a metadata piece or a block, and its slot is free again.
#[test]
fn downloads_without_progress_fail_and_free_their_slots() {
    let ld = TempDir::new("istall");
    let leech = torrent_node(ld.path(), &["--download-stall-timeout", "2", "--redial-give-up", "600"]);
    let magnet = |i: u32| {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&i.to_be_bytes());
        h[19] = 2;
        json!({"info_hash": InfoHash(h).to_hex(), "peers": ["127.0.0.1:9"]})
    };
    for i in 0..8 {
        let r = leech.call("DOWNLOAD", magnet(i));
        assert_eq!(r["status"], "success", "{r}");
    }
    let r = leech.call("DOWNLOAD", magnet(8));
    assert_eq!(r["code"], "DOWNLOAD_LIMIT", "{r}");
    let downloads = wait_for(WAIT, || {
        let s = leech.call("STATUS", json!({}));
        let d = s["result"]["downloads"].as_array().unwrap().clone();
        d.iter().all(|d| d["error"].is_string()).then_some(d)
    });
    assert_eq!(downloads.len(), 8);
    for d in &downloads {
        let e = d["error"].as_str().unwrap();
        assert!(e.contains("no metadata") && e.contains("--download-stall-timeout"), "{d}");
    }
    let r = leech.call("DOWNLOAD", magnet(8));
    assert_eq!(r["status"], "success", "the slots are free again: {r}");
    leech.assert_serving();
}

/// Red-team round 8: one stranger's DOWNLOADs of random info hashes took every `--max-downloads`
/// slot, so the owner's own loads waited up to `--download-stall-timeout` per burst. A client
/// (here one connection: on loopback a client is IP and port) may start at most
/// `--max-downloads-per-client` of them (default half of `--max-downloads`: 2 of 4), by DOWNLOAD
/// or LOAD_SHARD alike; another client's download still starts, and joining a download under
/// way costs no slot.
#[test]
fn one_client_starts_at_most_its_share_of_the_download_slots() {
    let ld = TempDir::new("ishare");
    let leech = torrent_node(ld.path(), &["--max-downloads", "4", "--redial-give-up", "600"]);
    let limits = leech.call("STATUS", json!({}))["result"]["download_limits"].clone();
    assert_eq!(limits["max_downloads_per_client"], 2, "{limits}");
    let hash = |i: u32| {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&i.to_be_bytes());
        h[19] = 3;
        InfoHash(h).to_hex()
    };
    let mut stranger = leech.client();
    for i in 0..2 {
        let r = stranger.request("DOWNLOAD", json!({"info_hash": hash(i), "peers": ["127.0.0.1:9"]})).unwrap();
        assert_eq!(r["status"], "success", "{r}");
    }
    let r = stranger.request("DOWNLOAD", json!({"info_hash": hash(2), "peers": ["127.0.0.1:9"]})).unwrap();
    assert_eq!(r["code"], "DOWNLOAD_LIMIT", "{r}");
    assert!(r["error"].as_str().unwrap().contains("--max-downloads-per-client 2"), "{r}");
    let load = json!({"shard_id": 0, "info_hash": hash(3), "peers": ["127.0.0.1:9"], "wait": false});
    let r = stranger.request("LOAD_SHARD", load).unwrap();
    assert_eq!(r["code"], "DOWNLOAD_LIMIT", "LOAD_SHARD counts as well: {r}");
    // Joining one of its downloads under way is not a new one.
    let r = stranger.request("DOWNLOAD", json!({"info_hash": hash(0), "peers": ["127.0.0.1:10"]})).unwrap();
    assert_eq!(r["status"], "success", "{r}");

    // Another client (the owner) still starts its downloads.
    let mut owner = leech.client();
    for i in 10..12 {
        let r = owner.request("DOWNLOAD", json!({"info_hash": hash(i), "peers": ["127.0.0.1:9"]})).unwrap();
        assert_eq!(r["status"], "success", "{r}");
    }
    // And the node-wide cap still holds.
    let r = leech.call("DOWNLOAD", json!({"info_hash": hash(20), "peers": ["127.0.0.1:9"]}));
    assert_eq!(r["code"], "DOWNLOAD_LIMIT", "{r}");
    assert!(r["error"].as_str().unwrap().contains("--max-downloads 4"), "{r}");
    leech.assert_serving();
}

/// Red-team round 11: two addresses, each at its `--max-downloads-per-client` share, took every
/// `--max-downloads` slot. Strangers (no cluster key, another host: here other 127/8 addresses
/// than the node's) hold at most three quarters of the slots together (3 of 4); a caller on the
/// node's own host still starts one beside them, and the node-wide cap still holds.
#[test]
fn strangers_leave_a_quarter_of_the_download_slots_to_the_nodes_host() {
    let ld = TempDir::new("istrangers");
    let leech = torrent_node(ld.path(), &["--max-downloads", "4", "--redial-give-up", "600"]);
    let limits = leech.call("STATUS", json!({}))["result"]["download_limits"].clone();
    assert_eq!(
        (limits["max_downloads_per_client"].clone(), limits["max_downloads_strangers"].clone()),
        (json!(2), json!(3)),
        "{limits}"
    );
    let hash = |i: u32| {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&i.to_be_bytes());
        h[19] = 5;
        InfoHash(h).to_hex()
    };
    let download_from = |src: &str, i: u32| {
        let mut s = connect_from(src, &leech.addr);
        let req =
            json!({"command": "DOWNLOAD", "request_id": i, "params": {"info_hash": hash(i), "peers": ["127.0.0.1:9"]}});
        send_frame(&mut s, req.to_string().as_bytes());
        read_frame(&mut s)
    };
    for i in 0..2 {
        let r = download_from("127.0.0.2", i);
        assert_eq!(r["status"], "success", "{r}");
    }
    let r = download_from("127.0.0.3", 2);
    assert_eq!(r["status"], "success", "{r}");
    // A second stranger's second download passes its own share, not the strangers' one.
    let r = download_from("127.0.0.3", 3);
    assert_eq!(r["code"], "DOWNLOAD_LIMIT", "{r}");
    assert!(r["error"].as_str().unwrap().contains("without the cluster key"), "{r}");
    // The node's own host (a caller at the address it reached) still starts one.
    let r = leech.call("DOWNLOAD", json!({"info_hash": hash(10), "peers": ["127.0.0.1:9"]}));
    assert_eq!(r["status"], "success", "the host's download beside the strangers' three: {r}");
    let r = leech.call("DOWNLOAD", json!({"info_hash": hash(11), "peers": ["127.0.0.1:9"]}));
    assert_eq!(r["code"], "DOWNLOAD_LIMIT", "{r}");
    assert!(r["error"].as_str().unwrap().contains("--max-downloads 4"), "{r}");
    leech.assert_serving();
}

/// A slow swarm that keeps sending blocks is not a stall: a 3 MB shard at 400 kB/s (about 8 s)
/// downloads whole under `--download-stall-timeout 2`.
#[test]
fn a_slow_download_that_progresses_is_not_failed_as_stalled() {
    let (sd, src, m) = seed_dir("istall-seed", 3 * MB, 3);
    let seed = torrent_node(sd.path(), &["--upload-limit", "400000"]);
    let ld = TempDir::new("istall-slow");
    let leech = torrent_node(ld.path(), &["--download-stall-timeout", "2"]);
    let r = download(&leech, &m, &[&seed.addr]);
    assert_eq!(r["status"], "success", "{r}");
    let d = wait_for(WAIT, || {
        let d = download_status(&leech, m.info_hash);
        (d["complete"] == true || d["error"].is_string()).then_some(d)
    });
    assert_eq!(d["complete"], true, "{d}");
    assert!(d["seconds"].as_f64().unwrap_or(0.0) > 2.0, "not slower than the stall timeout: {d}");
    same_bytes(&src, &ld.path().join(&m.info.name));
}

/// Red-team round 8: one DOWNLOAD naming 32 ports of a third party drew 224 connections to it
/// in 40 s. A peer that never handshakes gets at most 4 dials (`MAX_UNPROVEN_DIALS`), then is
/// dropped, even under a long `--redial-give-up`.
#[test]
fn peers_that_never_handshake_get_a_bounded_number_of_dials() {
    let ld = TempDir::new("idials");
    let leech = torrent_node(ld.path(), &["--redial-give-up", "600"]);
    let mut ports = Vec::new();
    let mut counters = Vec::new();
    for _ in 0..8 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        ports.push(listener.local_addr().unwrap().to_string());
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        counters.push(n.clone());
        std::thread::spawn(move || {
            for s in listener.incoming() {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(s);
            }
        });
    }
    let mut h = [0u8; 20];
    h[19] = 3;
    let r = leech.call("DOWNLOAD", json!({"info_hash": InfoHash(h).to_hex(), "peers": ports}));
    assert_eq!(r["status"], "success", "{r}");
    wait_for(WAIT, || (download_status(&leech, InfoHash(h))["known_peers"] == 0).then_some(()));
    std::thread::sleep(Duration::from_secs(1));
    let dials: Vec<usize> = counters.iter().map(|c| c.load(std::sync::atomic::Ordering::SeqCst)).collect();
    assert!(dials.iter().all(|n| (1..=4).contains(n)), "dials per peer: {dials:?}");
    leech.assert_serving();
}

#[test]
fn two_torrents_of_one_name_never_share_a_file() {
    let (sa, src_a, a) = seed_dir("iseed", 3 * MB, 1);
    let (sb, src_b, b) = seed_dir("iseed", 3 * MB, 2);
    assert_ne!(a.info_hash, b.info_hash);
    let seed_a = torrent_node(sa.path(), &[]);
    let seed_b = torrent_node(sb.path(), &[]);
    let ld = TempDir::new("itwo");
    let leech = torrent_node(ld.path(), &["--download-limit", "2000000"]);
    let r = download(&leech, &a, &[&seed_a.addr]);
    assert_eq!(r["status"], "success", "{r}");
    // While A runs: B whole is refused, B by magnet is refused once its name is known.
    let r = download(&leech, &b, &[&seed_b.addr]);
    assert_eq!(r["code"], "NAME_CONFLICT", "{r}");
    let r = leech.call("DOWNLOAD", json!({"info_hash": b.info_hash.to_hex(), "peers": [seed_b.addr]}));
    assert_eq!(r["status"], "success", "{r}");
    let d = wait_for(WAIT, || {
        let d = download_status(&leech, b.info_hash);
        d["error"].is_string().then_some(d)
    });
    assert!(d["error"].as_str().unwrap().contains("being downloaded already"), "{d}");
    assert!(download_status(&leech, a.info_hash)["complete"] == false, "B was refused while A ran");
    wait_for(Duration::from_secs(30), || (download_status(&leech, a.info_hash)["complete"] == true).then_some(()));
    let got = std::fs::read(ld.path().join("shard-0.gguf")).unwrap();
    assert!(got == std::fs::read(&src_a).unwrap(), "byte-identical to its own torrent");
    assert!(got != std::fs::read(&src_b).unwrap());
    // Listed (and seeded) under A's info hash only; B later is refused by name.
    let files = leech.call("LIST_FILES", json!({}))["result"]["files"].clone();
    assert_eq!(files.as_array().unwrap().len(), 1, "{files}");
    assert_eq!(files[0]["info_hash"], a.info_hash.to_hex().as_str());
    assert_eq!(download(&leech, &b, &[&seed_b.addr])["code"], "NAME_CONFLICT");
    assert_eq!(files_in(ld.path()), vec!["shard-0.gguf".to_string(), "shard-0.gguf.torrent".to_string()]);
}

#[test]
fn stale_part_files_are_removed_at_startup() {
    let ld = TempDir::new("istale");
    let old = ld.path().join(format!("x.gguf.{}.part", "ab".repeat(20)));
    let fresh = ld.path().join(format!("y.gguf.{}.part", "cd".repeat(20)));
    for p in [&old, &fresh] {
        std::fs::write(p, b"partial").unwrap();
    }
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_hours_ago).unwrap();
    let node = torrent_node(ld.path(), &["--part-expiry", "3600"]);
    wait_for(WAIT, || (!old.exists()).then_some(()));
    assert!(fresh.exists(), "a .part younger than --part-expiry stays");
    node.assert_serving();
}

#[test]
fn an_edited_shard_with_its_mtime_set_back_is_rehashed_and_seeded_under_its_new_hash() {
    let (sd, src, m) = seed_dir("iseed", MB, 0);
    let mut seed = torrent_node(sd.path(), &[]);
    let files = seed.call("LIST_FILES", json!({}))["result"]["files"].clone();
    assert_eq!(files[0]["info_hash"], m.info_hash.to_hex().as_str());
    seed.kill();
    // Edit one byte of tensor data in place (same size), then set the mtime back.
    let mtime = std::fs::metadata(&src).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&src).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&src, &bytes).unwrap();
    std::fs::File::options().write(true).open(&src).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&src).unwrap().modified().unwrap(), mtime);
    let pool = shardnet::workers::WorkerPool::new("t", 2);
    let edited = shardnet::torrent::create::create(&src, None, &pool.handle()).unwrap();
    assert_ne!(edited.info_hash, m.info_hash);
    let seed = torrent_node(sd.path(), &[]);
    let status = seed.call("STATUS", json!({}))["result"]["metadata"].clone();
    assert_eq!(status["hashed"], 1, "rehashed, not taken from the cache: {status}");
    let files = seed.call("LIST_FILES", json!({}))["result"]["files"].clone();
    assert_eq!(files[0]["info_hash"], edited.info_hash.to_hex().as_str());
    // And seeded under it: a leech gets the edited bytes.
    let ld = TempDir::new("ileech");
    let leech = torrent_node(ld.path(), &[]);
    assert_eq!(download(&leech, &edited, &[&seed.addr])["status"], "success");
    wait_for(WAIT, || (download_status(&leech, edited.info_hash)["complete"] == true).then_some(()));
    assert!(std::fs::read(ld.path().join("shard-0.gguf")).unwrap() == bytes);
}

/// A demo model (changed by `edit`) split into two shards in `dir`; returns the shard paths.
fn demo_shards(dir: &Path, edit: impl FnOnce(&mut shardnet::gguf::writer::Builder)) -> Vec<PathBuf> {
    let cfg = DemoConfig { layers: 2, embd: 64, heads: 4, kv_heads: 2, ffn: 128, vocab: 300, ..Default::default() };
    let (mut b, data) = demo::build(&cfg).unwrap();
    edit(&mut b);
    let model = dir.join("model.src");
    let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
    std::fs::write(&model, b.to_bytes(&refs).unwrap()).unwrap();
    let report = split::split(&model, 2, dir, None).unwrap();
    std::fs::remove_file(&model).unwrap();
    let _ = report;
    vec![dir.join("shard-0.gguf"), dir.join("shard-1.gguf")]
}

/// Sets metadata key `key` to `v` (replacing it, or adding it).
fn set_key(b: &mut shardnet::gguf::writer::Builder, key: &str, v: Meta) {
    match b.metadata.iter_mut().find(|(k, _)| k == key) {
        Some(kv) => kv.1 = v,
        None => b.metadata.push((key.to_string(), v)),
    }
}

fn execute(node: &NodeProc, tokens: &[u32]) -> Value {
    node.call(
        "EXECUTE_TASK",
        json!({"task_type": "ai_inference", "session_id": "s", "shard_id": 0, "pos": 0,
               "input": {"tokens": tokens}, "output": "hidden", "load": false}),
    )
}

#[test]
fn a_loaded_shard_truncated_on_disk_gets_an_error_answer_and_the_node_lives() {
    let dir = TempDir::new("itrunc");
    let shards = demo_shards(dir.path(), |_| {});
    let node = NodeProc::start(dir.path(), &[]);
    let r = node.call("LOAD_SHARD", json!({"shard_id": 0}));
    assert_eq!(r["status"], "success", "{r}");
    assert_eq!(execute(&node, &[1, 2, 3])["status"], "success");
    let len = std::fs::metadata(&shards[0]).unwrap().len();
    std::fs::File::options().write(true).open(&shards[0]).unwrap().set_len(len / 3).unwrap();
    let r = execute(&node, &[1, 2, 3]);
    assert_eq!(r["code"], "SHARD_CHANGED", "{r}");
    node.assert_serving();
    // Loading it again sees the cut file and refuses it.
    let r = node.call("LOAD_SHARD", json!({"shard_id": 0}));
    assert_eq!(r["code"], "SHARD_INVALID", "{r}");
    node.assert_serving();
}

#[test]
fn load_shard_of_a_gguf_without_shard_keys_is_refused() {
    let dir = TempDir::new("inokeys");
    let cfg = DemoConfig { layers: 2, embd: 64, heads: 4, kv_heads: 2, ffn: 128, vocab: 300, ..Default::default() };
    demo::write(&cfg, &dir.path().join("whole.gguf")).unwrap();
    let node = NodeProc::start(dir.path(), &[]);
    let r = node.call("LOAD_SHARD", json!({"shard_id": 0, "filename": "whole.gguf"}));
    assert_eq!(r["code"], "SHARD_INVALID", "{r}");
    assert!(r["error"].as_str().unwrap().contains("not a shard"), "{r}");
    node.assert_serving();
}

#[test]
fn a_shard_with_a_negative_or_nan_norm_epsilon_is_refused_at_load_and_the_node_lives() {
    for eps in [-1.0f32, f32::NAN] {
        let dir = TempDir::new("ieps");
        demo_shards(dir.path(), |b| set_key(b, "llama.attention.layer_norm_rms_epsilon", Meta::F32(eps)));
        let node = NodeProc::start(dir.path(), &[]);
        let r = node.call("LOAD_SHARD", json!({"shard_id": 0}));
        assert_eq!(r["code"], "SHARD_INVALID", "eps {eps}: {r}");
        assert!(r["error"].as_str().unwrap().contains("layer_norm_rms_epsilon"), "{r}");
        // A task that would load it gets the same answer, and the node lives.
        let r = node.call(
            "EXECUTE_TASK",
            json!({"task_type": "ai_inference", "session_id": "s", "shard_id": 1, "pos": 0,
                   "input": {"hidden": shardnet::protocol::tensor::f32_to_json(&[0.5; 64], 1, 64)}, "output": "logits"}),
        );
        assert_eq!(r["code"], "SHARD_INVALID", "eps {eps}: {r}");
        node.assert_serving();
    }
}
