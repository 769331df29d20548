//! RMSNorm (`GptOssRMSNorm`) as one kernel forward and one backward instead of 8–12 candle ops
//! (and their autograd nodes) over `[T, H]`.
//!
//! The forward reproduces the reference op bit for bit in f32 (`w · (x · 1/√(mean(x²) + eps))`,
//! then cast); the backward runs in f32 and rounds once. The norm weight is frozen (no gradient).
//! The CPU implementation is the reference the kernel is tested against; the model uses this op on
//! CUDA only (see [`crate::FastPath::Elementwise`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use crate::storage::{cpu_f32, cpu_out};

/// `x` `[.., H]` (f32/bf16), `weight` `[H]` (any float dtype, frozen), `eps` → same shape and dtype
/// as `x`: `(w · (x_f32 · 1/√(mean(x_f32²) + eps))).to(x.dtype)`. Differentiable in `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let w = weight.to_dtype(DType::F32)?.contiguous()?;
    let x = x.contiguous()?;
    let op = RmsNormOp { w, eps: eps as f32 };
    // apply_op1 records the backward only when x takes part in autograd
    x.apply_op1(op)
}

struct RmsNormOp {
    w: Tensor,
    eps: f32,
}

struct RmsNormBwd {
    w: Tensor,
    eps: f32,
}

fn weight_f32(w: &Tensor) -> candle_core::Result<Vec<f32>> {
    w.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "rms_norm")?;
        let w = weight_f32(&self.w)?;
        let h = w.len().max(1);
        let mut y = vec![0f32; x.len()];
        for (yr, xr) in y.chunks_mut(h).zip(x.chunks(h)) {
            let ss: f32 = xr.iter().map(|v| v * v).sum();
            let inv = 1.0 / (ss / h as f32 + self.eps).sqrt();
            for ((o, xv), wv) in yr.iter_mut().zip(xr).zip(&w) {
                *o = wv * (xv * inv);
            }
        }
        Ok((cpu_out(y, s.dtype(), "rms_norm")?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::rms(s, l, None, &self.w, self.eps)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.to_dtype(x.dtype())?.contiguous()?;
        let op = RmsNormBwd {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&g, &op)?))
    }
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    /// `dx = r·w·g − (r³/H)·x·Σ(w·g·x)` with `r = 1/√(mean(x²) + eps)`.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(xs, xl, "rms_norm backward")?;
        let g = cpu_f32(gs, gl, "rms_norm backward")?;
        let w = weight_f32(&self.w)?;
        let h = w.len().max(1);
        let mut dx = vec![0f32; x.len()];
        for ((dr, xr), gr) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
            let ss: f32 = xr.iter().map(|v| v * v).sum();
            let r = 1.0 / (ss / h as f32 + self.eps).sqrt();
            let dot: f32 = xr.iter().zip(gr).zip(&w).map(|((x, g), w)| w * g * x).sum();
            let c = r * r * r / h as f32 * dot;
            for (((o, xv), gv), wv) in dr.iter_mut().zip(xr).zip(gr).zip(&w) {
                *o = r * wv * gv - c * xv;
            }
        }
        Ok((
            cpu_out(dx, xs.dtype(), "rms_norm backward")?,
            xl.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            cuda::rms(xs, xl, Some((gs, gl)), &self.w, self.eps)?,
            xl.shape().clone(),
        ))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};
    use half::bf16;

    use crate::nvrtc::{contiguous_range, Kernels};

    const SRC: &str = r#"
template <typename T>
__device__ void rms_fwd(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y, int h, float eps) {
    __shared__ float sh[32];
    const u64 o = (u64)blockIdx.x * h;
    float ss = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = ld(x, o + j); ss += v * v; }
    ss = block_red(ss, false, sh);
    const float inv = 1.f / sqrtf(ss / (float)h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) st(y, o + j, w[j] * (ld(x, o + j) * inv));
}

// rms_fwd with 16-byte accesses of V values, each thread keeping its up to RCH chunks in registers
// between the sum of squares and the output (h a multiple of V, at most RCH·blockDim.x chunks, the
// row start 16-byte aligned; RMS_VEC_CHUNKS on the host is RCH times its block size).
#define RCH 4
template <typename T, int V>
__device__ void rms_fwd_vec(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y, int h, float eps) {
    __shared__ float sh[32];
    const u64 o = (u64)blockIdx.x * h;
    const int chunks = h / V;
    float v[RCH][V];
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < RCH; ++c) {
        const int k = threadIdx.x + c * blockDim.x;
        if (k < chunks) {
            ldv<T, V, true>(x, o + (u64)k * V, v[c]);
#pragma unroll
            for (int q = 0; q < V; ++q) ss += v[c][q] * v[c][q];
        }
    }
    ss = block_red(ss, false, sh);
    const float inv = 1.f / sqrtf(ss / (float)h + eps);
#pragma unroll
    for (int c = 0; c < RCH; ++c) {
        const int k = threadIdx.x + c * blockDim.x;
        if (k < chunks) {
            float r[V];
#pragma unroll
            for (int q = 0; q < V; ++q) r[q] = w[k * V + q] * (v[c][q] * inv);
            stv<T, V, true>(y, o + (u64)k * V, r);
        }
    }
}

template <typename T>
__device__ void rms_bwd(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ w,
                        T* __restrict__ dx, int h, float eps) {
    __shared__ float sh[32];
    const u64 o = (u64)blockIdx.x * h;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float v = ld(x, o + j);
        ss += v * v;
        dot += w[j] * ld(g, o + j) * v;
    }
    ss = block_red(ss, false, sh);
    dot = block_red(dot, false, sh);
    const float r = 1.f / sqrtf(ss / (float)h + eps);
    const float c = r * r * r / (float)h * dot;
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        st(dx, o + j, r * w[j] * ld(g, o + j) - c * ld(x, o + j));
}

extern "C" __global__ void rms_fwd_f32(const float* x, const float* w, float* y, int h, float eps) { rms_fwd<float>(x, w, y, h, eps); }
extern "C" __global__ void rms_fwd_bf16(const u16* x, const float* w, u16* y, int h, float eps) { rms_fwd<u16>(x, w, y, h, eps); }
extern "C" __global__ void rms_fwd_vec_f32(const float* x, const float* w, float* y, int h, float eps) { rms_fwd_vec<float, 4>(x, w, y, h, eps); }
extern "C" __global__ void rms_fwd_vec_bf16(const u16* x, const float* w, u16* y, int h, float eps) { rms_fwd_vec<u16, 8>(x, w, y, h, eps); }
extern "C" __global__ void rms_bwd_f32(const float* x, const float* g, const float* w, float* dx, int h, float eps) { rms_bwd<float>(x, g, w, dx, h, eps); }
extern "C" __global__ void rms_bwd_bf16(const u16* x, const u16* g, const float* w, u16* dx, int h, float eps) { rms_bwd<u16>(x, g, w, dx, h, eps); }
"#;

    pub(crate) static KERNELS: Kernels = Kernels::new("gptoss_rms_norm", SRC);

    /// Threads of `rms_fwd_vec` and the most 16-byte chunks a row may have there (`RCH` per thread).
    const RMS_VEC_THREADS: u32 = 128;
    const RMS_VEC_CHUNKS: usize = 4 * RMS_VEC_THREADS as usize;

    fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// RMSNorm forward (`g` = None: `x` → y) or backward (`g` = Some(∂y): `x` → ∂x), one block a row.
    pub(super) fn rms(
        xs: &CudaStorage,
        xl: &Layout,
        g: Option<(&CudaStorage, &Layout)>,
        w: &Tensor,
        eps: f32,
    ) -> Result<CudaStorage> {
        let (a, b) = contiguous_range(xl, "rms_norm")?;
        let h = w.elem_count();
        let rows = (b - a) / h.max(1);
        let dev = xs.device().clone();
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cuda(wc) = &*ws else {
            candle_core::bail!("rms_norm: weight not on CUDA")
        };
        let (w0, w1) = contiguous_range(wl, "rms_norm weight")?;
        let wv = wc.as_cuda_slice::<f32>()?.slice(w0..w1);
        let gr = match g {
            Some((_, gl)) => Some(contiguous_range(gl, "rms_norm backward")?),
            None => None,
        };
        let h_i = h as i32;
        macro_rules! run {
            ($t:ty, $fwd:literal, $bwd:literal) => {{
                // the forward keeps a row in registers with 16-byte accesses where it fits
                let v = 16 / std::mem::size_of::<$t>();
                let vec = g.is_none() && h % v == 0 && a % v == 0 && h / v <= RMS_VEC_CHUNKS;
                let name = match (g.is_some(), vec) {
                    (true, _) => $bwd.to_string(),
                    (false, true) => $fwd.replace("rms_fwd", "rms_fwd_vec"),
                    (false, false) => $fwd.to_string(),
                };
                let func = KERNELS.func(&dev, &name)?;
                let stream = dev.cuda_stream();
                let xv = xs.as_cuda_slice::<$t>()?.slice(a..b);
                let gv = match (g, gr) {
                    (Some((gs, _)), Some((ga, gb))) => {
                        Some(gs.as_cuda_slice::<$t>()?.slice(ga..gb))
                    }
                    _ => None,
                };
                // SAFETY: the kernel writes every element.
                let mut out = unsafe { dev.alloc::<$t>(rows * h)? };
                if rows > 0 {
                    let mut bld = stream.launch_builder(&func);
                    bld.arg(&xv);
                    if let Some(gv) = &gv {
                        bld.arg(gv);
                    }
                    bld.arg(&wv);
                    bld.arg(&mut out);
                    bld.arg(&h_i);
                    bld.arg(&eps);
                    let threads = if vec { RMS_VEC_THREADS } else { 256 };
                    unsafe { bld.launch(rows_cfg(rows, threads)) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match xs.dtype() {
            DType::F32 => run!(f32, "rms_fwd_f32", "rms_bwd_f32"),
            DType::BF16 => run!(bf16, "rms_fwd_bf16", "rms_bwd_bf16"),
            d => candle_core::bail!("rms_norm: unsupported dtype {d:?}"),
        })
    }
}
