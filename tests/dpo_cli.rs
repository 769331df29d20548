//! `examples/dpo.rs` through `gptoss::cli::run`: errors print as sentences with exit status 1,
//! and a preference file without a valid row names the file and its bad rows, writing nothing.

mod common;
use common::{run, tmp};

#[test]
fn a_bad_dataset_is_a_sentence_and_exit_1() {
    let dir = tmp("dpo-bad");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let model = dir.join("model");
    let made = run(
        "make_checkpoint",
        &[
            "--arch",
            "tiny",
            "--out",
            model.to_str().expect("utf-8 path"),
        ],
    );
    assert!(made.status.success());
    let data = dir.join("prefs.jsonl");
    std::fs::write(&data, "{\"prompt\": \"Q\", \"chosen\": \" a\"}\nnot json\n").expect("write");
    let out_dir = dir.join("out");
    let out = run(
        "dpo",
        &[
            "--model",
            model.to_str().expect("utf-8 path"),
            "--dataset",
            data.to_str().expect("utf-8 path"),
            "--dtype",
            "f32",
            "--report-to",
            "none",
            "--output-dir",
            out_dir.to_str().expect("utf-8 path"),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") || err.contains("\nerror: "),
        "{err}"
    );
    assert!(
        err.contains("prefs.jsonl:1: missing field `rejected`"),
        "{err}"
    );
    assert!(err.contains("prefs.jsonl:2:"), "{err}");
    assert!(!err.contains("Dataset("), "no Debug output: {err}");
    assert!(!out_dir.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
