//! Stable Diffusion 1.5 / 2.x and SDXL text-to-image (diffusers `StableDiffusionPipeline`,
//! `StableDiffusionXLPipeline` and their PAG variants), with NAG / NASA / VSF in the UNet's
//! cross-attention as the official SDXL NAG pipeline does. Serves the SDXL descendants that
//! ship as the same folder layout: SDXL-Lightning (Euler, trailing), DMD2 (LCM), Hyper-SDXL
//! (TCD / DDIM trailing), Playground v2.5 (EDM schedulers, VAE latents mean/std).
//!
//! One step, one UNet call on the rows the guidance needs (the trunk runs once per row):
//! `[cond]`, `[uncond, cond]` with CFG, plus a perturbed row `[.., perturbed]` with PAG.
//! - CFG: `uncond + guidance_scale (cond - uncond)` when the method has `cfg` and
//!   `guidance_scale > 1` (diffusers' rule); uncond is the negative prompt (SDXL: zeros when no
//!   negative prompt is given, `force_zeros_for_empty_prompt`).
//! - PAG: `+ pag_scale (cond - perturbed)`, the perturbed row having identity self-attention in
//!   the `pag_applied_layers` (default `["mid"]`), as diffusers' PAG pipelines.
//! - NAG / NASA: on the cond row only, every `attn2` also attends the negative prompt (padded
//!   to 77 tokens, the CFG negative when CFG runs, else the negative prompt encoded alone).
//!   The uncond and perturbed rows keep plain attention (official SDXL NAG processor).
//! - VSF: on the cond row, the negative prompt **without padding** joins the keys with values
//!   `-alpha V` and logit bias `-beta` (VSF eq. 6).
//! - Window (`nag_end`): as the official SDXL NAG pipeline, attention guidance stops for good
//!   once `t < floor((1 - nag_end) 999)` (EDM schedulers: `t` mapped from sigma, see
//!   [`crate::schedulers::edm`]).
//!
//! Latents stay f32 between steps (the scheduler's arithmetic is f32 as in diffusers); the
//! UNet runs in the pipeline dtype.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::families::UNET;
use crate::guidance::vsf::{VsfLayout, VsfParams};
use crate::guidance::{GuidanceConfig, GuidancePlanner, Method, NagParams, NagPooled, NegativeContext};
use crate::loading::components::{clip_tokenizer, component_weights};
use crate::loading::model_index::has_component;
use crate::loading::model_source::ModelSource;
use crate::loading::safetensors_files::read_json;
use crate::models::unet::{PagLayers, Perturbation, UNet2DConditionModel, UNetConfig, UNetInputs};
use crate::models::vae::{AutoencoderKl, VaeConfig};
use crate::pipelines::noise::{gaussian, StepNoise};
use crate::pipelines::request::vae_decoder_term;
use crate::pipelines::residency::{Component, LoadOptions, PromptCache};
use crate::pipelines::sampling::{
    check_sampler, describe, folder_scheduler, prepared_scheduler, requested_scheduler, scheduler_for,
};
use crate::pipelines::{Defaults, Denoised, ResolvedRequest, StepEvent, TextToImage, Warnings};
use crate::schedulers::scheduler::Scheduler;
use crate::text::clip::{ClipTextConfig, ClipTextEncoder, ClipTokenizer};
use crate::text::TokenizedText;

/// CLIP's context length.
const CLIP_LEN: usize = 77;

/// Which pipeline the folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdVariant {
    /// `StableDiffusionPipeline`: one CLIP, its last hidden state.
    StableDiffusion,
    /// `StableDiffusionXLPipeline`: two CLIPs' penultimate states, pooled `text_embeds`,
    /// `time_ids` micro-conditioning.
    StableDiffusionXl,
}

/// The text conditioning of one prompt.
#[derive(Debug, Clone)]
pub struct SdText {
    /// Cross-attention context `[1, T, cross_dim]`.
    pub embeds: Tensor,
    /// SDXL: the second encoder's projected pooled output `[1, P]`.
    pub pooled: Option<Tensor>,
}

struct Clip {
    tokenizer: ClipTokenizer,
    encoder: Component<ClipTextEncoder>,
    config: ClipTextConfig,
}

/// `vae/config.json`'s latent normalisation (Playground v2.5 has per-channel mean and std).
#[derive(Debug, Clone, serde::Deserialize)]
struct VaeLatentStats {
    #[serde(default)]
    scaling_factor: Option<f64>,
    #[serde(default)]
    latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    latents_std: Option<Vec<f64>>,
    /// The SD/SDXL VAEs overflow in float16: diffusers decodes in float32 then.
    #[serde(default)]
    force_upcast: Option<bool>,
}

/// diffusers' `pag_applied_layers` default.
pub const DEFAULT_PAG_LAYERS: [&str; 1] = ["mid"];

pub struct StableDiffusionPipeline {
    variant: SdVariant,
    clip: Clip,
    /// SDXL's second encoder (CLIP-G with projection).
    clip_2: Option<Clip>,
    prompts: PromptCache<SdText>,
    unet: UNet2DConditionModel,
    vae_config: VaeConfig,
    vae: Component<AutoencoderKl>,
    latent_stats: VaeLatentStats,
    scheduler: Box<dyn Scheduler>,
    /// `scheduler_config.json` as read, the base of a `scheduler` override.
    scheduler_config: serde_json::Value,
    force_zeros_for_empty_prompt: bool,
    /// diffusers' default `pag_applied_layers`, resolved against this UNet.
    default_pag_layers: PagLayers,
    device: Device,
    dtype: DType,
}

fn load_clip(source: &ModelSource, tokenizer: &str, encoder: &'static str, opts: &LoadOptions) -> Result<Clip> {
    let weights = component_weights(source, encoder, "model")?;
    let config = ClipTextConfig::from_file(weights.config_path())?;
    let (device, dtype) = (opts.text_device().clone(), opts.text_dtype());
    let encoder = Component::with_residency(encoder, opts.residency, false, move || {
        ClipTextEncoder::load_weights(&weights, &device, dtype)
    })?;
    Ok(Clip { tokenizer: clip_tokenizer(source, tokenizer)?, encoder, config })
}

impl StableDiffusionPipeline {
    /// Load a `StableDiffusionPipeline` or `StableDiffusionXLPipeline` folder (local or from the
    /// hub cache), as `model_index.json` declares it.
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(source, &LoadOptions::new(device, dtype))
    }

    /// As [`Self::load`], with the text encoders' device and the components' residency. The
    /// UNet (small next to a DiT) is always resident; the text encoders and the VAE follow
    /// [`LoadOptions::residency`].
    pub fn load_with(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let (device, dtype) = (&opts.device, opts.dtype);
        let index_path = source.file("model_index.json")?;
        let index: serde_json::Value = read_json(&index_path, "model_index.json")?;
        let variant = variant_of(&index);
        let force_zeros_for_empty_prompt = index
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(variant == SdVariant::StableDiffusionXl);

        let clip = load_clip(source, "tokenizer", "text_encoder", opts)?;
        let clip_2 = match variant {
            SdVariant::StableDiffusion => None,
            SdVariant::StableDiffusionXl => Some(load_clip(source, "tokenizer_2", "text_encoder_2", opts)?),
        };

        let weights = component_weights(source, "unet", "diffusion_pytorch_model")?;
        let config = UNetConfig::from_file(weights.config_path())?;
        let unet = UNet2DConditionModel::load(&config, &weights, dtype, device)?;

        // The text widths must fit the UNet.
        let text_width = clip.config.hidden_size + clip_2.as_ref().map_or(0, |c| c.config.hidden_size);
        if text_width != config.context_dim() {
            return Err(Error::BadModelFile {
                path: source.describe("unet"),
                reason: format!("cross_attention_dim is {}, the text encoders give {text_width}", config.context_dim()),
            });
        }
        match (variant, config.has_text_time()) {
            (SdVariant::StableDiffusionXl, false) => {
                return Err(Error::BadModelFile {
                    path: source.describe("unet"),
                    reason: "an SDXL UNet needs addition_embed_type \"text_time\"".into(),
                })
            }
            (SdVariant::StableDiffusion, true) => {
                return Err(Error::BadModelFile {
                    path: source.describe("unet"),
                    reason: "addition_embed_type \"text_time\" is SDXL's; this is a StableDiffusionPipeline".into(),
                })
            }
            _ => {}
        }
        if let (Some(c2), Some(pooled)) = (&clip_2, config.pooled_text_dim()) {
            let proj = c2.config.projection_dim.unwrap_or(c2.config.hidden_size);
            if proj != pooled {
                return Err(Error::BadModelFile {
                    path: source.describe("unet"),
                    reason: format!(
                        "the add embedding expects pooled text of width {pooled}, text_encoder_2 projects to {proj}"
                    ),
                });
            }
        }

        let vae_weights = component_weights(source, "vae", "diffusion_pytorch_model")?;
        let latent_stats: VaeLatentStats = read_json(vae_weights.config_path(), "VAE config")?;
        let vae_dtype =
            if dtype == DType::F16 && latent_stats.force_upcast.unwrap_or(true) { DType::F32 } else { dtype };
        let vae_config = VaeConfig::from_file(vae_weights.config_path())?;
        if vae_config.latent_channels != config.in_channels {
            return Err(Error::BadModelFile {
                path: source.describe("vae"),
                reason: format!(
                    "VAE has {} latent channels, the UNet expects {}",
                    vae_config.latent_channels, config.in_channels
                ),
            });
        }
        let config_path = vae_weights.config_path().to_path_buf();
        for (key, v) in [("latents_mean", &latent_stats.latents_mean), ("latents_std", &latent_stats.latents_std)] {
            if let Some(v) = v {
                if v.len() != config.in_channels {
                    return Err(Error::BadModelFile {
                        path: config_path.display().to_string(),
                        reason: format!("{key} has {} entries for {} latent channels", v.len(), config.in_channels),
                    });
                }
            }
        }
        let d = device.clone();
        let vae = Component::with_residency("vae", opts.residency, false, move || {
            AutoencoderKl::load_weights(&vae_weights, &d, vae_dtype)
        })?;
        let (scheduler, scheduler_config) = folder_scheduler(source)?;
        let pag_layers = unet.pag_layers(&DEFAULT_PAG_LAYERS.map(String::from)).unwrap_or_default();
        Ok(Self {
            variant,
            clip,
            clip_2,
            prompts: PromptCache::default(),
            unet,
            vae_config,
            vae,
            latent_stats,
            scheduler,
            scheduler_config,
            force_zeros_for_empty_prompt,
            default_pag_layers: pag_layers,
            device: device.clone(),
            dtype,
        })
    }

    /// SD1.5-type or SDXL-type.
    pub fn variant(&self) -> SdVariant {
        self.variant
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// A fresh scheduler for a generation: the folder's, or the request's override.
    fn scheduler_for(&self, req: &ResolvedRequest) -> Result<Box<dyn Scheduler>> {
        scheduler_for(self.scheduler.as_ref(), &self.scheduler_config, req)
    }

    /// The scheduler as loaded (a fresh copy runs each generation).
    pub fn scheduler(&self) -> &dyn Scheduler {
        self.scheduler.as_ref()
    }

    fn warn_truncated(warnings: &mut Warnings, what: &str, t: &TokenizedText) {
        if t.truncated {
            warnings.push(format!(
                "the {what} is longer than CLIP's {CLIP_LEN} tokens and was truncated; ignored: \"{}\"",
                t.removed_text.clone().unwrap_or_default()
            ));
        }
    }

    /// diffusers' `encode_prompt` for one prompt. `padded`: 77 tokens (diffusers); unpadded:
    /// `[BOS, tokens, EOS]` only (VSF's negative prompt). `what` names it in warnings.
    pub fn encode_prompt(&self, text: &str, padded: bool, what: &str, warnings: &mut Warnings) -> Result<SdText> {
        let key = format!("{padded}\u{0}{what}\u{0}{text}");
        self.prompts.get_or_encode(key, warnings, |w| self.encode_uncached(text, padded, what, w))
    }

    fn encode_uncached(&self, text: &str, padded: bool, what: &str, warnings: &mut Warnings) -> Result<SdText> {
        let device = &self.device;
        let mut encode = |clip: &Clip| -> Result<_> {
            let t = clip.tokenizer.tokenize(text, CLIP_LEN)?;
            Self::warn_truncated(warnings, what, &t);
            let ids = if padded { &t.ids[..] } else { &t.ids[..t.len] };
            let out = clip.encoder.get()?.encode_ids(ids)?;
            Ok(crate::text::clip::ClipTextOutput {
                last_hidden_state: out.last_hidden_state.to_device(device)?,
                penultimate_hidden_state: out.penultimate_hidden_state.to_device(device)?,
                pooled: out.pooled.to_device(device)?,
                text_embeds: out.text_embeds.map(|t| t.to_device(device)).transpose()?,
            })
        };
        let first = encode(&self.clip)?;
        match &self.clip_2 {
            None => Ok(SdText { embeds: first.last_hidden_state.to_dtype(self.dtype)?, pooled: None }),
            Some(clip_2) => {
                let second = encode(clip_2)?;
                let pooled = second.text_embeds.ok_or_else(|| Error::BadModelFile {
                    path: "text_encoder_2".into(),
                    reason: "SDXL needs CLIPTextModelWithProjection weights (no text_projection found)".into(),
                })?;
                let embeds = Tensor::cat(
                    &[
                        &first.penultimate_hidden_state,
                        &second.penultimate_hidden_state.to_dtype(first.penultimate_hidden_state.dtype())?,
                    ],
                    D::Minus1,
                )?;
                Ok(SdText { embeds: embeds.to_dtype(self.dtype)?, pooled: Some(pooled.to_dtype(self.dtype)?) })
            }
        }
    }

    fn vae_factor(&self) -> usize {
        self.vae_config.downscale_factor()
    }

    fn check(&self, req: &ResolvedRequest) -> Result<()> {
        let scheduler = self.scheduler_for(req)?;
        check_request(self.unet.config(), &self.vae_config, scheduler.as_ref(), req)?;
        if let Some(layers) = &req.sampler.pag_layers {
            self.unet.pag_layers(layers)?;
        }
        Ok(())
    }

    fn warn_unused(req: &ResolvedRequest, warnings: &mut Warnings) {
        super::warn_unused_cfg_and_negative(req, &UNET, warnings);
        if req.guidance.nag_pooled == NagPooled::Negative && req.guidance.method.attention.is_some() {
            warnings.push("nag_pooled negative has no effect on UNet models (SD3 only)");
        }
    }

    /// SDXL's `add_time_ids`: original size, crop top-left (0, 0), target size, all (H, W).
    fn time_ids(&self, req: &ResolvedRequest) -> Result<Tensor> {
        let (h, w) = (req.height as f32, req.width as f32);
        Ok(Tensor::new(&[[h, w, 0.0, 0.0, h, w]], &self.device)?.to_dtype(self.dtype)?)
    }

    fn denoise(
        &self,
        req: &ResolvedRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
    ) -> Result<Denoised> {
        self.check(req)?;
        Self::warn_unused(req, warnings);
        let g = &req.guidance;

        let mut scheduler = prepared_scheduler(self.scheduler_for(req)?.as_ref(), req)?;
        let n_train = scheduler.num_train_timesteps() as f64;
        let mut planner = GuidancePlanner::new(g, UNET.cfg_scale, req.guidance_scale, UNET.window, n_train);
        let cfg_scale = planner.cfg_scale();
        let pag_scale = planner.pag_scale();

        let f = self.vae_factor();
        let shape = [1, self.unet.config().in_channels, req.height / f, req.width / f];
        let init = match &req.init_latents {
            Some(t) => t.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => gaussian(&shape, req.seed, &self.device)?,
        };
        let mut x = (&init * scheduler.init_noise_sigma())?;

        // Text.
        let neg_text = req.negative_prompt.as_deref().unwrap_or("");
        let positive = self.encode_prompt(&req.prompt, true, "prompt", warnings)?;
        let encoded_negative = if cfg_scale.is_some() || g.uses_contrast() {
            Some(self.encode_prompt(neg_text, true, "negative prompt", warnings)?)
        } else {
            None
        };
        // CFG's uncond: SDXL zeroes it when no negative prompt is given.
        let uncond = match (&encoded_negative, cfg_scale) {
            (Some(n), Some(_)) if req.negative_prompt.is_none() && self.force_zeros_for_empty_prompt => Some(SdText {
                embeds: n.embeds.zeros_like()?,
                pooled: n.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
            }),
            (Some(n), Some(_)) => Some(n.clone()),
            _ => None,
        };
        let guide_context = if g.uses_contrast() {
            encoded_negative.as_ref().map(|n| n.embeds.clone())
        } else if g.uses_vsf() {
            Some(self.encode_prompt(neg_text, false, "negative prompt", warnings)?.embeds)
        } else {
            None
        };
        // Sequential residency: the text encoders are done.
        self.clip.encoder.release();
        if let Some(c) = &self.clip_2 {
            c.encoder.release();
        }

        // Rows: [uncond?, cond, perturbed?].
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        if let Some(u) = &uncond {
            contexts.push(u.embeds.clone());
            pooled.extend(u.pooled.clone());
        }
        let cond_row = contexts.len();
        contexts.push(positive.embeds.clone());
        pooled.extend(positive.pooled.clone());
        if pag_scale.is_some() {
            contexts.push(positive.embeds.clone());
            pooled.extend(positive.pooled.clone());
        }
        let rows = contexts.len();
        let context = Tensor::cat(&contexts, 0)?;
        let (text_embeds, time_ids) = match self.variant {
            SdVariant::StableDiffusionXl => {
                (Some(Tensor::cat(&pooled, 0)?), Some(self.time_ids(req)?.repeat((rows, 1))?))
            }
            SdVariant::StableDiffusion => (None, None),
        };
        let pag_layers = match &req.sampler.pag_layers {
            Some(layers) => self.unet.pag_layers(layers)?,
            None => self.default_pag_layers.clone(),
        };
        if pag_scale.is_some() && pag_layers.is_empty() {
            return Err(Error::invalid(
                "PAG needs at least one self-attention layer (pag_applied_layers selects none)",
            ));
        }

        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        let mut noise = StepNoise::new(req)?;
        for (i, &t) in timesteps.iter().enumerate() {
            let plan = planner.step(scheduler.window_time(i));
            let scaled = scheduler.scale_model_input(&x)?;
            let input = scaled.to_dtype(self.dtype)?.repeat((rows, 1, 1, 1))?;
            let guided = match (&plan.attention, &guide_context) {
                (Some(method), Some(states)) => {
                    Some(NegativeContext { method, states, pooled: None, rows: cond_row..cond_row + 1 })
                }
                _ => None,
            };
            let out = self.unet.forward(&UNetInputs {
                sample: &input,
                timestep: t,
                encoder_hidden_states: &context,
                text_embeds: text_embeds.as_ref(),
                time_ids: time_ids.as_ref(),
                guidance: guided.as_ref(),
                perturbation: pag_scale.map(|_| Perturbation { rows: cond_row + 1..cond_row + 2, layers: &pag_layers }),
            })?;
            let out = out.to_dtype(DType::F32)?;
            let (cond, uncond, perturbed) = super::split_guidance_rows(&out, cond_row, pag_scale.is_some())?;
            let eps = plan.combine_outputs(&cond, uncond.as_ref(), perturbed.as_ref())?;
            x = scheduler.step(&eps, &x, &mut noise)?;
            let guided = plan.attention.is_some();
            super::finish_step(&x, (i, total, t), guided, (&req.guidance, req.guidance_scale), &UNET, on_step)?;
        }
        let step_noise = noise.finish(&describe(scheduler.as_ref(), req), warnings)?;
        Ok(Denoised { latents: x, init_latents: init, step_noise })
    }

    /// Decode with the VAE's latent normalisation: `z / scaling` or, with `latents_mean` /
    /// `latents_std` (Playground v2.5), `z std / scaling + mean`.
    fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let vae = self.vae.get()?;
        let image = self.decode_with(&vae, latents);
        self.vae.release();
        image
    }

    fn decode_with(&self, vae: &AutoencoderKl, latents: &Tensor) -> Result<Tensor> {
        let (Some(mean), Some(std)) = (&self.latent_stats.latents_mean, &self.latent_stats.latents_std) else {
            return vae.decode_latents(latents);
        };
        let scaling = self.latent_stats.scaling_factor.unwrap_or(self.vae_config.scaling_factor);
        let c = mean.len();
        let to = |v: Vec<f32>| Tensor::from_vec(v, (1, c, 1, 1), latents.device());
        let std_t = to(std.iter().map(|&s| s as f32).collect())?;
        let shift = to(mean.iter().map(|&m| (m * scaling) as f32).collect())?;
        // AutoencoderKl divides by the scaling factor: pre-multiply so that the result is
        // `z std / scaling + mean`.
        let z = latents.to_dtype(DType::F32)?.broadcast_mul(&std_t)?.broadcast_add(&shift)?;
        vae.decode_latents(&z)
    }
}

/// The registry chose the family from `_class_name`; SDXL is the variant with a second text
/// encoder (diffusers' `StableDiffusionXLPipeline` layout).
fn variant_of(index: &serde_json::Value) -> SdVariant {
    if has_component(index, "text_encoder_2") {
        SdVariant::StableDiffusionXl
    } else {
        SdVariant::StableDiffusion
    }
}

/// Check a request against a UNet config, the VAE's downscale factor `f` and the scheduler:
/// size, steps, the sampler options the scheduler takes (eta, timesteps), the initial latents'
/// shape and the step noise against the scheduler's draws. PAG layer names are checked
/// against the built UNet.
fn check_request(unet: &UNetConfig, vae: &VaeConfig, scheduler: &dyn Scheduler, req: &ResolvedRequest) -> Result<()> {
    let f = vae.downscale_factor();
    req.check_size(f)?;
    // Full-resolution latent pixels at the first level's width, ~48 live maps (resnets, the
    // transformer's GEGLU, the skips kept for the up path), batch of up to 3 rows.
    let width = unet.block_out_channels.first().copied().unwrap_or(320) as u64;
    let latent_pixels = (req.height / f) as u64 * (req.width / f) as u64 * 3;
    let vae_width = vae.block_out_channels.first().copied().unwrap_or(128);
    req.check_activation_memory(&[(latent_pixels, width, 48), vae_decoder_term(req, vae_width)])?;
    req.check_steps()?;
    check_sampler(scheduler, req, &[1, unet.in_channels, req.height / f, req.width / f], f)
}

/// `check_request` from the folder's config files alone, before any weights load.
pub fn check_before_loading(source: &ModelSource, req: &ResolvedRequest) -> Result<()> {
    let unet = UNetConfig::from_file(&source.file("unet/config.json")?)?;
    let vae = VaeConfig::from_file(&source.file("vae/config.json")?)?;
    check_request(&unet, &vae, requested_scheduler(source, req)?.as_ref(), req)
}

/// The defaults of a UNet-family folder from its config files alone (no weights are read).
pub fn defaults_of(source: &ModelSource) -> Result<Defaults> {
    let index: serde_json::Value = read_json(&source.file("model_index.json")?, "model_index.json")?;
    let unet = UNetConfig::from_file(&source.file("unet/config.json")?)?;
    let vae = VaeConfig::from_file(&source.file("vae/config.json")?)?;
    let (scheduler, _) = folder_scheduler(source)?;
    let px = unet.sample_size.unwrap_or(64) * vae.downscale_factor();
    Ok(unet_defaults(variant_of(&index), scheduler.as_ref(), is_trailing(scheduler.as_ref()), px))
}

/// Defaults of a UNet-family model, from its scheduler and UNet:
/// - SDXL-Lightning (Euler trailing), DMD2 (LCM), Hyper-SDXL (TCD, DDIM trailing): 4 steps,
///   guidance scale 0, NAG alone (the few-step regime of the NAG paper).
/// - Playground v2.5 (EDM schedulers): 50 steps, guidance scale 3, CFG + NAG.
/// - SDXL (other schedulers): 25 steps, guidance scale 5 (diffusers' SDXL default), CFG + NAG.
/// - SD1.5 / SD2: 25 steps, guidance scale 7.5 (diffusers' default), CFG + NAG.
///
/// NAG: NAG paper Table 5, phi = 2 (s = 3), tau 2.5, alpha 0.5 (SDXL, Playground) or 0.375
/// (SD1.5), L1 norm; the official SDXL NAG code uses the same tau / alpha and L1.
/// VSF: alpha 1.2, beta 0.2 (the official cross-attention (Wan) script's values; the VSF paper
/// has no UNet setting). PAG: scale 3 (diffusers' default), layers `["mid"]`.
pub fn unet_defaults(variant: SdVariant, scheduler: &dyn Scheduler, trailing: bool, sample_px: usize) -> Defaults {
    let class = scheduler.class_name();
    let few_step = matches!(class, "LCMScheduler" | "TCDScheduler") || trailing;
    let edm = class.starts_with("EDM");
    let (steps, guidance_scale, method): (usize, f64, Method) = match (variant, few_step, edm) {
        (_, true, _) => (4, 0.0, Method::NAG),
        (_, false, true) => (50, 3.0, Method::CFG_NAG),
        (SdVariant::StableDiffusionXl, false, false) => (25, 5.0, Method::CFG_NAG),
        (SdVariant::StableDiffusion, false, false) => (25, 7.5, Method::CFG_NAG),
    };
    let alpha = if variant == SdVariant::StableDiffusion { 0.375 } else { 0.5 };
    let mut guidance = GuidanceConfig::nag_default();
    guidance.method = method;
    guidance.nag = NagParams { scale: 3.0, tau: 2.5, alpha, norm: Default::default() };
    guidance.vsf = VsfParams { scale: 1.2, bias: 0.2, layout: VsfLayout::Paper };
    guidance.pag_scale = 3.0;
    // Not read here (the CFG scale is guidance_scale); kept equal for readers of the config.
    guidance.true_cfg_scale = guidance_scale.max(1.0);
    Defaults { steps, guidance_scale, max_sequence_length: CLIP_LEN, height: sample_px, width: sample_px, guidance }
}

fn is_trailing(scheduler: &dyn Scheduler) -> bool {
    // Trailing Euler / DDIM schedules start at T - 1 with an even stride (Lightning, Hyper).
    let mut probe = scheduler.clone_box();
    matches!(scheduler.class_name(), "EulerDiscreteScheduler" | "DDIMScheduler")
        && probe.set_timesteps(4).is_ok()
        && probe.timesteps() == [999.0, 749.0, 499.0, 249.0]
}

impl TextToImage for StableDiffusionPipeline {
    fn defaults(&self) -> Defaults {
        let px = self.unet.config().sample_size.unwrap_or(64) * self.vae_factor();
        unet_defaults(self.variant, self.scheduler.as_ref(), is_trailing(self.scheduler.as_ref()), px)
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

    fn loaded_components(&self) -> Vec<(&'static str, bool)> {
        let mut out = vec![("text_encoder", self.clip.encoder.is_loaded())];
        if let Some(c) = &self.clip_2 {
            out.push(("text_encoder_2", c.encoder.is_loaded()));
        }
        out.extend([("unet", true), ("vae", self.vae.is_loaded())]);
        out
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_latents(latents)
    }
}
