//! CLIP vision tower (transformers' `CLIPVisionModel` / `CLIPVisionModelWithProjection`, the
//! `image_encoder/` of Wan2.1's image-to-video repos: ViT-H/14, 257 tokens) and the
//! `CLIPImageProcessor` preprocessing of `image_processor/preprocessor_config.json`.
//!
//! Interface:
//! - `ClipVisionEncoder::load_weights(&ComponentWeights, &Device, DType) -> Result<ClipVisionEncoder>`
//! - `ClipVisionEncoder::forward(&self, pixel_values: &Tensor) -> Result<Tensor>`: `[B, 3, S, S]`
//!   to the penultimate layer's hidden states `[B, 1 + (S/p)^2, hidden]` (`hidden_states[-2]`,
//!   what `WanImageToVideoPipeline.encode_image` uses; no post-layernorm, no projection)
//! - `ClipImageProcessor::load(dir: &Path) -> Result<ClipImageProcessor>`,
//!   `ClipImageProcessor::preprocess(&self, image: &RgbImage) -> Result<Tensor>` `[1, 3, crop_h, crop_w]` f32
//!
//! candle-transformers' CLIP vision model does not fit: it knows only `quick_gelu` (ViT-H/14 uses
//! exact GELU) and returns no intermediate hidden states. The layers are the CLIP text encoder's
//! (`text::clip::EncoderLayer`), run without a mask. Only the first `num_hidden_layers - 1`
//! layers are loaded: the last one never contributes to the penultimate states.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use image::RgbImage;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::loading::config::read_config;
use crate::loading::weights::ComponentWeights;
use crate::pil_resize::Filter;
use crate::text::clip::{Activation, EncoderLayer};

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}
fn three() -> usize {
    3
}

/// The fields of a transformers `CLIPVisionConfig` (`image_encoder/config.json`) we use.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

/// The CLIP vision tower up to its penultimate layer.
pub struct ClipVisionEncoder {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    activation: Activation,
    config: ClipVisionConfig,
    dtype: DType,
    origin: String,
}

impl std::fmt::Debug for ClipVisionEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipVisionEncoder")
            .field("origin", &self.origin)
            .field("hidden_size", &self.config.hidden_size)
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl ClipVisionEncoder {
    pub fn load_weights(weights: &ComponentWeights, device: &Device, dtype: DType) -> Result<Self> {
        let config_path = weights.config_path().to_path_buf();
        let config: ClipVisionConfig = read_config(&config_path, "CLIP vision config")?;
        let activation = Activation::parse(&config.hidden_act, &config_path)?;
        let c = &config;
        if c.num_hidden_layers < 2
            || c.patch_size == 0
            || !c.image_size.is_multiple_of(c.patch_size)
            || c.num_attention_heads == 0
            || !c.hidden_size.is_multiple_of(c.num_attention_heads)
        {
            return Err(Error::BadModelFile {
                path: config_path.display().to_string(),
                reason: format!(
                    "CLIP vision config: {} layers (need 2+ for a penultimate layer), image {} / patch {}, hidden {} / \
                     {} heads must divide evenly",
                    c.num_hidden_layers, c.image_size, c.patch_size, c.hidden_size, c.num_attention_heads
                ),
            });
        }
        let vb = weights.var_builder(dtype, device)?.pp("vision_model");
        let (h, p) = (c.hidden_size, c.patch_size);
        let positions = (c.image_size / p).pow(2) + 1;
        let load = |vb: VarBuilder| -> candle_core::Result<_> {
            let emb = vb.pp("embeddings");
            let layers = (0..c.num_hidden_layers - 1)
                .map(|i| {
                    EncoderLayer::load_dims(
                        vb.pp(format!("encoder.layers.{i}")),
                        h,
                        c.intermediate_size,
                        c.layer_norm_eps,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((
                emb.get((h, c.num_channels, p, p), "patch_embedding.weight")?,
                emb.get(h, "class_embedding")?,
                emb.get((positions, h), "position_embedding.weight")?,
                candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
                layers,
            ))
        };
        let (patch_embedding, class_embedding, position_embedding, pre_layrnorm, layers) =
            load(vb).map_err(|e| weights.mismatch("CLIP vision", e))?;
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            activation,
            config,
            dtype,
            origin: weights.origin().to_string(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.patch_embedding.device()
    }

    /// `hidden_states[-2]` `[B, 1 + (S/p)^2, hidden]` for preprocessed `pixel_values` `[B, C, S, S]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let dims = pixel_values.dims();
        if dims.len() != 4 || dims[1] != c.num_channels || dims[2] != c.image_size || dims[3] != c.image_size {
            return Err(Error::invalid(format!(
                "CLIP vision: pixel values must be [B, {}, {1}, {1}], got {dims:?}",
                c.num_channels, c.image_size
            )));
        }
        let b = dims[0];
        let x = pixel_values.to_dtype(self.dtype)?;
        let patches = x.conv2d(&self.patch_embedding, 0, c.patch_size, 1, 1)?; // [B, H, g, g]
        let patches = patches.flatten_from(2)?.transpose(1, 2)?; // [B, g*g, H]
        let class = self.class_embedding.reshape((1, 1, c.hidden_size))?.broadcast_as((b, 1, c.hidden_size))?;
        let mut xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        xs = self.pre_layrnorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, None, c.num_attention_heads, self.activation)?;
        }
        Ok(xs)
    }
}

// ---------------------------------------------------------------------------------------
// CLIPImageProcessor
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
struct SizeSpec {
    shortest_edge: Option<usize>,
    height: Option<usize>,
    width: Option<usize>,
}

fn yes() -> bool {
    true
}
fn rescale() -> f64 {
    1.0 / 255.0
}
fn openai_mean() -> Vec<f64> {
    vec![0.48145466, 0.4578275, 0.40821073]
}
fn openai_std() -> Vec<f64> {
    vec![0.26862954, 0.26130258, 0.27577711]
}
fn bicubic() -> u32 {
    3
}

/// The fields of `preprocessor_config.json` (transformers' `CLIPImageProcessor`) we use.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipImageProcessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    size: Option<SizeSpec>,
    #[serde(default = "bicubic")]
    pub resample: u32,
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    crop_size: Option<SizeSpec>,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "openai_mean")]
    pub image_mean: Vec<f64>,
    #[serde(default = "openai_std")]
    pub image_std: Vec<f64>,
}

/// How to resize before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// The shorter side to this length, the aspect ratio kept (the longer side truncated).
    ShortestEdge(usize),
    /// Exactly `(height, width)`.
    Exact(usize, usize),
}

/// CLIPImageProcessor: resize with the config's filter (bicubic for CLIP; Pillow's antialiased
/// 8-bit resampling, what transformers' PIL backend runs; its torchvision backend can differ by
/// one level on some pixels), center crop, rescale to [0, 1], normalize per channel.
#[derive(Debug, Clone)]
pub struct ClipImageProcessor {
    resize: Option<ResizeTo>,
    filter: Filter,
    crop: Option<(usize, usize)>,
    rescale: Option<f64>,
    mean_std: Option<([f64; 3], [f64; 3])>,
    path: PathBuf,
}

impl ClipImageProcessor {
    /// Read `dir/preprocessor_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let c: ClipImageProcessorConfig = read_config(&path, "CLIP image processor config")?;
        let bad = |reason: String| Error::BadModelFile { path: path.display().to_string(), reason };
        let filter = match Filter::from_pil_code(c.resample) {
            Some(f) => f,
            None if !c.do_resize => Filter::Bicubic,
            None => {
                return Err(bad(format!("resample {} is not supported (1 lanczos, 2 bilinear, 3 bicubic)", c.resample)))
            }
        };
        let size_of = |s: &Option<SizeSpec>, what: &str| -> Result<ResizeTo> {
            match s {
                Some(SizeSpec { shortest_edge: Some(e), .. }) if *e > 0 => Ok(ResizeTo::ShortestEdge(*e)),
                Some(SizeSpec { height: Some(h), width: Some(w), .. }) if *h > 0 && *w > 0 => {
                    Ok(ResizeTo::Exact(*h, *w))
                }
                _ => Err(bad(format!("{what} needs shortest_edge or height and width"))),
            }
        };
        let resize = if c.do_resize { Some(size_of(&c.size, "size")?) } else { None };
        let crop = if c.do_center_crop {
            match size_of(&c.crop_size, "crop_size")? {
                ResizeTo::Exact(h, w) => Some((h, w)),
                ResizeTo::ShortestEdge(e) => Some((e, e)),
            }
        } else {
            None
        };
        let mean_std = if c.do_normalize {
            let three = |v: &[f64], what: &str| -> Result<[f64; 3]> {
                v.try_into().map_err(|_| bad(format!("{what} needs 3 entries, has {}", v.len())))
            };
            let std = three(&c.image_std, "image_std")?;
            if std.contains(&0.0) {
                return Err(bad("image_std has a zero entry".into()));
            }
            Some((three(&c.image_mean, "image_mean")?, std))
        } else {
            None
        };
        Ok(Self { resize, filter, crop, rescale: c.do_rescale.then_some(c.rescale_factor), mean_std, path })
    }

    /// `[1, 3, H, W]` f32 pixel values for `image`.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Tensor> {
        let (w0, h0) = image.dimensions();
        if w0 == 0 || h0 == 0 {
            return Err(Error::invalid(format!("CLIP image preprocessing ({}): empty image", self.path.display())));
        }
        let mut img = Pixels { w: w0 as usize, h: h0 as usize, data: image.as_raw().clone() };
        if let Some(to) = self.resize {
            let (h, w) = match to {
                ResizeTo::Exact(h, w) => (h, w),
                ResizeTo::ShortestEdge(e) => shortest_edge_size(img.h, img.w, e),
            };
            img = img.resize(h, w, self.filter);
        }
        if let Some((ch, cw)) = self.crop {
            img = img.center_crop(ch, cw);
        }
        let (h, w) = (img.h, img.w);
        let mut planar = vec![0f32; 3 * h * w];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for ch in 0..3 {
                let mut v = px[ch] as f64;
                if let Some(r) = self.rescale {
                    v *= r;
                }
                if let Some((mean, std)) = &self.mean_std {
                    v = (v - mean[ch]) / std[ch];
                }
                planar[ch * h * w + i] = v as f32;
            }
        }
        Ok(Tensor::from_vec(planar, (1, 3, h, w), &Device::Cpu)?)
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the shorter side to
/// `edge`, the longer one `int(edge * long / short)`.
fn shortest_edge_size(h: usize, w: usize, edge: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (edge as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (new_long, edge)
    } else {
        (edge, new_long)
    }
}

/// An 8-bit RGB image, row-major interleaved.
struct Pixels {
    w: usize,
    h: usize,
    data: Vec<u8>,
}

impl Pixels {
    /// Pillow's resize with `filter` (see [`crate::pil_resize`]).
    fn resize(self, h: usize, w: usize, filter: Filter) -> Pixels {
        let data = crate::pil_resize::resize_rgb(&self.data, self.w, self.h, w, h, filter);
        Pixels { w, h, data }
    }

    /// transformers' center crop: zero padding first (the odd pixel on top / left) where the
    /// crop is larger than the image.
    fn center_crop(self, ch: usize, cw: usize) -> Pixels {
        let (pad_top, pad_left) = (ch.saturating_sub(self.h).div_ceil(2), cw.saturating_sub(self.w).div_ceil(2));
        let (h, w) = (self.h.max(ch), self.w.max(cw));
        let top = (h - ch) / 2;
        let left = (w - cw) / 2;
        let mut out = vec![0u8; ch * cw * 3];
        for y in 0..ch {
            for x in 0..cw {
                // Position in the padded image, then in the source.
                let (py, px) = (y + top, x + left);
                if py < pad_top || px < pad_left || py - pad_top >= self.h || px - pad_left >= self.w {
                    continue;
                }
                let src = ((py - pad_top) * self.w + (px - pad_left)) * 3;
                out[(y * cw + x) * 3..(y * cw + x) * 3 + 3].copy_from_slice(&self.data[src..src + 3]);
            }
        }
        Pixels { w: cw, h: ch, data: out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_keeps_aspect() {
        assert_eq!(shortest_edge_size(480, 832, 224), (224, 388));
        assert_eq!(shortest_edge_size(45, 37, 28), (34, 28));
    }

    #[test]
    fn resize_of_a_flat_image_is_flat() {
        let img = Pixels { w: 7, h: 5, data: vec![200; 7 * 5 * 3] };
        let out = img.resize(3, 11, Filter::Bicubic);
        assert!(out.data.iter().all(|&v| v == 200));
    }
}
