//! Finding the weight files of one model folder.
//!
//! Diffusers/transformers folders hold either a single `<stem>.safetensors` or, for large
//! models, shards listed in `<stem>.safetensors.index.json` (its `weight_map` maps each
//! tensor name to a shard file). Both layouts resolve to a list of files to memory-map.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::config::read_config;
use crate::error::{Error, Result};

/// The safetensors files holding the weights in `dir`, for a file stem such as `"model"`
/// or `"diffusion_pytorch_model"`.
///
/// A single `<stem>.safetensors` wins over an index; otherwise every shard named in
/// `<stem>.safetensors.index.json` is returned once, in sorted order. Errors name the
/// folder when neither exists, and the shard when one listed in the index is missing.
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::MissingFile { what: "model folder not found".into(), path: dir.display().to_string() });
    }
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if !index.is_file() {
        return Err(Error::MissingFile {
            what: format!("no {stem}.safetensors or {stem}.safetensors.index.json in folder"),
            path: dir.display().to_string(),
        });
    }
    let bad = |reason: String| Error::BadModelFile { path: index.display().to_string(), reason };
    let json: serde_json::Value = read_config(&index, "weights index")?;
    let map =
        json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("weight_map entry for {tensor} is not a file name")))?;
        // Shard names are plain file names; refuse anything that would leave the folder.
        let p = Path::new(file);
        if p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(bad(format!("shard path {file:?} leaves the model folder")));
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err(bad("\"weight_map\" lists no shards".into()));
    }
    let mut files = Vec::with_capacity(shards.len());
    for shard in shards {
        let path = dir.join(&shard);
        if !path.is_file() {
            return Err(Error::MissingFile {
                what: format!("shard listed in {} is missing", index.display()),
                path: path.display().to_string(),
            });
        }
        files.push(path);
    }
    Ok(files)
}

/// Read and parse a JSON config file: [`read_config`](super::config::read_config), under its
/// older name.
pub use super::config::read_config as read_json;

/// Memory-map `files` into a `VarBuilder` converting every tensor to `dtype` on `device`.
pub fn var_builder(
    files: &[PathBuf],
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<candle_nn::VarBuilder<'static>> {
    // SAFETY: the files are memory-mapped read-only; like every safetensors loader we rely on
    // nobody truncating them while the model is alive.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        Error::BadModelFile { path: names.join(", "), reason: format!("cannot read safetensors: {e}") }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("veto-wf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn single_file_wins() {
        let d = tmpdir("single");
        std::fs::write(d.join("model.safetensors"), b"x").unwrap();
        std::fs::write(d.join("model.safetensors.index.json"), b"{}").unwrap();
        assert_eq!(weight_files(&d, "model").unwrap(), vec![d.join("model.safetensors")]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sharded_index() {
        let d = tmpdir("sharded");
        let idx = r#"{"metadata":{},"weight_map":{"a":"m-2.safetensors","b":"m-1.safetensors","c":"m-2.safetensors"}}"#;
        std::fs::write(d.join("model.safetensors.index.json"), idx).unwrap();
        std::fs::write(d.join("m-1.safetensors"), b"x").unwrap();
        let err = weight_files(&d, "model").unwrap_err().to_string();
        assert!(err.contains("m-2.safetensors"), "{err}");
        std::fs::write(d.join("m-2.safetensors"), b"x").unwrap();
        let files = weight_files(&d, "model").unwrap();
        assert_eq!(files, vec![d.join("m-1.safetensors"), d.join("m-2.safetensors")]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_folder_and_files() {
        let d = tmpdir("missing");
        let err = weight_files(&d, "diffusion_pytorch_model").unwrap_err().to_string();
        assert!(err.contains(&d.display().to_string()) && err.contains("diffusion_pytorch_model"), "{err}");
        let gone = d.join("nope");
        let err = weight_files(&gone, "model").unwrap_err().to_string();
        assert!(err.contains(&gone.display().to_string()), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
