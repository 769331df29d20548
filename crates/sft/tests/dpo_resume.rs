//! DPO runs that stop and resume: a run interrupted after step 2 (its checkpoint is all a
//! `kill -9` would leave, the in-memory state being dropped) and resumed from `checkpoint-2` in a
//! fresh model logs the same per-step losses, rewards and log-probs as an uninterrupted run; a
//! dataset without a valid row fails with the file, the rows and why, before anything is written.
//! Own test binary: the Ctrl-C flag is process-wide.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use gptoss_harmony::HarmonyTokenizer;
use gptoss_lora::{LoraConfig, LoraModel, TargetModules};
use gptoss_model::{write_synthetic_checkpoint, Config, GptOssForCausalLM, SyntheticOptions};
use gptoss_sft::config::{ReportTo, TrainingConfig};
use gptoss_sft::dpo::config::dpo_training_defaults;
use gptoss_sft::dpo::{
    load_preferences, run_dpo, tokenize_rows, DpoConfig, DpoLogRecord, DpoObserver, DpoTrainer,
    PreferenceExample,
};
use gptoss_sft::logging::LogEntry;
use gptoss_sft::trainer::{interrupt, TrainerOptions};
use gptoss_sft::{Result, SftError};

fn err(e: impl std::fmt::Display) -> SftError {
    SftError::Trainer(e.to_string())
}

fn model_config() -> Config {
    let mut c = Config::gpt_oss_tiny();
    c.initializer_range = 0.1;
    c
}

fn write_model(dir: &Path) -> Result<PathBuf> {
    let model_dir = dir.join("model");
    let opts = SyntheticOptions {
        seed: 0,
        mxfp4_experts: false,
        ..SyntheticOptions::default()
    };
    write_synthetic_checkpoint(&model_dir, &model_config(), &opts).map_err(err)?;
    gptoss_sft::trainer::pipeline::write_tokenizer_files(&model_dir)?;
    Ok(model_dir)
}

/// A fresh model with fresh (seeded) adapters: what a restarted process has.
fn load_model(model_dir: &Path) -> Result<(GptOssForCausalLM, LoraModel)> {
    let mut model = gptoss_model::load(model_dir, DType::F32, &Device::Cpu).map_err(err)?;
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
        target_parameters: Some(vec!["1.mlp.experts.down_proj".into()]),
        ..LoraConfig::default()
    };
    let lora = LoraModel::new(&mut model, lora, 42).map_err(err)?;
    Ok((model, lora))
}

fn pairs() -> Result<Vec<PreferenceExample>> {
    let f = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dpo/pairs_text.jsonl"
    );
    let ds = load_preferences(f, true)?;
    let tok = HarmonyTokenizer::o200k_harmony()?;
    Ok(tokenize_rows(&tok, &ds.rows[..4], "2025-08-05", Some(256))?.examples)
}

fn config(out: &Path) -> TrainingConfig {
    TrainingConfig {
        output_dir: out.to_path_buf(),
        learning_rate: 1e-2,
        per_device_train_batch_size: 1,
        gradient_accumulation_steps: 1,
        max_steps: Some(4),
        gradient_checkpointing: true,
        logging_steps: 1,
        save_steps: 0,
        report_to: ReportTo::None,
        progress_bar: false,
        max_length: 256,
        ..dpo_training_defaults()
    }
}

/// Presses Ctrl-C after step `at`.
struct CtrlCAt(u64);
impl DpoObserver for CtrlCAt {
    fn on_step_end(&mut self, step: u64, _loss: f64) -> Result<()> {
        if step == self.0 {
            interrupt::request();
        }
        Ok(())
    }
}

fn train(model_dir: &Path, cfg: TrainingConfig, stop_at: u64) -> Result<Vec<DpoLogRecord>> {
    let (model, lora) = load_model(model_dir)?;
    let opts = TrainerOptions {
        pad_token_id: 199_999,
        lm_head_chunk: 256,
    };
    let trainer = DpoTrainer::new(
        &model,
        &lora,
        cfg,
        DpoConfig::default(),
        pairs()?,
        Device::Cpu,
    )?
    .with_options(opts);
    let out = trainer.train(&mut CtrlCAt(stop_at))?;
    assert_eq!(out.interrupted, stop_at < 4);
    Ok(out
        .log_history
        .iter()
        .filter_map(|e| match e {
            LogEntry::Dpo(r) => Some(r.clone()),
            _ => None,
        })
        .collect())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

#[test]
fn an_interrupted_run_resumes_to_the_same_steps() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let model_dir = write_model(tmp.path())?;
    let whole = train(&model_dir, config(&tmp.path().join("whole")), u64::MAX)?;
    assert_eq!(whole.len(), 4);

    let out = tmp.path().join("resumed");
    let first = train(&model_dir, config(&out), 2)?;
    assert_eq!(first.len(), 2);
    assert!(out.join("checkpoint-2/optimizer.safetensors").is_file());
    let mut cfg = config(&out);
    cfg.resume_from_checkpoint = Some(out.join("checkpoint-2"));
    let resumed = train(&model_dir, cfg, u64::MAX)?;
    // The resumed history holds the two restored records, then steps 3 and 4.
    assert_eq!(resumed.len(), 4);
    for (a, b) in resumed.iter().zip(&whole) {
        assert_eq!(a.step, b.step);
        for (key, x, y) in [
            ("loss", a.loss, b.loss),
            ("grad_norm", a.grad_norm, b.grad_norm),
            ("learning_rate", a.learning_rate, b.learning_rate),
            ("rewards/chosen", a.rewards_chosen, b.rewards_chosen),
            ("rewards/rejected", a.rewards_rejected, b.rewards_rejected),
            ("rewards/margins", a.rewards_margins, b.rewards_margins),
            ("logps/chosen", a.logps_chosen, b.logps_chosen),
            ("logps/rejected", a.logps_rejected, b.logps_rejected),
            ("num_tokens", a.num_tokens, b.num_tokens),
        ] {
            assert!(
                close(x, y),
                "step {} `{key}`: resumed {x}, whole {y}",
                a.step
            );
        }
    }
    Ok(())
}

#[test]
fn a_dataset_without_valid_rows_names_them_and_writes_nothing() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let data = tmp.path().join("bad.jsonl");
    let mut rows: Vec<String> = (0..25)
        .map(|i| format!(r#"{{"prompt": "Q{i}", "chosen": " a"}}"#))
        .collect();
    rows.push("not json".into());
    std::fs::write(&data, rows.join("\n")).map_err(|e| SftError::io(&data, e))?;
    let model_dir = write_model(tmp.path())?;
    let mut model = gptoss_model::load(&model_dir, DType::F32, &Device::Cpu).map_err(err)?;
    let out = tmp.path().join("out");
    let mut cfg = config(&out);
    cfg.dataset = Some(data.display().to_string());
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let e = match run_dpo(&mut model, &cfg, &DpoConfig::default(), &tok) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("training on no valid row"),
    };
    assert!(
        e.contains("bad.jsonl") && e.contains("no valid preference row"),
        "{e}"
    );
    assert!(e.contains("skipped 26 malformed rows"), "{e}");
    assert!(e.contains("bad.jsonl:1: missing field `rejected`"), "{e}");
    assert!(
        e.contains("bad.jsonl:20:") && !e.contains("bad.jsonl:21:"),
        "{e}"
    );
    assert!(e.contains("... and 6 more"), "{e}");
    assert!(!out.exists(), "the output dir was created");
    // --strict: the first bad row is the error.
    let strict = DpoConfig {
        strict: true,
        ..DpoConfig::default()
    };
    match run_dpo(&mut model, &cfg, &strict, &tok) {
        Err(SftError::Row { row: 1, file, .. }) => assert_eq!(file, data),
        Err(e) => panic!("expected the first row's error, got {e}"),
        Ok(_) => panic!("training on no valid row"),
    }
    assert!(!out.exists());
    Ok(())
}

#[test]
fn max_length_past_the_model_context_is_a_config_error_before_any_data() -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let model_dir = write_model(tmp.path())?;
    let mut model = gptoss_model::load(&model_dir, DType::F32, &Device::Cpu).map_err(err)?;
    let context = model.config().max_position_embeddings;
    let out = tmp.path().join("out");
    let mut cfg = config(&out);
    cfg.max_length = context + 1;
    // the dataset does not exist: the context check must come first
    cfg.dataset = Some(tmp.path().join("absent.jsonl").display().to_string());
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let e = match run_dpo(&mut model, &cfg, &DpoConfig::default(), &tok) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("trained past the model's context"),
    };
    assert!(
        e.contains("model.max_length") && e.contains(&format!("{}", context + 1)),
        "{e}"
    );
    assert!(
        e.contains(&format!("max_position_embeddings is {context}")),
        "{e}"
    );
    assert!(!out.exists());
    Ok(())
}
