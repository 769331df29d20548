//! The AdamW update of torch's `AdamW` (single-tensor, `foreach=False` order of operations): for
//! each f32 element `p ← p·(1 − lr·wd)`, `m ← m + (g − m)(1 − β1)`, `v ← v·β2 + g·(1 − β2)·g`,
//! `p ← p − (lr / (1 − β1ᵗ))·m / (√v / √(1 − β2ᵗ) + ε)`.
//!
//! [`update`] is the candle-op composition (the reference, any device) and, on CUDA for f32
//! parameters, one kernel that computes the same f32 operations in the same order, each rounded
//! to nearest without FMA contraction (`__fmul_rn`, `__fadd_rn`, `__fsqrt_rn`, `__fdiv_rn`), so it
//! gives the composition's values bit for bit (GPU test `cuda_adamw`). The composition launches
//! about 13 kernels per parameter; the cookbook LoRA has 204 parameters, so the optimizer step was
//! ≈ 30 ms of launches. [`fused_clip_and_step`] does the gradient-norm clipping and every
//! parameter's update in three launches for all parameters.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use candle_core::{DType, Result, Tensor, Var};

/// The scalars of one AdamW update (rounded to f32 by the kernels, which take them as arguments).
#[derive(Debug, Clone, Copy)]
pub struct Scalars {
    /// Whether weight decay applies (`p ← p·keep` first).
    pub decay: bool,
    /// `1 − lr·wd`.
    pub keep: f64,
    /// `1 − β1`.
    pub one_minus_b1: f64,
    /// `β2`.
    pub b2: f64,
    /// `1 − β2`.
    pub one_minus_b2: f64,
    /// `1 / sqrt(1 − β2^t)`.
    pub inv_bc2_sqrt: f64,
    /// `ε`.
    pub eps: f64,
    /// `lr / (1 − β1^t)`.
    pub step_size: f64,
}

/// Updates `param` and its moments `exp_avg`, `exp_avg_sq` (same shape and dtype) from `grad`
/// (the parameter's dtype and shape) with the scalars `s`. On CUDA with f32 tensors one kernel
/// writes all three in place; elsewhere the candle composition replaces the moments' tensors.
pub fn update(
    param: &Var,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    grad: &Tensor,
    s: Scalars,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if param.device().is_cuda() && param.dtype() == DType::F32 {
        return cuda::step(
            param.as_tensor(),
            exp_avg,
            exp_avg_sq,
            &grad.contiguous()?,
            s,
        );
    }
    let g = grad;
    let mut p = param.as_tensor().clone();
    if s.decay {
        p = p.affine(s.keep, 0.0)?;
    }
    // exp_avg.lerp_(grad, 1 - beta1)
    let m = (&*exp_avg + (g - &*exp_avg)?.affine(s.one_minus_b1, 0.0)?)?;
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v = (exp_avg_sq.affine(s.b2, 0.0)? + (g.affine(s.one_minus_b2, 0.0)? * g)?)?;
    let denom = v.sqrt()?.affine(s.inv_bc2_sqrt, 0.0)?.affine(1.0, s.eps)?;
    let upd = (m.affine(s.step_size, 0.0)? / denom)?;
    param.set(&(p - upd)?)?;
    *exp_avg = m;
    *exp_avg_sq = v;
    Ok(())
}

/// One parameter of [`fused_clip_and_step`]: the parameter, its two moments and its gradient.
pub struct Item<'a> {
    /// The parameter (updated in place).
    pub param: &'a Tensor,
    /// First moment (updated in place).
    pub exp_avg: &'a Tensor,
    /// Second moment (updated in place).
    pub exp_avg_sq: &'a Tensor,
    /// The gradient (not clipped yet).
    pub grad: &'a Tensor,
}

/// Whether [`fused_clip_and_step`] takes these items: built with `cuda` and every tensor f32,
/// contiguous, on one CUDA device, each gradient of its parameter's shape (true for no items).
pub fn fused_takes(items: &[Item]) -> bool {
    let ok = |t: &Tensor| t.device().is_cuda() && t.dtype() == DType::F32 && t.is_contiguous();
    cfg!(feature = "cuda")
        && items.iter().all(|it| {
            it.grad.shape() == it.param.shape()
                && ok(it.grad)
                && ok(it.param)
                && it.grad.device().same_device(it.param.device())
        })
}

/// Clip (with `max_norm`: torch's `clip_grad_norm_`, coefficient `min(max_norm / (norm + 1e-6),
/// 1)`) and AdamW update of every item (the gradients scaled by the coefficient first) in three
/// launches: the squared sum of every gradient, the total norm and coefficient, every update.
/// Returns the pre-clip total norm, a scalar f32 tensor on the device. `items` must not be empty
/// and must satisfy [`fused_takes`]; without `cuda` this is an error.
pub fn fused_clip_and_step(items: &[Item], s: Scalars, max_norm: Option<f64>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::clip_and_step(items, s, max_norm);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (items, s, max_norm);
        candle_core::bail!("adamw: the fused clip-and-step needs the `cuda` feature")
    }
}
