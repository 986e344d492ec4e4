//! Reading GGUF files (city96's quantized diffusion models, or any GGUF of a transformer or UNet).
//!
//! The header is parsed by candle's reader; every tensor's extent is then checked against the
//! file before any data is read, so a truncated or foreign file is an error naming the file and
//! the first bad tensor, never a panic or a huge allocation. Tensors are read as raw ggml blocks
//! ([`RawTensor`]): they stay in their quantized form, and row slices are byte slices of whole
//! rows (ggml block formats quantize each row on its own).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where city96's converter records the real shape of a tensor it stored as `[n/256, 256]`
/// (SD1/SDXL convolutions and linears whose rows are not a multiple of 256 wide).
const ORIG_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// One tensor's ggml blocks, on the CPU, with its (row-major, outermost first) shape.
#[derive(Debug, Clone)]
pub struct RawTensor {
    dtype: GgmlDType,
    shape: Vec<usize>,
    /// The bytes, in a buffer aligned for every block type (candle views it as blocks).
    words: Vec<u64>,
    len: usize,
}

impl RawTensor {
    /// Blocks of `dtype` for a tensor of `shape`, from `bytes` (exactly the right length).
    pub fn new(dtype: GgmlDType, shape: Vec<usize>, bytes: &[u8]) -> std::result::Result<Self, String> {
        let len = byte_len(dtype, &shape)?;
        if bytes.len() != len {
            return Err(format!("{} bytes for a {dtype:?} tensor of shape {shape:?}, which needs {len}", bytes.len()));
        }
        let mut words = vec![0u64; len.div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len].copy_from_slice(bytes);
        Ok(Self { dtype, shape, words, len })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }

    /// True for the ggml block formats (Q8_0, Q4_K, …), false for F32/F16/BF16.
    pub fn is_block_quantized(&self) -> bool {
        !matches!(self.dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    }

    /// The same blocks seen with another shape of as many elements. Only valid when the
    /// innermost dimension is a whole number of blocks: then every new row starts a block.
    pub fn reshaped(self, shape: Vec<usize>) -> std::result::Result<Self, String> {
        let len = byte_len(self.dtype, &shape)?;
        if len != self.len || elem_count(&shape) != elem_count(&self.shape) {
            return Err(format!("cannot view {:?} {:?} as {shape:?}", self.dtype, self.shape));
        }
        Ok(Self { shape, ..self })
    }

    /// Rows `ranges` of the outermost dimension, concatenated: a byte copy of whole rows.
    pub fn rows(&self, ranges: &[Range<usize>]) -> std::result::Result<Self, String> {
        let Some((&n_rows, inner)) = self.shape.split_first() else {
            return Err("a scalar has no rows".into());
        };
        let row_len = byte_len(self.dtype, &[elem_count(inner)])
            .map_err(|_| format!("rows of {:?} {:?} are not whole {:?} blocks", self.shape, self.dtype, self.dtype))?;
        let mut bytes = Vec::new();
        let mut taken = 0;
        for r in ranges {
            if r.start > r.end || r.end > n_rows {
                return Err(format!("rows {r:?} out of {n_rows}"));
            }
            bytes.extend_from_slice(&self.bytes()[r.start * row_len..r.end * row_len]);
            taken += r.len();
        }
        let mut shape = self.shape.clone();
        shape[0] = taken;
        Self::new(self.dtype, shape, &bytes)
    }

    /// The tensor as candle blocks on `device` (for quantized matmuls).
    pub fn to_qtensor(&self, device: &Device) -> candle_core::Result<QTensor> {
        let storage = QStorage::from_data(std::borrow::Cow::Borrowed(self.bytes()), device, self.dtype)?;
        QTensor::new(storage, self.shape.as_slice())
    }

    /// The values as a dense tensor of `dtype` on `device` (norms, biases, convolutions, …).
    pub fn dequantize(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let plain = match self.dtype {
            GgmlDType::F32 => Some(DType::F32),
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        };
        let t = match plain {
            Some(d) => Tensor::from_raw_buffer(self.bytes(), d, &self.shape, &Device::Cpu)?,
            None => self.to_qtensor(&Device::Cpu)?.dequantize(&Device::Cpu)?,
        };
        t.to_dtype(dtype)?.to_device(device)
    }
}

fn elem_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Bytes of a `dtype` tensor of `shape`; an error when a row is not whole blocks or the size
/// overflows.
fn byte_len(dtype: GgmlDType, shape: &[usize]) -> std::result::Result<usize, String> {
    let block = dtype.block_size();
    let last = *shape.last().ok_or("a tensor without dimensions")?;
    if last % block != 0 {
        return Err(format!("rows of {last} values are not whole {dtype:?} blocks of {block}"));
    }
    let elems = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or("element count overflows")?;
    (elems / block).checked_mul(dtype.type_size()).ok_or_else(|| "byte size overflows".to_string())
}

/// A GGUF file whose header and tensor extents have been checked.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    /// Tensor names in file order (by offset), so errors name the first bad one.
    names: Vec<String>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("tensors", &self.names.len()).finish()
    }
}

impl GgufFile {
    /// Open and check `path`: the header parses, every tensor's shape is whole blocks, and
    /// every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::BadModelFile { path: path.display().to_string(), reason };
        let file = File::open(path).map_err(|e| Error::MissingFile {
            what: format!("cannot open GGUF file ({e})"),
            path: path.display().to_string(),
        })?;
        let file_len = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
        let mut names: Vec<String> = content.tensor_infos.keys().cloned().collect();
        names.sort_by_key(|n| (content.tensor_infos[n].offset, n.clone()));
        if names.is_empty() {
            return Err(bad("the GGUF file holds no tensors".into()));
        }
        for name in &names {
            let info = &content.tensor_infos[name];
            let shape = info.shape.dims();
            let len = byte_len(info.ggml_dtype, shape)
                .map_err(|e| bad(format!("tensor {name} ({:?} {shape:?}): {e}", info.ggml_dtype)))?;
            let end = content
                .tensor_data_offset
                .checked_add(info.offset)
                .and_then(|start| start.checked_add(len as u64))
                .filter(|&end| end <= file_len);
            if end.is_none() {
                return Err(bad(format!(
                    "truncated: tensor {name} needs {len} bytes at offset {} but the file has {file_len} bytes",
                    content.tensor_data_offset.saturating_add(info.offset)
                )));
            }
        }
        Ok(Self { path: path.to_path_buf(), content, names })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture` (city96 writes `flux`, `sd3`, `sdxl`, `sd1`, …).
    pub fn architecture(&self) -> Option<&str> {
        match self.content.metadata.get("general.architecture") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// The diffusers model whose text encoders, VAE, scheduler and config a transformer-only
    /// GGUF runs with when no other is named, and the component the GGUF replaces: from
    /// `general.architecture` and the tensors present (guidance embedder: FLUX.1-dev; dual
    /// attention: SD3.5 Medium).
    pub fn default_base_model(&self) -> Result<(&'static str, &'static str)> {
        let has = |names: &[&str]| names.iter().any(|n| self.contains(n));
        match self.architecture() {
            Some("flux")
                if has(&["time_text_embed.guidance_embedder.linear_1.weight", "guidance_in.in_layer.weight"]) =>
            {
                Ok(("black-forest-labs/FLUX.1-dev", "transformer"))
            }
            Some("flux") => Ok(("black-forest-labs/FLUX.1-schnell", "transformer")),
            Some("sd3")
                if has(&["transformer_blocks.0.attn2.to_q.weight", "joint_blocks.0.x_block.attn2.qkv.weight"]) =>
            {
                Ok(("stabilityai/stable-diffusion-3.5-medium", "transformer"))
            }
            Some("sd3") => Ok(("stabilityai/stable-diffusion-3.5-large", "transformer")),
            Some("sdxl") => Ok(("stabilityai/stable-diffusion-xl-base-1.0", "unet")),
            other => Err(Error::BadModelFile {
                path: self.path.display().to_string(),
                reason: format!(
                    "general.architecture is {}; veto runs flux, sd3 and sdxl GGUF files",
                    other.map_or("missing".to_string(), |a| format!("{a:?}"))
                ),
            }),
        }
    }

    /// Tensor names in file order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The shape a tensor has in the file (after city96's `[n/256, 256]` reshape is undone).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let info = self.content.tensor_infos.get(name)?;
        Some(self.orig_shape(name).ok().flatten().unwrap_or_else(|| info.shape.dims().to_vec()))
    }

    /// City96's recorded original shape of `name`, if any.
    fn orig_shape(&self, name: &str) -> std::result::Result<Option<Vec<usize>>, String> {
        let Some(value) = self.content.metadata.get(&format!("{ORIG_SHAPE_PREFIX}{name}")) else {
            return Ok(None);
        };
        let dims = value.to_vec().map_err(|_| "its recorded original shape is not an array".to_string())?;
        let dims = dims
            .iter()
            .map(|d| match d {
                Value::U32(v) => Ok(*v as usize),
                Value::U64(v) => Ok(*v as usize),
                Value::I32(v) if *v >= 0 => Ok(*v as usize),
                Value::I64(v) if *v >= 0 => Ok(*v as usize),
                other => Err(format!("its recorded original shape has a bad dimension {other:?}")),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Some(dims))
    }

    /// Read every tensor, in file order, undoing city96's reshape: a tensor stored as
    /// `[n/256, 256]` gets its recorded shape back, as the same blocks when its rows are whole
    /// blocks, dequantized to F32 otherwise (the converter only does this to small SD1/SDXL
    /// tensors, mostly convolutions, which are dense anyway).
    pub fn read_all(&self) -> Result<HashMap<String, RawTensor>> {
        let bad = |reason: String| Error::BadModelFile { path: self.path.display().to_string(), reason };
        let mut reader = BufReader::new(File::open(&self.path)?);
        let mut out = HashMap::with_capacity(self.names.len());
        for name in &self.names {
            let info = &self.content.tensor_infos[name];
            let shape = info.shape.dims().to_vec();
            let len = byte_len(info.ggml_dtype, &shape).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let mut bytes = vec![0u8; len];
            reader.seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset))?;
            reader.read_exact(&mut bytes).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let raw = RawTensor::new(info.ggml_dtype, shape, &bytes).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let raw = match self.orig_shape(name).map_err(|e| bad(format!("tensor {name}: {e}")))? {
                None => raw,
                Some(orig) => restore_shape(raw, orig).map_err(|e| bad(format!("tensor {name}: {e}")))?,
            };
            out.insert(name.clone(), raw);
        }
        Ok(out)
    }
}

/// Give a reshaped tensor its original shape back.
pub(crate) fn restore_shape(raw: RawTensor, orig: Vec<usize>) -> std::result::Result<RawTensor, String> {
    if elem_count(&orig) != elem_count(raw.shape()) {
        return Err(format!("recorded original shape {orig:?} does not match the stored {:?}", raw.shape()));
    }
    let whole_blocks = orig.last().is_some_and(|&k| k % raw.dtype().block_size() == 0);
    if whole_blocks {
        return raw.reshaped(orig);
    }
    let values = raw.dequantize(DType::F32, &Device::Cpu).map_err(|e| e.to_string())?;
    let values = values.flatten_all().and_then(|v| v.to_vec1::<f32>()).map_err(|e| e.to_string())?;
    RawTensor::new(GgmlDType::F32, orig, bytemuck::cast_slice(&values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q8(rows: usize, cols: usize) -> (Tensor, RawTensor) {
        let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7 % 23) as f32 - 11.0) / 8.0).collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let raw = RawTensor::new(GgmlDType::Q8_0, vec![rows, cols], &q.data().unwrap()).unwrap();
        (t, raw)
    }

    #[test]
    fn row_slices_are_the_rows_of_the_dequantized_tensor() {
        let (_, raw) = q8(6, 64);
        let full = raw.dequantize(DType::F32, &Device::Cpu).unwrap();
        let picked = raw.rows(&[4..6, 0..2]).unwrap();
        assert_eq!(picked.shape(), &[4, 64]);
        let want = Tensor::cat(&[full.narrow(0, 4, 2).unwrap(), full.narrow(0, 0, 2).unwrap()], 0).unwrap();
        let got = picked.dequantize(DType::F32, &Device::Cpu).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        assert!(raw.rows(&[0..1, 5..7]).is_err());
    }

    #[test]
    fn reshape_keeps_blocks_when_rows_are_whole_blocks() {
        let (_, raw) = q8(2, 256);
        let as_rows = raw.clone().reshaped(vec![8, 64]).unwrap();
        let a = raw.dequantize(DType::F32, &Device::Cpu).unwrap().flatten_all().unwrap();
        let b = as_rows.dequantize(DType::F32, &Device::Cpu).unwrap().flatten_all().unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        // 48-wide rows would split Q8_0 blocks of 32: dequantized instead.
        let restored = restore_shape(raw, vec![4, 2, 64]).unwrap();
        assert_eq!(restored.dtype(), GgmlDType::Q8_0);
        let (_, raw) = q8(3, 256);
        let restored = restore_shape(raw, vec![16, 48]).unwrap();
        assert_eq!((restored.dtype(), restored.shape()), (GgmlDType::F32, &[16usize, 48][..]));
    }

    #[test]
    fn byte_lengths_refuse_partial_blocks_and_overflow() {
        assert_eq!(byte_len(GgmlDType::Q8_0, &[2, 64]).unwrap(), 2 * 2 * 34);
        assert!(byte_len(GgmlDType::Q4K, &[2, 64]).is_err());
        assert!(byte_len(GgmlDType::F32, &[usize::MAX, 4]).is_err());
        assert!(RawTensor::new(GgmlDType::F16, vec![2], &[0u8; 3]).is_err());
    }
}
