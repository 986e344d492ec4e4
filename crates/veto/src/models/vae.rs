//! The AutoencoderKL decoder (latents → pixels) of Flux and the Stable Diffusion family.
//!
//! Wraps candle's `stable_diffusion::vae::AutoEncoderKL`, driven by the diffusers
//! `vae/config.json`, and adds the latent de-normalisation (`scaling_factor`,
//! `shift_factor`) that diffusers pipelines apply before decoding.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::loading::config::read_config;
use crate::loading::weights::ComponentWeights;

fn default_channels() -> usize {
    3
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_one() -> usize {
    1
}
fn default_latent_channels() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "silu".into()
}

/// The fields of a diffusers `AutoencoderKL` config we use; defaults are diffusers' own.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// `null` in SD configs; means 0.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
}

impl VaeConfig {
    /// Read and check `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: VaeConfig = read_config(path, "VAE config")?;
        config.validate(path)?;
        Ok(config)
    }

    /// Reject configs that candle's AutoEncoderKL would build differently from diffusers.
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::BadModelFile { path: path.display().to_string(), reason };
        if self.block_out_channels.is_empty() {
            return Err(bad("block_out_channels is empty".into()));
        }
        if self.norm_num_groups == 0 {
            return Err(bad("norm_num_groups is 0".into()));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c == 0 || c % self.norm_num_groups != 0) {
            return Err(bad(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            )));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err(bad("in_channels, out_channels and latent_channels must be positive".into()));
        }
        if self.act_fn != "silu" {
            return Err(bad(format!("unsupported act_fn {:?} (only \"silu\")", self.act_fn)));
        }
        if !self.mid_block_add_attention {
            return Err(bad("mid_block_add_attention = false is not supported".into()));
        }
        for (key, types, want) in [
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(types) = types {
                if types.len() != self.block_out_channels.len() {
                    return Err(bad(format!(
                        "{key} has {} entries but block_out_channels has {}",
                        types.len(),
                        self.block_out_channels.len()
                    )));
                }
                if let Some(t) = types.iter().find(|t| t.as_str() != want) {
                    return Err(bad(format!("unsupported {key} entry {t:?} (only {want:?})")));
                }
            }
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(bad(format!("scaling_factor {} is not a usable number", self.scaling_factor)));
        }
        Ok(())
    }

    /// Pixels per latent along each side: 2^(number of down blocks − 1) (8 for Flux and SD).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// An AutoencoderKL (decoder side used) loaded from a diffusers `vae/` folder.
pub struct AutoencoderKl {
    model: AutoEncoderKL,
    config: VaeConfig,
    device: Device,
    dtype: DType,
    dir: PathBuf,
}

/// Flux's VAE is a plain AutoencoderKL with 16 latent channels and a shift factor.
pub type FluxVae = AutoencoderKl;

impl std::fmt::Debug for AutoencoderKl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoencoderKl")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl AutoencoderKl {
    /// Load `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (or its sharded
    /// index), converting weights to `dtype` on `device`. On the CPU the VAE always runs in
    /// f32: candle's CPU convolutions do not support half precision (and the Flux VAE config
    /// asks for `force_upcast` anyway). [`Self::dtype`] tells the dtype actually used.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_weights(&ComponentWeights::from_dir(dir, "diffusion_pytorch_model", "VAE")?, device, dtype)
    }

    /// Load from a component's config and weights, wherever they come from.
    pub fn load_weights(weights: &ComponentWeights, device: &Device, dtype: DType) -> Result<Self> {
        let dtype = if device.is_cpu() { DType::F32 } else { dtype };
        let dir = PathBuf::from(weights.origin());
        let config = VaeConfig::from_file(weights.config_path())?;
        let vb = weights.var_builder(dtype, device)?;
        let candle_config = AutoEncoderKLConfig {
            block_out_channels: config.block_out_channels.clone(),
            layers_per_block: config.layers_per_block,
            latent_channels: config.latent_channels,
            norm_num_groups: config.norm_num_groups,
            use_quant_conv: config.use_quant_conv,
            use_post_quant_conv: config.use_post_quant_conv,
        };
        let model = AutoEncoderKL::new(vb, config.in_channels, config.out_channels, candle_config).map_err(|e| {
            Error::BadModelFile {
                path: dir.display().to_string(),
                reason: format!("VAE weights do not match config.json: {e}"),
            }
        })?;
        Ok(Self { model, config, device: device.clone(), dtype, dir })
    }

    /// Decode denoiser-space latents `[B, latent_channels, h, w]` to pixels
    /// `[B, out_channels, h·f, w·f]` (f32, roughly in [-1, 1]; see `image_io` for PNGs).
    /// Applies `latents / scaling_factor + shift_factor` first, as diffusers does.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4().map_err(|_| {
            Error::invalid(format!("VAE latents must be [batch, channels, height, width], got {:?}", latents.dims()))
        })?;
        if c != self.config.latent_channels {
            return Err(Error::invalid(format!(
                "VAE in {} expects {} latent channels, got {c} (latents {:?})",
                self.dir.display(),
                self.config.latent_channels,
                latents.dims()
            )));
        }
        if b == 0 || h == 0 || w == 0 {
            return Err(Error::invalid(format!("empty VAE latents {:?}", latents.dims())));
        }
        let shift = self.config.shift_factor.unwrap_or(0.0);
        let z = latents
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .affine(1.0 / self.config.scaling_factor, shift)?
            .to_dtype(self.dtype)?;
        Ok(self.model.decode(&z)?.to_dtype(DType::F32)?)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_null_shift() {
        let c: VaeConfig = serde_json::from_str(
            r#"{"latent_channels":16,"block_out_channels":[32,64],"shift_factor":null,"norm_num_groups":32,
                "use_quant_conv":false,"scaling_factor":0.3611}"#,
        )
        .unwrap();
        assert_eq!(c.shift_factor, None);
        assert!(c.use_post_quant_conv);
        assert_eq!(c.downscale_factor(), 2);
        c.validate(Path::new("x")).unwrap();
    }

    #[test]
    fn rejects_bad_configs() {
        let c: VaeConfig = serde_json::from_str(r#"{"block_out_channels":[30],"norm_num_groups":32}"#).unwrap();
        assert!(c.validate(Path::new("cfg.json")).unwrap_err().to_string().contains("cfg.json"));
        let c: VaeConfig = serde_json::from_str(r#"{"act_fn":"relu"}"#).unwrap();
        assert!(c.validate(Path::new("cfg.json")).unwrap_err().to_string().contains("act_fn"));
    }
}
