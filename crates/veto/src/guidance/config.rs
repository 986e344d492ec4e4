//! What the user asked for ([`GuidanceConfig`], validated once) and what applies at one step
//! ([`GuidancePlan`], the step window already resolved). Models receive the plan by reference;
//! for NAG/NASA they hand attention outputs to [`AttentionGuidance::combine`].

use super::nag::{nag, NagParams};
use super::nasa::nasa;
use super::vsf::VsfParams;
use super::window;
use crate::error::{Error, Result};
use candle_core::Tensor;

/// The attention-space method of a run (at most one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMethod {
    Nag,
    Nasa,
    Vsf,
}

/// The guidance of a run: output-space CFG and PAG, and at most one attention-space method.
/// Spelled as `--guidance` takes it: components joined by `+` (`nag`, `cfg+nag`,
/// `cfg+pag+nag`, `vsf`, ...), or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Method {
    /// CFG with the negative prompt (a second, negative model pass).
    pub cfg: bool,
    /// Perturbed-attention guidance (a pass with self-attention replaced by identity).
    pub pag: bool,
    pub attention: Option<AttentionMethod>,
}

impl Method {
    pub const NONE: Method = Method { cfg: false, pag: false, attention: None };
    pub const NAG: Method = Method { cfg: false, pag: false, attention: Some(AttentionMethod::Nag) };
    pub const NASA: Method = Method { cfg: false, pag: false, attention: Some(AttentionMethod::Nasa) };
    pub const VSF: Method = Method { cfg: false, pag: false, attention: Some(AttentionMethod::Vsf) };
    pub const CFG: Method = Method { cfg: true, pag: false, attention: None };
    pub const CFG_NAG: Method = Method { cfg: true, pag: false, attention: Some(AttentionMethod::Nag) };
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let unknown = || {
            Error::invalid(format!(
                "unknown guidance '{s}' (expected none, or nag, nasa, vsf, cfg, pag joined by '+', e.g. cfg+nag)"
            ))
        };
        let lower = s.trim().to_ascii_lowercase();
        if lower == "none" {
            return Ok(Method::NONE);
        }
        let mut m = Method::NONE;
        for part in lower.split('+') {
            let attention = match part.trim() {
                "cfg" if !m.cfg => {
                    m.cfg = true;
                    continue;
                }
                "pag" if !m.pag => {
                    m.pag = true;
                    continue;
                }
                "nag" => AttentionMethod::Nag,
                "nasa" => AttentionMethod::Nasa,
                "vsf" => AttentionMethod::Vsf,
                _ => return Err(unknown()),
            };
            if let Some(prev) = m.attention {
                return Err(Error::invalid(format!(
                    "guidance '{s}' combines two attention methods ({prev:?} and {attention:?}); use one"
                )));
            }
            m.attention = Some(attention);
        }
        Ok(m)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.cfg {
            parts.push("cfg");
        }
        if self.pag {
            parts.push("pag");
        }
        match self.attention {
            Some(AttentionMethod::Nag) => parts.push("nag"),
            Some(AttentionMethod::Nasa) => parts.push("nasa"),
            Some(AttentionMethod::Vsf) => parts.push("vsf"),
            None => {}
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join("+"))
        }
    }
}

/// Which pooled text vector conditions the NAG branch of an MMDiT (SD3): the official
/// diffusers pipeline uses the positive one, the official ComfyUI node the negative one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NagPooled {
    #[default]
    Positive,
    Negative,
}

/// The user's guidance request, validated by [`GuidanceConfig::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GuidanceConfig {
    pub method: Method,
    /// NAG parameters.
    pub nag: NagParams,
    /// `nag_end`: attention guidance runs while `t >= (1 - nag_end) * 1000` (appendix G's theta).
    pub nag_end: f64,
    /// SD3: which pooled vector conditions the NAG branch.
    pub nag_pooled: NagPooled,
    /// `nasa_scale`: NASA's phi.
    pub nasa_scale: f64,
    /// VSF's alpha, beta and layout.
    pub vsf: VsfParams,
    /// Flux's CFG scale `true_cfg_scale` (`neg + c (pos - neg)`). SD3 and the UNet family take
    /// their CFG scale from the pipeline's `guidance_scale` (`GenerateRequest::guidance_scale`), as diffusers.
    pub true_cfg_scale: f64,
    /// PAG's scale (`+ s (eps - eps_perturbed)`).
    pub pag_scale: f64,
}

/// The attention-space operation a model applies at this step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionGuidance {
    Nag(NagParams),
    Nasa { scale: f64 },
    Vsf(VsfParams),
}

impl AttentionGuidance {
    /// Merge the positive and negative attention outputs of the same queries (NAG, NASA).
    /// VSF is no such merge: models implement it in the attention itself.
    pub fn combine(&self, z_pos: &Tensor, z_neg: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            AttentionGuidance::Nag(p) => nag(z_pos, z_neg, p),
            AttentionGuidance::Nasa { scale } => nasa(z_pos, z_neg, *scale),
            AttentionGuidance::Vsf(_) => {
                candle_core::bail!("VSF is applied inside attention, not by merging two outputs")
            }
        }
    }
}

/// What applies at one denoising step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GuidancePlan {
    /// Attention guidance for this step's (positive) model pass; `None` outside the window.
    pub attention: Option<AttentionGuidance>,
    /// CFG scale when a negative pass runs at this step.
    pub cfg_scale: Option<f64>,
    /// PAG scale when a perturbed pass runs at this step.
    pub pag_scale: Option<f64>,
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
            method: Method::NAG,
            nag: NagParams { scale: 5.0, tau: 2.5, alpha: 0.25, norm: Default::default() },
            nag_end: 1.0,
            nag_pooled: NagPooled::Positive,
            nasa_scale: 0.5,
            vsf: VsfParams::default(),
            true_cfg_scale: 4.0,
            pag_scale: 3.0,
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
        finite("--vsf-scale", self.vsf.scale)?;
        finite("--vsf-bias", self.vsf.bias)?;
        finite("--true-cfg-scale", self.true_cfg_scale)?;
        finite("--pag-scale", self.pag_scale)?;
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
            return Err(Error::invalid(format!("--nag-alpha (alpha) must be in [0, 1], got {}", self.nag.alpha)));
        }
        if !(0.0..=1.0).contains(&self.nag_end) {
            return Err(Error::invalid(format!("--nag-end (theta) must be in [0, 1], got {}", self.nag_end)));
        }
        if self.nasa_scale < 0.0 {
            return Err(Error::invalid(format!("--nasa-scale (phi) must be >= 0, got {}", self.nasa_scale)));
        }
        if self.vsf.scale < 0.0 {
            return Err(Error::invalid(format!("--vsf-scale (alpha) must be >= 0, got {}", self.vsf.scale)));
        }
        if self.vsf.bias < 0.0 {
            return Err(Error::invalid(format!("--vsf-bias (beta) must be >= 0, got {}", self.vsf.bias)));
        }
        if self.true_cfg_scale < 1.0 {
            return Err(Error::invalid(format!(
                "--true-cfg-scale must be >= 1 (1 means off), got {}",
                self.true_cfg_scale
            )));
        }
        if self.pag_scale < 0.0 {
            return Err(Error::invalid(format!("--pag-scale must be >= 0, got {}", self.pag_scale)));
        }
        Ok(())
    }

    /// Whether the model needs the negative text as an attention context at any step.
    pub fn uses_attention_guidance(&self) -> bool {
        match self.method.attention {
            Some(AttentionMethod::Nag) => self.nag.scale > 1.0,
            Some(AttentionMethod::Nasa) | Some(AttentionMethod::Vsf) => true,
            None => false,
        }
    }

    /// Whether a separate negative model pass runs (CFG).
    pub fn uses_cfg(&self) -> bool {
        self.method.cfg && self.true_cfg_scale > 1.0
    }

    /// Whether a perturbed-attention pass runs (PAG).
    pub fn uses_pag(&self) -> bool {
        self.method.pag && self.pag_scale > 0.0
    }

    /// The plan at timestep `t` (0..=`num_train_timesteps` scale).
    pub fn plan_at(&self, t: f64, num_train_timesteps: f64) -> GuidancePlan {
        let in_window = window::is_active(t, self.nag_end, num_train_timesteps);
        let attention = match self.method.attention {
            _ if !in_window || !self.uses_attention_guidance() => None,
            Some(AttentionMethod::Nag) => Some(AttentionGuidance::Nag(self.nag)),
            Some(AttentionMethod::Nasa) => Some(AttentionGuidance::Nasa { scale: self.nasa_scale }),
            Some(AttentionMethod::Vsf) => Some(AttentionGuidance::Vsf(self.vsf)),
            None => None,
        };
        GuidancePlan {
            attention,
            cfg_scale: self.uses_cfg().then_some(self.true_cfg_scale),
            pag_scale: self.uses_pag().then_some(self.pag_scale),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_methods_and_rejects_unknown() {
        assert_eq!("cfg+nag".parse::<Method>().unwrap(), Method::CFG_NAG);
        assert_eq!("NAG".parse::<Method>().unwrap(), Method::NAG);
        let m: Method = "cfg+pag+nag".parse().unwrap();
        assert!(m.cfg && m.pag && m.attention == Some(AttentionMethod::Nag));
        assert_eq!(m.to_string(), "cfg+pag+nag");
        assert_eq!("none".parse::<Method>().unwrap().to_string(), "none");
        let e = "magic".parse::<Method>().unwrap_err().to_string();
        assert!(e.contains("unknown guidance 'magic'"), "{e}");
        assert!("nag+vsf".parse::<Method>().is_err());
        assert!("cfg+cfg".parse::<Method>().is_err());
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
        c.vsf.bias = -1.0;
        assert!(c.validate().unwrap_err().to_string().contains("--vsf-bias"));
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

        c.method = Method::CFG_NAG;
        let late = c.plan_at(250.0, 1000.0);
        assert_eq!(late.attention, None);
        assert_eq!(late.cfg_scale, Some(4.0));

        c.method = Method::CFG;
        assert_eq!(c.plan_at(1000.0, 1000.0).attention, None);

        c.method = Method::VSF;
        assert!(matches!(c.plan_at(1000.0, 1000.0).attention, Some(AttentionGuidance::Vsf(_))));

        // nag_scale 1 means NAG off.
        c.method = Method::NAG;
        c.nag.scale = 1.0;
        assert_eq!(c.plan_at(1000.0, 1000.0), GuidancePlan::none());
    }
}
