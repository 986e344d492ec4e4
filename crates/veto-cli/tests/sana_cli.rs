//! `veto generate` on the tiny SANA folder through the family registry: CFG+NAG equals the
//! reference (tools/reference/sana_reference.py), sizes off the bins run binned with a warning
//! and the image comes back at the asked size, SANA-only mistakes are named before loading.

#[path = "../../veto/tests/common/mod.rs"]
mod common;

use candle_core::Device;
use common::{fixtures, rel_diff, Fixture};
use std::process::{Command, Output};

fn veto(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veto")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run veto")
}

#[test]
fn sana_cfg_nag_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::load("sana", "pipeline_cfg_nag.safetensors");
    let init = dir.path().join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", fx.t("init_latents").clone())]),
        &init,
    )
    .unwrap();
    let (out, saved) = (dir.path().join("out.png"), dir.path().join("final.safetensors"));
    let model = fixtures("sana").join("sana_1600m");
    let o = veto(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        fx.m("prompt"),
        "--negative-prompt",
        fx.m("negative_prompt"),
        "--steps",
        fx.m("steps"),
        "--height",
        fx.m("height"),
        "--width",
        fx.m("width"),
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
    assert_eq!((png.width(), png.height()), (1024, 960));
    let got = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
    let d = rel_diff(&got["latents"], fx.t("final_latents"));
    assert!(d <= 1e-4, "saved latents differ from the reference by {d:e}");
}

#[test]
fn sana_off_bin_sizes_come_back_at_the_asked_size_and_bad_settings_fail_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures("sana").join("sana_1600m");
    let out = dir.path().join("out.png");
    let base = ["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "1"];
    let mut args = base.to_vec();
    args.extend(["--guidance", "none", "--height", "500", "--width", "700", "--output", out.to_str().unwrap()]);
    let o = veto(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "veto failed: {err}");
    assert!(err.contains("500x700") && err.contains("resized"), "{err}");
    let png = image::open(&out).expect("a readable PNG");
    assert_eq!((png.width(), png.height()), (700, 500));
    for (flags, named) in
        [(["--complex-human-instruction", "long"], "long"), (["--pag-layers", "blocks.9"], "blocks.9")]
    {
        let mut args = base.to_vec();
        if named == "blocks.9" {
            args.extend(["--guidance", "pag"]);
        }
        args.extend(flags);
        args.extend(["--output", out.to_str().unwrap()]);
        let o = veto(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(named) && !err.contains("loading"), "{err}");
    }
}
