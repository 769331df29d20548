//! The crate's one error type.

use candle_core::DType;

/// Everything that can go wrong when decoding or encoding MXFP4 tensors.
///
/// Shape errors name the tensor (as given through the `name` argument of the
/// functions, e.g. `model.layers.0.mlp.experts.gate_up_proj_blocks`, or a generic
/// `blocks`/`scales` when none was given) and both the shape found and the shape expected.
#[derive(Debug, thiserror::Error)]
pub enum Mxfp4Error {
    /// A tensor has the wrong number of dimensions or the wrong size in some dimension.
    #[error("tensor `{name}`: shape {actual:?} does not match {expected} (other tensor `{other_name}` has shape {other:?})")]
    ShapeMismatch {
        /// The tensor at fault.
        name: String,
        /// Its shape.
        actual: Vec<usize>,
        /// What was expected, in words (e.g. `blocks.shape[..-1] = [32, 5760, 90]`).
        expected: String,
        /// The tensor it was compared with.
        other_name: String,
        /// That tensor's shape.
        other: Vec<usize>,
    },
    /// A tensor has an unsupported dtype.
    #[error("tensor `{name}`: dtype {actual:?}, expected {expected}")]
    DType {
        /// The tensor at fault.
        name: String,
        /// Its dtype.
        actual: DType,
        /// What was expected, in words (e.g. `u8`, `f32, bf16 or f16`).
        expected: &'static str,
    },
    /// A raw byte slice (or output buffer) does not hold the number of elements its shape says.
    #[error("tensor `{name}`: {actual} elements given, shape {shape:?} needs {expected}")]
    Length {
        /// The buffer at fault.
        name: String,
        /// Elements (or bytes) given.
        actual: usize,
        /// Elements (or bytes) needed.
        expected: usize,
        /// The shape the buffer should have.
        shape: Vec<usize>,
    },
    /// The input of `quantize` holds a NaN or an infinity, which MXFP4 cannot encode.
    #[error("tensor `{name}`: non-finite value {value} at flat index {index}")]
    NonFinite {
        /// The tensor at fault.
        name: String,
        /// Flat (row-major) index of the first offending element.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The two input tensors live on different devices.
    #[error("tensors `{name}` and `{other_name}` are on different devices ({location} vs {other_location})")]
    Device {
        /// First tensor.
        name: String,
        /// Its device.
        location: String,
        /// Second tensor.
        other_name: String,
        /// Its device.
        other_location: String,
    },
    /// An error from candle (allocation, device transfer, CUDA launch, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Mxfp4Error>;
