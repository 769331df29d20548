//! DPO (direct preference optimisation) with TRL 1.16 `DPOTrainer` parity, on the SFT trainer's
//! optimizer, schedules, checkpoints, logging and gradient-checkpointed backward. With LoRA the
//! reference model is the same network with the adapters disabled: no second copy of the model.
//!
//! - [`dataset`]: TRL's preference schema (`prompt`/`chosen`/`rejected`, text or messages), bad rows.
//! - [`tokenize`]: rows → prompt / chosen / rejected ids (chat template or plain text + EOS).
//! - [`batch`]: pairs → one `[2B, T]` micro-batch (chosen rows, then rejected rows).
//! - [`loss`]: `sigmoid`, `ipo`, `robust` (`label_smoothing`) per pair, with derivatives.
//! - [`reference`]: the adapters switched off for the reference forward.
//! - [`metrics`]: `rewards/*`, `logps/*` … records under TRL's names.
//! - [`trainer`]: [`DpoTrainer`] — steps, logging, checkpoints, resume.
//! - [`report`]: console / progress bar / MLflow observer.
//! - [`config`]: [`DpoConfig`], the `dpo:` YAML section and CLI flags.
//! - [`pipeline`]: the whole run in one call ([`pipeline::run_dpo`]).

pub mod batch;
pub mod config;
pub mod dataset;
pub mod loss;
pub mod metrics;
pub mod pipeline;
pub mod reference;
pub mod report;
pub mod tokenize;
pub mod trainer;

pub use config::{DpoArgs, DpoConfig};
pub use dataset::{load_preferences, PreferenceDataset, PreferenceRow, Turns};
pub use loss::{pair_loss, DpoLossType, PairLogps, PairLoss};
pub use metrics::DpoLogRecord;
pub use pipeline::{run_dpo, DpoOutput};
pub use reference::with_adapters_disabled;
pub use report::DpoReport;
pub use tokenize::{tokenize_rows, PreferenceExample, TokenizedPreferences};
pub use trainer::{DpoObjective, DpoObserver, DpoTrainer, NoDpoObserver, RefLogps};
