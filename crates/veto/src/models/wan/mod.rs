//! `WanTransformer3DModel` (Wan2.1 T2V 1.3B / 14B, I2V 14B), config-driven from the component's
//! `config.json`: the latent video `[B, C, F, H, W]` is cut into (1, 2, 2) patches, run through
//! [`blocks::WanBlock`]s (self-attention with 3-D RoPE, cross-attention to the UMT5 text and, for
//! I2V, the CLIP image tokens, feed-forward; all modulated by the timestep), then a modulated
//! final norm, `proj_out` and the unpatchify give the flow velocity in the latent's shape.
//!
//! Weights use diffusers' names. Negative-prompt guidance enters through the cross-attention
//! only ([`blocks::WanAttention::forward_cross`]), as the official NAG and VSF Wan code.

pub mod blocks;
pub mod embeddings;

use std::path::Path;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::guidance::NegativeContext;
use crate::loading::config::read_checked_config;
use crate::loading::weights::ComponentWeights;
use crate::models::layers::{linear, Linear, QuantizedWeights};
use blocks::{modulated_norm, BlockInputs, CrossContext, NegativeText, WanBlock};
use embeddings::{unpatchify, ConditionEmbedder, PatchEmbedding, Rope};

/// `transformer/config.json`, with diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct WanConfig {
    #[serde(default = "default_patch")]
    pub patch_size: Vec<usize>,
    #[serde(default = "d40")]
    pub num_attention_heads: usize,
    #[serde(default = "d128")]
    pub attention_head_dim: usize,
    #[serde(default = "d16")]
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    #[serde(default = "d4096")]
    pub text_dim: usize,
    #[serde(default = "d256")]
    pub freq_dim: usize,
    #[serde(default = "d13824")]
    pub ffn_dim: usize,
    #[serde(default = "d40")]
    pub num_layers: usize,
    #[serde(default = "yes")]
    pub cross_attn_norm: bool,
    #[serde(default = "rms_across_heads")]
    pub qk_norm: Option<String>,
    #[serde(default = "eps")]
    pub eps: f64,
    pub image_dim: Option<usize>,
    pub added_kv_proj_dim: Option<usize>,
    #[serde(default = "d1024")]
    pub rope_max_seq_len: usize,
    pub pos_embed_seq_len: Option<usize>,
}

fn default_patch() -> Vec<usize> {
    vec![1, 2, 2]
}
fn d40() -> usize {
    40
}
fn d128() -> usize {
    128
}
fn d16() -> usize {
    16
}
fn d4096() -> usize {
    4096
}
fn d256() -> usize {
    256
}
fn d13824() -> usize {
    13824
}
fn d1024() -> usize {
    1024
}
fn yes() -> bool {
    true
}
fn rms_across_heads() -> Option<String> {
    Some("rms_norm_across_heads".into())
}
fn eps() -> f64 {
    1e-6
}

impl WanConfig {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        read_checked_config(path, "Wan transformer config", Self::check)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.patch_size.len() != 3 || self.patch_size.contains(&0) {
            return Err(format!("patch_size {:?} is not three positive sizes", self.patch_size));
        }
        if self.qk_norm.as_deref() != Some("rms_norm_across_heads") {
            return Err(format!("qk_norm {:?} is not supported (Wan2.1 uses \"rms_norm_across_heads\")", self.qk_norm));
        }
        if self.num_attention_heads == 0 || self.attention_head_dim < 6 || !self.attention_head_dim.is_multiple_of(2) {
            return Err("heads must be positive and the head width even and at least 6 (3-D RoPE)".into());
        }
        if self.image_dim.is_some() != self.added_kv_proj_dim.is_some() {
            return Err("image_dim and added_kv_proj_dim come together (I2V) or not at all (T2V)".into());
        }
        Ok(())
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn patch(&self) -> [usize; 3] {
        [self.patch_size[0], self.patch_size[1], self.patch_size[2]]
    }

    /// Whether this is an image-to-video transformer (image embedder and added k/v).
    pub fn is_i2v(&self) -> bool {
        self.image_dim.is_some()
    }
}

/// One transformer call.
pub struct WanInputs<'a> {
    /// `[B, in_channels, F, H, W]` (I2V: the noisy latents, the mask and the image latents
    /// concatenated on channels, as the pipeline builds them).
    pub latents: &'a Tensor,
    /// The timestep (0..1000 scale), the same for every row.
    pub timestep: f64,
    /// UMT5 states `[B, L, text_dim]` (padded rows are zeros and are attended, as in Wan).
    pub context: &'a Tensor,
    /// CLIP vision states `[B or 1, 257, image_dim]` (I2V).
    pub image: Option<&'a Tensor>,
    /// The negative text for the guided rows and this step's attention method.
    pub guidance: Option<&'a NegativeContext<'a>>,
}

pub struct WanTransformer3DModel {
    patch_embedding: PatchEmbedding,
    condition_embedder: ConditionEmbedder,
    blocks: Vec<WanBlock>,
    scale_shift_table: Tensor,
    proj_out: Linear,
    config: WanConfig,
}

impl WanTransformer3DModel {
    /// The model with dense weights from `vb`.
    pub fn new(config: &WanConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_quantized(config, vb, &QuantizedWeights::none())
    }

    /// The model from a component's weights (quantized layers where the checkpoint is).
    pub fn load(
        config: &WanConfig,
        weights: &ComponentWeights,
        dtype: DType,
        device: &candle_core::Device,
    ) -> crate::Result<Self> {
        let (vb, q) = weights.model_weights(dtype, device)?;
        Self::new_quantized(config, vb, &q).map_err(|e| weights.mismatch("transformer", e))
    }

    /// The model with its big matmuls taken from `q` where it holds them in ggml blocks.
    pub fn new_quantized(config: &WanConfig, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        let dim = config.inner_dim();
        let patch = config.patch();
        let blocks = (0..config.num_layers)
            .map(|i| {
                WanBlock::new(
                    dim,
                    config.ffn_dim,
                    config.num_attention_heads,
                    config.cross_attn_norm,
                    config.eps,
                    config.added_kv_proj_dim,
                    vb.pp(format!("blocks.{i}")),
                    q,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding: PatchEmbedding::new(config.in_channels, dim, patch, vb.pp("patch_embedding"))?,
            condition_embedder: ConditionEmbedder::new(
                dim,
                config.freq_dim,
                config.text_dim,
                config.image_dim,
                config.pos_embed_seq_len,
                vb.pp("condition_embedder"),
                q,
            )?,
            blocks,
            scale_shift_table: vb.get((1, 2, dim), "scale_shift_table")?.to_dtype(DType::F32)?,
            proj_out: linear(dim, config.out_channels() * patch.iter().product::<usize>(), vb.pp("proj_out"), q)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &WanConfig {
        &self.config
    }

    /// The dtype the weights compute in.
    pub fn dtype(&self) -> DType {
        self.proj_out.dtype()
    }

    /// The flow velocity `[B, out_channels, F, H, W]` in f32.
    pub fn forward(&self, inputs: &WanInputs) -> Result<Tensor> {
        self.forward_traced(inputs, None)
    }

    /// As [`Self::forward`], recording every block's output when `trace` is given.
    pub fn forward_traced(&self, inputs: &WanInputs, mut trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let x = inputs.latents;
        let (b, c, f, h, w) = x.dims5()?;
        let patch = self.config.patch();
        if c != self.config.in_channels {
            candle_core::bail!("latents have {c} channels, the transformer takes {}", self.config.in_channels);
        }
        if !f.is_multiple_of(patch[0]) || !h.is_multiple_of(patch[1]) || !w.is_multiple_of(patch[2]) {
            candle_core::bail!("a {f}x{h}x{w} latent does not split into {patch:?} patches");
        }
        if inputs.context.dim(0)? != b {
            candle_core::bail!("{b} latent rows, {} text rows", inputs.context.dim(0)?);
        }
        if let Some(g) = inputs.guidance {
            g.check_rows(b)?;
        }
        let grid = [f / patch[0], h / patch[1], w / patch[2]];
        let dtype = self.dtype();
        let rope = Rope::new(self.config.attention_head_dim, grid, self.config.rope_max_seq_len, x.device())?;
        let mut tokens = self.patch_embedding.forward(x)?;
        let t = Tensor::full(inputs.timestep as f32, b, x.device())?;
        let (temb, modulation) = self.condition_embedder.time(&t, dtype)?;
        let positive = self.condition_embedder.text(&inputs.context.to_dtype(dtype)?)?;
        let negative_states =
            inputs.guidance.map(|g| self.condition_embedder.text(&g.states.to_dtype(dtype)?)).transpose()?;
        let image = match (inputs.image, self.condition_embedder.has_image()) {
            (Some(img), true) => Some(self.condition_embedder.image(&img.to_dtype(dtype)?)?),
            (None, false) => None,
            (Some(_), false) => candle_core::bail!("an image was given to a text-to-video transformer"),
            (None, true) => candle_core::bail!("this image-to-video transformer needs the CLIP image states"),
        };
        let cross = CrossContext {
            positive: &positive,
            negative: match (inputs.guidance, &negative_states) {
                (Some(g), Some(states)) => Some(NegativeText { method: g.method, states, rows: g.rows.clone() }),
                _ => None,
            },
            image: image.as_ref(),
        };
        let block_inputs = BlockInputs { modulation: &modulation, rope: &rope, cross: &cross };
        for block in &self.blocks {
            tokens = block.forward(&tokens, &block_inputs)?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(tokens.clone());
            }
        }
        // Output layer: shift, then scale, from the table plus the timestep embedding.
        let m = self.scale_shift_table.broadcast_add(&temb.unsqueeze(1)?)?;
        let (shift, scale) = (m.narrow(1, 0, 1)?.squeeze(1)?, m.narrow(1, 1, 1)?.squeeze(1)?);
        let out = self.proj_out.forward(&modulated_norm(&tokens, &shift, &scale, self.config.eps)?)?;
        unpatchify(&out, grid, patch)?.to_dtype(DType::F32)
    }
}
