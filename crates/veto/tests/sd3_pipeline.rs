//! Parity of the whole SD3 / SD3.5 pipeline (text -> latents -> image) with the PyTorch
//! reference (tests/fixtures/sd3/README.md): the text conditioning, every step's latents, the
//! final latents and the decoded image, for each guidance method; plus bad requests.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, request_of, Fixture};
use veto::families::SD3;
use veto::guidance::{AttentionGuidance, CfgScaleSource, GuidanceConfig, Method, NegativeContext};
use veto::loading::model_source::ModelSource;
use veto::models::mmdit::MmditInputs;
use veto::pipelines::sd3::Sd3Pipeline;
use veto::pipelines::{TextToImage, Warnings};
use veto::{ResolvedRequest, StepEvent};

fn pipeline(model: &str) -> Sd3Pipeline {
    let dir = fixtures("sd3").join(model);
    let source = ModelSource::resolve(dir.to_str().unwrap()).unwrap();
    Sd3Pipeline::load(&source, &Device::Cpu, DType::F32).unwrap()
}

fn request(fx: &Fixture) -> ResolvedRequest {
    let mut r = request_of(fx, GuidanceConfig::nag_default(), 256);
    // The reference's `none` runs ignore the negative prompt; we would warn about it.
    if fx.m("guidance") == "none" {
        r.negative_prompt = None;
    }
    r
}

fn generate(
    pipe: &Sd3Pipeline,
    req: &ResolvedRequest,
    on_step: &mut dyn FnMut(StepEvent),
) -> veto::Result<(Tensor, Vec<String>)> {
    common::generate(pipe, &SD3, req, on_step)
}

fn validate(pipe: &Sd3Pipeline, req: &ResolvedRequest) -> veto::Result<()> {
    common::validate(pipe, &SD3, req)
}

/// SD3's CFG scale rule (the family's source: `guidance_scale`).
fn cfg_scale(req: &ResolvedRequest) -> Option<f64> {
    req.guidance.cfg_scale(CfgScaleSource::GuidanceScale, req.guidance_scale)
}

fn check(model: &str, case: &str) {
    let fx = Fixture::load("sd3", &format!("pipeline_{model}_{case}.safetensors"));
    let pipe = pipeline(model);
    let req = request(&fx);
    validate(&pipe, &req).unwrap();
    let mut steps = Vec::new();
    let mut timesteps = Vec::new();
    let (latents, warnings) = generate(&pipe, &req, &mut |e| {
        steps.push(e.latents.clone());
        timesteps.push(e.timestep as f32);
    })
    .unwrap();
    let want_t = fx.t("timesteps").to_vec1::<f32>().unwrap();
    assert_eq!(timesteps, want_t, "{model}/{case}: timesteps");
    for (k, s) in steps.iter().enumerate() {
        assert_close(&format!("{model}/{case}/step_{k}"), s, fx.t(&format!("step_{k}_latents")), 1e-4);
    }
    assert_close(&format!("{model}/{case}/final"), &latents, fx.t("final_latents"), 1e-4);
    if let Some(image) = fx.get("image") {
        let decoded = pipe.decode(&latents).unwrap();
        assert_close(&format!("{model}/{case}/image"), &decoded, image, 1e-4);
    }
    assert!(warnings.is_empty(), "{model}/{case}: unexpected warnings {warnings:?}");
}

#[test]
fn large_none() {
    check("large", "none");
}
#[test]
fn large_nag() {
    check("large", "nag");
}
#[test]
fn large_cfg() {
    check("large", "cfg");
}
#[test]
fn large_cfg_nag() {
    check("large", "cfg_nag");
}
#[test]
fn large_vsf_paper() {
    check("large", "vsf_paper");
}
#[test]
fn large_vsf_official() {
    check("large", "vsf_official");
}
#[test]
fn large_nasa() {
    check("large", "nasa");
}
#[test]
fn medium_none() {
    check("medium", "none");
}
#[test]
fn medium_nag() {
    check("medium", "nag");
}
#[test]
fn medium_vsf_paper() {
    check("medium", "vsf_paper");
}

#[test]
fn text_conditioning_matches_diffusers() {
    let fx = Fixture::load("sd3", "text.safetensors");
    let pipe = pipeline("large");
    let msl: usize = fx.m("max_sequence_length").parse().unwrap();
    let w = &mut Warnings::default();
    let pos = pipe.encode_prompt(fx.m("prompt"), msl, true, "prompt", w).unwrap();
    assert_close("prompt_embeds", &pos.embeds, fx.t("prompt_embeds"), 1e-4);
    assert_close("pooled", &pos.pooled, fx.t("pooled"), 1e-4);
    let neg = pipe.encode_prompt(fx.m("negative_prompt"), msl, true, "negative prompt", w).unwrap();
    assert_close("neg_prompt_embeds", &neg.embeds, fx.t("neg_prompt_embeds"), 1e-4);
    assert_close("neg_pooled", &neg.pooled, fx.t("neg_pooled"), 1e-4);
    let vsf = pipe.encode_prompt(fx.m("negative_prompt"), msl, false, "negative prompt", w).unwrap();
    assert_eq!(vsf.embeds.dims(), fx.t("vsf_neg_prompt_embeds").dims());
    assert_close("vsf_neg_prompt_embeds", &vsf.embeds, fx.t("vsf_neg_prompt_embeds"), 1e-4);
    assert_eq!(w, &Warnings::default());
}

fn base_request() -> ResolvedRequest {
    request(&Fixture::load("sd3", "pipeline_large_nag.safetensors"))
}

#[test]
fn long_negative_prompt_is_truncated_with_a_warning() {
    let pipe = pipeline("large");
    let long = "blurry ".repeat(100);
    for method in [Method::NAG, Method::VSF] {
        let mut r = base_request();
        r.negative_prompt = Some(long.clone());
        r.guidance.method = method;
        r.steps = 1;
        let (latents, w) = generate(&pipe, &r, &mut |_| {}).unwrap();
        assert_eq!(latents.dims(), &[1, 16, 8, 8]);
        assert!(
            w.iter().any(|m| m.contains("negative prompt") && m.contains("CLIP") && m.contains("truncated")),
            "{method}: {w:?}"
        );
        assert!(w.iter().any(|m| m.contains("negative prompt") && m.contains("T5")), "{method}: {w:?}");
    }
    // The unpadded VSF negative is cut to the encoders' limits: 77 CLIP + 16 T5 rows.
    let vsf = pipe.encode_prompt(&long, 16, false, "negative prompt", &mut Warnings::default()).unwrap();
    assert_eq!(vsf.embeds.dims(), &[1, 77 + 16, 32]);
}

#[test]
fn bad_requests_are_errors() {
    let pipe = pipeline("large");
    let base = base_request();

    let mut r = base.clone();
    r.height = 72;
    let e = validate(&pipe, &r).unwrap_err().to_string();
    assert!(e.starts_with("height:") && e.contains("multiples of 16"), "{e}");

    let mut r = base.clone();
    r.width = 16 * 17; // 17 patches > pos_embed_max_size 16
    let e = validate(&pipe, &r).unwrap_err().to_string();
    assert!(e.starts_with("width:") && e.contains("pos_embed_max_size"), "{e}");

    let mut r = base.clone();
    r.guidance.method = "cfg+pag".parse().unwrap();
    let e = validate(&pipe, &r).unwrap_err().to_string();
    assert!(e.contains("not available for SD3"), "{e}");

    let mut r = base.clone();
    r.max_sequence_length = 513;
    assert!(validate(&pipe, &r).unwrap_err().to_string().starts_with("max_sequence_length:"));

    let mut r = base.clone();
    r.guidance.nag.tau = 0.0;
    assert!(r.guidance.validate().unwrap_err().to_string().contains("nag_tau"));

    let mut r = base.clone();
    r.init_latents = Some(Tensor::zeros((1, 16, 4, 4), DType::F32, &Device::Cpu).unwrap());
    let e = generate(&pipe, &r, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("init latents have shape [1, 16, 4, 4]"), "{e}");
}

#[test]
fn guidance_scale_rules_and_warnings() {
    let pipe = pipeline("large");
    let mut r = base_request();
    r.steps = 1;
    // cfg asked with guidance_scale <= 1: no CFG, warned; equals the plain run.
    r.guidance.method = Method::CFG;
    r.guidance_scale = 1.0;
    assert_eq!(cfg_scale(&r), None);
    let (a, w) = generate(&pipe, &r, &mut |_| {}).unwrap();
    assert!(w.iter().any(|w| w.contains("CFG runs only above 1")));
    r.guidance.method = Method::NONE;
    r.negative_prompt = None;
    let (b, _) = generate(&pipe, &r, &mut |_| {}).unwrap();
    assert_close("cfg at scale 1 == none", &a, &b, 0.0);
    // guidance_scale > 1 without cfg: ignored, warned. true_cfg_scale never matters for SD3.
    r.guidance_scale = 3.0;
    r.guidance.true_cfg_scale = 9.0;
    let (c, w) = generate(&pipe, &r, &mut |_| {}).unwrap();
    assert_close("no cfg in the method", &c, &b, 0.0);
    assert!(w.iter().any(|w| w.contains("has no effect")));
    r.guidance.method = Method::CFG;
    assert_eq!(cfg_scale(&r), Some(3.0));
}

#[test]
fn cfg_with_vsf_runs_and_differs_from_each_alone() {
    // CFG + VSF runs the uncond pass separately (VSF lengthens the cond context).
    let pipe = pipeline("large");
    let fx = Fixture::load("sd3", "pipeline_large_vsf_paper.safetensors");
    let mut r = request(&fx);
    r.steps = 1;
    let (vsf, _) = generate(&pipe, &r, &mut |_| {}).unwrap();
    r.guidance.method = "cfg+vsf".parse().unwrap();
    r.guidance_scale = 2.0;
    let (both, w) = generate(&pipe, &r, &mut |_| {}).unwrap();
    assert!(common::rel_diff(&both, &vsf) > 1e-3);
    assert!(w.is_empty(), "{w:?}");

    // By hand: one step from sigma 1 to 0 is x - v, v = v_neg + 2 (v_vsf - v_neg).
    let msl = r.max_sequence_length;
    let neg_text = r.negative_prompt.clone().unwrap();
    let w = &mut Warnings::default();
    let pos = pipe.encode_prompt(&r.prompt, msl, true, "prompt", w).unwrap();
    let neg = pipe.encode_prompt(&neg_text, msl, true, "negative prompt", w).unwrap();
    let vsf_neg = pipe.encode_prompt(&neg_text, msl, false, "negative prompt", w).unwrap();
    let x = fx.t("init_latents");
    let t = Tensor::new(&[1000f32], &Device::Cpu).unwrap();
    let call = |text: &veto::pipelines::sd3::Sd3Text, guidance| {
        pipe.transformer()
            .unwrap()
            .forward(&MmditInputs { latents: x, timestep: &t, context: &text.embeds, pooled: &text.pooled, guidance })
            .unwrap()
    };
    let method = AttentionGuidance::Vsf(r.guidance.vsf);
    let vsf_context = NegativeContext { method: &method, states: &vsf_neg.embeds, pooled: None, rows: 0..1 };
    let v_vsf = call(&pos, Some(&vsf_context));
    let v_neg = call(&neg, None);
    let v = (&v_neg + ((&v_vsf - &v_neg).unwrap() * 2.0).unwrap()).unwrap();
    assert_close("cfg+vsf by hand", &both, &(x - v).unwrap(), 1e-5);
}

#[test]
fn nag_end_turns_guidance_off_late() {
    let pipe = pipeline("large");
    let mut r = base_request();
    r.guidance.nag_end = 0.0; // only t = 1000 is guided
    let mut guided = Vec::new();
    generate(&pipe, &r, &mut |e| guided.push(e.attention_guided)).unwrap();
    assert_eq!(guided, vec![true, false, false, false]);
}

#[test]
fn defaults_follow_the_model() {
    let pipe = pipeline("large");
    assert!(!pipe.is_turbo(), "the fixture folder is not named turbo");
    let d = pipe.defaults();
    assert_eq!((d.steps, d.guidance_scale, d.max_sequence_length), (28, 3.5, 256));
    assert_eq!((d.height, d.width), (64, 64)); // sample_size 8 x VAE factor 8
    assert_eq!(pipeline("medium").defaults().steps, 40);
}
