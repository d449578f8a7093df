//! Connection limits against hostile clients, through real node processes: caps in all and per
//! IP with the oldest idle connection shed, idle and frame deadlines, the frame-memory budget,
//! descriptor exhaustion, and a soak of every kind of hostile client beside a two-node pipeline.
//!
//! A close is observed as EOF or a reset within a bound; a read that times out is never taken
//! for one.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use shardnet::client::Client;

const MIB: u64 = 1 << 20;

fn node(extra: &[&str]) -> (TempDir, NodeProc) {
    let dir = TempDir::new("conns");
    write_shard(&dir.path().join("shard-0.gguf"), 0, 1, (0, 1), 0);
    let node = NodeProc::start(dir.path(), extra);
    (dir, node)
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`: the peak resident set).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// CPU time the process has used (user + system), from `/proc/PID/stat` (USER_HZ = 100).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Raises this test process's open-file limit to its hard limit; returns the soft limit.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write one rlimit we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(1 << 20);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

fn ask(s: &mut TcpStream, command: &str) -> Value {
    let payload = serde_json::to_vec(&json!({"command": command, "request_id": 1})).unwrap();
    send_frame(s, &payload);
    read_frame(s)
}

/// Waits for the node to close `s` (EOF or reset; data before it is skipped). Panics if it is
/// still open after `bound`; returns how long it took.
fn closed_within(s: &mut TcpStream, bound: Duration) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = bound.checked_sub(t.elapsed()).unwrap_or_else(|| panic!("still open after {bound:?}"));
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return t.elapsed(),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {
                return t.elapsed();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("still open after {bound:?}")
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// Whether `s` is still open: a short read times out instead of seeing EOF or a reset.
fn still_open(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    matches!(s.read(&mut [0u8; 1]), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

/// One response frame, if the node sent one before closing (None on EOF, reset or timeout).
fn try_read_frame(s: &mut TcpStream) -> Option<Value> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u32::from_be_bytes(len).min(1 << 20) as usize];
    s.read_exact(&mut buf).ok()?;
    serde_json::from_slice(&buf).ok()
}

#[test]
fn eleven_hundred_idle_connections_leave_status_answering_within_a_second() {
    let soft = raise_nofile();
    assert!(
        soft >= 1_300,
        "this test holds 1,100 connections and needs an open-file limit of 1,300; the hard limit is {soft} \
         (raise it: ulimit -Hn)"
    );
    let (_d, node) = node(&[]);
    let mut idle: Vec<TcpStream> = (0..1_100).map(|_| TcpStream::connect(&node.addr).unwrap()).collect();
    let t = Instant::now();
    let mut c = Client::connect(&node.addr, WAIT).unwrap();
    let r = c.request("STATUS", json!({})).expect("STATUS with 1,100 idle connections open");
    let took = t.elapsed();
    assert_eq!(r["status"], "success", "{r}");
    assert!(took < Duration::from_secs(1), "STATUS took {took:?}");
    // The oldest silent connections made room; the newest are kept.
    closed_within(&mut idle[0], Duration::from_secs(5));
    assert!(still_open(&mut idle[1_099]), "the newest idle connection was shed");
    let counts = &node.call("STATUS", json!({}))["result"]["connection_counts"];
    assert!(counts["unclassified"].as_u64().unwrap() <= 256, "{counts}");
    assert!(counts["shed_idle"].as_u64().unwrap() >= 1_100 - 256, "{counts}");
}

#[test]
fn forty_partial_frames_of_30_mib_keep_the_node_within_its_frame_memory() {
    let (_d, node) = node(&[]);
    let status = node.call("STATUS", json!({}));
    let budget = status["result"]["limits"]["frame_memory"].as_u64().unwrap_or(256 * MIB);
    let pid = node.child.id();
    let chunk = Arc::new(vec![b' '; MIB as usize]);
    let writers: Vec<JoinHandle<(TcpStream, Option<Value>)>> = (0..40)
        .map(|_| {
            let (mut s, chunk) = (node.raw(), chunk.clone());
            std::thread::spawn(move || {
                // Declares 31 MiB (under --max-frame), sends 30 MiB, never finishes the frame.
                let mut sent_all = s.write_all(&(31 * MIB as u32).to_be_bytes()).is_ok();
                for _ in 0..30 {
                    sent_all = sent_all && s.write_all(&chunk).is_ok();
                }
                s.set_read_timeout(Some(Duration::from_secs(if sent_all { 1 } else { 10 }))).unwrap();
                let answer = try_read_frame(&mut s);
                (s, answer)
            })
        })
        .collect();
    let held: Vec<(TcpStream, Option<Value>)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let peak = proc_kib(pid, "VmHWM:") * 1024;
    assert!(
        peak < budget + 64 * MIB,
        "the node's peak resident memory {} MiB is over its --frame-memory {} MiB plus 64 MiB",
        peak / MIB,
        budget / MIB
    );
    let refused = held.iter().filter(|(_, a)| a.as_ref().is_some_and(|a| a["code"] == "FRAME_MEMORY_EXCEEDED"));
    assert!(refused.count() >= 1, "no connection was told FRAME_MEMORY_EXCEEDED");
    node.assert_serving();
    let counts = &node.call("STATUS", json!({}))["result"]["connection_counts"];
    assert!(counts["frame_memory_used"].as_u64().unwrap() <= budget, "{counts}");
}

#[test]
fn the_per_ip_command_cap_sheds_that_ips_idle_connection_then_refuses_and_spares_other_ips() {
    let (_d, node) = node(&["--max-command-connections-per-ip", "4"]);
    let mut four: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect_from("127.0.0.2", &node.addr);
            assert_eq!(ask(&mut s, "STATUS")["status"], "success");
            s
        })
        .collect();
    // A fifth from the same IP: the IP's oldest idle connection makes room.
    let mut fifth = connect_from("127.0.0.2", &node.addr);
    assert_eq!(ask(&mut fifth, "STATUS")["status"], "success");
    closed_within(&mut four[0], Duration::from_secs(5));
    assert!(still_open(&mut four[1]));
    // Now none of the IP's four is idle (each holds part of a frame): the next is refused.
    for s in four[1..].iter_mut().chain([&mut fifth]) {
        s.write_all(&[0, 0, 0, 100, b'{']).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300)); // the node has read them
    let mut sixth = connect_from("127.0.0.2", &node.addr);
    let r = ask(&mut sixth, "STATUS");
    assert_eq!(r["code"], "TOO_MANY_CONNECTIONS", "{r}");
    closed_within(&mut sixth, Duration::from_secs(5));
    // Another IP is not affected.
    let mut others: Vec<TcpStream> = (0..4).map(|_| connect_from("127.0.0.3", &node.addr)).collect();
    for s in &mut others {
        assert_eq!(ask(s, "STATUS")["status"], "success");
    }
    assert!(still_open(&mut four[1]), "a busy connection was shed");
}

#[test]
fn a_slow_loris_dribbling_a_frame_is_told_and_closed_at_the_frame_deadline() {
    let (_d, node) = node(&["--frame-timeout", "2"]);
    let mut s = node.raw();
    let mut w = s.try_clone().unwrap();
    let started = Instant::now();
    let dribbler = std::thread::spawn(move || {
        let mut sent = 0;
        if w.write_all(&[0, 0, 0, 200]).is_err() {
            return sent;
        }
        // A byte every 250 ms: progress, but the frame is never whole in time.
        while sent < 100 && w.write_all(b" ").is_ok() {
            sent += 1;
            std::thread::sleep(Duration::from_millis(250));
        }
        sent
    });
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = read_frame(&mut s);
    assert_eq!(r["code"], "FRAME_TIMEOUT", "{r}");
    closed_within(&mut s, Duration::from_secs(5));
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(8), "closed after {took:?}");
    assert!(dribbler.join().unwrap() < 40, "the dribbler was not cut off");
    node.assert_serving();
}

#[test]
fn idle_command_connections_are_closed_after_the_idle_timeout_and_busy_ones_are_not() {
    let (_d, node) = node(&["--idle-timeout", "2"]);
    let mut answered = node.raw();
    assert_eq!(ask(&mut answered, "STATUS")["status"], "success");
    let since = Instant::now();
    let mut silent = node.raw();
    let mut busy = node.raw();
    // One request every 500 ms keeps a connection from being idle for 2 s.
    let pinger = std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(4) {
            assert_eq!(ask(&mut busy, "STATUS")["status"], "success", "a busy connection was closed");
            std::thread::sleep(Duration::from_millis(500));
        }
        busy
    });
    closed_within(&mut answered, Duration::from_secs(8));
    let took = since.elapsed();
    assert!(took >= Duration::from_millis(1_900), "closed after {took:?}, before the idle timeout");
    closed_within(&mut silent, Duration::from_secs(8));
    let mut busy = pinger.join().unwrap();
    assert_eq!(ask(&mut busy, "STATUS")["status"], "success");
    let counts = &node.call("STATUS", json!({}))["result"]["connection_counts"];
    assert!(counts["idle_timeouts"].as_u64().unwrap() >= 2, "{counts}");
}

/// With the node's descriptor limit at 64 (hard, so it cannot raise it), idle connections are
/// shed to accept newcomers; with none idle it waits without spinning, and serves again when
/// the frame deadline frees descriptors.
#[test]
fn out_of_descriptors_the_node_sheds_idle_connections_and_never_spins() {
    let dir = TempDir::new("conns-emfile");
    write_shard(&dir.path().join("shard-0.gguf"), 0, 1, (0, 1), 0);
    let wrapper = ["sh", "-c", "ulimit -n 64 && exec \"$0\" \"$@\""];
    let flags = ["--max-connections", "1000", "--max-unclassified", "1000", "--frame-timeout", "3"];
    let node = NodeProc::start_under(&wrapper, dir.path(), &flags);
    let pid = node.child.id();
    let _idle: Vec<TcpStream> = (0..100).map(|_| node.raw()).collect();
    let mut c = Client::connect(&node.addr, WAIT).unwrap();
    assert_eq!(c.request("STATUS", json!({})).expect("STATUS after descriptors ran out")["status"], "success");
    // Nothing idle left to shed: every descriptor holds part of a frame.
    let busy: Vec<TcpStream> = (0..80)
        .map(|_| {
            let mut s = node.raw();
            s.write_all(&[0, 0, 0, 50, b'{']).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut waiting = node.raw();
    send_frame(&mut waiting, br#"{"command":"STATUS","request_id":"w"}"#);
    let cpu = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_time(pid) - cpu;
    assert!(spent < Duration::from_millis(300), "the node spun: {spent:?} of CPU in 1 s while out of descriptors");
    // The frame deadline closes the busy ones; the waiting client is then accepted and answered.
    waiting.set_read_timeout(Some(WAIT)).unwrap();
    let r = read_frame(&mut waiting);
    assert_eq!(r["status"], "success", "{r}");
    drop(busy);
    let counts = &node.call("STATUS", json!({}))["result"]["connection_counts"];
    assert!(counts["accept_errors"].as_u64().unwrap() >= 1, "{counts}");
}

// ---- The soak: every kind of hostile client beside a two-node `shardctl infer`. ----

const PROMPT: &str = "The capital of France is";

/// The pipeline's model: the demo model (8 layers), written here, so the soak runs everywhere.
fn model(dir: &Path) -> PathBuf {
    let path = dir.join("demo.gguf");
    shardnet::gguf::demo::write(&shardnet::gguf::demo::DemoConfig { layers: 8, ..Default::default() }, &path).unwrap();
    path
}

fn infer(boot: &str) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["--json", "infer", "--bootstrap", boot, "--prompt", PROMPT, "-n", "16", "--ignore-eos"])
        .output()
        .unwrap();
    assert!(o.status.success(), "infer failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A connection from `src` (an attacker's own loopback address), bounded waits; None if refused.
fn hostile_connect(src: &str, addr: &str) -> Option<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let to: SocketAddr = addr.parse().ok()?;
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::new(src.parse().ok()?, 0).into()).ok()?;
    s.connect_timeout(&to.into(), Duration::from_secs(2)).ok()?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    Some(s)
}

/// Hostile clients against one node until `stop`, each kind from its own address in 127/8 (the
/// coordinator is 127.0.0.1); counts what they did in `acts`.
fn hostiles(addr: String, stop: Arc<AtomicBool>, acts: Arc<AtomicU64>) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    let spawn = |f: Box<dyn Fn(&str, u64) + Send>| {
        let (addr, stop, acts) = (addr.clone(), stop.clone(), acts.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f(&addr, round);
                round += 1;
                acts.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Idle: 200 connections that never send a byte, held to the end.
    {
        let (addr, stop) = (addr.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let held: Vec<TcpStream> = (0..200).filter_map(|_| hostile_connect("127.0.0.2", &addr)).collect();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(held);
        }));
    }
    for _ in 0..4 {
        // Slow: a frame dribbled a byte every 100 ms until the node cuts it off.
        threads.push(spawn(Box::new(move |addr, _| {
            let Some(mut s) = hostile_connect("127.0.0.3", addr) else { return };
            // `{"` opens it as a command frame (other first bytes are an MSE handshake on a
            // torrent node, under its own deadline).
            let _ = s.write_all(&[0, 0, 1, 0, b'{', b'"']);
            for _ in 0..60 {
                if s.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })));
    }
    // Oversized: declared lengths over --max-frame, and 30 MiB partial frames over the budget.
    threads.push(spawn(Box::new(move |addr, round| {
        let Some(mut s) = hostile_connect("127.0.0.4", addr) else { return };
        let _ = s.write_all(&(0xffff_0000u32 + round as u32 % 0xffff).to_be_bytes());
        let _ = try_read_frame(&mut s);
    })));
    for _ in 0..4 {
        threads.push(spawn(Box::new(move |addr, _| {
            let Some(mut s) = hostile_connect("127.0.0.5", addr) else { return };
            let chunk = vec![b'['; MIB as usize];
            let _ = s.write_all(&(31 * MIB as u32).to_be_bytes());
            let _ = s.write_all(b"{\"");
            for _ in 0..30 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        })));
    }
    // Garbage frames: whole frames of random bytes, then a look at the answers.
    threads.push(spawn(Box::new(move |addr, round| {
        let Some(mut s) = hostile_connect("127.0.0.6", addr) else { return };
        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ round;
        for _ in 0..20 {
            let junk: Vec<u8> = (0..(seed % 300) as usize)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 24) as u8
                })
                .collect();
            send_frame_lossy(&mut s, &junk);
        }
        let _ = try_read_frame(&mut s);
    })));
    // Peer-wire junk: a handshake for a torrent nobody has, then noise; and noise after byte 19.
    threads.push(spawn(Box::new(move |addr, round| {
        let Some(mut s) = hostile_connect("127.0.0.7", addr) else { return };
        let mut hs = vec![19u8];
        if round % 2 == 0 {
            hs.extend_from_slice(b"BitTorrent protocol");
            hs.extend_from_slice(&[round as u8; 48]);
        }
        hs.extend((0..500u32).map(|i| (i as u64 * 2_654_435_761 ^ round) as u8));
        let _ = s.write_all(&hs);
        let _ = s.read(&mut [0u8; 256]);
    })));
    // DHT junk over UDP: random bytes and broken bencode, 200 packets a round.
    threads.push(spawn(Box::new(move |addr, round| {
        let Ok(udp) = UdpSocket::bind("127.0.0.8:0") else { return };
        for i in 0..200u64 {
            let packet: Vec<u8> = match i % 4 {
                0 => (0..(i * 7 % 1400) as usize).map(|j| (j as u64 * 31 ^ round ^ i) as u8).collect(),
                1 => b"d1:ad2:id20:aaaaaaaaaaaaaaaaaaaae1:q4:ping1:t2:aa1:y1:qe".to_vec(),
                2 => b"d1:q9:find_node1:y1:q1:ad6:target20:bbbbbbbbbbbbbbbbbbbb".to_vec(),
                _ => format!("d1:t{}:{}e", i, "x".repeat(i as usize % 50)).into_bytes(),
            };
            let _ = udp.send_to(&packet, addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    })));
    threads
}

/// Sends one frame, ignoring a closed connection.
fn send_frame_lossy(s: &mut TcpStream, payload: &[u8]) {
    let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(payload);
    let _ = s.write_all(&wire);
}

#[test]
fn soak_hostile_clients_beside_a_two_node_pipeline() {
    let started = Instant::now();
    let dir = TempDir::new("conns-soak");
    let model = model(dir.path());
    let d0 = dir.path().join("node-0");
    shardnet::gguf::split::split(&model, 4, &d0, None).unwrap();
    let args = [
        "--enable-torrent",
        "--threads",
        "1",
        "--ctx-size",
        "256",
        "--frame-timeout",
        "3",
        "--frame-memory",
        "100000000",
    ];
    let n0 = NodeProc::start(&d0, &args);
    let d1 = dir.path().join("node-1");
    std::fs::create_dir_all(&d1).unwrap();
    let mut a1 = args.to_vec();
    a1.extend_from_slice(&["--bootstrap", &n0.addr]);
    let n1 = NodeProc::start(&d1, &a1);
    wait_for(Duration::from_secs(30), || {
        let r = n0.call("FIND_PEERS", json!({"cluster": true}));
        r["result"]["peers"].as_array().is_some_and(|p| p.contains(&json!(n1.addr))).then_some(())
    });
    // Without hostile clients (node 1 downloads its shards here).
    let quiet = infer(&n0.addr);
    let rss_before = [proc_kib(n0.child.id(), "VmRSS:"), proc_kib(n1.child.id(), "VmRSS:")];

    let stop = Arc::new(AtomicBool::new(false));
    let acts = Arc::new(AtomicU64::new(0));
    let mut threads = hostiles(n0.addr.clone(), stop.clone(), acts.clone());
    threads.extend(hostiles(n1.addr.clone(), stop.clone(), acts.clone()));
    std::thread::sleep(Duration::from_secs(2)); // under attack before the run starts
    let loud = infer(&n0.addr);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }

    assert_eq!(loud["tokens"], quiet["tokens"], "hostile clients changed the text");
    assert_eq!(loud["text"], quiet["text"]);
    assert!(acts.load(Ordering::Relaxed) > 50, "the hostile clients hardly ran");
    for (i, n) in [&n0, &n1].into_iter().enumerate() {
        // The hostile connections are gone: only 127.0.0.1 (coordinator, relays, peers) is left.
        let settled = |s: &Value| {
            let c = &s["result"]["connection_counts"];
            c["ips"] == 1 && c["unclassified"] == 0 && c["frame_memory_used"].as_u64() < Some(MIB)
        };
        let deadline = Instant::now() + WAIT;
        let s = loop {
            let s = n.call("STATUS", json!({}));
            if settled(&s) || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let counts = &s["result"]["connection_counts"];
        assert!(settled(&s), "node {i}: the hostile connections are still open: {counts}");
        assert!(counts["frame_memory_closes"].as_u64().unwrap() >= 1, "node {i}: {counts}");
        assert!(counts["frame_timeouts"].as_u64().unwrap() >= 1, "node {i}: {counts}");
        let after = proc_kib(n.child.id(), "VmRSS:");
        eprintln!("node {i}: VmRSS {} -> {} KiB; {counts}", rss_before[i], after);
        assert!(
            after < rss_before[i] + 64 * 1024,
            "node {i}: resident memory grew from {} to {} MiB",
            rss_before[i] / 1024,
            after / 1024
        );
    }
    assert!(started.elapsed() < Duration::from_secs(60), "the soak took {:?}", started.elapsed());
}
