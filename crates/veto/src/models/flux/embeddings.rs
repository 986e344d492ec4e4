//! Flux's conditioning embeddings: sinusoidal timestep/guidance features, the combined
//! time + guidance + pooled-text vector, and the 3-axis rotary position embedding.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

/// Sinusoidal features of `t` ([B], already on the 0..1000 scale), 256 channels with cos first
/// (diffusers `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`). Computed in f32
/// in the same order as diffusers: with guidance x1000 the arguments reach ~3500, so the
/// frequencies must round exactly like theirs to stay within 1e-4.
pub fn timestep_features(t: &Tensor, channels: usize) -> Result<Tensor> {
    let half = channels / 2;
    let neg_ln = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((neg_ln * i as f32) / half as f32).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// `linear_1 -> SiLU -> linear_2` (diffusers `TimestepEmbedding`, `PixArtAlphaTextProjection`).
pub struct MlpEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl MlpEmbedder {
    pub fn new(in_dim: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_dim, dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for MlpEmbedder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// `time_text_embed`: timestep (+ guidance) + pooled text -> the conditioning vector `temb`.
pub struct TimeTextEmbed {
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
}

impl TimeTextEmbed {
    pub fn new(dim: usize, pooled_dim: usize, guidance: bool, vb: VarBuilder) -> Result<Self> {
        let guidance_embedder =
            if guidance { Some(MlpEmbedder::new(256, dim, vb.pp("guidance_embedder"))?) } else { None };
        Ok(Self {
            timestep_embedder: MlpEmbedder::new(256, dim, vb.pp("timestep_embedder"))?,
            guidance_embedder,
            text_embedder: MlpEmbedder::new(pooled_dim, dim, vb.pp("text_embedder"))?,
        })
    }

    pub fn has_guidance(&self) -> bool {
        self.guidance_embedder.is_some()
    }

    /// `t` and `guidance` on the 0..1000 scale, `[B]`; `pooled` `[B, pooled_dim]`.
    pub fn forward(&self, t: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Result<Tensor> {
        let dtype = pooled.dtype();
        let mut emb = self.timestep_embedder.forward(&timestep_features(t, 256)?.to_dtype(dtype)?)?;
        if let (Some(embedder), Some(g)) = (&self.guidance_embedder, guidance) {
            emb = (emb + embedder.forward(&timestep_features(g, 256)?.to_dtype(dtype)?)?)?;
        }
        emb + self.text_embedder.forward(pooled)?
    }
}

/// Rotary tables for a sequence of 3-axis positions: `cos`, `sin` `[S, head_dim]`, each
/// frequency repeated for the (real, imaginary) pair it rotates.
#[derive(Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// `ids` `[S, n_axes]` positions; `axes_dim` the head-dim share of each axis. The angles are
    /// computed in f64 and rounded once, as diffusers does on CPU.
    pub fn new(ids: &Tensor, axes_dim: &[usize], theta: f64, dtype: DType) -> Result<Self> {
        let (s, n_axes) = ids.dims2()?;
        let device = ids.device().clone();
        if n_axes != axes_dim.len() {
            candle_core::bail!("position ids have {n_axes} axes, the model has {}", axes_dim.len());
        }
        let ids = ids.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let head_dim: usize = axes_dim.iter().sum();
        let mut cos = Vec::with_capacity(s * head_dim);
        let mut sin = Vec::with_capacity(s * head_dim);
        for row in &ids {
            for (axis, &dim) in axes_dim.iter().enumerate() {
                for i in 0..dim / 2 {
                    let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
                    let angle = row[axis] * freq;
                    let (sn, cs) = angle.sin_cos();
                    cos.extend([cs as f32, cs as f32]);
                    sin.extend([sn as f32, sn as f32]);
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (s, head_dim), &device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (s, head_dim), &device)?.to_dtype(dtype)?,
        })
    }

    /// Rows `start..start+len` (e.g. the text part or the image part of the joint sequence).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self { cos: self.cos.narrow(0, start, len)?, sin: self.sin.narrow(0, start, len)? })
    }

    /// Rotate `x` `[B, H, S, D]`: pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, s, d) = x.dims4()?;
        let pairs = x.reshape((b, h, s, d / 2, 2))?;
        let x0 = pairs.narrow(4, 0, 1)?;
        let x1 = pairs.narrow(4, 1, 1)?;
        let rotated = Tensor::cat(&[&x1.neg()?, &x0], 4)?.reshape((b, h, s, d))?;
        x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timestep_features_cos_first() {
        let t = Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap();
        let f = timestep_features(&t, 4).unwrap().to_vec2::<f32>().unwrap();
        // t = 0: cos = 1, sin = 0. t = 1: freqs [1, 0.01].
        assert_eq!(f[0], vec![1.0, 1.0, 0.0, 0.0]);
        assert!((f[1][0] - 1f32.cos()).abs() < 1e-6 && (f[1][2] - 1f32.sin()).abs() < 1e-6);
        assert!((f[1][1] - 0.01f32.cos()).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        // One axis of dim 2, theta irrelevant for i = 0 (freq 1): angle = position.
        let ids = Tensor::new(&[[0f32], [1.0]], &Device::Cpu).unwrap();
        let rope = Rope::new(&ids, &[2], 10000.0, DType::F32).unwrap();
        let x = Tensor::new(&[1f32, 0.0, 1.0, 0.0], &Device::Cpu).unwrap().reshape((1, 1, 2, 2)).unwrap();
        let y = rope.apply(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&y[..2], &[1.0, 0.0]);
        assert!((y[2] - 1f32.cos()).abs() < 1e-6 && (y[3] - 1f32.sin()).abs() < 1e-6);
    }
}
