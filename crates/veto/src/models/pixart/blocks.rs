//! PixArt's transformer block (diffusers' `BasicTransformerBlock` with
//! `norm_type="ada_norm_single"`), with the guidance hooks:
//!
//! - `attn1` (self-attention): on PAG's perturbed rows of the selected blocks the attention map
//!   is the identity, so the output is `to_out(to_v(x))` (diffusers'
//!   `PAGIdentitySelfAttnProcessor2_0`).
//! - `attn2` (cross-attention to the caption): each row attends to its own text, only its real
//!   tokens (the encoder attention mask: diffusers adds -10000 to the padded keys' logits, whose
//!   softmax weight is then exactly 0 in f32, so dropping those keys is the same attention). On
//!   the guided rows the same image queries also attend the negative text (its real tokens),
//!   through [`crate::guidance::guided_attention()`]: NAG / NASA combine `Z+` and `Z-`, VSF
//!   merges the flipped negative block by log-sum-exp.

use crate::loading::quantized::QuantizedWeights;
use std::ops::Range;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::attention::{merge_heads, sdpa, split_heads};
use crate::guidance::{guided_attention, AttentionGuidance, GuidedAttention, KeyValues, NegativeKeyValues};
use crate::models::layers::{dense, gated_add, layer_norm, modulate_normed, FeedForward, Linear};
use crate::models::sana::conv::RmsNorm;
use crate::profile;

/// The projected caption of every batch row: `states` `[B, L, dim]`, of which row `i` has
/// `lens[i]` real tokens (the rest is padding no query sees).
pub struct Caption<'a> {
    pub states: &'a Tensor,
    pub lens: &'a [usize],
}

/// The projected negative caption for the guided rows `rows`: `[rows.len(), Ln, dim]`, all
/// tokens real.
pub struct NegativeCaption<'a> {
    pub method: &'a AttentionGuidance,
    pub states: &'a Tensor,
    pub rows: Range<usize>,
}

/// One attention module: `to_q`, `to_k`, `to_v`, `to_out.0`, all with bias.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// SANA 1.5 / Sprint's `rms_norm_across_heads`: RMS norms over the whole query and key
    /// width, after the projections.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
}

impl Attention {
    pub(crate) fn new(dim: usize, context_dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: dense(dim, inner, true, vb.pp("to_q"))?,
            to_k: dense(context_dim, inner, true, vb.pp("to_k"))?,
            to_v: dense(context_dim, inner, true, vb.pp("to_v"))?,
            to_out: dense(inner, dim, true, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            qk_norm: None,
        })
    }

    /// Adds the query/key RMS norms (`norm_q`, `norm_k`, eps 1e-5 as diffusers' `Attention`).
    pub(crate) fn with_qk_norm(mut self, vb: VarBuilder) -> Result<Self> {
        let width = self.to_q.out_dim()?;
        let kwidth = self.to_k.out_dim()?;
        self.qk_norm = Some((
            RmsNorm::new(width, 1e-5, false, vb.pp("norm_q"))?,
            RmsNorm::new(kwidth, 1e-5, false, vb.pp("norm_k"))?,
        ));
        Ok(self)
    }

    fn heads_of(&self, lin: &Linear, x: &Tensor) -> Result<Tensor> {
        split_heads(&lin.forward(x)?, self.heads)
    }

    /// The query heads, normed where the model has `qk_norm`.
    fn query(&self, x: &Tensor) -> Result<Tensor> {
        match &self.qk_norm {
            Some((nq, _)) => split_heads(&nq.forward(&self.to_q.forward(x)?)?, self.heads),
            None => self.heads_of(&self.to_q, x),
        }
    }

    /// The key heads, normed where the model has `qk_norm`.
    fn key(&self, x: &Tensor) -> Result<Tensor> {
        match &self.qk_norm {
            Some((_, nk)) => split_heads(&nk.forward(&self.to_k.forward(x)?)?, self.heads),
            None => self.heads_of(&self.to_k, x),
        }
    }

    /// Self-attention; the rows `identity` get the identity attention map (PAG).
    fn forward_self(&self, x: &Tensor, identity: Option<&Range<usize>>) -> Result<Tensor> {
        let plain = |x: &Tensor| -> Result<Tensor> {
            let (q, k, v) = (self.query(x)?, self.key(x)?, self.heads_of(&self.to_v, x)?);
            merge_heads(&sdpa(&q, &k, &v, self.scale)?)
        };
        let Some(rows) = identity.filter(|r| !r.is_empty()) else {
            return self.to_out.forward(&plain(x)?);
        };
        let b = x.dim(0)?;
        let mut parts = Vec::with_capacity(3);
        if rows.start > 0 {
            parts.push(plain(&x.narrow(0, 0, rows.start)?)?);
        }
        parts.push(self.to_v.forward(&x.narrow(0, rows.start, rows.len())?)?);
        if rows.end < b {
            parts.push(plain(&x.narrow(0, rows.end, b - rows.end)?)?);
        }
        self.to_out.forward(&profile::cat(&parts, 0)?)
    }

    /// Cross-attention of `x` `[B, N, dim]` over each row's caption, guided on the negative's
    /// rows. Rows with the same caption length run as one batch.
    pub(crate) fn forward_cross(
        &self,
        x: &Tensor,
        caption: &Caption,
        negative: Option<&NegativeCaption>,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        if caption.lens.len() != b || caption.states.dim(0)? != b {
            candle_core::bail!("cross-attention: {b} image rows, {} caption rows", caption.lens.len());
        }
        let q = self.query(x)?;
        let k = self.key(caption.states)?;
        let v = self.heads_of(&self.to_v, caption.states)?;
        let neg = match negative {
            Some(n) => Some((self.key(n.states)?, self.heads_of(&self.to_v, n.states)?)),
            None => None,
        };
        let mut outs = Vec::new();
        let mut start = 0;
        while start < b {
            let len = caption.lens[start];
            let end = (start..b).find(|&i| caption.lens[i] != len).unwrap_or(b);
            let rows = end - start;
            let (qr, kr, vr) = (
                q.narrow(0, start, rows)?,
                k.narrow(0, start, rows)?.narrow(2, 0, len)?,
                v.narrow(0, start, rows)?.narrow(2, 0, len)?,
            );
            // The guided rows inside this run, relative to it and to the negative's rows.
            let guided = match (negative, &neg) {
                (Some(n), Some((kn, vn))) => {
                    let (a, z) = (n.rows.start.max(start), n.rows.end.min(end));
                    if a < z {
                        let off = a - n.rows.start;
                        Some((n.method, kn.narrow(0, off, z - a)?, vn.narrow(0, off, z - a)?, a - start..z - start))
                    } else {
                        None
                    }
                }
                _ => None,
            };
            let z = guided_attention(
                &GuidedAttention {
                    q: &qr,
                    shared: None,
                    positive: KeyValues { k: &kr, v: &vr },
                    negative: guided
                        .as_ref()
                        .map(|(_, k, v, r)| NegativeKeyValues { kv: KeyValues { k, v }, rows: r.clone() }),
                    scale: self.scale,
                },
                guided.as_ref().map(|(m, ..)| *m),
            )?;
            outs.push(z);
            start = end;
        }
        let z = if outs.len() == 1 { outs.remove(0) } else { profile::cat(&outs, 0)? };
        self.to_out.forward(&z)
    }
}

/// What a block needs besides its input.
pub struct BlockInputs<'a> {
    /// `[B, 6 dim]`: adaLN-single's modulation (before the block's own table).
    pub temb: &'a Tensor,
    pub caption: &'a Caption<'a>,
    pub negative: Option<&'a NegativeCaption<'a>>,
    /// PAG's perturbed rows, when this block is selected.
    pub identity: Option<&'a Range<usize>>,
}

/// `BasicTransformerBlock` with adaLN-single.
pub struct PixArtBlock {
    scale_shift_table: Tensor,
    attn1: Attention,
    attn2: Attention,
    ff: FeedForward,
}

impl PixArtBlock {
    pub fn new(dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            scale_shift_table: vb.get((6, dim), "scale_shift_table")?,
            attn1: Attention::new(dim, dim, heads, head_dim, vb.pp("attn1"))?,
            attn2: Attention::new(dim, dim, heads, head_dim, vb.pp("attn2"))?,
            ff: FeedForward::new(dim, vb.pp("ff"), &QuantizedWeights::none())?,
        })
    }

    /// `x` `[B, N, dim]`.
    pub fn forward(&self, x: &Tensor, inputs: &BlockInputs) -> Result<Tensor> {
        let (b, dim) = (x.dim(0)?, x.dim(D::Minus1)?);
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each [B, dim].
        let m = inputs.temb.reshape((b, 6, dim))?.broadcast_add(&self.scale_shift_table.unsqueeze(0)?)?;
        let m: Vec<Tensor> = (0..6).map(|i| m.narrow(1, i, 1)?.squeeze(1)).collect::<Result<_>>()?;
        let h = modulate_normed(&layer_norm(x)?, &m[0], &m[1])?;
        let x = gated_add(x, &m[2], &self.attn1.forward_self(&h, inputs.identity)?)?;
        // PixArt has no norm before the cross-attention.
        let x = (self.attn2.forward_cross(&x, inputs.caption, inputs.negative)? + &x)?;
        let h = modulate_normed(&layer_norm(&x)?, &m[3], &m[4])?;
        gated_add(&x, &m[5], &self.ff.forward(&h)?)
    }
}
