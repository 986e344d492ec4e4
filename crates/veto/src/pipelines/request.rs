//! A generation request as a user writes it ([`GenerateRequest`], unset fields take the
//! model's defaults) and as a pipeline runs it ([`ResolvedRequest`]).

use crate::error::{Error, Result};
use crate::families::Family;
use crate::guidance::{AttentionGuidance, Contrast, GuidanceConfig, Method};
use crate::image_io::ImageMetadata;
use candle_core::Tensor;

/// Per-model defaults (official NAG README / diffusers model cards).
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// Denoising steps.
    pub steps: usize,
    /// The pipeline's `guidance_scale` (Flux-dev: embedded guidance; SD3/SDXL: the CFG scale).
    pub guidance_scale: f64,
    /// T5 tokens (models with a T5 encoder; CLIP's 77 elsewhere).
    pub max_sequence_length: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// The guidance this model is tuned for (NAG paper Table 5, VSF paper); its method is the
    /// one used with a negative prompt.
    pub guidance: GuidanceConfig,
}

impl Defaults {
    /// The default method: the model's with a negative prompt; without one, its attention
    /// part is dropped (there is nothing to contrast) and CFG, if any, runs on the empty prompt.
    pub fn method_for(&self, has_negative_prompt: bool) -> Method {
        if has_negative_prompt {
            self.guidance.method
        } else {
            Method { attention: None, ..self.guidance.method }
        }
    }
}

/// diffusers pipeline arguments that only some families take (see
/// [`crate::families::Family::sampler_options`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplerOptions {
    /// Explicit timesteps instead of the scheduler's rule (diffusers `timesteps=`; DMD2's card
    /// uses 999, 749, 499, 249). Their count overrides the steps.
    pub timesteps: Option<Vec<f64>>,
    /// diffusers' `eta` (DDIM noise, TCD's gamma).
    pub eta: Option<f64>,
    /// diffusers' `pag_applied_layers` (default `["mid"]`).
    pub pag_layers: Option<Vec<String>>,
    /// Another scheduler than the model folder's, built from its config (a diffusers class
    /// name or an A1111/ComfyUI name: `euler_a`, `dpmpp_2m_karras`, `plms`, ...).
    pub scheduler: Option<String>,
    /// SANA's `complex_human_instruction`: `default` (diffusers' prefix) or `none`.
    pub complex_human_instruction: Option<String>,
}

/// One option of [`SamplerOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerOption {
    /// `timesteps`
    Timesteps,
    /// `eta`
    Eta,
    /// `pag_applied_layers`
    PagLayers,
    /// `scheduler`
    Scheduler,
    /// `complex_human_instruction`
    ComplexHumanInstruction,
}

impl SamplerOption {
    /// The parameter's name.
    pub fn name(self) -> &'static str {
        match self {
            SamplerOption::Timesteps => "timesteps",
            SamplerOption::Eta => "eta",
            SamplerOption::PagLayers => "pag_layers",
            SamplerOption::Scheduler => "scheduler",
            SamplerOption::ComplexHumanInstruction => "complex_human_instruction",
        }
    }
}

impl SamplerOptions {
    /// The options that are set.
    pub fn given(&self) -> Vec<SamplerOption> {
        let mut given = Vec::new();
        if self.timesteps.is_some() {
            given.push(SamplerOption::Timesteps);
        }
        if self.eta.is_some() {
            given.push(SamplerOption::Eta);
        }
        if self.pag_layers.is_some() {
            given.push(SamplerOption::PagLayers);
        }
        if self.scheduler.is_some() {
            given.push(SamplerOption::Scheduler);
        }
        if self.complex_human_instruction.is_some() {
            given.push(SamplerOption::ComplexHumanInstruction);
        }
        given
    }
}

/// What to generate. Build it with [`GenerateRequest::new`] and the builder methods; every
/// field left unset takes the loaded model's default ([`Defaults`]).
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    /// What the image should show.
    pub prompt: String,
    /// What it should not show; `None` is the empty prompt, as the official pipelines.
    pub negative_prompt: Option<String>,
    /// The guidance parameters (and method); default: the model's ([`Defaults::guidance`]).
    pub guidance: Option<GuidanceConfig>,
    /// Overrides the method of `guidance`; default: [`Defaults::method_for`].
    pub method: Option<Method>,
    /// Denoising steps.
    pub steps: Option<usize>,
    /// Image height in pixels.
    pub height: Option<usize>,
    /// Image width in pixels.
    pub width: Option<usize>,
    /// The pipeline's `guidance_scale` as diffusers means it for this model.
    pub guidance_scale: Option<f64>,
    /// T5 tokens (models with a T5 encoder).
    pub max_sequence_length: Option<usize>,
    /// Seed of the initial noise (and of stochastic samplers).
    pub seed: u64,
    /// Initial latents `[1, C, H/f, W/f]` instead of seeded noise (unpacked layout).
    pub init_latents: Option<Tensor>,
    /// The noise a stochastic sampler adds between steps, `[N, 1, C, H/f, W/f]`: draw `k` is
    /// `step_noise[k]`, in the order diffusers' scheduler calls its generator (README, *Replaying
    /// stochastic samplers*); `None`: drawn from `seed`. Deterministic samplers leave it unused
    /// (with a warning).
    pub step_noise: Option<Tensor>,
    /// Options only some families take.
    pub sampler: SamplerOptions,
    /// Video options (Wan); image families refuse any that is set.
    pub video: VideoOptions,
}

/// What a video family (Wan) takes beyond an image request; every field optional.
#[derive(Debug, Clone, Default)]
pub struct VideoOptions {
    /// Frames, `4k + 1` (others are rounded with a warning); `None`: the model's default (81).
    pub frames: Option<usize>,
    /// Overrides the scheduler config's `flow_shift`.
    pub flow_shift: Option<f64>,
    /// The first frame of image-to-video, at any size: the pipeline resizes it to the video's
    /// (Pillow Lanczos, as diffusers) and gives the original to CLIP vision (as diffusers).
    pub image: Option<image::RgbImage>,
}

impl VideoOptions {
    /// Whether any option is set.
    pub fn any(&self) -> bool {
        self.frames.is_some() || self.flow_shift.is_some() || self.image.is_some()
    }
}

impl GenerateRequest {
    /// A request for `prompt` with the model's defaults.
    pub fn new(prompt: impl Into<String>) -> Self {
        GenerateRequest { prompt: prompt.into(), ..Default::default() }
    }

    /// The negative prompt.
    pub fn negative(mut self, negative_prompt: impl Into<String>) -> Self {
        self.negative_prompt = Some(negative_prompt.into());
        self
    }

    /// All guidance parameters, method included.
    pub fn guidance(mut self, guidance: GuidanceConfig) -> Self {
        self.guidance = Some(guidance);
        self
    }

    /// The guidance method (`"cfg+nag".parse()?`), keeping the other parameters.
    pub fn method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }

    /// Denoising steps.
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = Some(steps);
        self
    }

    /// Image size in pixels.
    pub fn size(mut self, height: usize, width: usize) -> Self {
        self.height = Some(height);
        self.width = Some(width);
        self
    }

    /// The pipeline's `guidance_scale`.
    pub fn guidance_scale(mut self, scale: f64) -> Self {
        self.guidance_scale = Some(scale);
        self
    }

    /// T5 tokens.
    pub fn max_sequence_length(mut self, tokens: usize) -> Self {
        self.max_sequence_length = Some(tokens);
        self
    }

    /// The noise seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Start from these latents instead of seeded noise.
    pub fn init_latents(mut self, latents: Tensor) -> Self {
        self.init_latents = Some(latents);
        self
    }

    /// Replay this step noise `[N, 1, C, H/f, W/f]` instead of drawing it from the seed (one row
    /// per draw of the sampler, in order; a run's [`Generation::step_noise`](crate::Generation::step_noise)).
    pub fn step_noise(mut self, noise: Tensor) -> Self {
        self.step_noise = Some(noise);
        self
    }

    /// Family-specific sampler options.
    pub fn sampler(mut self, sampler: SamplerOptions) -> Self {
        self.sampler = sampler;
        self
    }

    /// Fill unset fields from `defaults` and validate the guidance parameters.
    pub fn resolve(&self, defaults: &Defaults) -> Result<ResolvedRequest> {
        let mut guidance = self.guidance.clone().unwrap_or_else(|| defaults.guidance.clone());
        guidance.method = match (self.method, &self.guidance) {
            (Some(m), _) => m,
            (None, Some(g)) => g.method,
            (None, None) => defaults.method_for(self.negative_prompt.is_some()),
        };
        guidance.validate()?;
        let guidance_scale = self.guidance_scale.unwrap_or(defaults.guidance_scale);
        if !guidance_scale.is_finite() || guidance_scale < 0.0 {
            return Err(Error::parameter("guidance_scale", format!("must be >= 0, got {guidance_scale}")));
        }
        Ok(ResolvedRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            guidance,
            steps: self.steps.unwrap_or(defaults.steps),
            height: self.height.unwrap_or(defaults.height),
            width: self.width.unwrap_or(defaults.width),
            guidance_scale,
            max_sequence_length: self.max_sequence_length.unwrap_or(defaults.max_sequence_length),
            seed: self.seed,
            init_latents: self.init_latents.clone(),
            step_noise: self.step_noise.clone(),
            sampler: self.sampler.clone(),
            video: self.video.clone(),
        })
    }
}

/// A request with every value decided, as a pipeline runs it.
#[derive(Debug, Clone)]
pub struct ResolvedRequest {
    /// What the image should show.
    pub prompt: String,
    /// What it should not show (`None`: the empty prompt).
    pub negative_prompt: Option<String>,
    /// Method and parameters, validated.
    pub guidance: GuidanceConfig,
    /// Denoising steps.
    pub steps: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// The pipeline's `guidance_scale`.
    pub guidance_scale: f64,
    /// T5 tokens.
    pub max_sequence_length: usize,
    /// Noise seed.
    pub seed: u64,
    /// Initial latents `[1, C, H/f, W/f]`.
    pub init_latents: Option<Tensor>,
    /// The step noise to replay `[N, 1, C, H/f, W/f]` (`None`: drawn from `seed`).
    pub step_noise: Option<Tensor>,
    /// Family-specific sampler options.
    pub sampler: SamplerOptions,
    /// Video options (Wan).
    pub video: VideoOptions,
}

impl ResolvedRequest {
    /// Check that height and width are positive multiples of `multiple` (the pixels one latent
    /// token covers), naming the parameter that is not.
    pub fn check_size(&self, multiple: usize) -> Result<()> {
        for (name, v) in [("height", self.height), ("width", self.width)] {
            if v == 0 || !v.is_multiple_of(multiple) {
                return Err(Error::parameter(
                    name,
                    format!(
                        "height and width must be positive multiples of {multiple} for this model, got {}x{}",
                        self.height, self.width
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Check the step count (`allow_zero`: explicit timesteps give the count instead).
    pub fn check_steps(&self) -> Result<()> {
        if self.steps == 0 && self.sampler.timesteps.is_none() {
            return Err(Error::parameter("steps", "must be at least 1"));
        }
        Ok(())
    }

    /// Refuse sizes whose activations could not fit any machine veto runs on. Each term is
    /// `(positions, channels, buffers)`: that many live f32 copies of a `[positions, channels]`
    /// map at the peak (the denoiser's latent tokens, the VAE decoder's full-resolution maps).
    /// The ceiling is the larger of this host's memory and 192 GiB (a GPU's memory is not
    /// visible here), so it stops absurd sizes (100000x100000) before any weights load, with
    /// the estimate, instead of an allocation failure after minutes.
    pub fn check_activation_memory(&self, terms: &[(u64, u64, u64)]) -> Result<()> {
        let needed = terms.iter().fold(0u64, |sum, &(positions, channels, buffers)| {
            sum.saturating_add(positions.saturating_mul(channels).saturating_mul(4).saturating_mul(buffers))
        });
        let ceiling = super::memory::total_host_bytes().unwrap_or(0).max(192 << 30);
        if needed > ceiling {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(Error::parameter(
                "height",
                format!(
                    "a {}x{} image needs about {:.0} GiB of activations, more than {:.0} GiB; lower height and width",
                    self.height,
                    self.width,
                    gib(needed),
                    gib(ceiling)
                ),
            ));
        }
        Ok(())
    }

    /// Check `init_latents` against the shape the model expects.
    pub fn check_init_latents(&self, want: &[usize], factor: usize) -> Result<()> {
        if let Some(init) = &self.init_latents {
            if init.dims() != want {
                return Err(Error::parameter(
                    "init_latents",
                    format!(
                        "init latents have shape {:?}, expected {want:?} ([1, C, H/{factor}, W/{factor}] for {}x{})",
                        init.dims(),
                        self.height,
                        self.width
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Check `step_noise` against what the sampler draws: one tensor shaped like the latents
    /// `latent` at each of its `noise_steps` (`[N, 1, C, H/f, W/f]`). `sampler` names it for the
    /// message (`LCMScheduler with 4 steps`). A sampler that draws nothing leaves a given step
    /// noise unused: not an error here (the pipeline warns).
    pub fn check_step_noise(&self, sampler: &str, noise_steps: &[usize], latent: &[usize]) -> Result<()> {
        let Some(noise) = &self.step_noise else {
            return Ok(());
        };
        let draws = noise_steps.len();
        if draws == 0 {
            return Ok(());
        }
        let at = noise_steps.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
        let dims = noise.dims();
        if dims.len() == latent.len() + 1 && dims[1..] == *latent {
            if dims[0] != draws {
                return Err(Error::parameter(
                    "step_noise",
                    format!("step noise has {} noise tensors, {sampler} draws {draws} (at steps {at})", dims[0]),
                ));
            }
            return Ok(());
        }
        let mut want = vec![draws];
        want.extend_from_slice(latent);
        Err(Error::parameter(
            "step_noise",
            format!(
                "step noise has shape {dims:?}, expected {want:?}: {sampler} draws {draws} noise tensors (at steps {at}) \
                 shaped like the latents {latent:?}"
            ),
        ))
    }
}

impl ResolvedRequest {
    /// The record of this generation for the image file ([`ImageMetadata`]): the A1111-style
    /// `parameters` text and the same as JSON, naming only the parameters of the methods used.
    pub fn metadata(&self, model: &str, family: &Family) -> ImageMetadata {
        let g = &self.guidance;
        let mut fields: Vec<(&str, String)> = vec![
            ("Steps", self.sampler.timesteps.as_ref().map_or(self.steps, Vec::len).to_string()),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
            ("Model", model.to_string()),
            ("Guidance", g.method.to_string()),
            ("Guidance scale", self.guidance_scale.to_string()),
        ];
        let mut json = serde_json::json!({
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "model": model,
            "family": family.name,
            "guidance": g.method.to_string(),
            "steps": self.steps,
            "height": self.height,
            "width": self.width,
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
            "seed": self.seed,
            "init_latents": self.init_latents.is_some(),
            "veto_version": env!("CARGO_PKG_VERSION"),
        });
        let mut set = |key: &str, value: serde_json::Value| json[key] = value;
        if g.nag_variant != crate::guidance::NagVariant::Official && g.uses_contrast() {
            fields.push(("NAG variant", g.nag_variant.to_string()));
            set("nag_variant", g.nag_variant.to_string().into());
        }
        match g.attention() {
            Some(AttentionGuidance::Contrast(Contrast::Nag(p))) => {
                fields.extend([
                    ("NAG scale", p.scale.to_string()),
                    ("NAG tau", p.tau.to_string()),
                    ("NAG alpha", p.alpha.to_string()),
                    ("NAG norm", p.norm.to_string()),
                    ("NAG end", g.nag_end.to_string()),
                ]);
                set("nag_scale", p.scale.into());
                set("nag_tau", p.tau.into());
                set("nag_alpha", p.alpha.into());
                set("nag_norm", p.norm.to_string().into());
                set("nag_end", g.nag_end.into());
            }
            Some(AttentionGuidance::Contrast(Contrast::Nasa { scale })) => {
                fields.extend([("NASA scale", scale.to_string()), ("NAG end", g.nag_end.to_string())]);
                set("nasa_scale", scale.into());
                set("nag_end", g.nag_end.into());
            }
            Some(AttentionGuidance::Vsf(p)) => {
                fields.extend([
                    ("VSF scale", p.scale.to_string()),
                    ("VSF bias", p.bias.to_string()),
                    ("VSF layout", p.layout.to_string()),
                ]);
                set("vsf_scale", p.scale.into());
                set("vsf_bias", p.bias.into());
                set("vsf_layout", p.layout.to_string().into());
            }
            None => {}
        }
        if let Some(scale) = g.cfg_scale(family.cfg_scale, self.guidance_scale) {
            fields.push(("CFG scale", scale.to_string()));
            set("cfg_scale", scale.into());
        }
        if g.uses_pag() {
            fields.push(("PAG scale", g.pag_scale.to_string()));
            set("pag_scale", g.pag_scale.into());
        }
        if let Some(ts) = &self.sampler.timesteps {
            set("timesteps", serde_json::json!(ts));
        }
        if let Some(eta) = self.sampler.eta {
            set("eta", eta.into());
        }
        if let Some(layers) = &self.sampler.pag_layers {
            set("pag_layers", serde_json::json!(layers));
        }
        if let Some(name) = &self.sampler.scheduler {
            fields.push(("Sampler", name.clone()));
            set("scheduler", name.as_str().into());
        }
        fields.push(("Version", format!("veto {}", env!("CARGO_PKG_VERSION"))));
        let mut parameters = self.prompt.clone();
        if let Some(n) = &self.negative_prompt {
            parameters.push_str(&format!("\nNegative prompt: {n}"));
        }
        let list: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        parameters.push_str(&format!("\n{}", list.join(", ")));
        ImageMetadata { parameters, json: json.to_string() }
    }
}

/// The VAE decoder's share of [`ResolvedRequest::check_activation_memory`]: its last level runs
/// at full resolution with `channels` (its first `block_out_channels`), ~6 maps live.
pub fn vae_decoder_term(req: &ResolvedRequest, channels: usize) -> (u64, u64, u64) {
    (req.height as u64 * req.width as u64, channels as u64, 6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        let mut guidance = GuidanceConfig::nag_default();
        guidance.method = Method::CFG_NAG;
        Defaults { steps: 4, guidance_scale: 3.5, max_sequence_length: 256, height: 1024, width: 512, guidance }
    }

    #[test]
    fn unset_fields_take_the_model_defaults() {
        let r = GenerateRequest::new("a cat").resolve(&defaults()).unwrap();
        assert_eq!((r.steps, r.height, r.width, r.guidance_scale), (4, 1024, 512, 3.5));
        // No negative prompt: the attention part of the default method is dropped.
        assert_eq!(r.guidance.method, Method::CFG);
        let r = GenerateRequest::new("a cat").negative("a dog").size(64, 32).steps(2).resolve(&defaults()).unwrap();
        assert_eq!(r.guidance.method, Method::CFG_NAG);
        assert_eq!((r.steps, r.height, r.width), (2, 64, 32));
        let r = GenerateRequest::new("a cat").method(Method::NAG).resolve(&defaults()).unwrap();
        assert_eq!(r.guidance.method, Method::NAG);
    }

    #[test]
    fn metadata_names_the_methods_parameters_only() {
        let r = GenerateRequest::new("a cat").negative("a dog").seed(7).resolve(&defaults()).unwrap();
        let m = r.metadata("tiny", &crate::families::SD3);
        assert!(
            m.parameters.starts_with("a cat\nNegative prompt: a dog\nSteps: 4, Seed: 7, Size: 512x1024"),
            "{}",
            m.parameters
        );
        assert!(m.parameters.contains("NAG scale: 5") && m.parameters.contains("CFG scale: 3.5"), "{}", m.parameters);
        assert!(!m.parameters.contains("VSF"), "{}", m.parameters);
        let json: serde_json::Value = serde_json::from_str(&m.json).unwrap();
        assert_eq!(json["seed"], 7);
        assert_eq!(json["guidance"], "cfg+nag");
        assert_eq!(json["nag_tau"], 2.5);
        assert!(json.get("vsf_scale").is_none());
    }

    #[test]
    fn absurd_sizes_are_refused_with_an_estimate() {
        let r = GenerateRequest::new("x").size(100_000, 100_000).resolve(&defaults()).unwrap();
        let e = r.check_activation_memory(&[((100_000 / 16) * (100_000 / 16), 3072, 24)]).unwrap_err().to_string();
        assert!(e.starts_with("height: a 100000x100000 image needs about"), "{e}");
        let r = GenerateRequest::new("x").size(1024, 1024).resolve(&defaults()).unwrap();
        r.check_activation_memory(&[(64 * 64, 3072, 24), (1024 * 1024, 128, 6)]).unwrap();
    }

    #[test]
    fn errors_name_the_parameter() {
        let mut g = GuidanceConfig::nag_default();
        g.nag.tau = -1.0;
        let e = GenerateRequest::new("x").guidance(g).resolve(&defaults()).unwrap_err();
        assert!(matches!(e, Error::InvalidParameter { name: "nag_tau", .. }), "{e}");
        let r = GenerateRequest::new("x").size(72, 64).resolve(&defaults()).unwrap();
        let e = r.check_size(16).unwrap_err();
        assert!(matches!(e, Error::InvalidParameter { name: "height", .. }), "{e}");
        let e = GenerateRequest::new("x").guidance_scale(f64::NAN).resolve(&defaults()).unwrap_err();
        assert!(matches!(e, Error::InvalidParameter { name: "guidance_scale", .. }), "{e}");
    }
}
