//! Single-file checkpoints: the `.safetensors` files Black Forest Labs, Stability AI, CivitAI
//! and ComfyUI distribute, holding a denoiser in its original key layout and possibly its VAE
//! and text encoders.
//!
//! [`SingleFile::open`] reads the tensor table (bounds-checked), tells the family, variant and
//! parts from key names and shapes ([`detect`]), and builds one [`KeyMap`] per part. The
//! configs, scheduler, tokenizers and every component the file lacks come from a base
//! diffusers model; [`SingleFile::check_base`] makes sure the base's configs describe the
//! file's tensors. Components found in the file are served under diffusers names by
//! [`RemappedTensors`], so the loaders never know.

pub mod backend;
pub(crate) mod checks;
pub mod detect;
pub mod header;
pub mod key_map;
pub mod layouts;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use backend::{MappedFile, RemappedTensors};
pub use detect::{detect, Detected, Kind, Part};
pub use header::Header;
pub use key_map::{key_map, key_map_at, KeyMap, Layout, Mapped, Op};

use super::config::read_config;
use super::model_source::ModelSource;
use super::weights::ComponentWeights;
use crate::error::{Error, Result};

/// Whether `path` names a file we read as a single-file checkpoint.
pub fn is_single_file(path: &Path) -> bool {
    path.is_file() && path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "safetensors" | "sft"))
}

/// An opened single-file checkpoint.
#[derive(Debug)]
pub struct SingleFile {
    path: PathBuf,
    header: Header,
    detected: Detected,
    parts: Vec<(Part, RemappedTensors)>,
}

impl SingleFile {
    /// Reads `path`'s tensor table, tells what it is and maps its parts.
    pub fn open(path: &Path) -> Result<Self> {
        let header = Header::read(path)?;
        let detected = detect(&header).ok_or_else(|| unrecognised(path, &header))?;
        let file = Arc::new(MappedFile::open(path)?);
        let mut parts = Vec::new();
        for part in &detected.parts {
            let map = key_map_at(part.layout, &part.prefix, &header).map_err(|e| Error::BadModelFile {
                path: path.display().to_string(),
                reason: format!("{} ({}, {}): {e}", part.component, part.layout, detected.variant),
            })?;
            parts.push((part.clone(), RemappedTensors::new(file.clone(), map)));
        }
        Ok(Self { path: path.to_path_buf(), header, detected, parts })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the file is.
    pub fn detected(&self) -> &Detected {
        &self.detected
    }

    /// The part providing `component`, if the file has it.
    pub fn part(&self, component: &str) -> Option<(&Part, &RemappedTensors)> {
        self.parts.iter().find(|(p, _)| p.component == component).map(|(p, t)| (p, t))
    }

    /// The components the file provides, denoiser first.
    pub fn components(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.parts.iter().map(|(p, _)| p.component)
    }

    /// `component`'s weights from the file, configured by `config_path` (the base's config);
    /// `None` when the file lacks it.
    pub fn weights(&self, component: &str, config_path: PathBuf) -> Option<ComponentWeights> {
        let (part, tensors) = self.part(component)?;
        let origin = format!("{} ({})", self.path.display(), part.layout);
        Some(ComponentWeights::from_remapped(config_path, origin, tensors.clone()))
    }

    /// Checks that `base` is a model of the file's family whose configs describe the file's
    /// tensors; errors name the config value, the file and the base to use instead.
    pub fn check_base(&self, base: &ModelSource) -> Result<()> {
        let d = &self.detected;
        let hint = format!("pass --base-model with a model of this variant (e.g. {})", d.default_base);
        let class = base.model_index()?.pipeline_class().to_string();
        let bare = class.strip_prefix("NAG").or_else(|| class.strip_prefix("Nag")).unwrap_or(&class);
        if bare != d.kind.pipeline_class() {
            return Err(Error::InvalidInput(format!(
                "{} is a {} checkpoint but the base model {base} is a {class}; {hint}",
                self.path.display(),
                d.variant
            )));
        }
        for (part, tensors) in &self.parts {
            let config_path = base.file(&format!("{}/config.json", part.component))?;
            let config: serde_json::Value = read_config(&config_path, &format!("{} config", part.component))?;
            if let Some(why) = checks::check(part.layout, tensors.map(), &self.header, &config) {
                return Err(Error::InvalidInput(format!(
                    "the {} of {} ({}, {}) does not fit the base model {base}: {why}; {hint}",
                    part.component,
                    self.path.display(),
                    part.layout,
                    d.variant
                )));
            }
        }
        Ok(())
    }

    /// What comes from where, e.g. `transformer: flux1-dev.safetensors (BFL layout, FLUX.1-dev);
    /// everything else (…): black-forest-labs/FLUX.1-dev`.
    pub fn summary(&self, base: &ModelSource) -> String {
        let name =
            self.path.file_name().map_or_else(|| self.path.display().to_string(), |n| n.to_string_lossy().into());
        let mut lines: Vec<String> = self
            .parts
            .iter()
            .enumerate()
            .map(|(i, (p, _))| {
                let variant = if i == 0 { format!(", {}", self.detected.variant) } else { String::new() };
                format!("{}: {name} ({}{variant})", p.component, p.layout)
            })
            .collect();
        let from_base: Vec<String> = base
            .model_index()
            .map(|index| {
                index
                    .components()
                    .filter(|(c, comp)| comp.is_present() && self.part(c).is_none())
                    .map(|(c, _)| c.to_string())
                    .collect()
            })
            .unwrap_or_default();
        let base_name = base.repo_id().map_or_else(|| base.describe(""), str::to_string);
        let base_name = base_name.trim_end_matches('/');
        lines.push(format!(
            "{}: {base_name}",
            ["model_index.json, configs".to_string()].into_iter().chain(from_base).collect::<Vec<_>>().join(", ")
        ));
        lines.join("; ")
    }
}

/// The error for a file that is no layout we know: the layouts we read and a few of its keys.
fn unrecognised(path: &Path, header: &Header) -> Error {
    let keys: Vec<&str> = header.names().take(5).collect();
    Error::BadModelFile {
        path: path.display().to_string(),
        reason: format!(
            "not a single-file checkpoint veto recognises; it reads FLUX.1 transformers (BFL layout, \
             double_blocks.N…, optionally under model.diffusion_model.) and ComfyUI all-in-one FLUX files, \
             SD3/SD3.5 (model.diffusion_model.joint_blocks.N…), SDXL and SD1.5 A1111/ComfyUI files \
             (model.diffusion_model.input_blocks…); its {} tensors begin {}",
            header.len(),
            if keys.is_empty() { "(none)".to_string() } else { keys.join(", ") }
        ),
    }
}
