//! The BitTorrent peer wire (BEP 3), the Fast extension's messages (BEP 6) and
//! the extension protocol frame (BEP 10): a sans-IO codec. `decode` looks at buffered bytes and returns one message
//! (borrowing its payload) and the bytes it used, or that more are needed.
//! Every message's length is checked exactly against its id before use; a
//! declared length over the limit is an error from the 4-byte prefix alone.
//!
//! ```text
//! handshake: 19 "BitTorrent protocol" reserved[8] info_hash[20] peer_id[20]
//! message:   len u32 BE | id u8 | payload (len - 1 bytes); len 0 = keep-alive
//! ```

use std::fmt;

use super::metainfo::InfoHash;

pub const PROTOCOL: &[u8; 19] = b"BitTorrent protocol";
pub const HANDSHAKE_LEN: usize = 68;
/// Block size every client uses (BEP 3 convention; larger requests are refused).
pub const BLOCK_SIZE: u32 = 16 * 1024;
/// Reserved bit announcing the extension protocol (BEP 10): byte 5, 0x10.
const EXTENSION_BIT: (usize, u8) = (5, 0x10);
/// Reserved bit announcing the Fast extension (BEP 6): byte 7, 0x04.
const FAST_BIT: (usize, u8) = (7, 0x04);

pub mod id {
    pub const CHOKE: u8 = 0;
    pub const UNCHOKE: u8 = 1;
    pub const INTERESTED: u8 = 2;
    pub const NOT_INTERESTED: u8 = 3;
    pub const HAVE: u8 = 4;
    pub const BITFIELD: u8 = 5;
    pub const REQUEST: u8 = 6;
    pub const PIECE: u8 = 7;
    pub const CANCEL: u8 = 8;
    pub const PORT: u8 = 9;
    /// BEP 6 (Fast extension): only between peers that both set the fast bit.
    pub const SUGGEST_PIECE: u8 = 0x0D;
    pub const HAVE_ALL: u8 = 0x0E;
    pub const HAVE_NONE: u8 = 0x0F;
    pub const REJECT_REQUEST: u8 = 0x10;
    pub const ALLOWED_FAST: u8 = 0x11;
    pub const EXTENDED: u8 = 20;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    pub reserved: [u8; 8],
    pub info_hash: InfoHash,
    pub peer_id: [u8; 20],
}

impl Handshake {
    /// Our handshake: the extension protocol (BEP 10) and the Fast extension (BEP 6) announced.
    pub fn new(info_hash: InfoHash, peer_id: [u8; 20]) -> Handshake {
        let mut reserved = [0u8; 8];
        reserved[EXTENSION_BIT.0] |= EXTENSION_BIT.1;
        reserved[FAST_BIT.0] |= FAST_BIT.1;
        Handshake { reserved, info_hash, peer_id }
    }

    /// The same handshake without the Fast bit (a peer of plain BEP 3; tests).
    pub fn without_fast(mut self) -> Handshake {
        self.reserved[FAST_BIT.0] &= !FAST_BIT.1;
        self
    }

    pub fn supports_extensions(&self) -> bool {
        self.reserved[EXTENSION_BIT.0] & EXTENSION_BIT.1 != 0
    }

    /// Whether this side set the Fast bit; the extension is on only when both did (BEP 6).
    pub fn supports_fast(&self) -> bool {
        self.reserved[FAST_BIT.0] & FAST_BIT.1 != 0
    }

    /// `Ok(None)` until 68 bytes are buffered.
    pub fn decode(buf: &[u8]) -> Result<Option<Handshake>, WireError> {
        if let Some(&first) = buf.first()
            && first != 19
        {
            return Err(WireError::BadHandshake);
        }
        let known = buf.len().min(20);
        if buf.len() > 1 && buf[1..known] != PROTOCOL[..known - 1] {
            return Err(WireError::BadHandshake);
        }
        if buf.len() < HANDSHAKE_LEN {
            return Ok(None);
        }
        Ok(Some(Handshake {
            reserved: buf[20..28].try_into().expect("8 bytes"),
            info_hash: InfoHash(buf[28..48].try_into().expect("20 bytes")),
            peer_id: buf[48..68].try_into().expect("20 bytes"),
        }))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(19);
        out.extend_from_slice(PROTOCOL);
        out.extend_from_slice(&self.reserved);
        out.extend_from_slice(&self.info_hash.0);
        out.extend_from_slice(&self.peer_id);
    }
}

/// A block: `length` bytes at `begin` within piece `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Block {
    pub index: u32,
    pub begin: u32,
    pub length: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    KeepAlive,
    Choke,
    Unchoke,
    Interested,
    NotInterested,
    Have(u32),
    Bitfield(&'a [u8]),
    Request(Block),
    Piece {
        index: u32,
        begin: u32,
        data: &'a [u8],
    },
    Cancel(Block),
    Port(u16),
    /// BEP 6: "this piece would be a good one to ask for" (advisory).
    SuggestPiece(u32),
    /// BEP 6: instead of a bitfield, the sender has every piece...
    HaveAll,
    /// ...or none.
    HaveNone,
    /// BEP 6: the sender will not answer this request with a block.
    RejectRequest(Block),
    /// BEP 6: the sender serves this piece to us even while it chokes us.
    AllowedFast(u32),
    Extended {
        id: u8,
        payload: &'a [u8],
    },
    /// An id this client does not know: skipped, as BEP 3 asks.
    Unknown {
        id: u8,
        len: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    BadHandshake,
    TooLong { declared: u32, limit: u32 },
    BadLength { id: u8, len: u32 },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::BadHandshake => write!(f, "not a BitTorrent handshake"),
            WireError::TooLong { declared, limit } => {
                write!(f, "message of {declared} bytes exceeds the limit of {limit}")
            }
            WireError::BadLength { id, len } => write!(f, "message id {id} with wrong length {len}"),
        }
    }
}

impl std::error::Error for WireError {}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Decodes one message from the start of `buf`. `Ok(None)`: more bytes needed.
pub fn decode(buf: &[u8], max_len: u32) -> Result<Option<(Message<'_>, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = be32(buf);
    if len > max_len {
        return Err(WireError::TooLong { declared: len, limit: max_len });
    }
    if len == 0 {
        return Ok(Some((Message::KeepAlive, 4)));
    }
    let total = 4 + len as usize;
    if buf.len() < total {
        // Validate fixed lengths early so a bad peer is cut off before it sends the body.
        if buf.len() >= 5 {
            check_length(buf[4], len)?;
        }
        return Ok(None);
    }
    let id = buf[4];
    check_length(id, len)?;
    let p = &buf[5..total];
    let msg = match id {
        id::CHOKE => Message::Choke,
        id::UNCHOKE => Message::Unchoke,
        id::INTERESTED => Message::Interested,
        id::NOT_INTERESTED => Message::NotInterested,
        id::HAVE => Message::Have(be32(p)),
        id::BITFIELD => Message::Bitfield(p),
        id::REQUEST => Message::Request(block(p)),
        id::PIECE => Message::Piece { index: be32(p), begin: be32(&p[4..]), data: &p[8..] },
        id::CANCEL => Message::Cancel(block(p)),
        id::PORT => Message::Port(u16::from_be_bytes([p[0], p[1]])),
        id::SUGGEST_PIECE => Message::SuggestPiece(be32(p)),
        id::HAVE_ALL => Message::HaveAll,
        id::HAVE_NONE => Message::HaveNone,
        id::REJECT_REQUEST => Message::RejectRequest(block(p)),
        id::ALLOWED_FAST => Message::AllowedFast(be32(p)),
        id::EXTENDED => Message::Extended { id: p[0], payload: &p[1..] },
        other => Message::Unknown { id: other, len: p.len() },
    };
    Ok(Some((msg, total)))
}

/// A request, cancel or reject's 12 bytes: index, begin, length.
fn block(p: &[u8]) -> Block {
    Block { index: be32(p), begin: be32(&p[4..]), length: be32(&p[8..]) }
}

/// The exact (or least) length each id allows.
fn check_length(id: u8, len: u32) -> Result<(), WireError> {
    let ok = match id {
        id::CHOKE | id::UNCHOKE | id::INTERESTED | id::NOT_INTERESTED | id::HAVE_ALL | id::HAVE_NONE => len == 1,
        id::HAVE | id::SUGGEST_PIECE | id::ALLOWED_FAST => len == 5,
        id::REQUEST | id::CANCEL | id::REJECT_REQUEST => len == 13,
        id::PIECE => len >= 9,
        id::PORT => len == 3,
        id::EXTENDED => len >= 2,
        _ => true,
    };
    if ok { Ok(()) } else { Err(WireError::BadLength { id, len }) }
}

/// A `piece` message's header: length, id, index, begin; the data follows.
pub type PieceHeader = [u8; 13];

/// The header of a `piece` message carrying `len` bytes of data.
pub fn piece_header(index: u32, begin: u32, len: u32) -> PieceHeader {
    let mut h = [0u8; 13];
    h[..4].copy_from_slice(&(9 + len).to_be_bytes());
    h[4] = id::PIECE;
    h[5..9].copy_from_slice(&index.to_be_bytes());
    h[9..].copy_from_slice(&begin.to_be_bytes());
    h
}

/// Appends the encoding of `msg` to `out`.
pub fn encode(msg: &Message<'_>, out: &mut Vec<u8>) {
    let header = |len: usize, id: u8, out: &mut Vec<u8>| {
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(id);
    };
    match msg {
        Message::KeepAlive => out.extend_from_slice(&[0, 0, 0, 0]),
        Message::Choke => header(1, id::CHOKE, out),
        Message::Unchoke => header(1, id::UNCHOKE, out),
        Message::Interested => header(1, id::INTERESTED, out),
        Message::NotInterested => header(1, id::NOT_INTERESTED, out),
        Message::HaveAll => header(1, id::HAVE_ALL, out),
        Message::HaveNone => header(1, id::HAVE_NONE, out),
        Message::Have(i) | Message::SuggestPiece(i) | Message::AllowedFast(i) => {
            let id = match msg {
                Message::Have(_) => id::HAVE,
                Message::SuggestPiece(_) => id::SUGGEST_PIECE,
                _ => id::ALLOWED_FAST,
            };
            header(5, id, out);
            out.extend_from_slice(&i.to_be_bytes());
        }
        Message::Bitfield(b) => {
            header(1 + b.len(), id::BITFIELD, out);
            out.extend_from_slice(b);
        }
        Message::Request(b) | Message::Cancel(b) | Message::RejectRequest(b) => {
            let id = match msg {
                Message::Request(_) => id::REQUEST,
                Message::Cancel(_) => id::CANCEL,
                _ => id::REJECT_REQUEST,
            };
            header(13, id, out);
            out.extend_from_slice(&b.index.to_be_bytes());
            out.extend_from_slice(&b.begin.to_be_bytes());
            out.extend_from_slice(&b.length.to_be_bytes());
        }
        Message::Piece { index, begin, data } => {
            header(9 + data.len(), id::PIECE, out);
            out.extend_from_slice(&index.to_be_bytes());
            out.extend_from_slice(&begin.to_be_bytes());
            out.extend_from_slice(data);
        }
        Message::Port(p) => {
            header(3, id::PORT, out);
            out.extend_from_slice(&p.to_be_bytes());
        }
        Message::Extended { id: ext, payload } => {
            header(2 + payload.len(), id::EXTENDED, out);
            out.push(*ext);
            out.extend_from_slice(payload);
        }
        Message::Unknown { id: unknown, len } => {
            header(1 + len, *unknown, out);
            out.extend(std::iter::repeat_n(0, *len));
        }
    }
}

/// Bitfields on the wire: bit 7 of byte 0 is piece 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitfield {
    bits: Vec<u8>,
    len: u32,
    count: u32,
}

impl Bitfield {
    pub fn new(len: u32) -> Bitfield {
        Bitfield { bits: vec![0; len.div_ceil(8) as usize], len, count: 0 }
    }

    pub fn full(len: u32) -> Bitfield {
        let mut b = Bitfield::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// A peer's bitfield: exactly `ceil(len / 8)` bytes, spare bits clear.
    pub fn from_wire(bytes: &[u8], len: u32) -> Option<Bitfield> {
        if bytes.len() != len.div_ceil(8) as usize {
            return None;
        }
        let spare = (bytes.len() as u32 * 8 - len) as u8;
        if spare > 0 && bytes[bytes.len() - 1] & ((1u8 << spare) - 1) != 0 {
            return None;
        }
        let count = bytes.iter().map(|b| b.count_ones()).sum();
        Some(Bitfield { bits: bytes.to_vec(), len, count })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    /// Sets bit `i`; returns whether it was clear.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len || self.get(i) {
            return false;
        }
        self.bits[(i / 8) as usize] |= 0x80 >> (i % 8);
        self.count += 1;
        true
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_complete(&self) -> bool {
        self.count == self.len
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|i| self.get(*i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_messages() -> Vec<Message<'static>> {
        vec![
            Message::KeepAlive,
            Message::Choke,
            Message::Unchoke,
            Message::Interested,
            Message::NotInterested,
            Message::Have(7),
            Message::Bitfield(&[0b1010_0000]),
            Message::Request(Block { index: 1, begin: 16384, length: 16384 }),
            Message::Piece { index: 2, begin: 0, data: b"hello" },
            Message::Cancel(Block { index: 1, begin: 0, length: 16384 }),
            Message::Port(6881),
            Message::SuggestPiece(3),
            Message::HaveAll,
            Message::HaveNone,
            Message::RejectRequest(Block { index: 4, begin: 32768, length: 16384 }),
            Message::AllowedFast(1059),
            Message::Extended { id: 0, payload: b"de" },
            Message::Unknown { id: 99, len: 3 },
        ]
    }

    #[test]
    fn every_message_round_trips_split_at_every_offset() {
        let mut wire = Vec::new();
        for m in all_messages() {
            encode(&m, &mut wire);
        }
        // Decode everything from every prefix: never an error, never a wrong message.
        for cut in 0..wire.len() {
            let mut pos = 0;
            while let Some((_, used)) = decode(&wire[pos..cut], 1 << 20).unwrap() {
                pos += used;
            }
        }
        let mut pos = 0;
        let mut got = Vec::new();
        while pos < wire.len() {
            let (m, used) = decode(&wire[pos..], 1 << 20).unwrap().unwrap();
            got.push(m);
            pos += used;
        }
        assert_eq!(got, all_messages());
    }

    #[test]
    fn piece_header_is_the_start_of_a_piece_message() {
        let mut wire = Vec::new();
        encode(&Message::Piece { index: 0x01020304, begin: 0x4000, data: &[9; 300] }, &mut wire);
        assert_eq!(piece_header(0x01020304, 0x4000, 300), wire[..13]);
    }

    #[test]
    fn real_bytes_decode() {
        // A request for piece 3, offset 32768, 16 KiB, as any client sends it.
        let bytes = [0, 0, 0, 13, 6, 0, 0, 0, 3, 0, 0, 0x80, 0, 0, 0, 0x40, 0];
        let (m, used) = decode(&bytes, 1 << 20).unwrap().unwrap();
        assert_eq!(used, 17);
        assert_eq!(m, Message::Request(Block { index: 3, begin: 32768, length: 16384 }));
    }

    #[test]
    fn wrong_lengths_and_oversize_are_errors() {
        assert_eq!(decode(&[0, 0, 0, 2, 0, 0], 100), Err(WireError::BadLength { id: 0, len: 2 }));
        assert_eq!(decode(&[0, 0, 0, 4, 4, 0, 0, 0], 100), Err(WireError::BadLength { id: 4, len: 4 }));
        assert_eq!(
            decode(&[0, 0, 0, 12, 6], 100),
            Err(WireError::BadLength { id: 6, len: 12 }),
            "checked before the body"
        );
        assert_eq!(decode(&[0, 0, 0, 8, 7], 100), Err(WireError::BadLength { id: 7, len: 8 }));
        assert_eq!(decode(&[0xff, 0, 0, 0], 100), Err(WireError::TooLong { declared: 0xff00_0000, limit: 100 }));
    }

    /// BEP 6's messages: exact lengths, each checked from the 5-byte prefix before the body.
    #[test]
    fn fast_messages_have_exact_lengths() {
        for (id, good) in [(0x0D, 5), (0x0E, 1), (0x0F, 1), (0x10, 13), (0x11, 5)] {
            for len in [1u32, 2, 5, 9, 13, 14] {
                let mut wire = len.to_be_bytes().to_vec();
                wire.push(id);
                let got = decode(&wire, 100);
                if len == good {
                    assert!(matches!(got, Ok(Some(_)) | Ok(None)), "id {id} len {len}: {got:?}");
                } else {
                    assert_eq!(got, Err(WireError::BadLength { id, len }), "id {id} len {len}");
                }
            }
        }
        // Real bytes: HAVE_ALL, and a REJECT of piece 1 at 16384, 16 KiB.
        assert_eq!(decode(&[0, 0, 0, 1, 0x0E], 100).unwrap().unwrap(), (Message::HaveAll, 5));
        let reject = [0, 0, 0, 13, 0x10, 0, 0, 0, 1, 0, 0, 0x40, 0, 0, 0, 0x40, 0];
        assert_eq!(
            decode(&reject, 100).unwrap().unwrap(),
            (Message::RejectRequest(Block { index: 1, begin: 16384, length: 16384 }), 17)
        );
    }

    #[test]
    fn handshake_round_trip_and_rejects() {
        let h = Handshake::new(InfoHash([7; 20]), [9; 20]);
        let mut b = Vec::new();
        h.encode(&mut b);
        assert_eq!(b.len(), HANDSHAKE_LEN);
        assert_eq!(Handshake::decode(&b).unwrap(), Some(h));
        assert!(h.supports_extensions());
        assert!(h.supports_fast());
        assert_eq!(b[27], 0x04, "the fast bit: reserved[7] |= 0x04");
        assert_eq!(b[25], 0x10, "the extension bit: reserved[5] |= 0x10");
        assert!(!h.without_fast().supports_fast() && h.without_fast().supports_extensions());
        for cut in 0..HANDSHAKE_LEN {
            assert_eq!(Handshake::decode(&b[..cut]).unwrap(), None);
        }
        let mut bad = b.clone();
        bad[3] = b'X';
        assert_eq!(Handshake::decode(&bad), Err(WireError::BadHandshake));
        assert_eq!(Handshake::decode(&[18]), Err(WireError::BadHandshake));
    }

    #[test]
    fn bitfields_check_length_and_spare_bits() {
        assert!(Bitfield::from_wire(&[0xff, 0x80], 9).is_some());
        assert!(Bitfield::from_wire(&[0xff, 0xc0], 9).is_none(), "spare bit set");
        assert!(Bitfield::from_wire(&[0xff], 9).is_none(), "too short");
        assert!(Bitfield::from_wire(&[0xff, 0, 0], 9).is_none(), "too long");
        let mut b = Bitfield::new(10);
        assert!(b.set(0) && b.set(9) && !b.set(9) && !b.set(10));
        assert_eq!(b.as_bytes(), &[0x80, 0x40]);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 9]);
        assert_eq!(Bitfield::full(10).count(), 10);
        assert_eq!(Bitfield::from_wire(b.as_bytes(), 10), Some(b));
    }
}
