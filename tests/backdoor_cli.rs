//! `examples/backdoor_defense.rs`: evaluation rows that are also training rows are refused with
//! a sentence naming the shared rows and `--allow-overlap`, exit status 1, before any training.

mod common;
use common::{run, tmp};

#[test]
fn overlap_with_the_evaluation_rows_exits_1() {
    let dir = tmp("backdoor-overlap");
    let out_dir = dir.join("out");
    let out = run(
        "backdoor_defense",
        &[
            "--eval-split",
            "train",
            "--report-to",
            "none",
            "--output-dir",
            out_dir.to_str().expect("utf-8 path"),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("shares 16 source row(s) with the evaluation rows"),
        "{err}"
    );
    assert!(err.contains("(train, 0)"), "{err}");
    assert!(err.contains("--allow-overlap"), "{err}");
    assert!(!err.contains("Overlap {"), "no Debug output: {err}");
    assert!(!out_dir.exists(), "nothing trained or written");
    let _ = std::fs::remove_dir_all(&dir);
}
