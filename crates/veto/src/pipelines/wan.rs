//! Wan2.1 text-to-video and image-to-video: the pieces of diffusers' `WanPipeline` /
//! `WanImageToVideoPipeline` between the encoders and the VAE: the frame count rule (4k+1,
//! rounded with a warning), the latent shape, the text conditioning each method needs, and the
//! denoising loop ([`denoise`]: UniPC or FlowMatch Euler, CFG batched `[uncond, cond]`, the
//! attention method on the conditional row while its window is open).
//!
//! Conditioning as the official code builds it:
//! - plain / CFG: the prompt (and the CFG negative prompt) as UMT5 states padded with zero rows
//!   to `max_sequence_length` (512);
//! - NAG / NASA: the NAG negative padded the same way, attended by the conditional row's
//!   queries in every `attn2` (the official NAG Wan processor);
//! - VSF: the negative prompt unpadded (its `n` real rows), the prompt padded to `512 - n`, so
//!   the context `[P, N]` keeps 512 rows (the official VSF Wan code); no CFG.

use candle_core::{DType, Tensor};

use super::{StepEvent, Warnings};
use crate::error::{Error, Result};
use crate::guidance::{GuidancePlanner, NegativeContext};
use crate::models::wan::{WanInputs, WanTransformer3DModel};
use crate::schedulers::scheduler::{NoNoise, Scheduler};

/// The text rows the Wan pipelines pad to (`max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 512;
/// The VAE's temporal compression: frame counts are `4k + 1`.
pub const TEMPORAL_FACTOR: usize = 4;
/// The VAE's spatial compression.
pub const SPATIAL_FACTOR: usize = 8;
/// Height and width must be multiples of this (the VAE's 8 times the transformer's 2x2 patch).
pub const SIZE_MULTIPLE: usize = 16;

/// diffusers' frame rule: a count that is not `4k + 1` becomes `frames / 4 * 4 + 1`, with a
/// warning; at least 1.
pub fn round_frames(frames: usize, warnings: &mut Warnings) -> usize {
    if frames % TEMPORAL_FACTOR == 1 {
        return frames;
    }
    let rounded = (frames / TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1).max(1);
    warnings.push(format!(
        "--frames {frames}: Wan generates 4k+1 frames (frames - 1 divisible by {TEMPORAL_FACTOR}); rounded to {rounded} as diffusers does"
    ));
    rounded
}

/// The latent video shape `[1, channels, (frames - 1) / 4 + 1, height / 8, width / 8]`, after
/// checking the size.
pub fn latent_shape(channels: usize, frames: usize, height: usize, width: usize) -> Result<[usize; 5]> {
    if height == 0 || width == 0 || height % SIZE_MULTIPLE != 0 || width % SIZE_MULTIPLE != 0 {
        return Err(Error::invalid(format!(
            "Wan: height and width must be positive multiples of {SIZE_MULTIPLE}, got {height}x{width}"
        )));
    }
    if frames == 0 || frames % TEMPORAL_FACTOR != 1 {
        return Err(Error::invalid(format!("Wan: {frames} frames is not 4k+1")));
    }
    Ok([1, channels, (frames - 1) / TEMPORAL_FACTOR + 1, height / SPATIAL_FACTOR, width / SPATIAL_FACTOR])
}

/// VSF's context from the encoded prompts: the prompt's first `rows - n` rows (its real tokens
/// and zero padding) and the negative's `n` real rows. `positive`: `[1, rows, D]` padded;
/// `negative_unpadded`: `[1, n, D]`.
pub fn vsf_context(positive: &Tensor, negative_unpadded: &Tensor) -> Result<Tensor> {
    let (rows, n) = (positive.dim(1)?, negative_unpadded.dim(1)?);
    if n == 0 || n >= rows {
        return Err(Error::invalid(format!(
            "VSF: the negative prompt has {n} tokens; it needs 1 to {} beside the prompt's {rows} rows",
            rows - 1
        )));
    }
    Ok(positive.narrow(1, 0, rows - n)?)
}

/// The conditioning of one Wan run, as the transformer receives it.
pub struct WanConditioning {
    /// The prompt, `[1, L, text_dim]` (VSF: `[1, L - n, text_dim]`, see [`vsf_context`]).
    pub positive: Tensor,
    /// CFG's unconditional context `[1, L, text_dim]` (the negative prompt, padded).
    pub uncond: Option<Tensor>,
    /// The attention method's negative: NAG / NASA `[1, L, text_dim]` padded, VSF `[1, n, text_dim]`.
    pub negative: Option<Tensor>,
    /// I2V: the CLIP vision states `[1, 257, image_dim]`.
    pub image: Option<Tensor>,
    /// I2V: the mask and image latents `[1, 20, F', H', W']` concatenated after the latents.
    pub condition: Option<Tensor>,
}

/// WanPipeline's denoising loop from `latents` (`[1, 16, F', H', W']`, f32): per step the plan of
/// `planner`, one transformer call (CFG: batch `[uncond, cond]`, the method on the cond row),
/// CFG's combination, the scheduler step. The scheduler must be set to its timesteps.
pub fn denoise(
    model: &WanTransformer3DModel,
    scheduler: &mut dyn Scheduler,
    planner: &mut GuidancePlanner,
    cond: &WanConditioning,
    mut latents: Tensor,
    on_step: &mut dyn FnMut(StepEvent),
) -> Result<Tensor> {
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len();
    for (index, &t) in timesteps.iter().enumerate() {
        let plan = planner.step(t);
        let input = match &cond.condition {
            Some(c) => Tensor::cat(&[&latents, &c.to_dtype(latents.dtype())?], 1)?,
            None => latents.clone(),
        };
        let (input, context, cond_row) = match (plan.cfg_scale, &cond.uncond) {
            (Some(_), Some(uncond)) => {
                (Tensor::cat(&[&input, &input], 0)?, Tensor::cat(&[uncond, &cond.positive], 0)?, 1)
            }
            (Some(_), None) => return Err(Error::invalid("CFG runs but no negative prompt was encoded")),
            (None, _) => (input, cond.positive.clone(), 0),
        };
        let negative = match (&plan.attention, &cond.negative) {
            (Some(method), Some(states)) => {
                Some(NegativeContext { method, states, pooled: None, rows: cond_row..cond_row + 1 })
            }
            (Some(_), None) => {
                return Err(Error::invalid("attention guidance runs but no negative prompt was encoded"))
            }
            (None, _) => None,
        };
        let out = model.forward(&WanInputs {
            latents: &input,
            timestep: t,
            context: &context,
            image: cond.image.as_ref(),
            guidance: negative.as_ref(),
        })?;
        let (c, u, _) = super::split_guidance_rows(&out, cond_row, false)?;
        let pred = plan.combine_outputs(&c, u.as_ref(), None)?;
        latents = scheduler.step(&pred, &latents, &mut NoNoise)?.to_dtype(DType::F32)?;
        on_step(StepEvent { index, total, timestep: t, attention_guided: plan.attention.is_some(), latents: &latents });
    }
    Ok(latents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn frames_round_like_diffusers() {
        let mut w = Warnings::default();
        assert_eq!(round_frames(81, &mut w), 81);
        assert!(w.clone().into_vec().is_empty());
        assert_eq!(round_frames(80, &mut w), 81);
        assert_eq!(round_frames(83, &mut w), 81);
        assert_eq!(round_frames(3, &mut w), 1);
        assert_eq!(w.into_vec().len(), 3);
    }

    #[test]
    fn latent_shapes_and_size_errors() {
        assert_eq!(latent_shape(16, 81, 480, 832).unwrap(), [1, 16, 21, 60, 104]);
        assert!(latent_shape(16, 81, 480, 840).unwrap_err().to_string().contains("multiples of 16"));
        assert!(latent_shape(16, 80, 480, 832).unwrap_err().to_string().contains("4k+1"));
    }

    #[test]
    fn vsf_context_keeps_the_row_count() {
        let p = Tensor::zeros((1, 512, 8), DType::F32, &Device::Cpu).unwrap();
        let n = Tensor::zeros((1, 12, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(vsf_context(&p, &n).unwrap().dim(1).unwrap(), 500);
        let too_long = Tensor::zeros((1, 512, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(vsf_context(&p, &too_long).is_err());
    }
}
