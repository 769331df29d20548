//! One micro-batch forward + backward, with or without per-layer gradient checkpointing.
//!
//! candle has no built-in activation checkpointing. With it on, the forward pass runs every decoder
//! layer on a *detached* input and keeps only each layer's input `[B, T, H]`; the backward pass then
//! walks the layers in reverse, recomputes layer `i` from its input wrapped in a [`Var`], and
//! back-propagates the surrogate `Σ out · ∂L/∂out` (+ that layer's share of the router aux loss),
//! which yields the LoRA gradients of the layer and `∂L/∂input` for the layer below. Peak memory is
//! one layer's autograd graph instead of all of them. Without it, one graph spans the whole model.
//!
//! The LM head is applied only at labelled positions, through [`fused_lm_head_loss`].

use super::aux_loss::AuxLossPlan;
use super::lm_loss::{fused_lm_head_loss, lm_head_weight_grad};
use candle_core::{Result, Tensor, Var};
use gptoss_kernels::profile::scope;
use gptoss_kernels::seed_gradient;

/// The per-layer view of a causal LM that training needs (implemented for
/// [`gptoss_model::GptOssForCausalLM`] in [`super::model_adapter`]).
pub trait LayeredCausalLm {
    /// Masks and rotary tables shared by all layers of one batch.
    type Context;
    /// Number of decoder layers.
    fn num_layers(&self) -> usize;
    /// Experts per token of the router (for the aux loss).
    fn experts_per_token(&self) -> usize;
    /// Token embeddings: `input_ids` `[B, T]` u32 → `[B, T, H]` (run dtype).
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor>;
    /// Builds the per-batch context from the micro-batch's ids, attention mask (`[B, T]`, 1 = token,
    /// 0 = pad) and, for a packed row, its sequence lengths.
    fn context(&self, batch: &MicroBatch) -> Result<Self::Context>;
    /// Decoder layer `i`: `h` `[B, T, H]` → (`[B, T, H]`, router logits `[B·T, E]`).
    fn layer(&self, i: usize, h: &Tensor, ctx: &Self::Context) -> Result<(Tensor, Tensor)>;
    /// Final norm: `[.., H]` → `[.., H]`.
    fn final_norm(&self, h: &Tensor) -> Result<Tensor>;
    /// The LM-head weight `[V, H]` (frozen, or a `Var` in full-parameter training).
    fn lm_head_weight(&self) -> &Tensor;
    /// Whether the embedding table takes part in autograd (full-parameter training); default
    /// false. Under gradient checkpointing only then is its gradient computed.
    fn embeddings_trainable(&self) -> bool {
        false
    }
    /// Number of base-model parameters except the input embedding (HF's
    /// `num_parameters(exclude_embeddings=True)` before LoRA is added; for `total_flos`).
    fn num_parameters_excluding_embeddings(&self) -> u64;
    /// The longest sequence the model's positions cover (`max_position_embeddings`); `None`
    /// (the default): unbounded.
    fn max_positions(&self) -> Option<usize> {
        None
    }
}

/// One micro-batch, already on the model's device.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// `[B, T]` u32.
    pub input_ids: Tensor,
    /// `[B, T]` (1 = token, 0 = pad), passed to the model.
    pub attention_mask: Option<Tensor>,
    /// Flattened row-major `[B·T]` indices `b·T + t` of the positions whose next-token label is
    /// trained (`labels[b, t+1] != -100`).
    pub positions: Vec<u32>,
    /// The next-token label at each of `positions`.
    pub targets: Vec<u32>,
    /// `[B·T]` token weights for the aux loss (the attention mask, 1.0 when absent).
    pub token_mask: Vec<f32>,
    /// For a packed row (padding-free, `B = 1`): the lengths of the sequences laid back to back;
    /// attention never crosses them and positions restart in each.
    pub packed_seq_lens: Option<Vec<usize>>,
}

impl MicroBatch {
    /// One unpadded row of `ids` with every next token trained (plain causal-LM pre-training
    /// style), on `device`: `input_ids` `[1, T]` u32, `T - 1` labelled positions.
    pub fn causal(ids: &[u32], device: &candle_core::Device) -> Result<Self> {
        let t = ids.len();
        Ok(Self {
            input_ids: Tensor::from_slice(ids, (1, t), device)?,
            attention_mask: None,
            positions: (0..t.saturating_sub(1) as u32).collect(),
            targets: ids.iter().skip(1).copied().collect(),
            token_mask: vec![1.0; t],
            packed_seq_lens: None,
        })
    }
}

/// Options of [`forward_backward`].
#[derive(Debug, Clone, Copy)]
pub struct BackwardOptions {
    /// Divides the summed token NLL (TRL's `num_items_in_batch`: trained tokens in the optimizer step).
    pub num_items_in_batch: usize,
    /// `router_aux_loss_coef / gradient_accumulation_steps` (0 disables the aux loss).
    pub aux_scale: f64,
    /// Recompute layers during backward.
    pub gradient_checkpointing: bool,
    /// Rows per LM-head chunk.
    pub lm_head_chunk: usize,
}

/// What one micro-batch produced.
#[derive(Debug)]
pub struct MicroStepOutput {
    /// `Σ −log p` over the trained positions.
    pub nll_sum: f64,
    /// Trained positions.
    pub count: usize,
    /// Trained positions whose argmax is the label.
    pub correct: usize,
    /// `Σ entropy` over the trained positions.
    pub entropy_sum: f64,
    /// Unscaled aux loss value (when enabled).
    pub aux: Option<f64>,
    /// Gradient per parameter (same order as the `params` given; `None` if it got none).
    pub grads: Vec<Option<Tensor>>,
}

/// Forward + backward of one micro-batch; returns the statistics and the gradients of `params`
/// of the loss `Σ nll / num_items_in_batch + aux_scale · aux`.
pub fn forward_backward<M: LayeredCausalLm>(
    model: &M,
    params: &[Var],
    batch: &MicroBatch,
    opts: &BackwardOptions,
) -> Result<MicroStepOutput> {
    if opts.gradient_checkpointing {
        checkpointed(model, params, batch, opts, None, None)
    } else {
        plain(model, params, batch, opts, None)
    }
}

/// Called in a checkpointed backward after each decoder layer's backward, from the last layer to
/// the first, with that layer's index and the micro-batch's gradients so far (slots as `params`;
/// the callee may take the slots it is done with, e.g. to start their all-reduce).
pub type LayerDone<'a> = &'a mut dyn FnMut(usize, &mut [Option<Tensor>]) -> Result<()>;

/// [`forward_backward`], calling `on_layer` after each decoder layer's backward when
/// `opts.gradient_checkpointing` is on (without it one backward spans the model and `on_layer`
/// is never called). The gradients `on_layer` takes are absent from the returned `grads`.
pub fn forward_backward_with<M: LayeredCausalLm>(
    model: &M,
    params: &[Var],
    batch: &MicroBatch,
    opts: &BackwardOptions,
    on_layer: LayerDone<'_>,
) -> Result<MicroStepOutput> {
    if opts.gradient_checkpointing {
        checkpointed(model, params, batch, opts, None, Some(on_layer))
    } else {
        plain(model, params, batch, opts, None)
    }
}

/// Per-row weighting of the LM-head gradient, for sequence-level objectives (DPO): called once per
/// micro-batch, after the forward, with the [`LossStats`] of each batch row (`B` entries, row order;
/// a row without trained positions has zero stats); returns each row's multiplier of
/// `∂(Σ nll of the row)/∂hidden` (it replaces `1 / num_items_in_batch`; it may be negative).
pub type RowGradScale<'a> = &'a mut dyn FnMut(&[LossStats]) -> Result<Vec<f64>>;

/// [`forward_backward`] for a loss that is a function of each row's summed log-probability: the
/// gradient of row `b`'s trained positions is scaled by `row_scale(stats)[b]` instead of
/// `1 / num_items_in_batch` (`opts.num_items_in_batch` is unused); the router aux loss, gradient
/// checkpointing and the returned totals are as in [`forward_backward`].
///
/// # Shapes
/// `batch.input_ids` `[B, T]`; `row_scale` receives and returns `B` values.
pub fn forward_backward_rows<M: LayeredCausalLm>(
    model: &M,
    params: &[Var],
    batch: &MicroBatch,
    opts: &BackwardOptions,
    row_scale: RowGradScale<'_>,
) -> Result<MicroStepOutput> {
    if opts.gradient_checkpointing {
        checkpointed(model, params, batch, opts, Some(row_scale), None)
    } else {
        plain(model, params, batch, opts, Some(row_scale))
    }
}

/// Token statistics of a forward-only pass ([`forward_loss`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    /// `Σ −log p` over the trained positions.
    pub nll_sum: f64,
    /// Trained positions.
    pub count: usize,
    /// Trained positions whose argmax is the label.
    pub correct: usize,
    /// `Σ entropy` over the trained positions (nats).
    pub entropy_sum: f64,
}

/// Forward only, for evaluation: the loss statistics of `batch` at its trained positions, with
/// the same masks, positions and fused LM head as training. Every layer runs on a detached input,
/// so no autograd graph outlives a layer; `lm_head_chunk` bounds the logits rows at once.
pub fn forward_loss<M: LayeredCausalLm>(
    model: &M,
    batch: &MicroBatch,
    lm_head_chunk: usize,
) -> Result<LossStats> {
    let hn = detached_final_hidden(model, batch)?;
    let sel = select_positions(&hn, &batch.positions)?;
    let fused = fused_lm_head_loss(
        &sel,
        model.lm_head_weight(),
        &batch.targets,
        0.0,
        lm_head_chunk,
    )?;
    Ok(LossStats {
        nll_sum: fused.nll_sum,
        count: fused.count,
        correct: fused.correct,
        entropy_sum: fused.entropy_sum,
    })
}

/// Forward only, per batch row: the [`LossStats`] of each row's trained positions (`B` entries),
/// e.g. the reference log-probabilities of DPO (`−nll_sum` of a row). No autograd graph outlives
/// a layer; `lm_head_chunk` bounds the logits rows at once.
///
/// # Shapes
/// `batch.input_ids` `[B, T]` → `B` stats.
pub fn forward_row_stats<M: LayeredCausalLm>(
    model: &M,
    batch: &MicroBatch,
    lm_head_chunk: usize,
) -> Result<Vec<LossStats>> {
    let hn = detached_final_hidden(model, batch)?;
    let sel = select_positions(&hn, &batch.positions)?;
    let (b, t, _) = hn.dims3()?;
    let (stats, _) = per_row_head(&sel, model.lm_head_weight(), batch, (b, t), lm_head_chunk)?;
    Ok(stats)
}

/// The final-normed hidden states `[B, T, H]` of a forward in which every layer runs on a
/// detached input.
fn detached_final_hidden<M: LayeredCausalLm>(model: &M, batch: &MicroBatch) -> Result<Tensor> {
    let ctx = model.context(batch)?;
    let mut h = model.embed(&batch.input_ids)?.detach();
    for i in 0..model.num_layers() {
        h = model.layer(i, &h, &ctx)?.0.detach();
    }
    model.final_norm(&h)
}

/// The fused LM-head loss of each batch row separately: `sel` `[N, H]` holds the trained rows in
/// `batch.positions` order (row-major, so each batch row's positions are contiguous). Returns the
/// per-row stats and the per-row unscaled gradients `∂(Σ nll_row)/∂sel_row` (`[n_b, H]`, `None`
/// for rows without trained positions).
fn per_row_head(
    sel: &Tensor,
    weight: &Tensor,
    batch: &MicroBatch,
    (b, t): (usize, usize),
    chunk: usize,
) -> Result<(Vec<LossStats>, Vec<Option<Tensor>>)> {
    let mut stats = vec![LossStats::default(); b];
    let mut grads = vec![None; b];
    let mut start = 0;
    while start < batch.positions.len() {
        let row = batch.positions[start] as usize / t.max(1);
        let mut end = start;
        while end < batch.positions.len() && batch.positions[end] as usize / t.max(1) == row {
            end += 1;
        }
        if row >= b || stats[row].count != 0 {
            candle_core::bail!("label positions are not grouped by batch row (row {row} of {b})");
        }
        let fused = fused_lm_head_loss(
            &sel.narrow(0, start, end - start)?,
            weight,
            &batch.targets[start..end],
            1.0,
            chunk,
        )?;
        stats[row] = LossStats {
            nll_sum: fused.nll_sum,
            count: fused.count,
            correct: fused.correct,
            entropy_sum: fused.entropy_sum,
        };
        grads[row] = Some(fused.grad_hidden);
        start = end;
    }
    Ok((stats, grads))
}

/// [`per_row_head`], then each row's gradient scaled by `row_scale(stats)`: the totals and the
/// `[N, H]` gradient in the shape [`fused_lm_head_loss`] returns.
fn scaled_row_head(
    sel: &Tensor,
    weight: &Tensor,
    batch: &MicroBatch,
    dims: (usize, usize),
    chunk: usize,
    row_scale: RowGradScale<'_>,
) -> Result<super::lm_loss::FusedLmLoss> {
    let (stats, grads) = per_row_head(sel, weight, batch, dims, chunk)?;
    let scales = row_scale(&stats)?;
    if scales.len() != stats.len() {
        candle_core::bail!(
            "row_scale returned {} scales for {} rows",
            scales.len(),
            stats.len()
        );
    }
    let mut parts = Vec::with_capacity(grads.len());
    for (g, s) in grads.into_iter().zip(&scales) {
        if let Some(g) = g {
            parts.push((g * *s)?);
        }
    }
    let grad_hidden = if parts.is_empty() {
        Tensor::zeros((0, sel.dim(1)?), sel.dtype(), sel.device())?
    } else {
        Tensor::cat(&parts, 0)?
    };
    Ok(super::lm_loss::FusedLmLoss {
        nll_sum: stats.iter().map(|s| s.nll_sum).sum(),
        correct: stats.iter().map(|s| s.correct).sum(),
        entropy_sum: stats.iter().map(|s| s.entropy_sum).sum(),
        count: stats.iter().map(|s| s.count).sum(),
        grad_hidden,
    })
}

/// Selects the labelled rows of the final hidden states `[B, T, H]` → `[N, H]`.
fn select_positions(h: &Tensor, positions: &[u32]) -> Result<Tensor> {
    let (b, t, hd) = h.dims3()?;
    let idx = Tensor::from_slice(positions, positions.len(), h.device())?;
    h.reshape((b * t, hd))?.index_select(&idx, 0)
}

/// Final norm + fused LM head on `h_last`; returns the stats and the surrogate scalar whose
/// gradient w.r.t. `h_last` is `∂(Σ nll / num_items)/∂h_last`.
fn head<M: LayeredCausalLm>(
    model: &M,
    h_last: &Tensor,
    batch: &MicroBatch,
    opts: &BackwardOptions,
    row_scale: Option<RowGradScale<'_>>,
) -> Result<(super::lm_loss::FusedLmLoss, Option<Tensor>)> {
    let hn = model.final_norm(h_last)?;
    let sel = select_positions(&hn.detach(), &batch.positions)?;
    let row_scale_used = row_scale.is_some();
    let fused = match row_scale {
        Some(f) => {
            let (b, t, _) = hn.dims3()?;
            let w = model.lm_head_weight();
            scaled_row_head(&sel, w, batch, (b, t), opts.lm_head_chunk, f)?
        }
        None => fused_lm_head_loss(
            &sel,
            model.lm_head_weight(),
            &batch.targets,
            1.0 / opts.num_items_in_batch.max(1) as f64,
            opts.lm_head_chunk,
        )?,
    };
    let head_term = match batch.positions.is_empty() || !model.lm_head_weight().track_op() {
        true => None,
        false if row_scale_used => {
            candle_core::bail!(
                "a trainable LM head (full-parameter training) with a per-row loss (DPO) is not \
                 supported; train LoRA adapters for DPO"
            )
        }
        false => Some(lm_head_term(model, &sel, batch, opts)?),
    };
    let surrogate = if batch.positions.is_empty() {
        None
    } else {
        // The gradient w.r.t. all rows of `hn` (zero where unlabelled), gathered outside the graph:
        // an `index_select` in the graph would cost candle's index_add backward (one thread per
        // column looping over all rows: 1.2 ms per step at 2048 tokens on an H200).
        let (b, t, hd) = hn.dims3()?;
        let n = batch.positions.len();
        let mut inv = vec![n as u32; b * t];
        for (i, &p) in batch.positions.iter().enumerate() {
            match inv.get_mut(p as usize) {
                Some(slot) => *slot = i as u32,
                None => candle_core::bail!("label position {p} outside the {b}x{t} batch"),
            }
        }
        let zero = Tensor::zeros((1, hd), fused.grad_hidden.dtype(), hn.device())?;
        let padded = Tensor::cat(&[&fused.grad_hidden, &zero], 0)?;
        let inv = Tensor::from_vec(inv, b * t, hn.device())?;
        let g = padded.index_select(&inv, 0)?.reshape((b, t, hd))?;
        Some(seed_gradient(&hn, &g)?)
    };
    let surrogate = match (surrogate, head_term) {
        (Some(s), Some(t)) => Some((s + t)?),
        (s, t) => s.or(t),
    };
    Ok((fused, surrogate))
}

/// For a trainable LM-head weight (a `Var`, full-parameter training): the scalar whose gradient
/// with respect to the weight is `∂(Σ nll / num_items_in_batch)/∂W` ([`lm_head_weight_grad`] of
/// the selected final hidden states `sel` `[N, H]`).
fn lm_head_term<M: LayeredCausalLm>(
    model: &M,
    sel: &Tensor,
    batch: &MicroBatch,
    opts: &BackwardOptions,
) -> Result<Tensor> {
    let w = model.lm_head_weight();
    let g = lm_head_weight_grad(
        sel,
        w,
        &batch.targets,
        1.0 / opts.num_items_in_batch.max(1) as f64,
        opts.lm_head_chunk,
    )?;
    seed_gradient(w, &g)
}

/// Under gradient checkpointing the embeddings run detached; with a trainable embedding table
/// (full-parameter training) this adds its gradient, from `grad_embed` `[B, T, H]` (the
/// gradient w.r.t. the embeddings' output), to `acc`.
fn embedding_grads<M: LayeredCausalLm>(
    model: &M,
    params: &[Var],
    batch: &MicroBatch,
    grad_embed: Option<Tensor>,
    acc: &mut [Option<Tensor>],
) -> Result<()> {
    let Some(g) = grad_embed else { return Ok(()) };
    if !model.embeddings_trainable() {
        return Ok(());
    }
    let s = seed_gradient(&model.embed(&batch.input_ids)?, &g)?;
    add_grads(acc, collect(params, &s.backward()?))
}

fn collect(params: &[Var], grads: &candle_core::backprop::GradStore) -> Vec<Option<Tensor>> {
    params
        .iter()
        .map(|p| grads.get(p.as_tensor()).cloned())
        .collect()
}

fn add_grads(acc: &mut [Option<Tensor>], new: Vec<Option<Tensor>>) -> Result<()> {
    for (a, n) in acc.iter_mut().zip(new) {
        *a = match (a.take(), n) {
            (Some(x), Some(y)) => Some((x + y)?),
            (x, y) => x.or(y),
        };
    }
    Ok(())
}

fn plain<M: LayeredCausalLm>(
    model: &M,
    params: &[Var],
    batch: &MicroBatch,
    opts: &BackwardOptions,
    row_scale: Option<RowGradScale<'_>>,
) -> Result<MicroStepOutput> {
    let ctx = model.context(batch)?;
    let mut h = model.embed(&batch.input_ids)?;
    let mut router = Vec::with_capacity(model.num_layers());
    for i in 0..model.num_layers() {
        let (out, r) = model.layer(i, &h, &ctx)?;
        h = out;
        router.push(r);
    }
    let (fused, surrogate) = head(model, &h, batch, opts, row_scale)?;
    let mut total = surrogate;
    let mut aux = None;
    if opts.aux_scale != 0.0 {
        let detached: Vec<Tensor> = router.iter().map(|r| r.detach()).collect();
        let plan = AuxLossPlan::new(
            &detached,
            &batch.token_mask,
            model.experts_per_token(),
            opts.aux_scale,
        )?;
        aux = Some(plan.value);
        for r in &router {
            let term = plan.layer_term(r)?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
    }
    let grads = match total {
        Some(t) => collect(params, &t.backward()?),
        None => vec![None; params.len()],
    };
    Ok(MicroStepOutput {
        nll_sum: fused.nll_sum,
        count: fused.count,
        correct: fused.correct,
        entropy_sum: fused.entropy_sum,
        aux,
        grads,
    })
}

fn checkpointed<M: LayeredCausalLm>(
    model: &M,
    params: &[Var],
    batch: &MicroBatch,
    opts: &BackwardOptions,
    row_scale: Option<RowGradScale<'_>>,
    on_layer: Option<LayerDone<'_>>,
) -> Result<MicroStepOutput> {
    let ctx = model.context(batch)?;
    let n_layers = model.num_layers();
    // Forward: keep only each layer's (detached) input, and the detached router logits.
    let mut inputs = Vec::with_capacity(n_layers + 1);
    inputs.push(model.embed(&batch.input_ids)?.detach());
    let mut router = Vec::with_capacity(n_layers);
    let dev = batch.input_ids.device().clone();
    // the recompute reuses the routing plans of this pass (checked at the end); its layer outputs
    // are only differentiated (seed_gradient), so the MoE defers its experts to the backward
    let replay = gptoss_model::RouteReplay::record_detached();
    for i in 0..n_layers {
        let (out, r) = scope("layer.forward", &dev, || model.layer(i, &inputs[i], &ctx))?;
        inputs.push(out.detach());
        router.push(r.detach());
    }
    let plan = if opts.aux_scale != 0.0 {
        Some(AuxLossPlan::new(
            &router,
            &batch.token_mask,
            model.experts_per_token(),
            opts.aux_scale,
        )?)
    } else {
        None
    };
    drop(router);
    // Head: gradient w.r.t. the last hidden state.
    let h_last = Var::from_tensor(&inputs[n_layers])?;
    let (fused, surrogate) = scope("head.loss", &dev, || {
        head(model, h_last.as_tensor(), batch, opts, row_scale)
    })?;
    let mut acc: Vec<Option<Tensor>> = vec![None; params.len()];
    let grad_out = match surrogate {
        Some(s) => {
            let g = scope("head.backward", &dev, || s.backward())?;
            add_grads(&mut acc, collect(params, &g))?;
            g.get(h_last.as_tensor()).cloned()
        }
        None => None,
    };
    drop(h_last);
    inputs.pop();
    // Backward through the layers, recomputing each from its input.
    replay.replaying_for_gradients();
    let layers = Layers {
        model,
        params,
        ctx: &ctx,
        plan: plan.as_ref(),
        dev: &dev,
    };
    let grad_embed = layers.backward(inputs, grad_out, &mut acc, on_layer)?;
    replay.verify()?;
    embedding_grads(model, params, batch, grad_embed, &mut acc)?;
    Ok(MicroStepOutput {
        nll_sum: fused.nll_sum,
        count: fused.count,
        correct: fused.correct,
        entropy_sum: fused.entropy_sum,
        aux: plan.map(|p| p.value),
        grads: acc,
    })
}

/// What the backward through the decoder layers of [`checkpointed`] reads.
struct Layers<'a, M: LayeredCausalLm> {
    model: &'a M,
    params: &'a [Var],
    ctx: &'a M::Context,
    plan: Option<&'a AuxLossPlan>,
    dev: &'a candle_core::Device,
}

impl<M: LayeredCausalLm> Layers<'_, M> {
    /// From the last layer down: recompute layer `i` from its saved input `inputs[i]`, seed its
    /// output with the gradient from above (`grad_out`, plus the layer's aux-loss term), add the
    /// parameter gradients to `acc`, then call `on_layer` (for every layer, also one that got no
    /// gradient). Returns the gradient w.r.t. the first layer's input.
    fn backward(
        &self,
        mut inputs: Vec<Tensor>,
        mut grad_out: Option<Tensor>,
        acc: &mut [Option<Tensor>],
        mut on_layer: Option<LayerDone<'_>>,
    ) -> Result<Option<Tensor>> {
        for i in (0..inputs.len()).rev() {
            let Some(input) = inputs.pop() else { break };
            let x = Var::from_tensor(&input)?;
            let (out, r) = scope("layer.recompute", self.dev, || {
                self.model.layer(i, x.as_tensor(), self.ctx)
            })?;
            let mut s = match &grad_out {
                Some(g) => Some(seed_gradient(&out, g)?),
                None => None,
            };
            if let Some(plan) = self.plan {
                let term = plan.layer_term(&r)?;
                s = Some(match s {
                    Some(t) => (t + term)?,
                    None => term,
                });
            }
            if let Some(s) = s {
                let g = scope("layer.backward", self.dev, || s.backward())?;
                add_grads(acc, collect(self.params, &g))?;
                grad_out = g.get(x.as_tensor()).cloned();
            }
            if let Some(f) = on_layer.as_mut() {
                f(i, acc)?;
            }
        }
        Ok(grad_out)
    }
}

#[cfg(test)]
pub(crate) mod toy {
    //! A tiny layered model with LoRA-like trainable factors, for tests of the training math.
    use super::*;
    use candle_core::{DType, Device};

    /// Residual tanh layers with frozen `W` and trainable `B·A`; a frozen router.
    pub struct ToyLm {
        pub embed: Tensor,
        pub w: Vec<Tensor>,
        pub a: Vec<Var>,
        pub b: Vec<Var>,
        pub router: Vec<Tensor>,
        pub head: Tensor,
    }

    impl ToyLm {
        pub fn new(layers: usize, hidden: usize, vocab: usize, experts: usize) -> Result<Self> {
            let dev = Device::Cpu;
            let r = 2;
            let mut s = Self {
                embed: Tensor::randn(0f32, 1.0, (vocab, hidden), &dev)?,
                w: vec![],
                a: vec![],
                b: vec![],
                router: vec![],
                head: Tensor::randn(0f32, 0.5, (vocab, hidden), &dev)?,
            };
            for _ in 0..layers {
                s.w.push(Tensor::randn(0f32, 0.3, (hidden, hidden), &dev)?);
                s.a.push(Var::randn(0f32, 0.3, (r, hidden), &dev)?);
                s.b.push(Var::randn(0f32, 0.3, (hidden, r), &dev)?);
                s.router
                    .push(Tensor::randn(0f32, 1.0, (experts, hidden), &dev)?);
            }
            Ok(s)
        }
        pub fn params(&self) -> Vec<Var> {
            self.a.iter().chain(&self.b).cloned().collect()
        }
    }

    impl LayeredCausalLm for ToyLm {
        type Context = ();
        fn num_layers(&self) -> usize {
            self.w.len()
        }
        fn experts_per_token(&self) -> usize {
            2
        }
        fn num_parameters_excluding_embeddings(&self) -> u64 {
            self.w
                .iter()
                .chain(&self.router)
                .chain([&self.head])
                .map(|t| t.elem_count() as u64)
                .sum()
        }
        fn embed(&self, ids: &Tensor) -> Result<Tensor> {
            let (b, t) = ids.dims2()?;
            self.embed
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, ()))
        }
        fn context(&self, _: &MicroBatch) -> Result<()> {
            Ok(())
        }
        fn layer(&self, i: usize, h: &Tensor, _: &()) -> Result<(Tensor, Tensor)> {
            let (b, t, hd) = h.dims3()?;
            let x = h.reshape((b * t, hd))?;
            let base = x.matmul(&self.w[i].t()?)?;
            let lora = x
                .matmul(&self.a[i].as_tensor().t()?)?
                .matmul(&self.b[i].as_tensor().t()?)?;
            let y = (&x + (base + lora)?.tanh()?)?;
            let r = y.matmul(&self.router[i].t()?)?;
            Ok((y.reshape((b, t, hd))?, r))
        }
        fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
            let ms = h.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            h.broadcast_div(&(ms + 1e-5)?.sqrt()?)
        }
        fn lm_head_weight(&self) -> &Tensor {
            &self.head
        }
    }

    /// A batch of random tokens `[b, t]` with every next token labelled except a few.
    pub fn batch(b: usize, t: usize, vocab: u32, seed: u32) -> Result<MicroBatch> {
        let ids: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % vocab)
            .collect();
        let mut positions = vec![];
        let mut targets = vec![];
        for bi in 0..b {
            for ti in 0..t - 1 {
                if (bi + ti + seed as usize) % 5 != 0 {
                    positions.push((bi * t + ti) as u32);
                    targets.push(ids[bi * t + ti + 1]);
                }
            }
        }
        Ok(MicroBatch {
            input_ids: Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
            attention_mask: None,
            positions,
            targets,
            token_mask: vec![1.0; b * t],
            packed_seq_lens: None,
        })
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::toy::*;
    use super::*;

    #[test]
    fn checkpointing_gives_identical_gradients() -> Result<()> {
        let model = ToyLm::new(3, 8, 11, 4)?;
        let params = model.params();
        let batch = batch(2, 6, 11, 1)?;
        let mut opts = BackwardOptions {
            num_items_in_batch: batch.targets.len(),
            aux_scale: 0.3,
            gradient_checkpointing: false,
            lm_head_chunk: 4,
        };
        let plain = forward_backward(&model, &params, &batch, &opts)?;
        opts.gradient_checkpointing = true;
        let ckpt = forward_backward(&model, &params, &batch, &opts)?;
        assert_eq!(plain.nll_sum, ckpt.nll_sum);
        assert_eq!(plain.aux, ckpt.aux);
        for (g1, g2) in plain.grads.iter().zip(&ckpt.grads) {
            let (Some(g1), Some(g2)) = (g1, g2) else {
                panic!("missing gradient")
            };
            assert!(max_abs_diff(g1, g2)? < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn row_scaled_gradients_match_weighted_autograd() -> Result<()> {
        // Σ_b s_b · Σ nll(row b), with signed per-row scales, through plain and checkpointed paths.
        let model = ToyLm::new(2, 8, 11, 4)?;
        let params = model.params();
        let batch = batch(3, 6, 11, 3)?;
        let scales = [0.7f64, -1.3, 0.25];
        let t = 6;
        let hn = {
            let mut h = model.embed(&batch.input_ids)?;
            for i in 0..2 {
                h = model.layer(i, &h, &())?.0;
            }
            model.final_norm(&h)?
        };
        let sel = select_positions(&hn, &batch.positions)?;
        let lsm =
            candle_nn::ops::log_softmax(&sel.matmul(&model.head.t()?)?, candle_core::D::Minus1)?;
        let n = batch.targets.len();
        let idx = Tensor::from_slice(&batch.targets, (n, 1), &candle_core::Device::Cpu)?;
        let nll = lsm
            .gather(&idx, candle_core::D::Minus1)?
            .neg()?
            .flatten_all()?;
        let w: Vec<f32> = batch
            .positions
            .iter()
            .map(|&p| scales[p as usize / t] as f32)
            .collect();
        let w = Tensor::from_vec(w, n, &candle_core::Device::Cpu)?;
        let reference = (&nll * &w)?.sum_all()?.backward()?;
        let row_nll: Vec<f64> = (0..3)
            .map(|r| {
                batch
                    .positions
                    .iter()
                    .zip(nll.to_vec1::<f32>().unwrap_or_default())
                    .filter(|(p, _)| **p as usize / t == r)
                    .map(|(_, v)| v as f64)
                    .sum()
            })
            .collect();
        for ckpt in [false, true] {
            let opts = BackwardOptions {
                num_items_in_batch: 1,
                aux_scale: 0.0,
                gradient_checkpointing: ckpt,
                lm_head_chunk: 4,
            };
            let mut seen = Vec::new();
            let mut f = |s: &[LossStats]| -> Result<Vec<f64>> {
                seen = s.to_vec();
                Ok(scales.to_vec())
            };
            let ours = forward_backward_rows(&model, &params, &batch, &opts, &mut f)?;
            assert_eq!(seen.len(), 3);
            for (s, r) in seen.iter().zip(&row_nll) {
                assert!((s.nll_sum - r).abs() < 1e-4, "{} vs {r}", s.nll_sum);
            }
            assert_eq!(seen.iter().map(|s| s.count).sum::<usize>(), n);
            for (p, mine) in params.iter().zip(&ours.grads) {
                let (Some(r), Some(mine)) = (reference.get(p.as_tensor()), mine) else {
                    panic!("missing gradient")
                };
                assert!(max_abs_diff(r, mine)? < 1e-5);
            }
            let fwd = forward_row_stats(&model, &batch, 5)?;
            for (a, b) in fwd.iter().zip(&seen) {
                assert!((a.nll_sum - b.nll_sum).abs() < 1e-6 && a.count == b.count);
            }
        }
        Ok(())
    }

    #[test]
    fn plain_gradients_match_full_autograd() -> Result<()> {
        // The fused surrogate must give the gradient of the true mean cross-entropy.
        let model = ToyLm::new(2, 8, 11, 4)?;
        let params = model.params();
        let batch = batch(1, 7, 11, 2)?;
        let opts = BackwardOptions {
            num_items_in_batch: batch.targets.len(),
            aux_scale: 0.0,
            gradient_checkpointing: false,
            lm_head_chunk: 3,
        };
        let ours = forward_backward(&model, &params, &batch, &opts)?;
        // Full-logits reference.
        let mut h = model.embed(&batch.input_ids)?;
        for i in 0..2 {
            h = model.layer(i, &h, &())?.0;
        }
        let hn = model.final_norm(&h)?;
        let sel = select_positions(&hn, &batch.positions)?;
        let logits = sel.matmul(&model.head.t()?)?;
        let lsm = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        let idx = Tensor::from_slice(
            &batch.targets,
            (batch.targets.len(), 1),
            &candle_core::Device::Cpu,
        )?;
        let loss = lsm
            .gather(&idx, candle_core::D::Minus1)?
            .neg()?
            .mean_all()?;
        let g = loss.backward()?;
        for (p, mine) in params.iter().zip(&ours.grads) {
            let r = g.get(p.as_tensor()).expect("reference grad");
            let Some(mine) = mine else {
                panic!("missing grad")
            };
            assert!(max_abs_diff(r, mine)? < 1e-5);
        }
        let mean = ours.nll_sum / ours.count as f64;
        assert!((mean - loss.to_scalar::<f32>()? as f64).abs() < 1e-4);
        Ok(())
    }
}
