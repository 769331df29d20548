//! The training loop: epochs → optimizer steps → gradient-accumulated micro-batches, like the
//! HF `Trainer` driven by TRL's `SFTTrainer`.
//!
//! Per optimizer step: the `GA` micro-batches are forwarded/back-propagated with the loss
//! `Σ nll / num_items_in_batch (+ coef/GA · aux)`, where `num_items_in_batch` counts the trained
//! tokens of **all** micro-batches of the step (TRL); the summed gradients are clipped at
//! `max_grad_norm` (the pre-clip norm is logged), AdamW updates with the schedule's lr, and
//! every `logging_steps` a [`LogRecord`] goes to the [`TrainObserver`]. Every `save_steps` (and on
//! Ctrl-C) a checkpoint directory is written atomically. A non-finite loss stops training with
//! [`SftError::NonFiniteLoss`] before any update or save, so the last good checkpoint is kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

use super::adapters::{load_adapter_weights, TrainableAdapters};
use super::backward::{forward_backward, BackwardOptions, LayeredCausalLm};
use super::batch::micro_batch;
use super::interrupt;
use crate::checkpoint::{
    load_checkpoint, load_optimizer, resolve_resume, save_checkpoint, CheckpointContents, RngState,
    TrainerState, TRAINER_STATE_FILE,
};
use crate::collate::{pad, Example};
use crate::config::TrainingConfig;
use crate::error::{Result, SftError};
use crate::logging::{loss_points, write_loss_curve_png, LogEntry, LogRecord, TrainSummary};
use crate::optim::{AdamW, Gradients};
use crate::preprocess::epoch_order;
use crate::schedule::LrSchedule;

/// Receives progress from [`Trainer::train`] (progress bar, console, MLflow, ...).
pub trait TrainObserver {
    /// Training starts: `total_steps` optimizer steps, resuming after `start_step`.
    fn on_train_begin(&mut self, _total_steps: u64, _start_step: u64) -> Result<()> {
        Ok(())
    }
    /// After every optimizer step.
    fn on_step_end(&mut self, _global_step: u64, _loss: f64) -> Result<()> {
        Ok(())
    }
    /// Every `logging_steps` optimizer steps.
    fn on_log(&mut self, _record: &LogRecord) -> Result<()> {
        Ok(())
    }
    /// A checkpoint directory was written.
    fn on_save(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Training ended (normally, interrupted or by error before the error is returned).
    fn on_train_end(&mut self, _outcome: &TrainOutcome) -> Result<()> {
        Ok(())
    }
}

/// An observer that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;
impl TrainObserver for NoObserver {}

/// How a training run ended.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Completed optimizer steps.
    pub global_step: u64,
    /// Mean of the per-step losses of this run (HF `train_loss`).
    pub train_loss: f64,
    /// Stopped by Ctrl-C (a checkpoint was saved).
    pub interrupted: bool,
    /// Every logged record (including those restored from a resumed checkpoint), then the
    /// summary when training completed.
    pub log_history: Vec<LogEntry>,
    /// HF's end-of-training summary (`None` when interrupted).
    pub summary: Option<TrainSummary>,
    /// The loss of every optimizer step run in this call, in order.
    pub step_losses: Vec<f64>,
    /// Wall time of this call, seconds.
    pub runtime_s: f64,
    /// The last checkpoint written, if any.
    pub last_checkpoint: Option<PathBuf>,
}

/// Extra knobs that are not part of [`TrainingConfig`].
#[derive(Debug, Clone)]
pub struct TrainerOptions {
    /// The padding token (gpt-oss: 199999 `<|endoftext|>`).
    pub pad_token_id: u32,
    /// Rows per LM-head chunk of the fused loss (memory ∝ rows · vocab).
    pub lm_head_chunk: usize,
}

impl Default for TrainerOptions {
    fn default() -> Self {
        Self {
            pad_token_id: 199_999,
            lm_head_chunk: 256,
        }
    }
}

/// Writes extra files (tokenizer, chat template) into a checkpoint or the final output dir.
pub type ExtraFiles<'a> = &'a dyn Fn(&Path) -> Result<()>;

/// The SFT trainer. Holds borrowed model/adapters and the tokenized training rows.
pub struct Trainer<'a, M: LayeredCausalLm> {
    model: &'a M,
    adapters: &'a dyn TrainableAdapters,
    config: TrainingConfig,
    rows: Vec<Example>,
    options: TrainerOptions,
    device: Device,
    extra_files: Option<ExtraFiles<'a>>,
}

impl<'a, M: LayeredCausalLm> Trainer<'a, M> {
    /// A trainer for `model` (with `adapters` installed) on `rows` (already tokenized, truncated,
    /// rows without trained tokens dropped). Micro-batches are built on `device`.
    pub fn new(
        model: &'a M,
        adapters: &'a dyn TrainableAdapters,
        config: TrainingConfig,
        rows: Vec<Example>,
        device: Device,
    ) -> Result<Self> {
        if rows.is_empty() {
            return Err(SftError::Dataset(
                "no training rows (every row was empty or had no trained token)".into(),
            ));
        }
        if config.per_device_train_batch_size == 0 || config.gradient_accumulation_steps == 0 {
            return Err(SftError::config(
                "per_device_train_batch_size / gradient_accumulation_steps",
                "must be at least 1",
            ));
        }
        Ok(Self {
            model,
            adapters,
            config,
            rows,
            options: TrainerOptions::default(),
            device,
            extra_files: None,
        })
    }

    /// Replaces the [`TrainerOptions`].
    pub fn with_options(mut self, options: TrainerOptions) -> Self {
        self.options = options;
        self
    }

    /// Also writes these files (tokenizer, chat template) into checkpoints and [`Self::save_model`].
    pub fn with_extra_files(mut self, f: ExtraFiles<'a>) -> Self {
        self.extra_files = Some(f);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &TrainingConfig {
        &self.config
    }

    /// Micro-batches per epoch.
    pub fn micro_batches_per_epoch(&self) -> usize {
        self.rows
            .len()
            .div_ceil(self.config.per_device_train_batch_size)
    }

    /// Optimizer steps of the whole run (`max_steps`, else `ceil(epochs · updates/epoch)`).
    pub fn total_steps(&self) -> u64 {
        self.config.total_steps(self.rows.len())
    }

    /// The micro-batches (as row indices) of optimizer step `step` (0-based), and the
    /// epoch-relative index of the last one.
    fn step_micro_batches(&self, step: u64) -> (Vec<Vec<usize>>, u64, usize) {
        let upe = self.config.updates_per_epoch(self.rows.len()).max(1);
        let epoch = step / upe;
        let in_epoch = (step % upe) as usize;
        let ga = self.config.gradient_accumulation_steps;
        let bs = self.config.per_device_train_batch_size;
        let order = epoch_order(
            self.rows.len(),
            self.config.seed,
            epoch,
            self.config.shuffle,
        );
        let n_micro = self.micro_batches_per_epoch();
        let first = in_epoch * ga;
        let last = (first + ga).min(n_micro);
        let mbs = (first..last)
            .map(|m| order[m * bs..((m + 1) * bs).min(order.len())].to_vec())
            .collect();
        (mbs, epoch, last)
    }

    /// Runs training (resuming from `config.resume_from_checkpoint` if set).
    pub fn train(&self, observer: &mut dyn TrainObserver) -> Result<TrainOutcome> {
        let started = Instant::now();
        interrupt::install();
        interrupt::clear();
        let cfg = &self.config;
        let total = self.total_steps();
        let schedule: LrSchedule = cfg.schedule(total)?;
        let params = self.adapters.named_parameters();
        let vars: Vec<candle_core::Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let mut optimizer = AdamW::new(params, cfg.adamw())?;
        let mut history: Vec<LogEntry> = Vec::new();
        let mut global_step = 0u64;
        let mut num_tokens = 0u64;
        if let Some(spec) = &cfg.resume_from_checkpoint {
            let dir = resolve_resume(&cfg.output_dir, spec)?;
            let loaded = load_checkpoint(&dir)?;
            load_adapter_weights(self.adapters, &dir)?;
            load_optimizer(&dir, &mut optimizer)?;
            global_step = loaded.trainer_state.global_step;
            num_tokens = loaded.trainer_state.num_input_tokens_seen;
            history = loaded.trainer_state.log_history;
        }
        observer.on_train_begin(total, global_step)?;
        let mut grads = Gradients::new(vars.len());
        let mut window = LogWindow::new(Instant::now());
        let mut step_losses = Vec::new();
        let mut last_checkpoint = None;
        let mut interrupted = false;
        let n_micro = self.micro_batches_per_epoch() as f64;
        let ga = cfg.gradient_accumulation_steps;
        let aux_scale = cfg.router_aux_loss_coef / ga as f64;
        while global_step < total {
            let (mbs, epoch, consumed) = self.step_micro_batches(global_step);
            let batches = mbs
                .iter()
                .map(|idx| {
                    let rows: Vec<Example> = idx.iter().map(|&i| self.rows[i].clone()).collect();
                    micro_batch(&pad(&rows)?, self.options.pad_token_id, &self.device)
                })
                .collect::<Result<Vec<_>>>()?;
            let num_items: usize = batches.iter().map(|b| b.targets.len()).sum();
            let opts = BackwardOptions {
                num_items_in_batch: num_items,
                aux_scale,
                gradient_checkpointing: cfg.gradient_checkpointing,
                lm_head_chunk: self.options.lm_head_chunk,
            };
            let mut nll = 0.0;
            let mut aux_sum = 0.0;
            for mb in &batches {
                let out = forward_backward(self.model, &vars, mb, &opts)?;
                nll += out.nll_sum;
                aux_sum += out.aux.unwrap_or(0.0);
                if out.count > 0 {
                    window.accuracy.push(out.correct as f64 / out.count as f64);
                    window.entropy.push(out.entropy_sum / out.count as f64);
                }
                let toks = mb.token_mask.iter().filter(|&&m| m != 0.0).count() as u64;
                num_tokens += toks;
                window.tokens += toks;
                for (i, g) in out.grads.into_iter().enumerate() {
                    if let Some(g) = g {
                        let g = match grads.get(i) {
                            Some(acc) => (acc + g)?,
                            None => g,
                        };
                        grads.set(i, g)?;
                    }
                }
            }
            let step_no = global_step + 1;
            let ce = if num_items > 0 {
                nll / num_items as f64
            } else {
                0.0
            };
            let loss = ce + aux_scale * aux_sum;
            if !loss.is_finite() {
                let err = SftError::NonFiniteLoss {
                    step: step_no,
                    loss,
                };
                return Err(err);
            }
            // the norm stays on the device until the optimizer step is enqueued
            let lr = schedule.lr(global_step);
            let max_norm = (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm);
            let grad_norm = match optimizer.clip_and_step(&mut grads, lr, max_norm)? {
                Some(t) => t.to_scalar::<f32>()? as f64,
                None => 0.0,
            };
            global_step = step_no;
            step_losses.push(loss);
            window.loss_sum += loss;
            window.steps += 1;
            if cfg.router_aux_loss_coef != 0.0 {
                window.aux_sum += aux_sum / ga as f64;
            }
            let epoch_f = epoch as f64 + consumed as f64 / n_micro;
            observer.on_step_end(global_step, loss)?;
            let last = global_step == total;
            if global_step % cfg.logging_steps.max(1) == 0 || last {
                let rec = window.record(
                    global_step,
                    epoch_f,
                    grad_norm,
                    schedule.logged_lr(global_step),
                    num_tokens,
                    cfg.router_aux_loss_coef != 0.0,
                );
                observer.on_log(&rec)?;
                history.push(LogEntry::Step(rec));
                window = LogWindow::new(Instant::now());
            }
            interrupted = interrupt::requested();
            let save_now = cfg.save_steps > 0 && global_step % cfg.save_steps == 0;
            if save_now || interrupted {
                let ts = TrainerState::new(
                    cfg,
                    global_step,
                    epoch_f,
                    total,
                    num_tokens,
                    history.clone(),
                    interrupted || last,
                );
                let rng = RngState {
                    seed: cfg.seed,
                    shuffle: cfg.shuffle,
                    global_step,
                    epoch,
                    micro_batches_done: consumed as u64,
                    extra: None,
                };
                let contents = CheckpointContents {
                    trainer_state: &ts,
                    scheduler: &schedule.state(global_step),
                    rng: &rng,
                    config: cfg,
                    optimizer: &optimizer,
                };
                let dir = save_checkpoint(
                    &cfg.output_dir,
                    &contents,
                    |d| self.write_model_files(d),
                    cfg.save_total_limit,
                )?;
                observer.on_save(&dir)?;
                last_checkpoint = Some(dir);
            }
            if interrupted {
                break;
            }
        }
        let train_loss = if step_losses.is_empty() {
            0.0
        } else {
            step_losses.iter().sum::<f64>() / step_losses.len() as f64
        };
        let runtime_s = started.elapsed().as_secs_f64();
        let summary = (!interrupted).then(|| {
            let epoch =
                global_step as f64 / self.config.updates_per_epoch(self.rows.len()).max(1) as f64;
            TrainSummary {
                train_runtime: runtime_s,
                train_samples_per_second: (step_losses.len() * ga * cfg.per_device_train_batch_size)
                    as f64
                    / runtime_s.max(1e-9),
                train_steps_per_second: step_losses.len() as f64 / runtime_s.max(1e-9),
                total_flos: 0.0,
                train_loss,
                epoch,
                step: global_step,
            }
        });
        if let Some(s) = &summary {
            history.push(LogEntry::Summary(s.clone()));
            self.write_final_state(global_step, s.epoch, total, num_tokens, &history)?;
        }
        let outcome = TrainOutcome {
            global_step,
            train_loss,
            interrupted,
            log_history: history,
            summary,
            step_losses,
            runtime_s,
            last_checkpoint,
        };
        observer.on_train_end(&outcome)?;
        Ok(outcome)
    }

    /// The adapter files plus the extra (tokenizer / chat template) files, into `dir`.
    fn write_model_files(&self, dir: &Path) -> Result<()> {
        self.adapters.save_adapter(dir)?;
        if let Some(f) = self.extra_files {
            f(dir)?;
        }
        Ok(())
    }

    /// `output_dir/trainer_state.json` (with the summary) and `output_dir/loss_curve.png`.
    fn write_final_state(
        &self,
        global_step: u64,
        epoch: f64,
        total: u64,
        num_tokens: u64,
        history: &[LogEntry],
    ) -> Result<()> {
        let out = &self.config.output_dir;
        std::fs::create_dir_all(out).map_err(|e| SftError::io(out, e))?;
        let ts = TrainerState::new(
            &self.config,
            global_step,
            epoch,
            total,
            num_tokens,
            history.to_vec(),
            true,
        );
        crate::atomic::write_json(&out.join(TRAINER_STATE_FILE), &ts)?;
        write_loss_curve_png(&out.join("loss_curve.png"), &loss_points(history))
    }

    /// TRL's `save_model`: the final adapter files plus the tokenizer / chat template files in
    /// `output_dir`.
    pub fn save_model(&self, dir: Option<&Path>) -> Result<PathBuf> {
        let dir = dir.unwrap_or(&self.config.output_dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| SftError::io(&dir, e))?;
        self.write_model_files(&dir)?;
        Ok(dir)
    }
}

/// Metrics accumulated between two logs.
struct LogWindow {
    start: Instant,
    loss_sum: f64,
    aux_sum: f64,
    steps: u64,
    tokens: u64,
    accuracy: Vec<f64>,
    entropy: Vec<f64>,
}

impl LogWindow {
    fn new(start: Instant) -> Self {
        Self {
            start,
            loss_sum: 0.0,
            aux_sum: 0.0,
            steps: 0,
            tokens: 0,
            accuracy: vec![],
            entropy: vec![],
        }
    }

    fn record(
        &self,
        step: u64,
        epoch: f64,
        grad_norm: f64,
        learning_rate: f64,
        num_tokens: u64,
        with_aux: bool,
    ) -> LogRecord {
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let steps = self.steps.max(1) as f64;
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        LogRecord {
            step,
            epoch,
            loss: self.loss_sum / steps,
            grad_norm,
            learning_rate,
            mean_token_accuracy: mean(&self.accuracy),
            entropy: mean(&self.entropy),
            num_tokens,
            aux_loss: with_aux.then(|| self.aux_sum / steps),
            tokens_per_second: self.tokens as f64 / secs,
        }
    }
}
