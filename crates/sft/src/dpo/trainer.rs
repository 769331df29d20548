//! [`DpoTrainer`]: TRL 1.16 `DPOTrainer` semantics on the SFT trainer's parts — the same AdamW with
//! clipping ([`crate::optim`]), LR schedules ([`crate::schedule`]), checkpoint directories and
//! resume ([`crate::checkpoint`]), data order ([`crate::preprocess::epoch_order`]), Ctrl-C
//! handling, logging/MLflow ([`crate::logging`]) and the gradient-checkpointed forward/backward
//! with the fused LM head ([`crate::trainer::forward_backward_rows`]).
//!
//! Per micro-batch of `B` pairs (chosen and rejected rows in one `[2B, T]` forward):
//! 1. the reference log-probs: the same model with the adapters disabled, forward only
//!    ([`super::reference`]), or the values precomputed once (`precompute_ref_log_probs`);
//! 2. the policy forward; from each row's summed completion log-prob the pair losses and their
//!    derivatives ([`super::loss`]); the loss of the micro-batch is the mean over its pairs
//!    (plus `router_aux_loss_coef · aux`), divided by the micro-batches of the step (TRL's
//!    `loss / current_gradient_accumulation_steps`);
//! 3. the backward, where `∂L/∂logp` of each row scales that row's LM-head gradient.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};

use super::batch::{pair_batch, PairBatch};
use super::config::DpoConfig;
use super::loss::{pair_loss, PairLogps};
use super::metrics::{DpoLogRecord, MetricsWindow, MicroMetrics};
use super::reference::with_adapters_disabled;
use super::tokenize::PreferenceExample;
use crate::checkpoint::{
    load_checkpoint, load_optimizer, resolve_resume, save_checkpoint, CheckpointContents, RngState,
    TrainerState, TRAINER_STATE_FILE,
};
use crate::config::TrainingConfig;
use crate::error::{Result, SftError};
use crate::logging::{write_loss_curve_png, LogEntry, TrainSummary};
use crate::optim::{AdamW, Gradients};
use crate::preprocess::epoch_order;
use crate::schedule::LrSchedule;
use crate::trainer::run::ExtraFiles;
use crate::trainer::{
    forward_backward_rows, forward_row_stats, interrupt, load_adapter_weights, BackwardOptions,
    LayeredCausalLm, LossStats, TrainOutcome, TrainableAdapters, TrainerOptions,
};

/// Receives progress from [`DpoTrainer::train`] (the DPO counterpart of
/// [`crate::trainer::TrainObserver`]).
pub trait DpoObserver {
    /// Training starts: `total_steps` optimizer steps, resuming after `start_step`.
    fn on_train_begin(&mut self, _total_steps: u64, _start_step: u64) -> Result<()> {
        Ok(())
    }
    /// After every optimizer step.
    fn on_step_end(&mut self, _global_step: u64, _loss: f64) -> Result<()> {
        Ok(())
    }
    /// Every `logging_steps` optimizer steps.
    fn on_log(&mut self, _record: &DpoLogRecord) -> Result<()> {
        Ok(())
    }
    /// A checkpoint directory was written.
    fn on_save(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Training ended.
    fn on_train_end(&mut self, _outcome: &TrainOutcome) -> Result<()> {
        Ok(())
    }
}

/// A [`DpoObserver`] that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDpoObserver;
impl DpoObserver for NoDpoObserver {}

/// The reference log-probabilities `(chosen, rejected)` of every pair.
pub type RefLogps = Vec<(f64, f64)>;

/// The DPO trainer: borrowed model and adapters, the tokenized pairs.
pub struct DpoTrainer<'a, M: LayeredCausalLm> {
    model: &'a M,
    adapters: &'a dyn TrainableAdapters,
    config: TrainingConfig,
    dpo: DpoConfig,
    pairs: Vec<PreferenceExample>,
    options: TrainerOptions,
    device: Device,
    extra_files: Option<ExtraFiles<'a>>,
}

/// The mutable state between optimizer steps.
struct DpoRun {
    optimizer: AdamW,
    grads: Gradients,
    vars: Vec<Var>,
    history: Vec<LogEntry>,
    global_step: u64,
    num_tokens: u64,
    window: MetricsWindow,
    step_losses: Vec<f64>,
    last_checkpoint: Option<PathBuf>,
}

/// What one optimizer step produced.
#[derive(Debug, Clone, Copy)]
struct DpoStep {
    loss: f64,
    grad_norm: f64,
    epoch: u64,
    consumed: usize,
    epoch_f: f64,
}

impl<'a, M: LayeredCausalLm> DpoTrainer<'a, M> {
    /// A trainer for `model` (with `adapters` installed) on tokenized `pairs`, micro-batches on
    /// `device`.
    ///
    /// # Errors
    /// [`SftError::Dataset`] without pairs; [`SftError::Config`] for invalid DPO options or zero
    /// batch sizes.
    pub fn new(
        model: &'a M,
        adapters: &'a dyn TrainableAdapters,
        config: TrainingConfig,
        dpo: DpoConfig,
        pairs: Vec<PreferenceExample>,
        device: Device,
    ) -> Result<Self> {
        if pairs.is_empty() {
            return Err(SftError::Dataset(
                "no preference pairs to train on (every row was bad or its prompt filled max_length)"
                    .into(),
            ));
        }
        if config.per_device_train_batch_size == 0 || config.gradient_accumulation_steps == 0 {
            return Err(SftError::config(
                "per_device_train_batch_size / gradient_accumulation_steps",
                "must be at least 1",
            ));
        }
        dpo.validate()?;
        Ok(Self {
            model,
            adapters,
            config,
            dpo,
            pairs,
            options: TrainerOptions::default(),
            device,
            extra_files: None,
        })
    }

    /// Replaces the [`TrainerOptions`] (pad token, LM-head chunk).
    pub fn with_options(mut self, options: TrainerOptions) -> Self {
        self.options = options;
        self
    }

    /// Also writes these files (tokenizer, chat template) into checkpoints and the final model.
    pub fn with_extra_files(mut self, f: ExtraFiles<'a>) -> Self {
        self.extra_files = Some(f);
        self
    }

    /// Optimizer steps of the run.
    pub fn total_steps(&self) -> u64 {
        self.config.total_steps(self.pairs.len())
    }

    fn micro_batches_per_epoch(&self) -> usize {
        self.pairs
            .len()
            .div_ceil(self.config.per_device_train_batch_size)
    }

    /// The micro-batches (pair indices) of optimizer step `step`, its epoch, and the epoch-relative
    /// index after the last one.
    fn step_micro_batches(&self, step: u64) -> (Vec<Vec<usize>>, u64, usize) {
        let cfg = &self.config;
        let upe = cfg.updates_per_epoch(self.pairs.len()).max(1);
        let epoch = step / upe;
        let (ga, bs) = (
            cfg.gradient_accumulation_steps,
            cfg.per_device_train_batch_size,
        );
        let order = epoch_order(self.pairs.len(), cfg.seed, epoch, cfg.shuffle);
        let first = (step % upe) as usize * ga;
        let last = (first + ga).min(self.micro_batches_per_epoch());
        let mbs = (first..last)
            .map(|m| order[m * bs..((m + 1) * bs).min(order.len())].to_vec())
            .collect();
        (mbs, epoch, last)
    }

    fn collate(&self, idx: &[usize]) -> Result<PairBatch> {
        let pairs: Vec<&PreferenceExample> = idx.iter().map(|&i| &self.pairs[i]).collect();
        pair_batch(
            &pairs,
            Some(self.config.max_length),
            self.options.pad_token_id,
            &self.device,
        )
    }

    /// The reference log-probs of one collated batch: forward only, adapters disabled.
    fn reference_of(&self, pb: &PairBatch) -> Result<RefLogps> {
        let stats = with_adapters_disabled(self.adapters, || {
            Ok(forward_row_stats(
                self.model,
                &pb.micro,
                self.options.lm_head_chunk,
            )?)
        })?;
        let b = pb.pairs();
        Ok((0..b)
            .map(|i| (-stats[i].nll_sum, -stats[b + i].nll_sum))
            .collect())
    }

    /// `precompute_ref_log_probs`: the reference log-probs of every pair, in dataset order, in
    /// batches of `precompute_ref_batch_size` (default: the train batch size).
    pub fn precompute_reference(&self) -> Result<RefLogps> {
        let bs = self
            .dpo
            .precompute_ref_batch_size
            .unwrap_or(self.config.per_device_train_batch_size)
            .max(1);
        let idx: Vec<usize> = (0..self.pairs.len()).collect();
        let mut out = Vec::with_capacity(self.pairs.len());
        for chunk in idx.chunks(bs) {
            out.extend(self.reference_of(&self.collate(chunk)?)?);
        }
        Ok(out)
    }

    /// Runs training (resuming from `resume_from_checkpoint` if set) until `total_steps` or
    /// Ctrl-C, then the end-of-training summary.
    pub fn train(&self, observer: &mut dyn DpoObserver) -> Result<TrainOutcome> {
        let started = Instant::now();
        interrupt::install();
        interrupt::clear();
        let total = self.total_steps();
        let schedule = self.config.schedule(total)?;
        let mut run = self.begin()?;
        let reference = match self.dpo.precompute_ref_log_probs {
            true => Some(self.precompute_reference()?),
            false => None,
        };
        observer.on_train_begin(total, run.global_step)?;
        let mut interrupted = false;
        while run.global_step < total {
            let step = self.optimizer_step(&mut run, &schedule, reference.as_deref())?;
            observer.on_step_end(run.global_step, step.loss)?;
            self.log_if_due(&mut run, &step, &schedule, total, observer)?;
            interrupted = interrupt::requested();
            let save = self.config.save_steps > 0 && run.global_step % self.config.save_steps == 0;
            if save || interrupted {
                self.checkpoint(&mut run, &step, &schedule, total, interrupted, observer)?;
            }
            if interrupted {
                break;
            }
        }
        self.finish(run, started, total, interrupted, observer)
    }

    /// A fresh optimizer, or the state of the `resume_from_checkpoint` checkpoint.
    fn begin(&self) -> Result<DpoRun> {
        let cfg = &self.config;
        let params = self.adapters.named_parameters();
        let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let mut run = DpoRun {
            optimizer: AdamW::new(params, cfg.adamw())?,
            grads: Gradients::new(vars.len()),
            vars,
            history: Vec::new(),
            global_step: 0,
            num_tokens: 0,
            window: MetricsWindow::default(),
            step_losses: Vec::new(),
            last_checkpoint: None,
        };
        if let Some(spec) = &cfg.resume_from_checkpoint {
            let dir = resolve_resume(&cfg.output_dir, spec)?;
            let loaded = load_checkpoint(&dir)?;
            load_adapter_weights(self.adapters, &dir)?;
            load_optimizer(&dir, &mut run.optimizer)?;
            run.global_step = loaded.trainer_state.global_step;
            run.num_tokens = loaded.trainer_state.num_input_tokens_seen;
            run.history = loaded.trainer_state.log_history;
        }
        Ok(run)
    }

    /// One optimizer step: every micro-batch forwarded and back-propagated, gradients summed,
    /// the loss checked, then clipping and AdamW.
    fn optimizer_step(
        &self,
        run: &mut DpoRun,
        schedule: &LrSchedule,
        reference: Option<&[(f64, f64)]>,
    ) -> Result<DpoStep> {
        let cfg = &self.config;
        let (mbs, epoch, consumed) = self.step_micro_batches(run.global_step);
        let n_micro = mbs.len().max(1);
        let opts = BackwardOptions {
            num_items_in_batch: 1,
            aux_scale: cfg.router_aux_loss_coef / n_micro as f64,
            gradient_checkpointing: cfg.gradient_checkpointing,
            lm_head_chunk: self.options.lm_head_chunk,
        };
        let mut loss = 0.0;
        for idx in &mbs {
            let pb = self.collate(idx)?;
            let refs = match reference {
                Some(r) => idx.iter().map(|&i| r[i]).collect(),
                None => self.reference_of(&pb)?,
            };
            let (micro_loss, metrics, grads) = self.micro_step(run, &pb, &refs, &opts, n_micro)?;
            loss += micro_loss;
            run.window.add_micro(metrics);
            run.num_tokens += pb.num_tokens;
            for (i, g) in grads.into_iter().enumerate() {
                if let Some(g) = g {
                    let g = match run.grads.get(i) {
                        Some(acc) => (acc + g)?,
                        None => g,
                    };
                    run.grads.set(i, g)?;
                }
            }
        }
        let step_no = run.global_step + 1;
        if !loss.is_finite() {
            return Err(SftError::NonFiniteLoss {
                step: step_no,
                loss,
            });
        }
        let lr = schedule.lr(run.global_step);
        let max_norm = (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm);
        let grad_norm = match run.optimizer.clip_and_step(&mut run.grads, lr, max_norm)? {
            Some(t) => t.to_scalar::<f32>()? as f64,
            None => 0.0,
        };
        run.global_step = step_no;
        run.step_losses.push(loss);
        run.window.add_step(loss);
        Ok(DpoStep {
            loss,
            grad_norm,
            epoch,
            consumed,
            epoch_f: epoch as f64 + consumed as f64 / self.micro_batches_per_epoch() as f64,
        })
    }

    /// Forward + backward of one micro-batch; returns its share of the step loss, its metrics
    /// and the gradients.
    fn micro_step(
        &self,
        run: &DpoRun,
        pb: &PairBatch,
        refs: &[(f64, f64)],
        opts: &BackwardOptions,
        n_micro: usize,
    ) -> Result<(f64, MicroMetrics, Vec<Option<Tensor>>)> {
        let b = pb.pairs();
        let (kind, beta, eps) = (self.dpo.loss_type, self.dpo.beta, self.dpo.label_smoothing);
        let mut seen: Option<(Vec<PairLogps>, Vec<super::loss::PairLoss>, Vec<LossStats>)> = None;
        let mut weigh = |stats: &[LossStats]| -> candle_core::Result<Vec<f64>> {
            if stats.len() != 2 * b || refs.len() != b {
                candle_core::bail!("DPO batch of {b} pairs got {} rows", stats.len());
            }
            let w = 1.0 / (b * n_micro) as f64;
            let mut scales = vec![0.0; 2 * b];
            let (mut ps, mut ls) = (Vec::with_capacity(b), Vec::with_capacity(b));
            for i in 0..b {
                let p = PairLogps {
                    chosen: -stats[i].nll_sum,
                    rejected: -stats[b + i].nll_sum,
                    ref_chosen: refs[i].0,
                    ref_rejected: refs[i].1,
                    chosen_len: pb.chosen_lens[i],
                    rejected_len: pb.rejected_lens[i],
                };
                let l = pair_loss(kind, beta, eps, &p);
                // logp = −Σ nll, so ∂L/∂h = −(∂L/∂logp) · ∂(Σ nll)/∂h.
                scales[i] = -w * l.d_chosen;
                scales[b + i] = -w * l.d_rejected;
                ps.push(p);
                ls.push(l);
            }
            seen = Some((ps, ls, stats.to_vec()));
            Ok(scales)
        };
        let out = forward_backward_rows(self.model, &run.vars, &pb.micro, opts, &mut weigh)?;
        let Some((ps, ls, stats)) = seen else {
            return Err(SftError::Trainer("the DPO loss was not evaluated".into()));
        };
        let mean = |f: &dyn Fn(usize) -> f64| (0..b).map(f).sum::<f64>() / b as f64;
        let loss_mean = mean(&|i| ls[i].loss);
        let tokens: usize = stats.iter().map(|s| s.count).sum();
        let chosen_tokens: usize = stats[..b].iter().map(|s| s.count).sum();
        let ratio = |num: f64, den: usize| if den > 0 { num / den as f64 } else { 0.0 };
        let metrics = MicroMetrics {
            rewards_chosen: mean(&|i| ls[i].chosen_reward),
            rewards_rejected: mean(&|i| ls[i].rejected_reward),
            rewards_accuracies: mean(&|i| f64::from(ls[i].chosen_reward > ls[i].rejected_reward)),
            rewards_margins: mean(&|i| ls[i].chosen_reward - ls[i].rejected_reward),
            logps_chosen: mean(&|i| ps[i].chosen),
            logps_rejected: mean(&|i| ps[i].rejected),
            entropy: ratio(stats.iter().map(|s| s.entropy_sum).sum(), tokens),
            mean_token_accuracy: ratio(
                stats[..b].iter().map(|s| s.correct as f64).sum(),
                chosen_tokens,
            ),
            aux_loss: out.aux,
        };
        let aux = self.config.router_aux_loss_coef * out.aux.unwrap_or(0.0);
        Ok(((loss_mean + aux) / n_micro as f64, metrics, out.grads))
    }

    fn log_if_due(
        &self,
        run: &mut DpoRun,
        step: &DpoStep,
        schedule: &LrSchedule,
        total: u64,
        observer: &mut dyn DpoObserver,
    ) -> Result<()> {
        let g = run.global_step;
        if g % self.config.logging_steps.max(1) != 0 && g != total {
            return Ok(());
        }
        let rec = run.window.record(
            g,
            step.epoch_f,
            step.grad_norm,
            schedule.logged_lr(g),
            run.num_tokens,
        );
        observer.on_log(&rec)?;
        run.history.push(LogEntry::Dpo(rec));
        run.window = MetricsWindow::default();
        Ok(())
    }

    /// A checkpoint directory, written atomically (the SFT layout).
    fn checkpoint(
        &self,
        run: &mut DpoRun,
        step: &DpoStep,
        schedule: &LrSchedule,
        total: u64,
        interrupted: bool,
        observer: &mut dyn DpoObserver,
    ) -> Result<()> {
        let cfg = &self.config;
        let g = run.global_step;
        let ts = TrainerState::new(
            cfg,
            g,
            step.epoch_f,
            total,
            run.num_tokens,
            run.history.clone(),
            interrupted || g == total,
        );
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

    fn finish(
        &self,
        run: DpoRun,
        started: Instant,
        total: u64,
        interrupted: bool,
        observer: &mut dyn DpoObserver,
    ) -> Result<TrainOutcome> {
        let cfg = &self.config;
        let DpoRun {
            mut history,
            global_step,
            num_tokens,
            step_losses,
            last_checkpoint,
            ..
        } = run;
        let n = step_losses.len();
        let train_loss = if n == 0 {
            0.0
        } else {
            step_losses.iter().sum::<f64>() / n as f64
        };
        let runtime_s = started.elapsed().as_secs_f64();
        let samples = n * cfg.gradient_accumulation_steps * cfg.per_device_train_batch_size;
        let summary = (!interrupted).then(|| TrainSummary {
            train_runtime: runtime_s,
            train_samples_per_second: samples as f64 / runtime_s.max(1e-9),
            train_steps_per_second: n as f64 / runtime_s.max(1e-9),
            total_flos: 0.0,
            train_loss,
            epoch: global_step as f64 / cfg.updates_per_epoch(self.pairs.len()).max(1) as f64,
            step: global_step,
        });
        if let Some(s) = &summary {
            history.push(LogEntry::Summary(s.clone()));
            let out = &cfg.output_dir;
            std::fs::create_dir_all(out).map_err(|e| SftError::io(out, e))?;
            let ts = TrainerState::new(
                cfg,
                global_step,
                s.epoch,
                total,
                num_tokens,
                history.clone(),
                true,
            );
            crate::atomic::write_json(&out.join(TRAINER_STATE_FILE), &ts)?;
            write_loss_curve_png(&out.join("loss_curve.png"), &history)?;
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

    fn write_model_files(&self, dir: &Path) -> Result<()> {
        self.adapters.save_adapter(dir)?;
        if let Some(f) = self.extra_files {
            f(dir)?;
        }
        Ok(())
    }

    /// TRL's `save_model`: the adapter (and extra files) into `dir`, default `output_dir`.
    pub fn save_model(&self, dir: Option<&Path>) -> Result<PathBuf> {
        let dir = dir.unwrap_or(&self.config.output_dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| SftError::io(&dir, e))?;
        self.write_model_files(&dir)?;
        Ok(dir)
    }
}
