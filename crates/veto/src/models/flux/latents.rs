//! Flux latent layout: 2x2 packing of `[B, C, H/8, W/8]` into `[B, (H/16)(W/16), 4C]`, and the
//! `(0, row, col)` position ids of the packed tokens.

use candle_core::{Device, Result, Tensor};

/// `[B, C, h, w]` -> `[B, (h/2)(w/2), C*4]`, channel-major within each 2x2 patch (diffusers order).
pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    latents.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack`] for latent height `h` and width `w` (in latent pixels).
pub fn unpack(packed: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c4) = packed.dims3()?;
    let c = c4 / 4;
    packed.reshape((b, h / 2, w / 2, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))
}

/// `[(h/2)(w/2), 3]` ids `(0, row, col)` of the packed tokens, row-major.
pub fn image_ids(h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let (rows, cols) = (h / 2, w / 2);
    let mut ids = Vec::with_capacity(rows * cols * 3);
    for r in 0..rows {
        for c in 0..cols {
            ids.extend([0f32, r as f32, c as f32]);
        }
    }
    Tensor::from_vec(ids, (rows * cols, 3), device)
}

/// `[T, 3]` zero ids of the text tokens.
pub fn text_ids(len: usize, device: &Device) -> Result<Tensor> {
    Tensor::zeros((len, 3), candle_core::DType::F32, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip_and_order() {
        let x = Tensor::arange(0f32, 2.0 * 4.0 * 4.0, &Device::Cpu).unwrap().reshape((1, 2, 4, 4)).unwrap();
        let p = pack(&x).unwrap();
        assert_eq!(p.dims(), &[1, 4, 8]);
        // token 0 = patch rows 0-1, cols 0-1: channel 0 -> 0,1,4,5 then channel 1 -> 16,17,20,21
        let t0 = p.get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t0, vec![0., 1., 4., 5., 16., 17., 20., 21.]);
        let back = unpack(&p, 4, 4).unwrap();
        let d: f32 = (back - &x).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn ids_are_row_major() {
        let ids = image_ids(4, 6, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(ids.len(), 6);
        assert_eq!(ids[4], vec![0., 1., 1.]);
    }
}
