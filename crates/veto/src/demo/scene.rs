//! The demo model's synthetic world: scenes of 1–4 coloured shapes on a plain background,
//! rendered by our own code, with captions in plain English and built-in co-occurrences (a
//! red circle usually comes with a blue square that its caption leaves out — the "AI researcher
//! ↔ glasses" of this world, exactly what a negative prompt is for).

use rand::{Rng, SeedableRng};

/// The shapes of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// An equilateral triangle pointing up.
    Triangle,
    /// A five-pointed star.
    Star,
}

/// The object colours of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    /// (220, 40, 40)
    Red,
    /// (40, 170, 60)
    Green,
    /// (40, 70, 220)
    Blue,
    /// (235, 200, 40)
    Yellow,
}

/// The backgrounds of the world (none close to an object colour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Background {
    /// (245, 245, 245)
    White,
    /// (170, 170, 170)
    LightGray,
    /// (20, 20, 20)
    Black,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];
    /// Its word in captions.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];
    /// Its word in captions.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }
    /// Its RGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 70, 220],
            Colour::Yellow => [235, 200, 40],
        }
    }
}

impl Background {
    /// Every background.
    pub const ALL: [Background; 3] = [Background::White, Background::LightGray, Background::Black];
    /// Its word in captions.
    pub fn name(self) -> &'static str {
        match self {
            Background::White => "white",
            Background::LightGray => "gray",
            Background::Black => "black",
        }
    }
    /// Its RGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::White => [245, 245, 245],
            Background::LightGray => [170, 170, 170],
            Background::Black => [20, 20, 20],
        }
    }
}

/// One object: what it is and where (centre and radius in pixels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    /// What it is.
    pub shape: Shape,
    /// Its colour.
    pub colour: Colour,
    /// Centre x (pixels).
    pub cx: f32,
    /// Centre y (pixels).
    pub cy: f32,
    /// Size: the circle's radius; the other shapes fill comparable areas.
    pub radius: f32,
}

impl Object {
    /// "a red circle".
    pub fn phrase(&self) -> String {
        format!("a {} {}", self.colour.name(), self.shape.name())
    }

    /// Whether the point lies inside the shape (the shapes fill comparable areas).
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = ((x - self.cx) / self.radius, (y - self.cy) / self.radius);
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= 1.0,
            Shape::Square => dx.abs() <= 0.85 && dy.abs() <= 0.85,
            Shape::Triangle => in_polygon(dx, dy, &regular_polygon(3, 1.1, None)),
            Shape::Star => in_polygon(dx, dy, &regular_polygon(5, 1.15, Some(0.45))),
        }
    }
}

/// The vertices of a regular polygon (pointing up) of circumradius `r`, or of a star when
/// `inner` gives the inner radius as a fraction of `r`.
fn regular_polygon(n: usize, r: f32, inner: Option<f32>) -> Vec<(f32, f32)> {
    let points = if inner.is_some() { 2 * n } else { n };
    (0..points)
        .map(|k| {
            let angle = -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::TAU / points as f32;
            let radius = match inner {
                Some(f) if k % 2 == 1 => r * f,
                _ => r,
            };
            (radius * angle.cos(), radius * angle.sin())
        })
        .collect()
}

/// Even-odd point-in-polygon test.
fn in_polygon(x: f32, y: f32, poly: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let ((xi, yi), (xj, yj)) = (poly[i], poly[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// A scene: its background, its objects, and the caption a person would write (which may leave
/// out a companion object).
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Width and height in pixels.
    pub size: usize,
    /// The plain background.
    pub background: Background,
    /// The objects, drawn in order.
    pub objects: Vec<Object>,
    /// What a person would write about it.
    pub caption: String,
}

impl Scene {
    /// RGB bytes, row-major, `size × size × 3`, anti-aliased (4×4 supersampling).
    pub fn render(&self) -> Vec<u8> {
        let bg = self.background.rgb().map(f32::from);
        self.supersample(3, |acc, top| {
            let colour = top.map_or(bg, |o| o.colour.rgb().map(f32::from));
            for (a, c) in acc.iter_mut().zip(colour) {
                *a += c;
            }
        })
    }

    /// Per-shape coverage, row-major, `size × size × 4` bytes (channel k: the share of the pixel,
    /// 0–255, covered by a visible object of shape `Shape::ALL[k]`), on the supersampling grid
    /// of [`Scene::render`]: a segmentation of the render by shape (demo training uses it to
    /// give its latents a shape direction, as their colour one).
    pub fn shape_coverage(&self) -> Vec<u8> {
        self.supersample(Shape::ALL.len(), |acc, top| {
            if let Some(o) = top {
                acc[Shape::ALL.iter().position(|&s| s == o.shape).expect("a known shape")] += 255.0;
            }
        })
    }

    /// Per pixel, `channels` bytes: the mean over a 4×4 supersampling grid of what `add` adds
    /// for the object drawn on top at each sample (None: the background).
    fn supersample(&self, channels: usize, mut add: impl FnMut(&mut [f32], Option<&Object>)) -> Vec<u8> {
        const SS: usize = 4;
        let n = self.size;
        let mut out = Vec::with_capacity(n * n * channels);
        let mut acc = vec![0f32; channels];
        for y in 0..n {
            for x in 0..n {
                acc.fill(0.0);
                for sy in 0..SS {
                    for sx in 0..SS {
                        let (px, py) =
                            (x as f32 + (sx as f32 + 0.5) / SS as f32, y as f32 + (sy as f32 + 0.5) / SS as f32);
                        // Later objects are drawn over earlier ones.
                        add(&mut acc, self.objects.iter().rev().find(|o| o.contains(px, py)));
                    }
                }
                out.extend(acc.iter().map(|v| (v / (SS * SS) as f32).round() as u8));
            }
        }
        out
    }
}

/// A co-occurrence: scenes with `object` also hold `companion` with probability `rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoOccurrence {
    /// The object that brings a companion.
    pub object: (Colour, Shape),
    /// The companion.
    pub companion: (Colour, Shape),
    /// How often it comes along.
    pub rate: f32,
}

/// The world's co-occurrences.
pub const CO_OCCURRENCES: [CoOccurrence; 2] = [
    CoOccurrence { object: (Colour::Red, Shape::Circle), companion: (Colour::Blue, Shape::Square), rate: 0.7 },
    CoOccurrence { object: (Colour::Yellow, Shape::Star), companion: (Colour::Green, Shape::Triangle), rate: 0.7 },
];

/// Seeded scene generator: `size`² images of 1–4 non-overlapping objects, captions from
/// templates; a companion is left out of the caption with probability `omit_companion`.
pub struct SceneSampler {
    rng: rand::rngs::StdRng,
    /// Image size in pixels.
    pub size: usize,
    /// How often a companion is left out of the caption.
    pub omit_companion: f32,
}

impl SceneSampler {
    /// A sampler of `size`² scenes from `seed`.
    pub fn new(seed: u64, size: usize) -> Self {
        Self { rng: rand::rngs::StdRng::seed_from_u64(seed), size, omit_companion: 0.8 }
    }

    fn kind(&mut self) -> (Colour, Shape) {
        (Colour::ALL[self.rng.random_range(0..4)], Shape::ALL[self.rng.random_range(0..4)])
    }

    /// An object of `kind` placed clear of `placed`, or `None` after many tries.
    fn place(&mut self, kind: (Colour, Shape), placed: &[Object]) -> Option<Object> {
        let n = self.size as f32;
        for _ in 0..200 {
            // Objects of 15-27 px across (3-7 latent pixels of the demo's 4x VAE): smaller ones
            // taught the demo model colour but hardly shape (session 8's diagnosis).
            let radius = self.rng.random_range(n * 0.12..n * 0.21);
            let margin = radius * 1.2 + 1.0;
            let cx = self.rng.random_range(margin..n - margin);
            let cy = self.rng.random_range(margin..n - margin);
            let clear = placed.iter().all(|o| {
                let d = ((o.cx - cx).powi(2) + (o.cy - cy).powi(2)).sqrt();
                d > 1.15 * (o.radius + radius) + 2.0
            });
            if clear {
                return Some(Object { shape: kind.1, colour: kind.0, cx, cy, radius });
            }
        }
        None
    }

    /// The next scene.
    pub fn sample(&mut self) -> Scene {
        let background = Background::ALL[self.rng.random_range(0..3)];
        let count = self.rng.random_range(1..=4usize);
        let mut objects: Vec<Object> = Vec::new();
        let mut mentioned: Vec<bool> = Vec::new();
        // Bounded: a dropped object (no room for its companion) makes the loop go round again.
        for _ in 0..64 {
            if objects.len() >= count {
                break;
            }
            let kind = self.kind();
            if objects.iter().any(|o| (o.colour, o.shape) == kind) {
                continue;
            }
            let Some(o) = self.place(kind, &objects) else { break };
            objects.push(o);
            mentioned.push(true);
            for rule in CO_OCCURRENCES.iter().filter(|r| r.object == kind) {
                if objects.iter().any(|o| (o.colour, o.shape) == rule.companion)
                    || self.rng.random::<f32>() >= rule.rate
                {
                    continue;
                }
                if let Some(c) = self.place(rule.companion, &objects) {
                    objects.push(c);
                    mentioned.push(self.rng.random::<f32>() >= self.omit_companion);
                } else {
                    // No room for the companion: drop the object too, so that the co-occurrence
                    // rate is `rule.rate` however crowded the scene.
                    objects.pop();
                    mentioned.pop();
                }
            }
        }
        let phrases: Vec<String> =
            objects.iter().zip(&mentioned).filter(|(_, m)| **m).map(|(o, _)| o.phrase()).collect();
        let mut caption = join_phrases(&phrases);
        if self.rng.random::<f32>() < 0.5 {
            caption.push_str(&format!(" on a {} background", background.name()));
        }
        Scene { size: self.size, background, objects, caption }
    }
}

/// "a, b and c".
fn join_phrases(phrases: &[String]) -> String {
    match phrases {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_seeded_captioned_and_clear() {
        let a: Vec<Scene> = (0..20).scan(SceneSampler::new(1, 64), |s, _| Some(s.sample())).collect();
        let b: Vec<Scene> = (0..20).scan(SceneSampler::new(1, 64), |s, _| Some(s.sample())).collect();
        assert_eq!(a, b);
        for s in &a {
            assert!((1..=5).contains(&s.objects.len()), "{s:?}");
            assert!(s.caption.starts_with("a "), "{}", s.caption);
            assert_eq!(s.render().len(), 64 * 64 * 3);
        }
    }

    #[test]
    fn shape_coverage_segments_the_render_by_shape() {
        let mut sampler = SceneSampler::new(3, 64);
        for _ in 0..20 {
            let s = sampler.sample();
            let (rgb, cover) = (s.render(), s.shape_coverage());
            assert_eq!(cover.len(), 64 * 64 * 4);
            for (p, c) in rgb.chunks(3).zip(cover.chunks(4)) {
                let total: u32 = c.iter().map(|&v| u32::from(v)).sum();
                assert!(total <= 256, "{c:?}");
                // A pixel fully inside one shape has that shape's object colour; one outside
                // every object has the background's.
                if let Some(k) = c.iter().position(|&v| v == 255) {
                    let shape = Shape::ALL[k];
                    assert!(s.objects.iter().any(|o| o.shape == shape && o.colour.rgb() == p), "{p:?} {shape:?}");
                } else if total == 0 {
                    assert_eq!(p, s.background.rgb());
                }
            }
        }
    }

    #[test]
    fn the_companion_comes_often_and_is_often_unsaid() {
        let mut sampler = SceneSampler::new(7, 64);
        let (mut with_red_circle, mut with_companion, mut said) = (0, 0, 0);
        for _ in 0..2000 {
            let s = sampler.sample();
            let has = |k: (Colour, Shape)| s.objects.iter().any(|o| (o.colour, o.shape) == k);
            if has((Colour::Red, Shape::Circle)) {
                with_red_circle += 1;
                if has((Colour::Blue, Shape::Square)) {
                    with_companion += 1;
                    said += usize::from(s.caption.contains("blue square"));
                }
            }
        }
        let rate = with_companion as f32 / with_red_circle as f32;
        assert!(rate > 0.6, "companion rate {rate}");
        assert!((said as f32) < 0.5 * with_companion as f32, "said {said} of {with_companion}");
    }

    #[test]
    fn shapes_fill_what_they_should() {
        let fill = |shape| {
            let o = Object { shape, colour: Colour::Red, cx: 0.0, cy: 0.0, radius: 1.0 };
            let n = 400;
            let inside = (0..n * n)
                .filter(|k| o.contains(-1.2 + 2.4 * (k % n) as f32 / n as f32, -1.2 + 2.4 * (k / n) as f32 / n as f32))
                .count();
            inside as f32 / (n * n) as f32 * 2.4 * 2.4
        };
        let (c, s, t, st) = (fill(Shape::Circle), fill(Shape::Square), fill(Shape::Triangle), fill(Shape::Star));
        assert!((c - std::f32::consts::PI).abs() < 0.05, "{c}");
        assert!((s - 2.89).abs() < 0.05, "{s}");
        assert!(t > 1.2 && st > 1.0, "{t} {st}");
    }
}
