//! `make bench` part 3: the BitTorrent piece exchange on loopback.
//! Writes `target/bench/torrent.json`.
//!
//! (a) a 1 GiB file, one seed to one leech, every piece verified: GB/s and
//!     CPU-seconds per GB, against `aria2c` downloading the same file from the
//!     node, and against our leech writing through the page cache
//!     (`--cached-writes`) (alternating, medians of 3);
//! (b) one seed and seven leeches, every node's upload limited to R: time for
//!     all seven to finish over the time one seed needs to send the file once;
//! (c) a full recheck of the 1 GiB file (page cache warm) against one core's
//!     SHA-1 rate;
//! (d) peak anonymous resident memory of the leech, for 256 MiB and 1 GiB;
//! (e) the same 1 GiB transfer encrypted (the leech with `--encryption require`: MSE with an
//!     RC4 payload), alternating with (a)'s plaintext one in the same run: GB/s and CPU-s/GB.
//! (f) 256 MiB through a relay that delays each direction by half a round trip
//!     (`common::delaying_relay`), at 0.1 ms and at 80 ms: MB/s (medians of 3,
//!     alternating) and the most bytes in flight.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{NodeProc, TempDir, delaying_relay, tracker, wait_for};
use serde_json::{Value, json};
use shardnet::torrent::Metainfo;

const GIB: u64 = 1 << 30;

fn write_random(path: &Path, size: u64, seed: u64) {
    let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path).unwrap());
    common::write_random(&mut f, size, &mut (0x9e37_79b9_7f4a_7c15 ^ seed)).unwrap();
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Samples a process's anonymous RSS every 5 ms until stopped; returns the peak.
fn watch_rss(pid: u32) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let peak = AtomicU64::new(0);
        while !s.load(Ordering::Relaxed) {
            peak.fetch_max(rss_anon_kib(pid), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
        peak.load(Ordering::Relaxed)
    });
    (stop, h)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn seed_node(dir: &Path, extra: &[&str]) -> (NodeProc, Metainfo) {
    let mut args = vec!["--enable-torrent", "--log-level", "warn"];
    args.extend_from_slice(extra);
    let node = NodeProc::start(dir, &args);
    wait_for(Duration::from_secs(120), || {
        let s = node.call("STATUS", json!({}));
        (s["result"]["metadata"]["scan_done"] == json!(true)).then_some(())
    });
    let name = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "torrent"))
        .unwrap();
    let m = Metainfo::parse(&std::fs::read(name).unwrap()).unwrap();
    (node, m)
}

/// Starts a DOWNLOAD of `m` from `peers` and waits for it; returns its
/// STATUS entry (`seconds`: the node's own time from start to last piece).
fn download(leech: &NodeProc, m: &Metainfo, peers: &[&str]) -> Value {
    let hex = shardnet::hash::to_hex(&m.to_torrent_bytes());
    let r = leech.call("DOWNLOAD", json!({"info_hash": m.info_hash.to_hex(), "torrent_hex": hex, "peers": peers}));
    assert_eq!(r["status"], "success", "{r}");
    wait_for(Duration::from_secs(300), || {
        let s = leech.call("STATUS", json!({}));
        s["result"]["downloads"].as_array().and_then(|d| {
            d.iter().find(|d| d["info_hash"] == m.info_hash.to_hex().as_str() && d["complete"] == json!(true)).cloned()
        })
    })
}

/// One seed to one leech: seconds, leech CPU-s, seed CPU-s, peak anon KiB.
fn one_transfer(seed: &NodeProc, m: &Metainfo, leech_flags: &[&str]) -> (f64, f64, f64, u64) {
    let ld = TempDir::new("bench-leech");
    let mut flags = vec!["--enable-torrent", "--log-level", "warn"];
    flags.extend_from_slice(leech_flags);
    let leech = NodeProc::start(ld.path(), &flags);
    let (c0l, c0s) = (cpu_seconds(leech.child.id()), cpu_seconds(seed.child.id()));
    let (stop, rss) = watch_rss(leech.child.id());
    let t = Instant::now();
    download(&leech, m, &[&seed.addr]);
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peak = rss.join().unwrap();
    let (c1l, c1s) = (cpu_seconds(leech.child.id()), cpu_seconds(seed.child.id()));
    (secs, c1l - c0l, c1s - c0s, peak)
}

/// aria2c downloading from the node; seconds, or None without aria2c.
fn aria2_transfer(torrent: &Path, announce: &str) -> Option<f64> {
    let out = TempDir::new("bench-aria");
    let t = Instant::now();
    let status = Command::new("aria2c")
        .args([
            "--enable-dht=false",
            "--bt-enable-lpd=false",
            "--seed-time=0",
            "--quiet=true",
            "--file-allocation=none",
        ])
        .arg(format!("--bt-tracker={announce}"))
        .arg(format!("--dir={}", out.path().display()))
        .arg(torrent)
        .status()
        .ok()?;
    status.success().then(|| t.elapsed().as_secs_f64())
}

/// One core's SHA-1 rate (GB/s) with `f`.
fn single_thread_sha1_gb_s(f: fn(&[u8]) -> shardnet::hash::Digest) -> f64 {
    let buf: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let rates: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f(&buf));
            buf.len() as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(rates)
}

/// Touches and frees `bytes` of memory. On a VM, guest memory touched for the
/// first time costs a hypervisor fault per page (here: 0.27-0.44 GB/s writing
/// into new page cache, 7.4 GB/s over cached pages), and this VM's balloon
/// reports freed pages back to the host (virtio free page reporting), so they
/// are new again a few seconds after being freed. Touching memory first gives
/// the page-cache writes of `--cached-writes` their best case; the default
/// leech writes with direct I/O and hardly depends on it.
fn warm_guest_memory(bytes: usize) {
    let mut v: Vec<u8> = vec![0; bytes];
    for i in (0..bytes).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
}

fn main() {
    let mut report = serde_json::Map::new();
    warm_guest_memory(6 << 30);
    let sd = TempDir::new("bench-seed");
    write_random(&sd.path().join("blob.gguf"), GIB, 1);
    let (seed, m) = seed_node(sd.path(), &[]);
    let torrent = sd.path().join("blob.gguf.torrent");
    let port: u16 = seed.addr.rsplit(':').next().unwrap().parse().unwrap();
    let announce = tracker(port);

    // (a) and (d)
    let (mut ours, mut aria, mut cpu_leech, mut cpu_seed, mut peaks) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut cached, mut cpu_cached) = (vec![], vec![]);
    let (mut rc4, mut rc4_cpu_leech, mut rc4_cpu_seed) = (vec![], vec![], vec![]);
    for _ in 0..3 {
        let (secs, cl, cs, peak) = one_transfer(&seed, &m, &[]);
        ours.push(GIB as f64 / secs / 1e9);
        cpu_leech.push(cl / (GIB as f64 / 1e9));
        cpu_seed.push(cs / (GIB as f64 / 1e9));
        peaks.push(peak);
        if let Some(s) = aria2_transfer(&torrent, &announce) {
            aria.push(GIB as f64 / s / 1e9);
        }
        let (secs, cl, _, _) = one_transfer(&seed, &m, &["--cached-writes"]);
        cached.push(GIB as f64 / secs / 1e9);
        cpu_cached.push(cl / (GIB as f64 / 1e9));
        let (secs, cl, cs, _) = one_transfer(&seed, &m, &["--encryption", "require"]);
        rc4.push(GIB as f64 / secs / 1e9);
        rc4_cpu_leech.push(cl / (GIB as f64 / 1e9));
        rc4_cpu_seed.push(cs / (GIB as f64 / 1e9));
    }
    let rc4_status = &seed.call("STATUS", json!({}))["result"]["encryption"];
    assert!(rc4_status["rc4"].as_u64().unwrap_or(0) >= 3, "the encrypted transfers were not RC4: {rc4_status}");
    let (cached_m, cpu_cached_m) = (median(cached.clone()), median(cpu_cached));
    let (ours_m, cl_m, cs_m) = (median(ours.clone()), median(cpu_leech.clone()), median(cpu_seed.clone()));
    let aria_m = (!aria.is_empty()).then(|| median(aria.clone()));
    println!(
        "(a) 1 GiB seed -> leech: {ours_m:.2} GB/s; leech {cl_m:.2} CPU-s/GB, seed {cs_m:.2} CPU-s/GB; aria2c from the node: {}",
        aria_m.map_or("n/a".into(), |a| format!("{a:.2} GB/s, ratio {:.2}x", ours_m / a))
    );
    println!(
        "    the leech with --cached-writes: {cached_m:.2} GB/s, {cpu_cached_m:.2} CPU-s/GB; direct I/O is {:.2}x faster",
        ours_m / cached_m
    );
    let (rc4_m, rc4_cl, rc4_cs) = (median(rc4.clone()), median(rc4_cpu_leech), median(rc4_cpu_seed));
    println!(
        "(e) the same, encrypted (MSE, RC4): {rc4_m:.2} GB/s; leech {rc4_cl:.2} CPU-s/GB, seed {rc4_cs:.2} CPU-s/GB; \
         plaintext is {:.2}x faster",
        ours_m / rc4_m
    );
    report.insert(
        "e_one_seed_one_leech_1gib_rc4".into(),
        json!({"gb_s": rc4_m, "gb_s_all": rc4, "leech_cpu_s_per_gb": rc4_cl, "seed_cpu_s_per_gb": rc4_cs,
               "plaintext_over_rc4": ours_m / rc4_m}),
    );
    report.insert(
        "a_one_seed_one_leech_1gib".into(),
        json!({"gb_s": ours_m, "gb_s_all": ours, "leech_cpu_s_per_gb": cl_m, "seed_cpu_s_per_gb": cs_m,
               "aria2c_gb_s": aria_m, "aria2c_gb_s_all": aria, "ours_over_aria2c": aria_m.map(|a| ours_m / a),
               "cached_writes_gb_s": cached_m, "cached_writes_gb_s_all": cached,
               "cached_writes_leech_cpu_s_per_gb": cpu_cached_m, "direct_over_cached": ours_m / cached_m}),
    );

    // (d) a smaller file too: memory should not grow with the file.
    let small_dir = TempDir::new("bench-small");
    write_random(&small_dir.path().join("small.gguf"), GIB / 4, 2);
    let (small_seed, small_m) = seed_node(small_dir.path(), &[]);
    let (_, _, _, small_peak) = one_transfer(&small_seed, &small_m, &[]);
    // (f) the same 256 MiB one round trip away.
    let (mut near, mut far, mut far_flight) = (vec![], vec![], vec![]);
    for _ in 0..3 {
        for (rtt_ms, rates) in [(0.1, &mut near), (80.0, &mut far)] {
            let (relay, in_flight) = delaying_relay(&small_seed.addr, Duration::from_secs_f64(rtt_ms / 2e3));
            let ld = TempDir::new("bench-far");
            let leech = NodeProc::start(ld.path(), &["--enable-torrent", "--log-level", "warn"]);
            let t = Instant::now();
            download(&leech, &small_m, &[&relay]);
            rates.push((GIB / 4) as f64 / t.elapsed().as_secs_f64() / 1e6);
            if rtt_ms > 1.0 {
                far_flight.push(in_flight.load(Ordering::Relaxed) as f64 / (1 << 20) as f64);
            }
        }
    }
    let (near_m, far_m) = (median(near.clone()), median(far.clone()));
    println!(
        "(f) 256 MiB through a delaying relay: {far_m:.1} MB/s at 80 ms, {near_m:.1} MB/s at 0.1 ms; at most {:.1} MiB in flight at 80 ms",
        far_flight.iter().copied().fold(0.0, f64::max)
    );
    report.insert(
        "f_256mib_round_trip".into(),
        json!({"mb_s_80ms": far_m, "mb_s_80ms_all": far, "mb_s_0_1ms": near_m, "mb_s_0_1ms_all": near,
               "in_flight_mib_80ms_all": far_flight, "far_over_near": far_m / near_m}),
    );
    drop(small_seed);
    let big_peak = *peaks.iter().max().unwrap();
    println!(
        "(d) leech peak anonymous RSS: {:.1} MiB for 256 MiB, {:.1} MiB for 1 GiB",
        small_peak as f64 / 1024.0,
        big_peak as f64 / 1024.0
    );
    report.insert(
        "d_leech_peak_anon_rss".into(),
        json!({"mib_256mib_file": small_peak as f64 / 1024.0, "mib_1gib_file": big_peak as f64 / 1024.0}),
    );

    // (c) recheck: the file as NAME.<info hash>.part with no resume data.
    let rd = TempDir::new("bench-recheck");
    // The name a download of this torrent resumes from (NAME.<info hash>.part).
    let part = shardnet::torrent::storage::part_path(rd.path(), "blob.gguf", m.info_hash);
    std::fs::copy(sd.path().join("blob.gguf"), &part).unwrap();
    // Written back and read once: the page cache is warm and clean.
    std::fs::File::open(&part).unwrap().sync_all().unwrap();
    let _ = std::fs::read(&part).unwrap();
    let node = NodeProc::start(rd.path(), &["--enable-torrent", "--log-level", "warn"]);
    let t = Instant::now();
    let d = download(&node, &m, &[]);
    let recheck = GIB as f64 / t.elapsed().as_secs_f64() / 1e9;
    assert_eq!(d["downloaded"], 0, "a recheck downloads nothing");
    let sha1 = single_thread_sha1_gb_s(shardnet::hash::sha1);
    let smol = single_thread_sha1_gb_s(shardnet::hash::sha1_portable);
    println!(
        "(c) recheck of 1 GiB: {recheck:.2} GB/s; one core's SHA-1: {sha1:.2} GB/s (sha1_smol: {smol:.2}); ratio {:.2}x",
        recheck / sha1
    );
    report.insert(
        "c_recheck_1gib".into(),
        json!({"gb_s": recheck, "single_core_sha1_gb_s": sha1, "single_core_sha1_smol_gb_s": smol, "ratio": recheck / sha1}),
    );
    drop(node);
    drop(seed);

    // (b) one seed, seven leeches, every node's upload limited to R.
    let size: u64 = 16 << 20;
    let rate: u64 = 8_000_000;
    let swarm_dir = TempDir::new("bench-swarm");
    write_random(&swarm_dir.path().join("swarm.gguf"), size, 3);
    let limit = rate.to_string();
    let (sseed, sm) = seed_node(swarm_dir.path(), &["--upload-limit", &limit]);
    let dirs: Vec<TempDir> = (0..7).map(|_| TempDir::new("bench-sl")).collect();
    let leeches: Vec<NodeProc> = dirs
        .iter()
        .map(|d| NodeProc::start(d.path(), &["--enable-torrent", "--log-level", "warn", "--upload-limit", &limit]))
        .collect();
    let mut all: Vec<&str> = vec![&sseed.addr];
    all.extend(leeches.iter().map(|l| l.addr.as_str()));
    let hex = shardnet::hash::to_hex(&sm.to_torrent_bytes());
    let t = Instant::now();
    for l in &leeches {
        let peers: Vec<&str> = all.iter().copied().filter(|p| *p != l.addr).collect();
        l.call("DOWNLOAD", json!({"info_hash": sm.info_hash.to_hex(), "torrent_hex": hex, "peers": peers}));
    }
    for l in &leeches {
        wait_for(Duration::from_secs(120), || {
            let s = l.call("STATUS", json!({}));
            s["result"]["downloads"]
                .as_array()
                .and_then(|d| d.iter().find(|d| d["complete"] == json!(true)).map(|_| ()))
        });
    }
    let all_secs = t.elapsed().as_secs_f64();
    let once = size as f64 / rate as f64;
    let uploaded = sseed.call("STATUS", json!({}))["result"]["uploaded"].as_u64().unwrap_or(0);
    println!(
        "(b) 1 seed + 7 leeches at {:.0} MB/s each: all done in {all_secs:.2} s; one send takes {once:.2} s; ratio {:.2} (client-server: 7); seed uploaded {:.2}x the file",
        rate as f64 / 1e6,
        all_secs / once,
        uploaded as f64 / size as f64
    );
    report.insert(
        "b_seed_and_7_leeches".into(),
        json!({"file_bytes": size, "upload_limit_bytes_s": rate, "all_done_s": all_secs, "one_send_s": once,
               "ratio": all_secs / once, "seed_uploaded_over_file": uploaded as f64 / size as f64}),
    );

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("torrent.json"), serde_json::to_string_pretty(&Value::Object(report)).unwrap()).unwrap();
    println!("wrote {}", out.join("torrent.json").display());
}
