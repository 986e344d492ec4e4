//! diffusers' `HeunDiscreteScheduler`: Heun's second-order method (Karras et al. 2022,
//! algorithm 1 without churn) in the sigma parametrisation Euler uses. Each step is an Euler
//! step to the next sigma followed by a correction that averages the slopes at both ends, so
//! the schedule repeats every timestep but the first: `n` steps make `2n - 1` model calls, and
//! the last call is a plain Euler step to sigma 0. The pipeline loop calls [`Scheduler::step`]
//! once per model call; the scheduler alternates between the first-order (predictor) and the
//! second-order (corrector) state.
//!
//! Supported: linspace/leading/trailing spacing, Karras and exponential sigmas, custom
//! timesteps, `clip_sample`, epsilon / v_prediction / sample. Not supported (error):
//! `use_beta_sigmas`.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::discrete::{
    bad, check_steps, exponential_sigmas, f32r, interp_index, karras_sigmas, reject_if, sigma_to_t, spaced_timesteps,
    train_sigmas, BetaConfig, BetaSchedule, PredictionType, TimestepSpacing,
};
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "HeunDiscreteScheduler";

/// `scheduler_config.json` of a `HeunDiscreteScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct HeunDiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    /// Not Heun parameters, but diffusers' Karras/exponential conversion reads them when the
    /// config has them (e.g. carried over from an Euler config).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
}

impl Default for HeunDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            sigma_min: None,
            sigma_max: None,
            clip_sample: Some(false),
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

/// What the first-order half of a step leaves for the correction.
#[derive(Debug, Clone)]
struct FirstOrder {
    derivative: Tensor,
    /// `sigma_next - sigma` (f32).
    dt: f64,
    /// The sample the step started from (f32).
    sample: Tensor,
}

#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler {
    config: HeunDiscreteConfig,
    /// Training-table sigmas, increasing with t (f32 values).
    train_sigmas: Vec<f64>,
    /// `[t0, t1, t1, ..., t(n-1), t(n-1)]` (`2n - 1` model calls).
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, ..., s(n-1), s(n-1), 0]` (`2n` entries, f32 values).
    sigmas: Vec<f64>,
    step_index: usize,
    /// `Some` between the first-order half of a step and its correction.
    pending: Option<FirstOrder>,
}

impl HeunDiscreteScheduler {
    pub fn new(config: HeunDiscreteConfig) -> Result<Self> {
        reject_if(config.use_beta_sigmas.unwrap_or(false), "use_beta_sigmas", CLASS)?;
        if config.use_karras_sigmas.unwrap_or(false) && config.use_exponential_sigmas.unwrap_or(false) {
            return Err(bad(format!("{CLASS}: use_karras_sigmas and use_exponential_sigmas are exclusive")));
        }
        let betas = BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.clone(),
            rescale_betas_zero_snr: false,
        };
        let train_sigmas = train_sigmas(&betas.alphas_cumprod(false)?);
        Ok(Self { config, train_sigmas, timesteps: Vec::new(), sigmas: Vec::new(), step_index: 0, pending: None })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }

    pub fn config(&self) -> &HeunDiscreteConfig {
        &self.config
    }

    /// Whether the next [`Scheduler::step`] is the first-order half of a step (diffusers'
    /// `state_in_first_order`).
    pub fn state_in_first_order(&self) -> bool {
        self.pending.is_none()
    }

    /// Interleave one timestep and sigma per step (`sigmas` without the final 0) into the
    /// model-call schedule.
    fn finish(&mut self, timesteps: Vec<f64>, sigmas: Vec<f64>) {
        let mut ts = Vec::with_capacity(2 * timesteps.len());
        for (k, &t) in timesteps.iter().enumerate() {
            ts.push(f32r(t));
            if k > 0 {
                ts.push(f32r(t));
            }
        }
        let mut ss = Vec::with_capacity(2 * sigmas.len());
        for (k, &s) in sigmas.iter().enumerate() {
            ss.push(f32r(s));
            if k > 0 {
                ss.push(f32r(s));
            }
        }
        ss.push(0.0);
        self.timesteps = ts;
        self.sigmas = ss;
        self.step_index = 0;
        self.pending = None;
    }

    /// The data prediction from the model output at noise level `sigma` (f32 arithmetic).
    fn predict_x0(&self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        let s = sigma as f32;
        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => lincomb(&[(1.0, sample), (-sigma, model_output)])?,
            PredictionType::VPrediction => {
                let c_out = f64::from(-s / (s * s + 1.0).sqrt());
                let c_skip = f64::from(1.0 / (s * s + 1.0));
                lincomb(&[(c_out, model_output), (c_skip, sample)])?
            }
            PredictionType::Sample => lincomb(&[(1.0, model_output)])?,
            PredictionType::Flow => return Err(super::discrete::flow_unsupported(CLASS)),
        };
        if self.config.clip_sample.unwrap_or(false) {
            let r = self.config.clip_sample_range;
            Ok(x0.clamp(-r, r)?)
        } else {
            Ok(x0)
        }
    }
}

impl Scheduler for HeunDiscreteScheduler {
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
        let mut timesteps: Vec<f64> =
            spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, steps, c.steps_offset)
                .into_iter()
                .map(f32r)
                .collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp_index(t, &self.train_sigmas)).collect();
        let karras = c.use_karras_sigmas.unwrap_or(false);
        if karras || c.use_exponential_sigmas.unwrap_or(false) {
            let lo = c.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = c.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if karras { karras_sigmas(lo, hi, steps, 7.0) } else { exponential_sigmas(lo, hi, steps) };
            let logs = super::discrete::log_sigmas(&self.train_sigmas);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs)).collect();
        }
        self.finish(timesteps, sigmas);
        Ok(())
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        if self.config.use_karras_sigmas.unwrap_or(false) || self.config.use_exponential_sigmas.unwrap_or(false) {
            return Err(Error::invalid(format!(
                "{CLASS}: custom timesteps do not combine with Karras/exponential sigmas"
            )));
        }
        super::discrete::check_custom_timesteps(timesteps, self.config.num_train_timesteps, CLASS)?;
        let sigmas = timesteps.iter().map(|&t| interp_index(t, &self.train_sigmas)).collect();
        self.finish(timesteps.to_vec(), sigmas);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    /// `2n` noise levels for the `2n - 1` model calls: call `i` sees `sigmas[i]`.
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        super::discrete::sigma_init_noise(&self.sigmas, self.config.timestep_spacing)
    }

    fn step_index(&self) -> usize {
        self.step_index
    }

    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        if self.step_index >= self.timesteps.len() {
            return Err(Error::invalid(format!("{CLASS}: no step left to scale the input for")));
        }
        super::discrete::sigma_scaled_input(sample, self.sigmas[self.step_index])
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let i = self.step_index;
        check_step_inputs(CLASS, model_output, sample, i, self.timesteps.len())?;
        let sample32 = sample.to_dtype(DType::F32)?;
        let prev = match self.pending.take() {
            None => {
                // Euler to the next sigma; keep the slope for the correction.
                let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = self.predict_x0(model_output, &sample32, sigma)?;
                let derivative = ((&sample32 - x0)? / sigma)?;
                let dt = f64::from(sigma_next as f32 - sigma as f32);
                let prev = (&sample32 + (&derivative * dt)?)?;
                self.pending = Some(FirstOrder { derivative, dt, sample: sample32 });
                prev
            }
            Some(first) => {
                // The slope at the end point, averaged with the first one, from the start.
                let sigma_next = self.sigmas[i];
                let x0 = self.predict_x0(model_output, &sample32, sigma_next)?;
                let derivative = ((&sample32 - x0)? / sigma_next)?;
                let derivative = ((first.derivative + derivative)? * 0.5)?;
                (first.sample + (derivative * first.dt)?)?
            }
        };
        self.step_index += 1;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        let mut fresh = self.clone();
        fresh.pending = None;
        Box::new(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> HeunDiscreteScheduler {
        HeunDiscreteScheduler::from_value(serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "steps_offset": 1, "timestep_spacing": "leading"
        }))
        .unwrap()
    }

    #[test]
    fn schedule_repeats_all_but_the_first_timestep() {
        let mut s = sd15();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[751.0, 501.0, 501.0, 251.0, 251.0, 1.0, 1.0]);
        let sig = s.sigmas().unwrap();
        assert_eq!(sig.len(), 8);
        assert_eq!((sig[1], sig[3], sig[5]), (sig[2], sig[4], sig[6]));
        assert_eq!(sig[7], 0.0);
        s.set_timesteps(1).unwrap();
        assert_eq!(s.timesteps().len(), 1);
        assert_eq!(s.sigmas().unwrap().len(), 2);
    }

    #[test]
    fn alternates_between_first_and_second_order() {
        use candle_core::Device;
        let mut s = sd15();
        s.set_timesteps(2).unwrap();
        let mut x = Tensor::ones((1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let mut orders = Vec::new();
        for _ in 0..s.timesteps().len() {
            orders.push(s.state_in_first_order());
            let input = s.scale_model_input(&x).unwrap();
            x = s.step(&(input * 0.1).unwrap(), &x, &mut super::super::scheduler::NoNoise).unwrap();
        }
        assert_eq!(orders, vec![true, false, true]);
        assert!(s.step(&x, &x, &mut super::super::scheduler::NoNoise).is_err());
    }

    #[test]
    fn rejects_beta_sigmas() {
        let err =
            HeunDiscreteScheduler::from_value(serde_json::json!({"use_beta_sigmas": true})).err().unwrap().to_string();
        assert!(err.contains("use_beta_sigmas"), "{err}");
    }
}
