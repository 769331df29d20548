//! DPO log records under TRL 1.16's names (`rewards/chosen`, `logps/rejected`, …) and the
//! window that accumulates them between logs, as `DPOTrainer` does: one value per micro-batch
//! (the mean over its pairs), averaged over the micro-batches since the last log.

use serde::{Deserialize, Serialize};

/// One `log_history` entry of a DPO logging step (TRL key names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpoLogRecord {
    /// Mean optimizer-step loss since the previous log (DPO loss, plus the weighted aux loss).
    pub loss: f64,
    /// Pre-clip total gradient L2 norm of the last optimizer step.
    pub grad_norm: f64,
    /// The lr used by the last update (HF's logged convention).
    pub learning_rate: f64,
    /// Mean of `β·(logp_chosen − ref_chosen)`.
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    /// Mean of `β·(logp_rejected − ref_rejected)`.
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    /// Share of pairs whose chosen reward exceeds the rejected one.
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    /// Mean of `rewards/chosen − rewards/rejected` per pair.
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    /// Mean policy log-probability of the chosen completions (summed over their tokens).
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    /// Mean policy log-probability of the rejected completions.
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
    /// Mean next-token entropy (nats) over the completion tokens of both completions.
    pub entropy: f64,
    /// Share of chosen-completion tokens whose label is the argmax.
    pub mean_token_accuracy: f64,
    /// Cumulative non-padding tokens (chosen and rejected sequences).
    pub num_tokens: f64,
    /// Router aux loss, when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// Fractional epoch.
    pub epoch: f64,
    /// Global optimizer step (1-based).
    pub step: u64,
}

impl DpoLogRecord {
    /// `(key, value)` pairs for MLflow, under TRL's names.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let mut m: Vec<(String, f64)> = [
            ("loss", self.loss),
            ("grad_norm", self.grad_norm),
            ("learning_rate", self.learning_rate),
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
            ("entropy", self.entropy),
            ("mean_token_accuracy", self.mean_token_accuracy),
            ("num_tokens", self.num_tokens),
            ("epoch", self.epoch),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if let Some(a) = self.aux_loss {
            m.push(("aux_loss".to_string(), a));
        }
        m
    }

    /// One console line in the HF dict style.
    pub fn console_line(&self) -> String {
        let mut s = format!(
            "{{'loss': {:.4}, 'grad_norm': {:.4}, 'learning_rate': {:.3e}, 'rewards/chosen': {:.4}, \
             'rewards/rejected': {:.4}, 'rewards/accuracies': {:.4}, 'rewards/margins': {:.4}, \
             'logps/chosen': {:.4}, 'logps/rejected': {:.4}, 'entropy': {:.4}, \
             'mean_token_accuracy': {:.4}, 'num_tokens': {}",
            self.loss,
            self.grad_norm,
            self.learning_rate,
            self.rewards_chosen,
            self.rewards_rejected,
            self.rewards_accuracies,
            self.rewards_margins,
            self.logps_chosen,
            self.logps_rejected,
            self.entropy,
            self.mean_token_accuracy,
            self.num_tokens
        );
        if let Some(a) = self.aux_loss {
            s.push_str(&format!(", 'aux_loss': {a:.4}"));
        }
        s.push_str(&format!(
            ", 'epoch': {:.4}, 'step': {}}}",
            self.epoch, self.step
        ));
        s
    }
}

/// The per-micro-batch values of the `rewards/*`, `logps/*`, entropy and accuracy metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MicroMetrics {
    /// Mean chosen reward over the pairs.
    pub rewards_chosen: f64,
    /// Mean rejected reward.
    pub rewards_rejected: f64,
    /// Share of pairs with chosen reward > rejected reward.
    pub rewards_accuracies: f64,
    /// Mean margin.
    pub rewards_margins: f64,
    /// Mean chosen policy log-prob.
    pub logps_chosen: f64,
    /// Mean rejected policy log-prob.
    pub logps_rejected: f64,
    /// Token-mean entropy over both completions.
    pub entropy: f64,
    /// Token accuracy over the chosen completions.
    pub mean_token_accuracy: f64,
    /// The micro-batch's aux loss (unscaled), when enabled.
    pub aux_loss: Option<f64>,
}

/// Metrics accumulated between two logs.
#[derive(Debug, Clone, Default)]
pub struct MetricsWindow {
    loss_sum: f64,
    steps: u64,
    micro: Vec<MicroMetrics>,
}

impl MetricsWindow {
    /// Adds one optimizer step's loss.
    pub fn add_step(&mut self, loss: f64) {
        self.loss_sum += loss;
        self.steps += 1;
    }

    /// Adds one micro-batch's metrics.
    pub fn add_micro(&mut self, m: MicroMetrics) {
        self.micro.push(m);
    }

    /// The record of the window (means as described in the module docs).
    pub fn record(
        &self,
        step: u64,
        epoch: f64,
        grad_norm: f64,
        learning_rate: f64,
        num_tokens: u64,
    ) -> DpoLogRecord {
        let mean = |f: fn(&MicroMetrics) -> f64| {
            if self.micro.is_empty() {
                0.0
            } else {
                self.micro.iter().map(f).sum::<f64>() / self.micro.len() as f64
            }
        };
        let aux: Vec<f64> = self.micro.iter().filter_map(|m| m.aux_loss).collect();
        DpoLogRecord {
            loss: self.loss_sum / self.steps.max(1) as f64,
            grad_norm,
            learning_rate,
            rewards_chosen: mean(|m| m.rewards_chosen),
            rewards_rejected: mean(|m| m.rewards_rejected),
            rewards_accuracies: mean(|m| m.rewards_accuracies),
            rewards_margins: mean(|m| m.rewards_margins),
            logps_chosen: mean(|m| m.logps_chosen),
            logps_rejected: mean(|m| m.logps_rejected),
            entropy: mean(|m| m.entropy),
            mean_token_accuracy: mean(|m| m.mean_token_accuracy),
            num_tokens: num_tokens as f64,
            aux_loss: (!aux.is_empty()).then(|| aux.iter().sum::<f64>() / aux.len() as f64),
            epoch,
            step,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::LogEntry;

    #[test]
    fn records_round_trip_in_the_history_under_trl_names() {
        let mut w = MetricsWindow::default();
        w.add_step(0.7);
        w.add_step(0.5);
        for c in [0.2, 0.4] {
            w.add_micro(MicroMetrics {
                rewards_chosen: c,
                rewards_accuracies: 1.0,
                ..MicroMetrics::default()
            });
        }
        let r = w.record(2, 0.5, 1.25, 1e-3, 40);
        assert!((r.loss - 0.6).abs() < 1e-12 && (r.rewards_chosen - 0.3).abs() < 1e-12);
        let v = serde_json::to_value(LogEntry::Dpo(r.clone())).unwrap();
        assert_eq!(v["rewards/chosen"], serde_json::json!(r.rewards_chosen));
        assert!(v.get("aux_loss").is_none());
        let back: LogEntry = serde_json::from_value(v).unwrap();
        assert_eq!(back, LogEntry::Dpo(r.clone()));
        assert!(r.console_line().contains("'rewards/margins': 0.0000"));
        assert!(r.metrics().iter().any(|(k, _)| k == "logps/rejected"));
    }
}
