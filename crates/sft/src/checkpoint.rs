//! Checkpoint directories as TRL / the HF Trainer lay them out, written atomically:
//!
//! ```text
//! output_dir/checkpoint-{global_step}/
//!   adapter_model.safetensors, adapter_config.json, …   written by the trainer (lora crate)
//!   trainer_state.json                                    HF keys, log_history
//!   optimizer.safetensors + optimizer.json                AdamW moments + step ([`crate::optim`])
//!   scheduler.json                                        [`SchedulerState`]
//!   rng_state.json                                        [`RngState`]
//!   training_args.json                                    the resolved [`TrainingConfig`]
//! ```
//! A checkpoint is assembled in a hidden staging directory (`.checkpoint-{N}.tmp`) and renamed
//! into place only when complete ([`StagedCheckpoint::commit`]), so an interrupted save never
//! leaves a partial `checkpoint-N`; older checkpoints are rotated away only after that
//! ([`rotate_checkpoints`], keep-last-N like `save_total_limit`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::config::TrainingConfig;
use crate::error::{Result, SftError};
use crate::logging::LogEntry;
use crate::optim::AdamW;
use crate::schedule::SchedulerState;

/// HF's trainer state file.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// Stem of the optimizer state files (`optimizer.safetensors`, `optimizer.json`).
pub const OPTIMIZER_STEM: &str = "optimizer";
/// Scheduler state.
pub const SCHEDULER_FILE: &str = "scheduler.json";
/// Data order / RNG state.
pub const RNG_STATE_FILE: &str = "rng_state.json";
/// The resolved configuration.
pub const TRAINING_ARGS_FILE: &str = "training_args.json";
/// Directory name prefix.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// `output_dir/checkpoint-{step}`.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{CHECKPOINT_PREFIX}{step}"))
}

/// `trainer_state.json` with every key the HF Trainer (transformers 5.24) writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// null (no evaluation).
    pub best_global_step: Option<u64>,
    /// null.
    pub best_metric: Option<f64>,
    /// null.
    pub best_model_checkpoint: Option<String>,
    /// Fractional epoch.
    pub epoch: f64,
    /// HF writes 500 (unused: no evaluation).
    pub eval_steps: u64,
    /// Completed optimizer steps.
    pub global_step: u64,
    /// false.
    pub is_hyper_param_search: bool,
    /// true (one process).
    pub is_local_process_zero: bool,
    /// true.
    pub is_world_process_zero: bool,
    /// Every log entry so far.
    pub log_history: Vec<LogEntry>,
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
    /// `{"TrainerControl": {"args": {...}, "attributes": {}}}`.
    pub stateful_callbacks: serde_json::Value,
    /// HF's FLOP estimate so far ([`crate::flos`]); [`TrainerState::new`] leaves it 0 for the trainer to set.
    pub total_flos: f64,
    /// Rows per micro-batch.
    pub train_batch_size: usize,
    /// null.
    pub trial_name: Option<String>,
    /// null.
    pub trial_params: Option<serde_json::Value>,
}

impl TrainerState {
    /// The state after `global_step` steps; `training_stop` marks the final save.
    pub fn new(
        cfg: &TrainingConfig,
        global_step: u64,
        epoch: f64,
        max_steps: u64,
        num_input_tokens_seen: u64,
        log_history: Vec<LogEntry>,
        training_stop: bool,
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
            log_history,
            logging_steps: cfg.logging_steps,
            max_steps,
            num_input_tokens_seen,
            num_train_epochs: cfg.num_train_epochs,
            save_steps: cfg.save_steps,
            stateful_callbacks: serde_json::json!({
                "TrainerControl": {
                    "args": {
                        "should_epoch_stop": false,
                        "should_evaluate": false,
                        "should_log": false,
                        "should_save": true,
                        "should_training_stop": training_stop
                    },
                    "attributes": {}
                }
            }),
            total_flos: 0.0,
            train_batch_size: cfg.per_device_train_batch_size,
            trial_name: None,
            trial_params: None,
        }
    }

    /// Reads `path` (a `trainer_state.json`).
    pub fn read(path: &Path) -> Result<Self> {
        read_json(path)
    }
}

/// The data-order state: the shuffle is a pure function of (seed, epoch)
/// ([`crate::preprocess::epoch_order`]), so the position is all a resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// Shuffle / dropout seed.
    pub seed: u64,
    /// Whether rows are shuffled.
    pub shuffle: bool,
    /// Completed optimizer steps.
    pub global_step: u64,
    /// Epoch in progress (0-based).
    pub epoch: u64,
    /// Micro-batches of that epoch already consumed.
    pub micro_batches_done: u64,
    /// Any further generator state the trainer keeps (e.g. a dropout RNG), opaque here.
    #[serde(default)]
    pub extra: Option<serde_json::Value>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| SftError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| SftError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })
}

fn remove_dir(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SftError::io(p, e)),
    }
}

/// Removes what a killed run can leave in `output_dir`: checkpoint staging directories
/// (`.checkpoint-N.tmp`) and temporary files of atomic writes (`.tmp-*`). Returns what was removed.
pub fn remove_stale_temporaries(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SftError::io(output_dir, e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SftError::io(output_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let staging = name.starts_with(&format!(".{CHECKPOINT_PREFIX}")) && name.ends_with(".tmp");
        if !(staging || name.starts_with(".tmp-")) {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            remove_dir(&path)?;
        } else {
            std::fs::remove_file(&path).map_err(|e| SftError::io(&path, e))?;
        }
        removed.push(path);
    }
    Ok(removed)
}

/// The resolved config a checkpoint was written with (its `training_args.json`).
pub fn load_training_args(dir: &Path) -> Result<TrainingConfig> {
    let path = dir.join(TRAINING_ARGS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| SftError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| SftError::format(&path, e.to_string()))
}

/// A checkpoint being assembled in `output_dir/.checkpoint-{N}.tmp`. Dropped without
/// [`StagedCheckpoint::commit`], the staging directory is removed and nothing else changes.
pub struct StagedCheckpoint {
    staging: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedCheckpoint {
    /// Creates a fresh staging directory for step `step` (a stale one is removed).
    pub fn begin(output_dir: &Path, step: u64) -> Result<Self> {
        std::fs::create_dir_all(output_dir).map_err(|e| SftError::io(output_dir, e))?;
        let staging = output_dir.join(format!(".{CHECKPOINT_PREFIX}{step}.tmp"));
        remove_dir(&staging)?;
        std::fs::create_dir_all(&staging).map_err(|e| SftError::io(&staging, e))?;
        Ok(Self {
            staging,
            target: checkpoint_dir(output_dir, step),
            committed: false,
        })
    }

    /// The staging directory: write the adapter files here.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Where the checkpoint will live after [`StagedCheckpoint::commit`].
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes `trainer_state.json`.
    pub fn write_trainer_state(&self, state: &TrainerState) -> Result<()> {
        atomic::write_json(&self.staging.join(TRAINER_STATE_FILE), state)
    }

    /// Writes `scheduler.json`.
    pub fn write_scheduler(&self, state: &SchedulerState) -> Result<()> {
        atomic::write_json(&self.staging.join(SCHEDULER_FILE), state)
    }

    /// Writes `rng_state.json`.
    pub fn write_rng(&self, state: &RngState) -> Result<()> {
        atomic::write_json(&self.staging.join(RNG_STATE_FILE), state)
    }

    /// Writes `training_args.json`.
    pub fn write_training_args(&self, cfg: &TrainingConfig) -> Result<()> {
        atomic::write_json(&self.staging.join(TRAINING_ARGS_FILE), cfg)
    }

    /// Writes `optimizer.safetensors` + `optimizer.json`.
    pub fn write_optimizer(&self, opt: &AdamW) -> Result<()> {
        opt.save_state(&self.staging, OPTIMIZER_STEM)
    }

    /// Moves the staging directory to `checkpoint-{N}` (replacing an existing one of the same
    /// step only after the new one is complete) and returns its path.
    pub fn commit(mut self) -> Result<PathBuf> {
        let dir = std::fs::File::open(&self.staging).map_err(|e| SftError::io(&self.staging, e))?;
        dir.sync_all().map_err(|e| SftError::io(&self.staging, e))?;
        if self.target.exists() {
            let old = self.target.with_extension("old");
            remove_dir(&old)?;
            std::fs::rename(&self.target, &old).map_err(|e| SftError::io(&self.target, e))?;
            std::fs::rename(&self.staging, &self.target)
                .map_err(|e| SftError::io(&self.staging, e))?;
            remove_dir(&old)?;
        } else {
            std::fs::rename(&self.staging, &self.target)
                .map_err(|e| SftError::io(&self.staging, e))?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagedCheckpoint {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// Everything of a checkpoint except the adapter files.
pub struct CheckpointContents<'a> {
    /// trainer_state.json.
    pub trainer_state: &'a TrainerState,
    /// scheduler.json.
    pub scheduler: &'a SchedulerState,
    /// rng_state.json.
    pub rng: &'a RngState,
    /// training_args.json.
    pub config: &'a TrainingConfig,
    /// optimizer.safetensors / optimizer.json.
    pub optimizer: &'a AdamW,
}

/// Saves a whole checkpoint for `contents.trainer_state.global_step`: `write_adapter` fills the
/// staging directory with the adapter files, the state files are added, the directory is
/// committed, then checkpoints beyond `save_total_limit` are rotated away. Returns the path.
pub fn save_checkpoint(
    output_dir: &Path,
    contents: &CheckpointContents<'_>,
    write_adapter: impl FnOnce(&Path) -> Result<()>,
    save_total_limit: Option<usize>,
) -> Result<PathBuf> {
    let staged = StagedCheckpoint::begin(output_dir, contents.trainer_state.global_step)?;
    write_adapter(staged.path())?;
    staged.write_trainer_state(contents.trainer_state)?;
    staged.write_scheduler(contents.scheduler)?;
    staged.write_rng(contents.rng)?;
    staged.write_training_args(contents.config)?;
    staged.write_optimizer(contents.optimizer)?;
    let path = staged.commit()?;
    if let Some(keep) = save_total_limit {
        rotate_checkpoints(output_dir, keep)?;
    }
    Ok(path)
}

/// A checkpoint read back for `resume_from_checkpoint` (the optimizer is restored separately
/// with [`load_optimizer`], the adapter by the trainer).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedCheckpoint {
    /// The directory.
    pub dir: PathBuf,
    /// trainer_state.json.
    pub trainer_state: TrainerState,
    /// scheduler.json.
    pub scheduler: SchedulerState,
    /// rng_state.json.
    pub rng: RngState,
}

/// Reads the state files of checkpoint `dir`; a missing file is an error naming it.
pub fn load_checkpoint(dir: &Path) -> Result<LoadedCheckpoint> {
    if !dir.is_dir() {
        return Err(SftError::Checkpoint {
            path: dir.to_path_buf(),
            message: "not a directory".into(),
        });
    }
    let need = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(SftError::Checkpoint {
                path: dir.to_path_buf(),
                message: format!("missing {name}"),
            })
        }
    };
    let trainer_state: TrainerState = read_json(&need(TRAINER_STATE_FILE)?)?;
    let scheduler: SchedulerState = read_json(&need(SCHEDULER_FILE)?)?;
    let rng: RngState = read_json(&need(RNG_STATE_FILE)?)?;
    need(&format!("{OPTIMIZER_STEM}.safetensors"))?;
    need(&format!("{OPTIMIZER_STEM}.json"))?;
    if scheduler.last_epoch != trainer_state.global_step
        || rng.global_step != trainer_state.global_step
    {
        return Err(SftError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "inconsistent steps: trainer_state {}, scheduler {}, rng_state {}",
                trainer_state.global_step, scheduler.last_epoch, rng.global_step
            ),
        });
    }
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        trainer_state,
        scheduler,
        rng,
    })
}

/// Restores `opt` from checkpoint `dir` (moments and step count).
pub fn load_optimizer(dir: &Path, opt: &mut AdamW) -> Result<()> {
    opt.load_state(dir, OPTIMIZER_STEM)
}

/// `output_dir/checkpoint-{N}` directories, sorted by N (staging dirs ignored).
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
        if let Some(n) = name
            .strip_prefix(CHECKPOINT_PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            if entry.path().is_dir() {
                out.push((n, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint of `output_dir`, if any.
pub fn last_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(output_dir)?.pop().map(|(_, p)| p))
}

/// Deletes the oldest checkpoints so that at most `keep` (≥ 1) remain; returns the removed dirs.
pub fn rotate_checkpoints(output_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = list_checkpoints(output_dir)?;
    let excess = all.len().saturating_sub(keep.max(1));
    let mut removed = Vec::new();
    for (_, dir) in all.into_iter().take(excess) {
        remove_dir(&dir)?;
        removed.push(dir);
    }
    Ok(removed)
}

/// `resume_from_checkpoint` as given: `latest` (or `last`) → the newest checkpoint of
/// `output_dir`; anything else is a checkpoint directory.
pub fn resolve_resume(output_dir: &Path, spec: &Path) -> Result<PathBuf> {
    if spec == Path::new("latest") || spec == Path::new("last") {
        return last_checkpoint(output_dir)?.ok_or_else(|| SftError::Checkpoint {
            path: output_dir.to_path_buf(),
            message: "no checkpoint-* directory to resume from".into(),
        });
    }
    if spec.is_dir() {
        Ok(spec.to_path_buf())
    } else {
        Err(SftError::Checkpoint {
            path: spec.to_path_buf(),
            message: "resume_from_checkpoint is not a directory".into(),
        })
    }
}
