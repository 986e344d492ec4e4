//! Noise schedulers, each read from `scheduler_config.json`, and [`load_scheduler`], which
//! builds the one a config's `_class_name` names.
//!
//! Dependencies point one way: the concrete schedulers use [`scheduler`] (the trait and shared
//! helpers) and [`discrete`]; only this factory knows every concrete scheduler.

pub mod ddim;
pub mod discrete;
pub mod dpm_solver_multistep;
pub mod edm;
pub mod euler_ancestral;
pub mod euler_discrete;
pub mod flow_match_euler;
pub mod lcm;
pub mod pndm;
pub mod scheduler;
pub mod tcd;

use std::path::Path;

use crate::error::{Error, Result};
use discrete::bad;
use scheduler::{quote_non_finite, Scheduler};

/// The schedulers [`load_scheduler`] knows (the UNet-family samplers).
pub const SUPPORTED: [&str; 9] = [
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "PNDMScheduler",
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
        "EulerAncestralDiscreteScheduler" => Box::new(euler_ancestral::EulerAncestralScheduler::from_value(json)?),
        "PNDMScheduler" => Box::new(pndm::PndmScheduler::from_value(json)?),
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

    #[test]
    fn unknown_class_names_the_supported_ones() {
        let err = scheduler_from_json(r#"{"_class_name": "KDPM2DiscreteScheduler"}"#).err().unwrap().to_string();
        assert!(err.contains("KDPM2DiscreteScheduler") && err.contains("PNDMScheduler"), "{err}");
        let err = scheduler_from_json(r#"{"beta_start": 0.1}"#).err().unwrap().to_string();
        assert!(err.contains("_class_name"), "{err}");
    }
}
