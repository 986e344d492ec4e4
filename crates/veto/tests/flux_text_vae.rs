//! Flux text side (CLIP + T5 tokenizers and encoders) and VAE decoder against the diffusers /
//! transformers reference in `tests/fixtures/flux/` (see its README.md), plus error paths
//! and PNG output.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use veto::image_io::{save_png, tensor_to_images};
use veto::loading::safetensors_files::weight_files;
use veto::models::vae::{AutoencoderKl, FluxVae};
use veto::text::clip::{ClipTextEncoder, ClipTokenizer};
use veto::text::t5::{T5TextEncoder, T5Tokenizer};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/flux");
const PROMPT: &str = "a photo of a cat wearing glasses";
const NEGATIVE: &str = "glasses, blurry";
const T5_MAX: usize = 16;

fn fixtures() -> PathBuf {
    PathBuf::from(FIXTURES)
}
fn schnell() -> PathBuf {
    fixtures().join("schnell")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap().into_iter().map(|i| i as u32).collect()
}

/// max|a−b| ≤ 1e-4·max(1, max|b|)
fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(1f32, f32::max);
    assert!(diff <= 1e-4 * scale, "{what}: max abs diff {diff} > 1e-4 * {scale}");
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("veto-ftv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err_string<T: std::fmt::Debug>(r: veto::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

// ---------------------------------------------------------------------------------------
// CLIP
// ---------------------------------------------------------------------------------------

#[test]
fn clip_tokenizer_matches_transformers() {
    let tok = ClipTokenizer::load(&schnell().join("tokenizer")).unwrap();
    assert_eq!(tok.model_max_length(), 77);
    let f = load("text.safetensors");
    for (text, key) in [(PROMPT, "clip_input_ids"), (NEGATIVE, "neg_clip_input_ids")] {
        let t = tok.tokenize(text, 77).unwrap();
        assert_eq!(t.ids, ids_of(&f[key]), "{key} for {text:?}");
        assert!(!t.truncated);
        assert_eq!(t.ids[0], tok.bos_id());
        assert_eq!(t.ids[t.len - 1], tok.eos_id());
        assert_eq!(tok.encode_padded(text, 77).unwrap(), t.ids);
    }
}

#[test]
fn clip_tokenizer_truncates_keeping_eos() {
    let tok = ClipTokenizer::load(&schnell().join("tokenizer")).unwrap();
    let long = [PROMPT; 20].join(" ");
    let t = tok.tokenize(&long, 77).unwrap();
    assert!(t.truncated);
    assert!(t.removed_text.as_deref().is_some_and(|s| !s.is_empty()));
    assert_eq!(t.ids.len(), 77);
    assert_eq!(t.len, 77);
    assert_eq!(t.ids[0], tok.bos_id());
    assert_eq!(t.ids[76], tok.eos_id());
    // The kept part is the start of the untruncated encoding.
    let short = tok.tokenize(PROMPT, 77).unwrap();
    let n = short.len - 1; // without EOS
    assert_eq!(&t.ids[..n], &short.ids[..n]);
    // Too small a length for BOS + EOS is an error, not a panic.
    assert!(tok.tokenize(PROMPT, 2).is_err());
    // Empty prompt: BOS, EOS, padding.
    let e = tok.tokenize("", 77).unwrap();
    assert_eq!(e.len, 2);
    assert!(e.ids[2..].iter().all(|&i| i == tok.pad_id()));
}

#[test]
fn clip_pooled_matches_transformers() {
    let enc = ClipTextEncoder::load(&schnell().join("text_encoder"), &Device::Cpu, DType::F32).unwrap();
    let f = load("text.safetensors");
    for (ids, pooled) in [("clip_input_ids", "clip_pooled"), ("neg_clip_input_ids", "neg_clip_pooled")] {
        let out = enc.encode(&f[ids]).unwrap();
        assert_close(&out.pooled, &f[pooled], pooled);
        assert_eq!(out.last_hidden_state.dims(), &[1, 77, 32]);
        assert_eq!(out.penultimate_hidden_state.dims(), &[1, 77, 32]);
        assert!(out.text_embeds.is_none(), "CLIPTextModel has no projection");
    }
    // Batched input gives the same rows as separate calls; u32 ids work like i64.
    let both = Tensor::cat(&[&f["clip_input_ids"], &f["neg_clip_input_ids"]], 0).unwrap().to_dtype(DType::U32).unwrap();
    let out = enc.encode(&both).unwrap();
    let expected = Tensor::cat(&[&f["clip_pooled"], &f["neg_clip_pooled"]], 0).unwrap();
    assert_close(&out.pooled, &expected, "batched pooled");
}

#[test]
fn clip_encoder_rejects_bad_ids() {
    let enc = ClipTextEncoder::load(&schnell().join("text_encoder"), &Device::Cpu, DType::F32).unwrap();
    // Out of vocabulary.
    let ids = Tensor::new(&[[0u32, 5000]], &Device::Cpu).unwrap();
    assert!(err_string(enc.encode(&ids)).contains("5000"));
    // Longer than the position table.
    let ids = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    assert!(err_string(enc.encode(&ids)).contains("78"));
    // Wrong rank.
    let ids = Tensor::zeros(5, DType::U32, &Device::Cpu).unwrap();
    assert!(enc.encode(&ids).is_err());
}

// ---------------------------------------------------------------------------------------
// T5
// ---------------------------------------------------------------------------------------

#[test]
fn t5_tokenizer_matches_transformers() {
    let tok = T5Tokenizer::load(&schnell().join("tokenizer_2")).unwrap();
    let f = load("text.safetensors");
    for (text, key) in [(PROMPT, "t5_input_ids"), (NEGATIVE, "neg_t5_input_ids")] {
        let t = tok.tokenize(text, T5_MAX).unwrap();
        assert_eq!(t.ids, ids_of(&f[key]), "{key} for {text:?}");
        assert_eq!(tok.encode_padded(text, T5_MAX).unwrap(), t.ids);
    }
}

#[test]
fn t5_tokenizer_truncates_keeping_eos() {
    let tok = T5Tokenizer::load(&schnell().join("tokenizer_2")).unwrap();
    let t = tok.tokenize(&[PROMPT; 5].join(" "), T5_MAX).unwrap();
    assert!(t.truncated);
    assert_eq!(t.ids.len(), T5_MAX);
    assert_eq!(t.ids[T5_MAX - 1], 1, "</s> kept at the end");
    assert!(t.ids.iter().all(|&i| i != tok.pad_id()));
    let short = tok.tokenize(NEGATIVE, T5_MAX).unwrap();
    assert!(!short.truncated);
    assert_eq!(short.ids[short.len - 1], 1);
    assert!(short.ids[short.len..].iter().all(|&i| i == tok.pad_id()));
}

#[test]
fn t5_hidden_matches_transformers() {
    let enc = T5TextEncoder::load(&schnell().join("text_encoder_2"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(enc.hidden_size(), 32);
    let f = load("text.safetensors");
    for (ids, hidden) in [("t5_input_ids", "t5_hidden"), ("neg_t5_input_ids", "neg_t5_hidden")] {
        let out = enc.encode(&f[ids]).unwrap();
        assert_close(&out, &f[hidden], hidden);
    }
    let ids = Tensor::new(&[[3u32, 384]], &Device::Cpu).unwrap();
    assert!(err_string(enc.encode(&ids)).contains("384"));
}

/// The real FLUX repos shard T5 (`model-0000x-of-00002.safetensors` + index): split the
/// fixture's weights into two shards and check the encoder loads and answers the same.
#[test]
fn t5_loads_sharded_weights() {
    let src = schnell().join("text_encoder_2");
    let dir = tmp_dir("t5-sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let weights = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let tensors: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), weights[*n].clone())).collect();
        candle_core::safetensors::save(&tensors, dir.join(shard)).unwrap();
        for n in part {
            map.insert((*n).clone(), serde_json::Value::String(shard.into()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    assert_eq!(weight_files(&dir, "model").unwrap().len(), 2);
    let enc = T5TextEncoder::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let f = load("text.safetensors");
    assert_close(&enc.encode(&f["t5_input_ids"]).unwrap(), &f["t5_hidden"], "sharded t5");

    // A shard named in the index but missing is reported by name.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = err_string(T5TextEncoder::load(&dir, &Device::Cpu, DType::F32));
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// VAE + PNG
// ---------------------------------------------------------------------------------------

#[test]
fn vae_decode_matches_diffusers() {
    let vae: FluxVae = AutoencoderKl::load(&schnell().join("vae"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(vae.config().latent_channels, 16);
    assert_eq!(vae.config().downscale_factor(), 8);
    let f = load("vae.safetensors");
    let image = vae.decode_latents(&f["latents"]).unwrap();
    assert_close(&image, &f["image"], "vae image");
    // Wrong channel count is an error naming the expectation.
    let bad = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(err_string(vae.decode_latents(&bad)).contains("16"));
}

#[test]
fn png_written_atomically_and_readable() {
    let f = load("vae.safetensors");
    let image = &f["image"];
    let dir = tmp_dir("png");
    let path = dir.join("out.png");
    save_png(image, &path).unwrap();
    let back = image::open(&path).unwrap().to_rgb8();
    assert_eq!(back.dimensions(), (64, 64));
    let expected = tensor_to_images(image).unwrap().remove(0);
    assert_eq!(back.as_raw(), expected.as_raw());
    // Spot-check one pixel against the diffusers formula.
    let v = image.get(0).unwrap().get(1).unwrap().get(2).unwrap().get(3).unwrap().to_scalar::<f32>().unwrap();
    let want = ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
    assert_eq!(back.get_pixel(3, 2)[1], want);
    // Only the PNG is left in the folder (no temporary file).
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out.png")]);

    // Missing folder: a clear error, nothing written.
    let missing = dir.join("no-such-folder").join("x.png");
    let err = err_string(save_png(image, &missing));
    assert!(err.contains("no-such-folder"), "{err}");
    // A batch of two is refused by save_png.
    let two = Tensor::cat(&[image, image], 0).unwrap();
    assert!(save_png(&two, &path).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// Missing files
// ---------------------------------------------------------------------------------------

#[test]
fn missing_folders_and_files_are_named() {
    let cpu = Device::Cpu;
    let gone = fixtures().join("does-not-exist");
    let g = gone.display().to_string();
    assert!(err_string(ClipTokenizer::load(&gone)).contains(&g));
    assert!(err_string(T5Tokenizer::load(&gone)).contains(&g));
    assert!(err_string(ClipTextEncoder::load(&gone, &cpu, DType::F32)).contains(&g));
    assert!(err_string(T5TextEncoder::load(&gone, &cpu, DType::F32)).contains(&g));
    assert!(err_string(AutoencoderKl::load(&gone, &cpu, DType::F32)).contains(&g));
    assert!(err_string(weight_files(&gone, "model")).contains(&g));

    // Folders with a config but no weights, or no config.
    let dir = tmp_dir("missing");
    let d = dir.display().to_string();
    let err = err_string(ClipTextEncoder::load(&dir, &cpu, DType::F32));
    assert!(err.contains("config.json") && err.contains(&d), "{err}");
    std::fs::copy(schnell().join("text_encoder/config.json"), dir.join("config.json")).unwrap();
    let err = err_string(ClipTextEncoder::load(&dir, &cpu, DType::F32));
    assert!(err.contains("model.safetensors") && err.contains(&d), "{err}");
    std::fs::copy(schnell().join("vae/config.json"), dir.join("config.json")).unwrap();
    let err = err_string(AutoencoderKl::load(&dir, &cpu, DType::F32));
    assert!(err.contains("diffusion_pytorch_model") && err.contains(&d), "{err}");
    // Tokenizer folders without their files.
    let err = err_string(ClipTokenizer::load(&dir));
    assert!(err.contains("vocab.json"), "{err}");
    let err = err_string(T5Tokenizer::load(&dir));
    assert!(err.contains("tokenizer.json"), "{err}");
    // Bad hidden_act is refused with the config named.
    let cfg =
        std::fs::read_to_string(schnell().join("text_encoder/config.json")).unwrap().replace("quick_gelu", "swish");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    std::fs::copy(schnell().join("text_encoder/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let err = err_string(ClipTextEncoder::load(&dir, &cpu, DType::F32));
    assert!(err.contains("swish") && err.contains("config.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sharded_transformer_folder_lists_all_shards() {
    let files = weight_files(&schnell().join("transformer"), "diffusion_pytorch_model").unwrap();
    assert_eq!(files.len(), 3);
    assert!(files.iter().all(|p| p.is_file()));
}
