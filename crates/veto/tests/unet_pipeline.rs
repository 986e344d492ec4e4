//! Parity of the SD1.5 / SDXL pipelines with the PyTorch reference
//! (tools/reference/unet_reference.py, checked against diffusers' pipelines): text encoding,
//! every step's guided noise prediction and latents, the final latents and (SDXL none / nag) the
//! decoded image, f32, 1e-4 relative; diffusers' stock SDXL pipeline with each stochastic
//! scheduler replayed through `GenerateRequest::step_noise` (tools/reference/noise_replay_reference.py);
//! plus the errors of bad requests.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, request_of, Fixture};
use veto::families::UNET;
use veto::guidance::{Method, VsfLayout};
use veto::loading::model_source::ModelSource;
use veto::pipelines::sdxl::{SdVariant, StableDiffusionPipeline};
use veto::pipelines::TextToImage;
use veto::{ResolvedRequest, StepEvent};

fn load(model: &str) -> StableDiffusionPipeline {
    let source = ModelSource::local(fixtures("unet").join(model)).unwrap();
    StableDiffusionPipeline::load(&source, &Device::Cpu, DType::F32).unwrap()
}

fn request(fx: &Fixture, pipe: &StableDiffusionPipeline) -> ResolvedRequest {
    let mut r = request_of(fx, pipe.defaults().guidance, 77);
    r.sampler.pag_layers = Some(serde_json::from_str(fx.m("pag_applied_layers")).unwrap());
    r
}

fn generate(
    pipe: &StableDiffusionPipeline,
    req: &ResolvedRequest,
    on_step: &mut dyn FnMut(StepEvent),
) -> veto::Result<(Tensor, Vec<String>)> {
    common::generate(pipe, &UNET, req, on_step)
}

fn validate(pipe: &StableDiffusionPipeline, req: &ResolvedRequest) -> veto::Result<()> {
    common::validate(pipe, &UNET, req)
}

fn check(model: &str, case: &str) {
    let fx = Fixture::load("unet", &format!("pipeline_{model}_{case}.safetensors"));
    let pipe = load(model);
    assert_eq!(pipe.scheduler().class_name(), fx.m("scheduler"));
    let req = request(&fx, &pipe);
    let mut steps = Vec::new();
    let mut guided = Vec::new();
    let (latents, warnings) = generate(&pipe, &req, &mut |e| {
        steps.push((e.timestep, e.latents.clone()));
        guided.push(e.attention_guided);
    })
    .unwrap();
    let want_t: Vec<f32> = fx.t("timesteps").to_vec1().unwrap();
    let got_t: Vec<f32> = steps.iter().map(|(t, _)| *t as f32).collect();
    assert_eq!(got_t, want_t, "{model}/{case}: timesteps");
    for (k, (_, x)) in steps.iter().enumerate() {
        assert_close(&format!("{model}/{case}/step_{k}_latents"), x, fx.t(&format!("step_{k}_latents")), 1e-4);
    }
    assert_close(&format!("{model}/{case}/final_latents"), &latents, fx.t("final_latents"), 1e-4);
    let attention = fx.m("attention") != "none";
    if case == "nag_end" {
        assert_eq!(guided, [true, false, false, false], "{model}/{case}: NAG window");
    } else {
        assert!(guided.iter().all(|&g| g == attention), "{model}/{case}: guided steps {guided:?}");
    }
    if let Some(image) = fx.get("image") {
        let decoded = pipe.decode(&latents).unwrap();
        assert_close(&format!("{model}/{case}/image"), &decoded, image, 1e-4);
    }
    if fx.m("guidance") == "none" {
        // The fixtures pass the negative prompt to every case.
        assert!(warnings.len() == 1 && warnings[0].contains("negative prompt is unused"), "{warnings:?}");
    } else {
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}

#[test]
fn sd15_none() {
    check("sd15", "none");
}
#[test]
fn sd15_cfg() {
    check("sd15", "cfg");
}
#[test]
fn sd15_cfg_nag() {
    check("sd15", "cfg_nag");
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
fn sdxl_nag_end() {
    check("sdxl", "nag_end");
}
#[test]
fn sdxl_cfg() {
    check("sdxl", "cfg");
}
#[test]
fn sdxl_cfg_nag() {
    check("sdxl", "cfg_nag");
}
#[test]
fn sdxl_cfg_pag() {
    check("sdxl", "cfg_pag");
}
#[test]
fn sdxl_cfg_pag_nag() {
    check("sdxl", "cfg_pag_nag");
}
#[test]
fn sdxl_nasa() {
    check("sdxl", "nasa");
}
#[test]
fn sdxl_vsf() {
    check("sdxl", "vsf");
}

fn check_text(model: &str) {
    let fx = Fixture::load("unet", &format!("text_{model}.safetensors"));
    let pipe = load(model);
    let w = &mut veto::pipelines::Warnings::default();
    let pos = pipe.encode_prompt(fx.m("prompt"), true, "prompt", w).unwrap();
    let neg = pipe.encode_prompt(fx.m("negative_prompt"), true, "negative prompt", w).unwrap();
    let vsf = pipe.encode_prompt(fx.m("negative_prompt"), false, "negative prompt", w).unwrap();
    assert_close(&format!("{model}/prompt_embeds"), &pos.embeds, fx.t("prompt_embeds"), 1e-4);
    assert_close(&format!("{model}/neg_prompt_embeds"), &neg.embeds, fx.t("neg_prompt_embeds"), 1e-4);
    assert_close(&format!("{model}/vsf_neg_prompt_embeds"), &vsf.embeds, fx.t("vsf_neg_prompt_embeds"), 1e-4);
    match fx.get("text_embeds") {
        Some(want) => {
            assert_close(&format!("{model}/text_embeds"), pos.pooled.as_ref().unwrap(), want, 1e-4);
            assert_close(
                &format!("{model}/neg_text_embeds"),
                neg.pooled.as_ref().unwrap(),
                fx.t("neg_text_embeds"),
                1e-4,
            );
        }
        None => assert!(pos.pooled.is_none()),
    }
}

#[test]
fn sd15_text() {
    check_text("sd15");
}
#[test]
fn sdxl_text() {
    check_text("sdxl");
}

#[test]
fn loads_through_the_generic_loader_with_defaults() {
    let sdxl =
        veto::Pipeline::load(&ModelSource::local(fixtures("unet").join("sdxl")).unwrap(), &Device::Cpu, DType::F32)
            .unwrap();
    assert_eq!(sdxl.family().name, "unet");
    let d = sdxl.defaults();
    assert_eq!((d.steps, d.guidance_scale, d.height, d.width), (25, 5.0, 64, 64));
    assert_eq!(d.guidance.method, Method::CFG_NAG);
    assert_eq!((d.guidance.nag.scale, d.guidance.nag.tau, d.guidance.nag.alpha), (3.0, 2.5, 0.5));
    let sd15 = load("sd15");
    assert_eq!(sd15.variant(), SdVariant::StableDiffusion);
    let d = sd15.defaults();
    assert_eq!((d.steps, d.guidance_scale, d.guidance.nag.alpha), (25, 7.5, 0.375));
}

fn base_request(pipe: &StableDiffusionPipeline) -> ResolvedRequest {
    let d = pipe.defaults();
    ResolvedRequest {
        prompt: "a cat".into(),
        negative_prompt: Some("blurry".into()),
        guidance: d.guidance,
        steps: 2,
        height: 64,
        width: 64,
        guidance_scale: d.guidance_scale,
        max_sequence_length: 77,
        seed: 1,
        init_latents: None,
        step_noise: None,
        sampler: Default::default(),
        video: Default::default(),
    }
}

#[test]
fn height_not_a_multiple_of_8_is_rejected() {
    let pipe = load("sdxl");
    let mut req = base_request(&pipe);
    req.height = 60;
    let err = validate(&pipe, &req).unwrap_err().to_string();
    assert!(err.starts_with("height:") && err.contains("multiples of 8") && err.contains("60x64"), "{err}");
    assert!(generate(&pipe, &req, &mut |_| {}).is_err());
}

#[test]
fn bad_guidance_for_the_family_is_rejected() {
    let pipe = load("sd15");
    let mut req = base_request(&pipe);
    req.guidance.method = Method::VSF;
    req.guidance.vsf.layout = VsfLayout::Official;
    let err = validate(&pipe, &req).unwrap_err().to_string();
    assert!(err.starts_with("vsf_layout:"), "{err}");
    let err = "cfg+magic".parse::<Method>().unwrap_err().to_string();
    assert!(err.contains("magic"), "{err}");
    let mut req = base_request(&pipe);
    req.guidance.method = "pag".parse().unwrap();
    req.sampler.pag_layers = Some(vec!["nowhere".into()]);
    assert!(validate(&pipe, &req).is_err());
    req.sampler.pag_layers = Some(vec!["mid".into()]);
    generate(&pipe, &req, &mut |_| {}).unwrap();
    // Without the option, diffusers' default layers (`mid`) apply.
    req.sampler.pag_layers = None;
    generate(&pipe, &req, &mut |_| {}).unwrap();
    let mut req = base_request(&pipe);
    req.init_latents = Some(Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap());
    assert!(validate(&pipe, &req).unwrap_err().to_string().contains("init latents"));
}

/// The stock SD1.5 folder layout uses PNDM (PLMS): it loads and runs, `n` steps making
/// `n + 1` UNet calls as in diffusers; an unknown scheduler class is a clear error.
#[test]
fn stock_sd15_pndm_runs_and_an_unknown_scheduler_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    common::copy_dir(&fixtures("unet").join("sd15"), dir.path());
    let config = dir.path().join("scheduler/scheduler_config.json");
    std::fs::copy(fixtures("unet").join("schedulers/sd15_pndm.json"), &config).unwrap();
    let source = ModelSource::local(dir.path()).unwrap();
    let pipe = StableDiffusionPipeline::load(&source, &Device::Cpu, DType::F32).unwrap();
    let mut req = base_request(&pipe);
    req.steps = 3;
    let mut calls = Vec::new();
    let (latents, _) = generate(&pipe, &req, &mut |e| calls.push(e.timestep)).unwrap();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_eq!(calls[1], calls[2], "the second timestep repeats: {calls:?}");
    assert_eq!(latents.dims(), &[1, 4, 8, 8]);

    std::fs::write(&config, r#"{"_class_name": "KDPM2DiscreteScheduler"}"#).unwrap();
    let err = match StableDiffusionPipeline::load(&source, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("KDPM2 loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("KDPM2DiscreteScheduler") && err.contains("PNDMScheduler"), "{err}");
}

#[test]
fn seeded_runs_are_reproducible_and_lcm_timesteps_can_be_set() {
    let pipe = load("sdxl");
    let mut req = base_request(&pipe);
    req.guidance.method = Method::NAG;
    req.guidance_scale = 0.0;
    let (a, _) = generate(&pipe, &req, &mut |_| {}).unwrap();
    let (b, _) = generate(&pipe, &req, &mut |_| {}).unwrap();
    assert_close("seeded", &a, &b, 0.0);
    req.sampler.timesteps = Some(vec![999.0, 499.0]);
    let mut seen = Vec::new();
    generate(&pipe, &req, &mut |e| seen.push(e.timestep)).unwrap();
    assert_eq!(seen, [999.0, 499.0]);
}

/// `scheduler`: another sampler built from the folder's config (diffusers' `from_config`),
/// checked before any work; a name nobody knows is a clear error.
#[test]
fn the_scheduler_can_be_overridden_from_the_folder_config() {
    let pipe = load("sd15");
    let mut req = base_request(&pipe);
    let (default, _) = generate(&pipe, &req, &mut |_| {}).unwrap();
    for name in ["euler_a", "DPM++ 2M Karras", "plms", "DDIMScheduler"] {
        req.sampler.scheduler = Some(name.to_string());
        let (other, _) = generate(&pipe, &req, &mut |_| {}).unwrap();
        assert!(common::rel_diff(&other, &default) > 1e-4, "{name} ran the folder's scheduler");
    }
    req.sampler.scheduler = Some("k_heun".into());
    let e = validate(&pipe, &req).unwrap_err();
    assert!(matches!(e, veto::Error::InvalidParameter { name: "scheduler", .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Stochastic samplers: step noise given through the request (tools/reference/noise_replay_reference.py).
// ---------------------------------------------------------------------------------------------

/// A copy of the SDXL folder whose scheduler config is `scheduler_config` (JSON text).
fn sdxl_with_scheduler(scheduler_config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::copy_dir(&fixtures("unet").join("sdxl"), dir.path());
    std::fs::write(dir.path().join("scheduler/scheduler_config.json"), scheduler_config).unwrap();
    dir
}

fn scheduler_json(name: &str) -> String {
    std::fs::read_to_string(fixtures("unet").join(format!("schedulers/{name}.json"))).unwrap()
}

fn pipeline_at(dir: &std::path::Path) -> veto::Pipeline {
    veto::Pipeline::load(&ModelSource::local(dir).unwrap(), &Device::Cpu, DType::F32).unwrap()
}

/// The request a `noise_<case>` fixture ran: its initial latents and its step noise.
fn noise_request(fx: &Fixture) -> veto::GenerateRequest {
    let mut req = veto::GenerateRequest::new(fx.m("prompt"))
        .method(fx.m("guidance").parse().unwrap())
        .guidance_scale(fx.f("guidance_scale"))
        .size(fx.m("height").parse().unwrap(), fx.m("width").parse().unwrap())
        .steps(fx.m("steps").parse().unwrap())
        .init_latents(fx.t("latents").clone())
        .step_noise(fx.t("step_noise").clone());
    if !fx.m("negative_prompt").is_empty() {
        req = req.negative(fx.m("negative_prompt"));
    }
    let timesteps = (!fx.m("custom_timesteps").is_empty())
        .then(|| serde_json::from_str::<Vec<f64>>(fx.m("custom_timesteps")).unwrap());
    let eta = (!fx.m("eta").is_empty()).then(|| fx.f("eta"));
    req.sampler(veto::SamplerOptions { timesteps, eta, ..Default::default() })
}

/// diffusers' stock SDXL pipeline with a stochastic scheduler, replayed through the request.
fn noise_parity(case: &str) {
    let fx = Fixture::load("unet", &format!("noise_{case}.safetensors"));
    let dir = sdxl_with_scheduler(fx.m("scheduler_config"));
    let pipe = pipeline_at(dir.path());
    assert_eq!(pipe.family().name, "unet");
    let mut seen = Vec::new();
    let (run, warnings, _) = pipe.generate_latents(&noise_request(&fx), &mut |e| seen.push(e.timestep as f32)).unwrap();
    assert!(warnings.is_empty(), "{case}: {warnings:?}");
    assert_eq!(seen, fx.t("timesteps").to_vec1::<f32>().unwrap(), "{case}: timesteps");
    assert_close(&format!("noise_{case}/final_latents"), &run.latents, fx.t("final_latents"), 1e-4);
    // What comes back is what was given.
    assert_close(&format!("{case}: step noise"), run.step_noise.as_ref().unwrap(), fx.t("step_noise"), 0.0);
    assert_close(&format!("{case}: init latents"), &run.init_latents, fx.t("latents"), 0.0);
    let noise_steps: Vec<usize> = serde_json::from_str(fx.m("noise_steps")).unwrap();
    assert_eq!(fx.t("step_noise").dim(0).unwrap(), noise_steps.len());
}

#[test]
fn noise_lcm_dmd2() {
    noise_parity("lcm_dmd2");
}

#[test]
fn noise_tcd_hyper_sdxl() {
    noise_parity("tcd_hyper_sdxl");
}

#[test]
fn noise_ddim_eta() {
    noise_parity("ddim_eta");
}

#[test]
fn noise_dpmpp_sde() {
    noise_parity("dpmpp_sde");
}

#[test]
fn noise_euler_a() {
    noise_parity("euler_a");
}

#[test]
fn seeded_step_noise_comes_back_and_replays_bit_for_bit() {
    let dir = sdxl_with_scheduler(&scheduler_json("dmd2_lcm"));
    let pipe = pipeline_at(dir.path());
    let req = veto::GenerateRequest::new("a cat").method(Method::NONE).guidance_scale(0.0).steps(4).seed(3);
    let (seeded, warnings, _) = pipe.generate_latents(&req, &mut |_| {}).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let noise = seeded.step_noise.clone().expect("LCM draws noise");
    assert_eq!(noise.dims(), [3, 1, 4, 8, 8]);
    // Replayed from what the run returned: the same latents, bit for bit.
    let replay = req.clone().init_latents(seeded.init_latents.clone()).step_noise(noise.clone());
    let (again, _, _) = pipe.generate_latents(&replay, &mut |_| {}).unwrap();
    assert_close("replay", &again.latents, &seeded.latents, 0.0);
    assert_close("replayed noise", again.step_noise.as_ref().unwrap(), &noise, 0.0);
    // Other noise, other latents: the noise is really used.
    let other = req.clone().init_latents(seeded.init_latents.clone()).step_noise((&noise * -1.0).unwrap());
    let (moved, _, _) = pipe.generate_latents(&other, &mut |_| {}).unwrap();
    assert!(common::rel_diff(&moved.latents, &seeded.latents) > 1e-2);
    // The last draw matters too (LCM re-noises before the last step).
    let last = Tensor::cat(&[noise.narrow(0, 0, 2).unwrap(), noise.narrow(0, 2, 1).unwrap().zeros_like().unwrap()], 0)
        .unwrap();
    let (moved, _, _) = pipe.generate_latents(&req.clone().step_noise(last), &mut |_| {}).unwrap();
    assert!(common::rel_diff(&moved.latents, &seeded.latents) > 1e-3);
}

#[test]
fn step_noise_of_the_wrong_count_or_shape_is_refused_before_loading() {
    let dir = sdxl_with_scheduler(&scheduler_json("dmd2_lcm"));
    let source = ModelSource::local(dir.path()).unwrap();
    let noise = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let req = veto::GenerateRequest::new("a cat").method(Method::NONE).guidance_scale(0.0).steps(4);
    let err =
        veto::Pipeline::check_before_loading(&source, &req.clone().step_noise(noise(&[4, 1, 4, 8, 8]))).unwrap_err();
    assert!(matches!(err, veto::Error::InvalidParameter { name: "step_noise", .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("has 4 noise tensors") && msg.contains("LCMScheduler with 4 steps draws 3 (at steps 0, 1, 2)")
    );
    let err = veto::Pipeline::check_before_loading(&source, &req.clone().step_noise(noise(&[3, 1, 4, 4, 4])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("shape [3, 1, 4, 4, 4], expected [3, 1, 4, 8, 8]"), "{err}");
    // Explicit timesteps set the count: 2 steps, 1 draw.
    let two = req.clone().sampler(veto::SamplerOptions { timesteps: Some(vec![999.0, 499.0]), ..Default::default() });
    veto::Pipeline::check_before_loading(&source, &two.clone().step_noise(noise(&[1, 1, 4, 8, 8]))).unwrap();
    assert!(veto::Pipeline::check_before_loading(&source, &two.step_noise(noise(&[3, 1, 4, 8, 8]))).is_err());
    // The loaded pipeline refuses it too.
    let pipe = pipeline_at(dir.path());
    assert!(pipe.resolve(&req.step_noise(noise(&[2, 1, 4, 8, 8]))).is_err());
}

#[test]
fn step_noise_for_a_deterministic_sampler_is_unused_with_a_warning() {
    // The SDXL folder's Euler scheduler draws no noise; nor does TCD with eta 0.
    let noise = Tensor::ones((3, 1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let req = veto::GenerateRequest::new("a cat").method(Method::NONE).guidance_scale(0.0).steps(2).seed(4);
    let pipe = pipeline_at(&fixtures("unet").join("sdxl"));
    let (plain, _, _) = pipe.generate_latents(&req, &mut |_| {}).unwrap();
    let (given, warnings, _) = pipe.generate_latents(&req.clone().step_noise(noise.clone()), &mut |_| {}).unwrap();
    assert_eq!(warnings, ["step_noise is unused: EulerDiscreteScheduler with 2 steps adds no noise between steps"]);
    assert!(plain.step_noise.is_none() && given.step_noise.is_none());
    assert_close("unused noise", &given.latents, &plain.latents, 0.0);
    let dir = sdxl_with_scheduler(&scheduler_json("hyper_sdxl_tcd"));
    let tcd = pipeline_at(dir.path());
    let (_, warnings, _) = tcd.generate_latents(&req.clone().step_noise(noise), &mut |_| {}).unwrap();
    assert_eq!(warnings, ["step_noise is unused: TCDScheduler with 2 steps adds no noise between steps"]);
}
