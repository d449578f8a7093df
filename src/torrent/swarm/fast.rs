//! The Fast extension (BEP 6) of a swarm: HAVE_ALL / HAVE_NONE in place of a bitfield,
//! REJECT_REQUEST (every request of a fast peer is answered by its block or a reject),
//! ALLOWED_FAST (pieces a choked peer may still ask for, chosen as the BEP says) and
//! SUGGEST_PIECE (taken as a hint; never sent). On only when both handshakes set the bit.
//!
//! Bad input: a fast message from a peer that did not set the bit, HAVE_ALL / HAVE_NONE
//! after any announcement of pieces (a later bitfield is merged, as after haves: aria2 sends
//! one after HAVE_NONE), and a REJECT of a block
//! never asked (nor cancelled lately) close the peer; a suggestion or allowed-fast piece
//! out of range, and allowed-fast pieces past [`MAX_ALLOWED_IN`], are ignored. Each is
//! counted in [`ExtStats`].

use std::collections::VecDeque;
use std::net::IpAddr;

use anyhow::{Result, anyhow};

use super::{Peer, Swarm};
use crate::torrent::metainfo::InfoHash;
use crate::torrent::picker::PeerKey;
use crate::torrent::wire::{self, Bitfield, Block, Message};

/// Pieces we let a peer ask for while we choke it (BEP 6 leaves k open; its examples use 7
/// and 9, libtorrent sends 5).
pub const ALLOWED_FAST_SET: usize = 10;
/// Allowed-fast pieces kept per peer that offers them; more are ignored (a flood).
pub const MAX_ALLOWED_IN: usize = 32;
/// Suggestions kept per peer; the oldest is dropped for a new one.
const MAX_SUGGESTED: usize = 16;
/// Cancelled requests remembered per peer, so that a fast peer's REJECT of one (as the BEP
/// asks it to answer a cancel) is not taken for a reject of a block never asked.
const MAX_CANCELLED: usize = 1024;

/// What a peer announced of its pieces first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Announced {
    Bitfield,
    HaveAll,
    HaveNone,
}

/// One peer's Fast-extension state.
#[derive(Default)]
pub(super) struct PeerFast {
    /// Both handshakes set the fast bit.
    pub on: bool,
    /// What the peer announced first (bitfield, HAVE_ALL, HAVE_NONE), if anything yet.
    pub announced: Option<Announced>,
    /// Whether we announced our pieces to it (bitfield, HAVE_ALL or HAVE_NONE).
    pub we_announced: bool,
    /// Pieces we allow it while choked (sent once, when it first says interested).
    pub allowed_out: Vec<u32>,
    pub allowed_out_sent: bool,
    /// Pieces it allows us while it chokes us (at most [`MAX_ALLOWED_IN`]).
    pub allowed_in: Vec<u32>,
    /// A HAVE_ALL before the metadata (magnet): applied with it.
    pub early_all: bool,
    /// Pieces it suggested, newest last.
    pub suggested: VecDeque<u32>,
    /// Requests we cancelled that it may still reject.
    pub cancelled: VecDeque<Block>,
}

impl PeerFast {
    /// We cancelled `b`: the peer may answer with a reject.
    pub fn cancelled(&mut self, b: Block) {
        if self.on {
            if self.cancelled.len() >= MAX_CANCELLED {
                self.cancelled.pop_front();
            }
            self.cancelled.push_back(b);
        }
    }
}

/// Counters of the Fast extension and PEX in one swarm (STATUS `peer_wire`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ExtStats {
    /// Peers with the Fast extension on (both bits).
    pub fast_peers: u64,
    pub have_all_sent: u64,
    pub have_all_received: u64,
    pub rejects_sent: u64,
    pub rejects_received: u64,
    pub allowed_fast_sent: u64,
    pub allowed_fast_received: u64,
    pub suggests_received: u64,
    /// Fast messages ignored (out of range, over the bound) and peers closed for one.
    pub fast_ignored: u64,
    pub fast_closed: u64,
    pub pex_sent: u64,
    pub pex_received: u64,
    /// Addresses from PEX handed to the download as candidates.
    pub pex_peers_taken: u64,
    /// PEX messages or entries not taken (too soon, over a cap, unusable addresses, private).
    pub pex_ignored: u64,
    pub pex_closed: u64,
    /// ut_metadata requests answered with a reject (no such piece, or the peer's output over
    /// [`super::MAX_METADATA_OUT`]).
    pub metadata_rejects_sent: u64,
}

/// BEP 6's allowed-fast set: `k` pieces of `pieces` for a peer at `ip`, as the BEP computes
/// it: `x = (ip & 0xffffff00) ++ info_hash`, then repeatedly `x = SHA1(x)`, each of its five
/// big-endian 32-bit words modulo `pieces` a piece, until `k` distinct pieces. With `k` at
/// least `pieces`, every piece. IPv6 is not covered by the BEP: its /64 prefix (the unit the
/// node counts per address) stands in for the /24, IPv4-mapped addresses count as IPv4.
pub fn allowed_fast_set(ip: IpAddr, info_hash: &InfoHash, pieces: u32, k: usize) -> Vec<u32> {
    if k as u64 >= pieces as u64 {
        return (0..pieces).collect();
    }
    let mut x: Vec<u8> = match ip {
        IpAddr::V4(v4) => (u32::from(v4) & 0xffff_ff00).to_be_bytes().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (u32::from(v4) & 0xffff_ff00).to_be_bytes().to_vec(),
            None => v6.octets()[..8].to_vec(),
        },
    };
    x.extend_from_slice(&info_hash.0);
    let mut set = Vec::with_capacity(k);
    while set.len() < k {
        let digest = crate::hash::sha1(&x);
        for word in digest.chunks_exact(4) {
            if set.len() >= k {
                break;
            }
            let index = u32::from_be_bytes(word.try_into().expect("4 bytes")) % pieces;
            if !set.contains(&index) {
                set.push(index);
            }
        }
        x = digest.to_vec();
    }
    set
}

/// Our pieces for a peer that just finished its handshake (or proved the key): with the Fast
/// extension HAVE_ALL when we have every piece, HAVE_NONE when none (or no metadata yet),
/// else the bitfield; without it the bitfield when we have any piece.
pub(super) fn announce(peer: &mut Peer, have: Option<&Bitfield>, stats: &mut ExtStats) {
    let count = have.map_or(0, Bitfield::count);
    if peer.fast.on {
        match have {
            Some(h) if h.len() > 0 && h.is_complete() => {
                wire::encode(&Message::HaveAll, &mut peer.out);
                stats.have_all_sent += 1;
            }
            Some(h) if count > 0 => wire::encode(&Message::Bitfield(h.as_bytes()), &mut peer.out),
            _ => wire::encode(&Message::HaveNone, &mut peer.out),
        }
        peer.fast.we_announced = true;
    } else if let Some(h) = have.filter(|_| count > 0) {
        wire::encode(&Message::Bitfield(h.as_bytes()), &mut peer.out);
        peer.fast.we_announced = true;
    }
}

impl Swarm {
    /// A fast message from a peer without the extension: closed (as libtorrent does).
    fn require_fast(&mut self, key: PeerKey, what: &str) -> Result<()> {
        if self.peer(key)?.fast.on {
            return Ok(());
        }
        self.stats.fast_closed += 1;
        Err(anyhow!("{what} from a peer that did not negotiate the Fast extension (BEP 6)"))
    }

    /// A bitfield: the first announcement, or one more merged into what the peer has (aria2
    /// sends HAVE_NONE, then a bitfield when it has its first piece; libtorrent accepts that).
    pub(super) fn note_bitfield(&mut self, key: PeerKey) -> Result<()> {
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        peer.fast.announced.get_or_insert(Announced::Bitfield);
        Ok(())
    }

    /// HAVE_ALL or HAVE_NONE: only as the peer's first announcement of its pieces.
    pub(super) fn on_have_all_none(&mut self, key: PeerKey, all: bool) -> Result<()> {
        let name = if all { "HAVE_ALL" } else { "HAVE_NONE" };
        self.require_fast(key, name)?;
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        if let Some(before) = peer.fast.announced {
            self.stats.fast_closed += 1;
            return Err(anyhow!("{name} after {before:?}: pieces are announced once"));
        }
        peer.fast.announced = Some(if all { Announced::HaveAll } else { Announced::HaveNone });
        if !all {
            return Ok(());
        }
        self.stats.have_all_received += 1;
        let Some(picker) = self.picker.as_mut() else {
            peer.fast.early_all = true;
            return Ok(());
        };
        for i in 0..picker.lengths().pieces {
            if peer.bits.set(i) {
                picker.peer_has(i);
            }
        }
        self.update_interest(key);
        Ok(())
    }

    /// REJECT_REQUEST: the block is free to ask of anyone; a reject of a block never asked of
    /// this peer (nor cancelled lately) closes it.
    pub(super) fn on_reject(&mut self, key: PeerKey, b: Block) -> Result<()> {
        self.require_fast(key, "REJECT_REQUEST")?;
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        if let Some(pos) = peer.requested.iter().position(|(r, _)| *r == b) {
            peer.requested.swap_remove(pos);
            self.stats.rejects_received += 1;
            if peer.peer_choking {
                // A choking peer rejecting an allowed-fast piece withdrew it (as libtorrent reads it).
                peer.fast.allowed_in.retain(|i| *i != b.index);
            }
            if let Some(p) = self.picker.as_mut() {
                p.release(key, &b);
            }
            // Others first: the block should not go straight back to the peer that refused it.
            let others: Vec<PeerKey> = self.peers.keys().copied().filter(|k| *k != key).collect();
            for k in others {
                self.request_more(k);
            }
            return Ok(());
        }
        if let Some(pos) = peer.fast.cancelled.iter().position(|r| *r == b) {
            peer.fast.cancelled.remove(pos);
            self.stats.rejects_received += 1;
            return Ok(());
        }
        self.stats.fast_closed += 1;
        Err(anyhow!("REJECT_REQUEST for {b:?}, which was never requested"))
    }

    /// ALLOWED_FAST: kept (at most [`MAX_ALLOWED_IN`]) and asked for even while choked.
    pub(super) fn on_allowed_fast(&mut self, key: PeerKey, index: u32) -> Result<()> {
        self.require_fast(key, "ALLOWED_FAST")?;
        let pieces = self.picker.as_ref().map(|p| p.lengths().pieces);
        let have = self.picker.as_ref().is_some_and(|p| p.have().get(index));
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        if pieces.is_some_and(|n| index >= n) || have || peer.fast.allowed_in.len() >= MAX_ALLOWED_IN {
            self.stats.fast_ignored += 1;
            return Ok(());
        }
        if !peer.fast.allowed_in.contains(&index) {
            peer.fast.allowed_in.push(index);
        }
        self.stats.allowed_fast_received += 1;
        self.request_more(key);
        Ok(())
    }

    /// SUGGEST_PIECE: a hint, preferred when picking from this peer.
    pub(super) fn on_suggest(&mut self, key: PeerKey, index: u32) -> Result<()> {
        self.require_fast(key, "SUGGEST_PIECE")?;
        let pieces = self.picker.as_ref().map(|p| p.lengths().pieces);
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        if pieces.is_none_or(|n| index >= n) {
            self.stats.fast_ignored += 1;
            return Ok(());
        }
        if !peer.fast.suggested.contains(&index) {
            if peer.fast.suggested.len() >= MAX_SUGGESTED {
                peer.fast.suggested.pop_front();
            }
            peer.fast.suggested.push_back(index);
        }
        self.stats.suggests_received += 1;
        Ok(())
    }

    /// The peer said interested: a fast peer gets our allowed-fast set once (pieces we have and
    /// it lacks), as libtorrent sends it.
    pub(super) fn send_allowed_fast(&mut self, key: PeerKey) {
        let (Some(picker), Some(peer)) = (self.picker.as_ref(), self.peers.get_mut(&key)) else { return };
        if !peer.fast.on || peer.fast.allowed_out_sent || !peer.proved() {
            return;
        }
        peer.fast.allowed_out_sent = true;
        let set = allowed_fast_set(peer.addr.ip(), &self.info_hash, picker.lengths().pieces, ALLOWED_FAST_SET);
        for i in set.into_iter().filter(|i| picker.have().get(*i) && !peer.bits.get(*i)) {
            wire::encode(&Message::AllowedFast(i), &mut peer.out);
            peer.fast.allowed_out.push(i);
            self.stats.allowed_fast_sent += 1;
        }
    }

    /// A request of a peer we choke: a fast peer's allowed-fast request is queued, any other
    /// is rejected; a plain peer's is dropped (it may cross an unchoke, as BEP 3 allows).
    /// Returns whether the request was queued.
    pub(super) fn request_while_choked(&mut self, key: PeerKey, b: Block) -> Result<bool> {
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        if !peer.fast.on {
            return Ok(false);
        }
        if peer.fast.allowed_out.contains(&b.index) {
            return Ok(true);
        }
        wire::encode(&Message::RejectRequest(b), &mut peer.out);
        self.stats.rejects_sent += 1;
        Ok(false)
    }

    /// Requests dropped from a fast peer's queue (choke, cancel, not interested) are each
    /// answered with a reject.
    pub(super) fn reject_all(peer: &mut Peer, blocks: impl IntoIterator<Item = Block>, stats: &mut ExtStats) {
        if !peer.fast.on {
            return;
        }
        for b in blocks {
            wire::encode(&Message::RejectRequest(b), &mut peer.out);
            stats.rejects_sent += 1;
        }
    }

    /// Blocks to ask of a choking fast peer: only of its allowed-fast pieces (never endgame).
    /// Or, of an unchoking one, its suggested pieces first.
    pub(super) fn pick_fast(&mut self, key: PeerKey, room: usize, may_start: bool) -> Vec<Block> {
        let (Some(picker), Some(peer)) = (self.picker.as_mut(), self.peers.get_mut(&key)) else { return Vec::new() };
        let list: Vec<u32> = if peer.peer_choking {
            peer.fast.allowed_in.clone()
        } else {
            peer.fast.suggested.iter().copied().collect()
        };
        let mut subset = Bitfield::new(peer.bits.len());
        for i in list.into_iter().filter(|i| peer.bits.get(*i) && !picker.have().get(*i)) {
            subset.set(i);
        }
        if subset.count() == 0 {
            return Vec::new();
        }
        picker.pick_only(key, &subset, room, may_start)
    }

    /// The metadata arrived (magnet): what fast peers told us before it is applied.
    pub(super) fn apply_early_fast(&mut self, key: PeerKey) {
        let Some(n) = self.picker.as_ref().map(|p| p.lengths().pieces) else { return };
        let Some(peer) = self.peers.get_mut(&key) else { return };
        peer.fast.allowed_in.retain(|i| *i < n);
        peer.fast.suggested.retain(|i| *i < n);
        if std::mem::take(&mut peer.fast.early_all) {
            let picker = self.picker.as_mut().expect("checked");
            for i in 0..n {
                if peer.bits.set(i) {
                    picker.peer_has(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BEP 6's own example: 1313 pieces, info hash 0xaa x 20, peer 80.4.4.200.
    #[test]
    fn allowed_fast_set_matches_the_bep_example() {
        let h = InfoHash([0xaa; 20]);
        let ip: IpAddr = "80.4.4.200".parse().unwrap();
        assert_eq!(allowed_fast_set(ip, &h, 1313, 7), vec![1059, 431, 808, 1217, 287, 376, 1188]);
        assert_eq!(allowed_fast_set(ip, &h, 1313, 9), vec![1059, 431, 808, 1217, 287, 376, 1188, 353, 508]);
        // The /24 mask: another host of the same network gets the same set, another network not.
        assert_eq!(allowed_fast_set("80.4.4.1".parse().unwrap(), &h, 1313, 7), allowed_fast_set(ip, &h, 1313, 7));
        assert_ne!(allowed_fast_set("80.4.5.200".parse().unwrap(), &h, 1313, 7), allowed_fast_set(ip, &h, 1313, 7));
        // An IPv4-mapped IPv6 address is its IPv4 address.
        assert_eq!(allowed_fast_set("::ffff:80.4.4.200".parse().unwrap(), &h, 1313, 7)[0], 1059);
        // k at least the piece count: every piece, and no endless loop.
        assert_eq!(allowed_fast_set(ip, &h, 3, 10), vec![0, 1, 2]);
        assert_eq!(allowed_fast_set(ip, &h, 0, 10), Vec::<u32>::new());
        assert_eq!(allowed_fast_set(ip, &h, 11, 10).len(), 10);
    }
}
