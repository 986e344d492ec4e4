//! Training data for the demo model, from our own scene generator and renderer (so Python never
//! re-implements the world): `count` seeded scenes written as
//!
//! * `images.npy`: `uint8 [count, size, size, 3]` (NumPy format, read with `numpy.load`),
//! * `shapes.npy`: `uint8 [count, size, size, 4]`, each pixel's coverage (0–255) by each shape
//!   of `Shape::ALL` (circle, square, triangle, star) — `Scene::shape_coverage`,
//! * `scenes.json`: `[{"caption": "...", "background": "white", "objects": [{"colour", "shape",
//!   "cx", "cy", "radius"}, ...]}, ...]` in the same order.
//!
//! Usage: `cargo run -p veto --example demo_data -- OUT_DIR [COUNT=20000] [SEED=1] [SIZE=64]`
//! (`tools/demo/train.py` runs it).

use std::io::Write;
use veto::demo::SceneSampler;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(std::path::PathBuf::from) else {
        eprintln!("usage: demo_data OUT_DIR [COUNT] [SEED] [SIZE]");
        std::process::exit(2);
    };
    let arg = |i: usize, default: u64| args.get(i).map_or(Ok(default), |s| s.parse::<u64>()).expect("a number");
    let (count, seed, size) = (arg(1, 20_000) as usize, arg(2, 1), arg(3, 64) as usize);
    std::fs::create_dir_all(&out)?;

    let mut sampler = SceneSampler::new(seed, size);
    let mut images = std::io::BufWriter::new(std::fs::File::create(out.join("images.npy"))?);
    images.write_all(&npy_header(&[count, size, size, 3]))?;
    let mut shapes = std::io::BufWriter::new(std::fs::File::create(out.join("shapes.npy"))?);
    shapes.write_all(&npy_header(&[count, size, size, 4]))?;
    let mut scenes = Vec::with_capacity(count);
    for _ in 0..count {
        let scene = sampler.sample();
        images.write_all(&scene.render())?;
        shapes.write_all(&scene.shape_coverage())?;
        let objects: Vec<serde_json::Value> = scene
            .objects
            .iter()
            .map(|o| {
                serde_json::json!({"colour": o.colour.name(), "shape": o.shape.name(),
                    "cx": o.cx, "cy": o.cy, "radius": o.radius})
            })
            .collect();
        scenes.push(serde_json::json!({
            "caption": scene.caption, "background": scene.background.name(), "objects": objects}));
    }
    images.flush()?;
    shapes.flush()?;
    std::fs::write(out.join("scenes.json"), serde_json::to_string(&scenes)?)?;
    eprintln!("wrote {count} scenes of {size}x{size} (seed {seed}) to {}", out.display());
    Ok(())
}

/// A NumPy `.npy` v1.0 header for a C-order `uint8` array of `shape`.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut dict = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
    // Magic (6) + version (2) + length (2) + dict + '\n' is padded to a multiple of 64.
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut header = b"\x93NUMPY\x01\x00".to_vec();
    header.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    header
}
