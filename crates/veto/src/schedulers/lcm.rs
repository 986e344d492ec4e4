//! diffusers' `LCMScheduler` (latent consistency models; DMD2 runs it with the timesteps
//! `[999, 749, 499, 249]`). Each step predicts the clean sample, applies the consistency
//! boundary condition (`c_skip x + c_out x0`) and, except after the last step, re-noises it to
//! the next timestep with fresh noise from the [`NoiseSource`].

use candle_core::Tensor;
use serde::Deserialize;

use super::discrete::{check_custom_timesteps, reject_if, BetaConfig, BetaSchedule, PredictionType, TimestepSpacing};
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "LCMScheduler";

/// `scheduler_config.json` of an `LCMScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct LcmConfig {
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
    /// Read for completeness: diffusers' LCM ignores it (its own rule picks the timesteps).
    pub timestep_spacing: TimestepSpacing,
    pub timestep_scaling: f64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for LcmConfig {
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

/// The timestep rule LCM and TCD share: the `original_inference_steps` "skipping" schedule
/// `k - 1, 2k - 1, ..., T - 1` (k = T / original), reversed, and `steps` of it picked at
/// `floor(linspace(0, len, steps, endpoint=False))`.
pub(crate) fn consistency_timesteps(
    num_train: usize,
    original: usize,
    steps: usize,
    class: &str,
) -> Result<Vec<usize>> {
    if steps == 0 {
        return Err(Error::invalid(format!("{class}: the number of steps must be at least 1")));
    }
    if original == 0 || original > num_train {
        return Err(super::discrete::bad(format!(
            "{class}: original_inference_steps {original} must be in 1..={num_train}"
        )));
    }
    if steps > original {
        return Err(Error::invalid(format!(
            "{class}: {steps} steps exceed original_inference_steps {original}, of which the schedule is a subset"
        )));
    }
    let k = num_train / original;
    let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
    let len = origin.len();
    Ok((0..steps)
        .map(|i| {
            let idx = (i as f64 * len as f64 / steps as f64).floor() as usize;
            origin[idx]
        })
        .collect())
}

#[derive(Debug, Clone)]
pub struct LcmScheduler {
    config: LcmConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    step_index: usize,
}

impl LcmScheduler {
    pub fn new(config: LcmConfig) -> Result<Self> {
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
        // `set_alpha_to_one` is never used: LCM's previous timestep is never negative.
        Ok(Self { config, alphas_cumprod, timesteps: Vec::new(), step_index: 0 })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }

    pub fn config(&self) -> &LcmConfig {
        &self.config
    }

    /// `c_skip`, `c_out` of the consistency boundary condition (sigma_data 0.5, times scaled
    /// by `timestep_scaling`).
    fn boundary(&self, t: f64) -> (f64, f64) {
        let sigma_data = 0.5f64;
        let st = t * self.config.timestep_scaling;
        let c_skip = sigma_data * sigma_data / (st * st + sigma_data * sigma_data);
        let c_out = st / (st * st + sigma_data * sigma_data).sqrt();
        (c_skip, c_out)
    }
}

/// The clean-sample prediction of discrete samplers (DDIM, LCM, TCD), in f32.
pub(crate) fn predict_x0(
    prediction: PredictionType,
    alpha_prod_t: f64,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<Tensor> {
    let a = alpha_prod_t as f32;
    let (sa, sb) = (f64::from(a.sqrt()), f64::from((1.0 - a).sqrt()));
    match prediction {
        PredictionType::Epsilon => Ok((lincomb(&[(1.0, sample), (-sb, model_output)])? / sa)?),
        PredictionType::VPrediction => lincomb(&[(sa, sample), (-sb, model_output)]),
        PredictionType::Sample => lincomb(&[(1.0, model_output)]),
        PredictionType::Flow => Err(super::discrete::flow_unsupported("the DDIM / LCM / TCD step")),
    }
}

/// The noise prediction matching [`predict_x0`].
pub(crate) fn predict_eps(
    prediction: PredictionType,
    alpha_prod_t: f64,
    model_output: &Tensor,
    sample: &Tensor,
    x0: &Tensor,
) -> Result<Tensor> {
    let a = alpha_prod_t as f32;
    let (sa, sb) = (f64::from(a.sqrt()), f64::from((1.0 - a).sqrt()));
    match prediction {
        PredictionType::Epsilon => lincomb(&[(1.0, model_output)]),
        PredictionType::VPrediction => lincomb(&[(sa, model_output), (sb, sample)]),
        PredictionType::Sample => Ok((lincomb(&[(1.0, sample), (-sa, x0)])? / sb)?),
        PredictionType::Flow => Err(super::discrete::flow_unsupported("the DDIM / LCM / TCD step")),
    }
}

impl Scheduler for LcmScheduler {
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

    /// Every step but the last re-noises (diffusers: `step_index != num_inference_steps - 1`).
    fn noise_steps(&self) -> Vec<usize> {
        (0..self.timesteps.len().saturating_sub(1)).collect()
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let n = self.timesteps.len();
        check_step_inputs(CLASS, model_output, sample, self.step_index, n)?;
        let t = self.timesteps[self.step_index];
        let last = self.step_index + 1 == n;
        let prev_t = if last { t } else { self.timesteps[self.step_index + 1] };
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = self.alphas_cumprod[prev_t as usize];
        let (c_skip, c_out) = self.boundary(t);
        let mut x0 = predict_x0(self.config.prediction_type, alpha_t, model_output, sample)?;
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let denoised = lincomb(&[(c_out, &x0), (c_skip, sample)])?;
        let prev = if last {
            denoised
        } else {
            let z = noise.sample(model_output.dims(), model_output.device())?;
            let ap = alpha_prev as f32;
            lincomb(&[(f64::from(ap.sqrt()), &denoised), (f64::from((1.0 - ap).sqrt()), &z)])?
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

    #[test]
    fn default_four_step_schedule() {
        let mut s = LcmScheduler::from_value(serde_json::json!({})).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
        s.set_custom_timesteps(&[999.0, 749.0, 499.0, 249.0]).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
        assert!(s.set_custom_timesteps(&[499.0, 749.0]).is_err());
        assert!(s.set_timesteps(51).is_err());
    }
}
