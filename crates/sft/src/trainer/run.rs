//! The SFT trainer ([`Trainer`], TRL's `SFTTrainer`) on the loop it shares with DPO
//! ([`super::driver::TrainLoop`]: epochs → optimizer steps → gradient-accumulated micro-batches),
//! and what both report to ([`TrainObserver`], [`TrainOutcome`]).
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

use candle_core::{Device, Var};

use super::adapters::TrainableAdapters;
use super::backward::{
    forward_backward, forward_backward_with, BackwardOptions, LayeredCausalLm, MicroBatch,
};
use super::batch::micro_batch;
use super::driver::{LogPoint, Objective, StepLoss, TrainLoop};
use super::evaluate::eval_loss;
use crate::collate::{pack, pack_bfd, pad, Example};
use crate::config::TrainingConfig;
use crate::distributed::{absorb, GradReducer, Single, StepReduction};
use crate::error::{Result, SftError};
use crate::logging::{EvalRecord, LogEntry, LogRecord, TrainSummary};
use crate::optim::Gradients;

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
    /// Every `logging_steps` optimizer steps of a DPO run (instead of [`Self::on_log`]).
    fn on_dpo_log(&mut self, _record: &crate::dpo::DpoLogRecord) -> Result<()> {
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
    /// What the sampler orders: one row each, or (with `packing`) the best-fit-decreasing bins
    /// of rows.
    units: Vec<Vec<usize>>,
    options: TrainerOptions,
    device: Device,
    extra_files: Option<ExtraFiles<'a>>,
    eval_rows: Vec<Example>,
    eval_hook: Option<EvalHook<'a>>,
    reducer: &'a dyn GradReducer,
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
        if let Some(limit) = model.max_positions() {
            config.check_context(limit)?;
        }
        let units = if config.packing {
            let lens: Vec<usize> = rows.iter().map(|r| r.input_ids.len()).collect();
            pack_bfd(&lens, config.max_length)?
        } else {
            (0..rows.len()).map(|i| vec![i]).collect()
        };
        Ok(Self {
            model,
            adapters,
            config,
            rows,
            units,
            options: TrainerOptions::default(),
            device,
            extra_files: None,
            eval_rows: Vec::new(),
            eval_hook: None,
            reducer: &Single,
        })
    }

    /// Trains as one rank of a data-parallel job ([`crate::distributed`]): this rank's shard of
    /// every global batch (per-device batch × grad-accum × world size), gradients and loss
    /// tokens summed over the ranks, files written by rank 0 only. Default: [`Single`].
    pub fn with_reducer(mut self, reducer: &'a dyn GradReducer) -> Self {
        self.reducer = reducer;
        self
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

    /// The micro-batches of `mbs` (each a list of units: rows, or packed bins of rows) on the
    /// device: padded, or padding-free when `packing` / `padding_free`.
    fn collate_units(&self, mbs: &[Vec<usize>]) -> Result<Vec<MicroBatch>> {
        let cfg = &self.config;
        mbs.iter()
            .map(|idx| {
                let rows: Vec<Example> = idx
                    .iter()
                    .flat_map(|&u| &self.units[u])
                    .map(|&i| self.rows[i].clone())
                    .collect();
                let batch = if cfg.packing || cfg.padding_free {
                    pack(&rows)?
                } else {
                    pad(&rows)?
                };
                micro_batch(&batch, self.options.pad_token_id, &self.device)
            })
            .collect()
    }

    /// Micro-batches per epoch.
    pub fn micro_batches_per_epoch(&self) -> usize {
        self.units
            .len()
            .div_ceil(self.config.per_device_train_batch_size)
    }

    /// Optimizer steps of the whole run (`max_steps`, else `ceil(epochs · updates/epoch)`).
    pub fn total_steps(&self) -> u64 {
        self.config
            .total_steps_on(self.units.len(), self.reducer.world_size())
    }

    /// The shared loop over this trainer's objective.
    fn driver(&self) -> TrainLoop<'_, Self> {
        TrainLoop {
            objective: self,
            adapters: self.adapters,
            config: &self.config,
            extra_files: self.extra_files,
        }
    }

    /// Runs training (resuming from `config.resume_from_checkpoint` if set) with the shared loop
    /// ([`TrainLoop::train`]): per optimizer step the micro-batches, clip + AdamW, logging,
    /// evaluation and checkpointing, until `total_steps` or Ctrl-C; then the end-of-training
    /// summary.
    pub fn train(&self, observer: &mut dyn TrainObserver) -> Result<TrainOutcome> {
        self.driver().train(observer)
    }

    /// TRL's `save_model`: the final adapter files plus the tokenizer / chat template files in
    /// `output_dir`, and the run's resolved config as `training_args.json` (TRL writes
    /// `training_args.bin`), so evaluation can rebuild the same held-out rows.
    pub fn save_model(&self, dir: Option<&Path>) -> Result<PathBuf> {
        self.driver().save_model(dir)
    }
}

/// SFT's step: `Σ nll / num_items_in_batch (+ coef/GA · aux)` over the step's micro-batches.
impl<M: LayeredCausalLm> Objective for Trainer<'_, M> {
    type Window = LogWindow;

    fn num_rows(&self) -> usize {
        self.units.len()
    }

    fn new_window(&self) -> LogWindow {
        LogWindow::new(Instant::now())
    }

    /// The micro-batches of one step (row indices): collated, forwarded and back-propagated with
    /// the loss `Σ nll / num_items_in_batch (+ aux)` (TRL's token count over the whole step),
    /// their gradients summed into `grads`.
    ///
    /// Over `N` ranks `mbs` is this rank's share; the token count is summed over the ranks
    /// first (TRL's `average_tokens_across_devices`), the aux loss weighs `coef / (GA · N)`, and
    /// the per-micro-batch metrics are gathered into the step's global micro-batch order (rank
    /// `r`'s `j`-th at `j · N + r`), so the loss and the window are those of one rank running
    /// all `GA · N` micro-batches. The gradients are summed over the ranks by the loop.
    fn step(
        &self,
        vars: &[Var],
        mbs: &[Vec<usize>],
        grads: &mut Gradients,
        window: &mut LogWindow,
        mut reduction: Option<&mut StepReduction<'_>>,
    ) -> Result<StepLoss> {
        let cfg = &self.config;
        let (rank, world) = (self.reducer.rank(), self.reducer.world_size().max(1));
        let batches = self.collate_units(mbs)?;
        let mut num_items = [batches.iter().map(|b| b.targets.len()).sum::<usize>() as f64];
        self.reducer.all_reduce_f64(&mut num_items)?;
        let num_items = num_items[0] as usize;
        let ga = cfg.gradient_accumulation_steps * world;
        let opts = BackwardOptions {
            num_items_in_batch: num_items,
            aux_scale: cfg.router_aux_loss_coef / ga as f64,
            gradient_checkpointing: cfg.gradient_checkpointing,
            lm_head_chunk: self.options.lm_head_chunk,
        };
        let mut slots = vec![0.0; ga * MicroStats::LEN];
        for (j, mb) in batches.iter().enumerate() {
            let last = j + 1 == batches.len();
            let out = match reduction.as_deref_mut() {
                // the last backward starts each finished layer's all-reduce (DDP's overlap)
                Some(r) if last => overlapped(self.model, vars, mb, &opts, r, grads)?,
                _ => forward_backward(self.model, vars, mb, &opts)?,
            };
            let stats = MicroStats {
                nll_sum: out.nll_sum,
                aux: out.aux.unwrap_or(0.0),
                correct: out.correct as f64,
                count: out.count as f64,
                entropy_sum: out.entropy_sum,
                tokens: mb.token_mask.iter().filter(|&&m| m != 0.0).count() as f64,
                input_numel: mb.input_ids.elem_count() as f64,
            };
            let k = (j * world + rank) * MicroStats::LEN;
            stats.write(&mut slots[k..k + MicroStats::LEN]);
            absorb(reduction.as_deref(), grads, out.grads)?;
        }
        self.reducer.all_reduce_f64(&mut slots)?;
        let (mut nll, mut aux_sum, mut tokens, mut input_numel) = (0.0, 0.0, 0u64, 0u64);
        for m in slots
            .chunks_exact(MicroStats::LEN)
            .filter_map(MicroStats::read)
        {
            nll += m.nll_sum;
            aux_sum += m.aux;
            if m.count > 0.0 {
                window.accuracy.push(m.correct / m.count);
                window.entropy.push(m.entropy_sum / m.count);
            }
            let toks = m.tokens as u64;
            tokens += toks;
            window.tokens += toks;
            input_numel += m.input_numel as u64;
        }
        let ce = if num_items > 0 {
            nll / num_items as f64
        } else {
            0.0
        };
        let loss = ce + opts.aux_scale * aux_sum;
        window.loss_sum += loss;
        window.steps += 1;
        if cfg.router_aux_loss_coef != 0.0 {
            window.aux_sum += aux_sum / ga as f64;
        }
        Ok(StepLoss {
            loss,
            tokens,
            input_numel,
        })
    }

    fn reducer(&self) -> &dyn GradReducer {
        self.reducer
    }

    /// HF's `num_parameters(exclude_embeddings=True)` of the trained model: the base model without
    /// its input embedding, plus the adapter parameters `vars` when they are added to it (LoRA:
    /// PEFT's wrapped model counts them; full-parameter: they are the model's own).
    fn flos_parameters(&self, vars: &[Var]) -> u64 {
        let added: u64 = if self.adapters.are_model_parameters() {
            0
        } else {
            vars.iter().map(|v| v.elem_count() as u64).sum()
        };
        self.model.num_parameters_excluding_embeddings() + added
    }

    fn record(&self, window: &LogWindow, at: &LogPoint) -> LogEntry {
        LogEntry::Step(window.record(at, self.config.router_aux_loss_coef != 0.0))
    }

    fn can_evaluate(&self) -> bool {
        !self.eval_rows.is_empty()
    }

    fn evaluate(&self, step: u64, epoch: f64) -> Result<EvalRecord> {
        Trainer::evaluate(self, step, epoch)
    }
}

/// What one micro-batch of a step contributes to its loss and log window, as the `f64`s the
/// ranks sum (a slot no rank filled stays all zero, `present` included; integers are exact).
struct MicroStats {
    nll_sum: f64,
    aux: f64,
    correct: f64,
    count: f64,
    entropy_sum: f64,
    tokens: f64,
    input_numel: f64,
}

impl MicroStats {
    /// `f64`s per slot: `present` then the fields.
    const LEN: usize = 8;

    fn write(&self, out: &mut [f64]) {
        out.copy_from_slice(&[
            1.0,
            self.nll_sum,
            self.aux,
            self.correct,
            self.count,
            self.entropy_sum,
            self.tokens,
            self.input_numel,
        ]);
    }

    /// The stats of a filled slot (`None`: no micro-batch there).
    fn read(s: &[f64]) -> Option<Self> {
        (s[0] > 0.0).then(|| MicroStats {
            nll_sum: s[1],
            aux: s[2],
            correct: s[3],
            count: s[4],
            entropy_sum: s[5],
            tokens: s[6],
            input_numel: s[7],
        })
    }
}

/// Metrics of SFT steps accumulated between two logs.
pub struct LogWindow {
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

    fn record(&self, at: &LogPoint, with_aux: bool) -> LogRecord {
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
            step: at.step,
            epoch: at.epoch,
            loss: self.loss_sum / steps,
            grad_norm: at.grad_norm,
            learning_rate: at.learning_rate,
            mean_token_accuracy: mean(&self.accuracy),
            entropy: mean(&self.entropy),
            num_tokens: at.num_tokens,
            aux_loss: with_aux.then(|| self.aux_sum / steps),
            tokens_per_second: self.tokens as f64 / secs,
        }
    }
}

/// [`forward_backward`] whose layers, as their backward finishes, start their gradient buckets on
/// `reduction` (their value: `grads` of the earlier micro-batches plus this backward's).
fn overlapped<M: LayeredCausalLm>(
    model: &M,
    vars: &[Var],
    mb: &MicroBatch,
    opts: &BackwardOptions,
    reduction: &mut StepReduction<'_>,
    grads: &Gradients,
) -> Result<super::backward::MicroStepOutput> {
    // the reducer's error, kept whole (the backward's callback can only return candle's)
    let mut failed: Option<SftError> = None;
    let mut on_layer = |layer: usize, acc: &mut [Option<candle_core::Tensor>]| {
        reduction.layer_done(layer, grads, acc).map_err(|e| {
            let m = e.to_string();
            failed = Some(e);
            candle_core::Error::Msg(m)
        })
    };
    let out = forward_backward_with(model, vars, mb, opts, &mut on_layer);
    match failed {
        Some(e) => Err(e),
        None => Ok(out?),
    }
}
