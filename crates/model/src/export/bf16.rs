//! Float tensors as checkpoint bytes: the bf16 (or f16/f32) tensors of every export format, and
//! the dense expert weights of the bf16 format.

use std::io::Write;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::writer::write_err;
use crate::error::{ModelError, Result};

/// Writes `t` (any shape, any float dtype, any device) converted to `dtype` (`BF16`, `F16` or
/// `F32`) into `w`, row-major and little-endian: `t.elem_count() · dtype.size_in_bytes()` bytes.
/// Host memory: one copy of `t` in `dtype` plus a 1 MiB buffer.
///
/// # Errors
/// [`ModelError::InvalidArgument`] for another `dtype` (naming `name`); candle errors; the write
/// error (see [`write_err`]).
pub(crate) fn write_float(t: &Tensor, dtype: DType, name: &str, w: &mut dyn Write) -> Result<()> {
    let flat = t
        .to_dtype(dtype)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .contiguous()?;
    let written = match dtype {
        DType::BF16 => super::writer::write_values(w, &flat.to_vec1::<bf16>()?, bf16::to_le_bytes),
        DType::F16 => super::writer::write_values(w, &flat.to_vec1::<f16>()?, f16::to_le_bytes),
        DType::F32 => super::writer::write_values(w, &flat.to_vec1::<f32>()?, f32::to_le_bytes),
        d => {
            return Err(ModelError::arg(
                name,
                format!("cannot store floats as {d:?} (bf16, f16 or f32)"),
            ))
        }
    };
    written.map_err(write_err)
}

/// Writes a u8 tensor (MXFP4 blocks or scales, any shape and device) into `w` as is.
pub(crate) fn write_u8(t: &Tensor, w: &mut dyn Write) -> Result<()> {
    let bytes = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u8>()?;
    w.write_all(&bytes).map_err(write_err)
}
