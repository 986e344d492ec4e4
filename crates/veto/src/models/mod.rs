//! Models: denoisers (Flux), VAEs.

pub mod clip_vision;
pub mod conv;
pub mod dc_ae;
pub mod flux;
pub mod layers;
pub mod mmdit;
pub mod pixart;
pub mod sana;
pub mod unet;
pub mod vae;
pub mod wan;
pub mod wan_vae;
