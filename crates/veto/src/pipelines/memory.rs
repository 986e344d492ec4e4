//! How much memory a model's weights take, from the safetensors headers alone (no tensor is
//! read), so a run that cannot fit stops before loading with the figure.

use std::io::Read;
use std::path::Path;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::loading::model_source::ModelSource;
use crate::pipelines::residency::{LoadOptions, Residency};

/// The component folders whose weights a pipeline loads.
const COMPONENTS: [&str; 7] =
    ["transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder", "vae"];

/// Tensor elements in the safetensors files of a component folder (0 when it is absent).
fn folder_elements(dir: &Path) -> Result<u64> {
    let mut total = 0;
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                total += elements(&path)?;
            }
        }
    }
    Ok(total)
}

/// The weights of a pipeline by the stage that uses them, in the dtypes veto loads them, and
/// the peak memory each [`Residency`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightsPlan {
    /// All text encoders, and an image encoder (Wan I2V's CLIP vision, f32), on the text
    /// encoders' device.
    pub text_encoders: u64,
    /// The transformer or UNet.
    pub denoiser: u64,
    pub vae: u64,
    /// The UNet family keeps its (small) UNet loaded in every residency.
    pub denoiser_always_resident: bool,
    /// The text encoders run on another device than the rest.
    pub text_encoders_elsewhere: bool,
}

impl WeightsPlan {
    /// Every weight.
    pub fn total(&self) -> u64 {
        self.text_encoders + self.denoiser + self.vae
    }

    /// The most weight bytes held at once on the main device under `residency`.
    pub fn device_peak(&self, residency: Residency) -> u64 {
        let te = if self.text_encoders_elsewhere { 0 } else { self.text_encoders };
        match residency {
            Residency::Resident => te + self.denoiser + self.vae,
            Residency::Sequential if self.denoiser_always_resident => self.denoiser + te.max(self.vae),
            Residency::Sequential => te.max(self.denoiser + self.vae),
        }
    }

    /// The most weight bytes held at once on the host for text encoders on another device.
    pub fn text_device_peak(&self) -> u64 {
        if self.text_encoders_elsewhere {
            self.text_encoders
        } else {
            0
        }
    }

    /// Resident when everything fits in `available` with a tenth to spare for activations,
    /// sequential otherwise (and when nothing is known about the memory, resident).
    pub fn choose(&self, available: Option<u64>) -> Residency {
        match available {
            Some(free) if self.device_peak(Residency::Resident) > free / 10 * 9 => Residency::Sequential,
            _ => Residency::Resident,
        }
    }
}

/// [`WeightsPlan`] of a local model folder loaded with `opts`; `None` for a hub model (its
/// files may not be downloaded yet).
pub fn weights_plan(source: &ModelSource, opts: &LoadOptions) -> Result<Option<WeightsPlan>> {
    let Some(root) = source.root() else {
        return Ok(None);
    };
    let cpu = opts.device.is_cpu();
    let mut plan = WeightsPlan {
        text_encoders: 0,
        denoiser: 0,
        vae: 0,
        denoiser_always_resident: root.join("unet").is_dir(),
        text_encoders_elsewhere: opts.text_encoder_device.as_ref().is_some_and(|d| !d.same_device(&opts.device)),
    };
    for component in COMPONENTS {
        let (in_dtype, slot) = match component {
            "vae" => (if cpu { DType::F32 } else { opts.dtype }, &mut plan.vae),
            "transformer" | "unet" => (opts.dtype, &mut plan.denoiser),
            "image_encoder" => (DType::F32, &mut plan.text_encoders),
            _ => (opts.text_dtype(), &mut plan.text_encoders),
        };
        *slot += match source.component_file(component) {
            // A replaced component (a GGUF file) keeps about its file size in memory.
            Some(file) => std::fs::metadata(file)?.len(),
            None => folder_elements(&root.join(component))? * in_dtype.size_in_bytes() as u64,
        };
    }
    Ok(Some(plan))
}

/// The number of tensor elements a safetensors file holds, from its JSON header.
fn elements(path: &Path) -> Result<u64> {
    let bad = |reason: String| Error::BadModelFile { path: path.display().to_string(), reason };
    let mut file = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    let file_len = file.metadata()?.len();
    if len > 100 << 20 || len + 8 > file_len {
        return Err(bad(format!("header length {len} does not fit a file of {file_len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("unreadable safetensors header: {e}")))?;
    let map = json.as_object().ok_or_else(|| bad("the safetensors header is not a JSON object".into()))?;
    let mut total = 0u64;
    for (name, info) in map.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let shape =
            info.get("shape").and_then(|s| s.as_array()).ok_or_else(|| bad(format!("tensor {name} has no shape")))?;
        let n = shape.iter().try_fold(1u64, |acc, d| d.as_u64().map(|d| acc.saturating_mul(d)));
        total += n.ok_or_else(|| bad(format!("tensor {name} has a bad shape")))?;
    }
    Ok(total)
}

/// This host's available memory (Linux: `MemAvailable` in `/proc/meminfo`), if it can be read.
pub fn available_host_bytes() -> Option<u64> {
    meminfo_bytes("MemAvailable:")
}

/// Free memory on `device`: the host's available memory for a CPU, the driver's free memory
/// for a CUDA device (`None` when it cannot be read).
pub fn available_bytes(device: &candle_core::Device) -> Option<u64> {
    match device {
        candle_core::Device::Cpu => available_host_bytes(),
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(cuda) => {
            use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
            // The query answers for the context current on this thread: candle's.
            cuda.cuda_stream().context().bind_to_thread().ok()?;
            mem_get_info().ok().map(|(free, _total)| free as u64)
        }
        _ => None,
    }
}

/// This host's total memory (Linux: `MemTotal` in `/proc/meminfo`), if it can be read.
pub fn total_host_bytes() -> Option<u64> {
    meminfo_bytes("MemTotal:")
}

fn meminfo_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_tiny_flux_weights_from_the_headers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/flux/schnell");
        let source = ModelSource::local(&root).unwrap();
        let total = |dtype| {
            weights_plan(&source, &LoadOptions::new(&candle_core::Device::Cpu, dtype)).unwrap().unwrap().total()
        };
        let (f32_bytes, bf16_bytes) = (total(DType::F32), total(DType::BF16));
        // Every fixture file is f32: the header count equals the data bytes.
        let mut data = 0u64;
        for c in COMPONENTS {
            let dir = root.join(c);
            if dir.is_dir() {
                for e in std::fs::read_dir(dir).unwrap() {
                    let p = e.unwrap().path();
                    if p.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                        let bytes = std::fs::read(&p).unwrap();
                        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                        data += st.tensors().iter().map(|(_, t)| t.data().len() as u64).sum::<u64>();
                    }
                }
            }
        }
        assert_eq!(f32_bytes, data);
        assert!(bf16_bytes < f32_bytes && bf16_bytes > f32_bytes / 2, "the VAE stays f32 on a CPU");
        assert!(available_host_bytes().is_some() && total_host_bytes() >= available_host_bytes());
    }

    #[test]
    fn plans_peaks_by_residency() {
        let dit = WeightsPlan {
            text_encoders: 10,
            denoiser: 24,
            vae: 1,
            denoiser_always_resident: false,
            text_encoders_elsewhere: false,
        };
        assert_eq!(dit.device_peak(Residency::Resident), 35);
        assert_eq!(dit.device_peak(Residency::Sequential), 25);
        assert_eq!(dit.choose(Some(40)), Residency::Resident);
        assert_eq!(dit.choose(Some(30)), Residency::Sequential);
        assert_eq!(dit.choose(None), Residency::Resident);
        let elsewhere = WeightsPlan { text_encoders_elsewhere: true, ..dit };
        assert_eq!((elsewhere.device_peak(Residency::Resident), elsewhere.text_device_peak()), (25, 10));
        let unet = WeightsPlan { text_encoders: 2, denoiser: 5, vae: 1, denoiser_always_resident: true, ..dit };
        assert_eq!(unet.device_peak(Residency::Sequential), 7);

        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/flux/schnell");
        let source = ModelSource::local(&root).unwrap();
        let plan = weights_plan(&source, &LoadOptions::new(&candle_core::Device::Cpu, DType::F32)).unwrap().unwrap();
        assert!(plan.text_encoders > 0 && plan.denoiser > 0 && plan.vae > 0 && !plan.denoiser_always_resident);
    }
}
