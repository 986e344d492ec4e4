//! CLIP text tokenizer and encoder (the `tokenizer/` + `text_encoder/` pair of Flux, SD, SDXL).
//!
//! The tokenizer reproduces transformers' `CLIPTokenizer` from `vocab.json` + `merges.txt`,
//! because real diffusers repos ship no `tokenizer.json` for it. The encoder is our own small,
//! config-driven CLIP text transformer: candle's versions fix the layer-norm epsilon and the
//! activation and do not return the penultimate hidden state that SDXL/SD3 condition on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::Deserialize;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::{check_ids, encode_fixed_length, ids_to_host, TokenizedText};
use crate::error::{Error, Result};
use crate::loading::config::read_config;
use crate::loading::weights::ComponentWeights;

/// CLIP's word pattern (transformers `CLIPTokenizer`): the special tokens, contractions,
/// letter runs, single digits, runs of other non-space characters.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Default CLIP context length when `tokenizer_config.json` does not say.
pub const CLIP_MAX_LENGTH: usize = 77;

/// The CLIP tokenizer of a folder such as `tokenizer/`.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tok: Tokenizer,
    pad_id: u32,
    bos_id: u32,
    eos_id: u32,
    model_max_length: usize,
    path: PathBuf,
}

impl ClipTokenizer {
    /// Load from `dir`: `tokenizer.json` when present, else `vocab.json` + `merges.txt`.
    /// Special tokens come from `special_tokens_map.json` / `tokenizer_config.json`,
    /// defaulting to CLIP's `<|startoftext|>` / `<|endoftext|>` (also used as pad and unk).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                what: "CLIP tokenizer folder not found".into(),
                path: dir.display().to_string(),
            });
        }
        let special =
            |key: &str, default: &str| super::configured_special_token(dir, key).unwrap_or_else(|| default.to_string());
        let bos = special("bos_token", "<|startoftext|>");
        let eos = special("eos_token", "<|endoftext|>");
        let unk = special("unk_token", "<|endoftext|>");
        let pad = special("pad_token", "<|endoftext|>");

        let json_path = dir.join("tokenizer.json");
        let (mut tok, path) = if json_path.is_file() {
            let tok = Tokenizer::from_file(&json_path).map_err(|e| Error::BadModelFile {
                path: json_path.display().to_string(),
                reason: format!("cannot load tokenizer: {e}"),
            })?;
            (tok, json_path)
        } else {
            let vocab_path = dir.join("vocab.json");
            (build_from_vocab_merges(dir, &bos, &eos, &unk, &pad)?, vocab_path)
        };
        // We truncate and pad ourselves, per call (see `encode_fixed_length`).
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| Error::other(e.to_string()))?;

        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| Error::BadModelFile {
                path: path.display().to_string(),
                reason: format!("special token {t:?} is not in the vocabulary"),
            })
        };
        let (bos_id, eos_id, pad_id) = (id(&bos)?, id(&eos)?, id(&pad)?);
        let model_max_length = super::configured_model_max_length(dir).unwrap_or(CLIP_MAX_LENGTH);
        Ok(Self { tok, pad_id, bos_id, eos_id, model_max_length, path })
    }

    /// Ids of `text` as `[BOS, tokens…, EOS, PAD…]`, exactly `max_len` long; too-long prompts
    /// are cut before EOS.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        Ok(self.tokenize(text, max_len)?.ids)
    }

    /// Like [`Self::encode_padded`], also telling whether (and what) the prompt lost.
    pub fn tokenize(&self, text: &str, max_len: usize) -> Result<TokenizedText> {
        encode_fixed_length(&self.tok, text, max_len, self.pad_id, &self.path)
    }

    /// `model_max_length` from `tokenizer_config.json` (77 for every CLIP in practice).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    /// The underlying `tokenizers` tokenizer (no truncation/padding configured).
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }
}

/// Build a `tokenizers::Tokenizer` that behaves like transformers' `CLIPTokenizer` built from
/// vocab.json + merges.txt (v5; identical to v4's fast tokenizer, and to v4's slow one for
/// ordinary text).
fn build_from_vocab_merges(dir: &Path, bos: &str, eos: &str, unk: &str, pad: &str) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    for p in [&vocab_path, &merges_path] {
        if !p.is_file() {
            return Err(Error::MissingFile {
                what: "CLIP tokenizer file not found (need tokenizer.json, or vocab.json and merges.txt)".into(),
                path: p.display().to_string(),
            });
        }
    }
    let vocab: HashMap<String, u32> = read_config(&vocab_path, "CLIP vocabulary")?;
    let merges_text = std::fs::read_to_string(&merges_path).map_err(|e| Error::BadModelFile {
        path: merges_path.display().to_string(),
        reason: format!("cannot read: {e}"),
    })?;
    // As `tokenizers` reads merges files (and so transformers v5): skip "#version" headers;
    // every other line is one "left right" pair, in rank order.
    let mut merges: Vec<(String, String)> = Vec::new();
    for (n, line) in merges_text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::BadModelFile {
                    path: merges_path.display().to_string(),
                    reason: format!("line {} is not a \"left right\" merge: {line:?}", n + 1),
                })
            }
        }
    }

    let vocab: Vocab = vocab.into_iter().collect();
    let bad = |reason: String| Error::BadModelFile { path: merges_path.display().to_string(), reason };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.to_string())
        .end_of_word_suffix("</w>".to_string())
        .build()
        .map_err(|e| bad(format!("vocab.json and merges.txt do not fit together: {e}")))?;

    let mut tok = Tokenizer::new(bpe);
    let regex_err = |e: tokenizers::Error| Error::other(format!("building CLIP tokenizer: {e}"));
    // transformers' CLIPTokenizer (v5, = the v4 fast tokenizer): NFC, collapse whitespace,
    // lowercase. The regex split then drops the whitespace.
    let normalizer = Sequence::new(vec![
        NFC.into(),
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(regex_err)?.into(),
        Lowercase.into(),
    ]);
    tok.with_normalizer(Some(normalizer)).map_err(regex_err)?;
    let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
        .map_err(regex_err)?;
    tok.with_pre_tokenizer(Some(PreSequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()])));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    let bos_id = vocab_id(&tok, bos, &vocab_path)?;
    let eos_id = vocab_id(&tok, eos, &vocab_path)?;
    tok.with_post_processor(Some(
        RobertaProcessing::new((eos.to_string(), eos_id), (bos.to_string(), bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    // Special tokens typed into a prompt map to their ids, as in transformers: the entries of
    // `added_tokens_decoder` with their matching flags, then any special token not listed.
    let mut specials = configured_added_tokens(dir);
    for t in [bos, eos, unk, pad] {
        if !specials.iter().any(|s| s.content == t) {
            specials.push(AddedToken::from(t, true));
        }
    }
    let (special, plain): (Vec<AddedToken>, Vec<AddedToken>) = specials.into_iter().partition(|t| t.special);
    tok.add_special_tokens(special).map_err(regex_err)?;
    tok.add_tokens(plain).map_err(regex_err)?;
    Ok(tok)
}

/// `added_tokens_decoder` of `tokenizer_config.json` as `AddedToken`s (empty when absent).
fn configured_added_tokens(dir: &Path) -> Vec<AddedToken> {
    let Ok(text) = std::fs::read_to_string(dir.join("tokenizer_config.json")) else {
        return Vec::new();
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    let Some(map) = json.get("added_tokens_decoder").and_then(|m| m.as_object()) else {
        return Vec::new();
    };
    let mut entries: Vec<(u64, AddedToken)> = map
        .iter()
        .filter_map(|(id, v)| {
            let id: u64 = id.parse().ok()?;
            let content = v.get("content")?.as_str()?;
            let flag = |k: &str, default: bool| v.get(k).and_then(|b| b.as_bool()).unwrap_or(default);
            let special = flag("special", true);
            let tok = AddedToken::from(content, special)
                .single_word(flag("single_word", false))
                .lstrip(flag("lstrip", false))
                .rstrip(flag("rstrip", false))
                .normalized(flag("normalized", !special));
            Some((id, tok))
        })
        .collect();
    entries.sort_by_key(|(id, _)| *id);
    entries.into_iter().map(|(_, t)| t).collect()
}

fn vocab_id(tok: &Tokenizer, token: &str, vocab_path: &Path) -> Result<u32> {
    tok.token_to_id(token).ok_or_else(|| Error::BadModelFile {
        path: vocab_path.display().to_string(),
        reason: format!("special token {token:?} is not in the vocabulary"),
    })
}

// ---------------------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------------------

fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos_token_id() -> i64 {
    // transformers' current CLIPTextConfig default; real configs always spell it out.
    49407
}

/// The fields of a transformers `CLIPTextConfig` (`text_encoder/config.json`) we use.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    QuickGelu,
    /// transformers' `"gelu"`: the exact, erf-based GELU.
    GeluErf,
    /// `"gelu_new"` / `"gelu_pytorch_tanh"`: the tanh approximation.
    GeluTanh,
}

impl Activation {
    pub(crate) fn parse(name: &str, config: &Path) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => Err(Error::BadModelFile {
                path: config.display().to_string(),
                reason: format!(
                    "unsupported CLIP hidden_act {other:?} (supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)"
                ),
            }),
        }
    }
    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

/// One pre-norm CLIP transformer layer; the vision tower (`models::clip_vision`) shares it.
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, c: &ClipTextConfig) -> candle_core::Result<Self> {
        Self::load_dims(vb, c.hidden_size, c.intermediate_size, c.layer_norm_eps)
    }

    pub(crate) fn load_dims(vb: VarBuilder, h: usize, intermediate: usize, eps: f64) -> candle_core::Result<Self> {
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, eps, vb.pp("layer_norm1"))?,
            q_proj: candle_nn::linear(h, h, attn.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, h, attn.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, h, attn.pp("v_proj"))?,
            out_proj: candle_nn::linear(h, h, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(h, eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(h, intermediate, mlp.pp("fc1"))?,
            fc2: candle_nn::linear(intermediate, h, mlp.pp("fc2"))?,
        })
    }

    /// Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x)). `mask` is the additive causal
    /// mask `[L, L]` in f32 (none for the vision tower).
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        heads: usize,
        act: Activation,
    ) -> candle_core::Result<Tensor> {
        let (b, l, h) = xs.dims3()?;
        let hd = h / heads;
        let dtype = xs.dtype();
        let x = self.layer_norm1.forward(xs)?;
        // Scores and softmax in f32: CLIP's pooled output is sensitive to bf16 softmax error.
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, heads, hd))?.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)
        };
        let q = (split(self.q_proj.forward(&x)?)? * (hd as f64).powf(-0.5))?;
        let k = split(self.k_proj.forward(&x)?)?;
        let v = split(self.v_proj.forward(&x)?)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?.to_dtype(dtype)?;
        let xs = (xs + self.out_proj.forward(&attn)?)?;
        let x = self.layer_norm2.forward(&xs)?;
        let x = self.fc2.forward(&act.apply(&self.fc1.forward(&x)?)?)?;
        xs + x
    }
}

/// Everything a diffusion pipeline takes from a CLIP text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `[B, L, hidden]` after the final layer norm (`last_hidden_state`).
    pub last_hidden_state: Tensor,
    /// `[B, L, hidden]` output of the second-to-last layer, no final layer norm
    /// (`hidden_states[-2]`, what SDXL and SD3 condition on).
    pub penultimate_hidden_state: Tensor,
    /// `[B, hidden]`: `last_hidden_state` at the EOS position (`pooler_output`, Flux's
    /// `pooled_prompt_embeds`).
    pub pooled: Tensor,
    /// `[B, projection_dim]`: `text_projection(pooled)` when the weights have a
    /// `text_projection` (CLIPTextModelWithProjection, e.g. SDXL's second encoder).
    pub text_embeds: Option<Tensor>,
}

/// A CLIP text encoder (`CLIPTextModel` / `CLIPTextModelWithProjection`) from a folder such
/// as `text_encoder/`.
#[derive(Debug, Clone)]
pub struct ClipTextEncoder {
    token_embedding: candle_nn::Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    activation: Activation,
    config: ClipTextConfig,
    device: Device,
    dtype: DType,
    dir: PathBuf,
}

impl ClipTextConfig {
    /// Read and check a CLIP text `config.json` (a full CLIPModel config's `text_config` too),
    /// without touching the weights.
    pub fn from_file(config_path: &Path) -> Result<Self> {
        let mut json: serde_json::Value = read_config(config_path, "CLIP text config")?;
        // A full CLIPModel config nests the text part.
        if let Some(text) = json.get("text_config").filter(|t| t.is_object()) {
            json = text.clone();
        }
        let config: ClipTextConfig = serde_json::from_value(json).map_err(|e| Error::BadModelFile {
            path: config_path.display().to_string(),
            reason: format!("invalid CLIP text config: {e}"),
        })?;
        if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
            return Err(Error::BadModelFile {
                path: config_path.display().to_string(),
                reason: format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    config.hidden_size, config.num_attention_heads
                ),
            });
        }
        if config.num_hidden_layers == 0 {
            return Err(Error::BadModelFile {
                path: config_path.display().to_string(),
                reason: "num_hidden_layers is 0".into(),
            });
        }

        Activation::parse(&config.hidden_act, config_path)?;
        Ok(config)
    }
}

impl ClipTextEncoder {
    /// Load `dir/config.json` and `dir/model.safetensors` (or its sharded index), converting
    /// weights to `dtype` on `device`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_weights(&ComponentWeights::from_dir(dir, "model", "CLIP text encoder")?, device, dtype)
    }

    /// Load from a component's config and weights, wherever they come from.
    pub fn load_weights(weights: &ComponentWeights, device: &Device, dtype: DType) -> Result<Self> {
        let dir = PathBuf::from(weights.origin());
        let config_path = weights.config_path().to_path_buf();
        let config = ClipTextConfig::from_file(&config_path)?;
        let activation = Activation::parse(&config.hidden_act, &config_path)?;
        let root = weights.var_builder(dtype, device)?;
        let vb = if root.contains_tensor("text_model.embeddings.token_embedding.weight") {
            root.pp("text_model")
        } else if root.contains_tensor("embeddings.token_embedding.weight") {
            root.clone()
        } else {
            return Err(Error::BadModelFile {
                path: dir.display().to_string(),
                reason: "no CLIP text weights (text_model.embeddings.token_embedding.weight) in the safetensors".into(),
            });
        };
        let weights_err = |e: candle_core::Error| Error::BadModelFile {
            path: dir.display().to_string(),
            reason: format!("CLIP text weights do not match config.json: {e}"),
        };
        let h = config.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(config.vocab_size, h, emb.pp("token_embedding")).map_err(weights_err)?;
        let position_embedding =
            emb.pp("position_embedding").get((config.max_position_embeddings, h), "weight").map_err(weights_err)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(vb.pp(format!("encoder.layers.{i}")), &config))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(weights_err)?;
        let final_layer_norm =
            candle_nn::layer_norm(h, config.layer_norm_eps, vb.pp("final_layer_norm")).map_err(weights_err)?;
        let text_projection = if root.contains_tensor("text_projection.weight") {
            let proj = config.projection_dim.unwrap_or(h);
            Some(candle_nn::linear_no_bias(h, proj, root.pp("text_projection")).map_err(weights_err)?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            activation,
            config,
            device: device.clone(),
            dtype,
            dir,
        })
    }

    /// Run the encoder on `[B, L]` token ids (any integer dtype). No padding mask is applied
    /// (only the causal one), as diffusers pipelines call CLIP.
    pub fn encode(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let rows = ids_to_host(input_ids)?;
        check_ids(&rows, self.config.vocab_size, &self.dir)?;
        let (b, l) = (rows.len(), rows[0].len());
        if l > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "{l} tokens exceed the {} positions of the CLIP text encoder in {}",
                self.config.max_position_embeddings,
                self.dir.display()
            )));
        }
        // transformers pools at argmax(ids) for legacy configs with eos_token_id == 2 (the EOS
        // has the highest id there), else at the first EOS (index 0 when there is none).
        let pool_at: Vec<u32> = rows
            .iter()
            .map(|r| {
                let pos = if self.config.eos_token_id == 2 {
                    // first maximum, like torch.argmax
                    let max = r.iter().copied().max().unwrap_or(0);
                    r.iter().position(|&t| t == max)
                } else {
                    r.iter().position(|&t| i64::from(t) == self.config.eos_token_id)
                };
                pos.unwrap_or(0) as u32
            })
            .collect();

        let flat: Vec<u32> = rows.into_iter().flatten().collect();
        let ids = Tensor::from_vec(flat, (b, l), &self.device)?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let mut xs = self.token_embedding.forward(&ids)?.broadcast_add(&pos)?;

        let mask = causal_mask(l, &self.device)?;
        let heads = self.config.num_attention_heads;
        let n = self.layers.len();
        let mut penultimate = if n == 1 { Some(xs.clone()) } else { None };
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, Some(&mask), heads, self.activation)?;
            if i + 2 == n {
                penultimate = Some(xs.clone());
            }
        }
        let penultimate_hidden_state = penultimate.unwrap_or_else(|| xs.clone());
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;

        let h = self.config.hidden_size;
        let index: Vec<u32> = pool_at.iter().enumerate().map(|(bi, &p)| bi as u32 * l as u32 + p).collect();
        let index = Tensor::new(index.as_slice(), &self.device)?;
        let pooled = last_hidden_state.reshape((b * l, h))?.index_select(&index, 0)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput { last_hidden_state, penultimate_hidden_state, pooled, text_embeds })
    }

    /// Convenience: encode one list of ids as a batch of one.
    pub fn encode_ids(&self, ids: &[u32]) -> Result<ClipTextOutput> {
        let t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        self.encode(&t)
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Additive causal mask `[L, L]`: 0 on and below the diagonal, -inf above.
fn causal_mask(l: usize, device: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> =
        (0..l).flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(data, (l, l), device)
}
