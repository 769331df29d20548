//! MXFP4 (OCP microscaling FP4) decoding and encoding for gpt-oss checkpoints, on CPU and CUDA.
//!
//! gpt-oss stores its expert weights as MXFP4: `*_blocks u8 [E, out, in/32, 16]` (two FP4 E2M1
//! values per byte, low nibble first) and `*_scales u8 [E, out, in/32]` (E8M0, bias 127), one
//! scale per 32 values. This crate turns them into dense f32/bf16/f16 tensors, bit-exact with
//! transformers' `convert_moe_packed_tensors`, optionally transposed in the same pass into the
//! transformers parameter layout `[E, in, out]`; and encodes dense tensors back with the
//! triton_kernels rules (for exporting merged models).
//!
//! # Entry points
//! - [`dequantize`] / [`dequantize_named`]: candle tensors in, candle tensor out, on the inputs'
//!   device (CUDA kernel with feature `cuda`, rayon kernel on the CPU).
//! - [`dequantize_bytes`], [`dequantize_views`]: raw bytes or safetensors views (memory-mapped
//!   files) to a tensor on any device; [`dequantize_into`], [`dequantize_views_into`]: into a
//!   caller's CPU buffer.
//! - [`quantize`] / [`quantize_named`] ([`quantize_into`] for slices).
//! - [`dequantize_reference`]: the scalar reference the kernels are tested against.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use gptoss_mxfp4::{dequantize, quantize, Layout};
//!
//! # fn main() -> Result<(), gptoss_mxfp4::Mxfp4Error> {
//! let dev = Device::Cpu;
//! // 2 experts, 3 output rows, 64 input features = 2 blocks per row.
//! let w = Tensor::arange(0f32, 384., &dev)?.reshape((2, 3, 64))?;
//! let (blocks, scales) = quantize(&w)?; // u8 [2, 3, 2, 16], u8 [2, 3, 2]
//! let dense = dequantize(&blocks, &scales, DType::BF16, Layout::Checkpoint)?; // [2, 3, 64]
//! let param = dequantize(&blocks, &scales, DType::BF16, Layout::Transposed)?; // [2, 64, 3]
//! assert_eq!(param.dims(), &[2, 64, 3]);
//! assert_eq!(dense.transpose(1, 2)?.to_dtype(DType::F32)?.to_vec3::<f32>()?,
//!            param.to_dtype(DType::F32)?.to_vec3::<f32>()?);
//! # Ok(()) }
//! ```
//!
//! # Exact semantics (matched to transformers 5.24 / torch 2.15, fixtures in `tests/fixtures`)
//! Value `j` of a block is `FP4[nibble_j] · 2^(scale − 127)` computed exactly and rounded once
//! (to nearest, ties to even) to the output type, which is what `torch.ldexp` gives:
//! - every scale byte 0–255 is a power of two; **255 is not NaN** (as the OCP spec would
//!   have it) but `2^128`: `±0.5 · 2^128 = ±2^127` and `±1.5 · 2^127` stay finite in f32/bf16,
//!   larger products become ±inf in f32/bf16 (`|v| ≥ 4` from scale 253, `|v| ≥ 2` from 254,
//!   `|v| ≥ 1` at 255);
//! - `±0` nibbles give `±0` for every scale (never NaN);
//! - f16 output rounds into subnormals (ties to even) and overflows to ±inf above 65504.
//!
//! # Round trip
//! `quantize(dequantize(q)) == q` (bytes and scales) holds for every *valid* `q` decoded to f32
//! or bf16: a block is valid if either its scale is 0 and all its nibbles are ±0 (`0` or `8`),
//! or its scale is in `1..=252` and at least one nibble has magnitude 4 or 6 (`n & 7 ≥ 6`).
//! Other blocks are not fixed points: the encoder picks the scale from the decoded maximum,
//! so e.g. a block whose largest nibble is ±3 comes back at scale − 1 with every nibble doubled
//! (same values, different bytes). The encoder itself can produce such blocks (when
//! `amax / 2^(s−127)` falls in `(3, 3.5)`, it rounds to 3), and blocks whose largest magnitude
//! is below `6 · 2^-126` (≈ 7e-38) get scale 1 and may round to all zeros. Decoding is exact,
//! so `dequantize(quantize(dequantize(quantize(x))))` always equals `dequantize(quantize(x))`.
//! `-0` nibbles survive the round trip (their sign is kept).

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod element;
mod error;
pub mod format;
mod lut;
pub mod quant;
mod reference;
mod shape;
mod slices;
mod tensor;
#[cfg(target_arch = "x86_64")]
mod transpose16;
mod views;

pub use cpu::{dequantize_into, dequantize_to_vec};
#[cfg(feature = "cuda")]
pub use cuda::{dequantize_checkpoint_into, DEVICE_DECODE};
pub use element::OutputElement;
pub use error::{Mxfp4Error, Result};
pub use lut::PairRow;
pub use quant::{quantize_block, quantize_into};
pub use reference::dequantize_reference;
pub use shape::{Layout, Mxfp4Shape};
pub use tensor::{dequantize, dequantize_bytes, dequantize_named, quantize, quantize_named};
pub use views::{dequantize_views, dequantize_views_into, view_shape};
