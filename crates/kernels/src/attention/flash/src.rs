//! The CUDA source of the flash-attention kernels (compiled with NVRTC on first use).

/// Shared helpers, the forward kernel and the backward kernels.
pub(super) const SRC: &str = r#"
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 a = __float_as_uint(bf16_round(lo)) >> 16, b = __float_as_uint(bf16_round(hi)) >> 16;
    return a | (b << 16);
}
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp16(void* smem, const void* gmem, int bytes) {
    const u32 a = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(a), "l"(gmem), "r"(bytes));
}

#define D 64
#define BR 64
#define BC 64
#define LDS 36  // u32 per shared row: 64 bf16 + 8 bf16 padding (no bank conflicts)
#define LOG2E 1.4426950408889634f

// The A operand (16 rows × 16 k) made of the C fragments of n-tiles 2·kk and 2·kk + 1, rounded to bf16.
__device__ __forceinline__ void a_from_c(const float (*c)[4], int kk, u32* a) {
    a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}
// acc[j] (8 n-tiles of 8) = A · Bᵀ over 64 k: A fragments a[kk] (16 rows), B[n][k] the u32 rows
// (bf16 pairs along k) of a padded shared tile.
__device__ __forceinline__ void mma_rows(float (*acc)[4], const u32 (*a)[4], const u32* tile) {
    const int g = (threadIdx.x & 31) >> 2, tq = threadIdx.x & 3;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            mma(acc[j], a[kk], tile[(8 * j + g) * LDS + 8 * kk + tq], tile[(8 * j + g) * LDS + 8 * kk + 4 + tq]);
    }
}
// ldmatrix.x4.trans: four 8×8 bf16 blocks of a padded shared tile, transposed; lane l gives the
// address of row (l & 7) of block (l >> 3).
__device__ __forceinline__ void ldsm4t(u32* r, const u16* p) {
    const u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// B fragments with B[k][n] = tile[k][n], k = k0..k0+15: r[0], r[1] for the n-tile at column n0,
// r[2], r[3] for the one at n0 + 8.
__device__ __forceinline__ void b_pairs(const u16* tile, int k0, int n0, u32* r) {
    const int lane = threadIdx.x & 31, m = lane >> 3, i = lane & 7;
    ldsm4t(r, tile + (k0 + (m & 1) * 8 + i) * (2 * LDS) + n0 + (m >> 1) * 8);
}
// The A fragment (16 rows × 16 k) with A[row][k] = tile[k0 + k][r0 + row].
__device__ __forceinline__ void a_trans(const u16* tile, int k0, int r0, u32* r) {
    const int lane = threadIdx.x & 31, m = lane >> 3, i = lane & 7;
    ldsm4t(r, tile + (k0 + (m >> 1) * 8 + i) * (2 * LDS) + r0 + (m & 1) * 8);
}

// q [B, nh, t, 64], k/v [B, nkv, tk, 64], sinks [nh] f32, out [B, t, nh, 64] (all bf16 but sinks).
// mode 0: every key visible; 2: causal (+ window > 0) derived from positions, plus (when not null)
// valid [B, tk] (0 = padding key, hidden) and dstart [B, tk] (key index where the document of a key
// starts; query at key index p sees keys ≥ dstart[p] only). No [t, tk] mask exists.
// Softmax in base 2: x·log2(e), exp2f.
extern "C" __global__ void __launch_bounds__(128) flash_fwd_bf16(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const unsigned char* __restrict__ valid, const u32* __restrict__ dstart,
    const float* __restrict__ sinks, u16* __restrict__ out,
    float* __restrict__ lse, int t, int tk, int nh, int nkv, float scale, int window, int mode) {
    __shared__ __align__(16) u32 ks[2][BC * LDS];
    __shared__ __align__(16) u32 vs[2][BC * LDS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int q0 = blockIdx.x * BR, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (nh / nkv);
    const int off = tk - t;
    const u64 qbase = ((u64)(b * nh + h) * t) * D;
    const u64 kbase = ((u64)(b * nkv + hk) * tk) * D;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this thread's two rows
    u32 qa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const int c = kk * 16 + 2 * tq;
        qa[kk][0] = r0 < t ? *(const u32*)(q + qbase + (u64)r0 * D + c) : 0u;
        qa[kk][1] = r1 < t ? *(const u32*)(q + qbase + (u64)r1 * D + c) : 0u;
        qa[kk][2] = r0 < t ? *(const u32*)(q + qbase + (u64)r0 * D + c + 8) : 0u;
        qa[kk][3] = r1 < t ? *(const u32*)(q + qbase + (u64)r1 * D + c + 8) : 0u;
    }
    float o[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    const float sink = sinks[h] * LOG2E;
    const float sl2 = scale * LOG2E;
    float m0 = sink, m1 = sink;                       // running maxima (base 2) of rows r0, r1
    float l0 = tq == 0 ? 1.f : 0.f, l1 = l0;          // partial sums (the sink's 2^(sink - m) once)
    const u64 vrow = (u64)b * tk;  // row of valid / dstart
    const int wr0 = q0 + warp * 16, wr1 = min(wr0 + 15, t - 1);
    // document starts of this thread's rows and of the warp's last row (mode 2 with dstart)
    int ds0 = 0, ds1 = 0, dsw = 0;
    if (dstart) {
        if (r0 < t) ds0 = (int)dstart[vrow + off + r0];
        if (r1 < t) ds1 = (int)dstart[vrow + off + r1];
        if (wr1 >= wr0) dsw = (int)dstart[vrow + off + wr1];
    }
    int kbeg = 0, kend = tk;
    if (mode != 0) {
        kend = min(tk, off + min(q0 + BR, t));
        if (window > 0) kbeg = max(0, off + q0 + 1 - window);
        // the block's first row has the smallest document start
        if (dstart && q0 < t) kbeg = max(kbeg, (int)dstart[vrow + off + q0]);
    }
    const float ninf = __int_as_float(0xff800000);
    // Stage key tile `kt` (keys kt..kt+63, zeros past kend) into buffer `buf` with cp.async.
    auto stage = [&](int kt, int buf) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = threadIdx.x + i * 128;       // 512 chunks of 16 bytes per tensor
            const int key = c >> 3, ch = c & 7;
            const int kg = kt + key;
            const int bytes = kg < kend ? 16 : 0;    // 0: zero-fill
            const u64 src = kbase + (u64)(kg < kend ? kg : 0) * D + ch * 8;
            cp16(&ks[buf][key * LDS + ch * 4], k + src, bytes);
            cp16(&vs[buf][key * LDS + ch * 4], v + src, bytes);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
    int buf = 0;
    if (kbeg < kend) stage(kbeg, 0);
    for (int k0 = kbeg; k0 < kend; k0 += BC, buf ^= 1) {
        if (k0 + BC < kend) {
            stage(k0 + BC, buf ^ 1);
            asm volatile("cp.async.wait_group 1;\n" ::);
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::);
        }
        __syncthreads();
        const u32* kst = ks[buf];
        const u16* vs16 = (const u16*)vs[buf];
        float s[8][4];
        mma_rows(s, qa, kst);
        // Whether every key of the tile is visible to every row of this warp (no per-element test).
        const bool full = k0 + BC <= kend && wr1 >= wr0 && wr1 < t
            && (mode == 0 || (mode == 2 && !valid && (!dstart || k0 >= dsw)
                              && k0 + BC - 1 <= off + wr0
                              && (window == 0 || k0 + window > off + wr1)));
        float mx0 = ninf, mx1 = ninf;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float x = s[j][c] * sl2;
                if (!full) {
                    const int key = k0 + 8 * j + 2 * tq + (c & 1);
                    const int row = c < 2 ? r0 : r1;
                    const int pos = off + row;
                    if (key >= kend || row >= t) x = ninf;
                    else if (mode == 2 && (key > pos || (window > 0 && key + window <= pos)
                                           || (valid && !valid[vrow + key])
                                           || (dstart && key < (c < 2 ? ds0 : ds1)))) x = ninf;
                }
                s[j][c] = x;
                if (c < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        }
#pragma unroll
        for (int sh = 1; sh <= 2; sh <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, sh));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, sh));
        }
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float a0 = exp2f(m0 - n0), a1 = exp2f(m1 - n1);
        m0 = n0; m1 = n1;
        l0 *= a0; l1 *= a1;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            o[j][0] *= a0; o[j][1] *= a0; o[j][2] *= a1; o[j][3] *= a1;
            s[j][0] = exp2f(s[j][0] - n0); s[j][1] = exp2f(s[j][1] - n0);
            s[j][2] = exp2f(s[j][2] - n1); s[j][3] = exp2f(s[j][3] - n1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }
        // O += P V: B[k = key][n = dim] = V[key][dim], transposed out of the row-major tile (ldmatrix).
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            u32 pa[4];
            a_from_c(s, kk, pa);
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                u32 bv[4];
                b_pairs(vs16, 16 * kk, 8 * j, bv);
                mma(o[j], pa, bv[0], bv[1]);
                mma(o[j + 1], pa, bv[2], bv[3]);
            }
        }
        __syncthreads();  // this buffer is staged again two tiles later
    }
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, sh);
        l1 += __shfl_xor_sync(0xffffffffu, l1, sh);
    }
    const float i0 = 1.f / l0, i1 = 1.f / l1;
    if (tq == 0) {  // base-2 log-sum-exp of each row (sink included), for the backward
        const u64 lb = (u64)(b * nh + h) * t;
        if (r0 < t) lse[lb + r0] = m0 + log2f(l0);
        if (r1 < t) lse[lb + r1] = m1 + log2f(l1);
    }
    const u64 o0 = (((u64)b * t + r0) * nh + h) * D, o1 = (((u64)b * t + r1) * nh + h) * D;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int c = 8 * j + 2 * tq;
        if (r0 < t) *(u32*)(out + o0 + c) = pack_bf16(o[j][0] * i0, o[j][1] * i0);
        if (r1 < t) *(u32*)(out + o1 + c) = pack_bf16(o[j][2] * i1, o[j][3] * i1);
    }
}

// D[(b·nh + h)·t + row] = Σ_d dO·O over one output row ([B, t, nh, 64] layout); one warp per row.
extern "C" __global__ void flash_bwd_dot(const u16* __restrict__ o, const u16* __restrict__ dout,
                                         float* __restrict__ dvec, int t, int nh, u64 rows) {
    const u64 r = (u64)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const int row = (int)(r % t);
    const u64 bh = r / t;
    const int h = (int)(bh % nh);
    const u64 b = bh / nh;
    const u64 base = ((b * t + row) * nh + h) * D + 2 * lane;
    float s = ld(o, base) * ld(dout, base) + ld(o, base + 1) * ld(dout, base + 1);
    for (int sh = 16; sh > 0; sh >>= 1) s += __shfl_xor_sync(0xffffffffu, s, sh);
    if (lane == 0) dvec[r] = s;
}

// f32 → bf16 (round to nearest even).
extern "C" __global__ void flash_bwd_cast(const float* __restrict__ x, u16* __restrict__ y, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        st(y, i, x[i]);
}

// One block per 64 keys and one query head (4 warps × 16 keys), looping over the query tiles that
// see these keys. Per tile: Sᵀ = K Qᵀ, Pᵀ = 2^(Sᵀ·scale·log₂e − lse), dV += Pᵀ dO, dPᵀ = V dOᵀ,
// dSᵀ = Pᵀ ∘ (dPᵀ − D) · scale, dK += dSᵀ Q, and dQ += dS K through a shared-memory transpose of
// dSᵀ. dQ, and at the end dK/dV (summed over the heads of a key/value group), are added to f32
// buffers with atomics.
// q [B, nh, t, 64], k/v [B, nkv, tk, 64], dout [B, t, nh, 64], lse/dvec [B, nh, t] f32,
// dq [B, nh, t, 64], dk/dv [B, nkv, tk, 64] f32 (zeroed); valid, dstart and mode as in flash_fwd_bf16.
extern "C" __global__ void __launch_bounds__(128) flash_bwd_bf16(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dvec,
    const unsigned char* __restrict__ valid, const u32* __restrict__ dstart,
    float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
    int t, int tk, int nh, int nkv, float scale, int window, int mode) {
    __shared__ __align__(16) u32 qs[BR * LDS];
    __shared__ __align__(16) u32 dos[BR * LDS];
    __shared__ __align__(16) u32 kss[BC * LDS];
    __shared__ __align__(16) u32 dss[BC * LDS];
    __shared__ float lse_s[BR], d_s[BR];
    __shared__ int ds_s[BR];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int k0 = blockIdx.x * BC, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (nh / nkv), off = tk - t;
    const u64 kbase = ((u64)(b * nkv + hk) * tk) * D;
    const int kw = k0 + warp * 16;
    const int kr0 = kw + g, kr1 = kr0 + 8;  // this thread's two keys
    const u16* qs16 = (const u16*)qs;
    const u16* dos16 = (const u16*)dos;
    const u16* kss16 = (const u16*)kss;
    const u16* dss16 = (const u16*)dss;
    // K and V fragments of the warp's 16 keys (A operands), and the K tile in shared memory.
    u32 ka[4][4], va[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const int c = kk * 16 + 2 * tq;
        ka[kk][0] = kr0 < tk ? *(const u32*)(k + kbase + (u64)kr0 * D + c) : 0u;
        ka[kk][1] = kr1 < tk ? *(const u32*)(k + kbase + (u64)kr1 * D + c) : 0u;
        ka[kk][2] = kr0 < tk ? *(const u32*)(k + kbase + (u64)kr0 * D + c + 8) : 0u;
        ka[kk][3] = kr1 < tk ? *(const u32*)(k + kbase + (u64)kr1 * D + c + 8) : 0u;
        va[kk][0] = kr0 < tk ? *(const u32*)(v + kbase + (u64)kr0 * D + c) : 0u;
        va[kk][1] = kr1 < tk ? *(const u32*)(v + kbase + (u64)kr1 * D + c) : 0u;
        va[kk][2] = kr0 < tk ? *(const u32*)(v + kbase + (u64)kr0 * D + c + 8) : 0u;
        va[kk][3] = kr1 < tk ? *(const u32*)(v + kbase + (u64)kr1 * D + c + 8) : 0u;
    }
    for (int w = threadIdx.x; w < BC * D / 2; w += 128) {
        const int key = w >> 5, dw = w & 31;
        kss[key * LDS + dw] = k0 + key < tk ? *(const u32*)(k + kbase + (u64)(k0 + key) * D + 2 * dw) : 0u;
    }
    float dka[8][4], dva[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) dka[j][c] = dva[j][c] = 0.f;
    // Query rows that see some key of the tile.
    int qbeg = 0, qend = t;
    if (mode != 0) {
        qbeg = max(0, k0 - off);
        if (window > 0) qend = min(t, k0 + BC - 1 + window - off);
    }
    const float sl2 = scale * LOG2E;
    const u64 vrow = (u64)b * tk;  // row of valid / dstart
    // this thread's keys exist and are not padding
    const bool kv0 = kr0 < tk && (!valid || valid[vrow + kr0]);
    const bool kv1 = kr1 < tk && (!valid || valid[vrow + kr1]);
    {
        const u64 qbase = ((u64)(b * nh + h) * t) * D;
        const u64 sb = (u64)(b * nh + h) * t;
        for (int q0 = (qbeg / BR) * BR; q0 < qend; q0 += BR) {
            // packed documents: once the tile's first row starts its document after the block's
            // last key, no later row sees these keys (document starts never decrease)
            if (dstart && (int)dstart[vrow + off + q0] > k0 + BC - 1) break;
            __syncthreads();
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = threadIdx.x + i * 128;   // 512 chunks of 16 bytes per tile
                const int r = c >> 3, ch = c & 7;
                const int qi = q0 + r;
                const int bytes = qi < t ? 16 : 0;
                const int qc = qi < t ? qi : 0;
                cp16(&qs[r * LDS + ch * 4], q + qbase + (u64)qc * D + ch * 8, bytes);
                cp16(&dos[r * LDS + ch * 4], dout + (((u64)b * t + qc) * nh + h) * D + ch * 8, bytes);
            }
            asm volatile("cp.async.commit_group;\n" ::);
            if (threadIdx.x < BR) {
                const int qi = q0 + threadIdx.x;
                lse_s[threadIdx.x] = qi < t ? lse[sb + qi] : 0.f;
                d_s[threadIdx.x] = qi < t ? dvec[sb + qi] : 0.f;
                ds_s[threadIdx.x] = dstart && qi < t ? (int)dstart[vrow + off + qi] : 0;
            }
            asm volatile("cp.async.wait_group 0;\n" ::);
            __syncthreads();
            // Sᵀ (16 keys × 64 queries) and Pᵀ.
            float st[8][4];
            mma_rows(st, ka, qs);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int key = c < 2 ? kr0 : kr1;
                    const int ql = 8 * j + 2 * tq + (c & 1);
                    const int qi = q0 + ql;
                    const int pos = off + qi;
                    bool vis = key < tk && qi < t;
                    const float x = st[j][c] * sl2;
                    if (mode == 2 && (key > pos || (window > 0 && key + window <= pos)
                                      || !(c < 2 ? kv0 : kv1) || key < ds_s[ql])) vis = false;
                    st[j][c] = vis ? exp2f(x - lse_s[ql]) : 0.f;
                }
            }
            // dV += Pᵀ dO.
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                u32 pa[4];
                a_from_c(st, kk, pa);
#pragma unroll
                for (int j = 0; j < 8; j += 2) {
                    u32 bv[4];
                    b_pairs(dos16, 16 * kk, 8 * j, bv);
                    mma(dva[j], pa, bv[0], bv[1]);
                    mma(dva[j + 1], pa, bv[2], bv[3]);
                }
            }
            // dPᵀ = V dOᵀ, then dSᵀ = Pᵀ ∘ (dPᵀ − D) · scale (kept in dp).
            float dp[8][4];
            mma_rows(dp, va, dos);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int c = 0; c < 4; ++c) dp[j][c] = st[j][c] * (dp[j][c] - d_s[8 * j + 2 * tq + (c & 1)]) * scale;
            }
            // dK += dSᵀ Q; dSᵀ to shared memory for dQ.
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                u32 pa[4];
                a_from_c(dp, kk, pa);
                dss[(warp * 16 + g) * LDS + 8 * kk + tq] = pa[0];
                dss[(warp * 16 + g + 8) * LDS + 8 * kk + tq] = pa[1];
                dss[(warp * 16 + g) * LDS + 8 * kk + 4 + tq] = pa[2];
                dss[(warp * 16 + g + 8) * LDS + 8 * kk + 4 + tq] = pa[3];
#pragma unroll
                for (int j = 0; j < 8; j += 2) {
                    u32 bq[4];
                    b_pairs(qs16, 16 * kk, 8 * j, bq);
                    mma(dka[j], pa, bq[0], bq[1]);
                    mma(dka[j + 1], pa, bq[2], bq[3]);
                }
            }
            __syncthreads();
            // dQ rows of this warp (16 queries) over the block's 64 keys: A[q][key] = dSᵀ[key][q].
            float dqa[8][4];
#pragma unroll
            for (int j = 0; j < 8; ++j) dqa[j][0] = dqa[j][1] = dqa[j][2] = dqa[j][3] = 0.f;
            const int qw = warp * 16;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                u32 a[4];
                a_trans(dss16, 16 * kk, qw, a);
#pragma unroll
                for (int j = 0; j < 8; j += 2) {
                    u32 bk[4];
                    b_pairs(kss16, 16 * kk, 8 * j, bk);
                    mma(dqa[j], a, bk[0], bk[1]);
                    mma(dqa[j + 1], a, bk[2], bk[3]);
                }
            }
            const int qa0 = q0 + qw + g, qa1 = qa0 + 8;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int c = 8 * j + 2 * tq;
                if (qa0 < t) {
                    atomicAdd(dq + qbase + (u64)qa0 * D + c, dqa[j][0]);
                    atomicAdd(dq + qbase + (u64)qa0 * D + c + 1, dqa[j][1]);
                }
                if (qa1 < t) {
                    atomicAdd(dq + qbase + (u64)qa1 * D + c, dqa[j][2]);
                    atomicAdd(dq + qbase + (u64)qa1 * D + c + 1, dqa[j][3]);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int c = 8 * j + 2 * tq;
        if (kr0 < tk) {
            atomicAdd(dk + kbase + (u64)kr0 * D + c, dka[j][0]);
            atomicAdd(dk + kbase + (u64)kr0 * D + c + 1, dka[j][1]);
            atomicAdd(dv + kbase + (u64)kr0 * D + c, dva[j][0]);
            atomicAdd(dv + kbase + (u64)kr0 * D + c + 1, dva[j][1]);
        }
        if (kr1 < tk) {
            atomicAdd(dk + kbase + (u64)kr1 * D + c, dka[j][2]);
            atomicAdd(dk + kbase + (u64)kr1 * D + c + 1, dka[j][3]);
            atomicAdd(dv + kbase + (u64)kr1 * D + c, dva[j][2]);
            atomicAdd(dv + kbase + (u64)kr1 * D + c + 1, dva[j][3]);
        }
    }
}
"#;
