//! diffusers' `SCMScheduler` (SANA-Sprint's TrigFlow consistency sampler). The timesteps are
//! angles from `max_timesteps` (pi/2: pure noise) down to 0; each step predicts the clean sample
//! `x0 = cos(s) x - sin(s) F` and re-noises it to the next angle `t` with fresh noise times
//! `sigma_data`: `cos(t) x0 + sin(t) sigma_data z`. diffusers draws that noise on every step,
//! the last one included (where `sin(0) = 0` leaves `x0`), so a replay needs one draw per step.
//!
//! As a [`Scheduler`]: `timesteps()` are the angles the model runs at (the last, 0, is only the
//! target of the last step), `init_noise_sigma` is `sigma_data` (diffusers' pipeline scales the
//! initial latents by it), the model input is rescaled by the pipeline
//! ([`crate::pipelines::sana_sprint`]), and the last step returns the clean prediction (what
//! diffusers' pipeline decodes). Its `prediction_type` reads `Sample`: `step` consumes the
//! pipeline's TrigFlow velocity, which no other prediction type names.

use candle_core::Tensor;
use serde::Deserialize;

use super::discrete::PredictionType;
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "SCMScheduler";

/// diffusers' defaults of `SanaSprintPipeline.__call__`'s `max_timesteps` and
/// `intermediate_timesteps` (the latter used only with 2 steps).
/// diffusers' literal 1.57080, not pi/2 (the f32 angles must match).
#[allow(clippy::approx_constant)]
pub const MAX_TIMESTEPS: f64 = 1.57080;
pub const INTERMEDIATE_TIMESTEPS: f64 = 1.3;

/// `scheduler_config.json` of an `SCMScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ScmConfig {
    pub num_train_timesteps: usize,
    pub prediction_type: String,
    pub sigma_data: f64,
}

impl Default for ScmConfig {
    fn default() -> Self {
        Self { num_train_timesteps: 1000, prediction_type: "trigflow".into(), sigma_data: 0.5 }
    }
}

#[derive(Debug, Clone)]
pub struct ScmScheduler {
    config: ScmConfig,
    /// `steps + 1` angles, as f32 values (diffusers keeps them in a float32 tensor).
    timesteps: Vec<f64>,
    step_index: usize,
}

impl ScmScheduler {
    pub fn new(config: ScmConfig) -> Result<Self> {
        if config.prediction_type != "trigflow" {
            return Err(super::discrete::bad(format!(
                "{CLASS}: prediction_type \"{}\" is not supported (only \"trigflow\")",
                config.prediction_type
            )));
        }
        if !(config.sigma_data.is_finite() && config.sigma_data > 0.0) {
            return Err(super::discrete::bad(format!("{CLASS}: sigma_data {} must be positive", config.sigma_data)));
        }
        Ok(Self { config, timesteps: Vec::new(), step_index: 0 })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }

    pub fn config(&self) -> &ScmConfig {
        &self.config
    }

    pub fn sigma_data(&self) -> f64 {
        self.config.sigma_data
    }

    /// diffusers' `set_timesteps(steps, max_timesteps=max, intermediate_timesteps=...)`:
    /// `[max, intermediate, 0]` for 2 steps when an intermediate angle is given, otherwise
    /// `linspace(max, 0, steps + 1)`. diffusers refuses an intermediate angle with other step
    /// counts; here it only applies to 2 steps (the pipeline's default carries it always).
    pub fn set_angles(&mut self, steps: usize, max: f64, intermediate: Option<f64>) -> Result<()> {
        if steps == 0 || steps > self.config.num_train_timesteps {
            return Err(Error::invalid(format!(
                "{CLASS}: {steps} steps; it takes 1..={}",
                self.config.num_train_timesteps
            )));
        }
        if !(max.is_finite() && max > 0.0) {
            return Err(Error::invalid(format!("{CLASS}: max_timesteps {max} must be a positive angle")));
        }
        let angles: Vec<f64> = match intermediate.filter(|_| steps == 2) {
            Some(mid) => {
                if !(mid > 0.0 && mid < max) {
                    return Err(Error::invalid(format!(
                        "{CLASS}: intermediate_timesteps {mid} must lie between 0 and max_timesteps {max}"
                    )));
                }
                vec![max, mid, 0.0]
            }
            None => linspace_f32(max, steps),
        };
        self.timesteps = angles.into_iter().map(|a| f64::from(a as f32)).collect();
        self.step_index = 0;
        Ok(())
    }

    /// Custom angles (`steps + 1` of them, decreasing, as diffusers' `timesteps`).
    pub fn set_custom_angles(&mut self, angles: &[f64]) -> Result<()> {
        if angles.len() < 2 || angles.windows(2).any(|w| w[1] >= w[0]) || angles.iter().any(|a| !a.is_finite()) {
            return Err(Error::invalid(format!(
                "{CLASS}: custom timesteps must be at least 2 finite, strictly decreasing angles, got {angles:?}"
            )));
        }
        self.timesteps = angles.iter().map(|&a| f64::from(a as f32)).collect();
        self.step_index = 0;
        Ok(())
    }

    /// All `steps + 1` angles; the model runs at all but the last.
    pub fn angles(&self) -> &[f64] {
        &self.timesteps
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len().saturating_sub(1)
    }

    /// One step: `(prev_sample, pred_x0)`, both f32. Draws one standard normal tensor.
    pub fn step_with_x0(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor, Tensor)> {
        let n = self.num_steps();
        check_step_inputs(CLASS, model_output, sample, self.step_index, n)?;
        let s = self.timesteps[self.step_index] as f32;
        let t = self.timesteps[self.step_index + 1] as f32;
        let x0 = lincomb(&[(f64::from(s.cos()), sample), (-f64::from(s.sin()), model_output)])?;
        let z = noise.sample(model_output.dims(), model_output.device())?;
        let z = (z.to_dtype(candle_core::DType::F32)? * self.config.sigma_data)?;
        let prev = lincomb(&[(f64::from(t.cos()), &x0), (f64::from(t.sin()), &z)])?;
        self.step_index += 1;
        Ok((prev, x0))
    }
}

impl Scheduler for ScmScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }
    fn prediction_type(&self) -> PredictionType {
        PredictionType::Sample
    }
    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// diffusers' pipeline defaults: max 1.5708, the intermediate 1.3 with 2 steps.
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.set_angles(steps, MAX_TIMESTEPS, Some(INTERMEDIATE_TIMESTEPS))
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        self.set_custom_angles(timesteps)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps[..self.num_steps()]
    }
    fn init_noise_sigma(&self) -> f64 {
        self.config.sigma_data
    }
    fn step_index(&self) -> usize {
        self.step_index
    }
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        Ok(sample.clone())
    }
    fn noise_steps(&self) -> Vec<usize> {
        (0..self.num_steps()).collect()
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let (prev, x0) = self.step_with_x0(model_output, sample, noise)?;
        Ok(if self.step_index == self.num_steps() { x0 } else { prev })
    }

    /// The SCM timestep (`sin t / (cos t + sin t)`, 1 at pure noise) on the 0..1000 scale.
    fn window_time(&self, i: usize) -> f64 {
        let t = self.timesteps[i];
        t.sin() / (t.cos() + t.sin()) * self.config.num_train_timesteps as f64
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
}

/// `torch.linspace(max, 0, steps + 1)` in float32: the first half from the start, the second
/// from the end, as torch computes it.
fn linspace_f32(max: f64, steps: usize) -> Vec<f64> {
    let (start, end) = (max as f32, 0f32);
    let step = (end - start) / steps as f32;
    let half = steps.div_ceil(2);
    (0..=steps)
        .map(|i| {
            let v = if i < half { start + step * i as f32 } else { end - step * (steps - i) as f32 };
            f64::from(v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // 1.5708 is diffusers' literal maximum angle, not pi/2 (the f32 angles must equal its).
    #[allow(clippy::approx_constant)]
    #[test]
    fn schedules_follow_diffusers_rules() {
        let mut s = ScmScheduler::from_value(serde_json::json!({})).unwrap();
        s.set_timesteps(2).unwrap();
        assert_eq!(s.angles(), &[f64::from(1.5708f32), f64::from(1.3f32), 0.0]);
        assert_eq!(s.timesteps().len(), 2);
        s.set_timesteps(1).unwrap();
        assert_eq!(s.angles(), &[f64::from(1.5708f32), 0.0]);
        s.set_angles(4, MAX_TIMESTEPS, None).unwrap();
        assert_eq!(s.num_steps(), 4);
        assert!((s.angles()[2] - 0.7854).abs() < 1e-6);
        assert_eq!(s.noise_steps(), [0, 1, 2, 3]);
        assert!(s.set_angles(0, MAX_TIMESTEPS, None).is_err());
        assert!(s.set_angles(2, MAX_TIMESTEPS, Some(2.0)).is_err());
        assert!(s.set_custom_timesteps(&[1.0, 1.2]).is_err());
        assert!(ScmScheduler::from_value(serde_json::json!({"prediction_type": "epsilon"})).is_err());
    }
}
