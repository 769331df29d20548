//! Expert weights re-quantized to MXFP4 in the layout transformers reads
//! (`…experts.{gate_up,down}_proj_blocks` u8 `[E, out, in/32, 16]` and `…_scales` u8
//! `[E, out, in/32]`), one expert at a time, with the quantization error of each tensor.

use std::io::Write;

use candle_core::{DType, Device};
use gptoss_mxfp4::Layout;

use super::source::ParamSource;
use super::writer::write_err;
use crate::error::{ModelError, Result};
use crate::spec::TensorSpec;

/// The quantization error of one MXFP4 expert tensor against the weights it was made from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QuantError {
    /// HF name of the dense parameter (`model.layers.0.mlp.experts.gate_up_proj`).
    pub name: String,
    /// `‖W − dequant(quant(W))‖₂ / ‖W‖₂` over the whole `[E, in, out]` tensor, `W` being the
    /// merged weights in the export's float dtype (bf16 by default, as transformers'
    /// `Mxfp4Quantize` casts to bf16 first); 0 for a zero tensor and for passed-through blocks.
    pub rel_rms: f64,
    /// Largest `|W − dequant(quant(W))|`.
    pub max_abs: f64,
    /// `false` when the tensor was MXFP4-resident and its blocks/scales were written unchanged
    /// (no new error), `true` when it was quantized here.
    pub requantized: bool,
}

impl QuantError {
    /// The entry of an expert weight whose stored blocks/scales are written unchanged.
    pub(crate) fn passed_through(name: &str) -> Self {
        Self {
            name: name.to_string(),
            rel_rms: 0.0,
            max_abs: 0.0,
            requantized: false,
        }
    }
}

/// `(E, in, out)` of the expert weight `spec`, checked: rank 3, `in` a multiple of 32.
///
/// # Errors
/// [`ModelError::Mxfp4`] naming the tensor.
pub(crate) fn expert_dims(spec: &TensorSpec) -> Result<(usize, usize, usize)> {
    match spec.shape[..] {
        [e, inn, out] if inn % 32 == 0 => Ok((e, inn, out)),
        ref d => Err(ModelError::mxfp4(
            &spec.name,
            format!("expected [E, in, out] with in a multiple of 32 for MXFP4, got {d:?}"),
        )),
    }
}

/// Quantizes the expert weight `spec` `[E, in, out]`, read one expert at a time from `src`
/// (`[in, out]`, any float dtype and device; cast to `dtype` first), along `in` with
/// the triton_kernels rules of `gptoss-mxfp4`: writes the blocks `[E, out, in/32, 16]` (u8,
/// `E·out·in/2` bytes) into `blocks`, returns the scales `[E, out, in/32]` (u8, row-major) and
/// the error. Host memory: one expert's weights (f32) and its blocks, plus all scales (1/16 of
/// the blocks).
///
/// # Errors
/// [`ModelError::Mxfp4`] naming the tensor (not `[E, in, out]` with `in` a multiple of 32,
/// non-finite values); `src`'s, candle and write errors.
pub(crate) fn quantize_source(
    src: &dyn ParamSource,
    spec: &TensorSpec,
    dtype: DType,
    blocks: &mut dyn Write,
) -> Result<(Vec<u8>, QuantError)> {
    let name = spec.name.as_str();
    let (experts, inn, out) = expert_dims(spec)?;
    let mut scales = Vec::new();
    let (mut err_sq, mut ref_sq, mut max_abs) = (0f64, 0f64, 0f64);
    for e in 0..experts {
        let we = src.expert(spec, e, dtype)?;
        if we.dims() != [inn, out] {
            return Err(ModelError::mxfp4(
                name,
                format!("expert {e} is {:?}, expected [{inn}, {out}]", we.dims()),
            ));
        }
        // [1, in, out] in the storage dtype, on the host
        let we = we.unsqueeze(0)?.to_dtype(dtype)?.to_device(&Device::Cpu)?;
        let (b, s) = gptoss_mxfp4::quantize_named(&we, Layout::Transposed, Some(name))
            .map_err(|x| ModelError::mxfp4(name, x))?;
        let back =
            gptoss_mxfp4::dequantize_named(&b, &s, DType::F32, Layout::Transposed, Some(name))
                .map_err(|x| ModelError::mxfp4(name, x))?;
        let we = we.to_dtype(DType::F32)?;
        let diff = (&we - &back)?;
        err_sq += diff.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        ref_sq += we.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        max_abs = max_abs.max(diff.abs()?.max_all()?.to_scalar::<f32>()? as f64);
        let bytes = b.flatten_all()?.to_vec1::<u8>()?;
        blocks.write_all(&bytes).map_err(write_err)?;
        scales.extend(s.flatten_all()?.to_vec1::<u8>()?);
    }
    let rel_rms = if ref_sq > 0.0 {
        (err_sq / ref_sq).sqrt()
    } else {
        0.0
    };
    Ok((
        scales,
        QuantError {
            name: name.to_string(),
            rel_rms,
            max_abs,
            requantized: true,
        },
    ))
}
