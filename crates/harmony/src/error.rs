//! The crate's single error type.

/// Everything that can go wrong while tokenizing, rendering or parsing.
#[derive(Debug, thiserror::Error)]
pub enum HarmonyError {
    /// A tokenizer file could not be read or understood.
    #[error("tokenizer file {path}: {message}")]
    TokenizerFile {
        /// The file at fault.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The built-in o200k ranks could not be turned into a tokenizer.
    #[error("building the o200k_harmony tokenizer failed: {0}")]
    TokenizerBuild(String),
    /// The tokenizer lacks a control token that the harmony format needs.
    #[error("tokenizer has no id for the control token {token} (the harmony format needs it)")]
    MissingControlToken {
        /// The token text, e.g. `<|start|>`.
        token: String,
    },
    /// Text could not be tokenized.
    #[error("encoding text failed: {0}")]
    Encode(String),
    /// A token id is not part of the vocabulary.
    #[error("token id {id} at position {position} is not in the vocabulary")]
    UnknownToken {
        /// The unknown id.
        id: u32,
        /// Its index in the input sequence.
        position: usize,
    },
    /// Decoded bytes are not valid UTF-8 (use a lossy decode for model output).
    #[error("decoded tokens are not valid UTF-8 (first invalid byte at offset {valid_up_to})")]
    InvalidUtf8 {
        /// Number of leading bytes that were valid.
        valid_up_to: usize,
    },
    /// A conversation cannot be rendered as asked.
    #[error("cannot render message {index}: {message}")]
    Render {
        /// Index of the message in the conversation.
        index: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A dataset row (`messages` schema) is malformed.
    #[error("messages[{index}].{field}: {message}")]
    InvalidRow {
        /// Index of the message in the row.
        index: usize,
        /// Field at fault (`role`, `thinking`, ...).
        field: String,
        /// What was expected.
        message: String,
    },
    /// The chat template raised an exception or failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// A completion could not be parsed (strict mode).
    #[error("parse error at token position {position}: {message}")]
    Parse {
        /// Index of the offending token in the fed sequence.
        position: usize,
        /// What was expected.
        message: String,
    },
    /// JSON (de)serialization failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Result alias for this crate.
pub type Result<T, E = HarmonyError> = std::result::Result<T, E>;
