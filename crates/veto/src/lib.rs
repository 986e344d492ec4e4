//! veto: negative prompts that work on few-step diffusion models.
//!
//! Guidance methods (NAG, NASA, VSF, CFG, PAG) live in [`guidance`] as pure tensor math; models
//! own their weights and data flow and call [`guidance::guided_attention()`] in every guided
//! attention layer with the step's [`GuidancePlan`]. The [`families`] registry says which
//! diffusers pipelines load as which family; a [`Pipeline`] turns text into images:
//!
//! ```no_run
//! use veto::{DType, Device, GenerateRequest, Pipeline};
//!
//! # fn main() -> veto::Result<()> {
//! let pipe = Pipeline::from_pretrained("black-forest-labs/FLUX.1-schnell", &Device::Cpu, DType::F32)?;
//! let out = pipe.generate(&GenerateRequest::new("Portrait of AI researcher.").negative("Glasses.").seed(0))?;
//! for warning in &out.warnings {
//!     eprintln!("warning: {warning}");
//! }
//! veto::save_png(&out.image, "out.png".as_ref())?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod allocator;
pub mod demo;
pub mod error;
pub mod families;
pub mod guidance;
pub mod image_io;
pub mod pil_resize;
pub mod video_io;

#[doc(hidden)]
pub mod attention;
#[doc(hidden)]
pub mod kernels;
#[doc(hidden)]
pub mod loading;
#[doc(hidden)]
pub mod models;
#[doc(hidden)]
pub mod pipelines;
pub mod profile;
#[doc(hidden)]
pub mod schedulers;
#[doc(hidden)]
pub mod text;

pub use candle_core::{DType, Device, Tensor};
pub use error::{Error, Result};
pub use families::{Family, FAMILIES};
pub use guidance::{GuidanceConfig, GuidancePlan, Method, NagNorm, NagParams, NagPooled, VsfLayout, VsfParams};
pub use image_io::save_png;
pub use loading::lora::LoraSpec;
pub use loading::model_source::ModelSource;
pub use pipelines::{
    Defaults, Denoised, GenerateRequest, Generation, LoadOptions, Pipeline, Residency, ResolvedRequest, SamplerOptions,
    StepEvent,
};

/// The README's Rust examples, compiled as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
