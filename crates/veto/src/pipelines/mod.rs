//! Pipelines: text -> latents -> image.
