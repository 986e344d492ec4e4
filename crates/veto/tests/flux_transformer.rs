//! Parity of the Flux transformer with the PyTorch reference (tools/reference/flux_reference.py):
//! one call per case, every block's streams and the output, f32, 1e-4 relative.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, Fixture};
use veto::guidance::{AttentionGuidance, NagParams};
use veto::loading::safetensors_files::{var_builder, weight_files};
use veto::models::flux::{FluxConfig, FluxInputs, FluxTransformer, TextConditioning};

fn load_model(model: &str) -> FluxTransformer {
    let dir = fixtures("flux").join(model).join("transformer");
    let cfg = FluxConfig::from_file(&dir.join("config.json")).unwrap();
    let files = weight_files(&dir, "diffusion_pytorch_model").unwrap();
    let vb = var_builder(&files, DType::F32, &Device::Cpu).unwrap();
    FluxTransformer::new(&cfg, vb).unwrap()
}

fn guide_of(fx: &Fixture) -> Option<AttentionGuidance> {
    match fx.m("guidance") {
        "none" => None,
        "nag" => Some(AttentionGuidance::Nag(NagParams {
            scale: fx.f("nag_scale"),
            tau: fx.f("nag_tau"),
            alpha: fx.f("nag_alpha"),
            norm: fx.m("nag_norm").parse().unwrap(),
        })),
        "nasa" => Some(AttentionGuidance::Nasa { scale: fx.f("nasa_scale") }),
        other => panic!("unknown guidance {other}"),
    }
}

fn check(model: &str, case: &str) {
    let fx = Fixture::load("flux", &format!("transformer_{model}_{case}.safetensors"));
    let flux = load_model(model);
    let positive = TextConditioning { hidden: fx.t("encoder_hidden_states").clone(), pooled: fx.t("pooled").clone() };
    let negative =
        TextConditioning { hidden: fx.t("neg_encoder_hidden_states").clone(), pooled: fx.t("neg_pooled").clone() };
    let guide = guide_of(&fx);
    let inputs = FluxInputs {
        latents: fx.t("hidden_states"),
        img_ids: fx.t("img_ids"),
        txt_ids: fx.t("txt_ids"),
        timestep: fx.t("timestep"),
        guidance: fx.get("guidance"),
        positive: &positive,
        negative: Some(&negative),
        guide: guide.as_ref(),
    };
    let mut trace = Vec::new();
    let out = flux.forward_traced(&inputs, Some(&mut trace)).unwrap();
    for (name, t) in &trace {
        let want = fx.get(name).unwrap_or_else(|| panic!("{model}/{case}: fixture lacks {name}"));
        assert_close(&format!("{model}/{case}/{name}"), t, want, 1e-4);
    }
    let expected_blocks =
        if guide.is_some() { 3 } else { 2 } * flux.config().num_layers + flux.config().num_single_layers;
    assert_eq!(trace.len(), expected_blocks, "{model}/{case}: traced streams");
    assert_close(&format!("{model}/{case}/output"), &out, fx.t("output"), 1e-4);
}

#[test]
fn schnell_none() {
    check("schnell", "none");
}
#[test]
fn schnell_nag_l1() {
    check("schnell", "nag_l1");
}
#[test]
fn schnell_nag_l2() {
    check("schnell", "nag_l2");
}
#[test]
fn schnell_nasa() {
    check("schnell", "nasa");
}
#[test]
fn dev_none() {
    check("dev", "none");
}
#[test]
fn dev_nag_l1() {
    check("dev", "nag_l1");
}
#[test]
fn dev_nag_l2() {
    check("dev", "nag_l2");
}
#[test]
fn dev_nasa() {
    check("dev", "nasa");
}

#[test]
fn guidance_without_negative_is_an_error() {
    let fx = Fixture::load("flux", "transformer_schnell_nag_l1.safetensors");
    let flux = load_model("schnell");
    let positive = TextConditioning { hidden: fx.t("encoder_hidden_states").clone(), pooled: fx.t("pooled").clone() };
    let guide = guide_of(&fx).unwrap();
    let inputs = FluxInputs {
        latents: fx.t("hidden_states"),
        img_ids: fx.t("img_ids"),
        txt_ids: fx.t("txt_ids"),
        timestep: fx.t("timestep"),
        guidance: None,
        positive: &positive,
        negative: None,
        guide: Some(&guide),
    };
    let err = flux.forward(&inputs).err().expect("must fail").to_string();
    assert!(err.contains("negative prompt"), "{err}");
}
