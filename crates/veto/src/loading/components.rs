//! Fetching the files of one pipeline component (`transformer/`, `text_encoder/`, …) from a
//! [`ModelSource`], local or hub, and returning the folder its loader reads.

use std::path::{Path, PathBuf};

use super::config::read_config;
use super::model_source::ModelSource;
use super::weights::ComponentWeights;
use crate::error::{Error, Result};
use crate::text::clip::ClipTokenizer;

fn parent(p: &Path) -> PathBuf {
    p.parent().map(|d| d.to_path_buf()).unwrap_or_default()
}

/// Resolve the listed files of `component` (all must exist); returns its folder.
pub fn component_dir(source: &ModelSource, component: &str, files: &[&str]) -> Result<PathBuf> {
    let mut dir = None;
    for f in files {
        dir = Some(parent(&source.file(&format!("{component}/{f}"))?));
    }
    dir.ok_or_else(|| Error::other(format!("no files requested for {component}")))
}

/// Resolve a component's `config.json` and weights: `<stem>.safetensors`, or
/// `<stem>.safetensors.index.json` and every shard it lists. Returns the folder.
pub fn weights_dir(source: &ModelSource, component: &str, stem: &str) -> Result<PathBuf> {
    component_dir(source, component, &["config.json"])?;
    let single = format!("{component}/{stem}.safetensors");
    if let Some(p) = source.try_file(&single)? {
        return Ok(parent(&p));
    }
    let index_rel = format!("{component}/{stem}.safetensors.index.json");
    let index = source.try_file(&index_rel)?.ok_or_else(|| Error::MissingFile {
        what: format!("the model has neither {single} nor {index_rel}"),
        path: source.describe(component),
    })?;
    let json: serde_json::Value = read_config(&index, "weights index")?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::BadModelFile {
        path: index.display().to_string(),
        reason: "no \"weight_map\" object".into(),
    })?;
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    for shard in shards {
        source.file(&format!("{component}/{shard}"))?;
    }
    Ok(parent(&index))
}

/// A CLIP tokenizer component: `tokenizer.json` when shipped, else `vocab.json` +
/// `merges.txt` (what the real Flux/SD3/SDXL repos ship), plus the optional special-token
/// files that declare the pad token.
pub fn clip_tokenizer(source: &ModelSource, component: &str) -> Result<ClipTokenizer> {
    for optional in ["tokenizer_config.json", "special_tokens_map.json"] {
        source.try_file(&format!("{component}/{optional}"))?;
    }
    let dir = match source.try_file(&format!("{component}/tokenizer.json"))? {
        Some(p) => parent(&p),
        None => component_dir(source, component, &["vocab.json", "merges.txt"])?,
    };
    ClipTokenizer::load(&dir)
}

/// A T5 tokenizer component (`tokenizer.json`, plus its optional config files).
pub fn t5_tokenizer_dir(source: &ModelSource, component: &str) -> Result<PathBuf> {
    for optional in ["tokenizer_config.json", "special_tokens_map.json"] {
        source.try_file(&format!("{component}/{optional}"))?;
    }
    component_dir(source, component, &["tokenizer.json"])
}

/// A component's config and weights from `source`: the one place every pipeline gets the
/// weights of a text encoder, VAE, transformer or UNet (with the source's LoRAs merged in).
pub fn component_weights(source: &ModelSource, component: &str, stem: &str) -> Result<ComponentWeights> {
    if let Some(weights) = source.single_file_weights(component)? {
        return super::lora::apply(source, component, weights);
    }
    if let Some(file) = source.component_file(component) {
        let config = source.file(&format!("{component}/config.json"))?;
        return super::lora::apply(source, component, ComponentWeights::from_gguf(config, file)?);
    }
    let dir = weights_dir(source, component, stem)?;
    let weights = ComponentWeights::from_dir(&dir, stem, component)?;
    super::lora::apply(source, component, weights)
}
