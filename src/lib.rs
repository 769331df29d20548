//! `gptoss`: fine-tune OpenAI's gpt-oss mixture-of-experts models with LoRA, in Rust on candle.
//!
//! This facade re-exports the workspace crates:
//! - [`harmony`]: the Harmony chat format, the o200k_harmony tokenizer, loss masks.
//! - [`mxfp4`]: MXFP4 dequantization/quantization kernels.
//! - [`kernels`]: every custom op (attention with sinks, grouped expert GEMMs, routing, fused norms,
//!   LoRA, AdamW, LM-head loss): CPU reference and CUDA side by side.
//! - [`model`]: the gpt-oss MoE transformer (config, checkpoint loading, forward, generation).
//! - [`lora`]: PEFT-compatible LoRA adapters.
//! - [`sft`]: the supervised fine-tuning trainer.
//! - [`eval`]: evaluation (reasoning language, answer accuracy, format validity, reports).
//! - [`cli`]: what the examples share: errors as sentences, exit status 130 after Ctrl-C.

pub use gptoss_eval as eval;
pub use gptoss_harmony as harmony;
pub use gptoss_kernels as kernels;
pub use gptoss_lora as lora;
pub use gptoss_model as model;
pub use gptoss_mxfp4 as mxfp4;
pub use gptoss_sft as sft;

pub mod cli;
