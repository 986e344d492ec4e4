//! Reading a safetensors header (tensor names, shapes, metadata) without touching the data, so
//! that a LoRA can be matched and shape-checked against a model before anything is merged.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Headers larger than this are refused (the format's own reader uses the same bound).
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// One file's tensors (name → shape) and its string metadata.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// Tensor name → shape.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// Reads the header of the safetensors file at `path`, checking that every tensor's byte range
/// lies inside the file.
pub fn read_header(path: &Path) -> Result<Header> {
    let bad = |reason: String| Error::BadModelFile { path: path.display().to_string(), reason };
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::MissingFile { what: format!("cannot open ({e})"), path: path.display().to_string() })?;
    let len = file.metadata()?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|_| bad("not a safetensors file (shorter than 8 bytes)".into()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n + 8 > len {
        return Err(bad(format!("not a safetensors file (header size {n} for a file of {len} bytes)")));
    }
    let mut raw = vec![0u8; n as usize];
    file.read_exact(&mut raw).map_err(|e| bad(format!("cannot read the header: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|e| bad(format!("not a safetensors file (header is not JSON: {e})")))?;
    let map = json.as_object().ok_or_else(|| bad("safetensors header is not a JSON object".into()))?;
    let data_len = len - 8 - n;
    let mut header = Header::default();
    for (name, entry) in map {
        if name == "__metadata__" {
            if let Some(meta) = entry.as_object() {
                for (k, v) in meta {
                    if let Some(v) = v.as_str() {
                        header.metadata.insert(k.clone(), v.to_string());
                    }
                }
            }
            continue;
        }
        let shape: Option<Vec<usize>> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
        let offsets: Option<Vec<u64>> =
            entry.get("data_offsets").and_then(|o| o.as_array()).and_then(|o| o.iter().map(|x| x.as_u64()).collect());
        match (shape, offsets.as_deref()) {
            (Some(shape), Some(&[start, end])) if start <= end && end <= data_len => {
                header.shapes.insert(name.clone(), shape);
            }
            _ => return Err(bad(format!("tensor {name}: bad or out-of-file entry in the header"))),
        }
    }
    Ok(header)
}
