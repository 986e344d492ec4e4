//! The MMDiT transformer of Stable Diffusion 3 / 3.5 (diffusers `SD3Transformer2DModel`),
//! config-driven: SD3-Medium (no qk norm), SD3.5-Large / Large-Turbo (`qk_norm: "rms_norm"`),
//! SD3.5-Medium (MMDiT-X: `attn2` in the blocks of `dual_attention_layers`). Negative-prompt
//! guidance (NAG, NASA, VSF) lives in the joint attention; see [`blocks`] for the data flow.

pub mod blocks;
pub mod embeddings;

use crate::error::Result;
use crate::guidance::vsf;
use crate::guidance::{AttentionGuidance, NegativeContext};
use crate::loading::config::read_checked_config;
use crate::loading::weights::ComponentWeights;
use crate::models::layers::{linear, AdaNormContinuous, Linear, QuantizedWeights, TimeTextEmbed};
use blocks::{BlockGuide, JointBlock};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use embeddings::PatchEmbed;
use serde::Deserialize;
use std::path::Path;

/// `transformer/config.json`; defaults are diffusers' (the SD3-Medium values).
#[derive(Debug, Clone, Deserialize)]
pub struct MmditConfig {
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_patch_size")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "d_num_layers")]
    pub num_layers: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_joint_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "d_caption_dim")]
    pub caption_projection_dim: usize,
    #[serde(default = "d_pooled_dim")]
    pub pooled_projection_dim: usize,
    #[serde(default = "d_pos_max")]
    pub pos_embed_max_size: usize,
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn d_sample_size() -> usize {
    128
}
fn d_patch_size() -> usize {
    2
}
fn d_channels() -> usize {
    16
}
fn d_num_layers() -> usize {
    18
}
fn d_heads() -> usize {
    18
}
fn d_head_dim() -> usize {
    64
}
fn d_joint_dim() -> usize {
    4096
}
fn d_caption_dim() -> usize {
    1152
}
fn d_pooled_dim() -> usize {
    2048
}
fn d_pos_max() -> usize {
    96
}

impl MmditConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_checked_config(path, "SD3 transformer config", Self::check)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.caption_projection_dim != self.inner_dim() {
            return Err(format!(
                "caption_projection_dim {} differs from num_attention_heads x attention_head_dim = {}",
                self.caption_projection_dim,
                self.inner_dim()
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => return Err(format!("qk_norm \"{other}\" is not supported (null or \"rms_norm\")")),
        }
        if self.num_layers == 0 || self.patch_size == 0 {
            return Err("num_layers and patch_size must be positive".into());
        }
        if let Some(&bad) = self.dual_attention_layers.iter().find(|&&i| i >= self.num_layers) {
            return Err(format!("dual_attention_layers names block {bad}, the model has {}", self.num_layers));
        }
        if !self.inner_dim().is_multiple_of(4) {
            return Err(format!("inner dim {} must be divisible by 4 (2-D sin-cos positions)", self.inner_dim()));
        }
        Ok(())
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }
}

/// Inputs of one transformer call.
pub struct MmditInputs<'a> {
    /// `[B, C, h, w]` latents.
    pub latents: &'a Tensor,
    /// `[B]` on the 0..1000 scale (SD3 pipelines pass the scheduler's `t` unscaled).
    pub timestep: &'a Tensor,
    /// Text states `[B, T, joint_dim]` and pooled vector `[B, pooled_dim]` of each row.
    pub context: &'a Tensor,
    pub pooled: &'a Tensor,
    /// The negative prompt and this step's attention method.
    /// - NAG / NASA: `states` `[Bn, Tn, joint_dim]` is a text stream of its own that guides the
    ///   image rows `rows` (with batched CFG `[uncond, cond]`: the cond row); `pooled`
    ///   `[Bn, pooled_dim]` conditions its modulation (the positive pooled vector in the
    ///   official diffusers pipeline, the negative one in the official ComfyUI node).
    /// - VSF: `states` `[B, Ln, joint_dim]` is the unpadded negative prompt, every row guided;
    ///   the model runs the text stream of the layout ([`vsf::text_stream`]).
    pub guidance: Option<&'a NegativeContext<'a>>,
}

/// Named intermediate tensors, for parity tests and debugging.
pub type Trace = Vec<(String, Tensor)>;

pub struct MmditTransformer {
    pos_embed: PatchEmbed,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    norm_out: AdaNormContinuous,
    proj_out: Linear,
    config: MmditConfig,
}

impl MmditTransformer {
    /// The model with dense weights from `vb`.
    pub fn new(config: &MmditConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::new_quantized(config, vb, &QuantizedWeights::none())
    }

    /// The model from a component's weights (quantized layers where the checkpoint is).
    pub fn load(
        config: &MmditConfig,
        weights: &ComponentWeights,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let (vb, q) = weights.model_weights(dtype, device)?;
        Self::new_quantized(config, vb, &q).map_err(|e| weights.mismatch("transformer", e))
    }

    /// The model with its big matmuls taken from `q` where it holds them in ggml blocks.
    pub fn new_quantized(config: &MmditConfig, vb: VarBuilder, q: &QuantizedWeights) -> candle_core::Result<Self> {
        let dim = config.inner_dim();
        let n = config.num_layers;
        let blocks = (0..n)
            .map(|i| {
                JointBlock::new(
                    dim,
                    config.num_attention_heads,
                    config.qk_norm(),
                    i + 1 == n,
                    config.dual_attention_layers.contains(&i),
                    vb.pp(format!("transformer_blocks.{i}")),
                    q,
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            pos_embed: PatchEmbed::new(
                config.in_channels,
                dim,
                config.patch_size,
                config.pos_embed_max_size,
                config.sample_size / config.patch_size,
                vb.pp("pos_embed"),
            )?,
            time_text_embed: TimeTextEmbed::new(dim, config.pooled_projection_dim, false, vb.pp("time_text_embed"), q)?,
            context_embedder: linear(
                config.joint_attention_dim,
                config.caption_projection_dim,
                vb.pp("context_embedder"),
                q,
            )?,
            blocks,
            norm_out: AdaNormContinuous::new(dim, vb.pp("norm_out"), q)?,
            proj_out: linear(dim, config.patch_size * config.patch_size * config.out_channels(), vb.pp("proj_out"), q)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &MmditConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.proj_out.dtype()
    }

    /// Predicted velocity `[B, out_channels, h, w]`.
    pub fn forward(&self, inputs: &MmditInputs) -> Result<Tensor> {
        Ok(self.forward_traced(inputs, None)?)
    }

    /// As [`forward`](Self::forward), recording the streams after every block when `trace` is
    /// given: `block_{i}_img`, `block_{i}_txt` (not after the last block), `block_{i}_txt_neg`
    /// (NAG/NASA). Under VSF `block_{i}_txt` is the whole VSF text stream.
    pub fn forward_traced(&self, inputs: &MmditInputs, mut trace: Option<&mut Trace>) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = inputs.latents.dims4()?;
        let p = self.config.patch_size;
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!("latents {h}x{w} are not a multiple of the patch size {p}");
        }
        for (what, t) in [("timestep", inputs.timestep), ("pooled", inputs.pooled), ("context", inputs.context)] {
            if t.dim(0)? != b {
                candle_core::bail!("{what} has batch {}, the latents {b}", t.dim(0)?);
            }
        }
        let dtype = inputs.latents.dtype();
        let temb_of = |t: &Tensor, pooled: &Tensor| {
            self.time_text_embed.forward(&t.to_dtype(DType::F32)?, None, &pooled.to_dtype(dtype)?)
        };
        let temb = temb_of(inputs.timestep, inputs.pooled)?;
        let mut img = self.pos_embed.forward(inputs.latents)?;

        let (context, block_guide, mut neg, temb_neg) = match inputs.guidance {
            None => (inputs.context.clone(), BlockGuide::None, None, None),
            Some(n) => {
                n.check_rows(b)?;
                match n.method {
                    AttentionGuidance::Contrast(_) => {
                        let pooled = n.pooled.ok_or_else(|| {
                            candle_core::Error::Msg("NAG/NASA needs the pooled vector of the negative stream".into())
                        })?;
                        let t_neg = inputs.timestep.narrow(0, n.rows.start, n.rows.len())?;
                        let neg = self.context_embedder.forward(n.states)?;
                        let guide = BlockGuide::Contrast { method: n.method, rows: n.rows.clone() };
                        (inputs.context.clone(), guide, Some(neg), Some(temb_of(&t_neg, pooled)?))
                    }
                    AttentionGuidance::Vsf(params) => {
                        if n.rows != (0..b) {
                            candle_core::bail!("VSF guides every row of the batch, got rows {:?} of {b}", n.rows);
                        }
                        let stream = vsf::text_stream(inputs.context, n.states, params.layout)?;
                        (stream, BlockGuide::Vsf { method: n.method, neg_len: n.states.dim(1)? }, None, None)
                    }
                }
            }
        };

        let mut txt = self.context_embedder.forward(&context)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let out = block.forward(&img, &txt, neg.as_ref(), &temb, temb_neg.as_ref(), &block_guide)?;
            img = out.img;
            if let Some(tr) = trace.as_deref_mut() {
                tr.push((format!("block_{i}_img"), img.clone()));
                if let Some(t) = &out.txt {
                    tr.push((format!("block_{i}_txt"), t.clone()));
                }
                if let Some(n) = &out.neg {
                    tr.push((format!("block_{i}_txt_neg"), n.clone()));
                }
            }
            match out.txt {
                Some(t) => txt = t,
                None if i + 1 < self.blocks.len() => {
                    candle_core::bail!("block {i} dropped the text stream before the last block")
                }
                None => {}
            }
            neg = out.neg;
        }

        let out = self.proj_out.forward(&self.norm_out.forward(&img, &temb)?)?;
        embeddings::unpatchify(&out, h, w, p)
    }
}
