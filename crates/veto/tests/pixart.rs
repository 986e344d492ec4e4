//! Parity of the PixArt-Sigma family with diffusers (tools/reference/pixart_reference.py): the
//! caption cleaning, T5 with the attention mask, one transformer call per block, every step's
//! latents and the final latents of the stock pipelines (none, CFG, PAG, CFG+PAG) and of the
//! pipeline with the official generic NAG processor's layout in the cross-attention (NAG,
//! CFG+NAG, the NAG window, NASA, VSF), the VAE decode; f32, 1e-4 relative. Plus bad input.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, request_of, Fixture};
use veto::families::PIXART;
use veto::loading::model_source::ModelSource;
use veto::models::pixart::PixArtInputs;
use veto::pipelines::pixart::PixArtSigmaPipeline;
use veto::pipelines::{TextToImage, Warnings};
use veto::ResolvedRequest;

fn load() -> PixArtSigmaPipeline {
    let source = ModelSource::local(fixtures("pixart").join("sigma")).unwrap();
    PixArtSigmaPipeline::load(&source, &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn caption_cleaning_matches_diffusers() {
    let text = std::fs::read_to_string(fixtures("pixart").join("captions.json")).unwrap();
    let pairs: Vec<(String, String)> = serde_json::from_str(&text).unwrap();
    let bad: Vec<String> = pairs
        .iter()
        .filter_map(|(input, want)| {
            let got = veto::text::caption::clean_caption(input);
            (&got != want).then(|| format!("{input:?}: got {got:?}, diffusers {want:?}"))
        })
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn t5_with_the_mask_matches_on_the_real_tokens() {
    let fx = Fixture::load("pixart", "text.safetensors");
    let pipe = load();
    for key in ["prompt", "negative", "empty"] {
        let text = fx.m(key);
        let (ids, len) = pipe.tokenize(text, 300).unwrap();
        let want_ids: Vec<i64> = fx.t(&format!("{key}_ids")).flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), want_ids, "{key}: ids");
        let mask: Vec<i64> = fx.t(&format!("{key}_mask")).flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(mask.iter().sum::<i64>() as usize, len, "{key}: mask");
        let got = pipe.encode_prompt(text, 300, key, &mut Warnings::default()).unwrap();
        assert_close(&format!("{key}: T5"), &got.states, fx.t(&format!("{key}_embeds")), 1e-4);
    }
}

#[test]
fn transformer_blocks_and_output() {
    let fx = Fixture::load("pixart", "transformer.safetensors");
    let pipe = load();
    let model = pipe.transformer().unwrap();
    let mask: Vec<Vec<i64>> = fx.t("encoder_attention_mask").to_vec2().unwrap();
    let lens: Vec<usize> = mask.iter().map(|r| r.iter().sum::<i64>() as usize).collect();
    assert_eq!(lens, [5, 12]);
    let mut trace = Vec::new();
    let out = model
        .forward_traced(
            &PixArtInputs {
                latents: fx.t("hidden_states"),
                timestep: fx.f("timestep"),
                caption: fx.t("encoder_hidden_states"),
                caption_lens: &lens,
                guidance: None,
                perturbation: None,
            },
            Some(&mut trace),
        )
        .unwrap();
    for (k, t) in trace.iter().enumerate() {
        assert_close(&format!("block {k}"), t, fx.t(&format!("block_{k}")), 1e-4);
    }
    assert_close("output", &out, fx.t("output"), 1e-4);
}

fn request(fx: &Fixture, pipe: &PixArtSigmaPipeline) -> ResolvedRequest {
    let mut r = request_of(fx, pipe.defaults().guidance, 300);
    if let Some(layers) = fx.meta.get("pag_applied_layers") {
        r.sampler.pag_layers = Some(serde_json::from_str(layers).unwrap());
    }
    r
}

fn check(case: &str) {
    let fx = Fixture::load("pixart", &format!("pipeline_{case}.safetensors"));
    let pipe = load();
    assert_eq!(pipe.scheduler().class_name(), fx.m("scheduler"));
    let req = request(&fx, &pipe);
    let mut steps = Vec::new();
    let mut guided = Vec::new();
    let (latents, warnings) = common::generate(&pipe, &PIXART, &req, &mut |e| {
        steps.push((e.timestep, e.latents.clone()));
        guided.push(e.attention_guided);
    })
    .unwrap();
    let want_t: Vec<f32> = fx.t("timesteps").to_vec1().unwrap();
    let got_t: Vec<f32> = steps.iter().map(|(t, _)| *t as f32).collect();
    assert_eq!(got_t, want_t, "{case}: timesteps");
    for (k, (_, x)) in steps.iter().enumerate() {
        assert_close(&format!("{case}/step_{k}"), x, fx.t(&format!("step_{k}_latents")), 1e-4);
    }
    assert_close(&format!("{case}/final"), &latents, fx.t("final_latents"), 1e-4);
    let want_guided: Vec<bool> = serde_json::from_str(fx.m("guided_steps")).unwrap();
    assert_eq!(guided, want_guided, "{case}: guided steps");
    if let Some(image) = fx.get("image") {
        let decoded = pipe.decode(fx.t("image_latents")).unwrap();
        assert_close(&format!("{case}/image"), &decoded, image, 1e-4);
    }
    if fx.m("guidance") == "none" || fx.m("guidance") == "pag" {
        assert!(warnings.len() == 1 && warnings[0].contains("negative prompt is unused"), "{warnings:?}");
    } else {
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}

#[test]
fn pipeline_none() {
    check("none");
}
#[test]
fn pipeline_cfg() {
    check("cfg");
}
#[test]
fn pipeline_pag() {
    check("pag");
}
#[test]
fn pipeline_cfg_pag() {
    check("cfg_pag");
}
#[test]
fn pipeline_nag() {
    check("nag");
}
#[test]
fn pipeline_cfg_nag() {
    check("cfg_nag");
}
#[test]
fn pipeline_nag_end() {
    check("nag_end");
}
#[test]
fn pipeline_nasa() {
    check("nasa");
}
#[test]
fn pipeline_vsf() {
    check("vsf");
}

fn tiny_request(pipe: &PixArtSigmaPipeline) -> ResolvedRequest {
    let fx = Fixture::load("pixart", "pipeline_none.safetensors");
    let mut r = request(&fx, pipe);
    r.steps = 1;
    r
}

#[test]
fn sizes_off_the_bins_run_at_the_nearest_bin_with_a_warning() {
    let pipe = load();
    let mut req = tiny_request(&pipe);
    req.init_latents = None;
    (req.height, req.width) = (250, 260);
    let (latents, warnings) = common::generate(&pipe, &PIXART, &req, &mut |_| {}).unwrap();
    assert_eq!(latents.dims(), &[1, 4, 30, 32]);
    assert!(warnings.iter().any(|w| w.contains("250x260") && w.contains("240x256")), "{warnings:?}");
}

#[test]
fn prompts_longer_than_the_token_limit_warn_with_what_was_cut() {
    let pipe = load();
    let mut req = tiny_request(&pipe);
    req.prompt = format!("{} purple elephant", "a photo of a cat wearing glasses ".repeat(60));
    let (_, warnings) = common::generate(&pipe, &PIXART, &req, &mut |_| {}).unwrap();
    assert!(warnings.iter().any(|w| w.contains("300 tokens") && w.contains("elephant")), "{warnings:?}");
    // A shorter limit cuts more and says so.
    req.max_sequence_length = 8;
    let (_, warnings) = common::generate(&pipe, &PIXART, &req, &mut |_| {}).unwrap();
    assert!(warnings.iter().any(|w| w.contains("8 tokens")), "{warnings:?}");
}

#[test]
fn bad_pag_layers_and_init_latents_are_refused_before_work() {
    let pipe = load();
    let mut req = tiny_request(&pipe);
    req.guidance.method = "pag".parse().unwrap();
    req.sampler.pag_layers = Some(vec!["blocks.7".into()]);
    let err = common::validate(&pipe, &PIXART, &req).unwrap_err().to_string();
    assert!(err.contains("blocks.7") && err.contains("transformer_blocks.1.attn1"), "{err}");
    let mut req = tiny_request(&pipe);
    req.init_latents = Some(Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap());
    assert!(common::validate(&pipe, &PIXART, &req).is_err());
}

#[test]
fn defaults_and_registry() {
    let source = ModelSource::local(fixtures("pixart").join("sigma")).unwrap();
    assert_eq!(veto::families::detect(&source).unwrap().name, "pixart");
    let d = veto::pipelines::pixart::defaults_of(&source).unwrap();
    assert_eq!((d.steps, d.guidance_scale, d.max_sequence_length), (20, 4.5, 300));
    assert_eq!((d.height, d.width), (256, 256)); // sample_size 32 x VAE factor 8
    assert_eq!(d.guidance.method, veto::Method::CFG_NAG);
    assert_eq!((d.guidance.nag.scale, d.guidance.nag.tau, d.guidance.nag.alpha), (5.0, 2.5, 0.375));
}
