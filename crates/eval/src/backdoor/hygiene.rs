//! Split hygiene: provenance of every generated file, and refusal of training data that
//! overlaps the evaluation rows.
//!
//! Every generated row carries `source_split` and `source_row_id`; every generated file
//! `<file>` has a sidecar `<file>.manifest.json` ([`Manifest`]: the rows' splits and ids, the
//! generator's name, seed and configuration). Before training on generated data,
//! [`check_overlap`] compares its source rows with the evaluation rows and refuses any shared
//! `(split, row id)` pair unless overlap is explicitly allowed; [`ensure_not_test_split`] is
//! what the defense builders call so that defense data cannot be built from the test split by
//! default.
//!
//! ```
//! use gptoss_eval::backdoor::hygiene::{check_overlap, RowKey};
//! let train = vec![RowKey::new("train", 1), RowKey::new("test", 4)];
//! let eval = vec![RowKey::new("test", 4), RowKey::new("test", 5)];
//! assert!(check_overlap(&train, &eval, false).is_err());
//! assert_eq!(check_overlap(&train, &eval, true)?, vec![RowKey::new("test", 4)]);
//! # Ok::<(), gptoss_eval::EvalError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::gsm8k::TEST_SPLIT;
use super::listing::{first_and_count, LIST_LIMIT};
use crate::error::{EvalError, Result};
use crate::report::write_atomic;

/// The suffix of a data file's sidecar manifest.
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// The `format` tag of manifests.
pub const MANIFEST_FORMAT: &str = "gptoss-backdoor-manifest/1";

/// A source row: its split and its id within the split.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowKey {
    /// The split.
    pub split: String,
    /// The row id.
    pub row_id: usize,
}

impl RowKey {
    /// The key of row `row_id` of `split`.
    pub fn new(split: &str, row_id: usize) -> RowKey {
        RowKey {
            split: split.to_string(),
            row_id,
        }
    }
}

impl fmt::Display for RowKey {
    /// `(test, 17)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.split, self.row_id)
    }
}

/// Something that comes from one source row.
pub trait Keyed {
    /// Its source row.
    fn key(&self) -> RowKey;
}

impl<T: Keyed + ?Sized> Keyed for &T {
    fn key(&self) -> RowKey {
        (**self).key()
    }
}

impl Keyed for RowKey {
    fn key(&self) -> RowKey {
        self.clone()
    }
}

/// Something that lists source rows: a slice of [`Keyed`] items or a [`Manifest`].
pub trait SourceRows {
    /// The source rows, in order, repeats kept.
    fn source_keys(&self) -> Vec<RowKey>;
}

impl<T: Keyed> SourceRows for [T] {
    fn source_keys(&self) -> Vec<RowKey> {
        self.iter().map(Keyed::key).collect()
    }
}

impl<T: Keyed> SourceRows for Vec<T> {
    fn source_keys(&self) -> Vec<RowKey> {
        self.as_slice().source_keys()
    }
}

/// What generated a file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GeneratorInfo {
    /// The generator (`poison`, `clean_defense`, `critical_cot`, `preference_pairs`, …).
    pub name: String,
    /// This crate's version.
    pub version: String,
    /// The seed.
    pub seed: u64,
    /// The generator's configuration (e.g. a serialized
    /// [`PoisonConfig`](super::poison::PoisonConfig)).
    pub config: serde_json::Value,
}

impl GeneratorInfo {
    /// Info for generator `name` with `seed` and the serialized `config`.
    pub fn new(name: &str, seed: u64, config: &impl Serialize) -> Result<GeneratorInfo> {
        let config = serde_json::to_value(config).map_err(|e| EvalError::Invalid {
            context: format!("generator {name}: configuration"),
            expected: "a configuration serializable as JSON".to_string(),
            found: e.to_string(),
        })?;
        Ok(GeneratorInfo {
            name: name.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            seed,
            config,
        })
    }
}

/// The sidecar `<file>.manifest.json` of a generated file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// The data file's name.
    pub file: String,
    /// Rows in the file.
    pub rows: usize,
    /// Rows with a triggered question.
    pub triggered_rows: usize,
    /// Rows whose assistant turn follows the backdoor.
    pub poisoned_rows: usize,
    /// Split → sorted source row ids.
    pub splits: BTreeMap<String, Vec<usize>>,
    /// What generated the file.
    pub generator: GeneratorInfo,
}

impl Manifest {
    /// The manifest of file `file` (its name is kept) holding rows from `keys`.
    pub fn new(
        file: &Path,
        keys: &[RowKey],
        triggered_rows: usize,
        poisoned_rows: usize,
        generator: GeneratorInfo,
    ) -> Manifest {
        let mut splits: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for k in keys {
            splits.entry(k.split.clone()).or_default().push(k.row_id);
        }
        for ids in splits.values_mut() {
            ids.sort_unstable();
        }
        Manifest {
            format: MANIFEST_FORMAT.to_string(),
            file: file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            rows: keys.len(),
            triggered_rows,
            poisoned_rows,
            splits,
            generator,
        }
    }
}

impl SourceRows for Manifest {
    fn source_keys(&self) -> Vec<RowKey> {
        self.splits
            .iter()
            .flat_map(|(split, ids)| ids.iter().map(move |&id| RowKey::new(split, id)))
            .collect()
    }
}

/// `<data>.manifest.json`.
pub fn manifest_path(data: &Path) -> PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(MANIFEST_SUFFIX);
    PathBuf::from(name)
}

/// Writes `manifest` next to `data` (atomically, pretty JSON); returns its path.
pub fn write_manifest(data: &Path, manifest: &Manifest) -> Result<PathBuf> {
    let path = manifest_path(data);
    let mut text = serde_json::to_string_pretty(manifest).map_err(|e| EvalError::Json {
        path: path.clone(),
        message: format!("cannot serialize the manifest: {e}"),
    })?;
    text.push('\n');
    write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// Reads a manifest file.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| EvalError::Json {
        path: path.to_path_buf(),
        message: format!("not a backdoor data manifest ({e})"),
    })?;
    if m.format != MANIFEST_FORMAT {
        return Err(EvalError::Invalid {
            context: format!("{}: field `format`", path.display()),
            expected: format!("{MANIFEST_FORMAT:?}"),
            found: format!("{:?}", m.format),
        });
    }
    Ok(m)
}

/// The source rows of a generated JSONL file: from its manifest when there is one, else from
/// each row's `source_split` and `source_row_id` keys (an error names the line lacking them).
pub fn read_source_keys(data: &Path) -> Result<Vec<RowKey>> {
    let manifest = manifest_path(data);
    if manifest.is_file() {
        return Ok(read_manifest(&manifest)?.source_keys());
    }
    let f = std::fs::File::open(data).map_err(|e| EvalError::io(data, e))?;
    let mut keys = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| EvalError::io(data, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let context = || format!("{} line {}", data.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| EvalError::Invalid {
            context: context(),
            expected: "a JSON object".to_string(),
            found: format!("invalid JSON ({e})"),
        })?;
        let split = v.get("source_split").and_then(|s| s.as_str());
        let id = v
            .get("source_row_id")
            .and_then(|s| s.as_u64())
            .and_then(|n| usize::try_from(n).ok());
        match (split, id) {
            (Some(split), Some(id)) => keys.push(RowKey::new(split, id)),
            _ => {
                return Err(EvalError::Invalid {
                    context: context(),
                    expected: "string `source_split` and integer `source_row_id` (generated \
                               files carry them), or a sidecar manifest"
                        .to_string(),
                    found: "a row without them".to_string(),
                })
            }
        }
    }
    Ok(keys)
}

/// The `(split, row id)` pairs shared by `train` and `eval`, sorted and deduplicated; an
/// [`EvalError::Overlap`] listing the first [`LIST_LIMIT`] and the count when there are any,
/// unless `allow_overlap`.
pub fn check_overlap<A, B>(train: &A, eval: &B, allow_overlap: bool) -> Result<Vec<RowKey>>
where
    A: SourceRows + ?Sized,
    B: SourceRows + ?Sized,
{
    check_overlap_named(
        train,
        "the training data",
        eval,
        "the evaluation rows",
        allow_overlap,
    )
}

/// [`check_overlap`] with names for both sides in the error (e.g. the file paths).
pub fn check_overlap_named<A, B>(
    train: &A,
    train_name: &str,
    eval: &B,
    eval_name: &str,
    allow_overlap: bool,
) -> Result<Vec<RowKey>>
where
    A: SourceRows + ?Sized,
    B: SourceRows + ?Sized,
{
    let eval: BTreeSet<RowKey> = eval.source_keys().into_iter().collect();
    let shared: BTreeSet<RowKey> = train
        .source_keys()
        .into_iter()
        .filter(|k| eval.contains(k))
        .collect();
    let shared: Vec<RowKey> = shared.into_iter().collect();
    if shared.is_empty() || allow_overlap {
        return Ok(shared);
    }
    Err(EvalError::Overlap {
        train: train_name.to_string(),
        eval: eval_name.to_string(),
        count: shared.len(),
        listing: first_and_count(&shared, LIST_LIMIT),
    })
}

/// Refuses rows of the test split ([`TEST_SPLIT`]) for training data built as `context`
/// unless `allow_test_split`: an [`EvalError::TestSplit`] listing the first row ids.
pub fn ensure_not_test_split<R>(rows: &R, allow_test_split: bool, context: &str) -> Result<()>
where
    R: SourceRows + ?Sized,
{
    if allow_test_split {
        return Ok(());
    }
    let ids: Vec<usize> = rows
        .source_keys()
        .into_iter()
        .filter(|k| k.split == TEST_SPLIT)
        .map(|k| k.row_id)
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    Err(EvalError::TestSplit {
        context: context.to_string(),
        split: TEST_SPLIT.to_string(),
        count: ids.len(),
        listing: format!("row ids {}", first_and_count(&ids, LIST_LIMIT)),
    })
}
