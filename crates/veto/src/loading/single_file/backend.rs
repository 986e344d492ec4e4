//! Serving diffusers tensor names from an original-layout file: each name is looked up in the
//! component's [`KeyMap`], its source tensor read from the memory-mapped file, transformed by
//! the entry's [`Op`](super::key_map::Op) and checked against the shape the model asks for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::key_map::KeyMap;
use crate::error::{Error, Result};

/// A memory-mapped checkpoint, shared by the components read from it.
pub struct MappedFile {
    path: PathBuf,
    tensors: MmapedSafetensors,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile").field("path", &self.path).finish()
    }
}

impl MappedFile {
    /// Maps the safetensors file at `path` (its header must already have passed
    /// [`Header::read`](super::header::Header::read)).
    pub fn open(path: &Path) -> Result<Self> {
        // SAFETY: mapped read-only; like every safetensors loader we rely on nobody truncating
        // the file while the model is alive.
        let tensors = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::BadModelFile {
            path: path.display().to_string(),
            reason: format!("cannot read safetensors: {e}"),
        })?;
        Ok(Self { path: path.to_path_buf(), tensors })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One component's tensors, under diffusers names, from a mapped file.
#[derive(Debug, Clone)]
pub struct RemappedTensors {
    file: Arc<MappedFile>,
    map: Arc<KeyMap>,
}

impl RemappedTensors {
    /// The tensors of `map` in `file`.
    pub fn new(file: Arc<MappedFile>, map: KeyMap) -> Self {
        Self { file, map: Arc::new(map) }
    }

    /// The key map.
    pub fn map(&self) -> &KeyMap {
        &self.map
    }

    /// Every diffusers name this file serves, with its shape (from the header and the ops).
    pub fn shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        self.map
            .iter()
            .filter_map(|(name, m)| {
                let stored = self.file.tensors.get(&m.source).ok()?;
                Some((name.to_string(), m.op.shape_of(stored.shape())))
            })
            .collect()
    }

    /// A `VarBuilder` converting every tensor to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let m = self.map.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor {
            path: format!("{name} (nothing in {} maps to it)", self.file.path.display()),
        })?;
        // Slice on the CPU so that only the part used reaches the device.
        let stored = self.file.tensors.get(&m.source)?.load(&Device::Cpu)?;
        let t = m.op.apply(stored).map_err(|e| e.context(format!("{name} from {m}")))?;
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for RemappedTensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            let source = self.map.get(name).map(|m| m.to_string()).unwrap_or_default();
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name} (from {source} in {})", self.file.path.display()),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|m| self.file.tensors.get(&m.source).is_ok())
    }
}
