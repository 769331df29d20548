//! A scalar that hands a given gradient to a tensor in `backward()`: the way a checkpointed
//! recompute (the trainer's per layer, the MoE backward's per expert chunk) continues the chain
//! rule from the gradient of an output.
//!
//! `sum(out · g)` has `∂/∂out = g`, but costs a product, two reductions and their backward
//! (a broadcast copy and two more products) over the whole `[B, T, H]` activation per layer.
//! [`seed_gradient`] gives the same `∂/∂out = g` directly: its backward returns `g` as is. Its
//! value (0) is not `sum(out · g)`, and its backward ignores the gradient flowing into it, which is
//! exactly 1 when it is the root of `backward()` or a summand of the root — the only ways it is
//! meant to be used.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Storage, Tensor};

/// A scalar (`out`'s dtype, value 0) whose gradient with respect to `out` is `g` (same shape and
/// dtype as `out`), for use as the root of `backward()` or a summand of it.
pub fn seed_gradient(out: &Tensor, g: &Tensor) -> Result<Tensor> {
    if out.dims() != g.dims() || out.dtype() != g.dtype() {
        candle_core::bail!(
            "seed_gradient: gradient {:?} {:?} does not match the output {:?} {:?}",
            g.dims(),
            g.dtype(),
            out.dims(),
            out.dtype()
        );
    }
    out.apply_op1(SeedGrad { g: g.clone() })
}

struct SeedGrad {
    g: Tensor,
}

impl CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "seed_gradient"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let zero = Tensor::zeros((), s.dtype(), &Device::Cpu)?;
        let (st, _) = zero.storage_and_layout();
        match &*st {
            Storage::Cpu(c) => Ok((c.clone(), Shape::from(()))),
            _ => candle_core::bail!("seed_gradient: a CPU zero is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let shape = Shape::from(());
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.g.clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::seed_gradient;

    #[test]
    fn gradient_equals_that_of_the_dot_surrogate() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::arange(0f32, 12.0, &dev)?.reshape((3, 4))?)?;
        let out = (w.as_tensor().sqr()? * 0.5)?; // ∂out/∂w = w
        let g = Tensor::arange(1f32, 13.0, &dev)?
            .reshape((3, 4))?
            .affine(0.25, -1.0)?;
        let reference = (&out * &g)?.sum_all()?.backward()?;
        let seeded = seed_gradient(&out, &g)?.backward()?;
        let (a, b) = (
            reference.get(w.as_tensor()).expect("reference gradient"),
            seeded.get(w.as_tensor()).expect("seeded gradient"),
        );
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        // as a summand of the root too
        let extra = w.as_tensor().sum_all()?;
        let sum = (seed_gradient(&out, &g)? + &extra)?.backward()?;
        let with_extra = (b + 1.0)?;
        assert_eq!(
            sum.get(w.as_tensor()).expect("gradient").to_vec2::<f32>()?,
            with_extra.to_vec2::<f32>()?
        );
        assert!(seed_gradient(&out, &g.to_dtype(DType::BF16)?).is_err());
        Ok(())
    }
}
