//! MMDiT input and output layouts: patch embedding with SD3's cropped 2-D sin-cos position
//! table, and the inverse "unpatchify" of the model output.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// diffusers' `get_2d_sincos_pos_embed(dim, max_size, base_size)`: `[max_size², dim]`, row-major
/// over the grid. Per token `(row, col)`: the first half of the channels encode the column, the
/// second half the row, each as `[sin(p ω), cos(p ω)]` with `ω_i = 10000^(-i / (dim/4))` and
/// `p = index / (max_size / base_size)`. Positions are rounded to f32 and the table is computed
/// in f64 before rounding, as diffusers does on CPU/CUDA.
pub fn sincos_table(dim: usize, max_size: usize, base_size: usize, device: &Device) -> Result<Tensor> {
    if !dim.is_multiple_of(4) {
        candle_core::bail!("the position table needs a width divisible by 4, got {dim}");
    }
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|i| 1.0 / 10000f64.powf(i as f64 / (dim / 4) as f64)).collect();
    let step = (max_size as f64 / base_size as f64) as f32;
    let pos = |i: usize| ((i as f32) / step) as f64;
    let mut data = Vec::with_capacity(max_size * max_size * dim);
    for r in 0..max_size {
        for c in 0..max_size {
            for p in [pos(c), pos(r)] {
                data.extend(omega.iter().map(|w| (p * w).sin() as f32));
                data.extend(omega.iter().map(|w| (p * w).cos() as f32));
            }
        }
    }
    Tensor::from_vec(data, (max_size * max_size, dim), device)
}

/// `pos_embed`: a `patch x patch` strided convolution (done as a linear map over patches) plus
/// the centre crop of the position table that fits the latent grid.
pub struct PatchEmbed {
    proj: Linear,
    /// `[max, max, dim]`.
    table: Tensor,
    patch: usize,
    max_size: usize,
}

impl PatchEmbed {
    /// Uses the checkpoint's `pos_embed.pos_embed` when present (diffusers saves it), else
    /// computes the same table.
    pub fn new(
        in_channels: usize,
        dim: usize,
        patch: usize,
        max_size: usize,
        base_size: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((dim, in_channels, patch, patch), "proj.weight")?;
        let bias = vb.get(dim, "proj.bias")?;
        let proj = Linear::new(weight.reshape((dim, in_channels * patch * patch))?, Some(bias));
        let table = if vb.contains_tensor("pos_embed") {
            vb.get((1, max_size * max_size, dim), "pos_embed")?
        } else {
            sincos_table(dim, max_size, base_size, vb.device())?.to_dtype(vb.dtype())?
        };
        let table = table.reshape((max_size, max_size, dim))?;
        Ok(Self { proj, table, patch, max_size })
    }

    /// `[B, C, h, w]` latents -> `[B, (h/p)(w/p), dim]` tokens, row-major.
    pub fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        if gh > self.max_size || gw > self.max_size {
            candle_core::bail!(
                "a {h}x{w} latent grid needs {gh}x{gw} positions, the model has {0}x{0} (pos_embed_max_size)",
                self.max_size
            );
        }
        let patches =
            latents.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, gh * gw, c * p * p))?;
        let tokens = self.proj.forward(&patches)?;
        let top = (self.max_size - gh) / 2;
        let left = (self.max_size - gw) / 2;
        let dim = self.table.dim(2)?;
        let pos =
            self.table.narrow(0, top, gh)?.narrow(1, left, gw)?.reshape((1, gh * gw, dim))?.to_dtype(tokens.dtype())?;
        tokens.broadcast_add(&pos)
    }
}

/// `[B, (h/p)(w/p), p*p*C]` -> `[B, C, h, w]` (diffusers' `nhwpqc -> nchpwq`).
pub fn unpatchify(x: &Tensor, h: usize, w: usize, patch: usize) -> Result<Tensor> {
    let (b, _, ppc) = x.dims3()?;
    let c = ppc / (patch * patch);
    let (gh, gw) = (h / patch, w / patch);
    x.reshape((b, gh, gw, patch, patch, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_layout_column_half_then_row_half() {
        // dim 4: [sin(col), cos(col), sin(row), cos(row)] with omega = 1 and step 1.
        let t = sincos_table(4, 3, 3, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let (r, c) = (2usize, 1usize);
        let row = &t[r * 3 + c];
        let want = [1f32.sin(), 1f32.cos(), 2f32.sin(), 2f32.cos()];
        for (a, b) in row.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{row:?}");
        }
        // base_size halves the step: max 4, base 2 -> positions i / 2.
        let t = sincos_table(4, 4, 2, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert!((t[1][0] - 0.5f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn unpatchify_inverts_patch_order() {
        // One channel, 4x4, patch 2: token t holds its patch row-major.
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu).unwrap().reshape((1, 1, 4, 4)).unwrap();
        let patches =
            x.reshape((1, 1, 2, 2, 2, 2)).unwrap().permute((0, 2, 4, 3, 5, 1)).unwrap().reshape((1, 4, 4)).unwrap();
        let back = unpatchify(&patches, 4, 4, 2).unwrap();
        let d: f32 = (back - &x).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(d, 0.0);
    }
}
