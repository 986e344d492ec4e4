//! `veto generate` on the tiny Wan T2V folder through the family registry: an MP4 with the
//! asked (4k+1-rounded) frame count, latents saved as `[1, C, F', H/8, W/8]` and replayed, and
//! video-only mistakes (output extension, an image for T2V, frames for an image model) named
//! before any weights load.

#[path = "../../veto/tests/common/mod.rs"]
mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, rel_diff};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn veto(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veto")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run veto")
}

/// The tiny T2V folder (transformer, scheduler) with wan-parts' tokenizer, UMT5 and VAE, as
/// `tests/wan.rs` builds it, under `dir`.
fn wan_folder(dir: &Path) -> PathBuf {
    let model = dir.join("wan");
    common::copy_dir(&fixtures("wan").join("pipeline"), &model);
    for part in ["tokenizer", "text_encoder", "vae"] {
        common::copy_dir(&fixtures("wan_parts").join("wan").join(part), &model.join(part));
    }
    model
}

/// The samples (frames) of the MP4's single video track and its size.
fn mp4_frames(path: &Path) -> (u32, u16, u16) {
    let bytes = std::fs::read(path).unwrap();
    let size = bytes.len() as u64;
    let reader = mp4::Mp4Reader::read_header(Cursor::new(bytes), size).expect("a readable MP4");
    let track = reader.tracks().values().next().expect("a track");
    (track.sample_count(), track.width(), track.height())
}

#[test]
fn t2v_writes_an_mp4_with_the_rounded_frame_count_and_replays_latents() {
    let dir = tempfile::tempdir().unwrap();
    let model = wan_folder(dir.path());
    let (out, saved) = (dir.path().join("fox.mp4"), dir.path().join("final.safetensors"));
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a fox",
            "--negative-prompt",
            "static, blurry",
            "--guidance",
            "cfg+nag",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "48",
            "--frames",
            "6",
            "--seed",
            "3",
            "--output",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |a: Vec<String>| veto(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(args(&out, &["--save-latents", saved.to_str().unwrap()]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "veto failed: {stderr}");
    assert!(stderr.contains("rounded to 5"), "{stderr}");
    assert_eq!(mp4_frames(&out), (5, 48, 32));
    let t = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
    let latents: &Tensor = &t["latents"];
    assert_eq!(latents.dims(), &[1, 4, 2, 4, 6]);

    // The saved file replays the run: same final latents; a GIF has the same frames.
    let (gif, again) = (dir.path().join("fox.gif"), dir.path().join("again.safetensors"));
    let o = run(args(&gif, &["--init-latents", saved.to_str().unwrap(), "--save-latents", again.to_str().unwrap()]));
    assert!(o.status.success(), "veto failed: {}", String::from_utf8_lossy(&o.stderr));
    let replay = candle_core::safetensors::load(&again, &Device::Cpu).unwrap();
    assert!(rel_diff(&replay["latents"], latents) < 1e-6);
    assert!(std::fs::metadata(&gif).unwrap().len() > 0);
}

/// The tiny I2V folder (`WanImageToVideoPipeline`): plus CLIP vision and its processor.
fn wan_i2v_folder(dir: &Path) -> PathBuf {
    let model = dir.join("wan-i2v");
    common::copy_dir(&fixtures("wan").join("pipeline_i2v"), &model);
    for part in ["tokenizer", "text_encoder", "vae", "image_encoder", "image_processor"] {
        common::copy_dir(&fixtures("wan_parts").join("wan").join(part), &model.join(part));
    }
    model
}

#[test]
fn i2v_writes_an_mp4_from_a_png_and_needs_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let model = wan_i2v_folder(dir.path());
    let m = model.to_str().unwrap();
    let png = fixtures("wan").join("i2v_input.png");
    let out = dir.path().join("cat.mp4");
    let base = ["generate", "--model", m, "--prompt", "a cat turns its head", "--negative-prompt", "static"];
    let size = ["--steps", "2", "--height", "32", "--width", "48", "--frames", "5", "--output", out.to_str().unwrap()];
    let mut a: Vec<&str> = base.iter().chain(size.iter()).copied().collect();
    a.extend_from_slice(&["--guidance", "nag", "--image", png.to_str().unwrap()]);
    let o = veto(&a);
    assert!(o.status.success(), "veto failed: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(mp4_frames(&out), (5, 48, 32));

    // Without --image: named before any weights load.
    let a: Vec<&str> = base.iter().chain(size.iter()).copied().collect();
    let o = veto(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("needs an input image"), "{err}");
    assert!(!err.contains("loading"), "{err}");
}

#[test]
fn video_mistakes_fail_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let model = wan_folder(dir.path());
    // No weights: a check that loaded anything would fail on these files instead.
    for part in ["transformer", "text_encoder", "vae"] {
        for f in std::fs::read_dir(model.join(part)).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "safetensors") {
                std::fs::write(&p, b"not weights").unwrap();
            }
        }
    }
    let png = dir.path().join("first.png");
    image::RgbImage::new(8, 8).save(&png).unwrap();
    let m = model.to_str().unwrap();
    let (avi_path, mp4_path) = (dir.path().join("x.avi"), dir.path().join("x.mp4"));
    let (avi, out) = (avi_path.to_str().unwrap(), mp4_path.to_str().unwrap());
    let cases: [(&[&str], &str); 4] = [
        (&["--output", avi], "--output"),
        (&["--output", out, "--image", png.to_str().unwrap()], "--image"),
        (&["--output", out, "--height", "40"], "multiples of 16"),
        (&["--output", out, "--fps", "0"], "--fps"),
    ];
    for (extra, want) in cases {
        let mut a = vec!["generate", "--model", m, "--prompt", "a fox", "--steps", "1"];
        a.extend_from_slice(extra);
        let o = veto(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} should fail");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!err.contains("loading"), "{extra:?} loaded the model: {err}");
    }
}

#[test]
fn video_flags_are_refused_for_image_models() {
    let model = fixtures("flux").join("schnell");
    let o = veto(&["generate", "--model", model.to_str().unwrap(), "--prompt", "a fox", "--frames", "9"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--frames does not apply"), "{err}");
}
