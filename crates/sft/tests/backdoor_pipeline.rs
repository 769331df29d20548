//! The backdoor pipeline through the library on a tiny configuration (CPU, seconds): every
//! stage is trained and evaluated, the report has one row per stage with every metric, and the
//! report files parse back; training data overlapping the evaluation rows is refused before
//! anything is trained.

use gptoss_eval::backdoor::report::{
    BackdoorReport, BACKDOOR_REPORT_JSON, BACKDOOR_REPORT_MD, STAGE_AFTER_ATTACK,
    STAGE_AFTER_CLEAN_SFT, STAGE_AFTER_CRITICAL_COT_SFT, STAGE_AFTER_DPO, STAGE_AFTER_REATTACK,
    STAGE_BASE,
};
use gptoss_eval::EvalError;
use gptoss_harmony::HarmonyTokenizer;
use gptoss_sft::backdoor::{run_pipeline, PipelineConfig};
use gptoss_sft::SftError;

mod backdoor_support;
use backdoor_support::tiny;

#[test]
fn every_stage_is_trained_evaluated_and_reported() {
    let dir = tempfile::tempdir().expect("scratch dir");
    let cfg = tiny(dir.path());
    let tok = HarmonyTokenizer::o200k_harmony().expect("tokenizer");
    let out = run_pipeline(&cfg, &tok, &candle_core::Device::Cpu).expect("pipeline");
    let labels: Vec<&str> = out.report.stages.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            STAGE_BASE,
            STAGE_AFTER_ATTACK,
            STAGE_AFTER_CLEAN_SFT,
            STAGE_AFTER_CRITICAL_COT_SFT,
            STAGE_AFTER_DPO,
            STAGE_AFTER_REATTACK
        ]
    );
    for s in &out.report.stages {
        let m = &s.metrics;
        // 2 evaluation rows, each once untriggered and once triggered.
        assert_eq!((m.untriggered, m.triggered), (2, 2), "{}", s.label);
        assert_eq!(m.clean_accuracy.total, 2, "{}", s.label);
        for p in [&m.asr, &m.bdr, &m.tdr, &m.triggered_accuracy] {
            assert_eq!(p.total, 2, "{}", s.label);
        }
    }
    // The files: JSON parses back to the same report; Markdown has the header and every row.
    assert_eq!(out.files.json, dir.path().join(BACKDOOR_REPORT_JSON));
    let back = BackdoorReport::read_json(&out.files.json).expect("report json");
    assert_eq!(back, out.report);
    let md = std::fs::read_to_string(dir.path().join(BACKDOOR_REPORT_MD)).expect("report md");
    assert!(
        md.contains("| stage | clean accuracy | ASR | BDR | TDR | triggered accuracy |"),
        "{md}"
    );
    for label in labels {
        assert!(md.contains(&format!("| {label} |")), "{label}: {md}");
    }
    assert!(md.contains("Residual ASR after the last stage (after re-attack)"));
    assert!(!md.to_lowercase().contains("immune"));
    // Each stage's generations and the data files with their manifests.
    assert!(dir.path().join("generations_after_DPO.jsonl").is_file());
    for f in ["poisoned", "clean", "critical_cot", "preference_pairs"] {
        assert!(dir
            .path()
            .join(format!("data/{f}.jsonl.manifest.json"))
            .is_file());
    }
    // The base stage trained every parameter and saved a whole model.
    assert!(dir.path().join("base/model.safetensors").is_file());
}

#[test]
fn overlapping_training_data_is_refused_before_training() {
    let dir = tempfile::tempdir().expect("scratch dir");
    let cfg = PipelineConfig {
        eval_split: "train".into(),
        ..tiny(dir.path())
    };
    let tok = HarmonyTokenizer::o200k_harmony().expect("tokenizer");
    let err = run_pipeline(&cfg, &tok, &candle_core::Device::Cpu).expect_err("overlap");
    match &err {
        SftError::Eval(EvalError::Overlap { count, .. }) => assert_eq!(*count, 2),
        other => panic!("expected an overlap error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("(train, 0)") && text.contains("--allow-overlap"),
        "{text}"
    );
    assert!(
        !dir.path().join("base_init").exists(),
        "nothing was trained"
    );
    assert!(!dir.path().join("data").exists(), "nothing was written");
}
