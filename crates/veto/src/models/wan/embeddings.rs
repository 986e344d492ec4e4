//! The inputs of Wan's transformer: the 3-D patch embedding (a `Conv3d` whose kernel equals its
//! stride, run as one matmul over flattened patches), the 3-D rotary position table, the
//! timestep / text / image condition embedder (`condition_embedder`), and the unpatchify.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::models::layers::{linear, timestep_features, Linear, MlpEmbedder, QuantizedWeights};

/// `patch_embedding`: `[B, C, F, H, W]` -> tokens `[B, F' H' W', dim]` in (frame, row, column)
/// order, as `Conv3d(kernel = stride = patch)` followed by `flatten(2).transpose(1, 2)`.
pub struct PatchEmbedding {
    /// `[dim, C pt ph pw]`, the conv kernel flattened in (channel, t, h, w) order.
    weight: Tensor,
    bias: Tensor,
    patch: [usize; 3],
}

impl PatchEmbedding {
    pub fn new(in_channels: usize, dim: usize, patch: [usize; 3], vb: VarBuilder) -> Result<Self> {
        let [pt, ph, pw] = patch;
        let weight = vb.get((dim, in_channels, pt, ph, pw), "weight")?.reshape((dim, in_channels * pt * ph * pw))?;
        Ok(Self { weight, bias: vb.get(dim, "bias")?, patch })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, f, h, w) = x.dims5()?;
        let [pt, ph, pw] = self.patch;
        let (nf, nh, nw) = (f / pt, h / ph, w / pw);
        let patches = x
            .reshape(vec![b, c, nf, pt, nh, ph, nw, pw])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape((b, nf * nh * nw, c * pt * ph * pw))?
            .to_dtype(self.weight.dtype())?;
        patches.broadcast_matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// `proj_out`'s `[B, F' H' W', pt ph pw C]` back to `[B, C, F, H, W]`.
pub fn unpatchify(x: &Tensor, grid: [usize; 3], patch: [usize; 3]) -> Result<Tensor> {
    let b = x.dim(0)?;
    let [nf, nh, nw] = grid;
    let [pt, ph, pw] = patch;
    let c = x.dim(D::Minus1)? / (pt * ph * pw);
    x.reshape(vec![b, nf, nh, nw, pt, ph, pw, c])?.permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?.reshape((
        b,
        c,
        nf * pt,
        nh * ph,
        nw * pw,
    ))
}

/// The rotary angles of every token, `cos` and `sin` `[S, head_dim / 2]`, one angle per pair of
/// channels: the first `t_dim / 2` pairs rotate with the frame index, the next `h_dim / 2` with
/// the row, the last `w_dim / 2` with the column (`h_dim = w_dim = 2 (head_dim / 6)`).
/// Frequencies `theta^(-2i / dim)` per part, computed in f64 as diffusers does.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(head_dim: usize, grid: [usize; 3], max_seq_len: usize, device: &Device) -> Result<Self> {
        let hw = 2 * (head_dim / 6);
        let dims = [head_dim - 2 * hw, hw, hw];
        if grid.iter().any(|&n| n > max_seq_len) {
            candle_core::bail!("a latent grid of {grid:?} patches exceeds rope_max_seq_len {max_seq_len}");
        }
        let freqs: Vec<Vec<f64>> = dims
            .iter()
            .map(|&dim| (0..dim / 2).map(|i| 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64)).collect())
            .collect();
        let half = head_dim / 2;
        let tokens = grid[0] * grid[1] * grid[2];
        let (mut cos, mut sin) = (Vec::with_capacity(tokens * half), Vec::with_capacity(tokens * half));
        for f in 0..grid[0] {
            for h in 0..grid[1] {
                for w in 0..grid[2] {
                    for (part, pos) in [f, h, w].into_iter().enumerate() {
                        for &freq in &freqs[part] {
                            let angle = pos as f64 * freq;
                            cos.push(angle.cos() as f32);
                            sin.push(angle.sin() as f32);
                        }
                    }
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (tokens, half), device)?,
            sin: Tensor::from_vec(sin, (tokens, half), device)?,
        })
    }

    /// Rotate the channel pairs `(2i, 2i + 1)` of `x` `[B, H, S, d]` (one parallel pass on the
    /// CPU in f32).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::kernels::rotate_pairs(x, &self.cos, &self.sin)? {
            return Ok(y);
        }
        let (b, h, s, d) = x.dims4()?;
        let dtype = x.dtype();
        let pairs = x.to_dtype(DType::F32)?.reshape((b, h, s, d / 2, 2))?;
        let x1 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
        let x2 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
        let (cos, sin) = (&self.cos, &self.sin);
        let out1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let out2 = (x1.broadcast_mul(sin)? + x2.broadcast_mul(cos)?)?;
        Tensor::stack(&[out1, out2], 4)?.reshape((b, h, s, d))?.to_dtype(dtype)
    }
}

/// LayerNorm with weight and bias (diffusers `FP32LayerNorm`, computed in f32).
pub struct AffineNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl AffineNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        candle_nn::ops::layer_norm(&f32(x)?, &f32(&self.weight)?, &f32(&self.bias)?, self.eps as f32)?
            .to_dtype(x.dtype())
    }
}

/// `image_embedder` (I2V): LayerNorm -> Linear -> GELU (erf) -> Linear -> LayerNorm over the CLIP
/// vision states, with an optional learned position table (`pos_embed`, FLF2V's two images).
pub struct ImageEmbedder {
    norm1: AffineNorm,
    proj_in: Linear,
    proj_out: Linear,
    norm2: AffineNorm,
    pos_embed: Option<Tensor>,
}

impl ImageEmbedder {
    pub fn new(
        image_dim: usize,
        dim: usize,
        pos_embed_seq_len: Option<usize>,
        vb: VarBuilder,
        q: &QuantizedWeights,
    ) -> Result<Self> {
        Ok(Self {
            norm1: AffineNorm::new(image_dim, 1e-5, vb.pp("norm1"))?,
            proj_in: linear(image_dim, image_dim, vb.pp("ff.net.0.proj"), q)?,
            proj_out: linear(image_dim, dim, vb.pp("ff.net.2"), q)?,
            norm2: AffineNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            pos_embed: pos_embed_seq_len.map(|n| vb.get((1, n, image_dim), "pos_embed")).transpose()?,
        })
    }

    /// `[B, N, image_dim]` -> `[B', N', dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.pos_embed {
            Some(pos) => {
                let (b, n, d) = x.dims3()?;
                let (per_row, pos_len) = (2 * n, pos.dim(1)?);
                if b % 2 != 0 || per_row != pos_len {
                    candle_core::bail!("image states [{b}, {n}, {d}] do not fit pos_embed of {pos_len} tokens");
                }
                x.reshape((b / 2, per_row, d))?.broadcast_add(&pos.to_dtype(x.dtype())?)?
            }
            None => x.clone(),
        };
        let h = self.norm1.forward(&x)?;
        let h = self.proj_out.forward(&self.proj_in.forward(&h)?.gelu_erf()?)?;
        self.norm2.forward(&h)
    }
}

/// `condition_embedder`: the timestep embedding `temb` `[B, dim]` and its six-way block
/// modulation `[B, 6, dim]`, the projected text (`text_embedder`, GELU-tanh MLP) and, for I2V,
/// the projected image states.
pub struct ConditionEmbedder {
    freq_dim: usize,
    time_embedder: MlpEmbedder,
    time_proj: Linear,
    text_proj_in: Linear,
    text_proj_out: Linear,
    image_embedder: Option<ImageEmbedder>,
}

impl ConditionEmbedder {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        freq_dim: usize,
        text_dim: usize,
        image_dim: Option<usize>,
        pos_embed_seq_len: Option<usize>,
        vb: VarBuilder,
        q: &QuantizedWeights,
    ) -> Result<Self> {
        let image_embedder =
            image_dim.map(|d| ImageEmbedder::new(d, dim, pos_embed_seq_len, vb.pp("image_embedder"), q)).transpose()?;
        Ok(Self {
            freq_dim,
            time_embedder: MlpEmbedder::new(freq_dim, dim, vb.pp("time_embedder"), q)?,
            time_proj: linear(dim, 6 * dim, vb.pp("time_proj"), q)?,
            text_proj_in: linear(text_dim, dim, vb.pp("text_embedder.linear_1"), q)?,
            text_proj_out: linear(dim, dim, vb.pp("text_embedder.linear_2"), q)?,
            image_embedder,
        })
    }

    pub fn has_image(&self) -> bool {
        self.image_embedder.is_some()
    }

    /// `t` `[B]` on the 0..1000 scale -> (`temb` `[B, dim]`, modulation `[B, 6, dim]`), in f32
    /// as diffusers keeps the time embedder.
    pub fn time(&self, t: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let feats = timestep_features(t, self.freq_dim)?.to_dtype(dtype)?;
        let temb = self.time_embedder.forward(&feats)?;
        let proj = self.time_proj.forward(&temb.silu()?)?;
        let (b, six_dim) = proj.dims2()?;
        Ok((temb.to_dtype(DType::F32)?, proj.reshape((b, 6, six_dim / 6))?.to_dtype(DType::F32)?))
    }

    /// UMT5 states `[B, L, text_dim]` -> `[B, L, dim]`.
    pub fn text(&self, states: &Tensor) -> Result<Tensor> {
        self.text_proj_out.forward(&self.text_proj_in.forward(states)?.gelu()?)
    }

    /// CLIP vision states `[B, N, image_dim]` -> `[B, N, dim]`.
    pub fn image(&self, states: &Tensor) -> Result<Tensor> {
        match &self.image_embedder {
            Some(e) => e.forward(states),
            None => candle_core::bail!("image states given to a transformer without image_embedder (a T2V model)"),
        }
    }
}
