//! 2-d convolution on the CPU (f32, any stride, no dilation, one group: every convolution of
//! the UNet, its attention projections and the VAEs), in two ways that share one layout.
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
//!
//! On small maps (at most [`IM2COL_MAX_COLUMNS`] output columns) those same shifted windows are
//! instead copied, each a contiguous row, into patch rows `[C_in * kh * kw, columns]` in the
//! kernel's own (channel, tap) order, and one deep GEMM with the kernel as stored replaces the
//! `kh * kw` shallow ones: there the output is small and the depth is what feeds the GEMM.

use candle_core::{Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Up to this many output columns (`Ho * Wq`: the UNet's 16² and 32² levels at 512², the
/// strided downsamplers) the taps are gathered into patch rows and multiplied in one GEMM of
/// depth `C_in * kh * kw`, which beats `kh * kw` shallow GEMMs there (1280 channels at 16²:
/// 26 ms vs 38, PyTorch 40; 640 at 32²: 25 vs 28, PyTorch 20); on larger maps the shifted GEMMs
/// win (320 at 64²: 26 ms vs 31) and need no patch buffer.
const IM2COL_MAX_COLUMNS: usize = 2048;

/// Floats of patch rows per GEMM (64 MB at most; 1280 channels at 16²: 13 MB).
const COLS_BUDGET: usize = 1 << 24;

thread_local! {
    /// The patch-row buffer, kept per thread (fresh large allocations page-fault on every call).
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

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

    let out = super::with_f32_slices([x, w], bias, |[xs, ws], bs| {
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

        let mut out_wide = vec![0f32; b * cout * wide];
        let taps = kh * kw;
        // Where tap (i, j)'s window of batch item bi starts, channel 0: the stride-1 shift
        // (i / s, j / s) in phase plane (i % s, j % s); channel c is `c * plane` further.
        let window = |bi: usize, i: usize, j: usize| {
            let phase = (i % s) * s + j % s;
            (bi * phases + phase) * cin * plane + (i / s) * wq + j / s
        };
        if taps > 1 && wide <= IM2COL_MAX_COLUMNS {
            // Columns per GEMM: the patch rows of a chunk (`cin * taps` rows) stay within COLS_BUDGET.
            let chunk = (COLS_BUDGET / (cin * taps)).max(64).min(wide);
            COLS.with(|buf| {
                let mut cols = buf.borrow_mut();
                if cols.len() < cin * taps * chunk {
                    cols.resize(cin * taps * chunk, 0.0);
                }
                for (bi, dst) in out_wide.chunks_exact_mut(cout * wide).enumerate() {
                    for col0 in (0..wide).step_by(chunk) {
                        let n = chunk.min(wide - col0);
                        // Patch rows in the kernel's own order (channel, tap): row `c * taps + tap` is
                        // the tap's shifted window of channel c's plane, a contiguous copy.
                        cols[..cin * taps * chunk].par_chunks_mut(chunk).enumerate().for_each(|(row, out)| {
                            let (c, tap) = (row / taps, row % taps);
                            let at = window(bi, tap / kw, tap % kw) + c * plane + col0;
                            out[..n].copy_from_slice(&planes[at..at + n]);
                        });
                        // SAFETY: lhs is the kernel as stored, cout x (cin * taps) row-major, `ws`; rhs
                        // is the cin * taps patch rows of `chunk` stride just filled (n valid columns);
                        // dst is columns col0..col0+n of this batch item's cout x wide output.
                        unsafe {
                            gemm::gemm(
                                cout,
                                n,
                                cin * taps,
                                dst.as_mut_ptr().add(col0),
                                1,
                                wide as isize,
                                false,
                                ws.as_ptr(),
                                1,
                                (cin * taps) as isize,
                                cols.as_ptr(),
                                1,
                                chunk as isize,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                Parallelism::Rayon(0),
                            );
                        }
                    }
                }
            });
        } else {
            for (bi, dst) in out_wide.chunks_exact_mut(cout * wide).enumerate() {
                for i in 0..kh {
                    for j in 0..kw {
                        let tap = i * kw + j;
                        let src = &planes[window(bi, i, j)..];
                        // SAFETY: lhs is `w[:, :, i, j]` (cout x cin, strides kh*kw*cin and kh*kw)
                        // inside `ws`; rhs is cin rows of `wide` elements, one per phase plane of this
                        // batch item, starting at the tap's shift, inside `planes` (its slack covers the
                        // dropped columns of the last plane); dst is this batch's cout x wide block.
                        unsafe {
                            gemm::gemm(
                                cout,
                                wide,
                                cin,
                                dst.as_mut_ptr(),
                                1,
                                wide as isize,
                                tap > 0,
                                ws.as_ptr().add(tap),
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
                                Parallelism::Rayon(0),
                            );
                        }
                    }
                }
            }
        }

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
        Ok(out)
    })?;
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
            // Patch rows in two chunks (cin * taps * wide > COLS_BUDGET), the last one partial;
            // patch rows of two batch items at stride 2; shifted GEMMs (wide > IM2COL_MAX_COLUMNS).
            (1, 1000, 2, 44, 44, 3, 1, 1, true),
            (2, 52, 2, 30, 30, 3, 1, 2, false),
            (1, 3, 4, 50, 50, 3, 1, 1, true),
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
            // Sums of cin * k² products of N(0, 1) terms: rounding grows with the count.
            let tol = 1e-4f32.max(4e-6 * (cin * k * k) as f32);
            assert!(diff < tol, "{b}x{cin}->{cout} {h}x{w} k{k} s{stride} p{pad}: {diff}");
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
