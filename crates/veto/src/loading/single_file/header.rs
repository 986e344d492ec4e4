//! The tensor table of a safetensors file, read and bounds-checked before anything is mapped.
//!
//! Detection and key mapping work on names and shapes only, so they run on this table; the
//! checks here let a truncated or corrupt file be reported by the first tensor that does not
//! fit, instead of a generic "incomplete buffer".

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// The largest JSON header we read (real checkpoints have a few hundred KB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor's entry in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its element type as the file spells it (`F32`, `BF16`, …).
    pub dtype: String,
}

/// Tensor names with their shapes and element types.
#[derive(Debug, Clone, Default)]
pub struct Header {
    tensors: BTreeMap<String, TensorInfo>,
}

impl Header {
    /// A table from `(name, shape)` pairs (for other containers such as GGUF, and tests).
    pub fn from_shapes<S: Into<String>>(shapes: impl IntoIterator<Item = (S, Vec<usize>)>) -> Self {
        let tensors =
            shapes.into_iter().map(|(name, shape)| (name.into(), TensorInfo { shape, dtype: String::new() })).collect();
        Self { tensors }
    }

    /// Reads the table of the safetensors file at `path`, checking that the header fits the
    /// file and that every tensor's bytes lie inside it and match its shape and type.
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::BadModelFile { path: path.display().to_string(), reason };
        let mut file = std::fs::File::open(path).map_err(|e| Error::MissingFile {
            what: format!("cannot open checkpoint ({e})"),
            path: path.display().to_string(),
        })?;
        let file_len = file.metadata()?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|_| bad("not a safetensors file: shorter than its 8-byte header length".into()))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
            return Err(bad(format!(
                "not a safetensors file, or truncated: header length {header_len} does not fit the file ({file_len} bytes)"
            )));
        }
        let mut text = vec![0u8; header_len as usize];
        file.read_exact(&mut text)?;
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("not a safetensors file: its header is not a JSON object ({e})")))?;
        let data_len = file_len - 8 - header_len;
        let mut tensors = BTreeMap::new();
        for (name, entry) in json {
            if name == "__metadata__" {
                continue;
            }
            let info = parse_entry(&entry, data_len).map_err(|why| bad(format!("tensor {name}: {why}")))?;
            tensors.insert(name, info);
        }
        Ok(Self { tensors })
    }

    /// The shape of `name`, if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Whether the file has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the file has no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The first name ending in `suffix`, if any.
    pub fn find_suffix(&self, suffix: &str) -> Option<&str> {
        self.names().find(|n| n.ends_with(suffix))
    }

    /// The number of numbered blocks `<prefix><i>.…` (one more than the largest index).
    pub fn count_blocks(&self, prefix: &str) -> usize {
        self.names()
            .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    }
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

fn parse_entry(entry: &serde_json::Value, data_len: u64) -> std::result::Result<TensorInfo, String> {
    let dtype = entry.get("dtype").and_then(|d| d.as_str()).ok_or("no dtype")?.to_string();
    let shape: Vec<usize> = entry
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or("no shape")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).ok_or("shape is not a list of sizes"))
        .collect::<std::result::Result<_, _>>()?;
    let offsets = entry.get("data_offsets").and_then(|o| o.as_array()).ok_or("no data_offsets")?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => (b.as_u64().ok_or("bad data_offsets")?, e.as_u64().ok_or("bad data_offsets")?),
        _ => return Err("data_offsets is not [begin, end]".into()),
    };
    if begin > end || end > data_len {
        return Err(format!(
            "its bytes {begin}..{end} lie past the end of the data ({data_len} bytes): the file is truncated"
        ));
    }
    let size = dtype_size(&dtype).ok_or_else(|| format!("unknown dtype {dtype}"))?;
    let want = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d as u64)).ok_or("shape overflows")?;
    if end - begin != want {
        return Err(format!("shape {shape:?} of {dtype} needs {want} bytes, the file gives {}", end - begin));
    }
    Ok(TensorInfo { shape, dtype })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, header: &str, data: usize) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn reads_and_checks_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let h = r#"{"__metadata__":{"a":"b"},"a.0.w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"a.3.w":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}}"#;
        write(&p, h, 32);
        let header = Header::read(&p).unwrap();
        assert_eq!(header.len(), 2);
        assert_eq!(header.shape("a.0.w"), Some(&[2, 3][..]));
        assert_eq!(header.count_blocks("a."), 4);
        assert_eq!(header.find_suffix(".w"), Some("a.0.w"));

        write(&p, h, 30);
        let err = Header::read(&p).unwrap_err().to_string();
        assert!(err.contains("a.3.w") && err.contains("truncated") && err.contains("x.safetensors"), "{err}");

        std::fs::write(&p, b"GGUF\x03\0\0\0\0\0\0\0").unwrap();
        let err = Header::read(&p).unwrap_err().to_string();
        assert!(err.contains("not a safetensors file"), "{err}");

        let bad = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        write(&p, bad, 8);
        let err = Header::read(&p).unwrap_err().to_string();
        assert!(err.contains("tensor w") && err.contains("needs 12 bytes"), "{err}");
    }
}
