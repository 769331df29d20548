//! Mixture-of-experts MLP: top-k router and experts with clamped, interleaved SwiGLU (transformers
//! `GptOssTopKRouter` / `GptOssExperts`).
//!
//! Only routed (token, expert) pairs are computed. The routing decision (top-k indices) is taken on the device
//! by an arg-sort; the k indices per token (`N·k` u32, a few KiB) are then copied to the host once per layer,
//! because candle tensor shapes — here the number of rows of each expert — live on the host. The grouped
//! gather/scatter itself runs on the device (`index_select` of the routed rows, one `index_add` back).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::error::{ModelError, Result};
use crate::frozen::frozen_matmul;
use crate::hooks::{ExpertAdapter, ExpertParam};
use crate::packed_experts::PackedExperts;
use crate::routed::RowMap;

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
    /// `x`: `[N, H]` → routing (top-k of the logits, then a softmax over those k).
    pub fn route(&self, x: &Tensor) -> candle_core::Result<Routing> {
        let logits = frozen_matmul(x, &self.weight.t()?)?.broadcast_add(&self.bias)?;
        let indices = logits
            .detach()
            .arg_sort_last_dim(false)?
            .narrow(D::Minus1, 0, self.top_k)?
            .contiguous()?;
        let top = logits.gather(&indices, D::Minus1)?;
        let dtype = top.dtype();
        let top = top.to_dtype(DType::F32)?;
        let max = top.max_keepdim(D::Minus1)?.detach();
        let e = top.broadcast_sub(&max)?.exp()?;
        let weights = e
            .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .to_dtype(dtype)?;
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
            limit,
            alpha,
        }
    }

    /// Install (or remove) the adapter of one parameter.
    pub fn set_adapter(&mut self, p: ExpertParam, a: Option<Arc<dyn ExpertAdapter>>) {
        match p {
            ExpertParam::GateUp => self.gate_up_adapter = a,
            ExpertParam::Down => self.down_adapter = a,
        }
    }

    /// Keep the weights as MXFP4 (`Some`), dequantized per call of [`Self::forward`]; the dense
    /// parameters are then placeholders (see [`crate::init_random_packed`]). `None` goes back to them.
    pub fn set_packed(&mut self, packed: Option<Arc<PackedExperts>>) {
        self.packed = packed;
    }

    /// The MXFP4-resident weights, if any.
    pub fn packed(&self) -> Option<&Arc<PackedExperts>> {
        self.packed.as_ref()
    }

    /// The weights the forward uses, `[E, in, out]` each: dequantized now when packed, else the
    /// dense parameters.
    fn weights(&self) -> candle_core::Result<(Tensor, Tensor)> {
        match &self.packed {
            Some(p) => {
                let dtype = self.gate_up_proj_bias.dtype();
                let deq = |q| {
                    p.dequantize(q, dtype)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))
                };
                Ok((deq(ExpertParam::GateUp)?, deq(ExpertParam::Down)?))
            }
            None => Ok((self.gate_up_proj.clone(), self.down_proj.clone())),
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

    fn project(
        &self,
        p: ExpertParam,
        w: &Tensor,
        e: usize,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        // narrow + squeeze is a view; `get` would copy a non-contiguous (dequantized) slice.
        let mut y = frozen_matmul(x, &w.narrow(0, e, 1)?.squeeze(0)?)?;
        let adapter = match p {
            ExpertParam::GateUp => &self.gate_up_adapter,
            ExpertParam::Down => &self.down_adapter,
        };
        if let Some(a) = adapter {
            y = (y + a.delta(e, x)?)?;
        }
        y.broadcast_add(&self.bias(p).narrow(0, e, 1)?.squeeze(0)?)
    }

    /// One expert on its rows: `x` `[n, H]` → `[n, H]` (run dtype), without the routing weight.
    pub fn expert_forward(&self, e: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let (gu_w, down_w) = self.weights()?;
        self.expert_forward_with(&gu_w, &down_w, e, x)
    }

    fn expert_forward_with(
        &self,
        gu_w: &Tensor,
        down_w: &Tensor,
        e: usize,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let gu = self.project(ExpertParam::GateUp, gu_w, e, x)?;
        let act = self.swiglu(&gu)?;
        self.project(ExpertParam::Down, down_w, e, &act)
    }

    /// Clamped SwiGLU on interleaved gate/up columns: `[n, 2I]` → `[n, I]`.
    fn swiglu(&self, gu: &Tensor) -> candle_core::Result<Tensor> {
        let (n, two_i) = gu.dims2()?;
        let gu = gu.reshape((n, two_i / 2, 2))?;
        let gate = gu.narrow(2, 0, 1)?.squeeze(2)?.minimum(self.limit)?;
        let up = gu
            .narrow(2, 1, 1)?
            .squeeze(2)?
            .clamp(-self.limit, self.limit)?;
        let glu = (&gate * candle_nn::ops::sigmoid(&(&gate * self.alpha)?)?)?;
        (up + 1.0)? * glu
    }

    /// All routed rows `xs` `[M, H]` (grouped by `spans`) through their experts with one grouped matmul
    /// per weight (frozen weights), biases gathered per row, adapters per span → `[M, H]`.
    fn forward_grouped(
        &self,
        xs: &Tensor,
        gu_w: &Tensor,
        down_w: &Tensor,
        spans: crate::grouped::Spans,
    ) -> candle_core::Result<Tensor> {
        let row_expert: Vec<u32> = spans
            .iter()
            .flat_map(|&(e, _, len)| std::iter::repeat_n(e as u32, len))
            .collect();
        let row_expert = Tensor::new(row_expert.as_slice(), xs.device())?;
        let project = |p: ExpertParam, w: &Tensor, x: &Tensor| -> candle_core::Result<Tensor> {
            let mut y = crate::grouped::grouped_matmul(x, w, &spans)?;
            let adapter = match p {
                ExpertParam::GateUp => &self.gate_up_adapter,
                ExpertParam::Down => &self.down_adapter,
            };
            if let Some(a) = adapter {
                let mut deltas = Vec::with_capacity(spans.len());
                for &(e, off, len) in spans.iter() {
                    deltas.push(a.delta(e, &x.narrow(0, off, len)?)?);
                }
                y = (y + Tensor::cat(&deltas, 0)?)?;
            }
            y + self.bias(p).index_select(&row_expert, 0)?
        };
        let gu = project(ExpertParam::GateUp, gu_w, xs)?;
        let act = self.swiglu(&gu)?;
        project(ExpertParam::Down, down_w, &act)
    }

    /// The same with candle ops, one expert at a time (weights that take part in autograd).
    fn forward_per_expert(
        &self,
        xs: &Tensor,
        gu_w: &Tensor,
        down_w: &Tensor,
        spans: &[(usize, usize, usize)],
    ) -> candle_core::Result<Tensor> {
        let mut outs = Vec::with_capacity(spans.len());
        for &(e, off, len) in spans {
            outs.push(self.expert_forward_with(gu_w, down_w, e, &xs.narrow(0, off, len)?)?);
        }
        Tensor::cat(&outs, 0)
    }

    /// Weighted sum over the routed experts: `x` `[N, H]`, `routing` from [`Router::route`] → `[N, H]`.
    ///
    /// Rows are grouped per expert from the host copy of the `N·k` indices; gathering and the final
    /// scatter-add run on the device (see `routed.rs` for the kernel choice).
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let k = routing.indices.dim(1)?;
        let idx: Vec<Vec<u32>> = routing.indices.to_vec2::<u32>()?;
        let num_e = self.num_experts();
        let mut groups: Vec<Vec<(u32, u32)>> = vec![Vec::new(); num_e];
        for (t, row) in idx.iter().enumerate() {
            for (slot, &e) in row.iter().enumerate() {
                let e = e as usize;
                if e < num_e {
                    groups[e].push((t as u32, (t * k + slot) as u32));
                }
            }
        }
        let tokens: Vec<u32> = groups.iter().flatten().map(|p| p.0).collect();
        let pairs: Vec<u32> = groups.iter().flatten().map(|p| p.1).collect();
        let dev: &Device = x.device();
        if tokens.is_empty() {
            return x.zeros_like();
        }
        let routed = RowMap::new(&tokens, n, x)?;
        let pair_t = Tensor::new(pairs.as_slice(), dev)?;
        let xs = routed.gather(x)?; // [M, H]
        let (gu_w, down_w) = self.weights()?;
        let mut spans = Vec::new();
        let mut off = 0usize;
        for (e, g) in groups.iter().enumerate() {
            if !g.is_empty() {
                spans.push((e, off, g.len()));
                off += g.len();
            }
        }
        let ys = if gu_w.track_op() || down_w.track_op() {
            self.forward_per_expert(&xs, &gu_w, &down_w, &spans)?
        } else {
            self.forward_grouped(&xs, &gu_w, &down_w, Arc::new(spans))?
        };
        let w = routing
            .weights
            .flatten_all()?
            .index_select(&pair_t, 0)?
            .unsqueeze(1)?;
        let ys = ys.broadcast_mul(&w.to_dtype(ys.dtype())?)?;
        routed.scatter_add(&ys)
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
