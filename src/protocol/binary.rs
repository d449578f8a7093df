//! Binary command frames: a JSON header followed by raw tensor bytes, so a hop's hidden state or
//! logits cross the wire as little-endian `f32` instead of base64 inside JSON.
//!
//! A command frame's payload (the bytes after its `u32` length, see [`super::frame`]) is either
//! JSON, as always (its first byte is `{` or JSON whitespace), or binary:
//!
//! ```text
//! byte 0        0x00                         MARKER: no JSON text starts with it
//! bytes 1..5    u32 big-endian H             the header's length
//! H bytes       the header                   the request or response object, UTF-8 JSON
//! the rest      the data section             tensor bytes, little-endian
//! ```
//!
//! In the header a tensor is `{"dtype":"f32","shape":[rows,cols],"offset":O,"nbytes":B}`: its
//! bytes are `data[O..O + B]`, and `B` must be `rows x cols x 4`. A tensor in a binary header
//! may also be given the JSON way (`"b64"`). The data section holds exactly the bytes of the
//! frame's tensors: a reader refuses bytes no tensor names. Every length is checked against the
//! frame (which is already whole in memory, under `--max-frame`) before anything is allocated.
//!
//! Who sends them: a request says `"encoding_format": "binary"` to have its answer's tensors
//! raw (`EXECUTE_TASK`; the name is OpenAI's, whose embeddings API chooses between `float` and
//! `base64` with it); such a success answer always comes as a binary frame, even with no tensor,
//! so the caller learns the node reads them. A node sends binary requests only on a link whose
//! node has answered one binary frame. The first frame of a connection is always JSON (the
//! first-byte split between commands, peer wire and MSE reads it).

use serde_json::Value;

use super::ErrorCode;

/// The first byte of a binary payload.
pub const MARKER: u8 = 0;
/// The marker and the header's length.
pub const PREFIX_LEN: usize = 5;

/// Whether a frame's payload is binary (else JSON).
pub fn is_binary(payload: &[u8]) -> bool {
    payload.first() == Some(&MARKER)
}

/// A binary payload cut into its header (JSON bytes) and data section, both inside the payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Parts<'a> {
    pub header: &'a [u8],
    pub data: &'a [u8],
}

/// Cuts a binary payload (its first byte [`MARKER`]) into header and data, checking the
/// declared header length against the payload's. Errors say what is wrong, with lengths.
pub fn split(payload: &[u8]) -> Result<Parts<'_>, String> {
    if payload.first() != Some(&MARKER) {
        return Err("not a binary frame (its first byte is not 0)".into());
    }
    let Some(len) = payload.get(1..PREFIX_LEN) else {
        return Err(format!(
            "binary frame of {} bytes, shorter than its {PREFIX_LEN}-byte prefix (marker, header length)",
            payload.len()
        ));
    };
    let header_len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    let rest = &payload[PREFIX_LEN..];
    if header_len > rest.len() {
        return Err(format!("binary frame declares a header of {header_len} bytes, but only {} follow", rest.len()));
    }
    let (header, data) = rest.split_at(header_len);
    Ok(Parts { header, data })
}

/// Appends a binary payload (not framed: [`super::frame::encode`] or a MAC seals it) holding
/// `header` (a serialized JSON object) and `data` to `out`.
pub fn encode(header: &[u8], data: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(header.len()).expect("header over 4 GiB");
    out.reserve(PREFIX_LEN + header.len() + data.len());
    out.push(MARKER);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(data);
}

/// A binary payload from a JSON value and its data section.
pub fn payload(header: &Value, data: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(header).expect("JSON values serialize");
    let mut out = Vec::new();
    encode(&header, data, &mut out);
    out
}

/// A frame's data section as tensors read from it see it: the bytes, and how many of them
/// tensors have named so far (a frame whose tensors leave bytes unnamed is refused).
#[derive(Debug)]
pub struct Section<'a> {
    bytes: &'a [u8],
    used: std::cell::Cell<usize>,
}

impl<'a> Section<'a> {
    pub fn new(bytes: &'a [u8]) -> Section<'a> {
        Section { bytes, used: std::cell::Cell::new(0) }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// `nbytes` bytes at `offset`, checked against the section (no overflow, nothing past its
    /// end), counted as named.
    pub fn slice(&self, offset: u64, nbytes: u64) -> Result<&'a [u8], (ErrorCode, String)> {
        let end = offset.checked_add(nbytes).filter(|&e| e <= self.bytes.len() as u64);
        let Some(end) = end else {
            return Err((
                ErrorCode::OutOfRange,
                format!(
                    "tensor: bytes {offset}..{offset}+{nbytes} lie outside the frame's data section of {} bytes",
                    self.bytes.len()
                ),
            ));
        };
        self.used.set(self.used.get() + nbytes as usize);
        Ok(&self.bytes[offset as usize..end as usize])
    }

    /// Errors unless the tensors read named exactly the section's bytes.
    pub fn all_named(&self) -> Result<(), (ErrorCode, String)> {
        if self.used.get() == self.bytes.len() {
            return Ok(());
        }
        Err((
            ErrorCode::ShapeMismatch,
            format!(
                "binary frame: its data section holds {} bytes, its tensors name {}",
                self.bytes.len(),
                self.used.get()
            ),
        ))
    }
}

/// The JSON form of a binary payload: the header with each raw tensor at `paths` (JSON
/// pointers, e.g. `/params/input/hidden`) given as base64, for a peer that reads JSON only.
/// Errors: the payload is not a well-formed binary frame, or a tensor does not fit its data.
pub fn to_json(payload: &[u8], paths: &[&str]) -> Result<Value, (ErrorCode, String)> {
    let parts = split(payload).map_err(|m| (ErrorCode::InvalidFrame, m))?;
    let mut header: Value = serde_json::from_slice(parts.header)
        .map_err(|e| (ErrorCode::InvalidJson, format!("binary frame header is not JSON: {e}")))?;
    inline_tensors(&mut header, parts.data, paths)?;
    Ok(header)
}

/// Replaces each raw tensor (`offset`, `nbytes`) found at `paths` in `header` by its base64 form,
/// reading its bytes from `data` (checked; bytes no tensor names are an error).
pub fn inline_tensors(header: &mut Value, data: &[u8], paths: &[&str]) -> Result<(), (ErrorCode, String)> {
    let section = Section::new(data);
    for path in paths {
        let Some(t) = header.pointer_mut(path) else { continue };
        if t.get("offset").is_none() {
            continue;
        }
        let (values, rows, cols) = super::tensor::f32_from_json_in(t, usize::MAX, Some(&section))?;
        *t = super::tensor::f32_to_json(&values, rows, cols);
    }
    section.all_named()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splits_what_it_encodes_and_checks_the_header_length() {
        let mut p = Vec::new();
        encode(br#"{"a":1}"#, &[1, 2, 3], &mut p);
        assert_eq!(p[..5], [0, 0, 0, 0, 7]);
        assert!(is_binary(&p));
        assert_eq!(split(&p).unwrap(), Parts { header: br#"{"a":1}"#, data: &[1, 2, 3] });
        // Every cut short of the whole header is refused, never read past.
        for cut in 0..5 + 7 {
            assert!(split(&p[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(split(&p[..12]).unwrap().data, b"");
        let mut lying = p.clone();
        lying[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(split(&lying).unwrap_err().contains("4294967295"));
        assert!(!is_binary(br#"{"command":"STATUS"}"#));
        assert!(!is_binary(b""));
    }

    #[test]
    fn sections_refuse_bytes_outside_and_bytes_unnamed() {
        let s = Section::new(&[0u8; 8]);
        assert_eq!(s.slice(u64::MAX, 2).unwrap_err().0, ErrorCode::OutOfRange);
        assert_eq!(s.slice(4, 8).unwrap_err().0, ErrorCode::OutOfRange);
        assert_eq!(s.slice(0, 4).unwrap().len(), 4);
        assert_eq!(s.all_named().unwrap_err().0, ErrorCode::ShapeMismatch);
        assert_eq!(s.slice(4, 4).unwrap().len(), 4);
        assert!(s.all_named().is_ok());
    }

    #[test]
    fn to_json_inlines_raw_tensors_as_base64() {
        let data: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        let header = json!({"result": {"logits": {"dtype": "f32", "shape": [1, 2], "offset": 0, "nbytes": 8}}});
        let v = to_json(&payload(&header, &data), &["/result/logits", "/result/hidden"]).unwrap();
        assert_eq!(v["result"]["logits"], super::super::tensor::f32_to_json(&[1.5, -2.0], 1, 2));
        let short = payload(&header, &data[..7]);
        assert_eq!(to_json(&short, &["/result/logits"]).unwrap_err().0, ErrorCode::OutOfRange);
    }
}
