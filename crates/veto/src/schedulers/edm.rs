//! diffusers' EDM schedulers (Karras et al. 2022 preconditioning; Playground v2.5):
//! `EDMEulerScheduler` and `EDMDPMSolverMultistepScheduler`.
//!
//! The model sees `c_in x = x / sqrt(sigma^2 + sigma_data^2)` at timestep
//! `c_noise = 0.25 ln sigma`, and its output `F` becomes the denoised sample
//! `c_skip x + c_out F` with `c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)` and
//! `c_out = (+/-) sigma sigma_data / sqrt(sigma^2 + sigma_data^2)` (minus for v_prediction).
//!
//! The guidance window needs a position on the 0..1000 training scale, which EDM timesteps do
//! not have: [`Scheduler::window_time`] maps `ln sigma` linearly from `[ln sigma_min,
//! ln sigma_max]` onto `[0, num_train_timesteps]`.

use candle_core::Tensor;
use serde::Deserialize;

use super::discrete::{bad, linspace_f32, linspace_f64, reject_if, FinalSigmas, PredictionType};
use super::dpm_solver_multistep::{Algorithm, Level, Multistep, SolverType};
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SigmaSchedule {
    #[serde(rename = "karras")]
    Karras,
    #[serde(rename = "exponential")]
    Exponential,
}

/// The preconditioning both EDM schedulers share.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Edm {
    sigma_min: f64,
    sigma_max: f64,
    sigma_data: f64,
    rho: f64,
    schedule: SigmaSchedule,
    prediction: PredictionType,
    num_train: usize,
}

impl Edm {
    fn check(&self, class: &str) -> Result<()> {
        if !(self.sigma_min > 0.0 && self.sigma_max > self.sigma_min && self.sigma_data > 0.0 && self.rho > 0.0) {
            return Err(bad(format!(
                "{class}: need 0 < sigma_min < sigma_max, sigma_data > 0 and rho > 0 (got {}, {}, {}, {})",
                self.sigma_min, self.sigma_max, self.sigma_data, self.rho
            )));
        }
        if self.prediction == PredictionType::Sample {
            return Err(bad(format!("{class}: prediction_type \"sample\" is not supported (epsilon, v_prediction)")));
        }
        Ok(())
    }

    /// `n` sigmas from sigma_max down to sigma_min (f32 values). `f32_ramp`: the DPM-Solver
    /// variant computes the Karras ramp in float32, the Euler one in float64.
    fn sigmas(&self, n: usize, f32_ramp: bool) -> Vec<f64> {
        match self.schedule {
            SigmaSchedule::Karras => {
                let (min_inv, max_inv) = (self.sigma_min.powf(1.0 / self.rho), self.sigma_max.powf(1.0 / self.rho));
                if f32_ramp {
                    let (lo, hi, rho) = (min_inv as f32, max_inv as f32, self.rho as f32);
                    linspace_f32(0.0, 1.0, n).into_iter().map(|r| f64::from((hi + r * (lo - hi)).powf(rho))).collect()
                } else {
                    linspace_f64(0.0, 1.0, n)
                        .into_iter()
                        .map(|r| f64::from(((max_inv + r * (min_inv - max_inv)).powf(self.rho)) as f32))
                        .collect()
                }
            }
            SigmaSchedule::Exponential => {
                let mut v: Vec<f64> = linspace_f32(self.sigma_min.ln() as f32, self.sigma_max.ln() as f32, n)
                    .into_iter()
                    .map(|l| f64::from(l.exp()))
                    .collect();
                v.reverse();
                v
            }
        }
    }

    fn c_noise(sigma: f64) -> f64 {
        f64::from(0.25 * (sigma as f32).ln())
    }

    fn c_in(&self, sigma: f64) -> f64 {
        let s = sigma as f32;
        let d = self.sigma_data as f32;
        f64::from(1.0 / (s * s + d * d).sqrt())
    }

    /// `c_skip x + c_out F`, in f32.
    fn denoised(&self, sample: &Tensor, model_output: &Tensor, sigma: f64) -> Result<Tensor> {
        let s = sigma as f32;
        let d = self.sigma_data as f32;
        let c_skip = d * d / (s * s + d * d);
        let mut c_out = s * d / (s * s + d * d).sqrt();
        if self.prediction == PredictionType::VPrediction {
            c_out = -c_out;
        }
        lincomb(&[(f64::from(c_skip), sample), (f64::from(c_out), model_output)])
    }

    fn init_noise_sigma(&self) -> f64 {
        (self.sigma_max * self.sigma_max + 1.0).sqrt()
    }

    fn window_time(&self, sigma: f64) -> f64 {
        let (lo, hi) = (self.sigma_min.ln(), self.sigma_max.ln());
        let t = ((sigma.max(self.sigma_min).ln() - lo) / (hi - lo)).clamp(0.0, 1.0) * self.num_train as f64;
        // Sigmas are f32: snap the rounding error at the ends so sigma_max is exactly the top.
        let top = self.num_train as f64;
        if top - t < 1e-3 {
            top
        } else if t < 1e-3 {
            0.0
        } else {
            t
        }
    }
}

fn check_steps(steps: usize, class: &str) -> Result<()> {
    if steps == 0 {
        return Err(Error::invalid(format!("{class}: the number of steps must be at least 1")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// EDM Euler
// ---------------------------------------------------------------------------------------

const EULER: &str = "EDMEulerScheduler";

/// `scheduler_config.json` of an `EDMEulerScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EdmEulerConfig {
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub sigma_data: f64,
    pub sigma_schedule: SigmaSchedule,
    pub num_train_timesteps: usize,
    pub prediction_type: PredictionType,
    pub rho: f64,
    pub final_sigmas_type: FinalSigmas,
}

impl Default for EdmEulerConfig {
    fn default() -> Self {
        Self {
            sigma_min: 0.002,
            sigma_max: 80.0,
            sigma_data: 0.5,
            sigma_schedule: SigmaSchedule::Karras,
            num_train_timesteps: 1000,
            prediction_type: PredictionType::Epsilon,
            rho: 7.0,
            final_sigmas_type: FinalSigmas::Zero,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EdmEulerScheduler {
    config: EdmEulerConfig,
    edm: Edm,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: usize,
}

impl EdmEulerScheduler {
    pub fn new(config: EdmEulerConfig) -> Result<Self> {
        let edm = Edm {
            sigma_min: config.sigma_min,
            sigma_max: config.sigma_max,
            sigma_data: config.sigma_data,
            rho: config.rho,
            schedule: config.sigma_schedule,
            prediction: config.prediction_type,
            num_train: config.num_train_timesteps,
        };
        edm.check(EULER)?;
        Ok(Self { config, edm, timesteps: Vec::new(), sigmas: Vec::new(), step_index: 0 })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, EULER)?)
    }

    pub fn config(&self) -> &EdmEulerConfig {
        &self.config
    }
}

impl Scheduler for EdmEulerScheduler {
    fn class_name(&self) -> &'static str {
        EULER
    }
    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }
    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        check_steps(steps, EULER)?;
        let mut sigmas = self.edm.sigmas(steps, false);
        self.timesteps = sigmas.iter().map(|&s| Edm::c_noise(s)).collect();
        let last = match self.config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => sigmas[sigmas.len() - 1],
        };
        sigmas.push(last);
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
        self.edm.init_noise_sigma()
    }
    fn step_index(&self) -> usize {
        self.step_index
    }

    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        if self.step_index >= self.timesteps.len() {
            return Err(Error::invalid(format!("{EULER}: no step left to scale the input for")));
        }
        Ok(sample.affine(self.edm.c_in(self.sigmas[self.step_index]), 0.0)?)
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        check_step_inputs(EULER, model_output, sample, self.step_index, self.timesteps.len())?;
        let sigma = self.sigmas[self.step_index];
        let next = self.sigmas[self.step_index + 1];
        let x = lincomb(&[(1.0, sample)])?;
        let x0 = self.edm.denoised(&x, model_output, sigma)?;
        let derivative = ((&x - x0)? / sigma)?;
        let dt = f64::from(next as f32 - sigma as f32);
        let prev = (x + (derivative * dt)?)?;
        self.step_index += 1;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn window_time(&self, i: usize) -> f64 {
        self.edm.window_time(self.sigmas[i])
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
}

// ---------------------------------------------------------------------------------------
// EDM DPM-Solver multistep
// ---------------------------------------------------------------------------------------

const DPM: &str = "EDMDPMSolverMultistepScheduler";

/// `scheduler_config.json` of an `EDMDPMSolverMultistepScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EdmDpmSolverMultistepConfig {
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub sigma_data: f64,
    pub sigma_schedule: SigmaSchedule,
    pub num_train_timesteps: usize,
    pub prediction_type: PredictionType,
    pub rho: f64,
    pub solver_order: usize,
    pub thresholding: bool,
    pub algorithm_type: Algorithm,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub final_sigmas_type: FinalSigmas,
}

impl Default for EdmDpmSolverMultistepConfig {
    fn default() -> Self {
        Self {
            sigma_min: 0.002,
            sigma_max: 80.0,
            sigma_data: 0.5,
            sigma_schedule: SigmaSchedule::Karras,
            num_train_timesteps: 1000,
            prediction_type: PredictionType::Epsilon,
            rho: 7.0,
            solver_order: 2,
            thresholding: false,
            algorithm_type: Algorithm::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            final_sigmas_type: FinalSigmas::Zero,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EdmDpmSolverMultistepScheduler {
    config: EdmDpmSolverMultistepConfig,
    edm: Edm,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: usize,
    solver: Multistep,
}

impl EdmDpmSolverMultistepScheduler {
    pub fn new(config: EdmDpmSolverMultistepConfig) -> Result<Self> {
        reject_if(config.thresholding, "thresholding", DPM)?;
        if !matches!(config.algorithm_type, Algorithm::DpmSolverPlusPlus | Algorithm::SdeDpmSolverPlusPlus) {
            return Err(bad(format!("{DPM}: algorithm_type must be dpmsolver++ or sde-dpmsolver++")));
        }
        if !(1..=3).contains(&config.solver_order) {
            return Err(bad(format!("{DPM}: solver_order must be 1, 2 or 3, got {}", config.solver_order)));
        }
        if config.algorithm_type == Algorithm::SdeDpmSolverPlusPlus && config.solver_order == 3 {
            return Err(bad(format!("{DPM}: sde-dpmsolver++ with solver_order 3 is not supported")));
        }
        let edm = Edm {
            sigma_min: config.sigma_min,
            sigma_max: config.sigma_max,
            sigma_data: config.sigma_data,
            rho: config.rho,
            schedule: config.sigma_schedule,
            prediction: config.prediction_type,
            num_train: config.num_train_timesteps,
        };
        edm.check(DPM)?;
        let solver = Multistep::new(
            config.solver_order,
            config.algorithm_type,
            config.solver_type,
            config.lower_order_final,
            config.euler_at_final,
            config.final_sigmas_type == FinalSigmas::Zero,
        );
        Ok(Self { config, edm, timesteps: Vec::new(), sigmas: Vec::new(), step_index: 0, solver })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, DPM)?)
    }

    pub fn config(&self) -> &EdmDpmSolverMultistepConfig {
        &self.config
    }
}

impl Scheduler for EdmDpmSolverMultistepScheduler {
    fn class_name(&self) -> &'static str {
        DPM
    }
    fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }
    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        check_steps(steps, DPM)?;
        let mut sigmas = self.edm.sigmas(steps, true);
        self.timesteps = sigmas.iter().map(|&s| Edm::c_noise(s)).collect();
        sigmas.push(match self.config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => f64::from(self.config.sigma_min as f32),
        });
        self.sigmas = sigmas;
        self.step_index = 0;
        self.solver.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
    fn init_noise_sigma(&self) -> f64 {
        self.edm.init_noise_sigma()
    }
    fn step_index(&self) -> usize {
        self.step_index
    }

    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        if self.step_index >= self.timesteps.len() {
            return Err(Error::invalid(format!("{DPM}: no step left to scale the input for")));
        }
        Ok(sample.affine(self.edm.c_in(self.sigmas[self.step_index]), 0.0)?)
    }

    /// `sde-dpmsolver++`: every step draws, the last included.
    fn noise_steps(&self) -> Vec<usize> {
        if self.solver.is_sde() {
            (0..self.timesteps.len()).collect()
        } else {
            Vec::new()
        }
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let n = self.timesteps.len();
        let i = self.step_index;
        check_step_inputs(DPM, model_output, sample, i, n)?;
        let x0 = self.edm.denoised(&lincomb(&[(1.0, sample)])?, model_output, self.sigmas[i])?;
        // Inputs are preconditioned before the model: alpha = 1, sigma = sigma.
        let table: Vec<Level> = self.sigmas.iter().map(|&s| Level { alpha: 1.0, sigma: s as f32 }).collect();
        let prev = self.solver.step(x0, sample, i, n, &|k| table[k], noise)?;
        self.step_index += 1;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn window_time(&self, i: usize) -> f64 {
        self.edm.window_time(self.sigmas[i])
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        let mut fresh = self.clone();
        fresh.solver.reset();
        Box::new(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karras_endpoints_and_timesteps() {
        let mut s = EdmDpmSolverMultistepScheduler::from_value(serde_json::json!({})).unwrap();
        s.set_timesteps(4).unwrap();
        let sig = s.sigmas().unwrap();
        assert!((sig[0] - 80.0).abs() < 1e-4 && (sig[3] - 0.002).abs() < 1e-7 && sig[4] == 0.0);
        assert!((s.timesteps()[0] - 0.25 * 80f64.ln()).abs() < 1e-6);
        assert!((s.init_noise_sigma() - (6401f64).sqrt()).abs() < 1e-12);
        assert_eq!(s.window_time(0), 1000.0);
        let mut e = EdmEulerScheduler::from_value(serde_json::json!({"sigma_schedule": "exponential"})).unwrap();
        e.set_timesteps(3).unwrap();
        let sig = e.sigmas().unwrap();
        assert!((sig[1] - (0.002f64 * 80.0).sqrt()).abs() < 1e-4, "{sig:?}");
    }
}
