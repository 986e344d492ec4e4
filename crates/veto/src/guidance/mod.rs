//! Guidance methods as pure tensor math. A model never contains a guidance formula; these
//! functions never know which model calls them.
//!
//! - [`nag`]: Normalized Attention Guidance (NAG paper, eq. 7-10).
//! - [`nasa`]: Negative-Away Steer Attention (NAG paper, eq. 5).
//! - [`vsf`]: Value Sign Flip (the flipped negative key/value block, VSF paper).
//! - [`cfg`](mod@cfg): classifier-free guidance with a negative prompt, in output space.
//! - [`pag`]: perturbed-attention guidance, in output space.
//! - [`window`]: which steps attention guidance runs at (early stopping, NAG appendix G).
//! - [`config`]: what the user asked for ([`GuidanceConfig`], validated once) and what applies
//!   at one step ([`GuidancePlan`], from a [`GuidancePlanner`]).
//! - [`guided_attention`](mod@guided_attention): the one attention routine every model calls
//!   with its queries and its positive, negative and shared key/value blocks.

pub mod cfg;
pub mod config;
pub mod guided_attention;
pub mod nag;
pub mod nasa;
pub mod pag;
pub mod vsf;
pub mod window;

pub use config::{
    AttentionGuidance, AttentionMethod, CfgScaleSource, Contrast, GuidanceConfig, GuidancePlan, GuidancePlanner,
    Method, NagPooled, NagVariant,
};
pub use guided_attention::{guided_attention, GuidedAttention, KeyValues, NegativeContext, NegativeKeyValues};
pub use nag::{NagNorm, NagParams};
pub use vsf::{VsfLayout, VsfParams};
pub use window::StepWindow;
