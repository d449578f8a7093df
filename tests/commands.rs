//! Every command's happy path, through a real node process on loopback.

mod common;

use common::*;
use serde_json::json;
use shardnet::torrent::Metainfo;

fn shards_dir(n: u32) -> TempDir {
    let dir = TempDir::new("cmd");
    for i in 0..n {
        write_shard(&dir.path().join(format!("shard-{i}.gguf")), i, n, (i * 2, i * 2 + 2), 300_000);
    }
    dir
}

#[test]
fn list_files_reports_every_gguf_with_info_hash_and_size() {
    let dir = shards_dir(3);
    std::fs::write(dir.path().join("notes.txt"), "not a shard").unwrap();
    let node = NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    let r = node.call("LIST_FILES", json!({}));
    assert_eq!(r["status"], "success");
    assert_eq!(r["command"], "LIST_FILES");
    let files = r["result"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 3, "{r}");
    for (i, f) in files.iter().enumerate() {
        let name = format!("shard-{i}.gguf");
        assert_eq!(f["filename"], name.as_str());
        let path = dir.path().join(&name);
        assert_eq!(f["size"], std::fs::metadata(&path).unwrap().len());
        assert_eq!(f["shard_id"], i);
        assert_eq!(f["layers"], json!([i * 2, i * 2 + 2]));
        assert_eq!(f["complete"], true);
        // The info hash is that of the .torrent saved beside the shard.
        let m = Metainfo::parse(&std::fs::read(dir.path().join(format!("{name}.torrent"))).unwrap()).unwrap();
        assert_eq!(f["info_hash"], m.info_hash.to_hex().as_str());
        assert_eq!(m.info.length, f["size"].as_u64().unwrap());
    }
}

#[test]
fn status_describes_the_node() {
    let dir = shards_dir(2);
    let node = NodeProc::start(
        dir.path(),
        &[
            "--cluster",
            "llama-cluster",
            "--total-shards",
            "2",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/51820",
            "--enable-torrent",
        ],
    );
    let s = node.wait_metadata();
    assert_eq!(s["cluster"], "llama-cluster");
    assert_eq!(s["address"], node.addr.as_str());
    assert_eq!(s["node_id"].as_str().unwrap().len(), 40);
    assert_eq!(s["torrent_enabled"], true);
    assert_eq!(s["total_shards"], 2);
    assert_eq!(s["bootstrap"], json!(["127.0.0.1:51820"]));
    assert_eq!(s["metadata"]["files"], 2);
    assert_eq!(s["metadata"]["ready"], 2);
    assert_eq!(s["shards_seeded"], json!(["shard-0.gguf", "shard-1.gguf"]));
    assert!(s["uptime_ms"].as_u64().is_some());
}

#[test]
fn load_shard_maps_a_local_file_then_answers_from_the_cache() {
    let dir = shards_dir(2);
    let node = NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    let r = node.call("LOAD_SHARD", json!({"shard_id": 1}));
    assert_eq!(r["status"], "success", "{r}");
    let res = &r["result"];
    assert_eq!(res["shard_id"], 1);
    assert_eq!(res["status"], "loaded");
    assert_eq!(res["source"], "local");
    assert_eq!(res["layers"], json!([2, 4]));
    assert!(res["path"].as_str().unwrap().ends_with("shard-1.gguf"));
    let again = node.call("LOAD_SHARD", json!({"shard_id": 1}));
    assert_eq!(again["result"]["source"], "cache");
    let s = node.call("STATUS", json!({}));
    assert_eq!(s["result"]["shards_loaded"][0]["shard_id"], 1);
    // By file name, with the matching info hash.
    let hash = node.call("LIST_FILES", json!({}))["result"]["files"][0]["info_hash"].clone();
    let r = node.call("LOAD_SHARD", json!({"shard_id": 0, "filename": "shard-0.gguf", "info_hash": hash}));
    assert_eq!(r["result"]["source"], "local", "{r}");
}

#[test]
fn load_shard_of_an_absent_file_answers_the_notes_error() {
    let dir = shards_dir(1);
    let node = NodeProc::start(dir.path(), &[]);
    let r = node.call("LOAD_SHARD", json!({"shard_id": 5}));
    assert_eq!(r["status"], "error");
    assert_eq!(r["error"], "Shard 5 not found. Torrent download required.");
    assert_eq!(r["code"], "SHARD_NOT_FOUND");
}

#[test]
fn load_shard_finds_a_file_added_after_startup() {
    let dir = shards_dir(1);
    let node = NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    write_shard(&dir.path().join("shard-7.gguf"), 7, 8, (7, 8), 0);
    let r = node.call("LOAD_SHARD", json!({"shard_id": 7}));
    assert_eq!(r["result"]["status"], "loaded", "{r}");
}

#[test]
fn shard_id_flag_preloads_the_nodes_shard() {
    let dir = shards_dir(2);
    let node = NodeProc::start(dir.path(), &["--shard-id", "1", "--total-shards", "2"]);
    wait_for(WAIT, || {
        let s = node.call("STATUS", json!({}));
        (s["result"]["shards_loaded"].as_array().unwrap().len() == 1).then_some(())
    });
    assert_eq!(node.call("LOAD_SHARD", json!({"shard_id": 1}))["result"]["source"], "cache");
}

#[test]
fn an_unparseable_gguf_is_listed_and_seeded_but_never_loaded() {
    let dir = shards_dir(1);
    let mut bytes = std::fs::read(dir.path().join("shard-0.gguf")).unwrap();
    bytes.truncate(100);
    std::fs::write(dir.path().join("shard-3.gguf"), &bytes).unwrap();
    let node = NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    let files = node.call("LIST_FILES", json!({}))["result"]["files"].clone();
    let bad = files.as_array().unwrap().iter().find(|f| f["filename"] == "shard-3.gguf").unwrap().clone();
    assert!(bad["error"].as_str().unwrap().contains("GGUF"), "{bad}");
    assert_eq!(bad["info_hash"].as_str().unwrap().len(), 40, "seeded as a file: {bad}");
    assert_eq!(bad["size"], 100);
    let r = node.call("LOAD_SHARD", json!({"shard_id": 3}));
    assert_eq!(r["code"], "SHARD_INVALID", "{r}");
    assert!(node.stderr().contains("shard-3.gguf: GGUF"), "the log says why: {}", node.stderr());
}

#[test]
fn a_gguf_holding_another_shard_index_is_not_loaded_under_the_wrong_id() {
    let dir = TempDir::new("cmd");
    write_shard(&dir.path().join("model.gguf"), 4, 8, (4, 5), 0);
    let node = NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    let r = node.call("LOAD_SHARD", json!({"shard_id": 2, "filename": "model.gguf"}));
    assert_eq!(r["code"], "SHARD_INVALID", "{r}");
    // shard.index wins over the file name.
    let r = node.call("LOAD_SHARD", json!({"shard_id": 4}));
    assert_eq!(r["result"]["path"].as_str().map(|p| p.ends_with("model.gguf")), Some(true), "{r}");
}

#[test]
fn many_requests_in_flight_on_one_connection_all_get_their_answer() {
    let dir = shards_dir(3);
    let node = NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    let mut s = node.raw();
    let mut ids = Vec::new();
    for i in 0..30 {
        let (cmd, params) = match i % 3 {
            0 => ("LOAD_SHARD", json!({"shard_id": i % 4})),
            1 => ("STATUS", json!({})),
            _ => ("LIST_FILES", json!({})),
        };
        let id = format!("r{i}");
        send_frame(
            &mut s,
            serde_json::to_vec(&json!({"command": cmd, "request_id": id, "params": params})).unwrap().as_slice(),
        );
        ids.push(id);
    }
    let mut seen: Vec<String> =
        (0..30).map(|_| read_frame(&mut s)["request_id"].as_str().unwrap().to_string()).collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
}

#[test]
fn load_shard_without_wait_answers_at_once() {
    let dir = shards_dir(1);
    let node = NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    let r = node.call("LOAD_SHARD", json!({"shard_id": 0, "wait": false}));
    assert_eq!(r["result"]["status"], "loading", "{r}");
    wait_for(WAIT, || {
        let r = node.call("LOAD_SHARD", json!({"shard_id": 0}));
        (r["result"]["source"] == "cache").then_some(())
    });
}

#[test]
fn shardctl_talks_to_the_node() {
    let dir = shards_dir(2);
    let node = NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardctl"))
            .args(["--node", &node.addr, "--timeout", "20"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, _) = ctl(&["list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("shard-0.gguf") && out.contains("shard-1.gguf") && out.contains("INFO HASH"), "{out}");
    let (code, out, _) = ctl(&["--json", "list"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    let (code, out, _) = ctl(&["load", "1"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("shard 1 loaded"), "{out}");
    let (code, out, _) = ctl(&["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("loaded    1 (shard-1.gguf)"), "{out}");
    let (code, out, _) = ctl(&["send", r#"{"command":"STATUS","request_id":"x"}"#]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"request_id\": \"x\""), "{out}");
    let (code, _, err) = ctl(&["load", "9"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Shard 9 not found. Torrent download required."), "{err}");
    let (code, _, err) = ctl(&["frob"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown command \"frob\""), "{err}");
}

#[test]
fn shardctl_torrent_create_info_and_magnet_agree_with_the_node() {
    let dir = shards_dir(1);
    let node = NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    let node_hash = node.call("LIST_FILES", json!({}))["result"]["files"][0]["info_hash"].as_str().unwrap().to_string();
    let shard = dir.path().join("shard-0.gguf");
    let out_path = dir.path().join("made.torrent");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_shardctl")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    run(&["torrent", "create", shard.to_str().unwrap(), "--out", out_path.to_str().unwrap()]);
    let m = Metainfo::parse(&std::fs::read(&out_path).unwrap()).unwrap();
    assert_eq!(m.info_hash.to_hex(), node_hash);
    let info = run(&["torrent", "info", out_path.to_str().unwrap()]);
    assert!(info.contains(&node_hash) && info.contains("shard-0.gguf"), "{info}");
    let magnet = run(&["torrent", "magnet", out_path.to_str().unwrap()]);
    assert_eq!(magnet.trim(), format!("magnet:?xt=urn:btih:{node_hash}&dn=shard-0.gguf&xl={}", m.info.length));
}
