//! Guidance methods as pure tensor math. A model never contains a guidance formula; these
//! functions never know which model calls them.
//!
//! - [`nag`]: Normalized Attention Guidance (NAG paper, eq. 7-10).
//! - [`nasa`]: Negative-Away Steer Attention (NAG paper, eq. 5).
//! - [`cfg`]: classifier-free guidance with a negative prompt, in output space.
//! - [`vsf`]: Value Sign Flip parameters (applied inside attention by the models).
//! - [`window`]: which steps attention guidance runs at (early stopping, NAG appendix G).
//! - [`config`]: what the user asked for, validated once, and the per-step [`GuidancePlan`].

pub mod cfg;
pub mod config;
pub mod nag;
pub mod nasa;
pub mod vsf;
pub mod window;

pub use config::{AttentionGuidance, AttentionMethod, GuidanceConfig, GuidancePlan, Method, NagPooled};
pub use nag::{NagNorm, NagParams};
