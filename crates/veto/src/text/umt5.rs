//! UMT5 encoder (transformers' `UMT5EncoderModel`), the text encoder of Wan2.1 (`text_encoder/`,
//! google/umt5-xxl). Its tokenizer is T5's kind (sentencepiece unigram, "▁" word prefix, EOS and no
//! BOS): load it with [`super::t5::T5Tokenizer`].
//!
//! Interface:
//! - `Umt5TextEncoder::load_weights(&ComponentWeights, &Device, DType) -> Result<Umt5TextEncoder>`
//! - `Umt5TextEncoder::encode(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>`:
//!   `[B, T]` ids and `[B, T]` mask (1 = real token) in, last hidden state `[B, T, d_model]` out.
//!
//! How it differs from T5 v1.1 (and why candle-transformers' `t5` does not fit): *every* layer owns
//! a relative-position bias table (T5 has one, in layer 0, shared by all layers). The rest is T5:
//! RMS norms before each sublayer, attention without the 1/sqrt(d) scaling, a gated-GELU
//! feed-forward, a final RMS norm.

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use super::{check_ids, ids_to_host};
use crate::error::{Error, Result};
use crate::loading::config::read_config;
use crate::loading::weights::ComponentWeights;

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "gated-gelu".into()
}

/// The fields of a transformers `UMT5Config` (`text_encoder/config.json`) the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

/// The feed-forward's activation and whether it is gated, from `feed_forward_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeedForwardKind {
    /// `gated-gelu`: transformers maps it to `gelu_new` (the tanh approximation).
    GatedGeluTanh,
    GatedRelu,
    GatedSilu,
    Relu,
}

impl FeedForwardKind {
    fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gated-gelu" | "gated-gelu_new" => Ok(Self::GatedGeluTanh),
            "gated-relu" => Ok(Self::GatedRelu),
            "gated-silu" => Ok(Self::GatedSilu),
            "relu" => Ok(Self::Relu),
            other => Err(format!(
                "unsupported feed_forward_proj {other:?} (supported: gated-gelu, gated-relu, gated-silu, relu)"
            )),
        }
    }
    fn act(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GatedGeluTanh => x.gelu(),
            Self::GatedRelu | Self::Relu => x.relu(),
            Self::GatedSilu => x.silu(),
        }
    }
}

/// T5's RMS norm: no mean, no bias; the variance in f32.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, eps })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)
    }
}

struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `[buckets, heads]`: this layer's own relative-position bias.
    bias_table: Embedding,
    heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn load(c: &Umt5Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let inner = c.num_heads * c.d_kv;
        Ok(Self {
            q: candle_nn::linear_no_bias(c.d_model, inner, vb.pp("q"))?,
            k: candle_nn::linear_no_bias(c.d_model, inner, vb.pp("k"))?,
            v: candle_nn::linear_no_bias(c.d_model, inner, vb.pp("v"))?,
            o: candle_nn::linear_no_bias(inner, c.d_model, vb.pp("o"))?,
            bias_table: candle_nn::embedding(
                c.relative_attention_num_buckets,
                c.num_heads,
                vb.pp("relative_attention_bias"),
            )?,
            heads: c.num_heads,
            d_kv: c.d_kv,
        })
    }

    /// `buckets`: `[T*T]` bucket ids; `mask`: additive `[B, 1, 1, T]` in f32.
    fn forward(&self, x: &Tensor, buckets: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let dtype = x.dtype();
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, self.d_kv))?.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // [T*T, H] -> [1, H, T, T]
        let bias = self.bias_table.forward(buckets)?.to_dtype(DType::F32)?;
        let bias = bias.reshape((t, t, self.heads))?.permute((2, 0, 1))?.unsqueeze(0)?;
        // No 1/sqrt(d) scaling: T5 folds it into the weights.
        let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, self.heads * self.d_kv))?;
        self.o.forward(&out.to_dtype(dtype)?)
    }
}

struct FeedForward {
    /// `wi_0` (gated) or `wi` (plain).
    wi: Linear,
    /// `wi_1`, the linear gate partner, for the gated kinds.
    wi_1: Option<Linear>,
    wo: Linear,
    kind: FeedForwardKind,
}

impl FeedForward {
    fn load(c: &Umt5Config, kind: FeedForwardKind, vb: VarBuilder) -> candle_core::Result<Self> {
        let (wi, wi_1) = if kind == FeedForwardKind::Relu {
            (candle_nn::linear_no_bias(c.d_model, c.d_ff, vb.pp("wi"))?, None)
        } else {
            (
                candle_nn::linear_no_bias(c.d_model, c.d_ff, vb.pp("wi_0"))?,
                Some(candle_nn::linear_no_bias(c.d_model, c.d_ff, vb.pp("wi_1"))?),
            )
        };
        Ok(Self { wi, wi_1, wo: candle_nn::linear_no_bias(c.d_ff, c.d_model, vb.pp("wo"))?, kind })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.kind.act(&self.wi.forward(x)?)?;
        if let Some(wi_1) = &self.wi_1 {
            h = (h * wi_1.forward(x)?)?;
        }
        self.wo.forward(&h)
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

impl Block {
    fn forward(&self, x: &Tensor, buckets: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.attn_norm.forward(x)?, buckets, mask)?)?;
        &x + self.ff.forward(&self.ff_norm.forward(&x)?)?
    }
}

/// UMT5 encoder loaded from a folder such as Wan's `text_encoder/`.
pub struct Umt5TextEncoder {
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    config: Umt5Config,
    device: Device,
    dtype: DType,
    dir: PathBuf,
}

impl std::fmt::Debug for Umt5TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Umt5TextEncoder")
            .field("dir", &self.dir)
            .field("d_model", &self.config.d_model)
            .field("num_layers", &self.config.num_layers)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Umt5TextEncoder {
    /// Load `config.json` and the weights (`shared.weight` or `encoder.embed_tokens.weight`,
    /// `encoder.block.N...`, `encoder.final_layer_norm`), converted to `dtype` on `device`.
    /// UMT5 overflows in f16 as T5 does: use bf16 (as Wan does) or f32.
    pub fn load_weights(weights: &ComponentWeights, device: &Device, dtype: DType) -> Result<Self> {
        let config: Umt5Config = read_config(weights.config_path(), "UMT5 config")?;
        let bad_config =
            |reason: String| Error::BadModelFile { path: weights.config_path().display().to_string(), reason };
        let kind = FeedForwardKind::parse(&config.feed_forward_proj).map_err(bad_config)?;
        if config.relative_attention_num_buckets < 4 || config.num_heads == 0 || config.num_layers == 0 {
            return Err(bad_config(format!(
                "num_heads {}, num_layers {}, relative_attention_num_buckets {}: UMT5 needs at least one head, \
                 one layer and four buckets",
                config.num_heads, config.num_layers, config.relative_attention_num_buckets
            )));
        }
        let vb = weights.var_builder(dtype, device)?;
        let load = || -> candle_core::Result<(Embedding, Vec<Block>, RmsNorm)> {
            let embed_vb =
                if vb.contains_tensor("shared.weight") { vb.pp("shared") } else { vb.pp("encoder.embed_tokens") };
            let embed = candle_nn::embedding(config.vocab_size, config.d_model, embed_vb)?;
            let enc = vb.pp("encoder");
            let mut blocks = Vec::with_capacity(config.num_layers);
            for i in 0..config.num_layers {
                let layer = enc.pp(format!("block.{i}.layer"));
                blocks.push(Block {
                    attn_norm: RmsNorm::load(config.d_model, config.layer_norm_epsilon, layer.pp("0.layer_norm"))?,
                    attn: SelfAttention::load(&config, layer.pp("0.SelfAttention"))?,
                    ff_norm: RmsNorm::load(config.d_model, config.layer_norm_epsilon, layer.pp("1.layer_norm"))?,
                    ff: FeedForward::load(&config, kind, layer.pp("1.DenseReluDense"))?,
                });
            }
            let final_norm = RmsNorm::load(config.d_model, config.layer_norm_epsilon, enc.pp("final_layer_norm"))?;
            Ok((embed, blocks, final_norm))
        };
        let (embed, blocks, final_norm) = load().map_err(|e| weights.mismatch("UMT5", e))?;
        let dir = PathBuf::from(weights.origin());
        Ok(Self { embed, blocks, final_norm, config, device: device.clone(), dtype, dir })
    }

    /// Last hidden state `[B, T, d_model]` (after the final norm) of `[B, T]` token ids of any
    /// integer dtype; `attention_mask` `[B, T]` (1 for real tokens, 0 for padding, any dtype)
    /// keeps padded keys out of every attention, as transformers does.
    pub fn encode(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let rows = ids_to_host(input_ids)?;
        check_ids(&rows, self.config.vocab_size, &self.dir)?;
        let (b, t) = (rows.len(), rows[0].len());
        if attention_mask.dims() != [b, t] {
            return Err(Error::invalid(format!(
                "UMT5 attention mask must be [{b}, {t}] like the token ids, got {:?}",
                attention_mask.dims()
            )));
        }
        let ids = Tensor::from_vec(rows.into_iter().flatten().collect::<Vec<u32>>(), (b, t), &self.device)?;
        let keep = attention_mask.to_device(&self.device)?.to_dtype(DType::F32)?.gt(0.0)?;
        // Additive mask: 0 for real keys, a large negative number for padding.
        let mask = keep
            .where_cond(
                &Tensor::zeros((b, t), DType::F32, &self.device)?,
                &Tensor::full(-1e30f32, (b, t), &self.device)?,
            )?
            .reshape((b, 1, 1, t))?;
        let buckets = Tensor::from_vec(
            relative_position_buckets(
                t,
                self.config.relative_attention_num_buckets,
                self.config.relative_attention_max_distance,
            ),
            t * t,
            &self.device,
        )?;
        let mut x = self.embed.forward(&ids)?;
        for block in &self.blocks {
            x = block.forward(&x, &buckets, &mask)?;
        }
        Ok(self.final_norm.forward(&x)?)
    }

    /// Convenience: one row of real tokens (no padding), as a batch of one.
    pub fn encode_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mask = Tensor::ones((1, ids.len()), DType::U8, &self.device)?;
        self.encode(&t, &mask)
    }

    pub fn config(&self) -> &Umt5Config {
        &self.config
    }
    pub fn hidden_size(&self) -> usize {
        self.config.d_model
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// The bidirectional relative-position buckets of a `t`-token sequence, row-major `[query, key]`
/// (Mesh TensorFlow's scheme as transformers' `UMT5Attention._relative_position_bucket`): half
/// the buckets per direction; in each, distances below a quarter of `num_buckets` get their own
/// bucket, larger ones share logarithmically wider buckets up to `max_distance`.
fn relative_position_buckets(t: usize, num_buckets: usize, max_distance: usize) -> Vec<u32> {
    let half = num_buckets / 2;
    let max_exact = half / 2;
    let mut out = Vec::with_capacity(t * t);
    for q in 0..t {
        for k in 0..t {
            let rel = k as i64 - q as i64;
            let base = if rel > 0 { half } else { 0 };
            let dist = rel.unsigned_abs() as usize;
            let bucket = if dist < max_exact {
                dist
            } else {
                // In f32 as torch computes it (the log of the distance ratio in f32, the constant
                // log in f64 rounded to f32), truncated toward zero like `.to(torch.long)`.
                let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
                let ratio = (dist as f32 / max_exact as f32).ln() / denom * (half - max_exact) as f32;
                (max_exact + ratio as usize).min(half - 1)
            };
            out.push((base + bucket) as u32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::relative_position_buckets;

    #[test]
    fn buckets_match_t5_scheme() {
        // 32 buckets / 128 max distance (umt5-xxl): 16 per direction, 8 exact.
        let b = relative_position_buckets(200, 32, 128);
        let at = |q: usize, k: usize| b[q * 200 + k];
        assert_eq!(at(0, 0), 0);
        assert_eq!(at(5, 0), 5); // key before the query: lower half
        assert_eq!(at(0, 5), 21); // key after: upper half
        assert_eq!(at(20, 0), 10); // 8 + trunc(ln(20/8)/ln(16)*8) = 8 + 2
        assert_eq!(at(199, 0), 15); // beyond max distance: last bucket
        assert_eq!(at(0, 199), 31);
    }
}
