//! The UNet's convolutional blocks (diffusers `ResnetBlock2D`, `Downsample2D`, `Upsample2D`)
//! and the down / mid / up blocks that stack them with [`SpatialTransformer`]s
//! (`CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`,
//! `UpBlock2D`; a down or up block "with cross-attention" is the plain one plus one
//! transformer after each resnet).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::conv::{conv2d, group_norm, Conv2d, GroupNorm};

use crate::models::layers::{linear, Linear, QuantizedWeights};

use super::attention::{BlockContext, SpatialTransformer, TransformerSpec};
use crate::profile;

fn conv3x3(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 3, Conv2dConfig { padding: 1, stride, ..Default::default() }, vb)
}

/// `ResnetBlock2D` with the default time-embedding norm: GroupNorm, SiLU, conv, `+ temb`,
/// GroupNorm, SiLU, conv, plus the (1x1-projected when the width changes) input, divided by
/// `output_scale_factor`.
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// The settings every resnet of the UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: usize,
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    pub fn new(cin: usize, cout: usize, spec: ResnetSpec, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        let shortcut =
            if cin != cout { Some(conv2d(cin, cout, 1, Default::default(), vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self {
            norm1: group_norm(spec.groups, cin, spec.eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, 1, vb.pp("conv1"))?,
            time_emb_proj: linear(spec.temb_channels, cout, vb.pp("time_emb_proj"), q)?,
            norm2: group_norm(spec.groups, cout, spec.eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, 1, vb.pp("conv2"))?,
            shortcut,
            output_scale_factor: spec.output_scale_factor,
        })
    }

    /// `x` `[B, C, H, W]`, `temb` `[B, temb_channels]`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self.time_emb_proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// One resnet, optionally followed by a transformer.
struct Layer {
    resnet: ResnetBlock,
    attention: Option<SpatialTransformer>,
}

impl Layer {
    fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let x = self.resnet.forward(x, temb)?;
        match &self.attention {
            Some(a) => a.forward(&x, ctx),
            None => Ok(x),
        }
    }
}

/// What distinguishes one down/up block from another.
pub struct BlockSpec {
    pub cross_attention: bool,
    pub layers: usize,
    /// Transformer depth per layer (`transformer_layers_per_block`).
    pub transformer_layers: Vec<usize>,
    pub heads: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub resnet: ResnetSpec,
}

impl BlockSpec {
    fn transformer(&self, channels: usize, layer: usize, name: String) -> TransformerSpec {
        TransformerSpec {
            channels,
            heads: self.heads,
            layers: self.transformer_layers[layer],
            cross_attention_dim: self.cross_attention_dim,
            norm_num_groups: self.resnet.groups,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
            name,
        }
    }
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
pub struct DownBlock {
    layers: Vec<Layer>,
    downsample: Option<Conv2d>,
}

impl DownBlock {
    /// `name`: `down_blocks.{i}`.
    pub fn new(
        cin: usize,
        cout: usize,
        add_downsample: bool,
        spec: &BlockSpec,
        name: &str,
        vb: VarBuilder,
        q: &QuantizedWeights,
    ) -> Result<Self> {
        let layers = (0..spec.layers)
            .map(|j| {
                let resnet = ResnetBlock::new(
                    if j == 0 { cin } else { cout },
                    cout,
                    spec.resnet,
                    vb.pp(format!("resnets.{j}")),
                    q,
                )?;
                let attention = if spec.cross_attention {
                    let aname = format!("{name}.attentions.{j}");
                    Some(SpatialTransformer::new(
                        &spec.transformer(cout, j, aname),
                        vb.pp(format!("attentions.{j}")),
                        q,
                    )?)
                } else {
                    None
                };
                Ok(Layer { resnet, attention })
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample =
            if add_downsample { Some(conv3x3(cout, cout, 2, vb.pp("downsamplers.0.conv"))?) } else { None };
        Ok(Self { layers, downsample })
    }

    /// The block output and the skip connections it leaves (one per layer, plus the
    /// downsampled map).
    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &BlockContext) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut skips = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            x = layer.forward(&x, temb, ctx)?;
            skips.push(x.clone());
        }
        if let Some(conv) = &self.downsample {
            x = conv.forward(&x)?;
            skips.push(x.clone());
        }
        Ok((x, skips))
    }

    pub(crate) fn transformers(&self) -> impl Iterator<Item = &SpatialTransformer> {
        self.layers.iter().filter_map(|l| l.attention.as_ref())
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer.
pub struct MidBlock {
    first: ResnetBlock,
    layers: Vec<(SpatialTransformer, ResnetBlock)>,
}

impl MidBlock {
    pub fn new(channels: usize, spec: &BlockSpec, vb: VarBuilder, q: &QuantizedWeights) -> Result<Self> {
        let first = ResnetBlock::new(channels, channels, spec.resnet, vb.pp("resnets.0"), q)?;
        let layers = (0..spec.layers)
            .map(|j| {
                let t = SpatialTransformer::new(
                    &spec.transformer(channels, j, format!("mid_block.attentions.{j}")),
                    vb.pp(format!("attentions.{j}")),
                    q,
                )?;
                let r = ResnetBlock::new(channels, channels, spec.resnet, vb.pp(format!("resnets.{}", j + 1)), q)?;
                Ok((t, r))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { first, layers })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let mut x = self.first.forward(x, temb)?;
        for (t, r) in &self.layers {
            x = r.forward(&t.forward(&x, ctx)?, temb)?;
        }
        Ok(x)
    }

    pub(crate) fn transformers(&self) -> impl Iterator<Item = &SpatialTransformer> {
        self.layers.iter().map(|(t, _)| t)
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`: each layer takes the previous output concatenated with
/// one skip connection (last in, first out), then nearest 2x upsampling and a 3x3 conv.
pub struct UpBlock {
    layers: Vec<Layer>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    /// `(prev, cout)`: channels coming from below and going out; `skip_channels(j)`: channels of
    /// the j-th skip this block consumes. `name`: `up_blocks.{i}`.
    pub fn new(
        (prev, cout): (usize, usize),
        skip_channels: &[usize],
        add_upsample: bool,
        spec: &BlockSpec,
        name: &str,
        vb: VarBuilder,
        q: &QuantizedWeights,
    ) -> Result<Self> {
        let layers = (0..spec.layers)
            .map(|j| {
                let cin = if j == 0 { prev } else { cout } + skip_channels[j];
                let resnet = ResnetBlock::new(cin, cout, spec.resnet, vb.pp(format!("resnets.{j}")), q)?;
                let attention = if spec.cross_attention {
                    let aname = format!("{name}.attentions.{j}");
                    Some(SpatialTransformer::new(
                        &spec.transformer(cout, j, aname),
                        vb.pp(format!("attentions.{j}")),
                        q,
                    )?)
                } else {
                    None
                };
                Ok(Layer { resnet, attention })
            })
            .collect::<Result<Vec<_>>>()?;
        let upsample = if add_upsample { Some(conv3x3(cout, cout, 1, vb.pp("upsamplers.0.conv"))?) } else { None };
        Ok(Self { layers, upsample })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `skips` are consumed from the end. `upsample_to`: the spatial size after upsampling
    /// (the next skip's size, which is 2x except for odd sizes).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &BlockContext,
        upsample_to: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            let skip =
                skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet: ran out of skip connections".into()))?;
            x = profile::cat(&[&x, &skip], 1)?;
            x = layer.forward(&x, temb, ctx)?;
        }
        if let Some(conv) = &self.upsample {
            let (_, _, h, w) = x.dims4()?;
            let (th, tw) = upsample_to.unwrap_or((2 * h, 2 * w));
            x = conv.forward(&x.upsample_nearest2d(th, tw)?)?;
        }
        Ok(x)
    }

    pub(crate) fn transformers(&self) -> impl Iterator<Item = &SpatialTransformer> {
        self.layers.iter().filter_map(|l| l.attention.as_ref())
    }
}
