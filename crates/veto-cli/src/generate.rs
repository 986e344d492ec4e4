//! `veto generate`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use veto::guidance::{GuidanceConfig, Method, NagNorm, NagPooled, VsfLayout};
use veto::{Defaults, Denoised, GenerateRequest, ModelSource, Pipeline, SamplerOptions};

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Hugging Face repo id (e.g. black-forest-labs/FLUX.1-schnell) or a local diffusers folder.
    #[arg(long)]
    pub model: String,
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
    #[arg(long, default_value = "l1")]
    pub nag_norm: String,
    /// Early stopping theta (paper appendix G): guide while t >= (1 - nag_end) * 1000 (UNet: the official SDXL rule, floor((1 - nag_end) * 999)); 1 = every step.
    #[arg(long, default_value_t = 1.0)]
    pub nag_end: f64,
    /// NASA scale phi (paper eq. 5: Z = Z+ - phi Z-) [default: 0.5].
    #[arg(long)]
    pub nasa_scale: Option<f64>,
    /// Flux: CFG scale with the negative prompt (diffusers true_cfg_scale; paper eq. 3 phi = scale - 1).
    #[arg(long, default_value_t = 4.0)]
    pub true_cfg_scale: f64,
    /// VSF scale alpha (VSF paper: negative values times -alpha) [default: per model, SD3.5 3.5].
    #[arg(long)]
    pub vsf_scale: Option<f64>,
    /// VSF bias beta (VSF paper: -beta on image -> flipped-negative logits) [default: per model, SD3.5 0.1].
    #[arg(long)]
    pub vsf_bias: Option<f64>,
    /// VSF token layout (SD3): paper (as the paper describes) or official (as the official SD3 pipeline runs); the UNet family has only paper.
    #[arg(long, default_value = "paper")]
    pub vsf_layout: String,
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
    /// SD3: pooled vector of the NAG branch: positive (official diffusers) or negative (official ComfyUI).
    #[arg(long, default_value = "positive")]
    pub nag_pooled: String,
    /// The pipeline's guidance_scale as diffusers means it: Flux-dev's embedded guidance; SD3/SDXL's CFG scale [default: per model].
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Denoising steps [default: schnell 4, dev 25].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Image height in pixels: a multiple of 16 (Flux, SD3) or 8 (UNet family) [default: per model].
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels: a multiple of 16 (Flux, SD3) or 8 (UNet family) [default: per model].
    #[arg(long)]
    pub width: Option<usize>,
    /// T5 tokens [default: schnell 256, dev 512].
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Safetensors file: the initial latents [1, C, H/8, W/8] (tensor `init_latents`, as --save-latents writes it, else `latents`) used instead of seeded noise, and optionally `step_noise` [N, 1, C, H/8, W/8], the noise a stochastic sampler (LCM, TCD, DDIM with eta, DPM++ SDE) adds between steps, replayed instead of drawn.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Write the final latents `latents` [1, C, H/8, W/8] (before VAE decode) to this safetensors file, with the run's `init_latents` and `step_noise` (if the sampler drew any): given to --init-latents, it replays the run.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output PNG.
    #[arg(long, default_value = "out.png")]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
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
    cfg.nag.norm = a.nag_norm.parse::<NagNorm>().map_err(anyhow::Error::msg).context("--nag-norm")?;
    cfg.nag_end = a.nag_end;
    cfg.nasa_scale = a.nasa_scale.unwrap_or(d.nasa_scale);
    cfg.true_cfg_scale = a.true_cfg_scale;
    cfg.vsf.scale = a.vsf_scale.unwrap_or(d.vsf.scale);
    cfg.vsf.bias = a.vsf_bias.unwrap_or(d.vsf.bias);
    cfg.vsf.layout = a.vsf_layout.parse::<VsfLayout>().map_err(anyhow::Error::msg).context("--vsf-layout")?;
    cfg.pag_scale = a.pag_scale.unwrap_or(d.pag_scale);
    cfg.nag_pooled = match a.nag_pooled.to_ascii_lowercase().as_str() {
        "positive" => NagPooled::Positive,
        "negative" => NagPooled::Negative,
        other => bail!("--nag-pooled: unknown value '{other}' (expected positive or negative)"),
    };
    cfg.validate().map_err(flag_error)?;
    Ok(cfg)
}

/// The request the flags describe, over the model's defaults.
fn request(a: &GenerateArgs, defaults: &Defaults, init: InitFile) -> Result<GenerateRequest> {
    let mut req = GenerateRequest::new(a.prompt.clone()).guidance(guidance_config(a, defaults)?).seed(a.seed);
    req.negative_prompt = a.negative_prompt.clone();
    req.steps = a.steps;
    req.height = a.height;
    req.width = a.width;
    req.guidance_scale = a.guidance_scale;
    req.max_sequence_length = a.max_sequence_length;
    req.init_latents = init.latents;
    req.step_noise = init.step_noise;
    req.sampler = SamplerOptions { timesteps: a.timesteps.clone(), eta: a.eta, pag_layers: a.pag_layers.clone() };
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

/// Fail early when an output would land in a folder that does not exist.
fn check_output_folder(flag: &str, path: &Path) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("{flag}: folder {} does not exist", parent.display());
    }
    Ok(())
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
    check_output_folder("--output", &a.output)?;
    if let Some(p) = &a.save_latents {
        check_output_folder("--save-latents", p)?;
    }
    let init = a.init_latents.as_deref().map(load_init_latents).transpose()?.unwrap_or_default();
    let device = device(a.device)?;
    let source = ModelSource::resolve(&a.model)?;
    // The family, its defaults and the request's family-level checks come from the config
    // files: a bad request stops here, before any weights load.
    let family = veto::families::detect(&source).map_err(flag_error)?;
    let defaults = (family.defaults)(&source).map_err(flag_error)?;
    let req = request(&a, &defaults, init)?;
    Pipeline::check_before_loading(&source, &req).map_err(flag_error)?;

    eprintln!("loading {} ({}) ...", a.model, family.title);
    let pipe = Pipeline::load(&source, &device, dtype(a.dtype)).map_err(flag_error)?;
    let resolved = pipe.resolve(&req).map_err(flag_error)?;

    let bar = ProgressBar::new(resolved.steps.max(resolved.sampler.timesteps.as_ref().map_or(0, Vec::len)) as u64);
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
    let (run, warnings, _) = generated.map_err(flag_error)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    if let Some(p) = &a.save_latents {
        save_latents(&run, p)?;
    }
    let image = pipe.decode(&run.latents)?;
    veto::save_png(&image, &a.output)?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
