//! The Wan VAE's causal 3-D convolution and the temporal cache that lets it run chunk by chunk.
//!
//! Activations are kept frames-major, `[B, T, C, H, W]`, so a run of frames is one batch of
//! images for candle's `conv2d`: a 3-D convolution with a `kt`-frame kernel is the sum of `kt`
//! 2-D convolutions over shifted runs of frames (candle has no `conv3d`).

use candle_core::Tensor;
use candle_nn::VarBuilder;

/// Frames a 3-frame causal convolution keeps from the previous chunk (diffusers' `CACHE_T`).
pub(super) const CACHE_FRAMES: usize = 2;

/// What one cached layer remembers between chunks (diffusers' `feat_cache` entries).
#[derive(Debug, Clone)]
pub(super) enum Slot {
    /// Nothing yet: the layer has not seen a chunk.
    Empty,
    /// diffusers' `"Rep"` marker: the temporal up-sampler skipped the first chunk.
    Rep,
    /// The last input frames of the previous chunk(s).
    Frames(Tensor),
}

/// One slot per cached layer, handed out in call order each chunk (diffusers' `feat_idx`).
#[derive(Debug, Default)]
pub(super) struct TimeCache {
    slots: Vec<Slot>,
    next: usize,
}

impl TimeCache {
    /// Start the next chunk: layers get their slots again from the first.
    pub fn start_chunk(&mut self) {
        self.next = 0;
    }

    /// The next layer's slot.
    pub fn slot(&mut self) -> &mut Slot {
        if self.next == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.next += 1;
        &mut self.slots[self.next - 1]
    }
}

/// The last `n` frames (fewer if there are fewer).
pub(super) fn last_frames(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let t = x.dim(1)?;
    let n = n.min(t);
    x.narrow(1, t - n, n)
}

/// diffusers' `WanCausalConv3d`: zero padding of `2 * padding_t` frames in front (none behind),
/// symmetric spatial padding; a cache of previous frames replaces that much of the zero padding.
#[derive(Debug, Clone)]
pub(super) struct CausalConv3d {
    /// One `[out, in, kh, kw]` kernel per temporal tap.
    taps: Vec<Tensor>,
    bias: Tensor,
    stride_t: usize,
    stride_s: usize,
    pad_t: usize,
    pad_s: usize,
}

impl CausalConv3d {
    /// `kernel` `(kt, ks)` with a `ks x ks` spatial kernel, `stride` and `padding` `(time, space)`.
    pub fn load(
        in_c: usize,
        out_c: usize,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let (kt, ks) = kernel;
        let weight = vb.get((out_c, in_c, kt, ks, ks), "weight")?;
        let taps =
            (0..kt).map(|i| weight.narrow(2, i, 1)?.squeeze(2)?.contiguous()).collect::<candle_core::Result<_>>()?;
        Ok(Self {
            taps,
            bias: vb.get(out_c, "bias")?.reshape((1, out_c, 1, 1))?,
            stride_t: stride.0,
            stride_s: stride.1,
            pad_t: 2 * padding.0,
            pad_s: padding.1,
        })
    }

    /// A 1x1x1 convolution (shortcuts, `quant_conv`).
    pub fn pointwise(in_c: usize, out_c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::load(in_c, out_c, (1, 1), (1, 1), (0, 0), vb)
    }

    /// `x` `[B, T, C, H, W]`, `cache` frames `[B, n, C, H, W]` that came before it.
    pub fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        let mut pad = self.pad_t;
        if let (Some(c), true) = (cache, pad > 0) {
            x = Tensor::cat(&[c, &x], 1)?;
            pad = pad.saturating_sub(c.dim(1)?);
        }
        if pad > 0 {
            x = x.pad_with_zeros(1, pad, 0)?;
        }
        if self.pad_s > 0 {
            x = x.pad_with_zeros(3, self.pad_s, self.pad_s)?.pad_with_zeros(4, self.pad_s, self.pad_s)?;
        }
        let (b, t_in, c, h, w) = x.dims5()?;
        let kt = self.taps.len();
        if t_in < kt {
            candle_core::bail!("causal conv needs at least {kt} frames, got {t_in}");
        }
        let t_out = (t_in - kt) / self.stride_t + 1;
        let mut acc: Option<Tensor> = None;
        for (i, tap) in self.taps.iter().enumerate() {
            let frames = if self.stride_t == 1 {
                x.narrow(1, i, t_out)?
            } else {
                let idx: Vec<u32> = (0..t_out).map(|j| (i + j * self.stride_t) as u32).collect();
                x.index_select(&Tensor::new(idx, x.device())?, 1)?
            };
            let frames = frames.reshape((b * t_out, c, h, w))?;
            let y = conv2d_in_strips(&frames, tap, self.stride_s, MAX_UNFOLDED)?;
            acc = Some(match acc {
                None => y,
                Some(a) => (a + y)?,
            });
        }
        let y = acc.expect("a kernel has at least one tap").broadcast_add(&self.bias)?;
        let (_, o, ho, wo) = y.dims4()?;
        y.reshape((b, t_out, o, ho, wo))
    }

    /// A 3-frame causal convolution run on one chunk: the slot's frames go in front, then the
    /// slot keeps this chunk's last two input frames (one from the slot if the chunk has one).
    pub fn forward_cached(&self, x: &Tensor, slot: &mut Slot) -> candle_core::Result<Tensor> {
        let mut keep = last_frames(x, CACHE_FRAMES)?;
        let previous = match slot {
            Slot::Frames(prev) => Some(prev.clone()),
            _ => None,
        };
        if keep.dim(1)? < CACHE_FRAMES {
            if let Some(prev) = &previous {
                keep = Tensor::cat(&[&last_frames(prev, 1)?, &keep], 1)?;
            }
        }
        let y = self.forward(x, previous.as_ref())?;
        *slot = Slot::Frames(keep);
        Ok(y)
    }
}

/// The most elements one `conv2d` call may unfold: candle lowers a convolution to a matrix
/// product over an im2col copy of its input, `kh * kw` times the input's size (at 480x832 and 96
/// channels, 1.4 GB per frame in f32). 2^25 elements: 128 MB in f32.
pub(super) const MAX_UNFOLDED: usize = 1 << 25;

/// `conv2d` of `x` `[N, C, H, W]` (already padded) with `w` `[O, C, kh, kw]`, unpadded: on the
/// CPU in f32 by [`crate::kernels::conv2d`], otherwise by candle in strips of
/// output rows so that no call unfolds more than `max_unfolded` elements.
pub(super) fn conv2d_in_strips(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    max_unfolded: usize,
) -> candle_core::Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    if h < kh || wd < kw {
        candle_core::bail!("conv2d: input {h}x{wd} smaller than the {kh}x{kw} kernel");
    }
    // veto's CPU kernel unfolds nothing (f32 on the CPU; None elsewhere).
    if let Some(y) = crate::kernels::conv2d(x, w, None, stride, 0)? {
        return Ok(y);
    }
    let (ho, wo) = ((h - kh) / stride + 1, (wd - kw) / stride + 1);
    let rows = (max_unfolded / (n * wo * c * kh * kw).max(1)).max(1);
    if rows >= ho {
        return x.conv2d(w, 0, stride, 1, 1);
    }
    let mut parts = Vec::with_capacity(ho.div_ceil(rows));
    let mut r0 = 0;
    while r0 < ho {
        let r1 = (r0 + rows).min(ho);
        let (in0, in_len) = (r0 * stride, (r1 - 1 - r0) * stride + kh);
        parts.push(x.narrow(2, in0, in_len)?.contiguous()?.conv2d(w, 0, stride, 1, 1)?);
        r0 = r1;
    }
    Tensor::cat(&parts, 2)
}

/// A 2-D convolution with bias whose input is padded `(top, bottom, left, right)` with zeros
/// first, run in strips (see [`conv2d_in_strips`]).
#[derive(Debug, Clone)]
pub(super) struct StripConv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    pad: (usize, usize, usize, usize),
}

impl StripConv2d {
    pub fn load(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        pad: (usize, usize, usize, usize),
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((out_c, in_c, k, k), "weight")?,
            bias: vb.get(out_c, "bias")?.reshape((1, out_c, 1, 1))?,
            stride,
            pad,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (t, b, l, r) = self.pad;
        let x = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
        conv2d_in_strips(&x, &self.weight, self.stride, MAX_UNFOLDED)?.broadcast_add(&self.bias)
    }
}

/// diffusers' `WanRMS_norm` over the channels of `[.., C, H, W]`-shaped input (dim -3):
/// `x / max(|x|, 1e-12) * sqrt(C) * gamma`, in f32 for half-precision input.
#[derive(Debug, Clone)]
pub(super) struct ChannelRmsNorm {
    /// `gamma * sqrt(C)`, shaped `[C, 1, 1]`.
    scale: Tensor,
}

impl ChannelRmsNorm {
    /// `gamma` is `[C, 1, 1, 1]` for video (`images=False`) or `[C, 1, 1]` for images.
    pub fn load(c: usize, images: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let gamma =
            if images { vb.get((c, 1, 1), "gamma")? } else { vb.get((c, 1, 1, 1), "gamma")?.reshape((c, 1, 1))? };
        Ok(Self { scale: (gamma * (c as f64).sqrt())? })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(candle_core::DType::F32)?;
        let channel_dim = x.rank() - 3;
        let norm = xf.sqr()?.sum_keepdim(channel_dim)?.sqrt()?.maximum(1e-12)?;
        let normed = xf.broadcast_div(&norm)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.scale)
    }
}

/// `x` `[B, T, C, H, W]` as a batch of images `[B*T, C, H, W]`, run through `f`, and back.
pub(super) fn per_frame(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, t, c, h, w) = x.dims5()?;
    let y = f(&x.reshape((b * t, c, h, w))?)?;
    let (_, c2, h2, w2) = y.dims4()?;
    y.reshape((b, t, c2, h2, w2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn strips_match_one_convolution() {
        let dev = Device::Cpu;
        // f32: veto's kernel; f64: candle's convolution in strips.
        for (dtype, stride) in [(DType::F32, 1), (DType::F32, 2), (DType::F64, 1), (DType::F64, 2)] {
            let x = Tensor::randn(0f32, 1f32, (2, 3, 11, 9), &dev).unwrap().to_dtype(dtype).unwrap();
            let w = Tensor::randn(0f32, 1f32, (4, 3, 3, 3), &dev).unwrap().to_dtype(dtype).unwrap();
            let whole = x.conv2d(&w, 0, stride, 1, 1).unwrap();
            // 2 * wo * 27 elements per output row: a limit of 100 forces one row per strip.
            let strips = conv2d_in_strips(&x, &w, stride, 100).unwrap();
            let d = (whole - strips).unwrap().abs().unwrap().max_all().unwrap();
            let d: f32 = d.to_dtype(DType::F32).unwrap().to_scalar().unwrap();
            assert!(d < 1e-4, "{dtype:?} stride {stride}: {d}");
        }
    }
}
