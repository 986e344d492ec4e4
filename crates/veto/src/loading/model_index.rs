//! `model_index.json`: the table of contents of a diffusers pipeline folder.
//!
//! It names the pipeline class (`"_class_name": "FluxPipeline"`) and, for every component
//! folder, the library and class that load it (`"transformer": ["diffusers",
//! "FluxTransformer2DModel"]`). Components a pipeline can run without are written as
//! `[null, null]`. Other keys are pipeline config values (`"force_zeros_for_empty_prompt":
//! true`) or bookkeeping (`_diffusers_version`, `_name_or_path`); they are not components.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::loading::config::read_config;

/// Whether a parsed `model_index.json` ships `component` (not `[null, null]`, not missing),
/// for loaders that read the index as plain JSON.
pub fn has_component(index: &Value, component: &str) -> bool {
    match index.get(component) {
        Some(Value::Array(pair)) => pair.iter().any(|v| !v.is_null()),
        _ => false,
    }
}

/// One component entry: `[library, class]`, either of which may be null.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// `"diffusers"`, `"transformers"`, … ; `None` for an absent component.
    pub library: Option<String>,
    /// e.g. `"FluxTransformer2DModel"`; `None` for an absent component.
    pub class_name: Option<String>,
}

impl Component {
    /// Whether the pipeline actually ships this component (`[null, null]` means it does not).
    pub fn is_present(&self) -> bool {
        self.class_name.is_some()
    }
}

/// A parsed and validated `model_index.json`.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// Where it came from, for error messages.
    origin: String,
    pipeline_class: String,
    diffusers_version: Option<String>,
    components: BTreeMap<String, Component>,
}

impl ModelIndex {
    /// Reads `model_index.json` from a file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_value(read_config(path, "model index")?, &path.display().to_string())
    }

    /// Parses the JSON text; `origin` (a path or description) is used in error messages.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::BadModelFile { path: origin.to_string(), reason: format!("not valid JSON: {e}") })?;
        Self::from_value(value, origin)
    }

    fn from_value(value: Value, origin: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadModelFile { path: origin.to_string(), reason };
        let Value::Object(map) = value else {
            return Err(bad("expected a JSON object".to_string()));
        };
        let pipeline_class = match map.get("_class_name") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad("_class_name is not a string".to_string())),
            None => return Err(bad("missing _class_name (is this a diffusers model folder?)".to_string())),
        };
        let diffusers_version = map.get("_diffusers_version").and_then(Value::as_str).map(str::to_string);

        let mut components = BTreeMap::new();
        for (name, value) in &map {
            if name.starts_with('_') {
                continue;
            }
            // Only `[library|null, class|null]` pairs are components; anything else is a
            // pipeline option and none of ours need one yet.
            let Value::Array(pair) = value else { continue };
            let [library, class_name] = pair.as_slice() else {
                return Err(bad(format!("component {name:?} should be [library, class], got {value}")));
            };
            let as_opt = |v: &Value| -> Result<Option<String>> {
                match v {
                    Value::Null => Ok(None),
                    Value::String(s) => Ok(Some(s.clone())),
                    other => Err(bad(format!("component {name:?} should be [library, class], got {other} inside"))),
                }
            };
            components.insert(name.clone(), Component { library: as_opt(library)?, class_name: as_opt(class_name)? });
        }
        Ok(Self { origin: origin.to_string(), pipeline_class, diffusers_version, components })
    }

    /// The pipeline class, e.g. `"FluxPipeline"`.
    pub fn pipeline_class(&self) -> &str {
        &self.pipeline_class
    }

    /// The model family that loads this pipeline class ([`crate::families`]), or an error
    /// naming the class and the supported ones.
    pub fn family(&self) -> Result<&'static crate::families::Family> {
        crate::families::for_class(&self.pipeline_class).ok_or_else(|| Error::BadModelFile {
            path: self.origin.clone(),
            reason: format!(
                "pipeline '{}' is not supported (supported: {})",
                self.pipeline_class,
                crate::families::supported_classes()
            ),
        })
    }

    /// `_diffusers_version`, when recorded.
    pub fn diffusers_version(&self) -> Option<&str> {
        self.diffusers_version.as_deref()
    }

    /// All component entries by folder name, present or not.
    pub fn components(&self) -> impl Iterator<Item = (&str, &Component)> {
        self.components.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.get(name)
    }

    /// The class name of a present component, e.g. `"T5EncoderModel"` for `"text_encoder_2"`.
    pub fn component_class(&self, name: &str) -> Option<&str> {
        self.components.get(name).and_then(|c| c.class_name.as_deref())
    }

    /// The class of a component the pipeline cannot run without; errors name the file and,
    /// for a wrong class, what was expected.
    pub fn require_component(&self, name: &str, expected: &[&str]) -> Result<&str> {
        let Some(class) = self.component_class(name) else {
            return Err(Error::BadModelFile {
                path: self.origin.clone(),
                reason: format!("{} needs a {name:?} component, none is listed", self.pipeline_class),
            });
        };
        if !expected.is_empty() && !expected.contains(&class) {
            return Err(Error::BadModelFile {
                path: self.origin.clone(),
                reason: format!("component {name:?} is a {class}, expected {}", expected.join(" or ")),
            });
        }
        Ok(class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLUX: &str = r#"{
      "_class_name": "FluxPipeline",
      "_diffusers_version": "0.30.0.dev0",
      "_name_or_path": "black-forest-labs/FLUX.1-dev",
      "feature_extractor": [null, null],
      "image_encoder": [null, null],
      "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "text_encoder_2": ["transformers", "T5EncoderModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "tokenizer_2": ["transformers", "T5TokenizerFast"],
      "transformer": ["diffusers", "FluxTransformer2DModel"],
      "vae": ["diffusers", "AutoencoderKL"]
    }"#;

    #[test]
    fn parses_flux_index() {
        let idx = ModelIndex::from_json(FLUX, "model_index.json").unwrap();
        assert_eq!(idx.pipeline_class(), "FluxPipeline");
        assert_eq!(idx.family().unwrap().name, "flux");
        assert_eq!(idx.diffusers_version(), Some("0.30.0.dev0"));
        assert_eq!(idx.component_class("transformer"), Some("FluxTransformer2DModel"));
        assert_eq!(idx.component_class("text_encoder_2"), Some("T5EncoderModel"));
        assert_eq!(idx.component("vae").unwrap().library.as_deref(), Some("diffusers"));
        let absent = idx.component("image_encoder").unwrap();
        assert!(!absent.is_present());
        assert_eq!(idx.component_class("image_encoder"), None);
        assert_eq!(idx.components().count(), 9);
        assert_eq!(
            idx.require_component("transformer", &["FluxTransformer2DModel"]).unwrap(),
            "FluxTransformer2DModel"
        );
    }

    #[test]
    fn require_component_errors() {
        let idx = ModelIndex::from_json(FLUX, "/m/model_index.json").unwrap();
        let err = idx.require_component("vae", &["AutoencoderTiny"]).unwrap_err().to_string();
        assert!(err.contains("/m/model_index.json") && err.contains("AutoencoderKL"), "{err}");
        let err = idx.require_component("image_encoder", &[]).unwrap_err().to_string();
        assert!(err.contains("image_encoder"), "{err}");
        let err = idx.require_component("unet", &[]).unwrap_err().to_string();
        assert!(err.contains("unet"), "{err}");
    }

    #[test]
    fn unknown_pipeline_lists_supported() {
        let json = r#"{"_class_name": "KandinskyV22Pipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                       "force_zeros_for_empty_prompt": true}"#;
        let err = ModelIndex::from_json(json, "x/model_index.json").unwrap().family().unwrap_err().to_string();
        assert!(err.contains("KandinskyV22Pipeline"), "{err}");
        assert!(err.contains("FluxPipeline"), "{err}");
        assert!(err.contains("x/model_index.json"), "{err}");
    }

    #[test]
    fn non_component_keys_are_ignored() {
        let json = r#"{"_class_name": "FluxPipeline", "force_zeros_for_empty_prompt": true,
                       "transformer": ["diffusers", "FluxTransformer2DModel"]}"#;
        let idx = ModelIndex::from_json(json, "m").unwrap();
        assert_eq!(idx.components().count(), 1);
    }

    #[test]
    fn malformed_indexes() {
        for (json, needle) in [
            ("[1, 2]", "object"),
            ("{", "JSON"),
            (r#"{"transformer": ["diffusers", "X"]}"#, "_class_name"),
            (r#"{"_class_name": 3}"#, "_class_name"),
            (r#"{"_class_name": "FluxPipeline", "vae": ["diffusers"]}"#, "vae"),
            (r#"{"_class_name": "FluxPipeline", "vae": ["diffusers", 7]}"#, "vae"),
        ] {
            let err = ModelIndex::from_json(json, "idx.json").unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("idx.json"), "{json}: {err}");
        }
    }

    #[test]
    fn missing_file_names_path() {
        let p = std::env::temp_dir().join("veto-no-such-dir-xyz/model_index.json");
        let err = ModelIndex::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("veto-no-such-dir-xyz"), "{err}");
    }
}
