//! `veto eval`: the demo model (or another model of the demo world) on the fixed suite of
//! prompt / negative pairs, per guidance method and step count, judged by `veto::demo`'s judge.
//! Flag mapping, the loop and the output files; the suite, scoring and drawing are the library's.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use veto::demo::report::{grid, reference_quality, Report};
use veto::demo::suite::{default_suite, quick_suite, Case, Category, Outcome};
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
    /// Images generated at once [default: the number of CPUs]; results do not depend on it.
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// `f` over `items` on `jobs` threads, results in `items`' order; the first error stops the
/// threads (each finishes the item in hand) and is returned. With several jobs each thread
/// runs its items in a one-thread rayon pool of its own: candle's parallel ops (matrix products,
/// veto's kernels) then stay on that thread instead of queueing for the shared global pool,
/// where the jobs would wait on each other.
fn run_parallel<I: Sync, T: Send>(items: &[I], jobs: usize, f: impl Fn(&I) -> Result<T> + Sync) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Vec<Mutex<Option<Result<T>>>> = items.iter().map(|_| Mutex::new(None)).collect();
    let work = || {
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            let result = f(item);
            failed.fetch_or(result.is_err(), Ordering::Relaxed);
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        }
    };
    let jobs = jobs.min(items.len()).max(1);
    if jobs == 1 {
        work();
    } else {
        let pools = (0..jobs)
            .map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        std::thread::scope(|scope| {
            for pool in &pools {
                scope.spawn(|| pool.install(work));
            }
        });
    }
    let mut out = Vec::with_capacity(items.len());
    for slot in slots {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(result) => out.push(result?),
            None => bail!("an earlier image failed"),
        }
    }
    Ok(out)
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
    if seeds == 0 || steps.contains(&0) || a.jobs == Some(0) {
        bail!("--seeds, --steps and --jobs must be positive");
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
    let mut rows: Vec<Vec<Option<Vec<u8>>>> = vec![vec![None; shown.len() * steps.len()]; methods.len()];

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
    // Every image is independent: `jobs` threads share the list (a model this small keeps one
    // core busy with short ops, so images in parallel scale where threads inside an op do not).
    // The results are gathered in list order, so tables and grids do not depend on `jobs`.
    let (n_steps, n_cases) = (steps.len(), suite.len());
    let items: Vec<(usize, usize, usize, u64)> = (0..methods.len())
        .flat_map(|m| (0..n_steps).flat_map(move |s| (0..n_cases).map(move |k| (m, s, k))))
        .flat_map(|(m, s, k)| (0..seeds).map(move |seed| (m, s, k, seed)))
        .collect();
    let guidances: Vec<GuidanceConfig> = methods
        .iter()
        .map(|spec| GuidanceConfig { method: spec.method, nag_variant: spec.variant, ..base.clone() })
        .collect();
    let generate_one = |&(m, s, k, seed): &(usize, usize, usize, u64)| -> Result<(Vec<u8>, Outcome, f64)> {
        let t0 = Instant::now();
        let case = &suite[k];
        let req = GenerateRequest::new(case.prompt.clone())
            .negative(case.negative())
            .guidance(guidances[m].clone())
            .steps(steps[s])
            .size(size, size)
            .max_sequence_length(veto::demo::model::MAX_SEQUENCE_LENGTH)
            .seed(seed);
        let out = pipe.generate(&req).with_context(|| format!("{:?} / {:?}", case.prompt, case.negative()))?;
        let rgb = veto::image_io::tensor_to_images(&out.image)?.remove(0).into_raw();
        let outcome = veto::demo::suite::score(case, &rgb, size);
        bar.inc(1);
        Ok((rgb, outcome, t0.elapsed().as_secs_f64()))
    };
    let jobs = a.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    bar.set_message(format!("{jobs} in parallel"));
    let start = Instant::now();
    let results = run_parallel(&items, jobs, generate_one)?;
    for (&(m, s, k, seed), (rgb, outcome, seconds)) in items.iter().zip(results) {
        report.add(&methods[m].label, steps[s], suite[k].category, &outcome, seconds);
        if seed == 0 {
            if let Some(g) = shown.iter().position(|&j| j == k) {
                // Grid columns: steps of the first shown case, then steps of the second.
                rows[m][g * steps.len() + s] = Some(rgb);
            }
        }
    }
    let tiles: Vec<(String, Vec<Vec<u8>>)> =
        labels.iter().cloned().zip(rows.into_iter().map(|row| row.into_iter().flatten().collect())).collect();
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
