//! H.264 in MP4: frames encoded by OpenH264 (built from its bundled source), muxed by the `mp4`
//! crate. The encoder writes Annex-B NAL units (start codes); an MP4 `avc1` track wants the SPS
//! and PPS once in its `avcC` box and each frame as length-prefixed NAL units.

use std::io::Cursor;

use image::RgbImage;
use mp4::{AvcConfig, FourCC, MediaConfig, Mp4Config, Mp4Sample, Mp4Writer, TrackConfig, TrackType};
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, RateControlMode, VuiConfig};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;

use super::frame_durations;
use crate::error::{Error, Result};

/// MP4 media time units per frame: the track's timescale is `fps × TICKS_PER_FRAME`.
const TICKS_PER_FRAME: u32 = 1000;

/// Target bits per pixel per frame: generous for H.264 (about 1.9 Mbit/s for 832×480 at 16 fps),
/// so generated detail survives; never below `MIN_BITRATE`, which small videos need.
const BITS_PER_PIXEL: f64 = 0.3;
const MIN_BITRATE: f64 = 2_000_000.0;

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::other(format!("writing MP4: {what}: {e}"))
}

/// Encodes RGB8 frames of one size as an H.264 MP4 file (bytes). Odd widths or heights are
/// padded by repeating the last column or row, since 4:2:0 H.264 needs even sizes.
pub fn encode_mp4(frames: &[RgbImage], fps: u32) -> Result<Vec<u8>> {
    let first = frames.first().ok_or_else(|| Error::invalid("video has no frames"))?;
    let (w, h) = even_size(first.width(), first.height());
    let (width, height) = match (u16::try_from(w), u16::try_from(h)) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(Error::invalid(format!("{w}x{h} is too large for an MP4 video"))),
    };
    let bitrate =
        (f64::from(w) * f64::from(h) * f64::from(fps) * BITS_PER_PIXEL).clamp(MIN_BITRATE, f64::from(u32::MAX)) as u32;
    let config = EncoderConfig::new()
        .bitrate(BitRate::from_bps(bitrate))
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .rate_control_mode(RateControlMode::Quality)
        // Every frame must come out: a skipped frame would shorten the video.
        .skip_frames(false)
        .intra_frame_period(IntraFramePeriod::from_num_frames(fps * 2))
        .vui(VuiConfig::bt601());
    let mut encoder =
        Encoder::with_api_config(OpenH264API::from_source(), config).map_err(|e| failed("H.264 encoder", e))?;

    let mut parameter_sets: Option<(Vec<u8>, Vec<u8>)> = None;
    let mut samples = Vec::with_capacity(frames.len());
    for (i, frame) in frames.iter().enumerate() {
        let rgb = padded_rgb(frame, w, h);
        let yuv = YUVBuffer::from_rgb8_source(RgbSliceU8::new(&rgb, (w as usize, h as usize)));
        let stream = encoder.encode(&yuv).map_err(|e| failed(&format!("encoding frame {i}"), e))?;
        let (mut sps, mut pps, mut sample, mut is_sync) = (None, None, Vec::new(), false);
        for layer in (0..stream.num_layers()).filter_map(|l| stream.layer(l)) {
            for nal in (0..layer.nal_count()).filter_map(|n| layer.nal_unit(n)) {
                let nal = strip_start_code(nal);
                let Some(&header) = nal.first() else { continue };
                match header & 0x1f {
                    NAL_SPS => sps = Some(nal.to_vec()),
                    NAL_PPS => pps = Some(nal.to_vec()),
                    kind => {
                        is_sync |= kind == NAL_IDR;
                        sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                        sample.extend_from_slice(nal);
                    }
                }
            }
        }
        if sample.is_empty() {
            return Err(failed(&format!("frame {i}"), "the encoder produced no picture"));
        }
        if let Some((s0, p0)) = &parameter_sets {
            // A constant-id encoder repeats the same sets at each IDR; other sets would need a
            // second sample description.
            if sps.as_ref().is_some_and(|s| s != s0) || pps.as_ref().is_some_and(|p| p != p0) {
                return Err(failed(&format!("frame {i}"), "the encoder changed its SPS/PPS mid-stream"));
            }
        } else {
            match (sps, pps) {
                (Some(s), Some(p)) => parameter_sets = Some((s, p)),
                _ => return Err(failed("frame 0", "the encoder wrote no SPS/PPS")),
            }
        }
        samples.push((sample, is_sync));
    }
    let (sps, pps) = parameter_sets.ok_or_else(|| Error::invalid("video has no frames"))?;
    if sps.len() < 4 {
        return Err(failed("SPS", "shorter than 4 bytes"));
    }
    mux(samples, sps, pps, width, height, fps)
}

/// The MP4 file: one `avc1` video track, samples `TICKS_PER_FRAME` apart.
fn mux(
    samples: Vec<(Vec<u8>, bool)>,
    sps: Vec<u8>,
    pps: Vec<u8>,
    width: u16,
    height: u16,
    fps: u32,
) -> Result<Vec<u8>> {
    let config = Mp4Config {
        major_brand: FourCC::from(*b"isom"),
        minor_version: 512,
        compatible_brands: [b"isom", b"iso2", b"avc1", b"mp41"].map(|b| FourCC::from(*b)).to_vec(),
        timescale: 1000,
    };
    let mut writer = Mp4Writer::write_start(Cursor::new(Vec::new()), &config).map_err(|e| failed("header", e))?;
    let timescale = fps.checked_mul(TICKS_PER_FRAME).ok_or_else(|| failed("timescale", "frame rate too high"))?;
    writer
        .add_track(&TrackConfig {
            track_type: TrackType::Video,
            timescale,
            language: "und".into(),
            media_conf: MediaConfig::AvcConfig(AvcConfig { width, height, seq_param_set: sps, pic_param_set: pps }),
        })
        .map_err(|e| failed("track", e))?;
    let durations = frame_durations(samples.len(), fps, u64::from(timescale));
    let mut start = 0u64;
    for (i, ((bytes, is_sync), duration)) in samples.into_iter().zip(durations).enumerate() {
        let duration = duration as u32;
        let sample = Mp4Sample { start_time: start, duration, rendering_offset: 0, is_sync, bytes: bytes.into() };
        writer.write_sample(1, &sample).map_err(|e| failed(&format!("frame {i}"), e))?;
        start += u64::from(duration);
    }
    writer.write_end().map_err(|e| failed("index", e))?;
    Ok(writer.into_writer().into_inner())
}

/// A frame's size rounded up to even.
fn even_size(w: u32, h: u32) -> (u32, u32) {
    (w + w % 2, h + h % 2)
}

/// The frame's RGB bytes at `w`×`h` (its own size or one more), edges repeated.
fn padded_rgb(frame: &RgbImage, w: u32, h: u32) -> Vec<u8> {
    if frame.dimensions() == (w, h) {
        return frame.as_raw().clone();
    }
    let (fw, fh) = frame.dimensions();
    let mut out = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            out.extend_from_slice(&frame.get_pixel(x.min(fw - 1), y.min(fh - 1)).0);
        }
    }
    out
}

/// A NAL unit without its Annex-B start code (`00 00 01` or `00 00 00 01`).
fn strip_start_code(nal: &[u8]) -> &[u8] {
    let zeros = nal.iter().take_while(|&&b| b == 0).count();
    if zeros >= 2 && nal.get(zeros) == Some(&1) {
        &nal[zeros + 1..]
    } else {
        nal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_codes_and_padding() {
        assert_eq!(strip_start_code(&[0, 0, 0, 1, 0x67, 9]), &[0x67, 9]);
        assert_eq!(strip_start_code(&[0, 0, 1, 0x68]), &[0x68]);
        assert_eq!(strip_start_code(&[0x65, 1]), &[0x65, 1]);
        assert_eq!(even_size(5, 4), (6, 4));
        let img = RgbImage::from_fn(3, 1, |x, _| image::Rgb([x as u8, 0, 0]));
        let p = padded_rgb(&img, 4, 2);
        assert_eq!(p.len(), 4 * 2 * 3);
        assert_eq!((p[9], p[21]), (2, 2));
    }
}
