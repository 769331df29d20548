//! Fused ops of the mixture-of-experts MLP, with an exact backward each.
//!
//! - [`gather_rows`]: the routed rows of the hidden states (`x[tokens[m]]`);
//! - [`swiglu_bias`]: gate/up bias add and clamped, interleaved SwiGLU of `GptOssExperts`;
//! - [`combine`]: down bias add, routing weights and the sum over each token's k experts.
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
mod cuda;
mod gather;
mod swiglu;

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use half::bf16;

pub use combine::combine;
pub use gather::gather_rows;
pub use swiglu::swiglu_bias;

/// The elements of a contiguous f32 or bf16 CPU tensor as f32 (borrowed when already f32).
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Cow<'a, [f32]>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: not contiguous")))?;
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[a..b]),
        CpuStorage::BF16(v) => Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect()),
        _ => candle_core::bail!("{what}: dtype {:?}, expected f32 or bf16", s.dtype()),
    })
}

/// The elements of a contiguous u32 CPU tensor.
fn cpu_u32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [u32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: not contiguous")))?;
    match s {
        CpuStorage::U32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: dtype {:?}, expected u32", s.dtype()),
    }
}

/// f32 values as a CPU storage of `dtype` (f32 or bf16, rounded to nearest even).
fn cpu_out(v: Vec<f32>, dtype: DType, what: &str) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        d => candle_core::bail!("{what}: dtype {d:?}, expected f32 or bf16"),
    })
}

/// The CPU storage behind a held tensor's storage guard.
fn cpu_of<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("{what}: expected a CPU tensor like the other operands"),
    }
}

/// The CUDA storage behind a held tensor's storage guard.
#[cfg(feature = "cuda")]
fn cuda_of<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a candle_core::CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{what}: expected a CUDA tensor like the other operands"),
    }
}

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

#[cfg(test)]
mod test_util {
    use candle_core::Tensor;

    /// `max |a − b| / max(1, max |b|)` over all elements (f32).
    pub(super) fn rel_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        let a = a.to_dtype(candle_core::DType::F32)?;
        let b = b.to_dtype(candle_core::DType::F32)?;
        let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let s = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        Ok(d / s)
    }
}
