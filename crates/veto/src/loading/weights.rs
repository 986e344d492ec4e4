//! One component's config file and weights, wherever they come from.
//!
//! Every model loader (text encoders, VAE, transformer, UNet) takes a [`ComponentWeights`]:
//! the path of the component's `config.json` and a way to open its tensors under their
//! diffusers names. A diffusers folder gives plain safetensors files; other checkpoint
//! formats plug in here as further backends, so the loaders never see where the weights
//! came from.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::safetensors_files::{var_builder, weight_files};
use super::single_file::RemappedTensors;
use crate::error::{Error, Result};

/// A component's config file and its weights.
#[derive(Debug, Clone)]
pub struct ComponentWeights {
    config_path: PathBuf,
    origin: String,
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    /// Safetensors files whose tensor names are already diffusers' names.
    Safetensors(Vec<PathBuf>),
    /// Tensors of an original-layout single file, served under diffusers names.
    Remapped(RemappedTensors),
}

impl ComponentWeights {
    /// A diffusers component folder: `dir/config.json` and `dir/<stem>.safetensors` (or its
    /// sharded index). `what` names the component in the "folder not found" error.
    pub fn from_dir(dir: &Path, stem: &str, what: &str) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                what: format!("{what} folder not found"),
                path: dir.display().to_string(),
            });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::MissingFile {
                what: format!("{what} folder has no config.json"),
                path: config_path.display().to_string(),
            });
        }
        let files = weight_files(dir, stem)?;
        Ok(Self { config_path, origin: dir.display().to_string(), backend: Backend::Safetensors(files) })
    }

    /// Safetensors `files` with diffusers tensor names, configured by `config_path`.
    pub fn from_files(config_path: PathBuf, files: Vec<PathBuf>, origin: impl Into<String>) -> Self {
        Self { config_path, origin: origin.into(), backend: Backend::Safetensors(files) }
    }

    /// Tensors of a single-file checkpoint mapped to diffusers names, configured by
    /// `config_path`.
    pub fn from_remapped(config_path: PathBuf, origin: impl Into<String>, tensors: RemappedTensors) -> Self {
        Self { config_path, origin: origin.into(), backend: Backend::Remapped(tensors) }
    }

    /// The component's `config.json`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Where the weights come from (a folder or a file), for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The weights, converted to `dtype` on `device`, under their diffusers names.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match &self.backend {
            Backend::Safetensors(files) => var_builder(files, dtype, device),
            Backend::Remapped(tensors) => Ok(tensors.var_builder(dtype, device)),
        }
    }

    /// An error saying the weights do not fit the config, naming where they came from.
    pub fn mismatch(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::BadModelFile {
            path: self.origin.clone(),
            reason: format!("{what} weights do not match config.json: {e}"),
        }
    }
}
