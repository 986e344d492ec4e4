//! A small RGB canvas for the evaluation's grid and plot PNGs: rectangles, lines, tiles and
//! text in a built-in 5x7 font (no font files, no plotting crate: it builds offline).

use crate::error::Result;
use image::RgbImage;
use std::path::Path;

/// An RGB image being drawn.
pub struct Canvas {
    img: RgbImage,
}

/// 5x7 glyphs, one row per byte (bit 4 is the leftmost pixel), for the characters labels use.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [30, 17, 17, 17, 17, 17, 30],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 17, 10, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '%' => [24, 25, 2, 4, 8, 19, 3],
        '/' => [0, 1, 2, 4, 8, 16, 0],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        _ => [0; 7],
    }
}

impl Canvas {
    /// A `width × height` canvas filled with `background`.
    pub fn new(width: u32, height: u32, background: [u8; 3]) -> Self {
        Canvas { img: RgbImage::from_pixel(width, height, image::Rgb(background)) }
    }

    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, image::Rgb(c));
        }
    }

    /// A filled rectangle.
    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.put(xx, yy, c);
            }
        }
    }

    /// A line `thickness` pixels wide.
    pub fn line(&mut self, (x0, y0): (f32, f32), (x1, y1): (f32, f32), thickness: i64, c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for k in 0..=n {
            let t = k as f32 / n as f32;
            let (x, y) = ((x0 + t * (x1 - x0)).round() as i64, (y0 + t * (y1 - y0)).round() as i64);
            self.rect(x - thickness / 2, y - thickness / 2, thickness, thickness, c);
        }
    }

    /// An RGB tile (`size × size`, row-major bytes), each pixel drawn as `scale × scale`.
    pub fn tile(&mut self, x: i64, y: i64, rgb: &[u8], size: usize, scale: i64) {
        for py in 0..size {
            for px in 0..size {
                let p = (py * size + px) * 3;
                let c = [rgb[p], rgb[p + 1], rgb[p + 2]];
                self.rect(x + px as i64 * scale, y + py as i64 * scale, scale, scale, c);
            }
        }
    }

    /// Text in the 5x7 font at `scale`, top-left at (x, y); returns its width in pixels.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: [u8; 3]) -> i64 {
        for (i, ch) in text.chars().enumerate() {
            let ox = x + i as i64 * 6 * scale;
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5u8 {
                    if bits & (16 >> col) != 0 {
                        self.rect(ox + i64::from(col) * scale, y + row as i64 * scale, scale, scale, c);
                    }
                }
            }
        }
        Self::text_width(text, scale)
    }

    /// Width of `text` at `scale`.
    pub fn text_width(text: &str, scale: i64) -> i64 {
        text.chars().count() as i64 * 6 * scale
    }

    /// Write as PNG.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::image_io::write_png(&self.img, path)
    }

    /// The pixels.
    pub fn image(&self) -> &RgbImage {
        &self.img
    }
}
