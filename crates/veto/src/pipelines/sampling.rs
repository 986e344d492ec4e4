//! The sampler of a run for the families whose folders name a scheduler by `_class_name` (the
//! UNet family, PixArt-Σ): the folder's scheduler or the request's override, prepared with the
//! request's steps / timesteps / eta, and the checks a request's sampler options get.

use crate::error::{Error, Result};
use crate::loading::model_source::ModelSource;
use crate::pipelines::ResolvedRequest;
use crate::schedulers::scheduler::Scheduler;
use crate::schedulers::{load_scheduler_and_config, scheduler_override};

/// The folder's scheduler and its config as read.
pub fn folder_scheduler(source: &ModelSource) -> Result<(Box<dyn Scheduler>, serde_json::Value)> {
    load_scheduler_and_config(&source.file("scheduler/scheduler_config.json")?)
}

/// The scheduler a request runs: `base` (the folder's), or the request's `scheduler` override
/// built from the folder's `config` (diffusers' `Class.from_config(pipe.scheduler.config)`).
pub fn scheduler_for(
    base: &dyn Scheduler,
    config: &serde_json::Value,
    req: &ResolvedRequest,
) -> Result<Box<dyn Scheduler>> {
    match &req.sampler.scheduler {
        Some(name) => scheduler_override(config, name),
        None => Ok(base.clone_box()),
    }
}

/// [`scheduler_for`] from the folder's files alone, before any weights load.
pub fn requested_scheduler(source: &ModelSource, req: &ResolvedRequest) -> Result<Box<dyn Scheduler>> {
    let (scheduler, config) = folder_scheduler(source)?;
    scheduler_for(scheduler.as_ref(), &config, req)
}

/// The scheduler of one run: a fresh copy of `scheduler` with the request's timesteps (or
/// steps) and eta (diffusers' pipelines pass 0.0 when none is given).
pub fn prepared_scheduler(scheduler: &dyn Scheduler, req: &ResolvedRequest) -> Result<Box<dyn Scheduler>> {
    let mut s = scheduler.clone_box();
    match req.sampler.timesteps.as_deref() {
        Some(ts) => s.set_custom_timesteps(ts)?,
        None => s.set_timesteps(req.steps)?,
    }
    s.set_eta(req.sampler.eta.unwrap_or(0.0))?;
    Ok(s)
}

/// The sampler of a run in words, for messages: `TCDScheduler with 4 steps, eta 0.3`.
pub fn describe(scheduler: &dyn Scheduler, req: &ResolvedRequest) -> String {
    let mut s = format!("{} with {} steps", scheduler.class_name(), scheduler.timesteps().len());
    if let Some(eta) = req.sampler.eta {
        s.push_str(&format!(", eta {eta}"));
    }
    s
}

/// The sampler options of `req` against `scheduler` (eta only where it takes one, custom
/// timesteps it accepts), then the initial latents (`latent` shape, VAE factor `f`) and the
/// step noise against the draws the prepared scheduler makes.
pub fn check_sampler(scheduler: &dyn Scheduler, req: &ResolvedRequest, latent: &[usize], f: usize) -> Result<()> {
    let mut probe = scheduler.clone_box();
    if let Some(eta) = req.sampler.eta {
        if !probe.takes_eta() {
            return Err(Error::parameter("eta", format!("{} takes no eta (DDIM and TCD do)", probe.class_name())));
        }
        probe.set_eta(eta).map_err(|e| Error::parameter("eta", e.to_string()))?;
    }
    if let Some(ts) = &req.sampler.timesteps {
        probe.set_custom_timesteps(ts).map_err(|e| Error::parameter("timesteps", e.to_string()))?;
    }
    req.check_init_latents(latent, f)?;
    let run = prepared_scheduler(scheduler, req)?;
    req.check_step_noise(&describe(run.as_ref(), req), &run.noise_steps(), latent)
}
