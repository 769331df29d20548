//! The standard [`TrainObserver`]: per-step console lines, an indicatif progress bar with ETA,
//! and an MLflow run (params, metrics with step and timestamp, tags, final status).

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use super::run::{TrainObserver, TrainOutcome};
use super::state::LogRecord;
use crate::config::{ReportTo, TrainingConfig};
use crate::error::Result;
use crate::mlflow::{MlflowClient, MlflowRun, RunStatus};

/// Console + progress bar + MLflow.
pub struct StandardObserver {
    bar: Option<ProgressBar>,
    mlflow: Option<MlflowRun>,
    print_logs: bool,
}

impl StandardObserver {
    /// Opens the MLflow run when `report_to: mlflow` (file store `./mlruns` unless
    /// `MLFLOW_TRACKING_URI` says otherwise) and logs the config as params.
    pub fn new(cfg: &TrainingConfig) -> Result<Self> {
        let mlflow = match cfg.report_to {
            ReportTo::Mlflow => {
                let client = MlflowClient::from_env(Path::new("mlruns"))?;
                let experiment = cfg
                    .experiment_name
                    .clone()
                    .or_else(|| std::env::var("MLFLOW_EXPERIMENT_NAME").ok())
                    .unwrap_or_else(|| "Default".to_string());
                let name = cfg
                    .run_name
                    .clone()
                    .unwrap_or_else(|| format!("sft-{}", crate::mlflow::now_ms()));
                let run = MlflowRun::start(client, &experiment, &name)?;
                run.log_params(&cfg.params())?;
                Some(run)
            }
            ReportTo::None => None,
        };
        Ok(Self {
            bar: None,
            mlflow,
            print_logs: true,
        })
    }

    /// Where the MLflow run went (`<location> experiment <id> run <id>`), if any.
    pub fn mlflow_location(&self) -> Option<String> {
        self.mlflow.as_ref().map(|r| {
            format!(
                "{} (experiment {}, run {} \"{}\")",
                r.client().location(),
                r.experiment_id,
                r.run_id,
                r.run_name
            )
        })
    }

    /// Ends the MLflow run as FAILED (call when training returned an error).
    pub fn fail(&mut self) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
        if let Some(run) = &mut self.mlflow {
            if !run.is_finished() {
                run.finish(RunStatus::Failed)?;
            }
        }
        Ok(())
    }
}

/// One console line per log record, in the HF dict style.
pub fn format_record(r: &LogRecord) -> String {
    let mut s = format!(
        "{{'loss': {:.4}, 'grad_norm': {:.4}, 'learning_rate': {:.3e}, 'entropy': {:.4}, \
         'num_tokens': {}, 'mean_token_accuracy': {:.4}, 'epoch': {:.3}, 'tokens_per_second': {:.1}",
        r.loss,
        r.grad_norm,
        r.learning_rate,
        r.entropy,
        r.num_tokens,
        r.mean_token_accuracy,
        r.epoch,
        r.tokens_per_second
    );
    if let Some(a) = r.aux_loss {
        s.push_str(&format!(", 'aux_loss': {a:.4}"));
    }
    s.push_str(&format!(", 'step': {}}}", r.step));
    s
}

impl TrainObserver for StandardObserver {
    fn on_train_begin(&mut self, total_steps: u64, start_step: u64) -> Result<()> {
        let bar = ProgressBar::new(total_steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(start_step);
        self.bar = Some(bar);
        Ok(())
    }

    fn on_step_end(&mut self, _global_step: u64, loss: f64) -> Result<()> {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(format!("loss {loss:.4}"));
        }
        Ok(())
    }

    fn on_log(&mut self, r: &LogRecord) -> Result<()> {
        if self.print_logs {
            let line = format_record(r);
            match &self.bar {
                Some(bar) => bar.println(line),
                None => println!("{line}"),
            }
        }
        if let Some(run) = &self.mlflow {
            let mut m = vec![
                ("loss".to_string(), r.loss),
                ("grad_norm".to_string(), r.grad_norm),
                ("learning_rate".to_string(), r.learning_rate),
                ("mean_token_accuracy".to_string(), r.mean_token_accuracy),
                ("entropy".to_string(), r.entropy),
                ("num_tokens".to_string(), r.num_tokens as f64),
                ("epoch".to_string(), r.epoch),
                ("tokens_per_second".to_string(), r.tokens_per_second),
            ];
            if let Some(a) = r.aux_loss {
                m.push(("aux_loss".to_string(), a));
            }
            run.log_metrics(r.step as i64, &m)?;
        }
        Ok(())
    }

    fn on_save(&mut self, dir: &Path) -> Result<()> {
        if let Some(bar) = &self.bar {
            bar.println(format!("saved checkpoint {}", dir.display()));
        }
        Ok(())
    }

    fn on_train_end(&mut self, o: &TrainOutcome) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        println!(
            "{{'train_runtime': {:.2}, 'train_steps_per_second': {:.3}, 'train_loss': {:.4}, 'epoch_steps': {}}}",
            o.runtime_s,
            o.step_losses.len() as f64 / o.runtime_s.max(1e-9),
            o.train_loss,
            o.global_step
        );
        if let Some(run) = &mut self.mlflow {
            run.log_metrics(
                o.global_step as i64,
                &[
                    ("train_runtime".to_string(), o.runtime_s),
                    ("train_loss".to_string(), o.train_loss),
                ],
            )?;
            let status = if o.interrupted {
                RunStatus::Killed
            } else {
                RunStatus::Finished
            };
            run.finish(status)?;
        }
        Ok(())
    }
}
