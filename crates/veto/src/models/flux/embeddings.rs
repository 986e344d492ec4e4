//! Flux's 3-axis rotary position embedding. The timestep/text conditioning vector is shared
//! with the MMDiT: [`crate::models::layers::TimeTextEmbed`].

use candle_core::{DType, Result, Tensor};

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

    /// Rotate `x` `[B, H, S, D]` (any strides): pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos +
    /// x0 sin); contiguous out. One parallel pass on the CPU in f32.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::kernels::rotate_pairs(x, &self.cos, &self.sin)? {
            return Ok(y);
        }
        let x = x.contiguous()?;
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
