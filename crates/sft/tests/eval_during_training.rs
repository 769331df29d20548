//! Evaluation during training (issue 21): `eval_loss` at an eval step equals an independent
//! teacher-forced pass (the model's full logits, log-softmax in f64, HF's eval-loop averaging)
//! over the same rows with the adapter of that step; the eval split is seeded and disjoint; a
//! missing eval file fails before anything is written; eval records reach `trainer_state.json`.

mod trainer_support;

use candle_core::{DType, Device, Tensor};
use gptoss_harmony::HarmonyTokenizer;
use gptoss_sft::collate::{pad, Example};
use gptoss_sft::config::{EvalStrategy, ReportTo, TrainingConfig};
use gptoss_sft::evaluation::{load_train_and_eval, split_indices};
use gptoss_sft::logging::LogEntry;
use gptoss_sft::trainer::pipeline::{finetune, BUNDLED_DATASET};
use gptoss_sft::{Result, SftError};

fn model_err(e: gptoss_model::ModelError) -> SftError {
    SftError::Trainer(e.to_string())
}

/// HF's eval loop over `rows` in batches of `bs`, from full logits: per batch the mean of
/// `−log softmax(logits)[label]` over trained tokens, weighted by the batch's rows.
fn reference_eval_loss(
    model: &gptoss_model::GptOssForCausalLM,
    rows: &[Example],
    bs: usize,
) -> Result<f64> {
    let (mut weighted, mut n_rows) = (0.0f64, 0usize);
    for chunk in rows.chunks(bs) {
        let b = pad(chunk)?;
        let ids = b.input_ids_tensor(&Device::Cpu)?;
        let mask = b.attention_mask_tensor(&Device::Cpu)?;
        let logits: Tensor = model.forward(&ids, Some(&mask)).map_err(model_err)?;
        let logits = logits.to_dtype(DType::F64)?.to_vec3::<f64>()?;
        let (mut nll, mut count) = (0.0f64, 0usize);
        for (r, row_logits) in logits.iter().enumerate().take(b.rows) {
            for (t, row) in row_logits.iter().enumerate().take(b.seq_len - 1) {
                let label = b.labels[r * b.seq_len + t + 1];
                if label < 0 {
                    continue;
                }
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                nll += lse - row[label as usize];
                count += 1;
            }
        }
        weighted += chunk.len() as f64 * nll / count as f64;
        n_rows += chunk.len();
    }
    Ok(weighted / n_rows as f64)
}

fn config(out: &std::path::Path) -> TrainingConfig {
    TrainingConfig {
        lora_target_parameters: vec!["1.mlp.experts.gate_up_proj".into()],
        learning_rate: 5e-3,
        max_length: 96,
        max_steps: Some(2),
        gradient_accumulation_steps: 1,
        save_steps: 0,
        report_to: ReportTo::None,
        progress_bar: false,
        eval_split: Some(0.05),
        eval_strategy: EvalStrategy::Steps,
        eval_steps: Some(2),
        per_device_eval_batch_size: 3,
        output_dir: out.to_path_buf(),
        ..TrainingConfig::default()
    }
}

#[test]
fn eval_loss_equals_an_independent_teacher_forced_pass() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let cfg = config(&dir.path().join("out"));
    let mut model = gptoss_model::init_random(
        &trainer_support::tiny_real_vocab_config(),
        DType::F32,
        &Device::Cpu,
        Some(3),
    )
    .map_err(model_err)?;
    let out = finetune(&mut model, &cfg, &tok)?;
    let evals: Vec<_> = out
        .outcome
        .log_history
        .iter()
        .filter_map(|e| match e {
            LogEntry::Eval(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(evals.len(), 1, "one evaluation at step 2");
    assert_eq!(evals[0].step, 2);
    // The adapter of step 2 is still installed: the same rows through full logits.
    let set = out
        .eval
        .as_ref()
        .ok_or(SftError::Dataset("no eval set".into()))?;
    assert_eq!(set.rows.len(), 7, "ceil(5 % of 132)");
    let want = reference_eval_loss(&model, &set.examples, cfg.per_device_eval_batch_size)?;
    let got = evals[0].eval_loss;
    assert!(
        ((got - want) / want).abs() < 1e-6,
        "eval_loss {got} vs independent pass {want}"
    );
    // ... and it is in trainer_state.json's log_history under HF's names.
    let state = std::fs::read_to_string(cfg.output_dir.join("trainer_state.json"))
        .map_err(|e| SftError::io("trainer_state.json", e))?;
    assert!(state.contains("\"eval_loss\""), "{state}");
    assert!(state.contains("\"eval_mean_token_accuracy\""));
    Ok(())
}

#[test]
fn eval_split_is_seeded_disjoint_and_complete() -> Result<()> {
    let (train, eval) = split_indices(132, 0.1, 42)?;
    assert_eq!(eval.len(), 14);
    assert_eq!(train.len() + eval.len(), 132);
    assert!(eval.iter().all(|i| !train.contains(i)));
    assert_eq!(split_indices(132, 0.1, 42)?, (train.clone(), eval.clone()));
    assert_ne!(split_indices(132, 0.1, 43)?.1, eval);
    assert!(
        split_indices(1, 0.5, 0).is_err(),
        "nothing left to train on"
    );
    // Through the loader: training examples exclude the held-out rows.
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let cfg = TrainingConfig {
        eval_split: Some(0.1),
        max_length: 64,
        ..TrainingConfig::default()
    };
    let data = load_train_and_eval(&cfg, &tok, BUNDLED_DATASET)?;
    let set = data.eval.ok_or(SftError::Dataset("no eval set".into()))?;
    assert_eq!(set.rows.len() + data.train.examples.len(), 132);
    Ok(())
}

#[test]
fn a_missing_eval_file_fails_before_training_and_writes_nothing() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))?;
    let tok = HarmonyTokenizer::o200k_harmony()?;
    let out_dir = dir.path().join("out");
    let cfg = TrainingConfig {
        eval_split: None,
        eval_dataset: Some(dir.path().join("missing.jsonl").display().to_string()),
        ..config(&out_dir)
    };
    cfg.validate()?;
    let mut model = gptoss_model::init_random(
        &trainer_support::tiny_real_vocab_config(),
        DType::F32,
        &Device::Cpu,
        Some(3),
    )
    .map_err(model_err)?;
    let err = match finetune(&mut model, &cfg, &tok) {
        Ok(_) => panic!("training ran without its eval file"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("missing.jsonl"), "{err}");
    assert!(!out_dir.exists(), "nothing may be written");
    // A strategy without held-out rows is a config error naming the key.
    let bad = TrainingConfig {
        eval_split: None,
        ..config(&out_dir)
    };
    let msg = bad
        .validate()
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string());
    assert!(msg.contains("eval.eval_strategy"), "{msg}");
    Ok(())
}
