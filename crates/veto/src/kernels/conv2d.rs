//! 2-d convolution on the CPU (f32, any stride, no dilation, one group: every convolution of
//! the UNet, its attention projections and the VAEs) without im2col.
//!
//! At stride 1, with the input zero-padded to `Hp x Wp` and flattened per channel, output pixel
//! `(y, x)` reads tap `(i, j)` at `(y + i) * Wp + (x + j)`: for every output laid out on rows of
//! `Wp` (the last columns of each row are computed and dropped) the tap is the same matrix,
//! `[C_in, Ho * Wp]`, shifted by `i * Wp + j`. So the convolution is `kh * kw` GEMMs
//! `W[:, :, i, j] · X_shifted` accumulating into one output — no patch matrix `kh * kw` times the
//! input's size is built (candle's tiled im2col gathers one element at a time and reshapes the
//! kernel on every call). At stride `s` the padded input is split into `s²` phase planes
//! (`phase(p, q)[u][v] = padded[u s + p][v s + q]`); tap `(i, j)` is then the stride-1 shift
//! `(i / s, j / s)` of phase `(i % s, j % s)`, and the same GEMMs apply.

use candle_core::{Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Output columns per block: with up to a few hundred channels in and out, a block's output
/// and the input rows its taps read fit a core's L2 cache.
const CONV_COLUMNS: usize = 256;

/// `conv2d(x, w) + bias` for `x` `[B, C_in, H, W]`, `w` `[C_out, C_in, kh, kw]`, `bias`
/// `[C_out]`, with `stride` and `padding` on every side. `None` unless all are f32 on the CPU
/// (the caller then runs candle's convolution).
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Option<Tensor>> {
    let cpu_f32 = super::is_cpu_f32;
    if !(cpu_f32(x) && cpu_f32(w) && bias.is_none_or(cpu_f32)) {
        return Ok(None);
    }
    let (b, cin, h, wd) = x.dims4()?;
    let (cout, wcin, kh, kw) = w.dims4()?;
    let (hp, wp) = (h + 2 * padding, wd + 2 * padding);
    if wcin != cin || kh == 0 || kw == 0 || stride == 0 || hp < kh || wp < kw {
        candle_core::bail!("conv2d: input {:?}, kernel {:?}, stride {stride}, padding {padding}", x.dims(), w.dims());
    }
    if let Some(bias) = bias {
        if bias.dims() != [cout] {
            candle_core::bail!("conv2d: bias {:?} for {cout} output channels", bias.dims());
        }
    }
    let s = stride;
    let (ho, wo) = ((hp - kh) / s + 1, (wp - kw) / s + 1);
    // Phase planes of hq x wq; outputs on rows of wq (wq >= wo), the extra columns dropped.
    let (hq, wq) = (hp.div_ceil(s), wp.div_ceil(s));
    let (plane, wide, phases) = (hq * wq, ho * wq, s * s);

    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let (gx, lx) = x.storage_and_layout();
    let xs = super::f32_slice(&gx, lx)?;
    let (gw, lw) = w.storage_and_layout();
    let ws = super::f32_slice(&gw, lw)?;
    let gb = bias.as_ref().map(|b| b.storage_and_layout());
    let bs = gb.as_ref().map(|(g, l)| super::f32_slice(g, l)).transpose()?;

    // `[B, phase, C_in, hq, wq]`, plus slack: the dropped columns of the last rows read up to
    // `wq + kw` elements past the last plane.
    let planes_owned;
    let planes: &[f32] = if padding == 0 && s == 1 && kh == 1 && kw == 1 {
        xs
    } else {
        let mut p = vec![0f32; b * phases * cin * plane + wq + kw];
        p[..b * phases * cin * plane].par_chunks_mut(plane).enumerate().for_each(|(index, dst)| {
            let (c, phase, bi) = (index % cin, index / cin % phases, index / (cin * phases));
            let (pi, pj) = (phase / s, phase % s);
            let src = &xs[(bi * cin + c) * h * wd..][..h * wd];
            for (u, row) in dst.chunks_exact_mut(wq).enumerate() {
                // Padded row u s + pi is input row u s + pi - padding, when inside.
                let Some(y) = (u * s + pi).checked_sub(padding).filter(|&y| y < h) else { continue };
                let src_row = &src[y * wd..(y + 1) * wd];
                for (v, out) in row.iter_mut().enumerate() {
                    if let Some(xi) = (v * s + pj).checked_sub(padding).filter(|&xi| xi < wd) {
                        *out = src_row[xi];
                    }
                }
            }
        });
        planes_owned = p;
        &planes_owned
    };

    // The output in blocks of (output channels x columns) small enough to stay in a core's L2
    // cache while all `kh * kw` taps accumulate into it (one GEMM per tap over the whole output
    // would stream it through memory `kh * kw` times); the blocks run in parallel, each GEMM on
    // one thread. Output channels are split only when there are too few column blocks to share.
    let mut out_wide = vec![0f32; b * cout * wide];
    let col_blocks = wide.div_ceil(CONV_COLUMNS);
    let threads = rayon::current_num_threads();
    let cout_blocks = (2 * threads).div_ceil(b * col_blocks).min(cout.div_ceil(32)).max(1);
    let cout_step = cout.div_ceil(cout_blocks);
    let dst_all = super::SharedMut(out_wide.as_mut_ptr());
    (0..b * col_blocks * cout_blocks).into_par_iter().for_each(|task| {
        let (oc_block, col_block, bi) =
            (task % cout_blocks, task / cout_blocks % col_blocks, task / (cout_blocks * col_blocks));
        let (oc0, col0) = (oc_block * cout_step, col_block * CONV_COLUMNS);
        let (m, n) = (cout_step.min(cout - oc0), CONV_COLUMNS.min(wide - col0));
        for i in 0..kh {
            for j in 0..kw {
                let tap = i * kw + j;
                let phase = (i % s) * s + j % s;
                let src = &planes[(bi * phases + phase) * cin * plane + (i / s) * wq + j / s + col0..];
                // SAFETY: dst is rows oc0..oc0+m, columns col0..col0+n of this batch item's
                // cout x wide output, written by this task only; lhs is `w[oc0.., :, i, j]`
                // (m x cin, strides kh*kw*cin and kh*kw) inside `ws`; rhs is cin rows of n
                // elements, one per phase plane of this batch item, starting at the tap's shift,
                // inside `planes` (its slack covers the dropped columns of the last plane).
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        cin,
                        dst_all.get().add((bi * cout + oc0) * wide + col0),
                        1,
                        wide as isize,
                        tap > 0,
                        ws.as_ptr().add(oc0 * cin * kh * kw + tap),
                        (kh * kw) as isize,
                        (cin * kh * kw) as isize,
                        src.as_ptr(),
                        1,
                        plane as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        }
    });

    // Drop the wide columns, add the bias.
    let bias_of = |plane_index: usize| bs.map_or(0.0, |b| b[plane_index % cout]);
    let out = if wo == wq {
        out_wide.par_chunks_mut(ho * wo).enumerate().for_each(|(c, plane)| {
            let add = bias_of(c);
            if add != 0.0 {
                plane.iter_mut().for_each(|v| *v += add);
            }
        });
        out_wide
    } else {
        let mut out = vec![0f32; b * cout * ho * wo];
        out.par_chunks_mut(ho * wo).zip(out_wide.par_chunks(wide)).enumerate().for_each(|(c, (dst, src))| {
            let add = bias_of(c);
            for (d, s) in dst.chunks_exact_mut(wo).zip(src.chunks_exact(wq)) {
                for (d, s) in d.iter_mut().zip(&s[..wo]) {
                    *d = s + add;
                }
            }
        });
        out
    };
    Ok(Some(Tensor::from_vec(out, (b, cout, ho, wo), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_convolution() {
        let dev = Device::Cpu;
        for (b, cin, cout, h, w, k, pad, stride, bias) in [
            (2, 5, 7, 9, 6, 3, 1, 1, true),
            (1, 4, 3, 5, 8, 1, 0, 1, true),
            (1, 3, 2, 6, 6, 3, 0, 1, false),
            (2, 2, 4, 4, 7, 5, 2, 1, true),
            (1, 6, 6, 8, 8, 1, 1, 1, false),
            // Strided: the UNet's downsamplers (3x3, stride 2, padding 1), odd sizes, stride 3.
            (2, 5, 4, 9, 8, 3, 1, 2, true),
            (1, 3, 2, 7, 11, 3, 0, 2, false),
            (1, 4, 3, 10, 9, 4, 1, 3, true),
            (1, 2, 5, 6, 6, 1, 0, 2, true),
            // Several column blocks (wide rows > CONV_COLUMNS), output channels split unevenly.
            (2, 8, 70, 40, 37, 3, 1, 1, true),
            (1, 6, 33, 30, 30, 3, 1, 2, false),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let kernel = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap();
            let bias_t = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let got = conv2d(&x, &kernel, bias.then_some(&bias_t), stride, pad).unwrap().unwrap();
            let mut want = x.conv2d(&kernel, pad, stride, 1, 1).unwrap();
            if bias {
                want = want.broadcast_add(&bias_t.reshape((1, cout, 1, 1)).unwrap()).unwrap();
            }
            assert_eq!(got.dims(), want.dims());
            let diff = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{b}x{cin}->{cout} {h}x{w} k{k} s{stride} p{pad}: {diff}");
        }
        // A strided (non-contiguous) input is read correctly too.
        let x = Tensor::randn(0f32, 1.0, (1, 6, 5, 3), &dev).unwrap().transpose(2, 3).unwrap();
        let kernel = Tensor::randn(0f32, 1.0, (2, 6, 3, 3), &dev).unwrap();
        let got = conv2d(&x, &kernel, None, 1, 1).unwrap().unwrap();
        let want = x.contiguous().unwrap().conv2d(&kernel, 1, 1, 1, 1).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }
}
