//! SD3 / SD3.5 MMDiT in Stability's layout (`sd3.5_large.safetensors`, ComfyUI's files):
//! `joint_blocks.N.{x_block,context_block}` with fused `qkv`, `ln_q/ln_k` qk norms (SD3.5),
//! `x_block.attn2` second attention (SD3.5 Medium), and (shift, scale) modulations where the
//! last context block and the final layer are (scale, shift) in diffusers.

use super::super::header::Header;
use super::super::key_map::{need_dim, KeyMap, Layout};
use crate::error::Result;

const L: Layout = Layout::Sd3Mmdit;

/// The anchor tensor and the prefixes it may carry.
pub const ANCHOR: (&str, &[&str]) = ("joint_blocks.0.x_block.attn.qkv.weight", &["model.diffusion_model.", ""]);

/// The key map for an SD3 MMDiT whose names start with `p`.
pub fn build(p: &str, header: &Header) -> Result<KeyMap> {
    let inner = need_dim(header, &format!("{p}x_embedder.proj.weight"), 0, L)?;
    let depth = header.count_blocks(&format!("{p}joint_blocks."));
    let mut m = KeyMap::new();
    m.whole("pos_embed.pos_embed", format!("{p}pos_embed"));
    m.layer("pos_embed.proj", &format!("{p}x_embedder.proj"));
    m.layer("context_embedder", &format!("{p}context_embedder"));
    for (diffusers, sd3) in [("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")] {
        m.layer(&format!("time_text_embed.{diffusers}.linear_1"), &format!("{p}{sd3}.mlp.0"));
        m.layer(&format!("time_text_embed.{diffusers}.linear_2"), &format!("{p}{sd3}.mlp.2"));
    }
    for i in 0..depth {
        let d = format!("transformer_blocks.{i}.");
        let (x, c) = (format!("{p}joint_blocks.{i}.x_block."), format!("{p}joint_blocks.{i}.context_block."));
        let last = i + 1 == depth;
        m.split_layer(&d, &["attn.to_q", "attn.to_k", "attn.to_v"], &format!("{x}attn.qkv"), &[inner; 3]);
        m.split_layer(
            &d,
            &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            &format!("{c}attn.qkv"),
            &[inner; 3],
        );
        if header.contains(&format!("{x}attn.ln_q.weight")) {
            m.whole(format!("{d}attn.norm_q.weight"), format!("{x}attn.ln_q.weight"));
            m.whole(format!("{d}attn.norm_k.weight"), format!("{x}attn.ln_k.weight"));
            m.whole(format!("{d}attn.norm_added_q.weight"), format!("{c}attn.ln_q.weight"));
            m.whole(format!("{d}attn.norm_added_k.weight"), format!("{c}attn.ln_k.weight"));
        }
        m.layer(&format!("{d}attn.to_out.0"), &format!("{x}attn.proj"));
        if header.contains(&format!("{x}attn2.qkv.weight")) {
            m.split_layer(&d, &["attn2.to_q", "attn2.to_k", "attn2.to_v"], &format!("{x}attn2.qkv"), &[inner; 3]);
            if header.contains(&format!("{x}attn2.ln_q.weight")) {
                m.whole(format!("{d}attn2.norm_q.weight"), format!("{x}attn2.ln_q.weight"));
                m.whole(format!("{d}attn2.norm_k.weight"), format!("{x}attn2.ln_k.weight"));
            }
            m.layer(&format!("{d}attn2.to_out.0"), &format!("{x}attn2.proj"));
        }
        m.layer(&format!("{d}norm1.linear"), &format!("{x}adaLN_modulation.1"));
        m.layer(&format!("{d}ff.net.0.proj"), &format!("{x}mlp.fc1"));
        m.layer(&format!("{d}ff.net.2"), &format!("{x}mlp.fc2"));
        if last {
            // The last context block only modulates its input: AdaLayerNormContinuous, (scale, shift).
            m.swapped_layer(&format!("{d}norm1_context.linear"), &format!("{c}adaLN_modulation.1"));
        } else {
            m.layer(&format!("{d}norm1_context.linear"), &format!("{c}adaLN_modulation.1"));
            m.layer(&format!("{d}attn.to_add_out"), &format!("{c}attn.proj"));
            m.layer(&format!("{d}ff_context.net.0.proj"), &format!("{c}mlp.fc1"));
            m.layer(&format!("{d}ff_context.net.2"), &format!("{c}mlp.fc2"));
        }
    }
    m.swapped_layer("norm_out.linear", &format!("{p}final_layer.adaLN_modulation.1"));
    m.layer("proj_out", &format!("{p}final_layer.linear"));
    Ok(m)
}
