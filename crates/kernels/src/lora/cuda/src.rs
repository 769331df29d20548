//! The CUDA source of the LoRA kernels (NVRTC module `gptoss_lora_down`, after the shared prelude):
//! the down projection `x·Aᵀ` (plain, split, grouped), `∂x`, the two-pass `∂A`, and PEFT's up
//! projection added to the base output.

pub(super) const SRC: &str = r#"
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

// PEFT's LoRA output for the ungrouped up projection, b = lora_B [cols, r] (r <= R):
// out[row, o] = rnd(rnd(base[row, o] + bias[o]) + ((sum_j h[row, j] b[o, j]) scale + 0)), rnd to T
// (the bias term only with BIAS); one thread per four outputs of UPW rows, the four outputs' rows
// of b in registers (read once per thread, so b's layout costs nothing).
#define UPW 8  // UP_ROWS on the host
template <typename T, bool BIAS, int R>
__device__ void up_add(const T* __restrict__ base, const T* __restrict__ bias, const float* __restrict__ h,
                   const float* __restrict__ b, T* __restrict__ out, int n, int cols, int r, float scale) {
const u32 quads = (u32)cols / 4;
const u64 q = (u64)blockIdx.x * blockDim.x + threadIdx.x;
const u64 groups = ((u64)n + UPW - 1) / UPW;
if (q >= groups * quads) return;
const u64 row0 = (u64)((u32)(q / quads)) * UPW;
const int o = (int)(q % quads) * 4;
float4 w[R];
#pragma unroll
for (int j = 0; j < R; ++j)
    w[j] = j < r ? make_float4(b[(u64)o * r + j], b[(u64)(o + 1) * r + j], b[(u64)(o + 2) * r + j],
                               b[(u64)(o + 3) * r + j])
                 : make_float4(0.f, 0.f, 0.f, 0.f);
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
extern "C" __global__ void lora_down_da_sum_seg(const float* p, float* da, const u32* seg, int blocks, u64 ri) { da_sum_seg(p, da, seg, blocks, ri); }
"#;
