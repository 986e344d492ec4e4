//! Stable Diffusion 3 / 3.5 text-to-image (diffusers `StableDiffusion3Pipeline` plus the
//! official NAG and VSF pipelines' guidance): CLIP-L + CLIP-G + T5 text states -> FlowMatch
//! Euler loop over the MMDiT with NAG / NASA / VSF / CFG / CFG+NAG -> VAE -> image.
//!
//! **CFG scale.** For SD3 the CFG scale is the pipeline's `guidance_scale`, exactly as
//! diffusers' `StableDiffusion3Pipeline(guidance_scale=...)`: CFG runs when the method
//! contains `cfg` *and* `GenerateRequest::guidance_scale > 1`, with
//! `v = v_uncond + guidance_scale (v_cond - v_uncond)`, the uncond pass on the (padded)
//! negative prompt. `GuidanceConfig::true_cfg_scale` (Flux's separate CFG scale) is not used.
//! CFG is batched `[uncond, cond]` in one transformer call; with CFG+NAG (or CFG+NASA) the NAG
//! negative stream joins that same call and guides the cond row only, as the official
//! `NAGStableDiffusion3Pipeline` does. VSF changes the cond row's token count, so CFG+VSF runs
//! the uncond pass as a second call.
//!
//! **Defaults** ([`sd3_defaults`]). Turbo is detected from the model's location: a folder path
//! or hub repo id containing "turbo" (case-insensitive; the SD3.5-Large-Turbo files are
//! otherwise identical to SD3.5-Large's). Turbo: 8 steps (the NAG and VSF papers' setting; the
//! model card uses 4), guidance_scale 0 (no CFG). Otherwise, per the diffusers model cards:
//! SD3.5-Medium (MMDiT-X, `dual_attention_layers` set) 40 steps at 4.5, SD3-Medium (no qk norm)
//! 28 steps at 7.0, SD3.5-Large 28 steps at 3.5. NAG: the NAG paper's Table 5 for SD3.5-Large
//! (phi = 4, i.e. nag_scale 5, tau 2.5, alpha 0.125); VSF: alpha 3.5, beta 0.1, paper layout.

use crate::error::{Error, Result};
use crate::families::SD3;
use crate::guidance::{
    AttentionGuidance, GuidanceConfig, GuidancePlanner, Method, NagParams, NagPooled, NegativeContext,
};
use crate::loading::components::{clip_tokenizer, component_weights, t5_tokenizer_dir};
use crate::loading::model_index::has_component;
use crate::loading::model_source::ModelSource;
use crate::loading::safetensors_files::read_json;
use crate::models::mmdit::{MmditConfig, MmditInputs, MmditTransformer};
use crate::models::vae::{AutoencoderKl, VaeConfig};
use crate::pipelines::noise::{gaussian, StepNoise};
use crate::pipelines::residency::{Component, LoadOptions, PromptCache};
use crate::pipelines::{Defaults, Denoised, ResolvedRequest, StepEvent, TextToImage, Warnings};
use crate::schedulers::flow_match_euler::{FlowMatchEulerScheduler, SigmaSource};
use crate::schedulers::scheduler::Scheduler;
use crate::text::clip::{ClipTextConfig, ClipTextEncoder, ClipTokenizer};
use crate::text::t5::{T5TextEncoder, T5Tokenizer};
use crate::text::TokenizedText;
use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

/// The one T5 config field SD3 checks before the encoder loads.
#[derive(serde::Deserialize)]
struct T5Width {
    d_model: usize,
}

/// CLIP's context length (`tokenizer_max_length` in diffusers).
const CLIP_LEN: usize = 77;
/// diffusers rejects longer T5 contexts for SD3.
const MAX_T5_LEN: usize = 512;

/// The text conditioning of one prompt: `[1, T, joint_dim]` states and `[1, pooled_dim]`.
#[derive(Clone)]
pub struct Sd3Text {
    pub embeds: Tensor,
    pub pooled: Tensor,
}

/// A CLIP tokenizer and its encoder.
struct Clip {
    tokenizer: ClipTokenizer,
    encoder: Component<ClipTextEncoder>,
    config: ClipTextConfig,
    name: &'static str,
}

impl Clip {
    fn load(source: &ModelSource, tokenizer: &str, name: &'static str, opts: &LoadOptions) -> Result<Self> {
        let weights = component_weights(source, name, "model")?;
        let config = ClipTextConfig::from_file(weights.config_path())?;
        let (device, dtype) = (opts.text_device().clone(), opts.text_dtype());
        let encoder = Component::with_residency(name, opts.residency, false, move || {
            ClipTextEncoder::load_weights(&weights, &device, dtype)
        })?;
        Ok(Self { tokenizer: clip_tokenizer(source, tokenizer)?, encoder, config, name })
    }
}

struct T5 {
    tokenizer: T5Tokenizer,
    encoder: Component<T5TextEncoder>,
    width: usize,
}

pub struct Sd3Pipeline {
    clip_l: Clip,
    clip_g: Clip,
    /// `None` when `model_index.json` has `text_encoder_3: [null, null]` (SD3 without T5).
    t5: Option<T5>,
    prompts: PromptCache<Sd3Text>,
    config: MmditConfig,
    transformer: Component<MmditTransformer>,
    vae_config: VaeConfig,
    vae: Component<AutoencoderKl>,
    scheduler: FlowMatchEulerScheduler,
    turbo: bool,
    device: Device,
    dtype: DType,
}

/// The Turbo rule of the module docs: "turbo" in the repo id or in the path of the model's
/// files (local folder, or the hub cache folder named after the repo).
fn is_turbo(source: &ModelSource, index_path: &std::path::Path) -> bool {
    let said = |s: &str| s.to_ascii_lowercase().contains("turbo");
    source.repo_id().is_some_and(said) || said(&index_path.to_string_lossy())
}

impl Sd3Pipeline {
    /// Load every component of an SD3 / SD3.5 diffusers folder (local or from the hub cache).
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(source, &LoadOptions::new(device, dtype))
    }

    /// As [`Self::load`], with the text encoders' device and the components' residency.
    pub fn load_with(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let (device, dtype, residency) = (opts.device.clone(), opts.dtype, opts.residency);
        let index_path = source.file("model_index.json")?;
        let index: serde_json::Value = read_json(&index_path, "model_index.json")?;
        let clip_l = Clip::load(source, "tokenizer", "text_encoder", opts)?;
        let clip_g = Clip::load(source, "tokenizer_2", "text_encoder_2", opts)?;
        let t5 = if has_component(&index, "text_encoder_3") {
            for optional in ["tokenizer_config.json", "special_tokens_map.json"] {
                source.try_file(&format!("tokenizer_3/{optional}"))?;
            }
            let weights = component_weights(source, "text_encoder_3", "model")?;
            let width = read_json::<T5Width>(weights.config_path(), "T5 config")?.d_model;
            let (d, t) = (opts.text_device().clone(), opts.text_dtype());
            Some(T5 {
                tokenizer: T5Tokenizer::load(&t5_tokenizer_dir(source, "tokenizer_3")?)?,
                encoder: Component::with_residency("text_encoder_3", residency, false, move || {
                    T5TextEncoder::load_weights(&weights, &d, t)
                })?,
                width,
            })
        } else {
            None
        };

        let weights = component_weights(source, "transformer", "diffusion_pytorch_model")?;
        let config = MmditConfig::from_file(weights.config_path())?;
        let (c, d) = (config.clone(), device.clone());
        let transformer = Component::with_residency("transformer", residency, true, move || {
            MmditTransformer::load(&c, &weights, dtype, &d)
        })?;

        let weights = component_weights(source, "vae", "diffusion_pytorch_model")?;
        let vae_config = VaeConfig::from_file(weights.config_path())?;
        if vae_config.latent_channels != config.in_channels {
            return Err(Error::BadModelFile {
                path: source.describe("vae"),
                reason: format!(
                    "VAE has {} latent channels, the transformer expects {}",
                    vae_config.latent_channels, config.in_channels
                ),
            });
        }
        let d = device.clone();
        let vae = Component::with_residency("vae", residency, false, move || {
            AutoencoderKl::load_weights(&weights, &d, dtype)
        })?;
        let scheduler = FlowMatchEulerScheduler::from_config_file(source.file("scheduler/scheduler_config.json")?)?
            .with_sigma_source(SigmaSource::SchedulerDefault);
        if scheduler.config().invert_sigmas {
            return Err(Error::BadModelFile {
                path: source.describe("scheduler"),
                reason: "invert_sigmas is not supported for SD3".into(),
            });
        }

        let pipe = Self {
            clip_l,
            clip_g,
            t5,
            prompts: PromptCache::default(),
            config,
            transformer,
            vae_config,
            vae,
            scheduler,
            turbo: is_turbo(source, &index_path),
            device,
            dtype,
        };
        pipe.check_widths()?;
        Ok(pipe)
    }

    /// The text encoders must produce what the transformer consumes.
    fn check_widths(&self) -> Result<()> {
        let cfg = &self.config;
        let proj = |c: &Clip| c.config.projection_dim.unwrap_or(0);
        let pooled = proj(&self.clip_l) + proj(&self.clip_g);
        if pooled != cfg.pooled_projection_dim {
            return Err(Error::BadModelFile {
                path: "text_encoder/config.json, text_encoder_2/config.json".into(),
                reason: format!(
                    "the CLIP projections give a pooled vector of {pooled}, the transformer expects {}",
                    cfg.pooled_projection_dim
                ),
            });
        }
        let clip_width = self.clip_l.config.hidden_size + self.clip_g.config.hidden_size;
        let t5_width = self.t5.as_ref().map_or(cfg.joint_attention_dim, |t| t.width);
        if t5_width != cfg.joint_attention_dim || clip_width > t5_width {
            return Err(Error::BadModelFile {
                path: "text_encoder_3/config.json".into(),
                reason: format!(
                    "text widths: CLIP-L + CLIP-G {clip_width}, T5 {t5_width}; the transformer's \
                     joint_attention_dim is {} (CLIP is zero-padded up to the T5 width)",
                    cfg.joint_attention_dim
                ),
            });
        }
        Ok(())
    }

    /// The transformer (loaded now if it is not yet).
    pub fn transformer(&self) -> Result<Arc<MmditTransformer>> {
        self.transformer.get()
    }

    /// Whether the defaults are the Turbo ones (see the module docs for the rule).
    pub fn is_turbo(&self) -> bool {
        self.turbo
    }

    fn warn_truncated(warnings: &mut Warnings, what: &str, encoder: &str, limit: usize, t: &TokenizedText) {
        if t.truncated {
            warnings.push(format!(
                "the {what} is longer than {encoder}'s {limit} tokens and was truncated; ignored: \"{}\"",
                t.removed_text.clone().unwrap_or_default()
            ));
        }
    }

    /// `StableDiffusion3Pipeline.encode_prompt` for one prompt. `padded`: CLIP padded to 77
    /// and T5 to `max_sequence_length` (diffusers); unpadded: CLIP `[BOS, tokens, EOS]` and T5
    /// `[tokens, </s>]` at their natural lengths (the official VSF pipeline's negative prompt,
    /// VSF paper 3.4). `what` names the prompt in truncation warnings.
    pub fn encode_prompt(
        &self,
        text: &str,
        max_sequence_length: usize,
        padded: bool,
        what: &str,
        warnings: &mut Warnings,
    ) -> Result<Sd3Text> {
        let key = format!("{max_sequence_length}\u{0}{padded}\u{0}{what}\u{0}{text}");
        self.prompts.get_or_encode(key, warnings, |w| self.encode_uncached(text, max_sequence_length, padded, what, w))
    }

    fn encode_uncached(
        &self,
        text: &str,
        max_sequence_length: usize,
        padded: bool,
        what: &str,
        warnings: &mut Warnings,
    ) -> Result<Sd3Text> {
        let mut states = Vec::new();
        let mut pooled = Vec::new();
        for clip in [&self.clip_l, &self.clip_g] {
            let t = clip.tokenizer.tokenize(text, CLIP_LEN)?;
            Self::warn_truncated(warnings, what, "CLIP", CLIP_LEN, &t);
            let ids = if padded { &t.ids[..] } else { &t.ids[..t.len] };
            let out = clip.encoder.get()?.encode_ids(ids)?;
            states.push(out.penultimate_hidden_state.to_device(&self.device)?);
            let pooled_out = out.text_embeds.ok_or_else(|| Error::BadModelFile {
                path: clip.name.into(),
                reason: "SD3 needs CLIPTextModelWithProjection weights (no text_projection found)".into(),
            })?;
            pooled.push(pooled_out.to_device(&self.device)?);
        }
        let clip = Tensor::cat(&states, D::Minus1)?;
        let width = self.config.joint_attention_dim;
        let t5 = match &self.t5 {
            Some(t5) => {
                let t = t5.tokenizer.tokenize(text, max_sequence_length)?;
                Self::warn_truncated(warnings, what, "T5 (max_sequence_length)", max_sequence_length, &t);
                let ids = if padded { &t.ids[..] } else { &t.ids[..t.len] };
                t5.encoder.get()?.encode_ids(ids)?.to_device(&self.device)?
            }
            // diffusers: zeros of CLIP's length when the pipeline has no T5.
            None => Tensor::zeros((1, CLIP_LEN, width), clip.dtype(), &self.device)?,
        };
        let clip = clip.pad_with_zeros(D::Minus1, 0, width - clip.dim(D::Minus1)?)?;
        Ok(Sd3Text {
            embeds: Tensor::cat(&[&clip, &t5.to_dtype(clip.dtype())?], 1)?.to_dtype(self.dtype)?,
            pooled: Tensor::cat(&pooled, D::Minus1)?.to_dtype(self.dtype)?,
        })
    }

    fn check(&self, req: &ResolvedRequest) -> Result<()> {
        check_request(&self.config, self.vae_config.downscale_factor(), req)
    }

    fn denoise(
        &self,
        req: &ResolvedRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
    ) -> Result<Denoised> {
        self.check(req)?;
        super::warn_unused_cfg_and_negative(req, &SD3, warnings);
        let model_cfg = &self.config;
        let f = self.vae_config.downscale_factor();
        let (lh, lw) = (req.height / f, req.width / f);
        let init = match &req.init_latents {
            Some(t) => t.to_device(&self.device)?,
            None => gaussian(&[1, model_cfg.in_channels, lh, lw], req.seed, &self.device)?,
        };
        let mut x = init.to_dtype(self.dtype)?;

        let g = &req.guidance;
        let n_train = self.scheduler.config().num_train_timesteps as f32;
        let mut planner = GuidancePlanner::new(g, SD3.cfg_scale, req.guidance_scale, SD3.window, n_train as f64);
        let cfg_scale = planner.cfg_scale();
        let msl = req.max_sequence_length;
        let neg_text = req.negative_prompt.as_deref().unwrap_or("");
        let positive = self.encode_prompt(&req.prompt, msl, true, "prompt", warnings)?;
        let negative = if cfg_scale.is_some() || g.uses_contrast() {
            Some(self.encode_prompt(neg_text, msl, true, "negative prompt", warnings)?)
        } else {
            None
        };
        let vsf_negative = if g.uses_vsf() {
            Some(self.encode_prompt(neg_text, msl, false, "negative prompt", warnings)?)
        } else {
            None
        };
        // The NAG stream's modulation: positive pooled (official diffusers) or negative (ComfyUI).
        let nag_pooled = match (g.nag_pooled, &negative) {
            (NagPooled::Negative, Some(n)) => &n.pooled,
            _ => &positive.pooled,
        };
        // CFG batches [uncond, cond]; built once.
        // Sequential residency: the text encoders go before the transformer comes.
        self.clip_l.encoder.release();
        self.clip_g.encoder.release();
        if let Some(t5) = &self.t5 {
            t5.encoder.release();
        }
        let transformer = self.transformer.get()?;
        let batched = match (&negative, cfg_scale) {
            (Some(n), Some(_)) => Some(Sd3Text {
                embeds: Tensor::cat(&[&n.embeds, &positive.embeds], 0)?,
                pooled: Tensor::cat(&[&n.pooled, &positive.pooled], 0)?,
            }),
            _ => None,
        };

        let image_seq_len = (lh / model_cfg.patch_size) * (lw / model_cfg.patch_size);
        // A fresh scheduler per generation: it keeps the step state.
        let mut scheduler = self.scheduler.clone();
        scheduler.set_image_seq_len(image_seq_len);
        scheduler.set_timesteps(req.steps)?;
        let total = req.steps;
        // FlowMatch Euler draws no noise: a given step noise is reported unused.
        let mut noise = StepNoise::new(req)?;
        for i in 0..total {
            // diffusers: timesteps = sigmas * num_train_timesteps in f32, passed to the model as is.
            let t = scheduler.timesteps()[i] as f32;
            let plan = planner.step(t as f64);
            let call = |latents: &Tensor, text: &Sd3Text, negative: Option<&NegativeContext>| -> Result<Tensor> {
                let b = latents.dim(0)?;
                let timestep = Tensor::from_vec(vec![t; b], b, &self.device)?;
                transformer.forward(&MmditInputs {
                    latents,
                    timestep: &timestep,
                    context: &text.embeds,
                    pooled: &text.pooled,
                    guidance: negative,
                })
            };
            let missing = |what: &str| Error::other(format!("internal: the {what} was not encoded"));
            // The cond row is the last of the batch: [cond], or [uncond, cond] with batched CFG.
            let batched_cfg = cfg_scale.is_some() && !matches!(plan.attention, Some(AttentionGuidance::Vsf(_)));
            let cond_row = usize::from(batched_cfg);
            let guided = match &plan.attention {
                None => None,
                Some(method @ AttentionGuidance::Vsf(_)) => Some(NegativeContext {
                    method,
                    states: &vsf_negative.as_ref().ok_or_else(|| missing("VSF negative prompt"))?.embeds,
                    pooled: None,
                    rows: 0..1,
                }),
                Some(method) => Some(NegativeContext {
                    method,
                    states: &negative.as_ref().ok_or_else(|| missing("negative prompt"))?.embeds,
                    pooled: Some(nag_pooled),
                    rows: cond_row..cond_row + 1,
                }),
            };
            let (v_cond, v_uncond) = match cfg_scale {
                None => (call(&x, &positive, guided.as_ref())?, None),
                // VSF lengthens the cond row's context: the uncond pass runs on its own.
                Some(_) if !batched_cfg => {
                    let neg = negative.as_ref().ok_or_else(|| missing("negative prompt"))?;
                    (call(&x, &positive, guided.as_ref())?, Some(call(&x, neg, None)?))
                }
                Some(_) => {
                    let both = batched.as_ref().ok_or_else(|| missing("CFG batch"))?;
                    let v = call(&Tensor::cat(&[&x, &x], 0)?, both, guided.as_ref())?;
                    (v.narrow(0, 1, 1)?, Some(v.narrow(0, 0, 1)?))
                }
            };
            let v = plan.combine_outputs(&v_cond, v_uncond.as_ref(), None)?;
            x = scheduler.step(&v, &x, &mut noise)?;
            let guided = plan.attention.is_some();
            super::finish_step(&x, (i, total, t as f64), guided, (&req.guidance, req.guidance_scale), &SD3, on_step)?;
        }
        let step_noise = noise.finish(scheduler.class_name(), warnings)?;
        Ok(Denoised { latents: x, init_latents: init, step_noise })
    }
}

/// Check a request against an SD3 transformer config and the VAE's downscale factor `f`.
fn check_request(cfg: &MmditConfig, f: usize, req: &ResolvedRequest) -> Result<()> {
    let mult = f * cfg.patch_size;
    req.check_size(mult)?;
    let max_px = cfg.pos_embed_max_size * mult;
    for (name, v) in [("height", req.height), ("width", req.width)] {
        if v > max_px {
            return Err(Error::parameter(
                name,
                format!(
                    "height and width must be at most {max_px} for this model (pos_embed_max_size {}), got {}x{}",
                    cfg.pos_embed_max_size, req.height, req.width
                ),
            ));
        }
    }
    req.check_steps()?;
    if req.max_sequence_length == 0 || req.max_sequence_length > MAX_T5_LEN {
        return Err(Error::parameter(
            "max_sequence_length",
            format!("must be in 1..={MAX_T5_LEN}, got {}", req.max_sequence_length),
        ));
    }
    req.check_init_latents(&[1, cfg.in_channels, req.height / f, req.width / f], f)
}

/// `check_request` from the folder's config files alone, before any weights load.
pub fn check_before_loading(source: &ModelSource, req: &ResolvedRequest) -> Result<()> {
    let cfg = MmditConfig::from_file(&source.file("transformer/config.json")?)?;
    let vae = VaeConfig::from_file(&source.file("vae/config.json")?)?;
    check_request(&cfg, vae.downscale_factor(), req)
}

/// The defaults of an SD3 folder from its config files alone (no weights are read).
pub fn defaults_of(source: &ModelSource) -> Result<Defaults> {
    let index_path = source.file("model_index.json")?;
    let cfg = MmditConfig::from_file(&source.file("transformer/config.json")?)?;
    let vae = VaeConfig::from_file(&source.file("vae/config.json")?)?;
    Ok(sd3_defaults(&cfg, is_turbo(source, &index_path), vae.downscale_factor()))
}

/// Defaults of an SD3-family model (module docs); the default size is the transformer's
/// `sample_size` latents times the VAE's `vae_factor`.
pub fn sd3_defaults(cfg: &MmditConfig, turbo: bool, vae_factor: usize) -> Defaults {
    let (steps, guidance_scale): (usize, f64) = if turbo {
        (8, 0.0)
    } else if !cfg.dual_attention_layers.is_empty() {
        (40, 4.5)
    } else if !cfg.qk_norm() {
        (28, 7.0)
    } else {
        (28, 3.5)
    };
    let mut guidance = GuidanceConfig::nag_default();
    guidance.nag = NagParams { scale: 5.0, tau: 2.5, alpha: 0.125, norm: Default::default() };
    guidance.method = if turbo { Method::NAG } else { Method::CFG_NAG };
    // Not used by SD3 (the CFG scale is guidance_scale); kept equal for readers of the config.
    guidance.true_cfg_scale = guidance_scale.max(1.0);
    let size = cfg.sample_size * vae_factor;
    Defaults { steps, guidance_scale, max_sequence_length: 256, height: size, width: size, guidance }
}

impl TextToImage for Sd3Pipeline {
    fn defaults(&self) -> Defaults {
        sd3_defaults(&self.config, self.turbo, self.vae_config.downscale_factor())
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
        let mut out = vec![
            ("text_encoder", self.clip_l.encoder.is_loaded()),
            ("text_encoder_2", self.clip_g.encoder.is_loaded()),
        ];
        if let Some(t5) = &self.t5 {
            out.push(("text_encoder_3", t5.encoder.is_loaded()));
        }
        out.extend([("transformer", self.transformer.is_loaded()), ("vae", self.vae.is_loaded())]);
        out
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let vae = self.vae.get()?;
        let image = vae.decode_latents(latents);
        self.vae.release();
        image
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo_is_read_from_the_location() {
        let root = tempfile::tempdir().unwrap();
        for (name, turbo) in [("stable-diffusion-3.5-large-Turbo", true), ("stable-diffusion-3.5-large", false)] {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            let index = dir.join("model_index.json");
            std::fs::write(&index, r#"{"_class_name": "StableDiffusion3Pipeline"}"#).unwrap();
            let source = ModelSource::local(&dir).unwrap();
            assert_eq!(is_turbo(&source, &index), turbo, "{name}");
        }
    }

    #[test]
    fn defaults_per_model() {
        let large: MmditConfig = serde_json::from_str(
            r#"{"qk_norm": "rms_norm", "num_attention_heads": 38, "caption_projection_dim": 2432}"#,
        )
        .unwrap();
        let medium35: MmditConfig = serde_json::from_str(r#"{"qk_norm": "rms_norm", "dual_attention_layers": [0, 1], "num_attention_heads": 24, "caption_projection_dim": 1536}"#).unwrap();
        let medium3: MmditConfig = serde_json::from_str("{}").unwrap();
        let d = sd3_defaults(&large, true, 8);
        assert_eq!((d.steps, d.guidance_scale), (8, 0.0));
        assert_eq!(d.guidance.method, Method::NAG);
        assert_eq!((d.guidance.nag.scale, d.guidance.nag.tau, d.guidance.nag.alpha), (5.0, 2.5, 0.125));
        assert_eq!((d.guidance.vsf.scale, d.guidance.vsf.bias), (3.5, 0.1));
        assert_eq!((sd3_defaults(&large, false, 8).steps, sd3_defaults(&large, false, 8).guidance_scale), (28, 3.5));
        assert_eq!(sd3_defaults(&medium35, false, 8).guidance_scale, 4.5);
        assert_eq!(sd3_defaults(&medium3, false, 8).guidance_scale, 7.0);
        assert_eq!(sd3_defaults(&medium3, false, 8).height, 1024);
        assert!(sd3_defaults(&large, false, 8).guidance.validate().is_ok());
    }
}
