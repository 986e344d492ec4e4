//! Parity of the UNet (`UNet2DConditionModel`) with the PyTorch reference
//! (tools/reference/unet_reference.py): one call per case on the tiny SD1.5 and SDXL UNets,
//! every block's output and the final output, f32, 1e-4 relative. Cases: plain, NAG, NASA,
//! VSF (cross-attention guidance on the only row) and the PAG perturbed pass.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, guide_of, Fixture};
use veto::guidance::NegativeContext;
use veto::loading::safetensors_files::{var_builder, weight_files};
use veto::models::unet::{Perturbation, UNet2DConditionModel, UNetConfig, UNetInputs};

fn load_unet(model: &str) -> UNet2DConditionModel {
    let dir = fixtures("unet").join(model).join("unet");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let files = weight_files(&dir, "diffusion_pytorch_model").unwrap();
    let vb = var_builder(&files, DType::F32, &Device::Cpu).unwrap();
    UNet2DConditionModel::new(&cfg, vb).unwrap()
}

fn check(model: &str, case: &str) {
    let fx = Fixture::load("unet", &format!("unet_{model}_{case}.safetensors"));
    let unet = load_unet(model);
    let guide = guide_of(&fx);
    let negative = fx.get("neg_encoder_hidden_states").or(fx.get("vsf_neg_encoder_hidden_states"));
    let applied: Vec<String> = serde_json::from_str(fx.m("pag_applied_layers")).unwrap();
    let pag_layers = unet.pag_layers(&applied).unwrap();
    let want_layers: Vec<String> = serde_json::from_str(fx.m("pag_layers")).unwrap();
    assert_eq!(pag_layers.names().collect::<Vec<_>>(), want_layers, "{model}: PAG layer selection");
    let timestep: Vec<f32> = fx.t("timestep").to_vec1().unwrap();
    let negative_context = guide.as_ref().map(|method| NegativeContext {
        method,
        states: negative.expect("guided fixture without a negative context"),
        pooled: None,
        rows: 0..1,
    });
    let inputs = UNetInputs {
        sample: fx.t("sample"),
        timestep: timestep[0] as f64,
        encoder_hidden_states: fx.t("encoder_hidden_states"),
        text_embeds: fx.get("text_embeds"),
        time_ids: fx.get("time_ids"),
        guidance: negative_context.as_ref(),
        perturbation: (fx.m("perturbed") == "true").then_some(Perturbation { rows: 0..1, layers: &pag_layers }),
    };
    let mut trace = Vec::new();
    let out = unet.forward_traced(&inputs, Some(&mut trace)).unwrap();
    let names: Vec<&str> = trace.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["down_0", "down_1", "mid", "up_0", "up_1"], "{model}/{case}: traced blocks");
    for (name, t) in &trace {
        assert_close(&format!("{model}/{case}/{name}"), t, fx.t(name), 1e-4);
    }
    assert_close(&format!("{model}/{case}/output"), &out, fx.t("output"), 1e-4);
}

#[test]
fn sd15_none() {
    check("sd15", "none");
}
#[test]
fn sd15_nag() {
    check("sd15", "nag");
}
#[test]
fn sd15_nasa() {
    check("sd15", "nasa");
}
#[test]
fn sd15_vsf() {
    check("sd15", "vsf");
}
#[test]
fn sd15_pag() {
    check("sd15", "pag");
}
#[test]
fn sdxl_none() {
    check("sdxl", "none");
}
#[test]
fn sdxl_nag() {
    check("sdxl", "nag");
}
#[test]
fn sdxl_nasa() {
    check("sdxl", "nasa");
}
#[test]
fn sdxl_vsf() {
    check("sdxl", "vsf");
}
#[test]
fn sdxl_pag() {
    check("sdxl", "pag");
}

/// Guidance on one row of a batch leaves the other rows as a plain call computes them, and the
/// guided row as a guided single-row call does (the batched layout of the pipelines).
#[test]
fn guided_row_in_a_batch_matches_single_row_calls() {
    let fx = Fixture::load("unet", "unet_sdxl_nag.safetensors");
    let unet = load_unet("sdxl");
    let guide = guide_of(&fx).unwrap();
    let pag = unet.pag_layers(&["mid".to_string()]).unwrap();
    let cond = fx.t("encoder_hidden_states");
    let neg = fx.t("neg_encoder_hidden_states");
    let sample = fx.t("sample");
    let two = |t: &Tensor| Tensor::cat(&[t, t, t], 0).unwrap();
    let ctx = Tensor::cat(&[neg, cond, cond], 0).unwrap();
    let batched = unet
        .forward(&UNetInputs {
            sample: &two(sample),
            timestep: 637.0,
            encoder_hidden_states: &ctx,
            text_embeds: Some(&two(fx.t("text_embeds"))),
            time_ids: Some(&two(fx.t("time_ids"))),
            guidance: Some(&NegativeContext { method: &guide, states: neg, pooled: None, rows: 1..2 }),
            perturbation: Some(Perturbation { rows: 2..3, layers: &pag }),
        })
        .unwrap();
    assert_close("guided row", &batched.narrow(0, 1, 1).unwrap(), fx.t("output"), 1e-4);
    let ptb = Fixture::load("unet", "unet_sdxl_pag.safetensors");
    assert_close("perturbed row", &batched.narrow(0, 2, 1).unwrap(), ptb.t("output"), 1e-4);
    let plain_neg = unet
        .forward(&UNetInputs {
            sample,
            timestep: 637.0,
            encoder_hidden_states: neg,
            text_embeds: fx.get("text_embeds"),
            time_ids: fx.get("time_ids"),
            guidance: None,
            perturbation: None,
        })
        .unwrap();
    assert_close("plain row", &batched.narrow(0, 0, 1).unwrap(), &plain_neg, 1e-5);
}

#[test]
fn pag_layer_names_and_errors() {
    let unet = load_unet("sdxl");
    let all = unet.self_attention_layers();
    // down_blocks.1: 1 layer x depth 2; mid: depth 2; up_blocks.0: 2 layers x depth 2.
    assert_eq!(all.len(), 8, "{all:?}");
    let down = unet.pag_layers(&["down.1".to_string()]).unwrap();
    assert!(down.names().all(|n| n.starts_with("down_blocks.1.")));
    let up = unet.pag_layers(&["up.0.attentions.0".to_string()]).unwrap();
    assert_eq!(up.names().count(), 2);
    let err = unet.pag_layers(&["nowhere".to_string()]).unwrap_err().to_string();
    assert!(err.contains("nowhere") && err.contains("mid_block"), "{err}");
}

#[test]
fn bad_inputs_are_errors() {
    let unet = load_unet("sdxl");
    let fx = Fixture::load("unet", "unet_sdxl_none.safetensors");
    let wrong_ctx = Tensor::zeros((1, 77, 32), DType::F32, &Device::Cpu).unwrap();
    let err = unet
        .forward(&UNetInputs {
            sample: fx.t("sample"),
            timestep: 1.0,
            encoder_hidden_states: &wrong_ctx,
            text_embeds: fx.get("text_embeds"),
            time_ids: fx.get("time_ids"),
            guidance: None,
            perturbation: None,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder_hidden_states"), "{err}");
    let err = unet
        .forward(&UNetInputs {
            sample: fx.t("sample"),
            timestep: 1.0,
            encoder_hidden_states: fx.t("encoder_hidden_states"),
            text_embeds: None,
            time_ids: None,
            guidance: None,
            perturbation: None,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_embeds"), "{err}");
}
