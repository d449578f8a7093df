//! Which blocks to ask which peer for: rarest-first piece picking over all
//! connected peers, finishing started pieces first, with endgame (the last
//! blocks asked of several peers). Knows nothing of sockets or storage.
//! See `STATE.md` beside this file for the states of a piece and a block.

use std::collections::HashMap;

use super::wire::{BLOCK_SIZE, Bitfield, Block};

/// A peer connection's key (the node's connection id).
pub type PeerKey = u64;
/// The sender of data found on disk (connection ids start at 1).
pub const NO_PEER: PeerKey = 0;

/// A torrent's piece and block geometry, from its info dict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lengths {
    pub total: u64,
    pub piece_length: u64,
    pub pieces: u32,
}

impl Lengths {
    pub fn new(total: u64, piece_length: u64) -> Lengths {
        Lengths { total, piece_length, pieces: total.div_ceil(piece_length) as u32 }
    }

    pub fn piece_size(&self, i: u32) -> u32 {
        let start = i as u64 * self.piece_length;
        (self.total - start).min(self.piece_length) as u32
    }

    pub fn blocks_in(&self, i: u32) -> u32 {
        self.piece_size(i).div_ceil(BLOCK_SIZE)
    }

    pub fn block(&self, i: u32, b: u32) -> Block {
        let begin = b * BLOCK_SIZE;
        Block { index: i, begin, length: (self.piece_size(i) - begin).min(BLOCK_SIZE) }
    }

    /// Whether `b` names bytes inside piece `b.index`, at most one block long.
    pub fn valid_request(&self, b: &Block) -> bool {
        b.index < self.pieces
            && b.length > 0
            && b.length <= BLOCK_SIZE
            && (b.begin as u64 + b.length as u64) <= self.piece_size(b.index) as u64
    }

    /// Whether `b` is exactly one of our block slots.
    pub fn is_slot(&self, b: &Block) -> bool {
        b.index < self.pieces
            && b.begin.is_multiple_of(BLOCK_SIZE)
            && b.begin < self.piece_size(b.index)
            && self.block(b.index, b.begin / BLOCK_SIZE) == *b
    }

    pub fn offset(&self, b: &Block) -> u64 {
        b.index as u64 * self.piece_length + b.begin as u64
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Slot {
    Missing,
    /// Asked of these peers (more than one only in endgame).
    Requested(Vec<PeerKey>),
    Received(PeerKey),
}

#[derive(Clone, Debug)]
struct Partial {
    slots: Vec<Slot>,
    received: u32,
    /// All blocks received; waiting for the hash workers.
    hashing: bool,
    /// A piece that failed verification is fetched again from one peer
    /// only, so a second failure names its sender without doubt.
    owner: Option<PeerKey>,
}

impl Partial {
    fn new(blocks: u32) -> Partial {
        Partial { slots: vec![Slot::Missing; blocks as usize], received: 0, hashing: false, owner: None }
    }

    /// Whether `peer` may be asked for blocks of this piece.
    fn open_to(&self, peer: PeerKey) -> bool {
        !self.hashing && self.owner.is_none_or(|o| o == peer)
    }
}

/// What became of a received block.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockResult {
    /// Store it. `complete`: the piece is whole and must be hashed. `cancel`:
    /// other peers asked for the same block in endgame.
    Accepted { complete: bool, cancel: Vec<PeerKey> },
    /// Not a block we need, or not one we asked this peer for.
    Unwanted,
}

pub struct Picker {
    lengths: Lengths,
    have: Bitfield,
    availability: Vec<u32>,
    partial: HashMap<u32, Partial>,
    /// Random state for choosing among equally rare pieces.
    cursor: u32,
    /// Pieces that failed verification (see `Partial::owner`).
    parole: std::collections::HashSet<u32>,
}

impl Picker {
    /// `seed` spreads where different clients start among equally rare
    /// pieces (a swarm of new leeches would otherwise all ask for piece 0).
    pub fn new(lengths: Lengths, have: Bitfield, seed: u32) -> Picker {
        let cursor = seed | 1;
        Picker {
            lengths,
            availability: vec![0; lengths.pieces as usize],
            have,
            partial: HashMap::new(),
            cursor,
            parole: Default::default(),
        }
    }

    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    pub fn lengths(&self) -> Lengths {
        self.lengths
    }

    pub fn is_complete(&self) -> bool {
        self.have.is_complete()
    }

    pub fn peer_has(&mut self, piece: u32) {
        if let Some(a) = self.availability.get_mut(piece as usize) {
            *a += 1;
        }
    }

    pub fn peer_bitfield(&mut self, bits: &Bitfield) {
        for i in bits.ones() {
            self.availability[i as usize] += 1;
        }
    }

    /// A peer left: its pieces are no longer available and its requests free.
    pub fn peer_gone(&mut self, peer: PeerKey, bits: &Bitfield) {
        for i in bits.ones() {
            let a = &mut self.availability[i as usize];
            *a = a.saturating_sub(1);
        }
        self.release_peer(peer);
    }

    /// Frees every block asked of `peer` (it choked us, or timed out).
    pub fn release_peer(&mut self, peer: PeerKey) {
        for p in self.partial.values_mut() {
            if p.owner == Some(peer) {
                p.owner = None;
            }
            for s in &mut p.slots {
                if let Slot::Requested(by) = s {
                    by.retain(|k| *k != peer);
                    if by.is_empty() {
                        *s = Slot::Missing;
                    }
                }
            }
        }
    }

    /// Frees one block asked of `peer`.
    pub fn release(&mut self, peer: PeerKey, b: &Block) {
        if let Some(p) = self.partial.get_mut(&b.index)
            && let Some(s) = p.slots.get_mut((b.begin / BLOCK_SIZE) as usize)
            && let Slot::Requested(by) = s
        {
            by.retain(|k| *k != peer);
            if by.is_empty() {
                *s = Slot::Missing;
            }
        }
    }

    /// Up to `max` blocks to ask `peer` for, given what it has; new pieces
    /// are started only if `may_start` (the caller's memory bound).
    pub fn pick(&mut self, peer: PeerKey, peer_bits: &Bitfield, max: usize, may_start: bool) -> Vec<Block> {
        self.pick_with(peer, peer_bits, max, may_start, true)
    }

    /// As [`Picker::pick`] but never endgame: for a subset of the peer's pieces (BEP 6's
    /// allowed-fast pieces of a choking peer, its suggestions), where an empty subset must
    /// not make blocks asked of others be asked twice.
    pub fn pick_only(&mut self, peer: PeerKey, subset: &Bitfield, max: usize, may_start: bool) -> Vec<Block> {
        self.pick_with(peer, subset, max, may_start, false)
    }

    fn pick_with(
        &mut self,
        peer: PeerKey,
        peer_bits: &Bitfield,
        max: usize,
        may_start: bool,
        endgame: bool,
    ) -> Vec<Block> {
        let mut out = Vec::new();
        if max == 0 {
            return out;
        }
        // 1. Blocks of started pieces, fewest missing first.
        let mut started: Vec<u32> =
            self.partial.iter().filter(|(i, p)| p.open_to(peer) && peer_bits.get(**i)).map(|(i, _)| *i).collect();
        started.sort_by_key(|i| (self.partial[i].slots.len() as u32 - self.partial[i].received, *i));
        for i in started {
            self.take_missing(i, peer, max, &mut out);
            if out.len() >= max {
                return out;
            }
        }
        // 2. New pieces, rarest first.
        while may_start && out.len() < max {
            let Some(i) = self.rarest_new(peer_bits) else { break };
            self.partial.insert(i, Partial::new(self.lengths.blocks_in(i)));
            self.take_missing(i, peer, max, &mut out);
        }
        // 3. Endgame: nothing left unasked; ask for blocks others were asked for.
        if out.is_empty() && may_start && endgame {
            let mut pieces: Vec<u32> = self
                .partial
                .iter()
                .filter(|(i, p)| p.open_to(peer) && p.owner.is_none() && peer_bits.get(**i))
                .map(|(i, _)| *i)
                .collect();
            pieces.sort_unstable();
            'outer: for i in pieces {
                let p = self.partial.get_mut(&i).expect("listed");
                for (b, s) in p.slots.iter_mut().enumerate() {
                    if let Slot::Requested(by) = s
                        && !by.contains(&peer)
                        && by.len() < 2
                    {
                        by.push(peer);
                        out.push(self.lengths.block(i, b as u32));
                        if out.len() >= max {
                            break 'outer;
                        }
                    }
                }
            }
        }
        out
    }

    fn take_missing(&mut self, i: u32, peer: PeerKey, max: usize, out: &mut Vec<Block>) {
        let p = self.partial.get_mut(&i).expect("started piece");
        if self.parole.contains(&i) {
            p.owner = Some(peer);
        }
        for (b, s) in p.slots.iter_mut().enumerate() {
            if out.len() >= max {
                return;
            }
            if *s == Slot::Missing {
                *s = Slot::Requested(vec![peer]);
                out.push(self.lengths.block(i, b as u32));
            }
        }
    }

    /// The rarest piece `peer_bits` offers that is neither had nor started;
    /// among equally rare ones, a random one, so clients spread out.
    fn rarest_new(&mut self, peer_bits: &Bitfield) -> Option<u32> {
        let mut best = u32::MAX;
        let mut ties = 0u32;
        let mut chosen = None;
        for i in 0..self.lengths.pieces {
            if self.have.get(i) || self.partial.contains_key(&i) || !peer_bits.get(i) {
                continue;
            }
            let a = self.availability[i as usize];
            if a < best {
                (best, ties, chosen) = (a, 1, Some(i));
            } else if a == best {
                // Reservoir sampling: each tie is kept with probability 1/ties.
                ties += 1;
                if self.next_random().is_multiple_of(ties) {
                    chosen = Some(i);
                }
            }
        }
        chosen
    }

    /// xorshift32 on the cursor: cheap, and different per client.
    fn next_random(&mut self) -> u32 {
        let mut x = self.cursor.max(1);
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.cursor = x;
        x
    }

    /// A block arrived from `peer`.
    pub fn on_block(&mut self, peer: PeerKey, b: &Block) -> BlockResult {
        if !self.lengths.is_slot(b) || self.have.get(b.index) {
            return BlockResult::Unwanted;
        }
        let Some(p) = self.partial.get_mut(&b.index) else { return BlockResult::Unwanted };
        let slot = &mut p.slots[(b.begin / BLOCK_SIZE) as usize];
        let cancel = match slot {
            Slot::Requested(by) if by.contains(&peer) => by.iter().copied().filter(|k| *k != peer).collect(),
            _ => return BlockResult::Unwanted,
        };
        *slot = Slot::Received(peer);
        p.received += 1;
        let complete = p.received as usize == p.slots.len();
        p.hashing = complete;
        BlockResult::Accepted { complete, cancel }
    }

    /// The hash workers' verdict on a complete piece. On failure, returns the
    /// peers that sent its blocks (block index, peer), and the piece starts over.
    pub fn on_hashed(&mut self, piece: u32, ok: bool) -> Vec<(u32, PeerKey)> {
        let Some(p) = self.partial.remove(&piece) else { return Vec::new() };
        let senders = p
            .slots
            .iter()
            .enumerate()
            .filter_map(|(b, s)| match s {
                Slot::Received(k) => Some((b as u32, *k)),
                _ => None,
            })
            .collect();
        if ok {
            self.have.set(piece);
            self.parole.remove(&piece);
        } else {
            self.parole.insert(piece);
        }
        senders
    }

    /// Marks a piece as written but unverified (a recheck of data on disk):
    /// it waits for `on_hashed` like a downloaded piece, sent by no peer.
    pub fn mark_checking(&mut self, piece: u32) {
        if self.have.get(piece) {
            return;
        }
        let mut p = Partial::new(self.lengths.blocks_in(piece));
        p.slots.iter_mut().for_each(|s| *s = Slot::Received(NO_PEER));
        p.received = p.slots.len() as u32;
        p.hashing = true;
        self.partial.insert(piece, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths() -> Lengths {
        // 4 pieces of 2 blocks, the last one shorter (1.5 blocks).
        Lengths::new(3 * 32768 + 24576, 32768)
    }

    #[test]
    fn geometry() {
        let l = lengths();
        assert_eq!(l.pieces, 4);
        assert_eq!(l.piece_size(3), 24576);
        assert_eq!(l.blocks_in(3), 2);
        assert_eq!(l.block(3, 1), Block { index: 3, begin: 16384, length: 8192 });
        assert!(l.valid_request(&Block { index: 3, begin: 16384, length: 8192 }));
        assert!(!l.valid_request(&Block { index: 3, begin: 16384, length: 8193 }));
        assert!(!l.valid_request(&Block { index: 0, begin: 0, length: 16385 }));
        assert!(!l.valid_request(&Block { index: 4, begin: 0, length: 1 }));
        assert!(!l.valid_request(&Block { index: 0, begin: u32::MAX, length: 16 }));
        assert!(l.is_slot(&Block { index: 0, begin: 16384, length: 16384 }));
        assert!(!l.is_slot(&Block { index: 0, begin: 100, length: 16384 }));
    }

    #[test]
    fn rarest_first_and_started_pieces_first() {
        let l = lengths();
        let mut p = Picker::new(l, Bitfield::new(4), 0);
        let all = Bitfield::full(4);
        let mut only2 = Bitfield::new(4);
        only2.set(2);
        p.peer_bitfield(&all);
        p.peer_bitfield(&all);
        p.peer_bitfield(&only2);
        // Piece 2 is the most common; any of 0, 1, 3 is rarer.
        let first = p.pick(1, &all, 1, true);
        assert_ne!(first[0].index, 2);
        // The started piece is finished before another is begun.
        let next = p.pick(2, &all, 1, true);
        assert_eq!(next[0].index, first[0].index);
        assert_eq!(next[0].begin, 16384);
    }

    #[test]
    fn blocks_flow_to_a_verified_piece_and_failures_start_over() {
        let l = lengths();
        let mut p = Picker::new(l, Bitfield::new(4), 0);
        let all = Bitfield::full(4);
        p.peer_bitfield(&all);
        let reqs = p.pick(7, &all, 100, true);
        assert_eq!(reqs.len(), 8, "every block asked once");
        assert_eq!(p.on_block(8, &reqs[0]), BlockResult::Unwanted, "not asked of peer 8");
        let piece = reqs[0].index;
        let blocks: Vec<_> = reqs.iter().filter(|b| b.index == piece).collect();
        assert_eq!(p.on_block(7, blocks[0]), BlockResult::Accepted { complete: false, cancel: vec![] });
        assert_eq!(p.on_block(7, blocks[0]), BlockResult::Unwanted, "duplicate");
        assert_eq!(p.on_block(7, blocks[1]), BlockResult::Accepted { complete: true, cancel: vec![] });
        assert_eq!(p.on_hashed(piece, false), vec![(0, 7), (1, 7)]);
        assert!(!p.have().get(piece));
        // It can be asked for again, then verified.
        let again = p.pick(9, &all, 100, true);
        assert!(again.iter().any(|b| b.index == piece));
        for b in again.iter().filter(|b| b.index == piece) {
            p.on_block(9, b);
        }
        p.on_hashed(piece, true);
        assert!(p.have().get(piece));
    }

    #[test]
    fn a_failed_piece_is_fetched_again_from_one_peer_only() {
        let l = lengths();
        let mut p = Picker::new(l, Bitfield::new(4), 0);
        let only0 = {
            let mut b = Bitfield::new(4);
            b.set(0);
            b
        };
        p.peer_bitfield(&only0);
        let first = p.pick(1, &only0, 1, true);
        let second = p.pick(2, &only0, 1, true);
        p.on_block(1, &first[0]);
        p.on_block(2, &second[0]);
        assert_eq!(p.on_hashed(0, false), vec![(0, 1), (1, 2)]);
        let again = p.pick(3, &only0, 1, true);
        assert_eq!(again.len(), 1);
        assert!(p.pick(4, &only0, 10, true).is_empty(), "piece 0 belongs to peer 3 now");
        assert_eq!(p.pick(3, &only0, 10, true).len(), 1, "its owner gets the rest");
        p.release_peer(3);
        assert_eq!(p.pick(4, &only0, 10, true).len(), 2, "a departed owner frees it");
    }

    #[test]
    fn endgame_asks_a_second_peer_and_cancels_the_first() {
        let l = Lengths::new(16384, 16384);
        let mut p = Picker::new(l, Bitfield::new(1), 0);
        let all = Bitfield::full(1);
        let a = p.pick(1, &all, 10, true);
        assert_eq!(a.len(), 1);
        let b = p.pick(2, &all, 10, true);
        assert_eq!(b, a, "endgame duplicate");
        assert!(p.pick(3, &all, 10, true).is_empty(), "at most two askers per block");
        assert_eq!(p.on_block(2, &b[0]), BlockResult::Accepted { complete: true, cancel: vec![1] });
    }

    #[test]
    fn a_peer_leaving_frees_its_requests() {
        let l = lengths();
        let mut p = Picker::new(l, Bitfield::new(4), 0);
        let all = Bitfield::full(4);
        p.peer_bitfield(&all);
        let first = p.pick(1, &all, 3, true);
        p.peer_gone(1, &all);
        let second = p.pick(2, &all, 3, true);
        assert_eq!(first, second);
    }
}
