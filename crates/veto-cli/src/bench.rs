//! `veto bench`: per-step cost of guidance on a random-weight Flux at the real width
//! (3072 = 24 heads x 128) and reduced depth. One run measures the no-guidance baseline and
//! each method under identical conditions, so the ratios are comparable.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use std::time::Instant;
use veto::guidance::{cfg::cfg, AttentionGuidance, NagNorm, NagParams};
use veto::models::flux::{latents, FluxConfig, FluxInputs, FluxTransformer, TextConditioning};

use crate::generate::{device, dtype, DeviceArg, DtypeArg};

#[derive(Args)]
pub struct BenchArgs {
    /// Image sizes (square, pixels) to time.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    pub sizes: Vec<usize>,
    /// Double (MMDiT) blocks; the real model has 19.
    #[arg(long, default_value_t = 1)]
    pub double_blocks: usize,
    /// Single blocks; the real model has 38 (keep the real 1:2 ratio for representative ratios).
    #[arg(long, default_value_t = 2)]
    pub single_blocks: usize,
    /// T5 tokens (schnell's default 256).
    #[arg(long, default_value_t = 256)]
    pub text_len: usize,
    /// Timed repetitions per method (after one warm-up).
    #[arg(long, default_value_t = 2)]
    pub iters: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
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

/// Median wall time of `iters` runs of `f`, after one warm-up run, in milliseconds.
fn time_ms(iters: usize, device: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        let out = f()?;
        device.synchronize()?;
        drop(out);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.iters == 0 || a.sizes.is_empty() {
        bail!("--iters and --sizes must be non-empty");
    }
    if let Some(s) = a.sizes.iter().find(|&&s| s == 0 || s % 16 != 0) {
        bail!("--sizes: {s} is not a positive multiple of 16");
    }
    let device = device(a.device)?;
    let dtype: DType = dtype(a.dtype);
    let model_cfg = config(&a);
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
    let nag = AttentionGuidance::Nag(NagParams { scale: 5.0, tau: 2.5, alpha: 0.25, norm: NagNorm::L1 });
    println!(
        "Flux transformer, random weights, width 3072 (24 heads x 128), {} double + {} single blocks, {} text tokens, {:?} on {:?}",
        a.double_blocks, a.single_blocks, a.text_len, dtype, device
    );
    println!("one denoising step, median of {} runs\n", a.iters);
    println!("{:>6} {:>12} {:>18} {:>18}", "size", "none (ms)", "NAG (ms, ratio)", "CFG (ms, ratio)");
    for &size in &a.sizes {
        let (lh, lw) = (size / 8, size / 8);
        let x = latents::pack(&Tensor::randn(0f32, 1.0, (1, 16, lh, lw), &device)?.to_dtype(dtype)?)?;
        let img_ids = latents::image_ids(lh, lw, &device)?;
        let txt_ids = latents::text_ids(a.text_len, &device)?;
        let t = Tensor::new(&[0.75f32], &device)?.to_dtype(dtype)?;
        let call = |p: &TextConditioning, n: Option<&TextConditioning>, g: Option<&AttentionGuidance>| {
            model.forward(&FluxInputs {
                latents: &x,
                img_ids: &img_ids,
                txt_ids: &txt_ids,
                timestep: &t,
                guidance: None,
                positive: p,
                negative: n,
                guide: g,
            })
        };
        let none = time_ms(a.iters, &device, || Ok(call(&pos, None, None)?))?;
        let nag_ms = time_ms(a.iters, &device, || Ok(call(&pos, Some(&neg), Some(&nag))?))?;
        let cfg_ms = time_ms(a.iters, &device, || {
            let vp = call(&pos, None, None)?;
            let vn = call(&neg, None, None)?;
            Ok(cfg(&vp, &vn, 4.0)?)
        })?;
        println!(
            "{:>5}² {:>12.0} {:>10.0} ({:+.0}%) {:>10.0} ({:+.0}%)",
            size,
            none,
            nag_ms,
            (nag_ms / none - 1.0) * 100.0,
            cfg_ms,
            (cfg_ms / none - 1.0) * 100.0
        );
    }
    println!("\nPaper (NAG Table 4, Flux, A100, full depth): NAG +87%, CFG +100% per step.");
    Ok(())
}
