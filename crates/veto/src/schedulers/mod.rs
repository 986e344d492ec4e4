//! Noise schedulers, each read from `scheduler_config.json`, and [`load_scheduler`], which
//! builds the one a config's `_class_name` names.
//!
//! Dependencies point one way: the concrete schedulers use [`scheduler`] (the trait and shared
//! helpers) and [`discrete`]; only this factory knows every concrete scheduler.

pub mod ddim;
pub mod discrete;
pub mod dpm_solver_multistep;
pub mod dpm_solver_sde;
pub mod edm;
pub mod euler_ancestral;
pub mod euler_discrete;
pub mod flow_match_euler;
pub mod heun;
pub mod lcm;
pub mod pndm;
pub mod scheduler;
pub mod scm;
pub mod tcd;
pub mod unipc;

use std::path::Path;

use crate::error::{Error, Result};
use discrete::bad;
use scheduler::{quote_non_finite, Scheduler};

/// The schedulers [`load_scheduler`] knows (the UNet-family samplers).
pub const SUPPORTED: [&str; 12] = [
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "PNDMScheduler",
    "LCMScheduler",
    "DDIMScheduler",
    "TCDScheduler",
    "DPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
];

/// Read `scheduler_config.json` and build the scheduler its `_class_name` names.
pub fn load_scheduler(path: impl AsRef<Path>) -> Result<Box<dyn Scheduler>> {
    Ok(load_scheduler_and_config(path.as_ref())?.0)
}

/// As [`load_scheduler`], also returning the config as read (the base of
/// [`scheduler_override`]).
pub fn load_scheduler_and_config(path: &Path) -> Result<(Box<dyn Scheduler>, serde_json::Value)> {
    let config = read_scheduler_config(path)?;
    let scheduler = scheduler_from_value(config.clone()).map_err(|e| attribute(e, path))?;
    Ok((scheduler, config))
}

/// `scheduler_config.json` as JSON (Python's non-finite numbers quoted), for
/// [`scheduler_from_value`] and [`scheduler_override`].
pub fn read_scheduler_config(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::MissingFile {
        what: format!("cannot read scheduler config ({e})"),
        path: path.display().to_string(),
    })?;
    serde_json::from_str(&quote_non_finite(&text)).map_err(|e| attribute(bad(format!("not valid JSON: {e}")), path))
}

fn attribute(e: Error, path: &Path) -> Error {
    match e {
        Error::BadModelFile { reason, .. } => Error::BadModelFile { path: path.display().to_string(), reason },
        other => other,
    }
}

/// As [`load_scheduler`], from the JSON text.
pub fn scheduler_from_json(text: &str) -> Result<Box<dyn Scheduler>> {
    let json: serde_json::Value =
        serde_json::from_str(&quote_non_finite(text)).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    scheduler_from_value(json)
}

/// The scheduler a config's `_class_name` names.
pub fn scheduler_from_value(json: serde_json::Value) -> Result<Box<dyn Scheduler>> {
    let class = json
        .get("_class_name")
        .and_then(|c| c.as_str())
        .ok_or_else(|| bad(format!("no \"_class_name\" (supported: {})", SUPPORTED.join(", "))))?;
    Ok(match class {
        "EulerDiscreteScheduler" => Box::new(euler_discrete::EulerDiscreteScheduler::from_value(json)?),
        "EulerAncestralDiscreteScheduler" => Box::new(euler_ancestral::EulerAncestralScheduler::from_value(json)?),
        "PNDMScheduler" => Box::new(pndm::PndmScheduler::from_value(json)?),
        "LCMScheduler" => Box::new(lcm::LcmScheduler::from_value(json)?),
        "DDIMScheduler" => Box::new(ddim::DdimScheduler::from_value(json)?),
        "TCDScheduler" => Box::new(tcd::TcdScheduler::from_value(json)?),
        "DPMSolverMultistepScheduler" => Box::new(dpm_solver_multistep::DpmSolverMultistepScheduler::from_value(json)?),
        "EDMEulerScheduler" => Box::new(edm::EdmEulerScheduler::from_value(json)?),
        "EDMDPMSolverMultistepScheduler" => Box::new(edm::EdmDpmSolverMultistepScheduler::from_value(json)?),
        "HeunDiscreteScheduler" => Box::new(heun::HeunDiscreteScheduler::from_value(json)?),
        "UniPCMultistepScheduler" => Box::new(unipc::UniPcMultistepScheduler::from_value(json)?),
        "DPMSolverSDEScheduler" => Box::new(dpm_solver_sde::DpmSolverSdeScheduler::from_value(json)?),
        // SANA-Sprint's own sampler (not in SUPPORTED: no other model takes it).
        "SCMScheduler" => Box::new(scm::ScmScheduler::from_value(json)?),
        other => {
            return Err(bad(format!("scheduler '{other}' is not supported (supported: {})", SUPPORTED.join(", "))))
        }
    })
}

/// An alias: its name, the diffusers class, and the config keys it sets (values as JSON text).
pub type SchedulerAlias = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

/// The names [`scheduler_override`] takes besides diffusers' class names: A1111 / ComfyUI
/// sampler names, each with the class and the config keys it sets.
pub const SCHEDULER_ALIASES: &[SchedulerAlias] = &[
    ("euler", "EulerDiscreteScheduler", &[]),
    ("euler_a", "EulerAncestralDiscreteScheduler", &[]),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", &[]),
    ("ddim", "DDIMScheduler", &[]),
    ("pndm", "PNDMScheduler", &[("skip_prk_steps", "true")]),
    ("plms", "PNDMScheduler", &[("skip_prk_steps", "true")]),
    ("lcm", "LCMScheduler", &[]),
    ("tcd", "TCDScheduler", &[]),
    (
        "dpmpp_2m",
        "DPMSolverMultistepScheduler",
        &[("algorithm_type", "\"dpmsolver++\""), ("use_karras_sigmas", "false")],
    ),
    (
        "dpmpp_2m_karras",
        "DPMSolverMultistepScheduler",
        &[("algorithm_type", "\"dpmsolver++\""), ("use_karras_sigmas", "true")],
    ),
    (
        "dpmpp_2m_sde",
        "DPMSolverMultistepScheduler",
        &[("algorithm_type", "\"sde-dpmsolver++\""), ("use_karras_sigmas", "false")],
    ),
    (
        "dpmpp_2m_sde_karras",
        "DPMSolverMultistepScheduler",
        &[("algorithm_type", "\"sde-dpmsolver++\""), ("use_karras_sigmas", "true")],
    ),
    ("dpmpp_sde", "DPMSolverSDEScheduler", &[("use_karras_sigmas", "false")]),
    ("dpmpp_sde_karras", "DPMSolverSDEScheduler", &[("use_karras_sigmas", "true")]),
    ("heun", "HeunDiscreteScheduler", &[]),
    ("unipc", "UniPCMultistepScheduler", &[("use_karras_sigmas", "false")]),
    ("unipc_karras", "UniPCMultistepScheduler", &[("use_karras_sigmas", "true")]),
];

/// Another scheduler from a model's scheduler config, as diffusers'
/// `NewClass.from_config(pipe.scheduler.config)`: the same training schedule (betas, offsets,
/// prediction type), another sampler. `name` is a diffusers class name or one of
/// [`SCHEDULER_ALIASES`] (case and `-`/` `/`+` spellings are forgiven: `DPM++ 2M Karras`).
pub fn scheduler_override(base: &serde_json::Value, name: &str) -> Result<Box<dyn Scheduler>> {
    let key: String = name
        .trim()
        .to_ascii_lowercase()
        .replace("++", "pp")
        .chars()
        .map(|c| if c == '-' || c == ' ' { '_' } else { c })
        .collect();
    let (class, sets): (&str, &[(&str, &str)]) = match SCHEDULER_ALIASES.iter().find(|(alias, ..)| *alias == key) {
        Some((_, class, sets)) => (class, sets),
        None => match SUPPORTED.iter().find(|c| c.eq_ignore_ascii_case(name.trim())) {
            Some(class) => (class, &[]),
            None => {
                let aliases: Vec<&str> = SCHEDULER_ALIASES.iter().map(|(a, ..)| *a).collect();
                return Err(Error::parameter(
                    "scheduler",
                    format!(
                        "unknown scheduler '{name}' (known: {}, or a class: {})",
                        aliases.join(", "),
                        SUPPORTED.join(", ")
                    ),
                ));
            }
        },
    };
    let mut json = base.clone();
    let Some(map) = json.as_object_mut() else {
        return Err(bad("the scheduler config is not a JSON object"));
    };
    map.insert("_class_name".into(), class.into());
    for (key, value) in sets {
        let value: serde_json::Value =
            serde_json::from_str(value).map_err(|e| bad(format!("alias value {value}: {e}")))?;
        map.insert((*key).into(), value);
    }
    scheduler_from_value(json).map_err(|e| Error::parameter("scheduler", format!("{name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_numbers_are_read() {
        let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "note": "NaN -Infinity \" Infinity",
                       "lambda_min_clipped": -Infinity}"#;
        let quoted = quote_non_finite(text);
        assert!(quoted.contains(r#""note": "NaN -Infinity \" Infinity""#), "{quoted}");
        assert!(quoted.contains(r#""lambda_min_clipped": "-Infinity""#), "{quoted}");
        let s = scheduler_from_json(text).unwrap();
        assert_eq!(s.class_name(), "DPMSolverMultistepScheduler");
    }

    /// `noise_steps` names exactly the steps whose `step` draws, for every stochastic setting.
    #[test]
    fn noise_steps_are_the_steps_that_draw() {
        use candle_core::{Device, Tensor};
        use scheduler::{RecordingNoise, SeededNoise};
        let cases: [(&str, f64, usize); 18] = [
            (r#"{"_class_name": "LCMScheduler"}"#, 0.0, 3),
            (r#"{"_class_name": "TCDScheduler"}"#, 0.3, 3),
            (r#"{"_class_name": "TCDScheduler"}"#, 0.0, 0),
            (r#"{"_class_name": "DDIMScheduler"}"#, 0.5, 4),
            (r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "trailing"}"#, 1.0, 4),
            (r#"{"_class_name": "DDIMScheduler"}"#, 0.0, 0),
            (r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#, 0.0, 4),
            (r#"{"_class_name": "DPMSolverMultistepScheduler"}"#, 0.0, 0),
            (r#"{"_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#, 0.0, 4),
            (r#"{"_class_name": "EDMDPMSolverMultistepScheduler"}"#, 0.0, 0),
            (r#"{"_class_name": "EulerDiscreteScheduler"}"#, 0.0, 0),
            (r#"{"_class_name": "EDMEulerScheduler"}"#, 0.0, 0),
            (r#"{"_class_name": "EulerAncestralDiscreteScheduler"}"#, 0.0, 4),
            (r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true}"#, 0.0, 0),
            (r#"{"_class_name": "HeunDiscreteScheduler"}"#, 0.0, 0),
            (r#"{"_class_name": "UniPCMultistepScheduler"}"#, 0.0, 0),
            (r#"{"_class_name": "UniPCMultistepScheduler", "use_karras_sigmas": true}"#, 0.0, 0),
            // 4 steps = 7 model calls; all but the last draw.
            (r#"{"_class_name": "DPMSolverSDEScheduler", "use_karras_sigmas": true}"#, 0.0, 6),
        ];
        for (json, eta, draws) in cases {
            let mut s = scheduler_from_json(json).unwrap();
            s.set_timesteps(4).unwrap();
            s.set_eta(eta).unwrap();
            let mut noise = RecordingNoise::new(SeededNoise::new(5));
            let mut x = Tensor::ones((1, 2, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
            let mut drew = Vec::new();
            // Every model call (PNDM and Heun make more than one per step).
            for k in 0..s.timesteps().len() {
                let before = noise.drawn().len();
                let input = s.scale_model_input(&x).unwrap();
                x = s.step(&(input * 0.1).unwrap(), &x, &mut noise).unwrap();
                if noise.drawn().len() > before {
                    assert_eq!(noise.drawn().len(), before + 1, "{json}: two draws in one step");
                    drew.push(k);
                }
            }
            assert_eq!(drew.len(), draws, "{json} eta {eta}");
            s.set_timesteps(4).unwrap();
            assert_eq!(s.noise_steps(), drew, "{json} eta {eta}");
        }
    }

    #[test]
    fn overrides_keep_the_training_schedule() {
        let sd15 = serde_json::json!({
            "_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "skip_prk_steps": true, "steps_offset": 1, "set_alpha_to_one": false
        });
        for (name, class) in [
            ("euler_a", "EulerAncestralDiscreteScheduler"),
            ("DPM++ 2M Karras", "DPMSolverMultistepScheduler"),
            ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler"),
            ("ddim", "DDIMScheduler"),
            ("EulerDiscreteScheduler", "EulerDiscreteScheduler"),
            ("plms", "PNDMScheduler"),
            ("heun", "HeunDiscreteScheduler"),
            ("UniPC", "UniPCMultistepScheduler"),
        ] {
            let mut s = scheduler_override(&sd15, name).unwrap();
            assert_eq!(s.class_name(), class, "{name}");
            s.set_timesteps(4).unwrap();
        }
        // The same betas: DDIM from the PNDM config steps like DDIM from SD1.5's.
        let mut ddim = scheduler_override(&sd15, "ddim").unwrap();
        ddim.set_timesteps(4).unwrap();
        assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        let e = scheduler_override(&sd15, "k_heun").err().unwrap();
        assert!(matches!(e, Error::InvalidParameter { name: "scheduler", .. }), "{e}");
    }

    #[test]
    fn unknown_class_names_the_supported_ones() {
        let err = scheduler_from_json(r#"{"_class_name": "KDPM2DiscreteScheduler"}"#).err().unwrap().to_string();
        assert!(err.contains("KDPM2DiscreteScheduler") && err.contains("PNDMScheduler"), "{err}");
        let err = scheduler_from_json(r#"{"beta_start": 0.1}"#).err().unwrap().to_string();
        assert!(err.contains("_class_name"), "{err}");
    }
}
