//! PixArt's input and conditioning embeddings: the patch embedding with its sin-cos position
//! table computed for the latent grid (interpolated to the training grid, diffusers'
//! `PatchEmbed` without `pos_embed_max_size`), adaLN-single's timestep embedding and the caption
//! projection.

use crate::loading::quantized::QuantizedWeights;
use crate::models::layers::{dense, Linear};
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::layers::{timestep_features, MlpEmbedder};

/// diffusers' `get_2d_sincos_pos_embed(dim, (gh, gw), base_size, interpolation_scale)`:
/// `[gh * gw, dim]`, row-major. Token `(r, c)`: the first half of the channels encode the
/// column position `c / (gw / base) / scale`, the second half the row position
/// `r / (gh / base) / scale`, each as `[sin(p w), cos(p w)]` with `w_i = 10000^(-i / (dim/4))`.
/// Positions are computed in f32 and the table in f64, as diffusers does.
pub fn sincos_grid(dim: usize, gh: usize, gw: usize, base: usize, scale: f64, device: &Device) -> Result<Tensor> {
    if !dim.is_multiple_of(4) {
        candle_core::bail!("the position table needs a width divisible by 4, got {dim}");
    }
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64)).collect();
    let positions = |n: usize| -> Vec<f64> {
        let step = (n as f64 / base as f64) as f32;
        (0..n).map(|i| ((i as f32 / step) / scale as f32) as f64).collect()
    };
    let (rows, cols) = (positions(gh), positions(gw));
    let mut data = Vec::with_capacity(gh * gw * dim);
    for r in &rows {
        for c in &cols {
            for p in [c, r] {
                data.extend(omega.iter().map(|w| (p * w).sin() as f32));
                data.extend(omega.iter().map(|w| (p * w).cos() as f32));
            }
        }
    }
    Tensor::from_vec(data, (gh * gw, dim), device)
}

/// `pos_embed`: a `patch x patch` strided convolution (a linear map over patches) plus the
/// position table of the grid.
pub struct PatchEmbed {
    proj: Linear,
    patch: usize,
    dim: usize,
    /// `sample_size / patch_size`: the grid the positions are scaled to.
    base: usize,
    interpolation_scale: f64,
}

impl PatchEmbed {
    pub fn new(
        in_channels: usize,
        dim: usize,
        patch: usize,
        base: usize,
        interpolation_scale: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((dim, in_channels, patch, patch), "proj.weight")?;
        let bias = vb.get(dim, "proj.bias")?;
        let proj = Linear::from_weights(weight.reshape((dim, in_channels * patch * patch))?, Some(bias));
        Ok(Self { proj, patch, dim, base, interpolation_scale })
    }

    /// `[B, C, h, w]` latents -> `[B, (h/p)(w/p), dim]` tokens, row-major.
    pub fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches =
            latents.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, gh * gw, c * p * p))?;
        let tokens = self.proj.forward(&patches)?;
        let pos = sincos_grid(self.dim, gh, gw, self.base, self.interpolation_scale, latents.device())?;
        tokens.broadcast_add(&pos.unsqueeze(0)?.to_dtype(tokens.dtype())?)
    }
}

/// `PixArtAlphaTextProjection`: `linear_1 -> GELU(tanh) -> linear_2`, applied per token.
pub struct CaptionProjection {
    linear_1: Linear,
    linear_2: Linear,
}

impl CaptionProjection {
    pub fn new(in_dim: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: dense(in_dim, dim, true, vb.pp("linear_1"))?,
            linear_2: dense(dim, dim, true, vb.pp("linear_2"))?,
        })
    }
}

impl Module for CaptionProjection {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.gelu()?)
    }
}

/// `AdaLayerNormSingle` without additional conditions (PixArt-Sigma): the timestep embedding
/// `e` (`emb.timestep_embedder` over 256 sinusoidal features, cos first) and the six block
/// modulation vectors `linear(silu(e))`, `[B, 6 dim]`.
pub struct AdaLayerNormSingle {
    timestep_embedder: MlpEmbedder,
    linear: Linear,
}

impl AdaLayerNormSingle {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            timestep_embedder: MlpEmbedder::new(256, dim, vb.pp("emb.timestep_embedder"), &QuantizedWeights::none())?,
            linear: dense(dim, 6 * dim, true, vb.pp("linear"))?,
        })
    }

    /// `t` `[B]` on the 0..1000 scale -> (`[B, 6 dim]` block modulation, `[B, dim]` embedded
    /// timestep for the output layer).
    pub fn forward(&self, t: &Tensor, dtype: candle_core::DType) -> Result<(Tensor, Tensor)> {
        let e = self.timestep_embedder.forward(&timestep_features(t, 256)?.to_dtype(dtype)?)?;
        Ok((self.linear.forward(&e.silu()?)?, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_positions_scale_to_the_base_grid() {
        // 2 x 4 grid, base 2, scale 1: rows at 0, 1 (step 1), columns at 0, .5, 1, 1.5 (step 2).
        let t = sincos_grid(4, 2, 4, 2, 1.0, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let (r, c) = (1usize, 3usize);
        let want = [1.5f32.sin(), 1.5f32.cos(), 1f32.sin(), 1f32.cos()];
        for (a, b) in t[r * 4 + c].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", t[r * 4 + c]);
        }
        // interpolation_scale 2 halves every position.
        let t = sincos_grid(4, 2, 4, 2, 2.0, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        assert!((t[4 + 3][0] - 0.75f32.sin()).abs() < 1e-6);
    }
}
