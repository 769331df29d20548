//! The crate's single error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while scoring generations or writing reports.
///
/// Every variant names what is at fault (a file, a row, a field) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be written or read back.
    #[error("{}: {message}", path.display())]
    Json {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong, and what was expected.
        message: String,
    },
    /// A language name is not one of [`Language`](crate::Language)'s.
    #[error("{context}: unknown language {found:?}; expected one of {expected}")]
    UnknownLanguage {
        /// Where the name came from (e.g. `row 3, system message, "reasoning language:" line`).
        context: String,
        /// The name as written.
        found: String,
        /// The accepted names.
        expected: String,
    },
    /// A value does not have the expected form.
    #[error("{context}: expected {expected}, found {found}")]
    Invalid {
        /// Where the value is (file, row, field).
        context: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// The Harmony tokenizer failed (e.g. while encoding hand-made channel texts).
    #[error("{context}: {source}")]
    Harmony {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: gptoss_harmony::HarmonyError,
    },
    /// Training data shares source rows with the evaluation rows
    /// ([`check_overlap`](crate::backdoor::hygiene::check_overlap)).
    #[error(
        "{train} shares {count} source row(s) with {eval}: {listing}; build the training data \
         from another split (e.g. GSM8K train), or set allow_overlap (--allow-overlap) to accept"
    )]
    Overlap {
        /// What the training side is (a file or a description).
        train: String,
        /// What the evaluation side is.
        eval: String,
        /// How many `(split, row id)` pairs overlap.
        count: usize,
        /// The first overlapping pairs and how many more.
        listing: String,
    },
    /// Training data was to be built from rows of the evaluation split
    /// ([`ensure_not_test_split`](crate::backdoor::hygiene::ensure_not_test_split)).
    #[error(
        "{context}: {count} row(s) come from the `{split}` split: {listing}; expected training \
         rows only (use the train split, or set allow_test_split to accept)"
    )]
    TestSplit {
        /// What was being built.
        context: String,
        /// The refused split name.
        split: String,
        /// How many rows come from it.
        count: usize,
        /// The first such row ids and how many more.
        listing: String,
    },
    /// Drawing or encoding a chart failed.
    #[error("{}: cannot draw the chart: {message}", path.display())]
    Plot {
        /// The image file being written.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl EvalError {
    /// An [`EvalError::Io`] for `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        EvalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// An [`EvalError::Plot`] for `path`.
    pub fn plot(path: &Path, message: impl std::fmt::Display) -> Self {
        EvalError::Plot {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
