//! Group norm on the CPU (f32), optionally followed by SiLU, in one parallel task per group:
//! candle's `GroupNorm` is a chain of single-threaded tensor ops (a mean, a centred copy, a
//! square, a second mean, a division, two broadcasts) and the resnets then apply SiLU as one
//! more pass.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::simd::{multiversion, silu};

/// Lanes of the f64 accumulators (one AVX-512 register).
const LANES: usize = 8;

/// Sum and sum of squares of `xs`, accumulated in f64 (one pass; in f64 the variance as
/// `E[x²] - mean²` keeps ~1e-9 relative precision for activations whose mean is up to 1e3
/// standard deviations).
#[inline(always)]
fn moments_body(xs: &[f32]) -> (f64, f64) {
    let (mut sum, mut sq) = ([0f64; LANES], [0f64; LANES]);
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for ((s, q), &x) in sum.iter_mut().zip(sq.iter_mut()).zip(chunk) {
            let x = x as f64;
            *s += x;
            *q += x * x;
        }
    }
    let (mut s, mut q) = (sum.iter().sum::<f64>(), sq.iter().sum::<f64>());
    for &x in chunks.remainder() {
        s += x as f64;
        q += x as f64 * x as f64;
    }
    (s, q)
}

multiversion!(fn moments(xs: &[f32]) -> (f64, f64) = moments_body);

/// `out = x * scale + shift`, then SiLU when asked.
#[inline(always)]
fn affine_body(xs: &[f32], out: &mut [f32], scale: f32, shift: f32, with_silu: bool) {
    if with_silu {
        out.iter_mut().zip(xs).for_each(|(o, &x)| *o = silu(x * scale + shift));
    } else {
        out.iter_mut().zip(xs).for_each(|(o, &x)| *o = x * scale + shift);
    }
}

multiversion!(fn affine(xs: &[f32], out: &mut [f32], scale: f32, shift: f32, with_silu: bool) -> () = affine_body);

/// `GroupNorm(groups, eps)` with per-channel `weight` and `bias` over `x` `[B, C, ...]`, then
/// SiLU when `with_silu`. `None` unless all are f32 on the CPU.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    with_silu: bool,
) -> Result<Option<Tensor>> {
    let cpu_f32 = super::is_cpu_f32;
    if !(cpu_f32(x) && cpu_f32(weight) && cpu_f32(bias)) {
        return Ok(None);
    }
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm: {groups} groups over input {dims:?}");
    }
    let c = dims[1];
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!("group norm: weight {:?} and bias {:?} for {c} channels", weight.dims(), bias.dims());
    }
    let spatial: usize = dims[2..].iter().product();
    let per_group = c / groups * spatial;
    let out = super::with_f32_slices([x, weight, bias], None, |[xs, gamma, beta], _| {
        // Each group task reads its input twice (moments, then the affine map into the output; the
        // second read hits cache) and first touches its own part of the output.
        let mut out = vec![0f32; xs.len()];
        if per_group > 0 {
            out.par_chunks_mut(per_group).zip(xs.par_chunks(per_group)).enumerate().for_each(|(index, (dst, src))| {
                let n = src.len() as f64;
                let (sum, sq) = moments(src);
                let mean = sum / n;
                let rstd = 1.0 / ((sq / n - mean * mean).max(0.0) + eps).sqrt();
                let first_channel = (index % groups) * (c / groups);
                let channels = dst.chunks_exact_mut(spatial.max(1)).zip(src.chunks_exact(spatial.max(1)));
                for (k, (out_channel, channel)) in channels.enumerate() {
                    let scale = gamma[first_channel + k] as f64 * rstd;
                    let shift = beta[first_channel + k] as f64 - mean * scale;
                    affine(channel, out_channel, scale as f32, shift as f32, with_silu);
                }
            });
        }
        Ok(out)
    })?;
    Ok(Some(Tensor::from_vec(out, dims, x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candle_group_norm_and_silu() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (2, 12, 5, 7), &dev).unwrap() + 3.0).unwrap();
        let weight = Tensor::randn(1f32, 0.3, 12, &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.3, 12, &dev).unwrap();
        let reference = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), 12, 4, 1e-5).unwrap();
        let want = reference.forward(&x).unwrap();
        for with_silu in [false, true] {
            let got = group_norm(&x, 4, &weight, &bias, 1e-5, with_silu).unwrap().unwrap();
            let want = if with_silu { want.silu().unwrap() } else { want.clone() };
            let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "silu {with_silu}");
        }
        assert!(group_norm(&x, 5, &weight, &bias, 1e-5, false).is_err());
    }
}
