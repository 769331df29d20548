//! The one training loop of SFT ([`super::Trainer`]) and DPO ([`crate::dpo::DpoTrainer`]): epochs
//! → optimizer steps → gradient-accumulated micro-batches, like the HF `Trainer` loop that TRL's
//! trainers drive. What differs between the two is an [`Objective`]: the forward/backward of one
//! step's micro-batches and the metrics logged for them. Everything else is here, once: the data
//! order ([`epoch_order`]), the non-finite loss check, clipping + AdamW with the schedule's lr,
//! logging every `logging_steps`, evaluation per `eval_strategy`, checkpoints every `save_steps`
//! and on Ctrl-C (written atomically), resume, the end-of-training summary and `save_model`.
//!
//! Data parallel ([`crate::distributed`]): with the objective's [`GradReducer`] of `N` ranks,
//! optimizer step `s` spans `GA · N` micro-batches of the epoch order; rank `r` runs those at
//! `r, r + N, …` (`GA` of them), the gradients are summed over the ranks after the step's
//! micro-batches, and only rank 0 writes files. `N` ranks thus train exactly what one rank with
//! accumulation `GA · N` trains (up to the order of the gradient sums).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Var;

use super::adapters::{load_adapter_weights, TrainableAdapters};
use super::interrupt;
use super::run::{ExtraFiles, TrainObserver, TrainOutcome};
use crate::checkpoint::{
    load_checkpoint, load_optimizer, remove_stale_temporaries, resolve_resume, save_checkpoint,
    CheckpointContents, RngState, TrainerState, TRAINER_STATE_FILE,
};
use crate::config::{EvalStrategy, TrainingConfig};
use crate::distributed::{any_rank, BucketPlan, GradReducer, Single, StepReduction};
use crate::error::{Result, SftError};
use crate::flos::FlosCounter;
use crate::logging::{loss_points, write_loss_curve_png, EvalRecord, LogEntry, TrainSummary};
use crate::optim::{AdamW, Gradients};
use crate::preprocess::epoch_order;
use crate::schedule::LrSchedule;

/// What one optimizer step's micro-batches gave ([`Objective::step`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLoss {
    /// The step's loss (checked for finiteness before any update).
    pub loss: f64,
    /// Non-padding tokens of the step's micro-batches (`num_input_tokens_seen`).
    pub tokens: u64,
    /// Elements of the step's padded `input_ids` (Σ `B × T` over its micro-batches), what HF's
    /// `total_flos` counts ([`crate::flos`]); 0 where HF counts nothing.
    pub input_numel: u64,
}

/// Where a log record is taken ([`Objective::record`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogPoint {
    /// Global optimizer step (1-based).
    pub step: u64,
    /// Fractional epoch after the step.
    pub epoch: f64,
    /// Pre-clip gradient norm of the step.
    pub grad_norm: f64,
    /// HF's logged learning rate at the step.
    pub learning_rate: f64,
    /// Tokens seen so far.
    pub num_tokens: u64,
}

/// A training objective plugged into the shared loop ([`TrainLoop`]).
pub trait Objective {
    /// The metrics accumulated between two logs.
    type Window;
    /// Training rows (examples, or preference pairs); the loop orders and batches their indices.
    fn num_rows(&self) -> usize;
    /// An empty window, started now.
    fn new_window(&self) -> Self::Window;
    /// Forward + backward of one optimizer step's micro-batches (row indices), their gradients
    /// summed into `grads` (slots as `vars`), metrics and the step loss added to `window`.
    ///
    /// With several ranks the loop passes the step's gradient all-reduce as `reduction`: the
    /// step adds each micro-batch's gradients through [`crate::distributed::absorb`], and may start
    /// the buckets of finished layers during its last backward ([`StepReduction::layer_done`]);
    /// the loop finishes the reduction after the step.
    fn step(
        &self,
        vars: &[Var],
        micro_batches: &[Vec<usize>],
        grads: &mut Gradients,
        window: &mut Self::Window,
        reduction: Option<&mut StepReduction<'_>>,
    ) -> Result<StepLoss>;
    /// The `log_history` entry of `window` at `at`.
    fn record(&self, window: &Self::Window, at: &LogPoint) -> LogEntry;
    /// The non-embedding parameter count (frozen and trainable `vars`) HF's `total_flos`
    /// multiplies by; 0 (no count) unless the objective says.
    fn flos_parameters(&self, _vars: &[Var]) -> u64 {
        0
    }
    /// Whether there are held-out rows to evaluate.
    fn can_evaluate(&self) -> bool {
        false
    }
    /// The ranks this objective's steps are reduced over ([`Single`] unless it says): `step`
    /// receives this rank's micro-batches and returns the step's loss and counts over all ranks.
    fn reducer(&self) -> &dyn GradReducer {
        &Single
    }
    /// The evaluation at `step` / `epoch` (only called when [`Self::can_evaluate`]).
    fn evaluate(&self, _step: u64, _epoch: f64) -> Result<EvalRecord> {
        Err(SftError::config(
            "eval.eval_strategy",
            "this trainer does not evaluate",
        ))
    }
}

/// The mutable state of a training run between optimizer steps.
pub struct RunState<W> {
    optimizer: AdamW,
    grads: Gradients,
    vars: Vec<Var>,
    /// The all-reduce buckets of `vars` (used with several ranks).
    buckets: BucketPlan,
    history: Vec<LogEntry>,
    global_step: u64,
    num_tokens: u64,
    window: W,
    step_losses: Vec<f64>,
    last_checkpoint: Option<PathBuf>,
    start_step: u64,
    flos: FlosCounter,
}

impl<W> RunState<W> {
    /// Completed optimizer steps.
    pub fn global_step(&self) -> u64 {
        self.global_step
    }
}

/// What one optimizer step produced ([`TrainLoop::optimizer_step`]).
#[derive(Debug, Clone, Copy)]
pub struct StepOutput {
    /// The step's loss.
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

/// The shared loop: an [`Objective`] plus the adapters it trains, the configuration and the extra
/// files saved with the adapter.
pub struct TrainLoop<'a, O: Objective> {
    /// The loss and metrics of a step.
    pub objective: &'a O,
    /// The trained parameters (saved, restored on resume).
    pub adapters: &'a dyn TrainableAdapters,
    /// Batch sizes, schedule, logging / saving / evaluation cadence, output dir, resume.
    pub config: &'a TrainingConfig,
    /// Tokenizer / chat template files written next to the adapter.
    pub extra_files: Option<ExtraFiles<'a>>,
}

impl<O: Objective> TrainLoop<'_, O> {
    /// Micro-batches per epoch.
    pub fn micro_batches_per_epoch(&self) -> usize {
        self.objective
            .num_rows()
            .div_ceil(self.config.per_device_train_batch_size)
    }

    /// Optimizer steps of the whole run (`max_steps`, else `ceil(epochs · updates/epoch)`).
    pub fn total_steps(&self) -> u64 {
        let world = self.objective.reducer().world_size();
        self.config.total_steps_on(self.objective.num_rows(), world)
    }

    /// This rank's micro-batches (as row indices) of optimizer step `step` (0-based), its epoch,
    /// and the epoch-relative index after the step's last micro-batch (over all ranks). The step
    /// spans micro-batches `first..first + GA·N` of the epoch; rank `r` takes `first + r`,
    /// `first + r + N`, … (accelerate's `BatchSamplerShard`), fewer (maybe none) at the end of an
    /// epoch.
    fn step_micro_batches(&self, step: u64) -> (Vec<Vec<usize>>, u64, usize) {
        let cfg = self.config;
        let reducer = self.objective.reducer();
        let (rank, world) = (reducer.rank(), reducer.world_size().max(1));
        let n = self.objective.num_rows();
        let upe = cfg.updates_per_epoch_on(n, world).max(1);
        let epoch = step / upe;
        let in_epoch = (step % upe) as usize;
        let ga = cfg.gradient_accumulation_steps * world;
        let bs = cfg.per_device_train_batch_size;
        let order = epoch_order(n, cfg.seed, epoch, cfg.shuffle);
        let first = in_epoch * ga;
        let last = (first + ga).min(self.micro_batches_per_epoch());
        let mbs = (first..last)
            .skip(rank)
            .step_by(world)
            .map(|m| order[m * bs..((m + 1) * bs).min(order.len())].to_vec())
            .collect();
        (mbs, epoch, last)
    }

    /// Runs training (resuming from `config.resume_from_checkpoint` if set): per optimizer step
    /// [`Self::optimizer_step`], logging, evaluation and checkpointing, until `total_steps` or
    /// Ctrl-C; then the end-of-training summary.
    pub fn train(&self, observer: &mut dyn TrainObserver) -> Result<TrainOutcome> {
        let started = Instant::now();
        interrupt::install();
        interrupt::clear();
        let total = self.total_steps();
        let schedule: LrSchedule = self.config.schedule(total)?;
        if self.config.eval_strategy != EvalStrategy::No && !self.objective.can_evaluate() {
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
            let reducer = self.objective.reducer();
            if !reducer.is_identity() {
                // one rank's Ctrl-C stops all of them at the same step
                interrupted = any_rank(reducer, interrupted)?;
            }
            self.checkpoint_if_due(&mut run, &step, &schedule, total, interrupted, observer)?;
            if interrupted {
                break;
            }
        }
        self.finish(run, started, total, interrupted, observer)
    }

    /// The state a run starts from: a fresh optimizer, or the checkpoint named by
    /// `resume_from_checkpoint` (adapter weights, optimizer moments, step, token count, log).
    fn begin(&self) -> Result<RunState<O::Window>> {
        let cfg = self.config;
        let params = self.adapters.named_parameters();
        let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let buckets = BucketPlan::of(&params);
        let optimizer = AdamW::new(params, cfg.adamw())?;
        let flos = FlosCounter::new(self.objective.flos_parameters(&vars), 0.0);
        let mut run = RunState {
            grads: Gradients::new(vars.len()),
            vars,
            buckets,
            optimizer,
            history: Vec::new(),
            global_step: 0,
            num_tokens: 0,
            window: self.objective.new_window(),
            step_losses: Vec::new(),
            last_checkpoint: None,
            start_step: 0,
            flos,
        };
        if self.objective.reducer().is_main() {
            remove_stale_temporaries(&cfg.output_dir)?;
        }
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

    /// One optimizer step: the objective's forward/backward of the step's micro-batches, the
    /// loss checked, then clipping and AdamW with the schedule's learning rate. Advances
    /// `run.global_step`.
    ///
    /// # Errors
    /// [`SftError::NonFiniteLoss`] before any update when the step's loss is not finite.
    pub fn optimizer_step(
        &self,
        run: &mut RunState<O::Window>,
        schedule: &LrSchedule,
    ) -> Result<StepOutput> {
        let cfg = self.config;
        let (mbs, epoch, consumed) = self.step_micro_batches(run.global_step);
        let reducer = self.objective.reducer();
        let mut reduction = match reducer.is_identity() {
            true => None,
            false => Some(StepReduction::new(reducer, &run.buckets, &run.vars)?),
        };
        let out = self.objective.step(
            &run.vars,
            &mbs,
            &mut run.grads,
            &mut run.window,
            reduction.as_mut(),
        )?;
        if let Some(r) = reduction {
            r.finish(&mut run.grads)?;
        }
        run.num_tokens += out.tokens;
        run.flos.add_batch(out.input_numel);
        let step_no = run.global_step + 1;
        let loss = out.loss;
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
        Ok(StepOutput {
            loss,
            grad_norm,
            epoch,
            consumed,
            epoch_f: epoch as f64 + consumed as f64 / self.micro_batches_per_epoch() as f64,
        })
    }

    /// Every `logging_steps` (and at the last step): the objective's record of the window since
    /// the last log, to the observer and the history.
    fn log_if_due(
        &self,
        run: &mut RunState<O::Window>,
        step: &StepOutput,
        schedule: &LrSchedule,
        total: u64,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        let g = run.global_step;
        if g % self.config.logging_steps.max(1) != 0 && g != total {
            return Ok(());
        }
        let at = LogPoint {
            step: g,
            epoch: step.epoch_f,
            grad_norm: step.grad_norm,
            learning_rate: schedule.logged_lr(g),
            num_tokens: run.num_tokens,
        };
        let entry = self.objective.record(&run.window, &at);
        match &entry {
            LogEntry::Step(r) => observer.on_log(r)?,
            LogEntry::Dpo(r) => observer.on_dpo_log(r)?,
            LogEntry::Eval(_) | LogEntry::Summary(_) => {}
        }
        run.flos.store();
        run.history.push(entry);
        run.window = self.objective.new_window();
        Ok(())
    }

    /// Per `eval_strategy`: every `eval_steps` (`steps`), or after the last micro-batch of an
    /// epoch and at the last step (`epoch`), an [`EvalRecord`] to the observer and the history.
    fn evaluate_if_due(
        &self,
        run: &mut RunState<O::Window>,
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
        let rec = self.objective.evaluate(g, step.epoch_f)?;
        observer.on_evaluate(&rec)?;
        run.history.push(LogEntry::Eval(rec));
        Ok(())
    }

    /// Every `save_steps`, at the last step when saving by steps, and on Ctrl-C: a checkpoint
    /// directory, written atomically.
    fn checkpoint_if_due(
        &self,
        run: &mut RunState<O::Window>,
        step: &StepOutput,
        schedule: &LrSchedule,
        total: u64,
        interrupted: bool,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        let cfg = self.config;
        let g = run.global_step;
        // HF saves every `save_steps` and, with step saving on, at the last step too.
        let save_now = cfg.save_steps > 0 && (g % cfg.save_steps == 0 || g == total);
        if (!save_now && !interrupted) || !self.objective.reducer().is_main() {
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
        run: RunState<O::Window>,
        started: Instant,
        total: u64,
        interrupted: bool,
        observer: &mut dyn TrainObserver,
    ) -> Result<TrainOutcome> {
        let cfg = self.config;
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
        let world = self.objective.reducer().world_size();
        let samples = step_losses.len()
            * cfg.gradient_accumulation_steps
            * cfg.per_device_train_batch_size
            * world;
        let upe = cfg
            .updates_per_epoch_on(self.objective.num_rows(), world)
            .max(1);
        let summary = (!interrupted).then(|| TrainSummary {
            train_runtime: runtime_s,
            train_samples_per_second: samples as f64 / runtime_s.max(1e-9),
            train_steps_per_second: step_losses.len() as f64 / runtime_s.max(1e-9),
            total_flos,
            train_loss,
            epoch: global_step as f64 / upe as f64,
            step: global_step,
        });
        if let Some(s) = &summary {
            history.push(LogEntry::Summary(s.clone()));
            if self.objective.reducer().is_main() {
                let at = (global_step, s.epoch, total, num_tokens, total_flos);
                self.write_final_state(at, &history)?;
            }
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
    /// `at`: global step, epoch, total steps, tokens seen, total FLOs.
    fn write_final_state(
        &self,
        (global_step, epoch, total, num_tokens, total_flos): (u64, f64, u64, u64, f64),
        history: &[LogEntry],
    ) -> Result<()> {
        let out = &self.config.output_dir;
        std::fs::create_dir_all(out).map_err(|e| SftError::io(out, e))?;
        let mut ts = TrainerState::new(
            self.config,
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
    /// `dir` (default `output_dir`), and the run's resolved config as `training_args.json` (TRL
    /// writes `training_args.bin`), so evaluation can rebuild the same held-out rows. Only rank 0
    /// writes; every rank returns the directory.
    pub fn save_model(&self, dir: Option<&Path>) -> Result<PathBuf> {
        let dir = dir.unwrap_or(&self.config.output_dir).to_path_buf();
        if !self.objective.reducer().is_main() {
            return Ok(dir);
        }
        std::fs::create_dir_all(&dir).map_err(|e| SftError::io(&dir, e))?;
        self.write_model_files(&dir)?;
        crate::atomic::write_json(
            &dir.join(crate::checkpoint::TRAINING_ARGS_FILE),
            self.config,
        )?;
        Ok(dir)
    }
}

/// Sums gradients of one micro-batch into `grads` (slot `i` ← slot `i` + `new[i]`).
pub fn accumulate(grads: &mut Gradients, new: Vec<Option<candle_core::Tensor>>) -> Result<()> {
    for (i, g) in new.into_iter().enumerate() {
        if let Some(g) = g {
            let g = match grads.get(i) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            grads.set(i, g)?;
        }
    }
    Ok(())
}

/// Σ of the per-step losses of steps `1..=upto`, from the logged windows of `history` (each
/// record's loss is the mean of the steps since the previous record).
fn logged_loss_sum(history: &[LogEntry], upto: u64) -> f64 {
    let mut prev = 0;
    let mut sum = 0.0;
    for (step, loss) in loss_points(history) {
        if step > upto {
            break;
        }
        sum += loss * (step - prev) as f64;
        prev = step;
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
