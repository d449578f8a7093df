//! Peer exchange (BEP 11, `ut_pex`) of a swarm: the message codec, what we tell each peer
//! (at most once a minute, at most [`MAX_PEX_ADDED`] added and as many dropped per message,
//! the peers we can vouch for being reachable), and what we take from theirs: untrusted
//! hints, bounded per message ([`MAX_PEX_TAKE`]), per peer (one message per
//! [`PEX_MIN_GAP`]) and per swarm ([`MAX_PEX_PER_MINUTE`]); the node dials them only within
//! `--max-download-peers`. Never in a private swarm (BEP 27): not advertised, not sent, and
//! anything received is ignored.
//!
//! ```text
//! ut_pex payload: bencoded dict
//!   added    compact IPv4 peers, 6 bytes each (address, port; big-endian)
//!   added.f  one flags byte per added peer (0x01 prefers encryption, 0x02 seed,
//!            0x04 uTP, 0x08 holepunch, 0x10 reachable: an outgoing connection)
//!   added6, added6.f    the same for IPv6 peers, 18 bytes each
//!   dropped, dropped6   peers disconnected since the last message
//! ```

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use super::{Action, Swarm};
use crate::bencode::{self, Value};
use crate::torrent::picker::PeerKey;
use crate::torrent::wire::{self, Message};

/// Our extended-message id for `ut_pex` (ut_metadata is 1, shardnet_auth 2).
pub const UT_PEX: u8 = 3;
/// We send each peer at most one PEX message per this.
pub const PEX_INTERVAL: Duration = Duration::from_secs(60);
/// Peers added (and, apart, dropped) per message we send (the clients' agreed limit).
pub const MAX_PEX_ADDED: usize = 50;
/// Added peers taken from one received message; the rest of it is ignored.
pub const MAX_PEX_TAKE: usize = 50;
/// A peer's PEX message sooner than this after its previous one is ignored (a minute, less
/// some tolerance for timers that fire a little early).
pub const PEX_MIN_GAP: Duration = Duration::from_secs(45);
/// Addresses one swarm takes from all its peers' PEX per minute.
pub const MAX_PEX_PER_MINUTE: usize = 100;
/// Addresses one swarm remembers having taken (deduplication; cleared when full).
const MAX_PEX_SEEN: usize = 4096;

/// Flag bits of `added.f` (BEP 11).
pub const FLAG_SEED: u8 = 0x02;
pub const FLAG_REACHABLE: u8 = 0x10;

/// A swarm's PEX state.
#[derive(Default)]
pub(super) struct SwarmPex {
    /// Our listening port, sent as `p` in the extension handshake (so peers we dialled can
    /// tell others where to reach us).
    pub listen_port: Option<u16>,
    window_start: Option<Instant>,
    taken_in_window: usize,
    seen: HashSet<SocketAddr>,
}

/// One peer's PEX state.
pub(super) struct PeerPex {
    /// We dialled it: its address is one it listens on.
    outgoing: bool,
    /// Its `ut_pex` id from its extension handshake (none: it does not speak PEX).
    pub their_id: Option<u8>,
    /// Its listening port (`p` in its extension handshake).
    pub listen_port: Option<u16>,
    last_sent: Option<Instant>,
    last_received: Option<Instant>,
    /// The addresses we told it about and have not dropped since.
    told: HashSet<SocketAddr>,
}

impl PeerPex {
    pub fn new(outgoing: bool) -> PeerPex {
        PeerPex {
            outgoing,
            their_id: None,
            listen_port: None,
            last_sent: None,
            last_received: None,
            told: HashSet::new(),
        }
    }
}

/// A received PEX message, checked: every list a byte string of whole entries. Borrowed
/// from the payload: nothing is allocated per listed peer.
#[derive(Debug)]
pub struct PexMessage<'a> {
    added: &'a [u8],
    added_f: &'a [u8],
    added6: &'a [u8],
    added6_f: &'a [u8],
    pub dropped: usize,
}

impl<'a> PexMessage<'a> {
    /// Parses a `ut_pex` payload (keys in any order). Errors: not a bencoded dictionary, a
    /// list that is not a byte string, or one whose length is not a whole number of entries.
    pub fn parse(payload: &'a [u8]) -> Result<PexMessage<'a>> {
        let v = bencode::decode_unsorted(payload).map_err(|e| anyhow!("ut_pex: {e}"))?;
        let d = v.as_dict().ok_or_else(|| anyhow!("ut_pex: not a dictionary"))?;
        let list = |key: &str, entry: usize| -> Result<&'a [u8]> {
            let Some(x) = d.get(key.as_bytes()) else { return Ok(&[]) };
            let b = match x {
                Value::Bytes(std::borrow::Cow::Borrowed(b)) => *b,
                _ => return Err(anyhow!("ut_pex: {key} is not a byte string")),
            };
            if entry > 1 && !b.len().is_multiple_of(entry) {
                return Err(anyhow!("ut_pex: {key} of {} bytes is not a list of {entry}-byte peers", b.len()));
            }
            Ok(b)
        };
        let (added, added6) = (list("added", 6)?, list("added6", 18)?);
        let (dropped, dropped6) = (list("dropped", 6)?, list("dropped6", 18)?);
        Ok(PexMessage {
            added,
            added_f: list("added.f", 1)?,
            added6,
            added6_f: list("added6.f", 1)?,
            dropped: dropped.len() / 6 + dropped6.len() / 18,
        })
    }

    /// Number of added peers listed (IPv4 and IPv6).
    pub fn added_len(&self) -> usize {
        self.added.len() / 6 + self.added6.len() / 18
    }

    /// The added peers with their flags (0 where `added.f` is missing or of another length).
    pub fn added(&self) -> impl Iterator<Item = (SocketAddr, u8)> + '_ {
        let flag = |f: &[u8], n: usize, i: usize| if f.len() == n { f[i] } else { 0 };
        let n4 = self.added.len() / 6;
        let n6 = self.added6.len() / 18;
        let v4 = self.added.chunks_exact(6).enumerate().map(move |(i, c)| {
            let ip = Ipv4Addr::new(c[0], c[1], c[2], c[3]);
            (SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be_bytes([c[4], c[5]]))), flag(self.added_f, n4, i))
        });
        let v6 = self.added6.chunks_exact(18).enumerate().map(move |(i, c)| {
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&c[..16]).expect("16 bytes"));
            let port = u16::from_be_bytes([c[16], c[17]]);
            (SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)), flag(self.added6_f, n6, i))
        });
        v4.chain(v6)
    }
}

/// Encodes a PEX payload: `added` with flags, `dropped`, each split by address family.
pub fn encode(added: &[(SocketAddr, u8)], dropped: &[SocketAddr]) -> Vec<u8> {
    let (mut a4, mut f4, mut a6, mut f6, mut d4, mut d6) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (addr, flags) in added {
        let (list, f) = if addr.is_ipv4() { (&mut a4, &mut f4) } else { (&mut a6, &mut f6) };
        compact(*addr, list);
        f.push(*flags);
    }
    for addr in dropped {
        compact(*addr, if addr.is_ipv4() { &mut d4 } else { &mut d6 });
    }
    let mut d = vec![("added", Value::bytes(a4)), ("added.f", Value::bytes(f4)), ("dropped", Value::bytes(d4))];
    if !a6.is_empty() {
        d.push(("added6", Value::bytes(a6)));
        d.push(("added6.f", Value::bytes(f6)));
    }
    if !d6.is_empty() {
        d.push(("dropped6", Value::bytes(d6)));
    }
    bencode::dict(d).encode()
}

fn compact(addr: SocketAddr, out: &mut Vec<u8>) {
    match addr {
        SocketAddr::V4(a) => out.extend_from_slice(&a.ip().octets()),
        SocketAddr::V6(a) => out.extend_from_slice(&a.ip().octets()),
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Loopback, private, link-local or unique-local.
fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_local(IpAddr::V4(v4)),
            None => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80,
        },
    }
}

/// Whether an address a peer at `from` sent us may be dialled at all: a port, a unicast
/// address, and not a loopback or private address unless `from` itself is one (a stranger
/// must not point the node at its own host's or network's services).
pub fn usable(addr: SocketAddr, from: IpAddr) -> bool {
    let ip = addr.ip();
    let unicast = match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_multicast() && !v4.is_broadcast(),
        IpAddr::V6(v6) => !v6.is_unspecified() && !v6.is_multicast(),
    };
    let scope_ok = if ip.is_loopback() { from.is_loopback() } else { !is_local(ip) || is_local(from) };
    addr.port() != 0 && unicast && scope_ok
}

impl Swarm {
    /// Our listening port, sent to peers as `p` (the node calls this once).
    pub fn set_listen_port(&mut self, port: u16) {
        self.pex.listen_port = Some(port);
    }

    /// The peer's extension handshake: its `ut_pex` id and listening port.
    pub(super) fn on_pex_handshake(&mut self, key: PeerKey, v: &Value) -> Result<()> {
        let id = v.get("m").and_then(|m| m.get("ut_pex")).and_then(Value::as_int);
        let port = v.get("p").and_then(Value::as_int).filter(|p| (1..=65535).contains(p));
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        peer.pex.their_id = id.filter(|i| (1..=255).contains(i)).map(|i| i as u8);
        peer.pex.listen_port = port.map(|p| p as u16);
        Ok(())
    }

    /// Where others can reach `key`: the address we dialled, or its IP and the port it
    /// listens on; none for a peer that dialled us without saying its port.
    fn reachable(&self, key: PeerKey) -> Option<(SocketAddr, u8)> {
        let p = self.peers.get(&key)?;
        if !p.handshaken || !p.proved() {
            return None;
        }
        let seed = if p.bits.len() > 0 && p.bits.is_complete() { FLAG_SEED } else { 0 };
        if p.pex.outgoing {
            return Some((p.addr, seed | FLAG_REACHABLE));
        }
        p.pex.listen_port.map(|port| (SocketAddr::new(p.addr.ip(), port), seed))
    }

    /// Sends each PEX-speaking peer the changes in our peer set since its last message, at most
    /// once per [`PEX_INTERVAL`], when there is any (an empty message upsets some clients).
    pub(super) fn send_pex(&mut self, now: Instant) {
        if self.private.is_some() {
            return;
        }
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        let all: Vec<(PeerKey, (SocketAddr, u8))> =
            keys.iter().filter_map(|k| self.reachable(*k).map(|r| (*k, r))).collect();
        for key in keys {
            let Some(peer) = self.peers.get_mut(&key) else { continue };
            let Some(their_id) = peer.pex.their_id else { continue };
            if !peer.handshaken || peer.pex.last_sent.is_some_and(|t| now.duration_since(t) < PEX_INTERVAL) {
                continue;
            }
            let current: Vec<(SocketAddr, u8)> =
                all.iter().filter(|(k, (a, _))| *k != key && *a != peer.addr).map(|(_, r)| *r).collect();
            let added: Vec<(SocketAddr, u8)> =
                current.iter().filter(|(a, _)| !peer.pex.told.contains(a)).take(MAX_PEX_ADDED).copied().collect();
            let dropped: Vec<SocketAddr> = peer
                .pex
                .told
                .iter()
                .filter(|a| !current.iter().any(|(c, _)| c == *a))
                .take(MAX_PEX_ADDED)
                .copied()
                .collect();
            if added.is_empty() && dropped.is_empty() {
                continue;
            }
            for (a, _) in &added {
                peer.pex.told.insert(*a);
            }
            for a in &dropped {
                peer.pex.told.remove(a);
            }
            let payload = encode(&added, &dropped);
            wire::encode(&Message::Extended { id: their_id, payload: &payload }, &mut peer.out);
            peer.pex.last_sent = Some(now);
            self.stats.pex_sent += 1;
        }
    }

    /// A `ut_pex` message from `key`: up to [`MAX_PEX_TAKE`] usable new addresses become
    /// [`Action::PexPeers`] (a download's candidates). Malformed: an error (the peer is closed).
    pub(super) fn on_pex(&mut self, key: PeerKey, payload: &[u8], now: Instant) -> Result<()> {
        if self.private.is_some() {
            self.stats.pex_ignored += 1;
            return Ok(());
        }
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        if peer.pex.last_received.is_some_and(|t| now.duration_since(t) < PEX_MIN_GAP) {
            self.stats.pex_ignored += 1;
            return Ok(());
        }
        peer.pex.last_received = Some(now);
        let from = peer.addr.ip();
        let msg = match PexMessage::parse(payload) {
            Ok(m) => m,
            Err(e) => {
                self.stats.pex_closed += 1;
                return Err(e);
            }
        };
        self.stats.pex_received += 1;
        if self.completed.is_some() || self.picker.as_ref().is_some_and(|p| p.is_complete()) {
            return Ok(()); // a seed dials nobody
        }
        if self.pex.window_start.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
            self.pex.window_start = Some(now);
            self.pex.taken_in_window = 0;
        }
        let connected: HashSet<SocketAddr> = self.peers.values().map(|p| p.addr).collect();
        let budget = MAX_PEX_TAKE.min(MAX_PEX_PER_MINUTE - self.pex.taken_in_window);
        let mut taken = Vec::new();
        for (addr, _flags) in msg.added() {
            if taken.len() >= budget {
                break;
            }
            if !usable(addr, from) || connected.contains(&addr) || self.pex.seen.contains(&addr) {
                continue;
            }
            if self.pex.seen.len() >= MAX_PEX_SEEN {
                self.pex.seen.clear();
            }
            self.pex.seen.insert(addr);
            taken.push(addr);
        }
        self.stats.pex_ignored += (msg.added_len() - taken.len()) as u64;
        self.pex.taken_in_window += taken.len();
        if !taken.is_empty() {
            self.stats.pex_peers_taken += taken.len() as u64;
            self.actions.push(Action::PexPeers(taken));
        }
        Ok(())
    }
}
