//! `AutoencoderDC` (DC-AE, SANA's 32x autoencoder), the decoder path: `conv_in` with the
//! channel-repeating shortcut, the levels from the deepest up (each a 2x [`blocks::UpBlock`]
//! then its ResBlocks or EfficientViT blocks), an RMS norm, the activation and `conv_out`.

pub mod blocks;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::models::conv::Conv2d;
use serde::Deserialize;

use crate::loading::config::read_checked_config;
use crate::loading::weights::ComponentWeights;
use crate::{Error, Result};
use blocks::{
    channels_first, channels_last, conv3x3, repeat_channels, Activation, EfficientVitBlock, ResBlock, UpBlock,
};

/// A config value given once for every level or per level.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerLevel<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerLevel<T> {
    fn expand(&self, levels: usize) -> Vec<T> {
        match self {
            PerLevel::One(v) => vec![v.clone(); levels],
            PerLevel::Each(v) => v.clone(),
        }
    }
}

/// `vae/config.json` (the decoder's fields), with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct DcAeConfig {
    #[serde(default = "d3")]
    pub in_channels: usize,
    #[serde(default = "d32")]
    pub latent_channels: usize,
    #[serde(default = "d32")]
    pub attention_head_dim: usize,
    #[serde(default = "res_block")]
    pub decoder_block_types: PerLevel<String>,
    #[serde(default = "widths")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "layers")]
    pub decoder_layers_per_block: Vec<usize>,
    #[serde(default = "multiscales")]
    pub decoder_qkv_multiscales: Vec<Vec<usize>>,
    #[serde(default = "pixel_shuffle")]
    pub upsample_block_type: String,
    #[serde(default = "rms_norm")]
    pub decoder_norm_types: PerLevel<String>,
    #[serde(default = "silu")]
    pub decoder_act_fns: PerLevel<String>,
    #[serde(default = "yes")]
    pub decoder_in_shortcut: bool,
    #[serde(default = "relu")]
    pub decoder_conv_act_fn: String,
    #[serde(default = "one")]
    pub scaling_factor: f64,
}

fn d3() -> usize {
    3
}
fn d32() -> usize {
    32
}
fn res_block() -> PerLevel<String> {
    PerLevel::One("ResBlock".into())
}
fn widths() -> Vec<usize> {
    vec![128, 256, 512, 512, 1024, 1024]
}
fn layers() -> Vec<usize> {
    vec![3; 6]
}
fn multiscales() -> Vec<Vec<usize>> {
    vec![vec![], vec![], vec![], vec![5], vec![5], vec![5]]
}
fn pixel_shuffle() -> String {
    "pixel_shuffle".into()
}
fn rms_norm() -> PerLevel<String> {
    PerLevel::One("rms_norm".into())
}
fn silu() -> PerLevel<String> {
    PerLevel::One("silu".into())
}
fn relu() -> String {
    "relu".into()
}
fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

impl DcAeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_checked_config(path, "DC-AE config", Self::check)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let n = self.decoder_block_out_channels.len();
        if n == 0 {
            return Err("decoder_block_out_channels is empty".into());
        }
        let per_level = [
            ("decoder_layers_per_block", self.decoder_layers_per_block.len()),
            ("decoder_qkv_multiscales", self.decoder_qkv_multiscales.len()),
            ("decoder_block_types", self.block_types().len()),
            ("decoder_norm_types", self.norm_types().len()),
            ("decoder_act_fns", self.act_fns().len()),
        ];
        if let Some((name, len)) = per_level.iter().find(|(_, len)| *len != n) {
            return Err(format!("{name} has {len} entries for {n} levels"));
        }
        if self.decoder_layers_per_block[0] == 0 {
            return Err("decoder_layers_per_block[0] = 0 (a pixel-shuffle conv_out) is not supported".into());
        }
        if !matches!(self.upsample_block_type.as_str(), "pixel_shuffle" | "interpolate") {
            return Err(format!(
                "upsample_block_type \"{}\" is not supported (pixel_shuffle, interpolate)",
                self.upsample_block_type
            ));
        }
        for t in self.block_types() {
            if t != "ResBlock" && t != "EfficientViTBlock" {
                return Err(format!("decoder block type \"{t}\" is not supported (ResBlock, EfficientViTBlock)"));
            }
        }
        for t in self.norm_types() {
            if t != "rms_norm" && t != "batch_norm" {
                return Err(format!("decoder norm type \"{t}\" is not supported (rms_norm, batch_norm)"));
            }
        }
        for a in self.act_fns().iter().chain([&self.decoder_conv_act_fn]) {
            Activation::parse(a)?;
        }
        let widths = &self.decoder_block_out_channels;
        if widths.contains(&0) || self.latent_channels == 0 || self.attention_head_dim == 0 {
            return Err("channel counts and the head width must be positive".into());
        }
        if self.decoder_in_shortcut && !widths[n - 1].is_multiple_of(self.latent_channels) {
            return Err(format!("the deepest width {} is not a multiple of latent_channels", widths[n - 1]));
        }
        for i in 0..n - 1 {
            if !(4 * widths[i]).is_multiple_of(widths[i + 1]) {
                return Err(format!(
                    "level {i}: the up-sampling shortcut needs 4 x {} divisible by {}",
                    widths[i],
                    widths[i + 1]
                ));
            }
        }
        Ok(())
    }

    fn block_types(&self) -> Vec<String> {
        self.decoder_block_types.expand(self.decoder_block_out_channels.len())
    }
    fn norm_types(&self) -> Vec<String> {
        self.decoder_norm_types.expand(self.decoder_block_out_channels.len())
    }
    fn act_fns(&self) -> Vec<String> {
        self.decoder_act_fns.expand(self.decoder_block_out_channels.len())
    }

    /// Pixels per latent along each side: 2 per level below the first.
    pub fn spatial_factor(&self) -> usize {
        1 << (self.decoder_block_out_channels.len() - 1)
    }
}

enum Layer {
    Up(UpBlock),
    Res(ResBlock),
    // Boxed: a ViT block's linear layers make it the one large variant.
    Vit(Box<EfficientVitBlock>),
}

impl Layer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Layer::Up(b) => b.forward(x),
            Layer::Res(b) => b.forward(x),
            Layer::Vit(b) => b.forward(x),
        }
    }
}

pub struct DcAeDecoder {
    conv_in: Conv2d,
    in_repeats: Option<usize>,
    /// In run order: the deepest level first.
    layers: Vec<Layer>,
    norm_out: crate::models::sana::conv::RmsNorm,
    conv_act: Activation,
    conv_out: Conv2d,
}

impl DcAeDecoder {
    pub fn new(c: &DcAeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let widths = &c.decoder_block_out_channels;
        let n = widths.len();
        let (types, norms, acts) = (c.block_types(), c.norm_types(), c.act_fns());
        let act = |s: &str| Activation::parse(s).map_err(candle_core::Error::msg);
        let mut layers = Vec::new();
        for i in (0..n).rev() {
            let level = vb.pp(format!("up_blocks.{i}"));
            let count = c.decoder_layers_per_block[i];
            let mut j = 0;
            if i < n - 1 && count > 0 {
                let interpolate = c.upsample_block_type == "interpolate";
                layers.push(Layer::Up(UpBlock::new(widths[i + 1], widths[i], interpolate, level.pp("0"))?));
                j = 1;
            }
            for k in j..j + count {
                let vb = level.pp(k.to_string());
                layers.push(if types[i] == "EfficientViTBlock" {
                    Layer::Vit(Box::new(EfficientVitBlock::new(
                        widths[i],
                        c.attention_head_dim,
                        &c.decoder_qkv_multiscales[i],
                        &norms[i],
                        vb,
                    )?))
                } else {
                    Layer::Res(ResBlock::new(widths[i], &norms[i], act(&acts[i])?, vb)?)
                });
            }
        }
        Ok(Self {
            conv_in: conv3x3(c.latent_channels, widths[n - 1], true, vb.pp("conv_in"))?,
            in_repeats: c.decoder_in_shortcut.then(|| widths[n - 1] / c.latent_channels),
            layers,
            norm_out: crate::models::sana::conv::RmsNorm::new(widths[0], 1e-5, true, vb.pp("norm_out"))?,
            conv_act: act(&c.decoder_conv_act_fn)?,
            conv_out: conv3x3(widths[0], c.in_channels, true, vb.pp("conv_out"))?,
        })
    }

    /// `[B, latent_channels, h, w]` -> `[B, in_channels, h f, w f]`.
    pub fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(z)?;
        if let Some(n) = self.in_repeats {
            x = (x + repeat_channels(z, n)?)?;
        }
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let x = channels_first(&self.norm_out.forward(&channels_last(&x)?)?)?;
        self.conv_out.forward(&self.conv_act.apply(&x)?)
    }
}

/// The DC-AE with its decoder loaded (the encoder's weights are not read).
pub struct AutoencoderDc {
    decoder: DcAeDecoder,
    config: DcAeConfig,
    device: Device,
    dtype: DType,
    dir: PathBuf,
}

impl AutoencoderDc {
    /// From a component's config and weights. On the CPU it runs in f32 (candle's CPU
    /// convolutions have no half precision).
    pub fn load_weights(weights: &ComponentWeights, device: &Device, dtype: DType) -> Result<Self> {
        let dtype = if device.is_cpu() { DType::F32 } else { dtype };
        let dir = PathBuf::from(weights.origin());
        let config = DcAeConfig::from_file(weights.config_path())?;
        let vb = weights.var_builder(dtype, device)?;
        let decoder = DcAeDecoder::new(&config, vb.pp("decoder")).map_err(|e| Error::BadModelFile {
            path: dir.display().to_string(),
            reason: format!("DC-AE weights do not match config.json: {e}"),
        })?;
        Ok(Self { decoder, config, device: device.clone(), dtype, dir })
    }

    pub fn config(&self) -> &DcAeConfig {
        &self.config
    }

    /// diffusers' `AutoencoderDC.decode`: the latents as they are (no scaling), `[B, 3, h f, w f]` f32.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = z.dims4().map_err(|_| {
            Error::invalid(format!("DC-AE latents must be [batch, channels, height, width], got {:?}", z.dims()))
        })?;
        if c != self.config.latent_channels || h == 0 || w == 0 {
            return Err(Error::invalid(format!(
                "DC-AE in {} expects [batch, {}, h, w] latents, got {:?}",
                self.dir.display(),
                self.config.latent_channels,
                z.dims()
            )));
        }
        let z = z.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(self.decoder.forward(&z)?.to_dtype(DType::F32)?)
    }

    /// Denoiser-space latents to pixels: `decode(latents / scaling_factor)`, as SANA's pipeline does.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&latents.to_dtype(DType::F32)?.affine(1.0 / self.config.scaling_factor, 0.0)?)
    }
}
