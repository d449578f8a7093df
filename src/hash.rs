//! SHA-1, behind one function.
//!
//! Every piece hash and info hash in the crate goes through [`sha1`] (or
//! [`Hasher`]). It is RustCrypto's `sha1`, which uses the CPU's SHA
//! extensions when it has them (runtime detection) and portable code when
//! not: hashing bounds the download rate, and on this machine SHA-NI runs at
//! 3x `sha1_smol` (figures in `target/bench/torrent.json`). `sha1_smol`, the
//! design's first choice, stays as the reference the tests check against and
//! the benchmarks compare with ([`sha1_portable`]).

use sha1::Digest as _;

/// A 20-byte SHA-1 digest.
pub type Digest = [u8; 20];

/// SHA-1 of `data`.
pub fn sha1(data: &[u8]) -> Digest {
    sha1::Sha1::digest(data).into()
}

/// SHA-1 with `sha1_smol` (portable, no CPU extensions): the reference.
pub fn sha1_portable(data: &[u8]) -> Digest {
    sha1_smol::Sha1::from(data).digest().bytes()
}

/// Incremental SHA-1, for data that arrives in parts.
#[derive(Default)]
pub struct Hasher(sha1::Sha1);

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Digest {
        self.0.finalize().into()
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parses hex of any even length.
pub fn from_hex_vec(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(((p[0] as char).to_digit(16)? * 16 + (p[1] as char).to_digit(16)?) as u8))
        .collect()
}

/// Parses exactly `N` bytes of hex (either case).
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_known_vectors() {
        assert_eq!(to_hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(to_hex(&sha1(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
    }

    #[test]
    fn fast_and_portable_agree() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 + i / 255) as u8).collect();
        for len in [0, 1, 55, 56, 63, 64, 65, 1000, data.len()] {
            assert_eq!(sha1(&data[..len]), sha1_portable(&data[..len]), "{len} bytes");
        }
        let mut h = Hasher::default();
        h.update(&data[..100]);
        h.update(&data[100..]);
        assert_eq!(h.finish(), sha1_portable(&data));
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let d = sha1(b"abc");
        assert_eq!(from_hex::<20>(&to_hex(&d)), Some(d));
        assert_eq!(from_hex::<20>(&to_hex(&d).to_uppercase()), Some(d));
        assert_eq!(from_hex::<2>("abc"), None);
        assert_eq!(from_hex::<2>("zz00"), None);
    }
}
