//! Animated GIF (one NeuQuant palette per frame) and animated WebP (lossless frames).
//!
//! No pure-Rust animated-WebP encoder exists on crates.io; `image-webp` encodes one lossless
//! still (a RIFF file holding one `VP8L` chunk), so each frame is encoded that way and its
//! `VP8L` chunk is wrapped in an `ANMF` frame chunk behind `VP8X` and `ANIM` headers, as the
//! WebP container specification lays out.

use std::io::Write;

use image::RgbImage;

use super::frame_durations;
use crate::error::{Error, Result};

/// NeuQuant speed: 1 (best) to 30 (fastest); 10 is gif's own default.
const GIF_QUANT_SPEED: i32 = 10;

/// The WebP format's limit on canvas and frame sides.
const WEBP_MAX_SIDE: u32 = 1 << 14;

/// Writes frames as a looping animated GIF.
pub fn encode_gif(frames: &[RgbImage], fps: u32, w: &mut dyn Write) -> Result<()> {
    let failed = |e: &dyn std::fmt::Display| Error::other(format!("writing GIF: {e}"));
    let first = frames.first().ok_or_else(|| Error::invalid("video has no frames"))?;
    let (width, height) = match (u16::try_from(first.width()), u16::try_from(first.height())) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(Error::invalid(format!("{}x{} is too large for a GIF", first.width(), first.height()))),
    };
    let mut encoder = gif::Encoder::new(w, width, height, &[]).map_err(|e| failed(&e))?;
    encoder.set_repeat(gif::Repeat::Infinite).map_err(|e| failed(&e))?;
    // GIF delays are centiseconds.
    for (frame, delay) in frames.iter().zip(frame_durations(frames.len(), fps, 100)) {
        let mut f = gif::Frame::from_rgb_speed(width, height, frame.as_raw(), GIF_QUANT_SPEED);
        f.delay = delay as u16;
        encoder.write_frame(&f).map_err(|e| failed(&e))?;
    }
    encoder.into_inner().map_err(|e| failed(&e))?;
    Ok(())
}

/// Encodes frames as a looping animated WebP file (bytes).
pub fn encode_webp(frames: &[RgbImage], fps: u32) -> Result<Vec<u8>> {
    let first = frames.first().ok_or_else(|| Error::invalid("video has no frames"))?;
    let (w, h) = first.dimensions();
    if w > WEBP_MAX_SIDE || h > WEBP_MAX_SIDE {
        return Err(Error::invalid(format!("{w}x{h} is too large for a WebP (at most {WEBP_MAX_SIDE} a side)")));
    }
    let mut body = Vec::new();
    // VP8X: the animation flag (bit 1), then the canvas size minus one, 24 bits each.
    let mut vp8x = vec![0b0000_0010, 0, 0, 0];
    vp8x.extend_from_slice(&u24(w - 1));
    vp8x.extend_from_slice(&u24(h - 1));
    chunk(&mut body, b"VP8X", &vp8x);
    // ANIM: background colour (BGRA, opaque black), loop count 0 = forever.
    chunk(&mut body, b"ANIM", &[0, 0, 0, 255, 0, 0]);
    for (i, (frame, ms)) in frames.iter().zip(frame_durations(frames.len(), fps, 1000)).enumerate() {
        let still = lossless_still(frame).map_err(|e| Error::other(format!("writing WebP frame {i}: {e}")))?;
        let vp8l = vp8l_chunk(&still)
            .ok_or_else(|| Error::other(format!("writing WebP frame {i}: the encoder wrote no VP8L chunk")))?;
        // ANMF: offset x/2, y/2 (0), size minus one, duration in ms, flags: no blending (bit 1).
        let mut anmf = Vec::with_capacity(16 + vp8l.len());
        anmf.extend_from_slice(&[0; 6]);
        anmf.extend_from_slice(&u24(w - 1));
        anmf.extend_from_slice(&u24(h - 1));
        anmf.extend_from_slice(&u24(ms as u32));
        anmf.push(0b0000_0010);
        anmf.extend_from_slice(vp8l);
        chunk(&mut body, b"ANMF", &anmf);
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(body.len() as u32 + 4).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&body);
    Ok(out)
}

fn lossless_still(frame: &RgbImage) -> image::ImageResult<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut out).encode(
        frame.as_raw(),
        frame.width(),
        frame.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// The whole `VP8L` chunk (header, payload, padding) of a still WebP file.
fn vp8l_chunk(file: &[u8]) -> Option<&[u8]> {
    if file.get(0..4)? != b"RIFF" || file.get(8..12)? != b"WEBP" {
        return None;
    }
    let mut at = 12;
    while at + 8 <= file.len() {
        let size = u32::from_le_bytes(file[at + 4..at + 8].try_into().ok()?) as usize;
        let end = at + 8 + size + size % 2;
        if &file[at..at + 4] == b"VP8L" {
            return file.get(at..end.min(file.len()));
        }
        at = end;
    }
    None
}

/// Appends a RIFF chunk, padded to an even size.
fn chunk(out: &mut Vec<u8>, fourcc: &[u8; 4], payload: &[u8]) {
    out.extend_from_slice(fourcc);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    if payload.len() % 2 == 1 {
        out.push(0);
    }
}

fn u24(v: u32) -> [u8; 3] {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}
