//! Convolution pieces SANA's transformer and its DC-AE share, kept in channels-last layout
//! (`[B, h, w, C]`) so the 1x1 convolutions are plain linear maps over the last axis:
//! diffusers' `RMSNorm` (with its optional bias), the depthwise convolution, and `GLUMBConv`
//! (the Mix-FFN: 1x1 up to twice the hidden width, SiLU, depthwise 3x3, half times SiLU of the
//! other half, 1x1 down).

use crate::models::layers::Linear;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// diffusers' `RMSNorm` over the last axis: `x / sqrt(mean(x^2) + eps) * weight (+ bias)`, the
/// statistics in f32.
pub struct RmsNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, bias: bool, vb: VarBuilder) -> Result<Self> {
        let bias = if bias { Some(vb.get(dim, "bias")?) } else { None };
        Ok(Self { weight: vb.get(dim, "weight")?, bias, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let y = xf.broadcast_mul(&inv)?.to_dtype(self.weight.dtype())?.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// A 1x1 convolution (`[out, in, 1, 1]` weights) as a linear map over the channel axis.
pub fn pointwise(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim, 1, 1), "weight")?.reshape((out_dim, in_dim))?;
    let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    Ok(Linear::from_weights(weight, bias))
}

/// A depthwise `k x k` convolution (stride 1, "same" zero padding, `groups == channels`) on
/// channels-last input: the sum of the `k^2` shifted inputs, each scaled per channel. (candle's
/// grouped convolution runs one convolution per group, far too slow for thousands of groups.)
pub struct Depthwise {
    /// `[k, k, C]`.
    taps: Tensor,
    bias: Option<Tensor>,
    k: usize,
}

impl Depthwise {
    pub fn new(channels: usize, k: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let taps =
            vb.get((channels, 1, k, k), "weight")?.reshape((channels, k, k))?.permute((1, 2, 0))?.contiguous()?;
        let bias = if bias { Some(vb.get(channels, "bias")?) } else { None };
        Ok(Self { taps, bias, k })
    }

    /// `[B, h, w, C]` -> `[B, h, w, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::kernels::depthwise_same(x, &self.taps, self.bias.as_ref())? {
            return Ok(y);
        }
        let (_, h, w, _) = x.dims4()?;
        let r = self.k / 2;
        let padded = x.pad_with_zeros(1, r, r)?.pad_with_zeros(2, r, r)?;
        let mut acc: Option<Tensor> = None;
        for i in 0..self.k {
            let rows = padded.narrow(1, i, h)?;
            for j in 0..self.k {
                let tap = self.taps.get(i)?.get(j)?;
                let term = rows.narrow(2, j, w)?.broadcast_mul(&tap)?;
                acc = Some(match acc {
                    Some(a) => (a + term)?,
                    None => term,
                });
            }
        }
        let acc = acc.expect("k > 0");
        match &self.bias {
            Some(b) => acc.broadcast_add(b),
            None => Ok(acc),
        }
    }
}

/// diffusers' `GLUMBConv`, without its residual (the callers add it where they have one).
pub struct GluMbConv {
    conv_inverted: Linear,
    conv_depth: Depthwise,
    conv_point: Linear,
    norm: Option<RmsNorm>,
    hidden: usize,
}

impl GluMbConv {
    /// `hidden` is `int(expand_ratio * in_dim)`; `rms_norm` the `norm_type="rms_norm"` output norm.
    pub fn new(in_dim: usize, out_dim: usize, hidden: usize, rms_norm: bool, vb: VarBuilder) -> Result<Self> {
        let norm = if rms_norm { Some(RmsNorm::new(out_dim, 1e-5, true, vb.pp("norm"))?) } else { None };
        Ok(Self {
            conv_inverted: pointwise(in_dim, 2 * hidden, true, vb.pp("conv_inverted"))?,
            conv_depth: Depthwise::new(2 * hidden, 3, true, vb.pp("conv_depth"))?,
            conv_point: pointwise(hidden, out_dim, false, vb.pp("conv_point"))?,
            norm,
            hidden,
        })
    }

    /// `[B, h, w, C]` -> `[B, h, w, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv_depth.forward(&crate::kernels::silu_tensor(&self.conv_inverted.forward(x)?)?)?;
        let y = self.conv_point.forward(&crate::kernels::glu(&y, self.hidden, crate::kernels::Gate::Silu)?)?;
        match &self.norm {
            Some(n) => n.forward(&y),
            None => Ok(y),
        }
    }
}
