//! Single-file checkpoints (tests/fixtures/single_file/, written by
//! tools/reference/single_file_reference.py from the tiny diffusers folders, and proven to be the
//! real layouts by diffusers' own single-file loaders): loading one over its tiny diffusers
//! folder as the base model gives the same image as the folder itself, and bad files are clear
//! errors.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures};
use veto::loading::model_source::{HubOptions, ModelSource};
use veto::loading::single_file::{key_map, Header, Layout, Op, SingleFile};
use veto::{GenerateRequest, Pipeline};

fn single(name: &str) -> PathBuf {
    fixtures("single_file").join(name)
}

fn offline() -> HubOptions {
    HubOptions::offline(std::env::temp_dir().join("veto-no-hub-cache"))
}

fn source(file: &Path, base: &Path) -> veto::Result<ModelSource> {
    ModelSource::resolve_with_base_and(file.to_str().unwrap(), Some(base.to_str().unwrap()), &offline())
}

/// Latents and image of a short run.
fn run(source: &ModelSource, req: &GenerateRequest) -> (Tensor, Tensor) {
    let pipe = Pipeline::load(source, &Device::Cpu, DType::F32).unwrap();
    let out = pipe.generate(req).unwrap();
    (out.latents, out.image)
}

/// The single file over `base` gives the base folder's output.
fn same_as_folder(file: &str, base: &Path, req: &GenerateRequest) -> ModelSource {
    let folder = ModelSource::resolve_with(base.to_str().unwrap(), &offline()).unwrap();
    let single = source(&single(file), base).unwrap();
    let (want_latents, want_image) = run(&folder, req);
    let (latents, image) = run(&single, req);
    assert_close(&format!("{file} latents"), &latents, &want_latents, 1e-5);
    assert_close(&format!("{file} image"), &image, &want_image, 1e-5);
    single
}

fn flux_request() -> GenerateRequest {
    GenerateRequest::new("a photo of a cat wearing glasses")
        .negative("glasses, blurry")
        .size(64, 64)
        .max_sequence_length(16)
        .steps(2)
        .seed(3)
}

#[test]
fn flux_schnell_bfl_transformer_only() {
    let base = fixtures("flux").join("schnell");
    let source = same_as_folder("flux_schnell_bfl.safetensors", &base, &flux_request());
    let summary = source.parts_summary().unwrap();
    assert!(summary.starts_with("transformer: flux_schnell_bfl.safetensors (BFL layout, FLUX.1-schnell)"), "{summary}");
    assert!(
        summary.contains("vae") && summary.contains("text_encoder_2") && summary.contains("scheduler"),
        "{summary}"
    );
    assert!(summary.contains(base.to_str().unwrap()), "{summary}");
}

#[test]
fn flux_dev_comfyui_all_in_one() {
    let base = fixtures("flux").join("dev");
    let source = same_as_folder("flux_dev_comfy.safetensors", &base, &flux_request().guidance_scale(3.5));
    let file = source.single_file_checkpoint().unwrap();
    assert_eq!(file.detected().variant, "FLUX.1-dev");
    assert_eq!(file.detected().default_base, "black-forest-labs/FLUX.1-dev");
    assert_eq!(file.components().collect::<Vec<_>>(), ["transformer", "vae"]);
    let summary = source.parts_summary().unwrap();
    assert!(summary.contains("vae: flux_dev_comfy.safetensors (LDM VAE layout)"), "{summary}");
}

#[test]
fn the_key_map_serves_fused_and_swapped_tensors() {
    let header = Header::read(&single("flux_schnell_bfl.safetensors")).unwrap();
    let map = key_map(Layout::FluxBfl, &header).unwrap();
    let q = map.get("single_transformer_blocks.1.attn.to_v.weight").unwrap();
    assert_eq!(q.source, "single_blocks.1.linear1.weight");
    assert_eq!(q.op, Op::Rows { start: 64, len: 32 });
    let mlp = map.get("single_transformer_blocks.0.proj_mlp.bias").unwrap();
    assert_eq!(mlp.op, Op::Rows { start: 96, len: 128 });
    assert_eq!(map.get("norm_out.linear.weight").unwrap().op, Op::SwapHalves);
    assert!(map.get("time_text_embed.guidance_embedder.linear_1.weight").is_none());
    assert_eq!(map.shape("transformer_blocks.0.attn.add_k_proj.weight", &header), Some(vec![32, 32]));
}

#[test]
fn a_base_model_of_another_variant_is_refused_before_loading() {
    // A schnell file over the dev folder: the configs say guidance_embeds, the file has none.
    let err = source(&single("flux_schnell_bfl.safetensors"), &fixtures("flux").join("dev")).unwrap_err().to_string();
    assert!(err.contains("guidance_embeds") && err.contains("--base-model"), "{err}");
    // A Flux file over an SD3 folder.
    let err = source(&single("flux_schnell_bfl.safetensors"), &fixtures("sd3").join("large")).unwrap_err().to_string();
    assert!(err.contains("FLUX.1-schnell") && err.contains("StableDiffusion3Pipeline"), "{err}");
}

#[test]
fn a_base_model_only_goes_with_a_single_file() {
    let folder = fixtures("flux").join("schnell");
    let err =
        ModelSource::resolve_with_base_and(folder.to_str().unwrap(), Some("a/b"), &offline()).unwrap_err().to_string();
    assert!(err.contains("only applies to a single-file checkpoint"), "{err}");
}

#[test]
fn truncated_foreign_and_misshapen_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(single("flux_schnell_bfl.safetensors")).unwrap();

    // Truncated: the first tensor whose bytes lie past the end is named.
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let err = SingleFile::open(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.safetensors") && err.contains("truncated") && err.contains("tensor "), "{err}");

    // Foreign: the layouts we know and a few of its keys.
    let foreign = dir.path().join("foreign.safetensors");
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("encoder.layer.0.weight", t.clone())].into_iter().collect(), &foreign).unwrap();
    let err = SingleFile::open(&foreign).unwrap_err().to_string();
    assert!(err.contains("not a single-file checkpoint veto recognises"), "{err}");
    assert!(err.contains("double_blocks") && err.contains("encoder.layer.0.weight"), "{err}");

    // A block cut from the file: the first missing tensor is named.
    let header = Header::read(&single("flux_schnell_bfl.safetensors")).unwrap();
    let tensors = candle_core::safetensors::load(single("flux_schnell_bfl.safetensors"), &Device::Cpu).unwrap();
    let without: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| k.as_str() != "double_blocks.1.txt_attn.proj.bias")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let holed = dir.path().join("holed.safetensors");
    candle_core::safetensors::save(&without, &holed).unwrap();
    let err = SingleFile::open(&holed).unwrap_err().to_string();
    assert!(err.contains("holed.safetensors") && err.contains("double_blocks.1.txt_attn.proj.bias"), "{err}");
    assert_eq!(header.len(), tensors.len());

    // Wrong shapes: an img_in of other input channels than the base config's is refused
    // before loading; a misshapen tensor inside is named when the model loads.
    let mut narrow_in = tensors.clone();
    narrow_in.insert("img_in.weight".into(), tensors["img_in.weight"].narrow(1, 0, 48).unwrap());
    let path = dir.path().join("narrow_in.safetensors");
    candle_core::safetensors::save(&narrow_in, &path).unwrap();
    let err = source(&path, &fixtures("flux").join("schnell")).unwrap_err().to_string();
    assert!(err.contains("in_channels = 64") && err.contains("48") && err.contains("narrow_in.safetensors"), "{err}");

    let mut wide = tensors.clone();
    let w = tensors["double_blocks.0.img_mlp.2.weight"].clone();
    wide.insert("double_blocks.0.img_mlp.2.weight".into(), w.narrow(1, 0, 64).unwrap());
    let bad = dir.path().join("bad_shape.safetensors");
    candle_core::safetensors::save(&wide, &bad).unwrap();
    let base = fixtures("flux").join("schnell");
    let src = source(&bad, &base).unwrap();
    let err = Pipeline::load(&src, &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("bad_shape.safetensors") && err.contains("double_blocks.0.img_mlp.2.weight"), "{err}");
    assert!(err.contains("ff.net.2.weight"), "{err}");
}

fn sd3_request() -> GenerateRequest {
    GenerateRequest::new("a photo of a cat wearing glasses")
        .negative("glasses, blurry")
        .size(64, 64)
        .max_sequence_length(16)
        .steps(2)
        .seed(5)
}

#[test]
fn sd35_large_with_text_encoders_and_vae() {
    let base = fixtures("sd3").join("large");
    let source = same_as_folder("sd35_large_all_in_one.safetensors", &base, &sd3_request());
    let file = source.single_file_checkpoint().unwrap();
    assert_eq!(file.detected().variant, "SD3.5 Large");
    assert_eq!(
        file.components().collect::<Vec<_>>(),
        ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    );
    let summary = source.parts_summary().unwrap();
    assert!(summary.contains("text_encoder_3: sd35_large_all_in_one.safetensors (T5 encoder)"), "{summary}");
    assert!(summary.contains("tokenizer_3") && !summary.contains(", text_encoder,"), "{summary}");
}

#[test]
fn sd35_medium_dual_attention_transformer() {
    let base = fixtures("sd3").join("medium");
    let source = same_as_folder("sd35_medium_transformer.safetensors", &base, &sd3_request());
    assert_eq!(
        source.single_file_checkpoint().unwrap().detected().default_base,
        "stabilityai/stable-diffusion-3.5-medium"
    );
    // Over the Large folder the second attention layers do not fit.
    let err = source_err("sd35_medium_transformer.safetensors", &fixtures("sd3").join("large"));
    assert!(err.contains("dual_attention_layers") && err.contains("stable-diffusion-3.5-medium"), "{err}");
}

fn source_err(file: &str, base: &Path) -> String {
    source(&single(file), base).err().unwrap().to_string()
}

fn unet_request() -> GenerateRequest {
    GenerateRequest::new("a photo of a cat wearing glasses").negative("glasses, blurry").size(64, 64).steps(2).seed(7)
}

#[test]
fn sd15_a1111_unet_vae_and_clip() {
    let base = fixtures("unet").join("sd15");
    let source = same_as_folder("sd15_a1111.safetensors", &base, &unet_request());
    let file = source.single_file_checkpoint().unwrap();
    assert_eq!(file.detected().variant, "SD1.5");
    assert_eq!(file.components().collect::<Vec<_>>(), ["unet", "vae", "text_encoder"]);
    // Over the SDXL folder: another pipeline class.
    let err = source_err("sd15_a1111.safetensors", &fixtures("unet").join("sdxl"));
    assert!(err.contains("SD1.5") && err.contains("StableDiffusionXLPipeline"), "{err}");
}

#[test]
fn sdxl_a1111_unet_and_both_text_encoders() {
    let base = fixtures("unet").join("sdxl");
    let source = same_as_folder("sdxl_a1111.safetensors", &base, &unet_request());
    let file = source.single_file_checkpoint().unwrap();
    assert_eq!(file.detected().default_base, "stabilityai/stable-diffusion-xl-base-1.0");
    assert_eq!(file.components().collect::<Vec<_>>(), ["unet", "text_encoder", "text_encoder_2"]);
    let summary = source.parts_summary().unwrap();
    assert!(summary.contains("text_encoder_2: sdxl_a1111.safetensors (OpenCLIP text model)"), "{summary}");
    assert!(summary.contains(", vae"), "{summary}");
}

#[test]
fn without_a_base_model_the_variants_official_repo_is_used() {
    // Offline with an empty cache: the error names the default base the file's shapes chose.
    for (file, repo) in [
        ("flux_schnell_bfl.safetensors", "black-forest-labs/FLUX.1-schnell"),
        ("flux_dev_comfy.safetensors", "black-forest-labs/FLUX.1-dev"),
        ("sd35_large_all_in_one.safetensors", "stabilityai/stable-diffusion-3.5-large"),
        ("sd15_a1111.safetensors", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ] {
        let err = ModelSource::resolve_with_base_and(single(file).to_str().unwrap(), None, &offline())
            .unwrap_err()
            .to_string();
        assert!(err.contains(repo) && err.contains("model_index.json"), "{file}: {err}");
    }
}
