//! Message Stream Encryption on the node's connections: which first bytes are an MSE
//! handshake, a connection's encryption state (handshaking, RC4, plaintext), the policy of
//! `--encryption`, and the counters STATUS shows. The handshake itself is
//! `torrent::mse` (sans-IO); the event loop feeds it here.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::config::Encryption;
use crate::protocol::frame::{MAX_FRAME_LIMIT, PEER_WIRE_FIRST_BYTE};
use crate::torrent::mse::{self, Cipher, Handshake, Inbound, Methods, MseError, Secrets};
use crate::torrent::wire::PROTOCOL;

/// What a connection's first bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum First {
    NeedMore,
    Command,
    /// `\x13BitTorrent protocol`: a plaintext peer-wire handshake.
    PeerWire,
    /// Anything else on a node that speaks MSE: the 96 bytes of `Ya`.
    Encrypted,
}

/// Bytes a command frame's payload may start with on a node that speaks MSE: a JSON object
/// opens with `{` and then `"` (a key), `}` (empty) or whitespace.
const JSON_SECOND: &[u8] = b"\"} \t\n\r";

/// Classifies a connection's first bytes. With `mse` false (no torrent, or `--encryption
/// disable`): byte 19 is the peer wire, anything else commands (no command frame starts with
/// 19: `--max-frame` stays below `19 << 24`). With `mse` true:
/// - `\x13BitTorrent protocol` (all 20 bytes) is the plaintext peer wire;
/// - a command frame is a length below `19 << 24` whose payload starts `{"`, `{}`, `{` and
///   whitespace, or is empty (length 0) or the one byte `{`;
/// - anything else is an MSE handshake (whose first 96 bytes are a random-looking key).
///
/// A key misread as a command frame needs its first byte below 19, its fifth `{` and its
/// sixth one of six bytes: 19/256 x 1/256 x 6/256, about 7 in a million handshakes (the
/// initiator then times out and tries again with a fresh key). One misread as a plaintext
/// handshake needs 20 given bytes: 2^-160.
pub fn classify(buf: &[u8], mse: bool) -> First {
    let Some(&first) = buf.first() else { return First::NeedMore };
    if !mse {
        return if first == PEER_WIRE_FIRST_BYTE { First::PeerWire } else { First::Command };
    }
    if first == PEER_WIRE_FIRST_BYTE {
        let known = buf.len().min(20);
        return if buf[1..known] != PROTOCOL[..known - 1] {
            First::Encrypted
        } else if known < 20 {
            First::NeedMore
        } else {
            First::PeerWire
        };
    }
    let Some(prefix) = buf.get(..4) else { return First::NeedMore };
    let declared = u32::from_be_bytes(prefix.try_into().expect("4 bytes"));
    if declared >= MAX_FRAME_LIMIT {
        return First::Encrypted;
    }
    if declared == 0 {
        return First::Command;
    }
    match (buf.get(4), buf.get(5)) {
        (None, _) => First::NeedMore,
        (Some(b'{'), _) if declared == 1 => First::Command,
        (Some(b'{'), None) => First::NeedMore,
        (Some(b'{'), Some(c)) if JSON_SECOND.contains(c) => First::Command,
        _ => First::Encrypted,
    }
}

/// A peer-wire connection's encryption.
#[derive(Default)]
pub enum Crypt {
    /// Plaintext peer wire (or a command connection).
    #[default]
    Plain,
    /// Classified as MSE; the receiver's handshake starts on the next input.
    Incoming,
    /// The MSE handshake runs; output queued meanwhile is held (the initiator sends the first
    /// of it as IA).
    Handshaking { hs: Box<Handshake>, held: Vec<u8> },
    /// Handshake done: the peer's bytes are decrypted as they are read, ours encrypted as they
    /// are queued (`outbound` `None`: plaintext selected).
    Done { inbound: Box<Inbound>, outbound: Option<Box<Cipher>>, method: u32 },
}

impl Crypt {
    /// An initiator's handshake for `info_hash`; step 1 is appended to `out`.
    pub fn initiator(
        info_hash: crate::torrent::InfoHash,
        policy: Encryption,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Crypt {
        let hs = Handshake::initiator(info_hash, methods(policy), secrets(), now, out);
        Crypt::Handshaking { hs: Box::new(hs), held: Vec::new() }
    }

    /// A receiver's handshake under `policy`.
    pub fn receiver(policy: Encryption, now: Instant) -> Crypt {
        Crypt::Handshaking { hs: Box::new(Handshake::receiver(methods(policy), secrets(), now)), held: Vec::new() }
    }

    pub fn handshaking(&self) -> bool {
        matches!(self, Crypt::Incoming | Crypt::Handshaking { .. })
    }

    /// Whether an MSE handshake has run past its deadline.
    pub fn expired(&self, now: Instant, timeout: Duration) -> bool {
        matches!(self, Crypt::Handshaking { hs, .. } if hs.expired(now, timeout))
    }

    /// Whether the payload is RC4 (`Some(true)`), plaintext after MSE (`Some(false)`), or no
    /// MSE handshake was done (`None`).
    pub fn encrypted(&self) -> Option<bool> {
        match self {
            Crypt::Done { method, .. } => Some(*method == mse::RC4),
            _ => None,
        }
    }
}

/// The payload methods a policy allows, and its preference.
pub fn methods(policy: Encryption) -> Methods {
    match policy {
        Encryption::Require => Methods { allowed: mse::RC4, prefer_rc4: true },
        Encryption::PreferPlaintext => Methods { allowed: mse::PLAINTEXT | mse::RC4, prefer_rc4: false },
        Encryption::PreferEncrypted | Encryption::Disable => {
            Methods { allowed: mse::PLAINTEXT | mse::RC4, prefer_rc4: true }
        }
    }
}

/// Fresh secrets from the kernel's CSPRNG (a clock-seeded hash if /dev/urandom fails: MSE is
/// obfuscation, and a weak key then costs only that).
fn secrets() -> Secrets {
    let mut fill = |buf: &mut [u8]| {
        use std::io::Read;
        let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).is_ok();
        if !ok {
            for (i, chunk) in buf.chunks_mut(20).enumerate() {
                let seed = format!("{:?}{}{i}", std::time::SystemTime::now(), std::process::id());
                let d = crate::hash::sha1(seed.as_bytes());
                chunk.copy_from_slice(&d[..chunk.len()]);
            }
        }
    };
    Secrets::random(&mut fill)
}

/// Counters of MSE handshakes and refusals, for STATUS (`encryption`), and the per-client rate
/// of handshakes received.
#[derive(Default)]
pub struct MseStats {
    /// Handshakes begun: received (each costs two 768-bit modular exponentiations, ~170 us) and
    /// dialled.
    pub started: u64,
    /// Received handshakes closed before any DH work: their client was over `--mse-rate`.
    pub rate_limited: u64,
    /// Tokens of each client's bucket (see [`MseStats::admit`]).
    rate: std::collections::HashMap<std::net::SocketAddr, (f64, std::time::Instant)>,
    pub rc4: u64,
    pub plaintext_selected: u64,
    /// Plaintext handshakes refused under `require` (in) .
    pub plaintext_refused: u64,
    /// Dials retried the other way after the peer dropped the first.
    pub fallbacks: u64,
    pub timeouts: u64,
    /// Closed by the peer before the handshake finished.
    pub closed_midway: u64,
    /// Failures by [`MseError::name`].
    pub failed: std::collections::BTreeMap<&'static str, u64>,
}

/// Clients whose buckets are kept at most; past it, full buckets are forgotten first.
const RATE_CLIENTS: usize = 4096;

impl MseStats {
    /// Whether a handshake from `peer` may begin at `now`, under `rate` a second per client
    /// (a token bucket of `2 * rate`; 0: no limit). A client is an IPv4 address or an IPv6 /64
    /// ([`crate::node::limits::ip_key`]); on loopback (tests, local tools) IP and port, as the
    /// node's other per-client limits. Counts `started` or `rate_limited`. Red-team round 8:
    /// 69,293 handshakes in 15 s from one address took 0.8 of a core.
    pub fn admit(&mut self, peer: std::net::SocketAddr, rate: u32, now: std::time::Instant) -> bool {
        if rate == 0 {
            self.started += 1;
            return true;
        }
        let key = if peer.ip().is_loopback() {
            peer
        } else {
            std::net::SocketAddr::new(crate::node::limits::ip_key(peer.ip()), 0)
        };
        let burst = 2.0 * rate as f64;
        if self.rate.len() >= RATE_CLIENTS && !self.rate.contains_key(&key) {
            // Forget clients whose buckets have refilled (they lose nothing), else the stalest.
            let full = |t: f64, at: std::time::Instant| t + now.duration_since(at).as_secs_f64() * rate as f64 >= burst;
            self.rate.retain(|_, (t, at)| !full(*t, *at));
            if self.rate.len() >= RATE_CLIENTS
                && let Some(oldest) = self.rate.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k)
            {
                self.rate.remove(&oldest);
            }
        }
        let (tokens, at) = self.rate.entry(key).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate as f64).min(burst);
        *at = now;
        if *tokens < 1.0 {
            self.rate_limited += 1;
            return false;
        }
        *tokens -= 1.0;
        self.started += 1;
        true
    }

    pub fn failed(&mut self, e: MseError) {
        *self.failed.entry(e.name()).or_default() += 1;
    }

    pub fn done(&mut self, method: u32) {
        if method == mse::RC4 {
            self.rc4 += 1;
        } else {
            self.plaintext_selected += 1;
        }
    }

    pub fn to_json(&self, policy: Encryption) -> Value {
        json!({
            "policy": policy.name(),
            "started": self.started,
            "rate_limited": self.rate_limited,
            "rc4": self.rc4,
            "plaintext_selected": self.plaintext_selected,
            "plaintext_refused": self.plaintext_refused,
            "fallbacks": self.fallbacks,
            "timeouts": self.timeouts,
            "closed_midway": self.closed_midway,
            "failed": self.failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--mse-rate 20`: a burst of 40 from one address, then 20 a second; another address, or
    /// another IPv6 address of the same /64, shares nothing / everything; loopback is per port.
    #[test]
    fn mse_handshakes_are_rate_limited_per_client() {
        let t0 = std::time::Instant::now();
        let mut s = MseStats::default();
        let a: std::net::SocketAddr = "203.0.113.5:1000".parse().unwrap();
        let ok = (0..100).filter(|i| s.admit(std::net::SocketAddr::new(a.ip(), 1000 + i), 20, t0)).count();
        assert_eq!((ok, s.started, s.rate_limited), (40, 40, 60));
        assert!(s.admit("203.0.113.6:1".parse().unwrap(), 20, t0), "another address");
        let later = t0 + std::time::Duration::from_millis(500);
        let ok = (0..100).filter(|_| s.admit(a, 20, later)).count();
        assert_eq!(ok, 10, "half a second refills 10");
        let v6 = |x: &str| -> std::net::SocketAddr { format!("[2001:db8:0:7::{x}]:1").parse().unwrap() };
        let ok = (1..=100).filter(|i| s.admit(v6(&format!("{i:x}")), 20, t0)).count();
        assert_eq!(ok, 40, "one /64 is one client");
        let ok = (0..100).filter(|i| s.admit(format!("127.0.0.1:{}", 2000 + i).parse().unwrap(), 20, t0)).count();
        assert_eq!(ok, 100, "loopback: per port");
        let mut open = MseStats::default();
        assert_eq!((0..1000).filter(|_| open.admit(a, 0, t0)).count(), 1000, "0: no limit");
        // Bounded memory: at most RATE_CLIENTS buckets.
        for i in 0..10_000u32 {
            s.admit(std::net::SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 1), 20, t0);
        }
        assert!(s.rate.len() <= RATE_CLIENTS);
    }

    #[test]
    fn first_bytes_are_told_apart() {
        let bt = b"\x13BitTorrent protocol\0\0\0\0\0\x10\0\0";
        for mse in [false, true] {
            assert_eq!(classify(bt, mse), First::PeerWire);
            assert_eq!(classify(b"\0\0\0\x10{\"command\"", mse), First::Command);
            assert_eq!(classify(b"", mse), First::NeedMore);
        }
        // Without MSE one byte decides, as before.
        assert_eq!(classify(b"\x13", false), First::PeerWire);
        assert_eq!(classify(b"\xff", false), First::Command);
        // With MSE: a prefix of the protocol string waits, a departure from it is MSE.
        assert_eq!(classify(&bt[..19], true), First::NeedMore);
        assert_eq!(classify(b"\x13BitTorrent protocoX", true), First::Encrypted);
        assert_eq!(classify(b"\x13\x00", true), First::Encrypted);
        // Lengths no frame can have.
        assert_eq!(classify(b"\x14", true), First::NeedMore);
        assert_eq!(classify(b"\x14\0\0\0", true), First::Encrypted);
        assert_eq!(classify(b"\xff\xff\xff\xff", true), First::Encrypted);
        // A legal length: the payload's first bytes decide.
        assert_eq!(classify(b"\0\0\0\0", true), First::Command, "an empty frame");
        assert_eq!(classify(b"\0\0\0\x01{", true), First::Command);
        assert_eq!(classify(b"\0\0\0\x05{", true), First::NeedMore);
        for second in JSON_SECOND {
            assert_eq!(classify(&[0, 0, 1, 0, b'{', *second], true), First::Command);
        }
        assert_eq!(classify(b"\0\0\x01\0{x", true), First::Encrypted);
        assert_eq!(classify(b"\0\0\x01\0[\"", true), First::Encrypted);
        assert_eq!(classify(b"\x12\xff\xff\xff{\"", true), First::Command, "oversized, but a frame");
    }

    #[test]
    fn random_keys_are_almost_never_read_as_commands() {
        // Real public keys: none of 2,000 is taken for a command or a plaintext handshake.
        let now = Instant::now();
        for _ in 0..2000 {
            let mut out = Vec::new();
            let _ = Crypt::initiator(crate::torrent::InfoHash([1; 20]), Encryption::Require, now, &mut out);
            assert_eq!(classify(&out[..mse::KEY_LEN], true), First::Encrypted);
        }
    }
}
