//! RMSNorm computed in f32 (transformers `GptOssRMSNorm`).

use candle_core::{DType, Module, Tensor};

/// `y = (w · (x_f32 · rsqrt(mean(x_f32², -1) + eps))).to(x.dtype)`; weight `[H]`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A norm from its weight `[H]` and epsilon.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// The weight `[H]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for RmsNorm {
    /// `x`: `[.., H]` any float dtype → same shape and dtype.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if gptoss_kernels::FastPath::Elementwise.on_for(x) && !self.weight.track_op() {
            return gptoss_kernels::rms_norm(x, &self.weight, self.eps);
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let normed = xf.broadcast_mul(&inv)?;
        normed
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .to_dtype(dtype)
    }
}
