//! The scalar reference dequantizer: one element at a time, straight from the format's
//! definition ([`crate::format::exact_value`]). Slow; the fast kernels are tested against it
//! and the benchmark uses it as the naive baseline.

use crate::element::OutputElement;
use crate::error::Result;
use crate::format::{exact_value, BLOCK_BYTES, BLOCK_VALUES};
use crate::shape::{Layout, Mxfp4Shape};
use crate::slices::check_lengths;

/// Dequantizes `blocks`/`scales` (row-major bytes of the shapes in `shape`) element by element.
///
/// Output: `shape.output_dims(layout)`, row-major.
///
/// # Errors
/// [`crate::Mxfp4Error::Length`] when a slice's length does not match `shape`.
pub fn dequantize_reference<T: OutputElement>(
    blocks: &[u8],
    scales: &[u8],
    shape: &Mxfp4Shape,
    layout: Layout,
) -> Result<Vec<T>> {
    let mut out = vec![T::ZERO; shape.num_values()];
    check_lengths(blocks, scales, &out, shape, None)?;
    let (rows, groups, cols) = (shape.rows(), shape.groups(), shape.cols());
    for m in 0..shape.matrices() {
        for r in 0..rows {
            for g in 0..groups {
                let block = (m * rows + r) * groups + g;
                let scale = scales[block];
                for j in 0..BLOCK_VALUES {
                    let byte = blocks[block * BLOCK_BYTES + j / 2];
                    let nibble = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                    let c = g * BLOCK_VALUES + j;
                    let idx = match layout {
                        Layout::Checkpoint => (m * rows + r) * cols + c,
                        Layout::Transposed => (m * cols + c) * rows + r,
                    };
                    out[idx] = T::from_exact(exact_value(nibble, scale));
                }
            }
        }
    }
    Ok(out)
}
