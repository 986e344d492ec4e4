//! Video output: decoded frames `[F, 3, H, W]` in [-1, 1] written as an H.264 MP4, an animated
//! GIF or WebP, or a folder of PNG frames, chosen by the output path.
//!
//! The path rule ([`VideoFormat::of_path`]): `.mp4`, `.gif`, `.webp` by extension; a path that
//! ends in `/`, has no extension or names an existing folder (with another extension) is a folder of
//! `frame_00000.png`, `frame_00001.png`, … Anything else is refused with the list of formats.
//! Check a path with [`check_video_output`] before any model loads; [`save_video`] writes
//! atomically (a temporary file or folder, renamed), so nothing is ever half-written.

mod animated;
mod h264_mp4;
mod png_frames;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::image_io::{tensor_to_images, write_atomically};

pub use self::h264_mp4::encode_mp4;
pub use self::png_frames::frame_name;

/// Wan's frame rate, the default for every writer.
pub const DEFAULT_FPS: u32 = 16;

/// The highest frame rate accepted.
pub const MAX_FPS: u32 = 240;

const SUPPORTED: &str = ".mp4 (H.264), .gif, .webp (animated, lossless), or a folder of PNG frames \
                         (a path ending in '/' or without an extension)";

/// Video formats veto writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoFormat {
    /// `.mp4`: H.264 (OpenH264, 4:2:0, BT.601 limited range) in an MP4 container.
    Mp4,
    /// `.gif`: animated, one 256-colour palette per frame, looping.
    Gif,
    /// `.webp`: animated, lossless frames, looping.
    Webp,
    /// A folder of `frame_NNNNN.png`, numbered from 0.
    PngFrames,
}

impl VideoFormat {
    /// The format `path` asks for (see the module docs for the rule), or an error naming the
    /// supported ones.
    pub fn of_path(path: &Path) -> Result<Self> {
        let text = path.as_os_str().to_string_lossy();
        if text.is_empty() {
            return Err(Error::parameter("output", format!("empty path; veto writes {SUPPORTED}")));
        }
        if text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
            return Ok(VideoFormat::PngFrames);
        }
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            None => Ok(VideoFormat::PngFrames),
            Some("mp4") => Ok(VideoFormat::Mp4),
            Some("gif") => Ok(VideoFormat::Gif),
            Some("webp") => Ok(VideoFormat::Webp),
            // An existing folder with a dot in its name (`run.v2/`).
            Some(_) if path.is_dir() => Ok(VideoFormat::PngFrames),
            Some(e @ ("png" | "jpg" | "jpeg")) => Err(Error::parameter(
                "output",
                format!(
                    "{} is a single-image format (.{e}); for the frames as PNGs give a folder (e.g. {}/), \
                     or one of {SUPPORTED}",
                    path.display(),
                    path.with_extension("").display()
                ),
            )),
            Some(e) => Err(Error::parameter(
                "output",
                format!("{}: veto cannot write .{e} videos; it writes {SUPPORTED}", path.display()),
            )),
        }
    }

    /// Whether the output is a folder rather than one file.
    pub fn is_folder(self) -> bool {
        self == VideoFormat::PngFrames
    }
}

/// Checks, before any work, that a video can be written at `path`: a format veto writes, an
/// existing parent folder, and for a folder of frames a folder that is absent or empty (frames
/// of an earlier run are never mixed with new ones). Returns the format.
pub fn check_video_output(path: &Path) -> Result<VideoFormat> {
    let format = VideoFormat::of_path(path)?;
    let parent = parent_folder(path);
    if !parent.is_dir() {
        return Err(Error::MissingFile {
            what: "output folder does not exist".into(),
            path: parent.display().to_string(),
        });
    }
    if format.is_folder() {
        if path.is_file() {
            return Err(Error::parameter(
                "output",
                format!("{} is a file, not a folder for PNG frames", path.display()),
            ));
        }
        if path.is_dir() && std::fs::read_dir(path)?.next().is_some() {
            return Err(Error::parameter(
                "output",
                format!("folder {} is not empty; give a new or empty folder for the PNG frames", path.display()),
            ));
        }
    } else if path.is_dir() {
        return Err(Error::parameter("output", format!("{} is a folder, not a file", path.display())));
    }
    Ok(format)
}

/// The folder a path's file or folder goes in (`.` for a bare name).
fn parent_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Decoded frames to RGB8 images: `[F, 3, H, W]`, or a VAE's `[1, 3, F, H, W]`, values in
/// [-1, 1], converted like [`crate::image_io::tensor_to_images`] (diffusers' rounding, NaN
/// refused).
pub fn tensor_to_frames(frames: &Tensor) -> Result<Vec<RgbImage>> {
    let frames = match frames.dims() {
        [1, 3, _, _, _] => frames.squeeze(0)?.permute((1, 0, 2, 3))?,
        [_, 3, _, _] => frames.clone(),
        dims => {
            return Err(Error::invalid(format!(
                "video tensor must be [frames, 3, height, width] or [1, 3, frames, height, width], got {dims:?}"
            )))
        }
    };
    if frames.dim(0)? == 0 {
        return Err(Error::invalid("video has no frames"));
    }
    tensor_to_images(&frames)
}

/// Writes decoded frames (see [`tensor_to_frames`]) to `path` in the format it names, at `fps`
/// frames per second. Returns the format written.
pub fn save_video(frames: &Tensor, path: &Path, fps: u32) -> Result<VideoFormat> {
    let format = VideoFormat::of_path(path)?;
    check_fps(fps)?;
    write_video(&tensor_to_frames(frames)?, path, fps)?;
    Ok(format)
}

/// Writes RGB8 frames (all of one size) to `path` in the format it names, atomically.
pub fn write_video(frames: &[RgbImage], path: &Path, fps: u32) -> Result<()> {
    let format = check_video_output(path)?;
    check_fps(fps)?;
    let first = frames.first().ok_or_else(|| Error::invalid("video has no frames"))?;
    let size = first.dimensions();
    if let Some((i, f)) = frames.iter().enumerate().find(|(_, f)| f.dimensions() != size) {
        return Err(Error::invalid(format!(
            "frame {i} is {:?}, frame 0 is {size:?}: frames must share one size",
            f.dimensions()
        )));
    }
    match format {
        VideoFormat::Mp4 => {
            let bytes = encode_mp4(frames, fps)?;
            write_atomically(path, |w| Ok(w.write_all(&bytes)?))
        }
        VideoFormat::Gif => write_atomically(path, |w| animated::encode_gif(frames, fps, w)),
        VideoFormat::Webp => {
            let bytes = animated::encode_webp(frames, fps)?;
            write_atomically(path, |w| Ok(w.write_all(&bytes)?))
        }
        VideoFormat::PngFrames => png_frames::write_frames(frames, path),
    }
}

fn check_fps(fps: u32) -> Result<()> {
    if fps == 0 || fps > MAX_FPS {
        return Err(Error::parameter("fps", format!("must be 1..={MAX_FPS} frames per second, got {fps}")));
    }
    Ok(())
}

/// Frame durations in `units` per second at `fps`, rounded so that their running sum stays
/// within half a unit of the exact time (16 fps in centiseconds: 6, 6, 7, 6, …).
fn frame_durations(n: usize, fps: u32, units: u64) -> Vec<u64> {
    let at = |i: u64| (i * units * 2 + u64::from(fps)) / (2 * u64::from(fps));
    (0..n as u64).map(|i| at(i + 1) - at(i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_path() {
        assert_eq!(VideoFormat::of_path(Path::new("a/b.MP4")).unwrap(), VideoFormat::Mp4);
        assert_eq!(VideoFormat::of_path(Path::new("b.gif")).unwrap(), VideoFormat::Gif);
        assert_eq!(VideoFormat::of_path(Path::new("b.webp")).unwrap(), VideoFormat::Webp);
        assert_eq!(VideoFormat::of_path(Path::new("frames/")).unwrap(), VideoFormat::PngFrames);
        assert_eq!(VideoFormat::of_path(Path::new("out/frames")).unwrap(), VideoFormat::PngFrames);
        for bad in ["x.avi", "x.png", "x.mkv", ""] {
            let e = VideoFormat::of_path(Path::new(bad)).unwrap_err();
            assert!(matches!(e, Error::InvalidParameter { name: "output", .. }), "{bad}: {e}");
            assert!(e.to_string().contains(".mp4 (H.264), .gif, .webp"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_add_up() {
        let d = frame_durations(16, 16, 100);
        assert_eq!(d.iter().sum::<u64>(), 100);
        assert!(d.iter().all(|&x| x == 6 || x == 7), "{d:?}");
        assert_eq!(frame_durations(3, 16, 16_000), [1000, 1000, 1000]);
        let ms = frame_durations(81, 16, 1000);
        assert_eq!(ms.iter().sum::<u64>(), 5063);
    }
}
