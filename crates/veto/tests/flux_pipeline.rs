//! Parity of the whole Flux pipeline (text -> latents -> image) with the PyTorch reference:
//! every step's latents, the final latents and the decoded image, for each guidance method.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, request_of, Fixture};
use veto::families::FLUX;
use veto::loading::model_source::ModelSource;
use veto::pipelines::flux::FluxPipeline;
use veto::pipelines::TextToImage;
use veto::{GuidanceConfig, ResolvedRequest, StepEvent};

fn pipeline(model: &str) -> FluxPipeline {
    let dir = fixtures("flux").join(model);
    let source = ModelSource::resolve(dir.to_str().unwrap()).unwrap();
    FluxPipeline::load(&source, &Device::Cpu, DType::F32).unwrap()
}

fn request(fx: &Fixture) -> ResolvedRequest {
    request_of(fx, GuidanceConfig::nag_default(), 256)
}

fn generate(pipe: &FluxPipeline, req: &ResolvedRequest, on_step: &mut dyn FnMut(StepEvent)) -> veto::Result<Tensor> {
    Ok(common::generate(pipe, &FLUX, req, on_step)?.0)
}

fn validate(pipe: &FluxPipeline, req: &ResolvedRequest) -> veto::Result<()> {
    common::validate(pipe, &FLUX, req)
}

fn check(model: &str, case: &str) {
    let fx = Fixture::load("flux", &format!("pipeline_{model}_{case}.safetensors"));
    let pipe = pipeline(model);
    let req = request(&fx);
    let mut steps = Vec::new();
    let mut timesteps = Vec::new();
    let latents = generate(&pipe, &req, &mut |e| {
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
    let e = validate(&pipe, &r).unwrap_err().to_string();
    assert!(e.starts_with("height:") && e.contains("multiples of 16"), "{e}");

    let mut r = base.clone();
    r.guidance.nag.tau = 0.0;
    assert!(r.guidance.validate().unwrap_err().to_string().contains("nag_tau"));

    let mut r = base.clone();
    r.guidance.nag.alpha = 1.5;
    assert!(r.guidance.validate().unwrap_err().to_string().contains("nag_alpha"));

    let mut r = base.clone();
    r.guidance.method = "vsf".parse().unwrap();
    let e = validate(&pipe, &r).unwrap_err().to_string();
    assert!(e.contains("not available for Flux") && e.contains("cfg+nasa"), "{e}");

    let mut r = base.clone();
    r.sampler.eta = Some(0.5);
    let e = validate(&pipe, &r).unwrap_err().to_string();
    assert!(e.starts_with("eta: not supported for Flux"), "{e}");

    let mut r = base.clone();
    r.init_latents = Some(Tensor::zeros((1, 16, 4, 4), DType::F32, &Device::Cpu).unwrap());
    let e = generate(&pipe, &r, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("init latents have shape [1, 16, 4, 4]"), "{e}");
}

/// The library's front door: `Pipeline::from_pretrained` + the request builder reproduce the
/// fixture, image included, with no warnings.
#[test]
fn public_api_reproduces_the_fixture() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<veto::Pipeline>();

    let fx = Fixture::load("flux", "pipeline_schnell_nag_l1.safetensors");
    let dir = fixtures("flux").join("schnell");
    let pipe = veto::Pipeline::from_pretrained(dir.to_str().unwrap(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(pipe.family().name, "flux");
    assert_eq!(pipe.defaults().steps, 4);
    let r = request(&fx);
    let req = veto::GenerateRequest::new(r.prompt.clone())
        .negative(r.negative_prompt.clone().unwrap())
        .guidance(r.guidance.clone())
        .steps(r.steps)
        .size(r.height, r.width)
        .guidance_scale(r.guidance_scale)
        .max_sequence_length(r.max_sequence_length)
        .init_latents(fx.t("init_latents").clone());
    let mut steps = 0;
    let out = pipe.generate_with(&req, &mut |_| steps += 1).unwrap();
    assert_eq!(steps, r.steps);
    assert_close("public API final latents", &out.latents, fx.t("final_latents"), 1e-4);
    if let Some(image) = fx.get("image") {
        assert_close("public API image", &out.image, image, 1e-4);
    }
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    assert_close("public API init latents", &out.init_latents, fx.t("init_latents"), 0.0);
    assert!(out.step_noise.is_none(), "FlowMatch Euler draws no noise");
    // Step noise given to the deterministic sampler: unused, with a warning, same latents.
    let noise = Tensor::zeros((3, 1, 16, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let (again, warnings, _) = pipe.generate_latents(&req.clone().step_noise(noise), &mut |_| {}).unwrap();
    assert_eq!(warnings, ["step_noise is unused: FlowMatchEulerDiscreteScheduler adds no noise between steps"]);
    assert_close("unused step noise", &again.latents, &out.latents, 0.0);
    // A method the family does not have is refused before any work, naming what it has.
    let e = pipe.generate(&req.clone().method("cfg+pag".parse().unwrap())).err().unwrap();
    assert!(matches!(e, veto::Error::UnsupportedMethod { family: "Flux", .. }), "{e}");
}
