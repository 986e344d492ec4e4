//! Noise schedulers, each read from `scheduler_config.json`, and [`load_scheduler`], which
//! builds the one a config's `_class_name` names.
//!
//! Dependencies point one way: the concrete schedulers use [`scheduler`] (the trait and shared
//! helpers) and [`discrete`]; only this factory knows every concrete scheduler.

pub mod ddim;
pub mod discrete;
pub mod dpm_solver_multistep;
pub mod edm;
pub mod euler_discrete;
pub mod flow_match_euler;
pub mod lcm;
pub mod scheduler;
pub mod tcd;

use std::path::Path;

use crate::error::{Error, Result};
use discrete::bad;
use scheduler::{quote_non_finite, Scheduler};

/// The schedulers [`load_scheduler`] knows (the UNet-family samplers).
pub const SUPPORTED: [&str; 7] = [
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "DDIMScheduler",
    "TCDScheduler",
    "DPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler",
];

/// Read `scheduler_config.json` and build the scheduler its `_class_name` names.
pub fn load_scheduler(path: impl AsRef<Path>) -> Result<Box<dyn Scheduler>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::MissingFile {
        what: format!("cannot read scheduler config ({e})"),
        path: path.display().to_string(),
    })?;
    scheduler_from_json(&text).map_err(|e| match e {
        Error::BadModelFile { reason, .. } => Error::BadModelFile { path: path.display().to_string(), reason },
        other => other,
    })
}

/// As [`load_scheduler`], from the JSON text.
pub fn scheduler_from_json(text: &str) -> Result<Box<dyn Scheduler>> {
    let json: serde_json::Value =
        serde_json::from_str(&quote_non_finite(text)).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let class = json
        .get("_class_name")
        .and_then(|c| c.as_str())
        .ok_or_else(|| bad(format!("no \"_class_name\" (supported: {})", SUPPORTED.join(", "))))?;
    Ok(match class {
        "EulerDiscreteScheduler" => Box::new(euler_discrete::EulerDiscreteScheduler::from_value(json)?),
        "LCMScheduler" => Box::new(lcm::LcmScheduler::from_value(json)?),
        "DDIMScheduler" => Box::new(ddim::DdimScheduler::from_value(json)?),
        "TCDScheduler" => Box::new(tcd::TcdScheduler::from_value(json)?),
        "DPMSolverMultistepScheduler" => Box::new(dpm_solver_multistep::DpmSolverMultistepScheduler::from_value(json)?),
        "EDMEulerScheduler" => Box::new(edm::EdmEulerScheduler::from_value(json)?),
        "EDMDPMSolverMultistepScheduler" => Box::new(edm::EdmDpmSolverMultistepScheduler::from_value(json)?),
        other => {
            return Err(bad(format!("scheduler '{other}' is not supported (supported: {})", SUPPORTED.join(", "))))
        }
    })
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
        let cases: [(&str, f64, usize); 12] = [
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
        ];
        for (json, eta, draws) in cases {
            let mut s = scheduler_from_json(json).unwrap();
            s.set_timesteps(4).unwrap();
            s.set_eta(eta).unwrap();
            let mut noise = RecordingNoise::new(SeededNoise::new(5));
            let mut x = Tensor::ones((1, 2, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
            let mut drew = Vec::new();
            for k in 0..4 {
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
    fn unknown_class_names_the_supported_ones() {
        let err = scheduler_from_json(r#"{"_class_name": "PNDMScheduler"}"#).err().unwrap().to_string();
        assert!(err.contains("PNDMScheduler") && err.contains("EulerDiscreteScheduler"), "{err}");
        let err = scheduler_from_json(r#"{"beta_start": 0.1}"#).err().unwrap().to_string();
        assert!(err.contains("_class_name"), "{err}");
    }
}
