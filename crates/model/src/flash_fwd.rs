//! Forward of the attention core with sinks as one tensor-core kernel (CUDA, bf16, head dim 64):
//! flash-attention style, no score tensor in memory.
//!
//! One thread block per 64 query rows of one head (4 warps × 16 rows). For each tile of 64 keys the
//! block stages K and Vᵀ in shared memory; each warp computes its 16 × 64 scores with
//! `mma.sync.m16n8k16` (bf16 in, f32 accumulate), adds the scale and the additive mask, updates the
//! running row maximum and sum (the sink enters as the initial maximum with weight 1:
//! `exp(sink − m)`), rounds the probabilities to bf16 and accumulates `P·V` with the same MMA. The
//! key tiles are limited to the rows' causal / sliding-window range exactly as [`crate::sink_attention`]
//! documents for its mask.
//!
//! Numerically this is the chunked core's softmax evaluated online: scores stay f32 (the chunked
//! path rounds them to bf16 first) and probabilities are rounded to bf16 relative to the running
//! maximum, so outputs agree within bf16 rounding (checked by the CUDA test below).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;

use crate::nvrtc::{contiguous_range, Kernels};
use crate::storage::cuda_of;

const SRC: &str = r#"
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

#define D 64
#define BR 64
#define BC 64
#define LDS 36  // u32 per shared row: 64 bf16 + 8 bf16 padding (no bank conflicts)

// q [B, nh, t, 64], k/v [B, nkv, tk, 64], mask [mb, 1, t, tk] or null, sinks [nh] f32,
// out [B, t, nh, 64]; window 0 = none (only used with a mask).
extern "C" __global__ void __launch_bounds__(128) flash_fwd_bf16(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u16* __restrict__ mask, const float* __restrict__ sinks, u16* __restrict__ out,
    int t, int tk, int nh, int nkv, int mb, float scale, int window) {
    __shared__ u32 ks[BC * LDS];
    __shared__ u32 vt[D * LDS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int q0 = blockIdx.x * BR, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (nh / nkv);
    const int off = tk - t;
    const u64 qbase = ((u64)(b * nh + h) * t) * D;
    const u64 kbase = ((u64)(b * nkv + hk) * tk) * D;
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this thread's two rows
    // Q fragments (4 k-steps of 16 dims).
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
    const float sink = sinks[h];
    float m0 = sink, m1 = sink;                       // running maxima of rows r0, r1
    float l0 = tq == 0 ? 1.f : 0.f, l1 = l0;          // partial sums (the sink's exp(sink - m) once)
    // Key range of the block's rows.
    int kbeg = 0, kend = tk;
    if (mask) {
        kend = min(tk, off + min(q0 + BR, t));
        if (window > 0) kbeg = max(0, off + q0 + 1 - window);
    }
    const float ninf = __int_as_float(0xff800000);
    const u64 mrow = (u64)(mb > 1 ? b : 0) * t;
    for (int k0 = kbeg; k0 < kend; k0 += BC) {
        __syncthreads();
        // Stage K (row-major, padded) and V transposed.
        for (int w = threadIdx.x; w < BC * D / 2; w += blockDim.x) {
            const int key = w >> 5, dw = w & 31;
            const int kg = k0 + key;
            u32 kv = 0u, vv = 0u;
            if (kg < kend) {
                kv = *(const u32*)(k + kbase + (u64)kg * D + 2 * dw);
                vv = *(const u32*)(v + kbase + (u64)kg * D + 2 * dw);
            }
            ks[key * LDS + dw] = kv;
            u16* vt16 = (u16*)vt;
            vt16[(2 * dw) * (2 * LDS) + key] = (u16)(vv & 0xffffu);
            vt16[(2 * dw + 1) * (2 * LDS) + key] = (u16)(vv >> 16);
        }
        __syncthreads();
        // S = Q Kᵀ for 8 tiles of 8 keys.
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const u32 b0 = ks[(8 * j + g) * LDS + 8 * kk + tq];
                const u32 b1 = ks[(8 * j + g) * LDS + 8 * kk + 4 + tq];
                mma(s[j], qa[kk], b0, b1);
            }
        }
        // Scale, mask, row maxima.
        float mx0 = ninf, mx1 = ninf;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int key = k0 + 8 * j + 2 * tq + (c & 1);
                const int row = c < 2 ? r0 : r1;
                float x = s[j][c] * scale;
                if (key >= kend || row >= t) {
                    x = ninf;
                } else if (mask) {
                    x += ld(mask, (mrow + row) * (u64)tk + key);
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
        const float a0 = expf(m0 - n0), a1 = expf(m1 - n1);
        m0 = n0; m1 = n1;
        l0 *= a0; l1 *= a1;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            o[j][0] *= a0; o[j][1] *= a0; o[j][2] *= a1; o[j][3] *= a1;
            s[j][0] = expf(s[j][0] - n0); s[j][1] = expf(s[j][1] - n0);
            s[j][2] = expf(s[j][2] - n1); s[j][3] = expf(s[j][3] - n1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }
        // O += P V (4 k-steps of 16 keys, 8 tiles of 8 dims).
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            u32 pa[4];
            pa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const u32 b0 = vt[(8 * j + g) * LDS + 8 * kk + tq];
                const u32 b1 = vt[(8 * j + g) * LDS + 8 * kk + 4 + tq];
                mma(o[j], pa, b0, b1);
            }
        }
    }
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, sh);
        l1 += __shfl_xor_sync(0xffffffffu, l1, sh);
    }
    const float i0 = 1.f / l0, i1 = 1.f / l1;
    const u64 o0 = (((u64)b * t + r0) * nh + h) * D, o1 = (((u64)b * t + r1) * nh + h) * D;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int c = 8 * j + 2 * tq;
        if (r0 < t) *(u32*)(out + o0 + c) = pack_bf16(o[j][0] * i0, o[j][1] * i0);
        if (r1 < t) *(u32*)(out + o1 + c) = pack_bf16(o[j][2] * i1, o[j][3] * i1);
    }
}
"#;

static KERNELS: Kernels = Kernels::new("gptoss_flash_fwd", SRC);

/// Whether [`forward`] handles these inputs: CUDA, bf16, head dim 64, `nh` a multiple of `nkv`, a
/// mask (if any) of `[B or 1, 1, T, Tk]`, even start offsets (the kernel reads bf16 pairs).
pub(crate) fn supports(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> bool {
    let (qd, kd) = (q.dims(), k.dims());
    let even = |x: &Tensor| x.layout().start_offset() % 2 == 0;
    let shapes = qd.len() == 4
        && kd.len() == 4
        && v.dims() == kd
        && qd[3] == 64
        && kd[3] == 64
        && kd[0] == qd[0]
        && kd[1] > 0
        && qd[1] % kd[1] == 0
        && kd[2] >= qd[2];
    let mask_ok = match mask {
        None => true,
        Some(m) => {
            let md = m.dims();
            md.len() == 4
                && (md[0] == 1 || md[0] == qd[0])
                && md[1] == 1
                && md[2] == qd[2]
                && md[3] == kd[2]
                && even(m)
        }
    };
    shapes
        && mask_ok
        && q.device().is_cuda()
        && [q, k, v]
            .iter()
            .all(|x| x.dtype() == DType::BF16 && even(x))
}

/// The flash forward as a candle op on `q` `[B, nh, T, 64]`, `k`/`v` `[B, nkv, Tk, 64]` (bf16,
/// contiguous; check [`supports`] first) → the attention output as `[B, T, nh, 64]` (bf16,
/// contiguous: the layout the output projection reads). Not differentiable by itself: the chunked
/// core's autograd node runs it as its forward.
pub(crate) struct FlashFwd {
    mask: Option<Tensor>,
    sinks: Tensor,
    scale: f32,
    window: usize,
}

impl FlashFwd {
    /// With the additive `mask` `[B or 1, 1, T, Tk]` (causal / sliding as [`crate::sink_attention`]
    /// requires; `None`: every key visible, `window` ignored), `sinks` `[nh]`, `scale`, `window`.
    pub(crate) fn new(
        mask: Option<&Tensor>,
        sinks: &Tensor,
        scale: f64,
        window: Option<usize>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            mask: mask
                .map(|m| m.to_dtype(DType::BF16)?.contiguous())
                .transpose()?,
            sinks: sinks.to_dtype(DType::F32)?.contiguous()?,
            scale: scale as f32,
            window: if mask.is_some() {
                window.unwrap_or(0)
            } else {
                0
            },
        })
    }
}

impl CustomOp3 for FlashFwd {
    fn name(&self) -> &'static str {
        "flash-attention-forward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention forward: CUDA only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, nh, t, d) = ql.shape().dims4()?;
        let (_, nkv, tk, _) = kl.shape().dims4()?;
        let dev = qs.device().clone();
        let range = |l: &Layout, what: &str| contiguous_range(l, what);
        let (q0, q1) = range(ql, "flash attention: q")?;
        let (k0, k1) = range(kl, "flash attention: k")?;
        let (v0, v1) = range(vl, "flash attention: v")?;
        let qv = qs.as_cuda_slice::<bf16>()?.slice(q0..q1);
        let kv = ks.as_cuda_slice::<bf16>()?.slice(k0..k1);
        let vv = vs.as_cuda_slice::<bf16>()?.slice(v0..v1);
        let (sg, sl) = self.sinks.storage_and_layout();
        let (s0, s1) = range(sl, "flash attention: sinks")?;
        let sinks_s = cuda_of(&sg, "flash attention: sinks")?;
        let sv = sinks_s.as_cuda_slice::<f32>()?.slice(s0..s1);
        let mask_guard = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mut mb = 1i32;
        let mview = match &mask_guard {
            Some((ms, ml)) => {
                let (m0, m1) = range(ml, "flash attention: mask")?;
                mb = ml.shape().dims().first().copied().unwrap_or(1) as i32;
                Some(
                    cuda_of(ms, "flash attention: mask")?
                        .as_cuda_slice::<bf16>()?
                        .slice(m0..m1),
                )
            }
            None => None,
        };
        // SAFETY: every row < t of every head is written by its block.
        let mut out = unsafe { dev.alloc::<bf16>(b * nh * t * d)? };
        if b * nh * t > 0 {
            let f = KERNELS.func(&dev, "flash_fwd_bf16")?;
            let stream = dev.cuda_stream();
            let mut a = stream.launch_builder(&f);
            let null = 0u64;
            let (ti, tki, nhi, nkvi, wi) = (
                t as i32,
                tk as i32,
                nh as i32,
                nkv as i32,
                self.window as i32,
            );
            a.arg(&qv).arg(&kv).arg(&vv);
            match &mview {
                Some(m) => a.arg(m),
                None => a.arg(&null),
            };
            a.arg(&sv)
                .arg(&mut out)
                .arg(&ti)
                .arg(&tki)
                .arg(&nhi)
                .arg(&nkvi)
                .arg(&mb)
                .arg(&self.scale)
                .arg(&wi);
            let cfg = LaunchConfig {
                grid_dim: (t.div_ceil(64) as u32, nh as u32, b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: shapes checked by `supports` and the layouts above; the kernel stays within
            // q/out `[b, nh, t, 64]`, k/v `[b, nkv, tk, 64]`, mask `[mb, 1, t, tk]`, sinks `[nh]`.
            unsafe { a.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, t, nh, d)),
        ))
    }
}
