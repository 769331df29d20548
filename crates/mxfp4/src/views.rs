//! Dequantizing straight from safetensors views (e.g. of a memory-mapped checkpoint).

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::element::OutputElement;
use crate::error::{Mxfp4Error, Result};
use crate::shape::{tensor_names, Layout, Mxfp4Shape};
use crate::slices::check_packed;
use crate::tensor::dequantize_bytes;

fn check_u8(view: &TensorView<'_>, name: String) -> Result<()> {
    if view.dtype() == Dtype::U8 {
        Ok(())
    } else {
        Err(Mxfp4Error::DType {
            name: format!("{name} (safetensors dtype {:?})", view.dtype()),
            actual: DType::U8,
            expected: "u8 (safetensors U8)",
        })
    }
}

/// Checks a blocks/scales pair of views and returns its geometry.
///
/// # Errors
/// As [`crate::dequantize`].
pub fn view_shape(
    blocks: &TensorView<'_>,
    scales: &TensorView<'_>,
    name: Option<&str>,
) -> Result<Mxfp4Shape> {
    let (bname, sname) = tensor_names(name);
    check_u8(blocks, bname)?;
    check_u8(scales, sname)?;
    let shape = Mxfp4Shape::from_dims(blocks.shape(), scales.shape(), name)?;
    check_packed(blocks.data(), scales.data(), &shape, name)?;
    Ok(shape)
}

/// Dequantizes a `*_blocks`/`*_scales` pair of safetensors views into a new tensor on
/// `device`. Shapes, dtypes and layouts as in [`crate::dequantize`]; `name` is the blocks key
/// (e.g. `model.layers.0.mlp.experts.gate_up_proj_blocks`) for errors. The packed bytes are
/// read in place (no host copy of the packed tensor).
///
/// # Errors
/// As [`crate::dequantize`]; a view whose dtype is not U8 gives [`Mxfp4Error::DType`].
pub fn dequantize_views(
    blocks: &TensorView<'_>,
    scales: &TensorView<'_>,
    dtype: DType,
    layout: Layout,
    device: &Device,
    name: Option<&str>,
) -> Result<Tensor> {
    view_shape(blocks, scales, name)?;
    dequantize_bytes(
        blocks.data(),
        blocks.shape(),
        scales.data(),
        scales.shape(),
        dtype,
        layout,
        device,
        name,
    )
}

/// Dequantizes a pair of views into a caller's CPU buffer of `T` (`f32`, `bf16`, `f16`) holding
/// `shape.num_values()` elements, laid out as `shape.output_dims(layout)`.
///
/// # Errors
/// As [`dequantize_views`], plus [`Mxfp4Error::Length`] when `out` has the wrong length.
pub fn dequantize_views_into<T: OutputElement>(
    blocks: &TensorView<'_>,
    scales: &TensorView<'_>,
    layout: Layout,
    out: &mut [T],
    name: Option<&str>,
) -> Result<()> {
    let shape = view_shape(blocks, scales, name)?;
    crate::slices::check_lengths(blocks.data(), scales.data(), out, &shape, name)?;
    crate::cpu::dequantize_into(blocks.data(), scales.data(), &shape, layout, out)
}
