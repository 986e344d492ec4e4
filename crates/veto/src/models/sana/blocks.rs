//! SANA's transformer block (diffusers' `SanaTransformerBlock`), with the guidance hooks:
//!
//! - `attn1`: linear self-attention (the identity map on PAG's perturbed rows) with the ReLU kernel (`SanaLinearAttnProcessor2_0`): per
//!   head `out_n = (sum_m v_m k_m^T) q_n / (sum_m k_m . q_n + 1e-15)` with `q, k` after ReLU,
//!   computed in f32 whatever the weights' dtype (diffusers upcasts; the 1e-15 is its padding
//!   trick's epsilon: a row of ones appended to `v` gives the denominator).
//! - `attn2`: cross-attention to the caption with its text mask, no norm before it; the guided
//!   rows also attend the negative caption through [`crate::guidance::guided_attention()`]
//!   (PixArt's cross-attention module, which has the same projections and mask handling).
//! - `ff`: Mix-FFN ([`GluMbConv`]) on the token grid.

use std::ops::Range;

use crate::models::layers::{dense, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::conv::{GluMbConv, RmsNorm};
use crate::attention::{merge_heads, split_heads};
use crate::models::layers::{gated_add, layer_norm, modulate_normed};
use crate::models::pixart::blocks::{Attention, Caption, NegativeCaption};

/// `attn1`: `to_q`, `to_k`, `to_v` (bias as `attention_bias`), `to_out.0` (with bias).
pub struct LinearAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    /// `rms_norm_across_heads` (SANA 1.5 / Sprint): `norm_q`, `norm_k` over the full width.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
}

impl LinearAttention {
    pub fn new(dim: usize, heads: usize, head_dim: usize, bias: bool, qk_norm: bool, vb: VarBuilder) -> Result<Self> {
        let inner = heads * head_dim;
        let proj = |name: &str| dense(dim, inner, bias, vb.pp(name));
        Ok(Self {
            to_q: proj("to_q")?,
            to_k: proj("to_k")?,
            to_v: proj("to_v")?,
            to_out: dense(inner, dim, true, vb.pp("to_out.0"))?,
            heads,
            qk_norm: if qk_norm {
                Some((
                    RmsNorm::new(inner, 1e-5, false, vb.pp("norm_q"))?,
                    RmsNorm::new(inner, 1e-5, false, vb.pp("norm_k"))?,
                ))
            } else {
                None
            },
        })
    }

    /// `x` `[B, N, dim]`; the rows `identity` get the identity attention map (PAG: diffusers'
    /// `PAGIdentitySanaLinearAttnProcessor2_0`, `to_out(to_v(x))`).
    pub fn forward(&self, x: &Tensor, identity: Option<&Range<usize>>) -> Result<Tensor> {
        let Some(rows) = identity.filter(|r| !r.is_empty()) else {
            return self.to_out.forward(&self.linear(x)?);
        };
        let b = x.dim(0)?;
        let mut parts = Vec::with_capacity(3);
        if rows.start > 0 {
            parts.push(self.linear(&x.narrow(0, 0, rows.start)?)?);
        }
        parts.push(self.to_v.forward(&x.narrow(0, rows.start, rows.len())?)?);
        if rows.end < b {
            parts.push(self.linear(&x.narrow(0, rows.end, b - rows.end)?)?);
        }
        self.to_out.forward(&Tensor::cat(&parts, 0)?)
    }

    /// The linear attention before `to_out`.
    fn linear(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let heads = |y: Tensor| -> Result<Tensor> { split_heads(&y, self.heads)?.to_dtype(DType::F32) };
        let (mut q, mut k) = (self.to_q.forward(x)?, self.to_k.forward(x)?);
        if let Some((nq, nk)) = &self.qk_norm {
            (q, k) = (nq.forward(&q)?, nk.forward(&k)?);
        }
        let q = heads(q)?.relu()?;
        let k = heads(k)?.relu()?;
        let v = heads(self.to_v.forward(x)?)?;
        // [B, H, d, d]: sum over tokens of k_m v_m^T; and [B, H, 1, d]: sum of k_m.
        let kv = k.transpose(2, 3)?.contiguous()?.matmul(&v)?;
        let k_sum = k.sum_keepdim(2)?;
        let num = q.matmul(&kv)?;
        let den = q.broadcast_mul(&k_sum)?.sum_keepdim(D::Minus1)?;
        let z = num.broadcast_div(&(den + 1e-15)?)?;
        merge_heads(&z)?.to_dtype(dtype)
    }
}

/// What a block needs besides its input.
pub struct BlockInputs<'a> {
    /// `[B, 6 dim]`: adaLN-single's modulation (before the block's own table).
    pub temb: &'a Tensor,
    pub caption: &'a Caption<'a>,
    pub negative: Option<&'a NegativeCaption<'a>>,
    /// The token grid (`h / patch`, `w / patch`).
    pub grid: (usize, usize),
    /// PAG's perturbed rows, when this block is selected.
    pub identity: Option<&'a Range<usize>>,
}

pub struct SanaBlock {
    scale_shift_table: Tensor,
    attn1: LinearAttention,
    attn2: Attention,
    ff: GluMbConv,
}

/// The block's widths, from the transformer config.
pub struct BlockShape {
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub cross_heads: usize,
    pub cross_head_dim: usize,
    pub attention_bias: bool,
    /// `qk_norm: "rms_norm_across_heads"` on both attentions.
    pub qk_norm: bool,
    /// `int(mlp_ratio * dim)`.
    pub ff_hidden: usize,
}

impl SanaBlock {
    pub fn new(s: &BlockShape, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            scale_shift_table: vb.get((6, s.dim), "scale_shift_table")?,
            attn1: LinearAttention::new(s.dim, s.heads, s.head_dim, s.attention_bias, s.qk_norm, vb.pp("attn1"))?,
            attn2: {
                let attn = Attention::new(s.dim, s.dim, s.cross_heads, s.cross_head_dim, vb.pp("attn2"))?;
                if s.qk_norm {
                    attn.with_qk_norm(vb.pp("attn2"))?
                } else {
                    attn
                }
            },
            ff: GluMbConv::new(s.dim, s.dim, s.ff_hidden, false, vb.pp("ff"))?,
        })
    }

    /// `x` `[B, N, dim]`, `N = grid.0 * grid.1`.
    pub fn forward(&self, x: &Tensor, inputs: &BlockInputs) -> Result<Tensor> {
        let (b, n, dim) = x.dims3()?;
        let (gh, gw) = inputs.grid;
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each [B, dim].
        let m = inputs.temb.reshape((b, 6, dim))?.broadcast_add(&self.scale_shift_table.unsqueeze(0)?)?;
        let m: Vec<Tensor> = (0..6).map(|i| m.narrow(1, i, 1)?.squeeze(1)).collect::<Result<_>>()?;
        let h = modulate_normed(&layer_norm(x)?, &m[0], &m[1])?;
        let x = gated_add(x, &m[2], &self.attn1.forward(&h, inputs.identity)?)?;
        let x = (self.attn2.forward_cross(&x, inputs.caption, inputs.negative)? + &x)?;
        let h = modulate_normed(&layer_norm(&x)?, &m[3], &m[4])?;
        let ff = self.ff.forward(&h.reshape((b, gh, gw, dim))?)?.reshape((b, n, dim))?;
        gated_add(&x, &m[5], &ff)
    }
}
