//! Helpers shared by the unit tests of the crate.

use candle_core::Tensor;

/// `max |a − b| / max(1, max |b|)` over all elements (f32): an error relative to the reference's
/// scale, so tolerances hold for random inputs of any magnitude.
pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_dtype(candle_core::DType::F32)?;
    let b = b.to_dtype(candle_core::DType::F32)?;
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let s = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(d / s)
}

/// The first CUDA device as the crate's code runs it ([`crate::cuda_device`]), errors as candle's.
#[cfg(feature = "cuda")]
pub(crate) fn gpu() -> candle_core::Result<candle_core::Device> {
    crate::cuda_device(0).map_err(|e| candle_core::Error::Msg(e.to_string()))
}
