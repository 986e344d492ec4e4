//! Parity of SANA-Sprint with diffusers (tools/reference/sana_sprint_reference.py): one call of
//! the Sprint `SanaTransformer2DModel` (guidance embedding, `rms_norm_across_heads` qk-norm on
//! both attentions) per block and output, plain and with NAG on the cross-attention (the official
//! generic NAG processor's semantics); `SCMScheduler`'s timesteps; and the stock
//! `SanaSprintPipeline` loop (1 step, 2 steps with the default intermediate angle, and 2 steps
//! with NAG): every step's latents and the final latents, the scheduler's per-step noise replayed;
//! f32, 1e-4 relative. Plus the step-count warning and refusing a non-Sprint transformer.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, Fixture};
use veto::guidance::{AttentionGuidance, NagParams, NegativeContext};
use veto::loading::weights::ComponentWeights;
use veto::models::sana::{SanaConfig, SanaInputs, SanaTransformer2DModel};
use veto::pipelines::sana_sprint::{denoise, steps_warning, SprintConditioning};
use veto::schedulers::scheduler::FixedNoise;
use veto::schedulers::scm::{ScmScheduler, INTERMEDIATE_TIMESTEPS, MAX_TIMESTEPS};

fn sprint_folder() -> std::path::PathBuf {
    fixtures("sana").join("sana_sprint")
}

fn load_transformer(dir: &std::path::Path) -> SanaTransformer2DModel {
    let weights = ComponentWeights::from_dir(dir, "diffusion_pytorch_model", "transformer").unwrap();
    let config = SanaConfig::from_file(weights.config_path()).unwrap();
    SanaTransformer2DModel::new(&config, weights.var_builder(DType::F32, &Device::Cpu).unwrap()).unwrap()
}

fn lens(mask: &Tensor) -> Vec<usize> {
    let rows: Vec<Vec<f32>> = mask.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
    rows.iter().map(|r| r.iter().sum::<f32>() as usize).collect()
}

fn nag(fx: &Fixture) -> AttentionGuidance {
    AttentionGuidance::nag(NagParams {
        scale: fx.f("nag_scale"),
        tau: fx.f("nag_tau"),
        alpha: fx.f("nag_alpha"),
        norm: "l1".parse().unwrap(),
    })
}

fn first(t: &Tensor) -> f64 {
    f64::from(t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0])
}

fn transformer_case(case: &str) {
    let fx = Fixture::load("sana", "sprint_transformer.safetensors");
    let model = load_transformer(&sprint_folder().join("transformer"));
    assert!(model.config().guidance_embeds);
    let lens = lens(fx.t("encoder_attention_mask"));
    assert_eq!(lens, [7, 5]);
    let method = (case == "nag").then(|| nag(&fx));
    let neg_len = self::lens(fx.t("negative_mask"))[0];
    let neg_states = fx.t("negative_states").narrow(1, 0, neg_len).unwrap();
    let row = fx.m("guided_row").parse::<usize>().unwrap();
    let negative =
        method.as_ref().map(|m| NegativeContext { method: m, states: &neg_states, pooled: None, rows: row..row + 1 });
    let mut trace = Vec::new();
    let out = model
        .forward_traced(
            &SanaInputs {
                latents: fx.t("hidden_states"),
                timestep: first(fx.t("timestep")),
                caption: fx.t("encoder_hidden_states"),
                caption_lens: &lens,
                guidance: negative.as_ref(),
                embedded_guidance: Some(first(fx.t("guidance"))),
                perturbation: None,
            },
            Some(&mut trace),
        )
        .unwrap();
    for (k, t) in trace.iter().enumerate() {
        assert_close(&format!("{case}/block {k}"), t, fx.t(&format!("{case}_block_{k}")), 1e-4);
    }
    assert_close(&format!("{case}/output"), &out, fx.t(&format!("{case}_output")), 1e-4);
}

#[test]
fn sprint_transformer_none() {
    transformer_case("none");
}

#[test]
fn sprint_transformer_nag() {
    transformer_case("nag");
}

fn pipeline_case(name: &str) {
    let fx = Fixture::load("sana", &format!("sprint_pipeline_{name}.safetensors"));
    let model = load_transformer(&sprint_folder().join("transformer"));
    let config = std::fs::read_to_string(sprint_folder().join("scheduler").join("scheduler_config.json")).unwrap();
    let mut scheduler = ScmScheduler::from_value(serde_json::from_str(&config).unwrap()).unwrap();
    let steps: usize = fx.m("steps").parse().unwrap();
    scheduler.set_angles(steps, MAX_TIMESTEPS, Some(INTERMEDIATE_TIMESTEPS)).unwrap();
    let want: Vec<f32> = fx.t("all_timesteps").to_vec1().unwrap();
    assert_eq!(scheduler.angles(), want.iter().map(|&t| f64::from(t)).collect::<Vec<_>>());
    let method = (fx.m("attention") == "nag").then(|| nag(&fx));
    let negative = method.as_ref().map(|m| NegativeContext {
        method: m,
        states: fx.t("negative_embeds"),
        pooled: None,
        rows: 0..1,
    });
    let cond = SprintConditioning {
        caption: fx.t("prompt_embeds"),
        guidance: negative.as_ref(),
        guidance_scale: fx.f("guidance_scale"),
    };
    let mut noise = FixedNoise::from_stacked(&fx.t("step_noise").unsqueeze(1).unwrap()).unwrap();
    let run = denoise(&model, &mut scheduler, fx.t("init_latents"), &cond, &mut noise).unwrap();
    assert_eq!(run.steps.len(), steps);
    for (k, s) in run.steps.iter().enumerate() {
        assert_close(&format!("{name}/step {k}"), s, fx.t(&format!("step_{k}_latents")), 1e-4);
    }
    assert_close(&format!("{name}/final"), &run.latents, fx.t("final_latents"), 1e-4);
}

#[test]
fn sprint_pipeline_one_step() {
    pipeline_case("1step");
}

#[test]
fn sprint_pipeline_two_steps() {
    pipeline_case("2step");
}

#[test]
fn sprint_pipeline_two_steps_nag() {
    pipeline_case("nag_2step");
}

#[test]
fn more_steps_than_sprint_supports_warn() {
    assert!(steps_warning(4).is_none());
    assert!(steps_warning(5).unwrap().contains("1-4 steps"));
}

#[test]
fn a_plain_sana_transformer_is_not_a_sprint_model() {
    let model = load_transformer(&fixtures("sana").join("sana_1600m").join("transformer"));
    let mut scheduler = ScmScheduler::from_value(serde_json::json!({})).unwrap();
    scheduler.set_angles(1, MAX_TIMESTEPS, None).unwrap();
    let x = Tensor::zeros((1, 8, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let caption = Tensor::zeros((1, 3, 24), DType::F32, &Device::Cpu).unwrap();
    let cond = SprintConditioning { caption: &caption, guidance: None, guidance_scale: 4.5 };
    let err = denoise(&model, &mut scheduler, &x, &cond, &mut FixedNoise::default()).err().unwrap();
    assert!(err.to_string().contains("guidance_embeds"), "{err}");
}
