//! Storage access shared by the custom ops (CPU reference implementations and CUDA launchers):
//! contiguous f32/bf16/u32 views of a CPU storage, f32 results back into a storage of the run dtype,
//! and the storage behind a held tensor.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Storage};
use half::bf16;

/// The elements of a contiguous f32 or bf16 CPU tensor as f32 (borrowed when already f32).
pub(crate) fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<Cow<'a, [f32]>> {
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
pub(crate) fn cpu_u32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [u32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: not contiguous")))?;
    match s {
        CpuStorage::U32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: dtype {:?}, expected u32", s.dtype()),
    }
}

/// f32 values as a CPU storage of `dtype` (f32 or bf16, rounded to nearest even).
pub(crate) fn cpu_out(v: Vec<f32>, dtype: DType, what: &str) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        d => candle_core::bail!("{what}: dtype {d:?}, expected f32 or bf16"),
    })
}

/// The CPU storage behind a held tensor's storage guard.
pub(crate) fn cpu_of<'a>(s: &'a Storage, what: &str) -> candle_core::Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("{what}: expected a CPU tensor like the other operands"),
    }
}

/// The CUDA storage behind a held tensor's storage guard.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_of<'a>(
    s: &'a Storage,
    what: &str,
) -> candle_core::Result<&'a candle_core::CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{what}: expected a CUDA tensor like the other operands"),
    }
}
