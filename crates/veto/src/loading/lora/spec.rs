//! What the user asks for: a LoRA file and the scale to merge it at (`--lora FILE[:SCALE]`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A LoRA file and its strength: the merged weights are W + scale · (alpha / rank) · B·A.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// The user's multiplier (1.0 merges the LoRA as trained).
    pub scale: f64,
}

impl LoraSpec {
    /// A LoRA file merged at `scale`.
    pub fn new(path: impl Into<PathBuf>, scale: f64) -> Self {
        Self { path: path.into(), scale }
    }

    /// Parses `FILE[:SCALE]` (scale 1.0 when absent). A colon followed by something that is not
    /// a number is an error, unless the whole text names an existing file (paths with colons).
    pub fn parse(arg: &str) -> Result<Self> {
        let bad = |reason: String| Error::parameter("lora", reason);
        if arg.is_empty() {
            return Err(bad("empty; expected FILE or FILE:SCALE".into()));
        }
        let Some((file, scale)) = arg.rsplit_once(':') else {
            return Ok(Self::new(arg, 1.0));
        };
        // "C:\x.safetensors", "dir:a/x.safetensors": the colon is part of the path.
        if scale.contains(['/', '\\']) || Path::new(arg).is_file() {
            return Ok(Self::new(arg, 1.0));
        }
        let value: f64 = scale
            .trim()
            .parse()
            .map_err(|_| bad(format!("{arg:?}: the scale after ':' must be a number, got {scale:?}")))?;
        if !value.is_finite() {
            return Err(bad(format!("{arg:?}: the scale must be finite, got {scale:?}")));
        }
        if file.is_empty() {
            return Err(bad(format!("{arg:?}: no file before ':'")));
        }
        Ok(Self::new(file, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_and_scale() {
        assert_eq!(LoraSpec::parse("a.safetensors").unwrap(), LoraSpec::new("a.safetensors", 1.0));
        assert_eq!(LoraSpec::parse("dir/a.safetensors:0.125").unwrap(), LoraSpec::new("dir/a.safetensors", 0.125));
        assert_eq!(LoraSpec::parse("a.safetensors:-1").unwrap(), LoraSpec::new("a.safetensors", -1.0));
        assert_eq!(LoraSpec::parse(r"C:\m\a.safetensors").unwrap().scale, 1.0);
        assert_eq!(LoraSpec::parse(r"C:\m\a.safetensors:0.5").unwrap(), LoraSpec::new(r"C:\m\a.safetensors", 0.5));
    }

    #[test]
    fn refuses_bad_scales() {
        for arg in ["a.safetensors:x", "a.safetensors:", "a.safetensors:inf", ":0.5", ""] {
            let err = LoraSpec::parse(arg).unwrap_err().to_string();
            assert!(err.starts_with("lora: "), "{arg}: {err}");
        }
        let err = LoraSpec::parse("a.safetensors:1,5").unwrap_err().to_string();
        assert!(err.contains("\"1,5\""), "{err}");
    }
}
