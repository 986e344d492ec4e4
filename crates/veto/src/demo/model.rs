//! The embedded demo model (`--model demo`, the CLI's default): a tiny FLUX.1-schnell-like
//! diffusers folder trained on the demo world by `tools/demo/train.py`. The binary carries its
//! files (crate `veto-demo-weights`); [`materialise`] writes them once to a cache folder named by
//! their content hash, and from there the ordinary diffusers-folder loader reads them, so the
//! demo runs through exactly the production Flux code path.

use crate::error::{Error, Result};
use crate::loading::model_source::ModelSource;
use crate::pipelines::GenerateRequest;
use std::path::{Path, PathBuf};

/// The `--model` name of the embedded demo model.
pub const NAME: &str = "demo";
/// The size the demo model was trained at.
pub const SIZE: usize = 64;
/// The T5 tokens it was trained with (the pipeline pads to this many, unmasked, as diffusers).
pub const MAX_SEQUENCE_LENGTH: usize = 32;

/// The demo model's own defaults for what a request leaves unset (Flux's are 1024² and 256
/// tokens): its training size and token count. Steps stay Flux-schnell's 4.
pub fn fill_defaults(req: &mut GenerateRequest) {
    req.height.get_or_insert(SIZE);
    req.width.get_or_insert(SIZE);
    req.max_sequence_length.get_or_insert(MAX_SEQUENCE_LENGTH);
}

/// Where the demo model is extracted: `$VETO_CACHE_DIR`, else `$XDG_CACHE_HOME/veto`, else
/// `$HOME/.cache/veto`, else the system temp folder.
pub fn cache_root() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("VETO_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("veto")))
        .or_else(|| var("HOME").map(|p| p.join(".cache").join("veto")))
        .unwrap_or_else(|| std::env::temp_dir().join("veto-cache"))
}

/// FNV-1a over the files' names and bytes: the cache folder's name, so a binary with other
/// weights never reads a stale copy.
fn content_hash(files: &[(&str, &[u8])]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in files {
        for &b in name.as_bytes().iter().chain([0u8].iter()).chain(bytes.iter()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Write `files` (relative path, bytes) under `root/demo-<hash>` unless a complete copy is
/// there already, and return that folder. Written to a private temporary folder first and
/// renamed into place, so concurrent runs never see half a model.
pub fn materialise_in(root: &Path, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let dir = root.join(format!("demo-{:016x}", content_hash(files)));
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    let io = |what: &str, path: &Path, e: std::io::Error| {
        Error::InvalidInput(format!("cannot {what} {} for the demo model: {e}", path.display()))
    };
    std::fs::create_dir_all(root).map_err(|e| io("create", root, e))?;
    let tmp = root.join(format!(".demo-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (rel, bytes) in files {
        let path = tmp.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| io("write", &path, e))?;
    }
    std::fs::write(tmp.join(".complete"), b"").map_err(|e| io("write", &tmp, e))?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another run put it there first (or a broken copy is in the way): keep a complete one.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join(".complete").is_file() {
            return Err(Error::InvalidInput(format!(
                "cannot put the demo model at {} (delete that folder and retry)",
                dir.display()
            )));
        }
    }
    Ok(dir)
}

/// [`materialise_in`] under [`cache_root`].
pub fn materialise(files: &[(&str, &[u8])]) -> Result<PathBuf> {
    materialise_in(&cache_root(), files)
}

/// The embedded files as a model source (extracted on first use).
pub fn source(files: &[(&str, &[u8])]) -> Result<ModelSource> {
    ModelSource::local(&materialise(files)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materialises_once_by_content() {
        let root = tempfile::tempdir().unwrap();
        let files: &[(&str, &[u8])] = &[("model_index.json", b"{}"), ("vae/config.json", b"{\"a\": 1}")];
        let dir = materialise_in(root.path(), files).unwrap();
        assert_eq!(std::fs::read(dir.join("vae/config.json")).unwrap(), b"{\"a\": 1}");
        assert_eq!(materialise_in(root.path(), files).unwrap(), dir);
        let other: &[(&str, &[u8])] = &[("model_index.json", b"{ }")];
        assert_ne!(materialise_in(root.path(), other).unwrap(), dir);
        let mut req = GenerateRequest::new("a red circle");
        req.height = Some(128);
        fill_defaults(&mut req);
        assert_eq!((req.height, req.width, req.max_sequence_length), (Some(128), Some(64), Some(32)));
    }
}
