//! Mixture-of-experts MLP: top-k router and experts with clamped, interleaved SwiGLU (transformers
//! `GptOssTopKRouter` / `GptOssExperts`).
//!
//! Only routed (token, expert) pairs are computed. The routing decision (top-k indices) is taken on the device
//! by an arg-sort; the k indices per token (`N·k` u32, a few KiB) are then copied to the host once per layer,
//! because candle tensor shapes — here the number of rows of each expert — live on the host. Everything
//! else runs on the device: gather of the routed rows, grouped expert matmuls, and the fused bias/SwiGLU
//! and weighted-combine ops of [`gptoss_kernels::moe`].

use std::rc::Rc;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::hooks::{ExpertAdapter, ExpertParam};
use crate::packed_experts::{placeholder, PackedExperts};
use crate::route_replay;
use gptoss_kernels::frozen_matmul;
use gptoss_kernels::grouped::{grouped_matmul, routed, routed_matmul, GroupedWeight, Spans};
use gptoss_kernels::moe::DeferredExperts;
use gptoss_kernels::moe::{combine, gather_rows, swiglu_bias, topk_softmax};
use gptoss_kernels::profile::scope;

/// Default of [`Experts::set_backward_chunk`].
const DEFAULT_BACKWARD_CHUNK: usize = 16;

thread_local! {
    /// Open [`Inference`] scopes of this thread.
    static INFERENCE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// While alive, this thread's forward passes are not differentiated (KV-cache generation): the
/// MoE may then take ops without a backward ([`Experts::forward`]'s device-side routing).
pub(crate) struct Inference(());

impl Inference {
    /// Opens a scope (scopes nest).
    pub(crate) fn enter() -> Self {
        INFERENCE.with(|c| c.set(c.get() + 1));
        Self(())
    }

    fn active() -> bool {
        INFERENCE.with(|c| c.get() > 0)
    }
}

impl Drop for Inference {
    fn drop(&mut self) {
        INFERENCE.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// `model.layers.{i}.mlp.router`: `logits = x·Wᵀ + b` (not a [`crate::Linear`]: no adapter hook).
#[derive(Debug, Clone)]
pub struct Router {
    /// `weight` `[E, H]`.
    pub weight: Tensor,
    /// `bias` `[E]`.
    pub bias: Tensor,
    /// Experts per token k.
    pub top_k: usize,
}

/// Routing of `N` tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Router logits `[N, E]` (run dtype).
    pub logits: Tensor,
    /// Softmax over the k selected logits, `[N, k]` (run dtype; differentiable).
    pub weights: Tensor,
    /// Selected experts `[N, k]` u32, in descending logit order.
    pub indices: Tensor,
}

impl Router {
    /// `x`: `[N, H]` → routing (top-k of the logits, then a softmax over those k;
    /// [`gptoss_kernels::moe::topk_softmax`], so `top_k` at most 32 and at most 256 experts).
    pub fn route(&self, x: &Tensor) -> candle_core::Result<Routing> {
        let logits = frozen_matmul(x, &self.weight.t()?)?.broadcast_add(&self.bias)?;
        let (weights, indices) = topk_softmax(&logits, self.top_k)?;
        Ok(Routing {
            logits,
            weights,
            indices,
        })
    }
}

/// `model.layers.{i}.mlp.experts`: `E` experts in the transformers layout `[E, in, out]`.
#[derive(Debug, Clone)]
pub struct Experts {
    gate_up_proj: Tensor,
    gate_up_proj_bias: Tensor,
    down_proj: Tensor,
    down_proj_bias: Tensor,
    gate_up_adapter: Option<Arc<dyn ExpertAdapter>>,
    down_adapter: Option<Arc<dyn ExpertAdapter>>,
    packed: Option<Arc<PackedExperts>>,
    backward_chunk: usize,
    /// SwiGLU clamp limit (7.0).
    pub limit: f64,
    /// SwiGLU sigmoid slope (1.702).
    pub alpha: f64,
}

impl Experts {
    /// Experts from `gate_up_proj` `[E, H, 2I]`, its bias `[E, 2I]`, `down_proj` `[E, I, H]` and its bias `[E, H]`.
    pub fn new(
        gate_up_proj: Tensor,
        gate_up_proj_bias: Tensor,
        down_proj: Tensor,
        down_proj_bias: Tensor,
        limit: f64,
        alpha: f64,
    ) -> Self {
        Self {
            gate_up_proj,
            gate_up_proj_bias,
            down_proj,
            down_proj_bias,
            gate_up_adapter: None,
            down_adapter: None,
            packed: None,
            backward_chunk: DEFAULT_BACKWARD_CHUNK,
            limit,
            alpha,
        }
    }

    /// How many consecutive experts the deferred backward of a gradient-only recompute
    /// ([`crate::RouteReplay::replaying_for_gradients`]) decodes at once (default 16, at least 1):
    /// more experts per chunk means fewer, larger grouped matmuls and more memory (a gpt-oss-20b
    /// expert is 50 MB in bf16; on an H200 at 2048 tokens 16 was ≈ 2 % faster than 8 for
    /// +0.26 GiB of peak memory). Unused where the fused MXFP4 kernel decodes in place.
    pub fn set_backward_chunk(&mut self, experts: usize) {
        self.backward_chunk = experts.max(1);
    }

    /// Whether the forward may defer the experts to the backward: frozen weights (MXFP4-resident or
    /// not taking part in autograd) and no adapters.
    fn deferrable(&self) -> bool {
        self.gate_up_adapter.is_none()
            && self.down_adapter.is_none()
            && (self.packed.is_some()
                || !(self.gate_up_proj.track_op() || self.down_proj.track_op()))
    }

    /// Install (or remove) the adapter of one parameter.
    pub fn set_adapter(&mut self, p: ExpertParam, a: Option<Arc<dyn ExpertAdapter>>) {
        match p {
            ExpertParam::GateUp => self.gate_up_adapter = a,
            ExpertParam::Down => self.down_adapter = a,
        }
    }

    /// The adapter installed on one parameter, if any.
    pub fn adapter(&self, p: ExpertParam) -> Option<&Arc<dyn ExpertAdapter>> {
        match p {
            ExpertParam::GateUp => self.gate_up_adapter.as_ref(),
            ExpertParam::Down => self.down_adapter.as_ref(),
        }
    }

    /// Keep the weights as MXFP4 (`Some`), dequantized per call of [`Self::forward`]; the dense
    /// parameters are then placeholders (see [`crate::init_random_packed`]). `None` goes back to them.
    pub fn set_packed(&mut self, packed: Option<Arc<PackedExperts>>) {
        self.packed = packed;
    }

    /// Makes MXFP4-resident experts dense (for merging an adapter into them): the parameters become
    /// `gate_up` `[E, H, 2I]` and `down` `[E, I, H]` (run dtype and device, as the placeholders they
    /// replace) and the packed weights are returned; dense experts just take the new parameters
    /// (`None`).
    pub fn set_dense(
        &mut self,
        gate_up: Tensor,
        down: Tensor,
    ) -> Result<Option<Arc<PackedExperts>>> {
        for (p, w) in [(ExpertParam::GateUp, &gate_up), (ExpertParam::Down, &down)] {
            let cur = self.param(p);
            if w.dims() != cur.dims() || w.dtype() != cur.dtype() {
                return Err(ModelError::arg(
                    p.name(),
                    format!(
                        "expected {:?} {:?}, got {:?} {:?}",
                        cur.dims(),
                        cur.dtype(),
                        w.dims(),
                        w.dtype()
                    ),
                ));
            }
        }
        self.set_param(ExpertParam::GateUp, gate_up)?;
        self.set_param(ExpertParam::Down, down)?;
        Ok(self.packed.take())
    }

    /// Makes the experts MXFP4-resident again with `packed` (what [`Self::set_dense`] returned); the
    /// dense parameters become placeholders of their shapes.
    pub fn set_resident(&mut self, packed: Arc<PackedExperts>) -> Result<()> {
        for p in [ExpertParam::GateUp, ExpertParam::Down] {
            let cur = self.param(p);
            let stand_in = placeholder(cur.dims(), cur.dtype(), cur.device())?;
            self.set_param(p, stand_in)?;
        }
        self.packed = Some(packed);
        Ok(())
    }

    /// The MXFP4-resident weights, if any.
    pub fn packed(&self) -> Option<&Arc<PackedExperts>> {
        self.packed.as_ref()
    }

    /// The weights the forward uses, `[E, in, out]` each: the MXFP4 blocks when packed (dequantized
    /// inside the grouped matmul), else the dense parameters.
    fn weights(&self) -> (GroupedWeight, GroupedWeight) {
        match &self.packed {
            Some(p) => {
                let dtype = self.gate_up_proj_bias.dtype();
                (
                    p.grouped_weight(ExpertParam::GateUp, dtype),
                    p.grouped_weight(ExpertParam::Down, dtype),
                )
            }
            None => (
                GroupedWeight::Dense(self.gate_up_proj.clone()),
                GroupedWeight::Dense(self.down_proj.clone()),
            ),
        }
    }

    /// The parameter in layout `[E, in, out]`.
    pub fn param(&self, p: ExpertParam) -> &Tensor {
        match p {
            ExpertParam::GateUp => &self.gate_up_proj,
            ExpertParam::Down => &self.down_proj,
        }
    }

    /// The bias of a parameter, `[E, out]`.
    pub fn bias(&self, p: ExpertParam) -> &Tensor {
        match p {
            ExpertParam::GateUp => &self.gate_up_proj_bias,
            ExpertParam::Down => &self.down_proj_bias,
        }
    }

    /// Replace a parameter (e.g. after merging); shape, dtype and device must stay the same.
    pub fn set_param(&mut self, p: ExpertParam, w: Tensor) -> Result<()> {
        let cur = self.param(p);
        if w.dims() != cur.dims()
            || w.dtype() != cur.dtype()
            || !w.device().same_device(cur.device())
        {
            return Err(ModelError::arg(
                p.name(),
                format!(
                    "expected shape {:?} {:?}, got {:?} {:?}",
                    cur.dims(),
                    cur.dtype(),
                    w.dims(),
                    w.dtype()
                ),
            ));
        }
        match p {
            ExpertParam::GateUp => self.gate_up_proj = w,
            ExpertParam::Down => self.down_proj = w,
        }
        Ok(())
    }

    /// Number of experts E.
    pub fn num_experts(&self) -> usize {
        self.gate_up_proj.dims().first().copied().unwrap_or(0)
    }

    /// Rows `x` `[M, in]` (grouped by `spans`) times their experts' weights `w` `[E, in, out]`, plus
    /// the adapter's deltas → `[M, out]` (no bias). Frozen weights go through one grouped matmul;
    /// weights that take part in autograd (merged or `Var` experts) through one matmul per expert.
    fn project_rows(
        &self,
        p: ExpertParam,
        w: &GroupedWeight,
        x: &Tensor,
        spans: &Spans,
    ) -> candle_core::Result<Tensor> {
        let y = match w {
            GroupedWeight::Dense(w) if w.track_op() => {
                let mut parts = Vec::with_capacity(spans.len());
                for &(e, off, len) in spans.iter() {
                    let we = w.narrow(0, e, 1)?.squeeze(0)?;
                    parts.push(frozen_matmul(&x.narrow(0, off, len)?, &we)?);
                }
                Tensor::cat(&parts, 0)?
            }
            _ => grouped_matmul(x, w, spans)?,
        };
        let adapter = match p {
            ExpertParam::GateUp => &self.gate_up_adapter,
            ExpertParam::Down => &self.down_adapter,
        };
        let Some(a) = adapter else {
            return Ok(y);
        };
        y + a.delta_grouped(x, spans)?
    }

    /// One expert on its rows: `x` `[n, H]` → `[n, H]` (run dtype), without the routing weight.
    pub fn expert_forward(&self, e: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let (gu_w, down_w) = self.weights();
        let n = x.dim(0)?;
        let spans: Spans = Arc::new(vec![(e, 0, n)]);
        let row_expert = Tensor::full(e as u32, n, x.device())?;
        let gu = self.project_rows(ExpertParam::GateUp, &gu_w, x, &spans)?;
        let act = swiglu_bias(
            &gu,
            &self.gate_up_proj_bias,
            &row_expert,
            self.limit,
            self.alpha,
        )?;
        let y = self.project_rows(ExpertParam::Down, &down_w, &act, &spans)?;
        y.broadcast_add(&self.down_proj_bias.narrow(0, e, 1)?.squeeze(0)?)
    }

    /// Weighted sum over the routed experts: `x` `[N, H]`, `routing` from [`Router::route`] → `[N, H]`.
    ///
    /// The `N·k` expert indices are copied to the host once; the rows are grouped per expert there
    /// ([`RoutePlan`]) and the index maps uploaded in one copy. Then, on the device: gather of the
    /// routed rows, grouped gate/up matmul (+ adapter deltas), bias + clamped SwiGLU, grouped down
    /// matmul (+ deltas), and the weighted sum with the down bias back to the tokens
    /// (see [`gptoss_kernels::moe`]).
    ///
    /// In generation (an [`Inference`] scope) with MXFP4-resident experts without adapters, on CUDA
    /// and with few routed rows ([`routed::chosen`]: decode), nothing goes to the host: each routed
    /// row `n·k + j` is multiplied by its expert's weight read from the device indices
    /// ([`routed_matmul`]), then the same SwiGLU and combine ops run.
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> candle_core::Result<Tensor> {
        if let Some(y) = self.forward_on_device(x, routing)? {
            return Ok(y);
        }
        let dev = x.device();
        // under gradient checkpointing the recompute reuses the forward pass's plan (no host wait)
        let key = self as *const Self as usize;
        let replayed = route_replay::replayed::<Planned>(key, &routing.indices);
        let deferred = replayed.is_some() && route_replay::gradients_only() && self.deferrable();
        let planned = match replayed {
            Some(p) => p,
            None => {
                let plan = scope("moe.route", dev, || {
                    RoutePlan::new(&routing.indices, self.num_experts())
                })?;
                let maps = match plan.rows() {
                    0 => None,
                    _ => Some(scope("moe.upload", dev, || plan.upload(dev))?),
                };
                let p = Rc::new(Planned { plan, maps });
                route_replay::record(key, &routing.indices, p.clone());
                p
            }
        };
        let (plan, Some(maps)) = (&planned.plan, &planned.maps) else {
            return x.zeros_like();
        };
        let (gu_w, down_w) = self.weights();
        if deferred {
            let op = DeferredExperts {
                gate_up: gu_w,
                gate_up_bias: self.gate_up_proj_bias.clone(),
                down: down_w,
                down_bias: self.down_proj_bias.clone(),
                limit: self.limit,
                alpha: self.alpha,
                spans: plan.spans.clone(),
                tokens: maps.tokens.clone(),
                pos: maps.pos.clone(),
                row_expert: maps.row_expert.clone(),
                slot_expert: routing.indices.clone(),
                chunk: self.backward_chunk,
            };
            return op.apply(x, &routing.weights);
        }
        // a pass that is not differentiated runs without autograd; there a layer's experts are
        // decoded at once (nothing keeps the copies for a backward)
        let detached = route_replay::detached_pass();
        let x = match detached {
            true => x.detach(),
            false => x.clone(),
        };
        let xs = scope("moe.gather", dev, || {
            gather_rows(&x, &maps.tokens, &maps.pos)
        })?;
        let spans = plan.spans.clone();
        let whole = |w: GroupedWeight| -> candle_core::Result<GroupedWeight> {
            Ok(match w {
                GroupedWeight::Packed { .. } if detached && !w.decoded_in_kernel(&xs, &spans) => {
                    GroupedWeight::Dense(w.dense()?)
                }
                w => w,
            })
        };
        let gu_w = whole(gu_w)?;
        let gu = scope("moe.gate_up", dev, || {
            self.project_rows(ExpertParam::GateUp, &gu_w, &xs, &spans)
        })?;
        let (gu, gu_bias) = bias_in_graph(gu, &self.gate_up_proj_bias, &maps.row_expert)?;
        let act = scope("moe.swiglu", dev, || {
            swiglu_bias(&gu, &gu_bias, &maps.row_expert, self.limit, self.alpha)
        })?;
        drop(gu_w);
        let down_w = whole(down_w)?;
        let ys = scope("moe.down", dev, || {
            self.project_rows(ExpertParam::Down, &down_w, &act, &spans)
        })?;
        let weights = match detached {
            true => routing.weights.detach(),
            false => routing.weights.clone(),
        };
        let (ys, down_bias) = bias_in_graph(ys, &self.down_proj_bias, &maps.row_expert)?;
        scope("moe.combine", dev, || {
            combine(&ys, &weights, &maps.pos, &down_bias, &routing.indices)
        })
    }
}

impl Experts {
    /// [`Self::forward`]'s device-side routing, when it applies (else `None`): `x` `[N, H]` →
    /// `[N, H]`, detached (inference only).
    fn forward_on_device(
        &self,
        x: &Tensor,
        routing: &Routing,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, k) = routing.indices.dims2()?;
        let Some(p) = &self.packed else {
            return Ok(None);
        };
        if self.gate_up_adapter.is_some()
            || self.down_adapter.is_some()
            || !Inference::active()
            || !routed::chosen(x, n * k)
        {
            return Ok(None);
        }
        let dev = x.device();
        let dtype = self.gate_up_proj_bias.dtype();
        let h = x.dim(1)?;
        let row_expert = routing.indices.flatten_all()?;
        let xs = x
            .detach()
            .unsqueeze(1)?
            .broadcast_as((n, k, h))?
            .reshape((n * k, h))?;
        let gu = scope("moe.gate_up", dev, || {
            routed_matmul(
                &xs,
                &p.grouped_weight(ExpertParam::GateUp, dtype),
                &row_expert,
            )
        })?;
        let act = scope("moe.swiglu", dev, || {
            swiglu_bias(
                &gu,
                &self.gate_up_proj_bias.detach(),
                &row_expert,
                self.limit,
                self.alpha,
            )
        })?;
        let ys = scope("moe.down", dev, || {
            routed_matmul(
                &act,
                &p.grouped_weight(ExpertParam::Down, dtype),
                &row_expert,
            )
        })?;
        // rows in routing order: (token n, slot j) is row n·k + j
        let pos = Tensor::arange(0u32, (n * k) as u32, dev)?.reshape((n, k))?;
        scope("moe.combine", dev, || {
            combine(
                &ys,
                &routing.weights.detach(),
                &pos,
                &self.down_proj_bias.detach(),
                &routing.indices,
            )
        })
        .map(Some)
    }
}

/// For an expert bias `[E, out]` that takes part in autograd (full-parameter training; the fused
/// SwiGLU and combine ops treat their bias as frozen): the routed rows `[M, out]` plus each row's
/// expert bias (`row_expert` `[M]` u32) in the graph, and a zero bias for the fused op. A frozen
/// bias is returned unchanged with the rows as they are.
fn bias_in_graph(
    rows: Tensor,
    bias: &Tensor,
    row_expert: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    if !bias.track_op() {
        return Ok((rows, bias.clone()));
    }
    let per_row = bias.index_select(row_expert, 0)?.to_dtype(rows.dtype())?;
    Ok(((rows + per_row)?, bias.detach().zeros_like()?))
}

/// The routed rows of one call, grouped by expert on the host (tokens in order within an expert).
#[derive(Debug, Clone)]
struct RoutePlan {
    /// `(expert, first row, rows)` of every expert with rows.
    spans: Spans,
    /// Token of each routed row, `[M]`.
    tokens: Vec<u32>,
    /// Row of each (token, slot), `[N·k]`: the inverse of `tokens`.
    pos: Vec<u32>,
    /// Expert of each routed row, `[M]`.
    row_expert: Vec<u32>,
    /// `(N, k)`.
    nk: (usize, usize),
}

/// A plan with its device maps (`None` when no row is routed), shared with [`route_replay`].
struct Planned {
    plan: RoutePlan,
    maps: Option<RouteMaps>,
}

/// The index maps of a [`RoutePlan`] on the device (u32).
struct RouteMaps {
    tokens: Tensor,
    pos: Tensor,
    row_expert: Tensor,
}

impl RoutePlan {
    /// From the selected experts `[N, k]` u32 (copied to the host here).
    fn new(indices: &Tensor, num_experts: usize) -> candle_core::Result<Self> {
        let (n, k) = indices.dims2()?;
        let idx: Vec<u32> = indices.flatten_all()?.to_vec1()?;
        let mut count = vec![0usize; num_experts];
        for (i, &e) in idx.iter().enumerate() {
            match count.get_mut(e as usize) {
                Some(c) => *c += 1,
                None => candle_core::bail!(
                    "routing indices[{}, {}] = {e}: only {num_experts} experts",
                    i / k.max(1),
                    i % k.max(1)
                ),
            }
        }
        let mut next = Vec::with_capacity(num_experts);
        let mut spans = Vec::new();
        let mut off = 0usize;
        for (e, &c) in count.iter().enumerate() {
            next.push(off);
            if c > 0 {
                spans.push((e, off, c));
            }
            off += c;
        }
        let m = idx.len();
        let (mut tokens, mut pos, mut row_expert) = (vec![0u32; m], vec![0u32; m], vec![0u32; m]);
        for (i, &e) in idx.iter().enumerate() {
            let r = next[e as usize];
            next[e as usize] += 1;
            tokens[r] = (i / k) as u32;
            pos[i] = r as u32;
            row_expert[r] = e;
        }
        Ok(Self {
            spans: Arc::new(spans),
            tokens,
            pos,
            row_expert,
            nk: (n, k),
        })
    }

    /// Routed rows `M = N·k`.
    fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// The maps on `dev`, in one host→device copy.
    fn upload(&self, dev: &Device) -> candle_core::Result<RouteMaps> {
        let m = self.rows();
        let all: Vec<u32> = [&self.tokens, &self.pos, &self.row_expert]
            .into_iter()
            .flatten()
            .copied()
            .collect();
        let all = Tensor::from_vec(all, 3 * m, dev)?;
        Ok(RouteMaps {
            tokens: all.narrow(0, 0, m)?,
            pos: all.narrow(0, m, m)?.reshape(self.nk)?,
            row_expert: all.narrow(0, 2 * m, m)?,
        })
    }
}

/// `model.layers.{i}.mlp`.
#[derive(Debug, Clone)]
pub struct MoeMlp {
    /// `.router`.
    pub router: Router,
    /// `.experts`.
    pub experts: Experts,
}

impl MoeMlp {
    /// `x`: `[B, T, H]` → (`[B, T, H]`, router logits `[B·T, E]`).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, t, h) = x.dims3()?;
        let flat = x.reshape((b * t, h))?;
        let routing = self.router.route(&flat)?;
        let y = self.experts.forward(&flat, &routing)?;
        Ok((y.reshape((b, t, h))?, routing.logits))
    }
}
