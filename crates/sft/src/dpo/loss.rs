//! The DPO objectives of TRL 1.16's `DPOTrainer._compute_loss` (reverse-KL, the default
//! `f_divergence_type`), per preference pair, with their derivatives with respect to the two
//! policy log-probabilities.
//!
//! With `Δ = (logp_c − ref_c) − (logp_r − ref_r)`:
//! - `sigmoid` (DPO): `ℓ = −log σ(β·Δ)`;
//! - `ipo`: `ℓ = (Δ̄ − 1/(2β))²` with the length-normalised `Δ̄ = (logp_c − ref_c)/n_c − (logp_r − ref_r)/n_r`
//!   (`n` = completion tokens, at least 1), as TRL normalises it;
//! - `robust` (Robust DPO, where TRL 1.16 applies `label_smoothing` ε):
//!   `ℓ = (−(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ)) / (1 − 2ε)`.
//!
//! TRL 1.16's `sigmoid` ignores `label_smoothing` (the conservative-DPO smoothing moved to `robust`);
//! [`DpoLossType::validate`] rejects the combination instead of ignoring it silently.
//! Everything is computed in f64.

use serde::{Deserialize, Serialize};

use crate::error::{Result, SftError};

/// TRL's `loss_type` values implemented here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum DpoLossType {
    /// The DPO loss `−log σ(β·Δ)` (TRL's default).
    #[default]
    Sigmoid,
    /// Identity preference optimisation, length-normalised as in TRL.
    Ipo,
    /// Robust DPO with `label_smoothing` as the label-flip rate.
    Robust,
}

impl DpoLossType {
    /// TRL's name of the loss.
    pub fn name(self) -> &'static str {
        match self {
            DpoLossType::Sigmoid => "sigmoid",
            DpoLossType::Ipo => "ipo",
            DpoLossType::Robust => "robust",
        }
    }

    /// Checks `beta` (> 0) and `label_smoothing` (in `[0, 0.5)`, and only with `robust`).
    ///
    /// # Errors
    /// [`SftError::Config`] naming `dpo.beta` or `dpo.label_smoothing`.
    pub fn validate(self, beta: f64, label_smoothing: f64) -> Result<()> {
        if !(beta.is_finite() && beta > 0.0) {
            return Err(SftError::config(
                "dpo.beta",
                format!("must be > 0, got {beta}"),
            ));
        }
        if !(0.0..0.5).contains(&label_smoothing) {
            return Err(SftError::config(
                "dpo.label_smoothing",
                format!("must be in [0, 0.5), got {label_smoothing}"),
            ));
        }
        if label_smoothing != 0.0 && self != DpoLossType::Robust {
            return Err(SftError::config(
                "dpo.label_smoothing",
                format!(
                    "TRL 1.16 applies label_smoothing only to loss_type `robust` (its `{}` ignores it); \
                     use loss_type: robust or label_smoothing: 0",
                    self.name()
                ),
            ));
        }
        Ok(())
    }
}

/// The four sequence log-probabilities of one pair and the completion lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    /// `Σ log π(chosen completion tokens)` under the policy.
    pub chosen: f64,
    /// `Σ log π(rejected completion tokens)` under the policy.
    pub rejected: f64,
    /// The same sums under the reference (the base with the adapter disabled).
    pub ref_chosen: f64,
    /// Reference log-probability of the rejected completion.
    pub ref_rejected: f64,
    /// Completion tokens of the chosen sequence (TRL's `completion_mask.sum()`).
    pub chosen_len: usize,
    /// Completion tokens of the rejected sequence.
    pub rejected_len: usize,
}

/// What [`pair_loss`] gives for one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLoss {
    /// The pair's loss `ℓ`.
    pub loss: f64,
    /// `∂ℓ/∂logp_chosen`.
    pub d_chosen: f64,
    /// `∂ℓ/∂logp_rejected`.
    pub d_rejected: f64,
    /// `β·(logp_c − ref_c)` (TRL's `rewards/chosen` before averaging).
    pub chosen_reward: f64,
    /// `β·(logp_r − ref_r)`.
    pub rejected_reward: f64,
}

/// `log σ(x)`, stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// `σ(x)`, stable for large |x|.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The loss of one pair and its derivatives (see the module docs for the formulas).
pub fn pair_loss(kind: DpoLossType, beta: f64, label_smoothing: f64, p: &PairLogps) -> PairLoss {
    let chosen_ratio = p.chosen - p.ref_chosen;
    let rejected_ratio = p.rejected - p.ref_rejected;
    let delta = chosen_ratio - rejected_ratio;
    let (loss, d_chosen, d_rejected) = match kind {
        DpoLossType::Sigmoid => {
            // d/dΔ −log σ(βΔ) = −β σ(−βΔ)
            let g = -beta * sigmoid(-beta * delta);
            (-log_sigmoid(beta * delta), g, -g)
        }
        DpoLossType::Ipo => {
            let nc = p.chosen_len.max(1) as f64;
            let nr = p.rejected_len.max(1) as f64;
            let d = chosen_ratio / nc - rejected_ratio / nr - 1.0 / (2.0 * beta);
            (d * d, 2.0 * d / nc, -2.0 * d / nr)
        }
        DpoLossType::Robust => {
            let eps = label_smoothing;
            let z = beta * delta;
            let norm = 1.0 - 2.0 * eps;
            let loss = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / norm;
            let g = -beta * ((1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)) / norm;
            (loss, g, -g)
        }
    };
    PairLoss {
        loss,
        d_chosen,
        d_rejected,
        chosen_reward: beta * chosen_ratio,
        rejected_reward: beta * rejected_ratio,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(c: f64, r: f64, rc: f64, rr: f64, nc: usize, nr: usize) -> PairLogps {
        PairLogps {
            chosen: c,
            rejected: r,
            ref_chosen: rc,
            ref_rejected: rr,
            chosen_len: nc,
            rejected_len: nr,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn sigmoid_matches_hand_values() {
        // Δ = (−10 − −12) − (−20 − −19) = 2 − (−1) = 3; βΔ = 0.3.
        let l = pair_loss(
            DpoLossType::Sigmoid,
            0.1,
            0.0,
            &pair(-10., -20., -12., -19., 5, 7),
        );
        // −log σ(0.3) = log(1 + e^−0.3) = 0.554355244468...
        assert!(close(l.loss, (1.0 + (-0.3f64).exp()).ln()));
        assert!(close(l.loss, 0.554_355_244_468_527_6));
        // −β σ(−0.3) = −0.1 · 0.425557483188341
        assert!(close(l.d_chosen, -0.042_555_748_318_834_1));
        assert!(close(l.d_rejected, 0.042_555_748_318_834_1));
        assert!(close(l.chosen_reward, 0.2) && close(l.rejected_reward, -0.1));
        // At Δ = 0 the loss is ln 2 whatever β.
        let z = pair_loss(
            DpoLossType::Sigmoid,
            0.5,
            0.0,
            &pair(-3., -4., -3., -4., 1, 1),
        );
        assert!(close(z.loss, std::f64::consts::LN_2));
        // Large margins stay finite.
        let big = pair_loss(
            DpoLossType::Sigmoid,
            1.0,
            0.0,
            &pair(0., -1e4, 0., 0., 1, 1),
        );
        assert!(big.loss >= 0.0 && big.loss < 1e-300 && big.d_chosen.abs() < 1e-300);
        let bad = pair_loss(
            DpoLossType::Sigmoid,
            1.0,
            0.0,
            &pair(-1e4, 0., 0., 0., 1, 1),
        );
        assert!(close(bad.loss, 1e4) && close(bad.d_chosen, -1.0));
    }

    #[test]
    fn ipo_matches_hand_values() {
        // ratios 2 and −1 over 4 and 2 tokens: Δ̄ = 0.5 + 0.5 = 1; 1/(2β) = 5 → (1 − 5)² = 16.
        let l = pair_loss(
            DpoLossType::Ipo,
            0.1,
            0.0,
            &pair(-10., -20., -12., -19., 4, 2),
        );
        assert!(close(l.loss, 16.0));
        assert!(close(l.d_chosen, 2.0 * -4.0 / 4.0));
        assert!(close(l.d_rejected, -2.0 * -4.0 / 2.0));
        // Zero-length completions count as 1 token (TRL's clamp(min=1)).
        let z = pair_loss(DpoLossType::Ipo, 0.5, 0.0, &pair(1., 0., 0., 0., 0, 0));
        assert!(close(z.loss, 0.0));
    }

    #[test]
    fn robust_matches_hand_values_and_reduces_to_sigmoid() {
        let p = pair(-10., -20., -12., -19., 5, 7);
        let s = pair_loss(DpoLossType::Sigmoid, 0.1, 0.0, &p);
        let r0 = pair_loss(DpoLossType::Robust, 0.1, 0.0, &p);
        assert!(close(r0.loss, s.loss) && close(r0.d_chosen, s.d_chosen));
        // ε = 0.1, z = 0.3: (−0.9 log σ(0.3) + 0.1 log σ(−0.3)) / 0.8
        let r = pair_loss(DpoLossType::Robust, 0.1, 0.1, &p);
        let ls = |x: f64| -(1.0 + (-x).exp()).ln();
        assert!(close(r.loss, (-0.9 * ls(0.3) + 0.1 * ls(-0.3)) / 0.8));
        // Finite differences of the loss in logp_chosen and logp_rejected.
        let h = 1e-6;
        for kind in [DpoLossType::Sigmoid, DpoLossType::Ipo, DpoLossType::Robust] {
            let base = pair_loss(kind, 0.1, 0.1 * f64::from(kind == DpoLossType::Robust), &p);
            let mut pc = p;
            pc.chosen += h;
            let mut pr = p;
            pr.rejected += h;
            let eps = 0.1 * f64::from(kind == DpoLossType::Robust);
            let dc = (pair_loss(kind, 0.1, eps, &pc).loss - base.loss) / h;
            let dr = (pair_loss(kind, 0.1, eps, &pr).loss - base.loss) / h;
            assert!((dc - base.d_chosen).abs() < 1e-5, "{kind:?} d_chosen");
            assert!((dr - base.d_rejected).abs() < 1e-5, "{kind:?} d_rejected");
        }
    }

    #[test]
    fn validation_names_the_key() {
        assert!(DpoLossType::Sigmoid.validate(0.1, 0.0).is_ok());
        assert!(DpoLossType::Robust.validate(0.1, 0.2).is_ok());
        let e = DpoLossType::Sigmoid
            .validate(0.1, 0.1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dpo.label_smoothing") && e.contains("robust"),
            "{e}"
        );
        assert!(DpoLossType::Ipo.validate(0.0, 0.0).is_err());
        assert!(DpoLossType::Robust.validate(0.1, 0.5).is_err());
    }
}
