//! The standard observer of DPO runs: the SFT [`TrainLogger`]'s console lines, progress bar and
//! MLflow run, with the DPO records under TRL's names.

use std::path::Path;

use super::metrics::DpoLogRecord;
use crate::config::TrainingConfig;
use crate::error::Result;
use crate::logging::TrainLogger;
use crate::mlflow::RunStatus;
use crate::trainer::{StepTimer, TrainObserver, TrainOutcome};

/// Console + progress bar + MLflow through [`TrainLogger`].
pub struct DpoReport {
    logger: TrainLogger,
    timer: StepTimer,
}

impl DpoReport {
    /// Opens the MLflow run when `report_to: mlflow` (see [`TrainLogger::new`]).
    pub fn new(cfg: &TrainingConfig, total_steps: u64) -> Result<Self> {
        Ok(Self {
            logger: TrainLogger::new(cfg, total_steps)?,
            timer: StepTimer::default(),
        })
    }

    /// Where the MLflow run went, if any.
    pub fn mlflow_location(&self) -> Option<String> {
        self.logger.mlflow_location()
    }

    /// The wall time and loss of every step of this run (as the SFT
    /// [`crate::trainer::StandardObserver`] records them).
    pub fn step_times(&self) -> &StepTimer {
        &self.timer
    }

    /// Ends the MLflow run as FAILED (call when training returned an error).
    pub fn fail(&mut self) -> Result<()> {
        self.logger.abort(RunStatus::Failed)
    }
}

impl TrainObserver for DpoReport {
    fn on_train_begin(&mut self, total: u64, start_step: u64) -> Result<()> {
        self.timer.on_train_begin(total, start_step)?;
        self.logger.tick(start_step);
        Ok(())
    }
    fn on_step_end(&mut self, global_step: u64, loss: f64) -> Result<()> {
        self.timer.on_step_end(global_step, loss)?;
        self.logger.tick(global_step);
        Ok(())
    }
    fn on_dpo_log(&mut self, record: &DpoLogRecord) -> Result<()> {
        self.logger.log_dpo(record)
    }
    fn on_save(&mut self, dir: &Path) -> Result<()> {
        self.logger
            .println(&format!("saved checkpoint {}", dir.display()));
        Ok(())
    }
    fn on_train_end(&mut self, outcome: &TrainOutcome) -> Result<()> {
        match &outcome.summary {
            Some(s) => self.logger.finish(s),
            None => self.logger.abort(RunStatus::Killed),
        }
    }
}
