//! The training loop's persistent state: log records, `trainer_state.json` (HF keys), the other
//! checkpoint files, reading them back for `resume_from_checkpoint`, and pruning old checkpoints.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::config::TrainingConfig;
use crate::error::{Result, SftError};
use crate::schedule::LrSchedule;

/// File stem of the optimizer state (`optimizer.safetensors` + `optimizer.json`).
pub const OPTIMIZER_STEM: &str = "optimizer";
/// HF's trainer state file.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// Scheduler state (torch `LambdaLR.state_dict()` equivalent).
pub const SCHEDULER_FILE: &str = "scheduler.json";
/// Data-order state (the shuffle is a pure function of seed and epoch).
pub const RNG_STATE_FILE: &str = "rng_state.json";
/// The resolved configuration.
pub const TRAINING_ARGS_FILE: &str = "training_args.json";

/// One `log_history` entry (HF/TRL names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Global optimizer step (1-based).
    pub step: u64,
    /// Fractional epoch (micro-batches consumed / micro-batches per epoch).
    pub epoch: f64,
    /// Mean per-step loss since the previous log.
    pub loss: f64,
    /// Pre-clip total gradient L2 norm of the last step.
    pub grad_norm: f64,
    /// Learning rate used by the last update (HF's logged convention).
    pub learning_rate: f64,
    /// Mean over micro-batches of the fraction of trained tokens predicted by argmax.
    pub mean_token_accuracy: f64,
    /// Mean over micro-batches of the mean next-token entropy (nats) at trained positions.
    pub entropy: f64,
    /// Cumulative non-padding tokens seen.
    pub num_tokens: u64,
    /// Mean router aux loss (per step, already divided by GA) when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// Non-padding tokens per second over the logging window.
    pub tokens_per_second: f64,
}

/// `trainer_state.json` with the HF Trainer's keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Always null (no evaluation).
    pub best_global_step: Option<u64>,
    /// Always null.
    pub best_metric: Option<f64>,
    /// Always null.
    pub best_model_checkpoint: Option<String>,
    /// Fractional epoch.
    pub epoch: f64,
    /// Evaluation interval (unused; HF writes 500).
    pub eval_steps: u64,
    /// Completed optimizer steps.
    pub global_step: u64,
    /// Always false.
    pub is_hyper_param_search: bool,
    /// Always true (one process).
    pub is_local_process_zero: bool,
    /// Always true.
    pub is_world_process_zero: bool,
    /// Every logged record.
    pub log_history: Vec<LogRecord>,
    /// Logging interval.
    pub logging_steps: u64,
    /// Total optimizer steps of the run.
    pub max_steps: u64,
    /// Cumulative non-padding tokens.
    pub num_input_tokens_seen: u64,
    /// Configured epochs.
    pub num_train_epochs: f64,
    /// Save interval.
    pub save_steps: u64,
    /// FLOPs are not counted (0).
    pub total_flos: u64,
    /// Rows per micro-batch.
    pub train_batch_size: usize,
    /// Always null.
    pub trial_name: Option<String>,
    /// Always null.
    pub trial_params: Option<serde_json::Value>,
}

impl TrainerState {
    /// The state after `global_step` steps.
    pub fn new(
        cfg: &TrainingConfig,
        global_step: u64,
        epoch: f64,
        max_steps: u64,
        num_tokens: u64,
        history: &[LogRecord],
    ) -> Self {
        Self {
            best_global_step: None,
            best_metric: None,
            best_model_checkpoint: None,
            epoch,
            eval_steps: 500,
            global_step,
            is_hyper_param_search: false,
            is_local_process_zero: true,
            is_world_process_zero: true,
            log_history: history.to_vec(),
            logging_steps: cfg.logging_steps,
            max_steps,
            num_input_tokens_seen: num_tokens,
            num_train_epochs: cfg.num_train_epochs,
            save_steps: cfg.save_steps,
            total_flos: 0,
            train_batch_size: cfg.per_device_train_batch_size,
            trial_name: None,
            trial_params: None,
        }
    }
}

/// Data-order state of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The shuffle seed (see [`crate::preprocess::epoch_order`]).
    pub seed: u64,
    /// Whether rows are shuffled.
    pub shuffle: bool,
    /// Completed optimizer steps (the data position follows from it).
    pub global_step: u64,
}

/// What `resume_from_checkpoint` reads besides the adapter and optimizer files.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    /// The checkpoint's trainer state.
    pub trainer_state: TrainerState,
}

/// Writes trainer_state.json, scheduler.json, rng_state.json and training_args.json into `dir`.
pub fn write_checkpoint_state(
    dir: &Path,
    cfg: &TrainingConfig,
    schedule: &LrSchedule,
    ts: &TrainerState,
) -> Result<()> {
    atomic::write_json(&dir.join(TRAINER_STATE_FILE), ts)?;
    atomic::write_json(&dir.join(SCHEDULER_FILE), &schedule.state(ts.global_step))?;
    let rng = RngState {
        seed: cfg.seed,
        shuffle: cfg.shuffle,
        global_step: ts.global_step,
    };
    atomic::write_json(&dir.join(RNG_STATE_FILE), &rng)?;
    atomic::write_json(&dir.join(TRAINING_ARGS_FILE), cfg)?;
    Ok(())
}

/// Reads a checkpoint's trainer state and checks that its data order matches `cfg`'s.
pub fn read_resume_point(dir: &Path) -> Result<ResumePoint> {
    let path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| SftError::io(&path, e))?;
    let trainer_state: TrainerState =
        serde_json::from_str(&text).map_err(|e| SftError::format(&path, e.to_string()))?;
    Ok(ResumePoint { trainer_state })
}

/// `output_dir/checkpoint-{N}` directories sorted by N.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(SftError::io(output_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| SftError::io(output_dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("checkpoint-").and_then(|s| s.parse().ok()) {
            if entry.path().is_dir() {
                out.push((n, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes the oldest checkpoints so that at most `keep` remain.
pub fn prune_checkpoints(output_dir: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(output_dir)?;
    let excess = all.len().saturating_sub(keep.max(1));
    for (_, dir) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&dir).map_err(|e| SftError::io(&dir, e))?;
    }
    Ok(())
}

/// The newest checkpoint in `output_dir`, if any.
pub fn last_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(output_dir)?.pop().map(|(_, p)| p))
}
