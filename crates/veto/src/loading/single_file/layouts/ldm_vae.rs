//! The LDM autoencoder layout (SD1.5/SDXL/SD3 checkpoints under `first_stage_model.`, FLUX's
//! `ae.safetensors` and ComfyUI's `vae.`): `encoder.down.N.block.M`, `decoder.up.N` numbered
//! from the bottom (diffusers numbers up blocks from the top), `mid.block_1/2`, `mid.attn_1` with
//! 1×1 convolutions where diffusers has linear layers.

use super::super::header::Header;
use super::super::key_map::{KeyMap, Op};
use super::rename;
use crate::error::Result;

/// The anchor tensor and the prefixes it may carry.
pub const ANCHOR: (&str, &[&str]) = ("decoder.conv_in.weight", &["first_stage_model.", "vae.", ""]);

/// The key map for an LDM VAE whose names start with `p`.
pub fn build(p: &str, header: &Header) -> Result<KeyMap> {
    let up = header.count_blocks(&format!("{p}decoder.up."));
    Ok(rename(header, p, |name, shape| {
        let parts: Vec<&str> = name.split('.').collect();
        let (side, rest) = (parts[0], &parts[1..]);
        if side != "encoder" && side != "decoder" {
            return Some((name.to_string(), Op::Whole));
        }
        let tail = |from: usize| rest[from..].join(".").replace("nin_shortcut", "conv_shortcut");
        let renamed = match rest {
            ["down", i, "block", j, ..] => format!("down_blocks.{i}.resnets.{j}.{}", tail(4)),
            ["down", i, "downsample", ..] => format!("down_blocks.{i}.downsamplers.0.{}", tail(3)),
            ["up", i, "block", j, ..] => {
                format!("up_blocks.{}.resnets.{j}.{}", up - 1 - i.parse::<usize>().ok()?, tail(4))
            }
            ["up", i, "upsample", ..] => {
                format!("up_blocks.{}.upsamplers.0.{}", up - 1 - i.parse::<usize>().ok()?, tail(3))
            }
            ["mid", block, ..] if block.starts_with("block_") => {
                let k: usize = block.strip_prefix("block_")?.parse().ok()?;
                format!("mid_block.resnets.{}.{}", k.checked_sub(1)?, tail(2))
            }
            ["mid", "attn_1", layer, param] => {
                let layer = match *layer {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return None,
                };
                let renamed = format!("{side}.mid_block.attentions.0.{layer}.{param}");
                // 1×1 convolution [C, C, 1, 1] → linear [C, C].
                let op = if shape.len() == 4 { Op::Reshape(shape[..2].to_vec()) } else { Op::Whole };
                return Some((renamed, op));
            }
            ["norm_out", param] => format!("conv_norm_out.{param}"),
            _ => rest.join("."),
        };
        Some((format!("{side}.{renamed}"), Op::Whole))
    }))
}
