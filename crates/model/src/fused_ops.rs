//! Fused elementwise ops of the decoder layer for the CUDA path: RMSNorm and the half-split RoPE
//! rotation, each one kernel forward and one backward instead of 8–12 candle ops (and their
//! autograd nodes) over `[T, H]` / `[B, heads, T, d]` tensors.
//!
//! Both reproduce the reference ops bit for bit in the forward: RMSNorm in f32
//! (`w · (x · 1/√(mean(x²) + eps))`, then cast), RoPE with the rounding of every bf16 operation
//! (`x1·cos − x2·sin` rounds the two products and the difference, as candle and torch do). The
//! backward runs in f32 and rounds once. Norm weights and the cos/sin tables are frozen (no
//! gradient). The CPU implementations are the references the kernels are tested against; the
//! model uses these ops on CUDA only (see [`enabled`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

use crate::storage::{cpu_f32, cpu_out};

/// Rounds to the storage precision of `dtype` (bf16: round to nearest even; f32: as is).
fn round(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(v).to_f32(),
        _ => v,
    }
}

// ---------------------------------------------------------------- RMSNorm

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

// ---------------------------------------------------------------- RoPE

/// Half-split rotation of `x` `[B, heads, T, d]` (f32/bf16, any strides with a unit last stride,
/// e.g. the transposed view of a `[B, T, heads, d]` projection) with `cos`/`sin` `[B or 1, 1, T,
/// d/2]` (x's dtype, frozen) → contiguous `[B, heads, T, d]`: `cat(x1·cos − x2·sin, x2·cos +
/// x1·sin)` with the rounding of the reference ([`crate::apply_rotary`]). Differentiable in `x`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    // apply_op1 records the backward only when x takes part in autograd
    x.apply_op1(RotaryOp::new(x, cos, sin, false)?)
}

/// [`rotary`] of a token-major `x` `[B, T, heads, d]` (e.g. a projection's output reshaped, any
/// strides with a unit last stride) → contiguous `[B, heads, T, d]`, the same values as
/// `rotary(&x.transpose(1, 2)?, ..)`. Its gradient comes back `[B, T, heads, d]` contiguous, so no
/// transpose enters the autograd graph (a transpose's gradient would be materialized).
pub fn rotary_tokens_first(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op1(RotaryOp::new(x, cos, sin, true)?)
}

struct RotaryOp {
    cos: Tensor,
    sin: Tensor,
    cos_batch: usize,
    /// The backward: rotate by −θ (`dx1 = g1·cos + g2·sin`, `dx2 = g2·cos − g1·sin`), rounded once.
    inverse: bool,
    /// Whether the (input, output) are token-major `[B, T, heads, d]` rather than `[B, heads, T, d]`.
    tokens_first: (bool, bool),
}

impl RotaryOp {
    /// The forward op for `x` (`[B, heads, T, d]`, or `[B, T, heads, d]` when `tokens_first`) after
    /// checking it against `cos`/`sin` `[B or 1, 1, T, d/2]`.
    fn new(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        tokens_first: bool,
    ) -> candle_core::Result<Self> {
        let (_, a, b, d) = x.dims4()?;
        let t = if tokens_first { a } else { b };
        let (cb, one, ct, half) = cos.dims4()?;
        if one != 1 || ct != t || 2 * half != d || sin.dims() != cos.dims() || x.stride()[3] != 1 {
            candle_core::bail!(
                "rotary: x {:?} (strides {:?}, token-major: {tokens_first}) does not fit cos/sin {:?}",
                x.dims(),
                x.stride(),
                cos.dims()
            );
        }
        Ok(Self {
            cos: cos.to_dtype(x.dtype())?.contiguous()?,
            sin: sin.to_dtype(x.dtype())?.contiguous()?,
            cos_batch: cb,
            inverse: false,
            tokens_first: (tokens_first, false),
        })
    }

    /// `(B, heads, T, d)` and the input strides in that order.
    fn dims(&self, l: &Layout) -> candle_core::Result<([usize; 4], [usize; 3])> {
        let (a, b, c, d) = l.shape().dims4()?;
        let st = l.stride();
        Ok(if self.tokens_first.0 {
            ([a, c, b, d], [st[0], st[2], st[1]])
        } else {
            ([a, b, c, d], [st[0], st[1], st[2]])
        })
    }

    /// The output's shape and its strides in `(B, heads, T)` order.
    fn out(&self, [b, nh, t, d]: [usize; 4]) -> (Shape, [usize; 3]) {
        if self.tokens_first.1 {
            (Shape::from((b, t, nh, d)), [t * nh * d, d, nh * d])
        } else {
            (Shape::from((b, nh, t, d)), [nh * t * d, t * d, d])
        }
    }
}

impl CustomOp1 for RotaryOp {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let ([b, nh, t, d], st) = self.dims(l)?;
        let (shape, ost) = self.out([b, nh, t, d]);
        let half = d / 2;
        let x: Vec<f32> = match s {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            _ => candle_core::bail!("rotary: unsupported dtype {:?}", s.dtype()),
        };
        let cos = self
            .cos
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let sin = self
            .sin
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let dt = s.dtype();
        let mut out = vec![0f32; b * nh * t * d];
        for bi in 0..b {
            for h in 0..nh {
                for ti in 0..t {
                    let src = l.start_offset() + bi * st[0] + h * st[1] + ti * st[2];
                    let dst = bi * ost[0] + h * ost[1] + ti * ost[2];
                    let cb = if self.cos_batch > 1 { bi } else { 0 };
                    for i in 0..half {
                        let (c, s_) =
                            (cos[(cb * t + ti) * half + i], sin[(cb * t + ti) * half + i]);
                        let (x1, x2) = (x[src + i], x[src + half + i]);
                        let (a, bb) = if self.inverse {
                            (x1 * c + x2 * s_, x2 * c - x1 * s_)
                        } else {
                            (
                                round(round(x1 * c, dt) - round(x2 * s_, dt), dt),
                                round(round(x2 * c, dt) + round(x1 * s_, dt), dt),
                            )
                        };
                        out[dst + i] = a;
                        out[dst + half + i] = bb;
                    }
                }
            }
        }
        Ok((cpu_out(out, dt, "rotary")?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (dims, st) = self.dims(l)?;
        let (shape, ost) = self.out(dims);
        let geo = cuda::Geometry { dims, st, ost };
        Ok((
            cuda::rotary(
                s,
                l,
                &geo,
                &self.cos,
                &self.sin,
                self.cos_batch,
                self.inverse,
            )?,
            shape,
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // the gradient comes back in the input's layout
        let op = RotaryOp {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            cos_batch: self.cos_batch,
            inverse: true,
            tokens_first: (self.tokens_first.1, self.tokens_first.0),
        };
        Ok(Some(g.to_dtype(x.dtype())?.apply_op1_no_bwd(&op)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
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

__device__ __forceinline__ float rnd(float v, bool b16) { return b16 ? bf16_round(v) : v; }

// x: (b, h, t) at strides (sb, sh, st) (unit last stride); out at strides (ob, oh, ot); cos/sin
// [cb, 1, T, d/2].
template <typename T>
__device__ void rotary(const T* __restrict__ x, const T* __restrict__ cs, const T* __restrict__ sn,
                       T* __restrict__ out, int nh, int t, int half, int cb,
                       u64 sb, u64 shh, u64 stt, u64 ob, u64 oh, u64 ot, int inverse, bool b16, u64 nrows) {
    // blockDim.y rows per block, blockDim.x threads along the row's first half.
    const u64 row = (u64)blockIdx.x * blockDim.y + threadIdx.y;  // (b*nh + h)*T + ti
    if (row >= nrows) return;
    // 32-bit index arithmetic (the host checks nrows < 2^32)
    const u32 r32 = (u32)row;
    const int ti = (int)(r32 % (u32)t);
    const u32 bh = r32 / (u32)t;
    const int h = (int)(bh % (u32)nh);
    const int b = (int)(bh / (u32)nh);
    const u64 src = (u64)b * sb + (u64)h * shh + (u64)ti * stt;
    const u64 dst = (u64)b * ob + (u64)h * oh + (u64)ti * ot;
    const u64 co = ((u64)(cb > 1 ? b : 0) * t + ti) * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = ld(cs, co + i), s = ld(sn, co + i);
        const float x1 = ld(x, src + i), x2 = ld(x, src + half + i);
        float a, bb;
        // __fmul_rn/__fadd_rn: no fused multiply-add, the same roundings as the CPU reference.
        if (inverse) { a = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)); bb = __fsub_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)); }
        else {
            a = rnd(__fsub_rn(rnd(__fmul_rn(x1, c), b16), rnd(__fmul_rn(x2, s), b16)), b16);
            bb = rnd(__fadd_rn(rnd(__fmul_rn(x2, c), b16), rnd(__fmul_rn(x1, s), b16)), b16);
        }
        st(out, dst + i, a);
        st(out, dst + half + i, bb);
    }
}

extern "C" __global__ void rms_fwd_f32(const float* x, const float* w, float* y, int h, float eps) { rms_fwd<float>(x, w, y, h, eps); }
extern "C" __global__ void rms_fwd_bf16(const u16* x, const float* w, u16* y, int h, float eps) { rms_fwd<u16>(x, w, y, h, eps); }
extern "C" __global__ void rms_fwd_vec_f32(const float* x, const float* w, float* y, int h, float eps) { rms_fwd_vec<float, 4>(x, w, y, h, eps); }
extern "C" __global__ void rms_fwd_vec_bf16(const u16* x, const float* w, u16* y, int h, float eps) { rms_fwd_vec<u16, 8>(x, w, y, h, eps); }
extern "C" __global__ void rms_bwd_f32(const float* x, const float* g, const float* w, float* dx, int h, float eps) { rms_bwd<float>(x, g, w, dx, h, eps); }
extern "C" __global__ void rms_bwd_bf16(const u16* x, const u16* g, const float* w, u16* dx, int h, float eps) { rms_bwd<u16>(x, g, w, dx, h, eps); }
extern "C" __global__ void rotary_f32(const float* x, const float* c, const float* s, float* o, int nh, int t, int half, int cb,
    u64 sb, u64 sh, u64 st, u64 ob, u64 oh, u64 ot, int inv, u64 rows) { rotary<float>(x, c, s, o, nh, t, half, cb, sb, sh, st, ob, oh, ot, inv, false, rows); }
extern "C" __global__ void rotary_bf16(const u16* x, const u16* c, const u16* s, u16* o, int nh, int t, int half, int cb,
    u64 sb, u64 sh, u64 st, u64 ob, u64 oh, u64 ot, int inv, u64 rows) { rotary<u16>(x, c, s, o, nh, t, half, cb, sb, sh, st, ob, oh, ot, inv, true, rows); }
"#;

    static KERNELS: Kernels = Kernels::new("gptoss_fused_ops", SRC);

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

    /// `(B, heads, T, d)`, the input strides and the output strides in `(B, heads, T)` order.
    pub(super) struct Geometry {
        pub dims: [usize; 4],
        pub st: [usize; 3],
        pub ost: [usize; 3],
    }

    pub(super) fn rotary(
        s: &CudaStorage,
        l: &Layout,
        geo: &Geometry,
        cos: &Tensor,
        sin: &Tensor,
        cos_batch: usize,
        inverse: bool,
    ) -> Result<CudaStorage> {
        let [bsz, nh, t, d] = geo.dims;
        let (st, ost) = (geo.st, geo.ost);
        if l.stride()[3] != 1 {
            candle_core::bail!(
                "rotary: the last dimension must have stride 1, got {:?}",
                l.stride()
            );
        }
        let rows = bsz * nh * t;
        if u32::try_from(rows).is_err() {
            candle_core::bail!(
                "rotary: {rows} rows (batch × heads × tokens) exceed the kernel's u32 index"
            );
        }
        let half = d / 2;
        let dev = s.device().clone();
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let (Storage::Cuda(cc), Storage::Cuda(sc)) = (&*cs, &*ss) else {
            candle_core::bail!("rotary: cos/sin not on CUDA")
        };
        let (c0, c1) = contiguous_range(cl, "rotary cos")?;
        let (s0, s1) = contiguous_range(sl, "rotary sin")?;
        // The view may start anywhere in its storage: pass the slice from its start offset on.
        let start = l.start_offset();
        let (nh_i, t_i, half_i, cb_i, inv_i) = (
            nh as i32,
            t as i32,
            half as i32,
            cos_batch as i32,
            i32::from(inverse),
        );
        let (sb, sh, stt) = (st[0] as u64, st[1] as u64, st[2] as u64);
        let (ob, oh, ot) = (ost[0] as u64, ost[1] as u64, ost[2] as u64);
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let func = KERNELS.func(&dev, $name)?;
                let stream = dev.cuda_stream();
                let full = s.as_cuda_slice::<$t>()?;
                let xv = full.slice(start..);
                let cv = cc.as_cuda_slice::<$t>()?.slice(c0..c1);
                let sv = sc.as_cuda_slice::<$t>()?.slice(s0..s1);
                // SAFETY: the kernel writes every element.
                let mut out = unsafe { dev.alloc::<$t>(rows * d)? };
                if rows > 0 {
                    let mut bld = stream.launch_builder(&func);
                    bld.arg(&xv);
                    bld.arg(&cv);
                    bld.arg(&sv);
                    bld.arg(&mut out);
                    bld.arg(&nh_i);
                    bld.arg(&t_i);
                    bld.arg(&half_i);
                    bld.arg(&cb_i);
                    bld.arg(&sb);
                    bld.arg(&sh);
                    bld.arg(&stt);
                    bld.arg(&ob);
                    bld.arg(&oh);
                    bld.arg(&ot);
                    bld.arg(&inv_i);
                    let rows64 = rows as u64;
                    bld.arg(&rows64);
                    // several rows per block: one row of a 64-wide head is only 32 threads
                    let tx = (half as u32).next_power_of_two().clamp(32, 256);
                    let ty = (256 / tx).max(1);
                    let cfg = LaunchConfig {
                        grid_dim: ((rows as u32).div_ceil(ty), 1, 1),
                        block_dim: (tx, ty, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: argument types and order match `rotary_*`; `out` holds rows · d
                    // elements, `xv` the strided view the layout describes.
                    unsafe { bld.launch(cfg) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match s.dtype() {
            DType::F32 => run!(f32, "rotary_f32"),
            DType::BF16 => run!(bf16, "rotary_bf16"),
            d => candle_core::bail!("rotary: unsupported dtype {d:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::test_util::rel_diff(a, b).unwrap_or(f32::INFINITY)
    }

    #[test]
    fn rms_norm_matches_reference_values_and_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 5, 96), &dev)?)?;
        let w = Tensor::randn(1f32, 0.3, 96, &dev)?;
        let g = Tensor::randn(0f32, 1.0, (2, 5, 96), &dev)?;
        let r = crate::RmsNorm::new(w.clone(), 1e-5).forward(x.as_tensor())?;
        let a = rms_norm(x.as_tensor(), &w, 1e-5)?;
        assert!(max_diff(&a, &r) < 1e-6, "forward {}", max_diff(&a, &r));
        let gr = (&r * &g)?.sum_all()?.backward()?;
        let ga = (&a * &g)?.sum_all()?.backward()?;
        let (Some(p), Some(q)) = (ga.get(x.as_tensor()), gr.get(x.as_tensor())) else {
            panic!("missing gradient")
        };
        assert!(max_diff(p, q) < 1e-5, "gradient {}", max_diff(p, q));
        // bf16: the same bits as the reference ops
        let xb = x.as_tensor().to_dtype(DType::BF16)?;
        let rb = crate::RmsNorm::new(w.to_dtype(DType::BF16)?, 1e-5).forward(&xb)?;
        let ab = rms_norm(&xb, &w.to_dtype(DType::BF16)?, 1e-5)?;
        // one bf16 ulp (2^-8 relative) for sums in another order
        assert!(
            max_diff(&ab, &rb) <= 1.0 / 128.0,
            "bf16 forward {}",
            max_diff(&ab, &rb)
        );
        Ok(())
    }

    #[test]
    fn rotary_matches_reference_values_and_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, t, nh, d) = (2, 6, 3, 8);
        // the transposed view of a [B, T, nh, d] projection, as in attention
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nh, d), &dev)?)?;
        let xv = x.as_tensor().transpose(1, 2)?;
        let ang = Tensor::randn(0f32, 2.0, (b, 1, t, d / 2), &dev)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let g = Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?;
        let r = crate::apply_rotary(&xv, &cos, &sin)?;
        let a = rotary(&xv, &cos, &sin)?;
        assert!(max_diff(&a, &r) < 1e-6, "forward {}", max_diff(&a, &r));
        let gr = (&r * &g)?.sum_all()?.backward()?;
        let ga = (&a * &g)?.sum_all()?.backward()?;
        let (Some(p), Some(q)) = (ga.get(x.as_tensor()), gr.get(x.as_tensor())) else {
            panic!("missing gradient")
        };
        assert!(max_diff(p, q) < 1e-5, "gradient {}", max_diff(p, q));
        // bf16 forward: bit-identical to the reference ops (rounding of every operation)
        let (xb, cb, sb) = (
            xv.to_dtype(DType::BF16)?,
            cos.to_dtype(DType::BF16)?,
            sin.to_dtype(DType::BF16)?,
        );
        let d0 = max_diff(
            &rotary(&xb, &cb, &sb)?,
            &crate::apply_rotary(&xb, &cb, &sb)?,
        );
        assert!(d0 == 0.0, "bf16 forward differs by {d0}");
        Ok(())
    }

    #[test]
    fn token_major_rotary_equals_rotary_of_the_transpose() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, t, nh, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, nh, d), &dev)?)?;
        let ang = Tensor::randn(0f32, 2.0, (1, 1, t, d / 2), &dev)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let g = Tensor::randn(0f32, 1.0, (b, nh, t, d), &dev)?;
        let r = crate::apply_rotary(&x.as_tensor().transpose(1, 2)?, &cos, &sin)?;
        let a = rotary_tokens_first(x.as_tensor(), &cos, &sin)?;
        assert_eq!(a.dims(), &[b, nh, t, d]);
        assert!(a.is_contiguous());
        assert!(max_diff(&a, &r) < 1e-6, "forward {}", max_diff(&a, &r));
        let gr = (&r * &g)?.sum_all()?.backward()?;
        let ga = (&a * &g)?.sum_all()?.backward()?;
        let (Some(p), Some(q)) = (ga.get(x.as_tensor()), gr.get(x.as_tensor())) else {
            panic!("missing gradient")
        };
        assert_eq!(p.dims(), &[b, t, nh, d]);
        assert!(max_diff(p, q) < 1e-5, "gradient {}", max_diff(p, q));
        let (xb, cb, sb) = (
            x.as_tensor().to_dtype(DType::BF16)?,
            cos.to_dtype(DType::BF16)?,
            sin.to_dtype(DType::BF16)?,
        );
        let d0 = max_diff(
            &rotary_tokens_first(&xb, &cb, &sb)?,
            &crate::apply_rotary(&xb.transpose(1, 2)?, &cb, &sb)?,
        );
        assert!(d0 == 0.0, "bf16 forward differs by {d0}");
        Ok(())
    }
}
