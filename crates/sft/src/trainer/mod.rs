//! The SFT training loop (TRL `SFTTrainer` semantics) and its numeric building blocks.
//!
//! - [`driver`]: the loop SFT and DPO share ([`driver::TrainLoop`] over an [`driver::Objective`]).
//! - [`run`]: [`Trainer`] — epochs, gradient accumulation, AdamW + clipping + schedule, logging,
//!   checkpoints, resume, Ctrl-C, non-finite loss detection, `save_model`.
//! - [`backward`]: one micro-batch forward + backward, with optional per-layer gradient checkpointing.
//! - [`evaluate`]: the teacher-forced eval loss of held-out rows (HF's eval loop).
//! - [`lm_loss`]: the fused LM-head cross-entropy at labelled positions, with its gradient.
//! - [`aux_loss`]: the MoE router load-balancing loss, split per layer.
//! - [`batch`]: collated batches → device micro-batches with the labelled positions.
//! - [`adapters`]: what the loop needs from the LoRA adapters; restoring them on resume.
//! - [`full`]: full-parameter training (`peft: none`): the model's own parameters as the trainable set.
//! - [`interrupt`]: the Ctrl-C flag.
//! - [`report`]: console lines, progress bar and MLflow run ([`report::StandardObserver`]).
//! - [`timing`]: what benchmarks time: the trainer's own steps on synthetic rows.
//!
//! Checkpoint files come from [`crate::checkpoint`], log records from [`crate::logging`].
//! - [`chat`]: prompting and streaming generation split by harmony channel.
//! - [`pipeline`]: the whole recipe in one call ([`pipeline::finetune`]).

pub mod adapters;
pub mod aux_loss;
pub mod backward;
pub mod batch;
pub mod chat;
pub mod driver;
pub mod evaluate;
pub mod full;
pub mod interrupt;
pub mod lm_loss;
pub mod model_adapter;
pub mod pipeline;
pub mod report;
pub mod run;
pub mod timing;

pub use adapters::{load_adapter_weights, TrainableAdapters};
pub use backward::{
    forward_backward, forward_backward_rows, forward_backward_with, forward_loss,
    forward_row_stats, BackwardOptions, LayerDone, LayeredCausalLm, LossStats, MicroBatch,
    MicroStepOutput, RowGradScale,
};
pub use batch::micro_batch;
pub use chat::{
    chat_generate, chat_generate_batch, chat_prompt, cookbook_generation_config,
    print_channel_deltas, ChatReply,
};
pub use driver::{accumulate, LogPoint, Objective, RunState, StepLoss, StepOutput, TrainLoop};
pub use evaluate::{eval_loss, EvalLoss};
pub use full::FullParameters;
pub use pipeline::{finetune, lora_config, FinetuneOutput, Trained, BUNDLED_DATASET};
pub use report::StandardObserver;
pub use run::{EvalHook, NoObserver, TrainObserver, TrainOutcome, Trainer, TrainerOptions};
pub use timing::{synthetic_rows, StepTimer, TimedStep};
