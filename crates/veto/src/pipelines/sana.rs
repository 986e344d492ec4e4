//! SANA 1.0 / 1.5 text-to-image (diffusers' `SanaPipeline` and `SanaPAGPipeline`), with NAG /
//! NASA / VSF in the transformer's cross-attention as the official generic NAG processor does in
//! SDXL's.
//!
//! - Text: Gemma-2 through SANA's prompt encoding ([`crate::text::sana_prompt`]): the prompt
//!   behind the complex-human-instruction prefix (diffusers' default; `none` turns it off), the
//!   negative prompt without it, `max_sequence_length` (300) tokens. diffusers pads and masks;
//!   veto encodes the real tokens only (a masked key gets weight exactly 0: the same numbers).
//! - Size: `use_resolution_binning` as diffusers: the nearest aspect-ratio bin of the
//!   transformer's `sample_size` (128: 4096 px, 64: 2048, 32: 1024, 16: 512), warned when it
//!   differs; the decoded image is resized and center-cropped back to the asked size
//!   (`resize_and_crop_tensor`).
//! - One step, one transformer call on the rows the guidance needs: `[cond]`, `[uncond, cond]`
//!   with CFG (`guidance_scale > 1`), plus PAG's perturbed row (identity linear self-attention in
//!   `pag_applied_layers`, default `transformer_blocks.0` as diffusers' `SanaPAGPipeline`). The
//!   timestep is the scheduler's times the transformer's `timestep_scale`.
//! - NAG / NASA / VSF: on the cond row, every cross-attention also attends the negative prompt
//!   (its real tokens: the mask applied to it as to the positive). CFG's uncond and PAG's rows
//!   stay plain. Window (`nag_end`) as the official SDXL NAG pipeline.
//! - SANA-Sprint folders (`SanaSprintPipeline`: a transformer with `guidance_embeds`, the
//!   `SCMScheduler`) run the same way with Sprint's step ([`super::sana_sprint`]): no CFG or PAG,
//!   the guidance scale into the guidance embedding, latents scaled by `sigma_data`.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::families::SANA;
use crate::guidance::vsf::{VsfLayout, VsfParams};
use crate::guidance::{GuidanceConfig, GuidancePlanner, Method, NagParams, NagPooled};
use crate::loading::components::{component_dir, component_weights};
use crate::loading::model_source::ModelSource;
use crate::loading::safetensors_files::read_json;
use crate::models::dc_ae::{AutoencoderDc, DcAeConfig};
use crate::models::sana::{SanaConfig, SanaInputs, SanaTransformer2DModel};
use crate::pipelines::caption_dit::{CaptionDitLoop, CaptionRows};
use crate::pipelines::noise::gaussian;
use crate::pipelines::pixart::{binned_size, pag_blocks_of};
use crate::pipelines::pixart_bins::{Bin, ASPECT_RATIO_1024, ASPECT_RATIO_2048, ASPECT_RATIO_512};
use crate::pipelines::request::vae_decoder_term;
use crate::pipelines::residency::{Component, LoadOptions, PromptCache};
use crate::pipelines::resize::resize_and_crop;
use crate::pipelines::sampling::{
    check_sampler, folder_scheduler, prepared_scheduler, requested_scheduler, scheduler_for,
};
use crate::pipelines::sana_bins::ASPECT_RATIO_4096;
use crate::pipelines::sana_sprint::{sprint_velocity, steps_warning};
use crate::pipelines::{Defaults, Denoised, ResolvedRequest, StepEvent, TextToImage, Warnings};
use crate::schedulers::scheduler::Scheduler;
use crate::text::gemma2::Gemma2TextEncoder;
use crate::text::sana_prompt::{SanaTextEncoder, DEFAULT_COMPLEX_HUMAN_INSTRUCTION};

/// The pipeline's default `max_sequence_length`.
pub const MAX_SEQUENCE_LENGTH: usize = 300;

/// diffusers' `SanaPAGPipeline` default `pag_applied_layers`.
pub const DEFAULT_PAG_LAYERS: [&str; 1] = ["transformer_blocks.0"];

/// The settings of the complex-human-instruction prefix.
pub const INSTRUCTION_SETTINGS: &str = "default (diffusers' instruction) or none";

/// The aspect-ratio bins of a transformer's `sample_size` (diffusers' SANA rule).
pub fn bins_for(sample_size: usize) -> Option<&'static [Bin]> {
    match sample_size {
        128 => Some(ASPECT_RATIO_4096),
        64 => Some(ASPECT_RATIO_2048),
        32 => Some(ASPECT_RATIO_1024),
        16 => Some(ASPECT_RATIO_512),
        _ => None,
    }
}

/// The complex-human-instruction lines a request asks for (`None`: diffusers' default).
pub fn instruction(setting: Option<&str>) -> Result<Vec<String>> {
    match setting.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("default") => Ok(DEFAULT_COMPLEX_HUMAN_INSTRUCTION.map(String::from).to_vec()),
        Some("none") => Ok(Vec::new()),
        Some(_) => Err(Error::parameter(
            "complex_human_instruction",
            format!("unknown setting '{}': {INSTRUCTION_SETTINGS}", setting.unwrap_or_default()),
        )),
    }
}

/// The Gemma-2 states of one prompt: `[1, L, C]`, its selected real tokens.
#[derive(Debug, Clone)]
pub struct SanaText {
    pub states: Tensor,
}

pub struct SanaPipeline {
    tokenizer: Tokenizer,
    tokenizer_dir: PathBuf,
    text_encoder: Component<Gemma2TextEncoder>,
    prompts: PromptCache<SanaText>,
    transformer: Component<SanaTransformer2DModel>,
    config: SanaConfig,
    vae_config: DcAeConfig,
    vae: Component<AutoencoderDc>,
    scheduler: Box<dyn Scheduler>,
    scheduler_config: serde_json::Value,
    device: Device,
    dtype: DType,
}

#[derive(serde::Deserialize)]
struct GemmaWidth {
    hidden_size: usize,
}

/// The tokenizer as SANA's encoding needs it: no truncation or padding of its own.
fn load_tokenizer(dir: &std::path::Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    let mut tok = Tokenizer::from_file(&path)
        .map_err(|e| Error::BadModelFile { path: path.display().to_string(), reason: e.to_string() })?;
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| Error::BadModelFile { path: path.display().to_string(), reason: e.to_string() })?;
    Ok(tok)
}

impl SanaPipeline {
    /// Load a `SanaPipeline` folder (local or from the hub cache).
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(source, &LoadOptions::new(device, dtype))
    }

    /// As [`Self::load`], with the text encoder's device and the components' residency.
    pub fn load_with(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let (device, dtype) = (&opts.device, opts.dtype);
        for optional in ["tokenizer_config.json", "special_tokens_map.json"] {
            source.try_file(&format!("tokenizer/{optional}"))?;
        }
        let tokenizer_dir = component_dir(source, "tokenizer", &["tokenizer.json"])?;
        let tokenizer = load_tokenizer(&tokenizer_dir)?;
        let text_weights = component_weights(source, "text_encoder", "model")?;
        let text_width = read_json::<GemmaWidth>(text_weights.config_path(), "Gemma-2 config")?.hidden_size;
        let (td, tt) = (opts.text_device().clone(), opts.text_dtype());
        let text_encoder = Component::with_residency("text_encoder", opts.residency, false, move || {
            Gemma2TextEncoder::load_weights(&text_weights, &td, tt)
        })?;

        let weights = component_weights(source, "transformer", "diffusion_pytorch_model")?;
        let config = SanaConfig::from_file(weights.config_path())?;
        if config.caption_channels != text_width {
            return Err(Error::BadModelFile {
                path: source.describe("transformer"),
                reason: format!(
                    "caption_channels is {}, the Gemma-2 encoder gives {text_width}",
                    config.caption_channels
                ),
            });
        }
        let (c, d) = (config.clone(), device.clone());
        let transformer = Component::with_residency("transformer", opts.residency, true, move || {
            SanaTransformer2DModel::new(&c, weights.var_builder(dtype, &d)?)
                .map_err(|e| weights.mismatch("transformer", e))
        })?;

        let vae_weights = component_weights(source, "vae", "diffusion_pytorch_model")?;
        let vae_config = DcAeConfig::from_file(vae_weights.config_path())?;
        check_vae(source, &config, &vae_config)?;
        let d = device.clone();
        let vae = Component::with_residency("vae", opts.residency, false, move || {
            AutoencoderDc::load_weights(&vae_weights, &d, dtype)
        })?;
        let (scheduler, scheduler_config) = folder_scheduler(source)?;
        Ok(Self {
            tokenizer,
            tokenizer_dir,
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
    pub fn transformer(&self) -> Result<Arc<SanaTransformer2DModel>> {
        self.transformer.get()
    }

    pub fn config(&self) -> &SanaConfig {
        &self.config
    }

    /// The scheduler as loaded (a fresh copy runs each generation).
    pub fn scheduler(&self) -> &dyn Scheduler {
        self.scheduler.as_ref()
    }

    /// `encode_prompt` for one prompt, behind the instruction lines `chi` (none for the negative
    /// prompt, as diffusers); `what` names the prompt in the truncation warning.
    pub fn encode_prompt(
        &self,
        text: &str,
        max_sequence_length: usize,
        chi: &[String],
        what: &str,
        warnings: &mut Warnings,
    ) -> Result<SanaText> {
        let key = format!("{max_sequence_length}\u{0}{}\u{0}{what}\u{0}{text}", chi.len());
        self.prompts.get_or_encode(key, warnings, |w| {
            let encoder = self.text_encoder.get()?;
            let text_encoder =
                SanaTextEncoder { tokenizer: &self.tokenizer, encoder: &encoder, source: self.tokenizer_dir.clone() };
            let embeds = text_encoder.encode(text, max_sequence_length, chi)?;
            if let Some(cut) = &embeds.removed_text {
                w.push(format!(
                    "the {what} is longer than SANA's {max_sequence_length} tokens (max_sequence_length{}) and was \
                     truncated; ignored: \"{cut}\"",
                    if chi.is_empty() { "" } else { ", after the complex-human-instruction prefix" }
                ));
            }
            Ok(SanaText { states: embeds.states.to_device(&self.device)?.to_dtype(self.dtype)? })
        })
    }

    fn vae_factor(&self) -> usize {
        self.vae_config.spatial_factor()
    }

    /// The size the request runs at (its bin) and the warning when that differs.
    pub fn run_size(&self, req: &ResolvedRequest) -> (usize, usize, Option<String>) {
        run_size(&self.config, req)
    }

    fn check(&self, req: &ResolvedRequest) -> Result<()> {
        let scheduler = self.scheduler_for(req)?;
        check_request(&self.config, &self.vae_config, scheduler.as_ref(), req)
    }

    fn scheduler_for(&self, req: &ResolvedRequest) -> Result<Box<dyn Scheduler>> {
        scheduler_for(self.scheduler.as_ref(), &self.scheduler_config, req)
    }

    fn denoise(
        &self,
        req: &ResolvedRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
    ) -> Result<Denoised> {
        self.check(req)?;
        let sprint = self.config.guidance_embeds;
        super::warn_unused_cfg_and_negative(req, &SANA, warnings);
        if req.guidance.nag_pooled == NagPooled::Negative && req.guidance.method.attention.is_some() {
            warnings.push("nag_pooled negative has no effect on SANA (SD3 only)");
        }
        let g = &req.guidance;
        let (height, width, binned) = self.run_size(req);
        if let Some(w) = binned {
            warnings.push(w);
        }
        let chi = instruction(req.sampler.complex_human_instruction.as_deref())?;

        let mut scheduler = prepared_scheduler(self.scheduler_for(req)?.as_ref(), req)?;
        if let Some(w) = sprint.then(|| steps_warning(scheduler.timesteps().len())).flatten() {
            warnings.push(w);
        }
        let sigma_data = scheduler.init_noise_sigma();
        let embedded_guidance =
            sprint.then(|| f64::from(req.guidance_scale as f32) * self.config.guidance_embeds_scale);
        let n_train = scheduler.num_train_timesteps() as f64;
        let mut planner = GuidancePlanner::new(g, SANA.cfg_scale, req.guidance_scale, SANA.window, n_train);
        let cfg_scale = planner.cfg_scale();
        let pag_scale = planner.pag_scale();

        let f = self.vae_factor();
        let shape = [1, self.config.in_channels, height / f, width / f];
        let init = match &req.init_latents {
            Some(t) => t.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => gaussian(&shape, req.seed, &self.device)?,
        };
        let x = (&init * scheduler.init_noise_sigma())?;

        // Text: the negative prompt (diffusers' default "") serves CFG and the attention methods.
        let msl = req.max_sequence_length;
        let positive = self.encode_prompt(&req.prompt, msl, &chi, "prompt", warnings)?;
        let negative = if cfg_scale.is_some() || g.method.attention.is_some() {
            let text = req.negative_prompt.as_deref().unwrap_or("");
            Some(self.encode_prompt(text, msl, &[], "negative prompt", warnings)?)
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
        let pag = match pag_scale {
            None => Vec::new(),
            Some(_) => pag_blocks(&self.config, req.sampler.pag_layers.as_deref())?,
        };
        let denoiser = CaptionDitLoop {
            family: &SANA,
            rows: &rows,
            negative: negative.as_ref().map(|n| &n.states),
            pag_blocks: &pag,
            dtype: self.dtype,
        };
        let (x, step_noise) = denoiser.run(scheduler.as_mut(), &mut planner, x, req, on_step, warnings, |call| {
            let inputs = SanaInputs {
                embedded_guidance,
                latents: call.input,
                timestep: call.timestep * self.config.timestep_scale,
                caption: call.caption,
                caption_lens: call.caption_lens,
                guidance: call.guidance,
                perturbation: call.perturbation.clone(),
            };
            if sprint {
                // One row (no CFG, no PAG): the velocity the SCM step takes.
                sprint_velocity(&transformer, call.latents, call.timestep, sigma_data, &inputs)
            } else {
                call.combine(&transformer.forward(&inputs)?.to_dtype(DType::F32)?)
            }
        })?;
        // Sprint: the last step's clean prediction over sigma_data is what diffusers decodes.
        let latents = if sprint { (x / sigma_data)? } else { x };
        Ok(Denoised { latents, init_latents: init, step_noise })
    }
}

/// The VAE against the transformer: its latent channels.
fn check_vae(source: &ModelSource, config: &SanaConfig, vae: &DcAeConfig) -> Result<()> {
    if vae.latent_channels != config.in_channels {
        return Err(Error::BadModelFile {
            path: source.describe("vae"),
            reason: format!(
                "the DC-AE has {} latent channels, the transformer expects {}",
                vae.latent_channels, config.in_channels
            ),
        });
    }
    Ok(())
}

/// PAG's blocks for the request's layers (default `transformer_blocks.0`), diffusers' regex rule.
pub fn pag_blocks(config: &SanaConfig, layers: Option<&[String]>) -> Result<Vec<usize>> {
    match layers {
        Some(layers) => pag_blocks_of(config.num_layers, layers),
        None => pag_blocks_of(config.num_layers, &DEFAULT_PAG_LAYERS.map(String::from)),
    }
}

/// The size a request runs at: its aspect-ratio bin (diffusers' `use_resolution_binning`), and
/// the warning when that is not the requested size.
fn run_size(config: &SanaConfig, req: &ResolvedRequest) -> (usize, usize, Option<String>) {
    let Some(bins) = bins_for(config.sample_size) else {
        return (req.height, req.width, None);
    };
    if req.height == 0 || req.width == 0 {
        return (req.height, req.width, None);
    }
    let (h, w) = binned_size(req.height, req.width, bins);
    let warning = (h != req.height || w != req.width).then(|| {
        format!(
            "{}x{} (height x width) is not one of SANA's aspect-ratio bins: it runs at the nearest bin, {h}x{w}, \
             and the image is resized and cropped back to {}x{} (diffusers' use_resolution_binning)",
            req.height, req.width, req.height, req.width
        )
    });
    (h, w, warning)
}

/// Check a request against the transformer config, the VAE and the scheduler, at the size it
/// runs at.
fn check_request(
    config: &SanaConfig,
    vae: &DcAeConfig,
    scheduler: &dyn Scheduler,
    req: &ResolvedRequest,
) -> Result<()> {
    instruction(req.sampler.complex_human_instruction.as_deref())?;
    check_sprint(config, scheduler, req)?;
    let f = vae.spatial_factor();
    let (height, width, _) = run_size(config, req);
    let sized = ResolvedRequest { height, width, ..req.clone() };
    sized.check_size(f * config.patch_size)?;
    let tokens = (height / f / config.patch_size) as u64 * (width / f / config.patch_size) as u64 * 3;
    let vae_width = vae.decoder_block_out_channels.first().copied().unwrap_or(128);
    sized.check_activation_memory(&[(tokens, config.inner_dim() as u64, 16), vae_decoder_term(&sized, vae_width)])?;
    sized.check_steps()?;
    if req.max_sequence_length < 2 {
        return Err(Error::parameter("max_sequence_length", "SANA needs at least 2 (<bos> and one token)"));
    }
    if let Some(layers) = &req.sampler.pag_layers {
        pag_blocks(config, Some(layers))?;
    }
    check_sampler(scheduler, &sized, &[1, config.in_channels, height / f, width / f], f)
}

/// A SANA-Sprint transformer (`guidance_embeds`) runs with the `SCMScheduler` only and the
/// other way round; Sprint has no CFG or PAG (its guidance scale feeds the guidance embedding).
fn check_sprint(config: &SanaConfig, scheduler: &dyn Scheduler, req: &ResolvedRequest) -> Result<()> {
    let scm = scheduler.class_name() == "SCMScheduler";
    if config.guidance_embeds != scm {
        return Err(Error::parameter(
            "scheduler",
            if scm {
                "the SCMScheduler is SANA-Sprint's: this transformer has no guidance embedding (guidance_embeds false)"
                    .to_string()
            } else {
                format!(
                    "a SANA-Sprint transformer (guidance_embeds) runs with the SCMScheduler only, not {}",
                    scheduler.class_name()
                )
            },
        ));
    }
    if config.guidance_embeds && (req.guidance.method.cfg || req.guidance.method.pag) {
        return Err(Error::parameter(
            "guidance",
            "SANA-Sprint has no CFG or PAG (its --guidance-scale feeds the guidance embedding): use none, nag, nasa or vsf",
        ));
    }
    Ok(())
}

/// `check_request` from the folder's config files alone, before any weights load.
pub fn check_before_loading(source: &ModelSource, req: &ResolvedRequest) -> Result<()> {
    let config = SanaConfig::from_file(&source.file("transformer/config.json")?)?;
    let vae = DcAeConfig::from_file(&source.file("vae/config.json")?)?;
    check_request(&config, &vae, requested_scheduler(source, req)?.as_ref(), req)
}

/// The defaults of a SANA folder from its config files alone.
pub fn defaults_of(source: &ModelSource) -> Result<Defaults> {
    let config = SanaConfig::from_file(&source.file("transformer/config.json")?)?;
    let vae = DcAeConfig::from_file(&source.file("vae/config.json")?)?;
    Ok(sana_defaults(&config, vae.spatial_factor()))
}

/// SANA's defaults: diffusers' pipeline (20 steps, guidance_scale 4.5, 300 tokens, the
/// transformer's `sample_size` times the DC-AE factor: 1024 for the 1024px models) with CFG +
/// NAG at the NAG paper's setting for SANA (phi 4, i.e. `nag_scale` 5, tau 2.5, alpha 0.375, L1
/// norm). VSF: alpha 1.2, beta 0.2 (as PixArt; the VSF paper has no SANA setting). PAG: scale 3
/// (diffusers' default), layers `transformer_blocks.0`.
pub fn sana_defaults(config: &SanaConfig, vae_factor: usize) -> Defaults {
    let mut guidance = GuidanceConfig::nag_default();
    guidance.method = if config.guidance_embeds { Method::NAG } else { Method::CFG_NAG };
    guidance.nag = NagParams { scale: 5.0, tau: 2.5, alpha: 0.375, norm: Default::default() };
    guidance.vsf = VsfParams { scale: 1.2, bias: 0.2, layout: VsfLayout::Paper };
    guidance.pag_scale = 3.0;
    guidance.true_cfg_scale = 4.5;
    let size = config.sample_size * vae_factor;
    Defaults {
        // SANA-Sprint: diffusers' 2 steps (max angle 1.5708, intermediate 1.3).
        steps: if config.guidance_embeds { 2 } else { 20 },
        guidance_scale: 4.5,
        max_sequence_length: MAX_SEQUENCE_LENGTH,
        height: size,
        width: size,
        guidance,
    }
}

impl TextToImage for SanaPipeline {
    fn defaults(&self) -> Defaults {
        sana_defaults(&self.config, self.vae_factor())
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
        resize_and_crop(&self.decode(latents)?, req.height, req.width)
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
    fn bins_by_sample_size_and_instruction_settings() {
        assert_eq!(binned_size(1000, 1000, bins_for(32).unwrap()), (1024, 1024));
        assert_eq!(binned_size(4096, 4096, bins_for(128).unwrap()), (4096, 4096));
        assert_eq!(binned_size(1000, 3800, bins_for(128).unwrap()), (2048, 7936));
        assert!(bins_for(48).is_none());
        assert_eq!(instruction(None).unwrap().len(), 8);
        assert!(instruction(Some("None")).unwrap().is_empty());
        let err = instruction(Some("fancy")).unwrap_err().to_string();
        assert!(err.contains("fancy") && err.contains("none"), "{err}");
    }
}
