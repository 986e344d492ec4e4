//! Wan2.1 parity: the tiny T2V and I2V `WanTransformer3DModel`s of
//! `tools/reference/wan_reference.py` per block and on the output, with no guidance and with the
//! official NAG / NASA / CFG+NAG / VSF cross-attention semantics; the transformer driven by the
//! UniPC flow scheduler step by step (none, CFG, NAG, CFG+NAG, NASA, VSF, the NAG window); and
//! the scheduler alone.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, guidance_of, guide_of, Fixture};
use veto::guidance::{CfgScaleSource, GuidanceConfig, GuidancePlanner, NegativeContext, StepWindow};
use veto::loading::weights::ComponentWeights;
use veto::models::wan::{WanConfig, WanInputs, WanTransformer3DModel};
use veto::pipelines::wan::{denoise, i2v_condition, vsf_context, WanConditioning, WanPipeline, WanRequest};
use veto::schedulers::scheduler::{NoNoise, Scheduler};
use veto::schedulers::unipc::UniPcMultistepScheduler;

const TOL: f32 = 1e-4;

fn model(kind: &str) -> WanTransformer3DModel {
    let dir = fixtures("wan").join(kind).join("transformer");
    let config = WanConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = ComponentWeights::from_dir(&dir, "diffusion_pytorch_model", "transformer").unwrap();
    WanTransformer3DModel::load(&config, &weights, DType::F32, &Device::Cpu).unwrap()
}

fn scheduler() -> UniPcMultistepScheduler {
    let path = fixtures("wan").join("t2v/scheduler/scheduler_config.json");
    UniPcMultistepScheduler::from_value(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()).unwrap()
}

fn rows(t: &Tensor, start: usize, len: usize) -> Tensor {
    t.narrow(0, start, len).unwrap()
}

fn cat0(a: &Tensor, b: &Tensor) -> Tensor {
    Tensor::cat(&[a, b], 0).unwrap()
}

/// Compare the traced blocks and output of `rows` of our batch with the fixture's `prefix` ones.
fn check(fx: &Fixture, prefix: &str, out: &Tensor, trace: &[Tensor], row: usize) {
    for (i, got) in trace.iter().enumerate() {
        let want = fx.t(&format!("{prefix}block_{i}"));
        assert_close(&format!("{} {prefix}block {i}", fx.name), &rows(got, row, 1), want, TOL);
    }
    assert_close(&format!("{} {prefix}output", fx.name), &rows(out, row, 1), fx.t(&format!("{prefix}output")), TOL);
}

fn transformer_case(kind: &str, case: &str) {
    let m = model(kind);
    let fx = Fixture::load("wan", &format!("transformer_{kind}_{case}.safetensors"));
    let (latents, context, negative) = (fx.t("latents"), fx.t("context"), fx.t("negative"));
    let image = fx.get("image");
    let timestep = fx.f("timestep");
    let method = guide_of(&fx);
    let mut trace = Vec::new();
    match case {
        "none" | "nag" | "nasa" | "vsf" => {
            // VSF: the positive padded to L - n rows, the negative unpadded (its n real rows).
            let n = fx.f("neg_tokens") as usize;
            let (context, negative) = if case == "vsf" {
                let l = context.dim(1).unwrap();
                (context.narrow(1, 0, l - n).unwrap(), negative.narrow(1, 0, n).unwrap())
            } else {
                (context.clone(), negative.clone())
            };
            let neg =
                method.as_ref().map(|method| NegativeContext { method, states: &negative, pooled: None, rows: 0..1 });
            let inputs = WanInputs { latents, timestep, context: &context, image, guidance: neg.as_ref() };
            let out = m.forward_traced(&inputs, Some(&mut trace)).unwrap();
            check(&fx, "", &out, &trace, 0);
        }
        "cfg_nag" => {
            // Batched [uncond, cond]: the uncond row plain over the negative prompt, the cond row
            // with NAG against the same negative.
            let method = method.unwrap();
            let neg = NegativeContext { method: &method, states: negative, pooled: None, rows: 1..2 };
            let batch_latents = cat0(latents, latents);
            let batch_context = cat0(negative, context);
            let inputs =
                WanInputs { latents: &batch_latents, timestep, context: &batch_context, image, guidance: Some(&neg) };
            let out = m.forward_traced(&inputs, Some(&mut trace)).unwrap();
            check(&fx, "uncond_", &out, &trace, 0);
            check(&fx, "cond_", &out, &trace, 1);
        }
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn t2v_transformer_none() {
    transformer_case("t2v", "none");
}

#[test]
fn t2v_transformer_nag() {
    transformer_case("t2v", "nag");
}

#[test]
fn t2v_transformer_nasa() {
    transformer_case("t2v", "nasa");
}

#[test]
fn t2v_transformer_vsf() {
    transformer_case("t2v", "vsf");
}

#[test]
fn t2v_transformer_cfg_nag_batched() {
    transformer_case("t2v", "cfg_nag");
}

#[test]
fn i2v_transformer_none() {
    transformer_case("i2v", "none");
}

#[test]
fn i2v_transformer_nag() {
    transformer_case("i2v", "nag");
}

#[test]
fn i2v_transformer_nasa() {
    transformer_case("i2v", "nasa");
}

#[test]
fn i2v_transformer_vsf() {
    transformer_case("i2v", "vsf");
}

#[test]
fn i2v_transformer_cfg_nag_batched() {
    transformer_case("i2v", "cfg_nag");
}

/// Latents that stop being finite end the loop at that step with the step and the method named:
/// no step is reported and no NaN reaches a file.
#[test]
fn non_finite_latents_stop_the_loop_at_their_step() {
    let m = model("t2v");
    let fx = Fixture::load("wan", "sampler_nag.safetensors");
    let config = guidance_of(&fx, GuidanceConfig::nag_default());
    let scale = fx.f("guidance_scale");
    let mut planner =
        GuidancePlanner::new(&config, CfgScaleSource::GuidanceScale, scale, StepWindow::Threshold, 1000.0);
    let mut sched = scheduler();
    sched.set_timesteps(fx.f("steps") as usize).unwrap();
    let cond = WanConditioning {
        positive: fx.t("context").clone(),
        uncond: None,
        negative: Some(fx.t("negative").clone()),
        image: None,
        condition: None,
    };
    let nan = (fx.t("init_latents") * f64::NAN).unwrap();
    let mut reported = 0;
    let err = denoise(&m, &mut sched, &mut planner, (&config, scale), &cond, nan, &mut |_| reported += 1).unwrap_err();
    assert_eq!(reported, 0);
    match err {
        veto::Error::NonFinite { step, method, .. } => assert!(step == 1 && method == "nag", "step {step}, {method}"),
        other => panic!("expected NonFinite, got {other}"),
    }
}

/// WanPipeline's denoising loop ([`denoise`]) on the transformer: UniPC flow, CFG as one batch
/// `[uncond, cond]`, attention guidance on the cond row while the official window is open.
fn sampler_case(case: &str) {
    let m = model("t2v");
    let fx = Fixture::load("wan", &format!("sampler_{case}.safetensors"));
    let config = guidance_of(&fx, GuidanceConfig::nag_default());
    let mut planner = GuidancePlanner::new(
        &config,
        CfgScaleSource::GuidanceScale,
        fx.f("guidance_scale"),
        StepWindow::Threshold,
        1000.0,
    );
    let mut sched = scheduler();
    let steps = fx.f("steps") as usize;
    sched.set_timesteps(steps).unwrap();
    let want_t: Vec<f32> = fx.t("timesteps").to_vec1().unwrap();
    assert_eq!(sched.timesteps().iter().map(|&t| t as f32).collect::<Vec<_>>(), want_t);
    let (mut context, mut negative) = (fx.t("context").clone(), fx.t("negative").clone());
    if config.uses_vsf() {
        let n = fx.f("neg_tokens") as usize;
        negative = negative.narrow(1, 0, n).unwrap();
        context = vsf_context(&context, &negative).unwrap();
    }
    let cond = WanConditioning {
        positive: context,
        uncond: config.method.cfg.then(|| fx.t("negative").clone()),
        negative: config.method.attention.is_some().then_some(negative),
        image: None,
        condition: None,
    };
    let mut i = 0;
    let mut check_step = |e: veto::pipelines::StepEvent| {
        assert_close(&format!("{} step {}", fx.name, e.index), e.latents, fx.t(&format!("step_{}", e.index)), TOL);
        i += 1;
    };
    let guidance = (&config, fx.f("guidance_scale"));
    let latents =
        denoise(&m, &mut sched, &mut planner, guidance, &cond, fx.t("init_latents").clone(), &mut check_step).unwrap();
    assert_eq!(i, steps);
    assert_close(&format!("{} final", fx.name), &latents, fx.t("final"), TOL);
}

#[test]
fn sampler_none() {
    sampler_case("none");
}

#[test]
fn sampler_cfg() {
    sampler_case("cfg");
}

#[test]
fn sampler_nag() {
    sampler_case("nag");
}

#[test]
fn sampler_cfg_nag() {
    sampler_case("cfg_nag");
}

#[test]
fn sampler_nasa() {
    sampler_case("nasa");
}

#[test]
fn sampler_vsf() {
    sampler_case("vsf");
}

#[test]
fn sampler_nag_end() {
    sampler_case("nag_end");
}

/// diffusers' UniPCMultistepScheduler with Wan's config: sigmas, integer timesteps and every
/// step for fixed model outputs; also with a `flow_shift` override and order 1.
#[test]
fn unipc_flow_matches_diffusers() {
    let fx = Fixture::load("wan", "unipc_flow.safetensors");
    let base: serde_json::Value = serde_json::from_str(fx.m("scheduler_config")).unwrap();
    for case in fx.m("cases").split(',') {
        let (name, steps) = case.split_once(':').unwrap();
        let steps: usize = steps.parse().unwrap();
        let mut json = base.clone();
        match name {
            "shift5" => json["flow_shift"] = serde_json::json!(5.0),
            "order1" => json["solver_order"] = serde_json::json!(1),
            _ => {}
        }
        let mut s = UniPcMultistepScheduler::from_value(json).unwrap();
        s.set_timesteps(steps).unwrap();
        let want_t: Vec<f32> = fx.t(&format!("{name}_timesteps")).to_vec1().unwrap();
        assert_eq!(s.timesteps().iter().map(|&t| t as f32).collect::<Vec<_>>(), want_t, "{name} timesteps");
        let want_s: Vec<f32> = fx.t(&format!("{name}_sigmas")).to_vec1().unwrap();
        let got_s: Vec<f32> = s.sigmas().unwrap().iter().map(|&x| x as f32).collect();
        assert_eq!(got_s, want_s, "{name} sigmas");
        let mut sample = fx.t(&format!("{name}_sample_0")).clone();
        for i in 0..steps {
            sample = s.step(fx.t(&format!("{name}_output_{i}")), &sample, &mut NoNoise).unwrap();
            assert_close(&format!("{name} step {i}"), &sample, fx.t(&format!("{name}_sample_{}", i + 1)), 1e-5);
        }
    }
}

#[test]
fn config_errors_name_the_problem() {
    let dir = fixtures("wan").join("t2v/transformer");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    json["qk_norm"] = serde_json::json!("rms_norm");
    let tmp = std::env::temp_dir().join(format!("veto-wan-config-{}.json", std::process::id()));
    std::fs::write(&tmp, json.to_string()).unwrap();
    let err = WanConfig::from_file(&tmp).unwrap_err().to_string();
    std::fs::remove_file(&tmp).ok();
    assert!(err.contains("qk_norm"), "{err}");
}

#[test]
fn transformer_rejects_mismatched_inputs() {
    let m = model("t2v");
    let fx = Fixture::load("wan", "transformer_t2v_none.safetensors");
    let (latents, context) = (fx.t("latents"), fx.t("context"));
    // An image for a T2V model.
    let image = Tensor::zeros((1, 3, 20), DType::F32, &Device::Cpu).unwrap();
    let inputs = WanInputs { latents, timestep: 500.0, context, image: Some(&image), guidance: None };
    assert!(m.forward(&inputs).unwrap_err().to_string().contains("text-to-video"));
    // An odd latent height.
    let odd = latents.narrow(3, 0, 3).unwrap();
    let inputs = WanInputs { latents: &odd, timestep: 500.0, context, image: None, guidance: None };
    assert!(m.forward(&inputs).unwrap_err().to_string().contains("patches"));
    // The I2V model without its image.
    let i2v = model("i2v");
    let fx = Fixture::load("wan", "transformer_i2v_none.safetensors");
    let inputs =
        WanInputs { latents: fx.t("latents"), timestep: 500.0, context: fx.t("context"), image: None, guidance: None };
    assert!(i2v.forward(&inputs).unwrap_err().to_string().contains("CLIP image"));
}

/// A tiny pipeline folder: the transformer and scheduler of `tests/fixtures/wan/<folder>` with
/// wan-parts' `parts` (copied into a temporary folder, loaded, removed).
fn load_pipeline(folder: &str, parts: &[&str]) -> WanPipeline {
    load_pipeline_with(folder, parts, None)
}

/// As [`load_pipeline`], with `scheduler/scheduler_config.json` replaced when given.
fn load_pipeline_with(folder: &str, parts: &[&str], scheduler: Option<&str>) -> WanPipeline {
    let tag = if scheduler.is_some() { "-sched" } else { "" };
    let dir = std::env::temp_dir().join(format!("veto-wan-{folder}{tag}-{}", std::process::id()));
    common::copy_dir(&fixtures("wan").join(folder), &dir);
    for part in parts {
        common::copy_dir(&fixtures("wan_parts").join("wan").join(part), &dir.join(part));
    }
    if let Some(config) = scheduler {
        std::fs::write(dir.join("scheduler/scheduler_config.json"), config).unwrap();
    }
    let pipe = WanPipeline::load(&dir, &Device::Cpu, DType::F32).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    pipe
}

/// The tiny T2V pipeline: tokenizer, UMT5 and VAE from wan-parts.
fn pipeline() -> &'static WanPipeline {
    static PIPE: std::sync::OnceLock<WanPipeline> = std::sync::OnceLock::new();
    PIPE.get_or_init(|| load_pipeline("pipeline", &["tokenizer", "text_encoder", "vae"]))
}

/// The tiny I2V pipeline (`WanImageToVideoPipeline` folder): plus CLIP vision and its processor.
fn i2v_pipeline() -> &'static WanPipeline {
    static PIPE: std::sync::OnceLock<WanPipeline> = std::sync::OnceLock::new();
    PIPE.get_or_init(|| {
        load_pipeline("pipeline_i2v", &["tokenizer", "text_encoder", "vae", "image_encoder", "image_processor"])
    })
}

/// The PNG the I2V fixtures start from (41 x 57, not the video's size).
fn i2v_input() -> image::RgbImage {
    image::open(fixtures("wan").join("i2v_input.png")).unwrap().to_rgb8()
}

/// diffusers' WanPipeline (none, CFG) and its loop with the official NAG / VSF processors, from
/// the prompt (tokenizer, UMT5, 512 padded rows) to the final latents and, for `none`, the video.
fn pipeline_case(case: &str) {
    run_pipeline_case(pipeline(), &format!("pipeline_{case}.safetensors"), None);
}

/// One pipeline fixture: every step's latents and the final ones (and the video if recorded).
fn run_pipeline_case(pipe: &WanPipeline, file: &str, image: Option<image::RgbImage>) {
    let fx = Fixture::load("wan", file);
    let mut req = WanRequest::new(fx.m("prompt"));
    req.image = image;
    req.negative_prompt = Some(fx.m("negative_prompt").to_string());
    req.guidance = guidance_of(&fx, req.guidance.clone());
    req.steps = fx.f("steps") as usize;
    req.height = fx.f("height") as usize;
    req.width = fx.f("width") as usize;
    req.frames = fx.f("frames") as usize;
    req.guidance_scale = fx.f("guidance_scale");
    req.max_sequence_length = fx.f("max_sequence_length") as usize;
    req.init_latents = Some(fx.t("init_latents").clone());
    let mut warnings = veto::pipelines::Warnings::default();
    let mut n = 0;
    let out = pipe
        .generate_latents(
            &req,
            &mut |e| {
                assert_close(
                    &format!("{} step {}", fx.name, e.index),
                    e.latents,
                    fx.t(&format!("step_{}", e.index)),
                    TOL,
                );
                n += 1;
            },
            &mut warnings,
        )
        .unwrap();
    assert_eq!(n, req.steps);
    assert_close(&format!("{} final", fx.name), &out.latents, fx.t("final"), TOL);
    if let Some(video) = fx.get("video") {
        assert_close(&format!("{} video", fx.name), &pipe.decode(&out.latents).unwrap(), video, TOL);
    }
    assert!(warnings.into_vec().is_empty());
}

#[test]
fn pipeline_none_and_video() {
    pipeline_case("none");
}

#[test]
fn pipeline_cfg() {
    pipeline_case("cfg");
}

#[test]
fn pipeline_nag() {
    pipeline_case("nag");
}

#[test]
fn pipeline_cfg_nag() {
    pipeline_case("cfg_nag");
}

#[test]
fn pipeline_vsf() {
    pipeline_case("vsf");
}

/// The stock WanPipeline with FlowMatchEulerDiscreteScheduler (shift 5) in the folder instead of
/// UniPC, CFG: the scheduler is chosen by the config's class.
#[test]
fn pipeline_flowmatch_cfg() {
    let fx = Fixture::load("wan", "pipeline_flowmatch_cfg.safetensors");
    let pipe = load_pipeline_with("pipeline", &["tokenizer", "text_encoder", "vae"], Some(fx.m("scheduler_config")));
    run_pipeline_case(&pipe, "pipeline_flowmatch_cfg.safetensors", None);
}

/// An unguided one-step, 5-frame request of `height x width`: the inputs the checks look at.
fn one_step_request(prompt: &str, height: usize, width: usize) -> WanRequest {
    let mut req = WanRequest::new(prompt);
    req.guidance.method = veto::Method::NONE;
    req.steps = 1;
    req.height = height;
    req.width = width;
    req.frames = 5;
    req
}

#[test]
fn pipeline_rejects_bad_sizes_and_rounds_frames() {
    let pipe = pipeline();
    let mut req = one_step_request("a fox", 40, 48);
    let mut warnings = veto::pipelines::Warnings::default();
    let err = pipe.generate_latents(&req, &mut |_| {}, &mut warnings).unwrap_err().to_string();
    assert!(err.contains("multiples of 16"), "{err}");
    req.height = 32;
    req.frames = 6;
    let out = pipe.generate_latents(&req, &mut |_| {}, &mut warnings).unwrap();
    assert_eq!(out.latents.dims(), &[1, 4, 2, 4, 6]);
    assert!(warnings.into_vec()[0].contains("rounded to 5"));
}

/// diffusers' WanImageToVideoPipeline (none, CFG) and its loop with the official NAG / VSF
/// processors, from a PNG of another size (Lanczos to the video size for the VAE condition, the
/// CLIP image processor for the image tokens) to the final latents.
fn i2v_pipeline_case(case: &str) {
    run_pipeline_case(i2v_pipeline(), &format!("pipeline_i2v_{case}.safetensors"), Some(i2v_input()));
}

#[test]
fn i2v_pipeline_none() {
    i2v_pipeline_case("none");
}

#[test]
fn i2v_pipeline_cfg() {
    i2v_pipeline_case("cfg");
}

#[test]
fn i2v_pipeline_nag() {
    i2v_pipeline_case("nag");
}

#[test]
fn i2v_pipeline_cfg_nag() {
    i2v_pipeline_case("cfg_nag");
}

#[test]
fn i2v_pipeline_vsf() {
    i2v_pipeline_case("vsf");
}

/// diffusers' `video_processor.preprocess` of the PIL image (Pillow Lanczos to 48 x 32): the
/// same 8-bit pixels, so the same values.
#[test]
fn i2v_first_frame_is_pillow_lanczos() {
    let fx = Fixture::load("wan", "pipeline_i2v_none.safetensors");
    let got = veto::pipelines::wan::first_frame_pixels(&i2v_input(), 48, 32, &Device::Cpu).unwrap();
    assert_close("resized first frame", &got, fx.t("resized_image"), 1e-6);
}

#[test]
fn i2v_and_t2v_refuse_the_wrong_inputs() {
    let mut req = one_step_request("a cat", 32, 48);
    let mut warnings = veto::pipelines::Warnings::default();
    let err = i2v_pipeline().generate_latents(&req, &mut |_| {}, &mut warnings).unwrap_err().to_string();
    assert!(err.contains("needs an input image"), "{err}");
    req.image = Some(i2v_input());
    let err = pipeline().generate_latents(&req, &mut |_| {}, &mut warnings).unwrap_err().to_string();
    assert!(err.contains("text-to-video model takes no input image"), "{err}");
    let out = i2v_pipeline().generate_latents(&req, &mut |_| {}, &mut warnings).unwrap();
    assert_eq!(out.latents.dims(), &[1, 4, 2, 4, 6]);
}

/// `WanImageToVideoPipeline.prepare_latents`' conditioning channels: the first-frame mask and the
/// normalized VAE latents of `[image, 0, 0, 0, 0]`, on wan-parts' tiny VAE.
#[test]
fn i2v_condition_matches_diffusers() {
    let fx = Fixture::load("wan", "i2v_condition.safetensors");
    let dir = fixtures("wan_parts").join("wan/vae");
    let weights = ComponentWeights::from_dir(&dir, "diffusion_pytorch_model", "vae").unwrap();
    let vae = veto::models::wan_vae::AutoencoderKlWan::load_weights(&weights, &Device::Cpu, DType::F32).unwrap();
    let got = i2v_condition(&vae, fx.t("image"), fx.f("frames") as usize).unwrap();
    assert_close("i2v condition", &got, fx.t("condition"), TOL);
}
