//! Parity of the UNet-family schedulers with diffusers (tools/reference/unet_reference.py):
//! each fixture drives one scheduler, built from `tests/fixtures/unet/schedulers/<config>.json`,
//! with the fake model `0.1 * scaled_input + 0.05 * timestep / 1000` from fixed latents, and
//! records the schedule, every scaled input and every step's latents (f32, 1e-4 relative).
//! LCM / TCD / Euler a / DPM++ SDE replay the noise diffusers drew.

mod common;

use candle_core::Tensor;
use common::{assert_close, fixtures, Fixture};
use veto::schedulers::load_scheduler;
use veto::schedulers::scheduler::{FixedNoise, Scheduler};

fn close_list(what: &str, got: &[f64], want: &Tensor, tol: f64) {
    let want: Vec<f32> = want.to_vec1().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let w = w as f64;
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: {g} vs {w}");
    }
}

fn check(name: &str) {
    let fx = Fixture::load("unet", &format!("scheduler_{name}.safetensors"));
    let config = fixtures("unet").join(fx.m("config"));
    let mut s = load_scheduler(&config).unwrap();
    assert_eq!(s.class_name(), fx.m("scheduler"));
    let steps: usize = fx.m("num_inference_steps").parse().unwrap();
    let custom = fx.m("custom_timesteps");
    if custom.is_empty() {
        s.set_timesteps(steps).unwrap();
    } else {
        let ts: Vec<f64> = serde_json::from_str(custom).unwrap();
        s.set_custom_timesteps(&ts).unwrap();
    }
    if !fx.m("eta").is_empty() {
        s.set_eta(fx.f("eta")).unwrap();
    }
    // Timesteps are integers (exact) except EDM's c_noise.
    close_list(&format!("{name}/timesteps"), s.timesteps(), fx.t("timesteps"), 1e-6);
    if let Some(want) = fx.get("sigmas") {
        close_list(&format!("{name}/sigmas"), s.sigmas().expect("sigmas"), want, 1e-6);
    }
    let init_sigma: Vec<f32> = fx.t("init_noise_sigma").to_vec1().unwrap();
    assert!(
        (s.init_noise_sigma() - init_sigma[0] as f64).abs() <= 1e-6 * (init_sigma[0] as f64).max(1.0),
        "{name}: init_noise_sigma {} vs {}",
        s.init_noise_sigma(),
        init_sigma[0]
    );
    let noise_steps: Vec<usize> = serde_json::from_str(fx.m("noise_steps")).unwrap();
    let mut noise = FixedNoise::new(noise_steps.iter().map(|k| fx.t(&format!("step_{k}_noise")).clone()));
    let mut x = (fx.t("init_latents") * s.init_noise_sigma()).unwrap();
    let timesteps = s.timesteps().to_vec();
    for (k, &t) in timesteps.iter().enumerate() {
        let scaled = s.scale_model_input(&x).unwrap();
        assert_close(&format!("{name}/step_{k}_scaled_input"), &scaled, fx.t(&format!("step_{k}_scaled_input")), 1e-4);
        let out = ((&scaled * 0.1).unwrap() + 0.05 * t / 1000.0).unwrap();
        x = s.step(&out, &x, &mut noise).unwrap();
        assert_close(&format!("{name}/step_{k}_latents"), &x, fx.t(&format!("step_{k}_latents")), 1e-4);
    }
    assert_eq!(s.step_index(), timesteps.len());
    // One more step is an error, not a panic.
    assert!(s.step(&x, &x, &mut noise).is_err());
}

#[test]
fn euler_sdxl() {
    check("euler_sdxl");
}
#[test]
fn euler_sdxl_v() {
    check("euler_sdxl_v");
}
#[test]
fn euler_linspace() {
    check("euler_linspace");
}
#[test]
fn euler_lightning() {
    check("euler_lightning");
}
#[test]
fn lcm_dmd2() {
    check("lcm_dmd2");
}
#[test]
fn lcm_dmd2_steps() {
    check("lcm_dmd2_steps");
}
#[test]
fn tcd_hyper_sdxl() {
    check("tcd_hyper_sdxl");
}
#[test]
fn ddim_sd15() {
    check("ddim_sd15");
}
#[test]
fn ddim_sd21_v() {
    check("ddim_sd21_v");
}
#[test]
fn ddim_hyper_trailing() {
    check("ddim_hyper_trailing");
}
#[test]
fn dpmpp_sd15() {
    check("dpmpp_sd15");
}
#[test]
fn dpmpp_sd15_25() {
    check("dpmpp_sd15_25");
}
#[test]
fn dpmpp_sd15_v() {
    check("dpmpp_sd15_v");
}
#[test]
fn dpmpp_sd15_karras() {
    check("dpmpp_sd15_karras");
}
#[test]
fn edm_dpm_playground() {
    check("edm_dpm_playground");
}
#[test]
fn edm_dpm_playground_v() {
    check("edm_dpm_playground_v");
}
#[test]
fn edm_euler_playground() {
    check("edm_euler_playground");
}
#[test]
fn edm_euler_playground_v() {
    check("edm_euler_playground_v");
}

#[test]
fn pndm_sd15() {
    check("pndm_sd15");
}
#[test]
fn pndm_sd15_10() {
    check("pndm_sd15_10");
}
#[test]
fn euler_a_sd15() {
    check("euler_a_sd15");
}
#[test]
fn euler_a_trailing() {
    check("euler_a_trailing");
}

#[test]
fn heun_sd15() {
    check("heun_sd15");
}
#[test]
fn heun_sd15_v() {
    check("heun_sd15_v");
}
#[test]
fn heun_sdxl_karras() {
    check("heun_sdxl_karras");
}
#[test]
fn unipc_sd15() {
    check("unipc_sd15");
}
#[test]
fn unipc_sd15_10() {
    check("unipc_sd15_10");
}
#[test]
fn unipc_sd15_v() {
    check("unipc_sd15_v");
}
#[test]
fn unipc_sdxl() {
    check("unipc_sdxl");
}

#[test]
fn unipc_sd15_karras() {
    check("unipc_sd15_karras");
}
#[test]
fn unipc_sd15_karras_10() {
    check("unipc_sd15_karras_10");
}
/// A1111's "DPM++ SDE": the Brownian tree's samples replayed as veto's two draws per step.
#[test]
fn dpmpp_sde_sd15() {
    check("dpmpp_sde_sd15");
}
#[test]
fn dpmpp_sde_sdxl_karras() {
    check("dpmpp_sde_sdxl_karras");
}
#[test]
fn dpmpp_sde_sd15_v() {
    check("dpmpp_sde_sd15_v");
}

#[test]
fn unknown_scheduler_class_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, r#"{"_class_name": "KDPM2DiscreteScheduler", "num_train_timesteps": 1000}"#).unwrap();
    let err = load_scheduler(&path).err().unwrap().to_string();
    assert!(err.contains("KDPM2DiscreteScheduler"), "{err}");
    assert!(err.contains("scheduler_config.json"), "{err}");
    for supported in veto::schedulers::SUPPORTED {
        assert!(err.contains(supported), "{err}");
    }
}

#[test]
fn missing_config_names_the_file() {
    let err = load_scheduler(fixtures("unet").join("schedulers/nope.json")).err().unwrap().to_string();
    assert!(err.contains("nope.json"), "{err}");
}

#[test]
fn every_fixture_config_loads() {
    for entry in std::fs::read_dir(fixtures("unet").join("schedulers")).unwrap() {
        let path = entry.unwrap().path();
        let mut s = load_scheduler(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        s.set_timesteps(4).unwrap();
        let _: Box<dyn Scheduler> = s.clone_box();
    }
}
