//! Command frames: a big-endian `u32` length N, then N bytes of UTF-8 JSON.
//!
//! [`decode`] is sans-IO: it looks at the bytes a connection has buffered and
//! says whether a whole frame is there, how many more bytes are needed, or
//! that the declared length is over the limit, which it says from the 4-byte
//! prefix alone, before anything of that size is allocated.

/// Default largest payload accepted (`--max-frame`): 32 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 32 * 1024 * 1024;
/// A peer-wire handshake starts with byte 19 (BEP 3). The frame limit must
/// stay below `19 << 24` so that no legal frame starts with that byte.
pub const PEER_WIRE_FIRST_BYTE: u8 = 19;
/// Largest `--max-frame` allowed, keeping the first-byte split unambiguous.
pub const MAX_FRAME_LIMIT: u32 = (PEER_WIRE_FIRST_BYTE as u32) << 24;
pub const HEADER_LEN: usize = 4;

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame: its payload is `buf[4..4 + len]`, and `4 + len` bytes are used.
    Frame { len: usize },
    /// Not enough bytes yet: at least this many more are needed.
    NeedMore(usize),
    /// The declared length exceeds the limit; the connection cannot be resynchronised.
    TooLarge { declared: u32, limit: u32 },
}

pub fn decode(buf: &[u8], max_frame: u32) -> Decoded {
    if buf.len() < HEADER_LEN {
        return Decoded::NeedMore(HEADER_LEN - buf.len());
    }
    let declared = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if declared > max_frame {
        return Decoded::TooLarge { declared, limit: max_frame };
    }
    let total = HEADER_LEN + declared as usize;
    if buf.len() < total { Decoded::NeedMore(total - buf.len()) } else { Decoded::Frame { len: declared as usize } }
}

/// Appends one frame carrying `payload` to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("frame payload over 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_split_at_every_offset() {
        let mut wire = Vec::new();
        encode(br#"{"command":"STATUS"}"#, &mut wire);
        encode(b"", &mut wire);
        for cut in 0..wire.len() {
            let head = &wire[..cut];
            match decode(head, DEFAULT_MAX_FRAME) {
                Decoded::Frame { len } => {
                    assert!(cut >= 24);
                    assert_eq!(len, 20);
                }
                Decoded::NeedMore(n) => assert!(n > 0 && cut + n <= wire.len()),
                Decoded::TooLarge { .. } => panic!("not too large"),
            }
        }
        assert_eq!(decode(&wire, DEFAULT_MAX_FRAME), Decoded::Frame { len: 20 });
        assert_eq!(decode(&wire[24..], DEFAULT_MAX_FRAME), Decoded::Frame { len: 0 });
    }

    #[test]
    fn too_large_from_the_prefix_alone() {
        let prefix = (DEFAULT_MAX_FRAME + 1).to_be_bytes();
        assert_eq!(
            decode(&prefix, DEFAULT_MAX_FRAME),
            Decoded::TooLarge { declared: DEFAULT_MAX_FRAME + 1, limit: DEFAULT_MAX_FRAME }
        );
        assert!(matches!(decode(&u32::MAX.to_be_bytes(), DEFAULT_MAX_FRAME), Decoded::TooLarge { .. }));
    }

    #[test]
    fn no_legal_frame_starts_like_a_handshake() {
        let mut prefix = [0u8; 4];
        prefix[0] = PEER_WIRE_FIRST_BYTE;
        assert!(matches!(decode(&prefix, MAX_FRAME_LIMIT - 1), Decoded::TooLarge { .. }));
    }
}
