//! Memory and per-step time of a bench-size Flux transformer (FLUX.1 width 3072, 1 double and 2
//! single blocks, 256x256 image, 256 text tokens) with dense f32 / bf16 weights and with its
//! matrices quantized to Q8_0, Q5_K and Q4_K, on the CPU. Random weights, quantized by candle
//! (the same blocks a GGUF file holds).
//!
//!     cargo run --release -p veto --example gguf_bench

use std::collections::HashMap;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use veto::loading::gguf::RawTensor;
use veto::loading::quantized::quantized_var_builder;
use veto::models::flux::{FluxConfig, FluxInputs, FluxTransformer, TextConditioning};

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let config: FluxConfig = serde_json::from_value(serde_json::json!({
        "num_layers": 1, "num_single_layers": 2, "guidance_embeds": false
    }))?;
    // Random dense weights under diffusers names, via a VarMap.
    let varmap = candle_nn::VarMap::new();
    FluxTransformer::new(&config, candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let dense: HashMap<String, Tensor> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();

    let (tokens, text) = (256usize, 256usize);
    let latents = Tensor::randn(0f32, 1.0, (1, tokens, 64), &dev)?;
    let hidden = Tensor::randn(0f32, 1.0, (1, text, 4096), &dev)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, 768), &dev)?;
    let img_ids = Tensor::zeros((tokens, 3), DType::F32, &dev)?;
    let txt_ids = Tensor::zeros((text, 3), DType::F32, &dev)?;
    let timestep = Tensor::new(&[0.5f32], &dev)?;

    println!("{:<6} {:>12} {:>10}", "type", "weights MB", "ms/step");
    for (name, qtype, dtype) in [
        ("f32", None, DType::F32),
        ("bf16", None, DType::BF16),
        ("Q8_0", Some(GgmlDType::Q8_0), DType::F32),
        ("Q5_K", Some(GgmlDType::Q5K), DType::F32),
        ("Q4_K", Some(GgmlDType::Q4K), DType::F32),
    ] {
        let mut raw = HashMap::new();
        for (k, t) in &dense {
            let q = match qtype {
                Some(q) if t.rank() == 2 && t.dim(1)? % q.block_size() == 0 => QTensor::quantize(t, q)?,
                _ => QTensor::quantize(&t.to_dtype(dtype)?.to_dtype(DType::F32)?, GgmlDType::F32)?,
            };
            let r = RawTensor::new(q.dtype(), t.dims().to_vec(), &q.data()?).map_err(anyhow::Error::msg)?;
            raw.insert(k.clone(), r);
        }
        let (vb, qw) = quantized_var_builder(raw, "bench".into(), dtype, &dev);
        let model = FluxTransformer::new_quantized(&config, vb, &qw)?;
        let bytes = qw.loaded_bytes();
        let positive = TextConditioning { hidden: hidden.to_dtype(dtype)?, pooled: pooled.to_dtype(dtype)? };
        let inputs = FluxInputs {
            latents: &latents.to_dtype(dtype)?,
            img_ids: &img_ids,
            txt_ids: &txt_ids,
            timestep: &timestep,
            guidance: None,
            positive: &positive,
            negative: None,
            nag_variant: Default::default(),
        };
        model.forward(&inputs)?; // warm-up (and x86 repacking of the quantized weights)
        let start = Instant::now();
        let iters = 2;
        for _ in 0..iters {
            model.forward(&inputs)?;
        }
        let ms = start.elapsed().as_secs_f64() * 1000.0 / iters as f64;
        println!("{name:<6} {:>12.1} {ms:>10.0}", (bytes.quantized + bytes.dense) as f64 / 1e6);
    }
    Ok(())
}
