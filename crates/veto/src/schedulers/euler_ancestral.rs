//! diffusers' `EulerAncestralDiscreteScheduler` ("Euler a" in A1111/ComfyUI): Euler down to
//! `sigma_down`, then fresh noise of scale `sigma_up`, with
//! `sigma_up = sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)` and
//! `sigma_down = sqrt(sigma_to^2 - sigma_up^2)`. Its schedule, input scaling and initial noise
//! are Euler's (linear interpolation of the training sigmas), so they come from an
//! [`EulerDiscreteScheduler`] built from the same config. Noise is drawn at every step, the last
//! included (where `sigma_up` is 0), as diffusers draws it.

use candle_core::Tensor;
use serde::Deserialize;

use super::discrete::{BetaSchedule, PredictionType, TimestepSpacing};
use super::euler_discrete::EulerDiscreteScheduler;
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// `scheduler_config.json` of an `EulerAncestralDiscreteScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EulerAncestralConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl Default for EulerAncestralConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    config: EulerAncestralConfig,
    /// The same schedule without the noise: timesteps, sigmas, input scaling.
    euler: EulerDiscreteScheduler,
}

impl EulerAncestralScheduler {
    pub fn new(config: EulerAncestralConfig) -> Result<Self> {
        if !matches!(config.prediction_type, PredictionType::Epsilon | PredictionType::VPrediction) {
            return Err(Error::invalid(format!(
                "{CLASS}: prediction_type {:?} is not supported (epsilon, v_prediction)",
                config.prediction_type
            )));
        }
        let spacing = match config.timestep_spacing {
            TimestepSpacing::Linspace => "linspace",
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
        };
        let beta_schedule = match config.beta_schedule {
            BetaSchedule::Linear => "linear",
            BetaSchedule::ScaledLinear => "scaled_linear",
            BetaSchedule::SquaredcosCapV2 => "squaredcos_cap_v2",
        };
        let euler = EulerDiscreteScheduler::from_value(serde_json::json!({
            "num_train_timesteps": config.num_train_timesteps,
            "beta_start": config.beta_start,
            "beta_end": config.beta_end,
            "beta_schedule": beta_schedule,
            "trained_betas": config.trained_betas,
            "prediction_type": if config.prediction_type == PredictionType::Epsilon { "epsilon" } else { "v_prediction" },
            "timestep_spacing": spacing,
            "steps_offset": config.steps_offset,
            "rescale_betas_zero_snr": config.rescale_betas_zero_snr,
            "interpolation_type": "linear",
        }))?;
        Ok(Self { config, euler })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }
}

impl Scheduler for EulerAncestralScheduler {
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
        self.euler.set_timesteps(steps)
    }
    fn timesteps(&self) -> &[f64] {
        self.euler.timesteps()
    }
    fn sigmas(&self) -> Option<&[f64]> {
        self.euler.sigmas()
    }
    fn init_noise_sigma(&self) -> f64 {
        self.euler.init_noise_sigma()
    }
    fn step_index(&self) -> usize {
        self.euler.step_index()
    }
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        self.euler.scale_model_input(sample)
    }
    fn window_time(&self, i: usize) -> f64 {
        self.euler.window_time(i)
    }
    /// Every step draws, the last included.
    fn noise_steps(&self) -> Vec<usize> {
        (0..self.euler.timesteps().len()).collect()
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let index = self.euler.step_index();
        let sigmas = self.euler.sigmas().unwrap_or(&[]);
        check_step_inputs(CLASS, model_output, sample, index, self.euler.timesteps().len())?;
        // diffusers computes these on float32 scalars.
        let (from, to) = (sigmas[index] as f32, sigmas[index + 1] as f32);
        let x0 = match self.config.prediction_type {
            PredictionType::VPrediction => {
                let c_out = f64::from(-from / (from * from + 1.0).sqrt());
                let c_skip = f64::from(1.0 / (from * from + 1.0));
                lincomb(&[(c_out, model_output), (c_skip, sample)])?
            }
            _ => lincomb(&[(1.0, sample), (-f64::from(from), model_output)])?,
        };
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let sample32 = lincomb(&[(1.0, sample)])?;
        let derivative = ((&sample32 - x0)? / f64::from(from))?;
        let prev = (sample32 + (derivative * f64::from(down - from))?)?;
        let z = noise.sample(model_output.dims(), model_output.device())?;
        let prev = (prev + lincomb(&[(f64::from(up), &z)])?)?;
        // Advance the shared schedule by one step (its own step is never used).
        self.euler.advance();
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
    use candle_core::{DType, Device};

    #[test]
    fn noise_is_drawn_at_every_step_and_the_last_adds_none() {
        let mut s = EulerAncestralScheduler::from_value(serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "steps_offset": 1, "timestep_spacing": "leading"
        }))
        .unwrap();
        s.set_timesteps(2).unwrap();
        let x = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let big = (Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap() * 100.0).unwrap();
        let mut noise = FixedNoise::new([big.clone(), big.clone()]);
        let eps = x.zeros_like().unwrap();
        let mid = s.step(&eps, &x, &mut noise).unwrap();
        // With eps = 0 the Euler part keeps x; the first step adds 100 sigma_up.
        assert!(mid.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] > 1.0);
        let last = s.step(&eps, &mid, &mut noise).unwrap();
        // The last step goes to sigma 0: no noise survives, and the noise was consumed.
        assert_eq!(
            last.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            mid.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(noise.sample(&[1], &Device::Cpu).is_err());
    }
}
