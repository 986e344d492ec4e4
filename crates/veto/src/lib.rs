//! veto: negative prompts that work on few-step diffusion models.
//!
//! Guidance methods (NAG, NASA, CFG) live in [`guidance`] as pure tensor math; models in
//! [`models`] own their weights and data flow and ask a [`guidance::GuidancePlan`] what to do
//! in each attention layer. [`pipelines`] turn text into images.

pub mod attention;
pub mod error;
pub mod guidance;
pub mod image_io;
pub mod loading;
pub mod models;
pub mod pipelines;
pub mod schedulers;
pub mod text;

pub use error::{Error, Result};
