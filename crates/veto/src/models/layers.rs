//! Building blocks shared by the models: the linear layer that may be quantized ([`Linear`],
//! used for every big matmul of the transformers and the UNet; on the CPU it runs OpenBLAS where
//! the machine has it), and for the two transformers the adaptive-norm modulation heads
//! (diffusers `AdaLayerNormZero`, `AdaLayerNormContinuous`), the GELU feed-forward, and the
//! timestep + pooled-text conditioning embedding.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::kernels;
use crate::profile::{self, Op};

pub use crate::loading::quantized::QuantizedWeights;

/// A linear layer whose weight is dense (any dtype) or kept in ggml blocks (GGUF Q8_0, Q4_K, …)
/// and multiplied by candle's quantized matmul. The bias is always dense.
#[derive(Clone, Debug)]
pub enum Linear {
    Dense(candle_nn::Linear),
    Quantized { weight: Arc<QTensor>, matmul: QMatMul, bias: Option<Tensor>, dtype: DType },
}

/// `Linear(in_dim, out_dim)` with bias under `vb` (`weight`, `bias`): quantized when `quantized`
/// holds `<prefix>.weight` in ggml blocks, dense otherwise.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder, quantized: &QuantizedWeights) -> Result<Linear> {
    build_linear(in_dim, out_dim, true, vb, quantized)
}

/// A dense `Linear(in_dim, out_dim)` under `vb`, with or without bias (models that never load
/// ggml blocks: PixArt-Σ, SANA, DC-AE).
pub fn dense(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    build_linear(in_dim, out_dim, bias, vb, &QuantizedWeights::none())
}

/// [`linear`] without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder, quantized: &QuantizedWeights) -> Result<Linear> {
    build_linear(in_dim, out_dim, false, vb, quantized)
}

fn build_linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
    quantized: &QuantizedWeights,
) -> Result<Linear> {
    let name = format!("{}.weight", vb.prefix());
    let Some(weight) = quantized.matrix(&name) else {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        return Ok(Linear::from_weights(weight, bias));
    };
    let weight = weight?;
    if weight.shape().dims() != [out_dim, in_dim] {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: (out_dim, in_dim).into(),
            got: weight.shape().clone(),
        });
    }
    let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    Ok(Linear::Quantized { matmul: QMatMul::QTensor(weight.clone()), weight, bias, dtype: vb.dtype() })
}

impl Linear {
    /// A dense layer from its weight `[out, in]` and bias `[out]` (a patch embedding's or a 1x1
    /// convolution's kernel, reshaped).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, bias))
    }

    /// The output width.
    pub fn out_dim(&self) -> Result<usize> {
        match self {
            Self::Dense(l) => l.weight().dim(0),
            Self::Quantized { weight, .. } => Ok(weight.shape().dims()[0]),
        }
    }

    /// The dtype the layer computes in (a quantized layer's is the run dtype).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(l) => l.weight().dtype(),
            Self::Quantized { dtype, .. } => *dtype,
        }
    }

    /// Whether the weight is kept in ggml blocks.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized { .. })
    }

    /// The quantized weight, if any (for tests and memory accounting).
    pub fn quantized_weight(&self) -> Option<&QTensor> {
        match self {
            Self::Dense(_) => None,
            Self::Quantized { weight, .. } => Some(weight),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _scope = profile::scope(Op::Matmul);
        match self {
            // candle folds the batch into one GEMM only for contiguous input; otherwise it runs
            // a broadcast batched product, far slower than the copy.
            Self::Dense(l) => {
                let x = profile::contiguous(x)?;
                match kernels::blas::linear(&x, l.weight(), l.bias())? {
                    Some(y) => Ok(y),
                    None => few_rows_forward(l, &x),
                }
            }
            Self::Quantized { matmul, bias, .. } => quantized_forward(matmul, bias.as_ref(), x),
        }
    }
}

/// candle's CPU GEMM runs one row as a matrix-vector product that streams the weight once, but
/// two to four rows (the conditioning vectors of a guided or batched step, multiplied by adaLN
/// weights of up to 3072 x 18432) several times slower than that many single rows (two rows:
/// 94–111 ms against 2 x 17): on the CPU those go row by row, where the weight is large enough
/// (a million values: 4 MB in f32) for streaming it to outweigh a few more ops.
fn few_rows_forward(l: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let small = l.weight().elem_count() < 1 << 20;
    if small || !x.device().is_cpu() || !(2..=4).contains(&rows) {
        return l.forward(x);
    }
    let flat = x.reshape((rows, dims[dims.len() - 1]))?;
    let parts = (0..rows).map(|r| l.forward(&flat.narrow(0, r, 1)?)).collect::<Result<Vec<_>>>()?;
    let y = Tensor::cat(&parts, 0)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rows imply a leading dim") = y.dim(1)?;
    y.reshape(out_dims)
}

fn quantized_forward(matmul: &QMatMul, bias: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
    // The quantized kernels take one contiguous matrix of rows: fold the leading dims (free on
    // a contiguous input) and unfold them after.
    let dims = x.dims();
    let (&k, lead) = dims.split_last().ok_or_else(|| candle_core::Error::Msg("linear of a scalar".into()))?;
    let rows = x.contiguous()?.reshape((lead.iter().product::<usize>(), k))?;
    // On the CPU the kernels read f32, bf16 and f16 directly; elsewhere they want f32.
    let y = match x.device() {
        Device::Cpu => matmul.forward(&rows)?,
        _ if x.dtype() == DType::F32 => matmul.forward(&rows)?,
        _ => matmul.forward(&rows.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?,
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(y.dim(1)?);
    let y = y.reshape(out_dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// LayerNorm without affine parameters, eps 1e-6 (every norm of both transformers).
pub fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let _scope = profile::scope(Op::Norm);
    let dim = x.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(dim, x.dtype(), x.device())?;
    // A row slice of a batch (Flux's image rows of `[text ; image]` when B > 1) is strided;
    // candle's kernel needs contiguous rows (a no-op for B = 1).
    candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, 1e-6)
}

/// `normed * (1 + scale) + shift` on an already normalised `[B, S, dim]`, with `shift`/`scale`
/// `[B, dim]`. For when one normalised input feeds several modulations.
pub fn modulate_normed(normed: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let row = |x: &[f32], _: Option<&[f32]>, [shift, scale]: [&[f32]; 2], out: &mut [f32]| {
        for (((o, &x), &sh), &sc) in out.iter_mut().zip(x).zip(shift).zip(scale) {
            *o = x * (sc + 1.0) + sh;
        }
    };
    if let Some(out) = kernels::map_batch_rows(normed, None, [shift, scale], row)? {
        return Ok(out);
    }
    normed.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// [`layer_norm`] then [`modulate_normed`].
pub fn norm_and_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    modulate_normed(&layer_norm(x)?, shift, scale)
}

/// `x + gate * y`, with `gate` `[B, dim]`: the gated residuals of AdaLayerNormZero blocks.
pub fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let row = |x: &[f32], y: Option<&[f32]>, [gate]: [&[f32]; 1], out: &mut [f32]| {
        for (((o, &x), &y), &g) in out.iter_mut().zip(x).zip(y.unwrap_or_default()).zip(gate) {
            *o = x + y * g;
        }
    };
    if let Some(out) = kernels::map_batch_rows(x, Some(y), [gate], row)? {
        return Ok(out);
    }
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// `SiLU -> Linear(dim, n*dim)` (checkpoint key `linear`), chunked into `n` vectors `[B, dim]`:
/// the head of AdaLayerNormZero (6), SD35AdaLayerNormZeroX (9), Flux's single-block norm (3)
/// and AdaLayerNormContinuous (2).
pub struct Modulation {
    linear: Linear,
    n: usize,
}

impl Modulation {
    pub fn new(dim: usize, n: usize, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        Ok(Self { linear: linear(dim, n * dim, vb.pp("linear"), q)?, n })
    }

    pub fn chunks(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        self.linear.forward(&temb.silu()?)?.chunk(self.n, D::Minus1)
    }
}

/// AdaLayerNormContinuous without affine norm (the transformers' `norm_out`): its two chunks
/// are scale first, then shift, the reverse of AdaLayerNormZero.
pub struct AdaNormContinuous {
    modulation: Modulation,
}

impl AdaNormContinuous {
    pub fn new(dim: usize, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        Ok(Self { modulation: Modulation::new(dim, 2, vb, q)? })
    }

    /// `x` `[B, S, dim]` conditioned on `temb` `[B, dim]`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let m = self.modulation.chunks(temb)?;
        norm_and_modulate(x, &m[1], &m[0])
    }
}

/// `Linear(dim, 4 dim) -> GELU(tanh) -> Linear(4 dim, dim)` (keys `net.0.proj`, `net.2`).
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, 4 * dim, vb.pp("net.0.proj"), q)?,
            proj_out: linear(4 * dim, dim, vb.pp("net.2"), q)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&kernels::gelu_tanh(&self.proj_in.forward(x)?)?)
    }
}

/// Sinusoidal features of `t` (`[B]`, already on the 0..1000 scale), `channels` wide with cos
/// first (diffusers `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`). Computed in
/// f32 in the same order as diffusers: with Flux's guidance x1000 the arguments reach ~3500, so
/// the frequencies must round exactly like theirs to stay within 1e-4.
pub fn timestep_features(t: &Tensor, channels: usize) -> Result<Tensor> {
    let half = channels / 2;
    let neg_ln = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((neg_ln * i as f32) / half as f32).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// `linear_1 -> SiLU -> linear_2` (diffusers `TimestepEmbedding`, `PixArtAlphaTextProjection`).
pub struct MlpEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl MlpEmbedder {
    pub fn new(in_dim: usize, dim: usize, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, dim, vb.pp("linear_1"), q)?,
            linear_2: linear(dim, dim, vb.pp("linear_2"), q)?,
        })
    }
}

impl Module for MlpEmbedder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// `time_text_embed`: timestep (+ guidance, Flux-dev) + pooled text -> the conditioning vector
/// `temb` (diffusers `CombinedTimestep[Guidance]TextProjEmbeddings`).
pub struct TimeTextEmbed {
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
}

impl TimeTextEmbed {
    pub fn new(dim: usize, pooled_dim: usize, guidance: bool, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        let guidance_embedder =
            if guidance { Some(MlpEmbedder::new(256, dim, vb.pp("guidance_embedder"), q)?) } else { None };
        Ok(Self {
            timestep_embedder: MlpEmbedder::new(256, dim, vb.pp("timestep_embedder"), q)?,
            guidance_embedder,
            text_embedder: MlpEmbedder::new(pooled_dim, dim, vb.pp("text_embedder"), q)?,
        })
    }

    pub fn has_guidance(&self) -> bool {
        self.guidance_embedder.is_some()
    }

    /// `t` and `guidance` on the 0..1000 scale, `[B]`; `pooled` `[B, pooled_dim]`.
    pub fn forward(&self, t: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Result<Tensor> {
        let dtype = pooled.dtype();
        let mut emb = self.timestep_embedder.forward(&timestep_features(t, 256)?.to_dtype(dtype)?)?;
        if let (Some(embedder), Some(g)) = (&self.guidance_embedder, guidance) {
            emb = (emb + embedder.forward(&timestep_features(g, 256)?.to_dtype(dtype)?)?)?;
        }
        emb + self.text_embedder.forward(pooled)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two to four rows go through candle one at a time: the same values, in the input's
    /// leading shape.
    #[test]
    fn few_rows_equal_one_product() {
        let dev = Device::Cpu;
        // A weight of 2^20 values, the least that goes row by row.
        let w = Tensor::randn(0f32, 1.0, (1024, 1024), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 1024, &dev).unwrap();
        let plain = candle_nn::Linear::new(w, Some(b));
        for shape in [vec![2, 1024], vec![1, 3, 1024], vec![2, 2, 1024], vec![5, 1024]] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let (want, got) = (plain.forward(&x).unwrap(), few_rows_forward(&plain, &x).unwrap());
            assert_eq!(got.dims(), want.dims());
            let max_abs =
                |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            // Sums of 1024 products (magnitude ~30) in another order: relative to the largest.
            let err = max_abs(&(&got - &want).unwrap()) / max_abs(&want);
            assert!(err < 1e-5, "{shape:?}: relative error {err}");
        }
    }

    #[test]
    fn timestep_features_cos_first() {
        let t = Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap();
        let f = timestep_features(&t, 4).unwrap().to_vec2::<f32>().unwrap();
        // t = 0: cos = 1, sin = 0. t = 1: freqs [1, 0.01].
        assert_eq!(f[0], vec![1.0, 1.0, 0.0, 0.0]);
        assert!((f[1][0] - 1f32.cos()).abs() < 1e-6 && (f[1][2] - 1f32.sin()).abs() < 1e-6);
        assert!((f[1][1] - 0.01f32.cos()).abs() < 1e-6);
    }

    #[test]
    fn modulation_shift_and_scale() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 3.0], [0.0, 4.0]]], &dev).unwrap();
        let shift = Tensor::new(&[[1f32, -1.0]], &dev).unwrap();
        let scale = Tensor::new(&[[1f32, 0.0]], &dev).unwrap();
        // Each row normalises to about [-1, 1]; then * [2, 1] + [1, -1].
        let y = norm_and_modulate(&x, &shift, &scale).unwrap().to_vec3::<f32>().unwrap();
        for row in &y[0] {
            assert!((row[0] + 1.0).abs() < 1e-4 && row[1].abs() < 1e-4, "{row:?}");
        }
        let gate = Tensor::new(&[[2f32, 0.0]], &dev).unwrap();
        let z = gated_add(&x, &gate, &x).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(z[0], vec![vec![3.0, 3.0], vec![0.0, 4.0]]);
    }
}
