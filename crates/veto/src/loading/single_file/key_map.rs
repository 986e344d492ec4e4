//! Where each diffusers tensor comes from in an original-layout checkpoint: a source key and
//! the operation that turns the stored tensor into the one diffusers' layout expects.
//!
//! The maps are built from a [`Header`] (names and shapes only), so other containers holding
//! the same original key names (city96's GGUF files) reuse them unchanged.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::header::Header;
use super::layouts;
use crate::error::{Error, Result};

/// How a stored tensor becomes the diffusers tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The tensor as stored.
    Whole,
    /// Rows `start..start + len` of dim 0 (one part of a fused qkv / linear1 weight or bias).
    Rows {
        /// First row.
        start: usize,
        /// Number of rows.
        len: usize,
    },
    /// The two halves of dim 0 swapped: BFL/SD3 modulations are (shift, scale), diffusers'
    /// `AdaLayerNormContinuous` (scale, shift).
    SwapHalves,
    /// A 2-D tensor transposed (OpenCLIP stores `text_projection` as `x @ W`).
    Transpose,
    /// The same elements in another shape (LDM VAE attention stores 1×1 convolutions where
    /// diffusers has linear layers).
    Reshape(Vec<usize>),
}

impl Op {
    /// Applies the operation.
    pub fn apply(&self, t: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Op::Whole => Ok(t),
            Op::Rows { start, len } => t.narrow(0, *start, *len)?.contiguous(),
            Op::SwapHalves => {
                let half = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)
            }
            Op::Transpose => t.t()?.contiguous(),
            Op::Reshape(shape) => t.reshape(shape.as_slice()),
        }
    }

    /// The shape the operation gives a stored tensor of shape `stored`.
    pub fn shape_of(&self, stored: &[usize]) -> Vec<usize> {
        let mut shape = stored.to_vec();
        match self {
            Op::Whole | Op::SwapHalves => {}
            Op::Rows { len, .. } => {
                if let Some(first) = shape.first_mut() {
                    *first = *len;
                }
            }
            Op::Transpose => shape.reverse(),
            Op::Reshape(s) => shape = s.clone(),
        }
        shape
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Whole => Ok(()),
            Op::Rows { start, len } => write!(f, " rows {start}..{}", start + len),
            Op::SwapHalves => write!(f, " halves swapped"),
            Op::Transpose => write!(f, " transposed"),
            Op::Reshape(s) => write!(f, " reshaped to {s:?}"),
        }
    }
}

/// One diffusers tensor's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The key in the original file (with its prefix).
    pub source: String,
    /// What to do with it.
    pub op: Op,
}

impl std::fmt::Display for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.source, self.op)
    }
}

/// The layouts of original checkpoints we read, one per component kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layout {
    /// FLUX.1 transformer as Black Forest Labs ship it (`double_blocks.N.img_attn.qkv`).
    FluxBfl,
    /// SD3 / SD3.5 MMDiT in Stability's layout (`joint_blocks.N.x_block.attn.qkv`).
    Sd3Mmdit,
    /// The LDM UNet of SD1.5 / SDXL (`input_blocks`, `middle_block`, `output_blocks`).
    LdmUnet,
    /// The LDM autoencoder (`encoder.down.N.block.M`, `decoder.up.N`).
    LdmVae,
    /// A Hugging Face `CLIPTextModel(WithProjection)` under a prefix (`…text_model.encoder…`).
    HfClip,
    /// OpenCLIP's text tower (SDXL's second encoder: `model.transformer.resblocks.N`).
    OpenClip,
    /// A Hugging Face `T5EncoderModel` under a prefix (`…encoder.block.N…`).
    HfT5,
}

impl Layout {
    /// Every layout, for messages.
    pub const ALL: [Layout; 7] = [
        Layout::FluxBfl,
        Layout::Sd3Mmdit,
        Layout::LdmUnet,
        Layout::LdmVae,
        Layout::HfClip,
        Layout::OpenClip,
        Layout::HfT5,
    ];

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Layout::FluxBfl => "BFL layout",
            Layout::Sd3Mmdit => "SD3 MMDiT layout",
            Layout::LdmUnet => "LDM UNet layout",
            Layout::LdmVae => "LDM VAE layout",
            Layout::HfClip => "CLIP text model",
            Layout::OpenClip => "OpenCLIP text model",
            Layout::HfT5 => "T5 encoder",
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Diffusers tensor names → their sources, for one component.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyMap {
    entries: BTreeMap<String, Mapped>,
}

impl KeyMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `diffusers` to `source` through `op`.
    pub fn insert(&mut self, diffusers: impl Into<String>, source: impl Into<String>, op: Op) {
        self.entries.insert(diffusers.into(), Mapped { source: source.into(), op });
    }

    /// Maps `diffusers` to the whole tensor `source`.
    pub fn whole(&mut self, diffusers: impl Into<String>, source: impl Into<String>) {
        self.insert(diffusers, source, Op::Whole);
    }

    /// Maps `diffusers.{weight,bias}` to `source.{weight,bias}` (a linear, conv or norm layer).
    pub fn layer(&mut self, diffusers: &str, source: &str) {
        for p in ["weight", "bias"] {
            self.whole(format!("{diffusers}.{p}"), format!("{source}.{p}"));
        }
    }

    /// Maps each `<prefix><parts[i]>.{weight,bias}` to rows of the fused `source.{weight,bias}`,
    /// the parts stacked in order with the given row counts.
    pub fn split_layer(&mut self, prefix: &str, parts: &[&str], source: &str, rows: &[usize]) {
        for p in ["weight", "bias"] {
            let mut start = 0;
            for (name, &len) in parts.iter().zip(rows) {
                self.insert(format!("{prefix}{name}.{p}"), format!("{source}.{p}"), Op::Rows { start, len });
                start += len;
            }
        }
    }

    /// Maps `diffusers.{weight,bias}` to `source.{weight,bias}` with the halves swapped.
    pub fn swapped_layer(&mut self, diffusers: &str, source: &str) {
        for p in ["weight", "bias"] {
            self.insert(format!("{diffusers}.{p}"), format!("{source}.{p}"), Op::SwapHalves);
        }
    }

    /// The source of a diffusers tensor.
    pub fn get(&self, diffusers: &str) -> Option<&Mapped> {
        self.entries.get(diffusers)
    }

    /// Every (diffusers name, source), sorted by diffusers name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Mapped)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The number of diffusers tensors mapped.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first source key `header` lacks (a file cut short of its blocks, a foreign file),
    /// as `(diffusers name, source key)`.
    pub fn first_missing<'a>(&'a self, header: &Header) -> Option<(&'a str, &'a str)> {
        self.iter().find(|(_, m)| !header.contains(&m.source)).map(|(d, m)| (d, m.source.as_str()))
    }

    /// The shape each diffusers tensor will have, from the stored shapes (`None` when the
    /// source is missing).
    pub fn shape(&self, diffusers: &str, header: &Header) -> Option<Vec<usize>> {
        let m = self.get(diffusers)?;
        Some(m.op.shape_of(header.shape(&m.source)?))
    }
}

/// Where a layout's tensors start in a file: the prefix in front of its original names
/// (`model.diffusion_model.`, `first_stage_model.`, `text_encoders.clip_l.transformer.`, or
/// none), found from the layout's anchor tensor.
pub fn find_prefix(layout: Layout, header: &Header) -> Option<String> {
    let (anchor, prefixes) = layouts::anchor(layout);
    prefixes.iter().find(|p| header.contains(&format!("{p}{anchor}"))).map(|p| p.to_string())
}

/// The key map of `layout` for the file whose table is `header`: the prefix is found from the
/// layout's anchor tensor, block counts and fused-part sizes from the stored shapes. Every
/// source key in the map exists in `header`.
pub fn key_map(layout: Layout, header: &Header) -> Result<KeyMap> {
    let prefix = find_prefix(layout, header).ok_or_else(|| {
        let (anchor, prefixes) = layouts::anchor(layout);
        Error::invalid(format!("no {layout} in this file: no tensor {anchor} under any of the prefixes {prefixes:?}"))
    })?;
    key_map_at(layout, &prefix, header)
}

/// [`key_map`] for the tensors under a known `prefix`.
pub fn key_map_at(layout: Layout, prefix: &str, header: &Header) -> Result<KeyMap> {
    let map = layouts::build(layout, prefix, header)?;
    if let Some((diffusers, source)) = map.first_missing(header) {
        return Err(Error::invalid(format!(
            "the file lacks tensor {source} ({layout}; diffusers' {diffusers}): truncated, or not this layout"
        )));
    }
    Ok(map)
}

/// The shape of `name` in `header`, or an error naming it.
pub(crate) fn need_shape<'h>(header: &'h Header, name: &str, layout: Layout) -> Result<&'h [usize]> {
    header.shape(name).ok_or_else(|| Error::invalid(format!("the file lacks tensor {name} ({layout})")))
}

/// `dim` of `name`'s shape, or an error naming the tensor.
pub(crate) fn need_dim(header: &Header, name: &str, dim: usize, layout: Layout) -> Result<usize> {
    need_shape(header, name, layout)?
        .get(dim)
        .copied()
        .ok_or_else(|| Error::invalid(format!("tensor {name} ({layout}) has fewer than {} dimensions", dim + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ops_give_the_shapes_they_promise() {
        let t = Tensor::arange(0f32, 24., &Device::Cpu).unwrap().reshape((6, 4)).unwrap();
        let cases =
            [Op::Whole, Op::Rows { start: 2, len: 3 }, Op::SwapHalves, Op::Transpose, Op::Reshape(vec![6, 4, 1, 1])];
        for op in cases {
            let out = op.apply(t.clone()).unwrap();
            assert_eq!(out.dims(), op.shape_of(t.dims()).as_slice(), "{op:?}");
        }
        let swapped = Op::SwapHalves.apply(t.clone()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&swapped[..4], &[12., 13., 14., 15.]);
        let rows = Op::Rows { start: 1, len: 1 }.apply(t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(rows, [4., 5., 6., 7.]);
    }
}
