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
/// base's dtype ([`gptoss_model::add_scaled_delta`] of `h·bᵀ`), differentiable in `base`, `h` and
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
    gptoss_model::add_scaled_delta(base, bias, &delta, scaling)
}

/// PEFT's expert LoRA on rows grouped by expert: `x` `[M, in]` (f32 or bf16) whose rows
/// `off..off + len` go to expert `e` for each `(e, off, len)` of `spans` (tiling `0..M` in order), `a`
/// `[E·r, in]` and `b` `[out, r·E]` f32 in PEFT's layouts → `((x·A_eᵀ)·B_eᵀ)·scaling` `[M, out]` in
/// x's dtype, differentiable in `x`, `a` and `b` — [`crate::expert::LoraExperts`]'s per-expert
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
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use std::sync::Arc;

    use candle_core::{
        CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
        Tensor,
    };
    use gptoss_model::nvrtc::{contiguous_range, Kernels};

    use super::MAX_RANK;

    const SRC: &str = r#"
#define RMAX 16
#define RPW 4

// Four consecutive values of x from element i (i a multiple of 4, the row 8- or 16-byte aligned).
__device__ __forceinline__ void ld4(const u16* p, u64 i, float* v) {
    const uint2 u = *reinterpret_cast<const uint2*>(p + i);
    v[0] = __uint_as_float(u.x << 16); v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16); v[3] = __uint_as_float(u.y & 0xffff0000u);
}
__device__ __forceinline__ void ld4(const float* p, u64 i, float* v) {
    const float4 u = *reinterpret_cast<const float4*>(p + i);
    v[0] = u.x; v[1] = u.y; v[2] = u.z; v[3] = u.w;
}
// Four values rounded to the element type from element i (i a multiple of 4, 8- or 16-byte aligned).
__device__ __forceinline__ void st4(u16* p, u64 i, const float* v) {
    uint2 u;
    u.x = (__float_as_uint(bf16_round(v[0])) >> 16) | (__float_as_uint(bf16_round(v[1])) & 0xffff0000u);
    u.y = (__float_as_uint(bf16_round(v[2])) >> 16) | (__float_as_uint(bf16_round(v[3])) & 0xffff0000u);
    *reinterpret_cast<uint2*>(p + i) = u;
}
__device__ __forceinline__ void st4(float* p, u64 i, const float* v) {
    *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
}

// Grouped forms (G): row m uses the weight block blk[m] ([r, in] each, back to back), and the
// reduction over rows runs per block over the row ranges `splits` ([row0, row1) pairs, grouped by
// block); `scale` multiplies each x value (rounded) before it enters a sum, or (dx) the finished sum.

// h[row, j] = sum_i (x[row, i] scale) a_row[j, i]: one block per RPW rows, its warps splitting i; the
// warps' partial sums are added in shared memory, in warp order.
template <typename T, bool G>
__device__ void fwd(const T* __restrict__ x, const float* __restrict__ a, float* __restrict__ h,
                    int n, int in, int r, float scale, const u32* __restrict__ blk) {
    __shared__ float part[32][RPW][RMAX];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const u64 row0 = (u64)blockIdx.x * RPW;
    const float* aq[RPW];
#pragma unroll
    for (int q = 0; q < RPW; ++q)
        aq[q] = a + (G ? (u64)blk[row0 + q < (u64)n ? row0 + q : (u64)n - 1] * r * in : 0);
    float acc[RPW][RMAX];
#pragma unroll
    for (int q = 0; q < RPW; ++q)
#pragma unroll
        for (int j = 0; j < RMAX; ++j) acc[q][j] = 0.f;
    for (int i = (warp * 32 + lane) * 4; i < in; i += warps * 128) {
        float v[RPW][4];
#pragma unroll
        for (int q = 0; q < RPW; ++q) {
            if (row0 + q < (u64)n) {
                ld4(x, (row0 + q) * in + i, v[q]);
#pragma unroll
                for (int c = 0; c < 4; ++c) v[q][c] = __fmul_rn(v[q][c], scale);
            } else {
                v[q][0] = v[q][1] = v[q][2] = v[q][3] = 0.f;
            }
        }
#pragma unroll
        for (int j = 0; j < RMAX; ++j) {
            if (j < r) {
#pragma unroll
                for (int q = 0; q < RPW; ++q) {
                    const float4 w = *reinterpret_cast<const float4*>(aq[q] + (u64)j * in + i);
                    acc[q][j] = fmaf(v[q][3], w.w, fmaf(v[q][2], w.z, fmaf(v[q][1], w.y, fmaf(v[q][0], w.x, acc[q][j]))));
                }
            }
        }
    }
#pragma unroll
    for (int q = 0; q < RPW; ++q) {
#pragma unroll
        for (int j = 0; j < RMAX; ++j) {
            if (j < r) {
                const float s = warp_red(acc[q][j], false);
                if (lane == 0) part[warp][q][j] = s;
            }
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < RPW * r; t += blockDim.x) {
        const int q = t / r, j = t % r;
        if (row0 + q < (u64)n) {
            float s = 0.f;
            for (int w = 0; w < warps; ++w) s += part[w][q][j];
            h[(row0 + q) * r + j] = s;
        }
    }
}

// out[row, i..i+4] = (sum_j g[row, j] a_row[j, i..i+4]) scale, rounded to T: one thread per four
// outputs of RPW rows.
template <typename T, bool G>
__device__ void dx(const float* __restrict__ g, const float* __restrict__ a, T* __restrict__ out,
                   int n, int in, int r, float scale, const u32* __restrict__ blk) {
    const u64 quads = in / 4;
    const u64 q = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 groups = ((u64)n + RPW - 1) / RPW;
    if (q >= groups * quads) return;
    const u64 row0 = q / quads * RPW;
    const int i = (int)(q % quads) * 4;
    const float* ap[RPW];
#pragma unroll
    for (int p = 0; p < RPW; ++p)
        ap[p] = a + (G ? (u64)blk[row0 + p < (u64)n ? row0 + p : (u64)n - 1] * r * in : 0);
    float s[RPW][4];
#pragma unroll
    for (int p = 0; p < RPW; ++p) s[p][0] = s[p][1] = s[p][2] = s[p][3] = 0.f;
    for (int j = 0; j < r; ++j) {
#pragma unroll
        for (int p = 0; p < RPW; ++p) {
            const float4 w = *reinterpret_cast<const float4*>(ap[p] + (u64)j * in + i);
            const float gj = row0 + p < (u64)n ? g[(row0 + p) * r + j] : 0.f;
            s[p][0] = fmaf(gj, w.x, s[p][0]); s[p][1] = fmaf(gj, w.y, s[p][1]);
            s[p][2] = fmaf(gj, w.z, s[p][2]); s[p][3] = fmaf(gj, w.w, s[p][3]);
        }
    }
#pragma unroll
    for (int p = 0; p < RPW; ++p) {
        if (row0 + p < (u64)n) {
            const u64 o = (row0 + p) * in + i;
#pragma unroll
            for (int c = 0; c < 4; ++c) st(out, o + c, __fmul_rn(s[p][c], scale));
        }
    }
}

// part[s, j, i] = sum over the rows of split s of g[row, j] (x[row, i] scale): one thread per column.
// Split s is rows [s·per, s·per + per) or, grouped, [splits[2s], splits[2s + 1]).
template <typename T, bool G>
__device__ void da_part(const float* __restrict__ g, const T* __restrict__ x, float* __restrict__ part,
                        int n, int in, int r, int per, float scale, const u32* __restrict__ splits) {
    __shared__ float gs[32][RMAX];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int s = blockIdx.y;
    const int n0 = G ? (int)splits[2 * s] : s * per;
    const int n1 = G ? (int)splits[2 * s + 1] : min(n, n0 + per);
    float acc[RMAX];
#pragma unroll
    for (int j = 0; j < RMAX; ++j) acc[j] = 0.f;
    for (int base = n0; base < n1; base += 32) {
        __syncthreads();
        for (int t = threadIdx.x; t < 32 * r; t += blockDim.x) {
            const int rr = t / r, j = t % r;
            gs[rr][j] = base + rr < n1 ? g[(u64)(base + rr) * r + j] : 0.f;
        }
        __syncthreads();
        const int m = min(32, n1 - base);
        if (i < in) {
            // four rows' loads in flight; rows past m have g = 0 and x = 0 (acc unchanged)
            for (int rr = 0; rr < m; rr += 4) {
                float xv[4];
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    xv[u] = rr + u < m ? __fmul_rn(ld(x, (u64)(base + rr + u) * in + i), scale) : 0.f;
#pragma unroll
                for (int u = 0; u < 4; ++u)
#pragma unroll
                    for (int j = 0; j < RMAX; ++j) if (j < r) acc[j] = fmaf(gs[rr + u][j], xv[u], acc[j]);
            }
        }
    }
    if (i < in) {
#pragma unroll
        for (int j = 0; j < RMAX; ++j) if (j < r) part[((u64)s * r + j) * in + i] = acc[j];
    }
}

// da[k] = sum over all splits of part[s, k] (k over r·in), in order of s.
__device__ void da_sum(const float* __restrict__ part, float* __restrict__ da, int splits, u64 ri) {
    const u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= ri) return;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += part[(u64)s * ri + k];
    da[k] = v;
}

// da[e, k] = sum of part[s, k] over block e's splits seg[e] .. seg[e + 1] (0 without any), in order.
__device__ void da_sum_seg(const float* __restrict__ part, float* __restrict__ da, const u32* __restrict__ seg,
                           int blocks, u64 ri) {
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u64)blocks * ri) return;
    const int e = (int)(t / ri);
    const u64 k = t % ri;
    float v = 0.f;
    for (u32 s = seg[e]; s < seg[e + 1]; ++s) v += part[(u64)s * ri + k];
    da[t] = v;
}

// Eight consecutive values from element i (i a multiple of 8, 16-byte aligned rows).
__device__ __forceinline__ void ld8(const u16* p, u64 i, float* v) { ldv<u16, 8, true>(p, i, v); }
__device__ __forceinline__ void ld8(const float* p, u64 i, float* v) {
    ldv<float, 4, true>(p, i, v);
    ldv<float, 4, true>(p, i + 4, v + 4);
}

// The ungrouped forward for r <= 8 in two passes. fwd_split: one block per 32 rows and SPLIT_IN
// inputs, a warp per 4 rows, a lane per 8 inputs; a warp's 4 rows x 8 partial sums are reduced
// across its lanes by a butterfly that leaves lane l = 8q + j with row q's sum j, written to
// part[split, row, j]. fwd_sum: h[row, j] = the sum over the splits, in order.
// One step of the warp's transpose-reduction: v[k] (k < S) becomes the pair's sum of the value
// k + (lane & S) (after the steps 16, 8, 4, 2, 1, v[0] holds the warp's sum of value `lane`).
template <int S>
__device__ __forceinline__ void butterfly(float* v, int lane) {
    const bool upper = lane & S;
#pragma unroll
    for (int k = 0; k < S; ++k) {
        const float send = upper ? v[k] : v[k + S];
        const float keep = upper ? v[k + S] : v[k];
        v[k] = keep + __shfl_xor_sync(0xffffffffu, send, S);
    }
}

#define SPLIT_IN 256  // SPLIT_IN on the host
template <typename T>
__device__ void fwd_split(const T* __restrict__ x, const float* __restrict__ a, float* __restrict__ part,
                          int n, int in, int r, float scale) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u64 row0 = (u64)blockIdx.x * 32 + warp * 4;
    const int i = blockIdx.y * SPLIT_IN + lane * 8;
    float xv[4][8];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if (row0 + q < (u64)n && i < in) {
            ld8(x, (row0 + q) * in + i, xv[q]);
#pragma unroll
            for (int c = 0; c < 8; ++c) xv[q][c] = __fmul_rn(xv[q][c], scale);
        } else {
#pragma unroll
            for (int c = 0; c < 8; ++c) xv[q][c] = 0.f;
        }
    }
    float v[32];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        float w[8];
        if (j < r && i < in) {
            ld8(a, (u64)j * in + i, w);
        } else {
#pragma unroll
            for (int c = 0; c < 8; ++c) w[c] = 0.f;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float acc = 0.f;
#pragma unroll
            for (int c = 0; c < 8; ++c) acc = fmaf(xv[q][c], w[c], acc);
            v[q * 8 + j] = acc;
        }
    }
    butterfly<16>(v, lane);
    butterfly<8>(v, lane);
    butterfly<4>(v, lane);
    butterfly<2>(v, lane);
    butterfly<1>(v, lane);
    const int q = lane >> 3, j = lane & 7;
    if (row0 + q < (u64)n && j < r) part[((u64)blockIdx.y * n + row0 + q) * r + j] = v[0];
}

__device__ void fwd_sum(const float* __restrict__ part, float* __restrict__ h, u64 nr, int splits) {
    const u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= nr) return;
    float s = 0.f;
    for (int sp = 0; sp < splits; ++sp) s += part[(u64)sp * nr + k];
    h[k] = s;
}

// PEFT's LoRA output for the ungrouped up projection, bt = lora_Bᵀ [r, cols] (r <= R):
// out[row, o] = rnd(rnd(base[row, o] + bias[o]) + ((sum_j h[row, j] bt[j, o]) scale + 0)), rnd to T
// (the bias term only with BIAS); one thread per four outputs of UPW rows, its four columns of bt in
// registers.
#define UPW 8  // UP_ROWS on the host
template <typename T, bool BIAS, int R>
__device__ void up_add(const T* __restrict__ base, const T* __restrict__ bias, const float* __restrict__ h,
                       const float* __restrict__ bt, T* __restrict__ out, int n, int cols, int r, float scale) {
    const u32 quads = (u32)cols / 4;
    const u64 q = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 groups = ((u64)n + UPW - 1) / UPW;
    if (q >= groups * quads) return;
    const u64 row0 = (u64)((u32)(q / quads)) * UPW;
    const int o = (int)(q % quads) * 4;
    float4 w[R];
#pragma unroll
    for (int j = 0; j < R; ++j)
        w[j] = j < r ? *reinterpret_cast<const float4*>(bt + (u64)j * cols + o) : make_float4(0.f, 0.f, 0.f, 0.f);
    float bb[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) bb[c] = BIAS ? ld(bias, o + c) : 0.f;
    for (int p = 0; p < UPW && row0 + p < (u64)n; ++p) {
        const u64 row = row0 + p;
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < R; ++j) {
            if (j < r) {
                const float gj = h[row * r + j];
                s[0] = fmaf(gj, w[j].x, s[0]); s[1] = fmaf(gj, w[j].y, s[1]);
                s[2] = fmaf(gj, w[j].z, s[2]); s[3] = fmaf(gj, w[j].w, s[3]);
            }
        }
        const u64 at = row * cols + o;
        float v[4];
        ld4(base, at, v);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            if (BIAS) {
                v[c] += bb[c];
                if (sizeof(T) == 2) v[c] = bf16_round(v[c]);
            }
            v[c] = v[c] + (__fmul_rn(s[c], scale) + 0.f);
        }
        st4(out, at, v);
    }
}

// bt[j, o] = b[o, j] for b [rows, cols].
__device__ void transpose(const float* __restrict__ b, float* __restrict__ bt, int rows, int cols) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)rows * cols) return;
    const u64 o = i / cols, j = i % cols;
    bt[j * rows + o] = b[i];
}

// o[i] = f32(g[i]) scale + 0.
template <typename T>
__device__ void scale_to_f32(const T* __restrict__ g, float* __restrict__ o, u64 len, float scale) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        o[i] = __fmul_rn(ld(g, i), scale) + 0.f;
}

extern "C" __global__ void lora_down_fwd_f32(const float* x, const float* a, float* h, int n, int in, int r, float sc, const u32* b) { fwd<float, false>(x, a, h, n, in, r, sc, b); }
extern "C" __global__ void lora_down_fwd_bf16(const u16* x, const float* a, float* h, int n, int in, int r, float sc, const u32* b) { fwd<u16, false>(x, a, h, n, in, r, sc, b); }
extern "C" __global__ void lora_down_fwd_g_f32(const float* x, const float* a, float* h, int n, int in, int r, float sc, const u32* b) { fwd<float, true>(x, a, h, n, in, r, sc, b); }
extern "C" __global__ void lora_down_fwd_g_bf16(const u16* x, const float* a, float* h, int n, int in, int r, float sc, const u32* b) { fwd<u16, true>(x, a, h, n, in, r, sc, b); }
extern "C" __global__ void lora_down_dx_f32(const float* g, const float* a, float* o, int n, int in, int r, float sc, const u32* b) { dx<float, false>(g, a, o, n, in, r, sc, b); }
extern "C" __global__ void lora_down_dx_bf16(const float* g, const float* a, u16* o, int n, int in, int r, float sc, const u32* b) { dx<u16, false>(g, a, o, n, in, r, sc, b); }
extern "C" __global__ void lora_down_dx_g_f32(const float* g, const float* a, float* o, int n, int in, int r, float sc, const u32* b) { dx<float, true>(g, a, o, n, in, r, sc, b); }
extern "C" __global__ void lora_down_dx_g_bf16(const float* g, const float* a, u16* o, int n, int in, int r, float sc, const u32* b) { dx<u16, true>(g, a, o, n, in, r, sc, b); }
extern "C" __global__ void lora_down_da_part_f32(const float* g, const float* x, float* p, int n, int in, int r, int per, float sc, const u32* sp) { da_part<float, false>(g, x, p, n, in, r, per, sc, sp); }
extern "C" __global__ void lora_down_da_part_bf16(const float* g, const u16* x, float* p, int n, int in, int r, int per, float sc, const u32* sp) { da_part<u16, false>(g, x, p, n, in, r, per, sc, sp); }
extern "C" __global__ void lora_down_da_part_g_f32(const float* g, const float* x, float* p, int n, int in, int r, int per, float sc, const u32* sp) { da_part<float, true>(g, x, p, n, in, r, per, sc, sp); }
extern "C" __global__ void lora_down_da_part_g_bf16(const float* g, const u16* x, float* p, int n, int in, int r, int per, float sc, const u32* sp) { da_part<u16, true>(g, x, p, n, in, r, per, sc, sp); }
extern "C" __global__ void lora_down_da_sum(const float* p, float* da, int splits, u64 ri) { da_sum(p, da, splits, ri); }
#define UP_ENTRIES(R) \
extern "C" __global__ void lora_up_add##R##_f32(const float* base, const float* bias, const float* h, const float* b, float* o, int n, int cols, int r, float sc) { up_add<float, false, R>(base, bias, h, b, o, n, cols, r, sc); } \
extern "C" __global__ void lora_up_add##R##_bf16(const u16* base, const u16* bias, const float* h, const float* b, u16* o, int n, int cols, int r, float sc) { up_add<u16, false, R>(base, bias, h, b, o, n, cols, r, sc); } \
extern "C" __global__ void lora_up_add##R##_bias_f32(const float* base, const float* bias, const float* h, const float* b, float* o, int n, int cols, int r, float sc) { up_add<float, true, R>(base, bias, h, b, o, n, cols, r, sc); } \
extern "C" __global__ void lora_up_add##R##_bias_bf16(const u16* base, const u16* bias, const float* h, const float* b, u16* o, int n, int cols, int r, float sc) { up_add<u16, true, R>(base, bias, h, b, o, n, cols, r, sc); }
UP_ENTRIES(8)
UP_ENTRIES(16)
extern "C" __global__ void lora_down_fwd_split_f32(const float* x, const float* a, float* p, int n, int in, int r, float sc) { fwd_split<float>(x, a, p, n, in, r, sc); }
extern "C" __global__ void lora_down_fwd_split_bf16(const u16* x, const float* a, float* p, int n, int in, int r, float sc) { fwd_split<u16>(x, a, p, n, in, r, sc); }
extern "C" __global__ void lora_down_fwd_sum(const float* p, float* h, u64 nr, int splits) { fwd_sum(p, h, nr, splits); }
extern "C" __global__ void lora_transpose_f32(const float* b, float* bt, int rows, int cols) { transpose(b, bt, rows, cols); }
extern "C" __global__ void lora_scale_f32(const float* g, float* o, u64 len, float sc) { scale_to_f32(g, o, len, sc); }
extern "C" __global__ void lora_scale_bf16(const u16* g, float* o, u64 len, float sc) { scale_to_f32(g, o, len, sc); }
extern "C" __global__ void lora_down_da_sum_seg(const float* p, float* da, const u32* seg, int blocks, u64 ri) { da_sum_seg(p, da, seg, blocks, ri); }
"#;

    static KERNELS: Kernels = Kernels::new("gptoss_lora_down", SRC);

    /// Rows per thread of the `lora_up_add` kernels (`UPW` there).
    const UP_ROWS: usize = 8;

    /// Whether the kernels take `x`, `a`: CUDA, x f32/bf16 `[N, in]`, a f32 `[r ≤ MAX_RANK, in]`,
    /// `in` a multiple of 4.
    pub(super) fn takes(x: &Tensor, a: &Tensor) -> Result<bool> {
        if !x.device().is_cuda() || x.rank() != 2 || a.rank() != 2 {
            return Ok(false);
        }
        let (_, in_dim) = x.dims2()?;
        let (r, a_in) = a.dims2()?;
        Ok(matches!(x.dtype(), DType::F32 | DType::BF16)
            && a.dtype() == DType::F32
            && a_in == in_dim
            && in_dim % 4 == 0
            && (1..=MAX_RANK).contains(&r))
    }

    /// Whether [`super::up_add`]'s kernel takes these operands: CUDA, base f32/bf16 with `out`
    /// (a multiple of 4) columns, h f32 `[N, r ≤ MAX_RANK]` for base's N rows, b f32 `[out, r]`, a
    /// frozen bias.
    pub(super) fn takes_up(
        base: &Tensor,
        bias: Option<&Tensor>,
        h: &Tensor,
        b: &Tensor,
    ) -> Result<bool> {
        if !base.device().is_cuda() || h.rank() != 2 || b.rank() != 2 {
            return Ok(false);
        }
        let (out, r) = b.dims2()?;
        let (n, hr) = h.dims2()?;
        Ok(matches!(base.dtype(), DType::F32 | DType::BF16)
            && h.dtype() == DType::F32
            && b.dtype() == DType::F32
            && hr == r
            && (1..=MAX_RANK).contains(&r)
            && base.dims().last() == Some(&out)
            && base.elem_count() == n * out
            && out % 4 == 0
            && base.layout().start_offset() % 4 == 0
            && bias.is_none_or(|t| !t.track_op() && t.dims() == [out]))
    }

    fn int(v: usize, what: &str) -> Result<i32> {
        i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("LoRA kernels: {what} = {v} > i32")))
    }

    /// A contiguous view's start, required to be a multiple of 4 elements (the 8/16-byte loads).
    fn start4(l: &Layout, what: &str) -> Result<(usize, usize)> {
        let (a, b) = contiguous_range(l, what)?;
        if a % 4 != 0 {
            candle_core::bail!("LoRA kernels: {what} starts at element {a}, not a multiple of 4");
        }
        Ok((a, b))
    }

    fn cfg(blocks: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Rows grouped by weight block — the experts of one MoE call — on the device: the kernels'
    /// grouped forms pick each row's `[r, in]` block and reduce per block.
    pub(crate) struct Group {
        /// Block of each row, `[M]` u32.
        rows: Tensor,
        /// `[row0, row1)` of each split of a block's rows, grouped by block, `[2S]` u32.
        splits: Tensor,
        /// Block e's splits are `seg[e] .. seg[e + 1]`, `[E + 1]` u32.
        seg: Tensor,
    }

    /// Rows per split of the grouped reductions.
    const SPLIT_ROWS: usize = 64;

    impl Group {
        /// From `(block, first row, rows)` spans tiling `0..m` in order (blocks `< blocks`), in one
        /// host→device copy.
        pub(crate) fn new(
            spans: &[(usize, usize, usize)],
            m: usize,
            blocks: usize,
            dev: &candle_core::Device,
        ) -> Result<Self> {
            let mut rows = Vec::with_capacity(m);
            let mut per_block: Vec<Vec<u32>> = vec![Vec::new(); blocks];
            let mut next = 0usize;
            for &(e, off, len) in spans {
                if e >= blocks || off != next {
                    candle_core::bail!(
                        "grouped LoRA: span ({e}, {off}, {len}) does not continue row {next} with a \
                         block below {blocks}"
                    );
                }
                rows.extend(std::iter::repeat_n(e as u32, len));
                let mut r0 = off;
                while r0 < off + len {
                    let r1 = (r0 + SPLIT_ROWS).min(off + len);
                    per_block[e].extend([r0 as u32, r1 as u32]);
                    r0 = r1;
                }
                next = off + len;
            }
            if next != m {
                candle_core::bail!("grouped LoRA: spans cover {next} rows, x has {m}");
            }
            let mut splits = Vec::new();
            let mut seg = Vec::with_capacity(blocks + 1);
            for b in &per_block {
                seg.push((splits.len() / 2) as u32);
                splits.extend_from_slice(b);
            }
            seg.push((splits.len() / 2) as u32);
            let (nr, ns) = (rows.len(), splits.len());
            let mut all = rows;
            all.extend(splits);
            all.extend(seg);
            let all = Tensor::from_vec(all, nr + ns + blocks + 1, dev)?;
            Ok(Self {
                rows: all.narrow(0, 0, nr)?,
                splits: all.narrow(0, nr, ns)?,
                seg: all.narrow(0, nr + ns, blocks + 1)?,
            })
        }

        /// Number of weight blocks E.
        fn blocks(&self) -> usize {
            self.seg.elem_count() - 1
        }

        /// Number of row splits S.
        fn n_splits(&self) -> usize {
            self.splits.elem_count() / 2
        }
    }

    /// The device view of a u32 tensor (the group's maps).
    fn u32_view<'a>(
        g: &'a candle_core::StorageRef<'a>,
        l: &Layout,
        what: &str,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>> {
        let candle_core::Storage::Cuda(c) = &**g else {
            candle_core::bail!("grouped LoRA: {what} is not on a CUDA device");
        };
        let (a, b) = contiguous_range(l, what)?;
        Ok(c.as_cuda_slice::<u32>()?.slice(a..b))
    }

    /// The arguments after the three pointers shared by the forward and dx kernels:
    /// `(n, in, r, scale, blk)`, `blk` the group's row map or a null pointer.
    fn push_tail<'a>(
        b: &mut LaunchArgs<'a>,
        (n, in_dim, r): &'a (i32, i32, i32),
        scale: &'a f32,
        blk: &'a Option<CudaView<'a, u32>>,
        null: &'a u64,
    ) {
        b.arg(n);
        b.arg(in_dim);
        b.arg(r);
        b.arg(scale);
        match blk {
            Some(v) => b.arg(v),
            None => b.arg(null),
        };
    }

    /// `h = (x·scale)·a_rowᵀ` `[N, r]` f32; ungrouped `a` is `[r, in]`, grouped `[E·r, in]`.
    fn launch_fwd(
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        group: Option<&Group>,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, in_dim) = xl.shape().dims2()?;
        let (a_rows, _) = wl.shape().dims2()?;
        let r = a_rows / group.map_or(1, Group::blocks).max(1);
        let (x0, x1) = start4(xl, "x")?;
        let (a0, a1) = start4(wl, "a")?;
        let dev = xs.device().clone();
        let stream = dev.cuda_stream();
        let CudaStorageSlice::F32(aw) = &ws.slice else {
            candle_core::bail!("lora_down_fwd: a must be f32");
        };
        let av = aw.slice(a0..a1);
        // SAFETY: the kernel writes every one of the n·r outputs.
        let mut h = unsafe { dev.alloc::<f32>(n * r)? };
        let dims = (int(n, "N")?, int(in_dim, "in")?, int(r, "r")?);
        let guard = group.map(|g| g.rows.storage_and_layout());
        if n > 0 && group.is_none() && r <= 8 && in_dim % 8 == 0 && x0 % 8 == 0 {
            launch_fwd_split(xs, (x0, x1), &av, &mut h, dims, scale)?;
        } else if n > 0 {
            let blk = match &guard {
                Some((st, l)) => Some(u32_view(st, l, "rows")?),
                None => None,
            };
            let (gs, null) = (if blk.is_some() { "_g" } else { "" }, 0u64);
            macro_rules! run {
                ($s:expr, $t:literal) => {{
                    let func = KERNELS.func(&dev, &format!("lora_down_fwd{gs}_{}", $t))?;
                    let xv = $s.slice(x0..x1);
                    let mut b = stream.launch_builder(&func);
                    b.arg(&xv);
                    b.arg(&av);
                    b.arg(&mut h);
                    push_tail(&mut b, &dims, &scale, &blk, &null);
                    // SAFETY: argument types and order match the kernel; x holds n·in values,
                    // a (E·)r·in, h n·r, rows n block indices below E; 8 warps per 4 rows.
                    unsafe { b.launch(cfg(n.div_ceil(4), 256)) }.w()?;
                }};
            }
            match &xs.slice {
                CudaStorageSlice::F32(s) => run!(s, "f32"),
                CudaStorageSlice::BF16(s) => run!(s, "bf16"),
                _ => candle_core::bail!("lora_down_fwd: x must be f32 or bf16"),
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(h, dev), Shape::from((n, r))))
    }

    /// Inputs per split of `lora_down_fwd_split` (`SPLIT_IN` there).
    const SPLIT_IN: usize = 256;

    /// The ungrouped forward for `r ≤ 8` (`in` and x's start multiples of 8): partial sums per
    /// `SPLIT_IN` inputs, then their sum in split order, into `h` `[N, r]`.
    fn launch_fwd_split(
        xs: &CudaStorage,
        (x0, x1): (usize, usize),
        av: &CudaView<'_, f32>,
        h: &mut CudaSlice<f32>,
        (n, in_dim, r): (i32, i32, i32),
        scale: f32,
    ) -> Result<()> {
        let dev = xs.device().clone();
        let stream = dev.cuda_stream();
        let (nu, ru) = (n as usize, r as usize);
        let splits = (in_dim as usize).div_ceil(SPLIT_IN);
        // SAFETY: fwd_split writes every (split, row, j < r) partial.
        let mut part = unsafe { dev.alloc::<f32>(splits * nu * ru)? };
        macro_rules! run {
            ($s:expr, $t:literal) => {{
                let func = KERNELS.func(&dev, concat!("lora_down_fwd_split_", $t))?;
                let xv = $s.slice(x0..x1);
                let mut b = stream.launch_builder(&func);
                b.arg(&xv).arg(av).arg(&mut part);
                b.arg(&n).arg(&in_dim).arg(&r).arg(&scale);
                let c = LaunchConfig {
                    grid_dim: (nu.div_ceil(32) as u32, splits as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: argument types and order match the kernel; x holds n·in values (rows
                // 16-byte aligned), a r·in, part splits·n·r.
                unsafe { b.launch(c) }.w()?;
            }};
        }
        match &xs.slice {
            CudaStorageSlice::F32(s) => run!(s, "f32"),
            CudaStorageSlice::BF16(s) => run!(s, "bf16"),
            _ => candle_core::bail!("lora_down_fwd: x must be f32 or bf16"),
        }
        let func = KERNELS.func(&dev, "lora_down_fwd_sum")?;
        let (nr, si) = ((nu * ru) as u64, splits as i32);
        let mut b = stream.launch_builder(&func);
        b.arg(&part).arg(h).arg(&nr).arg(&si);
        // SAFETY: part holds splits·n·r values, h n·r.
        unsafe { b.launch(cfg((nu * ru).div_ceil(256), 256)) }.w()?;
        Ok(())
    }

    /// `out = (g·a_row)·scale` `[N, in]` in `dtype`; `g` `[N, r]` f32, `a` `[(E·)r, in]` f32.
    fn launch_dx(
        gs: &CudaStorage,
        gl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        dtype: DType,
        group: Option<&Group>,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, r) = gl.shape().dims2()?;
        let (_, in_dim) = wl.shape().dims2()?;
        let (g0, g1) = contiguous_range(gl, "g")?;
        let (a0, a1) = start4(wl, "a")?;
        let dev = gs.device().clone();
        let stream = dev.cuda_stream();
        let (CudaStorageSlice::F32(gw), CudaStorageSlice::F32(aw)) = (&gs.slice, &ws.slice) else {
            candle_core::bail!("lora_down_dx: g and a must be f32");
        };
        let (gv, av) = (gw.slice(g0..g1), aw.slice(a0..a1));
        let dims = (int(n, "N")?, int(in_dim, "in")?, int(r, "r")?);
        // one thread per 4 outputs of 4 rows
        let quads = n.div_ceil(4) * (in_dim / 4);
        let guard = group.map(|g| g.rows.storage_and_layout());
        let blk = match &guard {
            Some((st, l)) => Some(u32_view(st, l, "rows")?),
            None => None,
        };
        let (gsfx, null) = (if blk.is_some() { "_g" } else { "" }, 0u64);
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                // SAFETY: the kernel writes every one of the n·in outputs.
                let mut o = unsafe { dev.alloc::<$t>(n * in_dim)? };
                if quads > 0 {
                    let func = KERNELS.func(&dev, &format!("lora_down_dx{gsfx}_{}", $name))?;
                    let mut b = stream.launch_builder(&func);
                    b.arg(&gv);
                    b.arg(&av);
                    b.arg(&mut o);
                    push_tail(&mut b, &dims, &scale, &blk, &null);
                    // SAFETY: argument types and order match the kernel; one thread per 4
                    // outputs of 4 rows; rows holds n block indices below E.
                    unsafe { b.launch(cfg(quads.div_ceil(256), 256)) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(o, dev.clone())
            }};
        }
        let out = match dtype {
            DType::F32 => run!(f32, "f32"),
            DType::BF16 => run!(half::bf16, "bf16"),
            d => candle_core::bail!("lora_down_dx: unsupported dtype {d:?}"),
        };
        Ok((out, Shape::from((n, in_dim))))
    }

    /// `gᵀ·(x·scale)` f32: `[r, in]`, or grouped `[E·r, in]` summing each block's rows only.
    fn launch_da(
        gs: &CudaStorage,
        gl: &Layout,
        xs: &CudaStorage,
        xl: &Layout,
        group: Option<&Group>,
        scale: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, r) = gl.shape().dims2()?;
        let (_, in_dim) = xl.shape().dims2()?;
        let (g0, g1) = contiguous_range(gl, "g")?;
        let (x0, x1) = contiguous_range(xl, "x")?;
        let dev = gs.device().clone();
        let stream = dev.cuda_stream();
        let CudaStorageSlice::F32(gw) = &gs.slice else {
            candle_core::bail!("lora_down_da: g must be f32");
        };
        let gv = gw.slice(g0..g1);
        let cols = in_dim.div_ceil(256);
        let blocks = group.map_or(1, Group::blocks);
        let (splits, per) = match group {
            Some(g) => (g.n_splits(), 0),
            None => {
                // about four blocks per SM of an H100/H200, at least 32 rows each
                let s = (528 / cols.max(1)).clamp(1, n.div_ceil(32).max(1));
                (s, n.div_ceil(s).max(1))
            }
        };
        let ri = r * in_dim;
        // SAFETY: da_part writes every partial of the splits·r·in.
        let mut part = unsafe { dev.alloc::<f32>(splits.max(1) * ri)? };
        // SAFETY: da_sum(_seg) writes every one of the blocks·r·in outputs.
        let mut da = unsafe { dev.alloc::<f32>(blocks * ri)? };
        let (ni, ii, rr, pi, si) = (
            int(n, "N")?,
            int(in_dim, "in")?,
            int(r, "r")?,
            int(per, "rows")?,
            int(splits, "splits")?,
        );
        let guards = group.map(|g| (g.splits.storage_and_layout(), g.seg.storage_and_layout()));
        let maps = match &guards {
            Some(((sp, spl), (sg, sgl))) => {
                Some((u32_view(sp, spl, "splits")?, u32_view(sg, sgl, "seg")?))
            }
            None => None,
        };
        let (gsfx, null) = (if maps.is_some() { "_g" } else { "" }, 0u64);
        if ri > 0 && splits > 0 {
            macro_rules! run {
                ($s:expr, $t:literal) => {{
                    let func = KERNELS.func(&dev, &format!("lora_down_da_part{gsfx}_{}", $t))?;
                    let xv = $s.slice(x0..x1);
                    let mut b = stream.launch_builder(&func);
                    b.arg(&gv);
                    b.arg(&xv);
                    b.arg(&mut part);
                    b.arg(&ni);
                    b.arg(&ii);
                    b.arg(&rr);
                    b.arg(&pi);
                    b.arg(&scale);
                    match &maps {
                        Some((sp, _)) => b.arg(sp),
                        None => b.arg(&null),
                    };
                    let c = LaunchConfig {
                        grid_dim: (cols as u32, splits as u32, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: argument types and order match the kernel; g holds n·r, x n·in,
                    // part splits·r·in values; the splits lie inside 0..n.
                    unsafe { b.launch(c) }.w()?;
                }};
            }
            match &xs.slice {
                CudaStorageSlice::F32(s) => run!(s, "f32"),
                CudaStorageSlice::BF16(s) => run!(s, "bf16"),
                _ => candle_core::bail!("lora_down_da: x must be f32 or bf16"),
            }
        }
        if blocks * ri > 0 {
            let ri64 = ri as u64;
            match &maps {
                Some((_, seg)) => {
                    let func = KERNELS.func(&dev, "lora_down_da_sum_seg")?;
                    let bi = int(blocks, "E")?;
                    let mut b = stream.launch_builder(&func);
                    b.arg(&part);
                    b.arg(&mut da);
                    b.arg(seg);
                    b.arg(&bi);
                    b.arg(&ri64);
                    // SAFETY: argument types and order match the kernel; seg holds E + 1
                    // split offsets into part.
                    unsafe { b.launch(cfg((blocks * ri).div_ceil(256), 256)) }.w()?;
                }
                None => {
                    let func = KERNELS.func(&dev, "lora_down_da_sum")?;
                    let mut b = stream.launch_builder(&func);
                    b.arg(&part);
                    b.arg(&mut da);
                    b.arg(&si);
                    b.arg(&ri64);
                    // SAFETY: argument types and order match the kernel; part holds
                    // splits·r·in values.
                    unsafe { b.launch(cfg(ri.div_ceil(256), 256)) }.w()?;
                }
            }
        }
        Ok((
            CudaStorage::wrap_cuda_slice(da, dev),
            Shape::from((blocks * r, in_dim)),
        ))
    }

    /// `round(round(base + bias) + (h·bᵀ)·scale)` `[N, out]` in base's dtype: `base` `[N, out]`, `h`
    /// `[N, r]` f32, `b` `[out, r]` f32, `bias` `[out]` in base's dtype.
    fn launch_up_add(
        base: (&CudaStorage, &Layout),
        h: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        bias: Option<&Tensor>,
        scale: f32,
    ) -> Result<CudaStorage> {
        let (n, cols) = base.1.shape().dims2()?;
        let (_, r) = b.1.shape().dims2()?;
        let (b0, b1) = start4(base.1, "base")?;
        let (h0, h1) = contiguous_range(h.1, "h")?;
        let (w0, w1) = contiguous_range(b.1, "b")?;
        let dev = base.0.device().clone();
        let stream = dev.cuda_stream();
        let (CudaStorageSlice::F32(hw), CudaStorageSlice::F32(bw)) = (&h.0.slice, &b.0.slice)
        else {
            candle_core::bail!("lora_up_add: h and b must be f32");
        };
        let (hv, bv) = (hw.slice(h0..h1), bw.slice(w0..w1));
        let guard = bias.map(|t| t.storage_and_layout());
        let dims = (int(n, "N")?, int(cols, "out")?, int(r, "r")?);
        // lora_Bᵀ `[r, out]`, so that a warp's loads of one rank's weights are contiguous
        // SAFETY: the transpose writes every one of the out·r values.
        let mut bt = unsafe { dev.alloc::<f32>(cols * r)? };
        if cols * r > 0 {
            let func = KERNELS.func(&dev, "lora_transpose_f32")?;
            let mut lb = stream.launch_builder(&func);
            lb.arg(&bv).arg(&mut bt).arg(&dims.1).arg(&dims.2);
            // SAFETY: b holds out·r values, bt as many.
            unsafe { lb.launch(cfg((cols * r).div_ceil(256), 256)) }.w()?;
        }
        if r > 16 {
            candle_core::bail!("lora_up_add: rank {r} above the kernels' 16");
        }
        // one thread per 4 outputs of UP_ROWS rows
        let quads = n.div_ceil(UP_ROWS) * (cols / 4);
        let sfx = match (r <= 8, guard.is_some()) {
            (true, true) => "8_bias",
            (true, false) => "8",
            (false, true) => "16_bias",
            (false, false) => "16",
        };
        macro_rules! run {
            ($s:expr, $t:ty, $name:literal, $slice:path) => {{
                let bias_view = match &guard {
                    Some((st, l)) => {
                        let candle_core::Storage::Cuda(c) = &**st else {
                            candle_core::bail!("lora_up_add: the bias is not on the CUDA device");
                        };
                        let (a, e) = contiguous_range(l, "bias")?;
                        let $slice(v) = &c.slice else {
                            candle_core::bail!("lora_up_add: the bias dtype differs from base");
                        };
                        Some(v.slice(a..e))
                    }
                    None => None,
                };
                let bv0 = $s.slice(b0..b1);
                // SAFETY: the kernel writes every one of the n·cols outputs.
                let mut o = unsafe { dev.alloc::<$t>(n * cols)? };
                if quads > 0 {
                    let func = KERNELS.func(&dev, &format!("lora_up_add{sfx}_{}", $name))?;
                    let mut lb = stream.launch_builder(&func);
                    lb.arg(&bv0);
                    match &bias_view {
                        Some(v) => lb.arg(v),
                        None => lb.arg(&bv0),
                    };
                    lb.arg(&hv).arg(&bt).arg(&mut o);
                    lb.arg(&dims.0).arg(&dims.1).arg(&dims.2).arg(&scale);
                    // SAFETY: argument types and order match the kernel; base and out hold n·cols,
                    // h n·r, bt r·cols, bias cols values; one thread per 4 outputs of 8 rows.
                    unsafe { lb.launch(cfg(quads.div_ceil(256), 256)) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(o, dev.clone())
            }};
        }
        Ok(match &base.0.slice {
            CudaStorageSlice::F32(s) => run!(s, f32, "f32", CudaStorageSlice::F32),
            CudaStorageSlice::BF16(s) => run!(s, half::bf16, "bf16", CudaStorageSlice::BF16),
            _ => candle_core::bail!("lora_up_add: base must be f32 or bf16"),
        })
    }

    /// [`super::up_add`] on CUDA: args `(base [N, out], h [N, r] f32, b [out, r] f32)`. Backward:
    /// `∂base = ∂out`; with `∂d = f32(∂out)·scale + 0` (one kernel), `∂h = ∂d·b` and `∂b = ∂dᵀ·h`
    /// (f32 matmuls, as the composition's backward runs them).
    pub(super) struct UpAddOp {
        pub(super) bias: Option<Tensor>,
        pub(super) scale: f32,
    }

    impl CustomOp3 for UpAddOp {
        fn name(&self) -> &'static str {
            "lora_up_add"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("lora_up_add: CUDA only (the CPU uses the candle ops)")
        }

        fn cuda_fwd(
            &self,
            base: &CudaStorage,
            bl: &Layout,
            h: &CudaStorage,
            hl: &Layout,
            b: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let out = launch_up_add((base, bl), (h, hl), (b, wl), self.bias.as_ref(), self.scale)?;
            Ok((out, bl.shape().clone()))
        }

        fn bwd(
            &self,
            _base: &Tensor,
            h: &Tensor,
            b: &Tensor,
            _res: &Tensor,
            g: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            // ∂(h·bᵀ) = f32(∂out)·scale + 0, as add_scaled_delta's backward gives it, then the two
            // f32 products of the matmul's backward
            let g = g.contiguous()?;
            let gd = g.apply_op1_no_bwd(&ScaleOp(self.scale))?;
            let dh = gd.matmul(&b.detach())?;
            let db = gd.t()?.matmul(&h.detach())?;
            Ok((Some(g), Some(dh), Some(db)))
        }
    }

    /// `f32(g)·scale + 0` (f32 or bf16 `g`, any shape) → f32.
    struct ScaleOp(f32);

    impl CustomOp1 for ScaleOp {
        fn name(&self) -> &'static str {
            "lora_scale"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("lora_scale: CUDA only")
        }

        fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
            let (a, e) = contiguous_range(gl, "g")?;
            let len = e - a;
            let dev = g.device().clone();
            // SAFETY: the kernel writes every one of the len values.
            let mut o = unsafe { dev.alloc::<f32>(len)? };
            if len > 0 {
                let stream = dev.cuda_stream();
                let blocks = len.div_ceil(256).min(132 * 32);
                let (len64, scale) = (len as u64, self.0);
                macro_rules! run {
                    ($s:expr, $name:literal) => {{
                        let func = KERNELS.func(&dev, concat!("lora_scale_", $name))?;
                        let gv = $s.slice(a..e);
                        let mut lb = stream.launch_builder(&func);
                        lb.arg(&gv).arg(&mut o).arg(&len64).arg(&scale);
                        // SAFETY: g and o hold len values; a grid-stride loop covers them.
                        unsafe { lb.launch(cfg(blocks, 256)) }.w()?;
                    }};
                }
                match &g.slice {
                    CudaStorageSlice::F32(s) => run!(s, "f32"),
                    CudaStorageSlice::BF16(s) => run!(s, "bf16"),
                    _ => candle_core::bail!("lora_scale: g must be f32 or bf16"),
                }
            }
            Ok((CudaStorage::wrap_cuda_slice(o, dev), gl.shape().clone()))
        }
    }

    /// Implements `CustomOp2` for a launcher (`$name`, CUDA only), with an optional backward.
    macro_rules! cuda_op2 {
        (
            $op:ty, $name:literal, |$s:ident, $a:ident, $al:ident, $b:ident, $bl:ident| $body:expr
            $(, bwd |$bs:ident, $x:ident, $y:ident, $g:ident| $bwd:expr)?
        ) => {
            impl CustomOp2 for $op {
                fn name(&self) -> &'static str {
                    $name
                }

                fn cpu_fwd(
                    &self,
                    _: &CpuStorage,
                    _: &Layout,
                    _: &CpuStorage,
                    _: &Layout,
                ) -> Result<(CpuStorage, Shape)> {
                    candle_core::bail!(concat!($name, ": CUDA only (the CPU uses the candle ops)"))
                }

                fn cuda_fwd(
                    &$s,
                    $a: &CudaStorage,
                    $al: &Layout,
                    $b: &CudaStorage,
                    $bl: &Layout,
                ) -> Result<(CudaStorage, Shape)> {
                    $body
                }

                $(
                    fn bwd(
                        &$bs,
                        $x: &Tensor,
                        $y: &Tensor,
                        _res: &Tensor,
                        $g: &Tensor,
                    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
                        $bwd
                    }
                )?
            }
        };
    }

    /// `h = (x·scale)·a_rowᵀ` `[N, r]` f32: args `(x [N, in], a [(E·)r, in] f32)`. Backward:
    /// `∂x = (∂h·a_row)·scale` in x's dtype, `∂a = ∂hᵀ·(x·scale)` (per block when grouped).
    pub(super) struct FwdOp {
        pub(super) group: Option<Arc<Group>>,
        pub(super) scale: f32,
    }
    cuda_op2!(
        FwdOp,
        "lora_down_fwd",
        |self, x, xl, a, al| launch_fwd(x, xl, a, al, self.group.as_deref(), self.scale),
        bwd | self,
        x,
        a,
        g | {
            let g = g.contiguous()?;
            let (group, scale) = (self.group.clone(), self.scale);
            let dx = g.apply_op2_no_bwd(
                a,
                &DxOp {
                    dtype: x.dtype(),
                    group: group.clone(),
                    scale,
                },
            )?;
            let da = g.apply_op2_no_bwd(x, &DaOp { group, scale })?;
            Ok((Some(dx), Some(da)))
        }
    );

    /// `y = (h·a_row)·scale` `[N, in]` in `dtype`: args `(h [N, r] f32, a [(E·)r, in] f32)` — the
    /// `∂x` of [`FwdOp`], and the expert LoRA's up projection `h·B_eᵀ`. Backward:
    /// `∂h = (∂y·scale)·a_rowᵀ` ([`FwdOp`]), `∂a = hᵀ·(∂y·scale)` (per block when grouped).
    pub(super) struct DxOp {
        pub(super) dtype: DType,
        pub(super) group: Option<Arc<Group>>,
        pub(super) scale: f32,
    }
    cuda_op2!(
        DxOp,
        "lora_down_dx",
        |self, g, gl, a, al| launch_dx(g, gl, a, al, self.dtype, self.group.as_deref(), self.scale),
        bwd | self,
        h,
        a,
        dy | {
            let dy = dy.contiguous()?;
            let (group, scale) = (self.group.clone(), self.scale);
            let dh = dy.apply_op2_no_bwd(
                a,
                &FwdOp {
                    group: group.clone(),
                    scale,
                },
            )?;
            let da = h.apply_op2_no_bwd(&dy, &DaOp { group, scale })?;
            Ok((Some(dh), Some(da)))
        }
    );

    /// `gᵀ·(x·scale)` f32 (per block when grouped): args `(g [N, r] f32, x [N, in])`.
    struct DaOp {
        group: Option<Arc<Group>>,
        scale: f32,
    }
    cuda_op2!(DaOp, "lora_down_da", |self, g, gl, x, xl| launch_da(
        g,
        gl,
        x,
        xl,
        self.group.as_deref(),
        self.scale
    ));
}
