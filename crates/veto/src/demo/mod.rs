//! The demo world (issue: an embedded demo model with a judge): a synthetic scene generator
//! with built-in co-occurrences, rendered by our own code, and a deterministic judge that reads
//! the objects back from an image.

pub mod canvas;
pub mod judge;
pub mod model;
pub mod report;
pub mod scene;
pub mod suite;

pub use judge::{agreement, clean_pixel_share, judge, Detected};
pub use scene::{Background, CoOccurrence, Colour, Object, Scene, SceneSampler, Shape, CO_OCCURRENCES};
