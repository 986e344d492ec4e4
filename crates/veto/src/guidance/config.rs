//! What the user asked for ([`GuidanceConfig`], validated once) and what applies at one step
//! ([`GuidancePlan`], the step window already resolved). Models receive the plan by reference
//! and hand attention outputs to [`AttentionGuidance::combine`].

use super::nag::{nag, NagParams};
use super::nasa::nasa;
use super::window;
use crate::error::{Error, Result};
use candle_core::Tensor;

/// The guidance method, named as `--guidance` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// No negative guidance: a single positive pass.
    None,
    /// NAG in attention space.
    Nag,
    /// NASA in attention space.
    Nasa,
    /// CFG with the negative prompt in output space.
    Cfg,
    /// CFG and NAG in one run: the positive pass carries NAG, the negative pass is plain.
    CfgNag,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Method::None),
            "nag" => Ok(Method::Nag),
            "nasa" => Ok(Method::Nasa),
            "cfg" => Ok(Method::Cfg),
            "cfg+nag" | "nag+cfg" => Ok(Method::CfgNag),
            other => Err(Error::invalid(format!(
                "unknown guidance '{other}' (expected one of: nag, nasa, cfg, cfg+nag, none)"
            ))),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::None => "none",
            Method::Nag => "nag",
            Method::Nasa => "nasa",
            Method::Cfg => "cfg",
            Method::CfgNag => "cfg+nag",
        })
    }
}

/// The user's guidance request, validated by [`GuidanceConfig::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GuidanceConfig {
    pub method: Method,
    /// NAG parameters (used by `nag` and `cfg+nag`).
    pub nag: NagParams,
    /// `nag_end`: attention guidance runs while `t >= (1 - nag_end) * 1000` (appendix G's theta).
    pub nag_end: f64,
    /// `nasa_scale`: NASA's phi.
    pub nasa_scale: f64,
    /// `true_cfg_scale`: CFG's scale (`neg + c (pos - neg)`), used by `cfg` and `cfg+nag`.
    pub true_cfg_scale: f64,
}

/// The attention-space operation a model applies to `(Z+, Z-)` at this step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionGuidance {
    Nag(NagParams),
    Nasa { scale: f64 },
}

impl AttentionGuidance {
    /// Merge the positive and negative attention outputs of the same queries.
    pub fn combine(&self, z_pos: &Tensor, z_neg: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            AttentionGuidance::Nag(p) => nag(z_pos, z_neg, p),
            AttentionGuidance::Nasa { scale } => nasa(z_pos, z_neg, *scale),
        }
    }
}

/// What applies at one denoising step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GuidancePlan {
    /// Attention guidance for this step's (positive) model pass; `None` outside the window.
    pub attention: Option<AttentionGuidance>,
    /// CFG scale when a separate negative pass runs at this step.
    pub cfg_scale: Option<f64>,
}

impl GuidancePlan {
    /// A plan that guides nothing: one plain positive pass.
    pub fn none() -> Self {
        Self::default()
    }
}

impl GuidanceConfig {
    /// The official defaults for FLUX.1-schnell (NAG README): s = 5, tau = 2.5, alpha = 0.25.
    pub fn nag_default() -> Self {
        GuidanceConfig {
            method: Method::Nag,
            nag: NagParams { scale: 5.0, tau: 2.5, alpha: 0.25, norm: Default::default() },
            nag_end: 1.0,
            nasa_scale: 0.5,
            true_cfg_scale: 4.0,
        }
    }

    /// Reject out-of-range values with a message naming the flag.
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::invalid(format!("{name} must be a finite number, got {v}")))
            }
        };
        finite("--nag-scale", self.nag.scale)?;
        finite("--nag-tau", self.nag.tau)?;
        finite("--nag-alpha", self.nag.alpha)?;
        finite("--nag-end", self.nag_end)?;
        finite("--nasa-scale", self.nasa_scale)?;
        finite("--true-cfg-scale", self.true_cfg_scale)?;
        if self.nag.scale < 1.0 {
            return Err(Error::invalid(format!(
                "--nag-scale must be >= 1 (s = phi + 1; 1 means off), got {}",
                self.nag.scale
            )));
        }
        if self.nag.tau <= 0.0 {
            return Err(Error::invalid(format!("--nag-tau (tau) must be > 0, got {}", self.nag.tau)));
        }
        if !(0.0..=1.0).contains(&self.nag.alpha) {
            return Err(Error::invalid(format!(
                "--nag-alpha (alpha) must be in [0, 1], got {}",
                self.nag.alpha
            )));
        }
        if !(0.0..=1.0).contains(&self.nag_end) {
            return Err(Error::invalid(format!(
                "--nag-end (theta) must be in [0, 1], got {}",
                self.nag_end
            )));
        }
        if self.nasa_scale < 0.0 {
            return Err(Error::invalid(format!(
                "--nasa-scale (phi) must be >= 0, got {}",
                self.nasa_scale
            )));
        }
        if self.true_cfg_scale < 1.0 {
            return Err(Error::invalid(format!(
                "--true-cfg-scale must be >= 1 (1 means off), got {}",
                self.true_cfg_scale
            )));
        }
        Ok(())
    }

    /// Whether the model needs the negative text as an attention stream at any step.
    pub fn uses_attention_guidance(&self) -> bool {
        match self.method {
            Method::Nag | Method::CfgNag => self.nag.scale > 1.0,
            Method::Nasa => true,
            Method::None | Method::Cfg => false,
        }
    }

    /// Whether a separate negative model pass runs (CFG).
    pub fn uses_cfg(&self) -> bool {
        matches!(self.method, Method::Cfg | Method::CfgNag) && self.true_cfg_scale > 1.0
    }

    /// The plan at timestep `t` (0..=`num_train_timesteps` scale).
    pub fn plan_at(&self, t: f64, num_train_timesteps: f64) -> GuidancePlan {
        let in_window = window::is_active(t, self.nag_end, num_train_timesteps);
        let attention = match self.method {
            _ if !in_window || !self.uses_attention_guidance() => None,
            Method::Nag | Method::CfgNag => Some(AttentionGuidance::Nag(self.nag)),
            Method::Nasa => Some(AttentionGuidance::Nasa { scale: self.nasa_scale }),
            Method::None | Method::Cfg => None,
        };
        let cfg_scale = self.uses_cfg().then_some(self.true_cfg_scale);
        GuidancePlan { attention, cfg_scale }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_methods_and_rejects_unknown() {
        assert_eq!("cfg+nag".parse::<Method>().unwrap(), Method::CfgNag);
        assert_eq!("NAG".parse::<Method>().unwrap(), Method::Nag);
        let e = "pag".parse::<Method>().unwrap_err().to_string();
        assert!(e.contains("unknown guidance 'pag'"), "{e}");
    }

    #[test]
    fn validation_names_the_flag() {
        let mut c = GuidanceConfig::nag_default();
        c.nag.tau = 0.0;
        assert!(c.validate().unwrap_err().to_string().contains("--nag-tau"));
        let mut c = GuidanceConfig::nag_default();
        c.nag.alpha = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("--nag-alpha"));
        let mut c = GuidanceConfig::nag_default();
        c.nag_end = -0.1;
        assert!(c.validate().unwrap_err().to_string().contains("--nag-end"));
        let mut c = GuidanceConfig::nag_default();
        c.nag.scale = f64::NAN;
        assert!(c.validate().is_err());
        assert!(GuidanceConfig::nag_default().validate().is_ok());
    }

    #[test]
    fn plan_respects_window_and_method() {
        let mut c = GuidanceConfig::nag_default();
        c.nag_end = 0.5;
        assert!(matches!(c.plan_at(750.0, 1000.0).attention, Some(AttentionGuidance::Nag(_))));
        assert_eq!(c.plan_at(250.0, 1000.0).attention, None);
        assert_eq!(c.plan_at(750.0, 1000.0).cfg_scale, None);

        c.method = Method::CfgNag;
        let late = c.plan_at(250.0, 1000.0);
        assert_eq!(late.attention, None);
        assert_eq!(late.cfg_scale, Some(4.0));

        c.method = Method::Cfg;
        assert_eq!(c.plan_at(1000.0, 1000.0).attention, None);

        // nag_scale 1 means NAG off.
        c.method = Method::Nag;
        c.nag.scale = 1.0;
        assert_eq!(c.plan_at(1000.0, 1000.0), GuidancePlan::none());
    }
}
