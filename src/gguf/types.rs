//! The ggml tensor types a GGUF file may name, with their block layouts.
//!
//! Sizes follow ggml's `type_traits` table (and the `gguf` Python package's
//! `GGML_QUANT_SIZES`): a row of `n` elements of a type with block size `b`
//! and type size `s` takes `n / b * s` bytes, and `n` must be a multiple of `b`.

/// A ggml tensor type id as stored in GGUF tensor infos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// (id, name, elements per block, bytes per block).
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    fn entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        TYPES.iter().find(|t| t.0 == self.0)
    }

    /// Whether ggml defines this type with a known size.
    pub fn is_known(self) -> bool {
        self.entry().is_some()
    }

    pub fn name(self) -> &'static str {
        self.entry().map_or("unknown", |t| t.1)
    }

    /// Elements per block.
    pub fn block_size(self) -> Option<u64> {
        self.entry().map(|t| t.2)
    }

    /// Bytes per block.
    pub fn type_size(self) -> Option<u64> {
        self.entry().map(|t| t.3)
    }

    /// Bytes taken by a tensor of this type with dimensions `dims`
    /// (ggml order: `dims[0]` is the row length). `None` when the type is
    /// unknown, the row length is not a multiple of the block size, or the
    /// size overflows.
    pub fn tensor_bytes(self, dims: &[u64]) -> Option<u64> {
        let (block, size) = (self.block_size()?, self.type_size()?);
        let row = *dims.first().unwrap_or(&1);
        if !row.is_multiple_of(block) {
            return None;
        }
        let mut bytes = (row / block).checked_mul(size)?;
        for d in dims.iter().skip(1) {
            bytes = bytes.checked_mul(*d)?;
        }
        Some(bytes)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.entry() {
            Some(t) => f.write_str(t.1),
            None => write!(f, "type#{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_of_common_types() {
        assert_eq!(GgmlType::F32.tensor_bytes(&[4096, 32]), Some(4096 * 32 * 4));
        assert_eq!(GgmlType::Q4_1.tensor_bytes(&[576, 1536]), Some(576 / 32 * 20 * 1536));
        assert_eq!(GgmlType(14).tensor_bytes(&[512, 2]), Some(2 * 210 * 2));
        assert_eq!(GgmlType::Q8_0.tensor_bytes(&[33]), None, "row not a multiple of the block");
        assert_eq!(GgmlType(4).tensor_bytes(&[32]), None, "removed Q4_2");
        assert_eq!(GgmlType::F32.tensor_bytes(&[u64::MAX, 2]), None, "overflow");
        assert_eq!(GgmlType::BF16.name(), "BF16");
    }
}
