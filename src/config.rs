//! Command-line flags of `shard_listener` (peer addresses are parsed by [`crate::addr`]).
//!
//! Flags follow the original note (`--bootstrap`, `--cluster`, `--shard-id`,
//! `--total-shards`, `--shards-dir`, `--enable-torrent`) plus the node's own.
//! Parsing never exits: it returns a one-line error naming the flag, and the
//! binary prints it and exits with status 2.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use crate::addr::{PeerAddr, parse_peer_addr};
use crate::log::Level;
use crate::protocol::auth::{self, ClusterKey};
use crate::protocol::{MAX_SHARD_ID, frame};

pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_SHARDS_DIR: &str = "models_cache/shards";
pub const DEFAULT_CLUSTER: &str = "shardnet";
/// What a connection's input buffer may hold beyond one frame: its 4-byte header and one read
/// (64 KiB) past it.
pub const FRAME_MEMORY_SLACK: u64 = 4 + 64 * 1024;

/// Everything a node is started with.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub bootstrap: Vec<PeerAddr>,
    pub cluster: String,
    pub shard_id: Option<u32>,
    pub total_shards: Option<u32>,
    pub shards_dir: PathBuf,
    pub enable_torrent: bool,
    pub max_frame: u32,
    pub log_level: Level,
    pub hash_workers: usize,
    /// TCP connections of every kind together (`--max-connections`). A newcomer at the cap
    /// sheds the oldest idle connection (unclassified, or a command connection with nothing
    /// in flight); with none idle it is refused.
    pub max_connections: usize,
    /// Connections that have not sent their first byte yet; the oldest is shed beyond it.
    pub max_unclassified: usize,
    /// Command connections in all and from one IP (an IPv4 address or an IPv6 /64): at either
    /// cap the oldest idle command connection (of that IP) is shed, else the newcomer refused.
    pub max_command_connections: usize,
    pub max_command_connections_per_ip: usize,
    /// Peer-wire connections in all (dialled ones included) and accepted from one IP; a
    /// newcomer over either is refused.
    pub max_peer_connections: usize,
    pub max_peer_connections_per_ip: usize,
    /// At a peer cap, an accepted peer-wire connection that has moved no whole block's bytes
    /// (served or received; nor finished its handshake) for this long may be shed for a newcomer.
    pub peer_shed_grace: Duration,
    /// A command (or unclassified) connection with nothing in flight, buffered or unsent for
    /// this long is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// A frame (or peer-wire message) must arrive whole within this after its first byte.
    pub frame_timeout: Duration,
    /// A connection whose unsent output makes no progress for this long is closed.
    pub io_timeout: Duration,
    /// Bytes all connections' partially received frames may hold together; over it the
    /// connection holding the largest is answered `FRAME_MEMORY_EXCEEDED` and closed.
    pub frame_memory: u64,
    /// Relays (a hop's result carried to the next node) in flight at once, node-wide; more are
    /// answered `BUSY` (`--max-relays`).
    pub max_relays: usize,
    /// Relays in flight at once for one client (`--max-relays-per-client`).
    pub max_relays_per_client: usize,
    /// Unsent request bytes one relay link (connection to a next hop) may hold (`--relay-link-buffer`).
    pub relay_link_buffer: usize,
    /// Unsent request bytes all relay links together may hold (`--relay-memory`).
    pub relay_memory: usize,
    /// Bytes per second sent to peers, all torrents together; 0: no limit.
    pub upload_limit: u64,
    /// Bytes per second read from peers, all torrents together; 0: no limit.
    pub download_limit: u64,
    /// Write downloaded pieces with direct I/O (not through the page cache)
    /// where the filesystem allows, for downloads no load waits for; `--cached-writes` turns it
    /// off.
    pub direct_io: bool,
    /// ggml compute threads of the inference worker.
    pub threads: usize,
    /// Tokens of context per inference session.
    pub ctx_size: u32,
    /// Inference sessions (KV caches) kept at once.
    pub max_sessions: usize,
    /// Bytes all KV caches may take together.
    pub kv_memory: u64,
    /// Run Q4_0-style weights from ggml's faster CPU layout, kept in a sidecar file beside each
    /// shard (`NAME.gguf.repack`, mapped read-only); an anonymous copy where it cannot be written.
    pub repack: bool,
    /// A read-only DHT node (BEP 43): asks, never answers, never routed to.
    pub dht_read_only: bool,
    /// The TCP port announced in the DHT (cluster, manifest, name and info-hash keys) when peers
    /// reach the node on another port than it listens on (a port forward, a relay in front of
    /// it); `None`: the listening port. As libtorrent's `announce_port`.
    pub announce_port: Option<u16>,
    /// DHT packets a second to any one address (libtorrent bans a source over 5).
    pub dht_query_rate: u32,
    /// What others' DHT announces may make the node store (keys, peers per key, entries per
    /// announcer).
    pub dht_store: crate::dht::store::StoreLimits,
    /// Downloads under way at once; one more is refused (`DOWNLOAD_LIMIT`).
    pub max_downloads: usize,
    /// Downloads under way at once that one client (IPv4 address, IPv6 /64; loopback IP and
    /// port) started; one more is refused (`DOWNLOAD_LIMIT`), so that one stranger cannot hold
    /// every `--max-downloads` slot.
    pub max_downloads_per_client: usize,
    /// Peers one download knows and dials at most; more are ignored.
    pub max_download_peers: usize,
    /// Bytes the shards dir may hold (GGUF and `.part` files); 0: no fixed budget. A download
    /// whose declared length would pass it is refused before any file is created.
    pub disk_budget: u64,
    /// Free space kept on the shards dir's filesystem: a download is refused when its remaining
    /// bytes, with those of the downloads under way, would eat into it.
    pub disk_reserve: u64,
    /// A `.part` file no download has used for this long is removed (checked at startup and
    /// every minute).
    pub part_expiry: Duration,
    /// A peer whose dials have failed for this long is dropped from its download.
    pub redial_give_up: Duration,
    /// A download that made no progress (no metadata piece, no block from any peer) for this
    /// long fails (`TORRENT_UNAVAILABLE`) and frees its `--max-downloads` slot.
    pub download_stall_timeout: Duration,
    /// Sessions one client may hold (its own least recently used goes beyond it).
    pub max_sessions_per_client: usize,
    /// A session opened over a connection without the cluster key that names an `origin` (it
    /// says it relays) outlives that connection only until it has been idle this long.
    pub orphan_session_idle: Duration,
    /// The cluster key (`--cluster-key-file` or `SHARDNET_CLUSTER_KEY_FILE`): commands but
    /// STATUS need proof of it. `None`: the node is open to anyone.
    pub cluster_key: Option<ClusterKey>,
    /// Where the key came from, for the startup log.
    pub cluster_key_file: Option<PathBuf>,
    /// Set when the key file may be read by group or others.
    pub key_warning: Option<String>,
    /// A handshake begun and not finished this long is closed.
    pub auth_timeout: Duration,
    /// `--model HASH`: the SHA-256 of the cluster's `manifest.json`.
    pub model_pin: Option<[u8; 32]>,
    /// `--private`: serve the peer wire only to peers proving the cluster key.
    pub private: bool,
    /// `--encryption`: Message Stream Encryption on the peer wire, in and out.
    pub encryption: Encryption,
    /// An MSE handshake begun and not finished this long is closed (`--mse-timeout`).
    pub mse_timeout: Duration,
    /// `--mse-rate`: MSE handshakes a client (IPv4 address, IPv6 /64; loopback IP and port) may
    /// open a second, with bursts of twice that; more are closed before any DH work. 0: none.
    pub mse_rate: u32,
}

/// `--encryption`: how the peer wire uses Message Stream Encryption (MSE). As libtorrent's
/// policies: `prefer-plaintext` (the default) and `prefer-encrypted` are its `pe_enabled`
/// (accept both, redial the other way when a peer drops the first attempt) with
/// `prefer_rc4` off and on, `require` its `pe_forced` with `allowed_enc_level` RC4, `disable`
/// its `pe_disabled`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encryption {
    /// Dial plaintext first (MSE on a retry); accept both; pick plaintext when offered both:
    /// pieces keep the zero-copy path unless a peer insists on RC4.
    #[default]
    PreferPlaintext,
    /// Dial MSE first (plaintext on a retry); accept both; pick RC4 when offered both.
    PreferEncrypted,
    /// Only MSE with an RC4 payload, in and out: plaintext peers are refused.
    Require,
    /// Never MSE: plaintext handshakes only (MSE's first bytes go to the command parser).
    Disable,
}

impl Encryption {
    pub fn parse(s: &str) -> Option<Encryption> {
        Some(match s {
            "prefer-plaintext" => Encryption::PreferPlaintext,
            "prefer-encrypted" => Encryption::PreferEncrypted,
            "require" => Encryption::Require,
            "disable" => Encryption::Disable,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Encryption::PreferPlaintext => "prefer-plaintext",
            Encryption::PreferEncrypted => "prefer-encrypted",
            Encryption::Require => "require",
            Encryption::Disable => "disable",
        }
    }
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        NodeConfig {
            listen: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), DEFAULT_PORT),
            bootstrap: Vec::new(),
            cluster: DEFAULT_CLUSTER.to_string(),
            shard_id: None,
            total_shards: None,
            shards_dir: PathBuf::from(DEFAULT_SHARDS_DIR),
            enable_torrent: false,
            max_frame: frame::DEFAULT_MAX_FRAME,
            log_level: Level::Info,
            hash_workers: std::thread::available_parallelism().map_or(2, |n| n.get()).min(8),
            max_connections: 1024,
            max_unclassified: 256,
            max_command_connections: 512,
            max_command_connections_per_ip: 64,
            max_peer_connections: 256,
            max_peer_connections_per_ip: 32,
            peer_shed_grace: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(300)),
            frame_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(30),
            frame_memory: 256 << 20,
            max_relays: 256,
            max_relays_per_client: 64,
            relay_link_buffer: 64 << 20,
            relay_memory: 256 << 20,
            upload_limit: 0,
            download_limit: 0,
            direct_io: true,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ctx_size: 2048,
            max_sessions: 16,
            kv_memory: 2 << 30,
            repack: true,
            dht_read_only: false,
            announce_port: None,
            dht_query_rate: crate::dht::node::DEFAULT_QUERY_RATE,
            dht_store: crate::dht::store::StoreLimits::default(),
            max_downloads: 8,
            max_downloads_per_client: 4,
            max_download_peers: 32,
            disk_budget: 0,
            disk_reserve: 1 << 30,
            part_expiry: Duration::from_secs(3600),
            redial_give_up: Duration::from_secs(300),
            download_stall_timeout: Duration::from_secs(120),
            max_sessions_per_client: 8,
            orphan_session_idle: Duration::from_secs(30),
            cluster_key: None,
            cluster_key_file: None,
            key_warning: None,
            auth_timeout: auth::DEFAULT_AUTH_TIMEOUT,
            model_pin: None,
            private: false,
            encryption: Encryption::default(),
            mse_timeout: crate::torrent::mse::HANDSHAKE_TIMEOUT,
            mse_rate: 20,
        }
    }
}

impl NodeConfig {
    /// The connection and frame limits, as `STATUS` lists them (`limits`); seconds and bytes.
    pub fn limits_json(&self) -> serde_json::Value {
        serde_json::json!({
            "max_connections": self.max_connections,
            "max_unclassified": self.max_unclassified,
            "max_command_connections": self.max_command_connections,
            "max_command_connections_per_ip": self.max_command_connections_per_ip,
            "max_peer_connections": self.max_peer_connections,
            "max_peer_connections_per_ip": self.max_peer_connections_per_ip,
            "peer_shed_grace_s": self.peer_shed_grace.as_secs(),
            "idle_timeout_s": self.idle_timeout.map_or(0, |d| d.as_secs()),
            "frame_timeout_s": self.frame_timeout.as_secs(),
            "io_timeout_s": self.io_timeout.as_secs(),
            "frame_memory": self.frame_memory,
            "max_relays": self.max_relays,
            "max_relays_per_client": self.max_relays_per_client,
            "relay_link_buffer": self.relay_link_buffer,
            "relay_memory": self.relay_memory,
            "max_frame": self.max_frame,
            "max_sessions": self.max_sessions,
            "max_sessions_per_client": self.max_sessions_per_client,
            "orphan_session_idle_s": self.orphan_session_idle.as_secs(),
            "auth_timeout_s": self.auth_timeout.as_secs(),
            "mse_timeout_s": self.mse_timeout.as_secs(),
            "mse_rate": self.mse_rate,
            "dht_max_keys": self.dht_store.max_keys,
            "dht_max_peers_per_key": self.dht_store.max_peers_per_key,
            "dht_max_per_announcer": self.dht_store.max_per_announcer,
        })
    }
}

pub const NODE_USAGE: &str = "\
shard_listener: a shardnet node (command protocol, BitTorrent seeding, shard cache)

USAGE: shard_listener [FLAGS]

FLAGS:
  --listen HOST:PORT     address for TCP (commands and peer wire) and UDP (DHT);
                         0.0.0.0 or [::] listens on IPv4 and IPv6 (IPv6 beside
                         IPv4 on the same port: two DHTs, BEP 32), an IPv4 address
                         on IPv4 only, an IPv6 one ([::1]:PORT) on IPv6 only
                         [default: 0.0.0.0:51820]
  --port N               shorthand for --listen 0.0.0.0:N (0 picks a free port)
  --bootstrap ADDR       a known node: /ip4/A.B.C.D/tcp/PORT, /ip6/ADDR/tcp/PORT
                         (e.g. /ip6/::1/tcp/51820), /dns4|dns6|dns/HOST/tcp/PORT,
                         HOST:PORT or [V6]:PORT; repeatable. IPv4 addresses join
                         the IPv4 DHT, IPv6 ones the IPv6 DHT
  --cluster NAME         cluster this node belongs to [default: shardnet]
  --shard-id N           shard this node serves; loaded at startup if present
  --total-shards N       number of shards in the model; shard ids must be below it
  --shards-dir DIR       directory of GGUF shards [default: models_cache/shards]
  --enable-torrent       seed shards and download missing ones over BitTorrent
  --max-frame BYTES      largest command frame accepted [default: 33554432]
  --hash-workers N       threads hashing pieces [default: cores, at most 8]
  --upload-limit BYTES   bytes/s sent to peers, all torrents [default: 0, no limit]
  --download-limit BYTES bytes/s read from peers, all torrents [default: 0, no limit]
  --cached-writes        write downloaded pieces through the page cache (default:
                         direct I/O where the filesystem allows it, except for a
                         download a LOAD_SHARD waits for: it is read at once)
  --dht-read-only        a read-only DHT node (BEP 43): it looks up and announces
                         but answers no query, and others keep it out of their
                         routing tables (for a node that cannot take queries)
  --announce-port N      the TCP port to announce in the DHT when peers reach
                         this node on another port than it listens on (a port
                         forward or a relay in front of it) [default: the
                         listening port]
  --dht-query-rate N     DHT packets a second to any one address, queries and
                         answers together [default: 3; libtorrent bans over 5]
  --dht-max-keys N       keys the DHT store keeps for others' announces; an
                         announce of a new key past it is refused [default: 10000]
  --dht-max-peers-per-key N
                         peers kept under one DHT key; the stalest gives way
                         [default: 200]
  --dht-max-per-announcer N
                         DHT store entries one announcer (IPv4 address, IPv6 /64)
                         may hold over all keys; more are refused [default: 250]
  --max-downloads N      downloads under way at once; more are refused
                         (DOWNLOAD_LIMIT); those started by callers without the
                         cluster key from other hosts hold at most three
                         quarters of them [default: 8]
  --max-downloads-per-client N
                         downloads under way at once that one client (IPv4
                         address, IPv6 /64; loopback IP and port) started; more
                         are refused (DOWNLOAD_LIMIT) [default: half of
                         --max-downloads, rounded up: 4]
  --max-download-peers N peers one download knows and dials [default: 32]
  --disk-budget BYTES    bytes the shards dir may hold (GGUF, .part and .repack
                         files); a download that would pass it is refused before
                         any file is created (DISK_BUDGET) [default: 0, no fixed
                         budget]
  --disk-reserve BYTES   free space a download may not eat into (statvfs); a
                         download that no longer fits when it resumes after a
                         stall stops, its .part and resume data kept
                         [default: 1073741824]
  --part-expiry SECS     remove a .part file no download used for this long
                         [default: 3600]
  --redial-give-up SECS  drop a peer whose dials failed for this long [default: 300]
  --download-stall-timeout SECS
                         fail a download that got no metadata and no block for this long,
                         freeing its --max-downloads slot [default: 120]
  --threads N            compute threads for inference [default: cores]
  --ctx-size N           tokens of context per session [default: 2048, at most
                         the model's training context]
  --max-sessions N       inference sessions kept; the least recently used of the
                         client holding the most is dropped beyond it [default: 16]
  --max-sessions-per-client N
                         sessions one client (IPv4 address or IPv6 /64; IP
                         and port on loopback) may hold; its own least recently
                         used is dropped beyond it [default: 8, at most
                         --max-sessions]
  --orphan-session-idle SECS
                         on a node without a cluster key, a session opened by
                         a request naming an `origin` (a relaying node's, or a
                         stranger's claim) outlives its connection only until
                         idle this long; others end with their connection
                         [default: 30]
  --cluster-key-file PATH
                         the cluster key (at least 32 random bytes; mode 600): every
                         command but STATUS needs proof of it (HMAC-SHA-256
                         handshake, every frame MACed) [default: the file named
                         by SHARDNET_CLUSTER_KEY_FILE; none: open to anyone]
  --auth-timeout SECS    close a connection whose key handshake has not finished
                         this long after its hello [default: 10]
  --model HASH           pin the model: the SHA-256 of its manifest.json (as
                         `shardctl split` prints it); shard info hashes come from
                         that manifest alone, fetched from peers if not here
  --private              serve shards only to peers proving the cluster key (BEP 10
                         handshake) and announce them under keyed DHT names only;
                         needs a cluster key
  --encryption POLICY    Message Stream Encryption (MSE, protocol encryption) on
                         the peer wire: prefer-plaintext (dial plaintext, redial
                         with MSE if the peer drops it; accept both, choosing a
                         plaintext payload when offered both), prefer-encrypted
                         (dial MSE first, choose RC4), require (RC4 only, in and
                         out: plaintext peers are refused) or disable (plaintext
                         only) [default: prefer-plaintext]
  --mse-timeout SECS     close a peer connection whose MSE handshake has not
                         finished this long after it began [default: 10]
  --mse-rate N           MSE handshakes one client (IPv4 address, IPv6 /64) may
                         open a second, bursts of 2N; more are closed before any
                         DH work (0: no limit) [default: 20]
  --kv-memory BYTES      bytes all sessions' KV caches may take [default: 2147483648]
  --no-repack            compute Q4_0-style weights from the shard's own layout
                         (slower) instead of ggml's faster CPU layout, which is
                         kept in a sidecar file beside each shard
                         (NAME.gguf.repack, written once, mapped read-only; an
                         anonymous copy where it cannot be written) [default:
                         repack; --repack says so explicitly]
  --log-level LEVEL      error, warn, info or debug [default: info]
  -h, --help             print this help

CONNECTION LIMITS (a newcomer at a cap sheds the oldest idle connection, where
one may be shed, else it is refused; per IP: an IPv4 address or an IPv6 /64):
  --max-connections N    TCP connections of every kind [default: 1024]
  --max-unclassified N   connections that sent no byte yet; the oldest is shed
                         [default: 256]
  --max-command-connections N         command connections [default: 512]
  --max-command-connections-per-ip N  command connections per IP [default: 64]
  --max-peer-connections N            peer-wire connections, dialled ones
                                      included; a quarter is kept for the
                                      node's own dials, strangers' downloads
                                      dial into half of it [default: 256]
  --max-peer-connections-per-ip N     peer-wire connections accepted per IP
                                      [default: 32]
  --peer-shed-grace SECS  at a peer cap, a newcomer (or a dial of the node's
                         own download) sheds the accepted peer that moved a
                         piece's worth (256 KiB) of distinct blocks (served or
                         received) longest ago, once that is over this long
                         [default: 30]
  --idle-timeout SECS    close a command connection with nothing in flight for
                         this long; 0: never [default: 300]
  --frame-timeout SECS   close a connection whose frame (or peer-wire message)
                         is not whole this long after its first byte
                         [default: 30]
  --io-timeout SECS      close a connection (or relay link to a next hop) that
                         takes none of its pending output for this long
                         [default: 30]
  --max-relays N         relays (results carried to a next hop) in flight at once;
                         more are answered BUSY [default: 256]
  --max-relays-per-client N
                         relays in flight at once for one client (IPv4 address
                         or IPv6 /64; IP and port on loopback), so that one
                         cannot take them all; more are answered BUSY
                         [default: 64]
  --relay-link-buffer BYTES
                         unsent bytes one next hop's link may hold; a relay past
                         it is answered BUSY, nothing buffered [default: 67108864]
  --relay-memory BYTES   unsent bytes all relay links may hold together; a relay
                         past it is answered BUSY [default: 268435456]
  --frame-memory BYTES   memory for partially received frames, all connections
                         together; over it the largest is closed
                         [default: 268435456]
";

/// What the command line asks for.
#[derive(Debug)]
pub enum NodeArgs {
    Run(Box<NodeConfig>),
    Help,
}

/// Parses `shard_listener`'s arguments (without the program name).
pub fn parse_node_args<S: AsRef<str>>(args: &[S]) -> Result<NodeArgs, String> {
    let mut c = NodeConfig::default();
    let mut port: Option<u16> = None;
    let mut per_client_given = false;
    let mut downloads_per_client_given = false;
    let mut it = args.iter().map(|s| s.as_ref());
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v)),
            _ => (arg, None),
        };
        let mut value = || -> Result<&str, String> {
            match inline {
                Some(v) => Ok(v),
                None => it.next().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match flag {
            "-h" | "--help" => return Ok(NodeArgs::Help),
            "--listen" => {
                let v = value()?;
                c.listen = v.parse().map_err(|_| format!("--listen {v:?} is not IP:PORT (e.g. 0.0.0.0:51820)"))?;
            }
            "--port" => {
                let v = value()?;
                port = Some(v.parse().map_err(|_| format!("--port {v:?} is not 0-65535"))?);
            }
            "--bootstrap" => {
                let v = value()?;
                c.bootstrap.push(parse_peer_addr(v).map_err(|e| format!("--bootstrap: {e}"))?);
            }
            "--cluster" => {
                let v = value()?;
                if v.is_empty() || v.len() > 128 {
                    return Err(format!("--cluster {v:?} must be 1-128 bytes"));
                }
                c.cluster = v.to_string();
            }
            "--shard-id" => c.shard_id = Some(number(flag, value()?, 0, MAX_SHARD_ID)? as u32),
            "--total-shards" => c.total_shards = Some(number(flag, value()?, 1, MAX_SHARD_ID + 1)? as u32),
            "--shards-dir" => {
                let v = value()?;
                if v.is_empty() {
                    return Err("--shards-dir must not be empty".into());
                }
                c.shards_dir = PathBuf::from(v);
            }
            "--enable-torrent" => {
                if inline.is_some() {
                    return Err("--enable-torrent takes no value".into());
                }
                c.enable_torrent = true;
            }
            "--max-frame" => c.max_frame = number(flag, value()?, 1024, frame::MAX_FRAME_LIMIT as u64 - 1)? as u32,
            "--hash-workers" => c.hash_workers = number(flag, value()?, 1, 64)? as usize,
            "--max-connections" => c.max_connections = number(flag, value()?, 1, 1_000_000)? as usize,
            "--max-unclassified" => c.max_unclassified = number(flag, value()?, 1, 1_000_000)? as usize,
            "--max-command-connections" => c.max_command_connections = number(flag, value()?, 1, 1_000_000)? as usize,
            "--max-command-connections-per-ip" => {
                c.max_command_connections_per_ip = number(flag, value()?, 1, 1_000_000)? as usize
            }
            "--max-peer-connections" => c.max_peer_connections = number(flag, value()?, 1, 1_000_000)? as usize,
            "--max-peer-connections-per-ip" => {
                c.max_peer_connections_per_ip = number(flag, value()?, 1, 1_000_000)? as usize
            }
            "--peer-shed-grace" => c.peer_shed_grace = Duration::from_secs(number(flag, value()?, 1, 86_400)?),
            "--idle-timeout" => {
                c.idle_timeout = Some(number(flag, value()?, 0, 86_400)?).filter(|&s| s > 0).map(Duration::from_secs)
            }
            "--frame-timeout" => c.frame_timeout = Duration::from_secs(number(flag, value()?, 1, 86_400)?),
            "--io-timeout" => c.io_timeout = Duration::from_secs(number(flag, value()?, 1, 86_400)?),
            "--frame-memory" => c.frame_memory = number(flag, value()?, 1 << 20, u64::MAX / 2)?,
            "--max-relays" => c.max_relays = number(flag, value()?, 1, 1 << 20)? as usize,
            "--max-relays-per-client" => c.max_relays_per_client = number(flag, value()?, 1, 1 << 20)? as usize,
            "--relay-link-buffer" => c.relay_link_buffer = number(flag, value()?, 1 << 16, 1 << 40)? as usize,
            "--relay-memory" => c.relay_memory = number(flag, value()?, 1 << 16, 1 << 40)? as usize,
            "--upload-limit" => c.upload_limit = number(flag, value()?, 0, u64::MAX / 2)?,
            "--download-limit" => c.download_limit = number(flag, value()?, 0, u64::MAX / 2)?,
            "--repack" => {
                if inline.is_some() {
                    return Err("--repack takes no value".into());
                }
                c.repack = true;
            }
            "--no-repack" => {
                if inline.is_some() {
                    return Err("--no-repack takes no value".into());
                }
                c.repack = false;
            }
            "--cached-writes" => {
                if inline.is_some() {
                    return Err("--cached-writes takes no value".into());
                }
                c.direct_io = false;
            }
            "--dht-read-only" => {
                if inline.is_some() {
                    return Err("--dht-read-only takes no value".into());
                }
                c.dht_read_only = true;
            }
            "--announce-port" => c.announce_port = Some(number(flag, value()?, 1, u16::MAX as u64)? as u16),
            "--dht-query-rate" => c.dht_query_rate = number(flag, value()?, 1, 1000)? as u32,
            "--dht-max-keys" => c.dht_store.max_keys = number(flag, value()?, 1, 10_000_000)? as usize,
            "--dht-max-peers-per-key" => c.dht_store.max_peers_per_key = number(flag, value()?, 1, 100_000)? as usize,
            "--dht-max-per-announcer" => {
                c.dht_store.max_per_announcer = number(flag, value()?, 1, 10_000_000)? as usize
            }
            "--max-downloads" => c.max_downloads = number(flag, value()?, 1, 10_000)? as usize,
            "--max-downloads-per-client" => {
                c.max_downloads_per_client = number(flag, value()?, 1, 10_000)? as usize;
                downloads_per_client_given = true;
            }
            "--max-download-peers" => c.max_download_peers = number(flag, value()?, 1, 10_000)? as usize,
            "--disk-budget" => c.disk_budget = number(flag, value()?, 0, u64::MAX / 2)?,
            "--disk-reserve" => c.disk_reserve = number(flag, value()?, 0, u64::MAX / 2)?,
            "--part-expiry" => c.part_expiry = Duration::from_secs(number(flag, value()?, 1, 365 * 86_400)?),
            "--redial-give-up" => c.redial_give_up = Duration::from_secs(number(flag, value()?, 1, 86_400)?),
            "--download-stall-timeout" => {
                c.download_stall_timeout = Duration::from_secs(number(flag, value()?, 1, 86_400)?)
            }
            "--threads" => c.threads = number(flag, value()?, 1, 1024)? as usize,
            "--ctx-size" => c.ctx_size = number(flag, value()?, 16, 1 << 20)? as u32,
            "--max-sessions" => c.max_sessions = number(flag, value()?, 1, 100_000)? as usize,
            "--kv-memory" => c.kv_memory = number(flag, value()?, 1 << 20, u64::MAX / 2)?,
            "--max-sessions-per-client" => {
                c.max_sessions_per_client = number(flag, value()?, 1, 100_000)? as usize;
                per_client_given = true;
            }
            "--orphan-session-idle" => c.orphan_session_idle = Duration::from_secs(number(flag, value()?, 1, 86_400)?),
            "--cluster-key-file" => {
                let v = value()?;
                if v.is_empty() {
                    return Err("--cluster-key-file must not be empty".into());
                }
                c.cluster_key_file = Some(PathBuf::from(v));
            }
            "--auth-timeout" => c.auth_timeout = Duration::from_secs(number(flag, value()?, 1, 3600)?),
            "--mse-timeout" => c.mse_timeout = Duration::from_secs(number(flag, value()?, 1, 3600)?),
            "--mse-rate" => c.mse_rate = number(flag, value()?, 0, 1_000_000)? as u32,
            "--model" => {
                let v = value()?;
                c.model_pin = Some(parse_model_hash(v).map_err(|e| format!("--model: {e}"))?);
            }
            "--private" => {
                if inline.is_some() {
                    return Err("--private takes no value".into());
                }
                c.private = true;
            }
            "--encryption" => {
                let v = value()?;
                c.encryption = Encryption::parse(v).ok_or_else(|| {
                    format!("--encryption {v:?} is not prefer-plaintext, prefer-encrypted, require or disable")
                })?;
            }
            "--log-level" => {
                let v = value()?;
                c.log_level =
                    Level::parse(v).ok_or_else(|| format!("--log-level {v:?} is not error, warn, info or debug"))?;
            }
            other if other.starts_with('-') => return Err(format!("unknown flag {other} (see --help)")),
            other => return Err(format!("unexpected argument {other:?} (see --help)")),
        }
    }
    if let Some(p) = port {
        c.listen.set_port(p);
    }
    let one_frame = c.max_frame as u64 + FRAME_MEMORY_SLACK;
    if c.frame_memory < one_frame {
        return Err(format!(
            "--frame-memory {} must hold one frame of --max-frame {} and one read: at least {one_frame}",
            c.frame_memory, c.max_frame
        ));
    }
    if !per_client_given {
        c.max_sessions_per_client = c.max_sessions_per_client.min(c.max_sessions.div_ceil(2));
    }
    if c.max_sessions_per_client > c.max_sessions {
        return Err(format!(
            "--max-sessions-per-client {} must not exceed --max-sessions {}",
            c.max_sessions_per_client, c.max_sessions
        ));
    }
    if !downloads_per_client_given {
        c.max_downloads_per_client = c.max_downloads.div_ceil(2);
    }
    if c.max_downloads_per_client > c.max_downloads {
        return Err(format!(
            "--max-downloads-per-client {} must not exceed --max-downloads {}",
            c.max_downloads_per_client, c.max_downloads
        ));
    }
    if c.cluster_key_file.is_none() {
        c.cluster_key_file = key_file_from_env();
    }
    if let Some(path) = &c.cluster_key_file {
        let loaded = ClusterKey::load(path)?;
        c.cluster_key = Some(loaded.key);
        c.key_warning = loaded.warning;
    }
    if c.private && c.cluster_key.is_none() {
        return Err("--private needs a cluster key (--cluster-key-file or SHARDNET_CLUSTER_KEY_FILE)".into());
    }
    if let (Some(id), Some(total)) = (c.shard_id, c.total_shards)
        && id >= total
    {
        return Err(format!("--shard-id {id} must be below --total-shards {total}"));
    }
    Ok(NodeArgs::Run(Box::new(c)))
}

/// The key file named by `SHARDNET_CLUSTER_KEY_FILE`, if set and not empty.
pub fn key_file_from_env() -> Option<PathBuf> {
    std::env::var_os(auth::KEY_ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// A manifest hash as `--model` takes it: 64 hex digits (SHA-256).
pub fn parse_model_hash(v: &str) -> Result<[u8; 32], String> {
    crate::hash::from_hex::<32>(v)
        .ok_or_else(|| format!("{v:?} is not 64 hex digits (the SHA-256 `shardctl split` prints)"))
}

fn number(flag: &str, v: &str, min: u64, max: u64) -> Result<u64, String> {
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{flag} {v:?} is not a whole number in {min}..={max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<NodeConfig, String> {
        match parse_node_args(args)? {
            NodeArgs::Run(c) => Ok(*c),
            NodeArgs::Help => panic!("help"),
        }
    }

    /// `--max-downloads-per-client` defaults to half of `--max-downloads` (rounded up) and may
    /// not exceed it.
    #[test]
    fn the_download_share_of_a_client_defaults_to_half_the_slots() {
        assert_eq!(run(&[]).unwrap().max_downloads_per_client, 4);
        assert_eq!(run(&["--max-downloads", "5"]).unwrap().max_downloads_per_client, 3);
        assert_eq!(run(&["--max-downloads", "1"]).unwrap().max_downloads_per_client, 1);
        assert_eq!(run(&["--max-downloads-per-client", "8"]).unwrap().max_downloads_per_client, 8);
        let e = run(&["--max-downloads-per-client", "9"]).unwrap_err();
        assert!(e.contains("must not exceed --max-downloads 8"), "{e}");
        assert!(run(&["--max-downloads-per-client", "0"]).is_err());
    }

    #[test]
    fn parses_the_notes_command_line() {
        let c = run(&[
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/51820",
            "--cluster",
            "llama-cluster",
            "--shard-id",
            "0",
            "--total-shards",
            "8",
            "--shards-dir",
            "models_cache/shards",
            "--enable-torrent",
        ])
        .unwrap();
        assert_eq!(c.bootstrap, vec![PeerAddr { host: "127.0.0.1".into(), port: 51820 }]);
        assert_eq!(c.cluster, "llama-cluster");
        assert_eq!((c.shard_id, c.total_shards, c.enable_torrent), (Some(0), Some(8), true));
        assert_eq!(c.listen, "0.0.0.0:51820".parse().unwrap());
        assert!(c.direct_io, "direct I/O by default");
        assert!(!run(&["--cached-writes"]).unwrap().direct_io);
        assert!(!c.dht_read_only);
        assert!(run(&["--dht-read-only"]).unwrap().dht_read_only);
        assert_eq!(c.dht_query_rate, 3);
        assert_eq!(run(&["--dht-query-rate", "4"]).unwrap().dht_query_rate, 4);
        assert_eq!(c.dht_store, crate::dht::store::StoreLimits::default());
        let s = run(&["--dht-max-keys", "5", "--dht-max-peers-per-key", "6", "--dht-max-per-announcer", "7"]).unwrap();
        assert_eq!((s.dht_store.max_keys, s.dht_store.max_peers_per_key, s.dht_store.max_per_announcer), (5, 6, 7));
        assert!(run(&["--dht-max-keys", "0"]).is_err());
        assert_eq!(c.mse_timeout, Duration::from_secs(10));
        assert_eq!(run(&["--mse-timeout", "3"]).unwrap().mse_timeout, Duration::from_secs(3));
        assert!(run(&["--mse-timeout", "0"]).is_err());
        assert_eq!(c.announce_port, None);
        assert_eq!(run(&["--announce-port", "6881"]).unwrap().announce_port, Some(6881));
    }

    #[test]
    fn port_and_listen_and_inline_values() {
        let c = run(&["--listen=127.0.0.1:9000", "--port", "9001", "--max-frame=4096"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(c.max_frame, 4096);
    }

    #[test]
    fn bad_flags_name_themselves() {
        for (args, needle) in [
            (&["--frobnicate"][..], "--frobnicate"),
            (&["--port", "70000"], "--port"),
            (&["--port"], "--port needs a value"),
            (&["--shard-id", "-1"], "--shard-id"),
            (&["--shard-id", "9", "--total-shards", "8"], "below --total-shards"),
            (&["--max-frame", "400000000"], "--max-frame"),
            (&["--bootstrap", "/ip4/999.1.1.1/tcp/1"], "--bootstrap"),
            (&["--log-level", "loud"], "--log-level"),
            (&["--enable-torrent=yes"], "--enable-torrent"),
            (&["stray"], "stray"),
            (&["--threads", "0"], "--threads"),
            (&["--ctx-size", "8"], "--ctx-size"),
            (&["--kv-memory", "lots"], "--kv-memory"),
            (&["--cached-writes=no"], "--cached-writes takes no value"),
            (&["--dht-read-only=1"], "--dht-read-only takes no value"),
            (&["--dht-query-rate", "0"], "--dht-query-rate"),
            (&["--announce-port", "0"], "--announce-port"),
            (&["--announce-port", "65536"], "--announce-port"),
            (&["--max-downloads", "0"], "--max-downloads"),
            (&["--max-download-peers", "x"], "--max-download-peers"),
            (&["--part-expiry", "0"], "--part-expiry"),
            (&["--redial-give-up", "-1"], "--redial-give-up"),
            (&["--download-stall-timeout", "0"], "--download-stall-timeout"),
            (&["--frame-memory", "1048576"], "--frame-memory"),
            (&["--max-command-connections-per-ip", "0"], "--max-command-connections-per-ip"),
            (&["--frame-timeout", "0"], "--frame-timeout"),
        ] {
            let e = run(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn connection_limits_parse_and_idle_timeout_zero_is_never() {
        let c =
            run(&["--max-peer-connections-per-ip", "3", "--idle-timeout", "0", "--frame-memory", "100000000"]).unwrap();
        assert_eq!((c.max_peer_connections_per_ip, c.idle_timeout, c.frame_memory), (3, None, 100_000_000));
        let d = run(&[]).unwrap();
        assert_eq!(d.idle_timeout, Some(Duration::from_secs(300)));
        assert!(d.frame_memory >= d.max_frame as u64 + FRAME_MEMORY_SLACK, "the defaults are consistent");
        let small = run(&["--max-frame", "1024", "--frame-memory", "1048576"]).unwrap();
        assert_eq!(small.frame_memory, 1 << 20);
        assert_eq!(d.limits_json()["frame_timeout_s"], 30);
    }
}
