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

mod adapter_sum;
mod attention;
mod attn_core;
mod checkpoint;
mod config;
mod deferred_experts;
mod device;
mod error;
mod fast_path;
#[cfg(feature = "cuda")]
mod flash;
mod frozen;
mod fused_ops;
mod generate;
mod grouped;
pub mod hooks;
mod init;
mod linear;
mod loss;
mod mask;
mod memory;
mod model;
mod moe;
pub mod moe_kernels;
mod norm;
#[cfg(feature = "cuda")]
pub mod nvrtc;
mod packed_experts;
pub mod profile;
mod rope;
pub mod route_replay;
mod seed_grad;
mod sink_softmax;
mod spec;
mod storage;
#[cfg(test)]
mod test_util;

pub use adapter_sum::{add_scaled_delta, scaled_delta_grad};
pub use attention::{Attention, LayerCache};
pub use attn_core::{sink_attention, sink_attention_structural, CHUNK_ELEMS};
pub use checkpoint::{checkpoint_files, load, save, SaveOptions, INDEX_FILE, SINGLE_FILE};
pub use config::{Config, LayerType, QuantizationConfig, RopeScaling, TokenIds};
pub use device::{cuda_device, cuda_if_available};
pub use error::{ModelError, Result};
pub use frozen::frozen_matmul;
pub use fused_ops::{rms_norm, rotary, rotary_tokens_first};
pub use generate::{
    generate, harmony_stop_tokens, GenerationConfig, Generator, Sampler, HARMONY_CALL, HARMONY_END,
    HARMONY_RETURN,
};
pub use hooks::{ExpertAdapter, ExpertParam, LinearAdapter};
pub use init::init_random;
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
pub use packed_experts::{init_random_packed, PackedExperts};
pub use rope::{apply_rotary, RopeParams};
pub use route_replay::RouteReplay;
pub use seed_grad::seed_gradient;
pub use sink_softmax::sink_softmax;
pub use spec::{named_parameters, num_parameters, tensor_specs, ParamKind, TensorSpec};
