//! Text encoders inside single files: Hugging Face CLIP and T5 models stored under a prefix
//! (names otherwise unchanged), and OpenCLIP's text tower (SDXL's second encoder), whose
//! attention is one fused `in_proj` and whose projection is stored as `x @ W`.

use super::super::header::Header;
use super::super::key_map::{need_dim, KeyMap, Layout, Op};
use super::rename;
use crate::error::Result;

/// Hugging Face CLIP text model: anchor and prefixes (A1111 SD1.5 / SDXL, ComfyUI SD3 / FLUX).
pub const CLIP_ANCHOR: (&str, &[&str]) = (
    "text_model.embeddings.token_embedding.weight",
    &[
        "cond_stage_model.transformer.",
        "conditioner.embedders.0.transformer.",
        "text_encoders.clip_l.transformer.",
        "text_encoders.clip_g.transformer.",
        "",
    ],
);

/// Hugging Face T5 encoder: anchor and prefixes.
pub const T5_ANCHOR: (&str, &[&str]) =
    ("encoder.block.0.layer.0.SelfAttention.q.weight", &["text_encoders.t5xxl.transformer.", ""]);

/// OpenCLIP text tower: anchor and prefixes.
pub const OPEN_CLIP_ANCHOR: (&str, &[&str]) =
    ("transformer.resblocks.0.attn.in_proj_weight", &["conditioner.embedders.1.model.", "cond_stage_model.model."]);

/// A Hugging Face model under `p`: the names without the prefix (buffers dropped).
pub fn build_hf(p: &str, header: &Header) -> Result<KeyMap> {
    Ok(rename(header, p, |name, _| (!name.ends_with("position_ids")).then(|| (name.to_string(), Op::Whole))))
}

/// OpenCLIP's text tower under `p` → `CLIPTextModelWithProjection` names.
pub fn build_open_clip(p: &str, header: &Header) -> Result<KeyMap> {
    let width = need_dim(header, &format!("{p}token_embedding.weight"), 1, Layout::OpenClip)?;
    let mut m = KeyMap::new();
    for name in header.names() {
        let Some(rest) = name.strip_prefix(p) else { continue };
        let t = "text_model.";
        match rest {
            "token_embedding.weight" => m.whole(format!("{t}embeddings.token_embedding.weight"), name),
            "positional_embedding" => m.whole(format!("{t}embeddings.position_embedding.weight"), name),
            "ln_final.weight" | "ln_final.bias" => {
                m.whole(format!("{t}final_layer_norm.{}", &rest["ln_final.".len()..]), name)
            }
            "text_projection" => m.insert("text_projection.weight", name, Op::Transpose),
            _ => {
                let Some(block) = rest.strip_prefix("transformer.resblocks.") else { continue };
                let Some((i, layer)) = block.split_once('.') else { continue };
                let d = format!("{t}encoder.layers.{i}.");
                match layer {
                    "attn.in_proj_weight" | "attn.in_proj_bias" => {
                        let param = if layer.ends_with("weight") { "weight" } else { "bias" };
                        for (k, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            let rows = Op::Rows { start: k * width, len: width };
                            m.insert(format!("{d}self_attn.{proj}.{param}"), name, rows);
                        }
                    }
                    _ => {
                        let renamed = layer
                            .replace("attn.out_proj", "self_attn.out_proj")
                            .replace("ln_1", "layer_norm1")
                            .replace("ln_2", "layer_norm2")
                            .replace("mlp.c_fc", "mlp.fc1")
                            .replace("mlp.c_proj", "mlp.fc2");
                        m.whole(format!("{d}{renamed}"), name);
                    }
                }
            }
        }
    }
    Ok(m)
}
