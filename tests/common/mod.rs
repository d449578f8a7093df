//! Helpers shared by the integration tests: temp dirs, a node launcher, small
//! GGUF shard files, bounded waits.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shardnet::client::Client;
use shardnet::gguf::GgmlType;
use shardnet::gguf::writer::{Builder, Value as Meta};

pub const WAIT: Duration = Duration::from_secs(20);

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "shardnet-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `shard_listener` on 127.0.0.1 and an ephemeral port, killed when dropped.
pub struct NodeProc {
    pub child: Child,
    pub addr: String,
    stderr_log: PathBuf,
}

impl NodeProc {
    pub fn start(shards_dir: &Path, extra: &[&str]) -> NodeProc {
        NodeProc::start_under(&[], shards_dir, extra)
    }

    /// As `start`, with the node run by `wrapper` (a program and its first arguments, e.g.
    /// `sh -c 'ulimit -n 64 && exec "$0" "$@"'`), which gets the node's path and flags after.
    pub fn start_under(wrapper: &[&str], shards_dir: &Path, extra: &[&str]) -> NodeProc {
        NodeProc::start_at("127.0.0.1:0", wrapper, shards_dir, extra)
    }

    /// As `start`, listening on ::1 (`addr` is then `[::1]:PORT`).
    pub fn start6(shards_dir: &Path, extra: &[&str]) -> NodeProc {
        NodeProc::start_at("[::1]:0", &[], shards_dir, extra)
    }

    /// As `start_under`, listening on `listen` (a loopback address, port 0).
    pub fn start_at(listen: &str, wrapper: &[&str], shards_dir: &Path, extra: &[&str]) -> NodeProc {
        let log = shards_dir.with_extension("stderr.log");
        let stderr = std::fs::File::create(&log).unwrap();
        let node = env!("CARGO_BIN_EXE_shard_listener");
        let mut command = match wrapper.split_first() {
            None => Command::new(node),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(node);
                c
            }
        };
        let mut child = command
            .args(["--listen", listen, "--shards-dir"])
            .arg(shards_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting shard_listener");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).expect("shard_listener did not report its address");
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with(&listen[..=listen.rfind(':').unwrap()]))
            .unwrap_or_else(|| {
                panic!("no address in {line:?}; stderr: {}", std::fs::read_to_string(&log).unwrap_or_default())
            })
            .to_string();
        NodeProc { child, addr, stderr_log: log }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.addr, WAIT).expect("connecting to the node")
    }

    pub fn call(&self, command: &str, params: Value) -> Value {
        self.client().request(command, params).expect("request")
    }

    pub fn raw(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Waits until STATUS says every file has torrent metadata.
    pub fn wait_metadata(&self) -> Value {
        wait_for(WAIT, || {
            let s = self.call("STATUS", json!({}));
            (s["result"]["metadata"]["scan_done"] == json!(true)).then_some(s["result"].clone())
        })
    }

    /// Asserts the node still answers a fresh client.
    pub fn assert_serving(&self) {
        let r = self.call("STATUS", json!({}));
        assert_eq!(r["status"], "success", "node stopped serving: {r}; stderr:\n{}", self.stderr());
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.stderr_log);
    }
}

/// Polls `f` until it returns `Some`, at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
/// A seed dir holding one valid shard GGUF, `shard-0.gguf`, of about `bytes` (its padding made
/// `salt * 4` bytes longer, so that two seeds differ), with its torrent.
pub fn seed_dir(tag: &str, bytes: usize, salt: u32) -> (TempDir, PathBuf, shardnet::torrent::Metainfo) {
    let dir = TempDir::new(tag);
    let path = dir.path().join("shard-0.gguf");
    write_shard(&path, 0, 1, (0, 1), bytes + salt as usize * 4);
    let pool = shardnet::workers::WorkerPool::new("t", 2);
    let m = shardnet::torrent::create::create(&path, None, &pool.handle()).unwrap();
    (dir, path, m)
}

/// A node with `--enable-torrent` and `extra`, once its first scan is done.
pub fn torrent_node(dir: &Path, extra: &[&str]) -> NodeProc {
    let mut args = vec!["--enable-torrent"];
    args.extend_from_slice(extra);
    let node = NodeProc::start(dir, &args);
    node.wait_metadata();
    node
}

/// `LOAD_SHARD` of shard 0 by the torrent's info hash, from `peers`.
pub fn load_shard0(node: &NodeProc, m: &shardnet::torrent::Metainfo, peers: &[&str], wait: bool) -> Value {
    node.call("LOAD_SHARD", json!({"shard_id": 0, "info_hash": m.info_hash.to_hex(), "peers": peers, "wait": wait}))
}

/// The node's STATUS entry for the torrent's download (null when it has none).
pub fn download_status(node: &NodeProc, m: &shardnet::torrent::Metainfo) -> Value {
    let s = node.call("STATUS", json!({}));
    s["result"]["downloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["info_hash"] == m.info_hash.to_hex().as_str())
        .cloned()
        .unwrap_or(Value::Null)
}

/// Asserts that two files hold the same bytes.
pub fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

/// Writes a small valid LLaMA shard GGUF (it passes the node's load checks): `shard.*` keys,
/// tiny hyper-parameters (embedding 32, 2 heads, 1 KV head, vocabulary 32), every F32 weight of
/// its layers (plus the embedding in shard 0 and the output in the last), and `extra` bytes of
/// tensor data to make it bigger. The bytes differ by `index`.
pub fn write_shard(path: &Path, index: u32, count: u32, layers: (u32, u32), extra: usize) {
    let n_layer = count * (layers.1 - layers.0);
    let mut b = Builder::new();
    b.set("general.architecture", Meta::String("llama".into()));
    b.set("llama.block_count", Meta::U32(n_layer));
    b.set("llama.context_length", Meta::U32(64));
    b.set("llama.embedding_length", Meta::U32(32));
    b.set("llama.feed_forward_length", Meta::U32(32));
    b.set("llama.attention.head_count", Meta::U32(2));
    b.set("llama.attention.head_count_kv", Meta::U32(1));
    b.set("llama.vocab_size", Meta::U32(32));
    b.set("shard.index", Meta::U32(index));
    b.set("shard.count", Meta::U32(count));
    b.set("shard.layer_begin", Meta::U32(layers.0));
    b.set("shard.layer_end", Meta::U32(layers.1));
    b.set("shard.model_id", Meta::String("test-model".into()));
    let mut data = Vec::new();
    let mut add = |b: &mut Builder, name: String, dims: &[u64]| {
        b.add_tensor(&name, dims, GgmlType::F32).unwrap();
        let n: u64 = dims.iter().product();
        let salt = data.len() as u64 + index as u64 * 131;
        data.push((0..n).flat_map(|i| (((i * 7 + salt) % 17) as f32 * 0.01).to_le_bytes()).collect::<Vec<u8>>());
    };
    if layers.0 == 0 {
        add(&mut b, "token_embd.weight".into(), &[32, 32]);
    }
    for l in layers.0..layers.1 {
        for (name, dims) in [
            ("attn_norm", &[32u64][..]),
            ("attn_q", &[32, 32]),
            ("attn_k", &[32, 16]),
            ("attn_v", &[32, 16]),
            ("attn_output", &[32, 32]),
            ("ffn_norm", &[32]),
            ("ffn_gate", &[32, 32]),
            ("ffn_up", &[32, 32]),
            ("ffn_down", &[32, 32]),
        ] {
            add(&mut b, format!("blk.{l}.{name}.weight"), dims);
        }
    }
    if layers.1 == n_layer {
        add(&mut b, "output_norm.weight".into(), &[32]);
        add(&mut b, "output.weight".into(), &[32, 32]);
    }
    if extra > 0 {
        let n = (extra / 4).max(1) as u64;
        b.add_tensor("extra", &[n], GgmlType::F32).unwrap();
        data.push((0..n * 4).map(|i| (i * 7 + index as u64) as u8).collect());
    }
    let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
    std::fs::write(path, b.to_bytes(&refs).unwrap()).unwrap();
}

/// Sends one frame with `payload` on a raw stream.
pub fn send_frame(s: &mut TcpStream, payload: &[u8]) {
    let mut wire = (payload.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(payload);
    s.write_all(&wire).unwrap();
}

/// Reads one response frame from a raw stream.
pub fn read_frame(s: &mut TcpStream) -> Value {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("reading a frame length");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).expect("reading a frame body");
    serde_json::from_slice(&buf).expect("response is JSON")
}

/// How long a node may take to close a connection it must close at once.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// Whether the node closes `s` within [`CLOSE_WITHIN`]: what it sends first is read and dropped,
/// then the end must be the close itself (EOF or a reset); a read that times out is not a close.
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    closed_within(s, CLOSE_WITHIN)
}

/// [`closed_by_peer`] with its own bound.
pub fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    use std::io::ErrorKind::*;
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe) => return true,
            Err(e) if e.kind() == Interrupted => continue,
            Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => return false,
            Err(e) => panic!("reading from the node: {e}"),
        }
    }
}

/// Panics unless every need in `needs` (comma-separated) is met; see [`need_met`] for the forms.
///
/// A test that needs something outside the crate (a program, a Python package, a fetched model)
/// is written
///
/// ```ignore
/// #[test]
/// #[ignore = "needs aria2c"]
/// fn aria2_downloads_a_shard_from_a_node() {
///     require("aria2c");
///     ...
/// }
/// ```
///
/// so that it never looks passed when the need is missing: plain `cargo test` reports it
/// `ignored, needs aria2c`; `make test` (scripts/test.sh) runs it with `--ignored` where its needs
/// are met and ends with one line naming every test that did not run; `.ci/run` makes every need
/// mandatory, and a test run without its need fails here with the way to install it.
pub fn require(needs: &str) {
    for need in needs.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        assert!(need_met(need), "this test needs {need}, which is missing: {}", install_hint(need));
    }
}

/// Whether one need is met. The forms (scripts/test.sh reads the same ones from the ignore
/// reasons): `pip:MODULE`, a module `python3` (first on PATH) imports; `python3-MODULE`, a
/// Debian package that `/usr/bin/python3` imports; a path with a `/`, a file under the
/// repository root; anything else, a program on PATH.
pub fn need_met(need: &str) -> bool {
    let import = |python: &str, module: &str| {
        Command::new(python).args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success())
    };
    if let Some(module) = need.strip_prefix("pip:") {
        import("python3", module)
    } else if let Some(module) = need.strip_prefix("python3-") {
        import("/usr/bin/python3", module)
    } else if need.contains('/') {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(need).is_file()
    } else {
        Command::new("sh").args(["-c", &format!("command -v {need}")]).output().is_ok_and(|o| o.status.success())
    }
}

fn install_hint(need: &str) -> String {
    match need {
        "aria2c" => "apt-get install aria2".into(),
        "transmission-show" | "transmission-remote" => "apt-get install transmission-cli".into(),
        "chromedriver" => "apt-get install chromium-driver".into(),
        "unshare" => {
            "apt-get install util-linux (the test also needs user and mount namespaces: `unshare -rm true`)".into()
        }
        n if n.starts_with("pip:") => format!("python3 -m pip install {}", &n[4..]),
        n if n.starts_with("python3-") || !n.contains('/') => format!("apt-get install {n}"),
        _ => "make models".into(),
    }
}

/// Writes `size` pseudo-random bytes (xorshift64 from `state`) to `w`.
pub fn write_random(w: &mut impl Write, size: u64, state: &mut u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for c in buf.chunks_exact_mut(8) {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            c.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// A minimal HTTP tracker on loopback answering every announce with one
/// peer, 127.0.0.1:`peer_port` (for clients such as aria2 that find peers
/// through trackers); returns its announce URL.
pub fn tracker(peer_port: u16) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req);
            let mut body = b"d8:intervali60e5:peers6:".to_vec();
            body.extend_from_slice(&[127, 0, 0, 1]);
            body.extend_from_slice(&peer_port.to_be_bytes());
            body.push(b'e');
            let _ = s.write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}/announce")
}

/// A TCP relay on loopback to `target` that delays every byte by `one_way` in each direction
/// and keeps it flowing at full rate, shifted in time (this kernel has no netem): per direction
/// a reader stamps each chunk as it arrives and a writer sends it at its stamp plus `one_way`.
/// Returns the relay's address and the most bytes it has held at once on their way from
/// `target` to the client: what the client kept in flight (at most 256 MiB are held).
pub fn delaying_relay(target: &str, one_way: Duration) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let peak = Arc::new(AtomicU64::new(0));
    let (target, peak_out) = (target.to_string(), peak.clone());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&target) else { continue };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            delay_line(client, server, one_way, None);
            delay_line(s2, c2, one_way, Some(peak.clone()));
        }
    });
    (addr, peak_out)
}

/// One direction of [`delaying_relay`]: bytes read from `from` are written to `to` `delay` later.
fn delay_line(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    peak: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) {
    const MAX_HELD: u64 = 256 << 20;
    let held = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let held_in = held.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            while held_in.load(Ordering::Relaxed) > MAX_HELD {
                std::thread::sleep(Duration::from_millis(1));
            }
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return, // dropping `tx` ends the writer after what is queued
                Ok(n) => n,
            };
            let now_held = held_in.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            if let Some(p) = &peak {
                p.fetch_max(now_held, Ordering::Relaxed);
            }
            if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((at, bytes)) = rx.recv() {
            let due = at + delay;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                return;
            }
            held.fetch_sub(bytes.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// The median of `v` (the upper middle of an even count); 0 when `v` is empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `p` quantile (0..=1) of `v`, nearest rank; 0 when `v` is empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The benchmarks' model: SmolLM2-135M when `make models` fetched it, else a demo model (16
/// layers, 512 wide) written into `dir`.
pub fn bench_model(dir: &Path) -> PathBuf {
    let smol = PathBuf::from("models_cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    if smol.exists() {
        return smol;
    }
    let p = dir.join("demo.gguf");
    let cfg = shardnet::gguf::demo::DemoConfig {
        layers: 16,
        embd: 512,
        heads: 8,
        kv_heads: 4,
        ffn: 1536,
        ..Default::default()
    };
    shardnet::gguf::demo::write(&cfg, &p).unwrap();
    p
}

/// A cluster on loopback: node 0 (in `dir/node-0`) seeds `model` cut into `shards` shards, nodes
/// 1..n start with empty shards dirs and bootstrap from it; every node gets `args`. Returns once
/// node 0 lists every other node under the cluster key.
pub fn seeded_cluster(dir: &Path, model: &Path, shards: u32, n: usize, args: &[&str]) -> Vec<NodeProc> {
    let d0 = dir.join("node-0");
    shardnet::gguf::split::split(model, shards, &d0, None).unwrap();
    let first = NodeProc::start(&d0, args);
    let boot = first.addr.clone();
    let mut nodes = vec![first];
    for i in 1..n {
        let d = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let a: Vec<&str> = args.iter().copied().chain(["--bootstrap", boot.as_str()]).collect();
        nodes.push(NodeProc::start(&d, &a));
    }
    wait_for(Duration::from_secs(30), || {
        let r = nodes[0].call("FIND_PEERS", json!({"cluster": true}));
        let peers = r["result"]["peers"].as_array().cloned().unwrap_or_default();
        nodes[1..].iter().all(|n| peers.contains(&json!(n.addr))).then_some(())
    });
    nodes
}

/// Sends `params` as an EXECUTE_TASK on a connection of its own, in a thread.
pub fn spawn_chain(addr: &str, params: Value) -> std::thread::JoinHandle<Value> {
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let mut c = Client::connect(&addr, WAIT).unwrap();
        c.set_timeout(Duration::from_secs(60)).unwrap();
        c.request("EXECUTE_TASK", params).unwrap()
    })
}

/// Builds (or brings up to date) llama.cpp's reference program (`scripts/reference`) when cmake
/// is there: its path, or why there is none.
pub fn reference_program() -> (Option<PathBuf>, Option<String>) {
    let bin = PathBuf::from("target/reference/reference");
    let have_cmake = Command::new("cmake").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_cmake {
        let note = "cmake is not installed (Debian: apt-get install cmake): llama.cpp is not built, \
                    so its figures (and engine.json's Q4_K_M model, which llama.cpp makes) are skipped";
        eprintln!("note: {note}");
        return (None, Some(note.into()));
    }
    eprintln!("building llama.cpp's reference program (scripts/reference/build.sh; a few minutes the first time)");
    match Command::new("sh").arg("scripts/reference/build.sh").status() {
        Ok(s) if s.success() && bin.exists() => (Some(bin), None),
        _ => {
            let note = "scripts/reference/build.sh failed (see target/reference/build.log): llama.cpp skipped";
            eprintln!("note: {note}");
            (None, Some(note.into()))
        }
    }
}

/// A connection to `addr` from the loopback address `src` (all of 127/8 is loopback on Linux:
/// another client of a node keyed by IP address), with `WAIT` read and write timeouts.
pub fn connect_from(src: &str, addr: &str) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let to: std::net::SocketAddr = addr.parse().unwrap();
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&std::net::SocketAddr::new(src.parse().unwrap(), 0).into()).unwrap();
    s.connect_timeout(&to.into(), WAIT).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}
