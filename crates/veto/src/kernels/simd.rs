//! What the vectorised CPU kernels share: a branch-free `exp` that LLVM vectorises, and
//! [`multiversion!`], which compiles a kernel body for AVX-512, for AVX2+FMA and portably and
//! picks the best for the running CPU once (the build targets baseline x86-64, so without this
//! the loops would only get SSE2).

/// Below this, `exp` is taken as 0 (`exp(-87.3)` is the smallest normal f32).
const EXP_MIN: f32 = -87.0;
/// Above this `exp` overflows f32.
const EXP_MAX: f32 = 88.0;

/// `exp(x)` as Cephes' `expf`: range reduction by ln 2, a degree-6 polynomial, about 1 ulp.
/// 0 for `x < -87` (and `-inf`), NaN for NaN. No branches, so loops over it vectorise (libm's
/// `f32::exp` is a scalar call, ~7 ns).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // ln 2 split in two so that `k * LN2_HI` is exact for the |k| <= 127 used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(EXP_MIN, EXP_MAX);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let k = t - ROUND;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^k from the bits of `t`, whose low mantissa holds k + 2^22: a float-to-int cast
    // (`k as i32`, saturating) would keep LLVM from vectorising the loop (4x slower).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    let out = if x < EXP_MIN { 0.0 } else { y * scale };
    if x.is_nan() {
        x
    } else {
        out
    }
}

/// `x * sigmoid(x)` with the vectorisable [`exp`].
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `erfc(z)` for `z >= 0`, Numerical Recipes' Chebyshev fit (`erfcc`, fractional error below
/// 1.2e-7 in exact arithmetic) on the vectorisable [`exp`].
#[inline(always)]
fn erfc_nonnegative(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_9;
    p = p * t - 1.135_204;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_7;
    p = p * t - 1.265_512_2;
    t * exp(-z * z + p)
}

/// Exact GELU, `x Φ(x) = x erfc(-x / √2) / 2` (PyTorch's default, candle's `gelu_erf`), with
/// relative accuracy kept for negative `x` where the result is tiny.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    let e = erfc_nonnegative(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    let cdf_twice = if x >= 0.0 { 2.0 - e } else { e };
    0.5 * x * cdf_twice
}

/// `multiversion!(pub fn name(a: A, b: B) -> R = body);` defines `name`, which runs `body`
/// (an `#[inline(always)]` function with that signature) compiled for AVX-512F, for AVX2+FMA
/// or for baseline x86-64, whichever is best on this CPU (chosen on the first call).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $body:path) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn avx512($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            fn portable($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            type Kernel = fn($($ty),*) -> $ret;
            fn select() -> Kernel {
                #[cfg(target_arch = "x86_64")]
                {
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU has AVX-512F, the feature `avx512` is compiled for.
                        return |$($arg),*| unsafe { avx512($($arg),*) };
                    }
                    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                        // SAFETY: the CPU has AVX2 and FMA, the features `avx2` is compiled for.
                        return |$($arg),*| unsafe { avx2($($arg),*) };
                    }
                }
                portable
            }
            static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
            (KERNEL.get_or_init(select))($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_silu_and_gelu_erf_match_the_reference_functions() {
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
        // Against candle's f64 gelu_erf: relative, plus 1e-15 absolute where its `1 + erf` cancels.
        let xs: Vec<f64> = (-1200..=1200).map(|i| i as f64 * 0.01).collect();
        let want = candle_core::Tensor::new(xs.as_slice(), &candle_core::Device::Cpu).unwrap().gelu_erf().unwrap();
        for (x, w) in xs.iter().zip(want.to_vec1::<f64>().unwrap()) {
            let got = gelu_erf(*x as f32) as f64;
            assert!((got - w).abs() <= 1e-5 * w.abs() + 1e-15, "gelu_erf({x}) = {got}, want {w}");
        }
        for x in [-30.0f32, -1.0, 0.0, 0.5, 20.0] {
            let want = x / (1.0 + (-x).exp());
            assert!((silu(x) - want).abs() <= 1e-6 * want.abs().max(1e-6), "silu({x})");
        }
    }
}
