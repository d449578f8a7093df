//! Message Stream Encryption (MSE, "protocol encryption" in libtorrent, qBittorrent,
//! Transmission and aria2): the obfuscated handshake that may precede a BitTorrent handshake,
//! as a sans-IO state machine for both sides, and the RC4 streams it leaves behind.
//!
//! The spec (Vuze wiki "Message Stream Encryption"; libtorrent `bt_peer_connection.cpp` and
//! `pe_crypto.cpp` are the reference behaviour):
//!
//! ```text
//! 1 A->B: Ya, PadA
//! 2 B->A: Yb, PadB
//! 3 A->B: HASH("req1", S), HASH("req2", SKEY) xor HASH("req3", S),
//!         ENCRYPT(VC, crypto_provide, len(PadC), PadC, len(IA)), ENCRYPT(IA)
//! 4 B->A: ENCRYPT(VC, crypto_select, len(PadD), PadD), ENCRYPT2(payload)
//! 5 A->B: ENCRYPT2(payload)
//! ```
//!
//! `Y = 2^X mod P` (P the 768-bit prime below, X 160 random bits), each sent as 96 bytes big
//! endian; `S = Yb^Xa = Ya^Xb mod P` (96 bytes); `SKEY` the torrent's info hash; pads are 0-512
//! random bytes; `VC` is 8 zero bytes; `crypto_provide`/`crypto_select` are u32 BE bit sets
//! (0x01 plaintext, 0x02 RC4), lengths u16 BE. `ENCRYPT` is RC4 keyed with
//! `SHA1("keyA" || S || SKEY)` from A to B and `SHA1("keyB" || S || SKEY)` from B to A, the first
//! 1024 keystream bytes discarded, each stream continuing across the handshake and the payload.
//! `ENCRYPT2` is the selected method: the same RC4 streams, or plaintext. IA (A's first
//! payload, usually its BitTorrent handshake) is always RC4.
//!
//! B finds the start of step 3 by searching for `HASH("req1", S)` within 512 bytes after `Ya`
//! (PadA), and the torrent by trying `HASH("req2", ih)` of every info hash it serves; A finds
//! step 4 by searching for the encrypted VC within 512 bytes after `Yb` (PadB). So neither side
//! buffers more than [`MAX_HANDSHAKE_BYTES`] before the handshake is done, whatever the peer
//! sends, and every bad input ends the handshake with an [`MseError`].
//!
//! MSE is obfuscation, not authentication: the Diffie-Hellman exchange is anonymous, so an
//! on-path attacker can sit in the middle; it hides the protocol and the info hash from
//! passive observers who do not already know the info hash.

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use num_bigint::BigUint;
use rc4::{KeyInit, Rc4, StreamCipher};

use super::metainfo::InfoHash;
use crate::hash::Hasher;

/// Bytes of a public key (`Ya`, `Yb`) and of the shared secret `S`.
pub const KEY_LEN: usize = 96;
/// Bytes of a private exponent: 160 bits, as libtorrent uses.
pub const PRIVATE_LEN: usize = 20;
/// Longest pad the spec allows (PadA..PadD).
pub const MAX_PAD: usize = 512;
/// `crypto_provide` / `crypto_select` bit: the payload goes in plaintext after the handshake.
pub const PLAINTEXT: u32 = 0x01;
/// `crypto_provide` / `crypto_select` bit: the payload is RC4-encrypted.
pub const RC4: u32 = 0x02;
/// How long a handshake may take from its first byte (libtorrent's `handshake_timeout`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes either side reads before the handshake is done: the receiver's worst case,
/// `Ya, PadA, HASH req1, HASH req2^req3, VC, crypto_provide, len(PadC), PadC, len(IA)`.
pub const MAX_HANDSHAKE_BYTES: usize = KEY_LEN + MAX_PAD + 20 + 20 + 8 + 4 + 2 + MAX_PAD + 2;

/// The verification constant.
const VC: [u8; 8] = [0; 8];
/// Keystream bytes dropped after keying RC4 (the spec; RC4's first bytes are biased).
const DISCARD: usize = 1024;
/// The 768-bit MODP prime of the spec (RFC 2409's first Oakley group).
const PRIME_HEX: &[u8] = b"FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A\
08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A63A36210000000000090563";

fn prime() -> &'static BigUint {
    static P: OnceLock<BigUint> = OnceLock::new();
    P.get_or_init(|| BigUint::parse_bytes(PRIME_HEX, 16).expect("the spec's prime"))
}

/// Why a handshake failed. Each closes the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MseError {
    /// The peer's public key is outside `[2, P-2]` (a degenerate key fixes the secret).
    BadPublicKey,
    /// `HASH("req1", S)` (receiver) or the encrypted VC (initiator) was not within 512 bytes
    /// of pad after the peer's key: a pad over 512 bytes, a wrong secret, or not MSE at all.
    SyncNotFound,
    /// The decrypted verification constant is not 8 zero bytes.
    VerificationConstant,
    /// PadC or PadD declared longer than 512 bytes.
    PadTooLong(u16),
    /// `HASH("req2", SKEY)` matches no torrent we serve.
    UnknownInfoHash,
    /// The initiator offers no method we accept (the offer's bits).
    NoCommonMethod(u32),
    /// The receiver selected something we did not offer, or not exactly one method.
    BadSelect(u32),
}

impl MseError {
    /// A short name for counters (STATUS).
    pub fn name(self) -> &'static str {
        match self {
            MseError::BadPublicKey => "bad_public_key",
            MseError::SyncNotFound => "sync_not_found",
            MseError::VerificationConstant => "verification_constant",
            MseError::PadTooLong(_) => "pad_too_long",
            MseError::UnknownInfoHash => "unknown_info_hash",
            MseError::NoCommonMethod(_) => "no_common_method",
            MseError::BadSelect(_) => "bad_select",
        }
    }
}

impl fmt::Display for MseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MseError::BadPublicKey => write!(f, "MSE: the peer's public key is outside [2, P-2]"),
            MseError::SyncNotFound => write!(f, "MSE: no synchronisation within {MAX_PAD} bytes of padding"),
            MseError::VerificationConstant => write!(f, "MSE: wrong verification constant"),
            MseError::PadTooLong(n) => write!(f, "MSE: padding of {n} bytes (at most {MAX_PAD})"),
            MseError::UnknownInfoHash => write!(f, "MSE: the peer asks for a torrent we do not serve"),
            MseError::NoCommonMethod(p) => write!(f, "MSE: the peer offers crypto {p:#x}, none of which we allow"),
            MseError::BadSelect(s) => write!(f, "MSE: the peer selected crypto {s:#x}, which we did not offer"),
        }
    }
}

impl std::error::Error for MseError {}

/// Which payload methods one side allows, and which it picks when offered both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Methods {
    /// [`PLAINTEXT`], [`RC4`] or both.
    pub allowed: u32,
    pub prefer_rc4: bool,
}

impl Methods {
    /// The receiver's choice among `offered`: one bit, or `None`.
    fn select(self, offered: u32) -> Option<u32> {
        let common = offered & self.allowed & (PLAINTEXT | RC4);
        match common {
            0 => None,
            PLAINTEXT | RC4 => Some(common),
            _ => Some(if self.prefer_rc4 { RC4 } else { PLAINTEXT }),
        }
    }
}

/// The random inputs of one handshake: the private exponent and the two pads this side
/// sends (PadA and PadC for the initiator, PadB and PadD for the receiver; each at most 512
/// bytes). Given by the caller, so tests are deterministic.
pub struct Secrets {
    pub private_key: [u8; PRIVATE_LEN],
    pub pad1: Vec<u8>,
    pub pad2: Vec<u8>,
}

impl Secrets {
    /// Fresh secrets from `fill` (the kernel's CSPRNG in the node): pads of 0-512 random bytes.
    pub fn random(fill: &mut dyn FnMut(&mut [u8])) -> Secrets {
        let mut private_key = [0u8; PRIVATE_LEN];
        fill(&mut private_key);
        let mut lens = [0u8; 4];
        fill(&mut lens);
        let len = |b: [u8; 2]| u16::from_be_bytes(b) as usize % (MAX_PAD + 1);
        let (mut pad1, mut pad2) = (vec![0; len([lens[0], lens[1]])], vec![0; len([lens[2], lens[3]])]);
        fill(&mut pad1);
        fill(&mut pad2);
        Secrets { private_key, pad1, pad2 }
    }
}

/// One direction's RC4 stream, keyed as the spec says, its first 1024 bytes discarded.
pub struct Cipher(Rc4);

impl Cipher {
    fn new(label: &[u8; 4], secret: &[u8; KEY_LEN], skey: &InfoHash) -> Cipher {
        let mut h = Hasher::default();
        h.update(label);
        h.update(secret);
        h.update(&skey.0);
        let mut rc4 = Rc4::new_from_slice(&h.finish()).expect("a 20-byte key is valid for RC4");
        rc4.apply_keystream(&mut [0u8; DISCARD]);
        Cipher(rc4)
    }

    /// Encrypts or decrypts `buf` in place, advancing the stream.
    pub fn apply(&mut self, buf: &mut [u8]) {
        self.0.apply_keystream(buf);
    }
}

/// What decrypts the peer's bytes once the handshake is done.
pub struct Inbound {
    cipher: Option<Cipher>,
    /// Bytes still RC4 before the stream turns plaintext (IA under a plaintext selection);
    /// `None`: RC4 to the end.
    rc4_left: Option<usize>,
}

impl Inbound {
    /// Plaintext from here on.
    pub fn plaintext() -> Inbound {
        Inbound { cipher: None, rc4_left: Some(0) }
    }

    /// Decrypts the next `buf.len()` bytes of the peer's stream in place.
    pub fn decrypt(&mut self, buf: &mut [u8]) {
        let Some(c) = &mut self.cipher else { return };
        match &mut self.rc4_left {
            None => c.apply(buf),
            Some(left) => {
                let n = (*left).min(buf.len());
                c.apply(&mut buf[..n]);
                *left -= n;
                if *left == 0 {
                    self.cipher = None;
                }
            }
        }
    }
}

/// A finished handshake.
pub struct Established {
    pub info_hash: InfoHash,
    /// [`PLAINTEXT`] or [`RC4`]: the method selected for the payload.
    pub method: u32,
    /// Decrypts the peer's bytes that follow the handshake (the receiver's start with IA).
    pub inbound: Inbound,
    /// Encrypts what we send from now on; `None` under plaintext.
    pub outbound: Option<Cipher>,
}

enum State {
    /// Initiator: waiting for `Yb`.
    KeyB,
    /// Initiator: searching PadB for the encrypted VC.
    SyncVc,
    /// Initiator: `crypto_select, len(PadD)`.
    Select,
    /// Initiator: PadD of this length.
    PadD(usize),
    /// Receiver: waiting for `Ya`.
    KeyA,
    /// Receiver: searching PadA for `HASH("req1", S)`.
    SyncReq1,
    /// Receiver: `HASH("req2", SKEY) xor HASH("req3", S), VC, crypto_provide, len(PadC)`.
    Skey,
    /// Receiver: PadC of this length, then `len(IA)`; the selected method.
    PadC(usize, u32),
    Done,
    Failed,
}

/// One side of the handshake, fed the bytes the peer sent.
pub struct Handshake {
    state: State,
    methods: Methods,
    keys: Keys,
    started: Instant,
    /// Initiator: the torrent we ask for. Receiver: the one the peer asked for, once found.
    skey: Option<InfoHash>,
    secret: [u8; KEY_LEN],
    /// The pad we send second (PadC or PadD).
    pad2: Vec<u8>,
    /// Initiator: the methods offered.
    provided: u32,
    /// The pattern searched for in the sync state.
    sync: Vec<u8>,
    recv: Option<Cipher>,
    send: Option<Cipher>,
}

struct Keys {
    private: BigUint,
    public: [u8; KEY_LEN],
}

impl Keys {
    fn new(private_key: &[u8; PRIVATE_LEN]) -> Keys {
        let private = BigUint::from_bytes_be(private_key);
        let public = to_key_bytes(&BigUint::from(2u32).modpow(&private, prime()));
        Keys { private, public }
    }

    fn shared(&self, theirs: &[u8]) -> Result<[u8; KEY_LEN], MseError> {
        let y = BigUint::from_bytes_be(theirs);
        let p = prime();
        if y < BigUint::from(2u32) || y >= p - 1u32 {
            return Err(MseError::BadPublicKey);
        }
        Ok(to_key_bytes(&y.modpow(&self.private, p)))
    }
}

fn to_key_bytes(n: &BigUint) -> [u8; KEY_LEN] {
    let b = n.to_bytes_be();
    let mut out = [0u8; KEY_LEN];
    out[KEY_LEN - b.len()..].copy_from_slice(&b);
    out
}

fn sha1_of(parts: &[&[u8]]) -> [u8; 20] {
    let mut h = Hasher::default();
    for p in parts {
        h.update(p);
    }
    h.finish()
}

/// `HASH("req2", SKEY)`: how a receiver recognises a torrent it serves.
pub fn req2_hash(info_hash: &InfoHash) -> [u8; 20] {
    sha1_of(&[b"req2", &info_hash.0])
}

/// Position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What one [`Handshake::feed`] did.
pub struct Fed {
    /// Input bytes used; the caller drops them.
    pub used: usize,
    /// The handshake finished: what follows `used` is payload.
    pub done: Option<Established>,
}

impl Handshake {
    /// The initiator (A) asking for `info_hash`, offering `methods.allowed`; step 1 (`Ya`,
    /// PadA) is appended to `out`.
    pub fn initiator(info_hash: InfoHash, methods: Methods, secrets: Secrets, now: Instant, out: &mut Vec<u8>) -> Self {
        let mut hs = Handshake::new(State::KeyB, methods, secrets, now, out);
        hs.skey = Some(info_hash);
        hs.provided = methods.allowed & (PLAINTEXT | RC4);
        hs
    }

    /// The receiver (B), choosing among `methods.allowed`; it speaks once `Ya` is in.
    pub fn receiver(methods: Methods, secrets: Secrets, now: Instant) -> Self {
        Handshake::new(State::KeyA, methods, secrets, now, &mut Vec::new())
    }

    fn new(state: State, methods: Methods, secrets: Secrets, now: Instant, out: &mut Vec<u8>) -> Self {
        let Secrets { private_key, mut pad1, mut pad2 } = secrets;
        pad1.truncate(MAX_PAD);
        pad2.truncate(MAX_PAD);
        let keys = Keys::new(&private_key);
        let receiver = matches!(state, State::KeyA);
        if !receiver {
            out.extend_from_slice(&keys.public);
            out.extend_from_slice(&pad1);
        }
        Handshake {
            state,
            methods,
            keys,
            started: now,
            skey: None,
            secret: [0; KEY_LEN],
            pad2,
            provided: 0,
            // The receiver keeps PadB here until it sends step 2.
            sync: if receiver { pad1 } else { Vec::new() },
            recv: None,
            send: None,
        }
    }

    /// Whether the handshake has run past `timeout` (the node's `--mse-timeout`, by default
    /// [`HANDSHAKE_TIMEOUT`]) at `now`.
    pub fn expired(&self, now: Instant, timeout: Duration) -> bool {
        now.duration_since(self.started) > timeout
    }

    /// Feeds the peer's unconsumed bytes (all of them, each time). Replies are appended to
    /// `out`. `held`: the initiator's payload so far, taken as IA (at most 65,535 bytes) when
    /// step 3 is written; the rest stays for the caller to send after the handshake.
    /// `serves(HASH("req2", SKEY))` names the torrent a receiver serves under that hash.
    ///
    /// Errors: any [`MseError`]; the handshake is then dead and the connection must close.
    pub fn feed(
        &mut self,
        input: &[u8],
        held: &mut Vec<u8>,
        serves: &dyn Fn(&[u8; 20]) -> Option<InfoHash>,
        out: &mut Vec<u8>,
    ) -> Result<Fed, MseError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            let step = match self.step(rest, held, serves, out) {
                Ok(s) => s,
                Err(e) => {
                    self.state = State::Failed;
                    return Err(e);
                }
            };
            match step {
                Step::NeedMore => return Ok(Fed { used, done: None }),
                Step::Used(n) => used += n,
                Step::Done(n, est) => return Ok(Fed { used: used + n, done: Some(*est) }),
            }
        }
    }

    fn step(
        &mut self,
        rest: &[u8],
        held: &mut Vec<u8>,
        serves: &dyn Fn(&[u8; 20]) -> Option<InfoHash>,
        out: &mut Vec<u8>,
    ) -> Result<Step, MseError> {
        match self.state {
            State::KeyB | State::KeyA if rest.len() < KEY_LEN => Ok(Step::NeedMore),
            State::KeyB => {
                self.secret = self.keys.shared(&rest[..KEY_LEN])?;
                self.write_step3(held, out);
                let mut recv = Cipher::new(b"keyB", &self.secret, &self.skey.expect("initiator"));
                let mut vc = VC;
                recv.apply(&mut vc);
                self.sync = vc.to_vec();
                self.recv = Some(recv);
                self.state = State::SyncVc;
                Ok(Step::Used(KEY_LEN))
            }
            State::KeyA => {
                self.secret = self.keys.shared(&rest[..KEY_LEN])?;
                out.extend_from_slice(&self.keys.public);
                out.extend_from_slice(&self.sync);
                self.sync = sha1_of(&[b"req1", &self.secret]).to_vec();
                self.state = State::SyncReq1;
                Ok(Step::Used(KEY_LEN))
            }
            State::SyncVc | State::SyncReq1 => {
                // The pattern may start at any of the pad's 0..=512 positions.
                let window = &rest[..rest.len().min(MAX_PAD + self.sync.len())];
                match find(window, &self.sync) {
                    Some(at) => {
                        self.state = if matches!(self.state, State::SyncVc) { State::Select } else { State::Skey };
                        Ok(Step::Used(at + self.sync.len()))
                    }
                    None if window.len() == MAX_PAD + self.sync.len() => Err(MseError::SyncNotFound),
                    None => Ok(Step::NeedMore),
                }
            }
            State::Select => {
                let Some(mut f) = rest.get(..6).map(|b| <[u8; 6]>::try_from(b).expect("6 bytes")) else {
                    return Ok(Step::NeedMore);
                };
                self.recv.as_mut().expect("keyed at KeyB").apply(&mut f);
                let select = u32::from_be_bytes([f[0], f[1], f[2], f[3]]);
                if !(select == PLAINTEXT || select == RC4) || select & self.provided == 0 {
                    return Err(MseError::BadSelect(select));
                }
                let pad = u16::from_be_bytes([f[4], f[5]]);
                if pad as usize > MAX_PAD {
                    return Err(MseError::PadTooLong(pad));
                }
                self.provided = select;
                self.state = State::PadD(pad as usize);
                Ok(Step::Used(6))
            }
            State::PadD(len) => {
                if rest.len() < len {
                    return Ok(Step::NeedMore);
                }
                let mut recv = self.recv.take().expect("keyed at KeyB");
                // PadD is read only to keep the stream in step.
                recv.apply(&mut rest[..len].to_vec());
                let rc4 = self.provided == RC4;
                let est = Established {
                    info_hash: self.skey.expect("initiator"),
                    method: self.provided,
                    inbound: if rc4 { Inbound { cipher: Some(recv), rc4_left: None } } else { Inbound::plaintext() },
                    outbound: self.send.take().filter(|_| rc4),
                };
                self.state = State::Done;
                Ok(Step::Done(len, Box::new(est)))
            }
            State::Skey => {
                const LEN: usize = 20 + 8 + 4 + 2;
                let Some(b) = rest.get(..LEN) else { return Ok(Step::NeedMore) };
                let req3 = sha1_of(&[b"req3", &self.secret]);
                let req2: [u8; 20] = std::array::from_fn(|i| b[i] ^ req3[i]);
                let info_hash = serves(&req2).ok_or(MseError::UnknownInfoHash)?;
                let mut recv = Cipher::new(b"keyA", &self.secret, &info_hash);
                let mut f: [u8; 14] = b[20..LEN].try_into().expect("14 bytes");
                recv.apply(&mut f);
                if f[..8] != VC {
                    return Err(MseError::VerificationConstant);
                }
                let provide = u32::from_be_bytes([f[8], f[9], f[10], f[11]]);
                let select = self.methods.select(provide).ok_or(MseError::NoCommonMethod(provide))?;
                let pad = u16::from_be_bytes([f[12], f[13]]);
                if pad as usize > MAX_PAD {
                    return Err(MseError::PadTooLong(pad));
                }
                self.skey = Some(info_hash);
                self.recv = Some(recv);
                self.send = Some(Cipher::new(b"keyB", &self.secret, &info_hash));
                self.state = State::PadC(pad as usize, select);
                Ok(Step::Used(LEN))
            }
            State::PadC(len, select) => {
                let Some(b) = rest.get(..len + 2) else { return Ok(Step::NeedMore) };
                let mut recv = self.recv.take().expect("keyed at Skey");
                let mut b = b.to_vec();
                recv.apply(&mut b);
                let ia_len = u16::from_be_bytes([b[len], b[len + 1]]) as usize;
                // Step 4: ENCRYPT(VC, crypto_select, len(PadD), PadD).
                let mut send = self.send.take().expect("keyed at Skey");
                let start = out.len();
                out.extend_from_slice(&VC);
                out.extend_from_slice(&select.to_be_bytes());
                out.extend_from_slice(&(self.pad2.len() as u16).to_be_bytes());
                out.extend_from_slice(&self.pad2);
                send.apply(&mut out[start..]);
                let rc4 = select == RC4;
                let est = Established {
                    info_hash: self.skey.expect("found at Skey"),
                    method: select,
                    // IA is RC4 either way; under plaintext only IA is.
                    inbound: Inbound { cipher: Some(recv), rc4_left: if rc4 { None } else { Some(ia_len) } },
                    outbound: rc4.then_some(send),
                };
                self.state = State::Done;
                Ok(Step::Done(len + 2, Box::new(est)))
            }
            State::Done | State::Failed => Ok(Step::NeedMore),
        }
    }

    /// Step 3: the sync hash, the obfuscated torrent, then (RC4 with keyA) VC, the methods
    /// offered, PadC, and IA taken from `held`.
    fn write_step3(&mut self, held: &mut Vec<u8>, out: &mut Vec<u8>) {
        let skey = self.skey.expect("initiator");
        out.extend_from_slice(&sha1_of(&[b"req1", &self.secret]));
        let req3 = sha1_of(&[b"req3", &self.secret]);
        let req2 = req2_hash(&skey);
        out.extend(req2.iter().zip(req3).map(|(a, b)| a ^ b));
        let mut send = Cipher::new(b"keyA", &self.secret, &skey);
        let ia_len = held.len().min(u16::MAX as usize);
        let start = out.len();
        out.extend_from_slice(&VC);
        out.extend_from_slice(&self.provided.to_be_bytes());
        out.extend_from_slice(&(self.pad2.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.pad2);
        out.extend_from_slice(&(ia_len as u16).to_be_bytes());
        out.extend(held.drain(..ia_len));
        send.apply(&mut out[start..]);
        self.send = Some(send);
    }
}

enum Step {
    NeedMore,
    Used(usize),
    Done(usize, Box<Established>),
}

#[cfg(test)]
mod tests;
