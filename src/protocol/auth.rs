//! Cluster-key authentication of command connections (DESIGN section 11), sans-IO.
//!
//! A node started with `--cluster-key-file` accepts no command but `STATUS` (and `AUTH`) until
//! the connection has proved that it holds the key. The proof is a challenge-response at
//! connection start, and from then on every frame in both directions carries a MAC under keys
//! derived for that connection alone:
//!
//! ```text
//! client -> node  AUTH {"step":"hello", "client_nonce": hex(32 random bytes)}        (plain)
//! node -> client  {"scheme":"hmac-sha256-v1", "node_nonce": hex(32), "node_proof": hex(32)}
//! client -> node  AUTH {"step":"proof", "client_proof": hex(32)}                      (plain)
//! node -> client  {"authenticated": true}                     (the first MACed frame, seq 0)
//!
//! T            = "shardnet-auth-v1" || client_nonce || node_nonce       (16 + 32 + 32 bytes)
//! node_proof   = HMAC-SHA-256(K, "node proof" || T)
//! client_proof = HMAC-SHA-256(K, "client proof" || T)
//! k_c2n        = HMAC-SHA-256(K, "client to node" || T)
//! k_n2c        = HMAC-SHA-256(K, "node to client" || T)
//! sealed frame = u32 BE (len(payload) + 32) || payload || HMAC-SHA-256(k_dir, u64 BE seq || payload)
//! ```
//!
//! `K` is the key file's bytes (surrounding whitespace trimmed); it never crosses the wire.
//! `seq` counts the sealed frames sent in one direction on the connection, from 0, and is not
//! sent: a frame replayed on the same connection arrives under another `seq`, one replayed on
//! another connection under other keys (other nonces), and an edited one fails its MAC. Every
//! MAC is checked with `hmac`'s constant-time `verify_slice`. The node's proof lets a client
//! (or a relaying node) know it talks to a member of the cluster before sending anything.
//!
//! Nothing here touches a socket or reads the clock: nonces and `now` are arguments, so the
//! state machines are tested with plain bytes. [`random_bytes`] (reads `/dev/urandom`) and
//! [`ClusterKey::load`] (reads the key file) are the two edges that do I/O.

use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::frame;

type HmacSha256 = Hmac<Sha256>;

/// The scheme's name, as the node's challenge states it.
pub const SCHEME: &str = "hmac-sha256-v1";
/// Bytes of each side's nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of every MAC (HMAC-SHA-256's output).
pub const TAG_LEN: usize = 32;
/// The environment variable naming the key file when `--cluster-key-file` is not given
/// (`shard_listener` and `shardctl` alike).
pub const KEY_ENV: &str = "SHARDNET_CLUSTER_KEY_FILE";
/// Shortest key accepted, in bytes: 128 bits.
pub const MIN_KEY_LEN: usize = 16;
/// Largest key file read.
pub const MAX_KEY_FILE: u64 = 4096;
/// Default `--auth-timeout`: a handshake not finished this long after its hello is closed.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(10);
const TRANSCRIPT_LABEL: &[u8; 16] = b"shardnet-auth-v1";

/// The cluster key: an HMAC-SHA-256 instance keyed once, cloned per MAC.
#[derive(Clone)]
pub struct ClusterKey {
    mac: HmacSha256,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// A key file read: the key, and a warning when others may read the file.
pub struct LoadedKey {
    pub key: ClusterKey,
    pub warning: Option<String>,
}

impl ClusterKey {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<ClusterKey, String> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(format!("the key is {} bytes; at least {MIN_KEY_LEN} are needed", bytes.len()));
        }
        let mac = HmacSha256::new_from_slice(bytes).map_err(|e| format!("HMAC key: {e}"))?;
        Ok(ClusterKey { mac })
    }

    /// Reads a key file: its bytes, whitespace around them trimmed. Errors: missing or unreadable,
    /// empty, shorter than [`MIN_KEY_LEN`], larger than [`MAX_KEY_FILE`]. A file that group or
    /// others may read loads with a warning (`chmod 600` it).
    pub fn load(path: &std::path::Path) -> Result<LoadedKey, String> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display();
        let file = std::fs::File::open(path).map_err(|e| format!("cluster key file {shown}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("cluster key file {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("cluster key file {shown} is not a regular file"));
        }
        if meta.len() > MAX_KEY_FILE {
            return Err(format!("cluster key file {shown} is {} bytes; at most {MAX_KEY_FILE}", meta.len()));
        }
        let mut bytes = Vec::new();
        file.take(MAX_KEY_FILE).read_to_end(&mut bytes).map_err(|e| format!("cluster key file {shown}: {e}"))?;
        let key = bytes.trim_ascii();
        if key.is_empty() {
            return Err(format!("cluster key file {shown} is empty"));
        }
        let key = ClusterKey::from_bytes(key).map_err(|e| format!("cluster key file {shown}: {e}"))?;
        let mode = meta.permissions().mode();
        let warning = (mode & 0o077 != 0).then(|| {
            format!("cluster key file {shown} has mode {:o}: group and others may read it (chmod 600 it)", mode & 0o777)
        });
        Ok(LoadedKey { key, warning })
    }

    /// HMAC-SHA-256 under the cluster key over the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut m = self.mac.clone();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC of `parts`, compared in constant time; a tag of the wrong
    /// length is false.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut m = self.mac.clone();
        for p in parts {
            m.update(p);
        }
        m.verify_slice(tag).is_ok()
    }

    fn derive(&self, label: &[u8], transcript: &Transcript) -> [u8; TAG_LEN] {
        self.mac(&[label, &transcript.0])
    }

    /// The frame MACs of a connection with this transcript: (client to node, node to client).
    fn frame_macs(&self, t: &Transcript) -> (FrameMac, FrameMac) {
        (FrameMac::new(&self.derive(b"client to node", t)), FrameMac::new(&self.derive(b"node to client", t)))
    }
}

/// The bytes both proofs and both frame keys are derived from.
#[derive(Clone)]
struct Transcript([u8; 16 + 2 * NONCE_LEN]);

impl Transcript {
    fn new(client_nonce: &[u8; NONCE_LEN], node_nonce: &[u8; NONCE_LEN]) -> Transcript {
        let mut t = [0u8; 16 + 2 * NONCE_LEN];
        t[..16].copy_from_slice(TRANSCRIPT_LABEL);
        t[16..16 + NONCE_LEN].copy_from_slice(client_nonce);
        t[16 + NONCE_LEN..].copy_from_slice(node_nonce);
        Transcript(t)
    }
}

/// Why a handshake or a sealed frame was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// A proof or tag of the wrong length.
    BadLength { what: &'static str, len: usize },
    /// A proof that does not verify: the other side lacks the key.
    BadProof,
    /// A sealed frame whose MAC does not verify: replayed, altered, or under another key.
    BadMac,
    /// A sealed frame shorter than its tag.
    ShortFrame(usize),
    /// An `AUTH` step out of order.
    OutOfOrder(&'static str),
    /// A malformed challenge (client side).
    BadChallenge(String),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::BadLength { what, len } => {
                write!(f, "{what} is {len} bytes; HMAC-SHA-256 gives {TAG_LEN}")
            }
            AuthError::BadProof => f.write_str("the proof does not verify: the cluster keys differ"),
            AuthError::BadMac => f.write_str("frame MAC does not verify (replayed, altered, or another key)"),
            AuthError::ShortFrame(n) => write!(f, "sealed frame of {n} bytes is shorter than its {TAG_LEN}-byte MAC"),
            AuthError::OutOfOrder(why) => f.write_str(why),
            AuthError::BadChallenge(why) => write!(f, "the node's challenge: {why}"),
        }
    }
}

/// One direction's MAC: the connection's key for that direction and the count of frames so far.
#[derive(Clone)]
pub struct FrameMac {
    mac: HmacSha256,
    seq: u64,
}

impl FrameMac {
    fn new(key: &[u8; TAG_LEN]) -> FrameMac {
        FrameMac { mac: HmacSha256::new_from_slice(key).expect("HMAC takes any key length"), seq: 0 }
    }

    fn tagger(&self) -> HmacSha256 {
        let mut m = self.mac.clone();
        m.update(&self.seq.to_be_bytes());
        m
    }

    /// Appends one sealed frame carrying `payload` to `out` (length prefix, payload, tag).
    pub fn seal_frame(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        let len = u32::try_from(payload.len() + TAG_LEN).expect("frame payload over 4 GiB");
        out.reserve(frame::HEADER_LEN + payload.len() + TAG_LEN);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(payload);
        let mut m = self.tagger();
        m.update(payload);
        out.extend_from_slice(&m.finalize().into_bytes());
        self.seq += 1;
    }

    /// Checks one received sealed frame (`payload || tag`, the length prefix removed) and
    /// returns its payload. A refused frame leaves the count unchanged.
    pub fn open<'a>(&mut self, sealed: &'a [u8]) -> Result<&'a [u8], AuthError> {
        if sealed.len() < TAG_LEN {
            return Err(AuthError::ShortFrame(sealed.len()));
        }
        let (payload, tag) = sealed.split_at(sealed.len() - TAG_LEN);
        let mut m = self.tagger();
        m.update(payload);
        m.verify_slice(tag).map_err(|_| AuthError::BadMac)?;
        self.seq += 1;
        Ok(payload)
    }
}

/// A command connection's state on the node.
pub enum NodeAuth {
    /// The node has no key: every command is accepted, nothing is sealed.
    Open,
    /// Keyed node, no handshake yet: only `STATUS` and `AUTH` hello.
    Unauthenticated,
    /// Challenge sent at `since`, waiting for the client's proof.
    Challenged { transcript: Box<[u8; 16 + 2 * NONCE_LEN]>, since: Instant },
    /// Proved: every frame is sealed both ways.
    Established { rx: Box<FrameMac>, tx: Box<FrameMac> },
}

impl NodeAuth {
    /// The state a new connection starts in.
    pub fn new(keyed: bool) -> NodeAuth {
        if keyed { NodeAuth::Unauthenticated } else { NodeAuth::Open }
    }

    /// Whether commands other than `STATUS` and `AUTH` are accepted.
    pub fn authorized(&self) -> bool {
        matches!(self, NodeAuth::Open | NodeAuth::Established { .. })
    }

    pub fn established(&self) -> bool {
        matches!(self, NodeAuth::Established { .. })
    }

    /// AUTH hello: records both nonces and returns the challenge (the `AUTH` result).
    pub fn hello(
        &mut self,
        key: &ClusterKey,
        client_nonce: &[u8; NONCE_LEN],
        node_nonce: &[u8; NONCE_LEN],
        now: Instant,
    ) -> Result<Value, AuthError> {
        if !matches!(self, NodeAuth::Unauthenticated) {
            return Err(AuthError::OutOfOrder("AUTH hello is the first step, once per connection"));
        }
        let t = Transcript::new(client_nonce, node_nonce);
        let proof = key.derive(b"node proof", &t);
        *self = NodeAuth::Challenged { transcript: Box::new(t.0), since: now };
        Ok(json!({"scheme": SCHEME, "node_nonce": to_hex(node_nonce), "node_proof": to_hex(&proof)}))
    }

    /// AUTH proof: checks the client's proof; on success every later frame is sealed (the
    /// answer to this step is the first).
    pub fn proof(&mut self, key: &ClusterKey, client_proof: &[u8]) -> Result<(), AuthError> {
        let NodeAuth::Challenged { transcript, .. } = self else {
            return Err(AuthError::OutOfOrder("AUTH proof must follow AUTH hello on the same connection"));
        };
        if client_proof.len() != TAG_LEN {
            return Err(AuthError::BadLength { what: "client_proof", len: client_proof.len() });
        }
        let t = Transcript(**transcript);
        if !key.verify(&[b"client proof", &t.0], client_proof) {
            return Err(AuthError::BadProof);
        }
        let (rx, tx) = key.frame_macs(&t);
        *self = NodeAuth::Established { rx: Box::new(rx), tx: Box::new(tx) };
        Ok(())
    }

    /// Whether a handshake begun has been waiting for its proof longer than `timeout`.
    pub fn expired(&self, now: Instant, timeout: Duration) -> bool {
        matches!(self, NodeAuth::Challenged { since, .. } if now.duration_since(*since) > timeout)
    }

    /// A received frame's payload: as it is, or checked and stripped of its MAC once established.
    pub fn open<'a>(&mut self, frame: &'a [u8]) -> Result<&'a [u8], AuthError> {
        match self {
            NodeAuth::Established { rx, .. } => rx.open(frame),
            _ => Ok(frame),
        }
    }

    /// Appends one frame carrying `payload`: sealed once established, plain before.
    pub fn encode(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        match self {
            NodeAuth::Established { tx, .. } => tx.seal_frame(payload, out),
            _ => frame::encode(payload, out),
        }
    }
}

/// The client's side of the handshake.
pub struct ClientHandshake {
    key: ClusterKey,
    client_nonce: [u8; NONCE_LEN],
}

/// What the client sends after checking the node's challenge, and its frame MACs.
pub struct ClientProof {
    /// The `params` of `AUTH` proof.
    pub params: Value,
    /// Seals the client's frames.
    pub tx: FrameMac,
    /// Opens the node's frames (the answer to the proof is the first).
    pub rx: FrameMac,
}

impl ClientHandshake {
    pub fn new(key: ClusterKey, client_nonce: [u8; NONCE_LEN]) -> ClientHandshake {
        ClientHandshake { key, client_nonce }
    }

    /// The `params` of `AUTH` hello.
    pub fn hello_params(&self) -> Value {
        json!({"step": "hello", "client_nonce": to_hex(&self.client_nonce)})
    }

    /// Checks the node's challenge (the hello's `result`): a node without the key cannot make
    /// its proof. Returns the proof to send and the connection's frame MACs.
    pub fn answer(&self, challenge: &Value) -> Result<ClientProof, AuthError> {
        let field = |name: &str| -> Result<Vec<u8>, AuthError> {
            let s = challenge[name].as_str().ok_or_else(|| AuthError::BadChallenge(format!("no {name}")))?;
            from_hex(s).ok_or_else(|| AuthError::BadChallenge(format!("{name} is not hex")))
        };
        if challenge["scheme"] != SCHEME {
            return Err(AuthError::BadChallenge(format!("scheme {} is not {SCHEME}", challenge["scheme"])));
        }
        let node_nonce: [u8; NONCE_LEN] = field("node_nonce")?
            .try_into()
            .map_err(|v: Vec<u8>| AuthError::BadLength { what: "node_nonce", len: v.len() })?;
        let node_proof = field("node_proof")?;
        if node_proof.len() != TAG_LEN {
            return Err(AuthError::BadLength { what: "node_proof", len: node_proof.len() });
        }
        let t = Transcript::new(&self.client_nonce, &node_nonce);
        if !self.key.verify(&[b"node proof", &t.0], &node_proof) {
            return Err(AuthError::BadProof);
        }
        let proof = self.key.derive(b"client proof", &t);
        let (tx, rx) = self.key.frame_macs(&t);
        Ok(ClientProof { params: json!({"step": "proof", "client_proof": to_hex(&proof)}), tx, rx })
    }
}

/// `AUTH` params as the node parses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthStep {
    Hello {
        client_nonce: [u8; NONCE_LEN],
    },
    /// The proof's bytes, whatever their length (the state machine checks it).
    Proof {
        client_proof: Vec<u8>,
    },
}

/// Parses `AUTH` params: `{"step": "hello", "client_nonce": hex(32)}` or
/// `{"step": "proof", "client_proof": hex}`.
pub fn parse_step(params: &serde_json::Map<String, Value>) -> Result<AuthStep, String> {
    let hex = |name: &str| -> Result<Vec<u8>, String> {
        let s = params.get(name).and_then(Value::as_str).ok_or_else(|| format!("missing param {name:?}"))?;
        if s.len() > 4 * TAG_LEN {
            return Err(format!("{name} is {} hex digits; {} expected", s.len(), 2 * TAG_LEN));
        }
        from_hex(s).ok_or_else(|| format!("{name} is not hex"))
    };
    match params.get("step").and_then(Value::as_str) {
        Some("hello") => {
            let n = hex("client_nonce")?;
            let client_nonce = n
                .try_into()
                .map_err(|v: Vec<u8>| format!("client_nonce is {} bytes; {NONCE_LEN} expected", v.len()))?;
            Ok(AuthStep::Hello { client_nonce })
        }
        Some("proof") => Ok(AuthStep::Proof { client_proof: hex("client_proof")? }),
        _ => Err("AUTH param \"step\" must be \"hello\" or \"proof\"".into()),
    }
}

/// The private-swarm proof a peer sends in the BEP 10 extension `shardnet_auth`:
/// `HMAC-SHA-256(K, "shardnet-peer-v1" || info_hash || verifier_nonce || prover_nonce || prover_peer_id)`.
/// Bound to the verifier's fresh nonce (no replay) and to the prover's peer id (a peer that
/// reflects our own proof back must claim our peer id, which is refused as a connection to
/// ourselves).
pub fn peer_proof(
    key: &ClusterKey,
    info_hash: &[u8; 20],
    verifier_nonce: &[u8; NONCE_LEN],
    prover_nonce: &[u8; NONCE_LEN],
    prover_peer_id: &[u8; 20],
) -> [u8; TAG_LEN] {
    key.mac(&[b"shardnet-peer-v1", info_hash, verifier_nonce, prover_nonce, prover_peer_id])
}

/// The keyed DHT name a `--private` node announces and looks up instead of `id` (an info hash,
/// a shard's name key, the cluster key): the first 20 bytes of
/// `HMAC-SHA-256(K, "shardnet-dht-v1" || id)`. Without the key the name says nothing.
pub fn dht_name(key: &ClusterKey, id: &[u8; 20]) -> [u8; 20] {
    let mac = key.mac(&[b"shardnet-dht-v1", id]);
    mac[..20].try_into().expect("20 of 32 bytes")
}

/// `N` bytes from the kernel's CSPRNG (`/dev/urandom`); never a weaker fallback.
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    use std::io::Read;
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

use crate::hash::{from_hex_vec as from_hex, to_hex};

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: &[u8]) -> ClusterKey {
        ClusterKey::from_bytes(b).unwrap()
    }

    /// A whole handshake between the two state machines, then sealed frames both ways.
    fn handshake(client_key: &[u8], node_key: &[u8]) -> Result<(NodeAuth, ClientProof), AuthError> {
        handshake_with(client_key, node_key, 9)
    }

    fn handshake_with(client_key: &[u8], node_key: &[u8], nonce: u8) -> Result<(NodeAuth, ClientProof), AuthError> {
        let now = Instant::now();
        let client = ClientHandshake::new(key(client_key), [7; NONCE_LEN]);
        let mut node = NodeAuth::new(true);
        let params = client.hello_params();
        let step = parse_step(params.as_object().unwrap()).unwrap();
        let AuthStep::Hello { client_nonce } = step else { panic!() };
        let challenge = node.hello(&key(node_key), &client_nonce, &[nonce; NONCE_LEN], now)?;
        let proof = client.answer(&challenge)?;
        let AuthStep::Proof { client_proof } = parse_step(proof.params.as_object().unwrap()).unwrap() else { panic!() };
        node.proof(&key(node_key), &client_proof)?;
        Ok((node, proof))
    }

    fn strip(wire: &[u8]) -> &[u8] {
        let frame::Decoded::Frame { len } = frame::decode(wire, u32::MAX) else { panic!() };
        &wire[frame::HEADER_LEN..frame::HEADER_LEN + len]
    }

    #[test]
    fn same_key_authenticates_and_seals_both_ways() {
        let (mut node, mut client) = handshake(b"0123456789abcdef-k", b"0123456789abcdef-k").unwrap();
        assert!(node.authorized());
        for i in 0..3u8 {
            let mut wire = Vec::new();
            client.tx.seal_frame(&[b'x', i], &mut wire);
            assert_eq!(node.open(strip(&wire)).unwrap(), &[b'x', i]);
            let mut back = Vec::new();
            node.encode(b"answer", &mut back);
            assert_eq!(client.rx.open(strip(&back)).unwrap(), b"answer");
        }
    }

    #[test]
    fn a_node_with_another_key_cannot_prove_itself() {
        assert_eq!(handshake(b"0123456789abcdef-k", b"0123456789abcdef-X").err(), Some(AuthError::BadProof));
    }

    #[test]
    fn a_client_proof_of_the_wrong_length_or_value_is_refused() {
        let k = key(b"0123456789abcdef-k");
        let mut node = NodeAuth::new(true);
        node.hello(&k, &[1; NONCE_LEN], &[2; NONCE_LEN], Instant::now()).unwrap();
        assert_eq!(node.proof(&k, &[0; 31]), Err(AuthError::BadLength { what: "client_proof", len: 31 }));
        assert_eq!(node.proof(&k, &[0; 32]), Err(AuthError::BadProof));
        assert!(!node.authorized());
    }

    #[test]
    fn replayed_and_altered_frames_are_refused() {
        let (mut node, mut client) = handshake(b"0123456789abcdef-k", b"0123456789abcdef-k").unwrap();
        let mut wire = Vec::new();
        client.tx.seal_frame(br#"{"command":"LIST_FILES"}"#, &mut wire);
        let sealed = strip(&wire).to_vec();
        node.open(&sealed).unwrap();
        // The same bytes again: the count moved on.
        assert_eq!(node.open(&sealed), Err(AuthError::BadMac));
        // On another connection (another node nonce): other keys, even at seq 0.
        let (mut other, _) = handshake_with(b"0123456789abcdef-k", b"0123456789abcdef-k", 10).unwrap();
        assert_eq!(other.open(&sealed), Err(AuthError::BadMac));
        // One flipped bit anywhere.
        let mut next = Vec::new();
        client.tx.seal_frame(b"payload", &mut next);
        let good = strip(&next).to_vec();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert_eq!(node.open(&bad), Err(AuthError::BadMac), "byte {i}");
        }
        assert_eq!(node.open(&good).unwrap(), b"payload", "refusals do not advance the count");
        assert_eq!(node.open(&good[..10]), Err(AuthError::ShortFrame(10)));
    }

    #[test]
    fn a_proof_is_bound_to_its_connections_nonces() {
        let k = key(b"0123456789abcdef-k");
        let (now, client) = (Instant::now(), ClientHandshake::new(k.clone(), [1; NONCE_LEN]));
        let mut a = NodeAuth::new(true);
        let challenge = a.hello(&k, &[1; NONCE_LEN], &[2; NONCE_LEN], now).unwrap();
        let proof = client.answer(&challenge).unwrap();
        let AuthStep::Proof { client_proof } = parse_step(proof.params.as_object().unwrap()).unwrap() else { panic!() };
        let mut b = NodeAuth::new(true);
        b.hello(&k, &[1; NONCE_LEN], &[5; NONCE_LEN], now).unwrap();
        assert_eq!(b.proof(&k, &client_proof), Err(AuthError::BadProof), "replayed on another connection");
        a.proof(&k, &client_proof).unwrap();
    }

    #[test]
    fn a_handshake_waits_only_so_long() {
        let k = key(b"0123456789abcdef-k");
        let t0 = Instant::now();
        let mut node = NodeAuth::new(true);
        assert!(!node.expired(t0 + Duration::from_secs(100), Duration::from_secs(1)), "no handshake begun");
        node.hello(&k, &[1; NONCE_LEN], &[2; NONCE_LEN], t0).unwrap();
        assert!(!node.expired(t0 + Duration::from_millis(900), Duration::from_secs(1)));
        assert!(node.expired(t0 + Duration::from_millis(1100), Duration::from_secs(1)));
    }

    #[test]
    fn steps_out_of_order_are_refused() {
        let k = key(b"0123456789abcdef-k");
        let mut node = NodeAuth::new(true);
        assert!(matches!(node.proof(&k, &[0; 32]), Err(AuthError::OutOfOrder(_))));
        node.hello(&k, &[1; NONCE_LEN], &[2; NONCE_LEN], Instant::now()).unwrap();
        assert!(matches!(
            node.hello(&k, &[1; NONCE_LEN], &[2; NONCE_LEN], Instant::now()),
            Err(AuthError::OutOfOrder(_))
        ));
        assert!(matches!(NodeAuth::new(false).hello(&k, &[1; 32], &[2; 32], Instant::now()), Err(_)));
    }

    #[test]
    fn keys_shorter_than_128_bits_are_refused() {
        assert!(ClusterKey::from_bytes(b"short").is_err());
        assert!(ClusterKey::from_bytes(&[0; MIN_KEY_LEN]).is_ok());
    }

    /// RFC 4231 test case 2, so the MAC is HMAC-SHA-256 and nothing else.
    #[test]
    fn mac_is_hmac_sha256() {
        let m = HmacSha256::new_from_slice(b"Jefe").unwrap().chain_update(b"what do ya want for nothing?");
        assert_eq!(
            to_hex(&m.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
