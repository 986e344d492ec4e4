//! Flux's transformer blocks with negative-text guidance.
//!
//! Data flow under attention guidance (the official diffusers NAG semantics):
//! - double blocks: the image stream exists once and is modulated by the positive `temb`; the
//!   positive and negative text streams each have their own modulation. Image queries attend to
//!   `[text+ ; image]` and `[text- ; image]`; the image-over-image block is computed once and
//!   merged with each text block by log-sum-exp ([`crate::guidance::guided_attention()`]), which
//!   also combines `Z+` and `Z-` of the image rows; each text stream keeps its own output.
//! - single blocks: two halves `[text+ ; image]` and `[text- ; image']`, stacked on the batch,
//!   each with its own modulation, MLP and residual; in attention the image rows of both halves
//!   are replaced by `contrast(Z+, Z-)`.
//! - single blocks, `NagVariant::SharedImage` (veto's opt-in variant, not the official data
//!   flow): one image stream as in the double blocks; the negative text is a stream of its own
//!   (its modulation, MLP and residual) whose keys the image queries also attend to.

use crate::attention::{merge_heads, sdpa};
use crate::guidance::{guided_attention, AttentionGuidance, Contrast, GuidedAttention, KeyValues, NegativeKeyValues};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{RmsNorm, VarBuilder};

use super::embeddings::Rope;
use crate::models::layers::{gated_add, linear, norm_and_modulate, FeedForward, Linear, Modulation, QuantizedWeights};
use crate::profile;

/// q/k/v projections of one token stream with per-head RMSNorm on q and k.
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

/// Query, key and value of a stream, `[B, H, S, head_dim]`, rotated.
struct Heads {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

impl Qkv {
    fn new(dim: usize, head_dim: usize, names: [&str; 5], vb: &VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        Ok(Self {
            q: linear(dim, dim, vb.pp(names[0]), q)?,
            k: linear(dim, dim, vb.pp(names[1]), q)?,
            v: linear(dim, dim, vb.pp(names[2]), q)?,
            norm_q: candle_nn::rms_norm(head_dim, 1e-6, vb.pp(names[3]))?,
            norm_k: candle_nn::rms_norm(head_dim, 1e-6, vb.pp(names[4]))?,
        })
    }

    fn heads(&self, x: &Tensor, n_heads: usize, rope: &Rope) -> Result<Heads> {
        let (b, s, dim) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, s, n_heads, dim / n_heads));
        let (q, k) = (split(self.q.forward(x)?)?, split(self.k.forward(x)?)?);
        let (q, k) = profile::timed(profile::Op::Norm, || -> Result<(Tensor, Tensor)> {
            Ok((self.norm_q.forward(&q)?.transpose(1, 2)?, self.norm_k.forward(&k)?.transpose(1, 2)?))
        })?;
        let v = profile::contiguous(&split(self.v.forward(x)?)?.transpose(1, 2)?)?;
        // The rotation reads the transposed heads in place and writes them contiguous.
        Ok(Heads { q: rope.apply(&q)?, k: rope.apply(&k)?, v })
    }
}

/// Text streams of a double block: the positive one, and the negative one under guidance.
pub struct TextStreams {
    pub pos: Tensor,
    pub neg: Option<Tensor>,
}

/// Conditioning vectors: positive, and negative when a negative text stream exists.
pub struct Temb<'a> {
    pub pos: &'a Tensor,
    pub neg: Option<&'a Tensor>,
}

pub struct DoubleBlock {
    norm1: Modulation,
    norm1_context: Modulation,
    img_qkv: Qkv,
    txt_qkv: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
}

impl DoubleBlock {
    pub fn new(dim: usize, heads: usize, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        let head_dim = dim / heads;
        let attn = vb.pp("attn");
        Ok(Self {
            norm1: Modulation::new(dim, 6, vb.pp("norm1"), q)?,
            norm1_context: Modulation::new(dim, 6, vb.pp("norm1_context"), q)?,
            img_qkv: Qkv::new(dim, head_dim, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], &attn, q)?,
            txt_qkv: Qkv::new(
                dim,
                head_dim,
                ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"],
                &attn,
                q,
            )?,
            to_out: linear(dim, dim, attn.pp("to_out.0"), q)?,
            to_add_out: linear(dim, dim, attn.pp("to_add_out"), q)?,
            ff: FeedForward::new(dim, vb.pp("ff"), q)?,
            ff_context: FeedForward::new(dim, vb.pp("ff_context"), q)?,
            heads,
        })
    }

    /// Attention output of the text queries of one stream over `[text ; image]`.
    fn text_rows(&self, txt: &Heads, img: &Heads, scale: f64) -> Result<Tensor> {
        let k = profile::cat(&[&txt.k, &img.k], 2)?;
        let v = profile::cat(&[&txt.v, &img.v], 2)?;
        merge_heads(&sdpa(&txt.q, &k, &v, scale)?)
    }

    /// Text stream update after attention: gated residual, modulated feed-forward.
    fn text_update(&self, txt: &Tensor, attn: &Tensor, m: &[Tensor]) -> Result<Tensor> {
        let txt = gated_add(txt, &m[2], &self.to_add_out.forward(attn)?)?;
        let ff = self.ff_context.forward(&norm_and_modulate(&txt, &m[3], &m[4])?)?;
        gated_add(&txt, &m[5], &ff)
    }

    /// `rope_txt` covers the text rows, `rope_img` the image rows (both streams share text
    /// positions). `method` is this step's attention guidance; it needs `txt.neg` and `temb.neg`.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &TextStreams,
        temb: &Temb,
        rope_txt: &Rope,
        rope_img: &Rope,
        method: Option<&AttentionGuidance>,
    ) -> Result<(Tensor, TextStreams)> {
        let scale = 1.0 / ((img.dim(D::Minus1)? / self.heads) as f64).sqrt();
        let mi = self.norm1.chunks(temb.pos)?;
        let img_h = self.img_qkv.heads(&norm_and_modulate(img, &mi[0], &mi[1])?, self.heads, rope_img)?;

        let mp = self.norm1_context.chunks(temb.pos)?;
        let pos_h = self.txt_qkv.heads(&norm_and_modulate(&txt.pos, &mp[0], &mp[1])?, self.heads, rope_txt)?;
        let pos_txt_attn = self.text_rows(&pos_h, &img_h, scale)?;

        // The negative text stream, with its own modulation, under guidance.
        let neg = match (method, &txt.neg, temb.neg) {
            (Some(_), Some(neg), Some(temb_neg)) => {
                let mn = self.norm1_context.chunks(temb_neg)?;
                let neg_h = self.txt_qkv.heads(&norm_and_modulate(neg, &mn[0], &mn[1])?, self.heads, rope_txt)?;
                Some((neg, mn, neg_h))
            }
            (Some(_), _, _) => candle_core::bail!("attention guidance needs the negative text stream"),
            _ => None,
        };
        // Image rows: over [image ; text+] and [image ; text-], image-over-image once.
        let batch = img.dim(0)?;
        let img_attn = guided_attention(
            &GuidedAttention {
                q: &img_h.q,
                shared: Some(KeyValues { k: &img_h.k, v: &img_h.v }),
                positive: KeyValues { k: &pos_h.k, v: &pos_h.v },
                negative: neg
                    .as_ref()
                    .map(|(_, _, h)| NegativeKeyValues { kv: KeyValues { k: &h.k, v: &h.v }, rows: 0..batch }),
                scale,
            },
            method,
        )?;
        let neg_out = match &neg {
            Some((neg, mn, neg_h)) => Some(self.text_update(neg, &self.text_rows(neg_h, &img_h, scale)?, mn)?),
            None => None,
        };

        let img = gated_add(img, &mi[2], &self.to_out.forward(&img_attn)?)?;
        let ff = self.ff.forward(&norm_and_modulate(&img, &mi[3], &mi[4])?)?;
        let img = gated_add(&img, &mi[5], &ff)?;
        let pos = self.text_update(&txt.pos, &pos_txt_attn, &mp)?;
        Ok((img, TextStreams { pos, neg: neg_out }))
    }
}

pub struct SingleBlock {
    norm: Modulation,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SingleBlock {
    pub fn new(dim: usize, heads: usize, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm: Modulation::new(dim, 3, vb.pp("norm"), q)?,
            qkv: Qkv::new(dim, head_dim, ["to_q", "to_k", "to_v", "norm_q", "norm_k"], &vb.pp("attn"), q)?,
            proj_mlp: linear(dim, 4 * dim, vb.pp("proj_mlp"), q)?,
            proj_out: linear(5 * dim, dim, vb.pp("proj_out"), q)?,
            heads,
        })
    }

    /// `x` `[B or 2B, text_len + image_len, dim]`; under guidance the positive half is the first
    /// B rows and `temb` is `[2B, dim]` (positive, then negative).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        text_len: usize,
        rope: &Rope,
        contrast: Option<&Contrast>,
    ) -> Result<Tensor> {
        let scale = 1.0 / ((x.dim(D::Minus1)? / self.heads) as f64).sqrt();
        let m = self.norm.chunks(temb)?;
        let h = norm_and_modulate(x, &m[0], &m[1])?;
        let mlp = crate::kernels::gelu_tanh(&self.proj_mlp.forward(&h)?)?;
        let heads = self.qkv.heads(&h, self.heads, rope)?;
        let mut attn = merge_heads(&sdpa(&heads.q, &heads.k, &heads.v, scale)?)?;
        if let Some(c) = contrast {
            let b = x.dim(0)? / 2;
            let seq = x.dim(1)?;
            let image_len = seq - text_len;
            let z_pos = attn.narrow(0, 0, b)?.narrow(1, text_len, image_len)?;
            let z_neg = attn.narrow(0, b, b)?.narrow(1, text_len, image_len)?;
            let guided = c.combine(&z_pos, &z_neg)?;
            let both = profile::cat(&[&guided, &guided], 0)?;
            attn = profile::cat(&[&attn.narrow(1, 0, text_len)?, &both], 1)?;
        }
        let out = self.proj_out.forward(&profile::cat(&[&attn, &mlp], D::Minus1)?)?;
        gated_add(x, &m[2], &out)
    }

    /// The shared-image variant: `x` `[B, text_len + image_len, dim]` is the positive half only,
    /// `neg_txt` `[B, text_len, dim]` the negative text stream (modulated by `temb_neg`). The
    /// image queries attend to `[image ; text+]` and `[image ; text-]` (image-over-image once),
    /// combined by `method`; the negative text attends to `[text- ; image]`. Returns both
    /// updated streams.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_shared_image(
        &self,
        x: &Tensor,
        neg_txt: &Tensor,
        temb_pos: &Tensor,
        temb_neg: &Tensor,
        rope: &Rope,
        rope_txt: &Rope,
        method: &AttentionGuidance,
    ) -> Result<(Tensor, Tensor)> {
        let scale = 1.0 / ((x.dim(D::Minus1)? / self.heads) as f64).sqrt();
        let (b, seq, _) = x.dims3()?;
        let text_len = neg_txt.dim(1)?;
        let image_len = seq - text_len;
        let m = self.norm.chunks(temb_pos)?;
        let mn = self.norm.chunks(temb_neg)?;
        let h = norm_and_modulate(x, &m[0], &m[1])?;
        let hn = norm_and_modulate(neg_txt, &mn[0], &mn[1])?;
        let pos = self.qkv.heads(&h, self.heads, rope)?;
        let neg = self.qkv.heads(&hn, self.heads, rope_txt)?;
        let part = |t: &Tensor, start: usize, len: usize| t.narrow(2, start, len)?.contiguous();
        let (txt_k, txt_v) = (part(&pos.k, 0, text_len)?, part(&pos.v, 0, text_len)?);
        let (img_k, img_v) = (part(&pos.k, text_len, image_len)?, part(&pos.v, text_len, image_len)?);
        // Positive text rows: plain attention over [text+ ; image].
        let txt_attn = merge_heads(&sdpa(&part(&pos.q, 0, text_len)?, &pos.k, &pos.v, scale)?)?;
        let img_attn = guided_attention(
            &GuidedAttention {
                q: &part(&pos.q, text_len, image_len)?,
                shared: Some(KeyValues { k: &img_k, v: &img_v }),
                positive: KeyValues { k: &txt_k, v: &txt_v },
                negative: Some(NegativeKeyValues { kv: KeyValues { k: &neg.k, v: &neg.v }, rows: 0..b }),
                scale,
            },
            Some(method),
        )?;
        let attn = profile::cat(&[&txt_attn, &img_attn], 1)?;
        let mlp = crate::kernels::gelu_tanh(&self.proj_mlp.forward(&h)?)?;
        let out = self.proj_out.forward(&profile::cat(&[&attn, &mlp], D::Minus1)?)?;
        let x = gated_add(x, &m[2], &out)?;
        // The negative text stream over [text- ; image].
        let k = profile::cat(&[&neg.k, &img_k], 2)?;
        let v = profile::cat(&[&neg.v, &img_v], 2)?;
        let neg_attn = merge_heads(&sdpa(&neg.q, &k, &v, scale)?)?;
        let neg_mlp = crate::kernels::gelu_tanh(&self.proj_mlp.forward(&hn)?)?;
        let neg_out = self.proj_out.forward(&profile::cat(&[&neg_attn, &neg_mlp], D::Minus1)?)?;
        let neg_txt = gated_add(neg_txt, &mn[2], &neg_out)?;
        Ok((x, neg_txt))
    }
}
