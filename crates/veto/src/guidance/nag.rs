//! Normalized Attention Guidance (NAG paper, section 4.1, eq. 7-10).
//!
//! Given the attention outputs of the same queries over the positive and the negative context,
//! `Z+` and `Z-` (shape `[..., d]`, `d` = all heads merged):
//!
//! - eq. 7  `Z~ = Z+ + phi (Z+ - Z-)`, written as `s Z+ - (s-1) Z-` with `s = nag_scale = phi + 1`
//!   as the official code does (s = 1 is off);
//! - eq. 8  `R = ||Z~|| / ||Z+||` per token (row) over the last dimension;
//! - eq. 9  `Z^ = Z~ min(R, tau) / R`;
//! - eq. 10 `Z = alpha Z^ + (1 - alpha) Z+`.
//!
//! The paper uses the L1 norm (our default); the official diffusers Flux pipeline computes L2.
//! The official Wan processor (L1) clips as `G / (||G|| + 1e-7) ||Z+|| tau` where the ratio,
//! with NaN read as 10, exceeds tau: the same factor up to `1e-7 / ||G||` relative, and the same
//! zero output for zero `Z+` rows (`tests::matches_the_official_wan_clip_form`), so Wan uses
//! this function as is.
//!
//! **Epsilon rule.** We compute the eq. 9 factor as `min(1, tau ||Z+|| / max(||Z~||, EPS))`,
//! which is algebraically `min(R, tau) / R` and equal to it bit-for-bit up to rounding whenever
//! `||Z~|| > EPS`. It never divides by `||Z+||`, so a zero `Z+` row gives factor 0 (the limit of
//! clipping an infinite ratio to tau) instead of NaN, and a zero `Z~` row gives `Z^ = 0`.

use candle_core::{DType, Result, Tensor, D};

/// Guards the denominator `||Z~||` only (see the module docs).
pub const EPS: f64 = 1e-12;

/// Which norm eq. 8 uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NagNorm {
    /// The paper (default).
    #[default]
    L1,
    /// What the official diffusers Flux NAG pipeline computes.
    L2,
}

impl std::str::FromStr for NagNorm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "l1" => Ok(NagNorm::L1),
            "l2" => Ok(NagNorm::L2),
            other => Err(format!("unknown NAG norm '{other}' (expected l1 or l2)")),
        }
    }
}

impl std::fmt::Display for NagNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NagNorm::L1 => "l1",
            NagNorm::L2 => "l2",
        })
    }
}

/// NAG parameters, named as the official code names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NagParams {
    /// `nag_scale` s = phi + 1; 1 means off.
    pub scale: f64,
    /// `nag_tau`, the clipping threshold tau of eq. 9 (> 0).
    pub tau: f64,
    /// `nag_alpha`, the blend alpha of eq. 10, in [0, 1].
    pub alpha: f64,
    /// The norm of eq. 8.
    pub norm: NagNorm,
}

/// Per-row norm over the last dimension, kept as `[..., 1]`.
fn row_norm(z: &Tensor, norm: NagNorm) -> Result<Tensor> {
    match norm {
        NagNorm::L1 => z.abs()?.sum_keepdim(D::Minus1),
        NagNorm::L2 => z.sqr()?.sum_keepdim(D::Minus1)?.sqrt(),
    }
}

/// NAG (eq. 7-10) of `z_pos` and `z_neg`, same shape `[..., d]`. Computed in f32 whatever the
/// input dtype (norm sums over thousands of channels lose too much in bf16), returned in the
/// input dtype.
pub fn nag(z_pos: &Tensor, z_neg: &Tensor, p: &NagParams) -> Result<Tensor> {
    if let Some(z) = crate::kernels::map_row_pairs(z_pos, z_neg, |zp, zn, out| nag_row(zp, zn, p, out))? {
        return Ok(z);
    }
    nag_tensors(z_pos, z_neg, p)
}

/// [`nag`] as tensor ops (any device and dtype).
fn nag_tensors(z_pos: &Tensor, z_neg: &Tensor, p: &NagParams) -> Result<Tensor> {
    let dtype = z_pos.dtype();
    let zp = z_pos.to_dtype(DType::F32)?;
    let zn = z_neg.to_dtype(DType::F32)?;
    // eq. 7
    let z_tilde = ((&zp * p.scale)? - (&zn * (p.scale - 1.0))?)?;
    // eq. 8 + 9, as min(1, tau ||Z+|| / max(||Z~||, EPS))
    let n_pos = row_norm(&zp, p.norm)?;
    let n_tilde = row_norm(&z_tilde, p.norm)?.clamp(EPS, f64::INFINITY)?;
    let factor = ((n_pos * p.tau)? / n_tilde)?.clamp(0.0, 1.0)?;
    let z_hat = z_tilde.broadcast_mul(&factor)?;
    // eq. 10
    let z = ((z_hat * p.alpha)? + (zp * (1.0 - p.alpha))?)?;
    z.to_dtype(dtype)
}

/// [`nag`] of one row (f32 on the CPU: one pass instead of a dozen tensor ops), the same
/// formulas in the same order.
fn nag_row(zp: &[f32], zn: &[f32], p: &NagParams, out: &mut [f32]) {
    let (s, s1) = (p.scale as f32, (p.scale - 1.0) as f32);
    let norm = |x: f32| match p.norm {
        NagNorm::L1 => x.abs(),
        NagNorm::L2 => x * x,
    };
    let (mut n_pos, mut n_tilde) = (0f32, 0f32);
    for ((o, &a), &b) in out.iter_mut().zip(zp).zip(zn) {
        let t = a * s - b * s1;
        *o = t;
        n_pos += norm(a);
        n_tilde += norm(t);
    }
    if p.norm == NagNorm::L2 {
        (n_pos, n_tilde) = (n_pos.sqrt(), n_tilde.sqrt());
    }
    let factor = ((n_pos * p.tau as f32) / n_tilde.max(EPS as f32)).clamp(0.0, 1.0);
    let (alpha, keep) = (p.alpha as f32, (1.0 - p.alpha) as f32);
    for (o, &a) in out.iter_mut().zip(zp) {
        *o = *o * factor * alpha + a * keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: &[&[f32]]) -> Tensor {
        let d = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &[&[f32]]) {
        let a = a.to_vec2::<f32>().unwrap();
        for (ra, rb) in a.iter().zip(b) {
            for (x, y) in ra.iter().zip(rb.iter()) {
                assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn row_kernel_equals_tensor_ops() {
        let zp = Tensor::randn(0f32, 1.0, (2, 7, 33), &Device::Cpu).unwrap();
        let zn = (Tensor::randn(0f32, 1.0, (2, 7, 33), &Device::Cpu).unwrap() * 0.7).unwrap();
        for norm in [NagNorm::L1, NagNorm::L2] {
            for tau in [0.5, 2.5, 100.0] {
                let p = NagParams { scale: 5.0, tau, alpha: 0.25, norm };
                let diff = (nag(&zp, &zn, &p).unwrap() - nag_tensors(&zp, &zn, &p).unwrap()).unwrap();
                let max: f32 = diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                assert!(max < 1e-5, "{norm} tau {tau}: {max}");
            }
        }
    }

    #[test]
    fn unclipped_row_is_plain_extrapolation_blend() {
        // s = 2: Z~ = 2 Z+ - Z-. Z+ = [1, 1], Z- = [1, 0] -> Z~ = [1, 2]; R = 3/2 < tau = 2.5.
        // alpha = 0.5: Z = 0.5 [1, 2] + 0.5 [1, 1] = [1, 1.5].
        let p = NagParams { scale: 2.0, tau: 2.5, alpha: 0.5, norm: NagNorm::L1 };
        let z = nag(&t(&[&[1., 1.]]), &t(&[&[1., 0.]]), &p).unwrap();
        close(&z, &[&[1.0, 1.5]]);
    }

    #[test]
    fn clipped_row_l1() {
        // s = 5: Z~ = 5 [1, 0] - 4 [-1, 1] = [9, -4]; L1: R = 13 / 1 > tau = 2.5
        // Z^ = [9, -4] * 2.5 / 13; alpha = 0.25.
        let p = NagParams { scale: 5.0, tau: 2.5, alpha: 0.25, norm: NagNorm::L1 };
        let z = nag(&t(&[&[1., 0.]]), &t(&[&[-1., 1.]]), &p).unwrap();
        let f = 2.5 / 13.0;
        close(&z, &[&[0.25 * 9.0 * f + 0.75, 0.25 * -4.0 * f]]);
    }

    #[test]
    fn clipped_row_l2_differs_from_l1() {
        // Same input, L2: ||Z~|| = sqrt(97), ||Z+|| = 1.
        let p = NagParams { scale: 5.0, tau: 2.5, alpha: 0.25, norm: NagNorm::L2 };
        let z = nag(&t(&[&[1., 0.]]), &t(&[&[-1., 1.]]), &p).unwrap();
        let f = 2.5 / 97f32.sqrt();
        close(&z, &[&[0.25 * 9.0 * f + 0.75, 0.25 * -4.0 * f]]);
    }

    #[test]
    fn rows_are_independent() {
        let p = NagParams { scale: 5.0, tau: 2.5, alpha: 1.0, norm: NagNorm::L1 };
        // Row 0 unclipped (Z+ = Z- -> Z~ = Z+, R = 1), row 1 clipped.
        let z = nag(&t(&[&[3., -1.], &[1., 0.]]), &t(&[&[3., -1.], &[-1., 1.]]), &p).unwrap();
        let f = 2.5 / 13.0;
        close(&z, &[&[3., -1.], &[9.0 * f, -4.0 * f]]);
    }

    #[test]
    fn scale_one_is_identity() {
        let p = NagParams { scale: 1.0, tau: 2.5, alpha: 0.25, norm: NagNorm::L1 };
        let z = nag(&t(&[&[0.3, -2.0]]), &t(&[&[7., 7.]]), &p).unwrap();
        close(&z, &[&[0.3, -2.0]]);
    }

    #[test]
    fn zero_rows_give_no_nan() {
        let p = NagParams { scale: 4.0, tau: 2.5, alpha: 0.5, norm: NagNorm::L1 };
        // Row 0: Z+ = 0, Z- != 0 -> factor 0 -> Z = 0. Row 1: Z+ = Z- = 0 -> Z = 0.
        // Row 2: Z~ = 0 (s Z+ = (s-1) Z-) -> Z = (1 - alpha) Z+.
        let z = nag(&t(&[&[0., 0.], &[0., 0.], &[3., 6.]]), &t(&[&[1., -1.], &[0., 0.], &[4., 8.]]), &p).unwrap();
        close(&z, &[&[0., 0.], &[0., 0.], &[1.5, 3.0]]);
    }

    /// The official Wan processor's form, as an oracle: `ratio = nan_to_num(|G| / |Z+|, 10)`,
    /// rows with `ratio > tau` set to `G / (|G| + 1e-7) |Z+| tau`.
    fn official_wan(zp: &[Vec<f32>], zn: &[Vec<f32>], p: &NagParams) -> Vec<Vec<f32>> {
        let s = p.scale as f32;
        zp.iter()
            .zip(zn)
            .map(|(a, b)| {
                let g: Vec<f32> = a.iter().zip(b).map(|(x, y)| x * s - y * (s - 1.0)).collect();
                let (np, ng) = (a.iter().map(|x| x.abs()).sum::<f32>(), g.iter().map(|x| x.abs()).sum::<f32>());
                let ratio = ng / np;
                let ratio = if ratio.is_nan() { 10.0 } else { ratio };
                let g: Vec<f32> = if ratio > p.tau as f32 {
                    g.iter().map(|x| x / (ng + 1e-7) * np * p.tau as f32).collect()
                } else {
                    g
                };
                g.iter().zip(a).map(|(x, y)| x * p.alpha as f32 + y * (1.0 - p.alpha as f32)).collect()
            })
            .collect()
    }

    #[test]
    fn matches_the_official_wan_clip_form() {
        let p = NagParams { scale: 5.0, tau: 2.5, alpha: 0.25, norm: NagNorm::L1 };
        let mut x = 12345u64;
        let mut rnd = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0
        };
        let mut zp: Vec<Vec<f32>> = (0..6).map(|_| (0..64).map(|_| rnd()).collect()).collect();
        let mut zn: Vec<Vec<f32>> = (0..6).map(|_| (0..64).map(|_| rnd()).collect()).collect();
        zn[1] = zp[1].iter().map(|v| v * 0.9).collect(); // unclipped
        zp[2] = vec![0.0; 64]; // ratio inf -> clipped to 0
        zn[3] = vec![0.0; 64];
        zp[3] = vec![0.0; 64]; // ratio NaN -> 10 -> clipped to 0
        let want = official_wan(&zp, &zn, &p);
        let flat = |v: &[Vec<f32>]| Tensor::from_vec(v.concat(), (v.len(), 64), &Device::Cpu).unwrap();
        let got = nag(&flat(&zp), &flat(&zn), &p).unwrap().to_vec2::<f32>().unwrap();
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() / scale < 1e-5, "row {r}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn works_on_batched_head_merged_layout() {
        // [B, L, d] with a broadcasting row norm.
        let p = NagParams { scale: 2.0, tau: 2.5, alpha: 0.5, norm: NagNorm::L1 };
        let zp = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let zn = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        // Z~ = 2, R = 2 < 2.5, Z = 0.5*2 + 0.5*1 = 1.5
        let z = nag(&zp, &zn, &p).unwrap();
        let v = z.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (x - 1.5).abs() < 1e-6));
    }
}
