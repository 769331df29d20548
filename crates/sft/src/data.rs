//! The HuggingFaceH4/Multilingual-Thinking schema and its readers: JSONL, JSON arrays, Parquet
//! (the files HF datasets publishes) and a local HF hub cache (offline).
//!
//! A row that does not fit the schema is an error naming the file and the 1-based row (for
//! JSONL: the line), or, with [`LoadOptions::skip_malformed`], skipped and recorded in
//! [`Dataset::skipped`].
//!
//! ```no_run
//! use gptoss_sft::data::{load, LoadOptions};
//! let ds = load("train.jsonl".as_ref(), LoadOptions::default()).unwrap();
//! println!("{} rows", ds.rows.len());
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SftError};

/// The HF hub id of the dataset the recipe trains on.
pub const MULTILINGUAL_THINKING: &str = "HuggingFaceH4/Multilingual-Thinking";

/// Roles accepted in `messages`.
pub const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// One chat message of the `messages` column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// The message text (for the assistant: the final answer).
    pub content: String,
    /// The assistant's chain of thought (analysis channel); `None` for other roles.
    #[serde(default)]
    pub thinking: Option<String>,
}

/// One dataset row. Only `messages` is used for training; the flat columns are kept for
/// reference and may be absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// e.g. `German`.
    #[serde(default)]
    pub reasoning_language: Option<String>,
    /// Developer instructions.
    #[serde(default)]
    pub developer: Option<String>,
    /// The user prompt.
    #[serde(default)]
    pub user: Option<String>,
    /// The assistant's reasoning (analysis channel).
    #[serde(default)]
    pub analysis: Option<String>,
    /// The assistant's answer (final channel).
    #[serde(default, rename = "final")]
    pub final_answer: Option<String>,
    /// A reference answer for evaluation (GSM8K's `answer` column, `... #### 42`); not trained on.
    #[serde(default)]
    pub answer: Option<String>,
    /// The conversation: system, user, assistant (with `thinking`).
    pub messages: Vec<Message>,
}

impl Row {
    /// Checks what serde cannot: non-empty `messages`, known roles.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        for (i, m) in self.messages.iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(format!(
                    "messages[{i}].role is `{}`, expected one of {ROLES:?}",
                    m.role
                ));
            }
        }
        Ok(())
    }

    /// Parses and validates one row from a JSON value.
    pub fn from_json(value: serde_json::Value) -> std::result::Result<Self, String> {
        let row: Row = serde_json::from_value(value).map_err(|e| e.to_string())?;
        row.validate()?;
        Ok(row)
    }
}

/// File formats the loader understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// One JSON object per line (`.jsonl`, `.ndjson`).
    Jsonl,
    /// A JSON array of objects (`.json`; a `.json` file holding JSON lines is read as JSONL).
    Json,
    /// Apache Parquet (`.parquet`).
    Parquet,
}

impl SourceFormat {
    /// The format implied by the file extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Some(SourceFormat::Jsonl),
            "json" => Some(SourceFormat::Json),
            "parquet" => Some(SourceFormat::Parquet),
            _ => None,
        }
    }
}

/// Loader options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Skip (and count) malformed rows instead of failing.
    pub skip_malformed: bool,
}

/// A malformed row that was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRow {
    /// The file.
    pub file: PathBuf,
    /// 1-based row (JSONL: line number).
    pub row: usize,
    /// Why it was rejected.
    pub reason: String,
}

/// Rows loaded from one or more files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// The valid rows, in file order.
    pub rows: Vec<Row>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// Rows skipped under [`LoadOptions::skip_malformed`].
    pub skipped: Vec<SkippedRow>,
}

impl Dataset {
    /// Number of valid rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no valid row was loaded.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn accept(
        &mut self,
        file: &Path,
        row: usize,
        parsed: std::result::Result<Row, String>,
        opts: LoadOptions,
    ) -> Result<()> {
        match parsed {
            Ok(r) => self.rows.push(r),
            Err(message) if opts.skip_malformed => self.skipped.push(SkippedRow {
                file: file.to_path_buf(),
                row,
                reason: message,
            }),
            Err(message) => {
                return Err(SftError::Row {
                    file: file.to_path_buf(),
                    row,
                    message,
                })
            }
        }
        Ok(())
    }
}

/// Prints to stderr how many malformed rows of `source` were skipped, then the first 20 as
/// `file:row: reason` and how many more there are ([`skipped_listing`]).
pub fn report_skipped(source: &str, skipped: &[SkippedRow]) {
    if skipped.is_empty() {
        return;
    }
    eprintln!("{}", skipped_listing(source, skipped));
}

/// `skipped N malformed rows of SOURCE:` then the first 20 as `  file:row: reason` lines and
/// `  ... and M more` (what [`report_skipped`] prints, and what an error about them says).
pub fn skipped_listing(source: &str, skipped: &[SkippedRow]) -> String {
    let mut out = format!("skipped {} malformed rows of {source}:", skipped.len());
    for s in skipped.iter().take(20) {
        out.push_str(&format!("\n  {}:{}: {}", s.file.display(), s.row, s.reason));
    }
    if skipped.len() > 20 {
        out.push_str(&format!("\n  ... and {} more", skipped.len() - 20));
    }
    out
}

/// Loads a dataset from `path`: a `.jsonl`/`.json`/`.parquet` file, a directory of such files
/// (an HF snapshot directory: its `train*` files if any, e.g. `data/train-00000-of-00001.parquet`),
/// or an HF hub cache repo directory (`datasets--Org--Name`, resolved through `refs/main`).
pub fn load(path: &Path, opts: LoadOptions) -> Result<Dataset> {
    let mut ds = Dataset::default();
    for f in path_files(path)? {
        load_file(&f, opts, &mut ds)?;
    }
    Ok(ds)
}

/// The dataset files [`load`] reads for `path` (the file itself, or a directory's / hub cache
/// repo's dataset files).
pub fn path_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| SftError::io(path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let dir = if path.join("snapshots").is_dir() {
        resolve_snapshot(path, None)?
    } else {
        path.to_path_buf()
    };
    let files = dataset_files(&dir)?;
    if files.is_empty() {
        return Err(SftError::Dataset(format!(
            "{}: no .parquet, .jsonl or .json files",
            dir.display()
        )));
    }
    Ok(files)
}

/// Loads `spec`: an existing path (see [`load`]), or else an HF dataset id such as
/// `HuggingFaceH4/Multilingual-Thinking` (optionally `@revision`) looked up in the local hub
/// cache ([`hub_cache_dir`]); nothing is downloaded.
pub fn load_source(spec: &str, opts: LoadOptions) -> Result<Dataset> {
    let mut ds = Dataset::default();
    for f in source_files(spec)? {
        load_file(&f, opts, &mut ds)?;
    }
    Ok(ds)
}

/// The dataset files [`load_source`] reads for `spec` (an existing path, or an HF dataset id in
/// the local hub cache), in order.
pub fn source_files(spec: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(spec);
    if path.exists() {
        return path_files(path);
    }
    let (repo, rev) = match spec.split_once('@') {
        Some((r, v)) => (r, Some(v)),
        None => (spec, None),
    };
    if repo.split('/').count() != 2 {
        return Err(SftError::Dataset(format!(
            "`{spec}` is neither an existing path nor an `org/name` dataset id"
        )));
    }
    let cache = hub_cache_dir().ok_or_else(|| {
        SftError::Dataset("no HF hub cache directory (set HF_HUB_CACHE or HF_HOME)".into())
    })?;
    let snapshot = resolve_hub_snapshot(&cache, repo, rev)?;
    path_files(&snapshot)
}

/// Appends the rows of one file to `ds` (format from the extension).
pub fn load_file(path: &Path, opts: LoadOptions, ds: &mut Dataset) -> Result<()> {
    visit_records(path, &mut |row, value| {
        ds.accept(path, row, value.and_then(Row::from_json), opts)
    })?;
    ds.files.push(path.to_path_buf());
    Ok(())
}

/// One record of a dataset file as JSON, or why it could not be read as JSON (a JSONL line that
/// is not JSON); passed to the visitor of [`visit_records`] with its 1-based row number.
pub type RecordVisitor<'a> =
    dyn FnMut(usize, std::result::Result<serde_json::Value, String>) -> Result<()> + 'a;

/// Calls `visit(row, record)` for every record of one `.jsonl`/`.json`/`.parquet` file, in order
/// (1-based rows; JSONL: the line number, blank lines skipped), whatever its schema: the readers
/// behind [`load_file`], for other row schemas. A file that is not of its format as a whole is
/// an error.
pub fn visit_records(path: &Path, visit: &mut RecordVisitor<'_>) -> Result<()> {
    let format = SourceFormat::from_path(path).ok_or_else(|| {
        SftError::format(
            path,
            "unknown extension (expected .jsonl, .json or .parquet)",
        )
    })?;
    match format {
        SourceFormat::Jsonl => read_jsonl(path, visit),
        SourceFormat::Json => read_json(path, visit),
        SourceFormat::Parquet => read_parquet(path, visit),
    }
}

fn read_jsonl(path: &Path, visit: &mut RecordVisitor<'_>) -> Result<()> {
    let f = File::open(path).map_err(|e| SftError::io(path, e))?;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| SftError::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<serde_json::Value>(&line)
            .map_err(|e| format!("invalid JSON: {e}"));
        visit(i + 1, parsed)?;
    }
    Ok(())
}

fn read_json(path: &Path, visit: &mut RecordVisitor<'_>) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| SftError::io(path, e))?;
    if text.trim_start().starts_with('{') {
        // HF datasets also accepts JSON lines in a .json file.
        return read_jsonl(path, visit);
    }
    let values: Vec<serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| SftError::format(path, format!("expected a JSON array of rows: {e}")))?;
    for (i, v) in values.into_iter().enumerate() {
        visit(i + 1, Ok(v))?;
    }
    Ok(())
}

fn read_parquet(path: &Path, visit: &mut RecordVisitor<'_>) -> Result<()> {
    let f = File::open(path).map_err(|e| SftError::io(path, e))?;
    let reader = SerializedFileReader::new(f)
        .map_err(|e| SftError::format(path, format!("not a readable Parquet file: {e}")))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| SftError::format(path, format!("cannot read rows: {e}")))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| SftError::Row {
            file: path.to_path_buf(),
            row: i + 1,
            message: format!("cannot decode Parquet record: {e}"),
        })?;
        visit(i + 1, Ok(row.to_json_value()))?;
    }
    Ok(())
}

/// The dataset files under `dir` (recursive, sorted, hidden entries ignored); when some file
/// names start with `train`, only those (the train split).
pub fn dataset_files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| SftError::io(dir, e))?;
        for e in entries {
            let e = e.map_err(|e| SftError::io(dir, e))?;
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            // metadata() follows the hub cache's symlinks into blobs/.
            let meta = std::fs::metadata(&p).map_err(|e| SftError::io(&p, e))?;
            if meta.is_dir() {
                walk(&p, out)?;
            } else if SourceFormat::from_path(&p).is_some() {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    let is_train = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().starts_with("train"))
            .unwrap_or(false)
    };
    if files.iter().any(is_train) {
        files.retain(is_train);
    }
    Ok(files)
}

/// The local HF hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// The snapshot directory of dataset `repo_id` (`org/name`) in hub cache `cache_dir`:
/// `<cache>/datasets--org--name/snapshots/<rev>`; `revision` is a commit hash or a ref name
/// (default `main`, read from `refs/`).
pub fn resolve_hub_snapshot(
    cache_dir: &Path,
    repo_id: &str,
    revision: Option<&str>,
) -> Result<PathBuf> {
    let repo_dir = cache_dir.join(format!("datasets--{}", repo_id.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(SftError::Dataset(format!(
            "dataset `{repo_id}` is not in the local hub cache ({} does not exist; \
             nothing is downloaded)",
            repo_dir.display()
        )));
    }
    resolve_snapshot(&repo_dir, revision)
}

/// The snapshot directory inside a hub cache repo directory (`datasets--org--name`): see
/// [`gptoss_eval::hub::resolve_snapshot`].
fn resolve_snapshot(repo_dir: &Path, revision: Option<&str>) -> Result<PathBuf> {
    Ok(gptoss_eval::hub::resolve_snapshot(repo_dir, revision)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_validation() {
        let ok = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(Row::from_json(ok).is_ok());
        let bad_role = serde_json::json!({"messages": [{"role": "bot", "content": "hi"}]});
        assert!(Row::from_json(bad_role)
            .unwrap_err()
            .contains("messages[0].role"));
        let empty = serde_json::json!({"messages": []});
        assert!(Row::from_json(empty).is_err());
        let missing = serde_json::json!({"user": "x"});
        assert!(Row::from_json(missing).unwrap_err().contains("messages"));
    }
}
