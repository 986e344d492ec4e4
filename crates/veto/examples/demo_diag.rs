//! One-object diagnosis of a demo-world model: for every "a {colour} {shape}" prompt (16 of
//! them) and `SEEDS` seeds, generate without guidance at each step count and count, per
//! shape, the images where the judge finds an object of the right colour, of the right shape,
//! the named object itself, and nothing at all. It separates the failures the default suite
//! mixes (`veto eval`'s positive rate): colour, outline, or no object drawn.
//!
//! Usage: `cargo run --release -p veto --example demo_diag -- MODEL_DIR [STEPS=4,8] [SEEDS=8]`
//! (e.g. `models/demo`; a developer's tool for `tools/demo/train.py` runs).

use veto::demo::{judge, Colour, Shape};
use veto::{DType, Device, GenerateRequest, GuidanceConfig, Method, ModelSource, Pipeline};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model) = args.first() else {
        eprintln!("usage: demo_diag MODEL_DIR [STEPS=4,8] [SEEDS=8]");
        std::process::exit(2);
    };
    let steps: Vec<usize> =
        args.get(1).map_or("4,8", String::as_str).split(',').map(str::parse).collect::<Result<_, _>>()?;
    let seeds: u64 = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let pipe = Pipeline::load(&ModelSource::resolve(model)?, &Device::Cpu, DType::F32)?;
    let guidance = GuidanceConfig { method: Method::NONE, ..pipe.defaults().guidance.clone() };
    let size = veto::demo::model::SIZE;
    for &n in &steps {
        println!("{n} steps, {seeds} seeds x 4 colours per shape: right colour / right shape / both / nothing");
        let mut total = [0usize; 4];
        for shape in Shape::ALL {
            let mut counts = [0usize; 4];
            for colour in Colour::ALL {
                for seed in 0..seeds {
                    let req = GenerateRequest::new(format!("a {} {}", colour.name(), shape.name()))
                        .guidance(guidance.clone())
                        .steps(n)
                        .size(size, size)
                        .max_sequence_length(veto::demo::model::MAX_SEQUENCE_LENGTH)
                        .seed(seed);
                    let out = pipe.generate(&req)?;
                    let rgb = veto::image_io::tensor_to_images(&out.image)?.remove(0).into_raw();
                    let found = judge(&rgb, size);
                    counts[0] += usize::from(found.iter().any(|d| d.colour == colour));
                    counts[1] += usize::from(found.iter().any(|d| d.shape == shape));
                    counts[2] += usize::from(found.iter().any(|d| d.colour == colour && d.shape == shape));
                    counts[3] += usize::from(found.is_empty());
                }
            }
            let of = 4 * seeds as usize;
            println!(
                "  {:<9} {:>3}/{of} {:>3}/{of} {:>3}/{of} {:>3}/{of}",
                shape.name(),
                counts[0],
                counts[1],
                counts[2],
                counts[3]
            );
            total.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
        }
        let of = 16.0 * seeds as f64 / 100.0;
        println!(
            "  all       {:.0}% {:.0}% {:.0}% {:.0}%",
            total[0] as f64 / of,
            total[1] as f64 / of,
            total[2] as f64 / of,
            total[3] as f64 / of
        );
    }
    Ok(())
}
