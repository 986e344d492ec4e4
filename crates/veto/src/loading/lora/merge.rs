//! Merging LoRA deltas into weights as they are read: a `SimpleBackend` over any other one.
//!
//! The wrapped backend serves a weight; when LoRA modules target it, the weight is read in f32,
//! each delta (factor · (rows of B) · A, or a full `.diff` / `.diff_b` tensor times the scale) is
//! added, and the sum is converted to the asked dtype.
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

/// What a delta is made of.
#[derive(Debug, Clone)]
pub enum DeltaKind {
    /// B·A: `down` (A) `[rank, in, (k…)]` and `up` (B) `[out, rank, (1…)]`.
    LowRank {
        /// A's tensor name.
        down: String,
        /// B's tensor name.
        up: String,
    },
    /// A tensor of the target's size added as it is (`.diff`, `.diff_b`).
    Full {
        /// Its tensor name.
        tensor: String,
    },
}

/// One module's contribution to one tensor: `factor · (rows of the delta)`.
#[derive(Debug, Clone)]
pub struct Delta {
    /// The file holding the delta's tensors.
    pub file: Arc<LoraTensors>,
    /// B·A or a full delta.
    pub kind: DeltaKind,
    /// Rows of B (or of the full delta), as `(start, len)` runs in order; empty = all.
    pub up_rows: Vec<(usize, usize)>,
    /// scale · alpha / rank for B·A; the scale for full deltas.
    pub factor: f64,
}

impl Delta {
    /// The delta, f32, reshaped to `shape`.
    fn compute(&self, shape: &Shape, device: &Device) -> candle_core::Result<Tensor> {
        let load = |name: &str| self.file.tensors.load(name, device)?.to_dtype(DType::F32);
        let rows = |t: Tensor| -> candle_core::Result<Tensor> {
            if self.up_rows.is_empty() {
                return Ok(t);
            }
            let runs = self.up_rows.iter().map(|&(s, n)| t.narrow(0, s, n)).collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&runs, 0)
        };
        let delta = match &self.kind {
            DeltaKind::LowRank { down, up } => {
                let (a, b) = (load(down)?, load(up)?);
                let rank = a.dim(0)?;
                let a = a.reshape((rank, a.elem_count() / rank))?;
                let b = rows(b.reshape((b.dim(0)?, rank))?)?;
                b.matmul(&a)?
            }
            DeltaKind::Full { tensor } => {
                let t = load(tensor)?;
                let first = t.dims().first().copied().unwrap_or(1);
                rows(t.reshape((first, t.elem_count() / first.max(1)))?)?
            }
        };
        (delta * self.factor)?.reshape(shape)
    }

    /// The tensor names, for messages.
    fn describe(&self) -> String {
        match &self.kind {
            DeltaKind::LowRank { down, up } => format!("{down} / {up}"),
            DeltaKind::Full { tensor } => tensor.clone(),
        }
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
                candle_core::Error::Msg(format!("LoRA {} ({}) on {name}: {e}", d.file.path.display(), d.describe()))
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
