//! Seeded Gaussian noise, identical on every device (generated on the host, then moved), and
//! [`StepNoise`], the noise of a run's stochastic sampler. The seeded noise does not reproduce
//! torch's generator: compare with other implementations through `--init-latents` (initial
//! latents and `step_noise`) instead.

use candle_core::{Device, Result, Tensor};

use super::{ResolvedRequest, Warnings};
use crate::schedulers::scheduler::{FixedNoise, NoiseSource, RecordingNoise, SeededNoise};
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

/// The noise a run's stochastic sampler adds between steps: the request's `step_noise` replayed
/// in order, else drawn from its seed ([`SeededNoise`]). Every draw is recorded, so the run can
/// be saved and replayed ([`StepNoise::finish`]).
pub struct StepNoise {
    source: RecordingNoise<Box<dyn NoiseSource>>,
    given: Option<usize>,
}

impl StepNoise {
    /// The noise source of `req`.
    pub fn new(req: &ResolvedRequest) -> crate::Result<Self> {
        let (inner, given): (Box<dyn NoiseSource>, _) = match &req.step_noise {
            Some(t) => (Box::new(FixedNoise::from_stacked(t)?), Some(t.dims().first().copied().unwrap_or(0))),
            None => (Box::new(SeededNoise::new(req.seed)), None),
        };
        Ok(Self { source: RecordingNoise::new(inner), given })
    }

    /// The noise used, stacked `[N, 1, C, H/f, W/f]` (`None` when the sampler drew none). Given
    /// noise that the sampler (`sampler` names it) left unused is a warning; given noise used
    /// only in part (the request was not checked against the sampler) an error.
    pub fn finish(self, sampler: &str, warnings: &mut Warnings) -> crate::Result<Option<Tensor>> {
        let drawn = self.source.into_drawn();
        match self.given {
            Some(_) if drawn.is_empty() => {
                warnings.push(format!("step_noise is unused: {sampler} adds no noise between steps"));
                return Ok(None);
            }
            Some(n) if n != drawn.len() => {
                return Err(crate::Error::parameter(
                    "step_noise",
                    format!("{n} noise tensors were given, {sampler} drew {}", drawn.len()),
                ))
            }
            _ => {}
        }
        if drawn.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::stack(&drawn, 0)?))
    }
}

impl NoiseSource for StepNoise {
    fn sample(&mut self, shape: &[usize], device: &Device) -> crate::Result<Tensor> {
        self.source.sample(shape, device)
    }
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
