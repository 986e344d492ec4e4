//! FLUX.1 transformer in Black Forest Labs' layout (the `flux1-dev.safetensors` of the BFL
//! repos, ComfyUI's `model.diffusion_model.` files, city96's GGUFs).
//!
//! Differences from diffusers: q, k, v are fused (`qkv`) in double blocks, and q, k, v and the
//! MLP input in single blocks (`linear1`); qk-norm scales are `.scale`; the final modulation is
//! (shift, scale) where diffusers' `norm_out.linear` is (scale, shift).

use super::super::header::Header;
use super::super::key_map::{need_dim, KeyMap, Layout};
use crate::error::{Error, Result};

const L: Layout = Layout::FluxBfl;

/// The anchor tensor and the prefixes it may carry.
pub const ANCHOR: (&str, &[&str]) =
    ("double_blocks.0.img_attn.qkv.weight", &["", "model.diffusion_model.", "diffusion_model."]);

/// The key map for a BFL-layout transformer whose names start with `p`.
pub fn build(p: &str, header: &Header) -> Result<KeyMap> {
    let inner = need_dim(header, &format!("{p}img_in.weight"), 0, L)?;
    let double = header.count_blocks(&format!("{p}double_blocks."));
    let single = header.count_blocks(&format!("{p}single_blocks."));
    let mut m = KeyMap::new();
    m.layer("x_embedder", &format!("{p}img_in"));
    m.layer("context_embedder", &format!("{p}txt_in"));
    for (diffusers, bfl) in [("timestep_embedder", "time_in"), ("text_embedder", "vector_in")] {
        embedder(&mut m, diffusers, &format!("{p}{bfl}"));
    }
    if header.contains(&format!("{p}guidance_in.in_layer.weight")) {
        embedder(&mut m, "guidance_embedder", &format!("{p}guidance_in"));
    }
    for i in 0..double {
        let (d, b) = (format!("transformer_blocks.{i}."), format!("{p}double_blocks.{i}."));
        m.layer(&format!("{d}norm1.linear"), &format!("{b}img_mod.lin"));
        m.layer(&format!("{d}norm1_context.linear"), &format!("{b}txt_mod.lin"));
        m.split_layer(&d, &["attn.to_q", "attn.to_k", "attn.to_v"], &format!("{b}img_attn.qkv"), &[inner; 3]);
        let add = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"];
        m.split_layer(&d, &add, &format!("{b}txt_attn.qkv"), &[inner; 3]);
        for (name, src) in [
            ("norm_q", "img_attn.norm.query_norm"),
            ("norm_k", "img_attn.norm.key_norm"),
            ("norm_added_q", "txt_attn.norm.query_norm"),
            ("norm_added_k", "txt_attn.norm.key_norm"),
        ] {
            m.whole(format!("{d}attn.{name}.weight"), format!("{b}{src}.scale"));
        }
        m.layer(&format!("{d}attn.to_out.0"), &format!("{b}img_attn.proj"));
        m.layer(&format!("{d}attn.to_add_out"), &format!("{b}txt_attn.proj"));
        for (ff, mlp) in [("ff", "img_mlp"), ("ff_context", "txt_mlp")] {
            m.layer(&format!("{d}{ff}.net.0.proj"), &format!("{b}{mlp}.0"));
            m.layer(&format!("{d}{ff}.net.2"), &format!("{b}{mlp}.2"));
        }
    }
    for i in 0..single {
        let (d, b) = (format!("single_transformer_blocks.{i}."), format!("{p}single_blocks.{i}."));
        m.layer(&format!("{d}norm.linear"), &format!("{b}modulation.lin"));
        let linear1 = format!("{b}linear1.weight");
        let rows = need_dim(header, &linear1, 0, L)?;
        let mlp = rows.checked_sub(3 * inner).filter(|&r| r > 0).ok_or_else(|| {
            Error::invalid(format!("tensor {linear1} has {rows} rows, fewer than q, k, v of width {inner} need"))
        })?;
        let parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"];
        m.split_layer(&d, &parts, &format!("{b}linear1"), &[inner, inner, inner, mlp]);
        m.whole(format!("{d}attn.norm_q.weight"), format!("{b}norm.query_norm.scale"));
        m.whole(format!("{d}attn.norm_k.weight"), format!("{b}norm.key_norm.scale"));
        m.layer(&format!("{d}proj_out"), &format!("{b}linear2"));
    }
    m.swapped_layer("norm_out.linear", &format!("{p}final_layer.adaLN_modulation.1"));
    m.layer("proj_out", &format!("{p}final_layer.linear"));
    Ok(m)
}

/// `in_layer`/`out_layer` MLP embedders → diffusers' `linear_1`/`linear_2`.
fn embedder(m: &mut KeyMap, diffusers: &str, bfl: &str) {
    m.layer(&format!("time_text_embed.{diffusers}.linear_1"), &format!("{bfl}.in_layer"));
    m.layer(&format!("time_text_embed.{diffusers}.linear_2"), &format!("{bfl}.out_layer"));
}
