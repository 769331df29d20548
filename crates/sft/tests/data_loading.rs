//! Dataset readers (fixtures: scripts/fixtures/sft/make_parquet_fixture.py, written by pyarrow).

use std::path::{Path, PathBuf};

use gptoss_sft::data::{load, resolve_hub_snapshot, LoadOptions, MULTILINGUAL_THINKING};
use gptoss_sft::SftError;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn parquet_matches_jsonl() {
    let pq = load(&fixture("mt_tiny.parquet"), LoadOptions::default()).unwrap();
    let js = load(&fixture("mt_tiny.jsonl"), LoadOptions::default()).unwrap();
    assert_eq!(pq.rows.len(), 3);
    assert_eq!(pq.rows, js.rows);
    let r = &pq.rows[2];
    assert_eq!(r.reasoning_language.as_deref(), Some("Spanish"));
    assert_eq!(r.messages.len(), 3);
    assert_eq!(r.messages[0].role, "system");
    assert!(r.messages[0]
        .content
        .starts_with("reasoning language: Spanish\n\n"));
    assert_eq!(r.messages[0].thinking, None);
    assert_eq!(r.messages[2].content, "La capital de Italia es Roma.");
    assert_eq!(
        r.messages[2].thinking.as_deref(),
        Some("El usuario pregunta por la capital de Italia: Roma.")
    );
    assert_eq!(
        r.final_answer.as_deref(),
        Some("La capital de Italia es Roma.")
    );
}

#[test]
fn malformed_parquet_row_is_named_or_skipped() {
    let err = load(&fixture("mt_bad.parquet"), LoadOptions::default()).unwrap_err();
    match &err {
        SftError::Row { file, row, .. } => {
            assert!(file.ends_with("mt_bad.parquet"));
            assert_eq!(*row, 2);
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("mt_bad.parquet: row 2:"), "{err}");
    let ds = load(
        &fixture("mt_bad.parquet"),
        LoadOptions {
            skip_malformed: true,
        },
    )
    .unwrap();
    assert_eq!(ds.rows.len(), 2);
    assert_eq!(ds.skipped.len(), 1);
    assert_eq!(ds.skipped[0].row, 2);
}

#[test]
fn jsonl_and_json_array_errors_name_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(fixture("mt_tiny.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    lines.insert(1, "");
    lines.insert(2, r#"{"messages": "oops"}"#);
    let p = dir.path().join("d.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    let err = load(&p, LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("d.jsonl: row 3:"), "{err}");
    let ds = load(
        &p,
        LoadOptions {
            skip_malformed: true,
        },
    )
    .unwrap();
    assert_eq!((ds.rows.len(), ds.skipped.len()), (3, 1));

    let values: Vec<serde_json::Value> = good
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let arr = dir.path().join("d.json");
    std::fs::write(&arr, serde_json::to_string(&values).unwrap()).unwrap();
    assert_eq!(load(&arr, LoadOptions::default()).unwrap().rows.len(), 3);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"messages": []}]"#).unwrap();
    let err = load(&bad, LoadOptions::default()).unwrap_err().to_string();
    assert!(
        err.contains("bad.json: row 1: `messages` is empty"),
        "{err}"
    );
}

#[test]
fn hub_cache_snapshot_offline() {
    // <cache>/datasets--HuggingFaceH4--Multilingual-Thinking/{refs/main, snapshots/<rev>/data/*.parquet}
    let cache = tempfile::tempdir().unwrap();
    let repo = cache
        .path()
        .join("datasets--HuggingFaceH4--Multilingual-Thinking");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let data = repo.join("snapshots").join(rev).join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    // The hub cache stores files as blobs with symlinks in the snapshot.
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::copy(fixture("mt_tiny.parquet"), repo.join("blobs/abc")).unwrap();
    std::os::unix::fs::symlink(
        repo.join("blobs/abc"),
        data.join("train-00000-of-00001.parquet"),
    )
    .unwrap();
    std::fs::copy(
        fixture("mt_bad.parquet"),
        data.join("test-00000-of-00001.parquet"),
    )
    .unwrap();

    let snap = resolve_hub_snapshot(cache.path(), MULTILINGUAL_THINKING, None).unwrap();
    assert!(snap.ends_with(rev));
    // Only the train split is read.
    let ds = load(&snap, LoadOptions::default()).unwrap();
    assert_eq!(ds.rows.len(), 3);
    assert_eq!(ds.files.len(), 1);
    // The repo dir itself also resolves through refs/main.
    assert_eq!(load(&repo, LoadOptions::default()).unwrap().rows.len(), 3);
    let missing = resolve_hub_snapshot(cache.path(), "org/none", None).unwrap_err();
    assert!(missing.to_string().contains("not in the local hub cache"));
}
