//! One torrent's swarm, sans-IO: the peers' protocol state, what to ask whom,
//! what to serve, metadata exchange (BEP 9/10), verification outcomes, strikes
//! and bans. The node feeds it handshakes, messages, hash results and time;
//! it leaves bytes to send in each peer's `out` buffer and work for the node
//! in `actions`. See `STATE.md` beside this file.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use super::metainfo::{InfoHash, Metainfo};
use super::picker::{BlockResult, Lengths, NO_PEER, PeerKey, Picker};
use super::storage::{PieceBuf, PieceWriter, Storage, View};
use super::wire::{self, BLOCK_SIZE, Bitfield, Block, Handshake, Message};
use crate::bencode::{self, Value};
use crate::hash::Digest;

pub mod fast;
mod metadata;
pub mod pex;
pub mod private;
mod window;

pub use window::PIPELINE;
use window::{MIN_PIPELINE, RequestWindow};

/// Requests a peer may queue with us (our `reqq`): a window of
/// [`PIPELINE`] and more; beyond it is a flood and the peer is dropped.
pub const MAX_PEER_REQUESTS: usize = 2 * PIPELINE;
/// Peers unchoked at once.
pub const UNCHOKE_SLOTS: usize = 16;
/// A block not delivered in this time is asked of someone else.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Our extension id for ut_metadata (BEP 9), announced in our handshake.
const UT_METADATA: u8 = 1;
/// Metadata pieces are 16 KiB (BEP 9).
const METADATA_PIECE: usize = 16 * 1024;
/// Largest info dict accepted by ut_metadata: 8 MiB is 400k pieces.
pub const MAX_METADATA: u64 = 8 * 1024 * 1024;
/// Bytes that may wait in a peer's swarm output before a ut_metadata request is answered with
/// a reject (BEP 9 msg_type 2) instead of the piece: four 16 KiB metadata pieces. The node
/// moves the output into the connection after each read turn, so this bounds what one turn of
/// requests can add beyond the rejects (each no larger than its request).
pub const MAX_METADATA_OUT: usize = 64 * 1024;
/// Bytes of distinct blocks a peer must move (served to it or received from it) to count as
/// useful for another `--peer-shed-grace`: one piece at the common 256 KiB piece length (16
/// whole blocks; 8.7 kB/s over the default 30 s grace). A slow but real leecher or seed moves
/// that much; a peer that only asks (1-byte requests, keep-alives) does not, nor one that asks
/// the same block again and again: a block counts once per window (red-team round 12: one whole
/// 16 KiB block per grace, even the same one, held 192 slots at 0.8 kB/s each).
pub const USEFUL_BYTES: u64 = 256 * 1024;
/// The most distinct 16 KiB spans (`(piece, begin / BLOCK_SIZE)`) a peer's usefulness window
/// remembers: twice the [`USEFUL_BYTES`] in whole blocks. A peer that fills it with short
/// requests of many spans before moving [`USEFUL_BYTES`] earns nothing more until it is shed.
const USEFUL_SPANS: usize = 2 * (USEFUL_BYTES / BLOCK_SIZE as u64) as usize;
/// Failed pieces a peer may send before it is banned.
const MAX_STRIKES: u32 = 2;

/// Who strikes and bans apply to: the IP address, as clients do; on loopback
/// (test networks, where every peer is 127.0.0.1) the address and port.
pub fn ban_key(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_loopback() { addr } else { SocketAddr::new(addr.ip(), 0) }
}

/// Bytes of pieces gathered in memory at most; no new piece is started past it.
pub const MAX_BUFFERED: u64 = 32 * 1024 * 1024;

/// Where a piece to verify is.
pub enum PieceData {
    /// On disk (a recheck): read through the map.
    Disk(View),
    /// Gathered in memory from peers: written at `offset` if it verifies,
    /// then handed back with [`Swarm::recycle`].
    Memory(PieceBuf, PieceWriter),
}

impl PieceData {
    /// Checks the piece (`len` bytes at file `offset`) against its SHA-1, `expected`: whether it
    /// verified, and each 16 KiB block's digest when `blocks` is asked for or the piece failed
    /// (the smart ban compares them). The node's hash workers run this; CPU-bound.
    pub fn verify(&self, offset: u64, len: u64, expected: Digest, blocks: bool) -> (bool, Vec<Digest>) {
        let bytes = match self {
            PieceData::Disk(view) => view.bytes(offset, len),
            PieceData::Memory(buf, _) => buf.as_slice(),
        };
        let ok = bytes.len() as u64 == len && crate::hash::sha1(bytes) == expected;
        let digests =
            if ok && !blocks { Vec::new() } else { bytes.chunks(BLOCK_SIZE as usize).map(crate::hash::sha1).collect() };
        (ok, digests)
    }
}

/// A block to send: the `piece` message header, then `len` bytes of the
/// file at `offset`.
pub struct Served {
    pub header: wire::PieceHeader,
    pub offset: u64,
    pub len: u32,
}

/// Work the node does for the swarm.
pub enum Action {
    /// Hash a complete piece; `blocks`: also return each block's digest.
    Hash { piece: u32, data: PieceData, offset: u64, len: u64, expected: Digest, blocks: bool },
    /// Every piece verified: sync and rename the file.
    Complete,
    /// The info dict arrived and verified (magnet): the node admits it (name, disk budget) and
    /// calls [`Swarm::accept_metadata`], or drops the download.
    MetadataReady,
    /// Close this peer's connection.
    Disconnect(PeerKey, String),
    /// Verified pieces changed: record them (debounced by the node).
    SaveResume,
    /// Addresses a peer's PEX message named (BEP 11): untrusted candidates for the download,
    /// dialled only within its peer budget.
    PexPeers(Vec<SocketAddr>),
}

/// One connected peer.
pub struct Peer {
    pub addr: SocketAddr,
    pub out: Vec<u8>,
    handshaken: bool,
    pub peer_id: [u8; 20],
    extensions: bool,
    their_ut_metadata: Option<u8>,
    am_choking: bool,
    am_interested: bool,
    peer_choking: bool,
    peer_interested: bool,
    bits: Bitfield,
    /// A bitfield and haves that arrived before the metadata (magnet):
    /// applied once the piece count is known.
    early_bits: Option<Vec<u8>>,
    early_haves: Vec<u32>,
    requested: Vec<(Block, Instant)>,
    queue: VecDeque<Block>,
    pub downloaded: u64,
    pub uploaded: u64,
    last_block: Instant,
    /// When the bytes of distinct blocks moved with the peer (served to it, or received from it
    /// as asked) last added up to [`USEFUL_BYTES`], or its connection began: a node at its
    /// peer caps sheds the accepted connection useful longest ago (`Node::shed_least_useful`).
    /// Requests alone do not count: a 1-byte request of an allowed-fast piece every 20 s held a
    /// slot for good (red-team round 11).
    pub useful_at: Instant,
    /// Bytes of blocks moved with the peer since `useful_at`, under [`USEFUL_BYTES`], each
    /// 16 KiB span counted once.
    moved: u64,
    /// The 16 KiB spans (piece, `begin / BLOCK_SIZE`) counted in `moved`, at most [`USEFUL_SPANS`].
    spans: Vec<(u32, u32)>,
    /// How many blocks to keep asked of it, and the measurements behind that.
    pipe: RequestWindow,
    /// Private swarms: this peer's proof of the cluster key.
    proof: Option<private::PeerProof>,
    /// The Fast extension (BEP 6).
    fast: fast::PeerFast,
    /// Peer exchange (BEP 11).
    pex: pex::PeerPex,
}

impl Peer {
    /// Block `b` moved with the peer at `now`: its bytes count unless its 16 KiB span already
    /// did since `useful_at` (or [`USEFUL_SPANS`] did); [`USEFUL_BYTES`] counted move
    /// `useful_at` to `now` and start a new window.
    fn moved(&mut self, b: &Block, now: Instant) {
        let span = (b.index, b.begin / BLOCK_SIZE);
        if self.spans.contains(&span) || self.spans.len() >= USEFUL_SPANS {
            return;
        }
        self.spans.push(span);
        self.moved += b.length as u64;
        if self.moved >= USEFUL_BYTES {
            self.moved = 0;
            self.spans.clear();
            self.useful_at = now;
        }
    }

    /// Whether it may see our pieces: a public swarm, or a peer that proved the cluster key.
    fn proved(&self) -> bool {
        self.proof.as_ref().is_none_or(|x| x.proved)
    }
}

enum Metadata {
    Known(Arc<Metainfo>),
    Fetching {
        size: usize,
        pieces: Vec<Option<Vec<u8>>>,
        asked: HashMap<u32, Instant>,
    },
    /// Fetched and verified against the info hash; the node has not admitted it yet.
    Received(Arc<Metainfo>),
    Unknown,
}

pub struct Swarm {
    pub info_hash: InfoHash,
    pub name: String,
    my_id: [u8; 20],
    meta: Metadata,
    storage: Option<Storage>,
    picker: Option<Picker>,
    pub peers: BTreeMap<PeerKey, Peer>,
    pub actions: Vec<Action>,
    strikes: HashMap<SocketAddr, u32>,
    /// Who is banned: [`ban_key`]s (bad pieces), and the exact address of a dialled peer that
    /// broke the protocol.
    pub banned: HashSet<SocketAddr>,
    /// Addresses of peers that left, so blocks they sent are still attributed.
    departed: HashMap<PeerKey, SocketAddr>,
    /// Pieces that failed: per block, who sent what, to pin the bad sender
    /// when the piece later verifies (libtorrent's smart ban).
    suspects: HashMap<u32, Vec<(u32, SocketAddr, Digest)>>,
    pub downloaded: u64,
    pub uploaded: u64,
    pub wasted: u64,
    pub started: Instant,
    pub completed: Option<Instant>,
    /// Pieces of a recheck still being hashed.
    pub rechecking: u32,
    /// Pieces read back from disk and hashed because no resume data vouched for them.
    pub rechecked: u32,
    /// Pieces being gathered from peers, and the bytes they hold (with those
    /// handed to the hash workers and not yet answered).
    buffers: HashMap<u32, PieceBuf>,
    buffered: u64,
    /// Piece buffers handed back after their piece was written, for reuse.
    spare: Vec<PieceBuf>,
    dir: std::path::PathBuf,
    /// Write verified pieces with direct I/O where the filesystem allows.
    direct_io: bool,
    /// `--private`: only peers proving the cluster key are served.
    private: Option<private::Private>,
    /// Peer exchange (BEP 11); never in a private swarm (BEP 27).
    pex: pex::SwarmPex,
    /// Counters of the Fast extension and PEX.
    pub stats: fast::ExtStats,
}

impl Swarm {
    /// A complete file we seed.
    pub fn seed(meta: Arc<Metainfo>, path: &std::path::Path, my_id: [u8; 20], now: Instant) -> Result<Swarm> {
        let lengths = Lengths::new(meta.info.length, meta.info.piece_length);
        let storage = Storage::open_complete(path, lengths)?;
        let mut s =
            Swarm::empty(meta.info_hash, meta.info.name.clone(), my_id, path.parent().unwrap_or(path).into(), now);
        s.picker = Some(Picker::new(lengths, Bitfield::full(lengths.pieces), 0));
        s.storage = Some(storage);
        s.meta = Metadata::Known(meta);
        s.completed = Some(now);
        Ok(s)
    }

    /// A file to download into `dir`; without metadata it is fetched from peers.
    /// `direct_io`: write verified pieces with direct I/O where possible.
    pub fn download(
        info_hash: InfoHash,
        meta: Option<Arc<Metainfo>>,
        name: &str,
        dir: &std::path::Path,
        my_id: [u8; 20],
        now: Instant,
        direct_io: bool,
    ) -> Result<Swarm> {
        let mut s = Swarm::empty(info_hash, name.to_string(), my_id, dir.to_path_buf(), now);
        s.direct_io = direct_io;
        if let Some(m) = meta {
            if m.info_hash != info_hash {
                return Err(anyhow!("metadata is for {}, not {info_hash}", m.info_hash));
            }
            s.open_storage(m)?;
        }
        Ok(s)
    }

    fn empty(info_hash: InfoHash, name: String, my_id: [u8; 20], dir: std::path::PathBuf, now: Instant) -> Swarm {
        Swarm {
            info_hash,
            name,
            my_id,
            meta: Metadata::Unknown,
            storage: None,
            picker: None,
            peers: BTreeMap::new(),
            actions: Vec::new(),
            strikes: HashMap::new(),
            banned: HashSet::new(),
            departed: HashMap::new(),
            suspects: HashMap::new(),
            downloaded: 0,
            uploaded: 0,
            wasted: 0,
            started: now,
            completed: None,
            rechecking: 0,
            rechecked: 0,
            buffers: HashMap::new(),
            buffered: 0,
            spare: Vec::new(),
            dir,
            direct_io: false,
            private: None,
            pex: pex::SwarmPex::default(),
            stats: fast::ExtStats::default(),
        }
    }

    fn open_storage(&mut self, m: Arc<Metainfo>) -> Result<()> {
        let lengths = Lengths::new(m.info.length, m.info.piece_length);
        let (storage, have, recheck) =
            Storage::open_part(&self.dir, &m.info.name, self.info_hash, lengths, self.direct_io)?;
        self.name = m.info.name.clone();
        let seed = u32::from_le_bytes(self.my_id[16..20].try_into().expect("4 bytes"));
        self.picker = Some(Picker::new(lengths, have, seed));
        self.storage = Some(storage);
        self.meta = Metadata::Known(m);
        if recheck {
            // Data on disk without resume data: every piece is hashed before
            // it counts, and only those that fail are fetched.
            self.rechecking = lengths.pieces;
            self.rechecked += lengths.pieces;
            for piece in 0..lengths.pieces {
                self.picker.as_mut().expect("just set").mark_checking(piece);
                self.queue_hash(piece);
            }
        }
        if self.picker.as_ref().is_some_and(Picker::is_complete) {
            self.actions.push(Action::Complete);
        }
        Ok(())
    }

    pub fn metainfo(&self) -> Option<&Arc<Metainfo>> {
        match &self.meta {
            Metadata::Known(m) => Some(m),
            _ => None,
        }
    }

    pub fn storage_mut(&mut self) -> Option<&mut Storage> {
        self.storage.as_mut()
    }

    pub fn have(&self) -> Option<&Bitfield> {
        self.picker.as_ref().map(Picker::have)
    }

    pub fn is_complete(&self) -> bool {
        self.completed.is_some()
    }

    pub fn total_length(&self) -> Option<u64> {
        self.picker.as_ref().map(|p| p.lengths().total)
    }

    /// Bytes verified so far.
    pub fn verified_bytes(&self) -> u64 {
        let Some(p) = &self.picker else { return 0 };
        let l = p.lengths();
        p.have().ones().map(|i| l.piece_size(i) as u64).sum()
    }

    /// A new connection; an outgoing one sends its handshake first.
    pub fn add_peer(&mut self, key: PeerKey, addr: SocketAddr, outgoing: bool, now: Instant) -> Result<()> {
        if self.banned.contains(&ban_key(addr)) || self.banned.contains(&addr) {
            return Err(anyhow!("{addr} is banned"));
        }
        let pieces = self.picker.as_ref().map_or(0, |p| p.lengths().pieces);
        let proof = self.new_proof(now);
        let mut peer = Peer {
            addr,
            out: Vec::new(),
            handshaken: false,
            peer_id: [0; 20],
            extensions: false,
            their_ut_metadata: None,
            am_choking: true,
            am_interested: false,
            peer_choking: true,
            peer_interested: false,
            bits: Bitfield::new(pieces),
            early_bits: None,
            early_haves: Vec::new(),
            requested: Vec::new(),
            queue: VecDeque::new(),
            downloaded: 0,
            uploaded: 0,
            last_block: now,
            useful_at: now,
            moved: 0,
            spans: Vec::new(),
            pipe: RequestWindow::new(now),
            proof,
            fast: fast::PeerFast::default(),
            pex: pex::PeerPex::new(outgoing),
        };
        if outgoing {
            Handshake::new(self.info_hash, self.my_id).encode(&mut peer.out);
        }
        self.peers.insert(key, peer);
        Ok(())
    }

    /// The peer's handshake arrived (the node checked its info hash).
    pub fn on_handshake(&mut self, key: PeerKey, hs: &Handshake, outgoing: bool) -> Result<()> {
        if hs.peer_id == self.my_id {
            return Err(anyhow!("connected to ourselves"));
        }
        if self.peers.iter().any(|(k, p)| *k != key && p.handshaken && p.peer_id == hs.peer_id) {
            return Err(anyhow!("already connected to this peer"));
        }
        let ext_payload = self.extension_handshake(self.private_handshake_fields(key));
        let have = self.picker.as_ref().map(|p| p.have().clone());
        let private = self.private.is_some();
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        if private && !hs.supports_extensions() {
            return Err(anyhow!("private swarm: the peer does not speak BEP 10, so it cannot prove the cluster key"));
        }
        peer.handshaken = true;
        peer.peer_id = hs.peer_id;
        peer.extensions = hs.supports_extensions();
        peer.fast.on = hs.supports_fast();
        self.stats.fast_peers += peer.fast.on as u64;
        if !outgoing {
            Handshake::new(self.info_hash, self.my_id).encode(&mut peer.out);
        }
        if peer.extensions {
            wire::encode(&Message::Extended { id: 0, payload: &ext_payload }, &mut peer.out);
        }
        // A private swarm shows its pieces only after the proof.
        if !private {
            fast::announce(peer, have.as_ref(), &mut self.stats);
        }
        Ok(())
    }

    fn extension_handshake(&self, nonce: Option<[u8; 32]>) -> Vec<u8> {
        let mut m = vec![("ut_metadata", Value::Int(UT_METADATA as i64))];
        if nonce.is_some() {
            m.push(("shardnet_auth", Value::Int(private::SHARDNET_AUTH as i64)));
        }
        if self.private.is_none() {
            m.push(("ut_pex", Value::Int(pex::UT_PEX as i64)));
        }
        let mut d = vec![
            ("m", bencode::dict(m)),
            ("reqq", Value::Int(MAX_PEER_REQUESTS as i64)),
            ("v", Value::str("shardnet")),
        ];
        if let Some(port) = self.pex.listen_port {
            d.push(("p", Value::Int(port as i64)));
        }
        if let Some(n) = &nonce {
            d.push(("shardnet_nonce", Value::bytes(&n[..])));
        }
        if let Metadata::Known(m) = &self.meta {
            d.push(("metadata_size", Value::Int(m.raw_info.len() as i64)));
        }
        bencode::dict(d).encode()
    }

    /// Largest message a peer may send us.
    pub fn max_message(&self) -> u32 {
        let bitfield = self.picker.as_ref().map_or(0, |p| p.lengths().pieces.div_ceil(8));
        (BLOCK_SIZE + 13).max(bitfield + 5).max(METADATA_PIECE as u32 + 1024)
    }

    /// One message from a handshaken peer. `Err`: a protocol violation; drop it.
    pub fn on_message(&mut self, key: PeerKey, msg: Message<'_>, now: Instant) -> Result<()> {
        match msg {
            Message::KeepAlive | Message::Port(_) | Message::Unknown { .. } => {}
            Message::Choke => {
                let peer = self.peer(key)?;
                peer.peer_choking = true;
                if peer.fast.on {
                    // BEP 6: a choke rejects nothing; each request gets a block or a reject.
                    return Ok(());
                }
                let requested: Vec<Block> = peer.requested.drain(..).map(|(b, _)| b).collect();
                if let Some(p) = self.picker.as_mut() {
                    for b in &requested {
                        p.release(key, b);
                    }
                }
            }
            Message::Unchoke => {
                self.peer(key)?.peer_choking = false;
                self.request_more(key);
            }
            Message::Interested => {
                self.peer(key)?.peer_interested = true;
                self.send_allowed_fast(key);
                self.rechoke();
            }
            Message::NotInterested => {
                let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
                peer.peer_interested = false;
                Swarm::reject_all(peer, peer.queue.clone(), &mut self.stats);
                peer.queue.clear();
                self.rechoke();
            }
            Message::Have(i) => self.on_have(key, i)?,
            Message::Bitfield(bytes) => self.on_bitfield(key, bytes)?,
            Message::Request(b) => self.on_request(key, b)?,
            Message::Cancel(b) => {
                let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
                let before = peer.queue.len();
                peer.queue.retain(|q| *q != b);
                if peer.queue.len() < before {
                    Swarm::reject_all(peer, [b], &mut self.stats);
                }
            }
            Message::Piece { index, begin, data } => self.on_piece(key, index, begin, data, now)?,
            Message::Extended { id, payload } => self.on_extended(key, id, payload, now)?,
            Message::HaveAll => self.on_have_all_none(key, true)?,
            Message::HaveNone => self.on_have_all_none(key, false)?,
            Message::RejectRequest(b) => self.on_reject(key, b)?,
            Message::AllowedFast(i) => self.on_allowed_fast(key, i)?,
            Message::SuggestPiece(i) => self.on_suggest(key, i)?,
        }
        Ok(())
    }

    fn peer(&mut self, key: PeerKey) -> Result<&mut Peer> {
        self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))
    }

    fn on_have(&mut self, key: PeerKey, i: u32) -> Result<()> {
        let Some(picker) = self.picker.as_mut() else {
            let peer = self.peer(key)?;
            if peer.early_haves.len() < (MAX_METADATA / 20) as usize {
                peer.early_haves.push(i);
            }
            return Ok(());
        };
        if i >= picker.lengths().pieces {
            return Err(anyhow!("have for piece {i} of {}", picker.lengths().pieces));
        }
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        if peer.bits.set(i) {
            picker.peer_has(i);
        }
        self.update_interest(key);
        Ok(())
    }

    fn on_bitfield(&mut self, key: PeerKey, bytes: &[u8]) -> Result<()> {
        self.note_bitfield(key)?;
        let Some(picker) = self.picker.as_mut() else {
            // No metadata yet: the piece count is unknown; keep it for later.
            let peer = self.peer(key)?;
            if bytes.len() as u64 > MAX_METADATA / 20 / 8 + 1 {
                return Err(anyhow!("bitfield of {} bytes is larger than any torrent we accept", bytes.len()));
            }
            peer.early_bits = Some(bytes.to_vec());
            return Ok(());
        };
        let n = picker.lengths().pieces;
        let bits = Bitfield::from_wire(bytes, n)
            .ok_or_else(|| anyhow!("bitfield of {} bytes (or spare bits set) for {n} pieces", bytes.len()))?;
        let peer = self.peers.get_mut(&key).ok_or_else(|| anyhow!("unknown peer"))?;
        // Some clients (aria2) send haves first and a bitfield later: merge.
        for i in bits.ones() {
            if peer.bits.set(i) {
                picker.peer_has(i);
            }
        }
        self.update_interest(key);
        Ok(())
    }

    /// A peer's request: queued to be served, or dropped (a plain peer we choke).
    fn on_request(&mut self, key: PeerKey, b: Block) -> Result<()> {
        let Some(picker) = &self.picker else { return Err(anyhow!("request before metadata")) };
        if !picker.lengths().valid_request(&b) {
            return Err(anyhow!("request {b:?} out of range or over {BLOCK_SIZE} bytes"));
        }
        if !picker.have().get(b.index) {
            return Err(anyhow!("request for piece {} which we do not have", b.index));
        }
        if self.peer(key)?.am_choking && !self.request_while_choked(key, b)? {
            return Ok(()); // plain peer: may cross an unchoke in flight; dropped, as BEP 3 allows
        }
        let peer = self.peer(key)?;
        if peer.queue.len() >= MAX_PEER_REQUESTS {
            return Err(anyhow!("more than {MAX_PEER_REQUESTS} requests queued"));
        }
        peer.queue.push_back(b);
        Ok(())
    }

    fn on_piece(&mut self, key: PeerKey, index: u32, begin: u32, data: &[u8], now: Instant) -> Result<()> {
        let b = Block { index, begin, length: data.len() as u32 };
        let peer = self.peer(key)?;
        let pos = peer.requested.iter().position(|(r, _)| *r == b);
        let Some(pos) = pos else {
            self.wasted += data.len() as u64;
            return Ok(()); // cancelled in endgame, or never asked: ignored
        };
        let (_, asked) = peer.requested.swap_remove(pos);
        peer.pipe.on_block(data.len() as u64, asked, now);
        peer.downloaded += data.len() as u64;
        peer.last_block = now;
        peer.moved(&b, now);
        let Some(picker) = self.picker.as_mut() else { return Ok(()) };
        match picker.on_block(key, &b) {
            BlockResult::Unwanted => self.wasted += data.len() as u64,
            BlockResult::Accepted { complete, cancel } => {
                let size = picker.lengths().piece_size(index) as usize;
                let (buffered, spare) = (&mut self.buffered, &mut self.spare);
                let buf = self.buffers.entry(index).or_insert_with(|| {
                    *buffered += size as u64;
                    // A spare buffer's old bytes are all overwritten: the
                    // piece is hashed only once every block has arrived.
                    match spare.pop() {
                        Some(b) if b.capacity() >= size => b.reuse(size),
                        _ => PieceBuf::new(size),
                    }
                });
                buf.as_mut_slice()[begin as usize..begin as usize + data.len()].copy_from_slice(data);
                self.downloaded += data.len() as u64;
                for other in cancel {
                    if let Some(p) = self.peers.get_mut(&other) {
                        p.requested.retain(|(r, _)| *r != b);
                        wire::encode(&Message::Cancel(b), &mut p.out);
                        p.fast.cancelled(b);
                    }
                }
                if complete {
                    self.queue_hash(index);
                }
            }
        }
        self.request_more(key);
        Ok(())
    }

    fn queue_hash(&mut self, piece: u32) {
        let (Some(picker), Some(storage), Metadata::Known(m)) = (&self.picker, &self.storage, &self.meta) else {
            return;
        };
        let l = picker.lengths();
        let data = match self.buffers.remove(&piece) {
            Some(buf) => PieceData::Memory(buf, storage.writer()),
            None => PieceData::Disk(storage.view()),
        };
        self.actions.push(Action::Hash {
            piece,
            data,
            offset: piece as u64 * l.piece_length,
            len: l.piece_size(piece) as u64,
            expected: m.info.pieces[piece as usize],
            blocks: self.suspects.contains_key(&piece),
        });
    }

    /// The hash workers' verdict; `blocks` are the piece's per-block digests
    /// (present when the piece failed or was a suspect).
    pub fn on_hashed(&mut self, piece: u32, ok: bool, blocks: &[Digest]) {
        let Some(picker) = self.picker.as_mut() else { return };
        let senders = picker.on_hashed(piece, ok);
        let senders: Vec<(u32, PeerKey)> = senders.into_iter().filter(|(_, k)| *k != NO_PEER).collect();
        if !senders.is_empty() {
            self.buffered = self.buffered.saturating_sub(picker.lengths().piece_size(piece) as u64);
        }
        self.rechecking = self.rechecking.saturating_sub(senders.is_empty() as u32);
        let complete = picker.is_complete();
        let piece_size = picker.lengths().piece_size(piece) as u64;
        if ok {
            // Smart ban: whoever sent a block that differs from the good one lied.
            let liars: Vec<SocketAddr> = self
                .suspects
                .remove(&piece)
                .unwrap_or_default()
                .into_iter()
                .filter(|(block, _, digest)| blocks.get(*block as usize).is_some_and(|good| good != digest))
                .map(|(_, ip, _)| ip)
                .collect();
            for ip in liars {
                self.ban(ip, &format!("sent a corrupt block of piece {piece}"));
            }
            let have = Message::Have(piece);
            for p in self.peers.values_mut().filter(|p| p.handshaken && p.proved()) {
                wire::encode(&have, &mut p.out);
            }
            self.actions.push(Action::SaveResume);
            if complete && self.completed.is_none() {
                self.actions.push(Action::Complete);
            }
            let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
            for k in keys {
                self.update_interest(k);
            }
        } else {
            if !senders.is_empty() {
                self.wasted += piece_size;
            }
            let mut senders_keys: Vec<SocketAddr> = Vec::new();
            let mut unknown = false;
            for (block, k) in senders {
                let addr = self.peers.get(&k).map(|p| p.addr).or_else(|| self.departed.get(&k).copied());
                let Some(key) = addr.map(ban_key) else {
                    unknown = true;
                    continue;
                };
                if let Some(d) = blocks.get(block as usize) {
                    self.suspects.entry(piece).or_default().push((block, key, *d));
                }
                if !senders_keys.contains(&key) {
                    senders_keys.push(key);
                }
            }
            // One sender: the bad data is certainly its. Several: the smart
            // ban above settles it once the piece verifies.
            if let ([only], false) = (&senders_keys[..], unknown) {
                let only = *only;
                let strikes = {
                    let s = self.strikes.entry(only).or_default();
                    *s += 1;
                    *s
                };
                if strikes >= MAX_STRIKES {
                    self.ban(only, &format!("{strikes} pieces it sent alone failed verification"));
                }
            }
        }
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.request_more(k);
        }
    }

    fn ban(&mut self, key: SocketAddr, why: &str) {
        self.banned.insert(key);
        for (k, p) in &self.peers {
            if ban_key(p.addr) == key {
                self.actions.push(Action::Disconnect(*k, format!("banned: {why}")));
            }
        }
    }

    /// Sends interested / not interested as the peer's pieces and ours change.
    fn update_interest(&mut self, key: PeerKey) {
        let Some(picker) = &self.picker else { return };
        let Some(peer) = self.peers.get_mut(&key) else { return };
        let have = picker.have();
        let wants = !have.is_complete() && peer.bits.ones().any(|i| !have.get(i));
        if wants != peer.am_interested {
            peer.am_interested = wants;
            wire::encode(if wants { &Message::Interested } else { &Message::NotInterested }, &mut peer.out);
        }
        if wants {
            self.request_more(key);
        }
    }

    /// Keeps the peer's pipeline of blocks asked of an unchoking peer (of a choking fast peer:
    /// of its allowed-fast pieces).
    fn request_more(&mut self, key: PeerKey) {
        let (Some(picker), Some(peer)) = (self.picker.as_mut(), self.peers.get_mut(&key)) else { return };
        if (peer.peer_choking && !peer.fast.on) || !peer.am_interested || picker.is_complete() {
            return;
        }
        let room = peer.pipe.pipeline().saturating_sub(peer.requested.len());
        if room == 0 {
            return;
        }
        let now = Instant::now();
        let may_start = self.buffered < MAX_BUFFERED;
        let choked = peer.peer_choking;
        let mut blocks = self.pick_fast(key, room, may_start);
        let (Some(picker), Some(peer)) = (self.picker.as_mut(), self.peers.get_mut(&key)) else { return };
        if !choked && blocks.len() < room {
            blocks.extend(picker.pick(key, &peer.bits, room - blocks.len(), may_start));
        }
        for b in blocks {
            wire::encode(&Message::Request(b), &mut peer.out);
            peer.requested.push((b, now));
        }
    }

    /// Unchokes interested peers while slots are free; chokes the uninterested.
    fn rechoke(&mut self) {
        let mut unchoked = self.peers.values().filter(|p| !p.am_choking).count();
        for p in self.peers.values_mut() {
            if !p.am_choking && !p.peer_interested {
                p.am_choking = true;
                wire::encode(&Message::Choke, &mut p.out);
                // BEP 6: what a fast peer asked is rejected, but for its allowed-fast pieces.
                let allowed = std::mem::take(&mut p.fast.allowed_out);
                let (keep, drop): (VecDeque<Block>, VecDeque<Block>) =
                    p.queue.drain(..).partition(|b| p.fast.on && allowed.contains(&b.index));
                Swarm::reject_all(p, drop, &mut self.stats);
                p.queue = keep;
                p.fast.allowed_out = allowed;
                unchoked -= 1;
            }
        }
        for p in self.peers.values_mut() {
            if unchoked >= UNCHOKE_SLOTS {
                break;
            }
            if p.am_choking && p.peer_interested && p.handshaken && p.proved() {
                p.am_choking = false;
                wire::encode(&Message::Unchoke, &mut p.out);
                unchoked += 1;
            }
        }
    }

    /// Takes queued requests of `key` to serve, while they add up to under
    /// `room` bytes and `budget` allows: each goes to `out` as a `piece`
    /// message header and where its data is in [`Swarm::view`] (the node
    /// sends the bytes from the map, after the peer's `out`). Returns the
    /// bytes served.
    pub fn serve(&mut self, key: PeerKey, room: usize, budget: &mut u64, out: &mut Vec<Served>, now: Instant) -> u64 {
        let (Some(_), Some(picker)) = (&self.storage, &self.picker) else { return 0 };
        let Some(peer) = self.peers.get_mut(&key) else { return 0 };
        let l = picker.lengths();
        let mut served = 0u64;
        while (served as usize) < room && *budget >= BLOCK_SIZE as u64 {
            let Some(b) = peer.queue.pop_front() else { break };
            out.push(Served {
                header: wire::piece_header(b.index, b.begin, b.length),
                offset: l.offset(&b),
                len: b.length,
            });
            served += b.length as u64;
            *budget -= b.length as u64;
            peer.moved(&b, now);
        }
        peer.uploaded += served;
        self.uploaded += served;
        served
    }

    /// The file's bytes, for serving blocks.
    pub fn view(&self) -> Option<View> {
        self.storage.as_ref().map(Storage::view)
    }

    /// Whether `key` has requests waiting to be served.
    pub fn has_queued(&self, key: PeerKey) -> bool {
        self.peers.get(&key).is_some_and(|p| !p.queue.is_empty())
    }

    pub fn remove_peer(&mut self, key: PeerKey) {
        if let Some(peer) = self.peers.remove(&key) {
            if self.departed.len() >= 4096 {
                self.departed.clear(); // bounded; an unknown sender only forgoes a strike
            }
            self.departed.insert(key, peer.addr);
            if let Some(p) = self.picker.as_mut() {
                p.peer_gone(key, &peer.bits);
            }
            if let Metadata::Fetching { asked, .. } = &mut self.meta {
                asked.clear();
            }
            self.rechoke();
        }
    }

    /// Timeouts: requests not answered are asked of others; snubbing peers
    /// (unchoked, asked, silent) are dropped.
    pub fn tick(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (k, p) in &mut self.peers {
            let before = p.requested.len();
            let mut cancels = Vec::new();
            p.requested.retain(|(b, at)| {
                let keep = now.duration_since(*at) < REQUEST_TIMEOUT;
                if !keep {
                    expired.push((*k, *b));
                    cancels.push(*b);
                }
                keep
            });
            for b in cancels {
                wire::encode(&Message::Cancel(b), &mut p.out);
                p.fast.cancelled(b);
            }
            // A fast peer's choke leaves our requests asked (BEP 6): their expiry while it chokes
            // us is no snub.
            let snubbing = before > 0 && !p.peer_choking;
            if snubbing && p.requested.is_empty() && now.duration_since(p.last_block) > REQUEST_TIMEOUT * 2 {
                self.actions.push(Action::Disconnect(*k, "snubbed: no block in 40 s".into()));
            }
        }
        for k in self.unproved_expired(now) {
            let why =
                format!("private swarm: no proof of the cluster key within {}s", private::PROOF_TIMEOUT.as_secs());
            self.actions.push(Action::Disconnect(k, why));
        }
        if let Some(picker) = self.picker.as_mut() {
            for (k, b) in &expired {
                picker.release(*k, b);
            }
        }
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.request_more(k);
        }
        self.request_metadata(now);
        self.send_pex(now);
    }

    /// A piece buffer back from the workers: kept for the next piece while
    /// the download runs (at most [`MAX_BUFFERED`] bytes of them).
    pub fn recycle(&mut self, buf: PieceBuf) {
        let Some(picker) = &self.picker else { return };
        let piece_length = picker.lengths().piece_length as usize;
        let room = (MAX_BUFFERED as usize / piece_length.max(1)).max(1);
        if self.completed.is_none()
            && !picker.is_complete()
            && buf.capacity() >= piece_length
            && self.spare.len() < room
        {
            self.spare.push(buf);
        }
    }

    /// The node renamed the finished file.
    pub fn mark_complete(&mut self, now: Instant) {
        self.completed.get_or_insert(now);
        self.spare = Vec::new();
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.update_interest(k);
        }
    }

    /// Each downloading peer's request pipeline, for STATUS: address, blocks to keep asked,
    /// blocks asked now, its `reqq`, the round trip (ms) and rate (bytes/s) measured.
    pub fn pipelines(&self) -> Vec<(SocketAddr, usize, usize, usize, Option<f64>, f64)> {
        self.peers
            .values()
            .filter(|p| p.downloaded > 0 || !p.requested.is_empty())
            .map(|p| {
                let rtt = p.pipe.min_rtt().map(|r| r.as_secs_f64() * 1e3);
                (p.addr, p.pipe.pipeline(), p.requested.len(), p.pipe.reqq, rtt, p.pipe.rate())
            })
            .collect()
    }

    /// Pieces verified of all, and peers connected, for STATUS.
    pub fn progress(&self) -> (u32, u32) {
        self.picker.as_ref().map_or((0, 0), |p| (p.have().count(), p.lengths().pieces))
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_ext;
