//! `veto generate` on the tiny PixArt-Sigma folder through the family registry: CFG+NAG equals
//! the reference (tools/reference/pixart_reference.py), sizes off the bins run binned with a
//! warning, PixArt-only mistakes are named.

#[path = "../../veto/tests/common/mod.rs"]
mod common;

use candle_core::Device;
use common::{fixtures, rel_diff, Fixture};
use std::process::{Command, Output};

fn veto(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veto")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run veto")
}

#[test]
fn pixart_cfg_nag_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::load("pixart", "pipeline_cfg_nag.safetensors");
    let init = dir.path().join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", fx.t("init_latents").clone())]),
        &init,
    )
    .unwrap();
    let (out, saved) = (dir.path().join("out.png"), dir.path().join("final.safetensors"));
    let model = fixtures("pixart").join("sigma");
    let o = veto(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        fx.m("prompt"),
        "--negative-prompt",
        fx.m("negative_prompt"),
        "--steps",
        "4",
        "--height",
        "240",
        "--width",
        "272",
        "--guidance",
        "cfg+nag",
        "--guidance-scale",
        "4.5",
        "--nag-scale",
        "5",
        "--nag-tau",
        "2.5",
        "--nag-alpha",
        "0.375",
        "--init-latents",
        init.to_str().unwrap(),
        "--save-latents",
        saved.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "veto failed: {}", String::from_utf8_lossy(&o.stderr));
    let png = image::open(&out).expect("a readable PNG");
    assert_eq!((png.width(), png.height()), (272, 240));
    let got = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
    let d = rel_diff(&got["latents"], fx.t("final_latents"));
    assert!(d <= 1e-4, "saved latents differ from the reference by {d:e}");
}

#[test]
fn pixart_off_bin_sizes_warn_and_bad_pag_layers_fail_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures("pixart").join("sigma");
    let out = dir.path().join("out.png");
    let base = ["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "1"];
    let mut args = base.to_vec();
    args.extend(["--height", "250", "--width", "260", "--output", out.to_str().unwrap()]);
    let o = veto(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "veto failed: {err}");
    assert!(err.contains("250x260") && err.contains("240x256"), "{err}");
    let mut args = base.to_vec();
    args.extend(["--guidance", "pag", "--pag-layers", "blocks.9", "--output", out.to_str().unwrap()]);
    let o = veto(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("blocks.9"), "{err}");
}
