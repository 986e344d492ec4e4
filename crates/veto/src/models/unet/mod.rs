//! diffusers' `UNet2DConditionModel` (SD1.5, SD2, SDXL and its distilled descendants),
//! config-driven, with attention guidance on the cross-attention layers and PAG on chosen
//! self-attention layers (see [`attention`]).
//!
//! The batch holds the rows a pipeline needs at once (`[cond]`, `[uncond, cond]`,
//! `[uncond, cond, perturbed]`, ...) and the trunk runs once over them. Guidance is described
//! per row: a [`NegativeContext`] says which rows' cross-attention also sees the negative text
//! and how they combine; [`Perturbation`] which rows' selected self-attention layers are identity.

pub mod attention;
pub mod blocks;
pub mod embeddings;

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::conv::{conv2d, group_norm, Conv2d, GroupNorm};
use serde::Deserialize;

pub use crate::guidance::NegativeContext;
pub use attention::{BlockContext, Perturbation};
use blocks::{BlockSpec, DownBlock, MidBlock, ResnetSpec, UpBlock};
use embeddings::sinusoidal;

use crate::error::{Error, Result};
use crate::loading::config::read_checked_config;
use crate::loading::weights::ComponentWeights;
use crate::models::layers::{MlpEmbedder, QuantizedWeights};

/// A config value that is either one value for every block or one per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, n: usize, key: &str) -> std::result::Result<Vec<T>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(format!("{key} has {} entries for {n} down blocks", v.len())),
        }
    }
}

/// `transformer_layers_per_block`: one depth, one per block, or one per block and layer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum LayerDepths {
    One(usize),
    Each(Vec<PerBlock<usize>>),
}

fn d_sample_size() -> Option<usize> {
    None
}
fn d_channels() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_down() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_up() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn d_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one() -> usize {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_tlayers() -> LayerDepths {
    LayerDepths::One(1)
}
fn d_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_kernel() -> usize {
    3
}

/// `unet/config.json`, with diffusers' defaults (those of SD1.5).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_sample_size")]
    pub sample_size: Option<usize>,
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: Option<PerBlock<bool>>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: LayerDepths,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock<usize>>>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// The number of heads per block, despite its name (a legacy of diffusers).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

/// The config after expanding per-block values and checking what we support.
#[derive(Debug, Clone)]
struct Resolved {
    layers: Vec<usize>,
    heads: Vec<usize>,
    cross: Vec<usize>,
    /// Transformer depth per down block and layer.
    down_depths: Vec<Vec<usize>>,
    /// Per up block (in up order) and layer (layers + 1 of them).
    up_depths: Vec<Vec<usize>>,
    mid_depths: Vec<usize>,
    groups: usize,
    text_time: Option<(usize, usize)>,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_checked_config(path, "UNet config", Self::resolve)
    }

    /// Whether this UNet takes SDXL's `text_embeds` + `time_ids` (`addition_embed_type: text_time`).
    pub fn has_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// The pooled text width SDXL's add embedding expects (`projection_class_embeddings_input_dim
    /// - 6 addition_time_embed_dim`), when `text_time` is used.
    pub fn pooled_text_dim(&self) -> Option<usize> {
        let time = self.addition_time_embed_dim?;
        self.projection_class_embeddings_input_dim?.checked_sub(6 * time).filter(|_| self.has_text_time())
    }

    /// The cross-attention width of the first block (all blocks share it in practice).
    pub fn context_dim(&self) -> usize {
        match &self.cross_attention_dim {
            PerBlock::One(d) => *d,
            PerBlock::Each(v) => v.first().copied().unwrap_or(0),
        }
    }

    fn resolve(&self) -> std::result::Result<Resolved, String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if !matches!(t.as_str(), "CrossAttnDownBlock2D" | "DownBlock2D") {
                return Err(format!(
                    "unsupported down block type {t:?} (supported: CrossAttnDownBlock2D, DownBlock2D)"
                ));
            }
        }
        for t in &self.up_block_types {
            if !matches!(t.as_str(), "CrossAttnUpBlock2D" | "UpBlock2D") {
                return Err(format!("unsupported up block type {t:?} (supported: CrossAttnUpBlock2D, UpBlock2D)"));
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(t) => {
                return Err(format!("unsupported mid_block_type {t:?} (supported: UNetMidBlock2DCrossAttn, null)"))
            }
        }
        let unsupported = |cond: bool, what: &str| {
            if cond {
                Err(format!("{what} is not supported"))
            } else {
                Ok(())
            }
        };
        unsupported(self.num_attention_heads.is_some(), "num_attention_heads (diffusers rejects it too)")?;
        unsupported(self.dual_cross_attention, "dual_cross_attention")?;
        unsupported(
            matches!(&self.only_cross_attention, Some(PerBlock::One(true)))
                || matches!(&self.only_cross_attention, Some(PerBlock::Each(v)) if v.iter().any(|&b| b)),
            "only_cross_attention",
        )?;
        unsupported(self.class_embed_type.is_some() || self.num_class_embeds.is_some(), "class embeddings")?;
        unsupported(self.encoder_hid_dim.is_some(), "encoder_hid_dim")?;
        unsupported(self.time_cond_proj_dim.is_some(), "time_cond_proj_dim (guidance-embedding LCM UNets)")?;
        unsupported(self.resnet_time_scale_shift != "default", "resnet_time_scale_shift other than \"default\"")?;
        unsupported(self.resnet_skip_time_act, "resnet_skip_time_act")?;
        unsupported(self.time_embedding_type != "positional", "time_embedding_type other than \"positional\"")?;
        unsupported(self.time_embedding_dim.is_some(), "time_embedding_dim")?;
        unsupported(self.time_embedding_act_fn.is_some(), "time_embedding_act_fn")?;
        unsupported(self.timestep_post_act.is_some(), "timestep_post_act")?;
        unsupported(self.act_fn != "silu", "act_fn other than \"silu\"")?;
        unsupported(self.attention_type != "default", "attention_type other than \"default\"")?;
        unsupported(self.cross_attention_norm.is_some(), "cross_attention_norm")?;
        unsupported(self.downsample_padding != 1, "downsample_padding other than 1")?;
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err("conv_in_kernel and conv_out_kernel must be odd".into());
        }
        let groups = self.norm_num_groups.ok_or("norm_num_groups null is not supported")?;
        if groups == 0 || self.block_out_channels.iter().any(|c| c % groups != 0) {
            return Err(format!(
                "block_out_channels {:?} must be multiples of norm_num_groups {groups}",
                self.block_out_channels
            ));
        }
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let t = self.addition_time_embed_dim.ok_or("text_time needs addition_time_embed_dim")?;
                let p = self
                    .projection_class_embeddings_input_dim
                    .ok_or("text_time needs projection_class_embeddings_input_dim")?;
                if p <= 6 * t {
                    return Err(format!(
                        "projection_class_embeddings_input_dim {p} leaves no room for text_embeds next to 6 x {t} time features"
                    ));
                }
                Some((t, p))
            }
            Some(other) => {
                return Err(format!("unsupported addition_embed_type {other:?} (supported: text_time, null)"))
            }
        };
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let heads = self.attention_head_dim.expand(n, "attention_head_dim")?;
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let per_block: Vec<PerBlock<usize>> = match &self.transformer_layers_per_block {
            LayerDepths::One(d) => vec![PerBlock::One(*d); n],
            LayerDepths::Each(v) if v.len() == n => v.clone(),
            LayerDepths::Each(v) => {
                return Err(format!("transformer_layers_per_block has {} entries for {n} blocks", v.len()))
            }
        };
        let down_depths = per_block
            .iter()
            .enumerate()
            .map(|(i, d)| d.expand(layers[i], "transformer_layers_per_block entry"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // diffusers hands the mid block (one layer) the last entry; a nested entry gives its
        // first value to that layer.
        let mid_depths = match &per_block[n - 1] {
            PerBlock::One(d) => vec![*d],
            PerBlock::Each(v) => vec![*v.first().ok_or("empty transformer_layers_per_block entry")?],
        };
        let reversed: Vec<PerBlock<usize>> = match &self.reverse_transformer_layers_per_block {
            Some(r) if r.len() == n => r.clone(),
            Some(r) => {
                return Err(format!("reverse_transformer_layers_per_block has {} entries for {n} blocks", r.len()))
            }
            None => per_block.iter().rev().cloned().collect(),
        };
        let up_depths = reversed
            .iter()
            .enumerate()
            .map(|(i, d)| d.expand(layers[n - 1 - i] + 1, "transformer_layers_per_block (up blocks)"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Resolved { layers, heads, cross, down_depths, up_depths, mid_depths, groups, text_time })
    }
}

/// The self-attention layers PAG perturbs, by module name
/// (`mid_block.attentions.0.transformer_blocks.0.attn1`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PagLayers {
    names: BTreeSet<String>,
}

impl PagLayers {
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Inputs of one UNet call.
pub struct UNetInputs<'a> {
    /// `[B, in_channels, h, w]` (already scaled by the scheduler).
    pub sample: &'a Tensor,
    /// The timestep every row is at, as the scheduler gives it.
    pub timestep: f64,
    /// `[B, T, cross_dim]`: each row's text context.
    pub encoder_hidden_states: &'a Tensor,
    /// SDXL: pooled text `[B, P]` and micro-conditioning `[B, 6]`.
    pub text_embeds: Option<&'a Tensor>,
    pub time_ids: Option<&'a Tensor>,
    /// The negative prompt (`states` `[rows.len(), T-, cross_dim]`) and this step's method.
    pub guidance: Option<&'a NegativeContext<'a>>,
    pub perturbation: Option<Perturbation<'a>>,
}

/// Named intermediate tensors for parity tests: `down_{i}`, `mid`, `up_{i}`.
pub type Trace = Vec<(String, Tensor)>;

pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: MlpEmbedder,
    add_embedding: Option<MlpEmbedder>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
    text_time: Option<(usize, usize)>,
}

impl UNet2DConditionModel {
    /// Build from a config and weights whose names are diffusers' (`down_blocks.0.resnets.0...`).
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let r = config.resolve().map_err(|reason| Error::BadModelFile { path: "unet/config.json".into(), reason })?;
        Ok(Self::build(config, &r, vb, &QuantizedWeights::none())?)
    }

    /// Build from a component's weights (quantized layers where the checkpoint is).
    pub fn load(
        config: &UNetConfig,
        weights: &ComponentWeights,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let r = config.resolve().map_err(|reason| Error::BadModelFile { path: "unet/config.json".into(), reason })?;
        let (vb, q) = weights.model_weights(dtype, device)?;
        Self::build(config, &r, vb, &q).map_err(|e| weights.mismatch("UNet", e))
    }

    fn build(config: &UNetConfig, r: &Resolved, vb: VarBuilder, q: &QuantizedWeights) -> candle_core::Result<Self> {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb_dim = ch[0] * 4;
        let pad = |k: usize| Conv2dConfig { padding: (k - 1) / 2, ..Default::default() };
        let conv_in =
            conv2d(config.in_channels, ch[0], config.conv_in_kernel, pad(config.conv_in_kernel), vb.pp("conv_in"))?;
        let time_embedding = MlpEmbedder::new(ch[0], temb_dim, vb.pp("time_embedding"), q)?;
        let add_embedding = match r.text_time {
            Some((_, proj)) => Some(MlpEmbedder::new(proj, temb_dim, vb.pp("add_embedding"), q)?),
            None => None,
        };
        let resnet = ResnetSpec {
            groups: r.groups,
            eps: config.norm_eps,
            temb_channels: temb_dim,
            output_scale_factor: config.resnet_out_scale_factor,
        };
        let spec = |i: usize, cross_attention: bool, layers: usize, depths: Vec<usize>| BlockSpec {
            cross_attention,
            layers,
            transformer_layers: depths,
            heads: r.heads[i],
            cross_attention_dim: r.cross[i],
            use_linear_projection: config.use_linear_projection,
            upcast_attention: config.upcast_attention,
            resnet,
        };

        // Down blocks, tracking the channels of every skip connection they leave.
        let mut skips = vec![ch[0]];
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let last = i + 1 == n;
            let cross = config.down_block_types[i] == "CrossAttnDownBlock2D";
            let name = format!("down_blocks.{i}");
            let s = spec(i, cross, r.layers[i], r.down_depths[i].clone());
            down_blocks.push(DownBlock::new(cin, ch[i], !last, &s, &name, vb.pp(&name), q)?);
            skips.extend(std::iter::repeat_n(ch[i], r.layers[i] + usize::from(!last)));
        }

        let mid_block = match config.mid_block_type {
            Some(_) => {
                let mut s = spec(n - 1, true, 1, r.mid_depths.clone());
                s.resnet.output_scale_factor = config.mid_block_scale_factor;
                Some(MidBlock::new(ch[n - 1], &s, vb.pp("mid_block"), q)?)
            }
            None => None,
        };

        // Up blocks, in reverse channel order, consuming the skips from the end.
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = ch[n - 1];
        for i in 0..n {
            let level = n - 1 - i;
            let cout = ch[level];
            let layers = r.layers[level] + 1;
            let take: Vec<usize> = (0..layers).map(|_| skips.pop().unwrap_or(0)).collect();
            let cross = config.up_block_types[i] == "CrossAttnUpBlock2D";
            let name = format!("up_blocks.{i}");
            let s = spec(level, cross, layers, r.up_depths[i].clone());
            up_blocks.push(UpBlock::new((prev, cout), &take, i + 1 < n, &s, &name, vb.pp(&name), q)?);
            prev = cout;
        }
        Ok(Self {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(r.groups, ch[0], config.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(
                ch[0],
                config.out_channels,
                config.conv_out_kernel,
                pad(config.conv_out_kernel),
                vb.pp("conv_out"),
            )?,
            config: config.clone(),
            text_time: r.text_time,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.conv_in.weight().dtype()
    }

    /// The names of every self-attention layer, in module order.
    pub fn self_attention_layers(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut add = |t: &attention::SpatialTransformer| {
            names.extend(t.blocks().iter().map(|b| b.self_attention_name().to_string()))
        };
        for d in &self.down_blocks {
            d.transformers().for_each(&mut add);
        }
        for u in &self.up_blocks {
            u.transformers().for_each(&mut add);
        }
        if let Some(m) = &self.mid_block {
            m.transformers().for_each(&mut add);
        }
        names
    }

    /// Resolve diffusers' `pag_applied_layers`: each entry is a regular expression searched in
    /// the self-attention module names (`mid` matches the mid block's), except that a match whose
    /// last components are different numbers is rejected, as diffusers does. For convenience a
    /// leading `down.` / `up.` is read as `down_blocks.` / `up_blocks.` (`down.1`,
    /// `up.0.attentions.0`); `mid` already matches `mid_block`. An entry that selects nothing is
    /// an error naming it.
    pub fn pag_layers(&self, applied: &[String]) -> Result<PagLayers> {
        let all = self.self_attention_layers();
        let mut names = BTreeSet::new();
        for raw in applied {
            let id = expand_layer_shorthand(raw.trim());
            let re = tokenizers::utils::SysRegex::new(&id)
                .map_err(|e| Error::invalid(format!("PAG layer '{raw}' is not a valid pattern: {e}")))?;
            let mut matched = false;
            for name in &all {
                if re.find_iter(name).next().is_some() && !fake_integral_match(&id, name) {
                    matched = true;
                    names.insert(name.clone());
                }
            }
            if !matched {
                return Err(Error::invalid(format!(
                    "PAG layer '{raw}' matches no self-attention layer (e.g. mid, down.1, up.0.attentions.0; layers: {})",
                    all.join(", ")
                )));
            }
        }
        Ok(PagLayers { names })
    }

    /// The UNet output (noise / v prediction) `[B, out_channels, h, w]`.
    pub fn forward(&self, inputs: &UNetInputs) -> Result<Tensor> {
        self.forward_traced(inputs, None)
    }

    /// As [`forward`](Self::forward), recording each block's output (all rows) when `trace` is given.
    pub fn forward_traced(&self, inputs: &UNetInputs, mut trace: Option<&mut Trace>) -> Result<Tensor> {
        let x = inputs.sample;
        let (b, c, _, _) =
            x.dims4().map_err(|_| Error::invalid(format!("UNet sample must be [B, C, H, W], got {:?}", x.dims())))?;
        if c != self.config.in_channels {
            return Err(Error::invalid(format!("UNet expects {} input channels, got {c}", self.config.in_channels)));
        }
        let ctx_dims = inputs.encoder_hidden_states.dims();
        if ctx_dims.len() != 3 || ctx_dims[0] != b || ctx_dims[2] != self.context_dim() {
            return Err(Error::invalid(format!(
                "UNet encoder_hidden_states must be [{b}, T, {}], got {ctx_dims:?}",
                self.context_dim()
            )));
        }
        if let Some(g) = inputs.guidance {
            if g.states.rank() != 3 || g.states.dim(2)? != self.context_dim() || g.check_rows(b).is_err() {
                return Err(Error::invalid(format!(
                    "guided rows {:?} / negative context {:?} do not fit a batch of {b} with context width {}",
                    g.rows,
                    g.states.dims(),
                    self.context_dim()
                )));
            }
        }
        if let Some(p) = &inputs.perturbation {
            if p.rows.end > b {
                return Err(Error::invalid(format!("perturbed rows {:?} exceed the batch of {b}", p.rows)));
            }
        }
        let dtype = x.dtype();
        let device = x.device();

        // Time embedding (features in f32, cast to the model dtype as diffusers does).
        let t_feat = sinusoidal(
            &vec![inputs.timestep; b],
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            device,
        )?
        .to_dtype(dtype)?;
        let mut temb = self.time_embedding.forward(&t_feat)?;
        if let (Some(add), Some((time_dim, proj))) = (&self.add_embedding, self.text_time) {
            let (Some(text), Some(ids)) = (inputs.text_embeds, inputs.time_ids) else {
                return Err(Error::invalid("this UNet (addition_embed_type text_time) needs text_embeds and time_ids"));
            };
            let pooled = proj - 6 * time_dim;
            if text.dims() != [b, pooled] || ids.dims() != [b, 6] {
                return Err(Error::invalid(format!(
                    "text_embeds {:?} / time_ids {:?} must be [{b}, {pooled}] / [{b}, 6]",
                    text.dims(),
                    ids.dims()
                )));
            }
            let ids: Vec<f64> = ids.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            let time = sinusoidal(&ids, time_dim, self.config.flip_sin_to_cos, self.config.freq_shift, device)?
                .reshape((b, 6 * time_dim))?;
            let add_in = Tensor::cat(&[&text.to_dtype(DType::F32)?, &time], 1)?.to_dtype(dtype)?;
            temb = (temb + add.forward(&add_in)?)?;
        }

        let ctx = BlockContext {
            context: inputs.encoder_hidden_states,
            guidance: inputs.guidance,
            perturbation: inputs.perturbation.clone(),
        };
        let mut record = |name: String, t: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push((name, t.clone()));
            }
        };

        let x = if self.config.center_input_sample { ((x * 2.0)? - 1.0)? } else { x.clone() };
        let mut x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, res) = block.forward(&x, &temb, &ctx)?;
            x = out;
            skips.extend(res);
            record(format!("down_{i}"), &x);
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &temb, &ctx)?;
            record("mid".into(), &x);
        }
        let n = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len().saturating_sub(block.num_layers());
            // Upsample to the size of the skip the next block starts with (2x unless odd).
            let target = if i + 1 < n && remaining > 0 {
                let (_, _, th, tw) = skips[remaining - 1].dims4()?;
                Some((th, tw))
            } else {
                None
            };
            x = block.forward(&x, &mut skips, &temb, &ctx, target)?;
            record(format!("up_{i}"), &x);
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        Ok(self.conv_out.forward(&x)?)
    }

    fn context_dim(&self) -> usize {
        self.config.context_dim()
    }
}

/// `down.1` -> `down_blocks.1`, `up.0.attentions.0` -> `up_blocks.0.attentions.0`.
fn expand_layer_shorthand(id: &str) -> String {
    for (short, long) in [("down.", "down_blocks."), ("up.", "up_blocks.")] {
        if let Some(rest) = id.strip_prefix(short) {
            return format!("{long}{rest}");
        }
    }
    id.to_string()
}

/// diffusers' `is_fake_integral_match`: both the id and the name end in numbers, different ones
/// (`blocks.1` must not select `blocks.10`). Self-attention names end in `attn1`, so this only
/// matters for ids that are plain numbers.
fn fake_integral_match(id: &str, name: &str) -> bool {
    let last = |s: &str| s.rsplit('.').next().unwrap_or("").to_string();
    let (a, b) = (last(id), last(name));
    !a.is_empty()
        && !b.is_empty()
        && a.chars().all(|c| c.is_ascii_digit())
        && b.chars().all(|c| c.is_ascii_digit())
        && a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_shorthand() {
        assert_eq!(expand_layer_shorthand("down.1"), "down_blocks.1");
        assert_eq!(expand_layer_shorthand("up.0.attentions.0"), "up_blocks.0.attentions.0");
        assert_eq!(expand_layer_shorthand("mid"), "mid");
    }

    #[test]
    fn config_defaults_are_sd15() {
        let c: UNetConfig = serde_json::from_str("{}").unwrap();
        let r = c.resolve().unwrap();
        assert_eq!(r.layers, vec![2; 4]);
        assert_eq!(r.heads, vec![8; 4]);
        assert_eq!(r.up_depths, vec![vec![1; 3]; 4]);
        assert!(!c.has_text_time());
    }

    #[test]
    fn sdxl_style_config() {
        let c: UNetConfig = serde_json::from_str(
            r#"{"block_out_channels":[320,640,1280],"layers_per_block":2,"attention_head_dim":[5,10,20],
                "down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
                "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
                "transformer_layers_per_block":[1,2,10],"cross_attention_dim":2048,
                "addition_embed_type":"text_time","addition_time_embed_dim":256,
                "projection_class_embeddings_input_dim":2816,"use_linear_projection":true}"#,
        )
        .unwrap();
        let r = c.resolve().unwrap();
        assert_eq!(r.mid_depths, vec![10]);
        assert_eq!(r.up_depths[0], vec![10; 3]);
        assert_eq!(c.pooled_text_dim(), Some(1280));
    }

    #[test]
    fn rejects_unknown_blocks() {
        let c: UNetConfig = serde_json::from_str(
            r#"{"block_out_channels":[32],"down_block_types":["SimpleCrossAttnDownBlock2D"],"up_block_types":["UpBlock2D"]}"#,
        )
        .unwrap();
        assert!(c.resolve().unwrap_err().contains("SimpleCrossAttnDownBlock2D"));
    }
}
