//! gptoss-sft: supervised fine-tuning of gpt-oss with LoRA, like TRL's `SFTTrainer`.
//!
//! Infrastructure modules (one concern each):
//! - [`data`]: Multilingual-Thinking rows from JSONL / JSON / Parquet / a HF hub cache snapshot.
//! - [`schedule`]: learning-rate schedules identical to transformers' `get_scheduler`.
//! - [`optim`]: AdamW as `torch.optim.AdamW`, gradient accumulation and `clip_grad_norm_`.
//! - [`atomic`]: atomic file writes (temp file + rename).
//! - [`config`]: [`config::TrainingConfig`] from CLI flags and a YAML file.

pub mod atomic;
pub mod collate;
pub mod config;
pub mod data;
pub mod error;
pub mod mlflow;
pub mod optim;
pub mod preprocess;
pub mod schedule;
pub mod trainer;

pub use error::{Result, SftError};
