//! One key map per original layout.

pub mod flux_bfl;
pub mod ldm_unet;
pub mod ldm_vae;
pub mod sd3_mmdit;
pub mod text_encoders;

use super::header::Header;
use super::key_map::{KeyMap, Layout, Op};
use crate::error::Result;

/// A layout's anchor tensor (present in every file of that layout, and in no other) and the
/// prefixes it is found under.
pub fn anchor(layout: Layout) -> (&'static str, &'static [&'static str]) {
    match layout {
        Layout::FluxBfl => flux_bfl::ANCHOR,
        Layout::Sd3Mmdit => sd3_mmdit::ANCHOR,
        Layout::LdmVae => ldm_vae::ANCHOR,
        Layout::HfClip => text_encoders::CLIP_ANCHOR,
        Layout::HfT5 => text_encoders::T5_ANCHOR,
        Layout::OpenClip => text_encoders::OPEN_CLIP_ANCHOR,
        Layout::LdmUnet => ldm_unet::ANCHOR,
    }
}

/// The key map of `layout` under `prefix`.
pub fn build(layout: Layout, prefix: &str, header: &Header) -> Result<KeyMap> {
    match layout {
        Layout::FluxBfl => flux_bfl::build(prefix, header),
        Layout::Sd3Mmdit => sd3_mmdit::build(prefix, header),
        Layout::LdmVae => ldm_vae::build(prefix, header),
        Layout::HfClip | Layout::HfT5 => text_encoders::build_hf(prefix, header),
        Layout::OpenClip => text_encoders::build_open_clip(prefix, header),
        Layout::LdmUnet => ldm_unet::build(prefix, header),
    }
}

/// A map made by renaming every tensor under `prefix` one by one: `f` gets the name without
/// the prefix and the stored shape, and gives the diffusers name and the operation, or `None`
/// for a tensor diffusers has no use for.
pub(crate) fn rename(header: &Header, prefix: &str, f: impl Fn(&str, &[usize]) -> Option<(String, Op)>) -> KeyMap {
    let mut m = KeyMap::new();
    for name in header.names() {
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let shape = header.shape(name).unwrap_or_default();
        if let Some((diffusers, op)) = f(rest, shape) {
            m.insert(diffusers, name, op);
        }
    }
    m
}
