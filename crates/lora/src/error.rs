//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong in `gptoss-lora`. Each variant names the file, field, module or tensor key
/// at fault and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A `LoraConfig` field holds a value PEFT would reject.
    #[error("invalid LoRA config field `{field}`: {reason}")]
    InvalidConfig {
        /// The adapter_config.json field name.
        field: &'static str,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// A PEFT feature this crate does not implement (DoRA, LoftQ, modules_to_save, ...).
    #[error("unsupported LoRA feature `{field}`: {reason}")]
    Unsupported {
        /// The adapter_config.json field (or module) concerned.
        field: String,
        /// Why it is unsupported.
        reason: String,
    },
    /// A `target_modules` / `target_parameters` entry that matched nothing in the model.
    #[error("{field} entry {target:?} matched no {what} of the model (available e.g.: {example})")]
    TargetNotFound {
        /// `target_modules` or `target_parameters`.
        field: &'static str,
        /// The config entry.
        target: String,
        /// What kind of thing was searched ("linear module", "expert parameter").
        what: &'static str,
        /// One name that would have matched, to help the user.
        example: String,
    },
    /// A target matched a module or parameter that LoRA cannot adapt here.
    #[error("{field} entry {target:?} matched {name:?}, which cannot be adapted: {reason}")]
    UnsupportedTarget {
        /// `target_modules` or `target_parameters`.
        field: &'static str,
        /// The config entry.
        target: String,
        /// The matched module or parameter name.
        name: String,
        /// Why it cannot be adapted.
        reason: &'static str,
    },
    /// A regular expression in the config does not compile.
    #[error(
        "config field `{field}` holds the regex {pattern:?}, which does not compile: {source}"
    )]
    Regex {
        /// The config field.
        field: &'static str,
        /// The pattern.
        pattern: String,
        /// The regex error.
        #[source]
        source: regex::Error,
    },
    /// An adapter tensor has the wrong shape for the model / config.
    #[error("adapter tensor {key:?}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Adapter file key.
        key: String,
        /// Expected shape (from the model and config).
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// An adapter tensor with an unsupported dtype.
    #[error(
        "adapter tensor {key:?}: dtype {found:?} is not a float type (expected f32, bf16 or f16)"
    )]
    BadDType {
        /// Adapter file key.
        key: String,
        /// The dtype found.
        found: candle_core::DType,
    },
    /// The adapter file holds keys the config does not target.
    #[error("adapter file {path:?} holds {count} key(s) the config does not target, e.g. {key:?}")]
    UnknownKeys {
        /// The adapter file.
        path: PathBuf,
        /// The first unknown key (sorted).
        key: String,
        /// How many unknown keys there are.
        count: usize,
    },
    /// The adapter file lacks a key the config targets.
    #[error("adapter file {path:?} lacks {count} key(s) the config targets, e.g. {key:?} (shape {expected:?})")]
    MissingKeys {
        /// The adapter file.
        path: PathBuf,
        /// The first missing key (sorted).
        key: String,
        /// Its expected shape.
        expected: Vec<usize>,
        /// How many keys are missing.
        count: usize,
    },
    /// A LoRA state operation in the wrong state (merging twice, unmerging unmerged weights, ...).
    #[error("{0}")]
    State(String),
    /// File system error.
    #[error("{path:?}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// adapter_config.json that does not parse.
    #[error("{path:?}: invalid adapter_config.json: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file that cannot be read or written.
    #[error("{path:?}: safetensors: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The underlying error, as text.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model crate reported an error (while installing hooks, reading or writing weights).
    #[error("model: {0}")]
    Model(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, LoraError>;
