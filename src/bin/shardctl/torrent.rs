//! `.torrent` files (`torrent create|info|magnet`) and `fetch`, which downloads
//! one through a node of its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use shardnet::client::Client;
use shardnet::torrent::{Metainfo, create};
use shardnet::workers::WorkerPool;

use crate::args::usage;
use crate::node::progress_line;
use crate::{Opts, print_json};

pub fn read_torrent(file: &str) -> Result<Metainfo> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {file}"))?;
    Metainfo::parse(&bytes).with_context(|| format!("parsing {file}"))
}

pub fn torrent_create(o: &Opts, file: &str, flags: &[&str]) -> Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut piece_length = None;
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        match *f {
            "--out" => {
                out = Some(PathBuf::from(it.next().ok_or_else(|| usage("torrent create: --out needs a value".into()))?))
            }
            "--piece-length" => {
                let v = it.next().ok_or_else(|| usage("torrent create: --piece-length needs a value".into()))?;
                let n: u64 = v
                    .parse()
                    .ok()
                    .filter(|n: &u64| n.is_power_of_two() && (16384..=(64 << 20)).contains(n))
                    .ok_or_else(|| {
                    usage(format!("torrent create: --piece-length {v:?} is not a power of two from 16 KiB to 64 MiB"))
                })?;
                piece_length = Some(n);
            }
            other => return Err(usage(format!("torrent create: unknown flag {other} (see --help)"))),
        }
    }
    let path = Path::new(file);
    if !path.is_file() {
        bail!("{file} is not a file");
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = WorkerPool::new("hash", threads);
    let m = create::create(path, piece_length, &pool.handle())?;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{file}.torrent")));
    std::fs::write(&out, m.to_torrent_bytes()).with_context(|| format!("writing {}", out.display()))?;
    if o.json {
        print_json(
            &json!({"torrent": out.display().to_string(), "info_hash": m.info_hash.to_hex(), "magnet": m.magnet()}),
        );
    } else {
        println!("{} -> {} (info hash {})", file, out.display(), m.info_hash);
    }
    Ok(())
}

pub fn torrent_info(o: &Opts, file: &str) -> Result<()> {
    let m = read_torrent(file)?;
    let info = &m.info;
    if o.json {
        print_json(&json!({
            "name": info.name, "length": info.length, "piece_length": info.piece_length,
            "pieces": info.pieces.len(), "info_hash": m.info_hash.to_hex(), "magnet": m.magnet(),
            "created_by": m.created_by, "creation_date": m.creation_date,
        }));
        return Ok(());
    }
    println!("name          {}", info.name);
    println!("info hash     {}", m.info_hash);
    println!("length        {} bytes", info.length);
    println!("piece length  {} bytes", info.piece_length);
    println!("pieces        {}", info.pieces.len());
    if let Some(by) = &m.created_by {
        println!("created by    {by}");
    }
    println!("magnet        {}", m.magnet());
    Ok(())
}

/// `shardctl fetch`: runs a node of its own (it serves what it has while it
/// runs), asks it to DOWNLOAD, and shows progress until the file is complete.
pub fn fetch(o: &Opts, target: &str, flags: &[&str]) -> Result<()> {
    use shardnet::config::NodeConfig;
    use shardnet::node::Node;
    use shardnet::torrent::Magnet;
    let mut peers = Vec::new();
    let mut out = None;
    let mut listen = "127.0.0.1:0".to_string();
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        let mut value = || it.next().copied().ok_or_else(|| usage(format!("fetch: {f} needs a value")));
        match *f {
            "--peer" => peers.push(value()?.to_string()),
            "--out" => out = Some(value()?.to_string()),
            "--listen" => listen = value()?.to_string(),
            other => return Err(usage(format!("fetch: unknown flag {other} (see --help)"))),
        }
    }
    let out = out.ok_or_else(|| usage("fetch: missing --out DIR".into()))?;
    // A magnet link's x.pe hints count as peers.
    let missing_peers = || usage("fetch: missing --peer IP:PORT (at least one)".into());
    if peers.is_empty() && !target.starts_with("magnet:") {
        return Err(missing_peers());
    }
    let (info_hash, torrent_hex) = if target.starts_with("magnet:") {
        let m = Magnet::parse(target).map_err(|e| usage(format!("fetch: {e}")))?;
        peers.extend(m.peers); // x.pe hints
        (m.info_hash, None)
    } else {
        let bytes = std::fs::read(target).with_context(|| format!("reading {target}"))?;
        let m = Metainfo::parse(&bytes).with_context(|| format!("parsing {target}"))?;
        (m.info_hash, Some(shardnet::hash::to_hex(&bytes)))
    };
    if peers.is_empty() {
        return Err(missing_peers());
    }
    let config = NodeConfig {
        listen: listen.parse().map_err(|_| usage(format!("fetch: --listen {listen:?} is not IP:PORT")))?,
        shards_dir: PathBuf::from(&out),
        enable_torrent: true,
        log_level: shardnet::log::Level::Warn,
        ..NodeConfig::default()
    };
    shardnet::log::set_level(config.log_level);
    let mut node = Node::bind(config)?;
    let addr = node.local_addr().to_string();
    std::thread::spawn(move || node.run());
    let mut c = Client::connect(&addr, o.timeout)?;
    let mut params = json!({"info_hash": info_hash.to_hex(), "peers": peers});
    if let Some(hex) = torrent_hex {
        params["torrent_hex"] = json!(hex);
    }
    let started = std::time::Instant::now();
    let r = c.call("DOWNLOAD", params)?;
    if r["status"] == "complete" {
        println!("{} is already complete in {out}", info_hash);
        return Ok(());
    }
    let mut last_progress = (0u64, std::time::Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let s = c.call("STATUS", json!({}))?;
        let d = s["downloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["info_hash"] == info_hash.to_hex().as_str())
            .cloned()
            .unwrap_or(Value::Null);
        let total = d["bytes"].as_u64().unwrap_or(0);
        let done = d["verified_bytes"].as_u64().unwrap_or(0);
        let secs = started.elapsed().as_secs_f64();
        if let Some(e) = d["error"].as_str() {
            eprintln!();
            bail!("download failed: {e}");
        }
        if !o.json {
            eprint!("\r{}", progress_line(&d, started));
        }
        if d["complete"] == json!(true) {
            // The node's own clock: from the download's start to its last piece.
            let secs = d["seconds"].as_f64().unwrap_or(secs);
            if o.json {
                print_json(
                    &json!({"info_hash": info_hash.to_hex(), "name": d["name"], "bytes": total, "seconds": secs, "path": format!("{out}/{}", d["name"].as_str().unwrap_or("?"))}),
                );
            } else {
                eprintln!();
                println!(
                    "{} complete: {total} bytes in {secs:.2} s ({:.1} MB/s), every piece verified",
                    d["name"].as_str().unwrap_or("?"),
                    total as f64 / secs / 1e6
                );
            }
            return Ok(());
        }
        if done > last_progress.0 {
            last_progress = (done, std::time::Instant::now());
        } else if last_progress.1.elapsed() > o.timeout {
            eprintln!();
            bail!("no progress for {} s ({} peers connected)", o.timeout.as_secs(), d["peers"]);
        }
    }
}
