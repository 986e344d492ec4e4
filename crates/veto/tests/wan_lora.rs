//! Wan LoRA parity: each tiny LoRA file of tests/fixtures/wan_lora (written by
//! tools/reference/wan_lora_reference.py in the diffusers/PEFT, ComfyUI, CausVid and kohya/musubi
//! layouts, T2V and I2V) merged at load time must give every transformer tensor diffusers'
//! `load_lora_weights` + `fuse_lora` gives (f32, 1e-5 relative), read through the LoRA backend
//! without building the model; plus full deltas diffusers skips, and the errors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, Fixture};
use veto::loading::components::component_weights;
use veto::loading::lora::{check, LoraSpec};
use veto::loading::model_source::ModelSource;

fn lora(name: &str) -> PathBuf {
    fixtures("wan_lora").join(format!("{name}.safetensors"))
}

fn source(model: &str, loras: Vec<LoraSpec>) -> ModelSource {
    ModelSource::local(fixtures("wan_lora").join(model)).unwrap().with_loras(loras)
}

/// The transformer's tensors as the model would read them, LoRAs merged.
fn merged(source: &ModelSource, names: impl IntoIterator<Item = String>) -> HashMap<String, Tensor> {
    let weights = component_weights(source, "transformer", "diffusion_pytorch_model").unwrap();
    let vb = weights.var_builder(DType::F32, &Device::Cpu).unwrap();
    names.into_iter().map(|n| (n.clone(), vb.get_unchecked(&n).unwrap())).collect()
}

fn parity(case: &str) {
    let fx = Fixture::load("wan_lora", &format!("expected_{case}.safetensors"));
    let loras: Vec<(String, f64)> = serde_json::from_str(fx.m("loras")).unwrap();
    let specs: Vec<LoraSpec> = loras.iter().map(|(n, s)| LoraSpec::new(lora(n), *s)).collect();
    let src = source(fx.m("model"), specs);
    check(&src).unwrap();
    let got = merged(&src, fx.tensors.keys().cloned());
    for (name, want) in &fx.tensors {
        assert_close(&format!("{case}: {name}"), &got[name], want, 1e-5);
    }
}

#[test]
fn peft_names() {
    parity("t2v_peft");
}
#[test]
fn comfy_original_names_half_scale() {
    parity("t2v_comfy_half");
}
#[test]
fn kohya_musubi_with_alpha() {
    parity("t2v_kohya");
}
#[test]
fn causvid_layout_with_bias_deltas() {
    parity("t2v_causvid");
}
#[test]
fn causvid_stacked_with_peft() {
    parity("t2v_stack");
}
#[test]
fn i2v_image_projections_and_alpha() {
    parity("i2v_comfy");
}

#[test]
fn summary_names_the_layouts() {
    let s = check(&source("t2v", vec![LoraSpec::new(lora("wan_causvid"), 0.5)])).unwrap();
    let text = s[0].to_string();
    assert!(
        text.starts_with("lora wan_causvid.safetensors (ComfyUI/BFL, ") && text.ends_with("→ transformer"),
        "{text}"
    );
    let s = check(&source("t2v", vec![LoraSpec::new(lora("wan_kohya"), 1.0)])).unwrap();
    assert!(s[0].to_string().contains("(kohya, "), "{}", s[0]);
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("veto-wan-lora-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn write(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn base(names: &[&str]) -> HashMap<String, Tensor> {
    merged(&source("t2v", Vec::new()), names.iter().map(|s| s.to_string()))
}

/// `.diff` on norms and modulation tables (diffusers skips them; ComfyUI adds them, and so do we).
#[test]
fn full_weight_diffs_are_added_at_scale() {
    let dev = Device::Cpu;
    let ramp = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::arange(0f32, n as f32, &dev).unwrap().affine(0.01, -0.05).unwrap().reshape(shape).unwrap()
    };
    let names = [
        "blocks.1.norm2.weight",
        "blocks.1.norm2.bias",
        "blocks.0.attn1.norm_q.weight",
        "blocks.0.scale_shift_table",
        "scale_shift_table",
        "proj_out.bias",
    ];
    let before = base(&names);
    let shape = |n: &str| before[n].dims().to_vec();
    let deltas = [
        ("diffusion_model.blocks.1.norm3.diff", "blocks.1.norm2.weight"),
        ("diffusion_model.blocks.1.norm3.diff_b", "blocks.1.norm2.bias"),
        ("diffusion_model.blocks.0.self_attn.norm_q.diff", "blocks.0.attn1.norm_q.weight"),
        ("diffusion_model.blocks.0.modulation.diff", "blocks.0.scale_shift_table"),
        ("diffusion_model.head.modulation.diff", "scale_shift_table"),
        ("diffusion_model.head.head.diff_b", "proj_out.bias"),
    ];
    let tensors: Vec<(&str, Tensor)> = deltas.iter().map(|(k, target)| (*k, ramp(&shape(target)))).collect();
    let f = tmp("diffs.safetensors");
    write(&f, &tensors);
    let src = source("t2v", vec![LoraSpec::new(&f, 0.5)]);
    check(&src).unwrap();
    let after = merged(&src, names.iter().map(|s| s.to_string()));
    for ((_, target), (_, d)) in deltas.iter().zip(&tensors) {
        let want = (&before[*target] + (d * 0.5).unwrap()).unwrap();
        assert_close(target, &after[*target], &want, 1e-6);
    }
}

fn err(model: &str, loras: Vec<LoraSpec>) -> String {
    check(&source(model, loras)).unwrap_err().to_string()
}

#[test]
fn refuses_loras_of_other_families() {
    // A Flux LoRA on Wan names the family it looks like.
    let flux = fixtures("lora").join("flux_bfl.safetensors");
    let e = err("t2v", vec![LoraSpec::new(flux, 1.0)]);
    assert!(e.contains("another model family (its names look like Flux)"), "{e}");
    let sdxl = fixtures("lora").join("sdxl_kohya.safetensors");
    let e = err("t2v", vec![LoraSpec::new(sdxl, 1.0)]);
    assert!(e.contains("another model family"), "{e}");
    // A Wan LoRA on Flux says it looks like Wan.
    let src = ModelSource::local(fixtures("flux").join("schnell"))
        .unwrap()
        .with_loras(vec![LoraSpec::new(lora("wan_comfy"), 1.0)]);
    let e = check(&src).unwrap_err().to_string();
    assert!(e.contains("its names look like Wan2.1") && e.contains("diffusion_model.blocks."), "{e}");
}

#[test]
fn names_the_keys_that_match_nothing() {
    // An I2V LoRA on a T2V model: the image projections have nowhere to go.
    let e = err("t2v", vec![LoraSpec::new(lora("wan_i2v_comfy"), 1.0)]);
    assert!(e.contains("match nothing in transformer of this WanPipeline model"), "{e}");
    assert!(e.contains("diffusion_model.blocks.0.cross_attn.k_img"), "{e}");
    assert!(!e.contains("another model family"), "{e}");
    // Keys of a Wan-like layout that name no module.
    let dev = Device::Cpu;
    let f = tmp("nowhere.safetensors");
    write(
        &f,
        &[
            ("diffusion_model.blocks.7.self_attn.q.lora_A.weight", Tensor::ones((2, 16), DType::F32, &dev).unwrap()),
            ("diffusion_model.blocks.7.self_attn.q.lora_B.weight", Tensor::ones((16, 2), DType::F32, &dev).unwrap()),
        ],
    );
    let e = err("t2v", vec![LoraSpec::new(&f, 1.0)]);
    assert!(e.contains("(first: diffusion_model.blocks.7.self_attn.q)"), "{e}");
}

#[test]
fn checks_full_delta_shapes() {
    let dev = Device::Cpu;
    let f = tmp("badshape.safetensors");
    write(&f, &[("diffusion_model.head.head.diff_b", Tensor::ones(5, DType::F32, &dev).unwrap())]);
    let e = err("t2v", vec![LoraSpec::new(&f, 1.0)]);
    assert!(e.contains("does not fit transformer proj_out.bias"), "{e}");
    let f = tmp("nobias.safetensors");
    write(&f, &[("diffusion_model.head.modulation.diff_b", Tensor::ones(5, DType::F32, &dev).unwrap())]);
    let e = err("t2v", vec![LoraSpec::new(&f, 1.0)]);
    assert!(e.contains("has no bias"), "{e}");
}
