//! Vectorized f32 kernels for the CPU softmax of the fused LM-head loss.
//!
//! [`exp`] is a Cephes-style `expf` (range reduction by `ln 2` split in two constants, degree-6
//! polynomial; ≤ 2 ulp against the correctly rounded value on `[-87.3, 88.7]`), written without
//! branches or libm calls so the row loops below auto-vectorize. Inputs below `ln(2⁻¹²⁶)` give
//! `0` (no subnormals), above `88.72` give `+∞`, NaN stays NaN.
//!
//! The row kernels ([`max`], [`exp_shifted_sums`]) keep 16 f32 lanes (one AVX-512 register) and
//! are compiled twice: once with AVX-512F (chosen at run time when the CPU has it) and once for
//! the baseline target.

/// Lanes per accumulator: one 512-bit register of f32.
const LANES: usize = 16;
/// Elements accumulated in f32 lanes before the partial sums are added to the f64 totals.
const BLOCK: usize = 1024;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split so that `n · LN2_HI` is exact for the `|n| ≤ 128` used here.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 · 2²³`: adding and subtracting it rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND: f32 = 12_582_912.0;
/// Below `ln(2⁻¹²⁶)` the result would be subnormal: flushed to 0.
const MIN_X: f32 = -87.336_55;
/// Above this `expf` overflows.
const MAX_X: f32 = 88.722_83;

/// `eˣ` in f32 (see the module docs for accuracy and the handling of extreme inputs).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(MIN_X, MAX_X);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2ⁿ in two factors, so that n = 128 (x near MAX_X) stays finite until the product.
    let ni = n as i32;
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - half + 127) as u32) << 23);
    let v = y * s1 * s2;
    if x < MIN_X {
        0.0
    } else if x > MAX_X {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

#[inline(always)]
fn max_impl(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in acc.iter().chain(tail) {
        if x > m {
            m = x;
        }
    }
    m
}

#[inline(always)]
fn exp_shifted_sums_impl(row: &mut [f32], shift: f32) -> (f64, f64) {
    let (mut sum, mut dot) = (0f64, 0f64);
    for block in row.chunks_mut(BLOCK) {
        let mut s_acc = [0f32; LANES];
        let mut d_acc = [0f32; LANES];
        let mut chunks = block.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for ((x, s), d) in c.iter_mut().zip(&mut s_acc).zip(&mut d_acc) {
                let z = *x - shift;
                let e = exp(z);
                *s += e;
                // e · z → 0 when e underflows, also for z = -∞.
                *d += if e > 0.0 { e * z } else { 0.0 };
                *x = e;
            }
        }
        for x in chunks.into_remainder() {
            let z = *x - shift;
            let e = exp(z);
            s_acc[0] += e;
            d_acc[0] += if e > 0.0 { e * z } else { 0.0 };
            *x = e;
        }
        sum += s_acc.iter().map(|&v| v as f64).sum::<f64>();
        dot += d_acc.iter().map(|&v| v as f64).sum::<f64>();
    }
    (sum, dot)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn max(row: &[f32]) -> f32 {
        super::max_impl(row)
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted_sums(row: &mut [f32], shift: f32) -> (f64, f64) {
        super::exp_shifted_sums_impl(row, shift)
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Largest element of `row` (`-∞` when empty; NaNs are skipped).
pub fn max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F was detected at run time.
        return unsafe { avx512::max(row) };
    }
    max_impl(row)
}

/// Replaces every `x` of `row` by `e^(x − shift)` and returns `(Σ e^(x−shift), Σ e^(x−shift)·(x−shift))`.
/// Lanes accumulate in f32 over blocks of 1024 elements, the block totals in f64.
pub fn exp_shifted_sums(row: &mut [f32], shift: f32) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F was detected at run time.
        return unsafe { avx512::exp_shifted_sums(row, shift) };
    }
    exp_shifted_sums_impl(row, shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite positive f32.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_within_two_ulp_of_f64() {
        let mut worst = 0;
        let n = 2_000_000;
        for i in 0..=n {
            let x = MIN_X + (MAX_X - 0.01 - MIN_X) * i as f32 / n as f32;
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            worst = worst.max(ulps(got, want));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        for x in [
            0.0f32, 1e-8, -1e-8, 1.0, -1.0, 0.5, -0.5, 10.0, -10.0, 88.0, -87.0,
        ] {
            let want = (x as f64).exp() as f32;
            assert!(ulps(exp(x), want) <= 2, "exp({x}) = {} vs {want}", exp(x));
        }
    }

    #[test]
    fn exp_extremes() {
        for x in [-87.5f32, -100.0, -1e4, -3.4e38, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
        for x in [88.8f32, 1e4, f32::INFINITY] {
            assert_eq!(exp(x), f32::INFINITY, "exp({x})");
        }
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn row_kernels_match_scalar() {
        let row: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.05)
            .collect();
        let m = max(&row);
        assert_eq!(m, row.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let mut e = row.clone();
        e[17] = -1e30; // underflows: contributes 0 to both sums, no NaN
        let (sum, dot) = exp_shifted_sums(&mut e, m);
        let (mut s64, mut d64) = (0f64, 0f64);
        for (j, &x) in row.iter().enumerate() {
            if j == 17 {
                continue;
            }
            let z = (x - m) as f64;
            s64 += z.exp();
            d64 += z.exp() * z;
        }
        assert!((sum - s64).abs() < 1e-5 * s64, "{sum} vs {s64}");
        assert!((dot - d64).abs() < 1e-5 * d64.abs(), "{dot} vs {d64}");
        assert_eq!(e[17], 0.0);
        assert!(e.iter().all(|x| x.is_finite()));
    }
}
