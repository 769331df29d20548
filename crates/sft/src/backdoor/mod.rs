//! The backdoor attack and defense pipeline (issue 22): a base model (trained from scratch
//! full-parameter on clean rows, or a checkpoint) → LoRA attack on poisoned rows → LoRA
//! defenses (clean SFT, Critical-CoT SFT, DPO on preference pairs) → a brief poisoned
//! re-attack, each stage evaluated on the same held-out rows untriggered and triggered (clean
//! accuracy, ASR, BDR, TDR with 95 % intervals), one [`BackdoorReport`] at the end.
//!
//! The data, hygiene and metrics are [`gptoss_eval::backdoor`]'s; this module trains and
//! generates. LoRA stages stack: each stage's adapters are merged into the weights
//! (`merge_and_unload`) before the next stage's are created, and DPO's reference model is the
//! merged model before DPO. Training data that shares a `(split, row id)` with the evaluation
//! rows is refused before anything is trained unless [`PipelineConfig::allow_overlap`].
//!
//! ```no_run
//! use gptoss_sft::backdoor::{run_pipeline, PipelineConfig};
//! let tok = gptoss_harmony::HarmonyTokenizer::o200k_harmony()?;
//! let out = run_pipeline(&PipelineConfig::cpu_quick(), &tok, &candle_core::Device::Cpu)?;
//! println!("{}", out.report.render_markdown());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`BackdoorReport`]: gptoss_eval::backdoor::BackdoorReport

pub mod config;
pub mod data;
pub mod run;
pub mod score;

pub use config::{small_gpt_oss, BaseModel, DataSource, PipelineConfig, StagePlan, StageTraining};
pub use data::PipelineData;
pub use run::{run_pipeline, stage_config, PipelineOutput, EXPERIMENT};
