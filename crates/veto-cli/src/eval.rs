//! `veto eval`: the demo model (or another model of the demo world) on the fixed suite of
//! prompt / negative pairs, per guidance method and step count, judged by `veto::demo`'s judge.
//! Flag mapping, the loop and the output files; the suite, scoring and drawing are the library's.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;
use veto::demo::report::{grid, reference_quality, Report};
use veto::demo::suite::{default_suite, quick_suite, Case, Category};
use veto::guidance::NagVariant;
use veto::{DType, Device, GenerateRequest, GuidanceConfig, Method, ModelSource, Pipeline};

#[derive(Args)]
pub struct EvalArgs {
    /// `demo` (the embedded model) or a diffusers folder of a model trained on the demo world.
    #[arg(long, default_value = veto::demo::model::NAME)]
    pub model: String,
    /// The CI subset: 6 cases, 1 seed, steps 1 and 4, methods none, cfg and nag.
    #[arg(long)]
    pub quick: bool,
    /// Seeds per case (0, 1, ...) [default: 3; --quick: 1].
    #[arg(long)]
    pub seeds: Option<u64>,
    /// Step counts, comma-separated [default: 1,2,4,8; --quick: 1,4].
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Guidance methods, comma-separated; `:shared-image` after nag or nasa runs Flux's
    /// shared-image NAG variant [default: none,cfg,nag,nasa,cfg+nag; --quick: none,cfg,nag].
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Write the results as JSON records (one per method × steps) to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a comparison grid PNG (rows: methods; columns: steps, for two co-occurrence cases).
    #[arg(long, value_name = "FILE")]
    pub grid: Option<PathBuf>,
    /// Write a plot PNG of the co-occurrence cases' negative and positive rates against steps.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

/// A method as `--methods` spells it: `cfg+nag`, `nag:shared-image`, ...
struct MethodSpec {
    label: String,
    method: Method,
    variant: NagVariant,
}

fn parse_method(s: &str) -> Result<MethodSpec> {
    let (name, variant) = match s.split_once(':') {
        Some((name, variant)) => (name, variant.parse::<NagVariant>().map_err(anyhow::Error::msg)?),
        None => (s, NagVariant::Official),
    };
    let method: Method = name.parse()?;
    let label = match variant {
        NagVariant::Official => method.to_string(),
        NagVariant::SharedImage => format!("{method} shared-img"),
    };
    Ok(MethodSpec { label, method, variant })
}

/// The two cases the grid shows: the first co-occurrence case of each rule, seed 0.
fn grid_cases(suite: &[Case]) -> Vec<usize> {
    let mut picked: Vec<usize> = Vec::new();
    for (i, c) in suite.iter().enumerate() {
        let new_rule = picked.iter().all(|&j| suite[j].unwanted != c.unwanted);
        if c.category == Category::CoOccurrence && new_rule && picked.len() < 2 {
            picked.push(i);
        }
    }
    picked
}

pub fn run(a: EvalArgs) -> Result<()> {
    let suite = if a.quick { quick_suite() } else { default_suite() };
    let seeds = a.seeds.unwrap_or(if a.quick { 1 } else { 3 });
    let steps = if !a.steps.is_empty() {
        a.steps.clone()
    } else if a.quick {
        vec![1, 4]
    } else {
        vec![1, 2, 4, 8]
    };
    let method_names: Vec<String> = if !a.methods.is_empty() {
        a.methods.clone()
    } else if a.quick {
        ["none", "cfg", "nag"].map(String::from).to_vec()
    } else {
        ["none", "cfg", "nag", "nasa", "cfg+nag"].map(String::from).to_vec()
    };
    let methods = method_names.iter().map(|m| parse_method(m)).collect::<Result<Vec<_>>>()?;
    if seeds == 0 || steps.contains(&0) {
        bail!("--seeds and --steps must be positive");
    }

    let source = if a.model == veto::demo::model::NAME {
        veto::demo::model::source(veto_demo_weights::FILES)?
    } else {
        ModelSource::resolve(&a.model)?
    };
    let pipe = Pipeline::load(&source, &Device::Cpu, DType::F32).with_context(|| format!("loading {}", a.model))?;
    let base = pipe.defaults().guidance.clone();
    let size = veto::demo::model::SIZE;
    let reference = reference_quality(200, size);
    let labels: Vec<String> = methods.iter().map(|m| m.label.clone()).collect();
    let mut report = Report::new(&labels, &steps, reference);
    let shown = grid_cases(&suite);
    let mut tiles: Vec<(String, Vec<Vec<u8>>)> = labels.iter().map(|l| (l.clone(), Vec::new())).collect();

    let total = (methods.len() * steps.len() * suite.len()) as u64 * seeds;
    eprintln!(
        "veto eval: {} cases x {seeds} seeds x {} methods x steps {steps:?} = {total} images ({})",
        suite.len(),
        methods.len(),
        a.model
    );
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images (eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    for (m, spec) in methods.iter().enumerate() {
        let guidance = GuidanceConfig { method: spec.method, nag_variant: spec.variant, ..base.clone() };
        // Grid columns: steps of the first shown case, then steps of the second.
        let mut row: Vec<Option<Vec<u8>>> = vec![None; shown.len() * steps.len()];
        for (s, &n) in steps.iter().enumerate() {
            bar.set_message(format!("{} at {n} steps", spec.label));
            for (k, case) in suite.iter().enumerate() {
                for seed in 0..seeds {
                    let t0 = Instant::now();
                    let req = GenerateRequest::new(case.prompt.clone())
                        .negative(case.negative())
                        .guidance(guidance.clone())
                        .steps(n)
                        .size(size, size)
                        .max_sequence_length(veto::demo::model::MAX_SEQUENCE_LENGTH)
                        .seed(seed);
                    let out =
                        pipe.generate(&req).with_context(|| format!("{:?} / {:?}", case.prompt, case.negative()))?;
                    let rgb = veto::image_io::tensor_to_images(&out.image)?.remove(0).into_raw();
                    let outcome = veto::demo::suite::score(case, &rgb, size);
                    report.add(&spec.label, n, case.category, &outcome, t0.elapsed().as_secs_f64());
                    if seed == 0 {
                        if let Some(g) = shown.iter().position(|&j| j == k) {
                            row[g * steps.len() + s] = Some(rgb);
                        }
                    }
                    bar.inc(1);
                }
            }
        }
        tiles[m].1 = row.into_iter().flatten().collect();
    }
    bar.finish_and_clear();
    println!("{}", report.table());
    println!("{total} images in {:.1} s", start.elapsed().as_secs_f64());

    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json())? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &a.grid {
        let columns: Vec<String> = shown.iter().flat_map(|_| steps.iter().map(|n| format!("{n} steps"))).collect();
        let header: Vec<String> =
            shown.iter().map(|&j| format!("{} / -{}", suite[j].prompt, suite[j].negative())).collect();
        eprintln!("grid columns: {} (steps {steps:?} each), seed 0", header.join(" | "));
        grid(&tiles, &columns, size, 2).save(path)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        report.plot(Some(Category::CoOccurrence)).save(path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
