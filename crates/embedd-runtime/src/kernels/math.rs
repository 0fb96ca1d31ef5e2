//! Scalar math written so that loops over it vectorize: no libm calls, no branches.
//!
//! Accuracy is what a float32 reference needs for parity: `exp` is within a few ulp, `erf` within
//! 1.5e-7 absolute (Abramowitz and Stegun 7.1.26).

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5 * 2^23 rounds a float to the nearest integer without a call.
const ROUND_MAGIC: f32 = 12_582_912.0;

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor to r^7: |r| <= ln2/2 leaves a remainder below 1e-8.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n from the integer the magic left in the low mantissa bits (n + 2^22): integer ops that
    // vectorize, where `n as i32` (a saturating conversion) went lane by lane.
    let biased = shifted.to_bits().wrapping_sub(ROUND_MAGIC.to_bits() - 127);
    let scale = f32::from_bits(biased << 23);
    p * scale
}

#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// Exact GELU: `x * Phi(x)`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The tanh approximation of GELU.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let z = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    // tanh(z) = 1 - 2 / (exp(2z) + 1), stable at both ends once exp clamps.
    let tanh = 1.0 - 2.0 / (exp(2.0 * z) + 1.0);
    0.5 * x * (1.0 + tanh)
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
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
    fn erf_and_gelu_match_reference_values() {
        // erf from a double-precision reference.
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (-1.5, -0.966_105_146_475_310_7),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            assert!((erf(x) as f64 - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
        assert!((gelu(1.0) - 0.841_344_7).abs() < 2e-7);
        assert!((gelu(-3.0) + 0.004_049_69).abs() < 2e-7);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 2e-6);
        assert!((silu(2.0) - 1.761_594_2).abs() < 1e-6);
    }

    #[test]
    fn reductions_cover_the_tail() {
        let v: Vec<f32> = (0..37).map(|i| i as f32).collect();
        assert_eq!(sum(&v), (0..37).sum::<i32>() as f32);
        assert_eq!(max(&v), 36.0);
        assert_eq!(max(&v[..3]), 2.0);
    }
}
