//! Text encoders and tokenizers (CLIP, T5, UMT5, Gemma-2).

pub mod caption;
pub mod clip;
pub mod gemma2;
pub mod sana_prompt;
pub mod t5;
pub mod umt5;
pub mod wan_prompt;

use std::path::Path;

use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

use crate::error::{Error, Result};

/// A prompt turned into exactly `max_len` token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    /// Token ids, special tokens included, padded to the requested length.
    pub ids: Vec<u32>,
    /// Number of ids before padding (content plus special tokens).
    pub len: usize,
    /// The prompt did not fit and its end was cut off (diffusers warns about this).
    pub truncated: bool,
    /// Best-effort decoding of the part that was cut off, for the warning.
    pub removed_text: Option<String>,
}

/// Tokenize `text` the way transformers does with
/// `truncation=True, padding="max_length", max_length=max_len`: the content is cut so that
/// it plus the special tokens of the post-processor (BOS/EOS) fit in `max_len`, the special
/// tokens are added (so EOS survives truncation), then `pad_id` fills up to `max_len`.
///
/// `tok` must have no truncation or padding configured of its own.
pub(crate) fn encode_fixed_length(
    tok: &Tokenizer,
    text: &str,
    max_len: usize,
    pad_id: u32,
    source: &Path,
) -> Result<TokenizedText> {
    let n_special = tok.get_post_processor().map_or(0, |p| p.added_tokens(false));
    if max_len <= n_special {
        return Err(Error::invalid(format!(
            "max length {max_len} leaves no room for text next to the {n_special} special tokens of {}",
            source.display()
        )));
    }
    let fail = |e: tokenizers::Error| Error::other(format!("tokenizing with {}: {e}", source.display()));
    let mut enc = tok.encode(text, false).map_err(fail)?;
    let budget = max_len - n_special;
    let truncated = enc.len() > budget;
    let removed_text = if truncated {
        let removed = &enc.get_ids()[budget..];
        tok.decode(removed, true).ok().map(|s| s.replace("</w>", " ").trim().to_string())
    } else {
        None
    };
    enc.truncate(budget, 0, TruncationDirection::Right);
    let enc = tok.post_process(enc, None, true).map_err(fail)?;
    let mut ids = enc.get_ids().to_vec();
    if ids.len() > max_len {
        // Only a post-processor that adds more tokens than it declares gets here.
        return Err(Error::BadModelFile {
            path: source.display().to_string(),
            reason: format!("post-processor produced {} tokens, more than the {max_len} allowed", ids.len()),
        });
    }
    let len = ids.len();
    ids.resize(max_len, pad_id);
    Ok(TokenizedText { ids, len, truncated, removed_text })
}

/// A special token from `special_tokens_map.json` / `tokenizer_config.json`: either a plain
/// string or an object `{"content": "..."}` (newer transformers versions).
pub(crate) fn special_token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// Look up `key` (e.g. `"pad_token"`) in `special_tokens_map.json`, then in
/// `tokenizer_config.json`, of the tokenizer folder `dir`. Missing or unreadable files
/// count as "not set", since both files are optional.
pub(crate) fn configured_special_token(dir: &Path, key: &str) -> Option<String> {
    for file in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if let Some(tok) = json.get(key).and_then(special_token_content) {
            return Some(tok);
        }
    }
    None
}

/// `model_max_length` from `tokenizer_config.json`, if present and sensible (transformers
/// writes a huge sentinel when it is unknown).
pub(crate) fn configured_model_max_length(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let n = json.get("model_max_length")?.as_f64()?;
    (1.0..=1_000_000.0).contains(&n).then_some(n as usize)
}

/// Check that token ids are valid rows of an embedding table with `vocab_size` rows.
pub(crate) fn check_ids(ids: &[Vec<u32>], vocab_size: usize, model: &Path) -> Result<()> {
    for row in ids {
        if let Some(&bad) = row.iter().find(|&&i| i as usize >= vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary ({vocab_size} entries) of {}",
                model.display()
            )));
        }
    }
    Ok(())
}

/// Token ids as a `[B, L]` matrix on the host; accepts any integer tensor.
pub(crate) fn ids_to_host(input_ids: &candle_core::Tensor) -> Result<Vec<Vec<u32>>> {
    let (b, l) = input_ids
        .dims2()
        .map_err(|_| Error::invalid(format!("token ids must be [batch, length], got {:?}", input_ids.dims())))?;
    if b == 0 || l == 0 {
        return Err(Error::invalid(format!("token ids must be non-empty, got [{b}, {l}]")));
    }
    let rows = input_ids.to_dtype(candle_core::DType::I64)?.to_vec2::<i64>()?;
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|i| u32::try_from(i).map_err(|_| Error::invalid(format!("negative or huge token id {i}"))))
                .collect()
        })
        .collect()
}
