//! Candle-level entry points: one function per operation, whatever the device.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Shape, Tensor};
use half::{bf16, f16};

use crate::cpu::dequantize_to_vec;
use crate::error::{Mxfp4Error, Result};
use crate::quant::quantize_into;
use crate::shape::{tensor_names, Layout, Mxfp4Shape};
use crate::slices::check_packed;

/// Dequantizes MXFP4 `blocks`/`scales` to a dense tensor on the device of the inputs.
///
/// # Shapes and dtypes
/// - `blocks`: `u8 [..., rows, cols/32, 16]` (e.g. gate_up: `[32, 5760, 90, 16]`).
/// - `scales`: `u8 [..., rows, cols/32]` (e.g. `[32, 5760, 90]`).
/// - returns `dtype` (`F32`, `BF16` or `F16`):
///   `[..., rows, cols]` for [`Layout::Checkpoint`], `[..., cols, rows]` for
///   [`Layout::Transposed`] (gate_up: `[32, 2880, 5760]`, the transformers parameter layout).
///
/// Bit-exact with transformers' `convert_moe_packed_tensors` (see the crate docs for the
/// special scales). Runs the CUDA kernel for CUDA tensors (feature `cuda`), the rayon kernel on
/// the CPU. Non-contiguous inputs are made contiguous first.
///
/// # Errors
/// [`Mxfp4Error::ShapeMismatch`] (last dim ≠ 16, scales ≠ `blocks.shape[..-1]`, fewer than 3
/// dims), [`Mxfp4Error::DType`] (inputs not `u8`, `dtype` not a float type),
/// [`Mxfp4Error::Device`] (inputs on different devices).
pub fn dequantize(
    blocks: &Tensor,
    scales: &Tensor,
    dtype: DType,
    layout: Layout,
) -> Result<Tensor> {
    dequantize_named(blocks, scales, dtype, layout, None)
}

/// [`dequantize`] with a name for the blocks tensor in errors (e.g. the checkpoint key
/// `model.layers.0.mlp.experts.gate_up_proj_blocks`; the scales are then called
/// `..._scales`).
///
/// # Errors
/// As [`dequantize`].
pub fn dequantize_named(
    blocks: &Tensor,
    scales: &Tensor,
    dtype: DType,
    layout: Layout,
    name: Option<&str>,
) -> Result<Tensor> {
    let (bname, sname) = tensor_names(name);
    let shape = Mxfp4Shape::from_dims(blocks.dims(), scales.dims(), name)?;
    check_dtype(&bname, blocks.dtype(), DType::U8, "u8")?;
    check_dtype(&sname, scales.dtype(), DType::U8, "u8")?;
    check_output_dtype(&bname, dtype)?;
    if !blocks.device().same_device(scales.device()) {
        return Err(Mxfp4Error::Device {
            name: bname,
            location: format!("{:?}", blocks.device().location()),
            other_name: sname,
            other_location: format!("{:?}", scales.device().location()),
        });
    }
    let op = DequantizeOp {
        shape,
        dtype,
        layout,
    };
    let mut blocks = blocks.contiguous()?;
    if blocks.layout().start_offset() % 16 != 0 {
        // The CUDA kernel reads blocks as aligned 32-bit words.
        blocks = blocks.copy()?;
    }
    Ok(blocks.apply_op2_no_bwd(&scales.contiguous()?, &op)?)
}

/// Dequantizes raw bytes (e.g. `safetensors::tensor::TensorView::data()` of a memory-mapped
/// file) into a new tensor on `device`, without copying the packed bytes on the host first.
///
/// - `blocks`: bytes of `u8 [..., rows, cols/32, 16]` (`blocks_dims`), row-major.
/// - `scales`: bytes of `u8 [..., rows, cols/32]` (`scales_dims`), row-major.
/// - returns `dtype` `[..., rows, cols]` or `[..., cols, rows]` (see [`dequantize`]).
///
/// On the CPU the output is decoded straight from the slices; on a CUDA device the packed
/// bytes are copied host → device from the slices and decoded there.
///
/// # Errors
/// As [`dequantize`], plus [`Mxfp4Error::Length`] when a slice does not match its dims.
#[allow(clippy::too_many_arguments)]
pub fn dequantize_bytes(
    blocks: &[u8],
    blocks_dims: &[usize],
    scales: &[u8],
    scales_dims: &[usize],
    dtype: DType,
    layout: Layout,
    device: &Device,
    name: Option<&str>,
) -> Result<Tensor> {
    let shape = Mxfp4Shape::from_dims(blocks_dims, scales_dims, name)?;
    let (bname, _) = tensor_names(name);
    check_output_dtype(&bname, dtype)?;
    check_packed(blocks, scales, &shape, name)?;
    match device {
        Device::Cpu => {
            let dims = shape.output_dims(layout);
            Ok(match dtype {
                DType::F32 => Tensor::from_vec(
                    dequantize_to_vec::<f32>(blocks, scales, &shape, layout)?,
                    dims,
                    device,
                )?,
                DType::BF16 => Tensor::from_vec(
                    dequantize_to_vec::<bf16>(blocks, scales, &shape, layout)?,
                    dims,
                    device,
                )?,
                _ => Tensor::from_vec(
                    dequantize_to_vec::<f16>(blocks, scales, &shape, layout)?,
                    dims,
                    device,
                )?,
            })
        }
        _ => {
            let b = Tensor::from_slice(blocks, blocks_dims, device)?;
            let s = Tensor::from_slice(scales, scales_dims, device)?;
            dequantize_named(&b, &s, dtype, layout, name)
        }
    }
}

/// Quantizes `weights` `[..., rows, cols]` (`F32`, `BF16` or `F16`) along the last dimension
/// with the triton_kernels rules (see [`crate::quant`]).
///
/// Returns `(blocks u8 [..., rows, cols/32, 16], scales u8 [..., rows, cols/32])` on the device
/// of `weights` (the work itself runs on the CPU). Inverse of
/// `dequantize(.., Layout::Checkpoint)` for every valid block (see the crate docs).
///
/// Note: transformers' `Mxfp4Quantize` casts to bf16 before quantizing; pass bf16 weights to
/// reproduce it exactly.
///
/// # Errors
/// [`Mxfp4Error::ShapeMismatch`] (fewer than 2 dims, cols not a multiple of 32),
/// [`Mxfp4Error::DType`], [`Mxfp4Error::NonFinite`].
pub fn quantize(weights: &Tensor) -> Result<(Tensor, Tensor)> {
    quantize_named(weights, Layout::Checkpoint, None)
}

/// [`quantize`] for either layout, with a name for errors.
///
/// With [`Layout::Transposed`], `weights` is `[..., cols, rows]` (the transformers expert
/// parameter layout `[E, in, out]`) and is quantized along `cols` (dimension −2); the result is
/// the checkpoint pair `blocks [..., rows, cols/32, 16]`, `scales [..., rows, cols/32]`, i.e. the
/// inverse of `dequantize(.., Layout::Transposed)`.
///
/// # Errors
/// As [`quantize`].
pub fn quantize_named(
    weights: &Tensor,
    layout: Layout,
    name: Option<&str>,
) -> Result<(Tensor, Tensor)> {
    let wname = name.unwrap_or("weights");
    match weights.dtype() {
        DType::F32 | DType::BF16 | DType::F16 => {}
        d => {
            return Err(Mxfp4Error::DType {
                name: wname.to_string(),
                actual: d,
                expected: "f32, bf16 or f16",
            })
        }
    }
    let rank = weights.rank();
    let dense = match layout {
        Layout::Checkpoint => weights.clone(),
        Layout::Transposed if rank >= 2 => weights.transpose(rank - 2, rank - 1)?,
        Layout::Transposed => weights.clone(),
    };
    let shape = Mxfp4Shape::from_dense_dims(dense.dims(), Some(wname)).map_err(|e| match e {
        Mxfp4Error::ShapeMismatch { name, expected, .. } if layout == Layout::Transposed => {
            Mxfp4Error::ShapeMismatch {
                name: name.clone(),
                actual: weights.dims().to_vec(),
                expected: format!("{expected}, given transposed as [..., cols, rows]"),
                other_name: name,
                other: weights.dims().to_vec(),
            }
        }
        e => e,
    })?;
    let values = dense
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut blocks = vec![0u8; shape.num_blocks() * crate::format::BLOCK_BYTES];
    let mut scales = vec![0u8; shape.num_blocks()];
    quantize_into(&values, &shape, &mut blocks, &mut scales, Some(wname))?;
    let device = weights.device();
    Ok((
        Tensor::from_vec(blocks, shape.blocks_dims(), &Device::Cpu)?.to_device(device)?,
        Tensor::from_vec(scales, shape.scales_dims(), &Device::Cpu)?.to_device(device)?,
    ))
}

fn check_dtype(name: &str, actual: DType, want: DType, expected: &'static str) -> Result<()> {
    if actual == want {
        Ok(())
    } else {
        Err(Mxfp4Error::DType {
            name: name.to_string(),
            actual,
            expected,
        })
    }
}

fn check_output_dtype(name: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        d => Err(Mxfp4Error::DType {
            name: format!("{name} (requested output)"),
            actual: d,
            expected: "f32, bf16 or f16",
        }),
    }
}

/// The candle op behind [`dequantize`]: inputs `blocks`, `scales` (contiguous `u8`).
pub(crate) struct DequantizeOp {
    pub(crate) shape: Mxfp4Shape,
    pub(crate) dtype: DType,
    pub(crate) layout: Layout,
}

fn contiguous_u8<'a>(
    s: &'a CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [u8]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("mxfp4 dequantize: {what} not contiguous"))
    })?;
    match s {
        CpuStorage::U8(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("mxfp4 dequantize: {what} is not u8"),
    }
}

impl CustomOp2 for DequantizeOp {
    fn name(&self) -> &'static str {
        "mxfp4-dequantize"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &candle_core::Layout,
        s2: &CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let blocks = contiguous_u8(s1, l1, "blocks")?;
        let scales = contiguous_u8(s2, l2, "scales")?;
        let (shape, layout) = (&self.shape, self.layout);
        let err = |e: Mxfp4Error| candle_core::Error::Msg(e.to_string());
        let storage = match self.dtype {
            DType::F32 => {
                CpuStorage::F32(dequantize_to_vec(blocks, scales, shape, layout).map_err(err)?)
            }
            DType::BF16 => {
                CpuStorage::BF16(dequantize_to_vec(blocks, scales, shape, layout).map_err(err)?)
            }
            DType::F16 => {
                CpuStorage::F16(dequantize_to_vec(blocks, scales, shape, layout).map_err(err)?)
            }
            d => candle_core::bail!("mxfp4 dequantize: unsupported output dtype {d:?}"),
        };
        Ok((storage, Shape::from(self.shape.output_dims(self.layout))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CudaStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let storage =
            crate::cuda::dequantize_cuda(s1, l1, s2, l2, &self.shape, self.dtype, self.layout)?;
        Ok((storage, Shape::from(self.shape.output_dims(self.layout))))
    }
}
