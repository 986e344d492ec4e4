//! The DC-AE decoder's blocks (diffusers' `autoencoder_dc.py`): `ResBlock`,
//! `EfficientViTBlock` (multi-scale linear attention, then a normed `GLUMBConv` with residual)
//! and `DCUpBlock2d` (2x up by nearest interpolation + conv or by conv + pixel shuffle, plus the
//! channel-repeating shortcut). Tensors are `[B, C, h, w]` between blocks; the per-channel
//! linear maps and norms run channels-last.

use crate::models::layers::{dense, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::conv::Conv2d;

use crate::models::sana::conv::{Depthwise, GluMbConv, RmsNorm};

/// `[B, C, h, w]` -> `[B, h, w, C]`.
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))
}

/// `[B, h, w, C]` -> `[B, C, h, w]`.
pub fn channels_first(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 1, 2))?.contiguous()
}

pub fn conv3x3(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding: 1, ..Default::default() };
    if bias {
        crate::models::conv::conv2d(in_dim, out_dim, 3, cfg, vb)
    } else {
        crate::models::conv::conv2d_no_bias(in_dim, out_dim, 3, cfg, vb)
    }
}

/// The activations diffusers' `get_activation` offers that DC-AE configs use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    Relu,
    Gelu,
}

impl Activation {
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "relu" => Ok(Self::Relu),
            "gelu" => Ok(Self::Gelu),
            other => Err(format!("activation \"{other}\" is not supported (silu, swish, relu, gelu)")),
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
        }
    }
}

/// The block norms: `rms_norm` (with bias) or `batch_norm` (eval: running statistics), eps 1e-5,
/// over the channels.
pub enum ChannelNorm {
    Rms(RmsNorm),
    /// `x * scale + shift` per channel.
    Batch {
        scale: Tensor,
        shift: Tensor,
    },
}

impl ChannelNorm {
    pub fn new(kind: &str, dim: usize, vb: VarBuilder) -> Result<Self> {
        match kind {
            "rms_norm" => Ok(Self::Rms(RmsNorm::new(dim, 1e-5, true, vb)?)),
            "batch_norm" => {
                let (w, b) = (vb.get(dim, "weight")?, vb.get(dim, "bias")?);
                let (mean, var) = (vb.get(dim, "running_mean")?, vb.get(dim, "running_var")?);
                let scale = (w / (var + 1e-5)?.sqrt()?)?;
                let shift = (b - (mean * &scale)?)?;
                Ok(Self::Batch { scale, shift })
            }
            other => candle_core::bail!("norm type \"{other}\" is not supported"),
        }
    }

    /// Channels-last `[..., C]`.
    pub fn forward_last(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Rms(n) => n.forward(x),
            Self::Batch { scale, shift } => x.broadcast_mul(scale)?.broadcast_add(shift),
        }
    }

    /// `[B, C, h, w]`.
    pub fn forward_first(&self, x: &Tensor) -> Result<Tensor> {
        channels_first(&self.forward_last(&channels_last(x)?)?)
    }
}

/// `ResBlock`: `x + norm(conv2(act(conv1(x))))`.
pub struct ResBlock {
    conv1: Conv2d,
    conv2: Conv2d,
    norm: ChannelNorm,
    act: Activation,
}

impl ResBlock {
    pub fn new(dim: usize, norm: &str, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: conv3x3(dim, dim, true, vb.pp("conv1"))?,
            conv2: conv3x3(dim, dim, false, vb.pp("conv2"))?,
            norm: ChannelNorm::new(norm, dim, vb.pp("norm"))?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv2.forward(&self.act.apply(&self.conv1.forward(x)?)?)?;
        x + self.norm.forward_first(&h)?
    }
}

/// `SanaMultiscaleAttentionProjection`: a depthwise `k x k` convolution then a 1x1 convolution
/// grouped per head and per q/k/v (`3 heads` groups), both without bias.
struct MultiscaleProjection {
    proj_in: Depthwise,
    /// `[groups, in/groups, out/groups]`.
    proj_out: Tensor,
}

impl MultiscaleProjection {
    fn new(channels: usize, groups: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let g = channels / groups;
        let w = vb.pp("proj_out").get((channels, g, 1, 1), "weight")?;
        let proj_out = w.reshape((groups, g, g))?.transpose(1, 2)?.contiguous()?;
        Ok(Self { proj_in: Depthwise::new(channels, k, false, vb.pp("proj_in"))?, proj_out })
    }

    /// Channels-last `[B, h, w, C]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (groups, g, _) = self.proj_out.dims3()?;
        let y = self.proj_in.forward(x)?.reshape((b * h * w, groups, g))?.transpose(0, 1)?.contiguous()?;
        y.matmul(&self.proj_out)?.transpose(0, 1)?.reshape((b, h, w, c))
    }
}

/// `SanaMultiscaleLinearAttention` with its residual: q, k, v (1x1, no bias) and their
/// multi-scale copies, split into `3 head_dim` channel groups (diffusers' layout: the groups run
/// across the concatenated q | k | v channels), ReLU on q and k, then linear attention (more
/// tokens than `head_dim`: `v k^T q / (sum k . q + 1e-15)`) or the quadratic form, `to_out`,
/// the norm.
pub struct MultiscaleLinearAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    multiscale: Vec<MultiscaleProjection>,
    to_out: Linear,
    norm_out: ChannelNorm,
    head_dim: usize,
}

const EPS: f64 = 1e-15;

impl MultiscaleLinearAttention {
    pub fn new(dim: usize, head_dim: usize, scales: &[usize], norm: &str, vb: VarBuilder) -> Result<Self> {
        let heads = dim / head_dim;
        let inner = heads * head_dim;
        let multiscale = scales
            .iter()
            .enumerate()
            .map(|(i, &k)| MultiscaleProjection::new(3 * inner, 3 * heads, k, vb.pp(format!("to_qkv_multiscale.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            to_q: dense(dim, inner, false, vb.pp("to_q"))?,
            to_k: dense(dim, inner, false, vb.pp("to_k"))?,
            to_v: dense(dim, inner, false, vb.pp("to_v"))?,
            to_out: dense(inner * (1 + scales.len()), dim, false, vb.pp("to_out"))?,
            norm_out: ChannelNorm::new(norm, dim, vb.pp("norm_out"))?,
            multiscale,
            head_dim,
        })
    }

    /// `[B, C, h, w]`, residual included.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let n = h * w;
        let xl = channels_last(x)?.contiguous()?;
        let qkv = Tensor::cat(&[self.to_q.forward(&xl)?, self.to_k.forward(&xl)?, self.to_v.forward(&xl)?], 3)?;
        let mut scales = vec![qkv.clone()];
        for m in &self.multiscale {
            scales.push(m.forward(&qkv)?);
        }
        let all = Tensor::cat(&scales, 3)?;
        let d = self.head_dim;
        let groups = all.dim(3)? / (3 * d);
        // [B, G, 3d, N]
        let all = all.reshape((b, n, groups, 3 * d))?.permute((0, 2, 3, 1))?.contiguous()?;
        let q = all.narrow(2, 0, d)?.relu()?;
        let k = all.narrow(2, d, d)?.relu()?;
        let v = all.narrow(2, 2 * d, d)?.contiguous()?;
        let z = if n > d {
            let vk = v.matmul(&k.transpose(2, 3)?.contiguous()?)?; // [B, G, d, d]
            let num = vk.matmul(&q.contiguous()?)?; // [B, G, d, N]
            let den = q.broadcast_mul(&k.sum_keepdim(3)?)?.sum_keepdim(2)?; // [B, G, 1, N]
            num.broadcast_div(&(den + EPS)?)?
        } else {
            let scores = k.transpose(2, 3)?.contiguous()?.matmul(&q.contiguous()?)?; // [B, G, N(keys), N]
            let scores = scores.broadcast_div(&(scores.sum_keepdim(2)? + EPS)?)?;
            v.matmul(&scores)?
        };
        // [B, G d, N] -> channels-last [B, h, w, G d]
        let z = z.reshape((b, groups * d, n))?.transpose(1, 2)?.reshape((b, h, w, groups * d))?;
        let out = self.norm_out.forward_last(&self.to_out.forward(&z)?)?;
        x + channels_first(&out)?
    }
}

/// `EfficientViTBlock`: the attention, then `x + GLUMBConv(x)` (expand 4, RMS-normed output).
pub struct EfficientVitBlock {
    attn: MultiscaleLinearAttention,
    conv_out: GluMbConv,
}

impl EfficientVitBlock {
    pub fn new(dim: usize, head_dim: usize, scales: &[usize], norm: &str, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attn: MultiscaleLinearAttention::new(dim, head_dim, scales, norm, vb.pp("attn"))?,
            conv_out: GluMbConv::new(dim, dim, 4 * dim, true, vb.pp("conv_out"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.attn.forward(x)?;
        let y = self.conv_out.forward(&channels_last(&x)?.contiguous()?)?;
        x + channels_first(&y)?
    }
}

/// `[B, C r^2, h, w]` -> `[B, C, h r, w r]` (torch's `pixel_shuffle`).
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let c_out = c / (r * r);
    x.reshape((b, c_out, r, r, h, w))?.permute((0, 1, 4, 2, 5, 3))?.reshape((b, c_out, h * r, w * r))
}

/// Each channel repeated `n` times in place (torch's `repeat_interleave` on dim 1).
pub fn repeat_channels(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, c, n, h, w))?.reshape((b, c * n, h, w))
}

/// `DCUpBlock2d` with its shortcut: 2x up to `out` channels.
pub struct UpBlock {
    conv: Conv2d,
    interpolate: bool,
    repeats: usize,
}

impl UpBlock {
    pub fn new(in_dim: usize, out_dim: usize, interpolate: bool, vb: VarBuilder) -> Result<Self> {
        let conv_out = if interpolate { out_dim } else { 4 * out_dim };
        Ok(Self { conv: conv3x3(in_dim, conv_out, true, vb.pp("conv"))?, interpolate, repeats: 4 * out_dim / in_dim })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let y = if self.interpolate {
            self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?
        } else {
            pixel_shuffle(&self.conv.forward(x)?, 2)?
        };
        y + pixel_shuffle(&repeat_channels(x, self.repeats)?, 2)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pixel_shuffle_moves_channel_blocks_into_space() {
        // One output channel, r = 2: input channel 2 (i = 1, j = 0) lands at (2y + 1, 2x).
        let x = Tensor::arange(0f32, 4.0, &Device::Cpu).unwrap().reshape((1, 4, 1, 1)).unwrap();
        let y = pixel_shuffle(&x, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y, [0.0, 1.0, 2.0, 3.0]);
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap().reshape((1, 4, 1, 2)).unwrap();
        let y = pixel_shuffle(&x, 2).unwrap().squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, [[0.0, 2.0, 1.0, 3.0], [4.0, 6.0, 5.0, 7.0]]);
    }

    #[test]
    fn channels_repeat_in_place() {
        let x = Tensor::arange(0f32, 2.0, &Device::Cpu).unwrap().reshape((1, 2, 1, 1)).unwrap();
        let y = repeat_channels(&x, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(y, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn activations_parse() {
        assert_eq!(Activation::parse("swish"), Ok(Activation::Silu));
        assert!(Activation::parse("tanh").unwrap_err().contains("tanh"));
    }
}
