//! A LoRA file's keys, grouped into modules: which model part each targets, under which name,
//! in which of the layouts trainers write (diffusers/PEFT, kohya/A1111, ComfyUI/BFL, XLabs).
//! Besides the low-rank pair a module may carry full deltas, as ComfyUI reads them: `.diff` (added
//! to the weight) and `.diff_b` (added to the bias), e.g. the CausVid Wan LoRA's.

use std::collections::BTreeMap;
use std::fmt;

/// The model part a LoRA module targets, before it is matched to a component of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// The UNet or transformer.
    Denoiser,
    /// `text_encoder` (CLIP-L).
    TextEncoder,
    /// `text_encoder_2` (SDXL/SD3 CLIP-G).
    TextEncoder2,
    /// `text_encoder_3` (SD3's T5).
    TextEncoder3,
    /// The T5 encoder, wherever the model keeps it (`text_encoder_3` in SD3, `text_encoder_2` in Flux).
    T5,
}

/// The key layout a module was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layout {
    /// diffusers / PEFT: `transformer.<module>.lora_A.weight`.
    Peft,
    /// diffusers' older attention-processor layout: `unet.<…>.processor.to_q_lora.down.weight`.
    DiffusersOld,
    /// kohya sd-scripts / A1111: `lora_unet_<flattened module>.lora_down.weight`, `.alpha`.
    Kohya,
    /// ComfyUI / BFL: `diffusion_model.<original module>.lora_A.weight` (or `.lora_down`).
    Comfy,
    /// XLabs Flux: `double_blocks.N.processor.qkv_lora1.down.weight`.
    XLabs,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Peft => "diffusers/PEFT",
            Layout::DiffusersOld => "diffusers attn-procs",
            Layout::Kohya => "kohya",
            Layout::Comfy => "ComfyUI/BFL",
            Layout::XLabs => "XLabs",
        })
    }
}

/// One LoRA module of a file: its down (A) and up (B) tensors and optional alpha.
#[derive(Debug, Clone)]
pub struct Module {
    /// The module key as written (without the `.lora_A.weight`-like suffix), for messages.
    pub key: String,
    /// The targeted part.
    pub part: Part,
    /// The module's name inside the part, in its layout's spelling (`.`-separated, or flattened
    /// with `_` for kohya).
    pub name: String,
    /// The layout.
    pub layout: Layout,
    /// The PEFT metadata prefix (`transformer`, `text_encoder`...) for layouts that have one.
    pub peft_prefix: Option<String>,
    /// The down / A tensor's name.
    pub down: Option<String>,
    /// The up / B tensor's name.
    pub up: Option<String>,
    /// The `.alpha` tensor's name.
    pub alpha: Option<String>,
    /// A full weight delta (`.diff`), added at the LoRA's scale.
    pub diff: Option<String>,
    /// A bias delta (`.diff_b`), added at the LoRA's scale.
    pub diff_b: Option<String>,
}

impl Module {
    /// Whether the module has a low-rank pair (else only full deltas).
    pub fn is_low_rank(&self) -> bool {
        self.down.is_some() || self.up.is_some()
    }
}

enum Role {
    Down,
    Up,
    Alpha,
    Diff,
    DiffB,
}

/// Suffixes naming a module's tensors, longest first so that `.lora_down.weight` wins over
/// `.down.weight`.
const ROLES: [(&str, u8); 11] = [
    (".lora_A.default.weight", 0),
    (".lora_B.default.weight", 1),
    (".lora_down.weight", 0),
    (".lora_up.weight", 1),
    (".lora_A.weight", 0),
    (".lora_B.weight", 1),
    (".down.weight", 0),
    (".up.weight", 1),
    (".alpha", 2),
    (".diff_b", 4),
    (".diff", 3),
];

fn split_role(key: &str) -> Option<(&str, Role)> {
    ROLES.iter().find_map(|(suffix, role)| {
        key.strip_suffix(suffix).map(|m| {
            let role = match role {
                0 => Role::Down,
                1 => Role::Up,
                2 => Role::Alpha,
                3 => Role::Diff,
                _ => Role::DiffB,
            };
            // diffusers' non-PEFT layout: `<module>.lora.down.weight`.
            (m.strip_suffix(".lora").unwrap_or(m), role)
        })
    })
}

/// Where a module key points: part, name in that part, layout, PEFT prefix.
fn classify(module: &str) -> Option<(Part, String, Layout, Option<String>)> {
    const KOHYA: [(&str, Part); 6] = [
        ("lora_unet_", Part::Denoiser),
        ("lora_transformer_", Part::Denoiser),
        ("lora_te_", Part::TextEncoder),
        ("lora_te1_", Part::TextEncoder),
        ("lora_te2_", Part::TextEncoder2),
        ("lora_te3_", Part::T5),
    ];
    for (prefix, part) in KOHYA {
        if let Some(rest) = module.strip_prefix(prefix) {
            return Some((part, rest.to_string(), Layout::Kohya, None));
        }
    }
    const COMFY: [(&str, Part); 4] = [
        ("diffusion_model.", Part::Denoiser),
        ("text_encoders.clip_l.transformer.", Part::TextEncoder),
        ("text_encoders.clip_g.transformer.", Part::TextEncoder2),
        ("text_encoders.t5xxl.transformer.", Part::T5),
    ];
    for (prefix, part) in COMFY {
        if let Some(rest) = module.strip_prefix(prefix) {
            let layout = if rest.contains(".processor.") { Layout::XLabs } else { Layout::Comfy };
            return Some((part, rest.to_string(), layout, None));
        }
    }
    if module.starts_with("double_blocks.") || module.starts_with("single_blocks.") {
        let layout = if module.contains(".processor.") { Layout::XLabs } else { Layout::Comfy };
        return Some((Part::Denoiser, module.to_string(), layout, None));
    }
    const PEFT: [(&str, Part); 6] = [
        ("transformer.", Part::Denoiser),
        ("unet.", Part::Denoiser),
        ("text_encoder.", Part::TextEncoder),
        ("text_encoder_2.", Part::TextEncoder2),
        ("text_encoder_3.", Part::TextEncoder3),
        ("base_model.model.", Part::Denoiser),
    ];
    for (prefix, part) in PEFT {
        if let Some(rest) = module.strip_prefix(prefix) {
            let old = rest.contains(".processor.") || rest.ends_with("_lora") || rest.contains(".lora_linear_layer");
            let layout = if old { Layout::DiffusersOld } else { Layout::Peft };
            let peft_prefix = prefix.trim_end_matches('.').to_string();
            return Some((part, rest.to_string(), layout, Some(peft_prefix)));
        }
    }
    None
}

/// A file's keys as modules, plus the keys no layout explains.
#[derive(Debug, Default)]
pub struct Keys {
    /// The modules, by key.
    pub modules: BTreeMap<String, Module>,
    /// Keys that belong to no module (unknown layouts, DoRA scales).
    pub unknown: Vec<String>,
}

/// Groups tensor names into modules.
pub fn group<'a>(names: impl IntoIterator<Item = &'a String>) -> Keys {
    let mut keys = Keys::default();
    for name in names {
        let Some((module, role)) = split_role(name) else {
            keys.unknown.push(name.clone());
            continue;
        };
        let Some((part, inner, layout, peft_prefix)) = classify(module) else {
            keys.unknown.push(name.clone());
            continue;
        };
        let entry = keys.modules.entry(module.to_string()).or_insert_with(|| Module {
            key: module.to_string(),
            part,
            name: inner,
            layout,
            peft_prefix,
            down: None,
            up: None,
            alpha: None,
            diff: None,
            diff_b: None,
        });
        let slot = match role {
            Role::Down => &mut entry.down,
            Role::Up => &mut entry.up,
            Role::Alpha => &mut entry.alpha,
            Role::Diff => &mut entry.diff,
            Role::DiffB => &mut entry.diff_b,
        };
        *slot = Some(name.clone());
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(key: &str) -> Module {
        let names = vec![key.to_string()];
        let keys = group(&names);
        assert!(keys.unknown.is_empty(), "{key}: unknown");
        keys.modules.into_values().next().unwrap()
    }

    #[test]
    fn layouts() {
        let m = one("transformer.transformer_blocks.0.attn.to_q.lora_A.weight");
        assert_eq!(
            (m.part, m.layout, m.name.as_str()),
            (Part::Denoiser, Layout::Peft, "transformer_blocks.0.attn.to_q")
        );
        let m = one("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight");
        assert_eq!(
            (m.part, m.layout, m.name.as_str()),
            (Part::Denoiser, Layout::Kohya, "double_blocks_0_img_attn_qkv")
        );
        let m = one("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha");
        assert_eq!((m.part, m.layout), (Part::TextEncoder2, Layout::Kohya));
        let m = one("diffusion_model.single_blocks.3.linear1.lora_B.weight");
        assert_eq!((m.part, m.layout, m.name.as_str()), (Part::Denoiser, Layout::Comfy, "single_blocks.3.linear1"));
        let m = one("double_blocks.1.processor.qkv_lora2.down.weight");
        assert_eq!((m.part, m.layout), (Part::Denoiser, Layout::XLabs));
        let m = one("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight");
        assert_eq!(m.layout, Layout::DiffusersOld);
        let m = one("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_down.weight");
        assert_eq!(m.part, Part::T5);
    }

    #[test]
    fn wan_layouts_and_full_deltas() {
        let m = one("diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight");
        assert_eq!((m.layout, m.name.as_str()), (Layout::Comfy, "blocks.0.cross_attn.k_img"));
        let m = one("lora_unet_blocks_3_ffn_2.alpha");
        assert_eq!((m.layout, m.name.as_str()), (Layout::Kohya, "blocks_3_ffn_2"));
        let names: Vec<String> = ["diffusion_model.head.head.diff_b", "diffusion_model.blocks.0.norm3.diff"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let keys = group(&names);
        assert!(keys.unknown.is_empty());
        let head = &keys.modules["diffusion_model.head.head"];
        assert_eq!((head.diff_b.as_deref(), head.is_low_rank()), (Some("diffusion_model.head.head.diff_b"), false));
        assert!(keys.modules["diffusion_model.blocks.0.norm3"].diff.is_some());
    }

    #[test]
    fn unknown_keys() {
        let names = vec!["lora_unet_x.dora_scale".to_string(), "something.weight".to_string()];
        assert_eq!(group(&names).unknown.len(), 2);
    }
}
