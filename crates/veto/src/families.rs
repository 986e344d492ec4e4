//! The registry of model families: one [`Family`] descriptor per family says which diffusers
//! pipeline classes it accepts, how it loads, which guidance methods and options it has, where
//! its CFG scale comes from and which step-window rule it follows. The loader, the CLI
//! (`generate`, `bench`) and every "supported: ..." message read [`FAMILIES`].
//!
//! Adding a family: a model under `models/`, a pipeline under `pipelines/`, and one entry here.

use crate::error::{Error, Result};
use crate::guidance::{AttentionMethod, CfgScaleSource, Method, NagVariant, StepWindow, VsfLayout};
use crate::loading::model_source::ModelSource;
use crate::pipelines::{
    flux, pixart, sana, sd3, sdxl, wan, Defaults, GenerateRequest, LoadOptions, ResolvedRequest, SamplerOption,
    TextToImage,
};

/// Loads a family's pipeline from a diffusers folder.
pub type Loader = fn(&ModelSource, &LoadOptions) -> Result<Box<dyn TextToImage>>;

/// A model's defaults from its config files alone, before any weights load.
pub type DefaultsReader = fn(&ModelSource) -> Result<Defaults>;

/// Checks a resolved request against a model's config files alone, before any weights load
/// (what the loaded pipeline's `validate` would refuse and the configs can tell: sizes, sampler
/// options, initial latents, step noise).
pub type ConfigCheck = fn(&ModelSource, &ResolvedRequest) -> Result<()>;

/// The guidance methods a family has: any combination of CFG and PAG (where allowed) with at
/// most one of its attention methods.
#[derive(Debug, Clone, Copy)]
pub struct Methods {
    /// Attention-space methods.
    pub attention: &'static [AttentionMethod],
    /// CFG with the negative prompt.
    pub cfg: bool,
    /// Perturbed-attention guidance.
    pub pag: bool,
}

impl Methods {
    /// Whether `m` is available.
    pub fn supports(&self, m: Method) -> bool {
        (!m.cfg || self.cfg) && (!m.pag || self.pag) && m.attention.is_none_or(|a| self.attention.contains(&a))
    }

    /// The available methods, spelled as `--guidance` takes them.
    pub fn list(&self) -> Vec<String> {
        let attention: Vec<Option<AttentionMethod>> =
            std::iter::once(None).chain(self.attention.iter().copied().map(Some)).collect();
        let mut out = Vec::new();
        for cfg in [false, true].into_iter().filter(|&c| !c || self.cfg) {
            for pag in [false, true].into_iter().filter(|&p| !p || self.pag) {
                for &a in &attention {
                    out.push(Method { cfg, pag, attention: a }.to_string());
                }
            }
        }
        out
    }
}

/// One model family.
pub struct Family {
    /// Short name (`flux`, `sd3`, `unet`), as `veto bench --family` takes it.
    pub name: &'static str,
    /// Other names it answers to.
    pub aliases: &'static [&'static str],
    /// What it covers, for messages and `--help`.
    pub title: &'static str,
    /// `model_index.json` `_class_name` values it loads (official NAG folders add a `NAG` /
    /// `Nag` prefix, accepted too).
    pub accepts: &'static [&'static str],
    /// Its guidance methods.
    pub methods: Methods,
    /// VSF token layouts it has.
    pub vsf_layouts: &'static [VsfLayout],
    /// Whether `nag_pooled` (which pooled vector modulates the NAG stream) applies.
    pub nag_pooled: bool,
    /// The NAG data flows the family has (`nag_variant`; every family has the official one).
    pub nag_variants: &'static [NagVariant],
    /// Whether `max_sequence_length` applies (a T5 text encoder).
    pub t5_tokens: bool,
    /// Where its CFG scale comes from.
    pub cfg_scale: CfgScaleSource,
    /// Its official early-stopping rule.
    pub window: StepWindow,
    /// The family-specific sampler options it takes.
    pub sampler_options: &'static [SamplerOption],
    /// Its scheduler(s), for messages.
    pub scheduler: &'static str,
    /// Loads its pipeline.
    pub load: Loader,
    /// Reads a model's defaults (steps, size, guidance and its parameters) from its configs.
    pub defaults: DefaultsReader,
    /// Checks a request (size, steps, tokens, init latents, sampler options) against them.
    pub check_configs: ConfigCheck,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family").field("name", &self.name).field("accepts", &self.accepts).finish()
    }
}

impl Family {
    /// Whether it loads the pipeline class `class` (with or without the NAG prefix).
    pub fn accepts_class(&self, class: &str) -> bool {
        let bare = class.strip_prefix("NAG").or_else(|| class.strip_prefix("Nag")).unwrap_or(class);
        self.accepts.contains(&class) || self.accepts.contains(&bare)
    }

    /// Whether `name` names it.
    pub fn is_named(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name) || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }

    /// The request with `defaults` filled in, as this family runs it, checked by [`Self::check`].
    /// A default CFG scale (the model's `guidance_scale`) does not apply to a method without
    /// `cfg`: it becomes 0, so nothing warns about a scale the user never gave.
    pub fn resolve(&self, req: &GenerateRequest, defaults: &Defaults) -> Result<ResolvedRequest> {
        let mut resolved = req.resolve(defaults)?;
        if self.cfg_scale == CfgScaleSource::GuidanceScale
            && req.guidance_scale.is_none()
            && !resolved.guidance.method.cfg
        {
            resolved.guidance_scale = 0.0;
        }
        self.check(&resolved)?;
        Ok(resolved)
    }

    /// Check what the family itself decides about a request: the method, the VSF layout, the
    /// sampler options. The pipeline checks the rest against the loaded model.
    pub fn check(&self, req: &ResolvedRequest) -> Result<()> {
        let m = req.guidance.method;
        if !self.methods.supports(m) {
            return Err(Error::UnsupportedMethod {
                method: m.to_string(),
                family: self.title,
                supported: self.methods.list().join(", "),
            });
        }
        if m.attention == Some(AttentionMethod::Vsf) && !self.vsf_layouts.contains(&req.guidance.vsf.layout) {
            return Err(Error::parameter(
                "vsf_layout",
                format!(
                    "layout '{}' is not available for {} (it has the paper's)",
                    req.guidance.vsf.layout, self.title
                ),
            ));
        }
        if !self.nag_variants.contains(&req.guidance.nag_variant) {
            return Err(Error::parameter(
                "nag_variant",
                format!("'{}' is not available for {} (it has the official one)", req.guidance.nag_variant, self.title),
            ));
        }
        if req.video.any() && !std::ptr::eq(self, &WAN) {
            return Err(Error::parameter(
                "video",
                format!("{} makes images; frames, flow_shift and image are Wan's", self.title),
            ));
        }
        if let Some(bad) = req.sampler.given().into_iter().find(|o| !self.sampler_options.contains(o)) {
            return Err(Error::parameter(bad.name(), format!("not supported for {}", self.title)));
        }
        Ok(())
    }
}

const CONTRAST: &[AttentionMethod] = &[AttentionMethod::Nag, AttentionMethod::Nasa];
const ALL_ATTENTION: &[AttentionMethod] = &[AttentionMethod::Nag, AttentionMethod::Nasa, AttentionMethod::Vsf];

/// FLUX.1 schnell / dev (and guidance-distilled descendants).
pub static FLUX: Family = Family {
    name: "flux",
    aliases: &[],
    title: "Flux",
    accepts: &["FluxPipeline"],
    methods: Methods { attention: CONTRAST, cfg: true, pag: false },
    vsf_layouts: &[],
    nag_pooled: false,
    nag_variants: &[NagVariant::Official, NagVariant::SharedImage],
    t5_tokens: true,
    cfg_scale: CfgScaleSource::TrueCfgScale,
    window: StepWindow::Threshold,
    sampler_options: &[],
    scheduler: "FlowMatchEulerDiscreteScheduler",
    load: |s, o| Ok(Box::new(flux::FluxPipeline::load_with(s, o)?)),
    defaults: flux::defaults_of,
    check_configs: flux::check_before_loading,
};

/// Stable Diffusion 3 / 3.5 (MMDiT, MMDiT-X).
pub static SD3: Family = Family {
    name: "sd3",
    aliases: &["sd35"],
    title: "SD3",
    accepts: &["StableDiffusion3Pipeline"],
    methods: Methods { attention: ALL_ATTENTION, cfg: true, pag: false },
    vsf_layouts: &[VsfLayout::Paper, VsfLayout::Official],
    nag_pooled: true,
    nag_variants: &[NagVariant::Official],
    t5_tokens: true,
    cfg_scale: CfgScaleSource::GuidanceScale,
    window: StepWindow::Threshold,
    sampler_options: &[],
    scheduler: "FlowMatchEulerDiscreteScheduler",
    load: |s, o| Ok(Box::new(sd3::Sd3Pipeline::load_with(s, o)?)),
    defaults: sd3::defaults_of,
    check_configs: sd3::check_before_loading,
};

/// The UNet family: SD1.5 / SD2, SDXL and its few-step descendants.
pub static UNET: Family = Family {
    name: "unet",
    aliases: &["sdxl", "sd15"],
    title: "the UNet family (SD1.5, SDXL)",
    accepts: &["StableDiffusionPipeline", "StableDiffusionXLPipeline"],
    methods: Methods { attention: ALL_ATTENTION, cfg: true, pag: true },
    vsf_layouts: &[VsfLayout::Paper],
    nag_pooled: false,
    nag_variants: &[NagVariant::Official],
    t5_tokens: false,
    cfg_scale: CfgScaleSource::GuidanceScale,
    window: StepWindow::FlooredSticky,
    sampler_options: &[SamplerOption::Timesteps, SamplerOption::Eta, SamplerOption::PagLayers, SamplerOption::Scheduler],
    scheduler: "EulerDiscrete, EulerAncestralDiscrete, PNDM, LCM, DDIM, TCD, DPMSolverMultistep, DPMSolverSDE, EDMEuler, EDMDPMSolverMultistep, HeunDiscrete, UniPCMultistep",
    load: |s, o| Ok(Box::new(sdxl::StableDiffusionPipeline::load_with(s, o)?)),
    defaults: sdxl::defaults_of,
    check_configs: sdxl::check_before_loading,
};

/// PixArt-Sigma (DiT with adaLN-single, T5 captions).
pub static PIXART: Family = Family {
    name: "pixart",
    aliases: &["pixart-sigma"],
    title: "PixArt-Sigma",
    accepts: &["PixArtSigmaPipeline", "PixArtSigmaPAGPipeline"],
    methods: Methods { attention: ALL_ATTENTION, cfg: true, pag: true },
    vsf_layouts: &[VsfLayout::Paper],
    nag_pooled: false,
    nag_variants: &[NagVariant::Official],
    t5_tokens: true,
    cfg_scale: CfgScaleSource::GuidanceScale,
    window: StepWindow::FlooredSticky,
    sampler_options: &[SamplerOption::Timesteps, SamplerOption::PagLayers, SamplerOption::Scheduler],
    scheduler: "DPMSolverMultistepScheduler (and the UNet family's schedulers by --scheduler)",
    load: |s, o| Ok(Box::new(pixart::PixArtSigmaPipeline::load_with(s, o)?)),
    defaults: pixart::defaults_of,
    check_configs: pixart::check_before_loading,
};

/// SANA 1.0 / 1.5 and SANA-Sprint (linear-attention DiT, Gemma-2 captions, DC-AE).
pub static SANA: Family = Family {
    name: "sana",
    aliases: &[],
    title: "SANA",
    accepts: &["SanaPipeline", "SanaPAGPipeline", "SanaSprintPipeline"],
    methods: Methods { attention: ALL_ATTENTION, cfg: true, pag: true },
    vsf_layouts: &[VsfLayout::Paper],
    nag_pooled: false,
    nag_variants: &[NagVariant::Official],
    t5_tokens: true,
    cfg_scale: CfgScaleSource::GuidanceScale,
    window: StepWindow::FlooredSticky,
    sampler_options: &[
        SamplerOption::Timesteps,
        SamplerOption::PagLayers,
        SamplerOption::Scheduler,
        SamplerOption::ComplexHumanInstruction,
    ],
    scheduler: "DPMSolverMultistepScheduler with flow sigmas (and the UNet family's schedulers by --scheduler); \
                SANA-Sprint: SCMScheduler",
    load: |s, o| Ok(Box::new(sana::SanaPipeline::load_with(s, o)?)),
    defaults: sana::defaults_of,
    check_configs: sana::check_before_loading,
};

/// Wan2.1 text-to-video and image-to-video (one pipeline type, the transformer config says
/// which). NAG and NASA on every `attn2`, VSF as the official Wan code (no CFG), the official
/// Wan NAG window.
pub static WAN: Family = Family {
    name: "wan",
    aliases: &["wan2.1"],
    title: "Wan2.1",
    accepts: &["WanPipeline", "WanImageToVideoPipeline"],
    methods: Methods { attention: ALL_ATTENTION, cfg: true, pag: false },
    vsf_layouts: &[VsfLayout::Paper],
    nag_pooled: false,
    nag_variants: &[NagVariant::Official],
    t5_tokens: true,
    cfg_scale: CfgScaleSource::GuidanceScale,
    window: StepWindow::Threshold,
    sampler_options: &[],
    scheduler: "UniPCMultistepScheduler (flow prediction, flow_shift), or the folder's FlowMatchEulerDiscreteScheduler",
    load: |s, o| Ok(Box::new(wan::WanPipeline::load_with(s, o)?)),
    defaults: wan::defaults_of,
    check_configs: wan::check_before_loading,
};

/// Every family veto has.
pub static FAMILIES: &[&Family] = &[&FLUX, &SD3, &UNET, &PIXART, &SANA, &WAN];

/// The family that loads pipeline class `class`.
pub fn for_class(class: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.accepts_class(class))
}

/// The family named `name` (or one of its aliases).
pub fn named(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.is_named(name))
}

/// Every accepted pipeline class, for messages.
pub fn supported_classes() -> String {
    FAMILIES.iter().flat_map(|f| f.accepts.iter().copied()).collect::<Vec<_>>().join(", ")
}

/// The family of a diffusers folder, from its `model_index.json` (no weights are read).
pub fn detect(source: &ModelSource) -> Result<&'static Family> {
    source.model_index()?.family()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_map_to_families_with_or_without_the_nag_prefix() {
        assert_eq!(for_class("FluxPipeline").unwrap().name, "flux");
        assert_eq!(for_class("NAGFluxPipeline").unwrap().name, "flux");
        assert_eq!(for_class("NAGStableDiffusion3Pipeline").unwrap().name, "sd3");
        assert_eq!(for_class("NagStableDiffusionXLPipeline").unwrap().name, "unet");
        assert_eq!(for_class("WanPipeline").unwrap().name, "wan");
        assert_eq!(for_class("WanImageToVideoPipeline").unwrap().name, "wan");
        assert!(for_class("CogVideoXPipeline").is_none());
        assert_eq!(for_class("PixArtSigmaPipeline").unwrap().name, "pixart");
        assert_eq!(named("pixart").unwrap().name, "pixart");
        assert_eq!(for_class("SanaPAGPipeline").unwrap().name, "sana");
        assert_eq!(named("SDXL").unwrap().name, "unet");
        assert!(supported_classes().contains("StableDiffusion3Pipeline"));
    }

    #[test]
    fn methods_per_family() {
        let m = |s: &str| s.parse::<Method>().unwrap();
        assert!(FLUX.methods.supports(m("cfg+nag")));
        assert!(!FLUX.methods.supports(m("vsf")));
        assert!(!FLUX.methods.supports(m("cfg+pag")));
        assert!(SD3.methods.supports(m("cfg+vsf")));
        assert!(!SD3.methods.supports(m("pag")));
        assert!(UNET.methods.supports(m("cfg+pag+nag")));
        let flux = FLUX.methods.list();
        assert_eq!(flux, ["none", "nag", "nasa", "cfg", "cfg+nag", "cfg+nasa"]);
        // Every family has CFG, NAG and none.
        for f in FAMILIES {
            for s in ["none", "nag", "cfg", "cfg+nag"] {
                assert!(f.methods.supports(m(s)), "{} lacks {s}", f.name);
            }
        }
    }
}
