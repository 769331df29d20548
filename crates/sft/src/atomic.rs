//! Atomic file writes: write to a temporary file in the destination directory, fsync, then
//! rename over the destination, so a crash never leaves a half-written file behind.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::error::{Result, SftError};

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` atomically (temp file in the same directory + rename).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| SftError::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| SftError::io(tmp, e))
    })
}

/// Writes `value` as pretty JSON (2-space indent, trailing newline) to `path` atomically.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| SftError::format(path, format!("cannot serialize JSON: {e}")))?;
    text.push('\n');
    write_bytes(path, text.as_bytes())
}

/// Lets `write` fill a temporary path next to `path`, fsyncs it, then renames it to `path`.
/// On error the temporary file is removed and `path` is left untouched.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = parent_dir(path);
    // Keep the extension: some writers (image encoders) pick the format from it.
    let suffix = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tmp-").suffix(&suffix);
    // 0666 minus the umask (the kernel applies it at creation), like any other created file,
    // instead of tempfile's private 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder.tempfile_in(dir).map_err(|e| SftError::io(dir, e))?;
    write(tmp.path())?;
    let f = std::fs::File::open(tmp.path()).map_err(|e| SftError::io(tmp.path(), e))?;
    f.sync_all().map_err(|e| SftError::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| SftError::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_destination_intact() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_json(&p, &serde_json::json!({"a": 1})).unwrap();
        let r = write_with(&p, |_| Err(SftError::Trainer("boom".into())));
        assert!(r.is_err());
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text, "{\n  \"a\": 1\n}\n");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn written_files_follow_the_umask_not_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let p = dir.path().join("atomic.json");
        write_json(&p, &1).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), mode(&plain));
    }
}
