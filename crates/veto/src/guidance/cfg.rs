//! Classifier-free guidance with a negative prompt, in output space (NAG paper eq. 3).
//!
//! Written as diffusers writes it, `neg + c (pos - neg)`, where `c` is the pipeline's scale
//! (Flux: `true_cfg_scale`; eq. 3's phi is c - 1).

use candle_core::{Result, Tensor};

/// `neg + scale (pos - neg)`.
pub fn cfg(pos: &Tensor, neg: &Tensor, scale: f64) -> Result<Tensor> {
    neg + ((pos - neg)? * scale)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn extrapolates_away_from_negative() {
        let pos = Tensor::new(&[1f32, 3.0], &Device::Cpu).unwrap();
        let neg = Tensor::new(&[0f32, 4.0], &Device::Cpu).unwrap();
        let out = cfg(&pos, &neg, 2.0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(out, vec![2.0, 2.0]);
        let same = cfg(&pos, &neg, 1.0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(same, vec![1.0, 3.0]);
    }
}
