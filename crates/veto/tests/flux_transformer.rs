//! Parity of the Flux transformer with the PyTorch reference (tools/reference/flux_reference.py):
//! one call per case, every block's streams and the output, f32, 1e-4 relative.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, guide_of, Fixture};
use veto::guidance::{AttentionGuidance, NegativeContext};
use veto::loading::safetensors_files::{var_builder, weight_files};
use veto::models::flux::{FluxConfig, FluxInputs, FluxTransformer, TextConditioning};

fn load_model(model: &str) -> FluxTransformer {
    let dir = fixtures("flux").join(model).join("transformer");
    let cfg = FluxConfig::from_file(&dir.join("config.json")).unwrap();
    let files = weight_files(&dir, "diffusion_pytorch_model").unwrap();
    let vb = var_builder(&files, DType::F32, &Device::Cpu).unwrap();
    FluxTransformer::new(&cfg, vb).unwrap()
}

fn check(model: &str, case: &str) {
    let fx = Fixture::load("flux", &format!("transformer_{model}_{case}.safetensors"));
    let flux = load_model(model);
    let positive = TextConditioning { hidden: fx.t("encoder_hidden_states").clone(), pooled: fx.t("pooled").clone() };
    let negative =
        TextConditioning { hidden: fx.t("neg_encoder_hidden_states").clone(), pooled: fx.t("neg_pooled").clone() };
    let guide = guide_of(&fx);
    let negative_context = guide.as_ref().map(|method| NegativeContext {
        method,
        states: &negative.hidden,
        pooled: Some(&negative.pooled),
        rows: 0..fx.t("hidden_states").dim(0).unwrap(),
    });
    let inputs = FluxInputs {
        latents: fx.t("hidden_states"),
        img_ids: fx.t("img_ids"),
        txt_ids: fx.t("txt_ids"),
        timestep: fx.t("timestep"),
        guidance: fx.get("guidance"),
        positive: &positive,
        negative: negative_context.as_ref(),
        nag_variant: Default::default(),
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

/// The negative context carries its method: VSF, which Flux does not have, and rows that do
/// not fit the batch are errors.
#[test]
fn unsupported_negative_contexts_are_errors() {
    let fx = Fixture::load("flux", "transformer_schnell_nag_l1.safetensors");
    let flux = load_model("schnell");
    let positive = TextConditioning { hidden: fx.t("encoder_hidden_states").clone(), pooled: fx.t("pooled").clone() };
    let (states, pooled) = (fx.t("neg_encoder_hidden_states"), fx.t("neg_pooled"));
    let run = |method: &AttentionGuidance, rows: std::ops::Range<usize>| {
        let negative = NegativeContext { method, states, pooled: Some(pooled), rows };
        let inputs = FluxInputs {
            latents: fx.t("hidden_states"),
            img_ids: fx.t("img_ids"),
            txt_ids: fx.t("txt_ids"),
            timestep: fx.t("timestep"),
            guidance: None,
            positive: &positive,
            negative: Some(&negative),
            nag_variant: Default::default(),
        };
        match flux.forward(&inputs) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let vsf = AttentionGuidance::Vsf(Default::default());
    assert!(run(&vsf, 0..1).contains("not VSF"));
    let nag = guide_of(&fx).unwrap();
    assert!(run(&nag, 1..2).contains("guided rows"));
    assert_eq!(run(&nag, 0..1), "");
}

/// `NagVariant::SharedImage` (veto's opt-in variant, no official counterpart): the double
/// blocks are the official ones; with the negative prompt equal to the positive one the
/// contrast vanishes and the output is the unguided one (as for the official data flow); with
/// another negative prompt it differs from both the unguided and the official output.
#[test]
fn shared_image_variant() {
    use veto::guidance::NagVariant;
    let fx = Fixture::load("flux", "transformer_schnell_nag_l1.safetensors");
    let flux = load_model("schnell");
    let positive = TextConditioning { hidden: fx.t("encoder_hidden_states").clone(), pooled: fx.t("pooled").clone() };
    let negative =
        TextConditioning { hidden: fx.t("neg_encoder_hidden_states").clone(), pooled: fx.t("neg_pooled").clone() };
    let nag = guide_of(&fx).unwrap();
    let nasa = AttentionGuidance::Contrast(veto::guidance::Contrast::Nasa { scale: 0.5 });
    let run = |neg: Option<(&TextConditioning, &AttentionGuidance)>, variant: NagVariant| {
        let context =
            neg.map(|(n, method)| NegativeContext { method, states: &n.hidden, pooled: Some(&n.pooled), rows: 0..1 });
        let inputs = FluxInputs {
            latents: fx.t("hidden_states"),
            img_ids: fx.t("img_ids"),
            txt_ids: fx.t("txt_ids"),
            timestep: fx.t("timestep"),
            guidance: None,
            positive: &positive,
            negative: context.as_ref(),
            nag_variant: variant,
        };
        let mut trace = Vec::new();
        let out = flux.forward_traced(&inputs, Some(&mut trace)).unwrap();
        (out, trace)
    };
    let (none, _) = run(None, NagVariant::SharedImage);
    let (same, _) = run(Some((&positive, &nag)), NagVariant::SharedImage);
    assert_close("shared-image, negative = positive", &same, &none, 1e-5);

    let (official, official_trace) = run(Some((&negative, &nag)), NagVariant::Official);
    let (shared, shared_trace) = run(Some((&negative, &nag)), NagVariant::SharedImage);
    for ((name, a), (_, b)) in official_trace.iter().zip(&shared_trace).filter(|((n, _), _)| n.starts_with("double_")) {
        assert_close(name, b, a, 1e-6);
    }
    let differs = |a: &candle_core::Tensor, b: &candle_core::Tensor| common::rel_diff(a, b) > 1e-3;
    assert!(differs(&shared, &official) && differs(&shared, &none), "the variant guides, differently");
    let (nasa_out, _) = run(Some((&negative, &nasa)), NagVariant::SharedImage);
    assert!(
        differs(&nasa_out, &shared)
            && nasa_out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite())
    );
}
