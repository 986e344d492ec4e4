//! Video writers: each file is read back with an independent reader (the `mp4` crate's box
//! parser and OpenH264's decoder; `image`'s GIF and WebP decoders; PNG) and checked for its
//! frame count, size, timing and pixels; bad paths are refused before anything is written.

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{AnimationDecoder, RgbImage};
use veto::video_io::{check_video_output, frame_name, save_video, tensor_to_frames, write_video, VideoFormat};

/// `n` frames of a smooth, moving picture: what a generated video looks like to an encoder.
fn frames(n: usize, w: u32, h: u32) -> Vec<RgbImage> {
    (0..n)
        .map(|t| {
            RgbImage::from_fn(w, h, |x, y| {
                let t = t as f32;
                let (xf, yf) = (x as f32 / w as f32, y as f32 / h as f32);
                let r = 255.0 * (0.5 + 0.5 * (6.0 * xf + 0.3 * t).sin());
                let g = 255.0 * yf;
                let b = 255.0 * (0.5 + 0.4 * (4.0 * (xf + yf) - 0.2 * t).cos());
                image::Rgb([r as u8, g as u8, b as u8])
            })
        })
        .collect()
}

/// Frames as the decoder hands them over: `[F, 3, H, W]` in [-1, 1].
fn as_tensor(frames: &[RgbImage]) -> Tensor {
    let (w, h) = frames[0].dimensions();
    let data: Vec<f32> = frames.iter().flat_map(|f| f.as_raw().iter().map(|&p| f32::from(p) / 127.5 - 1.0)).collect();
    Tensor::from_vec(data, (frames.len(), h as usize, w as usize, 3), &Device::Cpu)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>() / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

type Mp4Track = (u16, u16, u32, u64, Vec<(Vec<u8>, bool)>);

/// The MP4's single video track: (width, height, timescale, media duration, samples as
/// Annex-B access units with SPS/PPS first).
fn read_mp4(path: &Path) -> Mp4Track {
    let bytes = std::fs::read(path).unwrap();
    let size = bytes.len() as u64;
    let mut reader = mp4::Mp4Reader::read_header(Cursor::new(bytes), size).unwrap();
    assert_eq!(reader.tracks().len(), 1, "one track");
    let (&id, track) = reader.tracks().iter().next().unwrap();
    assert_eq!(track.track_type().unwrap(), mp4::TrackType::Video);
    assert_eq!(track.box_type().unwrap().to_string(), "avc1");
    let (w, h) = (track.width(), track.height());
    let timescale = track.timescale();
    let duration = track.trak.mdia.mdhd.duration;
    let mut head = Vec::new();
    for ps in [track.sequence_parameter_set().unwrap(), track.picture_parameter_set().unwrap()] {
        head.extend_from_slice(&[0, 0, 0, 1]);
        head.extend_from_slice(ps);
    }
    let count = reader.sample_count(id).unwrap();
    let mut samples = Vec::new();
    for s in 1..=count {
        let sample = reader.read_sample(id, s).unwrap().unwrap();
        let mut annex_b = if s == 1 { head.clone() } else { Vec::new() };
        let mut rest: &[u8] = &sample.bytes;
        while !rest.is_empty() {
            let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            annex_b.extend_from_slice(&[0, 0, 0, 1]);
            annex_b.extend_from_slice(&rest[4..4 + n]);
            rest = &rest[4 + n..];
        }
        samples.push((annex_b, sample.is_sync));
    }
    (w, h, timescale, duration, samples)
}

/// Decodes every access unit with OpenH264, returning RGB8 frames.
fn decode_h264(samples: &[(Vec<u8>, bool)], w: usize, h: usize) -> Vec<Vec<u8>> {
    let mut decoder = openh264::decoder::Decoder::new().unwrap();
    let mut out = Vec::new();
    for (unit, _) in samples {
        if let Some(yuv) = decoder.decode(unit).unwrap() {
            let mut rgb = vec![0u8; w * h * 3];
            yuv.write_rgb8(&mut rgb);
            out.push(rgb);
        }
    }
    for yuv in decoder.flush_remaining().unwrap() {
        let mut rgb = vec![0u8; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        out.push(rgb);
    }
    out
}

#[test]
fn mp4_is_h264_with_every_frame_at_its_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let input = frames(17, 64, 48);
    assert_eq!(save_video(&as_tensor(&input), &path, 16).unwrap(), VideoFormat::Mp4);
    let (w, h, timescale, duration, samples) = read_mp4(&path);
    assert_eq!((w, h), (64, 48));
    assert_eq!(samples.len(), 17);
    // 17 frames at 16 fps: 1.0625 s.
    assert_eq!(duration * 16, 17 * u64::from(timescale), "duration {duration} / {timescale}");
    assert!(samples[0].1, "the first frame is a key frame");
    let decoded = decode_h264(&samples, 64, 48);
    assert_eq!(decoded.len(), 17, "every frame decodes");
    for (i, (d, f)) in decoded.iter().zip(&input).enumerate() {
        let p = psnr(d, f.as_raw());
        eprintln!("frame {i}: PSNR {p:.1} dB");
        assert!(p > 32.0, "frame {i}: PSNR {p:.1} dB");
    }
    // Nothing but the video is left in the folder.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn mp4_pads_odd_sizes_and_takes_a_vae_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.mp4");
    let input = frames(5, 33, 21);
    // [1, 3, F, H, W], as a video VAE decodes.
    let t = as_tensor(&input).permute((1, 0, 2, 3)).unwrap().unsqueeze(0).unwrap();
    assert_eq!(tensor_to_frames(&t).unwrap(), input);
    save_video(&t, &path, 8).unwrap();
    let (w, h, timescale, duration, samples) = read_mp4(&path);
    assert_eq!((w, h, samples.len()), (34, 22, 5));
    assert_eq!(duration * 8, 5 * u64::from(timescale));
    let decoded = decode_h264(&samples, 34, 22);
    assert_eq!(decoded.len(), 5);
    // The picture inside the padding matches.
    let inner: Vec<u8> = (0..21).flat_map(|y| decoded[2][y * 34 * 3..(y * 34 + 33) * 3].to_vec()).collect();
    let p = psnr(&inner, input[2].as_raw());
    assert!(p > 30.0, "PSNR {p:.1} dB");
}

#[test]
fn gif_and_webp_are_animated_with_every_frame() {
    let dir = tempfile::tempdir().unwrap();
    let input = frames(9, 40, 24);

    let gif = dir.path().join("a.gif");
    write_video(&input, &gif, 16).unwrap();
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(std::fs::File::open(&gif).unwrap()));
    let back = decoder.unwrap().into_frames().collect_frames().unwrap();
    assert_eq!(back.len(), 9);
    let total_ms: u32 = back.iter().map(|f| f.delay().numer_denom_ms().0 / f.delay().numer_denom_ms().1).sum();
    assert!((total_ms as i32 - 9 * 1000 / 16).abs() <= 10, "{total_ms} ms");
    assert_eq!(back[0].buffer().dimensions(), (40, 24));

    let webp = dir.path().join("a.webp");
    write_video(&input, &webp, 16).unwrap();
    let decoder = image::codecs::webp::WebPDecoder::new(std::io::BufReader::new(std::fs::File::open(&webp).unwrap()));
    let decoder = decoder.unwrap();
    assert!(decoder.has_animation());
    let back = decoder.into_frames().collect_frames().unwrap();
    assert_eq!(back.len(), 9);
    let total_ms: u32 = back.iter().map(|f| f.delay().numer_denom_ms().0 / f.delay().numer_denom_ms().1).sum();
    assert_eq!(total_ms, 563, "9 frames at 16 fps, rounded to ms");
    // Lossless: every pixel comes back.
    for (b, f) in back.iter().zip(&input) {
        let rgb = image::DynamicImage::ImageRgba8(b.buffer().clone()).to_rgb8();
        assert_eq!(&rgb, f);
    }
}

#[test]
fn png_folder_holds_numbered_frames() {
    let dir = tempfile::tempdir().unwrap();
    let input = frames(3, 8, 6);
    let folder = dir.path().join("frames/");
    assert_eq!(check_video_output(&folder).unwrap(), VideoFormat::PngFrames);
    save_video(&as_tensor(&input), &folder, 16).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, [frame_name(0), frame_name(1), frame_name(2)]);
    assert_eq!(names[2], "frame_00002.png");
    assert_eq!(image::open(folder.join(&names[1])).unwrap().to_rgb8(), input[1]);
    // A folder with frames in it is not written over; nothing else is left beside it.
    let e = save_video(&as_tensor(&input), &folder, 16).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A path without an extension is a folder too, an existing empty one is filled.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    write_video(&input, &empty, 16).unwrap();
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 3);
}

#[test]
fn refuses_bad_outputs_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["x.avi", "x.mov", "x.png", "x.jpg"] {
        let e = check_video_output(&dir.path().join(name)).unwrap_err().to_string();
        assert!(e.contains(".mp4 (H.264), .gif, .webp") && e.contains("folder of PNG frames"), "{name}: {e}");
    }
    let e = check_video_output(&dir.path().join("missing/x.mp4")).unwrap_err().to_string();
    assert!(e.contains("output folder does not exist"), "{e}");
    std::fs::create_dir(dir.path().join("d.mp4")).unwrap();
    let e = check_video_output(&dir.path().join("d.mp4")).unwrap_err().to_string();
    assert!(e.contains("is a folder"), "{e}");
    let e = check_video_output(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    let input = frames(2, 8, 8);
    let e = save_video(&as_tensor(&input), &dir.path().join("z.mp4"), 0).unwrap_err().to_string();
    assert!(e.starts_with("fps: "), "{e}");
    let bad = Tensor::zeros((2, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(save_video(&bad, &dir.path().join("z.mp4"), 16).is_err());
    let mixed = vec![input[0].clone(), RgbImage::new(10, 8)];
    let e = write_video(&mixed, &dir.path().join("z.gif"), 16).unwrap_err().to_string();
    assert!(e.contains("share one size"), "{e}");
    // Only the folder made above is there: nothing was half-written.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
