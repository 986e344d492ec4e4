//! The evaluation's results: per (method, steps) cell the negative-object rate, the
//! positive-object rate and the quality proxy, overall and per case kind; as a terminal table,
//! JSON records, a comparison grid and a plot (drawn on a [`Canvas`]).

use super::canvas::Canvas;
use super::scene::SceneSampler;
use super::suite::{Category, Outcome};
use std::collections::BTreeMap;

/// Counts of one group of images.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Images.
    pub images: usize,
    /// Images with everything the prompt names.
    pub positive: usize,
    /// Images with something the negative names.
    pub negative: usize,
    /// Sum of the quality proxy.
    pub quality: f64,
}

impl Tally {
    fn add(&mut self, o: &Outcome) {
        self.images += 1;
        self.positive += usize::from(o.positive);
        self.negative += usize::from(o.negative);
        self.quality += f64::from(o.quality);
    }
    fn rate(n: usize, of: usize) -> f64 {
        if of == 0 {
            0.0
        } else {
            n as f64 / of as f64
        }
    }
    /// Share of images where the negative's object appears.
    pub fn negative_rate(&self) -> f64 {
        Self::rate(self.negative, self.images)
    }
    /// Share of images with everything the prompt names.
    pub fn positive_rate(&self) -> f64 {
        Self::rate(self.positive, self.images)
    }
    /// Mean quality proxy.
    pub fn quality(&self) -> f64 {
        if self.images == 0 {
            0.0
        } else {
            self.quality / self.images as f64
        }
    }
}

/// One method at one step count.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// The method's label (`none`, `nag`, `cfg+nag`, `nag shared-image`, ...).
    pub method: String,
    /// Denoising steps.
    pub steps: usize,
    /// All its images.
    pub all: Tally,
    /// Its images by case kind.
    pub by_category: BTreeMap<Category, Tally>,
    /// Seconds spent generating and judging them.
    pub seconds: f64,
}

/// The whole evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// One cell per (method, steps), methods outer.
    pub cells: Vec<Cell>,
    /// The quality proxy on ground-truth renders of the world (the ceiling).
    pub reference_quality: f64,
}

/// The quality proxy's mean over `n` ground-truth renders (a held-out seed).
pub fn reference_quality(n: usize, size: usize) -> f64 {
    let mut sampler = SceneSampler::new(700_001, size);
    let sum: f64 = (0..n).map(|_| f64::from(super::judge::clean_pixel_share(&sampler.sample().render(), size))).sum();
    sum / n.max(1) as f64
}

impl Report {
    /// Empty cells for every method × steps.
    pub fn new(methods: &[String], steps: &[usize], reference_quality: f64) -> Self {
        let cells = methods
            .iter()
            .flat_map(|m| {
                steps.iter().map(move |&s| Cell {
                    method: m.clone(),
                    steps: s,
                    all: Tally::default(),
                    by_category: BTreeMap::new(),
                    seconds: 0.0,
                })
            })
            .collect();
        Report { cells, reference_quality }
    }

    /// Record one image's outcome.
    pub fn add(&mut self, method: &str, steps: usize, category: Category, outcome: &Outcome, seconds: f64) {
        if let Some(cell) = self.cells.iter_mut().find(|c| c.method == method && c.steps == steps) {
            cell.all.add(outcome);
            cell.by_category.entry(category).or_default().add(outcome);
            cell.seconds += seconds;
        }
    }

    /// The cell of `method` at `steps`.
    pub fn cell(&self, method: &str, steps: usize) -> Option<&Cell> {
        self.cells.iter().find(|c| c.method == method && c.steps == steps)
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let pct = |v: f64| format!("{:5.1}%", 100.0 * v);
        let mut out = format!(
            "{:<18} {:>5} {:>6} | {:>7} {:>7} {:>7} {:>7} | {:>7} | {:>7} | {:>6}\n",
            "method", "steps", "images", "neg all", "co-occ", "shared", "univ", "pos", "quality", "s/img"
        );
        out.push_str(&format!("{}\n", "-".repeat(out.len().saturating_sub(1))));
        for c in &self.cells {
            let cat = |k: Category| c.by_category.get(&k).map_or("    -".to_string(), |t| pct(t.negative_rate()));
            out.push_str(&format!(
                "{:<18} {:>5} {:>6} | {:>7} {:>7} {:>7} {:>7} | {:>7} | {:>7.3} | {:>6.3}\n",
                c.method,
                c.steps,
                c.all.images,
                pct(c.all.negative_rate()),
                cat(Category::CoOccurrence),
                cat(Category::SharedAttribute),
                cat(Category::Universal),
                pct(c.all.positive_rate()),
                c.all.quality(),
                c.seconds / c.all.images.max(1) as f64,
            ));
        }
        out.push_str(&format!(
            "neg: images showing what the negative prompt names (by case kind: co-occurrence, shared attribute, \
             universal); pos: images showing everything the prompt names; quality: share of clean pixels \
             (ground-truth renders: {:.3})\n",
            self.reference_quality
        ));
        out
    }

    /// JSON: a list of records, one per method × steps.
    pub fn json(&self) -> serde_json::Value {
        let records: Vec<serde_json::Value> = self
            .cells
            .iter()
            .map(|c| {
                let categories: serde_json::Map<String, serde_json::Value> = c
                    .by_category
                    .iter()
                    .map(|(k, t)| {
                        (
                            k.name().to_string(),
                            serde_json::json!({
                            "negative_rate": t.negative_rate(), "positive_rate": t.positive_rate(),
                            "quality": t.quality(), "images": t.images}),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "method": c.method, "steps": c.steps,
                    "negative_rate": c.all.negative_rate(), "positive_rate": c.all.positive_rate(),
                    "quality": c.all.quality(), "images": c.all.images,
                    "seconds_per_image": c.seconds / c.all.images.max(1) as f64,
                    "reference_quality": self.reference_quality,
                    "categories": categories,
                })
            })
            .collect();
        serde_json::Value::Array(records)
    }

    /// The plot: negative-object rate of one case kind (or all, `None`) against steps, one line
    /// per method, with the positive-object rate dashed below it in the same colour.
    pub fn plot(&self, category: Option<Category>) -> Canvas {
        let (w, h) = (640i64, 420i64);
        let (left, right, top, bottom) = (70i64, 200i64, 40i64, 50i64);
        let mut c = Canvas::new(w as u32, h as u32, [255, 255, 255]);
        let title = match category {
            Some(k) => format!("{} cases: negative rate (solid), positive rate (dashed)", k.name()),
            None => "all cases: negative rate (solid), positive rate (dashed)".to_string(),
        };
        c.text(left, 12, &title, 1, [0, 0, 0]);
        let mut steps: Vec<usize> = self.cells.iter().map(|c| c.steps).collect();
        steps.sort_unstable();
        steps.dedup();
        let (pw, ph) = ((w - left - right) as f32, (h - top - bottom) as f32);
        let x_of = |i: usize| left as f32 + pw * (i as f32 + 0.5) / steps.len().max(1) as f32;
        let y_of = |v: f64| top as f32 + ph * (1.0 - v as f32);
        // Axes, grid and labels.
        for k in 0..=4 {
            let v = k as f64 / 4.0;
            let y = y_of(v);
            c.line((left as f32, y), ((w - right) as f32, y), 1, [225, 225, 225]);
            let label = format!("{}%", k * 25);
            c.text(left - 8 - Canvas::text_width(&label, 1), y as i64 - 3, &label, 1, [60, 60, 60]);
        }
        c.line((left as f32, top as f32), (left as f32, (h - bottom) as f32), 1, [0, 0, 0]);
        c.line((left as f32, (h - bottom) as f32), ((w - right) as f32, (h - bottom) as f32), 1, [0, 0, 0]);
        for (i, s) in steps.iter().enumerate() {
            let label = s.to_string();
            c.text(x_of(i) as i64 - Canvas::text_width(&label, 2) / 2, h - bottom + 8, &label, 2, [0, 0, 0]);
        }
        c.text(left + (pw as i64) / 2 - 15, h - 18, "steps", 1, [0, 0, 0]);
        const COLOURS: [[u8; 3]; 8] = [
            [120, 120, 120],
            [214, 39, 40],
            [31, 119, 180],
            [44, 160, 44],
            [148, 103, 189],
            [255, 127, 14],
            [23, 190, 207],
            [140, 86, 75],
        ];
        let mut methods: Vec<&str> = Vec::new();
        for cell in &self.cells {
            if !methods.contains(&cell.method.as_str()) {
                methods.push(&cell.method);
            }
        }
        for (m, method) in methods.iter().enumerate() {
            let colour = COLOURS[m % COLOURS.len()];
            let tally = |s: usize| {
                self.cell(method, s).map(|cell| match category {
                    Some(k) => cell.by_category.get(&k).copied().unwrap_or_default(),
                    None => cell.all,
                })
            };
            let points = |rate: fn(&Tally) -> f64| -> Vec<(f32, f32)> {
                steps.iter().enumerate().filter_map(|(i, &s)| tally(s).map(|t| (x_of(i), y_of(rate(&t))))).collect()
            };
            let (neg, pos) = (points(Tally::negative_rate), points(Tally::positive_rate));
            for pair in neg.windows(2) {
                c.line(pair[0], pair[1], 3, colour);
            }
            for pair in pos.windows(2) {
                // Dashed: every other tenth of the segment.
                for k in (0..10).step_by(2) {
                    let at =
                        |t: f32| (pair[0].0 + t * (pair[1].0 - pair[0].0), pair[0].1 + t * (pair[1].1 - pair[0].1));
                    c.line(at(k as f32 / 10.0), at((k + 1) as f32 / 10.0), 2, colour);
                }
            }
            for &(x, y) in &neg {
                c.rect(x as i64 - 4, y as i64 - 4, 9, 9, colour);
            }
            let ly = top + 10 + 22 * m as i64;
            c.rect(w - right + 15, ly, 20, 7, colour);
            c.text(w - right + 42, ly, method, 1, [0, 0, 0]);
        }
        c
    }
}

/// A comparison grid: one row per labelled row of `size`² RGB tiles, columns labelled on top.
pub fn grid(rows: &[(String, Vec<Vec<u8>>)], column_labels: &[String], size: usize, scale: i64) -> Canvas {
    let tile = size as i64 * scale;
    let (label_w, head, gap) = (180i64, 28i64, 4i64);
    let cols = rows.iter().map(|r| r.1.len()).max().unwrap_or(0) as i64;
    let (w, h) = (label_w + cols * (tile + gap) + gap, head + rows.len() as i64 * (tile + gap) + gap);
    let mut c = Canvas::new(w as u32, h as u32, [255, 255, 255]);
    for (j, label) in column_labels.iter().enumerate() {
        let x = label_w + gap + j as i64 * (tile + gap) + tile / 2 - Canvas::text_width(label, 1) / 2;
        c.text(x, 10, label, 1, [0, 0, 0]);
    }
    for (i, (label, tiles)) in rows.iter().enumerate() {
        let y = head + i as i64 * (tile + gap);
        let text_scale = if Canvas::text_width(label, 2) < label_w - 12 { 2 } else { 1 };
        c.text(8, y + tile / 2 - 7, label, text_scale, [0, 0, 0]);
        for (j, rgb) in tiles.iter().enumerate() {
            c.tile(label_w + gap + j as i64 * (tile + gap), y, rgb, size, scale);
        }
    }
    c
}
