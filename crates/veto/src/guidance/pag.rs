//! Perturbed-attention guidance in output space (diffusers' PAG pipelines): the prediction is
//! pushed away from a pass whose chosen self-attention layers were replaced by the identity.

use candle_core::{Result, Tensor};

/// `eps + scale (cond - perturbed)`, where `eps` is the prediction so far (CFG already applied).
pub fn pag(eps: &Tensor, cond: &Tensor, perturbed: &Tensor, scale: f64) -> Result<Tensor> {
    eps + ((cond - perturbed)? * scale)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pushes_away_from_the_perturbed_pass() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let out = pag(&t(&[1.0, 1.0]), &t(&[2.0, 0.0]), &t(&[1.5, 1.0]), 2.0).unwrap();
        assert_eq!(out.to_vec1::<f32>().unwrap(), vec![2.0, -1.0]);
    }
}
