//! PixArt-Sigma text-to-image (diffusers `PixArtSigmaPipeline` and `PixArtSigmaPAGPipeline`),
//! with NAG / NASA / VSF in the transformer's cross-attention as the official generic NAG
//! processor does in SDXL's.
//!
//! - Text: the caption cleaned as diffusers does ([`crate::text::caption`]), T5 to
//!   `max_sequence_length` (300) tokens with the attention mask. diffusers pads to 300 and masks
//!   the padding in T5 and in the cross-attention; a masked key gets weight exactly 0, so veto
//!   encodes the real tokens only and the cross-attention sees only them: the same numbers,
//!   without the padding's work.
//! - Size: `use_resolution_binning` as diffusers: the request's size becomes the nearest
//!   aspect-ratio bin of the model's `sample_size` (warned when it differs); the decoded image
//!   is resized and center-cropped back to the requested size (`resize_and_crop_tensor`).
//! - One step, one transformer call on the rows the guidance needs: `[cond]`, `[uncond, cond]`
//!   with CFG (`guidance_scale > 1`, diffusers' rule; uncond is the negative prompt, `""` when
//!   none is given), plus PAG's perturbed row (identity self-attention in
//!   `pag_applied_layers`, default `blocks.1` as diffusers' PixArt-Sigma PAG pipeline).
//! - NAG / NASA / VSF: on the cond row, every cross-attention also attends the negative prompt
//!   (its real tokens: the mask applied to it as to the positive). CFG's uncond and PAG's rows
//!   stay plain.
//! - Window (`nag_end`): as the official SDXL NAG pipeline, attention guidance stops for good
//!   once `t < floor((1 - nag_end) 999)`.
//! - Learned sigma: the transformer's variance channels are dropped (diffusers).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::families::PIXART;
use crate::guidance::vsf::{VsfLayout, VsfParams};
use crate::guidance::{GuidanceConfig, GuidancePlanner, Method, NagParams, NagPooled};
use crate::loading::components::{component_weights, t5_tokenizer_dir};
use crate::loading::model_source::ModelSource;
use crate::loading::safetensors_files::read_json;
use crate::models::pixart::{PixArtConfig, PixArtInputs, PixArtTransformer2DModel};
use crate::models::vae::{AutoencoderKl, VaeConfig};
use crate::pipelines::caption_dit::{CaptionDitLoop, CaptionRows};
use crate::pipelines::noise::gaussian;
use crate::pipelines::pixart_bins::{Bin, ASPECT_RATIO_1024, ASPECT_RATIO_2048, ASPECT_RATIO_256, ASPECT_RATIO_512};
use crate::pipelines::request::vae_decoder_term;
use crate::pipelines::residency::{Component, LoadOptions, PromptCache};
use crate::pipelines::sampling::{
    check_sampler, folder_scheduler, prepared_scheduler, requested_scheduler, scheduler_for,
};
use crate::pipelines::{Defaults, Denoised, ResolvedRequest, StepEvent, TextToImage, Warnings};
use crate::schedulers::scheduler::Scheduler;
use crate::text::caption::clean_caption;
use crate::text::t5::{T5TextEncoder, T5Tokenizer};

/// The pipeline's default `max_sequence_length`.
pub const MAX_SEQUENCE_LENGTH: usize = 300;

/// diffusers' PixArt-Sigma PAG pipeline's default `pag_applied_layers`.
pub const DEFAULT_PAG_LAYERS: [&str; 1] = ["blocks.1"];

/// The aspect-ratio bins of a transformer's `sample_size` (diffusers' rule; other sizes have
/// none and refuse binning there).
pub fn bins_for(sample_size: usize) -> Option<&'static [Bin]> {
    match sample_size {
        256 => Some(ASPECT_RATIO_2048),
        128 => Some(ASPECT_RATIO_1024),
        64 => Some(ASPECT_RATIO_512),
        32 => Some(ASPECT_RATIO_256),
        _ => None,
    }
}

/// diffusers' `classify_height_width_bin`: the bin whose ratio is nearest `height / width`
/// (the first one on ties).
pub fn binned_size(height: usize, width: usize, bins: &[Bin]) -> (usize, usize) {
    let ar = height as f64 / width as f64;
    let mut best = bins[0];
    for &b in &bins[1..] {
        if (b.0 - ar).abs() < (best.0 - ar).abs() {
            best = b;
        }
    }
    (best.1, best.2)
}

/// The T5 states of one prompt: `[1, L, C]`, its real tokens only.
#[derive(Debug, Clone)]
pub struct PixArtText {
    pub states: Tensor,
}

pub struct PixArtSigmaPipeline {
    tokenizer: T5Tokenizer,
    text_encoder: Component<T5TextEncoder>,
    prompts: PromptCache<PixArtText>,
    transformer: Component<PixArtTransformer2DModel>,
    config: PixArtConfig,
    vae_config: VaeConfig,
    vae: Component<AutoencoderKl>,
    scheduler: Box<dyn Scheduler>,
    scheduler_config: serde_json::Value,
    device: Device,
    dtype: DType,
}

#[derive(serde::Deserialize)]
struct T5Width {
    d_model: usize,
}

#[derive(serde::Deserialize)]
struct ForceUpcast {
    force_upcast: Option<bool>,
}

impl PixArtSigmaPipeline {
    /// Load a `PixArtSigmaPipeline` folder (local or from the hub cache).
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(source, &LoadOptions::new(device, dtype))
    }

    /// As [`Self::load`], with the text encoder's device and the components' residency.
    pub fn load_with(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let (device, dtype) = (&opts.device, opts.dtype);
        let tokenizer = T5Tokenizer::load(&t5_tokenizer_dir(source, "tokenizer")?)?;
        let t5_weights = component_weights(source, "text_encoder", "model")?;
        let t5_width = read_json::<T5Width>(t5_weights.config_path(), "T5 config")?.d_model;
        let (td, tt) = (opts.text_device().clone(), opts.text_dtype());
        let text_encoder = Component::with_residency("text_encoder", opts.residency, false, move || {
            T5TextEncoder::load_weights(&t5_weights, &td, tt)
        })?;

        let weights = component_weights(source, "transformer", "diffusion_pytorch_model")?;
        let config = PixArtConfig::from_file(weights.config_path())?;
        if config.caption_channels() != t5_width {
            return Err(Error::BadModelFile {
                path: source.describe("transformer"),
                reason: format!("caption_channels is {}, the T5 encoder gives {t5_width}", config.caption_channels()),
            });
        }
        let (c, d) = (config.clone(), device.clone());
        let transformer = Component::with_residency("transformer", opts.residency, true, move || {
            PixArtTransformer2DModel::new(&c, weights.var_builder(dtype, &d)?)
                .map_err(|e| weights.mismatch("transformer", e))
        })?;

        let vae_weights = component_weights(source, "vae", "diffusion_pytorch_model")?;
        let vae_config = VaeConfig::from_file(vae_weights.config_path())?;
        if vae_config.latent_channels != config.in_channels {
            return Err(Error::BadModelFile {
                path: source.describe("vae"),
                reason: format!(
                    "VAE has {} latent channels, the transformer expects {}",
                    vae_config.latent_channels, config.in_channels
                ),
            });
        }
        let upcast = read_json::<ForceUpcast>(vae_weights.config_path(), "VAE config")?.force_upcast.unwrap_or(true);
        let vae_dtype = if dtype == DType::F16 && upcast { DType::F32 } else { dtype };
        let d = device.clone();
        let vae = Component::with_residency("vae", opts.residency, false, move || {
            AutoencoderKl::load_weights(&vae_weights, &d, vae_dtype)
        })?;
        let (scheduler, scheduler_config) = folder_scheduler(source)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            prompts: PromptCache::default(),
            transformer,
            config,
            vae_config,
            vae,
            scheduler,
            scheduler_config,
            device: device.clone(),
            dtype,
        })
    }

    /// The transformer (loaded now if it is not yet).
    pub fn transformer(&self) -> Result<Arc<PixArtTransformer2DModel>> {
        self.transformer.get()
    }

    pub fn config(&self) -> &PixArtConfig {
        &self.config
    }

    /// The scheduler as loaded (a fresh copy runs each generation).
    pub fn scheduler(&self) -> &dyn Scheduler {
        self.scheduler.as_ref()
    }

    /// A fresh scheduler for a generation: the folder's, or the request's override.
    fn scheduler_for(&self, req: &ResolvedRequest) -> Result<Box<dyn Scheduler>> {
        scheduler_for(self.scheduler.as_ref(), &self.scheduler_config, req)
    }

    /// `encode_prompt` for one prompt: cleaned, tokenized to `max_sequence_length`, encoded;
    /// the real tokens' states (`what` names the prompt in the truncation warning).
    pub fn encode_prompt(
        &self,
        text: &str,
        max_sequence_length: usize,
        what: &str,
        warnings: &mut Warnings,
    ) -> Result<PixArtText> {
        let key = format!("{max_sequence_length}\u{0}{what}\u{0}{text}");
        self.prompts.get_or_encode(key, warnings, |w| {
            let cleaned = clean_caption(text);
            let t = self.tokenizer.tokenize(&cleaned, max_sequence_length)?;
            if t.truncated {
                w.push(format!(
                    "the {what} is longer than T5's {max_sequence_length} tokens (max_sequence_length) and was \
                     truncated; ignored: \"{}\"",
                    t.removed_text.clone().unwrap_or_default()
                ));
            }
            let states = self.text_encoder.get()?.encode_ids(&t.ids[..t.len])?;
            Ok(PixArtText { states: states.to_device(&self.device)?.to_dtype(self.dtype)? })
        })
    }

    /// The token ids `encode_prompt` feeds T5 (padded to `max_sequence_length`) and how many
    /// are real.
    pub fn tokenize(&self, text: &str, max_sequence_length: usize) -> Result<(Vec<u32>, usize)> {
        let t = self.tokenizer.tokenize(&clean_caption(text), max_sequence_length)?;
        Ok((t.ids, t.len))
    }

    fn vae_factor(&self) -> usize {
        self.vae_config.downscale_factor()
    }

    /// The size the request runs at (its bin) and the warning when that differs.
    pub fn run_size(&self, req: &ResolvedRequest) -> (usize, usize, Option<String>) {
        run_size(&self.config, req)
    }

    fn check(&self, req: &ResolvedRequest) -> Result<()> {
        let scheduler = self.scheduler_for(req)?;
        check_request(&self.config, &self.vae_config, scheduler.as_ref(), req)?;
        if let Some(layers) = &req.sampler.pag_layers {
            pag_blocks(&self.config, layers)?;
        }
        Ok(())
    }

    fn denoise(
        &self,
        req: &ResolvedRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
    ) -> Result<Denoised> {
        self.check(req)?;
        super::warn_unused_cfg_and_negative(req, &PIXART, warnings);
        if req.guidance.nag_pooled == NagPooled::Negative && req.guidance.method.attention.is_some() {
            warnings.push("nag_pooled negative has no effect on PixArt (SD3 only)");
        }
        let g = &req.guidance;
        let (height, width, binned) = self.run_size(req);
        if let Some(w) = binned {
            warnings.push(w);
        }

        let mut scheduler = prepared_scheduler(self.scheduler_for(req)?.as_ref(), req)?;
        let n_train = scheduler.num_train_timesteps() as f64;
        let mut planner = GuidancePlanner::new(g, PIXART.cfg_scale, req.guidance_scale, PIXART.window, n_train);
        let cfg_scale = planner.cfg_scale();
        let pag_scale = planner.pag_scale();

        let f = self.vae_factor();
        let channels = self.config.in_channels;
        let shape = [1, channels, height / f, width / f];
        let init = match &req.init_latents {
            Some(t) => t.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => gaussian(&shape, req.seed, &self.device)?,
        };
        let x = (&init * scheduler.init_noise_sigma())?;

        // Text: the negative prompt (diffusers' default "") serves CFG and the attention methods.
        let msl = req.max_sequence_length;
        let positive = self.encode_prompt(&req.prompt, msl, "prompt", warnings)?;
        let negative = if cfg_scale.is_some() || g.method.attention.is_some() {
            let text = req.negative_prompt.as_deref().unwrap_or("");
            Some(self.encode_prompt(text, msl, "negative prompt", warnings)?)
        } else {
            None
        };
        self.text_encoder.release();
        let transformer = self.transformer.get()?;

        let rows = CaptionRows::new(
            &positive.states,
            negative.as_ref().filter(|_| cfg_scale.is_some()).map(|n| &n.states),
            pag_scale.is_some(),
        )?;
        let pag = match (&req.sampler.pag_layers, pag_scale) {
            (_, None) => Vec::new(),
            (Some(layers), Some(_)) => pag_blocks(&self.config, layers)?,
            (None, Some(_)) => pag_blocks(&self.config, &DEFAULT_PAG_LAYERS.map(String::from))?,
        };
        let denoiser = CaptionDitLoop {
            family: &PIXART,
            rows: &rows,
            negative: negative.as_ref().map(|n| &n.states),
            pag_blocks: &pag,
            dtype: self.dtype,
        };
        let (x, step_noise) = denoiser.run(scheduler.as_mut(), &mut planner, x, req, on_step, warnings, |call| {
            let out = transformer.forward(&PixArtInputs {
                latents: call.input,
                timestep: call.timestep,
                caption: call.caption,
                caption_lens: call.caption_lens,
                guidance: call.guidance,
                perturbation: call.perturbation.clone(),
            })?;
            // Learned sigma: keep the noise channels.
            call.combine(&out.narrow(1, 0, channels)?.to_dtype(DType::F32)?)
        })?;
        Ok(Denoised { latents: x, init_latents: init, step_noise })
    }
}

/// PAG's blocks: diffusers' rule, a self-attention module (`transformer_blocks.{i}.attn1`)
/// whose name the id (a regex) matches anywhere. Note that, as in diffusers, `blocks.1` also
/// matches `transformer_blocks.10` .. `.19`.
pub fn pag_blocks(config: &PixArtConfig, layers: &[String]) -> Result<Vec<usize>> {
    pag_blocks_of(config.num_layers, layers)
}

/// [`pag_blocks`] of a DiT with `num_layers` blocks named `transformer_blocks.{i}` (PixArt, SANA).
pub fn pag_blocks_of(num_layers: usize, layers: &[String]) -> Result<Vec<usize>> {
    let names: Vec<String> = (0..num_layers).map(|i| format!("transformer_blocks.{i}.attn1")).collect();
    let mut blocks = Vec::new();
    for raw in layers {
        let id = raw.trim();
        let re = tokenizers::utils::SysRegex::new(id)
            .map_err(|e| Error::invalid(format!("PAG layer '{raw}' is not a valid pattern: {e}")))?;
        let found: Vec<usize> =
            names.iter().enumerate().filter(|(_, n)| re.find_iter(n).next().is_some()).map(|(i, _)| i).collect();
        if found.is_empty() {
            return Err(Error::invalid(format!(
                "PAG layer '{raw}' matches no self-attention layer (transformer_blocks.0.attn1 .. transformer_blocks.{}.attn1)",
                num_layers.saturating_sub(1)
            )));
        }
        blocks.extend(found);
    }
    blocks.sort_unstable();
    blocks.dedup();
    Ok(blocks)
}

/// The size a request runs at: its aspect-ratio bin (diffusers' `use_resolution_binning`), and
/// the warning when that is not the requested size.
fn run_size(config: &PixArtConfig, req: &ResolvedRequest) -> (usize, usize, Option<String>) {
    let Some(bins) = bins_for(config.sample_size) else {
        return (req.height, req.width, None);
    };
    if req.height == 0 || req.width == 0 {
        return (req.height, req.width, None);
    }
    let (h, w) = binned_size(req.height, req.width, bins);
    let warning = (h != req.height || w != req.width).then(|| {
        format!(
            "{}x{} (height x width) is not one of PixArt's aspect-ratio bins: it runs at the nearest bin, {h}x{w}, \
             and the image is resized and cropped back to {}x{} (diffusers' use_resolution_binning)",
            req.height, req.width, req.height, req.width
        )
    });
    (h, w, warning)
}

/// Check a request against the transformer config, the VAE and the scheduler, at the size it
/// runs at.
fn check_request(
    config: &PixArtConfig,
    vae: &VaeConfig,
    scheduler: &dyn Scheduler,
    req: &ResolvedRequest,
) -> Result<()> {
    let f = vae.downscale_factor();
    let (height, width, _) = run_size(config, req);
    let sized = ResolvedRequest { height, width, ..req.clone() };
    sized.check_size(f * config.patch_size)?;
    let tokens = (height / f / config.patch_size) as u64 * (width / f / config.patch_size) as u64 * 3;
    let vae_width = vae.block_out_channels.first().copied().unwrap_or(128);
    sized.check_activation_memory(&[(tokens, config.inner_dim() as u64, 16), vae_decoder_term(&sized, vae_width)])?;
    sized.check_steps()?;
    if req.max_sequence_length == 0 {
        return Err(Error::parameter("max_sequence_length", "must be at least 1"));
    }
    check_sampler(scheduler, &sized, &[1, config.in_channels, height / f, width / f], f)
}

/// `check_request` from the folder's config files alone, before any weights load.
pub fn check_before_loading(source: &ModelSource, req: &ResolvedRequest) -> Result<()> {
    let config = PixArtConfig::from_file(&source.file("transformer/config.json")?)?;
    let vae = VaeConfig::from_file(&source.file("vae/config.json")?)?;
    check_request(&config, &vae, requested_scheduler(source, req)?.as_ref(), req)?;
    if let Some(layers) = &req.sampler.pag_layers {
        pag_blocks(&config, layers)?;
    }
    Ok(())
}

/// The defaults of a PixArt-Sigma folder from its config files alone.
pub fn defaults_of(source: &ModelSource) -> Result<Defaults> {
    let config = PixArtConfig::from_file(&source.file("transformer/config.json")?)?;
    let vae = VaeConfig::from_file(&source.file("vae/config.json")?)?;
    Ok(pixart_defaults(&config, vae.downscale_factor()))
}

/// PixArt-Sigma's defaults: diffusers' pipeline (20 steps, guidance_scale 4.5, 300 tokens, the
/// transformer's `sample_size` times the VAE factor: 1024 for the 1024-MS model) with CFG + NAG
/// at the NAG paper's PixArt-Sigma setting (Table 4/5: phi 4, i.e. `nag_scale` 5, tau 2.5,
/// alpha 0.375, L1 norm). VSF: alpha 1.2, beta 0.2 (as the UNet family; the VSF paper has no
/// PixArt setting). PAG: scale 3 (diffusers' default), layers `blocks.1`.
pub fn pixart_defaults(config: &PixArtConfig, vae_factor: usize) -> Defaults {
    let mut guidance = GuidanceConfig::nag_default();
    guidance.method = Method::CFG_NAG;
    guidance.nag = NagParams { scale: 5.0, tau: 2.5, alpha: 0.375, norm: Default::default() };
    guidance.vsf = VsfParams { scale: 1.2, bias: 0.2, layout: VsfLayout::Paper };
    guidance.pag_scale = 3.0;
    guidance.true_cfg_scale = 4.5;
    let size = config.sample_size * vae_factor;
    Defaults {
        steps: 20,
        guidance_scale: 4.5,
        max_sequence_length: MAX_SEQUENCE_LENGTH,
        height: size,
        width: size,
        guidance,
    }
}

impl TextToImage for PixArtSigmaPipeline {
    fn defaults(&self) -> Defaults {
        pixart_defaults(&self.config, self.vae_factor())
    }

    fn validate(&self, req: &ResolvedRequest) -> Result<()> {
        self.check(req)
    }

    fn generate_latents(
        &self,
        req: &ResolvedRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
    ) -> Result<Denoised> {
        self.denoise(req, on_step, warnings)
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let vae = self.vae.get()?;
        let image = vae.decode_latents(latents);
        self.vae.release();
        image
    }

    fn decode_for(&self, latents: &Tensor, req: &ResolvedRequest) -> Result<Tensor> {
        crate::pipelines::resize::resize_and_crop(&self.decode(latents)?, req.height, req.width)
    }

    fn loaded_components(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("text_encoder", self.text_encoder.is_loaded()),
            ("transformer", self.transformer.is_loaded()),
            ("vae", self.vae.is_loaded()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_pick_the_nearest_ratio_first_on_ties() {
        assert_eq!(binned_size(1024, 1024, ASPECT_RATIO_1024), (1024, 1024));
        assert_eq!(binned_size(512, 512, ASPECT_RATIO_1024), (1024, 1024));
        assert_eq!(binned_size(768, 1344, ASPECT_RATIO_1024), (768, 1344));
        // 0.96 is nearest 0.94.
        assert_eq!(binned_size(250, 260, ASPECT_RATIO_256), (240, 256));
        assert_eq!(binned_size(100, 1000, ASPECT_RATIO_512), (256, 1024));
        assert!(bins_for(96).is_none());
    }
}
