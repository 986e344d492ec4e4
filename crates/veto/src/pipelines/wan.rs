//! Wan2.1 text-to-video and image-to-video: the pieces of diffusers' `WanPipeline` /
//! `WanImageToVideoPipeline` between the encoders and the VAE: the frame count rule (4k+1,
//! rounded with a warning), the latent shape, the text conditioning each method needs, and the
//! denoising loop ([`denoise`]: UniPC or FlowMatch Euler, CFG batched `[uncond, cond]`, the
//! attention method on the conditional row while its window is open).
//!
//! Conditioning as the official code builds it:
//! - plain / CFG: the prompt (and the CFG negative prompt) as UMT5 states padded with zero rows
//!   to `max_sequence_length` (512);
//! - NAG / NASA: the NAG negative padded the same way, attended by the conditional row's
//!   queries in every `attn2` (the official NAG Wan processor);
//! - VSF: the negative prompt unpadded (its `n` real rows), the prompt padded to `512 - n`, so
//!   the context `[P, N]` keeps 512 rows (the official VSF Wan code); no CFG.
//!
//! [`WanPipeline`] runs either diffusers folder: `WanPipeline` (text-to-video: UMT5 + tokenizer,
//! transformer, `AutoencoderKLWan`, UniPC) and `WanImageToVideoPipeline` (the same plus
//! `image_encoder/` CLIP vision and `image_processor/`; the transformer config says which). For
//! I2V the input image is preprocessed twice as diffusers does: the original goes through the
//! CLIP image processor to the encoder's penultimate states, and a copy resized to the video's
//! size with Pillow's Lanczos ([`first_frame_pixels`]) becomes the VAE condition
//! ([`i2v_condition`]). It is a library API of its own ([`WanRequest`]) and the registry's `wan`
//! family ([`TextToImage`], whose `decode` gives a video `[1, 3, F, H, W]`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::noise::gaussian;
use super::residency::Component;
use super::{Defaults, Denoised, LoadOptions, ResolvedRequest, StepEvent, TextToImage, Warnings};
use crate::error::{Error, Result};
use crate::families::WAN;
use crate::guidance::{CfgScaleSource, GuidanceConfig, GuidancePlanner, Method, NegativeContext, StepWindow};
use crate::loading::components::{component_weights, t5_tokenizer_dir};
use crate::loading::model_source::ModelSource;
use crate::models::clip_vision::{ClipImageProcessor, ClipVisionEncoder};
use crate::models::wan::{WanConfig, WanInputs, WanTransformer3DModel};
use crate::models::wan_vae::AutoencoderKlWan;
use crate::schedulers::flow_match_euler::{FlowMatchEulerScheduler, SigmaSource};
use crate::schedulers::scheduler::{NoNoise, Scheduler};
use crate::schedulers::unipc::UniPcMultistepScheduler;
use crate::text::t5::T5Tokenizer;
use crate::text::umt5::Umt5TextEncoder;
use crate::text::wan_prompt::{encode_wan_prompt, WanPromptEmbeds};

/// The text rows the Wan pipelines pad to (`max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 512;
/// The VAE's temporal compression: frame counts are `4k + 1`.
pub const TEMPORAL_FACTOR: usize = 4;
/// The VAE's spatial compression.
pub const SPATIAL_FACTOR: usize = 8;
/// Height and width must be multiples of this (the VAE's 8 times the transformer's 2x2 patch).
pub const SIZE_MULTIPLE: usize = 16;

/// diffusers' frame rule: a count that is not `4k + 1` becomes `frames / 4 * 4 + 1`, with a
/// warning; at least 1.
pub fn round_frames(frames: usize, warnings: &mut Warnings) -> usize {
    if frames % TEMPORAL_FACTOR == 1 {
        return frames;
    }
    let rounded = (frames / TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1).max(1);
    warnings.push(format!(
        "--frames {frames}: Wan generates 4k+1 frames (frames - 1 divisible by {TEMPORAL_FACTOR}); rounded to {rounded} as diffusers does"
    ));
    rounded
}

/// The latent video shape `[1, channels, (frames - 1) / 4 + 1, height / 8, width / 8]`, after
/// checking the size.
pub fn latent_shape(channels: usize, frames: usize, height: usize, width: usize) -> Result<[usize; 5]> {
    if height == 0 || width == 0 || !height.is_multiple_of(SIZE_MULTIPLE) || !width.is_multiple_of(SIZE_MULTIPLE) {
        return Err(Error::invalid(format!(
            "Wan: height and width must be positive multiples of {SIZE_MULTIPLE}, got {height}x{width}"
        )));
    }
    if frames == 0 || frames % TEMPORAL_FACTOR != 1 {
        return Err(Error::invalid(format!("Wan: {frames} frames is not 4k+1")));
    }
    Ok([1, channels, (frames - 1) / TEMPORAL_FACTOR + 1, height / SPATIAL_FACTOR, width / SPATIAL_FACTOR])
}

/// VSF's context from the encoded prompts: the prompt's first `rows - n` rows (its real tokens
/// and zero padding) and the negative's `n` real rows. `positive`: `[1, rows, D]` padded;
/// `negative_unpadded`: `[1, n, D]`.
pub fn vsf_context(positive: &Tensor, negative_unpadded: &Tensor) -> Result<Tensor> {
    let (rows, n) = (positive.dim(1)?, negative_unpadded.dim(1)?);
    if n == 0 || n >= rows {
        return Err(Error::invalid(format!(
            "VSF: the negative prompt has {n} tokens; it needs 1 to {} beside the prompt's {rows} rows",
            rows - 1
        )));
    }
    Ok(positive.narrow(1, 0, rows - n)?)
}

/// `WanImageToVideoPipeline`'s conditioning channels `[1, 4 + z, F', H/8, W/8]` for an image
/// `[1, 3, H, W]` in [-1, 1]: the frame mask (diffusers builds it per pixel frame, repeats the
/// first frame 4 times and folds time into 4 channels, which leaves ones on the first latent frame
/// and zeros after) and the normalized VAE latents of the video `[image, 0, 0, ...]` of `frames`
/// frames.
pub fn i2v_condition(vae: &AutoencoderKlWan, image: &Tensor, frames: usize) -> Result<Tensor> {
    let (_, c, h, w) = image.dims4()?;
    let [_, _, lf, lh, lw] = latent_shape(TEMPORAL_FACTOR, frames, h, w)?;
    let image = image.to_dtype(DType::F32)?.unsqueeze(2)?;
    let rest = Tensor::zeros((1, c, frames - 1, h, w), DType::F32, image.device())?;
    let video = Tensor::cat(&[&image, &rest], 2)?;
    let latents = vae.normalize_latents(&vae.encode(&video)?)?.to_dtype(DType::F32)?;
    let first = Tensor::ones((1, TEMPORAL_FACTOR, 1, lh, lw), DType::F32, image.device())?;
    let mask = if lf > 1 {
        let zeros = Tensor::zeros((1, TEMPORAL_FACTOR, lf - 1, lh, lw), DType::F32, image.device())?;
        Tensor::cat(&[&first, &zeros], 2)?
    } else {
        first
    };
    Ok(Tensor::cat(&[&mask, &latents], 1)?)
}

/// `VaeImageProcessor.preprocess` of a PIL image as the I2V pipeline calls it: resized to
/// `width x height` with Pillow's Lanczos (aspect ratio not kept, no crop), then to [-1, 1];
/// `[1, 3, height, width]` f32 on `device`.
pub fn first_frame_pixels(image: &RgbImage, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::parameter("image", "the input image is empty"));
    }
    let resized = crate::pil_resize::resize(image, width as u32, height as u32, crate::pil_resize::Filter::Lanczos);
    let data: Vec<f32> = resized.as_raw().iter().map(|&v| v as f32 / 255.0 * 2.0 - 1.0).collect();
    Ok(Tensor::from_vec(data, (height, width, 3), device)?.permute((2, 0, 1))?.contiguous()?.unsqueeze(0)?)
}

/// The image-to-video pipeline's image encoder: `image_processor/` and `image_encoder/` (CLIP
/// ViT-H, 2.5 GB in f32; freed after encoding under sequential residency).
struct ImageEncoder {
    processor: ClipImageProcessor,
    encoder: Component<ClipVisionEncoder>,
}

impl ImageEncoder {
    fn load(source: &ModelSource, device: &Device, residency: super::residency::Residency) -> Result<Self> {
        let config = source.file("image_processor/preprocessor_config.json")?;
        let processor = ClipImageProcessor::load(config.parent().unwrap_or(Path::new(".")))?;
        let (weights, device) = (component_weights(source, "image_encoder", "model")?, device.clone());
        let encoder = Component::with_residency("image_encoder", residency, false, move || {
            ClipVisionEncoder::load_weights(&weights, &device, DType::F32)
        })?;
        Ok(Self { processor, encoder })
    }

    /// `WanImageToVideoPipeline.encode_image`: the CLIP image processor on the original image,
    /// then the encoder's penultimate hidden states `[1, tokens, dim]`, on `device`.
    fn encode(&self, image: &RgbImage, device: &Device) -> Result<Tensor> {
        let encoder = self.encoder.get()?;
        let pixels = self.processor.preprocess(image)?.to_device(encoder.device())?;
        let states = encoder.forward(&pixels)?.to_device(device)?;
        drop(encoder);
        self.encoder.release();
        Ok(states)
    }
}

/// The conditioning of one Wan run, as the transformer receives it.
pub struct WanConditioning {
    /// The prompt, `[1, L, text_dim]` (VSF: `[1, L - n, text_dim]`, see [`vsf_context`]).
    pub positive: Tensor,
    /// CFG's unconditional context `[1, L, text_dim]` (the negative prompt, padded).
    pub uncond: Option<Tensor>,
    /// The attention method's negative: NAG / NASA `[1, L, text_dim]` padded, VSF `[1, n, text_dim]`.
    pub negative: Option<Tensor>,
    /// I2V: the CLIP vision states `[1, 257, image_dim]`.
    pub image: Option<Tensor>,
    /// I2V: the mask and image latents `[1, 20, F', H', W']` concatenated after the latents.
    pub condition: Option<Tensor>,
}

/// WanPipeline's denoising loop from `latents` (`[1, 16, F', H', W']`, f32): per step the plan of
/// `planner`, one transformer call (CFG: batch `[uncond, cond]`, the method on the cond row),
/// CFG's combination, the scheduler step; a step whose latents are not finite stops the run with
/// an error naming the step and `guidance`'s scales (the request's guidance and guidance scale).
/// The scheduler must be set to its timesteps.
pub fn denoise(
    model: &WanTransformer3DModel,
    scheduler: &mut dyn Scheduler,
    planner: &mut GuidancePlanner,
    guidance: (&GuidanceConfig, f64),
    cond: &WanConditioning,
    mut latents: Tensor,
    on_step: &mut dyn FnMut(StepEvent),
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len();
    for (index, &t) in timesteps.iter().enumerate() {
        let plan = planner.step(t);
        let input = match &cond.condition {
            Some(c) => Tensor::cat(&[&latents, &c.to_dtype(latents.dtype())?], 1)?,
            None => latents.clone(),
        };
        let (input, context, cond_row) = match (plan.cfg_scale, &cond.uncond) {
            (Some(_), Some(uncond)) => {
                (Tensor::cat(&[&input, &input], 0)?, Tensor::cat(&[uncond, &cond.positive], 0)?, 1)
            }
            (Some(_), None) => return Err(Error::invalid("CFG runs but no negative prompt was encoded")),
            (None, _) => (input, cond.positive.clone(), 0),
        };
        let negative = match (&plan.attention, &cond.negative) {
            (Some(method), Some(states)) => {
                Some(NegativeContext { method, states, pooled: None, rows: cond_row..cond_row + 1 })
            }
            (Some(_), None) => {
                return Err(Error::invalid("attention guidance runs but no negative prompt was encoded"))
            }
            (None, _) => None,
        };
        let out = model.forward(&WanInputs {
            latents: &input,
            timestep: t,
            context: &context,
            image: cond.image.as_ref(),
            guidance: negative.as_ref(),
        })?;
        let (c, u, _) = super::split_guidance_rows(&out, cond_row, false)?;
        let pred = plan.combine_outputs(&c, u.as_ref(), None)?;
        latents = scheduler.step(&pred, &latents, &mut NoNoise)?.to_dtype(DType::F32)?;
        super::finish_step(&latents, (index, total, t), plan.attention.is_some(), guidance, &WAN, on_step)?;
    }
    Ok(latents)
}

/// One text-to-video request, defaults already chosen.
#[derive(Debug, Clone)]
pub struct WanRequest {
    pub prompt: String,
    /// The CFG negative prompt and the attention method's negative ("" when `None`, as diffusers).
    pub negative_prompt: Option<String>,
    pub guidance: GuidanceConfig,
    pub steps: usize,
    pub height: usize,
    pub width: usize,
    /// `4k + 1` (other counts are rounded with a warning).
    pub frames: usize,
    /// CFG's scale (CFG runs when the method has `cfg` and this is above 1, as diffusers).
    pub guidance_scale: f64,
    pub max_sequence_length: usize,
    pub seed: u64,
    /// `[1, 16, F', H/8, W/8]` latents to start from instead of seeded noise.
    pub init_latents: Option<Tensor>,
    /// Overrides the scheduler config's `flow_shift` (Wan: 3 at 480p, 5 at 720p).
    pub flow_shift: Option<f64>,
    /// Image-to-video: the first frame, any size (required by an I2V folder, refused by T2V).
    pub image: Option<RgbImage>,
}

impl WanRequest {
    /// Wan2.1 T2V's defaults (diffusers' WanPipeline: 50 steps, 480x832, 81 frames, CFG 5) with
    /// the paper's NAG setting (scale 5, tau 2.5, alpha 0.25).
    pub fn new(prompt: impl Into<String>) -> Self {
        let mut guidance = GuidanceConfig::nag_default();
        guidance.nag.alpha = 0.25;
        WanRequest {
            prompt: prompt.into(),
            negative_prompt: None,
            guidance,
            steps: 50,
            height: 480,
            width: 832,
            frames: 81,
            guidance_scale: 5.0,
            max_sequence_length: MAX_SEQUENCE_LENGTH,
            seed: 0,
            init_latents: None,
            flow_shift: None,
            image: None,
        }
    }
}

/// diffusers' `WanPipeline` (text-to-video) or `WanImageToVideoPipeline` on a folder.
pub struct WanPipeline {
    tokenizer: T5Tokenizer,
    /// UMT5-XXL (5.7 B parameters: 11 GB in bf16, 23 GB in f32): freed after encoding under
    /// sequential residency.
    text_encoder: Component<Umt5TextEncoder>,
    /// I2V only.
    image_encoder: Option<ImageEncoder>,
    transformer: WanTransformer3DModel,
    vae: AutoencoderKlWan,
    scheduler_config: serde_json::Value,
    device: Device,
}

impl WanPipeline {
    /// Load `dir` (`tokenizer/`, `text_encoder/`, `transformer/`, `vae/`, `scheduler/`, and for
    /// I2V `image_encoder/`, `image_processor/`) on `device`, everything resident; see
    /// [`Self::load_with`] for the dtypes.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(&ModelSource::local(dir)?, &LoadOptions::new(device, dtype))
    }

    /// Load a diffusers folder (its LoRAs merged into the transformer): UMT5 and CLIP vision on
    /// `opts.text_device()` (UMT5 in `opts.text_dtype()`, f32 instead of f16; CLIP vision in f32),
    /// loaded and freed per `opts.residency`; the VAE in f32; the transformer in `opts.dtype`.
    pub fn load_with(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let device = &opts.device;
        let config = WanConfig::from_file(&source.file("transformer/config.json")?)?;
        check_i2v_channels(&config).map_err(|e| Error::invalid(format!("{}: {e}", source.describe("transformer"))))?;
        let residency = opts.residency;
        // The encoders run on the text device (a CPU keeps UMT5-XXL off the GPU); UMT5 in f16
        // overflows (as T5), so a half-precision run keeps it in f32.
        let text_device = opts.text_device().clone();
        let text_dtype = if opts.text_dtype() == DType::F16 { DType::F32 } else { opts.text_dtype() };
        let image_encoder =
            if config.is_i2v() { Some(ImageEncoder::load(source, &text_device, residency)?) } else { None };
        let weights = component_weights(source, "transformer", "diffusion_pytorch_model")?;
        let transformer = WanTransformer3DModel::load(&config, &weights, opts.dtype, device)?;
        let te = component_weights(source, "text_encoder", "model")?;
        let vae = component_weights(source, "vae", "diffusion_pytorch_model")?;
        let scheduler_config = read_scheduler_config(source)?;
        scheduler_from_config(scheduler_config.clone(), None)
            .map_err(|e| Error::invalid(format!("{}: {e}", source.describe("scheduler"))))?;
        let text_encoder = Component::with_residency("text_encoder", residency, false, move || {
            Umt5TextEncoder::load_weights(&te, &text_device, text_dtype)
        })?;
        Ok(Self {
            tokenizer: T5Tokenizer::load(&t5_tokenizer_dir(source, "tokenizer")?)?,
            text_encoder,
            image_encoder,
            transformer,
            vae: AutoencoderKlWan::load_weights(&vae, device, DType::F32)?,
            scheduler_config,
            device: device.clone(),
        })
    }

    /// The scheduler of a request: the folder's (UniPC as Wan ships it, or FlowMatch Euler, as
    /// some few-step folders do) with its shift overridden by `flow_shift` if asked (UniPC's
    /// `flow_shift`, FlowMatch's `shift`).
    fn scheduler(&self, req: &WanRequest) -> Result<Box<dyn Scheduler>> {
        scheduler_from_config(self.scheduler_config.clone(), req.flow_shift)
    }

    /// Denoise to the final latents `[1, 16, F', H/8, W/8]` (before the VAE's denormalization).
    pub fn generate_latents(
        &self,
        req: &WanRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
    ) -> Result<Denoised> {
        req.guidance.validate()?;
        let frames = round_frames(req.frames, warnings);
        let shape = latent_shape(self.transformer.config().out_channels(), frames, req.height, req.width)?;
        // I2V: the image's CLIP states and VAE condition, before the text (a bad image fails early).
        let (image_states, condition) = match (&self.image_encoder, &req.image) {
            (Some(enc), Some(image)) => {
                let states = enc.encode(image, &self.device)?;
                let pixels = first_frame_pixels(image, req.width, req.height, &self.device)?;
                (Some(states), Some(i2v_condition(&self.vae, &pixels, frames)?))
            }
            (Some(_), None) => return Err(Error::parameter("image", "an image-to-video model needs an input image")),
            (None, Some(_)) => return Err(Error::parameter("image", "a text-to-video model takes no input image")),
            (None, None) => (None, None),
        };
        let init = match &req.init_latents {
            Some(l) if l.dims() != shape => {
                return Err(Error::invalid(format!("init latents {:?}: this request needs {shape:?}", l.dims())))
            }
            Some(l) => l.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => gaussian(&shape, req.seed, &self.device)?,
        };
        let method = req.guidance.method;
        let cfg = method.cfg && req.guidance_scale > 1.0;
        let msl = req.max_sequence_length;
        let text_encoder = self.text_encoder.get()?;
        let encode = |text: &str, what: &str, w: &mut Warnings| -> Result<WanPromptEmbeds> {
            let mut e = encode_wan_prompt(&self.tokenizer, &text_encoder, text, msl, what, w)?;
            e.padded = e.padded.to_device(&self.device)?;
            Ok(e)
        };
        let negative_text = req.negative_prompt.clone().unwrap_or_default();
        let positive = encode(&req.prompt, "prompt", warnings)?;
        let negative = if cfg || method.attention.is_some() {
            Some(encode(&negative_text, "negative prompt", warnings)?)
        } else {
            None
        };
        drop(text_encoder);
        self.text_encoder.release();
        let dtype = self.transformer.dtype();
        let (positive_states, attention_negative) = match (&negative, req.guidance.uses_vsf()) {
            (Some(n), true) => {
                let unpadded = n.unpadded()?;
                (vsf_context(&positive.padded, &unpadded)?, Some(unpadded))
            }
            (Some(n), false) => (positive.padded.clone(), method.attention.is_some().then(|| n.padded.clone())),
            (None, _) => (positive.padded.clone(), None),
        };
        let cond = WanConditioning {
            positive: positive_states.to_dtype(dtype)?,
            uncond: if cfg { negative.as_ref().map(|n| n.padded.to_dtype(dtype)).transpose()? } else { None },
            negative: attention_negative.map(|t| t.to_dtype(dtype)).transpose()?,
            image: image_states.map(|t| t.to_dtype(dtype)).transpose()?,
            condition,
        };
        let mut scheduler = self.scheduler(req)?;
        scheduler.set_timesteps(req.steps)?;
        let scale = if cfg { req.guidance_scale } else { 1.0 };
        let mut planner = GuidancePlanner::new(
            &req.guidance,
            CfgScaleSource::GuidanceScale,
            scale,
            StepWindow::Threshold,
            scheduler.num_train_timesteps() as f64,
        );
        let guidance = (&req.guidance, req.guidance_scale);
        let latents =
            denoise(&self.transformer, scheduler.as_mut(), &mut planner, guidance, &cond, init.clone(), on_step)?;
        Ok(Denoised { latents, init_latents: init, step_noise: None })
    }

    /// The video `[1, 3, F, H, W]` in [-1, 1] of final latents (denormalized with the VAE's
    /// `latents_mean` / `latents_std`, then decoded one latent frame at a time).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae.decode(&self.vae.denormalize_latents(&latents.to_dtype(DType::F32)?)?)
    }
}

/// An I2V transformer takes the noisy latents, 4 mask channels and the image latents:
/// `in_channels = 2 * out_channels + 4`.
fn check_i2v_channels(config: &WanConfig) -> std::result::Result<(), String> {
    let (inp, out) = (config.in_channels, config.out_channels());
    if config.is_i2v() && inp != 2 * out + TEMPORAL_FACTOR {
        return Err(format!(
            "an image-to-video transformer needs in_channels = 2 x out_channels + {TEMPORAL_FACTOR} = {}, has {inp}",
            2 * out + TEMPORAL_FACTOR
        ));
    }
    Ok(())
}

/// The Wan pipelines' scheduler from a `scheduler_config.json` value: FlowMatch Euler for
/// `FlowMatchEulerDiscreteScheduler` (sigmas as diffusers builds them when the pipeline passes
/// none; dynamic shifting refused: WanPipeline passes no `mu`), else UniPC.
fn scheduler_from_config(mut json: serde_json::Value, flow_shift: Option<f64>) -> Result<Box<dyn Scheduler>> {
    if json.get("_class_name").and_then(|c| c.as_str()) == Some("FlowMatchEulerDiscreteScheduler") {
        if let Some(shift) = flow_shift {
            json["shift"] = serde_json::json!(shift);
        }
        let s = FlowMatchEulerScheduler::from_json(&json.to_string())?.with_sigma_source(SigmaSource::SchedulerDefault);
        if s.config().use_dynamic_shifting {
            return Err(Error::invalid(
                "Wan: FlowMatchEulerDiscreteScheduler with use_dynamic_shifting is not supported (WanPipeline passes no mu)",
            ));
        }
        return Ok(Box::new(s));
    }
    if let Some(shift) = flow_shift {
        json["flow_shift"] = serde_json::json!(shift);
    }
    Ok(Box::new(UniPcMultistepScheduler::from_value(json)?))
}

/// The scheduler config of a folder (`scheduler/scheduler_config.json`).
fn read_scheduler_config(source: &ModelSource) -> Result<serde_json::Value> {
    let path = source.file("scheduler/scheduler_config.json")?;
    let text = std::fs::read_to_string(&path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))
}

/// Wan2.1's defaults: diffusers' `WanPipeline` (50 steps, 480x832, guidance_scale 5, 512 tokens)
/// with CFG + NAG at the NAG paper's Wan2.1 setting (phi 4, i.e. `nag_scale` 5, tau 2.5, alpha
/// 0.25, L1 norm) and the official VSF Wan recipe (alpha 1.7, beta 0.2).
pub fn wan_defaults() -> Defaults {
    let mut guidance = GuidanceConfig::nag_default();
    guidance.method = Method::CFG_NAG;
    guidance.nag.scale = 5.0;
    guidance.nag.tau = 2.5;
    guidance.nag.alpha = 0.25;
    guidance.vsf.scale = 1.7;
    guidance.vsf.bias = 0.2;
    Defaults {
        steps: 50,
        guidance_scale: 5.0,
        max_sequence_length: MAX_SEQUENCE_LENGTH,
        height: 480,
        width: 832,
        guidance,
    }
}

/// The defaults of a Wan folder (the same for every Wan2.1 model; the folder must be one).
pub fn defaults_of(source: &ModelSource) -> Result<Defaults> {
    WanConfig::from_file(&source.file("transformer/config.json")?)?;
    Ok(wan_defaults())
}

/// What the configs can tell about a request before any weights load: the size, the frames,
/// the steps, the initial latents' shape, the image (required for I2V, refused for T2V).
pub fn check_before_loading(source: &ModelSource, req: &ResolvedRequest) -> Result<()> {
    let config = WanConfig::from_file(&source.file("transformer/config.json")?)?;
    check_request(&config, req)
}

/// The checks of [`check_before_loading`] against a parsed transformer config.
fn check_request(config: &WanConfig, req: &ResolvedRequest) -> Result<()> {
    check_i2v_channels(config).map_err(Error::invalid)?;
    req.check_size(SIZE_MULTIPLE)?;
    req.check_steps()?;
    if req.guidance.method.cfg && req.guidance.uses_vsf() {
        // The official Wan VSF code runs without CFG: its context has 512 - n prompt rows.
        return Err(Error::parameter("guidance", "Wan's VSF runs without CFG (as the official code): use 'vsf'"));
    }
    if req.sampler.timesteps.is_some() {
        return Err(Error::parameter("timesteps", "not supported for Wan (it uses the scheduler's)"));
    }
    if let Some(shift) = req.video.flow_shift {
        if !shift.is_finite() || shift <= 0.0 {
            return Err(Error::parameter("flow_shift", format!("must be > 0, got {shift}")));
        }
    }
    let frames = round_frames(req.video.frames.unwrap_or(DEFAULT_FRAMES), &mut Warnings::default());
    let shape = latent_shape(config.out_channels(), frames, req.height, req.width)?;
    if let Some(l) = &req.init_latents {
        if l.dims() != shape {
            return Err(Error::parameter(
                "init_latents",
                format!("shape {:?}; this request needs {shape:?} ([1, C, F', H/8, W/8])", l.dims()),
            ));
        }
    }
    match (config.is_i2v(), &req.video.image) {
        (false, Some(_)) => Err(Error::parameter(
            "image",
            "this is a text-to-video model (WanPipeline); an input image needs a WanImageToVideoPipeline folder",
        )),
        (true, None) => Err(Error::parameter("image", "an image-to-video model needs an input image (--image)")),
        (true, Some(img)) if img.width() == 0 || img.height() == 0 => {
            Err(Error::parameter("image", "the input image is empty"))
        }
        _ => Ok(()),
    }
}

/// diffusers' default frame count.
pub const DEFAULT_FRAMES: usize = 81;

impl WanPipeline {
    /// The library request of a resolved registry request.
    fn wan_request(req: &ResolvedRequest) -> WanRequest {
        WanRequest {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            guidance: req.guidance.clone(),
            steps: req.steps,
            height: req.height,
            width: req.width,
            frames: req.video.frames.unwrap_or(DEFAULT_FRAMES),
            guidance_scale: req.guidance_scale,
            max_sequence_length: req.max_sequence_length,
            seed: req.seed,
            init_latents: req.init_latents.clone(),
            flow_shift: req.video.flow_shift,
            image: req.video.image.clone(),
        }
    }
}

/// The registry's view: `decode` gives the video `[1, 3, F, H, W]` (not an image), which the
/// CLI writes with `video_io`.
impl TextToImage for WanPipeline {
    fn defaults(&self) -> Defaults {
        wan_defaults()
    }

    fn validate(&self, req: &ResolvedRequest) -> Result<()> {
        check_request(self.transformer.config(), req)
    }

    fn generate_latents(
        &self,
        req: &ResolvedRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
    ) -> Result<Denoised> {
        super::warn_unused_cfg_and_negative(req, &WAN, warnings);
        WanPipeline::generate_latents(self, &Self::wan_request(req), on_step, warnings)
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        WanPipeline::decode(self, latents)
    }

    fn loaded_components(&self) -> Vec<(&'static str, bool)> {
        let mut parts = vec![("text_encoder", self.text_encoder.is_loaded()), ("transformer", true), ("vae", true)];
        if let Some(enc) = &self.image_encoder {
            parts.push(("image_encoder", enc.encoder.is_loaded()));
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn frames_round_like_diffusers() {
        let mut w = Warnings::default();
        assert_eq!(round_frames(81, &mut w), 81);
        assert!(w.clone().into_vec().is_empty());
        assert_eq!(round_frames(80, &mut w), 81);
        assert_eq!(round_frames(83, &mut w), 81);
        assert_eq!(round_frames(3, &mut w), 1);
        assert_eq!(w.into_vec().len(), 3);
    }

    #[test]
    fn latent_shapes_and_size_errors() {
        assert_eq!(latent_shape(16, 81, 480, 832).unwrap(), [1, 16, 21, 60, 104]);
        assert!(latent_shape(16, 81, 480, 840).unwrap_err().to_string().contains("multiples of 16"));
        assert!(latent_shape(16, 80, 480, 832).unwrap_err().to_string().contains("4k+1"));
    }

    #[test]
    fn vsf_context_keeps_the_row_count() {
        let p = Tensor::zeros((1, 512, 8), DType::F32, &Device::Cpu).unwrap();
        let n = Tensor::zeros((1, 12, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(vsf_context(&p, &n).unwrap().dim(1).unwrap(), 500);
        let too_long = Tensor::zeros((1, 512, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(vsf_context(&p, &too_long).is_err());
    }
}
