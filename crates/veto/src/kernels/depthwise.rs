//! Depthwise `k x k` convolution on channels-last input (SANA's Mix-FFN), on the CPU in f32:
//! one parallel pass over output rows, each output pixel the sum of its `k²` neighbours scaled
//! per channel (vectorised over channels). The tensor-op version is `k²` broadcast products
//! and sums, each a single-threaded pass over the whole activation.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::simd::multiversion;

/// `acc[c] += tap[c] * src[c]`.
#[inline(always)]
fn fma_row_body(acc: &mut [f32], tap: &[f32], src: &[f32]) {
    for ((a, t), s) in acc.iter_mut().zip(tap).zip(src) {
        *a += t * s;
    }
}

multiversion!(fn fma_row(acc: &mut [f32], tap: &[f32], src: &[f32]) -> () = fma_row_body);

/// `x` `[B, h, w, C]` convolved per channel with `taps` `[k, k, C]` (stride 1, zero padding
/// `k / 2`: "same" size), plus `bias` `[C]`. `None` unless all are f32 on the CPU.
pub fn depthwise_same(x: &Tensor, taps: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let cpu_f32 = super::is_cpu_f32;
    if !(cpu_f32(x) && cpu_f32(taps) && bias.is_none_or(cpu_f32)) {
        return Ok(None);
    }
    let (b, h, w, c) = x.dims4()?;
    let (k, k2, tc) = taps.dims3()?;
    if k != k2 || tc != c || k % 2 == 0 || bias.is_some_and(|t| t.dims() != [c]) {
        candle_core::bail!(
            "depthwise: input {:?}, taps {:?}, bias {:?}",
            x.dims(),
            taps.dims(),
            bias.map(|t| t.dims())
        );
    }
    let r = k / 2;
    let out = super::with_f32_slices([x, taps], bias, |[xs, ts], bs| {
        let mut out = vec![0f32; b * h * w * c];
        out.par_chunks_mut(w * c).enumerate().for_each(|(row, dst)| {
            let (bi, y) = (row / h, row % h);
            for (xi, px) in dst.chunks_exact_mut(c).enumerate() {
                if let Some(bs) = bs {
                    px.copy_from_slice(bs);
                }
                for i in 0..k {
                    let Some(yy) = (y + i).checked_sub(r).filter(|&yy| yy < h) else { continue };
                    for j in 0..k {
                        let Some(xx) = (xi + j).checked_sub(r).filter(|&xx| xx < w) else { continue };
                        let src = &xs[((bi * h + yy) * w + xx) * c..][..c];
                        fma_row(px, &ts[(i * k + j) * c..][..c], src);
                    }
                }
            }
        });
        Ok(out)
    })?;
    Ok(Some(Tensor::from_vec(out, (b, h, w, c), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_a_grouped_convolution() {
        let dev = Device::Cpu;
        for (k, bias) in [(3, true), (5, false)] {
            let x = Tensor::randn(0f32, 1.0, (2, 6, 5, 7), &dev).unwrap();
            let weight = Tensor::randn(0f32, 1.0, (7, 1, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
            let taps = weight.reshape((7, k, k)).unwrap().permute((1, 2, 0)).unwrap();
            let got = depthwise_same(&x, &taps, bias.then_some(&b)).unwrap().unwrap();
            let nchw = x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
            let mut want = nchw.conv2d(&weight, k / 2, 1, 1, 7).unwrap();
            if bias {
                want = want.broadcast_add(&b.reshape((1, 7, 1, 1)).unwrap()).unwrap();
            }
            let want = want.permute((0, 2, 3, 1)).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "k {k}");
        }
    }
}
