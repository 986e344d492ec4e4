//! The LDM UNet of A1111/ComfyUI SD1.5 and SDXL checkpoints (`model.diffusion_model.`):
//! `input_blocks.K`, `middle_block.K`, `output_blocks.K` numbered over all layers, where
//! diffusers numbers (block, layer); resnets named `in_layers`/`out_layers`/`emb_layers`.
//! Attention (spatial transformer) names are diffusers' own.

use super::super::header::Header;
use super::super::key_map::{KeyMap, Op};
use super::rename;
use crate::error::Result;

/// The anchor tensor and the prefixes it may carry (none in a UNet-only file such as city96's
/// GGUF conversions, which strip `model.diffusion_model.`).
pub const ANCHOR: (&str, &[&str]) = ("input_blocks.0.0.weight", &["model.diffusion_model.", ""]);

/// The key map for an LDM UNet whose names start with `p`.
pub fn build(p: &str, header: &Header) -> Result<KeyMap> {
    let per_block = layers_per_block(p, header);
    let stride = per_block + 1;
    Ok(rename(header, p, |name, _| {
        let parts: Vec<&str> = name.split('.').collect();
        let renamed = match parts.as_slice() {
            ["time_embed", "0", param] => format!("time_embedding.linear_1.{param}"),
            ["time_embed", "2", param] => format!("time_embedding.linear_2.{param}"),
            ["label_emb", "0", "0", param] => format!("add_embedding.linear_1.{param}"),
            ["label_emb", "0", "2", param] => format!("add_embedding.linear_2.{param}"),
            ["input_blocks", "0", "0", param] => format!("conv_in.{param}"),
            ["out", "0", param] => format!("conv_norm_out.{param}"),
            ["out", "2", param] => format!("conv_out.{param}"),
            ["input_blocks", k, sub, rest @ ..] => {
                let k: usize = k.parse().ok()?;
                let (block, layer) = ((k.checked_sub(1)?) / stride, (k - 1) % stride);
                match (*sub, rest) {
                    ("0", ["op", param]) => format!("down_blocks.{block}.downsamplers.0.conv.{param}"),
                    ("0", rest) => format!("down_blocks.{block}.resnets.{layer}.{}", resnet(rest)),
                    ("1", rest) => format!("down_blocks.{block}.attentions.{layer}.{}", rest.join(".")),
                    _ => return None,
                }
            }
            ["middle_block", k, rest @ ..] => match *k {
                "0" => format!("mid_block.resnets.0.{}", resnet(rest)),
                "1" => format!("mid_block.attentions.0.{}", rest.join(".")),
                "2" => format!("mid_block.resnets.1.{}", resnet(rest)),
                _ => return None,
            },
            ["output_blocks", k, sub, rest @ ..] => {
                let k: usize = k.parse().ok()?;
                let (block, layer) = (k / stride, k % stride);
                match (*sub, rest) {
                    ("0", rest) => format!("up_blocks.{block}.resnets.{layer}.{}", resnet(rest)),
                    ("1" | "2", ["conv", param]) => format!("up_blocks.{block}.upsamplers.0.conv.{param}"),
                    ("1", rest) => format!("up_blocks.{block}.attentions.{layer}.{}", rest.join(".")),
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some((renamed, Op::Whole))
    }))
}

/// LDM resnet layer names → diffusers' `ResnetBlock2D` names.
fn resnet(rest: &[&str]) -> String {
    let joined = rest.join(".");
    for (ldm, diffusers) in [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("emb_layers.1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ] {
        if let Some(param) = joined.strip_prefix(ldm) {
            return format!("{diffusers}{param}");
        }
    }
    joined
}

/// Layers per block: the first downsampler sits right after the first block's layers
/// (`input_blocks.{layers + 1}.0.op`); a UNet without one has a single block.
fn layers_per_block(p: &str, header: &Header) -> usize {
    let inputs = header.count_blocks(&format!("{p}input_blocks."));
    (1..inputs)
        .find(|k| header.contains(&format!("{p}input_blocks.{k}.0.op.weight")))
        .map_or(inputs.saturating_sub(1), |k| k - 1)
}
