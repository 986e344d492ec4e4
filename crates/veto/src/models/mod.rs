//! Models: denoisers (Flux), VAEs.

pub mod vae;
pub mod flux;
pub mod mmdit;
pub mod unet;
