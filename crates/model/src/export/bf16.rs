//! Float tensors as checkpoint bytes: the bf16 (or f16/f32) tensors of every export format, and
//! the dense expert weights of the bf16 format.

use std::io::Write;

use candle_core::{DType, Device, Storage, Tensor, WithDType};
use half::{bf16, f16};

use super::writer::{write_err, write_values};
use crate::error::{ModelError, Result};

/// Runs `f` on the row-major elements of `t` (converted to the host and made contiguous, which
/// copies only when it is not already so), read in place from its storage.
fn with_host_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) else {
        return Err(ModelError::arg(
            "export",
            "internal: tensor not on the host",
        ));
    };
    f(&cpu.as_slice::<T>()?[a..b])
}

/// Writes `t` (any shape, any float dtype, any device) converted to `dtype` (`BF16`, `F16` or
/// `F32`) into `w`, row-major and little-endian: `t.elem_count() · dtype.size_in_bytes()` bytes.
/// Host memory: one copy of `t` in `dtype` (none when it already is a contiguous host tensor
/// of that dtype) plus a 1 MiB buffer.
///
/// # Errors
/// [`ModelError::InvalidArgument`] for another `dtype` (naming `name`); candle errors; the write
/// error (see [`write_err`]).
pub(crate) fn write_float(t: &Tensor, dtype: DType, name: &str, w: &mut dyn Write) -> Result<()> {
    let t = t.to_dtype(dtype)?;
    match dtype {
        DType::BF16 => with_host_slice(&t, |v| {
            write_values(w, v, bf16::to_le_bytes).map_err(write_err)
        }),
        DType::F16 => with_host_slice(&t, |v| {
            write_values(w, v, f16::to_le_bytes).map_err(write_err)
        }),
        DType::F32 => with_host_slice(&t, |v| {
            write_values(w, v, f32::to_le_bytes).map_err(write_err)
        }),
        d => Err(ModelError::arg(
            name,
            format!("cannot store floats as {d:?} (bf16, f16 or f32)"),
        )),
    }
}

/// Writes a u8 tensor (MXFP4 blocks or scales, any shape and device) into `w` as is.
pub(crate) fn write_u8(t: &Tensor, w: &mut dyn Write) -> Result<()> {
    with_host_slice(t, |v: &[u8]| w.write_all(v).map_err(write_err))
}
