//! Flux text-to-image (diffusers `FluxPipeline` + the official NAG pipeline's guidance):
//! CLIP pooled + T5 states -> packed latents -> FlowMatch Euler loop with NAG / NASA / CFG ->
//! unpacked latents -> VAE -> image.

use crate::error::{Error, Result};
use crate::families::FLUX;
use crate::guidance::{GuidanceConfig, GuidancePlanner, NegativeContext};
use crate::loading::components::{clip_tokenizer, component_weights, t5_tokenizer_dir};
use crate::loading::model_source::ModelSource;
use crate::models::flux::{latents, FluxConfig, FluxInputs, FluxTransformer, TextConditioning};
use crate::models::vae::{AutoencoderKl, VaeConfig};
use crate::pipelines::noise::{gaussian, StepNoise};
use crate::pipelines::request::vae_decoder_term;
use crate::pipelines::residency::{Component, LoadOptions, PromptCache};
use crate::pipelines::{Defaults, Denoised, ResolvedRequest, StepEvent, TextToImage, Warnings};
use crate::schedulers::flow_match_euler::{FlowMatchEulerScheduler, SigmaSource};
use crate::schedulers::scheduler::Scheduler;
use crate::text::clip::{ClipTextEncoder, ClipTokenizer};
use crate::text::t5::{T5TextEncoder, T5Tokenizer};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// CLIP always sees 77 tokens in Flux.
const CLIP_LEN: usize = 77;
/// Image pixels per latent pixel, as diffusers' `vae_scale_factor`: 2^(VAE blocks - 1), 8 for
/// the real FLUX.1 VAE (the demo model's smaller VAE has 4).
fn vae_scale(vae: &VaeConfig) -> usize {
    1 << vae.block_out_channels.len().saturating_sub(1)
}

pub struct FluxPipeline {
    clip_tokenizer: ClipTokenizer,
    clip: Component<ClipTextEncoder>,
    t5_tokenizer: T5Tokenizer,
    t5: Component<T5TextEncoder>,
    prompts: PromptCache<TextConditioning>,
    config: FluxConfig,
    transformer: Component<FluxTransformer>,
    vae_config: VaeConfig,
    vae: Component<AutoencoderKl>,
    scheduler: FlowMatchEulerScheduler,
    device: Device,
    dtype: DType,
}

impl FluxPipeline {
    /// Load every component of a Flux diffusers folder (local or from the hub cache).
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(source, &LoadOptions::new(device, dtype))
    }

    /// As [`Self::load`], with the text encoders' device and the components' residency.
    pub fn load_with(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let (device, dtype, residency) = (opts.device.clone(), opts.dtype, opts.residency);
        let clip_tokenizer = clip_tokenizer(source, "tokenizer")?;
        let t5_tokenizer = T5Tokenizer::load(&t5_tokenizer_dir(source, "tokenizer_2")?)?;
        let (text_device, text_dtype) = (opts.text_device().clone(), opts.text_dtype());
        let weights = component_weights(source, "text_encoder", "model")?;
        let d = text_device.clone();
        let clip = Component::with_residency("text_encoder", residency, false, move || {
            ClipTextEncoder::load_weights(&weights, &d, text_dtype)
        })?;
        let weights = component_weights(source, "text_encoder_2", "model")?;
        let t5 = Component::with_residency("text_encoder_2", residency, false, move || {
            T5TextEncoder::load_weights(&weights, &text_device, text_dtype)
        })?;

        let weights = component_weights(source, "transformer", "diffusion_pytorch_model")?;
        let config = FluxConfig::from_file(weights.config_path())?;
        let (c, d) = (config.clone(), device.clone());
        let transformer = Component::with_residency("transformer", residency, true, move || {
            FluxTransformer::load(&c, &weights, dtype, &d)
        })?;

        let weights = component_weights(source, "vae", "diffusion_pytorch_model")?;
        let vae_config = VaeConfig::from_file(weights.config_path())?;
        if vae_config.latent_channels != config.latent_channels() {
            return Err(Error::BadModelFile {
                path: source.describe("vae"),
                reason: format!(
                    "VAE has {} latent channels, the transformer expects {}",
                    vae_config.latent_channels,
                    config.latent_channels()
                ),
            });
        }
        let d = device.clone();
        let vae = Component::with_residency("vae", residency, false, move || {
            AutoencoderKl::load_weights(&weights, &d, dtype)
        })?;
        let sched = source.file("scheduler/scheduler_config.json")?;
        let scheduler =
            FlowMatchEulerScheduler::from_config_file(&sched)?.with_sigma_source(SigmaSource::PipelineLinspace);
        Ok(Self {
            clip_tokenizer,
            clip,
            t5_tokenizer,
            t5,
            prompts: PromptCache::default(),
            config,
            transformer,
            vae_config,
            vae,
            scheduler,
            device,
            dtype,
        })
    }

    /// The transformer (loaded now if it is not yet).
    pub fn transformer(&self) -> Result<Arc<FluxTransformer>> {
        self.transformer.get()
    }

    /// CLIP pooled vector (77 tokens) and T5 states (`max_sequence_length` tokens), as
    /// diffusers' `FluxPipeline.encode_prompt`.
    pub fn encode_prompt(
        &self,
        text: &str,
        max_sequence_length: usize,
        warnings: &mut Warnings,
    ) -> Result<TextConditioning> {
        let key = format!("{max_sequence_length}\u{0}{text}");
        self.prompts.get_or_encode(key, warnings, |warnings| self.encode_uncached(text, max_sequence_length, warnings))
    }

    fn encode_uncached(
        &self,
        text: &str,
        max_sequence_length: usize,
        warnings: &mut Warnings,
    ) -> Result<TextConditioning> {
        let clip_ids = self.clip_tokenizer.tokenize(text, CLIP_LEN)?;
        if clip_ids.truncated {
            warnings.push(format!(
                "the prompt is longer than CLIP's {CLIP_LEN} tokens; CLIP ignores: {}",
                clip_ids.removed_text.clone().unwrap_or_default()
            ));
        }
        let pooled =
            self.clip.get()?.encode_ids(&clip_ids.ids)?.pooled.to_device(&self.device)?.to_dtype(self.dtype)?;
        let t5_ids = self.t5_tokenizer.tokenize(text, max_sequence_length)?;
        if t5_ids.truncated {
            warnings.push(format!(
                "the prompt is longer than max_sequence_length {max_sequence_length}; T5 ignores: {}",
                t5_ids.removed_text.clone().unwrap_or_default()
            ));
        }
        let hidden = self.t5.get()?.encode_ids(&t5_ids.ids)?.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(TextConditioning { hidden, pooled })
    }

    fn check(&self, req: &ResolvedRequest) -> Result<()> {
        check_request(&self.config, &self.vae_config, req)
    }

    fn denoise(
        &self,
        req: &ResolvedRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
    ) -> Result<Denoised> {
        self.check(req)?;
        let model_cfg = &self.config;
        if !model_cfg.guidance_embeds && req.guidance_scale != 0.0 {
            warnings.push(format!(
                "this model has no guidance embedding; guidance_scale {} is ignored",
                req.guidance_scale
            ));
        }
        let scale = vae_scale(&self.vae_config);
        let (lh, lw) = (req.height / scale, req.width / scale);
        let shape = [1, model_cfg.latent_channels(), lh, lw];
        let init = match &req.init_latents {
            Some(t) => t.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => gaussian(&shape, req.seed, &self.device)?,
        };
        let mut x = latents::pack(&init.to_dtype(self.dtype)?)?;

        let positive = self.encode_prompt(&req.prompt, req.max_sequence_length, warnings)?;
        let g = &req.guidance;
        let negative = if g.uses_negative(FLUX.cfg_scale, req.guidance_scale) {
            let text = req.negative_prompt.as_deref().unwrap_or("");
            Some(self.encode_prompt(text, req.max_sequence_length, warnings)?)
        } else {
            None
        };
        // Sequential residency: the text encoders go before the transformer comes.
        self.clip.release();
        self.t5.release();
        let transformer = self.transformer.get()?;
        let n_train = self.scheduler.config().num_train_timesteps as f64;
        let mut planner = GuidancePlanner::new(g, FLUX.cfg_scale, req.guidance_scale, FLUX.window, n_train);
        let img_ids = latents::image_ids(lh, lw, &self.device)?;
        let txt_ids = latents::text_ids(positive.hidden.dim(1)?, &self.device)?;
        // A fresh scheduler per generation: it keeps the step state.
        let mut scheduler = self.scheduler.clone();
        scheduler.set_image_seq_len(img_ids.dim(0)?);
        scheduler.set_timesteps(req.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        let guidance = if model_cfg.guidance_embeds {
            Some(Tensor::new(&[req.guidance_scale as f32], &self.device)?.to_dtype(self.dtype)?)
        } else {
            None
        };
        // Plain CFG runs one batch [positive, negative]: its text and guidance rows, built once.
        let pair = |t: &Tensor| Tensor::cat(&[t, t], 0);
        let cfg_batch = match &negative {
            Some(neg) => Some((positive.batch_with(neg)?, guidance.as_ref().map(pair).transpose()?)),
            None => None,
        };
        let total = timesteps.len();
        // FlowMatch Euler draws no noise: a given step noise is reported unused.
        let mut noise = StepNoise::new(req)?;
        for (i, &t) in timesteps.iter().enumerate() {
            let plan = planner.step(t);
            // diffusers feeds `t / 1000` in the latents' dtype; the model scales it back.
            let timestep = (Tensor::new(&[t as f32], &self.device)? / 1000.0)?.to_dtype(self.dtype)?;
            let forward = |latents: &Tensor,
                           timestep: &Tensor,
                           guidance: Option<&Tensor>,
                           text: &TextConditioning,
                           negative: Option<&NegativeContext>| {
                transformer.forward(&FluxInputs {
                    latents,
                    img_ids: &img_ids,
                    txt_ids: &txt_ids,
                    timestep,
                    guidance,
                    positive: text,
                    negative,
                    nag_variant: req.guidance.nag_variant,
                })
            };
            let call = |text: &TextConditioning, negative: Option<&NegativeContext>| {
                forward(&x, &timestep, guidance.as_ref(), text, negative)
            };
            let guided = match (&plan.attention, &negative) {
                (Some(method), Some(neg)) => {
                    Some(NegativeContext { method, states: &neg.hidden, pooled: Some(&neg.pooled), rows: 0..1 })
                }
                _ => None,
            };
            let (v, v_neg) = match (plan.cfg_scale, &negative, &guided, &cfg_batch) {
                // Plain CFG: one batch [positive, negative] (every weight read once per step, as
                // diffusers-style pipelines batch; on a GPU this hides part of CFG's cost).
                (Some(_), Some(_), None, Some((both, guidance2))) => {
                    let out = forward(&pair(&x)?, &pair(&timestep)?, guidance2.as_ref(), both, None)?;
                    (out.narrow(0, 0, 1)?, Some(out.narrow(0, 1, 1)?))
                }
                // CFG + NAG: the official two passes (NAG on the positive pass only).
                (Some(_), Some(neg), Some(_), _) => (call(&positive, guided.as_ref())?, Some(call(neg, None)?)),
                _ => (call(&positive, guided.as_ref())?, None),
            };
            let v = plan.combine_outputs(&v, v_neg.as_ref(), None)?;
            x = scheduler.step(&v, &x, &mut noise)?;
            let unpacked = latents::unpack(&x, lh, lw)?;
            let guided = plan.attention.is_some();
            super::finish_step(&unpacked, (i, total, t), guided, (&req.guidance, req.guidance_scale), &FLUX, on_step)?;
        }
        let step_noise = noise.finish(scheduler.class_name(), warnings)?;
        Ok(Denoised { latents: latents::unpack(&x, lh, lw)?, init_latents: init, step_noise })
    }
}

/// Check a request against a Flux transformer config: size, steps, T5 tokens, init latents.
fn check_request(cfg: &FluxConfig, vae: &VaeConfig, req: &ResolvedRequest) -> Result<()> {
    let scale = vae_scale(vae);
    req.check_size(scale * 2)?;
    // Packed 2x2 latent tokens plus the text; ~24 live [tokens, width] buffers at a block's peak.
    let tokens = (req.height / (scale * 2)) as u64 * (req.width / (scale * 2)) as u64 + 512;
    let vae_width = vae.block_out_channels.first().copied().unwrap_or(128);
    req.check_activation_memory(&[(tokens, cfg.inner_dim() as u64, 24), vae_decoder_term(req, vae_width)])?;
    req.check_steps()?;
    if req.max_sequence_length == 0 || req.max_sequence_length > 512 {
        return Err(Error::parameter(
            "max_sequence_length",
            format!("must be in 1..=512, got {}", req.max_sequence_length),
        ));
    }
    let want = [1, cfg.latent_channels(), req.height / scale, req.width / scale];
    req.check_init_latents(&want, scale)
}

/// `check_request` from the folder's config alone, before any weights load.
pub fn check_before_loading(source: &ModelSource, req: &ResolvedRequest) -> Result<()> {
    let vae = VaeConfig::from_file(&source.file("vae/config.json")?)?;
    check_request(&FluxConfig::from_file(&source.file("transformer/config.json")?)?, &vae, req)
}

/// The defaults of a Flux folder from its transformer config alone (no weights are read).
pub fn defaults_of(source: &ModelSource) -> Result<Defaults> {
    Ok(flux_defaults(&FluxConfig::from_file(&source.file("transformer/config.json")?)?))
}

/// FLUX.1 defaults: the official NAG README (s = 5, tau = 2.5, alpha = 0.25; schnell 4 steps
/// with no embedded guidance and 256 T5 tokens; dev 25 steps at guidance 3.5, 512 tokens).
pub fn flux_defaults(cfg: &FluxConfig) -> Defaults {
    let guidance = GuidanceConfig::nag_default();
    if cfg.guidance_embeds {
        Defaults { steps: 25, guidance_scale: 3.5, max_sequence_length: 512, height: 1024, width: 1024, guidance }
    } else {
        Defaults { steps: 4, guidance_scale: 0.0, max_sequence_length: 256, height: 1024, width: 1024, guidance }
    }
}

impl TextToImage for FluxPipeline {
    fn defaults(&self) -> Defaults {
        flux_defaults(&self.config)
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
        vec![
            ("text_encoder", self.clip.is_loaded()),
            ("text_encoder_2", self.t5.is_loaded()),
            ("transformer", self.transformer.is_loaded()),
            ("vae", self.vae.is_loaded()),
        ]
    }

    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let vae = self.vae.get()?;
        let image = vae.decode_latents(latents);
        self.vae.release();
        image
    }
}
