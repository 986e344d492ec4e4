//! `PixArtTransformer2DModel` (PixArt-Sigma): a DiT with adaLN-single. Latent patches with a
//! sin-cos position table, a stack of [`blocks::PixArtBlock`] (self-attention, cross-attention to
//! the projected T5 caption, GELU feed-forward, all modulated by one shared timestep embedding
//! plus a per-block table), then a final modulated norm and the unpatchify.

pub mod blocks;
pub mod embeddings;

use std::ops::Range;
use std::path::Path;

use crate::models::layers::{dense, Linear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::guidance::NegativeContext;
use crate::loading::config::read_checked_config;
use crate::models::layers::{layer_norm, modulate_normed};
use crate::models::mmdit::embeddings::unpatchify;
use blocks::{BlockInputs, Caption, NegativeCaption, PixArtBlock};
use embeddings::{AdaLayerNormSingle, CaptionProjection, PatchEmbed};

/// `transformer/config.json`, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct PixArtConfig {
    #[serde(default = "d16")]
    pub num_attention_heads: usize,
    #[serde(default = "d72")]
    pub attention_head_dim: usize,
    #[serde(default = "d4")]
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    #[serde(default = "d28")]
    pub num_layers: usize,
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "d128")]
    pub sample_size: usize,
    #[serde(default = "d2")]
    pub patch_size: usize,
    pub interpolation_scale: Option<f64>,
    pub use_additional_conditions: Option<bool>,
    pub caption_channels: Option<usize>,
    #[serde(default = "ada_norm_single")]
    pub norm_type: String,
    #[serde(default = "gelu_approximate")]
    pub activation_fn: String,
    #[serde(default = "yes")]
    pub attention_bias: bool,
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    #[serde(default)]
    pub upcast_attention: bool,
}

fn d16() -> usize {
    16
}
fn d72() -> usize {
    72
}
fn d4() -> usize {
    4
}
fn d28() -> usize {
    28
}
fn d128() -> usize {
    128
}
fn d2() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn ada_norm_single() -> String {
    "ada_norm_single".into()
}
fn gelu_approximate() -> String {
    "gelu-approximate".into()
}

impl PixArtConfig {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        read_checked_config(path, "PixArt transformer config", Self::check)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let unsupported = |what: String| Err(format!("{what} is not supported (PixArt-Sigma's transformer has not)"));
        if self.norm_type != "ada_norm_single" {
            return unsupported(format!("norm_type \"{}\"", self.norm_type));
        }
        if self.activation_fn != "gelu-approximate" {
            return unsupported(format!("activation_fn \"{}\"", self.activation_fn));
        }
        if !self.attention_bias || self.norm_elementwise_affine || self.upcast_attention {
            return unsupported("attention_bias false, norm_elementwise_affine or upcast_attention".into());
        }
        if self.additional_conditions() {
            return Err("use_additional_conditions (PixArt-alpha's resolution and aspect-ratio embedding) is not \
                        supported: PixArt-Sigma pipelines pass none"
                .into());
        }
        if self.caption_channels.is_none() {
            return Err("caption_channels is missing (the T5 width the caption projection takes)".into());
        }
        if self.cross_attention_dim.is_some_and(|c| c != self.inner_dim()) {
            return unsupported("a cross_attention_dim other than the inner width".into());
        }
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 || self.patch_size == 0 {
            return Err("heads, head width and patch size must be positive".into());
        }
        if !self.inner_dim().is_multiple_of(4) {
            return Err(format!("inner width {} is not divisible by 4 (the position table)", self.inner_dim()));
        }
        Ok(())
    }

    /// diffusers: `use_additional_conditions` defaults to `sample_size == 128`.
    pub fn additional_conditions(&self) -> bool {
        self.use_additional_conditions.unwrap_or(self.sample_size == 128)
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// diffusers: `interpolation_scale` defaults to `max(sample_size // 64, 1)`.
    pub fn interpolation_scale(&self) -> f64 {
        self.interpolation_scale.unwrap_or((self.sample_size / 64).max(1) as f64)
    }

    /// The T5 width the caption projection takes.
    pub fn caption_channels(&self) -> usize {
        self.caption_channels.unwrap_or(0)
    }
}

/// PAG: rows whose self-attention is the identity in the selected blocks.
#[derive(Clone)]
pub struct Perturbation<'a> {
    pub rows: Range<usize>,
    /// Block indices (`transformer_blocks.{i}.attn1`).
    pub blocks: &'a [usize],
}

/// One transformer call.
pub struct PixArtInputs<'a> {
    /// `[B, in_channels, h, w]` latents.
    pub latents: &'a Tensor,
    /// The timestep (0..1000 scale), the same for every row.
    pub timestep: f64,
    /// T5 states `[B, L, caption_channels]`; row `i` has `caption_lens[i]` real tokens.
    pub caption: &'a Tensor,
    pub caption_lens: &'a [usize],
    /// The negative caption (T5 states, all tokens real) for the guided rows.
    pub guidance: Option<&'a NegativeContext<'a>>,
    pub perturbation: Option<Perturbation<'a>>,
}

pub struct PixArtTransformer2DModel {
    pos_embed: PatchEmbed,
    adaln_single: AdaLayerNormSingle,
    caption_projection: CaptionProjection,
    blocks: Vec<PixArtBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
    config: PixArtConfig,
}

impl PixArtTransformer2DModel {
    pub fn new(config: &PixArtConfig, vb: VarBuilder) -> Result<Self> {
        let dim = config.inner_dim();
        let p = config.patch_size;
        let blocks = (0..config.num_layers)
            .map(|i| {
                PixArtBlock::new(
                    dim,
                    config.num_attention_heads,
                    config.attention_head_dim,
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            pos_embed: PatchEmbed::new(
                config.in_channels,
                dim,
                p,
                config.sample_size / p,
                config.interpolation_scale(),
                vb.pp("pos_embed"),
            )?,
            adaln_single: AdaLayerNormSingle::new(dim, vb.pp("adaln_single"))?,
            caption_projection: CaptionProjection::new(config.caption_channels(), dim, vb.pp("caption_projection"))?,
            blocks,
            scale_shift_table: vb.get((2, dim), "scale_shift_table")?,
            proj_out: dense(dim, p * p * config.out_channels(), true, vb.pp("proj_out"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &PixArtConfig {
        &self.config
    }

    /// The self-attention layer names (`transformer_blocks.{i}.attn1`), for PAG's selection.
    pub fn self_attention_layers(&self) -> Vec<String> {
        (0..self.blocks.len()).map(|i| format!("transformer_blocks.{i}.attn1")).collect()
    }

    /// The output `[B, out_channels, h, w]` (with learned sigma: noise, then variance channels).
    pub fn forward(&self, inputs: &PixArtInputs) -> Result<Tensor> {
        self.forward_traced(inputs, None)
    }

    /// As [`Self::forward`], recording every block's output when `trace` is given.
    pub fn forward_traced(&self, inputs: &PixArtInputs, mut trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let x = inputs.latents;
        let (b, _, h, w) = x.dims4()?;
        let p = self.config.patch_size;
        if h % p != 0 || w % p != 0 {
            candle_core::bail!("a {h}x{w} latent grid does not split into {p}x{p} patches");
        }
        if inputs.caption_lens.len() != b || inputs.caption.dim(0)? != b {
            candle_core::bail!("{b} latent rows, {} caption rows", inputs.caption_lens.len());
        }
        if let Some(g) = inputs.guidance {
            g.check_rows(b)?;
        }
        let dtype = self.scale_shift_table.dtype();
        let mut tokens = self.pos_embed.forward(&x.to_dtype(dtype)?)?;
        let t = Tensor::full(inputs.timestep as f32, b, x.device())?;
        let (temb, embedded) = self.adaln_single.forward(&t, dtype)?;
        let states = self.caption_projection.forward(&inputs.caption.to_dtype(dtype)?)?;
        let caption = Caption { states: &states, lens: inputs.caption_lens };
        let negative_states =
            inputs.guidance.map(|g| self.caption_projection.forward(&g.states.to_dtype(dtype)?)).transpose()?;
        let negative = match (inputs.guidance, &negative_states) {
            (Some(g), Some(states)) => Some(NegativeCaption { method: g.method, states, rows: g.rows.clone() }),
            _ => None,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let identity = inputs.perturbation.as_ref().filter(|p| p.blocks.contains(&i)).map(|p| &p.rows);
            tokens = block.forward(
                &tokens,
                &BlockInputs { temb: &temb, caption: &caption, negative: negative.as_ref(), identity },
            )?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(tokens.clone());
            }
        }
        // Output layer: shift first, then scale (the reverse of AdaLayerNormContinuous).
        let m = self.scale_shift_table.unsqueeze(0)?.broadcast_add(&embedded.unsqueeze(1)?)?;
        let (shift, scale) = (m.narrow(1, 0, 1)?.squeeze(1)?, m.narrow(1, 1, 1)?.squeeze(1)?);
        let out = self.proj_out.forward(&modulate_normed(&layer_norm(&tokens)?, &shift, &scale)?)?;
        unpatchify(&out, h, w, p)?.to_dtype(DType::F32)
    }
}
