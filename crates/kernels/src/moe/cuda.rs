//! The CUDA kernels of the MoE ops (NVRTC, module `gptoss_moe`).
//!
//! One thread block per output row (a routed row or a token); threads stride over the hidden columns
//! with 16-byte loads and stores (8 bf16 or 4 f32 values) when the row length and the start offsets
//! allow it, else one element at a time. Arithmetic is f32; bf16 results are rounded to nearest even.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};
use half::bf16;

use crate::nvrtc::{contiguous_range, Kernels};

const SRC: &str = r#"
// Slots of sum_rows / combine_bwd_weights are processed KMAX at a time (row loads issued together).
#define KMAX 4

// out[t] = sum_s g[pos[t, s]] (f32, slots in order).
template <typename T, int V, bool VEC>
__device__ void sum_rows(const T* __restrict__ g, const u32* __restrict__ pos, T* __restrict__ out,
                         u32 m, u32 h, u32 k) {
    const u64 t = blockIdx.x;
    for (u32 j = threadIdx.x * V; j < h; j += blockDim.x * V) {
        float acc[V];
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] = 0.f;
        for (u32 s0 = 0; s0 < k; s0 += KMAX) {
            float v[KMAX][V];
#pragma unroll
            for (int s = 0; s < KMAX; ++s) {
                const u32 r = s0 + s < k ? pos[t * k + s0 + s] : m;
                if (r < m) {
                    ldv<T, V, VEC>(g, (u64)r * h + j, v[s]);
                } else {
#pragma unroll
                    for (int q = 0; q < V; ++q) v[s][q] = 0.f;
                }
            }
#pragma unroll
            for (int s = 0; s < KMAX; ++s)
#pragma unroll
                for (int q = 0; q < V; ++q) acc[q] += v[s][q];
        }
        stv<T, V, VEC>(out, t * h + j, acc);
    }
}

// out[t] = sum_s w[t, s] * (ys[pos[t, s]] + bias[ex[t, s]]).
template <typename T, int V, bool VEC>
__device__ void combine(const T* __restrict__ ys, const T* __restrict__ w, const u32* __restrict__ pos,
                        const T* __restrict__ bias, const u32* __restrict__ ex, T* __restrict__ out,
                        u32 m, u32 h, u32 k, u32 ne) {
    const u64 t = blockIdx.x;
    for (u32 j = threadIdx.x * V; j < h; j += blockDim.x * V) {
        float acc[V];
#pragma unroll
        for (int q = 0; q < V; ++q) acc[q] = 0.f;
        for (u32 s = 0; s < k; ++s) {
            const u64 i = t * k + s;
            const u32 r = pos[i], e = ex[i];
            if (r < m && e < ne) {
                const float ws = ld(w, i);
                float y[V], b[V];
                ldv<T, V, VEC>(ys, (u64)r * h + j, y);
                ldv<T, V, VEC>(bias, (u64)e * h + j, b);
#pragma unroll
                for (int q = 0; q < V; ++q) acc[q] += ws * (y[q] + b[q]);
            }
        }
        stv<T, V, VEC>(out, t * h + j, acc);
    }
}

// dys[pos[t, s]] = w[t, s] * dout[t] (dys zeroed beforehand).
template <typename T, int V, bool VEC>
__device__ void combine_bwd_rows(const T* __restrict__ dout, const T* __restrict__ w,
                                 const u32* __restrict__ pos, T* __restrict__ dys, u32 m, u32 h, u32 k) {
    const u64 t = blockIdx.x;
    for (u32 j = threadIdx.x * V; j < h; j += blockDim.x * V) {
        float d[V];
        ldv<T, V, VEC>(dout, t * h + j, d);
        for (u32 s = 0; s < k; ++s) {
            const u64 i = t * k + s;
            const u32 r = pos[i];
            if (r < m) {
                const float ws = ld(w, i);
                float o[V];
#pragma unroll
                for (int q = 0; q < V; ++q) o[q] = ws * d[q];
                stv<T, V, VEC>(dys, (u64)r * h + j, o);
            }
        }
    }
}

// dw[t, s] = dout[t] . (ys[pos[t, s]] + bias[ex[t, s]]) (blockDim.x a multiple of 32). DOTS: ys is
// not read; the products come as dots[pos[t, s]] = w[t, s] * (dout[t] . ys[pos[t, s]]) (f32) and
// dw[t, s] = dots[pos[t, s]] / w[t, s] + dout[t] . bias[ex[t, s]] (0 for the first term where w = 0).
template <typename T, int V, bool VEC, bool DOTS>
__device__ void combine_bwd_weights(const T* __restrict__ dout, const T* __restrict__ ys,
                                    const float* __restrict__ dots, const T* __restrict__ w,
                                    const u32* __restrict__ pos, const T* __restrict__ bias,
                                    const u32* __restrict__ ex, T* __restrict__ dw,
                                    u32 m, u32 h, u32 k, u32 ne) {
    __shared__ float sh[KMAX][32];
    const u64 t = blockIdx.x;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (u32 s0 = 0; s0 < k; s0 += KMAX) {
        u32 r[KMAX], e[KMAX];
        float part[KMAX];
#pragma unroll
        for (int s = 0; s < KMAX; ++s) {
            const bool in = s0 + s < k;
            r[s] = in ? pos[t * k + s0 + s] : m;
            e[s] = in ? ex[t * k + s0 + s] : ne;
            part[s] = 0.f;
        }
        for (u32 j = threadIdx.x * V; j < h; j += blockDim.x * V) {
            float d[V];
            ldv<T, V, VEC>(dout, t * h + j, d);
#pragma unroll
            for (int s = 0; s < KMAX; ++s) {
                if (r[s] < m && e[s] < ne) {
                    float y[V], b[V];
                    if constexpr (DOTS) {
#pragma unroll
                        for (int q = 0; q < V; ++q) y[q] = 0.f;
                    } else {
                        ldv<T, V, VEC>(ys, (u64)r[s] * h + j, y);
                    }
                    ldv<T, V, VEC>(bias, (u64)e[s] * h + j, b);
#pragma unroll
                    for (int q = 0; q < V; ++q) part[s] += d[q] * (y[q] + b[q]);
                }
            }
        }
#pragma unroll
        for (int s = 0; s < KMAX; ++s) {
            const float v = warp_red(part[s], false);
            if (lane == 0) sh[s][wid] = v;
        }
        __syncthreads();
        for (int s = wid; s < KMAX && s0 + s < k; s += nw) {
            float v = lane < nw ? sh[s][lane] : 0.f;
            v = warp_red(v, false);
            if constexpr (DOTS) {
                const float ws = ld(w, t * k + s0 + s);
                if (r[s] < m && e[s] < ne && ws != 0.f) v += dots[r[s]] / ws;
            }
            if (lane == 0) st(dw, t * k + s0 + s, v);
        }
        __syncthreads();
    }
}

// out[m] = a[m] . b[m] (f32; blockDim.x a multiple of 32, at most 1024).
template <typename T, int V, bool VEC>
__device__ void row_dots(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                         u32 h) {
    __shared__ float sh[32];
    const u64 m = blockIdx.x;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float part = 0.f;
    for (u32 j = threadIdx.x * V; j < h; j += blockDim.x * V) {
        float x[V], y[V];
        ldv<T, V, VEC>(a, m * h + j, x);
        ldv<T, V, VEC>(b, m * h + j, y);
#pragma unroll
        for (int q = 0; q < V; ++q) part += x[q] * y[q];
    }
    part = warp_red(part, false);
    if (lane == 0) sh[wid] = part;
    __syncthreads();
    if (wid == 0) {
        float v = lane < nw ? sh[lane] : 0.f;
        v = warp_red(v, false);
        if (lane == 0) out[m] = v;
    }
}

// Clamped SwiGLU with bias on interleaved gate/up pairs; BWD: d gu from d act.
template <typename T, int V, bool VEC, bool BWD>
__device__ void swiglu(const T* __restrict__ gu, const T* __restrict__ da, const T* __restrict__ bias,
                       const u32* __restrict__ re, T* __restrict__ out, u32 ni, u32 ne,
                       float limit, float alpha) {
    const u64 m = blockIdx.x;
    const u32 e = re[m];
    const u64 two_i = 2ull * ni;
    for (u32 j = threadIdx.x * V; j < ni; j += blockDim.x * V) {
        float x[2 * V], b[2 * V];
        ldv<T, 2 * V, VEC>(gu, m * two_i + 2 * j, x);
        if (e < ne) {
            ldv<T, 2 * V, VEC>(bias, (u64)e * two_i + 2 * j, b);
        } else {
#pragma unroll
            for (int q = 0; q < 2 * V; ++q) b[q] = 0.f;
        }
        float d[V];
        if constexpr (BWD) ldv<T, V, VEC>(da, m * ni + j, d);
        float o[BWD ? 2 * V : V];
#pragma unroll
        for (int q = 0; q < V; ++q) {
            const float g0 = x[2 * q] + b[2 * q], u0 = x[2 * q + 1] + b[2 * q + 1];
            const float g = g0 > limit ? limit : g0;
            const float u = u0 > limit ? limit : (u0 < -limit ? -limit : u0);
            // fast exp and division (an overflowing exp gives 0): with expf and IEEE division the
            // backward is compute-bound
            const float sg = __fdividef(1.f, __expf(-(g * alpha)) + 1.f);
            if constexpr (BWD) {
                const bool pass_g = g0 <= limit, pass_u = u0 >= -limit && u0 <= limit;
                o[2 * q] = pass_g ? d[q] * (u + 1.f) * (sg + g * alpha * sg * (1.f - sg)) : 0.f;
                o[2 * q + 1] = pass_u ? d[q] * g * sg : 0.f;
            } else {
                o[q] = (u + 1.f) * (g * sg);
            }
        }
        if constexpr (BWD) {
            stv<T, 2 * V, VEC>(out, m * two_i + 2 * j, o);
        } else {
            stv<T, V, VEC>(out, m * ni + j, o);
        }
    }
}

// out[m] = x[tok[m]] (zero for an out-of-range token).
template <typename T, int V, bool VEC>
__device__ void gather_rows(const T* __restrict__ x, const u32* __restrict__ tok, T* __restrict__ out,
                            u32 n, u32 h) {
    const u64 m = blockIdx.x;
    const u32 t = tok[m];
    for (u32 j = threadIdx.x * V; j < h; j += blockDim.x * V) {
        float v[V];
        if (t < n) {
            ldv<T, V, VEC>(x, (u64)t * h + j, v);
        } else {
#pragma unroll
            for (int q = 0; q < V; ++q) v[q] = 0.f;
        }
        stv<T, V, VEC>(out, m * h + j, v);
    }
}

// Routing, one warp per token: lane c holds the logits of experts c, c + 32, ... (TOPK_EPL per lane,
// so up to 32 TOPK_EPL experts); k rounds of the warp's largest not yet taken (ties: the lower
// index), all lanes ending with the same idx/val.
#define TOPK_MAX 32
#define TOPK_EPL 8
// NaN above every number (as torch.topk), else >.
__device__ __forceinline__ bool ranks_above(float a, float b) { return (isnan(a) && !isnan(b)) || a > b; }
template <typename T>
__device__ __forceinline__ void topk_warp(const T* __restrict__ lg, u64 t, u32 e, u32 k, u32* idx,
                                          float* val) {
    const u32 lane = threadIdx.x & 31;
    float v[TOPK_EPL];
    bool ok[TOPK_EPL];
#pragma unroll
    for (int m = 0; m < TOPK_EPL; ++m) {
        const u32 c = lane + 32 * m;
        ok[m] = c < e;
        v[m] = ok[m] ? ld(lg, t * e + c) : 0.f;
    }
    for (u32 j = 0; j < k; ++j) {
        // the lane's best: the first largest of its remaining experts
        u32 bi = 0xffffffffu;
        float bv = 0.f;
#pragma unroll
        for (int m = 0; m < TOPK_EPL; ++m)
            if (ok[m] && (bi == 0xffffffffu || ranks_above(v[m], bv))) { bv = v[m]; bi = lane + 32 * m; }
        // the warp's best: the higher-ranked value, or the lower index on equal ranks
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
            const bool better = oi != 0xffffffffu
                && (bi == 0xffffffffu || ranks_above(ov, bv) || (!ranks_above(bv, ov) && oi < bi));
            if (better) { bv = ov; bi = oi; }
        }
        idx[j] = bi;
        val[j] = bv;
        if (bi % 32 == lane) {
#pragma unroll
            for (int m = 0; m < TOPK_EPL; ++m) if (lane + 32 * m == bi) ok[m] = false;
        }
    }
}

// w[t, j] = softmax over j of the top-k logits (f32: max, exp, sum in order, divide).
__device__ __forceinline__ void topk_weights(const float* val, u32 k, float* w) {
    float m = val[0];
    for (u32 j = 1; j < k; ++j) m = fmaxf(m, val[j]);
    float s = 0.f;
    for (u32 j = 0; j < k; ++j) { w[j] = expf(val[j] - m); s += w[j]; }
    for (u32 j = 0; j < k; ++j) w[j] = w[j] / s;
}

// One warp per token: the indices [n, k] u32 of the top-k logits.
template <typename T>
__device__ void topk_idx(const T* __restrict__ lg, u32* __restrict__ out_idx, u32 n, u32 e, u32 k) {
    const u64 t = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (t >= n) return;
    const u32 lane = threadIdx.x & 31;
    u32 idx[TOPK_MAX];
    float val[TOPK_MAX];
    topk_warp(lg, t, e, k, idx, val);
    for (u32 j = lane; j < k; j += 32) out_idx[t * k + j] = idx[j];
}

// One warp per token, the softmax weights w of the logits at the token's indices idx [n, k].
// Forward: w [n, k]. BWD: d logits [n, e] from g = d w [n, k], w_j (g_j - sum_i w_i g_i) at the
// indices and 0 elsewhere, each lane writing its experts.
template <typename T, bool BWD>
__device__ void topk_softmax(const T* __restrict__ lg, const u32* __restrict__ idx,
                             const T* __restrict__ g, T* __restrict__ out, u32 n, u32 e, u32 k) {
    const u64 t = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (t >= n) return;
    const u32 lane = threadIdx.x & 31;
    float val[TOPK_MAX], w[TOPK_MAX];
    u32 ix[TOPK_MAX];
    for (u32 j = 0; j < k; ++j) {
        ix[j] = idx[t * k + j];
        val[j] = ix[j] < e ? ld(lg, t * e + ix[j]) : 0.f;
    }
    topk_weights(val, k, w);
    if constexpr (!BWD) {
        for (u32 j = lane; j < k; j += 32) st(out, t * k + j, w[j]);
    } else {
        float dot = 0.f;
        for (u32 j = 0; j < k; ++j) dot += w[j] * ld(g, t * k + j);
        for (u32 c = lane; c < e; c += 32) {
            float d = 0.f;
            for (u32 j = 0; j < k; ++j)
                if (ix[j] == c) d = w[j] * (ld(g, t * k + j) - dot);
            st(out, t * e + c, d);
        }
    }
}

// Entry points: <op>_<dtype>_vec (16-byte accesses) and <op>_<dtype>_scalar.
#define ENTRIES(TN, T, VR, VS)                                                                        \
extern "C" __global__ void gather_rows_##TN##_vec(const T* x, const u32* tok, T* out, u32 n, u32 h)   \
    { gather_rows<T, VR, true>(x, tok, out, n, h); }                                                  \
extern "C" __global__ void gather_rows_##TN##_scalar(const T* x, const u32* tok, T* out, u32 n, u32 h)\
    { gather_rows<T, 1, false>(x, tok, out, n, h); }                                                  \
extern "C" __global__ void sum_rows_##TN##_vec(const T* g, const u32* pos, T* out, u32 m, u32 h, u32 k)\
    { sum_rows<T, VR, true>(g, pos, out, m, h, k); }                                                  \
extern "C" __global__ void sum_rows_##TN##_scalar(const T* g, const u32* pos, T* out, u32 m, u32 h,   \
    u32 k) { sum_rows<T, 1, false>(g, pos, out, m, h, k); }                                           \
extern "C" __global__ void combine_##TN##_vec(const T* ys, const T* w, const u32* pos, const T* bias, \
    const u32* ex, T* out, u32 m, u32 h, u32 k, u32 ne)                                               \
    { combine<T, VR, true>(ys, w, pos, bias, ex, out, m, h, k, ne); }                                 \
extern "C" __global__ void combine_##TN##_scalar(const T* ys, const T* w, const u32* pos,             \
    const T* bias, const u32* ex, T* out, u32 m, u32 h, u32 k, u32 ne)                                \
    { combine<T, 1, false>(ys, w, pos, bias, ex, out, m, h, k, ne); }                                 \
extern "C" __global__ void combine_bwd_rows_##TN##_vec(const T* d, const T* w, const u32* pos,        \
    T* dys, u32 m, u32 h, u32 k) { combine_bwd_rows<T, VR, true>(d, w, pos, dys, m, h, k); }          \
extern "C" __global__ void combine_bwd_rows_##TN##_scalar(const T* d, const T* w, const u32* pos,     \
    T* dys, u32 m, u32 h, u32 k) { combine_bwd_rows<T, 1, false>(d, w, pos, dys, m, h, k); }          \
extern "C" __global__ void combine_bwd_weights_##TN##_vec(const T* d, const T* ys, const float* dots, \
    const T* w, const u32* pos, const T* bias, const u32* ex, T* dw, u32 m, u32 h, u32 k, u32 ne)     \
    { combine_bwd_weights<T, VR, true, false>(d, ys, dots, w, pos, bias, ex, dw, m, h, k, ne); }      \
extern "C" __global__ void combine_bwd_weights_##TN##_scalar(const T* d, const T* ys,                 \
    const float* dots, const T* w, const u32* pos, const T* bias, const u32* ex, T* dw, u32 m, u32 h, \
    u32 k, u32 ne)                                                                                    \
    { combine_bwd_weights<T, 1, false, false>(d, ys, dots, w, pos, bias, ex, dw, m, h, k, ne); }      \
extern "C" __global__ void combine_bwd_dots_##TN##_vec(const T* d, const T* ys, const float* dots,    \
    const T* w, const u32* pos, const T* bias, const u32* ex, T* dw, u32 m, u32 h, u32 k, u32 ne)     \
    { combine_bwd_weights<T, VR, true, true>(d, ys, dots, w, pos, bias, ex, dw, m, h, k, ne); }       \
extern "C" __global__ void combine_bwd_dots_##TN##_scalar(const T* d, const T* ys, const float* dots, \
    const T* w, const u32* pos, const T* bias, const u32* ex, T* dw, u32 m, u32 h, u32 k, u32 ne)     \
    { combine_bwd_weights<T, 1, false, true>(d, ys, dots, w, pos, bias, ex, dw, m, h, k, ne); }       \
extern "C" __global__ void row_dots_##TN##_vec(const T* a, const T* b, float* out, u32 h)             \
    { row_dots<T, VR, true>(a, b, out, h); }                                                          \
extern "C" __global__ void row_dots_##TN##_scalar(const T* a, const T* b, float* out, u32 h)          \
    { row_dots<T, 1, false>(a, b, out, h); }                                                          \
extern "C" __global__ void swiglu_fwd_##TN##_vec(const T* gu, const T* da, const T* bias,             \
    const u32* re, T* out, u32 ni, u32 ne, float limit, float alpha)                                  \
    { swiglu<T, VS, true, false>(gu, da, bias, re, out, ni, ne, limit, alpha); }                      \
extern "C" __global__ void swiglu_fwd_##TN##_scalar(const T* gu, const T* da, const T* bias,          \
    const u32* re, T* out, u32 ni, u32 ne, float limit, float alpha)                                  \
    { swiglu<T, 1, false, false>(gu, da, bias, re, out, ni, ne, limit, alpha); }                      \
extern "C" __global__ void swiglu_bwd_##TN##_vec(const T* gu, const T* da, const T* bias,             \
    const u32* re, T* out, u32 ni, u32 ne, float limit, float alpha)                                  \
    { swiglu<T, VS, true, true>(gu, da, bias, re, out, ni, ne, limit, alpha); }                       \
extern "C" __global__ void swiglu_bwd_##TN##_scalar(const T* gu, const T* da, const T* bias,          \
    const u32* re, T* out, u32 ni, u32 ne, float limit, float alpha)                                  \
    { swiglu<T, 1, false, true>(gu, da, bias, re, out, ni, ne, limit, alpha); }

ENTRIES(f32, float, 4, 2)
ENTRIES(bf16, u16, 8, 4)

#define ROUTE_ENTRIES(TN, T)                                                                          \
extern "C" __global__ void topk_idx_##TN(const T* lg, u32* idx, u32 n, u32 e, u32 k)                  \
    { topk_idx<T>(lg, idx, n, e, k); }                                                                \
extern "C" __global__ void topk_softmax_##TN(const T* lg, const u32* idx, const T* g, T* w,           \
    u32 n, u32 e, u32 k) { topk_softmax<T, false>(lg, idx, g, w, n, e, k); }                          \
extern "C" __global__ void topk_softmax_bwd_##TN(const T* lg, const u32* idx, const T* g, T* dl,      \
    u32 n, u32 e, u32 k) { topk_softmax<T, true>(lg, idx, g, dl, n, e, k); }
ROUTE_ENTRIES(f32, float)
ROUTE_ENTRIES(bf16, u16)
"#;

pub(crate) static KERNELS: Kernels = Kernels::new("gptoss_moe", SRC);

/// A storage and its layout.
pub(super) type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// The held operands of [`super::combine`]: the index maps and the bias.
pub(super) struct Held<'a> {
    pub(super) pos: Arg<'a>,
    pub(super) bias: Arg<'a>,
    pub(super) expert: Arg<'a>,
}

/// An activation element type: its kernel-name suffix and its elements per 16 bytes.
trait Elem:
    CudaDType + DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
{
    const NAME: &'static str;
    const VEC: usize;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    const VEC: usize = 4;
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    const VEC: usize = 8;
}

/// Calls `$f::<T>(args)` for the element type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident($($a:expr),* $(,)?)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($a),*),
            DType::BF16 => $f::<bf16>($($a),*),
            d => candle_core::bail!("moe kernels: dtype {d:?}, expected f32 or bf16"),
        }
    };
}

/// The contiguous view of an operand and its start offset (elements).
fn view<'a, T: CudaDType + DeviceRepr>(a: Arg<'a>, what: &str) -> Result<(CudaView<'a, T>, usize)> {
    let (s, e) = contiguous_range(a.1, what)?;
    Ok((a.0.as_cuda_slice::<T>()?.slice(s..e), s))
}

/// Whether 16-byte accesses of `v` elements work: every length a multiple of `v`, every start
/// offset a multiple of `align`.
fn vectorizable(v: usize, lens: &[usize], align: usize, starts: &[usize]) -> bool {
    lens.iter().all(|l| l % v == 0) && starts.iter().all(|s| s % align == 0)
}

/// The function `<op>_<dtype>_<vec|scalar>`.
fn func<T: Elem>(
    dev: &CudaDevice,
    op: &str,
    vec: bool,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
    let kind = if vec { "vec" } else { "scalar" };
    KERNELS.func(dev, &format!("{op}_{}_{kind}", T::NAME))
}

/// One block per row, threads for `cols` column groups (a multiple of 32, at most 128: small blocks
/// keep all 2048 token rows of a step resident at once on an H100/H200).
fn config(rows: usize, cols: usize) -> LaunchConfig {
    let threads = cols.div_ceil(32).clamp(1, 4) * 32;
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn wrap<T: Elem>(out: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, dev.clone())
}

/// Routed rows `x[tok[m]]`: `x` `[n, h]`, `tok` `[m]` → `[m, h]`.
pub(super) fn gather_rows(
    x: &CudaStorage,
    xl: &Layout,
    tok: &CudaStorage,
    tl: &Layout,
    (n, h, m): (usize, usize, usize),
) -> Result<CudaStorage> {
    fn run<T: Elem>(x: Arg, tok: Arg, (n, h, m): (usize, usize, usize)) -> Result<CudaStorage> {
        let dev = x.0.device();
        let (xv, x0) = view::<T>(x, "gather_rows: x")?;
        let (tv, _) = view::<u32>(tok, "gather_rows: tokens")?;
        let vec = vectorizable(T::VEC, &[h], T::VEC, &[x0]);
        // SAFETY: every row is written.
        let mut out = unsafe { dev.alloc::<T>(m * h)? };
        if m > 0 && h > 0 {
            let f = func::<T>(dev, "gather_rows", vec)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (n, h32) = (n as u32, h as u32);
            b.arg(&xv).arg(&tv).arg(&mut out).arg(&n).arg(&h32);
            let cfg = config(m, h / if vec { T::VEC } else { 1 });
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(wrap(out, dev))
    }
    by_dtype!(x.dtype(), run((x, xl), (tok, tl), (n, h, m)))
}

/// `out[t] = Σ_s g[pos[t, s]]`: `g` `[m, h]`, `pos` `[n, k]` → `[n, h]`.
pub(super) fn sum_rows(
    g: &CudaStorage,
    gl: &Layout,
    pos: &CudaStorage,
    pl: &Layout,
    dims: (usize, usize, usize, usize),
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        g: Arg,
        pos: Arg,
        (m, h, n, k): (usize, usize, usize, usize),
    ) -> Result<CudaStorage> {
        let dev = g.0.device();
        let (gv, g0) = view::<T>(g, "gather_rows backward: grad")?;
        let (pv, _) = view::<u32>(pos, "gather_rows: pos")?;
        let vec = vectorizable(T::VEC, &[h], T::VEC, &[g0]);
        // SAFETY: every row is written.
        let mut out = unsafe { dev.alloc::<T>(n * h)? };
        if n > 0 && h > 0 {
            let f = func::<T>(dev, "sum_rows", vec)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (m, h32, k) = (m as u32, h as u32, k as u32);
            b.arg(&gv).arg(&pv).arg(&mut out).arg(&m).arg(&h32).arg(&k);
            let cfg = config(n, h / if vec { T::VEC } else { 1 });
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(wrap(out, dev))
    }
    by_dtype!(g.dtype(), run((g, gl), (pos, pl), dims))
}

/// Forward (`da` `None`: `gu` `[m, 2i]` → act `[m, i]`) or backward (`da` `[m, i]` → ∂gu `[m, 2i]`)
/// of the clamped SwiGLU with bias `[e, 2i]` of expert `re[m]`.
pub(super) fn swiglu(
    gu: Arg,
    da: Option<Arg>,
    bias: Arg,
    re: Arg,
    (limit, alpha): (f32, f32),
) -> Result<CudaStorage> {
    fn run<T: Elem>(
        gu: Arg,
        da: Option<Arg>,
        bias: Arg,
        re: Arg,
        (limit, alpha): (f32, f32),
    ) -> Result<CudaStorage> {
        let dev = gu.0.device();
        let (m, two_i) = gu.1.shape().dims2()?;
        let ni = two_i / 2;
        let ne = bias.1.shape().dims2()?.0;
        let (gv, g0) = view::<T>(gu, "swiglu_bias: gu")?;
        let (bv, b0) = view::<T>(bias, "swiglu_bias: bias")?;
        let (rv, _) = view::<u32>(re, "swiglu_bias: row_expert")?;
        let dav = da
            .map(|d| view::<T>(d, "swiglu_bias backward: grad"))
            .transpose()?;
        let v = T::VEC / 2;
        let vec = vectorizable(v, &[ni], T::VEC, &[g0, b0])
            && dav.as_ref().is_none_or(|(_, d0)| d0 % v == 0);
        let bwd = dav.is_some();
        let len = if bwd { m * two_i } else { m * ni };
        // SAFETY: every element is written.
        let mut out = unsafe { dev.alloc::<T>(len)? };
        if m > 0 && ni > 0 {
            let f = func::<T>(dev, if bwd { "swiglu_bwd" } else { "swiglu_fwd" }, vec)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (ni32, ne32) = (ni as u32, ne as u32);
            b.arg(&gv);
            match &dav {
                Some((d, _)) => b.arg(d),
                None => b.arg(&gv),
            };
            b.arg(&bv).arg(&rv).arg(&mut out).arg(&ni32).arg(&ne32);
            b.arg(&limit).arg(&alpha);
            let cfg = config(m, ni / if vec { v } else { 1 });
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(wrap(out, dev))
    }
    by_dtype!(gu.0.dtype(), run(gu, da, bias, re, (limit, alpha)))
}

/// `out[t] = Σ_s w[t, s] · (ys[pos[t, s]] + bias[expert[t, s]])`: `ys` `[m, h]`, `w` `[n, k]` → `[n, h]`.
pub(super) fn combine(ys: Arg, w: Arg, held: &Held) -> Result<CudaStorage> {
    fn run<T: Elem>(ys: Arg, w: Arg, held: &Held) -> Result<CudaStorage> {
        let dev = ys.0.device();
        let (m, h) = ys.1.shape().dims2()?;
        let (n, k) = w.1.shape().dims2()?;
        let ne = held.bias.1.shape().dims2()?.0;
        let (yv, y0) = view::<T>(ys, "combine: ys")?;
        let (wv, _) = view::<T>(w, "combine: weights")?;
        let (bv, b0) = view::<T>(held.bias, "combine: bias")?;
        let (pv, _) = view::<u32>(held.pos, "combine: pos")?;
        let (ev, _) = view::<u32>(held.expert, "combine: expert")?;
        let vec = vectorizable(T::VEC, &[h], T::VEC, &[y0, b0]);
        // SAFETY: every row is written.
        let mut out = unsafe { dev.alloc::<T>(n * h)? };
        if n > 0 && h > 0 {
            let f = func::<T>(dev, "combine", vec)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (m, h32, k, ne) = (m as u32, h as u32, k as u32, ne as u32);
            b.arg(&yv).arg(&wv).arg(&pv).arg(&bv).arg(&ev).arg(&mut out);
            b.arg(&m).arg(&h32).arg(&k).arg(&ne);
            let cfg = config(n, h / if vec { T::VEC } else { 1 });
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(wrap(out, dev))
    }
    by_dtype!(ys.0.dtype(), run(ys, w, held))
}

/// `∂ys[pos[t, s]] = w[t, s] · ∂out[t]`: `dout` `[n, h]`, `w` `[n, k]` → `[n·k, h]`.
pub(super) fn combine_bwd_rows(dout: Arg, w: Arg, held: &Held) -> Result<CudaStorage> {
    fn run<T: Elem>(dout: Arg, w: Arg, held: &Held) -> Result<CudaStorage> {
        let dev = dout.0.device();
        let (n, h) = dout.1.shape().dims2()?;
        let (_n, k) = w.1.shape().dims2()?;
        let m = n * k;
        let (dv, d0) = view::<T>(dout, "combine backward: grad")?;
        let (wv, _) = view::<T>(w, "combine: weights")?;
        let (pv, _) = view::<u32>(held.pos, "combine: pos")?;
        let vec = vectorizable(T::VEC, &[h], T::VEC, &[d0]);
        // Rows no slot points to keep their zero gradient.
        let mut out = dev.alloc_zeros::<T>(m * h)?;
        if n > 0 && h > 0 {
            let f = func::<T>(dev, "combine_bwd_rows", vec)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (m, h32, k) = (m as u32, h as u32, k as u32);
            b.arg(&dv)
                .arg(&wv)
                .arg(&pv)
                .arg(&mut out)
                .arg(&m)
                .arg(&h32)
                .arg(&k);
            let cfg = config(n, h / if vec { T::VEC } else { 1 });
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(wrap(out, dev))
    }
    by_dtype!(dout.0.dtype(), run(dout, w, held))
}

/// What [`combine_bwd_weights`] takes the routed rows' products from.
pub(super) enum Products<'a> {
    /// The routed rows `ys` `[m, h]` (activation dtype).
    Rows(Arg<'a>),
    /// `dots` `[m]` f32, `w[t, s] · (∂out[t] · ys[pos[t, s]])`, and the weights `w` `[n, k]`.
    Dots { dots: Arg<'a>, w: Arg<'a> },
}

/// `∂w[t, s] = ∂out[t] · (ys[pos[t, s]] + bias[expert[t, s]])`: `dout` `[n, h]` → `[n, k]`, the
/// products with `ys` read from the rows or taken from the weighted dots (see [`Products`]).
pub(super) fn combine_bwd_weights(dout: Arg, from: Products, held: &Held) -> Result<CudaStorage> {
    fn run<T: Elem>(dout: Arg, from: Products, held: &Held) -> Result<CudaStorage> {
        let dev = dout.0.device();
        let (n, h) = dout.1.shape().dims2()?;
        let (_n, k) = held.pos.1.shape().dims2()?;
        let ne = held.bias.1.shape().dims2()?.0;
        let (dv, d0) = view::<T>(dout, "combine backward: grad")?;
        let (bv, b0) = view::<T>(held.bias, "combine: bias")?;
        let (pv, _) = view::<u32>(held.pos, "combine: pos")?;
        let (ev, _) = view::<u32>(held.expert, "combine: expert")?;
        let null = 0u64;
        let (ys, dots, w, m) = match from {
            Products::Rows(ys) => {
                let (yv, y0) = view::<T>(ys, "combine: ys")?;
                (Some((yv, y0)), None, None, ys.1.shape().dims2()?.0)
            }
            Products::Dots { dots, w } => {
                let m = dots.1.shape().elem_count();
                let dv = view::<f32>(dots, "combine backward: dots")?.0;
                (None, Some(dv), Some(view::<T>(w, "combine: weights")?.0), m)
            }
        };
        let y0 = ys.as_ref().map_or(0, |y| y.1);
        let vec = vectorizable(T::VEC, &[h], T::VEC, &[d0, y0, b0]);
        // SAFETY: every (t, s) is written.
        let mut out = unsafe { dev.alloc::<T>(n * k)? };
        if n > 0 && k > 0 {
            let op = match dots {
                Some(_) => "combine_bwd_dots",
                None => "combine_bwd_weights",
            };
            let f = func::<T>(dev, op, vec)?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (m, h32, k32, ne) = (m as u32, h as u32, k as u32, ne as u32);
            b.arg(&dv);
            match &ys {
                Some((yv, _)) => b.arg(yv),
                None => b.arg(&null),
            };
            match &dots {
                Some(d) => b.arg(d),
                None => b.arg(&null),
            };
            match &w {
                Some(w) => b.arg(w),
                None => b.arg(&null),
            };
            b.arg(&pv).arg(&bv).arg(&ev).arg(&mut out);
            b.arg(&m).arg(&h32).arg(&k32).arg(&ne);
            let cfg = config(n, h / if vec { T::VEC } else { 1 });
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(wrap(out, dev))
    }
    by_dtype!(dout.0.dtype(), run(dout, from, held))
}

/// `out[m] = a[m] · b[m]` in f32: `a`, `b` `[m, h]` (same dtype) → `[m]` f32.
pub(super) fn row_dots(a: Arg, b: Arg) -> Result<CudaStorage> {
    fn run<T: Elem>(a: Arg, b: Arg) -> Result<CudaStorage> {
        let dev = a.0.device();
        let (m, h) = a.1.shape().dims2()?;
        let (av, a0) = view::<T>(a, "row_dots: a")?;
        let (bv, b0) = view::<T>(b, "row_dots: b")?;
        let vec = vectorizable(T::VEC, &[h], T::VEC, &[a0, b0]);
        // SAFETY: every row is written.
        let mut out = unsafe { dev.alloc::<f32>(m)? };
        if m > 0 {
            let f = func::<T>(dev, "row_dots", vec)?;
            let stream = dev.cuda_stream();
            let mut lb = stream.launch_builder(&f);
            let h32 = h as u32;
            lb.arg(&av).arg(&bv).arg(&mut out).arg(&h32);
            let cfg = config(m, (h / if vec { T::VEC } else { 1 }).max(1));
            unsafe { lb.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!(a.0.dtype(), run(a, b))
}

/// One warp per token, four per block.
fn row_threads(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(4) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The indices `[n, k]` u32 of the top-k of each row of `logits` `[n, e]`.
pub(super) fn topk_indices(logits: Arg, k: usize) -> Result<CudaStorage> {
    fn run<T: Elem>(lg: Arg, k: usize) -> Result<CudaStorage> {
        let dev = lg.0.device();
        let (n, e) = lg.1.shape().dims2()?;
        let (lv, _) = view::<T>(lg, "topk: logits")?;
        // SAFETY: every element is written.
        let mut out = unsafe { dev.alloc::<u32>(n * k)? };
        if n > 0 {
            let f = KERNELS.func(dev, &format!("topk_idx_{}", T::NAME))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let dims = (n as u32, e as u32, k as u32);
            b.arg(&lv)
                .arg(&mut out)
                .arg(&dims.0)
                .arg(&dims.1)
                .arg(&dims.2);
            unsafe { b.launch(row_threads(n)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!(logits.0.dtype(), run(logits, k))
}

/// The softmax of `logits` `[n, e]` at `idx` `[n, k]` u32: the weights `[n, k]` (`g` `None`), or
/// with `g` = their gradient `[n, k]` (logits' dtype) the backward `∂logits` `[n, e]`.
pub(super) fn topk_softmax(logits: Arg, idx: Arg, g: Option<Arg>) -> Result<CudaStorage> {
    fn run<T: Elem>(lg: Arg, idx: Arg, g: Option<Arg>) -> Result<CudaStorage> {
        let dev = lg.0.device();
        let (n, e) = lg.1.shape().dims2()?;
        let k = idx.1.shape().elem_count() / n.max(1);
        let (lv, _) = view::<T>(lg, "topk: logits")?;
        let (iv, _) = view::<u32>(idx, "topk: indices")?;
        let gv = g.map(|g| view::<T>(g, "topk backward: grad")).transpose()?;
        let len = if gv.is_some() { n * e } else { n * k };
        // SAFETY: every element is written.
        let mut out = unsafe { dev.alloc::<T>(len)? };
        if n > 0 {
            let name = match gv {
                Some(_) => "topk_softmax_bwd",
                None => "topk_softmax",
            };
            let f = KERNELS.func(dev, &format!("{name}_{}", T::NAME))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let dims = (n as u32, e as u32, k as u32);
            b.arg(&lv).arg(&iv);
            match &gv {
                Some((v, _)) => b.arg(v),
                None => b.arg(&lv),
            };
            b.arg(&mut out).arg(&dims.0).arg(&dims.1).arg(&dims.2);
            unsafe { b.launch(row_threads(n)) }.w()?;
        }
        Ok(wrap(out, dev))
    }
    by_dtype!(logits.0.dtype(), run(logits, idx, g))
}
