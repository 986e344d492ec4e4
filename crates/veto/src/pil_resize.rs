//! Pillow's `Image.resize` for 8-bit RGB images, to the last bit: what diffusers'
//! `VaeImageProcessor` (Lanczos) and transformers' `CLIPImageProcessor` (bicubic) run on PIL
//! inputs. A pipeline fed a PNG then sees the same pixels as the Python one, so parity holds
//! through the preprocessing too.
//!
//! Pillow's algorithm (`libImaging/Resample.c`): separable, the horizontal pass first; per output
//! position the kernel is centred at `(o + 0.5) * scale` and widened by the scale when shrinking
//! (antialiasing); weights are normalized, turned into fixed point with 22 fractional bits, and
//! each pass rounds and clamps to 8 bits.

use image::RgbImage;

/// Pillow's resampling filters (its `Image.Resampling` codes in [`Filter::from_pil_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Triangle, support 1 (`BILINEAR`, code 2).
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (`BICUBIC`, code 3).
    Bicubic,
    /// Sinc windowed by sinc(x/3), support 3 (`LANCZOS`, code 1).
    Lanczos,
}

impl Filter {
    /// The filter of a PIL resample code (as configs store it); `None` for the ones we lack.
    pub fn from_pil_code(code: u32) -> Option<Filter> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point precision of the weights (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 22;

/// For each output position: the first input index and the fixed-point weights.
fn weights(filter: Filter, in_len: usize, out_len: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_len as f64 / out_len as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let one = (1i64 << PRECISION_BITS) as f64;
    (0..out_len)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // C's truncating casts, as Pillow's.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_len as i64) as usize;
            let raw: Vec<f64> = (lo..hi).map(|i| filter.weight((i as f64 - center + 0.5) / filter_scale)).collect();
            let sum: f64 = raw.iter().sum();
            let fixed = raw
                .iter()
                .map(|&k| {
                    let k = if sum != 0.0 { k / sum } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one) as i64
                    } else {
                        (0.5 + k * one) as i64
                    }
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

/// Pillow's `clip8`: the accumulator (with its rounding half already added) to 8 bits.
fn to_u8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize interleaved 8-bit RGB `data` (`h` rows of `w` pixels) to `out_h x out_w`.
pub fn resize_rgb(data: &[u8], w: usize, h: usize, out_w: usize, out_h: usize, filter: Filter) -> Vec<u8> {
    assert_eq!(data.len(), w * h * 3, "resize_rgb: {w}x{h} RGB needs {} bytes", w * h * 3);
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut cur = data.to_vec();
    let mut cur_w = w;
    if out_w != w {
        let ws = weights(filter, w, out_w);
        let mut out = vec![0u8; h * out_w * 3];
        for y in 0..h {
            let row = &cur[y * w * 3..(y + 1) * w * 3];
            for (x, (lo, ks)) in ws.iter().enumerate() {
                for ch in 0..3 {
                    let acc = ks.iter().enumerate().fold(half, |acc, (j, k)| acc + row[(lo + j) * 3 + ch] as i64 * k);
                    out[(y * out_w + x) * 3 + ch] = to_u8(acc);
                }
            }
        }
        cur = out;
        cur_w = out_w;
    }
    if out_h != h {
        let ws = weights(filter, h, out_h);
        let mut out = vec![0u8; out_h * cur_w * 3];
        for (y, (lo, ks)) in ws.iter().enumerate() {
            for x in 0..cur_w {
                for ch in 0..3 {
                    let acc = ks
                        .iter()
                        .enumerate()
                        .fold(half, |acc, (j, k)| acc + cur[((lo + j) * cur_w + x) * 3 + ch] as i64 * k);
                    out[(y * cur_w + x) * 3 + ch] = to_u8(acc);
                }
            }
        }
        cur = out;
    }
    cur
}

/// [`resize_rgb`] on an [`RgbImage`] (`PIL.Image.resize((width, height), filter)`).
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w, h) = image.dimensions();
    let data = resize_rgb(image.as_raw(), w as usize, h as usize, width as usize, height as usize, filter);
    RgbImage::from_raw(width, height, data).expect("resize_rgb returns width x height x 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_images_stay_flat_for_every_filter() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            let out = resize_rgb(&[200; 7 * 5 * 3], 7, 5, 11, 3, filter);
            assert!(out.iter().all(|&v| v == 200), "{filter:?}");
        }
    }

    #[test]
    fn same_size_is_the_identity() {
        let data: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_rgb(&data, 4, 3, 4, 3, Filter::Lanczos), data);
    }

    #[test]
    fn lanczos_overshoots_and_clamps_at_an_edge() {
        // A hard black/white edge upsampled: Lanczos rings; values stay within 0..=255 and the
        // ringing shows as pure 0 / 255 next to the edge, as in Pillow.
        let mut data = vec![0u8; 8 * 3];
        data[12..].fill(255);
        let out = resize_rgb(&data, 8, 1, 16, 1, Filter::Lanczos);
        assert_eq!(out.len(), 48);
        assert_eq!(out[0], 0);
        assert_eq!(out[47], 255);
    }

    #[test]
    fn pil_codes() {
        assert_eq!(Filter::from_pil_code(1), Some(Filter::Lanczos));
        assert_eq!(Filter::from_pil_code(3), Some(Filter::Bicubic));
        assert_eq!(Filter::from_pil_code(0), None);
    }
}
