//! The MMDiT joint transformer block (diffusers `JointTransformerBlock`) with negative-prompt
//! guidance in its joint attention.
//!
//! Data flow per guidance (the official NAG / VSF SD3 code's semantics):
//! - none: image and text tokens attend jointly (one softmax over `[I, T]`).
//! - NAG / NASA ([`BlockGuide::Contrast`]): the negative text is a stream of its own through
//!   every block, with its own modulation; it pairs with the guided rows of the image batch
//!   (with batched CFG `[uncond, cond]`, the cond row: as the official processor does). Those
//!   image rows attend to `[I, T+]` and `[I, T-]` through
//!   [`crate::guidance::guided_attention()`] (image-over-image once, merged by log-sum-exp).
//!   The image stream exists once; the negative stream's own rows attend to `[I, T-]`.
//! - VSF ([`BlockGuide::Vsf`]): one text stream `[A, N]` whose last `neg_len` tokens are the
//!   negative prompt; the image rows see `[I, A, N']`, the text rows their own blocks. On the
//!   CPU in f32 one softmax over the concatenated keys with a bias on the N' tail does both
//!   (`JointBlock::vsf_one_softmax`); elsewhere the same routine as NAG's merges per-block
//!   attentions ([`crate::guidance::vsf::text_rows`] for the text rows).
//! - MMDiT-X blocks (SD3.5-Medium) also run `attn2`, image-only self-attention, unguided.
//! - The last block is `context_pre_only`: its text streams only give keys and values.

use std::ops::Range;

use crate::attention::{attend_block, merge_blocks, merge_heads, sdpa, sdpa_tail_bias};
use crate::guidance::vsf::{self, VsfParams};
use crate::guidance::{guided_attention, AttentionGuidance, GuidedAttention, KeyValues, NegativeKeyValues};
use crate::kernels::{is_cpu_f32, TailBias};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{RmsNorm, VarBuilder};

use crate::models::layers::{
    gated_add, layer_norm, linear, modulate_normed, norm_and_modulate, FeedForward, Linear, Modulation,
    QuantizedWeights,
};
use crate::profile::{self, Op};

/// q/k/v projections of one token stream, with the optional per-head RMSNorm of q and k
/// (`qk_norm: "rms_norm"`). `q` is absent where no query is ever needed (the text side of a
/// `context_pre_only` block).
struct Projections {
    q: Option<Linear>,
    k: Linear,
    v: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
}

/// `[B, H, S, d]` heads of one stream.
pub struct Heads {
    pub q: Option<Tensor>,
    pub k: Tensor,
    pub v: Tensor,
}

impl Heads {
    fn as_vsf(&self) -> vsf::Heads<'_> {
        vsf::Heads { k: &self.k, v: &self.v }
    }

    fn q(&self) -> Result<&Tensor> {
        self.q.as_ref().ok_or_else(|| candle_core::Error::Msg("no queries for this stream".into()))
    }

    /// Rows `start..start+len` of the batch.
    fn rows(&self, start: usize, len: usize) -> Result<Heads> {
        Ok(Heads {
            q: self.q.as_ref().map(|q| q.narrow(0, start, len)).transpose()?,
            k: self.k.narrow(0, start, len)?,
            v: self.v.narrow(0, start, len)?,
        })
    }
}

impl Projections {
    /// `names`: q, k, v, norm_q, norm_k (as the checkpoint spells them under `attn`).
    fn new(
        dim: usize,
        head_dim: usize,
        qk_norm: bool,
        with_q: bool,
        names: [&str; 5],
        vb: &VarBuilder,
        q: &QuantizedWeights,
    ) -> Result<Self> {
        let norm = |name: &str, wanted: bool| -> Result<Option<RmsNorm>> {
            if qk_norm && wanted {
                Ok(Some(candle_nn::rms_norm(head_dim, 1e-6, vb.pp(name))?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            q: if with_q { Some(linear(dim, dim, vb.pp(names[0]), q)?) } else { None },
            k: linear(dim, dim, vb.pp(names[1]), q)?,
            v: linear(dim, dim, vb.pp(names[2]), q)?,
            norm_q: norm(names[3], with_q)?,
            norm_k: norm(names[4], true)?,
        })
    }

    fn heads(&self, x: &Tensor, n_heads: usize) -> Result<Heads> {
        let (b, s, dim) = x.dims3()?;
        let split = |lin: &Linear, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let t = lin.forward(x)?.reshape((b, s, n_heads, dim / n_heads))?;
            let t = match norm {
                Some(n) => profile::timed(profile::Op::Norm, || n.forward(&t))?,
                None => t,
            };
            profile::contiguous(&t.transpose(1, 2)?)
        };
        Ok(Heads {
            q: self.q.as_ref().map(|q| split(q, self.norm_q.as_ref())).transpose()?,
            k: split(&self.k, self.norm_k.as_ref())?,
            v: split(&self.v, None)?,
        })
    }
}

/// What the joint attention of a block does at this step.
#[derive(Clone)]
pub enum BlockGuide<'a> {
    None,
    /// NAG / NASA with the negative stream, guiding the image rows `rows` (module docs).
    Contrast {
        method: &'a AttentionGuidance,
        rows: Range<usize>,
    },
    /// VSF: the last `neg_len` tokens of the text stream are the negative prompt.
    Vsf {
        method: &'a AttentionGuidance,
        neg_len: usize,
    },
}

/// A block's streams: image `[B, N, D]`, text `[B, T, D]` (absent after the last block), and
/// the NAG/NASA negative text `[Bn, Tn, D]`.
pub struct Streams {
    pub img: Tensor,
    pub txt: Option<Tensor>,
    pub neg: Option<Tensor>,
}

/// The text side's modulation: AdaLayerNormZero (6 chunks) or, in a `context_pre_only` block,
/// AdaLayerNormContinuous (scale, shift).
struct TextModulation {
    normed: Tensor,
    /// gate_msa, shift_mlp, scale_mlp, gate_mlp (absent in a `context_pre_only` block).
    rest: Option<[Tensor; 4]>,
}

pub struct JointBlock {
    norm1: Modulation,
    norm1_context: Modulation,
    img: Projections,
    txt: Projections,
    to_out: Linear,
    to_add_out: Option<Linear>,
    attn2: Option<(Projections, Linear)>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
    heads: usize,
    context_pre_only: bool,
}

impl JointBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        qk_norm: bool,
        context_pre_only: bool,
        dual_attention: bool,
        vb: VarBuilder,
        q: &QuantizedWeights,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        let attn = vb.pp("attn");
        let img_names = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
        let attn2 = if dual_attention {
            let a2 = vb.pp("attn2");
            Some((
                Projections::new(dim, head_dim, qk_norm, true, img_names, &a2, q)?,
                linear(dim, dim, a2.pp("to_out.0"), q)?,
            ))
        } else {
            None
        };
        Ok(Self {
            norm1: Modulation::new(dim, if dual_attention { 9 } else { 6 }, vb.pp("norm1"), q)?,
            norm1_context: Modulation::new(dim, if context_pre_only { 2 } else { 6 }, vb.pp("norm1_context"), q)?,
            img: Projections::new(dim, head_dim, qk_norm, true, img_names, &attn, q)?,
            txt: Projections::new(
                dim,
                head_dim,
                qk_norm,
                !context_pre_only,
                ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"],
                &attn,
                q,
            )?,
            to_out: linear(dim, dim, attn.pp("to_out.0"), q)?,
            to_add_out: if context_pre_only { None } else { Some(linear(dim, dim, attn.pp("to_add_out"), q)?) },
            attn2,
            ff: FeedForward::new(dim, vb.pp("ff"), q)?,
            ff_context: if context_pre_only { None } else { Some(FeedForward::new(dim, vb.pp("ff_context"), q)?) },
            heads,
            context_pre_only,
        })
    }

    pub fn context_pre_only(&self) -> bool {
        self.context_pre_only
    }

    fn text_modulation(&self, txt: &Tensor, temb: &Tensor) -> Result<TextModulation> {
        let m = self.norm1_context.chunks(temb)?;
        let normed = layer_norm(txt)?;
        if self.context_pre_only {
            // AdaLayerNormContinuous: scale first, then shift.
            return Ok(TextModulation { normed: modulate_normed(&normed, &m[1], &m[0])?, rest: None });
        }
        Ok(TextModulation {
            normed: modulate_normed(&normed, &m[0], &m[1])?,
            rest: Some([m[2].clone(), m[3].clone(), m[4].clone(), m[5].clone()]),
        })
    }

    /// Text stream after attention: gated residual, then the modulated feed-forward.
    fn text_update(&self, txt: &Tensor, attn: Option<Tensor>, m: &TextModulation) -> Result<Option<Tensor>> {
        let (Some(attn), Some([gate_msa, shift_mlp, scale_mlp, gate_mlp]), Some(to_add_out), Some(ff)) =
            (attn, &m.rest, &self.to_add_out, &self.ff_context)
        else {
            return Ok(None);
        };
        let txt = gated_add(txt, gate_msa, &to_add_out.forward(&attn)?)?;
        let ff_out = ff.forward(&norm_and_modulate(&txt, shift_mlp, scale_mlp)?)?;
        Ok(Some(gated_add(&txt, gate_mlp, &ff_out)?))
    }

    /// VSF's joint attention as one softmax (CPU, f32): the keys `[I, A, N]` concatenated as the
    /// plain path does, the values with the N block flipped (`-alpha V`); the image queries see
    /// N with logits biased by `-beta`, the A queries do not see it ([`TailBias`]); the few N
    /// queries attend `[I, N]` unflipped by a block merge. Equal to the per-block merge of
    /// [`guided_attention`] and [`vsf::text_rows`], without their per-block log-sum-exps and
    /// merge passes over every image row. Returns the image rows and the text rows, heads merged.
    fn vsf_one_softmax(
        img_h: &Heads,
        txt_h: &Heads,
        neg_len: usize,
        p: &VsfParams,
        scale: f64,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n_img = img_h.k.dim(2)?;
        let a_len = txt_h.k.dim(2)? - neg_len;
        let v_n = txt_h.v.narrow(2, a_len, neg_len)?;
        let flipped = profile::timed(Op::Guidance, || &v_n * -p.scale)?;
        let k = profile::cat(&[&img_h.k, &txt_h.k], 2)?;
        let v = profile::cat(&[&img_h.v, &txt_h.v.narrow(2, 0, a_len)?, &flipped], 2)?;
        let q = match &txt_h.q {
            Some(qt) => profile::cat(&[img_h.q()?, &qt.narrow(2, 0, a_len)?], 2)?,
            None => img_h.q()?.clone(),
        };
        let bias = TailBias { tail: neg_len, split: n_img, before: -p.bias as f32, after: f32::NEG_INFINITY };
        let out = sdpa_tail_bias(&q, &k, &v, scale, bias)?;
        let z_img = merge_heads(&out.narrow(2, 0, n_img)?)?;
        let txt_attn = match &txt_h.q {
            Some(qt) => {
                let n_block = Heads { q: None, k: txt_h.k.narrow(2, a_len, neg_len)?, v: v_n };
                let n_rows = Self::rows_over(&qt.narrow(2, a_len, neg_len)?, &[img_h, &n_block], scale)?;
                Some(merge_heads(&profile::cat(&[&out.narrow(2, n_img, a_len)?, &n_rows], 2)?)?)
            }
            None => None,
        };
        Ok((z_img, txt_attn))
    }

    /// Attention of the queries `q` over the keys and values of `blocks`, merged.
    fn rows_over(q: &Tensor, blocks: &[&Heads], scale: f64) -> Result<Tensor> {
        let parts = blocks.iter().map(|h| attend_block(q, &h.k, &h.v, scale, None)).collect::<Result<Vec<_>>>()?;
        merge_blocks(&parts.iter().collect::<Vec<_>>())
    }

    /// `temb` `[B, D]` conditions the image and text streams; `temb_neg` `[Bn, D]` the negative
    /// stream (NAG/NASA). Returns the streams after the block.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        neg: Option<&Tensor>,
        temb: &Tensor,
        temb_neg: Option<&Tensor>,
        guide: &BlockGuide,
    ) -> Result<Streams> {
        let heads = self.heads;
        let scale = 1.0 / ((img.dim(D::Minus1)? / heads) as f64).sqrt();
        let m = self.norm1.chunks(temb)?;
        let img_normed = layer_norm(img)?;
        let img_h = self.img.heads(&modulate_normed(&img_normed, &m[0], &m[1])?, heads)?;
        let tm = self.text_modulation(txt, temb)?;
        let txt_h = self.txt.heads(&tm.normed, heads)?;
        let n_img = img.dim(1)?;

        let img_kv = KeyValues { k: &img_h.k, v: &img_h.v };
        let (z_img, txt_attn, neg_out) = match guide {
            BlockGuide::None => {
                // Plain joint attention: one softmax over [I, T] for every query.
                let k = profile::cat(&[&img_h.k, &txt_h.k], 2)?;
                let v = profile::cat(&[&img_h.v, &txt_h.v], 2)?;
                let q = match &txt_h.q {
                    Some(qt) => profile::cat(&[img_h.q()?, qt], 2)?,
                    None => img_h.q()?.clone(),
                };
                let out = sdpa(&q, &k, &v, scale)?;
                let z_img = merge_heads(&out.narrow(2, 0, n_img)?)?;
                let txt_attn = match &txt_h.q {
                    Some(qt) => Some(merge_heads(&out.narrow(2, n_img, qt.dim(2)?)?)?),
                    None => None,
                };
                (z_img, txt_attn, None)
            }
            BlockGuide::Vsf { method, neg_len } => {
                let txt_len = txt_h.k.dim(2)?;
                if *neg_len == 0 || *neg_len > txt_len {
                    candle_core::bail!("VSF: negative length {neg_len} does not fit a text stream of {txt_len} tokens");
                }
                let a_len = txt_len - neg_len;
                let (z_img, txt_attn) = match method {
                    AttentionGuidance::Vsf(p) if a_len > 0 && is_cpu_f32(&img_h.k) => {
                        Self::vsf_one_softmax(&img_h, &txt_h, *neg_len, p, scale)?
                    }
                    _ => {
                        let part = |t: &Tensor, start: usize, len: usize| t.narrow(2, start, len);
                        let (k_a, v_a) = (part(&txt_h.k, 0, a_len)?, part(&txt_h.v, 0, a_len)?);
                        let (k_n, v_n) = (part(&txt_h.k, a_len, *neg_len)?, part(&txt_h.v, a_len, *neg_len)?);
                        let z_img = guided_attention(
                            &GuidedAttention {
                                q: img_h.q()?,
                                shared: Some(img_kv),
                                positive: KeyValues { k: &k_a, v: &v_a },
                                negative: Some(NegativeKeyValues {
                                    kv: KeyValues { k: &k_n, v: &v_n },
                                    rows: 0..img.dim(0)?,
                                }),
                                scale,
                            },
                            Some(method),
                        )?;
                        let txt_attn = match &txt_h.q {
                            Some(qt) => {
                                let (img_heads, txt_heads) = (img_h.as_vsf(), txt_h.as_vsf());
                                Some(merge_heads(&vsf::text_rows(qt, &img_heads, &txt_heads, *neg_len, scale)?)?)
                            }
                            None => None,
                        };
                        (z_img, txt_attn)
                    }
                };
                (z_img, txt_attn, None)
            }
            BlockGuide::Contrast { method, rows } => {
                let (Some(neg), Some(temb_neg)) = (neg, temb_neg) else {
                    candle_core::bail!("NAG/NASA needs the negative text stream and its conditioning");
                };
                let nm = self.text_modulation(neg, temb_neg)?;
                let neg_h = self.txt.heads(&nm.normed, heads)?;
                let z_img = guided_attention(
                    &GuidedAttention {
                        q: img_h.q()?,
                        shared: Some(img_kv),
                        positive: KeyValues { k: &txt_h.k, v: &txt_h.v },
                        negative: Some(NegativeKeyValues {
                            kv: KeyValues { k: &neg_h.k, v: &neg_h.v },
                            rows: rows.clone(),
                        }),
                        scale,
                    },
                    Some(method),
                )?;
                let txt_attn = match &txt_h.q {
                    Some(qt) => Some(merge_heads(&Self::rows_over(qt, &[&img_h, &txt_h], scale)?)?),
                    None => None,
                };
                // The negative stream's own rows attend to [I, T-] of their image rows.
                let neg_attn = match &neg_h.q {
                    Some(qn) => {
                        let guided_img = img_h.rows(rows.start, rows.len())?;
                        Some(merge_heads(&Self::rows_over(qn, &[&guided_img, &neg_h], scale)?)?)
                    }
                    None => None,
                };
                (z_img, txt_attn, self.text_update(neg, neg_attn, &nm)?)
            }
        };

        let mut img_out = gated_add(img, &m[2], &self.to_out.forward(&z_img)?)?;
        if let Some((proj, to_out)) = &self.attn2 {
            // SD35AdaLayerNormZeroX: attn2 sees the block input modulated by chunks 6 and 7.
            let h2 = proj.heads(&modulate_normed(&img_normed, &m[6], &m[7])?, heads)?;
            let a2 = merge_heads(&sdpa(h2.q()?, &h2.k, &h2.v, scale)?)?;
            img_out = gated_add(&img_out, &m[8], &to_out.forward(&a2)?)?;
        }
        let ff_out = self.ff.forward(&modulate_normed(&layer_norm(&img_out)?, &m[3], &m[4])?)?;
        let img_out = gated_add(&img_out, &m[5], &ff_out)?;
        let txt_out = self.text_update(txt, txt_attn, &tm)?;
        Ok(Streams { img: img_out, txt: txt_out, neg: neg_out })
    }
}
