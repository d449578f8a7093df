//! Strict bencode (BEP 3).
//!
//! Decoding accepts only the canonical encoding: integers without leading
//! zeros or `-0`, string lengths without leading zeros, dictionary keys in
//! strictly ascending byte order, nesting at most [`MAX_DEPTH`] deep, and no
//! trailing bytes. Byte strings borrow from the input, so decoding allocates
//! only the list/dict spines, which are bounded by the input's length.
//! [`raw_dict_value`] returns a dictionary value's bytes exactly as received,
//! which is what an info hash must be computed over.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// Deepest nesting accepted. Metainfo needs 3; KRPC needs 3.
pub const MAX_DEPTH: usize = 32;

#[derive(Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Int(i64),
    Bytes(Cow<'a, [u8]>),
    List(Vec<Value<'a>>),
    Dict(BTreeMap<Cow<'a, [u8]>, Value<'a>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    UnexpectedEnd,
    UnexpectedByte(u8),
    NonCanonicalInteger,
    IntegerOverflow,
    LengthExceedsInput,
    UnsortedKey,
    DuplicateKey,
    TooDeep,
    TrailingBytes,
    KeyNotBytes,
}

/// A decoding error and the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub offset: usize,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            ErrorKind::UnexpectedEnd => "unexpected end of input".to_string(),
            ErrorKind::UnexpectedByte(b) => format!("unexpected byte 0x{b:02x}"),
            ErrorKind::NonCanonicalInteger => "non-canonical integer".to_string(),
            ErrorKind::IntegerOverflow => "integer does not fit in 64 bits".to_string(),
            ErrorKind::LengthExceedsInput => "string length exceeds the input".to_string(),
            ErrorKind::UnsortedKey => "dictionary keys out of order".to_string(),
            ErrorKind::DuplicateKey => "duplicate dictionary key".to_string(),
            ErrorKind::TooDeep => format!("nesting deeper than {MAX_DEPTH}"),
            ErrorKind::TrailingBytes => "trailing bytes after the value".to_string(),
            ErrorKind::KeyNotBytes => "dictionary key is not a byte string".to_string(),
        };
        write!(f, "bencode: {what} at byte {}", self.offset)
    }
}

impl std::error::Error for Error {}

impl<'a> Value<'a> {
    pub fn bytes(b: impl Into<Cow<'a, [u8]>>) -> Value<'a> {
        Value::Bytes(b.into())
    }

    pub fn str(s: &'a str) -> Value<'a> {
        Value::Bytes(Cow::Borrowed(s.as_bytes()))
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    pub fn as_list(&self) -> Option<&[Value<'a>]> {
        match self {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<&BTreeMap<Cow<'a, [u8]>, Value<'a>>> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// Looks up `key` when `self` is a dictionary.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.as_dict()?.get(key.as_bytes())
    }

    /// Appends the canonical encoding of `self` to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Int(i) => {
                out.push(b'i');
                out.extend_from_slice(i.to_string().as_bytes());
                out.push(b'e');
            }
            Value::Bytes(b) => encode_bytes(b, out),
            Value::List(l) => {
                out.push(b'l');
                for v in l {
                    v.encode_into(out);
                }
                out.push(b'e');
            }
            Value::Dict(d) => {
                out.push(b'd');
                for (k, v) in d {
                    encode_bytes(k, out);
                    v.encode_into(out);
                }
                out.push(b'e');
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => write!(f, "{s:?}"),
                Err(_) => write!(f, "<{} bytes>", b.len()),
            },
            Value::List(l) => f.debug_list().entries(l).finish(),
            Value::Dict(d) => f.debug_map().entries(d.iter().map(|(k, v)| (String::from_utf8_lossy(k), v))).finish(),
        }
    }
}

fn encode_bytes(b: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(b);
}

/// Builds a dictionary from `(key, value)` pairs (any order).
pub fn dict<'a>(entries: impl IntoIterator<Item = (&'a str, Value<'a>)>) -> Value<'a> {
    Value::Dict(entries.into_iter().map(|(k, v)| (Cow::Borrowed(k.as_bytes()), v)).collect())
}

/// Decodes exactly one value spanning all of `input`.
pub fn decode(input: &[u8]) -> Result<Value<'_>, Error> {
    let (value, used) = decode_prefix(input)?;
    if used != input.len() {
        return Err(Error { kind: ErrorKind::TrailingBytes, offset: used });
    }
    Ok(value)
}

/// Like [`decode`], but accepting dictionary keys in any order (still unique):
/// for packets from the open network, where some clients do not sort.
pub fn decode_unsorted(input: &[u8]) -> Result<Value<'_>, Error> {
    let mut p = Parser { input, pos: 0, sorted: false, saturate: false };
    let value = p.value(0)?;
    if p.pos != input.len() {
        return Err(Error { kind: ErrorKind::TrailingBytes, offset: p.pos });
    }
    Ok(value)
}

/// Decodes one value from the start of `input`, returning it and the bytes used.
pub fn decode_prefix(input: &[u8]) -> Result<(Value<'_>, usize), Error> {
    let mut p = Parser { input, pos: 0, sorted: true, saturate: false };
    let v = p.value(0)?;
    Ok((v, p.pos))
}

/// Like [`decode`], but an integer value (`i...e`) outside the i64 range reads as `i64::MAX`
/// (or `i64::MIN` if negative) instead of failing the whole message: for messages whose
/// integer keys are each range-checked by the reader (the BEP 10 extension handshake, where
/// one oversized `reqq` must not drop the peer). String lengths still fail with
/// [`ErrorKind::IntegerOverflow`].
pub fn decode_saturating(input: &[u8]) -> Result<Value<'_>, Error> {
    let mut p = Parser { input, pos: 0, sorted: true, saturate: true };
    let value = p.value(0)?;
    if p.pos != input.len() {
        return Err(Error { kind: ErrorKind::TrailingBytes, offset: p.pos });
    }
    Ok(value)
}

/// The raw encoded bytes of `key`'s value in the top-level dictionary `input`,
/// exactly as they appear in the input (for info hashes).
/// Keys may come in any order (other clients' `.torrent` files).
pub fn raw_dict_value<'a>(input: &'a [u8], key: &[u8]) -> Result<Option<&'a [u8]>, Error> {
    let mut p = Parser { input, pos: 0, sorted: false, saturate: false };
    p.expect(b'd')?;
    while p.peek()? != b'e' {
        let k = p.byte_string()?;
        let start = p.pos;
        p.value(1)?;
        if k == key {
            return Ok(Some(&input[start..p.pos]));
        }
    }
    Ok(None)
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
    /// Require dictionary keys in ascending order (canonical bencode).
    sorted: bool,
    /// Integer values outside i64 saturate instead of failing ([`decode_saturating`]).
    saturate: bool,
}

impl<'a> Parser<'a> {
    fn err(&self, kind: ErrorKind) -> Error {
        Error { kind, offset: self.pos }
    }

    fn peek(&self) -> Result<u8, Error> {
        self.input.get(self.pos).copied().ok_or_else(|| self.err(ErrorKind::UnexpectedEnd))
    }

    fn expect(&mut self, byte: u8) -> Result<(), Error> {
        let b = self.peek()?;
        if b != byte {
            return Err(self.err(ErrorKind::UnexpectedByte(b)));
        }
        self.pos += 1;
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, Error> {
        if depth > MAX_DEPTH {
            return Err(self.err(ErrorKind::TooDeep));
        }
        match self.peek()? {
            b'i' => {
                let start = self.pos;
                self.pos += 1;
                let v = self.integer(b'e', start)?;
                Ok(Value::Int(v))
            }
            b'0'..=b'9' => Ok(Value::Bytes(Cow::Borrowed(self.byte_string()?))),
            b'l' => {
                self.pos += 1;
                let mut items = Vec::new();
                while self.peek()? != b'e' {
                    items.push(self.value(depth + 1)?);
                }
                self.pos += 1;
                Ok(Value::List(items))
            }
            b'd' => {
                self.pos += 1;
                let mut map = BTreeMap::new();
                let mut last: Option<&[u8]> = None;
                while self.peek()? != b'e' {
                    let key_at = self.pos;
                    if !self.peek()?.is_ascii_digit() {
                        return Err(self.err(ErrorKind::KeyNotBytes));
                    }
                    let key = self.byte_string()?;
                    if let Some(prev) = last.filter(|_| self.sorted) {
                        if key == prev {
                            return Err(Error { kind: ErrorKind::DuplicateKey, offset: key_at });
                        }
                        if key < prev {
                            return Err(Error { kind: ErrorKind::UnsortedKey, offset: key_at });
                        }
                    }
                    last = Some(key);
                    let v = self.value(depth + 1)?;
                    if map.insert(Cow::Borrowed(key), v).is_some() {
                        return Err(Error { kind: ErrorKind::DuplicateKey, offset: key_at });
                    }
                }
                self.pos += 1;
                Ok(Value::Dict(map))
            }
            b => Err(self.err(ErrorKind::UnexpectedByte(b))),
        }
    }

    /// Reads a canonical decimal integer terminated by `end`.
    /// `start` is where the value began, for error offsets.
    fn integer(&mut self, end: u8, start: usize) -> Result<i64, Error> {
        let negative = self.peek()? == b'-';
        if negative {
            self.pos += 1;
        }
        let digits_at = self.pos;
        let mut value: i64 = 0;
        loop {
            let b = self.peek()?;
            if b == end {
                break;
            }
            if !b.is_ascii_digit() {
                return Err(self.err(ErrorKind::UnexpectedByte(b)));
            }
            let d = (b - b'0') as i64;
            match value.checked_mul(10).and_then(|v| if negative { v.checked_sub(d) } else { v.checked_add(d) }) {
                Some(v) => value = v,
                None if self.saturate && end == b'e' => value = if negative { i64::MIN } else { i64::MAX },
                None => return Err(Error { kind: ErrorKind::IntegerOverflow, offset: start }),
            }
            self.pos += 1;
        }
        let digits = &self.input[digits_at..self.pos];
        let canonical = match digits {
            [] => false,
            [b'0'] => !negative,
            [b'0', ..] => false,
            _ => true,
        };
        if !canonical {
            return Err(Error { kind: ErrorKind::NonCanonicalInteger, offset: start });
        }
        self.pos += 1; // the terminator
        Ok(value)
    }

    fn byte_string(&mut self) -> Result<&'a [u8], Error> {
        let start = self.pos;
        if self.peek()? == b'-' {
            return Err(self.err(ErrorKind::UnexpectedByte(b'-')));
        }
        let len = self.integer(b':', start)?;
        let len = usize::try_from(len).map_err(|_| Error { kind: ErrorKind::IntegerOverflow, offset: start })?;
        if len > self.input.len() - self.pos {
            return Err(Error { kind: ErrorKind::LengthExceedsInput, offset: start });
        }
        let s = &self.input[self.pos..self.pos + len];
        self.pos += len;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(input: &[u8]) -> ErrorKind {
        decode(input).unwrap_err().kind
    }

    #[test]
    fn round_trips_canonical_values() {
        for text in [
            &b"i0e"[..],
            b"i-42e",
            b"i9223372036854775807e",
            b"i-9223372036854775808e",
            b"0:",
            b"4:spam",
            b"le",
            b"l4:spami3ee",
            b"de",
            b"d3:bar4:spam3:fooi42ee",
            b"d1:ad1:bl1:cee1:di1ee",
        ] {
            let v = decode(text).unwrap();
            assert_eq!(v.encode(), text, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn rejects_non_canonical_and_malformed() {
        assert_eq!(kind(b"i-0e"), ErrorKind::NonCanonicalInteger);
        assert_eq!(kind(b"i03e"), ErrorKind::NonCanonicalInteger);
        assert_eq!(kind(b"ie"), ErrorKind::NonCanonicalInteger);
        assert_eq!(kind(b"i-e"), ErrorKind::NonCanonicalInteger);
        assert_eq!(kind(b"i9223372036854775808e"), ErrorKind::IntegerOverflow);
        // The saturating decoder reads out-of-range values as the nearest bound; lengths still fail.
        assert_eq!(decode_saturating(b"i73786976294838206464e").unwrap(), Value::Int(i64::MAX));
        assert_eq!(decode_saturating(b"i-73786976294838206464e").unwrap(), Value::Int(i64::MIN));
        assert_eq!(
            decode_saturating(b"d1:ai99999999999999999999e1:bi7ee").unwrap().get("b").and_then(Value::as_int),
            Some(7)
        );
        assert_eq!(decode_saturating(b"99999999999999999999:x").unwrap_err().kind, ErrorKind::IntegerOverflow);
        assert_eq!(decode_saturating(b"i03e").unwrap_err().kind, ErrorKind::NonCanonicalInteger);
        assert_eq!(kind(b"i1x"), ErrorKind::UnexpectedByte(b'x'));
        assert_eq!(kind(b"i12"), ErrorKind::UnexpectedEnd);
        assert_eq!(kind(b"04:spam"), ErrorKind::NonCanonicalInteger);
        assert_eq!(kind(b"5:spam"), ErrorKind::LengthExceedsInput);
        assert_eq!(kind(b"99999999999999999999:x"), ErrorKind::IntegerOverflow);
        assert_eq!(kind(b"-1:x"), ErrorKind::UnexpectedByte(b'-'));
        assert_eq!(kind(b"d3:foo1:a3:bar1:be"), ErrorKind::UnsortedKey);
        assert_eq!(kind(b"d3:foo1:a3:foo1:be"), ErrorKind::DuplicateKey);
        assert_eq!(kind(b"di1e1:ae"), ErrorKind::KeyNotBytes);
        assert_eq!(kind(b"l"), ErrorKind::UnexpectedEnd);
        assert_eq!(kind(b"i1ei2e"), ErrorKind::TrailingBytes);
        assert_eq!(kind(b"x"), ErrorKind::UnexpectedByte(b'x'));
        assert_eq!(kind(b""), ErrorKind::UnexpectedEnd);
    }

    #[test]
    fn unsorted_decoding_accepts_any_order_but_not_duplicates() {
        assert!(decode(b"d1:bi1e1:ai2ee").is_err());
        let v = decode_unsorted(b"d1:bi1e1:ai2ee").unwrap();
        assert_eq!(v.get("a").and_then(Value::as_int), Some(2));
        assert_eq!(decode_unsorted(b"d1:ai1e1:ai2ee").unwrap_err().kind, ErrorKind::DuplicateKey);
        assert_eq!(decode_unsorted(b"i1ei2e").unwrap_err().kind, ErrorKind::TrailingBytes);
    }

    #[test]
    fn depth_is_limited() {
        let ok = [vec![b'l'; MAX_DEPTH + 1], vec![b'e'; MAX_DEPTH + 1]].concat();
        assert!(decode(&ok).is_ok());
        let deep = [vec![b'l'; 100_000], vec![b'e'; 100_000]].concat();
        assert_eq!(kind(&deep), ErrorKind::TooDeep);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let text = b"d4:infod6:lengthi1024e4:name5:a.bin12:piece lengthi256e6:pieces0:ee";
        assert!(decode(text).is_ok());
        for cut in 0..text.len() {
            assert!(decode(&text[..cut]).is_err(), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn raw_dict_value_returns_bytes_as_received() {
        let text = b"d8:announce3:url4:infod1:ai1eee";
        assert_eq!(raw_dict_value(text, b"info").unwrap(), Some(&b"d1:ai1ee"[..]));
        assert_eq!(raw_dict_value(text, b"missing").unwrap(), None);
        assert!(raw_dict_value(b"d4:info", b"info").is_err());
    }

    #[test]
    fn error_names_offset() {
        let e = decode(b"l4:spami03ee").unwrap_err();
        assert_eq!(e.offset, 7);
        assert!(e.to_string().contains("byte 7"));
    }
}
