//! Parity of the Wan2.1 pipeline parts with transformers / diffusers
//! (tools/reference/wan_parts_reference.py): UMT5 with an attention mask, diffusers' `prompt_clean`
//! and `_get_t5_prompt_embeds` (zero rows after the real tokens, truncation), the Wan VAE's
//! encode and decode (three latent frames: every temporal cache in use), the CLIP vision tower's
//! penultimate hidden states and CLIPImageProcessor's preprocessing; f32, 1e-4 relative.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, Fixture};
use veto::loading::weights::ComponentWeights;
use veto::models::clip_vision::{ClipImageProcessor, ClipVisionEncoder};
use veto::models::wan_vae::AutoencoderKlWan;
use veto::pipelines::Warnings;
use veto::text::t5::T5Tokenizer;
use veto::text::umt5::Umt5TextEncoder;
use veto::text::wan_prompt::{encode_wan_prompt, prompt_clean, tokenize_wan_prompt};

const TOL: f32 = 1e-4;

fn folder(component: &str) -> std::path::PathBuf {
    fixtures("wan_parts").join("wan").join(component)
}

fn umt5() -> Umt5TextEncoder {
    let weights = ComponentWeights::from_dir(&folder("text_encoder"), "model", "UMT5 text encoder").unwrap();
    Umt5TextEncoder::load_weights(&weights, &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn umt5_with_the_mask_matches_transformers() {
    let fx = Fixture::load("wan_parts", "umt5.safetensors");
    let out = umt5().encode(fx.t("input_ids"), fx.t("attention_mask")).unwrap();
    assert_close("UMT5 last hidden state", &out, fx.t("last_hidden_state"), TOL);
}

#[test]
fn prompt_clean_matches_diffusers_on_the_fixture_inputs() {
    let text = std::fs::read_to_string(fixtures("wan_parts").join("prompt_clean.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let bad: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let (input, want) = (c["input"].as_str().unwrap(), c["output"].as_str().unwrap());
            let got = prompt_clean(input);
            (got != want).then(|| format!("{input:?}: got {got:?}, diffusers {want:?}"))
        })
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn wan_prompt_embeds_match_diffusers() {
    let fx = Fixture::load("wan_parts", "wan_prompt.safetensors");
    let max_len: usize = fx.m("prompt_max_len").parse().unwrap();
    let tokenizer = T5Tokenizer::load(&folder("tokenizer")).unwrap();
    let encoder = umt5();
    for name in ["prompt", "negative", "long", "empty"] {
        let want_ids: Vec<u32> =
            fx.t(&format!("{name}.ids")).flatten_all().unwrap().to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        let tok = tokenize_wan_prompt(&tokenizer, name_text(name), max_len).unwrap();
        assert_eq!(tok.ids, want_ids, "{name}: token ids");

        let mut warnings = Warnings::default();
        let embeds = encode_wan_prompt(&tokenizer, &encoder, name_text(name), max_len, name, &mut warnings).unwrap();
        let want = fx.t(&format!("{name}.embeds"));
        assert_close(&format!("{name}: padded embeds"), &embeds.padded, want, TOL);
        // The unpadded variant is the real rows; every row after them is exactly zero.
        let n = embeds.len;
        assert_eq!(n, want_ids.iter().position(|&i| i == tokenizer.pad_id()).unwrap_or(max_len), "{name}: length");
        assert_close(&format!("{name}: unpadded"), &embeds.unpadded().unwrap(), &want.narrow(1, 0, n).unwrap(), TOL);
        if n < max_len {
            let tail = embeds.padded.narrow(1, n, max_len - n).unwrap();
            let tail: f32 = tail.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert_eq!(tail, 0.0, "{name}: padded rows must be zero");
        }
        let warned = warnings.into_vec();
        if name == "long" {
            assert!(embeds.removed_text.is_some(), "long prompt must be cut");
            assert!(warned.len() == 1 && warned[0].contains("truncated"), "{warned:?}");
        } else {
            assert!(warned.is_empty(), "{name}: {warned:?}");
        }
    }
}

fn name_text(name: &str) -> &'static str {
    // The reference script's PROMPTS.
    match name {
        "prompt" => "A cat wearing glasses walks  on the beach,\n &amp; a dog   follows",
        "negative" => "static, blurry, low quality",
        "long" => LONG,
        _ => "",
    }
}

const LONG: &str = "a photo of a cat wearing glasses on a wooden chair near the window \
a photo of a cat wearing glasses on a wooden chair near the window \
a photo of a cat wearing glasses on a wooden chair near the window";

fn vae() -> AutoencoderKlWan {
    let weights = ComponentWeights::from_dir(&folder("vae"), "diffusion_pytorch_model", "Wan VAE").unwrap();
    AutoencoderKlWan::load_weights(&weights, &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn wan_vae_encode_matches_diffusers() {
    let fx = Fixture::load("wan_parts", "wan_vae.safetensors");
    let mean = vae().encode(fx.t("video")).unwrap();
    assert_close("latent mean", &mean, fx.t("latent_mean"), TOL);
}

#[test]
fn wan_vae_decode_matches_diffusers() {
    let fx = Fixture::load("wan_parts", "wan_vae.safetensors");
    let video = vae().decode(fx.t("latents")).unwrap();
    assert_close("decoded video", &video, fx.t("decoded"), TOL);
}

#[test]
fn wan_vae_latent_normalization_round_trips() {
    let vae = vae();
    let z = Tensor::ones((1, 4, 2, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let n = vae.normalize_latents(&z).unwrap();
    // (1 - 0.25) / 1.5 for channel 0, (1 + 0.5) / 0.75 for channel 1 (the fixture config).
    let v: Vec<f32> = n.flatten_all().unwrap().to_vec1().unwrap();
    assert!((v[0] - 0.5).abs() < 1e-6 && (v[2] - 2.0).abs() < 1e-6, "{v:?}");
    assert_close("round trip", &vae.denormalize_latents(&n).unwrap(), &z, 1e-6);
}

#[test]
fn wan_vae_rejects_bad_shapes() {
    let vae = vae();
    let odd = Tensor::zeros((1, 3, 5, 12, 16), DType::F32, &Device::Cpu).unwrap();
    let err = vae.encode(&odd).unwrap_err().to_string();
    assert!(err.contains("divisible by 8"), "{err}");
    let wrong_z = Tensor::zeros((1, 16, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode(&wrong_z).unwrap_err().to_string();
    assert!(err.contains("4 channels"), "{err}");
}

fn clip_vision() -> ClipVisionEncoder {
    let weights = ComponentWeights::from_dir(&folder("image_encoder"), "model", "CLIP vision encoder").unwrap();
    ClipVisionEncoder::load_weights(&weights, &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn clip_vision_penultimate_states_match_transformers() {
    let fx = Fixture::load("wan_parts", "clip_vision.safetensors");
    let encoder = clip_vision();
    for name in ["shrunk", "enlarged"] {
        let out = encoder.forward(fx.t(&format!("{name}.pixel_values"))).unwrap();
        assert_close(&format!("{name}: hidden_states[-2]"), &out, fx.t(&format!("{name}.penultimate")), TOL);
    }
}

#[test]
fn clip_image_processing_matches_transformers() {
    let fx = Fixture::load("wan_parts", "clip_vision.safetensors");
    let processor = ClipImageProcessor::load(&folder("image_processor")).unwrap();
    let encoder = clip_vision();
    for name in ["shrunk", "enlarged"] {
        let image = image::open(fixtures("wan_parts").join(format!("clip_{name}.png"))).unwrap().to_rgb8();
        let got = processor.preprocess(&image).unwrap();
        // transformers' PIL backend (what the reference ran) resizes with Pillow, which ours
        // follows to the 8-bit rounding: the pixel values are the same.
        assert_close(&format!("{name}: pixel values"), &got, fx.t(&format!("{name}.pixel_values")), TOL);
        let out = encoder.forward(&got).unwrap();
        assert_close(&format!("{name}: encoder on our pixels"), &out, fx.t(&format!("{name}.penultimate")), TOL);
    }
}
