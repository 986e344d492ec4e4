//! Scaled dot-product attention, in pieces that can share work.
//!
//! Layout everywhere: `[batch, heads, seq, head_dim]`.
//!
//! Guidance needs the attention of the *same* queries over two contexts (positive and negative
//! text) that share a large common part (the image tokens). Softmax over a concatenation of key
//! blocks equals a log-sum-exp weighted merge of per-block attentions, so the expensive
//! image-over-image block is computed once and merged with each text block
//! ([`attend_block`] + [`merge_blocks`]) instead of tiling queries, keys and values.

use candle_core::{DType, Result, Tensor, D};

use crate::kernels::{fused_attention, softmax_tail_bias, softmax_with_lse, weighted_sum, Fused, TailBias};
use crate::profile::{self, Op};

/// Largest score matrix (elements) materialised at once; longer query sequences are processed
/// in row chunks so 1024x1024 images (4096+ tokens) do not need gigabytes of scores per layer.
const MAX_SCORE_ELEMENTS: usize = 1 << 26;

/// Query rows per chunk for `b*h` heads over `k_len` keys.
fn query_chunk(q: &Tensor, k_len: usize) -> Result<usize> {
    let (b, h, q_len, _) = q.dims4()?;
    let per_row = (b * h * k_len).max(1);
    Ok((MAX_SCORE_ELEMENTS / per_row).clamp(1, q_len.max(1)))
}

/// Run `f` over query row chunks and concatenate the results along the query axis.
fn over_query_chunks<T>(
    q: &Tensor,
    k_len: usize,
    mut f: impl FnMut(&Tensor) -> Result<T>,
    mut join: impl FnMut(Vec<T>) -> Result<T>,
) -> Result<T> {
    let q_len = q.dim(2)?;
    let chunk = query_chunk(q, k_len)?;
    if chunk >= q_len {
        return f(q);
    }
    let mut parts = Vec::with_capacity(q_len.div_ceil(chunk));
    let mut start = 0;
    while start < q_len {
        let len = chunk.min(q_len - start);
        parts.push(f(&q.narrow(2, start, len)?)?);
        start += len;
    }
    join(parts)
}

/// Plain softmax attention: `softmax(q k^T * scale) v`. The scale is applied to the queries
/// (`S_q x d` elements) rather than to the scores (`S_q x S_k`), the larger tensor.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if let Some(fused) = profile::timed(Op::AttentionMatmul, || fused_attention(q, k, v, scale, None, false))? {
        return Ok(fused.out);
    }
    let k_t = profile::contiguous(&k.t()?)?;
    let v = profile::contiguous(v)?;
    over_query_chunks(
        q,
        k.dim(2)?,
        |q| {
            let scores = scores(q, &k_t, scale)?;
            let probs = profile::timed(Op::Softmax, || candle_nn::ops::softmax_last_dim(&scores))?;
            profile::timed(Op::AttentionMatmul, || probs.matmul(&v))
        },
        |parts| profile::cat(&parts, 2),
    )
}

/// [`sdpa`] with a logit bias on the last keys ([`TailBias`]): one softmax over keys that are
/// already concatenated, where a per-block merge would need a log-sum-exp per block and a pass
/// over the outputs to combine them.
pub fn sdpa_tail_bias(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: TailBias) -> Result<Tensor> {
    if let Some(fused) = profile::timed(Op::AttentionMatmul, || fused_attention(q, k, v, scale, Some(bias), false))? {
        return Ok(fused.out);
    }
    let k_t = profile::contiguous(&k.t()?)?;
    let v = profile::contiguous(v)?;
    let mut offset = 0;
    over_query_chunks(
        q,
        k.dim(2)?,
        |q| {
            let scores = scores(q, &k_t, scale)?;
            let probs = profile::timed(Op::Softmax, || softmax_tail_bias(&scores, bias, offset))?;
            offset += q.dim(2)?;
            profile::timed(Op::AttentionMatmul, || probs.matmul(&v))
        },
        |parts| profile::cat(&parts, 2),
    )
}

/// `(q * scale) k^T`.
fn scores(q: &Tensor, k_t: &Tensor, scale: f64) -> Result<Tensor> {
    let q = profile::timed(Op::AttentionMatmul, || q * scale)?;
    let q = profile::contiguous(&q)?;
    profile::timed(Op::AttentionMatmul, || q.matmul(k_t))
}

/// Attention over one key block, kept mergeable: the block-normalised output and the
/// log-sum-exp of its logits, `[b, h, q, 1]` (in f32, whatever the input dtype).
/// `bias` is added to every logit of the block after scaling (VSF uses it).
pub struct BlockAttention {
    pub out: Tensor,
    pub lse: Tensor,
}

pub fn attend_block(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<f64>) -> Result<BlockAttention> {
    if let Some(Fused { out, lse: Some(lse) }) =
        profile::timed(Op::AttentionMatmul, || fused_attention(q, k, v, scale, None, true))?
    {
        // A bias shared by the whole block leaves the probabilities alone and shifts the LSE.
        let lse = if let Some(b) = bias { (lse + b)? } else { lse };
        return Ok(BlockAttention { out, lse });
    }
    let k_t = profile::contiguous(&k.t()?)?;
    let v = profile::contiguous(v)?;
    over_query_chunks(
        q,
        k.dim(2)?,
        |q| attend_chunk(q, &k_t, &v, scale, bias),
        |parts| {
            let outs: Vec<&Tensor> = parts.iter().map(|p| &p.out).collect();
            let lses: Vec<&Tensor> = parts.iter().map(|p| &p.lse).collect();
            Ok(BlockAttention { out: profile::cat(&outs, 2)?, lse: profile::cat(&lses, 2)? })
        },
    )
}

/// One query chunk of [`attend_block`]. A bias shared by the whole block leaves the
/// probabilities unchanged and shifts the log-sum-exp by itself.
fn attend_chunk(q: &Tensor, k_t: &Tensor, v: &Tensor, scale: f64, bias: Option<f64>) -> Result<BlockAttention> {
    let scores = scores(q, k_t, scale)?;
    let (probs, lse) = profile::timed(Op::Softmax, || -> Result<(Tensor, Tensor)> {
        let (probs, lse) = softmax_with_lse(&scores)?;
        Ok((probs, if let Some(b) = bias { (lse + b)? } else { lse }))
    })?;
    let probs = profile::timed(Op::Copy, || probs.to_dtype(v.dtype()))?;
    let out = profile::timed(Op::AttentionMatmul, || probs.matmul(v))?;
    Ok(BlockAttention { out, lse })
}

/// Merge per-block attentions into the attention over all their keys at once.
pub fn merge_blocks(blocks: &[&BlockAttention]) -> Result<Tensor> {
    let _scope = profile::scope(Op::Merge);
    let dtype = blocks[0].out.dtype();
    // Weights exp(lse_i - lse) with lse over all blocks: small `[b, h, q, 1]` tensors.
    let lses: Vec<&Tensor> = blocks.iter().map(|b| &b.lse).collect();
    let all = Tensor::cat(&lses, D::Minus1)?; // [b, h, q, n_blocks]
    let max = all.max_keepdim(D::Minus1)?;
    let total = (all.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    let weights: Vec<Tensor> = blocks.iter().map(|b| (&b.lse - &total)?.exp()).collect::<Result<_>>()?;
    let outs: Vec<Tensor> = blocks.iter().map(|b| b.out.to_dtype(DType::F32)).collect::<Result<_>>()?;
    // The fused CPU attention hands back `[b, h, s, d]` views of contiguous `[b, s, h, d]`
    // buffers: merge in that layout (per-row weights transposed to match, a few KB) rather
    // than copying every block's output into head-major order first.
    let seq_major = outs.iter().all(|o| o.transpose(1, 2).is_ok_and(|t| t.is_contiguous()));
    if seq_major && !outs.iter().all(|o| o.is_contiguous()) {
        let outs: Vec<Tensor> = outs.iter().map(|o| o.transpose(1, 2)).collect::<Result<_>>()?;
        let weights: Vec<Tensor> = weights.iter().map(|w| w.transpose(1, 2)?.contiguous()).collect::<Result<_>>()?;
        let merged = weighted_sum(&outs.iter().collect::<Vec<_>>(), &weights.iter().collect::<Vec<_>>())?;
        return merged.transpose(1, 2)?.to_dtype(dtype);
    }
    weighted_sum(&outs.iter().collect::<Vec<_>>(), &weights.iter().collect::<Vec<_>>())?.to_dtype(dtype)
}

/// `[b, h, s, d]` -> `[b, s, h*d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, s, h * d))
}

/// `[b, s, h*d]` -> `[b, h, s, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = x.dims3()?;
    x.reshape((b, s, heads, hd / heads))?.transpose(1, 2)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        d.to_dtype(DType::F32).unwrap().to_scalar().unwrap()
    }

    /// Both paths: f32 on the CPU runs the fused kernel, f64 the tensor ops (the GPU's path).
    const PATHS: [DType; 2] = [DType::F32, DType::F64];

    fn randn(shape: (usize, usize, usize, usize), std: f32, dtype: DType) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    #[test]
    fn merged_blocks_equal_attention_over_concatenated_keys() {
        for dtype in PATHS {
            let q = randn((2, 3, 5, 8), 1.0, dtype);
            let (k1, v1) = (randn((2, 3, 4, 8), 2.0, dtype), randn((2, 3, 4, 8), 1.0, dtype));
            let (k2, v2) = (randn((2, 3, 7, 8), 2.0, dtype), randn((2, 3, 7, 8), 1.0, dtype));
            let scale = 1.0 / (8f64).sqrt();
            let (k, v) = (Tensor::cat(&[&k1, &k2], 2).unwrap(), Tensor::cat(&[&v1, &v2], 2).unwrap());
            let full = sdpa(&q, &k, &v, scale).unwrap();
            let b1 = attend_block(&q, &k1, &v1, scale, None).unwrap();
            let b2 = attend_block(&q, &k2, &v2, scale, None).unwrap();
            let merged = merge_blocks(&[&b1, &b2]).unwrap();
            assert!(max_diff(&full, &merged) < 1e-5, "{dtype:?}");
        }
    }

    #[test]
    fn fused_cpu_attention_equals_the_tensor_op_path() {
        let q = randn((1, 2, 150, 16), 1.0, DType::F32);
        let (k, v) = (randn((1, 2, 90, 16), 1.0, DType::F32), randn((1, 2, 90, 16), 1.0, DType::F32));
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let bias = TailBias { tail: 10, split: 120, before: -0.4, after: f32::NEG_INFINITY };
        let pairs = [
            (sdpa(&q, &k, &v, 0.25).unwrap(), sdpa(&f64s(&q), &f64s(&k), &f64s(&v), 0.25).unwrap()),
            (
                sdpa_tail_bias(&q, &k, &v, 0.25, bias).unwrap(),
                sdpa_tail_bias(&f64s(&q), &f64s(&k), &f64s(&v), 0.25, bias).unwrap(),
            ),
        ];
        for (fused, ops) in &pairs {
            assert!(max_diff(&fused.to_dtype(DType::F64).unwrap(), ops) < 1e-5);
        }
        let fused = attend_block(&q, &k, &v, 0.25, Some(0.7)).unwrap();
        let ops = attend_block(&f64s(&q), &f64s(&k), &f64s(&v), 0.25, Some(0.7)).unwrap();
        assert!(max_diff(&fused.out.to_dtype(DType::F64).unwrap(), &ops.out) < 1e-5);
        assert!(max_diff(&fused.lse, &ops.lse) < 1e-5);
    }

    #[test]
    fn block_bias_shifts_weight_between_blocks() {
        let dev = Device::Cpu;
        let q = Tensor::ones((1, 1, 1, 2), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 1, 2), DType::F32, &dev).unwrap();
        let v1 = Tensor::ones((1, 1, 1, 2), DType::F32, &dev).unwrap();
        let v2 = Tensor::zeros((1, 1, 1, 2), DType::F32, &dev).unwrap();
        // Equal logits; a bias of ln(3) on block 1 gives it weight 3/4.
        let b1 = attend_block(&q, &k, &v1, 1.0, Some(3f64.ln())).unwrap();
        let b2 = attend_block(&q, &k, &v2, 1.0, None).unwrap();
        let m = merge_blocks(&[&b1, &b2]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((m[0] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn chunked_queries_equal_unchunked() {
        // 1 x 1 x 9000 x 8000 scores exceed MAX_SCORE_ELEMENTS, forcing several chunks on the
        // tensor-op path (and many query tiles on the fused one).
        for dtype in PATHS {
            let q = randn((1, 1, 9000, 4), 1.0, dtype);
            let (k, v) = (randn((1, 1, 8000, 4), 1.0, dtype), randn((1, 1, 8000, 4), 1.0, dtype));
            assert!(query_chunk(&q, 8000).unwrap() < 9000);
            let chunked = sdpa(&q, &k, &v, 0.5).unwrap();
            let probe = q.narrow(2, 8990, 10).unwrap();
            let direct = sdpa(&probe, &k, &v, 0.5).unwrap();
            assert!(max_diff(&chunked.narrow(2, 8990, 10).unwrap(), &direct) < 1e-5, "{dtype:?}");
            let block = attend_block(&q, &k, &v, 0.5, None).unwrap();
            assert_eq!(block.lse.dims(), &[1, 1, 9000, 1]);
            assert!(max_diff(&block.out, &chunked) < 1e-5, "{dtype:?}");
        }
    }

    #[test]
    fn heads_round_trip() {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((1, 4, 6)).unwrap();
        let back = merge_heads(&split_heads(&x, 2).unwrap()).unwrap();
        assert_eq!(max_diff(&x, &back), 0.0);
    }

    #[test]
    fn tail_bias_attention_equals_merged_blocks_with_a_biased_block() {
        // Enough queries to be chunked: the bias must follow each chunk's query numbering.
        for dtype in PATHS {
            let q = randn((1, 2, 3000, 4), 1.0, dtype);
            let (k1, v1) = (randn((1, 2, 12000, 4), 1.0, dtype), randn((1, 2, 12000, 4), 1.0, dtype));
            let (k2, v2) = (randn((1, 2, 3, 4), 1.0, dtype), randn((1, 2, 3, 4), 1.0, dtype));
            assert!(query_chunk(&q, 12003).unwrap() < 3000);
            let (k, v) = (Tensor::cat(&[&k1, &k2], 2).unwrap(), Tensor::cat(&[&v1, &v2], 2).unwrap());
            let split = 2900; // inside the second chunk
            let bias = TailBias { tail: 3, split, before: -0.3, after: f32::NEG_INFINITY };
            let got = sdpa_tail_bias(&q, &k, &v, 0.5, bias).unwrap();
            // Queries before the split: both blocks, the second biased; after it: the first only.
            let early = q.narrow(2, 0, split).unwrap();
            let b1 = attend_block(&early, &k1, &v1, 0.5, None).unwrap();
            let b2 = attend_block(&early, &k2, &v2, 0.5, Some(-0.3)).unwrap();
            let want_early = merge_blocks(&[&b1, &b2]).unwrap();
            let want_late = sdpa(&q.narrow(2, split, 100).unwrap(), &k1, &v1, 0.5).unwrap();
            assert!(max_diff(&got.narrow(2, 0, split).unwrap(), &want_early) < 1e-5, "{dtype:?}");
            assert!(max_diff(&got.narrow(2, split, 100).unwrap(), &want_late) < 1e-5, "{dtype:?}");
        }
    }
}
