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
use super::lm_loss::fused_lm_head_loss;
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
    /// The (frozen) LM-head weight `[V, H]`.
    fn lm_head_weight(&self) -> &Tensor;
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
        checkpointed(model, params, batch, opts)
    } else {
        plain(model, params, batch, opts)
    }
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
) -> Result<(super::lm_loss::FusedLmLoss, Option<Tensor>)> {
    let hn = model.final_norm(h_last)?;
    let sel = select_positions(&hn.detach(), &batch.positions)?;
    let scale = 1.0 / opts.num_items_in_batch.max(1) as f64;
    let fused = fused_lm_head_loss(
        &sel,
        model.lm_head_weight(),
        &batch.targets,
        scale,
        opts.lm_head_chunk,
    )?;
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
    Ok((fused, surrogate))
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
) -> Result<MicroStepOutput> {
    let ctx = model.context(batch)?;
    let mut h = model.embed(&batch.input_ids)?;
    let mut router = Vec::with_capacity(model.num_layers());
    for i in 0..model.num_layers() {
        let (out, r) = model.layer(i, &h, &ctx)?;
        h = out;
        router.push(r);
    }
    let (fused, surrogate) = head(model, &h, batch, opts)?;
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
        head(model, h_last.as_tensor(), batch, opts)
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
    layers.backward(inputs, grad_out, &mut acc)?;
    replay.verify()?;
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
    /// output with the gradient from above (`grad_out`, plus the layer's aux-loss term), and add
    /// the parameter gradients to `acc`.
    fn backward(
        &self,
        mut inputs: Vec<Tensor>,
        mut grad_out: Option<Tensor>,
        acc: &mut [Option<Tensor>],
    ) -> Result<()> {
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
            let Some(s) = s else { continue };
            let g = scope("layer.backward", self.dev, || s.backward())?;
            add_grads(acc, collect(self.params, &g))?;
            grad_out = g.get(x.as_tensor()).cloned();
        }
        Ok(())
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
