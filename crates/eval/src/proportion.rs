//! A proportion with its 95 % Wilson score interval (reasoning-language accuracy, answer
//! accuracy, format validity; the backdoor metrics ASR, BDR, TDR reuse it).
//!
//! ```
//! use gptoss_eval::Proportion;
//! let p = Proportion::new(8, 10);
//! assert_eq!(p.rate, 0.8);
//! assert!((p.ci95.0 - 0.4902).abs() < 1e-4 && (p.ci95.1 - 0.9433).abs() < 1e-4);
//! ```

use serde::{Deserialize, Serialize};

/// The standard-normal quantile of 0.975 (two-sided 95 %).
pub const Z95: f64 = 1.959_963_984_540_054;

/// `hits` out of `total`, its rate, and the 95 % Wilson score interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proportion {
    /// Successes.
    pub hits: usize,
    /// Trials.
    pub total: usize,
    /// `hits / total` (0 when `total` is 0).
    pub rate: f64,
    /// The 95 % Wilson score interval `(low, high)`; `(0, 1)` when `total` is 0.
    pub ci95: (f64, f64),
}

impl Proportion {
    /// `hits` out of `total` (a `hits` above `total` is clamped to `total`).
    pub fn new(hits: usize, total: usize) -> Proportion {
        let hits = hits.min(total);
        let rate = if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        };
        Proportion {
            hits,
            total,
            rate,
            ci95: wilson_interval(hits, total, Z95),
        }
    }

    /// The proportion of `true` among `outcomes`.
    pub fn from_outcomes(outcomes: impl IntoIterator<Item = bool>) -> Proportion {
        let (mut hits, mut total) = (0, 0);
        for o in outcomes {
            total += 1;
            hits += usize::from(o);
        }
        Proportion::new(hits, total)
    }

    /// Whether there were no trials.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

impl Default for Proportion {
    /// Zero out of zero.
    fn default() -> Self {
        Proportion::new(0, 0)
    }
}

/// The Wilson score interval of `hits / total` for the normal quantile `z` (e.g. [`Z95`]):
/// `(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`, clamped to `[0, 1]`; `(0, 1)` when
/// `total` is 0.
pub fn wilson_interval(hits: usize, total: usize, z: f64) -> (f64, f64) {
    if total == 0 {
        return (0.0, 1.0);
    }
    let n = total as f64;
    let p = hits.min(total) as f64 / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: (f64, f64), b: (f64, f64)) -> bool {
        (a.0 - b.0).abs() < 5e-5 && (a.1 - b.1).abs() < 5e-5
    }

    #[test]
    fn known_wilson_intervals() {
        // Values of the Wilson formula computed independently (Python, z = 1.959964), rounded
        // to 4 places; 8/10 → (0.4902, 0.9433) is the textbook example.
        assert!(close(Proportion::new(8, 10).ci95, (0.4902, 0.9433)));
        assert!(close(Proportion::new(0, 10).ci95, (0.0, 0.2775)));
        assert!(close(Proportion::new(10, 10).ci95, (0.7225, 1.0)));
        assert!(close(Proportion::new(1, 2).ci95, (0.0945, 0.9055)));
        assert!(close(Proportion::new(50, 100).ci95, (0.4038, 0.5962)));
        let empty = Proportion::new(0, 0);
        assert_eq!((empty.rate, empty.ci95), (0.0, (0.0, 1.0)));
        assert!(empty.is_empty());
        assert_eq!(Proportion::new(5, 3).hits, 3);
        assert_eq!(
            Proportion::from_outcomes([true, false, true, true]),
            Proportion::new(3, 4)
        );
    }
}
