//! TrainLogger → MLflow file store + log_history (read back by scripts/fixtures/sft/read_mlruns.py
//! when SFT_MLRUNS_DIR is set).

use gptoss_sft::config::TrainingConfig;
use gptoss_sft::logging::{LogRecord, TrainLogger, TrainSummary};
use gptoss_sft::mlflow::{FileStore, MlflowClient, MlflowRun};

#[test]
fn logger_writes_params_metrics_and_final_status() {
    let tmp = tempfile::tempdir().unwrap();
    let root = std::env::var_os("SFT_MLRUNS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("mlruns"));
    let client = MlflowClient::File(FileStore::new(&root).unwrap());
    let run = MlflowRun::start(client, "logger-test", "logger-run").unwrap();
    run.log_params(&TrainingConfig::default().params()).unwrap();
    let (exp, id) = (run.experiment_id.clone(), run.run_id.clone());
    let mut logger = TrainLogger::with_parts(Some(run), 2, false, false);
    for step in 1..=2u64 {
        logger
            .log(&LogRecord {
                loss: 4.0 - step as f64,
                grad_norm: 0.9,
                learning_rate: 1e-4 * step as f64,
                entropy: 5.0,
                num_tokens: 64 * step,
                mean_token_accuracy: 0.125,
                aux_loss: Some(2.0),
                epoch: step as f64 / 2.0,
                step,
                tokens_per_second: 100.0,
            })
            .unwrap();
    }
    logger
        .finish(&TrainSummary {
            train_runtime: 1.5,
            train_samples_per_second: 4.0,
            train_steps_per_second: 1.3,
            total_flos: 0.0,
            train_loss: 2.5,
            epoch: 1.0,
            step: 2,
        })
        .unwrap();
    assert_eq!(logger.history().len(), 3);
    assert_eq!(logger.loss_points(), vec![(1, 3.0), (2, 2.0)]);

    let run_dir = std::fs::canonicalize(&root).unwrap().join(exp).join(id);
    let loss = std::fs::read_to_string(run_dir.join("metrics/loss")).unwrap();
    let steps: Vec<&str> = loss
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(steps, ["1", "2"]);
    assert!(run_dir.join("metrics/aux_loss").is_file());
    assert!(run_dir.join("metrics/train_runtime").is_file());
    assert_eq!(
        std::fs::read_to_string(run_dir.join("params/lr_scheduler_type")).unwrap(),
        "cosine_with_min_lr"
    );
    let meta = std::fs::read_to_string(run_dir.join("meta.yaml")).unwrap();
    assert!(meta.contains("status: 3"), "{meta}");
}
