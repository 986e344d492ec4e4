//! Models: denoisers (Flux), VAEs.

pub mod flux;
pub mod layers;
pub mod mmdit;
pub mod pixart;
pub mod unet;
pub mod vae;
