//! diffusers' `PixArtImageProcessor.resize_and_crop_tensor`: an image decoded at a binned size
//! back to the size the user asked for: scaled (bilinear, `align_corners=False`, no
//! antialiasing, as `F.interpolate`) until it covers the asked size, then center-cropped.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// `[B, C, H, W]` -> `[B, C, height, width]` (a no-op when the size already matches).
pub fn resize_and_crop(image: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    if (h, w) == (height, width) || height == 0 || width == 0 {
        return Ok(image.clone());
    }
    let ratio = (height as f64 / h as f64).max(width as f64 / w as f64);
    let (rh, rw) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
    let resized = bilinear(&bilinear(image, 2, rh)?, 3, rw)?;
    let (top, left) = ((rh - height) / 2, (rw - width) / 2);
    Ok(resized.narrow(2, top, height)?.narrow(3, left, width)?)
}

/// Bilinear resampling of one axis to `size` (PyTorch's `align_corners=False` source
/// positions, clamped at 0 and at the last pixel).
fn bilinear(x: &Tensor, dim: usize, size: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    if n == size {
        return Ok(x.clone());
    }
    let scale = n as f32 / size as f32;
    let (mut lo, mut hi, mut frac) = (Vec::with_capacity(size), Vec::with_capacity(size), Vec::with_capacity(size));
    for i in 0..size {
        let src = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n - 1);
        lo.push(i0 as u32);
        hi.push((i0 + 1).min(n - 1) as u32);
        frac.push(src - i0 as f32);
    }
    let dev: &Device = x.device();
    let mut shape = vec![1; x.rank()];
    shape[dim] = size;
    let frac = Tensor::from_vec(frac, shape.as_slice(), dev)?.to_dtype(x.dtype())?;
    let a = x.index_select(&Tensor::new(lo, dev)?, dim)?;
    let b = x.index_select(&Tensor::new(hi, dev)?, dim)?;
    // a + frac (b - a) in f32 whatever the image's dtype.
    let (a32, b32) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let out = (&a32 + (b32 - &a32)?.broadcast_mul(&frac.to_dtype(DType::F32)?)?)?;
    Ok(out.to_dtype(x.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_untouched_and_shapes_follow_diffusers() {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((1, 1, 4, 6)).unwrap();
        let same = resize_and_crop(&x, 4, 6).unwrap();
        assert_eq!(
            same.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // 4x6 -> 3x3: ratio max(0.75, 0.5) = 0.75 -> 3x4 (int(4.5)), then the center 3 columns.
        assert_eq!(resize_and_crop(&x, 3, 3).unwrap().dims(), &[1, 1, 3, 3]);
        // Upscaling: 2x upsampling of [0, 1] is [0, 0.25, 0.75, 1] (PyTorch's values).
        let r = Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap().reshape((1, 1, 1, 2)).unwrap();
        let up = resize_and_crop(&r, 2, 4).unwrap();
        let row: Vec<f32> = up.narrow(2, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(row, [0.0, 0.25, 0.75, 1.0]);
    }
}
