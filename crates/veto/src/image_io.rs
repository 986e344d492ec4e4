//! Image output (PNG) and tensor <-> pixel conversion.
//!
//! Pixel conversion follows diffusers' `VaeImageProcessor.postprocess(output_type="pil")`:
//! `(x / 2 + 0.5).clamp(0, 1)`, times 255, rounded half-to-even (numpy's `round`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};

/// Convert decoded images `[B, 3, H, W]` (or one `[3, H, W]`) in [-1, 1] to RGB8 images.
/// Errors on NaN pixels, which mean the model broke (e.g. f16 overflow), rather than
/// writing a silently black image.
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let images = match images.rank() {
        3 => images.unsqueeze(0)?,
        4 => images.clone(),
        _ => {
            return Err(Error::invalid(format!(
                "image tensor must be [batch, 3, height, width], got {:?}",
                images.dims()
            )))
        }
    };
    let (b, c, h, w) = images.dims4()?;
    if c != 3 || h == 0 || w == 0 {
        return Err(Error::invalid(format!(
            "image tensor must be [batch, 3, height, width] with a non-empty picture, got {:?}",
            images.dims()
        )));
    }
    let (w32, h32) = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => return Err(Error::invalid(format!("image of {w}x{h} pixels is too large"))),
    };
    // [B, H, W, 3] on the host, f32 like diffusers' `.float().numpy()`.
    let data = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    let nan = data.iter().filter(|v| v.is_nan()).count();
    if nan > 0 {
        return Err(Error::invalid(format!(
            "decoded image has {nan} NaN values (the model produced non-finite output; try f32 or bf16)"
        )));
    }
    let per_image = h * w * 3;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let pixels: Vec<u8> = data[i * per_image..(i + 1) * per_image].iter().map(|&v| to_u8(v)).collect();
        let img = RgbImage::from_raw(w32, h32, pixels)
            .ok_or_else(|| Error::other("pixel buffer does not match the image size"))?;
        out.push(img);
    }
    Ok(out)
}

/// One value in [-1, 1] to a byte, as diffusers: clamp((v/2+0.5), 0, 1) * 255, round half even.
fn to_u8(v: f32) -> u8 {
    let x = (v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0;
    x.round_ties_even() as u8
}

/// Write one decoded image (`[1, 3, H, W]` or `[3, H, W]`, values in [-1, 1]) as a PNG.
pub fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    let mut images = tensor_to_images(image)?;
    if images.len() != 1 {
        return Err(Error::invalid(format!(
            "save_png writes one image, got a batch of {} ({:?}) for {}",
            images.len(),
            image.dims(),
            path.display()
        )));
    }
    write_png(&images.remove(0), path)
}

/// Write an RGB8 image as a PNG atomically: encode into a temporary file next to `path`,
/// then rename, so an interrupted or failed run never leaves a half-written image.
pub fn write_png(img: &RgbImage, path: &Path) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("output path {} does not name a file", path.display())))?;
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !folder.is_dir() {
        return Err(Error::MissingFile {
            what: "output folder does not exist".into(),
            path: folder.display().to_string(),
        });
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = folder.join(tmp_name);
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut writer = std::io::BufWriter::new(file);
        img.write_to(&mut writer, image::ImageFormat::Png)
            .map_err(|e| Error::other(format!("encoding PNG {}: {e}", path.display())))?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(match e {
            Error::Io(io) => Error::Other(format!("writing {}: {io}", path.display())),
            other => other,
        });
    }
    Ok(())
}

/// Save a batch of decoded images `[B, 3, H, W]` to `paths` (one path per image).
pub fn save_pngs(images: &Tensor, paths: &[PathBuf]) -> Result<()> {
    let imgs = tensor_to_images(images)?;
    if imgs.len() != paths.len() {
        return Err(Error::invalid(format!("{} images but {} output paths", imgs.len(), paths.len())));
    }
    for (img, p) in imgs.iter().zip(paths) {
        write_png(img, p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_numpy() {
        assert_eq!(to_u8(-1.0), 0);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(-5.0), 0);
        assert_eq!(to_u8(5.0), 255);
        // 0.5 * 255 = 127.5 -> 128 (half to even)
        assert_eq!(to_u8(0.0), 128);
    }

    #[test]
    fn rejects_bad_shapes_and_nan() {
        let dev = candle_core::Device::Cpu;
        let t = Tensor::zeros((1, 4, 2, 2), DType::F32, &dev).unwrap();
        assert!(tensor_to_images(&t).is_err());
        let t = Tensor::new(&[f32::NAN; 12], &dev).unwrap().reshape((1, 3, 2, 2)).unwrap();
        assert!(tensor_to_images(&t).unwrap_err().to_string().contains("NaN"));
    }
}
