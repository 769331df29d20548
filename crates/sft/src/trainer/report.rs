//! The standard [`TrainObserver`]: [`TrainLogger`]'s console lines, progress bar with ETA and
//! MLflow run (params, metrics with step and timestamp, tags, final status), for SFT and DPO runs
//! alike (DPO records under TRL's names).

use std::path::Path;

use super::run::{TrainObserver, TrainOutcome};
use super::timing::StepTimer;
use crate::config::TrainingConfig;
use crate::dpo::DpoLogRecord;
use crate::error::Result;
use crate::logging::{EvalRecord, LogRecord, TrainLogger};
use crate::mlflow::RunStatus;

/// Console + progress bar + MLflow through [`TrainLogger`].
pub struct StandardObserver {
    logger: TrainLogger,
    timer: StepTimer,
}

impl StandardObserver {
    /// Opens the MLflow run when `report_to: mlflow` (see [`TrainLogger::new`]).
    pub fn new(cfg: &TrainingConfig, total_steps: u64) -> Result<Self> {
        Ok(Self {
            logger: TrainLogger::new(cfg, total_steps)?,
            timer: StepTimer::default(),
        })
    }

    /// An observer that times the steps but reports nothing (no bar, console lines or MLflow):
    /// data-parallel ranks other than 0.
    pub fn silent(total_steps: u64) -> Self {
        Self {
            logger: TrainLogger::with_parts(None, total_steps, false, false),
            timer: StepTimer::default(),
        }
    }

    /// Where the MLflow run went, if any.
    pub fn mlflow_location(&self) -> Option<String> {
        self.logger.mlflow_location()
    }

    /// The wall time and loss of every step of this run.
    pub fn step_times(&self) -> &StepTimer {
        &self.timer
    }

    /// The MLflow run (finished or not), taken out to log artifacts after training.
    pub fn take_mlflow_run(&mut self) -> Option<crate::mlflow::MlflowRun> {
        self.logger.take_mlflow_run()
    }

    /// Ends the MLflow run as FAILED (call when training returned an error).
    pub fn fail(&mut self) -> Result<()> {
        self.logger.abort(RunStatus::Failed)
    }
}

impl TrainObserver for StandardObserver {
    fn on_train_begin(&mut self, total_steps: u64, start_step: u64) -> Result<()> {
        self.timer.on_train_begin(total_steps, start_step)?;
        self.logger.tick(start_step);
        Ok(())
    }

    fn on_step_end(&mut self, global_step: u64, loss: f64) -> Result<()> {
        self.timer.on_step_end(global_step, loss)?;
        self.logger.tick(global_step);
        Ok(())
    }

    fn on_log(&mut self, record: &LogRecord) -> Result<()> {
        self.logger.log(record)
    }

    fn on_evaluate(&mut self, record: &EvalRecord) -> Result<()> {
        self.logger.log_eval(record)
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
