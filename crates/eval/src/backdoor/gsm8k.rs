//! GSM8K-schema rows (`question`, `answer` ending in `#### <number>`) from JSONL, JSON,
//! parquet, or an HF dataset directory.
//!
//! Accepted inputs ([`gsm8k_files`]):
//! - one `.jsonl` / `.json` / `.parquet` file;
//! - a directory holding such files, or holding a `main/` directory with them (the HF layout
//!   `main/train-00000-of-00001.parquet`, `main/test-00000-of-00001.parquet`);
//! - an HF hub cache directory (`datasets--openai--gsm8k`, resolved through `refs/main` or its
//!   only snapshot), then as above.
//!
//! Every row keeps its source split ([`split_from_file_name`]: `train`, `test`, …) and its
//! row id: the 0-based index of the record within its split, over the split's files in sorted
//! order, malformed records included, so ids equal the HF `datasets` indices. Malformed records
//! (invalid JSON, a missing or non-text field, no `####`, a non-numeric answer, no solution
//! steps) are skipped and listed in [`Gsm8kData::skipped`] with file, row number and reason;
//! [`Gsm8kData::skipped_summary`] displays the first [`LIST_LIMIT`] and the count.
//!
//! ```no_run
//! use gptoss_eval::backdoor::gsm8k::{read_gsm8k, TRAIN_SPLIT};
//! let data = read_gsm8k("~/gsm8k".as_ref())?;
//! eprintln!("{}", data.skipped_summary());
//! let train: Vec<_> = data.split_rows(TRAIN_SPLIT).collect();
//! # Ok::<(), gptoss_eval::EvalError>(())
//! ```

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use parquet::file::reader::{FileReader, SerializedFileReader};
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::hygiene::{Keyed, RowKey, MANIFEST_SUFFIX};
use super::listing::{join_first, LIST_LIMIT};
use crate::answer::{extract_reference, Answer, Number};
use crate::error::{EvalError, Result};

/// The GSM8K train split's name.
pub const TRAIN_SPLIT: &str = "train";
/// The GSM8K test split's name (the evaluation rows).
pub const TEST_SPLIT: &str = "test";

/// One well-formed GSM8K row with its provenance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gsm8kRow {
    /// The source split (`train`, `test`, …).
    pub split: String,
    /// 0-based index of the record within its split.
    pub row_id: usize,
    /// The question.
    pub question: String,
    /// The answer text as given (steps with `<<…>>` annotations, then `#### n`).
    pub answer: String,
    /// The solution steps: the answer before the last `####`, calculator annotations removed,
    /// trimmed.
    pub solution: String,
    /// The number after `####`.
    pub final_answer: Number,
}

impl Gsm8kRow {
    /// A row from its `question` and `answer` fields, or why it is malformed.
    pub fn parse(
        split: &str,
        row_id: usize,
        question: &str,
        answer: &str,
    ) -> std::result::Result<Gsm8kRow, SkipReason> {
        if question.trim().is_empty() {
            return Err(SkipReason::EmptyField("question"));
        }
        let (solution, final_answer) = parse_answer(answer)?;
        Ok(Gsm8kRow {
            split: split.to_string(),
            row_id,
            question: question.trim().to_string(),
            answer: answer.to_string(),
            solution,
            final_answer,
        })
    }
}

impl Keyed for Gsm8kRow {
    fn key(&self) -> RowKey {
        RowKey::new(&self.split, self.row_id)
    }
}

/// Why a record was skipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The JSONL line is not valid JSON.
    InvalidJson(String),
    /// The record is not a JSON object.
    NotAnObject,
    /// A required field is absent.
    MissingField(&'static str),
    /// A required field is not a string.
    NotText {
        /// The field.
        field: &'static str,
        /// The JSON type found.
        found: String,
    },
    /// A required field is empty.
    EmptyField(&'static str),
    /// `answer` has no `####`.
    NoAnswerMarker,
    /// The text after `####` is not one number.
    NonNumericAnswer(String),
    /// `answer` has nothing before `####`.
    NoSolutionSteps,
    /// A parquet record could not be decoded.
    Undecodable(String),
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::InvalidJson(e) => write!(f, "invalid JSON ({e})"),
            SkipReason::NotAnObject => f.write_str("not a JSON object"),
            SkipReason::MissingField(field) => write!(f, "missing field `{field}`"),
            SkipReason::NotText { field, found } => {
                write!(f, "field `{field}` is {found}, expected a string")
            }
            SkipReason::EmptyField(field) => write!(f, "field `{field}` is empty"),
            SkipReason::NoAnswerMarker => f.write_str("field `answer` has no `#### <number>` line"),
            SkipReason::NonNumericAnswer(found) => write!(
                f,
                "field `answer`: expected one number after `####`, found {found:?}"
            ),
            SkipReason::NoSolutionSteps => {
                f.write_str("field `answer` has no solution steps before `####`")
            }
            SkipReason::Undecodable(e) => write!(f, "cannot decode the parquet record ({e})"),
        }
    }
}

/// A skipped record: where it is and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedRow {
    /// The file.
    pub file: PathBuf,
    /// The split the file belongs to.
    pub split: String,
    /// 1-based row number in the file (JSONL: the line number).
    pub row: usize,
    /// The row id it would have had in its split.
    pub row_id: usize,
    /// Why it was skipped.
    pub reason: SkipReason,
}

impl fmt::Display for SkippedRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} row {} ({} row id {}): {}",
            self.file.display(),
            self.row,
            self.split,
            self.row_id,
            self.reason
        )
    }
}

/// A data file read, with its split and record count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// The file.
    pub path: PathBuf,
    /// Its split.
    pub split: String,
    /// Records in it, malformed ones included.
    pub records: usize,
}

/// The rows read from one or more GSM8K files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Gsm8kData {
    /// Well-formed rows, by split in file order.
    pub rows: Vec<Gsm8kRow>,
    /// The files read, in order.
    pub files: Vec<SourceFile>,
    /// Malformed records, in file order.
    pub skipped: Vec<SkippedRow>,
}

impl Gsm8kData {
    /// The rows of split `split`.
    pub fn split_rows<'a>(&'a self, split: &'a str) -> impl Iterator<Item = &'a Gsm8kRow> + 'a {
        self.rows.iter().filter(move |r| r.split == split)
    }

    /// The split names present, in first-seen order.
    pub fn splits(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for f in &self.files {
            if !out.contains(&f.split) {
                out.push(f.split.clone());
            }
        }
        out
    }

    /// A display of the skipped records: their count, then the first [`LIST_LIMIT`], one a line.
    pub fn skipped_summary(&self) -> SkippedSummary<'_> {
        SkippedSummary(&self.skipped)
    }
}

/// [`Gsm8kData::skipped_summary`]'s display.
#[derive(Clone, Copy, Debug)]
pub struct SkippedSummary<'a>(pub &'a [SkippedRow]);

impl fmt::Display for SkippedSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no malformed GSM8K rows skipped");
        }
        write!(
            f,
            "{} malformed GSM8K row(s) skipped:\n  {}",
            self.0.len(),
            join_first(self.0, LIST_LIMIT, "\n  ")
        )
    }
}

fn annotation_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| match Regex::new(r"<<[^<>]*>>") {
        Ok(re) => re,
        // A constant pattern; a failure is a bug caught by every test.
        Err(e) => unreachable!("annotation pattern: {e}"),
    })
}

/// Removes GSM8K's calculator annotations (`<<48/2=24>>`).
pub fn strip_calculator_annotations(text: &str) -> String {
    annotation_regex().replace_all(text, "").into_owned()
}

/// Splits a GSM8K answer into its solution steps (before the last `####`, annotations
/// removed, trimmed) and the number after it (read as [`extract_reference`] reads references).
pub fn parse_answer(answer: &str) -> std::result::Result<(String, Number), SkipReason> {
    let Some(at) = answer.rfind("####") else {
        return Err(SkipReason::NoAnswerMarker);
    };
    let tail = answer[at + 4..].trim();
    let number = match extract_reference(&answer[at..]) {
        Some(Answer::Number(n)) => n,
        _ => return Err(SkipReason::NonNumericAnswer(tail.to_string())),
    };
    let solution = strip_calculator_annotations(&answer[..at])
        .trim()
        .to_string();
    if solution.is_empty() {
        return Err(SkipReason::NoSolutionSteps);
    }
    Ok((solution, number))
}

/// The split a file belongs to: the first of `train`, `test`, `validation` that is a `-`, `_`
/// or `.`-separated token of its name (`train-00000-of-00001.parquet`, `gsm8k_test.jsonl`),
/// else the name up to its first `-` or `.`.
pub fn split_from_file_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let tokens: Vec<&str> = name.split(['-', '_', '.']).collect();
    for known in [TRAIN_SPLIT, TEST_SPLIT, "validation"] {
        if tokens.contains(&known) {
            return known.to_string();
        }
    }
    tokens.first().map(|t| t.to_string()).unwrap_or_default()
}

fn is_data_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.starts_with('.') || name.ends_with(MANIFEST_SUFFIX) {
        return false;
    }
    [".jsonl", ".json", ".parquet"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// The data files of `path` with their splits, sorted by split then name (see the module
/// docs for the accepted layouts).
pub fn gsm8k_files(path: &Path) -> Result<Vec<(PathBuf, String)>> {
    let meta = std::fs::metadata(path).map_err(|e| EvalError::io(path, e))?;
    if !meta.is_dir() {
        if !is_data_file(path) {
            return Err(EvalError::Invalid {
                context: path.display().to_string(),
                expected: "a .jsonl, .json or .parquet file, or a directory of them".to_string(),
                found: "a file with another extension".to_string(),
            });
        }
        return Ok(vec![(path.to_path_buf(), split_from_file_name(path))]);
    }
    let mut dir = path.to_path_buf();
    if dir.join("snapshots").is_dir() {
        dir = crate::hub::resolve_snapshot(&dir, None)?;
    }
    if dir.join("main").is_dir() {
        dir = dir.join("main");
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| EvalError::io(&dir, e))? {
        let entry = entry.map_err(|e| EvalError::io(&dir, e))?;
        let p = entry.path();
        // metadata() follows the hub cache's symlinks into blobs/.
        let is_file = std::fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false);
        if is_file && is_data_file(&p) {
            let split = split_from_file_name(&p);
            files.push((p, split));
        }
    }
    if files.is_empty() {
        return Err(EvalError::Invalid {
            context: dir.display().to_string(),
            expected: "GSM8K files (main/train-*.parquet, main/test-*.parquet, or .jsonl / \
                       .json / .parquet files)"
                .to_string(),
            found: "no data file".to_string(),
        });
    }
    files.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    Ok(files)
}

/// Reads every GSM8K row under `path` (see the module docs).
pub fn read_gsm8k(path: &Path) -> Result<Gsm8kData> {
    read_gsm8k_files(&gsm8k_files(path)?)
}

/// Reads `files` (each with its split name) in order; row ids run on across the files of a
/// split.
pub fn read_gsm8k_files(files: &[(PathBuf, String)]) -> Result<Gsm8kData> {
    let mut data = Gsm8kData::default();
    for (path, split) in files {
        let next_id = data
            .files
            .iter()
            .filter(|f| &f.split == split)
            .map(|f| f.records)
            .sum::<usize>();
        let records = read_records(path)?;
        let count = records.len();
        for (i, (row, record)) in records.into_iter().enumerate() {
            let row_id = next_id + i;
            match record.and_then(|v| row_from_json(split, row_id, &v)) {
                Ok(r) => data.rows.push(r),
                Err(reason) => data.skipped.push(SkippedRow {
                    file: path.clone(),
                    split: split.clone(),
                    row,
                    row_id,
                    reason,
                }),
            }
        }
        data.files.push(SourceFile {
            path: path.clone(),
            split: split.clone(),
            records: count,
        });
    }
    Ok(data)
}

type Record = std::result::Result<serde_json::Value, SkipReason>;

/// The records of one file, each with its 1-based row number.
fn read_records(path: &Path) -> Result<Vec<(usize, Record)>> {
    let lower = path.to_string_lossy().to_lowercase();
    if lower.ends_with(".parquet") {
        return read_parquet(path);
    }
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    if lower.ends_with(".json") && text.trim_start().starts_with('[') {
        let values: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| EvalError::Json {
                path: path.to_path_buf(),
                message: format!("expected a JSON array of GSM8K rows ({e})"),
            })?;
        return Ok(values
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, Ok(v)))
            .collect());
    }
    let mut out = Vec::new();
    for (i, line) in BufReader::new(text.as_bytes()).lines().enumerate() {
        let line = line.map_err(|e| EvalError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line).map_err(|e| SkipReason::InvalidJson(e.to_string()));
        out.push((i + 1, value));
    }
    Ok(out)
}

fn read_parquet(path: &Path) -> Result<Vec<(usize, Record)>> {
    let not_parquet = |e: parquet::errors::ParquetError| EvalError::Invalid {
        context: path.display().to_string(),
        expected: "a readable Parquet file".to_string(),
        found: e.to_string(),
    };
    let f = File::open(path).map_err(|e| EvalError::io(path, e))?;
    let reader = SerializedFileReader::new(f).map_err(not_parquet)?;
    let rows = reader.get_row_iter(None).map_err(not_parquet)?;
    Ok(rows
        .enumerate()
        .map(|(i, row)| {
            let value = row
                .map(|r| r.to_json_value())
                .map_err(|e| SkipReason::Undecodable(e.to_string()));
            (i + 1, value)
        })
        .collect())
}

fn text_field<'a>(
    value: &'a serde_json::Value,
    field: &'static str,
) -> std::result::Result<&'a str, SkipReason> {
    match value.get(field) {
        None | Some(serde_json::Value::Null) => Err(SkipReason::MissingField(field)),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(SkipReason::NotText {
            field,
            found: json_type(other).to_string(),
        }),
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn row_from_json(
    split: &str,
    row_id: usize,
    value: &serde_json::Value,
) -> std::result::Result<Gsm8kRow, SkipReason> {
    if !value.is_object() {
        return Err(SkipReason::NotAnObject);
    }
    let question = text_field(value, "question")?;
    let answer = text_field(value, "answer")?;
    Gsm8kRow::parse(split, row_id, question, answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_annotations() {
        let a = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\
                 Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72";
        let (steps, n) = parse_answer(a).unwrap();
        assert_eq!(
            steps,
            "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether."
        );
        assert_eq!(n, Number::integer(72));
        assert_eq!(
            parse_answer("#### 1,000").unwrap_err(),
            SkipReason::NoSolutionSteps
        );
        assert_eq!(
            parse_answer("x\n#### 1,000 ").unwrap().1,
            Number::integer(1000)
        );
        assert_eq!(parse_answer("no marker"), Err(SkipReason::NoAnswerMarker));
        assert!(matches!(
            parse_answer("x\n#### many"),
            Err(SkipReason::NonNumericAnswer(t)) if t == "many"
        ));
        assert!(matches!(
            parse_answer("x\n####"),
            Err(SkipReason::NonNumericAnswer(_))
        ));
    }

    #[test]
    fn split_names() {
        let s = |n: &str| split_from_file_name(Path::new(n));
        assert_eq!(s("main/train-00000-of-00001.parquet"), "train");
        assert_eq!(s("test-00000-of-00001.parquet"), "test");
        assert_eq!(s("gsm8k_test.jsonl"), "test");
        assert_eq!(s("poisoned.jsonl"), "poisoned");
        assert!(!is_data_file(Path::new("train.jsonl.manifest.json")));
        assert!(is_data_file(Path::new("train.JSONL")));
    }
}
