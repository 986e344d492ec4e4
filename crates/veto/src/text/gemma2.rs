//! Gemma-2 as a text encoder (SANA's `text_encoder`, transformers' `Gemma2Model`): token
//! embeddings times `sqrt(hidden)`, decoder layers (RMS norms with `1 + weight`, grouped-query
//! causal attention with RoPE, `query_pre_attn_scalar` scaling and tanh logit soft-capping,
//! GeGLU MLP, norms before and after both sublayers), the final norm: the last hidden state.
//!
//! candle-transformers' `gemma2::Model` does not fit here: it returns only the last token's
//! logits (and needs `lm_head` / `model.` names a `Gemma2Model` checkpoint has not).
//! Padding is never run: with right padding and causal attention the real tokens' states do
//! not depend on the pads, and SANA's transformer masks the pads out.

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::loading::config::read_config;
use crate::loading::weights::ComponentWeights;

#[derive(Debug, Clone, Deserialize)]
pub struct Gemma2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub query_pre_attn_scalar: f64,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    /// transformers < 5 writes `rope_theta`; 5 writes `rope_parameters.rope_theta`.
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<serde_json::Value>,
    pub attn_logit_softcapping: Option<f64>,
    pub sliding_window: Option<usize>,
    #[serde(default = "gelu_tanh")]
    pub hidden_activation: String,
    #[serde(default)]
    pub attention_bias: bool,
}

fn eps() -> f64 {
    1e-6
}
fn gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}

impl Gemma2Config {
    fn theta(&self) -> f64 {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64()).unwrap_or(10000.0)
    }
}

/// Gemma's RMSNorm: `x / sqrt(mean(x^2) + eps) * (1 + weight)`, in f32.
struct GemmaRmsNorm {
    scale: Tensor,
    eps: f64,
}

impl GemmaRmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { scale: (vb.get(dim, "weight")?.to_dtype(DType::F32)? + 1.0)?, eps })
    }
}

impl Module for GemmaRmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        xf.broadcast_mul(&inv)?.broadcast_mul(&self.scale)?.to_dtype(x.dtype())
    }
}

struct Layer {
    input_layernorm: GemmaRmsNorm,
    post_attention_layernorm: GemmaRmsNorm,
    pre_feedforward_layernorm: GemmaRmsNorm,
    post_feedforward_layernorm: GemmaRmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    fn new(c: &Gemma2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let norm = |name: &str| GemmaRmsNorm::new(h, c.rms_norm_eps, vb.pp(name));
        let lin = |i: usize, o: usize, bias: bool, vb: VarBuilder| {
            if bias {
                candle_nn::linear(i, o, vb)
            } else {
                candle_nn::linear_no_bias(i, o, vb)
            }
        };
        let a = vb.pp("self_attn");
        let m = vb.pp("mlp");
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            q: lin(h, c.num_attention_heads * d, c.attention_bias, a.pp("q_proj"))?,
            k: lin(h, c.num_key_value_heads * d, c.attention_bias, a.pp("k_proj"))?,
            v: lin(h, c.num_key_value_heads * d, c.attention_bias, a.pp("v_proj"))?,
            o: lin(c.num_attention_heads * d, h, c.attention_bias, a.pp("o_proj"))?,
            gate: lin(h, c.intermediate_size, false, m.pp("gate_proj"))?,
            up: lin(h, c.intermediate_size, false, m.pp("up_proj"))?,
            down: lin(c.intermediate_size, h, false, m.pp("down_proj"))?,
        })
    }
}

pub struct Gemma2TextEncoder {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: GemmaRmsNorm,
    config: Gemma2Config,
    device: Device,
    dir: PathBuf,
}

impl Gemma2TextEncoder {
    pub fn load_weights(weights: &ComponentWeights, device: &Device, dtype: DType) -> Result<Self> {
        let config: Gemma2Config = read_config(weights.config_path(), "Gemma-2 config")?;
        if config.hidden_activation != "gelu_pytorch_tanh" && config.hidden_activation != "gelu_tanh" {
            return Err(Error::invalid(format!(
                "{}: hidden_activation \"{}\" is not supported (gelu_pytorch_tanh)",
                weights.config_path().display(),
                config.hidden_activation
            )));
        }
        if config.num_key_value_heads == 0 || !config.num_attention_heads.is_multiple_of(config.num_key_value_heads) {
            return Err(Error::invalid(format!(
                "{}: {} attention heads do not group over {} key/value heads",
                weights.config_path().display(),
                config.num_attention_heads,
                config.num_key_value_heads
            )));
        }
        let vb = weights.var_builder(dtype, device)?;
        let build = || -> candle_core::Result<_> {
            let embed = candle_nn::embedding(config.vocab_size, config.hidden_size, vb.pp("embed_tokens"))?;
            let layers = (0..config.num_hidden_layers)
                .map(|i| Layer::new(&config, vb.pp(format!("layers.{i}"))))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let norm = GemmaRmsNorm::new(config.hidden_size, config.rms_norm_eps, vb.pp("norm"))?;
            Ok((embed, layers, norm))
        };
        let (embed, layers, norm) = build().map_err(|e| weights.mismatch("Gemma-2", e))?;
        Ok(Self { embed, layers, norm, config, device: device.clone(), dir: PathBuf::from(weights.origin()) })
    }

    pub fn config(&self) -> &Gemma2Config {
        &self.config
    }

    /// RoPE tables `[T, head_dim / 2]` (f32, as transformers computes them).
    fn rope(&self, t: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let d = self.config.head_dim;
        let theta = self.config.theta() as f32;
        let inv: Vec<f32> = (0..d / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32)).collect();
        let inv = Tensor::from_vec(inv, (1, d / 2), &self.device)?;
        let pos = Tensor::arange(0u32, t as u32, &self.device)?.to_dtype(DType::F32)?.reshape((t, 1))?;
        let freqs = pos.matmul(&inv)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// The last hidden state `[1, T, hidden]` (f32) of one unpadded token row.
    pub fn encode(&self, ids: &[u32]) -> Result<Tensor> {
        let t = ids.len();
        if t == 0 {
            return Err(Error::invalid("Gemma-2: no tokens to encode"));
        }
        super::check_ids(&[ids.to_vec()], self.config.vocab_size, &self.dir)?;
        if let Some(w) = self.config.sliding_window.filter(|&w| t > w) {
            return Err(Error::invalid(format!("Gemma-2: {t} tokens exceed the sliding window of {w}")));
        }
        Ok(self.forward(ids)?.to_dtype(DType::F32)?)
    }

    fn forward(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let t = ids.len();
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let x = self.embed.forward(&ids)?;
        let dtype = x.dtype();
        let normalizer = Tensor::new((c.hidden_size as f32).sqrt(), &self.device)?.to_dtype(dtype)?;
        let mut x = x.broadcast_mul(&normalizer)?;
        let (cos, sin) = self.rope(t)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, t), &self.device)?;
        let (h, kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let scale = 1.0 / c.query_pre_attn_scalar.sqrt();
        for layer in &self.layers {
            let residual = x.clone();
            let hs = layer.input_layernorm.forward(&x)?;
            let heads = |lin: &Linear, n: usize| -> candle_core::Result<Tensor> {
                lin.forward(&hs)?.reshape((1, t, n, d))?.transpose(1, 2)?.contiguous()
            };
            let q = candle_nn::rotary_emb::rope(&heads(&layer.q, h)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&heads(&layer.k, kv)?, &cos, &sin)?;
            let v = heads(&layer.v, kv)?;
            // Grouped queries: key/value head j serves query heads j*g .. (j+1)*g.
            let g = h / kv;
            let k = k.unsqueeze(2)?.broadcast_as((1, kv, g, t, d))?.reshape((1, h, t, d))?;
            let v = v.unsqueeze(2)?.broadcast_as((1, kv, g, t, d))?.reshape((1, h, t, d))?;
            let mut scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
            if let Some(cap) = c.attn_logit_softcapping {
                scores = ((scores / cap)?.tanh()? * cap)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?.to_dtype(dtype)?;
            let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((1, t, h * d))?;
            let attn = layer.post_attention_layernorm.forward(&layer.o.forward(&attn)?)?;
            x = (residual + attn)?;
            let hs = layer.pre_feedforward_layernorm.forward(&x)?;
            let mlp = layer.down.forward(&(layer.gate.forward(&hs)?.gelu()? * layer.up.forward(&hs)?)?)?;
            x = (&x + layer.post_feedforward_layernorm.forward(&mlp)?)?;
        }
        self.norm.forward(&x)
    }
}
