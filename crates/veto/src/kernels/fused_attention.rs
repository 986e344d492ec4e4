//! Attention on the CPU (f32) in query tiles that stay in cache: for each head and each tile
//! of queries, `scores = scale q kᵀ` into a per-thread buffer, the softmax on it (with a
//! [`TailBias`] when asked, keeping each row's log-sum-exp when asked), then `probs v` straight
//! into the output. The full score matrix (`heads x S_q x S_k`, hundreds of MB at 1024²) is
//! never written to memory, the products run as plain GEMMs (the `gemm` crate, one thread per
//! tile; the tiles run in parallel), and strided inputs are read where they lie, so the usual
//! `[b, s, h, d] -> [b, h, s, d]` copies of q, k and v are not needed either.

use std::cell::RefCell;

use candle_core::{Layout, Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{f32_storage, softmax_row, TailBias};

/// Score-buffer size (f32 elements) one tile aims at: 1 MB, well inside a core's L2.
const TILE_SCORES: usize = 1 << 18;
/// Query rows per tile, at most (more rows amortise the packing of k and v per GEMM).
const MAX_TILE_ROWS: usize = 128;
/// And at least (very long key sequences still get GEMM-sized tiles).
const MIN_TILE_ROWS: usize = 16;

/// What the fused attention returns: `out` `[b, h, S_q, d_v]` (a transposed view of a
/// contiguous `[b, S_q, h, d_v]`, so merging heads costs no copy) and, when asked, the
/// log-sum-exp of each query's logits `[b, h, S_q, 1]`.
pub struct Fused {
    pub out: Tensor,
    pub lse: Option<Tensor>,
}

/// A 4-d f32 tensor's elements and strides, `[b, h, s, d]` with unit stride on `d`.
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    stride: [usize; 4],
}

impl View<'_> {
    fn at(&self, b: usize, h: usize, s: usize) -> *const f32 {
        // SAFETY of later reads: every index used is inside the layout's shape.
        self.data[self.offset + b * self.stride[0] + h * self.stride[1] + s * self.stride[2]..].as_ptr()
    }
}

fn view<'a>(data: &'a [f32], layout: &Layout) -> Result<View<'a>> {
    let s = layout.stride();
    if s.len() != 4 || (s[3] != 1 && layout.dims()[3] > 1) {
        candle_core::bail!("fused attention: expected [b, h, s, d] with unit stride on d, got {:?}", s);
    }
    Ok(View { data, offset: layout.start_offset(), stride: [s[0], s[1], s[2], s[3]] })
}

/// A raw pointer that tiles writing disjoint rows may share across threads.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every tile writes rows no other tile touches (see `fused_attention`).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `softmax(scale q kᵀ + tail bias) v` for `q` `[b, h, S_q, d]`, `k` `[b, h, S_k, d]`, `v`
/// `[b, h, S_k, d_v]`, any strides with unit stride on the last axis. `None` unless all three
/// are f32 on the CPU (the caller then takes the tensor-op path). The tail bias numbers the
/// queries from 0.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    tail: Option<TailBias>,
    want_lse: bool,
) -> Result<Option<Fused>> {
    let cpu_f32 = super::is_cpu_f32;
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v)) {
        return Ok(None);
    }
    let (b, h, sq, d) = q.dims4()?;
    let (kb, kh, sk, kd) = k.dims4()?;
    let (vb, vh, vs, dv) = v.dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vs) != (b, h, sk) || sk == 0 {
        candle_core::bail!("fused attention: q {:?}, k {:?}, v {:?} do not fit", q.dims(), k.dims(), v.dims());
    }
    if let Some(t) = tail {
        if t.tail >= sk {
            candle_core::bail!("fused attention: a biased tail of {} keys in rows of {sk}", t.tail);
        }
    }
    // Inner strides other than 1 are rare (a transposed head dim); copy those.
    let unit =
        |t: &Tensor| if t.stride()[3] == 1 || t.dim(3).unwrap_or(1) <= 1 { Ok(t.clone()) } else { t.contiguous() };
    let (q, k, v) = (unit(q)?, unit(k)?, unit(v)?);

    let rows = (TILE_SCORES / sk).clamp(MIN_TILE_ROWS, MAX_TILE_ROWS).min(sq.max(1));
    let tiles_per_head = sq.div_ceil(rows);
    let mut out = vec![0f32; b * sq * h * dv];
    let mut lse = if want_lse { vec![0f32; b * h * sq] } else { Vec::new() };
    {
        let (gq, lq) = q.storage_and_layout();
        let (gk, lk) = k.storage_and_layout();
        let (gv, lv) = v.storage_and_layout();
        let (vq, vk, vv) = (view(f32_storage(&gq)?, lq)?, view(f32_storage(&gk)?, lk)?, view(f32_storage(&gv)?, lv)?);
        let out_ptr = SharedMut(out.as_mut_ptr());
        let lse_ptr = SharedMut(lse.as_mut_ptr());
        let scale = scale as f32;
        (0..b * h * tiles_per_head).into_par_iter().for_each(|task| {
            let (head, tile) = (task / tiles_per_head, task % tiles_per_head);
            let (bi, hi) = (head / h, head % h);
            let q0 = tile * rows;
            let m = rows.min(sq - q0);
            SCORES.with(|buf| {
                let mut buf = buf.borrow_mut();
                if buf.len() < m * sk {
                    buf.resize(m * sk, 0.0);
                }
                let scores = &mut buf[..m * sk];
                // SAFETY: the pointers and strides describe the shapes checked above; `scores`
                // holds m x sk elements; the output rows (q0..q0+m of head (bi, hi)) and their
                // log-sum-exps belong to this task alone.
                unsafe {
                    gemm::gemm(
                        m,
                        sk,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        sk as isize,
                        false,
                        vq.at(bi, hi, q0),
                        1,
                        vq.stride[2] as isize,
                        vk.at(bi, hi, 0),
                        vk.stride[2] as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                for (r, row) in scores.chunks_exact_mut(sk).enumerate() {
                    let (n, bias) = match tail {
                        Some(t) if q0 + r < t.split => (t.tail, t.before),
                        Some(t) => (t.tail, t.after),
                        None => (0, 0.0),
                    };
                    let l = softmax_row(row, n, bias);
                    if want_lse {
                        unsafe { *lse_ptr.get().add(head * sq + q0 + r) = l };
                    }
                }
                unsafe {
                    let dst = out_ptr.get().add(((bi * sq + q0) * h + hi) * dv);
                    gemm::gemm(
                        m,
                        dv,
                        sk,
                        dst,
                        1,
                        (h * dv) as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        sk as isize,
                        vv.at(bi, hi, 0),
                        1,
                        vv.stride[2] as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            });
        });
    }
    let out = Tensor::from_vec(out, (b, sq, h, dv), q.device())?.transpose(1, 2)?;
    let lse = if want_lse { Some(Tensor::from_vec(lse, (b, h, sq, 1), q.device())?) } else { None };
    Ok(Some(Fused { out, lse }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    fn unfused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, tail: Option<TailBias>) -> (Tensor, Tensor) {
        let (q, k, v) =
            (q.to_dtype(DType::F64).unwrap(), k.to_dtype(DType::F64).unwrap(), v.to_dtype(DType::F64).unwrap());
        let mut s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(t) = tail {
            let (sq, sk) = (s.dim(2).unwrap(), s.dim(3).unwrap());
            let bias: Vec<f64> = (0..sq * sk)
                .map(|i| {
                    let (qi, ki) = (i / sk, i % sk);
                    let b = if qi < t.split { t.before } else { t.after };
                    if ki >= sk - t.tail {
                        b as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            s = s.broadcast_add(&Tensor::from_vec(bias, (sq, sk), &Device::Cpu).unwrap()).unwrap();
        }
        let max = s.max_keepdim(D::Minus1).unwrap();
        let lse = (&max + s.broadcast_sub(&max).unwrap().exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap())
            .unwrap();
        let p = s.broadcast_sub(&lse).unwrap().exp().unwrap();
        (p.matmul(&v).unwrap().to_dtype(DType::F32).unwrap(), lse.to_dtype(DType::F32).unwrap())
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let norm = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        diff / norm
    }

    #[test]
    fn matches_unfused_attention_on_strided_inputs_with_and_without_a_tail_bias() {
        let dev = Device::Cpu;
        // [b, s, h, d] tensors viewed as [b, h, s, d], as the models hand them over; sequence
        // lengths that leave a partial last tile, and long keys that shrink the tile.
        for (sq, sk, tail) in [
            (37, 29, None),
            (300, 70, Some(TailBias { tail: 9, split: 250, before: -1.5, after: f32::NEG_INFINITY })),
            (40, 20_000, None),
        ] {
            let q = Tensor::randn(0f32, 1.0, (2, sq, 3, 8), &dev).unwrap().transpose(1, 2).unwrap();
            let k = Tensor::randn(0f32, 1.0, (2, sk, 3, 8), &dev).unwrap().transpose(1, 2).unwrap();
            let v = Tensor::randn(0f32, 1.0, (2, sk, 3, 5), &dev).unwrap().transpose(1, 2).unwrap();
            let got = fused_attention(&q, &k, &v, 0.35, tail, true).unwrap().unwrap();
            let (want, want_lse) = unfused(&q, &k, &v, 0.35, tail);
            assert_eq!(got.out.dims(), want.dims());
            assert!(max_rel(&got.out, &want) < 1e-5, "sq {sq} sk {sk}: out {}", max_rel(&got.out, &want));
            let lse = got.lse.unwrap();
            assert!(max_rel(&lse, &want_lse) < 1e-5, "sq {sq} sk {sk}: lse {}", max_rel(&lse, &want_lse));
        }
    }

    #[test]
    fn declines_what_it_does_not_handle_and_refuses_a_tail_covering_every_key() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 1, 4, 8), &dev).unwrap();
        let x64 = x.to_dtype(DType::F64).unwrap();
        assert!(fused_attention(&x64, &x64, &x64, 1.0, None, false).unwrap().is_none());
        let all = TailBias { tail: 4, split: 0, before: 0.0, after: 0.0 };
        assert!(fused_attention(&x, &x, &x, 1.0, Some(all), false).is_err());
    }
}
