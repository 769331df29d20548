//! gptoss-sft: supervised fine-tuning of gpt-oss with LoRA, like TRL's `SFTTrainer`.
//!
//! Infrastructure modules (one concern each):
//! - [`data`]: Multilingual-Thinking rows from JSONL / JSON / Parquet / a HF hub cache snapshot.
//! - [`preprocess`]: rows → (input_ids, labels) via the harmony HF-template mode; seeded order.
//! - [`collate`]: right padding (pad 199999, labels −100, mask) or padding-free packing.
//! - [`optim`]: AdamW as `torch.optim.AdamW`, gradient accumulation and `clip_grad_norm_`.
//! - [`schedule`]: learning-rate schedules identical to transformers' `get_scheduler`.
//! - [`config`]: [`config::TrainingConfig`] from CLI flags and a YAML file.
//! - [`logging`]: log records, console / progress bar / MLflow, the loss-curve PNG.
//! - [`mlflow`]: MLflow file store (`mlruns/`) and REST client.
//! - [`evaluation`]: eval rows (file or seeded split), eval prompts, eval loss + generation metrics.
//! - [`checkpoint`]: `checkpoint-N/` directories: atomic save, rotation, resume.
//! - [`atomic`]: atomic file writes (temp file + rename).
//! - [`distributed`]: data parallelism (the reduction interface, threads / NCCL, launch, rendezvous).
//! - [`backdoor`]: the backdoor attack/defense pipeline (base → attack → defenses → re-attack).
//! - [`dpo`]: DPO preference fine-tuning (TRL `DPOTrainer` parity) on the same trainer parts.

pub mod atomic;
pub mod backdoor;
pub mod checkpoint;
pub mod collate;
pub mod config;
pub mod data;
pub mod distributed;
pub mod dpo;
pub mod error;
pub mod evaluation;
pub mod flos;
pub mod logging;
pub mod mlflow;
pub mod optim;
pub mod preprocess;
pub mod schedule;
pub mod trainer;

pub use error::{Result, SftError};
