//! Shared helpers of the parity tests: fixture paths, safetensors with metadata, tolerances.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures(family: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(family)
}

/// A fixture file: its tensors and its string metadata.
pub struct Fixture {
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, String>,
    pub name: String,
}

impl Fixture {
    pub fn load(family: &str, file: &str) -> Fixture {
        let path = fixtures(family).join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        Fixture { tensors, meta, name: file.to_string() }
    }

    pub fn t(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("{}: no tensor {name}", self.name))
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn m(&self, key: &str) -> &str {
        self.meta.get(key).unwrap_or_else(|| panic!("{}: no metadata {key}", self.name))
    }

    pub fn f(&self, key: &str) -> f64 {
        self.m(key).parse().unwrap_or_else(|_| panic!("{}: metadata {key} not a number", self.name))
    }
}

/// max|a - b| relative to max(1, max|b|).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    let diff: f32 = (&a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    let scale: f32 = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    diff / scale.max(1.0)
}

pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = rel_diff(a, b);
    assert!(d <= tol, "{what}: relative difference {d:e} > {tol:e}");
}

/// The attention guidance a model fixture names (`attention` metadata, else `guidance`), if any.
pub fn guide_of(fx: &Fixture) -> Option<veto::guidance::AttentionGuidance> {
    use veto::guidance::{AttentionGuidance, NagParams, VsfParams};
    let name = fx.meta.get("attention").map_or_else(|| fx.m("guidance"), String::as_str);
    match name {
        "none" => None,
        "nag" => Some(AttentionGuidance::nag(NagParams {
            scale: fx.f("nag_scale"),
            tau: fx.f("nag_tau"),
            alpha: fx.f("nag_alpha"),
            norm: fx.m("nag_norm").parse().unwrap(),
        })),
        "nasa" => Some(AttentionGuidance::nasa(fx.f("nasa_scale"))),
        "vsf" => Some(AttentionGuidance::Vsf(VsfParams {
            scale: fx.f("vsf_scale"),
            bias: fx.f("vsf_bias"),
            layout: fx.meta.get("vsf_layout").map_or(Default::default(), |l| l.parse().unwrap()),
        })),
        other => panic!("unknown guidance {other}"),
    }
}

/// A pipeline fixture's guidance (`guidance` method and whatever parameters its metadata
/// names) over `base`.
pub fn guidance_of(fx: &Fixture, base: veto::GuidanceConfig) -> veto::GuidanceConfig {
    let mut g = base;
    g.method = fx.m("guidance").parse().unwrap();
    let num = |k: &str| fx.meta.get(k).map(|v| v.parse::<f64>().unwrap());
    let set = |slot: &mut f64, key: &str| {
        if let Some(v) = num(key) {
            *slot = v;
        }
    };
    set(&mut g.nag.scale, "nag_scale");
    set(&mut g.nag.tau, "nag_tau");
    set(&mut g.nag.alpha, "nag_alpha");
    set(&mut g.nag_end, "nag_end");
    set(&mut g.nasa_scale, "nasa_scale");
    set(&mut g.true_cfg_scale, "true_cfg_scale");
    set(&mut g.vsf.scale, "vsf_scale");
    set(&mut g.vsf.bias, "vsf_bias");
    if let Some(v) = num("pag_scale").filter(|&v| v > 0.0) {
        g.pag_scale = v;
    }
    if let Some(n) = fx.meta.get("nag_norm") {
        g.nag.norm = n.parse().unwrap();
    }
    if let Some(l) = fx.meta.get("vsf_layout") {
        g.vsf.layout = l.parse().unwrap();
    }
    if fx.meta.get("nag_pooled").map(String::as_str) == Some("negative") {
        g.nag_pooled = veto::NagPooled::Negative;
    }
    g
}

/// The request a pipeline fixture ran, as the pipeline runs it (`max_sequence_length`:
/// the fixture's, else `default_msl`).
pub fn request_of(fx: &Fixture, base: veto::GuidanceConfig, default_msl: usize) -> veto::ResolvedRequest {
    veto::ResolvedRequest {
        prompt: fx.m("prompt").to_string(),
        negative_prompt: Some(fx.m("negative_prompt").to_string()),
        guidance: guidance_of(fx, base),
        steps: fx.m("steps").parse().unwrap(),
        height: fx.m("height").parse().unwrap(),
        width: fx.m("width").parse().unwrap(),
        guidance_scale: fx.f("guidance_scale"),
        max_sequence_length: fx.meta.get("max_sequence_length").map_or(default_msl, |v| v.parse().unwrap()),
        seed: 0,
        init_latents: Some(fx.t("init_latents").clone()),
        step_noise: None,
        sampler: Default::default(),
        video: Default::default(),
    }
}

/// What `veto::Pipeline` does with a resolved request: the family's checks, the pipeline's,
/// then the denoising loop. Returns the final latents and the warnings.
pub fn generate(
    pipe: &dyn veto::pipelines::TextToImage,
    family: &veto::Family,
    req: &veto::ResolvedRequest,
    on_step: &mut dyn FnMut(veto::StepEvent),
) -> veto::Result<(Tensor, Vec<String>)> {
    let (denoised, warnings) = generate_denoised(pipe, family, req, on_step)?;
    Ok((denoised.latents, warnings))
}

/// As [`generate`], with everything the run returns (initial latents, step noise).
pub fn generate_denoised(
    pipe: &dyn veto::pipelines::TextToImage,
    family: &veto::Family,
    req: &veto::ResolvedRequest,
    on_step: &mut dyn FnMut(veto::StepEvent),
) -> veto::Result<(veto::Denoised, Vec<String>)> {
    validate(pipe, family, req)?;
    let mut warnings = veto::pipelines::Warnings::default();
    let denoised = pipe.generate_latents(req, on_step, &mut warnings)?;
    Ok((denoised, warnings.into_vec()))
}

/// The family's and the pipeline's checks of a request.
pub fn validate(
    pipe: &dyn veto::pipelines::TextToImage,
    family: &veto::Family,
    req: &veto::ResolvedRequest,
) -> veto::Result<()> {
    family.check(req)?;
    pipe.validate(req)
}

/// Copy a folder tree (a tiny pipeline folder to modify in a test).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
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
