//! `veto generate` on the tiny SANA-Sprint folder (tools/reference/sana_sprint_reference.py)
//! through the family registry: 2 steps with NAG and the scheduler's noise replayed equal the
//! stock `SanaSprintPipeline` with the official generic NAG processor's semantics; CFG is refused
//! before loading; more steps than Sprint supports run with a warning.

#[path = "../../veto/tests/common/mod.rs"]
mod common;

use candle_core::Device;
use common::{fixtures, rel_diff, Fixture};
use std::process::{Command, Output};

fn veto(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veto")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run veto")
}

#[test]
fn sana_sprint_nag_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::load("sana", "sprint_pipeline_nag_2step.safetensors");
    let init = dir.path().join("init.safetensors");
    let noise = fx.t("step_noise").unsqueeze(1).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", fx.t("init_latents").clone()), ("step_noise", noise)]),
        &init,
    )
    .unwrap();
    let (out, saved) = (dir.path().join("out.png"), dir.path().join("final.safetensors"));
    let model = fixtures("sana").join("sana_sprint");
    let o = veto(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        fx.m("prompt"),
        "--negative-prompt",
        fx.m("negative_prompt"),
        "--complex-human-instruction",
        "none",
        "--steps",
        fx.m("steps"),
        "--height",
        "960",
        "--width",
        "1024",
        "--guidance",
        "nag",
        "--guidance-scale",
        fx.m("guidance_scale"),
        "--nag-scale",
        fx.m("nag_scale"),
        "--nag-tau",
        fx.m("nag_tau"),
        "--nag-alpha",
        fx.m("nag_alpha"),
        "--init-latents",
        init.to_str().unwrap(),
        "--save-latents",
        saved.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "veto failed: {}", String::from_utf8_lossy(&o.stderr));
    let png = image::open(&out).expect("a readable PNG");
    assert_eq!((png.width(), png.height()), (1024, 960));
    let got = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
    let d = rel_diff(&got["latents"], fx.t("final_latents"));
    assert!(d <= 1e-4, "saved latents differ from the reference by {d:e}");
}

#[test]
fn sana_sprint_refuses_cfg_and_warns_past_four_steps() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures("sana").join("sana_sprint");
    let out = dir.path().join("out.png");
    let base = ["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--height", "64", "--width", "64"];
    let mut args = base.to_vec();
    args.extend(["--guidance", "cfg+nag", "--output", out.to_str().unwrap()]);
    let o = veto(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no CFG"), "{err}");
    let mut args = base.to_vec();
    args.extend(["--guidance", "none", "--steps", "5", "--output", out.to_str().unwrap()]);
    let o = veto(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "veto failed: {err}");
    assert!(err.contains("1-4 steps"), "{err}");
}
