//! Pipelines: text -> latents -> image, one readable module per model family, all behind
//! the [`TextToImage`] trait so the CLI (and library users) drive them the same way.

pub mod flux;
pub mod noise;
pub mod sd3;
pub mod sdxl;

use crate::error::Result;
use crate::guidance::GuidanceConfig;
use candle_core::Tensor;

/// Per-model defaults (official NAG README / diffusers model cards).
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub steps: usize,
    /// The pipeline's `guidance_scale` (Flux-dev: embedded guidance; SD3/SDXL: the CFG scale).
    pub guidance_scale: f64,
    pub max_sequence_length: usize,
    pub height: usize,
    pub width: usize,
    /// The guidance parameters this model family is tuned for (NAG paper Table 5, VSF paper).
    pub guidance: GuidanceConfig,
}

/// One generation request, model-independent.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// Used by NAG/NASA/VSF (attention) and CFG (second pass); `None` means the empty prompt,
    /// as the official pipelines do.
    pub negative_prompt: Option<String>,
    pub guidance: GuidanceConfig,
    pub steps: usize,
    pub height: usize,
    pub width: usize,
    /// The pipeline's `guidance_scale` as diffusers means it for this model.
    pub guidance_scale: f64,
    /// T5 tokens (models with a T5 encoder).
    pub max_sequence_length: usize,
    pub seed: u64,
    /// Initial latents `[1, C, H/f, W/f]` instead of seeded noise (unpacked layout).
    pub init_latents: Option<Tensor>,
    /// Scheduler/PAG options only some families have (an error elsewhere).
    pub sampler: SamplerOptions,
}

/// diffusers pipeline arguments that only some families take.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplerOptions {
    /// Explicit timesteps instead of the scheduler's rule (diffusers `timesteps=`; DMD2's card
    /// uses 999, 749, 499, 249). Their count overrides the steps. UNet family.
    pub timesteps: Option<Vec<f64>>,
    /// diffusers' `eta` (DDIM noise, TCD's gamma). UNet family.
    pub eta: Option<f64>,
    /// diffusers' `pag_applied_layers` (default `["mid"]`). UNet family.
    pub pag_layers: Option<Vec<String>>,
}

impl SamplerOptions {
    /// Reject options for a family that has none of them, naming the flags.
    pub fn reject_for(&self, family: &str) -> Result<()> {
        let mut given = Vec::new();
        if self.timesteps.is_some() {
            given.push("--timesteps");
        }
        if self.eta.is_some() {
            given.push("--eta");
        }
        if self.pag_layers.is_some() {
            given.push("--pag-layers");
        }
        if given.is_empty() {
            Ok(())
        } else {
            Err(crate::Error::invalid(format!("{} not supported for {family}", given.join(", "))))
        }
    }
}

/// What a pipeline reports after each step.
pub struct StepEvent<'a> {
    pub index: usize,
    pub total: usize,
    pub timestep: f64,
    /// Whether attention guidance ran at this step.
    pub attention_guided: bool,
    /// Latents after the step, `[1, C, H/f, W/f]` (unpacked).
    pub latents: &'a Tensor,
}

/// A text-to-image pipeline.
pub trait TextToImage {
    /// Defaults of the loaded model.
    fn defaults(&self) -> Defaults;
    /// Check a request before any work is done.
    fn validate(&self, req: &GenerateRequest) -> Result<()>;
    /// Denoise to the final latents (unpacked, before VAE decode).
    fn generate_latents(&self, req: &GenerateRequest, on_step: &mut dyn FnMut(StepEvent)) -> Result<Tensor>;
    /// Decode latents to an image tensor `[1, 3, H, W]` in about [-1, 1].
    fn decode(&self, latents: &Tensor) -> Result<Tensor>;
    /// Warnings collected so far (truncated prompts, ignored flags), drained.
    fn take_warnings(&self) -> Vec<String>;
}

/// Load the pipeline a diffusers folder declares in `model_index.json` (`_class_name`).
pub fn load(
    source: &crate::loading::model_source::ModelSource,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<Box<dyn TextToImage>> {
    let index = source.file("model_index.json")?;
    let json: serde_json::Value = crate::loading::safetensors_files::read_json(&index, "model_index.json")?;
    let class = json.get("_class_name").and_then(|c| c.as_str()).unwrap_or("");
    match class {
        "FluxPipeline" => Ok(Box::new(flux::FluxPipeline::load(source, device, dtype)?)),
        "StableDiffusion3Pipeline" => Ok(Box::new(sd3::Sd3Pipeline::load(source, device, dtype)?)),
        "StableDiffusionPipeline" | "StableDiffusionXLPipeline" => {
            Ok(Box::new(sdxl::StableDiffusionPipeline::load(source, device, dtype)?))
        }
        other => Err(crate::Error::BadModelFile {
            path: index.display().to_string(),
            reason: format!(
                "pipeline '{other}' is not supported (supported: FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline)"
            ),
        }),
    }
}
