//! Models: denoisers (Flux), VAEs.

pub mod vae;
