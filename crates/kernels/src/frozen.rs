//! Matmul against a frozen weight: the backward pass computes only the input gradient.
//!
//! candle's autograd computes both operand gradients of every `matmul` in the graph, also when one
//! operand is a plain (frozen) tensor: with LoRA, every base projection then pays for a weight
//! gradient nobody reads (as many FLOPs as the forward matmul) and keeps it in the gradient store
//! (a full `[in, out]` tensor per expert and per linear). [`frozen_matmul`] records a custom op whose
//! backward is `∂L/∂x = ∂L/∂y · Wᵀ` only. The forward runs the backend's own matmul (cuBLAS on CUDA,
//! gemm on the CPU) on the same storages, so values are bit-identical to `x.matmul(w)`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// `y = x · w` with `w` frozen: `x` `[m, k]`, `w` `[k, n]` (any layout candle's matmul accepts,
/// e.g. the transpose of a contiguous `[n, k]` weight) → `[m, n]`, same dtype.
///
/// Falls back to `x.matmul(w)` (both gradients) when `w` takes part in autograd (a `Var` or a tensor
/// computed from one), when `x` does not, or for inputs that are not 2-D.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if w.track_op() || !x.track_op() || x.rank() != 2 || w.rank() != 2 {
        return x.matmul(w);
    }
    x.contiguous()?.apply_op1(FrozenMatmulFwd { w: w.clone() })
}

struct FrozenMatmulFwd {
    w: Tensor,
}

impl FrozenMatmulFwd {
    fn bmnk(&self, layout: &Layout) -> candle_core::Result<((usize, usize, usize, usize), Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (k2, n) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen_matmul: x is [{m}, {k}] but w is [{k2}, {n}]");
        }
        Ok(((1, m, n, k), Shape::from((m, n))))
    }
}

impl CustomOp1 for FrozenMatmulFwd {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bmnk, shape) = self.bmnk(l)?;
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(w) => Ok((s.matmul(w, bmnk, l, wl)?, shape)),
            _ => candle_core::bail!("frozen_matmul: x on the CPU, w elsewhere"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (bmnk, shape) = self.bmnk(l)?;
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cuda(w) => Ok((s.matmul(w, bmnk, l, wl)?, shape)),
            _ => candle_core::bail!("frozen_matmul: x on CUDA, w elsewhere"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w.t()?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_input_gradient_match_matmul() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?; // [out, in] weight
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev)?)?;
        let g = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        let y_ref = x.as_tensor().matmul(&w.t()?)?;
        let y = frozen_matmul(x.as_tensor(), &w.t()?)?;
        let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff == 0.0, "forward differs by {diff}");
        let gx_ref = (&y_ref * &g)?.sum_all()?.backward()?;
        let gx = (&y * &g)?.sum_all()?.backward()?;
        let a = gx.get(x.as_tensor()).cloned();
        let b = gx_ref.get(x.as_tensor()).cloned();
        let (Some(a), Some(b)) = (a, b) else {
            panic!("missing input gradient");
        };
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "input gradient differs by {diff}");
        // No gradient is produced for the frozen weight.
        assert!(gx.get(&w).is_none());
        Ok(())
    }

    #[test]
    fn var_weight_keeps_its_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 2), &dev)?)?;
        let x = Tensor::randn(0f32, 1.0, (4, 3), &dev)?;
        let y = frozen_matmul(&x, w.as_tensor())?;
        let g = y.sum_all()?.backward()?;
        assert!(g.get(w.as_tensor()).is_some());
        Ok(())
    }
}
