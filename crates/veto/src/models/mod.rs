//! Models: denoisers (Flux), VAEs.

pub mod vae;
pub mod flux;
