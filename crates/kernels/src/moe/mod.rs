//! Fused ops of the mixture-of-experts MLP, the differentiable ones with an exact backward.
//!
//! - [`topk_softmax`]: the router's top-k experts per token and their softmax weights;
//! - [`gather_rows`]: the routed rows of the hidden states (`x[tokens[m]]`);
//! - [`swiglu_bias`]: gate/up bias add and clamped, interleaved SwiGLU of `GptOssExperts`;
//! - [`combine`]: down bias add, routing weights and the sum over each token's k experts;
//! - `row_dots` and `combine_grad_weights_from_dots` (no autograd): the routing weights' gradient
//!   without the expert outputs, for the deferred backward of `gptoss_model::RouteReplay` (exact where
//!   the weights come from a softmax, see there).
//!
//! Each op replaces a chain of candle ops (strided views, per-row `index_select` of the biases, a
//! one-hot gather/scatter matmul): one pass over the memory forward and one backward. The CPU
//! implementation is the reference (and what runs on the CPU); on CUDA the ops run NVRTC kernels
//! (`cuda.rs`) that compute in f32 from f32 or bf16 tensors. The backward passes need no atomics:
//! the scatter directions read the inverse map `pos` (`pos[t·k + s]`: the routed row of token `t`'s
//! slot `s`), so results are deterministic.
//!
//! Index tensors are u32. The CPU implementation rejects out-of-range indices; the CUDA kernels do
//! not report them (an out-of-range row or expert contributes nothing).

mod combine;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod deferred;
mod dots;
mod gather;
mod swiglu;
mod topk;

use candle_core::{DType, Tensor};

#[cfg(feature = "cuda")]
use crate::storage::cuda_of;
use crate::storage::{cpu_f32, cpu_of, cpu_out, cpu_u32};

pub use combine::combine;
pub(crate) use combine::{combine_grad_rows, combine_grad_weights_from_dots};
pub use deferred::DeferredExperts;
pub(crate) use dots::row_dots;
pub use gather::gather_rows;
pub(crate) use gather::sum_rows;
pub use swiglu::swiglu_bias;
pub use topk::topk_softmax;

/// An index that must be below `bound`, as usize, or an error naming the index tensor and entry.
fn index(v: u32, bound: usize, what: &str, at: usize) -> candle_core::Result<usize> {
    let i = v as usize;
    if i >= bound {
        candle_core::bail!("{what}[{at}] = {v} is out of range (must be < {bound})");
    }
    Ok(i)
}

/// `t` as a contiguous u32 tensor with the given element count, or an error naming it.
fn indices(t: &Tensor, len: usize, what: &str) -> candle_core::Result<Tensor> {
    if t.dtype() != DType::U32 || t.elem_count() != len {
        candle_core::bail!(
            "{what}: expected {len} u32 indices, got {:?} {:?}",
            t.dims(),
            t.dtype()
        );
    }
    t.contiguous()
}

/// `t` in `dtype`, contiguous (a no-op for a contiguous tensor of that dtype).
fn float_operand(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    t.to_dtype(dtype)?.contiguous()
}

/// Checks the activation dtype (f32 or bf16).
fn check_dtype(t: &Tensor, what: &str) -> candle_core::Result<()> {
    match t.dtype() {
        DType::F32 | DType::BF16 => Ok(()),
        d => candle_core::bail!("{what}: dtype {d:?}, expected f32 or bf16"),
    }
}
