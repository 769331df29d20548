//! TrainingConfig from YAML and CLI flags.

use clap::Parser;
use gptoss_sft::config::{ReportTo, TrainingArgs, TrainingConfig};
use gptoss_sft::schedule::{MinLr, SchedulerType, Warmup};
use gptoss_sft::SftError;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    train: TrainingArgs,
}

const SEED_YAML: &str = "\
model:
  max_length: 1024
training:
  learning_rate: 1.0e-4
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 4
  gradient_checkpointing: true
  num_train_epochs: 1
  warmup_ratio: 0.05
scheduler:
  lr_scheduler_type: cosine_with_min_lr
  lr_scheduler_kwargs:
    min_lr_rate: 0.2
logging:
  logging_steps: 2
  report_to: none
  run_name: seed-run
output:
  output_dir: out/seed
";

#[test]
fn defaults_are_the_recipe() {
    let c = TrainingConfig::default();
    c.validate().unwrap();
    assert_eq!(c.learning_rate, 2e-4);
    assert_eq!(c.lr_scheduler_type, SchedulerType::CosineWithMinLr);
    assert_eq!(c.min_lr, Some(MinLr::Rate(0.1)));
    assert_eq!(c.warmup, Warmup::Ratio(0.03));
    assert_eq!(c.max_length, 2048);
    assert_eq!(c.per_device_train_batch_size, 1);
    assert!(c.gradient_checkpointing);
    assert_eq!(c.num_train_epochs, 1.0);
    assert_eq!((c.lora_r, c.lora_alpha), (8, 16.0));
    assert_eq!(c.lora_target_parameters.len(), 6);
    assert_eq!(c.report_to, ReportTo::Mlflow);
    // The cookbook's step count: 1000 rows, batch 4, accumulation 4 -> 63 steps, warmup 2.
    let cook = TrainingConfig {
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 4,
        ..TrainingConfig::default()
    };
    assert_eq!(cook.total_steps(1000), 63);
    assert_eq!(cook.schedule(63).unwrap().warmup_steps(), 2);
}

#[test]
fn seed_yaml_sections() {
    let mut c = TrainingConfig::default();
    c.apply_yaml_str(SEED_YAML).unwrap();
    c.validate().unwrap();
    assert_eq!(c.max_length, 1024);
    assert_eq!(c.learning_rate, 1e-4);
    assert_eq!(c.per_device_train_batch_size, 4);
    assert_eq!(c.warmup, Warmup::Ratio(0.05));
    assert_eq!(c.min_lr, Some(MinLr::Rate(0.2)));
    assert_eq!(c.logging_steps, 2);
    assert_eq!(c.report_to, ReportTo::None);
    assert_eq!(c.run_name.as_deref(), Some("seed-run"));
    assert_eq!(c.output_dir, std::path::PathBuf::from("out/seed"));
    let p = c.preprocess_options();
    assert_eq!((p.max_length, p.date.as_str()), (1024, "2025-08-05"));
    assert!(!c.load_options().skip_malformed);
}

fn config_err(yaml: &str) -> (String, String) {
    match TrainingConfig::default().apply_yaml_str(yaml) {
        Err(SftError::Config { key, message }) => (key, message),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn unknown_keys_and_wrong_types_name_the_key() {
    let (k, m) = config_err("training:\n  learning_rte: 1e-4\n");
    assert_eq!(k, "training.learning_rte", "{m}");
    let (k, _) = config_err("trainig:\n  learning_rate: 1e-4\n");
    assert_eq!(k, "trainig");
    let (k, m) = config_err("training:\n  learning_rate: fast\n");
    assert_eq!(k, "training.learning_rate", "{m}");
    let (k, _) = config_err("scheduler:\n  lr_scheduler_kwargs:\n    min_lr_rat: 0.1\n");
    assert_eq!(k, "scheduler.lr_scheduler_kwargs.min_lr_rat");
    let (k, _) = config_err("scheduler:\n  lr_scheduler_type: cosine_fancy\n");
    assert_eq!(k, "scheduler.lr_scheduler_type");
    let (k, _) = config_err("training:\n  warmup_ratio: 1.5\n");
    assert_eq!(k, "training.warmup_ratio");
    let mut c = TrainingConfig::default();
    c.apply_yaml_str("training:\n  per_device_train_batch_size: 0\n")
        .unwrap();
    match c.validate() {
        Err(SftError::Config { key, .. }) => {
            assert_eq!(key, "training.per_device_train_batch_size")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn cli_overrides_yaml_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let y = dir.path().join("c.yaml");
    std::fs::write(&y, SEED_YAML).unwrap();
    let cli = Cli::try_parse_from([
        "x",
        "--config",
        y.to_str().unwrap(),
        "--learning-rate",
        "3e-4",
        "--gradient-checkpointing",
        "false",
        "--lr-scheduler-type",
        "linear",
        "--warmup-steps",
        "5",
    ])
    .unwrap();
    let c = cli.train.resolve().unwrap();
    assert_eq!(c.learning_rate, 3e-4);
    assert!(!c.gradient_checkpointing);
    assert_eq!(c.max_length, 1024); // from YAML
    assert_eq!(c.lr_scheduler_type, SchedulerType::Linear);
    assert_eq!(c.warmup, Warmup::Steps(5));
    assert_eq!(c.seed, 42); // default
    let none = Cli::try_parse_from(["x"]).unwrap().train.resolve().unwrap();
    assert_eq!(none, TrainingConfig::default());
    assert!(Cli::try_parse_from(["x", "--lr-scheduler-type", "bogus"]).is_err());
    let params = c.params();
    assert!(params
        .iter()
        .any(|(k, v)| k == "learning_rate" && v == "0.0003"));
    assert!(params.iter().any(|(k, v)| k == "warmup_steps" && v == "5"));
    let d = TrainingConfig::default().params();
    assert!(d.iter().any(|(k, v)| k == "warmup_ratio" && v == "0.03"));
    assert!(d
        .iter()
        .any(|(k, v)| k == "lr_scheduler_kwargs" && v == "{'min_lr_rate': 0.1}"));
}

#[test]
fn max_length_past_the_model_context_names_the_field_and_limit() {
    let mut c = TrainingConfig::default();
    c.apply_yaml_str("model:\n  max_length: 131073\n").unwrap();
    match c.check_context(131_072) {
        Err(SftError::Config { key, message }) => {
            assert_eq!(key, "model.max_length");
            assert!(
                message.contains("131073") && message.contains("131072"),
                "{message}"
            );
            assert!(message.contains("max_position_embeddings"), "{message}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    c.max_length = 131_072;
    assert!(c.check_context(131_072).is_ok());
}
