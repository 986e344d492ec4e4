//! diffusers' `PNDMScheduler` with `skip_prk_steps` (the stock Stable Diffusion 1.x scheduler):
//! pseudo linear multistep (PLMS). The schedule repeats the second timestep, so `n` steps make
//! `n + 1` model calls: the first step is an Euler-like step, the second averages the two first
//! predictions from the first sample (a Heun-like correction), later ones extrapolate the last
//! 2, 3 or 4 predictions (Adams-Bashforth). The Runge-Kutta warm-up (`skip_prk_steps: false`)
//! is not implemented and is refused.

use candle_core::Tensor;
use serde::Deserialize;

use super::discrete::{
    check_steps, linspace_f64, reject_if, round_half_even, spaced_timesteps, BetaConfig, BetaSchedule, PredictionType,
    TimestepSpacing,
};
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "PNDMScheduler";

/// `scheduler_config.json` of a `PNDMScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct PndmConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub skip_prk_steps: bool,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
}

impl Default for PndmConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PndmScheduler {
    config: PndmConfig,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    /// The model-call schedule (`n + 1` entries, the second repeated).
    timesteps: Vec<f64>,
    /// `num_train_timesteps / n`: how far each step goes back.
    stride: i64,
    step_index: usize,
    /// The last (up to 4) model outputs.
    ets: Vec<Tensor>,
    /// The first sample, kept for the correction of the second call.
    first_sample: Option<Tensor>,
}

impl PndmScheduler {
    pub fn new(config: PndmConfig) -> Result<Self> {
        if !config.skip_prk_steps {
            return Err(Error::invalid(format!(
                "{CLASS}: skip_prk_steps = false (the Runge-Kutta warm-up) is not supported; the Stable \
                 Diffusion configs set it to true"
            )));
        }
        reject_if(config.prediction_type == PredictionType::Sample, "prediction_type \"sample\"", CLASS)?;
        let alphas_cumprod = BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.clone(),
            rescale_betas_zero_snr: false,
        }
        .alphas_cumprod(false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            stride: 0,
            step_index: 0,
            ets: Vec::new(),
            first_sample: None,
        })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }

    /// `alphas_cumprod` at `t`, or the final one below 0 (float32, as diffusers' table).
    fn alpha(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize] as f32
        } else {
            self.final_alpha_cumprod as f32
        }
    }

    /// DDIM-like move of `sample` from `t` to `prev_t` with the (combined) prediction `eps`,
    /// in float32 as diffusers' `_get_prev_sample`.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, output: &Tensor) -> Result<Tensor> {
        let (a, a_prev) = (self.alpha(t), self.alpha(prev_t));
        let (b, b_prev) = (1.0 - a, 1.0 - a_prev);
        let eps = match self.config.prediction_type {
            PredictionType::Epsilon => output.clone(),
            PredictionType::VPrediction => lincomb(&[(f64::from(a.sqrt()), output), (f64::from(b.sqrt()), sample)])?,
            other => return Err(Error::invalid(format!("{CLASS}: prediction_type {other:?} is not supported"))),
        };
        let sample_coeff = (a_prev / a).sqrt();
        let denom = a * b_prev.sqrt() + (a * b * a_prev).sqrt();
        lincomb(&[(f64::from(sample_coeff), sample), (f64::from(-(a_prev - a) / denom), &eps)])
    }
}

impl Scheduler for PndmScheduler {
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
        // Ascending integer timesteps, as diffusers' `_timesteps`.
        let mut ts: Vec<f64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                linspace_f64(0.0, (c.num_train_timesteps - 1) as f64, steps).into_iter().map(round_half_even).collect()
            }
            spacing => {
                let mut v = spaced_timesteps(spacing, c.num_train_timesteps, steps, c.steps_offset);
                v.reverse();
                v
            }
        };
        if let Some(t) = ts.iter().find(|&&t| t >= c.num_train_timesteps as f64 || t < 0.0) {
            return Err(Error::invalid(format!("{CLASS}: timestep {t} is outside the training range")));
        }
        // PLMS: [t0 .. t(n-2), t(n-2), t(n-1)], descending.
        if ts.len() >= 2 {
            let second_last = ts[ts.len() - 2];
            ts.insert(ts.len() - 1, second_last);
        }
        ts.reverse();
        self.timesteps = ts;
        self.stride = (c.num_train_timesteps / steps) as i64;
        self.step_index = 0;
        self.ets.clear();
        self.first_sample = None;
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

    fn step(&mut self, model_output: &Tensor, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let n = self.timesteps.len();
        check_step_inputs(CLASS, model_output, sample, self.step_index, n)?;
        let counter = self.step_index;
        let mut t = self.timesteps[counter] as i64;
        let mut prev_t = t - self.stride;
        let (output, from) = if counter == 1 {
            // The repeated timestep: correct the first step with the average of both outputs.
            prev_t = t;
            t += self.stride;
            let first = self.first_sample.take().ok_or_else(|| Error::other("PNDM: the first sample is missing"))?;
            let e0 = &self.ets[self.ets.len() - 1];
            (lincomb(&[(0.5, model_output), (0.5, e0)])?, first)
        } else {
            if self.ets.len() == 4 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.to_dtype(candle_core::DType::F32)?);
            let e = &self.ets;
            let k = e.len();
            let combined = match k {
                1 => {
                    self.first_sample = Some(sample.clone());
                    e[0].clone()
                }
                2 => lincomb(&[(1.5, &e[1]), (-0.5, &e[0])])?,
                3 => lincomb(&[(23.0 / 12.0, &e[2]), (-16.0 / 12.0, &e[1]), (5.0 / 12.0, &e[0])])?,
                _ => {
                    lincomb(&[(55.0 / 24.0, &e[3]), (-59.0 / 24.0, &e[2]), (37.0 / 24.0, &e[1]), (-9.0 / 24.0, &e[0])])?
                }
            };
            (combined, sample.clone())
        };
        let prev = self.prev_sample(&from, t, prev_t, &output)?;
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
    fn plms_schedule_repeats_the_second_timestep() {
        let sd15 = serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "skip_prk_steps": true, "steps_offset": 1, "set_alpha_to_one": false
        });
        let mut s = PndmScheduler::from_value(sd15).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
        assert!(PndmScheduler::from_value(serde_json::json!({"skip_prk_steps": false})).is_err());
    }
}
