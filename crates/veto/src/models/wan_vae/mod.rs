//! Wan2.1's video VAE (diffusers' `AutoencoderKLWan`, the `vae/` folder of the Wan2.1 repos):
//! causal 3-D convolutions, 8x spatial and 4x temporal compression (`F` frames to
//! `1 + (F - 1) / 4` latent frames), run chunk by chunk in time with each layer's temporal cache
//! exactly as diffusers does, so memory does not grow with the frame count.
//!
//! Interface:
//! - `AutoencoderKlWan::load_weights(&ComponentWeights, &Device, DType) -> Result<AutoencoderKlWan>`
//! - `encode(&self, video: &Tensor) -> Result<Tensor>`: `[B, 3, F, H, W]` in [-1, 1] to the latent
//!   mean `[B, z, 1 + (F-1)/4, H/8, W/8]` (diffusers' `latent_dist.mode()`, what I2V uses)
//! - `decode(&self, z: &Tensor) -> Result<Tensor>`: `[B, z, F', h, w]` to `[B, 3, 1 + 4(F'-1), 8h, 8w]`
//!   clamped to [-1, 1], one latent frame at a time
//! - `normalize_latents` / `denormalize_latents`: the pipelines' per-channel
//!   `(z - latents_mean) / latents_std` and its inverse, from the config.
//!
//! Only the Wan2.1 layout is supported (`is_residual: false`, no `patch_size`); Wan2.2's VAE
//! config is refused with a clear error.

mod blocks;
mod conv;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use self::blocks::{Decoder, Encoder};
use self::conv::{CausalConv3d, TimeCache};
use crate::error::{Error, Result};
use crate::loading::config::read_checked_config;
use crate::loading::weights::ComponentWeights;

fn three() -> usize {
    3
}

/// The fields of `vae/config.json` the VAE uses.
#[derive(Debug, Clone, Deserialize)]
pub struct WanVaeConfig {
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    pub temperal_downsample: Vec<bool>,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
}

impl WanVaeConfig {
    fn check(&self) -> std::result::Result<(), String> {
        if self.is_residual || self.patch_size.is_some() {
            return Err("this is a Wan2.2 VAE (is_residual / patch_size); only the Wan2.1 VAE is supported".into());
        }
        if self.dim_mult.is_empty() || self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            return Err(format!(
                "dim_mult has {} levels and temperal_downsample {} entries; need one level more than entries",
                self.dim_mult.len(),
                self.temperal_downsample.len()
            ));
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            return Err(format!(
                "latents_mean ({}) and latents_std ({}) must have z_dim = {} entries",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            ));
        }
        if self.latents_std.contains(&0.0) {
            return Err("latents_std has a zero entry".into());
        }
        Ok(())
    }

    /// Pixels per latent pixel along height and width (8 for Wan2.1).
    pub fn spatial_factor(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Video frames per latent frame after the first (4 for Wan2.1).
    pub fn temporal_factor(&self) -> usize {
        1 << self.temperal_downsample.iter().filter(|&&t| t).count()
    }
}

/// The Wan2.1 VAE.
pub struct AutoencoderKlWan {
    encoder: Encoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    decoder: Decoder,
    config: WanVaeConfig,
    /// `[1, z, 1, 1, 1]` in f32.
    mean: Tensor,
    std: Tensor,
    dtype: DType,
    origin: String,
}

impl std::fmt::Debug for AutoencoderKlWan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoencoderKlWan")
            .field("origin", &self.origin)
            .field("base_dim", &self.config.base_dim)
            .field("z_dim", &self.config.z_dim)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl AutoencoderKlWan {
    pub fn load_weights(weights: &ComponentWeights, device: &Device, dtype: DType) -> Result<Self> {
        let config: WanVaeConfig = read_checked_config(weights.config_path(), "Wan VAE config", WanVaeConfig::check)?;
        let vb = weights.var_builder(dtype, device)?;
        let z = config.z_dim;
        let load = || -> candle_core::Result<_> {
            Ok((
                Encoder::load(&config, vb.pp("encoder"))?,
                CausalConv3d::pointwise(2 * z, 2 * z, vb.pp("quant_conv"))?,
                CausalConv3d::pointwise(z, z, vb.pp("post_quant_conv"))?,
                Decoder::load(&config, vb.pp("decoder"))?,
            ))
        };
        let (encoder, quant_conv, post_quant_conv, decoder) = load().map_err(|e| weights.mismatch("Wan VAE", e))?;
        let per_channel = |v: &[f64]| -> Result<Tensor> {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Ok(Tensor::from_vec(v, (1, z, 1, 1, 1), device)?)
        };
        Ok(Self {
            encoder,
            quant_conv,
            post_quant_conv,
            decoder,
            mean: per_channel(&config.latents_mean)?,
            std: per_channel(&config.latents_std)?,
            config,
            dtype,
            origin: weights.origin().to_string(),
        })
    }

    pub fn config(&self) -> &WanVaeConfig {
        &self.config
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn latents_mean(&self) -> &[f64] {
        &self.config.latents_mean
    }
    pub fn latents_std(&self) -> &[f64] {
        &self.config.latents_std
    }

    /// The pipelines' latent normalization: `(z - latents_mean) / latents_std` per channel of
    /// `[B, z, F', h, w]` (I2V's conditioning latents; the transformer works in this space).
    pub fn normalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let dtype = z.dtype();
        Ok(z.to_dtype(DType::F32)?.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?.to_dtype(dtype)?)
    }

    /// The inverse, applied before [`Self::decode`]: `z * latents_std + latents_mean`.
    pub fn denormalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let dtype = z.dtype();
        Ok(z.to_dtype(DType::F32)?.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?.to_dtype(dtype)?)
    }

    /// The latent mean of `video` `[B, C, F, H, W]` (values in [-1, 1]): `[B, z, 1 + (F-1)/4, H/8,
    /// W/8]`. Frames are encoded as diffusers does: the first alone, then four at a time; frames
    /// past the last full group of four are ignored, as there (the pipelines use 4k+1 frames).
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        let (_, c, f, h, w) = video.dims5().map_err(|_| {
            Error::invalid(format!("Wan VAE encode: video must be [B, C, F, H, W], got {:?}", video.dims()))
        })?;
        let s = self.config.spatial_factor();
        if c != self.config.in_channels || f == 0 || h % s != 0 || w % s != 0 {
            return Err(Error::invalid(format!(
                "Wan VAE encode: video {:?} needs {} channels, at least one frame and a size divisible by {s}",
                video.dims(),
                self.config.in_channels
            )));
        }
        let x = video.to_dtype(self.dtype)?.permute((0, 2, 1, 3, 4))?.contiguous()?;
        let step = self.config.temporal_factor();
        let chunks = 1 + (f - 1) / step;
        let mut cache = TimeCache::default();
        let mut outs = Vec::with_capacity(chunks);
        for i in 0..chunks {
            cache.start_chunk();
            let chunk = if i == 0 { x.narrow(1, 0, 1)? } else { x.narrow(1, 1 + step * (i - 1), step)? };
            outs.push(self.encoder.forward(&chunk, &mut cache)?);
        }
        let enc = self.quant_conv.forward(&Tensor::cat(&outs, 1)?, None)?;
        let mean = enc.narrow(2, 0, self.config.z_dim)?;
        Ok(mean.permute((0, 2, 1, 3, 4))?.contiguous()?)
    }

    /// Video `[B, 3, 1 + 4(F'-1), 8h, 8w]` in [-1, 1] from latents `[B, z, F', h, w]` (already
    /// denormalized), decoded one latent frame at a time.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, f, _, _) = z.dims5().map_err(|_| {
            Error::invalid(format!("Wan VAE decode: latents must be [B, z, F, h, w], got {:?}", z.dims()))
        })?;
        if c != self.config.z_dim || f == 0 {
            return Err(Error::invalid(format!(
                "Wan VAE decode: latents {:?} need {} channels and at least one frame",
                z.dims(),
                self.config.z_dim
            )));
        }
        let x = z.to_dtype(self.dtype)?.permute((0, 2, 1, 3, 4))?.contiguous()?;
        let x = self.post_quant_conv.forward(&x, None)?;
        let mut cache = TimeCache::default();
        let mut frames = Vec::with_capacity(f);
        for i in 0..f {
            cache.start_chunk();
            let out = self.decoder.forward(&x.narrow(1, i, 1)?, &mut cache)?;
            frames.push(out.clamp(-1f32, 1f32)?);
        }
        Ok(Tensor::cat(&frames, 1)?.permute((0, 2, 1, 3, 4))?.contiguous()?)
    }
}
