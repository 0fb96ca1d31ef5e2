//! Scalar math written so that loops over it vectorize: no libm calls, no branches. Polynomials
//! use `mul_add`, which the AVX2 and AVX-512 builds of [`super::simd_function`] turn into FMA
//! (the compiler does not fuse a separate multiply and add by itself); a baseline build without
//! FMA calls libm for it.
//!
//! Accuracy is what a float32 reference needs for parity: `exp` is within a few ulp, `erf` within
//! 1.5e-7 absolute (Abramowitz and Stegun 7.1.26) plus float32 rounding.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5 * 2^23 rounds a float to the nearest integer without a call.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `c[0] + x (c[1] + x (c[2] + ...))`, one fused multiply-add per coefficient.
#[inline(always)]
fn horner<const N: usize>(x: f32, c: [f32; N]) -> f32 {
    c[..N - 1]
        .iter()
        .rev()
        .fold(c[N - 1], |acc, &ci| acc.mul_add(x, ci))
}

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Taylor to r^7: |r| <= ln2/2 leaves a remainder below 1e-8.
    exp_taylor(
        x,
        [
            1.0,
            1.0,
            0.5,
            1.0 / 6.0,
            1.0 / 24.0,
            1.0 / 120.0,
            1.0 / 720.0,
            1.0 / 5040.0,
        ],
    )
}

/// `e^x = 2^n e^r` with `|r| <= ln2/2`, `e^r` from the Taylor coefficients `taylor`.
#[inline(always)]
fn exp_taylor<const N: usize>(x: f32, taylor: [f32; N]) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let shifted = x.mul_add(LOG2_E, ROUND_MAGIC);
    let n = shifted - ROUND_MAGIC;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let p = horner(r, taylor);
    // 2^n from the integer the magic left in the low mantissa bits (n + 2^22): integer ops that
    // vectorize, where `n as i32` (a saturating conversion) went lane by lane.
    let biased = shifted.to_bits().wrapping_sub(ROUND_MAGIC.to_bits() - 127);
    let scale = f32::from_bits(biased << 23);
    p * scale
}

/// `1 / d` for `d >= 1` (larger than 1e37 reads as 1e37) without a division: a vector divide
/// takes about as long as the rest of GELU together, where these seven operations pipeline with
/// it. The exponent-flipping guess is within 5.1% everywhere; three Newton steps (each squaring
/// the error) leave float32 rounding.
#[inline(always)]
pub fn recip(d: f32) -> f32 {
    newton_recip::<3>(d)
}

/// [`recip`] after `STEPS` Newton steps: relative error 5.1e-2, 2.6e-3, 6.5e-6, then rounding.
#[inline(always)]
fn newton_recip<const STEPS: usize>(d: f32) -> f32 {
    let d = d.min(1e37);
    let mut y = f32::from_bits(0x7EF3_11C3u32.wrapping_sub(d.to_bits()));
    for _ in 0..STEPS {
        y = y.mul_add((-d).mul_add(y, 1.0), y);
    }
    y
}

#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = recip(a.mul_add(0.327_591_1, 1.0));
    let poly = t * horner(
        t,
        [
            0.254_829_6,
            -0.284_496_74,
            1.421_413_8,
            -1.453_152,
            1.061_405_4,
        ],
    );
    let y = (-poly).mul_add(exp(-a * a), 1.0);
    y.copysign(x)
}

/// Exact GELU: `x * Phi(x)`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let half = 0.5 * x;
    half.mul_add(erf(x * std::f32::consts::FRAC_1_SQRT_2), half)
}

/// Exact GELU to about 3e-5 absolute, for outputs rounded to bfloat16 next (relative steps of
/// 2^-8): Abramowitz and Stegun 7.1.25 (three terms), a two-step reciprocal and a degree-5
/// `exp`, ten fewer operations than [`gelu`], whose extra digits bfloat16 drops.
#[inline(always)]
pub fn gelu_reduced(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = newton_recip::<2>(a.mul_add(0.470_47, 1.0));
    let poly = t * horner(t, [0.348_024_2, -0.095_879_8, 0.747_855_6]);
    let erf = (-poly).mul_add(exp_reduced(-a * a), 1.0).copysign(z);
    let half = 0.5 * x;
    half.mul_add(erf, half)
}

/// `exp` to a few parts in a million (Taylor to r^5), for [`gelu_reduced`].
#[inline(always)]
fn exp_reduced(x: f32) -> f32 {
    exp_taylor(x, [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0])
}

/// The tanh approximation of GELU.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let z = SQRT_2_OVER_PI * (0.044_715 * x * x).mul_add(x, x);
    // tanh(z) = 1 - 2 / (exp(2z) + 1), stable at both ends once exp clamps.
    let tanh = 1.0 - 2.0 * recip(exp(2.0 * z) + 1.0);
    0.5 * x * (1.0 + tanh)
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x * recip(1.0 + exp(-x))
}

/// CLIP's sigmoid approximation of GELU: `x * sigmoid(1.702 x)`.
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    x * recip(1.0 + exp(-1.702 * x))
}

#[inline(always)]
pub fn relu(x: f32) -> f32 {
    x.max(0.0)
}

/// Lanes for reductions: float sums are not reassociated by the compiler, so vector-width
/// partial sums are kept by hand.
pub const LANES: usize = 16;

#[inline(always)]
pub fn sum(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
pub fn max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.04;
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn recip_is_within_float_rounding() {
        let mut d = 1.0f32;
        while d < 1e38 {
            for step in [1.0f32, 1.37, 1.999, 2.5, 3.3] {
                let v = d * step;
                let want = 1.0 / v.min(1e37) as f64;
                let got = recip(v) as f64;
                assert!(((got - want) / want).abs() < 2.5e-7, "recip({v}) = {got}");
            }
            d *= 4.0;
        }
        assert!(silu(-100.0).abs() < 1e-30 && (silu(100.0) - 100.0).abs() < 1e-5);
        assert!((quick_gelu(-200.0)).abs() < 1e-30);
    }

    #[test]
    fn erf_and_gelu_match_reference_values() {
        // erf from a double-precision reference.
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (-1.5, -0.966_105_146_475_310_7),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            assert!((erf(x) as f64 - want).abs() < 3e-7, "erf({x}) = {}", erf(x));
        }
        assert!((gelu(1.0) - 0.841_344_7).abs() < 2e-7);
        assert!((gelu(-3.0) + 0.004_049_69).abs() < 2e-7);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 2e-6);
        assert!((silu(2.0) - 1.761_594_2).abs() < 1e-6);
    }

    #[test]
    fn reduced_gelu_is_within_3e5_of_gelu() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 5e-4;
            let (got, want) = (gelu_reduced(x), gelu(x));
            assert!(
                (got - want).abs() < 3e-5,
                "gelu_reduced({x}) = {got}, gelu {want}"
            );
        }
        assert_eq!(gelu_reduced(-200.0), 0.0);
        assert_eq!(gelu_reduced(200.0), 200.0);
    }

    #[test]
    fn reductions_cover_the_tail() {
        let v: Vec<f32> = (0..37).map(|i| i as f32).collect();
        assert_eq!(sum(&v), (0..37).sum::<i32>() as f32);
        assert_eq!(max(&v), 36.0);
        assert_eq!(max(&v[..3]), 2.0);
    }
}
