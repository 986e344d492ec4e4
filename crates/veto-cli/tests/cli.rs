//! The `veto` binary end to end on the tiny pipeline folders (saved latents equal the reference's;
//! stochastic samplers replayed from `--init-latents` step noise), and its handling of bad input.

// The parity tests' helpers (fixture paths and files, tolerances), shared.
#[path = "../../veto/tests/common/mod.rs"]
mod common;

use candle_core::{Device, Tensor};
use common::{fixtures as fixtures_of, rel_diff, Fixture};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    fixtures_of("flux")
}

fn veto(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veto")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run veto")
}

fn load(path: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A temp folder holding the fixture's initial latents as `init.safetensors`.
fn workdir_of(family: &str, fixture: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::load(family, fixture);
    let init = dir.path().join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", fx.t("init_latents").clone())]),
        &init,
    )
    .unwrap();
    (dir, init)
}

/// `veto generate` on a tiny pipeline folder `family/model` with `flags`; the saved latents
/// must equal the reference pipeline fixture `pipeline_{model}_{case}`.
fn end_to_end(family: &str, model: &str, case: &str, flags: &[&str]) {
    end_to_end_on(family, &fixtures_of(family).join(model), model, case, flags);
}

/// As [`end_to_end`], with `--model path` (a folder or a single file); returns stderr.
fn end_to_end_on(family: &str, path: &Path, model: &str, case: &str, flags: &[&str]) -> String {
    end_to_end_within(family, path, model, case, flags, 1e-4)
}

/// As [`end_to_end_on`], the saved latents within `tol` (relative) of the reference.
fn end_to_end_within(family: &str, path: &Path, model: &str, case: &str, flags: &[&str], tol: f32) -> String {
    let fixture = format!("pipeline_{model}_{case}.safetensors");
    let (dir, init) = workdir_of(family, &fixture);
    let out = dir.path().join("out.png");
    let saved = dir.path().join("final.safetensors");
    let model = path;
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of a cat wearing glasses",
        "--negative-prompt",
        "glasses, blurry",
        "--steps",
        "4",
        "--height",
        "64",
        "--width",
        "64",
        "--init-latents",
        init.to_str().unwrap(),
        "--save-latents",
        saved.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    if family != "unet" {
        args.extend(["--max-sequence-length", "16"]); // T5 tokens; CLIP always takes 77
    }
    args.extend_from_slice(flags);
    let o = veto(&args);
    assert!(o.status.success(), "veto failed: {}", String::from_utf8_lossy(&o.stderr));
    let png = image::open(&out).expect("a readable PNG");
    assert_eq!((png.width(), png.height()), (64, 64));
    let want = Fixture::load(family, &fixture);
    let d = rel_diff(&load(&saved)["latents"], want.t("final_latents"));
    assert!(d <= tol, "{case}: saved latents differ from the reference by {d:e}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn flux_single_file_end_to_end() {
    let file = fixtures_of("single_file").join("flux_schnell_bfl.safetensors");
    let base = fixtures().join("schnell");
    let flags = ["--base-model", base.to_str().unwrap(), "--guidance", "nag", "--nag-norm", "l1"];
    let stderr = end_to_end_on("flux", &file, "schnell", "nag_l1", &flags);
    assert!(
        stderr
            .contains("single-file checkpoint: transformer: flux_schnell_bfl.safetensors (BFL layout, FLUX.1-schnell)"),
        "{stderr}"
    );
}

/// `--model` a GGUF in the BFL layout (city96's FLUX files), the rest from `--base-model`.
#[test]
fn flux_bfl_gguf_end_to_end() {
    let file = fixtures_of("gguf").join("flux_schnell_bfl_Q8_0.gguf");
    let base = fixtures().join("schnell");
    let flags = ["--base-model", base.to_str().unwrap(), "--guidance", "nag", "--nag-norm", "l1"];
    let stderr = end_to_end_within("flux", &file, "schnell", "nag_l1", &flags, 2e-2);
    assert!(stderr.contains("the transformer from the GGUF file (BFL layout, FLUX.1-schnell)"), "{stderr}");
}

#[test]
fn base_model_needs_a_single_file() {
    expect_failure(&["--base-model", "black-forest-labs/FLUX.1-dev"], "only applies to a single-file checkpoint");
}

#[test]
fn flux_nag_end_to_end() {
    end_to_end(
        "flux",
        "schnell",
        "nag_l1",
        &["--guidance", "nag", "--nag-scale", "5", "--nag-tau", "2.5", "--nag-alpha", "0.25", "--nag-norm", "l1"],
    );
}

#[test]
fn sd3_nag_end_to_end() {
    end_to_end(
        "sd3",
        "large",
        "nag",
        &["--guidance", "nag", "--nag-scale", "5", "--nag-tau", "2.5", "--nag-alpha", "0.125", "--guidance-scale", "0"],
    );
}

#[test]
fn sd3_vsf_official_end_to_end() {
    end_to_end(
        "sd3",
        "large",
        "vsf_official",
        &[
            "--guidance",
            "vsf",
            "--vsf-scale",
            "3.5",
            "--vsf-bias",
            "0.1",
            "--vsf-layout",
            "official",
            "--guidance-scale",
            "0",
        ],
    );
}

#[test]
fn sdxl_cfg_pag_nag_end_to_end() {
    end_to_end(
        "unet",
        "sdxl",
        "cfg_pag_nag",
        &[
            "--guidance",
            "cfg+pag+nag",
            "--guidance-scale",
            "5",
            "--pag-scale",
            "3",
            "--pag-layers",
            "mid",
            "--nag-scale",
            "3",
            "--nag-tau",
            "2.5",
            "--nag-alpha",
            "0.5",
        ],
    );
}

#[test]
fn sd15_cfg_nag_end_to_end() {
    end_to_end(
        "unet",
        "sd15",
        "cfg_nag",
        &[
            "--guidance",
            "cfg+nag",
            "--guidance-scale",
            "5",
            "--nag-scale",
            "3",
            "--nag-tau",
            "2.5",
            "--nag-alpha",
            "0.375",
        ],
    );
}

#[test]
fn unet_only_flags_are_rejected_for_flux() {
    expect_failure(&["--timesteps", "999,499"], "--timesteps: not supported for Flux");
}

/// Runs `veto generate` on the tiny model with `extra` flags; expects a clean failure whose
/// message contains `needle`, and no output file.
fn expect_failure(extra: &[&str], needle: &str) {
    expect_failure_on(&fixtures().join("schnell"), extra, needle)
}

/// As [`expect_failure`], on the tiny pipeline folder `model`.
fn expect_failure_on(model: &Path, extra: &[&str], needle: &str) {
    expect_failure_with(model, extra, needle, true)
}

/// `before_loading`: the failure must come before any weights load ("loading" never printed).
fn expect_failure_with(model: &Path, extra: &[&str], needle: &str, before_loading: bool) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    // Base flags as (flag, value) pairs; a flag given in `extra` replaces its base value.
    let base = [
        ("--model", model.to_str().unwrap()),
        ("--prompt", "a cat"),
        ("--negative-prompt", "glasses"),
        ("--steps", "1"),
        ("--height", "64"),
        ("--width", "64"),
        ("--max-sequence-length", "16"),
        ("--output", out.to_str().unwrap()),
    ];
    let mut args = vec!["generate"];
    for (flag, value) in base {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let o = veto(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure for {extra:?}");
    assert!(!stderr.contains("panicked"), "panic for {extra:?}: {stderr}");
    assert!(stderr.contains(needle), "message for {extra:?} lacks {needle:?}: {stderr}");
    // Decided from the flags and the config files: no weights were loaded.
    if before_loading {
        assert!(!stderr.contains("loading "), "weights loaded before failing for {extra:?}: {stderr}");
    }
    assert!(!out.exists(), "output written despite failure for {extra:?}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "files left behind for {extra:?}: {leftovers:?}");
}

#[test]
fn bad_tau() {
    expect_failure(&["--nag-tau", "0"], "--nag-tau");
}

#[test]
fn bad_alpha() {
    expect_failure(&["--nag-alpha", "1.5"], "--nag-alpha");
}

#[test]
fn bad_height() {
    expect_failure(&["--height", "72"], "--height: height and width must be positive multiples of 16");
}

#[test]
fn unknown_guidance() {
    expect_failure(&["--guidance", "magic"], "unknown guidance 'magic'");
}

#[test]
fn bad_nag_end() {
    expect_failure(&["--nag-end", "2"], "--nag-end");
}

#[test]
fn missing_model_folder() {
    expect_failure(&["--model", "/nonexistent/flux-folder"], "/nonexistent/flux-folder");
}

#[test]
fn missing_init_latents_file() {
    expect_failure(&["--init-latents", "/nonexistent/init.safetensors"], "/nonexistent/init.safetensors");
}

#[test]
fn wrong_shape_init_latents() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    let t = Tensor::zeros((1, 16, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents", t)]), &bad).unwrap();
    expect_failure(&["--init-latents", bad.to_str().unwrap()], "init latents have shape [1, 16, 4, 4]");
}

#[test]
fn model_folder_missing_a_component_file() {
    // A copy of the tiny pipeline without the transformer config.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("broken");
    common::copy_dir(&fixtures().join("schnell"), &copy);
    std::fs::remove_file(copy.join("transformer/config.json")).unwrap();
    expect_failure(&["--model", copy.to_str().unwrap()], "transformer/config.json");
}

#[test]
fn help_names_the_paper_symbols() {
    let o = veto(&["generate", "--help"]);
    let s = String::from_utf8_lossy(&o.stdout);
    for sym in ["phi", "tau", "alpha", "theta"] {
        assert!(s.contains(sym), "--help lacks {sym}");
    }
}

#[test]
fn a_method_given_twice_is_named() {
    expect_failure(&["--guidance", "cfg+cfg"], "cfg given twice");
}

#[test]
fn a_method_the_family_lacks_is_refused_with_what_it_has() {
    expect_failure(&["--guidance", "vsf"], "guidance 'vsf' is not available for Flux (supported: none, nag, nasa, cfg");
}

#[test]
fn negative_numbers_parse_and_are_range_checked() {
    expect_failure(&["--nag-scale", "-5"], "--nag-scale: must be >= 1");
}

#[test]
fn extreme_scales_stop_at_the_step_that_blows_up() {
    // f32 overflows: NAG's extrapolation becomes inf - inf. The run stops at step 1, names the
    // flags to lower, and writes nothing (expect_failure checks the folder stays empty).
    expect_failure_with(
        &fixtures().join("schnell"),
        &["--nag-scale", "1e300", "--nag-tau", "1e300", "--nag-alpha", "1"],
        "step 1/1 (t = 1000) produced non-finite latents under guidance 'nag'; lower --nag-scale or --nag-tau",
        false,
    );
}

/// Runs the tiny schnell pipeline for one step at 64x64 with `extra` flags; returns stderr.
fn run_tiny(extra: &[&str]) -> String {
    let model = fixtures().join("schnell");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--negative-prompt",
        "glasses",
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--max-sequence-length",
        "16",
    ];
    args.extend_from_slice(extra);
    let o = veto(&args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "veto failed: {stderr}");
    stderr
}

#[test]
fn the_png_records_how_it_was_made_and_other_formats_write() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let stderr = run_tiny(&["--seed", "5", "--output", out.to_str().unwrap()]);
    assert!(stderr.contains("seed 5"), "{stderr}");
    assert!(stderr.contains("weights: about 0.") && stderr.contains("GB in F32"), "{stderr}");
    assert!(stderr.contains("memory: resident"), "auto picks resident when it fits: {stderr}");
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap())).read_info().unwrap();
    let text = &reader.info().uncompressed_latin1_text;
    let parameters = &text.iter().find(|t| t.keyword == "parameters").expect("a parameters chunk").text;
    assert!(parameters.starts_with("a cat\nNegative prompt: glasses\nSteps: 1, Seed: 5, Size: 64x64"), "{parameters}");
    assert!(parameters.contains("Guidance: nag, Guidance scale: 0, NAG scale: 5, NAG tau: 2.5"), "{parameters}");
    let json = &reader.info().utf8_text.iter().find(|t| t.keyword == "veto").expect("a veto chunk");
    let json: serde_json::Value = serde_json::from_str(&json.get_text().unwrap()).unwrap();
    assert_eq!(json["seed"], 5);
    assert_eq!(json["family"], "flux");

    // Without --seed a random one is drawn, printed, and two images get consecutive seeds.
    let jpg = dir.path().join("y.jpg");
    let stderr = run_tiny(&["--num-images", "2", "--output", jpg.to_str().unwrap()]);
    let seeds: Vec<u64> = stderr.lines().filter_map(|l| l.strip_prefix("seed ")).map(|s| s.parse().unwrap()).collect();
    assert_eq!(seeds.len(), 2, "{stderr}");
    assert_eq!(seeds[1], seeds[0] + 1);
    for name in ["y-0.jpg", "y-1.jpg"] {
        let img = image::open(dir.path().join(name)).expect("a readable JPEG");
        assert_eq!((img.width(), img.height()), (64, 64));
    }
}

/// `--memory sequential` and `--text-encoder-device cpu` make the same image as the default
/// (resident), two images from one encoding.
#[test]
fn sequential_memory_and_text_encoder_device_make_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    run_tiny(&["--seed", "9", "--num-images", "2", "--memory", "resident", "--output", &path("a.png")]);
    let stderr = run_tiny(&[
        "--seed",
        "9",
        "--num-images",
        "2",
        "--memory",
        "sequential",
        "--text-encoder-device",
        "cpu",
        "--output",
        &path("b.png"),
    ]);
    assert!(stderr.contains("memory: sequential"), "{stderr}");
    for k in 0..2 {
        let a = image::open(path(&format!("a-{k}.png"))).unwrap().to_rgb8();
        let b = image::open(path(&format!("b-{k}.png"))).unwrap().to_rgb8();
        assert_eq!(a.as_raw(), b.as_raw(), "image {k}");
    }
}

/// `--nag-variant shared-image` runs on Flux and is recorded; other families and methods
/// refuse it before loading.
#[test]
fn nag_variant_is_flux_and_nag_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("v.png");
    run_tiny(&["--nag-variant", "shared-image", "--output", out.to_str().unwrap()]);
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap())).read_info().unwrap();
    let parameters = &reader.info().uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").unwrap().text;
    assert!(parameters.contains("NAG variant: shared-image"), "{parameters}");
    expect_failure(&["--nag-variant", "sideways"], "--nag-variant: unknown NAG variant 'sideways'");
    expect_failure(&["--nag-variant", "shared-image", "--guidance", "cfg"], "--nag-variant does not apply");
    let sd3 = fixtures_of("sd3").join("large");
    expect_failure_on(&sd3, &["--nag-variant", "shared-image"], "SD3 has only the official NAG data flow");
}

#[test]
fn outputs_are_checked_before_the_model_loads() {
    expect_failure(&["--output", "x.gif"], "--output: x.gif has no image extension veto writes");
    let dir = tempfile::tempdir().unwrap();
    let same = dir.path().join("x.png");
    let same = same.to_str().unwrap();
    expect_failure(&["--save-latents", same, "--output", same], "--save-latents");
    expect_failure(&["--output", dir.path().to_str().unwrap()], "has no image extension");
}

#[test]
fn flags_that_do_not_apply_are_errors_that_say_why() {
    expect_failure(&["--vsf-scale", "2"], "--vsf-scale does not apply: it needs vsf in --guidance, which is 'nag'");
    expect_failure(&["--nag-pooled", "negative"], "--nag-pooled does not apply: Flux has no pooled vector");
    expect_failure(&["--guidance", "none"], "--negative-prompt does not apply: guidance 'none' uses none");
    expect_failure(&["--guidance", "cfg", "--nag-tau", "2"], "--nag-tau does not apply: it needs nag");
    let sd3 = fixtures_of("sd3").join("large");
    expect_failure_on(
        &sd3,
        &["--true-cfg-scale", "3"],
        "--true-cfg-scale does not apply: SD3's CFG scale is --guidance-scale",
    );
    let sdxl = fixtures_of("unet").join("sdxl");
    expect_failure_on(&sdxl, &[], "--max-sequence-length does not apply: the UNet family (SD1.5, SDXL) has no T5");
}

#[test]
fn eta_needs_a_scheduler_that_takes_it() {
    // The tiny SDXL folder uses EulerDiscreteScheduler.
    let sdxl = fixtures_of("unet").join("sdxl");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = veto(&[
        "generate",
        "--model",
        sdxl.to_str().unwrap(),
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--height",
        "64",
        "--width",
        "64",
        "--eta",
        "0.5",
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("--eta: EulerDiscreteScheduler takes no eta (DDIM and TCD do)"), "{stderr}");
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// Stochastic samplers replayed from `noise_<case>.safetensors` (tools/reference/noise_replay_reference.py).
// ---------------------------------------------------------------------------------------------

/// A copy of the tiny SDXL folder with `scheduler_config` (JSON text) as its scheduler.
fn sdxl_with_scheduler(dir: &Path, scheduler_config: &str) -> PathBuf {
    let model = dir.join("sdxl");
    common::copy_dir(&fixtures_of("unet").join("sdxl"), &model);
    std::fs::write(model.join("scheduler/scheduler_config.json"), scheduler_config).unwrap();
    model
}

/// `veto generate` on `model` (an SDXL folder) at 64x64 with `extra` flags.
fn veto_sdxl(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of a cat wearing glasses",
        "--height",
        "64",
        "--width",
        "64",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    veto(&args)
}

/// The reference ran diffusers' stock SDXL pipeline with a stochastic scheduler from `latents`
/// and recorded the scheduler's draws as `step_noise`; `veto generate --init-latents` on that
/// file must land on diffusers' final latents, save the noise it used, and replay its own saved
/// file bit for bit.
fn noise_replay(case: &str) {
    let file = format!("noise_{case}.safetensors");
    let fx = Fixture::load("unet", &file);
    let dir = tempfile::tempdir().unwrap();
    let model = sdxl_with_scheduler(dir.path(), fx.m("scheduler_config"));
    let init = fixtures_of("unet").join(&file);
    let (out, saved, replayed) =
        (dir.path().join("out.png"), dir.path().join("run.safetensors"), dir.path().join("again.safetensors"));
    let mut flags = vec!["--guidance".to_string(), fx.m("guidance").to_string()];
    flags.extend(["--guidance-scale".to_string(), fx.m("guidance_scale").to_string()]);
    if !fx.m("negative_prompt").is_empty() {
        flags.extend(["--negative-prompt".to_string(), fx.m("negative_prompt").to_string()]);
    }
    match fx.m("custom_timesteps") {
        "" => flags.extend(["--steps".to_string(), fx.m("steps").to_string()]),
        ts => {
            let ts: Vec<f64> = serde_json::from_str(ts).unwrap();
            flags.extend(["--timesteps".to_string(), ts.iter().map(f64::to_string).collect::<Vec<_>>().join(",")]);
        }
    }
    if !fx.m("eta").is_empty() {
        flags.extend(["--eta".to_string(), fx.m("eta").to_string()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let run = |from: &Path, to: &Path| {
        let mut args = flags.clone();
        args.extend(["--init-latents", from.to_str().unwrap(), "--save-latents", to.to_str().unwrap()]);
        let o = veto_sdxl(&model, &out, &args);
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{case}: veto failed: {stderr}");
        assert!(!stderr.contains("warning"), "{case}: {stderr}");
        load(to)
    };
    let first = run(&init, &saved);
    let d = rel_diff(&first["latents"], fx.t("final_latents"));
    assert!(d <= 1e-4, "{case}: final latents differ from diffusers' by {d:e}");
    assert_eq!(rel_diff(&first["step_noise"], fx.t("step_noise")), 0.0, "{case}: saved step noise");
    assert_eq!(rel_diff(&first["init_latents"], fx.t("latents")), 0.0, "{case}: saved init latents");
    // veto's own file replays the run.
    let again = run(&saved, &replayed);
    assert_eq!(rel_diff(&again["latents"], &first["latents"]), 0.0, "{case}: replay");
}

#[test]
fn noise_replay_lcm_dmd2() {
    noise_replay("lcm_dmd2");
}

#[test]
fn noise_replay_tcd_hyper_sdxl() {
    noise_replay("tcd_hyper_sdxl");
}

#[test]
fn noise_replay_ddim_eta() {
    noise_replay("ddim_eta");
}

#[test]
fn noise_replay_dpmpp_sde() {
    noise_replay("dpmpp_sde");
}

#[test]
fn noise_replay_euler_a() {
    noise_replay("euler_a");
}

#[test]
fn a_seeded_stochastic_run_saves_what_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let lcm = std::fs::read_to_string(fixtures_of("unet").join("schedulers/dmd2_lcm.json")).unwrap();
    let model = sdxl_with_scheduler(dir.path(), &lcm);
    let out = dir.path().join("out.png");
    let (saved, replayed) = (dir.path().join("run.safetensors"), dir.path().join("again.safetensors"));
    let base = ["--guidance", "none", "--guidance-scale", "0", "--steps", "4", "--seed", "9"];
    let o = veto_sdxl(&model, &out, &[&base[..], &["--save-latents", saved.to_str().unwrap()][..]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = load(&saved);
    assert_eq!(first["step_noise"].dims(), [3, 1, 4, 8, 8]);
    assert_eq!(first["init_latents"].dims(), [1, 4, 8, 8]);
    // Another seed, but the saved file's latents and noise: the same run.
    let args = [
        &base[..6],
        &["--seed", "10", "--init-latents", saved.to_str().unwrap(), "--save-latents", replayed.to_str().unwrap()][..],
    ]
    .concat();
    let o = veto_sdxl(&model, &out, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(rel_diff(&load(&replayed)["latents"], &first["latents"]), 0.0);
}

/// A step noise file for the tiny SDXL folder's LCM copy: `latents` and `step_noise` of `dims`.
fn noise_file(dir: &Path, dims: &[usize]) -> PathBuf {
    let path =
        dir.join(format!("noise-{}.safetensors", dims.iter().map(usize::to_string).collect::<Vec<_>>().join("x")));
    let zeros = |d: &[usize]| Tensor::zeros(d, candle_core::DType::F32, &Device::Cpu).unwrap();
    let tensors = std::collections::HashMap::from([("latents", zeros(&[1, 4, 8, 8])), ("step_noise", zeros(dims))]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn step_noise_of_the_wrong_count_or_shape_stops_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let lcm = std::fs::read_to_string(fixtures_of("unet").join("schedulers/dmd2_lcm.json")).unwrap();
    let model = sdxl_with_scheduler(dir.path(), &lcm);
    let out = dir.path().join("out.png");
    for (dims, needle) in [
        (
            &[2, 1, 4, 8, 8][..],
            "--init-latents (step_noise): step noise has 2 noise tensors, LCMScheduler with 4 steps draws 3 (at steps 0, 1, 2)",
        ),
        (&[3, 1, 4, 4, 4][..], "--init-latents (step_noise): step noise has shape [3, 1, 4, 4, 4], expected [3, 1, 4, 8, 8]"),
    ] {
        let file = noise_file(dir.path(), dims);
        let o = veto_sdxl(&model, &out, &["--guidance", "none", "--steps", "4", "--init-latents", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{dims:?} accepted");
        assert!(stderr.contains(needle), "{dims:?}: {stderr}");
        assert!(!stderr.contains("loading") && !stderr.contains("panicked"), "{dims:?}: {stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn step_noise_for_a_deterministic_sampler_is_a_warning() {
    // The tiny SDXL folder's own scheduler is Euler (deterministic).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let file = noise_file(dir.path(), &[3, 1, 4, 8, 8]);
    let model = fixtures_of("unet").join("sdxl");
    let o = veto_sdxl(&model, &out, &["--guidance", "none", "--steps", "2", "--init-latents", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr
            .contains("warning: step_noise is unused: EulerDiscreteScheduler with 2 steps adds no noise between steps"),
        "{stderr}"
    );
}

#[test]
fn absurd_sizes_stop_before_loading_with_an_estimate() {
    expect_failure(&["--height", "100000", "--width", "100000"], "--height: a 100000x100000 image needs about");
}

#[test]
fn lora_end_to_end() {
    // tests/fixtures/lora: diffusers' FluxPipeline with the kohya LoRA fused at 0.5.
    let fixture = "expected_flux_scale05.safetensors";
    let (dir, init) = workdir_of("lora", fixture);
    let (out, saved) = (dir.path().join("out.png"), dir.path().join("final.safetensors"));
    let model = fixtures().join("schnell");
    let lora = fixtures_of("lora").join("flux_kohya.safetensors");
    let lora = format!("{}:0.5", lora.display());
    #[rustfmt::skip]
    let args = [
        "generate", "--model", model.to_str().unwrap(), "--lora", &lora,
        "--prompt", "a photo of a cat wearing glasses", "--guidance", "none", "--guidance-scale", "0",
        "--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "16",
        "--init-latents", init.to_str().unwrap(), "--save-latents", saved.to_str().unwrap(),
        "--output", out.to_str().unwrap(),
    ];
    let o = veto(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "veto failed: {stderr}");
    assert!(
        stderr.contains("lora flux_kohya.safetensors (kohya, 114 tensors, scale 0.5) → transformer, text_encoder"),
        "{stderr}"
    );
    let want = Fixture::load("lora", fixture);
    let d = rel_diff(&load(&saved)["latents"], want.t("final_latents"));
    assert!(d <= 1e-4, "saved latents differ from diffusers' fused LoRA run by {d:e}");
}

#[test]
fn lora_errors() {
    expect_failure(&["--lora", "x.safetensors:strong"], "--lora");
    let sdxl = fixtures_of("lora").join("sdxl_kohya.safetensors");
    expect_failure(&["--lora", sdxl.to_str().unwrap()], "probably made for another model family");
    expect_failure(&["--lora", "missing.safetensors"], "LoRA file not found");
}
