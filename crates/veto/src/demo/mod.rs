//! The demo world (issue: an embedded demo model with a judge): a synthetic scene generator
//! with built-in co-occurrences, rendered by our own code, and a deterministic judge that reads
//! the objects back from an image.

pub mod judge;
pub mod scene;

pub use judge::{agreement, judge, Detected};
pub use scene::{Background, CoOccurrence, Colour, Object, Scene, SceneSampler, Shape, CO_OCCURRENCES};
