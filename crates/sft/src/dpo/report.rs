//! The standard observer of DPO runs: the SFT one, which logs DPO records under TRL's names.

/// The observer `run_dpo` reports through: [`crate::trainer::StandardObserver`] (console lines,
/// progress bar, MLflow run).
pub type DpoReport = crate::trainer::StandardObserver;
