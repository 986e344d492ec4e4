//! The convolution and group norm the UNet and the VAEs build on: candle's layers (same
//! weights, same loading), run on the CPU in f32 by veto's kernels
//! ([`kernels::conv2d`], [`kernels::group_norm`]) where those apply, by candle
//! elsewhere (the GPU, half precision, dilated or grouped convolutions).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::kernels;
use crate::profile::{self, Op};

/// A 2-d convolution (candle's `Conv2d`, faster on the CPU).
#[derive(Clone, Debug)]
pub struct Conv2d(candle_nn::Conv2d);

/// `Conv2d(in, out, kernel, cfg)` with bias under `vb` (`weight`, `bias`).
pub fn conv2d(cin: usize, cout: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    Ok(Conv2d(candle_nn::conv2d(cin, cout, kernel, cfg, vb)?))
}

/// [`conv2d`] without bias.
pub fn conv2d_no_bias(cin: usize, cout: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    Ok(Conv2d(candle_nn::conv2d_no_bias(cin, cout, kernel, cfg, vb)?))
}

impl Conv2d {
    /// The kernel, `[out, in / groups, k, k]`.
    pub fn weight(&self) -> &Tensor {
        self.0.weight()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _scope = profile::scope(Op::Matmul);
        let cfg = self.0.config();
        if cfg.dilation == 1 && cfg.groups == 1 {
            if let Some(y) = kernels::conv2d(x, self.0.weight(), self.0.bias(), cfg.stride, cfg.padding)? {
                return Ok(y);
            }
        }
        self.0.forward(x)
    }
}

/// Group norm (candle's `GroupNorm`, faster on the CPU), with SiLU fused on request.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    fallback: candle_nn::GroupNorm,
}

/// `GroupNorm(groups, channels, eps)` under `vb` (`weight`, `bias`).
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let fallback = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm { weight, bias, groups, eps, fallback })
}

impl GroupNorm {
    fn run(&self, x: &Tensor, with_silu: bool) -> Result<Tensor> {
        let _scope = profile::scope(Op::Norm);
        if let Some(y) = kernels::group_norm(x, self.groups, &self.weight, &self.bias, self.eps, with_silu)? {
            return Ok(y);
        }
        let y = self.fallback.forward(x)?;
        if with_silu {
            y.silu()
        } else {
            Ok(y)
        }
    }

    /// `silu(group_norm(x))`, the resnets' pre-activation, in one pass on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }
}
