//! The Wan2.1 VAE's blocks (diffusers' `WanResidualBlock`, `WanAttentionBlock`, `WanResample`,
//! `WanMidBlock`, `WanEncoder3d`, `WanDecoder3d`), on frames-major `[B, T, C, H, W]` activations.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::conv::Conv2d;

use super::conv::{last_frames, per_frame, CausalConv3d, ChannelRmsNorm, Slot, StripConv2d, TimeCache, CACHE_FRAMES};
use super::WanVaeConfig;

#[derive(Debug, Clone)]
pub(super) struct ResidualBlock {
    norm1: ChannelRmsNorm,
    conv1: CausalConv3d,
    norm2: ChannelRmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub fn load(in_c: usize, out_c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: ChannelRmsNorm::load(in_c, false, vb.pp("norm1"))?,
            conv1: CausalConv3d::load(in_c, out_c, (3, 3), (1, 1), (1, 1), vb.pp("conv1"))?,
            norm2: ChannelRmsNorm::load(out_c, false, vb.pp("norm2"))?,
            conv2: CausalConv3d::load(out_c, out_c, (3, 3), (1, 1), (1, 1), vb.pp("conv2"))?,
            shortcut: if in_c != out_c {
                Some(CausalConv3d::pointwise(in_c, out_c, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut TimeCache) -> candle_core::Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None)?,
            None => x.clone(),
        };
        let y = crate::kernels::silu_tensor(&self.norm1.forward(x)?)?;
        let y = self.conv1.forward_cached(&y, cache.slot())?;
        let y = crate::kernels::silu_tensor(&self.norm2.forward(&y)?)?;
        let y = self.conv2.forward_cached(&y, cache.slot())?;
        y + h
    }
}

/// Single-head self-attention over each frame's pixels.
#[derive(Debug, Clone)]
pub(super) struct AttentionBlock {
    norm: ChannelRmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttentionBlock {
    pub fn load(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig::default();
        Ok(Self {
            norm: ChannelRmsNorm::load(c, true, vb.pp("norm"))?,
            to_qkv: crate::models::conv::conv2d(c, 3 * c, 1, cfg, vb.pp("to_qkv"))?,
            proj: crate::models::conv::conv2d(c, c, 1, cfg, vb.pp("proj"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = per_frame(x, |f| {
            let (n, c, h, w) = f.dims4()?;
            let qkv = self.to_qkv.forward(&self.norm.forward(f)?)?.reshape((n, 3 * c, h * w))?;
            let dtype = qkv.dtype();
            // [n, hw, c] each, scores in f32.
            let part =
                |i: usize| qkv.narrow(1, i * c, c)?.transpose(1, 2)?.contiguous()?.to_dtype(candle_core::DType::F32);
            let (q, k, v) = (part(0)?, part(1)?, part(2)?);
            let scores = (q.matmul(&k.t()?)? * (c as f64).powf(-0.5))?;
            let out = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let out = out.transpose(1, 2)?.reshape((n, c, h, w))?.to_dtype(dtype)?;
            self.proj.forward(&out)
        })?;
        y + x
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ResampleMode {
    Up2d,
    Up3d,
    Down2d,
    Down3d,
}

/// Spatial 2x up/down-sampling, with a temporal 2x step for the 3-D modes.
#[derive(Debug, Clone)]
pub(super) struct Resample {
    mode: ResampleMode,
    conv: StripConv2d,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    /// Up-samplers halve the channels (`c -> c/2`), as Wan2.1's decoder does.
    pub fn load(c: usize, mode: ResampleMode, vb: VarBuilder) -> candle_core::Result<Self> {
        // Down-samplers: diffusers' ZeroPad2d((0, 1, 0, 1)), one row below and one column right.
        let (out_c, pad, stride) = match mode {
            ResampleMode::Up2d | ResampleMode::Up3d => (c / 2, (1, 1, 1, 1), 1),
            ResampleMode::Down2d | ResampleMode::Down3d => (c, (0, 1, 0, 1), 2),
        };
        let conv = StripConv2d::load(c, out_c, 3, stride, pad, vb.pp("resample.1"))?;
        let time_conv = match mode {
            ResampleMode::Up3d => Some(CausalConv3d::load(c, 2 * c, (3, 1), (1, 1), (1, 0), vb.pp("time_conv"))?),
            ResampleMode::Down3d => Some(CausalConv3d::load(c, c, (3, 1), (2, 1), (0, 0), vb.pp("time_conv"))?),
            _ => None,
        };
        Ok(Self { mode, conv, time_conv })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut TimeCache) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        if let (ResampleMode::Up3d, Some(tc)) = (self.mode, &self.time_conv) {
            let slot = cache.slot();
            let previous = slot.clone();
            if matches!(previous, Slot::Empty) {
                // The first chunk (one frame) is not doubled in time.
                *slot = Slot::Rep;
            } else {
                let mut keep = last_frames(&x, CACHE_FRAMES)?;
                if keep.dim(1)? < CACHE_FRAMES {
                    let before = match &previous {
                        Slot::Frames(prev) => last_frames(prev, 1)?,
                        _ => keep.zeros_like()?,
                    };
                    keep = Tensor::cat(&[&before, &keep], 1)?;
                }
                let y = match &previous {
                    Slot::Frames(prev) => tc.forward(&x, Some(prev))?,
                    _ => tc.forward(&x, None)?,
                };
                *slot = Slot::Frames(keep);
                // [B, T, 2C, H, W]: channel halves are the two output frames of each input frame.
                let (b, t, c2, h, w) = y.dims5()?;
                x = y.reshape((b, t * 2, c2 / 2, h, w))?;
            }
        }
        x = per_frame(&x, |f| match self.mode {
            ResampleMode::Up2d | ResampleMode::Up3d => {
                let (_, _, h, w) = f.dims4()?;
                self.conv.forward(&f.upsample_nearest2d(2 * h, 2 * w)?)
            }
            ResampleMode::Down2d | ResampleMode::Down3d => self.conv.forward(f),
        })?;
        if let (ResampleMode::Down3d, Some(tc)) = (self.mode, &self.time_conv) {
            let slot = cache.slot();
            match slot.clone() {
                Slot::Frames(prev) => {
                    let keep = last_frames(&x, 1)?;
                    x = tc.forward(&Tensor::cat(&[&last_frames(&prev, 1)?, &x], 1)?, None)?;
                    *slot = Slot::Frames(keep);
                }
                // The first chunk passes unchanged (its one frame stays one latent frame).
                _ => *slot = Slot::Frames(x.clone()),
            }
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    first: ResidualBlock,
    attention: AttentionBlock,
    second: ResidualBlock,
}

impl MidBlock {
    pub fn load(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            first: ResidualBlock::load(c, c, vb.pp("resnets.0"))?,
            attention: AttentionBlock::load(c, vb.pp("attentions.0"))?,
            second: ResidualBlock::load(c, c, vb.pp("resnets.1"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut TimeCache) -> candle_core::Result<Tensor> {
        let x = self.first.forward(x, cache)?;
        let x = self.attention.forward(&x)?;
        self.second.forward(&x, cache)
    }
}

#[derive(Debug, Clone)]
enum DownLayer {
    Residual(ResidualBlock),
    Attention(AttentionBlock),
    Resample(Resample),
}

/// `WanEncoder3d` (Wan2.1 layout): `z_channels` out are the mean and log-variance halves.
#[derive(Debug, Clone)]
pub(super) struct Encoder {
    conv_in: CausalConv3d,
    layers: Vec<DownLayer>,
    mid: MidBlock,
    norm_out: ChannelRmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    pub fn load(c: &WanVaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dims: Vec<usize> = std::iter::once(1).chain(c.dim_mult.iter().copied()).map(|m| m * c.base_dim).collect();
        let conv_in = CausalConv3d::load(c.in_channels, dims[0], (3, 3), (1, 1), (1, 1), vb.pp("conv_in"))?;
        let mut layers = Vec::new();
        let mut scale = 1.0f64;
        let down = vb.pp("down_blocks");
        for i in 0..c.dim_mult.len() {
            let (mut in_c, out_c) = (dims[i], dims[i + 1]);
            for _ in 0..c.num_res_blocks {
                layers.push(DownLayer::Residual(ResidualBlock::load(in_c, out_c, down.pp(layers.len()))?));
                if c.attn_scales.contains(&scale) {
                    layers.push(DownLayer::Attention(AttentionBlock::load(out_c, down.pp(layers.len()))?));
                }
                in_c = out_c;
            }
            if i + 1 != c.dim_mult.len() {
                let mode = if c.temperal_downsample[i] { ResampleMode::Down3d } else { ResampleMode::Down2d };
                layers.push(DownLayer::Resample(Resample::load(out_c, mode, down.pp(layers.len()))?));
                scale /= 2.0;
            }
        }
        let top = *dims.last().expect("dims has dim_mult.len() + 1 entries");
        Ok(Self {
            conv_in,
            layers,
            mid: MidBlock::load(top, vb.pp("mid_block"))?,
            norm_out: ChannelRmsNorm::load(top, false, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::load(top, 2 * c.z_dim, (3, 3), (1, 1), (1, 1), vb.pp("conv_out"))?,
        })
    }

    /// One chunk of frames `[B, T, C, H, W]` (the first chunk one frame, later ones four).
    pub fn forward(&self, x: &Tensor, cache: &mut TimeCache) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward_cached(x, cache.slot())?;
        for layer in &self.layers {
            x = match layer {
                DownLayer::Residual(r) => r.forward(&x, cache)?,
                DownLayer::Attention(a) => a.forward(&x)?,
                DownLayer::Resample(r) => r.forward(&x, cache)?,
            };
        }
        let x = self.mid.forward(&x, cache)?;
        let x = crate::kernels::silu_tensor(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward_cached(&x, cache.slot())
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

/// `WanDecoder3d` (Wan2.1 layout).
#[derive(Debug, Clone)]
pub(super) struct Decoder {
    conv_in: CausalConv3d,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: ChannelRmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    pub fn load(c: &WanVaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let base = c.decoder_base_dim.unwrap_or(c.base_dim);
        let last = *c.dim_mult.last().expect("config checked: dim_mult is not empty");
        let dims: Vec<usize> =
            std::iter::once(last).chain(c.dim_mult.iter().rev().copied()).map(|m| m * base).collect();
        let temporal_up: Vec<bool> = c.temperal_downsample.iter().rev().copied().collect();
        let levels = c.dim_mult.len();
        let mut up_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            // After the first level the previous up-sampler has halved the channels.
            let mut in_c = if i > 0 { dims[i] / 2 } else { dims[i] };
            let out_c = dims[i + 1];
            let vb_i = vb.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::with_capacity(c.num_res_blocks + 1);
            for j in 0..=c.num_res_blocks {
                resnets.push(ResidualBlock::load(in_c, out_c, vb_i.pp(format!("resnets.{j}")))?);
                in_c = out_c;
            }
            let upsampler = if i + 1 != levels {
                let mode = if temporal_up[i] { ResampleMode::Up3d } else { ResampleMode::Up2d };
                Some(Resample::load(out_c, mode, vb_i.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let out_c = *dims.last().expect("dims is not empty");
        Ok(Self {
            conv_in: CausalConv3d::load(c.z_dim, dims[0], (3, 3), (1, 1), (1, 1), vb.pp("conv_in"))?,
            mid: MidBlock::load(dims[0], vb.pp("mid_block"))?,
            up_blocks,
            norm_out: ChannelRmsNorm::load(out_c, false, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::load(out_c, c.out_channels, (3, 3), (1, 1), (1, 1), vb.pp("conv_out"))?,
        })
    }

    /// One latent frame `[B, 1, z, h, w]` to its video frames (1 for the first chunk, then 4).
    pub fn forward(&self, x: &Tensor, cache: &mut TimeCache) -> candle_core::Result<Tensor> {
        let x = self.conv_in.forward_cached(x, cache.slot())?;
        let mut x = self.mid.forward(&x, cache)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x, cache)?;
            }
            if let Some(up) = &block.upsampler {
                x = up.forward(&x, cache)?;
            }
        }
        let x = crate::kernels::silu_tensor(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward_cached(&x, cache.slot())
    }
}
