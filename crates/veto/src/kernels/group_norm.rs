//! Group norm on the CPU (f32), optionally followed by SiLU, in one parallel pass per group:
//! candle's `GroupNorm` is a chain of single-threaded tensor ops (a mean, a centred copy, a
//! square, a second mean, a division, two broadcasts) and the resnets then apply SiLU as one
//! more pass.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::simd::{multiversion, silu};

/// Lanes of the f64 accumulators (one AVX-512 register).
const LANES: usize = 8;

/// Sum and sum of squared deviations from `mean` of `xs`, accumulated in f64.
#[inline(always)]
fn moments_body(xs: &[f32], mean: f64) -> (f64, f64) {
    let (mut sum, mut sq) = ([0f64; LANES], [0f64; LANES]);
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for ((s, q), &x) in sum.iter_mut().zip(sq.iter_mut()).zip(chunk) {
            let x = x as f64;
            *s += x;
            *q += (x - mean) * (x - mean);
        }
    }
    let (mut s, mut q) = (sum.iter().sum::<f64>(), sq.iter().sum::<f64>());
    for &x in chunks.remainder() {
        s += x as f64;
        q += (x as f64 - mean) * (x as f64 - mean);
    }
    (s, q)
}

multiversion!(fn moments(xs: &[f32], mean: f64) -> (f64, f64) = moments_body);

/// `y = x * scale + shift`, then SiLU when asked.
#[inline(always)]
fn affine_body(xs: &mut [f32], scale: f32, shift: f32, with_silu: bool) {
    if with_silu {
        xs.iter_mut().for_each(|x| *x = silu(*x * scale + shift));
    } else {
        xs.iter_mut().for_each(|x| *x = *x * scale + shift);
    }
}

multiversion!(fn affine(xs: &mut [f32], scale: f32, shift: f32, with_silu: bool) -> () = affine_body);

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
    let x = x.contiguous()?;
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    let mut out = {
        let (g, l) = x.storage_and_layout();
        super::f32_slice(&g, l)?.to_vec()
    };
    let (gw, lw) = weight.storage_and_layout();
    let gamma = super::f32_slice(&gw, lw)?;
    let (gb, lb) = bias.storage_and_layout();
    let beta = super::f32_slice(&gb, lb)?;
    if per_group > 0 {
        out.par_chunks_mut(per_group).enumerate().for_each(|(index, group)| {
            let n = group.len() as f64;
            let (sum, _) = moments(group, 0.0);
            let mean = sum / n;
            let (_, sq) = moments(group, mean);
            let rstd = 1.0 / (sq / n + eps).sqrt();
            let first_channel = (index % groups) * (c / groups);
            for (k, channel) in group.chunks_exact_mut(spatial.max(1)).enumerate() {
                let scale = gamma[first_channel + k] as f64 * rstd;
                let shift = beta[first_channel + k] as f64 - mean * scale;
                affine(channel, scale as f32, shift as f32, with_silu);
            }
        });
    }
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
