//! One key map per original layout.

pub mod flux_bfl;

use super::header::Header;
use super::key_map::{KeyMap, Layout};
use crate::error::{Error, Result};

/// A layout's anchor tensor (present in every file of that layout, and in no other) and the
/// prefixes it is found under.
pub fn anchor(layout: Layout) -> (&'static str, &'static [&'static str]) {
    match layout {
        Layout::FluxBfl => flux_bfl::ANCHOR,
        _ => ("", &[]),
    }
}

/// The key map of `layout` under `prefix`.
pub fn build(layout: Layout, prefix: &str, header: &Header) -> Result<KeyMap> {
    match layout {
        Layout::FluxBfl => flux_bfl::build(prefix, header),
        other => Err(Error::invalid(format!("{other} is not supported yet"))),
    }
}
