//! Where `veto generate` writes, decided and checked before any work: image or video paths (one
//! per `--num-images`), latents paths, their folders writable, nothing written twice.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use veto::image_io::ImageFormat;
use veto::video_io::{check_video_output, VideoFormat};

/// The files of one run: image (or video) `i` goes to `images[i]`, its latents to `latents[i]`.
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
        ImageFormat::of_path(output).map_err(crate::generate::flag_error)?;
        Self::plan(output, save_latents, num_images, |p| check_writable("--output", p))
    }

    /// The plan of a video run: `--output` is an `.mp4`, `.gif` or `.webp` file or a folder of
    /// PNG frames (a path ending in `/` or without an extension; absent or empty), see
    /// [`veto::video_io`]. Returns the format too.
    pub fn new_video(output: &Path, save_latents: Option<&Path>, num_videos: usize) -> Result<(Self, VideoFormat)> {
        let format = VideoFormat::of_path(output).map_err(crate::generate::flag_error)?;
        let plan = Self::plan(output, save_latents, num_videos, |p| {
            check_video_output(p).map_err(crate::generate::flag_error)?;
            if format.is_folder() {
                // The frames' folder is made next to it: probe its parent.
                let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                check_writable("--output", &parent.join(".veto-frames"))
            } else {
                check_writable("--output", p)
            }
        })?;
        Ok((plan, format))
    }

    fn plan(
        output: &Path,
        save_latents: Option<&Path>,
        num_images: usize,
        check_output: impl Fn(&Path) -> Result<()>,
    ) -> Result<Self> {
        if num_images == 0 {
            bail!("--num-images must be at least 1");
        }
        if let Some(p) = save_latents {
            if p.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                bail!("--save-latents: {} should end in .safetensors", p.display());
            }
            check_writable("--save-latents", p)?;
        }
        let images: Vec<PathBuf> = (0..num_images).map(|i| numbered(output, i, num_images)).collect();
        for p in &images {
            check_output(p)?;
        }
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

    #[test]
    fn video_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let (plan, format) = OutputPlan::new_video(&dir.path().join("v.mp4"), None, 2).unwrap();
        assert_eq!((format, plan.images[1].clone()), (VideoFormat::Mp4, dir.path().join("v-1.mp4")));
        let (plan, format) = OutputPlan::new_video(&dir.path().join("frames/"), None, 1).unwrap();
        assert_eq!(format, VideoFormat::PngFrames);
        assert_eq!(plan.images.len(), 1);
        let (_, format) = OutputPlan::new_video(&dir.path().join("clip.webp"), None, 1).unwrap();
        assert_eq!(format, VideoFormat::Webp);
        let e = OutputPlan::new_video(&dir.path().join("v.avi"), None, 1).err().unwrap().to_string();
        assert!(e.contains(".mp4 (H.264), .gif, .webp"), "{e}");
        let e = OutputPlan::new_video(&dir.path().join("nowhere/v.mp4"), None, 1).err().unwrap().to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::create_dir(dir.path().join("full")).unwrap();
        std::fs::write(dir.path().join("full/x"), b"").unwrap();
        let e = OutputPlan::new_video(&dir.path().join("full"), None, 1).err().unwrap().to_string();
        assert!(e.contains("not empty"), "{e}");
        // Only the folder made above is there.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
