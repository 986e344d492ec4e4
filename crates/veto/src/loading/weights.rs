//! One component's config file and weights, wherever they come from.
//!
//! Every model loader (text encoders, VAE, transformer, UNet) takes a [`ComponentWeights`]:
//! the path of the component's `config.json` and a way to open its tensors under their
//! diffusers names. A diffusers folder gives plain safetensors files; other checkpoint
//! formats plug in here as further backends, so the loaders never see where the weights
//! came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::gguf_layout::GgufTensors;
use super::lora::merge::LoraDeltas;
use super::quantized::{quantized_var_builder, QuantizedWeights};
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
    /// A GGUF file (checked when opened), its tensors under diffusers' names whatever its layout.
    Gguf(GgufTensors),
    /// Tensors of an original-layout single file, served under diffusers names.
    Remapped(RemappedTensors),
    /// Another backend with LoRA deltas merged into the weights they target as they are read.
    Lora(Box<Backend>, Arc<LoraDeltas>),
}

impl Backend {
    /// Every tensor dense in `dtype`, under diffusers' names.
    fn var_builder(&self, dtype: DType, device: &Device, origin: &str) -> Result<VarBuilder<'static>> {
        match self {
            Backend::Safetensors(files) => var_builder(files, dtype, device),
            Backend::Gguf(file) => Ok(quantized_var_builder(file.read()?, origin.to_string(), dtype, device).0),
            Backend::Remapped(tensors) => Ok(tensors.var_builder(dtype, device)),
            Backend::Lora(base, deltas) => Ok(deltas.wrap(base.var_builder(dtype, device, origin)?, dtype, device)),
        }
    }

    fn tensor_shapes(&self) -> Result<BTreeMap<String, Vec<usize>>> {
        match self {
            Backend::Safetensors(files) => {
                let mut shapes = BTreeMap::new();
                for f in files {
                    shapes.extend(super::lora::header::read_header(f)?.shapes);
                }
                Ok(shapes)
            }
            Backend::Gguf(file) => Ok(file.shapes()),
            Backend::Remapped(tensors) => Ok(tensors.shapes()),
            Backend::Lora(base, _) => base.tensor_shapes(),
        }
    }
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

    /// A GGUF file (quantized or not), configured by `config_path`, with diffusers tensor names
    /// or in an original layout (city96's files: BFL FLUX, SD3 MMDiT, LDM UNet). The header, every
    /// tensor's extent and, for an original layout, the config against the shapes are checked
    /// here, before any weights are read.
    pub fn from_gguf(config_path: PathBuf, file: &Path) -> Result<Self> {
        let gguf = GgufTensors::open(file)?;
        let origin = match gguf.layout() {
            None => file.display().to_string(),
            Some(layout) => {
                layout.check_config(&config_path, file)?;
                format!("{} ({})", file.display(), layout.part.layout)
            }
        };
        Ok(Self { config_path, origin, backend: Backend::Gguf(gguf) })
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
        self.backend.var_builder(dtype, device, &self.origin)
    }

    /// The weights for a model that can run quantized layers: the `VarBuilder` serves every
    /// tensor dense in `dtype`, and [`QuantizedWeights`] offers the matrices a quantized
    /// checkpoint keeps in ggml blocks (none for safetensors). A LoRA over a GGUF file merges into
    /// dequantized weights: correct, but that component is then dense in `dtype`.
    pub fn model_weights(&self, dtype: DType, device: &Device) -> Result<(VarBuilder<'static>, QuantizedWeights)> {
        match &self.backend {
            Backend::Gguf(file) => Ok(quantized_var_builder(file.read()?, self.origin.clone(), dtype, device)),
            other => Ok((other.var_builder(dtype, device, &self.origin)?, QuantizedWeights::none())),
        }
    }

    /// Every weight's diffusers name and shape, read from headers only (LoRA matching and
    /// shape checks happen before anything is loaded).
    pub fn tensor_shapes(&self) -> Result<BTreeMap<String, Vec<usize>>> {
        self.backend.tensor_shapes()
    }

    /// These weights with LoRA `deltas` merged in as they are read.
    pub fn with_lora(mut self, deltas: Arc<LoraDeltas>) -> Self {
        self.backend = Backend::Lora(Box::new(self.backend), deltas);
        self
    }

    /// An error saying the weights do not fit the config, naming where they came from.
    pub fn mismatch(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::BadModelFile {
            path: self.origin.clone(),
            reason: format!("{what} weights do not match config.json: {e}"),
        }
    }
}
