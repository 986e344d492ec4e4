//! One softmax row, vectorised: the inner loop of every attention softmax on the CPU.
//!
//! `f32::exp` is a scalar libm call (~7 ns); attention at 512² evaluates ~70M of them per
//! MMDiT block, which made the softmax a quarter of a whole step. Here the max, the
//! exponentials (the polynomial [`exp`]) and the sum run in 16 lanes, compiled per instruction
//! set ([`multiversion!`]).

use super::simd::{exp, multiversion};

/// Lanes of the accumulators for the max and the sum (one AVX-512 register of f32).
const LANES: usize = 16;

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

multiversion!(
    /// Softmax of `row` in place, `bias` added first to its last `tail` logits (`-inf` hides
    /// them); returns the log-sum-exp of the biased logits.
    pub fn softmax_row(row: &mut [f32], tail: usize, bias: f32) -> f32 = softmax_row_body
);

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(row: &[f32], tail: usize, bias: f32) -> (Vec<f32>, f32) {
        let head = row.len() - tail;
        let x: Vec<f64> =
            row.iter().enumerate().map(|(i, &v)| v as f64 + if i >= head { bias as f64 } else { 0.0 }).collect();
        let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = x.iter().map(|v| (v - max).exp()).sum();
        (x.iter().map(|v| ((v - max).exp() / sum) as f32).collect(), (max + sum.ln()) as f32)
    }

    #[test]
    fn softmax_rows_match_a_f64_softmax() {
        type RowFn = fn(&mut [f32], usize, f32) -> f32;
        let variants: [(&str, RowFn); 2] = [("inlined", softmax_row_body), ("selected", softmax_row)];
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
