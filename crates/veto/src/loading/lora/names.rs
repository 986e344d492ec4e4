//! Matching a LoRA module's name to the weights it changes, under our (diffusers) names.
//!
//! Trainers spell modules several ways: diffusers names (PEFT), the same flattened with `_`
//! (kohya for SD1.5, most SDXL trainers), the original LDM UNet names (kohya's SDXL:
//! `input_blocks_4_1_…`), the original BFL Flux names (ComfyUI, kohya Flux:
//! `double_blocks.0.img_attn.qkv`, one fused q/k/v projection), XLabs' processor names and the
//! original Wan names (ComfyUI, kohya/musubi, the CausVid LoRA: `blocks.0.self_attn.q`). A
//! fused original module becomes several diffusers weights, each taking a slice of B's rows.

use std::collections::{BTreeMap, HashMap};

/// A weight a LoRA module changes: `weight` gets (rows of B) · A.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The weight's diffusers name (`transformer_blocks.0.attn.to_q.weight`).
    pub weight: String,
    /// The rows of B, as `(start, len)` runs taken in order; empty = all of B.
    pub up_rows: Vec<(usize, usize)>,
}

/// One component's weights: names and shapes, and the names flattened with `_` (kohya's spelling).
#[derive(Debug, Default)]
pub struct Index {
    shapes: BTreeMap<String, Vec<usize>>,
    /// Flattened module name (`down_blocks_0_resnets_0_conv1`) → module name (`down_blocks.0.resnets.0.conv1`).
    flat: HashMap<String, String>,
}

impl Index {
    /// The index of a component whose tensors have these names and shapes.
    pub fn new(shapes: BTreeMap<String, Vec<usize>>) -> Self {
        let flat = shapes
            .keys()
            .filter_map(|w| w.strip_suffix(".weight"))
            .map(|m| (m.replace('.', "_"), m.to_string()))
            .collect();
        Self { shapes, flat }
    }

    /// A weight's shape.
    pub fn shape(&self, weight: &str) -> Option<&[usize]> {
        self.shapes.get(weight).map(Vec::as_slice)
    }

    /// The `.weight` of a module given by its flattened name.
    fn weight_of_flat(&self, flat: &str) -> Option<String> {
        self.flat.get(flat).map(|m| format!("{m}.weight"))
    }

    fn has_flat(&self, flat: &str) -> bool {
        self.flat.contains_key(flat)
    }

    fn rows(&self, flat: &str) -> Option<usize> {
        self.weight_of_flat(flat).and_then(|w| self.shapes.get(&w)).and_then(|s| s.first().copied())
    }

    /// Targets for a module given as flattened diffusers names, B's rows split in that order.
    fn split(&self, flats: &[String]) -> Option<Vec<Target>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(flats.len());
        for f in flats {
            let rows = self.rows(f)?;
            let up_rows = if flats.len() == 1 { Vec::new() } else { vec![(start, rows)] };
            out.push(Target { weight: self.weight_of_flat(f)?, up_rows });
            start += rows;
        }
        Some(out)
    }
}

/// The weights a module changes; `None` when it names nothing in the component.
pub fn resolve(index: &Index, name: &str) -> Option<Vec<Target>> {
    let flat = name.replace('.', "_");
    // CLIP modules as transformers 5 names them drop the `text_model.` our files keep.
    if let Some(weight) = index.weight_of_flat(&flat).or_else(|| index.weight_of_flat(&format!("text_model_{flat}"))) {
        return Some(vec![Target { weight, up_rows: Vec::new() }]);
    }
    if let Some(t) = diffusers_old(index, &flat) {
        return Some(t);
    }
    if index.has_flat("single_transformer_blocks_0_proj_mlp") {
        if let Some(t) = bfl_flux(index, &flat).or_else(|| xlabs_flux(index, &flat)) {
            return Some(t);
        }
    }
    if index.has_flat("conv_in") {
        if let Some(f) = ldm_unet(index, &flat) {
            return index.weight_of_flat(&f).map(|weight| vec![Target { weight, up_rows: Vec::new() }]);
        }
    }
    if index.has_flat("condition_embedder_time_proj") {
        if let Some(t) = wan_original(index, &flat) {
            return Some(t);
        }
    }
    // A parameter that is not a module's `.weight` (Wan's `scale_shift_table`), for full deltas.
    index.shape(name).map(|_| vec![Target { weight: name.to_string(), up_rows: Vec::new() }])
}

/// diffusers' attention-processor names: `attn1.processor.to_q_lora` → `attn1.to_q`,
/// `to_out_lora` → `to_out.0`; text encoders: `self_attn.to_q_lora` → `self_attn.q_proj`.
fn diffusers_old(index: &Index, flat: &str) -> Option<Vec<Target>> {
    if !flat.ends_with("_lora") && !flat.contains("_lora_linear_layer") {
        return None;
    }
    let base = flat.replace("_processor_", "_").replace("_lora_linear_layer", "");
    let base = base.strip_suffix("_lora").unwrap_or(&base);
    let candidates = [
        base.replace("to_out", "to_out_0"),
        base.to_string(),
        base.replace("self_attn_to_q", "self_attn_q_proj")
            .replace("self_attn_to_k", "self_attn_k_proj")
            .replace("self_attn_to_v", "self_attn_v_proj")
            .replace("self_attn_to_out", "self_attn_out_proj"),
    ];
    candidates.iter().find_map(|c| index.weight_of_flat(c)).map(|weight| vec![Target { weight, up_rows: Vec::new() }])
}

/// `<prefix><n>_<rest>` → (n, rest).
fn numbered<'a>(flat: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = flat.strip_prefix(prefix)?;
    let (n, rest) = rest.split_once('_').unwrap_or((rest, ""));
    Some((n.parse().ok()?, rest))
}

fn flats(prefix: &str, suffixes: &[&str]) -> Vec<String> {
    suffixes.iter().map(|s| format!("{prefix}{}", s.replace('.', "_"))).collect()
}

/// The original (BFL) Flux module names, as ComfyUI and kohya write them.
fn bfl_flux(index: &Index, flat: &str) -> Option<Vec<Target>> {
    if let Some((i, rest)) = numbered(flat, "double_blocks_") {
        let p = format!("transformer_blocks_{i}_");
        let parts: &[&str] = match rest {
            "img_attn_qkv" => &["attn.to_q", "attn.to_k", "attn.to_v"],
            "img_attn_proj" => &["attn.to_out.0"],
            "img_mlp_0" => &["ff.net.0.proj"],
            "img_mlp_2" => &["ff.net.2"],
            "img_mod_lin" => &["norm1.linear"],
            "txt_attn_qkv" => &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            "txt_attn_proj" => &["attn.to_add_out"],
            "txt_mlp_0" => &["ff_context.net.0.proj"],
            "txt_mlp_2" => &["ff_context.net.2"],
            "txt_mod_lin" => &["norm1_context.linear"],
            _ => return None,
        };
        return index.split(&flats(&p, parts));
    }
    if let Some((i, rest)) = numbered(flat, "single_blocks_") {
        let p = format!("single_transformer_blocks_{i}_");
        let parts: &[&str] = match rest {
            "linear1" => &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
            "linear2" => &["proj_out"],
            "modulation_lin" => &["norm.linear"],
            _ => return None,
        };
        return index.split(&flats(&p, parts));
    }
    let one = match flat {
        "img_in" => "x_embedder",
        "txt_in" => "context_embedder",
        "time_in_in_layer" => "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer" => "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer" => "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer" => "time_text_embed.text_embedder.linear_2",
        "guidance_in_in_layer" => "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer" => "time_text_embed.guidance_embedder.linear_2",
        "final_layer_linear" => "proj_out",
        "final_layer_adaLN_modulation_1" => {
            // BFL orders the final modulation (shift, scale), diffusers' norm_out (scale, shift).
            let weight = index.weight_of_flat("norm_out_linear")?;
            let half = index.rows("norm_out_linear")? / 2;
            return Some(vec![Target { weight, up_rows: vec![(half, half), (0, half)] }]);
        }
        _ => return None,
    };
    index.split(&flats("", &[one]))
}

/// XLabs' Flux LoRA processors: one LoRA on the fused q/k/v input and one on the output.
fn xlabs_flux(index: &Index, flat: &str) -> Option<Vec<Target>> {
    if let Some((i, rest)) = numbered(flat, "double_blocks_") {
        let p = format!("transformer_blocks_{i}_");
        let parts: &[&str] = match rest {
            "processor_qkv_lora1" => &["attn.to_q", "attn.to_k", "attn.to_v"],
            "processor_proj_lora1" => &["attn.to_out.0"],
            "processor_qkv_lora2" => &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            "processor_proj_lora2" => &["attn.to_add_out"],
            _ => return None,
        };
        return index.split(&flats(&p, parts));
    }
    let (i, rest) = numbered(flat, "single_blocks_")?;
    let p = format!("single_transformer_blocks_{i}_");
    let parts: &[&str] = match rest {
        "processor_qkv_lora" => &["attn.to_q", "attn.to_k", "attn.to_v"],
        "processor_proj_lora" => &["proj_out"],
        _ => return None,
    };
    index.split(&flats(&p, parts))
}

/// The original Wan2.1 names (the official code's, as ComfyUI, kohya/musubi and CausVid write
/// them), as diffusers' `WanTransformer3DModel` names them. The original `norm3` (the affine
/// norm before cross-attention) is diffusers' `norm2`; the modulation tables are bare parameters.
fn wan_original(index: &Index, flat: &str) -> Option<Vec<Target>> {
    let module = if let Some((i, rest)) = numbered(flat, "blocks_") {
        let inner = match rest {
            "self_attn_q" => "attn1.to_q",
            "self_attn_k" => "attn1.to_k",
            "self_attn_v" => "attn1.to_v",
            "self_attn_o" => "attn1.to_out.0",
            "self_attn_norm_q" => "attn1.norm_q",
            "self_attn_norm_k" => "attn1.norm_k",
            "cross_attn_q" => "attn2.to_q",
            "cross_attn_k" => "attn2.to_k",
            "cross_attn_v" => "attn2.to_v",
            "cross_attn_o" => "attn2.to_out.0",
            "cross_attn_norm_q" => "attn2.norm_q",
            "cross_attn_norm_k" => "attn2.norm_k",
            "cross_attn_k_img" => "attn2.add_k_proj",
            "cross_attn_v_img" => "attn2.add_v_proj",
            "cross_attn_norm_k_img" => "attn2.norm_added_k",
            "ffn_0" => "ffn.net.0.proj",
            "ffn_2" => "ffn.net.2",
            "norm3" => "norm2",
            "modulation" => return param(index, format!("blocks.{i}.scale_shift_table")),
            _ => return None,
        };
        format!("blocks.{i}.{inner}")
    } else {
        let m = match flat {
            "time_embedding_0" => "condition_embedder.time_embedder.linear_1",
            "time_embedding_2" => "condition_embedder.time_embedder.linear_2",
            "text_embedding_0" => "condition_embedder.text_embedder.linear_1",
            "text_embedding_2" => "condition_embedder.text_embedder.linear_2",
            "time_projection_1" => "condition_embedder.time_proj",
            "img_emb_proj_0" => "condition_embedder.image_embedder.norm1",
            "img_emb_proj_1" => "condition_embedder.image_embedder.ff.net.0.proj",
            "img_emb_proj_3" => "condition_embedder.image_embedder.ff.net.2",
            "img_emb_proj_4" => "condition_embedder.image_embedder.norm2",
            "head_head" => "proj_out",
            "head_modulation" => return param(index, "scale_shift_table".into()),
            _ => return None,
        };
        m.to_string()
    };
    index.split(&[module.replace('.', "_")])
}

/// A bare parameter, when the component has it.
fn param(index: &Index, name: String) -> Option<Vec<Target>> {
    index.shape(&name).map(|_| vec![Target { weight: name, up_rows: Vec::new() }])
}

/// The LDM (original Stable Diffusion / sgm) UNet name of a module, flattened, as the diffusers
/// name, flattened: `input_blocks_4_1_proj_in` → `down_blocks_1_attentions_0_proj_in`.
fn ldm_unet(index: &Index, flat: &str) -> Option<String> {
    let top = match flat {
        "input_blocks_0_0" => Some("conv_in"),
        "out_0" => Some("conv_norm_out"),
        "out_2" => Some("conv_out"),
        "time_embed_0" => Some("time_embedding_linear_1"),
        "time_embed_2" => Some("time_embedding_linear_2"),
        "label_emb_0_0" => Some("add_embedding_linear_1"),
        "label_emb_0_2" => Some("add_embedding_linear_2"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    // Layers per down block; up blocks have one more.
    let per_block = (0..).take_while(|j| index.has_flat(&format!("down_blocks_0_resnets_{j}_conv1"))).count();
    if per_block == 0 {
        return None;
    }
    if let Some((n, rest)) = numbered(flat, "input_blocks_") {
        let (k, rest) = numbered(rest, "")?;
        let (b, j) = ((n.checked_sub(1)?) / (per_block + 1), (n - 1) % (per_block + 1));
        return match (j == per_block, k) {
            (true, 0) if rest == "op" => Some(format!("down_blocks_{b}_downsamplers_0_conv")),
            (false, 0) => Some(format!("down_blocks_{b}_resnets_{j}_{}", ldm_resnet(rest)?)),
            (false, 1) => Some(format!("down_blocks_{b}_attentions_{j}_{rest}")),
            _ => None,
        };
    }
    if let Some((k, rest)) = numbered(flat, "middle_block_") {
        return match k {
            0 => Some(format!("mid_block_resnets_0_{}", ldm_resnet(rest)?)),
            1 => Some(format!("mid_block_attentions_0_{rest}")),
            2 => Some(format!("mid_block_resnets_1_{}", ldm_resnet(rest)?)),
            _ => None,
        };
    }
    let (n, rest) = numbered(flat, "output_blocks_")?;
    let (k, rest) = numbered(rest, "")?;
    let (b, j) = (n / (per_block + 1), n % (per_block + 1));
    let has_attention = index.flat.keys().any(|f| f.starts_with(&format!("up_blocks_{b}_attentions_")));
    match k {
        0 => Some(format!("up_blocks_{b}_resnets_{j}_{}", ldm_resnet(rest)?)),
        1 if has_attention => Some(format!("up_blocks_{b}_attentions_{j}_{rest}")),
        1 | 2 if rest == "conv" => Some(format!("up_blocks_{b}_upsamplers_0_conv")),
        _ => None,
    }
}

/// LDM ResBlock parts as diffusers' ResnetBlock2D names them.
fn ldm_resnet(rest: &str) -> Option<&'static str> {
    Some(match rest {
        "in_layers_0" => "norm1",
        "in_layers_2" => "conv1",
        "emb_layers_1" => "time_emb_proj",
        "out_layers_0" => "norm2",
        "out_layers_3" => "conv2",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(names: &[(&str, &[usize])]) -> Index {
        Index::new(names.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect())
    }

    fn flux() -> Index {
        index(&[
            ("transformer_blocks.0.attn.to_q.weight", &[8, 8]),
            ("transformer_blocks.0.attn.to_k.weight", &[8, 8]),
            ("transformer_blocks.0.attn.to_v.weight", &[8, 8]),
            ("single_transformer_blocks.0.attn.to_q.weight", &[8, 8]),
            ("single_transformer_blocks.0.attn.to_k.weight", &[8, 8]),
            ("single_transformer_blocks.0.attn.to_v.weight", &[8, 8]),
            ("single_transformer_blocks.0.proj_mlp.weight", &[32, 8]),
            ("norm_out.linear.weight", &[16, 8]),
            ("x_embedder.weight", &[8, 4]),
            ("time_text_embed.guidance_embedder.linear_2.weight", &[8, 8]),
        ])
    }

    #[test]
    fn bfl_names() {
        let ix = flux();
        let t = resolve(&ix, "double_blocks.0.img_attn.qkv").unwrap();
        assert_eq!(t.iter().map(|t| t.up_rows.clone()).collect::<Vec<_>>(), [[(0, 8)], [(8, 8)], [(16, 8)]]);
        assert_eq!(t[1].weight, "transformer_blocks.0.attn.to_k.weight");
        let t = resolve(&ix, "single_blocks_0_linear1").unwrap();
        assert_eq!(
            (t[3].weight.as_str(), t[3].up_rows.clone()),
            ("single_transformer_blocks.0.proj_mlp.weight", vec![(24, 32)])
        );
        let t = resolve(&ix, "final_layer.adaLN_modulation.1").unwrap();
        assert_eq!(t[0].up_rows, [(8, 8), (0, 8)]);
        assert_eq!(resolve(&ix, "img_in").unwrap()[0].weight, "x_embedder.weight");
        assert_eq!(
            resolve(&ix, "guidance_in_out_layer").unwrap()[0].weight,
            "time_text_embed.guidance_embedder.linear_2.weight"
        );
        let t = resolve(&ix, "double_blocks.0.processor.qkv_lora1").unwrap();
        assert_eq!(t.len(), 3);
        assert!(resolve(&ix, "double_blocks_1_img_attn_qkv").is_none());
        assert!(resolve(&ix, "down_blocks_0_resnets_0_conv1").is_none());
    }

    #[test]
    fn ldm_names() {
        // SDXL-like: two layers per down block, attention in block 1 only, upsampler in up block 0.
        let ix = index(&[
            ("conv_in.weight", &[4, 4, 3, 3]),
            ("down_blocks.0.resnets.0.conv1.weight", &[4, 4, 3, 3]),
            ("down_blocks.0.resnets.1.conv1.weight", &[4, 4, 3, 3]),
            ("down_blocks.0.downsamplers.0.conv.weight", &[4, 4, 3, 3]),
            ("down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight", &[4, 4]),
            ("mid_block.resnets.1.time_emb_proj.weight", &[4, 4]),
            ("up_blocks.0.attentions.2.proj_out.weight", &[4, 4]),
            ("up_blocks.0.upsamplers.0.conv.weight", &[4, 4, 3, 3]),
            ("up_blocks.1.upsamplers.0.conv.weight", &[4, 4, 3, 3]),
            ("up_blocks.1.resnets.2.conv_shortcut.weight", &[4, 4, 1, 1]),
            ("add_embedding.linear_2.weight", &[4, 4]),
        ]);
        let w = |n: &str| resolve(&ix, n).map(|t| t[0].weight.clone());
        assert_eq!(w("input_blocks_1_0_in_layers_2").unwrap(), "down_blocks.0.resnets.0.conv1.weight");
        assert_eq!(w("input_blocks_2_0_in_layers_2").unwrap(), "down_blocks.0.resnets.1.conv1.weight");
        assert_eq!(w("input_blocks_3_0_op").unwrap(), "down_blocks.0.downsamplers.0.conv.weight");
        assert_eq!(
            w("input_blocks_5_1_transformer_blocks_0_attn1_to_q").unwrap(),
            "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight"
        );
        assert_eq!(w("middle_block_2_emb_layers_1").unwrap(), "mid_block.resnets.1.time_emb_proj.weight");
        assert_eq!(w("output_blocks_2_1_proj_out").unwrap(), "up_blocks.0.attentions.2.proj_out.weight");
        assert_eq!(w("output_blocks_2_2_conv").unwrap(), "up_blocks.0.upsamplers.0.conv.weight");
        assert_eq!(w("output_blocks_5_1_conv").unwrap(), "up_blocks.1.upsamplers.0.conv.weight");
        assert_eq!(w("output_blocks_5_0_skip_connection").unwrap(), "up_blocks.1.resnets.2.conv_shortcut.weight");
        assert_eq!(w("input_blocks_0_0").unwrap(), "conv_in.weight");
        assert_eq!(w("label_emb_0_2").unwrap(), "add_embedding.linear_2.weight");
        assert!(w("input_blocks_9_0_in_layers_2").is_none());
    }

    #[test]
    fn wan_names() {
        let ix = index(&[
            ("condition_embedder.time_proj.weight", &[96, 16]),
            ("condition_embedder.text_embedder.linear_2.weight", &[16, 16]),
            ("blocks.1.attn1.to_out.0.weight", &[16, 16]),
            ("blocks.1.attn2.add_v_proj.weight", &[16, 16]),
            ("blocks.1.attn2.norm_added_k.weight", &[16]),
            ("blocks.1.ffn.net.0.proj.weight", &[24, 16]),
            ("blocks.1.norm2.weight", &[16]),
            ("blocks.1.scale_shift_table", &[1, 6, 16]),
            ("scale_shift_table", &[1, 2, 16]),
            ("proj_out.weight", &[16, 16]),
        ]);
        let w = |n: &str| resolve(&ix, n).map(|t| t[0].weight.clone());
        assert_eq!(w("blocks.1.self_attn.o").unwrap(), "blocks.1.attn1.to_out.0.weight");
        assert_eq!(w("blocks_1_cross_attn_v_img").unwrap(), "blocks.1.attn2.add_v_proj.weight");
        assert_eq!(w("blocks.1.cross_attn.norm_k_img").unwrap(), "blocks.1.attn2.norm_added_k.weight");
        assert_eq!(w("blocks.1.ffn.0").unwrap(), "blocks.1.ffn.net.0.proj.weight");
        assert_eq!(w("blocks.1.norm3").unwrap(), "blocks.1.norm2.weight");
        assert_eq!(w("blocks.1.modulation").unwrap(), "blocks.1.scale_shift_table");
        assert_eq!(w("head.modulation").unwrap(), "scale_shift_table");
        assert_eq!(w("head.head").unwrap(), "proj_out.weight");
        assert_eq!(w("time_projection.1").unwrap(), "condition_embedder.time_proj.weight");
        assert_eq!(w("text_embedding.2").unwrap(), "condition_embedder.text_embedder.linear_2.weight");
        // diffusers names resolve directly.
        assert_eq!(w("blocks.1.attn1.to_out.0").unwrap(), "blocks.1.attn1.to_out.0.weight");
        assert!(w("blocks.2.self_attn.q").is_none());
        assert!(w("blocks.1.self_attn.x").is_none());
    }

    #[test]
    fn old_diffusers_names() {
        let ix = index(&[
            ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight", &[4, 4]),
            ("text_model.encoder.layers.0.self_attn.q_proj.weight", &[4, 4]),
            ("text_model.encoder.layers.0.mlp.fc1.weight", &[4, 4]),
        ]);
        let w = |n: &str| resolve(&ix, n).map(|t| t[0].weight.clone());
        assert_eq!(
            w("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora").unwrap(),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
        );
        assert_eq!(
            w("text_model.encoder.layers.0.self_attn.to_q_lora").unwrap(),
            "text_model.encoder.layers.0.self_attn.q_proj.weight"
        );
        assert_eq!(w("encoder.layers.0.mlp.fc1").unwrap(), "text_model.encoder.layers.0.mlp.fc1.weight");
    }
}
