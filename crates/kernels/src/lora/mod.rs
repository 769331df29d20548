//! PEFT's `lora_A(x.to(float32))` for a bf16 (or f32) input: `h = x·Aᵀ` in f32.
//!
//! The candle composition casts the `[N, in]` input to a new f32 tensor (kept by autograd), runs an
//! f32 GEMM with only `r` output columns, and in the backward runs two more f32 GEMMs and a cast of
//! `∂x` back to the input's dtype. On CUDA [`down_proj`] does each direction in fused kernels that
//! read `x` in its own dtype (the conversion to f32 is exact): one warp per row for `h`, one thread per
//! four inputs for `∂x = ∂h·A` (rounded once to `x`'s dtype, as the cast's backward does), and a
//! two-pass deterministic column reduction for `∂A = ∂hᵀ·x`. Sums run in f32 in a different order
//! than cuBLAS's, so values agree with the composition to f32 rounding (GPU test `cuda_down_proj`).
//! Elsewhere, or for shapes the kernels do not take (rank above [`MAX_RANK`], `in` not a multiple of
//! 4), it is the composition. [`expert_delta`] runs the same kernels in a grouped form for PEFT's
//! expert (3-D parameter) LoRA, and [`up_add`] is PEFT's up projection `lora_B` added to the base
//! layer's output in one kernel (the other half of `lora.Linear`).

use candle_core::{DType, Result, Tensor};

/// The largest rank the CUDA kernels take.
pub const MAX_RANK: usize = 16;

/// `x` `[N, in]` (f32 or bf16) · `a` `[r, in]` (f32)ᵀ → `[N, r]` f32, differentiable in `x` and `a`;
/// equal to `x.to_dtype(F32)?.matmul(&a.t()?)` up to f32 summation order.
pub fn down_proj(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::takes(x, a)? {
        let op = cuda::FwdOp {
            group: None,
            scale: 1.0,
        };
        return x.contiguous()?.apply_op2(&a.contiguous()?, op);
    }
    x.to_dtype(DType::F32)?.matmul(&a.t()?)
}

/// PEFT's `lora.Linear` output from its parts: the base layer's `x·Wᵀ` `base` `[.., out]` (f32 or
/// bf16), its frozen `bias` `[out]`, the down projection `h` `[N, r]` f32 (N the rows of `base`) and
/// lora_B `b` `[out, r]` f32 → `round(f32(round(base + bias)) + (h·bᵀ)·scaling)` `[.., out]` in
/// base's dtype ([`crate::add_scaled_delta`] of `h·bᵀ`), differentiable in `base`, `h` and
/// `b`. On CUDA one kernel forms `h·bᵀ` and the sum without the `[N, out]` f32 product in memory
/// (and no matmul or transpose nodes in the autograd graph); the backward forms `f32(∂out)·scaling`
/// in one kernel and runs the two f32 matmuls of `∂h` and `∂b`. Elsewhere (the CPU), or for operands
/// the kernel does not take (`out` not a multiple of 4, rank above [`MAX_RANK`], `h`/`b` not f32,
/// `base` not starting at a multiple of 4 elements, a bias in autograd), it is the f32 matmul and
/// `add_scaled_delta`.
pub fn up_add(
    base: &Tensor,
    bias: Option<&Tensor>,
    h: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::takes_up(base, bias, h, b)? {
        let dims = base.dims().to_vec();
        let cols = b.dim(0)?;
        let rows = base.elem_count() / cols.max(1);
        let op = cuda::UpAddOp {
            bias: bias
                .map(|t| t.to_dtype(base.dtype())?.contiguous())
                .transpose()?,
            scale: scaling as f32,
        };
        let base2 = base.reshape((rows, cols))?.contiguous()?;
        return base2
            .apply_op3(&h.contiguous()?, &b.contiguous()?, op)?
            .reshape(dims);
    }
    let delta = h.matmul(&b.t()?)?.reshape(base.dims())?;
    crate::add_scaled_delta(base, bias, &delta, scaling)
}

/// PEFT's expert LoRA on rows grouped by expert: `x` `[M, in]` (f32 or bf16) whose rows
/// `off..off + len` go to expert `e` for each `(e, off, len)` of `spans` (tiling `0..M` in order), `a`
/// `[E·r, in]` and `b` `[out, r·E]` f32 in PEFT's layouts → `((x·A_eᵀ)·B_eᵀ)·scaling` `[M, out]` in
/// x's dtype, differentiable in `x`, `a` and `b` — `gptoss_lora::expert::LoraExperts`'s per-expert
/// delta for all rows in one autograd node. On CUDA: the `down_proj` kernels in their grouped form
/// (each row picks its expert's block; the weight gradients sum each expert's rows in row splits
/// of 64, then splits in order), one small host→device copy of the row map. `None` elsewhere or for
/// shapes the kernels do not take.
pub fn expert_delta(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    spans: &[(usize, usize, usize)],
    experts: usize,
    scaling: f64,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        let (m, in_dim) = x.dims2()?;
        let (out, rank_cols) = b.dims2()?;
        let r = rank_cols / experts.max(1);
        let fits = x.device().is_cuda()
            && matches!(x.dtype(), DType::F32 | DType::BF16)
            && a.dtype() == DType::F32
            && b.dtype() == DType::F32
            && a.dims() == [experts * r, in_dim]
            && rank_cols == experts * r
            && in_dim % 4 == 0
            && out % 4 == 0
            && (1..=MAX_RANK).contains(&r);
        if fits {
            let group = Some(std::sync::Arc::new(cuda::Group::new(
                spans,
                m,
                experts,
                x.device(),
            )?));
            // Bt_e = B's columns j·E + e: `[E·r, out]`, expert-major like A
            let bt = b
                .reshape((out, r, experts))?
                .permute((2, 1, 0))?
                .contiguous()?
                .reshape((experts * r, out))?;
            let down = cuda::FwdOp {
                group: group.clone(),
                scale: 1.0,
            };
            let h = x.contiguous()?.apply_op2(&a.contiguous()?, down)?;
            let up = cuda::DxOp {
                dtype: x.dtype(),
                group,
                scale: scaling as f32,
            };
            return Ok(Some(h.apply_op2(&bt, up)?));
        }
    }
    let _ = (x, a, b, spans, experts, scaling);
    Ok(None)
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
