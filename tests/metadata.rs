//! Torrent metadata: agreement with standard BitTorrent tools, and the cache
//! that lets a restart skip hashing.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;
use shardnet::torrent::Metainfo;

fn node_hashes(node: &NodeProc) -> Vec<(String, String)> {
    node.wait_metadata();
    let r = node.call("LIST_FILES", json!({}));
    r["result"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["filename"].as_str().unwrap().to_string(), f["info_hash"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
#[ignore = "needs transmission-show"]
fn transmission_show_reads_the_nodes_torrents_with_the_same_info_hash() {
    require("transmission-show");
    let dir = TempDir::new("meta");
    // Sizes on and off piece boundaries, one piece, and a multi-piece file.
    write_shard(&dir.path().join("shard-0.gguf"), 0, 3, (0, 1), 10);
    write_shard(&dir.path().join("shard-1.gguf"), 1, 3, (1, 2), 3 * 256 * 1024);
    write_shard(&dir.path().join("shard-2.gguf"), 2, 3, (2, 3), 2 * 1024 * 1024 + 4321);
    let node = NodeProc::start(dir.path(), &[]);
    for (name, hash) in node_hashes(&node) {
        let torrent = dir.path().join(format!("{name}.torrent"));
        let out = Command::new("transmission-show").arg(&torrent).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(&format!("Hash: {hash}")), "{name}: {text}");
        assert!(text.contains(&format!("Name: {name}")), "{text}");
        let size = std::fs::metadata(dir.path().join(&name)).unwrap().len();
        let pieces = size.div_ceil(256 * 1024);
        assert!(text.contains(&format!("Piece Count: {pieces}")), "{text}");
    }
}

#[test]
#[ignore = "needs mktorrent"]
fn mktorrent_builds_the_same_info_hash_as_the_node() {
    require("mktorrent");
    let dir = TempDir::new("meta");
    write_shard(&dir.path().join("shard-0.gguf"), 0, 2, (0, 1), 1_000_000);
    write_shard(&dir.path().join("shard-1.gguf"), 1, 2, (1, 2), 12_345);
    let node = NodeProc::start(dir.path(), &[]);
    let out_dir = TempDir::new("mktorrent");
    for (name, hash) in node_hashes(&node) {
        let ours = Metainfo::parse(&std::fs::read(dir.path().join(format!("{name}.torrent"))).unwrap()).unwrap();
        let exp = ours.info.piece_length.trailing_zeros().to_string();
        let theirs_path = out_dir.path().join(format!("{name}.torrent"));
        let out = Command::new("mktorrent")
            .args(["-l", &exp, "-o"])
            .arg(&theirs_path)
            .arg(dir.path().join(&name))
            .output()
            .unwrap();
        assert!(out.status.success(), "mktorrent: {}", String::from_utf8_lossy(&out.stderr));
        let theirs = Metainfo::parse(&std::fs::read(&theirs_path).unwrap()).unwrap();
        assert_eq!(theirs.info, ours.info, "{name}");
        assert_eq!(theirs.info_hash.to_hex(), hash, "{name}");
    }
}

#[test]
#[ignore = "needs aria2c"]
fn aria2_lists_the_files_of_the_nodes_torrents() {
    require("aria2c");
    let dir = TempDir::new("meta");
    write_shard(&dir.path().join("shard-0.gguf"), 0, 1, (0, 1), 700_000);
    let node = NodeProc::start(dir.path(), &[]);
    let (name, hash) = node_hashes(&node).remove(0);
    let out =
        Command::new("aria2c").arg("--show-files").arg(dir.path().join(format!("{name}.torrent"))).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&hash), "{text}");
    assert!(text.contains(&name), "{text}");
}

#[test]
fn restart_reuses_cached_metadata_without_rehashing() {
    let dir = TempDir::new("meta");
    for i in 0..3 {
        write_shard(&dir.path().join(format!("shard-{i}.gguf")), i, 3, (i, i + 1), 500_000);
    }
    let mut first = NodeProc::start(dir.path(), &[]);
    let s = first.wait_metadata();
    assert_eq!((s["metadata"]["hashed"].clone(), s["metadata"]["cached"].clone()), (json!(3), json!(0)));
    let hashes = node_hashes(&first);
    first.kill();

    let mut second = NodeProc::start(dir.path(), &[]);
    let s = second.wait_metadata();
    assert_eq!((s["metadata"]["hashed"].clone(), s["metadata"]["cached"].clone()), (json!(0), json!(3)), "{s}");
    assert_eq!(s["metadata"]["scan"]["bytes_hashed"], 0);
    assert_eq!(node_hashes(&second), hashes);
    second.kill();

    // A file whose content (and so mtime) changed is hashed again; the rest is not.
    std::thread::sleep(Duration::from_millis(20));
    write_shard(&dir.path().join("shard-1.gguf"), 1, 3, (1, 2), 600_000);
    let third = NodeProc::start(dir.path(), &[]);
    let s = third.wait_metadata();
    assert_eq!((s["metadata"]["hashed"].clone(), s["metadata"]["cached"].clone()), (json!(1), json!(2)), "{s}");
    let new = node_hashes(&third);
    assert_eq!(new[0], hashes[0]);
    assert_ne!(new[1], hashes[1]);
    assert_eq!(new[2], hashes[2]);
}

#[test]
fn a_corrupt_or_foreign_cached_torrent_is_rebuilt() {
    let dir = TempDir::new("meta");
    write_shard(&dir.path().join("shard-0.gguf"), 0, 1, (0, 1), 100_000);
    let mut first = NodeProc::start(dir.path(), &[]);
    let hash = node_hashes(&first)[0].1.clone();
    first.kill();
    // Valid torrents of other files: another name, and the same name and length with other
    // bytes (a file copied in from another node's dir, say).
    let other = TempDir::new("meta-other");
    write_shard(&other.path().join("other.gguf"), 0, 1, (0, 1), 100_000);
    write_shard(&other.path().join("shard-0.gguf"), 5, 1, (0, 1), 100_000);
    assert_eq!(
        std::fs::metadata(other.path().join("shard-0.gguf")).unwrap().len(),
        std::fs::metadata(dir.path().join("shard-0.gguf")).unwrap().len()
    );
    let mut o = NodeProc::start(other.path(), &[]);
    let other_hashes = node_hashes(&o);
    o.kill();
    let foreign_name = std::fs::read(other.path().join("other.gguf.torrent")).unwrap();
    let foreign_bytes = std::fs::read(other.path().join("shard-0.gguf.torrent")).unwrap();
    assert!(other_hashes.iter().all(|(_, h)| *h != hash));
    for (what, cached) in
        [("corrupt", b"d4:info".to_vec()), ("another file's", foreign_name), ("other bytes'", foreign_bytes)]
    {
        std::fs::write(dir.path().join("shard-0.gguf.torrent"), &cached).unwrap();
        let mut node = NodeProc::start(dir.path(), &[]);
        let s = node.wait_metadata();
        assert_eq!(s["metadata"]["hashed"], 1, "{what} torrent trusted: {s}");
        assert_eq!(node_hashes(&node)[0].1, hash, "{what} torrent");
        node.kill();
    }
}
