//! Wan's transformer block: modulated self-attention with 3-D RoPE, a cross-attention to the
//! text (and, for I2V, to the image tokens through their own key/value projections), and a
//! modulated GELU feed-forward. Queries and keys are RMS-normalised over the whole width
//! (`rms_norm_across_heads`) before the heads are split.
//!
//! Guidance lives in the cross-attention only (`attn2`, as the official NAG and VSF Wan code):
//! the text attention goes through [`guided_attention`] with the positive text of every row and,
//! on the guided rows, the negative text from the same queries. The image attention is a
//! separate softmax added after it (diffusers and the official processors), never guided.

use std::ops::Range;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::embeddings::{AffineNorm, Rope};
use crate::attention::{merge_heads, sdpa, split_heads};
use crate::guidance::{guided_attention, AttentionGuidance, GuidedAttention, KeyValues, NegativeKeyValues};
use crate::models::layers::{gated_add, linear, modulate_normed, Linear, QuantizedWeights};

/// `RMSNorm(width)` with weight, in f32.
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?.to_dtype(DType::F32)?, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &self.weight, self.eps)?.to_dtype(x.dtype())
    }
}

/// The text context of the cross-attention, projected: `positive` `[B, L, dim]`, and the
/// negative for the guided rows with this step's method.
pub struct CrossContext<'a> {
    pub positive: &'a Tensor,
    pub negative: Option<NegativeText<'a>>,
    /// The projected image tokens `[B or 1, N, dim]` (I2V).
    pub image: Option<&'a Tensor>,
}

/// The projected negative text `[rows.len(), L-, dim]`.
pub struct NegativeText<'a> {
    pub method: &'a AttentionGuidance,
    pub states: &'a Tensor,
    pub rows: Range<usize>,
}

/// `WanAttention`: `to_q`, `to_k`, `to_v`, `to_out.0`, `norm_q`, `norm_k`; I2V's `attn2` adds
/// `add_k_proj`, `add_v_proj`, `norm_added_k`.
pub struct WanAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    added: Option<(Linear, Linear, RmsNorm)>,
    heads: usize,
    scale: f64,
}

impl WanAttention {
    pub fn new(
        dim: usize,
        heads: usize,
        eps: f64,
        added_kv_dim: Option<usize>,
        vb: VarBuilder,
        q: &QuantizedWeights,
    ) -> Result<Self> {
        let added = added_kv_dim
            .map(|d| -> Result<_> {
                Ok((
                    linear(d, dim, vb.pp("add_k_proj"), q)?,
                    linear(d, dim, vb.pp("add_v_proj"), q)?,
                    RmsNorm::new(dim, eps, vb.pp("norm_added_k"))?,
                ))
            })
            .transpose()?;
        Ok(Self {
            to_q: linear(dim, dim, vb.pp("to_q"), q)?,
            to_k: linear(dim, dim, vb.pp("to_k"), q)?,
            to_v: linear(dim, dim, vb.pp("to_v"), q)?,
            to_out: linear(dim, dim, vb.pp("to_out.0"), q)?,
            norm_q: RmsNorm::new(dim, eps, vb.pp("norm_q"))?,
            norm_k: RmsNorm::new(dim, eps, vb.pp("norm_k"))?,
            added,
            heads,
            scale: 1.0 / ((dim / heads) as f64).sqrt(),
        })
    }

    fn keys(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = split_heads(&self.norm_k.forward(&self.to_k.forward(context)?)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(context)?, self.heads)?;
        Ok((k, v))
    }

    fn queries(&self, x: &Tensor) -> Result<Tensor> {
        split_heads(&self.norm_q.forward(&self.to_q.forward(x)?)?, self.heads)
    }

    /// Self-attention of `x` `[B, S, dim]` with the rotary table.
    pub fn forward_self(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        let q = rope.apply(&self.queries(x)?)?;
        let (k, v) = self.keys(x)?;
        let k = rope.apply(&k)?;
        self.to_out.forward(&merge_heads(&sdpa(&q, &k, &v, self.scale)?)?)
    }

    /// Cross-attention of `x` `[B, S, dim]` to the text (guided on the negative's rows), plus
    /// the image attention for I2V.
    pub fn forward_cross(&self, x: &Tensor, ctx: &CrossContext) -> Result<Tensor> {
        let b = x.dim(0)?;
        let q = self.queries(x)?;
        let (k, v) = self.keys(ctx.positive)?;
        let negative = ctx.negative.as_ref().map(|n| self.keys(n.states).map(|kv| (kv, n))).transpose()?;
        let mut out = guided_attention(
            &GuidedAttention {
                q: &q,
                shared: None,
                positive: KeyValues { k: &k, v: &v },
                negative: negative
                    .as_ref()
                    .map(|((k, v), n)| NegativeKeyValues { kv: KeyValues { k, v }, rows: n.rows.clone() }),
                scale: self.scale,
            },
            ctx.negative.as_ref().map(|n| n.method),
        )?;
        match (&self.added, ctx.image) {
            (Some((add_k, add_v, norm)), Some(image)) => {
                let k = split_heads(&norm.forward(&add_k.forward(image)?)?, self.heads)?;
                let v = split_heads(&add_v.forward(image)?, self.heads)?;
                let (k, v) = if k.dim(0)? == b { (k, v) } else { (k.repeat((b, 1, 1, 1))?, v.repeat((b, 1, 1, 1))?) };
                out = (out + merge_heads(&sdpa(&q, &k, &v, self.scale)?)?)?;
            }
            (None, Some(_)) => candle_core::bail!("image tokens given to a cross-attention without add_k_proj"),
            (Some(_), None) => candle_core::bail!("this I2V transformer needs the image tokens"),
            (None, None) => {}
        }
        self.to_out.forward(&out)
    }
}

/// `ffn`: `Linear(dim, ffn_dim) -> GELU(tanh) -> Linear(ffn_dim, dim)`.
pub struct WanFeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl WanFeedForward {
    pub fn new(dim: usize, ffn_dim: usize, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, ffn_dim, vb.pp("net.0.proj"), q)?,
            proj_out: linear(ffn_dim, dim, vb.pp("net.2"), q)?,
        })
    }
}

impl Module for WanFeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&crate::kernels::gelu_tanh(&self.proj_in.forward(x)?)?)
    }
}

/// What every block of one call shares.
pub struct BlockInputs<'a> {
    /// The six modulation vectors of the timestep, `[B, 6, dim]` (f32).
    pub modulation: &'a Tensor,
    pub rope: &'a Rope,
    pub cross: &'a CrossContext<'a>,
}

/// `WanTransformerBlock`.
pub struct WanBlock {
    scale_shift_table: Tensor,
    attn1: WanAttention,
    attn2: WanAttention,
    norm2: Option<AffineNorm>,
    ffn: WanFeedForward,
    eps: f64,
}

/// LayerNorm without affine parameters, in f32.
fn plain_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let dim = x.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, DType::F32, x.device())?;
    let zeros = Tensor::zeros(dim, DType::F32, x.device())?;
    candle_nn::ops::layer_norm(&x, &ones, &zeros, eps as f32)
}

/// `norm(x) (1 + scale) + shift` in f32, returned in `dtype`; `shift`/`scale` `[B, dim]` (one
/// parallel pass on the CPU, as the other adaLN blocks).
pub(crate) fn modulated_norm(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    modulate_normed(&plain_norm(x, eps)?, shift, scale)?.to_dtype(x.dtype())
}

/// `x + y gate` computed in f32, returned in the dtype of `x`.
fn gated(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    gated_add(&x.to_dtype(DType::F32)?, gate, &y.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

impl WanBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        ffn_dim: usize,
        heads: usize,
        cross_attn_norm: bool,
        eps: f64,
        added_kv_dim: Option<usize>,
        vb: VarBuilder,
        q: &QuantizedWeights,
    ) -> Result<Self> {
        Ok(Self {
            scale_shift_table: vb.get((1, 6, dim), "scale_shift_table")?.to_dtype(DType::F32)?,
            attn1: WanAttention::new(dim, heads, eps, None, vb.pp("attn1"), q)?,
            attn2: WanAttention::new(dim, heads, eps, added_kv_dim, vb.pp("attn2"), q)?,
            norm2: if cross_attn_norm { Some(AffineNorm::new(dim, eps, vb.pp("norm2"))?) } else { None },
            ffn: WanFeedForward::new(dim, ffn_dim, vb.pp("ffn"), q)?,
            eps,
        })
    }

    /// `x` `[B, S, dim]`.
    pub fn forward(&self, x: &Tensor, inputs: &BlockInputs) -> Result<Tensor> {
        // shift, scale, gate of the self-attention, then of the feed-forward; each [B, dim].
        let m = inputs.modulation.broadcast_add(&self.scale_shift_table)?;
        let m: Vec<Tensor> = (0..6).map(|i| m.narrow(1, i, 1)?.squeeze(1)).collect::<Result<_>>()?;
        let h = modulated_norm(x, &m[0], &m[1], self.eps)?;
        let x = gated(x, &self.attn1.forward_self(&h, inputs.rope)?, &m[2])?;
        let h = match &self.norm2 {
            Some(n) => n.forward(&x)?,
            None => x.clone(),
        };
        let x = (&x + self.attn2.forward_cross(&h, inputs.cross)?)?;
        let h = modulated_norm(&x, &m[3], &m[4], self.eps)?;
        gated(&x, &self.ffn.forward(&h)?, &m[5])
    }
}
