//! [`DpoConfig`]: the DPO options of TRL's `DPOConfig` on top of the shared
//! [`TrainingConfig`] (optimizer, schedule, batch sizes, logging, checkpoints), from a YAML file
//! (the SFT sections plus a `dpo:` section) and CLI flags ([`DpoArgs`]).
//!
//! ```yaml
//! model:    { name_or_path: /models/gpt-oss-20b, max_length: 1024 }
//! data:     { dataset: prefs.jsonl }
//! training: { learning_rate: 5.0e-6, per_device_train_batch_size: 1, gradient_accumulation_steps: 8 }
//! dpo:      { loss_type: sigmoid, beta: 0.1, precompute_ref_log_probs: false, strict: false }
//! ```
//! Precedence: defaults < YAML < flags, as for SFT.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::loss::DpoLossType;
use crate::config::{TrainingArgs, TrainingConfig};
use crate::error::{Result, SftError};

/// The DPO-specific options (TRL `DPOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// The objective (default `sigmoid`).
    pub loss_type: DpoLossType,
    /// β, the deviation from the reference (default 0.1; for `ipo` the regulariser τ).
    pub beta: f64,
    /// Label-flip rate of `robust` (default 0).
    pub label_smoothing: f64,
    /// Compute the reference log-probs once before training instead of in every step.
    pub precompute_ref_log_probs: bool,
    /// Pairs per batch of that precomputation (default: `per_device_train_batch_size`).
    pub precompute_ref_batch_size: Option<usize>,
    /// A bad dataset row is an error instead of being skipped and listed (default false).
    pub strict: bool,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            loss_type: DpoLossType::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
            precompute_ref_batch_size: None,
            strict: false,
        }
    }
}

impl DpoConfig {
    /// Checks the values; errors name the `dpo.` key.
    pub fn validate(&self) -> Result<()> {
        self.loss_type.validate(self.beta, self.label_smoothing)?;
        if self.precompute_ref_batch_size == Some(0) {
            return Err(SftError::config(
                "dpo.precompute_ref_batch_size",
                "must be >= 1",
            ));
        }
        Ok(())
    }
}

/// The defaults of a DPO run that differ from SFT's (TRL `DPOConfig`): `max_length` 1024,
/// learning rate 1e-6, linear schedule without warmup, output `gpt-oss-dpo`.
pub fn dpo_training_defaults() -> TrainingConfig {
    TrainingConfig {
        max_length: 1024,
        learning_rate: 1e-6,
        lr_scheduler_type: crate::schedule::SchedulerType::Linear,
        min_lr: None,
        warmup: crate::schedule::Warmup::Steps(0),
        output_dir: "gpt-oss-dpo".into(),
        ..TrainingConfig::default()
    }
}

/// Applies YAML `text` (SFT sections plus `dpo:`) onto `cfg` and `dpo`.
pub fn apply_yaml_str(text: &str, cfg: &mut TrainingConfig, dpo: &mut DpoConfig) -> Result<()> {
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| SftError::config("<root>", e.to_string()))?;
    if let Some(map) = doc.as_mapping_mut() {
        if let Some(section) = map.remove("dpo") {
            let mut merged = serde_yaml_ng::to_value(&*dpo)
                .map_err(|e| SftError::config("dpo", e.to_string()))?;
            if let (Some(base), Some(over)) = (merged.as_mapping_mut(), section.as_mapping()) {
                for (k, v) in over {
                    base.insert(k.clone(), v.clone());
                }
            } else if !section.is_null() {
                return Err(SftError::config("dpo", "must be a mapping"));
            }
            *dpo = serde_yaml_ng::from_value(merged).map_err(|e| {
                let m = e.to_string();
                let key = m
                    .strip_prefix("unknown field `")
                    .and_then(|r| r.split_once('`'))
                    .map(|(f, _)| format!("dpo.{f}"))
                    .unwrap_or_else(|| "dpo".into());
                SftError::config(key, m)
            })?;
        }
    }
    let rest =
        serde_yaml_ng::to_string(&doc).map_err(|e| SftError::config("<root>", e.to_string()))?;
    if doc.as_mapping().is_some_and(|m| !m.is_empty()) {
        cfg.apply_yaml_str(&rest)?;
    }
    Ok(())
}

/// [`apply_yaml_str`] on a file; errors name the file.
pub fn apply_yaml_file(path: &Path, cfg: &mut TrainingConfig, dpo: &mut DpoConfig) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| SftError::io(path, e))?;
    apply_yaml_str(&text, cfg, dpo).map_err(|e| match e {
        SftError::Config { key, message } => SftError::Config {
            key,
            message: format!("{message} (in {})", path.display()),
        },
        other => other,
    })
}

/// CLI flags of a DPO run: every SFT trainer flag plus the DPO ones (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DpoArgs {
    /// The shared trainer flags (`--config` takes a YAML with a `dpo:` section too).
    #[command(flatten)]
    pub train: TrainingArgs,
    /// DPO objective: sigmoid, ipo or robust. [default: sigmoid]
    #[arg(long, value_enum)]
    pub loss_type: Option<DpoLossType>,
    /// β. [default: 0.1]
    #[arg(long)]
    pub beta: Option<f64>,
    /// Label-flip rate of the robust loss. [default: 0]
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Compute the reference log-probs once before training. [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub precompute_ref_log_probs: Option<bool>,
    /// Pairs per batch of the precomputation. [default: per-device train batch size]
    #[arg(long)]
    pub precompute_ref_batch_size: Option<usize>,
    /// Fail on the first bad dataset row instead of skipping it. [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub strict: Option<bool>,
}

impl DpoArgs {
    /// DPO defaults ([`dpo_training_defaults`]), then `--config`, then the flags; validated.
    pub fn resolve(&self) -> Result<(TrainingConfig, DpoConfig)> {
        let mut cfg = dpo_training_defaults();
        let mut dpo = DpoConfig::default();
        if let Some(p) = &self.train.config {
            apply_yaml_file(p, &mut cfg, &mut dpo)?;
        }
        self.train.apply(&mut cfg)?;
        let a = self.clone();
        if let Some(v) = a.loss_type {
            dpo.loss_type = v;
        }
        if let Some(v) = a.beta {
            dpo.beta = v;
        }
        if let Some(v) = a.label_smoothing {
            dpo.label_smoothing = v;
        }
        if let Some(v) = a.precompute_ref_log_probs {
            dpo.precompute_ref_log_probs = v;
        }
        if a.precompute_ref_batch_size.is_some() {
            dpo.precompute_ref_batch_size = a.precompute_ref_batch_size;
        }
        if let Some(v) = a.strict {
            dpo.strict = v;
        }
        cfg.validate()?;
        dpo.validate()?;
        Ok((cfg, dpo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_a_dpo_section() -> Result<()> {
        let mut cfg = dpo_training_defaults();
        let mut dpo = DpoConfig::default();
        apply_yaml_str(
            "training: { learning_rate: 5.0e-6 }\ndpo: { loss_type: ipo, beta: 0.5, strict: true }\n",
            &mut cfg,
            &mut dpo,
        )?;
        assert_eq!(cfg.learning_rate, 5e-6);
        assert_eq!(
            (dpo.loss_type, dpo.beta, dpo.strict),
            (DpoLossType::Ipo, 0.5, true)
        );
        assert!(!dpo.precompute_ref_log_probs);
        let e = apply_yaml_str("dpo: { betta: 1 }", &mut cfg, &mut dpo).unwrap_err();
        assert!(e.to_string().contains("dpo.betta"), "{e}");
        let e = apply_yaml_str("trainin: {}", &mut cfg, &mut dpo).unwrap_err();
        assert!(e.to_string().contains("trainin"), "{e}");
        let bad = DpoConfig {
            label_smoothing: 0.1,
            ..DpoConfig::default()
        };
        assert!(bad.validate().is_err());
        Ok(())
    }
}
