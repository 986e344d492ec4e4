//! diffusers' `DPMSolverMultistepScheduler` (DPM-Solver++ 2M by default, the usual SD1.5 /
//! SDXL sampler at 20-30 steps) and the multistep update it shares with the EDM variant.
//!
//! Every step converts the model output to a data prediction (`dpmsolver++`) or a noise
//! prediction (`dpmsolver`), keeps the last `solver_order` of them, and takes a first, second
//! or third order step in log-SNR `lambda = ln(alpha / sigma)`. The first steps, and the last
//! ones of short schedules (`lower_order_final`), fall back to lower orders as diffusers does.
//!
//! Supported: `dpmsolver++`, `dpmsolver`, `sde-dpmsolver++` (noise from the [`NoiseSource`]),
//! orders 1-3, midpoint/heun, Karras sigmas, every timestep spacing, `lambda_min_clipped`,
//! `final_sigmas_type`, epsilon / v_prediction / sample, and flow matching (`use_flow_sigmas`
//! with `flow_shift` and `flow_prediction`, dpmsolver++ only: SANA's scheduler). Not supported
//! (error): thresholding, learned variance, Lu lambdas, exponential / beta sigmas,
//! `sde-dpmsolver`.

use candle_core::Tensor;
use serde::Deserialize;

use super::discrete::{
    bad, check_steps, karras_sigmas, reject_if, round_half_even, sigma_to_t, train_sigmas, BetaConfig, BetaSchedule,
    FinalSigmas, PredictionType, TimestepSpacing,
};
use super::scheduler::{check_step_inputs, lincomb, parse_config, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS: &str = "DPMSolverMultistepScheduler";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Algorithm {
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SolverType {
    #[serde(rename = "midpoint")]
    Midpoint,
    #[serde(rename = "heun")]
    Heun,
}

/// `scheduler_config.json` of a `DPMSolverMultistepScheduler`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DpmSolverMultistepConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub solver_order: usize,
    #[serde(deserialize_with = "prediction_or_flow")]
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub algorithm_type: Algorithm,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    /// With `use_flow_sigmas`: the shift `s' = shift s / (1 + (shift - 1) s)` (SANA: 3).
    pub flow_shift: f64,
    pub final_sigmas_type: FinalSigmas,
    #[serde(deserialize_with = "super::scheduler::non_finite_f64")]
    pub lambda_min_clipped: f64,
    pub variance_type: Option<String>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

/// `prediction_type`, where this scheduler (unlike the other discrete ones) also takes
/// `"flow_prediction"` (with `use_flow_sigmas`).
pub(crate) fn prediction_or_flow<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<PredictionType, D::Error> {
    let name = String::deserialize(d)?;
    if name == "flow_prediction" {
        return Ok(PredictionType::Flow);
    }
    serde_json::from_value(serde_json::Value::String(name)).map_err(serde::de::Error::custom)
}

impl Default for DpmSolverMultistepConfig {
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
            algorithm_type: Algorithm::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            use_lu_lambdas: Some(false),
            use_flow_sigmas: Some(false),
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmas::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// The solver settings and history shared by the VP and EDM multistep schedulers.
#[derive(Debug, Clone)]
pub(crate) struct Multistep {
    pub order: usize,
    pub algorithm: Algorithm,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub final_sigma_zero: bool,
    /// The last `order` converted model outputs, oldest first.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

/// `(alpha, sigma)` of one noise level, in f32 as torch computes them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Level {
    pub alpha: f32,
    pub sigma: f32,
}

impl Level {
    fn lambda(self) -> f32 {
        self.alpha.ln() - self.sigma.ln()
    }
}

impl Multistep {
    pub fn new(
        order: usize,
        algorithm: Algorithm,
        solver_type: SolverType,
        lower_order_final: bool,
        euler_at_final: bool,
        final_sigma_zero: bool,
    ) -> Self {
        Self {
            order,
            algorithm,
            solver_type,
            lower_order_final,
            euler_at_final,
            final_sigma_zero,
            outputs: Vec::new(),
            lower_order_nums: 0,
        }
    }

    pub fn reset(&mut self) {
        self.outputs.clear();
        self.lower_order_nums = 0;
    }

    fn is_data_prediction(&self) -> bool {
        matches!(self.algorithm, Algorithm::DpmSolverPlusPlus | Algorithm::SdeDpmSolverPlusPlus)
    }

    /// Whether each step draws noise (the SDE variants).
    pub(crate) fn is_sde(&self) -> bool {
        matches!(self.algorithm, Algorithm::SdeDpmSolverPlusPlus | Algorithm::SdeDpmSolver)
    }

    /// One step at `index` of `n`, with the converted model output `converted`.
    /// `levels(k)` gives the level of sigma index `k` (`index + 1` is the target).
    pub fn step(
        &mut self,
        converted: Tensor,
        sample: &Tensor,
        index: usize,
        n: usize,
        levels: &dyn Fn(usize) -> Level,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let short = self.lower_order_final && n < 15;
        let lower_final = index + 1 == n && (self.euler_at_final || short || self.final_sigma_zero);
        let lower_second = index + 2 == n && short;
        self.outputs.push(converted);
        if self.outputs.len() > self.order {
            self.outputs.remove(0);
        }
        let z = if self.is_sde() { Some(noise.sample(sample.dims(), sample.device())?) } else { None };
        let sample = lincomb(&[(1.0, sample)])?;
        let prev = if self.order == 1 || self.lower_order_nums < 1 || lower_final {
            self.first_order(&sample, index, levels, z.as_ref())?
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_second {
            self.second_order(&sample, index, levels, z.as_ref())?
        } else {
            self.third_order(&sample, index, levels)?
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }

    fn m(&self, back: usize) -> Tensor {
        self.outputs[self.outputs.len() - 1 - back].clone()
    }

    fn first_order(&self, x: &Tensor, i: usize, levels: &dyn Fn(usize) -> Level, z: Option<&Tensor>) -> Result<Tensor> {
        let (t, s) = (levels(i + 1), levels(i));
        let h = t.lambda() - s.lambda();
        let m0 = self.m(0);
        let f = |v: f32| f64::from(v);
        match self.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                lincomb(&[(f(t.sigma / s.sigma), x), (f(-(t.alpha * ((-h).exp() - 1.0))), &m0)])
            }
            Algorithm::DpmSolver => lincomb(&[(f(t.alpha / s.alpha), x), (f(-(t.sigma * (h.exp() - 1.0))), &m0)]),
            Algorithm::SdeDpmSolverPlusPlus => lincomb(&[
                (f(t.sigma / s.sigma * (-h).exp()), x),
                (f(t.alpha * (1.0 - (-2.0 * h).exp())), &m0),
                (f(t.sigma * (1.0 - (-2.0 * h).exp()).sqrt()), z.expect("sde noise")),
            ]),
            Algorithm::SdeDpmSolver => unreachable!("rejected at construction"),
        }
    }

    fn second_order(
        &self,
        x: &Tensor,
        i: usize,
        levels: &dyn Fn(usize) -> Level,
        z: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (t, s0, s1) = (levels(i + 1), levels(i), levels(i - 1));
        let (lt, l0, l1) = (t.lambda(), s0.lambda(), s1.lambda());
        let (h, h0) = (lt - l0, l0 - l1);
        let r0 = h0 / h;
        let (m0, m1) = (self.m(0), self.m(1));
        let d0 = m0.clone();
        let d1 = lincomb(&[(f64::from(1.0 / r0), &m0), (f64::from(-1.0 / r0), &m1)])?;
        let f = |v: f32| f64::from(v);
        let em = (-h).exp() - 1.0;
        let ep = h.exp() - 1.0;
        match (self.algorithm, self.solver_type) {
            (Algorithm::DpmSolverPlusPlus, SolverType::Midpoint) => {
                lincomb(&[(f(t.sigma / s0.sigma), x), (f(-(t.alpha * em)), &d0), (f(-0.5 * (t.alpha * em)), &d1)])
            }
            (Algorithm::DpmSolverPlusPlus, SolverType::Heun) => {
                lincomb(&[(f(t.sigma / s0.sigma), x), (f(-(t.alpha * em)), &d0), (f(t.alpha * (em / h + 1.0)), &d1)])
            }
            (Algorithm::DpmSolver, SolverType::Midpoint) => {
                lincomb(&[(f(t.alpha / s0.alpha), x), (f(-(t.sigma * ep)), &d0), (f(-0.5 * (t.sigma * ep)), &d1)])
            }
            (Algorithm::DpmSolver, SolverType::Heun) => {
                lincomb(&[(f(t.alpha / s0.alpha), x), (f(-(t.sigma * ep)), &d0), (f(-(t.sigma * (ep / h - 1.0))), &d1)])
            }
            (Algorithm::SdeDpmSolverPlusPlus, st) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let c1 = match st {
                    SolverType::Midpoint => 0.5 * (t.alpha * e2),
                    SolverType::Heun => t.alpha * (e2 / (-2.0 * h) + 1.0),
                };
                lincomb(&[
                    (f(t.sigma / s0.sigma * (-h).exp()), x),
                    (f(t.alpha * e2), &d0),
                    (f(c1), &d1),
                    (f(t.sigma * e2.sqrt()), z.expect("sde noise")),
                ])
            }
            (Algorithm::SdeDpmSolver, _) => unreachable!("rejected at construction"),
        }
    }

    fn third_order(&self, x: &Tensor, i: usize, levels: &dyn Fn(usize) -> Level) -> Result<Tensor> {
        let (t, s0, s1, s2) = (levels(i + 1), levels(i), levels(i - 1), levels(i - 2));
        let (lt, l0, l1, l2) = (t.lambda(), s0.lambda(), s1.lambda(), s2.lambda());
        let (h, h0, h1) = (lt - l0, l0 - l1, l1 - l2);
        let (r0, r1) = (h0 / h, h1 / h);
        let (m0, m1, m2) = (self.m(0), self.m(1), self.m(2));
        let f = |v: f32| f64::from(v);
        let d1_0 = lincomb(&[(f(1.0 / r0), &m0), (f(-1.0 / r0), &m1)])?;
        let d1_1 = lincomb(&[(f(1.0 / r1), &m1), (f(-1.0 / r1), &m2)])?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + (&diff * f(r0 / (r0 + r1)))?)?;
        let d2 = (&diff * f(1.0 / (r0 + r1)))?;
        match self.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                let em = (-h).exp() - 1.0;
                lincomb(&[
                    (f(t.sigma / s0.sigma), x),
                    (f(-(t.alpha * em)), &m0),
                    (f(t.alpha * (em / h + 1.0)), &d1),
                    (f(-(t.alpha * ((em + h) / (h * h) - 0.5))), &d2),
                ])
            }
            Algorithm::DpmSolver => {
                let ep = h.exp() - 1.0;
                lincomb(&[
                    (f(t.alpha / s0.alpha), x),
                    (f(-(t.sigma * ep)), &m0),
                    (f(-(t.sigma * (ep / h - 1.0))), &d1),
                    (f(-(t.sigma * ((ep - h) / (h * h) - 0.5))), &d2),
                ])
            }
            // SDE solvers are capped at order 2 at construction.
            _ => Err(Error::other("third-order SDE DPM-Solver step is not supported")),
        }
    }

    /// Convert the raw model output to what the solver integrates (data or noise prediction).
    pub fn convert(
        &self,
        prediction: PredictionType,
        level: Level,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (a, s) = (f64::from(level.alpha), f64::from(level.sigma));
        if self.is_data_prediction() {
            match prediction {
                PredictionType::Epsilon => Ok((lincomb(&[(1.0, sample), (-s, model_output)])? / a)?),
                PredictionType::Sample => lincomb(&[(1.0, model_output)]),
                PredictionType::VPrediction => lincomb(&[(a, sample), (-s, model_output)]),
                PredictionType::Flow => Err(super::discrete::flow_unsupported(CLASS)),
            }
        } else {
            match prediction {
                PredictionType::Epsilon => lincomb(&[(1.0, model_output)]),
                PredictionType::Sample => Ok((lincomb(&[(1.0, sample), (-a, model_output)])? / s)?),
                PredictionType::VPrediction => lincomb(&[(a, model_output), (s, sample)]),
                PredictionType::Flow => Err(super::discrete::flow_unsupported(CLASS)),
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverMultistepConfig,
    train_sigmas: Vec<f64>,
    last_timestep: usize,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    step_index: usize,
    solver: Multistep,
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: DpmSolverMultistepConfig) -> Result<Self> {
        reject_if(config.thresholding, "thresholding", CLASS)?;
        reject_if(config.use_exponential_sigmas.unwrap_or(false), "use_exponential_sigmas", CLASS)?;
        reject_if(config.use_beta_sigmas.unwrap_or(false), "use_beta_sigmas", CLASS)?;
        reject_if(config.use_lu_lambdas.unwrap_or(false), "use_lu_lambdas", CLASS)?;
        let flow = config.use_flow_sigmas.unwrap_or(false);
        if flow != (config.prediction_type == PredictionType::Flow) {
            return Err(bad(format!(
                "{CLASS}: use_flow_sigmas and prediction_type \"flow_prediction\" go together (SANA's configs set both)"
            )));
        }
        reject_if(
            flow && config.algorithm_type != Algorithm::DpmSolverPlusPlus,
            "flow sigmas with algorithm_type other than dpmsolver++",
            CLASS,
        )?;
        reject_if(flow && config.use_karras_sigmas.unwrap_or(false), "use_flow_sigmas with use_karras_sigmas", CLASS)?;
        if flow && (config.flow_shift.is_nan() || config.flow_shift <= 0.0) {
            return Err(bad(format!("{CLASS}: flow_shift must be positive, got {}", config.flow_shift)));
        }
        reject_if(
            matches!(config.variance_type.as_deref(), Some("learned") | Some("learned_range")),
            "variance_type (learned)",
            CLASS,
        )?;
        reject_if(config.algorithm_type == Algorithm::SdeDpmSolver, "algorithm_type sde-dpmsolver", CLASS)?;
        if !(1..=3).contains(&config.solver_order) {
            return Err(bad(format!("{CLASS}: solver_order must be 1, 2 or 3, got {}", config.solver_order)));
        }
        if config.algorithm_type == Algorithm::SdeDpmSolverPlusPlus && config.solver_order == 3 {
            return Err(bad(format!("{CLASS}: sde-dpmsolver++ with solver_order 3 is not supported")));
        }
        if config.algorithm_type == Algorithm::DpmSolver && config.final_sigmas_type == FinalSigmas::Zero {
            return Err(bad(format!(
                "{CLASS}: final_sigmas_type \"zero\" needs algorithm_type dpmsolver++ or sde-dpmsolver++ (as in diffusers)"
            )));
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
        // lambda_t (f32), decreasing in t; clipped_idx = how many of the flipped (increasing)
        // values are below lambda_min_clipped.
        let clipped = ac
            .iter()
            .filter(|&&a| {
                let a = a as f32;
                let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                f64::from(lambda) < config.lambda_min_clipped
            })
            .count();
        let last_timestep = config.num_train_timesteps - clipped;
        let solver = Multistep::new(
            config.solver_order,
            config.algorithm_type,
            config.solver_type,
            config.lower_order_final,
            config.euler_at_final,
            config.final_sigmas_type == FinalSigmas::Zero,
        );
        Ok(Self {
            train_sigmas: train_sigmas(&ac),
            config,
            last_timestep,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: 0,
            solver,
        })
    }

    pub fn from_value(json: serde_json::Value) -> Result<Self> {
        Self::new(parse_config(json, CLASS)?)
    }

    pub fn config(&self) -> &DpmSolverMultistepConfig {
        &self.config
    }

    fn flow(&self) -> bool {
        self.config.use_flow_sigmas.unwrap_or(false)
    }

    fn level(&self, k: usize) -> Level {
        let s = self.sigmas[k] as f32;
        if self.flow() {
            // Flow matching: x_t = (1 - s) x_0 + s noise.
            return Level { alpha: 1.0 - s, sigma: s };
        }
        let alpha = 1.0 / (s * s + 1.0).sqrt();
        Level { alpha, sigma: s * alpha }
    }

    fn finish(&mut self, timesteps: Vec<f64>, mut sigmas: Vec<f64>) {
        sigmas.push(match self.config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.train_sigmas[0],
        });
        self.sigmas = sigmas.into_iter().map(super::discrete::f32r).collect();
        self.timesteps = timesteps;
        self.step_index = 0;
        self.solver.reset();
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
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
        let last = self.last_timestep;
        let mut timesteps: Vec<f64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = super::discrete::linspace_f64(0.0, (last - 1) as f64, steps + 1)
                    .into_iter()
                    .map(round_half_even)
                    .collect();
                v.reverse();
                v.truncate(steps);
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio + c.steps_offset) as f64).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = c.num_train_timesteps as f64 / steps as f64;
                super::discrete::arange_desc(last as f64, ratio).into_iter().map(|t| round_half_even(t) - 1.0).collect()
            }
        };
        let sigmas: Vec<f64> = if c.use_flow_sigmas.unwrap_or(false) {
            // diffusers: alphas = linspace(1, 1/N, steps + 1), sigmas = 1 - alphas, shifted,
            // flipped, the last (0) dropped; the timesteps are sigma N cast to int64.
            let n = c.num_train_timesteps as f64;
            let shift = c.flow_shift;
            let mut sig: Vec<f64> = super::discrete::linspace_f64(1.0, 1.0 / n, steps + 1)
                .into_iter()
                .map(|a| {
                    let s = 1.0 - a;
                    shift * s / (1.0 + (shift - 1.0) * s)
                })
                .collect();
            sig.reverse();
            sig.truncate(steps);
            timesteps = sig.iter().map(|&s| (s * n).trunc()).collect();
            sig
        } else if c.use_karras_sigmas.unwrap_or(false) {
            let logs: Vec<f64> = super::discrete::log_sigmas(&self.train_sigmas);
            let n = self.train_sigmas.len();
            let sig = karras_sigmas(self.train_sigmas[0], self.train_sigmas[n - 1], steps, 7.0);
            timesteps = sig
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &logs);
                    if c.beta_schedule == BetaSchedule::SquaredcosCapV2 {
                        t.floor()
                    } else {
                        round_half_even(t)
                    }
                })
                .collect();
            sig
        } else {
            timesteps.iter().map(|&t| super::discrete::interp_index(t, &self.train_sigmas)).collect()
        };
        // diffusers casts the timesteps to int64 (truncating Karras' fractional ones for the
        // cosine schedule).
        self.finish(timesteps, sigmas);
        Ok(())
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        if self.flow() {
            return Err(Error::invalid(format!("{CLASS}: custom timesteps do not combine with flow sigmas")));
        }
        if self.config.use_karras_sigmas.unwrap_or(false) {
            return Err(Error::invalid(format!("{CLASS}: custom timesteps do not combine with Karras sigmas")));
        }
        super::discrete::check_custom_timesteps(timesteps, self.config.num_train_timesteps, CLASS)?;
        let sigmas = timesteps.iter().map(|&t| super::discrete::interp_index(t, &self.train_sigmas)).collect();
        self.finish(timesteps.to_vec(), sigmas);
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
        check_step_inputs(CLASS, model_output, sample, i, n)?;
        let converted = if self.flow() {
            // dpmsolver++ on a flow prediction: x0 = x - sigma v (checked at construction).
            lincomb(&[(1.0, sample), (-f64::from(self.level(i).sigma), model_output)])?
        } else {
            self.solver.convert(self.config.prediction_type, self.level(i), model_output, sample)?
        };
        let table: Vec<Level> = (0..=n).map(|k| self.level(k)).collect();
        let prev = self.solver.step(converted, sample, i, n, &|k| table[k], noise)?;
        self.step_index += 1;
        Ok(prev.to_dtype(model_output.dtype())?)
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
    fn sd15_style_schedule() {
        let mut s = DpmSolverMultistepScheduler::from_value(serde_json::json!({
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "steps_offset": 1, "timestep_spacing": "leading"
        }))
        .unwrap();
        s.set_timesteps(4).unwrap();
        // last // (n + 1) = 200: [800, 600, 400, 200] + 1
        assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0]);
        s.config.timestep_spacing = TimestepSpacing::Linspace;
        s.set_timesteps(4).unwrap();
        // linspace(0, 999, 5).round()[::-1][:-1]
        assert_eq!(s.timesteps(), &[999.0, 749.0, 500.0, 250.0]);
    }

    #[test]
    fn rejects_unsupported() {
        for (k, v) in [
            ("thresholding", serde_json::json!(true)),
            ("use_lu_lambdas", serde_json::json!(true)),
            ("algorithm_type", serde_json::json!("sde-dpmsolver")),
            ("solver_order", serde_json::json!(4)),
            ("use_flow_sigmas", serde_json::json!(true)),
            ("prediction_type", serde_json::json!("flow_prediction")),
        ] {
            let mut j = serde_json::json!({});
            j[k] = v;
            assert!(DpmSolverMultistepScheduler::from_value(j).is_err(), "{k}");
        }
    }
}
