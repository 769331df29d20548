//! CUDA path of the fused LM-head loss: one NVRTC kernel per logits chunk.
//!
//! One thread block per row reads the `[c, V]` logits (f32 or bf16, computing in f32 like
//! transformers' `logits.float()`) once for the row statistics — an online max / first argmax /
//! `Σ e^(x−max)` / `Σ e^(x−max)·(x−max)` per thread, merged across the block in f64 — and once
//! more to overwrite the row in place with `scale · (softmax − onehot(target))` in the logits'
//! dtype. Per-row `[nll, entropy, correct]` land in a small f32 buffer copied to the host.
//! The formulas are those of the CPU [`super::softmax_row`].

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, DType, InplaceOp2, Layout, Result, Tensor};
use gptoss_model::nvrtc::{contiguous_range, Kernels};

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

__device__ Acc block_merge(Acc a, Acc* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        Acc b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
        b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
        b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
        b.d = __shfl_xor_sync(0xffffffffu, a.d, o);
        a = merge(a, b);
    }
    if (lane == 0) sh[w] = a;
    __syncthreads();
    if (w == 0) {
        Acc e;
        e.m = __int_as_float(0xff800000); e.i = 0x7fffffff; e.s = 0.0; e.d = 0.0;
        a = lane < nw ? sh[lane] : e;
        for (int o = 16; o > 0; o >>= 1) {
            Acc b;
            b.m = __shfl_xor_sync(0xffffffffu, a.m, o);
            b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
            b.s = __shfl_xor_sync(0xffffffffu, a.s, o);
            b.d = __shfl_xor_sync(0xffffffffu, a.d, o);
            a = merge(a, b);
        }
        if (lane == 0) sh[32] = a;
    }
    __syncthreads();
    return sh[32];
}

// logits: [rows, v], overwritten with scale · (softmax − onehot(target)); stats: [rows, 3] =
// (nll, entropy, argmax == target).
template <typename T>
__device__ void rows(T* __restrict__ x, const u32* __restrict__ tg, float* __restrict__ stats,
                     int v, double scale) {
    __shared__ Acc sh[33];
    const u64 o = (u64)blockIdx.x * (u64)v;
    const int t = (int)tg[blockIdx.x];
    const float ninf = __int_as_float(0xff800000);
    // Read before any thread of the block overwrites the row.
    const float xt = threadIdx.x == 0 ? ld(x, o + t) : 0.f;
    float m = ninf, s = 0.f, d = 0.f;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float xv = ld(x, o + j);
        if (xv > m) {
            if (s != 0.f) {
                const float z = m - xv;
                const float f = expf(z);
                d = f * (d + z * s);
                s = f * s;
            }
            m = xv;
            idx = j;
            s += 1.f;
        } else if (xv != ninf) {
            const float z = xv - m;
            const float e = expf(z);
            s += e;
            // e · z → 0 when e underflows (as the CPU path).
            d += e > 0.f ? e * z : 0.f;
        }
    }
    Acc a;
    a.m = m; a.i = idx; a.s = (double)s; a.d = (double)d;
    a = block_merge(a, sh);
    const float mx = a.m;
    const float k = (float)(scale / a.s);
    const float sc = (float)scale;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float g = expf(ld(x, o + j) - mx) * k;
        if (j == t) g -= sc;
        st(x, o + j, g);
    }
    if (threadIdx.x == 0) {
        const double ls = log(a.s);
        const int arg = a.i == 0x7fffffff ? 0 : a.i;
        stats[3 * (u64)blockIdx.x + 0] = (float)(ls - (double)(xt - mx));
        stats[3 * (u64)blockIdx.x + 1] = (float)(ls - a.d / a.s);
        stats[3 * (u64)blockIdx.x + 2] = arg == t ? 1.f : 0.f;
    }
}

extern "C" __global__ void lm_loss_rows_f32(float* x, const u32* t, float* s, int v, double scale) {
    rows<float>(x, t, s, v, scale); }
extern "C" __global__ void lm_loss_rows_bf16(u16* x, const u32* t, float* s, int v, double scale) {
    rows<u16>(x, t, s, v, scale); }
"#;

static KERNELS: Kernels = Kernels::new("gptoss_lm_loss", SRC);

/// Whether [`softmax_stats_in_place`] handles logits of this dtype.
pub(super) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
}

/// Row statistics of `logits` (`[c, V]`, f32 or bf16, contiguous, on a CUDA device) against
/// `targets` (`c` ids `< V`), with `logits` overwritten by `scale · (softmax − onehot(target))`
/// in its own dtype. One kernel launch and one `c × 3` f32 device→host copy.
pub(super) fn softmax_stats_in_place(
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
