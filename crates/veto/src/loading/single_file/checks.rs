//! Checking a file's components against the base model's configs before anything loads: the
//! configs come from the base, so its numbers must be the file's. The loaders then check every
//! tensor's shape as it is read.

use serde_json::Value;

use super::header::Header;
use super::key_map::{KeyMap, Layout};

/// A disagreement between a config value and the file.
pub type Mismatch = String;

fn num(config: &Value, key: &str) -> Option<usize> {
    config.get(key).and_then(Value::as_u64).map(|v| v as usize)
}

/// Dim `d` of the diffusers tensor `name` as the file gives it.
fn dim(map: &KeyMap, header: &Header, name: &str, d: usize) -> Option<usize> {
    map.shape(name, header)?.get(d).copied()
}

/// Compares `config` key by key with what the file says; the first disagreement, if any.
fn compare(config: &Value, pairs: &[(&str, Option<usize>)]) -> Option<Mismatch> {
    pairs.iter().find_map(|&(key, file)| {
        let (Some(want), Some(got)) = (num(config, key), file) else { return None };
        (want != got).then(|| format!("its config.json has {key} = {want}, the file's tensors say {got}"))
    })
}

/// Checks the component mapped by `map` (in `layout`) against its base `config`.
pub fn check(layout: Layout, map: &KeyMap, header: &Header, config: &Value) -> Option<Mismatch> {
    let count = |prefix: &str| {
        Some(
            map.iter()
                .filter_map(|(k, _)| k.strip_prefix(prefix)?.split('.').next())
                .fold(0, |n, i| n.max(i.parse::<usize>().map_or(0, |i| i + 1))),
        )
    };
    let heads_dim = || Some(num(config, "num_attention_heads")? * num(config, "attention_head_dim")?);
    match layout {
        Layout::FluxBfl => {
            let inner = dim(map, header, "x_embedder.weight", 0);
            if heads_dim().is_some() && inner != heads_dim() {
                return Some(format!(
                    "its config.json has num_attention_heads x attention_head_dim = {}, the file's width is {}",
                    heads_dim().unwrap_or(0),
                    inner.unwrap_or(0)
                ));
            }
            let guidance = map.get("time_text_embed.guidance_embedder.linear_1.weight").is_some();
            if let Some(want) = config.get("guidance_embeds").and_then(Value::as_bool) {
                if want != guidance {
                    return Some(format!(
                        "its config.json has guidance_embeds = {want}, the file {} a guidance embedding (FLUX.1-{} weights)",
                        if guidance { "has" } else { "has no" },
                        if guidance { "dev" } else { "schnell" }
                    ));
                }
            }
            compare(
                config,
                &[
                    ("num_layers", count("transformer_blocks.")),
                    ("num_single_layers", count("single_transformer_blocks.")),
                    ("in_channels", dim(map, header, "x_embedder.weight", 1)),
                    ("joint_attention_dim", dim(map, header, "context_embedder.weight", 1)),
                    ("pooled_projection_dim", dim(map, header, "time_text_embed.text_embedder.linear_1.weight", 1)),
                ],
            )
        }
        Layout::Sd3Mmdit => {
            let inner = dim(map, header, "pos_embed.proj.weight", 0);
            if heads_dim().is_some() && inner != heads_dim() {
                return Some(format!(
                    "its config.json has num_attention_heads x attention_head_dim = {}, the file's width is {}",
                    heads_dim().unwrap_or(0),
                    inner.unwrap_or(0)
                ));
            }
            let qk_norm = map.get("transformer_blocks.0.attn.norm_q.weight").is_some();
            let config_qk = config.get("qk_norm").and_then(Value::as_str).is_some();
            if qk_norm != config_qk {
                return Some(format!(
                    "its config.json has qk_norm {}, the file {} qk norms (ln_q / ln_k)",
                    if config_qk { "set" } else { "null" },
                    if qk_norm { "has" } else { "has no" }
                ));
            }
            let dual: Vec<usize> = (0..count("transformer_blocks.").unwrap_or(0))
                .filter(|i| map.get(&format!("transformer_blocks.{i}.attn2.to_q.weight")).is_some())
                .collect();
            let config_dual: Vec<usize> = config
                .get("dual_attention_layers")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect())
                .unwrap_or_default();
            if dual != config_dual {
                return Some(format!(
                    "its config.json has dual_attention_layers = {config_dual:?}, the file has attn2 in blocks {dual:?}"
                ));
            }
            compare(
                config,
                &[
                    ("num_layers", count("transformer_blocks.")),
                    ("in_channels", dim(map, header, "pos_embed.proj.weight", 1)),
                    ("patch_size", dim(map, header, "pos_embed.proj.weight", 2)),
                    ("joint_attention_dim", dim(map, header, "context_embedder.weight", 1)),
                    ("caption_projection_dim", dim(map, header, "context_embedder.weight", 0)),
                    ("pooled_projection_dim", dim(map, header, "time_text_embed.text_embedder.linear_1.weight", 1)),
                ],
            )
        }
        Layout::LdmUnet => {
            let first = config.get("block_out_channels").and_then(|b| b.get(0)).and_then(Value::as_u64);
            let conv_in = dim(map, header, "conv_in.weight", 0);
            if let (Some(want), Some(got)) = (first, conv_in) {
                if want as usize != got {
                    return Some(format!(
                        "its config.json has block_out_channels[0] = {want}, the file's conv_in has {got} channels"
                    ));
                }
            }
            let sdxl = map.get("add_embedding.linear_1.weight").is_some();
            let config_sdxl = config.get("addition_embed_type").and_then(Value::as_str) == Some("text_time");
            if sdxl != config_sdxl {
                return Some(format!(
                    "the base is {}, the file {}",
                    if config_sdxl { "an SDXL UNet" } else { "not an SDXL UNet" },
                    if sdxl { "is SDXL" } else { "is not SDXL" }
                ));
            }
            let cross = map.iter().find(|(k, _)| k.ends_with("attn2.to_k.weight")).map(|(k, _)| k.to_string());
            compare(
                config,
                &[
                    ("in_channels", dim(map, header, "conv_in.weight", 1)),
                    ("cross_attention_dim", cross.and_then(|k| dim(map, header, &k, 1))),
                ],
            )
        }
        _ => None,
    }
}
