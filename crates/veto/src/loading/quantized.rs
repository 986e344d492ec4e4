//! Quantized weights for a model: the big matrices stay in their ggml blocks and run through
//! candle's quantized matmul; everything else is served dense, in the run dtype, through an
//! ordinary `VarBuilder`.
//!
//! Models ask [`QuantizedWeights::matrix`] for each big linear weight by its full name (the
//! `VarBuilder` prefix + `.weight`); a checkpoint without quantized tensors (safetensors)
//! simply answers `None` and the layer is built dense.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::gguf::RawTensor;

/// Tensors of one component in ggml blocks, by diffusers name, plus what loading handed out.
struct Store {
    origin: String,
    tensors: HashMap<String, RawTensor>,
    device: Device,
    quantized_bytes: AtomicUsize,
    dense_bytes: AtomicUsize,
}

/// The quantized matrices a model may use, if its checkpoint has any. Cheap to clone.
#[derive(Clone, Default)]
pub struct QuantizedWeights {
    store: Option<Arc<Store>>,
}

/// How many bytes of weights a model took while being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedBytes {
    /// Matrices kept in ggml blocks.
    pub quantized: usize,
    /// Everything served dense (in the run dtype).
    pub dense: usize,
}

impl QuantizedWeights {
    /// No quantized tensors: every layer is dense.
    pub fn none() -> Self {
        Self::default()
    }

    /// The quantized matrix stored under `name`, as candle blocks on the model's device;
    /// `None` when the checkpoint holds it as plain floats or not at all.
    pub fn matrix(&self, name: &str) -> Option<candle_core::Result<Arc<QTensor>>> {
        let store = self.store.as_ref()?;
        let raw = store.tensors.get(name).filter(|t| runs_quantized(t))?;
        Some(raw.to_qtensor(&store.device).map(|q| {
            store.quantized_bytes.fetch_add(raw.bytes().len(), Ordering::Relaxed);
            Arc::new(q)
        }))
    }

    /// Bytes handed out so far (quantized matrices and dense tensors).
    pub fn loaded_bytes(&self) -> LoadedBytes {
        match &self.store {
            None => LoadedBytes { quantized: 0, dense: 0 },
            Some(s) => LoadedBytes {
                quantized: s.quantized_bytes.load(Ordering::Relaxed),
                dense: s.dense_bytes.load(Ordering::Relaxed),
            },
        }
    }

    /// Where the tensors came from, for messages.
    pub fn origin(&self) -> Option<&str> {
        self.store.as_deref().map(|s| s.origin.as_str())
    }
}

/// Whether candle's quantized matmul takes `t` as the weight of a linear layer: a matrix in
/// ggml blocks. Its CPU kernels for Q4_1, Q5_0 and Q5_1 want an even number of blocks per row
/// (they assert it in debug builds); such rows (only in tiny models) are served dense.
fn runs_quantized(t: &RawTensor) -> bool {
    let [_, k] = t.shape() else {
        return false;
    };
    let pairs_only = matches!(t.dtype(), GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1);
    t.is_block_quantized() && !(pairs_only && (k / t.dtype().block_size()) % 2 == 1)
}

/// `tensors` (diffusers names) as a `VarBuilder` serving dense tensors in `dtype` on `device`,
/// and the quantized matrices among them.
pub fn quantized_var_builder(
    tensors: HashMap<String, RawTensor>,
    origin: String,
    dtype: DType,
    device: &Device,
) -> (VarBuilder<'static>, QuantizedWeights) {
    let store = Arc::new(Store {
        origin,
        tensors,
        device: device.clone(),
        quantized_bytes: AtomicUsize::new(0),
        dense_bytes: AtomicUsize::new(0),
    });
    let vb = VarBuilder::from_backend(Box::new(DenseBackend(store.clone())), dtype, device.clone());
    (vb, QuantizedWeights { store: Some(store) })
}

/// Serves any stored tensor dequantized: norms, biases, embeddings, convolutions, and the
/// matrices of layers that are not built quantized.
struct DenseBackend(Arc<Store>);

impl SimpleBackend for DenseBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let raw = self.0.tensors.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?;
        if raw.shape() != shape.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: raw.shape().into(),
            });
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let raw = self.0.tensors.get(name).ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?;
        let t = raw.dequantize(dtype, dev)?;
        self.0.dense_bytes.fetch_add(t.elem_count() * dtype.size_in_bytes(), Ordering::Relaxed);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}
