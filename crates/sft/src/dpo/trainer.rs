//! [`DpoTrainer`]: TRL 1.16 `DPOTrainer` semantics as an [`Objective`] of the loop SFT uses
//! ([`TrainLoop`]: data order, accumulation, AdamW with clipping, LR schedule, logging/MLflow,
//! checkpoints, resume, Ctrl-C), with the gradient-checkpointed forward/backward and the fused LM
//! head ([`crate::trainer::forward_backward_rows`]).
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

use candle_core::{Device, Tensor, Var};

use super::batch::{pair_batch, PairBatch};
use super::config::DpoConfig;
use super::loss::{pair_loss, PairLogps};
use super::metrics::{MetricsWindow, MicroMetrics};
use super::reference::with_adapters_disabled;
use super::tokenize::PreferenceExample;
use crate::config::TrainingConfig;
use crate::distributed::{absorb, StepReduction};
use crate::error::{Result, SftError};
use crate::logging::LogEntry;
use crate::optim::Gradients;
use crate::trainer::run::ExtraFiles;
use crate::trainer::{
    forward_backward_rows, forward_row_stats, BackwardOptions, LayeredCausalLm, LogPoint,
    LossStats, Objective, StepLoss, TrainLoop, TrainObserver, TrainOutcome, TrainableAdapters,
    TrainerOptions,
};

/// An observer that does nothing.
pub use crate::trainer::NoObserver as NoDpoObserver;
/// What receives DPO progress: the SFT [`TrainObserver`] (DPO records arrive in
/// [`TrainObserver::on_dpo_log`]).
pub use crate::trainer::TrainObserver as DpoObserver;

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

    /// The shared loop over `objective`.
    fn driver<'t>(
        &'t self,
        objective: &'t DpoObjective<'t, 'a, M>,
    ) -> TrainLoop<'t, DpoObjective<'t, 'a, M>> {
        TrainLoop {
            objective,
            adapters: self.adapters,
            config: &self.config,
            extra_files: self.extra_files,
        }
    }

    /// Runs training (resuming from `resume_from_checkpoint` if set) with the loop SFT uses
    /// ([`TrainLoop::train`]) until `total_steps` or Ctrl-C, then the end-of-training summary.
    /// With `precompute_ref_log_probs` the reference log-probs of every pair come first.
    pub fn train(&self, observer: &mut dyn TrainObserver) -> Result<TrainOutcome> {
        let reference = match self.dpo.precompute_ref_log_probs {
            true => Some(self.precompute_reference()?),
            false => None,
        };
        let objective = DpoObjective {
            trainer: self,
            reference,
        };
        self.driver(&objective).train(observer)
    }

    /// Forward + backward of one micro-batch; returns its share of the step loss, its metrics
    /// and the gradients.
    fn micro_step(
        &self,
        vars: &[Var],
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
        let out = forward_backward_rows(self.model, vars, &pb.micro, opts, &mut weigh)?;
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

    /// TRL's `save_model`: the adapter (and extra files) into `dir`, default `output_dir`, and
    /// the resolved config as `training_args.json` (as [`crate::trainer::Trainer::save_model`]).
    pub fn save_model(&self, dir: Option<&Path>) -> Result<PathBuf> {
        let objective = DpoObjective {
            trainer: self,
            reference: None,
        };
        self.driver(&objective).save_model(dir)
    }
}

/// DPO's step for the shared loop: a [`DpoTrainer`] with the precomputed reference log-probs,
/// if any.
pub struct DpoObjective<'t, 'a, M: LayeredCausalLm> {
    trainer: &'t DpoTrainer<'a, M>,
    reference: Option<RefLogps>,
}

impl<M: LayeredCausalLm> Objective for DpoObjective<'_, '_, M> {
    type Window = MetricsWindow;

    fn num_rows(&self) -> usize {
        self.trainer.pairs.len()
    }

    fn new_window(&self) -> MetricsWindow {
        MetricsWindow::default()
    }

    /// Every micro-batch: collated, its reference log-probs (precomputed or forwarded with the
    /// adapters disabled), then the policy forward + backward; the step loss is the sum of the
    /// micro-batches' shares.
    fn step(
        &self,
        vars: &[Var],
        mbs: &[Vec<usize>],
        grads: &mut Gradients,
        window: &mut MetricsWindow,
        reduction: Option<&mut StepReduction<'_>>,
    ) -> Result<StepLoss> {
        let reduction = reduction.as_deref();
        let t = self.trainer;
        let n_micro = mbs.len().max(1);
        let opts = BackwardOptions {
            num_items_in_batch: 1,
            aux_scale: t.config.router_aux_loss_coef / n_micro as f64,
            gradient_checkpointing: t.config.gradient_checkpointing,
            lm_head_chunk: t.options.lm_head_chunk,
        };
        let (mut loss, mut tokens) = (0.0, 0u64);
        for idx in mbs {
            let pb = t.collate(idx)?;
            let refs = match &self.reference {
                Some(r) => idx.iter().map(|&i| r[i]).collect(),
                None => t.reference_of(&pb)?,
            };
            let (micro_loss, metrics, g) = t.micro_step(vars, &pb, &refs, &opts, n_micro)?;
            loss += micro_loss;
            window.add_micro(metrics);
            tokens += pb.num_tokens;
            absorb(reduction, grads, g)?;
        }
        window.add_step(loss);
        // TRL's DPO batches carry no `input_ids`, so HF's `floating_point_ops` counts 0 for them
        Ok(StepLoss {
            loss,
            tokens,
            input_numel: 0,
        })
    }

    fn record(&self, window: &MetricsWindow, at: &LogPoint) -> LogEntry {
        LogEntry::Dpo(window.record(
            at.step,
            at.epoch,
            at.grad_norm,
            at.learning_rate,
            at.num_tokens,
        ))
    }
}
