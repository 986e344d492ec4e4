//! The one guided-attention routine, and the negative context models receive.
//!
//! Every method that touches attention is the same move: *one* set of queries attends to the
//! positive context, and on the guided batch rows also to the negative one; a block both see
//! (Flux's and the MMDiT's image-over-image keys) is computed once; the results are combined
//! by the method. Softmax over concatenated key blocks equals a log-sum-exp merge of per-block
//! attentions ([`crate::attention::merge_blocks`]), so nothing is concatenated or tiled:
//!
//! - no guidance: `softmax` over `[shared, positive]`;
//! - NAG / NASA ([`Contrast`]): `Z+` over `[shared, positive]`, `Z-` over
//!   `[shared, negative]` from the same queries, combined per token (heads merged);
//! - VSF: one softmax over `[shared, positive, negative']`, `negative'` being the negative keys
//!   with values `-alpha V` and logits biased by `-beta` ([`super::vsf::flipped_block`]).
//!
//! Models build the key/value blocks from their own projections and call [`guided_attention`].

use std::ops::Range;

use candle_core::{Result, Tensor};

use super::vsf::flipped_block;
use super::{AttentionGuidance, Contrast};
use crate::attention::{attend_block, merge_blocks, merge_heads, sdpa, sdpa_tail_bias, BlockAttention};
use crate::kernels::{is_cpu_f32, TailBias};
use crate::profile;

/// The negative prompt as a model receives it for one call: the attention method of this step,
/// the negative text states, and which batch rows it guides. One type for every family.
#[derive(Clone)]
pub struct NegativeContext<'a> {
    /// This step's attention method (from the [`super::GuidancePlan`]).
    pub method: &'a AttentionGuidance,
    /// Negative text states `[rows.len(), T-, D]` as the text encoders give them (VSF:
    /// unpadded).
    pub states: &'a Tensor,
    /// The pooled vector that modulates the negative stream, `[rows.len(), P]`, for models
    /// whose text streams are modulated (Flux, MMDiT).
    pub pooled: Option<&'a Tensor>,
    /// Batch rows the guidance applies to (with batched CFG `[uncond, cond]`: the cond row).
    pub rows: Range<usize>,
}

impl NegativeContext<'_> {
    /// Check that the negative context fits a batch of `batch` rows.
    pub fn check_rows(&self, batch: usize) -> Result<()> {
        let n = self.states.dim(0)?;
        if self.rows.is_empty() || self.rows.end > batch || n != self.rows.len() {
            candle_core::bail!(
                "negative context: {n} rows of states for guided rows {:?} of a batch of {batch}",
                self.rows
            );
        }
        if let Some(p) = self.pooled {
            if p.dim(0)? != n {
                candle_core::bail!("negative pooled vector has batch {}, its states {n}", p.dim(0)?);
            }
        }
        Ok(())
    }
}

/// Keys and values of one block, `[B, H, S, d]`.
#[derive(Clone, Copy)]
pub struct KeyValues<'a> {
    /// Keys.
    pub k: &'a Tensor,
    /// Values.
    pub v: &'a Tensor,
}

/// The negative block: keys and values `[rows.len(), H, S-, d]` for the batch rows `rows`.
#[derive(Clone)]
pub struct NegativeKeyValues<'a> {
    /// Keys and values of the negative context.
    pub kv: KeyValues<'a>,
    /// The batch rows they guide.
    pub rows: Range<usize>,
}

/// One guided attention call. `q`: `[B, H, Sq, d]`; `shared` and `positive`: `B` rows.
pub struct GuidedAttention<'a> {
    /// The queries, `[B, H, Sq, d]`.
    pub q: &'a Tensor,
    /// A block every query sees in both branches (image-over-image), computed once.
    pub shared: Option<KeyValues<'a>>,
    /// The positive context's block.
    pub positive: KeyValues<'a>,
    /// Required when a method is given.
    pub negative: Option<NegativeKeyValues<'a>>,
    /// The logit scale, usually `1/sqrt(d)`.
    pub scale: f64,
}

/// The attention output, heads merged `[B, Sq, H*d]`, guided by `method` on the negative rows.
pub fn guided_attention(a: &GuidedAttention, method: Option<&AttentionGuidance>) -> Result<Tensor> {
    let guided = match (method, &a.negative) {
        (None, _) => None,
        (Some(m), Some(n)) => {
            let b = a.q.dim(0)?;
            if n.rows.is_empty() || n.rows.end > b || n.kv.k.dim(0)? != n.rows.len() {
                candle_core::bail!(
                    "guided attention: negative keys of batch {} for rows {:?} of {b} queries",
                    n.kv.k.dim(0)?,
                    n.rows
                );
            }
            Some((m, n))
        }
        (Some(_), None) => candle_core::bail!("guided attention: the method needs the negative keys"),
    };
    let q = a.q;
    let scale = a.scale;

    // Nothing to merge: plain attention over the positive keys, each branch on its own.
    let vsf = matches!(guided, Some((AttentionGuidance::Vsf(_), _)));
    if a.shared.is_none() && !vsf {
        let z = merge_heads(&sdpa(q, a.positive.k, a.positive.v, scale)?)?;
        return match guided {
            Some((AttentionGuidance::Contrast(c), n)) => {
                let q_neg = rows_of(q, &n.rows)?;
                let z_neg = merge_heads(&sdpa(&q_neg, n.kv.k, n.kv.v, scale)?)?;
                contrast_rows(&z, &z_neg, c, &n.rows)
            }
            _ => Ok(z),
        };
    }

    // VSF on every row, no shared block (cross-attention): one softmax over the positive keys
    // and the flipped negative ones, biased ([`TailBias`]); the short text blocks are cheap to
    // concatenate, the per-block log-sum-exps and merge over every query are not.
    if let Some((AttentionGuidance::Vsf(p), n)) = guided {
        if a.shared.is_none() && is_cpu_f32(q) && n.rows.start == 0 && n.rows.end == q.dim(0)? {
            let flipped = profile::timed(profile::Op::Guidance, || n.kv.v * -p.scale)?;
            let k = profile::cat(&[a.positive.k, n.kv.k], 2)?;
            let v = profile::cat(&[a.positive.v, &flipped], 2)?;
            let tail = n.kv.k.dim(2)?;
            let bias = TailBias { tail, split: usize::MAX, before: -p.bias as f32, after: -p.bias as f32 };
            return merge_heads(&sdpa_tail_bias(q, &k, &v, scale, bias)?);
        }
    }

    let shared = a.shared.map(|kv| attend_block(q, kv.k, kv.v, scale, None)).transpose()?;
    let positive = attend_block(q, a.positive.k, a.positive.v, scale, None)?;
    // The unguided attention of every row: Z+ for a contrast, the other rows' output for VSF.
    let plain = || -> Result<Tensor> { merge_heads(&merge_optional(shared.as_ref(), &[&positive])?) };
    let Some((method, n)) = guided else {
        return plain();
    };
    let q_neg = rows_of(q, &n.rows)?;
    let shared_rows = shared.as_ref().map(|s| block_rows(s, &n.rows)).transpose()?;
    match method {
        AttentionGuidance::Contrast(c) => {
            let negative = attend_block(&q_neg, n.kv.k, n.kv.v, scale, None)?;
            let z_neg = merge_heads(&merge_optional(shared_rows.as_ref(), &[&negative])?)?;
            contrast_rows(&plain()?, &z_neg, c, &n.rows)
        }
        AttentionGuidance::Vsf(p) => {
            let flipped = flipped_block(&q_neg, n.kv.k, n.kv.v, scale, p)?;
            let positive_rows = block_rows(&positive, &n.rows)?;
            let z = merge_heads(&merge_optional(shared_rows.as_ref(), &[&positive_rows, &flipped])?)?;
            if n.rows.start == 0 && n.rows.end == q.dim(0)? {
                return Ok(z); // every row guided: no plain output is needed
            }
            splice_rows(&plain()?, &z, &n.rows)
        }
    }
}

/// `merge_blocks` over an optional shared block and the others; a lone block is returned as is.
fn merge_optional(shared: Option<&BlockAttention>, others: &[&BlockAttention]) -> Result<Tensor> {
    let mut all: Vec<&BlockAttention> = shared.into_iter().collect();
    all.extend_from_slice(others);
    match all.as_slice() {
        [one] => Ok(one.out.clone()),
        many => merge_blocks(many),
    }
}

fn rows_of(t: &Tensor, rows: &Range<usize>) -> Result<Tensor> {
    if rows.start == 0 && rows.end == t.dim(0)? {
        Ok(t.clone())
    } else {
        t.narrow(0, rows.start, rows.len())
    }
}

fn block_rows(b: &BlockAttention, rows: &Range<usize>) -> Result<BlockAttention> {
    Ok(BlockAttention { out: rows_of(&b.out, rows)?, lse: rows_of(&b.lse, rows)? })
}

/// `z` with the guided rows replaced by `contrast(Z+, Z-)`.
fn contrast_rows(z: &Tensor, z_neg: &Tensor, c: &Contrast, rows: &Range<usize>) -> Result<Tensor> {
    let guided = c.combine(&rows_of(z, rows)?, z_neg)?;
    splice_rows(z, &guided, rows)
}

/// `all` with its rows `rows` replaced by `guided`.
fn splice_rows(all: &Tensor, guided: &Tensor, rows: &Range<usize>) -> Result<Tensor> {
    let b = all.dim(0)?;
    if rows.start == 0 && rows.end == b {
        return Ok(guided.clone());
    }
    let mut parts = Vec::with_capacity(3);
    if rows.start > 0 {
        parts.push(all.narrow(0, 0, rows.start)?);
    }
    parts.push(guided.clone());
    if rows.end < b {
        parts.push(all.narrow(0, rows.end, b - rows.end)?);
    }
    profile::cat(&parts, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guidance::nag::{nag, NagNorm, NagParams};
    use crate::guidance::vsf::VsfParams;
    use candle_core::{Device, D};

    fn randn(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(7);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 3.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn cat2(a: &Tensor, b: &Tensor) -> Tensor {
        Tensor::cat(&[a, b], 2).unwrap()
    }

    const NAG: NagParams = NagParams { scale: 5.0, tau: 2.5, alpha: 0.25, norm: NagNorm::L1 };

    /// The oracle: attention over concatenated keys, guided rows by hand.
    #[test]
    fn contrast_with_shared_block_equals_concatenated_attention() {
        let (b, h, d) = (3, 2, 4);
        let q = randn((b, h, 5, d), 1);
        let (ki, vi) = (randn((b, h, 6, d), 2), randn((b, h, 6, d), 3));
        let (kp, vp) = (randn((b, h, 4, d), 4), randn((b, h, 4, d), 5));
        // The negative guides the last row only (CFG's cond row).
        let (kn, vn) = (randn((1, h, 3, d), 6), randn((1, h, 3, d), 7));
        let scale = 0.5;
        let got = guided_attention(
            &GuidedAttention {
                q: &q,
                shared: Some(KeyValues { k: &ki, v: &vi }),
                positive: KeyValues { k: &kp, v: &vp },
                negative: Some(NegativeKeyValues { kv: KeyValues { k: &kn, v: &vn }, rows: 2..3 }),
                scale,
            },
            Some(&AttentionGuidance::nag(NAG)),
        )
        .unwrap();
        let z_pos = merge_heads(&sdpa(&q, &cat2(&ki, &kp), &cat2(&vi, &vp), scale).unwrap()).unwrap();
        let q2 = q.narrow(0, 2, 1).unwrap();
        let (ki2, vi2) = (ki.narrow(0, 2, 1).unwrap(), vi.narrow(0, 2, 1).unwrap());
        let z_neg = merge_heads(&sdpa(&q2, &cat2(&ki2, &kn), &cat2(&vi2, &vn), scale).unwrap()).unwrap();
        let guided = nag(&z_pos.narrow(0, 2, 1).unwrap(), &z_neg, &NAG).unwrap();
        assert!(max_diff(&got.narrow(0, 0, 2).unwrap(), &z_pos.narrow(0, 0, 2).unwrap()) < 1e-5);
        assert!(max_diff(&got.narrow(0, 2, 1).unwrap(), &guided) < 1e-5);
    }

    #[test]
    fn contrast_without_shared_block() {
        let (h, d) = (2, 4);
        let q = randn((2, h, 5, d), 11);
        let (kp, vp) = (randn((2, h, 4, d), 12), randn((2, h, 4, d), 13));
        let (kn, vn) = (randn((1, h, 3, d), 14), randn((1, h, 3, d), 15));
        let nasa = AttentionGuidance::nasa(0.5);
        let got = guided_attention(
            &GuidedAttention {
                q: &q,
                shared: None,
                positive: KeyValues { k: &kp, v: &vp },
                negative: Some(NegativeKeyValues { kv: KeyValues { k: &kn, v: &vn }, rows: 0..1 }),
                scale: 0.5,
            },
            Some(&nasa),
        )
        .unwrap();
        let z_pos = merge_heads(&sdpa(&q, &kp, &vp, 0.5).unwrap()).unwrap();
        let z_neg = merge_heads(&sdpa(&q.narrow(0, 0, 1).unwrap(), &kn, &vn, 0.5).unwrap()).unwrap();
        let want0 = (z_pos.narrow(0, 0, 1).unwrap() - (z_neg * 0.5).unwrap()).unwrap();
        assert!(max_diff(&got.narrow(0, 0, 1).unwrap(), &want0) < 1e-5);
        assert!(max_diff(&got.narrow(0, 1, 1).unwrap(), &z_pos.narrow(0, 1, 1).unwrap()) < 1e-5);
    }

    /// VSF eq. 6: one softmax over `[K+ ; K-]`, values `[V+ ; -alpha V-]`, `-beta` on `K-`.
    #[test]
    fn vsf_equals_one_softmax_over_flipped_negative() {
        let (h, d) = (2, 4);
        let q = randn((1, h, 5, d), 21);
        let (ki, vi) = (randn((1, h, 3, d), 22), randn((1, h, 3, d), 23));
        let (kp, vp) = (randn((1, h, 4, d), 24), randn((1, h, 4, d), 25));
        let (kn, vn) = (randn((1, h, 2, d), 26), randn((1, h, 2, d), 27));
        let p = VsfParams { scale: 1.7, bias: 0.2, ..Default::default() };
        for shared in [false, true] {
            let got = guided_attention(
                &GuidedAttention {
                    q: &q,
                    shared: shared.then_some(KeyValues { k: &ki, v: &vi }),
                    positive: KeyValues { k: &kp, v: &vp },
                    negative: Some(NegativeKeyValues { kv: KeyValues { k: &kn, v: &vn }, rows: 0..1 }),
                    scale: 0.5,
                },
                Some(&AttentionGuidance::Vsf(p)),
            )
            .unwrap();
            let (k, v) = if shared { (cat2(&ki, &kp), cat2(&vi, &vp)) } else { (kp.clone(), vp.clone()) };
            let k = cat2(&k, &kn);
            let v = cat2(&v, &(&vn * -p.scale).unwrap());
            let n_pos = k.dim(2).unwrap() - 2;
            let bias: Vec<f32> = (0..n_pos + 2).map(|j| if j < n_pos { 0.0 } else { -p.bias as f32 }).collect();
            let bias = Tensor::from_vec(bias, (1, 1, 1, n_pos + 2), &Device::Cpu).unwrap();
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap().broadcast_add(&bias).unwrap();
            let want = merge_heads(&candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&v).unwrap()).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "shared {shared}");
        }
    }

    /// VSF on some rows only (the per-block path) and on all rows (one biased softmax) agree.
    #[test]
    fn vsf_on_a_guided_row_equals_vsf_on_every_row() {
        let (h, d) = (2, 4);
        let q = randn((2, h, 5, d), 41);
        let (kp, vp) = (randn((2, h, 4, d), 42), randn((2, h, 4, d), 43));
        let (kn, vn) = (randn((1, h, 3, d), 44), randn((1, h, 3, d), 45));
        let p = VsfParams { scale: 1.2, bias: 0.3, ..Default::default() };
        let vsf = AttentionGuidance::Vsf(p);
        let call = |q: &Tensor, kp: &Tensor, vp: &Tensor, rows: Range<usize>| {
            guided_attention(
                &GuidedAttention {
                    q,
                    shared: None,
                    positive: KeyValues { k: kp, v: vp },
                    negative: Some(NegativeKeyValues { kv: KeyValues { k: &kn, v: &vn }, rows }),
                    scale: 0.5,
                },
                Some(&vsf),
            )
            .unwrap()
        };
        let some = call(&q, &kp, &vp, 1..2);
        let row = |t: &Tensor| t.narrow(0, 1, 1).unwrap();
        let every = call(&row(&q), &row(&kp), &row(&vp), 0..1);
        assert!(max_diff(&some.narrow(0, 1, 1).unwrap(), &every) < 1e-5);
        let plain = merge_heads(
            &sdpa(&q.narrow(0, 0, 1).unwrap(), &kp.narrow(0, 0, 1).unwrap(), &vp.narrow(0, 0, 1).unwrap(), 0.5)
                .unwrap(),
        )
        .unwrap();
        assert!(max_diff(&some.narrow(0, 0, 1).unwrap(), &plain) < 1e-5);
    }

    #[test]
    fn without_method_it_is_plain_attention_and_a_method_needs_negative_keys() {
        let q = randn((1, 1, 3, 4), 31);
        let (ki, vi) = (randn((1, 1, 2, 4), 32), randn((1, 1, 2, 4), 33));
        let (kp, vp) = (randn((1, 1, 3, 4), 34), randn((1, 1, 3, 4), 35));
        let call = GuidedAttention {
            q: &q,
            shared: Some(KeyValues { k: &ki, v: &vi }),
            positive: KeyValues { k: &kp, v: &vp },
            negative: None,
            scale: 0.5,
        };
        let got = guided_attention(&call, None).unwrap();
        let want = merge_heads(&sdpa(&q, &cat2(&ki, &kp), &cat2(&vi, &vp), 0.5).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        assert!(guided_attention(&call, Some(&AttentionGuidance::nag(NAG))).is_err());
    }
}
