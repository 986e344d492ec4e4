//! Rotary position embedding on the CPU (f32) in one parallel pass that also makes the
//! heads contiguous: the tensor-op version splits the pairs, negates, concatenates and
//! broadcasts the tables over batch and heads (single-threaded passes, and a strided
//! broadcast once the batch is 2, as under batched CFG), after a separate contiguous copy of
//! the heads.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Rotate the channel pairs `(2i, 2i + 1)` of `x` `[B, H, S, D]` (any strides with unit
/// stride on `D`) by the angles of position `s`: `(x0 cos - x1 sin, x1 cos + x0 sin)`, with
/// `cos`, `sin` `[S, D / 2]` (one entry per pair) or `[S, D]` (each entry repeated for its
/// pair). Returns a contiguous `[B, H, S, D]`; `None` unless all are f32 on the CPU.
pub fn rotate_pairs(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    let cpu_f32 = super::is_cpu_f32;
    if !(cpu_f32(x) && cpu_f32(cos) && cpu_f32(sin)) {
        return Ok(None);
    }
    let (b, h, s, d) = x.dims4()?;
    let (ts, width) = cos.dims2()?;
    if d % 2 != 0 || ts != s || sin.dims() != cos.dims() || (width != d && width != d / 2) {
        candle_core::bail!("rope: x {:?} with tables {:?} / {:?}", x.dims(), cos.dims(), sin.dims());
    }
    // Table index of pair i: i (one entry per pair) or 2i (repeated entries).
    let step = if width == d { 2 } else { 1 };
    let x = if x.stride()[3] == 1 { x.clone() } else { x.contiguous()? };
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let (gx, lx) = x.storage_and_layout();
    let xs = super::f32_storage(&gx)?;
    let st = lx.stride();
    let (base, st) = (lx.start_offset(), [st[0], st[1], st[2]]);
    let (gc, lc) = cos.storage_and_layout();
    let cs = super::f32_slice(&gc, lc)?;
    let (gs, ls) = sin.storage_and_layout();
    let sn = super::f32_slice(&gs, ls)?;

    let mut out = vec![0f32; b * h * s * d];
    out.par_chunks_mut(d).enumerate().for_each(|(row, dst)| {
        let (bh, si) = (row / s, row % s);
        let (bi, hi) = (bh / h, bh % h);
        let start = base + bi * st[0] + hi * st[1] + si * st[2];
        let src = &xs[start..start + d];
        let (c, sn) = (&cs[si * width..(si + 1) * width], &sn[si * width..(si + 1) * width]);
        for (i, (o, p)) in dst.chunks_exact_mut(2).zip(src.chunks_exact(2)).enumerate() {
            let (cos, sin) = (c[i * step], sn[i * step]);
            o[0] = p[0] * cos - p[1] * sin;
            o[1] = p[1] * cos + p[0] * sin;
        }
    });
    drop(gx);
    Ok(Some(Tensor::from_vec(out, (b, h, s, d), x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rotates_strided_heads_with_either_table_width() {
        let dev = Device::Cpu;
        // [B, S, H, D] viewed as [B, H, S, D], as the models produce them.
        let x = Tensor::randn(0f32, 1.0, (2, 5, 3, 8), &dev).unwrap().transpose(1, 2).unwrap();
        let half_cos = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let half_sin = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        // Reference from the formula with tensor ops.
        let pairs = x.contiguous().unwrap().reshape((2, 3, 5, 4, 2)).unwrap();
        let x0 = pairs.narrow(4, 0, 1).unwrap().squeeze(4).unwrap();
        let x1 = pairs.narrow(4, 1, 1).unwrap().squeeze(4).unwrap();
        let o0 = (x0.broadcast_mul(&half_cos).unwrap() - x1.broadcast_mul(&half_sin).unwrap()).unwrap();
        let o1 = (x1.broadcast_mul(&half_cos).unwrap() + x0.broadcast_mul(&half_sin).unwrap()).unwrap();
        let want = Tensor::stack(&[o0, o1], 4).unwrap().reshape((2, 3, 5, 8)).unwrap();
        let repeat = |t: &Tensor| Tensor::stack(&[t, t], 2).unwrap().reshape((5, 8)).unwrap();
        for (cos, sin) in [(half_cos.clone(), half_sin.clone()), (repeat(&half_cos), repeat(&half_sin))] {
            let got = rotate_pairs(&x, &cos, &sin).unwrap().unwrap();
            assert!(got.is_contiguous());
            let diff = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        }
        assert!(rotate_pairs(&x, &half_cos.narrow(0, 0, 4).unwrap(), &half_sin.narrow(0, 0, 4).unwrap()).is_err());
    }
}
