//! The embedded demo model end to end: `veto generate` with no `--model` runs it offline from
//! any folder, and `veto eval --quick` runs the judge and the evaluation plumbing (not the
//! model's targets: those are the README's numbers from the full run).

use std::process::{Command, Output};

fn veto(args: &[&str], cache: &std::path::Path, cwd: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veto"))
        .args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .env("VETO_CACHE_DIR", cache)
        .output()
        .expect("run veto")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "veto failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn generate_defaults_to_the_demo_model() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let args = ["generate", "--prompt", "a red circle", "--negative-prompt", "blue square", "--output", "out.png"];
    ok(&veto(&args, &cache, dir.path()));
    let img = image::open(dir.path().join("out.png")).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 64));
    // Extracted once: a second run finds the same cache folder.
    let entries = || std::fs::read_dir(&cache).unwrap().count();
    let first = entries();
    ok(&veto(
        &["generate", "--model", "demo", "--prompt", "a red circle", "--output", "b.png", "--seed", "1"],
        &cache,
        dir.path(),
    ));
    assert_eq!(entries(), first);
}

#[test]
fn eval_quick_runs_the_judge_and_writes_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let args = ["eval", "--quick", "--json", "r.json", "--grid", "g.png", "--plot", "p.png", "--jobs", "2"];
    let out = veto(&args, &cache, dir.path());
    ok(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("cfg") && table.contains("nag") && table.contains("quality"), "{table}");
    let records: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("r.json")).unwrap()).unwrap();
    let records = records.as_array().unwrap();
    // 3 methods x 2 step counts; 6 cases x 1 seed each.
    assert_eq!(records.len(), 6);
    for r in records {
        assert_eq!(r["images"], 6);
        for key in ["negative_rate", "positive_rate", "quality"] {
            let v = r[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} {v} in {r}");
        }
        // The judge is validated on renders; the reference quality is the renders' own score.
        assert!(r["reference_quality"].as_f64().unwrap() > 0.93, "{r}");
    }
    for png in ["g.png", "p.png"] {
        let img = image::open(dir.path().join(png)).unwrap();
        assert!(img.width() > 100 && img.height() > 100, "{png}");
    }
}

/// Images generated in parallel give the same results, in the same order, as one at a time.
#[test]
fn eval_results_do_not_depend_on_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let run = |jobs: &str| {
        let json = format!("r{jobs}.json");
        let grid = format!("g{jobs}.png");
        let args = ["eval", "--quick", "--steps", "1", "--json", &json, "--grid", &grid, "--jobs", jobs];
        ok(&veto(&args, &cache, dir.path()));
        let mut records: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(&json)).unwrap()).unwrap();
        for r in records.as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("seconds_per_image");
        }
        (records, std::fs::read(dir.path().join(&grid)).unwrap())
    };
    let (one, grid_one) = run("1");
    let (three, grid_three) = run("3");
    assert_eq!(one, three);
    assert!(grid_one == grid_three, "the grids differ");
}

#[test]
fn eval_refuses_zero_jobs_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let out = veto(&["eval", "--quick", "--jobs", "0"], &dir.path().join("cache"), dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--jobs must be positive"), "{err}");
}
