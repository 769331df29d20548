//! # gptoss-kernels
//!
//! Every custom op of the workspace: what the model and the adapters compute (in Hugging Face
//! terms, in `gptoss-model` and `gptoss-lora`), made fast here. Each op is one module that reads
//! top to bottom: the safe function (shapes and dtypes in its rustdoc), the CPU reference (what
//! runs on the CPU, and what the CUDA path is tested against), the CUDA source and its launcher
//! (`cfg(feature = "cuda")` appears only there), the candle `CustomOp*` wiring with its backward,
//! and the unit tests against the reference. Ops return [`candle_core::Result`]: they run inside
//! candle's graph, and their errors name the op and the operand at fault.
//!
//! | module | ops |
//! |---|---|
//! | [`attention`] | [`attention::sink_softmax`], the chunked attention core with sinks ([`attention::sink_attention`], visibility from indices: [`attention::KeyMask`]), flash-attention kernels (CUDA) |
//! | [`norm`] | [`rms_norm`] (RMSNorm forward and backward in one kernel each) |
//! | [`rope`] | [`rotary`], [`rotary_tokens_first`] (half-split RoPE, bit-identical to the reference ops) |
//! | [`moe`] | router top-k + softmax, routed-row gather, SwiGLU with bias, weighted combine, the deferred expert backward |
//! | [`grouped`] | the grouped expert matmul over dense or MXFP4-resident weights (cuBLAS(Lt) per expert, fused MXFP4 GEMM); the routed matmul (each row its own expert, read on the device) |
//! | [`lora`] | PEFT's LoRA down projection, up projection + epilogue, grouped expert LoRA |
//! | [`scaled_delta`] | [`add_scaled_delta`]: PEFT's `base + bias + delta·scale` rounding, and its gradient |
//! | [`frozen`] | [`frozen_matmul`]: `x·W` whose backward gives only `∂x` |
//! | [`seed_grad`] | [`seed_gradient`]: starts a backward from a given gradient |
//! | [`lm_loss`] | the LM-head cross-entropy's row statistics and logits gradient (in place on CUDA) |
//! | [`adamw`] | torch's AdamW update, one kernel per parameter or three launches for clip + all updates |
//!
//! Shared pieces: [`runtime`] (the CUDA device, the NVRTC module cache (compiled PTX kept on disk), the `GPTOSS_NO_*`
//! switches of [`FastPath`], [`profile`] scopes, storage access). `gptoss-mxfp4` stays the MXFP4
//! codec crate; the grouped matmul decodes through it.
//!
//! The crate depends only on candle, half and `gptoss-mxfp4`: the model knows the kernels, the
//! kernels know nothing of the model.

pub mod adamw;
pub mod attention;
pub mod frozen;
pub mod grouped;
pub mod lm_loss;
pub mod lora;
pub mod moe;
pub mod norm;
pub mod rope;
pub mod runtime;
pub mod scaled_delta;
pub mod seed_grad;
#[cfg(test)]
mod test_util;

#[cfg(feature = "cuda")]
pub(crate) use runtime::nvrtc;
pub(crate) use runtime::storage;
pub use runtime::{fast_path, profile};

pub use frozen::frozen_matmul;
pub use norm::rms_norm;
pub use rope::{rotary, rotary_tokens_first};
pub use runtime::device::{cuda_device, cuda_if_available};
pub use runtime::fast_path::FastPath;
pub use runtime::memory::{device_memory, MemoryPool, PoolStats};
pub use scaled_delta::{add_scaled_delta, scaled_delta_grad};
pub use seed_grad::seed_gradient;
