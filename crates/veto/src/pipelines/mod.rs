//! Pipelines: text -> latents -> image, one readable module per model family, all behind the
//! [`TextToImage`] trait; [`Pipeline`] is what a library user holds.

pub(crate) mod caption_dit;
pub mod flux;
pub mod memory;
pub mod noise;
pub mod pixart;
pub mod pixart_bins;
pub mod request;
pub mod residency;
pub mod resize;
pub mod sampling;
pub mod sana;
pub mod sana_bins;
pub mod sana_sprint;
pub mod sd3;
pub mod sdxl;
pub mod wan;

pub use request::{Defaults, GenerateRequest, ResolvedRequest, SamplerOption, SamplerOptions, VideoOptions};
pub use residency::{LoadOptions, Residency};

use crate::error::Result;
use crate::families::{self, Family};
use crate::guidance::GuidanceConfig;
use crate::loading::model_source::ModelSource;
use candle_core::{DType, Device, Tensor};

/// What a pipeline reports after each step.
pub struct StepEvent<'a> {
    /// 0-based step index.
    pub index: usize,
    /// Number of steps.
    pub total: usize,
    /// The step's timestep as the model receives it.
    pub timestep: f64,
    /// Whether attention guidance ran at this step.
    pub attention_guided: bool,
    /// Latents after the step, `[1, C, H/f, W/f]` (unpacked).
    pub latents: &'a Tensor,
}

/// Warnings of one generation (truncated prompts, parameters without effect), each once.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Warnings(Vec<String>);

impl Warnings {
    /// Add `msg` unless it was already said.
    pub fn push(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        if !self.0.contains(&msg) {
            self.0.push(msg);
        }
    }

    /// The warnings, in order.
    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// One model family's pipeline, as the registry loads it. Library users hold a [`Pipeline`].
pub trait TextToImage: Send + Sync {
    /// Defaults of the loaded model.
    fn defaults(&self) -> Defaults;
    /// Check a resolved request against the model before any work is done.
    fn validate(&self, req: &ResolvedRequest) -> Result<()>;
    /// Denoise to the final latents (unpacked, before VAE decode), collecting warnings.
    fn generate_latents(
        &self,
        req: &ResolvedRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
    ) -> Result<Denoised>;
    /// Decode latents to an image tensor `[1, 3, H, W]` in about [-1, 1].
    fn decode(&self, latents: &Tensor) -> Result<Tensor>;
    /// Decode the latents of `req`'s run to the image it asked for: families that run at a
    /// binned size (PixArt-Sigma, SANA) resize and crop back to the asked size, as diffusers.
    fn decode_for(&self, latents: &Tensor, _req: &ResolvedRequest) -> Result<Tensor> {
        self.decode(latents)
    }
    /// Each weighted component (diffusers' folder name) and whether it is in memory now.
    fn loaded_components(&self) -> Vec<(&'static str, bool)>;
}

/// The rows of a batched denoiser output laid out `[uncond?, cond, perturbed?]` (CFG's
/// unconditional row first when `cond_row` is 1, PAG's perturbed row right after the
/// conditional one when `perturbed`): the conditional row, and the others when present.
pub(crate) fn split_guidance_rows(
    out: &Tensor,
    cond_row: usize,
    perturbed: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let cond = out.narrow(0, cond_row, 1)?;
    let uncond = if cond_row > 0 { Some(out.narrow(0, 0, 1)?) } else { None };
    let perturbed = if perturbed { Some(out.narrow(0, cond_row + 1, 1)?) } else { None };
    Ok((cond, uncond, perturbed))
}

/// The warnings of a family whose CFG scale is `guidance_scale` (SD3, the UNet family): CFG asked
/// for at a scale that does not run it, a scale without CFG, a negative prompt nothing uses.
pub(crate) fn warn_unused_cfg_and_negative(req: &ResolvedRequest, family: &Family, warnings: &mut Warnings) {
    let m = req.guidance.method;
    if m.cfg && req.guidance_scale <= 1.0 {
        warnings.push(format!(
            "guidance '{m}' asks for CFG but guidance_scale is {} (CFG runs only above 1, as in diffusers)",
            req.guidance_scale
        ));
    }
    if !m.cfg && req.guidance_scale > 1.0 {
        warnings.push(format!(
            "guidance_scale {} has no effect: guidance '{m}' has no cfg (the CFG scale is the guidance scale)",
            req.guidance_scale
        ));
    }
    if req.negative_prompt.is_some() && !req.guidance.uses_negative(family.cfg_scale, req.guidance_scale) {
        warnings.push(format!("the negative prompt is unused: guidance '{m}' does not use one"));
    }
}

/// The end of every denoising step: latents that are not finite stop the run (naming the step,
/// the method and the scales to lower: a NaN never reaches a file); finite ones are reported to
/// `on_step`. `guidance`: the request's guidance and guidance scale.
pub(crate) fn finish_step(
    latents: &Tensor,
    (index, total, timestep): (usize, usize, f64),
    attention_guided: bool,
    guidance: (&GuidanceConfig, f64),
    family: &Family,
    on_step: &mut dyn FnMut(StepEvent),
) -> Result<()> {
    ensure_finite(latents, (index, total, timestep), guidance, family)?;
    on_step(StepEvent { index, total, timestep, attention_guided, latents });
    Ok(())
}

/// Stop at the first step whose latents are not finite (see [`finish_step`]).
fn ensure_finite(
    latents: &Tensor,
    event: (usize, usize, f64),
    (guidance, guidance_scale): (&GuidanceConfig, f64),
    family: &Family,
) -> Result<()> {
    let x = latents.to_dtype(DType::F32)?;
    // 0·x is 0 where x is finite and NaN where it is not; the sum says which.
    let probe = (&x * 0.0)?.sum_all()?.to_scalar::<f32>()?;
    if probe == 0.0 {
        return Ok(());
    }
    let (index, total, timestep) = event;
    Err(crate::Error::NonFinite {
        step: index + 1,
        total,
        timestep,
        method: guidance.method.to_string(),
        parameters: guidance.scale_parameters(family.cfg_scale, guidance_scale),
    })
}

/// What a denoising run produced: everything needed to replay it, here or in diffusers.
#[derive(Debug, Clone)]
pub struct Denoised {
    /// Final latents `[1, C, H/f, W/f]` (unpacked), before VAE decode.
    pub latents: Tensor,
    /// The latents it started from `[1, C, H/f, W/f]`: the request's `init_latents` or the seeded
    /// noise (before the scheduler's `init_noise_sigma` scaling, as diffusers' `latents=`).
    pub init_latents: Tensor,
    /// The noise the sampler added between steps, `[N, 1, C, H/f, W/f]` (given or drawn; `None`
    /// when it drew none). With `init_latents` it replays the run
    /// ([`GenerateRequest::step_noise`]).
    pub step_noise: Option<Tensor>,
}

/// What one generation produced.
pub struct Generation {
    /// Final latents `[1, C, H/f, W/f]`, before VAE decode.
    pub latents: Tensor,
    /// The latents it started from `[1, C, H/f, W/f]` ([`Denoised::init_latents`]).
    pub init_latents: Tensor,
    /// The noise the sampler added between steps ([`Denoised::step_noise`]).
    pub step_noise: Option<Tensor>,
    /// The decoded image `[1, 3, H, W]`, values in about [-1, 1] ([`crate::image_io::save_png`]).
    pub image: Tensor,
    /// Warnings (truncated prompts, parameters without effect).
    pub warnings: Vec<String>,
    /// The request as it ran, defaults filled in.
    pub request: ResolvedRequest,
}

/// A loaded model of any supported family.
///
/// ```no_run
/// # fn main() -> veto::Result<()> {
/// let pipe = veto::Pipeline::from_pretrained("black-forest-labs/FLUX.1-schnell", &veto::Device::Cpu, veto::DType::F32)?;
/// let out = pipe.generate(&veto::GenerateRequest::new("Portrait of AI researcher.").negative("Glasses."))?;
/// veto::save_png(&out.image, "out.png".as_ref())?;
/// # Ok(()) }
/// ```
pub struct Pipeline {
    family: &'static Family,
    inner: Box<dyn TextToImage>,
    defaults: Defaults,
}

impl Pipeline {
    /// Load a model from a Hugging Face hub id (through the local hub cache), a diffusers
    /// folder, or a single-file checkpoint (`.safetensors`, over the official repo of its
    /// variant: [`ModelSource::resolve_with_base`] picks another base); its `model_index.json`
    /// names the pipeline class, the registry the family.
    pub fn from_pretrained(model: &str, device: &Device, dtype: DType) -> Result<Self> {
        Self::load(&ModelSource::resolve(model)?, device, dtype)
    }

    /// As [`from_pretrained`](Self::from_pretrained), from a resolved source.
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(source, &LoadOptions::new(device, dtype))
    }

    /// As [`load`](Self::load), with the text encoders' device and what stays in memory
    /// ([`LoadOptions`]).
    pub fn load_with(source: &ModelSource, options: &LoadOptions) -> Result<Self> {
        let family = families::detect(source)?;
        crate::loading::lora::check(source)?;
        let inner = (family.load)(source, options)?;
        let defaults = inner.defaults();
        Ok(Pipeline { family, inner, defaults })
    }

    /// What can be decided about a request from the model's config files alone, before any
    /// weights load: its family, its defaults, the request with them filled in, and the
    /// family's checks (method, options) and those the configs allow (UNet family: size, sampler
    /// options, initial latents, step noise). [`resolve`](Self::resolve) checks the rest.
    pub fn check_before_loading(
        source: &ModelSource,
        req: &GenerateRequest,
    ) -> Result<(&'static Family, Defaults, ResolvedRequest)> {
        let family = families::detect(source)?;
        let defaults = (family.defaults)(source)?;
        let resolved = family.resolve(req, &defaults)?;
        (family.check_configs)(source, &resolved)?;
        Ok((family, defaults, resolved))
    }

    /// The model family.
    pub fn family(&self) -> &'static Family {
        self.family
    }

    /// The loaded model's defaults (steps, size, guidance parameters).
    pub fn defaults(&self) -> &Defaults {
        &self.defaults
    }

    /// The request with the model's defaults filled in, checked against the family and the
    /// model before any work is done.
    pub fn resolve(&self, req: &GenerateRequest) -> Result<ResolvedRequest> {
        let resolved = self.family.resolve(req, &self.defaults)?;
        self.inner.validate(&resolved)?;
        Ok(resolved)
    }

    /// Generate: latents, decoded image and warnings.
    pub fn generate(&self, req: &GenerateRequest) -> Result<Generation> {
        self.generate_with(req, &mut |_| {})
    }

    /// As [`generate`](Self::generate), calling `on_step` after every denoising step.
    pub fn generate_with(&self, req: &GenerateRequest, on_step: &mut dyn FnMut(StepEvent)) -> Result<Generation> {
        let (denoised, warnings, request) = self.generate_latents(req, on_step)?;
        let image = self.decode_for(&denoised.latents, &request)?;
        let Denoised { latents, init_latents, step_noise } = denoised;
        Ok(Generation { latents, init_latents, step_noise, image, warnings, request })
    }

    /// Denoise only: the final latents with what replays them, the warnings and the resolved
    /// request.
    pub fn generate_latents(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent),
    ) -> Result<(Denoised, Vec<String>, ResolvedRequest)> {
        let resolved = self.resolve(req)?;
        let mut warnings = Warnings::default();
        let denoised = self.inner.generate_latents(&resolved, on_step, &mut warnings)?;
        Ok((denoised, warnings.into_vec(), resolved))
    }

    /// Decode latents `[1, C, H/f, W/f]` to an image tensor `[1, 3, H, W]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.inner.decode(latents)
    }

    /// Decode the latents of a run of `req` (as resolved) to the image size it asked for.
    pub fn decode_for(&self, latents: &Tensor, req: &ResolvedRequest) -> Result<Tensor> {
        self.inner.decode_for(latents, req)
    }

    /// Each weighted component and whether it is in memory now (see [`Residency`]).
    pub fn loaded_components(&self) -> Vec<(&'static str, bool)> {
        self.inner.loaded_components()
    }
}
