//! Learning-rate schedules, value for value identical to transformers 5.24 `get_scheduler`
//! (`optimization.py`) wrapped in torch's `LambdaLR`.
//!
//! Conventions (reference §7):
//! - the optimizer update with 0-based index `k` uses `lr = base_lr · λ(k)`;
//! - the `learning_rate` logged at global step `N` (1-based) is the lr of update `N`, i.e.
//!   `base_lr · λ(N − 1)` ([`LrSchedule::logged_lr`]);
//! - warmup given as a float `< 1` is a ratio: `ceil(total_steps · ratio)` ([`Warmup::steps`]).
//!
//! ```
//! use gptoss_sft::schedule::{LrSchedule, MinLr, SchedulerType, Warmup};
//! // The cookbook: 63 optimizer steps, warmup 3 % (= 2 steps), cosine down to 10 %.
//! let s = LrSchedule::new(SchedulerType::CosineWithMinLr, 2e-4, Warmup::Ratio(0.03), 63,
//!                         Some(MinLr::Rate(0.1))).unwrap();
//! assert_eq!(s.warmup_steps(), 2);
//! assert_eq!(s.logged_lr(1), 0.0);
//! assert_eq!(s.logged_lr(3), 2e-4);
//! ```

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SftError};

/// The schedule families of transformers' `SchedulerType` that this crate supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SchedulerType {
    /// `constant`: λ = 1 (warmup ignored, as transformers does).
    Constant,
    /// `constant_with_warmup`: linear warmup, then 1.
    ConstantWithWarmup,
    /// `linear`: linear warmup, then linear decay to 0 at `total_steps`.
    Linear,
    /// `cosine`: linear warmup, then half a cosine down to 0.
    Cosine,
    /// `cosine_with_min_lr`: like `cosine` but decaying to `min_lr_rate · base_lr`.
    CosineWithMinLr,
}

impl SchedulerType {
    /// The transformers name, e.g. `cosine_with_min_lr`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SchedulerType::Constant => "constant",
            SchedulerType::ConstantWithWarmup => "constant_with_warmup",
            SchedulerType::Linear => "linear",
            SchedulerType::Cosine => "cosine",
            SchedulerType::CosineWithMinLr => "cosine_with_min_lr",
        }
    }
}

impl fmt::Display for SchedulerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerType {
    type Err = SftError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => SchedulerType::Constant,
            "constant_with_warmup" => SchedulerType::ConstantWithWarmup,
            "linear" => SchedulerType::Linear,
            "cosine" => SchedulerType::Cosine,
            "cosine_with_min_lr" => SchedulerType::CosineWithMinLr,
            other => {
                return Err(SftError::Schedule(format!(
                    "unknown lr_scheduler_type `{other}` (expected constant, constant_with_warmup, \
                     linear, cosine or cosine_with_min_lr)"
                )))
            }
        })
    }
}

/// Warmup length: a step count, or a ratio of the total optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Warmup {
    /// An absolute number of optimizer steps.
    Steps(u64),
    /// A fraction in `[0, 1)` of the total steps, rounded up (`math.ceil`).
    Ratio(f64),
}

impl Warmup {
    /// transformers 5.24's `warmup_steps: float` convention: a value `>= 1` is a step count
    /// (`int(v)`), a value in `[0, 1)` a ratio. Negative or non-finite values are rejected.
    pub fn from_f64(v: f64) -> Result<Self> {
        if !v.is_finite() || v < 0.0 {
            return Err(SftError::Schedule(format!(
                "warmup must be a finite value >= 0, got {v}"
            )));
        }
        Ok(if v >= 1.0 {
            Warmup::Steps(v as u64)
        } else {
            Warmup::Ratio(v)
        })
    }

    /// The number of warmup steps for `total_steps` optimizer steps
    /// (`TrainingArguments.get_warmup_steps`).
    pub fn steps(&self, total_steps: u64) -> u64 {
        match *self {
            Warmup::Steps(s) => s,
            Warmup::Ratio(r) => (total_steps as f64 * r).ceil() as u64,
        }
    }
}

/// The floor of `cosine_with_min_lr` (transformers' `lr_scheduler_kwargs`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum MinLr {
    /// `min_lr_rate`: the floor as a fraction of the base lr.
    Rate(f64),
    /// `min_lr`: the absolute floor; the rate is `min_lr / base_lr`.
    Absolute(f64),
}

/// A resolved schedule: `lr(k) = base_lr · λ(k)` for the 0-based optimizer update `k`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    kind: SchedulerType,
    base_lr: f64,
    warmup_steps: u64,
    total_steps: u64,
    num_cycles: f64,
    min_lr_rate: f64,
}

impl LrSchedule {
    /// Builds a schedule like `get_scheduler(kind, optimizer(lr=base_lr), warmup, total_steps,
    /// scheduler_specific_kwargs={min_lr|min_lr_rate})`.
    ///
    /// `min_lr` is required for [`SchedulerType::CosineWithMinLr`] and rejected for the others.
    pub fn new(
        kind: SchedulerType,
        base_lr: f64,
        warmup: Warmup,
        total_steps: u64,
        min_lr: Option<MinLr>,
    ) -> Result<Self> {
        if !base_lr.is_finite() || base_lr < 0.0 {
            return Err(SftError::Schedule(format!(
                "learning rate must be finite and >= 0, got {base_lr}"
            )));
        }
        if let Warmup::Ratio(r) = warmup {
            if !(0.0..1.0).contains(&r) {
                return Err(SftError::Schedule(format!(
                    "warmup ratio must be in [0, 1), got {r}"
                )));
            }
        }
        let min_lr_rate = match (kind, min_lr) {
            (SchedulerType::CosineWithMinLr, Some(MinLr::Rate(r))) => r,
            (SchedulerType::CosineWithMinLr, Some(MinLr::Absolute(m))) => {
                if base_lr == 0.0 {
                    return Err(SftError::Schedule(
                        "min_lr needs a non-zero learning rate (min_lr_rate = min_lr / lr)".into(),
                    ));
                }
                m / base_lr
            }
            (SchedulerType::CosineWithMinLr, None) => {
                return Err(SftError::Schedule(
                    "cosine_with_min_lr needs min_lr or min_lr_rate in lr_scheduler_kwargs".into(),
                ))
            }
            (_, None) => 0.0,
            (k, Some(_)) => {
                return Err(SftError::Schedule(format!(
                    "min_lr / min_lr_rate only apply to cosine_with_min_lr, not {k}"
                )))
            }
        };
        if !min_lr_rate.is_finite() || min_lr_rate < 0.0 {
            return Err(SftError::Schedule(format!(
                "min_lr_rate must be finite and >= 0, got {min_lr_rate}"
            )));
        }
        Ok(Self {
            kind,
            base_lr,
            warmup_steps: warmup.steps(total_steps),
            total_steps,
            num_cycles: 0.5,
            min_lr_rate,
        })
    }

    /// The schedule family.
    pub fn kind(&self) -> SchedulerType {
        self.kind
    }

    /// The base (peak) learning rate.
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// Resolved warmup steps.
    pub fn warmup_steps(&self) -> u64 {
        self.warmup_steps
    }

    /// Total optimizer steps the schedule spans.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The floor as a fraction of the base lr (0 except for `cosine_with_min_lr`).
    pub fn min_lr_rate(&self) -> f64 {
        self.min_lr_rate
    }

    /// The multiplier λ(step) for the 0-based optimizer update `step`, computed with the same
    /// f64 operations, in the same order, as transformers.
    pub fn lambda(&self, step: u64) -> f64 {
        let s = step as f64;
        let w = self.warmup_steps;
        let t = self.total_steps;
        let warm = |s: f64| s / (w.max(1) as f64);
        match self.kind {
            SchedulerType::Constant => 1.0,
            SchedulerType::ConstantWithWarmup => {
                if step < w {
                    // float(current_step) / float(max(1.0, num_warmup_steps))
                    s / (w as f64).max(1.0)
                } else {
                    1.0
                }
            }
            SchedulerType::Linear => {
                if step < w {
                    warm(s)
                } else {
                    let num = t as f64 - s;
                    let den = (t as i128 - w as i128).max(1) as f64;
                    (num / den).max(0.0)
                }
            }
            SchedulerType::Cosine | SchedulerType::CosineWithMinLr => {
                if step < w {
                    warm(s)
                } else {
                    let progress = (step - w) as f64 / ((t as i128 - w as i128).max(1) as f64);
                    let factor = 0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress).cos());
                    let factor = factor * (1.0 - self.min_lr_rate) + self.min_lr_rate;
                    factor.max(0.0)
                }
            }
        }
    }

    /// The learning rate used by the 0-based optimizer update `step` (`base_lr · λ(step)`,
    /// torch `LambdaLR.get_lr`).
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.lambda(step)
    }

    /// The `learning_rate` the HF Trainer logs at 1-based global step `global_step`:
    /// `base_lr · λ(global_step − 1)` (0 for `global_step == 0`, before any update).
    pub fn logged_lr(&self, global_step: u64) -> f64 {
        if global_step == 0 {
            self.lr(0)
        } else {
            self.lr(global_step - 1)
        }
    }

    /// The scheduler state after `completed_steps` updates, as torch's `LambdaLR.state_dict()`
    /// would hold it (`last_epoch`, `_last_lr`).
    pub fn state(&self, completed_steps: u64) -> SchedulerState {
        SchedulerState {
            scheduler: self.clone(),
            last_epoch: completed_steps,
            last_lr: self.lr(completed_steps),
        }
    }
}

/// Serializable scheduler state (the checkpoint's `scheduler.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    /// The schedule itself (kind, base lr, resolved warmup, total steps, min rate).
    pub scheduler: LrSchedule,
    /// Number of completed optimizer updates (`LambdaLR.last_epoch`).
    pub last_epoch: u64,
    /// The lr the next update will use (`LambdaLR._last_lr[0]`).
    pub last_lr: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_section7_values() {
        // VERIFIED-RUN in reference §7: T=4, W=1, base 2e-4, min_lr_rate 0.1.
        let s = LrSchedule::new(
            SchedulerType::CosineWithMinLr,
            2e-4,
            Warmup::Steps(1),
            4,
            Some(MinLr::Rate(0.1)),
        )
        .unwrap();
        let logged: Vec<f64> = (1..=4).map(|n| s.logged_lr(n)).collect();
        let want = [0.0, 2e-4, 1.55e-4, 6.5e-5];
        for (g, w) in logged.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{logged:?}");
        }
        assert!((s.lr(4) - 2e-5).abs() < 1e-15);
    }

    #[test]
    fn warmup_ratio_ceil() {
        assert_eq!(Warmup::Ratio(0.03).steps(63), 2);
        assert_eq!(Warmup::from_f64(0.03).unwrap(), Warmup::Ratio(0.03));
        assert_eq!(Warmup::from_f64(5.0).unwrap(), Warmup::Steps(5));
        assert!(Warmup::from_f64(-1.0).is_err());
    }

    #[test]
    fn min_lr_rules() {
        assert!(LrSchedule::new(
            SchedulerType::CosineWithMinLr,
            1e-3,
            Warmup::Steps(0),
            10,
            None
        )
        .is_err());
        assert!(LrSchedule::new(
            SchedulerType::Linear,
            1e-3,
            Warmup::Steps(0),
            10,
            Some(MinLr::Rate(0.1))
        )
        .is_err());
        let s = LrSchedule::new(
            SchedulerType::CosineWithMinLr,
            1e-3,
            Warmup::Steps(0),
            10,
            Some(MinLr::Absolute(1e-4)),
        )
        .unwrap();
        assert!((s.min_lr_rate() - 0.1).abs() < 1e-15);
        assert!("nope".parse::<SchedulerType>().is_err());
    }
}
