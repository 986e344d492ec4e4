//! diffusers' `Transformer2DModel` / `BasicTransformerBlock` of the UNet, with the guidance
//! hooks:
//!
//! - `attn1` (self-attention): on the PAG rows of the selected layers the attention map is the
//!   identity, so the output is `to_out(to_v(x))` (diffusers' `PAGIdentitySelfAttnProcessor`).
//! - `attn2` (cross-attention): on the guided rows the same image queries also attend the
//!   negative text, through [`crate::guidance::guided_attention()`]: NAG/NASA combine `Z+` and
//!   `Z-` (heads merged, before `to_out`); VSF attends one softmax over the positive keys and
//!   the flipped negative block, merged by log-sum-exp, never as a dense concatenation.
//!
//! The image side is never tiled: every row of the batch runs the trunk once.

use std::ops::Range;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use crate::models::conv::{conv2d, group_norm, Conv2d, GroupNorm};

use crate::attention::{merge_heads, sdpa, split_heads};
use crate::guidance::{guided_attention, GuidedAttention, KeyValues, NegativeContext, NegativeKeyValues};
use crate::models::layers::{linear, linear_no_bias, Linear, QuantizedWeights};
use crate::profile;

/// PAG: rows whose selected self-attention layers become identity.
#[derive(Clone)]
pub struct Perturbation<'a> {
    pub rows: Range<usize>,
    pub layers: &'a super::PagLayers,
}

/// What a transformer block needs besides its input.
#[derive(Clone)]
pub struct BlockContext<'a> {
    /// `[B, T, cross_dim]`, one context per row.
    pub context: &'a Tensor,
    pub guidance: Option<&'a NegativeContext<'a>>,
    pub perturbation: Option<Perturbation<'a>>,
}

/// One attention module (`to_q`, `to_k`, `to_v` without bias, `to_out.0` with bias).
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
    /// Module path, e.g. `mid_block.attentions.0.transformer_blocks.0.attn1` (PAG selection).
    name: String,
}

impl Attention {
    /// `(heads, head_dim)`: the number of heads and their width.
    fn new(
        query_dim: usize,
        context_dim: usize,
        (heads, head_dim): (usize, usize),
        upcast: bool,
        name: String,
        vb: VarBuilder,
        q: &QuantizedWeights,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"), q)?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"), q)?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"), q)?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"), q)?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `softmax(q k^T / sqrt(d)) v`, in f32 when `upcast_attention` asks for it.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if self.upcast && q.dtype() != DType::F32 {
            let dtype = q.dtype();
            sdpa(&q.to_dtype(DType::F32)?, &k.to_dtype(DType::F32)?, &v.to_dtype(DType::F32)?, self.scale)?
                .to_dtype(dtype)
        } else {
            sdpa(q, k, v, self.scale)
        }
    }

    /// Heads-merged attention output (before `to_out`) of `x` over `context`.
    fn z(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(context)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(context)?, self.heads)?;
        merge_heads(&self.attend(&q, &k, &v)?)
    }

    /// Self-attention, with the identity map on the perturbed rows when this layer is selected.
    pub fn forward_self(&self, x: &Tensor, perturbation: Option<&Perturbation>) -> Result<Tensor> {
        let ptb = perturbation.filter(|p| p.layers.contains(&self.name) && !p.rows.is_empty());
        let Some(p) = ptb else {
            return self.to_out.forward(&self.z(x, x)?);
        };
        let b = x.dim(0)?;
        // Identity attention: the output of each token is its own value.
        let identity = self.to_v.forward(&x.narrow(0, p.rows.start, p.rows.len())?)?;
        let mut parts = Vec::with_capacity(3);
        if p.rows.start > 0 {
            let before = x.narrow(0, 0, p.rows.start)?;
            parts.push(self.z(&before, &before)?);
        }
        parts.push(identity);
        if p.rows.end < b {
            let after = x.narrow(0, p.rows.end, b - p.rows.end)?;
            parts.push(self.z(&after, &after)?);
        }
        self.to_out.forward(&profile::cat(&parts, 0)?)
    }

    /// Cross-attention over `context`, guided on `guidance.rows` by the negative context
    /// (the other rows attend the positive context only).
    pub fn forward_cross(&self, x: &Tensor, context: &Tensor, guidance: Option<&NegativeContext>) -> Result<Tensor> {
        let heads = |lin: &Linear, t: &Tensor| -> Result<Tensor> {
            let h = split_heads(&lin.forward(t)?, self.heads)?;
            // upcast_attention: the attention itself in f32.
            if self.upcast {
                h.to_dtype(DType::F32)
            } else {
                Ok(h)
            }
        };
        let (q, k, v) = (heads(&self.to_q, x)?, heads(&self.to_k, context)?, heads(&self.to_v, context)?);
        let negative = match guidance {
            Some(g) => Some((heads(&self.to_k, g.states)?, heads(&self.to_v, g.states)?, g.rows.clone())),
            None => None,
        };
        let z = guided_attention(
            &GuidedAttention {
                q: &q,
                shared: None,
                positive: KeyValues { k: &k, v: &v },
                negative: negative
                    .as_ref()
                    .map(|(k, v, rows)| NegativeKeyValues { kv: KeyValues { k, v }, rows: rows.clone() }),
                scale: self.scale,
            },
            guidance.map(|g| g.method),
        )?;
        self.to_out.forward(&z.to_dtype(x.dtype())?)
    }
}

/// `GEGLU` feed-forward: `Linear(dim, 2 inner)`, `a * gelu(b)` (exact GELU), `Linear(inner, dim)`.
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: linear(dim, 2 * inner, vb.pp("net.0.proj"), q)?,
            proj_out: linear(inner, dim, vb.pp("net.2"), q)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        let inner = h.dim(D::Minus1)? / 2;
        self.proj_out.forward(&crate::kernels::glu(&h, inner, crate::kernels::Gate::GeluErf)?)
    }
}

/// `BasicTransformerBlock` (layer-norm variant): self-attention, cross-attention, GEGLU.
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn forward(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let x = (self.attn1.forward_self(&self.norm1.forward(x)?, ctx.perturbation.as_ref())? + x)?;
        let x = (self.attn2.forward_cross(&self.norm2.forward(&x)?, ctx.context, ctx.guidance)? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }

    pub fn self_attention_name(&self) -> &str {
        self.attn1.name()
    }
}

/// The input/output projection: a linear layer on tokens or a 1x1 convolution on the map.
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// `Transformer2DModel` (continuous input): GroupNorm, projection in, blocks, projection out,
/// residual.
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

/// Everything a [`SpatialTransformer`] is built from.
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    /// Module path of this transformer, e.g. `down_blocks.1.attentions.0`.
    pub name: String,
}

impl SpatialTransformer {
    pub fn new(spec: &TransformerSpec, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        let c = spec.channels;
        if spec.heads == 0 || !c.is_multiple_of(spec.heads) {
            candle_core::bail!("{}: {} channels do not split into {} heads", spec.name, c, spec.heads);
        }
        let head_dim = c / spec.heads;
        let proj = |name: &str, vb: &VarBuilder| -> Result<Projection> {
            Ok(if spec.use_linear_projection {
                Projection::Linear(linear(c, c, vb.pp(name), q)?)
            } else {
                Projection::Conv(conv2d(c, c, 1, Default::default(), vb.pp(name))?)
            })
        };
        let blocks = (0..spec.layers)
            .map(|i| {
                let bvb = vb.pp(format!("transformer_blocks.{i}"));
                let base = format!("{}.transformer_blocks.{i}", spec.name);
                Ok(TransformerBlock {
                    norm1: candle_nn::layer_norm(c, 1e-5, bvb.pp("norm1"))?,
                    attn1: Attention::new(
                        c,
                        c,
                        (spec.heads, head_dim),
                        spec.upcast_attention,
                        format!("{base}.attn1"),
                        bvb.pp("attn1"),
                        q,
                    )?,
                    norm2: candle_nn::layer_norm(c, 1e-5, bvb.pp("norm2"))?,
                    attn2: Attention::new(
                        c,
                        spec.cross_attention_dim,
                        (spec.heads, head_dim),
                        spec.upcast_attention,
                        format!("{base}.attn2"),
                        bvb.pp("attn2"),
                        q,
                    )?,
                    norm3: candle_nn::layer_norm(c, 1e-5, bvb.pp("norm3"))?,
                    ff: FeedForward::new(c, bvb.pp("ff"), q)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(spec.norm_num_groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in", &vb)?,
            blocks,
            proj_out: proj("proj_out", &vb)?,
        })
    }

    pub fn blocks(&self) -> &[TransformerBlock] {
        &self.blocks
    }

    /// `x`: `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(&x.contiguous()?)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&x)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&x)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, ctx)?;
        }
        let to_map = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        out + residual
    }
}
