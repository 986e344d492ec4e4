//! `veto bench`: per-step cost of guidance on a random-weight model of a registered family at
//! the real width and reduced depth. One run measures the no-guidance baseline and each method
//! under identical conditions, so the ratios are comparable.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use veto::guidance::{AttentionGuidance, GuidancePlan, NagNorm, NagParams, NagVariant, NegativeContext, VsfParams};
use veto::models::flux::{latents, FluxConfig, FluxInputs, FluxTransformer, TextConditioning};
use veto::models::mmdit::{MmditConfig, MmditInputs, MmditTransformer};
use veto::models::pixart::{PixArtConfig, PixArtInputs, PixArtTransformer2DModel};
use veto::models::sana::{SanaConfig, SanaInputs, SanaTransformer2DModel};
use veto::models::unet::{UNet2DConditionModel, UNetConfig, UNetInputs};
use veto::models::wan::{WanConfig, WanInputs, WanTransformer3DModel};
use veto::profile::{self, Op};

use crate::arithmetic::{self, Limits};
use crate::generate::{device, dtype, DeviceArg, DtypeArg};

#[derive(Args)]
pub struct BenchArgs {
    /// Which model family to time: flux (FLUX.1 width 3072: none / NAG / CFG), sd3 (SD3.5-Large
    /// width 2432: none / NAG / VSF / CFG), unet or sdxl (SDXL UNet channels 320/640/1280: none / NAG / VSF / CFG), pixart (PixArt-Sigma width 1152: none / NAG / VSF / CFG), sana (SANA 1.6B width 2240: none / NAG / VSF / CFG), wan (Wan2.1 T2V widths 1536 and 5120: none / NAG / VSF / CFG).
    #[arg(long, default_value = "flux")]
    pub family: String,
    /// Image sizes (square, pixels) to time.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    pub sizes: Vec<usize>,
    /// Flux double (MMDiT) blocks; the real model has 19.
    #[arg(long, default_value_t = 1)]
    pub double_blocks: usize,
    /// Flux single blocks; the real model has 38 (keep the real 1:2 ratio for representative ratios).
    #[arg(long, default_value_t = 2)]
    pub single_blocks: usize,
    /// SD3 joint blocks; SD3.5-Large has 38 (the last one is context-pre-only).
    #[arg(long, default_value_t = 2)]
    pub sd3_blocks: usize,
    /// SDXL transformer layers of the three levels; the real model has 1,2,10.
    #[arg(long, value_delimiter = ',', default_value = "1,1,2")]
    pub sdxl_depths: Vec<usize>,
    /// PixArt-Sigma transformer blocks; the real model has 28.
    #[arg(long, default_value_t = 2)]
    pub pixart_blocks: usize,
    /// Wan transformer blocks of each model timed (1.3B: width 1536, 30 blocks; 14B: 5120, 40).
    #[arg(long, default_value_t = 1)]
    pub wan_blocks: usize,
    /// Wan: video frames (4k+1; 81 in the real setting), at each of `--sizes` square.
    #[arg(long, default_value_t = 5)]
    pub frames: usize,
    /// SANA transformer blocks; SANA 1.6B has 20.
    #[arg(long, default_value_t = 2)]
    pub sana_blocks: usize,
    /// T5 tokens (Flux-schnell and SD3 default 256; PixArt and SANA captions, at most 300).
    #[arg(long, default_value_t = 256)]
    pub text_len: usize,
    /// Timed repetitions per method (after one warm-up).
    #[arg(long, default_value_t = 2)]
    pub iters: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// After timing, run each method once more recording where its time goes (matrix products,
    /// attention, softmax/LSE, merges, copies, norms, guidance math; CPU only) and print one
    /// table per size: time per op class and its difference from the baseline, bytes copied.
    #[arg(long)]
    pub profile: bool,
    /// Print every timed run of each method (in the order they ran), not only the median, so
    /// the spread behind a ratio is visible.
    #[arg(long)]
    pub samples: bool,
}

fn config(a: &BenchArgs) -> FluxConfig {
    FluxConfig {
        patch_size: 1,
        in_channels: 64,
        out_channels: None,
        num_layers: a.double_blocks,
        num_single_layers: a.single_blocks,
        attention_head_dim: 128,
        num_attention_heads: 24,
        joint_attention_dim: 4096,
        pooled_projection_dim: 768,
        guidance_embeds: false,
        axes_dims_rope: vec![16, 56, 56],
    }
}

/// A method under test: one denoising step returning its output.
type Method<'a> = Box<dyn FnMut() -> Result<Tensor> + 'a>;

/// A method with its column label.
fn labelled<'a>(label: &'a str, f: impl FnMut() -> Result<Tensor> + 'a) -> (&'a str, Method<'a>) {
    (label, Box::new(f))
}

/// Whether `--profile` was given (read by [`time_methods`]).
static PROFILE: AtomicBool = AtomicBool::new(false);
/// Whether `--samples` was given (read by [`time_methods`]).
static SAMPLES: AtomicBool = AtomicBool::new(false);

/// Median wall time (ms) of each method over `iters` rounds, after one warm-up round. The
/// methods run interleaved (none, NAG, ..., none, NAG, ...) so that drift of a shared machine
/// (other processes, thermal state) affects all of them alike and the ratios stay comparable.
/// The first method is the baseline. With `--profile`, one more recorded run of each follows.
fn time_methods(iters: usize, device: &Device, mut methods: Vec<(&str, Method)>) -> Result<Vec<f64>> {
    for (_, m) in methods.iter_mut() {
        m()?;
    }
    let mut times = vec![Vec::with_capacity(iters); methods.len()];
    for _ in 0..iters {
        for ((_, m), t) in methods.iter_mut().zip(times.iter_mut()) {
            let start = Instant::now();
            let out = m()?;
            device.synchronize()?;
            drop(out);
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    if SAMPLES.load(Ordering::Relaxed) {
        // The fastest run is the least disturbed where disturbances only add time (other
        // processes, a hypervisor's steal): its ratio is shown beside the runs.
        let fastest = |t: &[f64]| t.iter().copied().fold(f64::INFINITY, f64::min);
        let base = fastest(&times[0]);
        for ((label, _), t) in methods.iter().zip(&times) {
            let runs: Vec<String> = t.iter().map(|ms| format!("{ms:.0}")).collect();
            let min = fastest(t);
            println!(
                "  runs (ms) {label:<14} {}  | fastest {min:.0} ({:+.1}%)",
                runs.join(" "),
                (min / base - 1.0) * 100.0
            );
        }
    }
    if PROFILE.load(Ordering::Relaxed) {
        print_profiles(&mut methods)?;
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(|a, b| a.total_cmp(b));
            t[t.len() / 2]
        })
        .collect())
}

/// One recorded run per method: a table of milliseconds per op class (with the difference to
/// the first method, the baseline), the unattributed rest ("other": the models' elementwise
/// work) and megabytes copied.
fn print_profiles(methods: &mut [(&str, Method)]) -> Result<()> {
    let mut runs = Vec::with_capacity(methods.len());
    for (_, m) in methods.iter_mut() {
        profile::reset();
        profile::enable(true);
        let start = Instant::now();
        let out = m();
        let wall = start.elapsed();
        profile::enable(false);
        drop(out?);
        runs.push((profile::snapshot(), wall));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    print!("\n  {:<26}", "profile (ms, vs baseline)");
    for (label, _) in methods.iter() {
        print!(" {label:>18}");
    }
    println!();
    let row = |name: &str, values: Vec<f64>, unit: &str| {
        print!("  {name:<26}");
        for (i, v) in values.iter().enumerate() {
            if i == 0 {
                print!(" {:>18}", format!("{v:.1}{unit}"));
            } else {
                print!(" {:>18}", format!("{v:.1} ({:+.1}){unit}", v - values[0]));
            }
        }
        println!();
    };
    for op in Op::ALL {
        row(op.name(), runs.iter().map(|(p, _)| ms(p.of(op))).collect(), "");
    }
    row("other (elementwise)", runs.iter().map(|(p, w)| ms(w.saturating_sub(p.total()))).collect(), "");
    row("total", runs.iter().map(|(_, w)| ms(*w)).collect(), "");
    row("copied (MB)", runs.iter().map(|(p, _)| p.bytes_copied as f64 / 1e6).collect(), "");
    println!();
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.iters == 0 || a.sizes.is_empty() {
        bail!("--iters and --sizes must be non-empty");
    }
    if let Some(s) = a.sizes.iter().find(|&&s| s == 0 || s % 16 != 0) {
        bail!("--sizes: {s} is not a positive multiple of 16");
    }
    let names = || veto::FAMILIES.iter().map(|f| f.name).collect::<Vec<_>>().join(", ");
    let name = veto::families::named(&a.family)
        .ok_or_else(|| anyhow::anyhow!("--family: unknown family '{}' (families: {})", a.family, names()))?
        .name;
    let device = device(a.device)?;
    if a.profile && !device.is_cpu() {
        bail!("--profile times ops on the calling thread: it needs --device cpu");
    }
    PROFILE.store(a.profile, Ordering::Relaxed);
    SAMPLES.store(a.samples, Ordering::Relaxed);
    let dtype: DType = dtype(a.dtype);
    match name {
        "flux" => run_flux(&a, &device, dtype),
        "sd3" => run_sd3(&a, &device, dtype),
        "unet" => run_sdxl(&a, &device, dtype),
        "pixart" => run_pixart(&a, &device, dtype),
        "wan" => run_wan(&a, &device, dtype),
        "sana" => run_sana(&a, &device, dtype),
        other => bail!("--family: no benchmark for {other} yet"),
    }
}

/// SDXL UNet at the real widths with reduced transformer depth: none / NAG (attn2 of the cond
/// row over the negative text) / CFG (batched [uncond, cond], as diffusers).
fn run_sdxl(a: &BenchArgs, device: &Device, dtype: DType) -> Result<()> {
    if a.sdxl_depths.len() != 3 || a.sdxl_depths.contains(&0) {
        bail!("--sdxl-depths takes three positive numbers (the real SDXL: 1,2,10)");
    }
    let depths = &a.sdxl_depths;
    let model_cfg: UNetConfig = serde_json::from_value(serde_json::json!({
        "in_channels": 4, "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
        "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
        "transformer_layers_per_block": [depths[0], depths[1], depths[2]],
        "use_linear_projection": true, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32
    }))?;
    let varmap = candle_nn::VarMap::new();
    let model = UNet2DConditionModel::new(&model_cfg, candle_nn::VarBuilder::from_varmap(&varmap, dtype, device))?;
    let randn = |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?) };
    let context = randn(&[1, 77, 2048])?;
    let negative = randn(&[1, 77, 2048])?;
    let text_embeds = randn(&[1, 1280])?;
    let time_ids = Tensor::new(&[[1024f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device)?.to_dtype(dtype)?;
    // VSF's negative prompt is unpadded: `[BOS, tokens, EOS]`.
    let vsf_negative = randn(&[1, VSF_TOKENS, 2048])?;
    let both_context = Tensor::cat(&[&negative, &context], 0)?;
    let both_text = Tensor::cat(&[&text_embeds, &text_embeds], 0)?;
    let both_time = Tensor::cat(&[&time_ids, &time_ids], 0)?;
    let nag = AttentionGuidance::nag(NagParams { scale: 3.0, tau: 2.5, alpha: 0.5, norm: NagNorm::L1 });
    let vsf = AttentionGuidance::Vsf(VsfParams { scale: 1.2, bias: 0.2, ..Default::default() });
    let cfg = GuidancePlan { cfg_scale: Some(5.0), ..GuidancePlan::none() };
    println!(
        "SDXL UNet, random weights, channels 320/640/1280, transformer depths {:?} (real 1,2,10), {:?} on {:?}",
        depths, dtype, device
    );
    println!("one denoising step, median of {} runs\n", a.iters);
    let table = MethodTable { lead: &[("size", 6)], methods: &["NAG", "VSF", "CFG"] };
    table.print_header();
    for &size in &a.sizes {
        let x = randn(&[1, 4, size / 8, size / 8])?;
        let x2 = Tensor::cat(&[&x, &x], 0)?;
        let call = |sample: &Tensor, ctx: &Tensor, te: &Tensor, ti: &Tensor, guidance: Option<&NegativeContext>| {
            model.forward(&UNetInputs {
                sample,
                timestep: 750.0,
                encoder_hidden_states: ctx,
                text_embeds: Some(te),
                time_ids: Some(ti),
                guidance,
                perturbation: None,
            })
        };
        let t = time_methods(
            a.iters,
            device,
            vec![
                labelled("none", || Ok(call(&x, &context, &text_embeds, &time_ids, None)?)),
                labelled("NAG", || {
                    let g = NegativeContext { method: &nag, states: &negative, pooled: None, rows: 0..1 };
                    Ok(call(&x, &context, &text_embeds, &time_ids, Some(&g))?)
                }),
                labelled("VSF", || {
                    let g = NegativeContext { method: &vsf, states: &vsf_negative, pooled: None, rows: 0..1 };
                    Ok(call(&x, &context, &text_embeds, &time_ids, Some(&g))?)
                }),
                labelled("CFG", || {
                    let v = call(&x2, &both_context, &both_text, &both_time, None)?;
                    Ok(cfg.combine_outputs(&v.narrow(0, 1, 1)?, Some(&v.narrow(0, 0, 1)?), None)?)
                }),
            ],
        )?;
        let limit = arithmetic::unet(
            &[320, 640, 1280],
            &[0, depths[1], depths[2]],
            depths[2],
            2,
            size / 8,
            77,
            2048,
            VSF_TOKENS,
        );
        table.print_row(&[format!("{size}²")], &t, &limit);
    }
    println!("\n{LIMIT_NOTE}");
    println!("Paper (NAG Table 4, SDXL, A100, full depth): NAG +22%, CFG +34% per step.");
    Ok(())
}

/// A family's table: leading columns (label, width), the baseline's milliseconds, each
/// method's milliseconds and ratio to the baseline, then the arithmetic limits.
struct MethodTable<'a> {
    lead: &'a [(&'a str, usize)],
    methods: &'a [&'a str],
}

impl MethodTable<'_> {
    fn column(method: &str) -> String {
        format!("{method} (ms, ratio)")
    }

    fn header(&self) -> String {
        let mut line: String = self.lead.iter().map(|(label, width)| format!("{label:>width$} ")).collect();
        line += &format!("{:>12}", "none (ms)");
        for m in self.methods {
            let head = Self::column(m);
            line += &format!(" {head:>w$}", w = head.len().max(18));
        }
        line
    }

    /// `times`: the baseline first, then the methods in the header's order.
    fn row(&self, lead: &[String], times: &[f64], limit: &Limits) -> String {
        let mut line: String =
            self.lead.iter().zip(lead).map(|((_, width), cell)| format!("{cell:>width$} ")).collect();
        let base = times[0];
        line += &format!("{base:>12.0}");
        for (m, ms) in self.methods.iter().zip(&times[1..]) {
            let cell = format!("{ms:>10.0} ({:+.0}%)", (ms / base - 1.0) * 100.0);
            line += &format!(" {cell:>w$}", w = Self::column(m).len().max(18));
        }
        line + "   limit: " + &limit.describe()
    }

    fn print_header(&self) {
        println!("{}", self.header());
    }

    fn print_row(&self, lead: &[String], times: &[f64], limit: &Limits) {
        println!("{}", self.row(lead, times, limit));
    }
}

/// Tokens of an unpadded VSF negative prompt in the benches (a short phrase with its specials).
const VSF_TOKENS: usize = 16;

/// What the `limit` column means.
const LIMIT_NOTE: &str = "limit: the method's extra multiply-adds per step over the baseline's, counted from the \
shapes (linear layers, convolutions, attention products): what a perfect implementation would pay.";

/// PixArt-Sigma at the real width (1152 = 16 heads x 72) with reduced depth: none / NAG / VSF
/// (cross-attention of the cond row also over the negative caption) / CFG (batched
/// [uncond, cond], as diffusers). Captions of `--text-len` real tokens (the pipeline attends only
/// those; diffusers pads to 300 and masks).
fn run_pixart(a: &BenchArgs, device: &Device, dtype: DType) -> Result<()> {
    if a.pixart_blocks == 0 {
        bail!("--pixart-blocks must be at least 1 (the real model has 28)");
    }
    let cfg: PixArtConfig = serde_json::from_value(serde_json::json!({
        "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
        "num_layers": a.pixart_blocks, "cross_attention_dim": 1152, "sample_size": 128,
        "patch_size": 2, "interpolation_scale": 2, "use_additional_conditions": false,
        "caption_channels": 4096
    }))?;
    let varmap = candle_nn::VarMap::new();
    let model = PixArtTransformer2DModel::new(&cfg, candle_nn::VarBuilder::from_varmap(&varmap, dtype, device))?;
    let randn = |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?) };
    let len = a.text_len.clamp(1, 300);
    let caption = randn(&[1, len, 4096])?;
    let negative = randn(&[1, len.min(16), 4096])?;
    let both_caption = Tensor::cat(&[&caption, &caption], 0)?;
    let nag = AttentionGuidance::nag(NagParams { scale: 5.0, tau: 2.5, alpha: 0.375, norm: NagNorm::L1 });
    let vsf = AttentionGuidance::Vsf(VsfParams { scale: 1.2, bias: 0.2, ..Default::default() });
    let cfg_plan = GuidancePlan { cfg_scale: Some(4.5), ..GuidancePlan::none() };
    println!(
        "PixArt-Sigma transformer, random weights, width 1152 (16 heads x 72), {} blocks (real 28), {len} caption tokens, {:?} on {:?}",
        a.pixart_blocks, dtype, device
    );
    println!("one denoising step, median of {} runs\n", a.iters);
    let table = MethodTable { lead: &[("size", 6)], methods: &["NAG", "VSF", "CFG"] };
    table.print_header();
    for &size in &a.sizes {
        let x = randn(&[1, 4, size / 8, size / 8])?;
        let x2 = Tensor::cat(&[&x, &x], 0)?;
        let call = |latents: &Tensor, caption: &Tensor, lens: &[usize], guidance: Option<&NegativeContext>| {
            model.forward(&PixArtInputs {
                latents,
                timestep: 750.0,
                caption,
                caption_lens: lens,
                guidance,
                perturbation: None,
            })
        };
        let t = time_methods(
            a.iters,
            device,
            vec![
                labelled("none", || Ok(call(&x, &caption, &[len], None)?)),
                labelled("NAG", || {
                    let g = NegativeContext { method: &nag, states: &negative, pooled: None, rows: 0..1 };
                    Ok(call(&x, &caption, &[len], Some(&g))?)
                }),
                labelled("VSF", || {
                    let g = NegativeContext { method: &vsf, states: &negative, pooled: None, rows: 0..1 };
                    Ok(call(&x, &caption, &[len], Some(&g))?)
                }),
                labelled("CFG", || {
                    let v = call(&x2, &both_caption, &[len, len], None)?;
                    Ok(cfg_plan.combine_outputs(&v.narrow(0, 1, 1)?, Some(&v.narrow(0, 0, 1)?), None)?)
                }),
            ],
        )?;
        let side = size / 16;
        let limit = arithmetic::pixart(1152, a.pixart_blocks, side * side, len, 4096, len.min(16));
        table.print_row(&[format!("{size}²")], &t, &limit);
    }
    println!("\n{LIMIT_NOTE}");
    println!("Target (issue 9): NAG <= +8%, VSF <= +5% per step; the NAG paper (Table 4) has no PixArt timing.");
    Ok(())
}

/// Wan2.1 T2V at the real widths (1.3B: 1536, 14B: 5120) and reduced depth: none / NAG (the
/// official attn2 NAG against a 512-row negative) / VSF (512 rows: the positive padded to 512 - n,
/// the negative n unpadded) / CFG (batched `[uncond, cond]`).
fn run_wan(a: &BenchArgs, device: &Device, dtype: DType) -> Result<()> {
    if a.wan_blocks == 0 || a.frames == 0 || !(a.frames - 1).is_multiple_of(4) {
        bail!("--wan-blocks must be at least 1 and --frames 4k+1");
    }
    const TEXT: usize = 512;
    const VSF_NEGATIVE: usize = 16;
    let latent_frames = (a.frames - 1) / 4 + 1;
    println!(
        "Wan2.1 T2V transformer, random weights, {} block(s) per model (real 30 / 40), {} frames ({latent_frames} latent), {TEXT} text rows, {:?} on {:?}",
        a.wan_blocks, a.frames, dtype, device
    );
    println!(
        "one denoising step, median of {} runs
",
        a.iters
    );
    let table = MethodTable { lead: &[("width", 6), ("size", 6), ("tokens", 7)], methods: &["NAG", "VSF", "CFG"] };
    table.print_header();
    for (heads, ffn) in [(12usize, 8960usize), (40, 13824)] {
        let width = heads * 128;
        let cfg: WanConfig = serde_json::from_value(serde_json::json!({
            "num_attention_heads": heads, "attention_head_dim": 128, "ffn_dim": ffn, "num_layers": a.wan_blocks,
            "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256
        }))?;
        let varmap = candle_nn::VarMap::new();
        let model = WanTransformer3DModel::new(&cfg, candle_nn::VarBuilder::from_varmap(&varmap, dtype, device))?;
        let randn =
            |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?) };
        let context = randn(&[1, TEXT, 4096])?;
        let negative = randn(&[1, TEXT, 4096])?;
        let vsf_context = context.narrow(1, 0, TEXT - VSF_NEGATIVE)?;
        let vsf_negative = randn(&[1, VSF_NEGATIVE, 4096])?;
        let both_context = Tensor::cat(&[&negative, &context], 0)?;
        let nag = AttentionGuidance::nag(NagParams { scale: 5.0, tau: 2.5, alpha: 0.25, norm: NagNorm::L1 });
        let vsf = AttentionGuidance::Vsf(VsfParams { scale: 1.7, bias: 0.2, ..Default::default() });
        let cfg_plan = GuidancePlan { cfg_scale: Some(5.0), ..GuidancePlan::none() };
        for &size in &a.sizes {
            let x = randn(&[1, 16, latent_frames, size / 8, size / 8])?;
            let x2 = Tensor::cat(&[&x, &x], 0)?;
            let call = |latents: &Tensor, context: &Tensor, guidance: Option<&NegativeContext>| {
                model.forward(&WanInputs { latents, timestep: 750.0, context, image: None, guidance })
            };
            let t = time_methods(
                a.iters,
                device,
                vec![
                    labelled("none", || Ok(call(&x, &context, None)?)),
                    labelled("NAG", || {
                        let g = NegativeContext { method: &nag, states: &negative, pooled: None, rows: 0..1 };
                        Ok(call(&x, &context, Some(&g))?)
                    }),
                    labelled("VSF", || {
                        let g = NegativeContext { method: &vsf, states: &vsf_negative, pooled: None, rows: 0..1 };
                        Ok(call(&x, &vsf_context, Some(&g))?)
                    }),
                    labelled("CFG", || {
                        let v = call(&x2, &both_context, None)?;
                        Ok(cfg_plan.combine_outputs(&v.narrow(0, 1, 1)?, Some(&v.narrow(0, 0, 1)?), None)?)
                    }),
                ],
            )?;
            let tokens = latent_frames * (size / 16) * (size / 16);
            let limit = arithmetic::wan(width, ffn, a.wan_blocks, tokens, TEXT, 4096);
            table.print_row(&[width.to_string(), format!("{size}²"), tokens.to_string()], &t, &limit);
        }
    }
    println!("\n{LIMIT_NOTE}");
    println!("Target (issue 8): NAG <= +6%, VSF <= +3% per step; the NAG paper (Wan2.1-T2V-14B) reports +12%.");
    println!("At 480p / 81 frames (32760 tokens) the limit falls to about +1% (NAG) at full depth.");
    Ok(())
}

/// SANA 1.6B at the real width (2240 = 70 heads x 32, cross-attention 20 heads x 112, Mix-FFN
/// 5600) with reduced depth: none / NAG / VSF (cross-attention of the cond row also over the
/// negative caption) / CFG (batched [uncond, cond], as diffusers). Captions of `--text-len` real
/// tokens (the pipeline attends only those; diffusers pads to 300 and masks).
fn run_sana(a: &BenchArgs, device: &Device, dtype: DType) -> Result<()> {
    if a.sana_blocks == 0 {
        bail!("--sana-blocks must be at least 1 (SANA 1.6B has 20)");
    }
    // Sana_1600M_1024px_diffusers transformer/config.json, but for the depth.
    let cfg: SanaConfig = serde_json::from_value(serde_json::json!({
        "in_channels": 32, "out_channels": 32, "num_attention_heads": 70, "attention_head_dim": 32,
        "num_layers": a.sana_blocks, "num_cross_attention_heads": 20, "cross_attention_head_dim": 112,
        "cross_attention_dim": 2240, "caption_channels": 2304, "mlp_ratio": 2.5, "sample_size": 32,
        "patch_size": 1
    }))?;
    let varmap = candle_nn::VarMap::new();
    let model = SanaTransformer2DModel::new(&cfg, candle_nn::VarBuilder::from_varmap(&varmap, dtype, device))?;
    let randn = |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?) };
    let len = a.text_len.clamp(1, 300);
    let caption = randn(&[1, len, 2304])?;
    let negative = randn(&[1, len, 2304])?;
    let vsf_negative = randn(&[1, len.min(16), 2304])?;
    let both_caption = Tensor::cat(&[&caption, &caption], 0)?;
    let nag = AttentionGuidance::nag(NagParams { scale: 5.0, tau: 2.5, alpha: 0.375, norm: NagNorm::L1 });
    let vsf = AttentionGuidance::Vsf(VsfParams { scale: 1.2, bias: 0.2, ..Default::default() });
    let cfg_plan = GuidancePlan { cfg_scale: Some(4.5), ..GuidancePlan::none() };
    println!(
        "SANA transformer, random weights, width 2240 (70 heads x 32; cross 20 x 112), {} blocks (real 20), {len} caption tokens, {:?} on {:?}",
        a.sana_blocks, dtype, device
    );
    println!("one denoising step, median of {} runs\n", a.iters);
    let table = MethodTable { lead: &[("size", 6)], methods: &["NAG", "VSF", "CFG"] };
    table.print_header();
    for &size in &a.sizes {
        if size % 32 != 0 {
            bail!("--sizes: {size} is not a multiple of 32 (the DC-AE factor)");
        }
        let x = randn(&[1, 32, size / 32, size / 32])?;
        let x2 = Tensor::cat(&[&x, &x], 0)?;
        let call = |latents: &Tensor, caption: &Tensor, lens: &[usize], guidance: Option<&NegativeContext>| {
            model.forward(&SanaInputs {
                embedded_guidance: None,
                latents,
                timestep: 750.0,
                caption,
                caption_lens: lens,
                guidance,
                perturbation: None,
            })
        };
        let t = time_methods(
            a.iters,
            device,
            vec![
                labelled("none", || Ok(call(&x, &caption, &[len], None)?)),
                labelled("NAG", || {
                    let g = NegativeContext { method: &nag, states: &negative, pooled: None, rows: 0..1 };
                    Ok(call(&x, &caption, &[len], Some(&g))?)
                }),
                labelled("VSF", || {
                    let g = NegativeContext { method: &vsf, states: &vsf_negative, pooled: None, rows: 0..1 };
                    Ok(call(&x, &caption, &[len], Some(&g))?)
                }),
                labelled("CFG", || {
                    let v = call(&x2, &both_caption, &[len, len], None)?;
                    Ok(cfg_plan.combine_outputs(&v.narrow(0, 1, 1)?, Some(&v.narrow(0, 0, 1)?), None)?)
                }),
            ],
        )?;
        let side = size / 32;
        let limit = arithmetic::sana(2240, 32, cfg.ff_hidden(), a.sana_blocks, side * side, len, 2304, len.min(16));
        table.print_row(&[format!("{size}²")], &t, &limit);
    }
    println!("\n{LIMIT_NOTE}");
    println!(
        "Target (issue 9): NAG <= +8%, VSF <= +5% per step; NAG paper Table 4 (SANA 1.6B, A100): NAG +13% per step."
    );
    Ok(())
}

/// SD3.5-Large at reduced depth: none / NAG / VSF / CFG (CFG batched [uncond, cond] as diffusers).
fn run_sd3(a: &BenchArgs, device: &Device, dtype: DType) -> Result<()> {
    if a.sd3_blocks == 0 {
        bail!("--sd3-blocks must be at least 1");
    }
    let model_cfg: MmditConfig = serde_json::from_value(serde_json::json!({
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
        "num_layers": a.sd3_blocks, "attention_head_dim": 64, "num_attention_heads": 38,
        "joint_attention_dim": 4096, "caption_projection_dim": 2432, "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192, "qk_norm": "rms_norm"
    }))?;
    let varmap = candle_nn::VarMap::new();
    let model = MmditTransformer::new(&model_cfg, candle_nn::VarBuilder::from_varmap(&varmap, dtype, device))?;
    let ctx_len = 77 + a.text_len;
    let randn = |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?) };
    let context = randn(&[1, ctx_len, 4096])?;
    let neg_context = randn(&[1, ctx_len, 4096])?;
    // VSF's negative prompt is unpadded: a few CLIP tokens plus a few T5 tokens.
    let vsf_negative = randn(&[1, 16, 4096])?;
    let pooled = randn(&[1, 2048])?;
    let both_context = Tensor::cat(&[&neg_context, &context], 0)?;
    let both_pooled = Tensor::cat(&[&pooled, &pooled], 0)?;
    let nag = AttentionGuidance::nag(NagParams { scale: 5.0, tau: 2.5, alpha: 0.125, norm: NagNorm::L1 });
    let vsf = AttentionGuidance::Vsf(VsfParams::default());
    let cfg = GuidancePlan { cfg_scale: Some(4.5), ..GuidancePlan::none() };
    println!(
        "SD3.5-Large MMDiT, random weights, width 2432 (38 heads x 64), {} blocks, {} context tokens, {:?} on {:?}",
        a.sd3_blocks, ctx_len, dtype, device
    );
    println!("one denoising step, median of {} runs\n", a.iters);
    let table = MethodTable { lead: &[("size", 6)], methods: &["NAG", "VSF", "CFG"] };
    table.print_header();
    for &size in &a.sizes {
        let x = randn(&[1, 16, size / 8, size / 8])?;
        let x2 = Tensor::cat(&[&x, &x], 0)?;
        let t = Tensor::new(&[750f32], device)?.to_dtype(dtype)?;
        let t2 = Tensor::new(&[750f32, 750.0], device)?.to_dtype(dtype)?;
        let call =
            |latents: &Tensor, t: &Tensor, context: &Tensor, pooled: &Tensor, guidance: Option<&NegativeContext>| {
                model.forward(&MmditInputs { latents, timestep: t, context, pooled, guidance })
            };
        let times = time_methods(
            a.iters,
            device,
            vec![
                labelled("none", || Ok(call(&x, &t, &context, &pooled, None)?)),
                labelled("NAG", || {
                    let g = NegativeContext { method: &nag, states: &neg_context, pooled: Some(&pooled), rows: 0..1 };
                    Ok(call(&x, &t, &context, &pooled, Some(&g))?)
                }),
                labelled("VSF", || {
                    let g = NegativeContext { method: &vsf, states: &vsf_negative, pooled: None, rows: 0..1 };
                    Ok(call(&x, &t, &context, &pooled, Some(&g))?)
                }),
                labelled("CFG", || {
                    let v = call(&x2, &t2, &both_context, &both_pooled, None)?;
                    Ok(cfg.combine_outputs(&v.narrow(0, 1, 1)?, Some(&v.narrow(0, 0, 1)?), None)?)
                }),
            ],
        )?;
        let limit = arithmetic::mmdit(2432, a.sd3_blocks, (size / 16) * (size / 16), ctx_len, 16);
        table.print_row(&[format!("{size}²")], &times, &limit);
    }
    println!("\n{LIMIT_NOTE}");
    println!("Papers: NAG Table 4 (SD3.5-Large, A100, full depth) NAG +43%, CFG +95% per step;");
    println!("VSF Table 2 (SD3.5-Large-Turbo, 8 steps) baseline 2.14 s, NAG 2.98 s (+39%), VSF 3.00 s (+40%).");
    Ok(())
}

fn run_flux(a: &BenchArgs, device: &Device, dtype: DType) -> Result<()> {
    let device = device.clone();
    let model_cfg = config(a);
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &device);
    let model = FluxTransformer::new(&model_cfg, vb)?;
    let text = |seed: f64| -> Result<TextConditioning> {
        Ok(TextConditioning {
            hidden: (Tensor::randn(0f32, 1.0, (1, a.text_len, 4096), &device)? + seed)?.to_dtype(dtype)?,
            pooled: Tensor::randn(0f32, 1.0, (1, 768), &device)?.to_dtype(dtype)?,
        })
    };
    let (pos, neg) = (text(0.0)?, text(0.1)?);
    let nag = AttentionGuidance::nag(NagParams { scale: 5.0, tau: 2.5, alpha: 0.25, norm: NagNorm::L1 });
    let nag_context = NegativeContext { method: &nag, states: &neg.hidden, pooled: Some(&neg.pooled), rows: 0..1 };
    let cfg = GuidancePlan { cfg_scale: Some(4.0), ..GuidancePlan::none() };
    println!(
        "Flux transformer, random weights, width 3072 (24 heads x 128), {} double + {} single blocks, {} text tokens, {:?} on {:?}",
        a.double_blocks, a.single_blocks, a.text_len, dtype, device
    );
    println!("one denoising step, median of {} runs\n", a.iters);
    let table = MethodTable { lead: &[("size", 6)], methods: &["NAG", "CFG", "shared-image"] };
    table.print_header();
    for &size in &a.sizes {
        let (lh, lw) = (size / 8, size / 8);
        let x = latents::pack(&Tensor::randn(0f32, 1.0, (1, 16, lh, lw), &device)?.to_dtype(dtype)?)?;
        let img_ids = latents::image_ids(lh, lw, &device)?;
        let txt_ids = latents::text_ids(a.text_len, &device)?;
        let t = Tensor::new(&[0.75f32], &device)?.to_dtype(dtype)?;
        let (x2, t2) = (Tensor::cat(&[&x, &x], 0)?, Tensor::cat(&[&t, &t], 0)?);
        let both = pos.batch_with(&neg)?;
        let call = |p: &TextConditioning, negative: Option<&NegativeContext>, variant: NagVariant| {
            model.forward(&FluxInputs {
                latents: &x,
                img_ids: &img_ids,
                txt_ids: &txt_ids,
                timestep: &t,
                guidance: None,
                positive: p,
                negative,
                nag_variant: variant,
            })
        };
        let times = time_methods(
            a.iters,
            &device,
            vec![
                labelled("none", || Ok(call(&pos, None, NagVariant::Official)?)),
                labelled("NAG", || Ok(call(&pos, Some(&nag_context), NagVariant::Official)?)),
                // As the pipeline runs plain CFG: one batch [positive, negative].
                labelled("CFG", || {
                    let v = model.forward(&FluxInputs {
                        latents: &x2,
                        img_ids: &img_ids,
                        txt_ids: &txt_ids,
                        timestep: &t2,
                        guidance: None,
                        positive: &both,
                        negative: None,
                        nag_variant: NagVariant::Official,
                    })?;
                    Ok(cfg.combine_outputs(&v.narrow(0, 0, 1)?, Some(&v.narrow(0, 1, 1)?), None)?)
                }),
                labelled("NAG shared-image", || Ok(call(&pos, Some(&nag_context), NagVariant::SharedImage)?)),
            ],
        )?;
        let limit = arithmetic::flux(3072, a.double_blocks, a.single_blocks, (size / 16) * (size / 16), a.text_len);
        table.print_row(&[format!("{size}²")], &times, &limit);
    }
    println!("\n{LIMIT_NOTE}");
    println!("Paper (NAG Table 4, Flux, A100, full depth): NAG +87%, CFG +100% per step.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_line_up_under_their_header_with_ratios_and_limits() {
        let table = MethodTable { lead: &[("size", 6)], methods: &["NAG", "shared-image"] };
        let limit = Limits { nag: 0.74, vsf: None, cfg: 1.0, shared_image: Some(0.21), base_macs: 1.0 };
        let header = table.header();
        let row = table.row(&["512²".to_string()], &[2000.0, 3500.0, 2500.0], &limit);
        assert_eq!(header, "  size    none (ms)    NAG (ms, ratio) shared-image (ms, ratio)");
        assert!(row.starts_with("  512²         2000 "), "{row}");
        assert!(row.contains(" 3500 (+75%) ") && row.contains(" 2500 (+25%) "), "{row}");
        let end_of = |line: &str, text: &str| line[..line.find(text).unwrap()].chars().count() + text.chars().count();
        assert_eq!(end_of(&row, "(+75%)"), end_of(&header, "NAG (ms, ratio)"));
        assert_eq!(end_of(&row, "(+25%)"), header.chars().count());
    }
}
