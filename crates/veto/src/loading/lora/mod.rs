//! LoRA: low-rank weight updates merged into a model's weights at load time.
//!
//! Each `--lora FILE[:SCALE]` ([`LoraSpec`]) rides on the [`ModelSource`]; [`apply`] (called by
//! `component_weights` for every component) matches the file's modules to the component's
//! weights and wraps its backend so that each targeted weight is read as
//! W + scale · (alpha / rank) · B·A. Layouts are told apart by their keys ([`keys`]), names
//! mapped to ours by [`names`], shapes checked before anything is merged. [`check`] runs all of
//! it for every targeted component before a pipeline loads, so a LoRA for another family or a
//! malformed one is refused before any weight is read.
//!
//! alpha: kohya's `.alpha` tensors; else diffusers' `lora_adapter_metadata` (PEFT `lora_alpha`,
//! `alpha_pattern`, `use_rslora`); else alpha = rank (PEFT without alpha, XLabs, ComfyUI).
//! Full deltas (`.diff` on a weight, `.diff_b` on a bias, as in the CausVid Wan LoRA) are added
//! at the LoRA's scale, as ComfyUI does (diffusers adds `.diff_b` alike and skips `.diff`).

pub mod family;
pub mod header;
pub mod keys;
pub mod merge;
pub mod names;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};

use self::header::{read_header, Header};
use self::keys::{group, Keys, Layout, Module, Part};
use self::merge::{Delta, DeltaKind, LoraDeltas, LoraTensors};
use self::names::{resolve, Index, Target};
pub use self::spec::LoraSpec;
use super::components::component_weights;
use super::model_source::ModelSource;
use super::weights::ComponentWeights;
use crate::error::{Error, Result};

/// How many unmatched keys an error names.
const NAMED_KEYS: usize = 3;

/// What a LoRA file holds and where it goes, for the user.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSummary {
    /// The file.
    pub path: PathBuf,
    /// Its scale.
    pub scale: f64,
    /// The key layouts found.
    pub layouts: Vec<String>,
    /// Its number of tensors.
    pub tensors: usize,
    /// The model components it changes.
    pub components: Vec<String>,
}

impl fmt::Display for LoraSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name =
            self.path.file_name().map_or_else(|| self.path.display().to_string(), |n| n.to_string_lossy().into());
        write!(f, "lora {name} ({}, {} tensors", self.layouts.join(" + "), self.tensors)?;
        if self.scale != 1.0 {
            write!(f, ", scale {}", self.scale)?;
        }
        write!(f, ") → {}", self.components.join(", "))
    }
}

/// A LoRA file, opened: its header, modules and tensors.
struct Opened {
    spec: LoraSpec,
    header: Header,
    keys: Keys,
    tensors: Arc<LoraTensors>,
    /// diffusers' `lora_adapter_metadata` (PEFT configs by component prefix), if any.
    peft_meta: Option<serde_json::Value>,
}

impl Opened {
    fn new(spec: &LoraSpec) -> Result<Self> {
        let path = &spec.path;
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(Error::MissingFile { what: "LoRA file not found (--lora)".into(), path: shown });
        }
        let bad = |reason: String| Error::BadModelFile { path: shown.clone(), reason };
        let header = read_header(path)?;
        let keys = group(header.shapes.keys());
        if keys.modules.is_empty() {
            let first: Vec<&str> = header.shapes.keys().take(NAMED_KEYS).map(String::as_str).collect();
            return Err(bad(format!(
                "not a LoRA: no lora_A/lora_B, lora_down/lora_up, XLabs down/up or .diff/.diff_b tensors \
                 (first keys: {})",
                first.join(", ")
            )));
        }
        if let Some(key) = keys.unknown.first() {
            return Err(bad(format!(
                "{} key(s) of no supported LoRA layout, e.g. {key} (DoRA scales and LoKr/LoHa tensors are \
                 not supported)",
                keys.unknown.len()
            )));
        }
        for m in keys.modules.values() {
            if m.is_low_rank() && (m.down.is_none() || m.up.is_none()) {
                let has = if m.down.is_some() { "down (A) but no up (B)" } else { "no down (A)" };
                return Err(bad(format!("LoRA module {} has {has} tensor", m.key)));
            }
            if !m.is_low_rank() && m.diff.is_none() && m.diff_b.is_none() {
                return Err(bad(format!("LoRA module {} has an alpha but no tensors", m.key)));
            }
        }
        let peft_meta = match header.metadata.get("lora_adapter_metadata") {
            Some(raw) => Some(serde_json::from_str(raw).map_err(|e| bad(format!("lora_adapter_metadata: {e}")))?),
            None => None,
        };
        // SAFETY: memory-mapped read-only, like every safetensors file the loaders read.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
            .map_err(|e| bad(format!("cannot read safetensors: {e}")))?;
        let tensors = Arc::new(LoraTensors { path: path.clone(), tensors });
        Ok(Self { spec: spec.clone(), header, keys, tensors, peft_meta })
    }

    fn shape(&self, name: &str) -> &[usize] {
        self.header.shapes.get(name).map_or(&[], Vec::as_slice)
    }

    fn bad(&self, reason: String) -> Error {
        Error::BadModelFile { path: self.spec.path.display().to_string(), reason }
    }

    /// A PEFT metadata value for a component prefix (`transformer.lora_alpha`).
    fn peft(&self, prefix: &str, key: &str) -> Option<&serde_json::Value> {
        self.peft_meta.as_ref()?.get(format!("{prefix}.{key}"))
    }

    /// scale · alpha / rank for a module.
    fn factor(&self, m: &Module) -> Result<f64> {
        let down = m.down.as_deref().unwrap_or_default();
        let rank = self.shape(down).first().copied().unwrap_or(0);
        if rank == 0 {
            return Err(self.bad(format!("{down}: a LoRA down (A) tensor needs a rank dimension")));
        }
        let rank = rank as f64;
        let mut divisor = rank;
        let alpha = if let Some(key) = &m.alpha {
            let t = self.tensors.tensors.load(key, &Device::Cpu)?;
            let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            match v.as_slice() {
                [a] if a.is_finite() => *a,
                _ => return Err(self.bad(format!("{key}: alpha must be one finite number"))),
            }
        } else if let Some(prefix) = m.peft_prefix.as_deref().filter(|p| self.peft(p, "lora_alpha").is_some()) {
            if self.peft(prefix, "use_rslora").and_then(|v| v.as_bool()) == Some(true) {
                divisor = rank.sqrt();
            }
            let pattern = self.peft(prefix, "alpha_pattern").and_then(|p| p.as_object()).and_then(|p| {
                p.iter()
                    .find(|(k, _)| m.name == **k || m.name.ends_with(&format!(".{k}")))
                    .and_then(|(_, v)| v.as_f64())
            });
            pattern
                .or_else(|| self.peft(prefix, "lora_alpha").and_then(|v| v.as_f64()))
                .ok_or_else(|| self.bad(format!("lora_adapter_metadata: {prefix}.lora_alpha is not a number")))?
        } else {
            rank
        };
        Ok(self.spec.scale * alpha / divisor)
    }

    /// The deltas of module `m` on `targets` (its low-rank pair, `.diff`, `.diff_b`), shapes
    /// checked against the component's weights.
    fn deltas(&self, m: &Module, targets: Vec<Target>, index: &Index, component: &str) -> Result<Vec<(String, Delta)>> {
        let mut out = Vec::new();
        if m.is_low_rank() {
            out.extend(self.low_rank(m, &targets, index, component)?);
        }
        if let Some(diff) = &m.diff {
            out.extend(self.full(diff, &targets, false, index, component)?);
        }
        if let Some(diff_b) = &m.diff_b {
            out.extend(self.full(diff_b, &targets, true, index, component)?);
        }
        Ok(out)
    }

    fn low_rank(&self, m: &Module, targets: &[Target], index: &Index, component: &str) -> Result<Vec<(String, Delta)>> {
        let (down, up) = (m.down.clone().unwrap_or_default(), m.up.clone().unwrap_or_default());
        let (a, b) = (self.shape(&down), self.shape(&up));
        let rank = a.first().copied().unwrap_or(0);
        if b.len() < 2 || b[1] != rank || b[2..].iter().any(|&d| d != 1) {
            return Err(self.bad(format!("LoRA module {}: down (A) {a:?} and up (B) {b:?} do not multiply", m.key)));
        }
        let rows_used: usize =
            targets.iter().map(|t| if t.up_rows.is_empty() { b[0] } else { t.up_rows.iter().map(|r| r.1).sum() }).sum();
        let inner: usize = a[1..].iter().product();
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            let want = index.shape(&t.weight).unwrap_or_default();
            let rows = if t.up_rows.is_empty() { b[0] } else { t.up_rows.iter().map(|r| r.1).sum() };
            let cols_fit = want.len() >= 2
                && want[1..].iter().product::<usize>() == inner
                && (a.len() != want.len() || a[1..] == want[1..]);
            if want.first() != Some(&rows) || !cols_fit || rows_used != b[0] {
                return Err(self.bad(format!(
                    "LoRA module {} (down {a:?}, up {b:?}) does not fit {component} weight {} {want:?}",
                    m.key, t.weight
                )));
            }
            let delta = Delta {
                file: self.tensors.clone(),
                kind: DeltaKind::LowRank { down: down.clone(), up: up.clone() },
                up_rows: t.up_rows.clone(),
                factor: self.factor(m)?,
            };
            out.push((t.weight.clone(), delta));
        }
        Ok(out)
    }

    /// A full delta `tensor` on each target's weight, or on its bias when `bias`; a fused
    /// original module's delta is split by rows like B.
    fn full(
        &self,
        tensor: &str,
        targets: &[Target],
        bias: bool,
        index: &Index,
        component: &str,
    ) -> Result<Vec<(String, Delta)>> {
        let d = self.shape(tensor);
        let (d_rows, d_inner) = (d.first().copied().unwrap_or(1), d.iter().skip(1).product::<usize>());
        let mut named = Vec::with_capacity(targets.len());
        for t in targets {
            let name = if bias {
                match t.weight.strip_suffix(".weight") {
                    Some(module) => format!("{module}.bias"),
                    None => return Err(self.bad(format!("{tensor}: {component} {} has no bias", t.weight))),
                }
            } else {
                t.weight.clone()
            };
            let want = index
                .shape(&name)
                .ok_or_else(|| self.bad(format!("{tensor}: {component} has no {name} to add it to")))?
                .to_vec();
            named.push((name, want, t));
        }
        let rows_of = |want: &[usize], t: &Target| -> usize {
            if t.up_rows.is_empty() {
                want.first().copied().unwrap_or(1)
            } else {
                t.up_rows.iter().map(|r| r.1).sum()
            }
        };
        let total: usize = named.iter().map(|(_, want, t)| rows_of(want, t)).sum();
        let mut out = Vec::with_capacity(named.len());
        for (name, want, t) in named {
            let want_rows = want.first().copied().unwrap_or(1);
            let want_inner: usize = want.iter().skip(1).product();
            if total != d_rows || want_inner != d_inner || rows_of(&want, t) != want_rows {
                return Err(self.bad(format!("{tensor} {d:?} does not fit {component} {name} {want:?}")));
            }
            let delta = Delta {
                file: self.tensors.clone(),
                kind: DeltaKind::Full { tensor: tensor.to_string() },
                up_rows: t.up_rows.clone(),
                factor: self.spec.scale,
            };
            out.push((name, delta));
        }
        Ok(out)
    }
}

/// The model's components, to send each LoRA part to one of them.
struct ModelParts {
    class: String,
    present: BTreeMap<String, String>,
}

impl ModelParts {
    fn of(source: &ModelSource) -> Result<Self> {
        let index = source.model_index()?;
        let present = index
            .components()
            .filter(|(_, c)| c.is_present())
            .map(|(name, c)| (name.to_string(), c.class_name.clone().unwrap_or_default()))
            .collect();
        Ok(Self { class: index.pipeline_class().to_string(), present })
    }

    /// The component a part lands in, if the model has it.
    fn component(&self, part: Part) -> Option<&str> {
        let has = |c: &str| self.present.contains_key(c);
        let name = match part {
            Part::Denoiser if has("transformer") => "transformer",
            Part::Denoiser => "unet",
            Part::TextEncoder => "text_encoder",
            Part::TextEncoder2 => "text_encoder_2",
            Part::TextEncoder3 => "text_encoder_3",
            Part::T5 if has("text_encoder_3") => "text_encoder_3",
            Part::T5 if self.present.get("text_encoder_2").is_some_and(|c| c.starts_with("T5")) => "text_encoder_2",
            Part::T5 => return None,
        };
        has(name).then_some(name)
    }
}

/// The file name of a component's weights.
fn stem_of(component: &str) -> &'static str {
    if component.starts_with("text_encoder") {
        "model"
    } else {
        "diffusion_pytorch_model"
    }
}

fn unmatched_error(o: &Opened, parts: &ModelParts, place: &str, unmatched: &[&str], total: usize) -> Error {
    let named: Vec<&str> = unmatched.iter().take(NAMED_KEYS).copied().collect();
    let denoiser = o.keys.modules.values().filter(|m| m.part == Part::Denoiser).map(|m| m.name.as_str());
    let hint = match (family::looks_like(denoiser, &parts.class), unmatched.len() == total) {
        (Some(f), _) => format!("; the LoRA is probably made for another model family (its names look like {f})"),
        (None, true) => "; the LoRA is probably made for another model family".into(),
        (None, false) => String::new(),
    };
    o.bad(format!(
        "{} of its {total} modules match nothing in {place} of this {} model (first: {}){hint}",
        unmatched.len(),
        parts.class,
        named.join(", ")
    ))
}

/// `weights` of `component` with every LoRA of `source` that targets it merged in; unchanged
/// when none does. Errors name the LoRA modules that match no weight and those whose shapes
/// do not fit.
pub fn apply(source: &ModelSource, component: &str, weights: ComponentWeights) -> Result<ComponentWeights> {
    if source.loras().is_empty() {
        return Ok(weights);
    }
    let parts = ModelParts::of(source)?;
    let mut deltas = LoraDeltas::default();
    let mut index = None;
    for spec in source.loras() {
        let o = Opened::new(spec)?;
        let mine: Vec<&Module> =
            o.keys.modules.values().filter(|m| parts.component(m.part) == Some(component)).collect();
        if mine.is_empty() {
            continue;
        }
        let index = match &mut index {
            Some(i) => i,
            None => index.insert(Index::new(weights.tensor_shapes()?)),
        };
        let mut unmatched = Vec::new();
        for m in &mine {
            match resolve(index, &m.name) {
                Some(targets) => {
                    for (weight, d) in o.deltas(m, targets, index, component)? {
                        deltas.by_weight.entry(weight).or_default().push(d);
                    }
                }
                None => unmatched.push(m.key.as_str()),
            }
        }
        if !unmatched.is_empty() {
            return Err(unmatched_error(&o, &parts, component, &unmatched, mine.len()));
        }
    }
    if deltas.by_weight.is_empty() {
        return Ok(weights);
    }
    Ok(weights.with_lora(Arc::new(deltas)))
}

/// Opens every LoRA of `source`, checks that each module targets a component the model has and
/// matches its weights with fitting shapes (reading headers only), and says what goes where.
pub fn check(source: &ModelSource) -> Result<Vec<LoraSummary>> {
    if source.loras().is_empty() {
        return Ok(Vec::new());
    }
    let parts = ModelParts::of(source)?;
    let mut summaries = Vec::new();
    let mut targeted = BTreeSet::new();
    for spec in source.loras() {
        let o = Opened::new(spec)?;
        let missing: Vec<&str> =
            o.keys.modules.values().filter(|m| parts.component(m.part).is_none()).map(|m| m.key.as_str()).collect();
        if !missing.is_empty() {
            return Err(unmatched_error(&o, &parts, "the components", &missing, o.keys.modules.len()));
        }
        let components: BTreeSet<&str> = o.keys.modules.values().filter_map(|m| parts.component(m.part)).collect();
        let layouts: BTreeSet<Layout> = o.keys.modules.values().map(|m| m.layout).collect();
        targeted.extend(components.iter().map(|c| c.to_string()));
        summaries.push(LoraSummary {
            path: spec.path.clone(),
            scale: spec.scale,
            layouts: layouts.iter().map(ToString::to_string).collect(),
            tensors: o.header.shapes.len(),
            components: order(components.into_iter()),
        });
    }
    // The denoiser first: a LoRA for another family fails there most clearly.
    for component in order(targeted.iter().map(String::as_str)) {
        component_weights(source, &component, stem_of(&component))?;
    }
    Ok(summaries)
}

/// Components in pipeline order: denoiser, then text encoders.
fn order<'a>(components: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut v: Vec<String> = components.map(str::to_string).collect();
    v.sort_by_key(|c| (c.starts_with("text_encoder"), c.clone()));
    v
}
