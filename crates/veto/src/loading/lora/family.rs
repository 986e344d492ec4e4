//! Which model family a LoRA's module names look like, so that a LoRA that fits nothing in the
//! model can say what it was probably made for.

/// A family's name and whether a pipeline class is of that family.
struct Guess {
    label: &'static str,
    is_class: fn(&str) -> bool,
}

const FLUX: Guess = Guess { label: "Flux", is_class: |c| c.starts_with("Flux") };
const SD3: Guess = Guess { label: "SD3 / SD3.5", is_class: |c| c.starts_with("StableDiffusion3") };
const UNET: Guess = Guess {
    label: "a Stable Diffusion UNet (SD1.5 / SDXL)",
    is_class: |c| c.starts_with("StableDiffusion") && !c.starts_with("StableDiffusion3"),
};
const MMDIT: Guess =
    Guess { label: "an MMDiT (Flux or SD3)", is_class: |c| c.starts_with("Flux") || c.starts_with("StableDiffusion3") };
const WAN: Guess = Guess { label: "Wan2.1", is_class: |c| c.starts_with("Wan") };
const SANA: Guess = Guess { label: "SANA", is_class: |c| c.starts_with("Sana") };
const PIXART: Guess = Guess { label: "PixArt", is_class: |c| c.starts_with("PixArt") };

fn guess(flat: &str) -> Option<&'static Guess> {
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| flat.starts_with(p));
    let has = |parts: &[&str]| parts.iter().any(|p| flat.contains(p));
    if starts(&["double_blocks_", "single_blocks_", "single_transformer_blocks_"]) {
        Some(&FLUX)
    } else if starts(&["joint_blocks_"]) || has(&["context_block"]) {
        Some(&SD3)
    } else if starts(&["input_blocks_", "output_blocks_", "middle_block_", "down_blocks_", "up_blocks_", "mid_block_"])
    {
        Some(&UNET)
    } else if starts(&["blocks_"]) && has(&["_self_attn_", "_cross_attn_", "_attn1_", "_attn2_", "_ffn_"]) {
        Some(&WAN)
    } else if starts(&["transformer_blocks_"]) && has(&["_ff_conv_inverted", "_ff_conv_depth", "_ff_conv_point"]) {
        Some(&SANA)
    } else if starts(&["transformer_blocks_"]) && has(&["_add_q_proj", "_ff_context_"]) {
        Some(&MMDIT)
    } else if starts(&["transformer_blocks_"]) && has(&["_attn2_"]) {
        Some(&PIXART)
    } else {
        None
    }
}

/// The family the denoiser module names (in any layout's spelling) look like, unless it is the
/// family of `pipeline_class` itself (then the LoRA fits another variant, not another family).
pub fn looks_like<'a>(names: impl IntoIterator<Item = &'a str>, pipeline_class: &str) -> Option<&'static str> {
    let mut counts: Vec<(&'static str, bool, usize)> = Vec::new();
    for name in names {
        if let Some(g) = guess(&name.replace('.', "_")) {
            match counts.iter_mut().find(|c| c.0 == g.label) {
                Some(c) => c.2 += 1,
                None => counts.push((g.label, (g.is_class)(pipeline_class), 1)),
            }
        }
    }
    let (label, own, _) = counts.into_iter().max_by_key(|c| c.2)?;
    (!own).then_some(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_by_names() {
        let wan = ["blocks.0.self_attn.q", "blocks_3_ffn_0", "blocks.1.attn2.to_k"];
        assert_eq!(looks_like(wan, "FluxPipeline"), Some("Wan2.1"));
        assert_eq!(looks_like(wan, "WanPipeline"), None);
        assert_eq!(looks_like(["double_blocks_0_img_attn_qkv"], "WanPipeline"), Some("Flux"));
        assert_eq!(
            looks_like(["input_blocks_4_1_proj_in", "down_blocks.0.resnets.0.conv1"], "WanPipeline"),
            Some("a Stable Diffusion UNet (SD1.5 / SDXL)")
        );
        assert_eq!(looks_like(["joint_blocks_0_x_block_attn_qkv"], "FluxPipeline"), Some("SD3 / SD3.5"));
        assert_eq!(looks_like(["transformer_blocks.0.attn.add_q_proj"], "WanPipeline"), Some("an MMDiT (Flux or SD3)"));
        assert_eq!(looks_like(["something_else"], "WanPipeline"), None);
    }
}
