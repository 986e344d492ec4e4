//! The denoising loop PixArt-Σ and SANA share: DiTs that read the caption through
//! cross-attention, one transformer call per step on the rows the guidance needs
//! (`[uncond?, cond, perturbed?]`), NAG / NASA / VSF on the cond row's cross-attention, PAG's
//! identity self-attention on the perturbed row. What differs (the timestep's scale, the
//! learned-sigma channels, SANA-Sprint's SCM wrapper) stays in the family's closure.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::families::Family;
use crate::guidance::{GuidancePlan, GuidancePlanner, NegativeContext};
use crate::models::pixart::Perturbation;
use crate::pipelines::noise::StepNoise;
use crate::pipelines::sampling::describe;
use crate::pipelines::{ResolvedRequest, StepEvent, Warnings};
use crate::schedulers::scheduler::Scheduler;

/// The caption rows of one run, `[uncond?, cond, perturbed?]`: the negative prompt first with
/// CFG, the positive prompt again for PAG's perturbed pass; padded to one length (zeros after
/// each row's tokens, which the cross-attention masks).
pub(crate) struct CaptionRows {
    caption: Tensor,
    lens: Vec<usize>,
    cond_row: usize,
    perturbed: bool,
}

impl CaptionRows {
    /// `negative` makes the uncond row when `Some` (pass it only when CFG runs).
    pub(crate) fn new(positive: &Tensor, negative: Option<&Tensor>, perturbed: bool) -> Result<Self> {
        let mut rows: Vec<&Tensor> = negative.into_iter().collect();
        let cond_row = rows.len();
        rows.push(positive);
        if perturbed {
            rows.push(positive);
        }
        let (caption, lens) = pad_rows(&rows)?;
        Ok(Self { caption, lens, cond_row, perturbed })
    }

    fn count(&self) -> usize {
        self.lens.len()
    }
}

/// Rows of different lengths `[1, L_i, C]` as one `[B, max L, C]` (zeros after each row's
/// tokens) and their lengths.
fn pad_rows(rows: &[&Tensor]) -> Result<(Tensor, Vec<usize>)> {
    let lens: Vec<usize> = rows.iter().map(|r| r.dim(1)).collect::<candle_core::Result<_>>()?;
    let max = lens.iter().copied().max().unwrap_or(0);
    let padded = rows
        .iter()
        .zip(&lens)
        .map(|(r, &l)| if l == max { Ok((*r).clone()) } else { r.pad_with_zeros(1, 0, max - l) })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((Tensor::cat(&padded, 0)?, lens))
}

/// What one step hands the family's transformer.
pub(crate) struct StepCall<'a> {
    /// The scheduler's timestep (the family scales it as its model expects).
    pub timestep: f64,
    /// The current latents (f32), for samplers whose model wraps them (SANA-Sprint).
    pub latents: &'a Tensor,
    /// The scheduler-scaled latents in the model's dtype, one copy per caption row.
    pub input: &'a Tensor,
    /// `[rows, max L, C]` caption states and each row's real length.
    pub caption: &'a Tensor,
    pub caption_lens: &'a [usize],
    /// The negative prompt's context on the cond row while attention guidance is on.
    pub guidance: Option<&'a NegativeContext<'a>>,
    /// PAG's perturbed row and blocks while PAG runs.
    pub perturbation: Option<Perturbation<'a>>,
    plan: &'a GuidancePlan,
    cond_row: usize,
}

impl StepCall<'_> {
    /// The guided prediction from the transformer's output on all rows (CFG and PAG combined
    /// as the plan says).
    pub(crate) fn combine(&self, out: &Tensor) -> Result<Tensor> {
        let (cond, uncond, perturbed) = super::split_guidance_rows(out, self.cond_row, self.perturbation.is_some())?;
        Ok(self.plan.combine_outputs(&cond, uncond.as_ref(), perturbed.as_ref())?)
    }
}

/// Everything a run of the loop needs besides the scheduler, the planner and the model.
pub(crate) struct CaptionDitLoop<'a> {
    pub family: &'static Family,
    pub rows: &'a CaptionRows,
    /// The negative prompt's states (the attention methods' context), when encoded.
    pub negative: Option<&'a Tensor>,
    /// The blocks PAG perturbs.
    pub pag_blocks: &'a [usize],
    /// The transformer's dtype.
    pub dtype: DType,
}

impl CaptionDitLoop<'_> {
    /// Denoise `x` over the scheduler's timesteps; `model` maps one step's call to the
    /// prediction the scheduler steps with. Returns the final latents and the step noise drawn
    /// (for `--init-latents` replays).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        scheduler: &mut dyn Scheduler,
        planner: &mut GuidancePlanner,
        mut x: Tensor,
        req: &ResolvedRequest,
        on_step: &mut dyn FnMut(StepEvent),
        warnings: &mut Warnings,
        mut model: impl FnMut(&StepCall) -> Result<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let rows = self.rows;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        let mut noise = StepNoise::new(req)?;
        for (i, &t) in timesteps.iter().enumerate() {
            let plan = planner.step(scheduler.window_time(i));
            let input = scheduler.scale_model_input(&x)?.to_dtype(self.dtype)?.repeat((rows.count(), 1, 1, 1))?;
            let guided = match (&plan.attention, self.negative) {
                (Some(method), Some(states)) => {
                    Some(NegativeContext { method, states, pooled: None, rows: rows.cond_row..rows.cond_row + 1 })
                }
                _ => None,
            };
            let call = StepCall {
                timestep: t,
                latents: &x,
                input: &input,
                caption: &rows.caption,
                caption_lens: &rows.lens,
                guidance: guided.as_ref(),
                perturbation: rows
                    .perturbed
                    .then(|| Perturbation { rows: rows.cond_row + 1..rows.cond_row + 2, blocks: self.pag_blocks }),
                plan: &plan,
                cond_row: rows.cond_row,
            };
            let prediction = model(&call)?;
            x = scheduler.step(&prediction, &x, &mut noise)?;
            let guided = plan.attention.is_some();
            super::finish_step(&x, (i, total, t), guided, (&req.guidance, req.guidance_scale), self.family, on_step)?;
        }
        let step_noise = noise.finish(&describe(&*scheduler, req), warnings)?;
        Ok((x, step_noise))
    }
}
