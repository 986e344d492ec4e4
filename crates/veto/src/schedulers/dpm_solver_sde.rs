//! diffusers' `DPMSolverSDEScheduler`: k-diffusion's `sample_dpmpp_sde`, A1111's "DPM++ SDE"
//! (and "DPM++ SDE Karras" with `use_karras_sigmas`). A singlestep second-order solver: each
//! step goes to the log-sigma midpoint with an ancestral DPM-Solver++ step, calls the model
//! there, then makes the full step from the start with the midpoint's prediction; both halves
//! add Brownian noise. The schedule interleaves the midpoint timesteps: `n` steps make
//! `2n - 1` model calls, the last a plain Euler step to sigma 0.
//!
//! **Noise.** diffusers draws it from a `torchsde` Brownian tree: the first half sees the
//! normalised increment of `W` over `[sigma_mid, sigma]`, the second over `[sigma_next, sigma]`,
//! which contains the first, so the two are correlated. Here the Brownian motion is built
//! exactly from two standard normal draws per step: `n1` for the first half, and the
//! innovation `z` over `[sigma_next, sigma_mid]` for the second, which uses
//! `n2 = (√d1·n1 + √(d2−d1)·z)/√d2` (`d1 = sigma − sigma_mid`, `d2 = sigma − sigma_next`). Same
//! law as the tree; torchsde's own samples convert to `(n1, z)` exactly, which is how the
//! parity test replays them.
//!
//! Supported: linspace/leading/trailing spacing, Karras sigmas, epsilon / v_prediction.
//! Not supported (error): exponential / beta sigmas, `sample` prediction (diffusers raises too).

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::discrete::{
    bad, check_steps, f32r, interp_index, karras_sigmas, log_sigmas, reject_if, sigma_init_noise, sigma_to_t,
    spaced_timesteps, train_sigmas, BetaConfig, BetaSchedule, PredictionType, TimestepSpacing,
};
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "DPMSolverSDEScheduler";

/// `scheduler_config.json` of a `DPMSolverSDEScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DpmSolverSdeConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    /// The Brownian tree's seed in diffusers; here the run's seed decides the noise.
    pub noise_sampler_seed: Option<u64>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
}

impl Default for DpmSolverSdeConfig {
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
            noise_sampler_seed: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

/// What the first half of a step leaves for the second.
#[derive(Debug, Clone)]
struct Midpoint {
    /// The sample the step started from (f32).
    sample: Tensor,
    /// The noise level the model is called at next (torch's f32 `sigma_fn(t_proposed)`).
    sigma_mid: f32,
    /// The first half's normalised Brownian increment.
    n1: Tensor,
}

#[derive(Debug, Clone)]
pub struct DpmSolverSdeScheduler {
    config: DpmSolverSdeConfig,
    /// Training-table sigmas, increasing with t (f32 values).
    train_sigmas: Vec<f64>,
    /// `[t0, mid0, t1, mid1, ..., t(n-1)]` (`2n - 1` model calls).
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, ..., s(n-1), s(n-1), 0]` (`2n` entries, f32 values), as diffusers.
    sigmas: Vec<f64>,
    step_index: usize,
    pending: Option<Midpoint>,
}

/// `-ln(sigma)` and back, in f32 as torch computes them on the scheduler's f32 sigmas.
fn t_of(sigma: f32) -> f32 {
    -sigma.ln()
}
fn sigma_of(t: f32) -> f32 {
    (-t).exp()
}

impl DpmSolverSdeScheduler {
    pub fn new(config: DpmSolverSdeConfig) -> Result<Self> {
        reject_if(config.use_exponential_sigmas.unwrap_or(false), "use_exponential_sigmas", CLASS)?;
        reject_if(config.use_beta_sigmas.unwrap_or(false), "use_beta_sigmas", CLASS)?;
        if config.prediction_type == PredictionType::Sample || config.prediction_type == PredictionType::Flow {
            return Err(bad(format!("{CLASS}: prediction_type must be epsilon or v_prediction")));
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

    pub fn config(&self) -> &DpmSolverSdeConfig {
        &self.config
    }

    /// Whether the next [`Scheduler::step`] is the first half of a step.
    pub fn state_in_first_order(&self) -> bool {
        self.pending.is_none()
    }

    /// The data prediction at noise level `sigma_input` (f32 arithmetic).
    fn predict_x0(&self, model_output: &Tensor, sample: &Tensor, sigma_input: f32) -> Result<Tensor> {
        let s = f64::from(sigma_input);
        match self.config.prediction_type {
            PredictionType::Epsilon => lincomb(&[(1.0, sample), (-s, model_output)]),
            PredictionType::VPrediction => {
                let c_out = f64::from(-sigma_input / (sigma_input * sigma_input + 1.0).sqrt());
                let c_skip = f64::from(1.0 / (sigma_input * sigma_input + 1.0));
                lincomb(&[(c_out, model_output), (c_skip, sample)])
            }
            PredictionType::Sample | PredictionType::Flow => Err(bad(format!("{CLASS}: unsupported prediction"))),
        }
    }

    /// The ancestral DPM-Solver++ move from `sample` at `sigma_from` towards `sigma_to`, and the
    /// noise scale `sigma_up` to add.
    fn ancestral(&self, sample: &Tensor, x0: &Tensor, sigma_from: f32, sigma_to: f32) -> Result<(Tensor, f32)> {
        let t = t_of(sigma_from);
        let sigma_from = sigma_of(t);
        let sigma_up = sigma_to.min(
            (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from)).sqrt(),
        );
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let ancestral_t = t_of(sigma_down);
        let ratio = sigma_of(ancestral_t) / sigma_of(t);
        let moved = lincomb(&[(f64::from(ratio), sample), (-f64::from((t - ancestral_t).exp_m1()), x0)])?;
        Ok((moved, sigma_up))
    }
}

impl Scheduler for DpmSolverSdeScheduler {
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
        let mut timesteps = spaced_timesteps(c.timestep_spacing, c.num_train_timesteps, steps, c.steps_offset);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp_index(t, &self.train_sigmas)).collect();
        let logs = log_sigmas(&self.train_sigmas);
        if c.use_karras_sigmas.unwrap_or(false) {
            sigmas = karras_sigmas(sigmas[sigmas.len() - 1], sigmas[0], steps, 7.0);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs)).collect();
        }
        // The model sees the log-sigma midpoints between consecutive levels (numpy, f64).
        let mids: Vec<f64> = sigmas
            .windows(2)
            .map(|w| {
                let (t0, t1) = (-w[0].ln(), -w[1].ln());
                sigma_to_t((-(t0 + (t1 - t0) * 0.5)).exp(), &logs)
            })
            .collect();
        let mut ts = Vec::with_capacity(2 * steps - 1);
        let mut ss = Vec::with_capacity(2 * steps);
        for k in 0..steps {
            if k > 0 {
                ts.push(mids[k - 1]);
                ss.push(f32r(sigmas[k]));
            }
            ts.push(timesteps[k]);
            ss.push(f32r(sigmas[k]));
        }
        ss.push(0.0);
        self.timesteps = ts;
        self.sigmas = ss;
        self.step_index = 0;
        self.pending = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    /// `2n` noise levels for the `2n - 1` model calls (diffusers' table; a midpoint call sees
    /// the midpoint sigma, not its entry here).
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
    fn init_noise_sigma(&self) -> f64 {
        sigma_init_noise(&self.sigmas, self.config.timestep_spacing)
    }
    fn step_index(&self) -> usize {
        self.step_index
    }

    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        if self.step_index >= self.timesteps.len() {
            return Err(Error::invalid(format!("{CLASS}: no step left to scale the input for")));
        }
        let sigma = match &self.pending {
            None => self.sigmas[self.step_index] as f32,
            Some(mid) => mid.sigma_mid,
        };
        Ok((sample / f64::from((sigma * sigma + 1.0).sqrt()))?)
    }

    /// Every call but the last (the Euler step to 0) draws once.
    fn noise_steps(&self) -> Vec<usize> {
        (0..self.timesteps.len().saturating_sub(1)).collect()
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let i = self.step_index;
        check_step_inputs(CLASS, model_output, sample, i, self.timesteps.len())?;
        let sample32 = sample.to_dtype(DType::F32)?;
        let prev = match self.pending.take() {
            None => {
                let (sigma, sigma_next) = (self.sigmas[i] as f32, self.sigmas[i + 1] as f32);
                let x0 = self.predict_x0(model_output, &sample32, sigma)?;
                if sigma_next == 0.0 {
                    // The last call: Euler to sigma 0.
                    let derivative = ((&sample32 - x0)? / f64::from(sigma))?;
                    (&sample32 + (derivative * f64::from(-sigma))?)?
                } else {
                    let t = t_of(sigma);
                    let sigma_mid = sigma_of(t + (t_of(sigma_next) - t) * 0.5);
                    let (moved, sigma_up) = self.ancestral(&sample32, &x0, sigma, sigma_mid)?;
                    let n1 = noise.sample(sample32.dims(), sample32.device())?.to_dtype(DType::F32)?;
                    let prev = (moved + (&n1 * f64::from(sigma_up))?)?;
                    self.pending = Some(Midpoint { sample: sample32, sigma_mid, n1 });
                    prev
                }
            }
            Some(mid) => {
                let (sigma, sigma_next) = (self.sigmas[i - 1] as f32, self.sigmas[i] as f32);
                let x0 = self.predict_x0(model_output, &sample32, mid.sigma_mid)?;
                let sigma_to = sigma_of(t_of(sigma_next));
                let (moved, sigma_up) = self.ancestral(&mid.sample, &x0, sigma, sigma_to)?;
                // The Brownian increment over [sigma_next, sigma] contains the first half's.
                let z = noise.sample(sample32.dims(), sample32.device())?.to_dtype(DType::F32)?;
                let from = f64::from(sigma_of(t_of(sigma)));
                let (d1, d2) = (from - f64::from(mid.sigma_mid), from - f64::from(sigma_to));
                let n2 = lincomb(&[((d1 / d2).sqrt(), &mid.n1), (((d2 - d1) / d2).sqrt(), &z)])?;
                (moved + (n2 * f64::from(sigma_up))?)?
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
    use candle_core::Device;

    fn sd15() -> DpmSolverSdeScheduler {
        DpmSolverSdeScheduler::from_value(serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "steps_offset": 1, "timestep_spacing": "leading"
        }))
        .unwrap()
    }

    #[test]
    fn schedule_interleaves_midpoints() {
        let mut s = sd15();
        s.set_timesteps(3).unwrap();
        let ts = s.timesteps();
        assert_eq!(ts.len(), 5);
        assert_eq!((ts[0], ts[2], ts[4]), (667.0, 334.0, 1.0));
        assert!(ts[0] > ts[1] && ts[1] > ts[2] && ts[2] > ts[3] && ts[3] > ts[4], "{ts:?}");
        assert_eq!(s.sigmas().unwrap().len(), 6);
        assert_eq!(s.noise_steps(), vec![0, 1, 2, 3]);
    }

    /// Two draws per step whose combination has the Brownian law: with n1 = z, the second
    /// half's noise is a unit-variance mix, so zero noise in gives the deterministic path.
    #[test]
    fn draws_once_per_call_but_the_last() {
        struct Counting(usize);
        impl NoiseSource for Counting {
            fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
                self.0 += 1;
                Ok(Tensor::zeros(shape, DType::F32, device)?)
            }
        }
        let mut s = sd15();
        s.set_timesteps(3).unwrap();
        let mut x = Tensor::ones((1, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let mut noise = Counting(0);
        for _ in 0..s.timesteps().len() {
            let input = s.scale_model_input(&x).unwrap();
            x = s.step(&(input * 0.1).unwrap(), &x, &mut noise).unwrap();
        }
        assert_eq!(noise.0, 4);
        assert!(s.step(&x, &x, &mut noise).is_err());
    }

    #[test]
    fn rejects_unsupported() {
        for (k, v) in [("use_exponential_sigmas", serde_json::json!(true)), ("prediction_type", "sample".into())] {
            let err = DpmSolverSdeScheduler::from_value(serde_json::json!({ k: v })).err().unwrap().to_string();
            assert!(err.contains(k), "{k}: {err}");
        }
    }
}
