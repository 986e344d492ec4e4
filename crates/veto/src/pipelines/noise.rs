//! Seeded Gaussian noise, identical on every device (generated on the host, then moved).
//! It does not reproduce torch's generator: compare with other implementations through
//! `--init-latents` instead.

use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};

/// Standard normal samples of `shape`, from `seed` (Box-Muller over a seeded ChaCha stream).
pub fn gaussian(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // u1 in (0, 1] so ln(u1) is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    Tensor::from_vec(out, shape, &Device::Cpu)?.to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_roughly_standard() {
        let a = gaussian(&[4096], 7, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let b = gaussian(&[4096], 7, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        let c = gaussian(&[4096], 8, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.08, "{mean} {var}");
    }
}
