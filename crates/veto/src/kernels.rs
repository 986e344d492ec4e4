//! CPU kernels candle lacks. Candle's elementwise ops and reductions run on one thread on the
//! CPU; these run over rows in parallel and do several passes' work in one.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, D};
use rayon::prelude::*;

mod activations;
pub mod blas;
mod conv2d;
mod depthwise;
mod fused_attention;
mod group_norm;
mod rope;
mod simd;
mod softmax_row;
pub use activations::{gelu_tanh, glu, silu_tensor, Gate};
pub use conv2d::conv2d;
pub use depthwise::depthwise_same;
pub use fused_attention::{fused_attention, Fused};
pub use group_norm::group_norm;
pub use rope::rotate_pairs;
use softmax_row::softmax_row;

/// Row-wise softmax over the last dimension together with each row's log-sum-exp
/// (`[.., 1]`, f32), as a mergeable attention block needs: `probs = softmax(x)`,
/// `lse = max + ln(sum(exp(x - max)))`: the fused softmax plus two row maxima
/// (`lse = max - ln(max probs)`, since the largest probability is `exp(max - lse)` and never
/// below `1/n`). The GPU's and other dtypes' path; the CPU in f32 runs [`fused_attention`].
pub fn softmax_with_lse(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let probs = candle_nn::ops::softmax_last_dim(&x)?;
    let lse = (x.max_keepdim(D::Minus1)? - probs.max_keepdim(D::Minus1)?.log()?)?;
    Ok((probs, lse))
}

/// A logit bias on the last `tail` keys of every score row: `before` on the rows of queries
/// `< split`, `after` on the others (`f32::NEG_INFINITY` hides those keys from them). Query
/// indices count from `offset` (the first query of a chunk). VSF's flipped block needs nothing
/// else: the image queries see it biased by `-beta`, the text queries not at all.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TailBias {
    /// Keys at the end of each row that the bias applies to.
    pub tail: usize,
    /// Queries before this index get `before`, the rest `after`.
    pub split: usize,
    /// Bias for queries `< split`.
    pub before: f32,
    /// Bias for queries `>= split`.
    pub after: f32,
}

/// Row-wise softmax of scores `[.., Q, K]` with a [`TailBias`], the queries numbered from
/// `offset`: the tail is biased by a `[Q, 1]` column broadcast over it and the rows re-joined.
/// The GPU's and other dtypes' path; the CPU in f32 runs [`fused_attention`].
pub fn softmax_tail_bias(x: &Tensor, bias: TailBias, offset: usize) -> Result<Tensor> {
    let dims = x.dims();
    let (q_len, k_len) = match dims {
        [.., q, k] => (*q, *k),
        _ => candle_core::bail!("softmax-tail-bias: scores of shape {dims:?}"),
    };
    if bias.tail >= k_len {
        // Some key must stay unbiased, or a row hidden everywhere would divide by zero.
        candle_core::bail!("softmax-tail-bias: a tail of {} keys in rows of {k_len}", bias.tail);
    }
    let per_query: Vec<f32> =
        (0..q_len).map(|q| if offset + q < bias.split { bias.before } else { bias.after }).collect();
    let column = Tensor::from_vec(per_query, (q_len, 1), x.device())?.to_dtype(x.dtype())?;
    let head = x.narrow(D::Minus1, 0, k_len - bias.tail)?;
    let tail = x.narrow(D::Minus1, k_len - bias.tail, bias.tail)?.broadcast_add(&column)?;
    candle_nn::ops::softmax_last_dim(&Tensor::cat(&[&head, &tail], D::Minus1)?.contiguous()?)
}

/// Elements per parallel task of [`weighted_sum`].
const WEIGHTED_SUM_TASK: usize = 1 << 14;

/// `out[r] += w[r] * x[r]` over consecutive rows (of `out.len() / w.len()` elements).
#[inline(always)]
fn weighted_rows_body(out: &mut [f32], x: &[f32], w: &[f32]) {
    let d = out.len() / w.len().max(1);
    for ((o, x), &w) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(w) {
        for (o, v) in o.iter_mut().zip(x) {
            *o += w * v;
        }
    }
}

simd::multiversion!(fn weighted_rows(out: &mut [f32], x: &[f32], w: &[f32]) -> () = weighted_rows_body);

/// `sum_i w_i * x_i` with `x_i` `[.., d]` and per-row weights `w_i` `[.., 1]` (f32): the
/// log-sum-exp merge of attention blocks. On the CPU one parallel pass over the rows; elsewhere
/// broadcast products.
pub fn weighted_sum(xs: &[&Tensor], ws: &[&Tensor]) -> Result<Tensor> {
    if xs.is_empty() || xs.len() != ws.len() {
        candle_core::bail!("weighted_sum: {} tensors, {} weights", xs.len(), ws.len());
    }
    let cpu_f32 = xs.iter().chain(ws).all(|t| is_cpu_f32(t));
    if !cpu_f32 {
        let mut acc = xs[0].broadcast_mul(ws[0])?;
        for (x, w) in xs.iter().zip(ws).skip(1) {
            acc = (acc + x.broadcast_mul(w)?)?;
        }
        return Ok(acc);
    }
    let shape = xs[0].shape().clone();
    let d = shape.dims().last().copied().unwrap_or(1).max(1);
    let rows = shape.elem_count() / d;
    let xs: Vec<Tensor> = xs.iter().map(|x| x.contiguous()).collect::<Result<_>>()?;
    let ws: Vec<Tensor> = ws.iter().map(|w| w.contiguous()).collect::<Result<_>>()?;
    for (x, w) in xs.iter().zip(&ws) {
        if x.shape() != &shape || w.elem_count() != rows {
            candle_core::bail!("weighted_sum: shapes {:?} and weights {:?} do not match {shape:?}", x.dims(), w.dims());
        }
    }
    let guards: Vec<_> = xs.iter().chain(&ws).map(|t| t.storage_and_layout()).collect();
    let slices: Vec<&[f32]> = guards.iter().map(|(g, l)| f32_slice(g, l)).collect::<Result<_>>()?;
    let (x_slices, w_slices) = slices.split_at(xs.len());
    let mut dst = vec![0f32; rows * d];
    // Tasks of many rows: one row (a head's 64 channels) is too little work to schedule alone.
    let rows_per_task = (WEIGHTED_SUM_TASK / d).max(1);
    dst.par_chunks_mut(d * rows_per_task).enumerate().for_each(|(task, out)| {
        let (first, n) = (task * rows_per_task, out.len() / d);
        for (x, w) in x_slices.iter().zip(w_slices) {
            weighted_rows(out, &x[first * d..(first + n) * d], &w[first..first + n]);
        }
    });
    drop(guards);
    Tensor::from_vec(dst, shape, xs[0].device())
}

/// `f(a_row, b_row, out_row)` over the rows (last dimension) of two same-shape f32 CPU tensors,
/// in parallel; `None` when the tensors are not f32 on the CPU (the caller falls back to
/// tensor ops).
pub fn map_row_pairs(a: &Tensor, b: &Tensor, f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) -> Result<Option<Tensor>> {
    let cpu_f32 = is_cpu_f32;
    if !cpu_f32(a) || !cpu_f32(b) {
        return Ok(None);
    }
    if a.shape() != b.shape() {
        candle_core::bail!("row map: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    let d = a.dims().last().copied().unwrap_or(1).max(1);
    let dst = with_f32_slices([a, b], None, |[sa, sb], _| {
        let mut dst = vec![0f32; sa.len()];
        dst.par_chunks_mut(d).zip(sa.par_chunks(d)).zip(sb.par_chunks(d)).for_each(|((o, x), y)| f(x, y, o));
        Ok(dst)
    })?;
    Ok(Some(Tensor::from_vec(dst, a.shape().clone(), a.device())?))
}

/// `f(x_row, y_row, [v[b] for v in vectors], out_row)` over the rows (last dimension `D`) of
/// `x` `[B, .., D]` (and of `y`, same shape, when given), with per-batch vectors `[B, D]`: the
/// modulations and gated residuals of adaLN blocks in one parallel pass. (Broadcasting `[B, 1,
/// D]` over `[B, S, D]` is candle's slow strided path once `B > 1`.) `None` when not all f32 on
/// the CPU.
pub fn map_batch_rows<const N: usize>(
    x: &Tensor,
    y: Option<&Tensor>,
    vectors: [&Tensor; N],
    f: impl Fn(&[f32], Option<&[f32]>, [&[f32]; N], &mut [f32]) + Sync,
) -> Result<Option<Tensor>> {
    let cpu_f32 = is_cpu_f32;
    if !cpu_f32(x) || !y.is_none_or(cpu_f32) || !vectors.iter().all(|v| cpu_f32(v)) {
        return Ok(None);
    }
    let dims = x.dims();
    let (b, d) = (dims.first().copied().unwrap_or(1), dims.last().copied().unwrap_or(1));
    if b == 0 || d == 0 || dims.len() < 2 {
        return Ok(None);
    }
    if let Some(y) = y {
        if y.shape() != x.shape() {
            candle_core::bail!("batch row map: shapes {:?} and {:?} differ", x.dims(), y.dims());
        }
    }
    for v in vectors {
        if v.dims() != [b, d] {
            candle_core::bail!("batch row map: vector {:?} for rows {:?}", v.dims(), x.dims());
        }
    }
    let x = x.contiguous()?;
    let y = y.map(|y| y.contiguous()).transpose()?;
    let vectors: Vec<Tensor> = vectors.iter().map(|v| v.contiguous()).collect::<Result<_>>()?;
    let per_batch = x.elem_count() / b;
    let dst = {
        let (gx, lx) = x.storage_and_layout();
        let sx = f32_slice(&gx, lx)?;
        let gy = y.as_ref().map(|y| y.storage_and_layout());
        let sy = gy.as_ref().map(|(g, l)| f32_slice(g, l)).transpose()?;
        let gv: Vec<_> = vectors.iter().map(|v| v.storage_and_layout()).collect();
        let sv: Vec<&[f32]> = gv.iter().map(|(g, l)| f32_slice(g, l)).collect::<Result<_>>()?;
        let mut dst = vec![0f32; sx.len()];
        dst.par_chunks_mut(d).enumerate().for_each(|(r, out)| {
            let batch = r * d / per_batch;
            let rows: [&[f32]; N] = std::array::from_fn(|i| &sv[i][batch * d..(batch + 1) * d]);
            let row = r * d..(r + 1) * d;
            f(&sx[row.clone()], sy.map(|s| &s[row]), rows, out);
        });
        dst
    };
    Ok(Some(Tensor::from_vec(dst, x.shape().clone(), x.device())?))
}

/// Whether `t` is f32 on the CPU, where veto's kernels run (elsewhere the tensor-op paths).
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// All of an f32 CPU storage's elements (strided readers index them with their layout).
fn f32_storage(storage: &candle_core::Storage) -> Result<&[f32]> {
    match storage {
        candle_core::Storage::Cpu(CpuStorage::F32(data)) => Ok(data),
        _ => candle_core::bail!("kernel: expected f32 CPU storage"),
    }
}

/// Runs `f` on the elements of the f32 CPU tensors `inputs` and of `optional` when given (each
/// made contiguous first), holding their storage guards while it runs: the one place the
/// kernels borrow several tensors' storage.
fn with_f32_slices<const N: usize, R>(
    inputs: [&Tensor; N],
    optional: Option<&Tensor>,
    f: impl FnOnce([&[f32]; N], Option<&[f32]>) -> Result<R>,
) -> Result<R> {
    let owned: Vec<Tensor> = inputs.iter().chain(optional.as_slice()).map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let slices: Vec<&[f32]> = guards.iter().map(|(g, l)| f32_slice(g, l)).collect::<Result<_>>()?;
    f(std::array::from_fn(|i| slices[i]), optional.map(|_| slices[N]))
}

/// The elements of a contiguous f32 CPU tensor's storage.
fn f32_slice<'a>(storage: &'a candle_core::Storage, layout: &Layout) -> Result<&'a [f32]> {
    let data = f32_storage(storage)?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kernel: the input must be contiguous");
    };
    Ok(&data[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn batch_rows_see_their_own_vectors() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
        // A non-contiguous [B, D] view, as adaLN chunks are.
        let v = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap().narrow(1, 4, 4).unwrap();
        let got = map_batch_rows(&x, Some(&y), [&v], |x, y, [v], out| {
            for i in 0..out.len() {
                out[i] = x[i] + y.unwrap()[i] * v[i];
            }
        })
        .unwrap()
        .unwrap();
        let want = (&x + y.broadcast_mul(&v.unsqueeze(1).unwrap()).unwrap()).unwrap();
        let diff: f32 =
            (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(diff < 1e-6);
    }

    #[test]
    fn weighted_sum_matches_broadcast_products() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let wa = Tensor::rand(0f32, 1.0, (2, 3, 4, 1), &dev).unwrap();
        let wb = Tensor::rand(0f32, 1.0, (2, 3, 4, 1), &dev).unwrap();
        let got = weighted_sum(
            &[&a, &b.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap()],
            &[&wa, &wb],
        )
        .unwrap();
        let want = (a.broadcast_mul(&wa).unwrap() + b.broadcast_mul(&wb).unwrap()).unwrap();
        let diff: f32 =
            (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(diff < 1e-6);
        assert!(weighted_sum(&[&a], &[&wa, &wb]).is_err());
    }

    #[test]
    fn softmax_and_lse_match_the_unfused_formulas() {
        let x = (Tensor::randn(0f32, 3.0, (2, 3, 5, 17), &Device::Cpu).unwrap() + 40.0).unwrap();
        let (p, lse) = softmax_with_lse(&x).unwrap();
        let want_p = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let max = x.max_keepdim(D::Minus1).unwrap();
        let want_lse =
            (&max + x.broadcast_sub(&max).unwrap().exp().unwrap().sum_keepdim(D::Minus1).unwrap().log()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
        };
        assert_eq!(lse.dims(), &[2, 3, 5, 1]);
        assert!(diff(&p, &want_p) < 1e-6);
        assert!(diff(&lse, &want_lse) < 1e-5);
        // A strided input is made contiguous first.
        let (pt, _) = softmax_with_lse(&x.transpose(2, 3).unwrap()).unwrap();
        let want_t = candle_nn::ops::softmax_last_dim(&x.transpose(2, 3).unwrap().contiguous().unwrap()).unwrap();
        assert!(diff(&pt, &want_t) < 1e-6);
    }

    #[test]
    fn tail_bias_softmax_matches_a_dense_bias() {
        let x = Tensor::randn(0f32, 2.0, (2, 3, 7, 11), &Device::Cpu).unwrap();
        let bias = TailBias { tail: 4, split: 5, before: -0.7, after: f32::NEG_INFINITY };
        // Queries numbered from 2: rows 0..3 are queries 2..5 (< split), rows 3.. are not.
        let got = softmax_tail_bias(&x, bias, 2).unwrap();
        let mut dense = vec![0f32; 7 * 11];
        for q in 0..7 {
            for k in 7..11 {
                dense[q * 11 + k] = if q + 2 < 5 { -0.7 } else { -1e30 };
            }
        }
        let dense = Tensor::from_vec(dense, (7, 11), &Device::Cpu).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&x.broadcast_add(&dense).unwrap()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
        };
        assert!(diff(&got, &want) < 1e-6);
        // The hidden keys get exactly zero weight.
        let hidden = got.narrow(2, 3, 4).unwrap().narrow(3, 7, 4).unwrap();
        assert_eq!(hidden.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // f64 takes the same tensor ops.
        let slow = softmax_tail_bias(&x.to_dtype(DType::F64).unwrap(), bias, 2).unwrap();
        assert!(diff(&slow.to_dtype(DType::F32).unwrap(), &want) < 1e-6);
    }
}
