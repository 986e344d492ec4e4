//! Parity of SANA's models with diffusers (tools/reference/sana_reference.py): one
//! `SanaTransformer2DModel` call per block and output, plain and with a negative caption in the
//! cross-attention on the conditional row (NAG and NASA in the official generic NAG processor's
//! layout, VSF), the position-table variant, and the `AutoencoderDC` decoder (the real SANA
//! layout, and pixel-shuffle / batch-norm options), Gemma-2 prompt encoding, the flow DPM-Solver,
//! and the pipeline: every step's latents and the final latents of the stock `SanaPipeline` /
//! `SanaPAGPipeline` (none, CFG, PAG, CFG+PAG) and of the pipeline with the official generic NAG
//! processor's layout (NAG, CFG+NAG, the NAG window, NASA, VSF); f32, 1e-4 relative. Plus bad
//! configs and bad input.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, Fixture};
use veto::families::SANA;
use veto::guidance::{AttentionGuidance, NagParams, NegativeContext, VsfParams};
use veto::loading::model_source::ModelSource;
use veto::loading::weights::ComponentWeights;
use veto::models::dc_ae::{AutoencoderDc, DcAeConfig};
use veto::models::sana::{SanaConfig, SanaInputs, SanaTransformer2DModel};
use veto::pipelines::sana::SanaPipeline;
use veto::pipelines::TextToImage;
use veto::ResolvedRequest;

fn load_transformer(dir: &std::path::Path) -> SanaTransformer2DModel {
    let weights = ComponentWeights::from_dir(dir, "diffusion_pytorch_model", "transformer").unwrap();
    let config = SanaConfig::from_file(weights.config_path()).unwrap();
    SanaTransformer2DModel::new(&config, weights.var_builder(DType::F32, &Device::Cpu).unwrap()).unwrap()
}

fn lens_of(fx: &Fixture) -> Vec<usize> {
    let mask: Vec<Vec<i64>> = fx.t("encoder_attention_mask").to_vec2().unwrap();
    mask.iter().map(|r| r.iter().sum::<i64>() as usize).collect()
}

fn method(fx: &Fixture, case: &str) -> Option<AttentionGuidance> {
    match case {
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
            layout: Default::default(),
        })),
        other => panic!("{other}"),
    }
}

fn transformer_case(case: &str) {
    let fx = Fixture::load("sana", "transformer.safetensors");
    let model = load_transformer(&fixtures("sana").join("sana_1600m").join("transformer"));
    let lens = lens_of(&fx);
    assert_eq!(lens, [5, 12]);
    let method = method(&fx, case);
    let row = fx.m("guided_row").parse::<usize>().unwrap();
    let negative = method.as_ref().map(|m| NegativeContext {
        method: m,
        states: fx.t("negative"),
        pooled: None,
        rows: row..row + 1,
    });
    let mut trace = Vec::new();
    let out = model
        .forward_traced(
            &SanaInputs {
                embedded_guidance: None,
                latents: fx.t("hidden_states"),
                timestep: fx.f("timestep"),
                caption: fx.t("encoder_hidden_states"),
                caption_lens: &lens,
                guidance: negative.as_ref(),
                perturbation: None,
            },
            Some(&mut trace),
        )
        .unwrap();
    assert_eq!(trace.len(), 2);
    for (k, t) in trace.iter().enumerate() {
        assert_close(&format!("{case}/block {k}"), t, fx.t(&format!("{case}_block_{k}")), 1e-4);
    }
    assert_close(&format!("{case}/output"), &out, fx.t(&format!("{case}_output")), 1e-4);
}

#[test]
fn transformer_none() {
    transformer_case("none");
}
#[test]
fn transformer_nag() {
    transformer_case("nag");
}
#[test]
fn transformer_nasa() {
    transformer_case("nasa");
}
#[test]
fn transformer_vsf() {
    transformer_case("vsf");
}

#[test]
fn transformer_with_a_position_table() {
    let fx = Fixture::load("sana", "pe_transformer.safetensors");
    let model = load_transformer(&fixtures("sana").join("variants").join("pe_transformer"));
    let lens = lens_of(&fx);
    let mut trace = Vec::new();
    let out = model
        .forward_traced(
            &SanaInputs {
                embedded_guidance: None,
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
        assert_close(&format!("pe/block {k}"), t, fx.t(&format!("block_{k}")), 1e-4);
    }
    assert_close("pe/output", &out, fx.t("output"), 1e-4);
}

fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures("sana").join("sana_1600m").join("transformer").join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    edit(&mut v);
    let path = dir.path().join("config.json");
    std::fs::write(&path, v.to_string()).unwrap();
    SanaConfig::from_file(&path).unwrap_err().to_string()
}

#[test]
fn unsupported_transformer_configs_are_named() {
    let err = config_error(|v| v["qk_norm"] = "rms_norm".into());
    assert!(err.contains("\"rms_norm\"") && err.contains("config.json"), "{err}");
    let err = config_error(|v| v["cross_attention_dim"] = 32.into());
    assert!(err.contains("cross_attention_dim 32"), "{err}");
}

fn load_dc_ae(dir: &std::path::Path) -> AutoencoderDc {
    let weights = ComponentWeights::from_dir(dir, "diffusion_pytorch_model", "vae").unwrap();
    AutoencoderDc::load_weights(&weights, &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn dc_ae_decodes_as_diffusers() {
    let fx = Fixture::load("sana", "dc_ae.safetensors");
    let root = fixtures("sana");
    for (name, dir) in
        [("sana", root.join("sana_1600m").join("vae")), ("shuffle", root.join("variants").join("shuffle_vae"))]
    {
        let vae = load_dc_ae(&dir);
        assert_eq!(vae.config().spatial_factor(), 32);
        // 2x3: linear attention at every level; 2x2: the deepest level (4 tokens = head width)
        // takes the quadratic form.
        for size in ["2x3", "2x2"] {
            let key = format!("{name}_{size}");
            let image = vae.decode(fx.t(&format!("{key}_latents"))).unwrap();
            assert_close(&key, &image, fx.t(&format!("{key}_image")), 1e-4);
        }
    }
}

#[test]
fn dc_ae_refuses_bad_latents_and_configs() {
    let vae = load_dc_ae(&fixtures("sana").join("sana_1600m").join("vae"));
    let z = candle_core::Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let err = vae.decode(&z).unwrap_err().to_string();
    assert!(err.contains("expects [batch, 8, h, w]"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures("sana").join("sana_1600m").join("vae").join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    v["upsample_block_type"] = "bicubic".into();
    let path = dir.path().join("config.json");
    std::fs::write(&path, v.to_string()).unwrap();
    let err = DcAeConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("bicubic") && err.contains("config.json"), "{err}");
    v["upsample_block_type"] = "interpolate".into();
    v["decoder_act_fns"] = serde_json::json!(["silu", "silu", "tanh", "silu", "silu", "silu"]);
    std::fs::write(&path, v.to_string()).unwrap();
    let err = DcAeConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("tanh"), "{err}");
}

fn close_list(what: &str, got: &[f64], want: &candle_core::Tensor) {
    let want: Vec<f32> = want.to_vec1().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w as f64).abs() <= 1e-6 * (w as f64).abs().max(1.0), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn flow_dpm_solver_matches_diffusers() {
    use veto::schedulers::scheduler::FixedNoise;
    let fx = Fixture::load("sana", "scheduler.safetensors");
    let config = fixtures("sana").join("sana_1600m").join("scheduler").join("scheduler_config.json");
    let mut s = veto::schedulers::load_scheduler(&config).unwrap();
    assert_eq!(s.class_name(), fx.m("scheduler"));
    for steps in [20, 7] {
        s.set_timesteps(steps).unwrap();
        close_list(&format!("{steps}/timesteps"), s.timesteps(), fx.t(&format!("steps{steps}_timesteps")));
        close_list(&format!("{steps}/sigmas"), s.sigmas().unwrap(), fx.t(&format!("steps{steps}_sigmas")));
    }
    let mut noise = FixedNoise::new(std::iter::empty());
    let mut x = fx.t("init_latents").clone();
    for (k, t) in s.timesteps().to_vec().into_iter().enumerate() {
        let scaled = s.scale_model_input(&x).unwrap();
        let out = ((&scaled * 0.1).unwrap() + 0.05 * t / 1000.0).unwrap();
        x = s.step(&out, &x, &mut noise).unwrap();
        assert_close(&format!("step {k}"), &x, fx.t(&format!("step_{k}_latents")), 1e-4);
    }
}

#[test]
fn gemma2_prompt_encoding_with_the_instruction_prefix_matches_diffusers() {
    use veto::text::gemma2::Gemma2TextEncoder;
    use veto::text::sana_prompt::{SanaTextEncoder, DEFAULT_COMPLEX_HUMAN_INSTRUCTION};
    let fx = Fixture::load("sana", "text.safetensors");
    let root = fixtures("sana").join("sana_1600m");
    let weights = ComponentWeights::from_dir(&root.join("text_encoder"), "model", "text_encoder").unwrap();
    let encoder = Gemma2TextEncoder::load_weights(&weights, &Device::Cpu, DType::F32).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(root.join("tokenizer").join("tokenizer.json")).unwrap();
    let text = SanaTextEncoder { tokenizer: &tokenizer, encoder: &encoder, source: root.join("tokenizer") };
    let chi: Vec<String> = serde_json::from_str(fx.m("complex_human_instruction")).unwrap();
    assert_eq!(chi, DEFAULT_COMPLEX_HUMAN_INSTRUCTION.map(String::from));
    let msl: usize = fx.m("max_sequence_length").parse().unwrap();
    let (ids, max_all, removed) = text.tokenize(fx.m("prompt"), msl, &chi).unwrap();
    let want: Vec<i64> = fx.t("prompt_chi_ids").flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), want);
    let n_chi: usize = fx.m("num_chi_prompt_tokens").parse().unwrap();
    assert_eq!((max_all, removed), (n_chi + msl - 2, None));
    for (key, with_chi) in [("prompt", true), ("negative", false), ("plain", false)] {
        let got = text.encode(fx.m(key), msl, if with_chi { &chi } else { &[] }).unwrap();
        assert_close(key, &got.states, fx.t(&format!("{key}_embeds")), 1e-4);
    }
}

// ---------------------------------------------------------------------------------------------
// The pipeline: stock diffusers SanaPipeline / SanaPAGPipeline (none, CFG, PAG, CFG+PAG) and the
// SanaPipeline with the official generic NAG processor's layout in the cross-attention (NAG,
// CFG+NAG, the NAG window, NASA, VSF): every step's latents and the final latents.
// ---------------------------------------------------------------------------------------------

fn sana_folder() -> std::path::PathBuf {
    fixtures("sana").join("sana_1600m")
}

fn load_pipeline() -> SanaPipeline {
    let source = ModelSource::local(sana_folder()).unwrap();
    SanaPipeline::load(&source, &Device::Cpu, DType::F32).unwrap()
}

fn pipeline_request(fx: &Fixture, pipe: &SanaPipeline) -> ResolvedRequest {
    let mut r = common::request_of(fx, pipe.defaults().guidance, 300);
    if let Some(layers) = fx.meta.get("pag_applied_layers") {
        r.sampler.pag_layers = Some(serde_json::from_str(layers).unwrap());
    }
    r
}

fn pipeline_case(case: &str) {
    let fx = Fixture::load("sana", &format!("pipeline_{case}.safetensors"));
    let pipe = load_pipeline();
    assert_eq!(pipe.scheduler().class_name(), fx.m("scheduler"));
    let req = pipeline_request(&fx, &pipe);
    let mut steps = Vec::new();
    let mut guided = Vec::new();
    let (latents, warnings) = common::generate(&pipe, &SANA, &req, &mut |e| {
        steps.push((e.timestep, e.latents.clone()));
        guided.push(e.attention_guided);
    })
    .unwrap();
    let want_t: Vec<f32> = fx.t("timesteps").to_vec1().unwrap();
    let got_t: Vec<f64> = steps.iter().map(|(t, _)| *t).collect();
    close_list(&format!("{case}: timesteps"), &got_t, fx.t("timesteps"));
    assert_eq!(got_t.len(), want_t.len());
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
    pipeline_case("none");
}
#[test]
fn pipeline_cfg() {
    pipeline_case("cfg");
}
#[test]
fn pipeline_pag() {
    pipeline_case("pag");
}
#[test]
fn pipeline_cfg_pag() {
    pipeline_case("cfg_pag");
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
fn pipeline_nag_end() {
    pipeline_case("nag_end");
}
#[test]
fn pipeline_nasa() {
    pipeline_case("nasa");
}
#[test]
fn pipeline_vsf() {
    pipeline_case("vsf");
}

fn tiny_request(pipe: &SanaPipeline) -> ResolvedRequest {
    let fx = Fixture::load("sana", "pipeline_none.safetensors");
    let mut r = pipeline_request(&fx, pipe);
    r.steps = 1;
    r
}

#[test]
fn sizes_off_the_bins_run_binned_with_a_warning_and_decode_back_to_the_asked_size() {
    let pipe = load_pipeline();
    let mut req = tiny_request(&pipe);
    req.init_latents = None;
    (req.height, req.width) = (1000, 1000);
    let (latents, warnings) = common::generate(&pipe, &SANA, &req, &mut |_| {}).unwrap();
    assert_eq!(latents.dims(), &[1, 8, 32, 32]);
    assert!(warnings.iter().any(|w| w.contains("1000x1000") && w.contains("1024x1024")), "{warnings:?}");
    // The decode of a 2x2 corner stands in for the full one: 64x64 pixels, asked 48x40.
    let corner = latents.narrow(2, 0, 2).unwrap().narrow(3, 0, 2).unwrap();
    (req.height, req.width) = (48, 40);
    let image = pipe.decode_for(&corner, &req).unwrap();
    assert_eq!(image.dims(), &[1, 3, 48, 40]);
}

#[test]
fn prompts_longer_than_the_token_limit_warn_with_what_was_cut() {
    let pipe = load_pipeline();
    let mut req = tiny_request(&pipe);
    req.prompt = format!("{} purple elephant", "a photo of a cat wearing glasses ".repeat(60));
    let (_, warnings) = common::generate(&pipe, &SANA, &req, &mut |_| {}).unwrap();
    assert!(warnings.iter().any(|w| w.contains("300 tokens") && w.contains("elephant")), "{warnings:?}");
    req.max_sequence_length = 8;
    req.sampler.complex_human_instruction = Some("none".into());
    let (_, warnings) = common::generate(&pipe, &SANA, &req, &mut |_| {}).unwrap();
    assert!(warnings.iter().any(|w| w.contains("8 tokens") && !w.contains("instruction")), "{warnings:?}");
}

#[test]
fn bad_instruction_settings_pag_layers_and_init_latents_are_refused_before_work() {
    let pipe = load_pipeline();
    let source = ModelSource::local(sana_folder()).unwrap();
    let mut req = tiny_request(&pipe);
    req.sampler.complex_human_instruction = Some("verbose".into());
    let err = veto::pipelines::sana::check_before_loading(&source, &req).unwrap_err().to_string();
    assert!(err.contains("complex_human_instruction") && err.contains("verbose") && err.contains("none"), "{err}");
    let mut req = tiny_request(&pipe);
    req.guidance.method = "pag".parse().unwrap();
    req.sampler.pag_layers = Some(vec!["blocks.7".into()]);
    let err = veto::pipelines::sana::check_before_loading(&source, &req).unwrap_err().to_string();
    assert!(err.contains("blocks.7") && err.contains("transformer_blocks.1.attn1"), "{err}");
    let mut req = tiny_request(&pipe);
    req.init_latents = Some(candle_core::Tensor::zeros((1, 8, 8, 8), DType::F32, &Device::Cpu).unwrap());
    assert!(common::validate(&pipe, &SANA, &req).is_err());
}

#[test]
fn defaults_and_registry() {
    let source = ModelSource::local(sana_folder()).unwrap();
    assert_eq!(veto::families::detect(&source).unwrap().name, "sana");
    let d = veto::pipelines::sana::defaults_of(&source).unwrap();
    assert_eq!((d.steps, d.guidance_scale, d.max_sequence_length), (20, 4.5, 300));
    assert_eq!((d.height, d.width), (1024, 1024)); // sample_size 32 x DC-AE factor 32
    assert_eq!(d.guidance.method, veto::Method::CFG_NAG);
    assert_eq!((d.guidance.nag.scale, d.guidance.nag.tau, d.guidance.nag.alpha), (5.0, 2.5, 0.375));
    for m in ["none", "cfg", "nag", "cfg+nag", "nasa", "vsf", "pag", "cfg+pag"] {
        assert!(SANA.methods.supports(m.parse().unwrap()), "{m}");
    }
}

#[test]
fn resize_back_to_the_asked_size_matches_diffusers() {
    let fx = Fixture::load("sana", "resize.safetensors");
    for (h, w) in [(40, 36), (50, 30), (90, 70)] {
        let got = veto::pipelines::resize::resize_and_crop(fx.t("image"), h, w).unwrap();
        assert_close(&format!("{h}x{w}"), &got, fx.t(&format!("resized_{h}x{w}")), 1e-5);
    }
}
