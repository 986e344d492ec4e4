//! diffusers' `DDIMScheduler`: `x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps
//! (+ std z)`, with `std = eta sqrt(variance)` (eta = 0, the pipelines' default, is the
//! deterministic DDIM; noise comes from the [`NoiseSource`] otherwise).

use candle_core::Tensor;
use serde::Deserialize;

use super::discrete::{
    check_steps, reject_if, round_half_even, spaced_timesteps, BetaConfig, BetaSchedule, PredictionType,
    TimestepSpacing,
};
use super::lcm::{predict_eps, predict_x0};
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "DDIMScheduler";

/// `scheduler_config.json` of a `DDIMScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    step_index: usize,
    eta: f64,
}

impl DdimScheduler {
    pub fn new(config: DdimConfig) -> Result<Self> {
        reject_if(config.thresholding, "thresholding", CLASS)?;
        let alphas_cumprod = BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.clone(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        }
        .alphas_cumprod(false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Self { config, alphas_cumprod, final_alpha_cumprod, timesteps: Vec::new(), step_index: 0, eta: 0.0 })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }
}

impl Scheduler for DdimScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }
    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }
    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let c = &self.config;
        check_steps(steps, c.num_train_timesteps, CLASS)?;
        // DDIM rounds the linspace spacing to integers (Euler keeps it fractional).
        self.timesteps = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, steps, c.steps_offset)
            .into_iter()
            .map(round_half_even)
            .collect();
        if let Some(t) = self.timesteps.iter().find(|&&t| t >= c.num_train_timesteps as f64) {
            return Err(Error::invalid(format!(
                "{CLASS}: timestep {t} (steps_offset {}) is past the {} training timesteps",
                c.steps_offset, c.num_train_timesteps
            )));
        }
        self.step_index = 0;
        Ok(())
    }

    fn takes_eta(&self) -> bool {
        true
    }

    fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(Error::invalid(format!("{CLASS}: eta must be >= 0, got {eta}")));
        }
        self.eta = eta;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn step_index(&self) -> usize {
        self.step_index
    }
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// With eta > 0, every step draws, the last included (diffusers draws even where the
    /// variance is 0, e.g. the last step of a trailing schedule).
    fn noise_steps(&self) -> Vec<usize> {
        if self.eta > 0.0 {
            (0..self.timesteps.len()).collect()
        } else {
            Vec::new()
        }
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let n = self.timesteps.len();
        check_step_inputs(CLASS, model_output, sample, self.step_index, n)?;
        let t = self.timesteps[self.step_index] as i64;
        // diffusers steps back by T // n whatever the spacing.
        let prev_t = t - (self.config.num_train_timesteps / n) as i64;
        let alpha_t = self.alphas_cumprod[t as usize] as f32;
        let alpha_prev =
            if prev_t >= 0 { self.alphas_cumprod[prev_t as usize] } else { self.final_alpha_cumprod } as f32;
        let mut x0 = predict_x0(self.config.prediction_type, alpha_t as f64, model_output, sample)?;
        let eps = predict_eps(self.config.prediction_type, alpha_t as f64, model_output, sample, &x0)?;
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let variance = ((1.0 - alpha_prev) / (1.0 - alpha_t)) * (1.0 - alpha_t / alpha_prev);
        let std = self.eta as f32 * variance.sqrt();
        let dir = f64::from((1.0 - alpha_prev - std * std).sqrt());
        let mut prev = lincomb(&[(f64::from(alpha_prev.sqrt()), &x0), (dir, &eps)])?;
        if self.eta > 0.0 {
            let z = noise.sample(model_output.dims(), model_output.device())?;
            prev = (prev + lincomb(&[(f64::from(std), &z)])?)?;
        }
        self.step_index += 1;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_are_integers() {
        let mut s = DdimScheduler::from_value(serde_json::json!({"timestep_spacing": "linspace"})).unwrap();
        s.set_timesteps(3).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 500.0, 0.0]);
        let mut s = DdimScheduler::from_value(serde_json::json!({"steps_offset": 1})).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    }
}
