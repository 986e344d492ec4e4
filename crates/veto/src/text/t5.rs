//! T5 (v1.1 / T5-XXL) tokenizer and encoder, as Flux, SD3 and others use for the long
//! text stream. The encoder is candle's `T5EncoderModel`; this module adds loading from a
//! diffusers folder (config + single or sharded safetensors) and HF-exact padding.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};
use tokenizers::Tokenizer;

use super::{check_ids, encode_fixed_length, ids_to_host, TokenizedText};
use crate::error::{Error, Result};
use crate::loading::config::read_config;
use crate::loading::weights::ComponentWeights;

/// The T5 tokenizer of a folder such as `tokenizer_2/`, read from its `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    tok: Tokenizer,
    pad_id: u32,
    path: PathBuf,
}

impl T5Tokenizer {
    /// Load `dir/tokenizer.json`. The pad token comes from `special_tokens_map.json` /
    /// `tokenizer_config.json` when present, else `<pad>`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                what: if dir.is_dir() {
                    "T5 tokenizer file not found".into()
                } else {
                    "T5 tokenizer folder not found".into()
                },
                path: if dir.is_dir() { path.display().to_string() } else { dir.display().to_string() },
            });
        }
        let mut tok = Tokenizer::from_file(&path).map_err(|e| Error::BadModelFile {
            path: path.display().to_string(),
            reason: format!("cannot load tokenizer: {e}"),
        })?;
        // We truncate and pad ourselves (see `encode_fixed_length`), per call.
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| Error::other(e.to_string()))?;
        let pad = super::configured_special_token(dir, "pad_token").unwrap_or_else(|| "<pad>".into());
        let pad_id = tok.token_to_id(&pad).ok_or_else(|| Error::BadModelFile {
            path: path.display().to_string(),
            reason: format!("pad token {pad:?} is not in the vocabulary"),
        })?;
        Ok(Self { tok, pad_id, path })
    }

    /// Ids of `text`, truncated (keeping the trailing `</s>`) and padded to `max_len`.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        Ok(self.tokenize(text, max_len)?.ids)
    }

    /// Like [`Self::encode_padded`], also telling whether the prompt was cut off.
    pub fn tokenize(&self, text: &str, max_len: usize) -> Result<TokenizedText> {
        encode_fixed_length(&self.tok, text, max_len, self.pad_id, &self.path)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` tokenizer (no truncation/padding configured).
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }
}

/// T5 encoder (`T5EncoderModel`) loaded from a folder such as `text_encoder_2/`.
pub struct T5TextEncoder {
    // candle's forward takes `&mut self` for its decoder KV cache, which the encoder never
    // uses; the mutex lets `encode` take `&self` and keeps the type `Sync`.
    model: Mutex<T5EncoderModel>,
    config: T5Config,
    device: Device,
    dtype: DType,
    dir: PathBuf,
}

impl std::fmt::Debug for T5TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5TextEncoder")
            .field("dir", &self.dir)
            .field("d_model", &self.config.d_model)
            .field("num_layers", &self.config.num_layers)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl T5TextEncoder {
    /// Load `dir/config.json` and `dir/model.safetensors` (or its sharded index), converting
    /// weights to `dtype` on `device`. Note T5 overflows in f16; use bf16 or f32.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_weights(&ComponentWeights::from_dir(dir, "model", "T5 text encoder")?, device, dtype)
    }

    /// Load from a component's config and weights, wherever they come from.
    pub fn load_weights(weights: &ComponentWeights, device: &Device, dtype: DType) -> Result<Self> {
        let config: T5Config = read_config(weights.config_path(), "T5 config")?;
        let vb = weights.var_builder(dtype, device)?;
        let model = T5EncoderModel::load(vb, &config).map_err(|e| weights.mismatch("T5", e))?;
        let dir = PathBuf::from(weights.origin());
        Ok(Self { model: Mutex::new(model), config, device: device.clone(), dtype, dir })
    }

    /// Last hidden state `[B, L, d_model]` (after the final layer norm) for `[B, L]` token
    /// ids of any integer dtype. No attention mask, as diffusers' Flux pipeline does.
    pub fn encode(&self, input_ids: &Tensor) -> Result<Tensor> {
        let rows = ids_to_host(input_ids)?;
        check_ids(&rows, self.config.vocab_size, &self.dir)?;
        let (b, l) = (rows.len(), rows[0].len());
        let flat: Vec<u32> = rows.into_iter().flatten().collect();
        let ids = Tensor::from_vec(flat, (b, l), &self.device)?;
        let mut model = self.model.lock().map_err(|_| Error::other("T5 encoder lock poisoned"))?;
        Ok(model.forward(&ids)?)
    }

    /// Convenience: encode one list of ids as a batch of one.
    pub fn encode_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        self.encode(&t)
    }

    pub fn config(&self) -> &T5Config {
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
