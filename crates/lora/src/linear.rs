//! LoRA on a linear layer (PEFT `lora.Linear`): `y = base + scaling · B(A(dropout(x)))`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use gptoss_model::LinearAdapter;

/// The adapter of one linear layer. Factors are f32 [`Var`]s (trainable): A `[r, in]`, B `[out, r]`.
/// As in PEFT, the input is cast to f32, the LoRA term is added to the base output in f32 and the sum is cast
/// back to the base output's dtype.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    a: Var,
    b: Var,
    scaling: f64,
    dropout: f32,
    training: Arc<AtomicBool>,
}

impl LoraLinear {
    /// An adapter from its factors (A `[r, in]`, B `[out, r]`, f32), output scaling and input dropout
    /// probability; dropout is applied only while `training` is true.
    pub fn new(a: Var, b: Var, scaling: f64, dropout: f32, training: Arc<AtomicBool>) -> Self {
        LoraLinear {
            a,
            b,
            scaling,
            dropout,
            training,
        }
    }

    /// lora_A `[r, in]` f32.
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// lora_B `[out, r]` f32.
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// The output scaling (alpha / r, or alpha / √r with rslora).
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// The LoRA term `scaling · B(A(dropout(x)))`: `x` `[.., in]` (any float dtype) → `[.., out]` f32.
    pub fn lora_term(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.unscaled_term(x)? * self.scaling
    }

    /// `B(A(dropout(x)))` before the scaling: `x` `[.., in]` (any float dtype) → `[.., out]` f32.
    fn unscaled_term(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.down(x)?.matmul(&self.b.as_tensor().t()?)?;
        let mut out_dims = x.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.b.dim(0)?;
        }
        y.reshape(out_dims)
    }

    /// `A(dropout(x))`: `x` `[.., in]` (any float dtype) → `[rows, r]` f32.
    fn down(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let in_dim = self.a.dim(1)?;
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        if self.dropout > 0.0 && self.training.load(Ordering::Relaxed) {
            let x2 = candle_nn::ops::dropout(&x2.to_dtype(DType::F32)?, self.dropout)?;
            x2.matmul(&self.a.as_tensor().t()?)
        } else {
            gptoss_kernels::lora::down_proj(&x2, self.a.as_tensor())
        }
    }

    /// The dense weight update `scaling · B·A`, `[out, in]` f32 (PEFT `get_delta_weight`).
    pub fn delta_weight(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling
    }

    /// The merged weight `W + sign·scaling·B·A` (PEFT `merge` / `unmerge` with `sign` ±1):
    /// `w` `[out, in]` (any float dtype) is added to in f32 and the sum cast back to `w`'s dtype.
    pub fn merged(&self, w: &Tensor, sign: f64) -> candle_core::Result<Tensor> {
        let dw = (self.delta_weight()?.detach() * sign)?;
        (w.to_dtype(DType::F32)? + dw.to_device(w.device())?)?.to_dtype(w.dtype())
    }
}

impl LinearAdapter for LoraLinear {
    /// `x` `[.., in]`, `base` `[.., out]` (run dtype) → `base + scaling·B(A(x))` in `base`'s dtype.
    fn forward(&self, x: &Tensor, base: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_unbiased(x, base, None)
    }

    /// `x·Wᵀ` and the bias `b` → `round(f32(x·Wᵀ + b) + scaling · B(A(x)))` in one fused pass
    /// ([`gptoss_kernels::lora::up_add`]): the same values as adding the bias first.
    fn forward_unbiased(
        &self,
        x: &Tensor,
        base: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        gptoss_kernels::lora::up_add(base, bias, &self.down(x)?, self.b.as_tensor(), self.scaling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn forward_is_base_plus_scaled_ba() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[[1f32, 0., 2.], [0., -1., 1.]], &dev).unwrap())
            .unwrap();
        let b = Var::from_tensor(&Tensor::new(&[[1f32, 1.], [2., 0.]], &dev).unwrap()).unwrap();
        let l = LoraLinear::new(a, b, 0.5, 0.0, Arc::new(AtomicBool::new(false)));
        let x = Tensor::new(&[[1f32, 2., 3.]], &dev).unwrap();
        let base = Tensor::new(&[[10f32, 20.]], &dev).unwrap();
        // A x = [7, 1]; B A x = [8, 14]; ·0.5 = [4, 7]
        let y: Vec<Vec<f32>> = l.forward(&x, &base).unwrap().to_vec2().unwrap();
        assert_eq!(y, vec![vec![14.0, 27.0]]);
        let xb = x.to_dtype(DType::BF16).unwrap();
        let yb = l
            .forward(&xb, &base.to_dtype(DType::BF16).unwrap())
            .unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
        let dw: Vec<Vec<f32>> = l.delta_weight().unwrap().to_vec2().unwrap();
        assert_eq!(dw, vec![vec![0.5, -0.5, 1.5], vec![1.0, 0.0, 2.0]]);
    }

    #[test]
    fn dropout_only_while_training() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::ones((2, 64), DType::F32, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::ones((3, 2), DType::F32, &dev).unwrap()).unwrap();
        let training = Arc::new(AtomicBool::new(false));
        let l = LoraLinear::new(a, b, 1.0, 0.5, training.clone());
        let x = Tensor::ones((4, 64), DType::F32, &dev).unwrap();
        let eval: Vec<Vec<f32>> = l.lora_term(&x).unwrap().to_vec2().unwrap();
        assert!(eval.iter().flatten().all(|v| *v == 128.0));
        training.store(true, Ordering::Relaxed);
        let train: Vec<Vec<f32>> = l.lora_term(&x).unwrap().to_vec2().unwrap();
        assert!(train.iter().flatten().any(|v| *v != 128.0));
    }
}
