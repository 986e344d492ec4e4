//! Value Sign Flip (VSF paper, sections 3.1-3.4). VSF is not a merge of two attention outputs:
//! it changes the attention itself (the negative prompt's keys with its values times -alpha,
//! visible to image queries only, logits biased by -beta). It is computed per key block and the
//! blocks are merged by log-sum-exp ([`crate::attention`]), so no dense `L x L` mask is ever
//! built: the image rows through [`super::guided_attention()`] with the [`flipped_block`], the
//! MMDiT's text rows through [`text_rows`].
//!
//! Both layouts reduce to the same block structure. The text stream is `[A, N]` with `N` the
//! last `neg_len` tokens (the negative prompt, unpadded):
//! - image queries see `I`, `A`, and `N'` = (keys of `N`, values `-alpha V(N)`, bias `-beta`);
//! - `A` queries see `I`, `A`; `N` queries see `I`, `N`.
//!
//! `paper` ([`VsfLayout::Paper`]): stream `[P, N0]`, so `A = P`: the image sees `P` and the
//! flipped copy `N1`, not `N0`; `P` sees `I, P`; `N0` sees `I, N0`.
//! `official` ([`VsfLayout::Official`], the official SD3 pipeline's mask): stream
//! `[P, Na, Nb]`, so `A = [P, Na]`: the image also sees the *unflipped* `Na`; `P` and `Na` see
//! `I, P, Na`; `Nb` sees `I, Nb`; the flipped copy is `Nb'`.

use crate::attention::{attend_block, merge_blocks, BlockAttention};
use candle_core::{Result, Tensor};

/// Which token layout VSF uses (MMDiT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VsfLayout {
    /// As the paper describes: context `[P, N0]` plus a flipped copy `N1` (keys of N0, values
    /// -alpha V(N0)) seen by image queries only, with bias -beta.
    #[default]
    Paper,
    /// What the official SD3 pipeline runs: context `[P, Na, Nb]`; image queries see `Na`
    /// unflipped and `Nb'` flipped with the bias.
    Official,
}

impl std::str::FromStr for VsfLayout {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "paper" => Ok(VsfLayout::Paper),
            "official" => Ok(VsfLayout::Official),
            other => Err(format!("unknown VSF layout '{other}' (expected paper or official)")),
        }
    }
}

impl std::fmt::Display for VsfLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VsfLayout::Paper => "paper",
            VsfLayout::Official => "official",
        })
    }
}

/// VSF parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VsfParams {
    /// `vsf_scale`, alpha: the negative values are multiplied by -alpha.
    pub scale: f64,
    /// `vsf_bias`, beta: added as -beta to the image -> flipped-negative logits (after 1/sqrt(d)).
    pub bias: f64,
    /// The token layout (MMDiT).
    pub layout: VsfLayout,
}

impl Default for VsfParams {
    /// The paper's SD3.5-Large-Turbo defaults: alpha 3.5, beta 0.1.
    fn default() -> Self {
        VsfParams { scale: 3.5, bias: 0.1, layout: VsfLayout::Paper }
    }
}

/// The text stream VSF runs with: `[P, N]` (paper) or `[P, N, N]` (official), `[B, S, D]` each,
/// concatenated on the sequence axis. The flipped copy is not part of the stream: it exists
/// only as a key/value block ([`flipped_block`]).
pub fn text_stream(positive: &Tensor, negative: &Tensor, layout: VsfLayout) -> Result<Tensor> {
    match layout {
        VsfLayout::Paper => Tensor::cat(&[positive, negative], 1),
        VsfLayout::Official => Tensor::cat(&[positive, negative, negative], 1),
    }
}

/// The flipped copy of the negative block, kept mergeable: the queries over the negative keys
/// with values `-alpha V` and every logit biased by `-beta` (after the `scale`).
pub fn flipped_block(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, params: &VsfParams) -> Result<BlockAttention> {
    let flipped = crate::profile::timed(crate::profile::Op::Guidance, || v * -params.scale)?;
    attend_block(q, k, &flipped, scale, Some(-params.bias))
}

/// Key and value heads of one token group, `[B, H, S, d]`.
pub struct Heads<'a> {
    /// Keys.
    pub k: &'a Tensor,
    /// Values.
    pub v: &'a Tensor,
}

/// MMDiT joint attention under VSF, text rows: the queries `q_txt` of the stream `[A, N]`
/// (`N` its last `neg_len` tokens) over their allowed blocks (module docs): `A` over `[I, A]`,
/// `N` over `[I, N]`; the image block is computed once. The image rows are
/// [`super::guided_attention()`] over `[I, A, N']`. Heads still split, `[B, H, S_txt, d]`.
pub fn text_rows(q_txt: &Tensor, img: &Heads, txt: &Heads, neg_len: usize, scale: f64) -> Result<Tensor> {
    let txt_len = txt.k.dim(2)?;
    if neg_len == 0 || neg_len > txt_len {
        candle_core::bail!("VSF: negative length {neg_len} does not fit a text stream of {txt_len} tokens");
    }
    let a_len = txt_len - neg_len;
    let txt_img = attend_block(q_txt, img.k, img.v, scale, None)?;
    let rows = |start: usize, len: usize| -> Result<Tensor> {
        let (k, v) = (txt.k.narrow(2, start, len)?, txt.v.narrow(2, start, len)?);
        let own = attend_block(&q_txt.narrow(2, start, len)?, &k, &v, scale, None)?;
        let over_img =
            BlockAttention { out: txt_img.out.narrow(2, start, len)?, lse: txt_img.lse.narrow(2, start, len)? };
        merge_blocks(&[&over_img, &own])
    };
    let n_rows = rows(a_len, neg_len)?;
    if a_len == 0 {
        return Ok(n_rows);
    }
    Tensor::cat(&[&rows(0, a_len)?, &n_rows], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{merge_heads, sdpa};
    use candle_core::{DType, Device, D};

    /// The dense oracle: one softmax over all keys `[I, T, N']` with an additive `[Q, K]` mask.
    fn dense(q: &Tensor, k: &Tensor, v: &Tensor, mask: &[Vec<f32>], scale: f64) -> Tensor {
        let (qn, kn) = (mask.len(), mask[0].len());
        let flat: Vec<f32> = mask.iter().flatten().copied().collect();
        let m = Tensor::from_vec(flat, (qn, kn), q.device()).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&m).unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(v).unwrap()
    }

    /// The paper's mask (VSF 3.2-3.3) over queries `[I, P, N0]` and keys `[I, P, N0, N1]`.
    fn paper_mask(n: usize, lp: usize, ln: usize, beta: f32) -> Vec<Vec<f32>> {
        let (i_end, p_end, n0_end) = (n, n + lp, n + lp + ln);
        let kind = |j: usize| match j {
            j if j < i_end => 'I',
            j if j < p_end => 'P',
            j if j < n0_end => '0',
            _ => '1',
        };
        (0..n0_end)
            .map(|row| {
                (0..n0_end + ln)
                    .map(|col| match (kind(row), kind(col)) {
                        ('I', 'I' | 'P') => 0.0,
                        ('I', '1') => -beta,
                        ('P', 'I' | 'P') => 0.0,
                        ('0', 'I' | '0') => 0.0,
                        _ => f32::NEG_INFINITY,
                    })
                    .collect()
            })
            .collect()
    }

    /// The official SD3 pipeline's mask, built the way its code builds it: zeros over
    /// queries `[I, P, Na, Nb]` x keys `[I, P, Na, Nb, Nb']`, then four slice rules.
    fn official_mask(img_len: usize, lp: usize, neg_len: usize, offset: f32) -> Vec<Vec<f32>> {
        let pos_len = lp + neg_len; // their `pos_len` is the length of [P, Na]
        let q = img_len + lp + 2 * neg_len;
        let k = q + neg_len;
        let mut m = vec![vec![0f32; k]; q];
        let inf = f32::NEG_INFINITY;
        // text rows cannot see Nb'
        for row in m.iter_mut().skip(q - neg_len - pos_len) {
            for c in &mut row[k - neg_len..] {
                *c = inf;
            }
        }
        // I, P, Na cannot see Nb
        for row in m.iter_mut().take(q - neg_len) {
            for c in &mut row[k - 2 * neg_len..k - neg_len] {
                *c = inf;
            }
        }
        // Nb cannot see P, Na
        for row in m.iter_mut().skip(q - neg_len) {
            for c in &mut row[img_len..img_len + pos_len] {
                *c = inf;
            }
        }
        // image -> Nb' gets -offset
        for row in m.iter_mut().take(img_len) {
            for c in &mut row[k - neg_len..] {
                *c -= offset;
            }
        }
        m
    }

    fn randn(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        // Deterministic pseudo-random values without a global RNG.
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Image rows (heads merged) and, given text queries, text rows (heads split) of the MMDiT
    /// joint attention under VSF, as the model computes them.
    fn joint(
        qi: &Tensor,
        img: &Heads,
        q_txt: Option<&Tensor>,
        txt: &Heads,
        neg_len: usize,
        scale: f64,
        params: &VsfParams,
    ) -> (Tensor, Option<Tensor>) {
        use crate::guidance::{guided_attention, AttentionGuidance, GuidedAttention, KeyValues, NegativeKeyValues};
        let a_len = txt.k.dim(2).unwrap() - neg_len;
        let part = |t: &Tensor, start: usize, len: usize| t.narrow(2, start, len).unwrap();
        let (ka, va) = (part(txt.k, 0, a_len), part(txt.v, 0, a_len));
        let (kn, vn) = (part(txt.k, a_len, neg_len), part(txt.v, a_len, neg_len));
        let image = guided_attention(
            &GuidedAttention {
                q: qi,
                shared: Some(KeyValues { k: img.k, v: img.v }),
                positive: KeyValues { k: &ka, v: &va },
                negative: Some(NegativeKeyValues { kv: KeyValues { k: &kn, v: &vn }, rows: 0..qi.dim(0).unwrap() }),
                scale,
            },
            Some(&AttentionGuidance::Vsf(*params)),
        )
        .unwrap();
        (image, q_txt.map(|q| text_rows(q, img, txt, neg_len, scale).unwrap()))
    }

    fn check_layout(layout: VsfLayout) {
        let (b, h, d, n, lp, ln) = (2, 2, 8, 5, 4, 3);
        let params = VsfParams { scale: 3.5, bias: 0.7, layout };
        let scale = 1.0 / (d as f64).sqrt();
        let (qi, ki, vi) = (randn((b, h, n, d), 1), randn((b, h, n, d), 2), randn((b, h, n, d), 3));
        let (qp, kp, vp) = (randn((b, h, lp, d), 4), randn((b, h, lp, d), 5), randn((b, h, lp, d), 6));
        let (qn, kn, vn) = (randn((b, h, ln, d), 7), randn((b, h, ln, d), 8), randn((b, h, ln, d), 9));
        // The text stream as the model would project it: the official layout repeats N.
        let stream = |p: &Tensor, neg: &Tensor| -> Tensor {
            match layout {
                VsfLayout::Paper => Tensor::cat(&[p, neg], 2).unwrap(),
                VsfLayout::Official => Tensor::cat(&[p, neg, neg], 2).unwrap(),
            }
        };
        let (qt, kt, vt) = (stream(&qp, &qn), stream(&kp, &kn), stream(&vp, &vn));
        let (got_img, got_txt) =
            joint(&qi, &Heads { k: &ki, v: &vi }, Some(&qt), &Heads { k: &kt, v: &vt }, ln, scale, &params);

        let q_all = Tensor::cat(&[&qi, &qt], 2).unwrap();
        let k_all = Tensor::cat(&[&ki, &kt, &kn], 2).unwrap();
        let v_all = Tensor::cat(&[&vi, &vt, &(&vn * -params.scale).unwrap()], 2).unwrap();
        let mask = match layout {
            VsfLayout::Paper => paper_mask(n, lp, ln, params.bias as f32),
            VsfLayout::Official => official_mask(n, lp, ln, params.bias as f32),
        };
        let want = dense(&q_all, &k_all, &v_all, &mask, scale);
        let want_img = merge_heads(&want.narrow(2, 0, n).unwrap()).unwrap();
        let want_txt = want.narrow(2, n, qt.dim(2).unwrap()).unwrap();
        assert!(max_diff(&got_img, &want_img) < 1e-5, "{layout:?} image rows");
        assert!(max_diff(got_txt.as_ref().unwrap(), &want_txt) < 1e-5, "{layout:?} text rows");
    }

    #[test]
    fn blockwise_equals_dense_mask_paper_layout() {
        check_layout(VsfLayout::Paper);
    }

    #[test]
    fn blockwise_equals_dense_mask_official_layout() {
        check_layout(VsfLayout::Official);
    }

    #[test]
    fn zero_scale_and_huge_bias_reduce_to_plain_attention_over_image_and_positive() {
        // alpha = 0 with beta -> inf hides N' entirely: image rows = attention over [I, A].
        let (b, h, d, n, lp, ln) = (1, 1, 4, 3, 2, 2);
        let (qi, ki, vi) = (randn((b, h, n, d), 11), randn((b, h, n, d), 12), randn((b, h, n, d), 13));
        let (kt, vt) = (randn((b, h, lp + ln, d), 14), randn((b, h, lp + ln, d), 15));
        let params = VsfParams { scale: 0.0, bias: 1e4, layout: VsfLayout::Paper };
        let (got, text) = joint(&qi, &Heads { k: &ki, v: &vi }, None, &Heads { k: &kt, v: &vt }, ln, 0.5, &params);
        assert!(text.is_none());
        let k = Tensor::cat(&[&ki, &kt.narrow(2, 0, lp).unwrap()], 2).unwrap();
        let v = Tensor::cat(&[&vi, &vt.narrow(2, 0, lp).unwrap()], 2).unwrap();
        let want = merge_heads(&sdpa(&qi, &k, &v, 0.5).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        assert_eq!(got.dtype(), DType::F32);
    }

    #[test]
    fn text_stream_layouts() {
        let p = Tensor::zeros((1, 4, 2), DType::F32, &Device::Cpu).unwrap();
        let n = Tensor::ones((1, 3, 2), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(text_stream(&p, &n, VsfLayout::Paper).unwrap().dims(), &[1, 7, 2]);
        assert_eq!(text_stream(&p, &n, VsfLayout::Official).unwrap().dims(), &[1, 10, 2]);
        assert!("OFFICIAL".parse::<VsfLayout>().is_ok());
        assert!("dense".parse::<VsfLayout>().is_err());
    }
}
