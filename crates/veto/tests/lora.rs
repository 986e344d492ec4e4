//! LoRA parity: each tiny LoRA file (tests/fixtures/lora, written by
//! tools/reference/lora_reference.py in the diffusers/PEFT, kohya, kohya-LDM, ComfyUI/BFL and
//! XLabs layouts) merged at load time must give the final latents of diffusers'
//! `load_lora_weights` + `fuse_lora` pipeline run (f32, 1e-4 relative), at scale 1 and 0.5, and
//! stacked; plus the errors of LoRAs that do not fit the model.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, Fixture};
use veto::loading::lora::{check, LoraSpec};
use veto::loading::model_source::ModelSource;
use veto::{GenerateRequest, Method, Pipeline};

fn lora(name: &str) -> PathBuf {
    fixtures("lora").join(format!("{name}.safetensors"))
}

fn model_dir(family: &str, model: &str) -> PathBuf {
    match family {
        "flux" => fixtures("flux").join(model),
        "sd3" => fixtures("sd3").join(model),
        _ => fixtures("unet").join(model),
    }
}

fn source(family: &str, model: &str, loras: &[(&str, f64)]) -> ModelSource {
    let specs = loras.iter().map(|(n, s)| LoraSpec::new(lora(n), *s)).collect();
    ModelSource::local(model_dir(family, model)).unwrap().with_loras(specs)
}

/// Runs the expected fixture's request with `loras` and compares the final latents.
fn parity(expected: &str, loras: &[(&str, f64)]) {
    let fx = Fixture::load("lora", &format!("expected_{expected}.safetensors"));
    let family = fx.m("family");
    let source = source(family, fx.m("model"), loras);
    let pipe = Pipeline::load(&source, &Device::Cpu, DType::F32).unwrap();
    let mut req = GenerateRequest::new(fx.m("prompt"))
        .method(Method::NONE)
        .steps(fx.m("steps").parse().unwrap())
        .size(fx.m("height").parse().unwrap(), fx.m("width").parse().unwrap())
        .guidance_scale(fx.f("guidance_scale"))
        .init_latents(fx.t("init_latents").clone());
    if family != "unet" {
        req = req.max_sequence_length(fx.m("max_sequence_length").parse().unwrap());
    }
    let (denoised, _, _) = pipe.generate_latents(&req, &mut |_| {}).unwrap();
    let what = format!("{expected} with {loras:?}");
    eprintln!("{what}: relative difference {:e}", common::rel_diff(&denoised.latents, fx.t("final_latents")));
    assert_close(&what, &denoised.latents, fx.t("final_latents"), 1e-4);
}

#[test]
fn flux_peft() {
    parity("flux_scale1", &[("flux_peft", 1.0)]);
}
#[test]
fn flux_bfl() {
    parity("flux_scale1", &[("flux_bfl", 1.0)]);
}
#[test]
fn flux_kohya() {
    parity("flux_scale1", &[("flux_kohya", 1.0)]);
}
#[test]
fn flux_kohya_half_scale() {
    parity("flux_scale05", &[("flux_kohya", 0.5)]);
}
#[test]
fn flux_xlabs() {
    parity("flux_xlabs", &[("flux_xlabs", 1.0)]);
}
#[test]
fn flux_stacked_bfl_and_xlabs() {
    parity("flux_stack", &[("flux_bfl", 0.7), ("flux_xlabs", 1.3)]);
}
#[test]
fn sdxl_peft() {
    parity("sdxl_scale1", &[("sdxl_peft", 1.0)]);
}
#[test]
fn sdxl_kohya() {
    parity("sdxl_scale1", &[("sdxl_kohya", 1.0)]);
}
#[test]
fn sdxl_kohya_ldm_names() {
    parity("sdxl_scale1", &[("sdxl_kohya_ldm", 1.0)]);
}
#[test]
fn sdxl_kohya_half_scale() {
    parity("sdxl_scale05", &[("sdxl_kohya", 0.5)]);
}
#[test]
fn sdxl_stacked_halves_sum_to_one() {
    parity("sdxl_scale1", &[("sdxl_kohya_ldm", 0.5), ("sdxl_peft", 0.5)]);
}
#[test]
fn sd15_peft() {
    parity("sd15_scale1", &[("sd15_peft", 1.0)]);
}
#[test]
fn sd15_kohya() {
    parity("sd15_scale1", &[("sd15_kohya", 1.0)]);
}
#[test]
fn sd15_kohya_half_scale() {
    parity("sd15_scale05", &[("sd15_kohya", 0.5)]);
}
#[test]
fn sd3_peft() {
    parity("sd3_scale1", &[("sd3_peft", 1.0)]);
}
#[test]
fn sd3_peft_alpha_in_metadata() {
    parity("sd3_scale1", &[("sd3_peft_alpha", 1.0)]);
}

#[test]
fn summary_names_layout_tensors_and_components() {
    let s = check(&source("unet", "sdxl", &[("sdxl_kohya", 0.5)])).unwrap();
    let text = s[0].to_string();
    assert!(
        text.starts_with("lora sdxl_kohya.safetensors (kohya, ")
            && text.ends_with(", scale 0.5) → unet, text_encoder, text_encoder_2"),
        "{text}"
    );
    let s = check(&source("flux", "schnell", &[("flux_bfl", 1.0)])).unwrap();
    assert!(s[0].to_string().ends_with("→ transformer, text_encoder"), "{}", s[0]);
}

fn err(family: &str, model: &str, loras: &[(&str, f64)]) -> String {
    check(&source(family, model, loras)).unwrap_err().to_string()
}

#[test]
fn refuses_a_lora_for_another_family() {
    let e = err("flux", "schnell", &[("sdxl_kohya", 1.0)]);
    assert!(e.contains("sdxl_kohya.safetensors") && e.contains("another model family"), "{e}");
    assert!(e.contains("lora_unet_"), "{e}");
    let e = err("unet", "sdxl", &[("flux_peft", 1.0)]);
    assert!(e.contains("transformer.") && e.contains("another model family"), "{e}");
    // SDXL's second text encoder does not exist in SD1.5.
    let e = err("unet", "sd15", &[("sdxl_kohya", 1.0)]);
    assert!(e.contains("lora_te2_") || e.contains("lora_unet_"), "{e}");
    // Loading refuses it too, before any weight is read.
    let src = source("flux", "schnell", &[("sdxl_peft", 1.0)]);
    assert!(Pipeline::load(&src, &Device::Cpu, DType::F32).is_err());
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("veto-lora-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn write(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn err_with(file: &Path) -> String {
    let src = ModelSource::local(model_dir("flux", "schnell")).unwrap().with_loras(vec![LoraSpec::new(file, 1.0)]);
    check(&src).unwrap_err().to_string()
}

#[test]
fn names_unmatched_keys() {
    let dev = Device::Cpu;
    let a = Tensor::ones((2, 32), DType::F32, &dev).unwrap();
    let b = Tensor::ones((32, 2), DType::F32, &dev).unwrap();
    let f = tmp("partial.safetensors");
    write(
        &f,
        &[
            ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", a.clone()),
            ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", b.clone()),
            ("transformer.transformer_blocks.7.attn.to_q.lora_A.weight", a),
            ("transformer.transformer_blocks.7.attn.to_q.lora_B.weight", b),
        ],
    );
    let e = err_with(&f);
    assert!(e.contains("1 of its 2 modules") && e.contains("transformer.transformer_blocks.7.attn.to_q"), "{e}");
    assert!(!e.contains("another model family"), "{e}");
}

#[test]
fn checks_shapes_before_merging() {
    let dev = Device::Cpu;
    let f = tmp("shapes.safetensors");
    write(
        &f,
        &[
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                Tensor::ones((2, 7), DType::F32, &dev).unwrap(),
            ),
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
                Tensor::ones((32, 2), DType::F32, &dev).unwrap(),
            ),
        ],
    );
    let e = err_with(&f);
    assert!(e.contains("does not fit transformer weight transformer_blocks.0.attn.to_q.weight [32, 32]"), "{e}");
    let f = tmp("ranks.safetensors");
    write(
        &f,
        &[
            (
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                Tensor::ones((4, 32), DType::F32, &dev).unwrap(),
            ),
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", Tensor::ones((96, 2), DType::F32, &dev).unwrap()),
        ],
    );
    let e = err_with(&f);
    assert!(e.contains("do not multiply"), "{e}");
    // A fused q/k/v LoRA of the wrong width.
    let f = tmp("width.safetensors");
    write(
        &f,
        &[
            (
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                Tensor::ones((4, 32), DType::F32, &dev).unwrap(),
            ),
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", Tensor::ones((90, 4), DType::F32, &dev).unwrap()),
        ],
    );
    let e = err_with(&f);
    assert!(e.contains("does not fit"), "{e}");
}

#[test]
fn refuses_files_that_are_not_loras() {
    let e = err_with(&fixtures("flux").join("schnell/vae/diffusion_pytorch_model.safetensors"));
    assert!(e.contains("not a LoRA"), "{e}");
    let e = err_with(&tmp("missing.safetensors"));
    assert!(e.contains("LoRA file not found"), "{e}");
    let dev = Device::Cpu;
    let f = tmp("dora.safetensors");
    write(
        &f,
        &[("lora_unet_double_blocks_0_img_attn_qkv.dora_scale", Tensor::ones((1, 32), DType::F32, &dev).unwrap())],
    );
    let e = err_with(&f);
    assert!(e.contains("dora_scale"), "{e}");
}

#[test]
fn bad_scale_names_the_flag() {
    let e = LoraSpec::parse("x.safetensors:strong").unwrap_err().to_string();
    assert!(e.starts_with("lora: ") && e.contains("strong"), "{e}");
}
