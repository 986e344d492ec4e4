//! Parity of the SD1.5 / SDXL pipelines with the PyTorch reference
//! (tools/reference/unet_reference.py, checked against diffusers' pipelines): text encoding,
//! every step's guided noise prediction and latents, the final latents and (SDXL none / nag) the
//! decoded image, f32, 1e-4 relative; plus the errors of bad requests.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, Fixture};
use veto::guidance::vsf::VsfLayout;
use veto::guidance::{GuidanceConfig, Method};
use veto::loading::model_source::ModelSource;
use veto::pipelines::sdxl::{Family, StableDiffusionPipeline};
use veto::pipelines::{GenerateRequest, TextToImage};

fn load(model: &str) -> StableDiffusionPipeline {
    let source = ModelSource::local(fixtures("unet").join(model)).unwrap();
    StableDiffusionPipeline::load(&source, &Device::Cpu, DType::F32).unwrap()
}

fn guidance_of(fx: &Fixture, defaults: GuidanceConfig) -> GuidanceConfig {
    let mut g = defaults;
    g.method = fx.m("guidance").parse::<Method>().unwrap();
    let num = |k: &str| fx.meta.get(k).map(|v| v.parse::<f64>().unwrap());
    if let Some(v) = num("nag_scale") {
        g.nag.scale = v;
    }
    if let Some(v) = num("nag_tau") {
        g.nag.tau = v;
    }
    if let Some(v) = num("nag_alpha") {
        g.nag.alpha = v;
    }
    if let Some(n) = fx.meta.get("nag_norm") {
        g.nag.norm = n.parse().unwrap();
    }
    if let Some(v) = num("nag_end") {
        g.nag_end = v;
    }
    if let Some(v) = num("nasa_scale") {
        g.nasa_scale = v;
    }
    if let Some(v) = num("vsf_scale") {
        g.vsf.scale = v;
    }
    if let Some(v) = num("vsf_bias") {
        g.vsf.bias = v;
    }
    if let Some(v) = num("pag_scale") {
        if v > 0.0 {
            g.pag_scale = v;
        }
    }
    g
}

fn request(fx: &Fixture, pipe: &StableDiffusionPipeline) -> GenerateRequest {
    let d = pipe.defaults();
    GenerateRequest {
        prompt: fx.m("prompt").to_string(),
        negative_prompt: Some(fx.m("negative_prompt").to_string()),
        guidance: guidance_of(fx, d.guidance),
        steps: fx.m("steps").parse().unwrap(),
        height: fx.m("height").parse().unwrap(),
        width: fx.m("width").parse().unwrap(),
        guidance_scale: fx.f("guidance_scale"),
        max_sequence_length: 77,
        seed: 0,
        init_latents: Some(fx.t("init_latents").clone()),
        sampler: Default::default(),
    }
}

fn check(model: &str, case: &str) {
    let fx = Fixture::load("unet", &format!("pipeline_{model}_{case}.safetensors"));
    let pipe = load(model);
    let applied: Vec<String> = serde_json::from_str(fx.m("pag_applied_layers")).unwrap();
    pipe.set_pag_layers(&applied).unwrap();
    assert_eq!(pipe.scheduler().class_name(), fx.m("scheduler"));
    let req = request(&fx, &pipe);
    let mut steps = Vec::new();
    let mut guided = Vec::new();
    let latents = pipe
        .generate_latents(&req, &mut |e| {
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
    let warnings = pipe.take_warnings();
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
    let pos = pipe.encode_prompt(fx.m("prompt"), true, "prompt").unwrap();
    let neg = pipe.encode_prompt(fx.m("negative_prompt"), true, "negative prompt").unwrap();
    let vsf = pipe.encode_prompt(fx.m("negative_prompt"), false, "negative prompt").unwrap();
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
        veto::pipelines::load(&ModelSource::local(fixtures("unet").join("sdxl")).unwrap(), &Device::Cpu, DType::F32)
            .unwrap();
    let d = sdxl.defaults();
    assert_eq!((d.steps, d.guidance_scale, d.height, d.width), (25, 5.0, 64, 64));
    assert_eq!(d.guidance.method, Method::CFG_NAG);
    assert_eq!((d.guidance.nag.scale, d.guidance.nag.tau, d.guidance.nag.alpha), (3.0, 2.5, 0.5));
    let sd15 = load("sd15");
    assert_eq!(sd15.family(), Family::StableDiffusion);
    let d = sd15.defaults();
    assert_eq!((d.steps, d.guidance_scale, d.guidance.nag.alpha), (25, 7.5, 0.375));
}

fn base_request(pipe: &StableDiffusionPipeline) -> GenerateRequest {
    let d = pipe.defaults();
    GenerateRequest {
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
        sampler: Default::default(),
    }
}

#[test]
fn height_not_a_multiple_of_8_is_rejected() {
    let pipe = load("sdxl");
    let mut req = base_request(&pipe);
    req.height = 60;
    let err = pipe.validate(&req).unwrap_err().to_string();
    assert!(err.contains("--height") && err.contains("multiples of 8") && err.contains("60x64"), "{err}");
    assert!(pipe.generate_latents(&req, &mut |_| {}).is_err());
}

#[test]
fn bad_guidance_for_the_family_is_rejected() {
    let pipe = load("sd15");
    let mut req = base_request(&pipe);
    req.guidance.method = Method::VSF;
    req.guidance.vsf.layout = VsfLayout::Official;
    let err = pipe.validate(&req).unwrap_err().to_string();
    assert!(err.contains("vsf-layout"), "{err}");
    let err = "cfg+magic".parse::<Method>().unwrap_err().to_string();
    assert!(err.contains("magic"), "{err}");
    let mut req = base_request(&pipe);
    req.guidance.method = "pag".parse().unwrap();
    pipe.set_pag_layers(&["mid".into()]).unwrap();
    assert!(pipe.set_pag_layers(&["nowhere".into()]).is_err());
    // The default layers still apply after a failed change.
    pipe.generate_latents(&req, &mut |_| {}).unwrap();
    let mut req = base_request(&pipe);
    req.init_latents = Some(Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap());
    assert!(pipe.validate(&req).unwrap_err().to_string().contains("init latents"));
}

#[test]
fn unknown_scheduler_in_the_folder_is_a_clear_error() {
    // A copy of the SD1.5 folder with the real SD1.5 PNDM scheduler config.
    let dir = std::env::temp_dir().join(format!("veto-unet-pndm-{}", std::process::id()));
    copy_dir(&fixtures("unet").join("sd15"), &dir);
    std::fs::copy(fixtures("unet").join("schedulers/sd15_pndm.json"), dir.join("scheduler/scheduler_config.json"))
        .unwrap();
    let source = ModelSource::local(&dir).unwrap();
    let err = match StableDiffusionPipeline::load(&source, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("PNDM loaded"),
        Err(e) => e.to_string(),
    };
    std::fs::remove_dir_all(&dir).ok();
    assert!(err.contains("PNDMScheduler") && err.contains("DPMSolverMultistepScheduler"), "{err}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn seeded_runs_are_reproducible_and_lcm_timesteps_can_be_set() {
    let pipe = load("sdxl");
    let mut req = base_request(&pipe);
    req.guidance.method = Method::NAG;
    req.guidance_scale = 0.0;
    let a = pipe.generate_latents(&req, &mut |_| {}).unwrap();
    let b = pipe.generate_latents(&req, &mut |_| {}).unwrap();
    assert_close("seeded", &a, &b, 0.0);
    pipe.set_timesteps(Some(vec![999.0, 499.0]));
    let mut seen = Vec::new();
    pipe.generate_latents(&req, &mut |e| seen.push(e.timestep)).unwrap();
    assert_eq!(seen, [999.0, 499.0]);
    pipe.set_timesteps(None);
}
