//! The fixed evaluation suite of the demo world: prompt / negative-prompt pairs, each with what
//! the prompt names (must be there) and what the negative names (must not be), in three kinds:
//!
//! * **co-occurrence**: the prompt names an object that usually brings a companion its caption
//!   leaves out ("a red circle"), the negative names the companion ("blue square") — the
//!   "AI researcher / glasses" case;
//! * **shared attribute**: the negative names an object that shares the colour or the shape of
//!   one the prompt names ("a red circle" / "red square"): negation must stay specific;
//! * **universal**: the negative is a bare colour or shape the prompt does not use ("blue"),
//!   to be kept out of the whole image.

use super::judge::Detected;
use super::scene::{Background, Colour, Shape, CO_OCCURRENCES};

/// What a negative prompt names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwanted {
    /// One object.
    Object(Colour, Shape),
    /// Any object of this colour.
    Colour(Colour),
    /// Any object of this shape.
    Shape(Shape),
}

impl Unwanted {
    /// Whether a detection is what the negative names.
    pub fn matches(&self, d: &Detected) -> bool {
        match *self {
            Unwanted::Object(c, s) => d.colour == c && d.shape == s,
            Unwanted::Colour(c) => d.colour == c,
            Unwanted::Shape(s) => d.shape == s,
        }
    }

    /// The negative prompt.
    pub fn phrase(&self) -> String {
        match *self {
            Unwanted::Object(c, s) => format!("{} {}", c.name(), s.name()),
            Unwanted::Colour(c) => c.name().to_string(),
            Unwanted::Shape(s) => s.name().to_string(),
        }
    }
}

/// The kind of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// The negative names the prompt object's usual, unsaid companion.
    CoOccurrence,
    /// The negative shares a colour or a shape with an object the prompt names.
    SharedAttribute,
    /// The negative is a bare colour or shape the prompt does not use.
    Universal,
}

impl Category {
    /// Every category, in table order.
    pub const ALL: [Category; 3] = [Category::CoOccurrence, Category::SharedAttribute, Category::Universal];
    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Category::CoOccurrence => "co-occurrence",
            Category::SharedAttribute => "shared-attribute",
            Category::Universal => "universal",
        }
    }
}

/// One prompt / negative pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// The prompt.
    pub prompt: String,
    /// What the prompt names.
    pub wanted: Vec<(Colour, Shape)>,
    /// What the negative prompt names.
    pub unwanted: Unwanted,
    /// Its kind.
    pub category: Category,
}

impl Case {
    /// The negative prompt.
    pub fn negative(&self) -> String {
        self.unwanted.phrase()
    }
}

/// Every (colour, shape) kind, colour-major.
fn kinds() -> Vec<(Colour, Shape)> {
    Colour::ALL.iter().flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s))).collect()
}

fn phrase((c, s): (Colour, Shape)) -> String {
    format!("a {} {}", c.name(), s.name())
}

fn case(prompt: String, wanted: Vec<(Colour, Shape)>, unwanted: Unwanted, category: Category) -> Case {
    Case { prompt, wanted, unwanted, category }
}

/// The default suite: 104 cases (32 co-occurrence, 32 shared-attribute, 40 universal).
pub fn default_suite() -> Vec<Case> {
    let all = kinds();
    let mut cases = Vec::new();
    // Co-occurrence: the object alone, on each background, and with each of 6 other objects in
    // either order; the negative is the companion.
    for rule in CO_OCCURRENCES {
        let (o, c) = (rule.object, rule.companion);
        let neg = Unwanted::Object(c.0, c.1);
        let co = Category::CoOccurrence;
        cases.push(case(phrase(o), vec![o], neg, co));
        for bg in Background::ALL {
            cases.push(case(format!("{} on a {} background", phrase(o), bg.name()), vec![o], neg, co));
        }
        let others: Vec<(Colour, Shape)> = all
            .iter()
            .copied()
            .filter(|k| *k != o && *k != c && CO_OCCURRENCES.iter().all(|r| r.object != *k))
            .step_by(2)
            .take(6)
            .collect();
        for (i, &x) in others.iter().enumerate() {
            cases.push(case(format!("{} and {}", phrase(o), phrase(x)), vec![o, x], neg, co));
            let prompt = if i % 2 == 0 {
                format!("{} and {}", phrase(x), phrase(o))
            } else {
                format!("{} and {} on a {} background", phrase(o), phrase(x), Background::ALL[i % 3].name())
            };
            cases.push(case(prompt, vec![o, x], neg, co));
        }
    }
    // Shared attribute: for every object, a negative of its colour with the next shape, and of
    // its shape with the next colour.
    for &(c, s) in &all {
        let next_shape = Shape::ALL[(Shape::ALL.iter().position(|&x| x == s).unwrap_or(0) + 1) % 4];
        let next_colour = Colour::ALL[(Colour::ALL.iter().position(|&x| x == c).unwrap_or(0) + 1) % 4];
        let sa = Category::SharedAttribute;
        cases.push(case(phrase((c, s)), vec![(c, s)], Unwanted::Object(c, next_shape), sa));
        cases.push(case(phrase((c, s)), vec![(c, s)], Unwanted::Object(next_colour, s), sa));
    }
    // Universal: two objects of two colours and two shapes (40 of the 72 such pairs); the
    // negative is, in turn, one of the other colours or one of the other shapes.
    let pairs = all.iter().enumerate().flat_map(|(i, &a)| all[i + 1..].iter().map(move |&b| (a, b)));
    let pairs: Vec<_> = pairs.filter(|(a, b)| a.0 != b.0 && a.1 != b.1).collect();
    for (p, &(a, b)) in pairs.iter().enumerate().filter(|(p, _)| p % 9 < 5) {
        let unwanted = if p % 2 == 0 {
            let mut unused = Colour::ALL.iter().copied().filter(|&c| c != a.0 && c != b.0);
            Unwanted::Colour(unused.nth(p / 2 % 2).unwrap_or(a.0))
        } else {
            let mut unused = Shape::ALL.iter().copied().filter(|&s| s != a.1 && s != b.1);
            Unwanted::Shape(unused.nth(p / 2 % 2).unwrap_or(a.1))
        };
        cases.push(case(format!("{} and {}", phrase(a), phrase(b)), vec![a, b], unwanted, Category::Universal));
    }
    cases
}

/// The `--quick` suite: the first two cases of each kind.
pub fn quick_suite() -> Vec<Case> {
    let all = default_suite();
    Category::ALL.iter().flat_map(|&cat| all.iter().filter(move |c| c.category == cat).take(2).cloned()).collect()
}

/// How one image fares against its case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Everything the prompt names was found.
    pub positive: bool,
    /// Something the negative names was found.
    pub negative: bool,
    /// The quality proxy ([`super::judge::clean_pixel_share`]).
    pub quality: f32,
}

/// Judge one generated image against its case.
pub fn score(case: &Case, rgb: &[u8], size: usize) -> Outcome {
    let found = super::judge::judge(rgb, size);
    let positive = case.wanted.iter().all(|&(c, s)| found.iter().any(|d| d.colour == c && d.shape == s));
    let negative = found.iter().any(|d| case.unwanted.matches(d));
    Outcome { positive, negative, quality: super::judge::clean_pixel_share(rgb, size) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_shape() {
        let suite = default_suite();
        let count = |cat| suite.iter().filter(|c| c.category == cat).count();
        assert_eq!(
            (count(Category::CoOccurrence), count(Category::SharedAttribute), count(Category::Universal)),
            (32, 32, 40)
        );
        for c in &suite {
            // The negative never names what the prompt wants.
            for &(col, s) in &c.wanted {
                let d = Detected { colour: col, shape: s, cx: 0.0, cy: 0.0, area: 1, solidity: 1.0, fill: 1.0 };
                assert!(!c.unwanted.matches(&d), "{c:?}");
            }
        }
        let mut prompts: Vec<(String, String)> = suite.iter().map(|c| (c.prompt.clone(), c.negative())).collect();
        prompts.sort();
        prompts.dedup();
        assert_eq!(prompts.len(), suite.len(), "duplicate cases");
        assert_eq!(quick_suite().len(), 6);
    }
}
