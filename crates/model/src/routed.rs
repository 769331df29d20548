//! Gather of routed rows and their scatter-add back to tokens, with the kernel that suits the device.
//!
//! candle's CUDA `index_add` (the backward of `index_select` as well) runs one thread per hidden column and
//! loops over all `M = N·k` routed rows sequentially, which costs milliseconds per MoE layer at training
//! sizes. On CUDA the map is therefore a one-hot selection matrix `S` `[M, N]` and both directions are
//! matmuls (`S·x`, `Sᵀ·y`) on the tensor cores, exact for a gather (one nonzero per row) and accumulated in
//! f32 for the scatter. On the CPU, and when `S` would exceed [`MAX_ONEHOT_ELEMS`], `index_select` /
//! `index_add` are used.

use candle_core::{Device, Tensor};

use crate::frozen::frozen_matmul;

/// Largest one-hot matrix (`M·N` elements) built on CUDA (2^28: 512 MiB in bf16).
pub const MAX_ONEHOT_ELEMS: usize = 1 << 28;

/// Which token each routed row belongs to.
#[derive(Debug, Clone)]
pub(crate) struct RowMap {
    tokens: Tensor,
    onehot: Option<Tensor>,
    n: usize,
}

impl RowMap {
    /// `tokens`: token index of each routed row (`M` entries, each `< n`); `dtype`: the activations' dtype.
    pub(crate) fn new(tokens: &[u32], n: usize, x: &Tensor) -> candle_core::Result<Self> {
        let dev: &Device = x.device();
        let t = Tensor::new(tokens, dev)?;
        let onehot = if dev.is_cuda() && tokens.len() * n <= MAX_ONEHOT_ELEMS {
            let cols = Tensor::arange(0u32, n as u32, dev)?.unsqueeze(0)?;
            Some(t.unsqueeze(1)?.broadcast_eq(&cols)?.to_dtype(x.dtype())?)
        } else {
            None
        };
        Ok(Self {
            tokens: t,
            onehot,
            n,
        })
    }

    /// `x` `[N, H]` → the routed rows `[M, H]`.
    pub(crate) fn gather(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.onehot {
            // (xᵀ·Sᵀ)ᵀ keeps the frozen operand on the right of frozen_matmul.
            Some(s) => frozen_matmul(&x.t()?, &s.t()?)?.t()?.contiguous(),
            None => x.index_select(&self.tokens, 0),
        }
    }

    /// `y` `[M, H]` → `[N, H]`, summing the rows of each token.
    pub(crate) fn scatter_add(&self, y: &Tensor) -> candle_core::Result<Tensor> {
        match &self.onehot {
            Some(s) => frozen_matmul(&y.t()?, s)?.t()?.contiguous(),
            None => {
                let h = y.dim(1)?;
                Tensor::zeros((self.n, h), y.dtype(), y.device())?.index_add(&self.tokens, y, 0)
            }
        }
    }
}
