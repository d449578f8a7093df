//! GGUF files: a zero-copy reader, a writer, the ggml type table, and what a
//! node needs to know about a shard file.

pub mod demo;
pub mod manifest;
pub mod reader;
pub mod split;
pub mod types;
pub mod writer;

pub use reader::{Gguf, GgufError, MetaValue, TensorInfo};
pub use types::GgmlType;

/// What the node's catalog records about a GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSummary {
    pub architecture: Option<String>,
    /// `shard.index`; `None` for a whole, unsplit model.
    pub shard_index: Option<u32>,
    pub shard_count: Option<u32>,
    /// Half-open layer range: `shard.layer_begin..shard.layer_end`, or all of
    /// `{arch}.block_count` for a whole model.
    pub layers: Option<(u32, u32)>,
    pub model_id: Option<String>,
    pub tensor_count: usize,
}

impl ShardSummary {
    pub fn of(g: &Gguf<'_>) -> ShardSummary {
        let u32_of = |k: &str| g.get_u64(k).and_then(|v| u32::try_from(v).ok());
        let architecture = g.get_str("general.architecture").map(str::to_string);
        let layers = match (u32_of("shard.layer_begin"), u32_of("shard.layer_end")) {
            (Some(b), Some(e)) if b <= e => Some((b, e)),
            _ => architecture.as_deref().and_then(|a| u32_of(&format!("{a}.block_count"))).map(|n| (0, n)),
        };
        ShardSummary {
            architecture,
            shard_index: u32_of("shard.index"),
            shard_count: u32_of("shard.count"),
            layers,
            model_id: g.get_str("shard.model_id").map(str::to_string),
            tensor_count: g.tensors.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reader::value_type as vt;
    use super::writer::{Builder, Value};
    use super::*;

    /// A small file with every metadata type and two tensors.
    fn sample() -> (Builder, Vec<Vec<u8>>) {
        let mut b = Builder::new();
        b.set("general.architecture", Value::String("llama".into()));
        b.set("llama.block_count", Value::U32(2));
        b.set("t.u8", Value::U8(200));
        b.set("t.i8", Value::I8(-5));
        b.set("t.u16", Value::U16(65000));
        b.set("t.i16", Value::I16(-300));
        b.set("t.i32", Value::I32(-70000));
        b.set("t.f32", Value::F32(1.5));
        b.set("t.bool", Value::Bool(true));
        b.set("t.u64", Value::U64(1 << 40));
        b.set("t.i64", Value::I64(-(1 << 40)));
        b.set("t.f64", Value::F64(-2.25));
        b.set("t.str", Value::String("héllo".into()));
        b.set("t.arr_str", Value::Array(vt::STRING, vec![Value::String("a".into()), Value::String("".into())]));
        b.set("t.arr_f32", Value::Array(vt::F32, vec![Value::F32(0.5), Value::F32(-1.0)]));
        b.set("t.arr_empty", Value::Array(vt::I64, vec![]));
        b.set(
            "t.arr_nested",
            Value::Array(vt::ARRAY, vec![Value::Array(vt::U8, vec![Value::U8(1)]), Value::Array(vt::U8, vec![])]),
        );
        b.add_tensor("token_embd.weight", &[8, 3], GgmlType::F32).unwrap();
        b.add_tensor("blk.0.attn_q.weight", &[32, 2], GgmlType::Q8_0).unwrap();
        let data = vec![(0..96).map(|i| i as u8).collect(), vec![7u8; 68]];
        (b, data)
    }

    fn sample_bytes() -> Vec<u8> {
        let (b, data) = sample();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        b.to_bytes(&refs).unwrap()
    }

    fn err(bytes: &[u8]) -> String {
        Gguf::parse(bytes).unwrap_err().to_string()
    }

    #[test]
    fn write_read_round_trip_every_type() {
        let (b, data) = sample();
        let bytes = sample_bytes();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.version, 3);
        let back: Vec<(String, Value)> = g.metadata.iter().map(|(k, v)| (k.to_string(), Value::from_meta(v))).collect();
        assert_eq!(back, b.metadata);
        assert_eq!(g.tensors.len(), 2);
        for (t, d) in g.tensors.iter().zip(&data) {
            assert_eq!(t.data, d.as_slice());
            assert_eq!(t.data.as_ptr() as usize - bytes.as_ptr() as usize, (g.data_offset + t.offset) as usize);
            assert_eq!((g.data_offset + t.offset) % 32, 0);
        }
        let s = ShardSummary::of(&g);
        assert_eq!(s.layers, Some((0, 2)));
        assert_eq!(s.shard_index, None);
    }

    #[test]
    fn truncation_at_every_offset_is_an_error() {
        let bytes = sample_bytes();
        for cut in 0..bytes.len() {
            assert!(Gguf::parse(&bytes[..cut]).is_err(), "truncated to {cut} bytes");
        }
    }

    #[test]
    fn header_errors_are_named() {
        let mut bytes = sample_bytes();
        bytes[0] = b'X';
        assert!(err(&bytes).contains("bad magic"));
        let mut bytes = sample_bytes();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(err(&bytes).contains("unsupported GGUF version 1"));
        let mut bytes = sample_bytes();
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(err(&bytes).contains("big-endian"));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut bytes = sample_bytes();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Gguf::parse(&bytes).is_err());
        let mut bytes = sample_bytes();
        bytes[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(Gguf::parse(&bytes).is_err());
    }

    /// Builds a header with one string key whose value bytes are `value`.
    fn with_raw_kv(ty: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(&3u64.to_le_bytes());
        out.extend_from_slice(b"key");
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn bad_values_are_named() {
        let s = err(&with_raw_kv(vt::STRING, &[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe]));
        assert!(s.contains("not UTF-8") && s.contains("\"key\""), "{s}");
        assert!(err(&with_raw_kv(99, &[])).contains("unknown metadata value type 99"));
        assert!(err(&with_raw_kv(vt::BOOL, &[2])).contains("neither 0 nor 1"));
        let mut arr = vt::U64.to_le_bytes().to_vec();
        arr.extend_from_slice(&(u64::MAX / 4).to_le_bytes());
        assert!(err(&with_raw_kv(vt::ARRAY, &arr)).contains("overflows"));
        let mut arr = vt::STRING.to_le_bytes().to_vec();
        arr.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Gguf::parse(&with_raw_kv(vt::ARRAY, &arr)).is_err());
        let mut deep = Vec::new();
        for _ in 0..20 {
            deep.extend_from_slice(&vt::ARRAY.to_le_bytes());
            deep.extend_from_slice(&1u64.to_le_bytes());
        }
        assert!(err(&with_raw_kv(vt::ARRAY, &deep)).contains("nested deeper"));
    }

    fn one_tensor(dims: &[u64], ty: u32, offset: u64, data_len: usize, align: Option<u32>) -> Vec<u8> {
        let mut b = Builder::new();
        if let Some(a) = align {
            b.set("general.alignment", Value::U32(a));
        }
        b.tensors.push(writer::TensorSpec { name: "t".into(), dims: dims.to_vec(), ggml_type: GgmlType(ty), size: 0 });
        let (mut header, _) = b.encode_header();
        // Patch the offset (the last 8 bytes of the header).
        let n = header.len();
        header[n - 8..].copy_from_slice(&offset.to_le_bytes());
        let data_at = (n as u64).div_ceil(b.alignment()) * b.alignment();
        header.resize(data_at as usize + data_len, 0);
        header
    }

    #[test]
    fn tensor_errors_are_named() {
        assert!(Gguf::parse(&one_tensor(&[8], 0, 0, 32, None)).is_ok());
        assert!(err(&one_tensor(&[8], 0, 0, 31, None)).contains("outside the file"));
        assert!(err(&one_tensor(&[8], 0, 16, 64, None)).contains("not aligned"));
        assert!(err(&one_tensor(&[8], 0, u64::MAX - 31, 64, None)).contains("outside the file"));
        assert!(err(&one_tensor(&[8], 77, 0, 64, None)).contains("unknown ggml type id 77"));
        assert!(err(&one_tensor(&[8], 8, 0, 64, None)).contains("multiple of 32"));
        assert!(err(&one_tensor(&[u64::MAX, u64::MAX], 0, 0, 64, None)).contains("does not fit"));
        assert!(err(&one_tensor(&[8, 0], 0, 0, 64, None)).contains("zero dimension"));
        assert!(err(&one_tensor(&[8], 0, 0, 64, Some(3))).contains("power of two"));
        assert!(Gguf::parse(&one_tensor(&[8], 0, 64, 96, Some(64))).is_ok());
    }

    #[test]
    fn duplicates_are_refused() {
        let (mut b, data) = sample();
        b.tensors[1].name = b.tensors[0].name.clone();
        b.tensors[1].size = b.tensors[0].size;
        let bytes = b.to_bytes(&[&data[0], &data[0]]).unwrap();
        assert!(err(&bytes).contains("duplicate tensor name"));
        let (mut b, data) = sample();
        b.metadata.push(("t.u8".into(), Value::U8(1)));
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        assert!(err(&b.to_bytes(&refs).unwrap()).contains("duplicate metadata key"));
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let (b, data) = sample();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let mut bytes = b.to_bytes(&refs).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let second_offset = g.tensors[1].offset;
        drop(g);
        // Point the second tensor at the first one's data.
        let pos = bytes.windows(8).rposition(|w| w == second_offset.to_le_bytes()).unwrap();
        bytes[pos..pos + 8].copy_from_slice(&0u64.to_le_bytes());
        assert!(err(&bytes).contains("overlaps"));
    }
}
