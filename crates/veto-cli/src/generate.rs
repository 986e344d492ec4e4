//! `veto generate`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use veto::guidance::{AttentionMethod, CfgScaleSource, GuidanceConfig, Method, NagNorm, NagPooled, VsfLayout};
use veto::pipelines::VideoOptions;
use veto::{
    Defaults, Denoised, Family, GenerateRequest, LoadOptions, LoraSpec, ModelSource, Pipeline, Residency,
    SamplerOptions,
};

use crate::outputs::OutputPlan;

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// `--memory`: what stays loaded (library: [`veto::Residency`]).
#[derive(Clone, Copy, ValueEnum)]
pub enum MemoryArg {
    /// Resident when every weight fits in the free memory with a tenth to spare, else sequential.
    Auto,
    /// Every component loaded at once and kept.
    Resident,
    /// Text encoders loaded to encode and freed, then the denoiser, then the VAE to decode.
    Sequential,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// `demo` (the small model embedded in veto: coloured shapes, 64x64, offline), a Hugging Face repo id (e.g. black-forest-labs/FLUX.1-schnell), a local diffusers folder, a single-file checkpoint (.safetensors: FLUX.1 BFL/ComfyUI, SD3/SD3.5, SDXL/SD1.5 A1111/ComfyUI) or a GGUF transformer/UNet (city96-style FLUX, SD3.5, SDXL files with diffusers tensor names).
    #[arg(long, default_value = veto::demo::model::NAME)]
    pub model: String,
    /// With a single-file or GGUF --model: the diffusers model (hub id or folder) giving the configs, scheduler, tokenizers and the components the file lacks [default: the official repo of the file's variant, e.g. black-forest-labs/FLUX.1-dev].
    #[arg(long)]
    pub base_model: Option<String>,
    /// A GGUF file (F16, Q8_0, Q5_K, Q4_K, ...) replacing the transformer (Flux, SD3) or UNet
    /// (SDXL) of --model; its matrices stay quantized in memory.
    #[arg(long)]
    pub transformer: Option<PathBuf>,
    /// LoRA merged into the weights at load time: FILE or FILE:SCALE (scale default 1), repeatable. Layouts: diffusers/PEFT, kohya/A1111, ComfyUI/BFL, XLabs; Flux, SD3/SD3.5, SDXL, SD1.5 (denoiser and text encoders).
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    pub lora: Vec<LoraSpec>,
    /// What the image should show.
    #[arg(long)]
    pub prompt: String,
    /// What it should not show (NAG/NASA: the negative attention context; CFG: the negative pass).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Guidance method: nag, nasa, vsf, cfg, cfg+nag, cfg+pag+nag, ... or none [default: the model's (Flux: nag) with a negative prompt, else none/cfg].
    #[arg(long)]
    pub guidance: Option<String>,
    /// NAG scale s = phi + 1 (paper: phi, eq. 7); 1 turns NAG off [default: per model, Flux 5].
    #[arg(long)]
    pub nag_scale: Option<f64>,
    /// NAG clipping threshold tau (paper eq. 9), > 0 [default: 2.5].
    #[arg(long)]
    pub nag_tau: Option<f64>,
    /// NAG blend alpha (paper eq. 10), in [0, 1] [default: per model, Flux 0.25].
    #[arg(long)]
    pub nag_alpha: Option<f64>,
    /// Norm of the NAG ratio (paper eq. 8): l1 (the paper) or l2 (the official Flux code).
    #[arg(long)]
    pub nag_norm: Option<String>,
    /// Early stopping theta (paper appendix G): guide while t >= (1 - nag_end) * 1000 (UNet: the official SDXL rule, floor((1 - nag_end) * 999)); 1 = every step.
    #[arg(long)]
    pub nag_end: Option<f64>,
    /// NASA scale phi (paper eq. 5: Z = Z+ - phi Z-) [default: 0.5].
    #[arg(long)]
    pub nasa_scale: Option<f64>,
    /// Flux: CFG scale with the negative prompt (diffusers true_cfg_scale; paper eq. 3 phi = scale - 1) [default: 4].
    #[arg(long)]
    pub true_cfg_scale: Option<f64>,
    /// VSF scale alpha (VSF paper: negative values times -alpha) [default: per model, SD3.5 3.5].
    #[arg(long)]
    pub vsf_scale: Option<f64>,
    /// VSF bias beta (VSF paper: -beta on image -> flipped-negative logits) [default: per model, SD3.5 0.1].
    #[arg(long)]
    pub vsf_bias: Option<f64>,
    /// VSF token layout (SD3): paper (as the paper describes) or official (as the official SD3 pipeline runs); the UNet family has only paper.
    #[arg(long)]
    pub vsf_layout: Option<String>,
    /// PAG scale s (perturbed-attention guidance: + s (eps - eps_perturbed)) [default: 3].
    #[arg(long)]
    pub pag_scale: Option<f64>,
    /// UNet family: self-attention layers PAG perturbs (diffusers pag_applied_layers, e.g. mid,down.1) [default: mid].
    #[arg(long, value_delimiter = ',')]
    pub pag_layers: Option<Vec<String>>,
    /// UNet family: explicit timesteps instead of the scheduler's rule (diffusers timesteps=, e.g. DMD2: 999,749,499,249).
    #[arg(long, value_delimiter = ',')]
    pub timesteps: Option<Vec<f64>>,
    /// UNet family: diffusers' eta (DDIM noise, TCD gamma) [default: 0].
    #[arg(long)]
    pub eta: Option<f64>,
    /// UNet family: another scheduler, built from the model's scheduler config as diffusers' from_config: euler, euler_a, ddim, pndm/plms, lcm, tcd, dpmpp_2m, dpmpp_2m_karras, heun, unipc, or a diffusers class name [default: the model folder's].
    #[arg(long)]
    pub scheduler: Option<String>,
    /// SANA: the complex-human-instruction prefix of the prompt: default (diffusers') or none [default: default].
    #[arg(long)]
    pub complex_human_instruction: Option<String>,
    /// SD3: pooled vector of the NAG branch: positive (official diffusers) or negative (official ComfyUI).
    #[arg(long)]
    pub nag_pooled: Option<String>,
    /// Flux, NAG/NASA: `official` (default: the single blocks run a second image stream, as the official code) or `shared-image` (veto's variant: one image stream, only the negative text is extra; cheaper, not the official semantics).
    #[arg(long)]
    pub nag_variant: Option<String>,
    /// The pipeline's guidance_scale as diffusers means it: Flux-dev's embedded guidance; SD3/SDXL's CFG scale [default: per model].
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Denoising steps [default: schnell 4, dev 25].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Image height in pixels: a multiple of 16 (Flux, SD3) or 8 (UNet family); PixArt-Σ runs at the nearest aspect-ratio bin [default: per model].
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels: a multiple of 16 (Flux, SD3) or 8 (UNet family); PixArt-Σ runs at the nearest aspect-ratio bin [default: per model].
    #[arg(long)]
    pub width: Option<usize>,
    /// T5 tokens [default: schnell 256, dev 512].
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// Seed of the initial noise (and of stochastic samplers) [default: random, printed and recorded in the image].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images to generate, with seeds seed, seed+1, ...; written as out-0.png, out-1.png, ...
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Safetensors file: the initial latents [1, C, H/8, W/8] (tensor `init_latents`, as --save-latents writes it, else `latents`) used instead of seeded noise, and optionally `step_noise` [N, 1, C, H/8, W/8], the noise a stochastic sampler (LCM, TCD, DDIM with eta, DPM++ SDE, Euler a) adds between steps, replayed instead of drawn.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Write the final latents `latents` [1, C, H/8, W/8] (before VAE decode) to this safetensors file, with the run's `init_latents` and `step_noise` (if the sampler drew any): given to --init-latents, it replays the run.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output image: .png (with the generation parameters in text chunks: A1111 `parameters` and JSON `veto`), .jpg/.jpeg or .webp (lossless). Video (Wan): .mp4 (H.264), .gif, .webp (animated) or a folder of PNG frames (a path ending in `/`). An existing file is replaced.
    #[arg(long, default_value = "out.png")]
    pub output: PathBuf,
    /// Wan (video): frames, 4k+1 (others are rounded down to 4k+1 with a warning, as diffusers) [default: 81].
    #[arg(long)]
    pub frames: Option<usize>,
    /// Wan (video): frames per second of the written video [default: 16, as Wan].
    #[arg(long)]
    pub fps: Option<u32>,
    /// Wan (video): the UniPC scheduler's flow_shift (Wan: 3 at 480p, 5 at 720p) [default: the model folder's].
    #[arg(long)]
    pub flow_shift: Option<f64>,
    /// Wan image-to-video: the first frame (resized to the video's size); a text-to-video model refuses it.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Where to run: cpu, or cuda (GPU 0; needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Precision of the weights and activations: f32, bf16 (NAG's norms stay f32) or f16 [default: f32 on cpu, bf16 on cuda].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Where the text encoders run [default: --device]. `cpu` with `--device cuda` keeps T5-XXL (9.5 GB in bf16) off the GPU; it then runs in f32 in host memory.
    #[arg(long, value_enum)]
    pub text_encoder_device: Option<DeviceArg>,
    /// What stays in memory: `resident` (all components at once: fastest for many prompts), `sequential` (text encoders, then the denoiser, then the VAE: the peak is the largest stage, not the sum) or `auto` (resident if it fits in the free memory, else sequential).
    #[arg(long, value_enum, default_value = "auto")]
    pub memory: MemoryArg,
}

/// `--lora FILE[:SCALE]`; clap names the flag in the error.
fn parse_lora(arg: &str) -> std::result::Result<LoraSpec, String> {
    LoraSpec::parse(arg).map_err(|e| match e {
        veto::Error::InvalidParameter { reason, .. } => reason,
        other => other.to_string(),
    })
}

pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device cuda: this veto was built without the `cuda` feature (cargo build --release --features cuda)");
            }
            Device::new_cuda(0).context("--device cuda: no usable CUDA device")
        }
    }
}

/// `--text-encoder-device`: the main device itself when they name the same one.
fn text_encoder_device(arg: DeviceArg, main: &Device) -> Result<Device> {
    match (arg, main) {
        (DeviceArg::Cpu, _) => Ok(Device::Cpu),
        (DeviceArg::Cuda, Device::Cuda(_)) => Ok(main.clone()),
        (DeviceArg::Cuda, _) => device(DeviceArg::Cuda).context("--text-encoder-device cuda"),
    }
}

pub fn dtype(arg: DtypeArg) -> DType {
    match arg {
        DtypeArg::F32 => DType::F32,
        DtypeArg::Bf16 => DType::BF16,
        DtypeArg::F16 => DType::F16,
    }
}

/// The CLI flag of a library parameter name (`nag_tau` -> `--nag-tau`; `step_noise`, a tensor of
/// the --init-latents file, -> `--init-latents (step_noise)`).
pub fn flag_of(name: &str) -> String {
    match name {
        "step_noise" => "--init-latents (step_noise)".to_string(),
        _ => format!("--{}", name.replace('_', "-")),
    }
}

/// A library error in the CLI's words: parameters are named by their flags.
pub fn flag_error(e: veto::Error) -> anyhow::Error {
    match e {
        veto::Error::InvalidParameter { name, reason } => anyhow::anyhow!("{}: {reason}", flag_of(name)),
        veto::Error::NonFinite { step, total, timestep, method, parameters } => {
            let lower = parameters.iter().map(|p| flag_of(p)).collect::<Vec<_>>().join(" or ");
            let hint = if lower.is_empty() {
                "with f16, try --dtype bf16 or f32".to_string()
            } else {
                format!("lower {lower}")
            };
            anyhow::anyhow!(
                "step {step}/{total} (t = {timestep:.0}) produced non-finite latents under guidance '{method}'; {hint} (nothing was written)"
            )
        }
        other => other.into(),
    }
}

/// The guidance request: the flags over the model's defaults.
fn guidance_config(a: &GenerateArgs, defaults: &Defaults) -> Result<GuidanceConfig> {
    let d = &defaults.guidance;
    // Without --guidance: the model's default method; its attention part needs a negative prompt.
    let method = match &a.guidance {
        Some(g) => g.parse::<Method>().map_err(flag_error)?,
        None => defaults.method_for(a.negative_prompt.is_some()),
    };
    let mut cfg = d.clone();
    cfg.method = method;
    cfg.nag.scale = a.nag_scale.unwrap_or(d.nag.scale);
    cfg.nag.tau = a.nag_tau.unwrap_or(d.nag.tau);
    cfg.nag.alpha = a.nag_alpha.unwrap_or(d.nag.alpha);
    if let Some(norm) = &a.nag_norm {
        cfg.nag.norm = norm.parse::<NagNorm>().map_err(anyhow::Error::msg).context("--nag-norm")?;
    }
    cfg.nag_end = a.nag_end.unwrap_or(d.nag_end);
    cfg.nasa_scale = a.nasa_scale.unwrap_or(d.nasa_scale);
    cfg.true_cfg_scale = a.true_cfg_scale.unwrap_or(d.true_cfg_scale);
    cfg.vsf.scale = a.vsf_scale.unwrap_or(d.vsf.scale);
    cfg.vsf.bias = a.vsf_bias.unwrap_or(d.vsf.bias);
    if let Some(layout) = &a.vsf_layout {
        cfg.vsf.layout = layout.parse::<VsfLayout>().map_err(anyhow::Error::msg).context("--vsf-layout")?;
    }
    cfg.pag_scale = a.pag_scale.unwrap_or(d.pag_scale);
    cfg.nag_pooled = match a.nag_pooled.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => d.nag_pooled,
        Some("positive") => NagPooled::Positive,
        Some("negative") => NagPooled::Negative,
        Some(other) => bail!("--nag-pooled: unknown value '{other}' (expected positive or negative)"),
    };
    if let Some(v) = &a.nag_variant {
        cfg.nag_variant = v.parse().map_err(|e: String| anyhow::anyhow!("--nag-variant: {e}"))?;
    }
    cfg.validate().map_err(flag_error)?;
    Ok(cfg)
}

/// One rule for every flag: a flag that does not apply to the model's family (from the
/// registry) or to the chosen guidance method is an error that says why, before any weights
/// load. Nothing is silently ignored.
fn check_flags(a: &GenerateArgs, family: &Family, method: Method) -> Result<()> {
    let att = method.attention;
    let given = |set: bool, flag: &str, ok: bool, why: String| -> Result<()> {
        if set && !ok {
            bail!("{flag} does not apply: {why}");
        }
        Ok(())
    };
    let needs = |what: &str| format!("it needs {what} in --guidance, which is '{method}'");
    let nag = att == Some(AttentionMethod::Nag);
    for (set, flag) in [
        (a.nag_scale.is_some(), "--nag-scale"),
        (a.nag_tau.is_some(), "--nag-tau"),
        (a.nag_alpha.is_some(), "--nag-alpha"),
        (a.nag_norm.is_some(), "--nag-norm"),
    ] {
        given(set, flag, nag, needs("nag"))?;
    }
    given(a.nag_end.is_some(), "--nag-end", att.is_some(), needs("an attention method (nag, nasa, vsf)"))?;
    given(a.nasa_scale.is_some(), "--nasa-scale", att == Some(AttentionMethod::Nasa), needs("nasa"))?;
    let vsf = att == Some(AttentionMethod::Vsf);
    for (set, flag) in [
        (a.vsf_scale.is_some(), "--vsf-scale"),
        (a.vsf_bias.is_some(), "--vsf-bias"),
        (a.vsf_layout.is_some(), "--vsf-layout"),
    ] {
        given(set, flag, vsf, needs("vsf"))?;
    }
    given(a.pag_scale.is_some(), "--pag-scale", method.pag, needs("pag"))?;
    given(a.pag_layers.is_some(), "--pag-layers", method.pag, needs("pag"))?;
    if a.pag_layers.as_ref().is_some_and(|l| l.iter().all(|s| s.trim().is_empty())) {
        bail!("--pag-layers names no layer (e.g. mid, down.1, up.0.attentions.0)");
    }
    given(
        a.nag_pooled.is_some(),
        "--nag-pooled",
        family.nag_pooled,
        format!("{} has no pooled vector modulating the NAG stream", family.title),
    )?;
    given(a.nag_pooled.is_some(), "--nag-pooled", nag || att == Some(AttentionMethod::Nasa), needs("nag or nasa"))?;
    given(
        a.nag_variant.is_some(),
        "--nag-variant",
        family.nag_variants.len() > 1,
        format!("{} has only the official NAG data flow", family.title),
    )?;
    given(a.nag_variant.is_some(), "--nag-variant", nag || att == Some(AttentionMethod::Nasa), needs("nag or nasa"))?;
    given(
        a.true_cfg_scale.is_some(),
        "--true-cfg-scale",
        family.cfg_scale == CfgScaleSource::TrueCfgScale,
        format!("{}'s CFG scale is --guidance-scale", family.title),
    )?;
    given(a.true_cfg_scale.is_some(), "--true-cfg-scale", method.cfg, needs("cfg"))?;
    given(
        a.max_sequence_length.is_some(),
        "--max-sequence-length",
        family.t5_tokens,
        format!("{} has no T5 encoder (CLIP always takes 77 tokens)", family.title),
    )?;
    let uses_negative = att.is_some() || method.cfg;
    given(a.negative_prompt.is_some(), "--negative-prompt", uses_negative, format!("guidance '{method}' uses none"))?;
    Ok(())
}

/// Wan's frame rate.
const DEFAULT_FPS: u32 = 16;

/// The video flags apply to a video family only; --fps must be one the writers take.
fn check_video_flags(a: &GenerateArgs, video: bool) -> Result<()> {
    if !video {
        for (set, flag) in [
            (a.frames.is_some(), "--frames"),
            (a.fps.is_some(), "--fps"),
            (a.flow_shift.is_some(), "--flow-shift"),
            (a.image.is_some(), "--image"),
        ] {
            if set {
                bail!("{flag} does not apply: the model makes images, not videos (video: Wan)");
            }
        }
    }
    if let Some(fps) = a.fps.filter(|&f| f == 0 || f > veto::video_io::MAX_FPS) {
        bail!("--fps must be 1..={}, got {fps}", veto::video_io::MAX_FPS);
    }
    if a.frames == Some(0) {
        bail!("--frames must be positive (4k+1, e.g. 81)");
    }
    Ok(())
}

/// The --image file as RGB (the pipeline resizes it as diffusers does).
fn load_first_frame(path: &Path) -> Result<image::RgbImage> {
    Ok(image::open(path).with_context(|| format!("--image: cannot read {}", path.display()))?.to_rgb8())
}

/// The request the flags describe, over the model's defaults.
fn request(a: &GenerateArgs, defaults: &Defaults, init: InitFile) -> Result<GenerateRequest> {
    let mut req = GenerateRequest::new(a.prompt.clone()).guidance(guidance_config(a, defaults)?);
    req.negative_prompt = a.negative_prompt.clone();
    req.steps = a.steps;
    req.height = a.height;
    req.width = a.width;
    req.guidance_scale = a.guidance_scale;
    req.max_sequence_length = a.max_sequence_length;
    req.init_latents = init.latents;
    req.step_noise = init.step_noise;
    req.video = VideoOptions { frames: a.frames, flow_shift: a.flow_shift, image: None };
    req.sampler = SamplerOptions {
        timesteps: a.timesteps.clone(),
        eta: a.eta,
        pag_layers: a.pag_layers.clone(),
        scheduler: a.scheduler.clone(),
        complex_human_instruction: a.complex_human_instruction.clone(),
    };
    Ok(req)
}

/// The tensors of an --init-latents file.
#[derive(Default)]
struct InitFile {
    latents: Option<Tensor>,
    step_noise: Option<Tensor>,
}

fn load_init_latents(path: &Path) -> Result<InitFile> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("--init-latents: cannot read safetensors file {}", path.display()))?;
    // A file written by --save-latents holds the final `latents` and the `init_latents` it
    // started from: the run is replayed from the latter.
    let latents = tensors.remove("init_latents").or_else(|| tensors.remove("latents")).with_context(|| {
        format!("--init-latents: {} has no tensor named `latents` (or `init_latents`)", path.display())
    })?;
    Ok(InitFile { latents: Some(latents), step_noise: tensors.remove("step_noise") })
}

/// Write the run's final latents, initial latents and step noise atomically (temporary file +
/// rename).
fn save_latents(run: &Denoised, path: &Path) -> Result<()> {
    let name = path.file_name().with_context(|| format!("--save-latents {} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
    let mut tensors =
        std::collections::HashMap::from([("latents", cpu(&run.latents)?), ("init_latents", cpu(&run.init_latents)?)]);
    if let Some(noise) = &run.step_noise {
        tensors.insert("step_noise", cpu(noise)?);
    }
    let res = candle_core::safetensors::save(&tensors, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|_| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("--save-latents: writing {}", path.display()))
}

/// The residency to load with, after printing the weights' sizes (local folders) and stopping
/// before loading when even the chosen residency's peak cannot fit in the free memory.
fn plan_memory(source: &ModelSource, opts: &LoadOptions, asked: MemoryArg) -> Result<Residency> {
    use veto::pipelines::memory::{available_bytes, weights_plan};
    let fixed = match asked {
        MemoryArg::Auto => None,
        MemoryArg::Resident => Some(Residency::Resident),
        MemoryArg::Sequential => Some(Residency::Sequential),
    };
    let Some(plan) = weights_plan(source, opts)? else {
        return Ok(fixed.unwrap_or_default());
    };
    let gb = |b: u64| b as f64 / 1e9;
    let available = available_bytes(&opts.device);
    let residency = fixed.unwrap_or_else(|| plan.choose(available));
    let peak = plan.device_peak(residency);
    eprintln!(
        "weights: about {:.2} GB in {:?} (text encoders {:.2}, denoiser {:.2}, VAE {:.2}); memory: {} \
         (weights peak about {:.2} GB{}, plus activations)",
        gb(plan.total()),
        opts.dtype,
        gb(plan.text_encoders),
        gb(plan.denoiser),
        gb(plan.vae),
        match residency {
            Residency::Resident => "resident",
            Residency::Sequential => "sequential",
        },
        gb(peak),
        available.map_or(String::new(), |a| format!(" of {:.1} GB free", gb(a))),
    );
    let where_ = if opts.device.is_cpu() { "memory" } else { "GPU memory" };
    if let Some(free) = available.filter(|&free| peak > free) {
        let hint = match residency {
            Residency::Resident => "try --memory sequential, --dtype bf16, or a smaller model",
            Residency::Sequential if !opts.device.is_cpu() && opts.text_encoder_device.is_none() => {
                "try --text-encoder-device cpu, --dtype bf16, or a smaller model"
            }
            Residency::Sequential => "try --dtype bf16, a smaller model, or a machine with more memory",
        };
        bail!(
            "the model's weights need about {:.1} GB of {where_} at once in {:?}, {:.1} GB are free; {hint}",
            gb(peak),
            opts.dtype,
            gb(free)
        );
    }
    if let (Some(te), Some(host)) = (Some(plan.text_device_peak()).filter(|&b| b > 0), available_bytes(&Device::Cpu)) {
        if te > host {
            bail!(
                "--text-encoder-device cpu: the text encoders need about {:.1} GB of memory in f32, {:.1} GB are free",
                gb(te),
                gb(host)
            );
        }
    }
    Ok(residency)
}

/// `--model`, with the component `--transformer` (or a GGUF `--model`) replaces.
fn model_source(a: &GenerateArgs) -> Result<ModelSource> {
    let is_gguf = |p: &Path| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf(Path::new(&a.model)) {
        if a.transformer.is_some() {
            bail!("--model is already a GGUF file; --transformer replaces the transformer of a diffusers model");
        }
        let file = veto::loading::gguf_layout::GgufTensors::open(Path::new(&a.model))?;
        let (default_base, component) = file.default_base_model()?;
        let base = a.base_model.as_deref().unwrap_or(default_base);
        eprintln!(
            "{}: the {component} from the GGUF file ({}), everything else from {base}",
            a.model,
            file.describe_layout()
        );
        return Ok(ModelSource::resolve(base)?.with_component_file(component, &a.model)?);
    }
    let source = if a.model == veto::demo::model::NAME {
        veto::demo::model::source(veto_demo_weights::FILES)?
    } else {
        ModelSource::resolve_with_base(&a.model, a.base_model.as_deref())?
    };
    let Some(file) = &a.transformer else {
        return Ok(source);
    };
    if !is_gguf(file) {
        bail!("--transformer {}: expected a .gguf file", file.display());
    }
    let component = if veto::families::detect(&source)?.name == "unet" { "unet" } else { "transformer" };
    Ok(source.with_component_file(component, file)?)
}

pub fn run(a: GenerateArgs) -> Result<()> {
    // Everything that can be checked without the model is checked first.
    let generic = Defaults {
        steps: 1,
        guidance_scale: 0.0,
        max_sequence_length: 1,
        height: 16,
        width: 16,
        guidance: GuidanceConfig::nag_default(),
    };
    guidance_config(&a, &generic)?;
    for (flag, v) in [("--height", a.height), ("--width", a.width)] {
        if v == Some(0) {
            bail!("{flag} must be positive");
        }
    }
    if a.num_images > 1 && a.init_latents.is_some() {
        bail!("--num-images {} with --init-latents would make the same image each time", a.num_images);
    }
    let init = a.init_latents.as_deref().map(load_init_latents).transpose()?.unwrap_or_default();
    let device = device(a.device)?;
    let source = model_source(&a)?.with_loras(a.lora.clone());
    if let Some(parts) = source.parts_summary() {
        eprintln!("single-file checkpoint: {parts}");
    }
    // The family, its defaults and the request's family-level checks come from the config
    // files: a bad request stops here, before any weights load.
    let family = veto::families::detect(&source).map_err(flag_error)?;
    let video = family.name == "wan";
    check_video_flags(&a, video)?;
    let outputs = if video {
        OutputPlan::new_video(&a.output, a.save_latents.as_deref(), a.num_images)?.0
    } else {
        OutputPlan::new(&a.output, a.save_latents.as_deref(), a.num_images)?
    };
    let defaults = (family.defaults)(&source).map_err(flag_error)?;
    let mut req = request(&a, &defaults, init)?;
    if a.model == veto::demo::model::NAME {
        veto::demo::model::fill_defaults(&mut req);
    }
    if let Some(path) = &a.image {
        req.video.image = Some(load_first_frame(path)?);
    }
    check_flags(&a, family, req.guidance.as_ref().map_or(defaults.guidance.method, |g| g.method))?;
    Pipeline::check_before_loading(&source, &req).map_err(flag_error)?;
    for lora in veto::loading::lora::check(&source).map_err(flag_error)? {
        eprintln!("{lora}");
    }

    let dtype = dtype(a.dtype.unwrap_or(if device.is_cpu() { DtypeArg::F32 } else { DtypeArg::Bf16 }));
    let mut opts = LoadOptions::new(&device, dtype);
    opts.text_encoder_device = match a.text_encoder_device {
        Some(arg) => Some(text_encoder_device(arg, &device)?),
        None => None,
    };
    opts.residency = plan_memory(&source, &opts, a.memory)?;
    eprintln!("loading {} ({}) ...", a.model, family.title);
    let pipe = Pipeline::load_with(&source, &opts).map_err(flag_error)?;
    // The rest of the checks, against the loaded model; the seed does not change them.
    let planned = pipe.resolve(&req).map_err(flag_error)?;
    let steps = planned.sampler.timesteps.as_ref().map_or(planned.steps, Vec::len) as u64;

    let first_seed = a.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    for (i, image_path) in outputs.images.iter().enumerate() {
        let seed = first_seed.wrapping_add(i as u64);
        eprintln!("seed {seed}");
        let req = req.clone().seed(seed);
        let bar = ProgressBar::new(steps);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let generated = pipe.generate_latents(&req, &mut |e| {
            bar.set_length(e.total as u64);
            bar.set_message(format!("t={:.0}{}", e.timestep, if e.attention_guided { " (guided)" } else { "" }));
            bar.inc(1);
        });
        bar.finish_and_clear();
        let (run, warnings, resolved) = generated.map_err(flag_error)?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        if let Some(p) = &outputs.latents[i] {
            save_latents(&run, p)?;
        }
        if video {
            let frames = pipe.decode(&run.latents)?;
            veto::video_io::save_video(&frames, image_path, a.fps.unwrap_or(DEFAULT_FPS)).map_err(flag_error)?;
            eprintln!("wrote {}", image_path.display());
            continue;
        }
        let image = pipe.decode_for(&run.latents, &resolved)?;
        let metadata = resolved.metadata(&a.model, family);
        veto::image_io::save_image(&image, image_path, Some(&metadata)).map_err(flag_error)?;
        eprintln!("wrote {}", image_path.display());
    }
    Ok(())
}
