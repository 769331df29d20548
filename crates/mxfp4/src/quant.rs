//! Encoding f32 values to MXFP4 with the triton_kernels rules
//! (`downcast_to_mxfp_torch(x, torch.uint8, axis=-1)`, ROUND_UP scale mode).
//!
//! Per block of 32 values: `scale = amax / 6` rounded up to a power of two
//! ([`crate::format::scale_for_amax`]), each `x / scale` rounded half away from zero to E2M1 and
//! saturated at ±6 ([`crate::format::encode_e2m1`]), evens in the low nibble.

use rayon::prelude::*;

use crate::error::{Mxfp4Error, Result};
use crate::format::{encode_e2m1, quant_multiplier, scale_for_amax, BLOCK_BYTES, BLOCK_VALUES};
use crate::shape::Mxfp4Shape;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// Quantizes one block of 32 values into 16 bytes; returns the scale byte.
#[inline]
pub fn quantize_block(values: &[f32; BLOCK_VALUES], out: &mut [u8; BLOCK_BYTES]) -> u8 {
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = scale_for_amax(amax);
    let mult = quant_multiplier(scale);
    for (byte, pair) in out.iter_mut().zip(values.chunks_exact(2)) {
        *byte = encode_e2m1(pair[0] * mult) | (encode_e2m1(pair[1] * mult) << 4);
    }
    scale
}

/// Quantizes `values` (`shape.dense_dims()` = `[..., rows, cols]`, row-major f32) along the last
/// dimension into caller buffers `blocks` (`[..., rows, cols/32, 16]`) and `scales`
/// (`[..., rows, cols/32]`).
///
/// `name` names the input in errors.
///
/// # Errors
/// [`Mxfp4Error::Length`] for buffers of the wrong length, [`Mxfp4Error::NonFinite`] for NaN/inf
/// input (the first one, by flat index).
pub fn quantize_into(
    values: &[f32],
    shape: &Mxfp4Shape,
    blocks: &mut [u8],
    scales: &mut [u8],
    name: Option<&str>,
) -> Result<()> {
    let name = name.unwrap_or("weights");
    let checks = [
        (
            name.to_string(),
            values.len(),
            shape.num_values(),
            shape.dense_dims(),
        ),
        (
            format!("{name} (blocks buffer)"),
            blocks.len(),
            shape.num_blocks() * BLOCK_BYTES,
            shape.blocks_dims(),
        ),
        (
            format!("{name} (scales buffer)"),
            scales.len(),
            shape.num_blocks(),
            shape.scales_dims(),
        ),
    ];
    for (name, actual, expected, dims) in checks {
        if actual != expected {
            return Err(Mxfp4Error::Length {
                name,
                actual,
                expected,
                shape: dims,
            });
        }
    }
    if let Some(index) = values.par_iter().position_first(|v| !v.is_finite()) {
        return Err(Mxfp4Error::NonFinite {
            name: name.to_string(),
            index,
            value: values[index],
        });
    }
    let (cols, groups) = (shape.cols(), shape.groups());
    values
        .par_chunks(cols * ROWS_PER_TASK)
        .zip(blocks.par_chunks_mut(groups * BLOCK_BYTES * ROWS_PER_TASK))
        .zip(scales.par_chunks_mut(groups * ROWS_PER_TASK))
        .for_each(|((values, blocks), scales)| {
            for ((v, b), s) in values
                .chunks_exact(BLOCK_VALUES)
                .zip(blocks.chunks_exact_mut(BLOCK_BYTES))
                .zip(scales.iter_mut())
            {
                if let (Ok(v), Ok(b)) = (v.try_into(), b.try_into()) {
                    *s = quantize_block(v, b);
                }
            }
        });
    Ok(())
}
