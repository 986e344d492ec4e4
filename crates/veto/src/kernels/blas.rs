//! The dense f32 linear layers through OpenBLAS's `cblas_sgemm` when the machine has it: on the
//! 2-core AVX-512 machine veto is measured on, OpenBLAS's AVX-512 (SkylakeX) kernels run the
//! transformers' layer shapes at 427–448 GFLOP/s against 347–419 for candle's `gemm` crate.
//!
//! Loaded at run time (`dlopen`), never linked: a machine without `libopenblas.so.0` — or with
//! `VETO_BLAS=off` — keeps candle's path, and builds need nothing new. Only on CPUs with AVX-512,
//! where it was measured faster; there, unless `OPENBLAS_CORETYPE` is set, it is set to
//! `SkylakeX` before loading (OpenBLAS 0.3.21 files an AVX-512 AMD Zen 4 under its AVX2 Zen
//! kernels: 219–242 GFLOP/s); a setting that names a core without AVX-512 (`Haswell`, say)
//! leaves the layers to candle. `VETO_BLAS=/path/to/libopenblas.so` picks the library.
//!
//! OpenBLAS runs single-threaded in veto's threads: the rows are split over the current rayon
//! pool and each block is one `sgemm` call, so `--jobs` pools and candle's own parallel ops
//! share the cores with nothing spinning in a second thread pool.

use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// `cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`.
type Sgemm =
    unsafe extern "C" fn(i32, i32, i32, i32, i32, i32, f32, *const f32, i32, *const f32, i32, f32, *mut f32, i32);
type SetThreads = unsafe extern "C" fn(i32);

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// Below this many multiply-adds a product stays on candle's path (a call's fixed cost).
const MIN_WORK: usize = 1 << 20;
/// Rows per parallel block at least (each block packs the weight again).
const MIN_ROWS: usize = 64;
/// Output columns per parallel block at least, where the rows are too few to split.
const MIN_COLUMNS: usize = 64;
/// Below this many rows per thread a product with more columns than rows splits the columns.
const COLUMN_SPLIT_ROWS: usize = 256;

/// OpenBLAS core types whose SGEMM kernels are AVX-512.
const AVX512_CORES: [&str; 3] = ["SkylakeX", "Cooperlake", "SapphireRapids"];

struct Blas {
    sgemm: Sgemm,
    /// Keeps the library mapped for `sgemm`.
    _library: libloading::Library,
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn load() -> Option<Blas> {
    let setting = std::env::var("VETO_BLAS").unwrap_or_default();
    if matches!(setting.as_str(), "0" | "off" | "none" | "candle") || !avx512() {
        return None;
    }
    // OpenBLAS picks its kernels when it is loaded, from OPENBLAS_CORETYPE when set. A user's
    // setting wins; one that names no AVX-512 core means OpenBLAS's AVX2 kernels, slower here
    // than candle's AVX-512 GEMM (219–242 GFLOP/s), so candle keeps the layers then.
    match std::env::var("OPENBLAS_CORETYPE") {
        Ok(core) if !core.trim().is_empty() && !AVX512_CORES.iter().any(|c| c.eq_ignore_ascii_case(core.trim())) => {
            return None
        }
        Ok(_) => {}
        _ => std::env::set_var("OPENBLAS_CORETYPE", "SkylakeX"),
    }
    // One thread per call (the parallelism is ours): no idle pool of OpenBLAS threads either.
    if std::env::var_os("OPENBLAS_NUM_THREADS").is_none() {
        std::env::set_var("OPENBLAS_NUM_THREADS", "1");
    }
    if setting.is_empty() {
        open("libopenblas.so.0").or_else(|| open("libopenblas.so"))
    } else {
        open(&setting)
    }
}

/// The library at `name` (a file name the loader searches for, or a path), if it loads and
/// exports `cblas_sgemm`; set to one thread per call.
fn open(name: &str) -> Option<Blas> {
    // SAFETY: loading a shared library runs its initialisers; OpenBLAS's read the environment
    // and probe the CPU.
    let library = unsafe { libloading::Library::new(name) }.ok()?;
    // SAFETY: the symbols have the CBLAS / OpenBLAS C signatures declared above.
    let sgemm = unsafe { library.get::<Sgemm>(b"cblas_sgemm\0").map(|f| *f) }.ok()?;
    if let Ok(set_threads) = unsafe { library.get::<SetThreads>(b"openblas_set_num_threads\0") } {
        // SAFETY: as above; one thread per call whatever OPENBLAS_NUM_THREADS says.
        unsafe { set_threads(1) };
    }
    Some(Blas { sgemm, _library: library })
}

/// Whether the dense f32 linear layers run through OpenBLAS on this machine.
pub fn available() -> bool {
    BLAS.get_or_init(load).is_some()
}

/// `x · wᵀ + bias` for a contiguous f32 CPU `x` `[.., K]` and `w` `[N, K]` through OpenBLAS;
/// `None` when it does not apply (no OpenBLAS, not f32 on the CPU, or too small to gain).
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let cpu_f32 = super::is_cpu_f32;
    if !(cpu_f32(x) && cpu_f32(w) && bias.is_none_or(cpu_f32) && x.is_contiguous()) {
        return Ok(None);
    }
    match BLAS.get_or_init(load) {
        Some(blas) => linear_with(blas, x, w, bias),
        None => Ok(None),
    }
}

/// [`linear`] through `blas` (the checks on `x` done).
fn linear_with(blas: &Blas, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let dims = x.dims();
    let (&k, lead) = dims.split_last().ok_or_else(|| candle_core::Error::Msg("linear of a scalar".into()))?;
    let (n, wk) = w.dims2()?;
    if wk != k {
        candle_core::bail!("linear: input {dims:?} for a weight {:?}", w.dims());
    }
    let m: usize = lead.iter().product();
    let threads = rayon::current_num_threads();
    let Some(split) = split(m, n, threads) else { return Ok(None) };
    if m * n * k < MIN_WORK || [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
        return Ok(None);
    }
    if let Some(bias) = bias.filter(|b| b.dims() != [n]) {
        candle_core::bail!("linear: a bias of {:?} for {n} outputs", bias.dims());
    }
    let out = super::with_f32_slices([x, w], bias, |[xs, ws], bs| {
        let mut out = vec![0f32; m * n];
        // The bias goes in first and the product adds to it (beta = 1): no second pass.
        if let Some(b) = bs {
            out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b));
        }
        let beta = if bs.is_some() { 1.0 } else { 0.0 };
        match split {
            Split::Rows => sgemm_rows(blas, xs, ws, &mut out, beta, [m, n, k], threads),
            Split::Columns => sgemm_columns(blas, xs, ws, &mut out, beta, [m, n, k], threads),
        }
        Ok(out)
    })?;
    let mut out_dims = lead.to_vec();
    out_dims.push(n);
    Ok(Some(Tensor::from_vec(out, out_dims, x.device())?))
}

/// How a product of `m` rows and `n` output columns is shared among the threads.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Split {
    /// A block of rows per thread: each packs the whole weight.
    Rows,
    /// A block of output columns (weight rows) per thread: each packs its share of the weight
    /// and all the rows.
    Columns,
}

/// The split of `m x n` over `threads`, or `None` where candle's GEMM should keep the product.
/// One row is a matrix-vector product, which candle streams through the weight once (16 ms for
/// a 3072 x 18432 adaLN weight here, OpenBLAS 33); from two rows on candle's GEMM falls far
/// behind (two rows: 111 against 32 ms). Few rows (the 77 tokens of a text projection, say), or
/// a few hundred through a wider weight, split the columns: less to pack (300 x 4096 x 1152:
/// 20.4 -> 16.7 ms; 256 x 3072 x 21504: 227 -> 202 ms; from ~1000 rows on the two are even).
/// Too few rows and columns to give every thread a block: candle's GEMM keeps them too.
fn split(m: usize, n: usize, threads: usize) -> Option<Split> {
    let few_rows = m < MIN_ROWS * threads || (n > m && m < COLUMN_SPLIT_ROWS * threads);
    let wide = n >= MIN_COLUMNS * threads;
    match (few_rows, wide) {
        _ if m < 2 => None,
        (true, true) => Some(Split::Columns),
        (true, false) if m < MIN_ROWS * threads => None,
        _ => Some(Split::Rows),
    }
}

/// `xs · wsᵀ` (plus `beta` times what `out` holds) for `xs` `m x k`, `ws` `n x k`, into the
/// row-major `out` `m x n`: one single-threaded `sgemm` per block of rows, the blocks over the
/// current pool's `threads`.
fn sgemm_rows(blas: &Blas, xs: &[f32], ws: &[f32], out: &mut [f32], beta: f32, [m, n, k]: [usize; 3], threads: usize) {
    let blocks = threads.min(m / MIN_ROWS).max(1);
    let rows = m.div_ceil(blocks);
    out.par_chunks_mut(rows * n).enumerate().for_each(|(i, c)| {
        let r = c.len() / n;
        let a = &xs[i * rows * k..(i * rows + r) * k];
        // SAFETY: a is r x k, ws is n x k (read transposed), c is r x n, all row-major with the
        // leading dimensions given; the library is loaded for as long as `BLAS` lives.
        unsafe {
            (blas.sgemm)(
                ROW_MAJOR,
                NO_TRANS,
                TRANS,
                r as i32,
                n as i32,
                k as i32,
                1.0,
                a.as_ptr(),
                k as i32,
                ws.as_ptr(),
                k as i32,
                beta,
                c.as_mut_ptr(),
                n as i32,
            )
        };
    });
}

/// [`sgemm_rows`]' product with one single-threaded `sgemm` per block of output columns
/// (weight rows).
fn sgemm_columns(
    blas: &Blas,
    xs: &[f32],
    ws: &[f32],
    out: &mut [f32],
    beta: f32,
    [m, n, k]: [usize; 3],
    threads: usize,
) {
    /// The output, shared by the blocks; each writes only its own columns.
    struct Output(*mut f32);
    // SAFETY: the blocks below write disjoint column ranges of the buffer.
    unsafe impl Sync for Output {}
    let c = Output(out.as_mut_ptr());
    let c = &c;
    let blocks = threads.min(n / MIN_COLUMNS).max(1);
    let cols = n.div_ceil(blocks);
    (0..blocks).into_par_iter().for_each(|i| {
        let first = i * cols;
        let width = cols.min(n - first);
        // SAFETY: xs is m x k; the weight rows first..first+width are width x k (read
        // transposed); the output block starts at column `first` of the m x n row-major
        // buffer, leading dimension n, and no other block writes these columns.
        unsafe {
            (blas.sgemm)(
                ROW_MAJOR,
                NO_TRANS,
                TRANS,
                m as i32,
                width as i32,
                k as i32,
                1.0,
                xs.as_ptr(),
                k as i32,
                ws[first * k..].as_ptr(),
                k as i32,
                beta,
                c.0.add(first),
                n as i32,
            )
        };
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The split of each product on two threads: one row and too few rows and columns stay
    /// with candle; few rows, or a few hundred through a wider weight, split the columns.
    #[test]
    fn products_split_as_measured() {
        let cases = [
            ((1, 18432), None),
            ((2, 18432), Some(Split::Columns)),
            ((77, 1280), Some(Split::Columns)),
            ((100, 100), None),
            ((300, 1152), Some(Split::Columns)),
            ((300, 200), Some(Split::Rows)),
            ((1280, 9216), Some(Split::Rows)),
            ((4096, 320), Some(Split::Rows)),
        ];
        for ((m, n), want) in cases {
            assert_eq!(split(m, n, 2), want, "{m} x {n}");
        }
    }

    /// Through the machine's OpenBLAS, whatever core type the environment names (correctness,
    /// not speed): the same values as candle, with and without bias, on ragged row counts.
    /// Machines without `libopenblas.so.0` have nothing to check (candle's path is the rest of
    /// the suite).
    #[test]
    fn openblas_linear_matches_candle() {
        let Some(blas) = open("libopenblas.so.0") else {
            eprintln!("no libopenblas.so.0 here: the OpenBLAS path is not checked");
            return;
        };
        let dev = Device::Cpu;
        for (m, k, n) in [(300, 256, 96), (1030, 64, 130), (20, 2048, 333), (100, 512, 130), (300, 64, 400)] {
            let x = Tensor::randn(0f32, 1.0, (2, m / 2, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let product = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            for bias in [None, Some(&b)] {
                let want = match bias {
                    Some(b) => product.broadcast_add(b).unwrap(),
                    None => product.clone(),
                };
                // Two threads, whatever the machine: the rows (the last three shapes: the columns)
                // split into two blocks.
                let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
                let got =
                    pool.install(|| linear_with(&blas, &x, &w, bias)).unwrap().expect("large enough for OpenBLAS");
                let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 1e-3, "{m}x{k}x{n}: max error {err}");
            }
        }
    }
}
