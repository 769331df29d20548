//! The crate's error type.

use std::path::PathBuf;

/// Every error of `gptoss-model`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file (config or index) could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A config field has an invalid value.
    #[error("config field `{field}`: {reason}")]
    Config {
        /// The field at fault.
        field: String,
        /// What was expected.
        reason: String,
    },
    /// A safetensors file could not be parsed or written.
    #[error("{path}: safetensors: {reason}")]
    Safetensors {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor `{name}` (expected shape {expected:?}) is missing from checkpoint {dir}")]
    MissingTensor {
        /// HF name of the tensor.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// The checkpoint holds a tensor the model does not know.
    #[error("unexpected tensor `{name}` (shape {shape:?}) in {file}")]
    UnexpectedTensor {
        /// HF name of the tensor.
        name: String,
        /// Its shape in the file.
        shape: Vec<usize>,
        /// The file holding it.
        file: PathBuf,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` in {file}: shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// HF name of the tensor.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor has a dtype that cannot be used.
    #[error("tensor `{name}` in {file}: unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// HF name of the tensor.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// The dtype found.
        dtype: String,
    },
    /// MXFP4 dequantization failed.
    #[error("tensor `{name}`: MXFP4 dequantization failed: {reason}")]
    Mxfp4 {
        /// HF name of the (dequantized) tensor.
        name: String,
        /// The error reported by `gptoss-mxfp4`.
        reason: String,
    },
    /// An argument given to a model function is invalid.
    #[error("invalid argument `{arg}`: {reason}")]
    InvalidArgument {
        /// The argument at fault.
        arg: String,
        /// What was expected.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn config(field: &str, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
    /// [`Self::Mxfp4`] for tensor `name`: the error `gptoss-mxfp4` reported, or why the tensor
    /// cannot be MXFP4.
    pub(crate) fn mxfp4(name: &str, err: impl std::fmt::Display) -> Self {
        Self::Mxfp4 {
            name: name.to_string(),
            reason: err.to_string(),
        }
    }
    pub(crate) fn arg(arg: &str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            arg: arg.to_string(),
            reason: reason.into(),
        }
    }
}
