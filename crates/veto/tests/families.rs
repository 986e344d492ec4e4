//! The family registry on the tiny pipeline folders: detection by `_class_name` (with the
//! official NAG package's prefix too), defaults read from the config files alone equal those of
//! the loaded pipeline, and the checks made before any weights load.

mod common;

use candle_core::{DType, Device};
use common::fixtures;
use veto::{GenerateRequest, LoadOptions, ModelSource, Pipeline, Residency};

const FOLDERS: [(&str, &str, &str); 8] = [
    ("flux", "schnell", "flux"),
    ("flux", "dev", "flux"),
    ("sd3", "large", "sd3"),
    ("sd3", "medium", "sd3"),
    ("unet", "sd15", "unet"),
    ("unet", "sdxl", "unet"),
    ("pixart", "sigma", "pixart"),
    ("sana", "sana_1600m", "sana"),
];

#[test]
fn defaults_from_configs_equal_the_loaded_pipelines() {
    for (dir, model, family) in FOLDERS {
        let source = ModelSource::local(fixtures(dir).join(model)).unwrap();
        let detected = veto::families::detect(&source).unwrap();
        assert_eq!(detected.name, family, "{dir}/{model}");
        let from_configs = (detected.defaults)(&source).unwrap();
        let pipe = Pipeline::load(&source, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(&from_configs, pipe.defaults(), "{dir}/{model}");
    }
}

#[test]
fn bad_requests_stop_before_the_weights_load() {
    let source = ModelSource::local(fixtures("sd3").join("large")).unwrap();
    let req = GenerateRequest::new("a cat").negative("a dog").method("cfg+pag".parse().unwrap());
    let e = Pipeline::check_before_loading(&source, &req).unwrap_err();
    assert!(matches!(e, veto::Error::UnsupportedMethod { family: "SD3", .. }), "{e}");
    let mut g = veto::GuidanceConfig::nag_default();
    g.nag.alpha = 2.0;
    let e = Pipeline::check_before_loading(&source, &GenerateRequest::new("a cat").guidance(g)).unwrap_err();
    assert!(matches!(e, veto::Error::InvalidParameter { name: "nag_alpha", .. }), "{e}");
    let mut g = veto::GuidanceConfig::nag_default();
    g.nag_variant = veto::guidance::NagVariant::SharedImage;
    let e = Pipeline::check_before_loading(&source, &GenerateRequest::new("a cat").guidance(g)).unwrap_err();
    assert!(matches!(e, veto::Error::InvalidParameter { name: "nag_variant", .. }), "{e}");
    let (family, defaults, resolved) = Pipeline::check_before_loading(&source, &GenerateRequest::new("a cat")).unwrap();
    assert_eq!(family.name, "sd3");
    assert_eq!(resolved.steps, defaults.steps);
    // No negative prompt: the default CFG+NAG loses its attention part.
    assert_eq!(resolved.guidance.method, veto::Method::CFG);
}

#[test]
fn folders_saved_by_the_official_nag_package_load() {
    // A copy of the schnell folder whose model_index.json names `NAGFluxPipeline`.
    let dir = tempfile::tempdir().unwrap();
    let from = fixtures("flux").join("schnell");
    common::copy_dir(&from, dir.path());
    let index = dir.path().join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap().replace("\"FluxPipeline\"", "\"NAGFluxPipeline\"");
    std::fs::write(&index, text).unwrap();
    let source = ModelSource::local(dir.path()).unwrap();
    assert_eq!(veto::families::detect(&source).unwrap().name, "flux");
    let pipe = Pipeline::load(&source, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(pipe.family().name, "flux");
    // An unknown class lists the supported ones.
    std::fs::write(&index, r#"{"_class_name": "CogVideoXPipeline"}"#).unwrap();
    let e = veto::families::detect(&ModelSource::local(dir.path()).unwrap()).unwrap_err().to_string();
    assert!(e.contains("'CogVideoXPipeline' is not supported") && e.contains("StableDiffusionXLPipeline"), "{e}");
}

/// Sequential residency gives the same images as resident loading, and between generations
/// only the denoiser stays in memory.
#[test]
fn sequential_residency_matches_resident_and_frees_the_rest() {
    for (dir, model, _) in FOLDERS {
        let source = ModelSource::local(fixtures(dir).join(model)).unwrap();
        let req = GenerateRequest::new("a red circle").negative("a blue square").steps(2).size(64, 64).seed(3);
        let resident = Pipeline::load(&source, &Device::Cpu, DType::F32).unwrap();
        assert!(resident.loaded_components().iter().all(|(_, loaded)| *loaded), "{dir}/{model}");
        let want = resident.generate(&req).unwrap();

        let mut opts = LoadOptions::new(&Device::Cpu, DType::F32);
        opts.residency = Residency::Sequential;
        let sequential = Pipeline::load_with(&source, &opts).unwrap();
        let denoiser = |name: &str| name == "transformer" || name == "unet";
        for (name, loaded) in sequential.loaded_components() {
            assert_eq!(loaded, name == "unet", "{dir}/{model}: {name} before the first generation");
        }
        for _ in 0..2 {
            let got = sequential.generate(&req).unwrap();
            common::assert_close(&format!("{dir}/{model} latents"), &got.latents, &want.latents, 1e-6);
            common::assert_close(&format!("{dir}/{model} image"), &got.image, &want.image, 1e-6);
            assert_eq!(got.warnings, want.warnings, "{dir}/{model}");
            for (name, loaded) in sequential.loaded_components() {
                assert_eq!(loaded, denoiser(name), "{dir}/{model}: {name} after a generation");
            }
        }
    }
}
