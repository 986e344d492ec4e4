//! diffusers' `EulerDiscreteScheduler` (SDXL base, SDXL-Lightning with `trailing` spacing):
//! deterministic Euler in the Karras sigma parametrisation. The model sees
//! `x / sqrt(sigma^2 + 1)`; a step moves `x` along `(x - x0) / sigma` to the next sigma.
//!
//! Supported: linspace/leading/trailing spacing, linear or log-linear interpolation, Karras and
//! exponential sigmas, `final_sigmas_type`, continuous timesteps (v-prediction), zero-SNR
//! rescaling, epsilon / v_prediction / sample. Not supported: `use_beta_sigmas`, and the
//! stochastic churn (`s_churn`), which diffusers pipelines leave at 0.

use candle_core::Tensor;
use serde::Deserialize;

use super::discrete::{
    bad, check_steps, exponential_sigmas, f32r, interp_index, karras_sigmas, reject_if, sigma_to_t, spaced_timesteps,
    train_sigmas, BetaConfig, BetaSchedule, FinalSigmas, PredictionType, TimestepSpacing,
};
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "EulerDiscreteScheduler";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Interpolation {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "log_linear")]
    LogLinear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepType {
    #[serde(rename = "discrete")]
    Discrete,
    #[serde(rename = "continuous")]
    Continuous,
}

/// `scheduler_config.json` of an `EulerDiscreteScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EulerDiscreteConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub interpolation_type: Interpolation,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_spacing: TimestepSpacing,
    pub timestep_type: TimestepType,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    pub final_sigmas_type: FinalSigmas,
}

impl Default for EulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: Interpolation::Linear,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmas::Zero,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteConfig,
    /// Training-table sigmas, increasing with t (f32 values).
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: usize,
}

impl EulerDiscreteScheduler {
    pub fn new(config: EulerDiscreteConfig) -> Result<Self> {
        let karras = config.use_karras_sigmas.unwrap_or(false);
        let exponential = config.use_exponential_sigmas.unwrap_or(false);
        reject_if(config.use_beta_sigmas.unwrap_or(false), "use_beta_sigmas", CLASS)?;
        if karras && exponential {
            return Err(bad(format!("{CLASS}: use_karras_sigmas and use_exponential_sigmas are exclusive")));
        }
        let betas = BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.clone(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        };
        let train_sigmas = train_sigmas(&betas.alphas_cumprod(true)?);
        Ok(Self { config, train_sigmas, timesteps: Vec::new(), sigmas: Vec::new(), step_index: 0 })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }

    pub fn config(&self) -> &EulerDiscreteConfig {
        &self.config
    }

    fn continuous(&self) -> bool {
        self.config.timestep_type == TimestepType::Continuous
            && self.config.prediction_type == PredictionType::VPrediction
    }

    fn sigma(&self) -> f64 {
        self.sigmas[self.step_index]
    }

    /// Move to the next step without computing one (for schedulers that share this schedule
    /// and step themselves, e.g. Euler Ancestral).
    pub(crate) fn advance(&mut self) {
        self.step_index += 1;
    }
}

impl Scheduler for EulerDiscreteScheduler {
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
        let n_train = c.num_train_timesteps;
        check_steps(steps, n_train, CLASS)?;
        let timesteps: Vec<f64> =
            spaced_timesteps(c.timestep_spacing, n_train, steps, c.steps_offset).into_iter().map(f32r).collect();
        let log_sigmas: Vec<f64> = super::discrete::log_sigmas(&self.train_sigmas);
        let mut sigmas: Vec<f64> = match c.interpolation_type {
            Interpolation::Linear => timesteps.iter().map(|&t| interp_index(t, &self.train_sigmas)).collect(),
            Interpolation::LogLinear => {
                // torch.linspace(log(sigma_max_train), log(sigma_min_train), n + 1).exp(), in f32.
                // diffusers keeps all n + 1 (so the last step ends at the smallest training sigma,
                // not at the final sigma appended below); so do we.
                let hi = (self.train_sigmas[n_train - 1] as f32).ln();
                let lo = (self.train_sigmas[0] as f32).ln();
                super::discrete::linspace_f32(hi, lo, steps + 1).into_iter().map(|l| f64::from(l.exp())).collect()
            }
        };
        let mut timesteps = timesteps;
        let karras = c.use_karras_sigmas.unwrap_or(false);
        let exponential = c.use_exponential_sigmas.unwrap_or(false);
        if karras || exponential {
            let lo = c.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = c.sigma_max.unwrap_or(sigmas[0]);
            sigmas = if karras { karras_sigmas(lo, hi, steps, 7.0) } else { exponential_sigmas(lo, hi, steps) };
            timesteps = sigmas.iter().map(|&s| f32r(sigma_to_t(s, &log_sigmas))).collect();
        }
        let last = match c.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.train_sigmas[0],
        };
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(f32r).collect();
        if self.continuous() {
            timesteps = sigmas[..steps].iter().map(|&s| f32r(0.25 * (s as f32).ln() as f64)).collect();
        }
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = 0;
        Ok(())
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        if self.config.use_karras_sigmas.unwrap_or(false) || self.config.use_exponential_sigmas.unwrap_or(false) {
            return Err(Error::invalid(format!(
                "{CLASS}: custom timesteps do not combine with Karras/exponential sigmas"
            )));
        }
        if self.continuous() {
            return Err(Error::invalid(format!("{CLASS}: custom timesteps do not combine with continuous timesteps")));
        }
        super::discrete::check_custom_timesteps(timesteps, self.config.num_train_timesteps, CLASS)?;
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| f32r(interp_index(t, &self.train_sigmas))).collect();
        sigmas.push(match self.config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.train_sigmas[0],
        });
        self.timesteps = timesteps.iter().map(|&t| f32r(t)).collect();
        self.sigmas = sigmas;
        self.step_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
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
        super::discrete::sigma_scaled_input(sample, self.sigma())
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        check_step_inputs(CLASS, model_output, sample, self.step_index, self.timesteps.len())?;
        let sigma = self.sigma();
        let sigma_next = self.sigmas[self.step_index + 1];
        let s32 = sigma as f32;
        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => lincomb(&[(1.0, sample), (-sigma, model_output)])?,
            PredictionType::VPrediction => {
                let c_out = f64::from(-s32 / (s32 * s32 + 1.0).sqrt());
                let c_skip = f64::from(1.0 / (s32 * s32 + 1.0));
                lincomb(&[(c_out, model_output), (c_skip, sample)])?
            }
            PredictionType::Sample => lincomb(&[(1.0, model_output)])?,
            PredictionType::Flow => return Err(super::discrete::flow_unsupported(CLASS)),
        };
        let sample32 = lincomb(&[(1.0, sample)])?;
        let derivative = ((&sample32 - x0)? / sigma)?;
        let dt = f64::from(sigma_next as f32 - s32);
        let prev = (sample32 + (derivative * dt)?)?;
        self.step_index += 1;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn window_time(&self, i: usize) -> f64 {
        if self.continuous() {
            // Continuous timesteps are 0.25 ln sigma: map sigma back onto the training table.
            let logs: Vec<f64> = super::discrete::log_sigmas(&self.train_sigmas);
            sigma_to_t(self.sigmas[i], &logs)
        } else {
            self.timesteps[i]
        }
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl() -> EulerDiscreteScheduler {
        EulerDiscreteScheduler::from_value(serde_json::json!({
            "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
            "trained_betas": null, "use_karras_sigmas": false
        }))
        .unwrap()
    }

    #[test]
    fn leading_schedule_and_init_sigma() {
        let mut s = sdxl();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        assert_eq!(s.sigmas().unwrap().len(), 5);
        assert_eq!(*s.sigmas().unwrap().last().unwrap(), 0.0);
        let max = s.sigmas().unwrap()[0];
        assert!((s.init_noise_sigma() - (max * max + 1.0).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn trailing_is_lightning() {
        let mut s = sdxl();
        s.config.timestep_spacing = TimestepSpacing::Trailing;
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
        assert_eq!(s.init_noise_sigma(), s.sigmas().unwrap()[0]);
    }

    #[test]
    fn rejects_beta_sigmas() {
        let err =
            EulerDiscreteScheduler::from_value(serde_json::json!({"use_beta_sigmas": true})).err().unwrap().to_string();
        assert!(err.contains("use_beta_sigmas"), "{err}");
    }
}
