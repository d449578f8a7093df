//! The pinned model and keyed pipelines (issue 12), through real node processes on loopback:
//! a keyed 4-node `shardctl infer` against an unkeyed one, the sybil case (two hostile seeds of
//! another model's shard 0 outvoting one honest seed), and manifests that must not be trusted.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use shardnet::gguf::demo::{self, DemoConfig};
use shardnet::gguf::manifest::manifest_hash;
use shardnet::gguf::split;
use shardnet::hash::to_hex;
use shardnet::workers::WorkerPool;

const PROMPT: &str = "The capital of France is";

/// A demo model split into 4 shards in `out`, with `.torrent` files and a manifest that carries
/// every info hash; returns the manifest's SHA-256 in hex (the pin).
fn split_model(dir: &Path, seed: u64, out: &Path) -> String {
    let model = dir.join(format!("demo-{seed}.gguf"));
    if !model.exists() {
        demo::write(&DemoConfig { layers: 8, seed, ..Default::default() }, &model).unwrap();
    }
    let pool = WorkerPool::new("hash", 2);
    split::split(&model, 4, out, Some(&pool.handle())).unwrap();
    to_hex(&manifest_hash(&std::fs::read(out.join("manifest.json")).unwrap()))
}

fn key_file(dir: &Path) -> PathBuf {
    let p = dir.join("cluster.key");
    std::fs::write(&p, "3b1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn shardctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .env_remove(shardnet::protocol::auth::KEY_ENV)
        .args(args)
        .output()
        .unwrap()
}

/// Node 0 seeds `seed_dir`; nodes 1..n start empty and bootstrap from it; returns once node 0
/// finds every other node under the cluster key.
fn cluster(dir: &Path, seed_dir: &Path, n: usize, extra: &[&str]) -> Vec<NodeProc> {
    let mut args = vec!["--enable-torrent", "--threads", "1", "--ctx-size", "128"];
    args.extend_from_slice(extra);
    let first = NodeProc::start(seed_dir, &args);
    let boot = first.addr.clone();
    let mut nodes = vec![first];
    for i in 1..n {
        let d = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut a = args.clone();
        a.extend_from_slice(&["--bootstrap", &boot]);
        nodes.push(NodeProc::start(&d, &a));
    }
    let key = extra.iter().position(|a| *a == "--cluster-key-file").map(|i| PathBuf::from(extra[i + 1]));
    wait_for(Duration::from_secs(30), || {
        let mut c = shardnet::client::Client::connect_with_key(
            &nodes[0].addr,
            WAIT,
            key.as_ref().map(|k| shardnet::protocol::auth::ClusterKey::load(k).unwrap().key).as_ref(),
        )
        .ok()?;
        let r = c.request("FIND_PEERS", json!({"cluster": true})).ok()?;
        let peers = r["result"]["peers"].as_array().cloned().unwrap_or_default();
        nodes[1..].iter().all(|n| peers.contains(&json!(n.addr))).then_some(())
    });
    nodes
}

fn infer_text(args: &[&str]) -> String {
    let o = shardctl(args);
    assert!(o.status.success(), "shardctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["text"].as_str().expect("infer --json gives the text").to_string()
}

#[test]
fn a_keyed_four_node_infer_gives_the_unkeyed_text() {
    let dir = TempDir::new("trust-infer");
    let open_dir = dir.path().join("open");
    let keyed_dir = dir.path().join("keyed");
    let seed_open = open_dir.join("node-0");
    let seed_keyed = keyed_dir.join("node-0");
    let pin = split_model(dir.path(), 42, &seed_open);
    assert_eq!(split_model(dir.path(), 42, &seed_keyed), pin, "split is deterministic");
    let kf = key_file(dir.path());
    let k = kf.to_str().unwrap();

    let open = cluster(&open_dir, &seed_open, 4, &[]);
    let expected =
        infer_text(&["--json", "infer", "--bootstrap", &open[0].addr, "--prompt", PROMPT, "-n", "8", "--ignore-eos"]);
    drop(open);

    let keyed = cluster(&keyed_dir, &seed_keyed, 4, &["--cluster-key-file", k]);
    // Without the key the coordinator gets nowhere.
    let o = shardctl(&["infer", "--bootstrap", &keyed[0].addr, "--prompt", PROMPT, "-n", "2"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("AUTH_REQUIRED"), "{}", String::from_utf8_lossy(&o.stderr));
    // With it (and the model pinned): the same text, through relays that authenticate too.
    let text = infer_text(&[
        "--cluster-key-file",
        k,
        "--json",
        "infer",
        "--bootstrap",
        &keyed[0].addr,
        "--prompt",
        PROMPT,
        "-n",
        "8",
        "--ignore-eos",
        "--model",
        &pin,
    ]);
    assert_eq!(text, expected);
    for n in &keyed {
        n.assert_serving();
    }
}

/// Waits until `node` finds each of `holders` under shard 0's name key.
fn wait_holders(node: &NodeProc, holders: &[&str]) {
    wait_for(Duration::from_secs(30), || {
        let r = node.call("FIND_PEERS", json!({"shard_id": 0}));
        let peers = r["result"]["peers"].as_array().cloned().unwrap_or_default();
        holders.iter().all(|h| peers.contains(&json!(h))).then_some(())
    });
}

#[test]
fn hostile_seeds_of_another_models_shard_cannot_outvote_the_pin() {
    let dir = TempDir::new("trust-sybil");
    let honest = dir.path().join("honest");
    let pin = split_model(dir.path(), 42, &honest);
    let honest_manifest: Value = serde_json::from_slice(&std::fs::read(honest.join("manifest.json")).unwrap()).unwrap();
    let honest_hash0 = honest_manifest["shards"][0]["info_hash"].as_str().unwrap().to_string();
    // Another model's shard 0, seeded by two nodes.
    let other = dir.path().join("other");
    split_model(dir.path(), 7, &other);
    let args = ["--enable-torrent", "--threads", "1"];
    let seed = NodeProc::start(&honest, &args);
    let mut hostile = Vec::new();
    for i in 0..2 {
        let d = dir.path().join(format!("hostile-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in ["shard-0.gguf", "shard-0.gguf.torrent"] {
            std::fs::copy(other.join(f), d.join(f)).unwrap();
        }
        hostile.push(NodeProc::start(&d, &[&args[..], &["--bootstrap", &seed.addr]].concat()));
    }
    let holders = [seed.addr.as_str(), hostile[0].addr.as_str(), hostile[1].addr.as_str()];

    // Pinned and empty: the manifest comes from the cluster, shard 0 by its info hash.
    let pinned_dir = dir.path().join("pinned");
    std::fs::create_dir_all(&pinned_dir).unwrap();
    let pinned = NodeProc::start(&pinned_dir, &[&args[..], &["--bootstrap", &seed.addr, "--model", &pin]].concat());
    wait_holders(&pinned, &holders);
    let mut c = pinned.client();
    c.set_timeout(Duration::from_secs(60)).unwrap();
    let r = c.request("LOAD_SHARD", json!({"shard_id": 0})).unwrap();
    assert_eq!(r["status"], "success", "{r}\n{}", pinned.stderr());
    let files = pinned.call("LIST_FILES", json!({}));
    let zero = files["result"]["files"].as_array().unwrap().iter().find(|f| f["filename"] == "shard-0.gguf").cloned();
    assert_eq!(zero.unwrap()["info_hash"], json!(honest_hash0), "{files}");
    let s = pinned.call("STATUS", json!({}));
    assert_eq!(s["result"]["model"]["manifest"], json!(pin), "{s}");
    assert!(pinned_dir.join("manifest.json").exists(), "the fetched manifest is kept");
    // An info hash the manifest does not name is refused outright.
    let r = pinned.call("LOAD_SHARD", json!({"shard_id": 1, "info_hash": "ab".repeat(20)}));
    assert_eq!(r["code"], "MANIFEST_MISMATCH", "{r}");

    // Unpinned, holding shard 1 of the real model: the vote (two hostile holders, one honest; the
    // pinned node, now an honest holder too, is stopped) picks the hostile file, which is refused
    // for its model id.
    drop(pinned);
    let unpinned_dir = dir.path().join("unpinned");
    std::fs::create_dir_all(&unpinned_dir).unwrap();
    for f in ["shard-1.gguf", "shard-1.gguf.torrent"] {
        std::fs::copy(honest.join(f), unpinned_dir.join(f)).unwrap();
    }
    let unpinned = NodeProc::start(&unpinned_dir, &[&args[..], &["--bootstrap", &seed.addr]].concat());
    wait_holders(&unpinned, &holders);
    let mut c = unpinned.client();
    c.set_timeout(Duration::from_secs(60)).unwrap();
    let r = c.request("LOAD_SHARD", json!({"shard_id": 0})).unwrap();
    assert_eq!(r["code"], "SHARD_INVALID", "{r}");
    assert!(r["error"].as_str().unwrap().contains("not of this node's model"), "{r}");
    let s = unpinned.call("STATUS", json!({}));
    assert!(s["result"]["shards_loaded"].as_array().unwrap().is_empty(), "{s}");
    // The refused file is neither kept nor seeded: it adds no vote for itself.
    wait_for(WAIT, || (!unpinned_dir.join("shard-0.gguf").exists()).then_some(()));
    let files = unpinned.call("LIST_FILES", json!({}));
    assert_eq!(files["result"]["files"].as_array().unwrap().len(), 1, "{files}");
    seed.assert_serving();
}

#[test]
fn manifests_that_do_not_hash_to_the_pin_or_do_not_add_up_are_refused() {
    let dir = TempDir::new("trust-manifest");
    let shards = dir.path().join("shards");
    let pin = split_model(dir.path(), 42, &shards);
    let good = std::fs::read(shards.join("manifest.json")).unwrap();

    // The right manifest, the wrong pin: refused, and the node says why.
    let wrong_pin = to_hex(&manifest_hash(b"another manifest"));
    let node = NodeProc::start(&shards, &["--model", &wrong_pin]);
    wait_for(WAIT, || node.stderr().contains("not the pinned").then_some(()));
    let s = node.call("STATUS", json!({}));
    assert_eq!(s["result"]["model"]["manifest"], Value::Null, "{s}");
    assert_eq!(s["result"]["model"]["pin"], json!(wrong_pin), "{s}");
    // Nor is a shard file the pin cannot vouch for loaded, here or through EXECUTE_TASK.
    let r = node.call("LOAD_SHARD", json!({"shard_id": 0}));
    assert_eq!(r["status"], "error", "{r}");
    let r = node.call("EXECUTE_TASK", json!({"session_id": "s", "shard_id": 0, "input": {"tokens": [1]}}));
    assert_eq!(r["status"], "error", "{r}");
    let s = node.call("STATUS", json!({}));
    assert!(s["result"]["shards_loaded"].as_array().unwrap().is_empty(), "{s}");
    drop(node);
    // The coordinator checks the pin as well.
    let node = NodeProc::start(&shards, &[]);
    let o = shardctl(&["infer", "--bootstrap", &node.addr, "--prompt", PROMPT, "--model", &wrong_pin]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no manifest with SHA-256"));
    drop(node);

    // Layer ranges that overlap, or leave a layer out, even under their own hash.
    let v: Value = serde_json::from_slice(&good).unwrap();
    let end0 = v["shards"][0]["layers"][1].as_u64().unwrap();
    for (begin1, needle) in [(end0 - 1, "inside the shard before it"), (end0 + 1, "are in no shard")] {
        let mut m = v.clone();
        m["shards"][1]["layers"][0] = json!(begin1);
        let bytes = serde_json::to_vec_pretty(&m).unwrap();
        std::fs::write(shards.join("manifest.json"), &bytes).unwrap();
        let pin = to_hex(&manifest_hash(&bytes));
        let node = NodeProc::start(&shards, &["--model", &pin]);
        wait_for(WAIT, || node.stderr().contains(needle).then_some(()));
        let s = node.call("STATUS", json!({}));
        assert_eq!(s["result"]["model"]["manifest"], Value::Null, "{s}");
    }
    // The manifest as split wrote it, under its own hash, is taken.
    std::fs::write(shards.join("manifest.json"), &good).unwrap();
    let node = NodeProc::start(&shards, &["--model", &pin, "--shard-id", "1"]);
    wait_for(WAIT, || {
        let s = node.call("STATUS", json!({}));
        (s["result"]["model"]["manifest"] == json!(pin)).then_some(())
    });
    // Its files load once their info hashes are checked: --shard-id at startup, others on demand.
    wait_for(WAIT, || {
        let s = node.call("STATUS", json!({}));
        (s["result"]["shards_loaded"][0]["shard_id"] == 1).then_some(())
    });
    let r = wait_for(WAIT, || {
        let r = node.call("LOAD_SHARD", json!({"shard_id": 2}));
        (r["code"] != "BUSY").then_some(r)
    });
    assert_eq!(r["status"], "success", "{r}");
}

#[test]
#[ignore = "needs aria2c"]
fn a_private_swarm_serves_keyed_nodes_and_not_aria2() {
    require("aria2c");
    let dir = TempDir::new("trust-private");
    let seed_dir = dir.path().join("seed");
    split_model(dir.path(), 42, &seed_dir);
    let kf = key_file(dir.path());
    let k = kf.to_str().unwrap();
    let seed = NodeProc::start(&seed_dir, &["--enable-torrent", "--cluster-key-file", k, "--private"]);
    let key = shardnet::protocol::auth::ClusterKey::load(&kf).unwrap().key;
    let call = |node: &NodeProc, cmd: &str, params: Value| {
        let mut c = shardnet::client::Client::connect_with_key(&node.addr, WAIT, Some(&key)).unwrap();
        c.set_timeout(Duration::from_secs(60)).unwrap();
        c.request(cmd, params).unwrap()
    };
    wait_for(WAIT, || {
        let s = call(&seed, "STATUS", json!({}));
        (s["result"]["metadata"]["scan_done"] == json!(true)).then_some(())
    });
    assert_eq!(call(&seed, "STATUS", json!({}))["result"]["auth"]["private_swarms"], true);

    // An ordinary BitTorrent client, pointed straight at the seed: nothing.
    let port: u16 = seed.addr.rsplit(':').next().unwrap().parse().unwrap();
    let announce = tracker(port);
    let out = TempDir::new("trust-private-aria");
    let status = Command::new("timeout")
        .args(["30", "aria2c", "--enable-dht=false", "--bt-enable-lpd=false", "--seed-time=0", "--quiet=true"])
        .args(["--bt-stop-timeout=10", "--file-allocation=none"])
        .arg(format!("--bt-tracker={announce}"))
        .arg(format!("--dir={}", out.path().display()))
        .arg(seed_dir.join("shard-0.gguf.torrent"))
        .status()
        .unwrap();
    assert!(!status.success(), "aria2c finished a download from a private swarm");
    let original = std::fs::read(seed_dir.join("shard-0.gguf")).unwrap();
    let got = std::fs::read(out.path().join("shard-0.gguf")).unwrap_or_default();
    assert_ne!(got, original, "aria2c got the shard");
    let s = call(&seed, "STATUS", json!({}));
    assert_eq!(s["result"]["uploaded"], 0, "{s}");

    // A node with the key, also private: the shard, byte for byte.
    let leech_dir = dir.path().join("leech");
    std::fs::create_dir_all(&leech_dir).unwrap();
    let leech = NodeProc::start(&leech_dir, &["--enable-torrent", "--cluster-key-file", k, "--private"]);
    let manifest: Value = serde_json::from_slice(&std::fs::read(seed_dir.join("manifest.json")).unwrap()).unwrap();
    let r = call(
        &leech,
        "LOAD_SHARD",
        json!({"shard_id": 0, "info_hash": manifest["shards"][0]["info_hash"],
        "peers": [seed.addr]}),
    );
    assert_eq!(r["status"], "success", "{r}\n{}", leech.stderr());
    assert_eq!(std::fs::read(leech_dir.join("shard-0.gguf")).unwrap(), original);
    seed.assert_serving();
}

/// A copy of `src` (a shard) at `dst` with its last 4 KiB of weights set to 0.5: the same
/// `shard.*` keys and model id, other weights; returns its torrent (written beside it).
fn tampered_shard(src: &Path, dst: &Path) -> shardnet::torrent::Metainfo {
    let mut bytes = std::fs::read(src).unwrap();
    let n = bytes.len();
    for (i, b) in bytes[n - 4096..].iter_mut().enumerate() {
        *b = 0.5f32.to_le_bytes()[i % 4];
    }
    std::fs::write(dst, &bytes).unwrap();
    let pool = WorkerPool::new("hash", 2);
    shardnet::torrent::create::create(dst, None, &pool.handle()).unwrap()
}

fn download(node: &NodeProc, m: &shardnet::torrent::Metainfo, peers: &[&str]) -> Value {
    let torrent_hex = to_hex(&m.to_torrent_bytes());
    node.call("DOWNLOAD", json!({"info_hash": m.info_hash.to_hex(), "torrent_hex": torrent_hex, "peers": peers}))
}

/// The info hash `manifest.json` in `dir` lists for shard `id`.
fn manifest_info_hash(dir: &Path, id: usize) -> String {
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    v["shards"][id]["info_hash"].as_str().unwrap().to_string()
}

fn listed(node: &NodeProc, name: &str) -> Value {
    let files = node.call("LIST_FILES", json!({}));
    files["result"]["files"].as_array().unwrap().iter().find(|f| f["filename"] == name).cloned().unwrap_or(Value::Null)
}

#[test]
fn a_pinned_node_takes_no_download_its_manifest_does_not_name_nor_lists_a_squatter_as_the_shard() {
    let dir = TempDir::new("trust-squat");
    let honest = dir.path().join("honest");
    let pin = split_model(dir.path(), 42, &honest);
    let evil_dir = dir.path().join("evil");
    std::fs::create_dir_all(&evil_dir).unwrap();
    let evil = tampered_shard(&honest.join("shard-0.gguf"), &evil_dir.join("shard-0.gguf"));
    let seed = NodeProc::start(&evil_dir, &["--enable-torrent"]);
    seed.wait_metadata();
    // The pinned node holds its manifest and shard 1.
    let pinned_dir = dir.path().join("pinned");
    std::fs::create_dir_all(&pinned_dir).unwrap();
    for f in ["manifest.json", "shard-1.gguf"] {
        std::fs::copy(honest.join(f), pinned_dir.join(f)).unwrap();
    }
    let args = ["--enable-torrent", "--model", &pin, "--bootstrap", &seed.addr];
    let pinned = NodeProc::start(&pinned_dir, &args);
    wait_for(WAIT, || (pinned.call("STATUS", json!({}))["result"]["model"]["manifest"] == json!(pin)).then_some(()));
    // A tampered shard-0.gguf, whole torrent or magnet: refused before any file is made.
    let r = download(&pinned, &evil, &[&seed.addr]);
    assert_eq!(r["code"], "MANIFEST_MISMATCH", "{r}");
    let r = pinned.call("DOWNLOAD", json!({"info_hash": evil.info_hash.to_hex(), "peers": [seed.addr]}));
    assert_eq!(r["code"], "MANIFEST_MISMATCH", "{r}");
    // A zero-length squat of shard-2's name (no peer needed) is refused as well.
    let empty = shardnet::torrent::Metainfo::new(shardnet::torrent::metainfo::Info {
        name: "shard-2.gguf".into(),
        length: 0,
        piece_length: 262144,
        pieces: vec![],
    });
    // (the torrent itself is refused first: a zero-length file has nothing to share)
    let r = download(&pinned, &empty, &["127.0.0.1:9"]);
    assert_eq!(r["code"], "WRONG_TYPE", "{r}");
    assert!(!pinned_dir.join("shard-0.gguf").exists() && !pinned_dir.join("shard-2.gguf").exists());
    drop(pinned);

    // A tampered file already in the shards dir under the shard's name: listed with a mismatch,
    // never announced under the name key, and LOAD_SHARD says why instead of NAME_CONFLICT.
    std::fs::copy(evil_dir.join("shard-0.gguf"), pinned_dir.join("shard-0.gguf")).unwrap();
    let pinned = NodeProc::start(&pinned_dir, &args);
    pinned.wait_metadata();
    let f = listed(&pinned, "shard-0.gguf");
    assert_eq!(f["info_hash"], json!(evil.info_hash.to_hex()), "{f}");
    assert!(f["mismatch"].as_str().is_some_and(|m| m.contains(&manifest_info_hash(&honest, 0))), "{f}");
    assert!(listed(&pinned, "shard-1.gguf").get("mismatch").is_none());
    let r = wait_for(WAIT, || {
        let r = pinned.call("LOAD_SHARD", json!({"shard_id": 0}));
        (r["code"] != "BUSY").then_some(r)
    });
    assert_eq!(r["code"], "MANIFEST_MISMATCH", "{r}");
    let r = pinned.call("EXECUTE_TASK", json!({"session_id": "s", "shard_id": 0, "input": {"tokens": [1]}}));
    assert_eq!(r["code"], "MANIFEST_MISMATCH", "{r}");
    // Announced under its own info hash (and the manifest's key), never under shard-0's name.
    let holds = |params: Value| {
        let r = seed.call("FIND_PEERS", params);
        r["result"]["peers"].as_array().cloned().unwrap_or_default().contains(&json!(pinned.addr))
    };
    wait_for(Duration::from_secs(30), || holds(json!({"key": evil.info_hash.to_hex()})).then_some(()));
    wait_for(Duration::from_secs(30), || holds(json!({"shard_id": 1})).then_some(()));
    assert!(!holds(json!({"shard_id": 0})), "the squatter is announced as shard-0.gguf");
    let s = pinned.call("STATUS", json!({}));
    assert!(s["result"]["shards_loaded"].as_array().unwrap().is_empty(), "{s}");
    pinned.assert_serving();
}

#[test]
fn an_unpinned_node_with_a_manifest_refuses_a_shard_of_another_info_hash() {
    let dir = TempDir::new("trust-unpinned");
    let honest = dir.path().join("honest");
    split_model(dir.path(), 42, &honest);
    let evil_dir = dir.path().join("evil");
    std::fs::create_dir_all(&evil_dir).unwrap();
    let evil = tampered_shard(&honest.join("shard-0.gguf"), &evil_dir.join("shard-0.gguf"));
    let seed = NodeProc::start(&evil_dir, &["--enable-torrent"]);
    seed.wait_metadata();
    // Unpinned, with the model's manifest.json and shard 1: the tampered shard 0 downloads (no
    // pin refuses it) but never loads.
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).unwrap();
    for f in ["manifest.json", "shard-1.gguf"] {
        std::fs::copy(honest.join(f), node_dir.join(f)).unwrap();
    }
    let node = NodeProc::start(&node_dir, &["--enable-torrent", "--threads", "1"]);
    node.wait_metadata();
    let r = download(&node, &evil, &[&seed.addr]);
    assert_eq!(r["status"], "success", "{r}");
    let evil_hex = json!(evil.info_hash.to_hex());
    wait_for(Duration::from_secs(30), || (listed(&node, "shard-0.gguf")["info_hash"] == evil_hex).then_some(()));
    let want = manifest_info_hash(&honest, 0);
    let r = node.call("LOAD_SHARD", json!({"shard_id": 0}));
    assert_eq!(r["code"], "MANIFEST_MISMATCH", "{r}");
    assert!(r["error"].as_str().unwrap().contains(&want), "{r}");
    let r = node.call(
        "EXECUTE_TASK",
        json!({"session_id": "s", "shard_id": 0, "input": {"tokens": [1, 2]}, "output": "hidden"}),
    );
    assert_eq!(r["code"], "MANIFEST_MISMATCH", "{r}");
    assert!(listed(&node, "shard-0.gguf")["mismatch"].is_string());
    let s = node.call("STATUS", json!({}));
    assert!(s["result"]["shards_loaded"].as_array().unwrap().is_empty(), "{s}");
    // The shard the manifest names loads.
    let r = node.call("LOAD_SHARD", json!({"shard_id": 1}));
    assert_eq!(r["status"], "success", "{r}");
    node.assert_serving();
}
