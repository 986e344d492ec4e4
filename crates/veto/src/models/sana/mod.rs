//! `SanaTransformer2DModel` (SANA 1.0 / 1.5): a DiT with adaLN-single whose self-attention is
//! linear (ReLU kernel) and whose feed-forward is a Mix-FFN with a depthwise convolution. Latent
//! patches (a sin-cos position table only when the config sets `interpolation_scale`), the
//! caption projected and RMS-normed, a stack of [`blocks::SanaBlock`], a final modulated norm
//! and the unpatchify.

pub mod blocks;
pub mod conv;

use std::path::Path;

use crate::models::layers::{dense, Linear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::guidance::NegativeContext;
use crate::loading::config::read_checked_config;
use crate::loading::quantized::QuantizedWeights;
use crate::models::layers::{layer_norm, modulate_normed, timestep_features, MlpEmbedder};
use crate::models::mmdit::embeddings::unpatchify;
use crate::models::pixart::blocks::{Caption, NegativeCaption};
use crate::models::pixart::embeddings::{sincos_grid, AdaLayerNormSingle, CaptionProjection};
pub use crate::models::pixart::Perturbation;
use blocks::{BlockInputs, BlockShape, SanaBlock};
use conv::RmsNorm;

/// `transformer/config.json`, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct SanaConfig {
    #[serde(default = "d32")]
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    #[serde(default = "d70")]
    pub num_attention_heads: usize,
    #[serde(default = "d32")]
    pub attention_head_dim: usize,
    #[serde(default = "d20")]
    pub num_layers: usize,
    #[serde(default = "cross_heads")]
    pub num_cross_attention_heads: Option<usize>,
    #[serde(default = "cross_head_dim")]
    pub cross_attention_head_dim: Option<usize>,
    #[serde(default = "cross_dim")]
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "gemma2_width")]
    pub caption_channels: usize,
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "d32")]
    pub sample_size: usize,
    #[serde(default = "d1")]
    pub patch_size: usize,
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    pub interpolation_scale: Option<f64>,
    /// SANA-Sprint: a guidance embedding added to the timestep's.
    #[serde(default)]
    pub guidance_embeds: bool,
    /// The pipeline multiplies its guidance scale by this before the embedding.
    #[serde(default = "guidance_embeds_scale")]
    pub guidance_embeds_scale: f64,
    /// `"rms_norm_across_heads"` (SANA 1.5 / Sprint) or none.
    pub qk_norm: Option<String>,
    /// The pipeline multiplies the timestep by this (SANA-Sprint); the model itself does not.
    #[serde(default = "one")]
    pub timestep_scale: f64,
}

fn d1() -> usize {
    1
}
fn d20() -> usize {
    20
}
fn d32() -> usize {
    32
}
fn d70() -> usize {
    70
}
fn cross_heads() -> Option<usize> {
    Some(20)
}
fn cross_head_dim() -> Option<usize> {
    Some(112)
}
fn cross_dim() -> Option<usize> {
    Some(2240)
}
fn gemma2_width() -> usize {
    2304
}
fn mlp_ratio() -> f64 {
    2.5
}
fn norm_eps() -> f64 {
    1e-6
}
fn one() -> f64 {
    1.0
}
fn guidance_embeds_scale() -> f64 {
    0.1
}

impl SanaConfig {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        read_checked_config(path, "SANA transformer config", Self::check)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if let Some(norm) = self.qk_norm.as_deref().filter(|n| *n != "rms_norm_across_heads") {
            return Err(format!("qk_norm \"{norm}\" is not supported (only \"rms_norm_across_heads\", SANA 1.5's)"));
        }
        if self.norm_elementwise_affine || self.norm_eps != 1e-6 {
            return Err("only norm_elementwise_affine false with norm_eps 1e-6 is supported (SANA's configs)".into());
        }
        let (Some(heads), Some(head_dim), Some(context)) =
            (self.num_cross_attention_heads, self.cross_attention_head_dim, self.cross_attention_dim)
        else {
            return Err("a transformer without cross-attention (num_cross_attention_heads, cross_attention_head_dim \
                        or cross_attention_dim null) is not supported"
                .into());
        };
        if context != self.inner_dim() {
            return Err(format!(
                "cross_attention_dim {context} differs from the inner width {} the caption is projected to",
                self.inner_dim()
            ));
        }
        if heads == 0 || head_dim == 0 || self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return Err("attention heads and head widths must be positive".into());
        }
        if self.patch_size == 0 || self.ff_hidden() == 0 {
            return Err("patch_size and mlp_ratio must be positive".into());
        }
        if self.interpolation_scale.is_some() && !self.inner_dim().is_multiple_of(4) {
            return Err(format!("inner width {} is not divisible by 4 (the position table)", self.inner_dim()));
        }
        Ok(())
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// GLUMBConv's hidden width, `int(mlp_ratio * dim)`.
    pub fn ff_hidden(&self) -> usize {
        (self.mlp_ratio * self.inner_dim() as f64) as usize
    }
}

/// One transformer call.
pub struct SanaInputs<'a> {
    /// `[B, in_channels, h, w]` latents.
    pub latents: &'a Tensor,
    /// The timestep (0..1000 scale, after the pipeline's `timestep_scale`), the same for every row.
    pub timestep: f64,
    /// Text encoder states `[B, L, caption_channels]`; row `i` has `caption_lens[i]` real tokens.
    pub caption: &'a Tensor,
    pub caption_lens: &'a [usize],
    /// The negative caption (all tokens real) for the guided rows.
    pub guidance: Option<&'a NegativeContext<'a>>,
    /// SANA-Sprint's guidance embedding input (the pipeline's scale times
    /// `guidance_embeds_scale`); required exactly when the config has `guidance_embeds`.
    pub embedded_guidance: Option<f64>,
    /// PAG: rows whose self-attention is the identity in the selected blocks.
    pub perturbation: Option<Perturbation<'a>>,
}

/// adaLN-single's timestep embedding, or SANA-Sprint's timestep + guidance one.
enum TimeEmbed {
    Single(AdaLayerNormSingle),
    WithGuidance(TimestepGuidanceEmbedding),
}

/// diffusers' `SanaCombinedTimestepGuidanceEmbeddings`: the sum of two sinusoid-MLP embeddings
/// (timestep, guidance), then `linear(silu(.))` for the blocks' modulation.
struct TimestepGuidanceEmbedding {
    timestep_embedder: MlpEmbedder,
    guidance_embedder: MlpEmbedder,
    linear: Linear,
}

impl TimestepGuidanceEmbedding {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let none = QuantizedWeights::none();
        Ok(Self {
            timestep_embedder: MlpEmbedder::new(256, dim, vb.pp("timestep_embedder"), &none)?,
            guidance_embedder: MlpEmbedder::new(256, dim, vb.pp("guidance_embedder"), &none)?,
            linear: dense(dim, 6 * dim, true, vb.pp("linear"))?,
        })
    }

    /// As [`AdaLayerNormSingle::forward`], with the guidance `[B]` added.
    fn forward(&self, t: &Tensor, guidance: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let te = self.timestep_embedder.forward(&timestep_features(t, 256)?.to_dtype(dtype)?)?;
        let ge = self.guidance_embedder.forward(&timestep_features(guidance, 256)?.to_dtype(dtype)?)?;
        let e = (te + ge)?;
        Ok((self.linear.forward(&e.silu()?)?, e))
    }
}

pub struct SanaTransformer2DModel {
    patch_proj: Linear,
    time_embed: TimeEmbed,
    caption_projection: CaptionProjection,
    caption_norm: RmsNorm,
    blocks: Vec<SanaBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
    config: SanaConfig,
}

impl SanaTransformer2DModel {
    pub fn new(config: &SanaConfig, vb: VarBuilder) -> Result<Self> {
        let dim = config.inner_dim();
        let (p, c) = (config.patch_size, config.in_channels);
        let shape = BlockShape {
            dim,
            heads: config.num_attention_heads,
            head_dim: config.attention_head_dim,
            cross_heads: config.num_cross_attention_heads.unwrap_or(0),
            cross_head_dim: config.cross_attention_head_dim.unwrap_or(0),
            attention_bias: config.attention_bias,
            qk_norm: config.qk_norm.is_some(),
            ff_hidden: config.ff_hidden(),
        };
        let blocks = (0..config.num_layers)
            .map(|i| SanaBlock::new(&shape, vb.pp(format!("transformer_blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let pe = vb.pp("patch_embed.proj");
        let patch_proj = Linear::from_weights(
            pe.get((dim, c, p, p), "weight")?.reshape((dim, c * p * p))?,
            Some(pe.get(dim, "bias")?),
        );
        Ok(Self {
            patch_proj,
            time_embed: if config.guidance_embeds {
                TimeEmbed::WithGuidance(TimestepGuidanceEmbedding::new(dim, vb.pp("time_embed"))?)
            } else {
                TimeEmbed::Single(AdaLayerNormSingle::new(dim, vb.pp("time_embed"))?)
            },
            caption_projection: CaptionProjection::new(config.caption_channels, dim, vb.pp("caption_projection"))?,
            caption_norm: RmsNorm::new(dim, 1e-5, false, vb.pp("caption_norm"))?,
            blocks,
            scale_shift_table: vb.get((2, dim), "scale_shift_table")?,
            proj_out: dense(dim, p * p * config.out_channels(), true, vb.pp("proj_out"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &SanaConfig {
        &self.config
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.scale_shift_table.dtype()
    }

    /// `[B, C, h, w]` latents -> `[B, (h/p)(w/p), dim]` tokens, row-major, plus the position
    /// table where the config has one (diffusers' `PatchEmbed`, base grid `sample_size / p`).
    fn patch_embed(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        let p = self.config.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches =
            latents.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, gh * gw, c * p * p))?;
        let tokens = self.patch_proj.forward(&patches)?;
        match self.config.interpolation_scale {
            None => Ok(tokens),
            Some(scale) => {
                let base = self.config.sample_size / p;
                let pos = sincos_grid(self.config.inner_dim(), gh, gw, base, scale, latents.device())?;
                tokens.broadcast_add(&pos.unsqueeze(0)?.to_dtype(tokens.dtype())?)
            }
        }
    }

    fn project_caption(&self, states: &Tensor, dtype: DType) -> Result<Tensor> {
        self.caption_norm.forward(&self.caption_projection.forward(&states.to_dtype(dtype)?)?)
    }

    /// The output `[B, out_channels, h, w]` (f32).
    pub fn forward(&self, inputs: &SanaInputs) -> Result<Tensor> {
        self.forward_traced(inputs, None)
    }

    /// As [`Self::forward`], recording every block's output when `trace` is given.
    pub fn forward_traced(&self, inputs: &SanaInputs, mut trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
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
        let mut tokens = self.patch_embed(&x.to_dtype(dtype)?)?;
        let t = Tensor::full(inputs.timestep as f32, b, x.device())?;
        let (temb, embedded) = match (&self.time_embed, inputs.embedded_guidance) {
            (TimeEmbed::Single(e), None) => e.forward(&t, dtype)?,
            (TimeEmbed::WithGuidance(e), Some(g)) => e.forward(&t, &Tensor::full(g as f32, b, x.device())?, dtype)?,
            (TimeEmbed::Single(_), Some(_)) => {
                candle_core::bail!("a guidance value given to a model without guidance_embeds")
            }
            (TimeEmbed::WithGuidance(_), None) => {
                candle_core::bail!("this model has guidance_embeds: it needs a guidance value")
            }
        };
        let states = self.project_caption(inputs.caption, dtype)?;
        let caption = Caption { states: &states, lens: inputs.caption_lens };
        let negative_states = inputs.guidance.map(|g| self.project_caption(g.states, dtype)).transpose()?;
        let negative = match (inputs.guidance, &negative_states) {
            (Some(g), Some(states)) => Some(NegativeCaption { method: g.method, states, rows: g.rows.clone() }),
            _ => None,
        };
        let grid = (h / p, w / p);
        for (i, block) in self.blocks.iter().enumerate() {
            let identity = inputs.perturbation.as_ref().filter(|p| p.blocks.contains(&i)).map(|p| &p.rows);
            let block_inputs =
                BlockInputs { temb: &temb, caption: &caption, negative: negative.as_ref(), grid, identity };
            tokens = block.forward(&tokens, &block_inputs)?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(tokens.clone());
            }
        }
        // SanaModulatedNorm: shift first, then scale.
        let m = self.scale_shift_table.unsqueeze(0)?.broadcast_add(&embedded.unsqueeze(1)?)?;
        let (shift, scale) = (m.narrow(1, 0, 1)?.squeeze(1)?, m.narrow(1, 1, 1)?.squeeze(1)?);
        let out = self.proj_out.forward(&modulate_normed(&layer_norm(&tokens)?, &shift, &scale)?)?;
        unpatchify(&out, h, w, p)?.to_dtype(DType::F32)
    }
}
