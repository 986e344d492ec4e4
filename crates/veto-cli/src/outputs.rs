//! Where `veto generate` writes, decided and checked before any work: image paths (one per
//! `--num-images`), latents paths, their folders writable, nothing written twice.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use veto::image_io::ImageFormat;

/// The files of one run: image `i` goes to `images[i]`, its latents to `latents[i]`.
pub struct OutputPlan {
    pub images: Vec<PathBuf>,
    pub latents: Vec<Option<PathBuf>>,
}

/// `out.png` for one image; `out-0.png`, `out-1.png`, ... for several.
fn numbered(path: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{i}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{i}"),
    };
    path.with_file_name(name)
}

/// Fail unless `path` can be written: its folder exists and takes a new file, and it is not
/// itself a folder. Probes with a temporary file it removes again.
fn check_writable(flag: &str, path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("{flag}: {} is a folder, not a file", path.display());
    }
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !folder.is_dir() {
        bail!("{flag}: folder {} does not exist", folder.display());
    }
    let probe = folder.join(format!(".veto-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("{flag}: cannot write into folder {}", folder.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

impl OutputPlan {
    pub fn new(output: &Path, save_latents: Option<&Path>, num_images: usize) -> Result<Self> {
        if num_images == 0 {
            bail!("--num-images must be at least 1");
        }
        ImageFormat::of_path(output).map_err(crate::generate::flag_error)?;
        check_writable("--output", output)?;
        if let Some(p) = save_latents {
            if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                bail!("--save-latents: {} should end in .safetensors", p.display());
            }
            check_writable("--save-latents", p)?;
        }
        let images: Vec<PathBuf> = (0..num_images).map(|i| numbered(output, i, num_images)).collect();
        let latents: Vec<Option<PathBuf>> =
            (0..num_images).map(|i| save_latents.map(|p| numbered(p, i, num_images))).collect();
        let mut all: Vec<PathBuf> = images.iter().chain(latents.iter().flatten()).map(|p| absolute(p)).collect();
        let count = all.len();
        all.sort();
        all.dedup();
        if all.len() != count {
            bail!("--output and --save-latents name the same file");
        }
        Ok(OutputPlan { images, latents })
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.png");
        let plan = OutputPlan::new(&out, Some(&dir.path().join("l.safetensors")), 2).unwrap();
        assert_eq!(plan.images[1], dir.path().join("out-1.png"));
        assert_eq!(plan.latents[0].as_deref(), Some(dir.path().join("l-0.safetensors").as_path()));
        assert!(OutputPlan::new(&out, None, 1).unwrap().images == [out.clone()]);
        let same = OutputPlan::new(&dir.path().join("x.png"), Some(&dir.path().join("x.png")), 1);
        assert!(same.is_err());
        let e = OutputPlan::new(dir.path(), None, 1).err().unwrap().to_string();
        assert!(e.contains("image extension"), "{e}");
        let e = OutputPlan::new(&dir.path().join("nowhere/x.png"), None, 1).err().unwrap().to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(OutputPlan::new(&dir.path().join("x.gif"), None, 1).is_err());
        // The probe leaves nothing behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
