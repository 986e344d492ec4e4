//! Telling what a single-file checkpoint is from its tensor names and shapes: the model family
//! and variant, and which pipeline components it holds in which layout under which prefix.

use super::header::Header;
use super::key_map::Layout;
use super::layouts;

/// The model families single files come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// FLUX.1 (schnell, dev and their descendants).
    Flux,
    /// SD3 / SD3.5.
    Sd3,
    /// SDXL.
    Sdxl,
    /// SD1.5.
    Sd15,
}

impl Kind {
    /// The diffusers pipeline class a base model of this kind declares.
    pub fn pipeline_class(self) -> &'static str {
        match self {
            Kind::Flux => "FluxPipeline",
            Kind::Sd3 => "StableDiffusion3Pipeline",
            Kind::Sdxl => "StableDiffusionXLPipeline",
            Kind::Sd15 => "StableDiffusionPipeline",
        }
    }
}

/// One component found in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The diffusers component it provides (`transformer`, `unet`, `vae`, `text_encoder`, …).
    pub component: &'static str,
    /// Its layout.
    pub layout: Layout,
    /// The prefix in front of its original names.
    pub prefix: String,
}

/// What a file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// Its family.
    pub kind: Kind,
    /// The variant the shapes say, for messages (`FLUX.1-dev`, `SD3.5 Large`, …).
    pub variant: &'static str,
    /// The diffusers repo whose other parts (configs, scheduler, tokenizers, missing
    /// components) fit it.
    pub default_base: &'static str,
    /// The components it holds; the first is the denoiser.
    pub parts: Vec<Part>,
}

/// (component, layout, prefixes) candidates of each family, denoiser first.
type Candidates = &'static [(&'static str, Layout, &'static [&'static str])];

const FLUX: Candidates = &[
    ("transformer", Layout::FluxBfl, &["", "model.diffusion_model."]),
    ("vae", Layout::LdmVae, &["vae.", "first_stage_model."]),
    ("text_encoder", Layout::HfClip, &["text_encoders.clip_l.transformer."]),
    ("text_encoder_2", Layout::HfT5, &["text_encoders.t5xxl.transformer."]),
];
const SD3: Candidates = &[
    ("transformer", Layout::Sd3Mmdit, &["model.diffusion_model.", ""]),
    ("vae", Layout::LdmVae, &["first_stage_model.", "vae."]),
    ("text_encoder", Layout::HfClip, &["text_encoders.clip_l.transformer."]),
    ("text_encoder_2", Layout::HfClip, &["text_encoders.clip_g.transformer."]),
    ("text_encoder_3", Layout::HfT5, &["text_encoders.t5xxl.transformer."]),
];
const SDXL: Candidates = &[
    ("unet", Layout::LdmUnet, &["model.diffusion_model.", ""]),
    ("vae", Layout::LdmVae, &["first_stage_model."]),
    ("text_encoder", Layout::HfClip, &["conditioner.embedders.0.transformer."]),
    ("text_encoder_2", Layout::OpenClip, &["conditioner.embedders.1.model."]),
];
const SD15: Candidates = &[
    ("unet", Layout::LdmUnet, &["model.diffusion_model.", ""]),
    ("vae", Layout::LdmVae, &["first_stage_model."]),
    ("text_encoder", Layout::HfClip, &["cond_stage_model.transformer."]),
];

fn find(header: &Header, layout: Layout, prefixes: &[&str]) -> Option<String> {
    let (anchor, _) = layouts::anchor(layout);
    prefixes.iter().find(|p| header.contains(&format!("{p}{anchor}"))).map(|p| p.to_string())
}

fn parts(header: &Header, candidates: Candidates) -> Vec<Part> {
    candidates
        .iter()
        .filter_map(|&(component, layout, prefixes)| {
            find(header, layout, prefixes).map(|prefix| Part { component, layout, prefix })
        })
        .collect()
}

/// What `header`'s file is, or `None` when it holds no denoiser we know.
pub fn detect(header: &Header) -> Option<Detected> {
    let (kind, candidates) = [(Kind::Flux, FLUX), (Kind::Sd3, SD3), (Kind::Sdxl, SDXL), (Kind::Sd15, SD15)]
        .into_iter()
        .find(|(kind, candidates)| {
            let (_, layout, prefixes) = candidates[0];
            find(header, layout, prefixes).is_some_and(|p| {
                // SDXL and SD1.5 share the UNet layout; SDXL's has the added (size, pooled) embedding.
                let sdxl = header.contains(&format!("{p}label_emb.0.0.weight"));
                match kind {
                    Kind::Sdxl => sdxl,
                    Kind::Sd15 => !sdxl,
                    _ => true,
                }
            })
        })?;
    let parts = parts(header, candidates);
    let p = &parts[0].prefix;
    let (variant, default_base) = match kind {
        Kind::Flux if header.contains(&format!("{p}guidance_in.in_layer.weight")) => {
            ("FLUX.1-dev", "black-forest-labs/FLUX.1-dev")
        }
        Kind::Flux => ("FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell"),
        Kind::Sd3 => sd3_variant(header, p),
        Kind::Sdxl => ("SDXL", "stabilityai/stable-diffusion-xl-base-1.0"),
        Kind::Sd15 => ("SD1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    };
    Some(Detected { kind, variant, default_base, parts })
}

/// SD3 variants by their shapes: SD3.5 Medium has second attention layers (`attn2`), SD3.5
/// qk norms (`ln_q`); depth 38 is Large, 24 Medium.
fn sd3_variant(header: &Header, p: &str) -> (&'static str, &'static str) {
    let dual = header.names().any(|n| n.starts_with(&format!("{p}joint_blocks.")) && n.contains(".x_block.attn2."));
    let qk_norm = header.contains(&format!("{p}joint_blocks.0.x_block.attn.ln_q.weight"));
    let depth = header.count_blocks(&format!("{p}joint_blocks."));
    match (dual, qk_norm, depth) {
        (true, _, _) => ("SD3.5 Medium", "stabilityai/stable-diffusion-3.5-medium"),
        (false, true, _) => ("SD3.5 Large", "stabilityai/stable-diffusion-3.5-large"),
        (false, false, 24) => ("SD3 Medium", "stabilityai/stable-diffusion-3-medium-diffusers"),
        _ => ("SD3", "stabilityai/stable-diffusion-3.5-large"),
    }
}
