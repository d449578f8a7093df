//! Zero-copy GGUF (v2/v3) reader.
//!
//! [`Gguf::parse`] walks the header, metadata and tensor infos of a byte slice
//! (normally a memory map) once, checking every count, length and offset
//! against the bytes that are really there before using it, and returns views
//! that borrow from the slice: strings, array payloads and tensor data are
//! never copied. Layout (little-endian):
//!
//! ```text
//! magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv x (key: string, type: u32, value)
//! n_tensors x (name: string, n_dims: u32, dims: n_dims x u64, type: u32, offset: u64)
//! padding to `general.alignment` (default 32) | tensor data
//! string = len u64 + UTF-8 bytes; array = elem type u32 + count u64 + elems
//! ```

use std::collections::HashSet;
use std::fmt;

use super::types::GgmlType;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused (real files nest at most 1).
const MAX_ARRAY_DEPTH: usize = 8;

/// Metadata value type ids.
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// What went wrong, and at which byte offset of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufError {
    pub offset: u64,
    pub message: String,
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GGUF: {} (at byte {})", self.message, self.offset)
    }
}

impl std::error::Error for GgufError {}

/// A metadata value; strings and arrays borrow from the file.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue<'a> {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(&'a str),
    Array(MetaArray<'a>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue<'_> {
    /// The value as an unsigned integer, whatever integer type stores it.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as JSON (arrays element by element), for tools and checks.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            MetaValue::String(s) => json!(s),
            MetaValue::Bool(b) => json!(b),
            MetaValue::F32(x) => json!(*x as f64),
            MetaValue::F64(x) => json!(x),
            MetaValue::I8(x) => json!(x),
            MetaValue::I16(x) => json!(x),
            MetaValue::I32(x) => json!(x),
            MetaValue::I64(x) => json!(x),
            MetaValue::Array(a) => serde_json::Value::Array(a.iter().map(|e| e.to_json()).collect()),
            other => json!(other.as_u64()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// An array value: its element type, count and the raw bytes of its elements
/// (already validated), decoded on iteration.
#[derive(Clone, Debug, PartialEq)]
pub struct MetaArray<'a> {
    pub elem_type: u32,
    pub len: u64,
    /// Offset of the first element in the file, for error messages.
    pub offset: u64,
    data: &'a [u8],
}

impl<'a> MetaArray<'a> {
    pub fn iter(&self) -> impl Iterator<Item = MetaValue<'a>> + '_ {
        let mut cur = Cursor { bytes: self.data, pos: 0, base: self.offset };
        (0..self.len).map(move |_| cur.value(self.elem_type, 0).expect("array validated at parse time"))
    }
}

/// One tensor's description and its bytes in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo<'a> {
    pub name: &'a str,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub size: u64,
    pub data: &'a [u8],
}

/// A parsed GGUF file.
#[derive(Debug)]
pub struct Gguf<'a> {
    pub version: u32,
    pub metadata: Vec<(&'a str, MetaValue<'a>)>,
    pub tensors: Vec<TensorInfo<'a>>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

impl<'a> Gguf<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Gguf<'a>, GgufError> {
        let mut cur = Cursor { bytes, pos: 0, base: 0 };
        let magic = cur.take(4, "magic")?;
        if magic != MAGIC {
            return Err(cur.err_at(0, format!("bad magic {magic:02x?}, expected \"GGUF\"")));
        }
        let version = cur.u32("version")?;
        if version.swap_bytes() == 3 || version.swap_bytes() == 2 {
            return Err(cur.err_at(4, "big-endian GGUF files are not supported".into()));
        }
        if !(2..=3).contains(&version) {
            return Err(cur.err_at(4, format!("unsupported GGUF version {version} (2 and 3 are read)")));
        }
        let n_tensors = cur.u64("tensor count")?;
        let n_kv = cur.u64("metadata count")?;

        // Each key/value takes at least 8 (key len) + 4 (type) + 1 bytes.
        let mut metadata = Vec::with_capacity(cur.bounded_capacity(n_kv, 13));
        let mut keys = HashSet::new();
        for _ in 0..n_kv {
            let at = cur.offset();
            let key = cur.string("metadata key")?;
            if !keys.insert(key) {
                return Err(cur.err_at(at, format!("duplicate metadata key {key:?}")));
            }
            let ty = cur.u32("value type")?;
            let value = cur.value(ty, 0).map_err(|e| e.context(&format!("metadata key {key:?}")))?;
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| *k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => return Err(cur.err_at(0, format!("general.alignment {v:?} is not a power of two"))),
            },
        };

        // Each tensor info takes at least 8 + 4 + 8 + 4 + 8 bytes.
        let mut raw = Vec::with_capacity(cur.bounded_capacity(n_tensors, 32));
        let mut names = HashSet::new();
        for _ in 0..n_tensors {
            let at = cur.offset();
            let name = cur.string("tensor name")?;
            if !names.insert(name) {
                return Err(cur.err_at(at, format!("duplicate tensor name {name:?}")));
            }
            let n_dims = cur.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(cur.err_at(at, format!("tensor {name:?} has {n_dims} dimensions (1..={MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = cur.u64("tensor dimension")?;
                if d == 0 {
                    return Err(cur.err_at(at, format!("tensor {name:?} has a zero dimension")));
                }
                dims.push(d);
            }
            let ggml_type = GgmlType(cur.u32("tensor type")?);
            let offset = cur.u64("tensor offset")?;
            raw.push((at, name, dims, ggml_type, offset));
        }

        let data_offset = align_up(cur.offset(), alignment)
            .filter(|d| *d <= bytes.len() as u64 || raw.is_empty())
            .ok_or_else(|| cur.err_at(cur.offset(), "data section starts past the end of the file".into()))?;
        let data_offset = data_offset.min(bytes.len() as u64);

        let mut tensors = Vec::with_capacity(raw.len());
        for (at, name, dims, ggml_type, offset) in raw {
            let fail = |msg: String| GgufError { offset: at, message: format!("tensor {name:?}: {msg}") };
            if !ggml_type.is_known() {
                return Err(fail(format!("unknown ggml type id {}", ggml_type.0)));
            }
            let size = ggml_type.tensor_bytes(&dims).ok_or_else(|| {
                fail(format!(
                    "shape {dims:?} does not fit type {ggml_type} (row length must be a multiple of {})",
                    ggml_type.block_size().unwrap_or(1)
                ))
            })?;
            if offset % alignment != 0 {
                return Err(fail(format!("data offset {offset} is not aligned to {alignment}")));
            }
            let start = data_offset.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(size));
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if e <= bytes.len() as u64 => (s, e),
                _ => {
                    return Err(fail(format!(
                        "data [{offset}, +{size}) lies outside the file ({} data bytes)",
                        bytes.len() as u64 - data_offset
                    )));
                }
            };
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                size,
                data: &bytes[start as usize..end as usize],
            });
        }

        let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        for pair in by_offset.windows(2) {
            if pair[0].offset + pair[0].size > pair[1].offset {
                return Err(GgufError {
                    offset: data_offset + pair[1].offset,
                    message: format!("tensor {:?} overlaps tensor {:?}", pair[1].name, pair[0].name),
                });
            }
        }

        Ok(Gguf { version, metadata, tensors, alignment, data_offset })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue<'a>> {
        self.metadata.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    pub fn get_str(&self, key: &str) -> Option<&'a str> {
        match self.get(key)? {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo<'a>> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x / align * align)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// File offset of `bytes[0]`, for error messages.
    base: u64,
}

impl GgufError {
    fn context(mut self, what: &str) -> GgufError {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn err_at(&self, offset: u64, message: String) -> GgufError {
        GgufError { offset, message }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// A capacity for `count` items of at least `min_size` bytes each that
    /// the remaining input could really hold: never what the file merely claims.
    fn bounded_capacity(&self, count: u64, min_size: usize) -> usize {
        count.min((self.remaining() / min_size) as u64) as usize
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() as u64 {
            return Err(self.err_at(
                self.offset(),
                format!("{what}: needs {n} bytes, only {} left in the file", self.remaining()),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        Ok(self.take(N as u64, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<&'a str, GgufError> {
        let at = self.offset();
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|e| self.err_at(at, format!("{what} is not UTF-8 ({e})")))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue<'a>, GgufError> {
        use value_type::*;
        let at = self.offset();
        Ok(match ty {
            U8 => MetaValue::U8(u8::from_le_bytes(self.array("u8")?)),
            I8 => MetaValue::I8(i8::from_le_bytes(self.array("i8")?)),
            U16 => MetaValue::U16(u16::from_le_bytes(self.array("u16")?)),
            I16 => MetaValue::I16(i16::from_le_bytes(self.array("i16")?)),
            U32 => MetaValue::U32(self.u32("u32")?),
            I32 => MetaValue::I32(i32::from_le_bytes(self.array("i32")?)),
            F32 => MetaValue::F32(f32::from_le_bytes(self.array("f32")?)),
            U64 => MetaValue::U64(self.u64("u64")?),
            I64 => MetaValue::I64(i64::from_le_bytes(self.array("i64")?)),
            F64 => MetaValue::F64(f64::from_le_bytes(self.array("f64")?)),
            BOOL => match self.array::<1>("bool")?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.err_at(at, format!("bool value {b} is neither 0 nor 1"))),
            },
            STRING => MetaValue::String(self.string("string value")?),
            ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err_at(at, format!("arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let elem_type = self.u32("array element type")?;
                let len = self.u64("array length")?;
                let start = self.pos;
                let offset = self.offset();
                // Fixed-size elements: check the whole payload at once.
                if let Some(size) = fixed_size(elem_type) {
                    let total = len
                        .checked_mul(size)
                        .ok_or_else(|| self.err_at(at, format!("array of {len} elements overflows")))?;
                    self.take(total, "array elements")?;
                    if elem_type == BOOL && self.bytes[start..self.pos].iter().any(|b| *b > 1) {
                        return Err(self.err_at(offset, "bool array element is neither 0 nor 1".into()));
                    }
                } else {
                    for _ in 0..len {
                        self.value(elem_type, depth + 1)?;
                    }
                }
                MetaValue::Array(MetaArray { elem_type, len, offset, data: &self.bytes[start..self.pos] })
            }
            other => return Err(self.err_at(at, format!("unknown metadata value type {other}"))),
        })
    }
}

fn fixed_size(ty: u32) -> Option<u64> {
    use value_type::*;
    match ty {
        U8 | I8 | BOOL => Some(1),
        U16 | I16 => Some(2),
        U32 | I32 | F32 => Some(4),
        U64 | I64 | F64 => Some(8),
        _ => None,
    }
}
