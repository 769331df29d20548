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
use super::evaluate::eval_loss;
use super::interrupt;
use crate::checkpoint::{
    load_checkpoint, load_optimizer, remove_stale_temporaries, resolve_resume, save_checkpoint,
    CheckpointContents, RngState, TrainerState, TRAINER_STATE_FILE,
};
use crate::collate::{pad, Example};
use crate::config::EvalStrategy;
use crate::config::TrainingConfig;
use crate::error::{Result, SftError};
use crate::flos::FlosCounter;
use crate::logging::{write_loss_curve_png, EvalRecord, LogEntry, LogRecord, TrainSummary};
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
    /// An evaluation finished (every `eval_steps` or at epoch ends, per `eval_strategy`).
    fn on_evaluate(&mut self, _record: &EvalRecord) -> Result<()> {
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
            lm_head_chunk: 1024,
        }
    }
}

/// Writes extra files (tokenizer, chat template) into a checkpoint or the final output dir.
pub type ExtraFiles<'a> = &'a dyn Fn(&Path) -> Result<()>;

/// Extra metrics computed at each evaluation after the eval loss (generation metrics such as
/// `eval_reasoning_language_accuracy`), called with the global step; keys are logged as given.
pub type EvalHook<'a> = &'a dyn Fn(u64) -> Result<std::collections::BTreeMap<String, f64>>;

/// The SFT trainer. Holds borrowed model/adapters and the tokenized training rows.
pub struct Trainer<'a, M: LayeredCausalLm> {
    model: &'a M,
    adapters: &'a dyn TrainableAdapters,
    config: TrainingConfig,
    rows: Vec<Example>,
    options: TrainerOptions,
    device: Device,
    extra_files: Option<ExtraFiles<'a>>,
    eval_rows: Vec<Example>,
    eval_hook: Option<EvalHook<'a>>,
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
            eval_rows: Vec::new(),
            eval_hook: None,
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

    /// The held-out rows evaluated per `eval_strategy` (tokenized like the training rows).
    pub fn with_eval_rows(mut self, rows: Vec<Example>) -> Self {
        self.eval_rows = rows;
        self
    }

    /// Also calls `hook` at each evaluation and logs its metrics with the eval loss.
    pub fn with_eval_hook(mut self, hook: EvalHook<'a>) -> Self {
        self.eval_hook = Some(hook);
        self
    }

    /// The teacher-forced evaluation of the held-out rows now ([`eval_loss`], HF/TRL names),
    /// plus the [`EvalHook`]'s metrics, stamped with `step` and `epoch`.
    ///
    /// # Errors
    /// [`SftError::Config`] when there are no eval rows.
    pub fn evaluate(&self, step: u64, epoch: f64) -> Result<EvalRecord> {
        if self.eval_rows.is_empty() {
            return Err(SftError::config(
                "eval.eval_dataset",
                "no eval rows: set eval_dataset (a file) or eval_split (a fraction)",
            ));
        }
        let started = Instant::now();
        let l = eval_loss(
            self.model,
            &self.eval_rows,
            self.config.per_device_eval_batch_size,
            self.options.pad_token_id,
            self.options.lm_head_chunk,
            &self.device,
        )?;
        let generation = match self.eval_hook {
            Some(hook) => hook(step)?,
            None => Default::default(),
        };
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        Ok(EvalRecord {
            eval_loss: l.loss,
            eval_entropy: l.entropy,
            eval_mean_token_accuracy: l.mean_token_accuracy,
            eval_runtime: secs,
            eval_samples_per_second: self.eval_rows.len() as f64 / secs,
            eval_steps_per_second: l.batches as f64 / secs,
            generation,
            epoch,
            step,
        })
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

    /// Runs training (resuming from `config.resume_from_checkpoint` if set): per optimizer step
    /// the phases [`Self::optimizer_step`] (micro-batches, then clip + AdamW), logging and
    /// checkpointing, until `total_steps` or Ctrl-C; then the end-of-training summary.
    pub fn train(&self, observer: &mut dyn TrainObserver) -> Result<TrainOutcome> {
        let started = Instant::now();
        interrupt::install();
        interrupt::clear();
        let total = self.total_steps();
        let schedule: LrSchedule = self.config.schedule(total)?;
        if self.config.eval_strategy != EvalStrategy::No && self.eval_rows.is_empty() {
            return Err(SftError::config(
                "eval.eval_strategy",
                "evaluation is on but there are no eval rows (eval_dataset or eval_split)",
            ));
        }
        let mut run = self.begin()?;
        observer.on_train_begin(total, run.global_step)?;
        let mut interrupted = false;
        while run.global_step < total {
            let step = self.optimizer_step(&mut run, &schedule)?;
            observer.on_step_end(run.global_step, step.loss)?;
            self.log_if_due(&mut run, &step, &schedule, total, observer)?;
            self.evaluate_if_due(&mut run, &step, total, observer)?;
            interrupted = interrupt::requested();
            self.checkpoint_if_due(&mut run, &step, &schedule, total, interrupted, observer)?;
            if interrupted {
                break;
            }
        }
        self.finish(run, started, total, interrupted, observer)
    }

    /// The state a run starts from: a fresh optimizer, or the checkpoint named by
    /// `resume_from_checkpoint` (adapter weights, optimizer moments, step, token count, log).
    fn begin(&self) -> Result<RunState> {
        let cfg = &self.config;
        let params = self.adapters.named_parameters();
        let vars: Vec<candle_core::Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let optimizer = AdamW::new(params, cfg.adamw())?;
        let flos = FlosCounter::new(self.flos_parameters(&vars), 0.0);
        let mut run = RunState {
            grads: Gradients::new(vars.len()),
            vars,
            optimizer,
            history: Vec::new(),
            global_step: 0,
            num_tokens: 0,
            window: LogWindow::new(Instant::now()),
            step_losses: Vec::new(),
            last_checkpoint: None,
            start_step: 0,
            flos,
        };
        remove_stale_temporaries(&cfg.output_dir)?;
        if let Some(spec) = &cfg.resume_from_checkpoint {
            let dir = resolve_resume(&cfg.output_dir, spec)?;
            let loaded = load_checkpoint(&dir)?;
            check_resume_config(cfg, &dir)?;
            load_adapter_weights(self.adapters, &dir)?;
            load_optimizer(&dir, &mut run.optimizer)?;
            run.global_step = loaded.trainer_state.global_step;
            run.num_tokens = loaded.trainer_state.num_input_tokens_seen;
            run.history = loaded.trainer_state.log_history;
            run.flos = FlosCounter::new(run.flos.params(), loaded.trainer_state.total_flos);
            run.start_step = run.global_step;
        }
        Ok(run)
    }

    /// HF's `num_parameters(exclude_embeddings=True)` of the PEFT-wrapped model: the base model
    /// without its input embedding plus the adapter parameters `vars`.
    fn flos_parameters(&self, vars: &[candle_core::Var]) -> u64 {
        let adapters: u64 = vars.iter().map(|v| v.elem_count() as u64).sum();
        self.model.num_parameters_excluding_embeddings() + adapters
    }

    /// One optimizer step: the step's micro-batches forwarded and back-propagated with the
    /// gradients summed ([`Self::micro_batches`]), the loss checked, then clipping and AdamW with
    /// the schedule's learning rate. Advances `run.global_step`.
    ///
    /// # Errors
    /// [`SftError::NonFiniteLoss`] before any update when the step's loss is not finite.
    pub fn optimizer_step(&self, run: &mut RunState, schedule: &LrSchedule) -> Result<StepOutput> {
        let cfg = &self.config;
        let (mbs, epoch, consumed) = self.step_micro_batches(run.global_step);
        let (nll, aux_sum, num_items) = self.micro_batches(run, &mbs)?;
        let ga = cfg.gradient_accumulation_steps;
        let aux_scale = cfg.router_aux_loss_coef / ga as f64;
        let step_no = run.global_step + 1;
        let ce = if num_items > 0 {
            nll / num_items as f64
        } else {
            0.0
        };
        let loss = ce + aux_scale * aux_sum;
        if !loss.is_finite() {
            return Err(SftError::NonFiniteLoss {
                step: step_no,
                loss,
            });
        }
        // the norm stays on the device until the optimizer step is enqueued
        let lr = schedule.lr(run.global_step);
        let max_norm = (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm);
        let grad_norm = match run.optimizer.clip_and_step(&mut run.grads, lr, max_norm)? {
            Some(t) => t.to_scalar::<f32>()? as f64,
            None => 0.0,
        };
        run.global_step = step_no;
        run.step_losses.push(loss);
        run.window.loss_sum += loss;
        run.window.steps += 1;
        if cfg.router_aux_loss_coef != 0.0 {
            run.window.aux_sum += aux_sum / ga as f64;
        }
        Ok(StepOutput {
            loss,
            grad_norm,
            epoch,
            consumed,
            epoch_f: epoch as f64 + consumed as f64 / self.micro_batches_per_epoch() as f64,
        })
    }

    /// The micro-batches of one step (row indices): collated, forwarded and back-propagated with
    /// the loss `Σ nll / num_items_in_batch (+ aux)` (TRL's token count over the whole step), their
    /// gradients summed into `run.grads`. Returns `(Σ nll, Σ aux, num_items_in_batch)`.
    fn micro_batches(&self, run: &mut RunState, mbs: &[Vec<usize>]) -> Result<(f64, f64, usize)> {
        let cfg = &self.config;
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
            aux_scale: cfg.router_aux_loss_coef / cfg.gradient_accumulation_steps as f64,
            gradient_checkpointing: cfg.gradient_checkpointing,
            lm_head_chunk: self.options.lm_head_chunk,
        };
        let (mut nll, mut aux_sum) = (0.0, 0.0);
        for mb in &batches {
            let out = forward_backward(self.model, &run.vars, mb, &opts)?;
            nll += out.nll_sum;
            aux_sum += out.aux.unwrap_or(0.0);
            if out.count > 0 {
                run.window
                    .accuracy
                    .push(out.correct as f64 / out.count as f64);
                run.window.entropy.push(out.entropy_sum / out.count as f64);
            }
            run.flos.add_batch(mb.input_ids.elem_count() as u64);
            let toks = mb.token_mask.iter().filter(|&&m| m != 0.0).count() as u64;
            run.num_tokens += toks;
            run.window.tokens += toks;
            for (i, g) in out.grads.into_iter().enumerate() {
                if let Some(g) = g {
                    let g = match run.grads.get(i) {
                        Some(acc) => (acc + g)?,
                        None => g,
                    };
                    run.grads.set(i, g)?;
                }
            }
        }
        Ok((nll, aux_sum, num_items))
    }

    /// Every `logging_steps` (and at the last step): a [`LogRecord`] of the window since the last
    /// log to the observer and the history.
    fn log_if_due(
        &self,
        run: &mut RunState,
        step: &StepOutput,
        schedule: &LrSchedule,
        total: u64,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        let cfg = &self.config;
        let g = run.global_step;
        if g % cfg.logging_steps.max(1) != 0 && g != total {
            return Ok(());
        }
        let rec = run.window.record(
            g,
            step.epoch_f,
            step.grad_norm,
            schedule.logged_lr(g),
            run.num_tokens,
            cfg.router_aux_loss_coef != 0.0,
        );
        observer.on_log(&rec)?;
        run.flos.store();
        run.history.push(LogEntry::Step(rec));
        run.window = LogWindow::new(Instant::now());
        Ok(())
    }

    /// Per `eval_strategy`: every `eval_steps` (`steps`), or after the last micro-batch of an
    /// epoch and at the last step (`epoch`), an [`EvalRecord`] to the observer and the history.
    fn evaluate_if_due(
        &self,
        run: &mut RunState,
        step: &StepOutput,
        total: u64,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        let g = run.global_step;
        let due = match self.config.eval_strategy {
            EvalStrategy::No => false,
            EvalStrategy::Steps => g % self.config.eval_interval() == 0,
            EvalStrategy::Epoch => step.consumed == self.micro_batches_per_epoch() || g == total,
        };
        if !due {
            return Ok(());
        }
        let rec = self.evaluate(g, step.epoch_f)?;
        observer.on_evaluate(&rec)?;
        run.history.push(LogEntry::Eval(rec));
        Ok(())
    }

    /// Every `save_steps` (and on Ctrl-C): a checkpoint directory, written atomically.
    fn checkpoint_if_due(
        &self,
        run: &mut RunState,
        step: &StepOutput,
        schedule: &LrSchedule,
        total: u64,
        interrupted: bool,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        let cfg = &self.config;
        let g = run.global_step;
        // HF saves every `save_steps` and, with step saving on, at the last step too.
        let save_now = cfg.save_steps > 0 && (g % cfg.save_steps == 0 || g == total);
        if !save_now && !interrupted {
            return Ok(());
        }
        let mut ts = TrainerState::new(
            cfg,
            g,
            step.epoch_f,
            total,
            run.num_tokens,
            run.history.clone(),
            interrupted || g == total,
        );
        ts.total_flos = run.flos.store();
        let rng = RngState {
            seed: cfg.seed,
            shuffle: cfg.shuffle,
            global_step: g,
            epoch: step.epoch,
            micro_batches_done: step.consumed as u64,
            extra: None,
        };
        let contents = CheckpointContents {
            trainer_state: &ts,
            scheduler: &schedule.state(g),
            rng: &rng,
            config: cfg,
            optimizer: &run.optimizer,
        };
        let dir = save_checkpoint(
            &cfg.output_dir,
            &contents,
            |d| self.write_model_files(d),
            cfg.save_total_limit,
        )?;
        observer.on_save(&dir)?;
        run.last_checkpoint = Some(dir);
        Ok(())
    }

    /// The end of a run: HF's summary and the final trainer state (when not interrupted), the
    /// outcome to the observer.
    fn finish(
        &self,
        run: RunState,
        started: Instant,
        total: u64,
        interrupted: bool,
        observer: &mut dyn TrainObserver,
    ) -> Result<TrainOutcome> {
        let cfg = &self.config;
        let RunState {
            mut history,
            global_step,
            num_tokens,
            step_losses,
            last_checkpoint,
            start_step,
            mut flos,
            ..
        } = run;
        let total_flos = flos.store();
        // Over every step of the run, also those before a resume (from their logged windows), so
        // a resumed run reports the train_loss of an uninterrupted one.
        let before = logged_loss_sum(&history, start_step);
        let train_loss = if global_step == 0 {
            0.0
        } else {
            (before + step_losses.iter().sum::<f64>()) / global_step as f64
        };
        let runtime_s = started.elapsed().as_secs_f64();
        let samples =
            step_losses.len() * cfg.gradient_accumulation_steps * cfg.per_device_train_batch_size;
        let summary = (!interrupted).then(|| TrainSummary {
            train_runtime: runtime_s,
            train_samples_per_second: samples as f64 / runtime_s.max(1e-9),
            train_steps_per_second: step_losses.len() as f64 / runtime_s.max(1e-9),
            total_flos,
            train_loss,
            epoch: global_step as f64 / cfg.updates_per_epoch(self.rows.len()).max(1) as f64,
            step: global_step,
        });
        if let Some(s) = &summary {
            history.push(LogEntry::Summary(s.clone()));
            self.write_final_state(
                global_step,
                s.epoch,
                total,
                num_tokens,
                total_flos,
                &history,
            )?;
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
        total_flos: f64,
        history: &[LogEntry],
    ) -> Result<()> {
        let out = &self.config.output_dir;
        std::fs::create_dir_all(out).map_err(|e| SftError::io(out, e))?;
        let mut ts = TrainerState::new(
            &self.config,
            global_step,
            epoch,
            total,
            num_tokens,
            history.to_vec(),
            true,
        );
        ts.total_flos = total_flos;
        crate::atomic::write_json(&out.join(TRAINER_STATE_FILE), &ts)?;
        write_loss_curve_png(&out.join("loss_curve.png"), history)
    }

    /// TRL's `save_model`: the final adapter files plus the tokenizer / chat template files in
    /// `output_dir`, and the run's resolved config as `training_args.json` (TRL writes
    /// `training_args.bin`), so evaluation can rebuild the same held-out rows.
    pub fn save_model(&self, dir: Option<&Path>) -> Result<PathBuf> {
        let dir = dir.unwrap_or(&self.config.output_dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| SftError::io(&dir, e))?;
        self.write_model_files(&dir)?;
        crate::atomic::write_json(
            &dir.join(crate::checkpoint::TRAINING_ARGS_FILE),
            &self.config,
        )?;
        Ok(dir)
    }
}

/// Σ of the per-step losses of steps `1..=upto`, from the logged windows of `history` (each
/// record's loss is the mean of the steps since the previous record).
fn logged_loss_sum(history: &[LogEntry], upto: u64) -> f64 {
    let mut prev = 0;
    let mut sum = 0.0;
    for r in history.iter().filter_map(LogEntry::as_step) {
        if r.step > upto {
            break;
        }
        sum += r.loss * (r.step - prev) as f64;
        prev = r.step;
    }
    sum
}

/// Refuses to resume from `dir` when options that change the trajectory differ from the ones the
/// checkpoint was written with (listing them), unless `allow_config_change`, which prints them.
fn check_resume_config(cfg: &TrainingConfig, dir: &Path) -> Result<()> {
    let saved = crate::checkpoint::load_training_args(dir)?;
    let changes = cfg.trajectory_changes(&saved);
    if changes.is_empty() {
        return Ok(());
    }
    let listing: Vec<String> = changes
        .iter()
        .map(|(k, a, b)| format!("{k}: {a} -> {b}"))
        .collect();
    if cfg.allow_config_change {
        eprintln!(
            "resuming {} with changed options: {}",
            dir.display(),
            listing.join(", ")
        );
        return Ok(());
    }
    Err(SftError::config(
        "resume_from_checkpoint",
        format!(
            "{} was trained with other options ({}); resume with the same options, or pass \
             --allow-config-change to accept the change",
            dir.display(),
            listing.join(", ")
        ),
    ))
}

/// The mutable state of a training run between optimizer steps (see [`Trainer::train`]).
pub struct RunState {
    optimizer: AdamW,
    grads: Gradients,
    vars: Vec<candle_core::Var>,
    history: Vec<LogEntry>,
    global_step: u64,
    num_tokens: u64,
    window: LogWindow,
    step_losses: Vec<f64>,
    last_checkpoint: Option<PathBuf>,
    start_step: u64,
    flos: FlosCounter,
}

impl RunState {
    /// Completed optimizer steps.
    pub fn global_step(&self) -> u64 {
        self.global_step
    }
}

/// What one optimizer step produced ([`Trainer::optimizer_step`]).
#[derive(Debug, Clone, Copy)]
pub struct StepOutput {
    /// The step's loss (`Σ nll / num_items_in_batch`, plus the weighted aux loss).
    pub loss: f64,
    /// The total gradient norm before clipping (0 without gradients).
    pub grad_norm: f64,
    /// The epoch of the step (0-based).
    pub epoch: u64,
    /// Micro-batches of the epoch consumed after this step.
    pub consumed: usize,
    /// Fractional epoch after this step (HF's logged `epoch`).
    pub epoch_f: f64,
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
