//! Parity of the whole Flux pipeline (text -> latents -> image) with the PyTorch reference:
//! every step's latents, the final latents and the decoded image, for each guidance method.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, Fixture};
use veto::guidance::{GuidanceConfig, Method, NagParams};
use veto::loading::model_source::ModelSource;
use veto::pipelines::flux::FluxPipeline;
use veto::pipelines::{GenerateRequest, TextToImage};

fn pipeline(model: &str) -> FluxPipeline {
    let dir = fixtures("flux").join(model);
    let source = ModelSource::resolve(dir.to_str().unwrap()).unwrap();
    FluxPipeline::load(&source, &Device::Cpu, DType::F32).unwrap()
}

fn request(fx: &Fixture) -> GenerateRequest {
    let guidance = GuidanceConfig {
        method: fx.m("guidance").parse::<Method>().unwrap(),
        nag: NagParams {
            scale: fx.f("nag_scale"),
            tau: fx.f("nag_tau"),
            alpha: fx.f("nag_alpha"),
            norm: fx.m("nag_norm").parse().unwrap(),
        },
        nag_end: fx.f("nag_end"),
        nasa_scale: fx.f("nasa_scale"),
        true_cfg_scale: fx.f("true_cfg_scale"),
        ..GuidanceConfig::nag_default()
    };
    GenerateRequest {
        prompt: fx.m("prompt").to_string(),
        negative_prompt: Some(fx.m("negative_prompt").to_string()),
        guidance,
        steps: fx.m("steps").parse().unwrap(),
        height: fx.m("height").parse().unwrap(),
        width: fx.m("width").parse().unwrap(),
        guidance_scale: fx.f("guidance_scale"),
        max_sequence_length: fx.m("max_sequence_length").parse().unwrap(),
        seed: 0,
        init_latents: Some(fx.t("init_latents").clone()),
        sampler: Default::default(),
    }
}

fn check(model: &str, case: &str) {
    let fx = Fixture::load("flux", &format!("pipeline_{model}_{case}.safetensors"));
    let pipe = pipeline(model);
    let req = request(&fx);
    let mut steps = Vec::new();
    let mut timesteps = Vec::new();
    let latents = pipe
        .generate_latents(&req, &mut |e| {
            steps.push(e.latents.clone());
            timesteps.push(e.timestep as f32);
        })
        .unwrap();
    let want_t = fx.t("timesteps").to_vec1::<f32>().unwrap();
    assert_eq!(timesteps.len(), want_t.len(), "{model}/{case}: number of steps");
    for (a, b) in timesteps.iter().zip(&want_t) {
        assert!((a - b).abs() <= 1e-3, "{model}/{case}: timesteps {timesteps:?} vs {want_t:?}");
    }
    for (k, s) in steps.iter().enumerate() {
        assert_close(&format!("{model}/{case}/step_{k}"), s, fx.t(&format!("step_{k}_latents")), 1e-4);
    }
    assert_close(&format!("{model}/{case}/final"), &latents, fx.t("final_latents"), 1e-4);
    if let Some(image) = fx.get("image") {
        let decoded = pipe.decode(&latents).unwrap();
        assert_close(&format!("{model}/{case}/image"), &decoded, image, 1e-4);
    }
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
fn schnell_nag_end() {
    check("schnell", "nag_end");
}
#[test]
fn schnell_cfg() {
    check("schnell", "cfg");
}
#[test]
fn schnell_cfg_nag() {
    check("schnell", "cfg_nag");
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
fn dev_cfg_nag() {
    check("dev", "cfg_nag");
}

#[test]
fn bad_requests_are_errors() {
    let pipe = pipeline("schnell");
    let fx = Fixture::load("flux", "pipeline_schnell_nag_l1.safetensors");
    let base = request(&fx);

    let mut r = base.clone();
    r.height = 72;
    let e = pipe.validate(&r).unwrap_err().to_string();
    assert!(e.contains("multiple of 16"), "{e}");

    let mut r = base.clone();
    r.guidance.nag.tau = 0.0;
    assert!(pipe.validate(&r).unwrap_err().to_string().contains("--nag-tau"));

    let mut r = base.clone();
    r.guidance.nag.alpha = 1.5;
    assert!(pipe.validate(&r).unwrap_err().to_string().contains("--nag-alpha"));

    let mut r = base.clone();
    r.init_latents = Some(candle_core::Tensor::zeros((1, 16, 4, 4), DType::F32, &Device::Cpu).unwrap());
    let e = pipe.generate_latents(&r, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("init latents have shape [1, 16, 4, 4]"), "{e}");
}
