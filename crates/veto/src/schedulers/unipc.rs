//! diffusers' `UniPCMultistepScheduler` (Zhao et al. 2023) in its common SD / SDXL setting:
//! the data-prediction (`predict_x0`) UniP predictor with the `bh2` coefficients, and the UniC
//! corrector, which refines each new sample with the model output computed at it before the
//! next prediction (so it costs no extra model call). Order 2 multistep by default, first
//! order on the first step and (`lower_order_final`) on the last.
//!
//! Supported: `solver_order` 1 or 2, `solver_type` `bh2` (diffusers also maps `midpoint`,
//! `heun` and `logrho` to it), `disable_corrector`, linspace/leading/trailing spacing,
//! `final_sigmas_type`, zero-SNR rescaling, Karras sigmas (`use_karras_sigmas`, A1111's "UniPC
//! Karras"), epsilon / v_prediction / sample, and Wan's flow setting: `use_flow_sigmas` with
//! `prediction_type: "flow_prediction"` and `flow_shift` (noise levels `sigma` with
//! `alpha = 1 - sigma`; the data prediction is `x - sigma v`). Not supported (error):
//! `predict_x0: false`, `bh1`, orders above 2, `lower_order_final: false`, thresholding,
//! `solver_p`, exponential / beta sigmas, dynamic shifting, `shift_terminal`.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::discrete::{
    arange_desc, bad, check_steps, f32r, interp_index, karras_sigmas, linspace_f64, log_sigmas, reject_if,
    round_half_even, sigma_to_t, train_sigmas, BetaConfig, BetaSchedule, FinalSigmas, PredictionType, TimestepSpacing,
};
use super::dpm_solver_multistep::prediction_or_flow;
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::Result;

const CLASS: &str = "UniPCMultistepScheduler";

/// `scheduler_config.json` of a `UniPCMultistepScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UniPcConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    #[serde(deserialize_with = "prediction_or_flow")]
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub predict_x0: bool,
    pub solver_type: String,
    pub lower_order_final: bool,
    pub disable_corrector: Vec<usize>,
    pub solver_p: Option<serde_json::Value>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    /// With `use_flow_sigmas`: `s' = shift s / (1 + (shift - 1) s)` (Wan: 3 at 480p, 5 at 720p).
    pub flow_shift: f64,
    pub shift_terminal: Option<f64>,
    pub use_dynamic_shifting: Option<bool>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub final_sigmas_type: FinalSigmas,
    pub rescale_betas_zero_snr: bool,
}

impl Default for UniPcConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            predict_x0: true,
            solver_type: "bh2".to_string(),
            lower_order_final: true,
            disable_corrector: Vec::new(),
            solver_p: None,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            use_flow_sigmas: Some(false),
            flow_shift: 1.0,
            shift_terminal: None,
            use_dynamic_shifting: Some(false),
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            final_sigmas_type: FinalSigmas::Zero,
            rescale_betas_zero_snr: false,
        }
    }
}

/// `(alpha, sigma, lambda)` of one noise level, in f32 as torch computes them.
#[derive(Debug, Clone, Copy)]
struct Level {
    alpha: f32,
    sigma: f32,
    lambda: f32,
}

/// The level of noise `s`: VP (`alpha = 1 / sqrt(s^2 + 1)`, `sigma = s alpha`), or with flow
/// sigmas the straight path (`alpha = 1 - s`, `sigma = s`).
fn level(s: f64, flow: bool) -> Level {
    let s = s as f32;
    let (alpha, sigma) = if flow {
        (1.0 - s, s)
    } else {
        let alpha = 1.0 / (s * s + 1.0).sqrt();
        (alpha, s * alpha)
    };
    Level { alpha, sigma, lambda: alpha.ln() - sigma.ln() }
}

/// The `bh2` quantities of a step of log-SNR length `h` (data prediction: `hh = -h`):
/// `(h_phi_1, B_h, b)` with `b` the right-hand side of the order conditions, `order` long.
fn bh2(h: f32, order: usize) -> (f32, f32, Vec<f32>) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1u32;
    let mut b = Vec::with_capacity(order);
    for i in 1..=order as u32 {
        b.push(h_phi_k * factorial as f32 / b_h);
        factorial *= i + 1;
        h_phi_k = h_phi_k / hh - (1.0 / f64::from(factorial)) as f32;
    }
    (h_phi_1, b_h, b)
}

#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler {
    config: UniPcConfig,
    train_sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    /// `n + 1` noise levels (f32 values), the last the final one.
    sigmas: Vec<f64>,
    step_index: usize,
    /// The last `solver_order` converted model outputs (data predictions), oldest first.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
    /// The order of the last predictor step (the next corrector uses it).
    this_order: usize,
    /// The sample the last predictor step started from (f32).
    last_sample: Option<Tensor>,
}

impl UniPcMultistepScheduler {
    pub fn new(config: UniPcConfig) -> Result<Self> {
        reject_if(!config.predict_x0, "predict_x0: false", CLASS)?;
        reject_if(config.thresholding, "thresholding", CLASS)?;
        reject_if(config.solver_p.as_ref().is_some_and(|v| !v.is_null()), "solver_p", CLASS)?;
        reject_if(config.use_exponential_sigmas.unwrap_or(false), "use_exponential_sigmas", CLASS)?;
        reject_if(config.use_beta_sigmas.unwrap_or(false), "use_beta_sigmas", CLASS)?;
        let flow = config.use_flow_sigmas.unwrap_or(false);
        if flow != (config.prediction_type == PredictionType::Flow) {
            return Err(bad(format!(
                "{CLASS}: use_flow_sigmas and prediction_type \"flow_prediction\" go together (Wan's configs set both)"
            )));
        }
        reject_if(flow && config.use_karras_sigmas.unwrap_or(false), "use_flow_sigmas with use_karras_sigmas", CLASS)?;
        reject_if(config.shift_terminal.is_some(), "shift_terminal", CLASS)?;
        if flow && !(config.flow_shift.is_finite() && config.flow_shift > 0.0) {
            return Err(bad(format!("{CLASS}: flow_shift must be positive, got {}", config.flow_shift)));
        }
        reject_if(config.use_dynamic_shifting.unwrap_or(false), "use_dynamic_shifting", CLASS)?;
        reject_if(!config.lower_order_final, "lower_order_final: false", CLASS)?;
        match config.solver_type.as_str() {
            // diffusers turns the DPM-Solver names into bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => {}
            "bh1" => reject_if(true, "solver_type bh1", CLASS)?,
            other => return Err(bad(format!("{CLASS}: unknown solver_type \"{other}\""))),
        }
        if !(1..=2).contains(&config.solver_order) {
            return Err(bad(format!("{CLASS}: solver_order must be 1 or 2, got {}", config.solver_order)));
        }
        let ac = BetaConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.clone(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        }
        .alphas_cumprod(true)?;
        Ok(Self {
            train_sigmas: train_sigmas(&ac),
            config,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: 0,
            outputs: Vec::new(),
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
        })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }

    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    fn flow(&self) -> bool {
        self.config.use_flow_sigmas.unwrap_or(false)
    }

    fn level(&self, s: f64) -> Level {
        level(s, self.flow())
    }

    fn reset(&mut self) {
        self.step_index = 0;
        self.outputs.clear();
        self.lower_order_nums = 0;
        self.this_order = 0;
        self.last_sample = None;
    }

    /// The data prediction of the model output at the current step.
    fn convert(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let l = self.level(self.sigmas[self.step_index]);
        let (a, s) = (f64::from(l.alpha), f64::from(l.sigma));
        match self.config.prediction_type {
            PredictionType::Epsilon => Ok((lincomb(&[(1.0, sample), (-s, model_output)])? / a)?),
            PredictionType::VPrediction => lincomb(&[(a, sample), (-s, model_output)]),
            PredictionType::Sample => lincomb(&[(1.0, model_output)]),
            // x0 = x - sigma v, sigma the f32 schedule value.
            PredictionType::Flow => lincomb(&[(1.0, sample), (-self.sigmas[self.step_index], model_output)]),
        }
    }

    /// `outputs[-1 - back]`.
    fn m(&self, back: usize) -> &Tensor {
        &self.outputs[self.outputs.len() - 1 - back]
    }

    /// UniP: from `x` at sigma index `i` to `i + 1`, with the last `order` outputs.
    fn predictor(&self, x: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let (t, s0) = (self.level(self.sigmas[i + 1]), self.level(self.sigmas[i]));
        let h = t.lambda - s0.lambda;
        let (h_phi_1, b_h, _) = bh2(h, order);
        let m0 = self.m(0);
        let x_t_ = lincomb(&[(f64::from(t.sigma / s0.sigma), x), (-f64::from(t.alpha * h_phi_1), m0)])?;
        if order < 2 {
            return Ok(x_t_);
        }
        // Order 2: rhos_p = [0.5].
        let rk = (self.level(self.sigmas[i - 1]).lambda - s0.lambda) / h;
        let d1 = ((self.m(1) - m0)? / f64::from(rk))?;
        let pred_res = (d1 * 0.5)?;
        Ok((x_t_ - (pred_res * f64::from(t.alpha * b_h))?)?)
    }

    /// UniC: correct `this_sample` (at sigma index `i`), predicted from `last_sample` (at
    /// `i - 1`) with order `order`, using `model_t`, the converted output at `this_sample`.
    fn corrector(&self, model_t: &Tensor, last_sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.step_index;
        let (t, s0) = (self.level(self.sigmas[i]), self.level(self.sigmas[i - 1]));
        let h = t.lambda - s0.lambda;
        let (h_phi_1, b_h, b) = bh2(h, order);
        let m0 = self.m(0);
        let x_t_ = lincomb(&[(f64::from(t.sigma / s0.sigma), last_sample), (-f64::from(t.alpha * h_phi_1), m0)])?;
        let d1_t = (model_t - m0)?;
        let res = if order < 2 {
            // rhos_c = [0.5]
            (d1_t * 0.5)?
        } else {
            let rk = (self.level(self.sigmas[i - 2]).lambda - s0.lambda) / h;
            let d1 = ((self.m(1) - m0)? / f64::from(rk))?;
            // Solve [[1, 1], [rk, 1]] rho = b (torch.linalg.solve in f32; here exact, rounded).
            let (rk64, b0, b1) = (f64::from(rk), f64::from(b[0]), f64::from(b[1]));
            let rho0 = (b0 - b1) / (1.0 - rk64);
            let rho1 = b0 - rho0;
            ((d1 * f64::from(rho0 as f32))? + (d1_t * f64::from(rho1 as f32))?)?
        };
        Ok((x_t_ - (res * f64::from(t.alpha * b_h))?)?)
    }
}

impl Scheduler for UniPcMultistepScheduler {
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
        let timesteps: Vec<f64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> =
                    linspace_f64(0.0, (n_train - 1) as f64, steps + 1).into_iter().map(round_half_even).collect();
                v.reverse();
                v.truncate(steps);
                v
            }
            TimestepSpacing::Leading => {
                let ratio = n_train / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio + c.steps_offset) as f64).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                arange_desc(n_train as f64, ratio).into_iter().map(|t| round_half_even(t) - 1.0).collect()
            }
        };
        let (timesteps, mut sigmas) = if c.use_flow_sigmas.unwrap_or(false) {
            // diffusers: sigmas = linspace(1, 1/N, steps + 1) without the last, shifted, the
            // first nudged below 1 (log(alpha) would be -inf); timesteps sigma N cast to int64.
            let n = n_train as f64;
            let shift = c.flow_shift;
            let mut sig: Vec<f64> = linspace_f64(1.0, 1.0 / n, steps + 1)
                .into_iter()
                .take(steps)
                .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
                .collect();
            if (sig[0] - 1.0).abs() < 1e-6 {
                sig[0] -= 1e-6;
            }
            let timesteps = sig.iter().map(|&s| (s * n).trunc()).collect();
            (timesteps, sig.into_iter().map(f32r).collect::<Vec<f64>>())
        } else if c.use_karras_sigmas.unwrap_or(false) {
            // Karras' rho-7 ramp between the training schedule's extremes; the timesteps are
            // the (rounded) training steps of those sigmas, the spacing is not used.
            let logs = log_sigmas(&self.train_sigmas);
            let karras = karras_sigmas(self.train_sigmas[0], self.train_sigmas[n_train - 1], steps, 7.0);
            let timesteps = karras.iter().map(|&s| round_half_even(sigma_to_t(s, &logs))).collect();
            (timesteps, karras.into_iter().map(f32r).collect::<Vec<f64>>())
        } else {
            let sigmas = timesteps.iter().map(|&t| f32r(interp_index(t, &self.train_sigmas))).collect();
            (timesteps, sigmas)
        };
        let last = match (c.final_sigmas_type, c.use_karras_sigmas.unwrap_or(false)) {
            (FinalSigmas::Zero, _) => 0.0,
            // With Karras sigmas diffusers ends on the ramp's own minimum.
            (FinalSigmas::SigmaMin, true) => *sigmas.last().expect("steps >= 1"),
            (FinalSigmas::SigmaMin, false) => self.train_sigmas[0],
        };
        sigmas.push(last);
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
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
        let i = self.step_index;
        check_step_inputs(CLASS, model_output, sample, i, n)?;
        let order = self.config.solver_order;
        let sample32 = sample.to_dtype(DType::F32)?;
        let converted = self.convert(model_output, &sample32)?;
        let sample32 = match self.last_sample.take() {
            Some(last) if i > 0 && !self.config.disable_corrector.contains(&(i - 1)) => {
                self.corrector(&converted, &last, self.this_order)?
            }
            _ => sample32,
        };
        self.outputs.push(converted);
        if self.outputs.len() > order {
            self.outputs.remove(0);
        }
        // lower_order_final (always on): the last steps use no more history than is left.
        self.this_order = order.min(n - i).min(self.lower_order_nums + 1);
        let prev = self.predictor(&sample32, self.this_order)?;
        self.last_sample = Some(sample32);
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        if self.step_index == n {
            self.last_sample = None;
        }
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn clone_box(&self) -> Box<dyn Scheduler> {
        let mut fresh = self.clone();
        fresh.reset();
        Box::new(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> serde_json::Value {
        serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "steps_offset": 1, "timestep_spacing": "leading"
        })
    }

    #[test]
    fn schedules() {
        let mut s = UniPcMultistepScheduler::from_value(sd15()).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0]);
        assert_eq!(s.sigmas().unwrap().len(), 5);
        s.config.timestep_spacing = TimestepSpacing::Linspace;
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 749.0, 500.0, 250.0]);
    }

    #[test]
    fn bh2_coefficients() {
        // b_1 = ((e^-h - 1) / -h - 1) / (e^-h - 1), which tends to 1/2 as h -> 0.
        let (_, _, b) = bh2(1e-2, 2);
        assert!((b[0] - 0.5).abs() < 1e-2, "{b:?}");
    }

    #[test]
    fn rejects_unsupported() {
        for (k, v) in [
            ("predict_x0", serde_json::json!(false)),
            ("solver_type", serde_json::json!("bh1")),
            ("solver_order", serde_json::json!(3)),
            ("lower_order_final", serde_json::json!(false)),
            ("use_flow_sigmas", serde_json::json!(true)),
            ("prediction_type", serde_json::json!("flow_prediction")),
            ("shift_terminal", serde_json::json!(0.1)),
            ("use_exponential_sigmas", serde_json::json!(true)),
            ("thresholding", serde_json::json!(true)),
        ] {
            let mut j = sd15();
            j[k] = v;
            let err = UniPcMultistepScheduler::from_value(j).err().unwrap_or_else(|| panic!("{k} accepted"));
            assert!(err.to_string().contains(k), "{k}: {err}");
        }
    }
}
