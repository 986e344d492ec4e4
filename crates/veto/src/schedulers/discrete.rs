//! What the discrete-time (DDPM-trained) schedulers share: the beta schedule and its
//! `alphas_cumprod`, timestep spacing, the sigma <-> timestep maps, and config helpers.
//!
//! diffusers builds these tables with float32 torch tensors (linspace, cumprod) and numpy; the
//! functions here reproduce those roundings (values are computed the same way and rounded to
//! f32, then kept as f64) so schedules match diffusers to the last bit or very nearly.

use serde::Deserialize;

use crate::error::{Error, Result};

/// `beta_schedule` of a scheduler config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// `timestep_spacing`: how `n` inference timesteps are picked out of the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    #[serde(rename = "linspace")]
    Linspace,
    #[serde(rename = "leading")]
    Leading,
    #[serde(rename = "trailing")]
    Trailing,
}

/// `prediction_type`: what the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// The clean sample itself (x0).
    #[serde(rename = "sample")]
    Sample,
    /// The flow-matching velocity `noise - x0` (Flux, SD3). Only the flow-matching scheduler
    /// reports it; the discrete schedulers' configs cannot name it.
    #[serde(skip_deserializing)]
    Flow,
}

/// The error of a discrete-time formula asked about [`PredictionType::Flow`] (unreachable
/// from a config: the variant is not deserialized).
pub(crate) fn flow_unsupported(what: &str) -> Error {
    Error::invalid(format!("{what} cannot take a flow-matching (velocity) model output"))
}

/// `final_sigmas_type`: the noise level after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FinalSigmas {
    #[serde(rename = "zero")]
    Zero,
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

/// The noise-schedule part of a discrete scheduler config.
#[derive(Debug, Clone, PartialEq)]
pub struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
}

/// torch.linspace in float32 on the CPU: the step is an f32, the first half counts up from
/// `start`, the second half down from `end`.
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - i - 1) as f32 }).collect()
}

/// numpy's `linspace(start, stop, n)` in f64 (endpoint included).
pub fn linspace_f64(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    (0..n).map(|i| if i == n - 1 { stop } else { start + i as f64 * step }).collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform (Nichol & Dhariwal).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, algorithm 1), in f32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let cumprod = cumprod_f32(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>());
    let mut sqrt: Vec<f32> = cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let factor = first / (first - last);
    for s in sqrt.iter_mut() {
        *s = (*s - last) * factor;
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    let mut alphas = vec![bar[0]];
    alphas.extend(bar.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// torch's CPU cumprod: accumulated in f64, each output rounded to f32.
fn cumprod_f32(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    xs.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

impl BetaConfig {
    /// The betas, as diffusers builds them (float32).
    pub fn betas(&self) -> Result<Vec<f32>> {
        let n = self.num_train_timesteps;
        if n < 2 {
            return Err(bad(format!("num_train_timesteps must be at least 2, got {n}")));
        }
        let betas = if let Some(trained) = &self.trained_betas {
            if trained.len() != n {
                return Err(bad(format!("trained_betas has {} entries, num_train_timesteps is {n}", trained.len())));
            }
            trained.iter().map(|&b| b as f32).collect()
        } else {
            match self.beta_schedule {
                BetaSchedule::Linear => linspace_f32(self.beta_start as f32, self.beta_end as f32, n),
                BetaSchedule::ScaledLinear => {
                    linspace_f32(self.beta_start.sqrt() as f32, self.beta_end.sqrt() as f32, n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => cosine_betas(n),
            }
        };
        if betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(bad("betas must lie in [0, 1)".to_string()));
        }
        Ok(if self.rescale_betas_zero_snr { rescale_zero_terminal_snr(&betas) } else { betas })
    }

    /// `alphas_cumprod[t]` for every training timestep (f32 values as f64). With zero-SNR
    /// rescaling the last entry would be exactly 0; `clamp_zero_snr` replaces it by 2^-24 as
    /// the Euler and DPM-Solver schedulers do (their sigmas would be infinite otherwise).
    pub fn alphas_cumprod(&self, clamp_zero_snr: bool) -> Result<Vec<f64>> {
        let betas = self.betas()?;
        let mut ac = cumprod_f32(&betas.iter().map(|b| 1.0 - b).collect::<Vec<_>>());
        if self.rescale_betas_zero_snr && clamp_zero_snr {
            let last = ac.len() - 1;
            ac[last] = 2f32.powi(-24);
        }
        Ok(ac.into_iter().map(f64::from).collect())
    }
}

/// The Karras noise levels of `alphas_cumprod`: `sqrt((1 - a) / a)` in f32, increasing with t.
pub fn train_sigmas(alphas_cumprod: &[f64]) -> Vec<f64> {
    alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32;
            f64::from(((1.0 - a) / a).sqrt())
        })
        .collect()
}

/// `np.log` of the (float32) training sigmas: the logs are float32 too, which decides on which
/// side of a table entry a Karras sigma falls in [`sigma_to_t`].
pub fn log_sigmas(train_sigmas: &[f64]) -> Vec<f64> {
    train_sigmas.iter().map(|&s| f64::from((s as f32).ln())).collect()
}

/// numpy's `interp(x, arange(len(ys)), ys)` (clamped at both ends).
pub fn interp_index(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    // numpy computes slope * (x - xp[i]) + fp[i]
    (ys[i + 1] - ys[i]) * frac + ys[i]
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, by linear
/// interpolation in log-sigma between the two neighbouring training sigmas.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx = (number of log_sigmas <= log_sigma) - 1, as argmax of the cumulative count,
    // clipped to len - 2.
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low_idx = if count == 0 {
        0
    } else {
        // argmax of cumsum returns the first index reaching the maximum count.
        let mut seen = 0;
        let mut idx = 0;
        for (i, &l) in log_sigmas.iter().enumerate() {
            if log_sigma - l >= 0.0 {
                seen += 1;
                if seen == count {
                    idx = i;
                    break;
                }
            }
        }
        idx
    }
    .min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// Karras et al. (2022) noise levels from `sigma_max` down to `sigma_min` (numpy, f64).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize, rho: f64) -> Vec<f64> {
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace_f64(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// Exponentially spaced noise levels from `sigma_max` down to `sigma_min` (numpy, f64).
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    linspace_f64(sigma_max.ln(), sigma_min.ln(), n).into_iter().map(f64::exp).collect()
}

/// `n` timesteps out of `num_train` by `spacing` (descending), as diffusers' Euler/DDIM do:
/// linspace over `[0, T-1]`, `leading` multiples of `T // n` plus `steps_offset`, `trailing`
/// rounded from `T` down by `T / n`, minus one.
pub fn spaced_timesteps(spacing: TimestepSpacing, num_train: usize, n: usize, steps_offset: usize) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut ts = linspace_f64(0.0, (num_train - 1) as f64, n);
            ts.reverse();
            ts
        }
        TimestepSpacing::Leading => {
            let ratio = num_train / n;
            (0..n).rev().map(|i| (i * ratio + steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            arange_desc(num_train as f64, ratio).into_iter().map(|t| round_half_even(t) - 1.0).collect()
        }
    }
}

/// The initial noise of a sampler in the Karras sigma parametrisation (Euler, Heun), as
/// diffusers: the largest sigma for linspace/trailing spacing, `sqrt(sigma^2 + 1)` for leading
/// (computed in f32).
pub fn sigma_init_noise(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().cloned().fold(0.0, f64::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => f64::from(((max as f32).powi(2) + 1.0).sqrt()),
    }
}

/// The model input at noise level `sigma` in that parametrisation: `x / sqrt(sigma^2 + 1)` (f32).
pub fn sigma_scaled_input(sample: &candle_core::Tensor, sigma: f64) -> Result<candle_core::Tensor> {
    let sigma = sigma as f32;
    Ok((sample / f64::from((sigma * sigma + 1.0).sqrt()))?)
}

/// numpy's `arange(start, 0, -step)`: `ceil(start / step)` values `start - i * step`.
pub fn arange_desc(start: f64, step: f64) -> Vec<f64> {
    let count = (start / step).ceil() as usize;
    (0..count).map(|i| start - i as f64 * step).collect()
}

/// numpy's `round`: halves to even.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Round to f32 and back: diffusers keeps its tables in float32.
pub fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// A config problem, attributed to `scheduler_config.json` (callers with the real path
/// replace it).
pub fn bad(reason: impl Into<String>) -> Error {
    Error::BadModelFile { path: "scheduler_config.json".to_string(), reason: reason.into() }
}

/// Reject `thresholding: true` and similar switches we do not implement, naming the key.
pub fn reject_if(flag: bool, key: &str, class: &str) -> Result<()> {
    if flag {
        Err(bad(format!("{class}: `{key}` is not supported")))
    } else {
        Ok(())
    }
}

/// Check `num_inference_steps` against the training timesteps.
pub fn check_steps(steps: usize, num_train: usize, class: &str) -> Result<()> {
    if steps == 0 {
        return Err(Error::invalid(format!("{class}: the number of steps must be at least 1")));
    }
    if steps > num_train {
        return Err(Error::invalid(format!("{class}: {steps} steps exceed the {num_train} training timesteps")));
    }
    Ok(())
}

/// Check custom timesteps: descending integers on the training range.
pub fn check_custom_timesteps(ts: &[f64], num_train: usize, class: &str) -> Result<Vec<usize>> {
    if ts.is_empty() {
        return Err(Error::invalid(format!("{class}: custom timesteps are empty")));
    }
    let mut out = Vec::with_capacity(ts.len());
    for (i, &t) in ts.iter().enumerate() {
        if t.fract() != 0.0 || t < 0.0 || t >= num_train as f64 {
            return Err(Error::invalid(format!("{class}: custom timestep {t} is not an integer in 0..{num_train}")));
        }
        if i > 0 && t >= ts[i - 1] {
            return Err(Error::invalid(format!("{class}: custom timesteps must be in descending order, got {ts:?}")));
        }
        out.push(t as usize);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_betas() -> BetaConfig {
        BetaConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }

    #[test]
    fn alphas_cumprod_matches_torch() {
        // torch 2.x: torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
        let ac = sd_betas().alphas_cumprod(false).unwrap();
        assert_eq!(ac[0] as f32, 0.99915f32);
        assert!((ac[999] - 0.004_660_095_088_183_88).abs() < 1e-12, "{}", ac[999]);
        let sigmas = train_sigmas(&ac);
        assert_eq!(sigmas[999], 14.614_646_911_621_094);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let mut c = sd_betas();
        c.rescale_betas_zero_snr = true;
        let ac = c.alphas_cumprod(false).unwrap();
        assert!(ac[999].abs() < 1e-6);
        assert_eq!(c.alphas_cumprod(true).unwrap()[999], 2f64.powi(-24));
    }

    #[test]
    fn spacings() {
        assert_eq!(spaced_timesteps(TimestepSpacing::Trailing, 1000, 4, 0), vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(spaced_timesteps(TimestepSpacing::Leading, 1000, 4, 1), vec![751.0, 501.0, 251.0, 1.0]);
        assert_eq!(spaced_timesteps(TimestepSpacing::Linspace, 1000, 4, 0), vec![999.0, 666.0, 333.0, 0.0]);
        // trailing with a non-integer ratio: np.arange(1000, 0, -1000/3).round() - 1
        assert_eq!(spaced_timesteps(TimestepSpacing::Trailing, 1000, 3, 0), vec![999.0, 666.0, 332.0]);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let sigmas = train_sigmas(&sd_betas().alphas_cumprod(false).unwrap());
        let logs: Vec<f64> = sigmas.iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(sigmas[500], &logs) - 500.0).abs() < 1e-9);
        let mid = ((sigmas[10].ln() + sigmas[11].ln()) / 2.0).exp();
        assert!((sigma_to_t(mid, &logs) - 10.5).abs() < 1e-9);
        assert_eq!(sigma_to_t(1e6, &logs), 999.0);
        assert_eq!(sigma_to_t(0.0, &logs), 0.0);
    }

    #[test]
    fn torch_linspace_halves() {
        let v = linspace_f32(0.0, 1.0, 5);
        assert_eq!(v, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(*linspace_f32(0.1, 0.7, 7).last().unwrap(), 0.7f32);
    }
}
