//! The local Hugging Face hub cache layout, shared by every reader of cached datasets (the
//! trainer's dataset loader and the GSM8K reader): a repo directory
//! `datasets--org--name/` holds `refs/<name>` files naming commits and `snapshots/<commit>/`.
//!
//! Walked by hand rather than through the `hf-hub` crate: its offline `Cache`/`CacheRepo` API
//! resolves one file of a known name through `refs/` (`CacheRepo::get`), but a dataset here is a
//! snapshot *directory* whose split files (`data/train-*.parquet`, `*.jsonl`) must be listed, and
//! a `revision` may be a commit hash; both need the snapshot path itself, which hf-hub does not
//! expose. Its default features would also pull in an HTTP/TLS stack this offline tool never
//! uses.

use std::path::{Path, PathBuf};

use crate::error::{EvalError, Result};

/// The snapshot directory inside hub cache repo directory `repo_dir`: `snapshots/<revision>`
/// when `revision` (default `main`) is a snapshot name, else the commit that
/// `refs/<revision>` names, else — with no `revision` given and no `refs/main` — the only
/// snapshot.
///
/// # Errors
/// A ref naming a missing snapshot, an unknown revision, or (no revision, no ref) not exactly
/// one snapshot; each names the directory at fault.
pub fn resolve_snapshot(repo_dir: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let snapshots = repo_dir.join("snapshots");
    let rev = revision.unwrap_or("main");
    let direct = snapshots.join(rev);
    if direct.is_dir() {
        return Ok(direct);
    }
    let ref_file = repo_dir.join("refs").join(rev);
    if let Ok(hash) = std::fs::read_to_string(&ref_file) {
        let dir = snapshots.join(hash.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
        return Err(EvalError::Invalid {
            context: ref_file.display().to_string(),
            expected: format!("a commit with a directory in {}", snapshots.display()),
            found: format!("{}, which is not there", hash.trim()),
        });
    }
    if revision.is_none() {
        let entries: Vec<PathBuf> = std::fs::read_dir(&snapshots)
            .map_err(|e| EvalError::io(&snapshots, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        if let [only] = entries.as_slice() {
            return Ok(only.clone());
        }
        return Err(EvalError::Invalid {
            context: snapshots.display().to_string(),
            expected: "refs/main naming a snapshot, or exactly one snapshot".to_string(),
            found: format!("{} snapshots and no refs/main", entries.len()),
        });
    }
    Err(EvalError::Invalid {
        context: snapshots.display().to_string(),
        expected: format!("a snapshot or a refs/ entry for revision `{rev}`"),
        found: "neither".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_then_only_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        assert_eq!(
            resolve_snapshot(repo, None).unwrap(),
            repo.join("snapshots/abc")
        );
        assert!(resolve_snapshot(repo, Some("v1")).is_err());
        std::fs::create_dir_all(repo.join("snapshots/def")).unwrap();
        assert!(
            resolve_snapshot(repo, None).is_err(),
            "two snapshots, no ref"
        );
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "def\n").unwrap();
        assert_eq!(
            resolve_snapshot(repo, None).unwrap(),
            repo.join("snapshots/def")
        );
        assert_eq!(
            resolve_snapshot(repo, Some("abc")).unwrap(),
            repo.join("snapshots/abc")
        );
        std::fs::write(repo.join("refs/main"), "zzz").unwrap();
        let e = resolve_snapshot(repo, None).unwrap_err().to_string();
        assert!(e.contains("zzz"), "{e}");
    }
}
