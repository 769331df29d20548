//! Linear layer `y = x·Wᵀ + b` with an optional adapter hook.

use std::sync::Arc;

use candle_core::{Module, Tensor};

use crate::error::{ModelError, Result};
use crate::hooks::LinearAdapter;

/// A linear layer (HF `nn.Linear`): weight `[out, in]`, optional bias `[out]`, optional adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]` (same dtype and device).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
        }
    }

    /// Install (or remove, with `None`) the adapter applied after the base projection.
    pub fn set_adapter(&mut self, a: Option<Arc<dyn LinearAdapter>>) {
        self.adapter = a;
    }

    /// The installed adapter.
    pub fn adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        self.adapter.as_ref()
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Replace the weight (e.g. after merging an adapter); shape, dtype and device must stay the same.
    pub fn set_weight(&mut self, w: Tensor) -> Result<()> {
        if w.dims() != self.weight.dims()
            || w.dtype() != self.weight.dtype()
            || !w.device().same_device(self.weight.device())
        {
            return Err(ModelError::arg(
                "w",
                format!(
                    "expected shape {:?} {:?} on {:?}, got {:?} {:?} on {:?}",
                    self.weight.dims(),
                    self.weight.dtype(),
                    self.weight.device().location(),
                    w.dims(),
                    w.dtype(),
                    w.device().location()
                ),
            ));
        }
        self.weight = w;
        Ok(())
    }

    /// The base projection `x·Wᵀ + b` without the adapter. `x`: `[.., in]` → `[.., out]`, run dtype.
    pub fn forward_base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.project(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `x·Wᵀ` without the bias: `[.., in]` → `[.., out]`, run dtype.
    fn project(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let y = gptoss_kernels::frozen_matmul(&x2, &self.weight.t()?)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out_dims)
    }
}

impl Module for Linear {
    /// `x`: `[.., in]` → `[.., out]` (run dtype), adapter applied when installed.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.adapter {
            Some(a) => a.forward_unbiased(x, &self.project(x)?, self.bias.as_ref()),
            None => self.forward_base(x),
        }
    }
}
