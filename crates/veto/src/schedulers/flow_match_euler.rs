//! Flow-matching Euler scheduler, diffusers' `FlowMatchEulerDiscreteScheduler` as its
//! `FluxPipeline` and `StableDiffusion3Pipeline` drive it, behind the [`Scheduler`] trait.
//!
//! The two pipelines build different schedules ([`SigmaSource`]): Flux passes
//! `sigmas = linspace(1, 1/n, n)`, SD3 passes none and the scheduler spaces timesteps between
//! its own shifted training extremes. Either way the sigmas are shifted (statically with
//! `shift`, or dynamically with a resolution-dependent `mu`), a terminal sigma is appended and
//! the sampler steps with plain Euler: `x' = x + (sigma' - sigma) * v`.
//!
//! diffusers does this arithmetic in float32 (numpy float32 arrays, torch float32 tensors), so
//! every schedule value here is computed in `f32` with the same order of operations and only
//! then widened to `f64`: the schedule is bit-for-bit the one diffusers produces, which keeps
//! comparisons against reference images meaningful.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::discrete::PredictionType;
use super::scheduler::{check_step_inputs, NoiseSource, Scheduler};
use crate::error::{Error, Result};

const CLASS_NAME: &str = "FlowMatchEulerDiscreteScheduler";

/// The contents of `scheduler_config.json`. Every field is optional; missing ones take the
/// defaults of diffusers' constructor. Unknown keys (`_diffusers_version`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    /// diffusers allows `null` here; it is only needed with dynamic shifting.
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub invert_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub time_shift_type: String,
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: "exponential".to_string(),
            stochastic_sampling: false,
        }
    }
}

/// How sigmas are shifted; decided once from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Shift {
    /// `shift * s / (1 + (shift - 1) * s)`.
    Static(f64),
    /// Resolution dependent: `mu` interpolated between the base and max shift by sequence length.
    Dynamic { kind: TimeShift, base_shift: f64, max_shift: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum TimeShift {
    /// `e^mu / (e^mu + (1/s - 1))`
    Exponential,
    /// `mu / (mu + (1/s - 1))`
    Linear,
}

/// The sigmas and timesteps for one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// `steps + 1` noise levels, from the first (near 1) down to the terminal one (0, or 1 with
    /// `invert_sigmas`). Step `i` goes from `sigmas[i]` to `sigmas[i + 1]`.
    pub sigmas: Vec<f64>,
    /// `steps` timesteps on the training scale (0..num_train_timesteps); Flux's transformer is
    /// fed `timesteps[i] / 1000`.
    pub timesteps: Vec<f64>,
}

/// Which sigmas `set_timesteps` starts from: what the pipeline passes diffusers'
/// `set_timesteps`. Set once at load by the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SigmaSource {
    /// `FluxPipeline`: `sigmas = linspace(1, 1/n, n)` (see [`FlowMatchEulerScheduler::timesteps_for`]).
    PipelineLinspace,
    /// `StableDiffusion3Pipeline` (and diffusers' default): no sigmas passed (see [`sd3_sigmas`]).
    #[default]
    SchedulerDefault,
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` (deterministic Euler).
#[derive(Debug, Clone)]
pub struct FlowMatchEulerScheduler {
    config: FlowMatchEulerConfig,
    shift: Shift,
    sigma_source: SigmaSource,
    /// From [`Scheduler::set_image_seq_len`]; dynamic shifting cannot schedule without it.
    image_seq_len: Option<usize>,
    /// The current generation's schedule (empty before `set_timesteps`).
    schedule: Schedule,
    step_index: usize,
}

impl FlowMatchEulerScheduler {
    /// Reads and validates `scheduler_config.json`.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::MissingFile {
            what: format!("cannot read scheduler config ({e})"),
            path: path.display().to_string(),
        })?;
        Self::from_json(&text).map_err(|e| match e {
            // Re-attribute config problems to the file they came from.
            Error::BadModelFile { reason, .. } => Error::BadModelFile { path: path.display().to_string(), reason },
            other => other,
        })
    }

    /// Parses and validates the JSON text of a scheduler config.
    pub fn from_json(json: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let config = match serde_json::from_value::<FlowMatchEulerConfig>(value.clone()) {
            Ok(config) => config,
            Err(e) => {
                // serde's message does not say which key is wrong; find it by retrying each
                // key alone (all fields are optional, so only the bad one fails).
                let culprit = value.as_object().and_then(|map| {
                    map.iter().map(|(k, v)| (k, v.clone())).find(|(k, v)| {
                        let single = serde_json::Value::Object([((*k).clone(), v.clone())].into_iter().collect());
                        serde_json::from_value::<FlowMatchEulerConfig>(single).is_err()
                    })
                });
                return Err(bad(match culprit {
                    Some((key, _)) => format!("field {key:?}: {e}"),
                    None => e.to_string(),
                }));
            }
        };
        Self::new(config)
    }

    /// Validates a config. Options diffusers supports but this port does not are rejected
    /// instead of ignored, because ignoring them would silently change the images.
    pub fn new(config: FlowMatchEulerConfig) -> Result<Self> {
        match config.class_name.as_deref() {
            Some(CLASS_NAME) => {}
            Some(other) => return Err(bad(format!("_class_name is {other:?}, expected {CLASS_NAME:?}"))),
            None => return Err(bad(format!("missing _class_name (expected {CLASS_NAME:?})"))),
        }
        if config.num_train_timesteps == 0 {
            return Err(bad("num_train_timesteps must be positive"));
        }
        for (flag, name) in [
            (config.use_karras_sigmas, "use_karras_sigmas"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
            (config.stochastic_sampling, "stochastic_sampling"),
        ] {
            if flag {
                return Err(bad(format!("{name}=true is not supported by this scheduler")));
            }
        }
        let kind = match config.time_shift_type.as_str() {
            "exponential" => TimeShift::Exponential,
            "linear" => TimeShift::Linear,
            other => {
                return Err(bad(format!(
                    "time_shift_type {other:?} is not supported (expected \"exponential\" or \"linear\")"
                )))
            }
        };
        if let Some(t) = config.shift_terminal {
            // diffusers skips stretching when shift_terminal is 0 (falsy); 1 would divide by zero.
            if !t.is_finite() || t >= 1.0 {
                return Err(bad(format!("shift_terminal must be below 1, got {t}")));
            }
        }
        let shift = if config.use_dynamic_shifting {
            let (Some(base_shift), Some(max_shift)) = (config.base_shift, config.max_shift) else {
                return Err(bad("use_dynamic_shifting needs base_shift and max_shift"));
            };
            if config.base_image_seq_len == config.max_image_seq_len {
                return Err(bad("base_image_seq_len and max_image_seq_len must differ for dynamic shifting"));
            }
            Shift::Dynamic { kind, base_shift, max_shift }
        } else {
            if !config.shift.is_finite() || config.shift <= 0.0 {
                return Err(bad(format!("shift must be positive, got {}", config.shift)));
            }
            Shift::Static(config.shift)
        };
        Ok(Self {
            config,
            shift,
            sigma_source: SigmaSource::default(),
            image_seq_len: None,
            schedule: Schedule { sigmas: Vec::new(), timesteps: Vec::new() },
            step_index: 0,
        })
    }

    pub fn config(&self) -> &FlowMatchEulerConfig {
        &self.config
    }

    /// The same scheduler building its schedules from `source`.
    pub fn with_sigma_source(mut self, source: SigmaSource) -> Self {
        self.sigma_source = source;
        self
    }

    pub fn sigma_source(&self) -> SigmaSource {
        self.sigma_source
    }

    /// The schedule [`Scheduler::set_timesteps`] builds, per the [`SigmaSource`].
    fn schedule_for(&self, steps: usize) -> Result<Schedule> {
        let seq_len = match (self.shift, self.image_seq_len) {
            (Shift::Static(_), len) => len.unwrap_or(0),
            (Shift::Dynamic { .. }, Some(len)) => len,
            (Shift::Dynamic { .. }, None) => {
                return Err(Error::invalid(format!(
                    "{CLASS_NAME}: dynamic shifting needs set_image_seq_len before set_timesteps"
                )))
            }
        };
        match self.sigma_source {
            SigmaSource::PipelineLinspace => self.timesteps_for(steps, seq_len),
            SigmaSource::SchedulerDefault => {
                // sd3_sigmas has no inverted variant (no pipeline using it inverts).
                if self.config.invert_sigmas {
                    return Err(Error::invalid(format!(
                        "{CLASS_NAME}: invert_sigmas is not supported with the scheduler's default sigmas"
                    )));
                }
                let sigmas = sd3_sigmas(&self.config, self.mu(seq_len), steps)?;
                // diffusers: timesteps = sigmas * num_train_timesteps in f32.
                let n_train = self.config.num_train_timesteps as f32;
                let timesteps = sigmas[..steps].iter().map(|&s| f64::from(s as f32 * n_train)).collect();
                Ok(Schedule { sigmas, timesteps })
            }
        }
    }

    /// diffusers' `calculate_shift` from the Flux pipeline: `mu` is linear in the image sequence
    /// length (number of 2x2 latent patches), through (base_len, base_shift) and
    /// (max_len, max_shift). `None` when the config uses a static shift.
    pub fn mu(&self, image_seq_len: usize) -> Option<f64> {
        match self.shift {
            Shift::Static(_) => None,
            Shift::Dynamic { base_shift, max_shift, .. } => Some(calculate_shift(
                image_seq_len,
                self.config.base_image_seq_len,
                self.config.max_image_seq_len,
                base_shift,
                max_shift,
            )),
        }
    }

    /// The schedule FluxPipeline builds for `steps` steps at a given image sequence length
    /// (`(height / 16) * (width / 16)` for Flux). `image_seq_len` only matters with dynamic
    /// shifting.
    pub fn timesteps_for(&self, steps: usize, image_seq_len: usize) -> Result<Schedule> {
        if steps == 0 {
            return Err(Error::invalid("the number of inference steps must be at least 1"));
        }
        // FluxPipeline: np.linspace(1.0, 1 / n, n) in float64, then cast to float32 by
        // set_timesteps.
        let base: Vec<f32> = linspace(1.0, 1.0 / steps as f64, steps).into_iter().map(|s| s as f32).collect();

        let mut sigmas: Vec<f32> = match self.shift {
            Shift::Static(shift) => {
                // `shift * s / (1 + (shift - 1) * s)`, python floats meeting float32 arrays.
                let a = shift as f32;
                let b = (shift - 1.0) as f32;
                base.iter().map(|&s| a * s / (1.0 + b * s)).collect()
            }
            Shift::Dynamic { kind, .. } => {
                let mu = self.mu(image_seq_len).expect("dynamic shift has mu");
                // time_shift(mu, sigma=1.0, t): the `** 1.0` is the identity.
                let num = match kind {
                    TimeShift::Exponential => mu.exp() as f32,
                    TimeShift::Linear => mu as f32,
                };
                base.iter().map(|&s| num / (num + (1.0 / s - 1.0))).collect()
            }
        };

        if let Some(terminal) = self.config.shift_terminal.filter(|&t| t != 0.0) {
            // stretch_shift_to_terminal: rescale 1 - s so that the last sigma lands on
            // shift_terminal.
            let last = 1.0 - *sigmas.last().expect("steps >= 1");
            let scale = last / (1.0 - terminal) as f32;
            for s in &mut sigmas {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }

        let n_train = self.config.num_train_timesteps as f32;
        let terminal = if self.config.invert_sigmas {
            // Mochi-style: denoise along 1 - sigma; the schedule ends at 1.
            for s in &mut sigmas {
                *s = 1.0 - *s;
            }
            1.0
        } else {
            0.0
        };
        let timesteps = sigmas.iter().map(|&s| (s * n_train) as f64).collect();
        let sigmas = sigmas.iter().copied().chain(std::iter::once(terminal)).map(f64::from).collect();
        Ok(Schedule { sigmas, timesteps })
    }

    /// One Euler step from `sigma` to `sigma_next`: `sample + (sigma_next - sigma) * model_output`.
    ///
    /// Mirrors diffusers' dtype handling exactly: `dt` is a float32 scalar; `dt * model_output`
    /// takes the model output's dtype (torch does not promote a tensor by a 0-d one, so for
    /// bf16 both `dt` and the product are rounded to bf16); the sum is done in float32 (the
    /// sample is upcast) and the result is cast back to the model output's dtype.
    pub fn euler_step(&self, model_output: &Tensor, sigma: f64, sigma_next: f64, sample: &Tensor) -> Result<Tensor> {
        if model_output.shape() != sample.shape() {
            return Err(Error::invalid(format!(
                "scheduler step: model output shape {:?} differs from sample shape {:?}",
                model_output.dims(),
                sample.dims()
            )));
        }
        if !sigma.is_finite() || !sigma_next.is_finite() {
            return Err(Error::invalid(format!("scheduler step: sigmas must be finite, got {sigma} -> {sigma_next}")));
        }
        let out_dtype = model_output.dtype();
        if !out_dtype.is_float() {
            return Err(Error::invalid(format!(
                "scheduler step: model output must be a float tensor, got {out_dtype:?}"
            )));
        }
        let dt = sigma_next as f32 - sigma as f32;
        let update = model_output.affine(f64::from(dt), 0.0)?.to_dtype(DType::F32)?;
        let next = (sample.to_dtype(DType::F32)? + update)?;
        Ok(next.to_dtype(out_dtype)?)
    }
}

impl Scheduler for FlowMatchEulerScheduler {
    fn class_name(&self) -> &'static str {
        CLASS_NAME
    }
    fn prediction_type(&self) -> PredictionType {
        PredictionType::Flow
    }
    fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }
    fn set_image_seq_len(&mut self, len: usize) {
        self.image_seq_len = Some(len);
    }
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.schedule = self.schedule_for(steps)?;
        self.step_index = 0;
        Ok(())
    }
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.schedule.sigmas)
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
    /// Deterministic: `noise` is never asked. Keeps the model output's dtype ([`Self::euler_step`]).
    fn step(&mut self, model_output: &Tensor, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let i = self.step_index;
        check_step_inputs(CLASS_NAME, model_output, sample, i, self.schedule.timesteps.len())?;
        let next = self.euler_step(model_output, self.schedule.sigmas[i], self.schedule.sigmas[i + 1], sample)?;
        self.step_index += 1;
        Ok(next)
    }
    /// The timestep itself (0..=num_train_timesteps); Flux's transformer sees it / 1000.
    fn window_time(&self, i: usize) -> f64 {
        self.schedule.timesteps[i]
    }
    fn clone_box(&self) -> Box<dyn Scheduler> {
        Box::new(self.clone())
    }
}

/// The `steps + 1` sigmas diffusers' `FlowMatchEulerDiscreteScheduler` builds when the
/// pipeline passes no sigmas (`StableDiffusion3Pipeline`): the scheduler's construction shifts
/// its 1000 training sigmas (f32) and keeps the extremes; `set_timesteps` then spaces `t`
/// linearly between them (f64), divides by 1000 and shifts *again* (static `shift`, or the
/// time shift with `mu`), optionally stretches to `shift_terminal`, rounds to f32 and appends
/// 0. `mu` is only used with dynamic shifting.
pub fn sd3_sigmas(config: &FlowMatchEulerConfig, mu: Option<f64>, steps: usize) -> Result<Vec<f64>> {
    if steps == 0 {
        return Err(Error::invalid("the number of inference steps must be at least 1"));
    }
    let n_train = config.num_train_timesteps;
    let shift_f32 = |s: f32| -> f32 {
        let shift = config.shift as f32;
        shift * s / (1.0 + (config.shift - 1.0) as f32 * s)
    };
    // Construction: sigmas = linspace(1, n, n)[::-1] / n (f32), shifted unless dynamic.
    // Its first training sigma is n / n = 1 exactly, its last 1 / n in f32.
    let (first, last) = (1.0f32, 1.0f32 / n_train as f32);
    let (sigma_max, sigma_min) = if config.use_dynamic_shifting {
        (first as f64, last as f64)
    } else {
        (shift_f32(first) as f64, shift_f32(last) as f64)
    };
    let nt = n_train as f64;
    let raw: Vec<f64> = linspace(sigma_max * nt, sigma_min * nt, steps).into_iter().map(|t| t / nt).collect();
    let mut sigmas: Vec<f64> = if config.use_dynamic_shifting {
        let mu = mu.ok_or_else(|| Error::other("dynamic shifting needs mu"))?;
        let num = if config.time_shift_type == "linear" { mu } else { mu.exp() };
        raw.iter().map(|&s| num / (num + (1.0 / s - 1.0))).collect()
    } else {
        let s = config.shift;
        raw.iter().map(|&x| s * x / (1.0 + (s - 1.0) * x)).collect()
    };
    if let Some(terminal) = config.shift_terminal.filter(|&t| t != 0.0) {
        let one_minus_last = 1.0 - sigmas[steps - 1];
        let scale = one_minus_last / (1.0 - terminal);
        for s in &mut sigmas {
            *s = 1.0 - (1.0 - *s) / scale;
        }
    }
    Ok(sigmas.into_iter().map(|s| s as f32 as f64).chain(std::iter::once(0.0)).collect())
}

/// diffusers' `calculate_shift` (f64, same order of operations).
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// numpy's `linspace(start, stop, n)` with `endpoint=True`: `start + i * step`, last value
/// exactly `stop`, and `[start]` for `n == 1`.
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    (0..n).map(|i| if i == n - 1 { stop } else { i as f64 * step + start }).collect()
}

fn bad(reason: impl Into<String>) -> Error {
    Error::BadModelFile { path: "scheduler_config.json".to_string(), reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const SCHNELL: &str = r#"{
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
        "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
        "use_dynamic_shifting": false
    }"#;

    const DEV: &str = r#"{
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
        "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": true
    }"#;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn schnell_four_steps() {
        let s = FlowMatchEulerScheduler::from_json(SCHNELL).unwrap();
        let sch = s.timesteps_for(4, 4096).unwrap();
        assert_eq!(sch.timesteps, vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(sch.sigmas, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        // Static shift ignores the resolution.
        assert_eq!(s.timesteps_for(4, 256).unwrap(), sch);
        assert_eq!(s.mu(4096), None);
    }

    #[test]
    fn static_shift_formula() {
        let json = SCHNELL.replace("\"shift\": 1.0", "\"shift\": 3.0");
        let s = FlowMatchEulerScheduler::from_json(&json).unwrap();
        let sch = s.timesteps_for(4, 0).unwrap();
        for (i, &t) in sch.timesteps.iter().enumerate() {
            let x = 1.0 - 0.25 * i as f64;
            let want = 3.0 * x / (1.0 + 2.0 * x);
            assert!(close(sch.sigmas[i], want, 1e-6), "{i}: {} vs {want}", sch.sigmas[i]);
            assert!(close(t, want * 1000.0, 1e-3));
        }
    }

    #[test]
    fn dev_dynamic_shift_matches_formula() {
        let s = FlowMatchEulerScheduler::from_json(DEV).unwrap();
        for (seq, steps) in [(4096usize, 28usize), (1024, 20), (4096, 4)] {
            let sch = s.timesteps_for(steps, seq).unwrap();
            assert_eq!(sch.sigmas.len(), steps + 1);
            assert_eq!(sch.timesteps.len(), steps);
            assert_eq!(*sch.sigmas.last().unwrap(), 0.0);
            // Independent computation: mu by linear interpolation, then the exponential shift.
            let mu = 0.5 + (1.15 - 0.5) * (seq as f64 - 256.0) / (4096.0 - 256.0);
            assert!(close(s.mu(seq).unwrap(), mu, 1e-12));
            for i in 0..steps {
                let x = 1.0 - i as f64 * (1.0 - 1.0 / steps as f64) / (steps - 1) as f64;
                let want = mu.exp() / (mu.exp() + (1.0 / x - 1.0));
                assert!(close(sch.sigmas[i], want, 1e-6), "seq {seq} step {i}");
                assert!(close(sch.timesteps[i], want * 1000.0, 1e-3));
            }
            // Monotone decreasing.
            assert!(sch.sigmas.windows(2).all(|w| w[0] > w[1]));
        }
        assert!(close(s.mu(4096).unwrap(), 1.15, 1e-12));
        assert!(close(s.mu(256).unwrap(), 0.5, 1e-12));
    }

    #[test]
    fn dev_matches_diffusers_bit_for_bit() {
        // Reference values printed once by diffusers 0.42.1 (numpy 2.4.6, torch 2.15):
        //   s = FlowMatchEulerDiscreteScheduler.from_config(<DEV config>)
        //   s.set_timesteps(sigmas=np.linspace(1.0, 1/n, n), mu=calculate_shift(seq, ...))
        //   s.timesteps.tolist(), s.sigmas.tolist()
        let s = FlowMatchEulerScheduler::from_json(DEV).unwrap();
        let sch = s.timesteps_for(4, 4096).unwrap();
        assert_eq!(sch.timesteps, DIFFUSERS_DEV_4096_4_TIMESTEPS.to_vec());
        assert_eq!(sch.sigmas, DIFFUSERS_DEV_4096_4_SIGMAS.to_vec());
        let sch = s.timesteps_for(28, 1024).unwrap();
        assert_eq!(sch.timesteps[..4], DIFFUSERS_DEV_1024_28_TIMESTEPS_HEAD);
        assert_eq!(sch.timesteps[27], DIFFUSERS_DEV_1024_28_TIMESTEP_LAST);
    }

    const DIFFUSERS_DEV_4096_4_TIMESTEPS: [f64; 4] = [1000.0, 904.53076171875, 759.5109252929688, 512.8441162109375];
    const DIFFUSERS_DEV_4096_4_SIGMAS: [f64; 5] =
        [1.0, 0.9045307636260986, 0.7595109343528748, 0.5128441452980042, 0.0];
    const DIFFUSERS_DEV_1024_28_TIMESTEPS_HEAD: [f64; 4] =
        [1000.0, 980.6559448242188, 960.643798828125, 939.92822265625];
    const DIFFUSERS_DEV_1024_28_TIMESTEP_LAST: f64 = 65.01959991455078;

    #[test]
    fn static_shift_and_terminal_match_diffusers() {
        // diffusers 0.42.1: FlowMatchEulerDiscreteScheduler(shift=3.0), 7 steps; and
        // FlowMatchEulerDiscreteScheduler(shift=1.0, shift_terminal=0.1), 4 steps.
        let json = SCHNELL.replace("\"shift\": 1.0", "\"shift\": 3.0");
        let s = FlowMatchEulerScheduler::from_json(&json).unwrap();
        assert_eq!(
            s.timesteps_for(7, 0).unwrap().timesteps,
            vec![
                1000.0,
                947.368408203125,
                882.3529052734375,
                800.0000610351562,
                692.3076782226562,
                545.4546508789062,
                333.3333740234375
            ]
        );
        let json = SCHNELL.replace("\"shift\": 1.0", "\"shift\": 1.0, \"shift_terminal\": 0.1");
        let s = FlowMatchEulerScheduler::from_json(&json).unwrap();
        assert_eq!(
            s.timesteps_for(4, 0).unwrap().sigmas,
            vec![1.0, 0.7000000476837158, 0.40000003576278687, 0.10000002384185791, 0.0]
        );
    }

    #[test]
    fn one_step_schedule() {
        let s = FlowMatchEulerScheduler::from_json(SCHNELL).unwrap();
        let sch = s.timesteps_for(1, 4096).unwrap();
        assert_eq!(sch.timesteps, vec![1000.0]);
        assert_eq!(sch.sigmas, vec![1.0, 0.0]);
        let d = FlowMatchEulerScheduler::from_json(DEV).unwrap();
        assert_eq!(d.timesteps_for(1, 1024).unwrap().sigmas, vec![1.0, 0.0]);
    }

    #[test]
    fn zero_steps_is_an_error() {
        let s = FlowMatchEulerScheduler::from_json(SCHNELL).unwrap();
        let err = s.timesteps_for(0, 4096).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }

    #[test]
    fn shift_terminal_and_invert() {
        let json = SCHNELL.replace("\"shift\": 1.0", "\"shift\": 1.0, \"shift_terminal\": 0.1");
        let s = FlowMatchEulerScheduler::from_json(&json).unwrap();
        let sch = s.timesteps_for(4, 0).unwrap();
        assert!(close(sch.sigmas[0], 1.0, 1e-7));
        assert!(close(sch.sigmas[3], 0.1, 1e-6));
        // 1 - s is scaled by (1 - 0.1) / 0.75 = 1.2.
        assert!(close(sch.sigmas[1], 1.0 - 0.25 * 1.2, 1e-6));

        let json = SCHNELL.replace("\"shift\": 1.0", "\"shift\": 1.0, \"invert_sigmas\": true");
        let s = FlowMatchEulerScheduler::from_json(&json).unwrap();
        let sch = s.timesteps_for(4, 0).unwrap();
        assert_eq!(sch.sigmas, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(sch.timesteps, vec![0.0, 250.0, 500.0, 750.0]);
    }

    #[test]
    fn linear_time_shift() {
        let json = DEV.replace("\"shift\": 3.0", "\"shift\": 3.0, \"time_shift_type\": \"linear\"");
        let s = FlowMatchEulerScheduler::from_json(&json).unwrap();
        let sch = s.timesteps_for(4, 4096).unwrap();
        let x: f64 = 0.75;
        assert!(close(sch.sigmas[1], 1.15 / (1.15 + (1.0 / x - 1.0)), 1e-6));
    }

    #[test]
    fn defaults_and_unknown_keys() {
        let s = FlowMatchEulerScheduler::from_json(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift_terminal": null,
                "something_new": [1, 2]}"#,
        )
        .unwrap();
        let want = FlowMatchEulerConfig { class_name: Some(CLASS_NAME.to_string()), ..Default::default() };
        assert_eq!(s.config(), &want);
    }

    #[test]
    fn rejects_bad_configs() {
        let cases = [
            (r#"{"shift": 1.0}"#, "_class_name"),
            (r#"{"_class_name": "EulerDiscreteScheduler"}"#, "EulerDiscreteScheduler"),
            (r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": true}"#, "use_karras_sigmas"),
            (r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_beta_sigmas": true}"#, "use_beta_sigmas"),
            (
                r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_exponential_sigmas": true}"#,
                "use_exponential_sigmas",
            ),
            (
                r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": true}"#,
                "stochastic_sampling",
            ),
            (r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "time_shift_type": "cubic"}"#, "cubic"),
            (
                r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": true, "base_shift": null}"#,
                "base_shift",
            ),
            (r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": "x"}"#, "shift"),
            ("not json", "not valid JSON"),
            ("[1]", "expected"),
        ];
        for (json, needle) in cases {
            let err = FlowMatchEulerScheduler::from_json(json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
            assert!(err.contains("scheduler_config.json"), "{json}: {err}");
        }
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("veto-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("nope.json");
        let err = FlowMatchEulerScheduler::from_config_file(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.json"), "{err}");
        let bad_file = dir.join("bad_scheduler_config.json");
        std::fs::write(&bad_file, r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
        let err = FlowMatchEulerScheduler::from_config_file(&bad_file).unwrap_err().to_string();
        assert!(err.contains("bad_scheduler_config.json") && err.contains("DDIMScheduler"), "{err}");
        let good = dir.join("scheduler_config.json");
        std::fs::write(&good, DEV).unwrap();
        assert!(FlowMatchEulerScheduler::from_config_file(&good).is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn euler_step_f32() {
        let s = FlowMatchEulerScheduler::from_json(SCHNELL).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        let v = Tensor::new(&[4.0f32, 2.0, -1.0], &dev).unwrap();
        let y = s.euler_step(&v, 1.0, 0.75, &x).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.0, -2.5, 0.75]);
        // Last step to sigma 0: x - sigma * v is the predicted clean sample.
        let y = s.euler_step(&v, 0.25, 0.0, &x).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![0.0, -2.5, 0.75]);
    }

    #[test]
    fn euler_step_bf16_follows_torch_rounding() {
        // torch: dt (f32 0-d) * v (bf16) -> bf16 with dt rounded to bf16; sample upcast to f32;
        // result cast back to bf16.
        let s = FlowMatchEulerScheduler::from_json(SCHNELL).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::new(&[1.0f32, 0.3], &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let v = Tensor::new(&[1.0f32, 3.0], &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let (sigma, sigma_next) = (1.0, 0.7);
        let y = s.euler_step(&v, sigma, sigma_next, &x).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let dt = bf16_round(0.7f32 - 1.0f32);
        let want: Vec<f32> = [(1.0f32, 1.0f32), (0.3, 3.0)]
            .iter()
            .map(|&(xi, vi)| {
                let prod = bf16_round(bf16_round(vi) * dt);
                bf16_round(bf16_round(xi) + prod)
            })
            .collect();
        let got = y.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want);
    }

    /// Round an f32 to the nearest bf16 (ties to even), returned widened to f32.
    fn bf16_round(x: f32) -> f32 {
        let bits = x.to_bits();
        let rounded = bits + 0x7fff + ((bits >> 16) & 1);
        f32::from_bits(rounded & 0xffff_0000)
    }

    fn sd3_scheduler_config() -> FlowMatchEulerConfig {
        FlowMatchEulerConfig { class_name: Some(CLASS_NAME.into()), shift: 3.0, ..Default::default() }
    }

    #[test]
    fn schedule_matches_diffusers_sd3() {
        // The fixture's timesteps (tests/fixtures/sd3/README.md): 1000, 857.6923, 602.1506, 8.9286.
        let s = sd3_sigmas(&sd3_scheduler_config(), None, 4).unwrap();
        let t: Vec<f32> = s[..4].iter().map(|&x| x as f32 * 1000.0).collect();
        for (a, b) in t.iter().zip([1000.0f32, 857.6923, 602.1506, 8.9286]) {
            assert!((a - b).abs() < 1e-3, "{t:?}");
        }
        assert_eq!(s.len(), 5);
        assert_eq!(s[4], 0.0);
        assert_eq!(sd3_sigmas(&sd3_scheduler_config(), None, 1).unwrap(), vec![1.0, 0.0]);
        assert!(sd3_sigmas(&sd3_scheduler_config(), None, 0).is_err());
    }

    #[test]
    fn numpy_linspace_endpoints() {
        assert_eq!(linspace(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(linspace(3.0, 1.0, 1), vec![3.0]);
    }

    /// `set_image_seq_len` + `set_timesteps` through the trait object.
    fn trait_schedule(s: &FlowMatchEulerScheduler, steps: usize, seq: usize) -> Schedule {
        let mut b: Box<dyn Scheduler> = s.clone_box();
        b.set_image_seq_len(seq);
        b.set_timesteps(steps).unwrap();
        Schedule { sigmas: b.sigmas().unwrap().to_vec(), timesteps: b.timesteps().to_vec() }
    }

    #[test]
    fn trait_schedule_pipeline_linspace_is_timesteps_for() {
        let configs = [SCHNELL.to_string(), DEV.to_string(), SCHNELL.replace("\"shift\": 1.0", "\"shift\": 3.0")];
        for json in &configs {
            let s = FlowMatchEulerScheduler::from_json(json).unwrap().with_sigma_source(SigmaSource::PipelineLinspace);
            for (steps, seq) in [(1, 1024), (4, 4096), (28, 1024), (7, 256)] {
                let want = s.timesteps_for(steps, seq).unwrap();
                assert_eq!(trait_schedule(&s, steps, seq), want, "{json} {steps} {seq}");
            }
        }
        let s = FlowMatchEulerScheduler::from_json(DEV).unwrap().with_sigma_source(SigmaSource::PipelineLinspace);
        let sch = trait_schedule(&s, 4, 4096);
        assert_eq!(sch.timesteps, DIFFUSERS_DEV_4096_4_TIMESTEPS.to_vec());
        assert_eq!(sch.sigmas, DIFFUSERS_DEV_4096_4_SIGMAS.to_vec());
    }

    #[test]
    fn trait_schedule_scheduler_default_is_sd3_sigmas() {
        let dynamic =
            FlowMatchEulerConfig { use_dynamic_shifting: true, shift_terminal: Some(0.02), ..sd3_scheduler_config() };
        for config in [sd3_scheduler_config(), dynamic] {
            let s = FlowMatchEulerScheduler::new(config.clone()).unwrap();
            assert_eq!(s.sigma_source(), SigmaSource::SchedulerDefault);
            // (One step with shift_terminal divides by zero, in diffusers too.)
            for (steps, seq) in [(2, 1024), (4, 4096), (28, 1024)] {
                let sigmas = sd3_sigmas(&config, s.mu(seq), steps).unwrap();
                let sch = trait_schedule(&s, steps, seq);
                // The SD3 pipeline's timestep: sigma * num_train_timesteps in f32.
                let t: Vec<f64> = sigmas[..steps].iter().map(|&x| f64::from(x as f32 * 1000.0)).collect();
                assert_eq!(sch, Schedule { sigmas, timesteps: t });
            }
        }
    }

    #[test]
    fn trait_contract() {
        let mut s =
            FlowMatchEulerScheduler::from_json(SCHNELL).unwrap().with_sigma_source(SigmaSource::PipelineLinspace);
        assert_eq!(s.class_name(), "FlowMatchEulerDiscreteScheduler");
        assert_eq!(s.prediction_type(), PredictionType::Flow);
        assert_eq!((s.num_train_timesteps(), s.init_noise_sigma()), (1000, 1.0));
        let dev = Device::Cpu;
        let x = Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        let v = Tensor::new(&[4.0f32, 2.0, -1.0], &dev).unwrap();
        let mut none = crate::schedulers::scheduler::NoNoise;
        assert!(s.step(&v, &x, &mut none).is_err(), "step before set_timesteps");
        s.set_timesteps(4).unwrap();
        assert_eq!(s.window_time(1), 750.0);
        assert_eq!(s.scale_model_input(&x).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, -2.0, 0.5]);
        // Steps 1 -> 0.75 -> 0.5 ..., each the explicit Euler step; the noise source is unused.
        let mut y = x.clone();
        for i in 0..4 {
            assert_eq!(s.step_index(), i);
            let want = s.euler_step(&v, 1.0 - 0.25 * i as f64, 0.75 - 0.25 * i as f64, &y).unwrap();
            y = s.step(&v, &y, &mut none).unwrap();
            assert_eq!(y.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap());
        }
        assert!(s.step(&v, &y, &mut none).is_err(), "past the last step");
        // set_timesteps resets the step index.
        s.set_timesteps(2).unwrap();
        assert_eq!(s.step_index(), 0);
    }

    #[test]
    fn trait_schedule_errors() {
        // Dynamic shifting without the sequence length is an error, not a silent mu(0).
        let mut s = FlowMatchEulerScheduler::from_json(DEV).unwrap();
        let err = s.set_timesteps(4).unwrap_err().to_string();
        assert!(err.contains("set_image_seq_len"), "{err}");
        s.set_image_seq_len(4096);
        assert!(s.set_timesteps(0).is_err());
        let json = SCHNELL.replace("\"shift\": 1.0", "\"shift\": 1.0, \"invert_sigmas\": true");
        let mut s = FlowMatchEulerScheduler::from_json(&json).unwrap();
        assert!(s.set_timesteps(4).unwrap_err().to_string().contains("invert_sigmas"));
        let mut s = s.with_sigma_source(SigmaSource::PipelineLinspace);
        s.set_timesteps(4).unwrap();
        assert_eq!(s.sigmas().unwrap(), &[0.0, 0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn step_rejects_mismatched_shapes() {
        let s = FlowMatchEulerScheduler::from_json(SCHNELL).unwrap();
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let v = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        assert!(s.euler_step(&v, 1.0, 0.5, &x).is_err());
    }
}
