//! # gptoss-model
//!
//! The gpt-oss mixture-of-experts transformer on candle, numerically equal to transformers 5.24
//! `GptOssForCausalLM` (eager attention): config (`config.json`), checkpoint loading/saving in the Hugging Face
//! layout (MXFP4 experts dequantized through `gptoss-mxfp4`), forward with per-layer pieces for gradient
//! checkpointing, causal-LM and router aux losses, KV-cache generation with sampling.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use gptoss_model::{init_random, Config};
//!
//! let model = init_random(&Config::tiny(), DType::F32, &Device::Cpu, Some(0))?;
//! let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
//! let logits = model.forward(&ids, None)?; // [1, 3, 512] f32
//! assert_eq!(logits.dims(), &[1, 3, 512]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Adapters (LoRA) hook in through [`LinearAdapter`] and [`ExpertAdapter`] (see `docs/model-api.md`).
//!
//! ## Layout
//!
//! Model code only: what is computed, in Hugging Face names. How it runs fast (attention with
//! sinks, the grouped expert matmuls, routing, fused norms, every CUDA kernel) is `gptoss-kernels`,
//! called through its safe functions. Data and types flow one way between the modules:
//!
//! ```text
//! error, config, hooks, route_replay
//!   → linear, norm, rope → mask → attention        (the attention block)
//!   → packed_experts → moe                          (router + experts, dense or MXFP4-resident)
//!   → model                                         (DecoderLayer, GptOssModel, GptOssForCausalLM)
//!   → spec                                          (named parameters and their shapes)
//!   → init, checkpoint, memory, synthetic           (random init, HF checkpoints, sizes, synthetic checkpoints)
//!   → export                                        (merged models for transformers: bf16, MXFP4)
//! loss, generate                                    (on top of model)
//! ```

mod attention;
mod checkpoint;
mod config;
mod error;
pub mod export;
mod generate;
pub mod hooks;
mod init;
mod linear;
mod loss;
mod mask;
mod memory;
mod model;
mod moe;
mod norm;
mod packed_experts;
mod rope;
pub mod route_replay;
mod spec;
pub mod synthetic;

pub use attention::{Attention, LayerCache};
pub use checkpoint::{
    checkpoint_files, load, load_with, save, Checkpoint, ExpertLoading, LoadOptions, SaveOptions,
    INDEX_FILE, SINGLE_FILE,
};
pub use config::{Config, LayerType, QuantizationConfig, RopeScaling, TokenIds};
pub use error::{ModelError, Result};
pub use export::{
    export, export_checkpoint, logit_gap, probe_tokens, ExportFormat, ExportOptions, ExportReport,
    LogitGap, QuantError, WeightDelta,
};
pub use generate::{
    generate, generate_batch, harmony_stop_tokens, BatchOptions, FinishReason, GenerationConfig,
    GenerationEvent, GenerationOutput, GenerationRequest, Generator, Sampler, HARMONY_CALL,
    HARMONY_END, HARMONY_RETURN,
};
pub use hooks::{ExpertAdapter, ExpertParam, LinearAdapter};
pub use init::{init_random, init_random_packed};
pub use linear::Linear;
pub use loss::{
    causal_lm_loss, cross_entropy_sum, reduce, router_aux_loss, shift_labels, LossReduction,
    IGNORE_INDEX,
};
pub use mask::AttnContext;
pub use memory::{memory_estimate, ExpertFormat, MemoryEstimate};
pub use model::{DecoderLayer, GptOssForCausalLM, GptOssModel, HiddenOutput, KvCache, LayerOutput};
pub use moe::{Experts, MoeMlp, Router, Routing};
pub use norm::RmsNorm;
pub use packed_experts::PackedExperts;
pub use rope::{apply_rotary, RopeParams};
pub use route_replay::RouteReplay;
pub use spec::{
    map_parameters, named_parameters, num_parameters, tensor_specs, ParamKind, TensorSpec,
};
pub use synthetic::{write_synthetic_checkpoint, SyntheticOptions, SyntheticSummary};
