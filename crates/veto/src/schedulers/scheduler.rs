//! The [`Scheduler`] interface every sampler implements, the noise sources of the stochastic
//! ones, and helpers the concrete schedulers share. This file names no concrete scheduler: the
//! factory that does lives in [`crate::schedulers`].
//!
//! A scheduler is a small state machine used as diffusers' pipelines use theirs:
//! `set_timesteps(n)`, then per step `scale_model_input(x)` -> model -> `step(out, x)`.
//! Stochastic samplers (LCM, TCD and DDIM with eta > 0, DPM-Solver++ SDE) draw their noise from a caller-provided
//! [`NoiseSource`], so runs are reproducible and tests can replay the reference noise.

use std::collections::VecDeque;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::discrete::PredictionType;
use crate::error::{Error, Result};

/// Where stochastic schedulers take their Gaussian noise from.
pub trait NoiseSource {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Seeded standard normal noise: draw `k` uses a seed derived from `(seed, k)`, so it never
/// repeats the initial latents drawn with `seed` itself.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    seed: u64,
    draws: u64,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self { seed, draws: 0 }
    }
}

impl NoiseSource for SeededNoise {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.draws += 1;
        let derived = self.seed ^ self.draws.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Ok(crate::pipelines::noise::gaussian(shape, derived, device)?)
    }
}

/// Replays given tensors in order (reference noise in tests); an error when they run out.
#[derive(Debug, Clone, Default)]
pub struct FixedNoise {
    queue: VecDeque<Tensor>,
}

impl FixedNoise {
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Self { queue: tensors.into_iter().collect() }
    }

    /// Replays the rows of `stacked` (`[N, ...]`: draw `k` is `stacked[k]`).
    pub fn from_stacked(stacked: &Tensor) -> Result<Self> {
        let n = stacked.dims().first().copied().unwrap_or(0);
        Ok(Self::new((0..n).map(|k| stacked.get(k)).collect::<candle_core::Result<Vec<_>>>()?))
    }
}

impl NoiseSource for FixedNoise {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self
            .queue
            .pop_front()
            .ok_or_else(|| Error::invalid("the scheduler asked for more noise tensors than were given"))?;
        if t.dims() != shape {
            return Err(Error::invalid(format!("given noise has shape {:?}, the scheduler needs {shape:?}", t.dims())));
        }
        Ok(t.to_device(device)?)
    }
}

/// Passes draws through from an inner source and keeps a copy of each, in order (the step noise
/// a run used, to save and replay it).
#[derive(Debug, Clone)]
pub struct RecordingNoise<N> {
    inner: N,
    drawn: Vec<Tensor>,
}

impl<N: NoiseSource> RecordingNoise<N> {
    pub fn new(inner: N) -> Self {
        Self { inner, drawn: Vec::new() }
    }

    /// The tensors drawn so far, in order.
    pub fn drawn(&self) -> &[Tensor] {
        &self.drawn
    }

    pub fn into_drawn(self) -> Vec<Tensor> {
        self.drawn
    }
}

impl<N: NoiseSource> NoiseSource for RecordingNoise<N> {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.inner.sample(shape, device)?;
        self.drawn.push(t.clone());
        Ok(t)
    }
}

impl NoiseSource for Box<dyn NoiseSource> {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.as_mut().sample(shape, device)
    }
}

/// For deterministic schedulers: any request for noise is an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNoise;

impl NoiseSource for NoNoise {
    fn sample(&mut self, _shape: &[usize], _device: &Device) -> Result<Tensor> {
        Err(Error::invalid("this scheduler step needs noise but none was provided"))
    }
}

/// A sampler (diffusers semantics, one instance per generation: it keeps state). `Sync` so
/// pipelines holding a loaded scheduler to clone per generation can be shared across threads.
pub trait Scheduler: Send + Sync {
    /// diffusers' class name (`EulerDiscreteScheduler`, ...).
    fn class_name(&self) -> &'static str;
    fn prediction_type(&self) -> PredictionType;
    /// The training timesteps (1000 for every SD model).
    fn num_train_timesteps(&self) -> usize;
    /// The number of latent tokens (patches) of the image, for schedules that shift with the
    /// resolution (flow matching with dynamic shifting); call before `set_timesteps`. Others
    /// ignore it.
    fn set_image_seq_len(&mut self, len: usize) {
        let _ = len;
    }
    /// Prepare `steps` steps; resets the state.
    fn set_timesteps(&mut self, steps: usize) -> Result<()>;
    /// Use explicit timesteps instead (DMD2: `[999, 749, 499, 249]` with LCM); resets the state.
    /// Schedulers without that option in diffusers return an error.
    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        let _ = timesteps;
        Err(Error::invalid(format!("{} does not take custom timesteps", self.class_name())))
    }
    /// The `eta` step argument of DDIM and TCD (diffusers pipelines pass it to every scheduler
    /// whose `step` takes one, and default it to 0.0); other schedulers ignore it.
    /// Whether `set_eta` means anything to this scheduler (DDIM, TCD).
    fn takes_eta(&self) -> bool {
        false
    }
    fn set_eta(&mut self, eta: f64) -> Result<()> {
        let _ = eta;
        Ok(())
    }
    /// The timesteps the model is called with, one per step (EDM: `0.25 ln sigma`).
    fn timesteps(&self) -> &[f64];
    /// Noise levels, for sigma-based samplers: step `i` goes from `sigmas[i]` to `sigmas[i + 1]`;
    /// `steps + 1` long (the last is the final one; Euler's log-linear interpolation has one more,
    /// as in diffusers).
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
    /// Standard deviation of the initial noise (multiplies unit Gaussian latents).
    fn init_noise_sigma(&self) -> f64;
    /// The index of the next step.
    fn step_index(&self) -> usize;
    /// The model input at the current step (identity for most samplers).
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor>;
    /// The steps whose [`step`](Self::step) draws one noise tensor (of the sample's shape) from
    /// the [`NoiseSource`], in order, for the timesteps and eta set: exactly the steps at which
    /// diffusers' scheduler calls its generator. Empty for deterministic samplers.
    fn noise_steps(&self) -> Vec<usize> {
        Vec::new()
    }
    /// One step from `sample` with the model's output; advances the step index.
    fn step(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor>;
    /// Step `i`'s position on the 0..=`num_train_timesteps` scale, for the guidance window
    /// (the timestep itself for discrete samplers).
    fn window_time(&self, i: usize) -> f64 {
        self.timesteps()[i]
    }
    /// A fresh copy with the same config.
    fn clone_box(&self) -> Box<dyn Scheduler>;
}

impl Clone for Box<dyn Scheduler> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// diffusers' `save_config` writes Python's `Infinity`, `-Infinity` and `NaN` (e.g.
/// `"lambda_min_clipped": -Infinity`), which are not JSON: turn them into strings, outside
/// string literals, for [`non_finite_f64`] to read.
pub(crate) fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A float config value that may be `"Infinity"`, `"-Infinity"` or `"NaN"` (see
/// [`quote_non_finite`]).
pub(crate) fn non_finite_f64<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Num {
        N(f64),
        S(String),
    }
    match Num::deserialize(d)? {
        Num::N(x) => Ok(x),
        Num::S(s) => match s.as_str() {
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            other => Err(serde::de::Error::custom(format!("expected a number, got \"{other}\""))),
        },
    }
}

/// Deserialize a config value, naming the scheduler class in errors.
pub(crate) fn parse_config<T: serde::de::DeserializeOwned>(json: serde_json::Value, class: &str) -> Result<T> {
    serde_json::from_value(json).map_err(|e| super::discrete::bad(format!("{class}: {e}")))
}

/// `sum_i c_i x_i` in f32 (diffusers steps in float32), each term cast to f32 first.
pub(crate) fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(c, x) in terms {
        let term = x.to_dtype(DType::F32)?.affine(c, 0.0)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    acc.ok_or_else(|| Error::other("empty linear combination"))
}

/// Check the model output against the sample before a step.
pub(crate) fn check_step_inputs(
    class: &str,
    model_output: &Tensor,
    sample: &Tensor,
    index: usize,
    steps: usize,
) -> Result<()> {
    if steps == 0 {
        return Err(Error::invalid(format!("{class}: call set_timesteps before step")));
    }
    if index >= steps {
        return Err(Error::invalid(format!("{class}: all {steps} steps are done")));
    }
    if model_output.dims() != sample.dims() {
        return Err(Error::invalid(format!(
            "{class}: model output shape {:?} differs from sample shape {:?}",
            model_output.dims(),
            sample.dims()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_reproducible_and_fresh() {
        let dev = Device::Cpu;
        let mut a = SeededNoise::new(3);
        let mut b = SeededNoise::new(3);
        let x: Vec<f32> = a.sample(&[8], &dev).unwrap().to_vec1().unwrap();
        assert_eq!(x, b.sample(&[8], &dev).unwrap().to_vec1::<f32>().unwrap());
        assert_ne!(x, a.sample(&[8], &dev).unwrap().to_vec1::<f32>().unwrap());
        let init: Vec<f32> = crate::pipelines::noise::gaussian(&[8], 3, &dev).unwrap().to_vec1().unwrap();
        assert_ne!(x, init);
    }
}
