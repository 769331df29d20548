//! Evaluation during training: the teacher-forced loss of held-out rows with the training masks,
//! as HF's eval loop computes `eval_loss` and TRL's `SFTTrainer` its `eval_entropy` /
//! `eval_mean_token_accuracy`.
//!
//! HF's loop takes the rows in order in batches of `per_device_eval_batch_size`, computes each
//! batch's loss as the mean over its trained tokens, repeats it once per row of the batch and
//! averages: `eval_loss = Σ_b n_b · loss_b / Σ_b n_b`. TRL's entropy and token accuracy are
//! token means per batch, averaged over batches.

use candle_core::Device;

use super::backward::{forward_loss, LayeredCausalLm};
use super::batch::micro_batch;
use crate::collate::{pad, Example};
use crate::error::Result;

/// The teacher-forced metrics of a set of eval rows ([`eval_loss`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalLoss {
    /// HF's `eval_loss` (row-weighted mean of the batch token-mean losses).
    pub loss: f64,
    /// Mean over batches of the token-mean entropy (nats).
    pub entropy: f64,
    /// Mean over batches of the token accuracy.
    pub mean_token_accuracy: f64,
    /// Rows evaluated (batches without a trained token are left out of every mean).
    pub rows: usize,
    /// Batches evaluated.
    pub batches: usize,
    /// Trained tokens scored.
    pub tokens: usize,
}

impl EvalLoss {
    /// `exp(loss)`.
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Forward-only loss of `rows`, in order, in batches of `batch_size` rows padded with `pad_id`,
/// on `device` (see the module doc for how the batches are averaged). `lm_head_chunk` bounds the
/// logits rows computed at once.
pub fn eval_loss<M: LayeredCausalLm>(
    model: &M,
    rows: &[Example],
    batch_size: usize,
    pad_id: u32,
    lm_head_chunk: usize,
    device: &Device,
) -> Result<EvalLoss> {
    let (mut weighted, mut entropy, mut accuracy) = (0.0, 0.0, 0.0);
    let mut out = EvalLoss {
        loss: f64::NAN,
        entropy: f64::NAN,
        mean_token_accuracy: f64::NAN,
        rows: 0,
        batches: 0,
        tokens: 0,
    };
    for chunk in rows.chunks(batch_size.max(1)) {
        let mb = micro_batch(&pad(chunk)?, pad_id, device)?;
        let stats = forward_loss(model, &mb, lm_head_chunk)?;
        if stats.count == 0 {
            continue;
        }
        let n = stats.count as f64;
        weighted += chunk.len() as f64 * stats.nll_sum / n;
        entropy += stats.entropy_sum / n;
        accuracy += stats.correct as f64 / n;
        out.rows += chunk.len();
        out.batches += 1;
        out.tokens += stats.count;
    }
    if out.batches > 0 {
        out.loss = weighted / out.rows as f64;
        out.entropy = entropy / out.batches as f64;
        out.mean_token_accuracy = accuracy / out.batches as f64;
    }
    Ok(out)
}
