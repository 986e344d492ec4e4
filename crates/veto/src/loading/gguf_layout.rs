//! The tensors of a GGUF file under diffusers names, whatever key layout the file uses.
//!
//! city96's FLUX, SD3.5 and SDXL files keep the ORIGINAL key names (`double_blocks.N.img_attn.qkv`,
//! `joint_blocks.N.x_block.attn.qkv`, `input_blocks.…`, optionally under `model.diffusion_model.`).
//! Their layout is told by the single-file detection and mapped by the single-file key maps; each
//! map operation is then applied to the stored ggml blocks: fused parts and swapped halves are
//! whole rows (ggml quantizes every row on its own), so they stay quantized; only a transpose, or
//! a reshape or slice that would split blocks, falls back to exact F32 values.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use super::config::read_config;
use super::gguf::{restore_shape, GgufFile, RawTensor};
use super::single_file::{checks, detect, key_map_at, Detected, Header, KeyMap, Op, Part};
use crate::error::{Error, Result};

/// A tensor of each diffusers model whose GGUF files carry diffusers' own names (Flux, SD3, UNet).
const DIFFUSERS_ANCHORS: [&str; 3] = ["x_embedder.weight", "pos_embed.proj.weight", "conv_in.weight"];

/// A GGUF file's denoiser in an original key layout.
#[derive(Debug)]
pub struct OriginalLayout {
    /// What the names say (family, variant, default base).
    pub detected: Detected,
    /// The denoiser's component, layout and prefix.
    pub part: Part,
    header: Header,
    map: KeyMap,
}

impl OriginalLayout {
    /// `file`'s layout: `None` for diffusers names, the denoiser's key map for an original
    /// layout, an error naming the first keys for anything else.
    pub fn detect(file: &GgufFile) -> Result<Option<Self>> {
        let bad = |reason: String| Error::BadModelFile { path: file.path().display().to_string(), reason };
        let header = Header::from_shapes(file.names().iter().filter_map(|n| Some((n.clone(), file.shape(n)?))));
        let Some(detected) = detect(&header) else {
            if DIFFUSERS_ANCHORS.iter().any(|a| file.contains(a)) {
                return Ok(None);
            }
            let keys: Vec<&str> = file.names().iter().take(5).map(String::as_str).collect();
            return Err(bad(format!(
                "no tensor layout veto knows: neither diffusers names (one of {DIFFUSERS_ANCHORS:?}) nor an original \
                 FLUX (double_blocks.N…), SD3 (joint_blocks.N…) or SD1.5/SDXL (input_blocks…) layout, optionally under \
                 model.diffusion_model.; its {} tensors begin {}",
                file.names().len(),
                keys.join(", ")
            )));
        };
        let part = detected.parts[0].clone();
        let map = key_map_at(part.layout, &part.prefix, &header)
            .map_err(|e| bad(format!("{} ({}, {}): {e}", part.component, part.layout, detected.variant)))?;
        Ok(Some(Self { detected, part, header, map }))
    }

    /// Checks the config at `config_path` against the file's shapes (depth, widths, guidance
    /// embedding), so a file of another variant is refused before anything is read.
    pub fn check_config(&self, config_path: &Path, file: &Path) -> Result<()> {
        let config: serde_json::Value = read_config(config_path, &format!("{} config", self.part.component))?;
        match checks::check(self.part.layout, &self.map, &self.header, &config) {
            None => Ok(()),
            Some(why) => Err(Error::InvalidInput(format!(
                "the {} of {} ({}, {}) does not fit {}: {why}; pass --base-model with a model of this variant (e.g. {})",
                self.part.component,
                file.display(),
                self.part.layout,
                self.detected.variant,
                config_path.display(),
                self.detected.default_base
            ))),
        }
    }
}

/// A GGUF file's tensors, served under diffusers names.
#[derive(Debug, Clone)]
pub struct GgufTensors {
    file: Arc<GgufFile>,
    layout: Option<Arc<OriginalLayout>>,
}

impl GgufTensors {
    /// Opens `path` (header and extents checked) and tells its layout.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let layout = OriginalLayout::detect(&file)?.map(Arc::new);
        Ok(Self { file: Arc::new(file), layout })
    }

    /// The file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The original layout, `None` when the names are diffusers'.
    pub fn layout(&self) -> Option<&OriginalLayout> {
        self.layout.as_deref()
    }

    /// The diffusers model a transformer-only file runs with when no other is named, and the
    /// component it replaces: the variant its names and shapes say for an original layout, else
    /// [`GgufFile::default_base_model`].
    pub fn default_base_model(&self) -> Result<(&'static str, &'static str)> {
        match &self.layout {
            Some(l) => Ok((l.detected.default_base, l.part.component)),
            None => self.file.default_base_model(),
        }
    }

    /// A short description of the layout for messages (`diffusers names`, `BFL layout, FLUX.1-dev`).
    pub fn describe_layout(&self) -> String {
        match &self.layout {
            Some(l) => format!("{}, {}", l.part.layout, l.detected.variant),
            None => "diffusers names".to_string(),
        }
    }

    /// Every diffusers name with its shape, from the header only.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        match &self.layout {
            None => self.file.names().iter().filter_map(|n| self.file.shape(n).map(|s| (n.clone(), s))).collect(),
            Some(l) => l.map.iter().filter_map(|(d, _)| Some((d.to_string(), l.map.shape(d, &l.header)?))).collect(),
        }
    }

    /// Every tensor under its diffusers name, quantized blocks kept wherever the layout allows.
    pub fn read(&self) -> Result<HashMap<String, RawTensor>> {
        let stored = self.file.read_all()?;
        match &self.layout {
            None => Ok(stored),
            Some(l) => remap(stored, &l.map).map_err(|reason| Error::BadModelFile {
                path: self.file.path().display().to_string(),
                reason: format!("{} ({}): {reason}", l.part.component, l.part.layout),
            }),
        }
    }
}

/// `stored` (original names) → diffusers names through `map`, moving each source into its last use.
fn remap(
    mut stored: HashMap<String, RawTensor>,
    map: &KeyMap,
) -> std::result::Result<HashMap<String, RawTensor>, String> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for (_, m) in map.iter() {
        *uses.entry(m.source.as_str()).or_default() += 1;
    }
    let mut out = HashMap::with_capacity(map.len());
    for (name, m) in map.iter() {
        let left = uses.get_mut(m.source.as_str()).expect("counted above");
        *left -= 1;
        let why = |e: String| format!("tensor {name} from {m}: {e}");
        let t = if *left == 0 {
            let raw = stored.remove(&m.source).ok_or_else(|| why("not in the file".into()))?;
            if m.op == Op::Whole {
                raw
            } else {
                apply(&raw, &m.op).map_err(why)?
            }
        } else {
            let raw = stored.get(&m.source).ok_or_else(|| why("not in the file".into()))?;
            apply(raw, &m.op).map_err(why)?
        };
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// `op` on ggml blocks: row slices and swaps are byte copies of whole rows, a reshape keeps the
/// blocks when rows stay whole blocks; anything else is done on exact F32 values.
fn apply(raw: &RawTensor, op: &Op) -> std::result::Result<RawTensor, String> {
    let n = raw.shape().first().copied().unwrap_or(0);
    let blocks = match op {
        Op::Whole => Ok(raw.clone()),
        Op::Rows { start, len } => raw.rows(std::slice::from_ref(&(*start..start + len))),
        Op::SwapHalves if n % 2 == 0 => raw.rows(&[n / 2..n, 0..n / 2]),
        Op::Reshape(shape) => restore_shape(raw.clone(), shape.clone()),
        Op::SwapHalves | Op::Transpose => Err(String::new()),
    };
    blocks.or_else(|_| dense(raw, op))
}

fn dense(raw: &RawTensor, op: &Op) -> std::result::Result<RawTensor, String> {
    let t = raw.dequantize(DType::F32, &Device::Cpu).and_then(|t| op.apply(t)).map_err(|e| e.to_string())?;
    let shape = t.dims().to_vec();
    let values = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| e.to_string())?;
    RawTensor::new(GgmlDType::F32, shape, bytemuck::cast_slice(&values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Tensor;

    fn q8(rows: usize, cols: usize) -> (Tensor, RawTensor) {
        let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 5 % 19) as f32 - 9.0) / 7.0).collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let raw = RawTensor::new(GgmlDType::Q8_0, vec![rows, cols], &q.data().unwrap()).unwrap();
        (raw.dequantize(DType::F32, &Device::Cpu).unwrap(), raw)
    }

    /// Every op on blocks gives what the same op gives on the dequantized values; rows and
    /// swaps keep the blocks, a transpose is dense.
    #[test]
    fn ops_on_blocks_match_ops_on_values() {
        let (values, raw) = q8(6, 64);
        let cases = [
            (Op::Whole, true),
            (Op::Rows { start: 2, len: 3 }, true),
            (Op::SwapHalves, true),
            (Op::Reshape(vec![3, 128]), true),
            (Op::Reshape(vec![12, 32]), true),
            (Op::Reshape(vec![8, 48]), false),
            (Op::Transpose, false),
        ];
        for (op, stays) in cases {
            let got = apply(&raw, &op).unwrap();
            assert_eq!(got.is_block_quantized(), stays, "{op:?}");
            let want = op.apply(values.clone()).unwrap();
            let got = got.dequantize(DType::F32, &Device::Cpu).unwrap();
            assert_eq!(got.dims(), want.dims(), "{op:?}");
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{op:?}");
        }
    }
}
