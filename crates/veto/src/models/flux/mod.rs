//! The Flux transformer (diffusers `FluxTransformer2DModel`), config-driven, with negative-text
//! attention guidance (NAG / NASA) following the official diffusers NAG implementation. See
//! [`blocks`] for the guided data flow.

pub mod blocks;
pub mod embeddings;
pub mod latents;

use crate::error::Result;
use crate::guidance::{NagVariant, NegativeContext};
use crate::loading::config::read_checked_config;
use crate::loading::weights::ComponentWeights;
use crate::models::layers::{linear, AdaNormContinuous, Linear, QuantizedWeights, TimeTextEmbed};
use crate::profile;
use blocks::{DoubleBlock, SingleBlock, Temb, TextStreams};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use embeddings::Rope;
use serde::Deserialize;
use std::path::Path;

/// `transformer/config.json`, with the real FLUX.1 values as defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct FluxConfig {
    #[serde(default = "one")]
    pub patch_size: usize,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "d_num_layers")]
    pub num_layers: usize,
    #[serde(default = "d_num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_joint_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "d_pooled_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}
fn d_in_channels() -> usize {
    64
}
fn d_num_layers() -> usize {
    19
}
fn d_num_single_layers() -> usize {
    38
}
fn d_head_dim() -> usize {
    128
}
fn d_heads() -> usize {
    24
}
fn d_joint_dim() -> usize {
    4096
}
fn d_pooled_dim() -> usize {
    768
}
fn d_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

impl FluxConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_checked_config(path, "Flux transformer config", Self::check)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.patch_size != 1 {
            return Err(format!("patch_size {} is not supported (Flux uses 1)", self.patch_size));
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.attention_head_dim {
            return Err(format!(
                "axes_dims_rope {:?} sum to {rope}, attention_head_dim is {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return Err(format!("axes_dims_rope {:?} must be even", self.axes_dims_rope));
        }
        Ok(())
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Latent channels before 2x2 packing.
    pub fn latent_channels(&self) -> usize {
        self.in_channels / 4
    }
}

/// The text conditioning of one prompt: T5 states `[B, T, joint_dim]`, pooled CLIP `[B, pooled]`.
#[derive(Clone)]
pub struct TextConditioning {
    pub hidden: Tensor,
    pub pooled: Tensor,
}

impl TextConditioning {
    /// `self` and `other` as one batch (rows of `self` first): batched CFG's `[positive, negative]`.
    pub fn batch_with(&self, other: &TextConditioning) -> candle_core::Result<TextConditioning> {
        Ok(TextConditioning {
            hidden: Tensor::cat(&[&self.hidden, &other.hidden], 0)?,
            pooled: Tensor::cat(&[&self.pooled, &other.pooled], 0)?,
        })
    }
}

/// Inputs of one transformer call.
pub struct FluxInputs<'a> {
    /// Packed latents `[B, L, in_channels]`.
    pub latents: &'a Tensor,
    /// `[L, 3]` and `[T, 3]` positions.
    pub img_ids: &'a Tensor,
    pub txt_ids: &'a Tensor,
    /// Timestep as diffusers passes it to the model (sigma, in [0, 1]), `[B]`.
    pub timestep: &'a Tensor,
    /// Embedded guidance (guidance-distilled models), unscaled, `[B]`.
    pub guidance: Option<&'a Tensor>,
    pub positive: &'a TextConditioning,
    /// The negative prompt (T5 states and pooled CLIP vector) and this step's attention
    /// method (NAG or NASA), guiding every row of the batch.
    pub negative: Option<&'a NegativeContext<'a>>,
    /// The data flow of the negative branch in the single blocks (official by default).
    pub nag_variant: NagVariant,
}

/// Named intermediate tensors, for parity tests and debugging.
pub type Trace = Vec<(String, Tensor)>;

pub struct FluxTransformer {
    x_embedder: Linear,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: AdaNormContinuous,
    proj_out: Linear,
    config: FluxConfig,
}

impl FluxTransformer {
    /// The model with dense weights from `vb`.
    pub fn new(config: &FluxConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::new_quantized(config, vb, &QuantizedWeights::none())
    }

    /// The model from a component's weights (quantized layers where the checkpoint is).
    pub fn load(
        config: &FluxConfig,
        weights: &ComponentWeights,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let (vb, q) = weights.model_weights(dtype, device)?;
        Self::new_quantized(config, vb, &q).map_err(|e| weights.mismatch("transformer", e))
    }

    /// The model with its big matmuls taken from `q` where it holds them in ggml blocks.
    pub fn new_quantized(config: &FluxConfig, vb: VarBuilder, q: &QuantizedWeights) -> candle_core::Result<Self> {
        let dim = config.inner_dim();
        let heads = config.num_attention_heads;
        let double_blocks = (0..config.num_layers)
            .map(|i| DoubleBlock::new(dim, heads, vb.pp(format!("transformer_blocks.{i}")), q))
            .collect::<candle_core::Result<_>>()?;
        let single_blocks = (0..config.num_single_layers)
            .map(|i| SingleBlock::new(dim, heads, vb.pp(format!("single_transformer_blocks.{i}")), q))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            x_embedder: linear(config.in_channels, dim, vb.pp("x_embedder"), q)?,
            time_text_embed: TimeTextEmbed::new(
                dim,
                config.pooled_projection_dim,
                config.guidance_embeds,
                vb.pp("time_text_embed"),
                q,
            )?,
            context_embedder: linear(config.joint_attention_dim, dim, vb.pp("context_embedder"), q)?,
            double_blocks,
            single_blocks,
            norm_out: AdaNormContinuous::new(dim, vb.pp("norm_out"), q)?,
            proj_out: linear(dim, config.out_channels(), vb.pp("proj_out"), q)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// The conditioning vector of one prompt: diffusers multiplies the incoming timestep and
    /// guidance by 1000 inside the model, in the model dtype; so do we.
    fn temb(&self, inputs: &FluxInputs, pooled: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = pooled.dtype();
        let t = (inputs.timestep.to_dtype(dtype)? * 1000.0)?;
        let g = match inputs.guidance {
            Some(g) if self.time_text_embed.has_guidance() => Some((g.to_dtype(dtype)? * 1000.0)?),
            _ => None,
        };
        self.time_text_embed.forward(&t, g.as_ref(), pooled)
    }

    /// Predicted velocity `[B, L, out_channels]`.
    pub fn forward(&self, inputs: &FluxInputs) -> Result<Tensor> {
        Ok(self.forward_traced(inputs, None)?)
    }

    /// As [`forward`](Self::forward), recording the streams after every block when `trace` is given.
    pub fn forward_traced(&self, inputs: &FluxInputs, mut trace: Option<&mut Trace>) -> candle_core::Result<Tensor> {
        if self.time_text_embed.has_guidance() && inputs.guidance.is_none() {
            candle_core::bail!("this Flux model embeds guidance: a guidance scale is required");
        }
        let b = inputs.latents.dim(0)?;
        let (method, contrast, negative) = match inputs.negative {
            None => (None, None, None),
            Some(n) => {
                n.check_rows(b)?;
                if n.rows != (0..b) {
                    candle_core::bail!("Flux guides every row of the batch, got rows {:?} of {b}", n.rows);
                }
                let Some(contrast) = n.method.contrast() else {
                    candle_core::bail!("Flux supports NAG and NASA, not VSF");
                };
                let pooled = n
                    .pooled
                    .ok_or_else(|| candle_core::Error::Msg("Flux NAG needs the negative pooled vector".into()))?;
                (Some(n.method), Some(contrast), Some((n.states, pooled)))
            }
        };
        let dtype = inputs.latents.dtype();
        let rope = Rope::new(
            &profile::cat(&[inputs.txt_ids, inputs.img_ids], 0)?,
            &self.config.axes_dims_rope,
            10000.0,
            dtype,
        )?;
        let text_len = inputs.txt_ids.dim(0)?;
        let image_len = inputs.img_ids.dim(0)?;
        let rope_txt = rope.narrow(0, text_len)?;
        let rope_img = rope.narrow(text_len, image_len)?;

        let temb_pos = self.temb(inputs, &inputs.positive.pooled)?;
        let temb_neg = negative.map(|(_, pooled)| self.temb(inputs, pooled)).transpose()?;

        let mut img = self.x_embedder.forward(inputs.latents)?;
        let mut txt = TextStreams {
            pos: self.context_embedder.forward(&inputs.positive.hidden)?,
            neg: negative.map(|(states, _)| self.context_embedder.forward(states)).transpose()?,
        };
        if let Some(n) = &txt.neg {
            if n.dims() != txt.pos.dims() {
                candle_core::bail!(
                    "negative text {:?} and positive text {:?} must have the same shape",
                    n.dims(),
                    txt.pos.dims()
                );
            }
        }
        let temb = Temb { pos: &temb_pos, neg: temb_neg.as_ref() };
        for (i, block) in self.double_blocks.iter().enumerate() {
            let (next_img, next_txt) = block.forward(&img, &txt, &temb, &rope_txt, &rope_img, method)?;
            img = next_img;
            txt = next_txt;
            if let Some(tr) = trace.as_deref_mut() {
                tr.push((format!("double_{i}_img"), img.clone()));
                tr.push((format!("double_{i}_txt"), txt.pos.clone()));
                if let Some(n) = &txt.neg {
                    tr.push((format!("double_{i}_txt_neg"), n.clone()));
                }
            }
        }

        let pos_seq = profile::cat(&[&txt.pos, &img], 1)?;
        // Shared-image variant: one image stream, the negative text beside it.
        if let (NagVariant::SharedImage, Some(method), Some(neg), Some(tn)) =
            (inputs.nag_variant, method, &txt.neg, &temb_neg)
        {
            let (mut x, mut neg_txt) = (pos_seq, neg.clone());
            for (i, block) in self.single_blocks.iter().enumerate() {
                (x, neg_txt) = block.forward_shared_image(&x, &neg_txt, &temb_pos, tn, &rope, &rope_txt, method)?;
                if let Some(tr) = trace.as_deref_mut() {
                    tr.push((format!("single_{i}"), x.clone()));
                }
            }
            let img = x.narrow(1, text_len, image_len)?;
            return self.proj_out.forward(&self.norm_out.forward(&img, &temb_pos)?);
        }
        // Single blocks: [text ; image] per half; under guidance the halves stack on the batch.
        let (mut x, temb_single) = match (&txt.neg, &temb_neg) {
            (Some(neg), Some(tn)) => {
                (profile::cat(&[&pos_seq, &profile::cat(&[neg, &img], 1)?], 0)?, profile::cat(&[&temb_pos, tn], 0)?)
            }
            _ => (pos_seq, temb_pos.clone()),
        };
        for (i, block) in self.single_blocks.iter().enumerate() {
            x = block.forward(&x, &temb_single, text_len, &rope, contrast)?;
            if let Some(tr) = trace.as_deref_mut() {
                tr.push((format!("single_{i}"), x.clone()));
            }
        }

        let img = x.narrow(0, 0, b)?.narrow(1, text_len, image_len)?;
        self.proj_out.forward(&self.norm_out.forward(&img, &temb_pos)?)
    }

    pub fn dtype_hint(&self) -> DType {
        self.proj_out.dtype()
    }
}
