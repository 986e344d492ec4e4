//! Parity of the SD3 / SD3.5 MMDiT with the PyTorch reference (tools/reference/sd3_reference.py,
//! tests/fixtures/sd3/README.md): one call per case, every block's streams and the output,
//! f32, 1e-4 relative.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, guide_of, rel_diff, Fixture};
use veto::guidance::{AttentionGuidance, NegativeContext};
use veto::loading::safetensors_files::{var_builder, weight_files};
use veto::models::mmdit::{embeddings, MmditConfig, MmditInputs, MmditTransformer};

fn transformer_dir(model: &str) -> std::path::PathBuf {
    match model {
        "sd3medium" => fixtures("sd3").join("sd3_medium_transformer"),
        other => fixtures("sd3").join(other).join("transformer"),
    }
}

fn load_model(model: &str) -> MmditTransformer {
    let dir = transformer_dir(model);
    let cfg = MmditConfig::from_file(&dir.join("config.json")).unwrap();
    let files = weight_files(&dir, "diffusion_pytorch_model").unwrap();
    let vb = var_builder(&files, DType::F32, &Device::Cpu).unwrap();
    MmditTransformer::new(&cfg, vb).unwrap()
}

fn check(model: &str, case: &str) {
    let fx = Fixture::load("sd3", &format!("transformer_{model}_{case}.safetensors"));
    let mmdit = load_model(model);
    let guide = guide_of(&fx);
    let neg_pooled = match fx.meta.get("nag_pooled").map(String::as_str) {
        Some("negative") => fx.get("neg_pooled"),
        _ => fx.get("pooled"),
    };
    let batch = fx.t("hidden_states").dim(0).unwrap();
    let guidance = match &guide {
        None => None,
        Some(method @ AttentionGuidance::Vsf(_)) => Some(NegativeContext {
            method,
            states: fx.t("vsf_neg_encoder_hidden_states"),
            pooled: None,
            rows: 0..batch,
        }),
        Some(method) => {
            let states = fx.t("neg_encoder_hidden_states");
            let bn = states.dim(0).unwrap();
            Some(NegativeContext { method, states, pooled: neg_pooled, rows: batch - bn..batch })
        }
    };
    let inputs = MmditInputs {
        latents: fx.t("hidden_states"),
        timestep: fx.t("timestep"),
        context: fx.t("encoder_hidden_states"),
        pooled: fx.t("pooled"),
        guidance: guidance.as_ref(),
    };
    let mut trace = Vec::new();
    let out = mmdit.forward_traced(&inputs, Some(&mut trace)).unwrap();
    for (name, t) in &trace {
        let want = fx.get(name).unwrap_or_else(|| panic!("{model}/{case}: fixture lacks {name}"));
        assert_close(&format!("{model}/{case}/{name}"), t, want, 1e-4);
    }
    // Every block's image stream; the text stream(s) of all but the last block.
    let n = mmdit.config().num_layers;
    let streams = if matches!(guide, Some(AttentionGuidance::Contrast(_))) { 2 } else { 1 };
    assert_eq!(trace.len(), n + streams * (n - 1), "{model}/{case}: traced streams");
    let fixture_blocks = fx.tensors.keys().filter(|k| k.starts_with("block_")).count();
    assert_eq!(trace.len(), fixture_blocks, "{model}/{case}: every fixture stream is checked");
    assert_close(&format!("{model}/{case}/output"), &out, fx.t("output"), 1e-4);
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
fn large_nag_negative_pooled() {
    check("large", "nag_negpooled");
}
#[test]
fn large_nasa() {
    check("large", "nasa");
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
fn medium_none() {
    check("medium", "none");
}
#[test]
fn medium_nag() {
    check("medium", "nag");
}
#[test]
fn medium_nasa() {
    check("medium", "nasa");
}
#[test]
fn medium_vsf_paper() {
    check("medium", "vsf_paper");
}
#[test]
fn medium_vsf_official() {
    check("medium", "vsf_official");
}
#[test]
fn sd3_medium_without_qk_norm_none() {
    // Its config.json has no qk_norm / dual_attention_layers keys (older diffusers).
    let cfg = MmditConfig::from_file(&transformer_dir("sd3medium").join("config.json")).unwrap();
    assert!(cfg.qk_norm.is_none() && cfg.dual_attention_layers.is_empty());
    check("sd3medium", "none");
}

/// CFG batched as the official NAG pipeline does: image rows [uncond, cond], NAG's negative
/// stream pairs with the cond row. The cond row must equal the single NAG call, the uncond
/// row a plain call on the negative context.
#[test]
fn cfg_batched_nag_guides_only_the_cond_row() {
    let fx = Fixture::load("sd3", "transformer_large_nag.safetensors");
    let mmdit = load_model("large");
    let guide = guide_of(&fx).unwrap();
    let (x, t) = (fx.t("hidden_states"), fx.t("timestep"));
    let (pos, neg) = (fx.t("encoder_hidden_states"), fx.t("neg_encoder_hidden_states"));
    let (pooled, neg_pooled) = (fx.t("pooled"), fx.t("neg_pooled"));
    let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0).unwrap();
    let both = mmdit
        .forward(&MmditInputs {
            latents: &cat(x, x),
            timestep: &cat(t, t),
            context: &cat(neg, pos),
            pooled: &cat(neg_pooled, pooled),
            guidance: Some(&NegativeContext { method: &guide, states: neg, pooled: Some(pooled), rows: 1..2 }),
        })
        .unwrap();
    assert_close("cfg+nag cond row", &both.narrow(0, 1, 1).unwrap(), fx.t("output"), 1e-4);
    let uncond = mmdit
        .forward(&MmditInputs { latents: x, timestep: t, context: neg, pooled: neg_pooled, guidance: None })
        .unwrap();
    assert_close("cfg+nag uncond row", &both.narrow(0, 0, 1).unwrap(), &uncond, 1e-5);
    // And the uncond row really is unguided: it differs from the cond row.
    assert!(rel_diff(&both.narrow(0, 0, 1).unwrap(), &both.narrow(0, 1, 1).unwrap()) > 1e-3);
}

/// The computed position table equals the one diffusers saves in the checkpoint.
#[test]
fn computed_position_table_equals_checkpoint() {
    let dir = transformer_dir("large");
    let cfg = MmditConfig::from_file(&dir.join("config.json")).unwrap();
    let files = weight_files(&dir, "diffusion_pytorch_model").unwrap();
    let vb = var_builder(&files, DType::F32, &Device::Cpu).unwrap();
    let max = cfg.pos_embed_max_size;
    let stored = vb.get((1, max * max, cfg.inner_dim()), "pos_embed.pos_embed").unwrap();
    let computed =
        embeddings::sincos_table(cfg.inner_dim(), max, cfg.sample_size / cfg.patch_size, &Device::Cpu).unwrap();
    assert_close("pos_embed table", &computed.unsqueeze(0).unwrap(), &stored, 1e-6);
}

#[test]
fn bad_inputs_are_errors() {
    let mmdit = load_model("large");
    let fx = Fixture::load("sd3", "transformer_large_none.safetensors");
    // Latents larger than the position table (16 x 16 patches -> 34 x 34 latents is too big).
    let big = Tensor::zeros((1, 16, 34, 34), DType::F32, &Device::Cpu).unwrap();
    let err = mmdit
        .forward(&MmditInputs {
            latents: &big,
            timestep: fx.t("timestep"),
            context: fx.t("encoder_hidden_states"),
            pooled: fx.t("pooled"),
            guidance: None,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("pos_embed_max_size"), "{err}");
    // A batch mismatch between latents and text.
    let two = Tensor::cat(&[fx.t("hidden_states"), fx.t("hidden_states")], 0).unwrap();
    let err = mmdit
        .forward(&MmditInputs {
            latents: &two,
            timestep: fx.t("timestep"),
            context: fx.t("encoder_hidden_states"),
            pooled: fx.t("pooled"),
            guidance: None,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch"), "{err}");
}

#[test]
fn config_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"qk_norm": "layer_norm"}"#).unwrap();
    let err = MmditConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("qk_norm") && err.contains("config.json"), "{err}");
    std::fs::write(&path, r#"{"num_layers": 2, "dual_attention_layers": [5]}"#).unwrap();
    assert!(MmditConfig::from_file(&path).unwrap_err().to_string().contains("dual_attention_layers"));
    std::fs::write(&path, r#"{"caption_projection_dim": 7}"#).unwrap();
    assert!(MmditConfig::from_file(&path).unwrap_err().to_string().contains("caption_projection_dim"));
}
