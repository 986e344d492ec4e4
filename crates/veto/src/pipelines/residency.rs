//! When a pipeline's components are in memory.
//!
//! A text-to-image run uses its parts one after another: the text encoders, then the denoiser
//! for every step, then the VAE. Holding all of them at once is fastest for many prompts but
//! needs the sum of their sizes (FLUX.1 in bf16: T5-XXL 9.5 GB + transformer 23.8 GB + the
//! rest). [`Residency::Sequential`] holds each only while it works, so the peak is the largest
//! stage instead of the sum.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Which components stay loaded between uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residency {
    /// Everything loads with the pipeline and stays: the fastest for many prompts; the peak
    /// is the sum of all weights.
    #[default]
    Resident,
    /// The text encoders load to encode and are freed (encoded prompts are cached, so more
    /// images of the same prompts encode nothing); the denoiser loads after the first prompts
    /// are encoded and stays; the VAE loads to decode and is freed. The peak is the larger of
    /// the text encoders and the denoiser with the VAE (a new prompt later loads the text
    /// encoders beside the denoiser).
    Sequential,
}

/// How to load a pipeline: where and in which dtype, and what stays in memory.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The device the denoiser and the VAE run on.
    pub device: Device,
    /// The weights' dtype (the VAE runs in f32 on a CPU).
    pub dtype: DType,
    /// Where the text encoders run (`None`: on `device`). A CPU here keeps T5-XXL off the GPU;
    /// its outputs move to `device`.
    pub text_encoder_device: Option<Device>,
    /// What stays loaded between uses.
    pub residency: Residency,
}

impl LoadOptions {
    /// Everything on `device` in `dtype`, all resident.
    pub fn new(device: &Device, dtype: DType) -> Self {
        Self { device: device.clone(), dtype, text_encoder_device: None, residency: Residency::Resident }
    }

    /// The device the text encoders run on.
    pub fn text_device(&self) -> &Device {
        self.text_encoder_device.as_ref().unwrap_or(&self.device)
    }

    /// The text encoders' dtype: the run's, except f32 when they run on the CPU beside a GPU
    /// denoiser (the run's half precision is chosen for the GPU; candle's CPU kernels are
    /// f32-first).
    pub fn text_dtype(&self) -> DType {
        if self.text_device().is_cpu() && !self.device.is_cpu() {
            DType::F32
        } else {
            self.dtype
        }
    }
}

type Loader<T> = Box<dyn Fn() -> Result<T> + Send + Sync>;

/// One component, loaded now or on first use, kept or freed after each use.
pub struct Component<T> {
    name: &'static str,
    load: Loader<T>,
    slot: Mutex<Option<Arc<T>>>,
    keep: bool,
}

impl<T> Component<T> {
    /// Loaded now and kept: errors surface at pipeline load.
    pub fn resident(name: &'static str, load: impl Fn() -> Result<T> + Send + Sync + 'static) -> Result<Self> {
        let value = load()?;
        Ok(Self { name, load: Box::new(load), slot: Mutex::new(Some(Arc::new(value))), keep: true })
    }

    /// Loaded on first use; kept afterwards when `keep`, else freed by [`Self::release`].
    pub fn on_demand(name: &'static str, keep: bool, load: impl Fn() -> Result<T> + Send + Sync + 'static) -> Self {
        Self { name, load: Box::new(load), slot: Mutex::new(None), keep }
    }

    /// As [`Self::resident`] or [`Self::on_demand`] by `residency`; `keep_when_sequential`
    /// says whether the component stays once loaded in sequential mode (the denoiser does).
    pub fn with_residency(
        name: &'static str,
        residency: Residency,
        keep_when_sequential: bool,
        load: impl Fn() -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        match residency {
            Residency::Resident => Self::resident(name, load),
            Residency::Sequential => Ok(Self::on_demand(name, keep_when_sequential, load)),
        }
    }

    /// The component, loading it if needed. Hold the `Arc` for the duration of the use.
    pub fn get(&self) -> Result<Arc<T>> {
        let mut slot = self.slot.lock().map_err(|_| Error::other(format!("{} lock poisoned", self.name)))?;
        if let Some(value) = slot.as_ref() {
            return Ok(value.clone());
        }
        let value = Arc::new((self.load)()?);
        *slot = Some(value.clone());
        Ok(value)
    }

    /// Done with it for now: frees it unless it is kept (the memory goes when the last `Arc`
    /// from [`Self::get`] drops).
    pub fn release(&self) {
        if !self.keep {
            if let Ok(mut slot) = self.slot.lock() {
                *slot = None;
            }
        }
    }

    /// Whether it is in memory now.
    pub fn is_loaded(&self) -> bool {
        self.slot.lock().map(|s| s.is_some()).unwrap_or(false)
    }
}

/// The last few encoded prompts with the warnings their encoding gave, so more images of the
/// same prompts (and the negative prompt of every image) encode nothing, and need no text
/// encoder in memory.
pub struct PromptCache<V> {
    entries: Mutex<Vec<(String, V, Vec<String>)>>,
}

impl<V: Clone> Default for PromptCache<V> {
    fn default() -> Self {
        Self { entries: Mutex::new(Vec::new()) }
    }
}

impl<V: Clone> PromptCache<V> {
    /// Room for a prompt and a negative prompt, twice over.
    const CAPACITY: usize = 4;

    /// The value for `key`, encoding it with `encode` (which pushes its warnings) on a miss.
    /// A hit repeats the warnings the encoding gave.
    pub fn get_or_encode(
        &self,
        key: String,
        warnings: &mut super::Warnings,
        encode: impl FnOnce(&mut super::Warnings) -> Result<V>,
    ) -> Result<V> {
        if let Ok(entries) = self.entries.lock() {
            if let Some((_, value, said)) = entries.iter().find(|(k, ..)| *k == key) {
                for w in said {
                    warnings.push(w.clone());
                }
                return Ok(value.clone());
            }
        }
        let mut own = super::Warnings::default();
        let value = encode(&mut own)?;
        let said = own.into_vec();
        for w in &said {
            warnings.push(w.clone());
        }
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() == Self::CAPACITY {
                entries.remove(0);
            }
            entries.push((key, value.clone(), said));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn on_demand_loads_once_per_use_and_frees() {
        let loads = Arc::new(AtomicUsize::new(0));
        let counter = loads.clone();
        let c = Component::on_demand("t5", false, move || Ok(counter.fetch_add(1, Ordering::SeqCst)));
        assert!(!c.is_loaded());
        assert_eq!(*c.get().unwrap(), 0);
        assert_eq!(*c.get().unwrap(), 0, "a second get in the same use reuses it");
        c.release();
        assert!(!c.is_loaded());
        assert_eq!(*c.get().unwrap(), 1);
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn kept_and_resident_components_stay() {
        let kept = Component::on_demand("transformer", true, || Ok(7));
        kept.get().unwrap();
        kept.release();
        assert!(kept.is_loaded());
        let resident = Component::resident("vae", || Ok(1)).unwrap();
        assert!(resident.is_loaded());
        resident.release();
        assert!(resident.is_loaded());
        assert!(Component::<u8>::resident("bad", || Err(Error::other("no weights"))).is_err());
    }

    #[test]
    fn prompt_cache_encodes_once_and_repeats_warnings() {
        let cache = PromptCache::<usize>::default();
        let mut calls = 0;
        for _ in 0..3 {
            let mut w = super::super::Warnings::default();
            let v = cache
                .get_or_encode("a cat".into(), &mut w, |w| {
                    calls += 1;
                    w.push("truncated");
                    Ok(5)
                })
                .unwrap();
            assert_eq!((v, w.into_vec()), (5, vec!["truncated".to_string()]));
        }
        assert_eq!(calls, 1);
        for k in 0..5 {
            cache.get_or_encode(format!("p{k}"), &mut Default::default(), |_| Ok(k)).unwrap();
        }
        let mut again = false;
        cache
            .get_or_encode("a cat".into(), &mut Default::default(), |_| {
                again = true;
                Ok(0)
            })
            .unwrap();
        assert!(again, "the oldest entries make room");
    }
}
