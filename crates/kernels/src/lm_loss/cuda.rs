//! CUDA path of the fused LM-head loss: one NVRTC kernel per logits chunk.
//!
//! One thread block per row reads the `[c, V]` logits (f32 or bf16, computing in f32 like
//! transformers' `logits.float()`) once for the row statistics — an online max / first argmax /
//! `Σ e^(x−max)` / `Σ e^(x−max)·(x−max)` per thread, merged across the block in f64 — and once
//! more to overwrite the row in place with `scale · (softmax − onehot(target))` in the logits'
//! dtype. Per-row `[nll, entropy, correct]` land in a small f32 buffer copied to the host.
//! The formulas are those of the CPU [`super::softmax_row`].

use std::sync::Mutex;

use crate::nvrtc::{contiguous_range, Kernels};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp2, Layout, Result, Tensor};

use super::RowStats;

/// Threads per row (one block per row).
const THREADS: u32 = 1024;

const SRC: &str = r#"
struct Acc { float m; int i; double s; double d; };

// (max, first argmax, Σe, Σe·z) of two parts, the sums taken relative to the merged max.
// NaN never wins the max (as the CPU's fastmath::max); a NaN sum propagates.
__device__ __forceinline__ Acc merge(Acc a, Acc b) {
    Acc r;
    const bool tb = (b.m > a.m) || (b.m == a.m && b.i < a.i);
    r.m = tb ? b.m : a.m;
    r.i = tb ? b.i : a.i;
    r.s = 0.0;
    r.d = 0.0;
    if (a.s != 0.0) {
        const float z = a.m - r.m;
        const double f = (double)expf(z);
        r.s += f * a.s;
        r.d += f * (a.d + (double)z * a.s);
    }
    if (b.s != 0.0) {
        const float z = b.m - r.m;
        const double f = (double)expf(z);
        r.s += f * b.s;
        r.d += f * (b.d + (double)z * b.s);
    }
    return r;
}

__device__ __forceinline__ Acc warp_merge(Acc a) {
    for (int o = 16; o > 0; o >>= 1) {
        Acc b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
        b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
        b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
        b.d = __shfl_xor_sync(0xffffffffu, a.d, o);
        a = merge(a, b);
    }
    return a;
}

__device__ Acc block_merge(Acc a, Acc* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    a = warp_merge(a);
    if (lane == 0) sh[w] = a;
    __syncthreads();
    if (w == 0) {
        Acc e;
        e.m = __int_as_float(0xff800000); e.i = 0x7fffffff; e.s = 0.0; e.d = 0.0;
        a = warp_merge(lane < nw ? sh[lane] : e);
        if (lane == 0) sh[32] = a;
    }
    __syncthreads();
    return sh[32];
}

// 16-byte vectors: 4 f32 or 8 bf16 (low half first, little-endian).
__device__ __forceinline__ void unpack(uint4 u, float* f, const float*) {
    f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void unpack(uint4 u, float* f, const u16*) {
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        f[2 * k] = __uint_as_float(w[k] << 16);
        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ uint4 pack(const float* f, const float*) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
__device__ __forceinline__ uint4 pack(const float* f, const u16*) {
    u32 w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
        w[k] = (__float_as_uint(bf16_round(f[2 * k])) >> 16) | (__float_as_uint(bf16_round(f[2 * k + 1])) & 0xffff0000u);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Online update of one thread's (max, first argmax, Σe, Σe·z) with element x at index j; a
// thread sees its indices in increasing order, so a strict `>` keeps the first maximum.
__device__ __forceinline__ void acc(float x, int j, float& m, int& idx, float& s, float& d) {
    const float ninf = __int_as_float(0xff800000);
    if (x > m) {
        if (s != 0.f) {
            const float z = m - x;
            const float f = expf(z);
            d = f * (d + z * s);
            s = f * s;
        }
        m = x;
        idx = j;
        s += 1.f;
    } else if (x != ninf) {
        const float z = x - m;
        const float e = expf(z);
        s += e;
        // e · z → 0 when e underflows (as the CPU path).
        d += e > 0.f ? e * z : 0.f;
    }
}

// logits: [rows, v], overwritten with scale · (softmax − onehot(target)); stats: [rows, 3] =
// (nll, entropy, argmax == target). Each row: a scalar head up to 16-byte alignment, 16-byte
// vectors (two in flight per thread), a scalar tail.
template <typename T>
__device__ void rows(T* __restrict__ x, const u32* __restrict__ tg, float* __restrict__ stats,
                     int v, double scale) {
    constexpr int VEC = 16 / sizeof(T);
    __shared__ Acc sh[33];
    const int tid = threadIdx.x, bd = blockDim.x;
    T* row = x + (u64)blockIdx.x * (u64)v;
    const int t = (int)tg[blockIdx.x];
    // Read before any thread of the block overwrites the row.
    const float xt = tid == 0 ? ld(row, t) : 0.f;
    const int head = min(v, (int)(((16u - (u32)((u64)row & 15u)) & 15u) / sizeof(T)));
    const int nvec = (v - head) / VEC;
    const int tail = head + nvec * VEC;
    uint4* vp = (uint4*)(row + head);

    float m = __int_as_float(0xff800000), s = 0.f, d = 0.f;
    int idx = 0x7fffffff;
    for (int j = tid; j < head; j += bd) acc(ld(row, j), j, m, idx, s, d);
    int q = tid;
    for (; q + bd < nvec; q += 2 * bd) {
        const uint4 u0 = vp[q], u1 = vp[q + bd];
        float f[VEC];
        unpack(u0, f, row);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc(f[k], head + q * VEC + k, m, idx, s, d);
        unpack(u1, f, row);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc(f[k], head + (q + bd) * VEC + k, m, idx, s, d);
    }
    if (q < nvec) {
        float f[VEC];
        unpack(vp[q], f, row);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc(f[k], head + q * VEC + k, m, idx, s, d);
    }
    for (int j = tail + tid; j < v; j += bd) acc(ld(row, j), j, m, idx, s, d);

    Acc a;
    a.m = m; a.i = idx; a.s = (double)s; a.d = (double)d;
    a = block_merge(a, sh);
    const float mx = a.m;
    const float kf = (float)(scale / a.s);
    const float sc = (float)scale;
    for (int j = tid; j < head; j += bd) st(row, j, expf(ld(row, j) - mx) * kf - (j == t ? sc : 0.f));
    for (int q = tid; q < nvec; q += bd) {
        float f[VEC];
        unpack(vp[q], f, row);
        const int j0 = head + q * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) f[k] = expf(f[k] - mx) * kf - (j0 + k == t ? sc : 0.f);
        vp[q] = pack(f, row);
    }
    for (int j = tail + tid; j < v; j += bd) st(row, j, expf(ld(row, j) - mx) * kf - (j == t ? sc : 0.f));
    if (tid == 0) {
        const double ls = log(a.s);
        const int arg = a.i == 0x7fffffff ? 0 : a.i;
        stats[3 * (u64)blockIdx.x + 0] = (float)(ls - (double)(xt - mx));
        stats[3 * (u64)blockIdx.x + 1] = (float)(ls - a.d / a.s);
        stats[3 * (u64)blockIdx.x + 2] = arg == t ? 1.f : 0.f;
    }
}

extern "C" __global__ void __launch_bounds__(1024) lm_loss_rows_f32(float* x, const u32* t, float* s, int v, double scale) {
    rows<float>(x, t, s, v, scale); }
extern "C" __global__ void __launch_bounds__(1024) lm_loss_rows_bf16(u16* x, const u32* t, float* s, int v, double scale) {
    rows<u16>(x, t, s, v, scale); }
"#;

pub(crate) static KERNELS: Kernels = Kernels::new("gptoss_lm_loss", SRC);

/// Whether [`softmax_stats_in_place`] handles logits of this dtype.
pub(crate) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

/// Row statistics of `logits` (`[c, V]`, f32 or bf16, contiguous, on a CUDA device) against
/// `targets` (`c` ids `< V`), with `logits` overwritten by `scale · (softmax − onehot(target))`
/// in its own dtype. One kernel launch and one `c × 3` f32 device→host copy.
pub(crate) fn softmax_stats_in_place(
    logits: &Tensor,
    targets: &[u32],
    scale: f64,
) -> Result<Vec<RowStats>> {
    let (c, _) = logits.dims2()?;
    if targets.len() != c {
        candle_core::bail!(
            "lm_loss_rows: {c} logits rows but {} targets",
            targets.len()
        );
    }
    let t = Tensor::from_slice(targets, c, logits.device())?;
    let op = RowsOp {
        scale,
        stats: Mutex::new(None),
    };
    logits.inplace_op2(&t, &op)?;
    let stats = op
        .stats
        .into_inner()
        .map_err(|_| candle_core::Error::Msg("lm_loss_rows: stats lock poisoned".into()))?;
    let Some(stats) = stats else {
        candle_core::bail!("lm_loss_rows: the kernel produced no statistics");
    };
    let host = logits.device().as_cuda_device()?.clone_dtoh(&stats)?;
    Ok(host
        .chunks_exact(3)
        .map(|r| RowStats {
            nll: r[0] as f64,
            entropy: r[1] as f64,
            correct: r[2] != 0.0,
        })
        .collect())
}

/// The in-place op: logits (dst) and device targets (src); the stats buffer it fills is kept in
/// `stats` for the caller.
struct RowsOp {
    scale: f64,
    stats: Mutex<Option<CudaSlice<f32>>>,
}

impl InplaceOp2 for RowsOp {
    fn name(&self) -> &'static str {
        "lm_loss_rows"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("lm_loss_rows: CUDA only (the CPU uses softmax_stats_cpu)")
    }

    fn cuda_fwd(
        &self,
        x: &mut CudaStorage,
        xl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
    ) -> Result<()> {
        let (c, v) = xl.shape().dims2()?;
        let (x0, x1) = contiguous_range(xl, "lm_loss_rows logits")?;
        let (t0, t1) = contiguous_range(tl, "lm_loss_rows targets")?;
        if t1 - t0 != c {
            candle_core::bail!("lm_loss_rows: {c} logits rows but {} targets", t1 - t0);
        }
        let v_i = i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("lm_loss_rows: V = {v} too large")))?;
        let dev = x.device().clone();
        let stream = dev.cuda_stream();
        let tv = t.as_cuda_slice::<u32>()?.slice(t0..t1);
        // SAFETY: the kernel writes all three statistics of every row.
        let mut stats = unsafe { dev.alloc::<f32>(c * 3)? };
        if c > 0 && v > 0 {
            let cfg = LaunchConfig {
                grid_dim: (c as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            macro_rules! run {
                ($s:expr, $name:literal) => {{
                    let func = KERNELS.func(&dev, $name)?;
                    let mut xv = $s.slice_mut(x0..x1);
                    let mut b = stream.launch_builder(&func);
                    b.arg(&mut xv);
                    b.arg(&tv);
                    b.arg(&mut stats);
                    b.arg(&v_i);
                    b.arg(&self.scale);
                    // SAFETY: argument types and counts match the kernel; the logits view holds
                    // c · V elements, the targets c, the stats 3c.
                    unsafe { b.launch(cfg) }.w()?;
                }};
            }
            match &mut x.slice {
                CudaStorageSlice::F32(s) => run!(s, "lm_loss_rows_f32"),
                CudaStorageSlice::BF16(s) => run!(s, "lm_loss_rows_bf16"),
                _ => candle_core::bail!("lm_loss_rows: unsupported dtype {:?}", x.dtype()),
            }
        }
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("lm_loss_rows: stats lock poisoned".into()))? =
            Some(stats);
        Ok(())
    }
}
