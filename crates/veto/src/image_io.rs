//! Image output (PNG with the generation parameters, JPEG, WebP) and tensor <-> pixel conversion.
//!
//! Pixel conversion follows diffusers' `VaeImageProcessor.postprocess(output_type="pil")`:
//! `(x / 2 + 0.5).clamp(0, 1)`, times 255, rounded half-to-even (numpy's `round`).

use std::io::Write;
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

/// Image file formats veto writes, chosen by the output's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// `.png`, with the generation parameters in text chunks.
    Png,
    /// `.jpg` / `.jpeg`, quality 95.
    Jpeg,
    /// `.webp`, lossless.
    Webp,
}

impl ImageFormat {
    /// The format an output path asks for by its extension, or an error naming the known ones.
    pub fn of_path(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(ImageFormat::Png),
            Some("jpg" | "jpeg") => Ok(ImageFormat::Jpeg),
            Some("webp") => Ok(ImageFormat::Webp),
            _ => Err(Error::parameter(
                "output",
                format!("{} has no image extension veto writes (.png, .jpg, .jpeg, .webp)", path.display()),
            )),
        }
    }
}

/// How an image was made, stored in its PNG as text chunks: `parameters` in the AUTOMATIC1111
/// convention (read by most image browsers and by ComfyUI/A1111 "PNG info"), and `veto` as JSON.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageMetadata {
    /// The A1111-style text: prompt, `Negative prompt: ...`, then `Key: value, ...`.
    pub parameters: String,
    /// Everything, machine-readable.
    pub json: String,
}

/// Write one decoded image (`[1, 3, H, W]` or `[3, H, W]`, values in [-1, 1]) as a PNG.
pub fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    save_image(image, path, None)
}

/// Write one decoded image in the format its extension names, atomically; PNGs carry
/// `metadata` when given.
pub fn save_image(image: &Tensor, path: &Path, metadata: Option<&ImageMetadata>) -> Result<()> {
    let format = ImageFormat::of_path(path)?;
    let mut images = tensor_to_images(image)?;
    if images.len() != 1 {
        return Err(Error::invalid(format!(
            "save_image writes one image, got a batch of {} ({:?}) for {}",
            images.len(),
            image.dims(),
            path.display()
        )));
    }
    let img = images.remove(0);
    write_atomically(path, |writer| encode(&img, format, metadata, writer))
}

fn encode(img: &RgbImage, format: ImageFormat, metadata: Option<&ImageMetadata>, w: &mut dyn Write) -> Result<()> {
    let failed = |e: &dyn std::fmt::Display| Error::other(format!("encoding {format:?}: {e}"));
    match format {
        ImageFormat::Png => {
            let mut encoder = png::Encoder::new(w, img.width(), img.height());
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            if let Some(m) = metadata {
                encoder.add_text_chunk("parameters".into(), m.parameters.clone()).map_err(|e| failed(&e))?;
                encoder.add_itxt_chunk("veto".into(), m.json.clone()).map_err(|e| failed(&e))?;
            }
            let mut writer = encoder.write_header().map_err(|e| failed(&e))?;
            writer.write_image_data(img.as_raw()).map_err(|e| failed(&e))?;
            writer.finish().map_err(|e| failed(&e))
        }
        ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(w, 95).encode_image(img).map_err(|e| failed(&e))
        }
        ImageFormat::Webp => image::codecs::webp::WebPEncoder::new_lossless(w)
            .encode(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
            .map_err(|e| failed(&e)),
    }
}

/// Write an RGB8 image as a PNG atomically (see [`write_atomically`]).
pub fn write_png(img: &RgbImage, path: &Path) -> Result<()> {
    write_atomically(path, |w| encode(img, ImageFormat::Png, None, w))
}

/// Write a file atomically: `write` fills a temporary file next to `path`, which is then
/// renamed, so an interrupted or failed run never leaves a half-written file.
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
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
        write(&mut writer)?;
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
    fn formats_by_extension_and_png_metadata() {
        assert_eq!(ImageFormat::of_path(Path::new("a/b.PNG")).unwrap(), ImageFormat::Png);
        assert_eq!(ImageFormat::of_path(Path::new("x.jpeg")).unwrap(), ImageFormat::Jpeg);
        assert_eq!(ImageFormat::of_path(Path::new("x.webp")).unwrap(), ImageFormat::Webp);
        let e = ImageFormat::of_path(Path::new("x.gif")).unwrap_err();
        assert!(matches!(e, Error::InvalidParameter { name: "output", .. }), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let img = Tensor::zeros((1, 3, 4, 6), DType::F32, &candle_core::Device::Cpu).unwrap();
        let meta = ImageMetadata { parameters: "a cat\nSteps: 4, Seed: 7".into(), json: r#"{"seed": 7}"#.into() };
        let png_path = dir.path().join("x.png");
        save_image(&img, &png_path, Some(&meta)).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (6, 4));
        assert_eq!(info.uncompressed_latin1_text[0].keyword, "parameters");
        assert_eq!(info.uncompressed_latin1_text[0].text, meta.parameters);
        assert_eq!(info.utf8_text[0].keyword, "veto");
        for ext in ["jpg", "webp"] {
            let p = dir.path().join(format!("x.{ext}"));
            save_image(&img, &p, Some(&meta)).unwrap();
            let back = image::open(&p).unwrap();
            assert_eq!((back.width(), back.height()), (6, 4), "{ext}");
        }
        // Nothing else was left in the folder (temporary files are renamed or removed).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
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
