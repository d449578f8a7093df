//! Tensors on the wire: `{"dtype":"f32","shape":[n_tokens,width],"b64":"..."}`, little-endian
//! floats in standard base64 (RFC 4648, with padding); in a binary frame ([`super::binary`])
//! also `{"dtype":"f32","shape":[..],"offset":O,"nbytes":B}`, the bytes in its data section.

use super::ErrorCode;
use super::binary::Section;
use serde_json::{Value, json};

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes padded base64; `None` on any character outside the alphabet or a bad length.
pub fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let s = text.as_bytes();
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let mut table = [255u8; 256];
    for (i, &c) in ALPHABET.iter().enumerate() {
        table[c as usize] = i as u8;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (ci, chunk) in s.chunks(4).enumerate() {
        let last = ci + 1 == s.len() / 4;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            let v = table[c as usize];
            if v == 255 {
                return None;
            }
            n = n << 6 | v as u32;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// A 2-D F32 tensor as JSON.
pub fn f32_to_json(data: &[f32], rows: usize, cols: usize) -> Value {
    debug_assert_eq!(data.len(), rows * cols);
    json!({"dtype": "f32", "shape": [rows, cols], "b64": b64_encode(&f32_bytes(data))})
}

/// A 2-D F32 tensor for a binary frame ([`super::binary`]): its bytes appended to `section`, and
/// the object naming them (`offset`, `nbytes`).
pub fn f32_to_raw(data: &[f32], rows: usize, cols: usize, section: &mut Vec<u8>) -> Value {
    debug_assert_eq!(data.len(), rows * cols);
    let offset = section.len();
    section.extend_from_slice(&f32_bytes(data));
    json!({"dtype": "f32", "shape": [rows, cols], "offset": offset, "nbytes": data.len() * 4})
}

/// Little-endian bytes of `data` (one copy on a little-endian host).
fn f32_bytes(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for f in data {
        out.extend_from_slice(&f.to_le_bytes());
    }
    out
}

/// Reads a 2-D F32 tensor given as JSON (`b64`), checking the shape against the data before
/// keeping anything: returns (data, rows, cols).
pub fn f32_from_json(v: &Value, max_elems: usize) -> Result<(Vec<f32>, usize, usize), (ErrorCode, String)> {
    f32_from_json_in(v, max_elems, None)
}

/// As [`f32_from_json`], in a frame that may carry raw tensors: a tensor naming `offset` and
/// `nbytes` is read from `section` (a binary frame's data section; `None` in a JSON frame, where
/// such a tensor is refused). The shape is checked against `max_elems`, `nbytes` against the
/// shape and the bytes against the section before anything is allocated.
pub fn f32_from_json_in(
    v: &Value,
    max_elems: usize,
    section: Option<&Section>,
) -> Result<(Vec<f32>, usize, usize), (ErrorCode, String)> {
    let wrong = |m: &str| (ErrorCode::WrongType, format!("tensor: {m}"));
    let obj = v.as_object().ok_or_else(|| wrong("must be an object {dtype, shape, b64}"))?;
    match obj.get("dtype").and_then(Value::as_str) {
        Some("f32") => {}
        Some(other) => return Err((ErrorCode::OutOfRange, format!("tensor: dtype {other:?} is not supported (f32)"))),
        None => return Err(wrong("dtype must be \"f32\"")),
    }
    let shape = obj.get("shape").and_then(Value::as_array).ok_or_else(|| wrong("shape must be [rows, cols]"))?;
    let dims: Vec<u64> =
        shape.iter().map(|d| d.as_u64()).collect::<Option<_>>().ok_or_else(|| wrong("shape holds non-integers"))?;
    let [rows, cols] = dims[..] else { return Err(wrong("shape must have two dimensions [rows, cols]")) };
    let elems = rows.checked_mul(cols).filter(|&e| e <= max_elems as u64 && e > 0);
    let Some(elems) = elems else {
        return Err((
            ErrorCode::OutOfRange,
            format!("tensor: shape {rows} x {cols} is empty or over {max_elems} elements"),
        ));
    };
    if obj.contains_key("offset") || obj.contains_key("nbytes") {
        let Some(section) = section else {
            return Err(wrong("offset/nbytes (raw bytes) need a binary frame; in JSON give b64"));
        };
        let field =
            |k: &str| obj.get(k).and_then(Value::as_u64).ok_or_else(|| wrong(&format!("{k} must be an integer >= 0")));
        let (offset, nbytes) = (field("offset")?, field("nbytes")?);
        if elems.checked_mul(4) != Some(nbytes) {
            return Err((ErrorCode::ShapeMismatch, format!("tensor: {nbytes} bytes do not hold {rows} x {cols} f32")));
        }
        let bytes = section.slice(offset, nbytes)?;
        let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        return Ok((data, rows as usize, cols as usize));
    }
    let b64 = obj.get("b64").and_then(Value::as_str).ok_or_else(|| wrong("b64 must be a string"))?;
    // Check the size the text declares before decoding it.
    if b64.len() as u64 != (elems * 4).div_ceil(3) * 4 {
        return Err((
            ErrorCode::ShapeMismatch,
            format!("tensor: {} base64 characters do not hold {rows} x {cols} f32", b64.len()),
        ));
    }
    let bytes = b64_decode(b64).ok_or_else(|| wrong("b64 is not valid base64"))?;
    if bytes.len() as u64 != elems * 4 {
        return Err((
            ErrorCode::ShapeMismatch,
            format!("tensor: {} bytes do not hold {rows} x {cols} f32", bytes.len()),
        ));
    }
    let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((data, rows as usize, cols as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_answers_and_round_trip() {
        for (plain, coded) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(b64_encode(plain.as_bytes()), coded);
            assert_eq!(b64_decode(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(b64_decode(&b64_encode(&all)).unwrap(), all);
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9*", "Zm 9"] {
            assert!(b64_decode(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn tensors_check_shape_before_data() {
        let v = f32_to_json(&[1.0, -2.5, 3.25, 0.0, 5.0, 6.0], 2, 3);
        assert_eq!(f32_from_json(&v, 100).unwrap(), (vec![1.0, -2.5, 3.25, 0.0, 5.0, 6.0], 2, 3));
        let mut lying = v.clone();
        lying["shape"] = json!([3, 3]);
        assert_eq!(f32_from_json(&lying, 100).unwrap_err().0, ErrorCode::ShapeMismatch);
        let mut huge = v.clone();
        huge["shape"] = json!([1u64 << 40, 1u64 << 40]);
        assert_eq!(f32_from_json(&huge, 100).unwrap_err().0, ErrorCode::OutOfRange);
        let mut f16 = v;
        f16["dtype"] = json!("f16");
        assert_eq!(f32_from_json(&f16, 100).unwrap_err().0, ErrorCode::OutOfRange);
    }
}
