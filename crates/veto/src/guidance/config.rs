//! What the user asked for ([`GuidanceConfig`], validated once) and what applies at one step
//! ([`GuidancePlan`], the step window already resolved). Models receive the plan by reference;
//! the attention routine ([`super::guided_attention()`]) applies its method.

use super::cfg::cfg;
use super::nag::{nag, NagParams};
use super::nasa::nasa;
use super::pag::pag;
use super::vsf::VsfParams;
use super::window::StepWindow;
use crate::error::{Error, Result};
use candle_core::Tensor;

/// The attention-space method of a run (at most one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionMethod {
    /// Normalized Attention Guidance.
    Nag,
    /// Negative-Away Steer Attention.
    Nasa,
    /// Value Sign Flip.
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
    /// At most one attention-space method.
    pub attention: Option<AttentionMethod>,
}

impl Method {
    /// No guidance.
    pub const NONE: Method = Method { cfg: false, pag: false, attention: None };
    /// NAG alone (the few-step setting).
    pub const NAG: Method = Method { cfg: false, pag: false, attention: Some(AttentionMethod::Nag) };
    /// NASA alone.
    pub const NASA: Method = Method { cfg: false, pag: false, attention: Some(AttentionMethod::Nasa) };
    /// VSF alone.
    pub const VSF: Method = Method { cfg: false, pag: false, attention: Some(AttentionMethod::Vsf) };
    /// CFG with the negative prompt.
    pub const CFG: Method = Method { cfg: true, pag: false, attention: None };
    /// CFG and NAG (multi-step models).
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
        let twice = |part: &str| Error::invalid(format!("guidance '{s}': {part} given twice"));
        for part in lower.split('+') {
            let part = part.trim();
            let attention = match part {
                "cfg" if m.cfg => return Err(twice(part)),
                "pag" if m.pag => return Err(twice(part)),
                "cfg" => {
                    m.cfg = true;
                    continue;
                }
                "pag" => {
                    m.pag = true;
                    continue;
                }
                "nag" => AttentionMethod::Nag,
                "nasa" => AttentionMethod::Nasa,
                "vsf" => AttentionMethod::Vsf,
                _ => return Err(unknown()),
            };
            match m.attention {
                Some(prev) if prev == attention => return Err(twice(part)),
                Some(prev) => {
                    return Err(Error::invalid(format!(
                        "guidance '{s}' combines two attention methods ({prev:?} and {attention:?}); use one"
                    )))
                }
                None => m.attention = Some(attention),
            }
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
    /// The positive pooled vector (official diffusers pipeline).
    #[default]
    Positive,
    /// The negative pooled vector (official ComfyUI node).
    Negative,
}

/// How NAG's negative branch runs through Flux's single-stream blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NagVariant {
    /// The official semantics: the single blocks run a whole second stream `[text- ; image']`
    /// with its own modulation, MLP and residual (about +70% per step at 512²).
    #[default]
    Official,
    /// veto's opt-in variant: the single blocks keep one image stream; the negative branch
    /// reuses the positive image tokens and their modulation, so only the negative text is
    /// extra (as in the double blocks; about +20% per step at 512²). Not the official semantics.
    SharedImage,
}

impl std::str::FromStr for NagVariant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "official" => Ok(NagVariant::Official),
            "shared-image" | "shared_image" => Ok(NagVariant::SharedImage),
            other => Err(format!("unknown NAG variant '{other}' (expected official or shared-image)")),
        }
    }
}

impl std::fmt::Display for NagVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NagVariant::Official => "official",
            NagVariant::SharedImage => "shared-image",
        })
    }
}

/// The user's guidance request, validated by [`GuidanceConfig::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GuidanceConfig {
    /// The method: `cfg`, `pag` and one attention method, combined.
    pub method: Method,
    /// NAG parameters.
    pub nag: NagParams,
    /// `nag_end`: attention guidance runs while `t >= (1 - nag_end) * 1000` (appendix G's theta).
    pub nag_end: f64,
    /// SD3: which pooled vector conditions the NAG branch.
    pub nag_pooled: NagPooled,
    /// Flux: the official NAG data flow or the shared-image variant (NAG and NASA).
    pub nag_variant: NagVariant,
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

/// How the attention outputs of the same queries over the positive and the negative context
/// are combined (NAG, NASA).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Contrast {
    /// NAG (eq. 7-10).
    Nag(NagParams),
    /// NASA (eq. 5) with scale phi.
    Nasa {
        /// phi.
        scale: f64,
    },
}

impl Contrast {
    /// Merge `Z+` and `Z-` (heads merged, `[..., d]`).
    pub fn combine(&self, z_pos: &Tensor, z_neg: &Tensor) -> candle_core::Result<Tensor> {
        let _scope = crate::profile::scope(crate::profile::Op::Guidance);
        match self {
            Contrast::Nag(p) => nag(z_pos, z_neg, p),
            Contrast::Nasa { scale } => nasa(z_pos, z_neg, *scale),
        }
    }
}

/// The attention-space operation a model applies at this step: a contrast of two attention
/// outputs (NAG, NASA), or VSF, which changes the attention itself (flipped negative values).
/// The two cannot be combined, so they are different variants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionGuidance {
    /// NAG or NASA.
    Contrast(Contrast),
    /// VSF.
    Vsf(VsfParams),
}

impl AttentionGuidance {
    /// NAG with these parameters.
    pub fn nag(params: NagParams) -> Self {
        AttentionGuidance::Contrast(Contrast::Nag(params))
    }

    /// NASA with scale phi.
    pub fn nasa(scale: f64) -> Self {
        AttentionGuidance::Contrast(Contrast::Nasa { scale })
    }

    /// The contrast, when this is NAG or NASA.
    pub fn contrast(&self) -> Option<&Contrast> {
        match self {
            AttentionGuidance::Contrast(c) => Some(c),
            AttentionGuidance::Vsf(_) => None,
        }
    }
}

/// Where a model family takes its CFG scale from, as its diffusers pipeline does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfgScaleSource {
    /// `true_cfg_scale` (Flux: a separate scale; `guidance_scale` is the embedded guidance).
    TrueCfgScale,
    /// The pipeline's `guidance_scale` (SD3, the UNet family).
    GuidanceScale,
}

/// What applies at one denoising step: resolved once per step by a [`GuidancePlanner`] and
/// passed down by reference.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GuidancePlan {
    /// Attention guidance for this step's (positive) model pass; `None` outside the window.
    pub attention: Option<AttentionGuidance>,
    /// CFG scale when a negative pass runs at this step.
    pub cfg_scale: Option<f64>,
    /// PAG scale when a perturbed pass runs at this step.
    pub pag_scale: Option<f64>,
    /// Whether the step window of attention guidance is open at this step.
    pub window_open: bool,
}

impl GuidancePlan {
    /// A plan that guides nothing: one plain positive pass.
    pub fn none() -> Self {
        Self::default()
    }

    /// The step's noise prediction from the model outputs of its passes: CFG over the
    /// negative (uncond) pass, then PAG over the perturbed pass, as diffusers' PAG pipelines
    /// (`uncond + g (cond - uncond) + s (cond - perturbed)`). A pass the plan does not run
    /// must be `None`.
    pub fn combine_outputs(
        &self,
        cond: &Tensor,
        uncond: Option<&Tensor>,
        perturbed: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let _scope = crate::profile::scope(crate::profile::Op::Guidance);
        let mut out = match (self.cfg_scale, uncond) {
            (Some(scale), Some(u)) => cfg(cond, u, scale)?,
            (None, None) => cond.clone(),
            (Some(_), None) => candle_core::bail!("CFG runs at this step but no negative pass was given"),
            (None, Some(_)) => candle_core::bail!("a negative pass was given but CFG does not run"),
        };
        match (self.pag_scale, perturbed) {
            (Some(scale), Some(p)) => out = pag(&out, cond, p, scale)?,
            (None, None) => {}
            (Some(_), None) => candle_core::bail!("PAG runs at this step but no perturbed pass was given"),
            (None, Some(_)) => candle_core::bail!("a perturbed pass was given but PAG does not run"),
        }
        Ok(out)
    }
}

/// Turns a [`GuidanceConfig`] into one [`GuidancePlan`] per step, with the family's window
/// rule and CFG scale. Once the window closes it stays closed (the official pipelines restore
/// the plain attention processors for good).
#[derive(Debug, Clone)]
pub struct GuidancePlanner {
    attention: Option<AttentionGuidance>,
    cfg_scale: Option<f64>,
    pag_scale: Option<f64>,
    window: StepWindow,
    nag_end: f64,
    num_train_timesteps: f64,
    open: bool,
}

impl GuidancePlanner {
    /// `guidance_scale` is the request's (used when the family's CFG scale is the guidance scale).
    pub fn new(
        config: &GuidanceConfig,
        cfg_source: CfgScaleSource,
        guidance_scale: f64,
        window: StepWindow,
        num_train_timesteps: f64,
    ) -> Self {
        GuidancePlanner {
            attention: config.attention(),
            cfg_scale: config.cfg_scale(cfg_source, guidance_scale),
            pag_scale: config.uses_pag().then_some(config.pag_scale),
            window,
            nag_end: config.nag_end,
            num_train_timesteps,
            open: true,
        }
    }

    /// The plan of the next step, whose timestep on the 0..=`num_train_timesteps` scale is `t`.
    pub fn step(&mut self, t: f64) -> GuidancePlan {
        self.open = self.open && self.window.is_open(t, self.nag_end, self.num_train_timesteps);
        GuidancePlan {
            attention: if self.open { self.attention } else { None },
            cfg_scale: self.cfg_scale,
            pag_scale: self.pag_scale,
            window_open: self.open,
        }
    }

    /// The CFG scale of every step (`None`: no negative pass).
    pub fn cfg_scale(&self) -> Option<f64> {
        self.cfg_scale
    }

    /// The PAG scale of every step (`None`: no perturbed pass).
    pub fn pag_scale(&self) -> Option<f64> {
        self.pag_scale
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
            nag_variant: NagVariant::Official,
            nasa_scale: 0.5,
            vsf: VsfParams::default(),
            true_cfg_scale: 4.0,
            pag_scale: 3.0,
        }
    }

    /// Reject out-of-range values with an error naming the parameter (`nag_tau`, ...).
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &'static str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::parameter(name, format!("must be a finite number, got {v}")))
            }
        };
        finite("nag_scale", self.nag.scale)?;
        finite("nag_tau", self.nag.tau)?;
        finite("nag_alpha", self.nag.alpha)?;
        finite("nag_end", self.nag_end)?;
        finite("nasa_scale", self.nasa_scale)?;
        finite("vsf_scale", self.vsf.scale)?;
        finite("vsf_bias", self.vsf.bias)?;
        finite("true_cfg_scale", self.true_cfg_scale)?;
        finite("pag_scale", self.pag_scale)?;
        let check = |ok: bool, name: &'static str, rule: &str, v: f64| {
            if ok {
                Ok(())
            } else {
                Err(Error::parameter(name, format!("{rule}, got {v}")))
            }
        };
        check(self.nag.scale >= 1.0, "nag_scale", "must be >= 1 (s = phi + 1; 1 means off)", self.nag.scale)?;
        check(self.nag.tau > 0.0, "nag_tau", "(tau) must be > 0", self.nag.tau)?;
        check((0.0..=1.0).contains(&self.nag.alpha), "nag_alpha", "(alpha) must be in [0, 1]", self.nag.alpha)?;
        check((0.0..=1.0).contains(&self.nag_end), "nag_end", "(theta) must be in [0, 1]", self.nag_end)?;
        check(self.nasa_scale >= 0.0, "nasa_scale", "(phi) must be >= 0", self.nasa_scale)?;
        check(self.vsf.scale >= 0.0, "vsf_scale", "(alpha) must be >= 0", self.vsf.scale)?;
        check(self.vsf.bias >= 0.0, "vsf_bias", "(beta) must be >= 0", self.vsf.bias)?;
        check(self.true_cfg_scale >= 1.0, "true_cfg_scale", "must be >= 1 (1 means off)", self.true_cfg_scale)?;
        check(self.pag_scale >= 0.0, "pag_scale", "must be >= 0", self.pag_scale)?;
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

    /// The attention guidance of the run's steps inside the window (`None`: none; NAG at
    /// scale 1 is off).
    pub fn attention(&self) -> Option<AttentionGuidance> {
        match self.method.attention {
            _ if !self.uses_attention_guidance() => None,
            Some(AttentionMethod::Nag) => Some(AttentionGuidance::nag(self.nag)),
            Some(AttentionMethod::Nasa) => Some(AttentionGuidance::nasa(self.nasa_scale)),
            Some(AttentionMethod::Vsf) => Some(AttentionGuidance::Vsf(self.vsf)),
            None => None,
        }
    }

    /// The CFG scale when a negative pass runs: the method has `cfg` and the family's scale
    /// is above 1 (diffusers' rule; 1 means off).
    pub fn cfg_scale(&self, source: CfgScaleSource, guidance_scale: f64) -> Option<f64> {
        let scale = match source {
            CfgScaleSource::TrueCfgScale => self.true_cfg_scale,
            CfgScaleSource::GuidanceScale => guidance_scale,
        };
        (self.method.cfg && scale > 1.0).then_some(scale)
    }

    /// Whether the negative prompt conditions anything (attention guidance or CFG).
    pub fn uses_negative(&self, source: CfgScaleSource, guidance_scale: f64) -> bool {
        self.uses_attention_guidance() || self.cfg_scale(source, guidance_scale).is_some()
    }

    /// The scales in effect that can make the latents blow up, by parameter name, for the
    /// message that tells the user what to lower.
    pub fn scale_parameters(&self, source: CfgScaleSource, guidance_scale: f64) -> Vec<&'static str> {
        let mut names = Vec::new();
        match self.attention() {
            Some(AttentionGuidance::Contrast(Contrast::Nag(_))) => names.extend(["nag_scale", "nag_tau"]),
            Some(AttentionGuidance::Contrast(Contrast::Nasa { .. })) => names.push("nasa_scale"),
            Some(AttentionGuidance::Vsf(_)) => names.push("vsf_scale"),
            None => {}
        }
        if self.cfg_scale(source, guidance_scale).is_some() {
            names.push(match source {
                CfgScaleSource::TrueCfgScale => "true_cfg_scale",
                CfgScaleSource::GuidanceScale => "guidance_scale",
            });
        }
        if self.uses_pag() {
            names.push("pag_scale");
        }
        names
    }

    /// Whether NAG or NASA runs (the negative prompt as a context of its own).
    pub fn uses_contrast(&self) -> bool {
        self.attention().is_some_and(|a| a.contrast().is_some())
    }

    /// Whether VSF runs (the negative prompt unpadded, inside the positive attention).
    pub fn uses_vsf(&self) -> bool {
        matches!(self.attention(), Some(AttentionGuidance::Vsf(_)))
    }

    /// Whether a perturbed-attention pass runs (PAG).
    pub fn uses_pag(&self) -> bool {
        self.method.pag && self.pag_scale > 0.0
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
        assert!(c.validate().unwrap_err().to_string().contains("nag_tau"));
        let mut c = GuidanceConfig::nag_default();
        c.nag.alpha = 1.5;
        assert!(c.validate().unwrap_err().to_string().contains("nag_alpha"));
        let mut c = GuidanceConfig::nag_default();
        c.nag_end = -0.1;
        assert!(c.validate().unwrap_err().to_string().contains("nag_end"));
        let mut c = GuidanceConfig::nag_default();
        c.vsf.bias = -1.0;
        assert!(c.validate().unwrap_err().to_string().contains("vsf_bias"));
        let mut c = GuidanceConfig::nag_default();
        c.nag.scale = f64::NAN;
        assert!(c.validate().is_err());
        assert!(GuidanceConfig::nag_default().validate().is_ok());
    }

    #[test]
    fn a_method_given_twice_is_named() {
        let e = "cfg+cfg".parse::<Method>().unwrap_err().to_string();
        assert!(e.contains("cfg given twice"), "{e}");
        let e = "nag+cfg+nag".parse::<Method>().unwrap_err().to_string();
        assert!(e.contains("nag given twice"), "{e}");
    }

    fn planner(c: &GuidanceConfig, window: StepWindow) -> GuidancePlanner {
        GuidancePlanner::new(c, CfgScaleSource::TrueCfgScale, 0.0, window, 1000.0)
    }

    #[test]
    fn plan_respects_window_and_method() {
        let mut c = GuidanceConfig::nag_default();
        c.nag_end = 0.5;
        let mut p = planner(&c, StepWindow::Threshold);
        let early = p.step(750.0);
        assert!(matches!(early.attention, Some(AttentionGuidance::Contrast(Contrast::Nag(_)))));
        assert!(early.window_open);
        assert_eq!(early.cfg_scale, None);
        let late = p.step(250.0);
        assert_eq!(late.attention, None);
        assert!(!late.window_open);

        c.method = Method::CFG_NAG;
        let mut p = planner(&c, StepWindow::Threshold);
        let late = p.step(250.0);
        assert_eq!(late.attention, None);
        assert_eq!(late.cfg_scale, Some(4.0));

        c.method = Method::CFG;
        assert_eq!(planner(&c, StepWindow::Threshold).step(1000.0).attention, None);

        c.method = Method::VSF;
        assert!(matches!(planner(&c, StepWindow::Threshold).step(1000.0).attention, Some(AttentionGuidance::Vsf(_))));

        // nag_scale 1 means NAG off.
        c.method = Method::NAG;
        c.nag.scale = 1.0;
        let plan = planner(&c, StepWindow::Threshold).step(1000.0);
        assert_eq!(plan, GuidancePlan { window_open: true, ..GuidancePlan::none() });
    }

    #[test]
    fn a_closed_window_stays_closed() {
        let mut c = GuidanceConfig::nag_default();
        c.nag_end = 0.5;
        let mut p = planner(&c, StepWindow::FlooredSticky);
        assert!(p.step(999.0).attention.is_some());
        assert!(p.step(300.0).attention.is_none());
        // A later, larger timestep (custom timesteps) does not reopen it.
        assert!(p.step(900.0).attention.is_none());
    }

    #[test]
    fn cfg_scale_comes_from_the_family_source() {
        let mut c = GuidanceConfig::nag_default();
        c.method = Method::CFG_NAG;
        c.true_cfg_scale = 4.0;
        assert_eq!(c.cfg_scale(CfgScaleSource::TrueCfgScale, 7.0), Some(4.0));
        assert_eq!(c.cfg_scale(CfgScaleSource::GuidanceScale, 7.0), Some(7.0));
        assert_eq!(c.cfg_scale(CfgScaleSource::GuidanceScale, 1.0), None);
        c.method = Method::NAG;
        assert_eq!(c.cfg_scale(CfgScaleSource::GuidanceScale, 7.0), None);
    }

    #[test]
    fn outputs_combine_as_diffusers_pag_pipelines() {
        use candle_core::Device;
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        let plan = GuidancePlan { cfg_scale: Some(3.0), pag_scale: Some(2.0), ..GuidancePlan::none() };
        // uncond 1, cond 2, perturbed 0.5: 1 + 3 (2 - 1) + 2 (2 - 0.5) = 7
        let out = plan.combine_outputs(&t(2.0), Some(&t(1.0)), Some(&t(0.5))).unwrap();
        assert_eq!(out.to_vec1::<f32>().unwrap(), vec![7.0]);
        assert!(plan.combine_outputs(&t(2.0), None, Some(&t(0.5))).is_err());
        let plain = GuidancePlan::none().combine_outputs(&t(2.0), None, None).unwrap();
        assert_eq!(plain.to_vec1::<f32>().unwrap(), vec![2.0]);
    }
}
