//! The arithmetic limit of each method's overhead: the multiply-adds a method adds to one
//! denoising step divided by the baseline's, counted from the model's shape (linear layers,
//! convolutions and the two attention products; norms, softmax, modulation and elementwise work
//! are left out as small). A perfect implementation of the method would pay this much; `veto
//! bench` prints it next to each measured ratio.

/// Overheads as fractions of the baseline (0.5 = +50%); `None` where a method does not apply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub nag: f64,
    pub vsf: Option<f64>,
    pub cfg: f64,
    /// Flux's shared-image NAG variant.
    pub shared_image: Option<f64>,
    /// The baseline's multiply-adds per step.
    pub base_macs: f64,
}

impl Limits {
    /// "NAG +26%, VSF +1%, CFG +100%" (with Flux's shared-image variant where it has one).
    pub fn describe(&self) -> String {
        let pct = |f: f64| format!("{:+.0}%", f * 100.0);
        let mut parts = vec![format!("NAG {}", pct(self.nag))];
        if let Some(v) = self.vsf {
            parts.push(format!("VSF {}", pct(v)));
        }
        parts.push(format!("CFG {}", pct(self.cfg)));
        if let Some(s) = self.shared_image {
            parts.push(format!("shared-image {}", pct(s)));
        }
        parts.join(", ")
    }
}

/// Multiply-adds of one token through a transformer block's linear layers: q, k, v and out
/// projections (4d²) and an MLP of ratio `r` (2r·d²). Flux's single blocks fuse the same
/// layers differently (d → 3d + r·d, then d + r·d → d): the same 4 + 2r.
fn block_linear(d: f64, r: f64) -> f64 {
    d * d * (4.0 + 2.0 * r)
}

/// Multiply-adds of attention of `nq` queries over `nk` keys at width `d` (scores and values).
fn attention(nq: f64, nk: f64, d: f64) -> f64 {
    2.0 * nq * nk * d
}

/// A joint (two-stream) block on `a` tokens of one stream and `b` of the other.
fn joint_block(a: f64, b: f64, d: f64, r: f64) -> f64 {
    (a + b) * block_linear(d, r) + attention(a + b, a + b, d)
}

/// A second text stream of `t` tokens beside `i` shared image tokens: its linear layers, the
/// image queries over its keys, and its queries over the image and itself.
fn negative_text(i: f64, t: f64, d: f64, r: f64) -> f64 {
    t * block_linear(d, r) + attention(i, t, d) + attention(t, i + t, d)
}

/// Flux: `double` + `single` blocks of width `d`, `img` image and `txt` text tokens. NAG as the
/// official code: a negative text stream in the double blocks, a whole second stream (its own
/// image tokens and modulation) in the single blocks; the shared-image variant: a negative text
/// stream in every block. CFG: a second pass.
pub fn flux(d: usize, double: usize, single: usize, img: usize, txt: usize) -> Limits {
    let (d, i, t, r) = (d as f64, img as f64, txt as f64, 4.0);
    let block = joint_block(i, t, d, r);
    let base = (double + single) as f64 * block;
    let nag = double as f64 * negative_text(i, t, d, r) + single as f64 * block;
    let shared = (double + single) as f64 * negative_text(i, t, d, r);
    Limits { nag: nag / base, vsf: None, cfg: 1.0, shared_image: Some(shared / base), base_macs: base }
}

/// SD3 MMDiT: `blocks` joint blocks of width `d`, `img` image and `ctx` context tokens; NAG adds
/// a negative context stream of `ctx` tokens, VSF one of `vsf_tokens` (unpadded) whose values
/// the image attends to; CFG batches a second row.
pub fn mmdit(d: usize, blocks: usize, img: usize, ctx: usize, vsf_tokens: usize) -> Limits {
    let (d, i, c, v, r) = (d as f64, img as f64, ctx as f64, vsf_tokens as f64, 4.0);
    let base = blocks as f64 * joint_block(i, c, d, r);
    let nag = blocks as f64 * negative_text(i, c, d, r);
    let vsf = blocks as f64 * (v * block_linear(d, r) + attention(i, v, d) + attention(v, i + c + v, d));
    Limits { nag: nag / base, vsf: Some(vsf / base), cfg: 1.0, shared_image: None, base_macs: base }
}

/// A diffusers `UNet2DConditionModel` (SD1.5, SDXL): `channels` per level, transformer `depths`
/// per level (0: no attention) and in the middle, `layers` resnets per down level, a `side`² latent,
/// `ctx` text tokens of width `ctx_dim`. NAG adds, in every cross-attention, the key/value
/// projections of the negative text and the image queries over it; VSF the same for the
/// unpadded negative of `vsf_tokens`.
#[allow(clippy::too_many_arguments)]
pub fn unet(
    channels: &[usize],
    depths: &[usize],
    mid_depth: usize,
    layers: usize,
    side: usize,
    ctx: usize,
    ctx_dim: usize,
    vsf_tokens: usize,
) -> Limits {
    let levels = channels.len();
    let n_at = |level: usize| ((side >> level) * (side >> level)) as f64;
    let resnet = |cin: usize, cout: usize, n: f64| {
        let (ci, co) = (cin as f64, cout as f64);
        9.0 * ci * co * n + 9.0 * co * co * n + if cin != cout { ci * co * n } else { 0.0 }
    };
    // One transformer model of `depth` basic blocks at width `c` over `n` tokens: proj in/out,
    // self-attention, cross-attention (queries/out on the image; keys/values of the text),
    // GEGLU feed-forward (c -> 8c, 4c -> c). `neg`: the extra of one more text of `t` tokens.
    let transformer = |c: usize, n: f64, depth: usize, t: f64| {
        let c = c as f64;
        let block = 4.0 * c * c * n
            + attention(n, n, c)
            + 2.0 * c * c * n
            + 2.0 * t * ctx_dim as f64 * c
            + attention(n, t, c)
            + 12.0 * c * c * n;
        2.0 * c * c * n + depth as f64 * block
    };
    let extra_text = |c: usize, n: f64, depth: usize, t: f64| {
        let c = c as f64;
        depth as f64 * (2.0 * t * ctx_dim as f64 * c + attention(n, t, c))
    };
    let ctx = ctx as f64;
    // conv_in (4 -> c0), counted with conv_out below.
    let (mut base, mut nag, mut vsf) = (9.0 * 4.0 * channels[0] as f64 * n_at(0), 0.0, 0.0);
    // A level's transformer (none at depth 0): (baseline, NAG extra, VSF extra).
    let attend = |c: usize, n: f64, depth: usize| {
        if depth == 0 {
            return (0.0, 0.0, 0.0);
        }
        (transformer(c, n, depth, ctx), extra_text(c, n, depth, ctx), extra_text(c, n, depth, vsf_tokens as f64))
    };
    let mut add = |(b, g, v): (f64, f64, f64)| {
        base += b;
        nag += g;
        vsf += v;
    };
    // Down path: the skip connections' channels, for the up path.
    let mut skips = vec![channels[0]];
    let mut cin = channels[0];
    for (level, &c) in channels.iter().enumerate() {
        let n = n_at(level);
        for _ in 0..layers {
            add((resnet(cin, c, n), 0.0, 0.0));
            add(attend(c, n, depths[level]));
            cin = c;
            skips.push(c);
        }
        if level + 1 < levels {
            add((9.0 * (c * c) as f64 * n_at(level + 1), 0.0, 0.0));
            skips.push(c);
        }
    }
    // Middle: resnet, transformer, resnet at the last level.
    let last = levels - 1;
    add((2.0 * resnet(channels[last], channels[last], n_at(last)), 0.0, 0.0));
    add(attend(channels[last], n_at(last), mid_depth));
    // Up path: `layers + 1` resnets per level on the concatenated skips, then an upsampler.
    let mut prev = channels[last];
    for level in (0..levels).rev() {
        let (c, n) = (channels[level], n_at(level));
        for _ in 0..=layers {
            let skip = skips.pop().unwrap_or(c);
            add((resnet(prev + skip, c, n), 0.0, 0.0));
            add(attend(c, n, depths[level]));
            prev = c;
        }
        if level > 0 {
            add((9.0 * (c * c) as f64 * n_at(level - 1), 0.0, 0.0));
        }
    }
    add((9.0 * channels[0] as f64 * 4.0 * n_at(0), 0.0, 0.0));
    Limits { nag: nag / base, vsf: Some(vsf / base), cfg: 1.0, shared_image: None, base_macs: base }
}

/// Wan2.1's transformer: `blocks` blocks of width `d` with a feed-forward of `ffn` channels,
/// `video` latent tokens, `text` context rows (512). NAG (official: `attn2` only) adds the key
/// and value projections of the negative text, the video queries over it and its text
/// embedding; VSF keeps the 512 rows (the positive padded to 512 - n, the negative n), so it adds
/// nothing countable; CFG a second row.
pub fn wan(d: usize, ffn: usize, blocks: usize, video: usize, text: usize, text_dim: usize) -> Limits {
    let (d, f, n, t, td) = (d as f64, ffn as f64, video as f64, text as f64, text_dim as f64);
    let block =
        4.0 * d * d * n + attention(n, n, d) + 2.0 * d * d * n + 2.0 * d * d * t + attention(n, t, d) + 2.0 * d * f * n;
    let text_embed = t * (td * d + d * d);
    let base = blocks as f64 * block + text_embed;
    let nag = blocks as f64 * (2.0 * d * d * t + attention(n, t, d)) + text_embed;
    Limits { nag: nag / base, vsf: Some(0.0), cfg: 1.0, shared_image: None, base_macs: base }
}

/// PixArt-Sigma: `blocks` blocks of width `d` (self-attention, cross-attention at width `d`, MLP
/// of ratio 4) on `img` image tokens, `ctx` caption tokens of width `caption` (projected once per
/// call by a two-layer MLP). The pipeline attends only a caption's real tokens, so NAG and VSF
/// add the same for a negative of `neg` tokens: per block its key/value projections and the
/// image queries over it, plus its projection.
pub fn pixart(d: usize, blocks: usize, img: usize, ctx: usize, caption: usize, neg: usize) -> Limits {
    let (d, n, t, c) = (d as f64, img as f64, ctx as f64, caption as f64);
    let cross = |t: f64| 2.0 * d * d * n + 2.0 * t * d * d + attention(n, t, d);
    let block = 4.0 * d * d * n + attention(n, n, d) + cross(t) + 8.0 * d * d * n;
    let project = |t: f64| t * (c * d + d * d);
    let base = blocks as f64 * block + project(t);
    let extra = |t: f64| blocks as f64 * (2.0 * t * d * d + attention(n, t, d)) + project(t);
    let neg = extra(neg as f64) / base;
    Limits { nag: neg, vsf: Some(neg), cfg: 1.0, shared_image: None, base_macs: base }
}

/// SANA: `blocks` blocks of width `d` (linear self-attention of head width `head_dim`, cross-
/// attention at width `d`, Mix-FFN of hidden width `hidden` with a 3x3 depthwise convolution) on
/// `img` image tokens, `ctx` caption tokens of width `caption` (projected once per call). NAG
/// adds, per block, the key/value projections of the negative caption and the image queries over
/// it, plus its projection; VSF the same for an unpadded negative of `vsf_tokens`.
#[allow(clippy::too_many_arguments)]
pub fn sana(
    d: usize,
    head_dim: usize,
    hidden: usize,
    blocks: usize,
    img: usize,
    ctx: usize,
    caption: usize,
    vsf_tokens: usize,
) -> Limits {
    let (d, dh, h, n, t, c) = (d as f64, head_dim as f64, hidden as f64, img as f64, ctx as f64, caption as f64);
    // Linear attention: sum of k v^T and its product with q, per head (d / dh heads of dh x dh).
    let self_attn = 4.0 * d * d * n + 2.0 * n * d * dh;
    let cross = |t: f64| 2.0 * d * d * n + 2.0 * t * d * d + attention(n, t, d);
    let ffn = n * (3.0 * h * d + 18.0 * h);
    let project = |t: f64| t * (c * d + d * d);
    let base = blocks as f64 * (self_attn + cross(t) + ffn) + project(t);
    let extra = |t: f64| blocks as f64 * (2.0 * t * d * d + attention(n, t, d)) + project(t);
    Limits {
        nag: extra(t) / base,
        vsf: Some(extra(vsf_tokens as f64) / base),
        cfg: 1.0,
        shared_image: None,
        base_macs: base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sana_nag_is_a_few_percent_at_1024() {
        // SANA 1.6B at 1024^2: 1024 image tokens, 300 caption tokens.
        let l = sana(2240, 32, 5600, 20, 1024, 300, 2304, 16);
        assert!(l.nag > 0.02 && l.nag < 0.15, "{}", l.nag);
        assert!(l.vsf.unwrap() < l.nag);
    }

    /// Real FLUX.1 at 512² (1024 image, 256 text tokens): the single blocks double, the double
    /// blocks add a fifth — about +74% by construction, whatever the depth at the real 1:2 ratio.
    #[test]
    fn flux_nag_is_dominated_by_the_single_blocks() {
        let real = flux(3072, 19, 38, 1024, 256);
        let bench = flux(3072, 1, 2, 1024, 256);
        assert!((real.nag - bench.nag).abs() < 1e-9);
        assert!((0.70..0.78).contains(&real.nag), "{}", real.nag);
        assert_eq!(real.cfg, 1.0);
        assert!(flux(3072, 19, 0, 1024, 256).nag < 0.3, "double blocks alone add only the text");
    }

    #[test]
    fn mmdit_shares_shrink_with_the_image() {
        let small = mmdit(2432, 38, 1024, 333, 16);
        let large = mmdit(2432, 38, 4096, 333, 16);
        assert!(large.nag < small.nag && large.vsf.unwrap() < small.vsf.unwrap());
        assert!(small.vsf.unwrap() < 0.05 && small.nag > 0.2, "{small:?}");
    }

    /// Wan2.1-T2V-1.3B at 480p / 81 frames (32760 video tokens, 512 text rows): NAG's second
    /// text attention is about 1%; at the bench's few frames it weighs more.
    #[test]
    fn wan_nag_is_small_at_video_sizes() {
        let real = wan(1536, 8960, 30, 21 * 30 * 52, 512, 4096);
        assert!(real.nag > 0.0 && real.nag < 0.05, "{real:?}");
        let small = wan(1536, 8960, 1, 2 * 16 * 16, 512, 4096);
        assert!(small.nag > real.nag, "{small:?}");
    }

    #[test]
    fn pixart_extra_is_the_caption_share() {
        // PixArt-Sigma at 1024^2: 4096 image tokens, 120 caption and 16 negative tokens, 28 blocks.
        let l = pixart(1152, 28, 4096, 120, 4096, 16);
        assert!(l.nag > 0.0 && l.nag < 0.01, "{l:?}");
        assert_eq!(l.vsf, Some(l.nag));
        // A longer negative, or fewer image tokens: the negative weighs more.
        assert!(pixart(1152, 28, 4096, 120, 4096, 120).nag > 5.0 * l.nag);
        assert!(pixart(1152, 28, 1024, 120, 4096, 16).nag > l.nag);
    }

    #[test]
    fn unet_nag_is_a_few_percent() {
        let sdxl = unet(&[320, 640, 1280], &[0, 2, 10], 10, 2, 128, 77, 2048, 16);
        assert!(sdxl.nag > 0.0 && sdxl.nag < 0.1, "{sdxl:?}");
        assert!(sdxl.vsf.unwrap() < sdxl.nag);
    }
}
