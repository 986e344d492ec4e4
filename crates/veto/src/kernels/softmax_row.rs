//! One softmax row, vectorised: the inner loop of every attention softmax on the CPU.
//!
//! `f32::exp` is a scalar libm call (~7 ns); attention at 512² evaluates ~70M of them per
//! MMDiT block, which made the softmax cost a quarter of a whole step. Here `exp` is a
//! branch-free polynomial (Cephes' `expf`: range reduction by ln 2, degree-6 polynomial,
//! about 1 ulp on the range softmax uses) written so that LLVM vectorises it, compiled
//! three times (AVX-512, AVX2+FMA, portable) and chosen once at run time.

use std::sync::OnceLock;

/// Lanes of the accumulators for the max and the sum (one AVX-512 register of f32).
const LANES: usize = 16;

/// Below this, `exp` is taken as 0 (`exp(-87.3)` is the smallest normal f32).
const EXP_MIN: f32 = -87.0;
/// Above this `exp` overflows f32.
const EXP_MAX: f32 = 88.0;

/// `exp(x)`: 0 for `x < -87` (and for `-inf`), NaN for NaN. No branches, so it vectorises.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 split in two so that `k * LN2_HI` is exact for the |k| <= 127 used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(EXP_MIN, EXP_MAX);
    let k = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < EXP_MIN {
        0.0
    } else {
        y * scale
    }
}

/// Softmax of `row` in place after adding `bias` to its last `tail` elements; returns the
/// row's log-sum-exp (of the biased logits).
#[inline(always)]
fn softmax_row_body(row: &mut [f32], tail: usize, bias: f32) -> f32 {
    let head = row.len().saturating_sub(tail);
    if tail > 0 && bias != 0.0 {
        for x in row[head..].iter_mut() {
            *x += bias;
        }
    }
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = m.max(x);
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    // A row hidden everywhere gives exp(-inf) = 0, not the NaN of `-inf - -inf`.
    let shift = if max == f32::NEG_INFINITY { 0.0 } else { max };

    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk.iter_mut()) {
            *x = exp(*x - shift);
            *s += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        sum += *x;
    }
    sum += sums.iter().sum::<f32>();

    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
    shift + sum.ln()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_row_avx512(row: &mut [f32], tail: usize, bias: f32) -> f32 {
    softmax_row_body(row, tail, bias)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_row_avx2(row: &mut [f32], tail: usize, bias: f32) -> f32 {
    softmax_row_body(row, tail, bias)
}

fn softmax_row_portable(row: &mut [f32], tail: usize, bias: f32) -> f32 {
    softmax_row_body(row, tail, bias)
}

type RowFn = fn(&mut [f32], usize, f32) -> f32;

fn select() -> RowFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature the function is compiled for.
            return |row, tail, bias| unsafe { softmax_row_avx512(row, tail, bias) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, the features the function is compiled for.
            return |row, tail, bias| unsafe { softmax_row_avx2(row, tail, bias) };
        }
    }
    softmax_row_portable
}

/// Softmax of `row` in place, `bias` added first to its last `tail` logits (`-inf` hides
/// them); returns the log-sum-exp of the biased logits. The best compiled variant for this
/// CPU is picked on the first call.
pub fn softmax_row(row: &mut [f32], tail: usize, bias: f32) -> f32 {
    static KERNEL: OnceLock<RowFn> = OnceLock::new();
    (KERNEL.get_or_init(select))(row, tail, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_where_softmax_needs_it() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    fn reference(row: &[f32], tail: usize, bias: f32) -> (Vec<f32>, f32) {
        let head = row.len() - tail;
        let x: Vec<f64> =
            row.iter().enumerate().map(|(i, &v)| v as f64 + if i >= head { bias as f64 } else { 0.0 }).collect();
        let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = x.iter().map(|v| (v - max).exp()).sum();
        (x.iter().map(|v| ((v - max).exp() / sum) as f32).collect(), (max + sum.ln()) as f32)
    }

    #[test]
    fn every_variant_matches_a_f64_softmax() {
        let mut variants: Vec<(&str, RowFn)> = vec![("portable", softmax_row_portable), ("selected", select())];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            variants.push(("avx2", |r, t, b| unsafe { softmax_row_avx2(r, t, b) }));
        }
        // Lengths around the lane count, a tail bias, a hidden tail.
        for (len, tail, bias) in [(1, 0, 0.0), (15, 0, 0.0), (16, 3, -1.5), (37, 5, 2.0), (333, 20, f32::NEG_INFINITY)]
        {
            let row: Vec<f32> = (0..len).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 0.21).collect();
            let (want, want_lse) = reference(&row, tail, bias);
            for (name, f) in &variants {
                let mut got = row.clone();
                let lse = f(&mut got, tail, bias);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-30) + 1e-12, "{name} len {len}: {g} vs {w}");
                }
                assert!((lse - want_lse).abs() < 1e-5 * want_lse.abs().max(1.0), "{name} lse {lse} vs {want_lse}");
            }
        }
    }
}
