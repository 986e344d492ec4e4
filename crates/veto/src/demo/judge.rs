//! A deterministic judge for the demo world: which (colour, shape) objects an RGB image shows,
//! and where. Colour segmentation against the object palette and the estimated background,
//! connected components, then shape by two scale-free features: solidity (area over convex
//! hull area: a star's arms leave it near 0.55, convex shapes near 1) and fill (area over the
//! bounding box: square ≈ 1, circle ≈ π/4, triangle ≈ 1/2).

use super::scene::{Colour, Scene, Shape};

/// One object the judge found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detected {
    /// Its palette colour.
    pub colour: Colour,
    /// Its shape, from `solidity` and `fill`.
    pub shape: Shape,
    /// Centre of mass, x (pixels).
    pub cx: f32,
    /// Centre of mass, y (pixels).
    pub cy: f32,
    /// Pixels.
    pub area: usize,
    /// Area over the convex hull's area.
    pub solidity: f32,
    /// Area over the bounding box's area.
    pub fill: f32,
}

/// Components smaller than this many pixels are noise, not objects.
pub const MIN_AREA: usize = 15;
/// A pixel belongs to an object colour only this close to it (RGB distance) and closer to it
/// than to the background; anti-aliased edges and smudges stay unlabelled.
const MAX_COLOUR_DISTANCE: f32 = 90.0;

fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// The background: the most common colour (in 16-level bins) along the image border, averaged.
fn background(rgb: &[u8], size: usize) -> [f32; 3] {
    let mut border = Vec::new();
    for k in 0..size {
        for (x, y) in [(k, 0), (k, size - 1), (0, k), (size - 1, k)] {
            let p = (y * size + x) * 3;
            border.push([rgb[p], rgb[p + 1], rgb[p + 2]]);
        }
    }
    let bin = |c: &[u8; 3]| (c[0] / 16, c[1] / 16, c[2] / 16);
    let mut counts = std::collections::HashMap::new();
    for c in &border {
        *counts.entry(bin(c)).or_insert(0usize) += 1;
    }
    let mode = counts.into_iter().max_by_key(|(k, n)| (*n, *k)).map(|(k, _)| k).unwrap_or_default();
    let chosen: Vec<&[u8; 3]> = border.iter().filter(|c| bin(c) == mode).collect();
    let mut mean = [0f32; 3];
    for c in &chosen {
        for i in 0..3 {
            mean[i] += f32::from(c[i]) / chosen.len() as f32;
        }
    }
    mean
}

/// Twice the area of the convex hull of `points` (monotone chain).
fn hull_area2(mut points: Vec<(i64, i64)>) -> i64 {
    points.sort_unstable();
    points.dedup();
    if points.len() < 3 {
        return 0;
    }
    let cross = |o: (i64, i64), a: (i64, i64), b: (i64, i64)| (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
    let mut hull: Vec<(i64, i64)> = Vec::with_capacity(2 * points.len());
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &(i64, i64)>> =
            if pass == 0 { Box::new(points.iter()) } else { Box::new(points.iter().rev()) };
        for &p in iter {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0 {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    let n = hull.len();
    (0..n).map(|i| hull[i].0 * hull[(i + 1) % n].1 - hull[(i + 1) % n].0 * hull[i].1).sum::<i64>().abs()
}

/// The shape of a component from its solidity and fill.
fn classify(solidity: f32, fill: f32) -> Shape {
    if solidity < 0.75 {
        Shape::Star
    } else if fill > 0.88 {
        Shape::Square
    } else if fill > 0.64 {
        Shape::Circle
    } else {
        Shape::Triangle
    }
}

/// The objects in a `size × size` RGB image (row-major bytes).
pub fn judge(rgb: &[u8], size: usize) -> Vec<Detected> {
    assert_eq!(rgb.len(), size * size * 3, "judge: image is not {size}x{size} RGB");
    let bg = background(rgb, size);
    let palette: Vec<(Colour, [f32; 3])> = Colour::ALL.iter().map(|&c| (c, c.rgb().map(f32::from))).collect();
    // Label each pixel with a palette index, or none.
    let labels: Vec<Option<usize>> = (0..size * size)
        .map(|i| {
            let p = [f32::from(rgb[3 * i]), f32::from(rgb[3 * i + 1]), f32::from(rgb[3 * i + 2])];
            let (k, d) = palette
                .iter()
                .enumerate()
                .map(|(k, (_, c))| (k, distance(p, *c)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .expect("palette");
            (d < MAX_COLOUR_DISTANCE && d < distance(p, bg)).then_some(k)
        })
        .collect();
    let mut seen = vec![false; size * size];
    let mut found = Vec::new();
    for start in 0..size * size {
        let Some(label) = labels[start] else { continue };
        if seen[start] {
            continue;
        }
        // Flood fill (4-neighbours) of one colour.
        let mut stack = vec![start];
        seen[start] = true;
        let mut pixels = Vec::new();
        while let Some(i) = stack.pop() {
            pixels.push(i);
            let (x, y) = (i % size, i / size);
            let mut visit = |j: usize| {
                if !seen[j] && labels[j] == Some(label) {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < size {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - size);
            }
            if y + 1 < size {
                visit(i + size);
            }
        }
        if pixels.len() < MIN_AREA {
            continue;
        }
        let xs = pixels.iter().map(|i| i % size);
        let ys = pixels.iter().map(|i| i / size);
        let (x0, x1) = (xs.clone().min().unwrap_or(0), xs.clone().max().unwrap_or(0));
        let (y0, y1) = (ys.clone().min().unwrap_or(0), ys.clone().max().unwrap_or(0));
        let area = pixels.len();
        let bbox = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
        // The hull of the pixels' corners, so that a full square has solidity 1.
        let corners: Vec<(i64, i64)> = pixels
            .iter()
            .flat_map(|&i| {
                let (x, y) = ((i % size) as i64, (i / size) as i64);
                [(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)]
            })
            .collect();
        let solidity = (2 * area as i64) as f32 / hull_area2(corners).max(1) as f32;
        let fill = area as f32 / bbox;
        let (sx, sy) = (xs.sum::<usize>() as f32, ys.sum::<usize>() as f32);
        found.push(Detected {
            colour: palette[label].0,
            shape: classify(solidity, fill),
            cx: sx / area as f32 + 0.5,
            cy: sy / area as f32 + 0.5,
            area,
            solidity,
            fill,
        });
    }
    found
}

/// Pixels this close (RGB distance) to the background or a palette colour count as clean.
const CLEAN_DISTANCE: f32 = 48.0;

/// The evaluation's quality proxy: the share of pixels that are clean, i.e. within
/// `CLEAN_DISTANCE` of the estimated background or of an object colour. The world is drawn in
/// flat colours, so a good image is almost all clean pixels (ground-truth renders: about 0.98,
/// only anti-aliased edges are not); blur, smudges, noise and over-saturated colours (CFG at
/// high scale) all lower it. It says nothing about which objects are there (the judge does).
pub fn clean_pixel_share(rgb: &[u8], size: usize) -> f32 {
    assert_eq!(rgb.len(), size * size * 3, "clean_pixel_share: image is not {size}x{size} RGB");
    let bg = background(rgb, size);
    let mut refs: Vec<[f32; 3]> = Colour::ALL.iter().map(|c| c.rgb().map(f32::from)).collect();
    refs.push(bg);
    let clean = rgb
        .chunks_exact(3)
        .filter(|p| {
            let p = [f32::from(p[0]), f32::from(p[1]), f32::from(p[2])];
            refs.iter().any(|r| distance(p, *r) < CLEAN_DISTANCE)
        })
        .count();
    clean as f32 / (size * size) as f32
}

/// Object-level agreement of detections with a scene's ground truth: a detection is right when
/// an unmatched true object of the same colour and shape has its centre within its radius.
/// Returns (true positives, false positives, false negatives).
pub fn agreement(scene: &Scene, found: &[Detected]) -> (usize, usize, usize) {
    let mut matched = vec![false; scene.objects.len()];
    let mut tp = 0;
    for d in found {
        let hit = scene.objects.iter().enumerate().position(|(k, o)| {
            !matched[k]
                && o.colour == d.colour
                && o.shape == d.shape
                && ((o.cx - d.cx).powi(2) + (o.cy - d.cy).powi(2)).sqrt() < o.radius
        });
        if let Some(k) = hit {
            matched[k] = true;
            tp += 1;
        }
    }
    (tp, found.len() - tp, scene.objects.len() - tp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::scene::SceneSampler;

    /// The judge against ground-truth renders of held-out scenes: object-level precision and
    /// recall. On 1,000 scenes from this seed both are 100% (2383 objects; 99.8% with the
    /// world's earlier, smaller objects of 12-22 px); this 200-scene sample guards 97%.
    #[test]
    fn judge_reads_rendered_scenes() {
        let mut sampler = SceneSampler::new(900_001, 64);
        let (mut tp, mut fp, mut fneg) = (0, 0, 0);
        for _ in 0..200 {
            let scene = sampler.sample();
            let (a, b, c) = agreement(&scene, &judge(&scene.render(), 64));
            tp += a;
            fp += b;
            fneg += c;
        }
        let precision = tp as f32 / (tp + fp) as f32;
        let recall = tp as f32 / (tp + fneg) as f32;
        assert!(precision >= 0.97 && recall >= 0.97, "precision {precision}, recall {recall} ({tp} {fp} {fneg})");
    }

    /// The quality proxy on ground truth: renders are almost all clean pixels.
    #[test]
    fn renders_are_clean() {
        let mut sampler = SceneSampler::new(900_002, 64);
        let shares: Vec<f32> = (0..50).map(|_| clean_pixel_share(&sampler.sample().render(), 64)).collect();
        let mean = shares.iter().sum::<f32>() / shares.len() as f32;
        assert!(mean > 0.93, "mean clean share of renders {mean}");
    }

    #[test]
    fn hull_of_a_square() {
        assert_eq!(hull_area2(vec![(0, 0), (2, 0), (2, 2), (0, 2), (1, 1)]), 8);
    }
}
