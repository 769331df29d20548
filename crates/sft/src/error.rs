//! The crate's single error type.

use std::path::PathBuf;

/// Every error the SFT crate returns. Variants name the file, row, key or step at fault.
#[derive(Debug, thiserror::Error)]
pub enum SftError {
    /// An I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A dataset row that does not match the Multilingual-Thinking schema.
    #[error("{file}: row {row}: {message}")]
    Row {
        /// The dataset file.
        file: PathBuf,
        /// 1-based row number (for JSONL: the line number).
        row: usize,
        /// What was wrong and what was expected.
        message: String,
    },
    /// A file that cannot be read as the format it claims to be (JSON, Parquet, YAML, safetensors).
    #[error("{file}: {message}")]
    Format {
        /// The file.
        file: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// An invalid configuration value; `key` is the dotted YAML key or the CLI flag.
    #[error("config key `{key}`: {message}")]
    Config {
        /// The offending key, e.g. `training.learning_rate`.
        key: String,
        /// What was expected.
        message: String,
    },
    /// A dataset that could not be located or is empty.
    #[error("dataset: {0}")]
    Dataset(String),
    /// An optimizer misuse (state mismatch, unknown parameter, bad hyper-parameter).
    #[error("optimizer: {0}")]
    Optimizer(String),
    /// A learning-rate schedule misconfiguration.
    #[error("scheduler: {0}")]
    Schedule(String),
    /// A failed MLflow call (file store or REST).
    #[error("mlflow: {0}")]
    Mlflow(String),
    /// A checkpoint directory that is missing files or inconsistent.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is missing or wrong.
        message: String,
    },
    /// A non-finite loss; training stops and the last good checkpoint is kept.
    #[error("non-finite loss {loss} at global step {step}")]
    NonFiniteLoss {
        /// The global step (1-based) whose loss was NaN or infinite.
        step: u64,
        /// The offending value.
        loss: f64,
    },
    /// Training-loop level failures (model / LoRA / harmony errors reported as text).
    #[error("trainer: {0}")]
    Trainer(String),
    /// A data-parallel failure seen by rank `rank` of `world_size`: a peer that did not arrive
    /// in time, died, or a rendezvous / reduction error; `message` names the peer at fault.
    #[error("distributed rank {rank} of {world_size}: {message}")]
    Distributed {
        /// The rank reporting the failure.
        rank: usize,
        /// Ranks of the job.
        world_size: usize,
        /// What failed and which rank is at fault.
        message: String,
    },
    /// Rendering or tokenizing a conversation failed.
    #[error(transparent)]
    Harmony(#[from] gptoss_harmony::HarmonyError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Scoring generations or writing an eval report failed.
    #[error(transparent)]
    Eval(#[from] gptoss_eval::EvalError),
}

/// Crate result alias.
pub type Result<T> = std::result::Result<T, SftError>;

impl SftError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SftError::Io {
            path: path.into(),
            source,
        }
    }

    /// A [`SftError::Format`] for `file`.
    pub fn format(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        SftError::Format {
            file: file.into(),
            message: message.into(),
        }
    }

    /// A [`SftError::Config`] for `key`.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        SftError::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}
