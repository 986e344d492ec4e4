//! Activations on the CPU (f32), parallel and vectorised: candle's unary ops run on one thread
//! with a scalar libm `exp`/`tanh` per element, which on the MLPs' wide hidden layers (Flux:
//! 12288 channels per token) cost as much as a matrix product.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::simd::{exp, gelu_erf, multiversion, silu};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `tanh(u)` through the vectorisable `exp` (exact to ~1e-7 absolute).
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

/// GELU, tanh approximation (PyTorch's `approximate="tanh"`, candle's `gelu`).
#[inline(always)]
fn gelu_tanh_one(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
}

#[inline(always)]
fn silu_body(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(y, &x)| *y = silu(x));
}

#[inline(always)]
fn gelu_tanh_body(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(y, &x)| *y = gelu_tanh_one(x));
}

/// `out[c] = value[c] * silu(gate[c])`.
#[inline(always)]
fn gated_silu_body(out: &mut [f32], value: &[f32], gate: &[f32]) {
    for ((o, v), g) in out.iter_mut().zip(value).zip(gate) {
        *o = v * silu(*g);
    }
}

multiversion!(fn silu_slice(dst: &mut [f32], src: &[f32]) -> () = silu_body);
multiversion!(fn gelu_tanh_slice(dst: &mut [f32], src: &[f32]) -> () = gelu_tanh_body);
/// `out[c] = value[c] * gelu_erf(gate[c])`.
#[inline(always)]
fn gated_gelu_body(out: &mut [f32], value: &[f32], gate: &[f32]) {
    for ((o, v), g) in out.iter_mut().zip(value).zip(gate) {
        *o = v * gelu_erf(*g);
    }
}

multiversion!(fn gated_gelu_row(out: &mut [f32], value: &[f32], gate: &[f32]) -> () = gated_gelu_body);
multiversion!(fn gated_silu_row(out: &mut [f32], value: &[f32], gate: &[f32]) -> () = gated_silu_body);

/// An elementwise map `f(dst, src)` over `x`, in parallel chunks; `None` unless f32 on the CPU.
fn map(x: &Tensor, f: fn(&mut [f32], &[f32])) -> Result<Option<Tensor>> {
    if !super::is_cpu_f32(x) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (g, l) = x.storage_and_layout();
    let src = super::f32_slice(&g, l)?;
    let mut dst = vec![0f32; src.len()];
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| f(d, s));
    drop(g);
    Ok(Some(Tensor::from_vec(dst, x.shape().clone(), x.device())?))
}

/// `silu(x)`: on the CPU in f32 the kernel, elsewhere candle's op.
pub fn silu_tensor(x: &Tensor) -> Result<Tensor> {
    match map(x, silu_slice)? {
        Some(y) => Ok(y),
        None => x.silu(),
    }
}

/// `gelu(x)` with the tanh approximation: on the CPU in f32 the kernel, elsewhere candle's op.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    match map(x, gelu_tanh_slice)? {
        Some(y) => Ok(y),
        None => x.gelu(),
    }
}

/// The gate's activation in [`glu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// SwiGLU-style (SANA's Mix-FFN).
    Silu,
    /// GEGLU with the exact GELU (the UNet's feed-forward).
    GeluErf,
}

/// The gated half of a GLU over the last axis: `y[.., :n] * act(y[.., n:])` for `y` `[.., 2n]`.
/// On the CPU in f32 one pass, elsewhere narrow, the activation and a product.
pub fn glu(y: &Tensor, n: usize, gate: Gate) -> Result<Tensor> {
    let last = y.dims().last().copied().unwrap_or(0);
    if last != 2 * n || n == 0 {
        candle_core::bail!("glu: last axis {last} is not twice {n}");
    }
    if super::is_cpu_f32(y) {
        let y = y.contiguous()?;
        let (g, l) = y.storage_and_layout();
        let src = super::f32_slice(&g, l)?;
        let row = match gate {
            Gate::Silu => gated_silu_row,
            Gate::GeluErf => gated_gelu_row,
        };
        let mut out = vec![0f32; src.len() / 2];
        out.par_chunks_mut(n).zip(src.par_chunks(2 * n)).for_each(|(o, r)| row(o, &r[..n], &r[n..]));
        let mut dims = y.dims().to_vec();
        if let Some(d) = dims.last_mut() {
            *d = n;
        }
        drop(g);
        return Tensor::from_vec(out, dims, y.device());
    }
    let d = y.rank() - 1;
    let g = y.narrow(d, n, n)?;
    let g = match gate {
        Gate::Silu => g.silu()?,
        Gate::GeluErf => g.gelu_erf()?,
    };
    y.narrow(d, 0, n)? * g
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The largest difference relative to the reference, absolute below 1: the inputs are
    /// random draws (N(0, 4)), and a gated product reaching the hundreds is only exact to f32's
    /// 1e-7 of itself (an absolute bound made this test fail on an unlucky draw).
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b.abs().unwrap().maximum(1f32).unwrap();
        ((a - b).unwrap().abs().unwrap() / scale).unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn match_candle_activations() {
        let x = Tensor::randn(0f32, 4.0, (3, 7, 40_000), &Device::Cpu).unwrap();
        assert!(max_diff(&silu_tensor(&x).unwrap(), &x.silu().unwrap()) < 1e-5);
        assert!(max_diff(&gelu_tanh(&x).unwrap(), &x.gelu().unwrap()) < 1e-5);
        let want = (x.narrow(2, 0, 20_000).unwrap() * x.narrow(2, 20_000, 20_000).unwrap().silu().unwrap()).unwrap();
        assert!(max_diff(&glu(&x, 20_000, Gate::Silu).unwrap(), &want) < 1e-5);
        let want =
            (x.narrow(2, 0, 20_000).unwrap() * x.narrow(2, 20_000, 20_000).unwrap().gelu_erf().unwrap()).unwrap();
        assert!(max_diff(&glu(&x, 20_000, Gate::GeluErf).unwrap(), &want) < 1e-4);
        assert!(glu(&x, 7, Gate::Silu).is_err());
        // Strided input.
        let t = x.narrow(2, 0, 64).unwrap().transpose(1, 2).unwrap();
        assert!(max_diff(&gelu_tanh(&t).unwrap(), &t.gelu().unwrap()) < 1e-5);
    }
}
