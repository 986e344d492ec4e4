//! Merging LoRA deltas into weights as they are read: a `SimpleBackend` over any other one.
//!
//! The wrapped backend serves a weight; when LoRA modules target it, the weight is read in f32,
//! each delta factor · (rows of B) · A is added, and the sum is converted to the asked dtype.
//! Weights no LoRA touches pass through unchanged (and unconverted).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// A LoRA file's tensors, memory-mapped.
pub struct LoraTensors {
    /// The file, for messages.
    pub path: PathBuf,
    /// Its tensors.
    pub tensors: MmapedSafetensors,
}

impl fmt::Debug for LoraTensors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LoraTensors({})", self.path.display())
    }
}

/// One module's contribution to one weight: `factor · (rows of up) · down`.
#[derive(Debug, Clone)]
pub struct Delta {
    /// The file holding `down` and `up`.
    pub file: Arc<LoraTensors>,
    /// A: `[rank, in, (kh, kw)]`.
    pub down: String,
    /// B: `[out, rank, (1, 1)]`.
    pub up: String,
    /// Rows of B, as `(start, len)` runs in order; empty = all.
    pub up_rows: Vec<(usize, usize)>,
    /// scale · alpha / rank.
    pub factor: f64,
}

impl Delta {
    /// The delta, f32, reshaped to `shape`.
    fn compute(&self, shape: &Shape, device: &Device) -> candle_core::Result<Tensor> {
        let a = self.file.tensors.load(&self.down, device)?.to_dtype(DType::F32)?;
        let b = self.file.tensors.load(&self.up, device)?.to_dtype(DType::F32)?;
        let rank = a.dim(0)?;
        let a = a.reshape((rank, a.elem_count() / rank))?;
        let b = b.reshape((b.dim(0)?, rank))?;
        let b = if self.up_rows.is_empty() {
            b
        } else {
            let runs = self.up_rows.iter().map(|&(s, n)| b.narrow(0, s, n)).collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&runs, 0)?
        };
        (b.matmul(&a)? * self.factor)?.reshape(shape)
    }
}

/// Every delta of a component, by the diffusers name of the weight it changes.
#[derive(Debug, Clone, Default)]
pub struct LoraDeltas {
    /// Weight name → its deltas.
    pub by_weight: HashMap<String, Vec<Delta>>,
}

impl LoraDeltas {
    /// `base` with the deltas merged into the weights they target.
    pub fn wrap(self: &Arc<Self>, base: VarBuilder<'static>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Merged { base, deltas: self.clone() }), dtype, device.clone())
    }
}

struct Merged {
    base: VarBuilder<'static>,
    deltas: Arc<LoraDeltas>,
}

impl Merged {
    fn merge(&self, name: &str, weight: Tensor, deltas: &[Delta], dtype: DType) -> candle_core::Result<Tensor> {
        let mut w = weight;
        for d in deltas {
            let delta = d.compute(w.shape(), w.device()).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "LoRA {} ({} / {}) on {name}: {e}",
                    d.file.path.display(),
                    d.down,
                    d.up
                ))
            })?;
            w = (w + delta)?;
        }
        w.to_dtype(dtype)
    }
}

impl SimpleBackend for Merged {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.deltas.by_weight.get(name) {
            None => self.base.get_with_hints_dtype(s, name, h, dtype),
            Some(deltas) => {
                let w = self.base.get_with_hints_dtype(s, name, h, DType::F32)?.to_device(dev)?;
                self.merge(name, w, deltas, dtype)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.deltas.by_weight.get(name) {
            None => self.base.get_unchecked_dtype(name, dtype),
            Some(deltas) => {
                let w = self.base.get_unchecked_dtype(name, DType::F32)?.to_device(dev)?;
                self.merge(name, w, deltas, dtype)
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}
