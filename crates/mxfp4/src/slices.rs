//! Length checks shared by the slice-level entry points.

use crate::element::OutputElement;
use crate::error::{Mxfp4Error, Result};
use crate::shape::{tensor_names, Mxfp4Shape};

fn check(name: String, actual: usize, expected: usize, shape: Vec<usize>) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Mxfp4Error::Length {
            name,
            actual,
            expected,
            shape,
        })
    }
}

/// Checks that `blocks` and `scales` hold exactly the bytes `shape` says.
pub(crate) fn check_packed(
    blocks: &[u8],
    scales: &[u8],
    shape: &Mxfp4Shape,
    name: Option<&str>,
) -> Result<()> {
    let (bname, sname) = tensor_names(name);
    check(
        bname,
        blocks.len(),
        shape.num_blocks() * 16,
        shape.blocks_dims(),
    )?;
    check(sname, scales.len(), shape.num_blocks(), shape.scales_dims())
}

/// Checks the packed inputs and that `out` holds `shape.num_values()` elements.
pub(crate) fn check_lengths<T: OutputElement>(
    blocks: &[u8],
    scales: &[u8],
    out: &[T],
    shape: &Mxfp4Shape,
    name: Option<&str>,
) -> Result<()> {
    check_packed(blocks, scales, shape, name)?;
    let (bname, _) = tensor_names(name);
    check(
        format!("{bname} (output buffer)"),
        out.len(),
        shape.num_values(),
        shape.dense_dims(),
    )
}
