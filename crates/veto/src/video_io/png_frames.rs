//! A folder of PNG frames, written into a temporary sibling folder and renamed into place, so
//! an interrupted run leaves no partial folder under the asked name.

use std::path::Path;

use image::RgbImage;

use super::parent_folder;
use crate::error::{Error, Result};
use crate::image_io::write_png;

/// The file name of frame `i` (`frame_00000.png`, numbered from 0).
pub fn frame_name(i: usize) -> String {
    format!("frame_{i:05}.png")
}

/// Writes `frames` as `folder/frame_NNNNN.png`; `folder` must be absent or empty.
pub fn write_frames(frames: &[RgbImage], folder: &Path) -> Result<()> {
    let name = folder
        .file_name()
        .ok_or_else(|| Error::invalid(format!("output path {} does not name a folder", folder.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = parent_folder(folder).join(tmp_name);
    let result = (|| -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp)?;
        for (i, frame) in frames.iter().enumerate() {
            write_png(frame, &tmp.join(frame_name(i)))?;
        }
        if folder.is_dir() {
            // Only an empty folder is replaced (check_video_output refuses others).
            std::fs::remove_dir(folder)?;
        }
        std::fs::rename(&tmp, folder)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(match e {
            Error::Io(io) => Error::Other(format!("writing frames into {}: {io}", folder.display())),
            other => other,
        });
    }
    Ok(())
}
