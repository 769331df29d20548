//! The experts of a replayed MoE call under `gptoss_model::RouteReplay::replaying_for_gradients`: nothing
//! in the forward, everything in the backward, a few experts at a time.
//!
//! A checkpointed recompute followed by its backward runs each frozen expert's weight through three
//! products (`x·W` in the recompute, `∂y·Wᵀ` in the backward) per projection; with MXFP4-resident
//! weights the autograd graph decodes it once for the recompute and again for the backward. Here
//! the recompute's forward returns zeros (its value is not read), and the backward decodes
//! `chunk` consecutive experts at once and runs, for their rows only, the gate/up forward product
//! and the backward products of both projections on the same decoded weights: one decode per expert
//! and projection instead of two. The down projection's forward `ys = act·W` is not formed at all:
//! the routing weights' gradient needs only `∂y · ys`, which is `(∂y·Wᵀ) · act` from the
//! backward's own product. The gate/up part is an ordinary autograd graph (the grouped matmul, the
//! SwiGLU op) whose backward starts from `∂act` through [`crate::seed_gradient`], so the gradient
//! code is that of the plain path.

use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, Var};

use crate::grouped::{grouped_matmul, GroupedWeight, Spans};
use crate::moe::{
    combine_grad_rows, combine_grad_weights_from_dots, gather_rows, row_dots, sum_rows, swiglu_bias,
};
use crate::seed_gradient;

/// Everything the backward needs besides the op's inputs (the frozen weights, the routing plan).
#[derive(Clone)]
pub struct DeferredExperts {
    /// `gate_up_proj` `[E, H, 2I]` as the grouped matmul takes it.
    pub gate_up: GroupedWeight,
    /// `gate_up_proj_bias` `[E, 2I]`.
    pub gate_up_bias: Tensor,
    /// `down_proj` `[E, I, H]`.
    pub down: GroupedWeight,
    /// `down_proj_bias` `[E, H]`.
    pub down_bias: Tensor,
    /// SwiGLU clamp limit and sigmoid slope.
    pub limit: f64,
    pub alpha: f64,
    /// `(expert, first row, rows)` of the experts with rows, tiling `0..N·k` in expert order.
    pub spans: Spans,
    /// Token of each routed row `[N·k]`, row of each (token, slot) `[N, k]`, expert of each row
    /// `[N·k]` and of each slot `[N, k]` (all u32).
    pub tokens: Tensor,
    pub pos: Tensor,
    pub row_expert: Tensor,
    pub slot_expert: Tensor,
    /// Experts decoded at once in the backward (at least 1).
    pub chunk: usize,
}

impl DeferredExperts {
    /// Zeros `[N, H]` (x's dtype) whose backward gives the experts' gradients with respect to `x`
    /// `[N, H]` and the routing `weights` `[N, k]`. `weights` must be a softmax's output (the
    /// router's): where a weight is exactly 0 its gradient lacks the expert-output term
    /// ([`combine_grad_weights_from_dots`]), which the softmax's Jacobian discards anyway.
    pub fn apply(self, x: &Tensor, weights: &Tensor) -> candle_core::Result<Tensor> {
        x.apply_op2(weights, self)
    }
}

/// Consecutive spans whose experts lie within `chunk` consecutive experts.
#[derive(Debug, PartialEq)]
struct Chunk {
    /// First expert and number of experts to decode.
    first: usize,
    count: usize,
    /// First row and number of rows.
    row: usize,
    rows: usize,
    /// The spans relative to `first` and `row`.
    spans: Vec<(usize, usize, usize)>,
}

/// Splits `spans` (in expert order, tiling their rows) into chunks of at most `chunk` experts.
fn chunks(spans: &[(usize, usize, usize)], chunk: usize) -> Vec<Chunk> {
    let chunk = chunk.max(1);
    let mut out: Vec<Chunk> = Vec::new();
    for &(e, off, len) in spans.iter().filter(|s| s.2 > 0) {
        match out.last_mut() {
            Some(c) if e - c.first < chunk && off == c.row + c.rows => {
                c.count = e + 1 - c.first;
                c.spans.push((e - c.first, off - c.row, len));
                c.rows += len;
            }
            _ => out.push(Chunk {
                first: e,
                count: 1,
                row: off,
                rows: len,
                spans: vec![(0, 0, len)],
            }),
        }
    }
    out
}

impl DeferredExperts {
    /// From `x` `[N, H]` and the gradient of the routed rows' outputs `dys` `[N·k, H]` (x's dtype,
    /// weighted by the routing weights): the gradient of the routed rows' inputs `[N·k, H]` and,
    /// when `dots` is set, the weighted products `dys[m] · ys[m]` of each row's output before the
    /// bias `[N·k]` f32 (what the routing weights' gradient needs), computed as `(dys[m]·Wᵀ) · act[m]`
    /// from the down projection's input `act` and its gradient: `ys = act·W` itself is never formed,
    /// so each chunk runs three products per expert (gate/up forward, both backward) instead of four.
    fn rows_backward(
        &self,
        x: &Tensor,
        dys: &Tensor,
        dots: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let xs = gather_rows(x, &self.tokens, &self.pos)?;
        let mut products = Vec::new();
        let mut dxs = Vec::new();
        // a fused MXFP4 GEMM decodes tiles as it goes: all experts at once, nothing decoded here
        let in_kernel = self.gate_up.decoded_in_kernel(&xs, &self.spans)
            && self.down.decoded_in_kernel(&xs, &self.spans);
        let chunk = if in_kernel { usize::MAX } else { self.chunk };
        let weight = |w: &GroupedWeight, c: &Chunk| -> candle_core::Result<GroupedWeight> {
            match in_kernel {
                true => w.experts(c.first, c.count),
                false => Ok(GroupedWeight::Dense(w.experts(c.first, c.count)?.dense()?)),
            }
        };
        for c in chunks(&self.spans, chunk) {
            let gate_up = weight(&self.gate_up, &c)?;
            let down_t = weight(&self.down, &c)?.transpose()?;
            let spans: Spans = Arc::new(c.spans);
            let xc = Var::from_tensor(&xs.narrow(0, c.row, c.rows)?)?;
            let gu = grouped_matmul(xc.as_tensor(), &gate_up, &spans)?;
            let act = swiglu_bias(
                &gu,
                &self.gate_up_bias,
                &self.row_expert.narrow(0, c.row, c.rows)?,
                self.limit,
                self.alpha,
            )?;
            // ∂act = ∂y·Wᵀ, as the grouped matmul's own backward computes it
            let dact = grouped_matmul(&dys.narrow(0, c.row, c.rows)?, &down_t, &spans)?;
            if dots {
                products.push(row_dots(&dact, &act.detach())?);
            }
            let grads = seed_gradient(&act, &dact)?.backward()?;
            let Some(dx) = grads.get(xc.as_tensor()) else {
                candle_core::bail!(
                    "deferred experts: no gradient for the rows of experts {}..{}",
                    c.first,
                    c.first + c.count
                );
            };
            dxs.push(dx.clone());
        }
        let products = match dots {
            true => Some(Tensor::cat(&products, 0)?),
            false => None,
        };
        Ok((Tensor::cat(&dxs, 0)?, products))
    }
}

impl CustomOp2 for DeferredExperts {
    fn name(&self) -> &'static str {
        "moe-deferred-experts"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            s.device().zeros_impl(l.shape(), s.dtype())?,
            l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            s.device().zeros_impl(l.shape(), s.dtype())?,
            l.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        crate::profile::scope("moe.deferred.bwd", grad.device(), || {
            let g = grad.detach().to_dtype(x.dtype())?.contiguous()?;
            let dys = combine_grad_rows(
                &g,
                &w.detach(),
                &self.pos,
                &self.down_bias,
                &self.slot_expert,
            )?;
            let (dxs, dots) = self.rows_backward(&x.detach(), &dys, w.track_op())?;
            let dx = match x.track_op() {
                true => Some(sum_rows(&dxs, &self.pos)?),
                false => None,
            };
            let dw = match dots {
                Some(dots) => Some(
                    combine_grad_weights_from_dots(
                        &g,
                        &dots,
                        &w.detach(),
                        &self.pos,
                        &self.down_bias,
                        &self.slot_expert,
                    )?
                    .to_dtype(w.dtype())?,
                ),
                None => None,
            };
            Ok((dx, dw))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_group_consecutive_experts() {
        let spans = [(0, 0, 3), (1, 3, 0), (2, 3, 2), (5, 5, 4), (6, 9, 1)];
        let c = chunks(&spans, 3);
        assert_eq!(
            c,
            vec![
                Chunk {
                    first: 0,
                    count: 3,
                    row: 0,
                    rows: 5,
                    spans: vec![(0, 0, 3), (2, 3, 2)],
                },
                Chunk {
                    first: 5,
                    count: 2,
                    row: 5,
                    rows: 5,
                    spans: vec![(0, 0, 4), (1, 4, 1)],
                },
            ]
        );
        let one = chunks(&spans, 1);
        assert_eq!(one.len(), 4);
        assert_eq!(one[2].spans, vec![(0, 0, 4)]);
        assert_eq!(chunks(&spans, 64).len(), 1);
    }
}
