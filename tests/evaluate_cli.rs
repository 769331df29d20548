//! Evaluation as a user runs it: the demo (`finetune_multilingual` with no `--model`, cut to two
//! steps) evaluates its held-out rows during training and compares base and adapter at the end;
//! `evaluate --adapter <demo output>` rebuilds the same held-out rows from the run's
//! `training_args.json`, finds the base through `base_model_name_or_path`, and writes
//! eval.json / eval.md / the PNG whose adapter eval loss equals the trainer's at the last step.

mod common;
use common::{run, tmp};

fn json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn demo_evaluates_and_evaluate_reproduces_its_eval_loss() {
    let dir = tmp("evaluate");
    let out_dir = dir.join("demo");
    let o = out_dir.to_str().unwrap();
    let demo = run(
        "finetune_multilingual",
        &[
            "--output-dir",
            o,
            "--max-steps",
            "2",
            "--eval-steps",
            "2",
            "--eval-rows",
            "2",
            "--max-new-tokens",
            "6",
            "--report-to",
            "none",
            "--progress-bar",
            "false",
            "--no-generate",
        ],
    );
    assert!(demo.status.success(), "the demo failed");
    let stdout = String::from_utf8_lossy(&demo.stdout);
    assert!(
        stdout.contains("'eval_loss'"),
        "no eval during training:\n{stdout}"
    );
    assert!(
        stdout.contains("fine-tuned"),
        "no base/adapter comparison:\n{stdout}"
    );
    for f in [
        "eval/eval.json",
        "eval/eval.md",
        "eval/reasoning_language.png",
        "training_args.json",
    ] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let state = json(&out_dir.join("trainer_state.json"));
    let logged = state["log_history"]
        .as_array()
        .and_then(|h| h.iter().find_map(|e| e["eval_loss"].as_f64()))
        .expect("an eval_loss entry in trainer_state.json");

    let report = dir.join("report");
    let ev = run(
        "evaluate",
        &[
            "--adapter",
            o,
            "--rows",
            "2",
            "--max-new-tokens",
            "6",
            "--out",
            report.to_str().unwrap(),
        ],
    );
    assert!(ev.status.success(), "evaluate failed");
    let eval = json(&report.join("eval.json"));
    let models = eval["models"].as_array().expect("models");
    assert_eq!(models.len(), 2, "base and adapter");
    let loss = |i: usize| {
        models[i]["summary"]["eval_loss"]["loss"]
            .as_f64()
            .expect("eval loss")
    };
    assert!(
        (loss(1) - logged).abs() < 1e-6,
        "evaluate {} vs trainer {logged}",
        loss(1)
    );
    assert!(loss(0) > loss(1), "training lowered the held-out loss");
    assert_eq!(models[1]["summary"]["rows"], 2);
    assert!(std::fs::read_to_string(report.join("eval.md"))
        .unwrap()
        .contains("eval loss"));
    let _ = std::fs::remove_dir_all(&dir);
}
