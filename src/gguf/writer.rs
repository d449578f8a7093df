//! GGUF v3 writer.
//!
//! A [`Builder`] collects metadata and tensor descriptions; [`Builder::write`]
//! emits the header, then each tensor's bytes (from a callback, so a splitter
//! can stream data straight from a source map) padded to the alignment.

use std::io::{self, Write};

use super::reader::{DEFAULT_ALIGNMENT, MAGIC, MetaValue, value_type};
use super::types::GgmlType;

/// An owned metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type id and elements (all of that type).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// An owned copy of a value read from a file.
    pub fn from_meta(v: &MetaValue<'_>) -> Value {
        match v {
            MetaValue::U8(x) => Value::U8(*x),
            MetaValue::I8(x) => Value::I8(*x),
            MetaValue::U16(x) => Value::U16(*x),
            MetaValue::I16(x) => Value::I16(*x),
            MetaValue::U32(x) => Value::U32(*x),
            MetaValue::I32(x) => Value::I32(*x),
            MetaValue::F32(x) => Value::F32(*x),
            MetaValue::Bool(x) => Value::Bool(*x),
            MetaValue::String(s) => Value::String(s.to_string()),
            MetaValue::Array(a) => Value::Array(a.elem_type, a.iter().map(|e| Value::from_meta(&e)).collect()),
            MetaValue::U64(x) => Value::U64(*x),
            MetaValue::I64(x) => Value::I64(*x),
            MetaValue::F64(x) => Value::F64(*x),
        }
    }

    pub fn type_id(&self) -> u32 {
        use value_type::*;
        match self {
            Value::U8(_) => U8,
            Value::I8(_) => I8,
            Value::U16(_) => U16,
            Value::I16(_) => I16,
            Value::U32(_) => U32,
            Value::I32(_) => I32,
            Value::F32(_) => F32,
            Value::Bool(_) => BOOL,
            Value::String(_) => STRING,
            Value::Array(..) => ARRAY,
            Value::U64(_) => U64,
            Value::I64(_) => I64,
            Value::F64(_) => F64,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => out.push(*v as u8),
            Value::String(s) => encode_string(s, out),
            Value::Array(elem, items) => {
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    debug_assert_eq!(item.type_id(), *elem, "array element of the wrong type");
                    item.encode_payload(out);
                }
            }
            Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

fn encode_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A tensor to be written: its description; the bytes come at write time.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub size: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Builder {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorSpec>,
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Sets `key`, replacing an earlier value of the same key in place.
    pub fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// Adds a tensor; its size is computed from the type and shape.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ggml_type: GgmlType) -> io::Result<()> {
        let size = ggml_type.tensor_bytes(dims).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor {name}: shape {dims:?} invalid for {ggml_type}"),
            )
        })?;
        self.tensors.push(TensorSpec { name: name.to_string(), dims: dims.to_vec(), ggml_type, size });
        Ok(())
    }

    pub fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| match v {
                Value::U32(a) => Some(*a as u64),
                Value::U64(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The header bytes (up to, not including, the padding before the data)
    /// and each tensor's offset within the data section.
    pub fn encode_header(&self) -> (Vec<u8>, Vec<u64>) {
        let align = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            encode_string(key, &mut out);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            value.encode_payload(&mut out);
        }
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut offset = 0u64;
        for t in &self.tensors {
            encode_string(&t.name, &mut out);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.0.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.size).div_ceil(align) * align;
        }
        (out, offsets)
    }

    /// Writes the whole file; `data(i, w)` must write exactly tensor `i`'s bytes.
    pub fn write<W: Write>(&self, w: &mut W, mut data: impl FnMut(usize, &mut W) -> io::Result<()>) -> io::Result<u64> {
        let align = self.alignment();
        let (header, _) = self.encode_header();
        w.write_all(&header)?;
        let mut written = header.len() as u64;
        written += pad(w, written, align)?;
        for (i, t) in self.tensors.iter().enumerate() {
            data(i, w)?;
            written += t.size;
            if i + 1 < self.tensors.len() {
                written += pad(w, written, align)?;
            }
        }
        Ok(written)
    }

    /// Writes the whole file into memory, tensor data given as slices.
    pub fn to_bytes(&self, data: &[&[u8]]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write(&mut out, |i, w| {
            if data[i].len() as u64 != self.tensors[i].size {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "tensor data of the wrong size"));
            }
            w.write_all(data[i])
        })?;
        Ok(out)
    }
}

fn pad<W: Write>(w: &mut W, at: u64, align: u64) -> io::Result<u64> {
    let n = at.div_ceil(align) * align - at;
    w.write_all(&vec![0u8; n as usize])?;
    Ok(n)
}
