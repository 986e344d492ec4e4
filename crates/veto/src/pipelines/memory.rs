//! How much memory a model's weights take, from the safetensors headers alone (no tensor is
//! read), so a run that cannot fit stops before loading with the figure.

use std::io::Read;
use std::path::Path;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::loading::model_source::ModelSource;

/// The component folders whose weights a pipeline loads.
const COMPONENTS: [&str; 6] = ["transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"];

/// Bytes of a local model folder's weights once loaded in `dtype` (the VAE in f32 on a CPU, as
/// veto loads it); `None` for a hub model (its files may not be downloaded yet).
pub fn weights_bytes(source: &ModelSource, dtype: DType, cpu: bool) -> Result<Option<u64>> {
    let Some(root) = source.root() else {
        return Ok(None);
    };
    let mut total = 0u64;
    for component in COMPONENTS {
        // A replaced component (a GGUF file) keeps about its file size in memory.
        if let Some(file) = source.component_file(component) {
            total += std::fs::metadata(file)?.len();
            continue;
        }
        let dir = root.join(component);
        if !dir.is_dir() {
            continue;
        }
        let in_dtype = if component == "vae" && cpu { DType::F32 } else { dtype };
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                total += elements(&path)? * in_dtype.size_in_bytes() as u64;
            }
        }
    }
    Ok(Some(total))
}

/// The number of tensor elements a safetensors file holds, from its JSON header.
fn elements(path: &Path) -> Result<u64> {
    let bad = |reason: String| Error::BadModelFile { path: path.display().to_string(), reason };
    let mut file = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    let file_len = file.metadata()?.len();
    if len > 100 << 20 || len + 8 > file_len {
        return Err(bad(format!("header length {len} does not fit a file of {file_len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("unreadable safetensors header: {e}")))?;
    let map = json.as_object().ok_or_else(|| bad("the safetensors header is not a JSON object".into()))?;
    let mut total = 0u64;
    for (name, info) in map.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let shape =
            info.get("shape").and_then(|s| s.as_array()).ok_or_else(|| bad(format!("tensor {name} has no shape")))?;
        let n = shape.iter().try_fold(1u64, |acc, d| d.as_u64().map(|d| acc.saturating_mul(d)));
        total += n.ok_or_else(|| bad(format!("tensor {name} has a bad shape")))?;
    }
    Ok(total)
}

/// This host's available memory (Linux: `MemAvailable` in `/proc/meminfo`), if it can be read.
pub fn available_host_bytes() -> Option<u64> {
    meminfo_bytes("MemAvailable:")
}

/// This host's total memory (Linux: `MemTotal` in `/proc/meminfo`), if it can be read.
pub fn total_host_bytes() -> Option<u64> {
    meminfo_bytes("MemTotal:")
}

fn meminfo_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_tiny_flux_weights_from_the_headers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/flux/schnell");
        let source = ModelSource::local(&root).unwrap();
        let f32_bytes = weights_bytes(&source, DType::F32, true).unwrap().unwrap();
        let bf16_bytes = weights_bytes(&source, DType::BF16, true).unwrap().unwrap();
        // Every fixture file is f32: the header count equals the data bytes.
        let mut data = 0u64;
        for c in COMPONENTS {
            let dir = root.join(c);
            if dir.is_dir() {
                for e in std::fs::read_dir(dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                        let bytes = std::fs::read(&p).unwrap();
                        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                        data += st.tensors().iter().map(|(_, t)| t.data().len() as u64).sum::<u64>();
                    }
                }
            }
        }
        assert_eq!(f32_bytes, data);
        assert!(bf16_bytes < f32_bytes && bf16_bytes > f32_bytes / 2, "the VAE stays f32 on a CPU");
        assert!(available_host_bytes().is_some() && total_host_bytes() >= available_host_bytes());
    }
}
