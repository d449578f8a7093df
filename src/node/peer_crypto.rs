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

/// Counters of MSE handshakes and refusals, for STATUS (`encryption`).
#[derive(Default)]
pub struct MseStats {
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

impl MseStats {
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
