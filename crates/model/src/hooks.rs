//! Hook points for adapters (LoRA) on linear layers and expert weights; the model knows nothing of LoRA.
//! The contract is fixed in `docs/model-api.md`.

use candle_core::Tensor;

/// Adapter on a linear layer.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// `x`: layer input `[.., in]` (run dtype); `base`: `x·Wᵀ + b`, `[.., out]` (run dtype).
    /// Returns the layer output `[.., out]` in `base`'s dtype.
    fn forward(&self, x: &Tensor, base: &Tensor) -> candle_core::Result<Tensor>;

    /// As [`Self::forward`], with the base output given without its bias: `base` = `x·Wᵀ`
    /// `[.., out]` and the layer's `bias` `[out]` (run dtype), so that an adapter can fuse the bias
    /// add with its own (see [`crate::add_scaled_delta`]). The default adds the bias and calls
    /// [`Self::forward`]; [`crate::Linear`] calls this one.
    fn forward_unbiased(
        &self,
        x: &Tensor,
        base: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match bias {
            Some(b) => self.forward(x, &base.broadcast_add(b)?),
            None => self.forward(x, base),
        }
    }
}

/// Adapter on one 3-D expert parameter (`gate_up_proj` `[E, H, 2I]` or `down_proj` `[E, I, H]`, layout
/// `[E, in, out]`).
pub trait ExpertAdapter: Send + Sync + std::fmt::Debug {
    /// `x`: the rows routed to `expert`, `[n, in]` (run dtype). Returns `x·ΔW[expert]`, `[n, out]`, in x's dtype;
    /// the model adds it to `x·W[expert]` (before the bias).
    fn delta(&self, expert: usize, x: &Tensor) -> candle_core::Result<Tensor>;

    /// All routed rows at once: `x` `[M, in]` (run dtype) whose rows `off..off + len` go to expert
    /// `e` for each `(e, off, len)` of `spans` (the spans tile `0..M` in order) → `[M, out]` in x's
    /// dtype. The default is [`delta_per_expert`].
    fn delta_grouped(
        &self,
        x: &Tensor,
        spans: &[(usize, usize, usize)],
    ) -> candle_core::Result<Tensor> {
        delta_per_expert(self, x, spans)
    }
}

/// [`ExpertAdapter::delta_grouped`] by [`ExpertAdapter::delta`] on each span, concatenated (the
/// default; adapters with a batched form can fall back to it).
pub fn delta_per_expert<A: ExpertAdapter + ?Sized>(
    adapter: &A,
    x: &Tensor,
    spans: &[(usize, usize, usize)],
) -> candle_core::Result<Tensor> {
    let mut parts = Vec::with_capacity(spans.len());
    for &(e, off, len) in spans {
        parts.push(adapter.delta(e, &x.narrow(0, off, len)?)?);
    }
    Tensor::cat(&parts, 0)
}

/// Which 3-D expert parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpertParam {
    /// `gate_up_proj` `[E, H, 2I]` (output columns interleaved: even = gate, odd = up).
    GateUp,
    /// `down_proj` `[E, I, H]`.
    Down,
}

impl ExpertParam {
    /// The HF parameter name: `"gate_up_proj"` or `"down_proj"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::GateUp => "gate_up_proj",
            Self::Down => "down_proj",
        }
    }
}
