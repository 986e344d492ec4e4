//! SANA-Sprint's sampling loop (diffusers' `SanaSprintPipeline.__call__`, steps 5-7): the
//! TrigFlow angle of each step mapped to the SCM timestep the transformer takes, the latents
//! rescaled around the model, and [`ScmScheduler`] re-noising between steps. There is no CFG:
//! the guidance scale goes into the transformer's guidance embedding; NAG / NASA / VSF act on the
//! cross-attention as for SANA, through [`SanaInputs::guidance`].

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::guidance::NegativeContext;
use crate::models::sana::{SanaInputs, SanaTransformer2DModel};
use crate::schedulers::scheduler::NoiseSource;
use crate::schedulers::scm::ScmScheduler;

/// The most steps SANA-Sprint was distilled for (its model card: 1-4); more run, with a warning.
pub const MAX_SUPPORTED_STEPS: usize = 4;

/// The warning for a step count beyond [`MAX_SUPPORTED_STEPS`], if any.
pub fn steps_warning(steps: usize) -> Option<String> {
    (steps > MAX_SUPPORTED_STEPS).then(|| {
        format!(
            "SANA-Sprint is distilled for 1-{MAX_SUPPORTED_STEPS} steps; {steps} steps run on linspace(1.5708, 0) \
             angles the model was not trained for and usually look worse"
        )
    })
}

/// diffusers' map from a TrigFlow angle to the transformer's timestep and input scale:
/// `scm = sin t / (cos t + sin t)`, input times `sqrt(scm^2 + (1 - scm)^2)` (f32, as torch).
pub fn scm_timestep(angle: f64) -> (f32, f32) {
    let t = angle as f32;
    let scm = t.sin() / (t.cos() + t.sin());
    (scm, (scm * scm + (1.0 - scm) * (1.0 - scm)).sqrt())
}

/// One Sprint model call at TrigFlow angle `angle`: the latents `x` (`[B, C, h, w]`, f32, on
/// the scheduler's scale) mapped to the model's input and SCM timestep, the transformer, and its
/// output mapped back to the velocity [`ScmScheduler`] steps with (times `sigma_data`). `inputs`
/// gives the caption and guidance; its latents and timestep are replaced.
pub fn sprint_velocity(
    model: &SanaTransformer2DModel,
    x: &Tensor,
    angle: f64,
    sigma_data: f64,
    inputs: &SanaInputs,
) -> Result<Tensor> {
    let (scm, scale) = scm_timestep(angle);
    let input = ((x / sigma_data)? * f64::from(scale))?;
    let out = model.forward(&SanaInputs {
        latents: &input.to_dtype(model.dtype())?,
        timestep: f64::from(scm),
        caption: inputs.caption,
        caption_lens: inputs.caption_lens,
        guidance: inputs.guidance,
        embedded_guidance: inputs.embedded_guidance,
        perturbation: None,
    })?;
    let a = f64::from(1.0 - 2.0 * scm);
    let b = f64::from(1.0 - 2.0 * scm + 2.0 * scm * scm);
    let flow = (((input * a)? + (out * b)?)? / f64::from(scale))?;
    Ok((flow * sigma_data)?)
}

/// One Sprint run's text inputs (one row).
pub struct SprintConditioning<'a> {
    /// `[1, L, caption_channels]` prompt states, all tokens real.
    pub caption: &'a Tensor,
    /// NAG / NASA / VSF on the cross-attention (row 0).
    pub guidance: Option<&'a NegativeContext<'a>>,
    /// `guidance_scale` (diffusers' default 4.5); the model gets it times `guidance_embeds_scale`.
    pub guidance_scale: f64,
}

/// What the loop returns: the latents after each step and the final latents (`denoised /
/// sigma_data`, what the VAE decodes).
pub struct SprintRun {
    pub steps: Vec<Tensor>,
    pub latents: Tensor,
}

/// The denoising loop from standard-normal `init` latents `[1, C, h, w]` (f32), with
/// `scheduler` already set to its timesteps; one noise draw per step from `noise`.
pub fn denoise(
    model: &SanaTransformer2DModel,
    scheduler: &mut ScmScheduler,
    init: &Tensor,
    cond: &SprintConditioning,
    noise: &mut dyn NoiseSource,
) -> Result<SprintRun> {
    let config = model.config();
    if !config.guidance_embeds {
        return Err(Error::invalid(
            "this SANA transformer has no guidance embedding (guidance_embeds false): it is not a SANA-Sprint model",
        ));
    }
    let sigma_data = scheduler.sigma_data();
    let angles: Vec<f64> = scheduler.angles().to_vec();
    if angles.len() < 2 {
        return Err(Error::invalid("SCMScheduler: set_timesteps was not called"));
    }
    let guidance = f64::from(cond.guidance_scale as f32) * config.guidance_embeds_scale;
    let lens = [cond.caption.dim(1)?];
    let mut latents = (init.to_dtype(candle_core::DType::F32)? * sigma_data)?;
    let mut steps = Vec::with_capacity(angles.len() - 1);
    let mut denoised = None;
    for &angle in &angles[..angles.len() - 1] {
        let inputs = SanaInputs {
            latents: &latents,
            timestep: 0.0,
            caption: cond.caption,
            caption_lens: &lens,
            guidance: cond.guidance,
            embedded_guidance: Some(guidance),
            perturbation: None,
        };
        let flow = sprint_velocity(model, &latents, angle, sigma_data, &inputs)?;
        let (prev, x0) = scheduler.step_with_x0(&flow, &latents, noise)?;
        latents = prev;
        steps.push(latents.clone());
        denoised = Some(x0);
    }
    let denoised = denoised.ok_or_else(|| Error::invalid("SANA-Sprint: no steps to run"))?;
    Ok(SprintRun { steps, latents: (denoised / sigma_data)? })
}
