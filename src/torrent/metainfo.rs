//! BitTorrent v1 single-file metainfo (BEP 3): the info dictionary, the info
//! hash, `.torrent` files and magnet links (BEP 9).
//!
//! The info hash is the SHA-1 of the bencoded info dictionary. A parsed
//! `.torrent` keeps the info dictionary's bytes exactly as they were read, so
//! the hash is that of the file, whatever another encoder would write.
//!
//! Reading is as tolerant as libtorrent, Transmission and aria2 are: keys in
//! any order (other limits of the strict decoder kept: canonical integers,
//! no duplicate keys, depth, no trailing bytes). What we write is canonical.
//! Refused with a message naming the reason: multi-file torrents, v2-only
//! torrents (BEP 52, no v1 `pieces`), and files of zero bytes.

use std::fmt;

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::bencode::{self, Value};
use crate::hash::{self, Digest};

/// Smallest piece length we choose (DESIGN section 6).
pub const MIN_PIECE_LENGTH: u64 = 256 * 1024;
/// Largest piece length we choose (DESIGN section 6).
pub const MAX_PIECE_LENGTH: u64 = 4 * 1024 * 1024;
/// Target number of pieces: keeps `.torrent` files small and pieces fine-grained.
const TARGET_PIECES: u64 = 1024;
/// Largest piece length accepted from someone else's torrent (libtorrent's limit too).
pub const MAX_ACCEPTED_PIECE_LENGTH: u64 = 128 * 1024 * 1024;
/// Key of the top-level dictionary where a node records which file state the
/// cached metadata was built from. Other clients ignore unknown keys.
const SOURCE_KEY: &str = "shardnet source";

/// A torrent's identity: SHA-1 of its bencoded info dictionary.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InfoHash(pub Digest);

impl InfoHash {
    pub fn from_hex(s: &str) -> Option<InfoHash> {
        hash::from_hex::<20>(s).map(InfoHash)
    }
    pub fn to_hex(&self) -> String {
        hash::to_hex(&self.0)
    }
}

impl fmt::Display for InfoHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for InfoHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InfoHash({self})")
    }
}

/// The info dictionary of a single-file torrent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub length: u64,
    pub piece_length: u64,
    pub pieces: Vec<Digest>,
}

impl Info {
    /// Number of pieces a file of `length` bytes has with pieces of `piece_length`.
    pub fn piece_count(length: u64, piece_length: u64) -> u64 {
        length.div_ceil(piece_length)
    }

    /// The canonical bencoding of this info dictionary.
    pub fn encode(&self) -> Vec<u8> {
        let pieces: Vec<u8> = self.pieces.concat();
        bencode::dict([
            ("length", Value::Int(self.length as i64)),
            ("name", Value::str(&self.name)),
            ("piece length", Value::Int(self.piece_length as i64)),
            ("pieces", Value::bytes(pieces)),
        ])
        .encode()
    }

    /// Parses a bencoded info dict (as received by ut_metadata), keys in any order.
    pub fn parse_raw(raw: &[u8]) -> Result<Info> {
        Info::from_value(&bencode::decode_unsorted(raw)?)
    }

    fn from_value(v: &Value<'_>) -> Result<Info> {
        ensure!(v.as_dict().is_some(), "info is not a dictionary");
        if v.get("files").is_some() {
            bail!("multi-file torrents are not supported (a shard is one file; make a single-file torrent of it)");
        }
        let v2 = v.get("meta version").and_then(Value::as_int) == Some(2) || v.get("file tree").is_some();
        if v2 && v.get("pieces").is_none() {
            bail!(
                "v2-only torrents (BEP 52: meta version 2, no v1 pieces) are not supported: \
                 shardnet speaks BitTorrent v1; make a v1 or hybrid torrent"
            );
        }
        let name = v.get("name").and_then(Value::as_str).ok_or_else(|| anyhow!("info.name missing or not UTF-8"))?;
        check_file_name(name).context("info.name")?;
        let length = v.get("length").and_then(Value::as_int).ok_or_else(|| anyhow!("info.length missing"))?;
        ensure!(length >= 0, "info.length is negative");
        ensure!(length > 0, "zero-length file: a torrent of 0 bytes has nothing to share");
        let piece_length =
            v.get("piece length").and_then(Value::as_int).ok_or_else(|| anyhow!("info.piece length missing"))?;
        ensure!(
            piece_length > 0 && piece_length as u64 <= MAX_ACCEPTED_PIECE_LENGTH,
            "info.piece length {piece_length} outside 1..={MAX_ACCEPTED_PIECE_LENGTH}"
        );
        let pieces = v.get("pieces").and_then(Value::as_bytes).ok_or_else(|| anyhow!("info.pieces missing"))?;
        let expected = Info::piece_count(length as u64, piece_length as u64);
        ensure!(
            pieces.len() as u64 == expected * 20,
            "info.pieces holds {} bytes, expected {} for {} pieces",
            pieces.len(),
            expected * 20,
            expected
        );
        Ok(Info {
            name: name.to_string(),
            length: length as u64,
            piece_length: piece_length as u64,
            pieces: pieces.chunks_exact(20).map(|c| c.try_into().expect("chunk of 20")).collect(),
        })
    }
}

/// Which state of the source file a cached `.torrent` was built from: its size, modification
/// time, inode number and status-change time. A user can set the mtime back (`touch -d`,
/// `utimensat`), but not the ctime, which the kernel sets on every write, truncation, rename and
/// `utimensat`; a file replaced by another has another inode. Cached metadata is trusted only when
/// all four match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceStamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
    pub ctime_ns: i64,
}

/// A parsed or freshly built `.torrent`.
#[derive(Clone, Debug)]
pub struct Metainfo {
    pub info: Info,
    pub info_hash: InfoHash,
    /// The info dictionary's bytes, as read or as encoded.
    pub raw_info: Vec<u8>,
    pub created_by: Option<String>,
    pub creation_date: Option<i64>,
    pub source: Option<SourceStamp>,
}

impl Metainfo {
    pub fn new(info: Info) -> Metainfo {
        let raw_info = info.encode();
        Metainfo {
            info_hash: InfoHash(hash::sha1(&raw_info)),
            info,
            raw_info,
            created_by: Some(format!("shardnet {}", env!("CARGO_PKG_VERSION"))),
            creation_date: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs() as i64),
            source: None,
        }
    }

    /// Parses a `.torrent` file, keys in any order; the info hash is taken
    /// over the raw info bytes.
    pub fn parse(bytes: &[u8]) -> Result<Metainfo> {
        let root = bencode::decode_unsorted(bytes)?;
        ensure!(root.as_dict().is_some(), "torrent file is not a bencoded dictionary");
        let raw_info =
            bencode::raw_dict_value(bytes, b"info")?.ok_or_else(|| anyhow!("torrent has no info dictionary"))?;
        let info = Info::from_value(root.get("info").expect("raw info found"))?;
        let source = root.get(SOURCE_KEY).and_then(|s| {
            Some(SourceStamp {
                size: u64::try_from(s.get("size")?.as_int()?).ok()?,
                mtime_ns: s.get("mtime_ns")?.as_int()?,
                inode: u64::try_from(s.get("inode")?.as_int()?).ok()?,
                ctime_ns: s.get("ctime_ns")?.as_int()?,
            })
        });
        Ok(Metainfo {
            info,
            info_hash: InfoHash(hash::sha1(raw_info)),
            raw_info: raw_info.to_vec(),
            created_by: root.get("created by").and_then(Value::as_str).map(str::to_string),
            creation_date: root.get("creation date").and_then(Value::as_int),
            source,
        })
    }

    /// The bencoded `.torrent` file (no announce URL: peers come from the DHT).
    pub fn to_torrent_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw_info.len() + 128);
        // Keys in sorted order: "created by" < "creation date" < "info" < "shardnet source".
        out.push(b'd');
        if let Some(by) = &self.created_by {
            Value::str("created by").encode_into(&mut out);
            Value::str(by).encode_into(&mut out);
        }
        if let Some(date) = self.creation_date {
            Value::str("creation date").encode_into(&mut out);
            Value::Int(date).encode_into(&mut out);
        }
        Value::str("info").encode_into(&mut out);
        out.extend_from_slice(&self.raw_info);
        if let Some(s) = self.source {
            Value::str(SOURCE_KEY).encode_into(&mut out);
            bencode::dict([
                ("ctime_ns", Value::Int(s.ctime_ns)),
                ("inode", Value::Int(s.inode as i64)),
                ("mtime_ns", Value::Int(s.mtime_ns)),
                ("size", Value::Int(s.size as i64)),
            ])
            .encode_into(&mut out);
        }
        out.push(b'e');
        out
    }

    /// `magnet:?xt=urn:btih:HASH&dn=NAME&xl=LENGTH`.
    pub fn magnet(&self) -> String {
        Magnet {
            info_hash: self.info_hash,
            name: Some(self.info.name.clone()),
            length: Some(self.info.length),
            peers: Vec::new(),
        }
        .to_string()
    }
}

/// Piece length for a file of `size` bytes: a power of two giving about
/// [`TARGET_PIECES`] pieces, clamped to 256 KiB..=4 MiB.
pub fn piece_length_for(size: u64) -> u64 {
    (size / TARGET_PIECES).next_power_of_two().clamp(MIN_PIECE_LENGTH, MAX_PIECE_LENGTH)
}

/// A file name a torrent may carry and a node may write: one non-empty path
/// component, no separators, not `.` or `..`, no NUL.
pub fn check_file_name(name: &str) -> Result<()> {
    ensure!(!name.is_empty(), "empty file name");
    ensure!(name != "." && name != "..", "file name {name:?} is not a file");
    ensure!(!name.contains(['/', '\\', '\0']), "file name {name:?} contains a path separator or NUL");
    Ok(())
}

/// Peer hints (`x.pe`) kept from one magnet link at most.
pub const MAX_MAGNET_PEERS: usize = 64;

/// A magnet link (BEP 9): info hash, and optionally a name, a length and
/// peer addresses to try (`x.pe`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Magnet {
    pub info_hash: InfoHash,
    pub name: Option<String>,
    pub length: Option<u64>,
    /// `x.pe` peer hints, `HOST:PORT` or `[V6]:PORT`, as given.
    pub peers: Vec<String>,
}

impl Magnet {
    /// Parses a magnet link as other clients accept them: the info hash as
    /// 40 hex digits or 32 base32 characters (BEP 9), any number of `xt`
    /// (and `xt.N`) of which the first `urn:btih:` counts (a link with only
    /// `urn:btmh:`, v2, is refused with that reason), `x.pe` peer hints, and
    /// the display name and length read tolerantly (a bad %-escape is kept as
    /// it is, bytes that are not UTF-8 are replaced, a bad `xl` is ignored).
    pub fn parse(s: &str) -> Result<Magnet> {
        let query = s.strip_prefix("magnet:?").ok_or_else(|| anyhow!("not a magnet link (no 'magnet:?')"))?;
        let (mut info_hash, mut name, mut length, mut peers) = (None, None, None, Vec::new());
        let mut v2_only = false;
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode_lossy(v);
            match k {
                _ if k == "xt" || k.strip_prefix("xt.").is_some_and(|n| n.parse::<u32>().is_ok()) => {
                    if let Some(h) = v.strip_prefix("urn:btih:") {
                        let h = parse_btih(h).ok_or_else(|| {
                            anyhow!("magnet xt {h:?} is neither 40 hex digits nor 32 base32 characters")
                        })?;
                        info_hash.get_or_insert(h);
                    } else if v.starts_with("urn:btmh:") {
                        v2_only = true;
                    }
                }
                "dn" => name = Some(v),
                "xl" => length = v.parse().ok(),
                "x.pe" if peers.len() < MAX_MAGNET_PEERS => {
                    if crate::config::parse_peer_addr(&v).is_ok() {
                        peers.push(v);
                    }
                }
                _ => {}
            }
        }
        let info_hash = match info_hash {
            Some(h) => h,
            None if v2_only => bail!(
                "v2-only magnet link (urn:btmh, BEP 52) is not supported: shardnet speaks BitTorrent v1 (urn:btih)"
            ),
            None => bail!("magnet link has no xt=urn:btih: info hash"),
        };
        Ok(Magnet { info_hash, name, length, peers })
    }
}

/// A `btih` value: 40 hex digits, or 32 base32 characters (RFC 4648, any case).
fn parse_btih(s: &str) -> Option<InfoHash> {
    match s.len() {
        40 => InfoHash::from_hex(s),
        32 => {
            let mut out = [0u8; 20];
            let (mut acc, mut bits, mut at) = (0u64, 0u32, 0usize);
            for c in s.bytes() {
                let v = match c.to_ascii_uppercase() {
                    c @ b'A'..=b'Z' => c - b'A',
                    c @ b'2'..=b'7' => c - b'2' + 26,
                    _ => return None,
                };
                acc = (acc << 5) | u64::from(v);
                bits += 5;
                if bits >= 8 {
                    bits -= 8;
                    out[at] = (acc >> bits) as u8;
                    at += 1;
                }
            }
            Some(InfoHash(out))
        }
        _ => None,
    }
}

impl fmt::Display for Magnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "magnet:?xt=urn:btih:{}", self.info_hash)?;
        if let Some(name) = &self.name {
            write!(f, "&dn={}", percent_encode(name))?;
        }
        if let Some(len) = self.length {
            write!(f, "&xl={len}")?;
        }
        for p in &self.peers {
            write!(f, "&x.pe={}", percent_encode(p))?;
        }
        Ok(())
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// %-decoding as browsers and clients do it: `+` is a space, a bad escape
/// stays as it is, and bytes that are not UTF-8 are replaced.
fn percent_decode_lossy(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Info {
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let piece_length = MIN_PIECE_LENGTH;
        Info {
            name: "shard-0.gguf".into(),
            length: data.len() as u64,
            piece_length,
            pieces: data.chunks(piece_length as usize).map(hash::sha1).collect(),
        }
    }

    #[test]
    fn torrent_round_trip_keeps_hash_and_source() {
        let mut m = Metainfo::new(sample());
        m.source = Some(SourceStamp {
            size: 600_000,
            mtime_ns: 1_700_000_000_123_456_789,
            inode: 77,
            ctime_ns: 1_700_000_001_000_000_000,
        });
        let bytes = m.to_torrent_bytes();
        let back = Metainfo::parse(&bytes).unwrap();
        assert_eq!(back.info, m.info);
        assert_eq!(back.info_hash, m.info_hash);
        assert_eq!(back.source, m.source);
        assert_eq!(back.to_torrent_bytes(), bytes);
        // Info hash is over the info dict alone.
        assert_eq!(m.info_hash.0, hash::sha1(&m.info.encode()));
    }

    #[test]
    fn info_hash_is_over_raw_bytes_as_received() {
        // A foreign torrent with an extra key inside info (e.g. "private"): the
        // hash must cover it even though we do not model it.
        let info = b"d6:lengthi3e4:name1:a12:piece lengthi262144e6:pieces20:aaaaaaaaaaaaaaaaaaaa7:privatei1ee";
        let file = [&b"d4:info"[..], info, b"e"].concat();
        let m = Metainfo::parse(&file).unwrap();
        assert_eq!(m.info_hash.0, hash::sha1(info));
    }

    #[test]
    fn rejects_bad_torrents() {
        let bad: &[&[u8]] = &[
            b"le",
            b"de",
            b"d4:infoi1ee",
            b"d4:infod5:filesle6:lengthi1e4:name1:a12:piece lengthi1e6:pieces20:aaaaaaaaaaaaaaaaaaaaee",
            b"d4:infod6:lengthi3e4:name2:..12:piece lengthi262144e6:pieces20:aaaaaaaaaaaaaaaaaaaaee",
            b"d4:infod6:lengthi3e4:name3:a/b12:piece lengthi262144e6:pieces20:aaaaaaaaaaaaaaaaaaaaee",
            b"d4:infod6:lengthi3e4:name1:a12:piece lengthi0e6:pieces20:aaaaaaaaaaaaaaaaaaaaee",
            b"d4:infod6:lengthi-3e4:name1:a12:piece lengthi262144e6:pieces0:ee",
            b"d4:infod6:lengthi3e4:name1:a12:piece lengthi262144e6:pieces19:aaaaaaaaaaaaaaaaaaaee",
        ];
        for b in bad {
            assert!(Metainfo::parse(b).is_err(), "{}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn piece_length_is_clamped_power_of_two() {
        assert_eq!(piece_length_for(0), MIN_PIECE_LENGTH);
        assert_eq!(piece_length_for(100 << 20), MIN_PIECE_LENGTH);
        assert_eq!(piece_length_for(1 << 30), 1 << 20);
        assert_eq!(piece_length_for(64 << 30), MAX_PIECE_LENGTH);
    }

    #[test]
    fn magnet_round_trip() {
        let m = Metainfo::new(sample());
        let link = m.magnet();
        assert!(link.starts_with("magnet:?xt=urn:btih:"));
        let parsed = Magnet::parse(&link).unwrap();
        assert_eq!(parsed.info_hash, m.info_hash);
        assert_eq!(parsed.name.as_deref(), Some("shard-0.gguf"));
        assert_eq!(parsed.length, Some(600_000));
        let spaced = Magnet {
            info_hash: m.info_hash,
            name: Some("a b&c".into()),
            length: None,
            peers: vec!["127.0.0.1:6881".into(), "[::1]:6881".into()],
        };
        assert_eq!(Magnet::parse(&spaced.to_string()).unwrap(), spaced);
        assert!(Magnet::parse("magnet:?dn=x").is_err());
        assert!(Magnet::parse("magnet:?xt=urn:btih:1234").is_err());
        assert!(Magnet::parse("http://x").is_err());
        assert!(Magnet::parse("magnet:?xt=urn:btih:%zz").is_err());
    }

    #[test]
    fn magnets_as_other_clients_write_them() {
        let hex = "c12fe1c06bba254a9dc9f519b335aa7c1367a88a";
        let h = InfoHash::from_hex(hex).unwrap();
        // Base32 (BEP 9), upper or lower case: the same hash.
        let b32 = "YEX6DQDLXISUVHOJ6UM3GNNKPQJWPKEK";
        assert_eq!(Magnet::parse(&format!("magnet:?xt=urn:btih:{b32}")).unwrap().info_hash, h);
        assert_eq!(Magnet::parse(&format!("magnet:?xt=urn:btih:{}", b32.to_lowercase())).unwrap().info_hash, h);
        assert!(Magnet::parse("magnet:?xt=urn:btih:YEX6DQDLXISUVHOJ6UM3GNNKPQJWPKE1").is_err(), "1 is not base32");
        // Several xt (a hybrid's btmh first, then btih; xt.1/xt.2), x.pe hints,
        // a name with a broken escape, a plus and Latin-1 bytes, a bad xl.
        let link = format!(
            "magnet:?xt.1=urn:btmh:1220{}&xt.2=urn:btih:{hex}&tr=http%3A%2F%2Fx&dn=caf%E9+50%&xl=ten\
             &x.pe=127.0.0.1:6881&x.pe=[::1]:7000&x.pe=not-a-peer",
            "ab".repeat(32)
        );
        let m = Magnet::parse(&link).unwrap();
        assert_eq!(m.info_hash, h);
        assert_eq!(m.name.as_deref(), Some("caf\u{fffd} 50%"));
        assert_eq!(m.length, None);
        assert_eq!(m.peers, vec!["127.0.0.1:6881".to_string(), "[::1]:7000".to_string()]);
        // A v2-only link says so.
        let e = Magnet::parse(&format!("magnet:?xt=urn:btmh:1220{}", "ab".repeat(32))).unwrap_err();
        assert!(e.to_string().contains("v2-only"), "{e}");
        // Peer hints are bounded.
        let many: String = (0..1000).map(|i| format!("&x.pe=10.0.{}.{}:1", i / 256, i % 256)).collect();
        assert_eq!(Magnet::parse(&format!("magnet:?xt=urn:btih:{hex}{many}")).unwrap().peers.len(), MAX_MAGNET_PEERS);
    }

    #[test]
    fn torrents_with_keys_out_of_order_are_read_and_hashed_as_they_are() {
        // "name" before "length", "pieces" before "piece length", "info" before "created by".
        let info = b"d4:name1:a6:pieces20:aaaaaaaaaaaaaaaaaaaa6:lengthi3e12:piece lengthi262144ee";
        let file = [&b"d4:info"[..], info, b"10:created by3:fooe"].concat();
        let m = Metainfo::parse(&file).unwrap();
        assert_eq!(m.info_hash.0, hash::sha1(info), "hashed over the bytes as they are");
        assert_eq!(m.info.length, 3);
        assert_eq!(Info::parse_raw(info).unwrap(), m.info, "ut_metadata's info dict likewise");
        // What we write stays canonical.
        assert!(crate::bencode::decode(&Metainfo::new(m.info.clone()).to_torrent_bytes()).is_ok());
        // Still refused: duplicate keys, trailing bytes.
        assert!(Metainfo::parse(&[&b"d4:info"[..], info, b"4:info"[..].as_ref(), info, b"e"].concat()).is_err());
        assert!(Metainfo::parse(&[&file[..], b"x"].concat()).is_err());
    }

    #[test]
    fn v2_only_multi_file_and_empty_torrents_are_refused_with_the_reason() {
        let reason = |b: &[u8]| format!("{:#}", Metainfo::parse(b).unwrap_err());
        let v2 = b"d4:infod9:file treed1:ad0:d6:lengthi3e11:pieces root32:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaeee\
12:meta versioni2e4:name1:a12:piece lengthi16384eee";
        assert!(reason(v2).contains("v2-only"), "{}", reason(v2));
        let multi = b"d4:infod5:filesld6:lengthi1e4:pathl1:aeee4:name1:d12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaaee";
        assert!(reason(multi).contains("multi-file"), "{}", reason(multi));
        let empty = b"d4:infod6:lengthi0e4:name1:a12:piece lengthi16384e6:pieces0:ee";
        assert!(reason(empty).contains("zero-length"), "{}", reason(empty));
        // A hybrid (v1 keys beside the v2 ones) is read as v1.
        let hybrid = b"d4:infod9:file treed1:ad0:d6:lengthi3e11:pieces root32:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaeee\
6:lengthi3e12:meta versioni2e4:name1:a12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaaee";
        assert_eq!(Metainfo::parse(hybrid).unwrap().info.length, 3);
    }
}
