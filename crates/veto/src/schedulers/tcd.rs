//! diffusers' `TCDScheduler` (trajectory consistency distillation; Hyper-SDXL, TCD-SDXL).
//! Timesteps follow LCM's rule. A step predicts `x0` and `eps`, jumps to the intermediate
//! timestep `s = floor((1 - eta) t_prev)` and, when `eta > 0` (diffusers calls it gamma too),
//! re-noises from `s` to `t_prev` with noise from the [`NoiseSource`] (not after the last step).
//!
//! `eta` is a step argument in diffusers, passed by the pipelines (their default is 0.0; the
//! scheduler's own default is 0.3). Set it with [`Scheduler::set_eta`].

use candle_core::Tensor;
use serde::Deserialize;

use super::discrete::{check_custom_timesteps, reject_if, BetaConfig, BetaSchedule, PredictionType, TimestepSpacing};
use super::lcm::{consistency_timesteps, predict_eps, predict_x0};
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "TCDScheduler";

/// `scheduler_config.json` of a `TCDScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct TcdConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub original_inference_steps: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub timestep_spacing: TimestepSpacing,
    pub timestep_scaling: f64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for TcdConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            timestep_spacing: TimestepSpacing::Leading,
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TcdScheduler {
    config: TcdConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    step_index: usize,
    eta: f64,
}

/// diffusers' `TCDScheduler.step` default `eta`.
pub const TCD_DEFAULT_ETA: f64 = 0.3;

impl TcdScheduler {
    pub fn new(config: TcdConfig) -> Result<Self> {
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
        Ok(Self { config, alphas_cumprod, timesteps: Vec::new(), step_index: 0, eta: TCD_DEFAULT_ETA })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }

    pub fn config(&self) -> &TcdConfig {
        &self.config
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }
}

impl Scheduler for TcdScheduler {
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
        let ts =
            consistency_timesteps(self.config.num_train_timesteps, self.config.original_inference_steps, steps, CLASS)?;
        self.timesteps = ts.into_iter().map(|t| t as f64).collect();
        self.step_index = 0;
        Ok(())
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        check_custom_timesteps(timesteps, self.config.num_train_timesteps, CLASS)?;
        self.timesteps = timesteps.to_vec();
        self.step_index = 0;
        Ok(())
    }

    fn takes_eta(&self) -> bool {
        true
    }

    fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::invalid(format!("{CLASS}: eta (gamma) must be in [0, 1], got {eta}")));
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

    /// With eta > 0, every step but the last re-noises.
    fn noise_steps(&self) -> Vec<usize> {
        if self.eta > 0.0 {
            (0..self.timesteps.len().saturating_sub(1)).collect()
        } else {
            Vec::new()
        }
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let n = self.timesteps.len();
        check_step_inputs(CLASS, model_output, sample, self.step_index, n)?;
        let t = self.timesteps[self.step_index];
        let last = self.step_index + 1 == n;
        let prev_t = if last { 0.0 } else { self.timesteps[self.step_index + 1] };
        // torch: floor((1 - eta) * prev_t) on a float32 tensor, then long.
        let s = ((1.0 - self.eta) as f32 * prev_t as f32).floor() as usize;
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = self.alphas_cumprod[prev_t as usize];
        let alpha_s = self.alphas_cumprod[s];
        // diffusers' TCD reads `clip_sample` but never applies it; neither do we.
        let x0 = predict_x0(self.config.prediction_type, alpha_t, model_output, sample)?;
        let eps = predict_eps(self.config.prediction_type, alpha_t, model_output, sample, &x0)?;
        let a_s = alpha_s as f32;
        let noised = lincomb(&[(f64::from(a_s.sqrt()), &x0), (f64::from((1.0 - a_s).sqrt()), &eps)])?;
        let prev = if self.eta > 0.0 && !last {
            let z = noise.sample(model_output.dims(), model_output.device())?;
            let ratio = alpha_prev as f32 / a_s;
            lincomb(&[(f64::from(ratio.sqrt()), &noised), (f64::from((1.0 - ratio).sqrt()), &z)])?
        } else {
            noised
        };
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
    use crate::schedulers::scheduler::FixedNoise;
    use candle_core::{Device, Tensor};

    #[test]
    fn eta_zero_is_deterministic_and_eta_one_uses_noise() {
        let mut s = TcdScheduler::from_value(serde_json::json!({})).unwrap();
        s.set_timesteps(2).unwrap();
        s.set_eta(0.0).unwrap();
        let x = Tensor::ones((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut none = crate::schedulers::scheduler::NoNoise;
        s.step(&x, &x, &mut none).unwrap();
        s.set_timesteps(2).unwrap();
        s.set_eta(1.0).unwrap();
        assert!(s.step(&x, &x, &mut none).is_err());
        let mut fixed = FixedNoise::new([x.zeros_like().unwrap()]);
        s.set_timesteps(2).unwrap();
        s.step(&x, &x, &mut fixed).unwrap();
        assert!(s.set_eta(1.5).is_err());
    }
}
